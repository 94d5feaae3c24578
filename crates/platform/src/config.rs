//! Config pieces shared by the services (clap args with `PULSE_*` env fallbacks) and
//! validation that reports every problem at once instead of stopping at the first.

use std::fmt;

/// One invalid setting: the flag/env it came from and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

/// Every invalid setting found at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {}: {}", e.key, e.reason)?;
        }
        Ok(())
    }
}

/// Collects config problems.
#[derive(Debug, Default)]
pub struct Problems(Vec<ConfigError>);

impl Problems {
    pub fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            reason: reason.into(),
        });
    }

    /// Adds a problem when `ok` is false.
    pub fn check(&mut self, ok: bool, key: &str, reason: impl Into<String>) {
        if !ok {
            self.add(key, reason);
        }
    }

    pub fn into_result(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}

/// A config section that can check itself.
pub trait Validate {
    fn validate(&self, problems: &mut Problems);
}

/// Validates every section and reports all problems together.
pub fn validate_all(sections: &[&dyn Validate]) -> Result<(), ConfigErrors> {
    let mut problems = Problems::default();
    for s in sections {
        s.validate(&mut problems);
    }
    problems.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Range(i64);
    impl Validate for Range {
        fn validate(&self, p: &mut Problems) {
            p.check(self.0 > 0, "--n", format!("must be > 0, got {}", self.0));
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = validate_all(&[&Range(0), &Range(5), &Range(-1)]).unwrap_err();
        assert_eq!(err.0.len(), 2);
        let text = err.to_string();
        assert!(text.contains("2 problem(s)"), "{text}");
        assert!(text.contains("--n: must be > 0, got -1"), "{text}");
    }

    #[test]
    fn valid_config_passes() {
        assert!(validate_all(&[&Range(1)]).is_ok());
    }
}
