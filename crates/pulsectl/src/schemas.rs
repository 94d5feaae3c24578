//! `pulsectl schemas register|check`: registers Pulse's record schemas (from `proto/`)
//! with the schema registry under `<topic>-value`, and checks the current protos against
//! the last registered versions, failing with the registry's reasons on a break.

use pulse_platform::clickhouse::error_chain as chain;
use std::path::{Path, PathBuf};

use pulse_contracts::schemas::{RecordSchema, TOPIC_SCHEMAS, value_subject};
use serde_json::{Value, json};

use crate::Error;
use pulse_platform::registry_auth::RegistryAuthArgs;

#[derive(Debug, clap::Subcommand)]
pub enum SchemasCommand {
    /// Register every Pulse record schema (an identical schema keeps its id).
    Register(SchemaArgs),
    /// Check the schemas against the latest registered versions; exits 1 on a break.
    Check(SchemaArgs),
}

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// Schema registry base URL.
    #[arg(
        long = "schema-registry-url",
        env = "PULSE_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub url: String,
    #[command(flatten)]
    pub registry_auth: RegistryAuthArgs,
    /// Read the .proto files from this folder (a `proto/` tree) instead of the ones built
    /// into pulsectl.
    #[arg(long = "proto-dir")]
    pub proto_dir: Option<PathBuf>,
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("schema registry credentials: {0}")]
    Credentials(String),
    /// The CA file cannot be used, or the HTTP client cannot be built with it.
    #[error("schema registry client: {0}")]
    Client(String),
    /// The error's sources are printed too: a TLS failure (e.g. an unknown issuer) is in
    /// them, not in reqwest's own message.
    #[error("schema registry at {url}: {}", chain(.source))]
    Http { url: String, source: reqwest::Error },
    #[error("subject {subject}: registry answered {status}: {message}")]
    Registry {
        subject: String,
        status: u16,
        message: String,
    },
    #[error("subject {subject} is not compatible with its latest registered version:\n  {}", .reasons.join("\n  "))]
    Incompatible {
        subject: String,
        reasons: Vec<String>,
    },
}

fn source_of(schema: &RecordSchema, dir: Option<&Path>) -> Result<String, SchemaError> {
    match dir {
        None => Ok(schema.file.source.to_owned()),
        Some(d) => {
            let path = d.join(schema.file.path);
            std::fs::read_to_string(&path).map_err(|source| SchemaError::Read { path, source })
        }
    }
}

/// The HTTP client for the registry: it trusts `--schema-registry-ca-file`, if given, in
/// addition to the system's roots.
pub fn registry_client(auth: &RegistryAuthArgs) -> Result<reqwest::Client, SchemaError> {
    let mut builder = reqwest::Client::builder();
    if let Some(pem) = auth.ca_pem().map_err(SchemaError::Client)? {
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            SchemaError::Client(format!("{}: {}", RegistryAuthArgs::CA_KEY, chain(&e)))
        })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| SchemaError::Client(chain(&e)))
}

/// Adds the basic-auth header of `auth` to a registry request (none without a user).
fn with_credentials(
    req: reqwest::RequestBuilder,
    auth: &RegistryAuthArgs,
) -> Result<reqwest::RequestBuilder, String> {
    Ok(match auth.credentials()? {
        None => req,
        Some((user, password)) => req.basic_auth(user, Some(password.expose())),
    })
}

async fn call(
    client: &reqwest::Client,
    auth: &RegistryAuthArgs,
    url: &str,
    subject: &str,
    body: &Value,
) -> Result<(u16, Value), SchemaError> {
    let resp = with_credentials(client.post(url), auth)
        .map_err(SchemaError::Credentials)?
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .json(body)
        .send()
        .await
        .map_err(|source| SchemaError::Http {
            url: url.to_owned(),
            source,
        })?;
    let status = resp.status().as_u16();
    let value: Value = resp.json().await.unwrap_or(Value::Null);
    if status >= 400 && status != 404 {
        return Err(SchemaError::Registry {
            subject: subject.to_owned(),
            status,
            message: value["message"].as_str().unwrap_or("no message").to_owned(),
        });
    }
    Ok((status, value))
}

/// Registers every topic's schema; returns (subject, id) pairs.
pub async fn register(args: &SchemaArgs) -> Result<Vec<(String, u64)>, SchemaError> {
    let client = registry_client(&args.registry_auth)?;
    let base = args.url.trim_end_matches('/');
    let mut out = Vec::new();
    for (topic, schema) in TOPIC_SCHEMAS {
        let subject = value_subject(topic);
        let text = source_of(schema, args.proto_dir.as_deref())?;
        let body = json!({ "schemaType": "PROTOBUF", "schema": text });
        let url = format!("{base}/subjects/{subject}/versions");
        let (_, value) = call(&client, &args.registry_auth, &url, &subject, &body).await?;
        out.push((subject, value["id"].as_u64().unwrap_or(0)));
    }
    Ok(out)
}

/// Checks every topic's schema against the latest registered version. A subject that is
/// not registered yet passes.
pub async fn check(args: &SchemaArgs) -> Result<Vec<(String, &'static str)>, SchemaError> {
    let client = registry_client(&args.registry_auth)?;
    let base = args.url.trim_end_matches('/');
    let mut out = Vec::new();
    for (topic, schema) in TOPIC_SCHEMAS {
        let subject = value_subject(topic);
        let text = source_of(schema, args.proto_dir.as_deref())?;
        let body = json!({ "schemaType": "PROTOBUF", "schema": text });
        let url = format!("{base}/compatibility/subjects/{subject}/versions/latest?verbose=true");
        let (status, value) = call(&client, &args.registry_auth, &url, &subject, &body).await?;
        if status == 404 {
            out.push((subject, "not registered yet"));
            continue;
        }
        if value["is_compatible"].as_bool() != Some(true) {
            let reasons = value["messages"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            return Err(SchemaError::Incompatible { subject, reasons });
        }
        out.push((subject, "compatible"));
    }
    Ok(out)
}

pub async fn run(command: SchemasCommand) -> Result<(), Error> {
    match command {
        SchemasCommand::Register(args) => {
            for (subject, id) in register(&args).await? {
                println!("{subject:<36} id {id}");
            }
        }
        SchemasCommand::Check(args) => {
            for (subject, state) in check(&args).await? {
                println!("{subject:<36} {state}");
            }
        }
    }
    Ok(())
}
