//! OpenAI-compatible `/v1/completions` (vLLM, llama.cpp's server, Ollama,
//! TGI): the text before the cursor as `prompt`, greedy, streamed.
//!
//! No `suffix`: servers disagree on it (vLLM refuses it), so fill-in-the-middle
//! needs the `llamacpp` kind.

use serde_json::{json, Value};

use super::RemoteRequest;

/// The endpoint, under the base URL.
pub const PATH: &str = "/v1/completions";

/// Where the served models are listed (the health probe, and the model name
/// when `backend.model` is unset).
pub const MODELS_PATH: &str = "/v1/models";

/// The request body.
pub fn body(model: &str, r: &RemoteRequest) -> Value {
    json!({
        "model": model,
        "prompt": r.prompt(),
        "max_tokens": r.max_tokens,
        "temperature": 0,
        // OpenAI allows at most four stop sequences.
        "stop": r.stop.iter().take(4).collect::<Vec<_>>(),
        "stream": true,
    })
}

/// The text of one response or stream chunk, and whether it is the last.
pub fn parse(v: &Value) -> Result<(String, bool), String> {
    if let Some(e) = v.get("error") {
        return Err(super::http::error_text(e));
    }
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| format!("no `choices` in the answer: {}", super::http::shorten(&v.to_string())))?;
    let text = choice.get("text").and_then(Value::as_str).unwrap_or("").to_string();
    let done = choice.get("finish_reason").is_some_and(|f| !f.is_null());
    Ok((text, done))
}

/// The first served model's id in a `/v1/models` answer.
pub fn first_model(v: &Value) -> Option<String> {
    v.get("data")?.get(0)?.get("id")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_greedy_streamed_and_prefix_only() {
        let r = RemoteRequest {
            context: "import os\n".into(),
            line: "def f(".into(),
            forced: String::new(),
            suffix: Some(")\n".into()),
            max_tokens: 32,
            stop: vec!["\n".into(), "a".into(), "b".into(), "c".into(), "d".into()],
            extra: vec![],
            extra_text: String::new(),
        };
        let b = body("coder", &r);
        assert_eq!(b["model"], "coder");
        assert_eq!(b["prompt"], "import os\ndef f(");
        assert_eq!((b["max_tokens"].as_u64(), b["temperature"].as_u64()), (Some(32), Some(0)));
        assert_eq!(b["stop"], json!(["\n", "a", "b", "c"]));
        assert_eq!(b["stream"], true);
        assert!(b.get("suffix").is_none());
    }

    #[test]
    fn parses_chunks_final_chunks_and_errors() {
        let chunk = json!({"choices": [{"text": "x = 1", "index": 0, "finish_reason": null}]});
        assert_eq!(parse(&chunk), Ok(("x = 1".into(), false)));
        let last = json!({"choices": [{"text": "", "finish_reason": "length"}], "usage": {}});
        assert_eq!(parse(&last), Ok((String::new(), true)));
        let err = json!({"error": {"message": "model `x` not found", "code": 404}});
        assert_eq!(parse(&err), Err("model `x` not found".into()));
        assert!(parse(&json!({"object": "list"})).unwrap_err().contains("no `choices`"));
        let models = json!({"object": "list", "data": [{"id": "Qwen/Qwen2.5-Coder-7B"}]});
        assert_eq!(first_model(&models).as_deref(), Some("Qwen/Qwen2.5-Coder-7B"));
        assert_eq!(first_model(&json!({"data": []})), None);
    }
}
