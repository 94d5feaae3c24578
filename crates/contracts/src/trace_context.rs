//! W3C trace context in Kafka headers, through the OpenTelemetry propagator.
//!
//! Producers inject the current span's context as `traceparent`/`tracestate`; consumers
//! extract it and make it the parent of their processing span. A missing or malformed
//! `traceparent` yields an empty context (a new trace starts) and is never an error.

use std::collections::BTreeMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
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
///
/// The processor calls this for every record, so it reads the two headers in place instead
/// of copying them into a [`KafkaTraceCarrier`] for the OpenTelemetry propagator (a map of
/// owned strings and a `Vec` of parts per record, ~8 % of the processor core's profile).
/// The parsing is the propagator's, step for step ([`parse_traceparent`]); a test compares
/// the two on the W3C cases and on random input. The last UTF-8 header of a name wins, as in
/// the carrier.
pub fn extract<H: Headers>(headers: Option<&H>) -> Context {
    let (mut parent, mut state) = (None, None);
    if let Some(headers) = headers {
        for h in headers.iter() {
            let slot = match h.key {
                headers::TRACEPARENT => &mut parent,
                headers::TRACESTATE => &mut state,
                _ => continue,
            };
            if let Some(v) = h.value.and_then(|v| std::str::from_utf8(v).ok()) {
                *slot = Some(v);
            }
        }
    }
    Context::map_current(|cx| match parse_traceparent(parent, state) {
        Some(sc) => cx.with_remote_span_context(sc),
        None => cx.clone(),
    })
}

/// The span context of a `traceparent` (and `tracestate`) header value, exactly as
/// `opentelemetry_sdk`'s `TraceContextPropagator` reads it, without allocating unless a
/// non-empty `tracestate` is present: the value trimmed and split on `-` (a trailing `-`
/// ends the last part); at least four parts, a hex version up to 254 (version 0: exactly
/// four parts; a later version may carry more); lowercase hex trace id, span id and flags;
/// only the sampled flag kept; an invalid `tracestate` gives an empty one; an all-zero trace
/// or span id gives none.
pub fn parse_traceparent(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<SpanContext> {
    const MAX_VERSION: u8 = 254;
    let value = traceparent.unwrap_or("").trim();
    let mut parts = value.split_terminator('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let more = parts.next().is_some();
    let version = u8::from_str_radix(version, 16).ok()?;
    if version > MAX_VERSION || version == 0 && more {
        return None;
    }
    let lower = |s: &str| !s.bytes().any(|b| b.is_ascii_uppercase());
    if !lower(trace_id) || !lower(span_id) || !lower(flags) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let trace_flags = TraceFlags::new(flags) & TraceFlags::SAMPLED;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let trace_state = match tracestate {
        Some(s) if !s.is_empty() => s.parse().unwrap_or_default(),
        _ => TraceState::default(),
    };
    Some(SpanContext::new(
        trace_id,
        span_id,
        trace_flags,
        true,
        trace_state,
    ))
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

    /// What the OpenTelemetry propagator makes of the two header values (through the
    /// carrier, as `extract` did before it parsed them itself).
    fn by_propagator(parent: Option<&str>, state: Option<&str>) -> Option<SpanContext> {
        let mut carrier = KafkaTraceCarrier::default();
        if let Some(p) = parent {
            carrier.set(headers::TRACEPARENT, p.to_owned());
        }
        if let Some(s) = state {
            carrier.set(headers::TRACESTATE, s.to_owned());
        }
        let cx = TraceContextPropagator::new().extract(&carrier);
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.clone())
    }

    fn header_pair(parent: Option<&str>, state: Option<&str>) -> OwnedHeaders {
        let mut h = OwnedHeaders::new();
        if let Some(p) = parent {
            h = headers::with_str(h, headers::TRACEPARENT, p);
        }
        if let Some(s) = state {
            h = headers::with_str(h, headers::TRACESTATE, s);
        }
        h
    }

    fn by_extract(parent: Option<&str>, state: Option<&str>) -> Option<SpanContext> {
        let cx = extract(Some(&header_pair(parent, state)));
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.clone())
    }

    /// The W3C trace-context cases (https://www.w3.org/TR/trace-context/#traceparent-header
    /// and the propagator's own test table): the direct parse agrees with the propagator on
    /// each, and the valid ones are what the specification says.
    #[test]
    fn the_direct_parse_agrees_with_the_propagator_on_the_w3c_cases() {
        const ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
        const SPAN: &str = "00f067aa0ba902b7";
        let valid: &[(&str, bool)] = &[
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                true,
            ),
            // Unknown flags are accepted and cleared; only "sampled" is kept.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03",
                true,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-08",
                false,
            ),
            // Later versions: parsed as version 00, extra fields ignored.
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-",
                true,
            ),
            (
                "02-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
                true,
            ),
            (
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
                true,
            ),
            (
                "02-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-XYZxsf09",
                true,
            ),
            // A trailing '-' ends the last part, surrounding whitespace is trimmed.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                true,
            ),
            (
                "  00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\t",
                true,
            ),
        ];
        for (tp, sampled) in valid {
            for state in [
                None,
                Some(""),
                Some("foo=bar,rojo=00f067aa0ba902b7"),
                Some("not a list"),
            ] {
                let sc = parse_traceparent(Some(tp), state)
                    .unwrap_or_else(|| panic!("{tp:?} is a valid traceparent"));
                assert_eq!(sc.trace_id().to_string(), ID, "{tp:?}");
                assert_eq!(sc.span_id().to_string(), SPAN, "{tp:?}");
                assert_eq!(sc.is_sampled(), *sampled, "{tp:?}");
                assert!(sc.is_remote());
                assert_eq!(
                    Some(sc.clone()),
                    by_propagator(Some(tp), state),
                    "{tp:?} {state:?}"
                );
                assert_eq!(Some(sc), by_extract(Some(tp), state), "{tp:?} {state:?}");
            }
        }
        let sc = parse_traceparent(Some(valid[1].0), Some("foo=bar,rojo=00f067aa0ba902b7"));
        let state = sc.map(|sc| sc.trace_state().header());
        assert_eq!(state.as_deref(), Some("foo=bar,rojo=00f067aa0ba902b7"));
        // An invalid tracestate is dropped, the parent kept.
        let sc = parse_traceparent(Some(valid[1].0), Some("not a list"));
        assert_eq!(sc.map(|sc| sc.trace_state().header()).as_deref(), Some(""));

        let invalid = [
            "",
            "garbage",
            "00",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0000-00000000000000000000000000000000-0000000000000000-01",
            "00-ab00000000000000000000000000000000-cd00000000000000-01",
            "00-ab000000000000000000000000000000-cd0000000000000000-01",
            "00-ab000000000000000000000000000000-cd00000000000000-0100",
            "qw-00000000000000000000000000000000-0000000000000000-01",
            "00-qw000000000000000000000000000000-cd00000000000000-01",
            "00-ab000000000000000000000000000000-qw00000000000000-01",
            "00-ab000000000000000000000000000000-cd00000000000000-qw",
            "A0-00000000000000000000000000000000-0000000000000000-01",
            "00-AB000000000000000000000000000000-cd00000000000000-01",
            "00-ab000000000000000000000000000000-CD00000000000000-01",
            "00-ab000000000000000000000000000000-cd00000000000000-A1",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-00000000000000000000000000000000-0000000000000000-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-",
            // Version 00 has exactly four fields.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7--01",
        ];
        for tp in invalid {
            assert_eq!(parse_traceparent(Some(tp), Some("foo=bar")), None, "{tp:?}");
            assert_eq!(by_propagator(Some(tp), Some("foo=bar")), None, "{tp:?}");
            assert_eq!(by_extract(Some(tp), Some("foo=bar")), None, "{tp:?}");
        }
        assert_eq!(parse_traceparent(None, Some("foo=bar")), None);
        assert_eq!(by_extract(None, Some("foo=bar")), None);
    }

    #[test]
    fn the_last_utf8_header_of_a_name_wins_as_in_the_carrier() {
        let first = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let last = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let h = headers::with_str(header_pair(Some(first), None), headers::TRACEPARENT, last);
        let h = h.insert(rdkafka::message::Header {
            key: headers::TRACEPARENT,
            value: Some(&[0xff_u8][..]),
        });
        let by_carrier =
            TraceContextPropagator::new().extract(&KafkaTraceCarrier::from_headers(&h));
        let cx = extract(Some(&h));
        assert_eq!(
            trace_id_hex(&cx).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(trace_id_hex(&cx), trace_id_hex(&by_carrier));
    }

    proptest::proptest! {
        /// Random traceparents near the valid shape (hex digits of either case, dashes,
        /// spaces, other characters; right or wrong field lengths): the direct parse and
        /// the propagator agree on every one.
        #[test]
        fn the_direct_parse_agrees_with_the_propagator_on_random_input(
            tp in "[ 0-9a-fA-F+-]{0,3}(-[0-9a-fA-FxX+ ]{0,34}){0,6}-?",
            state in proptest::option::of("[a-z0-9=, @*/_-]{0,24}"),
        ) {
            proptest::prop_assert_eq!(
                parse_traceparent(Some(&tp), state.as_deref()),
                by_propagator(Some(&tp), state.as_deref())
            );
        }

        /// Traceparents of the valid shape with one field at a time possibly wrong (case,
        /// length, zeros, version, extra fields): agreement again, valid ones included.
        #[test]
        fn the_direct_parse_agrees_with_the_propagator_near_the_valid_shape(
            version in "(00|01|7f|fe|ff|0A|a|000)",
            trace_id in "([0-9a-f]{32}|0{32}|[0-9a-fA-F]{31,33})",
            span_id in "([0-9a-f]{16}|0{16}|[0-9a-fA-F]{15,17})",
            flags in "(00|01|09|ff|F1|1|001)",
            rest in "(|-|-[0-9a-z]{1,4}|--)",
            state in proptest::option::of("(|[a-z]{1,4}=[a-z0-9]{1,4}(,[a-z]{1,4}=[a-z0-9]{1,4}){0,2}|bad)"),
        ) {
            let tp = format!("{version}-{trace_id}-{span_id}-{flags}{rest}");
            proptest::prop_assert_eq!(
                parse_traceparent(Some(&tp), state.as_deref()),
                by_propagator(Some(&tp), state.as_deref())
            );
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
