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
//! - any other path: 200 JSON echoing method, path, tenant, request id and
//!   the names of the headers it received.
//! - `x-demo-ratelimit-headers: 1`: the answer also carries its own
//!   rate-limit headers (the filter must replace them, case H08).
//! - `GET /__demo/stats`, `POST /__demo/reset`, `GET /healthz`: not counted.

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
}

impl Stats {
    fn count(&mut self, tenant: &str, path: &str) {
        self.total = self.total.saturating_add(1);
        bump(&mut self.by_tenant, tenant);
        bump(&mut self.by_path, path);
    }
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

type Shared = Arc<Mutex<Stats>>;

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
    let stats: Shared = Arc::default();
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/__demo/stats", get(stats_handler))
        .route("/__demo/reset", post(reset_handler))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(echo)
        .layer(middleware::from_fn_with_state(
            stats.clone(),
            count_and_decorate,
        ))
        .with_state(stats)
}

/// Serves the demo upstream until `shutdown` resolves.
pub async fn run_demo_upstream(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "demo upstream listening");
    }
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}

async fn count_and_decorate(State(stats): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if !(path.starts_with("/__demo/") || path == "/healthz") {
        let tenant = tenant_of(req.headers());
        if let Ok(mut s) = stats.lock() {
            s.count(tenant.as_deref().unwrap_or(NO_TENANT), &path);
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

async fn stats_handler(State(stats): State<Shared>) -> Response {
    match stats.lock() {
        Ok(s) => Json(&*s).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn reset_handler(State(stats): State<Shared>) -> Json<Value> {
    if let Ok(mut s) = stats.lock() {
        *s = Stats::default();
    }
    Json(json!({"status": "reset"}))
}

/// Takes the body (unread, hyper would close the keep-alive connection
/// under a large one and Envoy's next request on it would fail).
async fn echo(method: Method, uri: Uri, headers: HeaderMap, _body: Bytes) -> Json<Value> {
    Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "tenant": tenant_of(&headers),
        "request_id": header_str(&headers, "x-request-id"),
        "header_names": headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
    }))
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
    fn tracked_keys_are_bounded() {
        let mut s = Stats::default();
        for i in 0..(MAX_TRACKED + 5) {
            s.count(&format!("t{i}"), "/x");
        }
        assert_eq!(s.by_tenant.len(), MAX_TRACKED + 1);
        assert_eq!(s.by_tenant[OTHER], 5);
        assert_eq!(s.by_path["/x"], (MAX_TRACKED + 5) as u64);
    }
}
