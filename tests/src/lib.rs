//! A minimal LSP client over stdio for end-to-end tests: starts the real
//! `anchorcoder` binary, frames JSON-RPC messages, answers the server's own
//! requests, and waits for responses with timeouts.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The `anchorcoder` binary: `$ANCHORCODER_BIN`, else the workspace's debug build.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("ANCHORCODER_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let bin = target.join("debug").join("anchorcoder");
    assert!(bin.exists(), "{} is missing: run `cargo build -p anchorcoder` first (scripts/test does)", bin.display());
    bin
}

/// The default model, which the tests need (scripts/test pulls it).
pub fn default_model() -> PathBuf {
    let out = Command::new(binary()).args(["model", "path"]).output().expect("run anchorcoder model path");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(p.exists(), "the default model is missing at {}: run `anchorcoder model pull`", p.display());
    p
}

/// A running server and the messages it sent.
pub struct Server {
    child: Child,
    /// `None` once the test closed it ([`Server::close_stdin`]).
    stdin: Option<ChildStdin>,
    incoming: Receiver<Value>,
    next_id: i64,
    /// Notifications received so far (method, params).
    pub notifications: Vec<(String, Value)>,
    /// Responses that arrived while another one was awaited, by id.
    unclaimed: std::collections::HashMap<i64, Value>,
}

fn frame(msg: &Value) -> Vec<u8> {
    let body = msg.to_string();
    format!("Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

impl Server {
    /// Start the server with extra environment variables.
    pub fn start(env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(binary());
        cmd.arg("serve").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start anchorcoder serve");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Content-Length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                let v: Value = serde_json::from_slice(&body).expect("server sent invalid JSON");
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Server {
            child,
            stdin: Some(stdin),
            incoming: rx,
            next_id: 1,
            notifications: Vec::new(),
            unclaimed: Default::default(),
        }
    }

    /// Write raw bytes (for malformed-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin was closed");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Close the server's stdin, as a client that goes away does.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Wait up to `timeout` for the process to end: its exit code, or `None`
    /// while it still runs (or when a signal ended it).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send a notification.
    pub fn notify(&mut self, method: &str, params: Value) {
        let msg = json!({"jsonrpc": "2.0", "method": method, "params": params});
        self.send_raw(&frame(&msg));
    }

    /// Send a request without waiting; returns its id.
    pub fn request_async(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_raw(&frame(&msg));
        id
    }

    /// Wait for the response to `id` (the whole message: `result` or `error`).
    pub fn response(&mut self, id: i64, timeout: Duration) -> Value {
        if let Some(msg) = self.unclaimed.remove(&id) {
            return msg;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.incoming.recv_timeout(left) {
                Ok(msg) => {
                    if msg.get("id") == Some(&json!(id)) && msg.get("method").is_none() {
                        return msg;
                    }
                    self.handle_other(msg);
                }
                Err(RecvTimeoutError::Timeout) => panic!("no response to request {id} within {timeout:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("the server exited while waiting for {id}"),
            }
        }
    }

    /// Send a request and wait for its response.
    pub fn request(&mut self, method: &str, params: Value, timeout: Duration) -> Value {
        let id = self.request_async(method, params);
        self.response(id, timeout)
    }

    fn handle_other(&mut self, msg: Value) {
        match (msg.get("method").and_then(Value::as_str), msg.get("id")) {
            // A request from the server (e.g. window/workDoneProgress/create): accept it.
            (Some(_), Some(id)) => {
                let reply = json!({"jsonrpc": "2.0", "id": id, "result": null});
                self.send_raw(&frame(&reply));
            }
            (Some(m), None) => self.notifications.push((m.to_string(), msg["params"].clone())),
            // A response to a request someone will wait for later.
            (None, Some(id)) => {
                if let Some(id) = id.as_i64() {
                    self.unclaimed.insert(id, msg);
                }
            }
            _ => {}
        }
    }

    /// Drain what arrived so far without waiting long.
    pub fn pump(&mut self, wait: Duration) {
        while let Ok(msg) = self.incoming.recv_timeout(wait) {
            self.handle_other(msg);
        }
    }

    /// `initialize` + `initialized` with the given options and capabilities.
    pub fn initialize(&mut self, options: Value, capabilities: Value) -> Value {
        self.initialize_at(None, options, capabilities)
    }

    /// [`Server::initialize`] with a workspace root (`rootUri`).
    pub fn initialize_at(&mut self, root_uri: Option<&str>, options: Value, capabilities: Value) -> Value {
        let r = self.request(
            "initialize",
            json!({"processId": null, "rootUri": root_uri, "capabilities": capabilities, "initializationOptions": options}),
            Duration::from_secs(30),
        );
        self.notify("initialized", json!({}));
        r
    }

    /// Open a document.
    pub fn open(&mut self, uri: &str, language: &str, text: &str) {
        self.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri, "languageId": language, "version": 1, "text": text}}),
        );
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// `anchorcoder/status`.
    pub fn status(&mut self) -> Value {
        let r = self.request("anchorcoder/status", Value::Null, Duration::from_secs(60));
        r["result"].clone()
    }

    /// Shut down politely (`shutdown` with `"params": null`, as many clients
    /// send it, then `exit`): the server must answer and end with status 0.
    pub fn shutdown(mut self) {
        let r = self.request("shutdown", Value::Null, Duration::from_secs(10));
        assert!(r.get("error").is_none() && r["result"].is_null(), "shutdown answered {r}");
        self.notify("exit", Value::Null);
        let code = self.wait_exit(Duration::from_secs(10));
        let _ = self.child.kill();
        assert_eq!(code, Some(0), "after shutdown and exit the server ends with status 0");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// The `llama-server` that `tests/bench/build-llamacpp.sh` builds:
/// `$LLAMA_SERVER`, else `$ANCHORCODER_TOOLS/llama.cpp/bin/llama-server`
/// (default tools folder `~/.cache/anchorcoder/tools`).
pub fn llama_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("LLAMA_SERVER") {
        return PathBuf::from(p);
    }
    let tools = std::env::var("ANCHORCODER_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/anchorcoder/tools"));
    let bin = tools.join("llama.cpp/bin/llama-server");
    assert!(bin.exists(), "{} is missing: run tests/bench/build-llamacpp.sh (scripts/test does)", bin.display());
    bin
}

/// A fresh folder `$TMPDIR/NAME-PID` holding `files` (relative path, text);
/// an older one of that name is removed first.
pub fn workspace(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (path, text) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    root
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real llama.cpp server on 127.0.0.1 serving the default model; killed on drop.
pub struct LlamaServer {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl LlamaServer {
    /// Start the tests' engine (the default model, 4 slots, 2 threads) with
    /// extra arguments (e.g. `--api-key`) and wait until it is ready.
    pub fn start(extra: &[&str]) -> LlamaServer {
        let mut args = vec!["-c", "8192", "-np", "4", "-t", "2", "--log-disable"];
        args.extend_from_slice(extra);
        LlamaServer::launch(&llama_server_binary(), &default_model(), &args)
    }

    /// Start `binary` serving `model` on a free loopback port with these
    /// arguments, and wait (up to 120 s) until `/health` answers 200.
    pub fn launch(binary: &Path, model: &Path, args: &[&str]) -> LlamaServer {
        let port = free_port();
        let child = Command::new(binary)
            .args(["-m", model.to_str().unwrap(), "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {}: {e} (tests/bench/build-llamacpp.sh builds it)", binary.display())
            });
        let mut s = LlamaServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok((200, _)) = http_get(port, "/health") {
                return s;
            }
            assert!(s.child.try_wait().unwrap().is_none(), "llama-server exited while starting");
            assert!(Instant::now() < deadline, "llama-server not ready on port {port} within 120 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kill it at once (SIGKILL), mid-request or not.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How many of its slots are generating now (`/slots`).
    pub fn busy_slots(&self, key: Option<&str>) -> usize {
        let (code, body) = http_get_auth(self.port, "/slots", key).expect("GET /slots");
        assert_eq!(code, 200, "/slots: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v.as_array().unwrap().iter().filter(|s| s["is_processing"] == json!(true)).count()
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP GET on 127.0.0.1 (10 s read timeout): status and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_auth(port, path, None)
}

fn http_get_auth(port: u16, path: &str, key: Option<&str>) -> std::io::Result<(u16, String)> {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    http_request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"),
        Some(Duration::from_secs(10)),
    )
}

/// A JSON POST on 127.0.0.1 with no read timeout (a cold generation can take
/// many seconds): status and body.
pub fn http_post(port: u16, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http_request(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        None,
    )
}

/// Send one whole HTTP/1.1 request (it asks for `Connection: close`) and read
/// the answer to the end: status and body.
fn http_request(port: u16, request: &str, timeout: Option<Duration>) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(timeout)?;
    s.write_all(request.as_bytes())?;
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes)?;
    let out = String::from_utf8_lossy(&bytes);
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((code, body))
}

/// What a [`Proxy`] does with a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Pass it to the upstream port.
    Forward,
    /// Accept it, read everything, never answer.
    Silent,
}

/// A TCP proxy on 127.0.0.1 in front of an engine that counts generation
/// requests (POST) in flight, sent and not yet fully answered, so tests can
/// see what the engine sees. Understands just enough HTTP/1.1: `Content-Length` and
/// chunked bodies.
pub struct Proxy {
    /// Its port.
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    upstream: std::sync::atomic::AtomicU16,
    silent: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
    raw_overlaps: std::sync::atomic::AtomicUsize,
    requests: std::sync::Mutex<Vec<String>>,
    bodies: std::sync::Mutex<Vec<String>>,
}

impl Proxy {
    /// Start one forwarding to `upstream`.
    pub fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(ProxyState::default());
        state.upstream.store(upstream, SeqCst);
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || proxy_connection(client, &st));
            }
        });
        Proxy { port, state }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Forward new connections to another port.
    pub fn set_upstream(&self, port: u16) {
        self.state.upstream.store(port, std::sync::atomic::Ordering::SeqCst);
    }

    /// What to do with new connections.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.state.silent.store(mode == ProxyMode::Silent, std::sync::atomic::Ordering::SeqCst);
    }

    /// Generation requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most generation requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests that arrived while another was still counted in flight
    /// (before the 1 s grace for closes in transit).
    pub fn raw_overlaps(&self) -> usize {
        self.state.raw_overlaps.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Request lines seen so far ("POST /v1/completions"), forwarded or not.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The bodies of the POST requests forwarded so far, as text.
    pub fn bodies(&self) -> Vec<String> {
        self.state.bodies.lock().unwrap().clone()
    }
}

fn proxy_connection(client: std::net::TcpStream, st: &std::sync::Arc<ProxyState>) {
    use std::sync::atomic::Ordering::SeqCst;
    if st.silent.load(SeqCst) {
        let mut r = BufReader::new(client);
        while let Some(line) = read_head(&mut r).map(|h| h.0) {
            st.requests.lock().unwrap().push(line);
        }
        return;
    }
    let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", st.upstream.load(SeqCst))) else { return };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Requests this connection sent that are not yet answered (at most one
    // without pipelining); released when answered or when the connection ends.
    let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let release = |pending: &std::sync::atomic::AtomicUsize, st: &ProxyState| {
        if pending.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            st.in_flight.fetch_sub(1, SeqCst);
        }
    };
    let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let (st2, pending2) = (st.clone(), pending.clone());
    let up = std::thread::spawn(move || {
        let mut r = BufReader::new(c2);
        let mut w = u2;
        while let Some((line, head, len)) = read_head(&mut r) {
            // Without pipelining a response ends each request before the
            // next, so a GET's answer finds nothing pending to release.
            if line.starts_with("POST ") {
                // A client drops an aborted request's connection; its close
                // reaches us on another thread, late on a loaded machine. Give a
                // close in transit 1 s before counting an overlap
                // (`raw_overlaps` counts those waits).
                let t0 = Instant::now();
                if st2.in_flight.load(SeqCst) > 0 {
                    st2.raw_overlaps.fetch_add(1, SeqCst);
                }
                while st2.in_flight.load(SeqCst) > 0 && t0.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                pending2.fetch_add(1, SeqCst);
                let now = st2.in_flight.fetch_add(1, SeqCst) + 1;
                st2.max_in_flight.fetch_max(now, SeqCst);
            }
            let post = line.starts_with("POST ");
            st2.requests.lock().unwrap().push(line);
            let mut body = vec![0; len];
            if w.write_all(&head).is_err() || r.read_exact(&mut body).is_err() || w.write_all(&body).is_err() {
                break;
            }
            if post {
                st2.bodies.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
            }
        }
        // The client hung up: whatever it had asked is no longer in flight.
        while pending2.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            st2.in_flight.fetch_sub(1, SeqCst);
        }
        let _ = w.shutdown(std::net::Shutdown::Both);
    });
    let mut r = BufReader::new(upstream);
    let mut w = client;
    while forward_response(&mut r, &mut w).is_ok() {
        release(&pending, st);
    }
    let _ = w.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    while pending.load(SeqCst) > 0 {
        release(&pending, st);
    }
}

/// One request head: its request line, raw bytes and body length.
fn read_head(r: &mut impl BufRead) -> Option<(String, Vec<u8>, usize)> {
    let mut raw = Vec::new();
    let mut first = String::new();
    let mut len = 0;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        raw.extend_from_slice(line.as_bytes());
        let t = line.trim_end();
        if first.is_empty() {
            first = t.rsplit_once(' ').map_or(t, |(a, _)| a).to_string();
        } else if t.is_empty() {
            return Some((first, raw, len));
        } else if let Some((k, v)) = t.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
}

/// Pass one whole response on, piece by piece as it comes.
fn forward_response(r: &mut impl BufRead, w: &mut impl Write) -> std::io::Result<()> {
    let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
    let mut line = String::new();
    let (mut len, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(eof());
        }
        w.write_all(line.as_bytes())?;
        let t = line.trim_end();
        if t.is_empty() {
            break;
        }
        if let Some((k, v)) = t.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let copy = |n: usize, r: &mut dyn BufRead, w: &mut dyn Write| -> std::io::Result<()> {
        let mut buf = vec![0; n];
        r.read_exact(&mut buf)?;
        w.write_all(&buf)?;
        w.flush()
    };
    if chunked {
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(eof());
            }
            w.write_all(line.as_bytes())?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).map_err(|_| eof())?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 {
                        return Err(eof());
                    }
                    w.write_all(line.as_bytes())?;
                    if line.trim().is_empty() {
                        return w.flush();
                    }
                }
            }
            copy(size + 2, r, w)?;
        }
    }
    match len {
        Some(n) => copy(n, r, w),
        None => {
            std::io::copy(r, w)?;
            Err(eof())
        }
    }
}
