//! Probes of the server's edges, as a careless client or an attacker would
//! send them (issue 12): the lifecycle (`shutdown`, `exit`, a client that
//! vanishes with work queued), cheap requests while the model is busy, and
//! prompts cut from pathological lines. Real binary, real default model.

use std::time::{Duration, Instant};

use anchorcoder_e2e::{default_model, Server};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);

fn started(options: Value) -> Server {
    let mut s = Server::start(&[]);
    let init = s.initialize(options, json!({}));
    assert!(init.get("result").is_some(), "{init}");
    s
}

fn wait_ready(s: &mut Server) {
    let deadline = Instant::now() + LONG;
    while s.status()["model"]["state"] != "ready" {
        assert!(Instant::now() < deadline, "the model never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn inline_async(s: &mut Server, uri: &str, line: u32, character: u32) -> i64 {
    s.request_async(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character},
               "context": {"triggerKind": 2}}),
    )
}

/// About `lines` lines of ordinary Python, different per `seed` so that no
/// two documents share a cache.
fn python(seed: usize, lines: usize) -> String {
    (0..lines)
        .map(|i| format!("def f{seed}_{i}(x, y):\n    return x * {i} + y - {seed}\n"))
        .collect::<Vec<_>>()
        .concat()
}

/// Open `n` long documents and ask for a completion at the end of each,
/// without waiting: the worker has minutes of prefill queued.
fn queue_heavy_work(s: &mut Server, n: usize) -> Vec<i64> {
    (0..n)
        .map(|d| {
            let uri = format!("file:///tmp/anchorcoder-probe/busy{d}.py");
            let text = python(d, 300);
            s.open(&uri, "python", &text);
            inline_async(s, &uri, 600, 0)
        })
        .collect()
}

#[test]
fn exit_without_shutdown_ends_the_process_with_status_1() {
    let mut s = started(json!({}));
    s.notify("exit", Value::Null);
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(1), "the specification: 1 without a shutdown request");
}

#[test]
fn shutdown_takes_null_or_no_params_and_then_refuses_other_requests() {
    let mut s = started(json!({}));
    let id = s.request_async("shutdown", Value::Null);
    let r = s.response(id, Duration::from_secs(10));
    assert!(r.get("error").is_none() && r["result"].is_null(), "shutdown with null params: {r}");
    // After shutdown, requests are refused with an error, not served.
    let r = s.request("anchorcoder/status", Value::Null, Duration::from_secs(10));
    assert!(r.get("error").is_some(), "a request after shutdown: {r}");
    s.notify("exit", Value::Null);
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));

    // A request without any `params` member at all.
    let mut s = started(json!({}));
    let body = r#"{"jsonrpc":"2.0","id":77,"method":"shutdown"}"#;
    s.send_raw(format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
    let r = s.response(77, Duration::from_secs(10));
    assert!(r.get("error").is_none(), "shutdown without params: {r}");
    s.notify("exit", Value::Null);
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_client_that_vanishes_with_work_queued_leaves_no_process_behind() {
    let _ = default_model();
    let mut s = started(json!({}));
    wait_ready(&mut s);
    let ids = queue_heavy_work(&mut s, 30);
    // Let the worker start on them.
    let _ = s.status();
    assert!(s.alive());
    s.close_stdin();
    let t0 = Instant::now();
    let code = s.wait_exit(Duration::from_secs(10));
    assert!(
        code.is_some(),
        "still running {:?} after stdin closed, with {} completions queued",
        t0.elapsed(),
        ids.len()
    );
    assert_eq!(code, Some(1), "no shutdown came first");
}

#[test]
fn status_answers_at_once_while_the_worker_is_busy() {
    let _ = default_model();
    let mut s = started(json!({}));
    wait_ready(&mut s);
    queue_heavy_work(&mut s, 30);
    for _ in 0..5 {
        let t0 = Instant::now();
        // Each of these completions needs seconds of prefill; status must not wait for any.
        let r = s.request("anchorcoder/status", Value::Null, Duration::from_secs(5));
        let st = &r["result"];
        assert_eq!(st["model"]["state"], "ready", "{r}");
        assert!(st["queueDepth"].as_u64().unwrap() >= 1, "the worker was busy while asked: {st}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(300));
    }
    // `shutdown` stops the queued completions instead of waiting for them.
    s.shutdown();
}

#[test]
fn completions_at_the_end_of_huge_lines_without_a_newline_are_answered() {
    let _ = default_model();
    let mut s = started(json!({}));
    wait_ready(&mut s);
    let cases = [
        ("file:///tmp/anchorcoder-probe/line7k.js", "var a = [".to_string() + &"1, ".repeat(2_330)),
        ("file:///tmp/anchorcoder-probe/line1m.json", "{\"k\": [".to_string() + &"\"abcdef\", ".repeat(100_000)),
        ("file:///tmp/anchorcoder-probe/head.py", "import os\n".to_string() + &"x = 1; ".repeat(1_500)),
    ];
    for (uri, text) in &cases {
        s.open(uri, "text", text);
        let (line, character) = (text.matches('\n').count() as u32, text.rsplit('\n').next().unwrap().len() as u32);
        let id = inline_async(&mut s, uri, line, character);
        let r = s.response(id, LONG);
        assert!(r.get("result").is_some(), "{uri} ({} bytes): {r}", text.len());
    }
    s.pump(Duration::from_millis(200));
    let internal: Vec<_> = s.notifications.iter().filter(|(_, p)| p.to_string().contains("internal error")).collect();
    assert!(internal.is_empty(), "nothing in the request path may panic: {internal:?}");
    s.shutdown();
}
