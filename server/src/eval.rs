//! `anchorcoder eval`: completion quality of an attention policy on a set of
//! cursor tasks, and `anchorcoder eval build-tasks`, which makes such a set
//! from real source files.
//!
//! A task is one JSON line `{"id", "language", "prefix", "suffix", "target"}`:
//! the document is `prefix + suffix`, the cursor sits between them, and
//! `target` is the rest of the cursor's line that was cut out. Each task runs
//! exactly the path users get ([`completion::plan`], a fresh
//! [`DocumentCache`], [`completion::complete`]); the suggestion is cut to its
//! first line and scored against `target` by exact match (after trimming
//! trailing whitespace) and edit similarity (1 − Levenshtein distance over
//! characters / length of the longer string).
//!
//! Output: one JSON line per task (to `--out`, else stdout), then, as the
//! last line on stdout, the summary `{"tasks", "exact_match",
//! "edit_similarity", "kv_bytes", ...}` (means); with `--compare-full` also
//! `"full"` (the same for the full policy), `"edit_similarity_ratio"` and
//! `"kv_ratio"` (the policy's over full's).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::completion::{self, Settings};
use crate::engine::document::DocumentCache;
use crate::engine::policy::AttentionPolicy;
use crate::engine::Engine;

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
    /// A LoRA adapter to merge at load (e.g. server/assets/adapter_anchor.safetensors).
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
    /// Most tokens to generate.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Token budget of the text before the cursor.
    #[arg(long, default_value_t = 2048)]
    pub prefix_tokens: usize,
}


#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Make a task set from real source files.
    BuildTasks(BuildTasksArgs),
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
    /// Where to write the tasks (JSON lines).
    #[arg(long)]
    pub out: PathBuf,
}

/// One cursor to complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub language: String,
    pub prefix: String,
    pub suffix: String,
    pub target: String,
}

/// Entry point of `anchorcoder eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    if let Some(EvalCommand::BuildTasks(b)) = &args.command {
        return build_tasks_cmd(b);
    }
    let Some(tasks_path) = &args.tasks else { bail!("eval needs --tasks TASKS.jsonl (or the build-tasks subcommand)") };
    let mut tasks = read_tasks(tasks_path)?;
    if let Some(n) = args.limit {
        tasks.truncate(n);
    }
    if tasks.is_empty() {
        bail!("no tasks in {}", tasks_path.display());
    }
    let policy = args.policy.policy()?;
    let full = AttentionPolicy::full();
    let compare = args.compare_full && policy != full;
    let model = crate::cli::model_path(args.model.as_deref())?;
    let engine = Engine::load_with(&model, args.adapter.as_deref())?;
    let settings = Settings { max_tokens: args.max_tokens, max_lines: 1, prefix_tokens: args.prefix_tokens };

    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?,
            ))
        }
        None => Box::new(std::io::stdout()),
    };
    let mut ours = Vec::with_capacity(tasks.len());
    let mut theirs = Vec::new();
    let t0 = Instant::now();
    for (i, task) in tasks.iter().enumerate() {
        let r = eval_task(&engine, policy, task, &settings);
        let mut line = r.to_json(task, policy);
        if args.compare_full {
            // Under `full` itself, the comparison is the run itself.
            let f = if compare { eval_task(&engine, full, task, &settings) } else { r.clone() };
            line["full"] = f.to_json(task, full);
            theirs.push(f);
        }
        writeln!(out, "{line}")?;
        ours.push(r);
        if (i + 1) % 10 == 0 || i + 1 == tasks.len() {
            let s = Summary::of(&ours);
            eprintln!(
                "eval: {}/{} tasks, exact {:.3}, edit similarity {:.3}, {:.0}s",
                i + 1,
                tasks.len(),
                s.exact_match,
                s.edit_similarity,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    out.flush()?;
    drop(out);
    let full_summary = args.compare_full.then(|| Summary::of(&theirs));
    println!("{}", summary_json(&Summary::of(&ours), policy, full_summary.as_ref()));
    Ok(())
}

/// The outcome of one task under one policy.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    /// The suggestion's first line, trailing whitespace trimmed.
    pub suggestion: String,
    pub exact_match: bool,
    pub edit_similarity: f64,
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
    fn to_json(&self, task: &Task, policy: AttentionPolicy) -> serde_json::Value {
        serde_json::json!({
            "id": task.id, "language": task.language, "policy": policy.describe(),
            "target": task.target.trim_end(), "suggestion": self.suggestion,
            "exact_match": self.exact_match, "edit_similarity": self.edit_similarity,
            "kv_bytes": self.kv_bytes, "prompt_tokens": self.prompt_tokens,
            "latency_ms": self.latency_ms, "stop": self.stop,
        })
    }
}

/// Run one task under `policy` exactly as a user's completion runs.
pub fn eval_task(engine: &Engine, policy: AttentionPolicy, task: &Task, settings: &Settings) -> TaskResult {
    let t0 = Instant::now();
    let text = format!("{}{}", task.prefix, task.suffix);
    let cursor = task.prefix.len();
    let prompt = completion::plan(&text, cursor, None, settings);
    let mut doc = DocumentCache::new(&engine.model, policy);
    let run = (|| -> Result<completion::Suggestion> {
        doc.set_text(&engine.tokenizer, &text[prompt.window_start..prompt.cut])?;
        completion::complete(engine, &mut doc, &prompt, &text[cursor..], settings, 0, &|| false)
    })();
    let latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
    doc.compact();
    let stats = doc.stats();
    let (text, stop) = match run {
        Ok(s) => (s.text, format!("{:?}", s.stop)),
        Err(e) => (String::new(), format!("error: {e:#}")),
    };
    let suggestion = first_line(&text).to_string();
    let (exact_match, edit_similarity) = score(&suggestion, &task.target);
    TaskResult { suggestion, exact_match, edit_similarity, kv_bytes: stats.kv.kv_bytes, prompt_tokens: stats.tokens, latency_ms, stop }
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
        Summary {
            tasks: n,
            exact_match: mean(&|r| f64::from(u8::from(r.exact_match))),
            edit_similarity: mean(&|r| r.edit_similarity),
            kv_bytes: mean(&|r| r.kv_bytes as f64),
            latency_ms: mean(&|r| r.latency_ms),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tasks": self.tasks, "exact_match": self.exact_match,
            "edit_similarity": self.edit_similarity, "kv_bytes": self.kv_bytes,
            "latency_ms": self.latency_ms,
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

/// Pick up to `k` tasks in one file's `text`. `id` prefixes the task ids.
pub fn tasks_in_file(
    text: &str,
    language: &str,
    id: &str,
    k: usize,
    max_prefix: usize,
    max_suffix: usize,
    rng: &mut Rng,
) -> Vec<Task> {
    if text.contains('\r') {
        return Vec::new();
    }
    // Line starts; line i spans starts[i]..starts[i+1]-1 (without its '\n').
    let mut starts = vec![0];
    starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
    let line_end = |i: usize| text[starts[i]..].find('\n').map_or(text.len(), |e| starts[i] + e);
    // Candidates: code lines after the first (the prompt must not be empty),
    // of reasonable length.
    let mut candidates: Vec<usize> = (1..starts.len())
        .filter(|&i| {
            let line = &text[starts[i]..line_end(i)];
            line.len() <= 200 && is_code_line(line, language)
        })
        .collect();
    rng.shuffle(&mut candidates);
    candidates.truncate(k);
    candidates.sort_unstable();
    let mut tasks = Vec::new();
    for i in candidates {
        let (ls, le) = (starts[i], line_end(i));
        let line = &text[ls..le];
        let indent = line.len() - line.trim_start().len();
        let content: Vec<(usize, char)> = line[indent..].trim_end().char_indices().collect();
        // Cursor at a character of the content, so that the target is never empty.
        let (off, _) = content[rng.below(content.len())];
        let cursor = ls + indent + off;
        let target = text[cursor..le].trim_end().to_string();
        // Whole lines around the cursor, within the caps.
        let first = starts[..=i].partition_point(|&s| s + max_prefix < ls);
        let doc_start = starts[first.min(i)];
        let mut doc_end = le;
        for j in i + 1..starts.len() {
            let e = line_end(j);
            if e - le > max_suffix {
                break;
            }
            doc_end = e;
        }
        let col = text[ls..cursor].chars().count() + 1;
        tasks.push(Task {
            id: format!("{id}:{}:{col}", i + 1),
            language: language.to_string(),
            prefix: text[doc_start..cursor].to_string(),
            suffix: text[le..doc_end].to_string(),
            target,
        });
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
                if text.lines().any(|l| l.len() > 1000) {
                    continue;
                }
                let lang = language_of(f).unwrap_or("text");
                let rel = f.strip_prefix(root).unwrap_or(f);
                let id = format!("{label}/{}", rel.display());
                let t = tasks_in_file(&text, lang, &id, a.per_file, a.max_prefix_bytes, a.max_suffix_bytes, &mut rng);
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
    Ok(())
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
            let tasks = tasks_in_file(PY, "python", "t.py", 10, 10_000, 10_000, &mut rng);
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

    #[test]
    fn tasks_are_deterministic_for_a_seed() {
        let run = |seed| tasks_in_file(PY, "python", "t.py", 2, 10_000, 10_000, &mut Rng::new(seed));
        assert_eq!(run(7), run(7));
        let differs = (0..20).any(|s| run(s) != run(7));
        assert!(differs, "different seeds give different tasks");
    }

    #[test]
    fn documents_are_capped_at_whole_lines() {
        let text: String = (0..200).map(|i| format!("x{i} = {i}\n")).collect();
        let tasks = tasks_in_file(&text, "python", "t.py", 5, 100, 50, &mut Rng::new(3));
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
            kv_bytes: kv,
            prompt_tokens: 10,
            latency_ms: 1.0,
            stop: "Rule".into(),
        };
        let ours = Summary::of(&[r(true, 1.0, 100), r(false, 0.5, 300)]);
        let full = Summary::of(&[r(true, 1.0, 400), r(true, 1.0, 400)]);
        let v = summary_json(&ours, AttentionPolicy::default(), None);
        for k in ["tasks", "exact_match", "edit_similarity", "kv_bytes"] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert!(v.get("full").is_none());
        assert_eq!(v["tasks"], 2);
        assert_eq!(v["exact_match"], 0.5);
        assert_eq!(v["edit_similarity"], 0.75);
        assert_eq!(v["kv_bytes"], 200.0);
        let v = summary_json(&ours, AttentionPolicy::default(), Some(&full));
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
        let c = parse(&["x", "eval", "--tasks", "t.jsonl", "--policy", "window", "--window-tokens", "64", "--compare-full"]);
        assert!(c.command.is_none() && c.compare_full);
        assert_eq!(c.policy.policy().unwrap().describe(), "window(W=64, S=4)");
        let c = parse(&["x", "eval", "build-tasks", "--from", "a", "b", "--per-file", "3", "--seed", "5", "--out", "o"]);
        let Some(EvalCommand::BuildTasks(b)) = c.command else { panic!() };
        assert_eq!((b.from.len(), b.per_file, b.seed), (2, 3, 5));
    }
}
