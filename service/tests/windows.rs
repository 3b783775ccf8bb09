//! Calendar windows, driven by the test clock: boundaries, retry-after,
//! expiry, and the Lua calendar arithmetic at real month ends.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use common::{default_config, epoch, mid_hour_ms, month_len, tiers, RedisServer, Service};
use hyper::{Method, StatusCode};
use serde_json::json;
use sluice_service::scripts;

async fn service_with(redis: &RedisServer, tiers_json: &str) -> Arc<Service> {
    let mut config = default_config(&redis.url());
    config.tiers = tiers(tiers_json);
    Arc::new(Service::start(config).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h03_after_the_hour_rolls_over_the_day_window_still_binds() {
    let redis = RedisServer::start();
    let svc = service_with(&redis, r#"{"tiers":{"free":{"hour":100,"day":150}}}"#).await;
    // Two seconds before the boundary leaves room for a slow burst.
    svc.set_now(&redis, epoch(2031, 3, 12, 10, 59, 58) * 1000)
        .await;
    let (admitted, _) = svc.burst("h03", 100).await;
    assert_eq!(admitted, 100);
    svc.set_now(&redis, epoch(2031, 3, 12, 11, 0, 0) * 1000 + 200)
        .await;
    let (admitted, replies) = svc.burst("h03", 100).await;
    assert_eq!(admitted, 50);
    let day_end = epoch(2031, 3, 13, 0, 0, 0);
    for r in &replies {
        let b = r.json["binding"].as_u64().unwrap() as usize;
        let w = &r.json["windows"][b];
        if r.json["allowed"] == json!(false) {
            // Denied by the day window, which resets last; the hour has room.
            assert_eq!(
                (w["name"].as_str(), w["remaining"].as_u64()),
                (Some("day"), Some(0))
            );
            assert_eq!(w["reset"].as_i64(), Some(day_end));
            assert_eq!(r.json["windows"][0]["remaining"], 50);
            let retry = r.json["retry_after"].as_i64().unwrap();
            assert!((day_end - epoch(2031, 3, 12, 11, 0, 2)
                ..=day_end - epoch(2031, 3, 12, 11, 0, 0))
                .contains(&retry));
        } else {
            // Admitted: the day window has fewer units left than the hour.
            assert_eq!(w["name"], "day");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h03_with_only_an_hour_window_two_full_bursts_straddle_the_boundary() {
    // The documented fixed-window behaviour: 2x the limit within a second.
    let redis = RedisServer::start();
    let svc = service_with(&redis, r#"{"tiers":{"free":{"hour":100}}}"#).await;
    svc.set_now(&redis, epoch(2031, 3, 12, 10, 59, 58) * 1000)
        .await;
    assert_eq!(svc.burst("h03b", 150).await.0, 100);
    svc.set_now(&redis, epoch(2031, 3, 12, 11, 0, 0) * 1000 + 200)
        .await;
    assert_eq!(svc.burst("h03b", 150).await.0, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h06_retry_after_is_whole_seconds_equal_to_the_time_left_in_the_hour() {
    let redis = RedisServer::start();
    let svc = service_with(&redis, r#"{"tiers":{"free":{"hour":5}}}"#).await;
    svc.set_now(&redis, epoch(2031, 3, 12, 10, 20, 0) * 1000)
        .await;
    for _ in 0..5 {
        assert!(svc.admit("h06", 1).await);
    }
    let r = svc.check(json!({"tenant": "h06"})).await;
    assert_eq!(r.json["allowed"], false);
    let retry = r.json["retry_after"].as_u64().unwrap();
    assert!(
        (2399..=2400).contains(&retry),
        "retry_after {retry} should be ~2400 s, never ms"
    );
    let w = &r.json["windows"][0];
    assert_eq!(
        w["reset_in"].as_u64(),
        Some(retry),
        "reset_in and retry_after agree"
    );
    assert_eq!(
        w["reset"].as_i64(),
        Some(epoch(2031, 3, 12, 11, 0, 0)),
        "reset is epoch seconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h07_at_hh_50_retry_after_is_about_600_and_the_next_hour_admits_again() {
    let redis = RedisServer::start();
    let svc = service_with(&redis, r#"{"tiers":{"free":{"hour":10}}}"#).await;
    svc.set_now(&redis, epoch(2031, 3, 12, 10, 49, 0) * 1000)
        .await;
    assert_eq!(svc.burst("h07", 10).await.0, 10);
    svc.set_now(&redis, epoch(2031, 3, 12, 10, 50, 0) * 1000)
        .await;
    let r = svc.check(json!({"tenant": "h07"})).await;
    assert_eq!(r.json["allowed"], false);
    let retry = r.json["retry_after"].as_u64().unwrap();
    assert!(
        (599..=600).contains(&retry),
        "retry_after {retry}, not 3600"
    );
    svc.set_now(&redis, epoch(2031, 3, 12, 11, 0, 1) * 1000)
        .await;
    assert!(svc.admit("h07", 1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h04_every_counter_key_has_a_ttl_until_its_window_end_plus_60s() {
    let redis = RedisServer::start();
    let svc = Arc::new(Service::on(&redis).await);
    let now = mid_hour_ms(); // 10:30:00 on 2031-03-12
    svc.set_now(&redis, now).await;
    svc.admin(
        Method::PUT,
        "/v1/admin/tenants/h04-small/limits",
        Some(json!({"hour": 3})),
    )
    .await;
    for t in ["h04-a", "h04-b", "h04-small"] {
        svc.burst(t, 20).await;
    }
    let route = json!({"tenant": "h04-a", "cost": 3, "policy": "llm",
        "route_limits": [{"window": "hour", "limit": 7}, {"window": "day", "limit": 9}, {"window": "month", "limit": 11}]});
    for _ in 0..5 {
        assert_eq!(svc.check(route.clone()).await.status, StatusCode::OK);
    }
    let keys = redis.keys();
    let counters: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains(":q:") || k.contains(":r:"))
        .collect();
    assert_eq!(counters.len(), 3 * 3 + 3, "{keys:?}");
    let now_s = now / 1000;
    for key in counters {
        let ttl = redis.ttl(key);
        let window_end = if key.contains(":hour:") {
            epoch(2031, 3, 12, 11, 0, 0)
        } else if key.contains(":day:") {
            epoch(2031, 3, 13, 0, 0, 0)
        } else {
            epoch(2031, 4, 1, 0, 0, 0)
        };
        let expected = window_end - now_s + 60;
        assert!(ttl > 0, "{key} has TTL {ttl}");
        assert!(
            (expected - 5..=expected).contains(&ttl),
            "{key}: TTL {ttl}, expected ~{expected}"
        );
    }
    // Every other key has an expiry too, except the documented owners: the
    // tenants' cfg and the tiers document (both written by the admin API).
    for key in &keys {
        if key.ends_with(":cfg") || key == "sluice:{g}:tiers" {
            continue;
        }
        assert!(redis.ttl(key) > 0, "{key} has no TTL");
    }
    // The suspended-by-use tenant is admitted again as soon as the next hour starts.
    svc.set_now(&redis, epoch(2031, 3, 12, 11, 0, 0) * 1000)
        .await;
    assert!(svc.admit("h04-small", 1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn month_windows_follow_real_month_ends_through_the_check_api() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    // (now, expected hour id, day id, month id, month reset)
    let cases = [
        (
            epoch(2024, 1, 31, 23, 59, 30),
            "2024013123",
            "20240131",
            "202401",
            epoch(2024, 2, 1, 0, 0, 0),
        ),
        (
            epoch(2024, 2, 1, 0, 0, 0),
            "2024020100",
            "20240201",
            "202402",
            epoch(2024, 3, 1, 0, 0, 0),
        ),
        (
            epoch(2024, 2, 29, 12, 0, 0),
            "2024022912",
            "20240229",
            "202402",
            epoch(2024, 3, 1, 0, 0, 0),
        ),
        (
            epoch(2023, 2, 28, 23, 0, 0),
            "2023022823",
            "20230228",
            "202302",
            epoch(2023, 3, 1, 0, 0, 0),
        ),
        (
            epoch(2023, 12, 31, 23, 30, 0),
            "2023123123",
            "20231231",
            "202312",
            epoch(2024, 1, 1, 0, 0, 0),
        ),
        (
            epoch(2024, 1, 1, 0, 0, 0),
            "2024010100",
            "20240101",
            "202401",
            epoch(2024, 2, 1, 0, 0, 0),
        ),
    ];
    assert_eq!(epoch(2024, 2, 1, 0, 0, 0), 1_706_745_600);
    for (i, (now, hour_id, day_id, month_id, month_reset)) in cases.into_iter().enumerate() {
        svc.set_now(&redis, now * 1000).await;
        let tenant = format!("cal{i}");
        let r = svc.check(json!({"tenant": tenant})).await;
        let month = &r.json["windows"][2];
        assert_eq!(month["reset"].as_i64(), Some(month_reset), "case {i}");
        let left = month_reset - now;
        assert!(
            (left - 1..=left).contains(&month["reset_in"].as_i64().unwrap()),
            "case {i}"
        );
        for (w, id) in [("hour", hour_id), ("day", day_id), ("month", month_id)] {
            let key = format!("sluice:{{t:{tenant}}}:q:{w}:{id}");
            assert_eq!(
                redis.get(&key),
                Some(1),
                "case {i}: {key} missing in {:?}",
                redis.keys()
            );
        }
    }
}

#[test]
fn the_lua_calendar_matches_plain_day_counting_from_1970_to_2100() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let probe = redis::Script::new(scripts::WINDOWS_PROBE);
    let mut checked = 0;
    for y in 1970..=2100 {
        // Real time runs on between the offset and the probe; a fresh base
        // per year keeps that drift to milliseconds, well inside the margins.
        let base = redis.now_ms();
        for m in 1..=12 {
            let last = month_len(y, m);
            // The first instant of the month, mid-month, and the month's last minute.
            for (d, h, mi, s) in [(1, 0, 0, 0), (15, 13, 7, 9), (last, 23, 59, 0)] {
                let t = epoch(y, m, d, h, mi, s);
                let (hid, hreset, did, dreset, mid, mreset, _ms): (
                    String,
                    i64,
                    String,
                    i64,
                    String,
                    i64,
                    i64,
                ) = probe.arg(t * 1000 - base).invoke(&mut conn).unwrap();
                assert_eq!(
                    hid,
                    format!("{y:04}{m:02}{d:02}{h:02}"),
                    "{y}-{m}-{d} {h}:{mi}:{s}"
                );
                assert_eq!(did, format!("{y:04}{m:02}{d:02}"));
                assert_eq!(mid, format!("{y:04}{m:02}"));
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                assert_eq!(mreset, epoch(ny, nm, 1, 0, 0, 0), "month reset of {y}-{m}");
                assert_eq!(dreset, epoch(y, m, d, 0, 0, 0) + 86_400);
                assert_eq!(hreset, epoch(y, m, d, h, 0, 0) + 3_600);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 131 * 12 * 3);
}
