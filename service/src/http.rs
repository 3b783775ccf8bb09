//! The HTTP adapter: the router, the decision endpoint, health, metrics and
//! the JSON error shape every answer uses (`{"error":"code","message":"..."}`).
//! axum's own plain-text rejections never reach a client: bodies are parsed
//! by [`ApiJson`], unknown routes and methods have JSON fallbacks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use sluice_wire::{
    CheckBatchRequest, CheckBatchResponse, CheckRequest, CheckResponse, CheckResult, ErrorBody,
    MAX_BATCH_CHECKS, LeaseReturnRequest, LeaseReturnResponse, ReportRequest,
    UsageAnswer, UsageReport,
};

use crate::config::ServeConfig;
use crate::decision::{self, Invalid, RowKind, Verdict};
use crate::metrics::{self as m, Metrics};
use crate::store::{Store, StoreError};
use crate::tiers::TiersCache;

/// Largest request body accepted; a check is well under 2 KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest body of a batch of checks.
pub const MAX_BATCH_BODY_BYTES: usize = MAX_BATCH_CHECKS * 2 * 1024;

/// State shared by every request.
pub struct AppState {
    pub store: Store,
    pub metrics: Metrics,
    pub config: ServeConfig,
    /// Test clock offset in ms (only non-zero with `--enable-test-clock`).
    pub clock_offset_ms: AtomicI64,
    /// The tiers this replica enforces (see [`crate::tiers`]).
    pub tiers: TiersCache,
    /// (day, tenant) pairs this replica has already put in the day's usage
    /// index, so the index costs one write per tenant, day and replica.
    indexed: Mutex<(String, HashSet<String>)>,
    redis_log: LogThrottle,
}

/// Most tenants one replica remembers as indexed for the day; past it the
/// memory is cleared (re-adding to a set is harmless).
const INDEXED_CAP: usize = 200_000;

impl AppState {
    pub fn new(store: Store, metrics: Metrics, config: ServeConfig) -> AppState {
        let tiers = TiersCache::new(config.tiers.clone());
        AppState {
            store,
            metrics,
            config,
            clock_offset_ms: AtomicI64::new(0),
            tiers,
            indexed: Mutex::new((String::new(), HashSet::new())),
            redis_log: LogThrottle::default(),
        }
    }

    /// Seconds a daily rollup (and the day's index) outlives its day.
    pub fn usage_ttl_s(&self) -> u64 {
        self.config.usage_retention_days.saturating_mul(86_400)
    }

    /// Adds the tenant to `day`'s usage index unless this replica already
    /// did; off the request path (a spawned write).
    pub fn index_usage(self: &Arc<Self>, day: &str, tenant: &str) {
        {
            let Ok(mut g) = self.indexed.lock() else { return };
            if g.0 != day {
                *g = (day.to_string(), HashSet::new());
            }
            if g.1.len() >= INDEXED_CAP {
                g.1.clear();
            }
            if !g.1.insert(tenant.to_string()) {
                return;
            }
        }
        let state = Arc::clone(self);
        let (day, tenant) = (day.to_string(), tenant.to_string());
        tokio::spawn(async move {
            let ttl = state.usage_ttl_s().saturating_add(86_400);
            if let Err(e) = state.store.usage_index_add(&day, &tenant, ttl).await {
                state.redis_failed("index", &e);
                if let Ok(mut g) = state.indexed.lock() {
                    g.1.remove(&tenant);
                }
            }
        });
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
                    format!(
                        "request body exceeds the limit of this route ({MAX_BODY_BYTES} bytes; \
                         {MAX_BATCH_BODY_BYTES} for {})",
                        sluice_wire::CHECK_BATCH_PATH
                    ),
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
        let at_field = path != "." && path != "?";
        if e.inner().is_data() && at_field {
            ApiError::invalid_request(format!("{path}: {}", e.inner()))
        } else if at_field {
            // serde reports some wrong types (a number where a window name
            // goes) as syntax: the field still says where.
            ApiError::invalid_request(format!("invalid JSON body at {path}: {}", e.inner()))
        } else {
            ApiError::invalid_request(format!("invalid JSON body: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// The whole service router: the data plane and the admin API on one port.
pub fn router(state: Shared) -> Router {
    finish(
        data_routes().nest("/v1/admin", crate::admin::router(state.clone())),
        state,
    )
}

/// With `--admin-listen`: the data plane (check, usage, report, health,
/// metrics) without the admin API, and the admin API (plus `/healthz`) for
/// its own listener, so the port Envoy reaches can not serve `/v1/admin`
/// at all and the admin port can be firewalled on its own.
pub fn split_routers(state: Shared) -> (Router, Router) {
    let data = finish(data_routes(), state.clone());
    let admin = finish(
        Router::new()
            .route("/healthz", get(healthz))
            .nest("/v1/admin", crate::admin::router(state.clone())),
        state,
    );
    (data, admin)
}

fn data_routes() -> Router<Shared> {
    Router::new()
        .route(sluice_wire::CHECK_PATH, post(check))
        .route(
            sluice_wire::CHECK_BATCH_PATH,
            post(check_batch).layer(DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)),
        )
        .route(sluice_wire::USAGE_PATH, post(usage))
        .route(sluice_wire::REPORT_PATH, post(report))
        .route(sluice_wire::LEASE_RETURN_PATH, post(lease_return))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/queue/stats", get(queue_stats))
}

/// JSON fallbacks and the body cap (413 `payload_too_large`) on every route.
fn finish(routes: Router<Shared>, state: Shared) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn check(
    State(state): State<Shared>,
    body: Result<ApiJson<CheckRequest>, ApiError>,
) -> Result<Json<CheckResponse>, ApiError> {
    decide_check(&state, body.map(|ApiJson(req)| req)).await.map(Json)
}

/// Several checks in one call (the filter's batched callouts): each is
/// decided on its own, exactly as `POST /v1/check` would (its own atomic
/// script; the scripts of one batch run concurrently on the multiplexed
/// connection), and answered in order with the status and body that route
/// would have given it. Only an unreadable batch is an error as a whole.
async fn check_batch(
    State(state): State<Shared>,
    body: Result<ApiJson<Box<RawValue>>, ApiError>,
) -> Result<Json<CheckBatchResponse>, ApiError> {
    let ApiJson(raw) = body?;
    // serde would read a struct from an array by position ("[0]: ..."): say
    // what the body must be instead.
    if !raw.get().trim_start().starts_with('{') {
        return Err(ApiError::invalid_request(
            "body: must be an object {\"checks\": [<check>, ...]}",
        ));
    }
    let batch: CheckBatchRequest<Box<RawValue>> = parse_json(raw.get().as_bytes())?;
    if batch.checks.len() > MAX_BATCH_CHECKS {
        return Err(ApiError::invalid_request(format!(
            "checks: {} checks in one batch, at most {MAX_BATCH_CHECKS}",
            batch.checks.len()
        )));
    }
    let results = futures_util::future::join_all(batch.checks.iter().enumerate().map(|(i, raw)| {
        let state = &state;
        async move {
            let req = parse_check_in_batch(i, raw.get().as_bytes());
            match decide_check(state, req).await {
                Ok(answer) => CheckResult { status: 200, answer: Some(answer), error: None },
                Err(e) => CheckResult {
                    status: e.status.as_u16(),
                    answer: None,
                    error: Some(ErrorBody { error: e.code.to_string(), message: e.message }),
                },
            }
        }
    }))
    .await;
    Ok(Json(CheckBatchResponse { results }))
}

/// Parses check `i` of a batch; its errors say which check, and where in it.
fn parse_check_in_batch(i: usize, bytes: &[u8]) -> Result<CheckRequest, ApiError> {
    if !bytes.trim_ascii_start().starts_with(b"{") {
        return Err(ApiError::invalid_request(format!("checks[{i}]: must be an object (a check)")));
    }
    parse_json::<CheckRequest>(bytes).map_err(|mut e| {
        e.message = match e.message.strip_prefix("invalid JSON body: ") {
            Some(rest) => format!("checks[{i}]: {rest}"),
            None => match e.message.strip_prefix("invalid JSON body at ") {
                Some(rest) => format!("checks[{i}].{rest}"),
                None => format!("checks[{i}].{}", e.message),
            },
        };
        e
    })
}

/// One quota decision: validation, the atomic check script, metrics.
async fn decide_check(
    state: &Shared,
    body: Result<CheckRequest, ApiError>,
) -> Result<CheckResponse, ApiError> {
    let started = Instant::now();
    let elapsed = || started.elapsed().as_secs_f64();
    let valid = match body.and_then(|req| decision::validate(req).map_err(ApiError::from))
    {
        Ok(v) => v,
        Err(e) => {
            state.metrics.check("invalid", elapsed());
            return Err(e);
        }
    };
    let upstream = match valid.upstream.as_deref() {
        None => None,
        Some(name) => match state.config.upstreams.get(name) {
            Some(u) => Some(u),
            None => {
                state.metrics.check("invalid", elapsed());
                return Err(ApiError::invalid_request(format!(
                    "upstream: unknown upstream {name:?} (known: {})",
                    state.config.upstreams.names().join(", ")
                )));
            }
        },
    };
    // Only a queued verdict uses it, but the script decides that atomically.
    let ticket = if valid.can_queue {
        match crate::ids::random_id() {
            Some(t) => t,
            None => {
                state.metrics.check("error", elapsed());
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "rng_unavailable",
                    "the OS random number generator failed",
                ));
            }
        }
    } else {
        String::new()
    };
    let tiers = state.tiers.get();
    let offset = state.offset_ms();
    match state
        .store
        .check(&valid, offset, &tiers, state.usage_ttl_s(), upstream, &ticket)
        .await
    {
        Ok(d) => {
            let day = d.day.clone();
            let verdict = d.verdict;
            // Only a denial needs the rows' kinds (the rejection reason).
            let kinds: Vec<RowKind> = if d.allowed { Vec::new() } else { d.rows.iter().map(|r| r.kind).collect() };
            let queue = upstream.map(|u| sluice_wire::QueueTicket {
                upstream: u.name.clone(),
                ticket,
            });
            let resp = decision::respond(d, valid.tokens, valid.policy.as_deref(), queue);
            state.index_usage(&day, &valid.tenant);
            state.metrics.utilisation(&valid.tenant, &resp.windows, offset);
            if let Some(u) = upstream {
                state.metrics.capacity(&u.name, verdict);
            }
            if resp.shadow {
                state.metrics.shadow(resp.allowed);
            } else if !resp.allowed && !matches!(verdict, Verdict::Queued) && !verdict.is_overflow_rejection() {
                if let (Some(w), Some(kind)) = (resp.windows.get(resp.binding), kinds.get(resp.binding)) {
                    state.metrics.rejection(decision::reject_reason(*kind, w.window));
                }
            }
            if resp.allowed && resp.reserved_pool.is_some() {
                state.metrics.reserved();
            }
            let result = if resp.allowed {
                "allowed"
            } else if verdict == Verdict::Queued {
                "queued"
            } else if verdict.is_overflow_rejection() {
                "overflow_rejected"
            } else {
                "denied"
            };
            state.metrics.check(result, elapsed());
            if let Some(lease) = &resp.lease {
                state.metrics.lease_units("granted", lease.units);
            }
            Ok(resp)
        }
        Err(e) => {
            state.redis_failed("check", &e);
            state.metrics.check("error", elapsed());
            Err(ApiError::redis_unavailable(&e))
        }
    }
}

/// Gives back the unspent units of expired leases (sent by the filter).
/// Every return is validated before any reaches Redis; each is one atomic
/// script on its tenant's slot.
async fn lease_return(
    State(state): State<Shared>,
    body: Result<ApiJson<LeaseReturnRequest>, ApiError>,
) -> Result<Json<LeaseReturnResponse>, ApiError> {
    let ApiJson(req) = body?;
    let returns = decision::validate_returns(req.returns).map_err(ApiError::from)?;
    let results = futures_util::future::join_all(
        returns.iter().map(|r| state.store.lease_return(r)),
    )
    .await;
    let mut returned = 0u64;
    for result in results {
        match result {
            Ok(n) => returned = returned.saturating_add(n),
            Err(e) => {
                state.redis_failed("lease_return", &e);
                return Err(ApiError::redis_unavailable(&e));
            }
        }
    }
    state.metrics.lease_units("returned", returned);
    Ok(Json(LeaseReturnResponse { returned }))
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

/// Longest latency a report may carry (one hour); more is a broken clock.
pub const MAX_REPORT_LATENCY_MS: u64 = 3_600_000;

/// `POST /v1/report`: the filter's upstream latency of one admitted request,
/// added to the tenant's daily rollup. 204 on success.
async fn report(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<ReportRequest>,
) -> Result<StatusCode, ApiError> {
    if !sluice_wire::is_valid_tenant(req.tenant.as_bytes()) {
        return Err(ApiError::invalid_tenant(
            "tenant must be 1..=128 bytes of A-Z a-z 0-9 . _ - : @",
        ));
    }
    if req.upstream_latency_ms > MAX_REPORT_LATENCY_MS {
        return Err(ApiError::invalid_request(format!(
            "upstream_latency_ms: must be at most {MAX_REPORT_LATENCY_MS}"
        )));
    }
    let bucket = m::latency_bucket(req.upstream_latency_ms);
    match state
        .store
        .report(
            &req.tenant,
            state.offset_ms(),
            state.usage_ttl_s(),
            bucket,
            req.upstream_latency_ms,
        )
        .await
    {
        Ok(day) => {
            state.metrics.latency_report();
            state.index_usage(&day, &req.tenant);
            Ok(StatusCode::NO_CONTENT)
        }
        Err(e) => {
            state.redis_failed("report", &e);
            Err(ApiError::redis_unavailable(&e))
        }
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when Redis answers and the tiers have been read from Redis (a
/// replica that only knows its seed might enforce stale tiers).
async fn readyz(State(state): State<Shared>) -> Result<Json<serde_json::Value>, ApiError> {
    if let Err(e) = state.store.ping().await {
        state.redis_failed("ping", &e);
        return Err(ApiError::redis_unavailable(&e));
    }
    if !state.tiers.get().from_redis() {
        if let Err(e) = crate::tiers::refresh_once(&state).await {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "tiers_unavailable",
                format!("the tiers could not be read from Redis yet: {e}"),
            ));
        }
    }
    let version = state.tiers.get().version;
    Ok(Json(
        serde_json::json!({"status": "ready", "tiers_version": version}),
    ))
}

/// Most tenants `/v1/queue/stats` lists per upstream unless `?tenants=N`.
const DEFAULT_STATS_TENANTS: usize = 100;
const MAX_STATS_TENANTS: usize = 10_000;

/// Query of `/v1/queue/stats`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    tenants: Option<usize>,
}

/// `GET /v1/queue/stats`: depth and oldest wait per upstream, globally and
/// for the deepest tenants.
async fn queue_stats(
    State(state): State<Shared>,
    query: Result<axum::extract::Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let max = match query {
        Ok(q) => q.0.tenants.unwrap_or(DEFAULT_STATS_TENANTS),
        Err(e) => return Err(ApiError::invalid_request(format!("query: {e}"))),
    };
    if max > MAX_STATS_TENANTS {
        return Err(ApiError::invalid_request(format!(
            "tenants: must be at most {MAX_STATS_TENANTS}"
        )));
    }
    let mut ups = serde_json::Map::new();
    for u in state.config.upstreams.iter() {
        let st = match state.store.queue_stats(&u.name, state.offset_ms(), max).await {
            Ok(s) => s,
            Err(e) => {
                state.redis_failed("queue", &e);
                return Err(ApiError::redis_unavailable(&e));
            }
        };
        let wait = |oldest: Option<i64>| oldest.map(|o| st.now_ms.saturating_sub(o).max(0));
        let tenants: Vec<serde_json::Value> = st
            .tenants
            .iter()
            .map(|t| {
                serde_json::json!({"tenant": t.tenant, "depth": t.depth, "oldest_wait_ms": wait(t.oldest_ms)})
            })
            .collect();
        ups.insert(
            u.name.clone(),
            serde_json::json!({
                "depth": st.queued,
                "in_flight": st.in_flight,
                "deferred": st.deferred,
                "oldest_wait_ms": wait(st.oldest_ms),
                "tenants_total": st.tenants_total,
                "tenants": tenants,
                "capacity": {"rate": u.rate, "burst": u.burst, "concurrency": u.concurrency},
                "bounds": {"tenant_queue_depth": u.tenant_queue_depth, "global_queue_depth": u.global_queue_depth},
            }),
        );
    }
    Ok(Json(serde_json::json!({"upstreams": ups})))
}

async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    refresh_queue_gauges(&state).await;
    let memory = match state.store.memory().await {
        Ok(m) => Some(m),
        Err(e) => {
            state.redis_failed("info", &e);
            None
        }
    };
    state.metrics.redis_memory(memory);
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

/// Queue gauges are read from Redis at scrape time (every replica shows the
/// same, shared queue); a failed read keeps the last values. Depth per
/// tenant: the deepest `metrics_top_tenants` tenants (over all upstreams)
/// by name, the rest summed under `other`.
async fn refresh_queue_gauges(state: &Shared) {
    let mut total = 0u64;
    let mut oldest: Option<i64> = None;
    let mut now = 0i64;
    let mut per_tenant: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for u in state.config.upstreams.iter() {
        let Ok(st) = state.store.queue_stats(&u.name, state.offset_ms(), MAX_STATS_TENANTS).await else {
            return;
        };
        state.metrics.queue_upstream(&u.name, st.queued, st.in_flight, st.deferred);
        total = total.saturating_add(st.queued);
        now = st.now_ms;
        if let Some(o) = st.oldest_ms {
            oldest = Some(oldest.map_or(o, |x| x.min(o)));
        }
        for t in st.tenants {
            *per_tenant.entry(t.tenant).or_insert(0) += t.depth;
        }
    }
    let lag = oldest.map_or(0, |o| now.saturating_sub(o).max(0));
    state.metrics.queue_snapshot(total, &per_tenant, std::time::Duration::from_millis(u64::try_from(lag).unwrap_or(0)));
}
