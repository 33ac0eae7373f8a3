//! HTTP plumbing shared by the engine kinds: server-sent events, error texts
//! from JSON bodies, and failures sorted into "the engine is down" or not.

use serde_json::Value;

/// Why a remote request failed, said so the user can act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteError {
    /// The message (never holds the API key).
    pub message: String,
    /// Whether the engine is unreachable or broken (connect, timeout, reset,
    /// 5xx) rather than refusing this request (4xx): the former marks it
    /// down and may fall back to the local model.
    pub down: bool,
    /// The HTTP status, when the engine answered.
    pub status: Option<u16>,
}

impl RemoteError {
    /// The engine is unreachable or broken.
    pub fn down(message: String) -> Self {
        RemoteError { message, down: true, status: None }
    }

    /// The engine answered but refused or was misunderstood.
    pub fn refused(message: String) -> Self {
        RemoteError { message, down: false, status: None }
    }
}

/// Splits a `text/event-stream` body, arriving in arbitrary pieces, into the
/// payloads of its `data:` lines (each engine sends one JSON object a line).
/// llama.cpp reports failures mid-stream as `error:` lines: returned as
/// `{"error": ...}` payloads.
#[derive(Default)]
pub struct EventStream {
    pending: Vec<u8>,
}

impl EventStream {
    /// Feed bytes; returns the complete payloads they finish.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=i).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_string());
            } else if let Some(err) = line.strip_prefix("error:") {
                out.push(format!("{{\"error\": {}}}", err.trim_start()));
            }
        }
        out
    }
}

/// The message of an engine's `error` value (`{"message": ...}` or a string).
pub fn error_text(e: &Value) -> String {
    match e {
        Value::String(s) => s.clone(),
        _ => e.get("message").and_then(Value::as_str).map_or_else(|| shorten(&e.to_string()), str::to_string),
    }
}

/// The error message in an HTTP error body, JSON or not.
pub fn body_message(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => match v.get("error").or_else(|| v.get("detail")).or_else(|| v.get("message")) {
            Some(e) => error_text(e),
            None => shorten(body.trim()),
        },
        Err(_) => shorten(body.trim()),
    }
}

/// At most 200 characters of `s`, for messages.
pub fn shorten(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// The innermost cause of a transport error ("Connection refused (os error
/// 111)" rather than "error sending request").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_split_across_pieces_are_joined() {
        let mut s = EventStream::default();
        assert!(s.push(b"data: {\"content\":\"a").is_empty());
        assert_eq!(s.push(b"b\"}\r\n\r\ndata: [DONE]\n"), ["{\"content\":\"ab\"}", "[DONE]"]);
        assert_eq!(s.push(b": keep-alive comment\nevent: x\n\n"), Vec::<String>::new());
        assert_eq!(s.push(b"error: {\"message\":\"boom\"}\n"), ["{\"error\": {\"message\":\"boom\"}}"]);
        // A multi-byte character cut between pieces survives.
        let text = "data: \"é\"\n".as_bytes();
        assert!(s.push(&text[..7]).is_empty());
        assert_eq!(s.push(&text[7..]), ["\"é\""]);
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(
            body_message(r#"{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}"#),
            "Invalid API Key"
        );
        assert_eq!(body_message(r#"{"error":"model not found"}"#), "model not found");
        assert_eq!(body_message(r#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(body_message("Bad Gateway\n"), "Bad Gateway");
        assert_eq!(error_text(&json!({"code": 3})), "{\"code\":3}");
        assert_eq!(shorten(&"x".repeat(300)).chars().count(), 201);
    }
}
