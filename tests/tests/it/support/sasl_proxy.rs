//! A SASL-terminating Kafka protocol proxy for tests of SASL clients (`kafka_sasl`): Tansu
//! 0.6 offers SCRAM only, so this proxy sits in front of a plaintext Tansu and does the
//! broker's side of SASL itself. It reads size-prefixed Kafka requests; answers
//! SaslHandshake (key 17, v0/v1) and SaslAuthenticate (key 36, v0–v2, v2 flexible) itself,
//! checking PLAIN (`authzid\0user\0password`) against configured users and OAUTHBEARER's
//! client first message (`n,,\x01auth=Bearer <jwt>\x01\x01`, the JWT's `sub` and `exp`;
//! librdkafka's unsecured JWT has no signature to check) against configured principals;
//! passes ApiVersions (key 18) to the broker and adds keys 17 and 36 to its answer if the
//! broker left them out; refuses any other request before authentication by closing the
//! connection (as a broker does); and after authentication forwards both directions byte
//! for byte. It rewrites no broker addresses: the test's Tansu advertises the proxy's port
//! (or that of a TLS terminator in front of it), as in `kafka_tls`.
//!
//! What it is not: a broker with SASL. Authorization, re-authentication (the session
//! lifetime it answers is 0: none), SCRAM and GSSAPI are not here.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const API_VERSIONS: i16 = 18;
const SASL_HANDSHAKE: i16 = 17;
const SASL_AUTHENTICATE: i16 = 36;
/// Kafka's error codes.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const ILLEGAL_SASL_STATE: i16 = 34;
const SASL_AUTHENTICATION_FAILED: i16 = 58;
/// What a Kafka broker answers a wrong PLAIN password with.
pub const PLAIN_FAILED: &str = "Authentication failed: Invalid username or password";
/// What a Kafka broker answers an OAUTHBEARER token it does not accept with (after the
/// client acknowledged the error challenge).
pub const OAUTHBEARER_FAILED: &str = "Authentication failed during authentication due to invalid credentials with SASL mechanism OAUTHBEARER";
/// The largest request the proxy reads (a produce batch of the tests is far smaller).
const MAX_FRAME: usize = 64 << 20;

/// Who may authenticate.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// PLAIN users: (user, password).
    pub plain: Vec<(String, String)>,
    /// OAUTHBEARER: the accepted `sub` of a token.
    pub oauthbearer: Vec<String>,
}

impl Credentials {
    fn mechanisms(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.plain.is_empty() {
            m.push("PLAIN");
        }
        if !self.oauthbearer.is_empty() {
            m.push("OAUTHBEARER");
        }
        m
    }

    /// The principal `token` authenticates for `mechanism`, or why not.
    fn check(&self, mechanism: &str, token: &[u8]) -> Result<String, String> {
        match mechanism {
            "PLAIN" => {
                let parts: Vec<&[u8]> = token.split(|b| *b == 0).collect();
                let [authzid, user, password] = parts[..] else {
                    return Err(format!("PLAIN: {} NUL-separated parts, not 3", parts.len()));
                };
                let user = String::from_utf8_lossy(user).into_owned();
                if !authzid.is_empty() && authzid != user.as_bytes() {
                    return Err(format!("PLAIN: authzid differs from user {user}"));
                }
                let ok = self
                    .plain
                    .iter()
                    .any(|(u, p)| *u == user && p.as_bytes() == password);
                if ok {
                    Ok(user)
                } else {
                    Err(format!("PLAIN: wrong password or unknown user {user}"))
                }
            }
            "OAUTHBEARER" => {
                let sub = oauthbearer_subject(token)?;
                if self.oauthbearer.contains(&sub) {
                    Ok(sub)
                } else {
                    Err(format!("OAUTHBEARER: principal {sub} not accepted"))
                }
            }
            other => Err(format!("mechanism {other} not offered")),
        }
    }
}

/// The `sub` of the unexpired JWT in an OAUTHBEARER client first message (RFC 7628:
/// `gs2-header \x01 *(key=value \x01) \x01`, one pair `auth=Bearer <token>`).
fn oauthbearer_subject(message: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(message).map_err(|_| "OAUTHBEARER: not UTF-8".to_owned())?;
    let mut parts = text.split('\x01');
    let gs2 = parts.next().unwrap_or_default();
    if !gs2.starts_with("n,") {
        return Err(format!("OAUTHBEARER: gs2 header {gs2:?}"));
    }
    let token = parts
        .find_map(|kv| kv.strip_prefix("auth=Bearer "))
        .ok_or("OAUTHBEARER: no auth=Bearer pair")?;
    if !text.ends_with("\x01\x01") {
        return Err("OAUTHBEARER: message does not end with two kvsep".into());
    }
    let payload = token
        .split('.')
        .nth(1)
        .ok_or("OAUTHBEARER: the token is not a JWT")?;
    let payload = base64url(payload).ok_or("OAUTHBEARER: the JWT payload is not base64url")?;
    let claims: serde_json::Value = serde_json::from_slice(&payload)
        .map_err(|e| format!("OAUTHBEARER: the JWT payload: {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    match claims["exp"].as_f64() {
        Some(exp) if exp > now => {}
        exp => {
            return Err(format!(
                "OAUTHBEARER: the token expired or has no exp ({exp:?})"
            ));
        }
    }
    claims["sub"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "OAUTHBEARER: the JWT has no sub".into())
}

/// Decodes unpadded base64url (RFC 4648 §5).
fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// What the proxy saw: each authentication (mechanism, principal), and each refusal.
#[derive(Debug, Default)]
struct Seen {
    authenticated: Vec<(String, String)>,
    refused: Vec<String>,
}

/// The proxy on 127.0.0.1:`port`, forwarding to 127.0.0.1:`upstream`; stops on drop.
pub struct SaslProxy {
    pub port: u16,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl SaslProxy {
    /// Starts the proxy; `upstream` need not listen yet (each connection connects to it).
    pub async fn start(upstream: u16, credentials: Credentials) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let credentials = Arc::new(credentials);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (s, credentials) = (s.clone(), credentials.clone());
                tokio::spawn(async move {
                    if let Err(reason) = serve(client, upstream, &credentials, &s).await {
                        s.lock().unwrap().refused.push(reason);
                    }
                });
            }
        });
        Self { port, seen, task }
    }

    /// Each successful authentication: (mechanism, principal).
    pub fn authenticated(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().authenticated.clone()
    }

    /// Why connections were closed before authentication succeeded.
    pub fn refused(&self) -> Vec<String> {
        self.seen.lock().unwrap().refused.clone()
    }
}

impl Drop for SaslProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client connection: SASL first, then byte-for-byte forwarding. `Err` is why the
/// connection was closed before authentication.
async fn serve(
    mut client: TcpStream,
    upstream: u16,
    credentials: &Credentials,
    seen: &Mutex<Seen>,
) -> Result<(), String> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream))
        .await
        .map_err(|e| format!("connecting to the broker: {e}"))?;
    let mut mechanism: Option<&'static str> = None;
    // After a SaslHandshake v0 the client may send bare tokens instead of SaslAuthenticate.
    let mut bare_tokens = false;
    // An OAUTHBEARER token was refused with an error challenge; the next message fails.
    let mut oauthbearer_refused: Option<String> = None;
    loop {
        let Some(frame) = read_frame(&mut client).await? else {
            return Ok(()); // the client left before authenticating
        };
        let header = RequestHeader::parse(&frame);
        let is_authenticate = header
            .as_ref()
            .is_ok_and(|h| h.api_key == SASL_AUTHENTICATE);
        if bare_tokens && !is_authenticate {
            let mechanism = mechanism.unwrap_or_default();
            return match credentials.check(mechanism, &frame) {
                Ok(principal) => {
                    write_frame(&mut client, &[]).await?;
                    authenticated(seen, mechanism, principal);
                    forward(client, up).await
                }
                Err(reason) => Err(reason), // a broker closes the connection
            };
        }
        let h = header?;
        let body = &frame[h.body..];
        match h.api_key {
            API_VERSIONS => {
                write_frame(&mut up, &frame).await?;
                let response = read_frame(&mut up)
                    .await?
                    .ok_or("the broker closed the connection on ApiVersions")?;
                write_frame(&mut client, &advertise_sasl(&response, h.api_version)?).await?;
            }
            SASL_HANDSHAKE => {
                let (name, _) = read_string(body, 0)?;
                let offered = credentials.mechanisms();
                let error = match offered.iter().find(|m| **m == name) {
                    Some(m) => {
                        mechanism = Some(m);
                        bare_tokens = h.api_version == 0;
                        0
                    }
                    None => UNSUPPORTED_SASL_MECHANISM,
                };
                let mut r = h.correlation_id.to_be_bytes().to_vec();
                r.extend(error.to_be_bytes());
                r.extend((offered.len() as i32).to_be_bytes());
                for m in &offered {
                    put_string(&mut r, m);
                }
                write_frame(&mut client, &r).await?;
                if error != 0 {
                    return Err(format!("SaslHandshake: mechanism {name} not offered"));
                }
            }
            SASL_AUTHENTICATE => {
                let Some(name) = mechanism else {
                    let r =
                        authenticate_response(&h, ILLEGAL_SASL_STATE, Some("no handshake"), b"");
                    write_frame(&mut client, &r).await?;
                    return Err("SaslAuthenticate before SaslHandshake".into());
                };
                let token = if h.api_version >= 2 {
                    let (len, at) = read_uvarint(body, 0)?;
                    body.get(at..at + (len as usize).saturating_sub(1))
                } else {
                    let len = read_i32(body, 0)?;
                    body.get(4..4 + usize::try_from(len).unwrap_or(0))
                }
                .ok_or("SaslAuthenticate: auth_bytes past the end")?;
                if let Some(reason) = oauthbearer_refused {
                    let r = authenticate_response(
                        &h,
                        SASL_AUTHENTICATION_FAILED,
                        Some(OAUTHBEARER_FAILED),
                        b"",
                    );
                    write_frame(&mut client, &r).await?;
                    return Err(reason);
                }
                match credentials.check(name, token) {
                    Ok(principal) => {
                        write_frame(&mut client, &authenticate_response(&h, 0, None, b"")).await?;
                        authenticated(seen, name, principal);
                        return forward(client, up).await;
                    }
                    Err(reason) if name == "OAUTHBEARER" => {
                        // RFC 7628 §3.2.2: an error challenge, which the client acknowledges
                        // with a kvsep before the server fails the authentication.
                        let challenge = br#"{"status":"invalid_token"}"#;
                        write_frame(&mut client, &authenticate_response(&h, 0, None, challenge))
                            .await?;
                        oauthbearer_refused = Some(reason);
                    }
                    Err(reason) => {
                        let r = authenticate_response(
                            &h,
                            SASL_AUTHENTICATION_FAILED,
                            Some(PLAIN_FAILED),
                            b"",
                        );
                        write_frame(&mut client, &r).await?;
                        return Err(reason);
                    }
                }
            }
            other => {
                return Err(format!(
                    "api key {other} v{} before authentication",
                    h.api_version
                ));
            }
        }
    }
}

fn authenticated(seen: &Mutex<Seen>, mechanism: &str, principal: String) {
    seen.lock()
        .unwrap()
        .authenticated
        .push((mechanism.to_owned(), principal));
}

/// Byte-for-byte forwarding once authenticated; its end is no refusal.
async fn forward(mut client: TcpStream, mut up: TcpStream) -> Result<(), String> {
    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
    Ok(())
}

/// The request header fields the proxy needs, and where the body starts.
struct RequestHeader {
    api_key: i16,
    api_version: i16,
    correlation_id: i32,
    body: usize,
}

impl RequestHeader {
    /// Header v1 (key, version, correlation id, nullable client id), plus tagged fields
    /// (v2) for the flexible versions of the requests the proxy reads.
    fn parse(frame: &[u8]) -> Result<Self, String> {
        let api_key = read_i16(frame, 0)?;
        let api_version = read_i16(frame, 2)?;
        let correlation_id = read_i32(frame, 4)?;
        let client_id_len = read_i16(frame, 8)?;
        let mut body = 10 + usize::try_from(client_id_len).unwrap_or(0);
        let flexible = match api_key {
            API_VERSIONS => api_version >= 3,
            SASL_AUTHENTICATE => api_version >= 2,
            _ => false,
        };
        if flexible {
            body = skip_tagged_fields(frame, body)?;
        }
        if body > frame.len() {
            return Err(format!("request header of api key {api_key} past the end"));
        }
        Ok(Self {
            api_key,
            api_version,
            correlation_id,
            body,
        })
    }
}

/// A SaslAuthenticate response of the request's version: v0 (error, nullable message,
/// bytes), v1 (+ session lifetime), v2 (flexible: compact types, tagged fields, and a
/// response header with tagged fields).
fn authenticate_response(
    h: &RequestHeader,
    error: i16,
    message: Option<&str>,
    auth: &[u8],
) -> Vec<u8> {
    let mut r = h.correlation_id.to_be_bytes().to_vec();
    let flexible = h.api_version >= 2;
    if flexible {
        r.push(0); // response header tagged fields
    }
    r.extend(error.to_be_bytes());
    if flexible {
        match message {
            Some(m) => {
                put_uvarint(&mut r, m.len() as u64 + 1);
                r.extend(m.as_bytes());
            }
            None => r.push(0),
        }
        put_uvarint(&mut r, auth.len() as u64 + 1);
    } else {
        match message {
            Some(m) => put_string(&mut r, m),
            None => r.extend((-1i16).to_be_bytes()),
        }
        r.extend((auth.len() as i32).to_be_bytes());
    }
    r.extend(auth);
    if h.api_version >= 1 {
        r.extend(0i64.to_be_bytes()); // session lifetime: no re-authentication
    }
    if flexible {
        r.push(0);
    }
    r
}

/// The broker's ApiVersions response (of request version `version`) with SaslHandshake
/// (v0–1) and SaslAuthenticate (v0–2) added if missing; unchanged if both are there or
/// the response is an error. (ApiVersions responses keep header v0 even when flexible.)
pub fn advertise_sasl(response: &[u8], version: i16) -> Result<Vec<u8>, String> {
    if read_i16(response, 4)? != 0 {
        return Ok(response.to_vec());
    }
    let flexible = version >= 3;
    let (count, mut at) = if flexible {
        let (n, at) = read_uvarint(response, 6)?;
        (n.saturating_sub(1) as usize, at)
    } else {
        (usize::try_from(read_i32(response, 6)?).unwrap_or(0), 10)
    };
    let start = at;
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        keys.push(read_i16(response, at)?);
        at += 6;
        if flexible {
            at = skip_tagged_fields(response, at)?;
        }
    }
    let missing: Vec<(i16, i16)> = [(SASL_HANDSHAKE, 1), (SASL_AUTHENTICATE, 2)]
        .into_iter()
        .filter(|(k, _)| !keys.contains(k))
        .collect();
    if missing.is_empty() {
        return Ok(response.to_vec());
    }
    let mut r = response[..6].to_vec();
    let total = count + missing.len();
    if flexible {
        put_uvarint(&mut r, total as u64 + 1);
    } else {
        r.extend((total as i32).to_be_bytes());
    }
    r.extend(&response[start..at]);
    for (key, max) in missing {
        r.extend(key.to_be_bytes());
        r.extend(0i16.to_be_bytes());
        r.extend(max.to_be_bytes());
        if flexible {
            r.push(0);
        }
    }
    r.extend(&response[at..]);
    Ok(r)
}

async fn read_frame(s: &mut TcpStream) -> Result<Option<Vec<u8>>, String> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("reading a frame: {e}")),
    }
    let len = usize::try_from(i32::from_be_bytes(len))
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or("a frame size below 0 or above 64 MiB")?;
    let mut frame = vec![0; len];
    s.read_exact(&mut frame)
        .await
        .map_err(|e| format!("reading a frame: {e}"))?;
    Ok(Some(frame))
}

async fn write_frame(s: &mut TcpStream, frame: &[u8]) -> Result<(), String> {
    let mut out = (frame.len() as i32).to_be_bytes().to_vec();
    out.extend(frame);
    s.write_all(&out)
        .await
        .map_err(|e| format!("writing a frame: {e}"))
}

fn read_i16(b: &[u8], at: usize) -> Result<i16, String> {
    b.get(at..at + 2)
        .map(|s| i16::from_be_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("an int16 at {at} past the end ({} bytes)", b.len()))
}

fn read_i32(b: &[u8], at: usize) -> Result<i32, String> {
    b.get(at..at + 4)
        .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| format!("an int32 at {at} past the end ({} bytes)", b.len()))
}

/// An int16-length string at `at`, and the offset after it.
fn read_string(b: &[u8], at: usize) -> Result<(String, usize), String> {
    let len = usize::try_from(read_i16(b, at)?).map_err(|_| "a null string".to_owned())?;
    let s = b.get(at + 2..at + 2 + len).ok_or("a string past the end")?;
    Ok((String::from_utf8_lossy(s).into_owned(), at + 2 + len))
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s.as_bytes());
}

/// An unsigned varint at `at`, and the offset after it.
fn read_uvarint(b: &[u8], mut at: usize) -> Result<(u64, usize), String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(at).ok_or("a varint past the end")?;
        at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((value, at));
        }
    }
    Err("a varint longer than 64 bits".into())
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The offset after the tagged fields at `at`.
fn skip_tagged_fields(b: &[u8], at: usize) -> Result<usize, String> {
    let (count, mut at) = read_uvarint(b, at)?;
    for _ in 0..count {
        let (_tag, next) = read_uvarint(b, at)?;
        let (size, next) = read_uvarint(b, next)?;
        at = next + size as usize;
    }
    if at > b.len() {
        return Err("tagged fields past the end".into());
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ApiVersions response of `version` listing `keys` (each v0–3), then `rest`.
    fn api_versions(version: i16, keys: &[i16], rest: &[u8]) -> Vec<u8> {
        let mut r = 7i32.to_be_bytes().to_vec();
        r.extend(0i16.to_be_bytes());
        if version >= 3 {
            put_uvarint(&mut r, keys.len() as u64 + 1);
        } else {
            r.extend((keys.len() as i32).to_be_bytes());
        }
        for k in keys {
            r.extend(k.to_be_bytes());
            r.extend(0i16.to_be_bytes());
            r.extend(3i16.to_be_bytes());
            if version >= 3 {
                r.push(0);
            }
        }
        r.extend(rest);
        r
    }

    #[test]
    fn api_versions_without_sasl_gets_handshake_and_authenticate_added() {
        // v3 (flexible) with a throttle time and tagged fields after the keys; v1 with a
        // throttle time; v0 with nothing after.
        for (version, rest) in [
            (3, &b"\0\0\0\0\x01\x00\x02ab"[..]),
            (1, &b"\0\0\0\x05"[..]),
            (0, &b""[..]),
        ] {
            let without = api_versions(version, &[0, 3, 18], rest);
            let added = advertise_sasl(&without, version).unwrap();
            let mut expected = api_versions(version, &[0, 3, 18, 17, 36], rest);
            // The added entries' max versions: SaslHandshake 1, SaslAuthenticate 2.
            let entry = if version >= 3 { 7 } else { 6 };
            let first_added = expected.len() - rest.len() - 2 * entry;
            expected[first_added + 4..first_added + 6].copy_from_slice(&1i16.to_be_bytes());
            expected[first_added + entry + 4..first_added + entry + 6]
                .copy_from_slice(&2i16.to_be_bytes());
            assert_eq!(added, expected, "v{version}");
            // Both present: unchanged.
            let with = api_versions(version, &[0, 17, 36], rest);
            assert_eq!(advertise_sasl(&with, version).unwrap(), with, "v{version}");
        }
    }

    #[test]
    fn authenticate_responses_of_each_version() {
        let h = |v| RequestHeader {
            api_key: SASL_AUTHENTICATE,
            api_version: v,
            correlation_id: 9,
            body: 0,
        };
        let v0 = authenticate_response(&h(0), 58, Some("no"), b"");
        assert_eq!(v0, b"\0\0\0\x09\0\x3a\0\x02no\0\0\0\0");
        let v1 = authenticate_response(&h(1), 0, None, b"x");
        assert_eq!(v1, b"\0\0\0\x09\0\0\xff\xff\0\0\0\x01x\0\0\0\0\0\0\0\0");
        let v2 = authenticate_response(&h(2), 0, None, b"x");
        assert_eq!(v2, b"\0\0\0\x09\0\0\0\0\x02x\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn plain_and_oauthbearer_messages_are_checked() {
        let c = Credentials {
            plain: vec![("pulse".into(), "pw".into())],
            oauthbearer: vec!["svc".into()],
        };
        assert_eq!(c.check("PLAIN", b"\0pulse\0pw"), Ok("pulse".into()));
        assert_eq!(c.check("PLAIN", b"pulse\0pulse\0pw"), Ok("pulse".into()));
        assert!(c.check("PLAIN", b"\0pulse\0pW").is_err());
        assert!(c.check("PLAIN", b"\0pulse").is_err());
        let jwt = |claims: &str| {
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut s = String::new();
            for chunk in claims.as_bytes().chunks(3) {
                let n = chunk.iter().fold(0u32, |a, b| a << 8 | u32::from(*b))
                    << (8 * (3 - chunk.len()));
                for i in 0..=chunk.len() {
                    s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            format!("n,,\x01auth=Bearer eyJhbGciOiJub25lIn0.{s}.\x01\x01")
        };
        let ok = jwt(r#"{"sub":"svc","exp":99999999999}"#);
        assert_eq!(c.check("OAUTHBEARER", ok.as_bytes()), Ok("svc".into()));
        let other = jwt(r#"{"sub":"eve","exp":99999999999}"#);
        assert!(
            c.check("OAUTHBEARER", other.as_bytes())
                .unwrap_err()
                .contains("eve")
        );
        let expired = jwt(r#"{"sub":"svc","exp":1}"#);
        assert!(
            c.check("OAUTHBEARER", expired.as_bytes())
                .unwrap_err()
                .contains("expired")
        );
    }
}
