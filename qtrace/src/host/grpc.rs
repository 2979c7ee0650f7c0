//! One unary gRPC call over a Unix socket: HTTP/2 with prior knowledge (as gRPC speaks on
//! Unix sockets), the 5-byte message framing, and the status in the trailers. Enough for the
//! lookups of [`super::runtimes`]; a full gRPC stack (tonic) would bring a code generator and
//! a dozen crates for three calls.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The largest response read: a container record with its labels and spec is a few KiB.
pub const MAX_RESPONSE: usize = 4 << 20;

/// gRPC's NOT_FOUND.
const NOT_FOUND: &str = "5";

/// Calls `method` (`/package.Service/Method`) with `message`; `Ok(None)` when the server
/// answers NOT_FOUND. `metadata` goes out as request headers (containerd's namespace).
pub async fn unary(
    socket: &Path,
    method: &str,
    metadata: &[(&str, &str)],
    message: &[u8],
) -> Result<Option<Vec<u8>>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .context("HTTP/2 handshake")?;
    // The connection ends with the call: the task ends when `sender` is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    let mut request = hyper::Request::post(format!("http://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in metadata {
        request = request.header(*k, *v);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(framed)))?)
        .await
        .context("request")?;
    let (head, body) = response.into_parts();
    if head.status != hyper::StatusCode::OK {
        bail!("HTTP status {}", head.status);
    }
    let body = Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| anyhow!("response body: {e}"))?;
    // A call that fails at once answers with headers alone ("trailers-only").
    let trailers = body.trailers().cloned().unwrap_or_default();
    let header = |name: &str| {
        trailers
            .get(name)
            .or_else(|| head.headers.get(name))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    match header("grpc-status").as_deref() {
        Some("0") => {}
        Some(NOT_FOUND) => return Ok(None),
        Some(code) => bail!(
            "gRPC status {code}: {}",
            crate::inputs::clip(&header("grpc-message").unwrap_or_default())
        ),
        None => bail!("no gRPC status (not a gRPC server?)"),
    }
    let data = body.to_bytes();
    let Some((&0, rest)) = data.split_first() else {
        bail!("response not a plain gRPC message (empty or compressed)");
    };
    if rest.len() < 4 || u32::from_be_bytes(rest[..4].try_into()?) as usize != rest.len() - 4 {
        bail!("response framing: length does not match");
    }
    Ok(Some(rest[4..].to_vec()))
}
