//! qtrace's wire types: everything it writes for machines (JSON Lines on stdout, the events
//! socket, /api/listeners, the ready line) is one of these, with `Serialize` and `Deserialize`
//! both, so the commands that read qtrace's own output (`top`, `doctor`, `events`) read it
//! typed. Names of counters and event kinds come from [`qtrace_common::vocabulary`].
//!
//! Contract: plain data and its (de)serialization; imports `qtrace_common` and
//! [`crate::listener`] only.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use qtrace_common::{vocabulary::UNCLASSIFIED, ClientCounter, Counter, EventKind, SelfStat};
use serde::{de, ser::SerializeMap, Deserialize, Deserializer, Serialize, Serializer};

pub use crate::listener::{Family, ListenerId};

/// An attach tier, best first.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Fentry, Tier::Kprobe, Tier::Tracepoint];
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Fentry => "fentry",
            Tier::Kprobe => "kprobe",
            Tier::Tracepoint => "tracepoint",
        })
    }
}

/// How one probe area ended up attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub probe: String,
    /// None: unavailable on this kernel.
    pub tier: Option<Tier>,
    pub hooks: Vec<String>,
    /// Why better tiers (or all tiers) failed.
    pub fallbacks: Vec<String>,
}

/// The first line of `qtrace run --print --json`: where it serves, and each probe's tier.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename = "ready")]
pub struct Ready {
    pub listen: SocketAddr,
    pub probes: Vec<ProbeStatus>,
}

/// `qtrace probes --json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbesReport {
    pub kernel: String,
    pub probes: Vec<ProbeStatus>,
}

/// The process holding a socket. A socket shared by several processes (pre-forked servers)
/// is attributed to the lowest pid, the parent in the usual case.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: i32,
    pub comm: String,
    /// The innermost systemd unit of the process's cgroup (`nginx.service`,
    /// `docker-<id>.scope`); empty outside systemd's tree.
    #[serde(default)]
    pub unit: String,
    /// The container, as Kubernetes writes it: `<runtime>://<id>` (`containerd://…`,
    /// `docker://…`, `cri-o://…`, `podman://…`); empty outside a container.
    #[serde(default)]
    pub container_id: String,
    /// The container's name from its runtime: Kubernetes' container name in its pod, else
    /// Docker's, Podman's or nerdctl's name; empty until the runtime has answered, or where
    /// none knows it.
    #[serde(default)]
    pub container: String,
    /// The Kubernetes pod and its namespace (the labels kubelet sets on the container).
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub pod_namespace: String,
    /// The listener's network namespace by name: its `ip netns` name, else (outside the
    /// host's namespace) `<pod_namespace>/<pod>` or the container's name.
    #[serde(default)]
    pub netns_name: String,
}

impl Owner {
    /// Who this is, as a person names it: `<pod_namespace>/<pod>/<container>`, else the
    /// container's name, else the systemd unit, else the command.
    pub fn workload(&self) -> String {
        if !self.pod.is_empty() {
            let mut w = format!("{}/{}", self.pod_namespace, self.pod);
            if !self.container.is_empty() {
                w = format!("{w}/{}", self.container);
            }
            w
        } else if !self.container.is_empty() {
            self.container.clone()
        } else if !self.unit.is_empty() {
            self.unit.clone()
        } else {
            self.comm.clone()
        }
    }
}

/// `comm[pid]`, as `ps` and the kernel's log name a process.
impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.comm, self.pid)
    }
}

/// An event as qtrace hands it on (JSON Lines, the events socket): a stable interface.
/// `owner` is filled in by the daemon when it knows the listening socket's process.
/// Only `time` and `owner` live on the heap; the rest are values that serialize to their text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `default`: read as a [`Line`], the tag is taken by the line's enum.
    #[serde(rename = "type", default)]
    pub record: EventTag,
    pub time: String,
    pub ts_ns: u64,
    #[serde(with = "kind_name")]
    pub kind: EventKind,
    pub netns: u32,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    /// The listening socket's cookie (see [`ListenerId::socket`]); absent while unknown.
    #[serde(
        skip_serializing_if = "crate::listener::is_unknown",
        default,
        with = "crate::listener::socket_hex"
    )]
    pub socket: u64,
    /// The client; absent from `drop_unclassified` events, which stand for many drops.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub raddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rport: Option<u16>,
    /// `drop_unclassified` only: how many drops since the last such event of the listener.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub drops: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retransmit: Option<u8>,
    pub acceptq_len: u32,
    pub acceptq_max: u32,
    pub synq_len: u32,
    pub synq_max: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    /// Shared with the daemon's owner cache: an event does not copy its strings.
    pub owner: Option<Arc<Owner>>,
}

impl Event {
    /// The listener the event happened at.
    pub fn listener(&self) -> ListenerId {
        ListenerId {
            netns: self.netns,
            addr: self.laddr,
            port: self.lport,
            socket: self.socket,
        }
    }
}

/// `"type": "event"`, which sets events apart from the other lines of the events socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventTag {
    #[default]
    Event,
}

/// The kind whose name is `name` (`--kind`, JSON), or an error listing the names. The names
/// drop kinds had before the vocabulary was unified are accepted too.
pub fn parse_kind(name: &str) -> Result<EventKind, String> {
    let kinds = (1..=u8::MAX).map_while(EventKind::from_u8);
    kinds
        .clone()
        .find(|k| k.name() == name || k.old_name() == Some(name))
        .ok_or_else(|| {
            let known: Vec<_> = kinds.map(EventKind::name).collect();
            format!("unknown event kind; known: {}", known.join(", "))
        })
}

/// An [`EventKind`] as its stable name in JSON.
mod kind_name {
    use qtrace_common::EventKind;
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kind: &EventKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EventKind, D::Error> {
        struct Name;
        impl de::Visitor<'_> for Name {
            type Value = EventKind;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event kind name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EventKind, E> {
                super::parse_kind(v).map_err(E::custom)
            }
        }
        d.deserialize_str(Name)
    }
}

/// A list of [`EventKind`]s as their names in JSON.
mod kind_names {
    use qtrace_common::EventKind;
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kinds: &[EventKind], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(kinds.iter().map(|k| k.name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EventKind>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| super::parse_kind(n).map_err(de::Error::custom))
            .collect()
    }
}

/// Which events a reader wants; every given condition must hold. `qtrace events` takes it as
/// flags and sends it with its request: the daemon queues for each reader only the events its
/// filter admits, so a reader's bounded queue, and the gaps it is told of, are its own events'
/// (a burst in another namespace costs a `--netns` reader nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct EventFilter {
    /// Listener port (repeatable).
    #[arg(long)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<u16>,
    /// Listener address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    /// Event kind (repeatable): drop_syn_queue_full, drop_accept_queue_full_syn,
    /// drop_accept_queue_full_ack, drop_other, synack_retransmit, overflow_reset, syncookie_sent;
    /// on the client side connect_no_port, connect_refused, connect_timed_out, connect_reset,
    /// connect_other, connect_aborted, syn_retransmit.
    #[arg(long, value_parser = parse_kind)]
    #[serde(skip_serializing_if = "Vec::is_empty", with = "kind_names")]
    pub kind: Vec<EventKind>,
    /// Network namespace inode.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// Owning process id of the listener.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Owning process name of the listener.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Kubernetes pod of the listener's owner: its name, or NAMESPACE/NAME.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Container of the listener's owner: its name, its id (or the id's first 12 or more
    /// hex digits), or <runtime>://<id>.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// systemd unit of the listener's owner (the innermost, e.g. nginx.service).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

impl EventFilter {
    /// No condition: every event.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Every condition, the owner's too: a daemon's record.
    pub fn admits(&self, e: &Event) -> bool {
        self.admits_at(e.netns, e.laddr, e.lport, e.kind, e.owner.as_deref())
    }

    /// Every condition, on an event's parts (the owner is the daemon's knowledge).
    pub fn admits_at(
        &self,
        netns: u32,
        addr: IpAddr,
        port: u16,
        kind: EventKind,
        owner: Option<&Owner>,
    ) -> bool {
        self.admits_listener(netns, addr, port, kind)
            && self.pid.is_none_or(|p| owner.is_some_and(|o| o.pid == p))
            && self
                .comm
                .as_ref()
                .is_none_or(|c| owner.is_some_and(|o| o.comm == *c))
            && self.admits_workload(owner)
    }

    /// The conditions that need no owner.
    pub fn admits_listener(&self, netns: u32, addr: IpAddr, port: u16, kind: EventKind) -> bool {
        (self.port.is_empty() || self.port.contains(&port))
            && self.addr.is_none_or(|a| a == addr)
            && (self.kind.is_empty() || self.kind.contains(&kind))
            && self.netns.is_none_or(|n| n == netns)
    }

    /// The workload filters (`--pod`, `--container`, `--unit`).
    fn admits_workload(&self, o: Option<&Owner>) -> bool {
        // NAMESPACE/NAME compared in place: the daemon judges every event for every reader.
        let pod = |want: &str, o: &Owner| {
            !o.pod.is_empty()
                && (o.pod == want || want.split_once('/') == Some((&o.pod_namespace, &o.pod)))
        };
        let container = |want: &str, o: &Owner| {
            let id = o.container_id.split_once("://").map_or("", |(_, id)| id);
            (!o.container.is_empty() && o.container == want)
                || (!o.container_id.is_empty() && o.container_id == want)
                || (want.len() >= 12 && id.starts_with(want))
        };
        self.pod
            .as_deref()
            .is_none_or(|p| o.is_some_and(|o| pod(p, o)))
            && self
                .container
                .as_deref()
                .is_none_or(|c| o.is_some_and(|o| container(c, o)))
            && self
                .unit
                .as_deref()
                .is_none_or(|u| o.is_some_and(|o| !o.unit.is_empty() && o.unit == u))
    }

    /// Whether any condition needs the owner, which only the daemon knows.
    pub fn needs_owner(&self) -> bool {
        self.pid.is_some()
            || self.comm.is_some()
            || self.pod.is_some()
            || self.container.is_some()
            || self.unit.is_some()
    }
}

/// What a client asks the daemon's events socket, as one JSON line.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "lowercase")]
pub enum Request {
    Events {
        #[serde(default)]
        since_ns: u64,
        /// Only the events this admits, and gaps counted among them; absent: every event.
        #[serde(default, skip_serializing_if = "EventFilter::is_empty")]
        filter: EventFilter,
    },
    Listeners,
}

/// A line the daemon writes to an events reader.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Line {
    Event(Event),
    /// The reader fell behind and lost this many events.
    Gap {
        missed: u64,
    },
    /// This many of the events a reader asked for with `since_ns` are no longer kept (the
    /// daemon keeps its last 4,096): first, before the ones that are. `bound`: the request
    /// reached back past what the daemon keeps of the trimmed ones, so `missed` is at most
    /// that many (it counts all of those older ones, of every kind and namespace).
    Trimmed {
        missed: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        bound: bool,
    },
    /// The daemon refused the request (a malformed line, an unknown kind or filter field):
    /// the last line it writes.
    Error {
        message: String,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A listener's counters by their [`Counter::name`]: `None` (JSON `null`) for what no
/// attached probe sees, never 0; and, only where a probe that classifies drops is missing,
/// `drop_unclassified` ([`UNCLASSIFIED`]): drops the listener counted that no probe classified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub kernel: [Option<u64>; Counter::COUNT],
    pub unclassified: Option<u64>,
}

impl Counters {
    pub fn get(&self, c: Counter) -> Option<u64> {
        self.kernel[c as usize]
    }
}

impl Serialize for Counters {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for c in Counter::ALL {
            m.serialize_entry(c.name(), &self.get(c))?;
        }
        if let Some(n) = self.unclassified {
            m.serialize_entry(UNCLASSIFIED.key, &n)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Counters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Keys this version does not know are skipped: a newer daemon may count more.
        let map = BTreeMap::<String, Option<u64>>::deserialize(d)?;
        let mut out = Counters::default();
        for c in Counter::ALL {
            out.kernel[c as usize] = map.get(c.name()).copied().flatten();
        }
        out.unclassified = map.get(UNCLASSIFIED.key).copied().flatten();
        Ok(out)
    }
}

/// The accept-queue wait histogram.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AcceptWait {
    pub count: u64,
    pub sum_seconds: f64,
    /// Cumulative counts by upper bound in seconds, as Prometheus buckets.
    pub buckets: Vec<(f64, u64)>,
}

/// A listener's queues, sampled with sock_diag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queues {
    pub accept_len: u32,
    pub accept_limit: u32,
    pub syn_len: u32,
}

/// What the last hour (or as much of it as the daemon has seen) says about one listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastHour {
    /// Time covered by the samples: samples × interval, at most an hour.
    pub sampled_seconds: f64,
    pub samples: u32,
    /// Share of the samples in which the accept queue was at its limit.
    pub accept_queue_at_limit: f64,
    /// Drops of every reason the kernel programs counted in that time.
    pub drops: u64,
}

/// One listener in a [`Listeners`] snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listener {
    pub netns: u32,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    /// The socket's cookie (see [`ListenerId::socket`]); absent from a table of the kernel's
    /// counters alone (`run --print`), which sums each address's sockets.
    #[serde(
        skip_serializing_if = "crate::listener::is_unknown",
        default,
        with = "crate::listener::socket_hex"
    )]
    pub socket: u64,
    pub counters: Counters,
    /// None when the accept probe is not attached.
    pub accept_wait: Option<AcceptWait>,
    /// None when the listener is closed or its namespace was not readable (and in the
    /// `run --print` table, which reads only the kernel's counters).
    #[serde(default)]
    pub queues: Option<Queues>,
    #[serde(default)]
    pub owner: Option<Owner>,
    /// Only from a daemon that samples queues (not `--standalone`, not `run --print`).
    #[serde(default)]
    pub last_hour: Option<LastHour>,
}

impl Listener {
    pub fn id(&self) -> ListenerId {
        ListenerId {
            netns: self.netns,
            addr: self.addr,
            port: self.port,
            socket: self.socket,
        }
    }
}

/// qtrace's own losses by [`SelfStat`] name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelfStats(pub [u64; SelfStat::COUNT]);

impl Serialize for SelfStats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(SelfStat::COUNT))?;
        for st in SelfStat::ALL {
            m.serialize_entry(st.name(), &self.0[st as usize])?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for SelfStats {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, u64>::deserialize(d)?;
        let mut out = SelfStats::default();
        for st in SelfStat::ALL {
            out.0[st as usize] = map.get(st.name()).copied().unwrap_or(0);
        }
        Ok(out)
    }
}

/// The one listener snapshot, `"type": "listeners"`: /api/listeners, the events socket's
/// answer to `{"request":"listeners"}`, `top --standalone`, and the periodic table of
/// `qtrace run --print --json`. Fields a producer does not have are absent (or null).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Listeners {
    #[serde(rename = "type", default)]
    pub tag: ListenersTag,
    /// `run --print --json` only: the table written at exit.
    #[serde(rename = "final", default, skip_serializing_if = "Option::is_none")]
    pub last: Option<bool>,
    /// How often the daemon samples queues for `last_hour`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_sample_interval_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeStatus>,
    pub listeners: Vec<Listener>,
    /// Network namespaces whose queues could not be sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_unreadable: Option<usize>,
    /// `run --print --json` only: qtrace's own losses.
    #[serde(rename = "self", default, skip_serializing_if = "Option::is_none")]
    pub self_stats: Option<SelfStats>,
    /// The daemon's only: the client side (connect() failures, census of connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<ClientSide>,
}

/// `"type": "listeners"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenersTag;

impl Serialize for ListenersTag {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("listeners")
    }
}

impl<'de> Deserialize<'de> for ListenersTag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let tag = String::deserialize(d)?;
        if tag == "listeners" {
            Ok(ListenersTag)
        } else {
            Err(de::Error::custom(format!(
                "expected a listeners snapshot, got type {tag}"
            )))
        }
    }
}

impl Listeners {
    /// The snapshot's listeners by their id.
    pub fn by_id(&self) -> BTreeMap<ListenerId, &Listener> {
        self.listeners.iter().map(|l| (l.id(), l)).collect()
    }
}

/// The client side in the listener snapshot (`clients`): connect() failures per destination,
/// and each namespace's census of connections. Absent where the producer has none (`top
/// --standalone`, `run --print`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientSide {
    /// Per (namespace, process, destination); null where the client probe is not attached
    /// (unavailable, not empty).
    pub destinations: Option<Vec<Destination>>,
    /// Destinations past `--max-destination-series`, left out of `destinations`.
    #[serde(default)]
    pub destinations_folded: usize,
    #[serde(default)]
    pub census: Vec<NetnsCensus>,
}

/// One destination of one process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    pub netns: u32,
    pub pid: u32,
    pub comm: String,
    pub addr: IpAddr,
    pub port: u16,
    /// By the vocabulary's names: `connect_<reason>` (`connect_no_port`, …) and
    /// `syn_retransmits`.
    pub counters: BTreeMap<String, u64>,
}

impl Destination {
    pub fn get(&self, c: ClientCounter) -> u64 {
        self.counters.get(c.name()).copied().unwrap_or(0)
    }
}

/// One namespace's connections now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetnsCensus {
    pub netns: u32,
    pub time_wait: u64,
    pub close_wait: u64,
    /// `net.ipv4.tcp_max_tw_buckets`.
    pub time_wait_limit: Option<u64>,
    /// `ip_local_port_range` as the namespace has it.
    pub port_range: Option<(u16, u16)>,
    /// `ip_local_port_range` minus `ip_local_reserved_ports`.
    pub ports_available: Option<u64>,
    /// `net.ipv4.tcp_tw_reuse` (0, 1, or 2: loopback only).
    pub tw_reuse: Option<u8>,
    /// Most sockets first.
    pub close_wait_owners: Vec<CloseWaitOwner>,
    /// Most used first.
    pub ephemeral: Vec<PortUse>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloseWaitOwner {
    /// 0, with an empty name, where no process was found holding them.
    pub pid: i32,
    pub comm: String,
    pub sockets: u64,
    /// Age of the oldest, from the first sample that found it.
    pub oldest_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortUse {
    pub saddr: IpAddr,
    pub addr: IpAddr,
    pub port: u16,
    pub in_use: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_round_trips_with_unavailable_counters_as_null() {
        let mut counters = Counters::default();
        counters.kernel[Counter::DropAcceptQueueFullAck as usize] = Some(7);
        counters.unclassified = Some(3);
        let snapshot = Listeners {
            netns_unreadable: Some(0),
            listeners: vec![Listener {
                netns: 1,
                family: Family::Ipv6,
                addr: "::".parse().unwrap(),
                port: 22,
                socket: 0x1f2e,
                counters,
                accept_wait: None,
                queues: Some(Queues {
                    accept_len: 1,
                    accept_limit: 4,
                    syn_len: 0,
                }),
                owner: None,
                last_hour: None,
            }],
            ..Default::default()
        };
        let v = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(v["type"], "listeners");
        let l = &v["listeners"][0];
        assert_eq!(l["counters"]["drop_accept_queue_full_ack"], 7);
        assert!(l["counters"]["drop_syn_queue_full"].is_null(), "{l}");
        assert!(v.get("final").is_none() && v.get("self").is_none(), "{v}");
        let back: Listeners = serde_json::from_value(v).unwrap();
        assert_eq!(back, snapshot);
        assert_eq!(back.by_id().len(), 1);
        // Another line type is not a snapshot.
        assert!(serde_json::from_str::<Listeners>(r#"{"type":"ready","listeners":[]}"#).is_err());
    }

    #[test]
    fn gaps_and_ready_lines_have_their_type() {
        let gap = serde_json::to_string(&Line::Gap { missed: 7 }).unwrap();
        assert_eq!(gap, r#"{"type":"gap","missed":7}"#);
        let trimmed = serde_json::to_string(&Line::Trimmed {
            missed: 7,
            bound: false,
        })
        .unwrap();
        assert_eq!(trimmed, r#"{"type":"trimmed","missed":7}"#);
        let bound = serde_json::to_string(&Line::Trimmed {
            missed: 7,
            bound: true,
        })
        .unwrap();
        assert_eq!(bound, r#"{"type":"trimmed","missed":7,"bound":true}"#);
        let ready = Ready {
            listen: "127.0.0.1:9860".parse().unwrap(),
            probes: vec![],
        };
        assert_eq!(
            serde_json::to_string(&ready).unwrap(),
            r#"{"type":"ready","listen":"127.0.0.1:9860","probes":[]}"#
        );
    }
}
