//! S3 connection settings shared by the Parquet sink and `pulsectl replay`: any S3
//! endpoint (s3s-fs locally, MinIO or AWS S3 in production), bucket, key prefix,
//! credentials and path-style addressing. Credentials never reach logs.

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
    #[arg(
        long = "s3-access-key",
        env = "PULSE_S3_ACCESS_KEY",
        default_value = "pulse-dev-access",
        hide_env_values = true
    )]
    pub access_key: Secret,
    /// Secret key; prefer the environment variable. Never logged.
    #[arg(
        long = "s3-secret-key",
        env = "PULSE_S3_SECRET_KEY",
        default_value = "pulse-dev-secret",
        hide_env_values = true
    )]
    pub secret_key: Secret,
    /// Path-style addressing (`endpoint/bucket/key`), as s3s-fs and MinIO need.
    #[arg(long = "s3-path-style", env = "PULSE_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub path_style: bool,
}

impl S3Config {
    /// The object store for the bucket.
    pub fn object_store(&self) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_access_key_id(self.access_key.expose())
            .with_secret_access_key(self.secret_key.expose())
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
            path_style: true,
        }
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
