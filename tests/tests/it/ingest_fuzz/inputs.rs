//! Inputs for `ingest_fuzz`: proptest strategies for credentials, Content-Type and
//! Content-Encoding headers, JSON values and events, raw and gzip bodies, protobuf events
//! and protobuf-ish bytes. Each input that the README classifies carries its class (what
//! the header means, what gzip decoding yields, which events are well-formed), so the test
//! can predict the answer; judging the answer is the test's job.

use std::io::Write;
use std::sync::LazyLock;

use proptest::prelude::*;
use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::pb::ingest::v1::SendEventsRequest;
use serde_json::{Value, json};

use pulse_platform::clock::now_ms;

use super::{MAX_BATCH, MAX_BODY, MAX_DECOMPRESSED};
use crate::support::events;

/// `s` split on `sep`: keeps long lists of literals on a few lines.
fn split(s: &'static str, sep: char) -> Vec<&'static str> {
    s.split(sep).collect()
}

// ---------------------------------------------------------------------------------------
// Credentials and headers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Bearer,
    XApiKey,
    WrongKey,
    NoKey,
}

impl Auth {
    pub fn ok(self) -> bool {
        matches!(self, Auth::Bearer | Auth::XApiKey)
    }
}

pub fn auth() -> impl Strategy<Value = Auth> {
    prop_oneof![
        6 => Just(Auth::Bearer),
        2 => Just(Auth::XApiKey),
        1 => Just(Auth::WrongKey),
        1 => Just(Auth::NoKey),
    ]
}

/// How a Content-Type or Content-Encoding value is documented to behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Json,
    Ndjson,
    Identity,
    Gzip,
    Unsupported,
    /// Not classified by the README (odd spellings, arbitrary bytes): any documented answer.
    Unknown,
}

/// A header value of visible ASCII, tabs and obs-text bytes (what HTTP allows).
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![8 => 0x20u8..=0x7e, 1 => Just(b'\t'), 1 => 0x80u8..=0xff];
    prop::collection::vec(byte, 0..40).prop_filter("no surrounding whitespace", |v| {
        let edge = |b: Option<&u8>| b.is_none_or(|b| !b" \t".contains(b));
        edge(v.first()) && edge(v.last())
    })
}

/// An arbitrary header value. One whose media type or coding (the part before any `;`
/// parameters) is not visible ASCII names none of the documented ones, so the README's 415
/// applies; any other arbitrary value is left unclassified.
fn arbitrary_header() -> impl Strategy<Value = (Option<Vec<u8>>, Class)> {
    header_bytes().prop_map(|v| {
        let name = v.split(|b| *b == b';').next().unwrap_or_default();
        let class = if name.iter().any(|b| *b >= 0x80) {
            Class::Unsupported
        } else {
            Class::Unknown
        };
        (Some(v), class)
    })
}

/// A documented value with an obs-text byte added: 415, never read as the value itself.
fn near_miss(values: &'static str) -> impl Strategy<Value = (Option<Vec<u8>>, Class)> {
    (
        prop::sample::select(split(values, '|')),
        0x80u8..=0xff,
        any::<bool>(),
    )
        .prop_map(|(v, b, front)| {
            let v = if front {
                [&[b], v.as_bytes()].concat()
            } else {
                [v.as_bytes(), &[b]].concat()
            };
            (Some(v), Class::Unsupported)
        })
}

/// `|`-separated header values of one class.
fn known(values: &'static str, class: Class) -> impl Strategy<Value = (Option<Vec<u8>>, Class)> {
    prop::sample::select(split(values, '|')).prop_map(move |v| (Some(v.as_bytes().to_vec()), class))
}

pub fn content_type() -> impl Strategy<Value = (Option<Vec<u8>>, Class)> {
    prop_oneof![
        3 => Just((None, Class::Json)),
        3 => known("application/json|application/json; charset=utf-8|Application/JSON", Class::Json),
        2 => known("application/x-ndjson|application/x-ndjson; charset=utf-8", Class::Ndjson),
        2 => known(
            "text/csv|text/plain|application/xml|application/octet-stream|application/grpc|\
             multipart/form-data; boundary=x|application/x-www-form-urlencoded",
            Class::Unsupported
        ),
        1 => known("|text/json|application/jsonl|application/ndjson", Class::Unknown),
        1 => near_miss("application/json|application/x-ndjson"),
        1 => arbitrary_header(),
    ]
}

pub fn content_encoding() -> impl Strategy<Value = (Option<Vec<u8>>, Class)> {
    prop_oneof![
        3 => Just((None, Class::Identity)),
        1 => known("identity|IDENTITY", Class::Identity),
        4 => known("gzip|x-gzip|GZIP", Class::Gzip),
        2 => known("br|deflate|compress|zstd|gzip, identity|gzip, gzip", Class::Unsupported),
        1 => known("", Class::Unknown),
        1 => near_miss("gzip|identity"),
        1 => arbitrary_header(),
    ]
}

// ---------------------------------------------------------------------------------------
// JSON values and events

/// Strings with the awkward cases: NUL, escapes, a BOM, an RTL override, emoji, combining
/// marks, the highest code point, long ones.
pub fn text() -> impl Strategy<Value = String> + Clone {
    let special = split(
        "|\0|a\0b|\u{feff}|\u{202e}evil|😀|e\u{301}|\u{10ffff}|\u{fffd}|\\|\"|\n|\r\n|page_view|\
         EUR|19.99|-1|1e400|2024-06-01T12:00:00Z|9999-12-31T23:59:59Z|u1|a@b.example",
        '|',
    );
    prop_oneof![
        4 => any::<String>(),
        3 => prop::sample::select(special).prop_map(str::to_owned),
        1 => (0usize..3000).prop_map(|n| "x".repeat(n)),
    ]
}

/// Numbers at every edge serde_json can hold (the ones it cannot are in `json_ish`).
fn number() -> impl Strategy<Value = Value> {
    let edges = vec![
        json!(0),
        json!(-0.0),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(f64::MAX),
        json!(f64::MIN_POSITIVE),
        json!(1e-300),
        json!(9_007_199_254_740_993u64),
        json!(19.999_999_9),
    ];
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop::sample::select(edges),
    ]
}

/// Arbitrary JSON: nested arrays and objects whose keys are often the contract's own.
pub fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    let names = split(
        "event_id schema_version event_type key user_id session_id payload page referrer \
         currency amount properties metadata event_timestamp trace_id source ingest",
        ' ',
    );
    let key = prop_oneof![prop::sample::select(names).prop_map(str::to_owned), text()];
    leaf.prop_recursive(6, 96, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A well-formed event per the README's validation table.
pub fn valid_json(id: &str, user: &str) -> Value {
    events::event(id, user, now_ms()).page("/fuzz").json()
}

/// Well-formed events with varied ids, free text (unicode, NUL, emoji), properties, amounts
/// and both timestamp forms.
pub fn valid_event() -> impl Strategy<Value = Value> + Clone {
    let ids = (
        prop::option::of(any::<u64>()),
        prop::sample::select(split("page_view purchase click a x_1", ' ')),
        "[A-Za-z0-9._:@-]{1,40}",
        prop::option::of("[A-Za-z0-9._:@-]{0,40}"),
    );
    let payload = (
        prop::option::of(".{0,64}"),
        prop::collection::btree_map("[A-Za-z0-9_.-]{1,20}", ".{0,40}", 0..5),
        prop::option::of((
            0u64..10_000_000,
            0u32..1_000_000,
            prop::sample::select(split("EUR USD JPY", ' ')),
        )),
    );
    (ids, payload, 0i64..3_600_000, any::<bool>()).prop_map(
        |((id, ty, user, session), (page, props, amount), age, rfc3339)| {
            let ts = now_ms() - age;
            let mut e = json!({
                "schema_version": 1,
                "event_type": ty,
                "key": { "user_id": user },
                "payload": { "properties": props },
                "metadata": { "event_timestamp": ts, "source": "fuzz" }
            });
            if let Some(id) = id {
                e["event_id"] = json!(format!("fz-{id:016x}"));
            }
            if let Some(s) = session {
                e["key"]["session_id"] = json!(s);
            }
            if let Some(p) = page {
                e["payload"]["page"] = json!(p);
            }
            if let Some((units, micros, currency)) = amount {
                e["payload"]["amount"] = json!(format!("{units}.{micros:06}"));
                e["payload"]["currency"] = json!(currency);
            }
            if rfc3339 {
                let nanos = i128::from(ts) * 1_000_000;
                let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
                let rfc = time::format_description::well_known::Rfc3339;
                e["metadata"]["event_timestamp"] = json!(t.format(&rfc).unwrap());
            }
            e
        },
    )
}

/// Every field of the contract, plus two outside it.
fn pointers() -> Vec<&'static str> {
    split(
        "/event_id /schema_version /event_type /key /key/user_id /key/session_id /payload \
         /payload/page /payload/referrer /payload/currency /payload/amount /payload/properties \
         /payload/properties/plan /metadata /metadata/event_timestamp /metadata/trace_id \
         /metadata/source /ingest /extra",
        ' ',
    )
}

/// Puts `value` at `pointer` when its parent is an object, or removes the entry.
fn set(mut event: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, name) = pointer.rsplit_once('/').unwrap();
    if let Some(Value::Object(obj)) = event.pointer_mut(parent) {
        match value {
            Some(v) => obj.insert(name.to_owned(), v),
            None => obj.remove(name),
        };
    }
    event
}

/// One candidate event and whether it is well-formed by construction.
pub fn candidate() -> impl Strategy<Value = (Value, bool)> {
    let field = || prop::sample::select(pointers());
    prop_oneof![
        3 => valid_event().prop_map(|e| (e, true)),
        3 => (valid_event(), field(), any_json()).prop_map(|(e, p, v)| (set(e, p, Some(v)), false)),
        1 => (valid_event(), field()).prop_map(|(e, p)| (set(e, p, None), false)),
        2 => any_json().prop_map(|v| (v, false)),
    ]
}

// ---------------------------------------------------------------------------------------
// Raw bodies: bytes, JSON-ish text, gzip

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// JSON-ish text: structure tokens, numbers out of every range, bad escapes and lone
/// surrogates, comments, raw NUL and invalid UTF-8, whole events; deep nesting; and a
/// well-formed event with one field's value replaced by raw text serde_json cannot hold.
pub fn json_ish() -> impl Strategy<Value = Vec<u8>> {
    let tokens: Vec<&[u8]> = b"{|}|[|]|:|,| |\n|\r\n|\"event_id\"|\"a\"|1e400|-1e400|-0|1.|01|NaN|\
        123456789012345678901234567890|0.1e-400|Infinity|null|true|\"\\u0000\"|\"\\ud800\"|\
        \"\\uDFFF\\uD800\"|\"\\x41\"|\0|\xff\xfe|\xc3\x28|\"\xe2\x82\"|/* c */|\x0c"
        .split(|b| *b == b'|')
        .collect();
    let token = prop::sample::select(tokens).prop_map(<[u8]>::to_vec);
    let event = Just(serde_json::to_vec(&valid_json("fz-json-ish", "u1")).unwrap());
    let raw_values = split(
        "1e400|123456789012345678901234567890|-0|\"\\u0000\"|\"\\ud800\"|[[[[[]]]]]",
        '|',
    );
    prop_oneof![
        4 => prop::collection::vec(prop_oneof![8 => token, 1 => event], 0..48)
            .prop_map(|parts| parts.concat()),
        1 => (1usize..400, any::<bool>()).prop_map(|(depth, array)| {
            let (open, close) = if array { ("[", "]") } else { ("{\"a\":", "}") };
            format!("{}1{}", open.repeat(depth), close.repeat(depth)).into_bytes()
        }),
        1 => (prop::sample::select(pointers()), prop::sample::select(raw_values)).prop_map(
            |(pointer, raw)| {
                let marked = set(valid_json("fz-raw", "u1"), pointer, Some(json!("@@RAW@@")));
                marked.to_string().replace("\"@@RAW@@\"", raw).into_bytes()
            }
        ),
    ]
}

/// What gzip decoding of a body yields, as the test built it.
#[derive(Debug, Clone)]
pub enum Gunzip {
    /// Valid gzip (one or more members) of these bytes.
    Ok(Vec<u8>),
    /// Not gzip, or a truncated stream.
    Broken,
    /// An empty body.
    Empty,
}

/// Bytes that do not start a gzip member (so "gzip" of them is surely broken).
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..600).prop_filter("not gzip magic", |v| v[0] != 0x1f)
}

/// More than `MAX_DECOMPRESSED` bytes that compress to almost nothing.
static BOMB: LazyLock<Vec<u8>> = LazyLock::new(|| vec![b' '; MAX_DECOMPRESSED + 1]);

/// One JSON text per line.
pub fn ndjson(events: &[Value]) -> String {
    events
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A body for any Content-Encoding, and what gzip decoding makes of it: plain JSON and
/// NDJSON, empty, garbage, gzip of events or garbage, concatenated members, gzip cut short,
/// double gzip, a bomb, and a body over the wire limit.
pub fn payload() -> impl Strategy<Value = (Vec<u8>, Gunzip)> {
    let events = || prop::collection::vec(valid_event(), 1..4);
    let json = |e: &Vec<Value>| serde_json::to_vec(e).unwrap();
    prop_oneof![
        2 => events().prop_map(move |e| (json(&e), Gunzip::Broken)),
        1 => events().prop_map(|e| (ndjson(&e).into_bytes(), Gunzip::Broken)),
        1 => Just((Vec::new(), Gunzip::Empty)),
        2 => garbage().prop_map(|g| (g, Gunzip::Broken)),
        3 => events().prop_map(move |e| (gzip(&json(&e)), Gunzip::Ok(json(&e)))),
        1 => (events(), events()).prop_map(|(a, b)| {
            // Two gzip members, decoded as one stream.
            let (a, b) = (format!("{}\n", ndjson(&a)), ndjson(&b));
            let body = [gzip(a.as_bytes()), gzip(b.as_bytes())].concat();
            (body, Gunzip::Ok(format!("{a}{b}").into_bytes()))
        }),
        2 => garbage().prop_map(|g| (gzip(&g), Gunzip::Ok(g))),
        2 => (events(), any::<prop::sample::Index>()).prop_map(move |(e, cut)| {
            let full = gzip(&json(&e));
            let body = full[..cut.index(full.len())].to_vec();
            let gunzip = if body.is_empty() { Gunzip::Empty } else { Gunzip::Broken };
            (body, gunzip)
        }),
        1 => events().prop_map(move |e| (gzip(&gzip(&json(&e))), Gunzip::Ok(gzip(&json(&e))))),
        1 => Just((gzip(&BOMB), Gunzip::Ok(BOMB.clone()))),
        1 => (MAX_BODY + 1..MAX_BODY + 4096).prop_map(|n| (vec![b' '; n], Gunzip::Broken)),
    ]
}

// ---------------------------------------------------------------------------------------
// gRPC: protobuf events and bytes

/// A well-formed protobuf event.
pub fn valid_pb(id: &str, user: &str) -> ev::Event {
    events::event(id, user, now_ms()).page("/fuzz").build()
}

fn pb_text() -> impl Strategy<Value = String> + Clone {
    prop_oneof![3 => text(), 1 => "[a-z_]{1,12}"]
}

/// Arbitrary protobuf events: any field values, absent or present sub-messages, and an
/// `ingest` block set by the client.
fn any_pb_event() -> impl Strategy<Value = ev::Event> + Clone {
    let key = (pb_text(), pb_text()).prop_map(|(user_id, session_id)| ev::EventKey {
        user_id,
        session_id,
    });
    let payload = (
        (pb_text(), pb_text(), pb_text()),
        prop::option::of(any::<i64>()),
        prop::collection::hash_map(pb_text(), pb_text(), 0..4),
    )
        .prop_map(
            |((page, referrer, currency), amount_micros, properties)| ev::Payload {
                page,
                referrer,
                currency,
                amount_micros,
                properties,
            },
        );
    let recent = (0i64..3_600_000).prop_map(|age| now_ms() - age);
    let metadata = (
        prop_oneof![1 => any::<i64>(), 2 => recent],
        pb_text(),
        pb_text(),
    )
        .prop_map(|(event_timestamp_ms, trace_id, source)| ev::Metadata {
            event_timestamp_ms,
            trace_id,
            source,
        });
    let ingest = (any::<i64>(), pb_text(), pb_text()).prop_map(
        |(ingest_timestamp_ms, ingest_source, protocol)| ev::IngestInfo {
            ingest_timestamp_ms,
            ingest_source,
            protocol,
        },
    );
    let version = prop_oneof![3 => Just(1u32), 1 => any::<u32>()];
    (
        (pb_text(), version, pb_text()),
        prop::option::of(key),
        prop::option::of(payload),
        prop::option::of(metadata),
        prop::option::of(ingest),
    )
        .prop_map(
            |((event_id, schema_version, event_type), key, payload, metadata, ingest)| ev::Event {
                event_id,
                schema_version,
                event_type,
                key,
                payload,
                metadata,
                ingest,
            },
        )
}

/// A batch of events (sometimes empty or over the limit) and the indexes of the
/// well-formed ones.
pub fn pb_batch() -> impl Strategy<Value = (Vec<ev::Event>, Vec<usize>)> + Clone {
    let one = prop_oneof![
        2 => (any::<u64>(), "[A-Za-z0-9._:@-]{1,40}")
            .prop_map(|(id, user)| (valid_pb(&format!("fz-{id:016x}"), &user), true)),
        3 => any_pb_event().prop_map(|e| (e, false)),
    ];
    prop_oneof![
        8 => prop::collection::vec(one.clone(), 1..=MAX_BATCH),
        1 => Just(Vec::new()),
        1 => prop::collection::vec(one, MAX_BATCH + 1..MAX_BATCH + 4),
    ]
    .prop_map(|events| {
        let valid = (0..events.len()).filter(|i| events[*i].1).collect();
        (events.into_iter().map(|(e, _)| e).collect(), valid)
    })
}

/// Message bytes: a real request's encoding, as is, with bytes overwritten, cut short or
/// with garbage appended; or arbitrary bytes.
pub fn protobuf_ish() -> impl Strategy<Value = Vec<u8>> {
    let encoded =
        || pb_batch().prop_map(|(events, _)| SendEventsRequest { events }.encode_to_vec());
    let flips = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4);
    prop_oneof![
        2 => encoded(),
        2 => (encoded(), flips).prop_map(|(mut bytes, flips)| {
            for (at, b) in flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = b;
                }
            }
            bytes
        }),
        1 => (encoded(), any::<prop::sample::Index>())
            .prop_map(|(bytes, cut)| bytes[..cut.index(bytes.len() + 1)].to_vec()),
        1 => (encoded(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(bytes, tail)| [bytes, tail].concat()),
        2 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}
