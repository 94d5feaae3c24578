//! Who may call the REST API: HTTP basic authentication against a credentials file of
//! `name:role:hash` lines (role `read` or `write`; hash an Argon2id PHC string, as
//! `pulse-schema-registry hash-password` prints, or a bcrypt hash `$2a$`/`$2b$`/`$2y$`, as
//! Helm's `htpasswd` and `htpasswd -B` make: the chart generates its users that way), checked
//! on every route, with the set reloaded when the file changes. Read users may call every
//! read route; registering, deleting and changing config need `write`. With no file
//! configured every caller is anonymous and allowed (local development only).
//!
//! It owns the file format, verification and the failure metric; which routes write is
//! decided by [`is_write`] from the method and path alone, so a new route is a write
//! unless it is a GET or one of the two read-only POSTs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use pulse_platform::audit::{AuditLog, AuditRecord, Outcome, action};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::metrics as m;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// GETs, schema lookups and compatibility checks.
    Read,
    /// Everything `Read` may, plus register, delete and config changes.
    Write,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            other => Err(format!("role must be `read` or `write`, got {other:?}")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
        })
    }
}

/// One line of the credentials file.
#[derive(Debug, Clone)]
struct User {
    role: Role,
    /// The Argon2 PHC string (`$argon2id$v=19$m=…$salt$hash`) or the bcrypt hash
    /// (`$2b$10$` + salt and hash), checked at load.
    hash: String,
}

/// The bcrypt variants accepted: `$2a$` (Go's `x/crypto/bcrypt`, so Helm's `htpasswd`),
/// `$2b$` (OpenBSD, the `bcrypt` crate) and `$2y$` (Apache's `htpasswd -B`, PHP). `$2x$`
/// marks hashes of a buggy implementation and is refused.
const BCRYPT_PREFIXES: [&str; 3] = ["$2a$", "$2b$", "$2y$"];

/// The longest password bcrypt reads: it ignores bytes after the 72nd, so a longer password
/// is refused rather than matched on its prefix (Go's bcrypt refuses to hash one).
const BCRYPT_MAX_PASSWORD: usize = 72;

/// The cost of the bcrypt decoy when the file has no bcrypt line to copy: Go's (and so
/// Helm's `htpasswd`) default.
const BCRYPT_DEFAULT_COST: u32 = 10;

fn is_bcrypt(hash: &str) -> bool {
    hash.starts_with("$2")
}

/// Why a hash cannot be used, without the hash itself; `None` when it can.
fn hash_problem(hash: &str) -> Option<String> {
    if is_bcrypt(hash) {
        if !BCRYPT_PREFIXES.iter().any(|p| hash.starts_with(p)) {
            return Some(format!(
                "the bcrypt variant is not one of {} (regenerate the hash)",
                BCRYPT_PREFIXES.join(", ")
            ));
        }
        return match hash.parse::<bcrypt::HashParts>() {
            Err(e) => Some(format!("the bcrypt hash is malformed ({e})")),
            Ok(parts) if !(4..=31).contains(&parts.get_cost()) => Some(format!(
                "the bcrypt cost {} is outside 4..=31",
                parts.get_cost()
            )),
            Ok(_) => None,
        };
    }
    PasswordHash::new(hash).err().map(|e| {
        format!(
            "the hash is neither a PHC string ({e}) nor bcrypt; generate the line with `pulse-schema-registry hash-password`"
        )
    })
}

/// Why authentication or authorization failed; the label of
/// `pulse_schema_registry_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No `Authorization` header.
    Missing,
    /// Not `Basic <base64 of name:password>`.
    Malformed,
    UnknownUser,
    WrongPassword,
    /// A `read` user called a route that writes.
    Forbidden,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Failure::Missing,
        Failure::Malformed,
        Failure::UnknownUser,
        Failure::WrongPassword,
        Failure::Forbidden,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::UnknownUser => "unknown_user",
            Failure::WrongPassword => "wrong_password",
            Failure::Forbidden => "forbidden",
        }
    }
}

/// Why the credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read the credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credentials file {path}: {}", .problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// Parses the credentials file: `name:role:hash` per line; blank lines and lines starting
/// with `#` are skipped. Every bad line is reported (by number, never by content, since a
/// line may hold a pasted password).
fn parse(text: &str) -> Result<HashMap<String, User>, Vec<String>> {
    let mut users = HashMap::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, ':');
        let (Some(name), Some(role), Some(hash)) = (parts.next(), parts.next(), parts.next())
        else {
            problems.push(format!("line {n}: expected `name:role:hash`"));
            continue;
        };
        if name.is_empty() {
            problems.push(format!("line {n}: the user name is empty"));
            continue;
        }
        let role = match role.parse::<Role>() {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("line {n}: {e}"));
                continue;
            }
        };
        if let Some(problem) = hash_problem(hash) {
            problems.push(format!("line {n}: {problem}"));
            continue;
        }
        if users
            .insert(
                name.to_owned(),
                User {
                    role,
                    hash: hash.to_owned(),
                },
            )
            .is_some()
        {
            problems.push(format!("line {n}: user {name:?} appears twice"));
        }
    }
    if problems.is_empty() {
        Ok(users)
    } else {
        Err(problems)
    }
}

/// A credentials-file line for `name` with `role` and a new salted Argon2id hash of
/// `password`.
pub fn hash_line(name: &str, role: Role, password: &str) -> Result<String, String> {
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(format!(
            "user name {name:?} must be non-empty, without ':' or whitespace"
        ));
    }
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| format!("hashing failed: {e}"))?;
    Ok(format!("{name}:{role}:{hash}"))
}

/// The file's identity at a point in time; a change of either means "reload".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// The users of a credentials file, reloaded by [`Users::reload_if_changed`].
pub struct Users {
    path: PathBuf,
    users: RwLock<Arc<HashMap<String, User>>>,
    stamp: Mutex<Option<Stamp>>,
    /// user → SHA-256(pepper, password) of the password last verified for that user, so
    /// that a client's repeated requests cost one Argon2/bcrypt check, not one each.
    /// Cleared on every reload.
    verified: Mutex<HashMap<String, [u8; 32]>>,
    pepper: [u8; 16],
    /// At most this many Argon2/bcrypt checks run at once (on the blocking pool), so a
    /// flood of wrong passwords cannot take every core.
    checks: tokio::sync::Semaphore,
    /// A hash of a random password, checked for unknown users so that an unknown name
    /// costs the same time as a wrong password (no user-name probing by timing): of the
    /// kind most of the file's users have (see [`decoy_for`]), remade on every reload.
    decoy: RwLock<String>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("path", &self.path)
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

impl Users {
    /// Reads `path`; an unreadable or invalid file is an error (the registry does not start).
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let before = stamp(path).ok();
        let users = Self::read(path)?;
        let decoy = decoy_for(&users);
        let this = Self {
            path: path.to_owned(),
            users: RwLock::new(Arc::new(users)),
            stamp: Mutex::new(before),
            verified: Mutex::default(),
            pepper: *uuid::Uuid::new_v4().as_bytes(),
            checks: tokio::sync::Semaphore::new(2),
            decoy: RwLock::new(decoy),
        };
        metrics::gauge!(m::AUTH_USERS).set(this.count() as f64);
        Ok(this)
    }

    fn read(path: &Path) -> Result<HashMap<String, User>, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse(&text).map_err(|problems| AuthFileError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    pub fn count(&self) -> usize {
        self.users.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Reloads the file when its modification time or size changed: `None` when it did
    /// not, else what changed (user names added, removed and changed, never a hash) or why
    /// the file was not taken. A file that cannot be read or parsed keeps the previous
    /// users (logged and counted).
    pub fn reload_if_changed(&self) -> Option<Result<String, AuthFileError>> {
        let now = stamp(&self.path).ok();
        {
            let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *last == now {
                return None;
            }
            *last = now;
        }
        match Self::read(&self.path) {
            Ok(users) => {
                let n = users.len();
                let decoy = decoy_for(&users);
                let changes = {
                    let before = self.users.read().unwrap_or_else(|e| e.into_inner());
                    user_changes(&before, &users)
                };
                *self.users.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(users);
                *self.decoy.write().unwrap_or_else(|e| e.into_inner()) = decoy;
                self.verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                metrics::gauge!(m::AUTH_USERS).set(n as f64);
                metrics::counter!(m::AUTH_RELOADS_TOTAL, "outcome" => "ok").increment(1);
                tracing::info!(path = %self.path.display(), users = n, %changes, "registry credentials reloaded");
                Some(Ok(format!("{changes}; {n} user(s)")))
            }
            Err(e) => {
                metrics::counter!(m::AUTH_RELOADS_TOTAL, "outcome" => "error").increment(1);
                tracing::error!(error = %e, "registry credentials not reloaded; the previous users stay valid");
                Some(Err(e))
            }
        }
    }

    /// Polls the file every `every` until `stop` is cancelled, auditing each reload to
    /// `audit` (actor `file`, action `keys.registry-users.reload`, target the file; a file
    /// that is not taken as `failed`).
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken, audit: AuditLog) {
        let target = self.path.display().to_string();
        pulse_platform::shutdown::every(every, &stop, || {
            let (this, audit, target) = (self.clone(), audit.clone(), target.clone());
            async move {
                // File I/O off the async threads.
                let reloaded = tokio::task::spawn_blocking(move || this.reload_if_changed())
                    .await
                    .ok()
                    .flatten();
                let record = |outcome, detail: String| {
                    audit.record(
                        AuditRecord::new(
                            crate::SERVICE,
                            "file",
                            action::CREDENTIALS_RELOAD,
                            &target,
                            outcome,
                        )
                        .with_detail(detail),
                    );
                };
                match reloaded {
                    None => {}
                    Some(Ok(changes)) => record(Outcome::Ok, changes),
                    Some(Err(e)) => record(
                        Outcome::Failed,
                        format!("{e}; the previous users stay valid"),
                    ),
                }
            }
        })
        .await;
    }

    fn fingerprint(&self, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.pepper);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Checks a `Basic` authorization header; returns the user's name and role.
    pub async fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<(String, Role), Failure> {
        let (name, password) = decode_basic(authorization.ok_or(Failure::Missing)?)?;
        let found = self
            .users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .cloned();
        let Some(user) = found else {
            let decoy = self.decoy.read().unwrap_or_else(|e| e.into_inner()).clone();
            self.hash_check(decoy, password).await;
            return Err(Failure::UnknownUser);
        };
        let fingerprint = self.fingerprint(&password);
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .is_some_and(|f| bool::from(f.ct_eq(&fingerprint)));
        if known {
            return Ok((name, user.role));
        }
        if !self.hash_check(user.hash.clone(), password).await {
            return Err(Failure::WrongPassword);
        }
        // Remember it only if the user was not changed by a reload meanwhile.
        let still = self
            .users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .is_some_and(|u| u.hash == user.hash);
        if still {
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), fingerprint);
        }
        Ok((name, user.role))
    }
}

impl Users {
    /// One Argon2 or bcrypt verification on the blocking pool, at most `checks` at once.
    async fn hash_check(&self, hash: String, password: String) -> bool {
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || verify(&hash, &password))
            .await
            .unwrap_or(false)
    }
}

/// The decoy of a set of users: a bcrypt hash (at the highest cost among their bcrypt
/// hashes) when most of them are bcrypt, else an Argon2id one, so that an unknown name
/// costs what a known one does. Costs one hash; called where loading the file runs (at
/// start, and off the async threads on reloads).
fn decoy_for(users: &HashMap<String, User>) -> String {
    let bcrypt_costs: Vec<u32> = users
        .values()
        .filter_map(|u| u.hash.parse::<bcrypt::HashParts>().ok())
        .map(|p| p.get_cost())
        .collect();
    let random = uuid::Uuid::new_v4();
    if bcrypt_costs.len() * 2 > users.len() {
        let cost = bcrypt_costs
            .into_iter()
            .max()
            .unwrap_or(BCRYPT_DEFAULT_COST);
        return bcrypt::hash(random.as_bytes(), cost).unwrap_or_default();
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(random.as_bytes(), &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
}

/// Whether `password` matches `hash` (Argon2 PHC string or bcrypt). CPU-bound: callers run
/// it on the blocking pool.
fn verify(hash: &str, password: &str) -> bool {
    if is_bcrypt(hash) {
        return password.len() <= BCRYPT_MAX_PASSWORD
            && BCRYPT_PREFIXES.iter().any(|p| hash.starts_with(p))
            && bcrypt::verify(password, hash).unwrap_or(false);
    }
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// What a reload changed, by user name: `added [..]; removed [..]; changed [..]` (a new
/// password or role). Names only: never a hash.
fn user_changes(before: &HashMap<String, User>, after: &HashMap<String, User>) -> String {
    let sorted = |mut v: Vec<&str>| {
        v.sort_unstable();
        v.join(", ")
    };
    let added = sorted(
        after
            .keys()
            .filter(|n| !before.contains_key(*n))
            .map(String::as_str)
            .collect(),
    );
    let removed = sorted(
        before
            .keys()
            .filter(|n| !after.contains_key(*n))
            .map(String::as_str)
            .collect(),
    );
    let changed = sorted(
        after
            .iter()
            .filter(|(n, u)| {
                before
                    .get(*n)
                    .is_some_and(|b| b.hash != u.hash || b.role != u.role)
            })
            .map(|(n, _)| n.as_str())
            .collect(),
    );
    format!("added [{added}]; removed [{removed}]; changed [{changed}]")
}

/// `Basic base64(name:password)` → (name, password).
fn decode_basic(value: &HeaderValue) -> Result<(String, String), Failure> {
    let text = value.to_str().map_err(|_| Failure::Malformed)?;
    let (scheme, encoded) = text.trim().split_once(' ').ok_or(Failure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Failure::Malformed);
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| Failure::Malformed)?;
    let text = String::from_utf8(bytes).map_err(|_| Failure::Malformed)?;
    let (name, password) = text.split_once(':').ok_or(Failure::Malformed)?;
    Ok((name.to_owned(), password.to_owned()))
}

/// Whether a request changes state. GETs (and HEAD/OPTIONS), schema lookups
/// (`POST /subjects/{s}`) and compatibility checks (`POST /compatibility/…`) read;
/// everything else — registering, deletes, config changes, and any route added later —
/// writes.
pub fn is_write(method: &Method, path: &str) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    if *method == Method::POST {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let lookup = segments.len() == 2 && segments[0] == "subjects";
        let compatibility = segments.first() == Some(&"compatibility");
        return !(lookup || compatibility);
    }
    true
}

/// Who may call: anyone (no credentials file) or the users of a file; and where their
/// writes and refused attempts are audited.
#[derive(Debug, Clone, Default)]
pub struct Access {
    users: Option<Arc<Users>>,
    audit: AuditLog,
}

impl Access {
    /// Everyone may do everything (no credentials file).
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn users(users: Arc<Users>) -> Self {
        Self {
            users: Some(users),
            audit: AuditLog::disabled(),
        }
    }

    /// Audits every write (who, what, the status answered) and every refused write to
    /// `audit`.
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// Starts re-reading the credentials file every `every` until `stop`, each reload
    /// audited to this access's audit log (nothing to watch without a file).
    pub fn watch_users(&self, every: Duration, stop: CancellationToken) {
        if let Some(users) = &self.users {
            tokio::spawn(users.clone().watch(every, stop, self.audit.clone()));
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.users.is_none()
    }
}

/// The audit action of a write route: register, delete, config change (any other write
/// is [`action::SCHEMA_OTHER_WRITE`]) and its target (the subject, or `*` for the global
/// config).
pub fn audit_action(method: &Method, path: &str) -> (&'static str, String) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["subjects", subject, "versions"] if *method == Method::POST => {
            (action::SCHEMA_REGISTER, (*subject).to_owned())
        }
        ["subjects", subject, ..] if *method == Method::DELETE => {
            (action::SCHEMA_DELETE, (*subject).to_owned())
        }
        ["config"] => (action::SCHEMA_CONFIG, "*".to_owned()),
        ["config", subject] => (action::SCHEMA_CONFIG, (*subject).to_owned()),
        ["mode", ..] => (action::SCHEMA_CONFIG, segments[1..].join("/")),
        _ => (action::SCHEMA_OTHER_WRITE, path.to_owned()),
    }
}

/// Registers the failure counter at zero for every reason, so it is scraped before the
/// first failure.
pub fn register_metrics() {
    for f in Failure::ALL {
        metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => f.reason()).increment(0);
    }
}

/// The middleware: authenticates, authorizes, and answers 401 (with `WWW-Authenticate:
/// Basic`) or 403 on failure. Every write — done, failed or refused — is audited with
/// the user (`anonymous` without a credentials file), the caller's address and the status.
pub async fn middleware(State(access): State<Access>, req: Request, next: Next) -> Response {
    let write = is_write(req.method(), req.uri().path());
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "unknown".into());
    let audit = write.then(|| {
        let (action, target) = audit_action(req.method(), req.uri().path());
        let detail = format!(
            "{} {}",
            req.method(),
            req.uri()
                .path_and_query()
                .map_or(req.uri().path(), |p| p.as_str())
        );
        (action, target, detail)
    });
    let record = |actor: &str, outcome: Outcome, status: u16, detail: String| {
        if let Some((action, target, _)) = &audit {
            access.audit.record(
                AuditRecord::new(crate::SERVICE, actor, action, target, outcome)
                    .with_status(status)
                    .with_source(peer.clone())
                    .with_detail(detail),
            );
        }
    };
    let request_line = audit.as_ref().map(|a| a.2.clone()).unwrap_or_default();
    let config_change = audit
        .as_ref()
        .is_some_and(|(action, _, _)| *action == action::SCHEMA_CONFIG)
        && req.method() == Method::PUT;
    // Runs an allowed request and audits it; a config change's new value (a small JSON
    // body) goes into the record's detail.
    let run_audited = async |actor: &str, req: Request| -> Response {
        let (req, request_line) = if config_change {
            match config_body(req).await {
                Ok((req, body)) => (req, format!("{request_line} {body}")),
                Err(resp) => {
                    let status = resp.status().as_u16();
                    record(actor, Outcome::Failed, status, request_line.clone());
                    return resp;
                }
            }
        } else {
            (req, request_line.clone())
        };
        let resp = next.run(req).await;
        let status = resp.status();
        let outcome = if status.is_success() {
            Outcome::Ok
        } else {
            Outcome::Failed
        };
        record(actor, outcome, status.as_u16(), request_line);
        resp
    };
    let Some(users) = &access.users else {
        return run_audited("anonymous", req).await;
    };
    let outcome = match users
        .authenticate(req.headers().get(header::AUTHORIZATION))
        .await
    {
        Ok((name, Role::Read)) if write => Err((Failure::Forbidden, Some(name))),
        Ok((name, _)) => Ok(name),
        Err(f) => Err((f, None)),
    };
    let (failure, user) = match outcome {
        Ok(name) => {
            // The user name (never the password) on the request's completion line.
            pulse_platform::http::record_auth_key(req.extensions(), &name);
            metrics::counter!(m::AUTHENTICATED_TOTAL, "user" => name.clone()).increment(1);
            return run_audited(&name, req).await;
        }
        Err(e) => e,
    };
    metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => failure.reason()).increment(1);
    tracing::warn!(
        peer,
        reason = failure.reason(),
        user = user.as_deref().unwrap_or(""),
        method = %req.method(),
        path = req.uri().path(),
        "registry request refused"
    );
    let resp = match failure {
        Failure::Forbidden => ApiError::Forbidden(user.clone().unwrap_or_default()).into_response(),
        _ => {
            let mut resp = ApiError::Unauthorized.into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "Basic realm=\"pulse-schema-registry\", charset=\"UTF-8\"",
                ),
            );
            resp
        }
    };
    let actor = match (&user, failure) {
        (Some(name), _) => name.as_str(),
        (None, Failure::Missing) => "anonymous",
        (None, _) => "unauthenticated",
    };
    record(
        actor,
        Outcome::Refused,
        resp.status().as_u16(),
        format!("{request_line} (refused: {})", failure.reason()),
    );
    resp
}

/// Most bytes of a config change's body read for its audit record (a config body is a
/// few dozen bytes: `{"compatibility":"FULL"}`).
const CONFIG_BODY_LIMIT: usize = 64 * 1024;

/// Reads a config change's body and gives back the request with it, and the body as one
/// line of at most 200 printable characters for the audit record.
async fn config_body(req: Request) -> Result<(Request, String), Response> {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, CONFIG_BODY_LIMIT).await {
        Ok(bytes) => {
            let text: String = String::from_utf8_lossy(&bytes)
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            Ok((
                Request::from_parts(parts, axum::body::Body::from(bytes)),
                text,
            ))
        }
        Err(e) => Err(
            ApiError::BadBody(<serde_json::Error as serde::de::Error>::custom(format!(
                "reading the body failed (at most {CONFIG_BODY_LIMIT} bytes): {e}"
            )))
            .into_response(),
        ),
    }
}

/// `pulse-schema-registry hash-password --user NAME --role read|write`: reads the password
/// from the first line of stdin and prints the credentials-file line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "pulse-schema-registry hash-password",
    about = "Print a credentials-file line (name:role:argon2id-hash); the password is read from stdin.",
    long_about = "Print a credentials-file line (name:role:argon2id-hash); the password is read from stdin.\n\n\
The file also accepts bcrypt lines (name:role:$2a$/$2b$/$2y$…), e.g. from Helm's `htpasswd` \
(the chart's generated users) or `htpasswd -nbB NAME PASSWORD` (put `:read` or `:write` after the name)."
)]
pub struct HashPassword {
    /// User name (no ':' or whitespace).
    #[arg(long)]
    pub user: String,
    /// `read` (GETs, lookups, compatibility checks) or `write` (also register, delete, config).
    #[arg(long)]
    pub role: Role,
}

impl HashPassword {
    /// Reads the password from `input` (first line, without its newline) and returns the line.
    pub fn run(&self, input: &mut impl std::io::BufRead) -> Result<String, String> {
        let mut password = String::new();
        input
            .read_line(&mut password)
            .map_err(|e| format!("reading the password from stdin: {e}"))?;
        while password.ends_with('\n') || password.ends_with('\r') {
            password.pop();
        }
        let line = hash_line(&self.user, self.role, &password);
        password.clear();
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_write_route_has_an_audit_action_and_target() {
        let cases = [
            (
                Method::POST,
                "/subjects/s-value/versions",
                action::SCHEMA_REGISTER,
                "s-value",
            ),
            (
                Method::DELETE,
                "/subjects/s-value",
                action::SCHEMA_DELETE,
                "s-value",
            ),
            (
                Method::DELETE,
                "/subjects/s-value/versions/3",
                action::SCHEMA_DELETE,
                "s-value",
            ),
            (Method::PUT, "/config", action::SCHEMA_CONFIG, "*"),
            (
                Method::PUT,
                "/config/s-value",
                action::SCHEMA_CONFIG,
                "s-value",
            ),
            (
                Method::DELETE,
                "/config/s-value",
                action::SCHEMA_CONFIG,
                "s-value",
            ),
            (
                Method::PUT,
                "/mode/s-value",
                action::SCHEMA_CONFIG,
                "s-value",
            ),
            (
                Method::PATCH,
                "/new/route",
                action::SCHEMA_OTHER_WRITE,
                "/new/route",
            ),
        ];
        for (method, path, want, target) in cases {
            assert!(is_write(&method, path), "{method} {path}");
            assert_eq!(
                audit_action(&method, path),
                (want, target.to_owned()),
                "{method} {path}"
            );
        }
    }

    fn header(name: &str, password: &str) -> HeaderValue {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{name}:{password}"));
        HeaderValue::from_str(&format!("Basic {b}")).unwrap()
    }

    fn file(lines: &[String]) -> (tempfile_dir::Dir, PathBuf) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("users");
        std::fs::write(&path, lines.join("\n")).unwrap();
        (dir, path)
    }

    /// A folder removed on drop (no tempfile dependency in this crate).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p =
                    std::env::temp_dir().join(format!("pulse-sr-auth-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn a_user_authenticates_with_the_right_password_only() {
        let (_d, path) = file(&[
            "# comment".into(),
            hash_line("alice", Role::Write, "s3cret").unwrap(),
            hash_line("bob", Role::Read, "pw").unwrap(),
        ]);
        let users = Users::load(&path).unwrap();
        assert_eq!(
            users.authenticate(Some(&header("alice", "s3cret"))).await,
            Ok(("alice".into(), Role::Write))
        );
        // Twice: the second answer comes from the verified cache and agrees.
        assert_eq!(
            users.authenticate(Some(&header("alice", "s3cret"))).await,
            Ok(("alice".into(), Role::Write))
        );
        assert_eq!(
            users.authenticate(Some(&header("alice", "s3cret!"))).await,
            Err(Failure::WrongPassword)
        );
        assert_eq!(
            users.authenticate(Some(&header("bob", "pw"))).await,
            Ok(("bob".into(), Role::Read))
        );
        assert_eq!(
            users.authenticate(Some(&header("carol", "pw"))).await,
            Err(Failure::UnknownUser)
        );
        assert_eq!(users.authenticate(None).await, Err(Failure::Missing));
        for bad in ["Bearer abc", "Basic !!!", "Basic", "Basic YWxpY2U="] {
            assert_eq!(
                users
                    .authenticate(Some(&HeaderValue::from_static(bad)))
                    .await,
                Err(Failure::Malformed),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_changed_file_replaces_the_users_and_a_broken_one_keeps_them() {
        let (_d, path) = file(&[hash_line("alice", Role::Write, "one").unwrap()]);
        let users = Users::load(&path).unwrap();
        assert!(
            users
                .authenticate(Some(&header("alice", "one")))
                .await
                .is_ok()
        );
        std::fs::write(
            &path,
            format!(
                "{}\n{}\n",
                hash_line("alice", Role::Write, "two").unwrap(),
                hash_line("dave", Role::Read, "d").unwrap()
            ),
        )
        .unwrap();
        let changes = users
            .reload_if_changed()
            .expect("the file changed")
            .unwrap();
        assert_eq!(
            changes, "added [dave]; removed []; changed [alice]; 2 user(s)",
            "by name, never a hash"
        );
        assert_eq!(users.count(), 2);
        // The old password no longer works, even though it was cached.
        assert_eq!(
            users.authenticate(Some(&header("alice", "one"))).await,
            Err(Failure::WrongPassword)
        );
        assert!(
            users
                .authenticate(Some(&header("alice", "two")))
                .await
                .is_ok()
        );
        assert!(users.authenticate(Some(&header("dave", "d"))).await.is_ok());
        std::fs::write(&path, "garbage line without the format but longer\n").unwrap();
        let refused = users.reload_if_changed().expect("the file changed");
        assert!(refused.is_err());
        assert_eq!(users.count(), 2, "a broken file keeps the previous users");
        assert!(
            users.reload_if_changed().is_none(),
            "unchanged: nothing to do"
        );
    }

    #[test]
    fn bad_lines_are_named_by_number_without_their_content() {
        let text = "ok:read:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n\
                    nocolons\nx:admin:$argon2id$v=19$m=1,t=1,p=1$c2FsdA$aGFzaA\ny:read:plaintext-secret\n";
        let problems = parse(text).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("line 2:"), "{problems:?}");
        assert!(problems[1].contains("admin"), "{problems:?}");
        assert!(problems[2].starts_with("line 4:"), "{problems:?}");
        assert!(
            !problems.iter().any(|p| p.contains("plaintext-secret")),
            "{problems:?}"
        );
    }

    /// A line as Helm's `htpasswd "u" "correct horse"` printed it (Sprig, Go's bcrypt,
    /// `$2a$`, cost 10), with a role added: what the chart writes into the users Secret.
    const HELM_HTPASSWD_LINE: &str =
        "u:read:$2a$10$vF.9bsRDjTh.FY9ayczGjuuWIyrw5P8z/fjiwXtEBvicaVQqLQetC";

    #[tokio::test]
    async fn a_bcrypt_line_from_helm_authenticates_with_its_password_only() {
        // $2b$ as the bcrypt crate writes it and the same hash as $2y$ (Apache's `htpasswd
        // -B`): the three variants are one algorithm.
        let b = bcrypt::hash("w-pass", 4).unwrap();
        assert!(b.starts_with("$2b$04$"), "{b}");
        let y = b.replacen("$2b$", "$2y$", 1);
        let (_d, path) = file(&[
            HELM_HTPASSWD_LINE.into(),
            format!("w:write:{b}"),
            format!("y:read:{y}"),
            hash_line("argon", Role::Read, "a-pass").unwrap(),
        ]);
        let users = Users::load(&path).unwrap();
        for _ in 0..2 {
            // Twice: the second answer comes from the verified cache and agrees.
            assert_eq!(
                users
                    .authenticate(Some(&header("u", "correct horse")))
                    .await,
                Ok(("u".into(), Role::Read))
            );
        }
        assert_eq!(
            users
                .authenticate(Some(&header("u", "correct horse!")))
                .await,
            Err(Failure::WrongPassword)
        );
        assert_eq!(
            users
                .authenticate(Some(&header("u", "Correct horse")))
                .await,
            Err(Failure::WrongPassword)
        );
        assert_eq!(
            users.authenticate(Some(&header("w", "w-pass"))).await,
            Ok(("w".into(), Role::Write))
        );
        assert_eq!(
            users.authenticate(Some(&header("w", "w-pas"))).await,
            Err(Failure::WrongPassword)
        );
        assert_eq!(
            users.authenticate(Some(&header("y", "w-pass"))).await,
            Ok(("y".into(), Role::Read))
        );
        // Argon2id lines keep working beside them.
        assert_eq!(
            users.authenticate(Some(&header("argon", "a-pass"))).await,
            Ok(("argon".into(), Role::Read))
        );
        assert_eq!(
            users.authenticate(Some(&header("nobody", "x"))).await,
            Err(Failure::UnknownUser)
        );
        // Three of four users are bcrypt: the decoy for unknown names is bcrypt at their
        // highest cost (10), so an unknown name costs what a known one does.
        let decoy = users.decoy.read().unwrap().clone();
        assert!(decoy.starts_with("$2b$10$"), "{decoy}");
    }

    #[test]
    fn bcrypt_reads_72_bytes_so_a_longer_password_is_refused() {
        let password = "p".repeat(72);
        let hash = bcrypt::hash(&password, 4).unwrap();
        assert!(verify(&hash, &password));
        // bcrypt itself would accept this (it ignores the bytes after the 72nd).
        let longer = format!("{password}-anything");
        assert!(bcrypt::verify(&longer, &hash).unwrap());
        assert!(!verify(&hash, &longer));
    }

    #[test]
    fn a_malformed_bcrypt_hash_is_refused_at_load_naming_its_line() {
        let good = bcrypt::hash("x", 4).unwrap();
        let lines = [
            HELM_HTPASSWD_LINE.to_owned(),
            // Cut short (a copy-paste that lost its end).
            format!("short:read:{}", &good[..40]),
            // Not base64 of bcrypt's alphabet.
            format!("bad64:read:{}!!", &good[..58]),
            // The buggy-implementation variant.
            format!("x:read:{}", good.replacen("$2b$", "$2x$", 1)),
            // A cost bcrypt does not allow.
            format!("cost:write:{}", good.replacen("$2b$04$", "$2b$99$", 1)),
            format!("fine:write:{good}"),
        ];
        let (_d, path) = file(&lines);
        let err = Users::load(&path).unwrap_err().to_string();
        for (n, what) in [
            (2, "malformed"),
            (3, "malformed"),
            (4, "variant"),
            (5, "cost 99"),
        ] {
            assert!(
                err.contains(&format!("line {n}: ")) && err.contains(what),
                "line {n} ({what}) not named in: {err}"
            );
        }
        assert!(
            !err.contains("line 1:") && !err.contains("line 6:"),
            "{err}"
        );
        assert!(
            !err.contains(&good[7..40]),
            "the error must not echo the hash: {err}"
        );
        // The same file without the bad lines loads.
        let ok = [lines[0].clone(), lines[5].clone()];
        let (_d2, path2) = file(&ok);
        assert_eq!(Users::load(&path2).unwrap().count(), 2);
    }

    #[test]
    fn only_reads_lookups_and_compatibility_checks_are_not_writes() {
        let w = |m: Method, p: &str| is_write(&m, p);
        assert!(!w(Method::GET, "/subjects"));
        assert!(!w(Method::GET, "/config/x"));
        assert!(!w(Method::POST, "/subjects/orders-value"));
        assert!(!w(
            Method::POST,
            "/compatibility/subjects/x/versions/latest"
        ));
        assert!(w(Method::POST, "/subjects/orders-value/versions"));
        assert!(w(Method::PUT, "/config"));
        assert!(w(Method::PUT, "/config/x"));
        assert!(w(Method::DELETE, "/subjects/x"));
        assert!(w(Method::DELETE, "/config/x"));
        assert!(w(Method::PATCH, "/subjects"));
        assert!(w(Method::POST, "/anything/new"));
    }

    #[test]
    fn hash_password_reads_one_line_and_prints_a_parsable_line() {
        let cmd = HashPassword {
            user: "ci".into(),
            role: Role::Write,
        };
        let line = cmd.run(&mut "pa ss\nignored\n".as_bytes()).unwrap();
        assert!(line.starts_with("ci:write:$argon2id$"), "{line}");
        assert!(!line.contains("pa ss"));
        let users = parse(&line).unwrap();
        assert!(verify(&users["ci"].hash, "pa ss"));
        assert!(cmd.run(&mut "\n".as_bytes()).is_err());
        assert!(hash_line("a:b", Role::Read, "x").is_err());
    }
}
