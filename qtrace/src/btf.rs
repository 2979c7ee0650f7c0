//! The running kernel's BTF: struct member offsets and function prototypes.
//!
//! qtrace compiles no kernel struct layout in. Everything the programs read is located here
//! and handed to them as globals (see `qtrace_common::kernel`).

use std::{fs::File, os::unix::fs::FileExt, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use btfparse::{Integer32Value, Integer64Value, Offset, Readable, TypeInformation, TypeVariant};
use qtrace_common::{HookLayout, Offsets};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

struct BtfFile(File);

impl Readable for BtfFile {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        self.0.read_exact_at(buffer, offset).map_err(Into::into)
    }
}

pub struct KernelBtf {
    types: TypeInformation,
}

impl KernelBtf {
    /// Parses the running kernel's BTF.
    pub fn load() -> Result<Self> {
        Self::from_file(Path::new(VMLINUX_BTF)).with_context(|| {
            format!(
                "kernel BTF not readable at {VMLINUX_BTF}: qtrace needs a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu, RHEL and Fedora kernels since 5.x have it)"
            )
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let types = TypeInformation::new(&BtfFile(file))
            .map_err(|e| anyhow!("parse {}: {e:?}", path.display()))?;
        Ok(Self { types })
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
        match self.types.from_id(self.types.id_of(ty)?)? {
            TypeVariant::Enum(e) => e
                .named_value_list()
                .iter()
                .find(|v| v.name == name)
                .map(|v| match v.value {
                    Integer32Value::Signed(s) => s as u64,
                    Integer32Value::Unsigned(u) => u as u64,
                }),
            TypeVariant::Enum64(e) => {
                e.named_value_list()
                    .iter()
                    .find(|v| v.name == name)
                    .map(|v| match v.value {
                        Integer64Value::Signed(s) => s as u64,
                        Integer64Value::Unsigned(u) => u,
                    })
            }
            _ => None,
        }
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
        Ok(Offsets {
            skc_daddr: skc("skc_daddr")?,
            skc_rcv_saddr: skc("skc_rcv_saddr")?,
            skc_dport: skc("skc_dport")?,
            skc_num: skc("skc_num")?,
            skc_family: skc("skc_family")?,
            skc_net: skc("skc_net")?,
            skc_v6_daddr: skc("skc_v6_daddr")?,
            skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
            net_ns_inum: self.offset("net", "ns.inum")?,
            net_syncookies: self.offset("net", "ipv4.sysctl_tcp_syncookies")?,
            net_abort_on_overflow: self.offset("net", "ipv4.sysctl_tcp_abort_on_overflow")?,
            sk_drops: self.offset("sock", "sk_drops")?,
            sk_ack_backlog: self.offset("sock", "sk_ack_backlog")?,
            sk_max_ack_backlog: self.offset("sock", "sk_max_ack_backlog")?,
            icsk_synq_len: self.offset("inet_connection_sock", "icsk_accept_queue.qlen")?,
            req_num_retrans: self.offset("request_sock", "num_retrans")?,
            skb_head: self.offset("sk_buff", "head")?,
            skb_network_header: self.offset("sk_buff", "network_header")?,
            skb_transport_header: self.offset("sk_buff", "transport_header")?,
        })
    }

    /// Prototype facts the programs need at run time.
    pub fn hook_layout(&self) -> HookLayout {
        HookLayout {
            drop_reason_listen_overflow: self.listen_overflow_drop_reason().map_or(0, |v| v as u32),
            _pad: 0,
        }
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
