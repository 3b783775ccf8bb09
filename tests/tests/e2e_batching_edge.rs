//! Batched callouts, edge cases: routes whose answer
//! Envoy produces synchronously while the root context resumes the request
//! (direct_response), HTTP/2 downstream streams reset together, a missing
//! quota cluster, trailers on body routes, and config validation.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::envoy::render_config;
use sluice_tests::{Envoy, EnvoyOpts};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn batched(in_flight: u64, max_checks: u64, extra: Value) -> Value {
    let mut c = plugin_config(json!({"timeout_ms": 2000, "batching": {"in_flight": in_flight, "max_checks": max_checks}}));
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn assert_no_vm_failure(envoy: &Envoy) {
    let log = envoy.log();
    for bad in ["panicked", "Wasm VM failed", "wasm vm failed", "Function: proxy_on", "failed to execute"] {
        assert!(!log.contains(bad), "Envoy log has {bad:?}:\n{}", &log[log.len().saturating_sub(20000)..]);
    }
}

/// The router answers a direct_response route synchronously inside the
/// continue the root context asked for: the admitted headers still land,
/// denials still get 429.
#[test]
fn direct_response_routes_resumed_from_a_batch_get_their_headers() {
    let s = Stack::with_opts(batched(0, 8, json!({})), 1, |o| {
        o.extra_routes.push(json!({
            "name": "direct", "match": {"prefix": "/direct/"},
            "direct_response": {"status": 200, "body": {"inline_string": "direct"}}
        }));
    });
    s.set_limits("dr", json!({"hour": 10}));
    let statuses_and_headers: Vec<(u16, Option<String>)> = {
        let addr = s.envoy.listener_addr();
        let out = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|sc| {
            for _ in 0..20 {
                sc.spawn(|| {
                    let r = sluice_tests::http::request(addr, "GET", "/direct/x", &[("x-tenant-id", "dr")], None, Duration::from_secs(10)).unwrap();
                    out.lock().unwrap().push((r.status, r.header("x-ratelimit-remaining").map(String::from)));
                });
            }
        });
        out.into_inner().unwrap()
    };
    let ok: Vec<_> = statuses_and_headers.iter().filter(|(s, _)| *s == 200).collect();
    assert_eq!(ok.len(), 10, "{statuses_and_headers:?}");
    assert!(ok.iter().all(|(_, h)| h.is_some()), "admitted direct responses lost their headers: {statuses_and_headers:?}");
    assert_eq!(statuses_and_headers.iter().filter(|(s, _)| *s == 429).count(), 10);
    assert_no_vm_failure(&s.envoy);
}

fn curl_h2(addr: SocketAddr, n: usize, tenant: &str) -> Command {
    curl_h2_path(addr, n, tenant, "/v1/models")
}

fn curl_h2_path(addr: SocketAddr, n: usize, tenant: &str, path: &str) -> Command {
    let mut c = Command::new("curl");
    c.args(["-s", "--http2-prior-knowledge", "--parallel", "--parallel-immediate", "--parallel-max", "100", "-w", "%{http_code} %{errormsg}\n", "-H"])
        .arg(format!("x-tenant-id: {tenant}"));
    for _ in 0..n {
        c.args(["-o", "/dev/null"]).arg(format!("http://{addr}{path}"));
    }
    c
}

/// Many HTTP/2 streams on one connection share batches; then a client with
/// 200 streams in flight is killed (every stream reset at once).
#[test]
fn http2_streams_batched_together_then_reset_at_once() {
    let s = Stack::with(batched(0, 16, json!({"report_latency": false})), 1);
    s.set_limits("h2", json!({"hour": 100}));
    // curl 7.88 fails every stream past its first 100 on one connection
    // ("Error in the HTTP2 framing layer", also on exempt paths): 3 x 100.
    let mut codes = String::new();
    let mut errs = String::new();
    for _ in 0..3 {
        let out = curl_h2(s.envoy.listener_addr(), 100, "h2").output().unwrap();
        codes.push_str(&String::from_utf8_lossy(&out.stdout));
        errs.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let codes: String = codes.lines().map(|l| format!("{}\n", l.trim_end())).collect();
    let failed: Vec<&str> = codes.lines().filter(|l| l.starts_with("000")).collect();
    // Exempt path over the same kind of connection: does curl fail there too?
    let exempt = String::from_utf8_lossy(&curl_h2_path(s.envoy.listener_addr(), 100, "h2x", "/healthz").output().unwrap().stdout).to_string();
    let exempt_failed = exempt.lines().filter(|l| l.starts_with("000")).count();
    assert!(failed.is_empty(), "{} curl transfers failed, e.g. {:?}; on the exempt path {exempt_failed} failed", failed.len(), failed.first());
    let n200 = codes.lines().filter(|l| *l == "200").count();
    let n429 = codes.lines().filter(|l| *l == "429").count();
    let n200 = codes.lines().filter(|l| l.starts_with("200")).count().max(n200);
    let n429 = codes.lines().filter(|l| l.starts_with("429")).count().max(n429);
    let mut t = std::collections::BTreeMap::new();
    for l in codes.lines() {
        *t.entry(l.to_string()).or_insert(0) += 1;
    }
    assert_eq!((n200, n429), (100, 200), "{t:?} stderr {errs}");
    assert_eq!(s.admitted("h2"), 100);

    s.set_limits("h2k", json!({"hour": 1000}));
    for round in 0..5 {
        let mut child = curl_h2(s.envoy.listener_addr(), 100, "h2k").stdout(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(5 + round * 7));
        let _ = child.kill();
        let _ = child.wait();
    }
    std::thread::sleep(Duration::from_millis(500));
    let r = s.get("/v1/models", "h2k");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-ratelimit-limit").is_some());
    assert!(s.admitted("h2k") <= 1000);
    assert_no_vm_failure(&s.envoy);
}

/// No such quota cluster: the batch dispatch fails in the tick and every
/// request takes its failure mode at once.
#[test]
fn a_missing_quota_cluster_fails_every_batched_check_at_once() {
    let s = Stack::with(batched(0, 8, json!({"quota_cluster": "no_such_cluster"})), 1);
    let addr = s.envoy.listener_addr();
    let t = Instant::now();
    let open = fire(&[addr], 20, 10, "GET", "/v1/models", &[("x-tenant-id", "mc")]);
    let closed = fire(&[addr], 20, 10, "GET", "/v1/llm/complete", &[("x-tenant-id", "mc")]);
    assert_eq!(count(&open, 200), 20, "{open:?}");
    assert_eq!(count(&closed, 503), 20, "{closed:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let r = s.get("/v1/llm/complete", "mc");
    assert_eq!(r.json()["reason"], "dispatch_failed");
    assert_no_vm_failure(&s.envoy);
}

/// A body route whose body ends with trailers: the check is made at the
/// trailers, batched, and the request resumed.
#[test]
fn body_route_with_trailers_is_batched_and_resumed() {
    let cfg = batched(0, 8, json!({"policies": [
        {"name": "chat", "route_name": "chat_route", "failure_mode": "closed",
         "cost_rules": {"charge_units": true, "reserve_tokens": true, "max_body_bytes": 4096}}
    ]}));
    let s = Stack::with(cfg, 1);
    let addr = s.envoy.listener_addr();
    let body = br#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut lines = Vec::new();
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(move || {
                    let mut c = TcpStream::connect(addr).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-tenant-id: tr\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n";
                    c.write_all(head.as_bytes()).unwrap();
                    c.write_all(format!("{:x}\r\n", body.len()).as_bytes()).unwrap();
                    c.write_all(body).unwrap();
                    c.write_all(b"\r\n0\r\nx-t: 1\r\n\r\n").unwrap();
                    let mut raw = Vec::new();
                    let _ = c.read_to_end(&mut raw);
                    String::from_utf8_lossy(&raw).lines().next().unwrap_or("<nothing>").to_string()
                })
            })
            .collect();
        for h in hs {
            lines.push(h.join().unwrap());
        }
    });
    assert!(lines.iter().all(|l| l.contains(" 200 ")), "{lines:?}");
    assert_eq!(s.admitted("tr"), 8);
    assert_no_vm_failure(&s.envoy);
}

fn validate(plugin_config: Value) -> (bool, String) {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let opts = EnvoyOpts::new(plugin_config, addr, addr);
    let config = render_config(&opts, sluice_tests::free_port(), sluice_tests::free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.json");
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let out = Command::new(sluice_tests::paths::envoy_bin()).args(["--mode", "validate", "-c"]).arg(&path).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn batching_config_boundaries() {
    for good in [json!(true), json!(false), json!(null), json!({}), json!({"in_flight": 0, "max_checks": 2}), json!({"in_flight": 10000, "max_checks": 128})] {
        let (ok, out) = validate(plugin_config(json!({"batching": good.clone()})));
        assert!(ok, "{good} must be accepted:\n{}", &out[out.len().saturating_sub(3000)..]);
    }
    for bad in [
        json!({"max_checks": 1}),
        json!({"max_checks": 0}),
        json!({"max_checks": 129}),
        json!({"in_flight": -1}),
        json!({"in_flight": 10001}),
        json!({"in_flight": 1.5}),
        json!({"max_checks": "8"}),
        json!({"bogus": 1}),
        json!("yes"),
        json!(8),
    ] {
        let (ok, out) = validate(plugin_config(json!({"batching": bad.clone()})));
        assert!(!ok, "{bad} must be refused");
        assert!(out.contains("invalid sluice config: batching"), "{bad}: {}", &out[out.len().saturating_sub(3000)..]);
    }
}
