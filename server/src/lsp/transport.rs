//! Stdio framing in front of tower-lsp.
//!
//! tower-lsp 0.20 stops reading after one undecodable message (its
//! `FramedRead` ends on the first error), which would let a single malformed
//! message kill the server. This layer reads the `Content-Length` frames
//! itself and passes on only messages tower-lsp can decode: JSON that does
//! not parse gets a JSON-RPC parse error, and JSON that is not a JSON-RPC 2.0
//! message tower-lsp accepts (no `"jsonrpc": "2.0"`, a `method` that is not a
//! string, an `id` that is not a string, a 64-bit integer or `null`) gets an
//! "invalid request" error, keeping the server alive either way.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Largest message accepted (a 20 MB document in a didOpen fits).
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// Frame a JSON-RPC body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

fn parse_error(message: &str) -> Vec<u8> {
    error_reply(serde_json::Value::Null, -32700, &format!("parse error: {message}"))
}

fn error_reply(id: serde_json::Value, code: i64, message: &str) -> Vec<u8> {
    let body = serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    frame(body.to_string().as_bytes())
}

/// An id tower-lsp can decode: a string, an integer that fits `i64`, or `null`.
fn is_valid_id(id: &serde_json::Value) -> bool {
    id.is_string() || id.is_null() || id.as_i64().is_some()
}

/// Why tower-lsp could not decode this JSON object as a JSON-RPC 2.0
/// request, notification or response (it would stop reading its input),
/// or `None` when it can.
fn invalid_message(msg: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    if msg.get("jsonrpc").and_then(|v| v.as_str()) != Some("2.0") {
        return Some(r#"not a JSON-RPC 2.0 message ("jsonrpc": "2.0" missing)"#.into());
    }
    if let Some(id) = msg.get("id").filter(|id| !is_valid_id(id)) {
        return Some(format!("id must be a string, an integer or null, not {id}"));
    }
    match msg.get("method") {
        Some(m) if !m.is_string() => Some(format!("method must be a string, not {m}")),
        _ => None,
    }
}

/// Read one frame's body; `Ok(None)` at end of input, `Err(reason)` for a
/// broken header (the stream is then resynchronised at the next header).
async fn read_frame<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<Option<Result<Vec<u8>, String>>> {
    let mut len: Option<usize> = None;
    let mut saw_any = false;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let l = line.trim();
        if l.is_empty() {
            if saw_any {
                break;
            }
            continue;
        }
        saw_any = true;
        if let Some((name, value)) = l.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                len = value.trim().parse().ok();
            }
        } else {
            return Ok(Some(Err(format!("malformed header line {l:?}"))));
        }
    }
    let Some(len) = len.filter(|&n| n <= MAX_MESSAGE) else {
        return Ok(Some(Err("missing, invalid or oversized Content-Length".into())));
    };
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok(Some(Ok(body)))
}

/// Why the input ended, and whether the client had asked to shut down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputEnd {
    /// The client sent `exit` (else: end of input, or a broken stream).
    pub exit: bool,
    /// A `shutdown` request came before.
    pub shutdown_requested: bool,
}

impl InputEnd {
    /// The process's exit status: 0 after a `shutdown` request, 1 without
    /// (the LSP specification's rule for `exit`, applied to a vanished client too).
    pub fn status(self) -> i32 {
        if self.shutdown_requested {
            0
        } else {
            1
        }
    }
}

/// Copy frames from `input` to `to_server`, answering bad ones on `replies`,
/// until the client sends `exit` or the input ends.
pub async fn filter_input<R, W>(input: R, mut to_server: W, replies: mpsc::UnboundedSender<Vec<u8>>) -> InputEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = BufReader::new(input);
    let mut end = InputEnd { exit: false, shutdown_requested: false };
    while let Ok(Some(frame_result)) = read_frame(&mut r).await {
        match frame_result {
            Ok(body) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Object(msg)) => match invalid_message(&msg) {
                    None => {
                        let method = msg.get("method").and_then(|m| m.as_str());
                        if method == Some("exit") {
                            end.exit = true;
                            return end;
                        }
                        if method == Some("shutdown") && msg.contains_key("id") {
                            end.shutdown_requested = true;
                        }
                        if to_server.write_all(&frame(&body)).await.is_err() {
                            return end;
                        }
                        let _ = to_server.flush().await;
                    }
                    Some(reason) => {
                        // The spec: an id that cannot be read is answered with `null`.
                        let id = msg.get("id").filter(|id| is_valid_id(id)).cloned().unwrap_or_default();
                        let _ = replies.send(error_reply(id, -32600, &format!("invalid request: {reason}")));
                    }
                },
                Ok(_) => {
                    let _ = replies.send(parse_error("a JSON-RPC message must be an object"));
                }
                Err(e) => {
                    let _ = replies.send(parse_error(&e.to_string()));
                }
            },
            Err(reason) => {
                let _ = replies.send(parse_error(&reason));
            }
        }
    }
    end
}

/// Copy whole frames from the server, and the replies sent on `replies`,
/// to `output`, never interleaving two messages. Ends when the server's
/// output and every reply sender are closed.
pub async fn merge_output<R, W>(
    from_server: R,
    replies_tx: mpsc::UnboundedSender<Vec<u8>>,
    mut replies: mpsc::UnboundedReceiver<Vec<u8>>,
    mut output: W,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    tokio::spawn(async move {
        let mut r = BufReader::new(from_server);
        while let Ok(Some(Ok(body))) = read_frame(&mut r).await {
            if replies_tx.send(frame(&body)).is_err() {
                return;
            }
        }
    });
    while let Some(msg) = replies.recv().await {
        if output.write_all(&msg).await.is_err() {
            return;
        }
        let _ = output.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_frames_get_parse_errors_and_good_ones_pass() {
        let mut input = Vec::new();
        input.extend(frame(br#"{"jsonrpc":"2.0","method":"a"}"#));
        input.extend(frame(b"{not json"));
        input.extend(frame(b"[1,2]"));
        input.extend(frame(br#"{"jsonrpc":"2.0","method":"b"}"#));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut passed = Vec::new();
        filter_input(&input[..], &mut passed, tx).await;
        let passed = String::from_utf8(passed).unwrap();
        assert!(passed.contains(r#""method":"a""#) && passed.contains(r#""method":"b""#));
        assert!(!passed.contains("not json"));
        let mut errors = 0;
        while let Ok(e) = rx.try_recv() {
            assert!(String::from_utf8(e).unwrap().contains("-32700"));
            errors += 1;
        }
        assert_eq!(errors, 2);
    }

    #[tokio::test]
    async fn messages_tower_lsp_cannot_decode_get_invalid_request_errors() {
        // Each of these, passed on, made tower-lsp stop reading (found by fuzzing).
        let bad = [
            (r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#, "null"),
            (r#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#, "null"),
            (r#"{"jsonrpc":"2.0","id":9223372036854775808,"method":"x"}"#, "null"),
            (r#"{"jsonrpc":"2.0","id":true,"method":"x"}"#, "null"),
            (r#"{"jsonrpc":"2.0","id":[],"method":"x"}"#, "null"),
            (r#"{"jsonrpc":"2.0","id":4,"method":5}"#, "4"),
            (r#"{"jsonrpc":"2.0","method":5}"#, "null"),
            (r#"{"jsonrpc":"1.0","id":"a","method":"x"}"#, r#""a""#),
            (r#"{"id":3,"method":"x"}"#, "3"),
            (r#"{"jsonrpc":"2.0","id":{},"result":1}"#, "null"),
            ("{}", "null"),
        ];
        let good = [
            r#"{"jsonrpc":"2.0","id":-1,"method":"x"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#,
            r#"{"jsonrpc":"2.0","id":"s","method":"x","params":5}"#,
            r#"{"jsonrpc":"2.0","id":7,"result":1}"#,
            r#"{"jsonrpc":"2.0","method":"textDocument/didOpen","params":7}"#,
        ];
        let mut input = Vec::new();
        for (m, _) in bad {
            input.extend(frame(m.as_bytes()));
        }
        for m in good {
            input.extend(frame(m.as_bytes()));
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut passed = Vec::new();
        filter_input(&input[..], &mut passed, tx).await;
        let passed = String::from_utf8(passed).unwrap();
        for m in good {
            assert!(passed.contains(m), "{m} was not passed on");
        }
        assert_eq!(passed.matches("Content-Length").count(), good.len(), "{passed}");
        for (m, id) in bad {
            let reply = String::from_utf8(rx.try_recv().expect("a reply")).unwrap();
            let body: serde_json::Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body["error"]["code"], -32600, "{m}: {body}");
            assert_eq!(body["id"].to_string(), id, "{m}: {body}");
            assert!(body["error"]["message"].as_str().unwrap().starts_with("invalid request: "), "{body}");
        }
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn input_ends_at_exit_and_remembers_a_shutdown_request() {
        let run = |messages: &[&str]| {
            let input: Vec<u8> = messages.iter().flat_map(|m| frame(m.as_bytes())).collect();
            async move {
                let (tx, _rx) = mpsc::unbounded_channel();
                let mut passed = Vec::new();
                let end = filter_input(&input[..], &mut passed, tx).await;
                (end, String::from_utf8(passed).unwrap())
            }
        };
        let shutdown = r#"{"jsonrpc":"2.0","id":1,"method":"shutdown","params":null}"#;
        let exit = r#"{"jsonrpc":"2.0","method":"exit"}"#;
        let after = r#"{"jsonrpc":"2.0","id":2,"method":"anchorcoder/status"}"#;

        let (end, passed) = run(&[shutdown, exit, after]).await;
        assert_eq!(end, InputEnd { exit: true, shutdown_requested: true });
        assert_eq!(end.status(), 0);
        assert!(passed.contains(shutdown) && !passed.contains(after), "nothing after exit is read: {passed}");

        let (end, _) = run(&[exit]).await;
        assert_eq!((end.exit, end.status()), (true, 1), "exit without shutdown");
        // The end of input, with or without a shutdown before it.
        assert_eq!(run(&[after]).await.0, InputEnd { exit: false, shutdown_requested: false });
        assert_eq!(run(&[shutdown]).await.0.status(), 0);
        // A `shutdown` notification (no id) is not a request.
        let note = r#"{"jsonrpc":"2.0","method":"shutdown"}"#;
        assert_eq!(run(&[note, exit]).await.0.status(), 1);
    }
}
