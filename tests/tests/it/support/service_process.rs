//! A Pulse service binary as a child process of a test (`server_limits`, `server_tls`,
//! `schema_registry_tls`, `query_api`, `query_api_tokens`): started with its admin server
//! on a free port and its stdout and stderr in a log file, waited for (until `/readyz`
//! answers 200, or any condition, failing at once with its log if the process exits),
//! its log and `/metrics` read, killed and reaped when dropped. The binary's other flags
//! and what its servers answer are the caller's; `pulse-writer` with its topics, signals
//! and metrics waits has a harness of its own ([`super::writer_process`]).

use std::ffi::OsStr;
use std::fmt::{Debug, Display};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::child_process::{binary, free_port};
use super::{metric_sum, wait_until};

/// `127.0.0.1:<a free port>`, for a server of a child process to listen on.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// An error with all its sources, as a user would read them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// The command line of a service binary before it starts: its admin server on a free port
/// and text logs (unless [`ServiceCommand::log_format`] says otherwise) are added at
/// [`ServiceCommand::spawn`]; the test's flags and environment go in between. The test
/// runner's `OTEL_EXPORTER_OTLP_ENDPOINT` is not passed on (a test that wants spans sets
/// it with [`ServiceCommand::env`]).
pub struct ServiceCommand {
    name: String,
    command: Command,
    admin: String,
    log_format: &'static str,
}

impl ServiceCommand {
    /// The `name` binary next to the test executable.
    pub fn new(name: &str) -> Self {
        let mut command = Command::new(binary(name));
        command.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        Self {
            name: name.to_owned(),
            command,
            admin: free_addr(),
            log_format: "text",
        }
    }

    /// The address its admin server will listen on.
    pub fn admin(&self) -> &str {
        &self.admin
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.command.env(key, value);
        self
    }

    pub fn envs(&mut self, vars: &[(&str, &str)]) -> &mut Self {
        self.command.envs(vars.iter().copied());
        self
    }

    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Self {
        self.command.env_remove(key);
        self
    }

    /// `--log-format` (`text` unless set here).
    pub fn log_format(&mut self, format: &'static str) -> &mut Self {
        self.log_format = format;
        self
    }

    /// Starts it with no stdin and its stdout and stderr in `log` (created anew).
    pub fn spawn(&mut self, log: PathBuf) -> ServiceProcess {
        let out = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("opening {} twice: {e}", log.display()));
        let child = self
            .command
            .args(["--admin-addr", &self.admin, "--log-format", self.log_format])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        ServiceProcess {
            child,
            name: self.name.clone(),
            admin: self.admin.clone(),
            log,
        }
    }
}

/// A running service binary; killed (SIGKILL) and reaped when dropped.
pub struct ServiceProcess {
    child: Child,
    name: String,
    admin: String,
    log: PathBuf,
}

impl ServiceProcess {
    /// Its admin server's address (`127.0.0.1:<port>`).
    pub fn admin(&self) -> &str {
        &self.admin
    }

    /// What it has written to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting on {}: {e}", self.name))
    }

    /// Fails the test, showing the log, if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!("{} exited ({status}): {}", self.name, self.logs());
        }
    }

    /// Calls `probe` until it answers `Ok` (as [`wait_until`], for `within`), failing the
    /// test at once if the process exits meanwhile.
    pub async fn wait_for<T, O: Debug>(
        &mut self,
        within: Duration,
        what: impl Display,
        mut probe: impl AsyncFnMut() -> Result<T, O>,
    ) -> T {
        let what = format!("{what}; see {}", self.log.display());
        wait_until(within, what, async || {
            self.assert_running();
            probe().await
        })
        .await
    }

    /// Waits until `/readyz` of its admin server (plain HTTP) answers 200. A client per
    /// attempt: a test may have limited the admin server's connections.
    pub async fn wait_ready(&mut self, within: Duration) {
        let url = format!("http://{}/readyz", self.admin);
        let what = format!("{url} to answer 200");
        self.wait_for(within, what, async || match reqwest::get(&url).await {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(error_chain(&e)),
        })
        .await;
    }

    /// Waits until it exits on its own; its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let what = format!("{} to exit; see {}", self.name, self.log.display());
        wait_until(within, what, async || self.exited().ok_or("running")).await
    }

    /// Its admin server's `/metrics` text (plain HTTP).
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        let scrape = async { reqwest::get(&url).await?.error_for_status()?.text().await };
        scrape
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {}", error_chain(&e)))
    }

    /// The sum of the samples of metric `name` whose labels contain each of `labels` in a
    /// `/metrics` scrape, if there is any.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_sum(&self.metrics().await, name, labels)
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::{ServiceCommand, free_addr};
    use crate::support::cleanup::TempDir;

    #[tokio::test]
    #[should_panic(
        expected = "pulse-query-api exited (exit status: 2): error: unexpected argument '--no-such-flag'"
    )]
    async fn a_wait_fails_at_once_showing_the_log_when_the_process_exits() {
        let dir = TempDir::new("service-process-exits");
        let mut process = ServiceCommand::new("pulse-query-api")
            .args(["--no-such-flag"])
            .spawn(dir.path().join("query-api.log"));
        // Were the exit missed, the wait would end in "gave up waiting" instead.
        process.wait_ready(Duration::from_secs(60)).await;
    }

    #[tokio::test]
    async fn dropping_it_kills_and_reaps_the_process() {
        let dir = TempDir::new("service-process-drop");
        let process = ServiceCommand::new("pulse-query-api")
            .env("PULSE_QUERY_API_TOKENS", "service-process-test-token")
            .args(["--clickhouse-url", "http://127.0.0.1:9"])
            .args(["--http-addr", &free_addr(), "--grpc-addr", &free_addr()])
            .spawn(dir.path().join("query-api.log"));
        let proc_entry = format!("/proc/{}", process.pid());
        assert!(Path::new(&proc_entry).exists());
        drop(process);
        // Killed and waited for: not even a zombie is left.
        assert!(
            !Path::new(&proc_entry).exists(),
            "{proc_entry} is still there"
        );
    }
}
