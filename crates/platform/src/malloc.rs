//! glibc's allocator, tuned for a small resident set. By default glibc gives each thread
//! that meets contention its own malloc arena (up to 8 per core) and raises its mmap
//! threshold up to 32 MiB as large blocks are freed, so the large, short-lived buffers of
//! a Pulse service (librdkafka fetch responses, a Parquet roll's encoding, a ClickHouse
//! batch) end up in arenas as fragments that are never given back. Measured on the Parquet
//! writer draining a 450,000-record backlog (release binary, issue #15): peak RSS 143 MiB
//! as is, 116 MiB with the bounded consumer prefetch alone, 66 MiB with the prefetch and
//! these settings (`kafka::config::CONSUMER_PREFETCH_DEFAULTS`).
//!
//! The settings cannot be changed from safe Rust once the process runs (`mallopt` is an
//! FFI call, and the workspace forbids `unsafe`), so [`tune`] re-executes the process once
//! — same pid, arguments and environment — with `GLIBC_TUNABLES` set, before anything else
//! happens. An operator's own `GLIBC_TUNABLES` or `MALLOC_ARENA_MAX` (even empty) is left
//! alone: setting either turns this off. Not glibc (musl, other systems): nothing to do.

/// The Rust heap allocator of the processor and ingest: jemalloc (tikv-jemallocator, its symbols prefixed,
/// so C libraries keep glibc's malloc). `crates/processor/src/main.rs` declares
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: pulse_platform::malloc::Allocator = pulse_platform::malloc::ALLOCATOR;
/// ```
///
/// and so do the processor's cost examples and `bench-processor`, which measure what it
/// runs. glibc's malloc and free were 37 % of the processor core's profile (issue #19);
/// with jemalloc configured as [`JEMALLOC_CONF`] says the core with decode does about a
/// third more events per CPU-second at the same resident memory (README, memory section).
/// The other services keep glibc's malloc: nothing was measured for them.
pub type Allocator = tikv_jemallocator::Jemalloc;

/// The value of [`Allocator`] to declare as `#[global_allocator]`.
pub const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;

/// The variable jemalloc (as tikv-jemallocator builds it, prefixed `_rjem_`) reads its
/// options from at start.
pub const JEMALLOC_CONF_VAR: &str = "_RJEM_MALLOC_CONF";

/// What [`tune`] sets for jemalloc: two arenas (as glibc's below) and freed pages given
/// back within a second instead of jemalloc's default ten (dirty) plus ten (muzzy).
/// Measured with `state_cost --users 100000 --ticks 20 --new-per-tick 4000` (peak RSS,
/// MiB): glibc 215, jemalloc's defaults 226–245, these 215.
pub const JEMALLOC_CONF: &str = "narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0";

/// What jemalloc holds, bytes (its `stats.*` mallctls; see jemalloc's manual). In the
/// processor: `allocated` is what the Rust heap holds (its state, buffers, everything
/// allocated and not freed); `active − allocated` the free room inside its pages (size-class
/// rounding, freed slots among live ones: fragmentation); `resident` adds jemalloc's own
/// metadata and the freed pages not yet given back (dirty, see [`JEMALLOC_CONF`]'s decay). The
/// process's RSS beyond `resident` is outside the Rust heap: the mapped binary, thread stacks
/// and C libraries' own malloc (librdkafka's queues and buffers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// `stats.allocated`: bytes allocated by the application.
    pub allocated: u64,
    /// `stats.active`: bytes in the pages holding allocations (≥ `allocated`).
    pub active: u64,
    /// `stats.metadata`: jemalloc's own bookkeeping.
    pub metadata: u64,
    /// `stats.resident`: bytes in physically resident pages jemalloc maps (active,
    /// metadata, dirty pages not purged yet).
    pub resident: u64,
    /// `stats.mapped`: bytes in the extents jemalloc has mapped and in use (≥ `active`).
    pub mapped: u64,
    /// `stats.retained`: virtual memory kept mapped but given back to the system (not
    /// resident).
    pub retained: u64,
}

/// jemalloc's statistics now (it refreshes them when asked: one `epoch` advance, then six
/// reads; microseconds). `None` when jemalloc does not answer (a build without its
/// statistics). Meaningful in a binary whose `#[global_allocator]` is [`Allocator`]; in
/// another, jemalloc serves nothing and they stay near zero.
pub fn heap_stats() -> Option<HeapStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    let read = |v: Result<usize, tikv_jemalloc_ctl::Error>| v.ok().map(|b| b as u64);
    Some(HeapStats {
        allocated: read(stats::allocated::read())?,
        active: read(stats::active::read())?,
        metadata: read(stats::metadata::read())?,
        resident: read(stats::resident::read())?,
        mapped: read(stats::mapped::read())?,
        retained: read(stats::retained::read())?,
    })
}

/// What [`tune`] sets: two arenas, and a fixed 128 KiB mmap threshold (larger blocks are
/// mapped and unmapped, so their memory goes back to the system when freed).
pub const TUNABLES: &str = "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=131072";

/// Whether to re-execute, given the two variables that turn it off.
pub fn wanted(glibc_tunables_set: bool, malloc_arena_max_set: bool) -> bool {
    cfg!(all(target_os = "linux", target_env = "gnu"))
        && !glibc_tunables_set
        && !malloc_arena_max_set
}

/// Re-executes this process with `GLIBC_TUNABLES` = [`TUNABLES`] unless [`wanted`] says
/// not to, and with [`JEMALLOC_CONF_VAR`] = [`JEMALLOC_CONF`] unless it is set (an
/// operator's own value wins; it only matters to a binary whose allocator is
/// [`Allocator`]). Returns only when it did not re-execute: `Some(reason)` when it tried
/// and could not (the process then runs with the allocators' defaults; log it).
pub fn tune() -> Option<String> {
    let glibc = wanted(
        std::env::var_os("GLIBC_TUNABLES").is_some(),
        std::env::var_os("MALLOC_ARENA_MAX").is_some(),
    );
    let jemalloc = std::env::var_os(JEMALLOC_CONF_VAR).is_none();
    if !glibc && !jemalloc {
        return None;
    }
    reexec(glibc, jemalloc)
}

#[cfg(unix)]
fn reexec(glibc: bool, jemalloc: bool) -> Option<String> {
    use std::os::unix::process::CommandExt as _;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Some(format!("finding the executable to re-execute failed: {e}")),
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(&exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args);
    if glibc {
        cmd.env("GLIBC_TUNABLES", TUNABLES);
    }
    if jemalloc {
        cmd.env(JEMALLOC_CONF_VAR, JEMALLOC_CONF);
    }
    let err = cmd.exec(); // returns only on failure
    Some(format!(
        "re-executing {} with the allocator settings (GLIBC_TUNABLES={TUNABLES}, {JEMALLOC_CONF_VAR}={JEMALLOC_CONF}) failed: {err}",
        exe.display()
    ))
}

#[cfg(not(unix))]
fn reexec(_glibc: bool, _jemalloc: bool) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operators_own_setting_turns_the_tuning_off() {
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        assert_eq!(wanted(false, false), glibc);
        assert!(!wanted(true, false));
        assert!(!wanted(false, true));
    }

    #[test]
    fn the_jemalloc_settings_are_two_arenas_and_a_short_decay() {
        assert_eq!(
            JEMALLOC_CONF.split(',').collect::<Vec<_>>(),
            ["narenas:2", "dirty_decay_ms:1000", "muzzy_decay_ms:0"]
        );
    }

    /// This test binary's heap is jemalloc too, so its statistics see what it allocates.
    #[global_allocator]
    static ALLOC: Allocator = ALLOCATOR;

    #[test]
    fn heap_stats_see_what_the_heap_holds() {
        let before = heap_stats().expect("jemalloc statistics (the stats feature)");
        let block = vec![1u8; 64 << 20];
        let during = heap_stats().expect("jemalloc statistics");
        // Other tests run meanwhile: a margin of 16 MiB for what they allocate or free.
        assert!(
            during.allocated >= before.allocated + (48 << 20),
            "{before:?} -> {during:?}"
        );
        assert!(during.active >= during.allocated, "{during:?}");
        assert!(during.resident >= during.active, "{during:?}");
        assert!(during.mapped >= during.active, "{during:?}");
        drop(block);
        let after = heap_stats().expect("jemalloc statistics");
        assert!(
            after.allocated + (48 << 20) <= during.allocated,
            "{during:?} -> {after:?}"
        );
    }

    #[test]
    fn the_tunables_are_two_arenas_and_a_fixed_mmap_threshold() {
        assert_eq!(
            TUNABLES.split(':').collect::<Vec<_>>(),
            [
                "glibc.malloc.arena_max=2",
                "glibc.malloc.mmap_threshold=131072"
            ]
        );
    }
}
