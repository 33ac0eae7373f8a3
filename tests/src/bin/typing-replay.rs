//! Keystroke-to-suggestion latency over LSP: a real source file is typed in
//! character by character against the real server, with an inline-completion
//! request after each keystroke and pauses between lines; then the same replay
//! against a server with caching off (every request recomputed from scratch).
//! Prints p50/p95 of both and the ratio; the last line is one JSON object.
//!
//! `cargo run --release -p anchorcoder-e2e --bin typing-replay -- [FILE] [--context-lines N] [--typed-lines M]`
//! (set ANCHORCODER_BIN to the release binary for release numbers).

use std::time::{Duration, Instant};

use anchorcoder_e2e::Server;
use serde_json::json;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Replay typing `typed` after `context`; returns latencies in ms.
fn replay(context: &str, typed: &str, cache: bool, pause_ms: u64) -> Vec<f64> {
    let mut s = Server::start(&[]);
    s.initialize(
        json!({"cache": {"enabled": cache}, "completion": {"maxLines": 1, "maxTokens": 24}}),
        json!({"general": {"positionEncodings": ["utf-8"]}}),
    );
    let uri = "file:///tmp/anchorcoder-replay/replayed.py";
    s.open(uri, "python", context);
    // Let the model load (and, with the cache on, the document warm up) as it
    // would while the user reads the file.
    let st = Instant::now();
    while s.status()["model"]["state"] != "ready" && st.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(pause_ms * 10));
    let mut line = context.matches('\n').count() as u32;
    let mut col = context.rsplit('\n').next().unwrap().len() as u32;
    let mut version = 1;
    let mut lat = Vec::new();
    for c in typed.chars() {
        version += 1;
        let text = c.to_string();
        s.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": uri, "version": version},
                   "contentChanges": [{"range": {"start": {"line": line, "character": col}, "end": {"line": line, "character": col}}, "text": text}]}),
        );
        if c == '\n' {
            line += 1;
            col = 0;
            // A pause at the end of a line: idle time the server may use.
            std::thread::sleep(Duration::from_millis(pause_ms * 10));
            continue;
        }
        col += c.len_utf8() as u32;
        let t = Instant::now();
        let r = s.request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": col}, "context": {"triggerKind": 2}}),
            Duration::from_secs(300),
        );
        assert!(r.get("result").is_some(), "request failed: {r}");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(pause_ms));
    }
    s.shutdown();
    lat
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let file =
        args.iter().find(|a| !a.starts_with("--") && a.parse::<usize>().is_err()).cloned().unwrap_or_else(|| {
            let out = std::process::Command::new("python3")
                .args(["-c", "import json.decoder as m; print(m.__file__)"])
                .output()
                .expect("python3");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        });
    let (context_lines, typed_lines) = (flag("--context-lines", 60), flag("--typed-lines", 2));
    let text = std::fs::read_to_string(&file).expect("read the source file");
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    assert!(lines.len() > context_lines + typed_lines, "{file} is too short");
    // Start typing at a non-blank line so every keystroke has context.
    let start = (context_lines..lines.len()).find(|&i| !lines[i].trim().is_empty()).unwrap();
    let context: String = lines[..start].concat();
    let typed: String = lines[start..start + typed_lines].concat().trim_end().to_string();
    eprintln!("file {file}: {start} lines of context, typing {} characters", typed.chars().count());

    let mut report = serde_json::Map::new();
    let mut p50s = Vec::new();
    for cache in [true, false] {
        let mut lat = replay(&context, &typed, cache, 30);
        lat.sort_by(|a, b| a.total_cmp(b));
        let (p50, p95) = (percentile(&lat, 0.5), percentile(&lat, 0.95));
        let name = if cache { "cached" } else { "uncached" };
        println!("{name:>9}: {} requests, p50 {p50:.0} ms, p95 {p95:.0} ms", lat.len());
        report.insert(name.into(), json!({"requests": lat.len(), "p50_ms": p50, "p95_ms": p95}));
        p50s.push(p50);
    }
    let ratio = p50s[1] / p50s[0];
    println!("speed-up of the cache at p50: {ratio:.1}x");
    report.insert("file".into(), json!(file));
    report.insert("context_lines".into(), json!(start));
    report.insert("p50_ratio_uncached_over_cached".into(), json!(ratio));
    println!("{}", serde_json::Value::Object(report));
}
