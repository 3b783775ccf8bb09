//! The queue listener. Envoy's queue route sends it every overflowed
//! request, whatever its path, with the internal headers the filter added
//! (`x-sluice-queue: <upstream>`, `x-sluice-ticket: <ticket>`); requests
//! without them are the async status reads (`GET /v1/queue/requests/<id>`)
//! and `/healthz`.
//!
//! Wait mode holds the connection until the answer (the upstream's real
//! response, or 503 `queue_timeout` after the max wait, the request then
//! removed and never sent). A client that goes away cancels its queued
//! request. Async mode (`Prefer: respond-async`) answers 202 with a
//! `Location` at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::json;
use sluice_wire::reply::{self, Reply};
use sluice_wire::{QUEUE_HEADER, TICKET_HEADER};

use super::model::{self, REQUEST_ID_HEADER};
use super::Queue;
use crate::ids;
use crate::store::{Answer, Enqueued, Mode, NewItem};
use crate::upstreams::Upstream;

/// Path prefix of the async status reads.
pub const REQUESTS_PATH: &str = "/v1/queue/requests/";

pub fn router(queue: Arc<Queue>) -> Router {
    Router::new().fallback(handle).with_state(queue)
}

fn respond(r: Reply) -> Response {
    let mut resp = (
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        r.body,
    )
        .into_response();
    for (k, v) in r.headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

fn error(status: u16, code: &str, message: &str, retry_after: Option<u64>) -> Response {
    respond(reply::error(status, code, message, retry_after))
}

/// A stored answer as the HTTP response the client gets.
fn answer_response(a: Answer, id: &str) -> Response {
    let mut resp = (
        StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY),
        a.body,
    )
        .into_response();
    let h = resp.headers_mut();
    // The upstream's headers, not axum's default for a byte body
    // (application/octet-stream), which would make a second content-type.
    h.remove(axum::http::header::CONTENT_TYPE);
    for (k, v) in model::headers_from_json(&a.headers_json) {
        h.append(k, v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(REQUEST_ID_HEADER, v);
    }
    resp
}

async fn handle(State(q): State<Arc<Queue>>, req: Request) -> Response {
    let has_ticket = req.headers().contains_key(QUEUE_HEADER);
    let path = req.uri().path().to_string();
    if has_ticket {
        return intake(q, req).await;
    }
    if path == "/healthz" {
        return axum::Json(json!({"status": "ok"})).into_response();
    }
    if let Some(id) = path.strip_prefix(REQUESTS_PATH) {
        if req.method() == Method::GET {
            return status(q, id, req.headers()).await;
        }
        return error(405, "method_not_allowed", &format!("{} is not allowed on {path}", req.method()), None);
    }
    error(404, "not_found", &format!("no route for {} {path} on the queue listener", req.method()), None)
}

/// The tenant of a request to the queue listener, validated like the filter does.
fn tenant_of<'a>(q: &Queue, headers: &'a HeaderMap) -> Result<&'a str, Box<Response>> {
    let name = q.app.config.tenant_header.as_str();
    let mut values = headers.get_all(name).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(Box::new(error(401, "missing_tenant", &format!("exactly one {name} header is required"), None)));
    };
    let t = std::str::from_utf8(v.as_bytes()).unwrap_or("").trim_matches([' ', '\t']);
    if t.is_empty() {
        return Err(Box::new(error(401, "missing_tenant", &format!("the {name} header is required"), None)));
    }
    if !sluice_wire::is_valid_tenant(t.as_bytes()) {
        return Err(Box::new(error(400, "invalid_tenant", &format!("invalid {name} header: 1..=128 bytes of A-Z a-z 0-9 . _ - : @"), None)));
    }
    Ok(t)
}

/// Seconds a refused client should wait: time for `depth` requests at `rate`.
fn drain_secs(depth: u64, up: &Upstream) -> u64 {
    depth.div_ceil(up.rate.max(1)).clamp(1, up.max_wait.as_secs().max(1))
}

async fn intake(q: Arc<Queue>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let up_name = header(QUEUE_HEADER).to_string();
    let ticket = header(TICKET_HEADER).to_string();
    let Some(up) = q.app.config.upstreams.get(&up_name).cloned() else {
        return error(403, "invalid_ticket", &format!("{QUEUE_HEADER}: unknown upstream"), None);
    };
    if !ids::is_id(&ticket) {
        q.app.metrics.queue_rejection(&up.name, "bad_ticket");
        return error(403, "invalid_ticket", &format!("{TICKET_HEADER}: not a ticket this service issued"), None);
    }
    let tenant = match tenant_of(&q, &parts.headers) {
        Ok(t) => t.to_string(),
        Err(r) => return *r,
    };
    let limit = usize::try_from(up.max_body_bytes).unwrap_or(usize::MAX);
    let body = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                q.app.metrics.queue_rejection(&up.name, "payload_too_large");
                return error(413, "payload_too_large", &format!("a queued request body may have at most {limit} bytes"), None);
            }
            return error(400, "invalid_request", &format!("could not read the request body: {e}"), None);
        }
    };
    let mode = if parts.headers.get_all("prefer").iter().any(|v| model::prefers_async(v.as_bytes())) {
        Mode::Async
    } else {
        Mode::Wait
    };
    let Some(id) = ids::random_id() else {
        return error(503, "rng_unavailable", "the OS random number generator failed", Some(1));
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let headers_json = model::request_headers_json(&parts.headers);
    let item = NewItem {
        id: &id,
        ticket: &ticket,
        tenant: &tenant,
        mode,
        method: parts.method.as_str(),
        path: &path,
        headers_json: &headers_json,
        body: &body,
    };
    // Registered before the request exists, so its answer can not be missed.
    let waiter = (mode == Mode::Wait).then(|| q.events.wait_for(&id));
    let started = Instant::now();
    let enqueued = match q.app.store.enqueue(&up, &item, q.offset_ms()).await {
        Ok(e) => e,
        Err(e) => {
            q.app.redis_failed("queue", &e);
            return error(503, "queue_unavailable", "the queue store is unavailable", Some(1));
        }
    };
    let wait = match enqueued {
        Enqueued::Ok { deadline_ms, now_ms } => Duration::from_millis(u64::try_from(deadline_ms.saturating_sub(now_ms)).unwrap_or(0)),
        Enqueued::BadTicket => {
            q.app.metrics.queue_rejection(&up.name, "bad_ticket");
            return error(403, "invalid_ticket", "the queue ticket is unknown, used or expired", None);
        }
        Enqueued::QueueFull { depth } => {
            q.app.metrics.queue_rejection(&up.name, "queue_full");
            return respond(reply::error(429, "queue_full", "this tenant's queue for the upstream is full", Some(drain_secs(depth, &up))));
        }
        Enqueued::Overloaded { depth } => {
            q.app.metrics.queue_rejection(&up.name, "system_overloaded");
            return respond(reply::error(503, "system_overloaded", "the upstream's queue is full", Some(drain_secs(depth, &up))));
        }
    };
    q.app.metrics.enqueued(&up.name, mode.as_str());
    if let Some(work) = q.events.work(&up.name) {
        work.notify_one();
    }
    match waiter {
        None => accepted(&id),
        Some(waiter) => {
            let guard = CancelOnDrop { queue: q.clone(), upstream: up.clone(), id: id.clone(), armed: true };
            let resp = wait_for(&q, &up, &id, started + wait, waiter).await;
            guard.disarm();
            resp
        }
    }
}

fn accepted(id: &str) -> Response {
    let location = format!("{REQUESTS_PATH}{id}");
    let body = json!({"id": id, "status": "queued", "location": location});
    let mut resp = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert("location", v);
    }
    h.insert("retry-after", HeaderValue::from_static("1"));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// Cancels the queued request when the waiting client goes away (hyper
/// drops the handler's future when the connection or stream closes).
struct CancelOnDrop {
    queue: Arc<Queue>,
    upstream: Upstream,
    id: String,
    armed: bool,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (q, up, id) = (self.queue.clone(), self.upstream.clone(), std::mem::take(&mut self.id));
        tokio::spawn(async move {
            match q.app.store.cancel(&up, &id, false, &model::timeout_answer(), q.offset_ms()).await {
                Ok(state) if state == "removed" => q.app.metrics.queue_rejection(&up.name, "cancelled"),
                Ok(_) => {}
                Err(e) => q.app.redis_failed("queue", &e),
            }
        });
    }
}

/// How often a waiter re-reads its request in case a notification was missed.
const POLL: Duration = Duration::from_secs(1);

async fn wait_for(q: &Arc<Queue>, up: &Upstream, id: &str, deadline: Instant, waiter: super::events::Waiter) -> Response {
    let mut deadline = deadline;
    let mut extended = false;
    let mut stop = q.stop.clone();
    loop {
        match q.app.store.item(&up.name, id).await {
            Ok(Some(view)) => {
                if let Some(answer) = view.answer {
                    if view.state == "expired" {
                        q.app.metrics.queue_rejection(&up.name, "queue_timeout");
                    }
                    if let Err(e) = q.app.store.forget_item(&up.name, id).await {
                        q.app.redis_failed("queue", &e);
                    }
                    return answer_response(answer, id);
                }
            }
            Ok(None) => {
                return error(503, "queue_timeout", "the queued request is gone (expired)", Some(1));
            }
            Err(e) => q.app.redis_failed("queue", &e),
        }
        let now = Instant::now();
        let shutting_down = *stop.borrow();
        if now >= deadline || shutting_down {
            match q.app.store.cancel(up, id, !shutting_down, &model::timeout_answer(), q.offset_ms()).await {
                Ok(state) if state == "removed" => {
                    if shutting_down {
                        q.app.metrics.queue_rejection(&up.name, "cancelled");
                        return error(503, "queue_unavailable", "this queue replica is shutting down; retry", Some(1));
                    }
                    continue; // the stored timeout answer is read above
                }
                Ok(state) if state == "leased" && !extended => {
                    // Sent before the deadline: wait for its answer, bounded
                    // by the dispatch timeout (the Envoy route allows for it).
                    deadline = now + up.dispatch_timeout + Duration::from_secs(1);
                    extended = true;
                }
                Ok(state) if state == "leased" => {
                    return error(504, "upstream_timeout", "the dispatched request did not finish in time", None);
                }
                Ok(_) => continue,
                Err(e) => {
                    q.app.redis_failed("queue", &e);
                    if now >= deadline + POLL * 5 {
                        return error(503, "queue_unavailable", "the queue store is unavailable", Some(1));
                    }
                }
            }
        }
        let sleep = deadline.saturating_duration_since(Instant::now()).min(POLL);
        tokio::select! {
            _ = waiter.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = stop.changed(), if !shutting_down => {}
        }
    }
}

/// `GET /v1/queue/requests/<id>`: an async request's state, then its answer.
/// Another tenant's id, a wait-mode id, an unknown or an expired one all
/// get the same 404: existence is never revealed.
async fn status(q: Arc<Queue>, id: &str, headers: &HeaderMap) -> Response {
    let tenant = match tenant_of(&q, headers) {
        Ok(t) => t.to_string(),
        Err(r) => return *r,
    };
    let not_found = || error(404, "not_found", "no such queued request", None);
    if !ids::is_id(id) {
        return not_found();
    }
    for up in q.app.config.upstreams.iter() {
        let view = match q.app.store.item(&up.name, id).await {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                q.app.redis_failed("queue", &e);
                return error(503, "queue_unavailable", "the queue store is unavailable", Some(1));
            }
        };
        if view.tenant != tenant || view.mode != Mode::Async.as_str() {
            return not_found();
        }
        return match view.answer {
            Some(answer) => {
                let mut resp = answer_response(answer, id);
                if let Ok(v) = HeaderValue::from_str(&view.state) {
                    resp.headers_mut().insert("x-sluice-queue-status", v);
                }
                resp
            }
            None => {
                let shown = if view.state == "leased" { "dispatching" } else { view.state.as_str() };
                let body = json!({"id": id, "status": shown});
                let mut resp = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
                resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
                resp
            }
        };
    }
    not_found()
}
