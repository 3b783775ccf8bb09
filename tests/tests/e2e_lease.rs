//! Quota leases end to end: real Envoys whose workers spend leases through
//! proxy-wasm shared data, the quota service granting and taking them back,
//! Redis counting. "Admitted" is counted at the upstream.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, Service, ServiceOpts};
use std::time::{Duration, Instant};

fn lease_config(max_units: u64, ttl_ms: u64) -> Value {
    // No latency reports: they are callouts too, and these tests count callouts.
    plugin_config(json!({
        "report_latency": false,
        "failure_mode": "closed",
        "timeout_ms": 2000,
        "default_policy": {"cost": 1, "lease": {"max_units": max_units, "ttl_ms": ttl_ms}},
    }))
}

/// The tenant's hour counter as the service reports it.
fn counted(service: &Service, tenant: &str) -> u64 {
    let r = service.admin("GET", &format!("/v1/admin/tenants/{tenant}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    body["windows"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["window"] == "hour"))
        .and_then(|w| w["current"].as_u64())
        .unwrap_or_else(|| panic!("no hour window in {body}"))
}

/// Polls until the counter equals what reached the upstream, i.e. every
/// lease has been spent or given back (bounded; leases live `ttl`).
fn wait_until_settled(service: &Service, upstream: &DemoUpstream, tenant: &str, bound: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let (c, a) = (counted(service, tenant), admitted(upstream, tenant));
        if c == a {
            return c;
        }
        assert!(start.elapsed() < bound, "leases of {tenant} not given back after {bound:?}: counted {c}, admitted {a}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn h01_lease_mode_never_admits_more_than_the_limit_across_two_envoys_and_two_workers() {
    let redis = Redis::start();
    let a = Service::start(&redis.url(), ServiceOpts { enable_test_clock: false, ..ServiceOpts::default() });
    let b = Service::start(&redis.url(), ServiceOpts { enable_test_clock: false, ..ServiceOpts::default() });
    let upstream = DemoUpstream::start();
    let mut oa = EnvoyOpts::new(lease_config(20, 300), a.addr(), upstream.addr());
    oa.concurrency = 2;
    let mut ob = EnvoyOpts::new(lease_config(20, 300), b.addr(), upstream.addr());
    ob.concurrency = 2;
    let (ea, eb) = (Envoy::start(oa), Envoy::start(ob));
    let r = a.admin("PUT", "/v1/admin/tenants/race/limits", Some(&json!({"hour": 50})));
    assert_eq!(r.status, 200, "{}", r.text());

    // A few requests in a row first, so Envoy A holds a live lease when the
    // burst starts: a burst on a cold tenant can otherwise spend the whole
    // limit in single checks before any lease is granted (a lease is sized
    // from the rate seen since the tenant's previous callout).
    let mut warm = 0;
    while ea.filter_counter("sluice.lease_admitted") == 0 {
        assert_eq!(ea.request("GET", "/v1/models", &[("x-tenant-id", "race")], None).status, 200);
        warm += 1;
        assert!(warm < 10, "no lease was granted to sequential requests");
    }

    let targets = [ea.listener_addr(), eb.listener_addr()];
    let statuses = fire(&targets, 300, 50, "GET", "/v1/models", &[("x-tenant-id", "race")]);
    let ok = warm + count(&statuses, 200);
    assert_eq!(count(&statuses, 200) + count(&statuses, 429), 300, "only 200 and 429: {statuses:?}");
    assert!(ok <= 50, "{ok} admitted past the limit of 50");
    assert_eq!(admitted(&upstream, "race"), ok as u64);
    let leased = ea.filter_counter("sluice.lease_admitted") + eb.filter_counter("sluice.lease_admitted");
    assert!(leased > 0, "no request was admitted from a lease");

    // Once every lease is spent or given back, what is left can be used,
    // and not one unit more: the total is exactly the limit.
    let settled = wait_until_settled(&a, &upstream, "race", Duration::from_secs(10));
    assert_eq!(settled, ok as u64);
    let mut more = 0;
    loop {
        let r = ea.request("GET", "/v1/models", &[("x-tenant-id", "race")], None);
        match r.status {
            200 => more += 1,
            429 => break,
            s => panic!("status {s}: {}", r.text()),
        }
        assert!(more <= 50, "admitting without end");
    }
    assert_eq!(ok + more, 50, "burst {ok} + afterwards {more}");
    assert_eq!(admitted(&upstream, "race"), 50);
}

#[test]
fn leases_are_given_back_when_they_expire_without_another_request() {
    let s = Stack::with(lease_config(50, 3000), 1);
    // Sequential requests: the second one sees the first's rate and asks for a lease.
    let mut sent = 0;
    while s.envoy.filter_counter("sluice.lease_admitted") == 0 {
        assert_eq!(s.get("/v1/models", "cold").status, 200);
        sent += 1;
        assert!(sent < 100, "no lease was granted");
    }
    let outstanding = counted(&s.service, "cold") - s.admitted("cold");
    assert!(outstanding > 0, "a live lease is counted in Redis before it is spent");
    let settled = wait_until_settled(&s.service, &s.upstream, "cold", Duration::from_secs(15));
    assert_eq!(settled, sent);
    assert_eq!(s.envoy.filter_counter("sluice.lease_units_returned"), outstanding);
    assert_eq!(s.envoy.filter_counter("sluice.lease_return_errors"), 0);
    let metrics = s.service.metrics();
    assert!(
        metrics.lines().any(|l| l == format!("sluice_lease_units_total{{op=\"returned\"}} {outstanding}")),
        "{metrics}"
    );
    // The usage history books the requests the lease admitted, and only
    // the units that were spent.
    let usage = s.service.admin("GET", "/v1/admin/usage?tenant=cold", None);
    assert_eq!(usage.status, 200, "{}", usage.text());
    let row = find_row(&usage.json(), "cold").unwrap_or_else(|| panic!("no usage row for cold: {}", usage.text()));
    assert_eq!(row["admitted"], sent, "{row}");
    assert_eq!(row["cost_units"], sent, "{row}");
}

/// The first JSON object anywhere in `v` whose `tenant` is `tenant`.
fn find_row(v: &Value, tenant: &str) -> Option<Value> {
    match v {
        Value::Object(o) if o.get("tenant").and_then(Value::as_str) == Some(tenant) => Some(v.clone()),
        Value::Object(o) => o.values().find_map(|x| find_row(x, tenant)),
        Value::Array(a) => a.iter().find_map(|x| find_row(x, tenant)),
        _ => None,
    }
}

#[test]
fn lease_size_shrinks_to_a_check_per_request_near_the_limit_and_headers_stay_exact() {
    let s = Stack::with(lease_config(64, 10_000), 1);
    s.set_limits("near", json!({"hour": 40}));
    let mut callout_made = Vec::new();
    loop {
        let before = s.callouts();
        let r = s.get("/v1/models", "near");
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        callout_made.push(s.callouts() > before);
        let admitted = callout_made.len() as u64;
        assert!(admitted <= 40, "past the limit");
        // One client alone: the remaining it is told is exact, lease or not.
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 40 - admitted, "request {admitted}");
        assert_eq!(header_u64(&r, "x-ratelimit-limit"), 40);
    }
    assert_eq!(callout_made.len(), 40, "exactly the limit is admitted");
    assert_eq!(s.admitted("near"), 40);
    assert!(callout_made.iter().any(|c| !c), "some requests were admitted from a lease: {callout_made:?}");
    assert!(callout_made.iter().rev().take(3).all(|c| *c), "the last units are checked one by one: {callout_made:?}");

    // Over the limit, the denial is kept in the lease table: more requests
    // get the same 429 from Envoy without asking the service.
    let before = s.callouts();
    for _ in 0..5 {
        let r = s.get("/v1/models", "near");
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 0);
        assert_eq!(r.json()["error"], "quota_exceeded");
        let retry_after = header_u64(&r, "retry-after");
        assert!((1..=3600).contains(&retry_after), "Retry-After {retry_after}");
    }
    assert_eq!(s.callouts(), before, "kept denials make no callout");
    assert!(s.envoy.filter_counter("sluice.lease_denied") >= 5);
    assert_eq!(s.admitted("near"), 40);
}
