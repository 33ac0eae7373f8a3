-- End-to-end test of the AnchorCoder Neovim plugin with the real server and the default model.
-- Run with:  nvim --headless --clean -l editors/nvim/test/e2e.lua   (see run.sh)
-- It drives a second, embedded Neovim over RPC, so that keys go through the real main loop,
-- insert mode and the plugin's mappings. Prints `N passed, M failed` last; exits 1 on failure.

local script_dir = vim.fs.dirname(vim.fs.normalize(vim.fn.fnamemodify(arg and arg[0] or debug.getinfo(1, 'S').source:sub(2), ':p')))
local plugin_root = vim.fs.dirname(script_dir)
local repo_root = vim.fs.dirname(vim.fs.dirname(plugin_root))
local bin = os.getenv('ANCHORCODER_BIN') or (repo_root .. '/target/debug/anchorcoder')
local timeout_ms = tonumber(os.getenv('ANCHORCODER_TEST_TIMEOUT_MS') or '') or 120000

local passed, failed = 0, 0
local function log(...)
  io.stdout:write(table.concat(vim.tbl_map(tostring, { ... }), ' ') .. '\n')
  io.stdout:flush()
end

-- A project folder with a real file.
local project = vim.fn.tempname() .. '-project'
vim.fn.mkdir(project .. '/.git', 'p')
local file = project .. '/main.py'
vim.fn.writefile({
  'def add(a, b):',
  '    return a + b',
  '',
  '',
  'def multiply(a, b):',
  '    return a',
}, file)

local child = vim.fn.jobstart({ vim.v.progpath, '--embed', '--headless', '--clean', '-n', '-i', 'NONE',
  '--cmd', 'set rtp^=' .. vim.fn.fnameescape(plugin_root) }, { rpc = true, cwd = project })
assert(child > 0, 'could not start the embedded nvim')

local function lua(code, ...)
  return vim.rpcrequest(child, 'nvim_exec_lua', code, { ... })
end
local function input(keys)
  vim.rpcrequest(child, 'nvim_input', keys)
end

--- Poll `code` in the child until it returns a truthy value.
local function wait_for(what, code, ms, ...)
  local deadline = vim.uv.now() + (ms or timeout_ms)
  local args = { ... }
  while vim.uv.now() < deadline do
    local v = lua(code, unpack(args))
    if v and v ~= vim.NIL then
      return v
    end
    vim.wait(100)
  end
  error(('timed out after %d ms waiting for %s'):format(ms or timeout_ms, what), 0)
end

local function eq(expected, actual, what)
  if not vim.deep_equal(expected, actual) then
    error(('%s:\n  expected %s\n  actual   %s'):format(what, vim.inspect(expected), vim.inspect(actual)), 0)
  end
end

local only = os.getenv('ANCHORCODER_TEST_ONLY') -- a Lua pattern: run only the matching tests (and setup)
local function test(name, fn)
  if only and passed + failed > 0 and not name:find(only) then
    return
  end
  local ok, err = xpcall(fn, debug.traceback)
  if ok then
    passed = passed + 1
    log('PASS ' .. name)
  else
    failed = failed + 1
    log('FAIL ' .. name .. '\n  ' .. tostring(err):gsub('\n', '\n  '))
  end
end

-- Helpers run in the child ---------------------------------------------------

local STATE = [[
  local s = require('anchorcoder.suggestion')
  local buf = vim.api.nvim_get_current_buf()
  local marks = vim.api.nvim_buf_get_extmarks(buf, s.ns, 0, -1, { details = true })
  local pos = vim.api.nvim_win_get_cursor(0)
  return {
    mode = vim.api.nvim_get_mode().mode,
    lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false),
    row = pos[1] - 1, col = pos[2],
    suggestion = s.get(buf),
    marks = marks,
    stats = s.stats,
  }
]]
local function state()
  return lua(STATE)
end

--- The suggestion showing now, with its extmark (waits for it).
local function wait_ghost(row, col)
  wait_for(('ghost text at %s:%s'):format(tostring(row), tostring(col)), [[
    local row, col = ...
    local s = require('anchorcoder.suggestion')
    local buf = vim.api.nvim_get_current_buf()
    local pos = vim.api.nvim_win_get_cursor(0)
    if row and (pos[1] - 1 ~= row or pos[2] ~= col) then
      return false
    end
    return s.get(buf) ~= nil and #vim.api.nvim_buf_get_extmarks(buf, s.ns, 0, -1, {}) > 0
  ]], nil, row, col)
  return state()
end

--- What the ghost text extmark shows: the inline first line and the virtual lines.
local function shown(st)
  eq(1, #st.marks, 'number of ghost-text extmarks')
  local m = st.marks[1]
  local d = m[4]
  eq({ st.row, st.col }, { m[2], m[3] }, 'extmark position (the cursor)')
  local out = {}
  local first = ''
  for _, chunk in ipairs(d.virt_text or {}) do
    first = first .. chunk[1]
  end
  table.insert(out, first)
  for _, vl in ipairs(d.virt_lines or {}) do
    local l = ''
    for _, chunk in ipairs(vl) do
      l = l .. chunk[1]
    end
    table.insert(out, l)
  end
  return table.concat(out, '\n')
end

--- The buffer's lines with `text` inserted at (row, col).
local function with_insert(lines, row, col, text)
  local line = lines[row + 1]
  local joined = line:sub(1, col) .. text .. line:sub(col + 1)
  local out = {}
  for i = 1, row do
    out[i] = lines[i]
  end
  for _, l in ipairs(vim.split(joined, '\n', { plain = true })) do
    table.insert(out, l)
  end
  for i = row + 2, #lines do
    table.insert(out, lines[i])
  end
  return out
end

-- The tests ------------------------------------------------------------------

log(('nvim %s, server %s, plugin %s'):format(tostring(vim.version()), bin, plugin_root))

test('setup starts the server and the default model loads', function()
  lua([[
    require('anchorcoder').setup { cmd = ..., debounce_ms = 30 }
  ]], bin)
  lua('vim.cmd.edit(...)', file)
  lua('vim.bo.expandtab = false; vim.bo.tabstop = 8; vim.bo.shiftwidth = 8; vim.bo.softtabstop = 0')
  wait_for('the anchorcoder client to attach', [[
    return #vim.lsp.get_clients({ bufnr = 0, name = 'anchorcoder' }) == 1
  ]], 30000)
  local st = wait_for('the model to be ready', [[
    local st = require('anchorcoder').status_sync(5000)
    return st and st.model.state == 'ready' and st or nil
  ]])
  eq('ready', st.model.state, 'model state')
  local root = lua([[return vim.lsp.get_clients({ bufnr = 0, name = 'anchorcoder' })[1].config.root_dir]])
  eq(vim.uv.fs_realpath(project), vim.uv.fs_realpath(root), 'root folder of the server')
end)

test('typing shows ghost text; <Tab> accepts all of it', function()
  -- Cursor at the end of `    return a`, then type ` ` and wait.
  input('6GA')
  input(' ')
  local st = wait_ghost(5, #'    return a ')
  eq('i', st.mode, 'mode while the suggestion shows')
  eq({ 5, #'    return a ' }, { st.row, st.col }, 'cursor')
  assert(type(st.suggestion) == 'string' and st.suggestion ~= '', 'a non-empty suggestion')
  eq(st.suggestion:gsub('\t', '        '), shown(st), 'ghost text drawn = the suggestion')
  local before = st.lines
  input('<Tab>')
  local after = wait_for('the accepted text', [[
    local s = require('anchorcoder.suggestion')
    return s.stats.accepted >= 1 and vim.api.nvim_buf_get_lines(0, 0, -1, false) or nil
  ]], 10000)
  eq(with_insert(before, st.row, st.col, st.suggestion), after, 'buffer after accepting all')
  local st2 = state()
  eq('i', st2.mode, 'still in insert mode')
  log('  suggestion: ' .. vim.inspect(st.suggestion))
end)

test('<M-Right> accepts one word, the rest stays as ghost text', function()
  input('<Esc>')
  lua([[vim.api.nvim_buf_set_lines(0, 5, -1, false, { '    return a * b', '', '', 'def main():', '    x = multiply(3, 4)', '    prin' })]])
  input('11GA')
  input('t')
  local st = wait_ghost(10, #'    print')
  local text = st.suggestion
  local word = text:match('^\n[ \t]*') or text:match('^[ \t]*[%w_]+') or text:match('^[ \t]*[^%w_%s]+')
    or text:match('^[ \t]+') or text
  local rest = text:sub(#word + 1)
  local accepted = lua('return require("anchorcoder.suggestion").stats.accepted')
  input('<M-Right>')
  local after = wait_for('the accepted word', [[
    return require('anchorcoder.suggestion').stats.accepted > ... and vim.api.nvim_buf_get_lines(0, 0, -1, false) or nil
  ]], 10000, accepted)
  eq(with_insert(st.lines, st.row, st.col, word), after, 'buffer after accepting a word')
  local st2 = state()
  if rest ~= '' then
    eq(rest, st2.suggestion, 'the suggestion left after the word')
    eq(rest:gsub('\t', '        '), shown(st2), 'ghost text drawn after the word')
  else
    eq(0, #st2.marks, 'no ghost text once all is accepted')
  end
  log('  suggestion: ' .. vim.inspect(text) .. ', word: ' .. vim.inspect(word))
  if rest ~= '' then
    -- <M-C-Right> accepts the rest of the line.
    local line = rest:match('^\n?[^\n]*')
    input('<M-C-Right>')
    local after2 = wait_for('the accepted line', [[
      return require('anchorcoder.suggestion').stats.accepted > ... and vim.api.nvim_buf_get_lines(0, 0, -1, false) or nil
    ]], 10000, accepted + 1)
    eq(with_insert(st2.lines, st2.row, st2.col, line), after2, 'buffer after accepting a line')
    log('  line: ' .. vim.inspect(line))
  end
end)

test('the ghost text hides while the popup menu shows', function()
  input('<Esc>')
  lua([[vim.api.nvim_buf_set_lines(0, 5, -1, false, { '    return a' })]])
  lua([[vim.o.completeopt = 'menu,menuone,noinsert,noselect']])
  input('6GA')
  input(' ')
  local st = wait_ghost(5, #'    return a ')
  eq(1, #st.marks, 'ghost text before the menu')
  input('<C-n>')
  wait_for('the popup menu', [[
    local s = require('anchorcoder.suggestion')
    return vim.fn.pumvisible() == 1 and #vim.api.nvim_buf_get_extmarks(0, s.ns, 0, -1, {}) == 0
  ]], 10000)
  input('<C-e>')
  wait_for('the ghost text to come back', [[
    local s = require('anchorcoder.suggestion')
    return vim.fn.pumvisible() == 0 and #vim.api.nvim_buf_get_extmarks(0, s.ns, 0, -1, {}) == 1
  ]], 10000)
  eq(st.lines, state().lines, 'buffer unchanged')
end)

test('<C-]> dismisses: extmark gone, buffer unchanged; <Tab> then inserts a tab', function()
  input('<Esc>')
  lua([[vim.api.nvim_buf_set_lines(0, 5, -1, false, { '    return a' })]])
  input('6GA')
  input(' ')
  local st = wait_ghost(5, #'    return a ')
  assert(#st.marks == 1, 'the ghost text extmark exists before dismissing')
  input('<C-]>')
  local gone = wait_for('the ghost text to go', [[
    local s = require('anchorcoder.suggestion')
    return #vim.api.nvim_buf_get_extmarks(0, s.ns, 0, -1, {}) == 0
  ]], 10000)
  assert(gone)
  local st2 = state()
  eq(st.lines, st2.lines, 'buffer unchanged by dismiss')
  eq(nil, st2.suggestion, 'no suggestion after dismiss')
  eq('i', st2.mode, 'still in insert mode')
  eq({ st.row, st.col }, { st2.row, st2.col }, 'cursor unchanged')
  -- With no suggestion showing, <Tab> is an ordinary <Tab>.
  input('<Tab>')
  local lines = wait_for('the tab', [[
    local l = vim.api.nvim_buf_get_lines(0, 5, 6, false)[1]
    return l:find('\t', 1, true) and vim.api.nvim_buf_get_lines(0, 0, -1, false) or nil
  ]], 10000)
  eq(with_insert(st.lines, st.row, st.col, '\t'), lines, 'buffer after the fallback <Tab>')
end)

test('typing cancels the request in flight', function()
  input('<Esc>')
  lua([[vim.api.nvim_buf_set_lines(0, 5, -1, false, { '    return a' })]])
  input('6GA')
  -- Start a request, then type while it runs.
  local r = lua([[
    local s = require('anchorcoder.suggestion')
    require('anchorcoder').suggest()
    return { inflight = s._debug().inflight, cancelled = s.stats.cancelled }
  ]])
  assert(r.inflight, 'a request is in flight')
  local before = r.cancelled
  input(' ')
  wait_for('the cancellation', 'return require("anchorcoder.suggestion").stats.cancelled > ...', 10000, before)
  wait_ghost(5, #'    return a ') -- and the new request still answers
end)

test('a resting cursor is reported to the server (anchorcoder/didMoveCursor)', function()
  input('<Esc>')
  input('2G0l')
  local st = wait_for('the server to know the cursor', [[
    local st = require('anchorcoder').status_sync(5000)
    return st and st.cursor and st.cursor.position.line == 1 and st or nil
  ]], 10000)
  eq(1, st.cursor.position.character, 'reported column (UTF-16)')
  eq(vim.uri_from_fname(vim.uv.fs_realpath(file)), st.cursor.textDocument.uri, 'reported document')
end)

test(':AnchorCoder status and :checkhealth anchorcoder', function()
  input('<Esc>')
  local st = lua([[return require('anchorcoder').status()]])
  eq('ready', st.model.state, 'status: model state')
  assert(#st.documents >= 1, 'status lists the open document')
  lua('vim.cmd("AnchorCoder status")')
  lua('vim.cmd("checkhealth anchorcoder")')
  local report = table.concat(lua('return vim.api.nvim_buf_get_lines(0, 0, -1, false)'), '\n')
  assert(report:find('binary: ', 1, true), 'health: binary found\n' .. report)
  assert(report:find('model', 1, true), 'health: model\n' .. report)
  assert(report:find('server answers anchorcoder/status', 1, true), 'health: server answers\n' .. report)
  assert(not report:find('ERROR', 1, true), 'health: no errors\n' .. report)
  lua('vim.cmd("tabclose")')
  log('  ' .. report:gsub('\n', '\n  '))
end)

test('<M-]> asks for another suggestion and keeps one showing', function()
  input('<Esc>')
  lua([[vim.api.nvim_buf_set_lines(0, 5, -1, false, { '    return a' })]])
  input('6GA')
  input(' ')
  local st = wait_ghost(5, #'    return a ')
  input('<M-]>')
  wait_for('the invoked request to be answered', [[
    local s = require('anchorcoder.suggestion')
    return s.stats.requests > ... and not s._debug().inflight
  ]], nil, st.stats.requests)
  local st2 = wait_ghost(5, #'    return a ')
  eq(st.lines, st2.lines, 'buffer unchanged by next')
  local items = lua('return require("anchorcoder.suggestion")._debug().items')
  assert(#items >= 1, 'at least one suggestion')
  assert(vim.tbl_contains(vim.tbl_map(function(i) return i.text end, items), st2.suggestion), 'the shown one is one of them')
end)

test('a missing binary gives a clear message', function()
  local msg = lua([[
    local server = require('anchorcoder.server')
    local cfg = require('anchorcoder.config').merge({ cmd = '/nonexistent/anchorcoder' })
    local cmd, err = server.command(cfg)
    local path = vim.env.PATH
    vim.env.PATH = '/nonexistent'
    local cmd2, err2 = server.command(require('anchorcoder.config').merge({}))
    vim.env.PATH = path
    return { cmd = cmd or false, err = err, cmd2 = cmd2 or false, err2 = err2 }
  ]])
  eq(false, msg.cmd, 'no command for a missing configured binary')
  eq(false, msg.cmd2, 'no command without anchorcoder on PATH')
  assert(msg.err:find('/nonexistent/anchorcoder', 1, true), msg.err)
  for _, e in ipairs({ msg.err, msg.err2 }) do
    assert(e:find('cargo install --path server', 1, true), 'says how to install: ' .. e)
  end
  -- And with the binary on PATH, it is found there.
  local found = lua([[
    local path = vim.env.PATH
    vim.env.PATH = vim.fs.dirname(...) .. ':' .. path
    local cmd = require('anchorcoder.server').command(require('anchorcoder.config').merge({}))
    vim.env.PATH = path
    return cmd
  ]], bin)
  eq({ vim.uv.fs_realpath(bin), 'serve' }, { vim.uv.fs_realpath(found[1]), found[2] }, 'command from PATH')
end)

test('the health probe starts a server of its own and gets its status', function()
  local st = lua([[return require('anchorcoder.health')._probe(..., vim.empty_dict())]], bin)
  assert(type(st) == 'table' and type(st.model) == 'table', 'a status result: ' .. vim.inspect(st))
  assert(vim.tbl_contains({ 'loading', 'pulling', 'ready' }, st.model.state), 'model state ' .. tostring(st.model.state))
end)

test(':AnchorCoder disable stops suggestions, enable brings them back', function()
  input('<Esc>')
  eq(vim.uv.fs_realpath(file), vim.uv.fs_realpath(lua('return vim.api.nvim_buf_get_name(0)')), 'back in the file')
  lua([[vim.api.nvim_buf_set_lines(0, 5, -1, false, { '    return a' })]])
  lua('vim.cmd("AnchorCoder disable")')
  local requests = state().stats.requests
  input('6GA ')
  vim.wait(1500)
  local st = state()
  eq(0, #st.marks, 'no ghost text while disabled')
  eq(requests, st.stats.requests, 'no requests while disabled')
  input('<Esc>')
  lua('vim.cmd("AnchorCoder enable")')
  input('A<BS> ')
  wait_ghost(5, #'    return a ')
end)

pcall(vim.fn.jobstop, child)
log(('%d passed, %d failed'):format(passed, failed))
os.exit(failed == 0 and passed > 0 and 0 or 1)
