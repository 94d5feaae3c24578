//! Per-partition checkpoints on a compacted topic (`pulse.processor.checkpoints.v1`, one
//! partition): the resume offset, the last offset processed, the partition's event-time
//! progress and the users with a session still open. A checkpoint is written and
//! acknowledged before the offsets it covers are stored, and read by whoever is assigned
//! the partition next, so a replay after a crash or rebalance continues with the same
//! event-time progress instead of rebuilding it from the replayed records alone.
//!
//! **Incremental, bounded records** (format 3). The open sessions grow with the number of
//! users, and most of them do not change from one checkpoint to the next, so a checkpoint
//! is a *base* plus a short chain of *deltas*:
//!
//! - the header (key `<group>|<input topic>|<partition>`): the checkpoint without its
//!   sessions, its generation, and what it is made of — the base's generation, slot and
//!   number of parts, and the generation of each delta of the chain, in order;
//! - the base's parts (key `…|<partition>|<slot>|<index>`): at most [`PART_BYTES`] of
//!   sessions each; bases alternate between two slots, so a new base never overwrites the
//!   parts of the base in force;
//! - the deltas (key `…|<partition>|d|<position>`): the sessions added, changed and
//!   removed since the previous checkpoint. A new delta goes to the position after the
//!   chain in force, never to one the header in force lists.
//!
//! A checkpoint whose sessions did not change writes its header only; one whose sessions
//! changed writes one delta (the changes) and its header. The chain is rewritten into a
//! new base when it reaches [`MAX_DELTAS`] deltas or its deltas outgrow the base (so the
//! bytes written per checkpoint are about the changes, and a reader applies a bounded
//! chain). Records are queued on the topic's single partition before their header, so a
//! header is never visible before what it lists; each part and delta carries the
//! generation it was written for, and a header whose records are not all there with that
//! generation (a write that failed half-way, whose offsets were then never stored) is
//! ignored with a warning: the partition starts as if it had no checkpoint.
//!
//! Earlier formats still load: format 2 (a header with `generation` and `parts` only: its
//! base is the parts of slot `generation % 2`, no deltas) and format 1 (one record, the
//! sessions inline). The first checkpoint written after reading them continues their
//! chain (a delta on their base), see `tests::a_checkpoint_of_format_2_continues_*`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pulse_platform::kafka::{AckFuture, KafkaConfig, KafkaProducer, OutRecord, ProduceError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::engine::{Checkpoint, CheckpointUpdate, SessionChanges};
use crate::metrics as m;

/// Most bytes of sessions in one part or delta: well under librdkafka's default
/// `message.max.bytes` (1,000,000) and a broker's default `max.message.bytes` (1 MiB),
/// whatever the number of users. A user id longer than this still gets a part of its own.
pub const PART_BYTES: usize = 256 * 1024;

/// Most deltas a chain holds: the next checkpoint after that writes a new base.
pub const MAX_DELTAS: usize = 128;

/// A chain whose deltas hold fewer bytes than this is not rebased for outgrowing a small
/// base (a base of a few sessions would otherwise be rewritten every checkpoint).
const MIN_REBASE_BYTES: usize = 16 * 1024;

/// Where checkpoints live and whose they are.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    pub topic: String,
    pub group: String,
    pub input_topic: String,
    pub kafka: KafkaConfig,
    /// Per partition, the chain of the latest checkpoint read or written (its generation,
    /// base, deltas and content, to write the next one as a delta).
    pub generations: Arc<Mutex<HashMap<i32, Chain>>>,
}

/// What the checkpoint in force of one partition is made of.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    generation: u64,
    base_generation: u64,
    base_slot: u64,
    base_parts: u32,
    base_bytes: usize,
    /// Generations of the deltas, by position.
    deltas: Vec<u64>,
    delta_bytes: usize,
    /// The checkpoint in force, whole (what the next delta is computed against); None
    /// when nothing is known to be in force (the next checkpoint writes a base).
    last: Option<Checkpoint>,
    /// Its sessions are inline in its header (format 1): the next checkpoint writes a base.
    inline: bool,
    /// [`entry_bytes`] of `last`'s sessions, kept up to date (for the state gauge).
    held: usize,
}

/// Why a checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Produce(#[from] ProduceError),
    /// Changes came for a partition without a checkpoint in force to apply them to (a
    /// bug: the engine is asked for a whole checkpoint then).
    #[error("partition {0}: checkpoint changes without a checkpoint in force to apply them to")]
    NoBase(i32),
}

impl CheckpointError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Produce(e) => e.is_retryable(),
            Self::NoBase(_) => true,
        }
    }
}

/// Estimated heap bytes of one user in a kept checkpoint's map (before B-tree slack).
fn entry_bytes(user: &str) -> usize {
    user.len().div_ceil(16) * 16 + 32
}

fn held_of(cp: &Checkpoint) -> usize {
    cp.open_sessions
        .keys()
        .chain(cp.continued_sessions.iter())
        .map(|u| entry_bytes(u))
        .sum()
}

/// The header record: the checkpoint without its sessions (those are in the base's parts
/// and the deltas), except in format 1 where they are inline.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    #[serde(flatten)]
    checkpoint: Checkpoint,
    /// 0 in records of format 1.
    #[serde(default)]
    generation: u64,
    /// Parts of the base; 0 when the sessions are inline (format 1).
    #[serde(default)]
    parts: u32,
    /// Generation the base was written with; absent (format 2): `generation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_generation: Option<u64>,
    /// Slot of the base's parts; absent (format 2): `generation % 2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_slot: Option<u64>,
    /// Generation of each delta of the chain, by position; absent: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    deltas: Vec<u64>,
}

impl Header {
    fn base_generation(&self) -> u64 {
        self.base_generation.unwrap_or(self.generation)
    }

    fn base_slot(&self) -> u64 {
        self.base_slot.unwrap_or(self.generation % 2)
    }
}

/// One part of a base's sessions.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Part {
    generation: u64,
    #[serde(default)]
    open_sessions: BTreeMap<String, i64>,
    #[serde(default)]
    continued_sessions: BTreeSet<String>,
}

/// The sessions' changes from one checkpoint to the next.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Delta {
    generation: u64,
    /// Users whose earliest open session start is new or changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    set: BTreeMap<String, i64>,
    /// Users no longer with an open session.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    removed: BTreeSet<String>,
    /// Users now in `continued_sessions`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    continued: BTreeSet<String>,
    /// Users no longer in `continued_sessions`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    uncontinued: BTreeSet<String>,
}

impl Delta {
    fn between(generation: u64, old: &Checkpoint, new: &Checkpoint) -> Self {
        let mut d = Self {
            generation,
            ..Self::default()
        };
        for (user, start) in &new.open_sessions {
            if old.open_sessions.get(user) != Some(start) {
                d.set.insert(user.clone(), *start);
            }
        }
        for user in old.open_sessions.keys() {
            if !new.open_sessions.contains_key(user) {
                d.removed.insert(user.clone());
            }
        }
        d.continued = new
            .continued_sessions
            .difference(&old.continued_sessions)
            .cloned()
            .collect();
        d.uncontinued = old
            .continued_sessions
            .difference(&new.continued_sessions)
            .cloned()
            .collect();
        d
    }

    /// Applies `changes` to `cp` (keeping `held` up to date) and returns what they
    /// changed in it: the changes that repeat what `cp` already holds are left out.
    fn apply_changes(
        generation: u64,
        cp: &mut Checkpoint,
        changes: &SessionChanges,
        held: &mut usize,
    ) -> Self {
        let mut d = Self {
            generation,
            ..Self::default()
        };
        for (user, start) in &changes.set {
            if cp.open_sessions.get(user) != Some(start) {
                if cp.open_sessions.insert(user.clone(), *start).is_none() {
                    *held += entry_bytes(user);
                }
                d.set.insert(user.clone(), *start);
            }
        }
        for user in &changes.removed {
            if cp.open_sessions.remove(user).is_some() {
                *held = held.saturating_sub(entry_bytes(user));
                d.removed.insert(user.clone());
            }
        }
        for user in &changes.continued {
            if !cp.continued_sessions.contains(user) {
                cp.continued_sessions.insert(user.clone());
                *held += entry_bytes(user);
                d.continued.insert(user.clone());
            }
        }
        for user in &changes.uncontinued {
            if cp.continued_sessions.remove(user) {
                *held = held.saturating_sub(entry_bytes(user));
                d.uncontinued.insert(user.clone());
            }
        }
        d
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
            && self.removed.is_empty()
            && self.continued.is_empty()
            && self.uncontinued.is_empty()
    }

    fn apply(self, cp: &mut Checkpoint) {
        for user in &self.removed {
            cp.open_sessions.remove(user);
        }
        cp.open_sessions.extend(self.set);
        for user in &self.uncontinued {
            cp.continued_sessions.remove(user);
        }
        cp.continued_sessions.extend(self.continued);
    }
}

/// A decoded record key.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Header(i32),
    Part {
        partition: i32,
        slot: u64,
        index: u32,
    },
    Delta {
        partition: i32,
        position: u32,
    },
}

/// The checkpoint without its sessions.
fn scalars(cp: &Checkpoint) -> Checkpoint {
    cp.scalars()
}

/// The parts of a base of `cp` written with `generation`.
fn base_parts(generation: u64, cp: &Checkpoint) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    let mut size = 0;
    for (user, start) in &cp.open_sessions {
        // The JSON of one entry: "user":start, plus the user again when continued.
        let continued = cp.continued_sessions.contains(user);
        let entry = user.len() * if continued { 2 } else { 1 } + 32;
        if parts.is_empty() || size + entry > PART_BYTES {
            parts.push(Part {
                generation,
                ..Part::default()
            });
            size = 0;
        }
        size += entry;
        if let Some(part) = parts.last_mut() {
            part.open_sessions.insert(user.clone(), *start);
            if continued {
                part.continued_sessions.insert(user.clone());
            }
        }
    }
    // Continued users without an open session (none in practice) still round-trip.
    let orphans: BTreeSet<String> = cp
        .continued_sessions
        .iter()
        .filter(|u| !cp.open_sessions.contains_key(*u))
        .cloned()
        .collect();
    if !orphans.is_empty() {
        parts.push(Part {
            generation,
            open_sessions: BTreeMap::new(),
            continued_sessions: orphans,
        });
    }
    parts
}

/// The records of one checkpoint write with their full keys: (key, value, kind).
pub type KeyedRecords = Vec<(Vec<u8>, Vec<u8>, &'static str)>;

/// What one checkpoint write is: its records, (key suffix after the prefix, value, kind),
/// the header last.
type Records = Vec<(String, Vec<u8>, &'static str)>;

impl Chain {
    /// The records of `update` as the next checkpoint of `partition`, the chain advanced
    /// past them; no records when the checkpoint it makes is the one in force. A whole
    /// checkpoint is compared with the one in force (O(sessions)); changes cost the users
    /// they name, except when the chain is rewritten into a new base (every
    /// [`MAX_DELTAS`] checkpoints at most, or when its deltas outgrow the base).
    fn next(
        &mut self,
        partition: i32,
        update: &CheckpointUpdate,
    ) -> Result<Records, CheckpointError> {
        let generation = self.generation.saturating_add(1);
        let had_last = self.last.is_some();
        // The delta on the checkpoint in force; None: a new base.
        let delta = match update {
            CheckpointUpdate::Full(cp) => {
                if self.last.as_ref() == Some(cp) {
                    return Ok(Vec::new());
                }
                let delta = self
                    .last
                    .as_ref()
                    .filter(|_| !self.inline)
                    .map(|old| Delta::between(generation, old, cp));
                self.held = held_of(cp);
                self.last = Some(cp.clone());
                delta
            }
            CheckpointUpdate::Changes { scalars, sessions } => {
                let Some(last) = self.last.as_mut() else {
                    return Err(CheckpointError::NoBase(partition));
                };
                let delta = Delta::apply_changes(generation, last, sessions, &mut self.held);
                let moved = last.scalars() != *scalars;
                *last = Checkpoint {
                    open_sessions: std::mem::take(&mut last.open_sessions),
                    continued_sessions: std::mem::take(&mut last.continued_sessions),
                    ..scalars.scalars()
                };
                if delta.is_empty() && !moved {
                    return Ok(Vec::new());
                }
                Some(delta).filter(|_| !self.inline)
            }
        };
        let Some(cp) = self.last.as_ref() else {
            return Ok(Vec::new());
        };
        self.generation = generation;
        let mut out: Records = Vec::new();
        let delta = delta.map(|d| {
            let bytes = if d.is_empty() {
                Vec::new()
            } else {
                serde_json::to_vec(&d).unwrap_or_default()
            };
            (d.is_empty(), bytes)
        });
        match delta {
            // Only the scalars changed: the same base and chain under a new header.
            Some((true, _)) => {}
            Some((false, bytes))
                if self.deltas.len() < MAX_DELTAS
                    && bytes.len() <= PART_BYTES
                    && self.delta_bytes + bytes.len() <= self.base_bytes.max(MIN_REBASE_BYTES) =>
            {
                let position = self.deltas.len();
                self.delta_bytes += bytes.len();
                self.deltas.push(generation);
                out.push((format!("{partition}|d|{position}"), bytes, "delta"));
            }
            // No checkpoint in force, or the chain is full: a new base in the other slot.
            _ => {
                self.inline = false;
                let slot = if had_last {
                    1 - self.base_slot % 2
                } else {
                    generation % 2
                };
                let parts = base_parts(generation, cp);
                self.base_generation = generation;
                self.base_slot = slot;
                self.base_parts = u32::try_from(parts.len()).unwrap_or(u32::MAX);
                self.base_bytes = 0;
                self.deltas = Vec::new();
                self.delta_bytes = 0;
                for (i, part) in parts.iter().enumerate() {
                    let value = serde_json::to_vec(part).unwrap_or_default();
                    self.base_bytes += value.len();
                    out.push((format!("{partition}|{slot}|{i}"), value, "base"));
                }
            }
        }
        let header = Header {
            checkpoint: scalars(cp),
            generation,
            parts: self.base_parts,
            base_generation: Some(self.base_generation),
            base_slot: Some(self.base_slot),
            deltas: self.deltas.clone(),
        };
        out.push((
            partition.to_string(),
            serde_json::to_vec(&header).unwrap_or_default(),
            "header",
        ));
        Ok(out)
    }
}

fn parse_key(rest: &str) -> Option<Key> {
    let mut it = rest.split('|');
    let partition = it.next()?.parse().ok()?;
    match (it.next(), it.next(), it.next()) {
        (None, ..) => Some(Key::Header(partition)),
        (Some("d"), Some(position), None) => Some(Key::Delta {
            partition,
            position: position.parse().ok()?,
        }),
        (Some(slot), Some(index), None) => Some(Key::Part {
            partition,
            slot: slot.parse().ok()?,
            index: index.parse().ok()?,
        }),
        _ => None,
    }
}

/// The latest records of one checkpoint topic, by key, and what they assemble to.
#[derive(Debug, Default)]
struct Assembler {
    headers: HashMap<i32, Header>,
    parts: HashMap<(i32, u64, u32), (Part, usize)>,
    deltas: HashMap<(i32, u32), (Delta, usize)>,
}

impl Assembler {
    fn add(&mut self, key: Key, value: &[u8]) {
        match key {
            Key::Header(p) => {
                if let Ok(h) = serde_json::from_slice::<Header>(value) {
                    self.headers.insert(p, h);
                }
            }
            Key::Part {
                partition,
                slot,
                index,
            } => {
                if let Ok(part) = serde_json::from_slice::<Part>(value) {
                    self.parts
                        .insert((partition, slot, index), (part, value.len()));
                }
            }
            Key::Delta {
                partition,
                position,
            } => {
                if let Ok(delta) = serde_json::from_slice::<Delta>(value) {
                    self.deltas
                        .insert((partition, position), (delta, value.len()));
                }
            }
        }
    }

    /// Each partition's checkpoint and chain; partitions whose latest header misses parts
    /// or deltas are left out.
    fn finish(mut self) -> HashMap<i32, Chain> {
        let mut out = HashMap::new();
        for (p, header) in std::mem::take(&mut self.headers) {
            match self.assemble(p, header) {
                Ok(chain) => {
                    out.insert(p, chain);
                }
                Err((generation, missing)) => tracing::warn!(
                    partition = p,
                    generation,
                    missing,
                    "a checkpoint's records are missing; the partition continues without it"
                ),
            }
        }
        out
    }

    fn assemble(&mut self, p: i32, header: Header) -> Result<Chain, (u64, String)> {
        let (base_generation, base_slot) = (header.base_generation(), header.base_slot());
        let Header {
            mut checkpoint,
            generation,
            parts,
            deltas,
            ..
        } = header;
        let inline = parts == 0 && !checkpoint.open_sessions.is_empty();
        let mut base_bytes = 0;
        for index in 0..parts {
            match self.parts.remove(&(p, base_slot, index)) {
                Some((part, bytes)) if part.generation == base_generation => {
                    checkpoint.open_sessions.extend(part.open_sessions);
                    checkpoint
                        .continued_sessions
                        .extend(part.continued_sessions);
                    base_bytes += bytes;
                }
                _ => return Err((generation, format!("part {index} of slot {base_slot}"))),
            }
        }
        let mut delta_bytes = 0;
        for (position, want) in deltas.iter().enumerate() {
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            match self.deltas.remove(&(p, position)) {
                Some((delta, bytes)) if delta.generation == *want => {
                    delta.apply(&mut checkpoint);
                    delta_bytes += bytes;
                }
                _ => return Err((generation, format!("delta {position}"))),
            }
        }
        Ok(Chain {
            held: held_of(&checkpoint),
            generation,
            base_generation,
            base_slot,
            base_parts: parts,
            base_bytes,
            deltas,
            delta_bytes,
            last: Some(checkpoint),
            inline,
        })
    }
}

impl CheckpointStore {
    fn prefix(&self) -> String {
        format!("{}|{}|", self.group, self.input_topic)
    }

    fn chains(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Chain>> {
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The records that make `cp` the checkpoint of `partition` (key, value, kind: `base`,
    /// `delta` or `header`), the header last, and the chain is advanced as if they were
    /// written; none when `cp` is the checkpoint in force. For [`Self::write`] and for
    /// measuring what a checkpoint costs without a broker.
    pub fn prepare(&self, partition: i32, cp: &Checkpoint) -> KeyedRecords {
        // A whole checkpoint always applies.
        self.prepare_update(partition, &CheckpointUpdate::Full(cp.clone()))
            .unwrap_or_default()
    }

    /// [`Self::prepare`] for an engine's [`CheckpointUpdate`]: changes cost the users
    /// they name (see `Chain::next`). Changes need a checkpoint in force
    /// ([`Self::has_checkpoint`]).
    pub fn prepare_update(
        &self,
        partition: i32,
        update: &CheckpointUpdate,
    ) -> Result<KeyedRecords, CheckpointError> {
        let mut chains = self.chains();
        let chain = chains.entry(partition).or_default();
        let records = chain.next(partition, update)?;
        let prefix = self.prefix();
        Ok(records
            .into_iter()
            .map(|(key, value, kind)| (format!("{prefix}{key}").into_bytes(), value, kind))
            .collect())
    }

    /// Whether a checkpoint of `partition` is in force here, so changes can be applied
    /// to it (else the engine is asked for a whole one).
    pub fn has_checkpoint(&self, partition: i32) -> bool {
        self.chains()
            .get(&partition)
            .is_some_and(|c| c.last.is_some())
    }

    /// Estimated heap bytes of the checkpoints in force this store keeps (one whole copy
    /// per partition, to write the next one as a delta).
    pub fn held_bytes(&self) -> usize {
        self.chains().values().map(|c| c.held * 3 / 2).sum()
    }

    /// Forgets the chain of `partition` (revoked: its next owner writes it; if it comes
    /// back, [`Self::read_all`] reads it again).
    pub fn forget(&self, partition: i32) {
        self.chains().remove(&partition);
    }

    /// Queues the checkpoint of `partition` (what changed since the checkpoint in force,
    /// then its header); one acknowledgement per record, none when nothing changed.
    pub async fn write(
        &self,
        producer: &KafkaProducer,
        partition: i32,
        cp: &Checkpoint,
    ) -> Result<Vec<AckFuture>, ProduceError> {
        match self
            .write_update(producer, partition, &CheckpointUpdate::Full(cp.clone()))
            .await
        {
            Ok(acks) => Ok(acks),
            Err(CheckpointError::Produce(e)) => Err(e),
            // A whole checkpoint always applies.
            Err(CheckpointError::NoBase(_)) => Ok(Vec::new()),
        }
    }

    /// [`Self::write`] for an engine's [`CheckpointUpdate`].
    pub async fn write_update(
        &self,
        producer: &KafkaProducer,
        partition: i32,
        update: &CheckpointUpdate,
    ) -> Result<Vec<AckFuture>, CheckpointError> {
        let mut acks = Vec::new();
        for (key, value, kind) in self.prepare_update(partition, update)? {
            metrics::counter!(m::CHECKPOINT_BYTES_TOTAL, "kind" => kind)
                .increment(u64::try_from(value.len()).unwrap_or(u64::MAX));
            acks.push(
                producer
                    .enqueue_with_wait(
                        OutRecord::new(&self.topic, Some(key), value),
                        Duration::from_secs(60),
                    )
                    .await?,
            );
        }
        Ok(acks)
    }

    /// Reads the whole checkpoint topic and returns the latest checkpoint of each partition
    /// of this group and input topic. Partitions this store has no chain for (never
    /// written, or forgotten at a revoke) continue the chain read.
    pub async fn read_all(
        &self,
        timeout: Duration,
    ) -> Result<HashMap<i32, Checkpoint>, KafkaError> {
        let store = self.clone();
        let read = tokio::task::spawn_blocking(move || store.read_blocking(timeout))
            .await
            .map_err(|_| KafkaError::Canceled)??;
        let mut chains = self.chains();
        let mut out = HashMap::new();
        for (p, chain) in read {
            if let Some(cp) = chain.last.clone() {
                out.insert(p, cp);
            }
            match chains.get_mut(&p) {
                // Ours is at least as new as the topic (it may have writes in flight).
                Some(mine) => mine.generation = mine.generation.max(chain.generation),
                None => {
                    chains.insert(p, chain);
                }
            }
        }
        Ok(out)
    }

    fn read_blocking(&self, timeout: Duration) -> Result<HashMap<i32, Chain>, KafkaError> {
        let mut c = self
            .kafka
            .consumer_client_config("pulse-processor-checkpoints");
        c.set(
            "group.id",
            format!("pulse-processor-checkpoints-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = c.create()?;
        let (_low, high) = consumer.fetch_watermarks(&self.topic, 0, timeout)?;
        let mut records = Assembler::default();
        if high <= 0 {
            return Ok(HashMap::new());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let prefix = self.prefix();
        let deadline = Instant::now() + timeout;
        loop {
            if Instant::now() > deadline {
                return Err(KafkaError::Canceled);
            }
            let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let msg = msg?;
            let key = msg
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.strip_prefix(prefix.as_str()))
                .and_then(parse_key);
            if let (Some(key), Some(value)) = (key, msg.payload()) {
                records.add(key, value);
            }
            if msg.offset() >= high - 1 {
                return Ok(records.finish());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn checkpoint(users: usize, every_continued: usize) -> Checkpoint {
        Checkpoint {
            resume_offset: 5,
            last_offset: 1_000_000,
            max_event_ms: Some(1_700_000_000_000),
            closed_watermark: Some(1_699_999_990_000),
            open_sessions: (0..users)
                .map(|i| (format!("user-{i:08}"), 1_700_000_000_000 + i as i64))
                .collect(),
            continued_sessions: (0..users)
                .step_by(every_continued)
                .map(|i| format!("user-{i:08}"))
                .collect(),
            max_session_ms: Some(86_400_000),
            session_gap_ms: Some(1_800_000),
            prior_session_rules: None,
        }
    }

    /// Today's format-2 writer, kept as it was (the code path of the release before
    /// format 3): parts of generation `generation` in slot `generation % 2`, then the header.
    fn format_2(partition: i32, generation: u64, cp: &Checkpoint) -> Vec<(String, Vec<u8>)> {
        #[derive(Serialize)]
        struct Header2 {
            #[serde(flatten)]
            checkpoint: Checkpoint,
            generation: u64,
            parts: u32,
        }
        let parts = base_parts(generation, cp);
        let header = Header2 {
            checkpoint: scalars(cp),
            generation,
            parts: u32::try_from(parts.len()).unwrap(),
        };
        let mut out: Vec<(String, Vec<u8>)> = parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                (
                    format!("{partition}|{}|{i}", generation % 2),
                    serde_json::to_vec(part).unwrap(),
                )
            })
            .collect();
        out.push((partition.to_string(), serde_json::to_vec(&header).unwrap()));
        out
    }

    /// A writer of one partition's chain, keeping every record it wrote, in order.
    #[derive(Default)]
    struct Topic {
        chain: Chain,
        log: Vec<(String, Vec<u8>)>,
    }

    impl Topic {
        fn write(&mut self, partition: i32, cp: &Checkpoint) -> Vec<(String, Vec<u8>)> {
            self.write_update(partition, &CheckpointUpdate::Full(cp.clone()))
        }

        fn write_update(
            &mut self,
            partition: i32,
            update: &CheckpointUpdate,
        ) -> Vec<(String, Vec<u8>)> {
            let records = self.chain.next(partition, update).unwrap();
            let records: Vec<(String, Vec<u8>)> =
                records.into_iter().map(|(k, v, _)| (k, v)).collect();
            self.log.extend(records.clone());
            records
        }
    }

    fn assemble(records: &[(String, Vec<u8>)]) -> HashMap<i32, Checkpoint> {
        let mut a = Assembler::default();
        for (k, v) in records {
            a.add(parse_key(k).unwrap(), v);
        }
        a.finish()
            .into_iter()
            .map(|(p, c)| (p, c.last.unwrap()))
            .collect()
    }

    fn bytes(records: &[(String, Vec<u8>)]) -> usize {
        records.iter().map(|(_, v)| v.len()).sum()
    }

    #[test]
    fn a_checkpoint_of_100k_open_sessions_is_written_in_bounded_records() {
        let cp = checkpoint(100_000, 7);
        let mut t = Topic::default();
        let records = t.write(3, &cp);
        assert!(records.len() > 4, "{} records", records.len());
        for (key, value) in &records {
            assert!(
                value.len() <= PART_BYTES + 1_024,
                "{key}: {} bytes",
                value.len()
            );
        }
        assert_eq!(records.last().unwrap().0, "3");
        assert_eq!(assemble(&records), HashMap::from([(3, cp)]));
    }

    #[test]
    fn a_checkpoint_rewrites_only_the_sessions_that_changed() {
        let mut cp = checkpoint(100_000, 7);
        let mut t = Topic::default();
        let base = bytes(&t.write(0, &cp));
        // Unchanged: nothing is written.
        assert!(t.write(0, &cp).is_empty());
        // Only the offsets moved: the header alone.
        cp.last_offset += 10;
        let header_only = t.write(0, &cp);
        assert_eq!(header_only.len(), 1);
        assert!(bytes(&header_only) < 1_024, "{}", bytes(&header_only));
        // 1,000 sessions opened, 500 closed, 10 more continued: one delta and a header.
        for i in 0..1_000 {
            cp.open_sessions
                .insert(format!("new-{i:05}"), 1_700_000_100_000);
        }
        for i in 0..500 {
            cp.open_sessions.remove(&format!("user-{i:08}"));
        }
        cp.continued_sessions
            .extend((0..10).map(|i| format!("new-{i:05}")));
        let delta = t.write(0, &cp);
        assert_eq!(
            delta.len(),
            2,
            "{:?}",
            delta.iter().map(|r| &r.0).collect::<Vec<_>>()
        );
        assert_eq!(delta[0].0, "0|d|0");
        assert!(
            bytes(&delta) * 50 < base,
            "delta {} bytes, base {base}",
            bytes(&delta)
        );
        assert_eq!(assemble(&t.log), HashMap::from([(0, cp)]));
    }

    #[test]
    fn a_long_or_large_chain_is_rewritten_into_a_new_base_in_the_other_slot() {
        let mut cp = checkpoint(2_000, 5);
        let mut t = Topic::default();
        t.write(0, &cp);
        let first_slot = t.chain.base_slot;
        let mut bases = 0;
        for round in 0..(MAX_DELTAS + 5) {
            cp.open_sessions.insert(format!("r{round}"), round as i64);
            let records = t.write(0, &cp);
            if records
                .iter()
                .any(|(k, _)| !k.contains("|d|") && k.contains('|'))
            {
                bases += 1;
                assert_ne!(t.chain.base_slot, first_slot);
                assert!(t.chain.deltas.is_empty());
            }
            assert!(t.chain.deltas.len() <= MAX_DELTAS);
            assert_eq!(assemble(&t.log)[&0], cp);
        }
        assert_eq!(bases, 1);
        // Deltas that outgrow the base: a new base.
        let mut t = Topic::default();
        let mut small = checkpoint(10, 3);
        t.write(0, &small);
        for i in 0..2_000 {
            small.open_sessions.insert(format!("x-{i:06}"), i);
        }
        let records = t.write(0, &small);
        assert!(
            records.iter().all(|(k, _)| !k.contains("|d|")),
            "a delta larger than 16 KiB on a tiny base"
        );
        assert_eq!(assemble(&t.log)[&0], small);
    }

    #[test]
    fn a_smaller_checkpoint_ignores_the_parts_left_by_earlier_generations() {
        let big = checkpoint(30_000, 3);
        let small = checkpoint(10, 3);
        let mut t = Topic::default();
        t.write(0, &big);
        t.chain.last = None; // force bases
        t.write(0, &big);
        t.chain.last = None;
        t.write(0, &small);
        assert_eq!(assemble(&t.log), HashMap::from([(0, small)]));
    }

    #[test]
    fn a_header_whose_parts_or_deltas_are_missing_is_not_used() {
        let mut t = Topic::default();
        let mut records = t.write(0, &checkpoint(30_000, 3));
        records.remove(1);
        assert!(assemble(&records).is_empty());
        // A delta of another generation at the same position does not complete it.
        let mut t = Topic::default();
        let mut cp = checkpoint(100, 3);
        t.write(0, &cp);
        cp.open_sessions.insert("a".into(), 1);
        let first = t.write(0, &cp);
        let mut other = Topic::default();
        other.chain.generation = 10;
        other.write(0, &cp);
        cp.open_sessions.insert("b".into(), 2);
        let mut log = t.log.clone();
        log.push(other.write(0, &cp).remove(0));
        log.push(first[1].clone());
        assert!(assemble(&log).is_empty());
    }

    #[test]
    fn a_checkpoint_of_format_1_still_loads_and_the_next_one_writes_a_base() {
        let old = br#"{"resume_offset":3,"last_offset":9,"max_event_ms":1000,"closed_watermark":900,"open_sessions":{"a":100,"b":200}}"#;
        let mut a = Assembler::default();
        a.add(Key::Header(1), old);
        let chain = a.finish().remove(&1).unwrap();
        let cp = chain.last.clone().unwrap();
        assert_eq!(chain.generation, 0);
        assert_eq!((cp.resume_offset, cp.last_offset), (3, 9));
        assert_eq!(
            cp.open_sessions,
            BTreeMap::from([("a".to_owned(), 100), ("b".to_owned(), 200)])
        );
        assert!(cp.continued_sessions.is_empty());
        assert_eq!(cp.max_session_ms, None);
        let mut next = cp.clone();
        next.open_sessions.insert("c".into(), 300);
        let mut t = Topic {
            chain,
            log: vec![("1".into(), old.to_vec())],
        };
        let records = t.write(1, &next);
        assert!(records.iter().all(|(k, _)| !k.contains("|d|")));
        assert_eq!(assemble(&t.log)[&1], next);
    }

    #[test]
    fn a_checkpoint_of_format_2_continues_as_a_delta_on_its_base() {
        let old = checkpoint(20_000, 4);
        let log = format_2(2, 7, &old);
        let mut a = Assembler::default();
        for (k, v) in &log {
            a.add(parse_key(k).unwrap(), v);
        }
        let chain = a.finish().remove(&2).unwrap();
        assert_eq!(chain.last.as_ref(), Some(&old));
        assert_eq!((chain.generation, chain.base_slot), (7, 1));
        let mut t = Topic { chain, log };
        let mut next = old.clone();
        next.open_sessions.remove("user-00000004");
        next.open_sessions.insert("new".into(), 5);
        next.last_offset += 1;
        let records = t.write(2, &next);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].0, "2|d|0");
        assert_eq!(assemble(&t.log)[&2], next);
    }

    #[test]
    fn changes_apply_to_the_checkpoint_in_force_and_need_one() {
        let mut t = Topic::default();
        let changes = CheckpointUpdate::Changes {
            scalars: checkpoint(0, 1),
            sessions: SessionChanges::default(),
        };
        assert!(matches!(
            t.chain.next(4, &changes),
            Err(CheckpointError::NoBase(4))
        ));
        let mut cp = checkpoint(1_000, 3);
        t.write(4, &cp);
        let held = t.chain.held;
        // Repeated entries are not written again; a new one is, in a delta.
        let mut s = SessionChanges::default();
        s.set
            .insert("user-00000001".into(), cp.open_sessions["user-00000001"]);
        s.set.insert("new".into(), 7);
        s.removed.insert("absent".into());
        s.uncontinued.insert("user-00000003".into());
        let records = t.write_update(
            4,
            &CheckpointUpdate::Changes {
                scalars: cp.scalars(),
                sessions: s,
            },
        );
        assert_eq!(records.len(), 2);
        let delta: Delta = serde_json::from_slice(&records[0].1).unwrap();
        assert_eq!(delta.set, BTreeMap::from([("new".to_owned(), 7)]));
        assert!(delta.removed.is_empty() && delta.continued.is_empty());
        assert_eq!(
            delta.uncontinued,
            BTreeSet::from(["user-00000003".to_owned()])
        );
        cp.open_sessions.insert("new".into(), 7);
        cp.continued_sessions.remove("user-00000003");
        assert_eq!(assemble(&t.log)[&4], cp);
        assert_eq!(t.chain.held, held_of(&cp));
        assert_eq!(t.chain.held, held, "one entry in, one out");
    }

    #[test]
    fn keys_of_headers_parts_and_deltas_are_told_apart() {
        assert_eq!(parse_key("12"), Some(Key::Header(12)));
        assert_eq!(
            parse_key("12|1|3"),
            Some(Key::Part {
                partition: 12,
                slot: 1,
                index: 3
            })
        );
        assert_eq!(
            parse_key("12|d|3"),
            Some(Key::Delta {
                partition: 12,
                position: 3
            })
        );
        assert_eq!(parse_key("12|1"), None);
        assert_eq!(parse_key("x"), None);
    }

    /// One step of a random history: sessions opened, closed, continued, offsets moved.
    /// (sessions set, removed, continued, offsets moved).
    type Step = (Vec<(u16, i64)>, Vec<u16>, Vec<u16>, bool);

    fn step() -> impl Strategy<Value = Step> {
        (
            prop::collection::vec((0u16..400, 0i64..50), 0..60),
            prop::collection::vec(0u16..400, 0..60),
            prop::collection::vec(0u16..400, 0..5),
            any::<bool>(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// After every write the topic reads back the newest checkpoint, and a write cut
        /// short anywhere (its header, or more, never acknowledged) reads back the one
        /// before: no record of a write overwrites one the header in force lists.
        #[test]
        fn every_prefix_of_the_topic_reads_back_a_checkpoint_that_was_written(
            steps in prop::collection::vec((step(), any::<bool>()), 1..80),
        ) {
            let mut t = Topic::default();
            let mut cp = checkpoint(50, 7);
            let mut previous: Option<Checkpoint> = None;
            for ((set, removed, continued, moved), changes) in steps {
                // Changes need a checkpoint in force.
                let changes = changes && previous.is_some();
                for (u, start) in set {
                    cp.open_sessions.insert(format!("u{u}"), start);
                }
                for u in removed {
                    cp.open_sessions.remove(&format!("u{u}"));
                    cp.continued_sessions.remove(&format!("u{u}"));
                }
                for u in continued {
                    if cp.open_sessions.contains_key(&format!("u{u}")) {
                        cp.continued_sessions.insert(format!("u{u}"));
                    }
                }
                if moved {
                    cp.last_offset += 1;
                }
                let before = t.log.len();
                let records = if changes {
                    // As the engine sends them: every user touched, with its entry now.
                    let mut touched: BTreeSet<String> = BTreeSet::new();
                    touched.extend(t.chain.last.iter().flat_map(|l| l.open_sessions.keys().cloned()));
                    touched.extend(cp.open_sessions.keys().cloned());
                    touched.extend(t.chain.last.iter().flat_map(|l| l.continued_sessions.iter().cloned()));
                    let mut s = SessionChanges::default();
                    for u in touched {
                        match cp.open_sessions.get(&u) {
                            Some(start) => {
                                s.set.insert(u.clone(), *start);
                            }
                            None => {
                                s.removed.insert(u.clone());
                            }
                        }
                        if cp.continued_sessions.contains(&u) {
                            s.continued.insert(u);
                        } else {
                            s.uncontinued.insert(u);
                        }
                    }
                    t.write_update(0, &CheckpointUpdate::Changes { scalars: cp.scalars(), sessions: s })
                } else {
                    t.write(0, &cp)
                };
                for cut in 0..records.len() {
                    let got = assemble(&t.log[..before + cut]).remove(&0);
                    prop_assert_eq!(got.as_ref(), previous.as_ref(), "cut after {} of {}", cut, records.len());
                }
                prop_assert_eq!(assemble(&t.log).remove(&0), Some(cp.clone()));
                previous = Some(cp.clone());
            }
        }
    }
}
