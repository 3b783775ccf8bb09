//! The admin API under `/v1/admin`: tiers (as data), per-tenant tier,
//! custom limits, temporary overrides, shadow mode and reserved pool, the
//! tenant view, the audit log, usage export, and the test clock.
//!
//! Order of checks on every admin route: no token configured → 503
//! `admin_disabled`; missing or malformed `Authorization: Bearer` → 401;
//! no token matches → 403 (constant-time compare against every token); a
//! bad `X-Admin-Actor` → 400; then the path and body.
//!
//! Every change writes an audit entry (see [`crate::audit`] for the order of
//! writes). Tenant changes land in the tenant's cfg hash, which every check
//! reads, so they apply to the next request on every replica; tiers changes
//! land in the tiers document, which every replica polls
//! ([`crate::tiers`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use sha2::{Digest, Sha256};

use crate::audit::{self, Change, Filter, Identity};
use crate::config::{self, Tier, Tiers, LIMITS, MAX_LIMIT, MAX_TEST_OFFSET_MS};
use crate::http::{ApiError, ApiJson, Shared};
use crate::store::TenantStatus;
use crate::tiers::TiersSnapshot;
use crate::timefmt;

/// Duration of an override when the request names none: 7 days.
pub const DEFAULT_OVERRIDE_S: u64 = 7 * 86_400;
/// Longest override: one year.
pub const MAX_OVERRIDE_S: u64 = 366 * 86_400;
/// Longest reason kept in the audit log.
pub const MAX_REASON_BYTES: usize = 1_000;
/// Most audit entries one read returns.
pub const MAX_AUDIT_LIMIT: usize = 1_000;
/// Most days one usage export covers.
pub const MAX_USAGE_DAYS: i64 = 366;

pub fn router(state: Shared) -> Router<Shared> {
    let mut r = Router::new()
        .route("/tiers", get(list_tiers))
        .route("/tiers/{tier}", get(get_tier).put(put_tier).delete(delete_tier))
        .route("/default-tier", put(set_default_tier))
        .route("/tenants/{tenant}", get(tenant_status))
        .route("/tenants/{tenant}/tier", put(set_tier))
        .route(
            "/tenants/{tenant}/limits",
            put(set_limits).delete(clear_limits),
        )
        .route(
            "/tenants/{tenant}/overrides",
            put(grant_override).delete(revoke_all_overrides),
        )
        .route(
            "/tenants/{tenant}/overrides/{limit}",
            delete(revoke_override),
        )
        .route("/tenants/{tenant}/mode", put(set_mode))
        .route(
            "/tenants/{tenant}/storage",
            put(set_storage).delete(clear_storage),
        )
        .route("/audit", get(read_audit))
        .route("/usage", get(export_usage));
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
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.config.admin_enabled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "admin_disabled",
            "the admin API is disabled: no admin token is configured",
        ));
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization header"))?
        .to_str()
        .map_err(|_| unauthorized("malformed Authorization header"))?;
    let token = bearer_token(presented)
        .ok_or_else(|| unauthorized("expected Authorization: Bearer <token>"))?;
    // Compare SHA-256 digests, in constant time, against every token
    // without stopping early: neither a token's bytes nor its length can be
    // learnt from the answer's timing (ct_eq on raw slices of different
    // lengths returns at once).
    let presented_digest = Sha256::digest(token.as_bytes());
    let mut matched: Option<&str> = None;
    for t in &state.config.admin_tokens {
        let digest = Sha256::digest(t.token.expose().as_bytes());
        if bool::from(presented_digest.as_slice().ct_eq(digest.as_slice())) {
            matched = Some(t.name.as_str());
        }
    }
    let Some(name) = matched else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin token is not valid",
        ));
    };
    let actor = match req.headers().get("x-admin-actor") {
        None => name.to_string(),
        Some(v) => match v.to_str() {
            Ok(a) if is_valid_label(a.trim(), 128) => a.trim().to_string(),
            _ => {
                return Err(ApiError::invalid_request(
                    "X-Admin-Actor: must be 1..=128 printable ASCII characters",
                ))
            }
        },
    };
    let identity = Identity {
        actor,
        token: name.to_string(),
    };
    req.extensions_mut().insert(identity);
    Ok(next.run(req).await)
}

fn is_valid_label(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x20..0x7f).contains(&b))
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
        let params = Path::<BTreeMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::invalid_tenant("the tenant in the path is not valid UTF-8"))?;
        let tenant = params.0.get("tenant").cloned().unwrap_or_default();
        if !sluice_wire::is_valid_tenant(tenant.as_bytes()) {
            return Err(ApiError::invalid_tenant(
                "tenant must be 1..=128 bytes of A-Z a-z 0-9 . _ - : @",
            ));
        }
        Ok(TenantPath(tenant))
    }
}

/// Another path segment (a tier or limit name).
fn path_param(params: &BTreeMap<String, String>, name: &str) -> String {
    params.get(name).cloned().unwrap_or_default()
}

/// The reason of a change: the body's `reason`, else `X-Admin-Reason`.
fn reason_of(headers: &HeaderMap, body: Option<&Value>) -> Result<Option<String>, ApiError> {
    let from_body = match body {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid_request("reason: must be a string")),
    };
    let from_header = match headers.get("x-admin-reason") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid_request("X-Admin-Reason: must be printable ASCII"))?
                .to_string(),
        ),
    };
    let r = from_body.or(from_header).map(|s| s.trim().to_string());
    if let Some(r) = &r {
        if r.len() > MAX_REASON_BYTES {
            return Err(ApiError::invalid_request(format!(
                "reason: at most {MAX_REASON_BYTES} bytes"
            )));
        }
    }
    Ok(r.filter(|s| !s.is_empty()))
}

fn unavailable(state: &Shared, op: &'static str, e: &crate::store::StoreError) -> ApiError {
    state.redis_failed(op, e);
    ApiError::redis_unavailable(e)
}

// ---------------------------------------------------------------- tiers

#[derive(Serialize)]
struct TiersView {
    version: u64,
    default_tier: String,
    tiers: Map<String, Value>,
}

fn tiers_view(s: &TiersSnapshot) -> TiersView {
    TiersView {
        version: s.version,
        default_tier: s.tiers.default_tier().to_string(),
        tiers: s.tiers.iter().map(|(k, t)| (k.clone(), t.to_value())).collect(),
    }
}

/// The tiers as Redis holds them right now (seeding first if needed).
async fn fresh_tiers(state: &Shared) -> Result<Arc<TiersSnapshot>, ApiError> {
    match crate::tiers::refresh_once(state).await {
        Ok(_) => Ok(state.tiers.get()),
        Err(crate::tiers::RefreshError::Store(e)) => Err(unavailable(state, "tiers", &e)),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "invalid_tiers",
            e.to_string(),
        )),
    }
}

async fn list_tiers(State(state): State<Shared>) -> Result<Json<TiersView>, ApiError> {
    let s = fresh_tiers(&state).await?;
    Ok(Json(tiers_view(&s)))
}

fn unknown_tier(tiers: &Tiers, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_tier",
        format!("tier: unknown tier {name:?} (known: {})", tiers.names().join(", ")),
    )
}

async fn get_tier(
    State(state): State<Shared>,
    Path(params): Path<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let name = path_param(&params, "tier");
    let s = fresh_tiers(&state).await?;
    let tier = s.tiers.get(&name).ok_or_else(|| unknown_tier(&s.tiers, &name))?;
    Ok(Json(json!({
        "name": name,
        "default": name == s.tiers.default_tier(),
        "version": s.version,
        "tier": tier.to_value(),
    })))
}

/// Applies `edit` to the tiers in Redis with compare-and-set and an audit
/// entry in the same step, retrying when another change got in between.
async fn change_tiers(
    state: &Shared,
    who: &Identity,
    action: &'static str,
    target: &str,
    reason: Option<String>,
    edit: impl Fn(&Tiers) -> Result<(Tiers, Value, Value), ApiError>,
) -> Result<Arc<TiersSnapshot>, ApiError> {
    for _ in 0..5 {
        let base = fresh_tiers(state).await?;
        let (next, old, new) = edit(&base.tiers)?;
        let change = Change {
            who,
            action,
            tenant: "",
            target: target.to_string(),
            old,
            new,
            reason: reason.clone(),
        };
        let written = state
            .store
            .tiers_write(
                base.version,
                &next.to_json(),
                state.offset_ms(),
                state.config.audit_retention,
                &change.fields(),
            )
            .await
            .map_err(|e| {
                state.metrics.audit_write(false);
                unavailable(state, "tiers", &e)
            })?;
        if let Some((version, _id)) = written {
            state.metrics.audit_write(true);
            state.metrics.admin_change(action);
            state.tiers.install(TiersSnapshot::new(next, version));
            tracing::info!(actor = %who.actor, action, target, version, "admin: tiers changed");
            return Ok(state.tiers.get());
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        "the tiers kept changing concurrently; try again",
    ))
}

/// Splits `reason` off a body object.
fn take_reason(
    headers: &HeaderMap,
    body: &mut Map<String, Value>,
) -> Result<Option<String>, ApiError> {
    let r = body.remove("reason");
    reason_of(headers, r.as_ref())
}

async fn put_tier(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    Path(params): Path<BTreeMap<String, String>>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    let name = path_param(&params, "tier");
    if !sluice_wire::is_valid_policy_name(&name) {
        return Err(ApiError::invalid_request(
            "tier: tier names are 1..=64 bytes of A-Z a-z 0-9 . _ -",
        ));
    }
    let reason = take_reason(&headers, &mut body)?;
    let tier = Tier::from_value("tier", &Value::Object(body))
        .map_err(|e| ApiError::invalid_request(e.0))?;
    let s = change_tiers(&state, &who, "put_tier", &name, reason, |t| {
        let old = t.get(&name).map_or(Value::Null, Tier::to_value);
        let next = t
            .with_tier(&name, tier.clone())
            .map_err(|e| ApiError::invalid_request(e.0))?;
        Ok((next, old, tier.to_value()))
    })
    .await?;
    Ok(Json(json!({
        "name": name,
        "default": name == s.tiers.default_tier(),
        "version": s.version,
        "tier": tier.to_value(),
    })))
}

async fn delete_tier(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    Path(params): Path<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<TiersView>, ApiError> {
    let name = path_param(&params, "tier");
    let reason = reason_of(&headers, None)?;
    let s = change_tiers(&state, &who, "delete_tier", &name, reason, |t| {
        let old = t.get(&name).ok_or_else(|| unknown_tier(t, &name))?.to_value();
        if name == t.default_tier() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "default_tier",
                format!("tier {name:?} is the default tier and can not be deleted; set another default first"),
            ));
        }
        let next = t
            .without_tier(&name)
            .map_err(|e| ApiError::invalid_request(e.0))?;
        Ok((next, old, Value::Null))
    })
    .await?;
    Ok(Json(tiers_view(&s)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTier {
    tier: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn set_default_tier(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SetTier>,
) -> Result<Json<TiersView>, ApiError> {
    let reason = reason_of(&headers, body.reason.map(Value::String).as_ref())?;
    let name = body.tier;
    let s = change_tiers(&state, &who, "set_default_tier", &name, reason, |t| {
        if t.get(&name).is_none() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_tier",
                format!("tier: unknown tier {name:?} (known: {})", t.names().join(", ")),
            ));
        }
        let next = t
            .with_default(&name)
            .map_err(|e| ApiError::invalid_request(e.0))?;
        Ok((next, json!(t.default_tier()), json!(name)))
    })
    .await?;
    Ok(Json(tiers_view(&s)))
}

// ---------------------------------------------------------------- tenants

#[derive(Serialize)]
struct WindowView {
    window: String,
    current: u64,
    limit: u64,
    remaining: u64,
    /// Share of the limit used, in percent; a zero limit counts as fully used.
    percent: f64,
    reset: u64,
    reset_in: u64,
    /// Where the limit comes from: tier, custom or override.
    source: String,
}

#[derive(Serialize)]
struct LimitView {
    /// The value in force (`null`: not enforced).
    effective: Option<u64>,
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    until_ms: Option<u64>,
    tier: Option<u64>,
    custom: Option<u64>,
    #[serde(rename = "override")]
    override_value: Option<u64>,
}

#[derive(Serialize)]
struct StorageView {
    used_bytes: u64,
    /// The storage quota in force (`storage_bytes`), if any.
    limit_bytes: Option<u64>,
}

#[derive(Serialize)]
struct TenantView {
    tenant: String,
    tier: String,
    /// The tier stored for the tenant (`null`: the default tier applies; a
    /// name other than `tier`: a deleted tier, the default applies).
    stored_tier: Option<String>,
    shadow: bool,
    reserved_pool: Option<String>,
    limits: BTreeMap<String, LimitView>,
    custom_limits: BTreeMap<String, Option<u64>>,
    overrides: BTreeMap<String, Value>,
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
    let mut limits = BTreeMap::new();
    let mut custom_limits = BTreeMap::new();
    let mut overrides = BTreeMap::new();
    let mut windows = Vec::new();
    let mut storage_limit = None;
    for row in s.limits {
        if row.name == "storage_bytes" {
            storage_limit = row.effective;
        }
        custom_limits.insert(row.name.clone(), row.custom_value);
        if let (Some(v), Some(u)) = (row.override_value, row.override_until_ms) {
            overrides.insert(
                row.name.clone(),
                json!({"value": v, "until_ms": u, "until": timefmt::rfc3339_ms(u)}),
            );
        }
        if let (Some(current), Some(limit)) = (row.current, row.effective) {
            windows.push(WindowView {
                window: row.name.clone(),
                current,
                limit,
                remaining: limit.saturating_sub(current),
                percent: percent(current, limit),
                reset: row.reset,
                reset_in: row.reset_in,
                source: row.source.clone(),
            });
        }
        limits.insert(
            row.name.clone(),
            LimitView {
                effective: row.effective,
                until: row.override_until_ms.map(timefmt::rfc3339_ms),
                until_ms: row.override_until_ms,
                source: row.source,
                tier: row.tier_value,
                custom: row.custom_value,
                override_value: row.override_value,
            },
        );
    }
    TenantView {
        tenant,
        tier: s.tier,
        stored_tier: s.stored_tier,
        shadow: s.shadow,
        reserved_pool: s.pool,
        limits,
        custom_limits,
        overrides,
        windows,
        storage: StorageView {
            used_bytes: s.storage_used,
            limit_bytes: storage_limit,
        },
    }
}

async fn status_of(state: &Shared, tenant: String) -> Result<Json<TenantView>, ApiError> {
    let tiers = state.tiers.get();
    match state.store.status(&tenant, state.offset_ms(), &tiers).await {
        Ok(s) => Ok(Json(view(tenant, s))),
        Err(e) => Err(unavailable(state, "status", &e)),
    }
}

async fn tenant_status(
    State(state): State<Shared>,
    TenantPath(tenant): TenantPath,
) -> Result<Json<TenantView>, ApiError> {
    status_of(&state, tenant).await
}

/// Writes a tenant change with its audit entry first (see [`crate::audit`]).
#[allow(clippy::too_many_arguments)]
async fn apply_tenant_change(
    state: &Shared,
    who: &Identity,
    action: &'static str,
    tenant: &str,
    target: String,
    old: Value,
    new: Value,
    reason: Option<String>,
    changes: &[(String, Option<String>)],
) -> Result<(), ApiError> {
    let offset = state.offset_ms();
    let retention = state.config.audit_retention;
    let change = Change {
        who,
        action,
        tenant,
        target,
        old,
        new,
        reason,
    };
    let id = match state
        .store
        .audit_append(offset, retention, &change.fields())
        .await
    {
        Ok(id) => {
            state.metrics.audit_write(true);
            id
        }
        Err(e) => {
            state.metrics.audit_write(false);
            // Nothing changed: the entry comes first.
            return Err(unavailable(state, "audit", &e));
        }
    };
    if let Err(e) = state.store.tenant_update(tenant, offset, changes).await {
        let failed = audit::failed_fields(&change, &id, &format!("the change did not land: {e}"));
        if state
            .store
            .audit_append(offset, retention, &failed)
            .await
            .is_err()
        {
            tracing::warn!(id = %id, "audit: could not mark entry as failed");
        }
        return Err(unavailable(state, "admin", &e));
    }
    state.metrics.admin_change(action);
    tracing::info!(actor = %who.actor, action, tenant, "admin: tenant changed");
    Ok(())
}

async fn current_cfg(state: &Shared, tenant: &str) -> Result<BTreeMap<String, String>, ApiError> {
    state
        .store
        .tenant_cfg(tenant)
        .await
        .map_err(|e| unavailable(state, "admin", &e))
}

fn num_or_null(s: Option<&String>) -> Value {
    s.and_then(|v| v.parse::<u64>().ok())
        .map_or(Value::Null, Value::from)
}

async fn set_tier(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    TenantPath(tenant): TenantPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SetTier>,
) -> Result<Json<TenantView>, ApiError> {
    let reason = reason_of(&headers, body.reason.clone().map(Value::String).as_ref())?;
    let mut tiers = state.tiers.get();
    if tiers.tiers.get(&body.tier).is_none() {
        // Maybe created on another replica a moment ago.
        tiers = fresh_tiers(&state).await?;
    }
    if tiers.tiers.get(&body.tier).is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_tier",
            format!(
                "tier: unknown tier {:?} (known: {})",
                body.tier,
                tiers.tiers.names().join(", ")
            ),
        ));
    }
    let cfg = current_cfg(&state, &tenant).await?;
    let old = cfg.get("tier").map_or(Value::Null, |t| json!(t));
    apply_tenant_change(
        &state,
        &who,
        "set_tier",
        &tenant,
        "tier".to_string(),
        old,
        json!(body.tier),
        reason,
        &[("tier".to_string(), Some(body.tier.clone()))],
    )
    .await?;
    status_of(&state, tenant).await
}

/// `{"hour":5000,"day":null}`: a number sets, null clears, an absent limit
/// is left alone. Names come from [`LIMITS`].
pub fn limit_changes(body: &Map<String, Value>) -> Result<Vec<(String, Option<u64>)>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid_request(format!(
            "set at least one of {}",
            config::limit_names()
        )));
    }
    let mut changes = Vec::new();
    for (field, value) in body {
        if config::limit_def(field).is_none() {
            return Err(ApiError::invalid_request(format!(
                "{field}: unknown limit (expected one of {})",
                config::limit_names()
            )));
        }
        let limit = match value {
            Value::Null => None,
            v => {
                let n = v.as_u64().ok_or_else(|| {
                    ApiError::invalid_request(format!("{field}: must be null or a whole number"))
                })?;
                config::check_limit(field, field, n)
                    .map_err(|e| ApiError::invalid_request(e.0))?;
                Some(n)
            }
        };
        changes.push((field.clone(), limit));
    }
    Ok(changes)
}

async fn set_limits(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    TenantPath(tenant): TenantPath,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<Map<String, Value>>,
) -> Result<Json<TenantView>, ApiError> {
    let reason = take_reason(&headers, &mut body)?;
    let changes = limit_changes(&body)?;
    let cfg = current_cfg(&state, &tenant).await?;
    let old: Map<String, Value> = changes
        .iter()
        .map(|(k, _)| (k.clone(), num_or_null(cfg.get(k))))
        .collect();
    let new: Map<String, Value> = changes
        .iter()
        .map(|(k, v)| (k.clone(), v.map_or(Value::Null, Value::from)))
        .collect();
    let target = changes.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(",");
    let writes: Vec<(String, Option<String>)> = changes
        .iter()
        .map(|(k, v)| (k.clone(), v.map(|n| n.to_string())))
        .collect();
    apply_tenant_change(
        &state,
        &who,
        "set_limits",
        &tenant,
        target,
        Value::Object(old),
        Value::Object(new),
        reason,
        &writes,
    )
    .await?;
    status_of(&state, tenant).await
}

async fn clear_limits(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    TenantPath(tenant): TenantPath,
    headers: HeaderMap,
) -> Result<Json<TenantView>, ApiError> {
    let reason = reason_of(&headers, None)?;
    let cfg = current_cfg(&state, &tenant).await?;
    let old: Map<String, Value> = LIMITS
        .iter()
        .filter(|d| cfg.contains_key(d.name))
        .map(|d| (d.name.to_string(), num_or_null(cfg.get(d.name))))
        .collect();
    let writes: Vec<(String, Option<String>)> =
        LIMITS.iter().map(|d| (d.name.to_string(), None)).collect();
    apply_tenant_change(
        &state,
        &who,
        "clear_limits",
        &tenant,
        "all".to_string(),
        Value::Object(old),
        Value::Null,
        reason,
        &writes,
    )
    .await?;
    status_of(&state, tenant).await
}

/// `{"limits":{"hour":5000}, "duration_s":3600 | "until":"2025-02-01T00:00:00Z", "reason":"..."}`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantOverride {
    limits: Map<String, Value>,
    #[serde(default)]
    duration_s: Option<u64>,
    #[serde(default)]
    until: Option<Value>,
    #[serde(default)]
    reason: Option<String>,
}

/// Parses a stored override `<value>:<until_ms>`.
fn parse_override(s: &str) -> Option<(u64, u64)> {
    let (v, u) = s.split_once(':')?;
    Some((v.parse().ok()?, u.parse().ok()?))
}

fn override_value(s: Option<&String>, now_ms: u64) -> Value {
    match s.and_then(|s| parse_override(s)) {
        Some((v, u)) if u > now_ms => {
            json!({"value": v, "until_ms": u, "until": timefmt::rfc3339_ms(u)})
        }
        _ => Value::Null,
    }
}

async fn now_ms(state: &Shared) -> Result<u64, ApiError> {
    let ms = state
        .store
        .now_ms(state.offset_ms())
        .await
        .map_err(|e| unavailable(state, "time", &e))?;
    Ok(u64::try_from(ms).unwrap_or(0))
}

async fn grant_override(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    TenantPath(tenant): TenantPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<GrantOverride>,
) -> Result<Json<TenantView>, ApiError> {
    let reason = reason_of(&headers, body.reason.clone().map(Value::String).as_ref())?;
    let mut values = Vec::new();
    if body.limits.is_empty() {
        return Err(ApiError::invalid_request(format!(
            "limits: name at least one of {}",
            config::limit_names()
        )));
    }
    for (name, v) in &body.limits {
        let field = format!("limits.{name}");
        let n = v.as_u64().ok_or_else(|| {
            ApiError::invalid_request(format!("{field}: must be a whole number"))
        })?;
        config::check_limit(&field, name, n).map_err(|e| ApiError::invalid_request(e.0))?;
        values.push((name.clone(), n));
    }
    let now = now_ms(&state).await?;
    let until_ms = match (body.duration_s, &body.until) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_request(
                "duration_s and until: give one of them, not both",
            ))
        }
        (Some(d), None) => {
            if d == 0 || d > MAX_OVERRIDE_S {
                return Err(ApiError::invalid_request(format!(
                    "duration_s: must be between 1 and {MAX_OVERRIDE_S}"
                )));
            }
            now.saturating_add(d.saturating_mul(1000))
        }
        (None, Some(u)) => {
            let text = match u {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err(ApiError::invalid_request("until: must be an RFC 3339 time or epoch ms")),
            };
            let ms = timefmt::parse_instant(&text)
                .map_err(|e| ApiError::invalid_request(format!("until: {e}")))?;
            if ms <= now {
                return Err(ApiError::invalid_request("until: must be in the future"));
            }
            if ms > now.saturating_add(MAX_OVERRIDE_S * 1000) {
                return Err(ApiError::invalid_request(format!(
                    "until: at most {MAX_OVERRIDE_S} s from now"
                )));
            }
            ms
        }
        (None, None) => now.saturating_add(DEFAULT_OVERRIDE_S * 1000),
    };
    let cfg = current_cfg(&state, &tenant).await?;
    let mut old = Map::new();
    let mut new = Map::new();
    let mut writes = Vec::new();
    for (name, n) in &values {
        let field = format!("o:{name}");
        old.insert(name.clone(), override_value(cfg.get(&field), now));
        new.insert(
            name.clone(),
            json!({"value": n, "until_ms": until_ms, "until": timefmt::rfc3339_ms(until_ms)}),
        );
        writes.push((field, Some(format!("{n}:{until_ms}"))));
    }
    let target = values.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(",");
    apply_tenant_change(
        &state,
        &who,
        "grant_override",
        &tenant,
        target,
        Value::Object(old),
        Value::Object(new),
        reason,
        &writes,
    )
    .await?;
    status_of(&state, tenant).await
}

async fn revoke(
    state: Shared,
    who: Identity,
    tenant: String,
    headers: HeaderMap,
    names: Vec<String>,
) -> Result<Json<TenantView>, ApiError> {
    let reason = reason_of(&headers, None)?;
    let now = now_ms(&state).await?;
    let cfg = current_cfg(&state, &tenant).await?;
    let old: Map<String, Value> = names
        .iter()
        .map(|n| (n.clone(), override_value(cfg.get(&format!("o:{n}")), now)))
        .filter(|(_, v)| !v.is_null())
        .collect();
    let writes: Vec<(String, Option<String>)> =
        names.iter().map(|n| (format!("o:{n}"), None)).collect();
    apply_tenant_change(
        &state,
        &who,
        "revoke_override",
        &tenant,
        names.join(","),
        Value::Object(old),
        Value::Null,
        reason,
        &writes,
    )
    .await?;
    status_of(&state, tenant).await
}

async fn revoke_all_overrides(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    TenantPath(tenant): TenantPath,
    headers: HeaderMap,
) -> Result<Json<TenantView>, ApiError> {
    let names = LIMITS.iter().map(|d| d.name.to_string()).collect();
    revoke(state, who, tenant, headers, names).await
}

async fn revoke_override(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    TenantPath(tenant): TenantPath,
    Path(params): Path<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<TenantView>, ApiError> {
    let limit = path_param(&params, "limit");
    if config::limit_def(&limit).is_none() {
        return Err(ApiError::invalid_request(format!(
            "limit: unknown limit {limit:?} (expected one of {})",
            config::limit_names()
        )));
    }
    revoke(state, who, tenant, headers, vec![limit]).await
}

/// `{"shadow":true, "reserved_pool":"gold"|null, "reason":"..."}`; an absent
/// field is left alone.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMode {
    #[serde(default)]
    shadow: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    reserved_pool: Option<Option<String>>,
    #[serde(default)]
    reason: Option<String>,
}

/// Tells an explicit `null` (Some(None)) from an absent field (None).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

async fn set_mode(
    State(state): State<Shared>,
    Extension(who): Extension<Identity>,
    TenantPath(tenant): TenantPath,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SetMode>,
) -> Result<Json<TenantView>, ApiError> {
    let reason = reason_of(&headers, body.reason.clone().map(Value::String).as_ref())?;
    if body.shadow.is_none() && body.reserved_pool.is_none() {
        return Err(ApiError::invalid_request(
            "set at least one of shadow, reserved_pool",
        ));
    }
    if let Some(Some(p)) = &body.reserved_pool {
        if !config::is_valid_pool_name(p) {
            return Err(ApiError::invalid_request(
                "reserved_pool: must be null or 1..=64 bytes of A-Z a-z 0-9 . _ -",
            ));
        }
    }
    let cfg = current_cfg(&state, &tenant).await?;
    let mut old = Map::new();
    let mut new = Map::new();
    let mut writes = Vec::new();
    let mut targets = Vec::new();
    if let Some(s) = body.shadow {
        old.insert("shadow".into(), json!(cfg.get("shadow").map(String::as_str) == Some("1")));
        new.insert("shadow".into(), json!(s));
        writes.push(("shadow".to_string(), s.then(|| "1".to_string())));
        targets.push("shadow");
    }
    if let Some(p) = &body.reserved_pool {
        old.insert("reserved_pool".into(), cfg.get("pool").map_or(Value::Null, |p| json!(p)));
        new.insert("reserved_pool".into(), p.as_ref().map_or(Value::Null, |p| json!(p)));
        writes.push(("pool".to_string(), p.clone()));
        targets.push("reserved_pool");
    }
    apply_tenant_change(
        &state,
        &who,
        "set_mode",
        &tenant,
        targets.join(","),
        Value::Object(old),
        Value::Object(new),
        reason,
        &writes,
    )
    .await?;
    status_of(&state, tenant).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStorage {
    used_bytes: u64,
}

/// The application reports how many bytes the tenant stores; upload routes
/// are refused while it is at or over the tenant's `storage_bytes`. A usage
/// report, not a configuration change: not audited (it may come often).
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
        return Err(unavailable(&state, "admin", &e));
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
        return Err(unavailable(&state, "admin", &e));
    }
    state.metrics.admin_change("set_storage");
    status_of(&state, tenant).await
}

// ---------------------------------------------------------------- audit

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    tenant: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
}

/// Entries scanned per Redis round trip, and at most per read.
const AUDIT_PAGE: usize = 500;
const AUDIT_SCAN_MAX: usize = 100_000;

async fn read_audit(
    State(state): State<Shared>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid_request(format!("query: {e}")))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_AUDIT_LIMIT {
        return Err(ApiError::invalid_request(format!(
            "limit: must be between 1 and {MAX_AUDIT_LIMIT}"
        )));
    }
    let parse = |name: &str, v: &Option<String>| -> Result<Option<u64>, ApiError> {
        v.as_deref()
            .map(|s| timefmt::parse_instant(s).map_err(|e| ApiError::invalid_request(format!("{name}: {e}"))))
            .transpose()
    };
    let since = parse("since", &q.since)?;
    let until = parse("until", &q.until)?;
    let now = now_ms(&state).await?;
    let retention_ms = u64::try_from(state.config.audit_retention.as_millis()).unwrap_or(u64::MAX);
    // Entries past the retention are not shown even before a write trims them.
    let floor = now.saturating_sub(retention_ms);
    let since = Some(since.map_or(floor, |s| s.max(floor)));
    let filter = Filter {
        tenant: q.tenant,
        actor: q.actor,
        action: q.action,
        since_ms: since,
        until_ms: until,
        limit,
    };
    let start = since.map_or("-".to_string(), |s| s.to_string());
    let mut end = until.map_or("+".to_string(), |u| format!("{u}-18446744073709551615"));
    let mut out = Vec::new();
    let mut scanned = 0;
    loop {
        let page = state
            .store
            .audit_range(&end, &start, AUDIT_PAGE)
            .await
            .map_err(|e| unavailable(&state, "audit", &e))?;
        let n = page.len();
        scanned += n;
        if let Some((last, _)) = page.last() {
            end = format!("({last}");
        }
        for rec in page {
            let e = audit::view(rec);
            if filter.matches(&e) {
                out.push(e);
                if out.len() >= filter.limit {
                    break;
                }
            }
        }
        if out.len() >= filter.limit || n < AUDIT_PAGE || scanned >= AUDIT_SCAN_MAX {
            break;
        }
    }
    Ok(Json(json!({"entries": out, "count": out.len()})))
}

// ---------------------------------------------------------------- usage

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    tenant: Option<String>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

async fn export_usage(
    State(state): State<Shared>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid_request(format!("query: {e}")))?;
    let csv = match q.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError::invalid_request(format!(
                "format: {other:?} is not json or csv"
            )))
        }
    };
    if let Some(t) = &q.tenant {
        if !sluice_wire::is_valid_tenant(t.as_bytes()) {
            return Err(ApiError::invalid_tenant(
                "tenant must be 1..=128 bytes of A-Z a-z 0-9 . _ - : @",
            ));
        }
    }
    let today = timefmt::date_of_ms(now_ms(&state).await?)
        .ok_or_else(|| ApiError::invalid_request("the clock is out of range"))?;
    let date = |name: &str, v: &Option<String>| -> Result<Option<time::Date>, ApiError> {
        v.as_deref()
            .map(|s| timefmt::parse_date(s).map_err(|e| ApiError::invalid_request(format!("{name}: {e}"))))
            .transpose()
    };
    let to = date("to", &q.to)?.unwrap_or(today);
    let from = date("from", &q.from)?.unwrap_or(to);
    let span = (to - from).whole_days();
    if span < 0 {
        return Err(ApiError::invalid_request("from: must not be after to"));
    }
    if span >= MAX_USAGE_DAYS {
        return Err(ApiError::invalid_request(format!(
            "from: a range covers at most {MAX_USAGE_DAYS} days"
        )));
    }
    let rows = crate::usage::collect(&state.store, from, to, q.tenant.as_deref())
        .await
        .map_err(|e| unavailable(&state, "usage", &e))?;
    if csv {
        let mut resp = crate::usage::to_csv(&rows).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        return Ok(resp);
    }
    Ok(Json(json!({
        "from": timefmt::day_text(from),
        "to": timefmt::day_text(to),
        "retention_days": state.config.usage_retention_days,
        "rows": rows,
    }))
    .into_response())
}

// ---------------------------------------------------------------- test clock

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
            serde_json::from_str(r#"{"hour":5,"day":null,"month":0,"cost_weight":3}"#).unwrap();
        let c = limit_changes(&body).unwrap();
        assert_eq!(
            c,
            vec![
                ("cost_weight".to_string(), Some(3)),
                ("day".to_string(), None),
                ("hour".to_string(), Some(5)),
                ("month".to_string(), Some(0)),
            ]
        );
        for (bad, field) in [
            (r#"{"hours":1}"#, "hours"),
            (r#"{"day":-1}"#, "day"),
            (r#"{"month":"5"}"#, "month"),
            (r#"{"cost_weight":0}"#, "cost_weight"),
        ] {
            let body: Map<String, Value> = serde_json::from_str(bad).unwrap();
            let e = limit_changes(&body).unwrap_err();
            assert!(e.message.starts_with(field), "{}", e.message);
        }
        assert!(limit_changes(&Map::new()).is_err());
    }

    #[test]
    fn stored_overrides_parse_and_expire() {
        assert_eq!(parse_override("5000:1700000000000"), Some((5000, 1_700_000_000_000)));
        assert_eq!(parse_override("x:1"), None);
        let v = override_value(Some(&"7:2000".to_string()), 1000);
        assert_eq!(v["value"], 7);
        assert!(override_value(Some(&"7:2000".to_string()), 2000).is_null());
    }
}
