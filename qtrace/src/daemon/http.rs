//! The HTTP endpoints: /metrics, /healthz, /api/listeners, over the daemon's [`State`].

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use axum::{
    extract,
    http::{header, HeaderMap, Request, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};

use crate::{
    daemon::{metrics, state::State, web_config::Web},
    host::heap,
};

/// The endpoints, with /metrics at `telemetry_path` (`--web.telemetry-path`). With basic auth
/// in the web config file every endpoint but /healthz asks for it: /healthz says only "ok",
/// and a liveness probe that needs credentials is awkward (README, "Metrics").
pub fn router(state: Arc<State>, telemetry_path: &str, web: Arc<Web>) -> Router {
    let index = format!("qtrace: {telemetry_path} /healthz /api/listeners\n");
    Router::new()
        .route(telemetry_path, get(metrics_handler))
        .route("/api/listeners", get(listeners_handler))
        .route("/", get(move || async move { index }))
        .route_layer(middleware::from_fn_with_state(web, authenticate))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn authenticate(
    extract::State(web): extract::State<Arc<Web>>,
    request: Request<axum::body::Body>,
    next: Next,
) -> Response {
    if web.authorized(request.headers()).await {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"qtrace\"")],
        "Unauthorized\n",
    )
        .into_response()
}

/// Whether the client takes a gzip body (`Accept-Encoding: gzip`, not with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

fn gzip(body: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::fast(),
    );
    enc.write_all(body.as_bytes())?;
    enc.finish()
}

fn failed(e: anyhow::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("scrape failed: {e:#}\n"),
    )
        .into_response()
}

enum Body {
    Plain(String),
    Gzip(Vec<u8>),
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics_handler(
    extract::State(state): extract::State<Arc<State>>,
    headers: HeaderMap,
) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let openmetrics = accept.contains("application/openmetrics-text");
    let compress = accepts_gzip(&headers);
    let t = Instant::now();
    let scrape = match state.collect().await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let collected = t.elapsed();
    // Rendering thousands of listeners takes milliseconds: off the event loop, like collecting.
    let s = state.clone();
    let rendered = tokio::task::spawn_blocking(move || -> anyhow::Result<Body> {
        let sc = &s.collector;
        let max_series = s.max_series.load(Ordering::Relaxed);
        let servers = metrics::Servers::now();
        let body = metrics::render(
            &scrape,
            &sc.probes,
            sc.vis,
            max_series,
            openmetrics,
            &servers,
        );
        tracing::debug!(
            listeners = scrape.listeners.len(),
            ?collected,
            rendered = ?(t.elapsed() - collected),
            "scrape"
        );
        Ok(match compress {
            true => Body::Gzip(gzip(&body)?),
            false => Body::Plain(body),
        })
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    let body = match rendered {
        Ok(b) => b,
        Err(e) => return failed(e),
    };
    let kind = if openmetrics { OPENMETRICS } else { CLASSIC };
    let response = match body {
        Body::Plain(text) => ([(header::CONTENT_TYPE, kind)], text).into_response(),
        Body::Gzip(bytes) => (
            [
                (header::CONTENT_TYPE, kind),
                (header::CONTENT_ENCODING, "gzip"),
                (header::VARY, "Accept-Encoding"),
            ],
            bytes,
        )
            .into_response(),
    };
    // A scrape of many listeners allocated megabytes that are free again now.
    heap::trim();
    response
}

async fn listeners_handler(extract::State(state): extract::State<Arc<State>>) -> Response {
    match state.snapshot().await {
        Ok(v) => {
            let response = Json(v).into_response();
            heap::trim();
            response
        }
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_used_only_when_accepted() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            accepts_gzip(&h)
        };
        assert!(!accepts_gzip(&HeaderMap::new()));
        assert!(with("gzip"));
        assert!(with("deflate, GZIP;q=0.5"));
        assert!(with("*"));
        assert!(!with("gzip;q=0"));
        assert!(!with("identity, br"));
    }
}
