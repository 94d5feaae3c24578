//! What `schema_version` means at the door: the producer's version of its own event shape.
//! Ingest accepts every version from 1 up, stores it with the event, counts accepted events
//! per version (a bounded metric label, [`label`]), and refuses only the versions an
//! operator listed in `--refuse-schema-versions` ([`RefusedVersions`]). Version 0 is
//! always refused: it is protobuf's unset value, so over gRPC it means "not sent".
//!
//! This is not the version of Pulse's own protobuf contract: that is the `v1` package
//! (`pulse.events.v1`), the subject versions of `<topic>-value` in the schema registry and
//! the schema id in each record's Confluent framing, all owned by `contracts`.

use std::fmt;
use std::str::FromStr;

/// Versions `1..=LABEL_CAP` get their own label value in
/// `pulse_ingest_events_by_schema_version_total`; higher ones count as `other`.
pub const LABEL_CAP: u32 = 32;

/// The label value of `version` in the per-version metric: `"1"` … `"32"`, or `"other"`.
pub fn label(version: u32) -> String {
    if (1..=LABEL_CAP).contains(&version) {
        version.to_string()
    } else {
        "other".to_owned()
    }
}

/// The `schema_version`s this deployment refuses, as inclusive ranges (a single version
/// is a range of one). Empty by default: every version from 1 up is accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefusedVersions(Vec<(u32, u32)>);

impl RefusedVersions {
    /// Whether `version` is on the refused list.
    pub fn contains(&self, version: u32) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&version))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// This list plus the versions outside `min..=max` (the deprecated
    /// `--min-schema-version` / `--max-schema-version`, which accepted only that range).
    pub fn with_bounds(&self, min: Option<u32>, max: Option<u32>) -> Self {
        let mut ranges = self.0.clone();
        if let Some(min) = min.filter(|&m| m > 1) {
            ranges.push((1, min - 1));
        }
        if let Some(max) = max.filter(|&m| m < u32::MAX) {
            ranges.push((max + 1, u32::MAX));
        }
        Self(ranges)
    }
}

/// Why a `--refuse-schema-versions` value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{item:?} is not a version or a range: {reason} (expected e.g. \"2\", \"4-6\" or \"2,4-6\")"
)]
pub struct ParseRefusedError {
    item: String,
    reason: &'static str,
}

impl FromStr for RefusedVersions {
    type Err = ParseRefusedError;

    /// A comma-separated list of versions and inclusive ranges `lo-hi`; blank is empty.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ranges = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let err = |reason| ParseRefusedError {
                item: item.to_owned(),
                reason,
            };
            let number = |t: &str| {
                t.trim()
                    .parse::<u32>()
                    .map_err(|_| err("not a whole number from 0 to 4294967295"))
            };
            let range = match item.split_once('-') {
                Some((lo, hi)) => (number(lo)?, number(hi)?),
                None => {
                    let v = number(item)?;
                    (v, v)
                }
            };
            if range.0 > range.1 {
                return Err(err("the range's start is above its end"));
            }
            ranges.push(range);
        }
        Ok(Self(ranges))
    }
}

impl fmt::Display for RefusedVersions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deprecated_bounds_refuse_what_they_did_not_accept() {
        let r: RefusedVersions = "5".parse().unwrap();
        let b = r.with_bounds(Some(2), Some(7));
        for v in [1, 5, 8, 1000, u32::MAX] {
            assert!(b.contains(v), "{v}");
        }
        for v in [2, 3, 4, 6, 7] {
            assert!(!b.contains(v), "{v}");
        }
        // The old default (1..=1) keeps refusing 2 and up; no bounds change nothing.
        let old_default = RefusedVersions::default().with_bounds(Some(1), Some(1));
        assert!(!old_default.contains(1) && old_default.contains(2));
        assert!(
            RefusedVersions::default()
                .with_bounds(None, None)
                .is_empty()
        );
        assert!(
            RefusedVersions::default()
                .with_bounds(Some(1), Some(u32::MAX))
                .is_empty()
        );
    }

    #[test]
    fn versions_and_ranges_parse_and_print_back() {
        let r: RefusedVersions = " 2, 4-6 ,9".parse().unwrap();
        assert_eq!(r.to_string(), "2,4-6,9");
        for v in [2, 4, 5, 6, 9] {
            assert!(r.contains(v), "{v}");
        }
        for v in [0, 1, 3, 7, 8, 10, u32::MAX] {
            assert!(!r.contains(v), "{v}");
        }
        assert!("".parse::<RefusedVersions>().unwrap().is_empty());
        assert!(RefusedVersions::default().is_empty());
    }

    #[test]
    fn a_bad_item_is_named_with_the_reason() {
        for (text, item) in [
            ("2,x", "x"),
            ("6-4", "6-4"),
            ("1-", "1-"),
            ("-1", "-1"),
            ("99999999999", "99999999999"),
        ] {
            let err = text.parse::<RefusedVersions>().unwrap_err();
            assert!(err.to_string().starts_with(&format!("{item:?}")), "{err}");
        }
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(label(1), "1");
        assert_eq!(label(3), "3");
        assert_eq!(label(LABEL_CAP), LABEL_CAP.to_string());
        assert_eq!(label(LABEL_CAP + 1), "other");
        assert_eq!(label(0), "other");
        assert_eq!(label(u32::MAX), "other");
    }
}
