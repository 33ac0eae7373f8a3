//! The language server: thin tower-lsp handlers that translate LSP into
//! worker jobs and back. No model code here.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tower::ServiceBuilder;
use tower_lsp::jsonrpc::{Error, ErrorCode, Request, Response, Result};
use tower_lsp::lsp_types::notification::{Notification, Progress};
use tower_lsp::lsp_types::request::WorkDoneProgressCreate;
use tower_lsp::lsp_types::*;
use tower_lsp::{Client, LanguageServer, LspService, Server};

use super::documents::{ChangeOutcome, Documents, PositionEncoding};
use super::protocol::{
    set_inline_completion_provider, ContextFileStatus, DidMoveCursor, DocumentCacheStatus, InlineCompletionItem,
    InlineCompletionList, InlineCompletionOptions, InlineCompletionParams, InlineCompletionProvider, ModelSource,
    ModelState, ModelStatus, StatusResult,
};
use super::transport;
use crate::config::{Config, ConfigMessage};
use crate::models;
use crate::worker::{self, CompleteJob, Completed, CompletionError, Event, Job, WorkerHandle};

/// Requests in progress at once. tower-lsp's default (4) let four completions
/// waiting for the model hold every slot, so `anchorcoder/status` (answered
/// at once from the worker's snapshot) waited minutes behind them. Completions
/// are newest-wins per document, so this bounds open documents with a request
/// in flight, not keystrokes; output back-pressure still bounds what is read.
const MAX_PENDING_REQUESTS: usize = 1024;

/// A newly opened document is warmed at its top (the cursor is not known
/// yet): up to the last line that starts within this many bytes.
const OPEN_WARM_BYTES: usize = 8192;

/// How long answers already on their way out may take to reach the client
/// after `exit` (a client may send requests, `shutdown` and `exit` at once).
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Run the server on stdin/stdout until the client sends `exit` or closes its
/// end, then end the process: status 0 after a `shutdown` request, 1 without
/// (the specification's rule). Queued and running model work is not waited
/// for: nobody would read its answer.
pub fn run_stdio() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let status = rt.block_on(async {
        let (service, socket) = LspService::build(Backend::new)
            .custom_method("textDocument/inlineCompletion", Backend::inline_completion)
            .custom_method("anchorcoder/status", Backend::status)
            .custom_method(DidMoveCursor::METHOD, Backend::did_move_cursor)
            .finish();
        // lsp-types 0.94 has no `inlineCompletionProvider`: add it to the
        // initialize result on its way out.
        let service =
            ServiceBuilder::new().map_request(drop_empty_params).map_response(add_inline_capability).service(service);
        // Our own framing in front of tower-lsp keeps malformed input from
        // stopping the server (see `transport`).
        let (in_ours, in_server) = tokio::io::duplex(1 << 20);
        let (out_server, out_ours) = tokio::io::duplex(1 << 20);
        let (replies_tx, replies_rx) = mpsc::unbounded_channel();
        let input = tokio::spawn(transport::filter_input(tokio::io::stdin(), in_ours, replies_tx.clone()));
        let writer = tokio::spawn(transport::merge_output(out_ours, replies_tx, replies_rx, tokio::io::stdout()));
        let server = tokio::spawn(
            Server::new(in_server, out_server, socket).concurrency_level(MAX_PENDING_REQUESTS).serve(service),
        );
        let end = input.await.unwrap_or(transport::InputEnd { exit: false, shutdown_requested: false });
        if end.exit {
            // The input to tower-lsp is closed: it finishes what it has and
            // the writer drains, within the grace period.
            let _ = tokio::time::timeout(EXIT_GRACE, async {
                let _ = server.await;
                let _ = writer.await;
            })
            .await;
        }
        end.status()
    });
    // Not `return`: dropping the runtime would wait for the blocking stdin
    // read, and the worker thread may be in the middle of a prefill.
    std::process::exit(status)
}

/// `anchorcoder/status` and `shutdown` take no parameters; accept `null`, `{}`
/// and `[]` too, as clients send them (tower-lsp would answer -32602).
fn drop_empty_params(req: Request) -> Request {
    if !matches!(req.method(), "anchorcoder/status" | "shutdown") {
        return req;
    }
    let (method, id, params) = req.into_parts();
    let empty = match &params {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        _ => false,
    };
    let mut b = Request::build(method);
    if let Some(id) = id {
        b = b.id(id);
    }
    match params {
        Some(p) if !empty => b.params(p).finish(),
        _ => b.finish(),
    }
}

fn add_inline_capability(response: Option<Response>) -> Option<Response> {
    let response = response?;
    let (id, body) = response.into_parts();
    let body = body.map(|mut v| {
        if v.get("serverInfo").and_then(|s| s.get("name")).and_then(Value::as_str) == Some("anchorcoder") {
            set_inline_completion_provider(
                &mut v,
                InlineCompletionProvider::Options(InlineCompletionOptions { work_done_progress: false }),
            );
        }
        v
    });
    Some(Response::from_parts(id, body))
}

/// Server state shared by the handlers.
pub struct Backend {
    client: Client,
    documents: Documents,
    config: Mutex<Config>,
    encoding: Mutex<PositionEncoding>,
    progress_supported: AtomicBool,
    worker: OnceLock<WorkerHandle>,
    /// Cancel flag of the completion in flight, per document.
    inflight: DashMap<Url, Arc<AtomicBool>>,
    log: Mutex<Option<std::fs::File>>,
    /// The cursor the editor reported last (`anchorcoder/didMoveCursor`).
    cursor: Mutex<Option<TextDocumentPositionParams>>,
}

/// Sets a completion's cancel flag when its request future is dropped (the
/// client cancelled it, or a newer one replaced it).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Backend {
    fn new(client: Client) -> Self {
        Backend {
            client,
            documents: Documents::new(),
            config: Mutex::new(Config::default()),
            encoding: Mutex::new(PositionEncoding::Utf16),
            progress_supported: AtomicBool::new(false),
            worker: OnceLock::new(),
            inflight: DashMap::new(),
            log: Mutex::new(None),
            cursor: Mutex::new(None),
        }
    }

    fn encoding(&self) -> PositionEncoding {
        *self.encoding.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker(&self) -> Result<&WorkerHandle> {
        self.worker.get().ok_or_else(Error::invalid_request)
    }

    /// Append a line to the log file (if one could be opened).
    fn log_line(&self, line: &str) {
        if let Some(f) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = writeln!(f, "{} {}", unix_seconds(), crate::redact::redact(line));
        }
    }

    async fn report(&self, messages: Vec<ConfigMessage>) {
        for m in messages {
            self.log_line(m.text());
            let text = crate::redact::redact(m.text());
            self.client.show_message(m.message_type(), format!("AnchorCoder: {text}")).await;
        }
    }

    /// Byte offset of an LSP position in a document snapshot, with clear
    /// errors for unknown documents and impossible positions.
    fn locate(&self, uri: &Url, position: Position) -> Result<(ropey::Rope, usize)> {
        let doc = self.documents.snapshot(uri).ok_or_else(|| invalid(format!("document not open: {uri}")))?;
        if doc.is_probably_binary() {
            return Err(invalid(format!("{uri} looks like a binary file; no completions there")));
        }
        if doc.is_desynced() {
            return Err(invalid(format!("{uri} is out of sync after a bad edit; reopen it")));
        }
        let offset = doc.position_to_byte(position, self.encoding())?;
        Ok((doc.rope().clone(), offset))
    }

    /// Ask the worker for a suggestion at a position.
    async fn suggest(&self, uri: &Url, position: Position) -> Result<Completed> {
        let (rope, cursor) = self.locate(uri, position)?;
        let cancel = Arc::new(AtomicBool::new(false));
        if let Some(old) = self.inflight.insert(uri.clone(), cancel.clone()) {
            old.store(true, Ordering::SeqCst);
        }
        let _guard = CancelOnDrop(cancel.clone());
        let (reply, answer) = oneshot::channel();
        self.worker()?.send(Job::Complete(CompleteJob {
            uri: uri.to_string(),
            rope,
            cursor,
            cancel,
            reply,
            received: Instant::now(),
        }));
        match answer.await {
            Ok(Ok(done)) => {
                let generated =
                    done.generated.map(|(n, ms)| format!(", generated {n} in {ms:.0} ms")).unwrap_or_default();
                self.log_line(&format!(
                    "completion {uri} {:.0} ms (reused {}, prefilled {}{generated}, typed-through {})",
                    done.latency_ms, done.reused_tokens, done.prefilled_tokens, done.typed_through
                ));
                Ok(done)
            }
            Ok(Err(e)) => Err(completion_error(e)),
            // The job was dropped unanswered: it panicked (the worker logged
            // the internal error and goes on) or the worker thread is gone.
            Err(_) => Err(Error {
                code: ErrorCode::InternalError,
                message: "the model worker failed on this request (the server log has the error)".into(),
                data: None,
            }),
        }
    }

    async fn inline_completion(&self, params: InlineCompletionParams) -> Result<InlineCompletionList> {
        let uri = params.text_document.uri;
        let done = self.suggest(&uri, params.position).await?;
        let items = if done.text.is_empty() {
            Vec::new()
        } else {
            let mut item = InlineCompletionItem::new(done.text);
            item.range = Some(Range { start: params.position, end: params.position });
            vec![item]
        };
        Ok(InlineCompletionList { items })
    }

    async fn status(&self) -> Result<StatusResult> {
        let s = self.worker()?.status();
        let state = match s.model_state {
            worker::ModelState::Pulling => ModelState::Pulling,
            worker::ModelState::Loading => ModelState::Loading,
            worker::ModelState::Ready => ModelState::Ready,
            worker::ModelState::Error => ModelState::Error,
            worker::ModelState::Unloaded => ModelState::Unloaded,
        };
        let mut extra = serde_json::Map::new();
        extra.insert("openDocuments".into(), self.documents.len().into());
        if let Some(c) = self.cursor.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            extra.insert("cursor".into(), serde_json::to_value(c).unwrap_or_default());
        }
        extra.insert("cacheEnabled".into(), self.config.lock().unwrap_or_else(|e| e.into_inner()).cache.enabled.into());
        Ok(StatusResult {
            model: ModelStatus {
                path: s.model_path.map(|p| p.display().to_string()),
                source: if s.default_model { ModelSource::Default } else { ModelSource::User },
                state,
                error: s.model_error,
            },
            policy: s.policy,
            documents: s
                .documents
                .into_iter()
                .filter_map(|d| {
                    Some(DocumentCacheStatus {
                        uri: Url::parse(&d.uri).ok()?,
                        tokens: d.tokens,
                        anchors: d.anchors,
                        kept_tokens: d.kept_entries,
                        kv_bytes: d.kv_bytes as u64,
                        pending_tokens: d.pending_tokens,
                        reused_tokens: d.reused_tokens,
                        context_tokens: d.context_tokens,
                        context_files: d
                            .context_files
                            .into_iter()
                            .map(|(path, bytes)| ContextFileStatus { path, bytes })
                            .collect(),
                    })
                })
                .collect(),
            cache_bytes: s.cache_bytes as u64,
            cache_budget_bytes: s.cache_budget_bytes as u64,
            queue_depth: s.queue_depth,
            last_latencies_ms: s.last_latencies_ms,
            backend: s.backend,
            extra,
        })
    }

    /// `anchorcoder/didMoveCursor`: the editor says where the cursor rests;
    /// warm that document there, before the others. A position that does
    /// not fit the document is logged and ignored (a notification has no reply).
    async fn did_move_cursor(&self, params: TextDocumentPositionParams) {
        let uri = params.text_document.uri.clone();
        let Some(doc) = self.documents.snapshot(&uri) else { return };
        match doc.position_to_byte(params.position, self.encoding()) {
            Ok(cursor) => {
                let p = params.position;
                self.log_line(&format!("cursor at {uri}:{}:{}: warming there first", p.line + 1, p.character + 1));
                self.warm_at(&uri, Some(cursor), true);
                *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = Some(params);
            }
            Err(e) => self.log_line(&format!("ignored anchorcoder/didMoveCursor for {uri}: {e}")),
        }
    }

    /// Warm the document's cache around `cursor` in idle time.
    fn warm(&self, uri: &Url, cursor: Option<usize>) {
        self.warm_at(uri, cursor, false);
    }

    /// Warm the document's cache around `cursor`; `focus`: ahead of other documents.
    fn warm_at(&self, uri: &Url, cursor: Option<usize>, focus: bool) {
        let (Some(doc), Ok(worker)) = (self.documents.snapshot(uri), self.worker()) else { return };
        if doc.is_probably_binary() || doc.is_desynced() {
            return;
        }
        let rope = doc.rope().clone();
        let cursor = cursor.unwrap_or(rope.len_bytes()).min(rope.len_bytes());
        worker.send(Job::Warm { uri: uri.to_string(), rope, cursor, focus });
    }

    /// Forward worker events to the client: progress, errors, logs.
    async fn forward_events(
        client: Client,
        mut events: mpsc::UnboundedReceiver<Event>,
        progress: bool,
        log: Option<PathBuf>,
    ) {
        let token = NumberOrString::String("anchorcoder/model".into());
        let mut began = false;
        let mut log = log.and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
        while let Some(ev) = events.recv().await {
            // Everything below goes to the log file or the client.
            let ev = match ev {
                Event::Progress { message, percentage, done } => {
                    Event::Progress { message: crate::redact::redact(&message), percentage, done }
                }
                Event::Error(message) => Event::Error(crate::redact::redact(&message)),
                Event::Log(message) => Event::Log(crate::redact::redact(&message)),
            };
            match ev {
                Event::Progress { message, percentage, done } => {
                    if let Some(f) = log.as_mut() {
                        let _ = writeln!(f, "{} progress: {message}", unix_seconds());
                    }
                    if !progress {
                        client.log_message(MessageType::INFO, format!("AnchorCoder: {message}")).await;
                        continue;
                    }
                    if !began {
                        let created = client
                            .send_request::<WorkDoneProgressCreate>(WorkDoneProgressCreateParams {
                                token: token.clone(),
                            })
                            .await;
                        if created.is_err() {
                            continue;
                        }
                        began = true;
                        let begin = WorkDoneProgress::Begin(WorkDoneProgressBegin {
                            title: "AnchorCoder model".into(),
                            cancellable: Some(false),
                            message: Some(message.clone()),
                            percentage,
                        });
                        client
                            .send_notification::<Progress>(ProgressParams {
                                token: token.clone(),
                                value: ProgressParamsValue::WorkDone(begin),
                            })
                            .await;
                    }
                    let value = if done {
                        began = false;
                        WorkDoneProgress::End(WorkDoneProgressEnd { message: Some(message) })
                    } else {
                        WorkDoneProgress::Report(WorkDoneProgressReport {
                            cancellable: Some(false),
                            message: Some(message),
                            percentage,
                        })
                    };
                    client
                        .send_notification::<Progress>(ProgressParams {
                            token: token.clone(),
                            value: ProgressParamsValue::WorkDone(value),
                        })
                        .await;
                }
                Event::Error(message) => {
                    if let Some(f) = log.as_mut() {
                        let _ = writeln!(f, "{} error: {message}", unix_seconds());
                    }
                    client.show_message(MessageType::ERROR, format!("AnchorCoder: {message}")).await;
                }
                Event::Log(message) => {
                    if let Some(f) = log.as_mut() {
                        let _ = writeln!(f, "{} {message}", unix_seconds());
                    }
                    client.log_message(MessageType::LOG, message).await;
                }
            }
        }
    }
}

/// The JSON-RPC error for a completion without a suggestion: cancellations
/// as `RequestCancelled`, the rest as internal errors with their (redacted) message.
fn completion_error(e: CompletionError) -> Error {
    let code = if e.is_cancellation() { ErrorCode::RequestCancelled } else { ErrorCode::InternalError };
    Error { code, message: crate::redact::redact(&e.to_string()).into(), data: None }
}

fn invalid(message: String) -> Error {
    Error { code: ErrorCode::InvalidParams, message: message.into(), data: None }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Where the log file goes unless `logFile` says otherwise.
fn default_log_path() -> PathBuf {
    models::cache_dir().parent().map(|p| p.join("anchorcoder.log")).unwrap_or_else(|| PathBuf::from("anchorcoder.log"))
}

#[tower_lsp::async_trait]
impl LanguageServer for Backend {
    async fn initialize(&self, params: InitializeParams) -> Result<InitializeResult> {
        let (config, messages) = Config::from_initialization_options(params.initialization_options.as_ref());
        let encoding = PositionEncoding::from_client_capabilities(&params.capabilities);
        *self.encoding.lock().unwrap_or_else(|e| e.into_inner()) = encoding;
        let progress = params.capabilities.window.as_ref().and_then(|w| w.work_done_progress).unwrap_or(false);
        self.progress_supported.store(progress, Ordering::SeqCst);
        if let Some(threads) = config.threads {
            // Read by the thread pools when they first start (in the worker).
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
        let log_path = config.log_file.clone().unwrap_or_else(default_log_path);
        if let Some(dir) = log_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        *self.log.lock().unwrap_or_else(|e| e.into_inner()) =
            std::fs::OpenOptions::new().create(true).append(true).open(&log_path).ok();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        tokio::spawn(Backend::forward_events(self.client.clone(), events_rx, progress, Some(log_path)));
        let worker = WorkerHandle::spawn(config.clone(), events_tx);
        worker.send(Job::Workspace { roots: workspace_roots(&params) });
        let _ = self.worker.set(worker);
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
        self.report(messages).await;

        Ok(InitializeResult {
            capabilities: ServerCapabilities {
                position_encoding: Some(encoding.kind()),
                text_document_sync: Some(TextDocumentSyncCapability::Options(TextDocumentSyncOptions {
                    open_close: Some(true),
                    change: Some(TextDocumentSyncKind::INCREMENTAL),
                    save: Some(TextDocumentSyncSaveOptions::Supported(true)),
                    ..Default::default()
                })),
                completion_provider: Some(CompletionOptions { resolve_provider: Some(false), ..Default::default() }),
                ..Default::default()
            },
            server_info: Some(ServerInfo {
                name: "anchorcoder".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            }),
        })
    }

    async fn initialized(&self, _: InitializedParams) {
        self.log_line("initialized");
    }

    async fn shutdown(&self) -> Result<()> {
        // No request is served after this one: stop what is running.
        for flag in self.inflight.iter() {
            flag.store(true, Ordering::SeqCst);
        }
        self.log_line("shutdown");
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        let d = params.text_document;
        self.documents.open(d.uri.clone(), &d.text, d.version, d.language_id);
        // Where the cursor is, the server cannot know yet: warm the top (the
        // start of the last line that begins in the first 8 KiB).
        let head = &d.text[..d.text.floor_char_boundary(OPEN_WARM_BYTES)];
        self.warm(&d.uri, Some(head.rfind('\n').map_or(0, |i| i + 1)));
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        let uri = params.text_document.uri;
        let enc = self.encoding();
        match self.documents.change(&uri, params.text_document.version, &params.content_changes, enc) {
            Ok(ChangeOutcome::Applied { .. }) => {
                // The cursor is most likely right after the last change.
                let cursor = params.content_changes.last().and_then(|c| {
                    let doc = self.documents.snapshot(&uri)?;
                    let start = doc.position_to_byte(c.range?.start, enc).ok()?;
                    Some(start + c.text.len())
                });
                self.warm(&uri, cursor);
            }
            Ok(ChangeOutcome::Stale { stored, received }) => {
                self.log_line(&format!("ignored stale change to {uri}: version {received} <= {stored}"));
            }
            Err(e) => {
                let msg =
                    format!("could not apply a change to {uri}: {e}; the document is unchanged, reopen it to resync");
                self.log_line(&msg);
                self.client.show_message(MessageType::ERROR, format!("AnchorCoder: {msg}")).await;
            }
        }
    }

    async fn did_save(&self, _: DidSaveTextDocumentParams) {}

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        let uri = params.text_document.uri;
        self.documents.close(&uri);
        self.cursor.lock().unwrap_or_else(|e| e.into_inner()).take_if(|c| c.text_document.uri == uri);
        if let Some((_, c)) = self.inflight.remove(&uri) {
            c.store(true, Ordering::SeqCst);
        }
        if let Ok(w) = self.worker() {
            w.send(Job::Close { uri: uri.to_string() });
        }
    }

    async fn did_change_configuration(&self, params: DidChangeConfigurationParams) {
        let (config, messages) = {
            let mut c = self.config.lock().unwrap_or_else(|e| e.into_inner());
            let messages = c.apply(&params.settings);
            (c.clone(), messages)
        };
        if let Ok(w) = self.worker() {
            w.send(Job::Configure(Box::new(config)));
        }
        self.report(messages).await;
    }

    async fn completion(&self, params: CompletionParams) -> Result<Option<CompletionResponse>> {
        let pos = params.text_document_position;
        let done = self.suggest(&pos.text_document.uri, pos.position).await?;
        if done.text.is_empty() {
            return Ok(None);
        }
        let first = done.text.lines().next().unwrap_or("").trim().to_string();
        let item = CompletionItem {
            label: if first.is_empty() { done.text.trim().to_string() } else { first },
            kind: Some(CompletionItemKind::TEXT),
            detail: Some("AnchorCoder".into()),
            text_edit: Some(CompletionTextEdit::Edit(TextEdit {
                range: Range { start: pos.position, end: pos.position },
                new_text: done.text.clone(),
            })),
            filter_text: Some(done.text),
            ..Default::default()
        };
        Ok(Some(CompletionResponse::List(CompletionList { is_incomplete: true, items: vec![item] })))
    }
}

/// The local folders of the client's workspace (`workspaceFolders`, else the
/// deprecated `rootUri`/`rootPath`).
#[allow(deprecated)]
fn workspace_roots(params: &InitializeParams) -> Vec<std::path::PathBuf> {
    let folders = params.workspace_folders.iter().flatten().map(|f| &f.uri);
    let mut roots: Vec<std::path::PathBuf> = folders.filter_map(|u| u.to_file_path().ok()).collect();
    if roots.is_empty() {
        roots.extend(params.root_uri.as_ref().and_then(|u| u.to_file_path().ok()));
    }
    if roots.is_empty() {
        roots.extend(params.root_path.as_ref().map(std::path::PathBuf::from));
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_errors_map_to_json_rpc_in_one_place() {
        for e in [CompletionError::Cancelled, CompletionError::Superseded] {
            let j = completion_error(e.clone());
            assert_eq!((j.code, j.message.as_ref()), (ErrorCode::RequestCancelled, e.to_string().as_str()));
        }
        assert_eq!(completion_error(CompletionError::Superseded).message, "superseded by a newer request");
        let j = completion_error(CompletionError::ModelUnavailable("the model is still loading".into()));
        assert_eq!((j.code, j.message.as_ref()), (ErrorCode::InternalError, "the model is still loading"));
        // Failures leave the process redacted, like every message.
        let j = completion_error(CompletionError::Failed("engine said: Authorization: Bearer sk-abc123".into()));
        assert_eq!(j.code, ErrorCode::InternalError);
        assert!(!j.message.contains("sk-abc123"), "{}", j.message);
    }
}
