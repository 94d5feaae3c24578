//! Batching: rows accumulate with the Kafka position they came from; a batch is due when it
//! reaches a row count, a byte size or an age. After a batch is durably written, the
//! highest offset of each (topic, partition) in it is what may be committed. Pure logic.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// When a batch is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_rows: 10_000,
            max_bytes: 8 * 1024 * 1024,
            max_age: Duration::from_secs(1),
        }
    }
}

/// Rows of one kind with their sources.
#[derive(Debug)]
pub struct Batch<R> {
    pub rows: Vec<R>,
    /// Original record bytes per row, kept for the DLQ if the database refuses a row.
    pub sources: Vec<Source>,
    bytes: usize,
    started: Option<Instant>,
}

/// Where a row came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub value: Vec<u8>,
}

impl<R> Default for Batch<R> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            sources: Vec::new(),
            bytes: 0,
            started: None,
        }
    }
}

impl<R> Batch<R> {
    pub fn push(&mut self, row: R, source: Source, now: Instant) {
        self.bytes += source.value.len();
        self.started.get_or_insert(now);
        self.rows.push(row);
        self.sources.push(source);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the batch should be written now.
    pub fn is_due(&self, limits: &BatchLimits, now: Instant) -> bool {
        !self.is_empty()
            && (self.rows.len() >= limits.max_rows
                || self.bytes >= limits.max_bytes
                || self
                    .started
                    .is_some_and(|s| now.duration_since(s) >= limits.max_age))
    }

    /// When the batch becomes due by age (`None` while it is empty).
    pub fn due_at(&self, limits: &BatchLimits) -> Option<Instant> {
        self.started.map(|s| s + limits.max_age)
    }

    /// Takes the rows out, leaving an empty batch.
    pub fn take(&mut self) -> Batch<R> {
        std::mem::take(self)
    }
}

/// The highest offset per (topic, partition) among `sources`: what a commit may cover
/// once they are durable.
pub fn commit_points<'a>(
    sources: impl IntoIterator<Item = &'a Source>,
) -> BTreeMap<(String, i32), i64> {
    let mut out: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for s in sources {
        let e = out
            .entry((s.topic.clone(), s.partition))
            .or_insert(s.offset);
        *e = (*e).max(s.offset);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(topic: &str, partition: i32, offset: i64, bytes: usize) -> Source {
        Source {
            topic: topic.into(),
            partition,
            offset,
            value: vec![0; bytes],
        }
    }

    #[test]
    fn a_batch_is_due_by_rows_bytes_or_age() {
        let limits = BatchLimits {
            max_rows: 3,
            max_bytes: 100,
            max_age: Duration::from_millis(500),
        };
        let t0 = Instant::now();
        let mut b = Batch::default();
        assert!(!b.is_due(&limits, t0), "an empty batch is never due");
        assert_eq!(b.due_at(&limits), None);
        b.push(1, src("t", 0, 0, 10), t0);
        assert!(!b.is_due(&limits, t0));
        assert_eq!(
            b.due_at(&limits),
            Some(t0 + Duration::from_millis(500)),
            "due by the oldest row's age"
        );
        assert!(b.is_due(&limits, t0 + Duration::from_millis(500)), "by age");
        b.push(2, src("t", 0, 1, 10), t0 + Duration::from_millis(300));
        assert_eq!(b.due_at(&limits), Some(t0 + Duration::from_millis(500)));
        b.push(3, src("t", 0, 2, 10), t0);
        assert!(b.is_due(&limits, t0), "by rows");
        let mut big = Batch::default();
        big.push(1, src("t", 0, 0, 100), t0);
        assert!(big.is_due(&limits, t0), "by bytes");
        let taken = b.take();
        assert_eq!(taken.len(), 3);
        assert!(b.is_empty() && b.bytes() == 0);
    }

    #[test]
    fn commit_points_are_the_highest_offset_per_partition() {
        let s = [
            src("a", 0, 5, 1),
            src("a", 0, 7, 1),
            src("a", 1, 2, 1),
            src("b", 0, 9, 1),
        ];
        let cp = commit_points(&s);
        assert_eq!(cp[&("a".to_string(), 0)], 7);
        assert_eq!(cp[&("a".to_string(), 1)], 2);
        assert_eq!(cp[&("b".to_string(), 0)], 9);
    }
}
