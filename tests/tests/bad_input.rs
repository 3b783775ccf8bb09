//! Bad input through real Envoy: tenant headers at Envoy's size limit, with
//! control characters, invalid UTF-8 or hash-tag characters; request bodies
//! that are huge, truncated, not JSON, deeply nested or wrongly typed; and
//! callout answers (from a scripted quota endpoint) that are huge, empty,
//! invalid UTF-8 or wrongly typed. Each gets a clear 4xx or the route's
//! failure mode: never a 500, never a dead VM, never an unlimited tenant.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::{http, DemoUpstream, Envoy, EnvoyOpts, Redis, Service, ServiceOpts};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OPEN_PATH: &str = "/v1/models";
const CLOSED_PATH: &str = "/v1/llm/complete";

/// The VM never died and nothing panicked.
fn assert_vm_alive(envoy: &Envoy) {
    let log = envoy.log();
    for bad in ["panicked", "Wasm VM failed", "wasm log: panic", "Function: proxy_on_"] {
        assert!(!log.contains(bad), "Envoy logged {bad:?}:\n{log}");
    }
}

fn token_config() -> Value {
    let mut c = plugin_config(json!({"timeout_ms": 2000}));
    for p in c["policies"].as_array_mut().unwrap() {
        if p["name"] == "chat" {
            p["cost"] = json!(1);
            p["cost_rules"] = json!({"charge_units": true, "reserve_tokens": true, "max_body_bytes": 65536});
        }
    }
    c
}

fn post(envoy: &Envoy, path: &str, tenant: &str, body: &[u8]) -> sluice_tests::Response {
    envoy.request("POST", path, &[("x-tenant-id", tenant), ("content-type", "application/json")], Some(body))
}

/// Sends raw bytes as one HTTP/1.1 request and returns the status line's code
/// (0: the connection was closed without an answer).
fn raw_status(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Written from another thread: Envoy may answer (and close) before all
    // of a large request is written, and the answer must still be read.
    let mut w = s.try_clone().unwrap();
    let raw = raw.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&raw);
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text)
}

#[test]
fn tenant_headers_at_the_size_limit_with_control_chars_invalid_utf8_or_hash_tags_are_rejected_and_never_counted() {
    let s = Stack::with(token_config(), 1);
    let addr = s.envoy.listener_addr();
    let before = s.callouts();

    // 59 KiB: under Envoy's 60 KiB header limit, so the filter sees it.
    let long = "a".repeat(59 * 1024);
    let r = s.get(OPEN_PATH, &long);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid_tenant");
    // Over the limit: Envoy's own 431 before any filter.
    let huge = "a".repeat(70 * 1024);
    let r = http::request(addr, "GET", OPEN_PATH, &[("x-tenant-id", &huge)], None, Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 431, "{}", r.text());

    for id in ["{t:acme}", "acme}", "{acme", "a b", "a,b", "t%41", "tenant\u{e9}", "../../etc"] {
        let r = s.get(OPEN_PATH, id);
        assert_eq!(r.status, 400, "{id:?}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_tenant", "{id:?}");
    }
    // Raw bytes the client library would refuse to send.
    for (what, value) in [("invalid UTF-8", &b"t\xff\xfe"[..]), ("latin-1", b"caf\xe9"), ("NUL", b"a\x00b"), ("SOH", b"a\x01b"), ("DEL", b"a\x7fb")] {
        let mut req = format!("GET {OPEN_PATH} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-tenant-id: ").into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        let (code, text) = raw_status(addr, &req);
        assert_eq!(code, 400, "{what}: {text}");
    }
    // A bare CR inside a value is dropped by Envoy's HTTP/1 codec before any
    // filter runs: the filter sees "ab", the same id the client could send.
    let (code, text) = raw_status(addr, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-tenant-id: a\rb\r\n\r\n");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(r#""tenant":"ab""#), "{text}");
    assert_eq!(s.callouts(), before + 1, "no other bad tenant id reached the quota service");
    assert_eq!(s.upstream.stats()["total"].as_u64(), Some(1), "nothing else was forwarded");
    // Still serving.
    assert_eq!(s.get(OPEN_PATH, "ok-after").status, 200);
    assert_vm_alive(&s.envoy);
}

#[test]
fn bodies_that_are_huge_truncated_not_json_deeply_nested_or_wrongly_typed_get_a_clear_answer_and_the_vm_survives() {
    let s = Stack::with(token_config(), 1);
    // On the chat route (its cost rules apply) but answered by the demo's
    // echo, which takes any body: what is tested is the filter's price.
    let chat = "/v1/chat/echo";
    let remaining = |r: &sluice_tests::Response| header_u64(r, "x-ratelimit-remaining");

    // A body too big for the buffer filter (1 MiB): Envoy's 413, nothing forwarded.
    // (Envoy may answer before the client has written it all, so written raw.)
    let mut raw = format!("POST {chat} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-tenant-id: big\r\ncontent-length: {}\r\n\r\n", 2 * 1024 * 1024).into_bytes();
    raw.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    let (code, text) = raw_status(s.envoy.listener_addr(), &raw);
    assert_eq!(code, 413, "{text}");
    assert_eq!(s.admitted("big"), 0);

    // Bigger than max_body_bytes (64 KiB) but within the buffer: priced
    // with the fallback (10 units), forwarded.
    let mut body = br#"{"model":"gpt-4","messages":[{"role":"user","content":""#.to_vec();
    body.extend(std::iter::repeat_n(b'a', 100 * 1024));
    body.extend_from_slice(br#""}]}"#);
    let r = post(&s.envoy, chat, "large", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(remaining(&r), 90, "the fallback price");

    // Not JSON, and JSON that is not an object: the fallback price.
    for (i, b) in [&b"not json at all"[..], b"[1,2,3]", b"\"a string\"", b"{\"model\":", b"\xff\xfe\x00"].iter().enumerate() {
        let t = format!("notjson-{i}");
        let r = post(&s.envoy, chat, &t, b);
        assert_eq!(r.status, 200, "{:?}: {}", String::from_utf8_lossy(b), r.text());
        assert_eq!(remaining(&r), 90, "{:?}: the fallback price", String::from_utf8_lossy(b));
    }

    // Nested past serde_json's recursion limit (128): not parsed, so the
    // fallback; and the VM's stack survives 100,000 levels.
    for depth in [200usize, 100_000] {
        let mut b = br#"{"model":"gpt-4","messages":"#.to_vec();
        b.extend(std::iter::repeat_n(b'[', depth));
        b.extend(std::iter::repeat_n(b']', depth));
        b.push(b'}');
        let t = format!("deep-{depth}");
        let r = post(&s.envoy, chat, &t, &b);
        assert_eq!(r.status, 200, "depth {depth}: {}", r.text());
        assert_eq!(remaining(&r), 90, "depth {depth}: the fallback price");
    }
    // Nested within the limit, with the wrong types inside: still priced
    // from what is readable (the content parts that are text).
    let mut b = br#"{"model":"gpt-3.5-turbo","max_tokens":1,"messages":[{"content":"#.to_vec();
    b.extend(std::iter::repeat_n(b'[', 100));
    b.extend(std::iter::repeat_n(b']', 100));
    b.extend_from_slice(b"}]}");
    let r = post(&s.envoy, chat, "nested-ok", &b);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(remaining(&r), 99, "a one-unit request");

    // Wrong types and absurd numbers: 400 naming the field, no callout.
    let before = s.callouts();
    for (body, field) in [
        (json!({"max_tokens": "lots"}), "max_tokens"),
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"max_tokens": 1e308}), "max_tokens"),
        (json!({"max_tokens": 18446744073709551615u64}), "max_tokens"),
        (json!({"max_completion_tokens": 0.5}), "max_completion_tokens"),
        (json!({"n": 0}), "n"),
        (json!({"n": 1_000_000}), "n"),
        (json!({"model": ["gpt-4"]}), "model"),
        (json!({"stream": "yes"}), "stream"),
        (json!({"messages": {"content": "x"}}), "messages"),
    ] {
        let r = post(&s.envoy, chat, "typed", serde_json::to_vec(&body).unwrap().as_slice());
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_request", "{body}");
        assert_eq!(r.json()["field"], field, "{body}");
    }
    // 2^64 and NaN-ish written out as JSON text (not representable by json!).
    let mut fallbacks = 0;
    for raw in [&br#"{"max_tokens":18446744073709551616}"#[..], br#"{"max_tokens":NaN}"#, br#"{"max_tokens":"NaN"}"#, br#"{"n":-0}"#] {
        let r = post(&s.envoy, chat, "typed-raw", raw);
        let text = String::from_utf8_lossy(raw);
        match r.status {
            400 => assert_eq!(r.json()["error"], "invalid_request", "{text}"),
            // NaN is not JSON at all: the fallback price, as any non-JSON body.
            200 => {
                fallbacks += 1;
                assert!(text.contains("NaN") && !text.contains(r#""NaN""#), "{text}: only a bare NaN is not JSON");
                assert_eq!(remaining(&r), 90, "{text}: a body that is not JSON gets the fallback");
            }
            s => panic!("{text}: unexpected {s}"),
        }
    }
    assert_eq!(s.callouts(), before + fallbacks, "bad client numbers never reach the quota service");
    assert_eq!(s.admitted("typed"), 0);
    assert_eq!(s.admitted("typed-raw"), fallbacks);

    // Truncated: the client promises 5000 bytes, sends 100 and hangs up.
    let mut t = TcpStream::connect(s.envoy.listener_addr()).unwrap();
    let head = format!("POST {chat} HTTP/1.1\r\nhost: x\r\nx-tenant-id: trunc\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n");
    t.write_all(head.as_bytes()).unwrap();
    t.write_all(&[b' '; 100]).unwrap();
    drop(t);
    // And one that sends half a body and waits: the request times out at
    // Envoy (or the test gives up), nothing is forwarded.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.admitted("trunc"), 0, "a truncated body is never forwarded");
    let after = s.get(OPEN_PATH, "after-bad-bodies");
    assert_eq!(after.status, 200, "still serving");
    assert_vm_alive(&s.envoy);
}

/// A quota endpoint (HTTP/1.1) that answers every callout with `answer`,
/// raw bytes after the status line and headers it is given.
fn scripted_quota(answer: Arc<Mutex<Vec<u8>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let answer = Arc::clone(&answer);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
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
                    let bytes = answer.lock().unwrap().clone();
                    if conn.write_all(&bytes).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn response(status: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn callout_answers_that_are_huge_empty_invalid_utf8_or_wrongly_typed_take_the_failure_mode() {
    let good = br#"{"allowed":true,"tier":"free","windows":[{"name":"hour","window":"hour","limit":9,"used":1,"remaining":8,"reset":1900000000,"reset_in":60}],"binding":0}"#;
    let answer = Arc::new(Mutex::new(response("200 OK", good)));
    let quota = scripted_quota(Arc::clone(&answer));
    let redis = Redis::start();
    let service = Service::start(&redis.url(), ServiceOpts::default());
    let upstream = DemoUpstream::start();
    let mut opts = EnvoyOpts::new(plugin_config(json!({"quota_cluster": "scripted", "timeout_ms": 2000})), service.addr(), upstream.addr());
    opts.extra_clusters.push(json!({
        "name": "scripted", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "scripted", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": quota.port()}}}}]}]}
    }));
    let envoy = Envoy::start(opts);
    let r = envoy.request("GET", OPEN_PATH, &[("x-tenant-id", "scripted")], None);
    assert_eq!(r.header("x-ratelimit-limit"), Some("9"), "the scripted answer is used: {:?}", r.headers);

    let mut huge = br#"{"allowed":true,"tier":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    huge.extend_from_slice(br#"","windows":[{"name":"hour","window":"hour","limit":9,"used":1,"remaining":8,"reset":1,"reset_in":1}],"binding":0}"#);
    let mut deep = br#"{"allowed":true,"windows":"#.to_vec();
    deep.extend(std::iter::repeat_n(b'[', 20_000));
    deep.extend(std::iter::repeat_n(b']', 20_000));
    deep.push(b'}');
    let u64max = u64::MAX;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("huge", response("200 OK", &huge)),
        ("empty", response("200 OK", b"")),
        ("invalid UTF-8", response("200 OK", b"{\"allowed\":true,\"tier\":\"\xff\xfe\",\"windows\":[],\"binding\":0}")),
        ("not JSON", response("200 OK", b"<html>oops</html>")),
        ("deeply nested", response("200 OK", &deep)),
        ("allowed is a string", response("200 OK", br#"{"allowed":"yes","windows":[{"name":"hour","window":"hour","limit":9,"used":1,"remaining":8,"reset":1,"reset_in":1}],"binding":0}"#)),
        ("no windows", response("200 OK", br#"{"allowed":true,"tier":"free","windows":[],"binding":0}"#)),
        ("binding out of range", response("200 OK", br#"{"allowed":true,"windows":[{"name":"hour","window":"hour","limit":9,"used":1,"remaining":8,"reset":1,"reset_in":1}],"binding":7}"#)),
        ("negative numbers", response("200 OK", br#"{"allowed":true,"windows":[{"name":"hour","window":"hour","limit":-9,"used":1,"remaining":-8,"reset":1,"reset_in":1}],"binding":0}"#)),
        ("remaining above limit", response("200 OK", format!(r#"{{"allowed":true,"windows":[{{"name":"hour","window":"hour","limit":1,"used":0,"remaining":{u64max},"reset":1,"reset_in":1}}],"binding":0}}"#).as_bytes())),
        ("header injection in a window name", response("200 OK", br#"{"allowed":true,"windows":[{"name":"h\r\nx-evil: 1","window":"hour","limit":9,"used":1,"remaining":8,"reset":1,"reset_in":1}],"binding":0}"#)),
        ("a 200 with a service error body", response("200 OK", br#"{"error":"oops","message":"x"}"#)),
        ("a 500 with a huge body", response("500 Internal Server Error", &huge)),
        ("a 302", response("302 Found", b"")),
    ];
    for (what, bytes) in cases {
        *answer.lock().unwrap() = bytes;
        let tenant = format!("bad-answer-{}", what.replace(' ', "-"));
        let before = admitted(&upstream, &tenant);
        let t = Instant::now();
        let r = envoy.request("GET", OPEN_PATH, &[("x-tenant-id", &tenant)], None);
        assert_eq!(r.status, 200, "{what}: fail-open forwards: {}", r.text());
        assert!(r.header("x-ratelimit-limit").is_none() && r.header("x-evil").is_none(), "{what}: no numbers from a bad answer: {:?}", r.headers);
        assert_eq!(admitted(&upstream, &tenant), before + 1, "{what}");
        let r = envoy.request("GET", CLOSED_PATH, &[("x-tenant-id", &tenant)], None);
        assert_eq!(r.status, 503, "{what}: fail-closed: {}", r.text());
        let reason = r.json()["reason"].as_str().unwrap_or_default().to_string();
        assert!(["malformed_answer", "non_200_status", "no_response_or_timeout"].contains(&reason.as_str()), "{what}: reason {reason}");
        assert_eq!(admitted(&upstream, &tenant), before + 1, "{what}: fail-closed forwards nothing");
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: took {:?}", t.elapsed());
    }
    // A good answer is used again: the VM is alive.
    *answer.lock().unwrap() = response("200 OK", good);
    let r = envoy.request("GET", OPEN_PATH, &[("x-tenant-id", "scripted")], None);
    assert_eq!(r.header("x-ratelimit-limit"), Some("9"));
    assert_vm_alive(&envoy);
    drop((service, redis));
}

/// The queue's endpoints answer bad input with a JSON 4xx naming what was
/// wrong: malformed, oversized and foreign status ids (all the same 404, so
/// existence is never revealed), wrong methods, missing or invalid tenants,
/// forged intake headers, and absurd `?tenants=` on the stats route.
#[test]
fn queue_endpoints_answer_malformed_ids_methods_tenants_and_queries_with_a_json_4xx() {
    let redis = Redis::start();
    let upstream = DemoUpstream::start();
    let gpu = json!({"url": format!("http://{}", upstream.addr()), "rate": 1, "burst": 1});
    let service = Service::start(
        &redis.url(),
        ServiceOpts { upstreams: Some(json!({"upstreams": {"gpu": gpu}})), queue: true, workers: Some(0), ..ServiceOpts::default() },
    );
    let mut eo = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), service.addr(), upstream.addr());
    eo.queue_addr = service.queue_addr();
    let envoy = Envoy::start(eo);
    let queue = service.queue_addr().unwrap();
    let call = |addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]| {
        let r = http::request(addr, method, path, headers, None, Duration::from_secs(10)).unwrap();
        let body = r.json();
        assert!(body["error"].is_string() && body["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: {}", r.text());
        assert!(r.status >= 400 && r.status < 500, "{method} {path}: {} {}", r.status, r.text());
        (r.status, body["error"].as_str().unwrap().to_string(), r.text())
    };
    let tenant = [("x-tenant-id", "reader")];

    let unknown = call(queue, "GET", &format!("/v1/queue/requests/{}", "0".repeat(32)), &tenant);
    assert_eq!((unknown.0, unknown.1.as_str()), (404, "not_found"));
    let long = "a".repeat(8000);
    let pct = "%30".repeat(32);
    for id in ["zz", &"0".repeat(31), &"0".repeat(33), &"g".repeat(32), &pct, "..%2F..%2Fv1%2Fadmin%2Ftiers", "%00", &long, ""] {
        for addr in [queue, envoy.listener_addr()] {
            let r = call(addr, "GET", &format!("/v1/queue/requests/{id}"), &tenant);
            assert_eq!(r.2, unknown.2, "{id:.40}: the same 404 as an unknown id");
        }
    }
    for method in ["POST", "PUT", "DELETE"] {
        let r = call(queue, method, &format!("/v1/queue/requests/{}", "0".repeat(32)), &tenant);
        assert_eq!((r.0, r.1.as_str()), (405, "method_not_allowed"), "{method}");
    }
    let id = format!("/v1/queue/requests/{}", "0".repeat(32));
    for addr in [queue, envoy.listener_addr()] {
        assert_eq!(call(addr, "GET", &id, &[]).1, "missing_tenant");
        assert_eq!(call(addr, "GET", &id, &[("x-tenant-id", " ")]).1, "missing_tenant");
        assert_eq!(call(addr, "GET", &id, &[("x-tenant-id", "a"), ("x-tenant-id", "b")]).1, "missing_tenant");
        for bad in ["a b", "{x}", "a/b", &"t".repeat(129)] {
            let r = call(addr, "GET", &id, &[("x-tenant-id", bad)]);
            assert_eq!((r.0, r.1.as_str()), (400, "invalid_tenant"), "{bad:.20}");
        }
    }
    assert_eq!(call(queue, "GET", "/nope", &tenant).1, "not_found");
    // Intake headers that did not come from the filter (around Envoy).
    for (upstream_name, ticket) in [("nope", "0123456789abcdef0123456789abcdef"), ("gpu", "short"), ("gpu", ""), ("gpu", &"0".repeat(32))] {
        let r = call(queue, "GET", "/v1/gpu/run", &[("x-tenant-id", "forger"), ("x-sluice-queue", upstream_name), ("x-sluice-ticket", ticket)]);
        assert_eq!((r.0, r.1.as_str()), (403, "invalid_ticket"), "{upstream_name} {ticket}");
    }
    for q in ["-1", "18446744073709551616", "1e3", "", "abc", "100000", "1.5"] {
        let r = call(service.addr(), "GET", &format!("/v1/queue/stats?tenants={q}"), &[]);
        assert_eq!((r.0, r.1.as_str()), (400, "invalid_request"), "tenants={q}: {}", r.2);
    }
    let stats = service.get("/v1/queue/stats").json();
    assert_eq!(stats["upstreams"]["gpu"]["depth"], 0, "nothing was queued: {stats}");
    assert_eq!(admitted(&upstream, "forger"), 0);
    assert_vm_alive(&envoy);
}

#[test]
fn with_unpriceable_reject_padded_or_unparseable_bodies_are_refused_not_priced_at_the_fallback() {
    let mut c = token_config();
    for p in c["policies"].as_array_mut().unwrap() {
        if p["name"] == "chat" {
            p["cost_rules"]["unpriceable"] = json!("reject");
        }
    }
    let s = Stack::with(c, 1);
    let chat = "/v1/chat/echo";
    let before = s.callouts();
    // An expensive request padded past max_body_bytes (64 KiB) to buy the
    // fallback price: 413, nothing checked, charged or forwarded.
    let mut padded = br#"{"model":"gpt-4","max_tokens":100000,"messages":[{"role":"user","content":"hi"}]"#.to_vec();
    padded.extend(std::iter::repeat_n(b' ', 70 * 1024));
    padded.push(b'}');
    let r = post(&s.envoy, chat, "padder", &padded);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!((r.json()["error"].clone(), r.json()["field"].clone()), (json!("payload_too_large"), json!("body")));
    // Valid JSON for a lenient upstream, but nested beyond what the filter
    // parses: 400 naming the body.
    let deep = format!(r#"{{"model":"gpt-4","max_tokens":100000,"x":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    let r = post(&s.envoy, chat, "padder", deep.as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["field"], "body");
    assert_eq!(s.callouts(), before, "nothing reached the quota service");
    assert_eq!(s.admitted("padder"), 0);
    // A body it can price still goes through.
    let r = post(&s.envoy, chat, "padder", br#"{"model":"gpt-3.5-turbo","max_tokens":10,"messages":[]}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_vm_alive(&s.envoy);
}
