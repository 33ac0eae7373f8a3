--- :checkhealth anchorcoder — binary found, model present, server answers.
local M = {}

local health = vim.health
local start = health.start or health.report_start
local ok = health.ok or health.report_ok
local warn = health.warn or health.report_warn
local error = health.error or health.report_error
local info = health.info or health.report_info

local function frame(msg)
  local body = vim.json.encode(msg)
  return ('Content-Length: %d\r\n\r\n%s'):format(#body, body)
end

--- Start the server once, ask `anchorcoder/status`, and shut it down.
local function probe(bin, settings, timeout_ms)
  local out, answer, initialized = '', nil, nil
  local function on_stdout(_, data)
    if not data then
      return
    end
    out = out .. data
    for body in out:gmatch('\r\n\r\n(%b{})') do
      local okj, msg = pcall(vim.json.decode, body)
      if okj and type(msg) == 'table' and msg.id == 1 then
        initialized = msg
      elseif okj and type(msg) == 'table' and msg.id == 2 then
        answer = msg
      end
    end
  end
  local okp, proc = pcall(vim.system, { bin, 'serve' }, { stdin = true, stdout = on_stdout, text = true })
  if not okp then
    return nil, { message = tostring(proc) }
  end
  proc:write(frame({ jsonrpc = '2.0', id = 1, method = 'initialize', params = {
    processId = vim.NIL, rootUri = vim.NIL, capabilities = vim.empty_dict(),
    initializationOptions = (settings and next(settings)) and settings or vim.empty_dict(),
  } }))
  local deadline = vim.uv.now() + (timeout_ms or 15000)
  vim.wait(timeout_ms or 15000, function()
    return initialized ~= nil
  end, 50)
  if initialized and initialized.result then
    proc:write(frame({ jsonrpc = '2.0', method = 'initialized', params = vim.empty_dict() }))
    proc:write(frame({ jsonrpc = '2.0', id = 2, method = 'anchorcoder/status' }))
    vim.wait(math.max(deadline - vim.uv.now(), 1), function()
      return answer ~= nil
    end, 50)
  end
  pcall(function()
    proc:write(frame({ jsonrpc = '2.0', id = 3, method = 'shutdown' }))
    proc:write(frame({ jsonrpc = '2.0', method = 'exit' }))
    proc:write(nil)
  end)
  local res = proc:wait(3000)
  if not answer then
    return nil, { message = ('no status answer (exit %s) %s'):format(tostring(res.code), vim.trim(res.stderr or ''):sub(1, 300)) }
  end
  return answer.result, answer.error
end

M._probe = probe

--- The buffer the user was in before :checkhealth opened its own (a tab, a float, or this window).
local function user_buffer()
  local cur = vim.api.nvim_get_current_buf()
  local function normal(buf)
    return buf and buf > 0 and buf ~= cur and vim.api.nvim_buf_is_valid(buf) and vim.bo[buf].buftype == ''
  end
  local tab = vim.fn.tabpagenr('#')
  if tab > 0 and tab ~= vim.fn.tabpagenr() then
    local buf = vim.fn.tabpagebuflist(tab)[vim.fn.tabpagewinnr(tab)]
    if normal(buf) then
      return buf
    end
  end
  local win = vim.fn.win_getid(vim.fn.winnr('#'))
  if win > 0 and normal(vim.api.nvim_win_get_buf(win)) then
    return vim.api.nvim_win_get_buf(win)
  end
  local alt = vim.fn.bufnr('#')
  if normal(alt) then
    return alt
  end
  return nil
end

local function native_available()
  return vim.lsp.inline_completion ~= nil and vim.fn.has('nvim-0.12') == 1
end

function M.check()
  start('anchorcoder')
  if vim.fn.has('nvim-0.10') == 1 then
    ok('Neovim ' .. tostring(vim.version()))
  else
    error('Neovim ' .. tostring(vim.version()) .. ' is too old: 0.10 or later is required',
      { 'Upgrade Neovim (https://github.com/neovim/neovim/releases)' })
  end
  local anchorcoder = require('anchorcoder')
  local config = require('anchorcoder.config')
  local cfg = anchorcoder.cfg or config.merge({})
  if anchorcoder.cfg then
    ok('setup() was called')
  else
    warn('setup() has not been called: no buffer gets suggestions',
      { "Add `require('anchorcoder').setup {}` to your config (lazy.nvim: `opts = {}`)" })
  end
  local problems = config.validate(cfg)
  if #problems == 0 then
    ok('options are valid')
  end
  for _, p in ipairs(problems) do
    error('option: ' .. p[1], { p[2] })
  end
  if cfg.ui == 'native' then
    if native_available() then
      ok('ui: the built-in vim.lsp.inline_completion (ui = "native")')
    else
      warn('ui = "native" needs vim.lsp.inline_completion (Neovim 0.12+); this Neovim has none, '
        .. 'so the plugin draws its own ghost text', { 'Upgrade to Neovim 0.12, or set ui = "ghost"' })
    end
  else
    ok('ui: the plugin\'s own ghost text (ui = "ghost")')
    if native_available() then
      info('This Neovim has vim.lsp.inline_completion: ui = "native" would use it')
    end
  end

  start('anchorcoder: server')
  local server = require('anchorcoder.server')
  local install = require('anchorcoder.install')
  local found, _, ferr = server.find(cfg)
  if not found then
    local fixes = {}
    if install.checkout() then
      table.insert(fixes, 'Run :AnchorCoder install (builds it from this checkout with cargo)')
    elseif cfg.install and cfg.install.url then
      table.insert(fixes, 'Run :AnchorCoder install (downloads ' .. cfg.install.url .. ')')
    else
      table.insert(fixes, 'Set install = { url = "…/anchorcoder-{version}-{platform}.tar.gz" } and run :AnchorCoder install')
    end
    table.insert(fixes, 'Or from the AnchorCoder repository: cargo install --path server')
    table.insert(fixes, "Or point the plugin at a binary: setup { cmd = '/path/to/anchorcoder' }")
    error('server binary not found: ' .. ferr, fixes)
    return
  end
  local why = found.why
  if found.source == 'installed' then
    local origin = install.origin(cfg)
    if origin and origin.from == 'release' then
      why = why .. ' from ' .. tostring(origin.url)
    elseif origin and origin.from == 'source' then
      why = why .. ', built in ' .. tostring(origin.repo)
    end
  end
  ok(('server binary: %s (found through %s)'):format(found.path, why))
  local bin = found.path
  local vok, ver = pcall(function()
    return vim.system({ bin, '--version' }, { text = true }):wait(10000)
  end)
  if not vok or ver.code ~= 0 then
    local detail = vok and (('exit %s, signal %s: %s'):format(tostring(ver.code), tostring(ver.signal),
      vim.trim((ver.stderr or '') .. (ver.stdout or '')):sub(1, 300))) or tostring(ver)
    error(('`%s --version` fails (%s)'):format(bin, detail), {
      'Reinstall the server: :AnchorCoder install',
      'A build from another machine can die with an illegal instruction (signal 4): use a release archive or rebuild here',
    })
    return
  end
  local version = vim.trim(ver.stdout or '')
  ok(('`anchorcoder --version` runs: %s'):format(version))
  local v = version:match('(%d+%.%d+%.%d+)')
  if v and v ~= install.version then
    warn(('the server is %s, this plugin belongs to %s'):format(v, install.version),
      { 'Update the server: :AnchorCoder install' })
  end

  local settings = (cfg.server or {}).settings or {}
  local model = settings.anchorcoder and settings.anchorcoder.model or settings.model
  if type(model) == 'table' and type(model.path) == 'string' then
    if (vim.uv or vim.loop).fs_stat(vim.fn.expand(model.path)) then
      ok('model (configured): ' .. model.path)
    else
      error('configured model not found: ' .. model.path,
        { 'Fix server.settings.anchorcoder.model.path, or remove it to use the default model' })
    end
  else
    local p = vim.system({ bin, 'model', 'path' }, { text = true }):wait(10000)
    local path = vim.trim(p.stdout or '')
    if p.code == 0 and path ~= '' and (vim.uv or vim.loop).fs_stat(path) then
      ok('default model: ' .. path)
    else
      warn('default model not downloaded yet' .. (path ~= '' and (' (' .. path .. ')') or ''),
        { 'Run :AnchorCoder pull (or `anchorcoder model pull`); the server also pulls it on first use.' })
    end
  end

  local buf = user_buffer()
  local client = buf and server.client(buf)
  local name = buf and vim.fn.fnamemodify(vim.api.nvim_buf_get_name(buf), ':~:.') or nil
  if client then
    ok(('LSP client %d attached to the current buffer (%s), root %s'):format(client.id, name,
      tostring(client.config.root_dir)))
  elseif not buf then
    info('no file buffer was current when :checkhealth ran: open a file, then run it again to check the LSP client')
  elseif not anchorcoder.cfg then
    warn(('no LSP client attached to the current buffer (%s): setup() has not been called'):format(name),
      { "Call require('anchorcoder').setup {}" })
  elseif not require('anchorcoder.suggestion').enabled then
    warn(('no LSP client attached to the current buffer (%s): AnchorCoder is disabled'):format(name),
      { 'Run :AnchorCoder enable' })
  elseif not anchorcoder.wants(buf) then
    info(('no LSP client for the current buffer (%s): filetype "%s" is not attached (filetypes / exclude_filetypes)')
      :format(name, vim.bo[buf].filetype))
  else
    warn(('no LSP client attached to the current buffer (%s)'):format(name),
      { 'Run :edit to attach it again; see :LspLog and the server log for why it stopped' })
  end

  local running = server.all_clients()
  local st, serr
  if #running > 0 then
    st, serr = anchorcoder.status_sync(5000)
    if serr then
      serr = { message = serr }
    end
  else
    st, serr = probe(bin, settings)
  end
  if st and st.model then
    local msg = ('server answers anchorcoder/status: model %s (%s)'):format(st.model.state, st.model.path or '?')
    if st.model.state == 'error' then
      error(msg .. ': ' .. tostring(st.model.error), { 'Check the model settings; :AnchorCoder pull fetches the default model' })
    else
      ok(msg)
    end
  else
    error('server does not answer: ' .. ((serr and serr.message) or '?'),
      { 'See the server log ($XDG_CACHE_HOME/anchorcoder/anchorcoder.log) and :LspLog' })
  end
end

return M
