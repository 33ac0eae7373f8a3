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

function M.check()
  start('anchorcoder')
  if vim.fn.has('nvim-0.10') == 1 then
    ok('Neovim ' .. tostring(vim.version()))
  else
    error('Neovim 0.10 or later is required')
  end
  local anchorcoder = require('anchorcoder')
  local cfg = anchorcoder.cfg or require('anchorcoder.config').merge({})
  if not anchorcoder.cfg then
    warn("setup() has not been called: add `require('anchorcoder').setup{}` to your config")
  end
  if vim.lsp.inline_completion and vim.fn.has('nvim-0.12') == 1 and cfg.native then
    info('using the built-in vim.lsp.inline_completion')
  else
    info('rendering ghost text with extmarks')
  end

  local cmd, err = require('anchorcoder.server').command(cfg)
  if not cmd then
    error(err)
    return
  end
  local bin = cmd[1]
  local ver = vim.system({ bin, '--version' }, { text = true }):wait(5000)
  ok(('binary: %s (%s)'):format(bin, vim.trim(ver.stdout or '?')))

  local settings = (cfg.server or {}).settings or {}
  local model = settings.anchorcoder and settings.anchorcoder.model or settings.model
  if model and type(model.path) == 'string' then
    if vim.uv.fs_stat(vim.fn.expand(model.path)) then
      ok('model (configured): ' .. model.path)
    else
      error('configured model not found: ' .. model.path)
    end
  else
    local p = vim.system({ bin, 'model', 'path' }, { text = true }):wait(5000)
    local path = vim.trim(p.stdout or '')
    if p.code == 0 and path ~= '' and (vim.uv or vim.loop).fs_stat(path) then
      ok('default model: ' .. path)
    else
      warn('default model not downloaded yet' .. (path ~= '' and (' (' .. path .. ')') or ''),
        { 'Run :AnchorCoder pull (or `anchorcoder model pull`); the server also pulls it on first use.' })
    end
  end

  local running = require('anchorcoder.server').all_clients()
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
      error(msg .. ': ' .. tostring(st.model.error))
    else
      ok(msg)
    end
  else
    error('server does not answer: ' .. ((serr and serr.message) or '?'))
  end
end

return M
