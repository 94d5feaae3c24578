//! A small parser of the Prometheus text exposition format (version 0.0.4: comments,
//! `name{label="value",…} value [timestamp]`, escaped label values, ±Inf and NaN) and the
//! histogram arithmetic the SLO report needs: summing series and interpolating a quantile
//! from cumulative buckets the way PromQL's `histogram_quantile` does. Scraping is left to
//! the caller.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A line that is not valid exposition text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Parses a float as the format writes it (`+Inf`, `-Inf`, `NaN` included).
pub fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses exposition text into samples (comments and blank lines skipped).
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|reason| ParseError {
            line: i + 1,
            reason,
        })?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let mut chars = line.char_indices().peekable();
    match chars.peek() {
        Some((_, c)) if is_name_start(*c) => {}
        _ => return Err(format!("expected a metric name: {line:?}")),
    }
    let mut name_end = line.len();
    for (i, c) in chars.by_ref() {
        if !is_name_char(c) {
            name_end = i;
            break;
        }
    }
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("{name}: missing value"))?;
    let value = parse_value(value).ok_or_else(|| format!("{name}: bad value {value:?}"))?;
    if let Some(ts) = fields.next()
        && ts.parse::<i64>().is_err()
    {
        return Err(format!("{name}: bad timestamp {ts:?}"));
    }
    if fields.next().is_some() {
        return Err(format!("{name}: trailing text"));
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` (after the `{`); returns the text after the `}`.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = s.find('=').ok_or("label without =")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.starts_with(is_name_start) || !key.chars().all(is_name_char) {
            return Err(format!("bad label name {key:?}"));
        }
        s = s[eq + 1..].trim_start();
        let Some(body) = s.strip_prefix('"') else {
            return Err(format!("label {key}: value must be quoted"));
        };
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in body.char_indices() {
            if escaped {
                value.push(match c {
                    'n' => '\n',
                    other => other,
                });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end.ok_or_else(|| format!("label {key}: unterminated value"))?;
        labels.insert(key.to_owned(), value);
        s = body[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err(format!("after label {key}: expected , or }}"));
        }
    }
}

/// Whether `sample` carries every `(label, value)` of `filter`.
pub fn matches(sample: &Sample, filter: &[(&str, &str)]) -> bool {
    filter
        .iter()
        .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
}

/// The sum of every series named `name` that matches `filter`; None when there is none.
pub fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> Option<f64> {
    let mut found = false;
    let total = samples
        .iter()
        .filter(|s| s.name == name && matches(s, filter))
        .inspect(|_| found = true)
        .map(|s| s.value)
        .sum();
    found.then_some(total)
}

/// The cumulative buckets `(le, count)` of histogram `name` (its `_bucket` series matching
/// `filter`, summed over the other labels), ordered by `le`.
pub fn buckets(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for s in samples
        .iter()
        .filter(|s| s.name == bucket && matches(s, filter))
    {
        let Some(le) = s.labels.get("le").and_then(|v| parse_value(v)) else {
            continue;
        };
        match by_le.iter_mut().find(|(l, _)| *l == le) {
            Some((_, n)) => *n += s.value,
            None => by_le.push((le, s.value)),
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
}

/// The q-quantile of cumulative buckets, as PromQL's `histogram_quantile`: linear
/// interpolation inside the bucket holding rank q·total (from 0 for the first bucket); in
/// the +Inf bucket, the highest finite bound. None without a +Inf bucket or observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    if b.len() < 2 || b.last().is_none_or(|(le, _)| *le != f64::INFINITY) {
        return None;
    }
    // Counts must not decrease (a scrape taken mid-update may show that).
    for i in 1..b.len() {
        if b[i].1 < b[i - 1].1 {
            b[i].1 = b[i - 1].1;
        }
    }
    let total = b.last()?.1;
    if total <= 0.0 || q.is_nan() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    let rank = q * total;
    let i = b.iter().position(|(_, n)| *n >= rank)?;
    if i == b.len() - 1 {
        return Some(b[b.len() - 2].0);
    }
    let (end, count) = b[i];
    let (start, below) = if i == 0 {
        if end <= 0.0 {
            return Some(end);
        }
        (0.0, 0.0)
    } else {
        b[i - 1]
    };
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(end);
    }
    Some(start + (end - start) * ((rank - below) / in_bucket))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP pulse_http_requests_total HTTP requests served.
# TYPE pulse_http_requests_total counter
pulse_http_requests_total{service="ingest",route="/v1/events",method="POST",status="200"} 990
pulse_http_requests_total{service="ingest",route="/v1/events",method="POST",status="503"} 10

# TYPE lat histogram
lat_bucket{le="0.1",sink="clickhouse"} 50
lat_bucket{le="1",sink="clickhouse"} 90
lat_bucket{le="+Inf",sink="clickhouse"} 100
lat_sum{sink="clickhouse"} 42.5
lat_count{sink="clickhouse"} 100
odd{path="a \"quoted\" \\ back\nslash",} -Inf 1700000000000
up 1
"#;

    #[test]
    fn exposition_text_parses_with_labels_escapes_and_special_values() {
        let s = parse(TEXT).unwrap();
        assert_eq!(s.len(), 9);
        assert_eq!(s[0].name, "pulse_http_requests_total");
        assert_eq!(s[0].labels["status"], "200");
        assert_eq!(s[0].value, 990.0);
        let odd = s.iter().find(|x| x.name == "odd").unwrap();
        assert_eq!(odd.labels["path"], "a \"quoted\" \\ back\nslash");
        assert_eq!(odd.value, f64::NEG_INFINITY);
        assert!(s.iter().any(|x| x.name == "up" && x.labels.is_empty()));
        assert_eq!(
            sum(&s, "pulse_http_requests_total", &[("status", "503")]),
            Some(10.0)
        );
        assert_eq!(sum(&s, "pulse_http_requests_total", &[]), Some(1000.0));
        assert_eq!(sum(&s, "missing", &[]), None);
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        for bad in [
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x abc",
            "{a=\"1\"} 2",
            "x 1 notatime",
            "x",
        ] {
            let err = parse(&format!("# ok\n{bad}\n")).unwrap_err();
            assert_eq!(err.line, 2, "{bad}: {err}");
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_promql() {
        let s = parse(TEXT).unwrap();
        let b = buckets(&s, "lat", &[("sink", "clickhouse")]);
        assert_eq!(b, vec![(0.1, 50.0), (1.0, 90.0), (f64::INFINITY, 100.0)]);
        // Rank 25 of 50 in [0, 0.1]: halfway.
        assert!((histogram_quantile(0.25, &b).unwrap() - 0.05).abs() < 1e-12);
        // Rank 70: 20 of the 40 in (0.1, 1].
        assert!((histogram_quantile(0.7, &b).unwrap() - 0.55).abs() < 1e-12);
        // Rank 95 is in +Inf: the highest finite bound.
        assert_eq!(histogram_quantile(0.95, &b), Some(1.0));
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 5.0)]),
            None,
            "no +Inf bucket"
        );
    }

    #[test]
    fn buckets_of_several_series_are_summed() {
        let text = "h_bucket{i=\"a\",le=\"1\"} 1\nh_bucket{i=\"a\",le=\"+Inf\"} 2\n\
                    h_bucket{i=\"b\",le=\"1\"} 3\nh_bucket{i=\"b\",le=\"+Inf\"} 3\n";
        let b = buckets(&parse(text).unwrap(), "h", &[]);
        assert_eq!(b, vec![(1.0, 4.0), (f64::INFINITY, 5.0)]);
        assert!((histogram_quantile(0.5, &b).unwrap() - 0.625).abs() < 1e-12);
    }
}
