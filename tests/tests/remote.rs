//! Remote engines end to end: the real `anchorcoder` binary over stdio with a
//! real llama.cpp server on 127.0.0.1 serving the default model, sometimes
//! behind a counting [`Proxy`] that can also play a server that never answers.

use std::time::{Duration, Instant};

use anchorcoder_e2e::{default_model, free_port, workspace, LlamaServer, Proxy, ProxyMode, Server};
use serde_json::{json, Value};

const SOURCE: &str = include_str!("../data/words.py");
const URI: &str = "file:///tmp/anchorcoder-remote/words.py";
const LONG: Duration = Duration::from_secs(120);

/// `SOURCE` without its final newline: the cursor goes at its end, on the
/// indented empty line of an unfinished function.
fn source() -> &'static str {
    SOURCE.strip_suffix('\n').unwrap_or(SOURCE)
}

/// `source()` with a loop begun in the unfinished function, the cursor in a
/// partial name: a prompt that OpenAI-compatible engines, which cannot be
/// made to heal tokens, continue well with this small model.
fn typed() -> String {
    format!("{}total = 0\n    for line in read_l", source())
}

fn end_of(text: &str) -> (u32, u32) {
    let line = text.matches('\n').count() as u32;
    (line, text.rsplit('\n').next().unwrap().encode_utf16().count() as u32)
}

/// The server with these settings and the document open.
fn started(settings: Value, env: &[(&str, &str)], text: &str) -> Server {
    let _ = default_model();
    let mut s = Server::start(env);
    s.initialize(settings, json!({}));
    s.open(URI, "python", text);
    s
}

fn inline_async(s: &mut Server, (line, character): (u32, u32)) -> i64 {
    s.request_async(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": URI}, "position": {"line": line, "character": character},
               "context": {"triggerKind": 1}}),
    )
}

/// The suggestion at `pos`, or the error message.
fn suggest(s: &mut Server, pos: (u32, u32)) -> Result<String, String> {
    let id = inline_async(s, pos);
    answer(s, id, LONG)
}

fn answer(s: &mut Server, id: i64, timeout: Duration) -> Result<String, String> {
    let r = s.response(id, timeout);
    match r.get("result") {
        Some(v) => Ok(v["items"].get(0).map_or("", |i| i["insertText"].as_str().unwrap()).to_string()),
        None => Err(r["error"]["message"].as_str().unwrap_or_default().to_string()),
    }
}

fn backend(kind: &str, url: &str, extra: Value) -> Value {
    let mut b = json!({"kind": kind, "url": url, "timeoutMs": 60000});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    // Short suggestions: these machines are shared and slow.
    json!({"backend": b, "completion": {"maxTokens": 24}})
}

/// What a shown message said, if any contains `needle`.
fn shown(s: &mut Server, needle: &str) -> Option<String> {
    s.pump(Duration::from_millis(200));
    s.notifications
        .iter()
        .filter(|(m, _)| m == "window/showMessage")
        .filter_map(|(_, p)| p["message"].as_str())
        .find(|m| m.contains(needle))
        .map(str::to_string)
}

/// The rules of a multi-line suggestion at the cursor of `source()` or
/// `typed()` (block indentation 4): at most `max_lines` lines, none of them dedented below the
/// block.
fn assert_multi_line_rules(text: &str, max_lines: usize) {
    assert!(!text.trim().is_empty(), "an empty suggestion");
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(lines.len() <= max_lines, "{} lines > {max_lines}: {text:?}", lines.len());
    for l in &lines[1..] {
        let indent = l.len() - l.trim_start().len();
        assert!(l.trim().is_empty() || indent >= 4, "a line leaves the block: {text:?}");
    }
    assert!(!text.contains("\n\n\n"), "{text:?}");
}

#[test]
fn openai_and_llamacpp_completions_pass_through_the_same_rules() {
    let engine = LlamaServer::start(&[]);
    for kind in ["openai", "llamacpp"] {
        let proxy = Proxy::start(engine.port);
        let mut s = started(backend(kind, &proxy.url(), json!({})), &[], &typed());
        let text = suggest(&mut s, end_of(&typed())).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_multi_line_rules(&text, 8);
        assert!(text.contains('\n'), "{kind}: the loop gets a body: {text:?}");

        // The local rules decide, whatever the engine writes: at most one line now.
        s.notify("workspace/didChangeConfiguration", json!({"settings": {"completion": {"maxLines": 1}}}));
        let moved = format!("{}\n        ", typed());
        s.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": 2}, "contentChanges": [{"text": moved}]}),
        );
        let one = suggest(&mut s, end_of(&moved)).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert!(!one.contains('\n'), "{kind}: maxLines 1 gave {one:?}");

        // Text after the cursor on its line: one line that does not repeat it.
        let with_suffix = format!("{}\n    return len(read_lines())\n", source().trim_end());
        s.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": 3}, "contentChanges": [{"text": with_suffix}]}),
        );
        let (line, _) = end_of(source().trim_end());
        let at = (line + 1, "    return len(read_lines(".len() as u32);
        let single = suggest(&mut s, at).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert!(!single.contains('\n') && !single.trim_end().ends_with("))"), "{kind}: {single:?}");

        let st = s.status();
        let b = &st["backend"];
        assert_eq!(b["kind"], kind, "{st}");
        assert!(matches!(b["state"].as_str(), Some("reachable" | "slow")), "{st}");
        assert!(b["latencyMs"].as_f64().unwrap() > 0.0, "{st}");
        assert_eq!(b["completions"]["remote"], 3, "{st}");
        assert_eq!(st["model"]["state"], "unloaded", "the local model stays unloaded: {st}");
        let requests = proxy.requests();
        if kind == "openai" {
            assert!(requests.iter().any(|r| r == "POST /v1/completions"), "{requests:?}");
            assert_eq!(b["endpoint"], "/v1/completions");
        } else {
            // The default model has no FIM tokens: /infill answers 501 once, then /completion.
            assert_eq!(requests.iter().filter(|r| *r == "POST /infill").count(), 1, "{requests:?}");
            assert!(requests.iter().filter(|r| *r == "POST /completion").count() >= 3, "{requests:?}");
            assert_eq!(b["endpoint"], "/completion");
            assert!(b["note"].as_str().unwrap().contains("no fill-in-the-middle tokens"), "{st}");
        }
        assert!(s.alive());
        s.shutdown();
    }
}

#[test]
fn a_server_killed_mid_request_gives_a_clear_error_and_completions_resume() {
    let mut engine = LlamaServer::start(&[]);
    let proxy = Proxy::start(engine.port);
    // A long document, so the engine is still reading the prompt when killed.
    let long: String = (0..60).map(|i| format!("def helper_{i}(x):\n    return x * {i} + len(str(x))\n\n\n")).collect();
    let text = format!("{long}{}", source());
    // Only /completion (no FIM), so the one request in flight is the one killed.
    let mut settings = backend("llamacpp", &proxy.url(), json!({}));
    settings["completion"]["fim"] = json!(false);
    let mut s = started(settings, &[], &text);
    let id = inline_async(&mut s, end_of(&text));
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.in_flight() == 0 {
        assert!(Instant::now() < deadline, "the request never reached the engine");
        std::thread::sleep(Duration::from_millis(2));
    }
    engine.kill();
    let err = answer(&mut s, id, LONG).expect_err("the engine died mid-request");
    assert!(err.contains("remote engine at") && err.contains("broke"), "{err}");
    assert!(s.alive());
    assert_eq!(s.status()["backend"]["state"], "down");
    assert!(shown(&mut s, "broke").is_some(), "the user is told");

    // Down: a clear error at once, not a hang.
    let t0 = Instant::now();
    let err = suggest(&mut s, end_of(&text)).expect_err("nothing listens");
    assert!(err.contains("cannot connect to the remote engine") || err.contains("broke"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    let engine = LlamaServer::start(&[]);
    proxy.set_upstream(engine.port);
    // A short document now: a cold engine on a loaded machine reads long prompts slowly.
    s.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": URI, "version": 2}, "contentChanges": [{"text": source()}]}),
    );
    let text2 = suggest(&mut s, end_of(source())).expect("works again once the engine is back");
    assert!(!text2.trim().is_empty());
    let st = s.status();
    assert!(matches!(st["backend"]["state"].as_str(), Some("reachable" | "slow")), "{st}");
    s.shutdown();
}

#[test]
fn a_silent_server_times_out_and_the_next_keystroke_is_served() {
    let engine = LlamaServer::start(&[]);
    let proxy = Proxy::start(engine.port);
    proxy.set_mode(ProxyMode::Silent);
    let mut s = started(backend("openai", &proxy.url(), json!({"timeoutMs": 1500, "model": "smol"})), &[], source());
    let t0 = Instant::now();
    let err = suggest(&mut s, end_of(source())).expect_err("nothing answers");
    let waited = t0.elapsed();
    assert!(err.contains("did not answer within 1500 ms"), "{err}");
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(6), "{waited:?}");
    let st = s.status();
    assert_eq!(st["backend"]["state"], "down", "{st}");
    assert!(st["backend"]["lastError"].as_str().unwrap().contains("1500 ms"));

    // A request hangs on the silent server; the next keystroke's request
    // replaces it at once and is served as soon as the engine answers again
    // (a longer timeout now: this machine's engine may be slow).
    s.notify("workspace/didChangeConfiguration", json!({"settings": {"backend": {"timeoutMs": 60000}}}));
    let hung = inline_async(&mut s, end_of(source()));
    std::thread::sleep(Duration::from_millis(300));
    proxy.set_mode(ProxyMode::Forward);
    let typed = format!("{}r", source());
    s.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": URI, "version": 2}, "contentChanges": [{"text": typed}]}),
    );
    let t1 = Instant::now();
    let next = inline_async(&mut s, end_of(&typed));
    let r = s.response(hung, Duration::from_secs(5));
    assert_eq!(r["error"]["code"], -32800, "the hung request is cancelled: {r}");
    assert!(t1.elapsed() < Duration::from_secs(1), "cancelled at once: {:?}", t1.elapsed());
    answer(&mut s, next, LONG).expect("the next keystroke is served");
    assert!(proxy.requests().iter().filter(|r| *r == "POST /v1/completions").count() >= 3);
    assert!(s.alive());
    s.shutdown();
}

#[test]
fn a_wrong_api_key_gets_a_clear_message_and_the_key_is_never_shown() {
    let engine = LlamaServer::start(&["--api-key", "right-key-4711"]);
    let settings = backend("openai", &engine.url(), json!({"apiKeyEnv": "ANCHORCODER_E2E_KEY"}));

    let mut s = started(settings.clone(), &[("ANCHORCODER_E2E_KEY", "wrong-key-0815")], source());
    let err = suggest(&mut s, end_of(source())).expect_err("the key is wrong");
    assert!(err.contains("refused the API key from $ANCHORCODER_E2E_KEY (HTTP 401"), "{err}");
    assert!(shown(&mut s, "refused the API key").is_some());
    let st = s.status();
    let everything = format!("{st} {:?} {err}", s.notifications);
    assert!(!everything.contains("wrong-key-0815"), "the key leaked: {everything}");
    assert_eq!(st["backend"]["apiKey"], "from $ANCHORCODER_E2E_KEY");
    s.shutdown();

    let mut s = started(settings.clone(), &[], source());
    let err = suggest(&mut s, end_of(source())).expect_err("no key at all");
    assert!(err.contains("ANCHORCODER_E2E_KEY, which is not set"), "{err}");
    s.shutdown();

    let mut s = started(settings, &[("ANCHORCODER_E2E_KEY", "right-key-4711")], &typed());
    let text = suggest(&mut s, end_of(&typed())).expect("the right key works");
    assert!(!text.trim().is_empty());
    let everything = format!("{} {:?}", s.status(), s.notifications);
    assert!(!everything.contains("right-key-4711"), "the key leaked: {everything}");
    s.shutdown();
}

#[test]
fn fifty_rapid_requests_keep_at_most_one_in_flight_per_document() {
    // Four slots: the engine itself would run several requests at once.
    let engine = LlamaServer::start(&[]);
    let proxy = Proxy::start(engine.port);
    let mut s = started(backend("llamacpp", &proxy.url(), json!({})), &[], source());
    let mut text = source().to_string();
    let mut ids = Vec::new();
    for (i, c) in "total = 0 for line in read_lines(path): tot".chars().cycle().take(50).enumerate() {
        text.push(c);
        s.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": i + 2}, "contentChanges": [{"text": text}]}),
        );
        ids.push(inline_async(&mut s, end_of(&text)));
        std::thread::sleep(Duration::from_millis(15));
    }
    let mut cancelled = 0;
    for (i, id) in ids.iter().enumerate() {
        let r = s.response(*id, LONG);
        if r["error"]["code"] == -32800 {
            cancelled += 1;
        } else {
            assert!(r.get("result").is_some(), "request {i}: {r}");
        }
    }
    let again = inline_async(&mut s, end_of(&text));
    let last = s.response(again, LONG);
    assert!(last.get("result").is_some(), "{last}");
    let sent = proxy.requests().len();
    assert!(cancelled >= 40, "newer requests cancel older ones: {cancelled} of 50");
    assert!(sent >= 2, "{sent}");
    assert_eq!(proxy.max_in_flight(), 1, "at most one request in flight to the engine ({sent} sent)");
    // The engine stopped the aborted generations: no slot keeps working.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.busy_slots(None) > 0 {
        assert!(Instant::now() < deadline, "the engine still generates for aborted requests");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "50 rapid requests: {cancelled} cancelled, {sent} sent to the engine, at most 1 in flight \
         ({} arrived while an aborted one's close was in transit)",
        proxy.raw_overlaps()
    );
    s.shutdown();
}

#[test]
fn fallback_to_local_serves_while_the_remote_is_down() {
    let proxy = Proxy::start(free_port());
    let settings = backend("llamacpp", &proxy.url(), json!({"fallbackToLocal": true}));
    let mut s = started(settings, &[], source());
    let text = suggest(&mut s, end_of(source())).expect("served by the local model");
    assert_multi_line_rules(&text, 8);
    let st = s.status();
    assert_eq!(st["backend"]["state"], "down", "{st}");
    assert_eq!(st["model"]["state"], "ready", "loaded lazily for the fallback: {st}");
    assert!(st["backend"]["completions"]["localFallback"].as_u64().unwrap() >= 1, "{st}");

    // The engine comes up: after the next probe completions go remote again.
    let engine = LlamaServer::start(&[]);
    proxy.set_upstream(engine.port);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut version = 2;
    loop {
        let typed = format!("{}{}", source(), " ".repeat(version - 1));
        s.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": version}, "contentChanges": [{"text": typed}]}),
        );
        version += 1;
        suggest(&mut s, end_of(&typed)).expect("served, remote or local");
        if s.status()["backend"]["completions"]["remote"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never went back to the remote engine: {}", s.status());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(proxy.requests().iter().any(|r| r == "POST /completion"));
    s.shutdown();
}

#[test]
fn the_remote_engine_gets_the_project_context() {
    let _ = default_model();
    let engine = LlamaServer::start(&[]);
    let proxy = Proxy::start(engine.port);
    let root = workspace(
        "anchorcoder-remote-ctx",
        &[
            ("geometry/__init__.py", ""),
            (
                "geometry/shapes.py",
                "import math\n\n\ndef area_of_circle(radius):\n    return math.pi * radius * radius\n",
            ),
        ],
    );
    let mut s = Server::start(&[]);
    let root_uri = format!("file://{}", root.display());
    s.initialize_at(Some(&root_uri), backend("llamacpp", &proxy.url(), json!({})), json!({}));
    let uri = format!("{root_uri}/app.py");
    let text = "from geometry.shapes import area_of_circle\n\n\ndef report(r):\n    return area_of_circle(";
    s.open(&uri, "python", text);
    // Opening warms the document: for a remote engine, that chooses its context.
    let t = Instant::now();
    let files = loop {
        let st = s.status();
        let files = st["backend"]["documents"][0]["contextFiles"].clone();
        if files.as_array().is_some_and(|f| !f.is_empty()) || t.elapsed() > LONG {
            break files;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(files[0]["path"], "geometry/shapes.py", "{files}");
    let (line, ch) = end_of(text);
    let r = s.request(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": ch},
               "context": {"triggerKind": 1}}),
        LONG,
    );
    assert!(r["result"]["items"].is_array(), "{r}");
    // The default model has no FIM tokens: llama.cpp refuses /infill and the
    // prompt goes to /completion as text, the context first under path comments.
    let bodies = proxy.bodies();
    let sent: Vec<Value> = bodies.iter().filter_map(|b| serde_json::from_str(b).ok()).collect();
    let with_context = sent.iter().find(|b| {
        let extra = b["input_extra"].to_string();
        let prompt = b["prompt"].as_str().unwrap_or_default();
        let definition = "def area_of_circle(radius):\n    return math.pi * radius * radius\n";
        (extra.contains("geometry/shapes.py") && extra.contains(&definition.replace('\n', "\\n")))
            || prompt.starts_with(&format!("# geometry/shapes.py\n{definition}\n# app.py\nfrom geometry"))
    });
    assert!(with_context.is_some(), "no request carried the context: {bodies:?}");
    assert!(s.alive());
    s.shutdown();
    let _ = std::fs::remove_dir_all(&root);
}

/// A fake engine on loopback: each connection's request head (request line
/// and headers) goes to `answer`, which writes the whole response.
fn fake_engine(answer: fn(&str, &mut std::net::TcpStream)) -> String {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                // Read the body too: closing with unread bytes would reset the
                // connection before the client reads the answer.
                let len = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                let _ = c.read_exact(&mut vec![0u8; len]);
                answer(&head, &mut c);
            });
        }
    });
    url
}

/// An error whose message echoes the request's headers, the authorization
/// line first (as a careless engine or proxy does).
fn echo_headers(code: u16, head: &str, c: &mut std::net::TcpStream) {
    use std::io::Write;
    let mut lines: Vec<&str> = head.lines().skip(1).filter(|l| !l.is_empty()).collect();
    lines.sort_by_key(|l| !l.to_ascii_lowercase().starts_with("authorization"));
    let body = json!({"error": {"message": format!("denied; you sent {}", lines.join("; "))}}).to_string();
    let _ = write!(
        c,
        "HTTP/1.1 {code} Oops\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// The server process this test started last (a child of this process).
fn children() -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            let after = stat.rsplit_once(") ").map_or("", |(_, a)| a);
            stat.contains("(anchorcoder)") && after.split(' ').nth(1) == Some(me.as_str())
        })
        .collect()
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB");
    kb.trim().parse::<u64>().unwrap() / 1024
}

#[test]
fn an_engine_that_echoes_the_headers_never_brings_the_key_out() {
    const KEY: &str = "sk-e2e-echo-4711-zyxw";
    let log = std::env::temp_dir().join(format!("anchorcoder-e2e-redact-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let url401 = fake_engine(|h, c| echo_headers(401, h, c));
    let url500 = fake_engine(|h, c| echo_headers(500, h, c));
    for (kind, url) in [("openai", &url401), ("llamacpp", &url500)] {
        let mut settings =
            backend(kind, url, json!({"apiKeyEnv": "ANCHORCODER_E2E_ECHO_KEY", "model": "m", "timeoutMs": 5000}));
        settings["logFile"] = json!(log);
        let mut s = started(settings, &[("ANCHORCODER_E2E_ECHO_KEY", KEY)], source());
        let err = suggest(&mut s, end_of(source())).expect_err("the engine refuses");
        assert!(err.contains("denied; you sent"), "the engine's message is kept: {err}");
        assert!(shown(&mut s, "denied").is_some(), "{:?}", s.notifications);
        // A URL with credentials is refused without quoting them.
        s.notify(
            "workspace/didChangeConfiguration",
            json!({"settings": {"backend": {"url": "http://alice:pw-4711-secret@gpu.example:8000"}}}),
        );
        assert!(shown(&mut s, "backend.url").is_some(), "{:?}", s.notifications);
        let st = s.status();
        assert!(st["backend"]["lastError"].as_str().unwrap().contains("denied"), "{st}");
        let everything = format!("{err} {st} {:?}", s.notifications);
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("denied") && logged.contains("backend.url"), "{logged}");
        for secret in [KEY, "4711-zyxw", "pw-4711-secret"] {
            assert!(!everything.contains(secret), "{secret} leaked: {everything}");
            assert!(!logged.contains(secret), "{secret} leaked into the log: {logged}");
        }
        assert!(everything.contains("[redacted]"), "{everything}");
        s.shutdown();
    }
    let _ = std::fs::remove_file(&log);
}

/// Headers, then one endless server-sent-events line.
fn endless_line(_: &str, c: &mut std::net::TcpStream) {
    use std::io::Write;
    let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: ");
    let x = vec![b'x'; 1 << 16];
    while c.write_all(&x).is_ok() {}
}

/// Headers and one event, then nothing.
fn stall(head: &str, c: &mut std::net::TcpStream) {
    use std::io::Write;
    let event = if head.starts_with("POST /v1/") {
        "data: {\"choices\":[{\"text\":\" \",\"finish_reason\":null}]}\n\n"
    } else {
        "data: {\"content\":\" \",\"stop\":false}\n\n"
    };
    let _ = write!(c, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n{event}");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn an_endless_event_line_or_a_stalled_stream_fails_within_bounds() {
    let (line_url, stall_url) = (fake_engine(endless_line), fake_engine(stall));
    for kind in ["openai", "llamacpp"] {
        let before = children();
        let mut s = started(backend(kind, &line_url, json!({"model": "m", "timeoutMs": 20000})), &[], source());
        let pid = *children().iter().find(|p| !before.contains(p)).expect("the server's pid");
        let t0 = Instant::now();
        let err = suggest(&mut s, end_of(source())).expect_err("an endless line");
        assert!(err.contains("an event line longer than 8 MiB"), "{kind}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{kind}: {:?}", t0.elapsed());
        let peak = peak_rss_mib(pid);
        assert!(peak < 200, "{kind}: the server peaked at {peak} MiB");
        assert!(s.status()["backend"]["lastError"].as_str().unwrap().contains("8 MiB"));
        s.shutdown();

        // The timeout bounds the streaming too, not only the wait for headers.
        let mut s = started(backend(kind, &stall_url, json!({"model": "m", "timeoutMs": 1500})), &[], source());
        let t0 = Instant::now();
        let err = suggest(&mut s, end_of(source())).expect_err("a stalled stream");
        assert!(err.contains("did not answer within 1500 ms"), "{kind}: {err}");
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(5), "{kind}: {took:?}");
        assert!(s.alive());
        s.shutdown();
    }
}
