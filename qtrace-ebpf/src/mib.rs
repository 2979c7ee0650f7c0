//! The kernel's own listen-drop counters on this CPU: ListenOverflows and ListenDrops of a
//! listener's namespace (`net->mib.net_statistics`, one copy per CPU), read before and after a
//! hooked call to tell what that call did.
//!
//! The kernel takes no lock on a listener for a SYN or a final ACK, so other CPUs drop the
//! same listener's packets, and fill or empty its accept queue, while a hooked call runs: what
//! the socket keeps (`sk_drops`, the queue lengths) moves under it. A CPU's copy of these
//! counters moves only with what that CPU does, softirqs do not nest on a CPU, and the kernel
//! counts ListenOverflows exactly when it finds the accept queue full and ListenDrops for every
//! drop at a listener (`tcp_listendrop()`): before and after on the same CPU is the kernel's
//! own verdict on this packet.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::kernel::{hook, offset, probe_read, Mem};

/// This CPU's ListenOverflows and ListenDrops of one namespace, as read at one moment.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct ListenMib {
    /// Where this CPU's ListenOverflows is (ListenDrops follows it); 0 when not found.
    addr: u64,
    /// ListenOverflows and ListenDrops there.
    at: [u64; 2],
}

impl ListenMib {
    /// This CPU's counters of `sk`'s namespace now (not found where BTF did not place them, or
    /// a read failed, which is counted).
    #[inline(always)]
    pub fn read<M: Mem>(m: M, sk: *const u8) -> Self {
        Self::find(m, sk).unwrap_or_default()
    }

    /// [`read`](Self::read)'s work. Inlined by force: as a closure LLVM made it a BPF
    /// subprogram once it grew (the offset's check), and the call, its frame and the result
    /// returned through the stack cost about 66 instructions per SYN and per final ACK at the
    /// fentry tier, more than the work itself (BENCHMARKS.md, session 19).
    #[inline(always)]
    fn find<M: Mem>(m: M, sk: *const u8) -> Result<Self, ()> {
        if hook!(mib_listen_overflows) == 0 {
            return Err(());
        }
        let cpu = QT_CPU.get_ptr_mut(0).ok_or(())?;
        let net: *const u8 = m.read(sk, offset!(skc_net))?;
        // A typed load makes it a pointer the verifier would not let this CPU's offset be
        // added to: as a number.
        let percpu = number(cpu, m.read::<u64>(net, hook!(net_mib))?);
        // A typed load that faults reads 0.
        if percpu == 0 {
            return Err(());
        }
        let addr = percpu
            .wrapping_add(cpu_offset(cpu)?)
            .wrapping_add(hook!(mib_listen_overflows) as u64);
        Ok(Self {
            addr,
            at: probe_read(addr as *const u8, 0)?,
        })
    }

    /// What the kernel counted on this CPU since `self` was read: (a drop, a full accept
    /// queue); None when `self` was not found.
    #[inline(always)]
    pub fn since(&self) -> Option<(bool, bool)> {
        if self.addr == 0 {
            return None;
        }
        let now: [u64; 2] = probe_read(self.addr as *const u8, 0).ok()?;
        Some((now[1] != self.at[1], now[0] != self.at[0]))
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Cpu {
    /// This CPU's offset into the per-CPU areas, once found; see [`cpu_offset`].
    off: u64,
    /// Where an address is stored to be read back as a number.
    scratch: u64,
}

#[map]
static QT_CPU: PerCpuArray<Cpu> = PerCpuArray::with_max_entries(1, 0);

/// A second per-CPU array, to check [`cpu_offset`] against.
#[map]
static QT_CPU_CHECK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's offset into the per-CPU areas (`__per_cpu_offset[cpu]`): the distance from a
/// per-CPU array's per-CPU pointer (`bpf_array.pptrs[0]`) to this CPU's copy of its value,
/// which a lookup returns (`cpu`). Found on the CPU's first call, checked against a second
/// array's (a wrong offset would read memory that never moves, and every drop would pass for
/// a queued SYN), and kept in that copy.
#[inline(always)]
fn cpu_offset(cpu: *mut Cpu) -> Result<u64, ()> {
    // SAFETY: this CPU's map value, written only by programs on this CPU, which do not nest
    // within one another here (softirq and process contexts each run one at a time per CPU;
    // a nested run finds `off` already set or sets the same).
    let known = unsafe { (*cpu).off };
    if known != 0 {
        return Ok(known);
    }
    let check = QT_CPU_CHECK.get_ptr_mut(0).ok_or(())?;
    let off = offset_in(cpu, addr_of!(QT_CPU) as u64, cpu as u64)?;
    if offset_in(cpu, addr_of!(QT_CPU_CHECK) as u64, check as u64)? != off {
        return Err(());
    }
    unsafe { (*cpu).off = off };
    Ok(off)
}

/// The distance from per-CPU array `array`'s per-CPU pointer to `value`, its value on this CPU.
#[inline(always)]
fn offset_in(cpu: *mut Cpu, array: u64, value: u64) -> Result<u64, ()> {
    let array = number(cpu, array);
    let pptr: u64 = probe_read(array as *const u8, hook!(array_pptrs))?;
    Ok(number(cpu, value).wrapping_sub(pptr))
}

/// `addr` as a plain number: the verifier lets a program do no arithmetic on a map's address
/// or cast it, but one stored into a map value reads back as a number for programs trusted
/// with kernel addresses (CAP_PERFMON).
#[inline(always)]
fn number(cpu: *mut Cpu, addr: u64) -> u64 {
    // SAFETY: `cpu` is this CPU's map value.
    unsafe {
        write_volatile(addr_of_mut!((*cpu).scratch), addr);
        read_volatile(addr_of!((*cpu).scratch))
    }
}
