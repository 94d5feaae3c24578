//! W3C trace context in Kafka headers, through the OpenTelemetry propagator.
//!
//! Producers inject the current span's context as `traceparent`/`tracestate`; consumers
//! extract it and make it the parent of their processing span. A missing or malformed
//! `traceparent` yields an empty context (a new trace starts) and is never an error.

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::{Context, trace::TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::{Headers, OwnedHeaders};

use crate::headers;

/// A text-map carrier holding the trace headers of one Kafka record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KafkaTraceCarrier(BTreeMap<String, String>);

impl Injector for KafkaTraceCarrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl Extractor for KafkaTraceCarrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl KafkaTraceCarrier {
    /// Reads the trace headers (and nothing else) from a record's headers.
    /// Headers with non-UTF-8 values are skipped.
    pub fn from_headers<H: Headers>(headers: &H) -> Self {
        let mut map = BTreeMap::new();
        for h in headers.iter() {
            if (h.key == headers::TRACEPARENT || h.key == headers::TRACESTATE)
                && let Some(v) = h.value.and_then(|v| std::str::from_utf8(v).ok())
            {
                map.insert(h.key.to_owned(), v.to_owned());
            }
        }
        Self(map)
    }

    /// Appends the carried headers to `headers`.
    pub fn append_to(&self, mut headers: OwnedHeaders) -> OwnedHeaders {
        for (k, v) in &self.0 {
            headers = headers::with_str(headers, k, v);
        }
        headers
    }

    /// The `traceparent` value, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.0.get(headers::TRACEPARENT).map(String::as_str)
    }
}

/// Injects `cx`'s span context into `headers` as `traceparent`/`tracestate`.
/// A context without a valid span adds nothing.
pub fn inject(cx: &Context, headers: OwnedHeaders) -> OwnedHeaders {
    let mut carrier = KafkaTraceCarrier::default();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.append_to(headers)
}

/// Extracts the remote parent context from a record's headers. Never fails: a missing
/// or malformed `traceparent` gives a context whose span is invalid.
pub fn extract<H: Headers>(headers: Option<&H>) -> Context {
    let carrier = headers
        .map(KafkaTraceCarrier::from_headers)
        .unwrap_or_default();
    TraceContextPropagator::new().extract(&carrier)
}

/// The hex trace id of `cx`, if it carries a valid span context.
pub fn trace_id_hex(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    fn remote_context() -> Context {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "v1")]).unwrap(),
        );
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn trace_context_round_trips_through_kafka_headers() {
        let headers = inject(&remote_context(), OwnedHeaders::new());
        let carrier = KafkaTraceCarrier::from_headers(&headers);
        assert_eq!(
            carrier.traceparent(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let cx = extract(Some(&headers));
        assert_eq!(
            trace_id_hex(&cx).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let span = cx.span();
        assert_eq!(span.span_context().trace_state().get("vendor"), Some("v1"));
    }

    #[test]
    fn malformed_traceparent_is_ignored_not_fatal() {
        for bad in [
            "",
            "garbage",
            "00-zzzz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            let headers = headers::with_str(OwnedHeaders::new(), headers::TRACEPARENT, bad);
            let cx = extract(Some(&headers));
            assert_eq!(trace_id_hex(&cx), None, "{bad:?} should give no trace");
        }
    }

    #[test]
    fn non_utf8_trace_header_is_skipped() {
        let headers = OwnedHeaders::new().insert(rdkafka::message::Header {
            key: headers::TRACEPARENT,
            value: Some(&[0xff_u8, 0xfe][..]),
        });
        assert_eq!(trace_id_hex(&extract(Some(&headers))), None);
    }

    #[test]
    fn no_headers_gives_an_empty_context() {
        assert_eq!(trace_id_hex(&extract::<OwnedHeaders>(None)), None);
    }

    #[test]
    fn context_without_span_injects_nothing() {
        let headers = inject(&Context::new(), OwnedHeaders::new());
        assert_eq!(headers.count(), 0);
    }
}
