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
/// not to. Returns only when it did not re-execute: `Some(reason)` when it tried and
/// could not (the process then runs with glibc's defaults; log it).
pub fn tune() -> Option<String> {
    if !wanted(
        std::env::var_os("GLIBC_TUNABLES").is_some(),
        std::env::var_os("MALLOC_ARENA_MAX").is_some(),
    ) {
        return None;
    }
    reexec()
}

#[cfg(unix)]
fn reexec() -> Option<String> {
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
    cmd.args(args).env("GLIBC_TUNABLES", TUNABLES);
    let err = cmd.exec(); // returns only on failure
    Some(format!(
        "re-executing {} with GLIBC_TUNABLES={TUNABLES} failed: {err}",
        exe.display()
    ))
}

#[cfg(not(unix))]
fn reexec() -> Option<String> {
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
