//! One type for a secret setting (passwords, API keys, tokens, HMAC keys): it prints as
//! `<redacted>` in `Debug`, has no `Display`, and is wiped from memory when dropped.
//! Read the value only where it is used, with [`Secret::expose`]. Config structs holding
//! secrets can then derive `Debug` instead of hand-writing a redacting one.
//!
//! A secret setting comes either as a value (an environment variable only: process
//! arguments are visible to every local user) or as a file (`--…-file` / `PULSE_…_FILE`,
//! e.g. a mounted Kubernetes Secret); [`Secret::resolve`] applies the one rule for all of
//! them. The flags that once took a secret value are kept hidden only to refuse them at
//! start with the replacement's name ([`removed_secret_flag`]).

use std::fmt;

use zeroize::Zeroize;

use crate::config::Problems;

/// Reports a removed flag that took a secret as a process argument, when it was `used`,
/// naming the `replacement`; the value itself is never shown.
pub fn removed_secret_flag(p: &mut Problems, flag: &str, used: bool, replacement: &str) {
    if used {
        p.add(
            flag,
            format!(
                "this flag was removed because process arguments are visible to every local user; use {replacement}"
            ),
        );
    }
}

/// A secret string. `Debug` shows `<redacted>` (or `""` when empty, so a missing
/// secret is visible in a config dump); the value is zeroed on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value. Never log it or put it into an error message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads a secret from a file (e.g. a mounted Kubernetes Secret), trimming one
    /// trailing newline; the error names the file, never the content.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let mut text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        while text.ends_with('\n') || text.ends_with('\r') {
            text.pop();
        }
        Ok(Self(text))
    }

    /// The value of the environment variable `name`; empty when it is unset or not
    /// UTF-8. For secrets that are read from the environment only, never from a flag.
    pub fn from_env(name: &str) -> Self {
        Self(std::env::var(name).unwrap_or_default())
    }

    /// The secret of a setting that can be given as a value or as a file: the file's
    /// content when `file` is set (it must not be empty), else `value` (possibly empty,
    /// i.e. not set). Both set is an error, so a stale value never silently wins over a
    /// mounted file or the other way round. Errors name the file, never the content.
    pub fn resolve(value: &Secret, file: Option<&std::path::Path>) -> Result<Self, String> {
        match file {
            Some(path) if !value.is_empty() => Err(format!(
                "both the value and the file {} are set; set only one",
                path.display()
            )),
            Some(path) => {
                let secret = Self::from_file(path)?;
                if secret.is_empty() {
                    Err(format!("{} is empty", path.display()))
                } else {
                    Ok(secret)
                }
            }
            None => Ok(value.clone()),
        }
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("<redacted>")
        }
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// What a reload of a set of named secrets (API keys, query tokens) changed, by name, never
/// a secret: names that appeared, names that went, and names whose set of secrets changed
/// (a rotation under one name, "re-keyed").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub replaced: Vec<String>,
}

impl NameChanges {
    /// The changes from `before` to `after`, each (name, what identifies the secret without
    /// revealing it: its digest) pairs; names come out sorted.
    pub fn between<D: Ord>(
        before: impl IntoIterator<Item = (String, D)>,
        after: impl IntoIterator<Item = (String, D)>,
    ) -> Self {
        use std::collections::{BTreeMap, BTreeSet};
        fn by_name<D: Ord>(
            pairs: impl IntoIterator<Item = (String, D)>,
        ) -> BTreeMap<String, BTreeSet<D>> {
            let mut m: BTreeMap<String, BTreeSet<D>> = BTreeMap::new();
            for (n, d) in pairs {
                m.entry(n).or_default().insert(d);
            }
            m
        }
        let (old, new) = (by_name(before), by_name(after));
        Self {
            added: new
                .keys()
                .filter(|n| !old.contains_key(*n))
                .cloned()
                .collect(),
            removed: old
                .keys()
                .filter(|n| !new.contains_key(*n))
                .cloned()
                .collect(),
            replaced: new
                .iter()
                .filter(|(n, d)| old.get(*n).is_some_and(|o| o != *d))
                .map(|(n, _)| n.clone())
                .collect(),
        }
    }
}

impl fmt::Display for NameChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "added [{}]; removed [{}]; re-keyed [{}]",
            self.added.join(", "),
            self.removed.join(", "),
            self.replaced.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn clap_parses_a_secret_flag_without_echoing_it() {
        #[derive(Debug, clap::Parser)]
        struct Args {
            #[arg(long, env = "PULSE_TEST_SECRET_NEVER_SET", hide_env_values = true)]
            password: Secret,
        }
        let a = <Args as clap::Parser>::try_parse_from(["x", "--password", "s3cr3t"]).unwrap();
        assert_eq!(a.password.expose(), "s3cr3t");
        assert!(!format!("{a:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_secret_file_loses_its_trailing_newline_only() {
        let dir = std::env::temp_dir().join(format!("pulse-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, " a b \n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), " a b ");
        let err = Secret::from_file(&dir.join("missing")).unwrap_err();
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_wins_over_nothing_a_value_over_nothing_and_both_are_refused() {
        let dir = std::env::temp_dir().join(format!("pulse-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "from-file\n").unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();

        let none = Secret::default();
        let value = Secret::from("from-value");
        assert_eq!(Secret::resolve(&none, None).unwrap(), none);
        assert_eq!(
            Secret::resolve(&value, None).unwrap().expose(),
            "from-value"
        );
        assert_eq!(
            Secret::resolve(&none, Some(&file)).unwrap().expose(),
            "from-file"
        );
        let both = Secret::resolve(&value, Some(&file)).unwrap_err();
        assert!(
            both.contains("set only one") && both.contains("password"),
            "{both}"
        );
        assert!(!both.contains("from-"), "the error shows a secret: {both}");
        let blank = Secret::resolve(&none, Some(&empty)).unwrap_err();
        assert!(blank.contains("is empty"), "{blank}");
        let missing = Secret::resolve(&none, Some(&dir.join("missing"))).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
