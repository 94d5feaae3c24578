//! One type for a secret setting (passwords, API keys, tokens, HMAC keys): it prints as
//! `<redacted>` in `Debug`, has no `Display`, and is wiped from memory when dropped.
//! Read the value only where it is used, with [`Secret::expose`]. Config structs holding
//! secrets can then derive `Debug` instead of hand-writing a redacting one.

use std::fmt;

use zeroize::Zeroize;

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
}
