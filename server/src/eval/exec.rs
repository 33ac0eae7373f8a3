//! The execution check of Python block tasks (`eval build-tasks --runnable`,
//! `eval exec`): does the suggested block still pass the source file's own
//! doctests?
//!
//! At build time each Python file with doctests is loaded as its module and
//! every doctest is run under a line tracer (`doctests.py trace`); a block
//! task is *runnable* when doctests that pass on the file as it is run at
//! least one of the block's lines, and the task records them ([`Runnable`]).
//! At check time the file is rebuilt with the block replaced — by the target
//! first (the control: the doctests must pass, else the task is not counted)
//! and then by each suggestion — and those doctests alone are run in a fresh
//! interpreter under a timeout, in a temporary folder (`doctests.py run`).
//! Small and honest rather than large: only the file's own doctests, no test
//! suites, and a task counts only when its control passes.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bench::wait_timeout;

/// The Python side, run with `python3 -I -S`.
const HELPER: &str = include_str!("doctests.py");

/// A whole trace of a module's doctests may take this long; one run of a
/// task's doctests (the helper also stops each doctest after 5 s) this long.
const TRACE_TIMEOUT: Duration = Duration::from_secs(120);
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a runnable block task records: how to rebuild its file with another
/// block and which doctests to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runnable {
    /// The module's dotted name (the file is the task's `path`).
    pub module: String,
    /// The removed text's byte range in the file: from the cursor (after the
    /// first line's indentation) to the end of the block's last line.
    pub start: usize,
    pub end: usize,
    /// The doctests (as `doctest` names them) that pass on the file and run
    /// a line of the block.
    pub doctests: Vec<String>,
}

/// The interpreter: `$ANCHORCODER_PYTHON`, else `python3`.
fn python() -> OsString {
    std::env::var_os("ANCHORCODER_PYTHON").filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into())
}

/// The dotted module name of `path` under `root` (`json/decoder.py` →
/// `json.decoder`, `json/__init__.py` → `json`); `None` for files that are
/// no importable module (a `__main__.py`, a part that is not an identifier).
pub fn module_name(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop()?.strip_suffix(".py")?.to_string();
    if last != "__init__" {
        parts.push(last);
    }
    let ident = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    (!parts.is_empty() && parts.iter().all(|p| ident(p) && p != "__main__")).then(|| parts.join("."))
}

/// Whether a file is worth tracing: it has doctests and is not a test suite
/// or a GUI module (whose import opens windows).
pub fn has_doctests(module: &str, text: &str) -> bool {
    let skip = module
        .split('.')
        .any(|p| p == "test" || p == "tests" || p == "idle_test" || p.starts_with("test_") || p.starts_with("tkinter"))
        || module.starts_with("turtle");
    !skip && text.contains(">>>")
}

/// A temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("anchorcoder-exec-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The folder where a package's `__init__.py` finds its submodules (its own
/// folder), as the helper takes it ("" for a plain module).
fn package_dir(original: &Path) -> String {
    match original.file_name() {
        Some(n) if n == "__init__.py" => {
            original.parent().map_or_else(String::new, |d| d.to_string_lossy().into_owned())
        }
        _ => String::new(),
    }
}

/// Run the helper (`args`: mode, file, module and package folder; the answer
/// file and `names` follow) in `dir`; whether it exited 0 and its JSON
/// answer, or `None` when it ran past `timeout` (it is killed).
fn helper(dir: &Path, args: &[&str], names: &[String], timeout: Duration) -> Result<Option<(bool, serde_json::Value)>> {
    let script = dir.join("anchorcoder_doctests.py");
    std::fs::write(&script, HELPER)?;
    let answer = dir.join("answer.json");
    let mut child = Command::new(python())
        .args(["-I", "-S"])
        .arg(&script)
        .args(args)
        .arg(&answer)
        .args(names)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {} (set ANCHORCODER_PYTHON)", python().to_string_lossy()))?;
    let Some(status) = wait_timeout(&mut child, timeout, Duration::from_millis(20))? else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&answer).unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Ok(Some((status.success(), v)))
}

/// One doctest as traced: whether it passed, and the lines of the module's
/// file it ran (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Traced {
    pub name: String,
    pub ok: bool,
    pub lines: BTreeSet<usize>,
}

/// Every doctest of the module `module` in `file`, run under the tracer.
/// Empty when the module does not load or the trace times out.
pub fn trace(file: &Path, module: &str) -> Result<Vec<Traced>> {
    let dir = TempDir::new()?;
    let package = package_dir(file);
    let file = file.to_string_lossy();
    let Some((_, v)) = helper(&dir.0, &["trace", &file, module, &package], &[], TRACE_TIMEOUT)? else {
        return Ok(Vec::new());
    };
    let tests = v["tests"].as_array().map_or(&[][..], |t| t.as_slice());
    Ok(tests
        .iter()
        .filter_map(|t| {
            Some(Traced {
                name: t["name"].as_str()?.to_string(),
                ok: t["ok"].as_bool()?,
                lines: t["lines"].as_array()?.iter().filter_map(|l| l.as_u64().map(|l| l as usize)).collect(),
            })
        })
        .collect())
}

/// The passing doctests that run one of the lines `first..=last` (1-based).
pub fn exercising(traced: &[Traced], first: usize, last: usize) -> Vec<String> {
    traced.iter().filter(|t| t.ok && t.lines.range(first..=last).next().is_some()).map(|t| t.name.clone()).collect()
}

/// `text` with `start..end` replaced by `block`.
pub fn substitute(text: &str, start: usize, end: usize, block: &str) -> Result<String> {
    if start > end || end > text.len() || !text.is_char_boundary(start) || !text.is_char_boundary(end) {
        bail!("the block's range {start}..{end} is not in the file ({} bytes)", text.len());
    }
    Ok(format!("{}{block}{}", &text[..start], &text[end..]))
}

/// How one run of a task's doctests ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// A doctest failed or was not found, or the module did not load (why).
    Failed(String),
    TimedOut,
}

/// Run the doctests `names` of `source` (a changed copy of the file
/// `original`), loaded as `module`, in a fresh interpreter in a temporary
/// folder.
pub fn run_doctests(source: &str, original: &Path, module: &str, names: &[String]) -> Result<Outcome> {
    let dir = TempDir::new()?;
    let file = dir.0.join(original.file_name().context("a file name")?);
    std::fs::write(&file, source)?;
    let file = file.to_string_lossy();
    let package = package_dir(original);
    Ok(match helper(&dir.0, &["run", &file, module, &package], names, RUN_TIMEOUT)? {
        None => Outcome::TimedOut,
        Some((true, _)) => Outcome::Passed,
        Some((false, v)) => Outcome::Failed(if v.is_null() { "no answer".into() } else { v.to_string() }),
    })
}

/// Run a runnable task's doctests on its file with `block` in place of the
/// removed text. `file` is the task's file; the text there must still hold
/// the task's target at the recorded range.
pub fn check_block(file: &Path, r: &Runnable, target: &str, block: &str) -> Result<Outcome> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let removed = text.get(r.start..r.end).context("the block's range is not in the file any more")?;
    if super::block_text(removed) != super::block_text(target) {
        bail!("{} changed since the task was built", file.display());
    }
    run_doctests(&substitute(&text, r.start, r.end, block)?, file, &r.module, &r.doctests)
}

/// Flags of `anchorcoder eval exec`.
#[derive(clap::Args, Debug, Clone)]
pub struct ExecArgs {
    /// The tasks (with `runnable` records: `eval build-tasks --runnable`).
    #[arg(long)]
    pub tasks: PathBuf,
    /// Result lines of `anchorcoder eval` on those tasks (several files:
    /// e.g. our run and a `--llama-only` run; joined by task id).
    #[arg(long, num_args = 1.., required = true)]
    pub results: Vec<PathBuf>,
    /// Write one line per runnable task here (else only the summary, on stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The suggestions of a result line by what produced them: the line's own
/// policy (`ours`), `full`, `ours/RULE` (the other fresh-line rules),
/// `llama_cpp`, `llama_cpp_rules`.
pub fn suggestions(line: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut take = |name: String, v: &serde_json::Value| {
        if let Some(s) = v["suggestion"].as_str() {
            out.push((name, s.to_string()));
        }
    };
    take("ours".into(), line);
    take("full".into(), &line["full"]);
    if let Some(m) = line["variants"].as_object() {
        for (k, v) in m {
            take(format!("ours/{k}"), v);
        }
    }
    take("llama_cpp".into(), &line["llama_cpp"]);
    take("llama_cpp_rules".into(), &line["llama_cpp_rules"]);
    out
}

/// `anchorcoder eval exec`: the control and every suggestion of each
/// runnable task; the summary (runnable tasks, pass rate per producer) is
/// the last line on stdout.
pub fn exec_cmd(a: &ExecArgs) -> Result<()> {
    let tasks = super::read_tasks(&a.tasks)?;
    // Suggestions per task id, from every results file (later files add).
    let mut by_id: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for p in &a.results {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        for l in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { continue };
            let Some(id) = v["id"].as_str() else { continue };
            let entry = by_id.entry(id.to_string()).or_default();
            for (name, s) in suggestions(&v) {
                entry.retain(|(n, _)| *n != name);
                entry.push((name, s));
            }
        }
    }
    let mut out: Option<Box<dyn std::io::Write>> = match &a.out {
        Some(p) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?,
        ))),
        None => None,
    };
    let (mut with_record, mut control_failed) = (0usize, 0usize);
    let mut passes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for task in &tasks {
        let (Some(r), Some(path)) = (&task.runnable, &task.path) else { continue };
        with_record += 1;
        let control = check_block(path, r, &task.target, &task.target);
        let mut line = serde_json::json!({ "id": task.id, "doctests": r.doctests });
        match &control {
            Ok(Outcome::Passed) => {}
            other => {
                control_failed += 1;
                line["control"] = format!("{other:?}").into();
                eprintln!("eval exec: {}: control did not pass ({other:?}); not counted", task.id);
                if let Some(w) = &mut out {
                    writeln!(w, "{line}")?;
                }
                continue;
            }
        }
        line["control"] = "Passed".into();
        for (name, s) in by_id.get(&task.id).map_or(&[][..], |v| v.as_slice()) {
            let outcome = check_block(path, r, &task.target, s)?;
            let e = passes.entry(name.clone()).or_default();
            e.0 += 1;
            e.1 += usize::from(outcome == Outcome::Passed);
            line["runs"][name] = format!("{outcome:?}").into();
        }
        if let Some(w) = &mut out {
            writeln!(w, "{line}")?;
        }
        eprintln!("eval exec: {} {}", task.id, line["runs"]);
    }
    if let Some(w) = &mut out {
        w.flush()?;
    }
    let mut summary = serde_json::json!({
        "tasks": tasks.len(), "with_doctests": with_record,
        "runnable": with_record - control_failed, "control_failed": control_failed,
    });
    for (name, (n, ok)) in passes {
        summary["pass"][name] = serde_json::json!({ "tasks": n, "passed": ok, "pass_rate": ok as f64 / n as f64 });
    }
    println!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_follow_the_package_layout() {
        let root = Path::new("/lib");
        assert_eq!(module_name(root, Path::new("/lib/json/decoder.py")).as_deref(), Some("json.decoder"));
        assert_eq!(module_name(root, Path::new("/lib/json/__init__.py")).as_deref(), Some("json"));
        assert_eq!(module_name(root, Path::new("/lib/fractions.py")).as_deref(), Some("fractions"));
        assert_eq!(module_name(root, Path::new("/lib/asyncio/__main__.py")), None);
        assert_eq!(module_name(root, Path::new("/lib/lib2to3/tests/data/bom-x.py")), None);
        assert_eq!(module_name(root, Path::new("/lib/a.rs")), None);
        assert_eq!(module_name(root, Path::new("/elsewhere/a.py")), None);
        assert!(has_doctests("fractions", "    >>> Fraction(1)\n"));
        assert!(!has_doctests("test.test_x", "    >>> 1\n"));
        assert!(!has_doctests("fractions", "no examples"));
    }

    #[test]
    fn substitution_replaces_exactly_the_range() {
        let text = "def f(x):\n    if x:\n        return 1\n    return 2\n";
        let start = text.find("return 1").unwrap();
        let end = start + "return 1".len();
        assert_eq!(substitute(text, start, end, "return 3").unwrap(), text.replace("return 1", "return 3"));
        assert_eq!(substitute(text, start, end, "").unwrap(), text.replace("return 1", ""));
        assert!(substitute(text, end, start, "x").is_err());
        assert!(substitute(text, 0, text.len() + 1, "x").is_err());
        assert!(substitute("é", 1, 2, "x").is_err());
    }

    #[test]
    fn exercising_needs_a_passing_doctest_on_a_block_line() {
        let t = |name: &str, ok: bool, lines: &[usize]| Traced {
            name: name.into(),
            ok,
            lines: lines.iter().copied().collect(),
        };
        let traced = [t("m.f", true, &[3, 4]), t("m.g", false, &[5]), t("m.h", true, &[9])];
        assert_eq!(exercising(&traced, 4, 6), vec!["m.f".to_string()]);
        assert!(exercising(&traced, 5, 5).is_empty(), "a failing doctest does not count");
        assert!(exercising(&traced, 6, 8).is_empty());
    }

    /// Whether a python3 is on this machine (the runner's tests need one).
    fn have_python() -> bool {
        Command::new(python()).arg("--version").output().is_ok_and(|o| o.status.success())
    }

    const MODULE: &str = "def double(x):\n    \"\"\"\n    >>> double(2)\n    4\n    \"\"\"\n    if x:\n        y = x * 2\n        return y\n    return 0\n\n\ndef other():\n    \"\"\"\n    >>> other()\n    1\n    \"\"\"\n    return 1\n";

    #[test]
    fn the_runner_traces_and_runs_a_tiny_module() {
        if !have_python() {
            eprintln!("no python3: skipped");
            return;
        }
        let dir = TempDir::new().unwrap();
        let file = dir.0.join("tiny_mod.py");
        std::fs::write(&file, MODULE).unwrap();
        let traced = trace(&file, "tiny_mod").unwrap();
        let names: Vec<&str> = traced.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["tiny_mod.double", "tiny_mod.other"]);
        assert!(traced.iter().all(|t| t.ok));
        // The block `y = x * 2` / `return y` is lines 7-8: only double's doctest runs it.
        assert_eq!(exercising(&traced, 7, 8), vec!["tiny_mod.double".to_string()]);

        let start = MODULE.find("y = x * 2").unwrap();
        let end = MODULE.find("return y").unwrap() + "return y".len();
        let r = Runnable { module: "tiny_mod".into(), start, end, doctests: vec!["tiny_mod.double".into()] };
        let target = "y = x * 2\n        return y";
        assert_eq!(check_block(&file, &r, target, target).unwrap(), Outcome::Passed);
        assert_eq!(check_block(&file, &r, target, "return x + x").unwrap(), Outcome::Passed);
        assert!(matches!(check_block(&file, &r, target, "return x * 3").unwrap(), Outcome::Failed(_)));
        // A syntax error fails; so does a block that never ends, after its timeout.
        assert!(matches!(check_block(&file, &r, target, "return (").unwrap(), Outcome::Failed(_)));
        assert!(matches!(check_block(&file, &r, target, "while True: pass").unwrap(), Outcome::Failed(_)));
        // A doctest name the module does not have fails rather than passing vacuously.
        let missing = Runnable { doctests: vec!["tiny_mod.nothing".into()], ..r.clone() };
        assert!(matches!(check_block(&file, &missing, target, target).unwrap(), Outcome::Failed(_)));
        // A file changed since the task was built is an error, not a result.
        assert!(check_block(&file, &r, "something else", target).is_err());

        // A package's `__init__.py`, run from a copy, still finds its submodules.
        let pkg = dir.0.join("tiny_pkg");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(pkg.join("sib.py"), "def double(x):\n    return 2 * x\n").unwrap();
        let init = "from . import sib\n\n\ndef twice(x):\n    \"\"\"\n    >>> twice(3)\n    6\n    \"\"\"\n    if x:\n        y = sib.double(x)\n        return y\n    return 0\n";
        std::fs::write(pkg.join("__init__.py"), init).unwrap();
        let traced = trace(&pkg.join("__init__.py"), "tiny_pkg").unwrap();
        assert_eq!(exercising(&traced, 10, 11), vec!["tiny_pkg.twice".to_string()]);
        let start = init.find("y = sib").unwrap();
        let end = init.find("return y").unwrap() + "return y".len();
        let r = Runnable { module: "tiny_pkg".into(), start, end, doctests: vec!["tiny_pkg.twice".into()] };
        let target = &init[start..end];
        assert_eq!(check_block(&pkg.join("__init__.py"), &r, target, target).unwrap(), Outcome::Passed);
        assert!(matches!(check_block(&pkg.join("__init__.py"), &r, target, "return 7").unwrap(), Outcome::Failed(_)));
    }

    #[test]
    fn build_tasks_records_the_doctests_that_run_a_block() {
        use crate::eval::{build_tasks, BuildTasksArgs, TaskKind};
        if !have_python() {
            eprintln!("no python3: skipped");
            return;
        }
        let dir = TempDir::new().unwrap();
        let pkg = dir.0.join("src").join("pkg");
        std::fs::create_dir_all(&pkg).unwrap();
        // A function no doctest calls: its block is drawn but not runnable.
        let text = format!("{MODULE}\n\ndef unused(x):\n    if x:\n        return 1\n    return 2\n");
        std::fs::write(pkg.join("tiny.py"), &text).unwrap();
        let mut args = BuildTasksArgs {
            from: vec![dir.0.join("src")],
            per_file: 10,
            files: None,
            seed: 1,
            max_prefix_bytes: 6000,
            max_suffix_bytes: 1500,
            min_prefix_bytes: 0,
            min_file_lines: 0,
            kind: TaskKind::Block,
            max_lines: 8,
            cross_file: false,
            open_files: 0,
            runnable: false,
            runnable_only: false,
            out: dir.0.join("tasks.jsonl"),
        };
        let plain = build_tasks(&args).unwrap();
        args.runnable = true;
        let marked = build_tasks(&args).unwrap();
        let ids = |ts: &[crate::eval::Task]| ts.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&plain), ids(&marked), "--runnable draws the same tasks");
        let unused = marked.iter().find(|t| t.target.starts_with("if x:\n        return 1")).expect("unused's block");
        assert!(unused.runnable.is_none());
        let block = marked.iter().find(|t| t.target == "y = x * 2\n        return y").expect("double's inner block");
        let r = block.runnable.as_ref().expect("double's doctest runs it");
        assert_eq!((r.module.as_str(), r.doctests.as_slice()), ("pkg.tiny", &["pkg.tiny.double".to_string()][..]));
        for t in marked.iter().filter(|t| t.runnable.is_some()) {
            let r = t.runnable.as_ref().unwrap();
            let path = t.path.as_ref().unwrap();
            assert_eq!(crate::eval::block_text(&text[r.start..r.end]), t.target);
            assert_eq!(check_block(path, r, &t.target, &t.target).unwrap(), Outcome::Passed, "{}", t.id);
        }
        args.runnable_only = true;
        let only = build_tasks(&args).unwrap();
        assert_eq!(ids(&only), ids(&marked.iter().filter(|t| t.runnable.is_some()).cloned().collect::<Vec<_>>()));
    }
}
