//! The served side of the revenue check: `GET /v1/revenue?step=1h` of the query API (the
//! answer dashboards show, computed from the aggregates), its decimal amounts parsed back
//! to exact micros — never through a float. Summing the raw events is `reconcile`'s.

use std::collections::BTreeMap;
use std::time::Duration;

use pulse_platform::secret::Secret;
use serde::Deserialize;

/// Why the served revenue could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RevenueError {
    #[error("query API {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("query API {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("query API {url}: unexpected answer: {reason}")]
    Answer { url: String, reason: String },
    /// The TLS handshake failed: the reason says what to set (see `query_tls`).
    #[error("query API {url}: TLS handshake failed: {reason}")]
    Tls { url: String, reason: String },
}

#[derive(Debug, Deserialize)]
struct Answer {
    series: Vec<Point>,
}

#[derive(Debug, Deserialize)]
struct Point {
    ts: String,
    currency: String,
    amount: String,
}

/// `"12.34"` → 12_340_000; at most six fraction digits, an optional leading `-`.
pub fn parse_micros(s: &str) -> Result<i128, String> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (units, frac) = body.split_once('.').unwrap_or((body, "0"));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(units) || !digits(frac) || frac.len() > 6 {
        return Err(format!(
            "{s:?} is not a decimal amount with at most six fraction digits"
        ));
    }
    let units: i128 = units
        .parse()
        .map_err(|_| format!("{s:?}: the whole part is too large"))?;
    let frac: i128 = format!("{frac:0<6}")
        .parse()
        .map_err(|_| format!("{s:?}: bad fraction"))?;
    let v = units
        .checked_mul(1_000_000)
        .and_then(|u| u.checked_add(frac))
        .ok_or_else(|| format!("{s:?} is too large"))?;
    Ok(if neg { -v } else { v })
}

/// The query API's revenue per hour and currency for windows starting in `[from, to)`.
pub async fn served(
    http: &reqwest::Client,
    base_url: &str,
    token: &Secret,
    from_ms: i64,
    to_ms: i64,
    timeout: Duration,
) -> Result<BTreeMap<(i64, String), i128>, RevenueError> {
    let url = format!(
        "{}/v1/revenue?from={from_ms}&to={to_ms}&step=1h",
        base_url.trim_end_matches('/')
    );
    let http_err = |source| RevenueError::Http {
        url: url.clone(),
        source,
    };
    let resp = http
        .get(&url)
        .bearer_auth(token.expose())
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| match super::query_tls::tls_failure(&e) {
            Some(reason) => RevenueError::Tls {
                url: url.clone(),
                reason,
            },
            None => http_err(e),
        })?;
    let status = resp.status();
    let body = resp.text().await.map_err(http_err)?;
    if !status.is_success() {
        return Err(RevenueError::Status {
            url,
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        });
    }
    parse_answer(&body).map_err(|reason| RevenueError::Answer { url, reason })
}

/// The (hour, currency) → micros of a `/v1/revenue` answer body.
pub fn parse_answer(body: &str) -> Result<BTreeMap<(i64, String), i128>, String> {
    let a: Answer = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for p in a.series {
        let ts = crate::replay::parse_time(&p.ts).map_err(|e| format!("ts: {e}"))?;
        let micros = parse_micros(&p.amount).map_err(|e| format!("amount: {e}"))?;
        *out.entry((ts, p.currency)).or_insert(0) += micros;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_to_exact_micros() {
        assert_eq!(parse_micros("12.34"), Ok(12_340_000));
        assert_eq!(parse_micros("0.000001"), Ok(1));
        assert_eq!(parse_micros("-2.50"), Ok(-2_500_000));
        assert_eq!(parse_micros("7"), Ok(7_000_000));
        assert_eq!(
            parse_micros("9223372036854.775807"),
            Ok(i128::from(i64::MAX))
        );
        for bad in ["", "1.2345678", "1e3", "abc", "1.", ".5", "--1", "1.-2"] {
            assert!(parse_micros(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn an_answer_becomes_hour_and_currency_buckets() {
        let body = r#"{"from":"x","to":"y","step":"1h","series":[
            {"ts":"2025-11-25T00:00:00Z","currency":"EUR","amount":"10.50"},
            {"ts":"2025-11-25T00:00:00Z","currency":"USD","amount":"0.000001"}],
            "freshness":{}}"#;
        let got = parse_answer(body).unwrap();
        assert_eq!(got[&(1_764_028_800_000, "EUR".to_owned())], 10_500_000);
        assert_eq!(got[&(1_764_028_800_000, "USD".to_owned())], 1);
        assert!(parse_answer(r#"{"series":[{"ts":"x","currency":"EUR","amount":"1"}]}"#).is_err());
        assert!(parse_answer("not json").is_err());
    }
}
