//! Telemetry: `tracing` with JSON (or text) logs that carry the OpenTelemetry trace and
//! span ids, OTLP/HTTP trace export when an endpoint is configured, and a guard that
//! flushes pending spans on exit. The W3C propagator is installed globally.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde_json::{Map, Value};
use tracing::dispatcher::WeakDispatch;
use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Problems, Validate};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, with trace_id and span_id.
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// Logging and tracing settings, shared by every service.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// Log line format.
    #[arg(
        long = "log-format",
        env = "PULSE_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,pulse_ingest=debug`).
    #[arg(long = "log-level", env = "PULSE_LOG", default_value = "info")]
    pub log_filter: String,
    /// OTLP/HTTP collector base URL (e.g. `http://127.0.0.1:4318`); traces are exported
    /// only when set.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0.0..=1.0 (incoming sampled parents are always kept).
    #[arg(
        long = "trace-sample-ratio",
        env = "PULSE_TRACE_SAMPLE_RATIO",
        default_value_t = 1.0
    )]
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_filter: "info".into(),
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

impl Validate for TelemetryConfig {
    fn validate(&self, p: &mut Problems) {
        if let Err(e) = EnvFilter::try_new(&self.log_filter) {
            p.add(
                "--log-level / PULSE_LOG",
                format!("not a valid filter: {e}"),
            );
        }
        p.check(
            (0.0..=1.0).contains(&self.sample_ratio),
            "--trace-sample-ratio / PULSE_TRACE_SAMPLE_RATIO",
            format!("must be within 0.0..=1.0, got {}", self.sample_ratio),
        );
        if let Some(ep) = &self.otlp_endpoint {
            p.check(
                ep.starts_with("http://") || ep.starts_with("https://"),
                "--otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("must be an http(s) URL, got {ep:?}"),
            );
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    #[error("log filter: {0}")]
    Filter(#[source] tracing_subscriber::filter::ParseError),
    #[error("a global subscriber is already installed")]
    AlreadyInstalled,
}

/// Flushes and shuts the tracer down when dropped (at the end of `main`).
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.force_flush() {
            eprintln!("pulse: flushing spans on exit failed: {e}");
        }
        let _ = self.provider.shutdown();
    }
}

/// Installs logging and tracing for `service` (also the OTel `service.name`).
pub fn init(service: &str, cfg: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = tracer_provider(service, cfg)?;
    opentelemetry::global::set_tracer_provider(provider.clone());

    let dispatch = build_dispatch(service, cfg, &provider, std::io::stderr)?;
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    tracing::info!(
        service,
        otlp = cfg.otlp_endpoint.as_deref().unwrap_or("off"),
        "telemetry started"
    );
    Ok(TelemetryGuard { provider })
}

/// The subscriber stack (filter, OpenTelemetry layer, log formatter writing to `writer`).
fn build_dispatch<W>(
    service: &str,
    cfg: &TelemetryConfig,
    provider: &SdkTracerProvider,
    writer: W,
) -> Result<Dispatch, TelemetryError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(&cfg.log_filter).map_err(TelemetryError::Filter)?;
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service.to_owned()));
    let own_dispatch = Arc::new(OnceLock::new());
    let fmt = match cfg.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonWithTrace {
                dispatch: own_dispatch.clone(),
            })
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    };
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(fmt);
    let dispatch = Dispatch::new(subscriber);
    // The formatter resolves OTel ids through its own dispatch (a weak handle, no cycle).
    let _ = own_dispatch.set(dispatch.downgrade());
    Ok(dispatch)
}

fn tracer_provider(
    service: &str,
    cfg: &TelemetryConfig,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    // Spans always get ids (for log correlation); they are exported only with an endpoint.
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))));
    if let Some(endpoint) = &cfg.otlp_endpoint {
        let endpoint = traces_url(endpoint);
        let exporter = SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
            .map_err(TelemetryError::Exporter)?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// The OTLP/HTTP traces URL for a collector base URL (as the OTel env var convention says).
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// JSON log lines: timestamp, level, target, message, the event's fields, the current
/// span's name and fields, and the OpenTelemetry trace_id/span_id of the current span.
struct JsonWithTrace {
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut obj = Map::new();
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        obj.insert("timestamp".into(), Value::String(ts));
        obj.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        obj.insert(
            "target".into(),
            Value::String(event.metadata().target().to_owned()),
        );
        let mut fields = JsonVisitor(Map::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        if let Some(m) = fields.remove("message") {
            obj.insert("message".into(), m);
        }
        if !fields.is_empty() {
            obj.insert("fields".into(), Value::Object(fields));
        }
        if let Some(span) = ctx.lookup_current() {
            let mut span_obj = Map::new();
            span_obj.insert("name".into(), Value::String(span.name().to_owned()));
            // Fields of every span in scope, outermost first; inner spans win on clashes.
            if let Some(scope) = ctx.event_scope() {
                for s in scope.from_root() {
                    let ext = s.extensions();
                    if let Some(f) = ext.get::<FormattedFields<N>>()
                        && let Ok(Value::Object(m)) = serde_json::from_str::<Value>(f)
                    {
                        span_obj.extend(m);
                    }
                }
            }
            obj.insert("span".into(), Value::Object(span_obj));
            let id = span.id();
            drop(span);
            if let Some(dispatch) = self.dispatch.get().and_then(WeakDispatch::upgrade)
                && let Some(cx) = tracing_opentelemetry::get_otel_context(&id, &dispatch)
            {
                let otel_span = cx.span();
                let sc = otel_span.span_context();
                if sc.is_valid() {
                    obj.insert("trace_id".into(), Value::String(sc.trace_id().to_string()));
                    obj.insert("span_id".into(), Value::String(sc.span_id().to_string()));
                }
            }
        }
        let line = serde_json::to_string(&obj).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor(Map<String, Value>);

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::Bool(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.0.insert(field.name().to_owned(), Value::String(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    use crate::test_support::Capture;

    fn log_lines(f: impl FnOnce()) -> Vec<Value> {
        let cfg = TelemetryConfig::default();
        let provider = tracer_provider("test", &cfg).unwrap();
        let capture = Capture::default();
        let dispatch = build_dispatch("test", &cfg, &provider, capture.clone()).unwrap();
        tracing::dispatcher::with_default(&dispatch, f);
        let text = capture.text();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn json_logs_carry_the_incoming_trace_id_and_fields() {
        use opentelemetry::propagation::TextMapPropagator;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let mut carrier = std::collections::HashMap::new();
        carrier.insert(
            "traceparent".to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
        );
        let parent = TraceContextPropagator::new().extract(&carrier);
        let lines = log_lines(|| {
            let span = tracing::info_span!("handle_batch", batch = 7);
            let _ = span.set_parent(parent);
            let _e = span.enter();
            tracing::info!(events = 3, "batch accepted");
        });
        let line = lines
            .iter()
            .find(|l| l["message"] == "batch accepted")
            .unwrap();
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["fields"]["events"], 3);
        assert_eq!(line["span"]["name"], "handle_batch");
        assert_eq!(line["span"]["batch"], 7);
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let span_id = line["span_id"].as_str().unwrap();
        assert_eq!(span_id.len(), 16);
        assert_ne!(
            span_id, "00f067aa0ba902b7",
            "our span is a child, not the remote parent"
        );
    }

    #[test]
    fn json_logs_outside_a_span_have_no_trace_id() {
        let lines = log_lines(|| tracing::warn!("plain"));
        assert_eq!(lines[0]["message"], "plain");
        assert!(lines[0].get("trace_id").is_none());
    }

    #[test]
    fn invalid_telemetry_settings_are_all_reported() {
        let cfg = TelemetryConfig {
            log_filter: "info,[".into(),
            sample_ratio: 2.0,
            otlp_endpoint: Some("collector:4318".into()),
            ..TelemetryConfig::default()
        };
        let err = crate::config::validate_all(&[&cfg]).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
    }
}
