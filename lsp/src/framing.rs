//! A guard in front of the LSP transport. tower-lsp-server reads stdin through a codec whose stream
//! ends at the first undecodable message (tokio-util's `FramedRead` stops after an error), which
//! would take the server down on one malformed message. This layer re-frames stdin: well-formed
//! JSON-RPC messages pass through unchanged; anything else (bad headers, a body that is not JSON or
//! not a JSON-RPC message, invalid UTF-8, an oversized `Content-Length`) becomes a
//! `phi-lsp/malformedMessage` notification that the server logs, and reading goes on.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Larger bodies are skipped: no client sends a 64 MiB message, and the body is buffered.
pub const MAX_BODY_BYTES: usize = 64 << 20;
const MAX_HEADER_LINE: usize = 8 << 10;

pub const MALFORMED_METHOD: &str = "phi-lsp/malformedMessage";

/// What one frame turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Vec<u8>),
    /// Why the frame was refused.
    Malformed(String),
    End,
}

/// Reads one frame. Header lines are read up to the blank line; a header block without a valid
/// `Content-Length` is reported and skipped.
pub async fn read_frame<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Frame> {
    let mut content_length: Option<Result<usize, String>> = None;
    let mut saw_header = false;
    loop {
        let mut line = Vec::new();
        let n = (&mut *reader)
            .take(MAX_HEADER_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(if saw_header {
                Frame::Malformed("input ended inside headers".into())
            } else {
                Frame::End
            });
        }
        if !line.ends_with(b"\n") && n >= MAX_HEADER_LINE {
            // Skip the rest of an overlong line.
            let mut sink = Vec::new();
            reader.read_until(b'\n', &mut sink).await?;
            content_length = Some(Err("header line too long".into()));
            saw_header = true;
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            if !saw_header {
                continue; // stray blank line between messages
            }
            break;
        }
        saw_header = true;
        if let Some((name, value)) = text.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = Some(
                    value
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| format!("invalid Content-Length {:?}", value.trim())),
                );
            }
        }
    }
    let length = match content_length {
        None => return Ok(Frame::Malformed("a message without Content-Length".into())),
        Some(Err(e)) => return Ok(Frame::Malformed(e)),
        Some(Ok(length)) => length,
    };
    if length > MAX_BODY_BYTES {
        let skipped =
            tokio::io::copy(&mut (&mut *reader).take(length as u64), &mut tokio::io::sink()).await?;
        return Ok(Frame::Malformed(format!(
            "a body of {length} bytes exceeds the limit of {MAX_BODY_BYTES} (skipped {skipped})"
        )));
    }
    let mut body = vec![0u8; length];
    let mut filled = 0;
    while filled < length {
        let n = reader.read(&mut body[filled..]).await?;
        if n == 0 {
            return Ok(Frame::Malformed(format!(
                "input ended after {filled} of {length} body bytes"
            )));
        }
        filled += n;
    }
    Ok(match check_body(&body) {
        Ok(()) => Frame::Message(body),
        Err(e) => Frame::Malformed(e),
    })
}

/// A body passes when it is a JSON-RPC 2.0 request, notification or response.
fn check_body(body: &[u8]) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let object = value.as_object().ok_or("body is not a JSON object")?;
    if object.get("jsonrpc").and_then(|v| v.as_str()) != Some("2.0") {
        return Err("body lacks \"jsonrpc\": \"2.0\"".into());
    }
    if let Some(method) = object.get("method") {
        if !method.is_string() {
            return Err("\"method\" is not a string".into());
        }
        if let Some(id) = object.get("id") {
            if !(id.is_string() || id.is_i64() || id.is_u64() || id.is_null()) {
                return Err("\"id\" is not a number or string".into());
            }
        }
        if let Some(params) = object.get("params") {
            if !(params.is_object() || params.is_array() || params.is_null()) {
                return Err("\"params\" is not an object or array".into());
            }
        }
        return Ok(());
    }
    if object.contains_key("id") && (object.contains_key("result") || object.contains_key("error")) {
        return Ok(());
    }
    Err("neither a request, a notification nor a response".into())
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// Copies frames from `input` to `output` until `input` ends, replacing malformed ones.
pub async fn guard<R, W>(mut input: R, mut output: W) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        match read_frame(&mut input).await? {
            Frame::End => break,
            Frame::Message(body) => output.write_all(&frame(&body)).await?,
            Frame::Malformed(reason) => {
                tracing::warn!("malformed message from the client: {reason}");
                let note = serde_json::json!({"jsonrpc": "2.0", "method": MALFORMED_METHOD, "params": {"reason": reason}});
                output.write_all(&frame(note.to_string().as_bytes())).await?;
            }
        }
        output.flush().await?;
    }
    output.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8]) -> Vec<Frame> {
        let mut reader = tokio::io::BufReader::new(input);
        let mut out = Vec::new();
        loop {
            let frame = read_frame(&mut reader).await.expect("reads");
            if frame == Frame::End {
                return out;
            }
            out.push(frame);
        }
    }

    fn message(body: &str) -> Vec<u8> {
        frame(body.as_bytes())
    }

    #[tokio::test]
    async fn passes_messages_and_reports_the_rest() {
        let ok = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
        let mut input = message(ok);
        input.extend(message("{not json!!}"));
        input.extend(message("[1,2]"));
        input.extend(message(r#"{"jsonrpc":"2.0","id":[1],"method":"x"}"#));
        input.extend(b"Content-Length: banana\r\n\r\n");
        input.extend(message(r#"{"jsonrpc":"2.0","method":"initialized","params":{}}"#));
        input.extend(b"Content-Length: 2\r\n\r\n\xff\xfe");
        input.extend(message(r#"{"jsonrpc":"2.0","id":2,"result":null}"#));
        let frames = frames(&input).await;
        let kinds: Vec<bool> = frames.iter().map(|f| matches!(f, Frame::Message(_))).collect();
        assert_eq!(
            kinds,
            [true, false, false, false, false, true, false, true],
            "{frames:?}"
        );
        assert_eq!(frames[0], Frame::Message(ok.as_bytes().to_vec()));
    }

    #[tokio::test]
    async fn truncated_and_oversized_bodies() {
        let expect_one = |got: Vec<Frame>, needle: &str| {
            assert!(
                matches!(&got[..], [Frame::Malformed(m)] if m.contains(needle)),
                "{got:?}"
            );
        };
        expect_one(
            frames(b"Content-Length: 100\r\n\r\n{\"jsonrpc\"").await,
            "ended after",
        );
        let huge = format!("Content-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
        expect_one(frames(huge.as_bytes()).await, "exceeds");
        expect_one(frames(b"Content-Type: x\r\n\r\n").await, "without Content-Length");
    }

    #[tokio::test]
    async fn guard_rewrites_malformed_frames_as_notifications() {
        let mut input = message("{oops");
        input.extend(message(r#"{"jsonrpc":"2.0","method":"initialized"}"#));
        let mut output = Vec::new();
        guard(tokio::io::BufReader::new(&input[..]), &mut output)
            .await
            .expect("copies");
        let text = String::from_utf8(output).expect("utf-8");
        assert!(
            text.contains(MALFORMED_METHOD) && text.contains("body is not JSON"),
            "{text}"
        );
        assert!(text.ends_with(r#"{"jsonrpc":"2.0","method":"initialized"}"#));
    }
}
