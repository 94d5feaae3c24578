//! What the test modules share: waiting on a condition ([`wait`]), sample events
//! ([`events`]), guards that remove a test's databases, topics and folders ([`cleanup`]),
//! and the harnesses of several modules (an in-process ingest, schema registry or Parquet
//! sink, gRPC health and reflection checks, the service binaries as child processes,
//! [`service_process`] for any of them).

pub mod archive;
pub mod child_process;
pub mod cleanup;
pub mod dev_stack;
pub mod events;
pub mod forwarder;
pub mod grpc_meta;
pub mod ingest_server;
pub mod kafka;
pub mod pipeline;
pub mod python;
pub mod registry;
pub mod sasl_proxy;
pub mod service_process;
pub mod tls;
pub mod wait;
pub mod writer_process;

pub use wait::{Deadline, poll_until, wait_until};

/// The sum of the samples of `name` whose labels contain every one of `labels` in a
/// Prometheus text-format scrape, or `None` if there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue; // a longer name, e.g. the _bucket series of a histogram
        }
        let (series, value) = line.rsplit_once(' ')?;
        if labels.iter().all(|l| series.contains(l)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}
