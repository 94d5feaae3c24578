//! Bearer tokens of the query API: loaded from PULSE_QUERY_API_TOKENS and `--api-tokens-file`,
//! kept only as SHA-256 digests, compared in constant time, never logged. Both
//! transports call [`Tokens::authorize`] with the `authorization` header or metadata and
//! get the token's name, which the request's span carries (`auth.key`; never the token).
//!
//! An entry is `token` or `token=name` (as ingest's `key=source:name`): split at the last
//! `=` when what follows is a name (1–64 of `A-Z a-z 0-9 . _ -`), so base64 padding
//! (`abc==`) stays part of the token. An entry without a name is named `unnamed`.
//!
//! [`TokenStore`] holds the tokens in force and re-reads `--api-tokens-file` when its
//! content changes (polled by the platform's file-watch loop), so tokens are rotated
//! without a restart: several are valid at once, and requests are counted by token name
//! (`pulse_query_authenticated_requests_total{key}`) so the old token's use can be watched
//! going to zero. A file that cannot be read, repeats a token or leaves no token at all
//! keeps the previous tokens (logged at error level and counted). Every reload, taken or
//! not, is an audit record (`keys.query-tokens.reload`, actor `file`) on the audit topic,
//! through the [`AuditLog`] given with [`TokenStore::with_audit`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use pulse_platform::audit::{AuditLog, AuditRecord, Outcome, action};
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

/// Why the token file was not taken. No variant ever shows a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading token file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The same token on two lines (under one name or two): which name a request gets
    /// would be a guess.
    #[error(
        "token file {} line {line}: duplicate token (the same token is on line {first})",
        path.display()
    )]
    Duplicate {
        path: PathBuf,
        line: usize,
        first: usize,
    },
    /// Taking the file would leave no token at all (every request refused).
    #[error(
        "token file {}: no token in it and none given in PULSE_QUERY_API_TOKENS; at least one is required",
        path.display()
    )]
    NoTokens { path: PathBuf },
}

fn read_text(path: &Path) -> Result<String, TokenFileError> {
    std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Tokens {
    /// Tokens from a comma-separated list (blanks ignored).
    pub fn parse_list(list: &str) -> Self {
        Self::from_iter(list.split(','))
    }

    /// Tokens from a file with one per line (blank lines and `#` comments ignored); a
    /// token on two lines is refused (the error names both lines, never the token).
    pub fn read_file(path: &Path) -> Result<Self, TokenFileError> {
        Self::from_file_text(&read_text(path)?, path)
    }

    /// [`Tokens::read_file`] of the file `path` whose content is `text`.
    fn from_file_text(text: &str, path: &Path) -> Result<Self, TokenFileError> {
        let mut tokens = Self::default();
        let mut lines: Vec<usize> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (token, name) = split_entry(line);
            let d = digest(token);
            if let Some(first) = tokens.digests.iter().position(|known| *known == d) {
                return Err(TokenFileError::Duplicate {
                    path: path.to_owned(),
                    line: i + 1,
                    first: lines.get(first).copied().unwrap_or_default(),
                });
            }
            tokens.digests.push(d);
            tokens.names.push(name.to_owned());
            lines.push(i + 1);
        }
        Ok(tokens)
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

    /// The tokens' names, sorted, each once.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// What changed from `before` to `self`, by token name (never a token): names that
    /// appeared, names that went, and names whose set of tokens changed (a rotation under
    /// one name).
    pub fn changes_from(&self, before: &Tokens) -> TokenChanges {
        let pairs = |t: &Tokens| -> Vec<(String, TokenDigest)> {
            t.names
                .iter()
                .cloned()
                .zip(t.digests.iter().copied())
                .collect()
        };
        TokenChanges::between(pairs(before), pairs(self))
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

/// Token names added, removed and re-keyed by a reload (see [`Tokens::changes_from`]).
pub type TokenChanges = pulse_platform::secret::NameChanges;

/// The tokens in force: the inline ones (PULSE_QUERY_API_TOKENS) and those of `--api-tokens-file`,
/// which [`TokenStore::watch`] re-reads every `interval` when its content changed, so
/// tokens are added and removed without a restart (rotation: add the new token, move the
/// clients, remove the old one). A file that is not taken keeps the previous tokens.
pub struct TokenStore {
    inline: Tokens,
    file: Option<PathBuf>,
    interval: Duration,
    current: RwLock<Arc<Tokens>>,
    /// The file's content (SHA-256; `None`: unreadable) when it was last tried, good or
    /// not, so that a bad file is reported once and tried again when it changes.
    last: Mutex<Option<TokenDigest>>,
    /// Where [`TokenStore::watch`] records each reload (a log that writes nowhere until
    /// [`TokenStore::with_audit`]).
    audit: AuditLog,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("TokenStore")
            .field("file", &self.file)
            .field("interval", &self.interval)
            .field("tokens", &current.len())
            .field("names", &current.names())
            .finish()
    }
}

impl TokenStore {
    /// The inline tokens and those of `file` (read now: an error is returned), the file
    /// checked for changes every `interval` by [`TokenStore::watch`].
    pub fn load(
        inline: Tokens,
        file: Option<PathBuf>,
        interval: Duration,
    ) -> Result<Self, TokenFileError> {
        let (tokens, last) = match &file {
            None => (inline.clone(), None),
            Some(path) => {
                let text = read_text(path)?;
                let mut tokens = inline.clone();
                tokens.extend(Tokens::from_file_text(&text, path)?);
                (tokens, Some(digest(&text)))
            }
        };
        init_token_metrics(&tokens);
        Ok(Self {
            inline,
            file,
            interval,
            current: RwLock::new(Arc::new(tokens)),
            last: Mutex::new(last),
            audit: AuditLog::disabled(),
        })
    }

    /// This store, recording each reload of the file to `audit`.
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// The tokens in force now.
    pub fn current(&self) -> Arc<Tokens> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// [`Tokens::authorize`] against the tokens in force, counting the request under the
    /// token's name (`pulse_query_authenticated_requests_total{key}`). Refusals are counted
    /// by the transports as errors of kind `unauthenticated`.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<String, QueryError> {
        let current = self.current();
        let name = current.authorize(authorization)?;
        metrics::counter!(crate::metrics::AUTHENTICATED_TOTAL, "key" => name.to_owned())
            .increment(1);
        Ok(name.to_owned())
    }

    /// Re-reads the file if its content changed since it was last tried: `None` when it
    /// did not (or there is no file), else what changed by name or why the file was not
    /// taken (then the tokens in force stay). Counted by outcome.
    pub fn reload_if_changed(&self) -> Option<Result<TokenChanges, TokenFileError>> {
        let path = self.file.as_ref()?;
        let read = read_text(path);
        let content = read.as_ref().ok().map(|text| digest(text));
        {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if *last == content {
                return None;
            }
            *last = content;
        }
        let outcome = read
            .and_then(|text| Tokens::from_file_text(&text, path))
            .and_then(|file_tokens| {
                let mut tokens = self.inline.clone();
                tokens.extend(file_tokens);
                if tokens.is_empty() {
                    return Err(TokenFileError::NoTokens {
                        path: path.to_owned(),
                    });
                }
                init_token_metrics(&tokens);
                let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
                let changes = tokens.changes_from(&current);
                *current = Arc::new(tokens);
                Ok(changes)
            });
        let label = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::API_TOKENS_RELOAD_TOTAL, "outcome" => label).increment(1);
        Some(outcome)
    }

    /// Checks the file every `interval` until `stop` is cancelled (the platform's
    /// file-watch loop), logging each reload with the token names added, removed and
    /// re-keyed (never a token) and recording it to the store's audit log.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let path = path.display().to_string();
        pulse_platform::shutdown::every(self.interval, &stop, || {
            let (this, path) = (Arc::clone(&self), &path);
            async move {
                // File I/O off the async threads.
                let store = Arc::clone(&this);
                let reloaded = tokio::task::spawn_blocking(move || store.reload_if_changed())
                    .await
                    .ok()
                    .flatten();
                match reloaded {
                    None => {}
                    Some(Ok(changes)) => {
                        let tokens = this.current();
                        tracing::info!(
                            path = %path,
                            tokens = tokens.len(),
                            names = ?tokens.names(),
                            %changes,
                            "query API tokens reloaded from the token file; they apply to new requests"
                        );
                        this.audit.record(reload_record(path, Ok((&changes, tokens.len()))));
                    }
                    Some(Err(e)) => {
                        tracing::error!(
                            path = %path,
                            error = %e,
                            "query API token file reload failed; the previous tokens stay in force"
                        );
                        this.audit.record(reload_record(path, Err(&e)));
                    }
                }
            }
        })
        .await;
    }
}

/// The audit record of a reload of the token file `path` (action `keys.query-tokens.reload`,
/// actor `file`, as ingest's `keys.reload`): `ok` with the names added, removed and
/// re-keyed (never a token) and the count in force, or `failed` with the reason.
/// [`AuditLog::record`] logs it (INFO `audit`, fields `audit.*`) and queues it for the
/// audit topic (README, Audit trail).
fn reload_record(
    path: &str,
    outcome: Result<(&TokenChanges, usize), &TokenFileError>,
) -> AuditRecord {
    let (result, detail) = match outcome {
        Ok((changes, in_force)) => (
            Outcome::Ok,
            format!("{changes}; {in_force} token(s) in force"),
        ),
        Err(e) => (
            Outcome::Failed,
            format!("{e}; the previous tokens stay in force"),
        ),
    };
    AuditRecord::new(crate::SERVICE, "file", action::TOKENS_RELOAD, path, result)
        .with_detail(detail)
}

/// Creates the per-name request series at zero and sets the token count.
fn init_token_metrics(tokens: &Tokens) {
    for name in tokens.names() {
        metrics::counter!(crate::metrics::AUTHENTICATED_TOTAL, "key" => name.to_owned())
            .increment(0);
    }
    metrics::gauge!(crate::metrics::API_TOKENS).set(tokens.len() as f64);
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

    /// A unique temporary file path for one test.
    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "pulse-query-tokens-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ))
    }

    #[test]
    fn a_token_repeated_in_the_file_is_refused_naming_the_lines_never_the_token() {
        let path = temp_path("dup");
        std::fs::write(&path, "# c\ns3cret-a=one\n\ns3cret-b\ns3cret-a=two\n").unwrap();
        let e = Tokens::read_file(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let text = e.to_string();
        assert!(
            text.contains("line 5") && text.contains("line 2") && !text.contains("s3cret"),
            "{text}"
        );
    }

    #[test]
    fn the_store_takes_a_changed_file_and_keeps_its_tokens_when_the_file_is_broken() {
        let path = temp_path("reload");
        let (old, new) = ("q-old-s3cret", "q-new-s3cret");
        std::fs::write(&path, format!("{old}=ops-2025\n")).unwrap();
        let bearer = |t: &str| format!("Bearer {t}");
        let text = pulse_platform::metrics::scrape_with(|| {
            let store = TokenStore::load(
                Tokens::parse_list("inline-s3cret=cli"),
                Some(path.clone()),
                Duration::from_millis(5),
            )
            .unwrap();
            assert!(store.reload_if_changed().is_none(), "nothing changed yet");
            assert_eq!(store.authorize(Some(&bearer(old))).unwrap(), "ops-2025");
            assert!(store.authorize(Some(&bearer(new))).is_err());

            // Old and new at once.
            std::fs::write(&path, format!("{old}=ops-2025\n{new}=ops-2026\n")).unwrap();
            let changes = store.reload_if_changed().unwrap().unwrap();
            assert_eq!(changes.added, ["ops-2026"]);
            assert!(changes.removed.is_empty() && changes.replaced.is_empty());
            assert_eq!(store.authorize(Some(&bearer(old))).unwrap(), "ops-2025");
            assert_eq!(store.authorize(Some(&bearer(new))).unwrap(), "ops-2026");
            assert!(store.reload_if_changed().is_none(), "same content");

            // The old one removed; the inline token stays.
            std::fs::write(&path, format!("# rotated\n{new}=ops-2026\n")).unwrap();
            let changes = store.reload_if_changed().unwrap().unwrap();
            assert_eq!(changes.removed, ["ops-2025"]);
            assert!(store.authorize(Some(&bearer(old))).is_err());
            assert_eq!(store.authorize(Some(&bearer(new))).unwrap(), "ops-2026");
            assert_eq!(
                store.authorize(Some("Bearer inline-s3cret")).unwrap(),
                "cli"
            );

            // A broken file (a token twice), then no file at all: the tokens stay.
            std::fs::write(&path, format!("{old}=a\n{old}=b\n")).unwrap();
            assert!(matches!(
                store.reload_if_changed(),
                Some(Err(TokenFileError::Duplicate {
                    line: 2,
                    first: 1,
                    ..
                }))
            ));
            assert!(store.reload_if_changed().is_none(), "reported once");
            std::fs::remove_file(&path).unwrap();
            assert!(matches!(
                store.reload_if_changed(),
                Some(Err(TokenFileError::Read { .. }))
            ));
            assert_eq!(store.authorize(Some(&bearer(new))).unwrap(), "ops-2026");
            assert!(store.authorize(Some(&bearer(old))).is_err());
            assert_eq!(store.current().len(), 2);
            let debug = format!("{store:?}");
            assert!(
                !debug.contains("s3cret") && debug.contains("ops-2026"),
                "{debug}"
            );
        });
        for series in [
            r#"pulse_query_api_tokens_reload_total{outcome="ok"} 2"#,
            r#"pulse_query_api_tokens_reload_total{outcome="error"} 2"#,
            r#"pulse_query_api_tokens 2"#,
            r#"pulse_query_authenticated_requests_total{key="ops-2025"} 2"#,
            r#"pulse_query_authenticated_requests_total{key="ops-2026"} 3"#,
            r#"pulse_query_authenticated_requests_total{key="cli"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        assert!(!text.contains("s3cret"), "a token in the metrics: {text}");
    }

    #[test]
    fn a_file_that_would_leave_no_token_is_not_taken() {
        let path = temp_path("empty");
        std::fs::write(&path, "only=ledger\n").unwrap();
        let store = TokenStore::load(
            Tokens::default(),
            Some(path.clone()),
            Duration::from_secs(1),
        )
        .unwrap();
        std::fs::write(&path, "# everything commented out\n").unwrap();
        let outcome = store.reload_if_changed();
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(outcome, Some(Err(TokenFileError::NoTokens { .. }))),
            "{outcome:?}"
        );
        assert_eq!(
            store.authorize(Some("Bearer only")).unwrap(),
            "ledger",
            "the previous token stays"
        );
    }

    /// A reload's audit record (which the watch logs as INFO `audit` with the `audit.*`
    /// fields, like every service's records): `ok` with the names that changed, `failed`
    /// with the reason; never a token. (The watch's log line is not asserted here: a
    /// capture subscriber set for this test's thread now and then missed the watch's
    /// events while the other watch test ran in parallel.)
    #[test]
    fn a_reload_is_audited_by_name_never_by_token() {
        let path = temp_path("audit");
        std::fs::write(&path, "old-s3cret=ledger\n").unwrap();
        let store = TokenStore::load(
            Tokens::default(),
            Some(path.clone()),
            Duration::from_secs(1),
        )
        .unwrap();
        std::fs::write(&path, "new-s3cret=ledger\nother-s3cret=dashboards\n").unwrap();
        let changes = store.reload_if_changed().unwrap().unwrap();
        let r = reload_record("/etc/pulse/tokens", Ok((&changes, store.current().len())));
        assert_eq!(
            (r.service.as_str(), r.actor.as_str(), r.action.as_str()),
            ("query-api", "file", "keys.query-tokens.reload")
        );
        assert_eq!(
            (r.target.as_str(), r.outcome),
            ("/etc/pulse/tokens", Outcome::Ok)
        );
        assert_eq!(
            r.detail,
            "added [dashboards]; removed []; re-keyed [ledger]; 2 token(s) in force"
        );

        std::fs::write(&path, "# none\n").unwrap();
        let error = store.reload_if_changed().unwrap().unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let r = reload_record("/etc/pulse/tokens", Err(&error));
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(
            r.detail.contains("no token in it")
                && r.detail.ends_with("; the previous tokens stay in force"),
            "{}",
            r.detail
        );
        assert!(!r.detail.contains("s3cret"), "{}", r.detail);
    }

    /// Takes every record at once, acknowledging it.
    #[derive(Default)]
    struct Sent(Mutex<Vec<pulse_platform::kafka::OutRecord>>);

    impl pulse_platform::kafka::RecordProducer for Sent {
        fn enqueue(
            &self,
            record: pulse_platform::kafka::OutRecord,
        ) -> Result<pulse_platform::kafka::AckFuture, pulse_platform::kafka::ProduceError> {
            self.0.lock().unwrap().push(record);
            Ok(Box::pin(async {
                Ok(pulse_platform::kafka::Acked {
                    partition: 0,
                    offset: 0,
                })
            }))
        }
    }

    #[tokio::test]
    async fn the_watch_writes_each_reload_to_the_audit_log_it_was_given() {
        let path = temp_path("audit-log");
        std::fs::write(&path, "one-s3cret=one\n").unwrap();
        let sent = Arc::new(Sent::default());
        let audit = AuditLog::spawn(sent.clone(), "audit", 8, Duration::from_secs(5));
        let store = Arc::new(
            TokenStore::load(
                Tokens::default(),
                Some(path.clone()),
                Duration::from_millis(10),
            )
            .unwrap()
            .with_audit(audit),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(store.clone().watch(stop.clone()));
        std::fs::write(&path, "two-s3cret=two\n").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sent.0.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "nothing written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let sent = sent.0.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].topic, "audit");
        let r = AuditRecord::from_json(&sent[0].payload).unwrap();
        assert_eq!(
            (r.actor.as_str(), r.action.as_str(), r.outcome),
            ("file", action::TOKENS_RELOAD, Outcome::Ok)
        );
        assert_eq!(r.target, path.display().to_string());
        assert!(r.detail.starts_with("added [two]; removed [one]"), "{r:?}");
    }

    #[tokio::test]
    async fn the_watch_applies_a_rotation_without_a_restart_and_stops_with_the_token() {
        let path = temp_path("watch");
        std::fs::write(&path, "first-s3cret=first\n").unwrap();
        let store = Arc::new(
            TokenStore::load(
                Tokens::default(),
                Some(path.clone()),
                Duration::from_millis(10),
            )
            .unwrap(),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(store.clone().watch(stop.clone()));
        std::fs::write(&path, "second-s3cret=second\n").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.authorize(Some("Bearer second-s3cret")).is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(store.authorize(Some("Bearer first-s3cret")).is_err());
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watch stops when cancelled")
            .unwrap();
        std::fs::remove_file(&path).unwrap();
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
