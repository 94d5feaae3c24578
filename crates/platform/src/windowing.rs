//! The event-time settings that more than one service must agree on, declared once: the
//! tumbling window size and the allowed lateness. The processor computes windows with
//! them; the query API reports watermarks and checks series steps with them. Both flatten
//! [`WindowSettings`], so one `PULSE_WINDOW_MS` / `PULSE_ALLOWED_LATENESS_MS` (one
//! ConfigMap entry in the Helm chart) configures both. Settings that only the processor
//! uses (session gap, out-of-orderness, idle timeout) stay in the processor's config.
//!
//! Upgrades: the names of earlier releases (`PULSE_PROCESSOR_WINDOW_MS`,
//! `PULSE_QUERY_WINDOW_MS`, `PULSE_PROCESSOR_ALLOWED_LATENESS_MS`,
//! `PULSE_QUERY_ALLOWED_LATENESS_MS`) are still read when the new name is not set;
//! legacy names that disagree with each other are refused at start.

use crate::config::{Problems, Validate};

/// Default tumbling window: one minute.
pub const DEFAULT_WINDOW_MS: i64 = 60_000;
/// Default allowed lateness after a window's end: one minute.
pub const DEFAULT_ALLOWED_LATENESS_MS: i64 = 60_000;

/// Environment names of earlier releases, per setting.
pub const LEGACY_WINDOW_ENV: [&str; 2] = ["PULSE_PROCESSOR_WINDOW_MS", "PULSE_QUERY_WINDOW_MS"];
pub const LEGACY_LATENESS_ENV: [&str; 2] = [
    "PULSE_PROCESSOR_ALLOWED_LATENESS_MS",
    "PULSE_QUERY_ALLOWED_LATENESS_MS",
];

/// Window size and allowed lateness, shared by the processor and the query API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct WindowSettings {
    /// Tumbling window size, ms. The processor and the query API must use the same value.
    #[arg(
        long = "window-ms",
        env = "PULSE_WINDOW_MS",
        default_value_t = legacy_default(&LEGACY_WINDOW_ENV, DEFAULT_WINDOW_MS)
    )]
    pub window_ms: i64,
    /// Allowed lateness after a window's end, ms (event time, by the watermark). The
    /// processor and the query API must use the same value.
    #[arg(
        long = "allowed-lateness-ms",
        env = "PULSE_ALLOWED_LATENESS_MS",
        default_value_t = legacy_default(&LEGACY_LATENESS_ENV, DEFAULT_ALLOWED_LATENESS_MS)
    )]
    pub allowed_lateness_ms: i64,
}

impl Default for WindowSettings {
    fn default() -> Self {
        Self {
            window_ms: DEFAULT_WINDOW_MS,
            allowed_lateness_ms: DEFAULT_ALLOWED_LATENESS_MS,
        }
    }
}

/// The first parseable legacy value among `names`, else `default`. Unparseable or
/// disagreeing legacy values are reported by [`WindowSettings::validate`].
fn legacy_default(names: &[&str], default: i64) -> i64 {
    legacy_values(names, |n| std::env::var(n).ok())
        .into_iter()
        .find_map(|(_, v)| v.ok())
        .unwrap_or(default)
}

/// `(name, parsed value)` of each legacy name that is set, in order.
fn legacy_values(
    names: &[&str],
    get: impl Fn(&str) -> Option<String>,
) -> Vec<(String, Result<i64, String>)> {
    names
        .iter()
        .filter_map(|n| get(n).map(|raw| ((*n).to_owned(), raw)))
        .map(|(n, raw)| {
            let parsed = raw.trim().parse::<i64>().map_err(|_| raw.clone());
            (n, parsed)
        })
        .collect()
}

/// Problems with the legacy names in `get`'s environment: a value that is not a number,
/// or two legacy names that disagree, while the new name is unset.
fn legacy_problems(
    new_name: &str,
    names: &[&str],
    get: &impl Fn(&str) -> Option<String>,
    p: &mut Problems,
) {
    if get(new_name).is_some() {
        return;
    }
    let values = legacy_values(names, get);
    for (name, v) in &values {
        if let Err(raw) = v {
            p.add(
                name.as_str(),
                format!(
                    "must be an integer number of milliseconds, got {raw:?} (renamed {new_name})"
                ),
            );
        }
    }
    let parsed: Vec<(&String, i64)> = values
        .iter()
        .filter_map(|(n, v)| v.as_ref().ok().map(|v| (n, *v)))
        .collect();
    if let [(a, va), (b, vb), ..] = parsed.as_slice()
        && va != vb
    {
        p.add(
            new_name,
            format!("{a}={va} and {b}={vb} disagree; set {new_name} once for both services"),
        );
    }
}

impl WindowSettings {
    /// Checks the values and the legacy environment of `get` (the process environment in
    /// [`Validate::validate`]).
    pub fn validate_with(&self, get: impl Fn(&str) -> Option<String>, p: &mut Problems) {
        p.check(
            self.window_ms >= 1_000 && 86_400_000 % self.window_ms == 0,
            "--window-ms",
            format!(
                "must be >= 1000 and divide a day (86400000) evenly, got {}",
                self.window_ms
            ),
        );
        p.check(
            self.allowed_lateness_ms >= 0,
            "--allowed-lateness-ms",
            format!("must be >= 0, got {}", self.allowed_lateness_ms),
        );
        legacy_problems("PULSE_WINDOW_MS", &LEGACY_WINDOW_ENV, &get, p);
        legacy_problems("PULSE_ALLOWED_LATENESS_MS", &LEGACY_LATENESS_ENV, &get, p);
    }
}

impl Validate for WindowSettings {
    fn validate(&self, p: &mut Problems) {
        self.validate_with(|n| std::env::var(n).ok(), p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |n| m.get(n).cloned()
    }

    fn keys(s: WindowSettings, pairs: &[(&str, &str)]) -> Vec<String> {
        let mut p = Problems::default();
        s.validate_with(env(pairs), &mut p);
        match p.into_result() {
            Ok(()) => vec![],
            Err(e) => e.0.into_iter().map(|e| e.key).collect(),
        }
    }

    #[test]
    fn defaults_are_one_minute_windows_and_one_minute_lateness() {
        assert_eq!(keys(WindowSettings::default(), &[]), Vec::<String>::new());
        assert_eq!(WindowSettings::default().window_ms, 60_000);
    }

    #[test]
    fn a_legacy_name_is_used_when_the_new_one_is_unset() {
        let get = env(&[("PULSE_QUERY_WINDOW_MS", "30000")]);
        let v = legacy_values(&LEGACY_WINDOW_ENV, get);
        assert_eq!(v, vec![("PULSE_QUERY_WINDOW_MS".to_owned(), Ok(30_000))]);
    }

    #[test]
    fn legacy_names_that_disagree_are_refused_naming_the_new_setting() {
        let pairs = [
            ("PULSE_PROCESSOR_WINDOW_MS", "60000"),
            ("PULSE_QUERY_WINDOW_MS", "30000"),
        ];
        assert_eq!(
            keys(WindowSettings::default(), &pairs),
            vec!["PULSE_WINDOW_MS"]
        );
        // Setting the new name settles it.
        let mut with_new = pairs.to_vec();
        with_new.push(("PULSE_WINDOW_MS", "60000"));
        assert_eq!(
            keys(WindowSettings::default(), &with_new),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_legacy_value_that_is_not_a_number_is_named() {
        let pairs = [("PULSE_PROCESSOR_ALLOWED_LATENESS_MS", "1m")];
        assert_eq!(
            keys(WindowSettings::default(), &pairs),
            vec!["PULSE_PROCESSOR_ALLOWED_LATENESS_MS"]
        );
    }

    #[test]
    fn windows_must_divide_a_day() {
        let s = WindowSettings {
            window_ms: 7_000,
            allowed_lateness_ms: -1,
        };
        assert_eq!(keys(s, &[]), vec!["--window-ms", "--allowed-lateness-ms"]);
    }
}
