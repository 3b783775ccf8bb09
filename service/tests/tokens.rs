//! Token budgets and the storage quota against a real Redis: atomic
//! reservation at admission, reconciliation (idempotent, floored at 0, in
//! the windows of the reservation), aborted responses, storage denials.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use common::{default_config, epoch, mid_hour_ms, tiers, RedisServer, Service};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sluice_service::keys;
use sluice_wire::Window;

const TIERS: &str = r#"{"default_tier":"llm","tiers":{
    "llm":{"hour":1000,"tokens_hour":1000,"tokens_month":5000,"storage_bytes":10}}}"#;

async fn svc(redis: &RedisServer) -> Arc<Service> {
    let mut config = default_config(&redis.url());
    config.tiers = tiers(TIERS);
    let s = Arc::new(Service::start(config).await);
    s.set_now(redis, mid_hour_ms()).await;
    s
}

fn hour_key(tenant: &str) -> String {
    format!("{}hour:2031031210", keys::token_counter_prefix(tenant))
}

fn month_key(tenant: &str) -> String {
    format!("{}month:203103", keys::token_counter_prefix(tenant))
}

/// Reserves `tokens` and returns the reservation id.
async fn reserve(s: &Service, tenant: &str, tokens: u64) -> String {
    let r = s.check(json!({"tenant": tenant, "tokens": tokens})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["allowed"], true, "{}", r.text);
    assert_eq!(r.json["reservation"]["tokens"], tokens);
    r.json["reservation"]["id"].as_str().unwrap().to_string()
}

async fn report(s: &Service, tenant: &str, id: &str, total: u64, complete: bool) -> Value {
    let r = s
        .request(
            Method::POST,
            "/v1/usage",
            Some(json!({"tenant": tenant, "reservation": id, "total_tokens": total, "complete": complete})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h02_concurrent_estimates_are_reserved_atomically_so_at_most_the_budget_is_admitted() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.check(json!({"tenant": "h02", "tokens": 300})).await }));
    }
    let mut admitted = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        if r.json["allowed"] == true {
            admitted += 1;
            assert!(r.json["reservation"]["id"].is_string());
        } else {
            let b = r.json["binding"].as_u64().unwrap() as usize;
            assert_eq!(r.json["windows"][b]["name"], "tokens_hour", "{}", r.text);
            assert!(r.json.get("reservation").is_none());
        }
    }
    assert_eq!(admitted, 3, "1000 tokens hold three reservations of 300");
    // Token denials are counted under their own reason, not as route windows.
    let m = s.request(Method::GET, "/metrics", None, &[]).await.text;
    assert!(m.contains("sluice_rejections_total{reason=\"tokens_hour\"} 7"), "{m}");
    assert!(m.contains("sluice_rejections_total{reason=\"route_hour\"} 0"), "{m}");
    assert_eq!(redis.get(&hour_key("h02")), Some(900));
    assert_eq!(redis.get(&month_key("h02")), Some(900));
    // The request windows count requests, not tokens.
    assert_eq!(
        redis.get(&keys::tier_counter("h02", Window::Hour, "2031031210")),
        Some(3)
    );
}

#[tokio::test]
async fn reconciliation_replaces_the_reservation_once_and_a_replay_changes_nothing() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    let id = reserve(&s, "rec", 300).await;
    assert_eq!(
        report(&s, "rec", &id, 250, true).await,
        json!({"status": "settled", "reserved": 300, "charged": 250})
    );
    assert_eq!(redis.get(&hour_key("rec")), Some(250), "only the difference is refunded");
    assert_eq!(redis.get(&month_key("rec")), Some(250));
    assert_eq!(
        report(&s, "rec", &id, 10, true).await,
        json!({"status": "duplicate", "reserved": 300, "charged": 250})
    );
    assert_eq!(redis.get(&hour_key("rec")), Some(250), "a replay applies nothing");
    // More than reserved is charged on top.
    let id2 = reserve(&s, "rec", 100).await;
    report(&s, "rec", &id2, 400, true).await;
    assert_eq!(redis.get(&hour_key("rec")), Some(650));
    // An id that was never handed out changes nothing.
    assert_eq!(report(&s, "rec", "999", 1, true).await["status"], "unknown");
    assert_eq!(redis.get(&hour_key("rec")), Some(650));
}

#[tokio::test]
async fn a_settled_reservation_is_kept_only_briefly_so_token_traffic_leaves_no_hour_of_records() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    let id = reserve(&s, "ttl", 100).await;
    let key = keys::reservation("ttl", &id);
    let open = redis.ttl(&key);
    assert!(open > 3000, "an open reservation waits up to an hour for its report: ttl {open}");
    report(&s, "ttl", &id, 90, true).await;
    let settled = redis.ttl(&key);
    assert!((1..=sluice_service::config::SETTLED_TTL_S as i64).contains(&settled), "settled ttl {settled}");
    // A replay within that time is still recognised, and changes nothing.
    assert_eq!(report(&s, "ttl", &id, 5, true).await["status"], "duplicate");
    assert!(redis.ttl(&key) <= settled, "a replay does not lengthen it");
    let _: i64 = redis::cmd("DEL").arg(&key).query(&mut redis.conn()).unwrap();
    assert_eq!(report(&s, "ttl", &id, 5, true).await["status"], "unknown");
    assert_eq!(redis.get(&hour_key("ttl")), Some(90), "after it expired a replay is unknown and changes nothing");
}

#[tokio::test]
async fn h15_a_refund_never_drives_a_counter_below_zero() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    let id = reserve(&s, "floor", 300).await;
    // Something else (an admin reset, a lost key) took the counter down.
    let _: () = redis::cmd("SET").arg(hour_key("floor")).arg(100).arg("KEEPTTL").query(&mut redis.conn()).unwrap();
    report(&s, "floor", &id, 0, true).await;
    assert_eq!(redis.get(&hour_key("floor")), Some(0));
    assert_eq!(redis.get(&month_key("floor")), Some(0));
}

#[tokio::test]
async fn h17_an_incomplete_response_is_charged_at_least_its_reservation() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    let id = reserve(&s, "cut", 300).await;
    assert_eq!(report(&s, "cut", &id, 100, false).await["charged"], 300);
    assert_eq!(redis.get(&hour_key("cut")), Some(300));
    let id = reserve(&s, "cut", 100).await;
    assert_eq!(report(&s, "cut", &id, 250, false).await["charged"], 250);
    assert_eq!(redis.get(&hour_key("cut")), Some(550));
}

#[tokio::test]
async fn a_report_after_the_hour_rolled_over_corrects_the_hour_it_was_reserved_in() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    s.set_now(&redis, epoch(2031, 3, 12, 10, 59, 59) * 1000).await;
    let id = reserve(&s, "roll", 300).await;
    s.set_now(&redis, epoch(2031, 3, 12, 11, 0, 5) * 1000).await;
    // The new hour starts empty: a second reservation fits in full.
    let r = s.check(json!({"tenant": "roll", "tokens": 1000})).await;
    assert_eq!(r.json["allowed"], true, "{}", r.text);
    report(&s, "roll", &id, 100, true).await;
    let prefix = keys::token_counter_prefix("roll");
    assert_eq!(redis.get(&format!("{prefix}hour:2031031210")), Some(100));
    assert_eq!(redis.get(&format!("{prefix}hour:2031031211")), Some(1000), "the new hour is untouched");
    assert_eq!(redis.get(&format!("{prefix}month:203103")), Some(1100));
}

#[tokio::test]
async fn every_token_key_expires_and_a_custom_token_limit_applies() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    let id = reserve(&s, "ttl", 10).await;
    for key in [
        hour_key("ttl"),
        month_key("ttl"),
        keys::reservation("ttl", &id),
        keys::reservation_seq("ttl"),
    ] {
        let ttl = redis.ttl(&key);
        assert!(ttl > 0, "{key} has TTL {ttl}");
    }
    assert!(redis.ttl(&keys::reservation("ttl", &id)) <= 3_600);
    let r = s.admin(Method::PUT, "/v1/admin/tenants/ttl/limits", Some(json!({"tokens_month": 15}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = s.check(json!({"tenant": "ttl", "tokens": 6})).await;
    assert_eq!(r.json["allowed"], false, "{}", r.text);
    let b = r.json["binding"].as_u64().unwrap() as usize;
    assert_eq!(r.json["windows"][b]["name"], "tokens_month");
    assert_eq!(r.json["windows"][b]["limit"], 15);
    let view = s.admin(Method::GET, "/v1/admin/tenants/ttl", None).await;
    let names: Vec<&str> = view.json["windows"].as_array().unwrap().iter().map(|w| w["window"].as_str().unwrap()).collect();
    assert_eq!(names, ["hour", "tokens_hour", "tokens_month"]);
    assert_eq!(view.json["windows"][2]["current"], 10);
}

#[tokio::test]
async fn a_check_without_tokens_neither_counts_nor_is_blocked_by_tokens() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    let r = s.admin(Method::PUT, "/v1/admin/tenants/plain/limits", Some(json!({"tokens_hour": 0}))).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = s.check(json!({"tenant": "plain"})).await;
    assert_eq!(r.json["allowed"], true, "{}", r.text);
    assert!(r.json.get("reservation").is_none());
    assert_eq!(r.json["windows"].as_array().unwrap().len(), 1);
    assert_eq!(redis.get(&hour_key("plain")), None);
}

#[tokio::test]
async fn uploads_are_refused_at_or_over_the_storage_quota_and_other_routes_are_not() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    let set = |bytes: u64| {
        let s = s.clone();
        async move {
            let r = s.admin(Method::PUT, "/v1/admin/tenants/st/storage", Some(json!({"used_bytes": bytes}))).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            r
        }
    };
    let r = set(9).await;
    assert_eq!(r.json["storage"], json!({"used_bytes": 9, "limit_bytes": 10}));
    let r = s.check(json!({"tenant": "st", "upload": true})).await;
    assert_eq!(r.json["allowed"], true, "{}", r.text);
    assert_eq!(r.json["storage"], json!({"used": 9, "limit": 10, "exceeded": false}));
    set(10).await;
    let r = s.check(json!({"tenant": "st", "upload": true})).await;
    assert_eq!(r.json["allowed"], false, "{}", r.text);
    assert_eq!(r.json["storage"]["exceeded"], true);
    assert_eq!(
        redis.get(&keys::tier_counter("st", Window::Hour, "2031031210")),
        Some(1),
        "a refused upload counts nothing"
    );
    assert_eq!(s.check(json!({"tenant": "st"})).await.json["allowed"], true);
    assert_eq!(redis.ttl(&keys::storage("st")), -1, "owned by the application, no expiry");
    let r = s.admin(Method::DELETE, "/v1/admin/tenants/st/storage", None).await;
    assert_eq!(r.json["storage"]["used_bytes"], 0);
    assert_eq!(s.check(json!({"tenant": "st", "upload": true})).await.json["allowed"], true);
    let r = s.admin(Method::PUT, "/v1/admin/tenants/st/storage", Some(json!({"used_bytes": -1}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json["message"].as_str().unwrap().starts_with("used_bytes"), "{}", r.text);
    let r = s.request(Method::PUT, "/v1/admin/tenants/st/storage", Some(json!({"used_bytes": 1})), &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the storage API is admin-only");
}

#[tokio::test]
async fn bad_usage_reports_and_token_estimates_are_400s_naming_the_field() {
    let redis = RedisServer::start();
    let s = svc(&redis).await;
    for (body, field) in [
        (json!({"tenant": "a", "reservation": "1", "total_tokens": -5}), "total_tokens"),
        (json!({"tenant": "a", "reservation": "x1", "total_tokens": 5}), "reservation"),
        (json!({"tenant": "a", "reservation": "1", "total_tokens": 2_000_000_000u64}), "total_tokens"),
        (json!({"tenant": "a b", "reservation": "1", "total_tokens": 5}), "tenant"),
    ] {
        let r = s.request(Method::POST, "/v1/usage", Some(body.clone()), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.json["message"].as_str().unwrap().starts_with(field), "{body}: {}", r.text);
    }
    let r = s.check(json!({"tenant": "a", "tokens": 2_000_000_000u64})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json["message"].as_str().unwrap().starts_with("tokens"), "{}", r.text);
}
