//! Operating Sluice end to end (real Envoy, service binary, Redis, demo
//! upstreams): runtime tiers reaching every replica within the bound,
//! overrides that revert, shadow mode, reserved capacity, latency reports
//! and case H05 on the runtime-tier path.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, Service, ServiceOpts};
use std::time::{Duration, Instant};

fn put(s: &Service, path: &str, body: Value) -> Value {
    let r = s.admin("PUT", path, Some(&body));
    assert_eq!(r.status, 200, "PUT {path}: {}", r.text());
    r.json()
}

#[test]
fn a_tier_changed_through_one_replica_is_enforced_through_another_replica_and_its_envoy_within_1s() {
    let redis = Redis::start();
    let a = Service::start(&redis.url(), ServiceOpts::default());
    let b = Service::start(&redis.url(), ServiceOpts::default());
    let upstream = DemoUpstream::start();
    let envoy = Envoy::start(EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), b.addr(), upstream.addr()));
    let get = || envoy.request("GET", "/v1/models", &[("x-tenant-id", "prop")], None);
    let r = get();
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 100);

    let changed = Instant::now();
    put(&a, "/v1/admin/tiers/free", json!({"hour": 4321, "day": 100000}));
    let mut first_seen = None;
    loop {
        let sent = changed.elapsed();
        let r = get();
        assert_eq!(r.status, 200, "{}", r.text());
        let limit = header_u64(&r, "x-ratelimit-limit");
        if limit == 4321 {
            first_seen.get_or_insert(changed.elapsed());
        } else {
            assert_eq!(limit, 100);
            assert!(sent < Duration::from_secs(1), "a request sent {sent:?} after the change still saw the old tier");
            assert!(first_seen.is_none(), "went back to the old tier");
        }
        if sent > Duration::from_millis(1300) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let seen = first_seen.expect("the change never arrived");
    eprintln!("MEASURED: tier change through replica A enforced via replica B + Envoy after {seen:?}");

    // A tenant change is read by every check: the very next request through B sees it.
    put(&a, "/v1/admin/tenants/prop/limits", json!({"hour": 7}));
    assert_eq!(header_u64(&get(), "x-ratelimit-limit"), 7);
}

#[test]
fn an_emergency_override_admits_more_until_it_expires_then_the_old_limit_returns() {
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000})), 1);
    s.set_limits("ovr", json!({"hour": 3}));
    let hour = next_hour_ms(30);
    s.service.set_clock_offset_ms(offset_to(hour - 30 * 60_000)); // HH:30
    let statuses = fire(&[s.envoy.listener_addr()], 5, 2, "GET", "/v1/models", &[("x-tenant-id", "ovr")]);
    assert_eq!(count(&statuses, 200), 3);
    let v = put(&s.service, "/v1/admin/tenants/ovr/overrides", json!({"limits": {"hour": 10}, "duration_s": 300, "reason": "incident 7"}));
    assert_eq!(v["limits"]["hour"]["source"], "override");
    let r = s.get("/v1/models", "ovr");
    assert_eq!((r.status, header_u64(&r, "x-ratelimit-limit")), (200, 10));
    let statuses = fire(&[s.envoy.listener_addr()], 10, 2, "GET", "/v1/models", &[("x-tenant-id", "ovr")]);
    assert_eq!(count(&statuses, 200), 6, "10 in the hour, 4 used");
    // Past the expiry (no sleeping: the test clock jumps): back to 3, already used.
    let until = v["limits"]["hour"]["until_ms"].as_i64().unwrap();
    s.service.set_clock_offset_ms(offset_to(until + 1_000));
    let r = s.get("/v1/models", "ovr");
    assert_eq!((r.status, header_u64(&r, "x-ratelimit-limit")), (429, 3));
    assert_eq!(s.admitted("ovr"), 3 + 1 + 6);
    let audit = s.service.admin("GET", "/v1/admin/audit?tenant=ovr&action=grant_override", None).json();
    assert_eq!(audit["entries"][0]["reason"], "incident 7");
}

#[test]
fn h05_rejected_requests_consume_nothing_so_a_runtime_tier_upgrade_admits_exactly_the_difference() {
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000})), 1);
    put(&s.service, "/v1/admin/tiers/starter", json!({"month": 10}));
    s.set_tier("h05r", "starter");
    let statuses = fire(&[s.envoy.listener_addr()], 50, 10, "GET", "/v1/models", &[("x-tenant-id", "h05r")]);
    assert_eq!(count(&statuses, 200), 10);
    // The tier itself is changed at runtime (every tenant on it upgrades at once).
    put(&s.service, "/v1/admin/tiers/starter", json!({"month": 20}));
    let statuses = fire(&[s.envoy.listener_addr()], 11, 4, "GET", "/v1/models", &[("x-tenant-id", "h05r")]);
    assert_eq!(count(&statuses, 200), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 1);
    assert_eq!(s.admitted("h05r"), 20);
}

#[test]
fn shadow_mode_on_a_route_never_blocks_and_counts_what_it_would_have_denied() {
    let config = plugin_config(json!({
        "timeout_ms": 2000,
        "policies": [
            {"name": "shadowed", "path_prefix": "/v1/shadow/", "shadow": true, "failure_mode": "closed"},
            {"name": "chat", "route_name": "chat_route", "cost": 2}
        ]
    }));
    let mut s = Stack::with(config, 1);
    s.set_limits("sh", json!({"hour": 3}));
    let statuses = fire(&[s.envoy.listener_addr()], 10, 3, "GET", "/v1/shadow/x", &[("x-tenant-id", "sh")]);
    assert_eq!(count(&statuses, 200), 10, "{statuses:?}");
    assert_eq!(s.admitted("sh"), 10, "everything reached the upstream");
    assert_eq!(s.envoy.filter_counter("sluice.shadow_denied"), 7);
    assert_eq!(s.envoy.filter_counter("sluice.denied"), 0);
    let r = s.get("/v1/shadow/x", "sh");
    assert!(r.header("x-ratelimit-limit").is_none(), "shadow_headers is off");
    let m = s.service.metrics();
    assert!(m.contains("sluice_shadow_decisions_total{result=\"denied\"} 8"), "{m}");
    assert!(m.contains("sluice_shadow_decisions_total{result=\"allowed\"} 3"));
    // The same tenant off the shadow route is enforced.
    assert_eq!(s.get("/v1/models", "sh").status, 429);
    // A shadow route fails open even when configured fail-closed.
    s.service.process().stop();
    let r = s.get("/v1/shadow/x", "sh");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn shadow_mode_set_per_tenant_forwards_denials_with_headers_when_configured_and_is_reversible() {
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000, "shadow_headers": true})), 1);
    s.set_limits("tsh", json!({"hour": 2}));
    put(&s.service, "/v1/admin/tenants/tsh/mode", json!({"shadow": true, "reason": "rollout"}));
    let mut last = None;
    for _ in 0..5 {
        let r = s.get("/v1/models", "tsh");
        assert_eq!(r.status, 200, "{}", r.text());
        last = Some(r);
    }
    let last = last.unwrap();
    assert_eq!(header_u64(&last, "x-ratelimit-remaining"), 0, "headers tell what would have happened");
    assert!(last.header("retry-after").is_none());
    assert_eq!(s.envoy.filter_counter("sluice.shadow_denied"), 3);
    assert_eq!(s.admitted("tsh"), 5);
    put(&s.service, "/v1/admin/tenants/tsh/mode", json!({"shadow": false}));
    assert_eq!(s.get("/v1/models", "tsh").status, 429);
}

#[test]
fn reserved_capacity_routes_a_tiers_admitted_requests_to_its_dedicated_cluster_and_clients_cannot_pick_it() {
    let reserved = DemoUpstream::start();
    let reserved_addr = reserved.addr();
    let s = Stack::with_opts(plugin_config(json!({"timeout_ms": 2000})), 1, |o| {
        o.extra_clusters.push(json!({
            "name": "reserved_gold", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "reserved_gold", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                {"socket_address": {"address": "127.0.0.1", "port_value": reserved_addr.port()}}}}]}]}
        }));
        o.extra_routes.push(json!({
            "name": "reserved_gold",
            "match": {"prefix": "/", "headers": [{"name": "x-sluice-pool", "string_match": {"exact": "gold"}}]},
            "route": {"cluster": "reserved_gold"},
            "request_headers_to_remove": ["x-sluice-pool"]
        }));
    });
    put(&s.service, "/v1/admin/tiers/gold", json!({"hour": 1000, "reserved_pool": "gold"}));
    s.set_tier("vip", "gold");
    for _ in 0..3 {
        let r = s.get("/v1/models", "vip");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("x-sluice-pool").is_none() && !r.text().contains("x-sluice-pool"), "the upstream never sees the internal header: {}", r.text());
    }
    // The chat route is picked by route name, so Envoy resolved the route before the filter ran.
    let r = s.envoy.request("POST", "/v1/chat/completions", &[("x-tenant-id", "vip"), ("content-type", "application/json")], Some(br#"{"messages":[]}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(admitted(&reserved, "vip"), 4);
    assert_eq!(s.admitted("vip"), 0);
    // A client naming the pool itself gets the shared capacity.
    for path in ["/v1/models", "/v1/chat/completions"] {
        let r = s.envoy.request(
            "POST",
            path,
            &[("x-tenant-id", "sneaky"), ("x-sluice-pool", "gold"), ("content-type", "application/json")],
            Some(br#"{"messages":[]}"#),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(admitted(&reserved, "sneaky"), 0);
    assert_eq!(s.admitted("sneaky"), 2);
    // A tenant-level pool works the same way, and a denied request goes nowhere.
    put(&s.service, "/v1/admin/tenants/solo/mode", json!({"reserved_pool": "gold"}));
    s.set_limits("solo", json!({"hour": 1}));
    assert_eq!(s.get("/v1/models", "solo").status, 200);
    assert_eq!(s.get("/v1/models", "solo").status, 429);
    assert_eq!(admitted(&reserved, "solo"), 1);
    assert_eq!(s.envoy.filter_counter("sluice.reserved"), 5);
    // A pool no route matches: the shared upstream serves it and, as every
    // shipped route removes the header, never sees it.
    put(&s.service, "/v1/admin/tenants/lost/mode", json!({"reserved_pool": "nowhere"}));
    let r = s.envoy.request("GET", "/v1/echo", &[("x-tenant-id", "lost")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    let names: Vec<String> = r.json()["header_names"].as_array().unwrap().iter().filter_map(|v| v.as_str().map(String::from)).collect();
    assert!(!names.iter().any(|n| n.starts_with("x-sluice-")), "{names:?}");
}

#[test]
fn upstream_latency_reported_by_the_filter_lands_in_the_daily_usage_rollup() {
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000, "report_latency": true})), 1);
    for _ in 0..4 {
        assert_eq!(s.get("/v1/models", "lat").status, 200);
    }
    assert_eq!(s.get("/healthz", "lat").status, 200, "exempt: no check, no report");
    // Reports are fire-and-forget callouts: wait until all four landed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let v = s.service.admin("GET", "/v1/admin/usage?tenant=lat", None).json();
        let row = v["rows"][0].clone();
        if row["latency_count"] == 4 || Instant::now() > deadline {
            break row;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(row["latency_count"], 4, "{row}");
    assert_eq!(row["admitted"], 4);
    assert!(row["latency_p95_ms"].as_u64().is_some() && row["latency_mean_ms"].as_f64().is_some(), "{row}");
    assert_eq!(s.envoy.filter_counter("sluice.latency_reports"), 4);
}
