//! Python snippets the tests run for an independent reading (pyarrow for Parquet, `hmac`):
//! scripts/test.sh provides its venv in `PULSE_TEST_PYTHON`.

use std::ffi::OsStr;
use std::process::Command;

/// The interpreter: `PULSE_TEST_PYTHON` (scripts/test.sh's venv), else `python3`.
pub fn interpreter() -> String {
    std::env::var("PULSE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `script` (`python -c`) with `args` and returns its standard output; fails the test
/// with its standard error if it fails.
pub fn run<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(interpreter())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("starting {}: {e}", interpreter()));
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("python's output is UTF-8")
}

/// [`run`], its output parsed as JSON.
pub fn json<T, I, S>(script: &str, args: I) -> T
where
    T: serde::de::DeserializeOwned,
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run(script, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("python's output is not JSON: {e}: {out}"))
}
