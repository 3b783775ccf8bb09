//! Fault suite (`make test-faults`): the overflow queue under faults, with
//! real processes, counting every dispatch at the demo upstream by its
//! `x-request-id` (the queue id).
//!
//! - Redis killed with SIGKILL (AOF, `appendfsync always`) and restarted
//!   while work is queued and one request is being dispatched: every
//!   queued request survives, each reaches the upstream exactly once and
//!   is charged once.
//! - H19 across replicas: the replica whose worker is dispatching is
//!   killed with SIGKILL and never comes back; another replica's worker
//!   takes the request over when the lease expires (same `x-request-id`),
//!   serves the backlog, and nothing stays in flight.
//! - H19, cut off: the replica whose worker is dispatching loses its path
//!   to Redis (black-holed) and can not store the answer; another replica
//!   takes the request over when the lease expires (same `x-request-id`),
//!   and the first resumes by itself once the path heals.
//! - Envoy killed with SIGKILL with async and wait-mode requests queued,
//!   then restarted: async requests complete and are readable through the
//!   new Envoy; wait-mode clients lose their connection and their queued
//!   requests are cancelled, never dispatched.
//!
//! (`e2e_queue.rs` covers one replica killed and restarted, SIGTERM, and
//! a dispatch that dies `max_attempts` times; not repeated here.)

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::{http, DemoUpstream, Envoy, EnvoyOpts, Proxy, Redis, Response, Service, ServiceOpts};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const GPU: &str = "/v1/gpu/run";
const ASYNC: (&str, &str) = ("prefer", "respond-async");

fn upstreams(upstream: &DemoUpstream, gpu: Value) -> Value {
    let mut u = json!({"url": format!("http://{}", upstream.addr()), "rate": 1, "burst": 1, "debt": 0});
    for (k, v) in gpu.as_object().unwrap() {
        u[k] = v.clone();
    }
    json!({"upstreams": {"gpu": u}})
}

fn queue_service(redis: &Redis, upstream: &DemoUpstream, gpu: Value, workers: usize) -> Service {
    Service::start(
        &redis.url(),
        ServiceOpts { upstreams: Some(upstreams(upstream, gpu)), queue: true, workers: Some(workers), ..ServiceOpts::default() },
    )
}

fn envoy_for(service: &Service, upstream: &DemoUpstream) -> Envoy {
    // A generous callout timeout: a loaded machine must not turn into fail-open.
    let mut eo = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), service.addr(), upstream.addr());
    eo.queue_addr = service.queue_addr();
    Envoy::start(eo)
}

fn gpu(envoy: &Envoy, tenant: &str, extra: &[(&str, &str)]) -> Response {
    let mut h = vec![("x-tenant-id", tenant)];
    h.extend_from_slice(extra);
    envoy.request("GET", GPU, &h, None)
}

/// The first request of a quiet upstream goes directly; the bucket is then empty.
fn drain_bucket(envoy: &Envoy, tenant: &str) {
    let r = gpu(envoy, tenant, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-sluice-request-id").is_none(), "it went directly");
}

/// An async request that was queued: its id.
fn queue_async(envoy: &Envoy, tenant: &str, extra: &[(&str, &str)]) -> String {
    let mut h = vec![ASYNC];
    h.extend_from_slice(extra);
    let r = gpu(envoy, tenant, &h);
    assert_eq!(r.status, 202, "queued async: {} {:?}", r.text(), r.headers);
    let location = r.header("location").expect("Location");
    location.rsplit('/').next().unwrap().to_string()
}

/// Reads `GET /v1/queue/requests/<id>` at `addr` (Envoy or a queue
/// listener) until it is answered. While a fault lasts the read may fail or
/// answer 503 `queue_unavailable`; nothing else is accepted.
fn result(addr: SocketAddr, id: &str, tenant: &str, within: Duration) -> Response {
    let path = format!("/v1/queue/requests/{id}");
    let deadline = Instant::now() + within;
    loop {
        match http::request(addr, "GET", &path, &[("x-tenant-id", tenant)], None, Duration::from_secs(10)) {
            Ok(r) if r.status == 202 => assert_eq!(r.json()["id"], id),
            Ok(r) if r.status == 503 => assert_eq!(r.json()["error"], "queue_unavailable", "{}", r.text()),
            Ok(r) => return r,
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "{id} not answered within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn seen(upstream: &DemoUpstream, id: &str) -> u64 {
    upstream.stats()["by_request_id"][id].as_u64().unwrap_or(0)
}

fn poll(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn stats(service: &Service) -> Value {
    let r = service.get("/v1/queue/stats");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["upstreams"]["gpu"].clone()
}

fn hour_used(service: &Service, tenant: &str) -> u64 {
    let r = service.admin("GET", &format!("/v1/admin/tenants/{tenant}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["windows"].as_array().unwrap().iter().find(|w| w["window"] == "hour").unwrap()["current"].as_u64().unwrap()
}

fn metric(service: &Service, name: &str, labels: &[(&str, &str)]) -> f64 {
    sluice_tests::PromMetrics::parse(&service.metrics()).get(name, labels).unwrap_or(0.0)
}

#[test]
fn redis_sigkilled_with_work_queued_and_in_dispatch_loses_nothing_and_dispatches_each_request_once() {
    let mut redis = Redis::start_persistent();
    let upstream = DemoUpstream::start();
    // 2 requests/s; a 5 s lease comfortably outlasts the outage.
    let gpu_cfg = json!({"rate": 2, "burst": 1, "dispatch_timeout_ms": 4000, "lease_ms": 5000});
    let service = queue_service(&redis, &upstream, gpu_cfg, 1);
    // Mid-hour on the service's clock: the hour counts below stay in one window.
    service.set_clock_offset_ms(offset_to(next_hour_ms(5) - 1_800_000));
    let envoy = envoy_for(&service, &upstream);
    drain_bucket(&envoy, "drain");
    let tenants = ["rk-a", "rk-b", "rk-c"];
    let mut queued: Vec<(String, &str)> = Vec::new();
    for i in 0..9 {
        let t = tenants[i % 3];
        // Each dispatch takes 600 ms at the upstream, so one is in flight when Redis dies.
        queued.push((queue_async(&envoy, t, &[("x-demo-delay-ms", "600")]), t));
    }
    poll("a dispatch is in flight", Duration::from_secs(15), || queued.iter().any(|(id, _)| seen(&upstream, id) == 1));

    redis.kill();
    // Down for longer than the in-flight dispatch takes: its worker holds the
    // answer while Redis is gone and must store it once Redis is back.
    std::thread::sleep(Duration::from_millis(2000));
    // Meanwhile new work is refused cleanly (the check fails: the gpu route fails open
    // to the upstream, or the queue answers 503), never a 500.
    let during = gpu(&envoy, "rk-new", &[ASYNC]);
    assert!(during.status != 500, "{} {}", during.status, during.text());
    redis.restart();

    for (id, tenant) in &queued {
        let r = result(envoy.listener_addr(), id, tenant, Duration::from_secs(60));
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(r.json()["request_id"], id.as_str(), "the upstream's own answer");
        assert_eq!(seen(&upstream, id), 1, "{id} reached the upstream exactly once");
    }
    for t in tenants {
        assert_eq!(hour_used(&service, t), 3, "{t}: each queued request charged once");
    }
    let s = stats(&service);
    assert_eq!((s["depth"].as_u64(), s["in_flight"].as_u64()), (Some(0), Some(0)), "nothing stuck: {s}");
    assert_every_key_expires(&redis);
}

#[test]
fn h19_a_replica_sigkilled_mid_dispatch_is_taken_over_by_another_replica_within_the_lease() {
    let redis = Redis::start();
    let upstream = DemoUpstream::start();
    let gpu_cfg = json!({"rate": 2, "burst": 1, "dispatch_timeout_ms": 3000, "lease_ms": 3500});
    let mut a = queue_service(&redis, &upstream, gpu_cfg.clone(), 1);
    let envoy = envoy_for(&a, &upstream);
    drain_bucket(&envoy, "drain");
    // The first one is slow at the upstream: A's worker is inside it when A dies.
    let slow = queue_async(&envoy, "h19r", &[("x-demo-delay-ms", "2000")]);
    let rest: Vec<String> = (0..4).map(|_| queue_async(&envoy, "h19r", &[])).collect();
    poll("A's worker dispatches the slow request", Duration::from_secs(15), || seen(&upstream, &slow) == 1);

    // B joins (same Redis, its own listeners), then A is killed and stays dead.
    let b = queue_service(&redis, &upstream, gpu_cfg, 1);
    a.kill();
    let queue_b = b.queue_addr().unwrap();
    let r = result(queue_b, &slow, "h19r", Duration::from_secs(30));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["request_id"], slow.as_str());
    assert_eq!(seen(&upstream, &slow), 2, "replayed once by B, with the same x-request-id");
    for id in &rest {
        let r = result(queue_b, id, "h19r", Duration::from_secs(30));
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(seen(&upstream, id), 1, "{id}: once");
    }
    let s = stats(&b);
    assert_eq!((s["depth"].as_u64(), s["in_flight"].as_u64()), (Some(0), Some(0)), "the dead replica's slot was released: {s}");
    assert_eq!(metric(&b, "sluice_queue_requeued_total", &[("upstream", "gpu"), ("reason", "lease_expired")]), 1.0);
    assert_eq!(hour_used(&b, "h19r"), 5, "H05: the replay was not charged again");
}

#[test]
fn h19_a_replica_cut_off_from_redis_mid_dispatch_is_taken_over_within_the_lease_and_resumes_when_healed() {
    let redis = Redis::start();
    let upstream = DemoUpstream::start();
    // The slow dispatch (5 s) outlasts B's start on a loaded machine, so A is
    // still inside it when its path to Redis is cut.
    let gpu_cfg = json!({"rate": 2, "burst": 1, "dispatch_timeout_ms": 6000, "lease_ms": 6500});
    // A reaches Redis through a proxy that can black-hole the path (nothing
    // is closed: packets just stop), B directly.
    let proxy = Proxy::start(redis.addr());
    let a = Service::start(
        &proxy.redis_url(),
        ServiceOpts {
            upstreams: Some(upstreams(&upstream, gpu_cfg.clone())),
            queue: true,
            workers: Some(1),
            redis_timeout_ms: Some(500),
            ..ServiceOpts::default()
        },
    );
    let envoy = envoy_for(&a, &upstream);
    drain_bucket(&envoy, "drain");
    let slow = queue_async(&envoy, "h19c", &[("x-demo-delay-ms", "5000")]);
    let rest: Vec<String> = (0..3).map(|_| queue_async(&envoy, "h19c", &[])).collect();
    poll("A's worker dispatches the slow request", Duration::from_secs(15), || seen(&upstream, &slow) == 1);

    let b = queue_service(&redis, &upstream, gpu_cfg, 1);
    proxy.black_hole();
    // A's worker gets its answer but can not store it; when the lease ends,
    // B's worker puts the request back and replays it with the same id.
    let queue_b = b.queue_addr().unwrap();
    let r = result(queue_b, &slow, "h19c", Duration::from_secs(30));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["request_id"], slow.as_str());
    assert_eq!(seen(&upstream, &slow), 2, "replayed once by B, with the same x-request-id");
    for id in &rest {
        let r = result(queue_b, id, "h19c", Duration::from_secs(30));
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(seen(&upstream, id), 1, "{id}: once");
    }

    // Healed, A is ready again by itself and dispatches nothing twice.
    proxy.heal();
    poll("A is ready again", Duration::from_secs(15), || a.get("/readyz").status == 200);
    // Envoy's checks go to A: decided (rate-limit headers), not failed open.
    let r = envoy.request("GET", "/v1/models", &[("x-tenant-id", "h19c-after")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"), "A decided it: {:?}", r.headers);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(seen(&upstream, &slow), 2, "A never sent the taken-over request again");
    let s = stats(&b);
    assert_eq!((s["depth"].as_u64(), s["in_flight"].as_u64()), (Some(0), Some(0)), "nothing stuck: {s}");
    assert_eq!(metric(&b, "sluice_queue_requeued_total", &[("upstream", "gpu"), ("reason", "lease_expired")]), 1.0);
    assert_eq!(hour_used(&b, "h19c"), 4, "H05: the replay was not charged again");
}

#[test]
fn envoy_sigkilled_with_requests_queued_completes_async_work_and_never_dispatches_abandoned_wait_mode_requests() {
    let redis = Redis::start();
    let upstream = DemoUpstream::start();
    // No workers yet: everything stays queued while Envoy dies.
    let mut service = queue_service(&redis, &upstream, json!({}), 0);
    let mut envoy = envoy_for(&service, &upstream);
    drain_bucket(&envoy, "drain");
    let async_ids: Vec<String> = (0..3).map(|_| queue_async(&envoy, "ek-async", &[])).collect();
    let listener = envoy.listener_addr();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                http::request(listener, "GET", GPU, &[("x-tenant-id", "ek-wait")], None, Duration::from_secs(60)).map(|r| (r.status, r.text()))
            })
        })
        .collect();
    poll("the wait-mode requests are queued", Duration::from_secs(15), || stats(&service)["depth"] == 6);

    envoy.kill();
    for w in waiters {
        // Nobody is left to answer: the connection is cut, never a made-up status.
        let outcome = w.join().unwrap();
        assert!(outcome.is_err(), "a wait-mode client got an answer from a dead Envoy: {outcome:?}");
    }
    poll("the abandoned wait-mode requests are cancelled", Duration::from_secs(15), || stats(&service)["depth"] == 3);
    assert_eq!(metric(&service, "sluice_queue_rejections_total", &[("upstream", "gpu"), ("reason", "cancelled")]), 3.0);

    envoy.restart();
    service.restart_with_workers(1);
    for id in &async_ids {
        let r = result(envoy.listener_addr(), id, "ek-async", Duration::from_secs(30));
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(seen(&upstream, id), 1);
    }
    // A request after the restart goes through the queue: workers run.
    let probe = queue_async(&envoy, "ek-probe", &[]);
    assert_eq!(result(envoy.listener_addr(), &probe, "ek-probe", Duration::from_secs(30)).status, 200);
    assert_eq!(admitted(&upstream, "ek-wait"), 0, "no abandoned wait-mode request was dispatched");
    assert_eq!(admitted(&upstream, "ek-async"), 3);
    assert_eq!(stats(&service)["depth"], 0);
}
