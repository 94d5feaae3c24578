//! The live dashboard: one static HTML page (inline JS and SVG, no build step, no CDN)
//! compiled into the binary and served unauthenticated at `/`. The page reads the token
//! from the URL fragment `#token=…` (never sent to the server in the URL), keeps it in
//! localStorage and calls the `/v1` API with it every 5 s. Each panel is fetched on its own
//! and shows the `freshness` of its answer or why it failed (token refused, API
//! unreachable, ClickHouse unavailable); money is formatted per currency with the
//! browser's `Intl.NumberFormat` (ISO-4217 minor units, grouping, symbol); revenue per
//! minute has one scale per currency; buckets after the watermark are drawn as open.

use axum::http::header;
use axum::response::IntoResponse;

/// The page (`src/static/dashboard.html`).
pub const DASHBOARD_HTML: &str = include_str!("static/dashboard.html");

/// The live dashboard.
#[utoipa::path(
    get, path = "/", tag = "meta",
    responses((status = 200, description = "The dashboard page; open it as /#token=<token>", content_type = "text/html"))
)]
pub async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_HTML,
    )
}
