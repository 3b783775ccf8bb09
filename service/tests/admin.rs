//! The admin API: authentication, tenant validation, and that every change
//! applies to the very next check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{default_config, mid_hour_ms, RedisServer, Service, TOKEN};
use hyper::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_without_a_valid_bearer_token_get_401_and_wrong_tokens_get_403() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    let path = "/v1/admin/tenants/acme";
    let r = svc.request(Method::GET, path, None, &[]).await;
    assert_eq!(
        (r.status, r.error()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    for malformed in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        TOKEN,
        "Bearer a b",
    ] {
        let r = svc
            .request(Method::GET, path, None, &[("authorization", malformed)])
            .await;
        assert_eq!(
            (r.status, r.error()),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{malformed:?}"
        );
    }
    for wrong in [
        "Bearer wrong",
        "Bearer test-admin-toke",
        "Bearer test-admin-tokenX",
    ] {
        let r = svc
            .request(Method::GET, path, None, &[("authorization", wrong)])
            .await;
        assert_eq!(
            (r.status, r.error()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{wrong:?}"
        );
        assert!(!r.text.contains(TOKEN));
    }
    let ok = format!("bearer {TOKEN}");
    let r = svc
        .request(Method::GET, path, None, &[("authorization", ok.as_str())])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Writes are guarded the same way.
    let r = svc
        .request(
            Method::PUT,
            "/v1/admin/tenants/acme/tier",
            Some(json!({"tier": "pro"})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        !redis.keys().iter().any(|k| k.starts_with("sluice:{t:")),
        "an unauthorized write changed nothing: {:?}",
        redis.keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_without_a_configured_token_answers_503_admin_disabled() {
    let redis = RedisServer::start();
    let mut config = default_config(&redis.url());
    config.admin_tokens.clear();
    let svc = Service::start(config).await;
    for auth in [None, Some(format!("Bearer {TOKEN}"))] {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let r = svc
            .request(Method::GET, "/v1/admin/tiers", None, &headers)
            .await;
        assert_eq!(
            (r.status, r.error()),
            (StatusCode::SERVICE_UNAVAILABLE, "admin_disabled")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rejects_tenants_outside_the_safe_set_in_the_path_with_400() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    let long = "x".repeat(129);
    for t in [
        "a%20b",
        "%7Ba%7D",
        "caf%C3%A9",
        "a%2Cb",
        "%FF",
        long.as_str(),
    ] {
        let r = svc
            .admin(Method::GET, &format!("/v1/admin/tenants/{t}"), None)
            .await;
        assert_eq!(
            (r.status, r.error()),
            (StatusCode::BAD_REQUEST, "invalid_tenant"),
            "{t}: {}",
            r.text
        );
        let r = svc
            .admin(
                Method::PUT,
                &format!("/v1/admin/tenants/{t}/tier"),
                Some(json!({"tier": "pro"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{t}");
    }
    // Percent-encoded safe bytes are fine: the decoded id is what counts.
    let r = svc
        .admin(Method::GET, "/v1/admin/tenants/a%40b", None)
        .await;
    assert_eq!(
        (r.status, r.json["tenant"].as_str()),
        (StatusCode::OK, Some("a@b"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_change_applies_to_the_next_check_and_unknown_tiers_are_rejected() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.set_now(&redis, mid_hour_ms()).await;
    let r = svc.check(json!({"tenant": "t"})).await;
    assert_eq!(
        (
            r.json["tier"].as_str(),
            r.json["windows"][0]["limit"].as_u64()
        ),
        (Some("free"), Some(100))
    );

    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/t/tier",
            Some(json!({"tier": "pro"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["tier"], "pro");
    assert_eq!(r.json["windows"][0]["current"], 1);
    let r = svc.check(json!({"tenant": "t"})).await;
    assert_eq!(
        (
            r.json["tier"].as_str(),
            r.json["windows"][0]["limit"].as_u64()
        ),
        (Some("pro"), Some(1000))
    );

    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/t/tier",
            Some(json!({"tier": "platinum"})),
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (StatusCode::BAD_REQUEST, "unknown_tier")
    );
    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/t/tier",
            Some(json!({"tier": "pro", "x": 1})),
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let r = svc
        .admin(Method::PUT, "/v1/admin/tenants/t/tier", None)
        .await;
    assert_eq!(
        (r.status, r.error()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

/// The view's `custom_limits`: every limit name, null unless set.
fn custom(set: serde_json::Value) -> serde_json::Value {
    let mut all = serde_json::Map::new();
    for def in sluice_service::config::LIMITS {
        all.insert(def.name.to_string(), set.get(def.name).cloned().unwrap_or(serde_json::Value::Null));
    }
    serde_json::Value::Object(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_limits_override_the_tier_per_window_null_clears_and_delete_restores_the_tier() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.set_now(&redis, mid_hour_ms()).await;
    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/c/limits",
            Some(json!({"hour": 5000, "day": 7})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json["custom_limits"],
        custom(json!({"hour": 5000, "day": 7}))
    );
    let r = svc.check(json!({"tenant": "c"})).await;
    let limits: Vec<u64> = r.json["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["limit"].as_u64().unwrap())
        .collect();
    assert_eq!(limits, vec![5000, 7, 20000]);

    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/c/limits",
            Some(json!({"day": null})),
        )
        .await;
    assert_eq!(
        r.json["custom_limits"],
        custom(json!({"hour": 5000}))
    );
    let r = svc.check(json!({"tenant": "c"})).await;
    assert_eq!(r.json["windows"][1]["limit"], 1000);

    let r = svc
        .admin(Method::DELETE, "/v1/admin/tenants/c/limits", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json["custom_limits"],
        custom(json!({}))
    );
    let r = svc.check(json!({"tenant": "c"})).await;
    assert_eq!(r.json["windows"][0]["limit"], 100);

    for bad in [
        json!({"hours": 1}),
        json!({"hour": -1}),
        json!({"hour": 1.5}),
        json!({}),
        json!({"hour": "5"}),
    ] {
        let r = svc
            .admin(Method::PUT, "/v1/admin/tenants/c/limits", Some(bad.clone()))
            .await;
        assert_eq!(
            (r.status, r.error()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_view_reports_current_limit_remaining_percent_and_reset() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.set_now(&redis, mid_hour_ms()).await;
    for _ in 0..3 {
        assert!(svc.admit("v", 10).await);
    }
    let r = svc.admin(Method::GET, "/v1/admin/tenants/v", None).await;
    let hour = &r.json["windows"][0];
    assert_eq!(hour["window"], "hour");
    assert_eq!(
        (
            hour["current"].as_u64(),
            hour["limit"].as_u64(),
            hour["remaining"].as_u64()
        ),
        (Some(30), Some(100), Some(70))
    );
    assert_eq!(hour["percent"], json!(30.0));
    assert_eq!(
        hour["reset"].as_i64().unwrap(),
        common::epoch(2031, 3, 12, 11, 0, 0)
    );
    let reset_in = hour["reset_in"].as_i64().unwrap();
    assert!((1799..=1800).contains(&reset_in), "{reset_in}");
    assert_eq!(
        r.json["windows"][2]["reset"].as_i64().unwrap(),
        common::epoch(2031, 4, 1, 0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tiers_lists_the_configured_tiers_and_the_default() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    let r = svc.admin(Method::GET, "/v1/admin/tiers", None).await;
    assert_eq!(r.json["default_tier"], "free");
    assert_eq!(
        r.json["tiers"]["pro"],
        json!({"hour": 1000, "day": 10000, "month": 200000, "tokens_month": 5000000, "storage_bytes": 50000000000u64, "weight": 2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_clock_route_is_404_unless_enabled() {
    let redis = RedisServer::start();
    let mut config = default_config(&redis.url());
    config.enable_test_clock = false;
    let svc = Service::start(config).await;
    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/test-clock",
            Some(json!({"offset_ms": 5})),
        )
        .await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "not_found"));

    let enabled = Service::on(&redis).await;
    let r = enabled
        .request(
            Method::PUT,
            "/v1/admin/test-clock",
            Some(json!({"offset_ms": 5})),
            &[],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the test clock is an admin route"
    );
    let r = enabled
        .admin(
            Method::PUT,
            "/v1/admin/test-clock",
            Some(json!({"offset_ms": 86_400_000})),
        )
        .await;
    assert_eq!(
        (r.status, &r.json),
        (StatusCode::OK, &json!({"offset_ms": 86_400_000}))
    );
    let r = enabled
        .admin(
            Method::PUT,
            "/v1/admin/test-clock",
            Some(json!({"offset_ms": i64::MAX})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}
