//! Guards that remove what a test made — its temporary folders, ClickHouse databases and
//! Kafka topics — when they go out of scope, whether the test passed or failed.
//! `PULSE_TEST_KEEP_ON_FAILURE=1` keeps those of a failed test (and prints where they are)
//! for inspection.
//!
//! Topics are deleted only with `PULSE_TEST_DELETE_TOPICS=1`, for a broker that can: Tansu
//! 0.6 (what `scripts/test.sh` runs) accepts DeleteTopics, but its sqlite storage then panics
//! ("more or less than one row", `tansu-storage` lite.rs:503) and answers no request of any
//! client again. Its topics go with the script's temporary folder.

use std::fmt::Display;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::kafka::{KafkaConfig, TopicSpec, ensure_topics};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

/// Set to `1`, a failed test keeps its folders, databases and topics.
pub const KEEP_ON_FAILURE: &str = "PULSE_TEST_KEEP_ON_FAILURE";

/// Set to `1`, topic guards delete their topics (see the module's header for why not by
/// default).
pub const DELETE_TOPICS: &str = "PULSE_TEST_DELETE_TOPICS";

/// Whether `what`, being dropped, is kept: the test is failing and [`KEEP_ON_FAILURE`] is
/// set. Says so, either way, when the test is failing.
fn kept(what: impl Display) -> bool {
    if !std::thread::panicking() {
        return false;
    }
    if std::env::var(KEEP_ON_FAILURE).is_ok_and(|v| v == "1") {
        eprintln!("kept for inspection: {what}");
        true
    } else {
        eprintln!("removing {what} ({KEEP_ON_FAILURE}=1 keeps it)");
        false
    }
}

/// Runs `cleanup` to completion from a `Drop`, where nothing can be awaited: on a thread of
/// its own with a runtime of its own, so that it works inside and outside the test's
/// runtime. A failure is printed, never a panic (a panic while unwinding aborts).
fn run(cleanup: impl Future<Output = Result<(), String>> + Send + 'static) {
    let done = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("a runtime: {e}"))?;
        rt.block_on(cleanup)
    })
    .join();
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("cleanup failed: {e}"),
        Err(_) => eprintln!("cleanup panicked"),
    }
}

/// A temporary folder (logs, data) of a unique name, removed when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(pulse_tests::unique(prefix));
        std::fs::create_dir_all(&path).unwrap();
        Self { path, keep: false }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the folder in place whatever happens (e.g. processes may still use it).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let what = format!("folder {}", self.path.display());
        if self.keep {
            eprintln!("kept: {what}");
        } else if !kept(&what) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A ClickHouse database of the test server (its configuration, which the guard derefs
/// to), dropped with everything in it when the guard is dropped.
pub struct Database(ClickHouseConfig);

impl Database {
    /// A database of a unique name starting with `prefix` on the test server. It is not
    /// created: migrations or the service under test create it.
    pub fn unique(prefix: &str) -> Self {
        Self(ClickHouseConfig {
            database: pulse_tests::unique(prefix),
            ..pulse_tests::clickhouse()
        })
    }

    /// [`Database::unique`], created and migrated to Pulse's schema (`pulse_storage`'s
    /// migrations, as the writer applies them).
    pub async fn migrated(prefix: &str) -> Self {
        let ch = Self::unique(prefix);
        pulse_storage::migrate::migrate(&ch).await.unwrap();
        ch
    }
}

impl Deref for Database {
    type Target = ClickHouseConfig;

    fn deref(&self) -> &ClickHouseConfig {
        &self.0
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if kept(format!("ClickHouse database {}", self.0.database)) {
            return;
        }
        let server = self.0.server_client();
        let sql = format!("DROP DATABASE IF EXISTS {}", self.0.database);
        run(async move {
            server
                .query(&sql)
                .execute()
                .await
                .map_err(|e| format!("{sql}: {e}"))
        });
    }
}

/// Kafka topics of the test broker, deleted when the guard is dropped if [`DELETE_TOPICS`]
/// is set.
#[derive(Debug)]
pub struct Topics {
    kafka: KafkaConfig,
    names: Vec<String>,
}

impl Topics {
    /// Creates `specs` on the test broker.
    pub async fn create(specs: &[TopicSpec]) -> Self {
        let kafka = pulse_tests::kafka();
        ensure_topics(&kafka, specs).await.unwrap();
        Self {
            kafka,
            names: specs.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// `names`, created by someone else (the test itself, a registry, the service under
    /// test); any that does not exist when the guard is dropped is skipped.
    pub fn adopt<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self {
            kafka: pulse_tests::kafka(),
            names: names.into_iter().map(Into::into).collect(),
        }
    }

    /// Deletes `name` too.
    pub fn add(&mut self, name: impl Into<String>) {
        self.names.push(name.into());
    }
}

impl Drop for Topics {
    fn drop(&mut self) {
        let delete = std::env::var(DELETE_TOPICS).is_ok_and(|v| v == "1");
        if !delete || self.names.is_empty() || kept(format!("topics {}", self.names.join(", "))) {
            return;
        }
        let names = std::mem::take(&mut self.names);
        let admin: Result<AdminClient<DefaultClientContext>, _> =
            self.kafka.client_config("pulse-test-cleanup").create();
        run(async move {
            let admin = admin.map_err(|e| format!("an admin client: {e}"))?;
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            let results = admin
                .delete_topics(&refs, &opts)
                .await
                .map_err(|e| format!("deleting topics {refs:?}: {e}"))?;
            let failed: Vec<String> = results
                .into_iter()
                .filter_map(Result::err)
                .filter(|(_, code)| {
                    *code != rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                })
                .map(|(topic, code)| format!("{topic}: {code}"))
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(format!("deleting topics: {}", failed.join(", ")))
            }
        });
    }
}
