//! The PII policy ingest applies to every accepted event before it is published.
//!
//! Owns: parsing the policy spec, deciding which action applies to which field,
//! and the actions themselves (keep, drop, HMAC hash, IP truncation).
//!
//! Leaves to others: where the spec and HMAC key come from (config/secrets),
//! when `apply` is called in the pipeline, and exporting the returned change
//! count as a metric. It does not validate events.
//!
//! # Spec
//!
//! Comma-separated `path=action` items; actions are `keep`, `drop`, `hash`,
//! `truncate` (case-insensitive). Paths:
//!
//! * `payload.page`, `payload.referrer`, `metadata.source`
//! * `payload.properties.<name>` — the property with exactly that name
//! * `payload.properties.*` — every property without an exact rule
//! * `email` — values that look like an e-mail address (see below)
//! * `key.user_id` — the user id, which is also the events' Kafka key: `keep` or `hash`
//!   only (`hash` pseudonymizes it with the same keyed HMAC, so it stays stable per user
//!   and per-user metrics, sessions and partitioning still work)
//! * `key.user_id.email` — a user id that looks like an e-mail address: `keep`, `hash`
//!   or `refuse` (the event is rejected with code `pii_refused` naming `key.user_id`;
//!   the DLQ record's key is then the hash, never the address)
//!
//! The `email` rule does not apply to `key.user_id`; its own two rules do. For a user id
//! that looks like an e-mail address: `key.user_id.email` > `key.user_id` > keep.
//!
//! The default is [`PiiPolicy::DEFAULT_SPEC`].
//!
//! # Precedence
//!
//! For a property: exact-name rule > e-mail rule > `payload.properties.*` rule >
//! keep. For `payload.page` / `payload.referrer`: the path rule > e-mail rule >
//! keep. `metadata.source` only follows its own path rule.
//!
//! A value "looks like an e-mail address" when it contains an `@` (or its
//! URL-encoded form `%40`) preceded by a local-part character
//! (`A-Z a-z 0-9 . _ % + -`) and followed by a domain with a dot inside
//! (`a@b.c`), anywhere in the value — so `mailto:` links and `?email=a%40b.com`
//! in a page URL are caught; false positives are hashed, which is the safe side.
//!
//! # Actions
//!
//! * `keep`: unchanged.
//! * `drop`: the property is removed; page/referrer/source become `""`.
//! * `hash`: `"hmac:"` + hex of the first 16 bytes of HMAC-SHA256(key, value) —
//!   stable for the same key and value, so joins across events still work.
//! * `truncate`: an IPv4 address becomes its /24 (`203.0.113.77` →
//!   `203.0.113.0`), an IPv6 address its /48 (`2001:db8:abcd:1234::1` →
//!   `2001:db8:abcd::`; IPv4-mapped IPv6 addresses are truncated as IPv4 /24).
//!   **A value that is not an IP address is hashed instead**, so a truncate rule
//!   never lets an unexpected value through in clear. Hence `truncate` needs the
//!   HMAC key too.
//!
//! Empty values are left alone by `hash` and `truncate` (there is nothing to
//! protect); `drop` still removes an empty property.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hmac::{Hmac, Mac};
use pulse_contracts::pb::events::v1::Event;
use sha2::Sha256;

use crate::validate::FieldError;

type HmacSha256 = Hmac<Sha256>;

const PROPERTIES_PREFIX: &str = "payload.properties.";

/// What to do with a field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiAction {
    /// Leave the value unchanged.
    Keep,
    /// Remove the property (or blank the field).
    Drop,
    /// Replace with a keyed hash: `hmac:<32 hex chars>`.
    Hash,
    /// Truncate an IP address (v4 → /24, v6 → /48); non-IPs are hashed.
    Truncate,
}

impl PiiAction {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        [
            ("keep", Self::Keep),
            ("drop", Self::Drop),
            ("hash", Self::Hash),
            ("truncate", Self::Truncate),
        ]
        .into_iter()
        .find_map(|(name, action)| s.eq_ignore_ascii_case(name).then_some(action))
    }

    fn needs_key(self) -> bool {
        matches!(self, Self::Hash | Self::Truncate)
    }
}

/// What to do with a `key.user_id` that looks like an e-mail address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailUserId {
    Keep,
    Hash,
    /// Reject the event (code [`REFUSED`], field `key.user_id`).
    Refuse,
}

/// The rejection code of an event the PII policy refuses.
pub const REFUSED: &str = "pii_refused";

const USER_ID: &str = "key.user_id";

/// Rules by field path plus the e-mail rule (see the module docs for the spec
/// and precedence). `Debug` never prints the HMAC key.
#[derive(Clone)]
pub struct PiiPolicy {
    user_id: Option<PiiAction>,
    user_id_email: Option<EmailUserId>,
    page: Option<PiiAction>,
    referrer: Option<PiiAction>,
    source: Option<PiiAction>,
    properties: HashMap<String, PiiAction>,
    any_property: Option<PiiAction>,
    email: Option<PiiAction>,
    mac: HmacSha256,
}

impl std::fmt::Debug for PiiPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiiPolicy")
            .field("user_id", &self.user_id)
            .field("user_id_email", &self.user_id_email)
            .field("page", &self.page)
            .field("referrer", &self.referrer)
            .field("source", &self.source)
            .field("properties", &self.properties)
            .field("any_property", &self.any_property)
            .field("email", &self.email)
            .field("hmac_key", &format_args!("<redacted>"))
            .finish()
    }
}

/// Outcome of applying an action to one value.
enum Outcome {
    Unchanged,
    Replace(String),
    Remove,
}

impl PiiPolicy {
    /// The documented default: truncate the `ip` property, hash e-mail addresses — in
    /// payload values and as user ids (a user id that looks like an e-mail address would
    /// otherwise be a Kafka key, a ClickHouse and Parquet column and a checkpoint entry in
    /// clear); other user ids are kept.
    pub const DEFAULT_SPEC: &'static str =
        "payload.properties.ip=truncate,email=hash,key.user_id.email=hash";

    /// Parses a spec (see the module docs). Empty items are skipped; an empty
    /// spec keeps everything. `hmac_key` must be non-empty when any rule hashes
    /// or truncates (truncate hashes non-IP values).
    pub fn parse(spec: &str, hmac_key: &[u8]) -> Result<Self, String> {
        let mut page = None;
        let mut referrer = None;
        let mut source = None;
        let mut properties = HashMap::new();
        let mut any_property = None;
        let mut email = None;
        let mut user_id = None;
        let mut user_id_email = None;
        let mut keyed_rule: Option<String> = None;

        for (i, item) in spec.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let at = format!("PII policy item {} ({item:?})", i + 1);
            let Some((path, action)) = item.rsplit_once('=') else {
                return Err(format!("{at}: expected path=action (missing '=')"));
            };
            let path = path.trim();
            if path == "key.user_id.email" {
                let choice = match action.trim().to_ascii_lowercase().as_str() {
                    "keep" => EmailUserId::Keep,
                    "hash" => EmailUserId::Hash,
                    "refuse" => EmailUserId::Refuse,
                    other => {
                        return Err(format!(
                            "{at}: unknown action {other:?} for key.user_id.email (expected keep, hash or refuse)"
                        ));
                    }
                };
                if user_id_email.replace(choice).is_some() {
                    return Err(format!("{at}: duplicate rule for {path:?}"));
                }
                if choice != EmailUserId::Keep && keyed_rule.is_none() {
                    keyed_rule = Some(item.to_owned());
                }
                continue;
            }
            let action = PiiAction::parse(action).ok_or_else(|| {
                format!(
                    "{at}: unknown action {:?} (expected keep, drop, hash or truncate)",
                    action.trim()
                )
            })?;
            if path == USER_ID && !matches!(action, PiiAction::Keep | PiiAction::Hash) {
                return Err(format!(
                    "{at}: key.user_id takes keep or hash only (it is the events' Kafka key: \
                     dropping or truncating it would merge users)"
                ));
            }
            let slot = match path {
                USER_ID => &mut user_id,
                "payload.page" => &mut page,
                "payload.referrer" => &mut referrer,
                "metadata.source" => &mut source,
                "payload.properties.*" => &mut any_property,
                "email" => &mut email,
                _ => match path.strip_prefix(PROPERTIES_PREFIX) {
                    Some(name) if !name.is_empty() => {
                        if properties.insert(name.to_owned(), action).is_some() {
                            return Err(format!("{at}: duplicate rule for {path:?}"));
                        }
                        if action.needs_key() && keyed_rule.is_none() {
                            keyed_rule = Some(item.to_owned());
                        }
                        continue;
                    }
                    _ => {
                        return Err(format!(
                            "{at}: unknown path {path:?} (expected payload.page, payload.referrer, \
                             metadata.source, payload.properties.<name>, payload.properties.*, email, \
                             key.user_id or key.user_id.email)"
                        ));
                    }
                },
            };
            if slot.replace(action).is_some() {
                return Err(format!("{at}: duplicate rule for {path:?}"));
            }
            if action.needs_key() && keyed_rule.is_none() {
                keyed_rule = Some(item.to_owned());
            }
        }

        if let Some(rule) = &keyed_rule
            && hmac_key.is_empty()
        {
            return Err(format!(
                "PII policy rule {rule:?} hashes values (truncate hashes non-IP values) \
                 but the HMAC key is empty; configure a non-empty PII HMAC key"
            ));
        }
        let mac = HmacSha256::new_from_slice(hmac_key)
            .map_err(|e| format!("PII policy: invalid HMAC key: {e}"))?;
        Ok(Self {
            user_id,
            user_id_email,
            page,
            referrer,
            source,
            properties,
            any_property,
            email,
            mac,
        })
    }

    /// Applies the policy to `event` in place; returns how many values were
    /// changed or dropped (for a metric). Values already equal to their result
    /// (e.g. an IP already truncated) are not counted.
    pub fn apply(&self, event: &mut Event) -> usize {
        let mut changed = 0;
        if let Some(key) = event.key.as_mut()
            && let Some(hashed) = self.user_id_value(&key.user_id)
        {
            key.user_id = hashed;
            changed += 1;
        }
        if let Some(payload) = event.payload.as_mut() {
            changed += self.apply_field(&mut payload.page, self.page, true);
            changed += self.apply_field(&mut payload.referrer, self.referrer, true);
            payload.properties.retain(|name, value| {
                let action = self.property_action(name, value);
                match self.run(action, value) {
                    Outcome::Unchanged => true,
                    Outcome::Replace(new) => {
                        *value = new;
                        changed += 1;
                        true
                    }
                    Outcome::Remove => {
                        changed += 1;
                        false
                    }
                }
            });
        }
        if let Some(metadata) = event.metadata.as_mut() {
            changed += self.apply_field(&mut metadata.source, self.source, false);
        }
        changed
    }

    /// Why the policy refuses `event` (a user id that looks like an e-mail address under
    /// `key.user_id.email=refuse`), if it does. The reason never holds the value.
    pub fn refusal(&self, event: &Event) -> Option<FieldError> {
        let user_id = event.key.as_ref().map_or("", |k| k.user_id.as_str());
        (self.user_id_email == Some(EmailUserId::Refuse) && looks_like_email(user_id)).then(|| {
            FieldError {
                field: USER_ID.to_owned(),
                code: REFUSED,
                reason: "looks like an e-mail address, which the PII policy refuses as a user id \
                         (key.user_id.email=refuse); send a pseudonymous id"
                    .to_owned(),
            }
        })
    }

    /// What a user id becomes under the `key.user_id` rules: `Some(hash)` when it is to be
    /// pseudonymized (a refused e-mail address too, so that it is not kept in clear
    /// anywhere, e.g. as a DLQ record's key), `None` when it is kept.
    pub fn user_id_value(&self, user_id: &str) -> Option<String> {
        if user_id.is_empty() || is_hash(user_id) {
            return None;
        }
        let email = self.user_id_email.filter(|_| looks_like_email(user_id));
        let hash = match email {
            Some(EmailUserId::Hash | EmailUserId::Refuse) => true,
            Some(EmailUserId::Keep) => false,
            None => self.user_id == Some(PiiAction::Hash),
        };
        hash.then(|| self.hash(user_id))
    }

    /// The Kafka key of a DLQ record whose event claimed `user_id`: the key an accepted
    /// event would have had (hashed where the policy hashes user ids).
    pub fn dlq_key(&self, user_id: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let raw = user_id?;
        match std::str::from_utf8(&raw)
            .ok()
            .and_then(|u| self.user_id_value(u))
        {
            Some(hashed) => Some(hashed.into_bytes()),
            // Not UTF-8 cannot be a user id a rule matches; keep it.
            None => Some(raw),
        }
    }

    /// Applies the policy to an event's JSON shape as far as it can be read (the DLQ
    /// keeps rejected events, which may not parse as an event): `key.user_id`,
    /// `payload.page`, `payload.referrer`, `payload.properties.*` string values and
    /// `metadata.source`; other fields are left as they are. Returns the number of values
    /// changed.
    pub fn apply_json(&self, value: &mut serde_json::Value) -> usize {
        use serde_json::Value;
        let mut changed = 0;
        let mut set = |slot: Option<&mut Value>, f: &dyn Fn(&str) -> Outcome| {
            let Some(slot) = slot else { return };
            let Some(text) = slot.as_str() else { return };
            match f(text) {
                Outcome::Unchanged => {}
                Outcome::Replace(new) => {
                    *slot = Value::String(new);
                    changed += 1;
                }
                Outcome::Remove => {
                    if !text.is_empty() {
                        *slot = Value::String(String::new());
                        changed += 1;
                    }
                }
            }
        };
        set(value.pointer_mut("/key/user_id"), &|u| {
            self.user_id_value(u)
                .map_or(Outcome::Unchanged, Outcome::Replace)
        });
        set(value.pointer_mut("/payload/page"), &|v| {
            self.run(self.field_action(self.page, true, v), v)
        });
        set(value.pointer_mut("/payload/referrer"), &|v| {
            self.run(self.field_action(self.referrer, true, v), v)
        });
        set(value.pointer_mut("/metadata/source"), &|v| {
            self.run(self.field_action(self.source, false, v), v)
        });
        if let Some(Value::Object(props)) = value.pointer_mut("/payload/properties") {
            props.retain(|name, v| {
                let Some(text) = v.as_str() else {
                    return true;
                };
                match self.run(self.property_action(name, text), text) {
                    Outcome::Unchanged => true,
                    Outcome::Replace(new) => {
                        *v = Value::String(new);
                        changed += 1;
                        true
                    }
                    Outcome::Remove => {
                        changed += 1;
                        false
                    }
                }
            });
        }
        changed
    }

    fn field_action(&self, rule: Option<PiiAction>, email_rule: bool, value: &str) -> PiiAction {
        match (rule, self.email) {
            (Some(action), _) => action,
            (None, Some(email)) if email_rule && looks_like_email(value) => email,
            _ => PiiAction::Keep,
        }
    }

    fn property_action(&self, name: &str, value: &str) -> PiiAction {
        if let Some(action) = self.properties.get(name) {
            return *action;
        }
        if let Some(action) = self.email
            && looks_like_email(value)
        {
            return action;
        }
        self.any_property.unwrap_or(PiiAction::Keep)
    }

    fn apply_field(&self, value: &mut String, rule: Option<PiiAction>, email_rule: bool) -> usize {
        let action = self.field_action(rule, email_rule, value);
        match self.run(action, value) {
            Outcome::Unchanged => 0,
            Outcome::Replace(new) => {
                *value = new;
                1
            }
            Outcome::Remove => {
                if value.is_empty() {
                    0
                } else {
                    value.clear();
                    1
                }
            }
        }
    }

    fn run(&self, action: PiiAction, value: &str) -> Outcome {
        let new = match action {
            PiiAction::Keep => return Outcome::Unchanged,
            PiiAction::Drop => return Outcome::Remove,
            _ if value.is_empty() => return Outcome::Unchanged,
            PiiAction::Hash => self.hash(value),
            PiiAction::Truncate => match value.parse::<IpAddr>() {
                Ok(ip) => truncate_ip(ip).to_string(),
                Err(_) => self.hash(value),
            },
        };
        if new == value {
            Outcome::Unchanged
        } else {
            Outcome::Replace(new)
        }
    }

    fn hash(&self, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(value.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("hmac:{}", hex::encode(&tag[..16]))
    }
}

/// Whether `value` is already a hash of this module (`hmac:` + 32 lowercase hex digits),
/// so that a user id is not hashed twice (a redriven or replayed event).
fn is_hash(value: &str) -> bool {
    value.len() == 37
        && value.starts_with("hmac:")
        && value[5..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn truncate_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(truncate_v4(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V6(truncate_v4(v4).to_ipv6_mapped()),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
            }
        },
    }
}

fn truncate_v4(v4: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = v4.octets();
    Ipv4Addr::new(a, b, c, 0)
}

/// True when `value` contains something shaped like `local@domain.tld` (or
/// `local%40domain.tld`); see the module docs.
fn looks_like_email(value: &str) -> bool {
    let bytes = value.as_bytes();
    let is_local = |b: u8| b.is_ascii_alphanumeric() || b"._%+-".contains(&b);
    let is_domain = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    (1..bytes.len()).any(|i| {
        let sep = if bytes[i] == b'@' {
            1
        } else if bytes[i..].len() >= 3
            && bytes[i] == b'%'
            && bytes[i + 1] == b'4'
            && bytes[i + 2] == b'0'
        {
            3
        } else {
            return false;
        };
        if !is_local(bytes[i - 1]) {
            return false;
        }
        let rest = &bytes[i + sep..];
        let len = rest
            .iter()
            .position(|b| !is_domain(*b))
            .unwrap_or(rest.len());
        let domain = trim_trailing_dots(&rest[..len]);
        match domain.iter().position(|b| *b == b'.') {
            Some(dot) => dot > 0 && dot + 1 < domain.len(),
            None => false,
        }
    })
}

fn trim_trailing_dots(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b'.'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_contracts::pb::events::v1::{Metadata, Payload};

    const KEY: &[u8] = b"test-hmac-key-SECRET";

    fn event(props: &[(&str, &str)]) -> Event {
        Event {
            event_id: "e1".into(),
            payload: Some(Payload {
                page: "/home".into(),
                referrer: "https://example.com/".into(),
                properties: props
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Default::default()
            }),
            metadata: Some(Metadata {
                source: "web".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn props(e: &Event) -> &HashMap<String, String> {
        &e.payload.as_ref().unwrap().properties
    }

    fn prop<'a>(e: &'a Event, name: &str) -> Option<&'a str> {
        props(e).get(name).map(String::as_str)
    }

    fn is_hash(v: &str) -> bool {
        v.len() == 5 + 32
            && v.starts_with("hmac:")
            && v[5..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }

    fn hash_of(value: &str) -> String {
        let p = PiiPolicy::parse("payload.properties.x=hash", KEY).unwrap();
        let mut e = event(&[("x", value)]);
        p.apply(&mut e);
        prop(&e, "x").unwrap().to_owned()
    }

    #[test]
    fn default_spec_on_mixed_event() {
        let p = PiiPolicy::parse(PiiPolicy::DEFAULT_SPEC, KEY).unwrap();
        let mut e = event(&[
            ("ip", "203.0.113.77"),
            ("contact", "Alice.Smith+news@example.co.uk"),
            ("plan", "pro"),
            ("count", "3"),
        ]);
        assert_eq!(p.apply(&mut e), 2);
        assert_eq!(prop(&e, "ip"), Some("203.0.113.0"));
        let contact = prop(&e, "contact").unwrap();
        assert!(is_hash(contact), "{contact}");
        assert_eq!(prop(&e, "plan"), Some("pro"));
        assert_eq!(prop(&e, "count"), Some("3"));
        let payload = e.payload.as_ref().unwrap();
        assert_eq!(payload.page, "/home");
        assert_eq!(payload.referrer, "https://example.com/");
        assert_eq!(e.metadata.as_ref().unwrap().source, "web");
        // Applying again changes nothing but already-hashed values stay hashed.
        assert_eq!(p.apply(&mut e), 0);
    }

    #[test]
    fn hash_is_deterministic_and_keyed() {
        let a = hash_of("alice");
        assert!(is_hash(&a), "{a}");
        assert_eq!(a, hash_of("alice"));
        assert_ne!(a, hash_of("bob"));
        let other = PiiPolicy::parse("payload.properties.x=hash", b"another-key").unwrap();
        let mut e = event(&[("x", "alice")]);
        other.apply(&mut e);
        assert_ne!(prop(&e, "x"), Some(a.as_str()));
    }

    #[test]
    fn hash_matches_hmac_sha256_reference() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let p = PiiPolicy::parse("payload.page=hash", b"Jefe").unwrap();
        let mut e = event(&[]);
        e.payload.as_mut().unwrap().page = "what do ya want for nothing?".into();
        assert_eq!(p.apply(&mut e), 1);
        assert_eq!(
            e.payload.unwrap().page,
            "hmac:5bdcc146bf60754e6a042426089575c7"
        );
    }

    #[test]
    fn each_action_on_properties() {
        let p = PiiPolicy::parse(
            "payload.properties.a=keep,payload.properties.b=DROP,payload.properties.c=Hash,\
             payload.properties.d=truncate",
            KEY,
        )
        .unwrap();
        let mut e = event(&[("a", "x@y.com"), ("b", "1"), ("c", "2"), ("d", "10.1.2.3")]);
        assert_eq!(p.apply(&mut e), 3);
        assert_eq!(prop(&e, "a"), Some("x@y.com"));
        assert_eq!(prop(&e, "b"), None);
        assert_eq!(prop(&e, "c"), Some(hash_of("2").as_str()));
        assert_eq!(prop(&e, "d"), Some("10.1.2.0"));
    }

    #[test]
    fn page_referrer_source_paths() {
        let p = PiiPolicy::parse(
            "payload.page=hash,payload.referrer=drop,metadata.source=truncate",
            KEY,
        )
        .unwrap();
        let mut e = event(&[("plan", "pro")]);
        assert_eq!(p.apply(&mut e), 3);
        let payload = e.payload.as_ref().unwrap();
        assert_eq!(payload.page, hash_of("/home"));
        assert_eq!(payload.referrer, "");
        // "web" is not an IP: truncate hashes it.
        assert_eq!(e.metadata.as_ref().unwrap().source, hash_of("web"));
        assert_eq!(prop(&e, "plan"), Some("pro"));
    }

    #[test]
    fn drop_source_and_missing_sections() {
        let p = PiiPolicy::parse("metadata.source=drop,payload.page=drop", KEY).unwrap();
        let mut e = event(&[]);
        assert_eq!(p.apply(&mut e), 2);
        assert_eq!(e.metadata.as_ref().unwrap().source, "");
        // Already empty: nothing changes.
        assert_eq!(p.apply(&mut e), 0);
        let mut bare = Event::default();
        assert_eq!(p.apply(&mut bare), 0);
    }

    #[test]
    fn truncate_ipv6_and_non_ip() {
        let p = PiiPolicy::parse("payload.properties.*=truncate", KEY).unwrap();
        let mut e = event(&[
            ("v6", "2001:db8:abcd:1234::1"),
            ("mapped", "::ffff:198.51.100.9"),
            ("port", "203.0.113.77:8080"),
            ("word", "hello"),
            ("empty", ""),
            ("done", "203.0.113.0"),
        ]);
        assert_eq!(p.apply(&mut e), 4);
        assert_eq!(prop(&e, "v6"), Some("2001:db8:abcd::"));
        assert_eq!(prop(&e, "mapped"), Some("::ffff:198.51.100.0"));
        assert_eq!(
            prop(&e, "port"),
            Some(hash_of("203.0.113.77:8080").as_str())
        );
        assert_eq!(prop(&e, "word"), Some(hash_of("hello").as_str()));
        assert_eq!(prop(&e, "empty"), Some(""));
        assert_eq!(prop(&e, "done"), Some("203.0.113.0"));
    }

    #[test]
    fn precedence_exact_then_email_then_wildcard() {
        let p = PiiPolicy::parse(
            "payload.properties.owner=keep,payload.properties.*=drop,email=hash",
            KEY,
        )
        .unwrap();
        let mut e = event(&[
            ("owner", "boss@example.com"),
            ("contact", "someone@example.com"),
            ("plan", "pro"),
        ]);
        assert_eq!(p.apply(&mut e), 2);
        // Exact rule beats e-mail rule.
        assert_eq!(prop(&e, "owner"), Some("boss@example.com"));
        // E-mail rule beats the wildcard.
        assert_eq!(
            prop(&e, "contact"),
            Some(hash_of("someone@example.com").as_str())
        );
        // Wildcard applies to the rest.
        assert_eq!(prop(&e, "plan"), None);
    }

    #[test]
    fn email_rule_on_page_and_referrer_but_path_rule_wins() {
        let p = PiiPolicy::parse("email=drop,payload.referrer=keep", KEY).unwrap();
        let mut e = event(&[]);
        {
            let payload = e.payload.as_mut().unwrap();
            payload.page = "/signup?email=a%40b.com".into();
            payload.referrer = "mailto:a@b.com".into();
        }
        assert_eq!(p.apply(&mut e), 1);
        let payload = e.payload.as_ref().unwrap();
        assert_eq!(payload.page, "");
        assert_eq!(payload.referrer, "mailto:a@b.com");
        // metadata.source is not subject to the e-mail rule.
        let mut e = event(&[]);
        e.metadata.as_mut().unwrap().source = "x@y.com".into();
        assert_eq!(p.apply(&mut e), 0);
    }

    #[test]
    fn email_detection() {
        for yes in [
            "a@b.co",
            "Alice.Smith+tag@mail.example.org",
            "contact a@b.com please",
            "mailto:x_y@d-e.io",
            "/p?e=a%40b.com",
            "a@b.com.",
        ] {
            assert!(looks_like_email(yes), "{yes}");
        }
        for no in [
            "",
            "@",
            "@b.com",
            "a@",
            "a@b",
            "a@.com",
            "a@b.",
            "https://mastodon.social/@alice",
            "https://medium.com/@john.doe",
            "user @ example.com",
            "100%",
            "%40",
            "plain text",
        ] {
            assert!(!looks_like_email(no), "{no}");
        }
    }

    #[test]
    fn invalid_specs_have_clear_messages() {
        let cases = [
            ("payload.user=drop", "unknown path \"payload.user\""),
            ("payload.properties.=drop", "unknown path"),
            ("payload.page=scramble", "unknown action \"scramble\""),
            ("payload.page", "missing '='"),
            ("payload.page=keep, payload.page=drop", "duplicate rule"),
            (
                "payload.properties.ip=keep,payload.properties.ip=drop",
                "duplicate rule",
            ),
            ("email=hash,email=keep", "duplicate rule"),
        ];
        for (spec, want) in cases {
            let err = PiiPolicy::parse(spec, KEY).unwrap_err();
            assert!(err.contains(want), "{spec}: {err}");
            assert!(err.contains("item"), "{spec}: {err}");
        }
        let err = PiiPolicy::parse("payload.page=keep,bogus=drop", KEY).unwrap_err();
        assert!(err.contains("item 2"), "{err}");
    }

    #[test]
    fn keyed_actions_need_a_key() {
        for spec in [
            "email=hash",
            "payload.properties.ip=truncate",
            PiiPolicy::DEFAULT_SPEC,
        ] {
            let err = PiiPolicy::parse(spec, b"").unwrap_err();
            assert!(err.contains("HMAC key is empty"), "{spec}: {err}");
        }
        // Keep/drop need no key; neither does an empty spec.
        assert!(PiiPolicy::parse("payload.page=drop,email=keep", b"").is_ok());
        let p = PiiPolicy::parse(" , ", b"").unwrap();
        let mut e = event(&[("ip", "1.2.3.4"), ("m", "a@b.com")]);
        assert_eq!(p.apply(&mut e), 0);
    }

    fn keyed_event(user_id: &str) -> Event {
        let mut e = event(&[("plan", "pro")]);
        e.key = Some(pulse_contracts::pb::events::v1::EventKey {
            user_id: user_id.into(),
            session_id: "s1".into(),
        });
        e
    }

    fn user_id(e: &Event) -> &str {
        &e.key.as_ref().unwrap().user_id
    }

    #[test]
    fn user_id_hash_pseudonymizes_every_user_id_stably() {
        let p = PiiPolicy::parse("key.user_id=hash", KEY).unwrap();
        let mut a = keyed_event("user-42");
        assert_eq!(p.apply(&mut a), 1);
        assert!(is_hash(user_id(&a)), "{}", user_id(&a));
        assert_eq!(
            user_id(&a),
            hash_of("user-42"),
            "the same HMAC as other fields"
        );
        let mut again = keyed_event("user-42");
        p.apply(&mut again);
        assert_eq!(user_id(&a), user_id(&again), "stable per user");
        let mut other = keyed_event("user-43");
        p.apply(&mut other);
        assert_ne!(user_id(&a), user_id(&other));
        // The session id and the rest are untouched; a hashed id is not hashed again.
        assert_eq!(a.key.as_ref().unwrap().session_id, "s1");
        assert_eq!(prop(&a, "plan"), Some("pro"));
        assert_eq!(p.apply(&mut a), 0);
        // Without a key.user_id rule an e-mail user id is kept, even with email=hash.
        let no_rule = PiiPolicy::parse("payload.properties.ip=truncate,email=hash", KEY).unwrap();
        let mut e = keyed_event("alice@example.com");
        no_rule.apply(&mut e);
        assert_eq!(user_id(&e), "alice@example.com");
        assert!(no_rule.refusal(&e).is_none());
        // The default hashes a user id that looks like an e-mail address (and only that).
        let default = PiiPolicy::parse(PiiPolicy::DEFAULT_SPEC, KEY).unwrap();
        let mut e = keyed_event("alice@example.com");
        assert_eq!(default.apply(&mut e), 1);
        assert_eq!(user_id(&e), hash_of("alice@example.com"));
        assert!(default.refusal(&e).is_none());
        assert_eq!(
            default.dlq_key(Some(b"alice@example.com".to_vec())),
            Some(hash_of("alice@example.com").into_bytes())
        );
        let mut opaque = keyed_event("user-42");
        assert_eq!(default.apply(&mut opaque), 0);
        assert_eq!(user_id(&opaque), "user-42");
    }

    #[test]
    fn an_email_user_id_is_refused_naming_the_field_but_not_the_value() {
        let p = PiiPolicy::parse("key.user_id.email=refuse", KEY).unwrap();
        let e = keyed_event("Alice.Smith@example.com");
        let err = p.refusal(&e).expect("refused");
        assert_eq!(err.field, "key.user_id");
        assert_eq!(err.code, REFUSED);
        let text = err.to_string();
        assert!(
            text.starts_with("key.user_id: looks like an e-mail address"),
            "{text}"
        );
        assert!(
            !text.contains("Alice") && !text.contains("example"),
            "{text}"
        );
        // Not an address: accepted and kept.
        let ok = keyed_event("user-42");
        assert!(p.refusal(&ok).is_none());
        let mut kept = ok.clone();
        assert_eq!(p.apply(&mut kept), 0);
        assert_eq!(user_id(&kept), "user-42");
        // The DLQ record of a refused event is keyed by the hash, never the address.
        assert_eq!(
            p.dlq_key(Some(b"Alice.Smith@example.com".to_vec())),
            Some(hash_of("Alice.Smith@example.com").into_bytes())
        );
        assert_eq!(
            p.dlq_key(Some(b"user-42".to_vec())),
            Some(b"user-42".to_vec())
        );
        assert_eq!(p.dlq_key(None), None);
    }

    #[test]
    fn an_email_user_id_may_be_hashed_while_other_ids_stay() {
        let p = PiiPolicy::parse("key.user_id.email=hash", KEY).unwrap();
        let mut e = keyed_event("bob@example.org");
        assert!(p.refusal(&e).is_none());
        assert_eq!(p.apply(&mut e), 1);
        assert_eq!(user_id(&e), hash_of("bob@example.org"));
        let mut plain = keyed_event("user-7");
        assert_eq!(p.apply(&mut plain), 0);
        assert_eq!(user_id(&plain), "user-7");
        // The address rule wins over key.user_id for an address.
        let both = PiiPolicy::parse("key.user_id=hash,key.user_id.email=keep", KEY).unwrap();
        let mut e = keyed_event("bob@example.org");
        both.apply(&mut e);
        assert_eq!(user_id(&e), "bob@example.org");
        let mut e = keyed_event("user-7");
        both.apply(&mut e);
        assert_eq!(user_id(&e), hash_of("user-7"));
    }

    #[test]
    fn user_id_rules_are_checked() {
        for (spec, want) in [
            ("key.user_id=drop", "keep or hash only"),
            ("key.user_id=truncate", "keep or hash only"),
            ("key.user_id.email=drop", "expected keep, hash or refuse"),
            ("key.user_id=hash,key.user_id=keep", "duplicate rule"),
            (
                "key.user_id.email=hash,key.user_id.email=refuse",
                "duplicate rule",
            ),
            ("payload.page=refuse", "unknown action"),
        ] {
            let err = PiiPolicy::parse(spec, KEY).unwrap_err();
            assert!(err.contains(want), "{spec}: {err}");
        }
        for spec in [
            "key.user_id=hash",
            "key.user_id.email=refuse",
            "key.user_id.email=hash",
        ] {
            let err = PiiPolicy::parse(spec, b"").unwrap_err();
            assert!(err.contains("HMAC key is empty"), "{spec}: {err}");
        }
        assert!(PiiPolicy::parse("key.user_id=keep,key.user_id.email=keep", b"").is_ok());
    }

    #[test]
    fn the_json_of_a_rejected_event_is_redacted_as_far_as_it_reads() {
        let p = PiiPolicy::parse(
            "key.user_id=hash,payload.properties.ip=truncate,email=hash,metadata.source=drop",
            KEY,
        )
        .unwrap();
        let mut v = serde_json::json!({
            "event_id": "e1",
            "key": {"user_id": "carol@example.com", "session_id": "s"},
            "payload": {
                "page": "/signup?email=carol%40example.com",
                "referrer": "https://example.com/",
                "amount": "not a number",
                "properties": {"ip": "203.0.113.9", "contact": "carol@example.com", "n": 3}
            },
            "metadata": {"source": "web"},
            "unknown_field": "carol@example.com"
        });
        assert_eq!(p.apply_json(&mut v), 5);
        assert_eq!(v["key"]["user_id"], hash_of("carol@example.com"));
        assert_eq!(v["key"]["session_id"], "s");
        assert_eq!(
            v["payload"]["page"],
            hash_of("/signup?email=carol%40example.com")
        );
        assert_eq!(v["payload"]["referrer"], "https://example.com/");
        assert_eq!(v["payload"]["properties"]["ip"], "203.0.113.0");
        assert_eq!(
            v["payload"]["properties"]["contact"],
            hash_of("carol@example.com")
        );
        assert_eq!(
            v["payload"]["properties"]["n"], 3,
            "non-strings are left alone"
        );
        assert_eq!(v["metadata"]["source"], "");
        // Fields outside the contract are not the policy's (the DLQ's raw-bytes setting is).
        assert_eq!(v["unknown_field"], "carol@example.com");
        // Shapes it cannot read are left as they are.
        let mut odd = serde_json::json!({"key": "x", "payload": [1, 2]});
        assert_eq!(p.apply_json(&mut odd), 0);
        let mut s = serde_json::json!("carol@example.com");
        assert_eq!(p.apply_json(&mut s), 0);
    }

    #[test]
    fn debug_hides_key() {
        let p = PiiPolicy::parse(PiiPolicy::DEFAULT_SPEC, KEY).unwrap();
        let dbg = format!("{p:?} {p:#?}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        assert!(
            !dbg.contains("SECRET") && !dbg.contains("test-hmac"),
            "{dbg}"
        );
        let hex_key = hex::encode(KEY);
        assert!(!dbg.contains(&hex_key), "{dbg}");
        assert!(!dbg.contains(&format!("{:?}", KEY)), "{dbg}");
    }
}
