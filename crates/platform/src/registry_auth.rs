//! The credentials a schema-registry client (ingest, the processor, `pulsectl schemas`
//! and `replay`) sends, and the CA it trusts for an `https://` registry: one set of flags
//! for every one of them. The HTTP clients themselves are built by their users
//! (`pulse_contracts::wire::RegistryEncoder`, pulsectl).

use std::path::{Path, PathBuf};

use crate::config::Problems;
use crate::secret::Secret;

/// Credentials sent to the schema registry (HTTP basic auth, as Confluent's clients send
/// them); the registry's users are in its `--auth-file`. Unset: no credentials (a registry
/// without an auth file). The password comes from a file or the environment, never from a
/// flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryAuthArgs {
    /// User of the schema registry (HTTP basic auth); unset: send no credentials.
    #[arg(long = "registry-username", env = "PULSE_REGISTRY_USERNAME")]
    pub registry_username: Option<String>,
    /// File holding that user's password (e.g. a mounted Kubernetes secret). Or set the
    /// password in the environment variable PULSE_REGISTRY_PASSWORD (not both).
    #[arg(long = "registry-password-file", env = "PULSE_REGISTRY_PASSWORD_FILE")]
    pub registry_password_file: Option<PathBuf>,
    /// The password from PULSE_REGISTRY_PASSWORD (environment only, never a flag).
    #[arg(skip = Secret::from_env(RegistryAuthArgs::PASSWORD_ENV))]
    pub registry_password: Secret,
    /// PEM file of CA certificates trusted for an https:// schema registry, in addition to
    /// the system's roots (e.g. the private CA that signed the registry's certificate).
    #[arg(
        long = "schema-registry-ca-file",
        env = "PULSE_SCHEMA_REGISTRY_CA_FILE"
    )]
    pub schema_registry_ca_file: Option<PathBuf>,
}

impl RegistryAuthArgs {
    /// The environment variable holding the password when no file is given.
    pub const PASSWORD_ENV: &'static str = "PULSE_REGISTRY_PASSWORD";
    const KEY: &'static str =
        "--registry-username / --registry-password-file / PULSE_REGISTRY_PASSWORD";
    /// The CA file setting, as errors name it.
    pub const CA_KEY: &'static str = "--schema-registry-ca-file / PULSE_SCHEMA_REGISTRY_CA_FILE";

    /// `(user, password)`, or `None` without a user; the error names the setting, never
    /// the password.
    pub fn credentials(&self) -> Result<Option<(String, Secret)>, String> {
        let password = Secret::resolve(
            &self.registry_password,
            self.registry_password_file.as_deref(),
        )?;
        match &self.registry_username {
            None if password.is_empty() => Ok(None),
            None => Err("a registry password is set but --registry-username is not".into()),
            Some(u) if u.is_empty() || u.contains(':') => Err(format!(
                "--registry-username must be non-empty and without ':', got {u:?}"
            )),
            Some(_) if password.is_empty() => Err(format!(
                "--registry-username is set but no password: set --registry-password-file or {}",
                Self::PASSWORD_ENV
            )),
            Some(u) => Ok(Some((u.clone(), password))),
        }
    }

    /// The PEM bytes of `--schema-registry-ca-file`, checked to hold at least one usable CA
    /// certificate, or `None` without one. The error names the flag and the file.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        match &self.schema_registry_ca_file {
            None => Ok(None),
            Some(path) => read_ca_pem(path)
                .map(Some)
                .map_err(|reason| format!("{}: {reason}", Self::CA_KEY)),
        }
    }

    /// Adds the problems, if any, to `p`.
    pub fn validate(&self, p: &mut Problems) {
        if let Err(reason) = self.credentials() {
            p.add(Self::KEY, reason);
        }
        if let Some(path) = &self.schema_registry_ca_file
            && let Err(reason) = read_ca_pem(path)
        {
            p.add(Self::CA_KEY, reason);
        }
    }
}

/// The bytes of a PEM file of CA certificates (one or more), checked: readable, holding
/// at least one certificate, each usable as a trust anchor. The error names the file and
/// says why it cannot be used.
pub fn read_ca_pem(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    crate::clickhouse::ca_roots(path, &pem)?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_credentials_come_from_a_file_or_the_environment_and_need_both_parts() {
        let args = |user: Option<&str>, env: &str, file: Option<PathBuf>| RegistryAuthArgs {
            registry_username: user.map(str::to_owned),
            registry_password_file: file,
            registry_password: Secret::from(env),
            schema_registry_ca_file: None,
        };
        assert!(args(None, "", None).credentials().unwrap().is_none());
        let (u, p) = args(Some("svc"), "from-env", None)
            .credentials()
            .unwrap()
            .unwrap();
        assert_eq!((u.as_str(), p.expose()), ("svc", "from-env"));
        let dir = std::env::temp_dir().join(format!("pulse-reg-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let (_, p) = args(Some("svc"), "", Some(file.clone()))
            .credentials()
            .unwrap()
            .unwrap();
        assert_eq!(p.expose(), "from-file");
        let both = args(Some("svc"), "from-env", Some(file)).credentials();
        assert!(both.unwrap_err().contains("set only one"));
        let missing = args(Some("svc"), "", None).credentials().unwrap_err();
        assert!(missing.contains("no password"), "{missing}");
        let no_user = args(None, "from-env", None).credentials().unwrap_err();
        assert!(no_user.contains("--registry-username"), "{no_user}");
        assert!(!no_user.contains("from-env"));
        assert!(
            args(Some("svc"), "", Some(dir.join("missing")))
                .credentials()
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_registry_ca_file_must_hold_usable_certificates_and_errors_name_the_flag() {
        let dir = std::env::temp_dir().join(format!("pulse-reg-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let with = |file: PathBuf| RegistryAuthArgs {
            schema_registry_ca_file: Some(file),
            ..RegistryAuthArgs::default()
        };
        assert!(RegistryAuthArgs::default().ca_pem().unwrap().is_none());
        let problems = |args: &RegistryAuthArgs| {
            let mut p = Problems::default();
            args.validate(&mut p);
            p.into_result().unwrap_err().to_string()
        };
        let missing = with(dir.join("missing.pem"));
        let text = problems(&missing);
        assert!(
            text.contains("--schema-registry-ca-file") && text.contains("cannot read"),
            "{text}"
        );
        let err = missing.ca_pem().unwrap_err();
        assert!(err.contains("--schema-registry-ca-file"), "{err}");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "just text\n").unwrap();
        let text = problems(&with(not_pem));
        assert!(text.contains("holds no PEM certificate"), "{text}");
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let text = problems(&with(garbage));
        assert!(text.contains("not usable as a CA"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
