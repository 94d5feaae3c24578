//! The event contract at the door: parses one event's original JSON bytes, checks it
//! strictly against the producer-facing shape, and maps it to the protobuf `Event`.
//!
//! This module owns the rules, their order, the error codes, and the derived event id.
//! Exact money parsing lives in [`crate::amount`]; enrichment (`ingest`), dedup, DLQ
//! routing and publishing are left to the pipeline.
//!
//! The first failing rule wins, in a fixed order: size, JSON, unknown fields, `event_id`,
//! `schema_version`, `event_type`, `key`, `payload`, `metadata`. A `null` optional field
//! counts as absent; a `null` required field as missing. A field of the wrong JSON type is
//! `invalid_type`, except `payload.amount` and `metadata.event_timestamp`, which accept
//! several types and report their own codes.
//!
//! `schema_version` is the producer's version of its event shape (see [`schema_version`]):
//! any version from 1 up is accepted unless the deployment refuses it.

use std::collections::HashMap;
use std::fmt;

use pulse_contracts::pb::events::v1::{Event, EventKey, Metadata, Payload};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub mod json;
pub mod schema_version;

use self::json::{Json, Object};

pub use self::schema_version::RefusedVersions;

/// Stable machine codes of [`FieldError`]; bounded, so fit for metric labels.
pub mod code {
    /// The raw event is longer than `Limits::max_event_bytes`.
    pub const EVENT_TOO_LARGE: &str = "event_too_large";
    /// The bytes are not JSON.
    pub const INVALID_JSON: &str = "invalid_json";
    /// The JSON is not an object.
    pub const NOT_AN_OBJECT: &str = "not_an_object";
    /// A key outside the contract.
    pub const UNKNOWN_FIELD: &str = "unknown_field";
    /// A required field is absent or `null`.
    pub const MISSING_FIELD: &str = "missing_field";
    /// A field has the wrong JSON type.
    pub const INVALID_TYPE: &str = "invalid_type";
    /// `event_id` is empty, too long or has characters outside the allowed set.
    pub const INVALID_EVENT_ID: &str = "invalid_event_id";
    /// `schema_version` is 0 (protobuf's unset value) or on `--refuse-schema-versions`.
    pub const UNSUPPORTED_SCHEMA_VERSION: &str = "unsupported_schema_version";
    /// `event_type` does not match the pattern.
    pub const INVALID_EVENT_TYPE: &str = "invalid_event_type";
    /// `key.user_id` is empty, too long or has characters outside the allowed set.
    pub const INVALID_USER_ID: &str = "invalid_user_id";
    /// `key.session_id` is too long or has characters outside the allowed set.
    pub const INVALID_SESSION_ID: &str = "invalid_session_id";
    /// A free-text string is longer than its limit.
    pub const TOO_LONG: &str = "too_long";
    /// `payload.properties` has more entries than allowed.
    pub const TOO_MANY_PROPERTIES: &str = "too_many_properties";
    /// A `payload.properties` key is empty, too long or has disallowed characters.
    pub const INVALID_PROPERTY_NAME: &str = "invalid_property_name";
    /// `payload.amount` is not an exact, non-negative decimal within range.
    pub const INVALID_AMOUNT: &str = "invalid_amount";
    /// `payload.currency` is not an active ISO 4217 code.
    pub const INVALID_CURRENCY: &str = "invalid_currency";
    /// `metadata.event_timestamp` is neither RFC 3339 nor integer epoch milliseconds.
    pub const INVALID_TIMESTAMP: &str = "invalid_timestamp";
    /// `metadata.event_timestamp` is further ahead than the allowed clock skew.
    pub const TIMESTAMP_IN_FUTURE: &str = "timestamp_in_future";
    /// `metadata.event_timestamp` is older than the maximum age.
    pub const TIMESTAMP_TOO_OLD: &str = "timestamp_too_old";
}

/// Validation limits (all configurable by the service; defaults shown).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `schema_version`s refused by this deployment (none); every other version from 1
    /// up is accepted.
    pub refused_schema_versions: RefusedVersions,
    /// How far ahead of the server clock an event time may be (5 minutes).
    pub max_future_skew_ms: i64,
    /// How far behind the server clock an event time may be (7 days).
    pub max_age_ms: i64,
    /// Largest raw event, in bytes (32 KiB).
    pub max_event_bytes: usize,
    /// Longest `key.user_id`, in characters (128).
    pub max_user_id_len: usize,
    /// Most entries in `payload.properties` (64).
    pub max_properties: usize,
    /// Longest free-text string, in characters (2048): page, referrer and property values;
    /// session_id, trace_id and source are further capped at 128.
    pub max_string_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            refused_schema_versions: RefusedVersions::default(),
            max_future_skew_ms: 5 * 60_000,
            max_age_ms: 7 * 24 * 3_600_000,
            max_event_bytes: 32 * 1024,
            max_user_id_len: 128,
            max_properties: 64,
            max_string_len: 2048,
        }
    }
}

/// Why one event was rejected: the field (dotted path) and a reason a producer can act on,
/// plus a stable machine code (one of [`code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `payload.amount`; empty for the whole event.
    pub field: String,
    /// What is wrong and what is accepted.
    pub reason: String,
    /// Stable machine code.
    pub code: &'static str,
}

impl FieldError {
    fn new(field: impl Into<String>, code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            code,
        }
    }
}

impl fmt::Display for FieldError {
    /// `<field>: <reason>`, or just the reason when it concerns the whole event.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for FieldError {}

const TOP_FIELDS: &[&str] = &[
    "event_id",
    "schema_version",
    "event_type",
    "key",
    "payload",
    "metadata",
];
const KEY_FIELDS: &[&str] = &["user_id", "session_id"];
const PAYLOAD_FIELDS: &[&str] = &["page", "referrer", "currency", "amount", "properties"];
const METADATA_FIELDS: &[&str] = &["event_timestamp", "trace_id", "source"];

/// Fixed caps, independent of [`Limits`].
const MAX_EVENT_ID_LEN: usize = 128;
const MAX_SHORT_STRING_LEN: usize = 128;
const MAX_EVENT_TYPE_LEN: usize = 64;
const MAX_PROPERTY_NAME_LEN: usize = 64;
/// Unknown keys are echoed in the error path at most this long.
const MAX_ECHOED_KEY_LEN: usize = 64;

const EVENT_TYPE_PATTERN: &str = "^[a-z][a-z0-9_]{0,63}$";

/// Parses and validates one event given as its original JSON bytes; returns the protobuf
/// `Event` with `event_id` set (derived if absent) and `ingest` = None.
pub fn validate(raw: &[u8], now_ms: i64, limits: &Limits) -> Result<Event, FieldError> {
    check_size(raw.len(), limits)?;
    // Borrowed strings, no map nodes: what a `Value` would hold, at a fraction of the
    // allocations (see `json`).
    let value: Json<'_> = serde_json::from_slice(raw).map_err(|e| {
        FieldError::new(
            "",
            code::INVALID_JSON,
            format!("event is not valid JSON: {e}"),
        )
    })?;
    validate_value(&value, now_ms, limits)
}

/// Validates one event that arrived as something else than JSON (a gRPC message) and is
/// given in its JSON shape, `value`; `size` is the length of its original encoding, checked
/// against the per-event limit. The same rules as [`validate`].
pub fn validate_parsed(
    value: &Value,
    size: usize,
    now_ms: i64,
    limits: &Limits,
) -> Result<Event, FieldError> {
    check_size(size, limits)?;
    validate_value(&Json::from_value(value), now_ms, limits)
}

fn check_size(size: usize, limits: &Limits) -> Result<(), FieldError> {
    if size > limits.max_event_bytes {
        return Err(FieldError::new(
            "",
            code::EVENT_TOO_LARGE,
            format!(
                "event is {size} bytes; the limit is {} bytes",
                limits.max_event_bytes
            ),
        ));
    }
    Ok(())
}

fn validate_value(value: &Json<'_>, now_ms: i64, limits: &Limits) -> Result<Event, FieldError> {
    let Json::Object(top) = value else {
        return Err(FieldError::new(
            "",
            code::NOT_AN_OBJECT,
            format!("event must be a JSON object, got {}", type_name(value)),
        ));
    };

    check_known_fields(top, TOP_FIELDS, "")?;
    for (name, allowed) in [
        ("key", KEY_FIELDS),
        ("payload", PAYLOAD_FIELDS),
        ("metadata", METADATA_FIELDS),
    ] {
        if let Some(Json::Object(nested)) = top.get(name) {
            check_known_fields(nested, allowed, name)?;
        }
    }

    let event_id = match present(top, "event_id") {
        Some(v) => {
            let id = as_str(v, "event_id")?;
            check_identifier(
                id,
                "event_id",
                code::INVALID_EVENT_ID,
                MAX_EVENT_ID_LEN,
                false,
                is_event_id_char,
                "[A-Za-z0-9._:-]",
            )?;
            id.to_owned()
        }
        None => derive_id(value),
    };
    let schema_version = check_schema_version(top, limits)?;
    let event_type = check_event_type(top)?;
    let key = check_key(top, limits)?;
    let payload = check_payload(top, limits)?;
    let metadata = check_metadata(top, now_ms, limits)?;

    Ok(Event {
        event_id,
        schema_version,
        event_type,
        key: Some(key),
        payload,
        metadata: Some(metadata),
        ingest: None,
    })
}

/// Derives a deterministic event id from the event's content (every field except
/// event_id): the same content always gives the same id, so a client retry counts as a
/// duplicate.
///
/// The id is `"d-"` followed by the first 16 bytes of the SHA-256 of the canonical JSON
/// text (keys sorted at every level, no whitespace) of the object without its top-level
/// `event_id`, as 32 lowercase hex characters. The canonical text is built here rather than
/// by `serde_json::to_string`, so it stays sorted even if another crate turns on
/// serde_json's `preserve_order`.
pub fn derive_event_id(value: &Value) -> String {
    derive_id(&Json::from_value(value))
}

/// [`derive_event_id`] of a parsed event.
fn derive_id(value: &Json<'_>) -> String {
    let mut text = String::new();
    write_canonical(value, true, &mut text);
    let digest = Sha256::digest(text.as_bytes());
    let prefix = digest.get(..16).unwrap_or(&[]);
    format!("d-{}", hex::encode(prefix))
}

/// Writes `value` as compact JSON with object keys sorted; at the top level `event_id` is
/// skipped when `skip_event_id` is set.
fn write_canonical(value: &Json<'_>, skip_event_id: bool, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&n.to_string()),
        Json::String(s) => write_json_string(s, out),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, false, out);
            }
            out.push(']');
        }
        Json::Object(map) => {
            // Sorted by key already (`Object`); sorted again, as the canonical text needs.
            let mut entries: Vec<(&str, &Json<'_>)> = map
                .iter()
                .filter(|(k, _)| !(skip_event_id && *k == "event_id"))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(k, out);
                out.push(':');
                write_canonical(v, false, out);
            }
            out.push('}');
        }
    }
}

/// Escapes a string the way serde_json does (so the canonical text equals its output).
fn write_json_string(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let b = u32::from(c);
                out.push_str("\\u00");
                for nibble in [b >> 4, b & 0xF] {
                    let digit = usize::try_from(nibble)
                        .ok()
                        .and_then(|n| HEX.get(n))
                        .copied()
                        .unwrap_or(b'0');
                    out.push(char::from(digit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn check_known_fields(obj: &Object<'_>, allowed: &[&str], prefix: &str) -> Result<(), FieldError> {
    match obj.keys().find(|k| !allowed.contains(k)) {
        Some(unknown) => Err(FieldError::new(
            join(prefix, &truncate(unknown, MAX_ECHOED_KEY_LEN)),
            code::UNKNOWN_FIELD,
            format!(
                "is not part of the event contract; allowed here: {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn check_schema_version(top: &Object<'_>, limits: &Limits) -> Result<u32, FieldError> {
    let field = "schema_version";
    let v = required(top, field, field)?;
    let Json::Number(n) = v else {
        return Err(wrong_type(field, "an integer", v));
    };
    let version: i128 = if let Some(i) = n.as_i64() {
        i128::from(i)
    } else if let Some(u) = n.as_u64() {
        i128::from(u)
    } else {
        return Err(wrong_type(field, "an integer", v));
    };
    let refused = |reason: String| {
        Err(FieldError::new(
            field,
            code::UNSUPPORTED_SCHEMA_VERSION,
            reason,
        ))
    };
    match u32::try_from(version) {
        Ok(0) => refused(
            "0 is not a version (it is protobuf's unset value); send the producer's version \
             of its event shape, 1 or higher"
                .to_owned(),
        ),
        Ok(version) if limits.refused_schema_versions.contains(version) => refused(format!(
            "{version} is refused by this deployment (--refuse-schema-versions {}); \
             send the event in a version it accepts",
            limits.refused_schema_versions
        )),
        Ok(version) => Ok(version),
        Err(_) => refused(format!(
            "{version} is not a version; it must be a whole number from 1 to {}",
            u32::MAX
        )),
    }
}

fn check_event_type(top: &Object<'_>) -> Result<String, FieldError> {
    let field = "event_type";
    let s = as_str(required(top, field, field)?, field)?;
    let bytes = s.as_bytes();
    let valid = match bytes.split_first() {
        Some((first, rest)) => {
            first.is_ascii_lowercase()
                && bytes.len() <= MAX_EVENT_TYPE_LEN
                && rest
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
        }
        None => false,
    };
    if valid {
        Ok(s.to_owned())
    } else {
        Err(FieldError::new(
            field,
            code::INVALID_EVENT_TYPE,
            format!("must match {EVENT_TYPE_PATTERN}, e.g. \"page_view\""),
        ))
    }
}

fn check_key(top: &Object<'_>, limits: &Limits) -> Result<EventKey, FieldError> {
    let key = as_object(required(top, "key", "key")?, "key")?;
    let field = "key.user_id";
    let user_id = as_str(required(key, "user_id", field)?, field)?;
    check_identifier(
        user_id,
        field,
        code::INVALID_USER_ID,
        limits.max_user_id_len,
        false,
        is_user_id_char,
        "[A-Za-z0-9._:@-]",
    )?;
    let field = "key.session_id";
    let session_id = match present(key, "session_id") {
        Some(v) => {
            let s = as_str(v, field)?;
            check_identifier(
                s,
                field,
                code::INVALID_SESSION_ID,
                capped(limits.max_string_len),
                true,
                is_user_id_char,
                "[A-Za-z0-9._:@-]",
            )?;
            s.to_owned()
        }
        None => String::new(),
    };
    Ok(EventKey {
        user_id: user_id.to_owned(),
        session_id,
    })
}

fn check_payload(top: &Object<'_>, limits: &Limits) -> Result<Option<Payload>, FieldError> {
    let Some(v) = present(top, "payload") else {
        return Ok(None);
    };
    let payload = as_object(v, "payload")?;
    let page = optional_text(payload, "page", "payload.page", limits.max_string_len)?;
    let referrer = optional_text(
        payload,
        "referrer",
        "payload.referrer",
        limits.max_string_len,
    )?;
    let properties = check_properties(payload, limits)?;

    let field = "payload.amount";
    let amount_micros = match present(payload, "amount") {
        Some(v) => {
            let micros = crate::amount::json_to_micros(v)
                .map_err(|reason| FieldError::new(field, code::INVALID_AMOUNT, reason))?;
            if micros < 0 {
                return Err(FieldError::new(field, code::INVALID_AMOUNT, "must be >= 0"));
            }
            Some(micros)
        }
        None => None,
    };

    let field = "payload.currency";
    let currency = match (present(payload, "currency"), amount_micros) {
        (Some(v), _) => {
            let currency = as_str(v, field)?;
            check_currency(currency)
                .map_err(|reason| FieldError::new(field, code::INVALID_CURRENCY, reason))?;
            currency.to_owned()
        }
        (None, Some(_)) => {
            return Err(FieldError::new(
                field,
                code::MISSING_FIELD,
                "is required when payload.amount is present (an ISO 4217 code such as \"EUR\")",
            ));
        }
        (None, None) => String::new(),
    };

    Ok(Some(Payload {
        page,
        referrer,
        currency,
        amount_micros,
        properties,
    }))
}

fn check_properties(
    payload: &Object<'_>,
    limits: &Limits,
) -> Result<HashMap<String, String>, FieldError> {
    let field = "payload.properties";
    let Some(v) = present(payload, "properties") else {
        return Ok(HashMap::new());
    };
    let props = as_object(v, field)?;
    if props.len() > limits.max_properties {
        return Err(FieldError::new(
            field,
            code::TOO_MANY_PROPERTIES,
            format!(
                "has {} entries; at most {} are allowed",
                props.len(),
                limits.max_properties
            ),
        ));
    }
    let mut out = HashMap::with_capacity(props.len());
    for (name, value) in props.iter() {
        let valid_name = !name.is_empty()
            && name.len() <= MAX_PROPERTY_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid_name {
            return Err(FieldError::new(
                field,
                code::INVALID_PROPERTY_NAME,
                format!(
                    "property name {:?} must be 1..={MAX_PROPERTY_NAME_LEN} characters of [A-Za-z0-9_.-]",
                    truncate(name, MAX_ECHOED_KEY_LEN)
                ),
            ));
        }
        // The path is only written out for an error.
        let Json::String(text) = value else {
            return Err(wrong_type(&format!("{field}.{name}"), "a string", value));
        };
        if text.len() > limits.max_string_len {
            check_text_len(text, &format!("{field}.{name}"), limits.max_string_len)?;
        }
        out.insert(name.to_owned(), String::from(&**text));
    }
    Ok(out)
}

fn check_metadata(top: &Object<'_>, now_ms: i64, limits: &Limits) -> Result<Metadata, FieldError> {
    let metadata = as_object(required(top, "metadata", "metadata")?, "metadata")?;
    let field = "metadata.event_timestamp";
    let ts = parse_timestamp(required(metadata, "event_timestamp", field)?)
        .map_err(|reason| FieldError::new(field, code::INVALID_TIMESTAMP, reason))?;
    let skew = limits.max_future_skew_ms;
    if ts > now_ms.saturating_add(skew) {
        let ahead = i128::from(ts) - i128::from(now_ms);
        return Err(FieldError::new(
            field,
            code::TIMESTAMP_IN_FUTURE,
            format!(
                "is {ahead} ms ahead of the server clock; at most {skew} ms of clock skew is allowed"
            ),
        ));
    }
    let max_age = limits.max_age_ms;
    if ts < now_ms.saturating_sub(max_age) {
        let age = i128::from(now_ms) - i128::from(ts);
        return Err(FieldError::new(
            field,
            code::TIMESTAMP_TOO_OLD,
            format!("is {age} ms old; events older than {max_age} ms are not accepted"),
        ));
    }
    let short = capped(limits.max_string_len);
    let trace_id = optional_text(metadata, "trace_id", "metadata.trace_id", short)?;
    let source = optional_text(metadata, "source", "metadata.source", short)?;
    Ok(Metadata {
        event_timestamp_ms: ts,
        trace_id,
        source,
    })
}

/// An RFC 3339 string (any offset, converted to UTC, sub-millisecond truncated) or an
/// integer number of epoch milliseconds.
fn parse_timestamp(value: &Json<'_>) -> Result<i64, String> {
    const EXPECTED: &str = "must be an RFC 3339 string such as \"2024-06-01T12:00:00Z\" \
                            or an integer number of epoch milliseconds";
    match value {
        Json::String(s) => {
            let at = OffsetDateTime::parse(s, &Rfc3339)
                .map_err(|e| format!("is not a valid RFC 3339 timestamp ({e}); {EXPECTED}"))?;
            i64::try_from(at.unix_timestamp_nanos().div_euclid(1_000_000))
                .map_err(|_| format!("is out of range; {EXPECTED}"))
        }
        Json::Number(n) => match n.as_i64() {
            Some(ms) => Ok(ms),
            None if n.is_u64() => Err(format!("is out of range; {EXPECTED}")),
            None => Err(format!("is not an integer; {EXPECTED}")),
        },
        other => Err(format!("is {}; {EXPECTED}", type_name(other))),
    }
}

/// Current ISO 4217 alphabetic codes (list one, 2025), sorted for binary search; includes
/// fund codes and the X-codes (metals, SDR, testing, "no currency").
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE", "CZK",
    "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS",
    "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD",
    "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD",
    "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT",
    "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK",
    "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD",
    "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP",
    "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS",
    "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV", "WST",
    "XAF", "XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XCD", "XCG", "XDR", "XOF", "XPD", "XPF",
    "XPT", "XSU", "XTS", "XUA", "XXX", "YER", "ZAR", "ZMW", "ZWG",
];

fn check_currency(code: &str) -> Result<(), String> {
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(
            "must be a 3-letter uppercase ISO 4217 code such as \"EUR\" or \"USD\"".to_owned(),
        );
    }
    if ISO_4217.binary_search(&code).is_err() {
        return Err(format!("{code:?} is not an active ISO 4217 currency code"));
    }
    Ok(())
}

/// The value of `name`, treating `null` as absent.
fn present<'a, 'j>(obj: &'a Object<'j>, name: &str) -> Option<&'a Json<'j>> {
    obj.get(name).filter(|v| !v.is_null())
}

fn required<'a, 'j>(
    obj: &'a Object<'j>,
    name: &str,
    path: &str,
) -> Result<&'a Json<'j>, FieldError> {
    present(obj, name).ok_or_else(|| FieldError::new(path, code::MISSING_FIELD, "is required"))
}

fn as_str<'a>(value: &'a Json<'_>, path: &str) -> Result<&'a str, FieldError> {
    value
        .as_str()
        .ok_or_else(|| wrong_type(path, "a string", value))
}

fn as_object<'a, 'j>(value: &'a Json<'j>, path: &str) -> Result<&'a Object<'j>, FieldError> {
    value
        .as_object()
        .ok_or_else(|| wrong_type(path, "an object", value))
}

fn wrong_type(path: &str, expected: &str, got: &Json<'_>) -> FieldError {
    FieldError::new(
        path,
        code::INVALID_TYPE,
        format!("must be {expected}, got {}", type_name(got)),
    )
}

/// An optional free-text string of at most `max_len` characters; absent gives "".
fn optional_text(
    obj: &Object<'_>,
    name: &str,
    path: &str,
    max_len: usize,
) -> Result<String, FieldError> {
    match present(obj, name) {
        Some(v) => {
            let s = as_str(v, path)?;
            check_text_len(s, path, max_len)?;
            Ok(s.to_owned())
        }
        None => Ok(String::new()),
    }
}

fn check_text_len(s: &str, path: &str, max_len: usize) -> Result<(), FieldError> {
    let len = s.chars().count();
    if len > max_len {
        return Err(FieldError::new(
            path,
            code::TOO_LONG,
            format!("is {len} characters; at most {max_len} are allowed"),
        ));
    }
    Ok(())
}

/// An identifier of ASCII characters from a fixed set, at most `max_len` long.
fn check_identifier(
    s: &str,
    path: &str,
    code: &'static str,
    max_len: usize,
    allow_empty: bool,
    allowed: fn(u8) -> bool,
    charset: &str,
) -> Result<(), FieldError> {
    let ok = (allow_empty || !s.is_empty()) && s.len() <= max_len && s.bytes().all(allowed);
    if ok {
        return Ok(());
    }
    let min = if allow_empty { 0 } else { 1 };
    Err(FieldError::new(
        path,
        code,
        format!("must be {min}..={max_len} characters of {charset}"),
    ))
}

fn is_event_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

fn is_user_id_char(b: u8) -> bool {
    is_event_id_char(b) || b == b'@'
}

/// Limit for session_id, trace_id and source: the configured string limit, capped at 128.
fn capped(max_string_len: usize) -> usize {
    max_string_len.min(MAX_SHORT_STRING_LEN)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((at, _)) => format!("{}…", s.get(..at).unwrap_or_default()),
        None => s.to_owned(),
    }
}

fn type_name(value: &Json<'_>) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(n) if n.is_f64() => "a fractional number",
        Json::Number(_) => "an integer",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
