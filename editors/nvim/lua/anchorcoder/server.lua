--- Finding the `anchorcoder` binary and starting one language server per root folder.
local M = {}

M.name = 'anchorcoder'

M.install_hint = table.concat({
  'Install it with `:AnchorCoder install` (builds it when the plugin sits in the AnchorCoder',
  'repository, else downloads a release: set `install.url`), or with `cargo install --path server`',
  'from the AnchorCoder repository, or set',
  "`require('anchorcoder').setup { cmd = '/path/to/anchorcoder' }`.",
}, ' ')

local exe = vim.fn.has('win32') == 1 and 'anchorcoder.exe' or 'anchorcoder'

--- Where `:AnchorCoder install` puts the binary.
function M.installed_path(cfg)
  return require('anchorcoder.config').install_dir(cfg) .. '/bin/' .. exe
end

--- Where `cargo install` puts it: $CARGO_HOME/bin, by default ~/.cargo/bin.
function M.cargo_path()
  local home = vim.env.CARGO_HOME
  if not home or home == '' then
    home = vim.fn.expand('~/.cargo')
  end
  return home .. '/bin/' .. exe
end

--- Find the server. Returns { cmd = string[], path = string, source = 'cmd'|'installed'|'path'|'cargo',
--- why = string } or nil, err (which says where it looked and how to install it), and err
--- without the how-to.
local function find(cfg)
  local cmd = cfg.cmd
  if type(cmd) == 'table' then
    cmd = vim.deepcopy(cmd)
    if type(cmd[1]) ~= 'string' or vim.fn.executable(cmd[1]) ~= 1 then
      return nil, ('configured command `%s` is not executable.'):format(tostring(cmd[1]))
    end
    local path = vim.fn.exepath(cmd[1])
    return { cmd = cmd, path = path ~= '' and path or cmd[1], source = 'cmd', why = 'the `cmd` option' }
  end
  if type(cmd) == 'string' and cmd ~= '' then
    local path = vim.fn.expand(cmd)
    if vim.fn.executable(path) ~= 1 then
      return nil, ('configured binary `%s` is not executable.'):format(path)
    end
    return { cmd = { path, 'serve' }, path = path, source = 'cmd', why = 'the `cmd` option' }
  end
  local installed = M.installed_path(cfg)
  if vim.fn.executable(installed) == 1 then
    return { cmd = { installed, 'serve' }, path = installed, source = 'installed',
      why = 'installed by :AnchorCoder install' }
  end
  local on_path = vim.fn.exepath('anchorcoder')
  if on_path ~= '' then
    return { cmd = { on_path, 'serve' }, path = on_path, source = 'path', why = '`anchorcoder` on $PATH' }
  end
  local cargo = M.cargo_path()
  if vim.fn.executable(cargo) == 1 then
    return { cmd = { cargo, 'serve' }, path = cargo, source = 'cargo', why = 'installed by `cargo install`' }
  end
  return nil, ('the `anchorcoder` binary was not found (looked at the `cmd` option, %s, $PATH, %s).')
    :format(installed, cargo)
end

function M.find(cfg)
  local found, err = find(cfg)
  if not found then
    return nil, 'AnchorCoder: ' .. err .. ' ' .. M.install_hint, err
  end
  return found
end

--- The command that starts the server, or nil and an error message.
---@return string[]|nil, string|nil
function M.command(cfg)
  local found, err = M.find(cfg)
  if not found then
    return nil, err
  end
  return found.cmd
end

--- The root folder of a buffer: the nearest folder with a root marker, else the file's folder.
function M.root_dir(bufnr, cfg)
  local name = vim.api.nvim_buf_get_name(bufnr)
  local root
  if vim.fs.root then
    root = vim.fs.root(bufnr, cfg.root_markers)
  else
    local found = vim.fs.find(cfg.root_markers, { path = vim.fs.dirname(name), upward = true })[1]
    root = found and vim.fs.dirname(found)
  end
  return root or (name ~= '' and vim.fs.dirname(name)) or vim.fn.getcwd()
end

local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  -- Neovim 0.11 does not announce inline completion: say we handle it.
  caps.textDocument = caps.textDocument or {}
  caps.textDocument.inlineCompletion = caps.textDocument.inlineCompletion or { dynamicRegistration = false }
  caps.window = caps.window or {}
  caps.window.workDoneProgress = true
  return caps
end

--- Start (or reuse) the client for a buffer's root folder and attach the buffer.
---@return integer|nil client_id, string|nil err
function M.start(bufnr, cfg, on_attach)
  local cmd, err = M.command(cfg)
  if not cmd then
    return nil, err
  end
  local settings = cfg.server.settings or {}
  if next(settings) == nil then
    settings = vim.empty_dict() -- `{}`, not `[]`, on the wire
  end
  local lsp_config = vim.tbl_deep_extend('force', {
    name = M.name,
    cmd = cmd,
    root_dir = M.root_dir(bufnr, cfg),
    capabilities = capabilities(),
    init_options = settings,
    settings = settings,
    on_init = function(client)
      if next(settings) ~= nil then
        M.notify(client, 'workspace/didChangeConfiguration', { settings = settings })
      end
    end,
    on_attach = on_attach,
  }, cfg.server.lsp or {})
  local id = vim.lsp.start(lsp_config, { bufnr = bufnr })
  return id
end

--- The AnchorCoder client attached to a buffer, if any.
function M.client(bufnr)
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  return get({ bufnr = bufnr or 0, name = M.name })[1]
end

function M.all_clients()
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  return get({ name = M.name })
end

-- Method calls that work on Neovim 0.10 (closures called with a dot) and
-- 0.11+ (methods called with a colon).
local colon = vim.fn.has('nvim-0.11') == 1

function M.request(client, method, params, handler, bufnr)
  if colon then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

function M.notify(client, method, params)
  if colon then
    return client:notify(method, params)
  end
  return client.notify(method, params)
end

function M.cancel(client, id)
  if colon then
    return client:cancel_request(id)
  end
  return client.cancel_request(id)
end

function M.request_sync(client, method, params, timeout, bufnr)
  if colon then
    return client:request_sync(method, params, timeout, bufnr)
  end
  return client.request_sync(method, params, timeout, bufnr)
end

return M
