//! The gRPC `QueryService`: the same operations as the HTTP API, through the same
//! `params` parsing and `query::Engine` (one implementation, two transports). Auth is the
//! `authorization: Bearer <token>` metadata; errors map through `error::QueryError`
//! (InvalidArgument naming the parameter, Unauthenticated, NotFound, Unavailable,
//! DeadlineExceeded, ResourceExhausted). Each call runs in a `query.grpc` span inside the
//! server span of `pulse_platform::grpc::Traced` (which continues the caller's
//! `traceparent` metadata and answers with `traceresponse`/`x-trace-id`), and is counted
//! by method and code. Zero/empty request fields mean the default.

use std::time::Instant;

use pulse_contracts::pb::query::v1 as pb;
use pulse_contracts::pb::query::v1::query_service_server::QueryService;
use pulse_platform::api_error::ApiError as _;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::AppState;
use crate::error::QueryError;
use crate::freshness::Freshness;
use crate::metrics as m;
use crate::params::{self, Step, TimeRange, Window, now_ms};

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct GrpcQuery {
    state: AppState,
}

impl GrpcQuery {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// Authenticates, runs `f` in a span (a child of the server span), and counts the
    /// outcome.
    async fn handle<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        request: Request<Req>,
        f: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(AppState, Req) -> Fut,
        Fut: Future<Output = Result<Resp, QueryError>>,
    {
        let span = tracing::info_span!(
            "query.grpc",
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let started = Instant::now();
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let state = self.state.clone();
        let result = async move {
            // The call's work runs under the token's name (never the token).
            let key_span = match state.tokens.authorize(auth.as_deref()) {
                Ok(name) => {
                    // For the call's completion line (platform::grpc::Traced).
                    pulse_platform::http::record_auth_key(request.extensions(), &name);
                    crate::auth::request_span(&name, &peer, "grpc")
                }
                Err(e) => {
                    crate::auth::log_refusal(&peer, "grpc", auth.as_deref());
                    return Err(e);
                }
            };
            f(state.clone(), request.into_inner())
                .instrument(key_span)
                .await
        }
        .instrument(span.clone())
        .await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.grpc_code(),
        };
        span.record("rpc.grpc.status_code", code as i32);
        ::metrics::counter!(m::GRPC_REQUESTS_TOTAL, "method" => method, "code" => format!("{code:?}"))
            .increment(1);
        ::metrics::histogram!(m::GRPC_REQUEST_SECONDS, "method" => method)
            .record(started.elapsed().as_secs_f64());
        result
            .map(Response::new)
            .map_err(|e| span.in_scope(|| e.into_status()))
    }
}

fn freshness(f: Freshness) -> Option<pb::Freshness> {
    Some(pb::Freshness {
        data_last_refreshed_at_ms: f.data_last_refreshed_at_ms.unwrap_or(0),
        watermark_ms: f.watermark_ms.unwrap_or(0),
        lag_seconds: f.lag_seconds.unwrap_or(0.0),
        complete: f.complete,
        rules_versions: f.rules_versions,
    })
}

fn range(r: Option<&pb::RangeRequest>) -> Result<TimeRange, QueryError> {
    let (from, to) = r.map_or((0, 0), |r| (r.from_ms, r.to_ms));
    TimeRange::from_grpc(from, to, now_ms())
}

#[tonic::async_trait]
impl QueryService for GrpcQuery {
    async fn active_users(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::ActiveUsersResponse>, Status> {
        self.handle("ActiveUsers", request, |s, r| async move {
            let range = range(Some(&r))?;
            let step = Step::parse(Some(&r.step))?;
            let a = s.engine.active_users(range, step).await?;
            Ok(pb::ActiveUsersResponse {
                series: a
                    .data
                    .iter()
                    .map(|p| pb::ActiveUsersPoint {
                        ts_ms: p.ts_ms,
                        active_users: p.active_users,
                    })
                    .collect(),
                freshness: freshness(a.freshness),
            })
        })
        .await
    }

    async fn active_users_current(
        &self,
        request: Request<pb::CurrentRequest>,
    ) -> Result<Response<pb::ActiveUsersCurrentResponse>, Status> {
        self.handle("ActiveUsersCurrent", request, |s, r| async move {
            let window = Window::parse(Some(&r.window))?;
            let a = s.engine.active_users_current(&window).await?;
            Ok(pb::ActiveUsersCurrentResponse {
                active_users: a.data,
                window: window.label,
                freshness: freshness(a.freshness),
            })
        })
        .await
    }

    async fn revenue(
        &self,
        request: Request<pb::RevenueRequest>,
    ) -> Result<Response<pb::RevenueResponse>, Status> {
        self.handle("Revenue", request, |s, r| async move {
            let range = range(r.range.as_ref())?;
            let step = Step::parse(r.range.as_ref().map(|r| r.step.as_str()))?;
            let currency =
                params::parse_currency(Some(r.currency.as_str()).filter(|c| !c.is_empty()))?;
            let a = s.engine.revenue(range, step, currency.as_deref()).await?;
            Ok(pb::RevenueResponse {
                series: a
                    .data
                    .into_iter()
                    .map(|p| pb::RevenuePoint {
                        ts_ms: p.ts_ms,
                        currency: p.currency,
                        amount: p.amount,
                    })
                    .collect(),
                freshness: freshness(a.freshness),
            })
        })
        .await
    }

    async fn revenue_last_hour(
        &self,
        request: Request<pb::RevenueLastHourRequest>,
    ) -> Result<Response<pb::RevenueLastHourResponse>, Status> {
        self.handle("RevenueLastHour", request, |s, _| async move {
            let a = s.engine.revenue_last_hour().await?;
            Ok(pb::RevenueLastHourResponse {
                totals: a
                    .data
                    .into_iter()
                    .map(|t| pb::CurrencyTotal {
                        currency: t.currency,
                        amount: t.amount,
                    })
                    .collect(),
                freshness: freshness(a.freshness),
            })
        })
        .await
    }

    async fn top_pages(
        &self,
        request: Request<pb::TopPagesRequest>,
    ) -> Result<Response<pb::TopPagesResponse>, Status> {
        self.handle("TopPages", request, |s, r| async move {
            let range = range(r.range.as_ref())?;
            let limit = params::limit_from_grpc(r.limit)?;
            let a = s.engine.top_pages(range, limit).await?;
            Ok(pb::TopPagesResponse {
                pages: a
                    .data
                    .into_iter()
                    .map(|p| pb::PageViews {
                        page: p.page,
                        views: p.views,
                        unique_users: p.unique_users,
                    })
                    .collect(),
                freshness: freshness(a.freshness),
            })
        })
        .await
    }

    async fn user(
        &self,
        request: Request<pb::UserRequest>,
    ) -> Result<Response<pb::UserResponse>, Status> {
        self.handle("User", request, |s, r| async move {
            let user_id = params::parse_user_id(&r.user_id)?;
            let range = range(r.range.as_ref())?;
            let a = s.engine.user(&user_id, range).await?;
            let u = a.data;
            Ok(pb::UserResponse {
                user_id: u.user_id,
                first_seen_ms: u.first_seen_ms,
                last_seen_ms: u.last_seen_ms,
                page_views: u.page_views,
                events: u.events,
                sessions: u.sessions,
                freshness: freshness(a.freshness),
            })
        })
        .await
    }

    async fn sessions(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::SessionsResponse>, Status> {
        self.handle("Sessions", request, |s, r| async move {
            let range = range(Some(&r))?;
            let a = s.engine.sessions(range).await?;
            let st = a.data;
            Ok(pb::SessionsResponse {
                sessions: st.sessions,
                avg_duration_seconds: st.avg_duration_seconds,
                p50_duration_seconds: st.p50_duration_seconds,
                p95_duration_seconds: st.p95_duration_seconds,
                avg_pages: st.avg_pages,
                freshness: freshness(a.freshness),
            })
        })
        .await
    }

    async fn get_freshness(
        &self,
        request: Request<pb::FreshnessRequest>,
    ) -> Result<Response<pb::FreshnessResponse>, Status> {
        self.handle("GetFreshness", request, |s, _| async move {
            let stages = s.engine.stages().await?;
            Ok(pb::FreshnessResponse {
                stages: stages
                    .into_iter()
                    .map(|st| pb::StageFreshness {
                        stage: st.stage.to_owned(),
                        last_event_time_ms: st.last_event_time_ms.unwrap_or(0),
                        last_refresh_ms: st.last_refresh_ms.unwrap_or(0),
                        lag_seconds: st.lag_seconds.unwrap_or(0.0),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn find_events(
        &self,
        request: Request<pb::FindEventsRequest>,
    ) -> Result<Response<pb::FindEventsResponse>, Status> {
        self.handle("FindEvents", request, |s, r| async move {
            let id = params::parse_source_trace_id(Some(r.source_trace_id.as_str()))?;
            let range = range(r.range.as_ref())?;
            let limit = params::events_limit_from_grpc(r.limit)?;
            let a = s.engine.events_by_source_trace(&id, range, limit).await?;
            Ok(pb::FindEventsResponse {
                events: a
                    .data
                    .events
                    .into_iter()
                    .map(|e| {
                        let (currency, amount) = e.amount.unwrap_or_default();
                        pb::StoredEvent {
                            event_id: e.event_id,
                            event_type: e.event_type,
                            user_id: e.user_id,
                            session_id: e.session_id,
                            event_time_ms: e.event_time_ms,
                            ingest_time_ms: e.ingest_time_ms,
                            trace_id: e.trace_id.unwrap_or_default(),
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
                freshness: freshness(a.freshness),
            })
        })
        .await
    }
}
