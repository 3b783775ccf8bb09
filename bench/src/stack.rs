//! One configuration under test: Envoy (rendered from `envoy/envoy.yaml` by
//! the e2e harness, on free ports) in front of the demo upstream, with or
//! without a limiter, plus Redis and the quota service for the Sluice modes.

use serde_json::{json, Value};
use sluice_tests::envoy::shipped_plugin_config;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, Service, ServiceOpts};
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// (a) Envoy without any limiter: the baseline.
    NoLimiter,
    /// (b) Envoy's built-in `envoy.filters.http.local_ratelimit`.
    LocalRateLimit,
    /// (e) The platform floor: a proxy-wasm filter that only reads the
    /// tenant header (bench/floor), the least any Wasm limiter costs.
    Floor,
    /// (f) The floor plus one callout per request to a trivial endpoint:
    /// the quota service's `GET /healthz` over the shipped quota cluster
    /// (HTTP/2, h2c), answered without Redis. The least any limiter that
    /// asks a service per request costs, in throughput and in latency.
    FloorCallout,
    /// (c) Sluice, every request checked by the service before it goes on
    /// (batched callouts: `batching: true`).
    Exact,
    /// (d) Sluice with quota leases.
    Lease,
}

impl Mode {
    pub const ALL: [Mode; 6] =
        [Mode::NoLimiter, Mode::LocalRateLimit, Mode::Floor, Mode::FloorCallout, Mode::Exact, Mode::Lease];

    pub fn key(self) -> &'static str {
        match self {
            Mode::NoLimiter => "a",
            Mode::LocalRateLimit => "b",
            Mode::Floor => "e",
            Mode::FloorCallout => "f",
            Mode::Exact => "c",
            Mode::Lease => "d",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::NoLimiter => "(a) Envoy, no limiter",
            Mode::LocalRateLimit => "(b) Envoy local_ratelimit",
            Mode::Floor => "(e) proxy-wasm floor",
            Mode::FloorCallout => "(f) floor + one callout",
            Mode::Exact => "(c) Sluice exact",
            Mode::Lease => "(d) Sluice lease",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Mode::NoLimiter => "(a) no limiter",
            Mode::LocalRateLimit => "(b) local_ratelimit",
            Mode::Floor => "(e) wasm floor",
            Mode::FloorCallout => "(f) floor + callout",
            Mode::Exact => "(c) exact",
            Mode::Lease => "(d) lease",
        }
    }

    pub fn is_sluice(self) -> bool {
        matches!(self, Mode::Exact | Mode::Lease)
    }

    /// Runs the floor module (bench/floor).
    pub fn is_floor(self) -> bool {
        matches!(self, Mode::Floor | Mode::FloorCallout)
    }
}

/// Every bench tenant gets this tier: an hour limit far above what a run can
/// send, so only the tenants given a custom limit ever reach theirs.
pub const BENCH_TIER_HOUR: u64 = 1_000_000_000_000;

pub struct Stack {
    pub mode: Mode,
    pub envoy: Envoy,
    pub upstream: DemoUpstream,
    pub service: Option<Service>,
    /// Kept for the stack's lifetime (stopped on drop).
    pub _redis: Option<Redis>,
}

/// The local_ratelimit filter as the cheapest limiter Envoy has: one token
/// bucket per worker, sized so it never rejects during a run, so what is
/// measured is the cost of the filter, not of its 429s.
fn local_ratelimit_filter() -> Value {
    json!({
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench_local_ratelimit",
            "token_bucket": {"max_tokens": 10_000_000, "tokens_per_fill": 10_000_000, "fill_interval": "1s"},
            "filter_enabled": {"runtime_key": "bench_rl_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"runtime_key": "bench_rl_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}}
        }
    })
}

/// The shipped plugin config, made strict for measuring: fail closed (a
/// callout that does not come back is a 503, never an uncounted admission)
/// and a timeout generous enough that a loaded machine does not fail.
pub fn bench_plugin_config(mode: Mode) -> Value {
    let mut c = shipped_plugin_config();
    if let Some(o) = c.as_object_mut() {
        o.insert("failure_mode".into(), json!("closed"));
        o.insert("timeout_ms".into(), json!(2000));
        // As shipped: batched callouts past 8 single checks in flight per
        // worker (every check still decided on its own).
        // `SLUICE_BENCH_NO_BATCHING=1` measures one callout per check.
        let batching = std::env::var_os("SLUICE_BENCH_NO_BATCHING").is_none();
        o.insert("batching".into(), json!(batching));
        if mode == Mode::Lease {
            o.insert("default_policy".into(), json!({"cost": 1, "lease": {"max_units": 64}}));
        }
        // Diagnostic (`SLUICE_BENCH_NO_POLICIES=1`): without route policies the
        // filter reads no route name or metadata property.
        if std::env::var_os("SLUICE_BENCH_NO_POLICIES").is_some() {
            o.remove("policies");
        }
        // Diagnostic (`SLUICE_BENCH_PLUGIN_CHANGES='<json object>'`): top-level
        // fields replaced in (c)'s and (d)'s plugin config, e.g. to price a
        // setting against the shipped config in the same kind of run
        // (checked by main before anything starts).
        if let Ok(Some(changes)) = plugin_changes() {
            for (k, v) in changes {
                o.insert(k, v);
            }
        }
    }
    c
}

/// Whether (c) and (d) run a changed plugin config (diagnostic variables).
pub fn is_diagnostic() -> bool {
    ["SLUICE_BENCH_NO_POLICIES", "SLUICE_BENCH_PLUGIN_CHANGES"].iter().any(|v| std::env::var_os(v).is_some())
}

/// `SLUICE_BENCH_PLUGIN_CHANGES` as a JSON object, if set.
pub fn plugin_changes() -> Result<Option<serde_json::Map<String, Value>>, String> {
    let Some(raw) = std::env::var_os("SLUICE_BENCH_PLUGIN_CHANGES") else { return Ok(None) };
    match serde_json::from_str::<Value>(&raw.to_string_lossy()) {
        Ok(Value::Object(o)) => Ok(Some(o)),
        Ok(_) => Err("SLUICE_BENCH_PLUGIN_CHANGES must be a JSON object".into()),
        Err(e) => Err(format!("SLUICE_BENCH_PLUGIN_CHANGES is not JSON: {e}")),
    }
}

impl Stack {
    pub fn start(mode: Mode, workers: u32) -> Stack {
        let (redis, service) = if mode.is_sluice() || mode == Mode::FloorCallout {
            let redis = Redis::start();
            let tiers = json!({"default_tier": "bench", "tiers": {"bench": {"hour": BENCH_TIER_HOUR}}});
            let service = Service::start(
                &redis.url(),
                ServiceOpts {
                    tiers: Some(tiers),
                    enable_test_clock: false,
                    redis_timeout_ms: Some(1000),
                    ..ServiceOpts::default()
                },
            );
            (Some(redis), Some(service))
        } else {
            (None, None)
        };
        let upstream = DemoUpstream::start();
        // Without a service the quota cluster points at the upstream: no
        // filter calls it, Envoy only needs some endpoint.
        let quota_addr: SocketAddr = service.as_ref().map_or(upstream.addr(), Service::addr);
        let plugin_config = match mode {
            Mode::Floor => floor_ops(),
            // The quota cluster as shipped (HTTP/2 to the service).
            Mode::FloorCallout => json!({"callout": "sluice_quota"}),
            _ => bench_plugin_config(mode),
        };
        let mut opts = EnvoyOpts::new(plugin_config, quota_addr, upstream.addr());
        opts.concurrency = workers;
        opts.log_level = "warn".into();
        opts.component_log_level = None;
        opts.replace_wasm_filter = match mode {
            Mode::NoLimiter => Some(vec![]),
            Mode::LocalRateLimit => Some(vec![local_ratelimit_filter()]),
            Mode::Floor | Mode::FloorCallout | Mode::Exact | Mode::Lease => None,
        };
        if mode.is_floor() {
            opts.wasm_path = floor_wasm();
        }
        let envoy = Envoy::start(opts);
        Stack { mode, envoy, upstream, service, _redis: redis }
    }

    /// Gives `tenant` a custom hour limit through the admin API.
    pub fn cap(&self, tenant: &str, hour: u64) {
        if let Some(s) = &self.service {
            let r = s.admin("PUT", &format!("/v1/admin/tenants/{tenant}/limits"), Some(&json!({"hour": hour})));
            assert_eq!(r.status, 200, "cap {tenant}: {}", r.text());
        }
    }

    pub fn upstream_stats(&self) -> Value {
        self.upstream.stats()
    }

    /// Envoy's resident memory in KiB (`VmRSS`).
    pub fn envoy_rss_kib(&mut self) -> u64 {
        let pid = self.envoy.process().pid();
        rss_kib(pid)
    }

    /// The filter's counter `sluice.<name>` (0 without the filter).
    pub fn filter_counter(&self, name: &str) -> u64 {
        if self.mode.is_sluice() {
            self.envoy.filter_counter(name)
        } else {
            0
        }
    }
}

/// CPU seconds (user + system) each component has used so far.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Cpu {
    pub envoy: f64,
    pub upstream: f64,
    pub service: f64,
    pub redis: f64,
    pub load_generator: f64,
}

impl Cpu {
    /// `self - earlier`, component by component.
    pub fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            envoy: self.envoy - earlier.envoy,
            upstream: self.upstream - earlier.upstream,
            service: self.service - earlier.service,
            redis: self.redis - earlier.redis,
            load_generator: self.load_generator - earlier.load_generator,
        }
    }

    pub fn total(&self) -> f64 {
        self.envoy + self.upstream + self.service + self.redis + self.load_generator
    }
}

impl Stack {
    pub fn cpu(&mut self) -> Cpu {
        Cpu {
            envoy: cpu_secs(&self.envoy.process().pid().to_string()),
            upstream: cpu_secs(&self.upstream.pid().to_string()),
            service: self.service.as_ref().map_or(0.0, |s| cpu_secs(&s.pid().to_string())),
            redis: self._redis.as_ref().and_then(Redis::pid).map_or(0.0, |p| cpu_secs(&p.to_string())),
            load_generator: cpu_secs("self"),
        }
    }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds (all threads).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / if hz > 0.0 { hz } else { 100.0 }
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The floor's plugin config: none, or the host operations of a probe
/// (`SLUICE_BENCH_FLOOR_OPS`, see bench/floor).
fn floor_ops() -> Value {
    std::env::var("SLUICE_BENCH_FLOOR_OPS")
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({}))
}

/// The floor module (`SLUICE_FLOOR_WASM`, set by `make bench-sluice`).
pub fn floor_wasm() -> Option<std::path::PathBuf> {
    std::env::var_os("SLUICE_FLOOR_WASM")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_file())
}

/// Running sums of where a Sluice decision's time goes, read from the
/// service's own metrics: its check handler and, inside it, its Redis call.
/// (Envoy times callouts in whole milliseconds only, too coarse here: what
/// Envoy adds is the request's added latency less these.)
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TimeSums {
    pub service_s_sum: f64,
    pub service_checks: f64,
    pub redis_s_sum: f64,
    pub redis_calls: f64,
}

/// Means over an interval, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TimeSplit {
    /// Single checks answered in the interval.
    pub checks: u64,
    /// Mean time inside the service's check handler.
    pub service_us: f64,
    /// Mean Redis call (the check script, round trip from the service).
    pub redis_us: f64,
}

impl TimeSums {
    pub fn since(&self, earlier: &TimeSums) -> TimeSplit {
        let mean = |sum: f64, n: f64, scale: f64| if n > 0.0 { sum * scale / n } else { 0.0 };
        let checks = self.service_checks - earlier.service_checks;
        let calls = self.redis_calls - earlier.redis_calls;
        TimeSplit {
            checks: checks.max(0.0) as u64,
            service_us: mean(self.service_s_sum - earlier.service_s_sum, checks, 1e6),
            redis_us: mean(self.redis_s_sum - earlier.redis_s_sum, calls, 1e6),
        }
    }
}

impl Stack {
    /// Where decisions' time has gone so far (`None` without Sluice).
    pub fn time_sums(&self) -> Option<TimeSums> {
        if !self.mode.is_sluice() {
            return None;
        }
        let service = self.service.as_ref()?;
        let svc = sluice_tests::envoy::PromMetrics::parse(&service.metrics());
        let check = [("op", "check")];
        Some(TimeSums {
            service_s_sum: svc.sum("sluice_check_duration_seconds_sum"),
            service_checks: svc.sum("sluice_check_duration_seconds_count"),
            redis_s_sum: svc.get("sluice_redis_command_duration_seconds_sum", &check).unwrap_or(0.0),
            redis_calls: svc.get("sluice_redis_command_duration_seconds_count", &check).unwrap_or(0.0),
        })
    }
}
