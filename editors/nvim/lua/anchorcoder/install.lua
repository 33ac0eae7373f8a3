--- `:AnchorCoder install`: build the server from the source checkout the plugin sits in
--- (`cargo build --release -p anchorcoder`), or download a release archive (as scripts/package
--- makes them), check its sha256 and unpack it; either way the binary ends up in
--- `<install.dir>/bin/anchorcoder`, which the plugin looks at right after the `cmd` option.
local config = require('anchorcoder.config')
local server = require('anchorcoder.server')

local M = {}

--- The server release this plugin belongs to (the workspace version in Cargo.toml).
M.version = '0.1.0'

local uv = vim.uv or vim.loop

--- The install in progress, if any.
M.current = nil

--- The release platform of this machine (scripts/package's names), or nil and why not.
function M.platform()
  local u = uv.os_uname()
  local machine = (u.machine or ''):lower()
  local arch = ({ x86_64 = 'x64', amd64 = 'x64', aarch64 = 'arm64', arm64 = 'arm64' })[machine]
  if u.sysname ~= 'Linux' or not arch then
    return nil, ('no release archive is made for %s %s (only linux-x64 and linux-arm64): build from source'
      .. ' (`cargo install --path server` in the AnchorCoder repository) and set `cmd`'):format(
      u.sysname or '?', u.machine or '?')
  end
  return 'linux-' .. arch
end

--- The plugin's own folder (editors/nvim in the repository).
function M.plugin_root()
  local src = debug.getinfo(1, 'S').source:gsub('^@', '')
  return vim.fs.dirname(vim.fs.dirname(vim.fs.dirname(vim.fs.normalize(vim.fn.fnamemodify(src, ':p')))))
end

local function read(path)
  local f = io.open(path, 'rb')
  if not f then
    return nil
  end
  local s = f:read('*a')
  f:close()
  return s
end

--- The AnchorCoder source checkout the plugin sits in (two levels above editors/nvim, with a
--- Cargo.toml whose workspace has the `server` member), or nil.
function M.checkout(plugin_root)
  local repo = vim.fs.dirname(vim.fs.dirname(plugin_root or M.plugin_root()))
  local toml = read(repo .. '/Cargo.toml')
  if not toml or not toml:find('%[workspace%]') then
    return nil
  end
  local members = toml:match('members%s*=%s*(%b[])')
  if not members or not members:find('"server"', 1, true) then
    return nil
  end
  local crate = read(repo .. '/server/Cargo.toml')
  if not crate or not crate:find('name%s*=%s*"anchorcoder"') then
    return nil
  end
  return repo
end

--- The archive URL for a version and platform, or nil and why not.
function M.url(cfg, version, platform)
  local template = cfg.install and cfg.install.url
  if type(template) ~= 'string' or template == '' then
    return nil, 'no release URL is configured: set `install.url` in setup(), e.g. '
      .. "install = { url = 'https://…/v{version}/anchorcoder-{version}-{platform}.tar.gz' }"
      .. ' (a file:// URL works too), or install from a source checkout'
  end
  local url = template:gsub('{version}', version):gsub('{platform}', platform)
  return url
end

-- Helpers -----------------------------------------------------------------------

--- Run a command; `cb(out)` runs on the main loop. A command that cannot start gives code -1.
local function run(cmd, opts, cb)
  local ok, proc = pcall(vim.system, cmd, opts, vim.schedule_wrap(cb))
  if not ok then
    vim.schedule(function()
      cb({ code = -1, signal = 0, stdout = '', stderr = tostring(proc) })
    end)
    return nil
  end
  return proc
end

local function rmrf(path)
  if path and uv.fs_stat(path) then
    vim.fn.delete(path, 'rf')
  end
end

--- The start of a command's output, for an error message.
local function first_line(s)
  return vim.trim(s or ''):sub(1, 300)
end

--- sha256 of a file with sha256sum or shasum; cb(hex) or cb(nil, err).
local function sha256(path, cb)
  local tool
  if vim.fn.executable('sha256sum') == 1 then
    tool = { 'sha256sum', path }
  elseif vim.fn.executable('shasum') == 1 then
    tool = { 'shasum', '-a', '256', path }
  else
    return cb(nil, 'neither sha256sum nor shasum is installed to check the download')
  end
  run(tool, { text = true }, function(out)
    local hex = out.code == 0 and (out.stdout or ''):match('^(%x+)')
    if not hex or #hex ~= 64 then
      return cb(nil, ('%s failed: %s'):format(tool[1], first_line(out.stderr)))
    end
    cb(hex:lower())
  end)
end

--- Download `url` to `dest` with curl (any URL), wget (http/https), or a copy (file://).
local function download(url, dest, cb)
  local cmd
  if vim.fn.executable('curl') == 1 then
    cmd = { 'curl', '-fsSL', '--retry', '2', '-o', dest, url }
  elseif url:match('^https?://') and vim.fn.executable('wget') == 1 then
    cmd = { 'wget', '-q', '-O', dest, url }
  elseif url:match('^file://') then
    local ok, err = uv.fs_copyfile(vim.uri_to_fname(url), dest)
    return vim.schedule(function()
      cb(ok and true or nil, err and ('cannot read %s: %s'):format(url, err))
    end)
  else
    return cb(nil, 'neither curl nor wget is installed to download ' .. url)
  end
  run(cmd, { text = true }, function(out)
    if out.code ~= 0 then
      return cb(nil, ('download of %s failed (%s exit %d): %s'):format(url, cmd[1], out.code, first_line(out.stderr)))
    end
    cb(true)
  end)
end

--- Check that `bin --version` runs, then copy it to the install dir (atomically: a running server
--- keeps its old file) and record where it came from. cb(path, version) or cb(nil, err).
local function place(cfg, bin, origin, cb)
  run({ bin, '--version' }, { text = true }, function(out)
    if out.code ~= 0 then
      return cb(nil, ('the new binary does not run (`%s --version` exit %d): %s'):format(bin, out.code,
        first_line((out.stderr or '') .. (out.stdout or ''))))
    end
    local version = vim.trim(out.stdout or '')
    local dest = server.installed_path(cfg)
    local dir = vim.fs.dirname(dest)
    vim.fn.mkdir(dir, 'p')
    local tmp = dest .. '.new'
    local ok, err = uv.fs_copyfile(bin, tmp)
    if ok then
      ok, err = uv.fs_chmod(tmp, 493) -- 0755
    end
    if ok then
      ok, err = uv.fs_rename(tmp, dest)
    end
    if not ok then
      pcall(uv.fs_unlink, tmp)
      return cb(nil, ('cannot install into %s: %s'):format(dest, tostring(err)))
    end
    origin.version = version
    origin.installed = os.date('!%Y-%m-%dT%H:%M:%SZ')
    local f = io.open(vim.fs.dirname(dir) .. '/install.json', 'w')
    if f then
      f:write(vim.json.encode(origin))
      f:close()
    end
    cb(dest, version)
  end)
end

--- What `:AnchorCoder install` recorded about the installed binary ({ from, url|repo, version, … }), or nil.
function M.origin(cfg)
  local s = read(config.install_dir(cfg) .. '/install.json')
  local ok, t = pcall(vim.json.decode, s or '')
  return ok and type(t) == 'table' and t or nil
end

-- The two ways -----------------------------------------------------------------

local function from_release(cfg, job, done)
  local platform, perr = M.platform()
  if not platform then
    return done(nil, perr)
  end
  local version = cfg.install.version or M.version
  local url, uerr = M.url(cfg, version, platform)
  if not url then
    return done(nil, uerr)
  end
  local tmp = vim.fn.tempname() .. '-anchorcoder-install'
  vim.fn.mkdir(tmp .. '/unpacked', 'p')
  local archive = tmp .. '/' .. (url:match('([^/]+)$') or 'anchorcoder.tar.gz')
  local function finish(path, msg)
    rmrf(tmp)
    done(path, msg)
  end
  job.progress(('downloading %s'):format(url))
  download(url .. '.sha256', archive .. '.sha256', function(ok, err)
    if not ok then
      return finish(nil, err)
    end
    local expected = (read(archive .. '.sha256') or ''):match('^%s*(%x+)')
    if not expected or #expected ~= 64 then
      return finish(nil, ('%s.sha256 holds no sha256 (expected "<64 hex digits>  <file name>")'):format(url))
    end
    expected = expected:lower()
    download(url, archive, function(ok2, err2)
      if not ok2 then
        return finish(nil, err2)
      end
      job.progress('checking the sha256')
      sha256(archive, function(actual, serr)
        if not actual then
          return finish(nil, serr)
        end
        if actual ~= expected then
          return finish(nil, ('sha256 mismatch for %s: expected %s (from %s.sha256), got %s; nothing was installed')
            :format(url, expected, url, actual))
        end
        job.progress('unpacking')
        run({ 'tar', '-xzf', archive, '-C', tmp .. '/unpacked' }, { text = true }, function(out)
          if out.code ~= 0 then
            return finish(nil, ('cannot unpack %s: %s'):format(url, first_line(out.stderr)))
          end
          local bin = tmp .. '/unpacked/anchorcoder'
          if not uv.fs_stat(bin) then
            return finish(nil, ('%s holds no `anchorcoder` at its root'):format(url))
          end
          place(cfg, bin, { from = 'release', url = url, sha256 = actual, platform = platform }, finish)
        end)
      end)
    end)
  end)
end

local function from_source(cfg, job, repo, done)
  local cargo = vim.fn.exepath('cargo')
  if cargo == '' then
    local alt = vim.fs.dirname(server.cargo_path()) .. '/cargo'
    cargo = vim.fn.executable(alt) == 1 and alt or ''
  end
  if cargo == '' then
    return done(nil, 'cargo was not found (on $PATH or in $CARGO_HOME/bin): install Rust from https://rustup.rs,'
      .. ' or download a release with `:AnchorCoder install release` (needs `install.url`)')
  end
  job.progress(('building in %s: cargo build --release -p anchorcoder (a few minutes the first time)'):format(repo))
  local exe, crates, tail, pending_out, pending_err = nil, 0, {}, '', ''
  local function lines(pending, data, each)
    pending = pending .. (data or '')
    while true do
      local nl = pending:find('\n', 1, true)
      if not nl then
        break
      end
      each(pending:sub(1, nl - 1))
      pending = pending:sub(nl + 1)
    end
    return pending
  end
  local function on_stdout(_, data)
    pending_out = lines(pending_out, data, function(line)
      if line:sub(1, 1) ~= '{' then
        return
      end
      local ok, msg = pcall(vim.json.decode, line)
      if ok and type(msg) == 'table' and msg.reason == 'compiler-artifact' then
        crates = crates + 1
        local t = msg.target or {}
        if t.name == 'anchorcoder' and type(msg.executable) == 'string' then
          exe = msg.executable
        end
      end
    end)
  end
  local function on_stderr(_, data)
    pending_err = lines(pending_err, data, function(line)
      table.insert(tail, line)
      if #tail > 40 then
        table.remove(tail, 1)
      end
      local what = line:match('^%s*(Compiling [^%s]+)') or line:match('^%s*(Finished .*)')
      if what then
        vim.schedule(function()
          job.progress(('building: %s (%d crates done)'):format(what, crates))
        end)
      end
    end)
  end
  job.proc = run({ cargo, 'build', '--release', '-p', 'anchorcoder', '--message-format=json-render-diagnostics' },
    { cwd = repo, stdout = on_stdout, stderr = on_stderr }, function(out)
      job.proc = nil
      if out.code ~= 0 then
        local errs = vim.tbl_filter(function(l)
          return l:match('^error') ~= nil
        end, tail)
        return done(nil, ('cargo build failed (exit %d):\n%s'):format(out.code,
          table.concat(#errs > 0 and errs or { unpack(tail, math.max(1, #tail - 10)) }, '\n')))
      end
      if not exe then
        return done(nil, 'cargo build succeeded but named no `anchorcoder` executable')
      end
      job.progress('built ' .. exe)
      place(cfg, exe, { from = 'source', repo = repo, built = exe }, done)
    end)
end

--- Install the server. opts: mode = 'auto' (a source checkout builds, otherwise a release is
--- downloaded), 'source' or 'release'; wait = true blocks until done (used without a UI, e.g. in
--- a plugin manager's build step run headless). `on_done(path|nil, message)` runs at the end.
--- Returns the job: { done, ok, path, message, log } (log: the progress messages shown).
function M.install(cfg, opts, on_done)
  cfg = cfg or config.merge({})
  opts = opts or {}
  local mode = opts.mode or 'auto'
  local job = { done = false, log = {}, mode = mode }
  local function say(msg, level)
    vim.notify('AnchorCoder: ' .. msg, level or vim.log.levels.INFO, { title = 'AnchorCoder' })
  end
  local last_echo = 0
  function job.progress(msg)
    table.insert(job.log, msg)
    local now = uv.now()
    if now - last_echo >= 200 or #job.log == 1 then
      last_echo = now
      pcall(vim.api.nvim_echo, { { 'AnchorCoder: ' .. msg, 'MoreMsg' } }, false, {})
    end
  end
  local function done(path, msg)
    job.done, job.ok, job.path = true, path ~= nil, path
    if path then
      job.message = ('installed %s (%s)'):format(path, msg or '?')
      if #server.all_clients() > 0 then
        job.message = job.message .. '; servers already running keep their binary until they restart'
      end
      say(job.message)
    else
      job.message = 'install failed: ' .. tostring(msg)
      say(job.message, vim.log.levels.ERROR)
    end
    if M.current == job then
      M.current = nil
    end
    if on_done then
      on_done(path, job.message)
    end
  end
  if M.current and not M.current.done then
    job.done, job.ok, job.message = true, false, 'an install is already running'
    say(job.message, vim.log.levels.WARN)
    if on_done then
      on_done(nil, job.message)
    end
    return job
  end
  M.current = job
  local repo = M.checkout()
  if mode == 'source' and not repo then
    done(nil, ('the plugin (%s) is not inside an AnchorCoder source checkout: use `:AnchorCoder install release`')
      :format(M.plugin_root()))
  elseif mode == 'source' or (mode == 'auto' and repo) then
    job.mode = 'source'
    from_source(cfg, job, repo, done)
  elseif mode == 'release' or mode == 'auto' then
    job.mode = 'release'
    from_release(cfg, job, done)
  else
    done(nil, ('unknown install mode %s (source, release)'):format(vim.inspect(mode)))
  end
  if opts.wait then
    vim.wait(60 * 60 * 1000, function()
      return job.done
    end, 100)
  end
  return job
end

return M
