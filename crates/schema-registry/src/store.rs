//! The registry's state machine. Every replica applies the same commands from the
//! `_schemas` log in the same order, so every replica computes the same ids, versions
//! and outcomes: ids are assigned here, at apply time, from log order — never by the
//! replica that proposed the command. Applying a command twice (same request id) is a
//! no-op. This module knows nothing of Kafka or HTTP.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::compat::{self, Level, ParsedSchema, SchemaSource};

/// Schema formats. Compatibility is checked for PROTOBUF only; AVRO and JSON schemas
/// must be valid JSON and are stored as given (see README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum SchemaType {
    #[default]
    Avro,
    Protobuf,
    Json,
}

impl std::fmt::Display for SchemaType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SchemaType::Avro => "AVRO",
            SchemaType::Protobuf => "PROTOBUF",
            SchemaType::Json => "JSON",
        })
    }
}

/// A reference from one schema to another registered schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Reference {
    /// The import name used in the referring schema.
    pub name: String,
    pub subject: String,
    pub version: u32,
}

/// A schema as submitted: type, text, references.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SchemaContent {
    #[serde(rename = "schemaType", default)]
    pub schema_type: SchemaType,
    pub schema: String,
    #[serde(default)]
    pub references: Vec<Reference>,
}

/// A command in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Register {
        subject: String,
        content: SchemaContent,
    },
    DeleteSubject {
        subject: String,
        permanent: bool,
    },
    SetConfig {
        subject: Option<String>,
        level: String,
    },
    DeleteConfig {
        subject: String,
    },
}

/// The deterministic result of applying a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Registered {
        id: u32,
        version: u32,
    },
    /// The identical schema is already a live version of the subject.
    Existing {
        id: u32,
        version: u32,
    },
    Incompatible(Vec<String>),
    InvalidSchema(String),
    InvalidLevel(String),
    SubjectNotFound(String),
    /// A permanent delete of a subject that was not soft-deleted first.
    NotSoftDeleted(String),
    Deleted(Vec<u32>),
    ConfigSet(Level),
    ConfigDeleted(Level),
    /// The request id was applied before (a redelivered record).
    AlreadyApplied,
}

/// One stored schema, shared by every subject version with the same content.
#[derive(Debug, Clone)]
pub struct StoredSchema {
    pub content: SchemaContent,
    parsed: Option<ParsedSchema>,
}

/// One version of a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionEntry {
    pub version: u32,
    pub id: u32,
    pub deleted: bool,
}

/// The registry's whole state.
#[derive(Debug, Default)]
pub struct Registry {
    /// Schema id N is `schemas[N - 1]`.
    schemas: Vec<StoredSchema>,
    by_content: HashMap<SchemaContent, u32>,
    subjects: BTreeMap<String, Vec<VersionEntry>>,
    global_level: Option<Level>,
    subject_levels: HashMap<String, Level>,
    applied: HashSet<String>,
}

/// What applying a command would change; computed with shared access ([`Registry::plan`]),
/// so the expensive part (parsing and compatibility checks) never holds the write lock.
#[derive(Debug)]
pub struct Plan {
    outcome: Outcome,
    effect: Effect,
}

impl Plan {
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }
}

#[derive(Debug)]
enum Effect {
    None,
    AddVersion {
        subject: String,
        version: VersionEntry,
        /// A schema not stored before, with its id.
        new_schema: Option<(u32, Box<StoredSchema>)>,
    },
    SoftDelete(String),
    Remove(String),
    SetLevel(Option<String>, Level),
    RemoveLevel(String),
}

impl Registry {
    /// Applies `command` with `request_id`. Deterministic: the same sequence of commands
    /// gives the same state and outcomes on every replica.
    pub fn apply(&mut self, request_id: &str, command: &Command) -> Outcome {
        if self.was_applied(request_id) {
            return Outcome::AlreadyApplied;
        }
        let plan = self.plan(command);
        self.commit(request_id, plan)
    }

    /// Whether a record with `request_id` was applied already (a redelivery).
    pub fn was_applied(&self, request_id: &str) -> bool {
        self.applied.contains(request_id)
    }

    /// What `apply` would answer now, without changing anything (fast rejection before
    /// writing to the log). Needs only shared access.
    pub fn dry_run(&self, command: &Command) -> Outcome {
        self.plan(command).outcome
    }

    /// What `command` would do to the current state. The state must not change between
    /// `plan` and [`Registry::commit`] (the log reader is the only writer).
    pub fn plan(&self, command: &Command) -> Plan {
        match command {
            Command::Register { subject, content } => self.plan_register(subject, content),
            Command::DeleteSubject { subject, permanent } => self.plan_delete(subject, *permanent),
            Command::SetConfig { subject, level } => match level.parse::<Level>() {
                Ok(l) => Plan {
                    outcome: Outcome::ConfigSet(l),
                    effect: Effect::SetLevel(subject.clone(), l),
                },
                Err(e) => Plan {
                    outcome: Outcome::InvalidLevel(e),
                    effect: Effect::None,
                },
            },
            Command::DeleteConfig { subject } => match self.subject_levels.get(subject) {
                Some(&l) => Plan {
                    outcome: Outcome::ConfigDeleted(l),
                    effect: Effect::RemoveLevel(subject.clone()),
                },
                None => Plan {
                    outcome: Outcome::SubjectNotFound(subject.clone()),
                    effect: Effect::None,
                },
            },
        }
    }

    /// Carries out `plan` (made by [`Registry::plan`] on this same state) for the record
    /// `request_id`, and returns its outcome.
    pub fn commit(&mut self, request_id: &str, plan: Plan) -> Outcome {
        if !self.applied.insert(request_id.to_owned()) {
            return Outcome::AlreadyApplied;
        }
        match plan.effect {
            Effect::None => {}
            Effect::AddVersion {
                subject,
                version,
                new_schema,
            } => {
                if let Some((id, stored)) = new_schema {
                    self.by_content.insert(stored.content.clone(), id);
                    self.schemas.push(*stored);
                }
                self.subjects.entry(subject).or_default().push(version);
            }
            Effect::SoftDelete(subject) => {
                if let Some(versions) = self.subjects.get_mut(&subject) {
                    versions.iter_mut().for_each(|v| v.deleted = true);
                }
            }
            Effect::Remove(subject) => {
                self.subjects.remove(&subject);
                self.subject_levels.remove(&subject);
            }
            Effect::SetLevel(Some(subject), l) => {
                self.subject_levels.insert(subject, l);
            }
            Effect::SetLevel(None, l) => self.global_level = Some(l),
            Effect::RemoveLevel(subject) => {
                self.subject_levels.remove(&subject);
            }
        }
        plan.outcome
    }

    fn resolve_references(&self, content: &SchemaContent) -> Result<Vec<(String, String)>, String> {
        content
            .references
            .iter()
            .map(|r| {
                self.subjects
                    .get(&r.subject)
                    .and_then(|vs| vs.iter().find(|v| v.version == r.version && !v.deleted))
                    .and_then(|v| self.schema(v.id))
                    .map(|s| (r.name.clone(), s.content.schema.clone()))
                    .ok_or_else(|| {
                        format!(
                            "reference {:?} points at subject {:?} version {}, which does not exist",
                            r.name, r.subject, r.version
                        )
                    })
            })
            .collect()
    }

    fn parse(&self, content: &SchemaContent) -> Result<Option<ParsedSchema>, String> {
        let refs = self.resolve_references(content)?;
        match content.schema_type {
            SchemaType::Protobuf => {
                let sources: Vec<SchemaSource<'_>> = refs
                    .iter()
                    .map(|(name, text)| SchemaSource { name, text })
                    .collect();
                compat::parse_protobuf(&content.schema, &sources)
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            SchemaType::Avro | SchemaType::Json => {
                serde_json::from_str::<serde_json::Value>(&content.schema)
                    .map(|_| None)
                    .map_err(|e| format!("{} schema is not valid JSON: {e}", content.schema_type))
            }
        }
    }

    fn plan_register(&self, subject: &str, content: &SchemaContent) -> Plan {
        let refuse = |outcome| Plan {
            outcome,
            effect: Effect::None,
        };
        let versions = self.subjects.get(subject).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(&id) = self.by_content.get(content)
            && let Some(v) = versions.iter().find(|v| v.id == id && !v.deleted)
        {
            return refuse(Outcome::Existing {
                id,
                version: v.version,
            });
        }
        let parsed = match self.parse(content) {
            Ok(p) => p,
            Err(reason) => return refuse(Outcome::InvalidSchema(reason)),
        };
        if let Some(new) = &parsed {
            let previous: Vec<ParsedSchema> = versions
                .iter()
                .filter(|v| !v.deleted)
                .filter_map(|v| self.schema(v.id).and_then(|s| s.parsed.clone()))
                .collect();
            let problems = compat::check(self.level(subject), new, &previous);
            if !problems.is_empty() {
                return refuse(Outcome::Incompatible(
                    problems.iter().map(|p| p.describe()).collect(),
                ));
            }
        }
        let (id, new_schema) = match self.by_content.get(content) {
            Some(&id) => (id, None),
            None => {
                let id = self.schemas.len() as u32 + 1;
                let stored = StoredSchema {
                    content: content.clone(),
                    parsed,
                };
                (id, Some((id, Box::new(stored))))
            }
        };
        let version = versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        Plan {
            outcome: Outcome::Registered { id, version },
            effect: Effect::AddVersion {
                subject: subject.to_owned(),
                version: VersionEntry {
                    version,
                    id,
                    deleted: false,
                },
                new_schema,
            },
        }
    }

    fn plan_delete(&self, subject: &str, permanent: bool) -> Plan {
        let refuse = |outcome| Plan {
            outcome,
            effect: Effect::None,
        };
        let Some(versions) = self.subjects.get(subject) else {
            return refuse(Outcome::SubjectNotFound(subject.to_owned()));
        };
        if permanent {
            if versions.iter().any(|v| !v.deleted) {
                return refuse(Outcome::NotSoftDeleted(subject.to_owned()));
            }
            Plan {
                outcome: Outcome::Deleted(versions.iter().map(|v| v.version).collect()),
                effect: Effect::Remove(subject.to_owned()),
            }
        } else {
            let live: Vec<u32> = versions
                .iter()
                .filter(|v| !v.deleted)
                .map(|v| v.version)
                .collect();
            if live.is_empty() {
                return refuse(Outcome::SubjectNotFound(subject.to_owned()));
            }
            Plan {
                outcome: Outcome::Deleted(live),
                effect: Effect::SoftDelete(subject.to_owned()),
            }
        }
    }

    /// The compatibility level in force for `subject`.
    pub fn level(&self, subject: &str) -> Level {
        self.subject_levels
            .get(subject)
            .copied()
            .unwrap_or_else(|| self.global_level())
    }

    pub fn global_level(&self) -> Level {
        self.global_level.unwrap_or_default()
    }

    /// The global level if one was set (`None`: the default is in force).
    pub fn global_level_setting(&self) -> Option<Level> {
        self.global_level
    }

    pub fn subject_level(&self, subject: &str) -> Option<Level> {
        self.subject_levels.get(subject).copied()
    }

    pub fn schema(&self, id: u32) -> Option<&StoredSchema> {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| self.schemas.get(i))
    }

    /// Subjects with at least one live version (all subjects with `include_deleted`).
    pub fn subjects(&self, include_deleted: bool) -> Vec<String> {
        self.subjects
            .iter()
            .filter(|(_, vs)| include_deleted || vs.iter().any(|v| !v.deleted))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Versions of a subject; `None` if the subject has no live version (and
    /// `include_deleted` is false) or does not exist.
    pub fn versions(&self, subject: &str, include_deleted: bool) -> Option<Vec<VersionEntry>> {
        let vs: Vec<VersionEntry> = self
            .subjects
            .get(subject)?
            .iter()
            .filter(|v| include_deleted || !v.deleted)
            .copied()
            .collect();
        (!vs.is_empty()).then_some(vs)
    }

    /// (subject, version) pairs that use schema `id`.
    pub fn usages(&self, id: u32) -> Vec<(String, u32)> {
        self.subjects
            .iter()
            .flat_map(|(s, vs)| {
                vs.iter()
                    .filter(|v| v.id == id && !v.deleted)
                    .map(move |v| (s.clone(), v.version))
            })
            .collect()
    }

    /// The live version of `subject` whose content equals `content`.
    pub fn lookup(&self, subject: &str, content: &SchemaContent) -> Option<VersionEntry> {
        let id = self.by_content.get(content)?;
        self.subjects
            .get(subject)?
            .iter()
            .find(|v| v.id == *id && !v.deleted)
            .copied()
    }

    /// Checks `content` against versions of `subject` (the given version only, or every
    /// live version for transitive levels when `version` is `None`). Returns the reasons
    /// it is incompatible (empty when compatible).
    pub fn check_compatibility(
        &self,
        subject: &str,
        content: &SchemaContent,
        version: Option<u32>,
    ) -> Result<Vec<String>, String> {
        let parsed = self.parse(content)?;
        let Some(new) = parsed else {
            return Ok(Vec::new());
        };
        let versions = self.versions(subject, false).unwrap_or_default();
        let chosen: Vec<&VersionEntry> = match version {
            Some(n) => versions.iter().filter(|v| v.version == n).collect(),
            None => versions.iter().collect(),
        };
        let previous: Vec<ParsedSchema> = chosen
            .iter()
            .filter_map(|v| self.schema(v.id).and_then(|s| s.parsed.clone()))
            .collect();
        Ok(compat::check(self.level(subject), &new, &previous)
            .iter()
            .map(|p| p.describe())
            .collect())
    }

    pub fn schema_count(&self) -> usize {
        self.schemas.len()
    }

    pub fn version_count(&self) -> usize {
        self.subjects
            .values()
            .map(|v| v.iter().filter(|v| !v.deleted).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(body: &str) -> SchemaContent {
        SchemaContent {
            schema_type: SchemaType::Protobuf,
            schema: format!("syntax = \"proto3\";\npackage t;\n{body}\n"),
            references: Vec::new(),
        }
    }

    fn register(subject: &str, content: SchemaContent) -> Command {
        Command::Register {
            subject: subject.into(),
            content,
        }
    }

    #[test]
    fn ids_follow_log_order_and_identical_content_shares_an_id() {
        let mut r = Registry::default();
        let a = proto("message A { string x = 1; }");
        let b = proto("message B { string x = 1; }");
        assert_eq!(
            r.apply("1", &register("s1", a.clone())),
            Outcome::Registered { id: 1, version: 1 }
        );
        assert_eq!(
            r.apply("2", &register("s2", b.clone())),
            Outcome::Registered { id: 2, version: 1 }
        );
        // The same schema under another subject reuses its id.
        assert_eq!(
            r.apply("3", &register("s3", a.clone())),
            Outcome::Registered { id: 1, version: 1 }
        );
        // Registering it again under the same subject is not a new version.
        assert_eq!(
            r.apply("4", &register("s1", a)),
            Outcome::Existing { id: 1, version: 1 }
        );
        assert_eq!(
            r.usages(1),
            vec![("s1".to_string(), 1), ("s3".to_string(), 1)]
        );
    }

    #[test]
    fn a_dry_run_changes_nothing_and_a_plan_commits_like_apply() {
        let mut r = Registry::default();
        let cmd = register("s", proto("message A { string x = 1; }"));
        assert_eq!(r.dry_run(&cmd), Outcome::Registered { id: 1, version: 1 });
        assert_eq!(r.dry_run(&cmd), Outcome::Registered { id: 1, version: 1 });
        assert_eq!((r.schema_count(), r.version_count()), (0, 0));
        let plan = r.plan(&cmd);
        assert_eq!(
            r.commit("req-1", plan),
            Outcome::Registered { id: 1, version: 1 }
        );
        assert!(r.was_applied("req-1"));
        assert_eq!(r.dry_run(&cmd), Outcome::Existing { id: 1, version: 1 });
        let soft = Command::DeleteSubject {
            subject: "s".into(),
            permanent: false,
        };
        assert_eq!(r.dry_run(&soft), Outcome::Deleted(vec![1]));
        assert_eq!(r.subjects(false), vec!["s".to_string()]);
    }

    #[test]
    fn a_redelivered_record_is_applied_once() {
        let mut r = Registry::default();
        let cmd = register("s", proto("message A { string x = 1; }"));
        assert!(matches!(r.apply("req-1", &cmd), Outcome::Registered { .. }));
        assert_eq!(r.apply("req-1", &cmd), Outcome::AlreadyApplied);
        assert_eq!(r.version_count(), 1);
    }

    #[test]
    fn two_replicas_applying_the_same_log_agree() {
        let log: Vec<(String, Command)> = (0..20)
            .map(|i| {
                (
                    format!("r{i}"),
                    register(
                        &format!("s{}", i % 3),
                        proto(&format!("message M{i} {{ string x = 1; }}")),
                    ),
                )
            })
            .collect();
        let (mut a, mut b) = (Registry::default(), Registry::default());
        let oa: Vec<Outcome> = log.iter().map(|(id, c)| a.apply(id, c)).collect();
        // b sees every record twice (redelivery after compaction): same outcome for the first.
        let ob: Vec<Outcome> = log
            .iter()
            .map(|(id, c)| {
                let first = b.apply(id, c);
                assert_eq!(b.apply(id, c), Outcome::AlreadyApplied);
                first
            })
            .collect();
        assert_eq!(oa, ob);
        assert_eq!(a.subjects(false), b.subjects(false));
    }

    #[test]
    fn incompatible_registration_is_refused_at_apply_time() {
        let mut r = Registry::default();
        r.apply("1", &register("s", proto("message A { int64 x = 1; }")));
        let out = r.apply("2", &register("s", proto("message A { string x = 1; }")));
        assert!(
            matches!(&out, Outcome::Incompatible(reasons) if reasons.iter().any(|m| m.contains("x"))),
            "{out:?}"
        );
        // Under NONE the same change is accepted.
        r.apply(
            "3",
            &Command::SetConfig {
                subject: Some("s".into()),
                level: "NONE".into(),
            },
        );
        assert!(matches!(
            r.apply("4", &register("s", proto("message A { string x = 1; }"))),
            Outcome::Registered { version: 2, .. }
        ));
    }

    #[test]
    fn soft_delete_then_permanent_delete() {
        let mut r = Registry::default();
        r.apply("1", &register("s", proto("message A { string x = 1; }")));
        let permanent = Command::DeleteSubject {
            subject: "s".into(),
            permanent: true,
        };
        assert_eq!(
            r.apply("2", &permanent),
            Outcome::NotSoftDeleted("s".into())
        );
        let soft = Command::DeleteSubject {
            subject: "s".into(),
            permanent: false,
        };
        assert_eq!(r.apply("3", &soft), Outcome::Deleted(vec![1]));
        assert!(r.subjects(false).is_empty());
        assert_eq!(r.subjects(true), vec!["s".to_string()]);
        // A new registration continues the version numbers.
        r.apply("4", &register("s", proto("message B { string x = 1; }")));
        assert_eq!(r.versions("s", false).unwrap()[0].version, 2);
        r.apply("5", &soft);
        assert_eq!(r.apply("6", &permanent), Outcome::Deleted(vec![1, 2]));
        assert!(r.subjects(true).is_empty());
    }

    #[test]
    fn references_resolve_to_registered_versions() {
        let mut r = Registry::default();
        let common = proto("message Money { int64 micros = 1; }");
        r.apply("1", &register("common", common));
        let mut order = SchemaContent {
            schema_type: SchemaType::Protobuf,
            schema: "syntax = \"proto3\";\npackage o;\nimport \"common.proto\";\nmessage Order { t.Money total = 1; }\n"
                .into(),
            references: vec![Reference {
                name: "common.proto".into(),
                subject: "common".into(),
                version: 1,
            }],
        };
        assert!(matches!(
            r.apply("2", &register("order", order.clone())),
            Outcome::Registered { .. }
        ));
        order.references[0].version = 9;
        assert!(
            matches!(r.apply("3", &register("order2", order)), Outcome::InvalidSchema(m) if m.contains("version 9"))
        );
    }

    #[test]
    fn avro_and_json_schemas_must_be_json_and_are_not_compat_checked() {
        let mut r = Registry::default();
        let avro = |s: &str| SchemaContent {
            schema_type: SchemaType::Avro,
            schema: s.into(),
            references: Vec::new(),
        };
        assert!(matches!(
            r.apply("1", &register("a", avro("{\"type\":\"string\"}"))),
            Outcome::Registered { .. }
        ));
        assert!(matches!(
            r.apply("2", &register("a", avro("{\"type\":\"int\"}"))),
            Outcome::Registered { .. }
        ));
        assert!(matches!(
            r.apply("3", &register("a", avro("not json"))),
            Outcome::InvalidSchema(_)
        ));
    }

    #[test]
    fn an_invalid_level_changes_nothing() {
        let mut r = Registry::default();
        let out = r.apply(
            "1",
            &Command::SetConfig {
                subject: None,
                level: "SIDEWAYS".into(),
            },
        );
        assert!(matches!(out, Outcome::InvalidLevel(_)));
        assert_eq!(r.global_level(), Level::Backward);
    }
}
