//! `anchorcoder eval`: completion quality of an attention policy on a set of
//! cursor tasks, and `anchorcoder eval build-tasks`, which makes such a set
//! from real source files.
//!
//! A task is one JSON line `{"id", "language", "kind", "prefix", "suffix",
//! "target"}`: the document is `prefix + suffix`, the cursor sits between
//! them, and `target` is the text that was cut out there. Kinds
//! ([`TaskKind`]): `mid-line` (the cursor at a character inside a line, the
//! target the rest of that line), `fresh-line` (the cursor after a line's
//! indentation, its code removed, the target that code) and `block` (the
//! cursor after the indentation of a block's first line, the whole block
//! removed, the target the block). Each task runs exactly the path users get
//! (the server's pipeline, [`completion::Session`], on a fresh [`DocumentCache`]).
//! Line kinds score the suggestion's first line, blocks the whole text (each
//! line's trailing whitespace trimmed): exact match, edit similarity
//! (1 − Levenshtein distance over characters / length of the longer string)
//! and the share of the target's lines exactly right; empty suggestions and
//! suggestions whose first line is empty are counted apart.
//!
//! Output: one JSON line per task (to `--out`, else stdout), then, as the
//! last line on stdout, the summary `{"tasks", "exact_match",
//! "edit_similarity", "lines_right", "empty", "empty_first_line",
//! "kv_bytes", ...}` (means); with `--compare-full` also `"full"` (the same
//! for the full policy), `"edit_similarity_ratio"` and `"kv_ratio"` (the
//! policy's over full's); with `--fresh-line-compare` `"variants"` (the
//! other [`FreshLine`] rules on the same prompt cache); with
//! `--llama-server URL` `"llama_cpp"` (that server's `/completion` on the
//! same prompt tokens, greedy, its raw first line or block) and
//! `"llama_cpp_rules"` (its text through [`completion::finish`]).
//!
//! Python block tasks whose file's own doctests run the block carry
//! `"runnable"` (`build-tasks --runnable`); `eval exec` runs those doctests
//! on each suggestion of a results file ([`exec`]).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::completion::{self, FreshLine, Settings};
use crate::context;
use crate::engine::document::DocumentCache;
use crate::engine::policy::AttentionPolicy;
use crate::engine::Engine;

pub mod exec;

/// Flags of `anchorcoder eval`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    /// The tasks (JSON lines, as `eval build-tasks` writes them).
    #[arg(long)]
    pub tasks: Option<PathBuf>,
    /// A .gguf file or Hugging Face folder (default: the default model, pulled on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A LoRA adapter to merge at load: a .safetensors file, or `builtin` (the anchor adapter
    /// for the default model built into this binary, with its trained policy unless policy flags are given).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub policy: crate::cli::PolicyArgs,
    /// Also run every task under the full policy and report the ratios.
    #[arg(long)]
    pub compare_full: bool,
    /// Write the per-task result lines here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only the first N tasks.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Most tokens to generate (default: 48 for line tasks, 64 for blocks).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Most lines of a block task's suggestion (`completion.maxLines`).
    #[arg(long, default_value_t = 8)]
    pub max_lines: usize,
    /// The fresh-line rule to score.
    #[arg(long, value_enum, default_value_t = FreshLineArg::Continue)]
    pub fresh_line: FreshLineArg,
    /// Also score the other fresh-line rules on the same prompt cache.
    #[arg(long)]
    pub fresh_line_compare: bool,
    /// Also answer every task with this llama.cpp server's `/completion`
    /// (e.g. http://127.0.0.1:8080): the same prompt tokens, greedy.
    #[arg(long)]
    pub llama_server: Option<String>,
    /// With --llama-server: answer the tasks with llama.cpp only (our model
    /// is loaded for its tokenizer, not run).
    #[arg(long, requires = "llama_server")]
    pub llama_only: bool,
    /// Token budget of the text before the cursor.
    #[arg(long, default_value_t = 2048)]
    pub prefix_tokens: usize,
    /// Project context for tasks that carry their file and project (`eval
    /// build-tasks` records them): `ours` (imports, open files, by relevance;
    /// what the server does), `ring` (llama.vim's ring buffer of 64-line
    /// chunks, the baseline), `off`.
    #[arg(long, value_enum, default_value_t = ContextArg::Ours)]
    pub context: ContextArg,
    /// Token budget of the project context (`completion.contextTokens`).
    #[arg(long, default_value_t = completion::DEFAULT_CONTEXT_TOKENS)]
    pub context_tokens: usize,
    /// Only choose each task's project context and report what it holds
    /// (tokens, files, whether it defines the name a cross-file task's
    /// target starts with); no generation, no scores. For tuning the choice.
    #[arg(long)]
    pub context_only: bool,
    /// Keep the task lines already in `--out` and run only the missing tasks
    /// (a long run that was stopped goes on where it was).
    #[arg(long, requires = "out")]
    pub resume: bool,
}

/// Where eval's project context comes from (`--context`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextArg {
    Off,
    Ring,
    Ours,
}

/// The project context tokens of `task` (empty without a file and project).
pub fn task_context(engine: &Engine, task: &Task, mode: ContextArg, budget: usize) -> (context::ContextSet, Vec<u32>) {
    let none = (context::ContextSet::default(), Vec::new());
    let (Some(file), Some(root)) = (&task.path, &task.root) else { return none };
    if mode == ContextArg::Off || budget == 0 {
        return none;
    }
    // The whole document, as the editor has it, without the target: a task's
    // prefix and suffix are cut to a window, and the imports at the top of a
    // long file would otherwise be missing.
    let (text, cursor) = whole_document(task, file);
    let open: std::collections::HashMap<PathBuf, String> =
        task.open.iter().filter_map(|p| Some((p.clone(), std::fs::read_to_string(p).ok()?))).collect();
    let count = |c: &context::Chunk| completion::chunk_tokens(engine, c);
    let set = match mode {
        ContextArg::Ours => crate::project::file_context(file, &text, cursor, root, &open, budget, &count).set,
        _ => {
            // The ring buffer sees the same files, imported ones first (seen last), no ranking.
            let mut read = Vec::new();
            let imported = context::imported(file, &text, root, &open, &mut read);
            let mut cands: Vec<context::Candidate> = Vec::new();
            for (shown, p) in &imported {
                if let Some(t) = open.get(p).or_else(|| read.iter().find(|(q, _)| q == p).map(|(_, t)| t)) {
                    cands.push(context::Candidate {
                        path: shown.clone(),
                        text: t,
                        source: context::Source::Import,
                        lines: vec![],
                    });
                }
            }
            for p in &task.open {
                if let (Some(t), false) = (open.get(p), imported.iter().any(|(_, q)| q == p)) {
                    let shown = context::display_path(p, root);
                    cands.push(context::Candidate {
                        path: shown,
                        text: t,
                        source: context::Source::OpenDocument,
                        lines: vec![],
                    });
                }
            }
            context::ring_buffer(&cands, budget, &count)
        }
    };
    let tokens = completion::context_tokens(engine, &set, Some(&context::display_path(file, root))).unwrap_or_default();
    (set, tokens)
}

/// The task's document in full (the file on disk around the task's window,
/// the target left out) and the cursor in it; only the window when the file
/// no longer holds the task's text.
fn whole_document(task: &Task, file: &Path) -> (String, usize) {
    let window = (format!("{}{}", task.prefix, task.suffix), task.prefix.len());
    let Ok(disk) = std::fs::read_to_string(file) else { return window };
    let middle = format!("{}{}{}", task.prefix, task.target, task.suffix);
    match disk.find(&middle) {
        Some(at) => {
            let text = format!("{}{}{}{}", &disk[..at], task.prefix, task.suffix, &disk[at + middle.len()..]);
            (text, at + task.prefix.len())
        }
        None => window,
    }
}

/// Whether a chunk of `set` defines the first identifier of `target` (for a
/// cross-file task: the name the cursor sits at): how often the context
/// holds what the task needs, whatever the model then makes of it.
pub fn context_defines_target(set: &context::ContextSet, target: &str) -> bool {
    let name: String = target.chars().take_while(|c| *c == '_' || c.is_alphanumeric()).collect();
    !name.is_empty() && set.chunks.iter().any(|c| context::defined_names(&c.text).contains(&name.as_str()))
}

/// [`FreshLine`] on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreshLineArg {
    Constrain,
    Continue,
    Off,
}

impl From<FreshLineArg> for FreshLine {
    fn from(a: FreshLineArg) -> FreshLine {
        match a {
            FreshLineArg::Constrain => FreshLine::Constrain,
            FreshLineArg::Continue => FreshLine::Continue,
            FreshLineArg::Off => FreshLine::Off,
        }
    }
}

/// The name of a fresh-line rule in results.
fn fresh_line_name(f: FreshLine) -> &'static str {
    match f {
        FreshLine::Constrain => "constrain",
        FreshLine::Continue => "continue",
        FreshLine::Off => "off",
    }
}

/// What a task cuts out at its cursor.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// The rest of a line, from a character inside it.
    #[default]
    MidLine,
    /// A line's code; the line is left indented and empty, as after Enter.
    FreshLine,
    /// A block (to the end of its indentation level) from its first line's
    /// code; that line is left indented and empty.
    Block,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Make a task set from real source files.
    BuildTasks(BuildTasksArgs),
    /// Draw edit similarity against KV bytes from a grid's results (SVG).
    Plot(PlotArgs),
    /// Run the file's own doctests with each suggested block in place
    /// (runnable Python block tasks: `build-tasks --runnable`).
    Exec(exec::ExecArgs),
}

/// Flags of `anchorcoder eval build-tasks`.
#[derive(Args, Debug, Clone)]
pub struct BuildTasksArgs {
    /// Folders searched (recursively) for .py, .rs, .js/.mjs/.cjs and .ts files.
    #[arg(long, num_args = 1.., required = true)]
    pub from: Vec<PathBuf>,
    /// Tasks per file.
    #[arg(long, default_value_t = 2)]
    pub per_file: usize,
    /// Files in all, taken in turn from each folder (default: every file).
    #[arg(long)]
    pub files: Option<usize>,
    /// Seed of the random choices (same seed and files: same tasks).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most bytes of document before the cursor (whole lines).
    #[arg(long, default_value_t = 6000)]
    pub max_prefix_bytes: usize,
    /// Most bytes of document after the cursor's line (whole lines).
    #[arg(long, default_value_t = 1500)]
    pub max_suffix_bytes: usize,
    /// Only cursors with at least this many bytes of the file before their
    /// line (so that the prompt window is full).
    #[arg(long, default_value_t = 0)]
    pub min_prefix_bytes: usize,
    /// Only files of at least this many lines.
    #[arg(long, default_value_t = 0)]
    pub min_file_lines: usize,
    /// What each task cuts out.
    #[arg(long, value_enum, default_value_t = TaskKind::MidLine)]
    pub kind: TaskKind,
    /// Most lines of a block task's target (`completion.maxLines`).
    #[arg(long, default_value_t = 8)]
    pub max_lines: usize,
    /// Cross-file tasks: mid-line cursors at a name that the file uses but
    /// only a file it imports defines (the target is that use: name and
    /// arguments). Each `--from` folder is one project (imports resolve in it).
    #[arg(long)]
    pub cross_file: bool,
    /// Other files of the file's folder taken as open in the editor (eval's
    /// context sources besides the imports).
    #[arg(long, default_value_t = 3)]
    pub open_files: usize,
    /// Block tasks in Python files: record the file's doctests that run the
    /// block (each file with doctests is loaded and its doctests traced), for
    /// `eval exec`. The tasks drawn stay the same.
    #[arg(long)]
    pub runnable: bool,
    /// Block tasks only where the file's doctests run the block (a set for
    /// `eval exec`; implies --runnable; files without doctests are skipped).
    #[arg(long)]
    pub runnable_only: bool,
    /// Where to write the tasks (JSON lines).
    #[arg(long)]
    pub out: PathBuf,
}

/// One cursor to complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub language: String,
    /// Absent in older task files: mid-line.
    #[serde(default)]
    pub kind: TaskKind,
    pub prefix: String,
    pub suffix: String,
    pub target: String,
    /// The task's file (absolute) and its project's root: with them, eval
    /// gathers project context as the server does (absent in older task files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Other files of the project taken as open in the editor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open: Vec<PathBuf>,
    /// A Python block that the file's own doctests run (`build-tasks
    /// --runnable`): what `eval exec` needs to run them on a suggestion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runnable: Option<exec::Runnable>,
}

/// Entry point of `anchorcoder eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    match &args.command {
        Some(EvalCommand::BuildTasks(b)) => return build_tasks_cmd(b),
        Some(EvalCommand::Plot(p)) => return plot_cmd(p),
        Some(EvalCommand::Exec(e)) => return exec::exec_cmd(e),
        None => {}
    }
    let Some(tasks_path) = &args.tasks else { bail!("eval needs --tasks TASKS.jsonl (or the build-tasks subcommand)") };
    let mut tasks = read_tasks(tasks_path)?;
    if let Some(n) = args.limit {
        tasks.truncate(n);
    }
    if tasks.is_empty() {
        bail!("no tasks in {}", tasks_path.display());
    }
    let engine = crate::cli::load_engine(args.model.as_deref(), args.adapter.as_deref())?;
    let policy = args.policy.policy_for(&engine)?;
    let full = AttentionPolicy::full();
    let compare = args.compare_full && policy != full;
    let main_rule = FreshLine::from(args.fresh_line);
    let mut rules = vec![main_rule];
    if args.fresh_line_compare {
        rules.extend(
            [FreshLine::Constrain, FreshLine::Continue, FreshLine::Off].into_iter().filter(|&r| r != main_rule),
        );
    }
    let llama = args.llama_server.as_deref().map(LlamaServer::parse).transpose()?;

    // With --resume, the lines of tasks already run are kept (same policy;
    // with --compare-full only those that carry the full run too).
    let mut done = std::collections::HashMap::new();
    if args.resume {
        if let Some(p) = args.out.as_ref().filter(|p| p.exists()) {
            done = read_done(p, policy, args.compare_full && !args.llama_only, args.llama_only)?;
        }
    }
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?,
            );
            // Rewrite the kept lines in task order (a partial last line is dropped).
            for t in &tasks {
                if let Some(line) = done.get(&t.id) {
                    writeln!(w, "{line}")?;
                }
            }
            w.flush()?;
            Box::new(w)
        }
        None => Box::new(std::io::stdout()),
    };
    if !done.is_empty() {
        eprintln!("eval: resuming, {} of {} tasks already done", done.len(), tasks.len());
    }
    // Results by what produced them: "" (the policy), "full", "variants.NAME",
    // "llama_cpp", "llama_cpp_rules".
    let mut results: std::collections::BTreeMap<String, Vec<TaskResult>> = Default::default();
    let t0 = Instant::now();
    // Context tokens in all, tasks with context, tasks whose context defines the target's name.
    let mut context_used = (0usize, 0usize, 0usize);
    for (i, task) in tasks.iter().enumerate() {
        let line = match done.remove(&task.id) {
            Some(l) => l,
            None => {
                let settings = task_settings(&args, task.kind, main_rule);
                let (set, ctx) = task_context(&engine, task, args.context, args.context_tokens);
                let rs = if args.llama_only || args.context_only {
                    Vec::new()
                } else {
                    eval_task_rules(&engine, policy, task, &settings, &rules, &ctx)
                };
                let mut line = match rs.first() {
                    Some(r) => r.to_json(task, policy),
                    None => {
                        serde_json::json!({ "id": task.id, "language": task.language, "policy": policy.describe() })
                    }
                };
                if !ctx.is_empty() {
                    line["context_tokens"] = ctx.len().into();
                    line["context_files"] = set.files().into_iter().map(|(p, _)| p).collect::<Vec<_>>().into();
                    line["context_defines_target"] = context_defines_target(&set, &task.target).into();
                }
                for (r, rule) in rs.iter().zip(&rules).skip(1) {
                    line["variants"][fresh_line_name(*rule)] = r.to_json(task, policy);
                }
                if args.compare_full && !args.llama_only && !args.context_only {
                    // Under `full` itself, the comparison is the run itself.
                    let f = if compare {
                        eval_task_rules(&engine, full, task, &settings, &[settings.fresh_line], &ctx).remove(0)
                    } else {
                        rs[0].clone()
                    };
                    line["full"] = f.to_json(task, full);
                }
                if let Some(server) = &llama {
                    match llama_task(&engine, server, task, &settings, &ctx) {
                        Ok((raw, rules)) => {
                            line["llama_cpp"] = raw.to_json(task, full);
                            line["llama_cpp_rules"] = rules.to_json(task, full);
                        }
                        Err(e) => line["llama_cpp_error"] = format!("{e:#}").into(),
                    }
                }
                let line = line.to_string();
                writeln!(out, "{line}")?;
                out.flush()?;
                line
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(n) = v["context_tokens"].as_u64() {
            context_used.0 += n as usize;
            context_used.1 += 1;
        }
        if let Some(d) = v["context_defines_target"].as_bool() {
            context_used.2 += d as usize;
        }
        let mut keys = vec![String::new(), "full".into(), "llama_cpp".into(), "llama_cpp_rules".into()];
        if let Some(m) = v["variants"].as_object() {
            keys.extend(m.keys().map(|k| format!("variants.{k}")));
        }
        for k in keys {
            let part = k.split('.').filter(|p| !p.is_empty()).fold(&v, |v, p| &v[p]);
            if let Some(r) = TaskResult::from_json(part) {
                results.entry(k).or_default().push(r);
            }
        }
        if (i + 1) % 10 == 0 || i + 1 == tasks.len() {
            // The pass that runs: ours, else (--llama-only) llama.cpp's.
            let (shown, label) = match results.get("") {
                Some(v) if !v.is_empty() => (&v[..], ""),
                _ => (results.get("llama_cpp").map_or(&[][..], |v| &v[..]), " (llama.cpp)"),
            };
            let s = Summary::of(shown);
            eprintln!(
                "eval{label}: {}/{} tasks, exact {:.3}, edit similarity {:.3}, empty first line {:.3}, {:.0}s",
                i + 1,
                tasks.len(),
                s.exact_match,
                s.edit_similarity,
                s.empty_first_line,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    out.flush()?;
    drop(out);
    let of = |k: &str| results.get(k).map(|r| Summary::of(r));
    let full_summary = if args.compare_full { Some(of("full").unwrap_or_else(|| Summary::of(&[]))) } else { None };
    let mut summary = summary_json(&of("").unwrap_or_else(|| Summary::of(&[])), policy, full_summary.as_ref());
    let kinds: std::collections::BTreeSet<&str> = tasks
        .iter()
        .map(|t| match t.kind {
            TaskKind::MidLine => "mid-line",
            TaskKind::FreshLine => "fresh-line",
            TaskKind::Block => "block",
        })
        .collect();
    summary["kind"] = kinds.into_iter().collect::<Vec<_>>().join(",").into();
    summary["fresh_line"] = fresh_line_name(main_rule).into();
    summary["context"] = format!("{:?}", args.context).to_lowercase().into();
    summary["context_tokens"] = args.context_tokens.into();
    if context_used.1 > 0 {
        summary["context_tasks"] = context_used.1.into();
        summary["context_tokens_mean"] = (context_used.0 as f64 / context_used.1 as f64).into();
        summary["context_defines_target"] = (context_used.2 as f64 / context_used.1 as f64).into();
    }
    for (k, r) in &results {
        if let Some(name) = k.strip_prefix("variants.") {
            summary["variants"][name] = Summary::of(r).to_json();
        } else if k.starts_with("llama_cpp") {
            summary[k.as_str()] = Summary::of(r).to_json();
        }
    }
    println!("{summary}");
    Ok(())
}

/// The completion settings of a task: mid-line tasks stop at the end of the
/// line (as the first eval did); fresh-line and block tasks generate up to
/// `--max-lines` lines as the server does (so that a suggestion whose first
/// line is empty shows as such; fresh lines then score the first line).
fn task_settings(args: &EvalArgs, kind: TaskKind, rule: FreshLine) -> Settings {
    let block = kind == TaskKind::Block;
    Settings {
        max_tokens: args.max_tokens.unwrap_or(if block { 64 } else { 48 }),
        max_lines: if kind == TaskKind::MidLine { 1 } else { args.max_lines },
        prefix_tokens: args.prefix_tokens,
        fresh_line: rule,
        ..Settings::default()
    }
}

/// The outcome of one task under one policy.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    /// What was scored: the suggestion's first line (line tasks) or the
    /// whole suggestion (blocks), trailing whitespace trimmed.
    pub suggestion: String,
    pub exact_match: bool,
    pub edit_similarity: f64,
    /// Share of the target's lines that the suggestion has exactly right.
    pub lines_right: f64,
    /// The suggestion was empty (nothing shown).
    pub empty: bool,
    /// The suggestion was not empty but its first line was (the ghost text
    /// on the cursor's line is empty).
    pub empty_first_line: bool,
    /// K/V bytes of the document cache at the cursor (after compaction).
    pub kv_bytes: usize,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Plan, prefill and generation, in milliseconds.
    pub latency_ms: f64,
    /// Why generation stopped (or the error, if it failed).
    pub stop: String,
}

impl TaskResult {
    /// Read back a task line's result (`None` if a field is missing).
    fn from_json(v: &serde_json::Value) -> Option<TaskResult> {
        let exact_match = v["exact_match"].as_bool()?;
        Some(TaskResult {
            suggestion: v["suggestion"].as_str()?.to_string(),
            exact_match,
            edit_similarity: v["edit_similarity"].as_f64()?,
            // Lines of older runs (line tasks only) lack the newer fields.
            lines_right: v["lines_right"].as_f64().unwrap_or(f64::from(u8::from(exact_match))),
            empty: v["empty"].as_bool().unwrap_or(false),
            empty_first_line: v["empty_first_line"].as_bool().unwrap_or(false),
            kv_bytes: v["kv_bytes"].as_u64()? as usize,
            prompt_tokens: v["prompt_tokens"].as_u64()? as usize,
            latency_ms: v["latency_ms"].as_f64()?,
            stop: v["stop"].as_str()?.to_string(),
        })
    }

    fn to_json(&self, task: &Task, policy: AttentionPolicy) -> serde_json::Value {
        serde_json::json!({
            "id": task.id, "language": task.language, "policy": policy.describe(),
            "target": task.target.trim_end(), "suggestion": self.suggestion,
            "exact_match": self.exact_match, "edit_similarity": self.edit_similarity,
            "lines_right": self.lines_right, "empty": self.empty, "empty_first_line": self.empty_first_line,
            "kv_bytes": self.kv_bytes, "prompt_tokens": self.prompt_tokens,
            "latency_ms": self.latency_ms, "stop": self.stop,
        })
    }

    /// Score a suggestion's text for `task`.
    fn scored(task: &Task, text: &str, kv_bytes: usize, prompt_tokens: usize, latency_ms: f64, stop: String) -> Self {
        let s = score_kind(task.kind, text, &task.target);
        TaskResult {
            suggestion: s.text,
            exact_match: s.exact_match,
            edit_similarity: s.edit_similarity,
            lines_right: s.lines_right,
            empty: s.empty,
            empty_first_line: s.empty_first_line,
            kv_bytes,
            prompt_tokens,
            latency_ms,
            stop,
        }
    }
}

/// The task lines of an earlier run (`--out` of `--resume`), by task id.
/// Lines of another policy are an error (the file belongs to another run).
/// A `--llama-only` run's lines are done when they carry llama.cpp's answer.
fn read_done(
    path: &Path,
    policy: AttentionPolicy,
    need_full: bool,
    llama_only: bool,
) -> Result<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut done = std::collections::HashMap::new();
    for l in text.lines() {
        // A line cut short by a stopped run is simply run again.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        if v["policy"] != serde_json::Value::String(policy.describe()) {
            bail!("{} holds results of {} , not {}: use another --out", path.display(), v["policy"], policy.describe());
        }
        let main = if llama_only { &v["llama_cpp"] } else { &v };
        let (Some(id), Some(_)) = (v["id"].as_str(), TaskResult::from_json(main)) else { continue };
        if need_full && TaskResult::from_json(&v["full"]).is_none() {
            continue;
        }
        done.insert(id.to_string(), l.to_string());
    }
    Ok(done)
}

/// Run one task under `policy` exactly as a user's completion runs.
pub fn eval_task(engine: &Engine, policy: AttentionPolicy, task: &Task, settings: &Settings) -> TaskResult {
    eval_task_rules(engine, policy, task, settings, &[settings.fresh_line], &[]).remove(0)
}

/// [`eval_task`] once per fresh-line rule, on one prompt cache (prefilled
/// once; generation leaves it as it was).
pub fn eval_task_rules(
    engine: &Engine,
    policy: AttentionPolicy,
    task: &Task,
    settings: &Settings,
    rules: &[FreshLine],
    context: &[u32],
) -> Vec<TaskResult> {
    let text = ropey::Rope::from_str(&format!("{}{}", task.prefix, task.suffix));
    let cursor = task.prefix.len();
    let mut doc = DocumentCache::new(&engine.model, policy);
    doc.set_context(context.to_vec());
    // The server's pipeline; each rule plans the same prompt again (nothing
    // to re-run) and generates anew (nothing was typed, nothing to type through).
    let mut session = completion::Session::default();
    let mut runs = Vec::new();
    for &rule in rules {
        let t0 = Instant::now();
        let s = Settings { fresh_line: rule, ..settings.clone() };
        let run = session.complete_local(engine, &mut doc, &text, cursor, &s, &|| false);
        runs.push((run, t0.elapsed().as_secs_f64() * 1000.0));
    }
    doc.compact();
    let stats = doc.stats();
    runs.into_iter()
        .map(|(run, latency_ms)| {
            let (text, stop) = match run {
                Ok(s) => (s.text, s.stop.map_or_else(String::new, |r| format!("{r:?}"))),
                Err(e) => (String::new(), format!("error: {e:#}")),
            };
            TaskResult::scored(task, &text, stats.kv.kv_bytes, stats.tokens, latency_ms, stop)
        })
        .collect()
}

/// A llama.cpp server to compare with (`--llama-server`).
pub struct LlamaServer {
    host: String,
    port: u16,
}

impl LlamaServer {
    /// From `http://HOST:PORT` (a trailing slash allowed).
    pub fn parse(url: &str) -> Result<LlamaServer> {
        let rest = url.strip_prefix("http://").context("--llama-server takes http://HOST:PORT")?;
        let (host, port) = rest.trim_end_matches('/').rsplit_once(':').context("--llama-server needs a port")?;
        Ok(LlamaServer { host: host.to_string(), port: port.parse().context("--llama-server: bad port")? })
    }

    /// POST `body` (JSON) to `path`; the JSON answer.
    fn post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        use std::io::Read;
        let body = body.to_string();
        let mut s = std::net::TcpStream::connect((self.host.as_str(), self.port))
            .with_context(|| format!("cannot reach llama.cpp's server at {}:{}", self.host, self.port))?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            self.host,
            body.len()
        )?;
        let mut bytes = Vec::new();
        s.read_to_end(&mut bytes)?;
        let answer = String::from_utf8_lossy(&bytes);
        let (head, body) = answer.split_once("\r\n\r\n").context("no HTTP answer")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("{}: {body}", head.lines().next().unwrap_or(""));
        }
        Ok(serde_json::from_str(body)?)
    }
}

/// One task answered by llama.cpp's `/completion` on the same prompt tokens
/// as ours (lead tokens with the task's project context, the window up to
/// the cursor — not cut for healing — and the fill-in-the-middle tail),
/// greedy: scored raw (its first line, or its first `max_lines` lines for
/// blocks) and through our clean-up rules.
fn llama_task(
    engine: &Engine,
    server: &LlamaServer,
    task: &Task,
    settings: &Settings,
    context: &[u32],
) -> Result<(TaskResult, TaskResult)> {
    let t0 = Instant::now();
    let text = format!("{}{}", task.prefix, task.suffix);
    let cursor = task.prefix.len();
    let p = completion::plan(&text, cursor, None, settings);
    let following = &text[cursor..];
    let mut prompt = completion::lead_with_context(engine, settings, context);
    prompt.extend(engine.tokenizer.encode(&text[p.window_start..cursor])?);
    prompt.extend(completion::fim_tail(engine, following, settings)?);
    let answer = server.post(
        "/completion",
        &serde_json::json!({
            "prompt": prompt, "n_predict": settings.max_tokens, "temperature": 0.0, "top_k": 1,
            "cache_prompt": false, "stream": false,
        }),
    )?;
    let content = answer["content"].as_str().context("no \"content\" in llama.cpp's answer")?;
    let latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let stop = answer["stop_type"].as_str().unwrap_or("?").to_string();
    let raw: String = content.split('\n').take(settings.max_lines).collect::<Vec<_>>().join("\n");
    let ruled = completion::finish(content, &p, following, settings);
    Ok((
        TaskResult::scored(task, &raw, 0, prompt.len(), latency_ms, stop.clone()),
        TaskResult::scored(task, &ruled, 0, prompt.len(), latency_ms, stop),
    ))
}

/// The first line of a suggestion, trailing whitespace trimmed.
pub fn first_line(s: &str) -> &str {
    s.split('\n').next().unwrap_or("").trim_end()
}

/// Exact match (after trimming trailing whitespace) and edit similarity of a
/// suggestion's first line against the target.
pub fn score(suggestion: &str, target: &str) -> (bool, f64) {
    let (a, b) = (first_line(suggestion), target.trim_end());
    (a == b, edit_similarity(a, b))
}

/// How a suggestion scored against a task's target.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// What was compared (first line, or the block with each line's
    /// trailing whitespace and trailing blank lines trimmed).
    pub text: String,
    pub exact_match: bool,
    pub edit_similarity: f64,
    pub lines_right: f64,
    pub empty: bool,
    pub empty_first_line: bool,
}

/// Score `suggestion` against `target` as `kind` asks: line kinds by the
/// first line, blocks by the whole text and line by line.
pub fn score_kind(kind: TaskKind, suggestion: &str, target: &str) -> Scored {
    let empty = suggestion.trim().is_empty();
    let empty_first_line = !empty && first_line(suggestion).trim().is_empty();
    let (text, want) = match kind {
        TaskKind::Block => (block_text(suggestion), block_text(target)),
        _ => (first_line(suggestion).to_string(), target.trim_end().to_string()),
    };
    let ours: Vec<&str> = text.split('\n').collect();
    let wanted: Vec<&str> = want.split('\n').collect();
    let right = wanted.iter().enumerate().filter(|(i, l)| ours.get(*i) == Some(*l)).count();
    Scored {
        exact_match: text == want,
        edit_similarity: edit_similarity(&text, &want),
        lines_right: right as f64 / wanted.len() as f64,
        text,
        empty,
        empty_first_line,
    }
}

/// A block as compared: each line's trailing whitespace and the trailing
/// blank lines trimmed (`\r\n` read as `\n`).
fn block_text(s: &str) -> String {
    let lines: Vec<&str> = s.split('\n').map(str::trim_end).collect();
    lines.join("\n").trim_end().to_string()
}

/// 1 − Levenshtein distance / length of the longer string, over characters
/// (1 for two empty strings).
pub fn edit_similarity(a: &str, b: &str) -> f64 {
    let n = a.chars().count().max(b.chars().count());
    if n == 0 {
        return 1.0;
    }
    1.0 - levenshtein(a, b) as f64 / n as f64
}

/// Levenshtein distance over characters.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Means over a run's tasks.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub tasks: usize,
    pub exact_match: f64,
    pub edit_similarity: f64,
    pub lines_right: f64,
    /// Share of empty suggestions.
    pub empty: f64,
    /// Share of non-empty suggestions with an empty first line.
    pub empty_first_line: f64,
    pub kv_bytes: f64,
    pub latency_ms: f64,
}

impl Summary {
    pub fn of(results: &[TaskResult]) -> Summary {
        let n = results.len();
        let mean = |f: &dyn Fn(&TaskResult) -> f64| {
            if n == 0 {
                0.0
            } else {
                results.iter().map(f).sum::<f64>() / n as f64
            }
        };
        let share = |f: &dyn Fn(&TaskResult) -> bool| mean(&|r| f64::from(u8::from(f(r))));
        Summary {
            tasks: n,
            exact_match: share(&|r| r.exact_match),
            edit_similarity: mean(&|r| r.edit_similarity),
            lines_right: mean(&|r| r.lines_right),
            empty: share(&|r| r.empty),
            empty_first_line: share(&|r| r.empty_first_line),
            kv_bytes: mean(&|r| r.kv_bytes as f64),
            latency_ms: mean(&|r| r.latency_ms),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tasks": self.tasks, "exact_match": self.exact_match,
            "edit_similarity": self.edit_similarity, "lines_right": self.lines_right,
            "empty": self.empty, "empty_first_line": self.empty_first_line,
            "kv_bytes": self.kv_bytes, "latency_ms": self.latency_ms,
        })
    }
}

/// The summary line: the policy's means, and with `full` the full policy's
/// and the ratios (policy over full).
pub fn summary_json(ours: &Summary, policy: AttentionPolicy, full: Option<&Summary>) -> serde_json::Value {
    let mut v = ours.to_json();
    v["policy"] = serde_json::Value::String(policy.describe());
    if let Some(f) = full {
        let ratio = |a: f64, b: f64| if b == 0.0 { serde_json::Value::Null } else { serde_json::json!(a / b) };
        v["full"] = f.to_json();
        v["edit_similarity_ratio"] = ratio(ours.edit_similarity, f.edit_similarity);
        v["kv_ratio"] = ratio(ours.kv_bytes, f.kv_bytes);
    }
    v
}

/// Read a JSON-lines task file.
pub fn read_tasks(path: &Path) -> Result<Vec<Task>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: not a task", path.display(), i + 1)))
        .collect()
}

// ---------------------------------------------------------------------------
// Task building

/// A small deterministic generator (SplitMix64), so that task sets do not
/// depend on a crate's version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform below `n` (> 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The language of a file, by extension.
pub fn language_of(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?;
    if name.ends_with(".min.js") {
        return None;
    }
    match path.extension()?.to_str()? {
        "py" => Some("python"),
        "rs" => Some("rust"),
        "js" | "mjs" | "cjs" => Some("javascript"),
        "ts" if !name.ends_with(".d.ts") => Some("typescript"),
        _ => None,
    }
}

/// Whether a line is worth a cursor: not blank, not comment-only.
pub fn is_code_line(line: &str, language: &str) -> bool {
    let t = line.trim();
    if t.is_empty() {
        return false;
    }
    let comment = match language {
        "python" => t.starts_with('#') || t.starts_with("\"\"\"") || t.starts_with("'''"),
        _ => t.starts_with("//") || t.starts_with("/*") || t.starts_with('*'),
    };
    !comment
}

/// Pick up to `k` mid-line tasks in one file's `text`. `id` prefixes the task ids.
#[allow(clippy::too_many_arguments)]
pub fn tasks_in_file(
    text: &str,
    language: &str,
    id: &str,
    k: usize,
    max_prefix: usize,
    max_suffix: usize,
    min_prefix: usize,
    rng: &mut Rng,
) -> Vec<Task> {
    let caps = Caps { max_prefix, max_suffix, min_prefix, max_lines: 8 };
    tasks_of_kind(TaskKind::MidLine, text, language, id, k, &caps, rng, None)
}

/// Limits of a task's document and target.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Most bytes of document before the cursor's line (whole lines).
    pub max_prefix: usize,
    /// Most bytes of document after the removed text (whole lines).
    pub max_suffix: usize,
    /// Only cursors with at least this many bytes of the file before their line.
    pub min_prefix: usize,
    /// Most lines of a block.
    pub max_lines: usize,
}

/// Leading spaces and tabs of a line, in bytes.
fn indent_len(line: &str) -> usize {
    line.len() - line.trim_start_matches([' ', '\t']).len()
}

/// Whether a line opens a block: it ends with `:` (Python) or `{`.
fn opens_block(line: &str, language: &str) -> bool {
    let t = line.trim_end();
    if language == "python" {
        t.ends_with(':')
    } else {
        t.ends_with('{')
    }
}

/// Where `line` first uses one of `names` as a whole word, if it is not an
/// import line (the byte offset in the line).
fn cross_file_use(line: &str, names: &HashSet<String>, language: &str) -> Option<usize> {
    let t = line.trim_start();
    // Rust visibility before `use` / `mod` (`pub(crate) use a::b;`).
    let t = match t.strip_prefix("pub") {
        Some(rest) if rest.starts_with('(') => rest.split_once(')').map_or(rest, |(_, r)| r).trim_start(),
        Some(rest) => rest.trim_start(),
        None => t,
    };
    if ["import ", "from ", "use ", "mod ", "export ", "#["].iter().any(|k| t.starts_with(k)) || t.contains("require(")
    {
        return None;
    }
    let is_word = |c: char| c == '_' || c.is_alphanumeric();
    let mut at = 0;
    for word in line.split(|c: char| !is_word(c)) {
        let start = at;
        at += word.len() + 1;
        if !word.is_empty() && names.contains(word) {
            // Not a field or method of something else (`x.name`).
            if start > 0 && line[..start].ends_with('.') {
                continue;
            }
            // Not inside a string literal (`"feature"`, a message) or a comment.
            if in_string(&line[..start], language) || in_comment(&line[..start], language) {
                continue;
            }
            // Not a name being bound (a parameter `name: T`, a keyword argument
            // or an assignment `name = ...`): a use, not a definition.
            let after = line[start + word.len()..].trim_start();
            let binds = (after.starts_with(':') && !after.starts_with("::"))
                || (after.starts_with('=') && !after.starts_with("=="));
            // Nor the name of a new definition (`def name`, `fn name`) or a
            // binding of its own (`catch (name)`, `let name`).
            let prev = line[..start].trim_end().trim_end_matches(['(', '*']).trim_end();
            let prev_word = prev.rsplit(|c: char| !is_word(c)).next().unwrap_or("");
            let defines = [
                "def", "fn", "function", "class", "struct", "enum", "trait", "type", "let", "var", "const", "catch",
                "as", "mut", "static",
            ]
            .contains(&prev_word);
            if binds || defines {
                continue;
            }
            return Some(start);
        }
    }
    None
}

/// Whether the end of `before` (the start of a line up to a position) is
/// inside a string literal: an odd number of unescaped quotes (in Rust only
/// `"`, since `'` also starts lifetimes).
fn in_string(before: &str, language: &str) -> bool {
    let quotes: &[char] = match language {
        "rust" => &['"'],
        "python" => &['"', '\''],
        _ => &['"', '\'', '`'],
    };
    let mut open: Option<char> = None;
    let mut escaped = false;
    for c in before.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if let Some(q) = open {
            if c == q {
                open = None;
            }
        } else if quotes.contains(&c) {
            open = Some(c);
        }
    }
    open.is_some()
}

/// Whether `before` (a line up to a position) has opened a line comment
/// outside any string.
fn in_comment(before: &str, language: &str) -> bool {
    let marker = if language == "python" { "#" } else { "//" };
    let mut from = 0;
    while let Some(i) = before[from..].find(marker) {
        if !in_string(&before[..from + i], language) {
            return true;
        }
        from += i + marker.len();
    }
    false
}

/// Lines inside a multi-line import list (`from a import (` ... `)`,
/// `use a::{` ... `};`): names there are imported, not used.
fn import_list_lines(text: &str) -> Vec<bool> {
    let mut open: Option<char> = None;
    text.split('\n')
        .map(|line| {
            let inside = open.is_some();
            match open {
                Some(close) => {
                    if line.contains(close) {
                        open = None;
                    }
                }
                None => {
                    let t = line.trim_start();
                    let t = t.strip_prefix("pub ").unwrap_or(t);
                    if t.starts_with("from ") || t.starts_with("import ") || t.starts_with("use ") {
                        open = [('(', ')'), ('{', '}')]
                            .into_iter()
                            .find(|&(o, c)| line.matches(o).count() > line.matches(c).count())
                            .map(|(_, c)| c);
                    }
                }
            }
            inside
        })
        .collect()
}

/// Lines that lie in a multi-line string or comment (Python's triple-quoted
/// strings and docstrings, `/* ... */`): prose, not code, even where a line
/// looks like code.
fn prose_lines(text: &str, language: &str) -> Vec<bool> {
    let delims: &[(&str, &str)] = match language {
        "python" => &[("\"\"\"", "\"\"\""), ("'''", "'''")],
        _ => &[("/*", "*/")],
    };
    let mut open: Option<&str> = None;
    text.split('\n')
        .map(|line| {
            // Prose: the line starts inside one, or opens one first thing.
            let prose = open.is_some() || delims.iter().any(|(o, _)| line.trim_start().starts_with(o));
            let mut rest = line;
            loop {
                match open {
                    Some(close) => match rest.find(close) {
                        Some(i) => {
                            rest = &rest[i + close.len()..];
                            open = None;
                        }
                        None => break,
                    },
                    None => {
                        let next = delims.iter().filter_map(|&(o, c)| rest.find(o).map(|i| (i, o, c))).min();
                        match next {
                            Some((i, o, c)) => {
                                rest = &rest[i + o.len()..];
                                open = Some(c);
                            }
                            None => break,
                        }
                    }
                }
            }
            prose
        })
        .collect()
}

/// The names that `file` (text `text`, in project `root`) can only know from
/// the files it imports: defined there, not defined in `text` itself.
pub fn imported_names(file: &Path, text: &str, root: &Path) -> HashSet<String> {
    let items = context::items(text);
    let own: HashSet<&str> = items.iter().flat_map(|(_, t)| context::defined_names(t)).collect();
    let mut names = HashSet::new();
    let lang = context::Lang::of(file);
    for imp in context::imports(lang, text) {
        for p in context::resolve(&imp, file, root) {
            let Ok(other) = std::fs::read_to_string(&p) else { continue };
            for (_, item) in context::items(&other) {
                // Top-level definitions only: a local variable or a method
                // (used as `x.m`) is not what another file imports.
                let top: String = item.lines().filter(|l| !l.starts_with([' ', '\t'])).collect::<Vec<_>>().join("\n");
                for n in context::defined_names(&top) {
                    if n.len() >= 3 && !own.contains(n) {
                        names.insert(n.to_string());
                    }
                }
            }
        }
    }
    names
}

/// Pick up to `k` tasks of `kind` in one file's `text`. `id` prefixes the task ids.
#[allow(clippy::too_many_arguments)]
pub fn tasks_of_kind(
    kind: TaskKind,
    text: &str,
    language: &str,
    id: &str,
    k: usize,
    caps: &Caps,
    rng: &mut Rng,
    cross: Option<&HashSet<String>>,
) -> Vec<Task> {
    draw_tasks(kind, text, language, id, k, caps, rng, cross, None).into_iter().map(|d| d.task).collect()
}

/// A task as drawn from its file: where its cursor and removed text are.
#[derive(Clone, Debug)]
pub struct Drawn {
    pub task: Task,
    /// The removed text's byte range in the file (from the cursor).
    pub removed: std::ops::Range<usize>,
    /// The first and last line of the removed text (1-based).
    pub lines: (usize, usize),
}

/// [`tasks_of_kind`] with each task's place in the file, drawing only among
/// the candidates whose removed lines (1-based, first and last) `keep`
/// accepts, when given.
#[allow(clippy::too_many_arguments)]
pub fn draw_tasks(
    kind: TaskKind,
    text: &str,
    language: &str,
    id: &str,
    k: usize,
    caps: &Caps,
    rng: &mut Rng,
    cross: Option<&HashSet<String>>,
    keep: Option<&dyn Fn(usize, usize) -> bool>,
) -> Vec<Drawn> {
    if text.contains('\r') {
        return Vec::new();
    }
    // Line starts; line i spans starts[i]..starts[i+1]-1 (without its '\n').
    let mut starts = vec![0];
    starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
    let line_end = |i: usize| text[starts[i]..].find('\n').map_or(text.len(), |e| starts[i] + e);
    let line = |i: usize| &text[starts[i]..line_end(i)];
    // A block task's last line: its first line's indentation level ends at
    // the next non-blank line indented less; trailing blank lines are not
    // part of it. `None`: not a block's first line, or too long.
    let block_last = |i: usize| -> Option<usize> {
        let prev = (0..i).rev().find(|&j| !line(j).trim().is_empty())?;
        let indent = indent_len(line(i));
        if !opens_block(line(prev), language) || indent_len(line(prev)) >= indent {
            return None;
        }
        let mut last = i;
        for j in i + 1..starts.len() {
            let l = line(j);
            if l.trim().is_empty() {
                continue;
            }
            if indent_len(l) < indent {
                break;
            }
            last = j;
        }
        let n = last - i + 1;
        (2..=caps.max_lines).contains(&n).then_some(last)
    };
    // Candidates: code lines after the first (the prompt must not be empty),
    // of reasonable length, with at least `min_prefix` bytes before them.
    let prose: Vec<bool> = if cross.is_some() {
        prose_lines(text, language).into_iter().zip(import_list_lines(text)).map(|(a, b)| a || b).collect()
    } else {
        Vec::new()
    };
    let mut candidates: Vec<usize> = (1..starts.len())
        .filter(|&i| starts[i] >= caps.min_prefix)
        .filter(|&i| line(i).len() <= 200 && is_code_line(line(i), language))
        .filter(|&i| match kind {
            TaskKind::Block => block_last(i).is_some_and(|last| (i..=last).all(|j| line(j).len() <= 200)),
            _ => true,
        })
        .filter(|&i| {
            cross.is_none_or(|names| {
                !prose.get(i).copied().unwrap_or(false) && cross_file_use(line(i), names, language).is_some()
            })
        })
        .filter(|&i| {
            keep.is_none_or(|keep| {
                let last = if kind == TaskKind::Block { block_last(i).expect("a candidate") } else { i };
                keep(i + 1, last + 1)
            })
        })
        .collect();
    rng.shuffle(&mut candidates);
    candidates.truncate(k);
    candidates.sort_unstable();
    let mut tasks = Vec::new();
    for i in candidates {
        let (ls, le) = (starts[i], line_end(i));
        let indent = line(i).len() - line(i).trim_start().len();
        // The cursor, and the last line of the text removed after it.
        let (cursor, last) = match kind {
            TaskKind::MidLine if cross.is_some() => {
                // At the name from another file: the target is its use (name, arguments).
                (ls + cross.and_then(|names| cross_file_use(line(i), names, language)).expect("a candidate"), i)
            }
            TaskKind::MidLine => {
                let content: Vec<(usize, char)> = line(i)[indent..].trim_end().char_indices().collect();
                // Cursor at a character of the content, so that the target is never empty.
                let (off, _) = content[rng.below(content.len())];
                (ls + indent + off, i)
            }
            TaskKind::FreshLine => (ls + indent, i),
            TaskKind::Block => (ls + indent, block_last(i).expect("a candidate")),
        };
        let removed_end = line_end(last);
        let target = match kind {
            TaskKind::Block => block_text(&text[cursor..removed_end]),
            _ => text[cursor..le].trim_end().to_string(),
        };
        // Whole lines around the cursor, within the caps.
        let first = starts[..=i].partition_point(|&s| s + caps.max_prefix < ls);
        let doc_start = starts[first.min(i)];
        let mut doc_end = removed_end;
        for j in last + 1..starts.len() {
            let e = line_end(j);
            if e - removed_end > caps.max_suffix {
                break;
            }
            doc_end = e;
        }
        let col = text[ls..cursor].chars().count() + 1;
        let task = Task {
            id: format!("{id}:{}:{col}", i + 1),
            language: language.to_string(),
            kind,
            prefix: text[doc_start..cursor].to_string(),
            suffix: text[removed_end..doc_end].to_string(),
            target,
            path: None,
            root: None,
            open: Vec::new(),
            runnable: None,
        };
        tasks.push(Drawn { task, removed: cursor..removed_end, lines: (i + 1, last + 1) });
    }
    tasks
}

/// Source files under `dir`, sorted (hidden folders, `__pycache__` and
/// `site-packages` skipped; files over 256 KiB or with very long lines too).
pub fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if !name.starts_with('.') && name != "__pycache__" && name != "site-packages" {
                    stack.push(p);
                }
            } else if ft.is_file()
                && language_of(&p).is_some()
                && e.metadata().is_ok_and(|m| m.len() >= 200 && m.len() <= 256 * 1024)
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Build tasks from the folders: files shuffled per folder, taken in turn
/// from each folder up to `files`, `per_file` tasks each.
pub fn build_tasks(a: &BuildTasksArgs) -> Result<Vec<Task>> {
    let mut rng = Rng::new(a.seed);
    let mut pools: Vec<(String, PathBuf, Vec<PathBuf>)> = Vec::new();
    for dir in &a.from {
        if !dir.is_dir() {
            bail!("{} is not a folder", dir.display());
        }
        let mut files = source_files(dir);
        rng.shuffle(&mut files);
        let label = dir.file_name().map_or_else(|| "root".to_string(), |n| n.to_string_lossy().into_owned());
        pools.push((label, dir.clone(), files));
    }
    let want = a.files.unwrap_or(usize::MAX);
    let mut tasks = Vec::new();
    let mut used = 0;
    let mut next = vec![0usize; pools.len()];
    'outer: while used < want {
        let mut progressed = false;
        for (pi, (label, root, files)) in pools.iter().enumerate() {
            if used >= want {
                break 'outer;
            }
            // The next file of this folder that yields tasks.
            while next[pi] < files.len() {
                let f = &files[next[pi]];
                next[pi] += 1;
                let Ok(text) = std::fs::read_to_string(f) else { continue };
                if text.lines().any(|l| l.len() > 1000) || text.lines().count() < a.min_file_lines {
                    continue;
                }
                let lang = language_of(f).unwrap_or("text");
                let rel = f.strip_prefix(root).unwrap_or(f);
                let id = format!("{label}/{}", rel.display());
                let caps = Caps {
                    max_prefix: a.max_prefix_bytes,
                    max_suffix: a.max_suffix_bytes,
                    min_prefix: a.min_prefix_bytes,
                    max_lines: a.max_lines,
                };
                let names = a.cross_file.then(|| imported_names(f, &text, root));
                if names.as_ref().is_some_and(HashSet::is_empty) {
                    continue;
                }
                let kind = if a.cross_file { TaskKind::MidLine } else { a.kind };
                // Python blocks: the file's doctests and the lines each one runs.
                let module = (kind == TaskKind::Block && lang == "python" && (a.runnable || a.runnable_only))
                    .then(|| exec::module_name(root, f))
                    .flatten()
                    .filter(|m| exec::has_doctests(m, &text));
                if a.runnable_only && module.is_none() {
                    continue;
                }
                let traced = match &module {
                    Some(m) => exec::trace(f, m)?,
                    None => Vec::new(),
                };
                let exercised = |first: usize, last: usize| !exec::exercising(&traced, first, last).is_empty();
                let keep: Option<&dyn Fn(usize, usize) -> bool> = a.runnable_only.then_some(&exercised);
                let drawn = draw_tasks(kind, &text, lang, &id, a.per_file, &caps, &mut rng, names.as_ref(), keep);
                let mut t = Vec::new();
                for Drawn { mut task, removed, lines } in drawn {
                    let doctests = exec::exercising(&traced, lines.0, lines.1);
                    if let Some(module) = module.clone().filter(|_| !doctests.is_empty()) {
                        task.runnable =
                            Some(exec::Runnable { module, start: removed.start, end: removed.end, doctests });
                    }
                    t.push(task);
                }
                // The file, its project and a few neighbours as open files (context sources).
                let abs = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
                let project = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
                let siblings = f.parent().and_then(|d| std::fs::read_dir(d).ok());
                let mut open: Vec<PathBuf> = siblings
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|g| g != f && g.is_file() && language_of(g).is_some())
                    .filter_map(|g| std::fs::canonicalize(g).ok())
                    .collect();
                open.sort();
                rng.shuffle(&mut open);
                open.truncate(a.open_files);
                for task in &mut t {
                    task.path = Some(abs.clone());
                    task.root = Some(project.clone());
                    task.open = open.clone();
                }
                if !t.is_empty() {
                    tasks.extend(t);
                    used += 1;
                    progressed = true;
                    break;
                }
            }
        }
        if !progressed {
            break;
        }
    }
    Ok(tasks)
}

fn build_tasks_cmd(a: &BuildTasksArgs) -> Result<()> {
    let tasks = build_tasks(a)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&a.out).with_context(|| format!("cannot write {}", a.out.display()))?,
    );
    for t in &tasks {
        writeln!(w, "{}", serde_json::to_string(t)?)?;
    }
    w.flush()?;
    eprintln!("wrote {} tasks to {}", tasks.len(), a.out.display());
    if a.runnable || a.runnable_only {
        let n = tasks.iter().filter(|t| t.runnable.is_some()).count();
        eprintln!("{n} of them runnable (the file's doctests run the block)");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Plot

/// Flags of `anchorcoder eval plot`.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// Grid results: JSON lines, each an `eval` summary (`policy`,
    /// `edit_similarity`, `kv_bytes`), as tests/bench/eval-grid.sh writes them.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// The SVG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Title above the plot.
    #[arg(long, default_value = "Edit similarity against KV bytes")]
    pub title: String,
}

/// One point of a grid: a policy's mean edit similarity and KV bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct GridPoint {
    /// `full`, `anchor` or `window`.
    pub family: String,
    /// Short label (e.g. `R8`, `R8 S16`, `W263`).
    pub label: String,
    /// Whether the point is on the family's main curve (anchor: S=4 and no
    /// dense layers; window: S=4); the others are drawn as loose markers.
    pub main: bool,
    pub edit_similarity: f64,
    pub kv_bytes: f64,
}

impl GridPoint {
    /// From an `eval` summary line (its `policy` is `AttentionPolicy::describe`).
    pub fn from_summary(v: &serde_json::Value) -> Result<GridPoint> {
        let policy = v["policy"].as_str().context("no \"policy\" string")?;
        let es = v["edit_similarity"].as_f64().context("no \"edit_similarity\" number")?;
        let kv = v["kv_bytes"].as_f64().context("no \"kv_bytes\" number")?;
        let family = policy.split('(').next().unwrap_or("").trim().to_string();
        // "anchor(R=8, S=4, dense_every=0)" → [("R", 8), ("S", 4), ("dense_every", 0)]
        let knobs: Vec<(&str, u64)> = policy
            .split_once('(')
            .map(|(_, rest)| rest.trim_end_matches(')'))
            .unwrap_or("")
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim(), v.trim().parse().ok()?))
            })
            .collect();
        let knob = |k: &str| knobs.iter().find(|(n, _)| *n == k).map(|&(_, v)| v);
        let (sinks, dense) = (knob("S").unwrap_or(4), knob("dense_every").unwrap_or(0));
        let extra = |label: String| {
            let mut l = label;
            if sinks != 4 {
                l += &format!(" S{sinks}");
            }
            if dense != 0 {
                l += &format!(" D{dense}");
            }
            l
        };
        let (label, main) = match family.as_str() {
            "full" => ("full".to_string(), true),
            "anchor" => {
                (extra(format!("R{}", knob("R").context("anchor policy without R")?)), sinks == 4 && dense == 0)
            }
            "window" => (extra(format!("W{}", knob("W").context("window policy without W")?)), sinks == 4),
            other => bail!("unknown policy family {other:?} in {policy:?}"),
        };
        Ok(GridPoint { family, label, main, edit_similarity: es, kv_bytes: kv })
    }
}

/// Read a grid's result lines (blank lines skipped).
pub fn read_grid(path: &Path) -> Result<Vec<GridPoint>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value =
                serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            GridPoint::from_summary(&v).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

fn plot_cmd(a: &PlotArgs) -> Result<()> {
    let points = read_grid(&a.input)?;
    let svg = plot_svg(&points, &a.title)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, svg).with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!("wrote {} points to {}", points.len(), a.out.display());
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A dependency-free SVG of edit similarity (y) against KV bytes (x, log
/// scale, MB with the share of `full`'s): the anchor and window families as
/// curves, variants as loose markers, `full` as a diamond, and the target's
/// guides (97% of full's edit similarity, 20% of its KV bytes).
pub fn plot_svg(points: &[GridPoint], title: &str) -> Result<String> {
    use std::fmt::Write as _;
    if points.is_empty() {
        bail!("no points to plot");
    }
    if let Some(p) = points.iter().find(|p| p.kv_bytes.is_nan() || p.kv_bytes <= 0.0 || !p.edit_similarity.is_finite())
    {
        bail!("point {} has KV bytes {} and edit similarity {}: cannot plot", p.label, p.kv_bytes, p.edit_similarity);
    }
    let full = points.iter().find(|p| p.family == "full");
    let (w, h) = (760.0, 500.0);
    let (l, r, t, b) = (70.0, 150.0, 40.0, 60.0);
    let (pw, ph) = (w - l - r, h - t - b);
    // Axes: x log10(MB), y edit similarity, both over the data padded.
    let mb = |p: &GridPoint| p.kv_bytes / 1e6;
    let (mut x0, mut x1) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(mb(p)), hi.max(mb(p))));
    (x0, x1) = (x0.log10() - 0.1, x1.log10() + 0.1);
    let (mut y0, mut y1) =
        points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.edit_similarity), hi.max(p.edit_similarity)));
    if let Some(f) = full {
        y0 = y0.min(0.97 * f.edit_similarity);
    }
    y0 = (y0 - 0.02).floor_to(0.05).max(0.0);
    y1 = (y1 + 0.02).ceil_to(0.05).min(1.0);
    if y1 <= y0 {
        y1 = y0 + 0.05;
    }
    let px = |mb: f64| l + (mb.log10() - x0) / (x1 - x0) * pw;
    let py = |es: f64| t + (1.0 - (es - y0) / (y1 - y0)) * ph;

    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>
"##,
        l + pw / 2.0,
        xml_escape(title)
    );
    // Grid lines and ticks: 1, 2, 5 × 10^k MB on x; every 0.05 on y.
    let mut decade = x0.floor() as i32;
    while f64::from(decade) <= x1 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(decade);
            let lv = v.log10();
            if lv < x0 - 1e-9 || lv > x1 + 1e-9 {
                continue;
            }
            let x = px(v);
            let label = match full {
                Some(f) => format!("{} ({:.0}%)", trim_num(v), 100.0 * v * 1e6 / f.kv_bytes),
                None => trim_num(v),
            };
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="10">{label}</text>"##,
                t + ph,
                t + ph + 14.0
            );
        }
        decade += 1;
    }
    let steps = ((y1 - y0) / 0.05).round() as i32;
    for i in 0..=steps {
        let v = y0 + f64::from(i) * 0.05;
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" font-size="10">{v:.2}</text>"##,
            l + pw,
            l - 6.0,
            y + 3.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">KV cache at the cursor, MB (share of full's), log scale</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">edit similarity (first line)</text>"#,
        l + pw / 2.0,
        h - 18.0,
        t + ph / 2.0,
        t + ph / 2.0
    );
    // The target's guides.
    if let Some(f) = full {
        let y = py(0.97 * f.edit_similarity);
        let x = px(0.2 * f.kv_bytes / 1e6);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#2a2" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" fill="#2a2" font-size="10">97% of full's edit similarity</text>"##,
            l + pw,
            l + 4.0,
            y - 4.0
        );
        if x >= l && x <= l + pw {
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{}" stroke="#2a2" stroke-dasharray="6 4"/><text x="{:.1}" y="{}" fill="#2a2" font-size="10">20% of full's KV</text>"##,
                t + ph,
                x + 4.0,
                t + 12.0
            );
        }
    }
    // Curves, then markers with labels.
    let families = [("anchor", "#1f5fbf"), ("window", "#d2691e")];
    for (fam, color) in families {
        let mut main: Vec<&GridPoint> = points.iter().filter(|p| p.family == fam && p.main).collect();
        main.sort_by(|a, b| a.kv_bytes.total_cmp(&b.kv_bytes));
        if main.len() > 1 {
            let d: Vec<String> =
                main.iter().map(|p| format!("{:.1},{:.1}", px(mb(p)), py(p.edit_similarity))).collect();
            let _ =
                writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, d.join(" "));
        }
    }
    for p in points {
        let (x, y) = (px(mb(p)), py(p.edit_similarity));
        let color = families.iter().find(|(f, _)| *f == p.family).map_or("#000", |&(_, c)| c);
        let fill = if p.main { color } else { "white" };
        let shape = match p.family.as_str() {
            "full" => format!(
                r##"<path d="M{x:.1},{:.1} L{:.1},{y:.1} L{x:.1},{:.1} L{:.1},{y:.1} Z" fill="#000"/>"##,
                y - 7.0,
                x + 7.0,
                y + 7.0,
                x - 7.0
            ),
            "window" => format!(
                r#"<rect x="{:.1}" y="{:.1}" width="9" height="9" fill="{fill}" stroke="{color}" stroke-width="1.5"/>"#,
                x - 4.5,
                y - 4.5
            ),
            _ => {
                format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="5" fill="{fill}" stroke="{color}" stroke-width="1.5"/>"#)
            }
        };
        let _ = writeln!(
            s,
            r#"{shape}<text x="{:.1}" y="{:.1}" font-size="10" fill="{color}">{}</text>"#,
            x + 7.0,
            y - 6.0,
            xml_escape(&p.label)
        );
    }
    // Legend.
    let lx = l + pw + 14.0;
    let _ = writeln!(
        s,
        r##"<circle cx="{lx}" cy="{}" r="5" fill="#1f5fbf"/><text x="{}" y="{}">anchor, S=4</text>
<circle cx="{lx}" cy="{}" r="5" fill="white" stroke="#1f5fbf" stroke-width="1.5"/><text x="{}" y="{}">anchor, other S/D</text>
<rect x="{}" y="{}" width="9" height="9" fill="#d2691e"/><text x="{}" y="{}">window</text>
<path d="M{lx},{} l7,7 l-7,7 l-7,-7 Z" fill="#000"/><text x="{}" y="{}">full</text>"##,
        t + 20.0,
        lx + 10.0,
        t + 24.0,
        t + 40.0,
        lx + 10.0,
        t + 44.0,
        lx - 4.5,
        t + 55.5,
        lx + 10.0,
        t + 64.0,
        t + 73.0,
        lx + 10.0,
        t + 84.0
    );
    s.push_str("</svg>\n");
    Ok(s)
}

/// A tick value without trailing zeros (0.5, 2, 50).
fn trim_num(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Rounding to a multiple of a step, down and up.
trait RoundTo {
    fn floor_to(self, step: f64) -> f64;
    fn ceil_to(self, step: f64) -> f64;
}

impl RoundTo for f64 {
    fn floor_to(self, step: f64) -> f64 {
        (self / step).floor() * step
    }
    fn ceil_to(self, step: f64) -> f64 {
        (self / step).ceil() * step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levenshtein_and_edit_similarity() {
        assert_eq!(levenshtein("", ""), 0);
        assert_eq!(levenshtein("abc", ""), 3);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("é", "e"), 1, "over characters, not bytes");
        assert_eq!(edit_similarity("", ""), 1.0);
        assert_eq!(edit_similarity("abc", ""), 0.0);
        assert!((edit_similarity("kitten", "sitting") - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
    }

    #[test]
    fn scoring_cuts_to_the_first_line_and_trims_trailing_space() {
        assert_eq!(score("x + 1)  \nmore", "x + 1)\t"), (true, 1.0));
        let (exact, es) = score("x + 2)", "x + 1)");
        assert!(!exact);
        assert!((es - (1.0 - 1.0 / 6.0)).abs() < 1e-12);
        assert_eq!(score("", "foo"), (false, 0.0));
        assert!(!score(" x", "x").0, "leading whitespace counts");
    }

    const PY: &str = "import os\n\n# a comment\ndef f(x):\n    # inner comment\n    y = x + 1\n\n    return y * 2\n";

    #[test]
    fn tasks_skip_blank_and_comment_lines_and_start_after_indentation() {
        for seed in 0..50 {
            let mut rng = Rng::new(seed);
            let tasks = tasks_in_file(PY, "python", "t.py", 10, 10_000, 10_000, 0, &mut rng);
            // Code lines after the first: `def f`, `y = ...`, `return ...`.
            assert_eq!(tasks.len(), 3);
            for t in &tasks {
                assert!(!t.target.is_empty());
                assert_eq!(t.target, t.target.trim_end());
                let doc = format!("{}{}", t.prefix, t.suffix);
                let line_start = t.prefix.rfind('\n').map_or(0, |i| i + 1);
                let before = &t.prefix[line_start..];
                let line = format!("{before}{}", t.target);
                assert!(is_code_line(&line, "python"), "{line:?}");
                assert!(PY.contains(&format!("{line}\n")), "{line:?}");
                // The cursor is after the indentation.
                let indent = line.len() - line.trim_start().len();
                assert!(before.len() >= indent);
                // The document is the file minus the target.
                assert_eq!(doc.len() + t.target.len(), PY.len());
                assert!(t.suffix.is_empty() || t.suffix.starts_with('\n'));
            }
        }
    }

    const BLOCKS: &str = "import os\n\ndef f(x):\n    y = x + 1\n    for i in y:\n        print(i)\n\n        z = i\n    return y\n\n\nclass A:\n    pass\n\nif x:\n    a = 1\n    b = 2\n";

    #[test]
    fn fresh_line_tasks_leave_the_line_indented_and_empty() {
        let caps = Caps { max_prefix: 10_000, max_suffix: 10_000, min_prefix: 0, max_lines: 8 };
        let tasks = tasks_of_kind(TaskKind::FreshLine, PY, "python", "t.py", 10, &caps, &mut Rng::new(1), None);
        assert_eq!(tasks.len(), 3);
        for t in &tasks {
            assert_eq!(t.kind, TaskKind::FreshLine);
            let before = &t.prefix[t.prefix.rfind('\n').map_or(0, |i| i + 1)..];
            assert!(before.chars().all(|c| c == ' '), "{before:?}");
            assert!(t.suffix.starts_with('\n'));
            assert_eq!(format!("{}{}{}", t.prefix, t.target, t.suffix), PY);
            assert!(!t.target.is_empty() && !t.target.starts_with(' '));
        }
        assert!(tasks.iter().any(|t| t.prefix.ends_with("\n    ") && t.target == "y = x + 1"));
    }

    #[test]
    fn block_tasks_remove_a_whole_indentation_level() {
        let caps = Caps { max_prefix: 10_000, max_suffix: 10_000, min_prefix: 0, max_lines: 8 };
        let mut tasks = tasks_of_kind(TaskKind::Block, BLOCKS, "python", "t.py", 10, &caps, &mut Rng::new(1), None);
        tasks.sort_by_key(|t| t.prefix.len());
        // `def f` (6 lines, the blank one inside kept), `for` (3 lines), `if x` (2);
        // `class A` has a one-line block.
        let targets: Vec<&str> = tasks.iter().map(|t| t.target.as_str()).collect();
        assert_eq!(
            targets,
            [
                "y = x + 1\n    for i in y:\n        print(i)\n\n        z = i\n    return y",
                "print(i)\n\n        z = i",
                "a = 1\n    b = 2"
            ]
        );
        for t in &tasks {
            assert_eq!(t.kind, TaskKind::Block);
            assert!(t.prefix.ends_with("\n    ") || t.prefix.ends_with("\n        "));
            assert!(t.suffix.is_empty() || t.suffix.starts_with('\n'));
            assert_eq!(format!("{}{}{}", t.prefix, t.target, t.suffix), BLOCKS);
        }
        // At most max_lines lines: the 6-line block goes at 4.
        let caps = Caps { max_lines: 4, ..caps };
        let tasks = tasks_of_kind(TaskKind::Block, BLOCKS, "python", "t.py", 10, &caps, &mut Rng::new(1), None);
        assert_eq!(tasks.len(), 2);
        // Braces open blocks in other languages.
        let rs = "fn main() {\n    let x = 1;\n    if x > 0 {\n        y();\n    }\n}\n";
        let tasks = tasks_of_kind(TaskKind::Block, rs, "rust", "m.rs", 10, &caps, &mut Rng::new(1), None);
        let targets: Vec<&str> = tasks.iter().map(|t| t.target.as_str()).collect();
        assert_eq!(targets, ["let x = 1;\n    if x > 0 {\n        y();\n    }"]);
    }

    #[test]
    fn mid_line_is_the_default_kind_of_older_task_files() {
        let t: Task =
            serde_json::from_str(r#"{"id":"a","language":"python","prefix":"x","suffix":"","target":"y"}"#).unwrap();
        assert_eq!(t.kind, TaskKind::MidLine);
        let line = serde_json::to_string(&Task { kind: TaskKind::FreshLine, ..t }).unwrap();
        assert!(line.contains(r#""kind":"fresh-line""#), "{line}");
    }

    #[test]
    fn blocks_are_scored_whole_and_line_by_line() {
        let target = "if x:\n        y = 1\n    z = 2";
        let s = score_kind(TaskKind::Block, "if x:  \n        y = 1\n    z = 2\n\n", target);
        assert!(s.exact_match && s.edit_similarity == 1.0 && s.lines_right == 1.0 && !s.empty);
        let s = score_kind(TaskKind::Block, "if x:\n        y = 2\n    z = 2\n    w = 3", target);
        assert!(!s.exact_match && (s.lines_right - 2.0 / 3.0).abs() < 1e-12);
        assert!(s.edit_similarity > 0.5 && s.edit_similarity < 1.0);
        // Empty suggestions and empty first lines are counted apart.
        let s = score_kind(TaskKind::Block, "\n    if x:", target);
        assert!(!s.empty && s.empty_first_line && s.lines_right == 0.0);
        let s = score_kind(TaskKind::FreshLine, "", "return x");
        assert!(s.empty && !s.empty_first_line && s.edit_similarity == 0.0);
        // Line kinds score the first line only.
        let s = score_kind(TaskKind::FreshLine, "return x \n    more", "return x");
        assert!(s.exact_match && s.text == "return x" && s.lines_right == 1.0);
        let s = score_kind(TaskKind::FreshLine, "\n    return x", "return x");
        assert!(s.empty_first_line && !s.exact_match && s.edit_similarity == 0.0);
    }

    #[test]
    fn tasks_are_deterministic_for_a_seed() {
        let run = |seed| tasks_in_file(PY, "python", "t.py", 2, 10_000, 10_000, 0, &mut Rng::new(seed));
        assert_eq!(run(7), run(7));
        let differs = (0..20).any(|s| run(s) != run(7));
        assert!(differs, "different seeds give different tasks");
    }

    #[test]
    fn documents_are_capped_at_whole_lines() {
        let text: String = (0..200).map(|i| format!("x{i} = {i}\n")).collect();
        let tasks = tasks_in_file(&text, "python", "t.py", 5, 100, 50, 0, &mut Rng::new(3));
        assert_eq!(tasks.len(), 5);
        for t in &tasks {
            let line_start = t.prefix.rfind('\n').map_or(0, |i| i + 1);
            assert!(line_start <= 100 + 8, "prefix lines within the cap: {}", t.prefix.len());
            assert!(t.prefix.starts_with('x'), "whole lines");
            assert!(t.suffix.len() <= 50);
            assert!(t.suffix.is_empty() || t.suffix.ends_with(|c: char| c.is_ascii_digit()));
        }
    }

    #[test]
    fn build_tasks_from_folders_is_reproducible() {
        let dir = std::env::temp_dir().join(format!("anchorcoder-eval-test-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(a.join("sub")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        for i in 0..3 {
            std::fs::write(a.join("sub").join(format!("m{i}.py")), PY.repeat(4)).unwrap();
            let rs = "// c\nfn main() {\n    let x = 1;\n    println!(\"{x}\");\n}\n".repeat(8);
            std::fs::write(b.join(format!("l{i}.rs")), rs).unwrap();
        }
        std::fs::write(b.join("notes.txt"), "x".repeat(500)).unwrap();
        let args = BuildTasksArgs {
            from: vec![a.clone(), b.clone()],
            per_file: 2,
            files: Some(4),
            seed: 11,
            max_prefix_bytes: 6000,
            max_suffix_bytes: 1500,
            min_prefix_bytes: 0,
            min_file_lines: 0,
            kind: TaskKind::MidLine,
            max_lines: 8,
            cross_file: false,
            open_files: 3,
            runnable: false,
            runnable_only: false,
            out: dir.join("out.jsonl"),
        };
        let t1 = build_tasks(&args).unwrap();
        let t2 = build_tasks(&args).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 8);
        assert_eq!(t1.iter().filter(|t| t.language == "rust").count(), 4, "files taken in turn from each folder");
        assert!(t1.iter().all(|t| !t.target.is_empty() && !t.target.starts_with("//")));
        build_tasks_cmd(&args).unwrap();
        assert_eq!(read_tasks(&args.out).unwrap(), t1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn summary_has_the_documented_keys() {
        let r = |exact, es, kv| TaskResult {
            suggestion: String::new(),
            exact_match: exact,
            edit_similarity: es,
            lines_right: es,
            empty: false,
            empty_first_line: !exact,
            kv_bytes: kv,
            prompt_tokens: 10,
            latency_ms: 1.0,
            stop: "Rule".into(),
        };
        let ours = Summary::of(&[r(true, 1.0, 100), r(false, 0.5, 300)]);
        let full = Summary::of(&[r(true, 1.0, 400), r(true, 1.0, 400)]);
        let v = summary_json(&ours, AttentionPolicy::standard_anchor(), None);
        for k in ["tasks", "exact_match", "edit_similarity", "lines_right", "empty", "empty_first_line", "kv_bytes"] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["empty_first_line"], 0.5);
        assert!(v.get("full").is_none());
        assert_eq!(v["tasks"], 2);
        assert_eq!(v["exact_match"], 0.5);
        assert_eq!(v["edit_similarity"], 0.75);
        assert_eq!(v["kv_bytes"], 200.0);
        let v = summary_json(&ours, AttentionPolicy::standard_anchor(), Some(&full));
        for k in ["tasks", "exact_match", "edit_similarity", "kv_bytes"] {
            assert!(v["full"].get(k).is_some(), "full.{k}");
        }
        assert_eq!(v["edit_similarity_ratio"], 0.75);
        assert_eq!(v["kv_ratio"], 0.5);
    }

    #[test]
    fn the_cli_parses_both_forms() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Command,
        }
        #[derive(Subcommand)]
        enum Command {
            Eval(EvalArgs),
        }
        let parse = |args: &[&str]| {
            let Command::Eval(e) = Cli::try_parse_from(args).unwrap().command;
            e
        };
        let c = parse(&[
            "x",
            "eval",
            "--tasks",
            "t.jsonl",
            "--policy",
            "window",
            "--window-tokens",
            "64",
            "--compare-full",
        ]);
        assert!(c.command.is_none() && c.compare_full);
        assert_eq!(c.policy.policy().unwrap().describe(), "window(W=64, S=4)");
        let c =
            parse(&["x", "eval", "build-tasks", "--from", "a", "b", "--per-file", "3", "--seed", "5", "--out", "o"]);
        let Some(EvalCommand::BuildTasks(b)) = c.command else { panic!() };
        assert_eq!((b.from.len(), b.per_file, b.seed), (2, 3, 5));
    }
    #[test]
    fn grid_points_come_from_summaries() {
        let p = |policy: &str| {
            GridPoint::from_summary(&serde_json::json!({"policy": policy, "edit_similarity": 0.5, "kv_bytes": 1e6}))
        };
        let a = p("anchor(R=8, S=4, dense_every=0)").unwrap();
        assert_eq!((a.family.as_str(), a.label.as_str(), a.main), ("anchor", "R8", true));
        let a = p("anchor(R=8, S=16, dense_every=4)").unwrap();
        assert_eq!((a.label.as_str(), a.main), ("R8 S16 D4", false));
        let w = p("window(W=263, S=4)").unwrap();
        assert_eq!((w.family.as_str(), w.label.as_str(), w.main), ("window", "W263", true));
        assert_eq!(p("full").unwrap().label, "full");
        assert!(p("mystery(R=1)").is_err());
        assert!(GridPoint::from_summary(&serde_json::json!({"policy": "full"})).is_err());
        // Every real policy's description parses back.
        for policy in [AttentionPolicy::standard_anchor(), AttentionPolicy::full()] {
            p(&policy.describe()).unwrap();
        }
    }

    #[test]
    fn the_plot_places_points_by_kv_and_similarity() {
        let pt = |family: &str, label: &str, main, es, kv| GridPoint {
            family: family.into(),
            label: label.into(),
            main,
            edit_similarity: es,
            kv_bytes: kv,
        };
        let points = vec![
            pt("full", "full", true, 0.60, 100e6),
            pt("anchor", "R8", true, 0.55, 12e6),
            pt("anchor", "R32", true, 0.58, 25e6),
            pt("anchor", "R8 S16", false, 0.54, 13e6),
            pt("window", "W250", true, 0.50, 12e6),
            pt("window", "W<&>", true, 0.52, 25e6),
        ];
        let svg = plot_svg(&points, "a & b").unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &amp; b") && svg.contains("W&lt;&amp;&gt;"), "text is escaped");
        assert_eq!(svg.matches("<polyline").count(), 2, "one curve per family");
        assert_eq!(svg.matches("<circle").count(), 3 + 2, "anchor points and legend");
        assert!(svg.contains("97% of full") && svg.contains("20% of full"));
        // Higher similarity is drawn higher, more KV further right.
        let at = |label: &str| {
            let i = svg.find(&format!(">{label}</text>")).unwrap();
            let tag = &svg[svg[..i].rfind("<text").unwrap()..i];
            let num = |k: &str| -> f64 {
                let j = tag.find(k).unwrap() + k.len();
                tag[j..].split('"').next().unwrap().parse().unwrap()
            };
            (num("x=\""), num("y=\""))
        };
        let (r8, r32, full) = (at("R8"), at("R32"), at("full"));
        assert!(r8.0 < r32.0 && r32.0 < full.0);
        assert!(full.1 < r32.1 && r32.1 < r8.1);
        assert!(plot_svg(&[], "x").is_err());
        assert!(plot_svg(&[pt("full", "full", true, 0.5, 0.0)], "x").is_err());
    }

    #[test]
    fn resume_keeps_finished_task_lines_of_the_same_policy() {
        let dir = std::env::temp_dir().join(format!("anchorcoder-eval-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.jsonl");
        let task = Task {
            id: "a".into(),
            language: "python".into(),
            kind: TaskKind::MidLine,
            prefix: "x".into(),
            suffix: String::new(),
            target: "y".into(),
            path: None,
            root: None,
            open: Vec::new(),
            runnable: None,
        };
        let r = TaskResult {
            suggestion: "y".into(),
            exact_match: true,
            edit_similarity: 1.0,
            lines_right: 1.0,
            empty: false,
            empty_first_line: false,
            kv_bytes: 10,
            prompt_tokens: 2,
            latency_ms: 3.0,
            stop: "Rule".into(),
        };
        let policy = AttentionPolicy::standard_anchor();
        let mut line = r.to_json(&task, policy);
        let line_a = line.to_string();
        line["id"] = "b".into();
        let line_b = line.to_string();
        std::fs::write(&path, format!("{line_a}\n{line_b}\n{{\"id\": \"c\", \"trunc")).unwrap();
        let done = read_done(&path, policy, false, false).unwrap();
        assert_eq!(done.len(), 2, "the cut-off line is dropped");
        assert_eq!(TaskResult::from_json(&serde_json::from_str(&done["a"]).unwrap()), Some(r.clone()));
        assert!(read_done(&path, policy, true, false).unwrap().is_empty(), "lines without the full run don't count");
        assert!(read_done(&path, AttentionPolicy::full(), false, false).is_err(), "another policy's file");
        // A --llama-only run's lines: done when llama.cpp's answer is there.
        assert!(read_done(&path, policy, false, true).unwrap().is_empty());
        let mut llama = serde_json::json!({ "id": "a", "language": "python", "policy": policy.describe() });
        llama["llama_cpp"] = r.to_json(&task, AttentionPolicy::full());
        std::fs::write(&path, format!("{llama}\n")).unwrap();
        assert_eq!(read_done(&path, policy, false, true).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn min_prefix_keeps_cursors_deep_in_the_file() {
        let text: String = (0..200).map(|i| format!("x{i} = {i}\n")).collect();
        let tasks = tasks_in_file(&text, "python", "t.py", 50, 10_000, 50, 1000, &mut Rng::new(3));
        assert!(!tasks.is_empty());
        for t in &tasks {
            assert!(t.prefix.len() >= 1000, "{}", t.prefix.len());
        }
    }

    #[test]
    fn cross_file_uses_are_code_not_strings_or_docstrings() {
        let names: HashSet<String> = ["compute_total".to_string()].into();
        assert_eq!(cross_file_use("    x = compute_total(a)", &names, "python"), Some(8));
        assert_eq!(cross_file_use("    log(\"compute_total failed\")", &names, "python"), None);
        assert_eq!(cross_file_use("    s = 'it\\'s' + compute_total(a)", &names, "python"), Some(18));
        assert_eq!(cross_file_use("#[cfg(feature = \"compute_total\")]", &names, "rust"), None);
        assert_eq!(cross_file_use("fn f<'a>(x: &'a T) { compute_total(x) }", &names, "rust"), Some(21));
        assert_eq!(cross_file_use("from .util import compute_total", &names, "python"), None);
        assert_eq!(cross_file_use("pub(crate) use self::util::compute_total;", &names, "rust"), None);
        assert_eq!(cross_file_use("    f(a)  # see compute_total", &names, "python"), None);
        assert_eq!(cross_file_use("    f(\"#\", compute_total(a))", &names, "python"), Some(11));
        assert_eq!(cross_file_use("def g(compute_total: int = 0):", &names, "python"), None);
        assert_eq!(cross_file_use("    g(compute_total=1)", &names, "python"), None);
        assert_eq!(cross_file_use("    def compute_total(self):", &names, "python"), None);
        assert_eq!(cross_file_use("    } catch (compute_total) {", &names, "javascript"), None);
        assert_eq!(cross_file_use("    let mut compute_total = 1;", &names, "rust"), None);
        assert_eq!(cross_file_use("    return compute_total(1)", &names, "python"), Some(11));
        assert_eq!(cross_file_use("    if compute_total == 1:", &names, "python"), Some(7));
        assert_eq!(cross_file_use("    x = compute_total::new()", &names, "rust"), Some(8));
        let imp = "from .a import (\n    compute_total,\n)\nx = compute_total(1)\nuse a::{\n    b,\n};\n";
        assert_eq!(import_list_lines(imp), vec![false, true, true, false, false, true, true, false]);
        let py = "def f():\n    \"\"\"Calls\n    compute_total(x) here.\n    \"\"\"\n    return compute_total(x)\n";
        assert_eq!(prose_lines(py, "python"), vec![false, true, true, true, false, false]);
        let js = "/**\n * compute_total(x)\n */\nconst y = compute_total(x); /* a */ z();\n";
        assert_eq!(prose_lines(js, "javascript"), vec![true, true, true, false, false]);
        let py2 = "x = f(\"\"\"a\nb\"\"\")\ny = 1\n";
        assert_eq!(prose_lines(py2, "python"), vec![false, true, false, false]);
    }

    #[test]
    fn cross_file_tasks_sit_at_names_only_imported_files_define() {
        let dir = std::env::temp_dir().join(format!("anchorcoder-eval-cross-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let app = dir.join("app");
        std::fs::create_dir_all(&app).unwrap();
        std::fs::write(app.join("util.py"), "def compute_total(items, discount):\n    return 0\n").unwrap();
        let mut main = String::from("from .util import compute_total\n\n\ndef local_helper(x):\n    return x\n\n\n");
        for i in 0..6 {
            main +=
                &format!("def f{i}(items):\n    y = local_helper(items)\n    return compute_total(items, {i})\n\n\n");
        }
        std::fs::write(app.join("main.py"), &main).unwrap();
        let args = BuildTasksArgs {
            from: vec![app.clone()],
            per_file: 3,
            files: None,
            seed: 3,
            max_prefix_bytes: 6000,
            max_suffix_bytes: 1500,
            min_prefix_bytes: 0,
            min_file_lines: 0,
            kind: TaskKind::MidLine,
            max_lines: 8,
            cross_file: true,
            open_files: 3,
            runnable: false,
            runnable_only: false,
            out: dir.join("out.jsonl"),
        };
        let tasks = build_tasks(&args).unwrap();
        assert_eq!(tasks.len(), 3, "{tasks:?}");
        for t in &tasks {
            assert!(t.target.starts_with("compute_total(items, "), "{t:?}");
            assert!(t.prefix.ends_with("    return "), "{t:?}");
            assert_eq!(t.path.as_deref(), Some(std::fs::canonicalize(app.join("main.py")).unwrap().as_path()));
            assert_eq!(t.open, vec![std::fs::canonicalize(app.join("util.py")).unwrap()]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
