//! Remote engines: generation on an inference server (llama.cpp's server,
//! vLLM, Ollama, TGI) instead of the in-process model, for teams that share a
//! GPU server or use models too big for a laptop.
//!
//! Only generation leaves the machine. Documents, the prompt window, token
//! healing, the suggestion rules, typing-through and cancellation stay in the
//! worker; this module knows HTTP and the engines' JSON, never LSP or
//! documents. A request streams, so the worker's stop rule can end it early:
//! returning drops the response, which closes the connection, and the engine
//! stops generating.
//!
//! Health: every request and probe updates [`Reachability`]; failures are
//! announced once per distinct message (typing must not flood the editor),
//! recovery once. The API key is read from the environment variable named by
//! `backend.apiKeyEnv` and only ever put in the `Authorization` header; it is
//! registered with [`crate::redact`] when read, and every message, status
//! and log line made here is redacted.
//!
//! `backend.timeoutMs` bounds a whole request: connecting, the headers and
//! every byte of the answer (a deadline checked between reads, not only a
//! timer around the future). What is read is bounded too (see [`http`]).

pub mod http;
pub mod llamacpp;
pub mod openai;
pub mod route;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde_json::{json, Value};

pub use http::RemoteError;

use crate::config::{BackendConfig, BackendKind};
use crate::redact::redact;
use http::{body_message, read_capped, root_cause, EventStream, MAX_BODY, MAX_ERROR_BODY, MAX_TEXT};

/// Time between health probes while the engine is down.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// An answer slower than this (or than half the timeout, if less) marks the
/// engine slow: inline suggestions that late are rarely still wanted.
const SLOW: Duration = Duration::from_millis(1000);

/// What to generate, laid out for the engine's prefix cache: the slowly
/// changing text first, what the user types last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteRequest {
    /// The prompt window up to the start of the cursor's line (stays put
    /// while the user types on one line).
    pub context: String,
    /// The cursor's line up to the cursor, minus `forced`.
    pub line: String,
    /// Token healing: bytes cut from the end of `line` that the output must
    /// start with (the worker checks it and strips them). An engine that can
    /// constrain sampling spells them with the best tokens it has.
    pub forced: String,
    /// Text after the cursor, for fill-in-the-middle; `None` for none.
    pub suffix: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop sequences (the engine stops early; the worker's rules decide).
    pub stop: Vec<String>,
    /// Project context (other files), least relevant first, as `(path, text)`
    /// per file: for an engine that lays it out itself (llama.cpp's
    /// `input_extra`).
    pub extra: Vec<(String, String)>,
    /// The same context as text (each file under a comment line with its
    /// path, the document's own path last), put before `context` by engines
    /// that take one prompt. Empty without context.
    pub extra_text: String,
}

impl RemoteRequest {
    /// The text before the cursor, as one prompt (project context first).
    pub fn prompt(&self) -> String {
        format!("{}{}{}", self.extra_text, self.context, self.line)
    }
}

/// How the engine is doing, as the status shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Not asked yet.
    #[default]
    Unknown,
    /// Answering in time.
    Reachable,
    /// Answering, but late.
    Slow,
    /// Not answering (refused, timed out, reset, 5xx).
    Down,
}

/// Something for the user or the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A problem to show.
    Error(String),
    /// Worth logging.
    Log(String),
}

#[derive(Default)]
struct Health {
    state: Reachability,
    latency_ms: Option<f64>,
    last_error: Option<String>,
    /// The error last shown to the user, cleared by a success.
    announced: Option<String>,
    last_probe: Option<Instant>,
    last_endpoint: Option<&'static str>,
    /// Why `/infill` is not used (it answered 501).
    no_infill: Option<String>,
    /// The first model of `/v1/models`, when `backend.model` is unset.
    discovered_model: Option<String>,
}

/// A configured remote engine: cheap to share, safe to use from many tasks.
pub struct Remote {
    config: BackendConfig,
    /// The HTTP client and the API key, or why there are none.
    ready: Result<(reqwest::Client, Option<String>), String>,
    health: Mutex<Health>,
    notify: Arc<dyn Fn(Notice) + Send + Sync>,
}

impl Remote {
    /// A remote engine for `config` (a remote kind); reads the API key from
    /// the environment now. Problems surface on use, with their fix.
    pub fn new(config: &BackendConfig, notify: Arc<dyn Fn(Notice) + Send + Sync>) -> Remote {
        let ready = api_key(config).and_then(|key| {
            let client = reqwest::Client::builder()
                .use_rustls_tls()
                .tcp_nodelay(true)
                .pool_idle_timeout(Duration::from_secs(60))
                .build()
                .map_err(|e| format!("cannot set up the HTTP client: {}", root_cause(&e)))?;
            Ok((client, key))
        });
        let notify: Arc<dyn Fn(Notice) + Send + Sync> = Arc::new(move |n| {
            notify(match n {
                Notice::Error(m) => Notice::Error(redact(&m)),
                Notice::Log(m) => Notice::Log(redact(&m)),
            })
        });
        Remote { config: config.clone(), ready, health: Mutex::default(), notify }
    }

    /// Whether the engine can be made to start its output with given bytes
    /// (llama.cpp: a grammar); OpenAI-compatible servers offer no portable way.
    pub fn forces_prefix(&self) -> bool {
        self.config.kind == BackendKind::LlamaCpp
    }

    /// The settings it was made from.
    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    fn base(&self) -> &str {
        self.config.url.as_deref().unwrap_or("")
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current reachability.
    pub fn state(&self) -> Reachability {
        self.health().state
    }

    /// Whether a probe is due while the engine is down; claims it.
    pub fn claim_probe(&self) -> bool {
        let mut h = self.health();
        let due = h.state == Reachability::Down && h.last_probe.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
        if due {
            h.last_probe = Some(Instant::now());
        }
        due
    }

    /// Generate for `req`; `stop` sees the text so far after each piece and
    /// ends the request early by returning `true`. Honours `timeoutMs`.
    /// Dropping the future aborts the HTTP request.
    pub async fn generate(
        &self,
        req: &RemoteRequest,
        stop: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<String, RemoteError> {
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout();
        let r = match tokio::time::timeout_at(deadline, self.generate_inner(req, stop, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out()),
        };
        self.record(&r, t0.elapsed());
        r
    }

    async fn generate_inner(
        &self,
        req: &RemoteRequest,
        stop: &mut (dyn FnMut(&str) -> bool + Send),
        deadline: tokio::time::Instant,
    ) -> Result<String, RemoteError> {
        match self.config.kind {
            BackendKind::OpenAi => {
                let model = self.model_name(deadline).await?;
                self.post(openai::PATH, &openai::body(&model, req), openai::parse, stop, deadline).await
            }
            BackendKind::LlamaCpp => {
                if req.suffix.is_some() && self.health().no_infill.is_none() {
                    let body = llamacpp::infill_body(req);
                    match self.post(llamacpp::INFILL, &body, llamacpp::parse, stop, deadline).await {
                        Err(e) if e.status == Some(501) => {
                            let why = format!(
                                "the model on {} has no fill-in-the-middle tokens (/infill answered 501): \
                                 using /completion with the text before the cursor",
                                self.base()
                            );
                            (self.notify)(Notice::Log(why.clone()));
                            self.health().no_infill = Some(why);
                        }
                        r => return r,
                    }
                }
                let body = llamacpp::completion_body(req);
                self.post(llamacpp::COMPLETION, &body, llamacpp::parse, stop, deadline).await
            }
            BackendKind::Local => Err(RemoteError::refused("`backend.kind` is \"local\": no remote engine".into())),
        }
    }

    /// `backend.model`, else the engine's first served model.
    async fn model_name(&self, deadline: tokio::time::Instant) -> Result<String, RemoteError> {
        if let Some(m) = self.config.model.clone().or_else(|| self.health().discovered_model.clone()) {
            return Ok(m);
        }
        self.list_models(deadline).await?;
        self.health().discovered_model.clone().ok_or_else(|| {
            RemoteError::refused(format!(
                "the remote engine at {} lists no model at {}; set `backend.model`",
                self.base(),
                openai::MODELS_PATH
            ))
        })
    }

    /// Ask the engine whether it is up (`/v1/models`: both kinds serve it, and
    /// it checks the API key too).
    pub async fn probe(&self) {
        self.health().last_probe = Some(Instant::now());
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout();
        let r = match tokio::time::timeout_at(deadline, self.list_models(deadline)).await {
            Ok(r) => r.map(|_| String::new()),
            Err(_) => Err(self.timed_out()),
        };
        self.record(&r, t0.elapsed());
    }

    async fn list_models(&self, deadline: tokio::time::Instant) -> Result<(), RemoteError> {
        let path = openai::MODELS_PATH;
        let mut resp = self.send(self.request(Method::GET, path, deadline)?, path, deadline).await?;
        let code = resp.status().as_u16();
        if !(200..300).contains(&code) {
            return Err(self.error_answer(path, code, &mut resp, deadline).await);
        }
        let (body, more) = self.read_body(&mut resp, MAX_BODY, path, deadline).await?;
        if more {
            return Err(self.too_big(path));
        }
        if let Some(m) = serde_json::from_slice::<Value>(&body).ok().and_then(|v| openai::first_model(&v)) {
            self.health().discovered_model = Some(m);
        }
        Ok(())
    }

    /// A request with the API key and the time left before `deadline` as
    /// reqwest's own timeout (connect, headers and body together).
    fn request(
        &self,
        method: Method,
        path: &str,
        deadline: tokio::time::Instant,
    ) -> Result<reqwest::RequestBuilder, RemoteError> {
        let (client, key) = self.ready.as_ref().map_err(|e| RemoteError::refused(e.clone()))?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let rb = client.request(method, format!("{}{path}", self.base())).timeout(left.max(Duration::from_millis(1)));
        Ok(match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        })
    }

    /// Send, until the headers arrive or `deadline` passes.
    ///
    /// A request that fails in sending, after a connection but before any
    /// answer, is sent once more: that is how a pooled keep-alive connection
    /// fails when the engine closed it just as it was reused ("connection
    /// closed before message completed"), and the engine never saw the
    /// request. The second try opens a new connection.
    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        path: &str,
        deadline: tokio::time::Instant,
    ) -> Result<reqwest::Response, RemoteError> {
        let attempt = |rb: reqwest::RequestBuilder| async move {
            tokio::time::timeout_at(deadline, rb.send()).await.map_err(|_| self.timed_out())
        };
        let again = rb.try_clone();
        let mut result = attempt(rb).await?;
        if let (Err(e), Some(rb)) = (&result, again) {
            if e.is_request() && !e.is_connect() && !e.is_timeout() {
                (self.notify)(Notice::Log(format!(
                    "the connection to {} closed before an answer to {path} ({}); sending it again",
                    self.base(),
                    root_cause(e)
                )));
                result = attempt(rb).await?;
            }
        }
        result.map_err(|e| self.transport(e, path))
    }

    /// At most `cap` bytes of the body, before `deadline`.
    async fn read_body(
        &self,
        resp: &mut reqwest::Response,
        cap: usize,
        path: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(Vec<u8>, bool), RemoteError> {
        match tokio::time::timeout_at(deadline, read_capped(resp, cap)).await {
            Ok(r) => r.map_err(|e| self.transport(e, path)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// The error for a non-2xx answer, from at most [`MAX_ERROR_BODY`] bytes
    /// of its body (an unreadable or late body leaves the message empty).
    async fn error_answer(
        &self,
        path: &str,
        code: u16,
        resp: &mut reqwest::Response,
        deadline: tokio::time::Instant,
    ) -> RemoteError {
        let body = match self.read_body(resp, MAX_ERROR_BODY, path, deadline).await {
            Ok((b, _)) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        };
        self.http_error(path, code, &body)
    }

    fn too_big(&self, path: &str) -> RemoteError {
        RemoteError::refused(format!(
            "the remote engine at {} sent an answer on {path} larger than {} MiB; is `backend.url` an inference server?",
            self.base(),
            MAX_BODY >> 20
        ))
    }

    /// POST `body`, then read the answer: a stream of events (fed to `stop`)
    /// or one JSON object.
    async fn post(
        &self,
        path: &'static str,
        body: &Value,
        parse: fn(&Value) -> Result<(String, bool), String>,
        stop: &mut (dyn FnMut(&str) -> bool + Send),
        deadline: tokio::time::Instant,
    ) -> Result<String, RemoteError> {
        self.health().last_endpoint = Some(path);
        let mut resp = self.send(self.request(Method::POST, path, deadline)?.json(body), path, deadline).await?;
        let code = resp.status().as_u16();
        if !(200..300).contains(&code) {
            return Err(self.error_answer(path, code, &mut resp, deadline).await);
        }
        let failed =
            |m: String| RemoteError::refused(format!("the remote engine at {} failed on {path}: {m}", self.base()));
        let streamed = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !streamed {
            let (body, more) = self.read_body(&mut resp, MAX_BODY, path, deadline).await?;
            if more {
                return Err(self.too_big(path));
            }
            let v: Value =
                serde_json::from_slice(&body).map_err(|e| failed(format!("the answer is not JSON ({e})")))?;
            return parse(&v).map(|(text, _)| text).map_err(failed);
        }
        let mut events = EventStream::default();
        let mut text = String::new();
        loop {
            // The deadline is checked between reads too: an engine that
            // streams without pause never lets a timer around this future
            // fire on its own.
            if tokio::time::Instant::now() >= deadline {
                return Err(self.timed_out());
            }
            let bytes = match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Ok(Ok(Some(b))) => b,
                Ok(Ok(None)) => return Ok(text),
                Ok(Err(e)) => return Err(self.transport(e, path)),
                Err(_) => return Err(self.timed_out()),
            };
            for data in events.push(&bytes).map_err(|e| failed(e.to_string()))? {
                if data == "[DONE]" {
                    return Ok(text);
                }
                let v: Value = serde_json::from_str(&data).map_err(|e| failed(format!("malformed event ({e})")))?;
                let (piece, last) = parse(&v).map_err(failed)?;
                text.push_str(&piece);
                if last || text.len() >= MAX_TEXT || stop(&text) {
                    return Ok(text);
                }
            }
            tokio::task::yield_now().await;
        }
    }

    fn timed_out(&self) -> RemoteError {
        RemoteError::down(format!(
            "the remote engine at {} did not answer within {} ms (`backend.timeoutMs`)",
            self.base(),
            self.config.timeout_ms
        ))
    }

    fn transport(&self, e: reqwest::Error, path: &str) -> RemoteError {
        if e.is_timeout() {
            // reqwest's own timeout is the time left to the same deadline.
            return self.timed_out();
        }
        let base = self.base();
        let cause = root_cause(&e);
        RemoteError::down(if e.is_connect() {
            format!("cannot connect to the remote engine at {base}: {cause}")
        } else {
            format!("the connection to the remote engine at {base} broke during {path}: {cause}")
        })
    }

    fn http_error(&self, path: &str, code: u16, body: &str) -> RemoteError {
        let (base, msg) = (self.base(), body_message(body));
        let mut e = match code {
            // (the constructors redact the engine's message)
            401 | 403 => RemoteError::refused(match &self.config.api_key_env {
                Some(env) => format!(
                    "the remote engine at {base} refused the API key from ${env} (HTTP {code}: {msg}); \
                     put the right key in {env} and restart the server"
                ),
                None => format!(
                    "the remote engine at {base} needs an API key (HTTP {code}: {msg}): set `backend.apiKeyEnv` \
                     to the name of an environment variable that holds it"
                ),
            }),
            404 => RemoteError::refused(format!(
                "the remote engine at {base} has no {path} (HTTP 404: {msg}); check `backend.url` and `backend.kind`"
            )),
            501 => {
                RemoteError::refused(format!("the remote engine at {base} does not support {path} (HTTP 501: {msg})"))
            }
            500..=599 => {
                RemoteError::down(format!("the remote engine at {base} failed on {path} (HTTP {code}: {msg})"))
            }
            _ => RemoteError::refused(format!("the remote engine at {base} refused {path} (HTTP {code}: {msg})")),
        };
        e.status = Some(code);
        e
    }

    /// Update the health after a request or probe, and tell the user about a
    /// new problem or a recovery.
    fn record(&self, r: &Result<String, RemoteError>, elapsed: Duration) {
        let slow = SLOW.min(self.timeout() / 2);
        let mut h = self.health();
        let was_down = h.state == Reachability::Down;
        match r {
            Ok(_) => {
                h.state = if elapsed > slow { Reachability::Slow } else { Reachability::Reachable };
                h.latency_ms = Some(elapsed.as_secs_f64() * 1000.0);
                h.announced = None;
            }
            Err(e) => {
                h.last_error = Some(e.message.clone());
                if e.down {
                    h.state = Reachability::Down;
                } else if matches!(h.state, Reachability::Down | Reachability::Unknown) {
                    h.state = Reachability::Reachable;
                }
                if h.announced.as_deref() != Some(e.message.as_str()) {
                    h.announced = Some(e.message.clone());
                    (self.notify)(Notice::Error(e.message.clone()));
                }
            }
        }
        if was_down && h.state != Reachability::Down {
            (self.notify)(Notice::Log(format!("the remote engine at {} answers again", self.base())));
        }
    }

    /// The status object (`backend` in `anchorcoder/status`), redacted.
    pub fn status(&self) -> Value {
        let h = self.health();
        let key = match (&self.ready, &self.config.api_key_env) {
            (Err(e), _) => e.clone(),
            (Ok(_), Some(env)) => format!("from ${env}"),
            (Ok(_), None) => "none".into(),
        };
        let mut status = json!({
            "kind": self.config.kind,
            "url": self.base(),
            "model": self.config.model.clone().or_else(|| h.discovered_model.clone()),
            "state": h.state,
            "latencyMs": h.latency_ms,
            "lastError": h.last_error,
            "endpoint": h.last_endpoint,
            "note": h.no_infill,
            "apiKey": key,
            "timeoutMs": self.config.timeout_ms,
            "fallbackToLocal": self.config.fallback_to_local,
        });
        crate::redact::redact_json(&mut status);
        status
    }
}

/// The API key from the environment variable `backend.apiKeyEnv` names.
fn api_key(config: &BackendConfig) -> Result<Option<String>, String> {
    let Some(env) = &config.api_key_env else { return Ok(None) };
    match std::env::var(env) {
        Ok(k) if k.trim().is_empty() => Err(format!("`backend.apiKeyEnv` names {env}, which is empty")),
        // A header value must be visible ASCII; say so without showing it.
        Ok(k) if !k.trim().bytes().all(|b| b.is_ascii_graphic()) => {
            Err(format!("{env} holds characters an API key cannot have (spaces or non-ASCII)"))
        }
        Ok(k) => {
            crate::redact::register_secret(k.trim());
            Ok(Some(k.trim().to_string()))
        }
        Err(_) => Err(format!(
            "`backend.apiKeyEnv` names {env}, which is not set in the server's environment; \
             set it where the editor starts the server"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(kind: BackendKind, url: &str, env: Option<&str>) -> (Remote, Arc<Mutex<Vec<Notice>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let config = BackendConfig {
            kind,
            url: Some(url.into()),
            api_key_env: env.map(str::to_string),
            timeout_ms: 2000,
            ..BackendConfig::default()
        };
        (Remote::new(&config, Arc::new(move |n| s.lock().unwrap().push(n))), seen)
    }

    #[test]
    fn the_key_comes_from_the_environment_and_is_never_shown() {
        std::env::set_var("ANCHORCODER_UNIT_KEY", "sk-unit-secret");
        let (r, _) = remote(BackendKind::OpenAi, "http://127.0.0.1:9", Some("ANCHORCODER_UNIT_KEY"));
        assert_eq!(r.ready.as_ref().unwrap().1.as_deref(), Some("sk-unit-secret"));
        let status = r.status().to_string();
        assert!(status.contains("from $ANCHORCODER_UNIT_KEY") && !status.contains("sk-unit-secret"), "{status}");
        let e = r.http_error("/v1/completions", 401, r#"{"error":{"message":"Invalid API Key"}}"#);
        assert!(!e.down && e.message.contains("refused the API key from $ANCHORCODER_UNIT_KEY"), "{e:?}");
        assert!(!e.message.contains("sk-unit-secret"));

        let (r, _) = remote(BackendKind::OpenAi, "http://127.0.0.1:9", Some("ANCHORCODER_UNIT_UNSET"));
        assert!(r.status()["apiKey"].as_str().unwrap().contains("ANCHORCODER_UNIT_UNSET, which is not set"));
        let e = r.request(Method::GET, "/", tokio::time::Instant::now()).err().unwrap();
        assert!(e.message.contains("not set in the server's environment"), "{e:?}");
    }

    #[test]
    fn http_errors_are_sorted_into_down_or_refused() {
        let (r, _) = remote(BackendKind::LlamaCpp, "http://h:1", None);
        let e = r.http_error("/infill", 501, r#"{"error":{"code":501,"message":"Infill is not supported"}}"#);
        assert_eq!((e.status, e.down), (Some(501), false));
        assert!(r.http_error("/completion", 503, "Loading model").down);
        let e = r.http_error("/completion", 401, "{}");
        assert!(e.message.contains("set `backend.apiKeyEnv`"), "{e:?}");
        assert!(r.http_error("/nope", 404, "").message.contains("check `backend.url`"));
        assert!(!r.http_error("/completion", 400, r#"{"error":"context too long"}"#).down);
    }

    /// A fake engine on loopback: `answer` gets each request's head (request
    /// line and headers) and writes the whole response.
    fn fake_engine(answer: fn(&str, &mut std::net::TcpStream)) -> String {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).is_ok_and(|n| n == 1) {
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    // Read the body too: closing with unread bytes would reset the
                    // connection before the client reads the answer.
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    let _ = c.read_exact(&mut vec![0u8; len]);
                    answer(&head, &mut c);
                });
            }
        });
        url
    }

    fn request() -> RemoteRequest {
        RemoteRequest {
            context: "a".into(),
            line: "b".into(),
            forced: String::new(),
            suffix: None,
            max_tokens: 4,
            stop: vec![],
            extra: vec![],
            extra_text: String::new(),
        }
    }

    fn echo_headers(code: u16, head: &str, c: &mut std::net::TcpStream) {
        use std::io::Write;
        // The authorization line first, as a careless proxy would echo it.
        let mut lines: Vec<&str> = head.lines().skip(1).filter(|l| !l.is_empty()).collect();
        lines.sort_by_key(|l| !l.to_ascii_lowercase().starts_with("authorization"));
        let body = json!({"error": {"message": format!("denied; you sent {}", lines.join("; "))}}).to_string();
        let _ = write!(
            c,
            "HTTP/1.1 {code} Oops\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    #[tokio::test]
    async fn an_engine_that_echoes_the_key_never_brings_it_out() {
        const KEY: &str = "sk-echo-unit-31337-abcdef";
        std::env::set_var("ANCHORCODER_ECHO_KEY", KEY);
        let url401 = fake_engine(|h, c| echo_headers(401, h, c));
        let url500 = fake_engine(|h, c| echo_headers(500, h, c));
        for (kind, url) in [(BackendKind::OpenAi, &url401), (BackendKind::LlamaCpp, &url500)] {
            let (mut r, seen) = remote(kind, url, Some("ANCHORCODER_ECHO_KEY"));
            r.config.model = Some("m".into());
            let e = r.generate(&request(), &mut |_| false).await.unwrap_err();
            assert!(e.message.contains("denied; you sent"), "the engine's message is kept: {e:?}");
            r.probe().await;
            let everything = format!("{e:?} {:?} {}", seen.lock().unwrap(), r.status());
            assert!(!everything.contains(KEY) && !everything.contains("31337"), "the key leaked: {everything}");
            assert!(everything.contains("[redacted]"), "{everything}");
        }
    }

    /// Headers, then server-sent events of empty text with no pause, forever.
    fn endless_events(head: &str, c: &mut std::net::TcpStream) {
        use std::io::Write;
        let event: &[u8] = if head.starts_with("POST /v1/") {
            b"data: {\"choices\":[{\"text\":\"\",\"finish_reason\":null}]}\n\n"
        } else {
            b"data: {\"content\":\"\",\"stop\":false}\n\n"
        };
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n");
        let many = event.repeat(1000);
        while c.write_all(&many).is_ok() {}
    }

    /// Headers, then one endless line.
    fn endless_line(_: &str, c: &mut std::net::TcpStream) {
        use std::io::Write;
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: ");
        let x = vec![b'x'; 1 << 16];
        while c.write_all(&x).is_ok() {}
    }

    /// Headers, then nothing.
    fn stall(_: &str, c: &mut std::net::TcpStream) {
        use std::io::Write;
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n");
        std::thread::sleep(Duration::from_secs(30));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_timeout_bounds_the_whole_request_for_both_kinds() {
        for answer in [endless_events as fn(&str, &mut std::net::TcpStream), stall] {
            let url = fake_engine(answer);
            for kind in [BackendKind::OpenAi, BackendKind::LlamaCpp] {
                let (mut r, _) = remote(kind, &url, None);
                (r.config.timeout_ms, r.config.model) = (800, Some("m".into()));
                let t0 = Instant::now();
                let e = r.generate(&request(), &mut |_| false).await.unwrap_err();
                let took = t0.elapsed();
                assert!(e.down && e.message.contains("did not answer within 800 ms"), "{kind:?}: {e:?}");
                assert!(took >= Duration::from_millis(790) && took < Duration::from_millis(2500), "{kind:?}: {took:?}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endless_event_line_fails_fast_and_clearly() {
        let url = fake_engine(endless_line);
        for kind in [BackendKind::OpenAi, BackendKind::LlamaCpp] {
            let (mut r, _) = remote(kind, &url, None);
            (r.config.timeout_ms, r.config.model) = (20_000, Some("m".into()));
            let t0 = Instant::now();
            let e = r.generate(&request(), &mut |_| false).await.unwrap_err();
            assert!(e.message.contains("an event line longer than 8 MiB"), "{kind:?}: {e:?}");
            assert!(t0.elapsed() < Duration::from_secs(10), "{kind:?}: {:?}", t0.elapsed());
        }
    }

    static HUNG_UP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static ALWAYS_HUNG_UP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Hangs up on the first POST without an answer (a keep-alive connection
    /// the engine closed as it was reused); answers later ones with "ok".
    fn hangs_up_once(head: &str, c: &mut std::net::TcpStream) {
        use std::io::Write;
        if head.starts_with("POST ") && HUNG_UP.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            let _ = c.shutdown(std::net::Shutdown::Both);
            return;
        }
        let _ = c.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
              data: {\"content\":\"ok\",\"stop\":false}\n\ndata: {\"content\":\"\",\"stop\":true}\n\n",
        );
    }

    /// Hangs up on every POST without an answer.
    fn hangs_up_always(head: &str, c: &mut std::net::TcpStream) {
        if head.starts_with("POST ") {
            ALWAYS_HUNG_UP.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = c.shutdown(std::net::Shutdown::Both);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_closed_before_any_answer_is_retried_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let (r, seen) = remote(BackendKind::LlamaCpp, &fake_engine(hangs_up_once), None);
        let text = r.generate(&request(), &mut |_| false).await.unwrap();
        assert_eq!((text.as_str(), HUNG_UP.load(SeqCst)), ("ok", 2));
        let said = format!("{:?}", seen.lock().unwrap());
        assert!(said.contains("closed before an answer to /completion") && said.contains("sending it again"), "{said}");
        // Once only: an engine that always hangs up is reported, not retried forever.
        let (r, _) = remote(BackendKind::LlamaCpp, &fake_engine(hangs_up_always), None);
        let e = r.generate(&request(), &mut |_| false).await.unwrap_err();
        assert!(e.down && e.message.contains("broke during /completion"), "{e:?}");
        assert_eq!(ALWAYS_HUNG_UP.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_marks_the_engine_down_once() {
        // Nothing listens on a port we just closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (r, seen) = remote(BackendKind::LlamaCpp, &format!("http://127.0.0.1:{port}"), None);
        assert_eq!(r.state(), Reachability::Unknown);
        let req = request();
        for _ in 0..3 {
            let e = r.generate(&req, &mut |_| false).await.unwrap_err();
            assert!(e.down && e.message.starts_with("cannot connect to the remote engine"), "{e:?}");
        }
        assert_eq!(r.state(), Reachability::Down);
        assert_eq!(seen.lock().unwrap().len(), 1, "announced once: {:?}", seen.lock().unwrap());
        assert!(r.claim_probe());
        assert!(!r.claim_probe(), "one probe per {PROBE_EVERY:?}");
        assert_eq!(r.status()["state"], "down");
    }
}
