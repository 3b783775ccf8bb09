//! `make bench-fairness`: the noisy-neighbour benchmark.
//!
//! Real Envoy (with the filter), the quota service (release build, with its
//! queue listener and workers), Redis and the demo upstream with a fixed
//! capacity, all on free ports, a fresh stack per run. An open-loop load
//! generator sends at constant arrival rates and measures every latency
//! from the request's intended send time (so a stalled system cannot hide
//! its delay by slowing the sender down).
//!
//! Runs:
//! 1. no flood: 10 light tenants at 1 request/s each (half the capacity);
//! 2. flood: the same, plus one noisy tenant at 10x the capacity;
//! 3. backlog: three tenants (weights 1, 1, 2) all flooding, for the share
//!    each backlogged tenant gets.
//!
//! Writes bench-results/fairness-<unix time>.md and prints it. Settings can
//! be changed with SLUICE_BENCH_SECONDS (measured seconds per run, 20).

use serde_json::{json, Value};
use sluice_tests::envoy::shipped_plugin_config;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, Redis, Service, ServiceOpts};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The upstream's capacity (requests/s): Sluice's `rate` and the demo's `--capacity`.
const CAPACITY: u64 = 20;
/// The demo upstream's service time per request.
const UPSTREAM_LATENCY_MS: u64 = 20;
const LIGHT_TENANTS: usize = 10;
const LIGHT_RATE: f64 = 1.0;
const NOISY_RATE: f64 = 10.0 * CAPACITY as f64;
const BACKLOG_RATE: f64 = 5.0 * CAPACITY as f64;
const WARMUP: Duration = Duration::from_secs(3);
const PATH: &str = "/v1/gpu/generate";

struct Stack {
    envoy: Envoy,
    upstream: DemoUpstream,
    service: Service,
    _redis: Redis,
}

fn start_stack() -> Stack {
    let redis = Redis::start();
    let cap = CAPACITY.to_string();
    let lat = UPSTREAM_LATENCY_MS.to_string();
    let upstream = DemoUpstream::start_with(&["--capacity", &cap, "--latency-ms", &lat]);
    let gpu = json!({
        "url": format!("http://{}", upstream.addr()),
        "rate": CAPACITY, "burst": 2, "debt": 5,
        "tenant_queue_depth": 100, "global_queue_depth": 5000, "max_wait_ms": 30000,
    });
    // Quotas big enough never to bind: this measures capacity sharing only.
    let tiers = json!({"default_tier": "free", "tiers": {
        "free": {"hour": 100_000_000, "weight": 1},
        "pro": {"hour": 100_000_000, "weight": 2},
    }});
    let service = Service::start(
        &redis.url(),
        ServiceOpts {
            upstreams: Some(json!({"upstreams": {"gpu": gpu}})),
            tiers: Some(tiers),
            queue: true,
            workers: Some(4),
            enable_test_clock: false,
            ..ServiceOpts::default()
        },
    );
    let mut opts = EnvoyOpts::new(shipped_plugin_config(), service.addr(), upstream.addr());
    opts.queue_addr = service.queue_addr();
    opts.concurrency = 2;
    opts.component_log_level = None;
    opts.log_level = "warn".into();
    let envoy = Envoy::start(opts);
    Stack { envoy, upstream, service, _redis: redis }
}

#[derive(Clone)]
struct Sender {
    tenant: String,
    rate: f64,
    phase: Duration,
}

#[derive(Clone, Copy)]
struct Sample {
    sender: usize,
    intended: Duration,
    latency: Duration,
    status: u16,
    /// Answered through the queue (`x-sluice-request-id`), not directly.
    queued: bool,
}

/// Sends at each sender's constant rate for `total`; one sample per request.
async fn drive(url: String, senders: Vec<Sender>, total: Duration) -> Vec<Sample> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .pool_max_idle_per_host(2048)
        .build()
        .unwrap_or_default();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut schedulers = Vec::new();
    for (i, s) in senders.into_iter().enumerate() {
        let (client, url, samples) = (client.clone(), url.clone(), samples.clone());
        schedulers.push(tokio::spawn(async move {
            let mut inflight = Vec::new();
            let mut k: u64 = 0;
            loop {
                let offset = s.phase + Duration::from_secs_f64(k as f64 / s.rate);
                if offset >= total {
                    break;
                }
                k += 1;
                let intended = start + offset;
                tokio::time::sleep_until(intended.into()).await;
                let (client, url, samples, tenant) = (client.clone(), url.clone(), samples.clone(), s.tenant.clone());
                inflight.push(tokio::spawn(async move {
                    let result = client.get(&url).header("x-tenant-id", tenant).send().await;
                    let (status, queued) = match result {
                        Ok(r) => {
                            let st = r.status().as_u16();
                            let queued = r.headers().contains_key("x-sluice-request-id");
                            // Read the whole answer: latency is to the last byte.
                            match r.bytes().await {
                                Ok(_) => (st, queued),
                                Err(_) => (0, queued),
                            }
                        }
                        Err(_) => (0, false),
                    };
                    let sample = Sample { sender: i, intended: offset, latency: intended.elapsed(), status, queued };
                    if let Ok(mut v) = samples.lock() {
                        v.push(sample);
                    }
                }));
            }
            for t in inflight {
                let _ = t.await;
            }
        }));
    }
    for s in schedulers {
        let _ = s.await;
    }
    let out = samples.lock().map(|v| v.clone()).unwrap_or_default();
    out
}

/// Requests the upstream has seen, per tenant.
fn upstream_counts(up: &DemoUpstream) -> (BTreeMap<String, u64>, u64, u64) {
    let s = up.stats();
    let by: BTreeMap<String, u64> = s["by_tenant"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default();
    (by, s["total"].as_u64().unwrap_or(0), s["over_capacity"].as_u64().unwrap_or(0))
}

struct RunResult {
    senders: Vec<Sender>,
    samples: Vec<Sample>,
    /// Requests the upstream saw per tenant during the measured window.
    upstream: BTreeMap<String, u64>,
    upstream_total: u64,
    over_capacity: u64,
    measured: Duration,
}

fn run(name: &str, senders: Vec<Sender>, measure: Duration, setup: impl FnOnce(&Stack)) -> RunResult {
    eprintln!("bench: {name}: starting a fresh stack");
    let stack = start_stack();
    setup(&stack);
    let url = stack.envoy.url(PATH);
    let total = WARMUP + measure;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    eprintln!("bench: {name}: {} senders, {:?} warm-up + {:?} measured", senders.len(), WARMUP, measure);
    let up = &stack.upstream;
    let (samples, before, after) = std::thread::scope(|scope| {
        let snap = scope.spawn(|| {
            std::thread::sleep(WARMUP);
            let before = upstream_counts(up);
            std::thread::sleep(measure);
            let after = upstream_counts(up);
            (before, after)
        });
        let samples = rt.block_on(drive(url, senders.clone(), total));
        let (before, after) = snap.join().expect("snapshot thread");
        (samples, before, after)
    });
    let mut upstream = BTreeMap::new();
    for (t, n) in &after.0 {
        let d = n.saturating_sub(before.0.get(t).copied().unwrap_or(0));
        if d > 0 {
            upstream.insert(t.clone(), d);
        }
    }
    RunResult {
        senders,
        samples,
        upstream,
        upstream_total: after.1.saturating_sub(before.1),
        over_capacity: after.2,
        measured: measure,
    }
}

fn light_senders() -> Vec<Sender> {
    (0..LIGHT_TENANTS)
        .map(|i| Sender {
            tenant: format!("light-{i:02}"),
            rate: LIGHT_RATE,
            // Spread over the second: independent clients, not a lockstep burst.
            phase: Duration::from_secs_f64(i as f64 / (LIGHT_TENANTS as f64 * LIGHT_RATE)),
        })
        .collect()
}

/// Percentile (nearest rank) of sorted durations.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct ClassStats {
    sent: usize,
    ok: usize,
    queued: usize,
    p50: Duration,
    p99: Duration,
    statuses: BTreeMap<u16, usize>,
}

fn class(r: &RunResult, pick: impl Fn(&Sender) -> bool) -> ClassStats {
    let window = |s: &Sample| s.intended >= WARMUP && s.intended < WARMUP + r.measured;
    let mine: Vec<&Sample> = r.samples.iter().filter(|s| window(s) && pick(&r.senders[s.sender])).collect();
    let mut lat: Vec<Duration> = mine.iter().filter(|s| (200..300).contains(&s.status)).map(|s| s.latency).collect();
    lat.sort();
    let mut statuses = BTreeMap::new();
    for s in &mine {
        *statuses.entry(s.status).or_insert(0) += 1;
    }
    let queued = mine.iter().filter(|s| s.queued).count();
    ClassStats { sent: mine.len(), ok: lat.len(), queued, p50: pct(&lat, 50.0), p99: pct(&lat, 99.0), statuses }
}

/// Jain's fairness index of `x`: 1 when all are equal, 1/n at worst.
fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let sq: f64 = x.iter().map(|v| v * v).sum();
    if sq == 0.0 {
        return 0.0;
    }
    sum * sum / (x.len() as f64 * sq)
}

/// Weighted max-min fair allocation of `capacity` to `demands` (water-filling).
fn max_min(demands: &[f64], weights: &[f64], capacity: f64) -> Vec<f64> {
    let mut alloc = vec![0.0; demands.len()];
    let mut open: Vec<usize> = (0..demands.len()).collect();
    let mut left = capacity;
    while !open.is_empty() && left > 1e-9 {
        let wsum: f64 = open.iter().map(|&i| weights[i]).sum();
        let per_weight = left / wsum;
        let (sated, rest): (Vec<usize>, Vec<usize>) =
            open.iter().partition(|&&i| demands[i] - alloc[i] <= per_weight * weights[i]);
        if sated.is_empty() {
            for &i in &open {
                alloc[i] += per_weight * weights[i];
            }
            break;
        }
        for &i in &sated {
            left -= demands[i] - alloc[i];
            alloc[i] = demands[i];
        }
        open = rest;
    }
    alloc
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn statuses(s: &BTreeMap<u16, usize>) -> String {
    s.iter().map(|(k, v)| if *k == 0 { format!("error: {v}") } else { format!("{k}: {v}") }).collect::<Vec<_>>().join(", ")
}

fn main() {
    let measure = Duration::from_secs(
        std::env::var("SLUICE_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20),
    );
    let secs = measure.as_secs_f64();

    let calm = run("no flood", light_senders(), measure, |_| {});
    let mut with_noisy = light_senders();
    with_noisy.push(Sender { tenant: "noisy".into(), rate: NOISY_RATE, phase: Duration::ZERO });
    let flood = run("flood", with_noisy, measure, |_| {});
    let backlog_senders: Vec<Sender> = ["bk-a", "bk-b", "bk-pro"]
        .iter()
        .map(|t| Sender { tenant: t.to_string(), rate: BACKLOG_RATE, phase: Duration::ZERO })
        .collect();
    let backlog = run("backlog", backlog_senders, measure, |s| {
        let r = s.service.admin("PUT", "/v1/admin/tenants/bk-pro/tier", Some(&json!({"tier": "pro"})));
        assert_eq!(r.status, 200, "{}", r.text());
    });

    let is_light = |s: &Sender| s.tenant.starts_with("light-");
    let calm_light = class(&calm, is_light);
    let flood_light = class(&flood, is_light);
    let noisy = class(&flood, |s| s.tenant == "noisy");
    let rate = |r: &RunResult, t: &str| r.upstream.get(t).copied().unwrap_or(0) as f64 / secs;
    let share = |r: &RunResult| r.upstream_total as f64 / secs / CAPACITY as f64;

    // Jain over every tenant of the flood run, each tenant's throughput
    // relative to its weighted max-min fair allocation (light tenants get
    // their whole demand, the noisy one the rest of the capacity).
    let demands: Vec<f64> = flood.senders.iter().map(|s| s.rate).collect();
    let weights = vec![1.0; demands.len()];
    let alloc = max_min(&demands, &weights, CAPACITY as f64);
    let x: Vec<f64> = flood.senders.iter().zip(&alloc).map(|(s, a)| rate(&flood, &s.tenant) / a).collect();
    let jain_flood = jain(&x);
    // Jain over the backlogged tenants of the backlog run: dispatch share per unit of weight.
    let bk_weights = [("bk-a", 1.0), ("bk-b", 1.0), ("bk-pro", 2.0)];
    let bk: Vec<f64> = bk_weights.iter().map(|(t, w)| rate(&backlog, t) / w).collect();
    let jain_backlog = jain(&bk);

    let p99_ratio = flood_light.p99.as_secs_f64() / calm_light.p99.as_secs_f64().max(1e-9);
    let success = |c: &ClassStats| if c.sent == 0 { 0.0 } else { c.ok as f64 / c.sent as f64 };

    let mut md = String::new();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let _ = writeln!(md, "# Sluice noisy-neighbour benchmark\n");
    let _ = writeln!(
        md,
        "Unix time {now}. Real Envoy 1.40 (2 workers) with the filter, `sluice serve` (perf build, queue listener, 4 workers), \
         Redis, and `sluice demo-upstream --capacity {CAPACITY} --latency-ms {UPSTREAM_LATENCY_MS}` on one machine. \
         Upstream `gpu`: rate {CAPACITY}/s, burst 2, debt 5, tenant queue depth 100. Tiers `free` (weight 1) and `pro` \
         (weight 2) with quotas too large to bind. All requests `GET {PATH}` in wait mode. \
         Open-loop constant-rate senders; latency from the intended send time to the last byte, over successful requests. \
         {WARMUP:?} warm-up, then {measure:?} measured per run, a fresh stack per run.\n"
    );
    let _ = writeln!(md, "Load: {LIGHT_TENANTS} light tenants at {LIGHT_RATE}/s each; the noisy tenant at {NOISY_RATE}/s (10x capacity).\n");
    let _ = writeln!(md, "| | no flood | flood |");
    let _ = writeln!(md, "| --- | --- | --- |");
    let _ = writeln!(md, "| light tenants: requests | {} | {} |", calm_light.sent, flood_light.sent);
    let _ = writeln!(md, "| light tenants: success | {:.2}% | {:.2}% |", 100.0 * success(&calm_light), 100.0 * success(&flood_light));
    let _ = writeln!(md, "| light tenants: p50 | {} | {} |", ms(calm_light.p50), ms(flood_light.p50));
    let _ = writeln!(md, "| light tenants: p99 | {} | {} |", ms(calm_light.p99), ms(flood_light.p99));
    let _ = writeln!(md, "| light tenants: statuses | {} | {} |", statuses(&calm_light.statuses), statuses(&flood_light.statuses));
    let _ = writeln!(md, "| light tenants: answered through the queue | {} | {} |", calm_light.queued, flood_light.queued);
    let _ = writeln!(md, "| noisy tenant: upstream throughput | - | {:.2}/s |", rate(&flood, "noisy"));
    let _ = writeln!(md, "| noisy tenant: statuses | - | {} |", statuses(&noisy.statuses));
    let _ = writeln!(md, "| noisy tenant: p50 / p99 of its successes | - | {} / {} |", ms(noisy.p50), ms(noisy.p99));
    let _ = writeln!(md, "| upstream throughput | {:.2}/s ({:.1}% of capacity) | {:.2}/s ({:.1}% of capacity) |",
        calm.upstream_total as f64 / secs, 100.0 * share(&calm), flood.upstream_total as f64 / secs, 100.0 * share(&flood));
    let _ = writeln!(md, "| upstream over-capacity refusals | {} | {} |", calm.over_capacity, flood.over_capacity);
    let _ = writeln!(md, "| Jain's index, throughput / max-min fair allocation, all tenants | - | {jain_flood:.4} |\n");
    let _ = writeln!(md, "Backlog run: three tenants flooding at {BACKLOG_RATE}/s each (weights 1, 1 and 2, the `pro` tier):\n");
    let _ = writeln!(md, "| tenant | weight | upstream throughput | per unit of weight |");
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    for ((t, w), x) in bk_weights.iter().zip(&bk) {
        let _ = writeln!(md, "| {t} | {w} | {:.2}/s | {x:.2}/s |", rate(&backlog, t));
    }
    let _ = writeln!(md, "\nJain's index over the backlogged tenants' weighted dispatch shares: {jain_backlog:.4}; \
        upstream throughput {:.1}% of capacity.\n", 100.0 * share(&backlog));
    let _ = writeln!(md, "Goals:\n");
    let _ = writeln!(md, "- light tenants >= 99% success under the flood: {:.2}% ({})", 100.0 * success(&flood_light), mark(success(&flood_light) >= 0.99));
    let _ = writeln!(md, "- light p99 <= 1.5x the no-flood p99: {p99_ratio:.2}x ({})", mark(p99_ratio <= 1.5));
    let _ = writeln!(md, "- total throughput >= 95% of capacity under the flood: {:.1}% ({})", 100.0 * share(&flood), mark(share(&flood) >= 0.95));
    let _ = writeln!(md, "- Jain >= 0.99: backlogged tenants {jain_backlog:.4} ({}), all tenants vs max-min {jain_flood:.4} ({})",
        mark(jain_backlog >= 0.99), mark(jain_flood >= 0.99));

    let metrics: Value = json!({
        "light_success_flood": success(&flood_light), "light_p99_ratio": p99_ratio,
        "throughput_share_flood": share(&flood), "jain_backlog": jain_backlog, "jain_flood": jain_flood,
    });
    let dir = sluice_tests::paths::repo_root().join("bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("fairness-{now}.md"));
    match std::fs::write(&file, &md) {
        Ok(()) => eprintln!("bench: wrote {}", file.display()),
        Err(e) => eprintln!("bench: could not write {}: {e}", file.display()),
    }
    println!("{md}");
    println!("summary: {metrics}");
}
