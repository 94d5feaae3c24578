//! Shared helpers for the integration tests in `tests/tests/`: where the backing services
//! are (environment set by `scripts/test.sh`) and unique names so tests run side by side.
//!
//! A test that needs a backing service fails — never skips — when its address is
//! missing: run the suite with `scripts/test.sh`, which starts the real servers.

pub mod otlp;

use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::s3::S3Config;
use rdkafka::message::{Headers as _, Message};

fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: run the tests with scripts/test.sh, which starts the real servers and sets it"
        ),
    }
}

/// The Kafka-API broker started by `scripts/test.sh`.
pub fn kafka() -> KafkaConfig {
    KafkaConfig::for_brokers(required_env("PULSE_TEST_KAFKA_BROKERS"))
}

/// The ClickHouse server started by `scripts/test.sh`, with the 18.16-safe client defaults.
pub fn clickhouse() -> ClickHouseConfig {
    ClickHouseConfig {
        url: required_env("PULSE_TEST_CLICKHOUSE_URL"),
        ..ClickHouseConfig::default()
    }
}

/// A new file holding `value`, for a `--…-file` flag (secrets are never flags): under the
/// suite's state folder when scripts/test.sh runs the tests (removed with it), else the
/// temporary folder.
pub fn secret_file(name: &str, value: &str) -> String {
    let base = std::env::var_os("PULSE_TEST_STATE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(unique("secrets"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let path = dir.join(name);
    std::fs::write(&path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path.to_string_lossy().into_owned()
}

/// The S3 server (s3s-fs) started by `scripts/test.sh`, with its bucket.
pub fn s3() -> S3Config {
    S3Config {
        endpoint: required_env("PULSE_TEST_S3_ENDPOINT"),
        bucket: required_env("PULSE_TEST_S3_BUCKET"),
        prefix: String::new(),
        region: "us-east-1".into(),
        access_key: required_env("PULSE_TEST_S3_ACCESS_KEY").into(),
        secret_key: required_env("PULSE_TEST_S3_SECRET_KEY").into(),
        ..S3Config::default()
    }
}

/// A name no other test (or earlier run) uses: `prefix` plus a random suffix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A consumer of `topic` on the test broker, as `client_id`, in a consumer group of its own
/// (named `group_prefix` plus a random suffix), reading from the topic's beginning.
pub fn reader(
    client_id: &str,
    group_prefix: &str,
    topic: &str,
) -> pulse_platform::kafka::KafkaConsumer {
    pulse_platform::kafka::KafkaConsumer::new(&kafka(), client_id, &unique(group_prefix), &[topic])
        .map(|(consumer, _rebalances)| consumer)
        .unwrap_or_else(|e| panic!("a consumer of {topic}: {e}"))
}

/// A unique name short enough for s3s-fs: `prefix` plus 16 random hex digits (it stores each
/// object's metadata in a file named after the base64 of the whole key, so keys must stay
/// under ~160 characters).
pub fn short_unique(prefix: &str) -> String {
    let u = unique(prefix);
    format!("{prefix}{}", &u[u.len() - 16..])
}

/// The value of header `name` of record `m`, as (lossy) UTF-8, if it has one.
pub fn header(m: &impl Message, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A benchmark's per-run ratios and their spread: `"0.66, 0.82, 0.76 -> median 0.76 (min
/// 0.66, max 0.82)"` (for an even count, the upper of the two middle values).
pub fn ratio_summary(ratios: &[f64]) -> String {
    let each = ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.get(sorted.len() / 2), sorted.last()) {
        (Some(min), Some(median), Some(max)) => {
            format!("{each} -> median {median:.2} (min {min:.2}, max {max:.2})")
        }
        _ => "no runs".to_owned(),
    }
}

/// The trace headers ingest puts on a record of a request that carried `traceparent`:
/// what OpenTelemetry's W3C propagator writes (`traceparent`, and `tracestate`, empty when
/// the trace has no state). Benchmarks give their baseline records exactly these headers.
pub fn ingest_trace_headers(traceparent: &str) -> rdkafka::message::OwnedHeaders {
    use pulse_contracts::{headers, trace_context};
    use rdkafka::message::OwnedHeaders;
    let incoming = headers::with_str(OwnedHeaders::new(), headers::TRACEPARENT, traceparent);
    trace_context::inject(
        &trace_context::extract(Some(&incoming)),
        OwnedHeaders::new(),
    )
}

/// CPU time (user + system, every thread) of process `pid`, or of this process when
/// `None`, in seconds, from `/proc/<pid>/stat` (Linux). NaN when it cannot be read, so a
/// figure computed from it shows as NaN instead of a wrong number.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    match pid {
        Some(p) => stat_cpu_seconds(&format!("/proc/{p}/stat")),
        None => stat_cpu_seconds("/proc/self/stat"),
    }
}

/// CPU time (user + system) in seconds from a `/proc` stat file: a process's
/// (`/proc/<pid>/stat`) or the calling thread's (`/proc/thread-self/stat`); NaN when
/// unreadable.
pub fn stat_cpu_seconds(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return f64::NAN;
    };
    // The fields after the command name, which is in parentheses and may hold spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, i.e. 11 and 12 after ')'.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        // The kernel's USER_HZ is 100 on every Linux this runs on.
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ingest_trace_headers_are_the_propagators_traceparent_and_tracestate() {
        use rdkafka::message::Headers as _;
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = super::ingest_trace_headers(tp);
        let got: Vec<(&str, &[u8])> = h
            .iter()
            .map(|h| (h.key, h.value.unwrap_or_default()))
            .collect();
        assert_eq!(
            got,
            [("traceparent", tp.as_bytes()), ("tracestate", &b""[..])]
        );
    }

    #[test]
    fn cpu_seconds_grows_with_work_and_is_nan_for_a_missing_process() {
        let before = super::cpu_seconds(None);
        let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = super::cpu_seconds(Some(std::process::id()));
        assert!(after - before >= 0.1, "{before} -> {after}");
        // Pid 0 is the scheduler, never a process with a /proc entry.
        assert!(super::cpu_seconds(Some(0)).is_nan());
    }

    #[test]
    fn ratio_summary_lists_each_ratio_and_the_median_min_and_max() {
        assert_eq!(
            super::ratio_summary(&[0.66, 0.82, 0.76]),
            "0.66, 0.82, 0.76 -> median 0.76 (min 0.66, max 0.82)"
        );
        assert_eq!(super::ratio_summary(&[]), "no runs");
    }
}
