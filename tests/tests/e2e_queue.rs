//! The fair overflow queue end to end: real Envoy (the filter re-routes
//! overflow to the queue cluster by a header), the quota service with its
//! queue listener and workers, Redis and the demo upstream. Cases H05
//! (second half), H13 (second half), H18 and H19.
//!
//! The upstream `gpu` (the shipped `/v1/gpu/` policy) gets 1 request/s,
//! burst 1, no debt unless a test says otherwise: the first request of a
//! quiet upstream goes directly, the next overflows, so every test knows
//! which requests queue.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::http;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, Response, Service, ServiceOpts};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const GPU: &str = "/v1/gpu/run";
const ASYNC: (&str, &str) = ("prefer", "respond-async");

struct Q {
    envoy: Envoy,
    upstream: DemoUpstream,
    service: Service,
    _redis: Redis,
}

struct Opts {
    /// Changes to the `gpu` upstream of the service's upstreams file.
    gpu: Value,
    workers: usize,
    /// Changes to the shipped `gpu` policy of the plugin config.
    policy: Value,
    /// Changes to the top level of the plugin config.
    plugin: Value,
    tiers: Option<Value>,
    extra_args: Vec<String>,
    with_queue_listener: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            gpu: json!({}),
            workers: 1,
            policy: json!({}),
            plugin: json!({}),
            tiers: None,
            extra_args: Vec::new(),
            with_queue_listener: true,
        }
    }
}

fn start(o: Opts) -> Q {
    let redis = Redis::start();
    let upstream = DemoUpstream::start();
    let mut gpu = json!({"url": format!("http://{}", upstream.addr()), "rate": 1, "burst": 1, "debt": 0});
    merge(&mut gpu, &o.gpu);
    let service = Service::start(
        &redis.url(),
        ServiceOpts {
            upstreams: Some(json!({"upstreams": {"gpu": gpu}})),
            queue: o.with_queue_listener,
            workers: Some(o.workers),
            tiers: o.tiers,
            extra_args: o.extra_args,
            ..ServiceOpts::default()
        },
    );
    // A generous callout timeout: a loaded machine must not turn into fail-open.
    let mut plugin = json!({"timeout_ms": 2000});
    merge(&mut plugin, &o.plugin);
    let mut cfg = plugin_config(plugin);
    let policies = cfg["policies"].as_array_mut().unwrap();
    let gpu_policy = policies.iter_mut().find(|p| p["name"] == "gpu").expect("the shipped gpu policy");
    merge(gpu_policy, &o.policy);
    let mut eo = EnvoyOpts::new(cfg, service.addr(), upstream.addr());
    eo.queue_addr = service.queue_addr();
    let envoy = Envoy::start(eo);
    Q { envoy, upstream, service, _redis: redis }
}

fn merge(base: &mut Value, changes: &Value) {
    for (k, v) in changes.as_object().unwrap() {
        base[k] = v.clone();
    }
}

impl Q {
    fn gpu(&self, tenant: &str, extra: &[(&str, &str)]) -> Response {
        let mut h = vec![("x-tenant-id", tenant)];
        h.extend_from_slice(extra);
        self.envoy.request("GET", GPU, &h, None)
    }

    /// One request that goes directly: the bucket is then empty.
    fn drain_bucket(&self, tenant: &str) {
        let r = self.gpu(tenant, &[]);
        assert_eq!(r.status, 200, "the first request of a quiet upstream goes directly: {}", r.text());
        assert!(r.header("x-sluice-request-id").is_none(), "it did not go through the queue");
    }

    /// An async request that must be queued: its Location.
    fn queue_async(&self, tenant: &str, extra: &[(&str, &str)]) -> String {
        let mut h = vec![ASYNC];
        h.extend_from_slice(extra);
        let r = self.gpu(tenant, &h);
        assert_eq!(r.status, 202, "queued async: {} {:?}", r.text(), r.headers);
        let location = r.header("location").expect("Location").to_string();
        assert_eq!(r.json()["location"], location.as_str());
        location
    }

    /// Proves workers run: a request of `tenant` that goes through the
    /// queue is answered 200 (one that happens to go directly is retried).
    fn served_through_the_queue(&self, tenant: &str) {
        for _ in 0..5 {
            let r = self.gpu(tenant, &[ASYNC]);
            match r.status {
                202 => {
                    let l = r.header("location").unwrap().to_string();
                    assert_eq!(self.result(&l, tenant, Duration::from_secs(10)).status, 200);
                    return;
                }
                200 => continue,
                s => panic!("{tenant}: {s} {}", r.text()),
            }
        }
        panic!("{tenant} never went through the queue");
    }

    fn read(&self, location: &str, tenant: &str) -> Response {
        self.envoy.request("GET", location, &[("x-tenant-id", tenant)], None)
    }

    /// Polls an async request until it has its answer.
    fn result(&self, location: &str, tenant: &str, within: Duration) -> Response {
        let deadline = Instant::now() + within;
        loop {
            let r = self.read(location, tenant);
            if r.status != 202 {
                return r;
            }
            assert_eq!(r.json()["id"], location.rsplit('/').next().unwrap());
            assert!(Instant::now() < deadline, "{location} still pending after {within:?}: {}", r.text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stats(&self) -> Value {
        let r = self.service.get("/v1/queue/stats");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["upstreams"]["gpu"].clone()
    }

    fn seen(&self, request_id: &str) -> u64 {
        self.upstream.stats()["by_request_id"][request_id].as_u64().unwrap_or(0)
    }

    fn admitted(&self, tenant: &str) -> u64 {
        admitted(&self.upstream, tenant)
    }

    fn hour_used(&self, tenant: &str) -> u64 {
        let r = self.service.admin("GET", &format!("/v1/admin/tenants/{tenant}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["windows"].as_array().unwrap().iter().find(|w| w["window"] == "hour").unwrap()["current"]
            .as_u64()
            .unwrap()
    }
}

fn poll(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn id_of(location: &str) -> String {
    location.rsplit('/').next().unwrap().to_string()
}

fn metric(service: &Service, name: &str, labels: &[(&str, &str)]) -> f64 {
    sluice_tests::PromMetrics::parse(&service.metrics()).get(name, labels).unwrap_or(0.0)
}

#[test]
fn overflow_reaches_the_queue_and_comes_back_with_the_upstreams_answer_in_wait_mode() {
    let q = start(Opts::default());
    q.drain_bucket("wait");
    let t = Instant::now();
    let r = q.gpu("wait", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.header("x-sluice-request-id").expect("the answer came from the queue").to_string();
    let echo = r.json();
    assert_eq!(echo["path"], GPU);
    assert_eq!(echo["tenant"], "wait");
    assert_eq!(echo["request_id"], id.as_str(), "the dispatch carries x-request-id = the queue id");
    let names: Vec<&str> = echo["header_names"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(names.iter().all(|n| !n.starts_with("x-sluice-") && !n.starts_with("x-envoy-")), "{names:?}");
    for h in ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit", "ratelimit-policy"] {
        assert_eq!(all(&r, h).len(), 1, "exactly one {h} (from the dispatch-time charge): {:?}", r.headers);
    }
    assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 98, "two requests charged of the free tier's 100");
    assert_eq!(all(&r, "content-type"), ["application/json"], "the upstream's content-type, once: {:?}", r.headers);
    assert!(t.elapsed() >= Duration::from_millis(300), "it waited for capacity ({:?})", t.elapsed());
    assert_eq!(q.envoy.filter_counter("sluice.queued"), 1);
    assert_eq!(q.admitted("wait"), 2);
    assert_eq!(metric(&q.service, "sluice_queue_enqueued_total", &[("upstream", "gpu"), ("mode", "wait")]), 1.0);
    assert_eq!(metric(&q.service, "sluice_queue_dispatches_total", &[("upstream", "gpu"), ("result", "ok")]), 1.0);
    assert_eq!(q.stats()["depth"], 0);
}

#[test]
fn async_mode_answers_202_with_a_location_and_the_answer_is_readable_only_by_its_tenant() {
    let q = start(Opts::default());
    q.drain_bucket("owner");
    let location = q.queue_async("owner", &[]);
    let id = id_of(&location);
    assert!(location.starts_with("/v1/queue/requests/") && id.len() == 32, "{location}");
    let r = q.result(&location, "owner", Duration::from_secs(10));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-sluice-queue-status"), Some("done"));
    assert_eq!(all(&r, "content-type"), ["application/json"], "the upstream's content-type, once: {:?}", r.headers);
    assert_eq!(r.json()["request_id"], id.as_str(), "the upstream's own answer");
    assert!(r.header("x-ratelimit-limit").is_some());
    // Another tenant, a made-up id, no tenant: never a hint that it exists.
    let other = q.read(&location, "intruder");
    assert_eq!((other.status, other.json()["error"].clone()), (404, json!("not_found")));
    let made_up = q.read(&format!("/v1/queue/requests/{}", "0".repeat(32)), "owner");
    assert_eq!(made_up.status, 404);
    assert_eq!(made_up.text(), other.text(), "unknown and foreign ids look the same");
    assert_eq!(q.envoy.request("GET", &location, &[], None).status, 401);
    assert_eq!(q.seen(&id), 1);
    assert_eq!(q.hour_used("owner"), 2, "reading results costs no quota");
}

#[test]
fn an_async_result_expires_after_the_upstreams_result_ttl() {
    let q = start(Opts { gpu: json!({"result_ttl_s": 1}), ..Opts::default() });
    q.drain_bucket("ttl");
    let location = q.queue_async("ttl", &[]);
    let r = q.result(&location, "ttl", Duration::from_secs(10));
    assert_eq!(r.status, 200, "{}", r.text());
    let key = format!("sluice:{{u:gpu}}:it:{}", id_of(&location));
    let ttl = q._redis.cmd(&["PTTL", &key]).as_i64().unwrap();
    assert!(ttl > 0 && ttl <= 1000, "the stored answer lives result_ttl_s: PTTL {ttl}");
    poll("the result expires", Duration::from_secs(5), || q.read(&location, "ttl").status == 404);
    assert_eq!(q.read(&location, "ttl").json()["error"], "not_found");
    assert_eq!(q.seen(&id_of(&location)), 1);
}

#[test]
fn bounds_answer_queue_full_429_and_system_overloaded_503_with_retry_after() {
    let q = start(Opts {
        workers: 0,
        gpu: json!({"tenant_queue_depth": 2, "global_queue_depth": 3}),
        ..Opts::default()
    });
    q.drain_bucket("a");
    q.queue_async("a", &[]);
    q.queue_async("a", &[]);
    let full = q.gpu("a", &[ASYNC]);
    assert_eq!(full.status, 429, "{}", full.text());
    assert_eq!(full.json()["error"], "queue_full");
    assert!(header_u64(&full, "retry-after") >= 1);
    assert_eq!(full.json()["retry_after"].as_u64(), Some(header_u64(&full, "retry-after")));
    q.queue_async("b", &[]);
    for tenant in ["b", "c"] {
        let over = q.gpu(tenant, &[ASYNC]);
        assert_eq!(over.status, 503, "{}", over.text());
        assert_eq!(over.json()["error"], "system_overloaded");
        assert!(header_u64(&over, "retry-after") >= 1);
    }
    let stats = q.stats();
    assert_eq!(stats["depth"], 3);
    let depths: Vec<(String, u64)> = stats["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tenant"].as_str().unwrap().to_string(), t["depth"].as_u64().unwrap()))
        .collect();
    assert_eq!(depths, [("a".to_string(), 2), ("b".to_string(), 1)], "nothing queued was evicted");
    assert_eq!(q.envoy.filter_counter("sluice.overflow_rejected"), 3);
    assert_eq!(q.admitted("a") + q.admitted("b") + q.admitted("c"), 1);
}

#[test]
fn h18_a_light_tenant_is_served_while_a_heavy_one_is_backlogged() {
    let q = start(Opts { workers: 2, gpu: json!({"rate": 20, "burst": 1}), ..Opts::default() });
    // A floods: 1000 async requests over 16 connections.
    let statuses = fire(&[q.envoy.listener_addr()], 1000, 16, "GET", GPU, &[("x-tenant-id", "A"), ASYNC]);
    let queued = count(&statuses, 202);
    assert!(count(&statuses, 429) >= 800, "A hit its bound of 100: {} 429s", count(&statuses, 429));
    assert_eq!(queued + count(&statuses, 429) + count(&statuses, 200), 1000, "{statuses:?}");
    let a_depth = q.stats()["tenants"][0]["depth"].as_u64().unwrap();
    assert!(a_depth >= 80, "A is backlogged ({a_depth})");
    // Every 429 of A says when to come back.
    let refused = (0..50).map(|_| q.gpu("A", &[ASYNC])).find(|r| r.status == 429).expect("A is at its bound");
    assert_eq!(refused.json()["error"], "queue_full");
    assert!(header_u64(&refused, "retry-after") >= 1);

    // Then B sends 10: none is refused, all are served long before A's backlog.
    let sent_before = q.upstream.stats()["arrivals"].as_array().unwrap().len();
    let mut b_locations = Vec::new();
    for _ in 0..10 {
        let r = q.gpu("B", &[ASYNC]);
        match r.status {
            202 => b_locations.push(r.header("location").unwrap().to_string()),
            200 => {} // under its share: admitted directly
            s => panic!("B got {s}: {}", r.text()),
        }
    }
    for l in &b_locations {
        assert_eq!(q.result(l, "B", Duration::from_secs(10)).status, 200);
    }
    assert_eq!(q.admitted("B"), 10);
    let a_left = q.stats()["tenants"].as_array().unwrap().iter().find(|t| t["tenant"] == "A").map_or(0, |t| t["depth"].as_u64().unwrap());
    assert!(a_left >= 40, "B finished while A still had {a_left} queued");
    // B's first request started within two DRR rounds of being queued: at
    // most two of A's (one per worker) reached the upstream before it.
    let arrivals = q.upstream.stats()["arrivals"].as_array().unwrap().clone();
    let first_b = arrivals.iter().position(|t| t == "B").unwrap();
    assert!(first_b - sent_before <= 3, "{} of A's went before B's first", first_b - sent_before);
}

#[test]
fn h19_a_worker_killed_mid_dispatch_is_requeued_within_the_lease_and_replayed_with_the_same_request_id() {
    let mut q = start(Opts {
        gpu: json!({"dispatch_timeout_ms": 3000, "lease_ms": 3500}),
        ..Opts::default()
    });
    q.drain_bucket("h19");
    let location = q.queue_async("h19", &[("x-demo-delay-ms", "1500")]);
    let id = id_of(&location);
    poll("the dispatch reached the upstream", Duration::from_secs(10), || q.seen(&id) == 1);
    q.service.kill();
    q.service.restart();
    let t = Instant::now();
    let r = q.result(&location, "h19", Duration::from_secs(15));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(8), "requeued within the lease, took {:?}", t.elapsed());
    assert_eq!(q.seen(&id), 2, "replayed once, with the same x-request-id");
    assert_eq!(r.json()["request_id"], id.as_str());
    let stats = q.stats();
    assert_eq!((stats["depth"].as_u64(), stats["in_flight"].as_u64()), (Some(0), Some(0)), "nothing stuck: {stats}");
    assert_eq!(metric(&q.service, "sluice_queue_requeued_total", &[("upstream", "gpu"), ("reason", "lease_expired")]), 1.0);
    assert_eq!(q.hour_used("h19"), 2, "H05: the replay was not charged again");
}

#[test]
fn h19_a_request_whose_dispatch_dies_max_attempts_times_fails_with_a_visible_502() {
    let mut q = start(Opts {
        gpu: json!({"dispatch_timeout_ms": 3000, "lease_ms": 3500, "max_attempts": 1}),
        ..Opts::default()
    });
    q.drain_bucket("h19f");
    let location = q.queue_async("h19f", &[("x-demo-delay-ms", "1500")]);
    let id = id_of(&location);
    poll("the dispatch reached the upstream", Duration::from_secs(10), || q.seen(&id) == 1);
    q.service.kill();
    q.service.restart();
    let r = q.result(&location, "h19f", Duration::from_secs(10));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "dispatch_failed");
    assert_eq!(r.header("x-sluice-queue-status"), Some("failed"));
    assert_eq!(q.seen(&id), 1);
    assert_eq!(q.stats()["in_flight"], 0, "the slot was released");
}

#[test]
fn h19_sigterm_lets_an_in_flight_dispatch_finish_or_puts_it_back_and_exits() {
    let mut q = start(Opts { extra_args: vec!["--worker-drain-ms".into(), "300".into()], ..Opts::default() });
    q.drain_bucket("term");
    // Finishes within the drain: stored, the upstream saw it once.
    let quick = q.queue_async("term", &[("x-demo-delay-ms", "100")]);
    let quick_id = id_of(&quick);
    // Longer than the 300 ms drain: put back, dispatched again after restart.
    let slow = q.queue_async("term", &[("x-demo-delay-ms", "1500")]);
    let slow_id = id_of(&slow);
    poll("the slow dispatch reached the upstream", Duration::from_secs(10), || q.seen(&slow_id) == 1);
    let status = q.service.terminate(Duration::from_secs(12)).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    q.service.restart();
    assert_eq!(q.result(&quick, "term", Duration::from_secs(5)).status, 200);
    assert_eq!(q.seen(&quick_id), 1);
    let r = q.result(&slow, "term", Duration::from_secs(10));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(q.seen(&slow_id), 2, "the put-back request was replayed with the same x-request-id");
    assert_eq!(q.hour_used("term"), 3, "each charged once");
}

#[test]
fn queued_requests_survive_a_service_restart_in_async_mode() {
    let mut q = start(Opts { workers: 0, ..Opts::default() });
    q.drain_bucket("keep");
    let locations: Vec<String> = (0..3).map(|_| q.queue_async("keep", &[])).collect();
    assert_eq!(q.stats()["depth"], 3);
    let status = q.service.terminate(Duration::from_secs(12)).expect("exits after SIGTERM");
    assert!(status.success());
    q.service.restart_with_workers(1);
    for l in &locations {
        let r = q.result(l, "keep", Duration::from_secs(15));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(q.seen(&id_of(l)), 1);
    }
    assert_eq!(q.admitted("keep"), 4);
}

#[test]
fn a_request_dispatched_from_the_queue_lists_its_tenant_in_the_days_usage_index_and_utilisation() {
    let mut q = start(Opts { workers: 0, ..Opts::default() });
    q.drain_bucket("only-queued");
    let l = q.queue_async("only-queued", &[]);
    // As if the check had been made on an earlier day (a request deferred
    // to the day's reset): today's index does not list the tenant.
    let index = q._redis.cmd(&["KEYS", "sluice:{g}:u:idx:*"]).strings();
    assert_eq!(index.len(), 1, "{index:?}");
    q._redis.cmd(&["DEL", &index[0]]);
    q.service.restart_with_workers(1);
    assert_eq!(q.result(&l, "only-queued", Duration::from_secs(15)).status, 200);
    poll("the dispatch indexes the tenant", Duration::from_secs(5), || {
        q._redis.cmd(&["SISMEMBER", &index[0], "only-queued"]).as_i64() == Some(1)
    });
    let export = q.service.admin("GET", "/v1/admin/usage?format=json", None);
    assert!(export.text().contains("only-queued"), "the all-tenant export lists it: {}", export.text());
    // The restarted replica decided no check for it: the gauge comes from the dispatch.
    let used = metric(&q.service, "sluice_tenant_quota_utilization_ratio", &[("tenant", "only-queued"), ("window", "hour")]);
    assert!((used - 0.02).abs() < 1e-9, "2 of the free tier's 100 an hour: {used}");
}

#[test]
fn a_timed_out_wait_mode_request_gets_503_queue_timeout_and_is_never_dispatched_later() {
    let mut q = start(Opts { workers: 0, policy: json!({"max_wait_ms": 700}), ..Opts::default() });
    q.drain_bucket("late");
    let t = Instant::now();
    let r = q.gpu("late", &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "queue_timeout");
    assert!(header_u64(&r, "retry-after") >= 1);
    assert!(t.elapsed() >= Duration::from_millis(600), "it waited its max wait ({:?})", t.elapsed());
    assert_eq!(q.stats()["depth"], 0, "removed when it timed out");
    // Workers start; a later request of another tenant is served, proving
    // they run, and the timed-out one never reaches the upstream.
    q.service.restart_with_workers(1);
    q.served_through_the_queue("probe");
    assert_eq!(q.admitted("late"), 1, "only the direct one");
    assert_eq!(metric(&q.service, "sluice_queue_dispatches_total", &[("upstream", "gpu"), ("result", "ok")]), 1.0, "only the probe");
}

#[test]
fn a_client_that_disconnects_while_waiting_cancels_its_queued_request() {
    let mut q = start(Opts { workers: 0, ..Opts::default() });
    q.drain_bucket("gone");
    let mut conn = TcpStream::connect(q.envoy.listener_addr()).unwrap();
    write!(conn, "GET {GPU} HTTP/1.1\r\nhost: x\r\nx-tenant-id: gone\r\n\r\n").unwrap();
    poll("the request is queued", Duration::from_secs(10), || q.stats()["depth"] == 1);
    drop(conn);
    poll("the queued request is cancelled", Duration::from_secs(10), || q.stats()["depth"] == 0);
    assert_eq!(metric(&q.service, "sluice_queue_rejections_total", &[("upstream", "gpu"), ("reason", "cancelled")]), 1.0);
    q.service.restart_with_workers(1);
    q.served_through_the_queue("probe");
    assert_eq!(q.admitted("gone"), 1, "the cancelled request never reached the upstream");
}

#[test]
fn h05_queued_requests_are_charged_once_at_dispatch_and_the_one_over_quota_gets_the_direct_429() {
    // Reject on quota: with the shipped `queue`, an over-quota request in the
    // last 30 s of an hour (the max wait) is deferred to the reset instead.
    let q = start(Opts { workers: 0, policy: json!({"on_quota_exceeded": "reject"}), ..Opts::default() });
    let r = q.service.admin("PUT", "/v1/admin/tenants/h05/limits", Some(&json!({"hour": 3})));
    assert_eq!(r.status, 200);
    q.drain_bucket("h05");
    let queued: Vec<String> = (0..3).map(|_| q.queue_async("h05", &[])).collect();
    assert_eq!(q.hour_used("h05"), 1, "queued requests are not charged on admission");
    let mut q = q;
    q.service.restart_with_workers(1);
    let answers: Vec<Response> = queued.iter().map(|l| q.result(l, "h05", Duration::from_secs(15))).collect();
    assert_eq!(answers.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 429]);
    let denied = &answers[2];
    assert_eq!(denied.json()["error"], "quota_exceeded");
    assert_eq!(denied.json()["window"], "hour");
    assert_eq!(header_u64(denied, "x-ratelimit-remaining"), 0);
    assert!(header_u64(denied, "retry-after") >= 1);
    assert_eq!(q.hour_used("h05"), 3, "three charged, each once");
    assert_eq!(q.admitted("h05"), 3, "the over-quota one never reached the upstream");
}

#[test]
fn on_quota_exceeded_queue_waits_for_the_window_reset_when_it_is_within_the_max_wait() {
    let q = start(Opts { gpu: json!({"rate": 100, "burst": 100}), ..Opts::default() });
    let r = q.service.admin("PUT", "/v1/admin/tenants/reset/limits", Some(&json!({"hour": 1})));
    assert_eq!(r.status, 200);
    q.service.set_clock_offset_ms(offset_to(next_hour_ms(5) - 1_500)); // HH:59:58.5
    assert_eq!(q.gpu("reset", &[]).status, 200);
    let t = Instant::now();
    let r = q.gpu("reset", &[]);
    assert_eq!(r.status, 200, "queued until the hour reset: {}", r.text());
    assert!(r.header("x-sluice-request-id").is_some());
    assert!(t.elapsed() >= Duration::from_millis(1_000), "it waited for the reset ({:?})", t.elapsed());
    assert_eq!(q.admitted("reset"), 2);
    assert_eq!(q.hour_used("reset"), 1, "charged in the new hour, at dispatch");
    // A route without on_quota_exceeded: queue rejects instead.
    let r = q.envoy.request("GET", "/v1/models", &[("x-tenant-id", "reset")], None);
    assert_eq!((r.status, r.json()["error"].clone()), (429, json!("quota_exceeded")));
}

#[test]
fn h13_overflow_without_the_queue_cluster_is_a_429_with_retry_after_and_never_reaches_the_upstream() {
    let q = start(Opts { plugin: json!({"queue_cluster": "no_such_cluster"}), ..Opts::default() });
    assert!(
        q.envoy.log().contains("queue_cluster \"no_such_cluster\" is not a cluster this Envoy knows"),
        "logged at configure time:\n{}",
        q.envoy.log()
    );
    q.drain_bucket("h13");
    for _ in 0..3 {
        let r = q.gpu("h13", &[]);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["error"], "capacity_exceeded");
        assert!(header_u64(&r, "retry-after") >= 1);
    }
    // Over quota on a route that queues on quota: no queue, so 429 as usual.
    q.service.admin("PUT", "/v1/admin/tenants/h13q/limits", Some(&json!({"hour": 0})));
    let r = q.gpu("h13q", &[]);
    assert_eq!((r.status, r.json()["error"].clone()), (429, json!("quota_exceeded")));
    assert!(r.header("retry-after").is_some());
    assert_eq!(q.admitted("h13") + q.admitted("h13q"), 1, "only the direct request reached the upstream");
    assert_eq!(q.stats()["depth"], 0);
}

#[test]
fn client_supplied_internal_headers_are_stripped_and_a_forged_ticket_is_refused() {
    let q = start(Opts::default());
    let forged = [("x-tenant-id", "forger"), ("x-sluice-queue", "gpu"), ("x-sluice-ticket", "0123456789abcdef0123456789abcdef")];
    let r = q.envoy.request("GET", "/v1/models", &forged, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-sluice-request-id").is_none(), "it did not go to the queue");
    let names = r.json()["header_names"].to_string();
    assert!(!names.contains("x-sluice"), "{names}");
    // Straight to the queue listener, around Envoy: the ticket is checked.
    let direct = http::request(q.service.queue_addr().unwrap(), "GET", GPU, &forged, None, Duration::from_secs(5)).unwrap();
    assert_eq!((direct.status, direct.json()["error"].clone()), (403, json!("invalid_ticket")));
    assert_eq!(q.admitted("forger"), 1);
}

#[test]
fn the_tier_short_term_rate_answers_429_rate_limited_in_window_second() {
    let q = start(Opts {
        tiers: Some(json!({"tiers": {"free": {"hour": 100, "rate_per_s": 2, "burst": 2}}})),
        ..Opts::default()
    });
    q.service.set_clock_offset_ms(offset_to(next_hour_ms(5) - 1_800_000));
    for _ in 0..2 {
        assert_eq!(q.envoy.request("GET", "/v1/models", &[("x-tenant-id", "fast")], None).status, 200);
    }
    let r = q.envoy.request("GET", "/v1/models", &[("x-tenant-id", "fast")], None);
    assert_eq!(r.status, 429, "{}", r.text());
    let body = r.json();
    assert_eq!((body["error"].clone(), body["window"].clone()), (json!("rate_limited"), json!("second")));
    assert_eq!(header_u64(&r, "retry-after"), 1);
    assert!(r.header("ratelimit-policy").unwrap().contains(r#""second";q=2;w=1"#), "{:?}", r.headers);
    assert_eq!(q.admitted("fast"), 2);
    assert_eq!(q.hour_used("fast"), 2, "the rate denial consumed no quota");
}

#[test]
fn queue_stats_and_metrics_show_depth_per_tenant_and_the_oldest_wait_with_bounded_labels() {
    let q = start(Opts { workers: 0, extra_args: vec!["--metrics-top-tenants".into(), "1".into()], ..Opts::default() });
    q.drain_bucket("s1");
    q.queue_async("s1", &[]);
    q.queue_async("s1", &[]);
    q.queue_async("s2", &[]);
    let stats = q.stats();
    assert_eq!((stats["depth"].as_u64(), stats["in_flight"].as_u64(), stats["tenants_total"].as_u64()), (Some(3), Some(0), Some(2)));
    assert_eq!(stats["tenants"][0], json!({"tenant": "s1", "depth": 2, "oldest_wait_ms": stats["tenants"][0]["oldest_wait_ms"]}));
    assert!(stats["oldest_wait_ms"].as_u64().is_some(), "{stats}");
    assert_eq!(stats["capacity"]["rate"], 1);
    let text = q.service.metrics();
    let m = sluice_tests::PromMetrics::parse(&text);
    assert_eq!(m.get("sluice_queue_depth_total", &[]), Some(3.0));
    assert_eq!(m.get("sluice_queue_upstream_depth", &[("upstream", "gpu")]), Some(3.0));
    // Per tenant: the top N (here 1) by name, the rest under `other`.
    assert_eq!(m.get("sluice_queue_depth", &[("tenant", "s1")]), Some(2.0));
    assert_eq!(m.get("sluice_queue_depth", &[("tenant", "other")]), Some(1.0));
    assert!(m.get("sluice_queue_depth", &[("tenant", "s2")]).is_none(), "s2 is not among the top 1");
    assert!(m.get("sluice_queue_worker_lag_seconds", &[]).is_some());
    assert_eq!(m.get("sluice_queue_enqueued_total", &[("upstream", "gpu"), ("mode", "async")]), Some(3.0));
    assert_eq!(m.get("sluice_capacity_decisions_total", &[("upstream", "gpu"), ("decision", "direct")]), Some(1.0));
    assert_eq!(m.get("sluice_checks_total", &[("result", "queued")]), Some(3.0));
    assert!(m.has("sluice_queue_wait_seconds_bucket"));
    let bad = q.service.get("/v1/queue/stats?tenants=abc");
    assert_eq!((bad.status, bad.json()["error"].clone()), (400, json!("invalid_request")));
}

#[test]
fn a_queued_request_keeps_its_method_body_and_headers_without_hop_by_hop_ones() {
    let q = start(Opts::default());
    q.drain_bucket("body");
    let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let mut conn = TcpStream::connect(q.envoy.listener_addr()).unwrap();
    write!(
        conn,
        "POST /v1/gpu/v1/chat/completions?x=1 HTTP/1.1\r\nhost: x\r\nx-tenant-id: body\r\ncontent-type: application/json\r\n\
         connection: close, x-hop\r\nx-hop: secret\r\nx-keep: kept\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.write_all(body).unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("x-sluice-request-id:"), "came through the queue: {raw}");
    let json_start = raw.find("\r\n\r\n").unwrap() + 4;
    let echo: Value = serde_json::from_str(raw[json_start..].trim()).unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/v1/gpu/v1/chat/completions");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["body"], std::str::from_utf8(body).unwrap(), "the body arrived intact");
    let names = echo["header_names"].to_string();
    assert!(names.contains("x-keep") && names.contains("content-type"), "{names}");
    assert!(!names.contains("x-hop"), "a header named in Connection is hop-by-hop: {names}");
}
