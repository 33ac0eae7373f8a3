//! A minimal LSP client over stdio for end-to-end tests: starts the real
//! `anchorcoder` binary, frames JSON-RPC messages, answers the server's own
//! requests, and waits for responses with timeouts.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
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
    stdin: ChildStdin,
    incoming: Receiver<Value>,
    next_id: i64,
    /// Notifications received so far (method, params).
    pub notifications: Vec<(String, Value)>,
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
        Server { child, stdin, incoming: rx, next_id: 1, notifications: Vec::new() }
    }

    /// Write raw bytes (for malformed-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
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
        let r = self.request(
            "initialize",
            json!({"processId": null, "rootUri": null, "capabilities": capabilities, "initializationOptions": options}),
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

    /// Shut down politely.
    pub fn shutdown(mut self) {
        let _ = self.request("shutdown", Value::Null, Duration::from_secs(10));
        self.notify("exit", Value::Null);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.alive() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}
