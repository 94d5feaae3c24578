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

/// The S3 server (s3s-fs) started by `scripts/test.sh`, with its bucket.
pub fn s3() -> S3Config {
    S3Config {
        endpoint: required_env("PULSE_TEST_S3_ENDPOINT"),
        bucket: required_env("PULSE_TEST_S3_BUCKET"),
        prefix: String::new(),
        region: "us-east-1".into(),
        access_key: required_env("PULSE_TEST_S3_ACCESS_KEY"),
        secret_key: required_env("PULSE_TEST_S3_SECRET_KEY"),
        path_style: true,
    }
}

/// A name no other test (or earlier run) uses: `prefix` plus a random suffix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
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

#[cfg(test)]
mod tests {
    #[test]
    fn ratio_summary_lists_each_ratio_and_the_median_min_and_max() {
        assert_eq!(
            super::ratio_summary(&[0.66, 0.82, 0.76]),
            "0.66, 0.82, 0.76 -> median 0.76 (min 0.66, max 0.82)"
        );
        assert_eq!(super::ratio_summary(&[]), "no runs");
    }
}
