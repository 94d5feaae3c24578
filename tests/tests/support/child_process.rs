//! What the tests that run the real service binaries as child processes share
//! (`processor_recovery.rs`, `writer_recovery.rs`): the binary, a free port, a log folder.

// Each test binary includes this file and uses a subset of it.
#![allow(dead_code)]

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

/// A temporary folder (logs, data); kept and printed if the test fails, removed when it passes.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(pulse_tests::unique(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
