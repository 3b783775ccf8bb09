//! The decision endpoint over HTTP against a real Redis: exact admission
//! under concurrency, what a rejection costs, zero limits, validation and
//! the JSON shape of every error.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use common::{default_config, mid_hour_ms, tiers, RedisServer, Service};
use hyper::{Method, StatusCode, Version};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h01_exactly_the_limit_is_admitted_under_200_concurrent_checks_across_two_replicas() {
    let redis = RedisServer::start();
    let a = Arc::new(Service::on(&redis).await);
    let b = Arc::new(Service::on(&redis).await);
    for s in [&a, &b] {
        s.set_now(&redis, mid_hour_ms()).await;
    }
    // Free tier: hour limit 100.
    let (ra, rb) = tokio::join!(a.burst("h01", 100), b.burst("h01", 100));
    assert_eq!(ra.0 + rb.0, 100, "admitted across both replicas");
    let hour_key =
        sluice_service::keys::tier_counter("h01", sluice_wire::Window::Hour, "2031031210");
    assert_eq!(redis.get(&hour_key), Some(100));
    // Every denial reports the hour window as binding with nothing left.
    for r in
        ra.1.iter()
            .chain(rb.1.iter())
            .filter(|r| r.json["allowed"] == json!(false))
    {
        let binding = r.json["binding"].as_u64().unwrap() as usize;
        assert_eq!(r.json["windows"][binding]["name"], "hour");
        assert_eq!(r.json["windows"][binding]["remaining"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h05_rejected_checks_consume_nothing_so_an_upgrade_admits_exactly_the_difference() {
    let redis = RedisServer::start();
    let mut config = default_config(&redis.url());
    config.tiers = tiers(
        r#"{"default_tier":"free","tiers":{"free":{"hour":1000,"month":10},"plus":{"hour":1000,"month":20}}}"#,
    );
    let svc = Arc::new(Service::start(config).await);
    svc.set_now(&redis, mid_hour_ms()).await;
    let (admitted, _) = svc.burst("h05", 50).await;
    assert_eq!(admitted, 10);
    let month_key = sluice_service::keys::tier_counter("h05", sluice_wire::Window::Month, "203103");
    assert_eq!(
        redis.get(&month_key),
        Some(10),
        "40 rejections must not count"
    );

    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/h05/tier",
            Some(json!({"tier": "plus"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (admitted, _) = svc.burst("h05", 11).await;
    assert_eq!(admitted, 10);

    // The same through a custom limit instead of a tier change.
    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/h05/limits",
            Some(json!({"month": 25})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (admitted, _) = svc.burst("h05", 8).await;
    assert_eq!(admitted, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h16_a_zero_limit_denies_every_check_with_sane_numbers_and_counts_nothing() {
    let redis = RedisServer::start();
    let svc = Arc::new(Service::on(&redis).await);
    svc.set_now(&redis, mid_hour_ms()).await;
    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/h16/limits",
            Some(json!({"hour": 0})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (admitted, replies) = svc.burst("h16", 300).await;
    assert_eq!(admitted, 0);
    for r in &replies {
        let b = r.json["binding"].as_u64().unwrap() as usize;
        let w = &r.json["windows"][b];
        assert_eq!(
            (
                w["name"].as_str(),
                w["limit"].as_u64(),
                w["remaining"].as_u64()
            ),
            (Some("hour"), Some(0), Some(0))
        );
        assert!(r.json["retry_after"].as_u64().unwrap() >= 1);
    }
    assert!(
        !redis
            .keys()
            .iter()
            .any(|k| k.contains(":q:") || k.contains(":r:")),
        "no counter for a suspended tenant: {:?}",
        redis.keys()
    );
    let status = svc.admin(Method::GET, "/v1/admin/tenants/h16", None).await;
    assert_eq!(status.json["windows"][0]["percent"], json!(100.0));

    // A tier whose window is 0 behaves the same (created at runtime).
    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tiers/zero",
            Some(json!({"hour": 0, "day": 10})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/h16-tier/tier",
            Some(json!({"tier": "zero"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(!svc.admit("h16-tier", 1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_limits_count_per_policy_next_to_the_tier_windows() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.set_now(&redis, mid_hour_ms()).await;
    let req = json!({"tenant": "rl", "cost": 2, "policy": "llm", "route_limits": [{"window": "hour", "limit": 5}]});
    for _ in 0..2 {
        let r = svc.check(req.clone()).await;
        assert_eq!(r.json["allowed"], true, "{}", r.text);
        assert_eq!(r.json["binding"], 3);
        assert_eq!(r.json["windows"][3]["name"], "llm-hour");
    }
    let r = svc.check(req.clone()).await;
    assert_eq!(r.json["allowed"], false);
    assert_eq!(r.json["windows"][3]["used"], 4);
    assert_eq!(
        r.json["windows"][0]["used"], 4,
        "tier hour untouched by the denial"
    );
    // Another policy has its own counter; the tier windows are shared.
    let other = json!({"tenant": "rl", "cost": 2, "policy": "chat", "route_limits": [{"window": "hour", "limit": 5}]});
    let r = svc.check(other).await;
    assert_eq!(r.json["allowed"], true);
    assert_eq!(r.json["windows"][0]["used"], 6);
    assert_eq!(redis.get("sluice:{t:rl}:r:llm:hour:2031031210"), Some(4));
    assert_eq!(redis.get("sluice:{t:rl}:r:chat:hour:2031031210"), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h09_an_unknown_tenant_gets_the_default_tier_and_leaves_only_expiring_keys() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    let r = svc.check(json!({"tenant": "never-seen-before"})).await;
    assert_eq!(r.json["tier"], "free");
    assert_eq!(r.json["windows"][0]["limit"], 100);
    for key in redis.keys() {
        // The tiers document has an owner (the admin API), not a TTL.
        if key == "sluice:{g}:tiers" {
            continue;
        }
        assert!(redis.ttl(&key) > 0, "{key} has no TTL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h10_invalid_checks_answer_400_json_that_names_the_field() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"tenant": "a", "cost": 0}), "invalid_request", "cost"),
        (
            json!({"tenant": "a", "cost": 1_000_001}),
            "invalid_request",
            "cost",
        ),
        (
            json!({"tenant": "a", "cost": -5}),
            "invalid_request",
            "cost",
        ),
        (
            json!({"tenant": "a", "cost": "5"}),
            "invalid_request",
            "cost",
        ),
        (json!({"cost": 1}), "invalid_request", "tenant"),
        (json!({"tenant": ""}), "invalid_tenant", "tenant"),
        (json!({"tenant": "a b"}), "invalid_tenant", "tenant"),
        (json!({"tenant": "a,b"}), "invalid_tenant", "tenant"),
        (json!({"tenant": "{a}"}), "invalid_tenant", "tenant"),
        (json!({"tenant": "café"}), "invalid_tenant", "tenant"),
        (json!({"tenant": "%C3%A9"}), "invalid_tenant", "tenant"),
        (
            json!({"tenant": "x".repeat(129)}),
            "invalid_tenant",
            "tenant",
        ),
        (
            json!({"tenant": "a", "policy": "no spaces"}),
            "invalid_request",
            "policy",
        ),
        (
            json!({"tenant": "a", "policy": "p", "route_limits": [{"window": "week", "limit": 1}]}),
            "invalid_request",
            "route_limits[0].window",
        ),
        (
            json!({"tenant": "a", "policy": "p", "route_limits": vec![json!({"window": "hour", "limit": 1}); 9]}),
            "invalid_request",
            "route_limits",
        ),
    ];
    for (body, code, field) in cases {
        let r = svc.check(body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.error(), code, "{body}: {}", r.text);
        assert!(
            r.json["message"].as_str().unwrap().contains(field),
            "{body}: {}",
            r.text
        );
        assert_eq!(r.headers["content-type"], "application/json");
    }
    for raw in [
        "{bad",
        "",
        "[]",
        "null",
        "{\"tenant\":\"a\"} trailing",
        "\u{0080}",
    ] {
        let r = svc.raw(Method::POST, "/v1/check", raw).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{raw:?}");
        assert_eq!(r.error(), "invalid_request", "{raw:?}: {}", r.text);
    }
    let big = format!("{{\"tenant\":\"a\",\"pad\":\"{}\"}}", "x".repeat(100_000));
    let r = svc.raw(Method::POST, "/v1/check", &big).await;
    assert_eq!(
        (r.status, r.error()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_json_errors() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    let r = svc.request(Method::GET, "/nope", None, &[]).await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "not_found"));
    let r = svc.request(Method::GET, "/v1/check", None, &[]).await;
    assert_eq!(
        (r.status, r.error()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let r = svc
        .request(Method::GET, "/v1/admin/nothing-here", None, &[])
        .await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_and_http1_are_served_on_the_same_port() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    let body = json!({"tenant": "h2c"}).to_string();
    let url = svc.url("/v1/check");
    let h2 = svc
        .http
        .send(true, Method::POST, &url, Some(body.clone()), &[])
        .await;
    assert_eq!(h2.version, Version::HTTP_2);
    assert_eq!(
        (h2.status, &h2.json["allowed"]),
        (StatusCode::OK, &json!(true))
    );
    let h1 = svc
        .http
        .send(false, Method::POST, &url, Some(body), &[])
        .await;
    assert_eq!(h1.version, Version::HTTP_11);
    assert_eq!(h1.json["windows"][0]["used"], 2);
    let bad = svc
        .http
        .send(true, Method::POST, &url, Some("{".into()), &[])
        .await;
    assert_eq!(
        (bad.status, bad.error()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_checks_by_result_without_tenant_labels() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.set_now(&redis, mid_hour_ms()).await;
    svc.admin(
        Method::PUT,
        "/v1/admin/tenants/m/limits",
        Some(json!({"hour": 1})),
    )
    .await;
    assert!(svc.admit("m", 1).await);
    assert!(!svc.admit("m", 1).await);
    svc.check(json!({"tenant": ""})).await;
    let r = svc.request(Method::GET, "/metrics", None, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for line in [
        "sluice_checks_total{result=\"allowed\"} 1",
        "sluice_checks_total{result=\"denied\"} 1",
        "sluice_checks_total{result=\"invalid\"} 1",
        "sluice_checks_total{result=\"error\"} 0",
        "sluice_admin_changes_total{action=\"set_limits\"} 1",
        "sluice_check_duration_seconds_count 3",
        "sluice_redis_errors_total{op=\"check\"} 0",
    ] {
        assert!(
            r.text.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            r.text
        );
    }
    for line in r.text.lines().filter(|l| l.contains("tenant=")) {
        assert!(
            line.starts_with("sluice_tenant_quota_utilization_ratio{")
                || line.starts_with("sluice_queue_depth{"),
            "tenant labels only on the bounded top-N metrics: {line}"
        );
    }
    assert!(r
        .text
        .contains(r#"sluice_tenant_quota_utilization_ratio{tenant="m",window="hour"} 1"#));
    assert!(r.text.contains(r#"sluice_rejections_total{reason="hour"} 1"#));
}
