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

/// A 127.0.0.1 port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
