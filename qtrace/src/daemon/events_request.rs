//! The events socket's request: one JSON line, read with a bound on its size and on the time
//! it may take, so a client can neither fill qtrace's memory nor hold a connection by sending
//! nothing. Pure parsing is [`parse_request`] (also the fuzz target's entry).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt};

pub use crate::api::Request;

/// Longest request line accepted (a real one is under 100 bytes).
pub const MAX_REQUEST: usize = 4096;
/// Time a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request line (with or without its newline); errors quote at most a little of it.
pub fn parse_request(line: &[u8]) -> Result<Request> {
    if line.len() > MAX_REQUEST {
        bail!("request longer than {MAX_REQUEST} bytes");
    }
    let text = std::str::from_utf8(line).context("request is not UTF-8")?;
    serde_json::from_str(text.trim_end()).map_err(|e| {
        // serde's message quotes an unknown variant whole: clipped too (after escaping, which
        // can make one character ten).
        let shown = crate::inputs::clip_to(&format!("{text:?}"), 80);
        let why = crate::inputs::clip_to(&e.to_string(), 200);
        anyhow::anyhow!("bad request line {shown}: {why}")
    })
}

/// Reads and parses the request line: at most [`MAX_REQUEST`] bytes within [`REQUEST_TIMEOUT`].
pub async fn read_request(reader: &mut (impl AsyncBufRead + Unpin)) -> Result<Request> {
    let mut line = Vec::new();
    let read = async {
        let mut limited = (&mut *reader).take(MAX_REQUEST as u64 + 1);
        limited.read_until(b'\n', &mut line).await
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => bail!("no request line within {REQUEST_TIMEOUT:?}"),
        Ok(r) => {
            r.context("read the request line")?;
        }
    }
    if line.len() > MAX_REQUEST {
        bail!("request longer than {MAX_REQUEST} bytes");
    }
    if !line.ends_with(b"\n") {
        bail!("connection closed before a whole request line");
    }
    parse_request(&line)
}

/// Resolves when the client has closed its end (or failed): what it sends after its request is
/// read and thrown away, a little at a time. Lets a reader that went away be released at once,
/// without waiting for an event to write.
pub async fn closed(reader: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 512];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncWriteExt, BufReader};

    use super::*;

    #[test]
    fn requests_parse_and_errors_stay_short() {
        assert_eq!(
            parse_request(b"{\"request\":\"events\",\"since_ns\":5}\n").unwrap(),
            Request::Events {
                since_ns: 5,
                filter: Default::default()
            }
        );
        // A filter: the kinds by their names; one the daemon does not know is refused.
        let Request::Events { filter, .. } = parse_request(
            br#"{"request":"events","filter":{"netns":7,"port":[80,443],"kind":["drop_other"]}}"#,
        )
        .unwrap() else {
            panic!("an events request")
        };
        assert_eq!(
            (filter.netns, filter.port, filter.kind),
            (
                Some(7),
                vec![80, 443],
                vec![qtrace_common::EventKind::DropOther]
            )
        );
        let e = parse_request(br#"{"request":"events","filter":{"kind":["drop_it"]}}"#);
        assert!(format!("{:#}", e.unwrap_err()).contains("unknown event kind"));
        assert_eq!(
            parse_request(b"{\"request\":\"listeners\"}").unwrap(),
            Request::Listeners
        );
        let junk = format!("{{\"request\":\"{}\"}}", "x".repeat(4000));
        let e = format!("{:#}", parse_request(junk.as_bytes()).unwrap_err());
        assert!(e.len() < 400, "{e}");
        assert!(parse_request(&[b'{'; MAX_REQUEST + 1]).is_err());
        assert!(parse_request(&[0xff, 0xfe]).is_err());
    }

    /// (A silent client is cut after REQUEST_TIMEOUT: tests/hardening.rs, against the daemon.)
    #[tokio::test]
    async fn an_oversized_request_is_cut() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut reader = BufReader::new(server);
        client.write_all(&[b'a'; 2 * MAX_REQUEST]).await.unwrap();
        let e = read_request(&mut reader).await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}
