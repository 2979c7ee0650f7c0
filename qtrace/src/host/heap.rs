//! The daemon's heap: glibc keeps freed memory for reuse; a daemon that parses tens of MB of
//! BTF once, or builds a multi-MB scrape now and then, would keep its peak for good.
//!
//! The static build (`x86_64-unknown-linux-musl`, `cargo xtask dist`) uses mimalloc instead of
//! musl's own allocator, which is slow under contention and has neither tunable: mimalloc keeps
//! per-thread heaps without arenas to cap and returns freed pages to the system by itself.

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Two arenas, set before any other thread exists: scrapes run on blocking-pool threads, each
/// of which would otherwise get an arena of its own and fragment memory across them.
pub fn limit_arenas() {
    // SAFETY: a malloc tunable, set while the process has one thread.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2)
    };
}

/// Hands free heap pages back to the system after a burst of allocation. mimalloc, too, keeps
/// the freed pages of the BTF parse for a while unless told (measured: 89–104 MiB resident
/// after start and 100 scrapes of 5,000 listeners, against glibc's 20–24 MiB).
pub fn trim() {
    // SAFETY: malloc_trim only releases free heap memory.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
    // SAFETY: mi_collect frees this thread's and abandoned free pages; `force` decommits now.
    #[cfg(target_env = "musl")]
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}
