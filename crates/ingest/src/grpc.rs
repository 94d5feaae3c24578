//! The gRPC `IngestService`: a unary batch call and a client-streaming call that
//! acknowledges chunk by chunk (each request message is produced and acknowledged before
//! the next is read). Same auth (metadata `authorization: Bearer …` or `x-api-key`), rate
//! limit, validation, dedup and DLQ as HTTP: protobuf events are converted to the JSON
//! shape and validated by the same rules; the DLQ keeps their protobuf bytes.

use std::sync::Arc;

use prost::Message;
use pulse_contracts::pb::events::v1::Event;
use pulse_contracts::pb::ingest::v1::ingest_service_server::IngestService;
use pulse_contracts::pb::ingest::v1::{
    EventResult, EventStatus, FieldError, SendEventsRequest, SendEventsResponse,
};
use serde_json::{Map, Value, json};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{KeyStore, RateLimiter, admit, authenticate};
use crate::error::{GRPC_KEY_HINT, Refusal};
use crate::metrics as m;
use crate::pipeline::{BatchResult, Incoming, IngestError, Ingestor, Status as EventOutcome};
use tracing::Instrument as _;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct GrpcIngest {
    pub ingestor: Ingestor,
    pub keys: Arc<KeyStore>,
    pub limiter: Arc<RateLimiter>,
    pub max_batch_events: usize,
    /// Most events one `StreamEvents` call may carry (see the proto).
    pub max_stream_events: usize,
}

/// Exact decimal text of `micros` millionths.
pub fn micros_to_decimal(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// The JSON shape of a protobuf event, for validation by the HTTP rules. Empty strings
/// are absent (proto3 has no presence for them).
pub fn event_json(e: &Event) -> Value {
    let mut obj = Map::new();
    if !e.event_id.is_empty() {
        obj.insert("event_id".into(), json!(e.event_id));
    }
    obj.insert("schema_version".into(), json!(e.schema_version));
    obj.insert("event_type".into(), json!(e.event_type));
    if let Some(k) = &e.key {
        let mut key = Map::new();
        key.insert("user_id".into(), json!(k.user_id));
        if !k.session_id.is_empty() {
            key.insert("session_id".into(), json!(k.session_id));
        }
        obj.insert("key".into(), Value::Object(key));
    }
    if let Some(p) = &e.payload {
        let mut payload = Map::new();
        for (name, v) in [
            ("page", &p.page),
            ("referrer", &p.referrer),
            ("currency", &p.currency),
        ] {
            if !v.is_empty() {
                payload.insert(name.into(), json!(v));
            }
        }
        if let Some(a) = p.amount_micros {
            payload.insert("amount".into(), json!(micros_to_decimal(a)));
        }
        if !p.properties.is_empty() {
            payload.insert("properties".into(), json!(p.properties));
        }
        obj.insert("payload".into(), Value::Object(payload));
    }
    if let Some(md) = &e.metadata {
        let mut meta = Map::new();
        meta.insert("event_timestamp".into(), json!(md.event_timestamp_ms));
        if !md.trace_id.is_empty() {
            meta.insert("trace_id".into(), json!(md.trace_id));
        }
        if !md.source.is_empty() {
            meta.insert("source".into(), json!(md.source));
        }
        obj.insert("metadata".into(), Value::Object(meta));
    }
    Value::Object(obj)
}

fn unavailable(error: IngestError) -> Refusal {
    Refusal::Unavailable {
        error,
        retry_after_secs: None,
    }
}

fn response(r: &BatchResult, offset: usize) -> SendEventsResponse {
    SendEventsResponse {
        accepted: r.accepted as u32,
        duplicates: r.duplicates as u32,
        rejected: r.rejected as u32,
        results: r
            .results
            .iter()
            .map(|e| EventResult {
                index: (e.index + offset) as u32,
                status: match e.status {
                    EventOutcome::Accepted => EventStatus::Accepted,
                    EventOutcome::Duplicate => EventStatus::Duplicate,
                    EventOutcome::Rejected => EventStatus::Rejected,
                } as i32,
                event_id: e.event_id.clone(),
                error: e.error.as_ref().map(|f| FieldError {
                    field: f.field.clone(),
                    reason: f.reason.clone(),
                }),
            })
            .collect(),
    }
}

impl GrpcIngest {
    /// The call's source and the span its work runs in: the key's name, source and the
    /// caller's address (see [`crate::auth::Caller::span`]).
    fn caller<T>(&self, req: &Request<T>) -> Result<(String, tracing::Span), Status> {
        let md = req.metadata();
        let auth = md.get("authorization").and_then(|v| v.to_str().ok());
        let key = md.get("x-api-key").and_then(|v| v.to_str().ok());
        let peer = req
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let caller = authenticate(&self.keys, auth, key, &peer).ok_or_else(|| {
            Status::from(Refusal::Unauthenticated {
                hint: GRPC_KEY_HINT,
            })
        })?;
        // For the call's completion line (platform::grpc::Traced).
        pulse_platform::http::record_auth_key(req.extensions(), &caller.key);
        let span = caller.span(&peer, "grpc");
        Ok((caller.source, span))
    }

    async fn batch(
        &self,
        source: &str,
        events: Vec<Event>,
        parent: &opentelemetry::Context,
    ) -> Result<BatchResult, Status> {
        if events.is_empty() {
            return Err(Refusal::InvalidBatch("the batch is empty".into()).into());
        }
        if events.len() > self.max_batch_events {
            return Err(Refusal::InvalidBatch(format!(
                "batch has {} events; the limit is {}",
                events.len(),
                self.max_batch_events
            ))
            .into());
        }
        let count = u32::try_from(events.len()).unwrap_or(u32::MAX);
        admit(&self.limiter, source, count)?;
        let incoming = events
            .iter()
            .map(|e| Incoming::parsed(e.encode_to_vec(), event_json(e)))
            .collect();
        self.ingestor
            .ingest(source, "grpc", incoming, parent.clone())
            .await
            .map_err(|e| unavailable(e).into())
    }
}

#[tonic::async_trait]
impl IngestService for GrpcIngest {
    async fn send_events(
        &self,
        request: Request<SendEventsRequest>,
    ) -> Result<Response<SendEventsResponse>, Status> {
        let (source, span) = self.caller(&request)?;
        // The call's `grpc.request` span (platform::grpc::Traced) continues the caller's
        // `traceparent` or starts the trace the answer names.
        let parent =
            crate::http::current_or(pulse_platform::grpc::extract_context(request.metadata()));
        let result = self
            .batch(&source, request.into_inner().events, &parent)
            .instrument(span)
            .await?;
        Ok(Response::new(response(&result, 0)))
    }

    async fn stream_events(
        &self,
        request: Request<Streaming<SendEventsRequest>>,
    ) -> Result<Response<SendEventsResponse>, Status> {
        let (source, span) = self.caller(&request)?;
        // The call's `grpc.request` span (platform::grpc::Traced) continues the caller's
        // `traceparent` or starts the trace the answer names.
        let parent =
            crate::http::current_or(pulse_platform::grpc::extract_context(request.metadata()));
        self.stream_in(source, parent, request.into_inner())
            .instrument(span)
            .await
    }

    type SendEventsStreamStream = ReceiverStream<Result<SendEventsResponse, Status>>;

    async fn send_events_stream(
        &self,
        request: Request<Streaming<SendEventsRequest>>,
    ) -> Result<Response<Self::SendEventsStreamStream>, Status> {
        let (source, span) = self.caller(&request)?;
        // The call's `grpc.request` span (platform::grpc::Traced) continues the caller's
        // `traceparent` or starts the trace the answer names.
        let parent =
            crate::http::current_or(pulse_platform::grpc::extract_context(request.metadata()));
        let mut stream = request.into_inner();
        // Few answers in flight: a client that stops reading stops the intake (backpressure).
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_ANSWERS_IN_FLIGHT);
        let this = self.clone();
        tokio::spawn(
            async move {
                let mut offset = 0usize;
                loop {
                    let answer = match stream.message().await {
                        Ok(Some(chunk)) => {
                            let n = chunk.events.len();
                            let answer = this
                                .batch(&source, chunk.events, &parent)
                                .await
                                .map(|result| response(&result, offset));
                            offset += n;
                            answer
                        }
                        Ok(None) => return,
                        Err(status) => Err(status),
                    };
                    let failed = answer.is_err();
                    // A closed receiver is a client that went away: stop reading its stream.
                    if tx.send(answer).await.is_err() || failed {
                        return;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl GrpcIngest {
    /// `StreamEvents` once the key is known (in the key's span).
    async fn stream_in(
        &self,
        source: String,
        parent: opentelemetry::Context,
        mut stream: Streaming<SendEventsRequest>,
    ) -> Result<Response<SendEventsResponse>, Status> {
        let mut total = SendEventsResponse::default();
        let mut offset = 0usize;
        while let Some(chunk) = stream.message().await? {
            let n = chunk.events.len();
            if offset.saturating_add(n) > self.max_stream_events {
                metrics::counter!(m::EVENTS_TOTAL, "outcome" => "stream_limit", "reason" => "")
                    .increment(n as u64);
                return Err(Refusal::StreamLimit {
                    limit: self.max_stream_events,
                    processed: offset,
                }
                .into());
            }
            let result = self.batch(&source, chunk.events, &parent).await?;
            let part = response(&result, offset);
            total.accepted += part.accepted;
            total.duplicates += part.duplicates;
            total.rejected += part.rejected;
            total.results.extend(part.results);
            offset += n;
        }
        Ok(Response::new(total))
    }
}

/// Answers of a `SendEventsStream` call queued for the client at most.
const STREAM_ANSWERS_IN_FLIGHT: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_print_as_exact_decimals() {
        assert_eq!(micros_to_decimal(19_990_000), "19.990000");
        assert_eq!(micros_to_decimal(1), "0.000001");
        assert_eq!(micros_to_decimal(-1_500_000), "-1.500000");
        assert_eq!(micros_to_decimal(i64::MIN), "-9223372036854.775808");
    }

    fn arb_string() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prelude::prop_oneof![
            proptest::prelude::Just(String::new()),
            "[a-z_]{1,10}",
            proptest::prelude::any::<String>(),
        ]
    }

    proptest::proptest! {
        /// Arbitrary protobuf events (any field values, absent sub-messages) through the
        /// gRPC path's conversion and validation: never a panic, and a rejection always
        /// names a field and a reason.
        #[test]
        fn arbitrary_grpc_events_never_panic(
            id in arb_string(), ty in arb_string(), user in arb_string(), page in arb_string(),
            currency in arb_string(), version in proptest::prelude::any::<u32>(),
            amount in proptest::prelude::any::<Option<i64>>(), ts in proptest::prelude::any::<i64>(),
            has_key in proptest::prelude::any::<bool>(), has_meta in proptest::prelude::any::<bool>(),
            props in proptest::collection::hash_map(arb_string(), arb_string(), 0..4),
        ) {
            use pulse_contracts::pb::events::v1 as ev;
            let e = ev::Event {
                event_id: id,
                schema_version: version,
                event_type: ty,
                key: has_key.then(|| ev::EventKey { user_id: user, session_id: String::new() }),
                payload: Some(ev::Payload { page, currency, amount_micros: amount, properties: props, ..Default::default() }),
                metadata: has_meta.then(|| ev::Metadata { event_timestamp_ms: ts, ..Default::default() }),
                ingest: None,
            };
            let json = serde_json::to_vec(&event_json(&e)).unwrap();
            match crate::validate::validate(&json, 1_764_000_000_000, &crate::validate::Limits::default()) {
                Ok(valid) => proptest::prop_assert!(!valid.event_id.is_empty()),
                Err(err) => proptest::prop_assert!(!err.reason.is_empty() && !err.code.is_empty()),
            }
        }
    }
}
