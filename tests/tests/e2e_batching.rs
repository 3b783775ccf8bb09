//! Batched callouts (`batching` in the plugin config): past a few single
//! checks in flight, a worker's checks go to the service together in one
//! `POST /v1/check/batch`, and the root context resumes or answers each
//! request. Each check is still decided on its own by the atomic script, so
//! everything exact mode promises holds: counted at the upstream.

mod common;

use common::*;
use serde_json::json;
use sluice_tests::http;
use std::time::{Duration, Instant};

/// Every check batched (`in_flight: 0`): what is tested is the batch path.
fn batched(max_checks: u64) -> serde_json::Value {
    plugin_config(json!({"timeout_ms": 2000, "batching": {"in_flight": 0, "max_checks": max_checks}}))
}

fn quota_callouts(s: &Stack) -> u64 {
    s.envoy.stat("cluster.sluice_quota.upstream_rq_total")
}

#[test]
fn h01_batched_checks_over_two_workers_admit_exactly_the_limit() {
    let s = Stack::with(batched(16), 2);
    let before = quota_callouts(&s);
    let statuses = fire(&[s.envoy.listener_addr()], 200, 50, "GET", "/v1/models", &[("x-tenant-id", "batch-burst")]);
    assert_eq!(count(&statuses, 200), 100, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 100);
    assert_eq!(s.admitted("batch-burst"), 100);
    let batched = s.envoy.filter_counter("sluice.batched_checks");
    assert!(batched >= 200, "every check went in a batch: {batched}");
    // 200 checks, in far fewer callouts (a batch holds up to 16).
    let callouts = quota_callouts(&s) - before;
    assert!(callouts < 150, "{callouts} callouts for 200 batched checks");
    // The service decided each check on its own.
    assert_eq!(s.callouts(), 200);
}

#[test]
fn batched_answers_carry_the_same_headers_and_bodies_as_single_ones() {
    let s = Stack::with(batched(8), 1);
    s.set_limits("batch-h", json!({"hour": 3}));
    for i in 0..3u64 {
        let r = s.get("/v1/models", "batch-h");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(header_u64(&r, "x-ratelimit-limit"), 3);
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 2 - i);
        assert!(r.header("ratelimit-policy").is_some());
    }
    let r = s.get("/v1/models", "batch-h");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"], "quota_exceeded");
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 0);
    let retry = header_u64(&r, "retry-after");
    assert!((1..=3600).contains(&retry), "{retry}");
    // Exempt paths and missing tenants never reach a batch.
    assert_eq!(s.envoy.request("GET", "/v1/models", &[], None).status, 401);
    assert_eq!(s.envoy.filter_counter("sluice.batched_checks"), 4);
    assert_eq!(s.admitted("batch-h"), 3);
}

#[test]
fn batched_checks_take_each_routes_failure_mode_when_the_service_is_down() {
    let mut s = Stack::with(batched(8), 1);
    assert_eq!(s.get("/v1/models", "batch-down").status, 200);
    s.service.process().stop();
    let t = Instant::now();
    let open = s.get("/v1/models", "batch-down");
    assert_eq!(open.status, 200, "fail-open forwards: {}", open.text());
    assert!(open.header("x-ratelimit-limit").is_none(), "no invented headers");
    let closed = s.get("/v1/llm/complete", "batch-down");
    assert_eq!(closed.status, 503, "{}", closed.text());
    assert_eq!(closed.json()["error"], "quota_service_unavailable");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(s.admitted("batch-down"), 2);
    assert_eq!(s.envoy.filter_counter("sluice.failed_open"), 1);
    assert_eq!(s.envoy.filter_counter("sluice.failed_closed"), 1);
}

#[test]
fn a_client_gone_while_its_check_waits_in_a_batch_leaves_the_others_decided() {
    let s = Stack::with(batched(4), 1);
    // Clients that give up at once (1 ms) while others wait normally.
    std::thread::scope(|scope| {
        for _ in 0..20 {
            scope.spawn(|| {
                let _ = http::request(s.envoy.listener_addr(), "GET", "/v1/models", &[("x-tenant-id", "batch-quit")], None, Duration::from_millis(1));
            });
        }
    });
    let statuses = fire(&[s.envoy.listener_addr()], 40, 10, "GET", "/v1/models", &[("x-tenant-id", "batch-stay")]);
    assert_eq!(count(&statuses, 200), 40, "{statuses:?}");
    // The VM lives on and the worker still batches.
    let r = s.get("/v1/models", "batch-stay");
    assert_eq!(r.status, 200);
    assert!(s.envoy.filter_counter("sluice.batched_checks") >= 41);
}

#[test]
fn the_batch_endpoint_decides_each_check_on_its_own() {
    let s = Stack::start();
    let addr = s.service.addr();
    let r = http::send_json(
        addr,
        "POST",
        "/v1/check/batch",
        &[],
        &json!({"checks": [{"tenant": "b1", "cost": 2}, {"tenant": "a b"}, {"tenant": "b1", "cost": "x"}, {"tenant": "b2"}]}),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["status"], 200);
    assert_eq!(results[0]["answer"]["allowed"], true);
    assert_eq!(results[0]["answer"]["windows"][0]["used"], 2);
    assert_eq!(results[1]["status"], 400);
    assert_eq!(results[1]["error"]["error"], "invalid_tenant");
    assert_eq!(results[2]["status"], 400);
    assert!(results[2]["error"]["message"].as_str().unwrap().starts_with("checks[2].cost:"), "{}", results[2]);
    assert_eq!(results[3]["answer"]["windows"][0]["used"], 1);
    // The same counters a single check uses.
    let one = http::send_json(addr, "POST", "/v1/check", &[], &json!({"tenant": "b1"})).unwrap();
    assert_eq!(one.json()["windows"][0]["used"], 3);

    for (body, field) in [
        (json!({"checks": (0..257).map(|_| json!({"tenant": "b3"})).collect::<Vec<_>>()}), "checks"),
        (json!({"checks": {"tenant": "b3"}}), "checks"),
        (json!({"check": []}), ""),
    ] {
        let r = http::send_json(addr, "POST", "/v1/check/batch", &[], &body).unwrap();
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"], "invalid_request");
        assert!(r.json()["message"].as_str().unwrap().contains(field), "{}", r.text());
    }
    // What is wrong is said where it is: the body, or which check.
    let r = http::send_json(addr, "POST", "/v1/check/batch", &[], &json!([{"tenant": "b3"}])).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().starts_with("body: must be an object"), "{}", r.text());
    let r = http::send_json(addr, "POST", "/v1/check/batch", &[], &json!({"checks": [1, {"cost": 1}, {"tenant": "b3", "cost": -1}]})).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let messages: Vec<String> = r.json()["results"].as_array().unwrap().iter().map(|x| x["error"]["message"].as_str().unwrap_or("").to_string()).collect();
    assert!(messages[0].starts_with("checks[0]: must be an object"), "{messages:?}");
    assert!(messages[1].starts_with("checks[1]: missing field `tenant`"), "{messages:?}");
    assert!(messages[2].starts_with("checks[2].cost:"), "{messages:?}");
    // Fields it does not know are ignored, as in a check (upgrades in either order).
    let r = http::send_json(addr, "POST", "/v1/check/batch", &[], &json!({"checks": [{"tenant": "b5", "new_field": 1}], "version": 2})).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["results"][0]["status"], 200);
    // Its body cap is its own (512 KiB), and the 413 says so.
    let huge = format!("{{\"checks\":[{{\"tenant\":\"b6\",\"pad\":\"{}\"}}]}}", "x".repeat(600 * 1024));
    let r = http::request(addr, "POST", "/v1/check/batch", &[("content-type", "application/json")], Some(huge.as_bytes()), http::DEFAULT_TIMEOUT).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("524288"), "{}", r.text());
    let r = http::request(addr, "POST", "/v1/check/batch", &[("content-type", "application/json")], Some(b"{not json"), http::DEFAULT_TIMEOUT).unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_request");
    // A wrongly typed field is named, alone or in a batch.
    let bad_window = json!({"tenant": "b4", "policy": "p", "route_limits": [{"window": 5, "limit": 3}]});
    let r = http::send_json(addr, "POST", "/v1/check", &[], &bad_window).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().contains("route_limits[0].window"), "{}", r.text());
    let r = http::send_json(addr, "POST", "/v1/check/batch", &[], &json!({"checks": [bad_window]})).unwrap();
    assert!(r.json()["results"][0]["error"]["message"].as_str().unwrap().contains("route_limits[0].window"), "{}", r.text());
    // Nothing of the refused batches was counted.
    let r = http::send_json(addr, "POST", "/v1/check", &[], &json!({"tenant": "b3"})).unwrap();
    assert_eq!(r.json()["windows"][0]["used"], 1);
}
