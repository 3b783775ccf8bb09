//! Pure pieces of the queue: which headers a queued request keeps, how
//! headers are stored, and the answers Sluice itself gives from the queue.
//! No I/O here.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use sluice_wire::reply::{self, Reply};

use crate::store::Answer;

/// Hop-by-hop headers (RFC 9110 section 7.6.1 and the usual extras): they
/// belong to one connection and are never stored or forwarded.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Header the answers from the queue carry: the queued request's id, which
/// is also the `x-request-id` of every dispatch of it.
pub const REQUEST_ID_HEADER: &str = "x-sluice-request-id";

/// Whether a request header is kept when the request is queued. Dropped:
/// hop-by-hop headers and the ones `Connection` names; `host` and
/// `content-length` (the dispatch sets its own); Sluice's internal
/// `x-sluice-*`; Envoy's internal `x-envoy-*`; `x-request-id` (replaced by
/// the queue id, the same on every replay); `prefer` when it asks for
/// `respond-async` (an instruction to Sluice, not to the upstream).
pub fn keep_request_header(name: &str, connection_named: &[String], value: &[u8]) -> bool {
    let n = name.to_ascii_lowercase();
    if HOP_BY_HOP.contains(&n.as_str()) || connection_named.contains(&n) {
        return false;
    }
    if matches!(n.as_str(), "host" | "content-length" | "x-request-id") {
        return false;
    }
    if n.starts_with("x-sluice-") || n.starts_with("x-envoy-") {
        return false;
    }
    if n == "prefer" && prefers_async(value) {
        return false;
    }
    true
}

/// Whether a `Prefer` value asks for `respond-async` (RFC 7240).
pub fn prefers_async(value: &[u8]) -> bool {
    String::from_utf8_lossy(value)
        .split(',')
        .any(|p| p.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("respond-async"))
}

/// Header names listed in `Connection` values (they are hop-by-hop too).
pub fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("connection")
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The headers of a request as stored with it: `[[name, value], ...]`.
pub fn request_headers_json(headers: &HeaderMap) -> String {
    let named = connection_named(headers);
    let kept = headers
        .iter()
        .filter(|(k, v)| keep_request_header(k.as_str(), &named, v.as_bytes()))
        .map(|(k, v)| (k.as_str(), v.as_bytes()));
    headers_json(kept)
}

/// Encodes (name, value) pairs. Values are bytes: each byte becomes the
/// char of the same code point (Latin-1), so any value round-trips, obs-text
/// included, and the JSON is always valid.
pub fn headers_json<'a>(pairs: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let list: Vec<Value> = pairs
        .map(|(k, v)| Value::Array(vec![Value::String(k.to_string()), Value::String(v.iter().map(|b| char::from(*b)).collect())]))
        .collect();
    Value::Array(list).to_string()
}

/// Decodes [`headers_json`]; entries that are not valid headers are skipped.
pub fn headers_from_json(text: &str) -> Vec<(HeaderName, HeaderValue)> {
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let pair = item.as_array()?;
            let name = pair.first()?.as_str()?;
            let value = pair.get(1)?.as_str()?;
            let bytes: Option<Vec<u8>> = value.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
            Some((HeaderName::from_bytes(name.as_bytes()).ok()?, HeaderValue::from_bytes(&bytes?).ok()?))
        })
        .collect()
}

/// Whether a response header of the upstream is kept in the stored answer:
/// hop-by-hop ones and `content-length` go (the answer has its own), and
/// the rate-limit headers Sluice owns are replaced by the dispatch-time
/// decision's (exactly one of each, case H08).
pub fn keep_response_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !(HOP_BY_HOP.contains(&n.as_str()) || n == "content-length" || reply::OWNED_RESPONSE_HEADERS.contains(&n.as_str()))
}

/// A shared reply as a stored answer.
pub fn answer(r: &Reply) -> Answer {
    Answer {
        status: r.status,
        headers_json: headers_json(r.headers.iter().map(|(k, v)| (*k, v.as_bytes()))),
        body: r.body.clone().into_bytes(),
    }
}

/// The answer of a request that waited past its max wait: 503
/// `queue_timeout`. It was removed and is never sent afterwards.
pub fn timeout_answer() -> Answer {
    answer(&reply::error(
        503,
        "queue_timeout",
        "the request waited in the queue for its route's max wait and was not sent",
        Some(1),
    ))
}

/// The answer of a request whose dispatch was lost `max_attempts` times
/// (each time a worker died holding it).
pub fn failed_answer() -> Answer {
    answer(&reply::error(
        502,
        "dispatch_failed",
        "the request's dispatch was interrupted too many times; it may have reached the upstream",
        None,
    ))
}

/// What a dispatch that ran past `dispatch_timeout_ms` failed with.
pub const TIMED_OUT: &str = "timed out";

/// The answer of a request whose upstream could not be reached (`502
/// upstream_unavailable`) or did not answer within the dispatch timeout
/// (`504 upstream_timeout`).
pub fn upstream_error_answer(why: &str) -> Answer {
    if why == TIMED_OUT {
        return answer(&reply::error(504, "upstream_timeout", "the upstream did not answer within dispatch_timeout_ms", None));
    }
    answer(&reply::error(502, "upstream_unavailable", &format!("the upstream could not be reached: {why}"), None))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_dispatch_timeout_is_a_504_and_an_unreachable_upstream_a_502() {
        let t = upstream_error_answer(TIMED_OUT);
        assert_eq!(t.status, 504);
        assert!(String::from_utf8_lossy(&t.body).contains("upstream_timeout"));
        let u = upstream_error_answer("connection failed");
        assert_eq!(u.status, 502);
        assert!(String::from_utf8_lossy(&u.body).contains("upstream_unavailable"));
    }

    #[test]
    fn hop_by_hop_internal_and_replaced_headers_are_not_stored() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("host", "example"),
            ("x-sluice-ticket", "t"),
            ("x-envoy-expected-rq-timeout-ms", "15000"),
            ("x-request-id", "client"),
            ("prefer", "respond-async, wait=10"),
            ("authorization", "Bearer abc"),
            ("x-tenant-id", "acme"),
            ("content-type", "application/json"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let kept: Vec<String> = headers_from_json(&request_headers_json(&h)).iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(kept, ["authorization", "x-tenant-id", "content-type"]);
    }

    #[test]
    fn header_values_round_trip_byte_for_byte() {
        let value = HeaderValue::from_bytes(b"caf\xe9 \x80\xff").unwrap();
        let json = headers_json(std::iter::once(("x-raw", value.as_bytes())));
        let back = headers_from_json(&json);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].1.as_bytes(), value.as_bytes());
        assert!(headers_from_json("not json").is_empty());
    }

    #[test]
    fn prefer_respond_async_is_recognised_among_other_preferences() {
        assert!(prefers_async(b"respond-async"));
        assert!(prefers_async(b"wait=5, Respond-Async"));
        assert!(!prefers_async(b"return=minimal"));
    }

    #[test]
    fn owned_rate_limit_headers_of_the_upstream_are_replaced() {
        assert!(!keep_response_header("X-RateLimit-Limit"));
        assert!(!keep_response_header("ratelimit"));
        assert!(!keep_response_header("transfer-encoding"));
        assert!(keep_response_header("retry-after"));
        assert!(keep_response_header("content-type"));
    }

    #[test]
    fn the_timeout_answer_is_a_503_with_retry_after_in_the_filter_body_style() {
        let a = timeout_answer();
        assert_eq!(a.status, 503);
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["error"], "queue_timeout");
        let hs = headers_from_json(&a.headers_json);
        assert!(hs.iter().any(|(k, v)| k == "retry-after" && v == "1"));
    }
}
