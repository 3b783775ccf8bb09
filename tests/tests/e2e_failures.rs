//! Failure modes end to end: the quota service or Redis gone, slow, or
//! misconfigured, on fail-open and fail-closed routes (cases H11-H13), and
//! invalid plugin config refused at configure time.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::envoy::render_config;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, Response, Service, ServiceOpts};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shipped config has the default policy fail-open and `/v1/llm/` fail-closed.
const OPEN_PATH: &str = "/v1/models";
const CLOSED_PATH: &str = "/v1/llm/complete";

fn timed(envoy: &Envoy, path: &str, tenant: &str) -> (Response, Duration) {
    let t = Instant::now();
    let r = envoy.request("GET", path, &[("x-tenant-id", tenant)], None);
    (r, t.elapsed())
}

/// Checks both failure modes once the quota backend is broken, with a bound
/// on how long the filter may wait (the callout timeout plus a margin that a
/// loaded 2-core CI machine needs).
/// `reasons`: the `reason` values the fail-closed body may carry.
fn assert_failure_modes(s: &Stack, tenant: &str, bound: Duration, what: &str, reasons: &[&str]) {
    let open_before = s.envoy.filter_counter("sluice.failed_open");
    let closed_before = s.envoy.filter_counter("sluice.failed_closed");
    let upstream_before = s.admitted(tenant);

    let (r, took) = timed(&s.envoy, OPEN_PATH, tenant);
    assert_eq!(r.status, 200, "{what}: fail-open forwards: {}", r.text());
    assert!(took < bound, "{what}: fail-open took {took:?}");
    for h in ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit", "ratelimit-policy", "retry-after"] {
        assert!(r.header(h).is_none(), "{what}: fail-open must not invent {h}");
    }
    assert_eq!(s.admitted(tenant), upstream_before + 1, "{what}: the upstream got it");
    assert_eq!(s.envoy.filter_counter("sluice.failed_open"), open_before + 1, "{what}: counted");

    let (r, took) = timed(&s.envoy, CLOSED_PATH, tenant);
    assert_eq!(r.status, 503, "{what}: fail-closed: {}", r.text());
    assert!(took < bound, "{what}: fail-closed took {took:?}");
    assert_eq!(r.json()["error"], "quota_service_unavailable");
    let reason = r.json()["reason"].as_str().unwrap_or_default().to_string();
    assert!(reasons.contains(&reason.as_str()), "{what}: reason {reason:?}, expected one of {reasons:?}");
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=5).contains(&retry), "{what}: a short Retry-After, got {retry}");
    assert_eq!(s.admitted(tenant), upstream_before + 1, "{what}: fail-closed sends nothing upstream");
    assert_eq!(s.envoy.filter_counter("sluice.failed_closed"), closed_before + 1);
}

#[test]
fn h11_redis_stopped_fails_open_and_closed_per_route_and_recovers() {
    let mut s = Stack::start();
    assert_eq!(s.get(OPEN_PATH, "h11").status, 200);
    s.redis.stop();
    assert_failure_modes(&s, "h11", Duration::from_secs(3), "redis stopped", &["non_200_status", "no_response_or_timeout"]);
    s.redis.restart();
    let mut ok = false;
    for _ in 0..50 {
        let r = s.get(CLOSED_PATH, "h11");
        if r.status == 200 {
            assert!(r.header("x-ratelimit-limit").is_some());
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "decisions resume after Redis comes back, without manual steps");
}

#[test]
fn h11_redis_black_holed_fails_within_the_timeout() {
    let s = Stack::start();
    assert_eq!(s.get(OPEN_PATH, "h11b").status, 200);
    s.redis.pause();
    // The service gives Redis 250 ms, longer than the filter's 100 ms timeout.
    assert_failure_modes(&s, "h11b", Duration::from_secs(2), "redis black-holed", &["no_response_or_timeout"]);
    s.redis.resume();
}

#[test]
fn h11_quota_service_stopped_fails_open_and_closed_per_route() {
    let mut s = Stack::start();
    assert_eq!(s.get(OPEN_PATH, "h11c").status, 200);
    s.service.process().stop();
    // Envoy's own 503 local reply (connection refused) is not an answer of the service.
    assert_failure_modes(&s, "h11c", Duration::from_secs(2), "service stopped", &["no_response_or_timeout"]);
}

/// Accepts connections and reads forever without answering: a quota
/// service slower than any timeout.
fn black_hole() -> (SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&held);
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            h.lock().unwrap().push(c);
        }
    });
    (addr, held)
}

#[test]
fn h11_a_quota_service_slower_than_the_200ms_timeout_takes_the_failure_mode_in_time() {
    let (slow, _held) = black_hole();
    let redis = Redis::start();
    let service = Service::start(&redis.url(), ServiceOpts::default());
    let upstream = DemoUpstream::start();
    let mut cfg = plugin_config(json!({"timeout_ms": 200}));
    cfg["policies"][0]["failure_mode"] = json!("closed");
    let envoy = Envoy::start(EnvoyOpts::new(cfg, slow, upstream.addr()));
    let s = Stack { envoy, upstream, service, redis };
    assert_failure_modes(&s, "slow", Duration::from_millis(1500), "service slower than the timeout", &["no_response_or_timeout"]);
    let (_, took) = timed(&s.envoy, OPEN_PATH, "slow");
    assert!(took >= Duration::from_millis(150), "the filter did wait for the callout ({took:?})");
}

/// A quota endpoint that answers the headers of a 200 and then cuts the
/// connection in the middle of the body: Envoy reports the callout as
/// failed by a reset, with no response headers at all.
fn cutting_quota() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in l.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"allowed\"");
            let _ = conn.flush();
            // Dropping the connection resets the callout mid-body.
        }
    });
    addr
}

#[test]
fn h11_a_callout_reset_mid_answer_takes_the_failure_mode_and_never_kills_the_vm() {
    let cut = cutting_quota();
    let redis = Redis::start();
    let service = Service::start(&redis.url(), ServiceOpts::default());
    let upstream = DemoUpstream::start();
    let cfg = plugin_config(json!({"quota_cluster": "cut_quota", "timeout_ms": 2000}));
    let mut opts = EnvoyOpts::new(cfg, service.addr(), upstream.addr());
    opts.extra_clusters.push(json!({
        "name": "cut_quota", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "cut_quota", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": cut.port()}}}}]}]}
    }));
    let envoy = Envoy::start(opts);
    let s = Stack { envoy, upstream, service, redis };
    for i in 0..3 {
        assert_failure_modes(&s, "cut", Duration::from_secs(3), &format!("callout reset #{i}"), &["no_response_or_timeout", "malformed_answer"]);
    }
    let log = s.envoy.log();
    assert!(!log.contains("panicked") && !log.contains("Wasm VM failed"), "{log}");
}

/// A plain HTTP/1.1 quota endpoint that records each callout's head and
/// answers with a fixed admit decision.
fn capturing_quota() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let seen = Arc::clone(&seen2);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut head = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    head.push_str(&String::from_utf8_lossy(&body));
                    seen.lock().unwrap().push(head);
                    let answer = r#"{"allowed":true,"tier":"free","windows":[{"name":"hour","window":"hour","limit":9,"used":1,"remaining":8,"reset":1900000000,"reset_in":60}],"binding":0}"#;
                    let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}", answer.len());
                    if conn.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[test]
fn h12_every_callout_carries_method_path_authority_and_content_type() {
    let (capture, seen) = capturing_quota();
    let redis = Redis::start();
    let service = Service::start(&redis.url(), ServiceOpts::default());
    let upstream = DemoUpstream::start();
    let cfg = plugin_config(json!({"quota_cluster": "capture_quota", "quota_authority": "quota.example"}));
    let mut opts = EnvoyOpts::new(cfg, service.addr(), upstream.addr());
    opts.extra_clusters.push(json!({
        "name": "capture_quota", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "capture_quota", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": capture.port()}}}}]}]}
    }));
    let envoy = Envoy::start(opts);
    let r = envoy.request("GET", "/v1/models", &[("x-tenant-id", "h12")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit"), Some("9"), "the captured decision was applied");
    let seen = seen.lock().unwrap();
    let call = seen.iter().find(|h| h.starts_with("POST")).unwrap_or_else(|| panic!("no POST callout in {seen:?}"));
    let lower = call.to_ascii_lowercase();
    assert!(call.starts_with("POST /v1/check HTTP/1.1\r\n"), "{call}");
    assert!(lower.contains("\r\nhost: quota.example\r\n"), "{call}");
    assert!(lower.contains("\r\ncontent-type: application/json\r\n"), "{call}");
    let body: Value = serde_json::from_str(&call[call.find('{').unwrap()..]).unwrap();
    assert_eq!(body["tenant"], "h12");
    assert_eq!(body["cost"], 1);
}

#[test]
fn h12_h13_a_missing_quota_cluster_applies_the_failure_mode_at_once_and_is_logged_at_configure() {
    let redis = Redis::start();
    let service = Service::start(&redis.url(), ServiceOpts::default());
    let upstream = DemoUpstream::start();
    let cfg = plugin_config(json!({"quota_cluster": "no_such_cluster"}));
    let envoy = Envoy::start(EnvoyOpts::new(cfg, service.addr(), upstream.addr()));
    let s = Stack { envoy, upstream, service, redis };
    assert!(
        s.envoy.log().contains("quota_cluster \"no_such_cluster\" is not a cluster this Envoy knows"),
        "configure-time log line missing:\n{}",
        s.envoy.log()
    );
    for _ in 0..20 {
        let (r, took) = timed(&s.envoy, CLOSED_PATH, "h13");
        assert_eq!(r.status, 503, "fail-closed route with no quota cluster: {}", r.text());
        assert_eq!(r.json()["reason"], "dispatch_failed");
        assert!(took < Duration::from_secs(2), "never left paused ({took:?})");
    }
    assert_eq!(s.get(OPEN_PATH, "h13").status, 200, "a fail-open route forwards");
    assert_eq!(s.admitted("h13"), 1);
}

fn validate(plugin_config: Value) -> (bool, String) {
    let redis_addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let opts = EnvoyOpts::new(plugin_config, redis_addr, redis_addr);
    let config = render_config(&opts, sluice_tests::free_port(), sluice_tests::free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.json");
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let out = std::process::Command::new(sluice_tests::paths::envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn invalid_plugin_config_fails_on_configure_with_a_log_line_naming_the_field() {
    let (ok, out) = validate(plugin_config(json!({})));
    assert!(ok, "the shipped plugin config is valid:\n{out}");
    let cases = [
        (json!({"timeout_ms": -5}), "timeout_ms: must not be negative"),
        (json!({"timeout_ms": 0}), "timeout_ms: must be greater than 0"),
        (json!({"bogus": 1}), "bogus: unknown field"),
        (json!({"quota_cluster": ""}), "quota_cluster: must not be empty"),
        (json!({"policies": [{"name": "x", "cost": 0}]}), "policies[0].cost: must be greater than 0"),
        (json!({"failure_mode": "sometimes"}), "failure_mode: must be"),
    ];
    for (change, expect) in cases {
        let (ok, out) = validate(plugin_config(change.clone()));
        assert!(!ok, "{change} must be refused");
        assert!(out.contains(&format!("invalid sluice config: {expect}")), "{change}: expected {expect:?} in:\n{out}");
    }
    let mut missing = plugin_config(json!({}));
    missing.as_object_mut().unwrap().remove("quota_cluster");
    let (ok, out) = validate(missing);
    assert!(!ok);
    assert!(out.contains("invalid sluice config: quota_cluster: is required"), "{out}");
}
