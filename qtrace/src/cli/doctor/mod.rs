//! `qtrace doctor`: what this kernel lets qtrace see, the listen-queue sysctls of every network
//! namespace, each listener's effective queue limits as the running kernel computes them, and
//! advice drawn from what the daemon counted.
//!
//! Gathering is here: the daemon's typed snapshot (or probes of doctor's own), the namespaces
//! and their listeners, into one [`Report`]. [`limits`] computes the effective limits,
//! [`advice`] the advice, [`render`] the text form; `--json` writes the report itself.

pub mod advice;
pub mod clients;
pub mod limits;
pub mod render;

use std::{collections::BTreeMap, io::Write, net::IpAddr, path::PathBuf, time::Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use self::{
    advice::{advise, listener_name, reuseport_imbalance, Advice, Evidence},
    limits::{limits, measure_synq_rule, read_sysctls, Backlog, SynqRule},
};
use crate::{
    api::{ClientSide, Counters, LastHour, Owner, ProbeStatus},
    cli::probes::kernel_release,
    config::ClientArgs,
    daemon::{
        clients::{CloseWaitAges, NetnsCensus},
        events_socket,
    },
    host::{
        census, netns,
        owners::Owners,
        sockdiag::{self, ListenerQueues},
    },
    kernel::{btf::KernelBtf, tracer::Tracer},
    listener::ListenerId,
};

#[derive(Clone, Debug, clap::Args)]
pub struct DoctorOptions {
    // The daemon is asked for what it has counted; without one, doctor attaches probes.
    #[command(flatten)]
    pub client: ClientArgs,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Doctor's report: `--json` writes it, [`render::human`] turns it into text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub kernel: Kernel,
    pub probes: Probes,
    /// Whether a daemon answered (its probes and counts are then the ones shown).
    pub daemon: bool,
    pub namespaces: Vec<Namespace>,
    pub namespaces_unreadable: usize,
    pub listeners: Vec<Listener>,
    /// The client side: the daemon's (connect() failures, CLOSE_WAIT ages), or without one
    /// the census doctor sampled itself (no failures; ages 0).
    #[serde(default)]
    pub clients: Option<ClientSide>,
    pub advice: Vec<Advice>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kernel {
    pub release: String,
    pub btf: bool,
    pub btf_file: PathBuf,
    pub btf_error: Option<String>,
    /// None when it could not be measured (it needs root).
    pub synq_full_rule: Option<SynqRule>,
}

/// The probes' tiers, or why none could be attached.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Probes {
    Attached(Vec<ProbeStatus>),
    Failed { error: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Namespace {
    pub netns: u32,
    pub sysctls: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Listener {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    pub owner: Option<Owner>,
    pub accept_queue: AcceptQueue,
    pub syn_queue: SynQueue,
    /// What the daemon counted (None without a daemon).
    pub counters: Option<Counters>,
    pub last_hour: Option<LastHour>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AcceptQueue {
    pub len: u32,
    pub limit: u32,
    pub backlog: Backlog,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SynQueue {
    pub len: u32,
    /// None with tcp_syncookies=2 (every SYN gets a cookie).
    pub limit: Option<u32>,
    pub rule: String,
}

pub fn doctor(opts: DoctorOptions) -> Result<()> {
    let settings = opts.client.settings()?;
    let daemon = events_socket::listeners_snapshot(&settings.daemon.events_socket).ok();
    let sample_interval = daemon
        .as_ref()
        .and_then(|d| d.queue_sample_interval_seconds)
        .unwrap_or_default();
    let btf_file = &settings.tracer.btf;
    // The BTF is parsed at most once, for doctor's own probes, which need it anyway. A running
    // daemon's attached probes show its BTF parses: then the file need only be readable.
    let (btf, probes) = match &daemon {
        Some(d) => (
            KernelBtf::check_readable(btf_file),
            Probes::Attached(d.probes.clone()),
        ),
        None => match KernelBtf::load(btf_file) {
            Ok(loaded) => match Tracer::start_with(&settings.tracer, loaded) {
                Ok(tracer) => (Ok(()), Probes::Attached(tracer.probes.clone())),
                Err(e) => (
                    Ok(()),
                    Probes::Failed {
                        error: format!("{e:#}"),
                    },
                ),
            },
            Err(e) => {
                let error = format!("{e:#}");
                (Err(e), Probes::Failed { error })
            }
        },
    };
    let rule = measure_synq_rule().ok();
    let (namespaces, unreadable) =
        netns::for_each(|_| true, || Ok((read_sysctls(), sockdiag::listeners()?)));
    let counted = daemon.as_ref().map(|d| d.by_id()).unwrap_or_default();
    let mut owners = Owners::default();
    let inodes: Vec<u32> = namespaces
        .iter()
        .flat_map(|(_, (_, ls))| ls.iter().map(|l| l.inode))
        .collect();
    let owners = owners.lookup(inodes).clone();
    let mut listeners = Vec::new();
    let mut advice = Vec::new();
    for (netns, (sysctls, queues)) in &namespaces {
        for l in queues {
            let lim = limits(l.acceptq_max, sysctls, rule);
            let id = ListenerId {
                netns: *netns,
                addr: l.addr,
                port: l.port,
                socket: l.cookie,
            };
            let seen = counted.get(&id).copied();
            // The daemon's owner carries the container, pod and namespace names its runtime
            // lookups found; doctor's own scan knows the process and cgroup only.
            let owner = seen
                .and_then(|c| c.owner.clone())
                .or_else(|| owners.get(&l.inode).map(|o| (**o).clone()));
            let counters = seen.map(|c| c.counters);
            let last_hour = seen.and_then(|c| c.last_hour.clone());
            let name = listener_name(owner.as_ref(), &l.addr, l.port, *netns);
            let evidence = Evidence {
                counters: counters.as_ref(),
                last_hour: last_hour.as_ref(),
                sample_interval,
            };
            let before = advice.len();
            advise(&mut advice, &name, l, &lim, sysctls, &evidence);
            let workload = owner.as_ref().map_or(String::new(), Owner::workload);
            for a in &mut advice[before..] {
                a.workload = workload.clone();
            }
            listeners.push(listener(*netns, l, owner, lim, counters, last_hour));
        }
        reuseport_imbalance(&mut advice, *netns, queues, |inode| {
            owners.get(&inode).map(|o| (**o).clone())
        });
    }
    let client_side = daemon
        .as_ref()
        .and_then(|d| d.clients.clone())
        .unwrap_or_else(local_client_side);
    clients::advise(
        &mut advice,
        &client_side.census,
        client_side.destinations.as_deref(),
    );
    let report = Report {
        kernel: Kernel {
            release: kernel_release(),
            btf: btf.is_ok(),
            btf_file: btf_file.clone(),
            btf_error: btf.err().map(|e| format!("{e:#}")),
            synq_full_rule: rule,
        },
        probes,
        daemon: daemon.is_some(),
        namespaces: namespaces
            .iter()
            .map(|(netns, (sysctls, _))| Namespace {
                netns: *netns,
                sysctls: sysctls.clone(),
            })
            .collect(),
        namespaces_unreadable: unreadable.len(),
        listeners,
        clients: Some(client_side),
        advice,
    };
    let mut out = std::io::stdout().lock();
    if opts.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        write!(out, "{}", render::human(&report))?;
    }
    Ok(())
}

/// The census of every namespace, sampled by doctor itself (without a daemon): ages start now.
fn local_client_side() -> ClientSide {
    let (found, _) = netns::for_each(
        |_| true,
        || {
            let listening = sockdiag::listeners()?.iter().map(|l| l.port).collect();
            census::sample(&listening)
        },
    );
    let inodes: Vec<u32> = found
        .iter()
        .flat_map(|(_, c)| c.close_wait.iter().map(|cw| cw.inode))
        .collect();
    let owners = Owners::default().lookup(inodes).clone();
    let census = CloseWaitAges::default().attribute(found, &owners, Instant::now());
    ClientSide {
        destinations: None,
        destinations_folded: 0,
        census: census.iter().map(NetnsCensus::to_api).collect(),
    }
}

fn listener(
    netns: u32,
    l: &ListenerQueues,
    owner: Option<Owner>,
    lim: limits::Limits,
    counters: Option<Counters>,
    last_hour: Option<LastHour>,
) -> Listener {
    Listener {
        netns,
        addr: l.addr,
        port: l.port,
        owner,
        accept_queue: AcceptQueue {
            len: l.acceptq_len,
            limit: lim.accept_limit,
            backlog: lim.backlog,
        },
        syn_queue: SynQueue {
            len: l.synq_len,
            limit: lim.syn_limit,
            rule: lim.syn_rule,
        },
        counters,
        last_hour,
    }
}
