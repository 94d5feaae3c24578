//! The HTTP API (axum): the `/v1` JSON routes behind bearer-token auth, plus the
//! unauthenticated `/openapi.json` and dashboard (`/`). Every request runs in the span of
//! `pulse_platform::http::observe` (continuing the caller's `traceparent`, counted by route
//! and status, named in the answer's `traceresponse` and `x-trace-id` headers); handlers parse with `params`, ask the shared `query::Engine`, and answer
//! with the shapes of `model`. Errors take the one JSON shape of `error`.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ErrorBody, QueryError};
use crate::model::{
    self, ActiveUsersCurrentResponse, ActiveUsersResponse, CurrentParams, EventsParams,
    EventsResponse, FreshnessResponse, RangeParams, RevenueLastHourResponse, RevenueParams,
    RevenueResponse, SeriesParams, SessionsResponse, TopPagesParams, TopPagesResponse,
    UserResponse,
};
use crate::params::{self, Step, TimeRange, Window, now_ms};

/// A query string that cannot be decoded (e.g. a parameter given twice).
fn bad_query(e: QueryRejection) -> QueryError {
    QueryError::invalid("query", e.body_text())
}

/// Refuses `/v1` requests without a valid `Authorization: Bearer <token>`.
async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string());
    match state.tokens.authorize(auth) {
        Ok(name) => {
            // The rest of the request runs under the token's name (never the token), which
            // the platform's completion line also names.
            pulse_platform::http::record_auth_key(req.extensions(), &name);
            let span = crate::auth::request_span(&name, &peer, "http");
            tracing::Instrument::instrument(next.run(req), span).await
        }
        Err(e) => {
            crate::auth::log_refusal(&peer, "http", auth);
            e.into_response()
        }
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let v1 = OpenApiRouter::new()
        .routes(routes!(active_users))
        .routes(routes!(active_users_current))
        .routes(routes!(revenue))
        .routes(routes!(revenue_last_hour))
        .routes(routes!(top_pages))
        .routes(routes!(user))
        .routes(routes!(sessions))
        .routes(routes!(freshness))
        .routes(routes!(events))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let public = OpenApiRouter::new()
        .routes(routes!(crate::openapi::openapi_json))
        .routes(routes!(crate::dashboard::dashboard));
    let (router, api) = OpenApiRouter::with_openapi(crate::openapi::base())
        .merge(v1)
        .merge(public)
        .split_for_parts();
    let doc = Arc::new(crate::openapi::finish(api));
    router
        .layer(Extension(doc))
        .with_state(state)
        .layer(middleware::from_fn(pulse_platform::http::observe))
}

type Answer<T> = Result<Json<T>, QueryError>;

/// Active users per bucket.
#[utoipa::path(
    get, path = "/v1/active_users", tag = "analytics", params(SeriesParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Distinct active users per bucket (every bucket, 0 when empty)", body = ActiveUsersResponse),
        (status = 400, description = "A parameter is invalid (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable; retry after `Retry-After` seconds", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn active_users(
    State(s): State<AppState>,
    q: Result<Query<SeriesParams>, QueryRejection>,
) -> Answer<ActiveUsersResponse> {
    let Query(p) = q.map_err(bad_query)?;
    let range = TimeRange::parse(p.from.as_deref(), p.to.as_deref(), now_ms())?;
    let step = Step::parse(p.step.as_deref())?;
    let a = s.engine.active_users(range, step).await?;
    Ok(Json(model::active_users(range, step.label, a)))
}

/// Distinct users active within the last `window`.
#[utoipa::path(
    get, path = "/v1/active_users/current", tag = "analytics", params(CurrentParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Distinct users with a window starting at or after now − window", body = ActiveUsersCurrentResponse),
        (status = 400, description = "Invalid `window`", body = ErrorBody),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn active_users_current(
    State(s): State<AppState>,
    q: Result<Query<CurrentParams>, QueryRejection>,
) -> Answer<ActiveUsersCurrentResponse> {
    let Query(p) = q.map_err(bad_query)?;
    let window = Window::parse(p.window.as_deref())?;
    let a = s.engine.active_users_current(&window).await?;
    Ok(Json(ActiveUsersCurrentResponse {
        active_users: a.data,
        window: window.label,
        freshness: a.freshness.into(),
    }))
}

/// Revenue per bucket and currency.
#[utoipa::path(
    get, path = "/v1/revenue", tag = "analytics", params(RevenueParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Revenue per (bucket, currency) with data, as exact decimals", body = RevenueResponse),
        (status = 400, description = "A parameter is invalid (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn revenue(
    State(s): State<AppState>,
    q: Result<Query<RevenueParams>, QueryRejection>,
) -> Answer<RevenueResponse> {
    let Query(p) = q.map_err(bad_query)?;
    let range = TimeRange::parse(p.from.as_deref(), p.to.as_deref(), now_ms())?;
    let step = Step::parse(p.step.as_deref())?;
    let currency = params::parse_currency(p.currency.as_deref())?;
    let a = s.engine.revenue(range, step, currency.as_deref()).await?;
    Ok(Json(model::revenue(range, step.label, a)))
}

/// Revenue per currency over the last hour.
#[utoipa::path(
    get, path = "/v1/revenue_last_hour", tag = "analytics",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Totals per currency over windows starting in the last hour", body = RevenueLastHourResponse),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn revenue_last_hour(State(s): State<AppState>) -> Answer<RevenueLastHourResponse> {
    let a = s.engine.revenue_last_hour().await?;
    Ok(Json(model::revenue_last_hour(a)))
}

/// The most viewed pages.
#[utoipa::path(
    get, path = "/v1/top_pages", tag = "analytics", params(TopPagesParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Pages by views desc, then page asc", body = TopPagesResponse),
        (status = 400, description = "A parameter is invalid (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn top_pages(
    State(s): State<AppState>,
    q: Result<Query<TopPagesParams>, QueryRejection>,
) -> Answer<TopPagesResponse> {
    let Query(p) = q.map_err(bad_query)?;
    let range = TimeRange::parse(p.from.as_deref(), p.to.as_deref(), now_ms())?;
    let limit = params::parse_limit(p.limit.as_deref())?;
    let a = s.engine.top_pages(range, limit).await?;
    Ok(Json(model::top_pages(range, a)))
}

/// One user's activity.
#[utoipa::path(
    get, path = "/v1/users/{user_id}", tag = "analytics",
    params(("user_id" = String, Path, description = "The user id"), RangeParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The user's activity in the range", body = UserResponse),
        (status = 400, description = "A parameter is invalid (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 404, description = "The user has no window in the range", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn user(
    State(s): State<AppState>,
    Path(user_id): Path<String>,
    q: Result<Query<RangeParams>, QueryRejection>,
) -> Answer<UserResponse> {
    let Query(p) = q.map_err(bad_query)?;
    let user_id = params::parse_user_id(&user_id)?;
    let range = TimeRange::parse(p.from.as_deref(), p.to.as_deref(), now_ms())?;
    let a = s.engine.user(&user_id, range).await?;
    Ok(Json(model::user(range, a)))
}

/// Session statistics.
#[utoipa::path(
    get, path = "/v1/sessions", tag = "analytics", params(RangeParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Count, mean/p50/p95 duration and mean pages of the current sessions starting in the range", body = SessionsResponse),
        (status = 400, description = "A parameter is invalid (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn sessions(
    State(s): State<AppState>,
    q: Result<Query<RangeParams>, QueryRejection>,
) -> Answer<SessionsResponse> {
    let Query(p) = q.map_err(bad_query)?;
    let range = TimeRange::parse(p.from.as_deref(), p.to.as_deref(), now_ms())?;
    let a = s.engine.sessions(range).await?;
    Ok(Json(model::sessions(range, a)))
}

/// Freshness of each pipeline stage.
#[utoipa::path(
    get, path = "/v1/freshness", tag = "analytics",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "ingest, processor, writer-clickhouse, writer-parquet", body = FreshnessResponse),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn freshness(State(s): State<AppState>) -> Answer<FreshnessResponse> {
    let stages = s.engine.stages().await?;
    Ok(Json(FreshnessResponse {
        stages: stages.into_iter().map(Into::into).collect(),
    }))
}

/// Stored events by the producer's own trace id.
#[utoipa::path(
    get, path = "/v1/events", tag = "analytics", params(EventsParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The stored events whose `metadata.trace_id` is `source_trace_id` and whose event time is in the range, each with its W3C trace id; `truncated` when more matched than `limit`", body = EventsResponse),
        (status = 400, description = "A parameter is missing or invalid (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or unknown bearer token", body = ErrorBody),
        (status = 503, description = "ClickHouse is unreachable", body = ErrorBody),
        (status = 422, description = "The query went over a ClickHouse limit (memory, result rows)", body = ErrorBody),
        (status = 504, description = "The query timed out", body = ErrorBody),
    )
)]
async fn events(
    State(s): State<AppState>,
    q: Result<Query<EventsParams>, QueryRejection>,
) -> Answer<EventsResponse> {
    let Query(p) = q.map_err(bad_query)?;
    let id = params::parse_source_trace_id(p.source_trace_id.as_deref())?;
    let range = TimeRange::parse(p.from.as_deref(), p.to.as_deref(), now_ms())?;
    let limit = params::parse_events_limit(p.limit.as_deref())?;
    let a = s.engine.events_by_source_trace(&id, range, limit).await?;
    Ok(Json(model::events(id, range, a)))
}
