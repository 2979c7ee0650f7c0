//! The HTTP endpoints: /metrics, /healthz, /api/listeners.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;

use crate::{
    heap,
    history::History,
    metrics,
    scrape::{Scrape, Scraper},
    snapshot::{accept_wait_json, counters_json},
};

pub struct AppState {
    pub scraper: Scraper,
    /// Reloadable with SIGHUP.
    pub max_series: AtomicUsize,
    pub history: Mutex<History>,
    /// Concurrent scrapes share one collection.
    pub scrapes: crate::single_flight::SingleFlight<Scrape>,
}

pub fn router(state: Arc<AppState>) -> Router {
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

/// Scraping walks /proc and enters namespaces: blocking work, off the event loop, one
/// collection at a time shared by the callers waiting for it.
pub async fn collect(state: &Arc<AppState>) -> anyhow::Result<Arc<Scrape>> {
    let s = state.clone();
    state.scrapes.run(move || s.scraper.collect()).await
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

async fn metrics_handler(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let openmetrics = accept.contains("application/openmetrics-text");
    // Rendering thousands of listeners takes milliseconds: off the event loop, like collecting.
    let t = Instant::now();
    let scrape = match collect(&state).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let collected = t.elapsed();
    let s = state.clone();
    let rendered = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let sc = &s.scraper;
        let max_series = s.max_series.load(Ordering::Relaxed);
        let body = metrics::render(&scrape, &sc.probes, sc.vis, max_series, openmetrics);
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

async fn listeners_handler(State(state): State<Arc<AppState>>) -> Response {
    match listeners_json(&state).await {
        Ok(v) => {
            let response = Json(v).into_response();
            heap::trim();
            response
        }
        Err(e) => failed(e),
    }
}

/// Every listener with its counters, queues and owner: /api/listeners and the events socket.
pub async fn listeners_json(state: &Arc<AppState>) -> anyhow::Result<serde_json::Value> {
    let scrape = collect(state).await?;
    let history = crate::recover::lock(&state.history);
    Ok(snapshot_json(&state.scraper, &scrape, Some(&history)))
}

/// The snapshot's JSON form (also what `qtrace top`/`doctor` read).
pub fn snapshot_json(
    scraper: &Scraper,
    scrape: &Scrape,
    history: Option<&History>,
) -> serde_json::Value {
    let vis = scraper.vis;
    let listeners: Vec<_> = scrape
        .listeners
        .iter()
        .map(|v| {
            json!({
                "netns": v.id.netns,
                "addr": v.id.addr.to_string(),
                "port": v.id.port,
                "counters": counters_json(v.stats.as_ref(), vis),
                "accept_wait": accept_wait_json(v.stats.as_ref(), vis),
                "queues": v.queues.as_ref().map(|q| json!({
                    "accept_len": q.acceptq_len,
                    "accept_limit": q.acceptq_max,
                    "syn_len": q.synq_len,
                })),
                "owner": v.owner,
                "last_hour": history.and_then(|h| h.last_hour(&v.id, v.drops())),
            })
        })
        .collect();
    json!({
        "type": "listeners",
        "queue_sample_interval_seconds": history.map(|h| h.interval().as_secs_f64()),
        "probes": scraper.probes,
        "listeners": listeners,
        "netns_unreadable": scrape.netns_unreadable,
    })
}
