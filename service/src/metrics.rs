//! Prometheus metrics. Labels take values from small fixed sets only (no
//! tenant or policy labels), so the series count is bounded whatever traffic
//! arrives.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder};

/// Check outcomes; `error` covers Redis failures (answered with 503).
pub const RESULTS: [&str; 4] = ["allowed", "denied", "invalid", "error"];
/// Redis operations that can fail.
pub const REDIS_OPS: [&str; 5] = ["check", "usage", "status", "admin", "ping"];
/// Admin changes.
pub const ADMIN_ACTIONS: [&str; 5] = [
    "set_tier",
    "set_limits",
    "clear_limits",
    "set_storage",
    "test_clock",
];
/// Usage report outcomes.
pub const USAGE_RESULTS: [&str; 5] = ["settled", "duplicate", "unknown", "invalid", "error"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    checks: IntCounterVec,
    check_seconds: Histogram,
    redis_errors: IntCounterVec,
    admin_changes: IntCounterVec,
    usage_reports: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let checks = IntCounterVec::new(
            Opts::new("sluice_checks_total", "Quota decisions by result"),
            &["result"],
        )?;
        let check_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_check_duration_seconds",
                "Time to answer POST /v1/check",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )?;
        let redis_errors = IntCounterVec::new(
            Opts::new(
                "sluice_redis_errors_total",
                "Redis calls that failed or timed out, by operation",
            ),
            &["op"],
        )?;
        let admin_changes = IntCounterVec::new(
            Opts::new(
                "sluice_admin_changes_total",
                "Admin API changes applied, by action",
            ),
            &["action"],
        )?;
        let usage_reports = IntCounterVec::new(
            Opts::new(
                "sluice_usage_reports_total",
                "Token usage reports (POST /v1/usage) by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(usage_reports.clone()))?;
        registry.register(Box::new(checks.clone()))?;
        registry.register(Box::new(check_seconds.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        registry.register(Box::new(admin_changes.clone()))?;
        // Pre-create every series so dashboards see zeros, not gaps.
        for r in RESULTS {
            checks.with_label_values(&[r]);
        }
        for op in REDIS_OPS {
            redis_errors.with_label_values(&[op]);
        }
        for a in ADMIN_ACTIONS {
            admin_changes.with_label_values(&[a]);
        }
        for r in USAGE_RESULTS {
            usage_reports.with_label_values(&[r]);
        }
        Ok(Metrics {
            registry,
            checks,
            check_seconds,
            redis_errors,
            admin_changes,
            usage_reports,
        })
    }

    pub fn check(&self, result: &'static str, seconds: f64) {
        self.checks.with_label_values(&[result]).inc();
        self.check_seconds.observe(seconds);
    }

    pub fn redis_error(&self, op: &'static str) {
        self.redis_errors.with_label_values(&[op]).inc();
    }

    pub fn admin_change(&self, action: &'static str) {
        self.admin_changes.with_label_values(&[action]).inc();
    }

    pub fn usage_report(&self, result: &'static str) {
        self.usage_reports.with_label_values(&[result]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
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
