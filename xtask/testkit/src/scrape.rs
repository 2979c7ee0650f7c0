//! Talking to qtrace's HTTP endpoints and reading its Prometheus exposition, as the tests and
//! the benchmarks both do (no client library: a plain HTTP/1.0 GET).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};

/// A daemon that stops answering fails the caller instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The whole response (head and body) to `GET path`, with an `Accept` header if given.
pub fn http_request(addr: &str, path: &str, accept: Option<&str>) -> Result<String> {
    let to: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut s =
        TcpStream::connect_timeout(&to, TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// `GET path`: the status and the body.
pub fn http_get(addr: &str, path: &str, accept: Option<&str>) -> Result<(u16, String)> {
    let text = http_request(addr, path, accept)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_string()))
}

/// The samples `name{labels…}` of a Prometheus text exposition, where every `k="v"` of
/// `labels` matches (other labels may be present).
pub fn samples<'a>(
    exposition: &'a str,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = f64> + 'a {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let have = rest.trim_end_matches('}');
            labels
                .iter()
                .all(|(k, v)| have.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
                .then(|| value.parse().ok())?
        })
}

/// The first such sample.
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(exposition, name, labels).next()
}

/// The sum of every such sample.
pub fn sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(exposition, name, labels).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE qtrace_listen_drops_total counter\n\
        qtrace_listen_drops_total{netns=\"1\",addr=\"::\",port=\"80\",reason=\"other\"} 2\n\
        qtrace_listen_drops_total{netns=\"1\",addr=\"::\",port=\"80\",reason=\"syn_queue_full\"} 3\n\
        qtrace_listen_drops_total{netns=\"1\",addr=\"::\",port=\"81\",reason=\"other\"} 5\n\
        qtrace_kernel_read_errors_total 7\n";

    #[test]
    fn samples_match_name_and_every_label() {
        assert_eq!(
            sum(TEXT, "qtrace_listen_drops_total", &[("port", "80")]),
            5.0
        );
        assert_eq!(
            sample(TEXT, "qtrace_listen_drops_total", &[("port", "81")]),
            Some(5.0)
        );
        assert_eq!(
            sample(TEXT, "qtrace_kernel_read_errors_total", &[]),
            Some(7.0)
        );
        assert_eq!(sample(TEXT, "qtrace_listen_drops", &[]), None);
    }
}
