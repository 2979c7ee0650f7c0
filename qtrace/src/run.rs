//! `qtrace run`: load the probes, print events as they happen and a listener table every
//! interval, and detach everything on SIGINT/SIGTERM.

use std::{
    io::{self, Write},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::RingBuf;
use qtrace_common::maps;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{
    events::{self, Clock},
    snapshot::{self, Visibility},
    stats,
    tracer::{Tracer, TracerOptions},
};

#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    #[command(flatten)]
    pub tracer: TracerOptions,
    /// Print JSON Lines (events, listener snapshots) instead of text.
    #[arg(long)]
    pub json: bool,
    /// How often to print the listener table.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let mut tracer = Tracer::start(&opts.tracer)?;
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
    let mut out = io::stdout().lock();
    if opts.json {
        let ready = serde_json::json!({ "type": "ready", "probes": tracer.probes });
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
    let clock = Clock::new();
    let mut tick = tokio::time::interval(opts.interval);
    tick.tick().await;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    let print_events = |ring: &mut RingBuf<_>, out: &mut io::StdoutLock| -> Result<()> {
        while let Some(item) = ring.next() {
            let Some(ev) = events::decode(&item) else {
                continue;
            };
            if opts.json {
                serde_json::to_writer(&mut *out, &events::to_json(&ev, &clock))?;
                writeln!(out)?;
            } else {
                writeln!(out, "{}", events::to_human(&ev, &clock))?;
            }
        }
        out.flush()?;
        Ok(())
    };

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                print_events(guard.get_inner_mut(), &mut out)?;
                guard.clear_ready();
            }
            _ = tick.tick() => print_snapshot(&tracer, vis, opts.json, false, &mut out)?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    print_events(ring.get_mut(), &mut out)?;
    print_snapshot(&tracer, vis, opts.json, true, &mut out)?;
    tracing::info!("detaching");
    drop(ring);
    drop(tracer);
    Ok(())
}

fn print_snapshot(
    tracer: &Tracer,
    vis: Visibility,
    json: bool,
    last: bool,
    out: &mut impl Write,
) -> Result<()> {
    let listeners = stats::listeners(&tracer.ebpf)?;
    if json {
        let self_stats = stats::self_stats(&tracer.ebpf)?;
        let v = snapshot::to_json(&listeners, &self_stats, vis, last);
        writeln!(out, "{v}")?;
    } else {
        write!(out, "{}", snapshot::to_table(&listeners, vis))?;
    }
    out.flush()?;
    Ok(())
}
