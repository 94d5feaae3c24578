//! Bearer tokens of the query API: loaded from `--api-tokens` and `--api-tokens-file`,
//! kept only as SHA-256 digests, compared in constant time, never logged. Both
//! transports call [`Tokens::authorize`] with the `authorization` header or metadata.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::error::QueryError;

type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// The accepted tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    digests: Vec<TokenDigest>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.digests.len())
            .finish()
    }
}

/// The token file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", path.display())]
pub struct TokenFileError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl Tokens {
    /// Tokens from a comma-separated list (blanks ignored).
    pub fn parse_list(list: &str) -> Self {
        Self::from_iter(list.split(','))
    }

    /// Tokens from a file with one per line (blank lines and `#` comments ignored).
    pub fn read_file(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::from_iter(
            text.lines().filter(|l| !l.trim_start().starts_with('#')),
        ))
    }

    pub fn extend(&mut self, other: Self) {
        self.digests.extend(other.digests);
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the tokens: every digest is compared, without
    /// stopping at a match, so timing reveals neither which token matched nor its length.
    pub fn verify(&self, presented: &str) -> bool {
        if presented.is_empty() {
            return false;
        }
        let d = digest(presented);
        let mut found = Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&d);
        }
        found.into()
    }

    /// Checks an `Authorization` value of the form `Bearer <token>`.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<(), QueryError> {
        let token = authorization
            .map(str::trim)
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match token {
            Some(t) if self.verify(t) => Ok(()),
            _ => Err(QueryError::Unauthenticated),
        }
    }
}

impl<'a> FromIterator<&'a str> for Tokens {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        Self {
            digests: iter
                .into_iter()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(digest)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_bearer_token_is_accepted() {
        let t = Tokens::parse_list(" alpha, ,beta ");
        assert_eq!(t.len(), 2);
        assert!(t.authorize(Some("Bearer alpha")).is_ok());
        assert!(t.authorize(Some("bearer beta")).is_ok());
        for bad in [
            None,
            Some(""),
            Some("alpha"),
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic alpha"),
            Some("Bearer alph"),
        ] {
            assert!(t.authorize(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        let text = format!("{:?}", Tokens::parse_list("s3cret"));
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn a_file_holds_one_token_per_line() {
        let dir = std::env::temp_dir().join(format!("pulse-query-tokens-{}", std::process::id()));
        std::fs::write(&dir, "# comment\none\n\n two \n").unwrap();
        let t = Tokens::read_file(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.verify("two"));
        assert!(Tokens::read_file(Path::new("/nonexistent/tokens")).is_err());
    }
}
