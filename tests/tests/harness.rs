//! The harness itself: the whole stack comes up on free ports, a request
//! flows through the filter, counters are readable, and Redis can be stopped,
//! restarted and paused as failure tests need.

use serde_json::json;
use sluice_tests::envoy::shipped_plugin_config;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, RespValue, Service, ServiceOpts};

#[test]
fn the_whole_stack_starts_and_a_tenant_request_is_admitted_and_counted() {
    let redis = Redis::start();
    let service = Service::start(&redis.url(), ServiceOpts::default());
    let upstream = DemoUpstream::start();
    let envoy = Envoy::start(EnvoyOpts::new(
        shipped_plugin_config(),
        service.addr(),
        upstream.addr(),
    ));

    let r = envoy.request("GET", "/v1/models", &[("x-tenant-id", "acme")], None);
    assert_eq!(r.status, 200, "body: {}", r.text());
    let r = envoy.request("GET", "/v1/models", &[], None);
    assert_eq!(r.status, 401, "a request without tenant: {}", r.text());

    assert_eq!(envoy.filter_counter("sluice.allowed"), 1);
    assert_eq!(envoy.prometheus().sum("sluice_allowed"), 1.0);
    assert_eq!(envoy.filter_counter("sluice.missing_tenant"), 1);
    assert!(envoy.stat("cluster.sluice_quota.upstream_rq_200") >= 1);
    assert!(
        envoy.stat("cluster.sluice_quota.upstream_cx_http2_total") >= 1,
        "the callout must use h2c"
    );

    let stats = upstream.stats();
    assert!(stats.is_object(), "demo upstream stats: {stats}");
    let r = service.admin("GET", "/v1/admin/tenants/acme", None);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn redis_can_be_stopped_restarted_and_paused_keeping_persistent_data() {
    let mut redis = Redis::start_persistent();
    assert_eq!(
        redis.cmd(&["SET", "k", "v"]),
        RespValue::Simple("OK".into())
    );
    redis.restart();
    assert_eq!(redis.cmd(&["GET", "k"]).as_string().as_deref(), Some("v"));
    redis.pause();
    assert!(
        redis.command(&["PING"]).is_err(),
        "a paused redis must not answer"
    );
    redis.resume();
    redis.stop();
    assert!(
        redis.command(&["PING"]).is_err(),
        "a stopped redis must refuse connections"
    );
}

#[test]
fn the_service_takes_a_tiers_file_and_the_test_clock() {
    let redis = Redis::start();
    let tiers = json!({"default_tier": "tiny", "tiers": {"tiny": {"hour": 2, "day": 10, "month": 100,
        "tokens_month": 1000, "storage_bytes": 1000}}});
    let service = Service::start(
        &redis.url(),
        ServiceOpts {
            tiers: Some(tiers),
            ..ServiceOpts::default()
        },
    );
    let r = service.admin("GET", "/v1/admin/tiers", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("tiny"), "tiers: {}", r.text());
    service.set_clock_offset_ms(3_600_000);
}
