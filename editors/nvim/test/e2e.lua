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

test('after Enter the suggestion starts on the new, indented line; accept-line takes its first line', function()
  input('<Esc>')
  local saved = lua('return vim.api.nvim_buf_get_lines(0, 0, -1, false)')
  lua([[
    vim.bo.autoindent = true
    vim.api.nvim_buf_set_lines(0, 0, -1, false, {
      'def parse_args():',
      '\t"""Parse the command line: --input, --output and --verbose."""',
    })
  ]])
  input('2GA')
  input('<CR>')
  local st = wait_ghost(2, 1)
  eq('\t', st.lines[3], 'the editor left the new line indented and empty')
  local text = st.suggestion
  log('  suggestion: ' .. vim.inspect(text))
  local first = text:match('^[^\n]*')
  assert(first:match('%S'), "the first line has code on the cursor's line: " .. vim.inspect(text))
  assert(not first:match('^[ \t]'), 'no indentation on top of the typed one: ' .. vim.inspect(text))
  eq((text:gsub('\t', '        ')), shown(st), 'ghost text drawn = the suggestion (first line inline, the rest below)')
  local accepted = lua('return require("anchorcoder.suggestion").stats.accepted')
  input('<M-C-Right>')
  local after = wait_for('the accepted line', [[
    return require('anchorcoder.suggestion').stats.accepted > ... and vim.api.nvim_buf_get_lines(0, 0, -1, false) or nil
  ]], 10000, accepted)
  eq(with_insert(st.lines, st.row, st.col, first), after, 'buffer after accepting the first line')
  local st2 = state()
  local rest = text:sub(#first + 1)
  if rest:match('%S') then
    eq(rest, st2.suggestion, 'the lines below stay as ghost text')
  end
  input('<Esc>')
  lua('vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)', saved)
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
  for _, line in ipairs({
    'OK Neovim 0.',
    'OK setup() was called',
    'OK options are valid',
    "OK ui: the plugin's own ghost text",
    'OK server binary: ' .. bin .. ' (found through the `cmd` option)',
    'OK `anchorcoder --version` runs: anchorcoder ',
    'OK default model: ',
    'attached to the current buffer (main.py)',
  }) do
    assert(report:find(line, 1, true), ('health: %q\n'):format(line) .. report)
  end
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
    local path, cargo_home = vim.env.PATH, vim.env.CARGO_HOME
    vim.env.PATH, vim.env.CARGO_HOME = '/nonexistent', '/nonexistent'
    local cmd2, err2 = server.command(require('anchorcoder.config').merge({ install = { dir = '/nonexistent' } }))
    vim.env.PATH, vim.env.CARGO_HOME = path, cargo_home
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

-- Finding and installing the server -------------------------------------------

local tmp_root = vim.fn.tempname() .. '-install'
vim.fn.mkdir(tmp_root, 'p')

--- Run a command in this (the test's) Neovim; error unless it exits 0.
local function sh(cmd, opts)
  local out = vim.system(cmd, vim.tbl_extend('keep', opts or {}, { text = true })):wait(120000)
  if out.code ~= 0 then
    error(('%s failed (%d): %s'):format(table.concat(cmd, ' '), out.code, out.stderr or ''), 0)
  end
  return out.stdout
end

--- A release archive as scripts/package lays it out (`anchorcoder`, README.md and LICENSE at the
--- root), made from the real binary (debug info stripped, to keep it small), with its .sha256.
--- Returns the folder, the archive's file name, and the binary's sha256.
local release = nil
local function make_release()
  if release then
    return release
  end
  local dir = tmp_root .. '/release'
  local stage = tmp_root .. '/stage'
  vim.fn.mkdir(dir, 'p')
  vim.fn.mkdir(stage, 'p')
  assert(vim.uv.fs_copyfile(bin, stage .. '/anchorcoder'))
  pcall(sh, { 'strip', '--strip-debug', stage .. '/anchorcoder' })
  vim.uv.fs_chmod(stage .. '/anchorcoder', 493)
  vim.fn.writefile({ 'readme' }, stage .. '/README.md')
  vim.fn.writefile({ 'license' }, stage .. '/LICENSE')
  local name = 'anchorcoder-0.1.0-linux-x64.tar.gz'
  sh({ 'tar', '-C', stage, '-czf', dir .. '/' .. name, '.' })
  sh({ 'sh', '-c', 'sha256sum "$1" > "$1.sha256"', 'sh', name }, { cwd = dir })
  local bin_sha = sh({ 'sha256sum', stage .. '/anchorcoder' }):match('^%x+')
  release = { dir = dir, name = name, bin_sha = bin_sha, stage = stage }
  return release
end

--- In the child: start an install with `cfg_opts`, wait for its end, return the job and what
--- landed in the install dir.
local INSTALL = [[
  local cfg_opts, mode = ...
  local cfg = require('anchorcoder.config').merge(cfg_opts)
  _G.install_job = require('anchorcoder.install').install(cfg, { mode = mode })
  return _G.install_job.done
]]
local function install(cfg_opts, mode)
  lua(INSTALL, cfg_opts, mode)
  local job = wait_for('the install to end', [[
    local j = _G.install_job
    return j.done and { ok = j.ok, path = j.path, message = j.message, log = j.log, mode = j.mode }
  ]], 120000)
  local dest = cfg_opts.install.dir .. '/bin/anchorcoder'
  return job, dest
end

test('lookup order: cmd, then the installed server, then PATH, then ~/.cargo/bin', function()
  local dirs = {}
  for _, d in ipairs({ 'data/anchorcoder/bin', 'path', 'cargo/bin' }) do
    dirs[d] = tmp_root .. '/lookup/' .. d
    vim.fn.mkdir(dirs[d], 'p')
  end
  local r = lua([[
    local bin, dirs = ...
    local server, config = require('anchorcoder.server'), require('anchorcoder.config')
    local path, cargo_home = vim.env.PATH, vim.env.CARGO_HOME
    vim.env.PATH = '/nonexistent'
    vim.env.CARGO_HOME = vim.fs.dirname(dirs['cargo/bin'])
    local cfg = config.merge({ install = { dir = vim.fs.dirname(dirs['data/anchorcoder/bin']) } })
    local out = {}
    local function look(label)
      local found, err = server.find(cfg)
      out[label] = found and { source = found.source, path = found.path, cmd = found.cmd } or { err = err }
    end
    look('nothing')
    vim.uv.fs_symlink(bin, dirs['cargo/bin'] .. '/anchorcoder')
    look('cargo')
    vim.uv.fs_symlink(bin, dirs['path'] .. '/anchorcoder')
    vim.env.PATH = dirs['path'] .. ':/nonexistent'
    look('path')
    vim.uv.fs_symlink(bin, dirs['data/anchorcoder/bin'] .. '/anchorcoder')
    look('installed')
    vim.env.PATH = '/nonexistent'
    look('installed, nothing on PATH')
    local v = vim.system({ out['installed, nothing on PATH'].path, '--version' }, { text = true }):wait(10000)
    out.version = v.stdout
    cfg.cmd = bin
    look('cmd')
    vim.env.PATH, vim.env.CARGO_HOME = path, cargo_home
    return out
  ]], bin, dirs)
  local err = r.nothing.err
  assert(err, 'nothing found when nothing is there: ' .. vim.inspect(r.nothing))
  for _, want in ipairs({ dirs['data/anchorcoder/bin'] .. '/anchorcoder', dirs['cargo/bin'] .. '/anchorcoder',
    ':AnchorCoder install', 'cargo install --path server' }) do
    assert(err:find(want, 1, true), ('the error names %q: %s'):format(want, err))
  end
  eq({ 'cargo', dirs['cargo/bin'] .. '/anchorcoder' }, { r.cargo.source, r.cargo.path }, 'only ~/.cargo/bin')
  eq({ 'path', dirs['path'] .. '/anchorcoder' }, { r.path.source, r.path.path }, 'PATH before cargo')
  eq({ 'installed', dirs['data/anchorcoder/bin'] .. '/anchorcoder' }, { r.installed.source, r.installed.path },
    'installed before PATH')
  eq({ 'installed', { dirs['data/anchorcoder/bin'] .. '/anchorcoder', 'serve' } },
    { r['installed, nothing on PATH'].source, r['installed, nothing on PATH'].cmd }, 'installed, nothing on PATH')
  assert(r.version:match('^anchorcoder %d'), 'the installed binary runs: ' .. tostring(r.version))
  eq({ 'cmd', { bin, 'serve' } }, { r.cmd.source, r.cmd.cmd }, 'the cmd option before everything')
end)

test(':checkhealth anchorcoder says when the binary is missing, and how to fix it', function()
  local report = lua([[
    local a = require('anchorcoder')
    local saved, path, cargo_home = a.cfg, vim.env.PATH, vim.env.CARGO_HOME
    a.cfg = require('anchorcoder.config').merge({ install = { dir = ... } })
    vim.env.PATH, vim.env.CARGO_HOME = '/nonexistent', '/nonexistent'
    local ok, err = pcall(vim.cmd, 'checkhealth anchorcoder')
    a.cfg, vim.env.PATH, vim.env.CARGO_HOME = saved, path, cargo_home
    local lines = vim.api.nvim_buf_get_lines(0, 0, -1, false)
    vim.cmd('tabclose')
    assert(ok, err)
    return table.concat(lines, '\n')
  ]], tmp_root .. '/empty')
  assert(report:find('ERROR server binary not found', 1, true), 'an error for the binary\n' .. report)
  assert(report:find('OK Neovim', 1, true), 'the checks before it still pass\n' .. report)
  for _, fix in ipairs({ 'Run :AnchorCoder install (builds it from this checkout with cargo)',
    'cargo install --path server', "setup { cmd = '/path/to/anchorcoder' }" }) do
    assert(report:find(fix, 1, true), ('says how to fix it: %q\n'):format(fix) .. report)
  end
  assert(not report:find('server answers', 1, true), 'no server check without a binary\n' .. report)
  log('  ' .. report:gsub('\n', '\n  '))
end)

test(':AnchorCoder install release: downloads the archive, checks its sha256, installs the binary', function()
  local rel = make_release()
  local dir = tmp_root .. '/installed'
  local url = 'file://' .. rel.dir .. '/anchorcoder-{version}-{platform}.tar.gz'
  -- Through the command: it waits (the embedded Neovim has no UI), then attaches nothing new.
  local job = lua([[
    local a = require('anchorcoder')
    local saved = a.cfg.install
    a.cfg.install = { url = select(1, ...), dir = select(2, ...) }
    vim.cmd('AnchorCoder install release')
    a.cfg.install = saved
    return require('anchorcoder.install').current
  ]], url, dir)
  eq(vim.NIL, job, 'no install left running after the command returns')
  eq({ { 'install' }, { 'source', 'release' } },
    lua([[return { vim.fn.getcompletion('AnchorCoder in', 'cmdline'), vim.fn.getcompletion('AnchorCoder install ', 'cmdline') }]]),
    'command completion')
  local dest = dir .. '/bin/anchorcoder'
  assert(vim.uv.fs_stat(dest), 'the binary is installed at ' .. dest)
  eq(rel.bin_sha, sh({ 'sha256sum', dest }):match('^%x+'), 'the installed binary is the one in the archive')
  eq(sh({ bin, '--version' }), sh({ dest, '--version' }), 'it runs')
  local origin = vim.json.decode(table.concat(vim.fn.readfile(dir .. '/install.json'), '\n'))
  eq({ 'release', 'file://' .. rel.dir .. '/' .. rel.name },
    { origin.from, origin.url }, 'install.json records where it came from')
  -- Then through the Lua API, asynchronously, with the progress it shows.
  local job2 = install({ install = { url = url, dir = dir .. '2' } }, 'release')
  assert(job2.ok, 'install succeeded: ' .. tostring(job2.message))
  eq(dir .. '2/bin/anchorcoder', job2.path, 'installed path')
  assert(job2.message:find('installed ' .. dir .. '2/bin/anchorcoder (anchorcoder ', 1, true), job2.message)
  eq({ 'downloading file://' .. rel.dir .. '/' .. rel.name, 'checking the sha256', 'unpacking' },
    job2.log, 'progress shown')
  local found = lua([[
    local path = vim.env.PATH
    vim.env.PATH = '/nonexistent'
    local f = require('anchorcoder.server').find(require('anchorcoder.config').merge({ install = { dir = ... } }))
    vim.env.PATH = path
    return f
  ]], dir .. '2')
  eq({ 'installed', dir .. '2/bin/anchorcoder' }, { found.source, found.path }, 'found after installing')
end)

test(':AnchorCoder install release refuses an archive whose sha256 does not match', function()
  local rel = make_release()
  local bad = tmp_root .. '/bad-release'
  vim.fn.mkdir(bad, 'p')
  assert(vim.uv.fs_copyfile(rel.dir .. '/' .. rel.name, bad .. '/' .. rel.name))
  local wrong = ('0'):rep(64)
  vim.fn.writefile({ wrong .. '  ' .. rel.name }, bad .. '/' .. rel.name .. '.sha256')
  local dir = tmp_root .. '/not-installed'
  local job = install({ install = { url = 'file://' .. bad .. '/anchorcoder-{version}-{platform}.tar.gz', dir = dir } },
    'release')
  eq(false, job.ok, 'the install fails')
  assert(job.message:find('sha256 mismatch', 1, true), job.message)
  assert(job.message:find(wrong, 1, true), 'names the expected sum: ' .. job.message)
  local actual = sh({ 'sha256sum', rel.dir .. '/' .. rel.name }):match('^%x+')
  assert(job.message:find(actual, 1, true), 'names the actual sum: ' .. job.message)
  eq(nil, vim.uv.fs_stat(dir .. '/bin/anchorcoder'), 'nothing installed')
  -- A missing archive and a missing URL fail clearly too.
  local job2 = install({ install = { url = 'file://' .. bad .. '/none-{version}-{platform}.tar.gz', dir = dir } },
    'release')
  eq(false, job2.ok, 'a missing archive fails')
  assert(job2.message:find('none-0.1.0-linux-x64.tar.gz.sha256', 1, true), job2.message)
  local job3 = install({ install = { dir = dir } }, 'release')
  eq(false, job3.ok, 'no URL configured fails')
  assert(job3.message:find('install.url', 1, true), job3.message)
end)

test(':AnchorCoder install from a source checkout runs cargo build --release and installs its binary', function()
  -- A stand-in `cargo` first on PATH (the real build would take minutes of CPU): it records how it
  -- was called and answers as cargo does with --message-format=json-render-diagnostics.
  local rel = make_release()
  local fake = tmp_root .. '/fakecargo'
  vim.fn.mkdir(fake, 'p')
  vim.fn.writefile({
    '#!/bin/sh',
    'printf "%s\\n" "$PWD" "$@" > "' .. fake .. '/args"',
    'if [ -n "$FAKE_CARGO_FAIL" ]; then echo "error: could not compile \\`anchorcoder\\`" >&2; exit 101; fi',
    'echo "   Compiling anchorcoder v0.1.0 ($PWD/server)" >&2',
    'echo \'{"reason":"compiler-artifact","target":{"name":"anchorcoder","kind":["lib"]},"executable":null}\'',
    'echo \'{"reason":"compiler-artifact","target":{"name":"anchorcoder","kind":["bin"]},"executable":"'
      .. rel.stage .. '/anchorcoder"}\'',
    'echo \'{"reason":"build-finished","success":true}\'',
    'echo "    Finished \\`release\\` profile [optimized] target(s) in 0.01s" >&2',
  }, fake .. '/cargo')
  vim.uv.fs_chmod(fake .. '/cargo', 493)
  lua('vim.env.PATH = ... .. ":" .. vim.env.PATH', fake)
  local dir = tmp_root .. '/built'
  local ok, job = pcall(install, { install = { dir = dir } }, 'auto')
  lua('vim.env.FAKE_CARGO_FAIL = "1"')
  local ok2, job2 = pcall(install, { install = { dir = dir .. '-failed' } }, 'source')
  lua('vim.env.FAKE_CARGO_FAIL = nil; vim.env.PATH = vim.env.PATH:sub(#... + 2)', fake)
  assert(ok, job)
  assert(ok2, job2)
  assert(job.ok, 'install succeeded: ' .. tostring(job.message))
  eq('source', job.mode, 'auto in a checkout builds from source')
  eq({ vim.uv.fs_realpath(repo_root), 'build', '--release', '-p', 'anchorcoder', '--message-format=json-render-diagnostics' },
    vim.list_extend({ vim.uv.fs_realpath(vim.fn.readfile(fake .. '/args')[1]) }, vim.list_slice(vim.fn.readfile(fake .. '/args'), 2)),
    'cargo run in the checkout with')
  eq(rel.bin_sha, sh({ 'sha256sum', dir .. '/bin/anchorcoder' }):match('^%x+'), 'the built binary is installed')
  -- cargo's stderr (the "Compiling" line) and stdout (artifact messages) arrive on two pipes, so
  -- the crate count beside the line depends on which the event loop reads first.
  local saw_compiling = false
  for _, line in ipairs(job.log) do
    saw_compiling = saw_compiling or line:match('^building: Compiling anchorcoder %(%d crates done%)$') ~= nil
  end
  assert(saw_compiling, 'progress: ' .. vim.inspect(job.log))
  local origin = vim.json.decode(table.concat(vim.fn.readfile(dir .. '/install.json'), '\n'))
  eq('source', origin.from, 'install.json: built from source')
  eq(false, job2.ok, 'a failing build fails the install')
  assert(job2.message:find('cargo build failed (exit 101)', 1, true) and job2.message:find('could not compile', 1, true),
    job2.message)
  eq(nil, vim.uv.fs_stat(dir .. '-failed/bin/anchorcoder'), 'nothing installed after a failed build')
  -- Outside a checkout there is nothing to build.
  local copy = tmp_root .. '/elsewhere/nvim'
  vim.fn.mkdir(copy, 'p')
  eq(vim.NIL, lua('return require("anchorcoder.install").checkout(...)', copy), 'no checkout around a copy')
  eq(vim.uv.fs_realpath(repo_root), vim.uv.fs_realpath(lua('return require("anchorcoder.install").checkout()')),
    'the plugin in this repository sits in a checkout')
  local toml = table.concat(vim.fn.readfile(repo_root .. '/Cargo.toml'), '\n')
  eq(toml:match('%[workspace%.package%][^%[]-version%s*=%s*"([^"]+)"'), lua('return require("anchorcoder.install").version'),
    'the plugin asks for the release of the workspace version')
end)

test('ui = "native" falls back to the plugin\'s ghost text where vim.lsp.inline_completion is missing', function()
  local r = lua([[
    local config = require('anchorcoder.config')
    local a = require('anchorcoder')
    local saved = a.cfg
    a.cfg = config.merge({ ui = 'native' })
    local native = a._native()
    local compat = config.merge({ native = true }).ui
    a.cfg = saved
    return { has = vim.lsp.inline_completion ~= nil, native = native, compat = compat,
      problems = config.validate(config.merge({ ui = 'nope' })) }
  ]])
  eq('native', r.compat, 'native = true means ui = "native"')
  eq(1, #r.problems, 'an unknown ui is reported')
  if r.has then
    log('  this Neovim has vim.lsp.inline_completion: native = ' .. tostring(r.native))
  else
    eq(false, r.native, 'no native inline completion on this Neovim: ghost text instead')
    -- And setup { ui = 'native' } still gets the plugin's ghost text (and its keys).
    input('<Esc>')
    lua([[require('anchorcoder').setup { cmd = ..., debounce_ms = 30, ui = 'native' }]], bin)
    lua([[vim.api.nvim_buf_set_lines(0, 5, -1, false, { '    return a' })]])
    input('6GA')
    input(' ')
    local st = wait_ghost(5, #'    return a ')
    eq(1, #st.marks, 'ghost text with ui = "native" on ' .. tostring(vim.version()))
    local accepted = st.stats.accepted
    input('<Tab>')
    local after = wait_for('the accepted text', [[
      local s = require('anchorcoder.suggestion')
      return s.stats.accepted > ... and vim.api.nvim_buf_get_lines(0, 0, -1, false) or nil
    ]], 10000, accepted)
    eq(with_insert(st.lines, st.row, st.col, st.suggestion), after, '<Tab> accepts with the fallback')
    input('<Esc>')
    lua([[require('anchorcoder').setup { cmd = ..., debounce_ms = 30 }]], bin)
  end
end)

vim.fn.delete(tmp_root, 'rf')
pcall(vim.fn.jobstop, child)
log(('%d passed, %d failed'):format(passed, failed))
os.exit(failed == 0 and passed > 0 and 0 or 1)
