//! Quotas enforced end to end: real Envoy with the filter, the quota service,
//! Redis and the demo upstream. "Admitted" is always counted at the upstream.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, Service, ServiceOpts};

/// The shipped config with a generous callout timeout: these tests count
/// exactly, and a callout that times out on a loaded machine would fail open,
/// admitting a request that was never counted.
fn stack() -> Stack {
    Stack::with(plugin_config(json!({"timeout_ms": 2000})), 1)
}

#[test]
fn a_free_tenant_gets_100_requests_then_429_with_body_and_headers() {
    let s = stack();
    for i in 1..=100 {
        let r = s.get("/v1/models", "free-1");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(header_u64(&r, "x-ratelimit-limit"), 100);
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 100 - i);
    }
    let r = s.get("/v1/models", "free-1");
    assert_eq!(r.status, 429);
    let body = r.json();
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["window"], "hour");
    assert_eq!(body["limit"], 100);
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["tier"], "free");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 0);
    assert_eq!(body["retry_after"].as_u64(), Some(header_u64(&r, "retry-after")));
    assert_eq!(s.admitted("free-1"), 100);
    assert_eq!(s.envoy.prometheus().sum("sluice_denied"), 1.0);
}

#[test]
fn h06_retry_after_is_whole_seconds_until_the_hour_ends_and_reset_agrees() {
    let s = stack();
    s.set_limits("h06", json!({"hour": 5}));
    for _ in 0..5 {
        assert_eq!(s.get("/v1/models", "h06").status, 200);
    }
    let r = s.get("/v1/models", "h06");
    assert_eq!(r.status, 429);
    let raw = r.header("retry-after").unwrap();
    assert!(raw.bytes().all(|b| b.is_ascii_digit()), "Retry-After {raw:?} is not whole seconds");
    let retry_after: i64 = raw.parse().unwrap();
    let now = now_ms();
    let left = (next_hour_ms(0) - now + 999) / 1000;
    assert!((retry_after - left).abs() <= 1, "Retry-After {retry_after} vs {left} s left in the hour");
    let reset = header_u64(&r, "x-ratelimit-reset") as i64;
    assert!((reset - (now / 1000 + retry_after)).abs() <= 1, "X-RateLimit-Reset {reset} is epoch seconds of the reset");
    assert_eq!(reset % 3600, 0, "an hour window resets on the hour");
}

#[test]
fn h07_retry_after_is_the_time_left_not_the_whole_window_and_the_next_hour_admits() {
    let s = stack();
    s.set_limits("h07", json!({"hour": 10}));
    let hour = next_hour_ms(5);
    s.service.set_clock_offset_ms(offset_to(hour - 11 * 60_000)); // HH:49:00
    for _ in 0..10 {
        assert_eq!(s.get("/v1/models", "h07").status, 200);
    }
    s.service.set_clock_offset_ms(offset_to(hour - 10 * 60_000)); // HH:50:00
    let r = s.get("/v1/models", "h07");
    assert_eq!(r.status, 429);
    let retry_after = header_u64(&r, "retry-after");
    assert!((599..=601).contains(&retry_after), "Retry-After {retry_after}, expected ~600");
    s.service.set_clock_offset_ms(offset_to(hour + 1_000)); // HH+1:00:01
    assert_eq!(s.get("/v1/models", "h07").status, 200);
}

#[test]
fn h01_200_concurrent_requests_over_two_workers_admit_exactly_the_limit() {
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000})), 2);
    let statuses = fire(&[s.envoy.listener_addr()], 200, 50, "GET", "/v1/models", &[("x-tenant-id", "burst")]);
    assert_eq!(count(&statuses, 200), 100, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 100);
    assert_eq!(s.admitted("burst"), 100);
}

#[test]
fn h01_two_envoys_and_two_service_replicas_on_one_redis_admit_exactly_the_limit() {
    let redis = Redis::start();
    let a = Service::start(&redis.url(), ServiceOpts::default());
    let b = Service::start(&redis.url(), ServiceOpts::default());
    let upstream = DemoUpstream::start();
    let mut oa = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), a.addr(), upstream.addr());
    oa.concurrency = 2;
    let mut ob = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), b.addr(), upstream.addr());
    ob.concurrency = 2;
    let (ea, eb) = (Envoy::start(oa), Envoy::start(ob));
    let r = a.admin("PUT", "/v1/admin/tenants/race/limits", Some(&json!({"hour": 10})));
    assert_eq!(r.status, 200, "{}", r.text());

    let statuses = fire(&[ea.listener_addr(), eb.listener_addr()], 200, 50, "GET", "/v1/models", &[("x-tenant-id", "race")]);
    assert_eq!(count(&statuses, 200), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 190);
    assert_eq!(admitted(&upstream, "race"), 10);
    // The free tier's 100 would apply to another tenant through either pair.
    let statuses = fire(&[ea.listener_addr(), eb.listener_addr()], 200, 50, "GET", "/v1/models", &[("x-tenant-id", "race-free")]);
    assert_eq!(count(&statuses, 200), 100);
    assert_eq!(admitted(&upstream, "race-free"), 100);
}

#[test]
fn a_tier_change_and_a_custom_limit_apply_to_the_next_request() {
    let s = stack();
    for _ in 0..100 {
        assert_eq!(s.get("/v1/models", "grow").status, 200);
    }
    assert_eq!(s.get("/v1/models", "grow").status, 429);
    s.set_tier("grow", "pro");
    let r = s.get("/v1/models", "grow");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 1000);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 899);

    s.set_limits("grow", json!({"hour": 101}));
    assert_eq!(s.get("/v1/models", "grow").status, 429, "custom hour limit 101 is already used");
    s.set_limits("grow", json!({"hour": 103}));
    let r = s.get("/v1/models", "grow");
    assert_eq!(r.status, 200);
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 103);
    assert_eq!(r.header("ratelimit-policy").unwrap().split(", ").next(), Some("\"hour\";q=103;w=3600"));

    let status = s.service.admin("GET", "/v1/admin/tenants/grow", None).json();
    assert_eq!(status["tier"], "pro");
}

#[test]
fn h05_rejected_requests_consume_nothing_so_an_upgrade_admits_exactly_the_difference() {
    let s = stack();
    s.set_limits("h05", json!({"month": 10}));
    let statuses = fire(&[s.envoy.listener_addr()], 50, 10, "GET", "/v1/models", &[("x-tenant-id", "h05")]);
    assert_eq!(count(&statuses, 200), 10);
    s.set_limits("h05", json!({"month": 20}));
    let statuses = fire(&[s.envoy.listener_addr()], 11, 4, "GET", "/v1/models", &[("x-tenant-id", "h05")]);
    assert_eq!(count(&statuses, 200), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 1);
    assert_eq!(s.admitted("h05"), 20);
}

#[test]
fn h16_a_zero_limit_rejects_1000_concurrent_requests_with_sane_headers() {
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000})), 2);
    s.set_limits("suspended", json!({"hour": 0}));
    let statuses = fire(&[s.envoy.listener_addr()], 1000, 50, "GET", "/v1/models", &[("x-tenant-id", "suspended")]);
    assert_eq!(count(&statuses, 429), 1000, "{:?}", statuses.iter().filter(|s| **s != 429).collect::<Vec<_>>());
    let r = s.get("/v1/models", "suspended");
    assert_eq!(r.status, 429);
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 0);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 0);
    assert!(header_u64(&r, "retry-after") >= 1);
    assert_eq!(s.admitted("suspended"), 0);
    assert_eq!(s.get("/v1/models", "someone-else").status, 200, "everything stays up");
}

#[test]
fn h03_a_burst_across_the_hour_boundary_is_bounded_by_the_day_window() {
    let s = stack();
    s.set_limits("h03", json!({"hour": 100, "day": 150}));
    // Pick an hour boundary that is not also a day boundary.
    let mut hour = next_hour_ms(5);
    if hour % 86_400_000 == 0 {
        hour += 3_600_000;
    }
    s.service.set_clock_offset_ms(offset_to(hour - 1_500));
    let first = fire(&[s.envoy.listener_addr()], 100, 10, "GET", "/v1/models", &[("x-tenant-id", "h03")]);
    assert_eq!(count(&first, 200), 100);
    s.service.set_clock_offset_ms(offset_to(hour + 200));
    let second = fire(&[s.envoy.listener_addr()], 100, 10, "GET", "/v1/models", &[("x-tenant-id", "h03")]);
    assert_eq!(count(&second, 200), 50, "the day window still binds");
    let r = s.get("/v1/models", "h03");
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["window"], "day", "the binding window is the day");
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 150);
    assert_eq!(s.admitted("h03"), 150);
}

#[test]
fn h03_with_only_an_hour_window_200_requests_in_a_second_is_the_fixed_window_behaviour() {
    let s = stack();
    s.set_limits("h03b", json!({"hour": 100, "day": 1_000_000, "month": 1_000_000}));
    let hour = next_hour_ms(15);
    // 10 s before the boundary, not 0.5 s: on a loaded machine the first
    // burst must still end inside its hour (what is tested is the window
    // arithmetic, not how fast 100 requests go).
    s.service.set_clock_offset_ms(offset_to(hour - 10_000));
    let first = fire(&[s.envoy.listener_addr()], 100, 10, "GET", "/v1/models", &[("x-tenant-id", "h03b")]);
    assert_eq!(count(&first, 200), 100, "the whole first burst fits the hour");
    s.service.set_clock_offset_ms(offset_to(hour + 200));
    let second = fire(&[s.envoy.listener_addr()], 100, 10, "GET", "/v1/models", &[("x-tenant-id", "h03b")]);
    assert_eq!(count(&first, 200) + count(&second, 200), 200);
}

#[test]
fn h04_no_quota_key_is_ever_without_expiry_and_the_next_window_admits_again() {
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000})), 2);
    s.set_limits("h04", json!({"hour": 20}));
    for t in ["h04", "h04-a", "h04-b"] {
        fire(&[s.envoy.listener_addr()], 40, 8, "GET", "/v1/models", &[("x-tenant-id", t)]);
    }
    fire(&[s.envoy.listener_addr()], 10, 4, "GET", "/v1/llm/complete", &[("x-tenant-id", "h04")]);
    let keys = s.redis.cmd(&["KEYS", "*"]).strings();
    let counters: Vec<&String> = keys.iter().filter(|k| k.contains(":q:") || k.contains(":r:")).collect();
    assert!(counters.len() >= 9, "expected counters for 3 tenants x 3 windows and route windows: {keys:?}");
    // Every key expires, except those with a documented owner (the admin
    // API): the tenants' settings and the tiers document.
    for k in keys.iter().filter(|k| !k.ends_with(":cfg") && *k != "sluice:{g}:tiers") {
        let ttl = s.redis.cmd(&["TTL", k]).as_i64().unwrap();
        assert!(ttl > 0, "key {k} has TTL {ttl}");
    }
    assert_eq!(s.get("/v1/models", "h04").status, 429);
    s.service.set_clock_offset_ms(offset_to(next_hour_ms(5) + 1_000));
    assert_eq!(s.get("/v1/models", "h04").status, 200, "admitted as soon as the next window starts");
}

#[test]
fn h09_requests_without_a_usable_tenant_are_never_unlimited() {
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000})), 2);
    let addr = s.envoy.listener_addr();
    let before = s.callouts();
    let missing = fire(&[addr], 250, 25, "GET", "/v1/models", &[]);
    let empty = fire(&[addr], 250, 25, "GET", "/v1/models", &[("x-tenant-id", "")]);
    let blank = fire(&[addr], 250, 25, "GET", "/v1/models", &[("x-tenant-id", "   ")]);
    let twice = fire(&[addr], 250, 25, "GET", "/v1/models", &[("x-tenant-id", "a"), ("x-tenant-id", "b")]);
    assert_eq!(count(&missing, 401), 250);
    assert_eq!(count(&empty, 401), 250);
    assert_eq!(count(&blank, 401), 250);
    assert_eq!(count(&twice, 400), 250);
    assert_eq!(s.callouts(), before, "no callout for a request without a usable tenant");
    assert_eq!(s.upstream.stats()["total"].as_u64(), Some(0), "nothing reached the upstream");
    let r = s.envoy.request("GET", "/v1/models", &[("x-tenant-id", "a"), ("x-tenant-id", "b")], None);
    assert_eq!(r.json()["error"], "invalid_tenant");
    let r = s.envoy.request("GET", "/v1/models", &[], None);
    assert_eq!(r.json()["error"], "missing_tenant");

    // An unknown id gets the default tier and leaves only expiring keys.
    let unknown = fire(&[addr], 150, 25, "GET", "/v1/models", &[("x-tenant-id", "never-seen-before")]);
    assert_eq!(count(&unknown, 200), 100);
    let keys = s.redis.cmd(&["KEYS", "*never-seen-before*"]).strings();
    assert_eq!(keys.len(), 4, "hour, day and month counters and the day's usage rollup only: {keys:?}");
    assert!(keys.iter().any(|k| k.contains(":u:")), "{keys:?}");
    for k in &keys {
        assert!(s.redis.cmd(&["TTL", k]).as_i64().unwrap() > 0, "{k} must expire");
    }
}

#[test]
fn h10_non_ascii_and_invalid_utf8_tenant_ids_are_rejected_and_the_vm_survives() {
    use std::io::{Read, Write};
    let s = stack();
    let before = s.callouts();
    let raw_values: [&[u8]; 5] = [b"caf\xc3\xa9", b"\x80\xff\xfe", b"\xc3", b"acme%20corp", b"\xe7\xa7\x9f\xe6\x88\xb7"];
    for value in raw_values {
        let mut conn = std::net::TcpStream::connect(s.envoy.listener_addr()).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut req = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-tenant-id: ".to_vec();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        conn.write_all(&req).unwrap();
        let mut out = Vec::new();
        conn.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{value:?} -> {text}");
        assert!(text.contains("\"error\":\"invalid_tenant\""), "{text}");
    }
    assert_eq!(s.callouts(), before);
    assert_eq!(s.get("/v1/models", "still-alive").status, 200, "the wasm VM is still serving");
    // Each value was refused by the filter itself (not by Envoy's codec).
    assert_eq!(s.envoy.filter_counter("sluice.invalid_tenant"), raw_values.len() as u64);
}

#[test]
fn h14_per_route_policies_apply_their_cost_limits_and_exemptions() {
    let s = stack();
    // /v1/llm/: cost 5 and a route hour limit of 50 on top of the tier.
    let r = s.get("/v1/llm/complete", "h14");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 50, "the stricter route limit binds");
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 45, "weight 5 was charged");
    let policy = r.header("ratelimit-policy").unwrap();
    assert!(policy.contains("\"llm-hour\";q=50;w=3600"), "{policy}");
    let status = s.service.admin("GET", "/v1/admin/tenants/h14", None).json();
    let hour = status["windows"].as_array().unwrap().iter().find(|w| w["window"] == "hour").unwrap();
    assert_eq!(hour["current"], 5, "the tier hour window was charged 5 units: {status}");

    // /healthz is exempt: no tenant needed, no callout, nothing consumed.
    let before = s.callouts();
    let r = s.envoy.request("GET", "/healthz", &[], None);
    assert_eq!(r.status, 200);
    assert!(r.header("x-ratelimit-limit").is_none());
    assert_eq!(s.callouts(), before);

    // A default route (/v1/models) and a path no rule matches use the default policy: cost 1.
    let r = s.get("/v1/models", "h14");
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 100);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 100 - 5 - 1);
    let r = s.get("/v1/unmatched/thing", "h14");
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 100 - 5 - 2);

    // The chat policy is picked by route name (cost 2), batch by route metadata (cost 10, day 20).
    let r = s.envoy.request("POST", "/v1/chat/completions", &[("x-tenant-id", "h14"), ("content-type", "application/json")], Some(br#"{"model":"gpt-3.5-turbo","messages":[]}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 100 - 5 - 2 - 2);
    let r = s.get("/v1/batch/job", "h14");
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 20);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 10);
    assert_eq!(s.get("/v1/batch/job", "h14").status, 200);
    let r = s.get("/v1/batch/job", "h14");
    assert_eq!(r.status, 429, "the route's day window (20) is used up");
    assert_eq!(r.json()["window"], "batch-day");
}

#[test]
fn with_route_metadata_off_the_route_metadata_chooses_nothing_and_route_names_and_prefixes_still_do() {
    // The shipped policies, with `batch` given a path prefix (a policy only
    // route metadata could choose is refused when route_metadata is off).
    let mut policies = sluice_tests::envoy::shipped_plugin_config()["policies"].clone();
    for p in policies.as_array_mut().unwrap() {
        if p["name"] == "batch" {
            p["path_prefix"] = json!("/v1/nightly/");
        }
    }
    let s = Stack::with(plugin_config(json!({"timeout_ms": 2000, "route_metadata": false, "policies": policies})), 1);
    // /v1/batch/ carries `sluice: {policy: batch}` in its route metadata:
    // not read, so the default policy (cost 1, the tier's hour limit) applies.
    let r = s.get("/v1/batch/job", "rm-off");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 100, "the default policy, not batch's day 20");
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 99);
    // The same policy by its path prefix: cost 10 against its day window of 20.
    let r = s.get("/v1/nightly/job", "rm-off");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 20);
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 10);
    // A route name still chooses: chat costs 2.
    let r = s.envoy.request("POST", "/v1/chat/completions", &[("x-tenant-id", "rm-off"), ("content-type", "application/json")], Some(br#"{"model":"gpt-3.5-turbo","messages":[]}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 100 - 1 - 10 - 2);
    let status = s.service.admin("GET", "/v1/admin/tenants/rm-off", None).json();
    let hour = status["windows"].as_array().unwrap().iter().find(|w| w["window"] == "hour").unwrap();
    assert_eq!(hour["current"], 13, "1 + 10 + 2 units on the tier's hour window: {status}");
}

#[test]
fn h08_exactly_one_of_each_rate_limit_header_even_when_the_upstream_sets_its_own() {
    let s = stack();
    let r = s.envoy.request("GET", "/v1/llm/complete", &[("x-tenant-id", "h08"), ("x-demo-ratelimit-headers", "1")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    for name in ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy", "ratelimit"] {
        assert_eq!(all(&r, name).len(), 1, "{name}: {:?}", r.headers);
    }
    assert_eq!(all(&r, "retry-after").len(), 1);
    assert_eq!(header_u64(&r, "x-ratelimit-limit"), 50, "the most restrictive limit, not the upstream's 999");
    let policy = r.header("ratelimit-policy").unwrap();
    let items: Vec<&str> = policy.split(", ").collect();
    assert_eq!(items.len(), 4, "hour, day, month and the route window in one list: {policy}");
    assert!(items.iter().all(|i| i.starts_with('"') && i.contains(";q=") && i.contains(";w=")), "{policy}");
    assert!(!r.header("ratelimit").unwrap().contains("\"up\""), "the upstream's RateLimit was replaced");
}

#[test]
fn filter_counters_are_exported_to_envoy_prometheus_stats() {
    let s = stack();
    s.set_limits("stats", json!({"hour": 1}));
    s.get("/v1/models", "stats");
    s.get("/v1/models", "stats");
    s.envoy.request("GET", "/v1/models", &[], None);
    s.envoy.request("GET", "/v1/models", &[("x-tenant-id", "a b")], None);
    let p = s.envoy.prometheus();
    assert_eq!(p.sum("sluice_allowed"), 1.0);
    assert_eq!(p.sum("sluice_denied"), 1.0);
    assert_eq!(p.sum("sluice_missing_tenant"), 1.0);
    assert_eq!(p.sum("sluice_invalid_tenant"), 1.0);
    for name in ["sluice_failed_open", "sluice_failed_closed", "sluice_exempt", "sluice_callout_errors"] {
        assert!(p.has(name), "{name} is exported");
    }
    let _: Value = s.upstream.stats();
}

#[test]
fn client_supplied_internal_headers_are_removed_before_the_upstream_sees_them() {
    let s = stack();
    let r = s.envoy.request("GET", "/v1/echo", &[("x-tenant-id", "strip"), ("x-sluice-queue", "1"), ("X-Sluice-Anything", "x")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen: Vec<String> = r.json()["header_names"]
        .as_array()
        .expect("the demo upstream echoes the header names it received")
        .iter()
        .map(|v| v.as_str().unwrap().to_ascii_lowercase())
        .collect();
    assert!(seen.contains(&"x-tenant-id".to_string()), "{seen:?}");
    assert!(!seen.iter().any(|h| h.starts_with("x-sluice-")), "the upstream saw an internal header: {seen:?}");
}
