//! Bearer tokens of the query API: loaded from `--api-tokens` and `--api-tokens-file`,
//! kept only as SHA-256 digests, compared in constant time, never logged. Both
//! transports call [`Tokens::authorize`] with the `authorization` header or metadata and
//! get the token's name, which the request's span carries (`auth.key`; never the token).
//!
//! An entry is `token` or `token=name` (as ingest's `key=source:name`): split at the last
//! `=` when what follows is a name (1–64 of `A-Z a-z 0-9 . _ -`), so base64 padding
//! (`abc==`) stays part of the token. An entry without a name is named `unnamed`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::error::QueryError;

type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// The name of a token given without one.
pub const UNNAMED: &str = "unnamed";

/// The accepted tokens (digests) and their names.
#[derive(Clone, Default)]
pub struct Tokens {
    digests: Vec<TokenDigest>,
    names: Vec<String>,
}

/// Whether `s` is a token name: 1–64 of `A-Z a-z 0-9 . _ -`.
fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `token` or `token=name` → (token, name).
fn split_entry(entry: &str) -> (&str, &str) {
    match entry.rsplit_once('=') {
        Some((token, name)) if !token.trim().is_empty() && is_name(name.trim()) => {
            (token.trim(), name.trim())
        }
        _ => (entry, UNNAMED),
    }
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
        self.names.extend(other.names);
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the tokens (see [`Tokens::name_of`]).
    pub fn verify(&self, presented: &str) -> bool {
        self.name_of(presented).is_some()
    }

    /// The name of `presented` if it is one of the tokens: every digest is compared,
    /// without stopping at a match, so timing reveals neither which token matched nor its
    /// length.
    pub fn name_of(&self, presented: &str) -> Option<&str> {
        use subtle::ConditionallySelectable as _;
        if presented.is_empty() {
            return None;
        }
        let d = digest(presented);
        let mut found = Choice::from(0);
        let mut index = u64::MAX;
        for (i, known) in self.digests.iter().enumerate() {
            let hit = known.ct_eq(&d);
            found |= hit;
            index.conditional_assign(&u64::try_from(i).unwrap_or(u64::MAX), hit);
        }
        if !bool::from(found) {
            return None;
        }
        usize::try_from(index)
            .ok()
            .and_then(|i| self.names.get(i))
            .map(String::as_str)
    }

    /// Checks an `Authorization` value of the form `Bearer <token>`; returns the token's
    /// name.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<&str, QueryError> {
        let token = authorization
            .map(str::trim)
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        token
            .and_then(|t| self.name_of(t))
            .ok_or(QueryError::Unauthenticated)
    }
}

/// Logs a refused request (no bearer token, or one that is not accepted) at warn level
/// with the caller's address `peer`, never with what was presented. (Refusals are counted
/// as errors of kind `unauthenticated`.)
pub fn log_refusal(peer: &str, transport: &'static str, authorization: Option<&str>) {
    tracing::warn!(
        client.address = peer,
        transport,
        reason = if authorization.is_some_and(|a| !a.trim().is_empty()) {
            "unknown_token"
        } else {
            "no_token"
        },
        "query request refused: no valid bearer token"
    );
}

/// The span of an authenticated request: the token's name (`auth.key`), the caller's
/// address and the transport; never the token.
pub fn request_span(name: &str, peer: &str, transport: &'static str) -> tracing::Span {
    tracing::info_span!(
        "query.authenticated",
        auth.key = %name,
        client.address = %peer,
        transport,
    )
}

impl<'a> FromIterator<&'a str> for Tokens {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let (digests, names) = iter
            .into_iter()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(split_entry)
            .map(|(token, name)| (digest(token), name.to_owned()))
            .unzip();
        Self { digests, names }
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
    fn a_token_may_carry_a_name_and_base64_padding_stays_in_the_token() {
        let t = Tokens::parse_list("alpha=dashboard, YWJj==, tok=en=ledger-2026,beta");
        assert_eq!(t.authorize(Some("Bearer alpha")).ok(), Some("dashboard"));
        assert_eq!(t.authorize(Some("Bearer YWJj==")).ok(), Some(UNNAMED));
        assert_eq!(t.authorize(Some("Bearer tok=en")).ok(), Some("ledger-2026"));
        assert_eq!(t.authorize(Some("Bearer beta")).ok(), Some(UNNAMED));
        assert!(t.authorize(Some("Bearer alpha=dashboard")).is_err());
        assert!(t.authorize(Some("Bearer YWJj")).is_err());
        let bad_name = Tokens::parse_list("x=not a name");
        assert!(
            bad_name.verify("x=not a name"),
            "no valid name: all of it is the token"
        );
    }

    /// Every span's name and fields and every event's fields, as text.
    #[derive(Clone, Default)]
    struct Capture(
        std::sync::Arc<std::sync::Mutex<String>>,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
    );

    struct Text<'a>(&'a mut String);

    impl tracing::field::Visit for Text<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            use std::fmt::Write as _;
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            let mut text = self.0.lock().unwrap();
            text.push_str("\nspan ");
            text.push_str(span.metadata().name());
            span.record(&mut Text(&mut text));
            let n = self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tracing::span::Id::from_u64(n + 1)
        }
        fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
            values.record(&mut Text(&mut self.0.lock().unwrap()));
        }
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut text = self.0.lock().unwrap();
            text.push_str("\nevent");
            event.record(&mut Text(&mut text));
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn the_request_span_names_the_token_and_a_refusal_logs_the_caller_never_a_token() {
        let capture = Capture::default();
        let _default = tracing::subscriber::set_default(capture.clone());
        let secret = "q-s3cret-token-0123456789";
        let t = Tokens::parse_list(&format!("{secret}=grafana-2026"));
        let header = format!("Bearer {secret}");
        let name = t.authorize(Some(&header)).unwrap();
        let _span = request_span(name, "10.0.0.9:4321", "http");
        let wrong = "Bearer q-wrong-token-9876543210";
        assert!(t.authorize(Some(wrong)).is_err());
        log_refusal("10.0.0.9:4322", "grpc", Some(wrong));
        let text = capture.0.lock().unwrap().clone();
        let span = text
            .lines()
            .find(|l| l.starts_with("span query.authenticated"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            span.contains("auth.key=grafana-2026") && span.contains("client.address=10.0.0.9:4321"),
            "{span}"
        );
        let refusal = text
            .lines()
            .find(|l| l.contains("no valid bearer token"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            refusal.contains("client.address=\"10.0.0.9:4322\"")
                && refusal.contains("reason=\"unknown_token\""),
            "{refusal}"
        );
        assert!(
            !text.contains("s3cret") && !text.contains("q-wrong"),
            "a token in the logs: {text}"
        );
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
