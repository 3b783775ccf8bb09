//! Batched callouts against a scripted fake quota
//! endpoint (plain HTTP/1.1): malformed, wrong-count, huge, slow, reset
//! batch answers, and an echo mode that proves each answer reaches its own
//! request. Every check is batched (`in_flight: 0`).

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::http;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Each check answered allowed, limit = 1000 + the number in its tenant `t<k>`.
    Echo,
    /// Like Echo, but odd `k` denied.
    EchoDenyOdd,
    Fewer,
    More,
    NonJson,
    Huge,
    NoAnswer,
    Err500Json,
    Err500Plain,
    Slow,
    ResetMid,
    /// 200 with an empty body.
    Empty,
    /// `{"results": null}`
    NullResults,
    /// Each result an error (400 invalid_request) for odd k, echo for even k.
    MixedErrors,
    /// A valid answer padded with whitespace to ~900 KB (under the 1 MiB cap).
    BigButValid,
    /// Closes the connection without answering.
    CloseNoAnswer,
}

struct Fake {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    batches: Arc<Mutex<Vec<usize>>>,
}

fn tenant_k(check: &Value) -> u64 {
    check["tenant"].as_str().and_then(|t| t.strip_prefix('t')).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn answer_for(k: u64, allowed: bool) -> Value {
    let limit = 1000 + k;
    json!({"allowed": allowed, "tier": "free", "binding": 0,
           "windows": [{"name": "hour", "window": "hour", "limit": limit, "used": if allowed { 1 } else { limit },
                        "remaining": if allowed { limit - 1 } else { 0 }, "reset": 1900000000u64, "reset_in": 60}],
           "retry_after": if allowed { Value::Null } else { json!(60) }})
}

fn respond(conn: &mut TcpStream, status: &str, body: &[u8]) -> bool {
    let head = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
    conn.write_all(head.as_bytes()).is_ok() && conn.write_all(body).is_ok()
}

fn fake() -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mode = Arc::new(Mutex::new(Mode::Echo));
    let batches = Arc::new(Mutex::new(Vec::new()));
    let (m2, b2) = (Arc::clone(&mode), Arc::clone(&batches));
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let (mode, batches) = (Arc::clone(&m2), Arc::clone(&b2));
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut first = String::new();
                    if reader.read_line(&mut first).unwrap_or(0) == 0 {
                        return;
                    }
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
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if first.starts_with("GET") {
                        if !respond(&mut conn, "200 OK", b"{}") {
                            return;
                        }
                        continue;
                    }
                    let m = *mode.lock().unwrap();
                    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let checks: Vec<Value> = if first.contains("/v1/check/batch") {
                        parsed["checks"].as_array().cloned().unwrap_or_default()
                    } else {
                        // A single check: answer it as echo always.
                        let k = tenant_k(&parsed);
                        let b = answer_for(k, true).to_string();
                        if !respond(&mut conn, "200 OK", b.as_bytes()) {
                            return;
                        }
                        continue;
                    };
                    batches.lock().unwrap().push(checks.len());
                    let echo = |deny_odd: bool, err_odd: bool| -> Vec<u8> {
                        let results: Vec<Value> = checks
                            .iter()
                            .map(|c| {
                                let k = tenant_k(c);
                                if err_odd && k % 2 == 1 {
                                    json!({"status": 400, "error": {"error": "invalid_request", "message": "nope"}})
                                } else {
                                    json!({"status": 200, "answer": answer_for(k, !(deny_odd && k % 2 == 1))})
                                }
                            })
                            .collect();
                        json!({"results": results}).to_string().into_bytes()
                    };
                    let ok = match m {
                        Mode::Echo => respond(&mut conn, "200 OK", &echo(false, false)),
                        Mode::EchoDenyOdd => respond(&mut conn, "200 OK", &echo(true, false)),
                        Mode::MixedErrors => respond(&mut conn, "200 OK", &echo(false, true)),
                        Mode::Fewer | Mode::More => {
                            let n = if m == Mode::Fewer { checks.len().saturating_sub(1) } else { checks.len() + 1 };
                            let results: Vec<Value> = (0..n).map(|i| json!({"status": 200, "answer": answer_for(i as u64, true)})).collect();
                            respond(&mut conn, "200 OK", json!({"results": results}).to_string().as_bytes())
                        }
                        Mode::NonJson => respond(&mut conn, "200 OK", b"hello, not json"),
                        Mode::Huge => {
                            let mut b = echo(false, false);
                            b.pop();
                            b.extend_from_slice(b",\"pad\":\"");
                            b.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
                            b.extend_from_slice(b"\"}");
                            respond(&mut conn, "200 OK", &b)
                        }
                        Mode::BigButValid => {
                            let mut b = echo(false, false);
                            b.pop();
                            b.extend(std::iter::repeat_n(b' ', 900 * 1024));
                            b.push(b'}');
                            respond(&mut conn, "200 OK", &b)
                        }
                        Mode::NoAnswer => {
                            let results: Vec<Value> = checks.iter().map(|_| json!({"status": 200})).collect();
                            respond(&mut conn, "200 OK", json!({"results": results}).to_string().as_bytes())
                        }
                        Mode::Err500Json => respond(&mut conn, "500 Internal Server Error", br#"{"error":"internal","message":"boom"}"#),
                        Mode::Err500Plain => respond(&mut conn, "500 Internal Server Error", b"boom"),
                        Mode::Empty => respond(&mut conn, "200 OK", b""),
                        Mode::NullResults => respond(&mut conn, "200 OK", br#"{"results":null}"#),
                        Mode::Slow => {
                            std::thread::sleep(Duration::from_millis(1500));
                            respond(&mut conn, "200 OK", &echo(false, false))
                        }
                        Mode::ResetMid => {
                            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{\"results\":[");
                            let _ = conn.flush();
                            return;
                        }
                        Mode::CloseNoAnswer => return,
                    };
                    if !ok {
                        return;
                    }
                }
            });
        }
    });
    Fake { addr, mode, batches }
}

struct FakeStack {
    envoy: Envoy,
    upstream: DemoUpstream,
    fake: Fake,
}

fn fake_stack(timeout_ms: u64, max_checks: u64, workers: u32) -> FakeStack {
    let fake = fake();
    let upstream = DemoUpstream::start();
    let cfg = plugin_config(json!({"quota_cluster": "fake_quota", "timeout_ms": timeout_ms, "report_latency": false,
                                  "batching": {"in_flight": 0, "max_checks": max_checks}}));
    let mut opts = EnvoyOpts::new(cfg, fake.addr, upstream.addr());
    opts.concurrency = workers;
    opts.extra_clusters.push(json!({
        "name": "fake_quota", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "fake_quota", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": fake.addr.port()}}}}]}]}
    }));
    let envoy = Envoy::start(opts);
    FakeStack { envoy, upstream, fake }
}

const OPEN: &str = "/v1/models";
const CLOSED: &str = "/v1/llm/complete";

/// Fires `n` requests in parallel, alternating fail-open and fail-closed
/// routes, tenants t0..tn; returns (k, path, result, elapsed).
fn burst(addr: SocketAddr, n: usize, timeout: Duration) -> Vec<(u64, &'static str, Result<sluice_tests::Response, String>, Duration)> {
    let out = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for k in 0..n as u64 {
            let out = Arc::clone(&out);
            s.spawn(move || {
                let path = if k % 2 == 0 { OPEN } else { CLOSED };
                let tenant = format!("t{k}");
                let t = Instant::now();
                let r = http::request(addr, "GET", path, &[("x-tenant-id", &tenant)], None, timeout).map_err(|e| e.to_string());
                out.lock().unwrap().push((k, path, r, t.elapsed()));
            });
        }
    });
    Arc::try_unwrap(out).unwrap().into_inner().unwrap()
}

fn assert_no_vm_failure(envoy: &Envoy) {
    let log = envoy.log();
    for bad in ["panicked", "Wasm VM failed", "wasm vm failed", "Function: proxy_on", "failed to execute"] {
        assert!(!log.contains(bad), "Envoy log has {bad:?}:\n{}", &log[log.len().saturating_sub(20000)..]);
    }
}

/// Each failing mode: fail-open gets 200 with no invented headers, fail-closed
/// gets the documented 503, every request answered within the bound, and the
/// VM lives on (echo afterwards works).
#[test]
fn malformed_batch_answers_take_each_routes_failure_mode() {
    let s = fake_stack(400, 8, 1);
    let mut problems = Vec::new();
    for mode in [
        Mode::Fewer,
        Mode::More,
        Mode::NonJson,
        Mode::Huge,
        Mode::NoAnswer,
        Mode::Err500Json,
        Mode::Err500Plain,
        Mode::Empty,
        Mode::NullResults,
        Mode::Slow,
        Mode::ResetMid,
        Mode::CloseNoAnswer,
    ] {
        *s.fake.mode.lock().unwrap() = mode;
        let before = admitted(&s.upstream, "t0");
        let results = burst(s.envoy.listener_addr(), 24, Duration::from_secs(10));
        for (k, path, r, took) in &results {
            match r {
                Err(e) => problems.push(format!("{mode:?} t{k} {path}: client error {e} after {took:?}")),
                Ok(r) => {
                    let want = if *path == OPEN { 200 } else { 503 };
                    if r.status != want {
                        problems.push(format!("{mode:?} t{k} {path}: status {} (want {want}) {}", r.status, r.text()));
                    }
                    if *path == OPEN && r.header("x-ratelimit-limit").is_some() {
                        problems.push(format!("{mode:?} t{k}: fail-open invented x-ratelimit-limit"));
                    }
                    if *path == CLOSED && r.status == 503 && r.json()["error"] != "quota_service_unavailable" {
                        problems.push(format!("{mode:?} t{k}: 503 body {}", r.text()));
                    }
                    if *took > Duration::from_secs(3) {
                        problems.push(format!("{mode:?} t{k}: took {took:?}"));
                    }
                }
            }
        }
        let _ = before;
        // The VM still decides.
        *s.fake.mode.lock().unwrap() = Mode::Echo;
        let r = s.envoy.request("GET", OPEN, &[("x-tenant-id", "t7")], None);
        if r.status != 200 || r.header("x-ratelimit-limit") != Some("1007") {
            problems.push(format!("after {mode:?}: echo gave {} {:?}", r.status, r.header("x-ratelimit-limit")));
        }
    }
    assert_no_vm_failure(&s.envoy);
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

/// Every request gets the answer of its own check, in batches of many.
#[test]
fn each_request_gets_its_own_answer_from_the_batch() {
    let s = fake_stack(2000, 16, 2);
    let mut problems = Vec::new();
    for mode in [Mode::Echo, Mode::EchoDenyOdd, Mode::MixedErrors, Mode::BigButValid] {
        *s.fake.mode.lock().unwrap() = mode;
        let results = burst(s.envoy.listener_addr(), 64, Duration::from_secs(10));
        for (k, path, r, _) in &results {
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("{mode:?} t{k}: {e}"));
                    continue;
                }
            };
            let odd = k % 2 == 1;
            let (want, want_limit) = match mode {
                Mode::EchoDenyOdd if odd => (429, Some(1000 + k)),
                // Odd k is the fail-closed route.
                Mode::MixedErrors if odd => (503, None),
                _ => (200, Some(1000 + k)),
            };
            let got_limit = r.header("x-ratelimit-limit").and_then(|v| v.parse::<u64>().ok());
            if r.status != want || got_limit != want_limit {
                problems.push(format!("{mode:?} t{k} {path}: {} limit {got_limit:?}, want {want} {want_limit:?}", r.status));
            }
        }
    }
    let sizes = s.fake.batches.lock().unwrap().clone();
    assert!(sizes.iter().any(|n| *n > 1), "no batch held more than one check: {sizes:?}");
    assert!(sizes.iter().all(|n| *n <= 16), "a batch over max_checks: {sizes:?}");
    assert_no_vm_failure(&s.envoy);
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

/// Clients that give up while their batch is in flight (slow fake): nothing
/// hangs, the VM lives, later requests are decided.
#[test]
fn clients_gone_while_their_batch_is_in_flight_leave_the_vm_working() {
    let s = fake_stack(3000, 8, 2);
    *s.fake.mode.lock().unwrap() = Mode::Slow;
    std::thread::scope(|sc| {
        for k in 0..40u64 {
            let addr = s.envoy.listener_addr();
            sc.spawn(move || {
                let tenant = format!("t{k}");
                let _ = http::request(addr, "GET", OPEN, &[("x-tenant-id", &tenant)], None, Duration::from_millis(200 + 20 * k));
            });
        }
    });
    // Let the slow answers land on the gone requests.
    std::thread::sleep(Duration::from_millis(2000));
    *s.fake.mode.lock().unwrap() = Mode::Echo;
    let results = burst(s.envoy.listener_addr(), 20, Duration::from_secs(10));
    let mut problems = Vec::new();
    for (k, path, r, _) in &results {
        match r {
            Ok(r) if r.status == 200 && r.header("x-ratelimit-limit") == Some(&(1000 + k).to_string()) => {}
            Ok(r) => problems.push(format!("t{k} {path}: {} {:?}", r.status, r.header("x-ratelimit-limit"))),
            Err(e) => problems.push(format!("t{k} {path}: {e}")),
        }
    }
    assert_no_vm_failure(&s.envoy);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// `sluice_callout_errors` counts checks the quota service could not
/// decide: a failed batch callout counts each check it carried, so the
/// counter always equals `failed_open + failed_closed`.
#[test]
fn callout_errors_count_each_check_a_failed_batch_carried() {
    let s = fake_stack(400, 8, 1);
    *s.fake.mode.lock().unwrap() = Mode::Err500Json;
    let results = burst(s.envoy.listener_addr(), 24, Duration::from_secs(10));
    assert!(results.iter().all(|(_, _, r, _)| r.is_ok()));
    let callouts = s.fake.batches.lock().unwrap().len() as u64;
    let errors = s.envoy.filter_counter("sluice.callout_errors");
    assert!(callouts < 24, "checks were batched: {callouts} callouts");
    assert_eq!(errors, 24, "{errors} callout errors for 24 checks in {callouts} failed batch callouts");
    let failed = s.envoy.filter_counter("sluice.failed_open") + s.envoy.filter_counter("sluice.failed_closed");
    assert_eq!(errors, failed);
}
