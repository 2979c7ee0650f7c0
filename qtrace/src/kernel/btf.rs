//! The running kernel's BTF: struct member offsets and function prototypes.
//!
//! qtrace compiles no kernel struct layout in. Everything the programs read is located here
//! and handed to them as globals (see `qtrace_common::kernel`).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use btfparse::{Integer32Value, Integer64Value, Offset, Readable, TypeInformation, TypeVariant};
use qtrace_common::{kernel::SOCK_KEY_HEAD, ClientOffsets, HookLayout, Offsets};

/// The BTF blob in memory: btfparse reads it in many small pieces, and each read of the sysfs
/// file is a syscall (reading it piecemeal took seconds).
struct BtfBytes<'a>(&'a [u8]);

impl Readable for BtfBytes<'_> {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = offset as usize;
        let src = self.0.get(start..start + buffer.len()).ok_or_else(|| {
            btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )
        })?;
        buffer.copy_from_slice(src);
        Ok(())
    }
}

/// What qtrace needs when the BTF at `path` cannot be read or parsed.
fn unusable(path: &Path) -> String {
    format!(
        "kernel BTF not readable at {}: qtrace needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu, RHEL and Fedora kernels since 5.x have it), \
         or the kernel's BTF in a file given with --btf",
        path.display()
    )
}

pub struct KernelBtf {
    types: TypeInformation,
}

/// The BTF file read once, and parsed: aya parses the same bytes again its own way, for
/// attaching, so they are kept until then.
pub struct LoadedBtf {
    pub bytes: Vec<u8>,
    pub types: KernelBtf,
}

impl KernelBtf {
    /// Reads and parses the kernel's BTF at `path` (normally [`crate::config::VMLINUX_BTF`]).
    pub fn load(path: &Path) -> Result<LoadedBtf> {
        let bytes = crate::inputs::read_regular(path, crate::inputs::MAX_BTF_BYTES)
            .with_context(|| unusable(path))?;
        let types = TypeInformation::new(&BtfBytes(&bytes))
            .map_err(|e| anyhow!("parse {}: {e:?}", path.display()))
            .with_context(|| unusable(path))?;
        Ok(LoadedBtf {
            bytes,
            types: Self { types },
        })
    }

    /// That the BTF at `path` can be opened, with [`Self::load`]'s message if not: the check
    /// left when a running qtrace's attached probes have shown its BTF parses.
    pub fn check_readable(path: &Path) -> Result<()> {
        std::fs::File::open(path)
            .map(drop)
            .with_context(|| unusable(path))
    }

    /// Byte offset of `path` (dotted, through anonymous unions) inside struct `ty`.
    pub fn offset(&self, ty: &str, path: &str) -> Result<u32> {
        let id = self
            .types
            .id_of(ty)
            .ok_or_else(|| anyhow!("struct {ty} is not in the kernel's BTF"))?;
        match self.types.offset_of(id, path) {
            Ok((_, Offset::ByteOffset(off))) => Ok(off),
            Ok((_, Offset::BitOffsetAndSize(..))) => bail!("{ty}.{path} is a bitfield"),
            Err(e) => bail!("{ty}.{path} is not in the kernel's BTF: {e:?}"),
        }
    }

    /// Number of parameters of kernel function `name`, if BTF describes it.
    pub fn func_params(&self, name: &str) -> Option<usize> {
        let TypeVariant::Func(func) = self.types.from_id(self.types.id_of(name)?)? else {
            return None;
        };
        self.proto_params(*func.prototype_tid())
    }

    /// Number of arguments of tracepoint `name` (without the context pointer), from its
    /// `btf_trace_<name>` typedef.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let id = self.types.id_of(&format!("btf_trace_{name}"))?;
        let TypeVariant::Typedef(td) = self.types.from_id(id)? else {
            return None;
        };
        let TypeVariant::Ptr(ptr) = self.types.from_id(*td.tid())? else {
            return None;
        };
        self.proto_params(*ptr.tid())?.checked_sub(1)
    }

    fn proto_params(&self, proto: u32) -> Option<usize> {
        match self.types.from_id(proto)? {
            TypeVariant::FuncProto(p) => Some(p.parameter_list().len()),
            _ => None,
        }
    }

    /// Value of enumerator `name` of enum `ty`.
    pub fn enum_value(&self, ty: &str, name: &str) -> Option<u64> {
        enumerator_of(&self.types.from_id(self.types.id_of(ty)?)?, name)
    }

    /// Value of enumerator `name` of any enum, named or not (the SNMP counters' enum has no
    /// name).
    pub fn enumerator(&self, name: &str) -> Option<u64> {
        self.types
            .get()
            .values()
            .find_map(|t| enumerator_of(t, name))
    }

    /// Every offset the kernel programs use.
    pub fn offsets(&self) -> Result<Offsets> {
        // sock_common heads both struct sock and struct request_sock; the programs read it
        // through either pointer, so it must start both.
        for (ty, member) in [("sock", "__sk_common"), ("request_sock", "__req_common")] {
            let off = self.offset(ty, member)?;
            if off != 0 {
                bail!("{ty}.{member} is at offset {off}, not 0: unsupported kernel layout");
            }
        }
        let skc = |m: &str| self.offset("sock_common", m);
        // The key's fields are copied from the head of sock_common in one read.
        for (member, size) in [
            ("skc_rcv_saddr", 4),
            ("skc_num", 2),
            ("skc_family", 2),
            ("skc_net", 8),
            ("skc_v6_rcv_saddr", 16),
            ("skc_cookie", 8),
        ] {
            let end = skc(member)? + size;
            if end > SOCK_KEY_HEAD {
                bail!(
                    "sock_common.{member} ends at byte {end}, beyond the {SOCK_KEY_HEAD} bytes \
                     qtrace reads: unsupported kernel layout"
                );
            }
        }
        Ok(Offsets {
            skc_daddr: skc("skc_daddr")?,
            skc_rcv_saddr: skc("skc_rcv_saddr")?,
            skc_dport: skc("skc_dport")?,
            skc_num: skc("skc_num")?,
            skc_family: skc("skc_family")?,
            skc_state: skc("skc_state")?,
            skc_net: skc("skc_net")?,
            skc_v6_daddr: skc("skc_v6_daddr")?,
            skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
            skc_cookie: skc("skc_cookie")?,
            net_ns_inum: self.offset("net", "ns.inum")?,
            net_syncookies: self.offset("net", "ipv4.sysctl_tcp_syncookies")?,
            net_abort_on_overflow: self.offset("net", "ipv4.sysctl_tcp_abort_on_overflow")?,
            net_cookie: self.offset("net", "net_cookie").unwrap_or(0),
            sk_drops: self.offset("sock", "sk_drops")?,
            sk_ack_backlog: self.offset("sock", "sk_ack_backlog")?,
            sk_max_ack_backlog: self.offset("sock", "sk_max_ack_backlog")?,
            sk_socket: self.offset("sock", "sk_socket")?,
            sk_uid: self.offset("sock", "sk_uid")?,
            socket_ino: self.socket_ino().unwrap_or(0),
            icsk_synq_len: self.offset("inet_connection_sock", "icsk_accept_queue.qlen")?,
            tcp_rcvq_time: self.offset("tcp_sock", "rcvq_space.time")?,
            req_num_retrans: self.offset("request_sock", "num_retrans")?,
            skb_head: self.offset("sk_buff", "head")?,
            skb_network_header: self.offset("sk_buff", "network_header")?,
            skb_transport_header: self.offset("sk_buff", "transport_header")?,
        })
    }

    /// From a `struct socket` to its inode's number: `SOCK_INODE()` is the `vfs_inode` beside
    /// the socket in `struct socket_alloc`.
    fn socket_ino(&self) -> Result<u32> {
        let inode = self.offset("socket_alloc", "vfs_inode")?;
        let socket = self.offset("socket_alloc", "socket")?;
        let ino = self.offset("inode", "i_ino")?;
        Ok(inode - socket + ino)
    }

    /// The members only the client probe reads; an error names the one this kernel lacks
    /// (`sk_protocol` is a bitfield before 5.6).
    pub fn client_offsets(&self) -> Result<ClientOffsets> {
        Ok(ClientOffsets {
            sk_err: self.offset("sock", "sk_err")?,
            sk_protocol: self.offset("sock", "sk_protocol")?,
            sk_err_soft: self.offset("sock", "sk_err_soft")?,
            sk_error_queue: self.offset("sock", "sk_error_queue.next")?,
            skb_ee: self.offset("sk_buff", "cb")? + self.offset("sock_exterr_skb", "ee")?,
            inet_sport: self.offset("inet_sock", "inet_sport")?,
            task_group_leader: self.offset("task_struct", "group_leader")?,
            task_comm: self.offset("task_struct", "comm")?,
            tcp_bytes_received: self.offset("tcp_sock", "bytes_received")?,
        })
    }

    /// Prototype facts the programs need at run time.
    pub fn hook_layout(&self) -> HookLayout {
        HookLayout {
            drop_reason_listen_overflow: self.listen_overflow_drop_reason().map_or(0, |v| v as u32),
            syn_decisions_hooked: self.syn_decision_functions().is_some().into(),
            drop_reason_no_socket: self
                .enum_value("skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET")
                .map_or(0, |v| v as u32),
            ..self.listen_mib()
        }
    }

    /// Where this CPU's ListenOverflows and ListenDrops are found (`mib_listen_overflows`,
    /// `net_mib`, `array_pptrs`), all 0 unless BTF places every part, with ListenDrops right
    /// after ListenOverflows (read as one pair).
    fn listen_mib(&self) -> HookLayout {
        let found = || -> Option<HookLayout> {
            let overflows = self.enumerator("LINUX_MIB_LISTENOVERFLOWS")?;
            let drops = self.enumerator("LINUX_MIB_LISTENDROPS")?;
            (overflows > 0 && drops == overflows + 1).then_some(())?;
            Some(HookLayout {
                // `struct linux_mib` is an array of unsigned longs.
                mib_listen_overflows: overflows as u32 * 8,
                net_mib: self.offset("net", "mib.net_statistics").ok()?,
                array_pptrs: self.offset("bpf_array", "pptrs").ok()?,
                ..HookLayout::default()
            })
        };
        found().unwrap_or_default()
    }

    /// The functions where the kernel decides "SYN queue full" and "send a syncookie", when
    /// this kernel has them out of line (they are static and could be inlined):
    /// `tcp_syn_flood_action` and the `cookie_v*_init_sequence` it has.
    pub fn syn_decision_functions(&self) -> Option<(&'static str, Vec<&'static str>)> {
        self.func_params("tcp_syn_flood_action")?;
        let cookies: Vec<_> = ["cookie_v4_init_sequence", "cookie_v6_init_sequence"]
            .into_iter()
            .filter(|f| self.func_params(f).is_some())
            .collect();
        (!cookies.is_empty()).then_some(("tcp_syn_flood_action", cookies))
    }

    /// `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW`, when the kernel both has it and passes the
    /// receiving socket to `skb:kfree_skb` (which names the listener).
    pub fn listen_overflow_drop_reason(&self) -> Option<u64> {
        if self.tracepoint_args("kfree_skb")? < 4 {
            return None;
        }
        self.enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
    }
}

/// Value of enumerator `name` if `t` is an enum that has it.
fn enumerator_of(t: &TypeVariant, name: &str) -> Option<u64> {
    match t {
        TypeVariant::Enum(e) => {
            e.named_value_list()
                .iter()
                .find(|v| v.name == name)
                .map(|v| match v.value {
                    Integer32Value::Signed(s) => s as u64,
                    Integer32Value::Unsigned(u) => u as u64,
                })
        }
        TypeVariant::Enum64(e) => e
            .named_value_list()
            .iter()
            .find(|v| v.name == name)
            .map(|v| match v.value {
                Integer64Value::Signed(s) => s as u64,
                Integer64Value::Unsigned(u) => u,
            }),
        _ => None,
    }
}

/// Checked against this machine's own `/sys/kernel/btf/vmlinux`, with `bpftool`'s reading of
/// the same file as the independent witness.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VMLINUX_BTF;
    use std::{process::Command, sync::OnceLock};

    fn kernel() -> &'static KernelBtf {
        static K: OnceLock<KernelBtf> = OnceLock::new();
        K.get_or_init(|| KernelBtf::load(Path::new(VMLINUX_BTF)).unwrap().types)
    }

    /// `bpftool btf dump … format raw`: one `[id] KIND 'name' …` line per type, members indented.
    fn bpftool_raw() -> &'static str {
        static RAW: OnceLock<String> = OnceLock::new();
        RAW.get_or_init(|| {
            let out = Command::new("bpftool")
                .args(["btf", "dump", "file", VMLINUX_BTF, "format", "raw"])
                .output()
                .expect("bpftool (apt package bpftool; `cargo xtask setup` installs it)");
            String::from_utf8(out.stdout).unwrap()
        })
    }

    /// The lines of the first type `KIND 'name'` and its indented members.
    fn bpftool_type(kind: &str, name: &str) -> Vec<&'static str> {
        let head = format!("] {kind} '{name}' ");
        let mut lines = bpftool_raw().lines().skip_while(|l| !l.contains(&head));
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("bpftool has no {kind} {name}"));
        std::iter::once(first)
            .chain(lines.take_while(|l| l.starts_with('\t')))
            .collect()
    }

    fn field<'a>(line: &'a str, key: &str) -> &'a str {
        let start = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
        line[start..].split_whitespace().next().unwrap()
    }

    /// Byte offset of a direct member, as bpftool reads it.
    fn bpftool_offset(ty: &str, member: &str) -> u32 {
        let lines = bpftool_type("STRUCT", ty);
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("'{member}' ")))
            .unwrap_or_else(|| panic!("bpftool: no {ty}.{member}"));
        field(line, "bits_offset").parse::<u32>().unwrap() / 8
    }

    #[test]
    fn direct_members_match_bpftool() {
        let k = kernel();
        for (ty, member) in [
            ("sock", "sk_ack_backlog"),
            ("sock", "sk_max_ack_backlog"),
            ("sock", "sk_drops"),
            ("request_sock", "num_retrans"),
            ("sk_buff", "head"),
            ("inet_connection_sock", "icsk_accept_queue"),
        ] {
            assert_eq!(
                k.offset(ty, member).unwrap(),
                bpftool_offset(ty, member),
                "{ty}.{member}"
            );
        }
    }

    #[test]
    fn nested_members_add_up() {
        let k = kernel();
        let o = k.offsets().unwrap();
        // Paths through named members: the sum of each step as bpftool sees it.
        let queue = bpftool_offset("inet_connection_sock", "icsk_accept_queue");
        assert_eq!(
            o.icsk_synq_len,
            queue + bpftool_offset("request_sock_queue", "qlen")
        );
        assert_eq!(
            o.net_ns_inum,
            bpftool_offset("net", "ns") + bpftool_offset("ns_common", "inum")
        );
        // Members inside sock_common's anonymous unions, fixed by the kernel's own layout:
        // `struct { __be32 skc_daddr, skc_rcv_saddr; }` and `struct { __be16 skc_dport; __u16 skc_num; }`.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, o.skc_daddr + 4);
        assert_eq!(o.skc_num, o.skc_dport + 2);
        assert_eq!(o.skc_v6_rcv_saddr, o.skc_v6_daddr + 16);
        assert!(
            o.skc_family > o.skc_num && o.skc_net > o.skc_family,
            "{o:?}"
        );
        assert_eq!(o.sk_max_ack_backlog, o.sk_ack_backlog + 4);
    }

    #[test]
    fn function_arity_matches_bpftool() {
        let k = kernel();
        for func in [
            "tcp_v4_syn_recv_sock",
            "tcp_conn_request",
            "inet_csk_accept",
        ] {
            let proto = field(bpftool_type("FUNC", func)[0], "type_id");
            let proto_line = bpftool_raw()
                .lines()
                .find(|l| l.starts_with(&format!("[{proto}] FUNC_PROTO ")))
                .unwrap();
            let expected: usize = field(proto_line, "vlen").parse().unwrap();
            assert_eq!(k.func_params(func), Some(expected), "{func}");
        }
        assert_eq!(k.func_params("no_such_function_qtrace"), None);
    }

    #[test]
    fn listen_overflow_drop_reason_matches_bpftool() {
        let expected = bpftool_raw()
            .lines()
            .find(|l| {
                l.trim_start()
                    .starts_with("'SKB_DROP_REASON_TCP_LISTEN_OVERFLOW' ")
            })
            .map(|l| field(l, "val").parse::<u64>().unwrap());
        let k = kernel();
        assert_eq!(
            k.enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"),
            expected
        );
        assert_eq!(k.enum_value("skb_drop_reason", "NO_SUCH_REASON"), None);
    }

    /// ListenOverflows and ListenDrops side by side in the SNMP counters' enum, as bpftool
    /// reads it, and found where the per-CPU copies are.
    #[test]
    fn listen_mib_counters_match_bpftool() {
        let val = |name: &str| {
            bpftool_raw()
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("'{name}' ")))
                .map(|l| field(l, "val").parse::<u64>().unwrap())
                .unwrap()
        };
        let k = kernel();
        let overflows = val("LINUX_MIB_LISTENOVERFLOWS");
        assert_eq!(val("LINUX_MIB_LISTENDROPS"), overflows + 1);
        let h = k.hook_layout();
        assert_eq!(h.mib_listen_overflows as u64, overflows * 8);
        assert_eq!(
            h.net_mib,
            bpftool_offset("net", "mib") + bpftool_offset("netns_mib", "net_statistics")
        );
        // `pptrs` is in bpf_array's one anonymous union.
        assert_eq!(
            h.array_pptrs,
            bpftool_offset("bpf_array", "(anon)"),
            "{h:?}"
        );
        assert_eq!(k.enumerator("LINUX_MIB_NO_SUCH_COUNTER"), None);
    }

    #[test]
    fn missing_names_are_errors_that_say_which() {
        let k = kernel();
        let e = k
            .offset("sock", "sk_no_such_member")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sock.sk_no_such_member"), "{e}");
        let e = k
            .offset("no_such_struct_qtrace", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no_such_struct_qtrace"), "{e}");
    }
}
