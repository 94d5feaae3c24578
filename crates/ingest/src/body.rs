//! HTTP request bodies: gzip decoding under a hard size limit (a gzip bomb is refused,
//! never inflated into memory) and splitting a body into events — one JSON object, a
//! JSON array of objects, or NDJSON — keeping each event's original bytes for the DLQ.
//! Validation of each event is `validate`'s job.

use std::borrow::Cow;
use std::io::Read;

use serde_json::value::RawValue;

/// Body size limits.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Bytes on the wire (compressed or not).
    pub max_body_bytes: usize,
    /// Bytes after gzip decoding.
    pub max_decompressed_bytes: usize,
    /// Events in one request.
    pub max_batch_events: usize,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_decompressed_bytes: 8 * 1024 * 1024,
            max_batch_events: 1000,
        }
    }
}

/// How the events are laid out in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON object or a JSON array of objects (`application/json`).
    Json,
    /// One JSON object per line (`application/x-ndjson`).
    Ndjson,
}

/// Why a whole body was refused.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("body inflates to more than {limit} bytes (gzip)")]
    DecompressedTooLarge { limit: usize },
    #[error("body is not valid gzip: {0}")]
    BadGzip(#[source] std::io::Error),
    #[error("unsupported Content-Encoding {0:?}; use gzip or none")]
    UnsupportedEncoding(String),
    #[error("unsupported Content-Type {0:?}; use application/json or application/x-ndjson")]
    UnsupportedContentType(String),
    #[error("body is empty")]
    Empty,
    #[error("body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("batch has more than {limit} events (the limit)")]
    TooManyEvents { limit: usize },
}

impl BodyError {
    /// Stable code for metrics and the DLQ header.
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::TooLarge { .. } | BodyError::DecompressedTooLarge { .. } => "body_too_large",
            BodyError::BadGzip(_) => "bad_gzip",
            BodyError::UnsupportedEncoding(_) => "unsupported_encoding",
            BodyError::UnsupportedContentType(_) => "unsupported_content_type",
            BodyError::Empty => "empty_body",
            BodyError::NotJson(_) => "unparseable_body",
            BodyError::TooManyEvents { .. } => "batch_too_large",
        }
    }
}

/// The body format for a `Content-Type` header value (absent means JSON).
pub fn format_for(content_type: Option<&str>) -> Result<BodyFormat, BodyError> {
    let Some(ct) = content_type else {
        return Ok(BodyFormat::Json);
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "" | "application/json" | "text/json" => Ok(BodyFormat::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines" => Ok(BodyFormat::Ndjson),
        _ => Err(BodyError::UnsupportedContentType(ct.to_owned())),
    }
}

/// Decodes the body per `Content-Encoding`, enforcing both size limits; a body without
/// an encoding is borrowed, not copied.
pub fn decode<'a>(
    body: &'a [u8],
    content_encoding: Option<&str>,
    limits: &BodyLimits,
) -> Result<Cow<'a, [u8]>, BodyError> {
    if body.len() > limits.max_body_bytes {
        return Err(BodyError::TooLarge {
            limit: limits.max_body_bytes,
        });
    }
    let encoding = content_encoding.map(|e| e.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("") | Some("identity") => Ok(Cow::Borrowed(body)),
        Some("gzip") | Some("x-gzip") => {
            inflate(body, limits.max_decompressed_bytes).map(Cow::Owned)
        }
        Some(other) => Err(BodyError::UnsupportedEncoding(other.to_owned())),
    }
}

/// Inflates a gzip body of at most `limit` bytes decoded, holding at most one buffer of
/// about the decoded size. The buffer starts at the size the gzip trailer announces
/// (ISIZE: the last member's size modulo 2^32 — a hint, never trusted: it only sets the
/// first capacity, capped at the limit), and grows by doubling capped at the limit, so
/// neither an honest body nor one that lies in its trailer makes a buffer above the
/// limit; `read_to_end`'s own growth would end at twice the limit, with the previous
/// buffer still held while it copies (#15 defect 6: three requests inflating to just
/// under 8 MiB raised ingest's peak RSS by 32 MiB that way).
fn inflate(body: &[u8], limit: usize) -> Result<Vec<u8>, BodyError> {
    let hint = body
        .len()
        .checked_sub(4)
        .and_then(|at| body.get(at..))
        .and_then(|trailer| <[u8; 4]>::try_from(trailer).ok())
        .map_or(0, |isize| u32::from_le_bytes(isize) as usize);
    let first = if hint > 0 {
        hint.min(limit)
    } else {
        body.len().saturating_mul(4).min(limit)
    };
    let mut out = Vec::with_capacity(first);
    let mut reader = flate2::read::MultiGzDecoder::new(body);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BodyError::BadGzip(e)),
        };
        let len = out.len() + n;
        if len > limit {
            // One byte more than allowed proves the bomb; nothing past it is inflated.
            return Err(BodyError::DecompressedTooLarge { limit });
        }
        if len > out.capacity() {
            let grown = out.capacity().saturating_mul(2).clamp(len, limit);
            out.reserve_exact(grown - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Splits a decoded body into the original bytes of each event.
///
/// Memory stays bounded by the body: the event limit is checked while splitting, so a
/// body of millions of tiny elements (`[0,0,0,…]`) is refused after `max_batch_events + 1`
/// of them, and each event's bytes are copied only once the whole body has passed.
pub fn split(
    body: &[u8],
    format: BodyFormat,
    limits: &BodyLimits,
) -> Result<Vec<Vec<u8>>, BodyError> {
    let limit = limits.max_batch_events;
    let too_many = || BodyError::TooManyEvents { limit };
    let events: Vec<&[u8]> = match format {
        BodyFormat::Ndjson => {
            let mut out = Vec::new();
            for line in body.split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !line.iter().any(|b| !b.is_ascii_whitespace()) {
                    continue;
                }
                if out.len() == limit {
                    return Err(too_many());
                }
                out.push(line);
            }
            out
        }
        BodyFormat::Json => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            match first {
                None => return Err(BodyError::Empty),
                Some(b'[') => {
                    let mut de = serde_json::Deserializer::from_slice(body);
                    let items =
                        serde::Deserializer::deserialize_seq(&mut de, BoundedArray { limit })
                            .and_then(|items| de.end().map(|()| items))
                            .map_err(|e| {
                                if e.to_string().starts_with(TOO_MANY) {
                                    too_many()
                                } else {
                                    BodyError::NotJson(e)
                                }
                            })?;
                    items.into_iter().map(|r| r.get().as_bytes()).collect()
                }
                Some(_) => {
                    // One event: must at least be JSON; its shape is validated per event.
                    serde_json::from_slice::<&RawValue>(body).map_err(BodyError::NotJson)?;
                    vec![body]
                }
            }
        }
    };
    if events.is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(events.into_iter().map(<[u8]>::to_vec).collect())
}

/// The error text a [`BoundedArray`] stops with (told apart from JSON errors by it).
const TOO_MANY: &str = "pulse: too many events";

/// Deserializes a JSON array into its elements' raw text, failing as soon as it holds
/// more than `limit` elements.
struct BoundedArray {
    limit: usize,
}

impl<'de> serde::de::Visitor<'de> for BoundedArray {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a JSON array of at most {} events", self.limit)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(self.limit.min(1024));
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            if out.len() == self.limit {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            out.push(item);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_json_array_keeps_each_events_original_bytes() {
        let body = br#"[{"a": 1}, {"b":[2, 3]} ,"x"]"#;
        let events = split(body, BodyFormat::Json, &BodyLimits::default()).unwrap();
        assert_eq!(
            events,
            vec![
                br#"{"a": 1}"#.to_vec(),
                br#"{"b":[2, 3]}"#.to_vec(),
                br#""x""#.to_vec()
            ]
        );
    }

    #[test]
    fn ndjson_splits_lines_and_skips_blank_ones() {
        let body = b"{\"a\":1}\r\n\n  \n{not json}\n{\"c\":3}";
        let events = split(body, BodyFormat::Ndjson, &BodyLimits::default()).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1], b"{not json}");
    }

    #[test]
    fn an_unparseable_json_body_is_refused_with_the_reason() {
        let err = split(b"[{\"a\":1}, ", BodyFormat::Json, &BodyLimits::default()).unwrap_err();
        assert_eq!(err.code(), "unparseable_body");
        assert!(err.to_string().contains("EOF"), "{err}");
        assert!(matches!(
            split(b"  ", BodyFormat::Json, &BodyLimits::default()),
            Err(BodyError::Empty)
        ));
        assert!(matches!(
            split(b"[]", BodyFormat::Json, &BodyLimits::default()),
            Err(BodyError::Empty)
        ));
    }

    #[test]
    fn too_many_events_are_refused() {
        let limits = BodyLimits {
            max_batch_events: 2,
            ..BodyLimits::default()
        };
        let err = split(b"[1,2,3]", BodyFormat::Json, &limits).unwrap_err();
        assert!(
            matches!(err, BodyError::TooManyEvents { limit: 2 }),
            "{err:?}"
        );
        let err = split(b"1\n2\n\n3\n", BodyFormat::Ndjson, &limits).unwrap_err();
        assert!(
            matches!(err, BodyError::TooManyEvents { limit: 2 }),
            "{err:?}"
        );
        // At the limit: accepted, blank NDJSON lines not counted.
        assert_eq!(split(b"[1,2]", BodyFormat::Json, &limits).unwrap().len(), 2);
        assert_eq!(
            split(b"1\n\n2\n", BodyFormat::Ndjson, &limits)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_huge_array_of_tiny_elements_stops_at_the_limit_not_at_the_end() {
        // 8 MiB of `0,`: the limit is reached after 1001 elements, so the malformed tail
        // (which a full parse would report as NotJson) is never read.
        let mut body = b"[".to_vec();
        body.extend(std::iter::repeat_n(b"0,".as_slice(), 4 * 1024 * 1024).flatten());
        body.extend_from_slice(b"oops");
        let err = split(&body, BodyFormat::Json, &BodyLimits::default()).unwrap_err();
        assert!(
            matches!(err, BodyError::TooManyEvents { limit: 1000 }),
            "{err:?}"
        );
    }

    #[test]
    fn json_errors_in_an_array_stay_json_errors() {
        let err = split(b"[1,2", BodyFormat::Json, &BodyLimits::default()).unwrap_err();
        assert!(matches!(err, BodyError::NotJson(_)), "{err:?}");
        let err = split(b"[1] x", BodyFormat::Json, &BodyLimits::default()).unwrap_err();
        assert!(matches!(err, BodyError::NotJson(_)), "{err:?}");
    }

    #[test]
    fn gzip_bodies_are_decoded() {
        let data = br#"{"hello":"world"}"#;
        let zipped = gzip(data);
        let decoded = decode(&zipped, Some("gzip"), &BodyLimits::default()).unwrap();
        assert_eq!(&*decoded, data);
        let plain = decode(data, None, &BodyLimits::default()).unwrap();
        assert!(matches!(plain, Cow::Borrowed(b) if b == data));
    }

    #[test]
    fn inflating_holds_one_buffer_never_above_the_limit() {
        let limits = BodyLimits {
            max_decompressed_bytes: 3 * 1024 * 1024,
            ..BodyLimits::default()
        };
        let limit = limits.max_decompressed_bytes;
        let data: Vec<u8> = (0..limit).map(|i| (i % 251) as u8).collect();
        // One member at exactly the limit: its trailer sizes the buffer, which never grows
        // (read_to_end's doubling ended at twice the limit).
        let one = gzip(&data);
        let decoded = decode(&one, Some("gzip"), &limits).unwrap();
        assert_eq!(&*decoded, &data[..]);
        assert!(matches!(&decoded, Cow::Owned(v) if v.capacity() == limit));
        // Two members, the last one tiny: the trailer's size is no guide, the buffer grows
        // by doubling, still capped at the limit.
        let mut two = gzip(&data[..limit - 10]);
        two.extend(gzip(&data[limit - 10..]));
        let decoded = decode(&two, Some("gzip"), &limits).unwrap();
        assert_eq!(&*decoded, &data[..]);
        assert!(matches!(&decoded, Cow::Owned(v) if v.capacity() <= limit));
        // One byte more than the limit is refused.
        let mut over = data.clone();
        over.push(0);
        let err = decode(&gzip(&over), Some("gzip"), &limits).unwrap_err();
        assert!(
            matches!(err, BodyError::DecompressedTooLarge { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_gzip_bomb_is_refused_without_inflating_it() {
        // 64 MiB of zeros compresses to ~64 KiB.
        let bomb = gzip(&vec![0u8; 64 * 1024 * 1024]);
        let limits = BodyLimits::default();
        assert!(bomb.len() < limits.max_body_bytes);
        let err = decode(&bomb, Some("gzip"), &limits).unwrap_err();
        assert!(
            matches!(err, BodyError::DecompressedTooLarge { limit } if limit == limits.max_decompressed_bytes),
            "{err:?}"
        );
    }

    #[test]
    fn oversized_and_malformed_bodies_are_refused() {
        let limits = BodyLimits {
            max_body_bytes: 4,
            ..BodyLimits::default()
        };
        assert!(matches!(
            decode(b"12345", None, &limits),
            Err(BodyError::TooLarge { limit: 4 })
        ));
        assert!(matches!(
            decode(b"not gzip", Some("gzip"), &BodyLimits::default()),
            Err(BodyError::BadGzip(_))
        ));
        assert!(matches!(
            decode(b"x", Some("br"), &BodyLimits::default()),
            Err(BodyError::UnsupportedEncoding(_))
        ));
    }

    #[test]
    fn content_types_select_the_format() {
        assert_eq!(format_for(None).unwrap(), BodyFormat::Json);
        assert_eq!(
            format_for(Some("application/json; charset=utf-8")).unwrap(),
            BodyFormat::Json
        );
        assert_eq!(
            format_for(Some("application/x-ndjson")).unwrap(),
            BodyFormat::Ndjson
        );
        assert!(matches!(
            format_for(Some("text/csv")),
            Err(BodyError::UnsupportedContentType(_))
        ));
    }

    proptest::proptest! {
        /// Arbitrary bytes through every decode and split path: never a panic, and every
        /// refusal carries a code and a reason.
        #[test]
        fn arbitrary_bodies_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            gz in proptest::prelude::any::<bool>(),
            ndjson in proptest::prelude::any::<bool>(),
        ) {
            let limits = BodyLimits { max_body_bytes: 4096, max_decompressed_bytes: 8192, max_batch_events: 50 };
            let encoding = if gz { Some("gzip") } else { None };
            let format = if ndjson { BodyFormat::Ndjson } else { BodyFormat::Json };
            match decode(&bytes, encoding, &limits).and_then(|d| split(&d, format, &limits)) {
                Ok(events) => {
                    proptest::prop_assert!(!events.is_empty() && events.len() <= 50);
                    for e in events {
                        // Whatever the body held, each event is then judged by validate.
                        let r = crate::validate::validate(&e, 1_764_000_000_000, &crate::validate::Limits::default());
                        if let Err(err) = r {
                            proptest::prop_assert!(!err.reason.is_empty() && !err.code.is_empty());
                        }
                    }
                }
                Err(e) => {
                    proptest::prop_assert!(!e.code().is_empty() && !e.to_string().is_empty());
                }
            }
        }
    }
}
