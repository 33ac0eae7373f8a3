--- AnchorCoder for Neovim: inline ghost-text completion from a local model.
--- See :help anchorcoder.
local config = require('anchorcoder.config')
local server = require('anchorcoder.server')
local suggestion = require('anchorcoder.suggestion')
local cursor = require('anchorcoder.cursor')

local M = {}

M.cfg = nil
local augroup = nil
local warned = false

--- Does Neovim's built-in inline completion draw the suggestions? (`ui = 'native'` on 0.12+;
--- elsewhere the plugin's own ghost text stands in.)
local function native()
  return M.cfg.ui == 'native' and vim.lsp.inline_completion ~= nil and vim.fn.has('nvim-0.12') == 1
end
M._native = native

local function notify(msg, level)
  vim.notify(msg, level or vim.log.levels.INFO, { title = 'AnchorCoder' })
end

--- Should this buffer get suggestions?
function M.wants(buf)
  if not vim.api.nvim_buf_is_valid(buf) or vim.bo[buf].buftype ~= '' then
    return false
  end
  if vim.api.nvim_buf_get_name(buf) == '' then
    return false
  end
  local ft = vim.bo[buf].filetype
  if vim.tbl_contains(M.cfg.exclude_filetypes or {}, ft) then
    return false
  end
  local fts = M.cfg.filetypes
  if fts == nil or fts == '*' or vim.tbl_contains(fts, '*') then
    return true
  end
  return vim.tbl_contains(fts, ft)
end

local function buffer_autocmds(buf)
  local group = vim.api.nvim_create_augroup('anchorcoder.buf.' .. buf, { clear = true })
  local function au(events, fn)
    vim.api.nvim_create_autocmd(events, { group = group, buffer = buf, callback = function()
      if suggestion.enabled then
        fn()
      end
    end })
  end
  au('InsertEnter', function() suggestion.schedule(buf) end)
  au('TextChangedI', function() suggestion.on_text_changed(buf) end)
  au('TextChangedP', function() suggestion.on_text_changed_pum(buf) end)
  au('CursorMovedI', function() suggestion.on_cursor_moved(buf) end)
  au({ 'InsertLeave', 'BufLeave' }, function() suggestion.on_insert_leave(buf) end)
  au('CompleteChanged', function() suggestion.on_pum(buf, true) end)
  au('CompleteDone', function() suggestion.on_pum(buf, false) end)
  vim.api.nvim_create_autocmd({ 'BufUnload', 'BufWipeout' }, { group = group, buffer = buf, callback = function()
    suggestion.detach(buf)
    pcall(vim.api.nvim_del_augroup_by_id, group)
  end })
end

--- Start the server for a buffer (if needed) and watch its insert mode.
function M.attach(buf)
  buf = (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
  if not M.wants(buf) then
    return
  end
  local id, err = server.start(buf, M.cfg, function(client, bufnr)
    if native() then
      pcall(vim.lsp.inline_completion.enable, true, { bufnr = bufnr, client_id = client.id })
    end
    if M.cfg.cursor_debounce_ms and suggestion.enabled then
      cursor.schedule(bufnr, M.cfg.cursor_debounce_ms)
    end
  end)
  if not id then
    if not warned then
      warned = true
      notify(err, vim.log.levels.ERROR)
    end
    return
  end
  if not native() then
    buffer_autocmds(buf)
  end
  if M.cfg.cursor_debounce_ms then
    cursor.attach(buf, M.cfg.cursor_debounce_ms, function() return suggestion.enabled end)
  end
end

-- Keymaps ------------------------------------------------------------------

--- An insert-mode mapping: `action()` returns the keys to run instead of `lhs`
--- (a string), true (done), or false/nil: then `lhs` does what it does without the plugin.
local function map(lhs, action, desc)
  if not lhs or lhs == '' then
    return
  end
  vim.keymap.set('i', lhs, function()
    local r = action()
    if type(r) == 'string' then
      return r
    elseif r then
      return ''
    end
    return lhs
  end, { expr = true, replace_keycodes = true, silent = true, desc = 'AnchorCoder: ' .. desc })
end

-- An expression mapping cannot edit the buffer: check, then run the action in <Cmd>.
local function deferred(fn_name, arg)
  return function()
    if not suggestion.visible() then
      return false
    end
    return ("<Cmd>lua require('anchorcoder.suggestion').%s(%s)<CR>"):format(fn_name, arg or '')
  end
end

local function set_keymaps()
  local k = M.cfg.keymaps or {}
  if native() then
    map(k.accept, function()
      return vim.lsp.inline_completion.get() == true
    end, 'accept suggestion')
    map(k.next, function()
      return pcall(vim.lsp.inline_completion.select, { count = 1 })
    end, 'next suggestion')
    map(k.prev, function()
      return pcall(vim.lsp.inline_completion.select, { count = -1 })
    end, 'previous suggestion')
    if k.suggest and k.suggest ~= '' then
      vim.keymap.set('i', k.suggest, function()
        pcall(vim.lsp.inline_completion.get)
      end, { silent = true, desc = 'AnchorCoder: suggest now' })
    end
    return
  end
  map(k.accept, deferred('accept', "'all'"), 'accept suggestion')
  map(k.accept_word, deferred('accept', "'word'"), 'accept next word')
  map(k.accept_line, deferred('accept', "'line'"), 'accept next line')
  map(k.dismiss, deferred('dismiss'), 'dismiss suggestion')
  map(k.next, deferred('cycle', '1'), 'next suggestion')
  map(k.prev, deferred('cycle', '-1'), 'previous suggestion')
  if k.suggest and k.suggest ~= '' then
    vim.keymap.set('i', k.suggest, function()
      suggestion.request(0, 1)
    end, { silent = true, desc = 'AnchorCoder: suggest now' })
  end
end

-- Public API -----------------------------------------------------------------

function M.setup(opts)
  M.cfg = config.merge(opts)
  warned = false
  require('anchorcoder.command').create()
  suggestion.cfg = M.cfg
  suggestion.enabled = M.cfg.enabled
  vim.api.nvim_set_hl(0, 'AnchorCoderSuggestion', { link = 'Comment', default = true })
  augroup = vim.api.nvim_create_augroup('anchorcoder', { clear = true })
  vim.api.nvim_create_autocmd({ 'FileType', 'BufReadPost', 'BufNewFile' }, {
    group = augroup,
    callback = function(ev)
      if suggestion.enabled then
        M.attach(ev.buf)
      end
    end,
  })
  set_keymaps()
  if suggestion.enabled then
    for _, buf in ipairs(vim.api.nvim_list_bufs()) do
      if vim.api.nvim_buf_is_loaded(buf) then
        M.attach(buf)
      end
    end
  end
  return M
end

local function ensure_setup()
  if not M.cfg then
    M.setup({})
  end
end

function M.enable()
  ensure_setup()
  suggestion.enabled = true
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(buf) then
      M.attach(buf)
    end
  end
  if native() then
    pcall(vim.lsp.inline_completion.enable, true)
  end
  notify('AnchorCoder enabled')
end

function M.disable()
  ensure_setup()
  suggestion.enabled = false
  suggestion.clear_all()
  if native() then
    pcall(vim.lsp.inline_completion.enable, false)
  end
  notify('AnchorCoder disabled')
end

--- Accept, dismiss, etc. for use in your own mappings; each returns false when no suggestion shows.
function M.visible() return suggestion.visible() end
function M.get() return suggestion.get() end
function M.accept() return suggestion.accept('all') end
function M.accept_word() return suggestion.accept('word') end
function M.accept_line() return suggestion.accept('line') end
function M.dismiss() return suggestion.dismiss() end
function M.next() return suggestion.cycle(1) end
function M.prev() return suggestion.cycle(-1) end
function M.suggest() return suggestion.request(0, 1) end

--- The `anchorcoder/status` result of the current buffer's server (or the first one), or nil, err.
function M.status_sync(timeout_ms)
  local client = server.client(0) or server.all_clients()[1]
  if not client then
    return nil, 'no AnchorCoder server is running (open a file to start one)'
  end
  local res, err = server.request_sync(client, 'anchorcoder/status', vim.empty_dict(), timeout_ms or 5000, 0)
  if not res then
    return nil, err or 'no answer'
  end
  if res.err then
    return nil, res.err.message or vim.inspect(res.err)
  end
  return res.result, nil, client
end

function M.status()
  ensure_setup()
  local st, err, client = M.status_sync()
  if not st then
    notify('AnchorCoder: ' .. err, vim.log.levels.WARN)
    return
  end
  local lines = {
    ('AnchorCoder %s (root %s)'):format(suggestion.enabled and 'enabled' or 'disabled', client.config.root_dir or '?'),
    ('model: %s (%s, %s)%s'):format(st.model.path or '?', st.model.source or '?', st.model.state,
      st.model.error and (' error: ' .. st.model.error) or ''),
    ('policy: %s, cache %d / %d bytes, queue %d'):format(
      type(st.policy) == 'table' and vim.json.encode(st.policy) or tostring(st.policy), st.cacheBytes or 0,
      st.cacheBudgetBytes or 0, st.queueDepth or 0),
    ('last latencies (ms): %s'):format(table.concat(vim.tbl_map(function(x)
      return ('%.0f'):format(x)
    end, st.lastLatenciesMs or {}), ', ')),
  }
  local b = st.backend
  if type(b) == 'table' and b.kind and b.kind ~= 'local' then
    table.insert(lines, ('remote %s at %s: %s%s%s%s'):format(b.kind, b.url or '?', b.state or '?',
      b.latencyMs ~= nil and b.latencyMs ~= vim.NIL and (' (%.0f ms)'):format(b.latencyMs) or '',
      b.lastError ~= nil and b.lastError ~= vim.NIL and (', last error: ' .. b.lastError) or '',
      b.fallbackToLocal and ', falls back to the local model' or ''))
  end
  for _, d in ipairs(st.documents or {}) do
    table.insert(lines, ('  %s: %d tokens, %d anchors, %d kept, %d KV bytes'):format(
      vim.uri_to_fname(d.uri), d.tokens or 0, d.anchors or 0, d.keptTokens or 0, d.kvBytes or 0))
  end
  table.insert(lines, ('requests %d, cancelled %d, shown %d, accepted %d'):format(
    suggestion.stats.requests, suggestion.stats.cancelled, suggestion.stats.shown, suggestion.stats.accepted))
  if suggestion.last_error then
    table.insert(lines, 'last error: ' .. suggestion.last_error)
  end
  notify(table.concat(lines, '\n'))
  return st
end

--- Run `anchorcoder model pull` in the background.
function M.pull()
  ensure_setup()
  local cmd, err = server.command(M.cfg)
  if not cmd then
    notify(err, vim.log.levels.ERROR)
    return
  end
  notify('AnchorCoder: pulling the default model…')
  vim.system({ cmd[1], 'model', 'pull' }, { text = true }, vim.schedule_wrap(function(out)
    if out.code == 0 then
      notify('AnchorCoder: model ready. ' .. vim.trim(out.stdout or ''))
    else
      notify('AnchorCoder: model pull failed: ' .. vim.trim((out.stderr or '') .. (out.stdout or '')),
        vim.log.levels.ERROR)
    end
  end))
end

--- `:AnchorCoder install [source|release]`: build or download the server (see anchorcoder.install);
--- once it is there, buffers are attached. Waits for the end when Neovim has no UI (a plugin
--- manager's build step run headless). Returns the install job.
function M.install(mode, opts)
  local cfg = M.cfg or config.merge({})
  opts = vim.tbl_extend('keep', opts or {}, { mode = mode or 'auto', wait = #vim.api.nvim_list_uis() == 0 })
  local on_done = opts.on_done
  return require('anchorcoder.install').install(cfg, opts, function(path, msg)
    if path and M.cfg and suggestion.enabled then
      warned = false
      for _, buf in ipairs(vim.api.nvim_list_bufs()) do
        if vim.api.nvim_buf_is_loaded(buf) and not server.client(buf) then
          M.attach(buf)
        end
      end
    end
    if on_done then
      on_done(path, msg)
    end
  end)
end

function M.command(args)
  local sub = args.fargs[1] or 'status'
  if sub == 'status' then
    M.status()
  elseif sub == 'enable' then
    M.enable()
  elseif sub == 'disable' then
    M.disable()
  elseif sub == 'pull' then
    M.pull()
  elseif sub == 'install' then
    local mode = args.fargs[2] or 'auto'
    if mode ~= 'auto' and mode ~= 'source' and mode ~= 'release' then
      notify('AnchorCoder: :AnchorCoder install [source|release], not ' .. mode, vim.log.levels.ERROR)
      return
    end
    M.install(mode)
  else
    notify('AnchorCoder: unknown subcommand ' .. sub .. ' (status, enable, disable, pull, install)',
      vim.log.levels.ERROR)
  end
end

return M
