//! Shared set-up for the end-to-end suites: one stack (Redis, quota service,
//! demo upstream, Envoy with the filter) and a concurrent request driver.
#![allow(dead_code)]

use serde_json::{json, Value};
use sluice_tests::envoy::shipped_plugin_config;
use sluice_tests::http;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, Response, Service, ServiceOpts};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct Stack {
    pub envoy: Envoy,
    pub upstream: DemoUpstream,
    pub service: Service,
    pub redis: Redis,
}

impl Stack {
    /// The shipped plugin config, one Envoy worker.
    pub fn start() -> Stack {
        Stack::with(shipped_plugin_config(), 1)
    }

    pub fn with(plugin_config: Value, concurrency: u32) -> Stack {
        Stack::with_opts(plugin_config, concurrency, |_| {})
    }

    pub fn with_opts(plugin_config: Value, concurrency: u32, edit: impl FnOnce(&mut EnvoyOpts)) -> Stack {
        Stack::with_service(plugin_config, concurrency, ServiceOpts::default(), edit)
    }

    pub fn with_service(plugin_config: Value, concurrency: u32, service_opts: ServiceOpts, edit: impl FnOnce(&mut EnvoyOpts)) -> Stack {
        let redis = Redis::start();
        let service = Service::start(&redis.url(), service_opts);
        let upstream = DemoUpstream::start();
        let mut opts = EnvoyOpts::new(plugin_config, service.addr(), upstream.addr());
        opts.concurrency = concurrency;
        edit(&mut opts);
        let envoy = Envoy::start(opts);
        Stack { envoy, upstream, service, redis }
    }

    pub fn get(&self, path: &str, tenant: &str) -> Response {
        self.envoy.request("GET", path, &[("x-tenant-id", tenant)], None)
    }

    /// Requests the demo upstream has seen for `tenant`.
    pub fn admitted(&self, tenant: &str) -> u64 {
        admitted(&self.upstream, tenant)
    }

    /// Decision callouts (`POST /v1/check`) the quota service has received so
    /// far, every result counted. Read at the service rather than from Envoy's
    /// cluster stats, which also count the filter's start-up probes (one per
    /// VM, finishing at their own pace) and fire-and-forget usage reports.
    pub fn callouts(&self) -> u64 {
        let text = self.service.metrics();
        text.lines()
            .filter(|l| l.starts_with("sluice_checks_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    pub fn set_limits(&self, tenant: &str, limits: Value) {
        let r = self.service.admin("PUT", &format!("/v1/admin/tenants/{tenant}/limits"), Some(&limits));
        assert_eq!(r.status, 200, "set limits: {}", r.text());
    }

    pub fn set_tier(&self, tenant: &str, tier: &str) {
        let r = self.service.admin("PUT", &format!("/v1/admin/tenants/{tenant}/tier"), Some(&json!({"tier": tier})));
        assert_eq!(r.status, 200, "set tier: {}", r.text());
    }
}

pub fn admitted(upstream: &DemoUpstream, tenant: &str) -> u64 {
    upstream.stats().pointer(&format!("/by_tenant/{tenant}")).and_then(Value::as_u64).unwrap_or(0)
}

/// Sends `total` requests over `parallel` concurrent connections (one
/// connection per request, so they spread over Envoy's workers) to one of
/// `targets` in turn, and returns every status.
pub fn fire(targets: &[SocketAddr], total: usize, parallel: usize, method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u16> {
    let next = Arc::new(Mutex::new(0usize));
    let statuses = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    std::thread::scope(|s| {
        for _ in 0..parallel {
            let (next, statuses, headers) = (Arc::clone(&next), Arc::clone(&statuses), headers.clone());
            s.spawn(move || loop {
                let i = {
                    let mut n = next.lock().unwrap();
                    if *n >= total {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                let target = targets[i % targets.len()];
                let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let status = match http::request(target, method, path, &hs, None, Duration::from_secs(20)) {
                    Ok(r) => r.status,
                    Err(e) => panic!("request {i} to {target} failed: {e}"),
                };
                statuses.lock().unwrap().push(status);
            });
        }
    });
    Arc::try_unwrap(statuses).unwrap().into_inner().unwrap()
}

pub fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Test-clock offset that makes the service's "now" equal `target_ms`.
pub fn offset_to(target_ms: i64) -> i64 {
    target_ms - now_ms()
}

/// Start of the next UTC hour, in epoch ms, at least `margin_s` away.
pub fn next_hour_ms(margin_s: i64) -> i64 {
    let t = now_ms() + margin_s * 1000;
    (t / 3_600_000 + 1) * 3_600_000
}

/// Every value of a response header.
pub fn all<'a>(r: &'a Response, name: &str) -> Vec<&'a str> {
    r.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
}

pub fn header_u64(r: &Response, name: &str) -> u64 {
    r.header(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", r.headers))
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not a whole number: {e}"))
}

/// A plugin config for tests: the shipped one with changes merged in.
pub fn plugin_config(changes: Value) -> Value {
    let mut c = shipped_plugin_config();
    if let (Some(base), Some(ch)) = (c.as_object_mut(), changes.as_object()) {
        for (k, v) in ch {
            base.insert(k.clone(), v.clone());
        }
    }
    c
}

/// Background load through Envoy for the fault suite: `parallel` threads
/// cycle through `targets` (method GET, path, tenant) until stopped, one
/// connection per request, and record every outcome (status 0: the
/// connection failed or timed out).
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    results: Arc<Mutex<Vec<(usize, u16)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(target: SocketAddr, targets: &[(&str, &str)], parallel: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let targets: Arc<Vec<(String, String)>> =
            Arc::new(targets.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect());
        let threads = (0..parallel)
            .map(|n| {
                let (stop, results, targets) = (Arc::clone(&stop), Arc::clone(&results), Arc::clone(&targets));
                std::thread::spawn(move || {
                    let mut i = n;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let idx = i % targets.len();
                        let (path, tenant) = &targets[idx];
                        let status = http::request(target, "GET", path, &[("x-tenant-id", tenant)], None, Duration::from_secs(15))
                            .map_or(0, |r| r.status);
                        results.lock().unwrap().push((idx, status));
                        i += 1;
                    }
                })
            })
            .collect();
        Load { stop, results, threads }
    }

    /// Outcomes so far.
    pub fn count(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    /// Stops every thread and returns each target's statuses.
    pub fn finish(mut self) -> Vec<Vec<u16>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let results = self.results.lock().unwrap();
        let n = results.iter().map(|(i, _)| *i + 1).max().unwrap_or(0);
        let mut by_target = vec![Vec::new(); n];
        for (i, s) in results.iter() {
            by_target[*i].push(*s);
        }
        by_target
    }
}

/// Histogram of statuses, for assertion messages.
pub fn tally(statuses: &[u16]) -> std::collections::BTreeMap<u16, usize> {
    let mut m = std::collections::BTreeMap::new();
    for s in statuses {
        *m.entry(*s).or_insert(0) += 1;
    }
    m
}

/// Every key in Redis and its TTL (-1: none).
pub fn keys_and_ttls(redis: &Redis) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    let mut cursor = "0".to_string();
    loop {
        let reply = redis.cmd(&["SCAN", &cursor, "COUNT", "1000"]);
        let sluice_tests::RespValue::Array(Some(parts)) = reply else { panic!("SCAN reply {reply:?}") };
        cursor = parts[0].as_string().unwrap();
        for k in parts[1].strings() {
            let ttl = redis.cmd(&["TTL", &k]).as_i64().unwrap();
            out.push((k, ttl));
        }
        if cursor == "0" {
            return out;
        }
    }
}

/// Keys without an expiry that have a documented owner (docs/design.md):
/// a tenant's settings and reported storage, the global tiers document.
pub fn is_owned_key(key: &str) -> bool {
    key.ends_with(":cfg") || key.ends_with(":storage") || key == "sluice:{g}:tiers"
}

/// Asserts that every key but the documented owners has a TTL.
pub fn assert_every_key_expires(redis: &Redis) -> usize {
    let keys = keys_and_ttls(redis);
    // -2: expired between SCAN and TTL.
    let stuck: Vec<&(String, i64)> = keys.iter().filter(|(k, ttl)| *ttl == -1 && !is_owned_key(k)).collect();
    assert!(stuck.is_empty(), "keys without an expiry: {stuck:?}");
    keys.len()
}
