//! Settings from flags, environment (`QTRACE_*`) and an optional TOML file, in that order of
//! precedence. Every setting has one definition: a field of [`TracerArgs`] or [`DaemonArgs`],
//! which is at once a flag, an environment variable and a file key. Unknown keys and bad values
//! are rejected with the key and the reason.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::api::Tier;

/// The running kernel's BTF, where the kernel publishes it.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Read when it exists and no `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/qtrace/qtrace.toml";

/// `--config`, which every command takes.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigArg {
    /// TOML config file; flags and QTRACE_* variables override it [default:
    /// /etc/qtrace/qtrace.toml if present].
    #[arg(long = "config", env = "QTRACE_CONFIG", value_name = "FILE")]
    pub path: Option<PathBuf>,
}

/// A command's settings: its flags and variables over the config file over the defaults.
pub struct Settings {
    pub tracer: TracerOptions,
    pub daemon: DaemonOptions,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
}

impl ConfigArg {
    /// Settings as every command reads them. The whole file is checked, whatever part the
    /// command uses, so a bad file is never silently ignored; its errors name the file, and a
    /// bad flag's errors name the flag.
    pub fn settings(&self, tracer: &TracerArgs, daemon: &DaemonArgs) -> Result<Settings> {
        let (file, path) = FileConfig::load(self.path.as_deref())?;
        if let Some(path) = &path {
            TracerArgs::default()
                .resolve(&file.tracer)
                .and(DaemonArgs::default().resolve(&file.daemon))
                .with_context(|| format!("config file {}", path.display()))?;
        }
        Ok(Settings {
            tracer: tracer.resolve(&file.tracer)?,
            daemon: daemon.resolve(&file.daemon)?,
            file: path,
        })
    }
}

/// What the commands that ask the daemon take (`events`, `top`, `doctor`): its socket, the
/// config file, and the settings of the probes they attach when they run their own.
#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// The daemon's events socket [default: the config file's events_socket, else
    /// /run/qtrace/events.sock].
    #[arg(long, env = "QTRACE_EVENTS_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub tracer: TracerArgs,
}

impl ClientArgs {
    /// The settings; `--socket` is the client's name for the daemon's `events_socket`.
    pub fn settings(&self) -> Result<Settings> {
        let daemon = DaemonArgs {
            events_socket: self.socket.clone(),
            ..Default::default()
        };
        self.config.settings(&self.tracer, &daemon)
    }
}

/// Where `events` and `top` get their data: the daemon's local socket, or probes of their own.
#[derive(Clone, Debug, clap::Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Run probes of its own instead of asking the daemon (needs the daemon's privileges).
    #[arg(long)]
    pub standalone: bool,
}

/// How the kernel side is loaded (by `run`, `probes`, and the others' own probes).
#[derive(Clone, Debug, Default, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct TracerArgs {
    /// Best attach tier to try; qtrace falls down from it (fentry → kprobe → tracepoint)
    /// [default: fentry].
    #[arg(long, env = "QTRACE_ATTACH", value_enum)]
    pub attach: Option<Tier>,
    /// Events each listener may emit per second and CPU; the rest are counted as suppressed
    /// [default: 100].
    #[arg(long, env = "QTRACE_EVENT_RATE")]
    pub event_rate: Option<u32>,
    /// Most listening sockets counted; past it the loss is counted [default: 4096].
    #[arg(long, env = "QTRACE_MAX_LISTENERS")]
    pub max_listeners: Option<u32>,
    /// Listening sockets of uids from this one up are counted apart, in a map as large as
    /// --max-listeners, so no user's listeners can crowd out a service's [default: 1000].
    #[arg(long, env = "QTRACE_FIRST_USER_UID")]
    pub first_user_uid: Option<u32>,
    /// Most (namespace, process, destination) triples whose connect() failures and SYN
    /// retransmits are counted; past it the loss is counted [default: 4096].
    #[arg(long, env = "QTRACE_MAX_CLIENT_DESTINATIONS")]
    pub max_client_destinations: Option<u32>,
    /// Most sockets opened by connect() followed at once, from connect() until they leave
    /// ESTABLISHED (who opened them, for failures and resets seen later); past it the loss is
    /// counted [default: 65536].
    #[arg(long, env = "QTRACE_MAX_CLIENT_SOCKETS")]
    pub max_client_sockets: Option<u32>,
    /// Slots for those sockets' records in front of --max-client-sockets' hash, a power of two:
    /// a socket whose slot (by its address) is free is followed there at a fraction of the
    /// hash's cost, the others in the hash [default: 32768].
    #[arg(long, env = "QTRACE_CLIENT_SLOTS")]
    pub client_slots: Option<u32>,
    /// Event ring buffer size in KiB, a power of two [default: 256].
    #[arg(long, env = "QTRACE_RINGBUF_KIB")]
    pub ringbuf_kib: Option<u32>,
    /// The kernel's BTF, for kernels that do not expose it in sysfs [default:
    /// /sys/kernel/btf/vmlinux].
    #[arg(long, env = "QTRACE_BTF", value_name = "FILE")]
    pub btf: Option<PathBuf>,
    /// Probes to leave off, each as -NAME (syn, ack, synack, accept, client, port_search;
    /// comma-separated, e.g. `--probes=-syn`): what they feed is then unavailable, as on a
    /// kernel where they cannot attach [default: none].
    #[arg(
        long,
        env = "QTRACE_PROBES",
        value_delimiter = ',',
        allow_hyphen_values = true,
        value_name = "-PROBE"
    )]
    pub probes: Option<Vec<String>>,
}

/// The resolved tracer settings.
#[derive(Clone, Debug)]
pub struct TracerOptions {
    pub best_tier: Tier,
    pub event_rate: u32,
    pub max_listeners: u32,
    pub first_user_uid: u32,
    pub max_client_destinations: u32,
    pub max_client_sockets: u32,
    pub client_slots: u32,
    pub ringbuf_kib: u32,
    pub btf: PathBuf,
    /// Probe areas turned off by `--probes -NAME` (names checked when attaching).
    pub probes_off: Vec<String>,
}

/// The service's endpoints and what it exports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct DaemonArgs {
    /// Address of the HTTP endpoints (/metrics, /healthz, /api/listeners); `:9860` for every
    /// address [default: 127.0.0.1:9860].
    #[arg(
        long = "web.listen-address",
        env = "QTRACE_WEB_LISTEN_ADDRESS",
        value_name = "ADDR"
    )]
    pub web_listen_address: Option<String>,
    /// Path of the metrics endpoint [default: /metrics].
    #[arg(
        long = "web.telemetry-path",
        env = "QTRACE_WEB_TELEMETRY_PATH",
        value_name = "PATH"
    )]
    pub web_telemetry_path: Option<String>,
    /// TLS and basic auth for the endpoints, in the exporter-toolkit format (as
    /// node_exporter's --web.config.file) [default: none: plain HTTP, no authentication].
    #[arg(
        long = "web.config.file",
        env = "QTRACE_WEB_CONFIG_FILE",
        value_name = "FILE"
    )]
    pub web_config_file: Option<PathBuf>,
    /// Most listeners exported with their own labels; the rest are summed into one series
    /// labelled `other` [default: 1000].
    #[arg(long, env = "QTRACE_MAX_LISTENER_SERIES")]
    pub max_listener_series: Option<u32>,
    /// Most destinations (namespace, process, address, port) exported with their own labels;
    /// the rest are summed into one series labelled `other` [default: 1000].
    #[arg(long, env = "QTRACE_MAX_DESTINATION_SERIES")]
    pub max_destination_series: Option<u32>,
    /// How long a socket that closed, or a namespace that was deleted, keeps its last counts
    /// exported before its series go and its kernel map entries are deleted: at least two
    /// scrape intervals, so a scrape sees them (e.g. 1m) [default: 30s].
    #[arg(long, env = "QTRACE_KEEP_CLOSED_FOR", value_name = "DURATION")]
    pub keep_closed_for: Option<String>,
    /// Export only listeners on these ports (repeat or comma-separate).
    #[arg(
        long = "include-port",
        env = "QTRACE_INCLUDE_PORTS",
        value_delimiter = ','
    )]
    pub include_ports: Option<Vec<u16>>,
    /// Never export listeners on these ports.
    #[arg(
        long = "exclude-port",
        env = "QTRACE_EXCLUDE_PORTS",
        value_delimiter = ','
    )]
    pub exclude_ports: Option<Vec<u16>>,
    /// Export only listeners in these network namespaces (inode numbers).
    #[arg(
        long = "include-netns",
        env = "QTRACE_INCLUDE_NETNS",
        value_delimiter = ','
    )]
    pub include_netns: Option<Vec<u32>>,
    /// Never export listeners in these network namespaces.
    #[arg(
        long = "exclude-netns",
        env = "QTRACE_EXCLUDE_NETNS",
        value_delimiter = ','
    )]
    pub exclude_netns: Option<Vec<u32>>,
    /// Local socket streaming events to `qtrace events` (mode 0660) [default:
    /// /run/qtrace/events.sock].
    #[arg(long, env = "QTRACE_EVENTS_SOCKET", value_name = "PATH")]
    pub events_socket: Option<PathBuf>,
    /// Group owning the events socket, whose members may read events [default: root's].
    #[arg(long, env = "QTRACE_EVENTS_SOCKET_GROUP", value_name = "GROUP")]
    pub events_socket_group: Option<String>,
    /// Events queued for each `qtrace events` reader, of those its filters admit; a reader
    /// further behind is told how many it missed [default: 1024].
    #[arg(long, env = "QTRACE_EVENTS_READER_QUEUE")]
    pub events_reader_queue: Option<u32>,
    /// How often every listener's queues are sampled for the last hour's history that
    /// `qtrace doctor` reports (e.g. 10s) [default: 10s].
    #[arg(long, env = "QTRACE_QUEUE_SAMPLE_INTERVAL", value_name = "DURATION")]
    pub queue_sample_interval: Option<String>,
    /// containerd's API socket, asked for the names and Kubernetes labels of containers
    /// (read-only calls); empty to ask nothing [default: /run/containerd/containerd.sock].
    #[arg(long, env = "QTRACE_CONTAINERD_SOCKET", value_name = "PATH")]
    pub containerd_socket: Option<PathBuf>,
    /// A CRI runtime's socket (CRI-O's), asked through the CRI API (ContainerStatus) for the
    /// names and Kubernetes labels of CRI-O's containers; empty to ask nothing [default:
    /// /run/crio/crio.sock].
    #[arg(long, env = "QTRACE_CRI_SOCKET", value_name = "PATH")]
    pub cri_socket: Option<PathBuf>,
    /// Docker's data root, whose containers/<id>/config.v2.json name Docker's containers;
    /// empty to read nothing [default: /var/lib/docker].
    #[arg(long, env = "QTRACE_DOCKER_ROOT", value_name = "DIR")]
    pub docker_root: Option<PathBuf>,
    /// Podman's (root) storage, whose <driver>-containers/containers.json name Podman's
    /// containers; empty to read nothing [default: /var/lib/containers/storage].
    #[arg(long, env = "QTRACE_PODMAN_ROOT", value_name = "DIR")]
    pub podman_root: Option<PathBuf>,
    /// How long a container no runtime could name stays unnamed before it is asked for
    /// again (e.g. 1m) [default: 1m].
    #[arg(long, env = "QTRACE_CONTAINER_NAMES_RETRY", value_name = "DURATION")]
    pub container_names_retry: Option<String>,
    /// Containers whose names are remembered at most; the oldest are forgotten first
    /// [default: 4096].
    #[arg(long, env = "QTRACE_MAX_CONTAINER_NAMES")]
    pub max_container_names: Option<u32>,
}

pub const DEFAULT_EVENTS_SOCKET: &str = "/run/qtrace/events.sock";

/// How long the counters of a closed socket stay exported before its entry is deleted, by
/// default (`--keep-closed-for`): two scrapes at Prometheus' default interval.
pub const DEFAULT_KEEP_CLOSED_FOR: Duration = Duration::from_secs(30);

/// Loopback only: /api/listeners names processes, so exposing it is a choice (README, "Metrics").
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9860";

/// The resolved daemon settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonOptions {
    pub listen: SocketAddr,
    /// Where /metrics is served (`--web.telemetry-path`).
    pub telemetry_path: String,
    /// TLS and basic auth (`--web.config.file`), read by `daemon::web_config`.
    pub web_config_file: Option<PathBuf>,
    pub max_listener_series: usize,
    pub max_destination_series: usize,
    pub keep_closed_for: Duration,
    pub filter: Filter,
    pub events_socket: PathBuf,
    pub events_socket_group: Option<String>,
    pub events_reader_queue: usize,
    pub queue_sample_interval: Duration,
    /// Where container names are read (None: not asked), and those set explicitly (a missing
    /// one is warned about; a missing default is not).
    pub containerd_socket: Option<PathBuf>,
    pub cri_socket: Option<PathBuf>,
    pub docker_root: Option<PathBuf>,
    pub podman_root: Option<PathBuf>,
    pub runtimes_set: Vec<PathBuf>,
    pub container_names_retry: Duration,
    pub max_container_names: usize,
}

/// Which listeners are exported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub include_ports: Option<BTreeSet<u16>>,
    pub exclude_ports: BTreeSet<u16>,
    pub include_netns: Option<BTreeSet<u32>>,
    pub exclude_netns: BTreeSet<u32>,
}

impl Filter {
    pub fn admits(&self, netns: u32, port: u16) -> bool {
        self.admits_netns(netns)
            && self
                .include_ports
                .as_ref()
                .is_none_or(|s| s.contains(&port))
            && !self.exclude_ports.contains(&port)
    }

    pub fn admits_netns(&self, netns: u32) -> bool {
        self.include_netns
            .as_ref()
            .is_none_or(|s| s.contains(&netns))
            && !self.exclude_netns.contains(&netns)
    }
}

/// A config file's contents: the union of both argument sets.
#[derive(Default)]
pub struct FileConfig {
    pub tracer: TracerArgs,
    pub daemon: DaemonArgs,
}

impl FileConfig {
    /// `explicit` must exist; without it the default path is read when present.
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Option<PathBuf>)> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok((Self::default(), None)),
        };
        let text = crate::inputs::read_regular(&path, crate::inputs::MAX_CONFIG_BYTES)
            .and_then(|b| String::from_utf8(b).context("not UTF-8 text"))
            .with_context(|| format!("read config file {}", path.display()))?;
        let cfg = Self::parse(&text).with_context(|| format!("config file {}", path.display()))?;
        Ok((cfg, Some(path)))
    }

    pub fn parse(text: &str) -> Result<Self> {
        // A TOML error quotes the line it is on: a huge line must not be echoed whole.
        let table: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!(clip_lines(&e.to_string())))?;
        let known = keys_of(&TracerArgs::default()).chain(keys_of(&DaemonArgs::default()));
        let known: BTreeSet<String> = known.collect();
        if let Some(key) = table.keys().find(|k| !known.contains(*k)) {
            bail!(
                "unknown key `{}`; known keys: {}",
                crate::inputs::clip(key),
                known.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(Self {
            tracer: table
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| anyhow::anyhow!(clip_lines(&e.to_string())))?,
            daemon: table
                .try_into()
                .map_err(|e: toml::de::Error| anyhow::anyhow!(clip_lines(&e.to_string())))?,
        })
    }
}

/// Each line of a parser's message clipped (a TOML error quotes the offending line).
fn clip_lines(text: &str) -> String {
    let lines: Vec<String> = text
        .lines()
        .map(|l| crate::inputs::clip_to(l, 300))
        .collect();
    lines.join("\n")
}

/// Field names of an argument set: the file keys it accepts.
fn keys_of<T: Serialize>(args: &T) -> impl Iterator<Item = String> {
    let value = serde_json::to_value(args).expect("argument sets serialize");
    value
        .as_object()
        .expect("a struct")
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .into_iter()
}

fn invalid(key: &str, flag: &str, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("invalid {key} (--{flag}): {why}")
}

impl TracerArgs {
    /// These flags over `file`, then defaults; values are checked here, for both sources.
    pub fn resolve(&self, file: &TracerArgs) -> Result<TracerOptions> {
        let event_rate = self.event_rate.or(file.event_rate).unwrap_or(100);
        if event_rate == 0 {
            return Err(invalid(
                "event_rate",
                "event-rate",
                "0: must be at least 1 event a second",
            ));
        }
        let max_listeners = self.max_listeners.or(file.max_listeners).unwrap_or(4096);
        if !(1..=1_000_000).contains(&max_listeners) {
            return Err(invalid(
                "max_listeners",
                "max-listeners",
                format!("{max_listeners}: must be 1 to 1000000"),
            ));
        }
        let max_client_destinations = self
            .max_client_destinations
            .or(file.max_client_destinations)
            .unwrap_or(4096);
        if !(1..=1_000_000).contains(&max_client_destinations) {
            return Err(invalid(
                "max_client_destinations",
                "max-client-destinations",
                format!("{max_client_destinations}: must be 1 to 1000000"),
            ));
        }
        let max_client_sockets = self
            .max_client_sockets
            .or(file.max_client_sockets)
            .unwrap_or(65536);
        if !(1..=4_000_000).contains(&max_client_sockets) {
            return Err(invalid(
                "max_client_sockets",
                "max-client-sockets",
                format!("{max_client_sockets}: must be 1 to 4000000"),
            ));
        }
        let client_slots = self.client_slots.or(file.client_slots).unwrap_or(32768);
        if !(1..=1 << 22).contains(&client_slots) || !client_slots.is_power_of_two() {
            return Err(invalid(
                "client_slots",
                "client-slots",
                format!("{client_slots}: must be a power of two from 1 to 4194304"),
            ));
        }
        let ringbuf_kib = self.ringbuf_kib.or(file.ringbuf_kib).unwrap_or(256);
        if !(4..=1 << 20).contains(&ringbuf_kib) || !ringbuf_kib.is_power_of_two() {
            return Err(invalid(
                "ringbuf_kib",
                "ringbuf-kib",
                format!("{ringbuf_kib}: must be a power of two from 4 to 1048576"),
            ));
        }
        let mut probes_off = Vec::new();
        for p in self
            .probes
            .as_ref()
            .or(file.probes.as_ref())
            .into_iter()
            .flatten()
        {
            match p.strip_prefix('-') {
                Some(name) if !name.is_empty() => probes_off.push(name.to_string()),
                _ => {
                    return Err(invalid(
                        "probes",
                        "probes",
                        format!("{p:?}: write -NAME to turn a probe off (e.g. -syn)"),
                    ))
                }
            }
        }
        Ok(TracerOptions {
            probes_off,
            best_tier: self.attach.or(file.attach).unwrap_or(Tier::Fentry),
            event_rate,
            max_listeners,
            first_user_uid: self.first_user_uid.or(file.first_user_uid).unwrap_or(1000),
            max_client_destinations,
            max_client_sockets,
            client_slots,
            ringbuf_kib,
            btf: self
                .btf
                .clone()
                .or_else(|| file.btf.clone())
                .unwrap_or_else(|| VMLINUX_BTF.into()),
        })
    }
}

impl DaemonArgs {
    pub fn resolve(&self, file: &DaemonArgs) -> Result<DaemonOptions> {
        let addr = self
            .web_listen_address
            .clone()
            .or_else(|| file.web_listen_address.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = parse_listen_address(&addr).map_err(|why| {
            invalid(
                "web_listen_address",
                "web.listen-address",
                format!("{}: {why}", crate::inputs::clip(&format!("{addr:?}"))),
            )
        })?;
        let max_listener_series = self
            .max_listener_series
            .or(file.max_listener_series)
            .unwrap_or(1000);
        if max_listener_series == 0 {
            return Err(invalid(
                "max_listener_series",
                "max-listener-series",
                "0: must be at least 1",
            ));
        }
        let max_destination_series = self
            .max_destination_series
            .or(file.max_destination_series)
            .unwrap_or(1000);
        if max_destination_series == 0 {
            return Err(invalid(
                "max_destination_series",
                "max-destination-series",
                "0: must be at least 1",
            ));
        }
        let set = |a: &Option<Vec<u16>>, b: &Option<Vec<u16>>| a.clone().or_else(|| b.clone());
        let nset = |a: &Option<Vec<u32>>, b: &Option<Vec<u32>>| a.clone().or_else(|| b.clone());
        let telemetry_path = self
            .web_telemetry_path
            .clone()
            .or_else(|| file.web_telemetry_path.clone())
            .unwrap_or_else(|| "/metrics".into());
        let bad_path = !telemetry_path.starts_with('/')
            || telemetry_path.len() < 2
            || telemetry_path.contains(['?', '#', '{', '}', '*', ' '])
            || ["/healthz", "/api/listeners"].contains(&telemetry_path.as_str());
        if bad_path {
            return Err(invalid(
                "web_telemetry_path",
                "web.telemetry-path",
                format!(
                    "{}: must be a path such as /metrics, other than / and the other endpoints",
                    crate::inputs::clip(&format!("{telemetry_path:?}"))
                ),
            ));
        }
        let mut set_paths = Vec::new();
        Ok(DaemonOptions {
            telemetry_path,
            web_config_file: self
                .web_config_file
                .clone()
                .or_else(|| file.web_config_file.clone()),
            events_socket: self
                .events_socket
                .clone()
                .or_else(|| file.events_socket.clone())
                .unwrap_or_else(|| DEFAULT_EVENTS_SOCKET.into()),
            events_socket_group: self
                .events_socket_group
                .clone()
                .or_else(|| file.events_socket_group.clone()),
            events_reader_queue: match self.events_reader_queue.or(file.events_reader_queue) {
                None => 1024,
                Some(n @ 1..=1_000_000) => n as usize,
                Some(n) => {
                    return Err(invalid(
                        "events_reader_queue",
                        "events-reader-queue",
                        format!("{n}: must be 1 to 1000000"),
                    ))
                }
            },
            queue_sample_interval: duration_in(
                ("queue_sample_interval", "queue-sample-interval"),
                self.queue_sample_interval
                    .as_ref()
                    .or(file.queue_sample_interval.as_ref()),
                Duration::from_secs(10),
                (Duration::from_millis(100), Duration::from_secs(600)),
                ("100ms to 10m", "10s"),
            )?,
            containerd_socket: runtime_path(&mut set_paths, "/run/containerd/containerd.sock", {
                self.containerd_socket
                    .as_ref()
                    .or(file.containerd_socket.as_ref())
            }),
            cri_socket: runtime_path(&mut set_paths, "/run/crio/crio.sock", {
                self.cri_socket.as_ref().or(file.cri_socket.as_ref())
            }),
            docker_root: runtime_path(&mut set_paths, "/var/lib/docker", {
                self.docker_root.as_ref().or(file.docker_root.as_ref())
            }),
            podman_root: runtime_path(&mut set_paths, "/var/lib/containers/storage", {
                self.podman_root.as_ref().or(file.podman_root.as_ref())
            }),
            runtimes_set: set_paths,
            keep_closed_for: duration_in(
                ("keep_closed_for", "keep-closed-for"),
                self.keep_closed_for
                    .as_ref()
                    .or(file.keep_closed_for.as_ref()),
                DEFAULT_KEEP_CLOSED_FOR,
                (Duration::from_secs(1), Duration::from_secs(86400)),
                ("1s to 1d", "1m"),
            )?,
            container_names_retry: duration_in(
                ("container_names_retry", "container-names-retry"),
                self.container_names_retry
                    .as_ref()
                    .or(file.container_names_retry.as_ref()),
                Duration::from_secs(60),
                (Duration::from_secs(1), Duration::from_secs(86400)),
                ("1s to 1d", "1m"),
            )?,
            max_container_names: match self.max_container_names.or(file.max_container_names) {
                None => 4096,
                Some(n @ 1..=1_000_000) => n as usize,
                Some(n) => {
                    return Err(invalid(
                        "max_container_names",
                        "max-container-names",
                        format!("{n}: must be 1 to 1000000"),
                    ))
                }
            },
            listen,
            max_listener_series: max_listener_series as usize,
            max_destination_series: max_destination_series as usize,
            filter: Filter {
                include_ports: set(&self.include_ports, &file.include_ports)
                    .map(BTreeSet::from_iter),
                exclude_ports: set(&self.exclude_ports, &file.exclude_ports)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                include_netns: nset(&self.include_netns, &file.include_netns)
                    .map(BTreeSet::from_iter),
                exclude_netns: nset(&self.exclude_netns, &file.exclude_netns)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            },
        })
    }
}

/// A duration setting: `text` parsed and within `range`, else `default`; errors name the
/// key and flag (`names`), the range and an example (`says`).
fn duration_in(
    names: (&str, &str),
    text: Option<&String>,
    default: Duration,
    range: (Duration, Duration),
    says: (&str, &str),
) -> Result<Duration> {
    let Some(text) = text else {
        return Ok(default);
    };
    let (key, flag) = names;
    match humantime::parse_duration(text) {
        Ok(d) if d >= range.0 && d <= range.1 => Ok(d),
        Ok(_) => Err(invalid(
            key,
            flag,
            format!("{}: must be {}", crate::inputs::clip(text), says.0),
        )),
        Err(e) => Err(invalid(
            key,
            flag,
            format!("{}: {e} (write e.g. {})", crate::inputs::clip(text), says.1),
        )),
    }
}

/// A runtime's socket or directory: the default unless set, none when set empty; one set is
/// remembered in `set` (so that a missing one is warned about, and a missing default is not).
fn runtime_path(set: &mut Vec<PathBuf>, default: &str, given: Option<&PathBuf>) -> Option<PathBuf> {
    match given {
        None => Some(default.into()),
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => {
            set.push(p.clone());
            Some(p.clone())
        }
    }
}

/// `host:port`, `[v6]:port`, or `:port` for every address (exporter convention).
fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    let full = match s.strip_prefix(':') {
        Some(port) => format!("[::]:{port}"),
        None => s.to_string(),
    };
    full.parse()
        .map_err(|_| "expected host:port, [ipv6]:port or :port".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file =
            FileConfig::parse("event_rate = 7\nmax_listener_series = 5\nexclude_ports = [22]")
                .unwrap();
        let cli = TracerArgs {
            event_rate: Some(9),
            ..Default::default()
        };
        let t = cli.resolve(&file.tracer).unwrap();
        assert_eq!(
            (t.event_rate, t.ringbuf_kib, t.best_tier),
            (9, 256, Tier::Fentry)
        );
        let d = DaemonArgs::default().resolve(&file.daemon).unwrap();
        assert_eq!(d.max_listener_series, 5);
        assert_eq!(d.keep_closed_for, Duration::from_secs(30));
        assert_eq!(d.listen, "127.0.0.1:9860".parse().unwrap());
        assert!(!d.filter.admits(1, 22) && d.filter.admits(1, 80));
    }

    #[test]
    fn huge_keys_and_values_are_not_echoed_whole() {
        let key = "k".repeat(20 << 20);
        for text in [
            format!("{key} = 1"),
            format!("event_rate = \"{key}\""),
            format!("web_listen_address = \"{key}\""),
            format!("x = [{key}"),
        ] {
            let e = match FileConfig::parse(&text) {
                Err(e) => format!("{e:#}"),
                Ok(f) => format!(
                    "{:#}",
                    DaemonArgs::default().resolve(&f.daemon).unwrap_err()
                ),
            };
            assert!(e.len() < 2000, "{} bytes: {}", e.len(), &e[..200]);
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = FileConfig::parse("event_rat = 7")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("unknown key `event_rat`") && e.contains("event_rate"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_key_and_the_reason() {
        let e = format!(
            "{:#}",
            FileConfig::parse("event_rate = \"fast\"").err().unwrap()
        );
        assert!(e.contains("event_rate"), "{e}");
        let file = FileConfig::parse("ringbuf_kib = 3").unwrap();
        let e = TracerArgs::default()
            .resolve(&file.tracer)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid ringbuf_kib (--ringbuf-kib): 3: must be a power of two"),
            "{e}"
        );
        let daemon_error = |text: &str| {
            let file = FileConfig::parse(text).unwrap();
            DaemonArgs::default()
                .resolve(&file.daemon)
                .unwrap_err()
                .to_string()
        };
        let e = daemon_error("web_listen_address = \"localhost\"");
        assert!(e.contains("web_listen_address"), "{e}");
        assert_eq!(
            daemon_error("keep_closed_for = \"500ms\""),
            "invalid keep_closed_for (--keep-closed-for): 500ms: must be 1s to 1d"
        );
    }

    #[test]
    fn filters_combine_include_and_exclude() {
        let f = Filter {
            include_ports: Some([80, 443].into()),
            exclude_netns: [7].into(),
            ..Default::default()
        };
        assert!(f.admits(1, 80));
        assert!(!f.admits(1, 22));
        assert!(!f.admits(7, 80));
    }

    #[test]
    fn runtime_paths_default_disable_when_empty_and_are_remembered_when_set() {
        let file = FileConfig::parse(
            "containerd_socket = \"/run/k3s/containerd/containerd.sock\"\ndocker_root = \"\"",
        )
        .unwrap();
        let d = DaemonArgs::default().resolve(&file.daemon).unwrap();
        assert_eq!(
            d.containerd_socket.as_deref(),
            Some(Path::new("/run/k3s/containerd/containerd.sock"))
        );
        assert_eq!(d.docker_root, None, "empty: not read");
        assert_eq!(
            d.podman_root.as_deref(),
            Some(Path::new("/var/lib/containers/storage"))
        );
        assert_eq!(
            d.runtimes_set,
            [PathBuf::from("/run/k3s/containerd/containerd.sock")]
        );
        assert_eq!(d.container_names_retry, Duration::from_secs(60));
        assert_eq!(d.max_container_names, 4096);
        for (text, want) in [
            (
                "container_names_retry = \"0s\"",
                "invalid container_names_retry (--container-names-retry): 0s: must be 1s to 1d",
            ),
            ("container_names_retry = \"soon\"", "(write e.g. 1m)"),
            (
                "max_container_names = 0",
                "invalid max_container_names (--max-container-names): 0: must be 1 to 1000000",
            ),
        ] {
            let file = FileConfig::parse(text).unwrap();
            let e = DaemonArgs::default()
                .resolve(&file.daemon)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
