//! Server-side TLS with certificates that are reloaded without a restart: a
//! [`ReloadingTls`] reads a PEM certificate chain and key (and optionally the CAs whose
//! client certificates it requires), hands out acceptors built from the newest good files,
//! and [`ReloadingTls::watch`] checks the files' modification times every few seconds.
//! New handshakes get the new certificate; a bad new file keeps the old one, is logged and
//! counted. The accept loop that uses the acceptors is in [`crate::listener`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;

pub const TLS_RELOAD_TOTAL: &str = "pulse_tls_reload_total";
pub const TLS_CERT_EXPIRY: &str = "pulse_tls_cert_expiry_timestamp_seconds";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "pulse_tls_handshake_failures_total";

/// Describes the TLS metrics (repeated calls are harmless).
pub fn describe_metrics() {
    metrics::describe_counter!(
        TLS_RELOAD_TOTAL,
        "Reloads of a server's TLS certificate and key after the files changed, by listener (service, admin) and outcome (ok, error: the previous certificate stays in use)."
    );
    metrics::describe_gauge!(
        TLS_CERT_EXPIRY,
        metrics::Unit::Seconds,
        "Expiry (notAfter, Unix seconds) of the certificate a TLS listener serves now, by listener (service, admin)."
    );
    metrics::describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "TLS handshakes that failed or timed out (plain HTTP to a TLS port, an untrusted or missing client certificate), by listener (service, admin)."
    );
}

/// The files of one TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate they signed.
    pub client_ca: Option<PathBuf>,
}

/// Why certificate files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("the certificate {} and the key {} do not form a usable pair: {source}", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: tokio_rustls::rustls::Error,
    },
    #[error("client CA file {}: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
    /// The flags name an incomplete set of files (a certificate without a key, say).
    #[error("{key}: {reason}")]
    Flags { key: String, reason: String },
}

/// The application protocols a listener offers in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2 and HTTP/1.1 (the HTTP servers).
    Http,
    /// HTTP/2 only (gRPC; clients such as grpc-go require it).
    Grpc,
}

/// What one successful load produced.
#[derive(Debug)]
struct Loaded {
    http: Arc<ServerConfig>,
    grpc: Arc<ServerConfig>,
    not_after: Option<i64>,
}

/// A listener's TLS settings, reloaded when its files change.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    /// `service` or `admin`: the `listener` label of the TLS metrics.
    listener: &'static str,
    current: RwLock<Arc<Loaded>>,
    /// The files' (mtime, length) when they were last tried (good or not), so that a bad
    /// new file is reported once, and tried again when it changes again.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl ReloadingTls {
    /// Loads `files` (an error names the file and the reason) for the listener labelled
    /// `listener` in metrics (a fixed name: `service` or `admin`).
    pub fn load(files: TlsFiles, listener: &'static str) -> Result<Arc<Self>, TlsError> {
        describe_metrics();
        let stamps = stamps(&files);
        let loaded = build(&files)?;
        let tls = Arc::new(Self {
            files,
            listener,
            current: RwLock::new(Arc::new(loaded)),
            stamps: Mutex::new(stamps),
        });
        tls.init_metrics();
        Ok(tls)
    }

    /// Sets this listener's expiry gauge and creates its counters at zero. [`load`](Self::load)
    /// does; the servers do again when they start (see
    /// [`crate::server::ServerSettings::watch`]), since a service's admin certificate is
    /// loaded before its metrics recorder is installed.
    pub fn init_metrics(&self) {
        let listener = self.listener;
        let loaded = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        record_expiry(listener, &loaded);
        metrics::counter!(TLS_RELOAD_TOTAL, "listener" => listener, "outcome" => "ok").increment(0);
        metrics::counter!(TLS_RELOAD_TOTAL, "listener" => listener, "outcome" => "error")
            .increment(0);
        metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "listener" => listener).increment(0);
    }

    /// The `listener` label of this listener's metrics.
    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// An acceptor with the newest good certificate, for one handshake.
    pub fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        let loaded = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        TlsAcceptor::from(match alpn {
            Alpn::Http => loaded.http.clone(),
            Alpn::Grpc => loaded.grpc.clone(),
        })
    }

    /// Whether client certificates are required.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reloads the files if any changed since they were last tried: `None` when none
    /// changed, else the outcome (on error the previous certificate stays in use).
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = stamps(&self.files);
        {
            let mut last = self
                .stamps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last == now {
                return None;
            }
            *last = now;
        }
        let outcome = build(&self.files);
        let label = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!(TLS_RELOAD_TOTAL, "listener" => self.listener, "outcome" => label)
            .increment(1);
        Some(outcome.map(|loaded| {
            record_expiry(self.listener, &loaded);
            *self
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
        }))
    }

    /// Checks the files every `interval` until `stop` is cancelled, logging each reload.
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        crate::shutdown::every(interval, &stop, || async {
            let (outcome, detail) = match self.reload_if_changed() {
                None => return,
                Some(Ok(())) => {
                    tracing::info!(
                        listener = self.listener,
                        cert = %self.files.cert.display(),
                        "tls certificate reloaded; new connections use it"
                    );
                    (
                        crate::audit::Outcome::Ok,
                        format!("{} listener: new connections use it", self.listener),
                    )
                }
                Some(Err(e)) => {
                    tracing::error!(
                        listener = self.listener,
                        error = %e,
                        "tls certificate reload failed; the previous certificate stays in use"
                    );
                    (
                        crate::audit::Outcome::Failed,
                        format!(
                            "{} listener: {e}; the previous certificate stays in use",
                            self.listener
                        ),
                    )
                }
            };
            // A certificate rotation is a key change: in the audit trail where the service
            // set one (every service and `pulsectl ledger watch` do).
            if let Some((service, log)) = crate::audit::process_log() {
                log.record(
                    crate::audit::AuditRecord::new(
                        service,
                        "file",
                        crate::audit::action::TLS_RELOAD,
                        &self.files.cert.display().to_string(),
                        outcome,
                    )
                    .with_detail(detail),
                );
            }
        })
        .await;
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
    .collect()
}

fn record_expiry(listener: &'static str, loaded: &Loaded) {
    if let Some(t) = loaded.not_after {
        metrics::gauge!(TLS_CERT_EXPIRY, "listener" => listener).set(t as f64);
    }
}

fn provider() -> Arc<CryptoProvider> {
    // rustls is built with both ring and aws-lc-rs in this workspace, so name one.
    Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let certs = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| match e {
        tokio_rustls::rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: files.key.clone(),
        },
        e => TlsError::BadPem {
            path: files.key.clone(),
            reason: e.to_string(),
        },
    })?;
    let not_after = not_after(&certs[0]);
    let provider = provider();
    let verifier = match &files.client_ca {
        None => None,
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path)? {
                roots.add(ca).map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            Some(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::ClientCa {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?,
            )
        }
    };
    let config = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, TlsError> {
        let pair_error = |source| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(pair_error)?;
        let builder = match &verifier {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(pair_error)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    };
    Ok(Loaded {
        http: config(&[b"h2", b"http/1.1"])?,
        grpc: config(&[b"h2"])?,
        not_after,
    })
}

/// The `notAfter` of an X.509 certificate, in Unix seconds (`None` if it cannot be read;
/// rustls has already checked the certificate is well-formed enough to serve).
pub fn not_after(cert: &[u8]) -> Option<i64> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE,
    //   validity SEQUENCE { notBefore Time, notAfter Time }, ... }, ... }
    let (_, cert, _) = der(cert)?;
    let (_, mut tbs, _) = der(cert)?;
    let (tag, _, rest) = der(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    for _ in 0..3 {
        tbs = der(tbs)?.2; // serial, signature algorithm, issuer
    }
    let (_, validity, _) = der(tbs)?;
    let (_, _, validity) = der(validity)?; // notBefore
    let (tag, time, _) = der(validity)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<u8> { rest.get(i..i + 2)?.parse().ok() };
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(field(0)?).ok()?, field(2)?)
            .ok()?;
    let time = time::Time::from_hms(field(4)?, field(6)?, field(8)?).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}

/// One DER element: (tag, contents, what follows it).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for &b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(b);
        }
        (len, 2 + n)
    };
    let contents = input.get(header..header.checked_add(len)?)?;
    Some((tag, contents, &input[header + len..]))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;

    pub(crate) fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl CLI (scripts/install-deps.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed certificate for localhost (`{name}.pem`, `{name}.key`) valid `days`.
    pub(crate) fn self_signed(dir: &Path, name: &str, days: u32) -> TlsFiles {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                &days.to_string(),
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
            ],
        );
        TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            client_ca: None,
        }
    }

    fn end_date(path: &Path) -> i64 {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"])
            .arg(path)
            .output()
            .unwrap();
        // notAfter=2026-12-08 15:59:41Z
        let text = String::from_utf8(out.stdout).unwrap();
        let text = text.trim().trim_start_matches("notAfter=");
        let format =
            time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
        time::PrimitiveDateTime::parse(text, &format)
            .unwrap()
            .assume_utc()
            .unix_timestamp()
    }

    #[test]
    fn the_expiry_is_read_from_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let files = self_signed(dir.path(), "a", 3);
        let certs = certificates(&files.cert).unwrap();
        assert_eq!(not_after(&certs[0]), Some(end_date(&files.cert)));
        assert_eq!(not_after(b"\x30\x03\x02\x01"), None);
        assert_eq!(not_after(b""), None);
    }

    #[test]
    fn a_changed_pair_is_reloaded_and_a_bad_one_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let files = self_signed(dir.path(), "live", 3);
        let tls = ReloadingTls::load(files.clone(), "service").unwrap();
        assert!(tls.reload_if_changed().is_none(), "nothing changed");
        let before = tls.current.read().unwrap().not_after;

        // A key that does not match the certificate: refused, the old pair stays.
        let other = self_signed(dir.path(), "other", 30);
        std::fs::copy(&other.key, &files.key).unwrap();
        let e = tls.reload_if_changed().unwrap().unwrap_err();
        assert!(matches!(e, TlsError::Pair { .. }), "{e}");
        assert_eq!(tls.current.read().unwrap().not_after, before);
        assert!(
            tls.reload_if_changed().is_none(),
            "a bad file is tried once"
        );

        std::fs::copy(&other.cert, &files.cert).unwrap();
        tls.reload_if_changed().unwrap().unwrap();
        let after = tls.current.read().unwrap().not_after;
        assert_eq!(after, Some(end_date(&other.cert)));
        assert_ne!(after, before);

        std::fs::write(&files.cert, "garbage").unwrap();
        let e = tls.reload_if_changed().unwrap().unwrap_err();
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        assert_eq!(tls.current.read().unwrap().not_after, after);
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
            client_ca: None,
        };
        let e = ReloadingTls::load(files, "admin").unwrap_err();
        assert!(e.to_string().starts_with("reading "), "{e}");
        assert!(e.to_string().contains("nope.pem"), "{e}");
    }
}
