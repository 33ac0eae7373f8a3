//! End to end: the real `anchorcoder` binary over stdio with the real default
//! model.

use std::time::Duration;

use anchorcoder_e2e::{default_model, workspace, Server};
use serde_json::{json, Value};

/// The example of the README's run command; the cursor goes at its end, on
/// the indented empty line of an unfinished function.
const SOURCE: &str = include_str!("../data/words.py");

/// `SOURCE` without its final newline, so its end is the indented cursor line.
fn source() -> &'static str {
    SOURCE.strip_suffix('\n').unwrap_or(SOURCE)
}

const URI: &str = "file:///tmp/anchorcoder-e2e/words.py";
const LONG: Duration = Duration::from_secs(180);

fn inline(server: &mut Server, uri: &str, line: u32, character: u32) -> Value {
    server.request(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character},
               "context": {"triggerKind": 2}}),
        LONG,
    )
}

/// The LSP position (line, UTF-16 character) of byte `at` in `text`; lines
/// end at `\n`, `\r\n` or `\r`.
fn position_of(text: &str, at: usize) -> (u32, u32) {
    let before = &text[..at];
    let line_start = before.rfind(['\n', '\r']).map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + before.matches('\r').count() - before.matches("\r\n").count();
    (line as u32, before[line_start..].encode_utf16().count() as u32)
}

/// The position of the end of `text`.
fn end_of(text: &str) -> (u32, u32) {
    position_of(text, text.len())
}

fn started() -> Server {
    let mut s = Server::start(&[]);
    let init = s.initialize(json!({}), json!({}));
    let caps = &init["result"]["capabilities"];
    assert!(caps["inlineCompletionProvider"].is_object(), "inline completion advertised: {caps}");
    assert_eq!(caps["textDocumentSync"]["change"], 2, "incremental sync");
    s
}

#[test]
fn inline_completion_is_sensible_and_reuses_the_cache_after_an_edit() {
    let _ = default_model();
    let mut s = started();
    s.open(URI, "python", source());
    let (line, ch) = end_of(source());
    let r = inline(&mut s, URI, line, ch);
    let items = r["result"]["items"].as_array().unwrap_or_else(|| panic!("no items: {r}"));
    assert_eq!(items.len(), 1, "{r}");
    let text = items[0]["insertText"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "empty suggestion");
    // The model continues the pattern of the file: a Python body that uses its names.
    assert!(text.contains("read_lines") || text.contains("return") || text.contains("total"), "{text:?}");
    assert_eq!(items[0]["range"]["start"], json!({"line": line, "character": ch}));

    // Type a few characters and ask again: the prefix stays cached.
    s.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": URI, "version": 2},
               "contentChanges": [{"range": {"start": {"line": line, "character": ch}, "end": {"line": line, "character": ch}}, "text": "n = "}]}),
    );
    let r = inline(&mut s, URI, line, ch + 4);
    assert!(r.get("result").is_some(), "{r}");
    let st = s.status();
    assert_eq!(st["model"]["state"], "ready", "{st}");
    let doc = &st["documents"][0];
    let tokens = doc["tokens"].as_u64().unwrap();
    let reused = doc["reusedTokens"].as_u64().unwrap();
    assert!(tokens > 100, "{st}");
    assert!(reused + 10 >= tokens && reused > 100, "the edit reused the cached prefix: {st}");
    assert!(st["cacheBytes"].as_u64().unwrap() > 0);
    assert!(st["lastLatenciesMs"].as_array().unwrap().len() >= 2);
    s.shutdown();
}

#[test]
fn a_burst_of_requests_answers_the_newest_and_the_queue_drains() {
    let _ = default_model();
    let mut s = started();
    s.open(URI, "python", source());
    let (line, mut ch) = end_of(source());
    let mut ids = Vec::new();
    for (i, c) in "n = total + 1; m = n * 2 + 3 ; k = m - n + 4 ; pq".chars().take(50).enumerate() {
        s.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": 2 + i},
                   "contentChanges": [{"range": {"start": {"line": line, "character": ch}, "end": {"line": line, "character": ch}}, "text": c.to_string()}]}),
        );
        ch += 1;
        ids.push(s.request_async(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": URI}, "position": {"line": line, "character": ch}, "context": {"triggerKind": 2}}),
        ));
    }
    let last = *ids.last().unwrap();
    let mut cancelled = 0;
    for id in &ids {
        let r = s.response(*id, LONG);
        if let Some(e) = r.get("error") {
            assert_eq!(e["code"], -32800, "only cancellations may fail: {r}");
            cancelled += 1;
        }
        if *id == last {
            assert!(r.get("result").is_some(), "the newest request is answered: {r}");
        }
    }
    assert!(cancelled >= 40, "older requests were superseded ({cancelled} of 50)");
    // Nothing piles up: at most the last keystroke's warm-up is left, and it drains.
    let st = s.status();
    assert!(st["queueDepth"].as_u64().unwrap() <= 1, "{st}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s.status()["queueDepth"] != 0 {
        assert!(std::time::Instant::now() < deadline, "the queue never drained");
        std::thread::sleep(Duration::from_millis(200));
    }
    s.shutdown();
}

/// Wait until the worker has nothing queued (completions and warm-ups).
fn wait_idle(s: &mut Server) {
    let deadline = std::time::Instant::now() + LONG;
    while s.status()["queueDepth"] != 0 {
        assert!(std::time::Instant::now() < deadline, "the worker never went idle");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_cursor_the_editor_reports_is_warmed_before_the_first_keystroke() {
    let _ = default_model();
    let mut s = started();
    // 3,000 lines: the window warmed on open (the top) is far from the cursor's.
    let text: String = (0..1500).map(|i| format!("def f{i}(x):\n    return x + {i}\n")).collect();
    let uri = "file:///tmp/anchorcoder-e2e/long.py";
    s.open(uri, "python", &text);
    wait_idle(&mut s);
    let (line, ch) = (2401, "    return x".len() as u32);
    s.notify(
        "anchorcoder/didMoveCursor",
        json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": ch}}),
    );
    std::thread::sleep(Duration::from_millis(500));
    wait_idle(&mut s);
    let r = inline(&mut s, uri, line, ch);
    assert!(r["result"]["items"].is_array(), "{r}");
    let st = s.status();
    let doc = &st["documents"][0];
    let (tokens, reused) = (doc["tokens"].as_u64().unwrap(), doc["reusedTokens"].as_u64().unwrap());
    assert!(tokens > 1000, "the prompt window is full: {st}");
    assert!(reused + 16 >= tokens, "the first request found its prompt warmed: {st}");
    assert_eq!(
        st["cursor"],
        json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": ch}}),
        "{st}"
    );

    // A cursor off the document, or in a document not open, is ignored.
    s.notify(
        "anchorcoder/didMoveCursor",
        json!({"textDocument": {"uri": uri}, "position": {"line": 99999, "character": 0}}),
    );
    s.notify(
        "anchorcoder/didMoveCursor",
        json!({"textDocument": {"uri": "file:///nowhere.py"}, "position": {"line": 0, "character": 0}}),
    );
    s.notify("anchorcoder/didMoveCursor", json!({"textDocument": {"uri": uri}}));
    let st = s.status();
    assert_eq!(st["documents"][0]["tokens"], doc["tokens"], "the cache is untouched: {st}");
    assert!(s.alive());
    s.shutdown();
}

#[test]
fn definitions_from_imported_files_of_the_workspace_lead_the_prompt() {
    let _ = default_model();
    let root = workspace(
        "anchorcoder-e2e-ctx",
        &[
            ("geometry/__init__.py", ""),
            (
                "geometry/shapes.py",
                "import math\n\n\ndef area_of_circle(radius):\n    return math.pi * radius * radius\n\n\n\
                 def unrelated_helper():\n    return None\n",
            ),
        ],
    );
    let mut s = Server::start(&[]);
    let root_uri = format!("file://{}", root.display());
    s.initialize_at(Some(&root_uri), json!({}), json!({}));
    let uri = format!("{root_uri}/app.py");
    let text = "from geometry.shapes import area_of_circle\n\n\ndef report(r):\n    return area_of_circle(";
    s.open(&uri, "python", text);
    wait_idle(&mut s);
    let st = s.status();
    let doc = &st["documents"][0];
    assert_eq!(doc["contextFiles"][0]["path"], "geometry/shapes.py", "{st}");
    assert!(doc["contextTokens"].as_u64().unwrap() > 10, "{st}");
    assert_eq!(doc["pendingTokens"], 0, "warm-up filled the prompt, context included: {st}");
    let (line, ch) = end_of(text);
    let r = inline(&mut s, &uri, line, ch);
    assert!(r["result"]["items"].is_array(), "{r}");
    let st = s.status();
    let doc = &st["documents"][0];
    let (tokens, reused) = (doc["tokens"].as_u64().unwrap(), doc["reusedTokens"].as_u64().unwrap());
    assert!(
        reused > doc["contextTokens"].as_u64().unwrap() && reused + 16 >= tokens,
        "the completion reused the warmed prompt with its context: {st}"
    );
    assert!(s.alive());
    s.shutdown();
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_context_follows_the_cursor_to_another_function_once_typing_pauses() {
    let _ = default_model();
    let root = workspace(
        "anchorcoder-e2e-ctx-place",
        &[
            ("geometry/__init__.py", ""),
            ("geometry/shapes.py", "import math\n\n\ndef area_of_circle(radius):\n    return math.pi * radius ** 2\n"),
            ("billing/__init__.py", ""),
            ("billing/money.py", "def format_price(cents):\n    return f\"${cents / 100:.2f}\"\n"),
        ],
    );
    let mut s = Server::start(&[]);
    let root_uri = format!("file://{}", root.display());
    // A budget that holds one of the two definitions.
    s.initialize_at(Some(&root_uri), json!({"completion": {"contextTokens": 40}}), json!({}));
    let uri = format!("{root_uri}/app.py");
    let filler: String = (0..60).map(|i| format!("STEP_{i} = {i}\n")).collect();
    let report = "def report(r):\n    return geometry.shapes.area_of_circle(r)\n";
    let bill = "def bill(amount):\n    return billing.money.format_price(amount)\n";
    let text = format!("import geometry.shapes\nimport billing.money\n\n\n{report}\n\n{filler}\n\n{bill}");
    // Opened, the server warms the last line: in `bill`.
    s.open(&uri, "python", &text);
    wait_idle(&mut s);
    let files = |s: &mut Server| {
        let st = s.status();
        st["documents"][0]["contextFiles"].as_array().unwrap().iter().map(|f| f["path"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(files(&mut s), ["billing/money.py"]);
    // The cursor rests in `report`: after the pause, its context is chosen there and filled.
    let line = text[..text.find("    return geometry").unwrap()].lines().count();
    s.notify(
        "anchorcoder/didMoveCursor",
        json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": 4}}),
    );
    // Polled, not one wait for an idle worker: a status taken between the
    // worker taking up the job and publishing its next snapshot reads idle.
    let deadline = std::time::Instant::now() + LONG;
    while files(&mut s) != ["geometry/shapes.py"] && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(files(&mut s), ["geometry/shapes.py"]);
    let st = s.status();
    assert_eq!(st["documents"][0]["pendingTokens"], 0, "filled before it replaced the cache in use: {st}");
    assert!(s.alive());
    s.shutdown();
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn cancel_request_stops_a_completion() {
    let _ = default_model();
    let mut s = started();
    s.open(URI, "python", source());
    let (line, ch) = end_of(source());
    let id = s.request_async(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": URI}, "position": {"line": line, "character": ch}, "context": {"triggerKind": 1}}),
    );
    s.notify("$/cancelRequest", json!({"id": id}));
    let r = s.response(id, LONG);
    // Either it was cancelled, or it had already finished: never anything else.
    if let Some(e) = r.get("error") {
        assert_eq!(e["code"], -32800, "{r}");
    } else {
        assert!(r["result"]["items"].is_array(), "{r}");
    }
    // The server still works afterwards.
    let r = inline(&mut s, URI, line, ch);
    assert!(r["result"]["items"].is_array(), "{r}");
    s.shutdown();
}

#[test]
fn bad_input_gets_clear_errors_and_documents_stay_right() {
    let _ = default_model();
    let mut s = started();
    s.open(URI, "python", source());
    // Malformed JSON-RPC: the server keeps running.
    s.send_raw(b"Content-Length: 12\r\n\r\n{not json!!}");
    // Unknown method.
    let r = s.request("anchorcoder/nope", json!({}), LONG);
    assert_eq!(r["error"]["code"], -32601, "{r}");
    // Unknown document.
    let r = inline(&mut s, "file:///nowhere.py", 0, 0);
    assert!(r["error"]["message"].as_str().unwrap().contains("not open"), "{r}");
    // A line past the end.
    let r = inline(&mut s, URI, 999, 0);
    assert!(r.get("error").is_some(), "{r}");
    // A UTF-16 offset inside a surrogate pair.
    let emoji = "file:///tmp/anchorcoder-e2e/emoji.py";
    s.open(emoji, "python", "x = '😀'\n");
    let r = inline(&mut s, emoji, 0, 6);
    assert!(r["error"]["message"].as_str().unwrap().to_lowercase().contains("surrogate"), "{r}");
    // A bad edit leaves the document as it was (and says so).
    s.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": emoji, "version": 2},
               "contentChanges": [{"range": {"start": {"line": 0, "character": 6}, "end": {"line": 0, "character": 6}}, "text": "x"}]}),
    );
    // Over 8 KiB with byte 8,192 (and 8 KiB past the cursor) inside a
    // character: opening it once crashed the server, completing in it the worker.
    let accents = "file:///tmp/anchorcoder-e2e/accents.py";
    s.open(accents, "python", &format!("x = 1\n#  {}\n", "é".repeat(6_000)));
    let r = inline(&mut s, accents, 0, 2);
    assert!(r["result"]["items"].is_array(), "{r}");
    // The very start of a document: nothing to continue, no suggestion, no error.
    let r = inline(&mut s, accents, 0, 0);
    assert_eq!(r["result"]["items"], json!([]), "{r}");
    // Binary content.
    let bin = "file:///tmp/anchorcoder-e2e/blob.bin";
    s.open(bin, "plaintext", "ELF\u{0}\u{0}\u{1}binary");
    let r = inline(&mut s, bin, 0, 3);
    assert!(r["error"]["message"].as_str().unwrap().contains("binary"), "{r}");
    // A 20 MB file: accepted, and only a window around the cursor reaches the model.
    let big_uri = "file:///tmp/anchorcoder-e2e/big.py";
    let big: String = "def f(x):\n    return x + 1\n\n".repeat(20 * 1024 * 1024 / 28);
    s.open(big_uri, "python", &big);
    let (line, ch) = end_of(&big);
    let r = inline(&mut s, big_uri, line, ch);
    assert!(r.get("result").is_some(), "{r}");
    let st = s.status();
    let big_doc = st["documents"].as_array().unwrap().iter().find(|d| d["uri"] == big_uri).cloned().unwrap();
    assert!(big_doc["tokens"].as_u64().unwrap() <= 8192, "bounded window: {big_doc}");
    // The original document still completes and the server is alive.
    let (line, ch) = end_of(source());
    let r = inline(&mut s, URI, line, ch);
    assert!(r["result"]["items"].is_array(), "{r}");
    assert!(s.alive());
    s.shutdown();
}

/// xorshift64*, for the fuzz test below (deterministic per seed).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}

/// A random JSON value of the kinds clients get wrong.
fn junk(rng: &mut Rng, depth: usize) -> Value {
    let scalars = [
        json!(null),
        json!(-1),
        json!(0),
        json!(2_147_483_648u64),
        json!(u64::MAX),
        json!(0.5),
        json!(1e300),
        json!(""),
        json!("not a uri"),
        json!("file:///"),
        json!("\u{0}😀"),
        json!(true),
        json!(URI),
    ];
    let keys = [
        "uri",
        "line",
        "character",
        "textDocument",
        "position",
        "range",
        "text",
        "version",
        "context",
        "triggerKind",
        "settings",
        "id",
        "contentChanges",
        "start",
        "end",
    ];
    match rng.below(if depth < 3 { 4 } else { 2 }) {
        0 | 1 => rng.pick(&scalars),
        2 => Value::Array((0..rng.below(4)).map(|_| junk(rng, depth + 1)).collect()),
        _ => Value::Object((0..rng.below(5)).map(|_| (rng.pick(&keys).to_string(), junk(rng, depth + 1))).collect()),
    }
}

#[test]
fn random_malformed_messages_never_stop_the_server() {
    let _ = default_model();
    let mut s = Server::start(&[]);
    s.initialize(json!({"completion": {"maxTokens": 4}}), json!({}));
    s.open(URI, "python", source());
    let fuzzed = "file:///tmp/anchorcoder-e2e/fuzzed.py";
    s.open(fuzzed, "python", "def add(a, b):\n    return a + b\n");
    let methods = [
        "textDocument/inlineCompletion",
        "textDocument/completion",
        "anchorcoder/status",
        "anchorcoder/didMoveCursor",
        "workspace/didChangeConfiguration",
        "textDocument/didChange",
        "textDocument/didOpen",
        "textDocument/didClose",
        "textDocument/didSave",
        "$/cancelRequest",
        "anchorcoder/nope",
    ];
    // Messages that tower-lsp itself cannot decode (each once stopped the server).
    let undecodable = [
        r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#,
        r#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#,
        r#"{"jsonrpc":"2.0","id":[],"result":1}"#,
        r#"{"jsonrpc":"2.0","method":5}"#,
        r#"{"id":3,"method":"x"}"#,
        "{}",
        "[]",
        "null",
        "{",
        "\u{1}\u{2}binary",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut requests = Vec::new();
    for _ in 0..600 {
        let method = rng.pick(&methods);
        let pos = |rng: &mut Rng| {
            json!({"line": rng.pick(&[json!(0), json!(1), json!(40), json!(-1), json!(u32::MAX)]),
                                         "character": rng.pick(&[json!(0), json!(3), json!(500), json!("x")])})
        };
        let params = match (method, rng.below(3)) {
            (_, 0) => junk(&mut rng, 0),
            ("textDocument/didChange", _) => json!({
                "textDocument": {"uri": rng.pick(&[URI, fuzzed]), "version": rng.below(100)},
                // Every range of an edit to URI is impossible, so URI must stay as it was.
                "contentChanges": [{"range": {"start": {"line": 90_000, "character": 0}, "end": pos(&mut rng)},
                                    "text": rng.pick(&["x", "\n", "😀", "\r\n"])}]}),
            (m, _) if m.starts_with("textDocument/") || m.starts_with("anchorcoder/did") => json!({
                "textDocument": {"uri": rng.pick(&[json!(fuzzed), json!("file:///nowhere.py"), json!(5)])},
                "position": pos(&mut rng), "context": {"triggerKind": rng.pick(&[json!(1), json!(2), json!(9)])}}),
            ("workspace/didChangeConfiguration", _) => json!({"settings": {"anchorcoder": {
                rng.pick(&["completion", "attention", "cache", "backend", "logFile"]).to_string(): junk(&mut rng, 1)}}}),
            _ => junk(&mut rng, 0),
        };
        match rng.below(10) {
            0 => {
                let body = rng.pick(&undecodable);
                s.send_raw(format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
            }
            1..=4 => requests.push(s.request_async(method, params)),
            _ => s.notify(method, params),
        }
    }
    // Every request got an answer (a result or an error), in time.
    for id in requests {
        let r = s.response(id, LONG);
        assert!(r.get("result").is_some() || r["error"]["message"].is_string(), "{r}");
    }
    assert!(s.alive());
    assert!(s.status()["documents"].is_array());
    // Every edit sent to URI was impossible: the server kept its text and says
    // that the editor's copy may differ, until the editor sends it again.
    let (line, ch) = end_of(source());
    let r = inline(&mut s, URI, line, ch);
    assert!(r["error"]["message"].as_str().unwrap().contains("out of sync"), "{r}");
    s.notify("textDocument/didClose", json!({"textDocument": {"uri": URI}}));
    s.open(URI, "python", source());
    let r = inline(&mut s, URI, line, ch);
    assert!(r["result"]["items"].is_array(), "{r}");
    assert!(s.alive());
    s.shutdown();
}

/// [`position_of`] as an LSP `Position`.
fn lsp_position(text: &str, at: usize) -> Value {
    let (line, character) = position_of(text, at);
    json!({"line": line, "character": character})
}

/// The nearest place at or before byte `at` that is a character boundary of
/// `text` and does not split a `\r\n`.
fn snap(text: &str, at: usize) -> usize {
    let at = text.floor_char_boundary(at);
    if at > 0 && text[..at].ends_with('\r') && text[at..].starts_with('\n') {
        at - 1
    } else {
        at
    }
}

#[test]
fn random_unicode_edits_and_completions_keep_working() {
    let _ = default_model();
    let mut s = Server::start(&[]);
    // A short prompt keeps this quick on the debug build: what is tested is
    // where text is cut and sliced, which does not depend on its length.
    s.initialize(json!({"completion": {"maxTokens": 4, "prefixTokens": 128}}), json!({}));
    let pieces = [
        "def f(x):",
        " ",
        "    ",
        "\t",
        "\n",
        "\r\n",
        "x = 1",
        "é",
        "😀",
        "日本語",
        "🇯🇵",
        "e\u{301}",
        "\u{200b}",
        "# ",
        "ß",
    ];
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let random_text = |rng: &mut Rng, n: usize| (0..n).map(|_| rng.pick(&pieces)).collect::<String>();
    let uris = ["file:///tmp/anchorcoder-e2e/u0.py", "file:///tmp/anchorcoder-e2e/u1.py"];
    // One short document and one whose 8 KiB marks fall among multi-byte characters.
    let mut texts = vec![random_text(&mut rng, 40), random_text(&mut rng, 3_000)];
    for (uri, text) in uris.iter().zip(&texts) {
        s.open(uri, "python", text);
    }
    let mut versions = [1; 2];
    let mut requests = Vec::new();
    for _ in 0..300 {
        let d = rng.below(2);
        let text = &texts[d];
        match rng.below(10) {
            0..=5 => {
                let a = snap(text, rng.below(text.len() + 1));
                let b = snap(text, a + rng.below(13)).max(a);
                let n = rng.below(3);
                let insert = random_text(&mut rng, n);
                versions[d] += 1;
                s.notify(
                    "textDocument/didChange",
                    json!({"textDocument": {"uri": uris[d], "version": versions[d]},
                           "contentChanges": [{"range": {"start": lsp_position(text, a), "end": lsp_position(text, b)},
                                               "text": insert}]}),
                );
                texts[d] = format!("{}{insert}{}", &text[..a], &text[b..]);
            }
            6..=8 => {
                let at = snap(text, rng.below(text.len() + 1));
                requests.push(s.request_async(
                    "textDocument/inlineCompletion",
                    json!({"textDocument": {"uri": uris[d]}, "position": lsp_position(text, at),
                           "context": {"triggerKind": 2}}),
                ));
            }
            _ => {
                let at = snap(text, rng.below(text.len() + 1));
                s.notify(
                    "anchorcoder/didMoveCursor",
                    json!({"textDocument": {"uri": uris[d]}, "position": lsp_position(text, at)}),
                );
            }
        }
    }
    // One line longer than the prompt budget (minified code): the window
    // starts inside it (this once panicked the worker).
    let minified = "file:///tmp/anchorcoder-e2e/minified.js";
    let line = "f(a,b);g(c);".repeat(4_000);
    s.open(minified, "javascript", &format!("var x = 1;\n{line}"));
    requests.push(s.request_async(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": minified}, "position": {"line": 1, "character": line.len()},
               "context": {"triggerKind": 1}}),
    ));
    // Every completion is a suggestion (or was replaced by a newer request):
    // no position error (the server's text is the test's), no internal error.
    for id in requests {
        let r = s.response(id, LONG);
        let error = r["error"]["message"].as_str().unwrap_or("");
        assert!(error.is_empty() || error.contains("superseded") || error.contains("cancelled"), "{r}");
    }
    // Digits are a token each: the prompt is planned again to stay near its
    // 128-token budget instead of taking the ~400 tokens its bytes would give.
    let digits = "file:///tmp/anchorcoder-e2e/digits.txt";
    s.open(digits, "plaintext", &"1234567890\n".repeat(300));
    let r = inline(&mut s, digits, 300, 0);
    assert!(r["result"]["items"].is_array(), "{r}");
    let st = s.status();
    let doc = st["documents"].as_array().unwrap().iter().find(|d| d["uri"] == digits).cloned().unwrap();
    assert!(doc["tokens"].as_u64().unwrap() <= 2 * 128, "{doc}");
    s.pump(Duration::from_millis(500));
    let internal: Vec<_> = s.notifications.iter().filter(|(_, p)| p.to_string().contains("internal error")).collect();
    assert!(internal.is_empty(), "{internal:?}");
    assert!(s.alive());
    s.shutdown();
}

#[test]
fn a_missing_or_truncated_model_is_reported_and_the_server_stays_up() {
    let model = default_model();
    let dir = std::env::temp_dir().join(format!("anchorcoder-e2e-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    for path in [dir.join("missing.gguf"), truncated] {
        let mut s = Server::start(&[]);
        s.initialize(json!({"model": {"path": path}}), json!({}));
        s.open(URI, "python", source());
        let (line, ch) = end_of(source());
        let r = inline(&mut s, URI, line, ch);
        let msg = r["error"]["message"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
        assert!(msg.contains(&*path.to_string_lossy()), "names the file: {msg}");
        s.pump(Duration::from_millis(300));
        let shown = s.notifications.iter().any(|(m, p)| m == "window/showMessage" && p["type"] == 1);
        assert!(shown, "an error message is shown: {:?}", s.notifications);
        // Still serving: status answers with the error.
        let st = s.status();
        assert_eq!(st["model"]["state"], "error", "{st}");
        s.shutdown();
    }
}

#[test]
fn files_that_are_not_models_or_adapters_are_refused_by_name_without_their_content() {
    let model = default_model();
    let dir = std::env::temp_dir().join(format!("anchorcoder-e2e-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("pipe.gguf");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let text = dir.join("notes.gguf");
    std::fs::write(&text, "hello, these are private notes\n").unwrap();
    let bad_version = dir.join("v99.gguf");
    std::fs::write(&bad_version, b"GGUF\x63\x00\x00\x00private bytes").unwrap();
    let (fifo_s, text_s, v99_s) = (fifo.to_str().unwrap(), text.to_str().unwrap(), bad_version.to_str().unwrap());
    let model_s = model.to_str().unwrap();
    let cases = [
        // (model.path, model.adapter, what the error must say)
        (model_s, "/dev/zero", "adapter /dev/zero is a device, not a regular file"),
        (model_s, fifo_s, "is a named pipe (FIFO), not a regular file"),
        (fifo_s, "none", "is a named pipe (FIFO), not a regular file"),
        (text_s, "none", "is not a GGUF file (bad magic)"),
        (v99_s, "none", "is not a valid GGUF file"),
    ];
    for (path, adapter, expected) in cases {
        // A backtrace would be captured if the server honoured this.
        let mut s = Server::start(&[("RUST_BACKTRACE", "1")]);
        s.initialize(json!({"model": {"path": path, "adapter": adapter}}), json!({}));
        s.open(URI, "python", source());
        let (line, ch) = end_of(source());
        let r = s.request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": URI}, "position": {"line": line, "character": ch},
                   "context": {"triggerKind": 2}}),
            Duration::from_secs(60),
        );
        let msg = r["error"]["message"].as_str().unwrap_or_else(|| panic!("{path} {adapter}: {r}")).to_string();
        assert!(msg.contains(expected), "{path} {adapter}: {msg}");
        let named = if adapter == "none" { path } else { adapter };
        assert!(msg.contains(named), "names the file: {msg}");
        // Not the file's bytes (as text or hex), not a backtrace.
        for leak in ["private", "hello", "6c6c6568", "0x", "stack backtrace", "backtrace", ".rs:"] {
            assert!(!msg.contains(leak), "{path} {adapter}: `{leak}` in {msg}");
        }
        // Still serving: the status answers at once with the error.
        let st = s.request("anchorcoder/status", Value::Null, Duration::from_secs(10))["result"].clone();
        assert_eq!(st["model"]["state"], "error", "{st}");
        s.shutdown();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
