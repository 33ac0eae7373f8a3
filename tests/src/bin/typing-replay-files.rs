//! Keystroke-to-suggestion latency while switching between three real files,
//! side by side with llama.cpp's server used the way llama.vim uses it.
//!
//! The session: three long Python-stdlib files are open; the user visits them
//! in turn (`--rounds` times each) and in each visit types one line of the
//! file (removed from the document beforehand) a character at a time, with an
//! inline-completion request after each keystroke, `--pause-ms` between
//! keystrokes and a longer pause (30 × `--pause-ms`) when moving to another
//! file. With `--rest-every N`, the user also rests that long after every N
//! keystrokes of a line (thinking), and the editor reports the resting cursor
//! as it does on arrival. When the user arrives in a file, both sides get the same head start
//! (unless `--no-visit-warm`): ours is told the resting cursor
//! (`anchorcoder/didMoveCursor`, as the editors send it), llama-server gets
//! the window up to that cursor with `n_predict` 0 in the background (as
//! llama.vim warms it in idle time).
//!
//! - **ours**: the real `anchorcoder` over LSP (single-line suggestions,
//!   `maxTokens` 24, `--policy` (default: the server's), `threads` 2); the files are opened first and
//!   the server warms their caches while the user reads.
//! - **llama.cpp**: `llama-server -np 1` (one slot, as llama.vim runs it;
//!   `--cache-reuse 256` as its README suggests) on the same GGUF and threads.
//!   `/infill` answers 501 for this model (no FIM tokens), so each keystroke
//!   is a `/completion` with `cache_prompt: true`, greedy, `n_predict` 24,
//!   stopping at a newline, whose prompt is the same prefix window our server
//!   uses (`completion::plan`: from the first line start within 2,048 × 3
//!   bytes before the cursor, kept while typing). Like llama.vim's cache, a
//!   keystroke that types the next character of the shown suggestion shows
//!   the rest without a request (our server does the same, server-side).
//!
//! Prints p50/p95 of both (all keystrokes, the first keystroke of each
//! visit, and the keystrokes that ran the model rather than typing through
//! the suggestion shown) and, last, one JSON object with the ratios (llama.cpp over ours).
//!
//! `--context-compare` also runs ours with `completion.contextTokens` 0 (project context
//! off; `--context-tokens N` sets ours' budget) and prints the latency ratios and the
//! K/V bytes per document of both, and the ratio of the time per generated token
//! (`decode_ms_per_token`, from the server log: the two runs' suggestions differ in
//! length, so their slowest keystrokes differ in what they generate). One pair's
//! p95 swings with which dozen keystrokes run the model: `--compare-pairs N` runs
//! N pairs, alternating which of the two goes first, and reports each ratio's
//! median (`…_ratio_context_on_over_off`) and all of them
//! (`…_ratios_context_on_over_off`).
//!
//! `--samples DIR` writes each run's keystrokes (`ms first model`, one per line)
//! to `DIR/ours.txt`, `DIR/ours-context-off.txt` (`-2`, `-3`, … after them for
//! later pairs) and `DIR/llama-cpp.txt`, and our server's log beside each
//! (`DIR/ours.log`, …: its `completion …` lines say what each keystroke reused,
//! prefilled and generated).
//!
//! `typing-replay-files --llama-server BIN --model GGUF [--rounds 2] [--policy window|anchor|full] [--pause-ms 30] [--rest-every N] [--only ours|llama] [--no-visit-warm] [--context-tokens N] [--context-compare [--compare-pairs N]] [--samples DIR]`
//! (ANCHORCODER_BIN picks our binary; tests/bench/typing-files.sh runs it).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anchorcoder_e2e::{http_post, LlamaServer, Server};
use serde_json::{json, Value};

/// The server's prompt budget: 2,048 tokens at 3 bytes a token (completion.rs).
const WINDOW_BYTES: usize = 2048 * 3;
const FILES: [&str; 3] = ["configparser.py", "ftplib.py", "calendar.py"];
/// Where typing starts in each file (1-based line; past the first full window).
const START_LINES: [usize; 3] = [700, 560, 520];

/// One file of the session: its lines, and which of them are typed.
struct Doc {
    uri: String,
    lines: Vec<String>,
    /// 0-based index of the first typed line; visit k types line `start + k`.
    start: usize,
}

impl Doc {
    /// The text the editor starts with: the file minus the lines to type.
    fn initial_text(&self, rounds: usize) -> String {
        let mut t = self.lines[..self.start].concat();
        t.push_str(&self.lines[self.start + rounds..].concat());
        t
    }
    /// The line typed in visit `k` (without its newline).
    fn typed(&self, k: usize) -> &str {
        self.lines[self.start + k].trim_end_matches('\n')
    }
}

/// `completion::plan`'s window start: keep the previous one while it is
/// still a line start before the cursor's line and within twice the budget,
/// else the first line start at or after `cursor - budget`.
fn window_start(text: &str, cursor: usize, previous: Option<usize>) -> usize {
    let line_begin = text[..cursor].rfind('\n').map_or(0, |i| i + 1);
    if let Some(p) = previous.filter(|&p| p <= line_begin && cursor - p <= 2 * WINDOW_BYTES) {
        return p;
    }
    if cursor <= WINDOW_BYTES {
        return 0;
    }
    let mut from = cursor - WINDOW_BYTES;
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    text[from..line_begin].find('\n').map_or(line_begin, |i| from + i + 1)
}

/// A keystroke's latency, whether it was the first of a visit, and whether
/// it ran the model (it did not type through the suggestion shown).
struct Sample {
    ms: f64,
    first: bool,
    model: bool,
}

/// Whether typing `before` (all text before the cursor) answers from the
/// suggestion `shown` (shown after `shown.0`) without the model: the server's
/// rule (`completion::session::type_through`; the line after the cursor is
/// empty here).
fn types_through(shown: &Option<(String, String)>, before: &str) -> bool {
    shown.as_ref().is_some_and(|(at, suggestion)| {
        before
            .strip_prefix(at.as_str())
            .filter(|t| !t.is_empty())
            .and_then(|t| suggestion.strip_prefix(t))
            .is_some_and(|rest| !rest.trim().is_empty())
    })
}

/// When the user types and rests.
struct Schedule {
    /// Visits to each file.
    rounds: usize,
    /// Between keystrokes; 30 times as long on arrival in a file and at a rest.
    pause: Duration,
    /// A rest after every this many keystrokes of a line (0: none).
    rest_every: usize,
}

/// Replay against one of the two: `on_visit(doc, text, cursor, line, col)`
/// tells that the user moved to a document and rests the cursor at the end of
/// the line above the one about to be opened (before the pause), or rests
/// while typing (`Schedule::rest_every`),
/// `on_change(doc, line, col, char)` tells of an inserted character,
/// `complete(doc, text, cursor, line, col)` returns the suggestion shown after
/// a keystroke.
fn replay(
    docs: &[Doc],
    sched: &Schedule,
    mut on_visit: impl FnMut(usize, &str, usize, u32, u32),
    mut on_change: impl FnMut(usize, u32, u32, char),
    mut complete: impl FnMut(usize, &str, usize, u32, u32) -> String,
) -> Vec<Sample> {
    let (rounds, pause) = (sched.rounds, sched.pause);
    let mut texts: Vec<String> = docs.iter().map(|d| d.initial_text(rounds)).collect();
    let mut samples = Vec::new();
    // The suggestion last shown after running the model, per document.
    let mut shown: Vec<Option<(String, String)>> = vec![None; docs.len()];
    for k in 0..rounds {
        for (i, d) in docs.iter().enumerate() {
            // Moving to the file: a longer pause, then a new line opened where
            // the visit's line goes (after the lines typed before it), and
            // the line typed on it after its indentation.
            let line = (d.start + k) as u32;
            let mut cursor: usize = texts[i].split_inclusive('\n').take(d.start + k).map(str::len).sum();
            let above = texts[i][..cursor - 1].rfind('\n').map_or(0, |n| n + 1);
            on_visit(i, &texts[i], cursor - 1, line - 1, (cursor - 1 - above) as u32);
            std::thread::sleep(pause * 30);
            texts[i].insert(cursor, '\n');
            on_change(i, line, 0, '\n');
            let mut col = 0u32;
            let typed = d.typed(k);
            let indent = typed.len() - typed.trim_start().len();
            for (n, c) in typed.chars().enumerate() {
                texts[i].insert(cursor, c);
                on_change(i, line, col, c);
                cursor += c.len_utf8();
                col += c.len_utf8() as u32;
                // The editor indents the new line: no request for those.
                if n < indent {
                    continue;
                }
                let t = Instant::now();
                let suggestion = complete(i, &texts[i], cursor, line, col);
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let model = !types_through(&shown[i], &texts[i][..cursor]);
                if model {
                    shown[i] = (!suggestion.is_empty()).then(|| (texts[i][..cursor].to_string(), suggestion));
                }
                samples.push(Sample { ms, first: n == indent, model });
                std::thread::sleep(pause);
                let typed_here = n + 1 - indent;
                if sched.rest_every > 0 && typed_here % sched.rest_every == 0 && n + 1 < typed.chars().count() {
                    on_visit(i, &texts[i], cursor, line, col);
                    std::thread::sleep(pause * 30);
                }
            }
            let visit: Vec<f64> = samples.iter().rev().take(typed.trim_start().chars().count()).map(|s| s.ms).collect();
            eprintln!(
                "  visit {} of {}: {} keystrokes, first {:.0} ms, p50 {:.0} ms",
                k * docs.len() + i + 1,
                rounds * docs.len(),
                visit.len(),
                visit.last().copied().unwrap_or(f64::NAN),
                percentile(visit, 0.5)
            );
        }
    }
    samples
}

/// What `--context-compare` reports as ratios, context on over off: the
/// latency figures, the first keystroke at each new place (which prefills a
/// new window that also attends to the context) and the time per generated
/// token.
const COMPARED: [&str; 6] =
    ["p50_ms", "p95_ms", "model_p50_ms", "model_p95_ms", "first_keystroke_p50_ms", "decode_ms_per_token"];

/// The middle value (the mean of the two middle ones for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Write one line per keystroke (`ms first model`) to `dir/name.txt`, for
/// reading beside the server log's completion lines (same order).
fn save_samples(dir: Option<&str>, name: &str, samples: &[Sample]) {
    let Some(dir) = dir else { return };
    let lines: String = samples.iter().map(|s| format!("{:.1} {} {}\n", s.ms, s.first, s.model)).collect();
    let path = Path::new(dir).join(format!("{name}.txt"));
    std::fs::write(&path, lines).expect("cannot write the samples");
}

fn stats(samples: &[Sample]) -> Value {
    let all: Vec<f64> = samples.iter().map(|s| s.ms).collect();
    let first: Vec<f64> = samples.iter().filter(|s| s.first).map(|s| s.ms).collect();
    let model: Vec<f64> = samples.iter().filter(|s| s.model).map(|s| s.ms).collect();
    json!({
        "requests": all.len(), "p50_ms": percentile(all.clone(), 0.5), "p95_ms": percentile(all, 0.95),
        "model_requests": model.len(), "model_p50_ms": percentile(model.clone(), 0.5),
        "model_p95_ms": percentile(model, 0.95),
        "first_keystroke_p50_ms": percentile(first.clone(), 0.5), "first_keystroke_max_ms": percentile(first, 1.0),
    })
}

/// Our side's settings.
struct Ours<'a> {
    policy: Option<&'a str>,
    visit_warm: bool,
    /// `completion.contextTokens` (None: the server's default).
    context_tokens: Option<u64>,
}

/// Our server's keystroke samples, its memory per document at the end (K/V
/// bytes and context tokens from `anchorcoder/status`, as `memory`) and what
/// its completions generated (`decode`, [`decode_cost`]). The server's log
/// is copied to `keep_log` where given.
fn ours(docs: &[Doc], sched: &Schedule, o: &Ours, keep_log: Option<&Path>) -> (Vec<Sample>, Value) {
    let rounds = sched.rounds;
    let (policy, visit_warm) = (o.policy, o.visit_warm);
    let mut completion = json!({"maxLines": 1, "maxTokens": 24});
    if let Some(n) = o.context_tokens {
        completion["contextTokens"] = json!(n);
    }
    // The server's log, for what each model run generated (`decode_ms_per_token`).
    let log = std::env::temp_dir().join(format!("anchorcoder-replay-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut s = Server::start(&[]);
    s.initialize(
        json!({"attention": {"policy": policy}, "threads": 2, "completion": completion, "logFile": log}),
        json!({"general": {"positionEncodings": ["utf-8"]}}),
    );
    for d in docs {
        s.open(&d.uri, "python", &d.initial_text(rounds));
    }
    // The user reads while the model loads and the open files warm up.
    let t = Instant::now();
    loop {
        // A long timeout: the worker answers status between warm-up steps.
        let st = s.request("anchorcoder/status", Value::Null, Duration::from_secs(900))["result"].clone();
        let warm = st["documents"].as_array().is_some_and(|a| {
            a.len() == docs.len() && a.iter().all(|d| d["pendingTokens"] == 0 && d["tokens"].as_u64() > Some(0))
        });
        if (st["model"]["state"] == "ready" && warm && st["queueDepth"] == 0) || t.elapsed() > Duration::from_secs(600)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("ours: model loaded and {} files warm after {:.0}s", docs.len(), t.elapsed().as_secs_f64());
    let mut version = 1;
    let samples = {
        let s = std::cell::RefCell::new(&mut s);
        replay(
            docs,
            sched,
            |i, _text, _cursor, line, col| {
                // What the editors do (anchorcoder/didMoveCursor, after the cursor rests).
                if visit_warm {
                    s.borrow_mut().notify(
                        "anchorcoder/didMoveCursor",
                        json!({"textDocument": {"uri": docs[i].uri}, "position": {"line": line, "character": col}}),
                    );
                }
            },
            |i, line, col, c| {
                version += 1;
                s.borrow_mut().notify(
                    "textDocument/didChange",
                    json!({"textDocument": {"uri": docs[i].uri, "version": version},
                           "contentChanges": [{"range": {"start": {"line": line, "character": col},
                                                         "end": {"line": line, "character": col}}, "text": c.to_string()}]}),
                );
            },
            |i, _text, _cursor, line, col| {
                let r = s.borrow_mut().request(
                    "textDocument/inlineCompletion",
                    json!({"textDocument": {"uri": docs[i].uri}, "position": {"line": line, "character": col},
                           "context": {"triggerKind": 2}}),
                    Duration::from_secs(300),
                );
                assert!(r.get("result").is_some(), "request failed: {r}");
                r["result"]["items"][0]["insertText"].as_str().unwrap_or("").to_string()
            },
        )
    };
    let st = s.status();
    let per_doc: Vec<Value> = st["documents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| json!({"uri": d["uri"], "kv_bytes": d["kvBytes"], "context_tokens": d["contextTokens"], "tokens": d["tokens"]}))
        .collect();
    let kv: Vec<f64> = per_doc.iter().filter_map(|d| d["kv_bytes"].as_f64()).collect();
    let memory =
        json!({"kv_bytes_per_document_mean": kv.iter().sum::<f64>() / kv.len().max(1) as f64, "documents": per_doc});
    s.shutdown();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if let Some(to) = keep_log {
        std::fs::write(to, &text).expect("cannot copy the server log");
    }
    let decode = decode_cost(&text);
    let _ = std::fs::remove_file(&log);
    (samples, json!({"memory": memory, "decode": decode}))
}

/// Tokens generated and time spent generating them, summed over the
/// completions of a server log (`completion … generated N in M ms …`), and
/// their ratio: the cost of a generated token whatever the suggestions' lengths
/// (context on and off make the model say different things, so the slowest
/// keystrokes differ in what they generate, not only in what a token costs).
fn decode_cost(log: &str) -> Value {
    let (mut tokens, mut ms) = (0u64, 0f64);
    for line in log.lines().filter(|l| l.contains(" completion ")) {
        let Some(rest) = line.split("generated ").nth(1) else { continue };
        let mut words = rest.split_whitespace();
        let n = words.next().and_then(|w| w.parse::<u64>().ok());
        let t = words.nth(1).and_then(|w| w.parse::<f64>().ok());
        if let (Some(n), Some(t)) = (n, t) {
            tokens += n;
            ms += t;
        }
    }
    json!({"generated_tokens": tokens, "decode_ms": ms, "decode_ms_per_token": if tokens > 0 { ms / tokens as f64 } else { f64::NAN }})
}

fn llama(docs: &[Doc], sched: &Schedule, bin: &str, model: &str, visit_warm: bool) -> Vec<Sample> {
    let threads = "2";
    let server = LlamaServer::launch(
        Path::new(bin),
        Path::new(model),
        &["-np", "1", "-c", "4096", "-t", threads, "-tb", threads, "--cache-reuse", "256"],
    );
    let post = |path: &str, body: &str| http_post(server.port, path, body).unwrap_or((0, String::new()));
    let (code, _) = post("/infill", &json!({"input_prefix": "def f(", "input_suffix": ""}).to_string());
    eprintln!("llama.cpp: /infill answers {code} for this model; using /completion with cache_prompt");
    let starts: std::cell::RefCell<Vec<Option<usize>>> = std::cell::RefCell::new(vec![None; docs.len()]);
    // The suggestion on screen and the document it belongs to.
    let mut shown: Option<(usize, String)> = None;
    replay(
        docs,
        sched,
        |i, text, cursor, _line, _col| {
            // The same head start as ours: the window up to the cursor is sent
            // with n_predict 0 (as llama.vim warms the server in idle time), in
            // the background; the first keystroke's request queues behind it.
            if visit_warm {
                let start = window_start(text, cursor, starts.borrow()[i]);
                starts.borrow_mut()[i] = Some(start);
                let body = json!({"prompt": &text[start..cursor], "n_predict": 0, "cache_prompt": true}).to_string();
                let port = server.port;
                std::thread::spawn(move || http_post(port, "/completion", &body));
            }
        },
        |_, _, _, _| {},
        |i, text, cursor, _line, _col| {
            let c = text[..cursor].chars().next_back().unwrap();
            // Typing through the shown suggestion: no request.
            if let Some((d, rest)) = &shown {
                if *d == i && rest.starts_with(c) && rest.len() > c.len_utf8() {
                    let rest = rest[c.len_utf8()..].to_string();
                    shown = Some((i, rest.clone()));
                    return rest;
                }
            }
            let start = window_start(text, cursor, starts.borrow()[i]);
            starts.borrow_mut()[i] = Some(start);
            let body = json!({
                "prompt": &text[start..cursor], "n_predict": 24, "cache_prompt": true,
                "temperature": 0.0, "top_k": 1, "stop": ["\n"],
            });
            let (code, resp) = post("/completion", &body.to_string());
            assert_eq!(code, 200, "llama-server /completion failed: {resp}");
            let v: Value = serde_json::from_str(&resp).expect("llama-server sent JSON");
            let s = v["content"].as_str().unwrap_or("").to_string();
            shown = Some((i, s.clone()));
            s
        },
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let rounds: usize = flag("--rounds").and_then(|v| v.parse().ok()).unwrap_or(2);
    let pause = Duration::from_millis(flag("--pause-ms").and_then(|v| v.parse().ok()).unwrap_or(30));
    let rest_every: usize = flag("--rest-every").and_then(|v| v.parse().ok()).unwrap_or(0);
    let sched = Schedule { rounds, pause, rest_every };
    // null: the server's default policy.
    let policy = flag("--policy");
    let only = flag("--only");
    // Off: no warm-up when the user moves to a file (the replay of before
    // editors reported the cursor).
    let visit_warm = !args.iter().any(|a| a == "--no-visit-warm");
    let stdlib = {
        let out = Command::new("python3")
            .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let docs: Vec<Doc> = FILES
        .iter()
        .zip(START_LINES)
        .map(|(f, start)| {
            let path = format!("{stdlib}/{f}");
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
            let lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
            // The first non-blank line at or after the chosen one, and the
            // ones after it, are typed.
            let mut start = start - 1;
            while lines[start].trim().is_empty() {
                start += 1;
            }
            assert!(lines.len() > start + rounds, "{path} is too short");
            Doc { uri: format!("file:///tmp/anchorcoder-replay/{f}"), lines, start }
        })
        .collect();
    for d in &docs {
        let typed: usize = (0..rounds).map(|k| d.typed(k).trim_start().chars().count()).sum();
        eprintln!("{}: {} lines, typing {typed} characters from line {}", d.uri, d.lines.len(), d.start + 1);
    }

    let mut report = serde_json::Map::new();
    let context_tokens: Option<u64> = flag("--context-tokens").and_then(|v| v.parse().ok());
    let samples_dir = flag("--samples");
    if let Some(d) = &samples_dir {
        std::fs::create_dir_all(d).expect("cannot create the samples folder");
    }
    let o = Ours { policy: policy.as_deref(), visit_warm, context_tokens };
    let compare = args.iter().any(|a| a == "--context-compare");
    let pairs: usize = flag("--compare-pairs").and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let run = |o: &Ours, name: &str| {
        let log = samples_dir.as_deref().map(|d| Path::new(d).join(format!("{name}.log")));
        let (samples, server) = ours(&docs, &sched, o, log.as_deref());
        save_samples(samples_dir.as_deref(), name, &samples);
        let mut s = stats(&samples);
        s["memory"] = server["memory"].clone();
        s["decode_ms_per_token"] = server["decode"]["decode_ms_per_token"].clone();
        s["generated_tokens"] = server["decode"]["generated_tokens"].clone();
        s
    };
    let off = Ours { context_tokens: Some(0), ..o };
    if only.as_deref() != Some("llama") {
        // The same session with project context off (`--context-compare`):
        // the latency and memory context costs. Several pairs alternate which
        // runs first, and the ratios' median is reported.
        let mut ratios: Vec<serde_json::Map<String, Value>> = Vec::new();
        for pair in 0..if compare { pairs } else { 1 } {
            let tag = if pair == 0 { String::new() } else { format!("-{}", pair + 1) };
            let (on, off) = if pair % 2 == 0 {
                let on = run(&o, &format!("ours{tag}"));
                (on, compare.then(|| run(&off, &format!("ours-context-off{tag}"))))
            } else {
                let off = run(&off, &format!("ours-context-off{tag}"));
                (run(&o, &format!("ours{tag}")), Some(off))
            };
            println!("ours ({}):   {on}", policy.as_deref().unwrap_or("default policy"));
            if let Some(off) = off {
                println!("ours, context off: {off}");
                let mut r = serde_json::Map::new();
                for k in COMPARED {
                    let ratio = on[k].as_f64().unwrap_or(f64::NAN) / off[k].as_f64().unwrap_or(f64::NAN);
                    println!("{k}: context on / off = {ratio:.2}x");
                    r.insert(k.to_string(), json!(ratio));
                }
                ratios.push(r);
                report.entry("ours_context_off").or_insert(off);
            }
            report.entry("ours").or_insert(on);
        }
        if !ratios.is_empty() {
            for k in COMPARED {
                let all: Vec<f64> = ratios.iter().map(|r| r[k].as_f64().unwrap_or(f64::NAN)).collect();
                if all.len() > 1 {
                    println!("{k}: context on / off, median of {} pairs = {:.2}x {all:.2?}", all.len(), median(&all));
                    report.insert(format!("{k}_ratios_context_on_over_off"), json!(all));
                }
                report.insert(format!("{k}_ratio_context_on_over_off"), json!(median(&all)));
            }
        }
    }
    if only.as_deref() != Some("ours") {
        let bin = flag("--llama-server").expect("--llama-server BIN");
        let model = flag("--model").expect("--model GGUF");
        let samples = llama(&docs, &sched, &bin, &model, visit_warm);
        save_samples(samples_dir.as_deref(), "llama-cpp", &samples);
        let s = stats(&samples);
        println!("llama.cpp: {s}");
        report.insert("llama_cpp".into(), s);
    }
    if let (Some(o), Some(l)) = (report.get("ours").cloned(), report.get("llama_cpp").cloned()) {
        for k in ["p50_ms", "p95_ms", "first_keystroke_p50_ms"] {
            let ratio = l[k].as_f64().unwrap() / o[k].as_f64().unwrap();
            report.insert(format!("{k}_ratio_llama_over_ours"), json!(ratio));
            println!("{k}: llama.cpp / ours = {ratio:.2}x");
        }
    }
    report.insert("policy".into(), json!(policy));
    report.insert("rounds".into(), json!(rounds));
    report.insert("rest_every".into(), json!(rest_every));
    println!("{}", Value::Object(report));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[1.2, 0.9, 1.0]), 1.0);
        assert_eq!(median(&[1.3, 0.9, 1.1, 1.0]), 1.05);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn decode_cost_sums_the_log_lines_that_generated() {
        let log = "1796545370 loaded m.gguf in 483ms\n\
                   1796545371 completion file:///a.py 61 ms (reused 9, prefilled 1, generated 8 in 50 ms, typed-through false)\n\
                   1796545372 completion file:///a.py 0 ms (reused 9, prefilled 0, generated 0 in 0 ms, typed-through true)\n\
                   1796545373 completion file:///b.py 30 ms (reused 4, prefilled 0, generated 4 in 25 ms, typed-through false)\n";
        let d = decode_cost(log);
        assert_eq!(d["generated_tokens"], 12);
        assert_eq!(d["decode_ms"], 75.0);
        assert_eq!(d["decode_ms_per_token"], 6.25);
        assert!(decode_cost("no completions here").get("decode_ms_per_token").unwrap().is_null());
    }

    #[test]
    fn typing_the_shown_suggestion_needs_no_model() {
        let shown = Some(("x = ".to_string(), "foo(1)".to_string()));
        assert!(types_through(&shown, "x = f"));
        assert!(types_through(&shown, "x = foo("));
        assert!(!types_through(&shown, "x = "), "nothing typed");
        assert!(!types_through(&shown, "x = g"), "typed something else");
        assert!(!types_through(&shown, "x = foo(1)"), "nothing left to show");
        assert!(!types_through(&None, "x = f"));
    }

    #[test]
    fn window_start_mirrors_the_server_plan() {
        let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(window_start(&text, 100, None), 0);
        let cursor = text.len() - 3;
        let s = window_start(&text, cursor, None);
        assert!(cursor - s <= WINDOW_BYTES && text.as_bytes()[s - 1] == b'\n');
        assert!(cursor - s > WINDOW_BYTES - 20, "the first line start within the budget");
        // Kept while typing further on.
        assert_eq!(window_start(&text, cursor + 1, Some(s)), s);
        assert_ne!(window_start(&text, cursor, Some(10)), 10, "too far back: recomputed");
    }
}
