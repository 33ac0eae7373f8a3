//! HTTP plumbing shared by the engine kinds: server-sent events, error texts
//! from JSON bodies, and failures sorted into "the engine is down" or not.
//!
//! Everything read from an engine is bounded (docs/security.md lists the
//! bounds): one server-sent-events line at most [`MAX_LINE`] bytes, a whole
//! JSON answer at most [`MAX_BODY`], an error body at most [`MAX_ERROR_BODY`]
//! (the rest is not read: the connection is dropped).

use serde_json::Value;

/// The longest server-sent-events line (one event: a JSON chunk of a few
/// tokens; llama.cpp's last chunk also echoes the prompt, which
/// `completion.prefixTokens` + `suffixTokens` keep far below this). A longer
/// line fails the request instead of growing the buffer.
pub const MAX_LINE: usize = 8 << 20;

/// The largest non-streamed answer read (a completion or `/v1/models`):
/// the same reasoning as [`MAX_LINE`].
pub const MAX_BODY: usize = 8 << 20;

/// The most of an HTTP error body read: messages show 200 characters of it,
/// and an engine's JSON error object is far smaller than this.
pub const MAX_ERROR_BODY: usize = 64 << 10;

/// The most generated text kept from one stream: `completion.maxTokens` is
/// at most 1,024 tokens, and no token spells 1 KiB. An engine that sends more
/// is cut off there (the suggestion rules then cut far shorter).
pub const MAX_TEXT: usize = 1 << 20;

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
    /// The engine is unreachable or broken. The message is redacted here, at
    /// the source (an engine may echo the request's headers).
    pub fn down(message: String) -> Self {
        RemoteError { message: crate::redact::redact(&message), down: true, status: None }
    }

    /// The engine answered but refused or was misunderstood.
    pub fn refused(message: String) -> Self {
        RemoteError { message: crate::redact::redact(&message), down: false, status: None }
    }
}

/// Splits a `text/event-stream` body, arriving in arbitrary pieces, into the
/// payloads of its `data:` lines (each engine sends one JSON object a line).
/// llama.cpp reports failures mid-stream as `error:` lines: returned as
/// `{"error": ...}` payloads.
///
/// A line is at most [`MAX_LINE`] bytes: a longer one is an error, and the
/// buffer never holds more than that. Each byte is scanned once.
#[derive(Default)]
pub struct EventStream {
    /// The unfinished line (never holds a line end).
    pending: Vec<u8>,
}

/// A server-sent-events line longer than [`MAX_LINE`].
#[derive(Debug, PartialEq, Eq)]
pub struct LineTooLong;

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an event line longer than {} MiB", MAX_LINE >> 20)
    }
}

impl EventStream {
    /// Feed bytes; returns the complete payloads they finish, or
    /// [`LineTooLong`] once a line outgrows [`MAX_LINE`].
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<Vec<String>, LineTooLong> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (piece, rest) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => bytes.split_at(i + 1),
                None => (bytes, &[][..]),
            };
            bytes = rest;
            if self.pending.len() + piece.len() > MAX_LINE + 2 {
                self.pending = Vec::new();
                return Err(LineTooLong);
            }
            self.pending.extend_from_slice(piece);
            if piece.last() != Some(&b'\n') {
                continue;
            }
            let raw = std::mem::take(&mut self.pending);
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_string());
            } else if let Some(err) = line.strip_prefix("error:") {
                out.push(format!("{{\"error\": {}}}", err.trim_start()));
            }
        }
        Ok(out)
    }
}

/// Read at most `cap` bytes of a response body; the bool says whether there
/// was more (not read: dropping the response closes the connection).
pub async fn read_capped(resp: &mut reqwest::Response, cap: usize) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
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

/// At most 200 characters of `s`, for messages; redacted before it is cut
/// (a secret cut in two would no longer be recognized).
pub fn shorten(s: &str) -> String {
    let s = crate::redact::redact(s);
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
        assert!(s.push(b"data: {\"content\":\"a").unwrap().is_empty());
        assert_eq!(s.push(b"b\"}\r\n\r\ndata: [DONE]\n").unwrap(), ["{\"content\":\"ab\"}", "[DONE]"]);
        assert_eq!(s.push(b": keep-alive comment\nevent: x\n\n").unwrap(), Vec::<String>::new());
        assert_eq!(s.push(b"error: {\"message\":\"boom\"}\n").unwrap(), ["{\"error\": {\"message\":\"boom\"}}"]);
        // A multi-byte character cut between pieces survives.
        let text = "data: \"é\"\n".as_bytes();
        assert!(s.push(&text[..7]).unwrap().is_empty());
        assert_eq!(s.push(&text[7..]).unwrap(), ["\"é\""]);
    }

    #[test]
    fn an_endless_line_is_refused_without_buffering_it() {
        let mut s = EventStream::default();
        let piece = vec![b'x'; 64 << 10];
        let mut fed = 0;
        let err = loop {
            match s.push(&piece) {
                Ok(out) => assert!(out.is_empty()),
                Err(e) => break e,
            }
            fed += piece.len();
            assert!(fed <= MAX_LINE + piece.len(), "never refused");
        };
        assert_eq!(err, LineTooLong);
        assert!(s.pending.capacity() <= MAX_LINE + piece.len() + 2, "buffered {}", s.pending.capacity());
        // A line just under the bound is fine, and the stream goes on after it.
        let mut s = EventStream::default();
        let mut line = b"data: ".to_vec();
        line.resize(MAX_LINE, b'y');
        line.push(b'\n');
        assert_eq!(s.push(&line).unwrap()[0].len(), MAX_LINE - 6);
        assert_eq!(s.push(b"data: 1\n").unwrap(), ["1"]);
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
