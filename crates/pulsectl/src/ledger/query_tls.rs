//! The ledger's TLS settings for the query API it reads the revenue from
//! (`--query-ca-file`, and `--query-client-cert-file` / `--query-client-key-file` for a
//! query API that requires client certificates), their checks at start, the HTTP client
//! built from them, and what a failed TLS handshake with the query API means. Reading and
//! comparing the revenue is `revenue`'s and `reconcile`'s.

use std::path::{Path, PathBuf};

use pulse_platform::config::Problems;

/// The CA setting, as errors name it.
pub const CA_KEY: &str = "--query-ca-file / PULSE_LEDGER_QUERY_CA_FILE";
/// The client certificate setting, as errors name it.
pub const CERT_KEY: &str = "--query-client-cert-file / PULSE_LEDGER_QUERY_CLIENT_CERT_FILE";
/// The client key setting, as errors name it.
pub const KEY_KEY: &str = "--query-client-key-file / PULSE_LEDGER_QUERY_CLIENT_KEY_FILE";

/// How the ledger trusts (and authenticates to) an `https://` query API.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct QueryTlsArgs {
    /// PEM file of the CA certificate(s) that signed the query API's server certificate,
    /// for an `https://` --query-url (the query API's `--tls-cert-file`); trusted besides
    /// the built-in web roots. Unset: the built-in roots only.
    #[arg(long = "query-ca-file", env = "PULSE_LEDGER_QUERY_CA_FILE")]
    pub query_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) the ledger presents to a query API that requires one
    /// (its `--tls-client-ca-file`); with --query-client-key-file.
    #[arg(
        long = "query-client-cert-file",
        env = "PULSE_LEDGER_QUERY_CLIENT_CERT_FILE"
    )]
    pub query_client_cert_file: Option<PathBuf>,
    /// PEM private key (unencrypted) of --query-client-cert-file.
    #[arg(
        long = "query-client-key-file",
        env = "PULSE_LEDGER_QUERY_CLIENT_KEY_FILE"
    )]
    pub query_client_key_file: Option<PathBuf>,
}

impl QueryTlsArgs {
    /// Adds every problem of these settings for the query API at `url` to `p`.
    pub fn check(&self, url: &str, p: &mut Problems) {
        let https = url.starts_with("https://");
        if let Some(ca) = &self.query_ca_file {
            if !https {
                p.add(
                    CA_KEY,
                    format!(
                        "a CA file is set but --query-url {url:?} is not https://: the connection would not use TLS"
                    ),
                );
            } else if let Err(reason) = read_ca(ca) {
                p.add(CA_KEY, reason);
            }
        }
        match (&self.query_client_cert_file, &self.query_client_key_file) {
            (None, None) => {}
            (Some(_), None) => p.add(KEY_KEY, format!("needs to be set with {CERT_KEY}")),
            (None, Some(_)) => p.add(CERT_KEY, format!("needs to be set with {KEY_KEY}")),
            (Some(cert), Some(key)) => {
                if !https {
                    p.add(
                        CERT_KEY,
                        format!(
                            "a client certificate is set but --query-url {url:?} is not https://: it would not be presented"
                        ),
                    );
                } else if let Err(reason) = identity(cert, key) {
                    p.add(CERT_KEY, reason);
                }
            }
        }
    }

    /// The HTTP client of the query API: trusting `--query-ca-file` (and the built-in
    /// roots), presenting the client certificate when one is set. The error names the
    /// setting and why.
    pub fn client(&self) -> Result<reqwest::Client, (&'static str, String)> {
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = &self.query_ca_file {
            for cert in read_ca(ca).map_err(|reason| (CA_KEY, reason))? {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&self.query_client_cert_file, &self.query_client_key_file)
        {
            builder = builder.identity(identity(cert, key).map_err(|reason| (CERT_KEY, reason))?);
        }
        builder
            .build()
            .map_err(|e| ("--query-url / PULSE_LEDGER_QUERY_URL", e.to_string()))
    }
}

/// The CA certificates of the PEM file `path`, at least one.
fn read_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The client identity of the PEM certificate (chain) `cert` and its private key `key`.
fn identity(cert: &Path, key: &Path) -> Result<reqwest::Identity, String> {
    let mut pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{}: holds no PEM certificate", cert.display()));
    }
    pem.push(b'\n');
    pem.extend(std::fs::read(key).map_err(|e| format!("{KEY_KEY}: {}: {e}", key.display()))?);
    reqwest::Identity::from_pem(&pem).map_err(|e| {
        format!(
            "{} with {}: not a usable certificate and unencrypted private key: {e}",
            cert.display(),
            key.display()
        )
    })
}

/// The TLS failure among `e` and its causes, described with what to set, if there is one
/// (found as [`crate::ingest_client::tls_failure`] finds it).
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    crate::ingest_client::rustls_error_among(e).map(describe)
}

fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let hint = match e {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "the query API's certificate is not signed by a CA the ledger trusts: set {CA_KEY} to the CA that signed it"
        ),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the query API's certificate has expired".to_owned()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the query API's certificate does not name --query-url's host".to_owned()
        }
        E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA) => format!(
            "the query API requires a client certificate it trusts: set {CERT_KEY} and {KEY_KEY}"
        ),
        E::InvalidMessage(_) => "is the query API speaking TLS at all?".to_owned(),
        _ => return e.to_string(),
    };
    format!("{e} ({hint})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(args: &QueryTlsArgs, url: &str) -> String {
        let mut p = Problems::default();
        args.check(url, &mut p);
        match p.into_result() {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn settings_are_checked_and_errors_name_them() {
        let dir = std::env::temp_dir().join(format!("pulsectl-query-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = dir.join("missing.pem");

        assert_eq!(problems(&QueryTlsArgs::default(), "https://q:8090"), "");
        let ca = |path: &Path| QueryTlsArgs {
            query_ca_file: Some(path.to_owned()),
            ..Default::default()
        };
        let text = problems(&ca(&not_pem), "http://q:8090");
        assert!(
            text.contains("--query-ca-file") && text.contains("is not https://"),
            "{text}"
        );
        let text = problems(&ca(&not_pem), "https://q:8090");
        assert!(text.contains("holds no PEM certificate"), "{text}");
        let text = problems(&ca(&missing), "https://q:8090");
        assert!(
            text.contains("--query-ca-file") && text.contains("missing.pem"),
            "{text}"
        );
        assert!(ca(&not_pem).client().is_err());

        let half = QueryTlsArgs {
            query_client_cert_file: Some(not_pem.clone()),
            ..Default::default()
        };
        let text = problems(&half, "https://q:8090");
        assert!(
            text.contains("--query-client-key-file") && text.contains("needs to be set with"),
            "{text}"
        );
        let both = QueryTlsArgs {
            query_client_cert_file: Some(not_pem.clone()),
            query_client_key_file: Some(not_pem.clone()),
            ..Default::default()
        };
        let text = problems(&both, "https://q:8090");
        assert!(
            text.contains("--query-client-cert-file") && text.contains("holds no PEM certificate"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ledger_and_ledger_watch_take_the_flags() {
        use clap::Parser as _;
        let flags = [
            "--query-url",
            "https://q:8090",
            "--query-ca-file",
            "/ca.pem",
            "--query-client-cert-file",
            "/c.pem",
            "--query-client-key-file",
            "/k.pem",
        ];
        let once = ["pulsectl", "ledger", "--from", "0", "--to", "60000"];
        let watch = ["pulsectl", "ledger", "watch"];
        for argv in [&once[..], &watch[..]] {
            let argv = argv.iter().chain(flags.iter());
            let sources = match crate::Cli::try_parse_from(argv).unwrap().command {
                crate::Command::Ledger(a) => match a.command {
                    Some(crate::ledger::LedgerCommand::Watch(w)) => w.sources,
                    None => a.sources,
                },
                other => panic!("not ledger: {other:?}"),
            };
            let tls = &sources.query_tls;
            assert_eq!(tls.query_ca_file.as_deref(), Some(Path::new("/ca.pem")));
            assert_eq!(
                tls.query_client_cert_file.as_deref(),
                Some(Path::new("/c.pem"))
            );
            assert_eq!(
                tls.query_client_key_file.as_deref(),
                Some(Path::new("/k.pem"))
            );
        }
    }

    #[test]
    fn an_unknown_issuer_names_the_ca_setting() {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::other(std::io::Error::other(e));
        let text = tls_failure(&io).unwrap();
        assert!(text.contains(CA_KEY), "{text}");
        let e = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let text = tls_failure(&std::io::Error::other(e)).unwrap();
        assert!(text.contains(CERT_KEY) && text.contains(KEY_KEY), "{text}");
        assert!(tls_failure(&std::io::Error::other("refused")).is_none());
    }
}
