//! The query API against the real ClickHouse 18.16: every endpoint's numbers equal a
//! hand-computed expectation over hand-written aggregate rows (bucket edges, duplicates,
//! early and final versions, a late correction, merged sessions), gRPC answers the same
//! numbers as HTTP, and every error path has its status, code and parameter, including a
//! range longer than `--max-range-ms` and a query over a ClickHouse limit. Stored events
//! are found by the producer's own (non-W3C) trace id, each with its W3C trace id. Two
//! tests render the dashboard in headless Chromium and read its DOM: the numbers (money in
//! each currency's minor units, one scale per currency, the open minute marked, each
//! panel's freshness) and the states of a refused token, an unreachable API and an
//! unavailable ClickHouse; the last ones run
//! the real binary: every answer names its trace (continuing an incoming `traceparent`)
//! and that span reaches an OTLP collector, and made-up methods and paths add no metric
//! series.

use std::time::Duration;

use clap::Parser;
use pulse_contracts::pb::query::v1 as pb;
use pulse_contracts::pb::query::v1::query_service_client::QueryServiceClient;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::clock::now_ms;
use pulse_query_api::{AppState, Servers};
use pulse_storage::rows::{ActivityRow, EventRow, FreshnessRow, SessionRow, epoch_day};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::cleanup::{Database, TempDir};
use crate::support::service_process::{ServiceCommand, ServiceProcess, free_addr};
use crate::support::{grpc_meta, wait_until};

const TOKEN: &str = "test-token-1";
/// 2024-02-29T01:00:00Z, on a minute, five-minute and hour boundary.
const T0: i64 = 1_709_168_400_000;
const M: i64 = 60_000;

// ---------------------------------------------------------------------------------------
// ClickHouse seeding

/// A fresh database with Pulse's schema, dropped with the guard.
async fn database() -> Database {
    Database::migrated("pulse_query").await
}

/// One INSERT (one part): rows inserted by separate calls stay separate until a merge.
async fn insert<R: clickhouse::RowOwned + clickhouse::RowWrite>(
    ch: &ClickHouseConfig,
    table: &str,
    rows: &[R],
) {
    let client = ch.client();
    let mut ins = client.insert::<R>(table).await.unwrap();
    for r in rows {
        ins.write(r).await.unwrap();
    }
    ins.end().await.unwrap();
}

#[derive(Clone, Copy)]
struct W<'a> {
    user: &'a str,
    start: i64,
    events: u64,
    pages: &'a [(&'a str, u64)],
    revenue: &'a [(&'a str, i64)],
    first: i64,
    last: i64,
    version: u64,
    fin: bool,
    written: i64,
}

fn window(w: W<'_>) -> ActivityRow {
    ActivityRow {
        user_id: w.user.into(),
        window_start_ms: w.start,
        window_end_ms: w.start + M,
        page_views: w.pages.iter().map(|(_, n)| n).sum(),
        pages: w.pages.iter().map(|(p, _)| (*p).to_owned()).collect(),
        page_views_by_page: w.pages.iter().map(|(_, n)| *n).collect(),
        types: vec!["page_view".into()],
        events_by_type: vec![w.events],
        revenue_currencies: w.revenue.iter().map(|(c, _)| (*c).to_owned()).collect(),
        revenue_micros: w.revenue.iter().map(|(_, a)| *a).collect(),
        event_count: w.events,
        first_event_ms: w.first,
        last_event_ms: w.last,
        version: w.version,
        is_final: u8::from(w.fin),
        last_ingest_ms: w.last + 100,
        written_at_ms: w.written,
        window_date: epoch_day(w.start),
        rules_version: String::new(),
    }
}

#[allow(clippy::too_many_arguments)]
fn session(
    id: &str,
    user: &str,
    start: i64,
    duration: i64,
    pages: u64,
    version: u64,
    merged: &[&str],
    written: i64,
) -> SessionRow {
    SessionRow {
        session_id: id.into(),
        user_id: user.into(),
        start_ms: start,
        end_ms: start + duration,
        duration_ms: duration,
        page_count: pages,
        event_count: pages + 1,
        version,
        is_final: 1,
        last_ingest_ms: start + duration,
        merged_session_ids: merged.iter().map(|s| (*s).to_owned()).collect(),
        written_at_ms: written,
        start_date: epoch_day(start),
        rules_version: String::new(),
    }
}

fn fresh(stage: &str, partition: i32, event: i64, ingest: i64, written: i64) -> FreshnessRow {
    FreshnessRow {
        stage: stage.into(),
        kafka_partition: partition,
        last_event_time_ms: event,
        last_ingest_ms: ingest,
        written_at_ms: written,
    }
}

/// The hand-written seed. Expected answers for [T0, T0 + 10m) are derived in the
/// comments of each test from these rows.
async fn seed(ch: &ClickHouseConfig) {
    let wa = T0 + 20 * M;
    let base = W {
        user: "",
        start: 0,
        events: 1,
        pages: &[],
        revenue: &[],
        first: 0,
        last: 0,
        version: 1,
        fin: true,
        written: wa,
    };
    // alice @ 0m, inserted twice (a retried batch): counts once.
    let a0 = window(W {
        user: "alice",
        start: T0,
        events: 3,
        pages: &[("/", 1), ("/pricing", 1)],
        revenue: &[("EUR", 12_340_000)],
        first: T0 + 1_000,
        last: T0 + 50_000,
        ..base
    });
    insert(ch, "user_activity", std::slice::from_ref(&a0)).await;
    insert(ch, "user_activity", &[a0]).await;
    // alice @ 1m.
    let a1 = window(W {
        user: "alice",
        start: T0 + M,
        events: 1,
        pages: &[("/", 1)],
        first: T0 + M + 1_000,
        last: T0 + M + 2_000,
        ..base
    });
    // bob @ 0m: the final version (v2) is inserted before the early one (v1); v2 wins.
    let b0_final = window(W {
        user: "bob",
        start: T0,
        events: 2,
        pages: &[("/", 1), ("/docs", 1)],
        revenue: &[("EUR", 1_000_001), ("USD", 5_000_000)],
        first: T0 + 5_000,
        last: T0 + 40_000,
        version: 2,
        ..base
    });
    let b0_early = window(W {
        user: "bob",
        start: T0,
        events: 1,
        pages: &[("/", 1)],
        first: T0 + 5_000,
        last: T0 + 5_000,
        version: 1,
        fin: false,
        ..base
    });
    // bob @ 4m: final v3, then a late correction v5 with more events replaces it.
    let b4 = window(W {
        user: "bob",
        start: T0 + 4 * M,
        events: 2,
        pages: &[("/docs", 2)],
        first: T0 + 4 * M + 1_000,
        last: T0 + 4 * M + 30_000,
        version: 3,
        ..base
    });
    let b4_late = window(W {
        user: "bob",
        start: T0 + 4 * M,
        events: 5,
        pages: &[("/", 1), ("/docs", 3)],
        revenue: &[("USD", 2_500_000)],
        first: T0 + 4 * M + 1_000,
        last: T0 + 4 * M + 59_000,
        version: 5,
        ..base
    });
    // carol @ 5m: on a five-minute bucket edge.
    let c5 = window(W {
        user: "carol",
        start: T0 + 5 * M,
        events: 1,
        pages: &[("/", 1)],
        first: T0 + 5 * M,
        last: T0 + 5 * M,
        ..base
    });
    // dave @ 10m: exactly at `to` of the main range (excluded); the latest final window.
    let d10 = window(W {
        user: "dave",
        start: T0 + 10 * M,
        events: 2,
        pages: &[("/excluded", 100)],
        revenue: &[("EUR", 100_000_000)],
        first: T0 + 10 * M,
        last: T0 + 10 * M + 30_000,
        written: T0 + 25 * M,
        ..base
    });
    // erin @ -1m: before `from` (excluded).
    let e_1 = window(W {
        user: "erin",
        start: T0 - M,
        events: 1,
        pages: &[("/excluded", 100)],
        revenue: &[("EUR", 100_000_000)],
        first: T0 - M + 10_000,
        last: T0 - M + 10_000,
        ..base
    });
    insert(ch, "user_activity", &[a1, b0_final]).await;
    insert(ch, "user_activity", &[b0_early, b4]).await;
    insert(ch, "user_activity", &[b4_late, c5, d10, e_1]).await;

    let ws = T0 + 20 * M;
    // alice: an early version (v1) and the final one (v2).
    insert(
        ch,
        "sessions",
        &[session("a1", "alice", T0 + 1_000, 10_000, 1, 1, &[], ws)],
    )
    .await;
    let b1 = session("b1", "bob", T0 + 5_000, 35_000, 2, 1, &[], ws);
    insert(
        ch,
        "sessions",
        &[
            session("a1", "alice", T0 + 1_000, 61_000, 3, 2, &[], T0 + 30 * M),
            b1.clone(),
            // b2 absorbed b-old: b-old is superseded.
            session("b2", "bob", T0 + 3 * M, 118_000, 4, 2, &["b-old"], ws),
            session("b-old", "bob", T0 + 4 * M + 1_000, 10_000, 1, 1, &[], ws),
            // e2 is in the range but superseded by e1, which starts before it.
            session("e1", "erin", T0 - 2 * M, 200_000, 3, 2, &["e2"], ws),
            session("e2", "erin", T0 + M, 5_000, 1, 1, &[], ws),
            session("c1", "carol", T0 + 5 * M, 0, 1, 1, &[], ws),
            session("d1", "dave", T0 + 10 * M, 30_000, 2, 1, &[], ws),
        ],
    )
    .await;
    // b1 again (a duplicate write).
    insert(ch, "sessions", &[b1]).await;

    // Freshness: partition 0 written twice (the later write wins even with an older
    // event time), partition 1 once; no writer-parquet rows.
    insert(
        ch,
        "freshness",
        &[fresh(
            "writer-clickhouse",
            0,
            T0 + 11 * M,
            T0 + 11 * M,
            T0 + 10 * M,
        )],
    )
    .await;
    insert(
        ch,
        "freshness",
        &[
            fresh(
                "writer-clickhouse",
                0,
                T0 + 9 * M,
                T0 + 9 * M + 500,
                T0 + 20 * M,
            ),
            fresh("writer-clickhouse", 1, T0 + 8 * M, T0 + 10 * M, T0 + 21 * M),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// The API under test

struct Api {
    base: String,
    grpc: String,
    stop: CancellationToken,
    servers: Servers,
    http: reqwest::Client,
}

async fn serve_api(ch: &ClickHouseConfig, extra: &[&str]) -> Api {
    let mut args = vec![
        "pulse-query-api",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
    ];
    if !extra.contains(&"--freshness-cache-ms") {
        // Freshness read on every request unless a test is about the cache.
        args.extend(["--freshness-cache-ms", "0"]);
    }
    args.extend_from_slice(extra);
    // As if from PULSE_QUERY_API_TOKENS (a secret is never a flag).
    let config = pulse_query_api::Config {
        api_tokens: TOKEN.into(),
        ..pulse_query_api::Config::parse_from(args)
    };
    let state = AppState::new(&config).unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let servers = pulse_query_api::serve(http, grpc, state, stop.clone())
        .await
        .unwrap();
    Api {
        base: format!("http://{}", servers.http_addr),
        grpc: format!("http://{}", servers.grpc_addr),
        stop,
        servers,
        http: reqwest::Client::new(),
    }
}

impl Api {
    async fn stop(self) {
        self.stop.cancel();
        self.servers.wait().await.unwrap();
    }

    /// GET with the valid token: status, headers, JSON body.
    async fn get(&self, path: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        self.get_with(path, Some(&format!("Bearer {TOKEN}"))).await
    }

    async fn get_with(
        &self,
        path: &str,
        authorization: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, body)
    }

    /// GET that must answer 200.
    async fn ok(&self, path: &str) -> Value {
        let (status, _, body) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn client(&self) -> QueryServiceClient<tonic::transport::Channel> {
        QueryServiceClient::connect(self.grpc.clone())
            .await
            .unwrap()
    }
}

fn authed<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn req<T>(msg: T) -> tonic::Request<T> {
    authed(msg, Some(TOKEN))
}

fn range(from: i64, to: i64, step: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        from_ms: from,
        to_ms: to,
        step: step.into(),
    }
}

/// The active-users series as (RFC 3339 ts, users).
fn series(body: &Value) -> Vec<(String, u64)> {
    body["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["ts"].as_str().unwrap().to_owned(),
                p["active_users"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn ts(minutes: i64) -> String {
    pulse_query_api::params::rfc3339(T0 + minutes * M)
}

fn main_range() -> String {
    format!("from={T0}&to={}", T0 + 10 * M)
}

// ---------------------------------------------------------------------------------------
// Numbers

#[tokio::test]
async fn every_endpoint_answers_the_hand_computed_numbers() {
    let ch = database().await;
    seed(&ch).await;
    let api = serve_api(&ch, &[]).await;
    let r = main_range();

    // Active users per minute over [T0, T0+10m): 0m alice+bob (alice's duplicate and
    // bob's early version count once), 1m alice, 4m bob, 5m carol; dave at 10m = `to`
    // and erin before `from` are out; empty minutes are present with 0.
    let body = api.ok(&format!("/v1/active_users?{r}&step=1m")).await;
    let expected: Vec<(String, u64)> = [2, 1, 0, 0, 1, 1, 0, 0, 0, 0]
        .iter()
        .enumerate()
        .map(|(i, n)| (ts(i as i64), *n))
        .collect();
    assert_eq!(series(&body), expected, "{body}");
    assert_eq!(body["step"], "1m");
    assert_eq!(body["from"], "2024-02-29T01:00:00Z");
    assert_eq!(body["to"], "2024-02-29T01:10:00Z");
    // Five-minute buckets: distinct users per bucket (alice's two windows count once).
    let body = api.ok(&format!("/v1/active_users?{r}&step=5m")).await;
    assert_eq!(series(&body), vec![(ts(0), 2), (ts(5), 1)]);
    // An unaligned `from` (T0+3m): the first bucket is still aligned (T0) but holds only
    // the windows from T0+3m on (bob @ 4m).
    let body = api
        .ok(&format!(
            "/v1/active_users?from={}&to={}&step=5m",
            T0 + 3 * M,
            T0 + 10 * M
        ))
        .await;
    assert_eq!(series(&body), vec![(ts(0), 1), (ts(5), 1)]);
    // A window exactly at `from` is in, one exactly at `to` is out.
    let edge = |from: i64, to: i64| format!("/v1/active_users?from={from}&to={to}&step=1m");
    let body = api.ok(&edge(T0 + 5 * M, T0 + 6 * M)).await;
    assert_eq!(series(&body), vec![(ts(5), 1)]);
    let body = api.ok(&edge(T0 + 9 * M, T0 + 10 * M)).await;
    assert_eq!(series(&body), vec![(ts(9), 0)]);
    let body = api.ok(&edge(T0 + 10 * M, T0 + 11 * M)).await;
    assert_eq!(series(&body), vec![(ts(10), 1)]);
    // One-day buckets are aligned to UTC midnight: erin, alice, bob, carol, dave.
    let body = api
        .ok(&format!(
            "/v1/active_users?from={}&to={}&step=1d",
            T0 - M,
            T0 + 11 * M
        ))
        .await;
    assert_eq!(series(&body), vec![("2024-02-29T00:00:00Z".to_owned(), 5)]);
    // RFC 3339 bounds mean the same as epoch ms.
    let body = api
        .ok("/v1/active_users?from=2024-02-29T01:00:00Z&to=2024-02-29T01:10:00Z&step=1h")
        .await;
    assert_eq!(series(&body), vec![(ts(0), 3)]);

    // Revenue per minute: 0m EUR 12.34 (alice) + 1.000001 (bob's final version) and USD 5;
    // 4m USD 2.50 from bob's late correction (v3 had none). Dave and erin are out.
    let body = api.ok(&format!("/v1/revenue?{r}&step=1m")).await;
    assert_eq!(
        body["series"],
        json!([
            {"ts": ts(0), "currency": "EUR", "amount": "13.340001"},
            {"ts": ts(0), "currency": "USD", "amount": "5.00"},
            {"ts": ts(4), "currency": "USD", "amount": "2.50"},
        ]),
        "{body}"
    );
    let body = api.ok(&format!("/v1/revenue?{r}&step=5m")).await;
    assert_eq!(
        body["series"],
        json!([
            {"ts": ts(0), "currency": "EUR", "amount": "13.340001"},
            {"ts": ts(0), "currency": "USD", "amount": "7.50"},
        ])
    );
    let body = api
        .ok(&format!("/v1/revenue?{r}&step=1m&currency=USD"))
        .await;
    assert_eq!(
        body["series"],
        json!([
            {"ts": ts(0), "currency": "USD", "amount": "5.00"},
            {"ts": ts(4), "currency": "USD", "amount": "2.50"},
        ])
    );

    // Top pages: "/" 1+1 (alice) + 1 (bob v2) + 1 (bob v5) + 1 (carol) = 5 by 3 users;
    // "/docs" 1 (bob v2) + 3 (bob v5) = 4 by 1; "/pricing" 1 by 1.
    let body = api.ok(&format!("/v1/top_pages?{r}")).await;
    assert_eq!(
        body["pages"],
        json!([
            {"page": "/", "views": 5, "unique_users": 3},
            {"page": "/docs", "views": 4, "unique_users": 1},
            {"page": "/pricing", "views": 1, "unique_users": 1},
        ]),
        "{body}"
    );
    let body = api.ok(&format!("/v1/top_pages?{r}&limit=2")).await;
    assert_eq!(body["pages"].as_array().unwrap().len(), 2);
    assert_eq!(body["pages"][1]["page"], "/docs");

    // Users: alice's two windows; bob's final v2 and corrected v5.
    let body = api.ok(&format!("/v1/users/alice?{r}")).await;
    assert_eq!(body["user_id"], "alice");
    assert_eq!(body["first_seen"], "2024-02-29T01:00:01Z");
    assert_eq!(body["last_seen"], "2024-02-29T01:01:02Z");
    assert_eq!(
        (&body["page_views"], &body["events"], &body["sessions"]),
        (&json!(3), &json!(4), &json!(1)),
        "{body}"
    );
    let body = api.ok(&format!("/v1/users/bob?{r}")).await;
    assert_eq!(body["first_seen"], "2024-02-29T01:00:05Z");
    assert_eq!(body["last_seen"], "2024-02-29T01:04:59Z");
    // b1 (written twice) and b2; b-old is superseded by b2.
    assert_eq!(
        (&body["page_views"], &body["events"], &body["sessions"]),
        (&json!(6), &json!(7), &json!(2)),
        "{body}"
    );
    // dave's only window starts at `to`: no data in the range → 404; found when included.
    let (status, _, body) = api.get(&format!("/v1/users/dave?{r}")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _, _) = api.get(&format!("/v1/users/nobody?{r}")).await;
    assert_eq!(status, 404);
    let body = api
        .ok(&format!("/v1/users/dave?from={T0}&to={}", T0 + 11 * M))
        .await;
    assert_eq!((&body["events"], &body["sessions"]), (&json!(2), &json!(1)));

    // Sessions in range: a1 (final: 61 s, 3 pages), b1 (35 s, 2; its duplicate counts
    // once), b2 (118 s, 4), c1 (0 s, 1). b-old and e2 are superseded; d1 starts at `to`.
    // Mean 214/4 = 53.5 s; sorted [0, 35, 61, 118]: p50 = index ceil(2)−1 = 35,
    // p95 = index ceil(3.8)−1 = 118; pages 10/4 = 2.5.
    let body = api.ok(&format!("/v1/sessions?{r}")).await;
    assert_eq!(body["sessions"], 4, "{body}");
    assert_eq!(body["avg_duration_seconds"], 53.5);
    assert_eq!(body["p50_duration_seconds"], 35.0);
    assert_eq!(body["p95_duration_seconds"], 118.0);
    assert_eq!(body["avg_pages"], 2.5);
    // A range without sessions: all zero.
    let body = api
        .ok(&format!(
            "/v1/sessions?from={}&to={}",
            T0 + 6 * M,
            T0 + 7 * M
        ))
        .await;
    assert_eq!(
        (
            &body["sessions"],
            &body["avg_duration_seconds"],
            &body["p95_duration_seconds"]
        ),
        (&json!(0), &json!(0.0), &json!(0.0))
    );

    // Freshness of an answer: latest write T0+30m (a1 v2); latest final window end
    // T0+11m (dave) + 60 s lateness; lag from dave's last event T0+10m30s.
    let before = now_ms();
    let body = api.ok(&format!("/v1/active_users?{r}")).await;
    let after = now_ms();
    let f = &body["freshness"];
    assert_eq!(f["data_last_refreshed_at"], "2024-02-29T01:30:00Z", "{f}");
    assert_eq!(f["watermark"], "2024-02-29T01:12:00Z");
    assert_eq!(f["complete"], true);
    let lag = f["lag_seconds"].as_f64().unwrap();
    let last_event = T0 + 10 * M + 30_000;
    assert!(
        lag >= (before - last_event) as f64 / 1000.0 && lag <= (after - last_event) as f64 / 1000.0,
        "{lag}"
    );
    // `to` at the latest final window end is complete; one millisecond later is not.
    let body = api
        .ok(&format!("/v1/sessions?from={T0}&to={}", T0 + 11 * M))
        .await;
    assert_eq!(body["freshness"]["complete"], true);
    let body = api
        .ok(&format!("/v1/top_pages?from={T0}&to={}", T0 + 11 * M + 1))
        .await;
    assert_eq!(body["freshness"]["complete"], false);

    // Stages: ingest = writer-clickhouse rows' latest event time (T0+9m: partition 0's
    // later write) and latest ingest time (T0+10m); the processor = user_activity's
    // latest event (T0+10m30s) and write (T0+25m); writer-clickhouse's latest write
    // T0+21m; no writer-parquet rows → nulls.
    let body = api.ok("/v1/freshness").await;
    let stages = body["stages"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["ingest", "processor", "writer-clickhouse", "writer-parquet"]
    );
    let pick = |i: usize| {
        (
            stages[i]["last_event_time"].clone(),
            stages[i]["last_refresh"].clone(),
        )
    };
    assert_eq!(
        pick(0),
        (json!("2024-02-29T01:09:00Z"), json!("2024-02-29T01:10:00Z")),
        "{body}"
    );
    assert_eq!(
        pick(1),
        (json!("2024-02-29T01:10:30Z"), json!("2024-02-29T01:25:00Z"))
    );
    assert_eq!(
        pick(2),
        (json!("2024-02-29T01:09:00Z"), json!("2024-02-29T01:21:00Z"))
    );
    assert_eq!(pick(3), (Value::Null, Value::Null));
    assert_eq!(stages[3]["lag_seconds"], Value::Null);
    assert!(stages[0]["lag_seconds"].as_f64().unwrap() > 0.0);

    api.stop().await;
}

#[tokio::test]
async fn grpc_answers_the_same_numbers_as_http() {
    let ch = database().await;
    seed(&ch).await;
    let api = serve_api(&ch, &[]).await;
    let mut client = api.client().await;
    let r = main_range();
    let (from, to) = (T0, T0 + 10 * M);
    let ms = |v: &Value| pulse_query_api::params::parse_time("ts", v.as_str().unwrap()).unwrap();

    for step in ["1m", "5m"] {
        let http = api.ok(&format!("/v1/active_users?{r}&step={step}")).await;
        let grpc = client
            .active_users(req(range(from, to, step)))
            .await
            .unwrap()
            .into_inner();
        let http_points: Vec<(i64, u64)> = http["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (ms(&p["ts"]), p["active_users"].as_u64().unwrap()))
            .collect();
        let grpc_points: Vec<(i64, u64)> = grpc
            .series
            .iter()
            .map(|p| (p.ts_ms, p.active_users))
            .collect();
        assert_eq!(grpc_points, http_points, "step {step}");
        assert!(grpc_points.iter().any(|(_, n)| *n > 0));
        let f = grpc.freshness.unwrap();
        assert_eq!(f.watermark_ms, ms(&http["freshness"]["watermark"]));
        assert_eq!(
            f.data_last_refreshed_at_ms,
            ms(&http["freshness"]["data_last_refreshed_at"])
        );
        assert_eq!(f.complete, http["freshness"]["complete"].as_bool().unwrap());
    }

    let http = api.ok(&format!("/v1/revenue?{r}&step=1m")).await;
    let grpc = client
        .revenue(req(pb::RevenueRequest {
            range: Some(range(from, to, "1m")),
            currency: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let as_json: Vec<Value> = grpc
        .series
        .iter()
        .map(|p| json!({"ts": pulse_query_api::params::rfc3339(p.ts_ms), "currency": p.currency, "amount": p.amount}))
        .collect();
    assert_eq!(Value::Array(as_json), http["series"]);
    let usd = client
        .revenue(req(pb::RevenueRequest {
            range: Some(range(from, to, "1m")),
            currency: "USD".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usd.series.len(), 2);

    let http = api.ok(&format!("/v1/top_pages?{r}")).await;
    let grpc = client
        .top_pages(req(pb::TopPagesRequest {
            range: Some(range(from, to, "")),
            limit: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    let as_json: Vec<Value> = grpc
        .pages
        .iter()
        .map(|p| json!({"page": p.page, "views": p.views, "unique_users": p.unique_users}))
        .collect();
    assert_eq!(Value::Array(as_json), http["pages"]);

    for user in ["alice", "bob"] {
        let http = api.ok(&format!("/v1/users/{user}?{r}")).await;
        let grpc = client
            .user(req(pb::UserRequest {
                user_id: user.into(),
                range: Some(range(from, to, "")),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(grpc.first_seen_ms, ms(&http["first_seen"]));
        assert_eq!(grpc.last_seen_ms, ms(&http["last_seen"]));
        assert_eq!(
            json!([grpc.page_views, grpc.events, grpc.sessions]),
            json!([http["page_views"], http["events"], http["sessions"]])
        );
    }
    let missing = client
        .user(req(pb::UserRequest {
            user_id: "nobody".into(),
            range: Some(range(from, to, "")),
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let http = api.ok(&format!("/v1/sessions?{r}")).await;
    let grpc = client
        .sessions(req(range(from, to, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        json!([
            grpc.sessions,
            grpc.avg_duration_seconds,
            grpc.p50_duration_seconds,
            grpc.p95_duration_seconds,
            grpc.avg_pages
        ]),
        json!([
            http["sessions"],
            http["avg_duration_seconds"],
            http["p50_duration_seconds"],
            http["p95_duration_seconds"],
            http["avg_pages"]
        ])
    );

    let http = api.ok("/v1/freshness").await;
    let grpc = client
        .get_freshness(req(pb::FreshnessRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.stages.len(), 4);
    for (g, h) in grpc.stages.iter().zip(http["stages"].as_array().unwrap()) {
        assert_eq!(g.stage, h["stage"].as_str().unwrap());
        let or_zero = |v: &Value| if v.is_null() { 0 } else { ms(v) };
        assert_eq!(g.last_event_time_ms, or_zero(&h["last_event_time"]));
        assert_eq!(g.last_refresh_ms, or_zero(&h["last_refresh"]));
    }

    api.stop().await;
}

#[tokio::test]
async fn current_active_users_and_last_hour_revenue_count_windows_near_now() {
    let ch = database().await;
    let now = now_ms();
    let minute = |t: i64| t - t.rem_euclid(M);
    let base = W {
        user: "",
        start: 0,
        events: 1,
        pages: &[("/", 1)],
        revenue: &[],
        first: 0,
        last: 0,
        version: 1,
        fin: false,
        written: now,
    };
    let at = |user, start: i64, revenue| {
        window(W {
            user,
            start,
            revenue,
            first: start,
            last: start + 1_000,
            ..base
        })
    };
    // Starts ~2 min, ~10 min and ~90 min ago (at least a minute away from the 5m, 15m and
    // 1h look-back edges).
    insert(
        &ch,
        "user_activity",
        &[
            at("alice", minute(now - 2 * M), &[("EUR", 3_000_000)]),
            at("bob", minute(now - 10 * M), &[("USD", 1_000_000)]),
            at("carol", minute(now - 90 * M), &[("EUR", 50_000_000)]),
        ],
    )
    .await;
    let api = serve_api(&ch, &[]).await;
    for (window, users) in [("5m", 1), ("15m", 2), ("2h", 3), ("1d", 3)] {
        let body = api
            .ok(&format!("/v1/active_users/current?window={window}"))
            .await;
        assert_eq!(body["active_users"], users, "{window}: {body}");
        assert_eq!(body["window"], window);
        assert_eq!(
            body["freshness"]["watermark"],
            Value::Null,
            "nothing is final"
        );
        assert_eq!(body["freshness"]["complete"], false);
    }
    let body = api.ok("/v1/active_users/current").await;
    assert_eq!(
        (&body["active_users"], &body["window"]),
        (&json!(1), &json!("5m"))
    );
    let body = api.ok("/v1/revenue_last_hour").await;
    assert_eq!(
        body["totals"],
        json!([{"currency": "EUR", "amount": "3.00"}, {"currency": "USD", "amount": "1.00"}]),
        "{body}"
    );

    let mut client = api.client().await;
    let grpc = client
        .active_users_current(req(pb::CurrentRequest {
            window: "15m".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((grpc.active_users, grpc.window.as_str()), (2, "15m"));
    let grpc = client
        .revenue_last_hour(req(pb::RevenueLastHourRequest {}))
        .await
        .unwrap()
        .into_inner();
    let totals: Vec<(String, String)> = grpc
        .totals
        .into_iter()
        .map(|t| (t.currency, t.amount))
        .collect();
    assert_eq!(
        totals,
        [("EUR".into(), "3.00".into()), ("USD".into(), "1.00".into())]
    );

    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// Errors

#[tokio::test]
async fn bad_parameters_are_refused_with_400_naming_the_parameter() {
    let ch = database().await;
    let api = serve_api(&ch, &[]).await;
    let cases = [
        (
            "/v1/active_users?from=yesterday",
            "from",
            "invalid_parameter",
        ),
        (
            "/v1/active_users?to=2024-13-01T00:00:00Z",
            "to",
            "invalid_parameter",
        ),
        (
            "/v1/active_users?from=1709168400000&to=1709168400000",
            "from",
            "invalid_range",
        ),
        (
            "/v1/sessions?from=1709168460000&to=1709168400000",
            "from",
            "invalid_range",
        ),
        ("/v1/active_users?step=2m", "step", "invalid_parameter"),
        ("/v1/revenue?step=1w", "step", "invalid_parameter"),
        (
            "/v1/active_users?from=1709168400000&to=1709341200000&step=1m",
            "step",
            "too_many_points",
        ),
        ("/v1/top_pages?limit=0", "limit", "invalid_parameter"),
        ("/v1/top_pages?limit=1001", "limit", "invalid_parameter"),
        ("/v1/top_pages?limit=ten", "limit", "invalid_parameter"),
        ("/v1/revenue?currency=eur", "currency", "invalid_parameter"),
        ("/v1/revenue?currency=EURO", "currency", "invalid_parameter"),
        (
            "/v1/active_users/current?window=0m",
            "window",
            "invalid_parameter",
        ),
        (
            "/v1/active_users/current?window=25h",
            "window",
            "invalid_parameter",
        ),
        ("/v1/users/alice?from=soon", "from", "invalid_parameter"),
    ];
    for (path, parameter, code) in cases {
        let (status, _, body) = api.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["parameter"], parameter, "{path}: {body}");
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().len() > 10);
    }
    // 1500 one-minute buckets are allowed, 1501 are not.
    let (status, _, _) = api
        .get(&format!("/v1/active_users?from={T0}&to={}", T0 + 1500 * M))
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = api
        .get(&format!(
            "/v1/active_users?from={T0}&to={}",
            T0 + 1500 * M + 1
        ))
        .await;
    assert_eq!(status, 400);

    // gRPC: InvalidArgument, the parameter in the message and in `pulse-parameter`.
    let mut client = api.client().await;
    let e = client
        .active_users(req(range(0, 0, "2m")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("step"), "{}", e.message());
    assert_eq!(e.metadata().get("pulse-parameter").unwrap(), "step");
    let e = client
        .top_pages(req(pb::TopPagesRequest {
            range: None,
            limit: 5000,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.metadata().get("pulse-parameter").unwrap(), "limit");
    let e = client
        .sessions(req(range(T0 + M, T0, "")))
        .await
        .unwrap_err();
    assert_eq!(e.metadata().get("pulse-parameter").unwrap(), "from");

    api.stop().await;
}

#[tokio::test]
async fn requests_without_a_valid_token_are_refused_with_401() {
    let ch = database().await;
    let api = serve_api(&ch, &[]).await;
    let routes = [
        "/v1/active_users",
        "/v1/active_users/current",
        "/v1/revenue",
        "/v1/revenue_last_hour",
        "/v1/top_pages",
        "/v1/users/alice",
        "/v1/sessions",
        "/v1/freshness",
    ];
    for path in routes {
        for auth in [
            None,
            Some("Bearer wrong-token"),
            Some(TOKEN),
            Some("Basic dGVzdA=="),
        ] {
            let (status, headers, body) = api.get_with(path, auth).await;
            assert_eq!(status, 401, "{path} {auth:?}: {body}");
            assert_eq!(body["error"]["code"], "unauthenticated");
            assert!(headers.contains_key("www-authenticate"));
        }
        let (status, _, body) = api.get(path).await;
        assert_ne!(status, 401, "{path}: {body}");
    }
    let mut client = api.client().await;
    for token in [None, Some("wrong-token")] {
        let e = client
            .sessions(authed(range(0, 0, ""), token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = client
            .get_freshness(authed(pb::FreshnessRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    api.stop().await;
}

#[tokio::test]
async fn an_unreachable_clickhouse_gives_503_with_retry_after() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let ch = ClickHouseConfig {
        url: format!("http://127.0.0.1:{port}"),
        database: "pulse_unreachable".into(),
        ..pulse_tests::clickhouse()
    };
    let api = serve_api(&ch, &[]).await;
    for path in [
        "/v1/active_users",
        "/v1/revenue_last_hour",
        "/v1/users/alice",
        "/v1/sessions",
        "/v1/freshness",
    ] {
        let (status, headers, body) = api.get(path).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(body["error"]["code"], "unavailable");
        assert_eq!(headers.get("retry-after").unwrap(), "1");
    }
    let mut client = api.client().await;
    let e = client.active_users(req(range(0, 0, ""))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert_eq!(e.metadata().get("retry-after").unwrap(), "1");
    api.stop().await;
}

#[tokio::test]
async fn a_query_slower_than_the_timeout_gives_504() {
    // A server that accepts connections (the kernel's backlog) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ch = ClickHouseConfig {
        url: format!("http://{}", silent.local_addr().unwrap()),
        database: "pulse_silent".into(),
        ..pulse_tests::clickhouse()
    };
    let api = serve_api(&ch, &["--query-timeout-ms", "300"]).await;
    let started = std::time::Instant::now();
    let (status, _, body) = api.get("/v1/top_pages").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut client = api.client().await;
    let e = client.sessions(req(range(0, 0, ""))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    api.stop().await;
    drop(silent);
}

#[tokio::test]
async fn openapi_json_lists_every_route_without_a_token() {
    let ch = database().await;
    let api = serve_api(&ch, &[]).await;
    let (status, headers, doc) = api.get_with("/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/v1/active_users",
        "/v1/active_users/current",
        "/v1/revenue",
        "/v1/revenue_last_hour",
        "/v1/top_pages",
        "/v1/users/{user_id}",
        "/v1/sessions",
        "/v1/freshness",
        "/v1/events",
        "/openapi.json",
        "/",
    ] {
        assert!(
            paths[route]["get"].is_object(),
            "{route} missing: {:?}",
            paths.keys()
        );
    }
    assert_eq!(paths.len(), 11, "{:?}", paths.keys());
    // Parameters and schemas are generated from the code.
    let params: Vec<&str> = paths["/v1/revenue"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["from", "to", "step", "currency"]);
    let params: Vec<&str> = paths["/v1/events"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["source_trace_id", "from", "to", "limit"]);
    assert!(doc["components"]["schemas"]["Freshness"].is_object());
    assert!(doc["components"]["schemas"]["StoredEvent"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // The dashboard is public too.
    let (status, _, page) = api.get_with("/", None).await;
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("active-users-now"));
    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// Dashboard

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium on `url` with `extra` flags; its stdout.
async fn chromium(url: &str, extra: &[String]) -> String {
    let profile = TempDir::new("pulse-chromium");
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=10000",
        // Digit grouping and currency symbols follow the browser's locale.
        "--lang=en-US",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium did not finish within 120 s")
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The text inside the element with `id` (tags stripped, whitespace collapsed).
fn element_text(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the DOM"));
    let open_end = at + dom[at..].find('>').unwrap() + 1;
    let tag_start = dom[..at].rfind('<').unwrap() + 1;
    let tag: String = dom[tag_start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let close = open_end + dom[open_end..].find(&format!("</{tag}>")).unwrap();
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom[open_end..close].chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The markup inside the element with `id` (tags kept).
fn element_html<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the DOM"));
    let open_end = at + dom[at..].find('>').unwrap() + 1;
    let tag_start = dom[..at].rfind('<').unwrap() + 1;
    let tag: String = dom[tag_start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let close = open_end + dom[open_end..].find(&format!("</{tag}>")).unwrap();
    &dom[open_end..close]
}

/// The `data-state` (final or open) of the chart point of bucket `ts_ms` in `svg` markup.
fn point_state(svg: &str, ts_ms: i64) -> String {
    let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    // toISOString() always writes milliseconds.
    let ts = ts.replacen('Z', ".000Z", 1);
    let at = svg
        .find(&format!("data-ts=\"{ts}\""))
        .unwrap_or_else(|| panic!("no point {ts} in {svg}"));
    let tag_end = at + svg[at..].find('>').unwrap();
    let tag_start = svg[..at].rfind('<').unwrap();
    let tag = &svg[tag_start..tag_end];
    let state = tag.split("data-state=\"").nth(1).unwrap();
    state[..state.find('"').unwrap()].to_owned()
}

/// Every panel of the dashboard with the element that shows its freshness or failure.
const PANEL_FRESHNESS: [&str; 6] = [
    "active-users-now-freshness",
    "revenue-last-hour-freshness",
    "sessions-freshness",
    "active-users-chart-freshness",
    "revenue-chart-freshness",
    "top-pages-freshness",
];

fn assert_chromium_installed() {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/install-deps.sh installs the Debian package chromium"
    );
}

#[tokio::test]
async fn the_dashboard_renders_the_seeded_numbers_in_chromium() {
    assert_chromium_installed();
    let ch = database().await;
    let now = now_ms();
    let minute = |t: i64| t - t.rem_euclid(M);
    // The current minute is open (not final, after the watermark); three minutes ago is
    // final: the latest final window ends at cur − 2m, so the watermark (+ 60 s allowed
    // lateness) is cur − 1m, and the buckets cur − 1m and cur are still open.
    let cur = minute(now);
    let done = cur - 3 * M;
    let earlier = cur - 20 * M;
    let base = W {
        user: "",
        start: done,
        events: 3,
        pages: &[],
        revenue: &[],
        first: done,
        last: done + 30_000,
        version: 1,
        fin: true,
        written: now - 3_000,
    };
    // Active in the last 5 minutes: u1, u2, u3; u4 only 20 minutes ago.
    // Top pages over the last hour: /pricing 4 + 3 = 7 (2 users), / 1 + 2 = 3, /docs 2.
    // Revenue: EUR 19.99 (final) + 5.00 (open minute); JPY 1500 (no minor unit); USD
    // 1234567.891 (shown rounded to cents, grouped).
    insert(
        &ch,
        "user_activity",
        &[
            window(W {
                user: "u1",
                pages: &[("/", 1), ("/pricing", 4)],
                revenue: &[("EUR", 19_990_000), ("JPY", 1_500_000_000)],
                ..base
            }),
            window(W {
                user: "u2",
                pages: &[("/pricing", 3)],
                revenue: &[("USD", 1_234_567_891_000)],
                ..base
            }),
            window(W {
                user: "u3",
                start: cur,
                pages: &[("/docs", 2)],
                revenue: &[("EUR", 5_000_000)],
                first: cur,
                last: cur + 1_000,
                fin: false,
                ..base
            }),
            window(W {
                user: "u4",
                start: earlier,
                pages: &[("/", 2)],
                first: earlier,
                last: earlier + 1_000,
                ..base
            }),
        ],
    )
    .await;
    insert(
        &ch,
        "sessions",
        &[
            session("s1", "u1", now - 3 * M, 120_000, 5, 1, &[], now - 3_000),
            session("s2", "u2", now - 4 * M, 60_000, 3, 1, &[], now - 3_000),
        ],
    )
    .await;
    let api = serve_api(&ch, &[]).await;
    let url = format!("{}/#token={TOKEN}", api.base);

    let dom = chromium(&url, &["--dump-dom".to_owned()]).await;
    assert_eq!(element_text(&dom, "status"), "", "{dom}");
    assert_eq!(element_text(&dom, "active-users-now"), "3", "{dom}");
    assert_eq!(element_text(&dom, "top-page-1"), "1 /pricing 7 2");
    assert_eq!(element_text(&dom, "top-page-2"), "2 / 3 2");
    assert_eq!(element_text(&dom, "top-page-3"), "3 /docs 2 1");
    assert_eq!(element_text(&dom, "sessions-count"), "2");
    assert_eq!(element_text(&dom, "sessions-p95"), "120 s");

    // Money: each currency's own minor units, grouped digits, its symbol.
    assert_eq!(element_text(&dom, "revenue-total-EUR"), "€24.99");
    assert_eq!(element_text(&dom, "revenue-total-JPY"), "¥1,500");
    assert_eq!(element_text(&dom, "revenue-total-USD"), "$1,234,567.89");
    assert!(
        dom.contains("title=\"1234567.891 USD (exact)\""),
        "the exact amount is kept in the title"
    );

    // Revenue per minute: one chart per currency, each on its own scale (the axis tops at
    // a round value above that currency's peak), ticks in the currency's format (compact
    // for large values, so they fit the margin).
    let ticks = |c: &str| element_text(&dom, &format!("revenue-chart-{c}"));
    let (eur, jpy, usd) = (ticks("EUR"), ticks("JPY"), ticks("USD"));
    assert!(eur.contains("€20.00") && eur.contains("€10.00"), "{eur}");
    assert!(jpy.contains("¥2,000") && jpy.contains("¥1,000"), "{jpy}");
    assert!(!jpy.contains('.'), "no minor unit for JPY: {jpy}");
    assert!(
        usd.contains("$2M") && usd.contains("$1M"),
        "compact beyond 100,000: {usd}"
    );
    assert_eq!(element_text(&dom, "revenue-peak-JPY"), "peak ¥1,500 / min");

    // The open minute is marked, the finished one is not.
    let eur_svg = element_html(&dom, "revenue-chart-EUR");
    assert_eq!(point_state(eur_svg, done), "final", "{eur_svg}");
    assert_eq!(point_state(eur_svg, cur), "open", "{eur_svg}");
    assert!(eur.contains("open"), "{eur}");
    let users_svg = element_html(&dom, "active-users-chart");
    assert_eq!(point_state(users_svg, done), "final");
    assert_eq!(point_state(users_svg, done + M), "final");
    assert_eq!(point_state(users_svg, cur - M), "open");
    assert_eq!(point_state(users_svg, cur), "open");

    // Each panel shows the freshness of its own answer.
    let watermark = &pulse_query_api::params::rfc3339(cur - M)[11..19];
    for id in PANEL_FRESHNESS {
        let line = element_text(&dom, id);
        assert!(
            line.starts_with("data refreshed ")
                && line.contains(&format!("watermark {watermark}"))
                && line.ends_with("recent minutes may still change"),
            "{id}: {line}"
        );
    }
    assert!(element_text(&dom, "stages-freshness").starts_with("as of "));
    let badge = element_text(&dom, "freshness-badge");
    assert!(
        badge.starts_with("data last refreshed ") && badge.ends_with(" s ago"),
        "{badge}"
    );

    let dir = std::path::PathBuf::from(
        std::env::var("PULSE_TEST_STATE")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )
    .join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &url,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1100".to_owned(),
        ],
    )
    .await;
    let bytes = std::fs::read(&png).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{}",
        bytes.len()
    );
    println!("dashboard screenshot: {}", png.display());

    api.stop().await;
}

#[tokio::test]
async fn the_dashboard_says_when_the_token_is_refused_the_api_is_unreachable_or_clickhouse_is_down()
{
    assert_chromium_installed();
    let ch = database().await;
    let api = serve_api(&ch, &[]).await;

    // A wrong token: the page says so, asks for another, and every panel says why it
    // is empty.
    let dom = chromium(
        &format!("{}/#token=not-the-token", api.base),
        &["--dump-dom".to_owned()],
    )
    .await;
    let status = element_text(&dom, "status");
    assert!(status.contains("token was refused (401)"), "{status}");
    assert!(
        dom.contains("id=\"token-form\" style=\"display: block;\""),
        "the token form is shown"
    );
    assert_eq!(element_text(&dom, "freshness-badge"), "no access");
    for id in PANEL_FRESHNESS {
        let line = element_text(&dom, id);
        assert!(line.starts_with("token refused (401): "), "{id}: {line}");
    }
    api.stop().await;

    // ClickHouse down: the API answers 503, the page names ClickHouse.
    let down = ClickHouseConfig {
        url: format!(
            "http://127.0.0.1:{}",
            crate::support::child_process::free_port()
        ),
        database: "pulse_unreachable".into(),
        ..pulse_tests::clickhouse()
    };
    let api = serve_api(&down, &[]).await;
    let dom = chromium(
        &format!("{}/#token={TOKEN}", api.base),
        &["--dump-dom".to_owned()],
    )
    .await;
    let status = element_text(&dom, "status");
    assert!(status.contains("cannot reach ClickHouse (503)"), "{status}");
    for id in PANEL_FRESHNESS {
        let line = element_text(&dom, id);
        assert!(
            line.starts_with("ClickHouse unavailable (503): "),
            "{id}: {line}"
        );
    }
    api.stop().await;

    // The API unreachable: the same page opened where no API answers (a file), every
    // request fails at the network level.
    let dir = TempDir::new("pulse-dashboard");
    let page = dir.path().join("index.html");
    std::fs::write(&page, pulse_query_api::dashboard::DASHBOARD_HTML).unwrap();
    let dom = chromium(
        &format!("file://{}#token={TOKEN}", page.display()),
        &["--dump-dom".to_owned()],
    )
    .await;
    let status = element_text(&dom, "status");
    assert!(
        status.contains("The query API cannot be reached"),
        "{status}"
    );
    assert_eq!(element_text(&dom, "freshness-badge"), "offline");
    for id in PANEL_FRESHNESS {
        let line = element_text(&dom, id);
        assert!(line.starts_with("API unreachable: "), "{id}: {line}");
    }
    assert!(
        element_text(&dom, "stages-freshness").starts_with("API unreachable: "),
        "{dom}"
    );
}

#[tokio::test]
async fn table_freshness_is_cached_for_the_configured_time() {
    let ch = database().await;
    let row = |user: &str, written: i64| {
        window(W {
            user,
            start: T0,
            events: 1,
            pages: &[("/", 1)],
            revenue: &[],
            first: T0,
            last: T0,
            version: 1,
            fin: true,
            written,
        })
    };
    insert(&ch, "user_activity", &[row("alice", T0 + M)]).await;
    let cached = serve_api(&ch, &["--freshness-cache-ms", "600000"]).await;
    let refreshed = |body: Value| body["freshness"]["data_last_refreshed_at"].clone();
    let first = refreshed(cached.ok("/v1/sessions").await);
    assert_eq!(first, json!(ts(1)));
    insert(&ch, "user_activity", &[row("bob", T0 + 2 * M)]).await;
    // Within the cache time the table-wide part is unchanged; without a cache it is read.
    assert_eq!(refreshed(cached.ok("/v1/top_pages").await), first);
    let uncached = serve_api(&ch, &[]).await;
    assert_eq!(refreshed(uncached.ok("/v1/top_pages").await), json!(ts(2)));
    cached.stop().await;
    uncached.stop().await;
}

#[tokio::test]
async fn grpc_serves_health_for_the_query_service() {
    let ch = database().await;
    let api = serve_api(&ch, &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(api.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pulse.query.v1.QueryService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    api.stop().await;
}

#[tokio::test]
async fn grpc_serves_health_and_reflection_listing_only_the_query_service() {
    // Health and reflection need no ClickHouse: serve against a closed port.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let ch = ClickHouseConfig {
        url: format!("http://127.0.0.1:{port}"),
        database: "pulse_unreachable".into(),
        ..pulse_tests::clickhouse()
    };
    let api = serve_api(&ch, &[]).await;
    let channel = grpc_meta::channel(&api.grpc).await;
    grpc_meta::assert_health_serving(channel.clone(), "pulse.query.v1.QueryService").await;
    let unary = |name: &'static str, input: &'static str, output: &'static str| {
        (name, input, output, false)
    };
    grpc_meta::assert_reflection_describes(
        channel,
        "pulse.query.v1.QueryService",
        &[
            unary(
                "ActiveUsers",
                ".pulse.query.v1.RangeRequest",
                ".pulse.query.v1.ActiveUsersResponse",
            ),
            unary(
                "ActiveUsersCurrent",
                ".pulse.query.v1.CurrentRequest",
                ".pulse.query.v1.ActiveUsersCurrentResponse",
            ),
            unary(
                "Revenue",
                ".pulse.query.v1.RevenueRequest",
                ".pulse.query.v1.RevenueResponse",
            ),
            unary(
                "RevenueLastHour",
                ".pulse.query.v1.RevenueLastHourRequest",
                ".pulse.query.v1.RevenueLastHourResponse",
            ),
            unary(
                "TopPages",
                ".pulse.query.v1.TopPagesRequest",
                ".pulse.query.v1.TopPagesResponse",
            ),
            unary(
                "User",
                ".pulse.query.v1.UserRequest",
                ".pulse.query.v1.UserResponse",
            ),
            unary(
                "Sessions",
                ".pulse.query.v1.RangeRequest",
                ".pulse.query.v1.SessionsResponse",
            ),
            unary(
                "GetFreshness",
                ".pulse.query.v1.FreshnessRequest",
                ".pulse.query.v1.FreshnessResponse",
            ),
            unary(
                "FindEvents",
                ".pulse.query.v1.FindEventsRequest",
                ".pulse.query.v1.FindEventsResponse",
            ),
        ],
    )
    .await;
    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// Limits: the longest range, ClickHouse's limits

#[tokio::test]
async fn every_range_endpoint_refuses_a_range_longer_than_the_maximum_naming_from_and_the_limit() {
    let ch = database().await;
    let api = serve_api(&ch, &[]).await;
    let max = 31 * 24 * 60 * M;
    let paths = [
        "/v1/top_pages",
        "/v1/active_users",
        "/v1/revenue",
        "/v1/users/alice",
        "/v1/sessions",
    ];
    for path in paths {
        for range in [
            // The issue's example: the whole representable time.
            "from=0&to=253402300799999".to_owned(),
            format!("from={T0}&to={}", T0 + max + 1),
            format!("from={}", now_ms() - max - M),
        ] {
            let (status, _, body) = api.get(&format!("{path}?{range}")).await;
            assert_eq!(status, 400, "{path}?{range}: {body}");
            assert_eq!(body["error"]["code"], "range_too_long", "{path}?{range}");
            assert_eq!(body["error"]["parameter"], "from", "{path}?{range}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("at most 31 d") && message.contains("--max-range-ms"),
                "{message}"
            );
        }
    }
    // Exactly the maximum is answered (a 1d step keeps the series within --max-points).
    let full = format!("from={T0}&to={}", T0 + max);
    for path in [
        format!("/v1/top_pages?{full}"),
        format!("/v1/sessions?{full}"),
        format!("/v1/active_users?{full}&step=1d"),
        format!("/v1/revenue?{full}&step=1d"),
    ] {
        api.ok(&path).await;
    }
    let (status, _, body) = api.get(&format!("/v1/users/alice?{full}")).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));

    let mut client = api.client().await;
    let e = client
        .top_pages(req(pb::TopPagesRequest {
            range: Some(range(1, pulse_query_api::params::MAX_TIME_MS, "")),
            limit: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.metadata().get("pulse-parameter").unwrap(), "from");
    assert!(e.message().contains("--max-range-ms"), "{}", e.message());
    let e = client
        .sessions(req(range(T0, T0 + max + 1, "")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    client.sessions(req(range(T0, T0 + max, ""))).await.unwrap();
    api.stop().await;

    let hour = serve_api(&ch, &["--max-range-ms", "3600000"]).await;
    let (status, _, body) = hour
        .get(&format!("/v1/top_pages?from={T0}&to={}", T0 + 60 * M + 1))
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 1 h"), "{message}");
    hour.ok(&format!("/v1/top_pages?from={T0}&to={}", T0 + 60 * M))
        .await;
    hour.stop().await;
}

#[tokio::test]
async fn queries_over_a_clickhouse_limit_are_refused_with_422_naming_the_limit() {
    let ch = database().await;
    seed(&ch).await;
    let r = main_range();
    // The seeded range has several pages: more result rows than one.
    let rows = serve_api(&ch, &["--query-max-result-rows", "1"]).await;
    let started = std::time::Instant::now();
    let (status, _, body) = rows.get(&format!("/v1/top_pages?{r}")).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("max_result_rows") && message.contains("--query-max-result-rows"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Within the limit the same range is answered.
    let body = rows.ok(&format!("/v1/top_pages?{r}&limit=1")).await;
    assert_eq!(body["pages"].as_array().unwrap().len(), 1, "{body}");
    let mut client = rows.client().await;
    let e = client
        .top_pages(req(pb::TopPagesRequest {
            range: Some(range(T0, T0 + 10 * M, "")),
            limit: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_result_rows"), "{}", e.message());
    rows.stop().await;

    let memory = serve_api(&ch, &["--query-max-memory-bytes", "1000"]).await;
    let (status, _, body) = memory.get(&format!("/v1/sessions?{r}")).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("max_memory_usage") && message.contains("--query-max-memory-bytes"),
        "{message}"
    );
    memory.stop().await;
}

// ---------------------------------------------------------------------------------------
// Trace search: stored events by the producer's own trace id

/// The reference event's time, 2026-06-04T11:01:23.456Z.
const REF_TIME: i64 = 1_780_570_883_456;
const REF_W3C: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// The `events` row the ClickHouse writer stores for an event (`EventRow::from_event`,
/// the writer's own conversion), carried by a record with W3C trace `w3c` if any.
fn stored_event(
    id: &str,
    at: i64,
    source_trace_id: &str,
    w3c: Option<&str>,
    amount: Option<(&str, i64)>,
) -> EventRow {
    use pulse_contracts::pb::events::v1 as ev;
    let event = ev::Event {
        event_id: id.into(),
        schema_version: 3,
        event_type: "page_view".into(),
        key: Some(ev::EventKey {
            user_id: "u123".into(),
            session_id: "s456".into(),
        }),
        payload: Some(ev::Payload {
            page: "/home".into(),
            referrer: "google".into(),
            currency: amount.map(|(c, _)| c.to_owned()).unwrap_or_default(),
            amount_micros: amount.map(|(_, a)| a),
            properties: Default::default(),
        }),
        metadata: Some(ev::Metadata {
            event_timestamp_ms: at,
            trace_id: source_trace_id.into(),
            source: "web-frontend".into(),
        }),
        ingest: Some(ev::IngestInfo {
            ingest_timestamp_ms: at + 250,
            ingest_source: "test".into(),
            protocol: "http".into(),
        }),
    };
    EventRow::from_event(&event, 0, 7, w3c, at + 900)
}

#[tokio::test]
async fn stored_events_are_found_by_their_non_w3c_producer_trace_id_with_their_w3c_trace_id() {
    let ch = database().await;
    // The reference event (USD 0, producer trace id "abcd-1234", W3C context on its
    // record), stored twice by a retried batch; a second event of the same producer
    // trace two minutes later that came without W3C context (its `trace_id` column falls
    // back to the producer's id); a look-alike id; one of the same id two days earlier
    // (outside the range); one without a producer trace id.
    let reference = stored_event(
        "ev-ref",
        REF_TIME,
        "abcd-1234",
        Some(REF_W3C),
        Some(("USD", 0)),
    );
    insert(&ch, "events", std::slice::from_ref(&reference)).await;
    insert(
        &ch,
        "events",
        &[
            reference,
            stored_event("ev-2", REF_TIME + 2 * M, "abcd-1234", None, None),
            stored_event("ev-alike", REF_TIME + M, "abcd-12345", Some(REF_W3C), None),
            stored_event(
                "ev-old",
                REF_TIME - 2 * 1440 * M,
                "abcd-1234",
                Some(REF_W3C),
                None,
            ),
            stored_event("ev-none", REF_TIME + M, "", Some(REF_W3C), None),
        ],
    )
    .await;
    let api = serve_api(&ch, &[]).await;
    let hour = "from=2026-06-04T11:00:00Z&to=2026-06-04T12:00:00Z";

    let body = api
        .ok(&format!("/v1/events?source_trace_id=abcd-1234&{hour}"))
        .await;
    assert_eq!(body["source_trace_id"], "abcd-1234");
    assert_eq!(body["from"], "2026-06-04T11:00:00Z");
    assert_eq!(body["truncated"], false);
    let events = body["events"].as_array().unwrap();
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ev-ref", "ev-2"], "{body}");
    assert_eq!(
        events[0],
        json!({
            "event_id": "ev-ref", "event_type": "page_view", "user_id": "u123",
            "session_id": "s456", "event_time": "2026-06-04T11:01:23.456Z",
            "ingest_time": "2026-06-04T11:01:23.706Z", "trace_id": REF_W3C,
            "source_trace_id": "abcd-1234", "source": "web-frontend", "schema_version": 3,
            "page": "/home", "currency": "USD", "amount": "0.00"
        })
    );
    assert_eq!(events[1]["trace_id"], Value::Null, "no W3C context: {body}");
    assert_eq!(events[1]["amount"], Value::Null);
    let freshness = body["freshness"].as_object().unwrap();
    for key in [
        "data_last_refreshed_at",
        "watermark",
        "lag_seconds",
        "complete",
    ] {
        assert!(freshness.contains_key(key), "{key}: {body}");
    }

    // `limit` cuts, and says so; an unknown id finds nothing.
    let body = api
        .ok(&format!(
            "/v1/events?source_trace_id=abcd-1234&{hour}&limit=1"
        ))
        .await;
    assert_eq!(body["events"].as_array().unwrap().len(), 1);
    assert_eq!(body["events"][0]["event_id"], "ev-ref");
    assert_eq!(body["truncated"], true);
    let body = api
        .ok(&format!("/v1/events?source_trace_id=abcd-12&{hour}"))
        .await;
    assert_eq!(body["events"], json!([]));
    // A value with characters that mean something in SQL or URLs is bound, not spliced.
    let body = api
        .ok(&format!(
            "/v1/events?source_trace_id=%27%3F%20OR%201%3D1&{hour}"
        ))
        .await;
    assert_eq!(body["events"], json!([]));

    // Bad requests name the parameter.
    for (path, parameter, code) in [
        (format!("/v1/events?{hour}"), "source_trace_id", "invalid_parameter"),
        (
            format!("/v1/events?source_trace_id=&{hour}"),
            "source_trace_id",
            "invalid_parameter",
        ),
        (
            format!("/v1/events?source_trace_id={}&{hour}", "x".repeat(257)),
            "source_trace_id",
            "invalid_parameter",
        ),
        (
            format!("/v1/events?source_trace_id=a%0Ab&{hour}"),
            "source_trace_id",
            "invalid_parameter",
        ),
        (
            format!("/v1/events?source_trace_id=abcd-1234&{hour}&limit=0"),
            "limit",
            "invalid_parameter",
        ),
        (
            format!("/v1/events?source_trace_id=abcd-1234&{hour}&limit=1001"),
            "limit",
            "invalid_parameter",
        ),
        (
            "/v1/events?source_trace_id=abcd-1234&from=soon".to_owned(),
            "from",
            "invalid_parameter",
        ),
        (
            "/v1/events?source_trace_id=abcd-1234&from=2026-01-01T00:00:00Z&to=2026-06-04T12:00:00Z"
                .to_owned(),
            "from",
            "range_too_long",
        ),
    ] {
        let (status, _, body) = api.get(&path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["parameter"], parameter, "{path}: {body}");
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
    }
    let (status, _, _) = api
        .get_with(
            &format!("/v1/events?source_trace_id=abcd-1234&{hour}"),
            None,
        )
        .await;
    assert_eq!(status, 401);

    // gRPC: the same events; an absent W3C trace id is "".
    let mut client = api.client().await;
    let answer = client
        .find_events(req(pb::FindEventsRequest {
            source_trace_id: "abcd-1234".into(),
            range: Some(range(
                REF_TIME - REF_TIME % (60 * M),
                REF_TIME - REF_TIME % (60 * M) + 60 * M,
                "",
            )),
            limit: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    let found: Vec<(&str, &str, &str)> = answer
        .events
        .iter()
        .map(|e| {
            (
                e.event_id.as_str(),
                e.trace_id.as_str(),
                e.source_trace_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [("ev-ref", REF_W3C, "abcd-1234"), ("ev-2", "", "abcd-1234")]
    );
    assert_eq!(answer.events[0].event_time_ms, REF_TIME);
    assert_eq!(
        (
            answer.events[0].currency.as_str(),
            answer.events[0].amount.as_str()
        ),
        ("USD", "0.00")
    );
    assert!(!answer.truncated);
    assert!(answer.freshness.is_some());
    let e = client
        .find_events(req(pb::FindEventsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        e.metadata().get("pulse-parameter").unwrap(),
        "source_trace_id"
    );
    let e = client
        .find_events(authed(
            pb::FindEventsRequest {
                source_trace_id: "abcd-1234".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// The real binary: trace ids in answers and exported spans, bounded metric labels

/// The `pulse-query-api` binary on free ports (text logs in a temporary folder), killed
/// when dropped.
struct ApiProcess {
    process: ServiceProcess,
    base: String,
    grpc: String,
    _logs: TempDir,
}

impl ApiProcess {
    /// Starts it on `ch`, exporting spans to `otlp` if given, and waits until it is ready.
    async fn spawn(ch: &ClickHouseConfig, otlp: Option<&str>) -> Self {
        let (http, grpc) = (free_addr(), free_addr());
        let logs = TempDir::new("pulse-query-api");
        let mut cmd = ServiceCommand::new("pulse-query-api");
        cmd.env("PULSE_QUERY_API_TOKENS", TOKEN)
            .args(["--clickhouse-url", &ch.url])
            .args(["--clickhouse-database", &ch.database])
            .args(["--http-addr", &http, "--grpc-addr", &grpc]);
        if let Some(endpoint) = otlp {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
        }
        let mut process = cmd.spawn(logs.path().join("query-api.log"));
        process.wait_ready(Duration::from_secs(30)).await;
        Self {
            process,
            base: format!("http://{http}"),
            grpc: format!("http://{grpc}"),
            _logs: logs,
        }
    }

    /// The label sets of every `pulse_http_*` series in a `/metrics` scrape.
    async fn http_series(&self) -> std::collections::BTreeSet<String> {
        let text = self.process.metrics().await;
        text.lines()
            .filter(|l| l.starts_with("pulse_http_"))
            .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
            .collect()
    }
}

/// A W3C `traceparent` of trace `trace_id` and a made-up caller span.
fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-00f067aa0ba902b7-01")
}

/// The trace id an answer names, checking that `traceresponse` agrees with `x-trace-id`
/// and names a span other than the caller's.
fn answered_trace_id(headers: &reqwest::header::HeaderMap) -> String {
    let text = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let id = text("x-trace-id");
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let tr = text("traceresponse");
    let parts: Vec<&str> = tr.split('-').collect();
    assert_eq!(parts.len(), 4, "{tr}");
    assert_eq!((parts[0], parts[1]), ("00", id.as_str()), "{tr}");
    assert_eq!(parts[2].len(), 16, "{tr}");
    assert_ne!(parts[2], "00f067aa0ba902b7", "{tr}");
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_carries_the_trace_id_of_its_request_and_the_span_is_exported() {
    let ch = database().await;
    let otlp = pulse_tests::otlp::Receiver::start().await.unwrap();
    let api = ApiProcess::spawn(&ch, Some(&otlp.endpoint())).await;
    let http = reqwest::Client::new();
    let trace = |n: u128| format!("{:032x}", 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4700 + n);
    let bearer = format!("Bearer {TOKEN}");
    // (trace id continued, or None for a fresh trace; span name)
    let mut expected: Vec<(String, bool, &str)> = Vec::new();

    // HTTP: an answer, a 400, a 401 and a 404 each name the caller's trace…
    let cases = [
        ("/v1/top_pages", true, 200),
        ("/v1/top_pages?limit=0", true, 400),
        ("/v1/sessions", false, 401),
        ("/v1/no_such_route", true, 404),
    ];
    for (n, (path, token, status)) in (0u128..).zip(cases) {
        let t = trace(n);
        let mut r = http
            .get(format!("{}{path}", api.base))
            .header("traceparent", traceparent(&t));
        if token {
            r = r.header("authorization", &bearer);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(answered_trace_id(resp.headers()), t, "{path}");
        expected.push((t, true, "http.request"));
    }
    // …and without one, a fresh trace of its own.
    let resp = http
        .get(format!("{}/v1/freshness", api.base))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let fresh = answered_trace_id(resp.headers());
    expected.push((fresh, false, "http.request"));

    // gRPC: an answer and an error (in its trailers-only metadata).
    let mut client = QueryServiceClient::connect(api.grpc.clone()).await.unwrap();
    let with_parent = |mut r: tonic::Request<pb::RangeRequest>, t: &str| {
        r.metadata_mut()
            .insert("traceparent", traceparent(t).parse().unwrap());
        r
    };
    let ok_trace = trace(10);
    let answer = client
        .sessions(with_parent(req(range(0, 0, "")), &ok_trace))
        .await
        .unwrap();
    let headers = answer.metadata().clone().into_headers();
    assert_eq!(answered_trace_id(&headers), ok_trace);
    expected.push((ok_trace, true, "grpc.request"));
    let err_trace = trace(11);
    let e = client
        .sessions(with_parent(authed(range(0, 0, ""), None), &err_trace))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        answered_trace_id(&e.metadata().clone().into_headers()),
        err_trace
    );
    expected.push((err_trace, true, "grpc.request"));
    let answer = client.sessions(req(range(0, 0, ""))).await.unwrap();
    let fresh = answered_trace_id(&answer.metadata().clone().into_headers());
    assert!(expected.iter().all(|(t, ..)| *t != fresh), "{fresh} reused");
    expected.push((fresh, false, "grpc.request"));

    // The collector receives each server span under the trace id its answer named.
    wait_until(
        Duration::from_secs(30),
        "the server span of every request at the collector",
        async || {
            let spans = otlp.spans();
            let missing: Vec<_> = expected
                .iter()
                .filter(|(t, continued, name)| {
                    !spans.iter().any(|s| {
                        s.service == "query-api"
                            && s.name == *name
                            && s.trace_id == *t
                            && s.has_parent == *continued
                    })
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing {missing:?} among {} spans", spans.len()))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn made_up_methods_and_paths_add_no_http_metric_series() {
    let ch = database().await;
    let api = ApiProcess::spawn(&ch, None).await;
    let http = reqwest::Client::new();
    let send = async |method: &str, path: &str| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        http.request(method, format!("{}{path}", api.base))
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    // One request of each shape creates the fixed series…
    assert_eq!(send("BREW", "/v1/top_pages").await, 405);
    assert_eq!(send("BREW", "/made/up").await, 404);
    assert_eq!(send("GET", "/made/up").await, 404);
    let before = api.http_series().await;
    let has = |label: &str| before.iter().any(|s| s.contains(label));
    assert!(has(r#"method="other""#), "{before:#?}");
    assert!(has(r#"route="unmatched""#), "{before:#?}");
    // …and more of them, with other made-up methods and paths, add none.
    for i in 0..5 {
        assert_eq!(send(&format!("MADEUP{i}"), "/v1/top_pages").await, 405);
        assert_eq!(send(&format!("X-{i}"), &format!("/no/such/{i}")).await, 404);
        assert_eq!(send("GET", &format!("/v1/no_such_{i}")).await, 404);
    }
    let after = api.http_series().await;
    assert_eq!(before, after);
    assert!(
        !after
            .iter()
            .any(|s| s.contains("MADEUP") || s.contains("/no/such") || s.contains("no_such")),
        "{after:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_search_is_counted_by_route_query_and_grpc_method_in_a_live_scrape() {
    let ch = database().await;
    let api = ApiProcess::spawn(&ch, None).await;
    let status = reqwest::Client::new()
        .get(format!("{}/v1/events?source_trace_id=abcd-1234", api.base))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let text = api.process.metrics().await;
    for series in [
        r#"pulse_http_requests_total{service="query-api",route="/v1/events",method="GET",status="200"} 1"#,
        r#"pulse_query_clickhouse_query_seconds_count{service="query-api",query="events_by_source_trace"} 1"#,
        r#"pulse_query_grpc_requests_total{service="query-api",method="FindEvents",code="Ok"} 0"#,
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
}

/// The query API's routes that take `from` and `to`, read from its OpenAPI document (so
/// a new one is covered without a change here), as GET paths with their other required
/// parameters filled in (`step=1h` on the series, so that a day is 24 points).
fn range_routes(doc: &Value) -> Vec<(String, String)> {
    let mut routes = Vec::new();
    for (route, item) in doc["paths"].as_object().unwrap() {
        let Some(params) = item["get"]["parameters"].as_array() else {
            continue;
        };
        let named = |name: &str| params.iter().any(|p| p["name"] == name);
        if !(named("from") && named("to")) {
            continue;
        }
        let mut path = route.replace("{user_id}", "alice");
        assert!(!path.contains('{'), "a path parameter to fill in: {route}");
        let mut query = Vec::new();
        for p in params {
            match p["name"].as_str().unwrap() {
                "source_trace_id" => query.push("source_trace_id=abcd-1234"),
                "step" => query.push("step=1h"),
                "from" | "to" | "user_id" => {}
                other => assert!(
                    p["required"] != true,
                    "{route}: give the required parameter {other} a value here"
                ),
            }
        }
        if !query.is_empty() {
            path = format!("{path}?{}&", query.join("&"));
        } else {
            path.push('?');
        }
        routes.push((route.clone(), path));
    }
    routes
}

#[tokio::test]
async fn every_endpoint_with_from_and_to_refuses_the_whole_time_range_and_answers_one_at_the_cap() {
    let ch = database().await;
    seed(&ch).await;
    // A cap of one day (not the default 31): the answers follow the flag.
    let day = 24 * 60 * M;
    let api = serve_api(&ch, &["--max-range-ms", &day.to_string()]).await;
    let (status, _, doc) = api.get_with("/openapi.json", None).await;
    assert_eq!(status, 200);
    let routes = range_routes(&doc);
    let found: Vec<&str> = routes.iter().map(|(r, _)| r.as_str()).collect();
    for route in [
        "/v1/active_users",
        "/v1/revenue",
        "/v1/top_pages",
        "/v1/users/{user_id}",
        "/v1/sessions",
        "/v1/events",
    ] {
        assert!(found.contains(&route), "{route} not found: {found:?}");
    }
    for (route, path) in &routes {
        for range in [
            // The issue's example: the whole representable time.
            "from=0&to=253402300799999".to_owned(),
            // One millisecond over the cap.
            format!("from={T0}&to={}", T0 + day + 1),
        ] {
            let (status, _, body) = api.get(&format!("{path}{range}")).await;
            assert_eq!(status, 400, "{route} {range}: {body}");
            assert_eq!(body["error"]["code"], "range_too_long", "{route}: {body}");
            assert_eq!(body["error"]["parameter"], "from", "{route}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("at most 1 d") && message.contains("--max-range-ms"),
                "{route}: {message}"
            );
        }
        // Exactly the cap is answered (alice has windows in it).
        let at_cap = format!("{path}from={T0}&to={}", T0 + day);
        let (status, _, body) = api.get(&at_cap).await;
        assert_eq!(status, 200, "{at_cap}: {body}");
    }

    // gRPC: every method whose request carries a range, read from the descriptors.
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(pulse_contracts::FILE_DESCRIPTOR_SET).unwrap();
    let file = set
        .file
        .iter()
        .find(|f| f.package() == "pulse.query.v1")
        .unwrap();
    let with_range = |input: &str| {
        let name = input.rsplit('.').next().unwrap();
        name == "RangeRequest"
            || file.message_type.iter().any(|m| {
                m.name() == name
                    && m.field
                        .iter()
                        .any(|f| f.type_name() == ".pulse.query.v1.RangeRequest")
            })
    };
    let methods: Vec<&str> = file.service[0]
        .method
        .iter()
        .filter(|m| with_range(m.input_type()))
        .map(|m| m.name())
        .collect();
    assert_eq!(methods.len(), 6, "{methods:?}");
    let mut client = api.client().await;
    for method in methods {
        for (r, ok) in [
            (range(1, pulse_query_api::params::MAX_TIME_MS, "1h"), false),
            (range(T0, T0 + day + 1, "1h"), false),
            (range(T0, T0 + day, "1h"), true),
        ] {
            let (from, to) = (r.from_ms, r.to_ms);
            let result = match method {
                "ActiveUsers" => client.active_users(req(r)).await.map(drop),
                "Sessions" => client.sessions(req(r)).await.map(drop),
                "Revenue" => client
                    .revenue(req(pb::RevenueRequest {
                        range: Some(r),
                        currency: String::new(),
                    }))
                    .await
                    .map(drop),
                "TopPages" => client
                    .top_pages(req(pb::TopPagesRequest {
                        range: Some(r),
                        limit: 0,
                    }))
                    .await
                    .map(drop),
                "User" => client
                    .user(req(pb::UserRequest {
                        user_id: "alice".into(),
                        range: Some(r),
                    }))
                    .await
                    .map(drop),
                "FindEvents" => client
                    .find_events(req(pb::FindEventsRequest {
                        source_trace_id: "abcd-1234".into(),
                        range: Some(r),
                        limit: 0,
                    }))
                    .await
                    .map(drop),
                other => panic!("{other} takes a range: call it here"),
            };
            match (result, ok) {
                (Ok(()), true) => {}
                (Err(e), false) => {
                    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{method}: {e:?}");
                    assert_eq!(e.metadata().get("pulse-parameter").unwrap(), "from");
                    assert!(e.message().contains("--max-range-ms"), "{method}: {e:?}");
                }
                (result, _) => panic!("{method} {from}..{to}: {result:?}"),
            }
        }
    }
    api.stop().await;
}
