//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers' `utoipa::path`
//! annotations and the `model` types (utoipa-axum collects them while the router is
//! built, so a route cannot be served without being documented), and served unauthenticated
//! at `GET /openapi.json`.

use std::sync::Arc;

use axum::Extension;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;

/// The serialized document, shared by every request.
#[derive(Debug)]
pub struct OpenApiJson(pub String);

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token of PULSE_QUERY_API_TOKENS / --api-tokens-file (dev stack: pulse-dev-token)",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Pulse query API",
        description = "Product analytics over the processor's aggregates in ClickHouse, and stored events by the producer's own trace id (`/v1/events`). Every analytic answer carries `freshness`. Times are RFC 3339 UTC (or epoch ms in requests); ranges are half-open [from, to); money is an exact decimal string.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody)),
    tags(
        (name = "analytics", description = "Aggregates and the event search, with freshness metadata (bearer token required)"),
        (name = "meta", description = "This document and the dashboard (no token)")
    )
)]
struct ApiDoc;

/// The document before the routes are added.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The final document, serialized once.
pub fn finish(api: utoipa::openapi::OpenApi) -> OpenApiJson {
    OpenApiJson(api.to_pretty_json().unwrap_or_else(|e| {
        tracing::error!(error = %e, "serializing the OpenAPI document failed");
        "{}".to_owned()
    }))
}

/// This OpenAPI document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json"))
)]
pub async fn openapi_json(Extension(doc): Extension<Arc<OpenApiJson>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.0.clone())
}
