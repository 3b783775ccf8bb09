//! Weighted costs and LLM token budgets end to end: real Envoy with the
//! filter, the quota service, Redis and the demo upstream answering plain
//! and streamed completions. Cases H02, H15, H17; the storage quota; the
//! official `openai` Python client.
//!
//! Usage reports reach the service asynchronously (from the filter's root
//! context, a few milliseconds after the response ends), so tests that
//! check reconciled figures poll the admin view until they land; nothing
//! here sleeps to wait for a window.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::{http, Response, ServiceOpts};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const TIERS: &str = r#"{"default_tier":"llm","tiers":{
  "llm":{"hour":1000,"tokens_hour":1000,"tokens_month":100000,"storage_bytes":1000}}}"#;

fn token_plugin_config() -> Value {
    plugin_config(json!({
        "timeout_ms": 2000,
        "policies": [
            {"name": "chat", "route_name": "chat_route", "failure_mode": "closed",
             "cost_rules": {"charge_units": true, "reserve_tokens": true,
                            "usage_header": "x-usage-total-tokens", "max_body_bytes": 4096,
                            "fallback_units": 3, "fallback_tokens": 500}},
            {"name": "embed", "path_prefix": "/v1/embeddings",
             "cost_rules": {"kind": "embeddings", "reserve_tokens": true}},
            {"name": "files", "path_prefix": "/v1/files", "upload": true}
        ]
    }))
}

fn stack() -> Stack {
    let opts = ServiceOpts { tiers: Some(serde_json::from_str(TIERS).unwrap()), ..ServiceOpts::default() };
    Stack::with_service(token_plugin_config(), 2, opts, |_| {})
}

/// A chat body estimating exactly `prompt_tokens + max_tokens` tokens.
fn chat_body(prompt_tokens: usize, max_tokens: i64, stream: bool) -> Vec<u8> {
    json!({"model": "gpt-3.5-turbo", "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": "abcd".repeat(prompt_tokens)}]})
    .to_string()
    .into_bytes()
}

fn post(s: &Stack, path: &str, tenant: &str, extra: &[(&str, &str)], body: &[u8]) -> Response {
    let mut h = vec![("x-tenant-id", tenant), ("content-type", "application/json")];
    h.extend_from_slice(extra);
    s.envoy.request("POST", path, &h, Some(body))
}

/// The `current` of a window in the admin view (`tokens_hour`, `hour`, ...).
fn used(s: &Stack, tenant: &str, window: &str) -> u64 {
    let view = s.service.admin("GET", &format!("/v1/admin/tenants/{tenant}"), None).json();
    view["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == window)
        .and_then(|w| w["current"].as_u64())
        .unwrap_or_else(|| panic!("no {window} window in {view}"))
}

/// Polls until the window shows `want` (usage reports are asynchronous).
fn wait_used(s: &Stack, tenant: &str, window: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = used(s, tenant, window);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{tenant} {window}: {got}, expected {want}\n{}", s.envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` concurrent POSTs of `body`, one connection each.
fn fire_posts(addr: SocketAddr, n: usize, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<Response> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|_| sc.spawn(|| http::request(addr, "POST", path, headers, Some(body), Duration::from_secs(20)).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn h02_ten_concurrent_completions_reserve_atomically_and_the_recorded_total_is_real_usage() {
    let s = stack();
    let addr = s.envoy.listener_addr();
    // Each body estimates 50 + 250 = 300 tokens; the upstream reports 300.
    let headers = [("x-tenant-id", "h02"), ("content-type", "application/json"), ("x-demo-usage-total", "300")];
    let replies = fire_posts(addr, 10, "/v1/chat/completions", &headers, &chat_body(50, 250, false));
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 3, "1000 tokens/hour hold three 300-token reservations: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    for r in replies.iter().filter(|r| r.status != 200) {
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["window"], "tokens_hour", "{}", r.text());
        assert!(header_u64(r, "retry-after") >= 1);
    }
    assert_eq!(s.admitted("h02"), 3, "counted at the upstream");
    wait_used(&s, "h02", "tokens_hour", 900);
    assert_eq!(used(&s, "h02", "tokens_month"), 900, "the recorded total equals real usage");

    // The overshoot bound: usage above the estimate is charged after the
    // fact, so the budget can be exceeded by at most the sum of
    // (real - reserved) over the requests admitted before it filled, here
    // 3 x (450 - 300) = 450. Then nothing more is admitted.
    let headers = [("x-tenant-id", "h02-over"), ("content-type", "application/json"), ("x-demo-usage-total", "450")];
    let replies = fire_posts(addr, 10, "/v1/chat/completions", &headers, &chat_body(50, 250, false));
    // Three fit; a report that lands before the third check (it charges
    // +150 at once) can leave room for only two.
    let ok = replies.iter().filter(|r| r.status == 200).count() as u64;
    assert!((2..=3).contains(&ok), "{ok} admitted");
    wait_used(&s, "h02-over", "tokens_hour", ok * 450);
    let overshoot = (ok * 450).saturating_sub(1000);
    let bound = ok * (450 - 300);
    assert!(overshoot <= bound, "overshoot {overshoot} exceeds the documented bound {bound}");
    let r = post(&s, "/v1/chat/completions", "h02-over", &[], &chat_body(1, 1, false));
    assert_eq!(r.status, 429, "over budget: even a 2-token request waits for the window");
    assert_eq!(s.admitted("h02-over"), ok);
}

#[test]
fn h15_negative_non_numeric_fractional_and_absurd_max_tokens_are_400s_without_a_callout() {
    let s = stack();
    let before = s.callouts();
    for (raw, words) in [
        (r#"{"model":"gpt-4","max_tokens":-1000,"messages":[]}"#, "negative"),
        (r#"{"model":"gpt-4","max_tokens":"lots","messages":[]}"#, "number"),
        (r#"{"model":"gpt-4","max_tokens":250.5,"messages":[]}"#, "whole"),
        (r#"{"model":"gpt-4","max_tokens":1e30,"messages":[]}"#, "at most"),
    ] {
        let r = post(&s, "/v1/chat/completions", "h15", &[], raw.as_bytes());
        assert_eq!(r.status, 400, "{raw}: {}", r.text());
        let b = r.json();
        assert_eq!(b["error"], "invalid_request");
        assert_eq!(b["field"], "max_tokens");
        assert!(b["message"].as_str().unwrap().starts_with("max_tokens: ") && b["message"].as_str().unwrap().contains(words), "{b}");
    }
    assert_eq!(s.callouts(), before, "a 400 makes no callout");
    assert_eq!(s.admitted("h15"), 0);
    assert_eq!(s.envoy.filter_counter("sluice.invalid_request"), 4);

    // max_tokens 0 with an empty prompt reserves the documented minimum (1
    // token); usage lower than the estimate refunds only the difference.
    let r = post(&s, "/v1/chat/completions", "h15", &[("x-demo-usage-total", "0")], &chat_body(0, 0, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(&s, "/v1/chat/completions", "h15", &[("x-demo-usage-total", "10")], &chat_body(50, 250, false));
    assert_eq!(r.status, 200, "{}", r.text());
    wait_used(&s, "h15", "tokens_hour", 10);
    // Usage the upstream reports as negative is no figure: the reservation stands.
    let r = post(&s, "/v1/chat/completions", "h15", &[("x-demo-usage-raw", r#"{"total_tokens":-5}"#)], &chat_body(50, 250, false));
    assert_eq!(r.status, 200);
    wait_used(&s, "h15", "tokens_hour", 310);
    assert!(s.envoy.filter_counter("sluice.usage_missing") >= 1);
}

/// Sends a streamed completion on a raw connection and closes it as soon as
/// the bytes read so far contain `until`; returns what was read.
fn read_then_abort(addr: SocketAddr, tenant: &str, extra: &str, body: &[u8], until: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-tenant-id: {tenant}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(until) {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended before {until:?}: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    drop(c); // the client goes away mid-stream
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn h17_streamed_usage_is_counted_from_the_final_chunk_and_aborted_streams_keep_their_reservation() {
    let s = stack();
    // Each stream estimates 2 + 150 = 152 tokens and really uses 300.
    let body = chat_body(2, 150, true);
    let mut statuses = Vec::new();
    for i in 1..=10u64 {
        let r = post(&s, "/v1/chat/completions", "h17", &[("x-demo-usage-total", "300")], &body);
        statuses.push(r.status);
        if r.status == 200 {
            assert_eq!(r.header("content-type"), Some("text/event-stream"));
            assert!(r.text().contains("data: [DONE]"));
            wait_used(&s, "h17", "tokens_hour", 300 * i);
        } else {
            assert_eq!(r.json()["window"], "tokens_hour");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429, 429, 429, 429, 429], "the 4th request onward is rejected");
    assert_eq!(s.admitted("h17"), 3);

    // A stream that never reports usage is charged its estimate.
    let r = post(&s, "/v1/chat/completions", "h17-none", &[("x-demo-stream-usage", "0")], &body);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("data: [DONE]"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.envoy.filter_counter("sluice.usage_missing") < 1 {
        assert!(Instant::now() < deadline, "the finished stream was never accounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(used(&s, "h17-none", "tokens_hour"), 152);

    // Aborted halfway, before any usage: at least the reservation.
    let addr = s.envoy.listener_addr();
    let seen = read_then_abort(addr, "h17-abort", "x-demo-stream-delay-ms: 400\r\nx-demo-usage-total: 300\r\n", &body, "Hello");
    assert!(!seen.contains("usage"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.envoy.filter_counter("sluice.usage_missing") < 2 {
        assert!(Instant::now() < deadline, "the aborted stream was never accounted\n{}", s.envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(used(&s, "h17-abort", "tokens_hour"), 152);

    // Aborted after the usage chunk, before the end: the report is sent
    // after the HTTP context is gone (from the root context) and charges
    // max(real, reserved) = 300.
    let seen = read_then_abort(addr, "h17-late", "x-demo-stream-hold-ms: 5000\r\nx-demo-usage-total: 300\r\n", &body, "total_tokens");
    assert!(!seen.contains("[DONE]"));
    wait_used(&s, "h17-late", "tokens_hour", 300);
    // The VM survived all of it.
    assert_eq!(post(&s, "/v1/chat/completions", "h17-after", &[], &chat_body(1, 1, false)).status, 200);
    let log = s.envoy.log();
    assert!(!log.contains("panicked") && !log.contains("Wasm VM failed"), "{log}");
}

#[test]
fn usage_comes_from_the_configured_header_from_json_bodies_and_from_embeddings() {
    let s = stack();
    let r = post(&s, "/v1/chat/completions", "hdr", &[("x-demo-usage-header", "77"), ("x-demo-usage-total", "300")], &chat_body(10, 20, false));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["total_tokens"], 300);
    wait_used(&s, "hdr", "tokens_hour", 77);

    let r = post(&s, "/v1/embeddings", "emb", &[], br#"{"model":"text-embedding-3-small","input":["abcdabcd","abcd"]}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["total_tokens"], 3);
    wait_used(&s, "emb", "tokens_hour", 3);

    s.set_limits("units", json!({"tokens_hour": 100000}));
    // Standard units: an 8K-token gpt-4 call costs 8192 x 20 / 1000 = 164
    // units of the hour window; a short gpt-3.5 call 1.
    let big = json!({"model": "gpt-4", "max_tokens": 192, "messages": [{"role": "user", "content": "a".repeat(32_000)}]}).to_string();
    let r = s.envoy.request("POST", "/v1/chat/completions", &[("x-tenant-id", "units"), ("content-type", "application/json"), ("x-demo-usage-total", "1")], Some(big.as_bytes()));
    // The body is over this route's 4096-byte cap: the documented fallback (3 units, 500 tokens) applies.
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(used(&s, "units", "hour"), 3);
    let r = post(&s, "/v1/chat/completions", "units", &[], &chat_body(10, 20, false));
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 1000 - 3 - 1);
    let r = post(&s, "/v1/chat/completions", "units", &[], json!({"model": "gpt-4-0613", "max_tokens": 1000, "messages": []}).to_string().as_bytes());
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 1000 - 3 - 1 - 20, "gpt-4-0613 is gpt-4: 1000 tokens x 20");

    // A body route without a body (end of stream on the headers) works: the fallback.
    let r = s.envoy.request("GET", "/v1/chat/completions", &[("x-tenant-id", "nobody")], None);
    assert_ne!(r.status, 503, "{}", r.text());
    assert_eq!(used(&s, "nobody", "hour"), 3);
}

#[test]
fn a_body_never_reaches_the_upstream_before_the_decision() {
    let s = stack();
    s.set_limits("closed", json!({"hour": 0}));
    // /v1/models is not a body route: the check goes out at the headers,
    // and the body arriving meanwhile must not push the request on.
    let body = vec![b'x'; 64 * 1024];
    for path in ["/v1/models", "/v1/chat/completions"] {
        let r = s.envoy.request("POST", path, &[("x-tenant-id", "closed"), ("content-type", "application/json")], Some(&body));
        assert_eq!(r.status, 429, "{path}: {}", r.text());
    }
    assert_eq!(s.admitted("closed"), 0);
}

#[test]
fn uploads_are_refused_with_413_at_or_over_the_storage_quota() {
    let s = stack();
    let set = |bytes: u64| {
        let r = s.service.admin("PUT", "/v1/admin/tenants/st/storage", Some(&json!({"used_bytes": bytes})));
        assert_eq!(r.status, 200, "{}", r.text());
    };
    set(999);
    assert_eq!(post(&s, "/v1/files", "st", &[], b"{}").status, 200);
    set(1000);
    let r = post(&s, "/v1/files", "st", &[], b"{}");
    assert_eq!(r.status, 413, "{}", r.text());
    let b = r.json();
    assert_eq!((b["error"].as_str(), b["used"].as_u64(), b["limit"].as_u64()), (Some("storage_quota_exceeded"), Some(1000), Some(1000)));
    assert!(r.header("retry-after").is_none());
    assert_eq!(s.get("/v1/models", "st").status, 200, "only upload routes are refused");
    assert_eq!(s.admitted("st"), 2);
    assert_eq!(s.envoy.filter_counter("sluice.storage_denied"), 1);
}

fn openai(s: &Stack, args: &[&str]) -> Value {
    let script = sluice_tests::paths::repo_root().join("tests").join("python").join("openai_client.py");
    let out = Command::new("python3").arg(&script).arg(s.envoy.url("/v1")).args(args).output().expect("run python3");
    assert!(
        out.status.success(),
        "openai client {args:?} failed (is the openai package installed? `make deps` installs it):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn the_official_openai_client_gets_completions_and_a_rate_limit_error_with_our_retry_after() {
    let s = stack();
    let r = openai(&s, &["complete", "oa"]);
    assert_eq!(r["content"], "Hello from the Sluice demo upstream.");
    let streamed = openai(&s, &["stream", "oa"]);
    assert_eq!(streamed["content"], "Hello from the demo.");
    assert!(streamed["usage"].as_u64().unwrap() > 0);
    wait_used(&s, "oa", "tokens_hour", r["usage"].as_u64().unwrap() + streamed["usage"].as_u64().unwrap());

    s.set_limits("oa-limited", json!({"tokens_hour": 10}));
    let e = openai(&s, &["complete", "oa-limited"]);
    assert_eq!(e["error"], "RateLimitError", "{e}");
    assert_eq!(e["status"], 429);
    assert_eq!(e["body"]["window"], "tokens_hour");
    let retry_after: u64 = e["retry_after"].as_str().unwrap().parse().unwrap();
    assert_eq!(Some(retry_after), e["body"]["retry_after"].as_u64());
    let left = ((next_hour_ms(0) - now_ms()) / 1000) as u64;
    assert!(retry_after.abs_diff(left) <= 2, "Retry-After {retry_after} vs {left} s left in the hour");

    // With retries on, the client waits our Retry-After and succeeds once
    // the window has turned (the service's clock is set 8 s before the
    // hour; the first call (23 tokens) leaves no room for the second).
    s.service.set_clock_offset_ms(offset_to(next_hour_ms(10) - 8_000));
    s.set_limits("oa-retry", json!({"tokens_hour": 30}));
    let r = openai(&s, &["retry", "oa-retry"]);
    assert_eq!(r["content"], "Hello from the Sluice demo upstream.", "{r}");
    assert!(r["elapsed_s"].as_f64().unwrap() >= 1.0, "the client honoured Retry-After: {r}");
    assert_eq!(s.admitted("oa-retry"), 2, "the filling call and the retried one; the 429 never reached it");
}
