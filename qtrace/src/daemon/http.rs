//! The HTTP endpoints: /metrics, /healthz, /api/listeners, over the daemon's [`State`].

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use axum::{
    extract,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};

use crate::{
    daemon::{http_limits, metrics, state::State},
    host::heap,
};

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/listeners", get(listeners_handler))
        .route(
            "/",
            get(|| async { "qtrace: /metrics /healthz /api/listeners\n" }),
        )
        .with_state(state)
}

fn failed(e: anyhow::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("scrape failed: {e:#}\n"),
    )
        .into_response()
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
    let t = Instant::now();
    let scrape = match state.collect().await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let collected = t.elapsed();
    // Rendering thousands of listeners takes milliseconds: off the event loop, like collecting.
    let s = state.clone();
    let rendered = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let sc = &s.collector;
        let max_series = s.max_series.load(Ordering::Relaxed);
        let http = http_limits::stats();
        let body = metrics::render(&scrape, &sc.probes, sc.vis, max_series, openmetrics, &http);
        tracing::debug!(
            listeners = scrape.listeners.len(),
            ?collected,
            rendered = ?(t.elapsed() - collected),
            "scrape"
        );
        Ok(body)
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    let body = match rendered {
        Ok(b) => b,
        Err(e) => return failed(e),
    };
    let kind = if openmetrics { OPENMETRICS } else { CLASSIC };
    let response = ([(header::CONTENT_TYPE, kind)], body).into_response();
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
