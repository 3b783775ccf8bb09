//! Prometheus metrics. Labels take values from small fixed sets only, except
//! `tenant`, which is bounded to the top N tenants plus `other`, so the
//! series count is bounded whatever traffic arrives.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use sluice_wire::{Window, WindowState};

/// Check outcomes; `error` covers Redis failures (answered with 503).
pub const RESULTS: [&str; 6] = [
    "allowed",
    "denied",
    "queued",
    "overflow_rejected",
    "invalid",
    "error",
];
/// Redis operations, for errors and latency.
pub const REDIS_OPS: [&str; 14] = [
    "check", "status", "admin", "ping", "report", "audit", "tiers", "usage", "time", "info",
    "load", "index", "queue", "lease_return",
];
/// What happened to lease units.
pub const LEASE_OPS: [&str; 2] = ["granted", "returned"];
/// Admin changes.
pub const ADMIN_ACTIONS: [&str; 12] = [
    "set_tier",
    "set_limits",
    "clear_limits",
    "set_storage",
    "grant_override",
    "revoke_override",
    "set_mode",
    "put_tier",
    "delete_tier",
    "set_default_tier",
    "seed_tiers",
    "test_clock",
];
/// Usage report outcomes.
pub const USAGE_RESULTS: [&str; 5] = ["settled", "duplicate", "unknown", "invalid", "error"];
/// Why a check was denied: the binding window (`route_` for route windows;
/// `second` is the tier's short-term rate).
pub const REJECT_REASONS: [&str; 9] = [
    "hour",
    "day",
    "month",
    "route_hour",
    "route_day",
    "route_month",
    "tokens_hour",
    "tokens_month",
    "second",
];
/// What the capacity step decided for a check on an upstream route.
pub const CAPACITY_DECISIONS: [&str; 6] = [
    "direct",
    "queued",
    "denied",
    "capacity_exceeded",
    "queue_full",
    "system_overloaded",
];
/// Why the queue refused or dropped a request.
pub const QUEUE_REJECTIONS: [&str; 7] = [
    "queue_full",
    "system_overloaded",
    "queue_timeout",
    "capacity_exceeded",
    "bad_ticket",
    "payload_too_large",
    "cancelled",
];
/// How a worker's dispatch ended.
pub const DISPATCH_RESULTS: [&str; 6] = [
    "ok",
    "upstream_error",
    "quota_denied",
    "deferred",
    "requeued",
    "stale",
];
/// Upper bounds (ms) of the daily upstream-latency histogram; bucket
/// `LATENCY_BUCKETS_MS.len()` holds everything slower.
pub const LATENCY_BUCKETS_MS: [u64; 15] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];

/// The histogram bucket of a latency.
pub fn latency_bucket(ms: u64) -> usize {
    LATENCY_BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

/// Most tenants the utilisation tracker remembers; past it the least used
/// half is forgotten.
const TRACKED_TENANTS_CAP: usize = 50_000;

/// Per window (hour, day, month): used / limit and the reset (epoch s, wall clock).
type WindowRatios = [Option<(f64, u64)>; 3];
/// Per window: a ratio.
type Ratios = [Option<f64>; 3];

/// Per-tenant utilisation as last seen by this replica, per tier window.
#[derive(Default)]
struct UtilTracker {
    /// tenant -> per window (hour, day, month): (used / limit, reset epoch s in wall-clock terms)
    tenants: HashMap<String, [Option<(f64, u64)>; 3]>,
}

fn window_index(w: Window) -> Option<usize> {
    match w {
        Window::Hour => Some(0),
        Window::Day => Some(1),
        Window::Month => Some(2),
        // The short-term rate is not a quota window.
        Window::Second => None,
    }
}

fn wall_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl UtilTracker {
    fn record(&mut self, tenant: &str, windows: &[WindowState], offset_ms: i64) {
        let offset_s = offset_ms / 1000;
        let mut row = [None; 3];
        for w in windows.iter().filter(|w| w.name == w.window.as_str()) {
            let ratio = if w.limit == 0 {
                1.0
            } else {
                w.used as f64 / w.limit as f64
            };
            // The reset is on the scripts' clock (Redis TIME + test offset):
            // keep it on the wall clock so expiry works with a shifted clock.
            let reset = i64::try_from(w.reset)
                .unwrap_or(i64::MAX)
                .saturating_sub(offset_s);
            if let Some(slot) = window_index(w.window).and_then(|i| row.get_mut(i)) {
                *slot = Some((ratio, u64::try_from(reset).unwrap_or(0)));
            }
        }
        if self.tenants.len() >= TRACKED_TENANTS_CAP && !self.tenants.contains_key(tenant) {
            self.shrink();
        }
        self.tenants.insert(tenant.to_string(), row);
    }

    fn shrink(&mut self) {
        let mut all: Vec<(String, f64)> = self
            .tenants
            .iter()
            .map(|(t, r)| (t.clone(), max_ratio(r)))
            .collect();
        all.sort_by(|a, b| a.1.total_cmp(&b.1));
        for (t, _) in all.into_iter().take(TRACKED_TENANTS_CAP / 2) {
            self.tenants.remove(&t);
        }
    }

    /// Drops windows that have reset, then returns the top `n` tenants by
    /// their highest utilisation, and per window the highest of the rest.
    fn snapshot(&mut self, n: usize) -> (Vec<(String, Ratios)>, Ratios) {
        let now = wall_s();
        self.tenants.retain(|_, row| {
            for slot in row.iter_mut() {
                if matches!(slot, Some((_, reset)) if *reset <= now) {
                    *slot = None;
                }
            }
            row.iter().any(Option::is_some)
        });
        let mut all: Vec<(&String, &WindowRatios)> = self.tenants.iter().collect();
        all.sort_by(|a, b| max_ratio(b.1).total_cmp(&max_ratio(a.1)).then(a.0.cmp(b.0)));
        let ratios = |r: &[Option<(f64, u64)>; 3]| r.map(|s| s.map(|(x, _)| x));
        let top = all
            .iter()
            .take(n)
            .map(|(t, r)| ((*t).clone(), ratios(r)))
            .collect();
        let mut other = [None; 3];
        for (_, r) in all.iter().skip(n) {
            for (o, v) in other.iter_mut().zip(ratios(r)) {
                if let Some(v) = v {
                    *o = Some(o.map_or(v, |x: f64| x.max(v)));
                }
            }
        }
        (top, other)
    }
}

fn max_ratio(row: &[Option<(f64, u64)>; 3]) -> f64 {
    row.iter().flatten().map(|(r, _)| *r).fold(0.0, f64::max)
}

pub struct Metrics {
    registry: Registry,
    checks: IntCounterVec,
    check_seconds: Histogram,
    redis_errors: IntCounterVec,
    admin_changes: IntCounterVec,
    usage_reports: IntCounterVec,
    lease_units: IntCounterVec,
    rejections: IntCounterVec,
    shadow: IntCounterVec,
    reserved: IntCounter,
    redis_seconds: HistogramVec,
    redis_memory: IntGauge,
    redis_maxmemory: IntGauge,
    redis_up: IntGauge,
    tiers_version: IntGauge,
    tiers_refreshes: IntCounterVec,
    tiers_age: Gauge,
    audit_writes: IntCounterVec,
    latency_reports: IntCounter,
    utilisation: GaugeVec,
    tracked: IntGauge,
    queue_depth: IntGaugeVec,
    queue_depth_total: IntGauge,
    queue_wait: Histogram,
    worker_lag: Gauge,
    queue: QueueMetrics,
    top_n: usize,
    util: Mutex<UtilTracker>,
    last_refresh_ms: std::sync::atomic::AtomicU64,
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
    r.register(Box::new(c.clone()))?;
    // Pre-create every series so dashboards see zeros, not gaps.
    for v in values {
        c.with_label_values(&[*v]);
    }
    Ok(c)
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: T,
) -> Result<T, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        Metrics::with_top_n(crate::config::DEFAULT_METRICS_TOP_TENANTS)
    }

    pub fn with_top_n(top_n: usize) -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        let checks = counter_vec(
            &r,
            "sluice_checks_total",
            "Quota decisions by result",
            "result",
            &RESULTS,
        )?;
        let check_seconds = reg(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "sluice_check_duration_seconds",
                    "Time to answer POST /v1/check",
                )
                // A check takes a few hundred microseconds: sub-millisecond
                // buckets, or the dashboard's p50 is a guess inside one.
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0,
                ]),
            )?,
        )?;
        let redis_errors = counter_vec(
            &r,
            "sluice_redis_errors_total",
            "Redis calls that failed or timed out, by operation",
            "op",
            &REDIS_OPS,
        )?;
        let admin_changes = counter_vec(
            &r,
            "sluice_admin_changes_total",
            "Admin API changes applied, by action",
            "action",
            &ADMIN_ACTIONS,
        )?;
        let usage_reports = counter_vec(
            &r,
            "sluice_usage_reports_total",
            "Token usage reports (POST /v1/usage) by result",
            "result",
            &USAGE_RESULTS,
        )?;
        let lease_units = counter_vec(
            &r,
            "sluice_lease_units_total",
            "Quota units granted to Envoys as leases, and given back unspent",
            "op",
            &LEASE_OPS,
        )?;
        let rejections = counter_vec(
            &r,
            "sluice_rejections_total",
            "Denied checks by binding window (route_ for route windows, tokens_ for token budgets); shadow denials excluded",
            "reason",
            &REJECT_REASONS,
        )?;
        let shadow = counter_vec(
            &r,
            "sluice_shadow_decisions_total",
            "Checks in shadow mode by what would have happened (the request is forwarded either way)",
            "result",
            &["allowed", "denied"],
        )?;
        let reserved = reg(
            &r,
            IntCounter::new(
                "sluice_reserved_decisions_total",
                "Admitted checks answered with a reserved pool",
            )?,
        )?;
        let redis_seconds = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "sluice_redis_command_duration_seconds",
                    "Duration of Redis calls (scripts, commands, pipelines), by operation",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0,
                ]),
                &["op"],
            )?,
        )?;
        for op in ["check", "status", "admin", "tiers", "audit", "usage", "ping"] {
            redis_seconds.with_label_values(&[op]);
        }
        let redis_memory = reg(
            &r,
            IntGauge::new(
                "sluice_redis_memory_used_bytes",
                "Redis used_memory (INFO memory), read at scrape time",
            )?,
        )?;
        let redis_maxmemory = reg(
            &r,
            IntGauge::new(
                "sluice_redis_memory_max_bytes",
                "Redis maxmemory (0 = no limit), read at scrape time",
            )?,
        )?;
        let redis_up = reg(
            &r,
            IntGauge::new(
                "sluice_redis_up",
                "1 when Redis answered the scrape-time INFO, else 0",
            )?,
        )?;
        let tiers_version = reg(
            &r,
            IntGauge::new(
                "sluice_tiers_version",
                "Version of the tiers this replica enforces (0: not yet read from Redis)",
            )?,
        )?;
        let tiers_refreshes = counter_vec(
            &r,
            "sluice_tiers_refreshes_total",
            "Tier refresh polls by result (ok, changed, error, invalid)",
            "result",
            &["ok", "changed", "error", "invalid"],
        )?;
        let tiers_age = reg(
            &r,
            Gauge::new(
                "sluice_tiers_refresh_age_seconds",
                "Seconds since this replica last confirmed its tiers against Redis",
            )?,
        )?;
        let audit_writes = counter_vec(
            &r,
            "sluice_audit_writes_total",
            "Audit entries written, by result",
            "result",
            &["ok", "error"],
        )?;
        let latency_reports = reg(
            &r,
            IntCounter::new(
                "sluice_latency_reports_total",
                "Upstream latency reports received from the filter",
            )?,
        )?;
        let utilisation = reg(
            &r,
            GaugeVec::new(
                Opts::new(
                    "sluice_tenant_quota_utilization_ratio",
                    "Used / limit of each tier window as last decided by this replica; the top N tenants by name, the highest of the rest under the tenant other",
                ),
                &["tenant", "window"],
            )?,
        )?;
        let tracked = reg(
            &r,
            IntGauge::new(
                "sluice_tenants_tracked",
                "Tenants with a live window in this replica's utilisation view",
            )?,
        )?;
        let queue_depth = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "sluice_queue_depth",
                    "Requests waiting in the overflow queue per tenant (top N + other); 0 while no queue is configured",
                ),
                &["tenant"],
            )?,
        )?;
        queue_depth.with_label_values(&["other"]);
        let queue_depth_total = reg(
            &r,
            IntGauge::new(
                "sluice_queue_depth_total",
                "Requests waiting in the overflow queue, all tenants; 0 while no queue is configured",
            )?,
        )?;
        let queue_wait = reg(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "sluice_queue_wait_seconds",
                    "Time queued requests waited before a worker replayed them",
                )
                .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0]),
            )?,
        )?;
        let worker_lag = reg(
            &r,
            Gauge::new(
                "sluice_queue_worker_lag_seconds",
                "Age of the oldest queued request not yet taken by a worker; 0 while no queue is configured",
            )?,
        )?;
        let queue = QueueMetrics::new(&r)?;
        Ok(Metrics {
            registry: r,
            checks,
            check_seconds,
            redis_errors,
            admin_changes,
            usage_reports,
            lease_units,
            rejections,
            shadow,
            reserved,
            redis_seconds,
            redis_memory,
            redis_maxmemory,
            redis_up,
            tiers_version,
            tiers_refreshes,
            tiers_age,
            audit_writes,
            latency_reports,
            utilisation,
            tracked,
            queue_depth,
            queue_depth_total,
            queue_wait,
            worker_lag,
            queue,
            top_n,
            util: Mutex::new(UtilTracker::default()),
            last_refresh_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn check(&self, result: &'static str, seconds: f64) {
        self.checks.with_label_values(&[result]).inc();
        self.check_seconds.observe(seconds);
    }

    /// Counts a denial under its binding window.
    pub fn rejection(&self, reason: &str) {
        if REJECT_REASONS.contains(&reason) {
            self.rejections.with_label_values(&[reason]).inc();
        }
    }

    pub fn shadow(&self, allowed: bool) {
        self.shadow
            .with_label_values(&[if allowed { "allowed" } else { "denied" }])
            .inc();
    }

    pub fn reserved(&self) {
        self.reserved.inc();
    }

    /// Records a decision's tier windows for the utilisation gauge.
    pub fn utilisation(&self, tenant: &str, windows: &[WindowState], offset_ms: i64) {
        if let Ok(mut u) = self.util.lock() {
            u.record(tenant, windows, offset_ms);
        }
    }

    pub fn redis_error(&self, op: &'static str) {
        self.redis_errors.with_label_values(&[op]).inc();
    }

    pub fn admin_change(&self, action: &'static str) {
        self.admin_changes.with_label_values(&[action]).inc();
    }

    pub fn lease_units(&self, op: &'static str, units: u64) {
        self.lease_units.with_label_values(&[op]).inc_by(units);
    }

    pub fn usage_report(&self, result: &'static str) {
        self.usage_reports.with_label_values(&[result]).inc();
    }

    pub fn audit_write(&self, ok: bool) {
        self.audit_writes
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn latency_report(&self) {
        self.latency_reports.inc();
    }

    pub fn tiers_refresh(&self, result: &'static str, version: u64) {
        self.tiers_refreshes.with_label_values(&[result]).inc();
        if matches!(result, "ok" | "changed") {
            self.tiers_version
                .set(i64::try_from(version).unwrap_or(i64::MAX));
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
            self.last_refresh_ms
                .store(now, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn redis_memory(&self, used_and_max: Option<(u64, u64)>) {
        match used_and_max {
            Some((used, max)) => {
                self.redis_up.set(1);
                self.redis_memory
                    .set(i64::try_from(used).unwrap_or(i64::MAX));
                self.redis_maxmemory
                    .set(i64::try_from(max).unwrap_or(i64::MAX));
            }
            None => self.redis_up.set(0),
        }
    }

    /// The Redis latency histogram, for the store to observe.
    pub fn redis_histogram(&self) -> HistogramVec {
        self.redis_seconds.clone()
    }

    /// Queue hooks (issue 3): the queue sets depth per tenant, the total,
    /// observes wait times and the worker lag through these.
    pub fn queue_depth(&self, tenant: &str, depth: i64) {
        self.queue_depth.with_label_values(&[tenant]).set(depth);
    }

    pub fn queue_depth_total(&self, depth: i64) {
        self.queue_depth_total.set(depth);
    }

    pub fn queue_wait(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    pub fn worker_lag(&self, lag: Duration) {
        self.worker_lag.set(lag.as_secs_f64());
    }

    /// Pre-creates every upstream-labelled series, so dashboards see zeros.
    pub fn register_upstreams(&self, upstreams: &[&str]) -> Result<(), prometheus::Error> {
        let q = &self.queue;
        for u in upstreams {
            for d in CAPACITY_DECISIONS {
                q.capacity.with_label_values(&[u, d]);
            }
            q.upstream_depth.with_label_values(&[u]);
            q.in_flight.with_label_values(&[u]);
            q.deferred.with_label_values(&[u]);
            for r in DISPATCH_RESULTS {
                q.dispatches.with_label_values(&[u, r]);
            }
            for r in QUEUE_REJECTIONS {
                q.rejections.with_label_values(&[u, r]);
            }
            for m in ["wait", "async"] {
                q.enqueued.with_label_values(&[u, m]);
            }
            for r in ["lease_expired", "shutdown"] {
                q.requeued.with_label_values(&[u, r]);
            }
        }
        Ok(())
    }

    pub fn capacity(&self, upstream: &str, verdict: crate::decision::Verdict) {
        use crate::decision::Verdict;
        let decision = match verdict {
            Verdict::Allow | Verdict::Charged => "direct",
            Verdict::Queued => "queued",
            Verdict::Quota | Verdict::Rate => "denied",
            Verdict::Capacity => "capacity_exceeded",
            Verdict::QueueFull => "queue_full",
            Verdict::Overloaded => "system_overloaded",
        };
        self.queue.capacity.with_label_values(&[upstream, decision]).inc();
    }

    /// One upstream's queue as read at scrape time.
    pub fn queue_upstream(&self, upstream: &str, queued: u64, in_flight: u64, deferred: u64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.queue.upstream_depth.with_label_values(&[upstream]).set(g(queued));
        self.queue.in_flight.with_label_values(&[upstream]).set(g(in_flight));
        self.queue.deferred.with_label_values(&[upstream]).set(g(deferred));
    }

    /// The whole queue as read at scrape time: the total, the depth per
    /// tenant (the deepest `top_n` by name, the rest under `other`) and
    /// the age of the oldest queued request (the worker lag).
    pub fn queue_snapshot(&self, total: u64, per_tenant: &std::collections::BTreeMap<String, u64>, lag: Duration) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.queue_depth_total(g(total));
        self.worker_lag(lag);
        let mut deepest: Vec<(&String, &u64)> = per_tenant.iter().collect();
        deepest.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        self.queue_depth.reset();
        let mut other = 0u64;
        for (i, (t, d)) in deepest.into_iter().enumerate() {
            if i < self.top_n {
                self.queue_depth(t, g(*d));
            } else {
                other = other.saturating_add(*d);
            }
        }
        self.queue_depth("other", g(other));
    }

    pub fn dispatch(&self, upstream: &str, result: &'static str) {
        self.queue.dispatches.with_label_values(&[upstream, result]).inc();
    }

    pub fn queue_rejection(&self, upstream: &str, reason: &'static str) {
        self.queue.rejections.with_label_values(&[upstream, reason]).inc();
    }

    pub fn enqueued(&self, upstream: &str, mode: &'static str) {
        self.queue.enqueued.with_label_values(&[upstream, mode]).inc();
    }

    pub fn requeued(&self, upstream: &str, reason: &'static str, n: u64) {
        self.queue.requeued.with_label_values(&[upstream, reason]).inc_by(n);
    }

    fn refresh_derived(&self) {
        if let Ok(mut u) = self.util.lock() {
            let (top, other) = u.snapshot(self.top_n);
            self.tracked
                .set(i64::try_from(u.tenants.len()).unwrap_or(i64::MAX));
            self.utilisation.reset();
            let put = |tenant: &str, row: [Option<f64>; 3]| {
                for (w, v) in Window::ALL.iter().zip(row) {
                    if let Some(v) = v {
                        self.utilisation
                            .with_label_values(&[tenant, w.as_str()])
                            .set(v);
                    }
                }
            };
            for (t, row) in top {
                put(&t, row);
            }
            put("other", other);
        }
        let last = self
            .last_refresh_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        if last > 0 {
            self.tiers_age
                .set(now.saturating_sub(last) as f64 / 1000.0);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.refresh_derived();
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The queue's upstream-labelled metrics (`upstream` takes the names of the
/// upstreams file: bounded).
struct QueueMetrics {
    capacity: IntCounterVec,
    upstream_depth: IntGaugeVec,
    in_flight: IntGaugeVec,
    deferred: IntGaugeVec,
    dispatches: IntCounterVec,
    rejections: IntCounterVec,
    enqueued: IntCounterVec,
    requeued: IntCounterVec,
}

impl QueueMetrics {
    fn new(r: &Registry) -> Result<QueueMetrics, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            reg(r, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            reg(r, IntGaugeVec::new(Opts::new(name, help), &["upstream"])?)
        };
        Ok(QueueMetrics {
            capacity: counter(
                "sluice_capacity_decisions_total",
                "Checks on upstream routes by what the capacity step decided",
                &["upstream", "decision"],
            )?,
            upstream_depth: gauge(
                "sluice_queue_upstream_depth",
                "Requests waiting in an upstream's queue (queued or deferred), read at scrape time",
            )?,
            in_flight: gauge(
                "sluice_queue_in_flight",
                "Queued requests being dispatched (leased), read at scrape time",
            )?,
            deferred: gauge(
                "sluice_queue_deferred",
                "Queued requests waiting for their quota window to reset, read at scrape time",
            )?,
            dispatches: counter(
                "sluice_queue_dispatches_total",
                "Queued requests a worker took, by how the dispatch ended",
                &["upstream", "result"],
            )?,
            rejections: counter(
                "sluice_queue_rejections_total",
                "Requests the queue refused or dropped, by reason",
                &["upstream", "reason"],
            )?,
            enqueued: counter(
                "sluice_queue_enqueued_total",
                "Requests taken into the queue",
                &["upstream", "mode"],
            )?,
            requeued: counter(
                "sluice_queue_requeued_total",
                "Leased requests put back: lease expired (a worker died) or shutdown",
                &["upstream", "reason"],
            )?,
        })
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    fn win(name: &str, window: Window, limit: u64, used: u64) -> WindowState {
        WindowState {
            name: name.into(),
            window,
            limit,
            used,
            remaining: limit.saturating_sub(used),
            reset: wall_s() + 600,
            reset_in: 600,
        }
    }

    #[test]
    fn utilisation_names_the_top_tenants_and_folds_the_rest_into_other() {
        let m = Metrics::with_top_n(2).unwrap();
        for (t, used) in [("a", 10), ("b", 95), ("c", 50), ("d", 99)] {
            m.utilisation(t, &[win("hour", Window::Hour, 100, used), win("llm-hour", Window::Hour, 1, 1)], 0);
        }
        let text = m.render();
        assert!(text.contains(r#"sluice_tenant_quota_utilization_ratio{tenant="d",window="hour"} 0.99"#), "{text}");
        assert!(text.contains(r#"sluice_tenant_quota_utilization_ratio{tenant="b",window="hour"} 0.95"#));
        assert!(text.contains(r#"sluice_tenant_quota_utilization_ratio{tenant="other",window="hour"} 0.5"#));
        assert!(!text.contains(r#"tenant="a""#) && !text.contains(r#"tenant="c""#));
    }

    #[test]
    fn latency_buckets_are_upper_bounds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(2), 1);
        assert_eq!(latency_bucket(60_000), 14);
        assert_eq!(latency_bucket(60_001), 15);
    }
}
