//! qtrace: attributes TCP listen-queue drops, SYN-ACK retransmits, syncookies and accept-queue
//! waits to the listening socket, from eBPF programs in the kernel.

//!
//! Layers, each importing only from those below it: [`cli`] (one module per command) →
//! [`daemon`] (state and transports) → [`kernel`] (the eBPF side) and [`host`] (/proc,
//! namespaces, sock_diag) → the common modules [`api`] (wire types), [`config`],
//! [`listener`], [`build_info`], [`inputs`] (bounds on what qtrace reads from files and
//! people) and [`recover`] (locks a panic cannot poison for good).

mod aging;
mod api;
mod build_info;
mod cli;
mod config;
mod daemon;
mod host;
mod inputs;
mod kernel;
mod listener;
mod recover;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use cli::{doctor, events, generate, logging, probes, run, top};

#[derive(Parser)]
#[command(version, long_version = build_info::LONG_VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: logging::LogOptions,
}

#[derive(Subcommand)]
enum Command {
    /// The service: attach the probes and serve /metrics, /healthz and /api/listeners
    /// (with --print, also print events and a listener table). SIGHUP re-reads the config file.
    Run(run::RunOptions),
    /// Attach every probe, report the tier each got on this kernel (and why not better), detach.
    Probes(probes::ProbesOptions),
    /// Live drop events from the running daemon (or --standalone), one per line.
    Events(events::EventsOptions),
    /// Kernel support, listen-queue sysctls, effective queue limits and advice.
    Doctor(doctor::DoctorOptions),
    /// A live per-listener table: queue fill, drops/s by reason, retransmits, accept wait.
    Top(top::TopOptions),
    /// Shell completions and the man pages, from this command line (for packaging).
    #[command(hide = true)]
    Generate(generate::GenerateOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    host::heap::limit_arenas();
    logging::init(&cli.log);
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
                    Command::Probes(opts) => probes::probes(opts),
                    Command::Events(opts) => events::events(opts).await,
                    Command::Doctor(opts) => doctor::doctor(opts),
                    Command::Top(opts) => top::top(opts),
                    Command::Generate(opts) => generate::generate(opts, Cli::command()),
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
