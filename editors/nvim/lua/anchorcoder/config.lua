--- Default options of the AnchorCoder Neovim plugin, and their merging.
local M = {}

M.defaults = {
  -- Start attaching buffers at once after setup().
  enabled = true,
  -- Path of the `anchorcoder` binary. nil looks, in order, for the one
  -- `:AnchorCoder install` put under `install.dir`, `anchorcoder` on $PATH, and
  -- $CARGO_HOME/bin (default ~/.cargo/bin). A list is used as the whole command
  -- (e.g. { '/path/anchorcoder', 'serve' }).
  cmd = nil,
  -- Filetypes to attach to: '*' (or nil) means every normal file buffer.
  filetypes = { '*' },
  -- Filetypes never attached to (checked after `filetypes`).
  exclude_filetypes = { 'help', 'gitcommit', 'gitrebase', 'TelescopePrompt', 'qf', 'netrw' },
  -- Files that mark a project root; one server runs per root folder.
  root_markers = { '.git', '.hg', '.svn', 'Cargo.toml', 'package.json', 'pyproject.toml', 'go.mod' },
  -- Milliseconds to wait after the last keystroke before asking for a suggestion.
  debounce_ms = 75,
  -- Milliseconds the cursor rests before the server is told where it is (so it
  -- prepares that place before you type); false turns it off.
  cursor_debounce_ms = 250,
  -- Highlight group of the ghost text (linked to Comment unless defined by the user).
  hl_group = 'AnchorCoderSuggestion',
  -- Hide the ghost text while the popup menu (completion menu) shows.
  hide_during_pum = true,
  -- Who draws the suggestions: 'ghost' (the plugin's own ghost text: accept
  -- word / line, dismiss, hidden while the popup menu shows) or 'native' (the
  -- built-in vim.lsp.inline_completion of Neovim 0.12+; where Neovim lacks it,
  -- 'ghost' is used instead). The older `native = true|false` still works.
  ui = 'ghost',
  -- Insert-mode keymaps; false disables one. When no suggestion shows, the
  -- key does what it does without the plugin.
  keymaps = {
    accept = '<Tab>',
    accept_word = '<M-Right>',
    accept_line = '<M-C-Right>',
    dismiss = '<C-]>',
    next = '<M-]>',
    prev = '<M-[>',
    suggest = '<M-\\>', -- ask for a suggestion now (always mapped)
  },
  -- `:AnchorCoder install`: where the server goes, and where release archives come from.
  install = {
    -- The server is installed as `<dir>/bin/anchorcoder`; nil: stdpath('data')/anchorcoder.
    dir = nil,
    -- URL template of a release archive ({version}, {platform}: linux-x64 or linux-arm64),
    -- as scripts/package names them; the checksum is read from the same URL plus `.sha256`.
    -- e.g. 'https://example.org/anchorcoder/v{version}/anchorcoder-{version}-{platform}.tar.gz'
    -- (file:// works too). nil: only building from a source checkout is possible.
    url = nil,
    -- The release to download; nil: the version this plugin belongs to.
    version = nil,
  },
  server = {
    -- Sent as initializationOptions and with workspace/didChangeConfiguration;
    -- see docs/configuration.md, e.g. { anchorcoder = { completion = { maxLines = 3 } } }.
    settings = {},
    -- Extra fields passed to vim.lsp.start (e.g. on_attach, capabilities).
    lsp = {},
  },
}

function M.merge(opts)
  local merged = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  -- `native` (boolean, before `ui` existed) stands for `ui` unless `ui` is given.
  if opts and opts.ui == nil and opts.native ~= nil then
    merged.ui = opts.native and 'native' or 'ghost'
  end
  merged.native = nil
  -- Lists are replaced, not merged index by index.
  for _, key in ipairs({ 'filetypes', 'exclude_filetypes', 'root_markers' }) do
    if opts and opts[key] ~= nil then
      merged[key] = opts[key]
    end
  end
  return merged
end

--- Where `:AnchorCoder install` puts the server (`<dir>/bin/anchorcoder`).
function M.install_dir(cfg)
  local dir = cfg and cfg.install and cfg.install.dir
  if type(dir) == 'string' and dir ~= '' then
    return vim.fn.expand(dir)
  end
  return vim.fn.stdpath('data') .. '/anchorcoder'
end

local function is_key(v)
  return v == false or (type(v) == 'string')
end

--- Problems with a merged configuration: a list of { message, fix }, empty when all is well.
function M.validate(cfg)
  local problems = {}
  local function bad(msg, fix)
    table.insert(problems, { msg, fix })
  end
  for key in pairs(cfg) do
    if M.defaults[key] == nil and key ~= 'cmd' then
      bad(('unknown option `%s`'):format(key), 'remove it or check its spelling in :help anchorcoder.setup()')
    end
  end
  local cmd = cfg.cmd
  if cmd ~= nil and type(cmd) ~= 'string' and not (type(cmd) == 'table' and type(cmd[1]) == 'string') then
    bad('`cmd` must be a path (string) or a command list such as { "/path/anchorcoder", "serve" }',
      'set cmd = nil to let the plugin find the server')
  end
  if cfg.ui ~= 'ghost' and cfg.ui ~= 'native' then
    bad(('`ui` is %s'):format(vim.inspect(cfg.ui)), "use ui = 'ghost' or ui = 'native'")
  end
  if type(cfg.debounce_ms) ~= 'number' or cfg.debounce_ms < 0 then
    bad(('`debounce_ms` is %s'):format(vim.inspect(cfg.debounce_ms)), 'use a number of milliseconds, e.g. 75')
  end
  local cd = cfg.cursor_debounce_ms
  if cd ~= false and cd ~= nil and (type(cd) ~= 'number' or cd < 0) then
    bad(('`cursor_debounce_ms` is %s'):format(vim.inspect(cd)), 'use a number of milliseconds, or false')
  end
  for _, key in ipairs({ 'filetypes', 'exclude_filetypes', 'root_markers' }) do
    local v = cfg[key]
    if v ~= nil and not (key == 'filetypes' and v == '*') and not vim.islist(v) then
      bad(('`%s` must be a list of strings'):format(key), ("e.g. %s = { 'python', 'lua' }"):format(key))
    end
  end
  if type(cfg.keymaps) ~= 'table' then
    bad('`keymaps` must be a table', 'e.g. keymaps = { accept = "<Tab>" }, or leave it out')
  else
    for name, lhs in pairs(cfg.keymaps) do
      if M.defaults.keymaps[name] == nil then
        bad(('unknown key map `keymaps.%s`'):format(name), 'known: ' .. table.concat(vim.tbl_keys(M.defaults.keymaps), ', '))
      elseif not is_key(lhs) then
        bad(('`keymaps.%s` is %s'):format(name, vim.inspect(lhs)), 'use a key such as "<Tab>", or false')
      end
    end
  end
  local install = cfg.install
  if type(install) ~= 'table' then
    bad('`install` must be a table', 'e.g. install = { url = "https://…/anchorcoder-{version}-{platform}.tar.gz" }')
  else
    if install.url ~= nil and (type(install.url) ~= 'string' or not install.url:find('{platform}', 1, true)) then
      bad(('`install.url` is %s: it needs a {platform} placeholder'):format(vim.inspect(install.url)),
        'e.g. "https://…/v{version}/anchorcoder-{version}-{platform}.tar.gz"')
    end
    if install.dir ~= nil and type(install.dir) ~= 'string' then
      bad('`install.dir` must be a path', 'leave it out for stdpath("data")/anchorcoder')
    end
    if install.version ~= nil and type(install.version) ~= 'string' then
      bad('`install.version` must be a string such as "0.1.0"', 'leave it out for the plugin\'s own version')
    end
  end
  if type(cfg.server) ~= 'table' or type(cfg.server.settings or {}) ~= 'table' or type(cfg.server.lsp or {}) ~= 'table' then
    bad('`server.settings` and `server.lsp` must be tables', 'see :help anchorcoder.setup()')
  end
  return problems
end

return M
