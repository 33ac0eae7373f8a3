--- Default options of the AnchorCoder Neovim plugin, and their merging.
local M = {}

M.defaults = {
  -- Start attaching buffers at once after setup().
  enabled = true,
  -- Path of the `anchorcoder` binary; nil looks for `anchorcoder` on $PATH.
  -- A list is used as the whole command (e.g. { '/path/anchorcoder', 'serve' }).
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
  -- Use the built-in vim.lsp.inline_completion when Neovim has it (0.12+).
  native = true,
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
  -- Lists are replaced, not merged index by index.
  for _, key in ipairs({ 'filetypes', 'exclude_filetypes', 'root_markers' }) do
    if opts and opts[key] ~= nil then
      merged[key] = opts[key]
    end
  end
  return merged
end

return M
