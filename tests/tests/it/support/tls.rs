//! TLS material and a TLS terminator for tests of TLS clients against the stack's plain
//! servers (Kafka in `kafka_tls`, ClickHouse in `clickhouse_tls`): certificates made with
//! the `openssl` CLI, and a tokio-rustls terminator that decrypts and forwards to a local
//! port, optionally requiring a client certificate signed by a given CA (mutual TLS).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// A folder for one test's certificates, broker data and log: under the suite's state
/// folder (kept with `PULSE_TEST_KEEP=1`) when scripts/test.sh runs the tests.
pub fn work_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("PULSE_TEST_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(pulse_tests::unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn openssl(dir: &Path, args: &[&str]) {
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

/// A CA (`{name}.pem`, `{name}.key`) in `dir`.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
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
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(format!("{name}.pem"))
}

/// A server certificate for 127.0.0.1 and localhost signed by the CA `ca`:
/// (`server.pem`, `server.key`).
pub fn make_server_cert(dir: &Path, ca: &str) -> (PathBuf, PathBuf) {
    make_cert(
        dir,
        ca,
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        None,
    )
}

/// Signs `{stem}.csr` with the CA `ca` into `{stem}.pem`, valid for two days, with the
/// extensions of `{stem}.ext`.
fn sign(dir: &Path, ca: &str, stem: &str) {
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{stem}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{stem}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{stem}.ext"),
        ],
    );
}

/// A server certificate (`{stem}.pem`, `{stem}.key`, CN=localhost) signed by the CA `ca`
/// with the extensions `ext` (e.g. `subjectAltName=DNS:localhost`) and, with `dates`
/// (`YYYYMMDDHHMMSSZ` notBefore, notAfter), that validity instead of two days from now
/// (`openssl ca`, which can date a certificate in the past: an expired one).
pub fn make_cert(
    dir: &Path,
    ca: &str,
    stem: &str,
    ext: &str,
    dates: Option<(&str, &str)>,
) -> (PathBuf, PathBuf) {
    let (key, csr, pem, extfile) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.pem"),
        format!("{stem}.ext"),
    );
    std::fs::write(dir.join(&extfile), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=localhost",
        ],
    );
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    match dates {
        None => sign(dir, ca, stem),
        Some((not_before, not_after)) => {
            let db = format!("{stem}.index");
            std::fs::write(dir.join(&db), "").unwrap();
            std::fs::write(
                dir.join(format!("{stem}.cnf")),
                format!(
                    "[ca]\ndefault_ca = test\n[test]\ndatabase = {db}\nnew_certs_dir = .\n\
                     rand_serial = yes\ndefault_md = sha256\npolicy = any\nunique_subject = no\n\
                     [any]\ncommonName = supplied\n"
                ),
            )
            .unwrap();
            openssl(
                dir,
                &[
                    "ca",
                    "-batch",
                    "-notext",
                    "-config",
                    &format!("{stem}.cnf"),
                    "-cert",
                    &ca_pem,
                    "-keyfile",
                    &ca_key,
                    "-in",
                    &csr,
                    "-out",
                    &pem,
                    "-startdate",
                    not_before,
                    "-enddate",
                    not_after,
                    "-extfile",
                    &extfile,
                ],
            );
        }
    }
    (dir.join(pem), dir.join(key))
}

/// A client certificate (`{name}.pem`, `{name}.key`; CN=`name`, `extendedKeyUsage=clientAuth`)
/// signed by the CA `ca`. With `password`, the key is encrypted (PKCS#8, AES-256-CBC)
/// with it; without, it is plain.
pub fn make_client_cert(
    dir: &Path,
    ca: &str,
    name: &str,
    password: Option<&str>,
) -> (PathBuf, PathBuf) {
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "extendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let pass_file = format!("{name}.pass");
    let mut req = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
    ];
    let subject = format!("/CN={name}");
    req.push(&subject);
    let pass_arg = format!("file:{pass_file}");
    match password {
        Some(password) => {
            std::fs::write(dir.join(&pass_file), password).unwrap();
            req.extend(["-passout", &pass_arg]);
        }
        None => req.push("-nodes"),
    }
    openssl(dir, &req);
    let _ = std::fs::remove_file(dir.join(&pass_file));
    sign(dir, ca, name);
    (dir.join(format!("{name}.pem")), dir.join(key))
}

/// The DER of the first certificate in the PEM file `path`.
pub fn cert_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_slice_iter(&std::fs::read(path).unwrap())
        .next()
        .expect("a certificate in the PEM file")
        .unwrap()
        .to_vec()
}

/// Whether a [`Terminator`] asks for a client certificate (mutual TLS).
#[derive(Debug, Clone, Copy)]
pub enum ClientAuth<'a> {
    /// No client certificate asked for.
    None,
    /// A client certificate signed by the CA(s) of this PEM file is required, and the
    /// certificate request names those CAs (as Kafka's brokers do, from their truststore):
    /// an OpenSSL client then sends no certificate that another CA signed.
    Require(&'a Path),
    /// As [`Self::Require`], naming no CA: a client sends whatever certificate it has,
    /// and one another CA signed is refused (`UnknownIssuer`).
    RequireNamingNoCa(&'a Path),
}

/// A TLS terminator on 127.0.0.1: decrypts and forwards every connection to `upstream`.
pub struct Terminator {
    pub port: u16,
    handshakes: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    client_certs: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Terminator {
    /// A terminator that asks for no client certificate.
    pub async fn start(cert: &Path, key: &Path, upstream: u16) -> Self {
        Self::start_with(cert, key, upstream, ClientAuth::None).await
    }

    /// A terminator with `client_auth`: a client certificate the CA did not sign, or none,
    /// fails the handshake (rustls: "peer sent no certificates", or an invalid peer
    /// certificate such as `UnknownIssuer`, recorded in [`Self::failures`]).
    pub async fn start_with(
        cert: &Path,
        key: &Path,
        upstream: u16,
        client_auth: ClientAuth<'_>,
    ) -> Self {
        let certs = CertificateDer::pem_slice_iter(&std::fs::read(cert).unwrap())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&std::fs::read(key).unwrap()).unwrap();
        // rustls is built with both providers in this workspace, so name one.
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Require(ca) | ClientAuth::RequireNamingNoCa(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(&std::fs::read(ca).unwrap()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
                if matches!(client_auth, ClientAuth::RequireNamingNoCa(_)) {
                    verifier = verifier.clear_root_hint_subjects();
                }
                builder.with_client_cert_verifier(verifier.build().unwrap())
            }
        };
        let config = builder.with_single_cert(certs, key).unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let client_certs = Arc::new(Mutex::new(Vec::new()));
        let (h, f, cc) = (handshakes.clone(), failures.clone(), client_certs.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, h, f, cc) = (acceptor.clone(), h.clone(), f.clone(), cc.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            h.fetch_add(1, Ordering::SeqCst);
                            if let Some(leaf) =
                                tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                            {
                                cc.lock().unwrap().push(leaf.to_vec());
                            }
                            if let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                            }
                        }
                        Err(e) => f.lock().unwrap().push(e.to_string()),
                    }
                });
            }
        });
        Self {
            port,
            handshakes,
            failures,
            client_certs,
            task,
        }
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// The DER of the client certificate of each successful handshake that presented one.
    pub fn client_certificates(&self) -> Vec<Vec<u8>> {
        self.client_certs.lock().unwrap().clone()
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}
