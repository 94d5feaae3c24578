//! What the tests that run the real service binaries as child processes share
//! (`processor_recovery`, `writer_recovery`, `e2e`): the binary, a free port.

use std::path::{Path, PathBuf};

/// The `name` binary next to the test executable (target/debug/), built by `cargo build -p name`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p {name}` first (scripts/test.sh builds it)",
        bin.display()
    );
    bin
}

/// A 127.0.0.1 port nothing listens on right now, chosen below the kernel's ephemeral range
/// (32768 up by default): a port from `bind(0)` is an ephemeral one that any outgoing
/// connection can take before the child binds it ("Address already in use"); a port below
/// the range is only taken by an explicit bind. Ports already handed out by this process are
/// not handed out again.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::{SystemTime, UNIX_EPOCH};
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()) << 32;
    for _ in 0..500 {
        // xorshift: no rand dependency needed for picking a port.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = 20_000 + (seed % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
