//! qtrace: attributes TCP listen-queue drops, SYN-ACK retransmits, syncookies and accept-queue
//! waits to the listening socket, from eBPF programs in the kernel.

mod btf;
mod config;
mod doctor;
mod events;
mod events_cmd;
mod events_request;
mod heap;
mod history;
mod http_limits;
mod hub;
mod inputs;
mod listener;
mod metrics;
mod netns;
mod owners;
mod probe_report;
mod probes;
mod recover;
mod ring;
mod run;
mod scrape;
mod server;
mod single_flight;
mod snapshot;
mod sockdiag;
mod socket_file;
mod stats;
mod top;
mod tracer;

use std::{io::IsTerminal, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The service: attach the probes and serve /metrics, /healthz and /api/listeners
    /// (with --print, also print events and a listener table). SIGHUP re-reads the config file.
    Run(run::RunOptions),
    /// Attach every probe, report the tier each got on this kernel (and why not better), detach.
    Probes(probe_report::ProbesOptions),
    /// Live drop events from the running daemon (or --standalone), one per line.
    Events(events_cmd::EventsOptions),
    /// Kernel support, listen-queue sysctls, effective queue limits and advice.
    Doctor(doctor::DoctorOptions),
    /// A live per-listener table: queue fill, drops/s by reason, retransmits, accept wait.
    Top(top::TopOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    heap::limit_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            // aya warns when it cannot raise RLIMIT_MEMLOCK, which only happens without
            // privileges; the capability error that follows says what to do.
            EnvFilter::try_from_env("QTRACE_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,aya::sys::bpf=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Blocking work (collections, rendering) on a few threads: TasksMax counts them all.
        .max_blocking_threads(8)
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                match cli.command {
                    Command::Run(opts) => run::run(opts).await,
                    Command::Probes(opts) => probe_report::probes(opts),
                    Command::Events(opts) => events_cmd::events(opts).await,
                    Command::Doctor(opts) => doctor::doctor(opts),
                    Command::Top(opts) => top::top(opts),
                }
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, whatever the causes' messages look like (TOML errors span lines).
            eprintln!("qtrace: error: {}", inputs::one_line(&err));
            ExitCode::FAILURE
        }
    }
}
