//! The real `pulse-writer` binary as a child process (`writer_blocking`, `writer_recovery`):
//! unique topics for it, spawning it with its admin server on a free port and its output in
//! a log file, reading `/readyz` and `/metrics`, SIGTERM and SIGKILL, and the consumer
//! group's committed offsets and the topics' end offsets.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::child_process::{binary, free_port};
use super::{Deadline, cleanup, metric_sum, poll_until, wait_until};
use pulse_platform::kafka::TopicSpec;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// Partitions of every topic made here.
pub const PARTITIONS: i32 = 2;

/// How long a wait on the writer's `/readyz` or a metric may take.
const WAIT: Duration = Duration::from_secs(60);

/// The four topics one writer reads and dead-letters to, unique per test.
pub struct WriterTopics {
    pub events: String,
    pub activity: String,
    pub sessions: String,
    pub dlq: String,
    _guard: cleanup::Topics,
}

impl WriterTopics {
    /// Creates them, named `<prefix>_events<suffix>` and so on (short names: the events
    /// topic's name also goes into Parquet object paths).
    pub async fn create(prefix: &str) -> Self {
        let names = ["events", "activity", "sessions", "dlq"]
            .map(|kind| pulse_tests::short_unique(&format!("{prefix}_{kind}")));
        let specs: Vec<TopicSpec> = names
            .iter()
            .map(|name| TopicSpec::new(name, PARTITIONS))
            .collect();
        let guard = cleanup::Topics::create(&specs).await;
        let [events, activity, sessions, dlq] = names;
        Self {
            events,
            activity,
            sessions,
            dlq,
            _guard: guard,
        }
    }

    /// The writer's topic flags for all four.
    pub fn flags(&self) -> Vec<String> {
        [
            ("--events-topic", &self.events),
            ("--user-activity-topic", &self.activity),
            ("--sessions-topic", &self.sessions),
            ("--dlq-topic", &self.dlq),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v.clone()])
        .collect()
    }
}

/// A running `pulse-writer`; SIGKILLed when dropped.
pub struct WriterProcess {
    child: Child,
    admin: String,
    log: PathBuf,
}

impl WriterProcess {
    /// Starts the binary on the test broker with its admin server on a free port, text
    /// logs, `args`, the environment variables `envs`, and stdout and stderr in `log`.
    pub fn spawn(args: &[String], envs: &[(&str, &str)], log: PathBuf) -> Self {
        let admin = format!("127.0.0.1:{}", free_port());
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(binary("pulse-writer"))
            .args([
                "--kafka-brokers",
                &pulse_tests::kafka().brokers,
                "--admin-addr",
                &admin,
                "--log-format",
                "text",
            ])
            .args(args)
            // One test broker: the topics a writer creates (its audit topic, the contract's
            // `pulse.audit.v1` unless the test names another) get one replica, as the other
            // services' tests and `pulsectl topics create` in topic_durability give them;
            // with the defaults (3 and 2) that test would find the shared topic differing.
            .env("PULSE_KAFKA_REPLICATION_FACTOR", "1")
            .env("PULSE_KAFKA_MIN_INSYNC_REPLICAS", "1")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Self { child, admin, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails the test if the writer exited.
    pub fn assert_running(&mut self) {
        let status = self.child.try_wait().unwrap();
        assert!(
            status.is_none(),
            "the writer exited ({status:?}); see {}",
            self.log.display()
        );
    }

    /// SIGKILL: no flush, no final commit.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().unwrap();
        self.child.wait().unwrap()
    }

    /// SIGTERM; the exit status if the process exits within `within`.
    pub async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let every = Deadline::after(within).every(Duration::from_millis(50));
        poll_until(every, async || self.child.try_wait().unwrap().ok_or(()))
            .await
            .ok()
    }

    /// The admin server's answer to `GET path` (status and body), if it answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    }

    /// The `/metrics` text, if the admin server answers.
    pub async fn metrics(&self) -> Option<String> {
        self.get("/metrics").await.map(|(_, text)| text)
    }

    /// The sum of the samples of metric `name` whose labels contain each of `labels`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_sum(&self.metrics().await?, name, labels)
    }

    /// Waits until `/readyz` answers `status` with a body containing `body`; returns the body.
    pub async fn wait_readyz(&mut self, status: u16, body: &str) -> String {
        let what = format!(
            "/readyz to answer {status} with {body:?}; see {}",
            self.log.display()
        );
        wait_until(WAIT, what, async || {
            self.assert_running();
            match self.get("/readyz").await {
                Some((s, b)) if s == status && b.contains(body) => Ok(b),
                other => Err(other),
            }
        })
        .await
    }

    /// Waits until metric `name{labels}` is at least `min`; returns its value.
    pub async fn wait_metric(&mut self, name: &str, labels: &[&str], min: f64) -> f64 {
        let what = format!("{name}{labels:?} >= {min}; see {}", self.log.display());
        wait_until(WAIT, what, async || {
            self.assert_running();
            let v = self.metric(name, labels).await;
            v.filter(|v| *v >= min).ok_or(v)
        })
        .await
    }
}

impl Drop for WriterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The group's committed offset (the next record to read) per partition of `topic`; 0 where
/// it has committed nothing.
pub fn committed_offsets(group: &str, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = pulse_tests::kafka()
        .client_config("writer-test-offsets")
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    (0..PARTITIONS)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            },
        )
        .collect()
}

/// The end offset (next offset to be written) per partition of `topic`.
pub fn end_offsets(topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = pulse_tests::kafka()
        .client_config("writer-test-offsets")
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect()
}
