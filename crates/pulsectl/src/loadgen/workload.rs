//! The workload of `pulsectl loadgen`: a pure, seeded generator of user events. It owns
//! who does what and when (users running sessions over a Zipf-skewed page catalogue,
//! purchases in several currencies, and the out-of-order, late, duplicate and malformed
//! fractions); sending, timing and accounting are left to the caller. The same config
//! gives the same sequence of events (ids, users, pages, amounts, event-time offsets).

use std::collections::VecDeque;

use pulse_contracts::money::micros_to_decimal;
use pulse_contracts::pb::events::v1 as pb;
use serde_json::{Map, Value, json};

/// The currencies purchases are made in, with their share of purchases (in %).
pub const CURRENCIES: &[(&str, u32)] = &[("USD", 45), ("EUR", 30), ("GBP", 15), ("JPY", 10)];

/// An ISO-4217-shaped code that is not a currency (for malformed events).
const UNKNOWN_CURRENCY: &str = "XYZ";
/// An event type that breaks `^[a-z][a-z0-9_]{0,63}$`.
const BAD_EVENT_TYPE: &str = "Page-View";
/// Duplicates re-send events at most this long (in planned send time) after the original,
/// well inside ingest's dedup window (600 s).
const DUPLICATE_HORIZON_MS: i64 = 60_000;

/// What the generator produces; fractions are shares of all events.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadConfig {
    pub seed: u64,
    pub users: u32,
    /// Events per second: event `n` is planned `n / rate` seconds after the start.
    pub rate: f64,
    /// Share of events whose event time is shifted back by up to `out_of_order_max_ms`.
    pub out_of_order: f64,
    pub out_of_order_max_ms: i64,
    /// Share of events (once `late_warmup_ms` of planned time has passed) dated
    /// `late_by_ms` before the start.
    pub late: f64,
    pub late_by_ms: i64,
    pub late_warmup_ms: i64,
    /// Share of events that re-send an earlier event with the same id.
    pub duplicates: f64,
    /// Share of events that fail ingest's validation.
    pub malformed: f64,
    /// A duplicate repeats an event at least this many events back (so the original's
    /// request has normally been answered before the copy is sent).
    pub duplicate_min_distance: u64,
    /// Which user a normal event belongs to.
    pub user_order: UserOrder,
}

/// How normal events are spread over the users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UserOrder {
    /// Each event picks a user uniformly at random (a few users are seen far more often
    /// than others, some never in a short run).
    #[default]
    Random,
    /// The users take turns in a fixed, scattered order: the first `users` normal events
    /// go to `users` distinct users, then the turn repeats. Every user is active, each
    /// once every `users / rate` seconds (long-lived sessions when that is below the
    /// session gap): the high-cardinality workload of the memory benchmark.
    Turns,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            users: 200,
            rate: 50.0,
            out_of_order: 0.05,
            out_of_order_max_ms: 3_000,
            late: 0.01,
            late_by_ms: 600_000,
            late_warmup_ms: 10_000,
            duplicates: 0.02,
            malformed: 0.01,
            duplicate_min_distance: 40,
            user_order: UserOrder::Random,
        }
    }
}

/// The ways a malformed event breaks the ingest contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    MissingUserId,
    NegativeAmount,
    UnknownCurrency,
    BadEventType,
}

impl Malformed {
    const ALL: [Malformed; 4] = [
        Malformed::MissingUserId,
        Malformed::NegativeAmount,
        Malformed::UnknownCurrency,
        Malformed::BadEventType,
    ];

    /// The validation code ingest answers with (README "Ingest", validation table).
    pub fn expected_code(self) -> &'static str {
        match self {
            Malformed::MissingUserId => "missing_field",
            Malformed::NegativeAmount => "invalid_amount",
            Malformed::UnknownCurrency => "invalid_currency",
            Malformed::BadEventType => "invalid_event_type",
        }
    }
}

/// Why an event was generated the way it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    /// Event time shifted back (still within the processor's out-of-orderness).
    OutOfOrder,
    /// Event time far before the start: beyond the processor's allowed lateness.
    Late,
    /// A re-send of the event with sequence number `of`.
    Duplicate {
        of: u64,
    },
    Malformed(Malformed),
}

/// One generated event. Times are offsets from the run's start; the sender adds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenEvent {
    /// Sequence number in the generated stream (a duplicate has its own).
    pub seq: u64,
    pub kind: Kind,
    pub event_id: String,
    /// None only for the missing-user-id malformed event.
    pub user_id: Option<String>,
    pub session_id: String,
    pub event_type: String,
    pub page: String,
    pub currency: String,
    pub amount_micros: Option<i64>,
    /// Event time − run start, ms.
    pub event_offset_ms: i64,
    /// When the event is due to be sent: planned time − run start, ms.
    pub send_offset_ms: i64,
}

impl GenEvent {
    /// The HTTP JSON form (amounts as exact decimal strings, event time as epoch ms).
    pub fn to_json(&self, start_ms: i64) -> Value {
        let mut key = Map::new();
        if let Some(u) = &self.user_id {
            key.insert("user_id".into(), json!(u));
            key.insert("session_id".into(), json!(self.session_id));
        }
        let mut payload = Map::new();
        if !self.page.is_empty() {
            payload.insert("page".into(), json!(self.page));
        }
        if let Some(a) = self.amount_micros {
            payload.insert("amount".into(), json!(micros_to_decimal(a)));
            payload.insert("currency".into(), json!(self.currency));
        }
        json!({
            "event_id": self.event_id,
            "schema_version": 1,
            "event_type": self.event_type,
            "key": key,
            "payload": payload,
            "metadata": {
                "event_timestamp": start_ms.saturating_add(self.event_offset_ms),
                "source": "loadgen",
            },
        })
    }

    /// The gRPC form. A missing user id is sent as a missing `key`.
    pub fn to_pb(&self, start_ms: i64) -> pb::Event {
        pb::Event {
            event_id: self.event_id.clone(),
            schema_version: 1,
            event_type: self.event_type.clone(),
            key: self.user_id.as_ref().map(|u| pb::EventKey {
                user_id: u.clone(),
                session_id: self.session_id.clone(),
            }),
            payload: Some(pb::Payload {
                page: self.page.clone(),
                currency: if self.amount_micros.is_some() {
                    self.currency.clone()
                } else {
                    String::new()
                },
                amount_micros: self.amount_micros,
                ..Default::default()
            }),
            metadata: Some(pb::Metadata {
                event_timestamp_ms: start_ms.saturating_add(self.event_offset_ms),
                source: "loadgen".into(),
                ..Default::default()
            }),
            ingest: None,
        }
    }

    /// Event time in epoch ms for a run that started at `start_ms`.
    pub fn event_time_ms(&self, start_ms: i64) -> i64 {
        start_ms.saturating_add(self.event_offset_ms)
    }
}

/// SplitMix64: small, fast and fully specified here, so a seed gives the same stream on
/// every platform and with every dependency version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); 0 when n is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in [lo, hi] (inclusive).
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        let span = u64::try_from(hi - lo).unwrap_or(u64::MAX).saturating_add(1);
        lo.saturating_add(i64::try_from(self.below(span)).unwrap_or(0))
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// The page catalogue (~50 pages) with Zipf-like popularity (weight 1 / rank^1.1).
#[derive(Debug, Clone)]
pub struct Catalogue {
    pub pages: Vec<String>,
    cdf: Vec<f64>,
}

impl Catalogue {
    pub fn new() -> Self {
        let mut pages: Vec<String> = [
            "/",
            "/pricing",
            "/features",
            "/docs",
            "/blog",
            "/signup",
            "/login",
            "/about",
            "/cart",
            "/checkout",
        ]
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
        pages.extend((1..=25).map(|i| format!("/products/p-{i:02}")));
        pages.extend((1..=15).map(|i| format!("/blog/post-{i:02}")));
        let weights: Vec<f64> = (1..=pages.len())
            .map(|rank| 1.0 / (rank as f64).powf(1.1))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Self { pages, cdf }
    }

    /// A page drawn by popularity.
    pub fn pick(&self, rng: &mut Rng) -> &str {
        let i = self.pick_index(rng);
        self.page(i)
    }

    /// The index (in `pages`) of a page drawn by popularity.
    fn pick_index(&self, rng: &mut Rng) -> u16 {
        let u = rng.unit();
        let i = self.cdf.partition_point(|c| *c <= u);
        u16::try_from(i.min(self.pages.len().saturating_sub(1))).unwrap_or(0)
    }

    /// The page at `index` ("/" when out of range).
    fn page(&self, index: u16) -> &str {
        self.pages
            .get(usize::from(index))
            .map_or("/", String::as_str)
    }

    /// The index of `page` (0, "/", when it is not in the catalogue).
    fn index_of(&self, page: &str) -> u16 {
        self.pages
            .iter()
            .position(|p| p == page)
            .and_then(|i| u16::try_from(i).ok())
            .unwrap_or(0)
    }

    /// A product page drawn by popularity among products.
    fn pick_product(&self, rng: &mut Rng) -> u16 {
        for _ in 0..8 {
            let i = self.pick_index(rng);
            if self.page(i).starts_with("/products/") {
                return i;
            }
        }
        self.index_of(&format!("/products/p-{:02}", rng.range(1, 25)))
    }
}

impl Default for Catalogue {
    fn default() -> Self {
        Self::new()
    }
}

/// The event types a session's steps use (a [`Step`] holds an index into it).
const STEP_TYPES: [&str; 4] = ["page_view", "click", "add_to_cart", "purchase"];
const PAGE_VIEW: u8 = 0;
const CLICK: u8 = 1;
const ADD_TO_CART: u8 = 2;
const PURCHASE: u8 = 3;

/// One planned step of a session: 4 bytes (indices, not strings), so a workload of a
/// million users holding their planned sessions stays small.
#[derive(Debug, Clone, Copy)]
struct Step {
    event_type: u8,
    page: u16,
}

/// A user's session counter and the rest of the current session's plan.
#[derive(Debug, Clone, Default)]
struct User {
    sessions: u64,
    plan: Box<[Step]>,
    next: usize,
}

/// The seeded event generator; an endless iterator of [`GenEvent`]s.
#[derive(Debug, Clone)]
pub struct Workload {
    cfg: WorkloadConfig,
    rng: Rng,
    catalogue: Catalogue,
    users: Vec<User>,
    next_seq: u64,
    /// Recent normal events, candidates for duplicates (ordered by seq).
    recent: VecDeque<GenEvent>,
    /// `UserOrder::Turns`: how many normal events have been generated, and the stride
    /// (coprime with the user count) that scatters the turn over the users.
    turn: u64,
    stride: u64,
}

impl Workload {
    pub fn new(cfg: WorkloadConfig) -> Self {
        let users = vec![User::default(); cfg.users.max(1) as usize];
        let stride = turn_stride(users.len() as u64);
        Self {
            rng: Rng::new(cfg.seed),
            cfg,
            catalogue: Catalogue::new(),
            users,
            next_seq: 0,
            recent: VecDeque::new(),
            turn: 0,
            stride,
        }
    }

    pub fn user_id(seed: u64, index: usize) -> String {
        format!("lg-{seed}-u{index:04}")
    }

    pub fn event_id(seed: u64, seq: u64) -> String {
        format!("lg-{seed}-{seq}")
    }

    /// The planned send offset of event `seq`.
    fn send_offset(&self, seq: u64) -> i64 {
        let rate = if self.cfg.rate > 0.0 {
            self.cfg.rate
        } else {
            1.0
        };
        (seq as f64 * 1000.0 / rate) as i64
    }

    fn plan_session(&mut self) -> Box<[Step]> {
        let rng = &mut self.rng;
        let mut plan = Vec::new();
        let mut views = 1;
        while views < 20 && rng.chance(0.8) {
            views += 1;
        }
        for _ in 0..views {
            let page = self.catalogue.pick_index(rng);
            let click = rng.chance(0.35);
            plan.push(Step {
                event_type: PAGE_VIEW,
                page,
            });
            if click {
                plan.push(Step {
                    event_type: CLICK,
                    page,
                });
            }
        }
        if rng.chance(0.25) {
            let product = self.catalogue.pick_product(rng);
            plan.push(Step {
                event_type: ADD_TO_CART,
                page: product,
            });
            if rng.chance(0.6) {
                let checkout = self.catalogue.index_of("/checkout");
                plan.push(Step {
                    event_type: PAGE_VIEW,
                    page: checkout,
                });
                plan.push(Step {
                    event_type: PURCHASE,
                    page: checkout,
                });
            }
        }
        plan.into_boxed_slice()
    }

    /// An amount in `currency`, in micros: cents for USD/EUR/GBP (one in eight with
    /// sub-cent micros, to exercise exact amounts), whole yen for JPY.
    fn amount(&mut self, currency: &str) -> i64 {
        if currency == "JPY" {
            self.rng.range(100, 30_000) * 1_000_000
        } else {
            let cents = self.rng.range(199, 19_999);
            let extra = if self.rng.chance(0.125) {
                self.rng.range(1, 9_999)
            } else {
                0
            };
            cents * 10_000 + extra
        }
    }

    fn currency(&mut self) -> &'static str {
        let total: u32 = CURRENCIES.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.below(u64::from(total));
        for (c, w) in CURRENCIES {
            if x < u64::from(*w) {
                return c;
            }
            x -= u64::from(*w);
        }
        "USD"
    }

    fn random_user(&mut self) -> usize {
        self.rng.below(self.users.len() as u64) as usize
    }

    /// The user whose turn it is (`UserOrder::Turns`): `turn × stride mod users`, a
    /// permutation of the users for each round of `users` turns.
    fn user_in_turn(&mut self) -> usize {
        let n = self.users.len() as u64;
        let u = ((u128::from(self.turn % n) * u128::from(self.stride)) % u128::from(n)) as usize;
        self.turn = self.turn.wrapping_add(1);
        u
    }

    /// The next step of a user's session (a new session when it has none).
    fn normal(&mut self, seq: u64, send: i64) -> GenEvent {
        let u = match self.cfg.user_order {
            UserOrder::Random => self.random_user(),
            UserOrder::Turns => self.user_in_turn(),
        };
        if self.users[u].next >= self.users[u].plan.len() {
            let plan = self.plan_session();
            let user = &mut self.users[u];
            user.sessions += 1;
            user.plan = plan;
            user.next = 0;
        }
        let user = &mut self.users[u];
        let sessions = user.sessions;
        let step = user.plan.get(user.next).copied().unwrap_or(Step {
            event_type: PAGE_VIEW,
            page: 0,
        });
        user.next += 1;
        let (currency, amount) = if step.event_type == PURCHASE {
            let c = self.currency();
            (c.to_owned(), Some(self.amount(c)))
        } else {
            (String::new(), None)
        };
        let user_id = Self::user_id(self.cfg.seed, u);
        GenEvent {
            seq,
            kind: Kind::Normal,
            event_id: Self::event_id(self.cfg.seed, seq),
            session_id: format!("{user_id}-s{sessions}"),
            user_id: Some(user_id),
            event_type: STEP_TYPES[usize::from(step.event_type)].to_owned(),
            page: self.catalogue.page(step.page).to_owned(),
            currency,
            amount_micros: amount,
            event_offset_ms: send,
            send_offset_ms: send,
        }
    }

    fn malformed(&mut self, seq: u64, send: i64) -> GenEvent {
        let how = Malformed::ALL[self.rng.below(4) as usize];
        let u = self.random_user();
        let user_id = Self::user_id(self.cfg.seed, u);
        let mut e = GenEvent {
            seq,
            kind: Kind::Malformed(how),
            event_id: Self::event_id(self.cfg.seed, seq),
            session_id: format!("{user_id}-bad"),
            user_id: Some(user_id),
            event_type: "page_view".into(),
            page: self.catalogue.pick(&mut self.rng).to_owned(),
            currency: String::new(),
            amount_micros: None,
            event_offset_ms: send,
            send_offset_ms: send,
        };
        match how {
            Malformed::MissingUserId => e.user_id = None,
            Malformed::NegativeAmount => {
                e.event_type = "purchase".into();
                e.currency = "USD".into();
                e.amount_micros = Some(-self.amount("USD"));
            }
            Malformed::UnknownCurrency => {
                e.event_type = "purchase".into();
                e.currency = UNKNOWN_CURRENCY.into();
                e.amount_micros = Some(self.amount("USD"));
            }
            Malformed::BadEventType => e.event_type = BAD_EVENT_TYPE.into(),
        }
        e
    }

    /// A copy of a recent normal event at least `duplicate_min_distance` events back, if any.
    fn duplicate(&mut self, seq: u64, send: i64) -> Option<GenEvent> {
        while self
            .recent
            .front()
            .is_some_and(|e| e.send_offset_ms < send - DUPLICATE_HORIZON_MS)
        {
            self.recent.pop_front();
        }
        let eligible = self
            .recent
            .iter()
            .take_while(|e| e.seq.saturating_add(self.cfg.duplicate_min_distance) <= seq)
            .count();
        if eligible == 0 {
            return None;
        }
        let i = self.rng.below(eligible as u64) as usize;
        let original = self.recent.get(i)?;
        Some(GenEvent {
            seq,
            kind: Kind::Duplicate { of: original.seq },
            send_offset_ms: send,
            ..original.clone()
        })
    }
}

/// A stride coprime with `n` near `n × 0.618` (so consecutive turns land far apart in the
/// user space and every user gets one turn per round of `n`).
fn turn_stride(n: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    if n <= 2 {
        return 1;
    }
    let mut s = ((n as f64 * 0.618) as u64).max(1);
    while gcd(s, n) != 1 {
        s += 1;
    }
    s
}

impl Iterator for Workload {
    type Item = GenEvent;

    fn next(&mut self) -> Option<GenEvent> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let send = self.send_offset(seq);
        let c = &self.cfg;
        let (malformed, duplicates) = (c.malformed, c.duplicates);
        let late = if send >= c.late_warmup_ms {
            c.late
        } else {
            0.0
        };
        // Out-of-order applies to the events left, scaled so it is a share of all events.
        let rest = 1.0 - malformed - duplicates - c.late;
        let out_of_order = if rest > 0.0 {
            (c.out_of_order / rest).min(1.0)
        } else {
            0.0
        };
        let (ooo_max, late_by) = (c.out_of_order_max_ms.max(1), c.late_by_ms);
        let u = self.rng.unit();
        if u < malformed {
            return Some(self.malformed(seq, send));
        }
        if u < malformed + duplicates
            && let Some(e) = self.duplicate(seq, send)
        {
            return Some(e);
        }
        let mut e = self.normal(seq, send);
        if u >= malformed + duplicates && u < malformed + duplicates + late {
            e.kind = Kind::Late;
            e.event_offset_ms = -late_by - self.rng.range(0, 999);
            return Some(e);
        }
        if self.rng.chance(out_of_order) {
            e.kind = Kind::OutOfOrder;
            e.event_offset_ms = send - self.rng.range(1, ooo_max - 1).max(1);
        }
        self.recent.push_back(e.clone());
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64) -> WorkloadConfig {
        WorkloadConfig {
            seed,
            ..WorkloadConfig::default()
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_events_and_another_seed_does_not() {
        let a: Vec<GenEvent> = Workload::new(cfg(7)).take(5_000).collect();
        let b: Vec<GenEvent> = Workload::new(cfg(7)).take(5_000).collect();
        let c: Vec<GenEvent> = Workload::new(cfg(8)).take(5_000).collect();
        assert_eq!(a, b);
        assert_ne!(
            a.iter().map(|e| &e.page).collect::<Vec<_>>(),
            c.iter().map(|e| &e.page).collect::<Vec<_>>()
        );
        assert_eq!(a[0].event_id, "lg-7-0");
        assert_eq!(a[4_999].send_offset_ms, 4_999 * 1000 / 50);
    }

    #[test]
    fn the_fractions_roughly_hold() {
        let n = 200_000;
        let c = WorkloadConfig {
            late_warmup_ms: 0,
            ..cfg(3)
        };
        let events: Vec<GenEvent> = Workload::new(c.clone()).take(n).collect();
        let share = |f: &dyn Fn(&GenEvent) -> bool| {
            events.iter().filter(|e| f(e)).count() as f64 / n as f64
        };
        let close = |got: f64, want: f64| (got - want).abs() < want * 0.15;
        let malformed = share(&|e| matches!(e.kind, Kind::Malformed(_)));
        let dup = share(&|e| matches!(e.kind, Kind::Duplicate { .. }));
        let late = share(&|e| e.kind == Kind::Late);
        let ooo = share(&|e| e.kind == Kind::OutOfOrder);
        assert!(close(malformed, c.malformed), "malformed {malformed}");
        assert!(close(dup, c.duplicates), "duplicates {dup}");
        assert!(close(late, c.late), "late {late}");
        assert!(close(ooo, c.out_of_order), "out of order {ooo}");
        for how in Malformed::ALL {
            let s = share(&|e| e.kind == Kind::Malformed(how));
            assert!(close(s, c.malformed / 4.0), "{how:?} {s}");
        }
    }

    #[test]
    fn shifted_times_stay_within_their_bounds_and_late_ones_wait_for_the_warmup() {
        let c = WorkloadConfig {
            late: 0.05,
            ..cfg(11)
        };
        for e in Workload::new(c.clone()).take(50_000) {
            match e.kind {
                Kind::OutOfOrder => {
                    let shift = e.send_offset_ms - e.event_offset_ms;
                    assert!(shift >= 1 && shift < c.out_of_order_max_ms, "{e:?}");
                }
                Kind::Late => {
                    assert!(e.send_offset_ms >= c.late_warmup_ms, "{e:?}");
                    assert!(e.event_offset_ms <= -c.late_by_ms, "{e:?}");
                }
                Kind::Normal | Kind::Malformed(_) => {
                    assert_eq!(e.event_offset_ms, e.send_offset_ms)
                }
                Kind::Duplicate { of } => assert!(e.seq >= of + c.duplicate_min_distance),
            }
        }
    }

    #[test]
    fn duplicates_repeat_an_earlier_event_exactly_but_for_when_they_are_sent() {
        let all: Vec<GenEvent> = Workload::new(cfg(5)).take(20_000).collect();
        let mut seen = 0;
        for d in &all {
            if let Kind::Duplicate { of } = d.kind {
                let original = &all[of as usize];
                assert!(matches!(original.kind, Kind::Normal | Kind::OutOfOrder));
                assert_eq!(
                    (
                        &d.event_id,
                        &d.user_id,
                        &d.page,
                        d.amount_micros,
                        d.event_offset_ms
                    ),
                    (
                        &original.event_id,
                        &original.user_id,
                        &original.page,
                        original.amount_micros,
                        original.event_offset_ms
                    )
                );
                seen += 1;
            }
        }
        assert!(seen > 100);
        // Every other event has its own id.
        let mut ids: Vec<&str> = all
            .iter()
            .filter(|e| !matches!(e.kind, Kind::Duplicate { .. }))
            .map(|e| e.event_id.as_str())
            .collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }

    #[test]
    fn popular_pages_are_viewed_far_more_than_rare_ones_and_purchases_carry_exact_amounts() {
        let events: Vec<GenEvent> = Workload::new(cfg(9)).take(50_000).collect();
        let views = |page: &str| {
            events
                .iter()
                .filter(|e| e.event_type == "page_view" && e.page == page)
                .count()
        };
        assert!(views("/") > 10 * views("/blog/post-15"));
        let purchases: Vec<&GenEvent> = events
            .iter()
            .filter(|e| e.kind == Kind::Normal && e.event_type == "purchase")
            .collect();
        for c in ["USD", "EUR", "GBP", "JPY"] {
            assert!(purchases.iter().any(|e| e.currency == c), "{c}");
        }
        assert!(
            purchases
                .iter()
                .all(|e| e.amount_micros.is_some_and(|a| a > 0))
        );
        assert!(
            purchases
                .iter()
                .any(|e| e.amount_micros.is_some_and(|a| a % 10_000 != 0)),
            "some amounts use micros beyond cents"
        );
        let types: std::collections::BTreeSet<&str> =
            events.iter().map(|e| e.event_type.as_str()).collect();
        for t in ["page_view", "click", "add_to_cart", "purchase"] {
            assert!(types.contains(t), "{t}");
        }
    }

    #[test]
    fn users_in_turn_see_every_user_once_per_round_and_keep_their_sessions() {
        let users = 1_000;
        let c = WorkloadConfig {
            users,
            user_order: UserOrder::Turns,
            duplicates: 0.0,
            malformed: 0.0,
            late: 0.0,
            ..cfg(4)
        };
        let events: Vec<GenEvent> = Workload::new(c).take(3 * users as usize).collect();
        for round in events.chunks(users as usize) {
            let distinct: std::collections::BTreeSet<&str> =
                round.iter().filter_map(|e| e.user_id.as_deref()).collect();
            assert_eq!(distinct.len(), users as usize);
        }
        // Consecutive events go to users far apart, not to neighbours.
        assert_ne!(events[1].user_id, Some(Workload::user_id(4, 1)));
        // A user's next turn continues its session (sessions hold several events).
        let sessions: std::collections::BTreeSet<&str> =
            events.iter().map(|e| e.session_id.as_str()).collect();
        assert!(sessions.len() < events.len() * 2 / 3, "{}", sessions.len());
        for n in [1, 2, 3, 4, 10, 1_000_000, 999_983] {
            let s = turn_stride(n);
            assert!(s >= 1 && (n <= 2 || s < n), "{n}: {s}");
        }
    }

    #[test]
    fn events_serialise_to_the_ingest_contract() {
        let e = GenEvent {
            seq: 3,
            kind: Kind::Normal,
            event_id: "lg-1-3".into(),
            user_id: Some("lg-1-u0001".into()),
            session_id: "lg-1-u0001-s1".into(),
            event_type: "purchase".into(),
            page: "/checkout".into(),
            currency: "EUR".into(),
            amount_micros: Some(12_345_678),
            event_offset_ms: -5,
            send_offset_ms: 60,
        };
        let v = e.to_json(1_000);
        assert_eq!(v["payload"]["amount"], "12.345678");
        assert_eq!(v["payload"]["currency"], "EUR");
        assert_eq!(v["metadata"]["event_timestamp"], 995);
        assert_eq!(v["key"]["user_id"], "lg-1-u0001");
        let p = e.to_pb(1_000);
        assert_eq!(p.payload.unwrap().amount_micros, Some(12_345_678));
        assert_eq!(p.metadata.unwrap().event_timestamp_ms, 995);
        let missing = GenEvent { user_id: None, ..e };
        assert!(missing.to_json(0)["key"].get("user_id").is_none());
        assert!(missing.to_pb(0).key.is_none());
    }
}
