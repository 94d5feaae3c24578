//! The REST API: the Confluent Schema Registry subset that Pulse and standard clients use.
//! Handlers read the local registry state; writes go through the log (`SchemaLog`).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::{self, Access};
use crate::compat::Level;
use crate::error::ApiError;
use crate::log::{LogError, SchemaLog};
use crate::store::{Command, Outcome, Reference, SchemaContent, SchemaType, VersionEntry};

/// Content type of every answer.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The routes, behind authentication (`auth`) and the tracing/metrics middleware (which
/// therefore also counts refused requests).
pub fn router(log: SchemaLog, access: Access) -> Router {
    Router::new()
        .route("/", get(|| async { reply(json!({})) }))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route("/subjects/{subject}/versions/{version}", get(get_version))
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route("/schemas/ids/{id}", get(get_schema_by_id))
        .route("/schemas/ids/{id}/schema", get(get_raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(get_schema_versions))
        .route(
            "/schemas/types",
            get(|| async { reply(json!(["AVRO", "JSON", "PROTOBUF"])) }),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatibility),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(compatibility_all),
        )
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .layer(middleware::from_fn_with_state(access, auth::middleware))
        .layer(middleware::from_fn(pulse_platform::http::observe))
        .with_state(log)
}

fn reply(body: Value) -> Response {
    let mut resp = body.to_string().into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    resp
}

/// Parses a JSON body, answering Confluent-shaped errors for malformed bodies.
fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::BadBody)
}

#[derive(Debug, Deserialize)]
struct SchemaRequest {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<SchemaType>,
    #[serde(default)]
    references: Vec<Reference>,
}

impl SchemaRequest {
    fn content(self) -> SchemaContent {
        SchemaContent {
            schema_type: self.schema_type.unwrap_or_default(),
            schema: self.schema,
            references: self.references,
        }
    }
}

/// Boolean query flags. Clients send `true`, `True`, `1` and friends; anything else
/// (and absence) is false. Unknown parameters (`normalize`, `format`, …) are ignored.
#[derive(Debug, Default)]
struct Flags {
    deleted: bool,
    permanent: bool,
    verbose: bool,
    default_to_global: bool,
}

impl From<HashMap<String, String>> for Flags {
    fn from(q: HashMap<String, String>) -> Self {
        let on = |k: &str| {
            q.get(k)
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
        };
        Flags {
            deleted: on("deleted"),
            permanent: on("permanent"),
            verbose: on("verbose"),
            default_to_global: on("defaultToGlobal"),
        }
    }
}

fn read(log: &SchemaLog) -> std::sync::RwLockReadGuard<'_, crate::store::Registry> {
    log.registry().read().unwrap_or_else(|e| e.into_inner())
}

fn schema_json(content: &SchemaContent, mut obj: serde_json::Map<String, Value>) -> Value {
    obj.insert("schema".into(), Value::String(content.schema.clone()));
    // Confluent omits schemaType for AVRO.
    if content.schema_type != SchemaType::Avro {
        obj.insert(
            "schemaType".into(),
            Value::String(content.schema_type.to_string()),
        );
    }
    if !content.references.is_empty() {
        obj.insert("references".into(), json!(content.references));
    }
    Value::Object(obj)
}

/// A subject's version with its schema: `{"subject", "version", "id", "schema", …}`.
fn version_json(subject: &str, v: VersionEntry, content: &SchemaContent) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("subject".into(), json!(subject));
    obj.insert("version".into(), json!(v.version));
    obj.insert("id".into(), json!(v.id));
    schema_json(content, obj)
}

async fn propose(log: &SchemaLog, command: Command) -> Result<Outcome, ApiError> {
    log.propose(command).await.map_err(|e| match e {
        LogError::Timeout(_) => ApiError::Timeout(e),
        other => ApiError::Store(other),
    })
}

/// What the command would answer now: parsing and compatibility checks run on the
/// blocking pool under the read lock, so they hold up neither the async runtime nor other
/// readers.
async fn preview(log: &SchemaLog, command: &Command) -> Outcome {
    let registry = log.registry().clone();
    let command = command.clone();
    tokio::task::spawn_blocking(move || {
        registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .dry_run(&command)
    })
    .await
    .unwrap_or_else(|e| Outcome::InvalidSchema(format!("internal error while checking: {e}")))
}

async fn register(
    State(log): State<SchemaLog>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let content = parse_body::<SchemaRequest>(&body)?.content();
    let command = Command::Register {
        subject: subject.clone(),
        content,
    };
    // Answer from local state when the outcome cannot change by writing.
    let preview = preview(&log, &command).await;
    let outcome = match preview {
        Outcome::Registered { .. } => propose(&log, command).await?,
        other => other,
    };
    match outcome {
        Outcome::Registered { id, version } => {
            tracing::info!(subject, id, version, "schema registered");
            Ok(reply(json!({ "id": id })))
        }
        Outcome::Existing { id, .. } => Ok(reply(json!({ "id": id }))),
        Outcome::Incompatible(reasons) => {
            tracing::info!(subject, ?reasons, "incompatible schema refused");
            Err(ApiError::Incompatible { subject, reasons })
        }
        Outcome::InvalidSchema(reason) => Err(ApiError::InvalidSchema(reason)),
        other => Err(ApiError::UnexpectedOutcome(Box::new(other))),
    }
}

async fn lookup(
    State(log): State<SchemaLog>,
    Path(subject): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let flags = Flags::from(query);
    let content = parse_body::<SchemaRequest>(&body)?.content();
    let reg = read(&log);
    if reg.versions(&subject, flags.deleted).is_none() {
        return Err(ApiError::SubjectNotFound(subject));
    }
    let v = reg.lookup(&subject, &content).ok_or_else(|| {
        ApiError::SchemaNotFound(format!("no version of subject '{subject}' has this schema"))
    })?;
    Ok(reply(version_json(&subject, v, &content)))
}

async fn list_subjects(
    State(log): State<SchemaLog>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let flags = Flags::from(query);
    reply(json!(read(&log).subjects(flags.deleted)))
}

async fn list_versions(
    State(log): State<SchemaLog>,
    Path(subject): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let flags = Flags::from(query);
    let versions = read(&log)
        .versions(&subject, flags.deleted)
        .ok_or(ApiError::SubjectNotFound(subject))?;
    Ok(reply(json!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>()
    )))
}

/// Parses `latest`, `-1` or a positive version number.
fn parse_version(text: &str) -> Result<Option<u32>, ApiError> {
    match text {
        "latest" | "-1" => Ok(None),
        n => match n.parse::<u32>() {
            Ok(v) if (1..=i32::MAX as u32).contains(&v) => Ok(Some(v)),
            _ => Err(ApiError::InvalidVersion(n.to_owned())),
        },
    }
}

fn find_version(
    log: &SchemaLog,
    subject: &str,
    version: &str,
    deleted: bool,
) -> Result<VersionEntry, ApiError> {
    let wanted = parse_version(version)?;
    let versions = read(log)
        .versions(subject, deleted)
        .ok_or_else(|| ApiError::SubjectNotFound(subject.to_owned()))?;
    match wanted {
        None => versions.last().copied(),
        Some(n) => versions.iter().find(|v| v.version == n).copied(),
    }
    .ok_or_else(|| ApiError::VersionNotFound(version.to_owned()))
}

async fn get_version(
    State(log): State<SchemaLog>,
    Path((subject, version)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let flags = Flags::from(query);
    let v = find_version(&log, &subject, &version, flags.deleted)?;
    let content = content_of(&log, v.id)?;
    Ok(reply(version_json(&subject, v, &content)))
}

async fn get_version_schema(
    State(log): State<SchemaLog>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = find_version(&log, &subject, &version, false)?;
    let content = content_of(&log, v.id)?;
    Ok(content.schema.into_response())
}

/// The schema stored under `id`, or 40403.
fn content_of(log: &SchemaLog, id: u32) -> Result<SchemaContent, ApiError> {
    read(log)
        .schema(id)
        .map(|s| s.content.clone())
        .ok_or_else(|| ApiError::SchemaNotFound(format!("id {id}")))
}

fn parse_id(id: &str) -> Result<u32, ApiError> {
    id.parse()
        .map_err(|_| ApiError::SchemaNotFound(format!("{id:?} is not a schema id")))
}

async fn get_schema_by_id(
    State(log): State<SchemaLog>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let content = content_of(&log, id)?;
    Ok(reply(schema_json(&content, serde_json::Map::new())))
}

async fn get_raw_schema_by_id(
    State(log): State<SchemaLog>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let content = content_of(&log, id)?;
    Ok(content.schema.into_response())
}

async fn get_schema_versions(
    State(log): State<SchemaLog>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let reg = read(&log);
    if reg.schema(id).is_none() {
        return Err(ApiError::SchemaNotFound(format!("id {id}")));
    }
    let usages: Vec<Value> = reg
        .usages(id)
        .into_iter()
        .map(|(subject, version)| json!({ "subject": subject, "version": version }))
        .collect();
    Ok(reply(Value::Array(usages)))
}

async fn delete_subject(
    State(log): State<SchemaLog>,
    Path(subject): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let flags = Flags::from(query);
    // Checked here, not in the state machine (which must decide logs of earlier releases
    // as they did).
    if flags.permanent
        && let Some((by, version)) = read(&log).referenced_by(&subject)
    {
        return Err(ApiError::ReferenceExists {
            subject,
            by,
            version,
        });
    }
    let command = Command::DeleteSubject {
        subject: subject.clone(),
        permanent: flags.permanent,
    };
    let preview = preview(&log, &command).await;
    let outcome = match preview {
        Outcome::Deleted(_) => propose(&log, command).await?,
        other => other,
    };
    match outcome {
        Outcome::Deleted(versions) => {
            tracing::info!(
                subject,
                permanent = flags.permanent,
                ?versions,
                "subject deleted"
            );
            Ok(reply(json!(versions)))
        }
        Outcome::NotSoftDeleted(s) => Err(ApiError::SubjectNotSoftDeleted(s)),
        Outcome::SubjectNotFound(s) => Err(ApiError::SubjectNotFound(s)),
        other => Err(ApiError::UnexpectedOutcome(Box::new(other))),
    }
}

#[derive(Debug, Serialize)]
struct CompatibilityAnswer {
    is_compatible: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<String>>,
}

fn compatibility_answer(reasons: Vec<String>, verbose: bool) -> Response {
    reply(json!(CompatibilityAnswer {
        is_compatible: reasons.is_empty(),
        messages: verbose.then_some(reasons),
    }))
}

async fn compatibility(
    State(log): State<SchemaLog>,
    Path((subject, version)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let flags = Flags::from(query);
    let content = parse_body::<SchemaRequest>(&body)?.content();
    let v = find_version(&log, &subject, &version, false)?;
    let reasons = check_compatibility(&log, subject, content, Some(v.version)).await?;
    Ok(compatibility_answer(reasons, flags.verbose))
}

async fn compatibility_all(
    State(log): State<SchemaLog>,
    Path(subject): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let flags = Flags::from(query);
    let content = parse_body::<SchemaRequest>(&body)?.content();
    let reasons = check_compatibility(&log, subject, content, None).await?;
    Ok(compatibility_answer(reasons, flags.verbose))
}

/// Parsing and the compatibility check run on the blocking pool (like [`preview`]).
async fn check_compatibility(
    log: &SchemaLog,
    subject: String,
    content: SchemaContent,
    version: Option<u32>,
) -> Result<Vec<String>, ApiError> {
    let registry = log.registry().clone();
    tokio::task::spawn_blocking(move || {
        registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .check_compatibility(&subject, &content, version)
    })
    .await
    .map_err(|e| ApiError::InvalidSchema(format!("internal error while checking: {e}")))?
    .map_err(ApiError::InvalidSchema)
}

#[derive(Debug, Deserialize)]
struct ConfigRequest {
    compatibility: String,
}

async fn get_global_config(State(log): State<SchemaLog>) -> Response {
    reply(json!({ "compatibilityLevel": read(&log).global_level().to_string() }))
}

async fn get_subject_config(
    State(log): State<SchemaLog>,
    Path(subject): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let flags = Flags::from(query);
    let reg = read(&log);
    match reg.subject_level(&subject) {
        Some(l) => Ok(reply(json!({ "compatibilityLevel": l.to_string() }))),
        None if flags.default_to_global => Ok(reply(
            json!({ "compatibilityLevel": reg.global_level().to_string() }),
        )),
        None => Err(ApiError::SubjectLevelNotConfigured(subject)),
    }
}

async fn set_config(
    log: &SchemaLog,
    subject: Option<String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let req = parse_body::<ConfigRequest>(body)?;
    let level = req
        .compatibility
        .parse::<Level>()
        .map_err(ApiError::InvalidLevel)?;
    // Setting the level already in force appends nothing to the log (keeps it bounded).
    let current = {
        let reg = read(log);
        match &subject {
            Some(s) => reg.subject_level(s),
            None => reg.global_level_setting(),
        }
    };
    if current == Some(level) {
        return Ok(reply(json!({ "compatibility": level.to_string() })));
    }
    match propose(
        log,
        Command::SetConfig {
            subject,
            level: req.compatibility,
        },
    )
    .await?
    {
        Outcome::ConfigSet(l) => Ok(reply(json!({ "compatibility": l.to_string() }))),
        Outcome::InvalidLevel(e) => Err(ApiError::InvalidLevel(e)),
        other => Err(ApiError::UnexpectedOutcome(Box::new(other))),
    }
}

async fn put_global_config(
    State(log): State<SchemaLog>,
    body: Bytes,
) -> Result<Response, ApiError> {
    set_config(&log, None, &body).await
}

async fn put_subject_config(
    State(log): State<SchemaLog>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    set_config(&log, Some(subject), &body).await
}

async fn delete_subject_config(
    State(log): State<SchemaLog>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    if read(&log).subject_level(&subject).is_none() {
        return Err(ApiError::SubjectLevelNotConfigured(subject));
    }
    match propose(
        &log,
        Command::DeleteConfig {
            subject: subject.clone(),
        },
    )
    .await?
    {
        Outcome::ConfigDeleted(l) => Ok(reply(json!({ "compatibilityLevel": l.to_string() }))),
        Outcome::SubjectNotFound(_) => Err(ApiError::SubjectLevelNotConfigured(subject)),
        other => Err(ApiError::UnexpectedOutcome(Box::new(other))),
    }
}
