//! What the filter does with a request once it knows (or can not know) the
//! quota service's answer. Pure functions over plain data: every header and
//! body a client can see from Sluice is computed here or in the shared
//! `sluice_wire::reply` (which the queue service uses too, so a queued
//! request gets exactly the answers a direct one would).

use crate::config::FailureMode;
use crate::lease;
use serde_json::{json, Value};
use sluice_wire::reply::{self, Reply};
use sluice_wire::{is_valid_policy_name, CheckBatchResponse, CheckResponse, QueueTicket, Reason, WindowState};

pub use sluice_wire::reply::{rate_limit_headers, Headers, OWNED_RESPONSE_HEADERS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forward the request; put these headers on the response (none when
    /// the decision was a failed-open guess: no invented numbers).
    /// Route it to this reserved pool (the `x-sluice-pool` request header).
    /// `shadow_denied`: the quota said no, shadow mode forwards it anyway.
    Admit { headers: Headers, pool: Option<String>, shadow_denied: bool },
    /// Forward the request to the queue cluster: add the internal headers
    /// of the ticket and let Envoy's route table re-route it.
    Queue { ticket: QueueTicket },
    /// Answer locally.
    Reply { status: u32, headers: Headers, body: String },
}

/// Why a callout did not produce a usable decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutFailure {
    /// `dispatch_http_call` refused (unknown cluster, bad arguments).
    Dispatch,
    /// No `:status`: Envoy reports a timeout or a reset this way.
    NoResponse,
    /// A status other than 200.
    Status,
    /// A 200 whose body is not a well-formed decision.
    Malformed,
}

impl CalloutFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            CalloutFailure::Dispatch => "dispatch_failed",
            CalloutFailure::NoResponse => "no_response_or_timeout",
            CalloutFailure::Status => "non_200_status",
            CalloutFailure::Malformed => "malformed_answer",
        }
    }
}

/// Largest callout answer the filter will parse. A real answer is a few
/// hundred bytes; anything bigger is a misbehaving cluster.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Validates and parses the quota service's answer.
pub fn parse_answer(status: Option<&[u8]>, body: Option<&[u8]>) -> Result<CheckResponse, CalloutFailure> {
    match status {
        None => return Err(CalloutFailure::NoResponse),
        Some(b"200") => {}
        // Envoy answers a callout that timed out (504) or could not connect
        // (503) with its own plain-text local reply; the service's errors are
        // always JSON `{"error":...}`. Only the latter is a real non-200 answer.
        Some(_) if body.is_some_and(is_service_error) => return Err(CalloutFailure::Status),
        Some(_) => return Err(CalloutFailure::NoResponse),
    }
    let body = body.ok_or(CalloutFailure::Malformed)?;
    if body.len() > MAX_ANSWER_BYTES {
        return Err(CalloutFailure::Malformed);
    }
    let resp: CheckResponse = serde_json::from_slice(body).map_err(|_| CalloutFailure::Malformed)?;
    consistent(resp)
}

/// Validates and parses the answer to a batch of `n` checks: one result per
/// check, in order. A batch that failed as a whole fails each check the same
/// way; a result that is not a well-formed decision or service error fails
/// its check only.
pub fn parse_batch_answer(
    status: Option<&[u8]>,
    body: Option<&[u8]>,
    n: usize,
    max_bytes: usize,
) -> Vec<Result<CheckResponse, CalloutFailure>> {
    let all = |why: CalloutFailure| (0..n).map(|_| Err(why)).collect();
    match status {
        None => return all(CalloutFailure::NoResponse),
        Some(b"200") => {}
        Some(_) if body.is_some_and(is_service_error) => return all(CalloutFailure::Status),
        Some(_) => return all(CalloutFailure::NoResponse),
    }
    let Some(body) = body.filter(|b| b.len() <= max_bytes) else { return all(CalloutFailure::Malformed) };
    let Ok(batch) = serde_json::from_slice::<CheckBatchResponse>(body) else {
        return all(CalloutFailure::Malformed);
    };
    if batch.results.len() != n {
        return all(CalloutFailure::Malformed);
    }
    batch
        .results
        .into_iter()
        .map(|r| match (r.status, r.answer, r.error) {
            (200, Some(answer), None) => consistent(answer),
            (status, None, Some(e)) if status != 200 && !e.error.is_empty() => Err(CalloutFailure::Status),
            _ => Err(CalloutFailure::Malformed),
        })
        .collect()
}

/// A decision whose fields agree with each other (and are safe to copy
/// into headers).
fn consistent(resp: CheckResponse) -> Result<CheckResponse, CalloutFailure> {
    let consistent = !resp.windows.is_empty()
        && resp.binding < resp.windows.len()
        && resp.windows.iter().all(|w| w.remaining <= w.limit && !w.name.is_empty() && w.name.bytes().all(is_sf_safe))
        && resp.queue.as_ref().is_none_or(is_valid_ticket)
        && (resp.reason == Some(Reason::Queued)) == resp.queue.is_some();
    if consistent {
        Ok(resp)
    } else {
        Err(CalloutFailure::Malformed)
    }
}

/// Whether a non-200 callout body is an error answer of the quota service
/// (`{"error":"<code>",...}`) rather than a local reply of Envoy's.
fn is_service_error(body: &[u8]) -> bool {
    body.len() <= MAX_ANSWER_BYTES
        && serde_json::from_slice::<sluice_wire::ErrorBody>(body).is_ok_and(|e| !e.error.is_empty())
}

/// Bytes that can go inside a structured-field string without escaping and
/// that a window name from our own service uses.
fn is_sf_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')
}

/// A ticket is copied into request headers: only header-safe values.
fn is_valid_ticket(t: &QueueTicket) -> bool {
    is_valid_policy_name(&t.upstream) && t.ticket.len() == 32 && t.ticket.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Turns a decision into what the client gets. In shadow mode (the route's
/// or, as the service says, the tenant's) nothing is blocked or queued: a
/// denial is forwarded, and the rate-limit headers are only added when
/// `shadow_headers` is on. `can_queue` is whether this filter has a queue
/// cluster: a queue ticket without one is answered like overflow without a
/// queue, 429 `capacity_exceeded` (case H13), so the request never reaches
/// the upstream around its capacity limit.
pub fn decide(resp: &CheckResponse, route_shadow: bool, shadow_headers: bool, can_queue: bool) -> Outcome {
    let pool = resp.reserved_pool.clone().filter(|p| is_valid_policy_name(p));
    let Some(binding) = resp.windows.get(resp.binding) else {
        // parse_answer guarantees the index; stay total anyway.
        return Outcome::Admit { headers: Vec::new(), pool, shadow_denied: false };
    };
    let mut headers = rate_limit_headers(&resp.windows, binding);
    if route_shadow || resp.shadow {
        if !shadow_headers {
            headers.clear();
        }
        return Outcome::Admit { headers, pool, shadow_denied: !resp.allowed };
    }
    if resp.allowed {
        if let Some(lease) = resp.lease.as_ref().filter(|l| l.units > 0) {
            // The lease's units are counted as used in the answer but are
            // still this tenant's to spend: show them as remaining.
            let windows: Vec<WindowState> = resp
                .windows
                .iter()
                .map(|w| {
                    let remaining = w.remaining.saturating_add(lease.units).min(w.limit);
                    WindowState { remaining, used: w.limit - remaining, ..w.clone() }
                })
                .collect();
            return admit_with(&windows, pool);
        }
        return Outcome::Admit { headers, pool, shadow_denied: false };
    }
    if let Some(ticket) = &resp.queue {
        if can_queue {
            return Outcome::Queue { ticket: ticket.clone() };
        }
        let mut no_queue = resp.clone();
        no_queue.reason = Some(Reason::Capacity);
        no_queue.retry_after = Some(resp.retry_after.unwrap_or(1));
        return from_reply(reply::denial(&no_queue));
    }
    from_reply(reply::denial(resp))
}

/// What a queue ticket gets when the filter can not forward it after all.
pub fn no_queue() -> Outcome {
    from_reply(Some(reply::error(
        429,
        "capacity_exceeded",
        "the upstream is at capacity and this tenant is over its fair share; no queue is available on this route",
        Some(1),
    )))
}

fn from_reply(r: Option<Reply>) -> Outcome {
    match r {
        Some(r) => Outcome::Reply { status: u32::from(r.status), headers: r.headers, body: r.body },
        // Not reachable for a denial; never admit by accident.
        None => reply(
            429,
            vec![("retry-after", "1".to_string())],
            &json!({"error": "quota_exceeded", "message": "tenant quota exceeded"}),
        ),
    }
}

/// An admission from a lease in the slot table (no callout): headers from
/// the lease's snapshot (see [`lease::window_states`] for their precision),
/// routed to the tenant's reserved pool as the grant was.
pub fn admit_from_lease(entry: &lease::Entry, now_ms: u64) -> Outcome {
    let pool = Some(entry.pool.clone()).filter(|p| sluice_wire::is_valid_policy_name(p));
    admit_with(&lease::window_states(entry, now_ms), pool)
}

/// A 429 answered from a kept denial (no callout): the same headers and
/// body the service's denial gives, with the times counted from now. The
/// binding window is the exceeded one (room below the cost) that resets last.
pub fn deny_from_lease(entry: &lease::Entry, cost: u64, now_ms: u64) -> Outcome {
    let windows = lease::window_states(entry, now_ms);
    let binding = windows
        .iter()
        .enumerate()
        .filter(|(_, w)| w.remaining < cost)
        .max_by_key(|(i, w)| (w.reset, std::cmp::Reverse(*i)))
        .map_or(0, |(i, _)| i);
    let retry_after = windows.get(binding).map(|w| w.reset_in);
    let resp = CheckResponse {
        allowed: false,
        tier: entry.tier.clone(),
        windows,
        binding,
        retry_after,
        reservation: None,
        storage: None,
        shadow: false,
        reserved_pool: None,
        reason: Some(Reason::Quota),
        queue: None,
        lease: None,
    };
    decide(&resp, false, false, false)
}

fn admit_with(windows: &[WindowState], pool: Option<String>) -> Outcome {
    let headers = match windows.get(lease::admitted_binding(windows)) {
        Some(binding) => rate_limit_headers(windows, binding),
        None => Vec::new(),
    };
    Outcome::Admit { headers, pool, shadow_denied: false }
}

/// The route's failure mode, applied when no decision could be had.
pub fn on_failure(mode: FailureMode, retry_after_s: u64, why: CalloutFailure) -> Outcome {
    match mode {
        FailureMode::Open => Outcome::Admit { headers: Vec::new(), pool: None, shadow_denied: false },
        FailureMode::Closed => reply(
            503,
            vec![("retry-after", retry_after_s.to_string())],
            &json!({
                "error": "quota_service_unavailable",
                "message": "the quota service could not be reached; try again shortly",
                "reason": why.as_str(),
                "retry_after": retry_after_s,
            }),
        ),
    }
}

pub fn missing_tenant(header: &str) -> Outcome {
    reply(
        401,
        Vec::new(),
        &json!({"error": "missing_tenant", "message": format!("the {header} header is required")}),
    )
}

pub fn invalid_tenant(header: &str, reason: &str) -> Outcome {
    reply(
        400,
        Vec::new(),
        &json!({"error": "invalid_tenant", "message": format!("invalid {header} header: {reason}")}),
    )
}

/// A client-controlled number or field in the request body is unacceptable.
pub fn invalid_request(field: &str, message: &str) -> Outcome {
    reply(
        400,
        Vec::new(),
        &json!({"error": "invalid_request", "message": format!("{field}: {message}"), "field": field}),
    )
}

/// The request body is over what the route reads to price it.
pub fn payload_too_large(message: &str) -> Outcome {
    reply(413, Vec::new(), &json!({"error": "payload_too_large", "message": format!("body: {message}"), "field": "body"}))
}

fn reply(status: u16, headers: Headers, body: &Value) -> Outcome {
    let r = reply::json_reply(status, headers, body);
    Outcome::Reply { status: u32::from(r.status), headers: r.headers, body: r.body }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_wire::{Window, WindowState};

    fn answer_json(allowed: bool) -> serde_json::Value {
        serde_json::json!({"allowed": allowed, "tier": "free", "binding": 0,
            "windows": [{"name": "hour", "window": "hour", "limit": 10, "used": 3, "remaining": 7, "reset": 1, "reset_in": 1}]})
    }

    #[test]
    fn a_batch_answer_is_split_into_one_result_per_check_in_order() {
        let body = serde_json::json!({"results": [
            {"status": 200, "answer": answer_json(true)},
            {"status": 400, "error": {"error": "invalid_tenant", "message": "bad"}},
            {"status": 200, "answer": answer_json(false)},
            {"status": 200},
            {"status": 200, "answer": {"allowed": true, "tier": "t", "binding": 3, "windows": []}},
        ]})
        .to_string();
        let r = parse_batch_answer(Some(b"200"), Some(body.as_bytes()), 5, 1 << 20);
        assert_eq!(r.len(), 5);
        assert!(r[0].as_ref().is_ok_and(|a| a.allowed));
        assert_eq!(r[1], Err(CalloutFailure::Status));
        assert!(r[2].as_ref().is_ok_and(|a| !a.allowed));
        assert_eq!(r[3], Err(CalloutFailure::Malformed));
        assert_eq!(r[4], Err(CalloutFailure::Malformed), "inconsistent answers are refused as for a single check");
    }

    #[test]
    fn a_batch_that_failed_as_a_whole_fails_every_check_the_same_way() {
        let one = serde_json::json!({"results": [{"status": 200, "answer": answer_json(true)}]}).to_string();
        let all = |r: Vec<Result<CheckResponse, CalloutFailure>>, why| r.len() == 3 && r.iter().all(|x| *x == Err(why));
        assert!(all(parse_batch_answer(Some(b"200"), Some(one.as_bytes()), 3, 1 << 20), CalloutFailure::Malformed), "wrong count");
        assert!(all(parse_batch_answer(None, None, 3, 1 << 20), CalloutFailure::NoResponse));
        assert!(all(parse_batch_answer(Some(b"504"), Some(b"upstream request timeout"), 3, 1 << 20), CalloutFailure::NoResponse));
        let err = br#"{"error":"invalid_request","message":"checks: too many"}"#;
        assert!(all(parse_batch_answer(Some(b"400"), Some(err), 3, 1 << 20), CalloutFailure::Status));
        assert!(all(parse_batch_answer(Some(b"200"), Some(b"[1,2"), 3, 1 << 20), CalloutFailure::Malformed));
        assert!(all(parse_batch_answer(Some(b"200"), Some(one.as_bytes()), 3, 8), CalloutFailure::Malformed), "over the size cap");
    }

    fn win(name: &str, window: Window, limit: u64, used: u64, reset_in: u64) -> WindowState {
        WindowState {
            name: name.into(),
            window,
            limit,
            used,
            remaining: limit.saturating_sub(used),
            reset: 1_700_000_000 + reset_in,
            reset_in,
        }
    }

    fn header<'a>(h: &'a Headers, name: &str) -> Vec<&'a str> {
        h.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.as_str()).collect()
    }

    #[test]
    fn admitted_decision_sets_one_of_each_field_from_the_binding_window() {
        let resp = CheckResponse {
            allowed: true,
            tier: "free".into(),
            windows: vec![win("hour", Window::Hour, 100, 99, 600), win("day", Window::Day, 1000, 99, 7200)],
            binding: 0,
            retry_after: None,
            reservation: None,
            storage: None,
            shadow: false,
            reserved_pool: None,
            reason: None,
            queue: None,
            lease: None,
        };
        let Outcome::Admit { headers, pool, shadow_denied } = decide(&resp, false, false, true) else { panic!("not admitted") };
        assert_eq!((pool, shadow_denied), (None, false));
        assert_eq!(header(&headers, "x-ratelimit-limit"), ["100"]);
        assert_eq!(header(&headers, "x-ratelimit-remaining"), ["1"]);
        assert_eq!(header(&headers, "x-ratelimit-reset"), ["1700000600"]);
        assert_eq!(header(&headers, "ratelimit-policy"), [r#""hour";q=100;w=3600, "day";q=1000;w=86400"#]);
        assert_eq!(header(&headers, "ratelimit"), [r#""hour";r=1;t=600, "day";r=901;t=7200"#]);
        assert!(header(&headers, "retry-after").is_empty());
    }

    #[test]
    fn an_admission_with_a_lease_shows_the_leased_units_as_remaining() {
        let resp = CheckResponse {
            allowed: true,
            tier: "free".into(),
            windows: vec![win("hour", Window::Hour, 100, 60, 600), win("day", Window::Day, 1000, 60, 7200)],
            binding: 0,
            retry_after: None,
            reservation: None,
            storage: None,
            shadow: false,
            reserved_pool: None,
            reason: None,
            queue: None,
            lease: Some(sluice_wire::LeaseGrant {
                units: 20,
                unit_cost: 1,
                day: "20260102".into(),
                valid_ms: 600_000,
                charged: vec!["q:hour:2026010203".into()],
            }),
        };
        let Outcome::Admit { headers, .. } = decide(&resp, false, false, true) else { panic!("not admitted") };
        assert_eq!(header(&headers, "x-ratelimit-remaining"), ["60"]);
        assert_eq!(header(&headers, "ratelimit"), [r#""hour";r=60;t=600, "day";r=960;t=7200"#]);
    }

    #[test]
    fn a_kept_denial_gives_the_same_429_with_times_from_now() {
        let e = lease::Entry {
            denied: true,
            returned: false,
            id: 1,
            units_left: 0,
            expires_at_ms: 0,
            granted: 0,
            granted_at_ms: 0,
            unit_cost: 0,
            tenant: "t".into(),
            policy: "default".into(),
            tier: "free".into(),
            pool: String::new(),
            day: "20260102".into(),
            charged: vec![],
            windows: vec![
                lease::WindowSnap { name: "hour".into(), window: Window::Hour, limit: 10, remaining: 0, reset: 3_600 },
                lease::WindowSnap { name: "day".into(), window: Window::Day, limit: 100, remaining: 90, reset: 86_400 },
            ],
        };
        let Outcome::Reply { status, headers, body } = deny_from_lease(&e, 1, 3_000_000) else { panic!("not a reply") };
        assert_eq!(status, 429);
        assert_eq!(header(&headers, "retry-after"), ["600"]);
        assert_eq!(header(&headers, "x-ratelimit-remaining"), ["0"]);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["window"].as_str(), v["retry_after"].as_u64(), v["tier"].as_str()), (Some("hour"), Some(600), Some("free")));
        let mut lease_entry = e.clone();
        lease_entry.denied = false;
        lease_entry.pool = "gold".into();
        let Outcome::Admit { pool, shadow_denied, .. } = admit_from_lease(&lease_entry, 3_000_000) else { panic!() };
        assert_eq!((pool.as_deref(), shadow_denied), (Some("gold"), false));
    }

    #[test]
    fn h06_h07_denial_has_retry_after_in_whole_seconds_until_the_binding_reset() {
        let resp = CheckResponse {
            allowed: false,
            tier: "free".into(),
            windows: vec![win("hour", Window::Hour, 10, 10, 600)],
            binding: 0,
            retry_after: Some(600),
            reservation: None,
            storage: None,
            shadow: false,
            reserved_pool: None,
            reason: None,
            queue: None,
            lease: None,
        };
        let Outcome::Reply { status, headers, body } = decide(&resp, false, false, true) else { panic!("not a reply") };
        assert_eq!(status, 429);
        assert_eq!(header(&headers, "retry-after"), ["600"]);
        assert_eq!(header(&headers, "x-ratelimit-remaining"), ["0"]);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "quota_exceeded");
        assert_eq!(v["window"], "hour");
        assert_eq!(v["limit"], 10);
        assert_eq!(v["remaining"], 0);
        assert_eq!(v["retry_after"], 600);
        assert_eq!(v["reset"], 1_700_000_600u64);
        assert_eq!(v["tier"], "free");
    }

    #[test]
    fn h16_zero_limit_denial_has_sane_headers() {
        let resp = CheckResponse {
            allowed: false,
            tier: "suspended".into(),
            windows: vec![win("hour", Window::Hour, 0, 0, 5)],
            binding: 0,
            retry_after: Some(0),
            reservation: None,
            storage: None,
            shadow: false,
            reserved_pool: None,
            reason: None,
            queue: None,
            lease: None,
        };
        let Outcome::Reply { status, headers, .. } = decide(&resp, false, false, true) else { panic!("not a reply") };
        assert_eq!(status, 429);
        assert_eq!(header(&headers, "x-ratelimit-limit"), ["0"]);
        assert_eq!(header(&headers, "x-ratelimit-remaining"), ["0"]);
        assert_eq!(header(&headers, "retry-after"), ["1"], "Retry-After is never 0");
    }

    fn denied(shadow: bool, pool: Option<&str>) -> CheckResponse {
        CheckResponse {
            allowed: false,
            tier: "free".into(),
            windows: vec![win("hour", Window::Hour, 10, 10, 600)],
            binding: 0,
            retry_after: Some(600),
            reservation: None,
            storage: None,
            shadow,
            reserved_pool: pool.map(str::to_string),
            reason: None,
            queue: None,
            lease: None,
        }
    }

    fn queued(ticket: &str) -> CheckResponse {
        CheckResponse {
            allowed: false,
            tier: "free".into(),
            windows: vec![win("hour", Window::Hour, 100, 3, 600)],
            binding: 0,
            retry_after: Some(1),
            reservation: None,
            storage: None,
            shadow: false,
            reserved_pool: None,
            reason: Some(Reason::Queued),
            queue: Some(QueueTicket { upstream: "llm".into(), ticket: ticket.into() }),
            lease: None,
        }
    }

    #[test]
    fn a_queue_ticket_forwards_to_the_queue_when_the_filter_has_one() {
        let resp = queued("0123456789abcdef0123456789abcdef");
        assert_eq!(decide(&resp, false, false, true), Outcome::Queue { ticket: resp.queue.clone().unwrap() });
    }

    #[test]
    fn h13_a_queue_ticket_without_a_queue_cluster_is_a_429_with_retry_after() {
        let Outcome::Reply { status, headers, body } = decide(&queued("0123456789abcdef0123456789abcdef"), false, false, false) else {
            panic!("must reply")
        };
        assert_eq!(status, 429);
        assert_eq!(header(&headers, "retry-after"), ["1"]);
        assert!(body.contains(r#""error":"capacity_exceeded""#), "{body}");
        let Outcome::Reply { status, .. } = no_queue() else { panic!() };
        assert_eq!(status, 429);
    }

    #[test]
    fn in_shadow_mode_a_queue_ticket_is_forwarded_like_any_denial() {
        let mut resp = queued("0123456789abcdef0123456789abcdef");
        resp.shadow = true;
        assert!(matches!(decide(&resp, false, false, true), Outcome::Admit { shadow_denied: true, .. }));
    }

    #[test]
    fn tickets_that_are_not_header_safe_make_the_answer_malformed() {
        for bad in ["short", "0123456789abcdef0123456789abcdeX", "0123456789abcdef0123456789abcdef\r\nx: y"] {
            let body = serde_json::to_vec(&queued(bad)).unwrap();
            assert_eq!(parse_answer(Some(b"200"), Some(&body)), Err(CalloutFailure::Malformed), "{bad}");
        }
        let mut no_ticket = queued("0123456789abcdef0123456789abcdef");
        no_ticket.queue = None;
        let body = serde_json::to_vec(&no_ticket).unwrap();
        assert_eq!(parse_answer(Some(b"200"), Some(&body)), Err(CalloutFailure::Malformed));
        let ok = serde_json::to_vec(&queued("0123456789abcdef0123456789abcdef")).unwrap();
        assert!(parse_answer(Some(b"200"), Some(&ok)).is_ok());
    }

    #[test]
    fn shadow_mode_forwards_denials_with_headers_only_when_asked() {
        for (route, tenant) in [(true, false), (false, true)] {
            let Outcome::Admit { headers, shadow_denied, .. } = decide(&denied(tenant, None), route, false, true) else {
                panic!("shadow must not block")
            };
            assert!(shadow_denied);
            assert!(headers.is_empty());
        }
        let Outcome::Admit { headers, .. } = decide(&denied(true, None), false, true, true) else { panic!() };
        assert_eq!(header(&headers, "x-ratelimit-remaining"), ["0"]);
        assert!(header(&headers, "retry-after").is_empty(), "nothing says retry: it went through");
    }

    #[test]
    fn a_reserved_pool_routes_admitted_requests_and_bad_names_are_ignored() {
        let mut ok = denied(false, Some("gold"));
        ok.allowed = true;
        let Outcome::Admit { pool, .. } = decide(&ok, false, false, true) else { panic!() };
        assert_eq!(pool.as_deref(), Some("gold"));
        ok.reserved_pool = Some("bad name\r\n".into());
        let Outcome::Admit { pool, .. } = decide(&ok, false, false, true) else { panic!() };
        assert_eq!(pool, None);
        assert!(matches!(decide(&denied(false, Some("gold")), false, false, true), Outcome::Reply { status: 429, .. }));
    }

    #[test]
    fn malformed_answers_are_failures_not_decisions() {
        assert_eq!(parse_answer(None, None), Err(CalloutFailure::NoResponse));
        let service_error = br#"{"error":"redis_unavailable","message":"the quota store is unavailable"}"#;
        assert_eq!(parse_answer(Some(b"503"), Some(service_error)), Err(CalloutFailure::Status));
        assert_eq!(parse_answer(Some(b"400"), Some(service_error)), Err(CalloutFailure::Status));
        // Envoy's own local replies: a callout timeout and a refused connection.
        assert_eq!(parse_answer(Some(b"504"), Some(b"upstream request timeout")), Err(CalloutFailure::NoResponse));
        assert_eq!(
            parse_answer(Some(b"503"), Some(b"upstream connect error or disconnect/reset before headers")),
            Err(CalloutFailure::NoResponse)
        );
        assert_eq!(parse_answer(Some(b"503"), Some(b"{}")), Err(CalloutFailure::NoResponse));
        assert_eq!(parse_answer(Some(b"200"), None), Err(CalloutFailure::Malformed));
        for body in [&b""[..], b"null", b"{}", b"\xff\xfe", br#"{"allowed":"yes","tier":"f","windows":[],"binding":0}"#,
            br#"{"allowed":true,"tier":"f","windows":[],"binding":0}"#,
            br#"{"allowed":true,"tier":"f","windows":[{"name":"hour","window":"hour","limit":1,"used":0,"remaining":1,"reset":1,"reset_in":1}],"binding":3}"#,
            br#"{"allowed":true,"tier":"f","windows":[{"name":"ho\"ur","window":"hour","limit":1,"used":0,"remaining":1,"reset":1,"reset_in":1}],"binding":0}"#,
            br#"{"allowed":true,"tier":"f","windows":[{"name":"hour","window":"hour","limit":1,"used":0,"remaining":-1,"reset":1,"reset_in":1}],"binding":0}"#] {
            assert_eq!(parse_answer(Some(b"200"), Some(body)), Err(CalloutFailure::Malformed), "{:?}", String::from_utf8_lossy(body));
        }
        let huge = vec![b' '; MAX_ANSWER_BYTES + 1];
        assert_eq!(parse_answer(Some(b"200"), Some(&huge)), Err(CalloutFailure::Malformed));
    }

    #[test]
    fn h11_fail_open_admits_without_invented_headers_and_fail_closed_is_a_short_503() {
        assert_eq!(
            on_failure(FailureMode::Open, 1, CalloutFailure::NoResponse),
            Outcome::Admit { headers: vec![], pool: None, shadow_denied: false }
        );
        let Outcome::Reply { status, headers, body } = on_failure(FailureMode::Closed, 2, CalloutFailure::Dispatch) else {
            panic!("closed must reply")
        };
        assert_eq!(status, 503);
        assert_eq!(header(&headers, "retry-after"), ["2"]);
        assert!(header(&headers, "x-ratelimit-limit").is_empty());
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "quota_service_unavailable");
    }

    #[test]
    fn tenant_errors_are_json_401_and_400() {
        let Outcome::Reply { status, body, .. } = missing_tenant("x-tenant-id") else { panic!() };
        assert_eq!(status, 401);
        assert!(body.contains(r#""error":"missing_tenant""#));
        let Outcome::Reply { status, body, .. } = invalid_tenant("x-tenant-id", "too long") else { panic!() };
        assert_eq!(status, 400);
        assert!(body.contains(r#""error":"invalid_tenant""#));
    }

    #[test]
    fn an_upload_over_the_storage_quota_is_a_413_without_retry_after() {
        let resp = CheckResponse {
            allowed: false,
            tier: "free".into(),
            windows: vec![win("hour", Window::Hour, 100, 3, 600)],
            binding: 0,
            retry_after: Some(600),
            reservation: None,
            storage: Some(sluice_wire::StorageState { used: 10, limit: 10, exceeded: true }),
            shadow: false,
            reserved_pool: None,
            reason: None,
            queue: None,
            lease: None,
        };
        let Outcome::Reply { status, headers, body } = decide(&resp, false, false, true) else { panic!("not a reply") };
        assert_eq!(status, 413);
        assert!(header(&headers, "retry-after").is_empty());
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["error"].as_str(), v["used"].as_u64(), v["limit"].as_u64()), (Some("storage_quota_exceeded"), Some(10), Some(10)));
    }

    #[test]
    fn h15_invalid_request_names_the_field() {
        let Outcome::Reply { status, body, .. } = invalid_request("max_tokens", "must not be negative, got -1000") else { panic!() };
        assert_eq!(status, 400);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "invalid_request");
        assert_eq!(v["field"], "max_tokens");
        assert_eq!(v["message"], "max_tokens: must not be negative, got -1000");
    }
}
