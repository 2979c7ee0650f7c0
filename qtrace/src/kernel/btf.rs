//! The running kernel's BTF: struct member offsets and function prototypes.
//!
//! qtrace compiles no kernel struct layout in. Everything the programs read is located here
//! and handed to them as globals (see `qtrace_common::kernel`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use qtrace_common::{kernel::SOCK_KEY_HEAD, ClientOffsets, HookLayout, Offsets};

/// What qtrace needs when the BTF at `path` cannot be read or parsed.
fn unusable(path: &Path) -> String {
    format!(
        "kernel BTF not readable at {}: qtrace needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu, RHEL and Fedora kernels since 5.x have it), \
         or the kernel's BTF in a file given with --btf",
        path.display()
    )
}

/// The BTF kinds qtrace reads (`BTF_KIND_*` of the kernel's uapi `linux/btf.h`).
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
    /// The last kind this reader knows the size of; a newer one stops the walk with an error
    /// rather than a misreading.
    pub const LAST: u32 = ENUM64;
}

/// The kernel's BTF, read once and walked in place.
///
/// qtrace asks a few dozen questions of it (member offsets, arities, enumerators) before
/// loading its programs. It keeps the bytes and where each type starts, and answers each
/// question by scanning: about 10 ms in all for a 150,000-type kernel, where building a typed
/// model of every type (the btfparse crate, used before) took 300 ms and tens of MB, paid at
/// every start, in every test, and 20 times over under the test matrix's emulation.
pub struct KernelBtf {
    bytes: Vec<u8>,
    /// Where type id `i + 1`'s record starts in `bytes` (id 0 is void).
    starts: Vec<u32>,
    strings: std::ops::Range<usize>,
}

/// One type record: its kind, `size`/`type` word and the trailing items.
#[derive(Clone, Copy)]
struct Ty<'a> {
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    size_or_type: u32,
    /// The bytes after the 12-byte header (members, parameters, enumerators...).
    rest: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl KernelBtf {
    /// Reads and indexes the kernel's BTF at `path` (normally [`crate::config::VMLINUX_BTF`]).
    pub fn load(path: &Path) -> Result<KernelBtf> {
        let bytes = crate::inputs::read_regular(path, crate::inputs::MAX_BTF_BYTES)
            .with_context(|| unusable(path))?;
        Self::parse(bytes)
            .with_context(|| format!("parse {}", path.display()))
            .with_context(|| unusable(path))
    }

    fn parse(bytes: Vec<u8>) -> Result<KernelBtf> {
        let word = |at| u32_at(&bytes, at).context("shorter than a BTF header");
        let magic = u16::from_le_bytes([
            bytes.first().copied().unwrap_or(0),
            bytes.get(1).copied().unwrap_or(0),
        ]);
        if magic != 0xeb9f {
            bail!("not little-endian BTF (magic {magic:#06x}, expected 0xeb9f)");
        }
        let hdr_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let types = hdr_len + type_off..hdr_len + type_off + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types.end > bytes.len() || strings.end > bytes.len() {
            bail!("its sections run past the end of the file");
        }
        let mut starts = Vec::with_capacity(type_len / 16);
        let mut at = types.start;
        while at < types.end {
            let info = word(at + 4)?;
            let (k, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let items = match k {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
                kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
                k if k <= kind::LAST => 0,
                k => bail!(
                    "type {} has kind {k}, newer than this qtrace knows",
                    starts.len() + 1
                ),
            };
            starts.push(at as u32);
            at += 12 + items;
        }
        if at != types.end {
            bail!("its last type runs past the type section");
        }
        Ok(KernelBtf {
            bytes,
            starts,
            strings,
        })
    }

    /// The file's bytes, for aya's own parse (attaching needs aya's `Btf`).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// That the BTF at `path` can be opened, with [`Self::load`]'s message if not: the check
    /// left when a running qtrace's attached probes have shown its BTF parses.
    pub fn check_readable(path: &Path) -> Result<()> {
        std::fs::File::open(path)
            .map(drop)
            .with_context(|| unusable(path))
    }

    fn ty(&self, id: u32) -> Option<Ty<'_>> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)? as usize;
        let info = u32_at(&self.bytes, at + 4)?;
        Some(Ty {
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            vlen: (info & 0xffff) as usize,
            size_or_type: u32_at(&self.bytes, at + 8)?,
            rest: self.bytes.get(at + 12..)?,
        })
    }

    /// The NUL-terminated string at `off` in the string section.
    fn name(&self, off: u32) -> &[u8] {
        let s = &self.bytes[self.strings.clone()];
        let tail = s.get(off as usize..).unwrap_or_default();
        &tail[..tail.iter().position(|&b| b == 0).unwrap_or(tail.len())]
    }

    /// The first type of one of `kinds` named `name`.
    fn id_of(&self, name: &str, kinds: &[u32]) -> Option<u32> {
        // The kind first: one word, and most types are not of the kinds asked for.
        let found = self.starts.iter().position(|&at| {
            let at = at as usize;
            u32_at(&self.bytes, at + 4).is_some_and(|info| kinds.contains(&((info >> 24) & 0x1f)))
                && u32_at(&self.bytes, at).is_some_and(|off| self.name(off) == name.as_bytes())
        })?;
        Some(found as u32 + 1)
    }

    /// `id` with typedefs and qualifiers stripped.
    fn resolve(&self, mut id: u32) -> Option<Ty<'_>> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset of member `name` of the struct or union `t`, looking inside its anonymous
    /// members, and the member's type and bitfield size (0 if none).
    fn member(&self, t: Ty<'_>, name: &[u8]) -> Option<(u32, u32, u32)> {
        if t.kind != kind::STRUCT && t.kind != kind::UNION {
            return None;
        }
        (0..t.vlen).find_map(|i| {
            let m = &t.rest[12 * i..];
            let (m_name, m_type, m_off) = (u32_at(m, 0)?, u32_at(m, 4)?, u32_at(m, 8)?);
            let (bits, size) = if t.kind_flag {
                (m_off & 0xff_ffff, m_off >> 24)
            } else {
                (m_off, 0)
            };
            if m_name != 0 {
                return (self.name(m_name) == name).then_some((bits, m_type, size));
            }
            let (inner, ty, size) = self.member(self.resolve(m_type)?, name)?;
            Some((bits + inner, ty, size))
        })
    }

    /// Byte offset of `path` (dotted, through anonymous unions) inside struct `ty`.
    pub fn offset(&self, ty: &str, path: &str) -> Result<u32> {
        let id = self
            .id_of(ty, &[kind::STRUCT, kind::UNION])
            .with_context(|| format!("struct {ty} is not in the kernel's BTF"))?;
        let mut t = self.resolve(id);
        let mut bits = 0;
        for step in path.split('.') {
            let (off, member_ty, size) = t
                .and_then(|t| self.member(t, step.as_bytes()))
                .with_context(|| format!("{ty}.{path} is not in the kernel's BTF"))?;
            if size != 0 || off % 8 != 0 {
                bail!("{ty}.{path} is a bitfield");
            }
            bits += off;
            t = self.resolve(member_ty);
        }
        Ok(bits / 8)
    }

    /// Number of parameters of kernel function `name`, if BTF describes it.
    pub fn func_params(&self, name: &str) -> Option<usize> {
        let func = self.ty(self.id_of(name, &[kind::FUNC])?)?;
        self.proto_params(func.size_or_type)
    }

    /// Number of arguments of tracepoint `name` (without the context pointer), from its
    /// `btf_trace_<name>` typedef.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let td = self.ty(self.id_of(&format!("btf_trace_{name}"), &[kind::TYPEDEF])?)?;
        let ptr = self.ty(td.size_or_type).filter(|t| t.kind == kind::PTR)?;
        self.proto_params(ptr.size_or_type)?.checked_sub(1)
    }

    fn proto_params(&self, proto: u32) -> Option<usize> {
        self.ty(proto)
            .filter(|t| t.kind == kind::FUNC_PROTO)
            .map(|t| t.vlen)
    }

    /// Value of enumerator `name` of enum `ty`.
    pub fn enum_value(&self, ty: &str, name: &str) -> Option<u64> {
        self.enumerator_of(self.ty(self.id_of(ty, &[kind::ENUM, kind::ENUM64])?)?, name)
    }

    /// Value of enumerator `name` of any enum, named or not (the SNMP counters' enum has no
    /// name).
    pub fn enumerator(&self, name: &str) -> Option<u64> {
        (1..=self.starts.len() as u32).find_map(|id| self.enumerator_of(self.ty(id)?, name))
    }

    /// Value of enumerator `name` if `t` is an enum that has it (signed per the kind flag, as
    /// the kernel stores it: sign-extended to 64 bits).
    fn enumerator_of(&self, t: Ty<'_>, name: &str) -> Option<u64> {
        let stride = match t.kind {
            kind::ENUM => 8,
            kind::ENUM64 => 12,
            _ => return None,
        };
        (0..t.vlen).find_map(|i| {
            let e = &t.rest[stride * i..];
            if self.name(u32_at(e, 0)?) != name.as_bytes() {
                return None;
            }
            let lo = u32_at(e, 4)?;
            Some(if stride == 12 {
                (u64::from(u32_at(e, 8)?) << 32) | u64::from(lo)
            } else if t.kind_flag {
                lo as i32 as i64 as u64
            } else {
                u64::from(lo)
            })
        })
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

/// Checked against this machine's own `/sys/kernel/btf/vmlinux`, with `bpftool`'s reading of
/// the same file as the independent witness.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VMLINUX_BTF;
    use std::{process::Command, sync::OnceLock};

    fn kernel() -> &'static KernelBtf {
        static K: OnceLock<KernelBtf> = OnceLock::new();
        K.get_or_init(|| KernelBtf::load(Path::new(VMLINUX_BTF)).unwrap())
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

    /// A damaged file is an error naming what is wrong, never a panic or a misreading: cut
    /// short anywhere, or with a type of a kind newer than this reader.
    #[test]
    fn damaged_btf_is_a_clear_error() {
        let whole = std::fs::read(VMLINUX_BTF).unwrap();
        let err = |bytes: Vec<u8>| format!("{:#}", KernelBtf::parse(bytes).err().unwrap());
        assert!(err(Vec::new()).contains("not little-endian BTF"));
        assert!(err(whole[..10].to_vec()).contains("shorter than a BTF header"));
        for cut in [24, 1000, whole.len() / 2, whole.len() - 1] {
            assert!(
                err(whole[..cut].to_vec()).contains("past the end"),
                "cut at {cut}"
            );
        }
        // The first type's kind set to 31.
        let mut newer = whole.clone();
        let hdr_len = u32::from_le_bytes(whole[4..8].try_into().unwrap()) as usize;
        let first = hdr_len + u32::from_le_bytes(whole[8..12].try_into().unwrap()) as usize;
        newer[first + 7] |= 0x1f;
        assert!(err(newer).contains("newer than this qtrace knows"));
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
