//! Publishing replayed events: the record of one archived event (framing, key, headers,
//! trace context), the publisher that enqueues records and awaits every acknowledgement,
//! and the checks before publishing (the registered schema id, the topic's existence).

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use pulse_contracts::wire::{self, RegistryClientOptions, RegistryEncoder, WireError};
use pulse_contracts::{headers, schemas, trace_context};
use pulse_platform::kafka::producer::enqueue_with_wait;
use pulse_platform::kafka::{AckFuture, KafkaConfig, OutRecord, RecordProducer};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;

use super::read::ArchivedEvent;
use super::{ReplayError, Summary};

/// Records waiting for their acknowledgement at most (then replay waits for some).
const MAX_IN_FLIGHT: usize = 5_000;
/// How long a record may wait for room in a full producer queue.
const QUEUE_WAIT: Duration = Duration::from_secs(60);
/// How long the topic check may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Where replayed events go.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub producer: &'a dyn RecordProducer,
    pub topic: &'a str,
    pub schema_id: u32,
    pub message_indexes: &'a [i32],
}

impl std::fmt::Debug for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("topic", &self.topic)
            .field("schema_id", &self.schema_id)
            .finish_non_exhaustive()
    }
}

/// The trace id of an archive row if it is a W3C trace id (32 hex digits, not all zero):
/// the writer stores the record's `traceparent` trace id, or else the producer's own
/// `metadata.trace_id`, which may be anything.
pub fn w3c_trace_id(s: &str) -> Option<TraceId> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    TraceId::from_hex(&s.to_ascii_lowercase())
        .ok()
        .filter(|t| *t != TraceId::INVALID)
}

/// The record that re-publishes `e` to `topic`: key `user_id`, the original bytes framed
/// with `schema_id`, headers `pulse-event-id`, `pulse-ingest-ts` (the original ingest
/// time), `pulse-replay: 1` and a `traceparent` continuing the archived trace (a new
/// trace when the row has no W3C trace id) with a new span id.
pub fn record(
    e: &ArchivedEvent,
    topic: &str,
    schema_id: u32,
    message_indexes: &[i32],
    ids: &RandomIdGenerator,
) -> OutRecord {
    let trace = w3c_trace_id(&e.trace_id).unwrap_or_else(|| ids.new_trace_id());
    let span = SpanContext::new(
        trace,
        ids.new_span_id(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let mut h = trace_context::inject(
        &Context::new().with_remote_span_context(span),
        OwnedHeaders::new(),
    );
    h = headers::with_str(h, headers::EVENT_ID, &e.event_id);
    h = headers::with_str(h, headers::INGEST_TS, &e.ingest_time_ms.to_string());
    h = headers::with_str(h, headers::REPLAY, "1");
    OutRecord::new(
        topic,
        Some(e.user_id.as_bytes().to_vec()),
        wire::frame(schema_id, message_indexes, &e.event_proto),
    )
    .with_headers(h)
}

/// Enqueues records and collects their acknowledgements, at most [`MAX_IN_FLIGHT`] pending.
pub(super) struct Publisher<'a> {
    target: Target<'a>,
    ids: RandomIdGenerator,
    pending: FuturesUnordered<AckFuture>,
}

impl<'a> Publisher<'a> {
    pub(super) fn new(target: Target<'a>) -> Self {
        Self {
            target,
            ids: RandomIdGenerator::default(),
            pending: FuturesUnordered::new(),
        }
    }

    pub(super) async fn send(&mut self, e: &ArchivedEvent, summary: &mut Summary) {
        while self.pending.len() >= MAX_IN_FLIGHT {
            self.settle_one(summary).await;
        }
        let t = self.target;
        let rec = record(e, t.topic, t.schema_id, t.message_indexes, &self.ids);
        match enqueue_with_wait(t.producer, rec, QUEUE_WAIT).await {
            Ok(ack) => self.pending.push(ack),
            Err(err) => {
                summary.failed += 1;
                summary.note(format!("event {}: {err}", e.event_id));
            }
        }
    }

    async fn settle_one(&mut self, summary: &mut Summary) {
        match self.pending.next().await {
            Some(Ok(_)) => summary.published += 1,
            Some(Err(err)) => {
                summary.failed += 1;
                summary.note(format!("not acknowledged: {err}"));
            }
            None => {}
        }
    }

    pub(super) async fn drain(&mut self, summary: &mut Summary) {
        while !self.pending.is_empty() {
            self.settle_one(summary).await;
        }
    }
}

/// The schema id and message indexes registered for `<topic>-value` with the events
/// message, looked up once (framing an empty payload through the registry).
pub async fn registered_schema(
    auth: &pulse_platform::registry_auth::RegistryAuthArgs,
    registry_url: &str,
    topic: &str,
) -> Result<(u32, Vec<i32>), ReplayError> {
    let registry = |source| ReplayError::Registry {
        topic: topic.to_owned(),
        source,
    };
    let credentials = auth.credentials().map_err(|message| {
        registry(WireError::Registry {
            message,
            retryable: false,
        })
    })?;
    let ca_pem = auth.ca_pem().map_err(|message| {
        registry(WireError::Registry {
            message,
            retryable: false,
        })
    })?;
    let encoder = RegistryEncoder::with_options(
        registry_url,
        RegistryClientOptions {
            credentials: credentials.as_ref().map(|(u, p)| (u.as_str(), p.expose())),
            ca_pem: ca_pem.as_deref(),
        },
    )
    .map_err(registry)?;
    let framed = encoder
        .encode(topic, schemas::EVENT.full_name, &[])
        .await
        .map_err(registry)?;
    let f = wire::unframe(&framed).map_err(registry)?;
    Ok((f.schema_id, f.message_indexes))
}

/// Whether `topic` exists on the broker (produce does not create topics).
pub(super) async fn topic_exists(kafka: &KafkaConfig, topic: &str) -> Result<bool, ReplayError> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka.client_config("pulsectl-replay").create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
    })
    .await
    .map_err(|_| ReplayError::Kafka(KafkaError::Canceled))?
}

#[cfg(test)]
mod tests {
    use pulse_contracts::trace_context::{KafkaTraceCarrier, extract, trace_id_hex};
    use rdkafka::message::Headers;

    use super::*;

    fn event(trace_id: &str) -> ArchivedEvent {
        ArchivedEvent {
            event_id: "e-1".into(),
            user_id: "u-1".into(),
            event_time_ms: 1_764_028_800_000,
            ingest_time_ms: 1_764_028_800_250,
            trace_id: trace_id.into(),
            event_proto: b"\x0a\x03e-1".to_vec(),
            source_trace_id: None,
        }
    }

    fn names(h: &OwnedHeaders) -> Vec<String> {
        h.iter().map(|x| x.key.to_owned()).collect()
    }

    #[test]
    fn a_record_carries_the_original_bytes_framed_its_key_and_the_replay_headers() {
        let ids = RandomIdGenerator::default();
        let r = record(&event(""), "pulse.events.v1", 5, &[0], &ids);
        assert_eq!(r.topic, "pulse.events.v1");
        assert_eq!(r.key.as_deref(), Some(&b"u-1"[..]));
        assert_eq!(r.partition, None, "partitioned by key, as ingest does");
        let framed = wire::unframe(&r.payload).unwrap();
        assert_eq!(
            (framed.schema_id, framed.message_indexes, framed.payload),
            (5, vec![0], &b"\x0a\x03e-1"[..])
        );
        let h = r.headers.as_borrowed();
        assert_eq!(headers::get_str(h, headers::EVENT_ID), Some("e-1"));
        assert_eq!(headers::ingest_ts_ms(h), Some(1_764_028_800_250));
        assert_eq!(headers::get_str(h, headers::REPLAY), Some("1"));
        // The propagator writes an empty `tracestate` too, as on ingest's records.
        assert_eq!(
            names(&r.headers),
            [
                "traceparent",
                "tracestate",
                "pulse-event-id",
                "pulse-ingest-ts",
                "pulse-replay"
            ]
        );
    }

    #[test]
    fn an_archived_w3c_trace_id_is_continued_with_a_new_span() {
        let ids = RandomIdGenerator::default();
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let a = record(&event(trace), "t", 1, &[0], &ids);
        let b = record(&event(trace), "t", 1, &[0], &ids);
        let cx = extract(Some(&a.headers));
        assert_eq!(trace_id_hex(&cx).as_deref(), Some(trace));
        let parent = |r: &OutRecord| {
            KafkaTraceCarrier::from_headers(&r.headers)
                .traceparent()
                .unwrap()
                .to_owned()
        };
        let (pa, pb) = (parent(&a), parent(&b));
        assert!(
            pa.starts_with(&format!("00-{trace}-")) && pa.ends_with("-01"),
            "{pa}"
        );
        assert_ne!(pa, pb, "each replayed record has its own span id");
        // Upper-case hex is a W3C id too, normalised.
        let upper = record(&event(&trace.to_uppercase()), "t", 1, &[0], &ids);
        assert_eq!(
            trace_id_hex(&extract(Some(&upper.headers))).as_deref(),
            Some(trace)
        );
    }

    #[test]
    fn rows_without_a_w3c_trace_id_start_a_new_trace() {
        let ids = RandomIdGenerator::default();
        for not_w3c in [
            "",
            "producer-trace-7",
            "abc",
            "00000000000000000000000000000000",
            "4bf92f3577b34da6a3ce929d0e0e473g",
            "4bf92f3577b34da6a3ce929d0e0e47361",
        ] {
            assert_eq!(w3c_trace_id(not_w3c), None, "{not_w3c:?}");
            let r = record(&event(not_w3c), "t", 1, &[0], &ids);
            let trace = trace_id_hex(&extract(Some(&r.headers)));
            assert!(
                trace
                    .as_deref()
                    .is_some_and(|t| t.len() == 32 && t != not_w3c),
                "{not_w3c:?} gave {trace:?}"
            );
        }
    }
}
