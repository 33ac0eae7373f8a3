//! The background worker: one thread owns the model and every document's KV
//! cache. The LSP side sends [`Job`]s over a channel and never blocks on the
//! model; results come back on one-shot channels, events (progress, errors,
//! logs) on an event channel.
//!
//! Scheduling: completions first, in arrival order, a newer one for a
//! document cancelling the older; cache warm-up (prefill of a document's
//! window) in chunks when nothing else waits. A panic in a job is caught and
//! reported; that document's cache is dropped and the worker goes on. If the
//! thread dies anyway, [`WorkerHandle::send`] starts a new one.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ropey::Rope;
use tokio::sync::{mpsc::UnboundedSender, oneshot};

use crate::completion::{self, Prompt, Settings};
use crate::config::Config;
use crate::engine::document::DocumentCache;
use crate::engine::policy::AttentionPolicy;
use crate::engine::Engine;
use crate::models;

/// Tokens prefilled per warm-up step: the longest a completion waits for
/// warm-up to yield.
const WARM_CHUNK: usize = 64;
/// Lines of full K/V kept beyond the policy's recent lines, so edits just
/// above the cursor stay incremental.
const EVICTION_SLACK_LINES: u32 = 8;
/// Latencies remembered for status.
const LATENCY_HISTORY: usize = 32;

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
    pub reply: oneshot::Sender<Result<Completed, String>>,
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
}

/// Work for the worker.
pub enum Job {
    /// Suggest text at a cursor.
    Complete(CompleteJob),
    /// Prefill a document's window in idle time (cursor: where the user is
    /// probably typing).
    Warm { uri: String, rope: Rope, cursor: usize },
    /// Forget a document and free its cache.
    Close { uri: String },
    /// Apply a new configuration.
    Configure(Box<Config>),
    /// Report the worker's state.
    Status(oneshot::Sender<WorkerStatus>),
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
}

/// The LSP side's end of the worker: cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    inner: Arc<Mutex<Sender<Job>>>,
    queue_depth: Arc<AtomicUsize>,
    config: Arc<Mutex<Config>>,
    events: UnboundedSender<Event>,
}

impl WorkerHandle {
    /// Start the worker thread; it loads (or pulls) the model first.
    pub fn spawn(config: Config, events: UnboundedSender<Event>) -> WorkerHandle {
        let queue_depth = Arc::new(AtomicUsize::new(0));
        let tx = start_thread(config.clone(), events.clone(), queue_depth.clone());
        WorkerHandle { inner: Arc::new(Mutex::new(tx)), queue_depth, config: Arc::new(Mutex::new(config)), events }
    }

    /// Queue a job; restarts the worker if its thread died.
    pub fn send(&self, job: Job) {
        if let Job::Configure(c) = &job {
            *self.config.lock().unwrap_or_else(|e| e.into_inner()) = (**c).clone();
        }
        self.queue_depth.fetch_add(1, Ordering::SeqCst);
        let mut tx = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            let _ = self.events.send(Event::Error("the model worker stopped; restarting it".into()));
            let config = self.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
            self.queue_depth.store(1, Ordering::SeqCst);
            *tx = start_thread(config, self.events.clone(), self.queue_depth.clone());
            let _ = tx.send(job);
        }
    }

    /// Jobs sent and not yet taken up.
    pub fn queue_depth(&self) -> usize {
        self.queue_depth.load(Ordering::SeqCst)
    }
}

fn start_thread(config: Config, events: UnboundedSender<Event>, queue_depth: Arc<AtomicUsize>) -> Sender<Job> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("anchorcoder-worker".into())
        .spawn(move || Worker::new(config, events, rx, queue_depth).run())
        .expect("cannot start the worker thread");
    tx
}

/// What was last shown for a document, for typing through.
struct Shown {
    /// Text from the window start to the cursor.
    before: String,
    /// The rest of the cursor's line after it.
    line_suffix: String,
    /// The suggestion shown.
    suggestion: String,
}

struct DocState {
    cache: DocumentCache,
    window_start: Option<usize>,
    last_used: Instant,
    shown: Option<Shown>,
    last_reused: usize,
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
    queue_depth: Arc<AtomicUsize>,
    completions: VecDeque<CompleteJob>,
    warm: VecDeque<(String, Rope, usize)>,
    latencies: VecDeque<f64>,
}

impl Worker {
    fn new(config: Config, events: UnboundedSender<Event>, rx: Receiver<Job>, queue_depth: Arc<AtomicUsize>) -> Self {
        Worker {
            config,
            engine: None,
            model_state: ModelState::Loading,
            model_error: None,
            model_path: None,
            docs: HashMap::new(),
            events,
            rx,
            queue_depth,
            completions: VecDeque::new(),
            warm: VecDeque::new(),
            latencies: VecDeque::new(),
        }
    }

    fn run(mut self) {
        self.load_model();
        loop {
            if self.completions.is_empty() && self.warm.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.accept(job);
            }
            if let Some(job) = self.completions.pop_front() {
                let uri = job.uri.clone();
                self.guarded(&uri, |w| w.complete(job));
            } else if let Some((uri, rope, cursor)) = self.warm.pop_front() {
                let more = self.guarded(&uri, |w| w.warm_step(&uri, &rope, cursor)).unwrap_or(false);
                if more {
                    self.warm.push_back((uri, rope, cursor));
                }
            }
            self.enforce_budget();
        }
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
        self.queue_depth.fetch_sub(1, Ordering::SeqCst);
        match job {
            Job::Complete(job) => {
                // The newest request for a document supersedes older ones.
                let (old, keep): (Vec<_>, Vec<_>) = self.completions.drain(..).partition(|j| j.uri == job.uri);
                self.completions = keep.into();
                for j in old {
                    j.cancel.store(true, Ordering::SeqCst);
                    let _ = j.reply.send(Err("superseded by a newer request".into()));
                }
                self.completions.push_back(job);
            }
            Job::Warm { uri, rope, cursor } => {
                self.warm.retain(|(u, _, _)| *u != uri);
                self.warm.push_back((uri, rope, cursor));
            }
            Job::Close { uri } => {
                self.warm.retain(|(u, _, _)| *u != uri);
                self.docs.remove(&uri);
            }
            Job::Configure(config) => self.configure(*config),
            Job::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn configure(&mut self, config: Config) {
        let old = std::mem::replace(&mut self.config, config);
        if old.attention != self.config.attention || old.cache.enabled != self.config.cache.enabled {
            self.docs.clear();
        }
        if old.model != self.config.model {
            self.docs.clear();
            self.engine = None;
            self.load_model();
        }
    }

    fn policy(&self) -> AttentionPolicy {
        let a = &self.config.attention;
        AttentionPolicy::from_parts(a.policy.as_str(), a.recent_lines, a.sink_tokens, a.dense_every, a.window_tokens)
            .unwrap_or_default()
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
        self.progress(format!("loading {}", path.display()), Some(50), false);
        let t0 = Instant::now();
        match Engine::load_with(&path, self.config.model.adapter.as_deref()) {
            Ok(engine) => {
                self.engine = Some(engine);
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

    /// The bounded region of the document around `cursor` that prompts are
    /// cut from, as text and its byte offset. Never the whole of a huge file.
    fn region(&self, rope: &Rope, cursor: usize) -> (String, usize) {
        let back = self.config.completion.prefix_tokens * 3 * 3;
        let lo_line = rope.byte_to_line(cursor.saturating_sub(back));
        let lo = rope.line_to_byte(lo_line);
        let hi = (cursor + 8192).min(rope.len_bytes());
        (rope.byte_slice(lo..hi).to_string(), lo)
    }

    /// Plan the prompt and bring the document's cache to it; returns the
    /// region, its offset, the plan and how many tokens were reused.
    fn prepare(&mut self, uri: &str, rope: &Rope, cursor: usize) -> Result<(String, usize, Prompt, usize), String> {
        let Some(engine) = &self.engine else {
            return Err(self.model_error.clone().unwrap_or_else(|| "the model is still loading".into()));
        };
        let (region, lo) = self.region(rope, cursor);
        let settings = self.settings();
        let policy = self.policy();
        let enabled = self.config.cache.enabled;
        let doc = self.docs.entry(uri.to_string()).or_insert_with(|| new_doc(engine, policy));
        if !enabled {
            *doc = new_doc(engine, policy);
        }
        doc.last_used = Instant::now();
        let previous = doc.window_start.and_then(|p| p.checked_sub(lo));
        let prompt = completion::plan(&region, cursor - lo, previous, &settings);
        let update = completion::set_prompt(engine, &mut doc.cache, &region[prompt.window_start..prompt.cut], &settings)
            .map_err(|e| format!("{e:#}"))?;
        doc.window_start = Some(lo + prompt.window_start);
        Ok((region, lo, prompt, update.reused))
    }

    fn complete(&mut self, job: CompleteJob) {
        if job.cancel.load(Ordering::SeqCst) {
            let _ = job.reply.send(Err("cancelled".into()));
            return;
        }
        let cursor = job.cursor.min(job.rope.len_bytes());
        let result = self.complete_inner(&job.uri, &job.rope, cursor, &job.cancel, job.received);
        if let Ok(c) = &result {
            if self.latencies.len() == LATENCY_HISTORY {
                self.latencies.pop_front();
            }
            self.latencies.push_back(c.latency_ms);
        }
        let _ = job.reply.send(result);
    }

    fn complete_inner(
        &mut self,
        uri: &str,
        rope: &Rope,
        cursor: usize,
        cancel: &AtomicBool,
        received: Instant,
    ) -> Result<Completed, String> {
        let (region, lo, prompt, reused) = self.prepare(uri, rope, cursor)?;
        let settings = self.settings();
        let before = &region[prompt.window_start..cursor - lo];
        let latency = || received.elapsed().as_secs_f64() * 1000.0;
        let doc = self.docs.get_mut(uri).expect("prepared above");
        doc.last_reused = reused;
        if let Some(rest) = doc.shown.as_ref().and_then(|s| type_through(s, before, &prompt.line_suffix)) {
            return Ok(Completed {
                text: rest,
                latency_ms: latency(),
                typed_through: true,
                reused_tokens: reused,
                prefilled_tokens: 0,
            });
        }
        let engine = self.engine.as_ref().expect("prepare checked the model");
        let s = completion::complete(
            engine,
            &mut doc.cache,
            &prompt,
            &region[cursor - lo..],
            &settings,
            reused,
            &|| cancel.load(Ordering::SeqCst),
        )
        .map_err(|e| format!("{e:#}"))?;
        if s.stop == crate::engine::generate::StopReason::Cancelled {
            return Err("cancelled".into());
        }
        doc.shown = (!s.text.is_empty()).then(|| Shown {
            before: before.to_string(),
            line_suffix: prompt.line_suffix.clone(),
            suggestion: s.text.clone(),
        });
        Ok(Completed {
            text: s.text,
            latency_ms: latency(),
            typed_through: false,
            reused_tokens: reused,
            prefilled_tokens: s.prefilled,
        })
    }

    /// One chunk of warm-up; returns whether more remains.
    fn warm_step(&mut self, uri: &str, rope: &Rope, cursor: usize) -> bool {
        if !self.config.cache.enabled || self.engine.is_none() {
            return false;
        }
        let cursor = cursor.min(rope.len_bytes());
        if self.prepare(uri, rope, cursor).is_err() {
            return false;
        }
        let engine = self.engine.as_ref().expect("checked above");
        let doc = self.docs.get_mut(uri).expect("prepared above");
        match doc.cache.prefill(&engine.model, WARM_CHUNK) {
            Ok(_) => doc.cache.pending() > 0,
            Err(e) => {
                let _ = self.events.send(Event::Log(format!("warm-up of {uri} failed: {e:#}")));
                false
            }
        }
    }

    /// Drop least-recently-used document caches until all fit the budget.
    fn enforce_budget(&mut self) {
        let budget = self.config.cache.memory_budget_bytes() as usize;
        loop {
            let total: usize = self.docs.values().map(|d| d.cache.stats().kv.allocated_bytes).sum();
            if total <= budget || self.docs.len() <= 1 {
                return;
            }
            let oldest = self.docs.iter().min_by_key(|(_, d)| d.last_used).map(|(u, _)| u.clone());
            if let Some(uri) = oldest {
                self.docs.remove(&uri);
                let _ = self.events.send(Event::Log(format!("cache budget: dropped the cache of {uri}")));
            }
        }
    }

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
                }
            })
            .collect();
        WorkerStatus {
            model_path: self.model_path.clone(),
            default_model: self.config.model.path.is_none(),
            model_state: self.model_state.clone(),
            model_error: self.model_error.clone(),
            policy: self.policy().to_json(),
            cache_bytes: self.docs.values().map(|d| d.cache.stats().kv.allocated_bytes).sum(),
            cache_budget_bytes: self.config.cache.memory_budget_bytes() as usize,
            queue_depth: self.queue_depth.load(Ordering::SeqCst) + self.completions.len() + self.warm.len(),
            last_latencies_ms: self.latencies.iter().copied().collect(),
            documents,
        }
    }
}

fn new_doc(engine: &Engine, policy: AttentionPolicy) -> DocState {
    let mut cache = DocumentCache::new(&engine.model, policy);
    cache.set_eviction_slack(EVICTION_SLACK_LINES);
    DocState { cache, window_start: None, last_used: Instant::now(), shown: None, last_reused: 0 }
}

/// The rest of the shown suggestion when the user typed its beginning.
fn type_through(shown: &Shown, before: &str, line_suffix: &str) -> Option<String> {
    let typed = before.strip_prefix(shown.before.as_str())?;
    if typed.is_empty() || line_suffix != shown.line_suffix {
        return None;
    }
    let rest = shown.suggestion.strip_prefix(typed)?;
    (!rest.trim().is_empty()).then(|| rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_through_returns_the_rest_of_the_suggestion() {
        let shown = Shown { before: "def f(".into(), line_suffix: String::new(), suggestion: "a, b):".into() };
        assert_eq!(type_through(&shown, "def f(a", ""), Some(", b):".into()));
        assert_eq!(type_through(&shown, "def f(a, b", ""), Some("):".into()));
        // Nothing typed, a mismatch, a different line suffix, or nothing left: run the model.
        assert_eq!(type_through(&shown, "def f(", ""), None);
        assert_eq!(type_through(&shown, "def f(x", ""), None);
        assert_eq!(type_through(&shown, "def f(a", ")"), None);
        assert_eq!(type_through(&shown, "def f(a, b):", ""), None);
    }
}
