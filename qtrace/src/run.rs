//! `qtrace run`: the service. It attaches the probes, serves /metrics, /healthz and
//! /api/listeners, and with `--print` also writes events and a periodic listener table to
//! stdout (one code path for both: the ring buffer is always drained here).

use std::{
    io::{self, Write},
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use qtrace_common::maps;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    config::{DaemonArgs, FileConfig, TracerArgs},
    events::{self, Clock},
    scrape::Scraper,
    server::{self, AppState},
    snapshot::{self, Visibility},
    stats::KernelCounters,
    tracer::Tracer,
};

#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    #[command(flatten)]
    pub tracer: TracerArgs,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// TOML config file; flags and QTRACE_* variables override it [default:
    /// /etc/qtrace/qtrace.toml if present]. SIGHUP re-reads it.
    #[arg(long, env = "QTRACE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also print events as they happen and a listener table every --interval on stdout.
    #[arg(long)]
    pub print: bool,
    /// With --print: JSON Lines instead of text.
    #[arg(long, requires = "print")]
    pub json: bool,
    /// With --print: how often to print the listener table.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

pub async fn run(opts: RunOptions) -> Result<()> {
    // Handlers first: a signal during start-up must stop qtrace cleanly, not kill it.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let (file, config_path) = FileConfig::load(opts.config.as_deref())?;
    let tracer_opts = opts.tracer.resolve(&file.tracer)?;
    let daemon = opts.daemon.resolve(&file.daemon)?;
    // Bound before loading anything, so a taken port fails fast and attaches nothing.
    let listener = tokio::net::TcpListener::bind(daemon.listen)
        .await
        .with_context(|| format!("listen on {} (--web.listen-address)", daemon.listen))?;
    let listen = listener.local_addr()?;

    let mut tracer = Tracer::start(&tracer_opts)?;
    for p in &tracer.probes {
        match p.tier {
            Some(tier) => tracing::info!("probe {}: {tier} ({})", p.probe, p.hooks.join(", ")),
            None => tracing::warn!(
                "probe {}: unavailable ({})",
                p.probe,
                p.fallbacks.join("; ")
            ),
        }
    }
    let vis = Visibility::of(&tracer.probes);
    let state = Arc::new(AppState {
        scraper: Scraper::new(
            tracer.counters.clone(),
            tracer.probes.clone(),
            daemon.filter.clone(),
        ),
        max_series: daemon.max_listener_series.into(),
    });
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = {
        let app = server::router(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                })
                .await
        })
    };
    tracing::info!("serving /metrics on {listen}");

    let mut out = opts.print.then(|| io::stdout().lock());
    if let (Some(out), true) = (out.as_mut(), opts.json) {
        let ready =
            serde_json::json!({ "type": "ready", "listen": listen, "probes": tracer.probes });
        writeln!(out, "{ready}")?;
        out.flush()?;
    }
    let ring = tracer
        .ebpf
        .take_map(maps::EVENTS)
        .context("event ring buffer missing from the eBPF object")?;
    let ring = RingBuf::try_from(ring)?;
    // SAFETY: the RingBuf owns its map fd, which stays open until the AsyncFd drops it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("register the ring buffer with the event loop")?;
    let printer = Printer {
        json: opts.json,
        clock: Clock::new(),
        vis,
    };
    let mut tick = tokio::time::interval(opts.interval);
    tick.tick().await;

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                printer.events(guard.get_inner_mut(), out.as_mut())?;
                guard.clear_ready();
            }
            _ = tick.tick(), if out.is_some() => {
                printer.table(&tracer.counters, false, out.as_mut())?;
            }
            _ = sighup.recv() => reload(&opts, config_path.as_deref(), &state),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    // Scrapes in flight get a moment; exiting promptly matters more.
    let _ = tokio::time::timeout(Duration::from_millis(500), server).await;
    printer.events(ring.get_mut(), out.as_mut())?;
    printer.table(&tracer.counters, true, out.as_mut())?;
    tracing::info!("detaching");
    drop(ring);
    drop(state);
    drop(tracer);
    Ok(())
}

/// SIGHUP: re-read the config file and apply what can change without reloading the
/// programs (filters, label cap); other changes need a restart, and the log says so.
fn reload(opts: &RunOptions, path: Option<&std::path::Path>, state: &AppState) {
    let result = FileConfig::load(opts.config.as_deref().or(path)).and_then(|(file, _)| {
        let daemon = opts.daemon.resolve(&file.daemon)?;
        opts.tracer.resolve(&file.tracer)?;
        Ok(daemon)
    });
    match result {
        Ok(daemon) => {
            state.scraper.set_filter(daemon.filter);
            state
                .max_series
                .store(daemon.max_listener_series, Ordering::Relaxed);
            tracing::info!(
                "reloaded the config file (filters, max_listener_series); the listen address \
                 and tracer settings take effect at restart"
            );
        }
        Err(e) => tracing::error!("config reload failed, keeping the running settings: {e:#}"),
    }
}

struct Printer {
    json: bool,
    clock: Clock,
    vis: Visibility,
}

impl Printer {
    /// Drains the ring buffer, printing when asked to; draining keeps it from filling.
    fn events(
        &self,
        ring: &mut RingBuf<MapData>,
        mut out: Option<&mut io::StdoutLock>,
    ) -> Result<()> {
        while let Some(item) = ring.next() {
            let (Some(out), Some(ev)) = (out.as_deref_mut(), events::decode(&item)) else {
                continue;
            };
            if self.json {
                serde_json::to_writer(&mut *out, &events::to_json(&ev, &self.clock))?;
                writeln!(out)?;
            } else {
                writeln!(out, "{}", events::to_human(&ev, &self.clock))?;
            }
        }
        if let Some(out) = out {
            out.flush()?;
        }
        Ok(())
    }

    fn table(
        &self,
        counters: &KernelCounters,
        last: bool,
        out: Option<&mut io::StdoutLock>,
    ) -> Result<()> {
        let Some(out) = out else { return Ok(()) };
        let listeners = counters.listeners()?;
        if self.json {
            let v = snapshot::to_json(&listeners, &counters.self_stats()?, self.vis, last);
            writeln!(out, "{v}")?;
        } else {
            write!(out, "{}", snapshot::to_table(&listeners, self.vis))?;
        }
        out.flush()?;
        Ok(())
    }
}
