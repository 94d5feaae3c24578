//! The Confluent wire format of Kafka record values: magic byte 0, a big-endian 4-byte
//! schema id, the protobuf message indexes (zig-zag varints; `[0]` shortened to one zero
//! byte), then the protobuf bytes.
//!
//! [`RegistryEncoder`] frames through `schema_registry_converter`, which looks the schema
//! id up in the registry (topic-name strategy). [`frame`]/[`unframe`] are the same
//! framing without a registry, for decoding and for tests; a unit test proves both agree.

use schema_registry_converter::async_impl::proto_raw::ProtoRawEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{SubjectNameStrategy, get_payload};

/// Magic byte that starts every Confluent-framed value.
pub const MAGIC_BYTE: u8 = 0;

/// Why a record value could not be framed or unframed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error(
        "value has {0} bytes; the Confluent wire format needs at least 6 (magic byte, schema id, message index)"
    )]
    TooShort(usize),
    #[error("value starts with byte {0:#04x}, expected magic byte 0x00: not Confluent wire format")]
    BadMagic(u8),
    #[error("message index is malformed: {0}")]
    BadIndex(&'static str),
    #[error("schema registry lookup failed (retryable: {retryable}): {message}")]
    Registry { message: String, retryable: bool },
}

impl WireError {
    /// Whether retrying the same call can succeed (only registry outages can).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            WireError::Registry {
                retryable: true,
                ..
            }
        )
    }
}

/// A decoded frame, borrowing the protobuf payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Framed<'a> {
    pub schema_id: u32,
    pub message_indexes: Vec<i32>,
    pub payload: &'a [u8],
}

fn put_zigzag_varint(out: &mut Vec<u8>, value: i32) {
    let mut v = ((value << 1) ^ (value >> 31)) as u32;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_zigzag_varint(bytes: &[u8], pos: &mut usize) -> Result<i32, WireError> {
    let mut result: u32 = 0;
    for shift in (0..35).step_by(7) {
        let byte = *bytes
            .get(*pos)
            .ok_or(WireError::BadIndex("varint runs past the end of the value"))?;
        *pos += 1;
        result |= u32::from(byte & 0x7f)
            .checked_shl(shift)
            .ok_or(WireError::BadIndex("varint too long"))?;
        if byte & 0x80 == 0 {
            return Ok(((result >> 1) as i32) ^ -((result & 1) as i32));
        }
    }
    Err(WireError::BadIndex("varint longer than 5 bytes"))
}

/// The message-index bytes for `indexes` (path of the message in its .proto file).
pub fn index_bytes(indexes: &[i32]) -> Vec<u8> {
    if indexes == [0] {
        return vec![0];
    }
    let mut out = Vec::with_capacity(1 + indexes.len());
    put_zigzag_varint(&mut out, indexes.len() as i32);
    for &i in indexes {
        put_zigzag_varint(&mut out, i);
    }
    out
}

/// Frames protobuf `payload` with `schema_id` and the message's `indexes`.
pub fn frame(schema_id: u32, indexes: &[i32], payload: &[u8]) -> Vec<u8> {
    let mut body = index_bytes(indexes);
    body.extend_from_slice(payload);
    get_payload(schema_id, body)
}

/// Splits a framed value into schema id, message indexes and protobuf payload.
/// Never panics, whatever the input.
pub fn unframe(bytes: &[u8]) -> Result<Framed<'_>, WireError> {
    if bytes.len() < 6 {
        return Err(WireError::TooShort(bytes.len()));
    }
    if bytes[0] != MAGIC_BYTE {
        return Err(WireError::BadMagic(bytes[0]));
    }
    let schema_id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let mut pos = 5;
    let message_indexes = if bytes[pos] == 0 {
        pos += 1;
        vec![0]
    } else {
        let count = read_zigzag_varint(bytes, &mut pos)?;
        if !(1..=64).contains(&count) {
            return Err(WireError::BadIndex("index count outside 1..=64"));
        }
        let mut idx = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let i = read_zigzag_varint(bytes, &mut pos)?;
            if i < 0 {
                return Err(WireError::BadIndex("negative message index"));
            }
            idx.push(i);
        }
        idx
    };
    Ok(Framed {
        schema_id,
        message_indexes,
        payload: &bytes[pos..],
    })
}

/// Frames values with the schema id that the registry holds for `<topic>-value`.
/// Lookups are cached by `schema_registry_converter`; failed lookups are retried on the
/// next call.
#[derive(Debug)]
pub struct RegistryEncoder {
    inner: ProtoRawEncoder,
}

/// How a [`RegistryEncoder`] reaches the registry.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistryClientOptions<'a> {
    /// `(username, password)` sent as HTTP basic credentials with every registry call, as
    /// Confluent's clients do; `None`: no credentials.
    pub credentials: Option<(&'a str, &'a str)>,
    /// PEM CA certificates (one or more) trusted for an `https://` registry in addition to
    /// the system's roots (`--schema-registry-ca-file`); `None`: the system's roots only.
    pub ca_pem: Option<&'a [u8]>,
}

impl RegistryEncoder {
    /// An encoder against the registry at `url` (e.g. `http://127.0.0.1:8081`), without
    /// credentials.
    pub fn new(url: &str) -> Self {
        Self {
            inner: ProtoRawEncoder::new(SrSettings::new(url.to_owned())),
        }
    }

    /// An encoder that sends HTTP basic credentials (`username`, `password`) with every
    /// registry call, as Confluent's clients do.
    pub fn with_basic_auth(url: &str, username: &str, password: &str) -> Result<Self, WireError> {
        Self::with_options(
            url,
            RegistryClientOptions {
                credentials: Some((username, password)),
                ca_pem: None,
            },
        )
    }

    /// [`RegistryEncoder::with_basic_auth`] with `credentials` (`(username, password)`),
    /// else [`RegistryEncoder::new`].
    pub fn with_credentials(
        url: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, WireError> {
        Self::with_options(
            url,
            RegistryClientOptions {
                credentials,
                ca_pem: None,
            },
        )
    }

    /// An encoder whose HTTP client sends `options.credentials` and trusts
    /// `options.ca_pem`. A CA bundle that holds no usable certificate is an error here,
    /// not at the first call.
    pub fn with_options(url: &str, options: RegistryClientOptions<'_>) -> Result<Self, WireError> {
        let building = |message: String| WireError::Registry {
            message: format!("building the registry client: {message}"),
            retryable: false,
        };
        let mut builder = SrSettings::new_builder(url.to_owned());
        if let Some((username, password)) = options.credentials {
            builder.set_basic_authorization(username, Some(password));
        }
        let client = match options.ca_pem {
            None => reqwest_registry::Client::builder(),
            Some(pem) => {
                let certs = reqwest_registry::Certificate::from_pem_bundle(pem)
                    .map_err(|e| building(format!("the CA certificates: {}", chain(&e))))?;
                if certs.is_empty() {
                    return Err(building("the CA file holds no PEM certificate".into()));
                }
                reqwest_registry::Client::builder().tls_certs_merge(certs)
            }
        };
        let settings = builder
            .build_with(client)
            .map_err(|e| building(describe(&e)))?;
        Ok(Self {
            inner: ProtoRawEncoder::new(settings),
        })
    }

    /// Frames `payload`, a prost-encoded message named `full_name`
    /// (e.g. `pulse.events.v1.Event`), for `topic`.
    pub async fn encode(
        &self,
        topic: &str,
        full_name: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, WireError> {
        let strategy = SubjectNameStrategy::TopicNameStrategy(topic.to_owned(), false);
        self.inner
            .encode(payload, full_name, strategy)
            .await
            .map_err(|e| {
                self.inner.remove_errors_from_cache();
                WireError::Registry {
                    retryable: e.retriable,
                    message: describe(&e),
                }
            })
    }
}

/// A registry client error with its causes (the HTTP error, the connection's, the TLS
/// verifier's), since `SRCError::error` alone says only that the call failed.
fn describe(e: &schema_registry_converter::error::SRCError) -> String {
    match std::error::Error::source(e) {
        Some(source) => format!("{}: {}", e.error, chain(source)),
        None => e.error.clone(),
    }
}

/// An error and its sources, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_unframe_round_trip() {
        for indexes in [vec![0], vec![1], vec![2, 0], vec![0, 3, 1], vec![300]] {
            let framed = frame(42, &indexes, b"\x0a\x03abc");
            let back = unframe(&framed).unwrap();
            assert_eq!(back.schema_id, 42);
            assert_eq!(back.message_indexes, indexes);
            assert_eq!(back.payload, b"\x0a\x03abc");
        }
    }

    #[test]
    fn first_message_index_is_a_single_zero_byte() {
        assert_eq!(frame(1, &[0], b"x"), vec![0, 0, 0, 0, 1, 0, b'x']);
        // [1] is count 1 (zig-zag 2) then index 1 (zig-zag 2).
        assert_eq!(frame(1, &[1], b""), vec![0, 0, 0, 0, 1, 2, 2]);
    }

    #[test]
    fn malformed_frames_are_errors_never_panics() {
        assert_eq!(unframe(b""), Err(WireError::TooShort(0)));
        assert_eq!(unframe(b"\x00\x00\x00\x01"), Err(WireError::TooShort(4)));
        assert_eq!(unframe(b"{\"a\":1}"), Err(WireError::BadMagic(b'{')));
        assert!(matches!(
            unframe(b"\x00\x00\x00\x00\x01\xff\xff\xff\xff\xff\xff"),
            Err(WireError::BadIndex(_))
        ));
        assert!(matches!(
            unframe(b"\x00\x00\x00\x00\x01\x02"),
            Err(WireError::BadIndex(_))
        ));
        // Every prefix of every byte pattern: no panic.
        for a in 0..=255u8 {
            for len in 0..10 {
                let v: Vec<u8> = std::iter::once(0)
                    .chain(std::iter::repeat_n(a, len))
                    .collect();
                let _ = unframe(&v);
            }
        }
    }

    /// `RegistryEncoder` (schema_registry_converter talking to a registry) and `frame`
    /// produce identical bytes. The registry here is a minimal stand-in answering the one
    /// endpoint the encoder calls.
    #[tokio::test]
    async fn registry_encoder_matches_offline_framing() {
        use axum::{Json, Router, routing::get};
        let schema = crate::schemas::AGGREGATES.source;
        let app = Router::new().route(
            "/subjects/{subject}/versions/latest",
            get(
                move |axum::extract::Path(subject): axum::extract::Path<String>| async move {
                    Json(serde_json::json!({
                        "subject": subject, "version": 1, "id": 7,
                        "schemaType": "PROTOBUF", "schema": schema,
                    }))
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let enc = RegistryEncoder::new(&format!("http://{addr}"));
        let full_name = crate::schemas::SESSION.full_name;
        let got = enc
            .encode("pulse.sessions.v1", full_name, b"\x0a\x01s")
            .await
            .unwrap();
        let indexes = crate::schemas::SESSION.message_indexes().unwrap();
        assert_eq!(got, frame(7, &indexes, b"\x0a\x01s"));
    }

    #[tokio::test]
    async fn unreachable_registry_is_a_retryable_error() {
        let enc = RegistryEncoder::new("http://127.0.0.1:9");
        let err = enc
            .encode("t", "pulse.events.v1.Event", b"")
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::Registry { .. }), "{err}");
        // The connection's own reason is in the message, not only "the call failed".
        assert!(err.to_string().contains("Connection refused"), "{err}");
    }

    #[test]
    fn a_ca_bundle_without_a_certificate_is_refused_when_the_encoder_is_built() {
        let options = |pem: &'static [u8]| RegistryClientOptions {
            credentials: None,
            ca_pem: Some(pem),
        };
        let err = RegistryEncoder::with_options("https://registry:8081", options(b"not pem"))
            .unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        assert!(!err.is_retryable());
    }
}
