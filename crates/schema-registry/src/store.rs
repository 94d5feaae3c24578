//! The registry's state machine. Every replica applies the same commands from the
//! `_schemas` log in the same order, so every replica computes the same ids, versions
//! and outcomes: ids are assigned here, at apply time, from log order — never by the
//! replica that proposed the command. Applying a command twice (same request id) is a
//! no-op. This module knows nothing of Kafka or HTTP.
//!
//! Bounded log: a decided command is then *settled* — its effect is written as facts
//! under stable keys ([`RecordKey`]: one per schema id, per (subject, version), per
//! config), after which the command's own record is deleted (a tombstone). Compaction
//! keeps one record per key. A fact carries `as_of`, the offset of the command that
//! decided it, and is installed only if no later command changed the key: facts are
//! order-independent, so a compacted log replays to the same state. This module tracks
//! which keys and commands still need settling; `log` writes them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::OnceLock;

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

/// The key of a `_schemas` record. Commands (proposals) have a unique key; facts have a
/// stable key, so a later fact supersedes an earlier one under compaction (Confluent's
/// `_schemas` keys in spirit: `{"keytype", "subject", "version"}`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "keytype", rename_all = "UPPERCASE")]
pub enum RecordKey {
    Command {
        request_id: String,
    },
    /// The schema text of an id (never removed: ids are never reused).
    Id {
        id: u32,
    },
    Schema {
        subject: String,
        version: u32,
    },
    /// A subject's compatibility level, or the global one (`subject: null`).
    Config {
        subject: Option<String>,
    },
}

/// The value of a fact record: the current state of its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "keytype", rename_all = "UPPERCASE")]
pub enum Fact {
    Id {
        id: u32,
        #[serde(flatten)]
        content: SchemaContent,
    },
    Schema {
        subject: String,
        version: u32,
        /// Offset of the command that decided this state.
        as_of: i64,
        /// `None`: the version was deleted permanently.
        #[serde(default)]
        id: Option<u32>,
        #[serde(default)]
        deleted: bool,
    },
    Config {
        subject: Option<String>,
        as_of: i64,
        /// `None`: no level configured.
        #[serde(rename = "compatibilityLevel", default)]
        level: Option<String>,
    },
}

impl Fact {
    pub fn key(&self) -> RecordKey {
        match self {
            Fact::Id { id, .. } => RecordKey::Id { id: *id },
            Fact::Schema {
                subject, version, ..
            } => RecordKey::Schema {
                subject: subject.clone(),
                version: *version,
            },
            Fact::Config { subject, .. } => RecordKey::Config {
                subject: subject.clone(),
            },
        }
    }
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
    /// Parsed at registration, or on first use for a schema installed from a fact.
    parsed: OnceLock<Option<ParsedSchema>>,
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
    schemas: BTreeMap<u32, StoredSchema>,
    by_content: HashMap<SchemaContent, u32>,
    /// Each subject's versions, in version order.
    subjects: BTreeMap<String, Vec<VersionEntry>>,
    global_level: Option<Level>,
    subject_levels: HashMap<String, Level>,
    applied: HashSet<String>,
    /// Offset of the command that last changed each schema/config key (removed keys too).
    as_of: HashMap<RecordKey, i64>,
    /// Keys whose latest record in the log does not show their current state.
    dirty: BTreeSet<RecordKey>,
    /// Commands read from the log and not deleted yet, with the keys they changed.
    unsettled: BTreeMap<String, Vec<RecordKey>>,
    /// Offset given to the next command by [`Registry::apply`] (tests and tools).
    next_offset: i64,
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
        let offset = self.next_offset;
        self.commit(request_id, offset, plan)
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

    /// Carries out `plan` (made by [`Registry::plan`] on this same state) for the command
    /// record `request_id` at log `offset`, and returns its outcome. The keys it changes
    /// become dirty and the command unsettled, until their facts and its tombstone are read.
    pub fn commit(&mut self, request_id: &str, offset: i64, plan: Plan) -> Outcome {
        self.next_offset = self.next_offset.max(offset + 1);
        if !self.applied.insert(request_id.to_owned()) {
            return Outcome::AlreadyApplied;
        }
        let schema_key = |subject: &str, version: u32| RecordKey::Schema {
            subject: subject.to_owned(),
            version,
        };
        let mut changed = Vec::new();
        match plan.effect {
            Effect::None => {}
            Effect::AddVersion {
                subject,
                version,
                new_schema,
            } => {
                if let Some((id, stored)) = new_schema {
                    self.by_content.insert(stored.content.clone(), id);
                    self.schemas.insert(id, *stored);
                    changed.push(RecordKey::Id { id });
                }
                changed.push(schema_key(&subject, version.version));
                self.subjects.entry(subject).or_default().push(version);
            }
            Effect::SoftDelete(subject) => {
                if let Some(versions) = self.subjects.get_mut(&subject) {
                    for v in versions.iter_mut().filter(|v| !v.deleted) {
                        v.deleted = true;
                        changed.push(schema_key(&subject, v.version));
                    }
                }
            }
            Effect::Remove(subject) => {
                if let Some(versions) = self.subjects.remove(&subject) {
                    changed.extend(versions.iter().map(|v| schema_key(&subject, v.version)));
                }
                if self.subject_levels.remove(&subject).is_some() {
                    changed.push(RecordKey::Config {
                        subject: Some(subject),
                    });
                }
            }
            Effect::SetLevel(subject, l) => {
                match &subject {
                    Some(s) => {
                        self.subject_levels.insert(s.clone(), l);
                    }
                    None => self.global_level = Some(l),
                }
                changed.push(RecordKey::Config { subject });
            }
            Effect::RemoveLevel(subject) => {
                self.subject_levels.remove(&subject);
                changed.push(RecordKey::Config {
                    subject: Some(subject),
                });
            }
        }
        for key in &changed {
            if !matches!(key, RecordKey::Id { .. }) {
                self.as_of.insert(key.clone(), offset);
            }
            self.dirty.insert(key.clone());
        }
        self.unsettled.insert(request_id.to_owned(), changed);
        plan.outcome
    }

    /// Installs a fact read from the log, unless a later command changed its key (then the
    /// key stays dirty: the log's latest record for it is stale and is rewritten).
    pub fn apply_fact(&mut self, fact: Fact) {
        let key = fact.key();
        let current = self.as_of.get(&key).copied().unwrap_or(i64::MIN);
        match fact {
            Fact::Id { id, content } => {
                if !self.schemas.contains_key(&id) {
                    self.by_content.entry(content.clone()).or_insert(id);
                    self.schemas.insert(
                        id,
                        StoredSchema {
                            content,
                            parsed: OnceLock::new(),
                        },
                    );
                }
                self.dirty.remove(&key);
            }
            Fact::Schema { as_of, .. } | Fact::Config { as_of, .. } if as_of < current => {
                self.dirty.insert(key);
            }
            Fact::Schema {
                subject,
                version,
                as_of,
                id,
                deleted,
            } => {
                self.set_version(&subject, version, id.map(|id| (id, deleted)));
                self.as_of.insert(key.clone(), as_of);
                self.dirty.remove(&key);
            }
            Fact::Config {
                subject,
                as_of,
                level,
            } => {
                let level = level.and_then(|l| l.parse::<Level>().ok());
                match (&subject, level) {
                    (Some(s), Some(l)) => {
                        self.subject_levels.insert(s.clone(), l);
                    }
                    (Some(s), None) => {
                        self.subject_levels.remove(s);
                    }
                    (None, l) => self.global_level = l,
                }
                self.as_of.insert(key.clone(), as_of);
                self.dirty.remove(&key);
            }
        }
    }

    fn set_version(&mut self, subject: &str, version: u32, entry: Option<(u32, bool)>) {
        let versions = self.subjects.entry(subject.to_owned()).or_default();
        let at = versions.binary_search_by_key(&version, |v| v.version);
        match (at, entry) {
            (Ok(i), Some((id, deleted))) => {
                versions[i] = VersionEntry {
                    version,
                    id,
                    deleted,
                }
            }
            (Err(i), Some((id, deleted))) => versions.insert(
                i,
                VersionEntry {
                    version,
                    id,
                    deleted,
                },
            ),
            (Ok(i), None) => {
                versions.remove(i);
            }
            (Err(_), None) => {}
        }
        if versions.is_empty() {
            self.subjects.remove(subject);
        }
    }

    /// A command's record was deleted (its tombstone was read).
    pub fn settled(&mut self, request_id: &str) {
        self.unsettled.remove(request_id);
    }

    /// The facts to write for dirty keys (all, or only those in `only`), schema ids first.
    pub fn facts_to_write(&self, only: Option<&BTreeSet<RecordKey>>) -> Vec<Fact> {
        self.dirty
            .iter()
            .filter(|k| only.is_none_or(|o| o.contains(*k)))
            .filter_map(|k| self.fact(k))
            .collect()
    }

    /// The current state of `key` as a fact (`None` for command keys and unknown ids).
    pub fn fact(&self, key: &RecordKey) -> Option<Fact> {
        let as_of = self.as_of.get(key).copied().unwrap_or(-1);
        match key {
            RecordKey::Command { .. } => None,
            RecordKey::Id { id } => self.schema(*id).map(|s| Fact::Id {
                id: *id,
                content: s.content.clone(),
            }),
            RecordKey::Schema { subject, version } => {
                let entry = self
                    .subjects
                    .get(subject)
                    .and_then(|vs| vs.iter().find(|v| v.version == *version));
                Some(Fact::Schema {
                    subject: subject.clone(),
                    version: *version,
                    as_of,
                    id: entry.map(|e| e.id),
                    deleted: entry.is_some_and(|e| e.deleted),
                })
            }
            RecordKey::Config { subject } => Some(Fact::Config {
                subject: subject.clone(),
                as_of,
                level: match subject {
                    Some(s) => self.subject_levels.get(s),
                    None => self.global_level.as_ref(),
                }
                .map(|l| l.to_string()),
            }),
        }
    }

    /// Commands whose every changed key is clean or in `writing` (facts written just
    /// before the tombstones; all commands, or only those in `only`): their records can be
    /// deleted. A key that a later command changed again is that command's to settle.
    pub fn settleable(
        &self,
        only: Option<&BTreeSet<String>>,
        writing: &BTreeSet<RecordKey>,
    ) -> Vec<String> {
        self.unsettled
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o.contains(*id)))
            .filter(|(_, keys)| {
                keys.iter()
                    .all(|k| !self.dirty.contains(k) || writing.contains(k))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// What still needs settling: dirty keys and unsettled commands.
    pub fn unsettled(&self) -> (BTreeSet<RecordKey>, BTreeSet<String>) {
        (self.dirty.clone(), self.unsettled.keys().cloned().collect())
    }

    /// The texts `content` references. A new schema may reference live versions only; a
    /// stored one (parsed on first use, see [`Registry::parsed`]) also soft-deleted ones,
    /// so it parses as it did when it was registered.
    fn resolve_references(
        &self,
        content: &SchemaContent,
        include_deleted: bool,
    ) -> Result<Vec<(String, String)>, String> {
        content
            .references
            .iter()
            .map(|r| {
                self.subjects
                    .get(&r.subject)
                    .and_then(|vs| {
                        vs.iter()
                            .find(|v| v.version == r.version && (include_deleted || !v.deleted))
                    })
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

    fn parse(
        &self,
        content: &SchemaContent,
        include_deleted: bool,
    ) -> Result<Option<ParsedSchema>, String> {
        let refs = self.resolve_references(content, include_deleted)?;
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
        let parsed = match self.parse(content, false) {
            Ok(p) => p,
            Err(reason) => return refuse(Outcome::InvalidSchema(reason)),
        };
        if let Some(new) = &parsed {
            let previous: Vec<ParsedSchema> = versions
                .iter()
                .filter(|v| !v.deleted)
                .filter_map(|v| self.parsed(v.id))
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
                let id = self.schemas.last_key_value().map_or(1, |(id, _)| id + 1);
                let stored = StoredSchema {
                    content: content.clone(),
                    parsed: OnceLock::from(parsed),
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

    /// A version of another subject whose schema references a version of `subject` (a
    /// permanent delete of `subject` is refused then: every replica must keep parsing the
    /// referring schema the same way, whether it parsed it at registration or from a fact).
    pub fn referenced_by(&self, subject: &str) -> Option<(String, u32)> {
        self.subjects
            .iter()
            .filter(|(s, _)| s.as_str() != subject)
            .flat_map(|(s, vs)| vs.iter().map(move |v| (s, v)))
            .find(|(_, v)| {
                self.schema(v.id)
                    .is_some_and(|st| st.content.references.iter().any(|r| r.subject == subject))
            })
            .map(|(s, v)| (s.clone(), v.version))
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
        self.schemas.get(&id)
    }

    /// The parsed form of schema `id` (`None` for AVRO/JSON and unparsable texts).
    fn parsed(&self, id: u32) -> Option<ParsedSchema> {
        let stored = self.schema(id)?;
        stored
            .parsed
            .get_or_init(|| self.parse(&stored.content, true).ok().flatten())
            .clone()
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
        let parsed = self.parse(content, false)?;
        let Some(new) = parsed else {
            return Ok(Vec::new());
        };
        let versions = self.versions(subject, false).unwrap_or_default();
        let chosen: Vec<&VersionEntry> = match version {
            Some(n) => versions.iter().filter(|v| v.version == n).collect(),
            None => versions.iter().collect(),
        };
        let previous: Vec<ParsedSchema> = chosen.iter().filter_map(|v| self.parsed(v.id)).collect();
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
            r.commit("req-1", 0, plan),
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

    /// A record of an in-memory `_schemas` log: a command, a fact, or a command's tombstone.
    #[derive(Debug, Clone)]
    enum Rec {
        Command(String, Command),
        Fact(Fact),
        Tombstone(String),
    }

    impl Rec {
        fn key(&self) -> RecordKey {
            match self {
                Rec::Command(id, _) | Rec::Tombstone(id) => RecordKey::Command {
                    request_id: id.clone(),
                },
                Rec::Fact(f) => f.key(),
            }
        }
    }

    /// A replica reading its log in memory (what `log::read_loop` does), with the settle
    /// steps of `log::SchemaLog::settle`.
    #[derive(Default)]
    struct Sim {
        log: Vec<Rec>,
        r: Registry,
        n: usize,
    }

    impl Sim {
        fn read(r: &mut Registry, offset: usize, rec: &Rec) {
            match rec {
                Rec::Command(id, c) => {
                    let plan = r.plan(c);
                    r.commit(id, offset as i64, plan);
                }
                Rec::Fact(f) => r.apply_fact(f.clone()),
                Rec::Tombstone(id) => r.settled(id),
            }
        }

        fn append(&mut self, rec: Rec) {
            Self::read(&mut self.r, self.log.len(), &rec);
            self.log.push(rec);
        }

        /// Proposes `c` and, unless the proposer "dies", settles it.
        fn propose(&mut self, c: Command, settle: bool) {
            self.n += 1;
            self.append(Rec::Command(format!("req-{}", self.n), c));
            if settle {
                self.settle();
            }
        }

        /// Facts, then tombstones, decided before any is read back (like the service).
        fn settle(&mut self) {
            let facts = self.r.facts_to_write(None);
            let writing = facts.iter().map(Fact::key).collect();
            let done = self.r.settleable(None, &writing);
            for f in facts {
                self.append(Rec::Fact(f));
            }
            for id in done {
                self.append(Rec::Tombstone(id));
            }
        }

        /// What log compaction keeps: the last record of each key, in log order, with
        /// tombstones and the records they delete gone.
        fn compacted(&self) -> Vec<Rec> {
            let last: HashMap<RecordKey, usize> = self
                .log
                .iter()
                .enumerate()
                .map(|(i, r)| (r.key(), i))
                .collect();
            self.log
                .iter()
                .enumerate()
                .filter(|(i, r)| last[&r.key()] == *i && !matches!(r, Rec::Tombstone(_)))
                .map(|(_, r)| r.clone())
                .collect()
        }
    }

    fn replay(log: &[Rec]) -> Registry {
        let mut r = Registry::default();
        for (offset, rec) in log.iter().enumerate() {
            Sim::read(&mut r, offset, rec);
        }
        r
    }

    type State = (
        Vec<(String, Vec<VersionEntry>)>,
        Vec<(u32, SchemaContent)>,
        Option<Level>,
        Vec<(String, Level)>,
    );

    fn state(r: &Registry) -> State {
        let mut levels: Vec<(String, Level)> = r
            .subject_levels
            .iter()
            .map(|(s, l)| (s.clone(), *l))
            .collect();
        levels.sort_by(|a, b| a.0.cmp(&b.0));
        (
            r.subjects
                .iter()
                .map(|(s, v)| (s.clone(), v.clone()))
                .collect(),
            r.schemas
                .iter()
                .map(|(id, s)| (*id, s.content.clone()))
                .collect(),
            r.global_level_setting(),
            levels,
        )
    }

    fn set(subject: Option<&str>, level: &str) -> Command {
        Command::SetConfig {
            subject: subject.map(str::to_owned),
            level: level.into(),
        }
    }

    fn delete(subject: &str, permanent: bool) -> Command {
        Command::DeleteSubject {
            subject: subject.into(),
            permanent,
        }
    }

    #[test]
    fn a_compacted_log_replays_to_the_same_state_and_keeps_one_record_per_key() {
        let mut sim = Sim::default();
        let a = proto("message A { int64 x = 1; }");
        sim.propose(set(Some("s"), "NONE"), true);
        sim.propose(register("s", a.clone()), true);
        // Accepted only because s is at NONE when it is decided.
        sim.propose(register("s", proto("message A { string x = 1; }")), true);
        sim.propose(set(Some("s"), "BACKWARD"), true);
        sim.propose(
            register("s", proto("message A { string x = 1; int32 y = 2; }")),
            true,
        );
        // Refused (incompatible under BACKWARD): a no-op, deleted like the others.
        sim.propose(register("s", proto("message A { int64 x = 1; }")), true);
        sim.propose(register("t", a.clone()), true);
        sim.propose(register("u", proto("message U { string x = 1; }")), true);
        sim.propose(set(Some("u"), "FULL"), true);
        sim.propose(delete("u", false), true);
        sim.propose(delete("u", true), true);
        sim.propose(set(Some("t"), "FULL"), true);
        sim.propose(
            Command::DeleteConfig {
                subject: "t".into(),
            },
            true,
        );
        for i in 0..10 {
            let level = if i % 2 == 0 { "NONE" } else { "FULL" };
            sim.propose(set(None, level), true);
        }
        // A proposer that died before settling: another replica settles it later.
        sim.propose(
            register("t", proto("message A { int64 x = 1; string y = 2; }")),
            false,
        );
        sim.propose(register("v", proto("message V { string x = 1; }")), true);
        sim.settle();

        let want = state(&sim.r);
        assert_eq!(state(&replay(&sim.log)), want, "full log");
        let compacted = sim.compacted();
        assert_eq!(state(&replay(&compacted)), want, "compacted log");
        // One record per schema id, per subject version, per config; no command survives.
        assert!(
            compacted.iter().all(|r| matches!(r, Rec::Fact(_))),
            "{compacted:?}"
        );
        // Ids 1-6; versions s:3, t:2, v:1 and u's removed one; configs of s, t
        // (removed), u (removed) and the global one.
        assert_eq!(sim.r.schema_count(), 6);
        assert_eq!(compacted.len(), 6 + (3 + 2 + 1 + 1) + 4);
        let replayed = replay(&compacted);
        assert_eq!(replayed.versions("s", false).map(|v| v.len()), Some(3));
        assert_eq!(replayed.level("s"), Level::Backward);
        assert_eq!(replayed.global_level(), Level::Full);
        assert!(replayed.versions("u", true).is_none());
        assert!(replayed.subject_level("t").is_none());
        let (dirty, unsettled) = sim.r.unsettled();
        assert!(dirty.is_empty() && unsettled.is_empty());

        // Another flip of the global level adds records, but the compacted log keeps size.
        sim.propose(set(None, "NONE"), true);
        assert_eq!(sim.compacted().len(), compacted.len());
        // A new registration continues after the compacted state (ids and versions).
        let mut next = replay(&compacted);
        assert_eq!(
            next.apply(
                "late",
                &register(
                    "s",
                    proto("message A { string x = 1; int32 y = 2; int32 z = 3; }")
                )
            ),
            Outcome::Registered { id: 7, version: 4 }
        );
    }

    #[test]
    fn a_stale_fact_written_late_is_ignored_and_its_key_rewritten() {
        let mut sim = Sim::default();
        sim.propose(set(None, "FULL"), false);
        let stale = sim.r.facts_to_write(None);
        sim.propose(set(None, "NONE"), true);
        // The first proposer's fact lands after the second's: it must not win.
        for f in stale {
            sim.append(Rec::Fact(f));
        }
        assert_eq!(sim.r.global_level(), Level::None);
        let (dirty, _) = sim.r.unsettled();
        assert!(dirty.contains(&RecordKey::Config { subject: None }));
        sim.settle();
        assert_eq!(state(&replay(&sim.compacted())), state(&sim.r));
        assert_eq!(replay(&sim.compacted()).global_level(), Level::None);
    }

    #[test]
    fn record_keys_are_stable_json_and_read_the_previous_releases_command_keys() {
        let key = RecordKey::Schema {
            subject: "s".into(),
            version: 2,
        };
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            r#"{"keytype":"SCHEMA","subject":"s","version":2}"#
        );
        assert_eq!(
            serde_json::to_string(&RecordKey::Config { subject: None }).unwrap(),
            r#"{"keytype":"CONFIG","subject":null}"#
        );
        // The previous release's command key, byte for byte (a tombstone must match it).
        let old = serde_json::json!({ "keytype": "COMMAND", "request_id": "r-1" });
        assert_eq!(
            serde_json::to_vec(&RecordKey::Command {
                request_id: "r-1".into()
            })
            .unwrap(),
            serde_json::to_vec(&old).unwrap()
        );
        assert_eq!(
            serde_json::from_value::<RecordKey>(old).unwrap(),
            RecordKey::Command {
                request_id: "r-1".into()
            }
        );
        let fact = Fact::Id {
            id: 3,
            content: proto("message A { string x = 1; }"),
        };
        let text = serde_json::to_string(&fact).unwrap();
        assert_eq!(serde_json::from_str::<Fact>(&text).unwrap(), fact);
    }

    #[test]
    fn a_schema_installed_from_facts_is_checked_like_one_parsed_at_registration() {
        let mut sim = Sim::default();
        sim.propose(
            register("common", proto("message Money { int64 micros = 1; }")),
            true,
        );
        let order = SchemaContent {
            schema_type: SchemaType::Protobuf,
            schema: "syntax = \"proto3\";\npackage o;\nimport \"common.proto\";\nmessage Order { t.Money total = 1; }\n"
                .into(),
            references: vec![Reference {
                name: "common.proto".into(),
                subject: "common".into(),
                version: 1,
            }],
        };
        sim.propose(register("order", order), true);
        // The referenced subject is soft-deleted: the referring schema still parses.
        sim.propose(delete("common", false), true);
        assert_eq!(sim.r.referenced_by("common"), Some(("order".into(), 1)));
        assert_eq!(sim.r.referenced_by("order"), None);
        let change = register(
            "order",
            SchemaContent {
                schema_type: SchemaType::Protobuf,
                schema: "syntax = \"proto3\";\npackage o;\nmessage Order { string total = 1; }\n"
                    .into(),
                references: Vec::new(),
            },
        );
        let decided = sim.r.dry_run(&change);
        assert!(matches!(decided, Outcome::Incompatible(_)), "{decided:?}");
        // A replica that replays the compacted log parses it on first use, the same way.
        assert_eq!(replay(&sim.compacted()).dry_run(&change), decided);
    }
}
