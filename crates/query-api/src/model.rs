//! The JSON shapes of the HTTP API (times as RFC 3339 UTC strings, money as exact decimal
//! strings), with their OpenAPI schemas, and the conversions from the query core's
//! answers. The gRPC shapes are the generated protobuf types (see `grpc`).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::freshness::{self, StageFreshness};
use crate::params::{TimeRange, rfc3339};
use crate::query;

/// Query parameters of a series (`from`, `to`, `step`).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SeriesParams {
    /// Start (inclusive): RFC 3339 or epoch ms; default `to` − 1 h.
    pub from: Option<String>,
    /// End (exclusive): RFC 3339 or epoch ms; default now.
    pub to: Option<String>,
    /// Bucket length: 1m, 5m, 15m, 1h or 1d; default 1m.
    pub step: Option<String>,
}

/// Query parameters of `/v1/revenue`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevenueParams {
    /// Start (inclusive): RFC 3339 or epoch ms; default `to` − 1 h.
    pub from: Option<String>,
    /// End (exclusive): RFC 3339 or epoch ms; default now.
    pub to: Option<String>,
    /// Bucket length: 1m, 5m, 15m, 1h or 1d; default 1m.
    pub step: Option<String>,
    /// Only this ISO-4217 currency (three uppercase letters); default every currency.
    pub currency: Option<String>,
}

/// Query parameters of a range (`from`, `to`).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeParams {
    /// Start (inclusive): RFC 3339 or epoch ms; default `to` − 1 h.
    pub from: Option<String>,
    /// End (exclusive): RFC 3339 or epoch ms; default now.
    pub to: Option<String>,
}

/// Query parameters of `/v1/top_pages`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TopPagesParams {
    /// Start (inclusive): RFC 3339 or epoch ms; default `to` − 1 h.
    pub from: Option<String>,
    /// End (exclusive): RFC 3339 or epoch ms; default now.
    pub to: Option<String>,
    /// Number of pages, 1..=1000; default 10.
    pub limit: Option<String>,
}

/// Query parameters of `/v1/events`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Required: the producer's `metadata.trace_id` as it sent it (any form, e.g.
    /// `abcd-1234`; matched exactly), 1 to 256 bytes.
    pub source_trace_id: Option<String>,
    /// Event-time start (inclusive): RFC 3339 or epoch ms; default `to` − 1 h.
    pub from: Option<String>,
    /// Event-time end (exclusive): RFC 3339 or epoch ms; default now.
    pub to: Option<String>,
    /// Most events answered, 1..=1000; default 100.
    pub limit: Option<String>,
}

/// Query parameters of `/v1/active_users/current`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CurrentParams {
    /// Look-back: `<n>m` or `<n>h` up to 24h, or `1d`; default 5m.
    pub window: Option<String>,
}

/// Data-freshness metadata carried by every analytic answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Freshness {
    /// Latest write of the processor's aggregates to ClickHouse (null when empty).
    pub data_last_refreshed_at: Option<String>,
    /// Latest final window end + allowed lateness: a lower bound of the processor's
    /// event-time watermark (null when no window is final).
    pub watermark: Option<String>,
    /// Seconds between now and the latest event time in the aggregates.
    pub lag_seconds: Option<f64>,
    /// True when every window of the range is final and can no longer change.
    pub complete: bool,
    /// The processing rules versions of the aggregates the answer used (each window and
    /// session at its latest version), sorted and distinct: `<name>+<fingerprint>` or
    /// `<fingerprint>` (docs/operations.md, "Processing rules and their version"); `""` stands for
    /// rows written before rules versions existed. More than one means the answer mixes
    /// rules (a rules change inside the range). Empty when no aggregate was used.
    #[serde(default)]
    pub rules_versions: Vec<String>,
}

impl From<freshness::Freshness> for Freshness {
    fn from(f: freshness::Freshness) -> Self {
        Self {
            data_last_refreshed_at: f.data_last_refreshed_at_ms.map(rfc3339),
            watermark: f.watermark_ms.map(rfc3339),
            lag_seconds: f.lag_seconds,
            complete: f.complete,
            rules_versions: f.rules_versions,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActiveUsersPoint {
    /// Bucket start.
    pub ts: String,
    pub active_users: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActiveUsersResponse {
    pub from: String,
    pub to: String,
    pub step: String,
    /// Every bucket from the bucket of `from` up to the last one before `to`.
    pub series: Vec<ActiveUsersPoint>,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActiveUsersCurrentResponse {
    pub active_users: u64,
    pub window: String,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RevenuePoint {
    pub ts: String,
    pub currency: String,
    /// Exact decimal, e.g. "12.34".
    pub amount: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RevenueResponse {
    pub from: String,
    pub to: String,
    pub step: String,
    /// Only (bucket, currency) pairs with data, ts asc then currency asc.
    pub series: Vec<RevenuePoint>,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CurrencyTotal {
    pub currency: String,
    pub amount: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RevenueLastHourResponse {
    pub totals: Vec<CurrencyTotal>,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PageViews {
    pub page: String,
    pub views: u64,
    pub unique_users: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TopPagesResponse {
    pub from: String,
    pub to: String,
    pub pages: Vec<PageViews>,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserResponse {
    pub user_id: String,
    pub from: String,
    pub to: String,
    pub first_seen: String,
    pub last_seen: String,
    pub page_views: u64,
    pub events: u64,
    pub sessions: u64,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionsResponse {
    pub from: String,
    pub to: String,
    pub sessions: u64,
    pub avg_duration_seconds: f64,
    pub p50_duration_seconds: f64,
    pub p95_duration_seconds: f64,
    pub avg_pages: f64,
    pub freshness: Freshness,
}

/// A stored event found by its producer trace id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StoredEvent {
    pub event_id: String,
    pub event_type: String,
    pub user_id: String,
    pub session_id: String,
    /// The producer's `metadata.event_timestamp`.
    pub event_time: String,
    /// When ingest accepted it.
    pub ingest_time: String,
    /// The W3C trace id (32 hex digits) of the request and record that carried the event:
    /// search it in the trace backend. Null when it came without W3C trace context.
    pub trace_id: Option<String>,
    /// The producer's `metadata.trace_id`, as sent.
    pub source_trace_id: String,
    pub source: String,
    /// The producer's own schema version of the event.
    pub schema_version: u32,
    pub page: String,
    /// ISO-4217 code, null for an event without an amount.
    pub currency: Option<String>,
    /// Exact decimal, null for an event without an amount.
    pub amount: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventsResponse {
    pub source_trace_id: String,
    pub from: String,
    pub to: String,
    /// By event time, then event id; at most `limit`.
    pub events: Vec<StoredEvent>,
    /// True when more events matched than `limit` (narrow the range or raise `limit`).
    pub truncated: bool,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Stage {
    /// ingest, processor, writer-clickhouse or writer-parquet.
    pub stage: String,
    /// Latest event time the stage handled (null without data).
    pub last_event_time: Option<String>,
    /// When the stage last made progress (null without data).
    pub last_refresh: Option<String>,
    /// Now − `last_event_time`, seconds.
    pub lag_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FreshnessResponse {
    pub stages: Vec<Stage>,
}

impl From<StageFreshness> for Stage {
    fn from(s: StageFreshness) -> Self {
        Self {
            stage: s.stage.to_owned(),
            last_event_time: s.last_event_time_ms.map(rfc3339),
            last_refresh: s.last_refresh_ms.map(rfc3339),
            lag_seconds: s.lag_seconds,
        }
    }
}

pub fn active_users(
    range: TimeRange,
    step: &str,
    a: query::Answer<Vec<query::ActiveUsersPoint>>,
) -> ActiveUsersResponse {
    ActiveUsersResponse {
        from: rfc3339(range.from_ms),
        to: rfc3339(range.to_ms),
        step: step.to_owned(),
        series: a
            .data
            .into_iter()
            .map(|p| ActiveUsersPoint {
                ts: rfc3339(p.ts_ms),
                active_users: p.active_users,
            })
            .collect(),
        freshness: a.freshness.into(),
    }
}

pub fn revenue(
    range: TimeRange,
    step: &str,
    a: query::Answer<Vec<query::RevenuePoint>>,
) -> RevenueResponse {
    RevenueResponse {
        from: rfc3339(range.from_ms),
        to: rfc3339(range.to_ms),
        step: step.to_owned(),
        series: a
            .data
            .into_iter()
            .map(|p| RevenuePoint {
                ts: rfc3339(p.ts_ms),
                currency: p.currency,
                amount: p.amount,
            })
            .collect(),
        freshness: a.freshness.into(),
    }
}

pub fn revenue_last_hour(a: query::Answer<Vec<query::CurrencyTotal>>) -> RevenueLastHourResponse {
    RevenueLastHourResponse {
        totals: a
            .data
            .into_iter()
            .map(|t| CurrencyTotal {
                currency: t.currency,
                amount: t.amount,
            })
            .collect(),
        freshness: a.freshness.into(),
    }
}

pub fn top_pages(range: TimeRange, a: query::Answer<Vec<query::PageViews>>) -> TopPagesResponse {
    TopPagesResponse {
        from: rfc3339(range.from_ms),
        to: rfc3339(range.to_ms),
        pages: a
            .data
            .into_iter()
            .map(|p| PageViews {
                page: p.page,
                views: p.views,
                unique_users: p.unique_users,
            })
            .collect(),
        freshness: a.freshness.into(),
    }
}

pub fn user(range: TimeRange, a: query::Answer<query::UserSummary>) -> UserResponse {
    let u = a.data;
    UserResponse {
        user_id: u.user_id,
        from: rfc3339(range.from_ms),
        to: rfc3339(range.to_ms),
        first_seen: rfc3339(u.first_seen_ms),
        last_seen: rfc3339(u.last_seen_ms),
        page_views: u.page_views,
        events: u.events,
        sessions: u.sessions,
        freshness: a.freshness.into(),
    }
}

pub fn sessions(range: TimeRange, a: query::Answer<query::SessionStats>) -> SessionsResponse {
    let s = a.data;
    SessionsResponse {
        from: rfc3339(range.from_ms),
        to: rfc3339(range.to_ms),
        sessions: s.sessions,
        avg_duration_seconds: s.avg_duration_seconds,
        p50_duration_seconds: s.p50_duration_seconds,
        p95_duration_seconds: s.p95_duration_seconds,
        avg_pages: s.avg_pages,
        freshness: a.freshness.into(),
    }
}

pub fn events(
    source_trace_id: String,
    range: TimeRange,
    a: query::Answer<query::EventSearch>,
) -> EventsResponse {
    EventsResponse {
        source_trace_id,
        from: rfc3339(range.from_ms),
        to: rfc3339(range.to_ms),
        events: a
            .data
            .events
            .into_iter()
            .map(|e| {
                let (currency, amount) = e.amount.unzip();
                StoredEvent {
                    event_id: e.event_id,
                    event_type: e.event_type,
                    user_id: e.user_id,
                    session_id: e.session_id,
                    event_time: rfc3339(e.event_time_ms),
                    ingest_time: rfc3339(e.ingest_time_ms),
                    trace_id: e.trace_id,
                    source_trace_id: e.source_trace_id,
                    source: e.source,
                    schema_version: e.schema_version,
                    page: e.page,
                    currency,
                    amount,
                }
            })
            .collect(),
        truncated: a.data.truncated,
        freshness: a.freshness.into(),
    }
}
