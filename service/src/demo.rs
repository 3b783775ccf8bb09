//! `sluice demo-upstream`: a stand-in for the protected API, used by
//! `make run` and the end-to-end tests. It counts what reaches it, because
//! "admitted" means "reached the upstream", not "Envoy said 200".
//!
//! - `POST /v1/chat/completions`: OpenAI-style `chat.completion` with
//!   `usage`; `"stream": true` answers server-sent events whose last data
//!   chunk carries `usage` (omitted with `x-demo-stream-usage: 0`).
//!   `x-demo-usage-total: N` forces `usage.total_tokens` to N,
//!   `x-demo-usage-raw: <json>` sends that JSON as `usage` (bad figures);
//!   `x-demo-usage-header: N` adds the response header
//!   `x-usage-total-tokens: N`; `x-demo-stream-delay-ms: N` spaces the
//!   stream's events N ms apart (default 20) and `x-demo-stream-hold-ms: N`
//!   waits N ms after the usage chunk before `[DONE]`, so a client can
//!   abort a stream before or after its usage arrived.
//! - `POST /v1/embeddings`: OpenAI-style embeddings with `usage`.
//! - any other path: 200 JSON echoing method, path, query, tenant, request
//!   id, the names of the headers it received and the body (first 4 KiB).
//! - `x-demo-ratelimit-headers: 1`: the answer also carries its own
//!   rate-limit headers (the filter must replace them, case H08).
//! - `x-demo-delay-ms: N` (at most 60000): the answer takes N ms more.
//! - `--capacity N`: at most N requests per second (a token bucket of N);
//!   beyond it 503 `over_capacity`, counted in the stats. `--latency-ms N`:
//!   every counted request takes N ms (a backend's service time).
//! - `GET /__demo/stats` (totals, per tenant, per path, per `x-request-id`,
//!   over-capacity refusals, arrival order), `POST /__demo/reset`,
//!   `GET /healthz`: not counted.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// Distinct tenants/paths tracked before the rest are lumped together, so a
/// long test run cannot grow the maps without bound.
const MAX_TRACKED: usize = 10_000;
const OTHER: &str = "(other)";
const NO_TENANT: &str = "(none)";

#[derive(Default, Serialize)]
struct Stats {
    total: u64,
    by_tenant: BTreeMap<String, u64>,
    by_path: BTreeMap<String, u64>,
    /// How often each `x-request-id` arrived (a queued request replayed
    /// after a worker died arrives again with the same id).
    by_request_id: BTreeMap<String, u64>,
    /// Requests refused with 503 `over_capacity` (not in `total`).
    over_capacity: u64,
    /// The tenant of every counted request in arrival order (the first
    /// 10,000), to check scheduling order.
    arrivals: Vec<String>,
    #[serde(skip)]
    bucket: Option<(f64, std::time::Instant)>,
}

impl Stats {
    fn count(&mut self, tenant: &str, path: &str, request_id: Option<&str>) {
        self.total = self.total.saturating_add(1);
        bump(&mut self.by_tenant, tenant);
        bump(&mut self.by_path, path);
        if let Some(id) = request_id {
            bump(&mut self.by_request_id, id);
        }
        if self.arrivals.len() < MAX_TRACKED {
            self.arrivals.push(tenant.to_string());
        }
    }

    /// Takes a token of a bucket of `capacity` refilled at `capacity`/s.
    fn take(&mut self, capacity: u64) -> bool {
        let cap = capacity as f64;
        let now = std::time::Instant::now();
        let (tokens, at) = self.bucket.unwrap_or((cap, now));
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * cap).min(cap);
        if tokens >= 1.0 {
            self.bucket = Some((tokens - 1.0, now));
            true
        } else {
            self.bucket = Some((tokens, now));
            false
        }
    }
}

/// How the demo upstream behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct DemoOptions {
    /// Requests per second served (0: unlimited); beyond, 503 `over_capacity`.
    pub capacity: u64,
    /// Service time of every counted request.
    pub latency: Duration,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    let key = if map.len() >= MAX_TRACKED && !map.contains_key(key) {
        OTHER
    } else {
        key
    };
    let slot = map.entry(key.to_string()).or_insert(0);
    *slot = slot.saturating_add(1);
}

#[derive(Clone, Default)]
struct Demo {
    stats: Arc<Mutex<Stats>>,
    options: DemoOptions,
}

/// Every `x-tenant-id` value, joined by `,` exactly as received, so a test
/// can see when more than one reached the upstream.
fn tenant_of(headers: &HeaderMap) -> Option<String> {
    let values: Vec<String> = headers
        .get_all("x-tenant-id")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub fn router() -> Router {
    router_with(DemoOptions::default())
}

pub fn router_with(options: DemoOptions) -> Router {
    let demo = Demo {
        stats: Arc::default(),
        options,
    };
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/__demo/stats", get(stats_handler))
        .route("/__demo/reset", post(reset_handler))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(echo)
        .layer(middleware::from_fn_with_state(
            demo.clone(),
            count_and_decorate,
        ))
        .with_state(demo)
}

/// Serves the demo upstream until `shutdown` resolves.
pub async fn run_demo_upstream(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_demo_upstream_with(listener, DemoOptions::default(), shutdown).await
}

/// [`run_demo_upstream`] with a capacity and a service time.
pub async fn run_demo_upstream_with(
    listener: TcpListener,
    options: DemoOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, capacity = options.capacity, "demo upstream listening");
    }
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router_with(options))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn count_and_decorate(State(demo): State<Demo>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let counted = !(path.starts_with("/__demo/") || path == "/healthz");
    if counted {
        let tenant = tenant_of(req.headers());
        let request_id = header_str(req.headers(), "x-request-id").map(str::to_string);
        let admitted = match demo.stats.lock() {
            Ok(mut s) => {
                if demo.options.capacity > 0 && !s.take(demo.options.capacity) {
                    s.over_capacity = s.over_capacity.saturating_add(1);
                    false
                } else {
                    s.count(tenant.as_deref().unwrap_or(NO_TENANT), &path, request_id.as_deref());
                    true
                }
            }
            Err(_) => true,
        };
        if !admitted {
            let body = json!({"error": "over_capacity", "message": "the demo upstream is over its capacity"});
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        }
        let delay = header_str(req.headers(), "x-demo-delay-ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            .min(60_000);
        let wait = demo.options.latency + Duration::from_millis(delay);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    let decorate = header_str(req.headers(), "x-demo-ratelimit-headers") == Some("1");
    let mut resp = next.run(req).await;
    if decorate {
        let h = resp.headers_mut();
        h.insert("x-ratelimit-limit", HeaderValue::from_static("999"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("998"));
        h.insert("ratelimit", HeaderValue::from_static("\"up\";r=1;t=1"));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
    }
    resp
}

async fn stats_handler(State(demo): State<Demo>) -> Response {
    match demo.stats.lock() {
        Ok(s) => Json(&*s).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn reset_handler(State(demo): State<Demo>) -> Json<Value> {
    if let Ok(mut s) = demo.stats.lock() {
        *s = Stats::default();
    }
    Json(json!({"status": "reset"}))
}

/// Always takes the body (unread, hyper would close the keep-alive
/// connection under a large one and Envoy's next request on it would fail).
async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Json<Value> {
    let mut v = json!({
        "method": method.as_str(),
        "path": uri.path(),
        "tenant": tenant_of(&headers),
        "request_id": header_str(&headers, "x-request-id"),
        "header_names": headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
    });
    if let Some(o) = v.as_object_mut() {
        if let Some(q) = uri.query() {
            o.insert("query".into(), json!(q));
        }
        if !body.is_empty() {
            // The first 4 KiB, so a test can see a body arrived intact.
            let shown = body.get(..body.len().min(4096)).unwrap_or(&[]);
            o.insert("body".into(), json!(String::from_utf8_lossy(shown)));
        }
    }
    Json(v)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Roughly four characters per token, like common tokenizers on English.
fn estimate_prompt_tokens(body: &Value) -> u64 {
    let chars: usize = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(str::len)
                .sum()
        })
        .unwrap_or(0);
    u64::try_from(chars.div_ceil(4)).unwrap_or(u64::MAX).max(1)
}

#[derive(Serialize, Clone)]
#[serde(untagged)]
enum UsageOut {
    Usage(Usage),
    /// `x-demo-usage-raw: <json>`: sent verbatim, for tests of bad usage.
    Raw(Value),
}

fn usage_out(body: &Value, headers: &HeaderMap) -> UsageOut {
    match header_str(headers, "x-demo-usage-raw").and_then(|v| serde_json::from_str(v).ok()) {
        Some(raw) => UsageOut::Raw(raw),
        None => UsageOut::Usage(usage_for(body, headers)),
    }
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

fn usage_for(body: &Value, headers: &HeaderMap) -> Usage {
    let prompt = estimate_prompt_tokens(body);
    let completion = body
        .get("max_tokens")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
        .map_or(16, |n| n.min(4096));
    match header_str(headers, "x-demo-usage-total").and_then(|v| v.parse::<u64>().ok()) {
        Some(total) => {
            let prompt = prompt.min(total);
            Usage {
                prompt_tokens: prompt,
                completion_tokens: total - prompt,
                total_tokens: total,
            }
        }
        None => Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
        },
    }
}

fn parse_body(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        let err = json!({"error": "invalid_request", "message": format!("invalid JSON body: {e}")});
        Box::new((StatusCode::BAD_REQUEST, Json(err)).into_response())
    })
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, name).and_then(|v| v.parse::<u64>().ok())
}

/// Adds `x-usage-total-tokens` when the request asked for it.
fn with_usage_header(headers: &HeaderMap, mut resp: Response) -> Response {
    if let Some(v) = header_str(headers, "x-demo-usage-header").and_then(|v| HeaderValue::from_str(v).ok()) {
        resp.headers_mut().insert("x-usage-total-tokens", v);
    }
    resp
}

async fn embeddings(headers: HeaderMap, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let chars: usize = match body.get("input") {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::len).sum(),
        _ => 0,
    };
    let tokens = header_u64(&headers, "x-demo-usage-total")
        .unwrap_or_else(|| u64::try_from(chars.div_ceil(4)).unwrap_or(u64::MAX).max(1));
    let resp = Json(json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1, 0.2]}],
        "model": body.get("model").and_then(Value::as_str).unwrap_or("sluice-demo-embed"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response();
    with_usage_header(&headers, resp)
}

async fn chat_completions(headers: HeaderMap, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("sluice-demo")
        .to_string();
    let usage = usage_out(&body, &headers);
    let id = format!("chatcmpl-demo-{}", unix_now());
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let pacing = Pacing {
            with_usage: header_str(&headers, "x-demo-stream-usage") != Some("0"),
            delay: Duration::from_millis(header_u64(&headers, "x-demo-stream-delay-ms").unwrap_or(20).min(60_000)),
            hold: Duration::from_millis(header_u64(&headers, "x-demo-stream-hold-ms").unwrap_or(0).min(60_000)),
        };
        return with_usage_header(&headers, stream_completion(id, model, usage, pacing));
    }
    let resp = Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the Sluice demo upstream."},
            "finish_reason": "stop"
        }],
        "usage": usage,
    }))
    .into_response();
    with_usage_header(&headers, resp)
}

struct Pacing {
    with_usage: bool,
    /// Between events.
    delay: Duration,
    /// Before `[DONE]`, after the last event.
    hold: Duration,
}

/// Sends the events as separate body chunks, a little apart, so clients
/// (the filter) really see a stream and not one buffered body.
fn stream_completion(id: String, model: String, usage: UsageOut, pacing: Pacing) -> Response {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": unix_now(), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events = vec![
        chunk(
            json!({"role": "assistant", "content": "Hello"}),
            Value::Null,
        ),
        chunk(json!({"content": " from the demo."}), Value::Null),
    ];
    let mut last = chunk(json!({}), json!("stop"));
    if pacing.with_usage {
        if let Some(obj) = last.as_object_mut() {
            obj.insert("usage".into(), json!(usage));
        }
    }
    events.push(last);
    let mut frames: Vec<(String, Duration)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("data: {e}\n\n"), if i == 0 { Duration::ZERO } else { pacing.delay }))
        .collect();
    frames.push(("data: [DONE]\n\n".to_string(), pacing.delay + pacing.hold));
    let stream = futures_util::stream::unfold(frames.into_iter(), |mut it| async move {
        let (frame, wait) = it.next()?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from(frame)), it))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
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
    fn usage_can_be_forced_and_never_goes_negative() {
        let body =
            json!({"messages": [{"role": "user", "content": "12345678"}], "max_tokens": 250});
        let mut h = HeaderMap::new();
        let u = usage_for(&body, &h);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (2, 250, 252)
        );
        h.insert("x-demo-usage-total", HeaderValue::from_static("300"));
        let u = usage_for(&body, &h);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (2, 298, 300)
        );
        h.insert("x-demo-usage-total", HeaderValue::from_static("1"));
        let u = usage_for(&body, &h);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (1, 0, 1)
        );
    }

    #[test]
    fn the_capacity_bucket_refuses_beyond_its_size() {
        let mut s = Stats::default();
        let admitted = (0..15).filter(|_| s.take(10)).count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn tracked_keys_are_bounded() {
        let mut s = Stats::default();
        for i in 0..(MAX_TRACKED + 5) {
            s.count(&format!("t{i}"), "/x", None);
        }
        assert_eq!(s.by_tenant.len(), MAX_TRACKED + 1);
        assert_eq!(s.by_tenant[OTHER], 5);
        assert_eq!(s.by_path["/x"], (MAX_TRACKED + 5) as u64);
    }
}
