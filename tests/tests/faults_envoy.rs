//! Fault suite (`make test-faults`): Envoy killed with SIGKILL while
//! requests are in flight (a token-reserving stream among them) and
//! restarted on the same ports.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn token_config() -> Value {
    let mut c = plugin_config(json!({"timeout_ms": 2000}));
    for p in c["policies"].as_array_mut().unwrap() {
        if p["name"] == "chat" {
            p["cost"] = json!(1);
            p["cost_rules"] = json!({"reserve_tokens": true});
        }
    }
    c
}

fn tokens_month(s: &Stack, tenant: &str) -> u64 {
    let view = s.service.admin("GET", &format!("/v1/admin/tenants/{tenant}"), None).json();
    view["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == "tokens_month")
        .and_then(|w| w["current"].as_u64())
        .unwrap_or_else(|| panic!("no tokens_month window: {view}"))
}

/// Usage reports the service has settled.
fn settled_reports(s: &Stack) -> u64 {
    s.service
        .metrics()
        .lines()
        .find(|l| l.starts_with("sluice_usage_reports_total{result=\"settled\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn wait_settled(s: &Stack, n: u64) {
    let t = Instant::now();
    while settled_reports(s) < n {
        assert!(t.elapsed() < Duration::from_secs(15), "{} usage reports settled, waiting for {n}", settled_reports(s));
        std::thread::sleep(Duration::from_millis(50));
    }
}

const BODY: &str = r#"{"model":"gpt-3.5-turbo","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
/// The filter's estimate for BODY: ceil(5 chars / 4) prompt + 100 completion.
const ESTIMATE: u64 = 102;

fn stream_request(tenant: &str, delay_ms: u64) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-tenant-id: {tenant}\r\ncontent-type: application/json\r\n\
         x-demo-stream-delay-ms: {delay_ms}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
}

#[test]
fn envoy_killed_with_requests_in_flight_and_restarted_keeps_the_reservation_and_decides_again() {
    let mut s = Stack::with(token_config(), 2);
    let tenant = "envoy-kill";

    // A whole stream: reserved, then reconciled to the demo's real usage.
    let mut c = TcpStream::connect(s.envoy.listener_addr()).unwrap();
    c.write_all(stream_request(tenant, 5).as_bytes()).unwrap();
    let mut all = String::new();
    c.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.1 200") && all.contains("[DONE]"), "{all}");
    wait_settled(&s, 1);
    let settled = tokens_month(&s, tenant);
    assert!(settled > 0);

    // Load on a plain route, and a slow stream in flight, when Envoy dies.
    let load = Load::start(s.envoy.listener_addr(), &[("/v1/models", "envoy-load")], 2);
    let mut c = TcpStream::connect(s.envoy.listener_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(stream_request(tenant, 400).as_bytes()).unwrap();
    let mut first = [0u8; 512];
    let n = c.read(&mut first).unwrap();
    let head = String::from_utf8_lossy(&first[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "the stream started: {head}");
    let reserved = tokens_month(&s, tenant);
    assert_eq!(reserved, settled + ESTIMATE, "reserved at admission");
    s.envoy.kill();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"), "the stream was cut");

    // No usage report could be sent: the reservation stands, charged once.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(tokens_month(&s, tenant), reserved, "the cut stream keeps its reservation");

    s.envoy.restart();
    let by_target = load.finish();
    let statuses = &by_target[0];
    // Requests in flight at the kill, or sent while Envoy was down, fail at
    // the connection (0); nothing is ever a 5xx.
    assert!(statuses.iter().all(|s| [0, 200, 429].contains(s)), "{:?}", tally(statuses));
    let r = s.get("/v1/models", tenant);
    assert_eq!(r.status, 200);
    assert!(r.header("x-ratelimit-limit").is_some(), "decided again after the restart");
    assert_eq!(s.admitted(tenant), 1 + 1 + 1, "each request reached the upstream once");

    // A new stream after the restart is reserved and reconciled as usual.
    let mut c = TcpStream::connect(s.envoy.listener_addr()).unwrap();
    c.write_all(stream_request(tenant, 5).as_bytes()).unwrap();
    let mut all = String::new();
    c.read_to_string(&mut all).unwrap();
    assert!(all.contains("[DONE]"), "{all}");
    wait_settled(&s, 2);
    assert_eq!(tokens_month(&s, tenant) - reserved, settled, "the same real usage as the first stream");
    assert_eq!(settled_reports(&s), 2, "the cut stream never reported");
    assert_every_key_expires(&s.redis);
}
