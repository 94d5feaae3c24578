//! Everything the ledger reads, held open between reconciliations (so `ledger watch` reads
//! each topic record and each archive object once): the tails of the events, late and DLQ
//! topics feeding a [`Book`], ClickHouse (`pulse_storage::ledger`), the Parquet archive
//! (objects cached by key: their names are deterministic and their content fixed), and
//! the query API. Also the rule that says when a range is closed. With
//! [`Sources::show_progress`], reading the topics (records) and the archive (objects)
//! shows progress on stderr (`crate::progress`; `pulsectl ledger --from --to`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use pulse_storage::ledger as store;

use super::book::{Book, Budget};
use super::reconcile::{Report, Stored, reconcile};
use super::topic::{TopicTail, backlog_async, open_async, read_async};
use super::{LedgerError, SourceArgs, revenue};
use crate::progress::{Mode, Progress, ProgressArgs};
use crate::replay::read;

const HOUR_MS: i64 = 3_600_000;

/// Now, epoch ms.
pub fn now_ms() -> i64 {
    pulse_platform::clock::now_ms()
}

/// What decides whether a range is closed, as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    /// The latest end of a final window in ClickHouse: the processor's watermark has
    /// passed it plus the allowed lateness, so no window ending at or before it changes.
    pub final_window_end_ms: Option<i64>,
    /// Now − allowed lateness − settle: the writers have flushed what came before.
    pub settled_ms: i64,
}

impl Horizon {
    /// Ranges ending at or before this are closed.
    pub fn closed_until(&self) -> Option<i64> {
        self.final_window_end_ms.map(|f| f.min(self.settled_ms))
    }
}

/// Refuses a range whose end is not closed, saying which condition is missing.
pub fn check_closed(to: i64, h: &Horizon) -> Result<(), LedgerError> {
    let t = crate::rfc3339;
    match h.final_window_end_ms {
        None => Err(LedgerError::NotClosed(format!(
            "the range is not closed: no window ending at or after --to {} is final yet (the processor's watermark has not passed --to plus the allowed lateness); try again later or choose an earlier --to",
            t(to)
        ))),
        Some(f) if to > f => Err(LedgerError::NotClosed(format!(
            "the range is not closed: --to {} is after the latest final window end {} (the processor's watermark has not passed --to plus the allowed lateness yet); try again later or choose an earlier --to",
            t(to),
            t(f)
        ))),
        Some(_) if to > h.settled_ms => Err(LedgerError::NotClosed(format!(
            "the range is not closed: --to {} is less than the allowed lateness plus --settle before now (writers may still be flushing it; latest settled end {})",
            t(to),
            t(h.settled_ms)
        ))),
        Some(_) => Ok(()),
    }
}

/// An archive object read: what is kept of it until its rows are reconciled.
#[derive(Debug, Clone)]
struct CachedObject {
    /// Its hour folder's start.
    hour_ms: i64,
    /// Ids and event times of its rows not reconciled yet (and not deferred).
    rows: Vec<(Box<str>, i64)>,
    /// False when rows of deferred windows were left out: read again after the deferral.
    complete: bool,
}

/// The ledger's open sources.
pub struct Sources {
    args: SourceArgs,
    events: Arc<Mutex<TopicTail>>,
    late: Arc<Mutex<TopicTail>>,
    dlq: Arc<Mutex<TopicTail>>,
    pub book: Book,
    store: Option<Arc<dyn ObjectStore>>,
    /// Archive object → its rows of times not reconciled yet.
    archive_cache: HashMap<ObjectPath, CachedObject>,
    /// Whether the book defers windows over the budget (else a range over it is refused).
    bounded: bool,
    http: reqwest::Client,
    token: pulse_platform::secret::Secret,
    /// How to show the progress of reading the topics and the archive (None: not shown).
    progress: Option<ProgressArgs>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("accepted", &self.book.accepted.len())
            .field("archive_objects", &self.archive_cache.len())
            .finish_non_exhaustive()
    }
}

impl Sources {
    /// Opens the topics at `keep_from` minus the scan margin, keeping event times in
    /// `[keep_from, keep_to)`.
    pub async fn open(
        args: &SourceArgs,
        keep_from: i64,
        keep_to: i64,
    ) -> Result<Self, LedgerError> {
        let start = keep_from
            .saturating_sub(i64::try_from(args.scan_margin.as_millis()).unwrap_or(i64::MAX));
        let t = args.read_timeout;
        let events = open_async(&args.kafka, &args.events_topic, Some(start), t).await?;
        let late = open_async(&args.kafka, &args.late_topic, Some(start), t).await?;
        let dlq = open_async(&args.kafka, &args.dlq_topic, Some(start), t).await?;
        let store = if args.skip_archive {
            None
        } else {
            Some(args.s3.object_store()?)
        };
        Ok(Self {
            args: args.clone(),
            events: Arc::new(Mutex::new(events)),
            late: Arc::new(Mutex::new(late)),
            dlq: Arc::new(Mutex::new(dlq)),
            book: Book::new(keep_from, keep_to),
            store,
            archive_cache: HashMap::new(),
            bounded: false,
            http: args.query_tls.client().map_err(|(key, reason)| {
                LedgerError::Config(pulse_platform::config::ConfigErrors(vec![
                    pulse_platform::config::ConfigError {
                        key: key.into(),
                        reason,
                    },
                ]))
            })?,
            token: args.token()?,
            progress: None,
        })
    }

    /// Shows the progress of the next catch-ups and archive reads as `args` say.
    pub fn show_progress(&mut self, args: &ProgressArgs) {
        self.progress = Some(args.clone());
    }

    /// The records the topics hold beyond where their tails are (None: not known).
    async fn backlog(&self) -> Option<u64> {
        let t = self.args.read_timeout;
        let mut total = 0;
        for tail in [&self.events, &self.late, &self.dlq] {
            total += backlog_async(tail, t).await.ok()?;
        }
        Some(total)
    }

    /// Reads what the topics got since the last call into the book, a bounded chunk at a
    /// time. Without a budget on the book (`pulsectl ledger --from --to`), a range holding
    /// more than `--max-held-events` events is refused as soon as it is seen.
    pub async fn catch_up(&mut self) -> Result<(), LedgerError> {
        let t = self.args.read_timeout;
        // Events first: the late and dead-letter records of every event read are produced
        // after it, so reading them second finds those of all but the newest events (which
        // `reconcile` leaves out as in flight).
        // Each chunk is kept as soon as it was read: a tail does not give records twice.
        let progress = match &self.progress {
            // The backlog costs a watermark request per partition: only when shown.
            Some(a) if a.mode != Mode::Off => {
                Progress::start(a, "ledger topics", "records", self.backlog().await)
            }
            _ => Progress::hidden(),
        };
        let mut read = [0_usize; 3];
        for (n, tail) in [&self.events, &self.late, &self.dlq]
            .into_iter()
            .enumerate()
        {
            loop {
                let (records, more) = read_async(tail, t).await?;
                read[n] += records.len();
                progress.inc(records.len() as u64);
                progress.set_message(format!(
                    "events {}, late {}, dlq {}",
                    read[0], read[1], read[2]
                ));
                if Arc::ptr_eq(tail, &self.events) {
                    self.book.add_events(&records);
                } else if Arc::ptr_eq(tail, &self.late) {
                    self.book.add_late(&records);
                } else {
                    self.book.add_dlq(&records, &self.args.events_topic);
                }
                drop(records);
                if !self.bounded && self.book.held() > self.args.max_held_events {
                    return Err(LedgerError::OverBudget {
                        held: self.book.held(),
                        max: self.args.max_held_events,
                    });
                }
                if !more {
                    break;
                }
            }
        }
        progress.finish();
        Ok(())
    }

    /// Bounds the book by `--max-held-events`, deferring windows that do not fit (`ledger
    /// watch`; see `book`).
    pub fn bound_memory(&mut self) {
        self.bounded = true;
        self.book.set_budget(Budget {
            max_held: self.args.max_held_events,
            window_ms: self.args.window_ms(),
        });
    }

    /// Where closed ranges end now, looking at final windows starting at or after
    /// `since` (the start of the last window of the range to close: older days are not
    /// read).
    pub async fn closed_horizon(&self, since: i64, now: i64) -> Result<Horizon, LedgerError> {
        let lateness = self.args.windowing.allowed_lateness_ms;
        let settle = i64::try_from(self.args.settle.as_millis()).unwrap_or(i64::MAX);
        Ok(Horizon {
            final_window_end_ms: store::final_window_end(&self.args.clickhouse.client(), since)
                .await?,
            settled_ms: now.saturating_sub(lateness).saturating_sub(settle),
        })
    }

    /// The archive's ids and event times in `[from, to)`.
    async fn archive(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        from: i64,
        to: i64,
    ) -> Result<HashMap<String, i64>, LedgerError> {
        let mut out = HashMap::new();
        let first_hour = from.div_euclid(HOUR_MS) * HOUR_MS;
        // Every folder is listed first, so the progress knows how many objects to read.
        let mut listed = Vec::new();
        for (i, bucket) in read::hour_folders(from, to).iter().enumerate() {
            let hour_ms = first_hour + i64::try_from(i).unwrap_or(0) * HOUR_MS;
            let folder = read::folder_path(&self.args.s3, bucket);
            listed.push((hour_ms, read::list_folder(store.as_ref(), &folder).await?));
        }
        let to_read = listed
            .iter()
            .flat_map(|(_, keys)| keys)
            .filter(|k| !self.archive_cache.contains_key(*k))
            .count();
        let progress = Progress::maybe(
            self.progress.as_ref(),
            "ledger archive",
            "objects",
            Some(to_read as u64),
        );
        let mut rows_read = 0_usize;
        for (hour_ms, keys) in listed {
            for key in keys {
                if !self.archive_cache.contains_key(&key) {
                    let (_, rows) = read::read_object(store, &key, i64::MIN, i64::MAX)
                        .await
                        .map_err(|e| LedgerError::Archive {
                            key: key.to_string(),
                            reason: e.to_string(),
                        })?;
                    rows_read += rows.len();
                    progress.inc(1);
                    progress.set_message(format!("rows {rows_read}"));
                    // Only what is still to reconcile is kept: rows of reconciled times
                    // are not, nor those of deferred windows (the object is read again).
                    let (keep_from, keep_to) =
                        (from, self.book.deferred_from().unwrap_or(i64::MAX));
                    let complete = rows.iter().all(|r| r.event_time_ms < keep_to);
                    let rows: Vec<(Box<str>, i64)> = rows
                        .into_iter()
                        .filter(|r| r.event_time_ms >= keep_from)
                        .filter(|r| r.event_time_ms < keep_to)
                        .map(|r| (r.event_id.into_boxed_str(), r.event_time_ms))
                        .collect();
                    self.archive_cache.insert(
                        key.clone(),
                        CachedObject {
                            hour_ms,
                            rows,
                            complete,
                        },
                    );
                }
                if let Some(o) = self.archive_cache.get(&key) {
                    for (id, t) in &o.rows {
                        if (from..to).contains(t) {
                            out.insert(id.to_string(), *t);
                        }
                    }
                }
            }
        }
        progress.finish();
        Ok(out)
    }

    /// What the stores hold for `[from, to)`.
    pub async fn stored(&mut self, from: i64, to: i64) -> Result<Stored, LedgerError> {
        let ch = self.args.clickhouse.client();
        let clickhouse = store::event_ids(&ch, from, to)
            .await?
            .into_iter()
            .map(|r| (r.event_id, r.time_ms))
            .collect();
        let windows = store::user_windows(&ch, from, to).await?;
        let archive = match self.store.clone() {
            Some(s) => Some(self.archive(&s, from, to).await?),
            None => None,
        };
        let served_revenue: Option<BTreeMap<(i64, String), i128>> = if self.args.skip_revenue {
            None
        } else {
            Some(
                revenue::served(
                    &self.http,
                    &self.args.query_url,
                    &self.token,
                    from,
                    to,
                    self.args.read_timeout,
                )
                .await?,
            )
        };
        Ok(Stored {
            clickhouse,
            archive,
            windows,
            served_revenue,
        })
    }

    /// Reconciles `[from, to)` with what the book holds now (call [`Self::catch_up`] first).
    pub async fn reconcile(&mut self, from: i64, to: i64) -> Result<Report, LedgerError> {
        let stored = self.stored(from, to).await?;
        let settle = i64::try_from(self.args.settle.as_millis()).unwrap_or(i64::MAX);
        Ok(reconcile(
            &self.book,
            &stored,
            (from, to),
            self.args.window_ms(),
            now_ms().saturating_sub(settle),
        ))
    }

    /// Forgets what came before `t` (reconciled): book entries and archive objects of
    /// hours ending at or before it. When that ends a deferral of the book, the events
    /// topic is read again from the first deferred record (and archive objects read in
    /// part are read again): returns true, and the caller catches up before reconciling
    /// the next window.
    pub fn forget_before(&mut self, t: i64) -> bool {
        self.book.forget_before(t);
        // Objects of hours still open stay listed (not read again); only their rows of
        // times not reconciled yet are kept, so memory follows the open span, not the hour.
        self.archive_cache
            .retain(|_, o| o.hour_ms.saturating_add(HOUR_MS) > t);
        for o in self.archive_cache.values_mut() {
            o.rows.retain(|(_, et)| *et >= t);
        }
        let Some(rewind) = self.book.take_rewind() else {
            return false;
        };
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .rewind(&rewind);
        self.archive_cache.retain(|_, o| o.complete);
        metrics::counter!(super::metrics::REREADS_TOTAL).increment(1);
        tracing::info!(from = %crate::rfc3339(t), partitions = rewind.len(), "ledger: reading the deferred windows' events again");
        true
    }

    /// Entries the book holds and archive rows kept (the memory that grows with events).
    pub fn held(&self) -> (usize, usize) {
        (
            self.book.held(),
            self.archive_cache.values().map(|o| o.rows.len()).sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_764_028_800_000;

    #[test]
    fn a_range_is_closed_only_when_final_and_settled() {
        let h = Horizon {
            final_window_end_ms: Some(T),
            settled_ms: T + 60_000,
        };
        assert_eq!(h.closed_until(), Some(T));
        assert!(check_closed(T, &h).is_ok());
        let e = check_closed(T + 60_000, &h).unwrap_err().to_string();
        assert!(e.contains("after the latest final window end"), "{e}");
        let h2 = Horizon {
            final_window_end_ms: Some(T + 120_000),
            settled_ms: T,
        };
        let e = check_closed(T + 60_000, &h2).unwrap_err().to_string();
        assert!(e.contains("--settle"), "{e}");
        let none = Horizon {
            final_window_end_ms: None,
            settled_ms: T,
        };
        assert_eq!(none.closed_until(), None);
        assert!(
            check_closed(T - 60_000, &none)
                .unwrap_err()
                .to_string()
                .contains("no window ending at or after --to")
        );
    }
}
