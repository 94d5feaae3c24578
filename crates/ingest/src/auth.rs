//! API-key authentication and per-source rate limiting for ingest.
//!
//! Owns: parsing API keys (`key=source` lists from config or a file), the
//! constant-time key lookup, extracting the presented key from header values,
//! and the per-source token buckets with their Retry-After arithmetic.
//!
//! Both transports authenticate through [`authenticate`] and rate-limit through [`admit`]
//! (which count refusals).
//!
//! Leaves to others: reading HTTP/gRPC headers (callers pass the raw header
//! values to [`authenticate`]), turning a refusal into a 401/429 answer (`error`),
//! and where the key spec comes from (CLI flag, env, file path).
//!
//! Keys are never kept in clear text: only their SHA-256 digests are stored, so
//! neither `Debug` nor error messages can reveal them.
//!
//! Each key has a name (`key=source:name`; the name defaults to the source) that labels
//! [`crate::metrics::AUTHENTICATED_TOTAL`] and the log, so that during a rotation (old and
//! new key of one source valid at once) the old key's use can be watched going to zero.
//! [`KeyStore`] re-reads `--api-keys-file` when it changes, without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Refusal;
use pulse_platform::audit::{AuditLog, AuditRecord, Outcome, action};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

type KeyDigest = [u8; 32];

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

#[derive(Clone)]
struct Entry {
    digest: KeyDigest,
    source: String,
    /// The key's name (metrics, logs); never the key.
    name: String,
}

/// API keys, each bound to a source name. `Debug` never prints keys (they are
/// stored only as SHA-256 digests).
#[derive(Clone, Default)]
pub struct ApiKeys {
    entries: Vec<Entry>,
}

/// Why API keys could not be loaded. No variant ever shows a key.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading API key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A malformed item or line; the message names its position, never the key.
    #[error("{0}")]
    Invalid(String),
}

impl ApiKeys {
    /// Parses `"key=source,key2=source2"`. Whitespace around items, keys and
    /// sources is trimmed and empty items (e.g. a trailing comma) are skipped.
    /// The item is split at its *last* `=`, so keys may contain `=` (base64
    /// padding) while source names may not. Errors name the 1-based item
    /// position but never echo the key.
    pub fn parse(spec: &str) -> Result<Self, KeysError> {
        let mut keys = ApiKeys::default();
        for (i, item) in spec.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            keys.push_item(item, &format!("API key item {}", i + 1))
                .map_err(KeysError::Invalid)?;
        }
        Ok(keys)
    }

    /// Reads a file with one `key=source` per line; blank lines and lines
    /// starting with `#` (after leading whitespace) are ignored. Errors name the
    /// file and the 1-based line number but never echo a key.
    pub fn from_file(path: &Path) -> Result<Self, KeysError> {
        Self::from_text(&read_keys_file(path)?, path)
    }

    /// [`ApiKeys::from_file`] of the file `path` whose content is `text`.
    fn from_text(text: &str, path: &Path) -> Result<Self, KeysError> {
        let mut keys = ApiKeys::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push_item(
                line,
                &format!("API key file {} line {}", path.display(), i + 1),
            )
            .map_err(KeysError::Invalid)?;
        }
        Ok(keys)
    }

    fn push_item(&mut self, item: &str, at: &str) -> Result<(), String> {
        let Some((key, bound)) = item.rsplit_once('=') else {
            return Err(format!("{at}: expected key=source (missing '=')"));
        };
        let (source, name) = match bound.split_once(':') {
            Some((source, name)) => (source.trim(), name.trim()),
            None => (bound.trim(), bound.trim()),
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{at}: empty key"));
        }
        if source.is_empty() {
            return Err(format!("{at}: empty source name"));
        }
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!(
                "{at}: key name must be 1-64 characters of A-Z a-z 0-9 . _ - (key=source:name; without `:name` the source is the name)"
            ));
        }
        let d = digest(key);
        if self.entries.iter().any(|e| e.digest == d) {
            return Err(format!(
                "{at}: duplicate key (the same key appears earlier)"
            ));
        }
        self.entries.push(Entry {
            digest: d,
            source: source.to_owned(),
            name: name.to_owned(),
        });
        Ok(())
    }

    /// Merges `other` into `self` (config keys + file keys). A key present in
    /// both keeps the binding from `other`.
    pub fn extend(&mut self, other: ApiKeys) {
        for entry in other.entries {
            match self.entries.iter_mut().find(|e| e.digest == entry.digest) {
                Some(existing) => *existing = entry,
                None => self.entries.push(entry),
            }
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The source bound to `presented`, or `None` if the key is unknown.
    ///
    /// Compares the SHA-256 digest of `presented` against the digest of every
    /// key with `subtle::ConstantTimeEq`, without stopping at a match, so
    /// neither the position of a match nor the key length leaks through timing.
    pub fn authenticate(&self, presented: &str) -> Option<String> {
        self.authenticate_named(presented)
            .map(|(source, _)| source.to_owned())
    }

    /// The (source, key name) of `presented`, compared as [`ApiKeys::authenticate`] does.
    pub fn authenticate_named(&self, presented: &str) -> Option<(&str, &str)> {
        if presented.is_empty() {
            return None;
        }
        let d = digest(presented);
        let mut found = u64::MAX;
        for (i, entry) in self.entries.iter().enumerate() {
            let index = u64::try_from(i).unwrap_or(u64::MAX);
            found.conditional_assign(&index, entry.digest.ct_eq(&d));
        }
        let index = usize::try_from(found).ok()?;
        self.entries
            .get(index)
            .map(|e| (e.source.as_str(), e.name.as_str()))
    }

    /// What changed from `before` to `self`, by key name (never a key): names that
    /// appeared, names that went, and names whose set of keys changed (a rotation).
    pub fn changes_from(&self, before: &ApiKeys) -> KeyChanges {
        let pairs = |keys: &ApiKeys| -> Vec<(String, KeyDigest)> {
            keys.entries
                .iter()
                .map(|e| (e.name.clone(), e.digest))
                .collect()
        };
        KeyChanges::between(pairs(before), pairs(self))
    }

    /// The keys' names, sorted, each once.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// Key names added, removed and re-keyed by a reload (see [`ApiKeys::changes_from`]).
pub type KeyChanges = pulse_platform::secret::NameChanges;

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sources: Vec<&str> = self.entries.iter().map(|e| e.source.as_str()).collect();
        f.debug_struct("ApiKeys")
            .field("sources", &sources)
            .field("names", &self.names())
            .field("keys", &format_args!("<redacted>"))
            .finish()
    }
}

/// Extracts the presented key from the `Authorization` header value
/// (`Bearer <key>`, scheme case-insensitive, surrounding whitespace ignored) or,
/// when that is absent or not a bearer token, from the `X-Api-Key` value
/// (trimmed). Returns `None` when neither yields a non-empty key without inner
/// whitespace (e.g. `Basic xyz` and no `X-Api-Key`).
pub fn presented_key<'a>(
    authorization: Option<&'a str>,
    x_api_key: Option<&'a str>,
) -> Option<&'a str> {
    authorization
        .and_then(bearer_token)
        .or_else(|| x_api_key.map(str::trim).filter(|k| valid_token(k)))
}

/// Who a request authenticated as: the source its events are charged to and the key's
/// name (never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub source: String,
    pub key: String,
}

impl Caller {
    /// The span the rest of an authenticated request runs in: every log line and trace
    /// span of the request below it carries the key's name (`auth.key`), its source and
    /// the caller's address; never the key.
    pub fn span(&self, peer: &str, transport: &'static str) -> tracing::Span {
        tracing::info_span!(
            "ingest.authenticated",
            auth.key = %self.key,
            ingest.source = %self.source,
            client.address = %peer,
            transport,
        )
    }
}

/// Authenticates a request by its `Authorization` and `X-Api-Key` values (HTTP headers or
/// gRPC metadata) against the current keys of `keys`. The request is counted under the
/// key's name; a refusal is counted as an authentication failure and logged at warn level
/// with the caller's address `peer` and why (no key presented, or an unknown one), never
/// with what was presented.
pub fn authenticate(
    keys: &KeyStore,
    authorization: Option<&str>,
    x_api_key: Option<&str>,
    peer: &str,
) -> Option<Caller> {
    let current = keys.current();
    let presented = presented_key(authorization, x_api_key);
    match presented.and_then(|k| current.authenticate_named(k)) {
        Some((source, name)) => {
            metrics::counter!(crate::metrics::AUTHENTICATED_TOTAL, "key" => name.to_owned())
                .increment(1);
            Some(Caller {
                source: source.to_owned(),
                key: name.to_owned(),
            })
        }
        None => {
            metrics::counter!(crate::metrics::AUTH_FAILURES_TOTAL).increment(1);
            tracing::warn!(
                client.address = peer,
                reason = if presented.is_some() {
                    "unknown_key"
                } else {
                    "no_key"
                },
                "ingest request refused: no valid API key"
            );
            None
        }
    }
}

/// The API keys in force: the inline ones (`--api-keys`) and those of `--api-keys-file`,
/// which [`KeyStore::watch`] re-reads when its content changes, so keys are added and
/// removed without a restart (rotation: add the new key, move the clients, remove the old
/// one). A file that no longer parses keeps the previous keys, logged and counted.
pub struct KeyStore {
    inline: ApiKeys,
    file: Option<PathBuf>,
    current: std::sync::RwLock<std::sync::Arc<ApiKeys>>,
    /// The file's content (SHA-256; `None`: unreadable) when it was last tried, good or
    /// not, so that a bad file is reported once and tried again when it changes.
    last: Mutex<Option<KeyDigest>>,
    tried: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("file", &self.file)
            .field("current", &*self.current())
            .finish()
    }
}

impl KeyStore {
    /// The inline keys and those of `file` (read now: an error is returned).
    pub fn load(inline: ApiKeys, file: Option<PathBuf>) -> Result<Self, KeysError> {
        let (keys, last) = match &file {
            None => (inline.clone(), None),
            Some(path) => {
                let text = read_keys_file(path)?;
                let mut keys = inline.clone();
                keys.extend(ApiKeys::from_text(&text, path)?);
                (keys, Some(digest(&text)))
            }
        };
        init_key_metrics(&keys);
        Ok(Self {
            inline,
            file,
            current: std::sync::RwLock::new(std::sync::Arc::new(keys)),
            tried: std::sync::atomic::AtomicBool::new(last.is_some()),
            last: Mutex::new(last),
        })
    }

    /// The keys in force now.
    pub fn current(&self) -> std::sync::Arc<ApiKeys> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the file if its content changed since it was last tried: `None` when it
    /// did not (or there is no file), else the outcome (on error the keys stay).
    pub fn reload_if_changed(&self) -> Option<Result<(), KeysError>> {
        let path = self.file.as_ref()?;
        let read = read_keys_file(path);
        let content = read.as_ref().ok().map(|text| digest(text));
        {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let tried = self.tried.swap(true, std::sync::atomic::Ordering::SeqCst);
            if tried && *last == content {
                return None;
            }
            *last = content;
        }
        let outcome = read
            .and_then(|text| ApiKeys::from_text(&text, path))
            .map(|file_keys| {
                let mut keys = self.inline.clone();
                keys.extend(file_keys);
                init_key_metrics(&keys);
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(keys);
            });
        let label = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::API_KEYS_RELOAD_TOTAL, "outcome" => label).increment(1);
        Some(outcome)
    }

    /// Checks the file every `interval` until `stop` is cancelled, logging and auditing
    /// each reload (actor `file`; key names added, removed and re-keyed, never keys).
    pub async fn watch(
        self: std::sync::Arc<Self>,
        interval: Duration,
        stop: tokio_util::sync::CancellationToken,
        audit: AuditLog,
    ) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let target = path.display().to_string();
        pulse_platform::shutdown::every(interval, &stop, || {
            let (this, before, target, audit) = (&self, self.current(), &target, &audit);
            async move {
                match this.reload_if_changed() {
                    None => {}
                    Some(Ok(())) => {
                        let keys = this.current();
                        let changes = keys.changes_from(&before);
                        tracing::info!(
                            keys = keys.len(),
                            names = ?keys.names(),
                            %changes,
                            "API keys reloaded from the key file; they apply to new requests"
                        );
                        audit.record(
                            AuditRecord::new(
                                crate::SERVICE,
                                "file",
                                action::KEYS_RELOAD,
                                target,
                                Outcome::Ok,
                            )
                            .with_detail(format!("{changes}; {} key(s) in force", keys.len())),
                        );
                    }
                    Some(Err(e)) => {
                        tracing::error!(
                            error = %e,
                            "API key file reload failed; the previous keys stay in force"
                        );
                        audit.record(
                            AuditRecord::new(
                                crate::SERVICE,
                                "file",
                                action::KEYS_RELOAD,
                                target,
                                Outcome::Failed,
                            )
                            .with_detail(format!("{e}; the previous keys stay in force")),
                        );
                    }
                }
            }
        })
        .await;
    }
}

fn read_keys_file(path: &Path) -> Result<String, KeysError> {
    std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Creates the per-key series at zero and sets the key count.
fn init_key_metrics(keys: &ApiKeys) {
    for name in keys.names() {
        metrics::counter!(crate::metrics::AUTHENTICATED_TOTAL, "key" => name.to_owned())
            .increment(0);
    }
    metrics::gauge!(crate::metrics::API_KEYS).set(keys.len() as f64);
}

/// Charges `events` to `source`'s token bucket; refused (and counted as rate-limited
/// events, at least one) when the bucket is empty.
pub fn admit(limiter: &RateLimiter, source: &str, events: u32) -> Result<(), Refusal> {
    limiter
        .try_acquire(source, events, Instant::now())
        .map_err(|wait| {
            metrics::counter!(crate::metrics::EVENTS_TOTAL, "outcome" => "rate_limited", "reason" => "")
                .increment(u64::from(events.max(1)));
            Refusal::RateLimited {
                key_source: source.to_owned(),
                retry_after_secs: retry_after_secs(wait),
            }
        })
}

fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim();
    let split = value.find(|c: char| c.is_ascii_whitespace())?;
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    valid_token(token).then_some(token)
}

fn valid_token(token: &str) -> bool {
    !token.is_empty() && !token.contains(|c: char| c.is_whitespace())
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-source token buckets: `rate` tokens per second refill up to `burst`.
///
/// A request of `n` events is admitted when the bucket holds at least 1 token;
/// it then takes `n` tokens, so the bucket may go negative (never below `1 - n`)
/// and big batches are never starved — the debt delays later requests instead.
/// When refused, the `Err` carries the time until the bucket is back to >= 1
/// token (see [`retry_after_secs`]).
///
/// `rate <= 0` (or NaN) means unlimited. `burst` is raised to at least 1 so a
/// bucket can always admit something. A bucket starts full. Memory: one bucket
/// per source name; sources come from the configured API keys, so this is
/// bounded by the key configuration.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// A limiter refilling `rate_per_sec` tokens/s up to `burst` tokens.
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        Self {
            rate: rate_per_sec,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn unlimited(&self) -> bool {
        self.rate.is_nan() || self.rate <= 0.0 || self.rate.is_infinite()
    }

    /// Admits a request of `events` events from `source` at `now`, or returns
    /// how long until the bucket is back to at least 1 token. An earlier `now`
    /// than previously seen never refills (and never panics).
    pub fn try_acquire(&self, source: &str, events: u32, now: Instant) -> Result<(), Duration> {
        if self.unlimited() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = match buckets.get_mut(source) {
            Some(b) => b,
            None => buckets.entry(source.to_owned()).or_insert(Bucket {
                tokens: self.burst,
                last: now,
            }),
        };
        if now > bucket.last {
            let elapsed = now.duration_since(bucket.last).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
            bucket.last = now;
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= f64::from(events);
            Ok(())
        } else {
            let secs = (1.0 - bucket.tokens) / self.rate;
            Err(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
        }
    }
}

/// Whole seconds for a `Retry-After` header: `d` rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const K1: &str = "k3y-0ne-SECRET";
    const K2: &str = "k3y-TW0-SECRET==";

    #[test]
    fn a_key_has_a_name_that_defaults_to_its_source() {
        let keys = ApiKeys::parse(&format!("{K1}=acme:acme-2026-12,{K2}=beta")).unwrap();
        assert_eq!(keys.authenticate_named(K1), Some(("acme", "acme-2026-12")));
        assert_eq!(keys.authenticate_named(K2), Some(("beta", "beta")));
        assert_eq!(keys.names(), ["acme-2026-12", "beta"]);
        let debug = format!("{keys:?}");
        assert!(
            debug.contains("acme-2026-12") && !debug.contains(K1),
            "{debug}"
        );
        for bad in [
            format!("{K1}=acme:"),
            format!("{K1}=acme:has space"),
            format!("{K1}=acme:{}", "n".repeat(65)),
            format!("{K1}=acme:a\"b"),
        ] {
            let e = ApiKeys::parse(&bad).unwrap_err().to_string();
            assert!(e.contains("key name must be"), "{e}");
            assert!(!e.contains(K1), "the key leaked: {e}");
        }
    }

    #[test]
    fn the_key_file_is_reloaded_when_it_changes_and_a_bad_one_keeps_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{K1}=acme:old\n")).unwrap();
        let inline = ApiKeys::parse("inline-key=ops").unwrap();
        let store = KeyStore::load(inline, Some(path.clone())).unwrap();
        let who = |key: &str| {
            store
                .current()
                .authenticate_named(key)
                .map(|(s, n)| format!("{s}/{n}"))
        };
        assert_eq!(who(K1).as_deref(), Some("acme/old"));
        assert_eq!(who("inline-key").as_deref(), Some("ops/ops"));
        assert!(store.reload_if_changed().is_none(), "unchanged");

        // Rotation: the new key next to the old one, both valid…
        std::fs::write(&path, format!("{K1}=acme:old\n{K2}=acme:new\n")).unwrap();
        assert!(matches!(store.reload_if_changed(), Some(Ok(()))));
        assert_eq!(who(K1).as_deref(), Some("acme/old"));
        assert_eq!(who(K2).as_deref(), Some("acme/new"));
        // …then the old one removed.
        std::fs::write(&path, format!("{K2}=acme:new\n")).unwrap();
        assert!(matches!(store.reload_if_changed(), Some(Ok(()))));
        assert_eq!(who(K1), None);
        assert_eq!(who(K2).as_deref(), Some("acme/new"));
        assert_eq!(
            who("inline-key").as_deref(),
            Some("ops/ops"),
            "inline keys stay"
        );

        // A file that no longer parses, or is gone, keeps the keys in force; each is
        // reported once.
        std::fs::write(&path, "no-equals-sign\n").unwrap();
        let e = store.reload_if_changed().unwrap().unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(store.reload_if_changed().is_none(), "reported once");
        assert_eq!(who(K2).as_deref(), Some("acme/new"));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            store.reload_if_changed(),
            Some(Err(KeysError::Read { .. }))
        ));
        assert!(store.reload_if_changed().is_none());
        assert_eq!(who(K2).as_deref(), Some("acme/new"));
        std::fs::write(&path, format!("{K1}=acme:back\n")).unwrap();
        assert!(matches!(store.reload_if_changed(), Some(Ok(()))));
        assert_eq!(who(K1).as_deref(), Some("acme/back"));
        assert_eq!(who(K2), None);
    }

    #[test]
    fn changes_between_key_sets_name_keys_never_show_them() {
        let before = ApiKeys::parse("k1=web:web-2025,k2=ios,k3=old").unwrap();
        let after = ApiKeys::parse("k1=web:web-2025,k9=ios,k4=android").unwrap();
        let c = after.changes_from(&before);
        assert_eq!(c.added, ["android"]);
        assert_eq!(c.removed, ["old"]);
        assert_eq!(c.replaced, ["ios"]);
        let text = c.to_string();
        assert_eq!(text, "added [android]; removed [old]; re-keyed [ios]");
        for key in ["k1", "k2", "k3", "k4", "k9"] {
            assert!(!text.contains(key), "{text}");
        }
        assert_eq!(after.changes_from(&after), KeyChanges::default());
    }

    #[test]
    fn parse_and_authenticate() {
        let keys = ApiKeys::parse(&format!("  {K1}=web , {K2} = ios ,")).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(!keys.is_empty());
        assert_eq!(keys.authenticate(K1).as_deref(), Some("web"));
        // Keys may contain '=' (split at the last one).
        assert_eq!(keys.authenticate(K2).as_deref(), Some("ios"));
    }

    #[test]
    fn empty_spec_is_empty_set() {
        let keys = ApiKeys::parse("  ").unwrap();
        assert!(keys.is_empty());
        assert_eq!(keys.authenticate("anything"), None);
    }

    #[test]
    fn authenticate_rejects_wrong_empty_and_prefix() {
        let keys = ApiKeys::parse(&format!("{K1}=web")).unwrap();
        assert_eq!(keys.authenticate("wrong"), None);
        assert_eq!(keys.authenticate(""), None);
        assert_eq!(keys.authenticate(&K1[..K1.len() - 1]), None);
        assert_eq!(keys.authenticate(&format!("{K1}x")), None);
        assert_eq!(keys.authenticate(&K1.to_uppercase()), None);
    }

    #[test]
    fn file_round_trip() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "# production keys\n\n{K1}=web\n   # indented comment\n  {K2}=ios  \n"
        )
        .unwrap();
        let keys = ApiKeys::from_file(f.path()).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.authenticate(K1).as_deref(), Some("web"));
        assert_eq!(keys.authenticate(K2).as_deref(), Some("ios"));
    }

    #[test]
    fn file_errors_name_line_not_key() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "{K1}=web\n{K2}").unwrap();
        let err = ApiKeys::from_file(f.path()).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains(K2) && !err.contains("SECRET"), "{err}");

        let missing = ApiKeys::from_file(Path::new("/nonexistent/pulse-keys")).unwrap_err();
        assert!(matches!(missing, KeysError::Read { .. }), "{missing}");
        let missing = missing.to_string();
        assert!(missing.contains("/nonexistent/pulse-keys"), "{missing}");
    }

    #[test]
    fn bad_specs_rejected_without_echoing_keys() {
        let cases = [
            (
                format!("{K1}=web,k3y-three-SECRET"),
                "item 2",
                "missing '='",
            ),
            // A key ending in '=' with no source: split at the last '='.
            (format!("{K1}=web,{K2}"), "item 2", "empty source"),
            (format!("{K1}=web,  = ios"), "item 2", "empty key"),
            (format!("{K1}="), "item 1", "empty source"),
            (format!("{K1}=web,{K1}=ios"), "item 2", "duplicate key"),
        ];
        for (spec, position, problem) in cases {
            let err = ApiKeys::parse(&spec).unwrap_err().to_string();
            assert!(err.contains(position), "{spec}: {err}");
            assert!(err.contains(problem), "{spec}: {err}");
            assert!(!err.contains("SECRET"), "key echoed: {err}");
            assert!(!err.contains("k3y"), "key echoed: {err}");
        }
    }

    #[test]
    fn extend_merges_and_other_wins() {
        let mut keys = ApiKeys::parse(&format!("{K1}=web")).unwrap();
        keys.extend(ApiKeys::parse(&format!("{K2}=ios,{K1}=android")).unwrap());
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.authenticate(K1).as_deref(), Some("android"));
        assert_eq!(keys.authenticate(K2).as_deref(), Some("ios"));
    }

    #[test]
    fn debug_hides_keys() {
        let keys = ApiKeys::parse(&format!("{K1}=web,{K2}=ios")).unwrap();
        let dbg = format!("{keys:?} {keys:#?}");
        assert!(dbg.contains("web") && dbg.contains("ios"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        assert!(!dbg.contains("SECRET") && !dbg.contains("k3y"), "{dbg}");
    }

    #[test]
    fn presented_key_variants() {
        assert_eq!(presented_key(Some("Bearer abc"), None), Some("abc"));
        assert_eq!(presented_key(Some("bearer abc"), None), Some("abc"));
        assert_eq!(presented_key(Some("BEARER abc"), None), Some("abc"));
        assert_eq!(presented_key(Some("  Bearer    abc  "), None), Some("abc"));
        assert_eq!(presented_key(Some("Bearer\tabc"), None), Some("abc"));
        assert_eq!(presented_key(None, Some(" xyz ")), Some("xyz"));
        assert_eq!(presented_key(Some("Bearer abc"), Some("xyz")), Some("abc"));
        assert_eq!(presented_key(None, None), None);
        assert_eq!(presented_key(Some("Basic xyz"), None), None);
        assert_eq!(presented_key(Some("Basic xyz"), Some("k")), Some("k"));
        assert_eq!(presented_key(Some("Bearer"), None), None);
        assert_eq!(presented_key(Some("Bearer   "), None), None);
        assert_eq!(presented_key(Some("Bearerabc"), None), None);
        assert_eq!(presented_key(Some("Bearer a b"), None), None);
        assert_eq!(presented_key(Some(""), Some("  ")), None);
    }

    #[test]
    fn rate_limiter_burst_then_refusal() {
        let rl = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(rl.try_acquire("web", 1, t0), Ok(()));
        }
        let wait = rl.try_acquire("web", 1, t0).unwrap_err();
        // Empty bucket, 2 tokens/s: 0.5 s until 1 token.
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
    }

    #[test]
    fn rate_limiter_refills_over_time() {
        let rl = RateLimiter::new(2.0, 2.0);
        let t0 = Instant::now();
        assert!(rl.try_acquire("web", 2, t0).is_ok());
        assert!(rl.try_acquire("web", 1, t0).is_err());
        // An earlier instant never refills nor panics.
        assert!(
            rl.try_acquire("web", 1, t0 - Duration::from_secs(5))
                .is_err()
        );
        let t1 = t0 + Duration::from_millis(500);
        assert!(rl.try_acquire("web", 1, t1).is_ok());
        assert!(rl.try_acquire("web", 1, t1).is_err());
        // Refill is capped at burst.
        let t2 = t1 + Duration::from_secs(3600);
        assert!(rl.try_acquire("web", 1, t2).is_ok());
        assert!(rl.try_acquire("web", 1, t2).is_ok());
        assert!(rl.try_acquire("web", 1, t2).is_err());
    }

    #[test]
    fn rate_limiter_big_batch_goes_into_debt() {
        let rl = RateLimiter::new(10.0, 5.0);
        let t0 = Instant::now();
        // 100 events > burst: admitted, bucket goes to 5 - 100 = -95.
        assert!(rl.try_acquire("web", 100, t0).is_ok());
        let wait = rl.try_acquire("web", 1, t0).unwrap_err();
        // (1 - (-95)) / 10 = 9.6 s.
        assert!((wait.as_secs_f64() - 9.6).abs() < 1e-9, "{wait:?}");
        assert_eq!(retry_after_secs(wait), 10);
        assert!(
            rl.try_acquire("web", 1, t0 + Duration::from_secs(9))
                .is_err()
        );
        assert!(
            rl.try_acquire("web", 1, t0 + Duration::from_millis(9600))
                .is_ok()
        );
    }

    #[test]
    fn rate_limiter_buckets_are_per_source() {
        let rl = RateLimiter::new(1.0, 1.0);
        let t0 = Instant::now();
        assert!(rl.try_acquire("web", 1, t0).is_ok());
        assert!(rl.try_acquire("web", 1, t0).is_err());
        assert!(rl.try_acquire("ios", 1, t0).is_ok());
        assert!(rl.try_acquire("ios", 1, t0).is_err());
    }

    #[test]
    fn rate_limiter_unlimited() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let rl = RateLimiter::new(rate, 1.0);
            for _ in 0..1000 {
                assert!(rl.try_acquire("web", u32::MAX, t0).is_ok());
            }
        }
    }

    #[test]
    fn rate_limiter_odd_parameters_do_not_panic() {
        let t0 = Instant::now();
        // Burst below 1 is raised to 1; a tiny rate gives a huge but finite wait.
        let rl = RateLimiter::new(1e-300, 0.0);
        assert!(rl.try_acquire("web", 1, t0).is_ok());
        let wait = rl.try_acquire("web", 1, t0).unwrap_err();
        assert!(retry_after_secs(wait) >= 1);
        let rl = RateLimiter::new(1.0, f64::NAN);
        assert!(rl.try_acquire("web", 1, t0).is_ok());
    }

    #[test]
    fn retry_after_rounds_up_min_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
    }
}
