//! S3 connection settings shared by the Parquet sink and `pulsectl replay`: any S3
//! endpoint (s3s-fs locally, MinIO or AWS S3 in production), bucket, key prefix,
//! credentials and path-style addressing. Credentials never reach logs and have no
//! default: keys come from their flags, environment variables or files, and with none set
//! the standard AWS credential chain applies (`AWS_*` environment, web identity, instance
//! or container metadata).

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

use crate::config::{Problems, Validate};
use crate::secret::Secret;

#[derive(Debug, Clone, clap::Args)]
pub struct S3Config {
    /// S3 endpoint URL; empty means AWS's regional endpoint.
    #[arg(
        long = "s3-endpoint",
        env = "PULSE_S3_ENDPOINT",
        default_value = "http://127.0.0.1:9900"
    )]
    pub endpoint: String,
    #[arg(long = "s3-bucket", env = "PULSE_S3_BUCKET", default_value = "pulse")]
    pub bucket: String,
    /// Key prefix under which Pulse writes (no leading or trailing slash).
    #[arg(long = "s3-prefix", env = "PULSE_S3_PREFIX", default_value = "")]
    pub prefix: String,
    #[arg(
        long = "s3-region",
        env = "PULSE_S3_REGION",
        default_value = "us-east-1"
    )]
    pub region: String,
    /// Access key id; prefer --s3-access-key-file or the environment variable. Empty (the
    /// default) with no file: the AWS credential chain. Never logged.
    #[arg(
        long = "s3-access-key",
        env = "PULSE_S3_ACCESS_KEY",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub access_key: Secret,
    /// File holding the access key id (e.g. a mounted Secret); not together with the key.
    #[arg(long = "s3-access-key-file", env = "PULSE_S3_ACCESS_KEY_FILE")]
    pub access_key_file: Option<PathBuf>,
    /// Secret access key; prefer --s3-secret-key-file or the environment variable. Never
    /// logged.
    #[arg(
        long = "s3-secret-key",
        env = "PULSE_S3_SECRET_KEY",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub secret_key: Secret,
    /// File holding the secret access key; not together with the key.
    #[arg(long = "s3-secret-key-file", env = "PULSE_S3_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Path-style addressing (`endpoint/bucket/key`), as s3s-fs and MinIO need.
    #[arg(long = "s3-path-style", env = "PULSE_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub path_style: bool,
}

impl S3Config {
    /// The access and secret key, each from its file or its value (see
    /// [`Secret::resolve`]); both empty means the AWS credential chain.
    pub fn credentials(&self) -> Result<(Secret, Secret), String> {
        let access = Secret::resolve(&self.access_key, self.access_key_file.as_deref())
            .map_err(|e| format!("--s3-access-key-file / PULSE_S3_ACCESS_KEY_FILE: {e}"))?;
        let secret = Secret::resolve(&self.secret_key, self.secret_key_file.as_deref())
            .map_err(|e| format!("--s3-secret-key-file / PULSE_S3_SECRET_KEY_FILE: {e}"))?;
        if access.is_empty() != secret.is_empty() {
            return Err(
                "set both the S3 access key and the secret key (flag, environment or file), or neither for the AWS credential chain"
                    .into(),
            );
        }
        Ok((access, secret))
    }

    /// The object store for the bucket.
    pub fn object_store(&self) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
        let (access, secret) =
            self.credentials()
                .map_err(|reason| object_store::Error::Generic {
                    store: "S3",
                    source: reason.into(),
                })?;
        let mut b = if access.is_empty() {
            // The AWS credential chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, web
            // identity (IRSA), ECS/EKS container credentials or instance metadata.
            AmazonS3Builder::from_env()
        } else {
            AmazonS3Builder::new()
                .with_access_key_id(access.expose())
                .with_secret_access_key(secret.expose())
        };
        b = b
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_virtual_hosted_style_request(!self.path_style);
        if !self.endpoint.is_empty() {
            b = b
                .with_endpoint(&self.endpoint)
                .with_allow_http(self.endpoint.starts_with("http://"));
        }
        Ok(Arc::new(b.build()?))
    }

    /// `key` under the configured prefix.
    pub fn key(&self, key: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{key}", self.prefix))
        }
    }
}

impl Validate for S3Config {
    fn validate(&self, p: &mut Problems) {
        if let Err(reason) = self.credentials() {
            p.add(
                "--s3-access-key / --s3-secret-key (or their -file / PULSE_S3_*_FILE forms)",
                reason,
            );
        }
        p.check(
            self.endpoint.is_empty()
                || self.endpoint.starts_with("http://")
                || self.endpoint.starts_with("https://"),
            "--s3-endpoint / PULSE_S3_ENDPOINT",
            format!("must be empty or an http(s) URL, got {:?}", self.endpoint),
        );
        p.check(
            (3..=63).contains(&self.bucket.len()),
            "--s3-bucket / PULSE_S3_BUCKET",
            format!(
                "bucket names have 3 to 63 characters, got {:?}",
                self.bucket
            ),
        );
        p.check(
            !self.prefix.starts_with('/') && !self.prefix.ends_with('/'),
            "--s3-prefix / PULSE_S3_PREFIX",
            format!("no leading or trailing slash, got {:?}", self.prefix),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> S3Config {
        S3Config {
            endpoint: "http://127.0.0.1:9900".into(),
            bucket: "pulse".into(),
            prefix: "archive".into(),
            region: "us-east-1".into(),
            access_key: "AKID".into(),
            secret_key: "top-secret".into(),
            access_key_file: None,
            secret_key_file: None,
            path_style: true,
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        s3: S3Config,
    }

    fn parse(args: &[&str]) -> S3Config {
        <Cli as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .s3
    }

    #[test]
    fn there_are_no_default_keys() {
        let s3 = parse(&[]);
        assert!(s3.access_key.is_empty() && s3.secret_key.is_empty());
        let (access, secret) = s3.credentials().unwrap();
        assert!(access.is_empty() && secret.is_empty());
        crate::config::validate_all(&[&s3]).unwrap();
        // The AWS credential chain: building the store needs no key.
        s3.object_store().unwrap();
    }

    #[test]
    fn keys_come_from_files_or_values_never_both_and_always_in_pairs() {
        let dir = std::env::temp_dir().join(format!("pulse-s3-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let access = dir.join("access");
        std::fs::write(&access, "AK-FILE\n").unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "SK-FILE").unwrap();
        let (a, s) = [access.to_str().unwrap(), secret.to_str().unwrap()].into();

        let files = parse(&["--s3-access-key-file", a, "--s3-secret-key-file", s]);
        let (ak, sk) = files.credentials().unwrap();
        assert_eq!((ak.expose(), sk.expose()), ("AK-FILE", "SK-FILE"));
        crate::config::validate_all(&[&files]).unwrap();
        files.object_store().unwrap();

        let mixed = parse(&["--s3-access-key", "AK", "--s3-secret-key-file", s]);
        let (ak, sk) = mixed.credentials().unwrap();
        assert_eq!((ak.expose(), sk.expose()), ("AK", "SK-FILE"));

        let both = parse(&[
            "--s3-secret-key",
            "SK",
            "--s3-secret-key-file",
            s,
            "--s3-access-key",
            "AK",
        ]);
        let text = crate::config::validate_all(&[&both])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("PULSE_S3_SECRET_KEY_FILE") && text.contains("set only one"),
            "{text}"
        );
        assert!(!text.contains("SK"), "{text}");
        let err = both.object_store().unwrap_err().to_string();
        assert!(err.contains("set only one"), "{err}");

        let half = parse(&["--s3-access-key", "AK"]);
        let text = crate::config::validate_all(&[&half])
            .unwrap_err()
            .to_string();
        assert!(text.contains("set both"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_go_under_the_prefix() {
        assert_eq!(
            cfg().key("events/dt=2026-11-28/x.parquet").as_ref(),
            "archive/events/dt=2026-11-28/x.parquet"
        );
    }

    #[test]
    fn debug_output_never_shows_credentials() {
        let text = format!("{:?}", cfg());
        assert!(
            !text.contains("top-secret") && !text.contains("AKID"),
            "{text}"
        );
    }

    #[test]
    fn bad_settings_are_all_reported() {
        let bad = S3Config {
            endpoint: "s3.local".into(),
            bucket: "x".into(),
            prefix: "/a/".into(),
            ..cfg()
        };
        assert_eq!(crate::config::validate_all(&[&bad]).unwrap_err().0.len(), 3);
    }
}
