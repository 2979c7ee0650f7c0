//! `qtrace run`: the service. It attaches the probes, serves /metrics, /healthz and
//! /api/listeners, and with `--print` also writes events and a periodic listener table to
//! stdout (one code path for both: the ring buffer is always drained here).

use std::{
    io::{self, Write},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use qtrace_common::Event;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    api::{self, Ready, SelfStats},
    cli::{events::to_human, table},
    config::{ConfigArg, DaemonArgs, Settings, TracerArgs},
    daemon::{
        collect::Collector,
        drops::Announced,
        events_socket::{self, Hub},
        history::History,
        http, http_limits,
        state::{self, State},
        web_config::Web,
    },
    kernel::{
        counters::{KernelCounters, ListenerStats},
        decode::{self, Clock},
        probes::Visibility,
        ring::EventRing,
        tracer::Tracer,
    },
};

#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    #[command(flatten)]
    pub tracer: TracerArgs,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Also print events as they happen and a listener table every --interval on stdout.
    #[arg(long)]
    pub print: bool,
    /// With --print: JSON Lines instead of text.
    #[arg(long, requires = "print")]
    pub json: bool,
    /// With --print: how often to print the listener table.
    #[arg(long, default_value = "5s", value_parser = crate::inputs::positive_duration)]
    pub interval: Duration,
}

pub async fn run(opts: RunOptions) -> Result<()> {
    // Handlers first: a signal during start-up must stop qtrace cleanly, not kill it.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let Settings {
        tracer: tracer_opts,
        daemon,
        file,
    } = opts.config.settings(&opts.tracer, &opts.daemon)?;
    // SIGHUP re-reads the file read now (without --config, the default path if it exists now).
    let reread = ConfigArg { path: file };
    // TLS and basic auth: a bad file is refused here, before anything is bound or attached.
    let web = Arc::new(Web::load(daemon.web_config_file.as_deref())?);
    // Bound before loading anything, so a taken port fails fast and attaches nothing.
    let listener = tokio::net::TcpListener::bind(daemon.listen)
        .await
        .with_context(|| format!("listen on {} (--web.listen-address)", daemon.listen))?;
    let listen = listener.local_addr()?;

    let mut tracer = Tracer::start(&tracer_opts)?;
    let (events_listener, _socket_file) =
        events_socket::bind(&daemon.events_socket, daemon.events_socket_group.as_deref())
            .context("events socket (--events-socket)")?;
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
    let state = State::new(
        Collector::new(
            tracer.counters.clone(),
            tracer.programs.clone(),
            tracer.probes.clone(),
            daemon.filter.clone(),
        ),
        daemon.max_listener_series,
        History::new(daemon.queue_sample_interval, daemon.max_listener_series),
    );
    state.collector.set_names(start_names(&daemon));
    state
        .collector
        .max_destination_series
        .store(daemon.max_destination_series, Ordering::Relaxed);
    state.collector.set_keep_closed_for(daemon.keep_closed_for);
    // The first collect, before anything is served, sets the drop ledger's bases: what each
    // listener and namespace had dropped before qtrace was there (see daemon::drops).
    if let Err(e) = state.collect().await {
        tracing::warn!("first collect: {e:#}");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let hub = Hub::new(daemon.events_reader_queue, state.clone());
    tokio::spawn(events_socket::serve(
        events_listener,
        hub.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(state::keep_owners(state.clone(), stop_rx.clone()));
    tokio::spawn(sample_queues(state.clone(), hub.clone(), stop_rx.clone()));
    let server = {
        let app = http::router(state.clone(), &daemon.telemetry_path, web.clone());
        // Connection limit and timeouts: see http_limits.
        tokio::spawn(http_limits::serve(listener, app, web.clone(), stop_rx))
    };
    tracing::info!(
        "serving {} on {listen} ({})",
        daemon.telemetry_path,
        web.summary()
    );

    let mut out = opts.print.then(|| io::stdout().lock());
    if let (Some(out), true) = (out.as_mut(), opts.json) {
        let ready = Ready {
            listen,
            probes: tracer.probes.clone(),
        };
        writeln!(out, "{}", serde_json::to_string(&ready)?)?;
        out.flush()?;
    }
    let mut ring = EventRing::take(&mut tracer.ebpf)?;
    let mut publisher = Publisher {
        json: opts.json,
        clock: Clock::new(),
        vis,
        names: decode::ClientNames::default(),
    };
    let mut tick = tokio::time::interval(opts.interval);
    tick.tick().await;

    // One buffer for every wake-up's events.
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            woke = ring.wait(&mut batch) => {
                woke?;
                publisher.events(&mut batch, &hub, out.as_mut())?;
            }
            _ = tick.tick(), if out.is_some() => {
                publisher.table(&tracer.counters, false, out.as_mut())?;
            }
            _ = sighup.recv() => reload(&opts, &reread, &state, &web),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    // Scrapes in flight get a moment; exiting promptly matters more.
    let _ = tokio::time::timeout(Duration::from_millis(500), server).await;
    ring.drain_now(&mut batch);
    publisher.events(&mut batch, &hub, out.as_mut())?;
    publisher.table(&tracer.counters, true, out.as_mut())?;
    tracing::info!("detaching");
    drop(ring);
    drop(state);
    drop(tracer);
    Ok(())
}

/// SIGHUP: re-read the config file and apply what can change without reloading the
/// programs (filters, label cap); other changes need a restart, and the log says so.
fn reload(opts: &RunOptions, config: &ConfigArg, state: &State, web: &Web) {
    // The web config file named at start is read again (a new path takes effect at restart).
    match web.reload() {
        Ok(true) => tracing::info!("reloaded the web config file ({})", web.summary()),
        Ok(false) => {}
        Err(e) => tracing::error!(
            "web config reload failed, keeping the running TLS and users: {}",
            crate::inputs::one_line(&e)
        ),
    }
    match config.settings(&opts.tracer, &opts.daemon) {
        Ok(Settings { daemon, .. }) => {
            state.collector.set_filter(daemon.filter);
            state
                .max_series
                .store(daemon.max_listener_series, Ordering::Relaxed);
            state
                .collector
                .max_destination_series
                .store(daemon.max_destination_series, Ordering::Relaxed);
            state.collector.set_keep_closed_for(daemon.keep_closed_for);
            tracing::info!(
                "reloaded the config file (filters, max_listener_series, \
                 max_destination_series, keep_closed_for); the listen address, \
                 queue_sample_interval and tracer settings take effect at restart"
            );
        }
        Err(e) => tracing::error!(
            "config reload failed, keeping the running settings: {}",
            crate::inputs::one_line(&e)
        ),
    }
}

/// Every listener's queues at a fixed interval, for the last hour's history (fixed, so the
/// share of samples is a share of time, whatever the scrape rate); and, where a probe is
/// missing, each listener's new unclassified drops as one event to the events socket.
async fn sample_queues(state: Arc<State>, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let every = crate::recover::lock(&state.history).interval();
    let clock = Clock::new();
    let mut announced = Announced::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match state.collect().await {
            Ok(scrape) => {
                crate::recover::lock(&state.history).record(&scrape);
                let ts_ns = clock.monotonic_ns();
                let time = humantime::format_rfc3339_millis(clock.wall(ts_ns)).to_string();
                for event in announced.events(&scrape, ts_ns, &time) {
                    hub.publish(event);
                }
            }
            Err(e) => tracing::debug!("queue sample: {e:#}"),
        }
    }
}

/// Where the ring buffer's events go: to the hub (the events socket's readers) always, and
/// with `--print` to stdout too, with the periodic listener table.
struct Publisher {
    json: bool,
    clock: Clock,
    vis: Visibility,
    /// Client events' process names, read from /proc at most once a second per process.
    names: decode::ClientNames,
}

impl Publisher {
    /// Hands events to the hub (the events socket's readers), printing them too when asked;
    /// leaves `batch` empty. Printed lines go out in one write per batch.
    fn events(
        &mut self,
        batch: &mut Vec<Event>,
        hub: &Hub,
        out: Option<&mut io::StdoutLock>,
    ) -> Result<()> {
        let mut text = String::new();
        for ev in batch.drain(..) {
            let record = hub.publish(decode::to_record_named(&ev, &self.clock, &mut self.names));
            if out.is_none() {
                continue;
            }
            if self.json {
                // The line the events socket's readers get, written once for both.
                text.push_str(record.line());
            } else {
                text.push_str(&to_human(&record.event));
                text.push('\n');
            }
        }
        if let Some(out) = out {
            out.write_all(text.as_bytes())?;
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
        // Without a sock_diag dump the kernel's keys cannot be told apart by socket (a cookie
        // or an inode), so the table is per address: a SO_REUSEPORT group is one row.
        let listeners = ListenerStats::by_address(counters.listeners()?);
        if self.json {
            let snapshot = api::Listeners {
                last: Some(last),
                listeners: listeners.iter().map(|s| s.to_api(self.vis)).collect(),
                self_stats: Some(SelfStats(counters.self_stats()?)),
                ..Default::default()
            };
            writeln!(out, "{}", serde_json::to_string(&snapshot)?)?;
        } else {
            write!(out, "{}", table::to_table(&listeners, self.vis))?;
        }
        out.flush()?;
        Ok(())
    }
}

/// The container and network namespace names' resolver, with a warning for each runtime
/// path set in the configuration that does not exist (qtrace runs on; those names stay
/// empty).
pub fn start_names(
    daemon: &crate::config::DaemonOptions,
) -> std::sync::Arc<crate::host::names::Resolver> {
    for path in &daemon.runtimes_set {
        if !path.exists() {
            tracing::warn!(
                "container runtime path {} does not exist; the names it would give stay empty",
                path.display()
            );
        }
    }
    crate::host::names::Resolver::start(crate::host::names::Options {
        runtimes: crate::host::names::Runtimes {
            containerd_socket: daemon.containerd_socket.clone(),
            cri_socket: daemon.cri_socket.clone(),
            docker_root: daemon.docker_root.clone(),
            podman_root: daemon.podman_root.clone(),
        },
        retry: daemon.container_names_retry,
        capacity: daemon.max_container_names,
        netns_dir: crate::host::names::NETNS_DIR.into(),
    })
}
