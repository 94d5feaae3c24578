//! S3 connection settings shared by the Parquet sink and `pulsectl replay`: any S3
//! endpoint (s3s-fs locally, MinIO or AWS S3 in production), bucket, key prefix,
//! credentials, path-style addressing and server-side encryption. Credentials never reach
//! logs and have no default: keys come from files or environment variables (never flags),
//! and with none set the standard AWS credential chain applies (`AWS_*` environment, web
//! identity, instance or container metadata). With `--s3-sse`, every upload (PutObject and
//! multipart create) asks S3 to encrypt the object (SSE-S3 or SSE-KMS).

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

use crate::config::{Problems, Validate};
use crate::secret::{Secret, removed_secret_flag};

/// The environment variables holding the keys when no files are given.
pub const ACCESS_KEY_ENV: &str = "PULSE_S3_ACCESS_KEY";
pub const SECRET_KEY_ENV: &str = "PULSE_S3_SECRET_KEY";

/// Server-side encryption S3 applies to the archive's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum S3Sse {
    /// SSE-S3: keys managed by S3 (`x-amz-server-side-encryption: AES256`).
    #[value(name = "AES256")]
    Aes256,
    /// SSE-KMS: a KMS key (`aws:kms`), the one of `--s3-sse-kms-key-id` or the account's
    /// default `aws/s3` key.
    #[value(name = "aws:kms")]
    AwsKms,
}

impl S3Sse {
    /// The value of the `x-amz-server-side-encryption` header.
    pub fn header_value(self) -> &'static str {
        match self {
            Self::Aes256 => "AES256",
            Self::AwsKms => "aws:kms",
        }
    }
}

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
    /// The access key id from PULSE_S3_ACCESS_KEY (environment only, never a flag).
    /// Empty with no file: the AWS credential chain. Never logged.
    #[arg(skip = Secret::from_env(ACCESS_KEY_ENV))]
    pub access_key: Secret,
    /// File holding the access key id (e.g. a mounted Secret). Or set the key itself in
    /// PULSE_S3_ACCESS_KEY (environment only, no flag; not both). Neither: the AWS
    /// credential chain.
    #[arg(long = "s3-access-key-file", env = "PULSE_S3_ACCESS_KEY_FILE")]
    pub access_key_file: Option<PathBuf>,
    /// The secret access key from PULSE_S3_SECRET_KEY (environment only). Never logged.
    #[arg(skip = Secret::from_env(SECRET_KEY_ENV))]
    pub secret_key: Secret,
    /// File holding the secret access key. Or set the key itself in PULSE_S3_SECRET_KEY
    /// (environment only, no flag; not both).
    #[arg(long = "s3-secret-key-file", env = "PULSE_S3_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Removed: took the access key as a process argument. Refused at start.
    #[arg(long = "s3-access-key", hide = true)]
    pub removed_access_key_flag: Option<Secret>,
    /// Removed: took the secret key as a process argument. Refused at start.
    #[arg(long = "s3-secret-key", hide = true)]
    pub removed_secret_key_flag: Option<Secret>,
    /// Server-side encryption of every object Pulse writes: `AES256` (SSE-S3) or `aws:kms`
    /// (SSE-KMS); unset: the bucket's default encryption.
    #[arg(long = "s3-sse", env = "PULSE_S3_SSE", value_enum)]
    pub sse: Option<S3Sse>,
    /// KMS key (id, ARN or alias) for `--s3-sse aws:kms`; unset: the account's default
    /// `aws/s3` key.
    #[arg(long = "s3-sse-kms-key-id", env = "PULSE_S3_SSE_KMS_KEY_ID")]
    pub sse_kms_key_id: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), as s3s-fs and MinIO need.
    #[arg(long = "s3-path-style", env = "PULSE_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub path_style: bool,
}

impl Default for S3Config {
    /// The flags' defaults, with no keys (the AWS credential chain) and no encryption
    /// setting.
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:9900".into(),
            bucket: "pulse".into(),
            prefix: String::new(),
            region: "us-east-1".into(),
            access_key: Secret::default(),
            access_key_file: None,
            secret_key: Secret::default(),
            secret_key_file: None,
            removed_access_key_flag: None,
            removed_secret_key_flag: None,
            sse: None,
            sse_kms_key_id: None,
            path_style: true,
        }
    }
}

impl S3Config {
    /// The access and secret key, each from its file or its value (see
    /// [`Secret::resolve`]); both empty means the AWS credential chain.
    pub fn credentials(&self) -> Result<(Secret, Secret), String> {
        if self.removed_access_key_flag.is_some() || self.removed_secret_key_flag.is_some() {
            return Err(
                "--s3-access-key / --s3-secret-key were removed (process arguments are visible to every local user): use --s3-access-key-file / --s3-secret-key-file or PULSE_S3_ACCESS_KEY / PULSE_S3_SECRET_KEY"
                    .into(),
            );
        }
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
        if let Some(sse) = self.sse {
            // object_store sends these as `x-amz-server-side-encryption(-aws-kms-key-id)`
            // on PutObject and CreateMultipartUpload (its encryption config keys are only
            // reachable by name).
            b = b.with_config(
                "aws_server_side_encryption".parse::<AmazonS3ConfigKey>()?,
                sse.header_value(),
            );
            if let Some(key) = &self.sse_kms_key_id {
                b = b.with_config("aws_sse_kms_key_id".parse::<AmazonS3ConfigKey>()?, key);
            }
        }
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
        removed_secret_flag(
            p,
            "--s3-access-key",
            self.removed_access_key_flag.is_some(),
            "--s3-access-key-file or the environment variable PULSE_S3_ACCESS_KEY",
        );
        removed_secret_flag(
            p,
            "--s3-secret-key",
            self.removed_secret_key_flag.is_some(),
            "--s3-secret-key-file or the environment variable PULSE_S3_SECRET_KEY",
        );
        let removed =
            self.removed_access_key_flag.is_some() || self.removed_secret_key_flag.is_some();
        if let (false, Err(reason)) = (removed, self.credentials()) {
            p.add(
                "--s3-access-key-file / --s3-secret-key-file (or PULSE_S3_ACCESS_KEY / PULSE_S3_SECRET_KEY)",
                reason,
            );
        }
        match (&self.sse, &self.sse_kms_key_id) {
            (Some(S3Sse::AwsKms), Some(key))
                if key.trim().is_empty() || key.contains(char::is_control) =>
            {
                p.add(
                    "--s3-sse-kms-key-id / PULSE_S3_SSE_KMS_KEY_ID",
                    "must be a KMS key id, ARN or alias, got an empty or unprintable value",
                )
            }
            (Some(S3Sse::Aes256) | None, Some(_)) => p.add(
                "--s3-sse-kms-key-id / PULSE_S3_SSE_KMS_KEY_ID",
                "a KMS key needs --s3-sse aws:kms",
            ),
            _ => {}
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
            removed_access_key_flag: None,
            removed_secret_key_flag: None,
            sse: None,
            sse_kms_key_id: None,
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
    fn keys_come_from_files_or_the_environment_never_both_and_always_in_pairs() {
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

        // The key values come from the environment (`PULSE_S3_ACCESS_KEY`, read at parse
        // time); set here directly so the test does not change the process environment.
        let mixed = S3Config {
            access_key: "AK-ENV".into(),
            ..parse(&["--s3-secret-key-file", s])
        };
        let (ak, sk) = mixed.credentials().unwrap();
        assert_eq!((ak.expose(), sk.expose()), ("AK-ENV", "SK-FILE"));

        let both = S3Config {
            access_key: "AK-ENV".into(),
            secret_key: "SK-ENV".into(),
            ..parse(&["--s3-secret-key-file", s])
        };
        let text = crate::config::validate_all(&[&both])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("PULSE_S3_SECRET_KEY_FILE") && text.contains("set only one"),
            "{text}"
        );
        assert!(!text.contains("SK-"), "{text}");
        let err = both.object_store().unwrap_err().to_string();
        assert!(err.contains("set only one"), "{err}");

        let half = S3Config {
            access_key: "AK-ENV".into(),
            ..parse(&[])
        };
        let text = crate::config::validate_all(&[&half])
            .unwrap_err()
            .to_string();
        assert!(text.contains("set both"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_removed_key_flags_are_refused_naming_the_replacement_not_the_value() {
        let old = parse(&["--s3-access-key", "AK-ARG", "--s3-secret-key=SK-ARG"]);
        let text = crate::config::validate_all(&[&old])
            .unwrap_err()
            .to_string();
        for expected in [
            "--s3-access-key: this flag was removed",
            "--s3-access-key-file or the environment variable PULSE_S3_ACCESS_KEY",
            "--s3-secret-key: this flag was removed",
            "--s3-secret-key-file or the environment variable PULSE_S3_SECRET_KEY",
        ] {
            assert!(text.contains(expected), "{expected} missing in {text}");
        }
        assert!(!text.contains("-ARG"), "{text}");
        let err = old.object_store().unwrap_err().to_string();
        assert!(err.contains("were removed"), "{err}");
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(
            !help.contains("--s3-access-key ") && !help.contains("--s3-secret-key "),
            "{help}"
        );
        for env in [ACCESS_KEY_ENV, SECRET_KEY_ENV] {
            assert!(help.contains(&format!("itself in {env}")), "{help}");
        }
    }

    #[test]
    fn server_side_encryption_is_parsed_and_checked() {
        let sse_s3 = parse(&["--s3-sse", "AES256"]);
        assert_eq!(sse_s3.sse, Some(S3Sse::Aes256));
        crate::config::validate_all(&[&sse_s3]).unwrap();
        sse_s3.object_store().unwrap();
        let kms = parse(&["--s3-sse", "aws:kms", "--s3-sse-kms-key-id", "alias/pulse"]);
        assert_eq!(kms.sse.map(S3Sse::header_value), Some("aws:kms"));
        crate::config::validate_all(&[&kms]).unwrap();
        kms.object_store().unwrap();
        let stray_key = parse(&["--s3-sse", "AES256", "--s3-sse-kms-key-id", "k"]);
        let text = crate::config::validate_all(&[&stray_key])
            .unwrap_err()
            .to_string();
        assert!(text.contains("needs --s3-sse aws:kms"), "{text}");
        let bad = <Cli as clap::Parser>::try_parse_from(["x", "--s3-sse", "aes"]).unwrap_err();
        assert!(bad.to_string().contains("AES256"), "{bad}");
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
