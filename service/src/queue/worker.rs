//! Queue workers. Each takes one request at a time from its upstream's
//! queue (the DEQUEUE script: capacity token, DRR order, lease), charges
//! the tenant's quota (CHARGE, once per request id), sends it with the
//! original method, path, headers (hop-by-hop removed) and body plus
//! `x-request-id: <queue id>`, and stores the answer (COMPLETE).
//!
//! A worker that dies mid-dispatch leaves a lease that expires: the next
//! DEQUEUE on any replica requeues the request at the front of its
//! tenant's queue (same id, so every replay carries the same
//! `x-request-id`) or, after `max_attempts`, stores 502 `dispatch_failed`.
//! On shutdown a worker stops taking work and gives its in-flight dispatch
//! `--worker-drain-ms` (5 s) to finish, else puts it back at the front.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderName, HeaderValue};
use sluice_wire::reply;

use super::model;
use super::Queue;
use crate::decision::{self, Verdict};
use crate::store::{Answer, Dequeued, Leased, StoreError};
use crate::upstreams::Upstream;

/// Idle workers poll this often in case a work notification was missed.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How long before its lease ends a worker stops trying to store an answer.
const COMPLETE_MARGIN: Duration = Duration::from_millis(500);
/// Largest upstream response a queued request stores.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Logs a failing Redis call at most once a second per process.
static LAST_LOG: AtomicU64 = AtomicU64::new(0);

fn log_throttled(msg: &str) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if LAST_LOG.swap(now, Ordering::Relaxed) != now {
        tracing::warn!("queue worker: {msg}");
    }
}

pub async fn run(q: Arc<Queue>, up: Upstream, n: usize) {
    let failed = model::failed_answer();
    let expired = model::timeout_answer();
    let work = q.events.work(&up.name);
    let mut stop = q.stop.clone();
    tracing::debug!(upstream = %up.name, worker = n, "queue worker started");
    while !*stop.borrow() {
        let step = q.app.store.dequeue(&up, q.offset_ms(), &failed, &expired).await;
        match step {
            Ok(Dequeued::Item(item)) => dispatch(&q, &up, *item).await,
            Ok(Dequeued::Busy) => tokio::task::yield_now().await,
            Ok(Dequeued::Wait(d)) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.changed() => {}
                }
            }
            Ok(Dequeued::Empty) => {
                let notified = async {
                    match &work {
                        Some(w) => w.notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => {
                q.app.metrics.redis_error("queue");
                log_throttled(&format!("dequeue failed: {e}"));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    tracing::debug!(upstream = %up.name, worker = n, "queue worker stopped");
}

async fn dispatch(q: &Arc<Queue>, up: &Upstream, item: Leased) {
    // The lease was taken just before (DEQUEUE): it ends `up.lease` after this.
    let leased_at = Instant::now();
    let m = &q.app.metrics;
    let waited = item.now_ms.saturating_sub(item.created_ms).max(0);
    m.queue_wait(Duration::from_millis(u64::try_from(waited).unwrap_or(0)));
    if item.attempt > 1 {
        m.requeued(&up.name, "lease_expired", 1);
    }
    let left = Duration::from_millis(u64::try_from(item.deadline_ms.saturating_sub(item.now_ms)).unwrap_or(0));
    let tiers = q.app.tiers.get();
    let charged = match q
        .app
        .store
        .charge(&item, q.offset_ms(), &tiers, q.app.usage_ttl_s(), left + up.keep_after_deadline())
        .await
    {
        Ok(d) => d,
        Err(e) => return give_back_after_error(q, up, &item, &e).await,
    };
    // The day's usage rollup now has this tenant (admitted or denied at
    // dispatch): list it in the day's index, as a direct check does, so an
    // all-tenant export includes work that only went through the queue.
    if !charged.day.is_empty() {
        q.app.index_usage(&charged.day, &item.tenant);
    }
    match charged.verdict {
        Verdict::Allow | Verdict::Charged => {}
        _ => {
            let reset_ms = i64::try_from(charged.extra).unwrap_or(i64::MAX).saturating_mul(1000);
            if item.queue_on_quota && reset_ms <= item.deadline_ms {
                // `on_quota_exceeded: queue`: wait for the window to reset.
                return match q.app.store.give_back(up, &item, reset_ms, q.offset_ms()).await {
                    Ok(true) => m.dispatch(&up.name, "deferred"),
                    Ok(false) => m.dispatch(&up.name, "stale"),
                    Err(e) => log_throttled(&format!("defer failed (the lease will expire): {e}")),
                };
            }
            // The 429 a direct request would have got; nothing was sent.
            let resp = decision::respond(charged, item.tokens, item.policy.as_deref(), None);
            let answer = reply::denial(&resp)
                .map(|r| model::answer(&r))
                .unwrap_or_else(model::failed_answer);
            m.dispatch(&up.name, "quota_denied");
            return complete(q, up, &item, leased_at, &answer, true).await;
        }
    }
    let resp = decision::respond(charged, item.tokens, item.policy.as_deref(), None);
    // Queued work is charged here, not at the check: keep the tenant's
    // utilisation gauge as current as a direct decision would.
    m.utilisation(&item.tenant, &resp.windows, q.offset_ms());
    let limits = reply::admitted_headers(&resp);

    let mut stop = q.stop.clone();
    let send = send(q, up, &item);
    tokio::pin!(send);
    let outcome = tokio::select! {
        r = &mut send => Some(r),
        _ = async {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            tokio::time::sleep(q.app.config.worker_drain).await;
        } => None,
    };
    let Some(result) = outcome else {
        // Shutting down and the upstream is still busy: put it back. It may
        // have reached the upstream; the replay carries the same x-request-id.
        match q.app.store.give_back(up, &item, 0, q.offset_ms()).await {
            Ok(true) => {
                m.dispatch(&up.name, "requeued");
                m.requeued(&up.name, "shutdown", 1);
            }
            Ok(false) => m.dispatch(&up.name, "stale"),
            Err(e) => log_throttled(&format!("requeue on shutdown failed (the lease will expire): {e}")),
        }
        return;
    };
    let answer = match result {
        Ok(mut a) => {
            let mut hs = model::headers_from_json(&a.headers_json);
            for (k, v) in &limits {
                if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                    hs.push((k, v));
                }
            }
            a.headers_json = model::headers_json(hs.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
            m.dispatch(&up.name, "ok");
            a
        }
        Err(why) => {
            m.dispatch(&up.name, "upstream_error");
            model::upstream_error_answer(&why)
        }
    };
    complete(q, up, &item, leased_at, &answer, false).await;
}

async fn give_back_after_error(q: &Queue, up: &Upstream, item: &Leased, e: &StoreError) {
    q.app.metrics.redis_error("queue");
    log_throttled(&format!("charge failed, putting the request back: {e}"));
    if q.app.store.give_back(up, item, 0, q.offset_ms()).await.is_err() {
        log_throttled("give back failed too; the lease will expire and the reaper requeues it");
    }
}

async fn complete(q: &Queue, up: &Upstream, item: &Leased, leased_at: Instant, answer: &Answer, refund: bool) {
    // Redis down (killed, restarting, cut off) must not turn a dispatched
    // request into a replay: keep trying to store the answer for as long as
    // the lease is ours (less a margin), then leave the lease to expire (the
    // request is then requeued and replayed with the same x-request-id).
    // COMPLETE refuses a lease that is no longer ours, so a late try never
    // overwrites a replay's answer.
    let until = leased_at + up.lease.saturating_sub(COMPLETE_MARGIN);
    let mut attempt: u32 = 0;
    loop {
        match q.app.store.complete(up, &item.id, answer, refund, q.offset_ms()).await {
            Ok(true) => return,
            Ok(false) => {
                q.app.metrics.dispatch(&up.name, "stale");
                return;
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                q.app.metrics.redis_error("queue");
                log_throttled(&format!("storing an answer failed (try {attempt}): {e}"));
                let pause = Duration::from_millis(100u64.saturating_mul(u64::from(attempt)).min(500));
                // Shutting down: do not hold the exit for a Redis that is gone.
                if attempt >= 3 && (Instant::now() + pause >= until || *q.stop.borrow()) {
                    log_throttled("giving up storing the answer; the lease will expire and the request be replayed");
                    return;
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Sends the queued request to the upstream; the answer with its status,
/// headers (hop-by-hop, content-length and Sluice-owned removed) and body.
async fn send(q: &Queue, up: &Upstream, item: &Leased) -> Result<Answer, String> {
    let method = reqwest::Method::from_bytes(item.method.as_bytes()).map_err(|e| format!("bad method: {e}"))?;
    let url = format!("{}{}", up.url, item.path);
    let mut req = q.client.request(method, &url).timeout(up.dispatch_timeout);
    for (k, v) in model::headers_from_json(&item.headers_json) {
        req = req.header(k, v);
    }
    req = req.header("x-request-id", item.id.as_str()).body(item.body.clone());
    let mut resp = req.send().await.map_err(|e| describe(&e))?;
    let status = resp.status().as_u16();
    let headers_json = model::headers_json(
        resp.headers()
            .iter()
            .filter(|(k, _)| model::keep_response_header(k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_bytes())),
    );
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(format!("the response is larger than {MAX_RESPONSE_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Answer { status, headers_json, body })
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        model::TIMED_OUT.to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    }
}
