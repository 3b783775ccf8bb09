//! Fault suite (`make test-faults`): Redis killed with SIGKILL and restarted
//! from its AOF, and the network path to Redis black-holed, under load
//! through real Envoy, counting at the demo upstream.
//!
//! For each fault: the route's documented failure mode holds (fail-open
//! forwards without rate-limit headers, fail-closed answers 503), nothing
//! answers 500, and the service resumes by itself once Redis is back.

mod common;

use common::*;
use serde_json::json;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Proxy, Redis, Response, Service, ServiceOpts};
use std::time::{Duration, Instant};

/// Default policy: fail-open. `/v1/llm/`: fail-closed (shipped config).
const OPEN_PATH: &str = "/v1/models";
const CLOSED_PATH: &str = "/v1/llm/complete";
/// The service's bound on Redis calls in this suite.
const REDIS_TIMEOUT_MS: u64 = 500;
/// What a request may take while Redis is broken: the service's Redis
/// timeout plus a margin for a loaded 2-core machine.
const FAULT_BOUND: Duration = Duration::from_secs(3);
/// How long the service may take to resume on its own.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);

struct Faulty {
    envoy: Envoy,
    upstream: DemoUpstream,
    service: Service,
    redis: Redis,
    proxy: Option<Proxy>,
}

impl Faulty {
    /// Redis (AOF when `persistent`), optionally behind a black-holing proxy,
    /// the service, the demo upstream and Envoy with a 2 s callout timeout
    /// (the service, not the callout, is what times out here).
    fn start(persistent: bool, with_proxy: bool) -> Faulty {
        let redis = if persistent { Redis::start_persistent() } else { Redis::start() };
        let proxy = with_proxy.then(|| Proxy::start(redis.addr()));
        let url = proxy.as_ref().map_or_else(|| redis.url(), Proxy::redis_url);
        // A Redis timeout well inside the callout timeout, so a broken Redis
        // is the service's 503 (`non_200_status`), not a callout timeout.
        let service = Service::start(&url, ServiceOpts { redis_timeout_ms: Some(REDIS_TIMEOUT_MS), ..ServiceOpts::default() });
        let upstream = DemoUpstream::start();
        let mut opts = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), service.addr(), upstream.addr());
        opts.concurrency = 2;
        let envoy = Envoy::start(opts);
        Faulty { envoy, upstream, service, redis, proxy }
    }

    fn get(&self, path: &str, tenant: &str) -> (Response, Duration) {
        let t = Instant::now();
        let r = self.envoy.request("GET", path, &[("x-tenant-id", tenant)], None);
        (r, t.elapsed())
    }

    fn admitted(&self, tenant: &str) -> u64 {
        admitted(&self.upstream, tenant)
    }

    fn set_limits(&self, tenant: &str, limits: serde_json::Value) {
        let r = self.service.admin("PUT", &format!("/v1/admin/tenants/{tenant}/limits"), Some(&limits));
        assert_eq!(r.status, 200, "set limits: {}", r.text());
    }

    /// Waits until a fail-open request is decided again (it carries
    /// rate-limit headers), with no help from the test; returns how long
    /// that took. Uses `probe` as the tenant.
    fn wait_decided(&self, probe: &str) -> Duration {
        let t = Instant::now();
        while t.elapsed() < RECOVERY_BOUND {
            let (r, _) = self.get(OPEN_PATH, probe);
            assert_ne!(r.status, 500, "a 500 while recovering: {}", r.text());
            if r.status == 200 && r.header("x-ratelimit-limit").is_some() {
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the service did not resume deciding within {RECOVERY_BOUND:?} after the fault ended\n{}",
            self.service.log()
        );
    }
}

/// The failure mode of both routes while Redis can not answer.
fn assert_failure_modes_hold(f: &Faulty, tenant: &str, what: &str) {
    let before = f.admitted(tenant);
    let (r, took) = f.get(OPEN_PATH, tenant);
    assert_eq!(r.status, 200, "{what}: fail-open forwards: {}", r.text());
    assert!(took < FAULT_BOUND, "{what}: fail-open took {took:?}");
    assert!(r.header("x-ratelimit-limit").is_none(), "{what}: fail-open invents no numbers");
    assert!(r.header("retry-after").is_none());
    assert_eq!(f.admitted(tenant), before + 1, "{what}: fail-open reached the upstream");

    let (r, took) = f.get(CLOSED_PATH, tenant);
    assert_eq!(r.status, 503, "{what}: fail-closed: {}", r.text());
    assert!(took < FAULT_BOUND, "{what}: fail-closed took {took:?}");
    assert_eq!(r.json()["error"], "quota_service_unavailable");
    assert_eq!(r.json()["reason"], "non_200_status", "{what}: the service answered 503 redis_unavailable");
    assert!(r.header("retry-after").is_some());
    assert_eq!(f.admitted(tenant), before + 1, "{what}: fail-closed forwards nothing");
}

/// Load statuses per route must be the documented ones, never 500 or a
/// dropped connection: open route 200/429, closed route 200/429/503.
fn assert_load_statuses(by_target: &[Vec<u16>], what: &str) {
    let open = by_target.first().cloned().unwrap_or_default();
    let closed = by_target.get(1).cloned().unwrap_or_default();
    assert!(!open.is_empty() && !closed.is_empty(), "{what}: the load ran");
    assert!(open.iter().all(|s| [200, 429].contains(s)), "{what}: open route statuses {:?}", tally(&open));
    assert!(closed.iter().all(|s| [200, 429, 503].contains(s)), "{what}: closed route statuses {:?}", tally(&closed));
}

#[test]
fn redis_killed_with_sigkill_and_restarted_from_aof_keeps_counters_fails_per_route_meanwhile_and_every_key_expires() {
    let mut f = Faulty::start(true, false);
    let tenant = "aof-tenant";
    f.set_limits(tenant, json!({"hour": 8}));
    for i in 0..5u64 {
        let (r, _) = f.get(OPEN_PATH, tenant);
        assert_eq!(r.status, 200);
        assert_eq!(header_u64(&r, "x-ratelimit-remaining"), 7 - i);
    }

    let load = Load::start(f.envoy.listener_addr(), &[(OPEN_PATH, "aof-load"), (CLOSED_PATH, "aof-load")], 3);
    while load.count() < 20 {
        std::thread::sleep(Duration::from_millis(20));
    }
    f.redis.kill();
    assert_failure_modes_hold(&f, tenant, "redis SIGKILLed");
    let outage_open = 1;

    f.redis.restart();
    let took = f.wait_decided("aof-probe");
    eprintln!("the service decided again {took:?} after Redis restarted");
    let by_target = load.finish();
    assert_load_statuses(&by_target, "redis SIGKILL");

    // The counter survived through the AOF: 5 used, 3 left; the fail-open
    // request during the outage was not counted.
    let statuses: Vec<Response> = (0..5).map(|_| f.get(OPEN_PATH, tenant).0).collect();
    let codes: Vec<u16> = statuses.iter().map(|r| r.status).collect();
    assert_eq!(codes, vec![200, 200, 200, 429, 429], "counters resume where they were");
    assert_eq!(header_u64(&statuses[2], "x-ratelimit-remaining"), 0);
    assert_eq!(f.admitted(tenant), 5 + outage_open + 3, "counted at the upstream");

    // Custom limits (the tenant's settings) survived as well, and nothing
    // the outage or the restart left behind lacks an expiry.
    let hour = f.redis.cmd(&["HGET", &format!("sluice:{{t:{tenant}}}:cfg"), "hour"]).as_string();
    assert_eq!(hour.as_deref(), Some("8"), "the custom limit survived");
    let n = assert_every_key_expires(&f.redis);
    assert!(n > 5, "the scan saw the keys ({n})");
}

#[test]
fn redis_black_holed_by_the_network_fails_within_the_timeout_and_the_service_reconnects_once_the_path_heals() {
    let f = Faulty::start(false, true);
    let tenant = "bh-tenant";
    f.set_limits(tenant, json!({"hour": 6}));
    for _ in 0..2 {
        assert_eq!(f.get(OPEN_PATH, tenant).0.status, 200);
    }
    let load = Load::start(f.envoy.listener_addr(), &[(OPEN_PATH, "bh-load"), (CLOSED_PATH, "bh-load")], 3);
    while load.count() < 20 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let proxy = f.proxy.as_ref().unwrap();
    proxy.black_hole();
    // Every connection the service had is now a dead path, and so is every
    // new one while the black hole lasts.
    for _ in 0..3 {
        assert_failure_modes_hold(&f, tenant, "redis black-holed");
    }
    let ready = f.service.get("/readyz");
    assert_eq!(ready.status, 503, "not ready while Redis is unreachable: {}", ready.text());

    let accepted_before = proxy.accepted();
    proxy.heal();
    let took = f.wait_decided("bh-probe");
    eprintln!("the service decided again {took:?} after the path healed");
    assert!(proxy.accepted() > accepted_before, "the service opened a new connection instead of waiting on the dead one");
    let by_target = load.finish();
    assert_load_statuses(&by_target, "redis black-holed");

    // 2 counted before; the outage's fail-open requests were not counted.
    let codes: Vec<u16> = (0..5).map(|_| f.get(OPEN_PATH, tenant).0.status).collect();
    assert_eq!(codes, vec![200, 200, 200, 200, 429], "counters resume where they were");
    assert_eq!(f.service.get("/readyz").status, 200);
    assert_every_key_expires(&f.redis);
}

#[test]
fn redis_out_of_memory_under_noeviction_takes_the_failure_mode_and_resumes_when_memory_is_freed() {
    let f = Faulty::start(false, false);
    let tenant = "oom-tenant";
    f.set_limits(tenant, json!({"hour": 5}));
    assert_eq!(f.get(OPEN_PATH, tenant).0.status, 200);
    // Every write is refused (OOM), as in a full Redis that must not evict
    // counters (an evicted counter would hand the tenant a fresh window).
    f.redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    f.redis.cmd(&["CONFIG", "SET", "maxmemory", "1"]);
    for _ in 0..2 {
        assert_failure_modes_hold(&f, tenant, "redis out of memory");
    }
    assert!(f.service.metrics().lines().any(|l| l.starts_with("sluice_redis_errors_total{op=\"check\"}")), "counted as Redis errors");
    f.redis.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    f.wait_decided("oom-probe");
    // 1 counted before; nothing was counted while Redis refused writes.
    let codes: Vec<u16> = (0..5).map(|_| f.get(OPEN_PATH, tenant).0.status).collect();
    assert_eq!(codes, vec![200, 200, 200, 200, 429]);
    assert_every_key_expires(&f.redis);
}
