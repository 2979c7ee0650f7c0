//! qtrace's own accounting: what the programs lost or could not track ([`SelfStat`]), counted
//! per CPU. A leaf module: the counting ([`crate::account`]) and the kernel reads
//! ([`crate::kernel`]) both record here, and neither imports the other for it.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use qtrace_common::SelfStat;

#[map]
static QT_SELF_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SelfStat::COUNT as u32, 0);

#[inline(always)]
pub fn self_stat(stat: SelfStat) {
    if let Some(v) = QT_SELF_STATS.get_ptr_mut(stat as u32) {
        unsafe { *v += 1 };
    }
}
