//! Pausing consumption while a store fails: the sinks pause their whole assignment (so
//! memory stays bounded by what they hold) and, while they wait to retry, keep polling the
//! consumer, so librdkafka sees the application alive (`max.poll.interval.ms`) and serves
//! group heartbeats and rebalances: a long outage does not make the writer leave its group.

use std::time::Duration;

use pulse_platform::kafka::KafkaConsumer;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset};
use tokio_util::sync::CancellationToken;

/// How long rewinding a record read while paused may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops fetching every assigned partition (records already fetched are dropped by
/// librdkafka and fetched again after [`resume`], from the last one handed over).
pub fn pause(consumer: &KafkaConsumer) {
    if let Ok(a) = consumer.raw().assignment() {
        let _ = consumer.raw().pause(&a);
    }
}

pub fn resume(consumer: &KafkaConsumer) {
    if let Ok(a) = consumer.raw().assignment() {
        let _ = consumer.raw().resume(&a);
    }
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
                    pause(consumer);
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
