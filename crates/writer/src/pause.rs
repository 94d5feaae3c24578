//! Pausing consumption while a store fails: the sinks pause their whole assignment (so
//! memory stays bounded by what they hold) and, while they wait to retry, keep polling the
//! consumer, so librdkafka sees the application alive (`max.poll.interval.ms`) and serves
//! group heartbeats and rebalances: a long outage does not make the writer leave its group.
//! [`failed`] and [`succeeded`] are the bookkeeping around each attempt that both sinks share.

use std::time::Duration;

use pulse_platform::kafka::KafkaConsumer;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset};
use tokio_util::sync::CancellationToken;

use crate::blocked::Blocked;
use crate::metrics as m;
use crate::retry::{Backoff, ErrorKind};

/// How long rewinding a record read while paused may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed write's bookkeeping, the same for every sink: consumption paused (all
/// assigned partitions), the sink reported blocked when `kind` is not about the data, the
/// backoff advanced (the circuit gauge set once it is open) and the retry counted. Returns
/// how long to wait before the next attempt (with [`wait_polling`]).
pub fn failed(
    consumer: &KafkaConsumer,
    backoff: &mut Backoff,
    blocked: &mut Blocked,
    sink: &'static str,
    kind: ErrorKind,
    error: &dyn std::fmt::Display,
) -> Duration {
    consumer.pause_all();
    if let ErrorKind::Blocking(reason) = kind {
        blocked.set(reason, &error.to_string());
    }
    let wait = backoff.failure();
    if backoff.is_open() {
        metrics::gauge!(m::CIRCUIT_OPEN, "sink" => sink).set(1.0);
    }
    metrics::counter!(m::RETRIES_TOTAL, "sink" => sink, "kind" => kind.as_str()).increment(1);
    wait
}

/// A write succeeded: the backoff and the circuit reset, not blocked, consumption resumed.
pub fn succeeded(
    consumer: &KafkaConsumer,
    backoff: &mut Backoff,
    blocked: &mut Blocked,
    sink: &'static str,
) {
    backoff.success();
    metrics::gauge!(m::CIRCUIT_OPEN, "sink" => sink).set(0.0);
    blocked.clear();
    consumer.resume_all();
}

/// Waits `wait` while polling `consumer` (paused). Returns `Ok(false)` if `stop` ended the
/// wait. A record that arrives anyway (a partition assigned during the wait is not paused)
/// is not consumed: its partition is rewound to it and everything is paused again, so it
/// is read after the resume. An error only if that rewind failed (the record would be
/// skipped otherwise; the caller stops and its successor re-reads from the last commit).
pub async fn wait_polling(
    consumer: &KafkaConsumer,
    wait: Duration,
    stop: &CancellationToken,
) -> Result<bool, KafkaError> {
    let sleep = tokio::time::sleep(wait);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            _ = &mut sleep => return Ok(true),
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
                    drop(m);
                    consumer.pause_all();
                    consumer
                        .raw()
                        .seek(&topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)?;
                    tracing::debug!(topic, partition, offset, "rewound a record read while paused");
                }
                Err(e) => tracing::warn!(error = %e, "consume failed while paused"),
            }
        }
    }
}
