//! llama.cpp's server, natively: `/infill` (fill-in-the-middle) or, for a
//! model without FIM tokens (the server answers 501), `/completion` with the
//! text before the cursor. Both with `cache_prompt`, so the server reuses the
//! longest common prefix of its slot's previous prompt.
//!
//! Token healing is exact here: a grammar makes the first tokens spell the
//! bytes cut from the prompt, as the local engine's forced prefix does.
//!
//! `/infill` lays the prompt out as `[extra]` FIM_PRE prefix FIM_SUF suffix
//! FIM_MID line: the lines above and the text after the cursor stay put while
//! the user types, and only the cursor's line (`prompt`) changes.

use serde_json::{json, Value};

use super::RemoteRequest;

/// Fill-in-the-middle.
pub const INFILL: &str = "/infill";
/// Plain continuation.
pub const COMPLETION: &str = "/completion";
/// The health probe (503 while the server loads its model).
pub const HEALTH: &str = "/health";

/// Greedy sampling and healing, the common part of both bodies.
fn common(r: &RemoteRequest) -> Value {
    let mut b = json!({
        "n_predict": r.max_tokens,
        "temperature": 0,
        "stop": r.stop,
        "cache_prompt": true,
        "stream": true,
    });
    if !r.forced.is_empty() {
        b["grammar"] = forced_grammar(&r.forced).into();
    }
    b
}

/// A GBNF grammar for "starts with `prefix`, then anything".
fn forced_grammar(prefix: &str) -> String {
    let mut lit = String::new();
    for c in prefix.chars() {
        match c {
            '"' => lit.push_str("\\\""),
            '\\' => lit.push_str("\\\\"),
            '\t' => lit.push_str("\\t"),
            '\r' => lit.push_str("\\r"),
            '\n' => lit.push_str("\\n"),
            c => lit.push(c),
        }
    }
    format!("root ::= \"{lit}\" rest\nrest ::= [^\\x00]*")
}

/// The `/infill` body (the request must carry a suffix).
pub fn infill_body(r: &RemoteRequest) -> Value {
    let mut b = common(r);
    b["input_prefix"] = r.context.clone().into();
    b["input_suffix"] = r.suffix.clone().unwrap_or_default().into();
    b["input_extra"] =
        r.extra.iter().map(|(path, text)| json!({ "filename": path, "text": text })).collect::<Vec<_>>().into();
    b["prompt"] = r.line.clone().into();
    b
}

/// The `/completion` body: the text before the cursor.
pub fn completion_body(r: &RemoteRequest) -> Value {
    let mut b = common(r);
    b["prompt"] = r.prompt().into();
    b
}

/// The text of one response or stream chunk, and whether it is the last.
pub fn parse(v: &Value) -> Result<(String, bool), String> {
    if let Some(e) = v.get("error") {
        return Err(super::http::error_text(e));
    }
    let Some(content) = v.get("content").and_then(Value::as_str) else {
        return Err(format!("no `content` in the answer: {}", super::http::shorten(&v.to_string())));
    };
    Ok((content.to_string(), v.get("stop").and_then(Value::as_bool).unwrap_or(false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RemoteRequest {
        RemoteRequest {
            context: "def add(a, b):\n".into(),
            line: "    return".into(),
            forced: String::new(),
            suffix: Some("\n\nprint(add(1, 2))\n".into()),
            max_tokens: 16,
            stop: vec!["\n".into()],
            extra: vec![],
            extra_text: String::new(),
        }
    }

    #[test]
    fn infill_keeps_the_typed_line_last() {
        let b = infill_body(&request());
        assert_eq!(b["input_prefix"], "def add(a, b):\n");
        assert_eq!(b["input_suffix"], "\n\nprint(add(1, 2))\n");
        assert_eq!(b["prompt"], "    return");
        assert_eq!(b["input_extra"], json!([]));
        assert_eq!((b["cache_prompt"].as_bool(), b["stream"].as_bool()), (Some(true), Some(true)));
        assert_eq!((b["n_predict"].as_u64(), b["temperature"].as_u64()), (Some(16), Some(0)));
        assert!(b.get("grammar").is_none(), "nothing to heal");
        assert_eq!(b["stop"], json!(["\n"]));
    }

    #[test]
    fn completion_sends_the_text_before_the_cursor() {
        let b = completion_body(&request());
        assert_eq!(b["prompt"], "def add(a, b):\n    return");
        assert!(b.get("input_suffix").is_none());
        assert_eq!(b["cache_prompt"], true);
    }

    #[test]
    fn project_context_goes_in_input_extra_or_before_the_prompt() {
        let r = RemoteRequest {
            extra: vec![("util.py".into(), "def helper(x): ...\n".into())],
            extra_text: "# util.py\ndef helper(x): ...\n\n# main.py\n".into(),
            ..request()
        };
        assert_eq!(infill_body(&r)["input_extra"], json!([{ "filename": "util.py", "text": "def helper(x): ...\n" }]));
        assert_eq!(infill_body(&r)["input_prefix"], "def add(a, b):\n", "the extra is not repeated in the prefix");
        assert_eq!(
            completion_body(&r)["prompt"],
            "# util.py\ndef helper(x): ...\n\n# main.py\ndef add(a, b):\n    return"
        );
    }

    #[test]
    fn healing_forces_the_cut_bytes_with_a_grammar() {
        let r = RemoteRequest { line: String::new(), forced: "    ".into(), ..request() };
        assert_eq!(completion_body(&r)["grammar"], "root ::= \"    \" rest\nrest ::= [^\\x00]*");
        assert_eq!(forced_grammar(" \"a\\\t"), "root ::= \" \\\"a\\\\\\t\" rest\nrest ::= [^\\x00]*");
    }

    #[test]
    fn parses_stream_chunks_and_errors() {
        assert_eq!(parse(&json!({"content": " a + b", "stop": false})), Ok((" a + b".into(), false)));
        assert_eq!(parse(&json!({"content": "", "stop": true, "timings": {}})), Ok((String::new(), true)));
        let e = json!({"error": {"code": 501, "message": "Infill is not supported by this model", "type": "not_supported_error"}});
        assert_eq!(parse(&e), Err("Infill is not supported by this model".into()));
        assert!(parse(&json!({"choices": []})).unwrap_err().contains("no `content`"));
    }
}
