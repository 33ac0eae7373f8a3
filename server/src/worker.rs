//! The background worker: one thread owns the model and every document's KV
//! cache. The LSP side sends [`Job`]s over a channel and never blocks on the
//! model; results come back on one-shot channels, events (progress, errors,
//! logs) on an event channel.
//!
//! Scheduling: completions first, in arrival order, a newer one for a
//! document cancelling the older; cache warm-up (prefill of a document's
//! window) in chunks when nothing else waits; choosing a new project context
//! and filling a cache under it only once typing pauses ([`QUIET`]). A panic in a job is caught and
//! reported; that document's cache is dropped and the worker goes on. If the
//! thread dies anyway, [`WorkerHandle::send`] starts a new one.
//!
//! A completion runs the one pipeline, [`completion::Session`], over the
//! local model ([`completion::Local`]: the engine and the document's cache).
//!
//! The backend seam: with a remote `backend`, [`WorkerHandle::send`] hands
//! completions to the remote route (`backend::route`) on the async runtime
//! instead of the thread. The route runs the same pipeline over the remote
//! engine; the thread then loads the local model only when `fallbackToLocal`
//! needs it.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ropey::Rope;
use serde_json::json;
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use crate::backend::route::RemoteRoute;
use crate::backend::{Notice, Remote};
use crate::completion::{self, Session, Settings};
use crate::config::{BackendConfig, Config};
use crate::context::Chunk;
use crate::engine::adapter::Adapter;
use crate::engine::document::DocumentCache;
use crate::engine::generate::StopReason;
use crate::engine::llama::Interrupted;
use crate::engine::policy::AttentionPolicy;
use crate::engine::Engine;
use crate::models;
use crate::project::Project;

/// Freed cache bytes worth handing back to the OS ([`release_free_memory`]).
const RELEASE_MIN_BYTES: usize = 1 << 20;

/// Hand memory the allocator holds free back to the OS. glibc keeps freed
/// heap memory for reuse, so without this a cache that shrinks (idle
/// compaction, a dropped document) leaves the server's resident memory at its
/// peak. Called in idle time only; a no-op on other allocators.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the OS; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tokens prefilled per warm-up step: the longest a completion waits for
/// warm-up to yield.
const WARM_CHUNK: usize = 64;
/// Lines of full K/V kept beyond the policy's recent lines, so edits just
/// above the cursor stay incremental.
const EVICTION_SLACK_LINES: u32 = 8;
/// Latencies remembered for status.
const LATENCY_HISTORY: usize = 32;
/// Tokens prefilled per step of a staged cache ([`Staged`]). It fills only
/// in pauses, and a job arriving interrupts the step under way between two
/// layers (the chunk's work is lost: 16 tokens at a 2,400-token window take
/// ~20 ms on 2 cores, 64 ~80 ms).
const STAGED_CHUNK: usize = 16;
/// A pause in typing this long lets warm-up choose a document's project
/// context again and fill a cache under it: work a keystroke arriving
/// meanwhile could wait for, one [`STAGED_CHUNK`] at a time. Typing runs at a
/// keystroke every 100–300 ms; the editors report a resting cursor after 250 ms.
pub(crate) const QUIET: Duration = Duration::from_millis(500);

/// How much longer typing must pause, after it last happened at
/// `last_typed`, to last [`QUIET`] (zero: it has). The one rule of a pause,
/// for the worker and the remote route.
pub(crate) fn pause_left(last_typed: Option<Instant>) -> Duration {
    last_typed.map_or(Duration::ZERO, |t| QUIET.saturating_sub(t.elapsed()))
}

/// A completion request.
pub struct CompleteJob {
    /// The document.
    pub uri: String,
    /// Its text when the request was made.
    pub rope: Rope,
    /// Cursor, as a byte offset into `rope`.
    pub cursor: usize,
    /// Set when the request is cancelled or superseded.
    pub cancel: Arc<AtomicBool>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Completed, CompletionError>>,
    /// When the request arrived.
    pub received: Instant,
}

/// A finished completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    /// Text to insert at the cursor; empty when nothing is worth showing.
    pub text: String,
    /// Request to answer, in milliseconds.
    pub latency_ms: f64,
    /// Whether the answer came from the suggestion already shown (typing
    /// through) without running the model.
    pub typed_through: bool,
    /// Prompt tokens whose K/V were reused.
    pub reused_tokens: usize,
    /// Prompt tokens that had to be run.
    pub prefilled_tokens: usize,
    /// Tokens the model generated for this answer and the milliseconds that
    /// took (0 when typed through); `None` from a remote engine, which does
    /// not say.
    pub generated: Option<(usize, f64)>,
}

/// Why a completion has no suggestion: what crosses the worker/LSP seam
/// (the LSP layer maps it to a JSON-RPC error in one place).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompletionError {
    /// The client cancelled the request, or the server is shutting down.
    Cancelled,
    /// A newer request for the same document replaced it.
    Superseded,
    /// No model to run it: still loading, or loading failed (the message).
    ModelUnavailable(String),
    /// Running it failed (the message; the log may have more).
    Failed(String),
}

impl std::fmt::Display for CompletionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompletionError::Cancelled => write!(f, "cancelled"),
            CompletionError::Superseded => write!(f, "superseded by a newer request"),
            CompletionError::ModelUnavailable(m) | CompletionError::Failed(m) => write!(f, "{m}"),
        }
    }
}

impl CompletionError {
    /// Cancelled or superseded: the client no longer wants the answer.
    pub fn is_cancellation(&self) -> bool {
        matches!(self, CompletionError::Cancelled | CompletionError::Superseded)
    }
}

/// Work for the worker.
pub enum Job {
    /// Suggest text at a cursor.
    Complete(CompleteJob),
    /// Prefill a document's window in idle time (cursor: where the user is
    /// probably typing). `focus`: the editor reported this cursor (the
    /// document the user is looking at), so its warm-up goes before the
    /// others'.
    Warm { uri: String, rope: Rope, cursor: usize, focus: bool },
    /// Forget a document and free its cache.
    Close { uri: String },
    /// The workspace folders the editor named (project context resolves
    /// imports under them).
    Workspace { roots: Vec<PathBuf> },
    /// Apply a new configuration.
    Configure(Box<Config>),
}

/// Where the model is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Being fetched.
    Pulling,
    /// Being loaded.
    Loading,
    /// Ready.
    Ready,
    /// Failed; see the message.
    Error,
    /// Not loaded: a remote engine serves completions (with
    /// `fallbackToLocal`, the model loads when first needed).
    Unloaded,
}

/// What the worker tells the LSP side, unasked.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Progress of pulling or loading the model (`percentage` when known).
    Progress { message: String, percentage: Option<u32>, done: bool },
    /// A problem the user must act on.
    Error(String),
    /// Anything else worth logging.
    Log(String),
}

/// One document's cache figures.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DocumentStatus {
    /// The document.
    pub uri: String,
    /// Tokens in its window.
    pub tokens: usize,
    /// Anchors among them.
    pub anchors: usize,
    /// K/V entries kept, summed over layers.
    pub kept_entries: usize,
    /// Bytes of live K/V.
    pub kv_bytes: usize,
    /// Tokens not yet prefilled.
    pub pending_tokens: usize,
    /// Prompt tokens whose K/V the last completion reused.
    pub reused_tokens: usize,
    /// Tokens of project context (other files) in its prompt's lead.
    pub context_tokens: usize,
    /// The files that context came from (as the prompt shows them), with
    /// the bytes of their chunks, least relevant first.
    pub context_files: Vec<(String, usize)>,
}

/// A snapshot of the worker's state.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WorkerStatus {
    /// The model file or folder.
    pub model_path: Option<PathBuf>,
    /// Whether it is the default model.
    pub default_model: bool,
    /// Its state.
    pub model_state: ModelState,
    /// The last model error, if any.
    pub model_error: Option<String>,
    /// The attention policy, as JSON.
    pub policy: serde_json::Value,
    /// Per-document caches.
    pub documents: Vec<DocumentStatus>,
    /// Bytes allocated for all caches.
    pub cache_bytes: usize,
    /// The budget for them.
    pub cache_budget_bytes: usize,
    /// Jobs waiting.
    pub queue_depth: usize,
    /// Latencies of the last completions, oldest first.
    pub last_latencies_ms: Vec<f64>,
    /// The backend: `{"kind": "local"}`, or a remote engine's health and
    /// counts (see `backend::Remote::status`).
    pub backend: serde_json::Value,
}

/// State the LSP side and the worker thread share.
#[derive(Clone, Default)]
struct Shared {
    queue_depth: Arc<AtomicUsize>,
    /// The remote route, when `backend` names a remote engine.
    route: Arc<Mutex<Option<Arc<RemoteRoute>>>>,
    /// Latencies of the last completions, local and remote.
    latencies: Arc<Mutex<VecDeque<f64>>>,
    /// The worker thread's state as of its last step ([`Worker::publish`]):
    /// status is read from here, never by waiting for the thread, which may
    /// be busy with the model for seconds.
    snapshot: Arc<Mutex<Option<WorkerStatus>>>,
    /// The workspace folders the editor named (a new remote route starts with them).
    roots: Arc<Mutex<Vec<PathBuf>>>,
}

impl Shared {
    fn route(&self) -> Option<Arc<RemoteRoute>> {
        lock(&self.route).clone()
    }

    fn record_latency(&self, ms: f64) {
        let mut l = lock(&self.latencies);
        if l.len() == LATENCY_HISTORY {
            l.pop_front();
        }
        l.push_back(ms);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The LSP side's end of the worker: cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    inner: Arc<Mutex<Sender<Job>>>,
    shared: Shared,
    config: Arc<Mutex<Config>>,
    events: UnboundedSender<Event>,
    /// Where remote requests run (the server's runtime, or our own).
    rt: tokio::runtime::Handle,
    _own_rt: Option<Arc<tokio::runtime::Runtime>>,
}

impl WorkerHandle {
    /// Start the worker thread; it loads (or pulls) the model first, unless
    /// a remote engine serves completions.
    pub fn spawn(config: Config, events: UnboundedSender<Event>) -> WorkerHandle {
        let (rt, own) = match tokio::runtime::Handle::try_current() {
            Ok(h) => (h, None),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("cannot start a runtime for remote requests");
                (rt.handle().clone(), Some(Arc::new(rt)))
            }
        };
        let shared = Shared::default();
        let handle = WorkerHandle {
            inner: Arc::new(Mutex::new(start_thread(config.clone(), events.clone(), shared.clone()))),
            shared,
            config: Arc::new(Mutex::new(config.clone())),
            events,
            rt,
            _own_rt: own,
        };
        handle.set_backend(&config.backend);
        handle
    }

    /// Queue a job; restarts the worker if its thread died. Completions go
    /// to the remote route when there is one; so does nothing else but
    /// `Close` (the route forgets the document too).
    pub fn send(&self, job: Job) {
        let job = match job {
            Job::Configure(c) => {
                *lock(&self.config) = (*c).clone();
                self.set_backend(&c.backend);
                Job::Configure(c)
            }
            Job::Complete(job) => match self.shared.route() {
                Some(route) => return route.complete(job, self.clone()),
                None => Job::Complete(job),
            },
            // The remote engine caches its own prompts; warming there is
            // choosing the document's project context (it reads files: off
            // this thread).
            Job::Warm { uri, rope, cursor, focus } if self.shared.route().is_some() => {
                if let Some(route) = self.shared.route() {
                    let budget = lock(&self.config).completion.context_tokens;
                    route.warm(&self.rt, (uri, rope, cursor), focus, budget);
                }
                return;
            }
            Job::Workspace { roots } => {
                *lock(&self.shared.roots) = roots.clone();
                if let Some(route) = self.shared.route() {
                    route.set_roots(roots.clone());
                }
                Job::Workspace { roots }
            }
            Job::Close { uri } => {
                if let Some(route) = self.shared.route() {
                    route.close(&uri);
                }
                Job::Close { uri }
            }
            other => other,
        };
        self.to_thread(job);
    }

    /// Where remote requests run.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// The configuration last sent.
    pub(crate) fn config(&self) -> Config {
        lock(&self.config).clone()
    }

    /// Remember a completion's latency for the status.
    pub(crate) fn record_latency(&self, ms: f64) {
        self.shared.record_latency(ms);
    }

    /// Queue a job on the worker thread.
    pub(crate) fn to_thread(&self, job: Job) {
        self.shared.queue_depth.fetch_add(1, Ordering::SeqCst);
        let mut tx = lock(&self.inner);
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            let _ = self.events.send(Event::Error("the model worker stopped; restarting it".into()));
            let config = lock(&self.config).clone();
            self.shared.queue_depth.store(1, Ordering::SeqCst);
            *tx = start_thread(config, self.events.clone(), self.shared.clone());
            let _ = tx.send(job);
        }
    }

    /// Make the remote route match `backend` (a new engine, or none); the
    /// old route's requests are stopped.
    fn set_backend(&self, backend: &BackendConfig) {
        let mut slot = lock(&self.shared.route);
        if slot.as_ref().map(|r| r.remote.config()) == Some(backend) || (slot.is_none() && !backend.is_remote()) {
            return;
        }
        if let Some(old) = slot.take() {
            old.stop_all();
        }
        if backend.is_remote() {
            let events = self.events.clone();
            let notify = Arc::new(move |n: Notice| {
                let _ = events.send(match n {
                    Notice::Error(m) => Event::Error(m),
                    Notice::Log(m) => Event::Log(m),
                });
            });
            let route = Arc::new(RemoteRoute::new(Remote::new(backend, notify), lock(&self.shared.roots).clone()));
            let remote = route.remote.clone();
            self.rt.spawn(async move { remote.probe().await });
            let _ = self.events.send(Event::Log(format!(
                "completions from the {} engine at {}",
                backend.kind,
                backend.url.as_deref().unwrap_or("")
            )));
            *slot = Some(route);
        }
    }

    /// Jobs sent and not yet taken up.
    pub fn queue_depth(&self) -> usize {
        self.shared.queue_depth.load(Ordering::SeqCst)
    }

    /// The worker's state, at once: the thread's last published snapshot
    /// with the live queue depth, latencies and backend health. Never waits
    /// for the model.
    pub fn status(&self) -> WorkerStatus {
        let mut s = lock(&self.shared.snapshot).clone().expect("published before the thread starts");
        s.queue_depth += self.queue_depth();
        s.last_latencies_ms = lock(&self.shared.latencies).iter().copied().collect();
        s.backend = self.shared.route().map_or_else(|| json!({ "kind": "local" }), |r| r.status());
        s
    }
}

fn start_thread(config: Config, events: UnboundedSender<Event>, shared: Shared) -> Sender<Job> {
    let (tx, rx) = mpsc::channel();
    let worker = Worker::new(config, events, rx, shared);
    worker.publish();
    std::thread::Builder::new()
        .name("anchorcoder-worker".into())
        .spawn(move || worker.run())
        .expect("cannot start the worker thread");
    tx
}

/// One document on the thread: its cache, its pipeline state (window start,
/// what was shown) and figures for the budget and the status.
struct DocState {
    cache: DocumentCache,
    session: Session,
    last_used: Instant,
    last_reused: usize,
    /// The files the project context came from, with their chunks' bytes.
    context_files: Vec<(String, usize)>,
    /// Whether this cache's context was chosen (a new cache chooses it again).
    context_chosen: bool,
    /// A newly chosen project context, filling beside `cache` in idle time.
    staged: Option<Staged>,
}

impl DocState {
    /// K/V bytes held, a staged cache's included.
    fn allocated_bytes(&self) -> usize {
        let staged = self.staged.as_ref().map_or(0, |s| s.cache.stats().kv.allocated_bytes);
        self.cache.stats().kv.allocated_bytes + staged
    }

    /// Make the staged cache the one completions use.
    fn promote(&mut self) {
        if let Some(s) = self.staged.take() {
            self.cache = s.cache;
            self.session.adopt_window(&s.session);
            self.context_files = s.context_files;
        }
    }
}

/// What a warm-up step leaves to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Warmed {
    /// Nothing: the document is warm.
    Done,
    /// Another step.
    More,
    /// Project-context work, once typing pauses ([`QUIET`]).
    AfterPause,
}

/// A document's cache under a newly chosen project context. A new context
/// changes the prompt's lead, so nothing of the cache can be reused: rather
/// than make the next keystroke pay for it, warm-up fills this second cache
/// once the document's own is warm, and it replaces that one when it is warm
/// too — or earlier, at a completion it would serve with no more work.
struct Staged {
    cache: DocumentCache,
    /// Its window (the same cursor may plan differently from the old one's).
    session: Session,
    context_files: Vec<(String, usize)>,
}

struct Worker {
    config: Config,
    engine: Option<Engine>,
    model_state: ModelState,
    model_error: Option<String>,
    model_path: Option<PathBuf>,
    docs: HashMap<String, DocState>,
    events: UnboundedSender<Event>,
    rx: Receiver<Job>,
    shared: Shared,
    completions: VecDeque<CompleteJob>,
    warm: VecDeque<(String, Rope, usize)>,
    /// Warm-ups left with project-context work only, until typing pauses.
    after_pause: VecDeque<(String, Rope, usize)>,
    /// When the user last typed (a completion request or an edit), or a
    /// suggestion was last answered: a pause counts from the later.
    last_typed: Option<Instant>,
    /// The document whose cursor the editor reported last: warmed first.
    focused: Option<String>,
    /// A completion or warm-up step is running (it counts in the queue depth).
    busy: bool,
    /// Open documents, roots and recent lines: what project context is chosen from.
    project: Project,
    /// Token counts of the chunks choices considered, for the loaded model.
    chunk_tokens: ChunkTokens,
}

/// Token counts of project-context chunks, kept between choices: one
/// document's choices consider mostly the same chunks, and tokenizing them
/// was about half of a choice's 10–20 ms, run in one step a keystroke may
/// wait for. Valid for one model's tokenizer (cleared when one loads).
#[derive(Default)]
struct ChunkTokens(RefCell<HashMap<u64, usize>>);

impl ChunkTokens {
    /// Counts kept at most (a few hundred KiB); all are dropped beyond.
    const MAX: usize = 1 << 14;

    /// [`completion::chunk_tokens`], remembered by the chunk's path and text.
    fn count(&self, engine: &Engine, c: &Chunk) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&c.path, &c.text).hash(&mut h);
        let key = h.finish();
        if let Some(&n) = self.0.borrow().get(&key) {
            return n;
        }
        let n = completion::chunk_tokens(engine, c);
        let mut counts = self.0.borrow_mut();
        if counts.len() >= Self::MAX {
            counts.clear();
        }
        counts.insert(key, n);
        n
    }

    fn clear(&self) {
        self.0.borrow_mut().clear();
    }
}

impl Worker {
    fn new(config: Config, events: UnboundedSender<Event>, rx: Receiver<Job>, shared: Shared) -> Self {
        Worker {
            config,
            engine: None,
            model_state: ModelState::Loading,
            model_error: None,
            model_path: None,
            docs: HashMap::new(),
            events,
            rx,
            shared,
            completions: VecDeque::new(),
            warm: VecDeque::new(),
            after_pause: VecDeque::new(),
            last_typed: None,
            focused: None,
            busy: false,
            project: Project::default(),
            chunk_tokens: ChunkTokens::default(),
        }
    }

    fn run(mut self) {
        if self.config.backend.is_remote() {
            self.model_state = ModelState::Unloaded;
        } else {
            self.load_model();
        }
        loop {
            self.publish();
            if self.completions.is_empty() && self.warm.is_empty() {
                let job = match self.until_quiet() {
                    None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    Some(wait) => self.rx.recv_timeout(wait),
                };
                match job {
                    Ok(job) => self.accept(job),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.accept(job);
            }
            self.resume_after_pause();
            self.step();
        }
    }

    /// How long until typing has paused for [`QUIET`], when warm-ups wait
    /// for it (`None`: none waits).
    fn until_quiet(&self) -> Option<Duration> {
        (!self.after_pause.is_empty()).then(|| self.pause_left())
    }

    /// How much longer typing must pause to last [`QUIET`] (zero: it has).
    fn pause_left(&self) -> Duration {
        pause_left(self.last_typed)
    }

    /// Typing paused: the warm-ups that waited for it go on.
    fn resume_after_pause(&mut self) {
        if self.until_quiet() == Some(Duration::ZERO) {
            let waited = std::mem::take(&mut self.after_pause);
            self.warm.extend(waited);
        }
    }

    /// Run the next piece of work: the oldest completion, else one chunk of
    /// the next warm-up; then keep the caches within the memory budget.
    fn step(&mut self) {
        if let Some(job) = self.completions.pop_front() {
            self.busy = true;
            self.publish();
            let uri = job.uri.clone();
            self.guarded(&uri, |w| w.complete(job));
        } else if let Some((uri, rope, cursor)) = self.next_warm() {
            self.busy = true;
            self.publish();
            match self.guarded(&uri, |w| w.warm_step(&uri, &rope, cursor)) {
                Some(Warmed::More) => self.warm.push_back((uri, rope, cursor)),
                Some(Warmed::AfterPause) => self.after_pause.push_back((uri, rope, cursor)),
                Some(Warmed::Done) | None => {}
            }
        }
        self.busy = false;
        self.enforce_budget(self.config.cache.memory_budget_bytes() as usize);
    }

    /// Run a job step, turning a panic into a report; the document's cache,
    /// possibly half-updated, is dropped.
    fn guarded<T>(&mut self, uri: &str, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(v) => Some(v),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                self.docs.remove(uri);
                let _ = self.events.send(Event::Error(format!("internal error while working on {uri}: {msg}")));
                None
            }
        }
    }

    fn accept(&mut self, job: Job) {
        self.shared.queue_depth.fetch_sub(1, Ordering::SeqCst);
        match job {
            Job::Complete(job) => {
                // The newest request for a document supersedes older ones.
                let (old, keep): (Vec<_>, Vec<_>) = self.completions.drain(..).partition(|j| j.uri == job.uri);
                self.completions = keep.into();
                for j in old {
                    j.cancel.store(true, Ordering::SeqCst);
                    let _ = j.reply.send(Err(CompletionError::Superseded));
                }
                self.project.saw(&job.uri, &job.rope, job.cursor);
                self.last_typed = Some(job.received);
                self.completions.push_back(job);
            }
            Job::Warm { uri, rope, cursor, focus } => {
                self.project.saw(&uri, &rope, cursor);
                self.forget_warm(&uri);
                if focus {
                    // The editor reports a cursor at rest.
                    self.focused = Some(uri.clone());
                } else {
                    // An edit (or an open).
                    self.last_typed = Some(Instant::now());
                }
                self.warm.push_back((uri, rope, cursor));
            }
            Job::Close { uri } => {
                self.project.close(&uri);
                self.forget_warm(&uri);
                if self.focused.as_deref() == Some(uri.as_str()) {
                    self.focused = None;
                }
                if self.docs.remove(&uri).is_some_and(|d| d.allocated_bytes() >= RELEASE_MIN_BYTES) {
                    release_free_memory();
                }
            }
            Job::Configure(config) => self.configure(*config),
            Job::Workspace { roots } => self.project.set_roots(roots),
        }
    }

    /// Drop the warm-ups queued for `uri` (a newer one replaces them).
    fn forget_warm(&mut self, uri: &str) {
        self.warm.retain(|(u, _, _)| u != uri);
        self.after_pause.retain(|(u, _, _)| u != uri);
    }

    fn configure(&mut self, config: Config) {
        let old = std::mem::replace(&mut self.config, config);
        if old.completion.context_tokens != self.config.completion.context_tokens {
            self.project.invalidate();
        }
        if old.attention != self.config.attention || old.cache.enabled != self.config.cache.enabled {
            self.docs.clear();
        }
        let backend = &self.config.backend;
        let unload = old.model != self.config.model
            || (backend.is_remote() && !backend.fallback_to_local && self.engine.is_some());
        if unload {
            self.docs.clear();
            self.engine = None;
            self.model_error = None;
            self.model_state = ModelState::Unloaded;
        }
        if !self.config.backend.is_remote() && self.model_state == ModelState::Unloaded {
            self.load_model();
        }
    }

    /// The configured policy, or the merged adapter's trained one while the
    /// `attention` settings are at their defaults.
    fn policy(&self) -> AttentionPolicy {
        let a = &self.config.attention;
        // The settings are range-checked, so this holds; else the defaults.
        let configured = AttentionPolicy::from_spec(a)
            .or_else(|_| AttentionPolicy::from_spec(&crate::config::AttentionConfig::default()))
            .expect("the default attention settings make a policy");
        match &self.engine {
            Some(engine) => engine.policy(configured, *a == crate::config::AttentionConfig::default()),
            None => configured,
        }
    }

    fn settings(&self) -> Settings {
        Settings::from(&self.config.completion)
    }

    fn progress(&self, message: impl Into<String>, percentage: Option<u32>, done: bool) {
        let _ = self.events.send(Event::Progress { message: message.into(), percentage, done });
    }

    fn load_model(&mut self) {
        let path = match self.config.model.path.clone() {
            Some(p) => p,
            None => {
                let default = models::default_model_path();
                if !default.exists() {
                    self.model_state = ModelState::Pulling;
                    self.publish();
                    self.progress("pulling the default model", Some(0), false);
                    let events = self.events.clone();
                    let pulled = models::pull_default(&mut |p| {
                        let _ = events.send(Event::Progress { message: p.to_string(), percentage: None, done: false });
                    });
                    if let Err(e) = pulled {
                        return self.model_failed(format!("cannot pull the default model: {e:#}"));
                    }
                }
                default
            }
        };
        self.model_state = ModelState::Loading;
        self.model_path = Some(path.clone());
        self.publish();
        self.progress(format!("loading {}", path.display()), Some(50), false);
        let t0 = Instant::now();
        let loaded = Adapter::choose(self.config.model.adapter.as_deref())
            .and_then(|adapter| Engine::load_adapted(&path, adapter));
        match loaded {
            Ok(engine) => {
                self.engine = Some(engine);
                self.chunk_tokens.clear();
                self.model_state = ModelState::Ready;
                self.model_error = None;
                self.progress(format!("model ready ({:.1}s)", t0.elapsed().as_secs_f64()), Some(100), true);
                let _ = self.events.send(Event::Log(format!("loaded {} in {:?}", path.display(), t0.elapsed())));
            }
            Err(e) => self.model_failed(format!("cannot load the model {}: {e:#}", path.display())),
        }
    }

    fn model_failed(&mut self, message: String) {
        self.engine = None;
        self.model_state = ModelState::Error;
        self.model_error = Some(message.clone());
        self.progress("model unavailable", None, true);
        let _ = self.events.send(Event::Error(message));
    }

    /// The engine, loading it first when a remote engine is down and
    /// `fallbackToLocal` asked for it.
    fn engine(&mut self) -> Result<&Engine, CompletionError> {
        if self.engine.is_none() && self.model_state == ModelState::Unloaded {
            self.load_model();
        }
        self.engine.as_ref().ok_or_else(|| {
            CompletionError::ModelUnavailable(
                self.model_error.clone().unwrap_or_else(|| "the model is still loading".into()),
            )
        })
    }

    /// The document's state, created on first use (and anew for every use
    /// while `cache.enabled` is off), marked used now.
    fn doc(&mut self, uri: &str) -> Result<(&Engine, &mut DocState), CompletionError> {
        let policy = self.policy();
        self.engine()?;
        let engine = self.engine.as_ref().expect("loaded above");
        let doc = self.docs.entry(uri.to_string()).or_insert_with(|| new_doc(engine, policy));
        if !self.config.cache.enabled {
            // No reuse between requests; the project context stays.
            let (context, files) = (doc.cache.context().to_vec(), std::mem::take(&mut doc.context_files));
            *doc = new_doc(engine, policy);
            doc.cache.set_context(context);
            doc.context_files = files;
        }
        doc.last_used = Instant::now();
        Ok((engine, doc))
    }

    fn complete(&mut self, job: CompleteJob) {
        if job.cancel.load(Ordering::SeqCst) {
            let _ = job.reply.send(Err(CompletionError::Cancelled));
            return;
        }
        let cursor = job.cursor.min(job.rope.len_bytes());
        let result = self.complete_inner(&job.uri, &job.rope, cursor, &job.cancel, job.received);
        // A slow answer is no pause: the user waited for it, and types on
        // once it shows.
        self.last_typed = Some(Instant::now());
        if let Ok(c) = &result {
            self.shared.record_latency(c.latency_ms);
        }
        // A status asked right after the answer sees this completion, done.
        self.busy = false;
        self.publish();
        let _ = job.reply.send(result);
    }

    fn complete_inner(
        &mut self,
        uri: &str,
        rope: &Rope,
        cursor: usize,
        cancel: &AtomicBool,
        received: Instant,
    ) -> Result<Completed, CompletionError> {
        let settings = self.settings();
        let (engine, doc) = self.doc(uri)?;
        let failed = |e: anyhow::Error| CompletionError::Failed(format!("{e:#}"));
        if let Some(staged) = doc.staged.as_mut() {
            // A new context still filling serves this completion only if it
            // needs no more work than the cache in use.
            doc.session.prepare_local(engine, &mut doc.cache, rope, cursor, &settings).map_err(failed)?;
            staged.session.prepare_local(engine, &mut staged.cache, rope, cursor, &settings).map_err(failed)?;
            if staged.cache.pending() <= doc.cache.pending() {
                doc.promote();
            }
        }
        let cancelled = || cancel.load(Ordering::SeqCst);
        let s =
            doc.session.complete_local(engine, &mut doc.cache, rope, cursor, &settings, &cancelled).map_err(failed)?;
        doc.last_reused = s.reused;
        if s.stop == Some(StopReason::Cancelled) {
            return Err(CompletionError::Cancelled);
        }
        Ok(Completed {
            text: s.text,
            latency_ms: received.elapsed().as_secs_f64() * 1000.0,
            typed_through: s.typed_through,
            reused_tokens: s.reused,
            prefilled_tokens: s.prefilled,
            generated: Some((s.tokens, s.decode_time.as_secs_f64() * 1000.0)),
        })
    }

    /// The next warm-up to advance: the focused document's while it has one,
    /// else the others' in turn.
    fn next_warm(&mut self) -> Option<(String, Rope, usize)> {
        let focused = self.focused.as_deref();
        let at = self.warm.iter().position(|(u, _, _)| Some(u.as_str()) == focused).unwrap_or(0);
        self.warm.remove(at)
    }

    /// One step of warm-up, and what remains. The cache completions use
    /// fills first, a chunk a step. Then, once typing pauses, the project
    /// context is chosen again if its inputs changed; a different one fills a
    /// staged cache, a chunk a step, which replaces the cache in use once
    /// warm. A document without a warm cache takes its context at once.
    fn warm_step(&mut self, uri: &str, rope: &Rope, cursor: usize) -> Warmed {
        let cursor = cursor.min(rope.len_bytes());
        let budget = self.config.completion.context_tokens;
        let settled = self.config.cache.enabled
            && self.docs.get(uri).is_some_and(|d| d.context_chosen && !d.cache.kv().is_empty());
        if !settled {
            self.refresh_context(uri, rope, cursor);
        }
        if !self.config.cache.enabled || self.engine.is_none() {
            return Warmed::Done;
        }
        let stale = settled && self.project.stale(uri, rope, cursor, budget);
        let quiet = self.pause_left().is_zero();
        // A staged fill gives way to any job that arrives (a keystroke's
        // edit comes just before its completion request).
        let waiting = self.shared.queue_depth.clone();
        let job_waits = move || waiting.load(Ordering::SeqCst) > 0;
        let settings = self.settings();
        let Ok((engine, doc)) = self.doc(uri) else { return Warmed::Done };
        if doc.session.prepare_local(engine, &mut doc.cache, rope, cursor, &settings).is_err() {
            return Warmed::Done;
        }
        if doc.cache.pending() > 0 {
            return match doc.cache.prefill(&engine.model, WARM_CHUNK) {
                Ok(_) => Warmed::More,
                Err(e) => self.warm_failed(uri, e),
            };
        }
        let context_work = stale || doc.staged.is_some();
        if context_work && !quiet {
            return Warmed::AfterPause;
        }
        if stale {
            self.refresh_context(uri, rope, cursor);
            return Warmed::More;
        }
        let before = doc.allocated_bytes();
        if let Some(staged) = doc.staged.as_mut() {
            if staged.session.prepare_local(engine, &mut staged.cache, rope, cursor, &settings).is_err() {
                doc.staged = None;
                return Warmed::Done;
            }
            match staged.cache.prefill_until(&engine.model, STAGED_CHUNK, &job_waits) {
                Ok(_) => {}
                // Taken up again after the job (when typing pauses again).
                Err(e) if e.is::<Interrupted>() => return Warmed::More,
                Err(e) => {
                    doc.staged = None;
                    return self.warm_failed(uri, e);
                }
            }
            if staged.cache.pending() > 0 {
                return Warmed::More;
            }
            doc.promote();
        }
        // Warm and idle: keep only what the policy keeps.
        doc.cache.settle();
        if before.saturating_sub(doc.allocated_bytes()) >= RELEASE_MIN_BYTES {
            release_free_memory();
        }
        Warmed::Done
    }

    fn warm_failed(&self, uri: &str, e: anyhow::Error) -> Warmed {
        let _ = self.events.send(Event::Log(format!("warm-up of {uri} failed: {e:#}")));
        Warmed::Done
    }

    /// Choose the document's project context again if what it depends on
    /// changed (see [`Project`]); runs in warm-up only, so a keystroke never
    /// waits for it. A different context goes into a staged cache (see
    /// [`Staged`]) unless the cache is off.
    fn refresh_context(&mut self, uri: &str, rope: &Rope, cursor: usize) {
        let budget = self.config.completion.context_tokens;
        let Some(engine) = &self.engine else { return };
        let chosen_here = self.docs.get(uri).is_some_and(|d| d.context_chosen);
        if chosen_here && !self.project.stale(uri, rope, cursor, budget) {
            return;
        }
        let started = Instant::now();
        let counts = &self.chunk_tokens;
        let chosen = self.project.choose(uri, rope, cursor, budget, &|c| counts.count(engine, c));
        let tokens = match completion::context_tokens(engine, &chosen.set, chosen.shown_path.as_deref()) {
            Ok(tokens) => tokens,
            Err(e) => {
                let _ = self.events.send(Event::Log(format!("project context for {uri} failed: {e:#}")));
                Vec::new()
            }
        };
        let policy = self.policy();
        let doc = self.docs.entry(uri.to_string()).or_insert_with(|| new_doc(engine, policy));
        doc.context_chosen = true;
        let files = chosen.set.files();
        if doc.cache.context() == tokens.as_slice() {
            doc.context_files = files;
            doc.staged = None;
            return;
        }
        if let Some(staged) = doc.staged.as_mut().filter(|s| s.cache.context() == tokens.as_slice()) {
            staged.context_files = files;
            return;
        }
        let shown: Vec<String> = files.iter().map(|(f, n)| format!("{f} ({n} bytes)")).collect();
        let _ = self.events.send(Event::Log(format!(
            "project context for {uri}: {} tokens from {} in {} ms",
            tokens.len(),
            if shown.is_empty() { "no files".to_string() } else { shown.join(", ") },
            started.elapsed().as_millis()
        )));
        // A cache that holds nothing yet (a document just opened) has no
        // completion to protect: it takes the context at once.
        if !self.config.cache.enabled || doc.cache.kv().is_empty() {
            doc.cache.set_context(tokens);
            doc.context_files = files;
            doc.staged = None;
            return;
        }
        let mut cache = new_cache(engine, policy);
        cache.set_context(tokens);
        doc.staged = Some(Staged { cache, session: doc.session.clone(), context_files: files });
    }

    /// Drop least-recently-used document caches until all fit the budget.
    fn enforce_budget(&mut self, budget: usize) {
        let mut dropped = false;
        loop {
            let total: usize = self.docs.values().map(DocState::allocated_bytes).sum();
            if total <= budget || self.docs.len() <= 1 {
                if dropped {
                    release_free_memory();
                }
                return;
            }
            let oldest = self.docs.iter().min_by_key(|(_, d)| d.last_used).map(|(u, _)| u.clone());
            if let Some(uri) = oldest {
                self.docs.remove(&uri);
                dropped = true;
                let _ = self.events.send(Event::Log(format!("cache budget: dropped the cache of {uri}")));
            }
        }
    }

    /// Make the current state what status reports ([`WorkerHandle::status`]).
    fn publish(&self) {
        *lock(&self.shared.snapshot) = Some(self.status());
    }

    /// The state of the thread's side; `queue_depth` counts the jobs taken
    /// up and not yet done, the running one included (the handle adds those
    /// not yet taken up).
    fn status(&self) -> WorkerStatus {
        let documents: Vec<DocumentStatus> = self
            .docs
            .iter()
            .map(|(uri, d)| {
                let s = d.cache.stats();
                DocumentStatus {
                    uri: uri.clone(),
                    tokens: s.tokens,
                    anchors: s.kv.anchors,
                    kept_entries: s.kv.kept_entries,
                    kv_bytes: s.kv.kv_bytes,
                    pending_tokens: s.pending_tokens,
                    reused_tokens: d.last_reused,
                    context_tokens: d.cache.context().len(),
                    context_files: d.context_files.clone(),
                }
            })
            .collect();
        WorkerStatus {
            model_path: self.model_path.clone(),
            default_model: self.config.model.path.is_none(),
            model_state: self.model_state.clone(),
            model_error: self.model_error.clone(),
            policy: self.policy().to_json(),
            cache_bytes: self.docs.values().map(DocState::allocated_bytes).sum(),
            cache_budget_bytes: self.config.cache.memory_budget_bytes() as usize,
            queue_depth: self.completions.len() + self.warm.len() + self.after_pause.len() + usize::from(self.busy),
            last_latencies_ms: lock(&self.shared.latencies).iter().copied().collect(),
            backend: self.shared.route().map_or_else(|| json!({ "kind": "local" }), |r| r.status()),
            documents,
        }
    }
}

fn new_cache(engine: &Engine, policy: AttentionPolicy) -> DocumentCache {
    let mut cache = DocumentCache::new(&engine.model, policy);
    cache.set_eviction_slack(EVICTION_SLACK_LINES);
    cache
}

fn new_doc(engine: &Engine, policy: AttentionPolicy) -> DocState {
    DocState {
        cache: new_cache(engine, policy),
        session: Session::default(),
        last_used: Instant::now(),
        last_reused: 0,
        context_files: Vec::new(),
        context_chosen: false,
        staged: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scheduling tests: a worker driven step by step (no thread) with the
    /// random-weight tiny model and the test tokenizer.
    mod scheduling {
        use super::*;
        use crate::engine::document::tests::test_tokenizer;
        use crate::engine::llama::tests::tiny_config;
        use crate::engine::llama::Llama;
        use tokio::sync::mpsc::UnboundedReceiver;

        struct Harness {
            worker: Worker,
            events: UnboundedReceiver<Event>,
            _jobs: Sender<Job>,
        }

        fn harness() -> Harness {
            let tokenizer = test_tokenizer();
            let model = Llama::random(tiny_config(tokenizer.vocab_size()), 9).unwrap();
            let engine = Engine { model, tokenizer, path: PathBuf::from("tiny"), adapter_policy: None };
            let (jobs, rx) = mpsc::channel();
            let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
            let mut config = Config::default();
            config.completion.max_tokens = 8;
            let mut worker = Worker::new(config, events_tx, rx, Shared::default());
            worker.engine = Some(engine);
            worker.model_state = ModelState::Ready;
            Harness { worker, events, _jobs: jobs }
        }

        fn text(seed: usize, lines: usize) -> String {
            (0..lines).map(|i| format!("def f{seed}_{i}(x):\n    return x + {i}\n")).collect()
        }

        type Answer = oneshot::Receiver<Result<Completed, CompletionError>>;

        fn complete(uri: &str, text: &str) -> (Job, Answer) {
            let (reply, answer) = oneshot::channel();
            let rope = Rope::from_str(text);
            let job = CompleteJob {
                uri: uri.into(),
                cursor: rope.len_bytes(),
                rope,
                cancel: Arc::new(AtomicBool::new(false)),
                reply,
                received: Instant::now(),
            };
            (Job::Complete(job), answer)
        }

        fn accept(w: &mut Worker, job: Job) {
            // `accept` counts down what `WorkerHandle::to_thread` counted up.
            w.shared.queue_depth.fetch_add(1, Ordering::SeqCst);
            w.accept(job);
        }

        /// Run warm-up steps until none is left to run now.
        fn warm_up(w: &mut Worker) {
            while !w.warm.is_empty() {
                w.step();
            }
        }

        /// The user stops typing: warm-up runs to the end, project context included.
        fn pause(w: &mut Worker) {
            w.last_typed = None;
            w.resume_after_pause();
            warm_up(w);
            assert!(w.after_pause.is_empty());
        }

        #[test]
        fn the_newest_request_per_document_wins_and_others_keep_their_turn() {
            let mut h = harness();
            let w = &mut h.worker;
            let (a, mut a_answer) = complete("file:///a.py", &text(1, 20));
            let (b, mut b_answer) = complete("file:///a.py", &text(2, 20));
            let (c, mut c_answer) = complete("file:///c.py", &text(3, 20));
            for job in [a, b, c] {
                accept(w, job);
            }
            // The older request for a.py is answered at once, before any model work.
            assert_eq!(a_answer.try_recv().unwrap(), Err(CompletionError::Superseded));
            assert_eq!(w.status().queue_depth, 2);
            w.step();
            assert!(b_answer.try_recv().unwrap().is_ok(), "the newest a.py request runs first (queued before c.py)");
            assert!(c_answer.try_recv().is_err(), "c.py waits its turn");
            w.step();
            assert!(c_answer.try_recv().unwrap().is_ok());
            assert_eq!(w.status().queue_depth, 0);
        }

        #[test]
        fn a_completion_goes_before_the_rest_of_a_warm_up() {
            let mut h = harness();
            let w = &mut h.worker;
            let long = text(4, 200);
            let rope = Rope::from_str(&long);
            let warm = Job::Warm { uri: "file:///long.py".into(), cursor: rope.len_bytes(), rope, focus: false };
            accept(w, warm);
            w.step();
            let pending = w.docs["file:///long.py"].cache.pending();
            assert!(pending > 0, "a warm-up runs one chunk a step");
            let (job, mut answer) = complete("file:///other.py", &text(5, 5));
            accept(w, job);
            w.step();
            assert!(answer.try_recv().unwrap().is_ok(), "the completion ran in the next step");
            assert_eq!(w.docs["file:///long.py"].cache.pending(), pending, "the warm-up waited");
            warm_up(w);
            assert_eq!(w.docs["file:///long.py"].cache.pending(), 0, "and then finished");
        }

        #[test]
        fn chunk_token_counts_are_the_tokenizers_and_remembered() {
            let h = harness();
            let engine = h.worker.engine.as_ref().unwrap();
            let counts = ChunkTokens::default();
            let chunk = |path: &str, text: &str| Chunk {
                path: path.into(),
                line: 0,
                text: text.into(),
                source: crate::context::Source::Import,
            };
            let a = chunk("pkg/a.py", "def area(r):\n    return r * r\n");
            let b = chunk("pkg/b.py", "def area(r):\n    return r * r\n");
            let c = chunk("pkg/a.py", "def area_of_circle(radius):\n    return 3.14 * radius * radius\n");
            for x in [&a, &b, &c, &a, &c] {
                assert_eq!(counts.count(engine, x), completion::chunk_tokens(engine, x), "{x:?}");
            }
            assert_eq!(counts.0.borrow().len(), 3, "each chunk (path and text) counted once");
            counts.clear();
            assert!(counts.0.borrow().is_empty());
        }

        #[test]
        fn a_pause_counts_from_the_answer_not_from_a_slow_request() {
            let mut h = harness();
            let w = &mut h.worker;
            let (job, mut answer) = complete("file:///a.py", &text(1, 5));
            let Job::Complete(mut job) = job else { unreachable!() };
            // Sent long ago: the model was busy, or the prompt long.
            job.received = Instant::now().checked_sub(QUIET * 4).unwrap();
            accept(w, Job::Complete(job));
            assert!(w.pause_left().is_zero(), "the request alone is long past");
            w.step();
            assert!(answer.try_recv().unwrap().is_ok());
            assert!(!w.pause_left().is_zero(), "the user saw the answer just now and types on");
        }

        #[test]
        fn warm_up_puts_the_imported_files_definitions_in_the_lead_and_keeps_them_while_typing() {
            let dir = std::env::temp_dir().join(format!("anchorcoder-worker-ctx-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("helpers.py"), "def parse_header(line):\n    return line.split(':', 1)\n").unwrap();
            let mut h = harness();
            let w = &mut h.worker;
            accept(w, Job::Workspace { roots: vec![dir.clone()] });
            let uri = format!("file://{}/main.py", dir.display());
            let text = "from helpers import parse_header\n\ndef handle(line):\n    return parse_header(";
            let warm = |t: &str| {
                let rope = Rope::from_str(t);
                Job::Warm { uri: uri.clone(), cursor: rope.len_bytes(), rope, focus: true }
            };
            accept(w, warm(text));
            w.step();
            let doc = &w.docs[&uri];
            assert!(
                doc.staged.is_none() && !doc.cache.context().is_empty(),
                "a new document takes its context at once"
            );
            warm_up(w);
            let doc = &w.status().documents[0];
            let definition = "def parse_header(line):\n    return line.split(':', 1)\n";
            assert_eq!(doc.context_files, [("helpers.py".to_string(), definition.len())]);
            assert!(doc.context_tokens > 0 && doc.pending_tokens == 0, "{doc:?}");
            let lead = w.docs[&uri].cache.lead().to_vec();
            let engine = w.engine.as_ref().unwrap();
            let shown = engine.tokenizer.decode(&lead);
            assert!(shown.contains("def parse_header") && shown.contains("main.py"), "{shown:?}");

            // Typing does not choose again: the next completion reuses the whole warm prefix.
            let (job, mut answer) = complete(&uri, &format!("{text}line"));
            accept(w, job);
            w.step();
            let done = answer.try_recv().unwrap().unwrap();
            assert!(done.reused_tokens >= lead.len(), "{done:?}");
            assert_eq!(w.docs[&uri].cache.lead(), lead.as_slice());

            // contextTokens = 0 turns it off at the next pause.
            let mut config = w.config.clone();
            config.completion.context_tokens = 0;
            accept(w, Job::Configure(Box::new(config)));
            accept(w, warm(text));
            warm_up(w);
            assert!(w.status().documents[0].context_tokens > 0, "not while typing");
            pause(w);
            assert_eq!(w.status().documents[0].context_tokens, 0);
            let _ = std::fs::remove_dir_all(&dir);
        }

        #[test]
        fn a_new_context_fills_beside_the_cache_in_use_and_no_keystroke_pays_for_it() {
            let dir = std::env::temp_dir().join(format!("anchorcoder-worker-staged-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let helpers: String = (0..12).map(|i| format!("def helper_{i}(line):\n    return line[{i}:]\n")).collect();
            std::fs::write(dir.join("helpers.py"), helpers).unwrap();
            let mut h = harness();
            let w = &mut h.worker;
            accept(w, Job::Workspace { roots: vec![dir.clone()] });
            let uri = format!("file://{}/main.py", dir.display());
            // The document is open and warm without an import; then the user types one.
            let body = format!("{}def handle(line):\n    return helper_3(", text(1, 12));
            let rope = Rope::from_str(&body);
            accept(w, Job::Warm { uri: uri.clone(), cursor: rope.len_bytes(), rope, focus: true });
            pause(w);
            assert!(w.docs[&uri].cache.context().is_empty() && w.docs[&uri].cache.pending() == 0);
            let text = format!("from helpers import helper_3\n\n{body}");
            let typed = |w: &mut Worker, t: &str| {
                let rope = Rope::from_str(t);
                accept(w, Job::Warm { uri: uri.clone(), cursor: rope.len_bytes(), rope, focus: false });
                warm_up(w);
            };
            typed(w, &text);
            let doc = &w.docs[&uri];
            assert!(doc.staged.is_none() && doc.cache.pending() == 0, "while typing, only the cache in use warms");
            assert_eq!(w.after_pause.len(), 1, "choosing waits for a pause");
            assert_eq!(w.status().queue_depth, 1, "and counts as queued work");

            // A pause: the new context is chosen and staged, one step after another.
            w.last_typed = None;
            w.resume_after_pause();
            w.step();
            let doc = &w.docs[&uri];
            let staged = doc.staged.as_ref().expect("the chosen context is staged");
            assert!(!staged.cache.context().is_empty());
            assert!(doc.cache.context().is_empty(), "the cache in use keeps its (empty) context");
            assert_eq!(staged.cache.kv().len(), 0, "chosen in one step, filled in the next ones");
            w.step();
            let filled = w.docs[&uri].staged.as_ref().unwrap().cache.kv().len();
            assert!(filled > 0 && w.docs[&uri].staged.as_ref().unwrap().cache.pending() > 0);
            // A job sent and not yet taken up interrupts a staged step, which
            // keeps nothing of it and is taken up again later.
            w.shared.queue_depth.fetch_add(1, Ordering::SeqCst);
            w.step();
            assert_eq!(w.docs[&uri].staged.as_ref().unwrap().cache.kv().len(), filled, "the step gave way");
            assert_eq!(w.warm.len(), 1, "and waits its turn");
            w.shared.queue_depth.fetch_sub(1, Ordering::SeqCst);

            // A keystroke now: the cache in use needs less work, so it serves,
            // and the staged one waits for the next pause.
            let (job, mut answer) = complete(&uri, &format!("{text}l"));
            accept(w, job);
            w.step();
            assert!(answer.try_recv().unwrap().is_ok());
            typed(w, &format!("{text}l"));
            let doc = &w.docs[&uri];
            assert!(doc.cache.context().is_empty() && doc.staged.is_some(), "the keystroke took no new context");
            assert_eq!(doc.cache.pending(), 0);
            assert_eq!(doc.staged.as_ref().unwrap().cache.kv().len(), filled, "no staged work while typing");

            // Idle: the staged cache fills and replaces it.
            pause(w);
            let doc = &w.docs[&uri];
            assert!(doc.staged.is_none() && !doc.cache.context().is_empty(), "promoted once warm");
            assert_eq!(doc.context_files[0].0, "helpers.py");
            assert_eq!(doc.cache.pending(), 0);
            let lead = doc.cache.lead().len();
            let (job, mut answer) = complete(&uri, &format!("{text}li"));
            accept(w, job);
            w.step();
            let done = answer.try_recv().unwrap().unwrap();
            assert!(done.reused_tokens > lead, "the warm window was reused: {done:?}");
            let _ = std::fs::remove_dir_all(&dir);
        }

        #[test]
        fn the_memory_budget_drops_the_least_recently_used_caches() {
            let mut h = harness();
            let w = &mut h.worker;
            for (i, uri) in ["file:///1.py", "file:///2.py", "file:///3.py"].iter().enumerate() {
                let (job, mut answer) = complete(uri, &text(10 + i, 30));
                accept(w, job);
                w.step();
                assert!(answer.try_recv().unwrap().is_ok());
            }
            // 1.py is used again: 2.py is now the least recently used.
            let (job, _answer) = complete("file:///1.py", &text(10, 31));
            accept(w, job);
            w.step();
            let bytes = |w: &Worker, uri: &str| w.docs[uri].cache.stats().kv.allocated_bytes;
            let two_newest = bytes(w, "file:///1.py") + bytes(w, "file:///3.py");
            w.enforce_budget(two_newest);
            let mut kept: Vec<&str> = w.docs.keys().map(String::as_str).collect();
            kept.sort();
            assert_eq!(kept, ["file:///1.py", "file:///3.py"]);
            // However small the budget, the document in use keeps its cache.
            w.enforce_budget(0);
            assert_eq!(w.docs.keys().collect::<Vec<_>>(), ["file:///1.py"]);
        }

        /// The document's session lives with its cache: typing the beginning
        /// of the shown suggestion is answered from it without the model, and
        /// with `cache.enabled` off every request starts over.
        #[test]
        fn typing_the_shown_suggestion_is_answered_without_the_model() {
            let mut h = harness();
            let w = &mut h.worker;
            let doc = "x = [1, 2, 3]\ny = x";
            let (job, mut answer) = complete("file:///t.py", doc);
            accept(w, job);
            w.step();
            let first = answer.try_recv().unwrap().unwrap();
            assert!(!first.typed_through);
            // The random weights' greedy choice for this text (seed 9).
            let mut chars = first.text.chars();
            let c = chars.next().filter(|c| !c.is_whitespace() && chars.as_str().trim().len() > 1);
            let c = c.unwrap_or_else(|| panic!("too short a suggestion for this test: {:?}", first.text));
            let typed = format!("{doc}{c}");
            let (job, mut answer) = complete("file:///t.py", &typed);
            accept(w, job);
            w.step();
            let second = answer.try_recv().unwrap().unwrap();
            assert!(second.typed_through && second.prefilled_tokens == 0, "{second:?}");
            assert_eq!(second.text, first.text[c.len_utf8()..]);

            w.config.cache.enabled = false;
            let (job, mut answer) = complete("file:///t.py", doc);
            accept(w, job);
            w.step();
            assert_eq!(answer.try_recv().unwrap().unwrap().text, first.text, "greedy: the same suggestion");
            let (job, mut answer) = complete("file:///t.py", &typed);
            accept(w, job);
            w.step();
            assert!(!answer.try_recv().unwrap().unwrap().typed_through, "no cache, no session: the model ran");
        }

        #[test]
        fn a_panicking_job_drops_that_documents_cache_and_the_worker_goes_on() {
            let mut h = harness();
            let (job, _) = complete("file:///p.py", &text(6, 5));
            accept(&mut h.worker, job);
            h.worker.step();
            assert!(h.worker.docs.contains_key("file:///p.py"));
            let r = h.worker.guarded("file:///p.py", |_| -> () { panic!("boom") });
            assert!(r.is_none());
            assert!(!h.worker.docs.contains_key("file:///p.py"), "its possibly half-updated cache is gone");
            let reported = std::iter::from_fn(|| h.events.try_recv().ok())
                .any(|e| matches!(&e, Event::Error(m) if m.contains("internal error") && m.contains("boom")));
            assert!(reported, "the panic is reported");
            let (job, mut answer) = complete("file:///p.py", &text(6, 5));
            accept(&mut h.worker, job);
            h.worker.step();
            assert!(answer.try_recv().unwrap().is_ok(), "the next request is served");
        }
    }
}
