//! Redis failures: down, black-holed, frozen, restarted, script cache
//! flushed. The service must answer fast 503s and recover by itself.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::{fast_config, free_port, RedisServer, Service};
use hyper::{Method, StatusCode};
use serde_json::json;

/// How long a failing check may take: the 250 ms timeout plus slack for a
/// loaded 2-core CI machine.
const FAST: Duration = Duration::from_millis(1500);

async fn timed_check(svc: &Service, tenant: &str) -> (common::Reply, Duration) {
    let started = Instant::now();
    let r = svc.check(json!({"tenant": tenant})).await;
    (r, started.elapsed())
}

async fn wait_until_admitting(svc: &Service, tenant: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let r = svc.check(json!({"tenant": tenant})).await;
        if r.status == StatusCode::OK {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "service did not recover: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_redis_unavailable_fast_and_readyz_says_so() {
    let port = free_port();
    let svc = Service::start(fast_config(&format!("redis://127.0.0.1:{port}/"))).await;
    for _ in 0..3 {
        let (r, took) = timed_check(&svc, "down").await;
        assert_eq!(
            (r.status, r.error()),
            (StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable"),
            "{}",
            r.text
        );
        assert!(r.json["message"].is_string());
        assert!(took < FAST, "took {took:?}");
    }
    let r = svc.request(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = svc.request(Method::GET, "/healthz", None, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = svc.admin(Method::GET, "/v1/admin/tenants/x", None).await;
    assert_eq!(
        (r.status, r.error()),
        (StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable")
    );
    let m = svc.request(Method::GET, "/metrics", None, &[]).await;
    assert!(
        m.text.contains("sluice_checks_total{result=\"error\"} 3"),
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_redis_that_accepts_but_never_answers_yields_503_within_the_timeout() {
    // Accepts connections and reads nothing back: a firewall drop after connect.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hole.local_addr().unwrap().port();
    let svc = Service::start(fast_config(&format!("redis://127.0.0.1:{port}/"))).await;
    for _ in 0..3 {
        let (r, took) = timed_check(&svc, "hole").await;
        assert_eq!(
            (r.status, r.error()),
            (StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable")
        );
        assert!(took < FAST, "took {took:?}");
    }
    drop(hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_yields_fast_503s_and_the_service_recovers_when_it_resumes() {
    let redis = RedisServer::start();
    let svc = Service::start(fast_config(&redis.url())).await;
    assert!(svc.admit("frozen", 1).await);
    redis.pause();
    for _ in 0..3 {
        let (r, took) = timed_check(&svc, "frozen").await;
        assert_eq!(
            (r.status, r.error()),
            (StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable")
        );
        assert!(took < FAST, "took {took:?}");
    }
    let r = svc.request(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    redis.resume();
    wait_until_admitting(&svc, "frozen", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_reconnects_and_reloads_its_scripts_after_redis_restarts() {
    let mut redis = RedisServer::start();
    let svc = Service::start(fast_config(&redis.url())).await;
    assert!(svc.admit("restart", 1).await);
    let r = svc.request(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(r.status, StatusCode::OK);

    redis.kill();
    let (r, took) = timed_check(&svc, "restart").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < FAST, "took {took:?}");
    let r = svc.request(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);

    // A fresh Redis has an empty script cache: EVALSHA meets NOSCRIPT and reloads.
    redis.restart();
    wait_until_admitting(&svc, "restart", Duration::from_secs(5)).await;
    let r = svc.request(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_keep_working_after_script_flush() {
    let redis = RedisServer::start();
    let svc = Service::start(fast_config(&redis.url())).await;
    assert!(svc.admit("flush", 1).await);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.conn())
        .unwrap();
    let r = svc.check(json!({"tenant": "flush"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["windows"][0]["used"], 2);
    let r = svc
        .admin(Method::GET, "/v1/admin/tenants/flush", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
}
