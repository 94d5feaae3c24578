//! The `pulse_ledger_*` metrics of `pulsectl ledger watch` (meaning and use in the README's
//! "Event ledger" section; the correctness SLI is
//! `missing_events_total / checked_events_total`). Every counter moves once per reconciled
//! closed range, by that range's numbers.

use metrics::{Unit, describe_counter, describe_gauge};

use super::reconcile::{Path, Report};

pub const EVENTS_TOTAL: &str = "pulse_ledger_events_total";
pub const CHECKED_TOTAL: &str = "pulse_ledger_checked_events_total";
pub const MISSING_TOTAL: &str = "pulse_ledger_missing_events_total";
pub const DUPLICATE_TOTAL: &str = "pulse_ledger_duplicate_events_total";
pub const UNEXPECTED_TOTAL: &str = "pulse_ledger_unexpected_events_total";
pub const REVENUE_MISMATCHES_TOTAL: &str = "pulse_ledger_revenue_mismatches_total";
pub const RUNS_TOTAL: &str = "pulse_ledger_runs_total";
pub const UNCHECKED_TOTAL: &str = "pulse_ledger_unchecked_events_total";
pub const REVENUE_DELTA: &str = "pulse_ledger_revenue_delta_micros";
pub const LAST_RECONCILED: &str = "pulse_ledger_last_reconciled_timestamp_seconds";
pub const CLOSED: &str = "pulse_ledger_closed_timestamp_seconds";
pub const HELD_EVENTS: &str = "pulse_ledger_held_events";
pub const REREADS_TOTAL: &str = "pulse_ledger_rereads_total";

/// The `currency` label: one of `known`, else `other` (labels stay bounded).
pub fn currency_label(currency: &str, known: &[String]) -> String {
    if known.iter().any(|k| k == currency) {
        currency.to_owned()
    } else {
        "other".to_owned()
    }
}

pub fn describe() {
    describe_counter!(
        EVENTS_TOTAL,
        Unit::Count,
        "Events of reconciled closed ranges by state: accepted (distinct ids on the events topic), clickhouse, archive, aggregated (summed window counts), late, dlq."
    );
    describe_counter!(
        CHECKED_TOTAL,
        Unit::Count,
        "Accepted events whose fate was checked, by path (clickhouse, archive, aggregate): the correctness SLI's denominator."
    );
    describe_counter!(
        MISSING_TOTAL,
        Unit::Count,
        "Accepted events in no terminal state of a path (lost), by path: the correctness SLI's numerator."
    );
    describe_counter!(
        DUPLICATE_TOTAL,
        Unit::Count,
        "Accepted events in more than one terminal state of a path (or counted more than once by an aggregate), by path."
    );
    describe_counter!(
        UNEXPECTED_TOTAL,
        Unit::Count,
        "Event ids stored on a path for a reconciled range that were never accepted, by path."
    );
    describe_counter!(
        REVENUE_MISMATCHES_TOTAL,
        Unit::Count,
        "Hour and currency buckets whose revenue from the raw events differs from the query API's, by currency (bounded list, else other)."
    );
    describe_counter!(
        RUNS_TOTAL,
        Unit::Count,
        "Reconciliations of one closed range by result: ok, mismatch, error (a source could not be read; retried)."
    );
    describe_counter!(
        UNCHECKED_TOTAL,
        Unit::Count,
        "Accepted events read after their window was reconciled (late arrivals) or older than the look-back: not in the other ledger counters; pulsectl ledger --from --to checks them."
    );
    describe_gauge!(
        REVENUE_DELTA,
        "Served minus raw revenue of the last reconciled range, in micros (millionths of the currency unit), by currency."
    );
    describe_gauge!(
        LAST_RECONCILED,
        Unit::Seconds,
        "End (event time, epoch seconds) of the latest reconciled range."
    );
    describe_gauge!(
        CLOSED,
        Unit::Seconds,
        "The closed horizon (epoch seconds): ranges ending at or before it may be reconciled."
    );
    describe_gauge!(
        HELD_EVENTS,
        Unit::Count,
        "Entries the ledger holds in memory, by kind: book (accepted, late and dead-lettered events not reconciled yet; bounded by --max-held-events) and archive (archive rows read, not reconciled yet)."
    );
    describe_counter!(
        REREADS_TOTAL,
        Unit::Count,
        "Times the ledger read the events topic again from its first deferred record: windows over the --max-held-events budget were deferred and are reconciled later."
    );
}

/// Sets the held-entries gauge: `(book entries, archive rows)`.
#[allow(clippy::cast_precision_loss)]
pub fn set_held((book, archive): (usize, usize)) {
    metrics::gauge!(HELD_EVENTS, "kind" => "book").set(book as f64);
    metrics::gauge!(HELD_EVENTS, "kind" => "archive").set(archive as f64);
}

/// Creates every series at zero so that rules see them before the first difference.
pub fn init(currencies: &[String]) {
    for state in [
        "accepted",
        "clickhouse",
        "archive",
        "aggregated",
        "late",
        "dlq",
    ] {
        metrics::counter!(EVENTS_TOTAL, "state" => state).absolute(0);
    }
    for path in Path::ALL {
        for name in [
            CHECKED_TOTAL,
            MISSING_TOTAL,
            DUPLICATE_TOTAL,
            UNEXPECTED_TOTAL,
        ] {
            metrics::counter!(name, "path" => path.label()).absolute(0);
        }
    }
    for c in currencies.iter().map(String::as_str).chain(["other"]) {
        metrics::counter!(REVENUE_MISMATCHES_TOTAL, "currency" => c.to_owned()).absolute(0);
        metrics::gauge!(REVENUE_DELTA, "currency" => c.to_owned()).set(0.0);
    }
    metrics::counter!(UNCHECKED_TOTAL).absolute(0);
    metrics::counter!(REREADS_TOTAL).absolute(0);
    set_held((0, 0));
    for result in ["ok", "mismatch", "error"] {
        metrics::counter!(RUNS_TOTAL, "result" => result).absolute(0);
    }
}

/// Sets the reconciled and closed horizons to `from_ms`, the start of the look-back:
/// everything before it counts as reconciled and closed, so a ledger that makes no progress
/// from its start shows as a growing age (PulseLedgerStalled) even before it could open
/// its sources. Called once at start-up, before the sources are opened.
#[allow(clippy::cast_precision_loss)]
pub fn set_horizon(from_ms: i64) {
    metrics::gauge!(LAST_RECONCILED).set(from_ms as f64 / 1000.0);
    metrics::gauge!(CLOSED).set(from_ms as f64 / 1000.0);
}

/// Counts one reconciled range.
pub fn record(report: &Report, currencies: &[String]) {
    let mut states = [0_u64; 6];
    for w in &report.windows {
        states[0] += w.accepted;
        states[1] += w.clickhouse;
        states[2] += w.archive.unwrap_or(0);
        states[3] += w.aggregated;
        states[4] += w.late;
        states[5] += w.dlq;
    }
    for (state, n) in [
        "accepted",
        "clickhouse",
        "archive",
        "aggregated",
        "late",
        "dlq",
    ]
    .into_iter()
    .zip(states)
    {
        metrics::counter!(EVENTS_TOTAL, "state" => state).increment(n);
    }
    for (path, r) in &report.paths {
        let l = path.label();
        metrics::counter!(CHECKED_TOTAL, "path" => l).increment(r.checked);
        metrics::counter!(MISSING_TOTAL, "path" => l).increment(r.missing_count);
        metrics::counter!(DUPLICATE_TOTAL, "path" => l).increment(r.duplicate_count);
        metrics::counter!(UNEXPECTED_TOTAL, "path" => l).increment(r.unexpected_count);
    }
    let mut deltas: std::collections::BTreeMap<String, i128> = currencies
        .iter()
        .map(|c| (c.clone(), 0))
        .chain([("other".to_owned(), 0)])
        .collect();
    for r in report.revenue.iter().flatten() {
        let label = currency_label(&r.currency, currencies);
        if r.raw != r.served {
            metrics::counter!(REVENUE_MISMATCHES_TOTAL, "currency" => label.clone()).increment(1);
        }
        *deltas.entry(label).or_insert(0) += r.delta();
    }
    for (label, d) in deltas {
        // A gauge is a float: exact up to 2^53 micros (9 billion units), which a delta of
        // one range does not reach; the printed report is exact anyway.
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(REVENUE_DELTA, "currency" => label).set(d as f64);
    }
    let result = if report.is_mismatch() {
        "mismatch"
    } else {
        "ok"
    };
    metrics::counter!(RUNS_TOTAL, "result" => result).increment(1);
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(LAST_RECONCILED).set(report.to_ms as f64 / 1000.0);
}

#[cfg(test)]
mod init_tests {
    use super::*;

    #[test]
    fn a_fresh_scrape_has_every_ledger_series_before_the_first_range() {
        let text = pulse_platform::metrics::scrape_with(|| {
            init(&["EUR".to_owned()]);
            set_horizon(1_700_000_000_000);
        });
        for series in [
            "pulse_ledger_last_reconciled_timestamp_seconds 1700000000",
            "pulse_ledger_closed_timestamp_seconds 1700000000",
            r#"pulse_ledger_missing_events_total{path="clickhouse"} 0"#,
            r#"pulse_ledger_revenue_mismatches_total{currency="other"} 0"#,
            r#"pulse_ledger_runs_total{result="error"} 0"#,
            "pulse_ledger_unchecked_events_total 0",
            "pulse_ledger_rereads_total 0",
            r#"pulse_ledger_held_events{kind="book"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }
}
