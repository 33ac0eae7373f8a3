--- Inline suggestions: requests, ghost text (extmarks) and accepting them.
local server = require('anchorcoder.server')

local M = {}

M.ns = vim.api.nvim_create_namespace('anchorcoder')
local uv = vim.uv or vim.loop

---@type table  the merged options, set by init.setup()
M.cfg = nil
M.enabled = true
--- Counters, for :AnchorCoder status and the tests.
M.stats = { requests = 0, cancelled = 0, responses = 0, shown = 0, accepted = 0 }
M.last_error = nil

-- Per buffer: { timer, client, req_id, gen, items, index, row, col, tick, mark, dismissed }
local states = {}

local function state(buf)
  local s = states[buf]
  if not s then
    s = { gen = 0, items = {}, index = 1 }
    states[buf] = s
  end
  return s
end

local function in_insert()
  local mode = vim.api.nvim_get_mode().mode
  return mode:sub(1, 1) == 'i'
end

local function cursor()
  local pos = vim.api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

--- Byte column of an LSP character offset in a line.
local function byte_col(line, character, encoding)
  if encoding == 'utf-8' then
    return math.min(character, #line)
  end
  local ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  if ok and type(col) == 'number' then
    return col
  end
  ok, col = pcall(vim.str_byteindex, line, character, encoding == 'utf-16')
  return ok and col or math.min(character, #line)
end

local function hide(buf, s)
  if s.mark then
    pcall(vim.api.nvim_buf_del_extmark, buf, M.ns, s.mark)
    s.mark = nil
  end
end

local function cancel_inflight(s)
  if s.req_id and s.client then
    pcall(server.cancel, s.client, s.req_id)
    M.stats.cancelled = M.stats.cancelled + 1
  end
  s.req_id = nil
  s.gen = s.gen + 1
end

--- Drop the suggestion of a buffer: no ghost text, no request in flight.
function M.clear(buf)
  buf = (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
  local s = states[buf]
  if not s then
    return
  end
  if s.timer then
    s.timer:stop()
  end
  cancel_inflight(s)
  hide(buf, s)
  s.items, s.index = {}, 1
end

local function current_item(buf)
  local s = states[buf]
  return s and s.items[s.index], s
end

local function expand_tabs(text)
  local ts = vim.bo.tabstop > 0 and vim.bo.tabstop or 8
  return (text:gsub('\t', string.rep(' ', ts)))
end

--- Draw the current suggestion: the first line inline at the cursor, the rest as virtual lines.
function M.render(buf)
  local item, s = current_item(buf)
  if not s then
    return
  end
  hide(buf, s)
  if not item or item.text == '' then
    return
  end
  if M.cfg.hide_during_pum and vim.fn.pumvisible() == 1 then
    return
  end
  local lines = vim.split(item.text, '\n', { plain = true })
  local opts = { right_gravity = false, hl_mode = 'combine', priority = 200 }
  if lines[1] ~= '' then
    opts.virt_text = { { expand_tabs(lines[1]), M.cfg.hl_group } }
    opts.virt_text_pos = 'inline'
  end
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      table.insert(opts.virt_lines, { { expand_tabs(lines[i]), M.cfg.hl_group } })
    end
  end
  local ok, id = pcall(vim.api.nvim_buf_set_extmark, buf, M.ns, s.row, s.col, opts)
  if ok then
    s.mark = id
    M.stats.shown = M.stats.shown + 1
  end
end

--- Turn the server's items into suggestions that start at the cursor.
local function normalize(result, buf, row, col, encoding)
  local items = result and (result.items or result) or {}
  local line = vim.api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ''
  local out, seen = {}, {}
  for _, it in ipairs(items) do
    local text = it.insertText
    if type(text) == 'table' then
      text = text.value -- a snippet: insert its text as is
    end
    if type(text) == 'string' then
      local replace_end = col
      local ok = true
      if it.range then
        local srow, erow = it.range.start.line, it.range['end'].line
        if srow ~= row or erow ~= row then
          ok = false
        else
          local scol = byte_col(line, it.range.start.character, encoding)
          local ecol = byte_col(line, it.range['end'].character, encoding)
          local typed = line:sub(scol + 1, col)
          if scol > col or text:sub(1, #typed) ~= typed then
            ok = false
          else
            text = text:sub(#typed + 1)
            replace_end = math.max(ecol, col)
          end
        end
      end
      if ok and text ~= '' and not seen[text] then
        seen[text] = true
        table.insert(out, { text = text, replace_end = replace_end })
      end
    end
  end
  return out
end

--- Ask the server for a suggestion at the cursor now.
---@param trigger integer|nil 1 = invoked, 2 = automatic (default)
---@param append boolean|nil keep the current items and add the new ones (next/prev)
function M.request(buf, trigger, append)
  buf = (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
  if not M.enabled or buf ~= vim.api.nvim_get_current_buf() then
    return
  end
  local client = server.client(buf)
  if not client then
    return
  end
  local s = state(buf)
  cancel_inflight(s)
  if not append then
    hide(buf, s)
    s.items, s.index = {}, 1
  end
  local row, col = cursor()
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  local gen = s.gen
  local encoding = client.offset_encoding or 'utf-16'
  local params = vim.lsp.util.make_position_params(0, encoding)
  params.context = { triggerKind = trigger or 2 }
  M.stats.requests = M.stats.requests + 1
  local ok, id = server.request(client, 'textDocument/inlineCompletion', params, function(err, result)
    if s.gen ~= gen then
      return -- cancelled or replaced
    end
    s.req_id = nil
    M.stats.responses = M.stats.responses + 1
    if err then
      if err.code ~= -32800 then
        M.last_error = err.message or vim.inspect(err)
      end
      return
    end
    if not vim.api.nvim_buf_is_valid(buf) or vim.api.nvim_get_current_buf() ~= buf or not in_insert() then
      return
    end
    local r, c = cursor()
    if r ~= row or c ~= col or vim.api.nvim_buf_get_changedtick(buf) ~= tick then
      return -- stale: the user moved or typed meanwhile
    end
    local items = normalize(result, buf, row, col, encoding)
    if append then
      local have = {}
      for _, it in ipairs(s.items) do
        have[it.text] = true
      end
      for _, it in ipairs(items) do
        if not have[it.text] then
          table.insert(s.items, it)
        end
      end
    else
      s.items, s.index = items, 1
    end
    s.row, s.col, s.tick = row, col, tick
    M.render(buf)
  end, buf)
  if ok then
    s.client, s.req_id = client, id
  end
end

--- Ask for a suggestion after the debounce.
function M.schedule(buf)
  if not M.enabled then
    return
  end
  local s = state(buf)
  if not s.timer then
    s.timer = uv.new_timer()
  end
  s.timer:stop()
  s.timer:start(M.cfg.debounce_ms, 0, vim.schedule_wrap(function()
    if vim.api.nvim_buf_is_valid(buf) and vim.api.nvim_get_current_buf() == buf and in_insert() then
      M.request(buf, 2)
    end
  end))
end

--- Is a suggestion showing in the current buffer?
function M.visible(buf)
  buf = (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
  local item, s = current_item(buf)
  if not item or not s.mark then
    return false
  end
  local row, col = cursor()
  return row == s.row and col == s.col and vim.api.nvim_buf_get_changedtick(buf) == s.tick
end

--- The text of the suggestion showing, or nil.
function M.get(buf)
  buf = (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
  if not M.visible(buf) then
    return nil
  end
  return (current_item(buf)).text
end

--- The part of `text` that accept_word / accept_line take.
function M.part(text, kind)
  if kind == 'word' then
    return text:match('^\n[ \t]*') or text:match('^[ \t]*[%w_]+') or text:match('^[ \t]*[^%w_%s]+')
      or text:match('^[ \t]+') or text
  elseif kind == 'line' then
    return text:match('^\n?[^\n]*')
  end
  return text
end

--- Insert all of the suggestion, or its next word or line. Returns false when none shows.
---@param kind 'all'|'word'|'line'|nil
function M.accept(kind)
  kind = kind or 'all'
  local buf = vim.api.nvim_get_current_buf()
  if not M.visible(buf) then
    return false
  end
  local item, s = current_item(buf)
  local part = M.part(item.text, kind)
  local rest = item.text:sub(#part + 1)
  local lines = vim.split(part, '\n', { plain = true })
  local end_col = (rest == '') and item.replace_end or s.col
  local line = vim.api.nvim_buf_get_lines(buf, s.row, s.row + 1, false)[1] or ''
  end_col = math.min(end_col, #line)
  cancel_inflight(s)
  hide(buf, s)
  vim.api.nvim_buf_set_text(buf, s.row, s.col, s.row, end_col, lines)
  local row = s.row + #lines - 1
  local col = (#lines == 1) and (s.col + #part) or #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { row + 1, col })
  M.stats.accepted = M.stats.accepted + 1
  if rest ~= '' then
    local shift = col - s.col
    item.text = rest
    item.replace_end = item.replace_end + shift
    s.items, s.index = { item }, 1
    s.row, s.col, s.tick = row, col, vim.api.nvim_buf_get_changedtick(buf)
    M.render(buf)
  else
    s.items, s.index = {}, 1
    s.tick = vim.api.nvim_buf_get_changedtick(buf)
  end
  return true
end

--- Hide the suggestion until the next edit. Returns false when none shows.
function M.dismiss()
  local buf = vim.api.nvim_get_current_buf()
  if not M.visible(buf) then
    return false
  end
  M.clear(buf)
  return true
end

--- Show the next (or previous) suggestion; asks the server for more when there is only one.
function M.cycle(step)
  local buf = vim.api.nvim_get_current_buf()
  if not M.visible(buf) then
    return false
  end
  local s = states[buf]
  if #s.items > 1 then
    s.index = (s.index - 1 + step) % #s.items + 1
    M.render(buf)
  else
    M.request(buf, 1, true)
  end
  return true
end

-- Autocommand handlers ---------------------------------------------------

function M.on_text_changed(buf)
  local s = state(buf)
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  if tick == s.tick then
    return -- our own edit (accept)
  end
  local item = s.items[s.index]
  local row, col = cursor()
  if item and s.mark and row == s.row and col > s.col then
    -- Typed through: the new text matches the suggestion's start.
    local line = vim.api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ''
    local typed = line:sub(s.col + 1, col)
    if not typed:find('\n', 1, true) and item.text:sub(1, #typed) == typed and #typed < #item.text then
      cancel_inflight(s)
      if s.timer then
        s.timer:stop()
      end
      item.text = item.text:sub(#typed + 1)
      item.replace_end = item.replace_end + #typed
      s.items, s.index = { item }, 1
      s.col, s.tick = col, tick
      M.render(buf)
      return
    end
  end
  M.clear(buf)
  s.tick = nil
  M.schedule(buf)
end

--- A change while the popup menu shows (TextChangedP also fires once when the menu opens).
function M.on_text_changed_pum(buf)
  local s = states[buf]
  if s and vim.api.nvim_buf_get_changedtick(buf) ~= s.tick then
    M.clear(buf)
  end
end

function M.on_cursor_moved(buf)
  local s = state(buf)
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  if s.tick ~= tick then
    return -- an edit: on_text_changed handles it
  end
  local row, col = cursor()
  if row == s.row and col == s.col then
    return
  end
  M.clear(buf)
  M.schedule(buf)
end

function M.on_insert_leave(buf)
  M.clear(buf)
end

function M.on_pum(buf, showing)
  local s = states[buf]
  if not s or not M.cfg.hide_during_pum then
    return
  end
  if showing then
    hide(buf, s)
  else
    vim.schedule(function()
      if vim.api.nvim_buf_is_valid(buf) and vim.fn.pumvisible() == 0 and s.items[s.index] then
        local row, col = cursor()
        if row == s.row and col == s.col and vim.api.nvim_buf_get_changedtick(buf) == s.tick then
          M.render(buf)
        end
      end
    end)
  end
end

function M.detach(buf)
  local s = states[buf]
  if s then
    M.clear(buf)
    if s.timer then
      s.timer:close()
    end
    states[buf] = nil
  end
end

--- The state of the current buffer (for debugging and the tests).
function M._debug(buf)
  local s = states[(buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf]
  return s and { row = s.row, col = s.col, tick = s.tick, items = s.items, index = s.index, mark = s.mark,
    inflight = s.req_id ~= nil }
end

function M.clear_all()
  for buf in pairs(states) do
    if vim.api.nvim_buf_is_valid(buf) then
      M.clear(buf)
    end
  end
end

return M
