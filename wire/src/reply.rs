//! Every answer Sluice itself gives a client, built in one place: the
//! filter's local replies and the queue service's answers (a queued request
//! that meets an exhausted quota at dispatch gets exactly the 429 a direct
//! request would have got). Pure functions over plain data.

use crate::{CheckResponse, Reason, WindowState};
use serde_json::{json, Value};
use std::fmt::Write;

/// Response headers as (lower-case name, value) pairs.
pub type Headers = Vec<(&'static str, String)>;

/// Response headers Sluice owns: removed from upstream responses before
/// ours are set, so a client never sees two of them.
pub const OWNED_RESPONSE_HEADERS: &[&str] =
    &["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy", "ratelimit"];

/// A complete answer: status, headers and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Headers,
    pub body: String,
}

/// The five rate-limit fields for a decision. The X- fields describe the
/// binding window; the IETF fields list every window.
pub fn rate_limit_headers(windows: &[WindowState], binding: &WindowState) -> Headers {
    let mut policy = String::with_capacity(48 * windows.len());
    let mut state = String::with_capacity(40 * windows.len());
    for (i, w) in windows.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(policy, "{sep}\"{}\";q={};w={}", w.name, w.limit, w.window.nominal_secs());
        let _ = write!(state, "{sep}\"{}\";r={};t={}", w.name, w.remaining, w.reset_in);
    }
    vec![
        ("x-ratelimit-limit", binding.limit.to_string()),
        ("x-ratelimit-remaining", binding.remaining.to_string()),
        ("x-ratelimit-reset", binding.reset.to_string()),
        ("ratelimit-policy", policy),
        ("ratelimit", state),
    ]
}

/// The rate-limit headers of an admitted decision (empty if it carries no
/// windows, which a well-formed answer never does).
pub fn admitted_headers(resp: &CheckResponse) -> Headers {
    match resp.windows.get(resp.binding) {
        Some(binding) => rate_limit_headers(&resp.windows, binding),
        None => Vec::new(),
    }
}

/// What a client gets for a decision that neither admits the request nor
/// sends it to the queue; `None` for those two.
pub fn denial(resp: &CheckResponse) -> Option<Reply> {
    if resp.allowed {
        return None;
    }
    if let Some(st) = resp.storage.as_ref().filter(|s| s.exceeded) {
        // 413, not 429: waiting does not help until the tenant deletes
        // data, and clients (the openai package among them) retry 429s.
        let body = json!({
            "error": "storage_quota_exceeded",
            "message": format!("tenant storage quota exceeded: {} of {} bytes used", st.used, st.limit),
            "used": st.used,
            "limit": st.limit,
            "tier": resp.tier,
        });
        return Some(json_reply(413, Vec::new(), &body));
    }
    let retry_after = resp
        .retry_after
        .or_else(|| resp.windows.get(resp.binding).map(|w| w.reset_in))
        .unwrap_or(1)
        .max(1);
    match resp.reason.unwrap_or(Reason::Quota) {
        Reason::Queued => None,
        Reason::Quota | Reason::Rate => Some(over_limit(resp, retry_after)),
        Reason::Capacity => Some(error(
            429,
            "capacity_exceeded",
            "the upstream is at capacity and this tenant is over its fair share; no queue is available on this route",
            Some(retry_after),
        )),
        Reason::QueueFull => Some(error(
            429,
            "queue_full",
            "this tenant's queue for the upstream is full",
            Some(retry_after),
        )),
        Reason::SystemOverloaded => Some(error(
            503,
            "system_overloaded",
            "the upstream's queue is full",
            Some(retry_after),
        )),
    }
}

/// 429 for an exhausted quota window or the short-term rate, with every
/// rate-limit header (remaining 0 on the binding window).
fn over_limit(resp: &CheckResponse, retry_after: u64) -> Reply {
    // The binding window has room left only when this request costs more
    // than that room: it is still the window that refuses it, so its
    // headers say 0 remaining, as the body does.
    let mut windows = resp.windows.clone();
    if let Some(w) = windows.get_mut(resp.binding) {
        w.remaining = 0;
    }
    let Some(binding) = windows.get(resp.binding) else {
        return error(429, "quota_exceeded", "tenant quota exceeded", Some(retry_after));
    };
    let mut headers = rate_limit_headers(&windows, binding);
    headers.push(("retry-after", retry_after.to_string()));
    let (code, message) = if resp.reason == Some(Reason::Rate) {
        ("rate_limited", format!("tenant rate exceeded: more than {} requests per second", binding.limit))
    } else {
        ("quota_exceeded", format!("tenant quota exceeded for the {} window", binding.name))
    };
    let body = json!({
        "error": code,
        "message": message,
        "window": binding.name,
        "limit": binding.limit,
        "remaining": 0,
        "reset": binding.reset,
        "retry_after": retry_after,
        "tier": resp.tier,
    });
    json_reply(429, headers, &body)
}

/// `{"error":code,"message":...}` (plus `retry_after` and the
/// `Retry-After` header when given), the body style of every Sluice error.
pub fn error(status: u16, code: &str, message: &str, retry_after: Option<u64>) -> Reply {
    let mut headers = Vec::new();
    let mut body = json!({"error": code, "message": message});
    if let Some(s) = retry_after {
        let s = s.max(1);
        headers.push(("retry-after", s.to_string()));
        if let Some(o) = body.as_object_mut() {
            o.insert("retry_after".into(), json!(s));
        }
    }
    json_reply(status, headers, &body)
}

/// A JSON reply with `content-type` and `cache-control: no-store`.
pub fn json_reply(status: u16, mut headers: Headers, body: &Value) -> Reply {
    headers.push(("content-type", "application/json".to_string()));
    headers.push(("cache-control", "no-store".to_string()));
    Reply { status, headers, body: body.to_string() }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::Window;

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

    fn resp(reason: Option<Reason>, windows: Vec<WindowState>, retry_after: Option<u64>) -> CheckResponse {
        CheckResponse {
            allowed: false,
            tier: "free".into(),
            windows,
            binding: 0,
            retry_after,
            reservation: None,
            storage: None,
            shadow: false,
            reserved_pool: None,
            reason,
            queue: None,
            lease: None,
        }
    }

    fn header<'a>(h: &'a Headers, name: &str) -> Vec<&'a str> {
        h.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.as_str()).collect()
    }

    #[test]
    fn a_rate_denial_names_the_second_window_with_retry_after_at_least_one() {
        let r = denial(&resp(Some(Reason::Rate), vec![win("second", Window::Second, 5, 5, 1)], Some(0))).unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(header(&r.headers, "retry-after"), ["1"]);
        assert_eq!(header(&r.headers, "ratelimit-policy"), [r#""second";q=5;w=1"#]);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], "rate_limited");
        assert_eq!(v["window"], "second");
    }

    #[test]
    fn a_request_costing_more_than_the_room_left_is_refused_with_remaining_zero_in_headers_and_body() {
        // 100 an hour, 0 used, a request of 200 units: the hour window refuses it.
        let r = denial(&resp(Some(Reason::Quota), vec![win("hour", Window::Hour, 100, 0, 100)], None)).unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(header(&r.headers, "x-ratelimit-remaining"), ["0"]);
        assert!(header(&r.headers, "ratelimit")[0].contains(";r=0;"), "{:?}", r.headers);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["remaining"], 0);
    }

    #[test]
    fn queue_bounds_answer_429_and_503_with_retry_after_and_no_rate_limit_headers() {
        let full = denial(&resp(Some(Reason::QueueFull), vec![win("hour", Window::Hour, 9, 1, 9)], Some(7))).unwrap();
        assert_eq!((full.status, header(&full.headers, "retry-after")), (429, vec!["7"]));
        assert!(header(&full.headers, "x-ratelimit-limit").is_empty());
        assert!(full.body.contains(r#""error":"queue_full""#));
        let over = denial(&resp(Some(Reason::SystemOverloaded), vec![], None)).unwrap();
        assert_eq!((over.status, header(&over.headers, "retry-after")), (503, vec!["1"]));
        assert!(over.body.contains(r#""error":"system_overloaded""#));
        let cap = denial(&resp(Some(Reason::Capacity), vec![], Some(2))).unwrap();
        assert_eq!(cap.status, 429);
        assert!(cap.body.contains(r#""error":"capacity_exceeded""#));
    }

    #[test]
    fn admitted_and_queued_decisions_are_not_denials() {
        let mut q = resp(Some(Reason::Queued), vec![], None);
        assert!(denial(&q).is_none());
        q.allowed = true;
        q.reason = None;
        assert!(denial(&q).is_none());
    }
}
