//! Completions served by a remote engine: [`RemoteRoute`] runs the same
//! pipeline as the local model ([`completion::Session`]: prompt window, a
//! line start that stays put while typing so the engine's prefix cache keeps
//! matching; healing; the suggestion rules; typing-through) over
//! [`RemoteGenerator`], which only sends the prompt to [`Remote`] and
//! streams the answer back.
//!
//! Newest wins per document: a new request stops the older one, and it
//! starts only once the older one is dropped (the document's session is held
//! by one request at a time), so at most one request per document is ever in
//! flight to the engine.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ropey::Rope;
use serde_json::{json, Value};
use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::{Reachability, Remote, RemoteError, RemoteRequest};
use crate::completion::{self, Generator, Prepared, Prompt, Raw, Request, Session, Settings, BYTES_PER_TOKEN};
use crate::config::Config;
use crate::context::Chunk;
use crate::engine::document::line_start;
use crate::project::Project;
use crate::worker::{pause_left, CompleteJob, Completed, CompletionError, Job, WorkerHandle};

/// The remote engine of the `backend` settings, and the documents it serves.
pub(crate) struct RemoteRoute {
    pub(crate) remote: Arc<Remote>,
    docs: Mutex<HashMap<String, RemoteDoc>>,
    counts: Mutex<RouteCounts>,
    /// Open documents, roots and recent lines: what project context is
    /// chosen from (the same rules as the local model's, in the worker).
    project: Mutex<Project>,
    /// When the user last typed (an edit or a completion request): a
    /// document's context is chosen again only once typing has paused.
    last_typed: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct RemoteDoc {
    /// The document's pipeline state, held by the request being served.
    session: Arc<tokio::sync::Mutex<Session>>,
    /// Stops the newest request (the older ones were stopped already).
    stop: Option<Arc<Notify>>,
    /// The project context its prompts carry, chosen in [`RemoteRoute::warm`].
    context: Arc<Context>,
    /// Whether `context` was chosen here (the project's record may be the
    /// local model's, for the same document).
    context_chosen: bool,
    /// Counts warm-ups: only the newest one waiting for a pause chooses.
    warm_turn: u64,
}

/// A document's project context, ready for requests.
#[derive(Default)]
struct Context {
    /// `(path, text)` per file, least relevant first.
    files: Vec<(String, String)>,
    /// The same as text, the document's own path last ([`completion::context_text`]).
    text: String,
}

/// Tokens of a chunk as the budget counts them without a tokenizer: its
/// text and path at [`BYTES_PER_TOKEN`] (erring high: the budget holds).
fn chunk_tokens(c: &Chunk) -> usize {
    (c.text.len() + c.path.len()).div_ceil(BYTES_PER_TOKEN) + 2
}

/// How completions were served, for the status.
#[derive(Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RouteCounts {
    remote: u64,
    typed_through: u64,
    local_fallback: u64,
    failed: u64,
}

/// What a remote completion came to.
enum Outcome {
    /// Answer the request.
    Reply(Result<Completed, CompletionError>),
    /// Hand it to the local model (`fallbackToLocal` while the engine is down).
    Local,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RemoteRoute {
    /// A route to `remote`; project context resolves imports under `roots`.
    pub(crate) fn new(remote: Remote, roots: Vec<PathBuf>) -> Self {
        let mut project = Project::default();
        project.set_roots(roots);
        RemoteRoute {
            remote: Arc::new(remote),
            docs: Mutex::default(),
            counts: Mutex::default(),
            project: Mutex::new(project),
            last_typed: Mutex::default(),
        }
    }

    /// The workspace folders the editor named.
    pub(crate) fn set_roots(&self, roots: Vec<PathBuf>) {
        lock(&self.project).set_roots(roots);
    }

    /// The user opened or edited `uri` (text `rope`, at byte `cursor`), or
    /// rests there (`focus`): remember it, and choose the document's project
    /// context (`budget` tokens; 0: none) on `rt`, off the LSP thread (it
    /// reads imported files). A document without one chooses at once; one
    /// with a context chooses again, if what it depends on changed, only once
    /// typing has paused for [`QUIET`](crate::worker::QUIET), as the local worker does: a new
    /// context changes the prompt's first tokens, so the engine's prompt cache
    /// misses once, which the user should not pay for while typing. A request
    /// always uses the context chosen last.
    pub(crate) fn warm(self: &Arc<Self>, rt: &Handle, job: (String, Rope, usize), focus: bool, budget: usize) {
        let (uri, rope, cursor) = job;
        lock(&self.project).saw(&uri, &rope, cursor);
        if !focus {
            self.typed();
        }
        let turn = {
            let mut docs = lock(&self.docs);
            let doc = docs.entry(uri.clone()).or_default();
            doc.warm_turn += 1;
            doc.warm_turn
        };
        let route = self.clone();
        rt.spawn(async move {
            loop {
                let left = route.pause_left(&uri);
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left).await;
            }
            // A newer warm-up of the document, with newer text, chooses instead.
            if lock(&route.docs).get(&uri).is_some_and(|d| d.warm_turn == turn) {
                let _ = tokio::task::spawn_blocking(move || route.choose(&uri, &rope, cursor, budget)).await;
            }
        });
    }

    /// The user typed: a pause starts now.
    fn typed(&self) {
        *lock(&self.last_typed) = Some(Instant::now());
    }

    /// How much longer typing must pause before `uri` may choose its context
    /// again (zero: it may; at once for a document without one).
    fn pause_left(&self, uri: &str) -> Duration {
        if !lock(&self.docs).get(uri).is_some_and(|d| d.context_chosen) {
            return Duration::ZERO;
        }
        pause_left(*lock(&self.last_typed))
    }

    /// Choose `uri`'s project context again if what it depends on changed.
    fn choose(&self, uri: &str, rope: &Rope, cursor: usize, budget: usize) {
        let mut project = lock(&self.project);
        let chosen_here = lock(&self.docs).get(uri).is_some_and(|d| d.context_chosen);
        if chosen_here && !project.stale(uri, rope, cursor, budget) {
            return;
        }
        let chosen = project.choose(uri, rope, cursor, budget, &chunk_tokens);
        drop(project);
        let context = Context {
            files: chosen.set.by_file(),
            text: completion::context_text(&chosen.set, chosen.shown_path.as_deref()),
        };
        let mut docs = lock(&self.docs);
        let doc = docs.entry(uri.to_string()).or_default();
        doc.context = Arc::new(context);
        doc.context_chosen = true;
    }

    /// The files of each document's project context with their bytes (for status).
    fn context_status(&self) -> Value {
        let docs = lock(&self.docs);
        let mut uris: Vec<&String> = docs.keys().collect();
        uris.sort();
        uris.into_iter()
            .map(|u| {
                let files: Vec<Value> =
                    docs[u].context.files.iter().map(|(p, t)| json!({ "path": p, "bytes": t.len() })).collect();
                json!({ "uri": u, "contextFiles": files })
            })
            .collect()
    }

    /// Start serving `job` on the runtime; stops the document's older request.
    pub(crate) fn complete(self: Arc<Self>, job: CompleteJob, worker: WorkerHandle) {
        let stop = Arc::new(Notify::new());
        self.typed();
        lock(&self.project).saw(&job.uri, &job.rope, job.cursor);
        let (session, context) = {
            let mut docs = lock(&self.docs);
            let doc = docs.entry(job.uri.clone()).or_default();
            if let Some(older) = doc.stop.replace(stop.clone()) {
                older.notify_one();
            }
            (doc.session.clone(), doc.context.clone())
        };
        let rt = worker.runtime().clone();
        rt.spawn(async move {
            let config = worker.config();
            let cancel = job.cancel.clone();
            let outcome = tokio::select! {
                o = self.serve(&job, &session, &context, &config) => o,
                _ = stop.notified() => Outcome::Reply(Err(CompletionError::Superseded)),
                _ = cancelled(&cancel) => Outcome::Reply(Err(CompletionError::Cancelled)),
            };
            let mut counts = lock(&self.counts);
            match outcome {
                Outcome::Reply(r) => {
                    match &r {
                        Ok(c) if c.typed_through => counts.typed_through += 1,
                        Ok(_) => counts.remote += 1,
                        Err(e) if e.is_cancellation() => {}
                        Err(_) => counts.failed += 1,
                    }
                    if let Ok(c) = &r {
                        worker.record_latency(c.latency_ms);
                    }
                    let _ = job.reply.send(r);
                }
                Outcome::Local => {
                    counts.local_fallback += 1;
                    drop(counts);
                    worker.to_thread(Job::Complete(job));
                }
            }
        });
    }

    async fn serve(
        &self,
        job: &CompleteJob,
        session: &tokio::sync::Mutex<Session>,
        context: &Context,
        config: &Config,
    ) -> Outcome {
        let settings = Settings::from(&config.completion);
        let mut session = session.lock().await;
        let mut gen = RemoteGenerator {
            remote: &self.remote,
            fallback: config.backend.fallback_to_local,
            extra: &context.files,
            extra_text: &context.text,
        };
        match session.complete(&mut gen, &job.rope, job.cursor, &settings).await {
            Ok(s) => Outcome::Reply(Ok(Completed {
                text: s.text,
                latency_ms: job.received.elapsed().as_secs_f64() * 1000.0,
                typed_through: s.typed_through,
                reused_tokens: 0,
                prefilled_tokens: 0,
                generated: None,
            })),
            Err(e) if e.down && gen.fallback => Outcome::Local,
            Err(e) => Outcome::Reply(Err(CompletionError::Failed(e.message))),
        }
    }

    /// Forget a document; stop its request.
    pub(crate) fn close(&self, uri: &str) {
        lock(&self.project).close(uri);
        if let Some(stop) = lock(&self.docs).remove(uri).and_then(|d| d.stop) {
            stop.notify_one();
        }
    }

    /// Stop every request (the backend changed).
    pub(crate) fn stop_all(&self) {
        for doc in lock(&self.docs).values() {
            if let Some(stop) = &doc.stop {
                stop.notify_one();
            }
        }
    }

    /// The engine's health and how completions were served.
    pub(crate) fn status(&self) -> Value {
        let mut s = self.remote.status();
        s["completions"] = serde_json::to_value(&*lock(&self.counts)).unwrap_or_default();
        s["documents"] = self.context_status();
        s
    }
}

/// Resolves once `flag` is set (the LSP side cancelled the request).
async fn cancelled(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A remote engine as the pipeline's [`Generator`]. It cannot count tokens,
/// so prompts are not re-planned by density. With `fallback`
/// (`fallbackToLocal`) and the engine down, it fails at once as down (the
/// route hands the request to the local model) and starts a probe.
pub struct RemoteGenerator<'a> {
    /// The engine.
    pub remote: &'a Arc<Remote>,
    /// `backend.fallbackToLocal`.
    pub fallback: bool,
    /// The document's project context per file (see [`RemoteRequest::extra`]).
    pub extra: &'a [(String, String)],
    /// The same as text (see [`RemoteRequest::extra_text`]).
    pub extra_text: &'a str,
}

impl Generator for RemoteGenerator<'_> {
    type Error = RemoteError;

    fn set_prompt(&mut self, _window: &str, _s: &Settings) -> Result<Prepared, RemoteError> {
        Ok(Prepared { tokens: None, reused: 0 })
    }

    fn generate(
        &mut self,
        req: &Request<'_>,
        stop: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> impl Future<Output = Result<Raw, RemoteError>> + Send {
        let remote = self.remote;
        let fallback = self.fallback;
        let heal = remote_heal(req.prompt, remote.forces_prefix());
        let mut request = remote_request(req.region, req.cursor, req.prompt, req.settings, heal);
        request.extra = self.extra.to_vec();
        request.extra_text = self.extra_text.to_string();
        async move {
            if fallback && remote.state() == Reachability::Down {
                if remote.claim_probe() {
                    let remote = remote.clone();
                    tokio::spawn(async move { remote.probe().await });
                }
                return Err(RemoteError::down(format!(
                    "the remote engine at {} is down",
                    remote.config().url.as_deref().unwrap_or("")
                )));
            }
            let mut rule = |text: &str| match after_heal(text, heal) {
                Ok(rest) => stop(rest),
                Err(pending) => !pending,
            };
            let raw = remote.generate(&request, &mut rule).await?;
            // An answer that did not spell the healed bytes shows nothing.
            let text = after_heal(&raw, heal).unwrap_or_default().to_string();
            Ok(Raw { text, ..Raw::default() })
        }
    }
}

/// What token healing cuts for a remote engine. One that can force its
/// first bytes (llama.cpp) heals like the local engine. One that cannot
/// heals only trailing whitespace (a prompt ending in indentation hurts
/// most; a suggestion that does not start with it is dropped); a partial
/// word is sent as typed. On a fresh line neither heals past the line's
/// indentation: an engine matches its stop strings (a line break for one
/// line) on the whole answer, forced bytes included.
fn remote_heal(p: &Prompt, forces: bool) -> Option<&str> {
    let healed = if p.fresh_line { p.healed.rsplit('\n').next().unwrap_or_default() } else { p.healed.as_str() };
    let heal = !healed.is_empty() && (forces || healed.chars().all(char::is_whitespace));
    heal.then_some(healed)
}

/// The engine's text after the healed bytes: `Err(true)` while it has not
/// spelled them all yet, `Err(false)` when it wrote something else.
fn after_heal<'a>(text: &'a str, heal: Option<&str>) -> Result<&'a str, bool> {
    match heal {
        None => Ok(text),
        Some(h) => text.strip_prefix(h).ok_or_else(|| h.starts_with(text)),
    }
}

/// The request for a planned prompt: the window up to the cursor's line,
/// the line (cut before healed whitespace), and for fill-in-the-middle the
/// text after the cursor, whole lines within `suffix_tokens` (sized at
/// [`BYTES_PER_TOKEN`], erring low: there is no tokenizer here).
fn remote_request(region: &str, at: usize, p: &Prompt, s: &Settings, heal: Option<&str>) -> RemoteRequest {
    let line_begin = line_start(region, at).max(p.window_start);
    let line_end = at - heal.map_or(0, str::len);
    let suffix = (s.fim && s.suffix_tokens > 0).then(|| {
        let following = &region[at..];
        let end = following.floor_char_boundary(s.suffix_tokens * BYTES_PER_TOKEN);
        match following[..end].rfind('\n') {
            Some(i) if end < following.len() => following[..=i].to_string(),
            _ => following[..end].to_string(),
        }
    });
    RemoteRequest {
        context: region[p.window_start..line_begin].to_string(),
        line: region[line_begin..line_end].to_string(),
        forced: heal.unwrap_or_default().to_string(),
        suffix,
        max_tokens: s.max_tokens,
        stop: completion::stop_strings(p),
        extra: Vec::new(),
        extra_text: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, BackendKind};
    use crate::worker::QUIET;

    /// The files of `uri`'s context, as the status shows them.
    fn context_files(route: &RemoteRoute, uri: &str) -> Vec<String> {
        lock(&route.docs).get(uri).map(|d| d.context.files.iter().map(|(p, _)| p.clone()).collect()).unwrap_or_default()
    }

    /// Wait (up to 5 s) until `uri`'s context files are `want`; what they were last.
    async fn settles_on(route: &RemoteRoute, uri: &str, want: &[&str]) -> Vec<String> {
        for _ in 0..100 {
            if context_files(route, uri) == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        context_files(route, uri)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_document_chooses_its_context_again_only_once_typing_pauses() {
        let dir = std::env::temp_dir().join(format!("anchorcoder-route-ctx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (path, text) in [
            ("geometry/__init__.py", ""),
            ("geometry/shapes.py", "import math\n\n\ndef area_of_circle(radius):\n    return math.pi * radius ** 2\n"),
            ("billing/__init__.py", ""),
            ("billing/money.py", "def format_price(cents):\n    return f\"${cents / 100:.2f}\"\n"),
        ] {
            std::fs::create_dir_all(dir.join(path).parent().unwrap()).unwrap();
            std::fs::write(dir.join(path), text).unwrap();
        }
        let config = BackendConfig {
            kind: BackendKind::LlamaCpp,
            url: Some("http://127.0.0.1:9".into()),
            ..BackendConfig::default()
        };
        let route = Arc::new(RemoteRoute::new(Remote::new(&config, Arc::new(|_| {})), vec![dir.clone()]));
        let rt = Handle::current();
        let uri = format!("file://{}/app.py", dir.display());
        // Each function far from the other: the text near the cursor names one.
        let filler: String = (0..60).map(|i| format!("STEP_{i} = {i}\n")).collect();
        let report = "def report(r):\n    return geometry.shapes.area_of_circle(r)\n";
        let bill = "def bill(amount):\n    return billing.money.format_price(amount)\n";
        let text = format!("import geometry.shapes\nimport billing.money\n\n\n{report}\n\n{filler}\n\n{bill}");
        let rope = Rope::from_str(&text);
        let in_bill = text.len();
        let in_report = text.find("    return geometry").unwrap();
        // Opened: the first context is chosen at once (the budget, 40 tokens, holds one file).
        route.warm(&rt, (uri.clone(), rope.clone(), in_bill), false, 40);
        assert_eq!(settles_on(&route, &uri, &["billing/money.py"]).await, ["billing/money.py"]);
        // Typing in the other function: the context stays while the user types…
        for _ in 0..4 {
            route.warm(&rt, (uri.clone(), rope.clone(), in_report), false, 40);
            tokio::time::sleep(QUIET / 5).await;
            assert_eq!(context_files(&route, &uri), ["billing/money.py"], "chosen again while typing");
        }
        // …and follows the cursor once typing pauses.
        assert_eq!(settles_on(&route, &uri, &["geometry/shapes.py"]).await, ["geometry/shapes.py"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn remote_prompts_put_the_typed_line_last_and_heal_only_whitespace() {
        let c = Settings { suffix_tokens: 4, ..Settings::default() };
        let text = "import os\ndef f(x):  \n    \n\nprint(f(1))\nmore()\n";
        let at = text.find("    \n").unwrap() + 4;
        let p = completion::plan(text, at, None, &Settings::default());
        let heal = remote_heal(&p, false);
        assert_eq!((p.healed.as_str(), heal), ("  \n    ", Some("    ")), "not the line break");
        assert_eq!(remote_heal(&p, true), Some("    "));
        let r = remote_request(text, at, &p, &c, heal);
        assert_eq!(r.context, "import os\ndef f(x):  \n");
        assert_eq!((r.line.as_str(), r.forced.as_str()), ("", "    "), "the indentation is healed");
        // Whole lines of what follows, within 4 tokens (12 bytes).
        assert_eq!(r.suffix.as_deref(), Some("\n\n"));
        assert_eq!(r.stop, ["\n\n\n"]);
        assert_eq!(after_heal("  ", heal), Err(true));
        assert_eq!(after_heal("    return x", heal), Ok("return x"));
        assert_eq!(after_heal("return x", heal), Err(false));

        // A partial word is sent as typed; one line when text follows the cursor.
        let text = "def f(x):\n    return x.up)\n";
        let at = text.find(")\n").unwrap();
        let p = completion::plan(text, at, None, &Settings::default());
        assert_eq!((remote_heal(&p, false), p.single_line), (None, true));
        let r = remote_request(text, at, &p, &Settings { fim: false, ..c.clone() }, None);
        assert_eq!((r.line.as_str(), r.suffix, r.stop), ("    return x.up", None, vec!["\n".to_string()]));
        // An engine that can force its first bytes heals the word like the local engine.
        let heal = remote_heal(&p, true);
        let r = remote_request(text, at, &p, &c, heal);
        assert_eq!((r.line.as_str(), r.forced.as_str()), ("    return x.", "up"));
    }
}
