//! Dead-lettering shared by the sinks: a record a sink cannot store goes to the DLQ topic
//! with its original bytes, `pulse-error-code`, `pulse-error-detail` and the topic it came
//! from, and the send waits for the broker's acknowledgement (the caller may then count
//! the record as done).

use std::time::Duration;

use pulse_contracts::headers;
use pulse_platform::kafka::{KafkaProducer, OutRecord, ProduceError};
use rdkafka::message::OwnedHeaders;

use crate::metrics as m;

/// Header naming the topic a dead-lettered record was read from.
pub const SOURCE_TOPIC: &str = "pulse-source-topic";

/// How long a DLQ send may wait for room in a full producer queue.
const BACKPRESSURE_WAIT: Duration = Duration::from_secs(60);

/// Sends `value` (read from `source_topic`) to `dlq_topic` with `code` and `detail`, waits
/// for the acknowledgement and counts it under `sink`.
pub async fn dead_letter(
    producer: &KafkaProducer,
    dlq_topic: &str,
    sink: &'static str,
    source_topic: &str,
    value: Vec<u8>,
    code: &str,
    detail: &str,
) -> Result<(), ProduceError> {
    let h = headers::with_str(OwnedHeaders::new(), headers::ERROR_CODE, code);
    let h = headers::with_str(h, headers::ERROR_DETAIL, detail);
    let h = headers::with_str(h, SOURCE_TOPIC, source_topic);
    let rec = OutRecord::new(dlq_topic, None, value).with_headers(h);
    producer.send(rec, BACKPRESSURE_WAIT).await?;
    metrics::counter!(m::DLQ_TOTAL, "sink" => sink, "code" => code.to_owned()).increment(1);
    Ok(())
}
