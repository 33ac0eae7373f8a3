//! Stdio framing in front of tower-lsp.
//!
//! tower-lsp 0.20 stops reading after one undecodable message (its
//! `FramedRead` ends on the first error), which would let a single malformed
//! message kill the server. This layer reads the `Content-Length` frames
//! itself, passes well-formed JSON on, and answers anything else with a
//! JSON-RPC parse error (id `null`), keeping the server alive.

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
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": null,
        "error": {"code": -32700, "message": format!("parse error: {message}")},
    });
    frame(body.to_string().as_bytes())
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

/// Copy frames from `input` to `to_server`, answering bad ones on `replies`.
pub async fn filter_input<R, W>(input: R, mut to_server: W, replies: mpsc::UnboundedSender<Vec<u8>>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = BufReader::new(input);
    while let Ok(Some(frame_result)) = read_frame(&mut r).await {
        match frame_result {
            Ok(body) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) if v.is_object() => {
                    if to_server.write_all(&frame(&body)).await.is_err() {
                        return;
                    }
                    let _ = to_server.flush().await;
                }
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
}
