//! The admin API under `/v1/admin`: tiers, per-tenant tier and custom
//! limits, the tenant view, and the test clock.
//!
//! Order of checks on every admin route: no token configured → 503
//! `admin_disabled`; missing or malformed `Authorization: Bearer` → 401;
//! wrong token → 403 (constant-time compare); then the tenant in the path
//! (400 `invalid_tenant`). Changes land in Redis only; checks read the
//! tenant's cfg on every decision, so a change applies to the next request.

use std::sync::atomic::Ordering;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use crate::config::{LimitField, TierLimits, MAX_LIMIT, MAX_TEST_OFFSET_MS};
use crate::http::{ApiError, ApiJson, Shared};
use crate::store::TenantStatus;

pub fn router(state: Shared) -> Router<Shared> {
    let mut r = Router::new()
        .route("/tiers", get(tiers))
        .route("/tenants/{tenant}", get(tenant_status))
        .route("/tenants/{tenant}/tier", put(set_tier))
        .route(
            "/tenants/{tenant}/limits",
            put(set_limits).delete(clear_limits),
        )
        .route(
            "/tenants/{tenant}/storage",
            put(set_storage).delete(clear_storage),
        );
    // Without the flag the route does not exist at all (404, like any unknown path).
    if state.config.enable_test_clock {
        r = r.route("/test-clock", put(set_test_clock).get(get_test_clock));
    }
    // route_layer: unknown admin paths fall through to the JSON 404 without
    // asking for a token.
    r.route_layer(middleware::from_fn_with_state(state, authorize))
}

async fn authorize(
    State(state): State<Shared>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(expected) = &state.config.admin_token else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "admin_disabled",
            "the admin API is disabled: no admin token is configured",
        ));
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization header"))?
        .to_str()
        .map_err(|_| unauthorized("malformed Authorization header"))?;
    let token = bearer_token(presented)
        .ok_or_else(|| unauthorized("expected Authorization: Bearer <token>"))?;
    // ct_eq on slices is constant-time for equal lengths; only the length can leak.
    if !bool::from(token.as_bytes().ct_eq(expected.expose().as_bytes())) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin token is not valid",
        ));
    }
    Ok(next.run(req).await)
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// The token of a `Bearer` credential (scheme is case-insensitive, RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(' ');
    (!token.is_empty() && !token.contains(' ')).then_some(token)
}

/// A tenant id from the path, validated like a check's tenant.
pub struct TenantPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for TenantPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(tenant) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::invalid_tenant("the tenant in the path is not valid UTF-8"))?;
        if !sluice_wire::is_valid_tenant(tenant.as_bytes()) {
            return Err(ApiError::invalid_tenant(
                "tenant: must be 1..=128 bytes of A-Z a-z 0-9 . _ - : @",
            ));
        }
        Ok(TenantPath(tenant))
    }
}

#[derive(Serialize)]
struct TiersView<'a> {
    default_tier: &'a str,
    tiers: std::collections::BTreeMap<&'a str, &'a TierLimits>,
}

async fn tiers(State(state): State<Shared>) -> Json<Value> {
    let t = &state.config.tiers;
    let view = TiersView {
        default_tier: t.default_tier(),
        tiers: t.iter().map(|(k, v)| (k.as_str(), v)).collect(),
    };
    Json(serde_json::to_value(view).unwrap_or(Value::Null))
}

#[derive(Serialize)]
struct WindowView {
    /// `hour`, `day`, `month`, `tokens_hour` or `tokens_month`.
    window: String,
    current: u64,
    limit: u64,
    remaining: u64,
    /// Share of the limit used, in percent; a zero limit counts as fully used.
    percent: f64,
    reset: u64,
    reset_in: u64,
}

#[derive(Serialize)]
struct StorageView {
    used_bytes: u64,
    limit_bytes: Option<u64>,
}

#[derive(Serialize)]
struct TenantView {
    tenant: String,
    tier: String,
    /// Every overridable limit ([`LimitField`]), `null` where the tier applies.
    custom_limits: Map<String, Value>,
    windows: Vec<WindowView>,
    storage: StorageView,
}

fn percent(current: u64, limit: u64) -> f64 {
    if limit == 0 {
        return 100.0;
    }
    // Two decimals are plenty for a dashboard; counters stay below 2^53 so f64 is exact.
    ((current as f64) * 10_000.0 / (limit as f64)).round() / 100.0
}

fn view(tenant: String, s: TenantStatus) -> TenantView {
    TenantView {
        tenant,
        tier: s.tier,
        custom_limits: s
            .custom
            .iter()
            .map(|(f, v)| (f.as_str().to_string(), v.map_or(Value::Null, Value::from)))
            .collect(),
        storage: StorageView {
            used_bytes: s.storage_used,
            limit_bytes: s.storage_limit,
        },
        windows: s
            .windows
            .into_iter()
            .map(|w| WindowView {
                window: w.name,
                current: w.current,
                limit: w.limit,
                remaining: w.limit.saturating_sub(w.current),
                percent: percent(w.current, w.limit),
                reset: w.reset,
                reset_in: w.reset_in,
            })
            .collect(),
    }
}

async fn status_of(state: &Shared, tenant: String) -> Result<Json<TenantView>, ApiError> {
    match state.store.status(&tenant, state.offset_ms()).await {
        Ok(s) => Ok(Json(view(tenant, s))),
        Err(e) => {
            state.redis_failed("status", &e);
            Err(ApiError::redis_unavailable(&e))
        }
    }
}

async fn tenant_status(
    State(state): State<Shared>,
    TenantPath(tenant): TenantPath,
) -> Result<Json<TenantView>, ApiError> {
    status_of(&state, tenant).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTier {
    tier: String,
}

async fn set_tier(
    State(state): State<Shared>,
    TenantPath(tenant): TenantPath,
    ApiJson(body): ApiJson<SetTier>,
) -> Result<Json<TenantView>, ApiError> {
    if state.config.tiers.get(&body.tier).is_none() {
        let known: Vec<&str> = state.config.tiers.iter().map(|(k, _)| k.as_str()).collect();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_tier",
            format!(
                "tier: unknown tier {:?} (known: {})",
                body.tier,
                known.join(", ")
            ),
        ));
    }
    if let Err(e) = state.store.set_tier(&tenant, &body.tier).await {
        state.redis_failed("admin", &e);
        return Err(ApiError::redis_unavailable(&e));
    }
    state.metrics.admin_change("set_tier");
    tracing::info!(tenant = %tenant, tier = %body.tier, "admin: tier set");
    status_of(&state, tenant).await
}

fn limit_names() -> String {
    let names: Vec<&str> = LimitField::ALL.iter().map(|f| f.as_str()).collect();
    names.join(", ")
}

/// `{"hour":5000,"day":null,"tokens_month":0}`: a number sets, null clears,
/// an absent limit is left alone. Any [`LimitField`] can be overridden.
fn limit_changes(body: &Map<String, Value>) -> Result<Vec<(LimitField, Option<u64>)>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid_request(format!(
            "set at least one of {}",
            limit_names()
        )));
    }
    let mut changes = Vec::new();
    for (field, value) in body {
        let Some(window) = LimitField::parse(field) else {
            return Err(ApiError::invalid_request(format!(
                "{field}: unknown limit (expected one of {})",
                limit_names()
            )));
        };
        let limit = match value {
            Value::Null => None,
            v => match v.as_u64() {
                Some(n) if n <= MAX_LIMIT => Some(n),
                _ => {
                    return Err(ApiError::invalid_request(format!(
                        "{field}: must be null or an integer between 0 and {MAX_LIMIT}"
                    )))
                }
            },
        };
        changes.push((window, limit));
    }
    Ok(changes)
}

async fn set_limits(
    State(state): State<Shared>,
    TenantPath(tenant): TenantPath,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Json<TenantView>, ApiError> {
    let changes = limit_changes(&body)?;
    if let Err(e) = state.store.set_limits(&tenant, &changes).await {
        state.redis_failed("admin", &e);
        return Err(ApiError::redis_unavailable(&e));
    }
    state.metrics.admin_change("set_limits");
    tracing::info!(tenant = %tenant, changes = ?changes, "admin: custom limits changed");
    status_of(&state, tenant).await
}

async fn clear_limits(
    State(state): State<Shared>,
    TenantPath(tenant): TenantPath,
) -> Result<Json<TenantView>, ApiError> {
    if let Err(e) = state.store.clear_limits(&tenant).await {
        state.redis_failed("admin", &e);
        return Err(ApiError::redis_unavailable(&e));
    }
    state.metrics.admin_change("clear_limits");
    tracing::info!(tenant = %tenant, "admin: custom limits cleared");
    status_of(&state, tenant).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStorage {
    used_bytes: u64,
}

/// The application reports how many bytes the tenant stores; upload routes
/// are refused while it is at or over the tenant's `storage_bytes`.
async fn set_storage(
    State(state): State<Shared>,
    TenantPath(tenant): TenantPath,
    ApiJson(body): ApiJson<SetStorage>,
) -> Result<Json<TenantView>, ApiError> {
    if body.used_bytes > MAX_LIMIT {
        return Err(ApiError::invalid_request(format!(
            "used_bytes: must be at most {MAX_LIMIT}"
        )));
    }
    if let Err(e) = state.store.set_storage(&tenant, Some(body.used_bytes)).await {
        state.redis_failed("admin", &e);
        return Err(ApiError::redis_unavailable(&e));
    }
    state.metrics.admin_change("set_storage");
    tracing::info!(tenant = %tenant, used_bytes = body.used_bytes, "admin: storage use reported");
    status_of(&state, tenant).await
}

async fn clear_storage(
    State(state): State<Shared>,
    TenantPath(tenant): TenantPath,
) -> Result<Json<TenantView>, ApiError> {
    if let Err(e) = state.store.set_storage(&tenant, None).await {
        state.redis_failed("admin", &e);
        return Err(ApiError::redis_unavailable(&e));
    }
    state.metrics.admin_change("set_storage");
    status_of(&state, tenant).await
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TestClock {
    offset_ms: i64,
}

async fn set_test_clock(
    State(state): State<Shared>,
    ApiJson(body): ApiJson<TestClock>,
) -> Result<Json<TestClock>, ApiError> {
    if body.offset_ms.unsigned_abs() > MAX_TEST_OFFSET_MS.unsigned_abs() {
        return Err(ApiError::invalid_request(format!(
            "offset_ms: must be between -{MAX_TEST_OFFSET_MS} and {MAX_TEST_OFFSET_MS}"
        )));
    }
    state
        .clock_offset_ms
        .store(body.offset_ms, Ordering::Relaxed);
    state.metrics.admin_change("test_clock");
    tracing::info!(offset_ms = body.offset_ms, "admin: test clock shifted");
    Ok(Json(body))
}

async fn get_test_clock(State(state): State<Shared>) -> Json<TestClock> {
    Json(TestClock {
        offset_ms: state.clock_offset_ms.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer a b"), None);
    }

    #[test]
    fn zero_limits_show_as_fully_used() {
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(1, 3), 33.33);
        assert_eq!(percent(150, 100), 150.0);
    }

    #[test]
    fn limit_changes_name_the_bad_field() {
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"hour":5,"day":null,"month":0,"tokens_month":7}"#).unwrap();
        let c = limit_changes(&body).unwrap();
        for want in [
            (LimitField::Hour, Some(5)),
            (LimitField::Day, None),
            (LimitField::Month, Some(0)),
            (LimitField::TokensMonth, Some(7)),
        ] {
            assert!(c.contains(&want), "{c:?}");
        }
        for (bad, field) in [
            (r#"{"hours":1}"#, "hours"),
            (r#"{"day":-1}"#, "day"),
            (r#"{"month":"5"}"#, "month"),
        ] {
            let body: Map<String, Value> = serde_json::from_str(bad).unwrap();
            let e = limit_changes(&body).unwrap_err();
            assert!(e.message.starts_with(field), "{}", e.message);
        }
        assert!(limit_changes(&Map::new()).is_err());
    }
}
