//! The HTTP adapter: the router, the decision endpoint, health, metrics and
//! the JSON error shape every answer uses (`{"error":"code","message":"..."}`).
//! axum's own plain-text rejections never reach a client: bodies are parsed
//! by [`ApiJson`], unknown routes and methods have JSON fallbacks.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use sluice_wire::{CheckRequest, CheckResponse, ErrorBody, UsageAnswer, UsageReport};

use crate::config::ServeConfig;
use crate::decision::{self, Invalid};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Largest request body accepted; a check is well under 2 KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// State shared by every request.
pub struct AppState {
    pub store: Store,
    pub metrics: Metrics,
    pub config: ServeConfig,
    /// Test clock offset in ms (only non-zero with `--enable-test-clock`).
    pub clock_offset_ms: AtomicI64,
    redis_log: LogThrottle,
}

impl AppState {
    pub fn new(store: Store, metrics: Metrics, config: ServeConfig) -> AppState {
        AppState {
            store,
            metrics,
            config,
            clock_offset_ms: AtomicI64::new(0),
            redis_log: LogThrottle::default(),
        }
    }

    pub fn offset_ms(&self) -> i64 {
        if self.config.enable_test_clock {
            self.clock_offset_ms.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Counts a Redis failure and logs it, at most once a second, so an
    /// outage does not turn into a log flood.
    pub fn redis_failed(&self, op: &'static str, e: &StoreError) {
        self.metrics.redis_error(op);
        if self.redis_log.should_log() {
            tracing::warn!(op, transient = e.is_transient(), "redis call failed: {e}");
        }
    }
}

#[derive(Default)]
struct LogThrottle(AtomicU64);

impl LogThrottle {
    fn should_log(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0.swap(now, Ordering::Relaxed) != now
    }
}

pub type Shared = Arc<AppState>;

/// An error answer. Every non-2xx response of the service is one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn invalid_tenant(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_tenant", message)
    }

    pub fn redis_unavailable(e: &StoreError) -> ApiError {
        let message = match e {
            StoreError::Timeout => "the quota store did not answer in time",
            _ => "the quota store is unavailable",
        };
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            message,
        )
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        match e {
            Invalid::Tenant(m) => ApiError::invalid_tenant(m),
            Invalid::Request(m) => ApiError::invalid_request(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_string(),
            message: self.message,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // A short hint for clients that honour it; the filter applies its own failure mode.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A JSON body parsed without regard to Content-Type (the Envoy callout sets
/// it, curl users often do not), with errors that name the offending field.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("request body exceeds {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::invalid_request(format!("could not read the request body: {e}"))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses JSON, prefixing errors with the path of the field at fault
/// (`cost: invalid value: integer -5, expected u64`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        // Syntax errors have no meaningful field path ("?" or ".").
        if e.inner().is_data() && path != "." && path != "?" {
            ApiError::invalid_request(format!("{path}: {}", e.inner()))
        } else {
            ApiError::invalid_request(format!("invalid JSON body: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// The whole service router.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route(sluice_wire::CHECK_PATH, post(check))
        .route(sluice_wire::USAGE_PATH, post(usage))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/v1/admin", crate::admin::router(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn check(
    State(state): State<Shared>,
    body: Result<ApiJson<CheckRequest>, ApiError>,
) -> Result<Json<CheckResponse>, ApiError> {
    let started = Instant::now();
    let elapsed = || started.elapsed().as_secs_f64();
    let valid = match body.and_then(|ApiJson(req)| decision::validate(req).map_err(ApiError::from))
    {
        Ok(v) => v,
        Err(e) => {
            state.metrics.check("invalid", elapsed());
            return Err(e);
        }
    };
    match state.store.check(&valid, state.offset_ms()).await {
        Ok(d) => {
            let resp = decision::respond(d, valid.tokens, valid.policy.as_deref());
            state
                .metrics
                .check(if resp.allowed { "allowed" } else { "denied" }, elapsed());
            Ok(Json(resp))
        }
        Err(e) => {
            state.redis_failed("check", &e);
            state.metrics.check("error", elapsed());
            Err(ApiError::redis_unavailable(&e))
        }
    }
}

/// Token reconciliation: replaces a reservation with real usage. Called
/// fire-and-forget by the filter after a response; idempotent.
async fn usage(
    State(state): State<Shared>,
    body: Result<ApiJson<UsageReport>, ApiError>,
) -> Result<Json<UsageAnswer>, ApiError> {
    let valid = match body
        .and_then(|ApiJson(r)| decision::validate_usage(r).map_err(ApiError::from))
    {
        Ok(v) => v,
        Err(e) => {
            state.metrics.usage_report("invalid");
            return Err(e);
        }
    };
    match state.store.reconcile(&valid, state.offset_ms()).await {
        Ok(answer) => {
            state.metrics.usage_report(match answer.status.as_str() {
                "settled" => "settled",
                "duplicate" => "duplicate",
                _ => "unknown",
            });
            Ok(Json(answer))
        }
        Err(e) => {
            state.redis_failed("usage", &e);
            state.metrics.usage_report("error");
            Err(ApiError::redis_unavailable(&e))
        }
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<Shared>) -> Result<Json<serde_json::Value>, ApiError> {
    match state.store.ping().await {
        Ok(()) => Ok(Json(serde_json::json!({"status": "ready"}))),
        Err(e) => {
            state.redis_failed("ping", &e);
            Err(ApiError::redis_unavailable(&e))
        }
    }
}

async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
