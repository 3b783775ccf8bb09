//! Results, the markdown report and the printed summary.

use crate::load::{Latency, Throughput};
use crate::stack::Mode;
use crate::Opts;
use serde::{Serialize, Serializer};
use std::fmt::Write;

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.short())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AdmissionRow {
    pub tenant: String,
    /// The tenant's hour limit; `None` = the bench tier (never reached).
    pub limit: Option<u64>,
    /// Requests the demo upstream saw for it.
    pub admitted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MainResult {
    pub mode: Mode,
    pub throughput: Throughput,
    /// CPU seconds per component during the max-throughput measurement.
    pub cpu: crate::stack::Cpu,
    pub latency: Latency,
    pub admission: Vec<AdmissionRow>,
    /// Whether this configuration enforces per-tenant limits at all.
    pub enforced: bool,
    pub failed_open: u64,
    pub failed_closed: u64,
    pub callouts: u64,
    /// Where the latency run's decisions spent their time (Sluice modes).
    pub time_split: Option<crate::stack::TimeSplit>,
    /// Connections of the best closed loop (the max throughput).
    pub conns: usize,
    /// Every closed loop of the sweep: (connections, req/s).
    pub sweep: Vec<(usize, f64)>,
    pub envoy_rss_kib_before: u64,
    pub envoy_rss_kib_after: u64,
}

impl MainResult {
    /// Units admitted beyond each capped tenant's limit, summed.
    pub fn over_admitted(&self) -> u64 {
        self.admission
            .iter()
            .filter_map(|r| r.limit.map(|l| r.admitted.saturating_sub(l)))
            .sum()
    }

    /// Whether every capped tenant actually reached its limit in the run.
    pub fn limits_reached(&self) -> bool {
        self.admission.iter().all(|r| r.limit.is_none_or(|l| r.admitted >= l))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    pub mode: Mode,
    pub workers: u32,
    pub tenants: usize,
    /// Answers to the pass that sent each tenant of the cell one request.
    pub touched: u64,
    pub throughput: Throughput,
    /// The connection count of the best closed loop of the cell.
    pub conns: usize,
    pub envoy_rss_kib_before: u64,
    pub envoy_rss_kib_after: u64,
    pub failed_closed_total: u64,
    /// Requests of the cell's capped tenant that reached the upstream.
    pub capped_admitted: u64,
    pub enforced: bool,
}

impl ScaleResult {
    pub fn over_admitted(&self) -> u64 {
        if self.enforced {
            self.capped_admitted.saturating_sub(crate::SCALE_CAP)
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub started_unix: u64,
    pub load_before: String,
    pub load_after: String,
    pub cores: usize,
    pub settings: Settings,
    pub main: Vec<MainResult>,
    pub scale: Vec<ScaleResult>,
    pub notes: Vec<String>,
    pub total_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub throughput_secs: f64,
    pub warmup_secs: f64,
    pub rate: f64,
    pub latency_secs: f64,
    pub scale_secs: f64,
    pub tenants: usize,
    pub conns: Vec<usize>,
    pub load_threads: usize,
    pub path: String,
    pub modes: Vec<String>,
    pub scale_tenants: Vec<usize>,
    pub scale_workers: Vec<u32>,
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Results {
    pub fn new(opts: &Opts) -> Results {
        Results {
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            load_before: loadavg(),
            load_after: String::new(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            settings: Settings {
                throughput_secs: opts.throughput_secs,
                warmup_secs: opts.warmup_secs,
                rate: opts.rate,
                latency_secs: opts.latency_secs,
                scale_secs: opts.scale_secs,
                tenants: opts.tenants,
                conns: opts.conns.clone(),
                load_threads: opts.load_threads,
                path: opts.path.clone(),
                modes: opts.modes.clone(),
                scale_tenants: opts.scale_tenants.clone(),
                scale_workers: opts.scale_workers.clone(),
            },
            main: Vec::new(),
            scale: Vec::new(),
            notes: Vec::new(),
            total_secs: 0.0,
        }
    }

    pub fn get(&self, mode: Mode) -> Option<&MainResult> {
        self.main.iter().find(|m| m.mode == mode)
    }

    pub fn zero_over_admission(&self) -> bool {
        self.main.iter().filter(|m| m.enforced).all(|m| m.over_admitted() == 0)
            && self.scale.iter().all(|c| c.over_admitted() == 0)
    }

    fn ratio(&self, mode: Mode) -> Option<f64> {
        let a = self.get(Mode::NoLimiter)?.throughput.rps;
        let m = self.get(mode)?.throughput.rps;
        (a > 0.0).then(|| m / a)
    }

    fn added_p99(&self, mode: Mode) -> Option<f64> {
        Some(self.get(mode)?.latency.p99_ms - self.get(Mode::NoLimiter)?.latency.p99_ms)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"))
}

/// A ratio as `0.123x`, or `n/a` when it was not measured.
fn times(v: Option<f64>) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.3}x"))
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// What the platform allows: (e), a proxy-wasm filter that only reads the
/// tenant header, against (a), and the Sluice modes against (e).
fn floor_line(r: &Results) -> Option<String> {
    let floor = r.get(Mode::Floor)?.throughput.rps;
    let of_floor = |m: Mode| r.get(m).map(|x| x.throughput.rps / floor).filter(|_| floor > 0.0);
    let mut line = format!(
        "platform floor: (e) a proxy-wasm filter that only reads the tenant header runs at {}x of (a); \
         of (e)'s throughput, (c) exact reaches {}x and (d) lease {}x",
        opt(r.ratio(Mode::Floor), 3),
        opt(of_floor(Mode::Exact), 3),
        opt(of_floor(Mode::Lease), 3)
    );
    if r.get(Mode::FloorCallout).is_some() {
        let _ = write!(
            line,
            ". (f) the same filter plus one HTTP/2 callout per request to a trivial endpoint (the service's \
             `/healthz`, no Redis) runs at {}x of (a) and adds {} ms to (a)'s p99 at {:.0} req/s: what one \
             callout per request costs on this machine, before any deciding; Sluice's batched callouts (c) \
             and leases (d) are how it goes below that price in throughput",
            opt(r.ratio(Mode::FloorCallout), 3),
            opt(r.added_p99(Mode::FloorCallout), 3),
            r.settings.rate
        );
    }
    // (e) is (a) plus a filter: faster than (a) only when the machine's
    // speed changed during the run.
    if r.ratio(Mode::Floor).is_some_and(|x| x > 1.0) {
        line.push_str(
            ". WARNING: (e) measured faster than (a), which it can not be (it is (a) plus a filter): the machine's \
             speed changed during the run, so every ratio to (a) is flattered; read the ratios to (e) as the lower \
             bound and rerun on a quiet machine",
        );
    }
    Some(line)
}

/// The goals of the issue, each with its figure.
pub fn goals(r: &Results) -> Vec<(String, String, &'static str)> {
    let mut g = Vec::new();
    let exact = r.ratio(Mode::Exact);
    g.push(("exact mode >= 0.5x (a) throughput".into(), times(exact), verdict(exact.map(|x| x >= 0.5))));
    let lease = r.ratio(Mode::Lease);
    g.push(("lease mode >= 0.75x (a) throughput".into(), times(lease), verdict(lease.map(|x| x >= 0.75))));
    for mode in [Mode::Exact, Mode::Lease] {
        let added = r.added_p99(mode);
        // What a callout that does nothing adds: the platform's share.
        let platform = r
            .added_p99(Mode::FloorCallout)
            .map_or(String::new(), |f| format!(" ((f), a trivial callout alone: {f:.3} ms)"));
        g.push((
            format!("p99 added by Sluice {} <= 1 ms at {:.0} req/s", mode.short(), r.settings.rate),
            opt(added, 3) + " ms" + &platform,
            verdict(added.map(|x| x <= 1.0)),
        ));
    }
    let enforced: Vec<&MainResult> = r.main.iter().filter(|m| m.enforced).collect();
    let scaled: Vec<&ScaleResult> = r.scale.iter().filter(|c| c.enforced).collect();
    let over: u64 = enforced.iter().map(|m| m.over_admitted()).sum::<u64>()
        + scaled.iter().map(|c| c.over_admitted()).sum::<u64>();
    let reached = enforced.iter().all(|m| m.limits_reached()) && scaled.iter().all(|c| c.capped_admitted == crate::SCALE_CAP);
    g.push((
        "zero over-admission in every mode and run".into(),
        format!(
            "{over} over-admitted ({} capped tenants per main run, 1 per scaling cell; every limit reached: {reached})",
            crate::CAPPED.len()
        ),
        if !enforced.is_empty() && over == 0 && !reached {
            // Nothing over a limit, but a limit nobody reached shows nothing.
            "**not shown** (a capped tenant did not reach its limit: run longer)"
        } else {
            verdict((!enforced.is_empty()).then_some(over == 0))
        },
    ));
    g
}

pub fn summary(r: &Results) -> String {
    let mut s = String::from("\nsluice bench: ratios to (a) Envoy without a limiter\n");
    if crate::stack::is_diagnostic() {
        s.push_str("  DIAGNOSTIC RUN: (c) and (d) did not run the shipped plugin config (see the report)\n");
    }
    for m in &r.main {
        let _ = writeln!(
            s,
            "  {:<24} {:>8.0} req/s  {:>6}x   p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms",
            m.mode.label(),
            m.throughput.rps,
            opt(r.ratio(m.mode), 3),
            m.latency.p50_ms,
            m.latency.p99_ms,
            m.latency.p999_ms
        );
    }
    s.push_str("goals:\n");
    for (goal, figure, v) in goals(r) {
        let _ = writeln!(s, "  {goal}: {figure} ({})", v.replace("**", ""));
    }
    if let Some(f) = floor_line(r) {
        let _ = writeln!(s, "  {f}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let st = &r.settings;
    let _ = writeln!(s, "# Sluice bench\n");
    let _ = writeln!(
        s,
        "One run, {} cores, load average before `{}`, after `{}`; {:.0} s in all. Every figure below \
         comes from this run; compare ratios, not absolute numbers, and rerun on a quiet machine \
         (load average well under 1) before trusting them.\n",
        r.cores, r.load_before, r.load_after, r.total_secs
    );
    let _ = writeln!(
        s,
        "Through real Envoy (`envoy/envoy.yaml` rendered on free ports, 1 worker) to the demo upstream \
         (`GET {}`), {} tenants round-robin. Max throughput: the best of closed loops over {} \
         keep-alive HTTP/1.1 connections (each configuration at each count; the count of its best \
         is in the sweep table and also drives its scaling cells), {} s each after {} s warm-up. Latency: open loop at a constant {:.0} req/s for {} s \
         (precomputed schedule, latency from each request's intended send time: no coordinated \
         omission). Load generator, Envoy, the upstream, the quota service and Redis share the \
         machine's cores.\n",
        st.path, st.tenants, st.conns.iter().map(usize::to_string).collect::<Vec<_>>().join(" / "), st.throughput_secs, st.warmup_secs, st.rate, st.latency_secs
    );
    let _ = writeln!(s, "## Goals\n\n| goal | figure | |\n| --- | --- | --- |");
    for (goal, figure, v) in goals(r) {
        let _ = writeln!(s, "| {goal} | {figure} | {v} |");
    }
    if let Some(f) = floor_line(r) {
        let _ = writeln!(s, "\n{f}");
    }
    let _ = writeln!(
        s,
        "\n## Side by side\n\n| configuration | max req/s | ratio to (a) | 2xx/s | 429 | 503 | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | achieved req/s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for m in &r.main {
        let t = &m.throughput;
        let l = &m.latency;
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {:.0} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} |",
            m.mode.label(),
            t.rps,
            opt(r.ratio(m.mode), 3),
            t.ok_rps,
            t.counts.denied + l.counts.denied,
            t.counts.unavailable + l.counts.unavailable,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            l.achieved_rps
        );
    }
    let _ = writeln!(
        s,
        "\nmax req/s and 2xx/s: answers and 2xx answers per second in the best max-throughput run; 429 and 503: \
         how many of each in the best max-throughput run and the latency run together; p50 to max: latency of the open \
         loop; achieved req/s: the rate the open loop really sent (it should equal the offered rate; lower means \
         the load generator fell behind and the latency figures are not at that rate)."
    );
    let _ = writeln!(
        s,
        "\n(b) is `envoy.filters.http.local_ratelimit` with one token bucket per worker sized never to \
         reject during the run (10,000,000 tokens/s): the cost of the cheapest limiter, not of its 429s. \
         It is not per tenant and counts nothing across workers or Envoys. (e) is `bench/floor`, a proxy-wasm \
         filter (same SDK, same V8 runtime) that reads the tenant header and continues: what it costs is the \
         price of running any Wasm filter, which no Wasm limiter can go under. (f) is the same module \
         calling out once per request (`GET /healthz` of the quota service over the shipped `sluice_quota` \
         cluster, HTTP/2 h2c, answered without Redis) before it continues: the price of asking any \
         service per request. The Sluice modes run fail-closed \
         with a 2 s callout timeout, so a decision that does not come back is a 503, never an uncounted \
         admission. The capped tenants' 429s are part of each Sluice run ({} of {} tenants). (c) and (d) use the \
         shipped plugin config (`envoy/envoy.yaml`) with `\"batching\": {}` (batched callouts: past 8 single checks in flight a \
         worker sends its checks together, each still decided on its own); (d) adds `\"lease\": {{\"max_units\": 64}}` (ttl 1000 ms) to its \
         default policy.\n",
        crate::CAPPED.len(),
        st.tenants,
        std::env::var_os("SLUICE_BENCH_NO_BATCHING").is_none()
    );
    // Diagnostic runs say so: their (c) and (d) are not the shipped config.
    for (var, what) in [
        ("SLUICE_BENCH_NO_POLICIES", "without the shipped route policies".to_string()),
        (
            "SLUICE_BENCH_PLUGIN_CHANGES",
            format!("with these top-level fields replaced: `{}`", std::env::var("SLUICE_BENCH_PLUGIN_CHANGES").unwrap_or_default()),
        ),
    ] {
        if std::env::var_os(var).is_some() {
            let _ = writeln!(s, "**Diagnostic run** (`{var}`): (c) and (d) ran {what}.\n");
        }
    }
    let _ = writeln!(s, "## Max throughput by connection count\n");
    let counts = &st.conns;
    let _ = writeln!(
        s,
        "| configuration | {} | best at |\n| --- |{} ---: |",
        counts.iter().map(|c| format!("{c} conns")).collect::<Vec<_>>().join(" | "),
        " ---: |".repeat(counts.len())
    );
    for m in &r.main {
        let cells: Vec<String> = counts
            .iter()
            .map(|c| m.sweep.iter().find(|(n, _)| n == c).map_or("n/a".into(), |(_, rps)| format!("{rps:.0}")))
            .collect();
        let _ = writeln!(s, "| {} | {} | {} |", m.mode.label(), cells.join(" | "), m.conns);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "## Admitted per tenant (counted at the upstream)\n\nThe limits are those the Sluice modes enforce: 3 \
         tenants get a small hour limit each run goes past, every other tenant the bench tier, whose hour limit \
         ({}) no run can reach. The configurations without a limiter show what the same load sends without one.\n",
        crate::stack::BENCH_TIER_HOUR
    );
    let _ = writeln!(
        s,
        "| configuration | tenant | limit (hour) | admitted | over limit |\n| --- | --- | ---: | ---: | ---: |"
    );
    for m in &r.main {
        for row in m.admission.iter().filter(|r| r.limit.is_some()) {
            let limit = row.limit.unwrap_or(0);
            let over = if m.enforced { row.admitted.saturating_sub(limit).to_string() } else { "no limiter".into() };
            let _ = writeln!(s, "| {} | {} | {} | {} | {} |", m.mode.short(), row.tenant, limit, row.admitted, over);
        }
        let others: Vec<&crate::report::AdmissionRow> = m.admission.iter().filter(|r| r.limit.is_none()).collect();
        let total: u64 = others.iter().map(|r| r.admitted).sum();
        let _ = writeln!(
            s,
            "| {} | {} other tenants | {} | {} | {} |",
            m.mode.short(),
            others.len(),
            crate::stack::BENCH_TIER_HOUR,
            total,
            if m.enforced { "0" } else { "no limiter" }
        );
    }
    let _ = writeln!(
        s,
        "\n## Where the CPU goes\n\nCPU time per component during the max-throughput measurement, in \
         microseconds per request (user + system, all threads; from /proc/<pid>/stat):\n"
    );
    let _ = writeln!(
        s,
        "| configuration | Envoy | demo upstream | quota service | Redis | load generator | total | cores busy |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for m in &r.main {
        let n = m.throughput.counts.answered().max(1) as f64;
        let us = |v: f64| v * 1e6 / n;
        let c = &m.cpu;
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            m.mode.short(),
            us(c.envoy),
            us(c.upstream),
            us(c.service),
            us(c.redis),
            us(c.load_generator),
            us(c.total()),
            c.total() / m.throughput.seconds.max(0.001)
        );
    }
    let _ = writeln!(
        s,
        "\nSluice counters per run: callouts to the quota cluster (exact mode batches checks past 8 in flight, \
         lease mode spends most requests from a lease, so both make fewer callouts than requests), fail-open / \
         fail-closed decisions:\n"
    );
    for m in r.main.iter().filter(|m| m.enforced) {
        let requests = m.throughput.counts.answered();
        let per = if requests > 0 { m.callouts as f64 / requests as f64 } else { 0.0 };
        let _ = writeln!(
            s,
            "- {}: in its max-throughput run {} requests made {} callouts ({:.3} per request, i.e. about {:.0} \
             requests per callout); over all its runs failed open {}, failed closed {}; Envoy RSS {} -> {} KiB",
            m.mode.short(),
            requests,
            m.callouts,
            per,
            if per > 0.0 { 1.0 / per } else { 0.0 },
            m.failed_open,
            m.failed_closed,
            m.envoy_rss_kib_before,
            m.envoy_rss_kib_after
        );
    }
    let base_p50 = r.get(Mode::NoLimiter).map(|m| m.latency.p50_ms);
    let splits: Vec<_> = r.main.iter().filter_map(|m| m.time_split.map(|t| (m, t))).collect();
    if !splits.is_empty() {
        let _ = writeln!(
            s,
            "\nWhere a decision's time goes in the latency run ({:.0} req/s), means in microseconds from the \
             service's own metrics: its check handler (validation, the script call, the answer) and, inside it, \
             the Redis call (the check script's round trip). In exact mode every request is checked, so what \
             Envoy, the callout's transport and the scheduling of five processes on the machine's cores add is \
             the rest of the p50 added to (a). In lease mode most requests are admitted from a lease without a \
             check (the checks column), so its p50 added can be below one check's time; the checks it makes \
             grant leases, which costs more than a plain check.\n\n\
             | configuration | checks | service handler | of it Redis | p50 added to (a) |\n| --- | ---: | ---: | ---: | ---: |",
            r.settings.rate
        );
        for (m, t) in splits {
            let added = base_p50.map_or("-".to_string(), |b| format!("{:.0}", (m.latency.p50_ms - b) * 1e3));
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {} |",
                m.mode.short(),
                t.checks,
                t.service_us,
                t.redis_us,
                added
            );
        }
    }
    let _ = writeln!(
        s,
        "\n## Scaling\n\nEach cell first sends every tenant one request (so a cell of 100,000 tenants really holds \
         100,000), then runs a closed loop for {} s after 1 s of warm-up, tenants round-robin, at the connection count \
         of the configuration's best main run; the Sluice modes also at the sweep's largest, keeping the better \
         (with many tenants each is cold, and lease mode calls out for most requests). One more tenant, \
         capped at {} requests an hour, takes every 50th slot of the rotation: what reached the upstream of it is \
         the over-admission check of the cell. Envoy RSS before the first request and after the cell shows whether \
         the filter's memory grows with tenants.\n",
        st.scale_secs,
        crate::SCALE_CAP
    );
    let _ = writeln!(
        s,
        "| configuration | Envoy workers | tenants | req/s | conns | ratio to (a), same workers and tenants | 503 | capped tenant admitted / limit | Envoy RSS KiB before -> after |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for c in &r.scale {
        let base = r
            .scale
            .iter()
            .find(|b| b.mode == Mode::NoLimiter && b.workers == c.workers && b.tenants == c.tenants)
            .map(|b| b.throughput.rps)
            .filter(|v| *v > 0.0);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} -> {} |",
            c.mode.short(),
            c.workers,
            c.tenants,
            c.throughput.rps,
            c.conns,
            opt(base.map(|b| c.throughput.rps / b), 3),
            c.throughput.counts.unavailable,
            if c.enforced { format!("{} / {}", c.capped_admitted, crate::SCALE_CAP) } else { "-".into() },
            c.envoy_rss_kib_before,
            c.envoy_rss_kib_after
        );
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    let _ = writeln!(s, "\n![chart](chart.png)");
    s
}
