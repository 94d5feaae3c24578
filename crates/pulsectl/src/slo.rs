//! `pulsectl slo`: scrapes the services' `/metrics` and reports Pulse's service-level
//! indicators against the product's targets, with the definitions of the recording rules
//! (`deploy/prometheus/rules/pulse-slis.rules.yaml`, targets in
//! `pulse-slo-objectives.rules.yaml`), computed from counters since each process started
//! instead of over windows: freshness (p95 of the writer's ingest → ClickHouse latency ≤ 3 s,
//! with the share within 3 s beside it), correctness (the ledger's missing / checked
//! (event, path) pairs; rows stored / events accepted when no ledger is scraped) and
//! availability (ingest and query-API requests not failed by the server). Parsing the
//! exposition format is `slo::prom`; the metric names come from the services' `metrics.rs`.

pub mod prom;

use std::collections::BTreeMap;
use std::time::Duration;

use self::prom::{Sample, buckets, histogram_quantile, sum};

/// `pulse_writer::metrics::END_TO_END_SECONDS` (ingest timestamp → committed write).
pub const WRITER_END_TO_END: &str = "pulse_writer_end_to_end_latency_seconds";
/// `pulse_writer::metrics::ROWS_WRITTEN_TOTAL`.
pub const WRITER_ROWS_WRITTEN: &str = "pulse_writer_rows_written_total";
/// `pulse_ingest::metrics::EVENTS_TOTAL`.
pub const INGEST_EVENTS: &str = "pulse_ingest_events_total";
/// `pulse_platform::http::HTTP_REQUESTS_TOTAL`.
pub const HTTP_REQUESTS: &str = pulse_platform::http::HTTP_REQUESTS_TOTAL;
/// `pulse_query_api::metrics::GRPC_REQUESTS_TOTAL` (label `code`).
pub const QUERY_GRPC_REQUESTS: &str = "pulse_query_grpc_requests_total";
/// The gRPC codes that count as the server's failure, as in the availability rule.
pub const GRPC_SERVER_FAILURES: [&str; 6] = [
    "Unknown",
    "DeadlineExceeded",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
];
/// The freshness threshold of the objective: the `le="3"` bucket the rules count.
pub const FRESHNESS_THRESHOLD_SECS: f64 = 3.0;
/// The objective's share of events within the threshold (`pulse:slo_objective:ratio`).
pub const FRESHNESS_OBJECTIVE: f64 = 0.95;

#[derive(Debug, Clone, clap::Args)]
pub struct SloArgs {
    /// The services' metrics endpoints, `name=url`, comma-separated; names `ingest`,
    /// `writer` (the ClickHouse writer), `query-api` and `ledger` feed the SLIs (repeat a
    /// name for replicas: their series are summed). Defaults: the local stack's admin ports.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_target,
        default_value = "ingest=http://127.0.0.1:9101/metrics,writer=http://127.0.0.1:9103/metrics,query-api=http://127.0.0.1:9104/metrics,ledger=http://127.0.0.1:9107/metrics"
    )]
    pub metrics: Vec<(String, String)>,
    /// Exit 1 when an SLI misses its target (or cannot be measured).
    #[arg(long)]
    pub check: bool,
    /// Freshness target: p95 of ingest → ClickHouse latency, seconds (the product's
    /// objective: 95 % of events within 3 s).
    #[arg(long, default_value_t = FRESHNESS_THRESHOLD_SECS)]
    pub freshness_p95_secs: f64,
    /// Correctness target (a fraction): (event, path) pairs the ledger found in a terminal
    /// state / pairs checked; without a `ledger` target, rows stored / events accepted.
    #[arg(long, default_value_t = 0.999)]
    pub correctness: f64,
    /// Availability target (a fraction): ingest and query-API requests not failed by the
    /// server (HTTP 5xx; gRPC Unknown, DeadlineExceeded, Unimplemented, Internal,
    /// Unavailable, DataLoss) / all.
    #[arg(long, default_value_t = 0.9995)]
    pub availability: f64,
    /// Timeout of one scrape.
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse_duration)]
    pub timeout: Duration,
    /// Correctness compares the events ingest had accepted at the first scrape with the
    /// rows the writer had stored this long after it (`writer` targets are scraped again),
    /// so events still in flight are not counted as lost. `0` scrapes once.
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse_duration)]
    pub settle: Duration,
}

/// `name=url`.
pub fn parse_target(s: &str) -> Result<(String, String), String> {
    let (name, url) = s
        .trim()
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not name=url"))?;
    if name.is_empty() || !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{s:?} is not name=http(s)://…"));
    }
    Ok((name.to_owned(), url.to_owned()))
}

/// Why the report could not be made, or a target was missed with `--check`.
#[derive(Debug, thiserror::Error)]
pub enum SloError {
    #[error("SLO missed: {}", .0.join(", "))]
    Missed(Vec<String>),
}

/// One indicator.
#[derive(Debug, Clone, PartialEq)]
pub struct Sli {
    pub name: &'static str,
    /// The measured value (seconds for freshness, a fraction otherwise); None when there
    /// is no data to measure it.
    pub value: Option<f64>,
    pub target: f64,
    /// True when the value must be at most the target (freshness), else at least.
    pub at_most: bool,
    /// How it was computed (counts), or why there is no value.
    pub detail: String,
}

impl Sli {
    pub fn passed(&self) -> bool {
        self.value.is_some_and(|v| {
            if self.at_most {
                v <= self.target
            } else {
                v >= self.target
            }
        })
    }

    fn show(&self, v: f64) -> String {
        if self.at_most {
            format!("{v:.3} s")
        } else {
            format!("{:.3} %", v * 100.0)
        }
    }

    /// One report line.
    pub fn line(&self) -> String {
        let value = self
            .value
            .map_or_else(|| "no data".to_owned(), |v| self.show(v));
        let target = format!(
            "{} {}",
            if self.at_most { "<=" } else { ">=" },
            self.show(self.target)
        );
        let status = match (self.value, self.passed()) {
            (None, _) => "NO DATA",
            (_, true) => "PASS",
            (_, false) => "FAIL",
        };
        format!(
            "{:<14} {:>12}  {:<12} {:<8} {}",
            self.name, value, target, status, self.detail
        )
    }
}

/// The SLIs from the samples scraped per service name (replicas concatenated).
pub fn evaluate(scraped: &BTreeMap<String, Vec<Sample>>, args: &SloArgs) -> Vec<Sli> {
    let none = Vec::new();
    let get = |name: &str| scraped.get(name).unwrap_or(&none);
    vec![
        freshness(get("writer"), args),
        correctness(get("ingest"), get("writer"), get("ledger"), args),
        availability(get("ingest"), get("query-api"), args),
    ]
}

fn freshness(writer: &[Sample], args: &SloArgs) -> Sli {
    let b = buckets(writer, WRITER_END_TO_END, &[("sink", "clickhouse")]);
    let observations = b.last().map_or(0.0, |(_, n)| *n);
    let p95 = histogram_quantile(0.95, &b);
    // The rules' SLI: the share in the `le="3"` bucket.
    let within = b
        .iter()
        .find(|(le, _)| (*le - FRESHNESS_THRESHOLD_SECS).abs() < 1e-9)
        .map(|(_, n)| *n);
    Sli {
        name: "freshness p95",
        value: p95,
        target: args.freshness_p95_secs,
        at_most: true,
        detail: match (p95, within) {
            (None, _) => format!("no {WRITER_END_TO_END} observations from writer"),
            (Some(_), Some(w)) if observations > 0.0 => format!(
                "{:.2} % of {observations:.0} records within {FRESHNESS_THRESHOLD_SECS} s (objective {} %); {WRITER_END_TO_END}",
                w / observations * 100.0,
                FRESHNESS_OBJECTIVE * 100.0
            ),
            (Some(_), _) => format!("{WRITER_END_TO_END}, {observations:.0} records"),
        },
    }
}

fn correctness(ingest: &[Sample], writer: &[Sample], ledger: &[Sample], args: &SloArgs) -> Sli {
    let sli = |value, detail| Sli {
        name: "correctness",
        value,
        target: args.correctness,
        at_most: false,
        detail,
    };
    use crate::ledger::metrics::{CHECKED_TOTAL, MISSING_TOTAL};
    if let Some(checked) = sum(ledger, CHECKED_TOTAL, &[]).filter(|c| *c > 0.0) {
        let missing = sum(ledger, MISSING_TOTAL, &[]).unwrap_or(0.0);
        return sli(
            Some(1.0 - missing / checked),
            format!("ledger: {missing:.0} of {checked:.0} (event, path) pairs missing"),
        );
    }
    let accepted = sum(ingest, INGEST_EVENTS, &[("outcome", "accepted")]);
    let written = sum(
        writer,
        WRITER_ROWS_WRITTEN,
        &[("sink", "clickhouse"), ("table", "events")],
    );
    match (accepted, written) {
        (Some(a), w) if a > 0.0 => {
            let w = w.unwrap_or(0.0);
            // Capped at 1: rows accepted after the first scrape (or rewritten after a
            // writer restart) are stored too, and do not make up for lost ones.
            sli(
                Some((w / a).min(1.0)),
                format!("{w:.0} rows stored of {a:.0} events accepted (no ledger checks scraped)"),
            )
        }
        _ => sli(
            None,
            "no ledger checks and no accepted events counted by ingest".into(),
        ),
    }
}

fn availability(ingest: &[Sample], query: &[Sample], args: &SloArgs) -> Sli {
    let http = |samples: &[Sample]| {
        let total = sum(samples, HTTP_REQUESTS, &[]).unwrap_or(0.0);
        let failed: f64 = samples
            .iter()
            .filter(|s| {
                s.name == HTTP_REQUESTS
                    && s.labels.get("status").is_some_and(|v| v.starts_with('5'))
            })
            .map(|s| s.value)
            // fold from +0.0: an empty f64 `sum()` is -0.0, shown as "-0".
            .fold(0.0, |a, b| a + b);
        (failed, total)
    };
    let (ingest_failed, ingest_total) = http(ingest);
    let (query_failed, query_total) = http(query);
    let grpc_total = sum(query, QUERY_GRPC_REQUESTS, &[]).unwrap_or(0.0);
    let grpc_failed: f64 = query
        .iter()
        .filter(|s| {
            s.name == QUERY_GRPC_REQUESTS
                && s.labels
                    .get("code")
                    .is_some_and(|c| GRPC_SERVER_FAILURES.contains(&c.as_str()))
        })
        .map(|s| s.value)
        .fold(0.0, |a, b| a + b);
    let failed = ingest_failed + query_failed + grpc_failed;
    let total = ingest_total + query_total + grpc_total;
    Sli {
        name: "availability",
        value: (total > 0.0).then(|| 1.0 - failed / total),
        target: args.availability,
        at_most: false,
        detail: if total > 0.0 {
            format!(
                "{failed:.0} of {total:.0} requests failed by the server (ingest HTTP {ingest_failed:.0}/{ingest_total:.0}, query HTTP {query_failed:.0}/{query_total:.0}, query gRPC {grpc_failed:.0}/{grpc_total:.0})"
            )
        } else {
            "no ingest or query-API requests counted".into()
        },
    }
}

/// Scrapes every target; returns the samples per name and one line per target.
pub async fn scrape(
    targets: &[(String, String)],
    timeout: Duration,
) -> (BTreeMap<String, Vec<Sample>>, Vec<String>) {
    let client = reqwest::Client::builder().timeout(timeout).build();
    let mut out: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let mut lines = Vec::new();
    for (name, url) in targets {
        let result = match &client {
            Ok(c) => fetch(c, url).await,
            Err(e) => {
                lines.push(format!("{name:<10} {url}  scrape failed: {e}"));
                continue;
            }
        };
        match result {
            Ok(samples) => {
                lines.push(format!("{name:<10} {url}  {} samples", samples.len()));
                out.entry(name.clone()).or_default().extend(samples);
            }
            Err(e) => lines.push(format!("{name:<10} {url}  scrape failed: {e}")),
        }
    }
    (out, lines)
}

/// Why one target could not be scraped (reported on its line, the others still count).
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error("{0}")]
    Parse(#[from] prom::ParseError),
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<Sample>, ScrapeError> {
    let resp = client.get(url).send().await?;
    if !resp.status().is_success() {
        return Err(ScrapeError::Status(resp.status()));
    }
    let text = resp.text().await?;
    Ok(prom::parse(&text)?)
}

pub async fn run(args: SloArgs) -> Result<(), crate::Error> {
    let (mut scraped, lines) = scrape(&args.metrics, args.timeout).await;
    for l in lines {
        println!("{l}");
    }
    if !args.settle.is_zero() {
        let writers: Vec<(String, String)> = args
            .metrics
            .iter()
            .filter(|(name, _)| name == "writer")
            .cloned()
            .collect();
        if !writers.is_empty() {
            println!(
                "waiting {:?} for events in flight, then scraping the writer again",
                args.settle
            );
            tokio::time::sleep(args.settle).await;
            let (again, lines) = scrape(&writers, args.timeout).await;
            for l in lines {
                println!("{l}");
            }
            scraped.remove("writer");
            scraped.extend(again);
        }
    }
    println!();
    println!(
        "{:<14} {:>12}  {:<12} {:<8} detail",
        "SLI", "value", "target", "status"
    );
    let slis = evaluate(&scraped, &args);
    for s in &slis {
        println!("{}", s.line());
    }
    let missed: Vec<String> = slis
        .iter()
        .filter(|s| !s.passed())
        .map(|s| s.name.to_owned())
        .collect();
    if args.check && !missed.is_empty() {
        return Err(SloError::Missed(missed).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: SloArgs,
    }

    fn scraped(ingest: &str, writer: &str) -> BTreeMap<String, Vec<Sample>> {
        let mut m = BTreeMap::new();
        m.insert("ingest".to_owned(), prom::parse(ingest).unwrap());
        m.insert("writer".to_owned(), prom::parse(writer).unwrap());
        m
    }

    const INGEST: &str = r#"
pulse_ingest_events_total{service="ingest",outcome="accepted",reason=""} 10000
pulse_ingest_events_total{service="ingest",outcome="invalid",reason="missing_field"} 7
pulse_http_requests_total{service="ingest",route="/v1/events",method="POST",status="200"} 4999
pulse_http_requests_total{service="ingest",route="/v1/events",method="POST",status="400"} 1
pulse_http_requests_total{service="ingest",route="/v1/events",method="POST",status="503"} 0
"#;

    fn writer(rows: u64, slow: u64) -> String {
        format!(
            r#"
pulse_writer_rows_written_total{{service="writer",sink="clickhouse",table="events"}} {rows}
pulse_writer_rows_written_total{{service="writer",sink="clickhouse",table="user_activity"}} 555
pulse_writer_end_to_end_latency_seconds_bucket{{service="writer",sink="clickhouse",le="1"}} 50
pulse_writer_end_to_end_latency_seconds_bucket{{service="writer",sink="clickhouse",le="2.5"}} 100
pulse_writer_end_to_end_latency_seconds_bucket{{service="writer",sink="clickhouse",le="3"}} 100
pulse_writer_end_to_end_latency_seconds_bucket{{service="writer",sink="clickhouse",le="10"}} 100
pulse_writer_end_to_end_latency_seconds_bucket{{service="writer",sink="clickhouse",le="30"}} {}
pulse_writer_end_to_end_latency_seconds_bucket{{service="writer",sink="clickhouse",le="+Inf"}} {}
"#,
            100 + slow,
            100 + slow
        )
    }

    #[test]
    fn a_healthy_pipeline_passes_every_sli() {
        let args = Cli::parse_from(["x"]).args;
        let slis = evaluate(&scraped(INGEST, &writer(10_000, 0)), &args);
        assert!(slis.iter().all(Sli::passed), "{slis:?}");
        // p95 = rank 95 of 100: 45 of the 50 in (1, 2.5].
        assert!((slis[0].value.unwrap() - 2.35).abs() < 1e-9);
        assert_eq!(slis[1].value, Some(1.0));
        assert_eq!(slis[2].value, Some(1.0), "a 400 is not unavailability");
        let no_5xx_series = INGEST.replace("status=\"503\"} 0", "status=\"201\"} 0");
        let slis = evaluate(&scraped(&no_5xx_series, &writer(10_000, 0)), &args);
        assert!(
            slis[2].detail.starts_with("0 of 5000"),
            "{}",
            slis[2].detail
        );
    }

    #[test]
    fn missing_rows_slow_writes_and_5xx_fail_their_slis() {
        let args = Cli::parse_from(["x"]).args;
        let ingest = INGEST.replace("status=\"503\"} 0", "status=\"503\"} 50");
        let slis = evaluate(&scraped(&ingest, &writer(9_980, 20)), &args);
        let failed: Vec<&str> = slis
            .iter()
            .filter(|s| !s.passed())
            .map(|s| s.name)
            .collect();
        assert_eq!(failed, vec!["freshness p95", "correctness", "availability"]);
        assert!(slis[0].value.unwrap() > 10.0);
        assert!(slis[1].line().contains("99.800 %"), "{}", slis[1].line());
        assert!(
            slis[0]
                .detail
                .starts_with("83.33 % of 120 records within 3 s (objective 95 %)"),
            "{}",
            slis[0].detail
        );
    }

    #[test]
    fn the_defaults_are_the_objectives_of_the_rules() {
        let args = Cli::parse_from(["x"]).args;
        let rules =
            include_str!("../../../deploy/prometheus/rules/pulse-slo-objectives.rules.yaml");
        let objective = |slo: &str| -> f64 {
            let at = rules
                .find(&format!("slo: {slo}"))
                .unwrap_or_else(|| panic!("no objective for {slo}"));
            let expr = rules[..at].rfind("expr: vector(").unwrap() + "expr: vector(".len();
            let end = expr + rules[expr..].find(')').unwrap();
            rules[expr..end].parse().unwrap()
        };
        assert_eq!(args.correctness, objective("correctness"));
        assert_eq!(args.availability, objective("availability"));
        assert_eq!(FRESHNESS_OBJECTIVE, objective("freshness"));
        assert!(
            rules.contains("pulse:slo_freshness_threshold:seconds\n        expr: vector(3)\n"),
            "the rules' threshold is 3 s"
        );
        assert_eq!(args.freshness_p95_secs, FRESHNESS_THRESHOLD_SECS);
        assert_eq!(FRESHNESS_THRESHOLD_SECS, 3.0);
        let names: Vec<&str> = args.metrics.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ingest", "writer", "query-api", "ledger"]);
    }

    #[test]
    fn the_ledger_decides_correctness_and_query_api_failures_count_against_availability() {
        let args = Cli::parse_from(["x"]).args;
        let mut m = scraped(INGEST, &writer(5_000, 0));
        m.insert(
            "ledger".into(),
            prom::parse(
                r#"
pulse_ledger_checked_events_total{path="clickhouse"} 6000
pulse_ledger_checked_events_total{path="archive"} 4000
pulse_ledger_missing_events_total{path="archive"} 20
"#,
            )
            .unwrap(),
        );
        m.insert(
            "query-api".into(),
            prom::parse(
                r#"
pulse_http_requests_total{service="query-api",route="/v1/top_pages",method="GET",status="200"} 3990
pulse_http_requests_total{service="query-api",route="/v1/top_pages",method="GET",status="504"} 5
pulse_query_grpc_requests_total{method="ActiveUsers",code="Ok"} 995
pulse_query_grpc_requests_total{method="ActiveUsers",code="InvalidArgument"} 5
pulse_query_grpc_requests_total{method="ActiveUsers",code="Unavailable"} 5
"#,
            )
            .unwrap(),
        );
        let slis = evaluate(&m, &args);
        // 20 of 10,000 pairs missing, although rows / accepted would say 50 %.
        assert_eq!(slis[1].value, Some(0.998));
        assert!(
            slis[1].detail.starts_with("ledger: 20 of 10000"),
            "{}",
            slis[1].detail
        );
        // 5 (504) + 5 (Unavailable) of 5000 + 3995 + 1005 requests; 400 and InvalidArgument
        // are the client's.
        assert_eq!(slis[2].value, Some(1.0 - 10.0 / 10_000.0));
        assert!(!slis[2].passed(), "99.9 % < 99.95 %");
        assert!(
            slis[2].detail.contains("query gRPC 5/1005"),
            "{}",
            slis[2].detail
        );
    }

    #[test]
    fn no_data_is_reported_and_never_passes() {
        let args = Cli::parse_from(["x"]).args;
        let slis = evaluate(&BTreeMap::new(), &args);
        assert!(slis.iter().all(|s| s.value.is_none() && !s.passed()));
        assert!(slis[0].line().contains("NO DATA"));
    }

    #[test]
    fn targets_parse_as_name_equals_url() {
        assert_eq!(
            parse_target("ingest=http://h:9101/metrics"),
            Ok(("ingest".into(), "http://h:9101/metrics".into()))
        );
        assert!(parse_target("ingest").is_err());
        assert!(parse_target("ingest=h:9101").is_err());
    }
}
