--- Tells the server where the cursor rests (`anchorcoder/didMoveCursor`), so
--- that it warms that document's cache there before the first keystroke: the
--- LSP itself never says where the cursor is. Debounced; one timer for all
--- buffers (only the current buffer's cursor matters).
local server = require('anchorcoder.server')

local M = {}

local uv = vim.uv or vim.loop
local timer = nil

--- Last position sent, per buffer: { row, col, tick }; not sent twice.
local sent = {}

local function send(buf)
  if not vim.api.nvim_buf_is_valid(buf) or vim.api.nvim_get_current_buf() ~= buf then
    return
  end
  local client = server.client(buf)
  if not client then
    return
  end
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  local last = sent[buf]
  if last and last[1] == row and last[2] == col and last[3] == tick then
    return
  end
  sent[buf] = { row, col, tick }
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding or 'utf-16')
  server.notify(client, 'anchorcoder/didMoveCursor', { textDocument = params.textDocument, position = params.position })
end

--- Report the current buffer's cursor after `delay_ms` without movement.
function M.schedule(buf, delay_ms)
  if not timer then
    timer = uv.new_timer()
  end
  timer:stop()
  timer:start(delay_ms, 0, vim.schedule_wrap(function()
    send(buf)
  end))
end

--- Watch a buffer's cursor (normal and insert mode, and entering the buffer).
---@param enabled fun(): boolean whether suggestions are on right now
function M.attach(buf, delay_ms, enabled)
  local group = vim.api.nvim_create_augroup('anchorcoder.cursor.' .. buf, { clear = true })
  vim.api.nvim_create_autocmd({ 'BufEnter', 'CursorMoved', 'CursorMovedI' }, {
    group = group,
    buffer = buf,
    callback = function()
      if enabled() then
        M.schedule(buf, delay_ms)
      end
    end,
  })
  vim.api.nvim_create_autocmd({ 'BufUnload', 'BufWipeout' }, { group = group, buffer = buf, callback = function()
    sent[buf] = nil
    pcall(vim.api.nvim_del_augroup_by_id, group)
  end })
  -- The buffer is usually current when it is attached: report it once the server is up.
  if buf == vim.api.nvim_get_current_buf() and enabled() then
    M.schedule(buf, delay_ms)
  end
end

return M
