//! Quota leases against a real Redis: a lease is charged when granted (so it
//! can never over-admit), shrinks to nothing near the limit, and its unspent
//! units go back exactly to the counters it was charged to.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use common::{default_config, mid_hour_ms, tiers, RedisServer, Service};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

fn hour_key(tenant: &str) -> String {
    sluice_service::keys::tier_counter(tenant, sluice_wire::Window::Hour, "2031031210")
}

async fn lease_service(redis: &RedisServer, hour: u64) -> Service {
    let mut config = default_config(&redis.url());
    config.tiers = tiers(&format!(
        r#"{{"default_tier":"t","tiers":{{"t":{{"hour":{hour},"day":100000}}}}}}"#
    ));
    let svc = Service::start(config).await;
    svc.set_now(redis, mid_hour_ms()).await;
    svc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_charged_with_the_request_in_every_window_at_once() {
    let redis = RedisServer::start();
    let svc = lease_service(&redis, 1000).await;
    let r = svc
        .check(json!({"tenant": "l1", "cost": 2, "lease": {"want": 40}}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["allowed"], true);
    let lease = &r.json["lease"];
    assert_eq!(lease["units"], 40, "{}", r.text);
    assert_eq!(lease["charged"], json!(["q:hour:2031031210", "q:day:20310312"]));
    // 30 minutes to the end of the hour.
    let valid = lease["valid_ms"].as_u64().unwrap();
    assert!((1_799_000..=1_800_000).contains(&valid), "valid_ms {valid}");
    assert_eq!(redis.get(&hour_key("l1")), Some(42));
    assert_eq!(r.json["windows"][0]["used"], 42);
    assert_eq!(r.json["windows"][0]["remaining"], 958);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_size_shrinks_to_a_quarter_of_the_room_and_to_nothing_near_the_limit() {
    let redis = RedisServer::start();
    let svc = lease_service(&redis, 100).await;
    let ask = |cost: u64| json!({"tenant": "l2", "cost": cost, "lease": {"want": 64}});
    // Room after this request: 99 -> a quarter is 24.
    let r = svc.check(ask(1)).await;
    assert_eq!(r.json["lease"]["units"], 24, "{}", r.text);
    // Used 25, room 74 -> 18 (a multiple of the cost 3 below 74/4 = 18.5).
    let r = svc.check(ask(3)).await;
    assert_eq!(r.json["lease"]["units"], 18, "{}", r.text);
    // Used 46; keep asking until the lease disappears.
    let mut sizes = Vec::new();
    loop {
        let r = svc.check(ask(1)).await;
        if r.json["allowed"] == false {
            break;
        }
        sizes.push(r.json["lease"]["units"].as_u64().unwrap_or(0));
    }
    assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "sizes only shrink: {sizes:?}");
    assert_eq!(sizes.iter().rev().take(4).copied().collect::<Vec<_>>(), [0, 0, 0, 0], "{sizes:?}");
    assert_eq!(redis.get(&hour_key("l2")), Some(100), "never past the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h01_concurrent_lease_grants_from_two_replicas_never_charge_past_the_limit() {
    let redis = RedisServer::start();
    let a = Arc::new(lease_service(&redis, 500).await);
    let b = Arc::new(lease_service(&redis, 500).await);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            svc.check(json!({"tenant": "l3", "cost": 1, "lease": {"want": 50}})).await
        }));
    }
    let mut units = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        if r.json["allowed"] == true {
            units += 1 + r.json["lease"]["units"].as_u64().unwrap_or(0);
        }
    }
    assert_eq!(units, 500, "requests plus leases add up to the limit exactly");
    assert_eq!(redis.get(&hour_key("l3")), Some(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_units_go_back_to_the_charged_counters_and_never_below_zero() {
    let redis = RedisServer::start();
    let svc = lease_service(&redis, 1000).await;
    let r = svc
        .check(json!({"tenant": "l4", "cost": 1, "policy": "llm",
            "route_limits": [{"window": "day", "limit": 500}], "lease": {"want": 20}}))
        .await;
    let charged = r.json["lease"]["charged"].clone();
    let day = r.json["lease"]["day"].clone();
    assert_eq!(day, "20310312");
    assert_eq!(r.json["lease"]["unit_cost"], 1);
    assert_eq!(charged, json!(["q:hour:2031031210", "q:day:20310312", "r:llm:day:20310312"]));
    let route_key = sluice_service::keys::route_counter("l4", "llm", sluice_wire::Window::Day, "20310312");
    assert_eq!(redis.get(&route_key), Some(21));
    let back = svc
        .request(Method::POST, "/v1/lease/return",
            Some(json!({"returns": [{"tenant": "l4", "units": 15, "spent": 4, "day": day, "charged": charged.clone()}]})), &[])
        .await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.text);
    assert_eq!(back.json["returned"], 15);
    assert_eq!(redis.get(&hour_key("l4")), Some(6));
    assert_eq!(redis.get(&route_key), Some(6));
    assert!(redis.ttl(&hour_key("l4")) > 0, "a return keeps the counter's expiry");
    // The day's rollup books the lease's requests and only the units it kept.
    let rollup = sluice_service::keys::usage_day("l4", "20310312");
    assert_eq!(redis.hget(&rollup, "admitted"), Some(5), "the check plus 4 from the lease");
    assert_eq!(redis.hget(&rollup, "cost"), Some(6), "21 charged, 15 given back");
    // Giving back more than is counted stops at zero.
    let back = svc
        .request(Method::POST, "/v1/lease/return",
            Some(json!({"returns": [{"tenant": "l4", "units": 100, "day": "20310312", "charged": charged}]})), &[])
        .await;
    assert_eq!(back.json["returned"], 6);
    assert_eq!(redis.get(&hour_key("l4")), Some(0));
    // A counter whose window is over is not recreated by a late return.
    let gone = json!(["q:hour:2031031209"]);
    let back = svc
        .request(Method::POST, "/v1/lease/return",
            Some(json!({"returns": [{"tenant": "l4", "units": 5, "day": "20310312", "charged": gone}]})), &[])
        .await;
    assert_eq!(back.json["returned"], 0);
    assert_eq!(redis.get(&sluice_service::keys::tier_counter("l4", sluice_wire::Window::Hour, "2031031209")), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_lease_return_is_a_400_naming_the_field() {
    let redis = RedisServer::start();
    let svc = lease_service(&redis, 1000).await;
    for (body, field) in [
        (json!({"returns": [{"tenant": "a", "units": 1, "day": "20310312", "charged": ["sluice:{t:b}:q:hour:2031031210"]}]}), "returns[0].charged[0]"),
        (json!({"returns": [{"tenant": "a", "units": -1, "day": "20310312", "charged": ["q:hour:2031031210"]}]}), "returns[0].units"),
        (json!({"returns": "x"}), "returns"),
    ] {
        let r = svc.request(Method::POST, "/v1/lease/return", Some(body), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert_eq!(r.json["error"], "invalid_request");
        let msg = r.json["message"].as_str().unwrap_or_default();
        assert!(msg.starts_with(field), "{msg} should name {field}");
    }
    let r = svc.check(json!({"tenant": "a", "lease": {"want": 2_000_000}})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json["message"].as_str().unwrap().starts_with("lease.want"), "{}", r.text);
    let _: Value = r.json;
}
