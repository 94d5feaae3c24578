//! The credentials a schema-registry client (ingest, the processor, `pulsectl schemas`
//! and `replay`) sends: one set of flags for every one of them.

use std::path::PathBuf;

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
}

impl RegistryAuthArgs {
    /// The environment variable holding the password when no file is given.
    pub const PASSWORD_ENV: &'static str = "PULSE_REGISTRY_PASSWORD";
    const KEY: &'static str =
        "--registry-username / --registry-password-file / PULSE_REGISTRY_PASSWORD";

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

    /// Adds the problem, if any, to `p`.
    pub fn validate(&self, p: &mut Problems) {
        if let Err(reason) = self.credentials() {
            p.add(Self::KEY, reason);
        }
    }
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
}
