//! The proxy-wasm adapter: the only module that talks to the host.
//!
//! Each request is a small state machine ([`Phase`]) advanced by host
//! callbacks. Every path out of `ReadingBody` and `AwaitingQuota` either
//! resumes the request or sends a local reply, so no request is ever left
//! paused.
//!
//! Token accounting: an admitted request with a reservation gets a
//! [`Tracker`] that reads usage from the response as it passes (header,
//! JSON body copy up to a cap, or SSE chunks through a bounded scanner). In
//! `on_log` (which also runs for streams the client aborted) the usage
//! report is queued in the root context's [`Outbox`], and the root sends it
//! from `on_tick`. Why not dispatch from the HTTP context: the SDK (0.2.5)
//! routes a callout's answer to the context that was active when it was
//! dispatched; by then the HTTP context is usually gone (the answer is
//! silently dropped, so failures could not be counted), and while it still
//! lives the answer would land in the request's own callback. Dispatched
//! from `on_tick`, the callout is registered to the root, which lives as
//! long as the VM, and its answer comes back to `Root`.
//!
//! Quota leases (`lease` routes): a request first looks in its tenant's
//! slot of the shared lease table and spends from a live lease with
//! compare-and-swap; a callout's grant (or denial) is stored there by the
//! request that got it. Each worker's root remembers the leases its requests
//! stored ([`LeaseBook`]) and, on its tick, takes the expired ones out of the
//! table and sends what they did not spend back in one callout.

use crate::config::{self, CompiledConfig};
use crate::cost::{Body, CostRules};
use crate::decision::{self, CalloutFailure, Outcome, OWNED_RESPONSE_HEADERS};
use crate::host;
use crate::lease::{self, Entry, Found, LeaseConfig, WindowSnap};
use crate::pairs;
use crate::tenant::{self, TenantError};
use crate::usage::{self, SseScanner};
use hashbrown::HashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use sluice_wire::{
    CheckRequest, CheckResponse, LeaseAsk, CHECK_BATCH_PATH, LeaseReturn, LeaseReturnRequest, LeaseReturnResponse, QueueTicket, Reason,
    ReportRequest, UsageReport, CHECK_PATH, LEASE_RETURN_PATH, MAX_LEASE_RETURNS, POOL_HEADER, QUEUE_HEADER,
    REPORT_PATH, TICKET_HEADER, USAGE_PATH,
};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root { id, ..Root::default() }) });
}}

/// Envoy stat names (exported with Envoy's `wasmcustom.` prefix).
const METRIC_NAMES: [&str; 24] = [
    "sluice.allowed",
    "sluice.denied",
    "sluice.failed_open",
    "sluice.failed_closed",
    "sluice.missing_tenant",
    "sluice.invalid_tenant",
    "sluice.exempt",
    "sluice.callout_errors",
    "sluice.invalid_request",
    "sluice.storage_denied",
    "sluice.usage_reported",
    "sluice.usage_report_failed",
    "sluice.usage_missing",
    "sluice.shadow_denied",
    "sluice.reserved",
    "sluice.latency_reports",
    "sluice.queued",
    "sluice.overflow_rejected",
    "sluice.lease_admitted",
    "sluice.lease_denied",
    "sluice.lease_cas_retries",
    "sluice.lease_units_returned",
    "sluice.lease_return_errors",
    "sluice.batched_checks",
];

#[derive(Clone, Copy)]
enum Metric {
    Allowed = 0,
    Denied,
    FailedOpen,
    FailedClosed,
    MissingTenant,
    InvalidTenant,
    Exempt,
    CalloutErrors,
    InvalidRequest,
    StorageDenied,
    UsageReported,
    UsageReportFailed,
    UsageMissing,
    ShadowDenied,
    Reserved,
    LatencyReports,
    Queued,
    OverflowRejected,
    LeaseAdmitted,
    LeaseDenied,
    LeaseCasRetries,
    LeaseUnitsReturned,
    LeaseReturnErrors,
    BatchedChecks,
}

#[derive(Default)]
struct Metrics {
    ids: [Option<u32>; METRIC_NAMES.len()],
}

impl Metrics {
    fn define() -> Metrics {
        let mut m = Metrics::default();
        for (slot, name) in m.ids.iter_mut().zip(METRIC_NAMES) {
            *slot = host::define_counter(name);
        }
        m
    }

    fn inc(&self, metric: Metric) {
        self.add(metric, 1);
    }

    fn add(&self, metric: Metric, n: u64) {
        if let Some(Some(id)) = self.ids.get(metric as usize) {
            host::increment(*id, n);
        }
    }
}

/// What a queued report is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReportKind {
    /// Token usage (`POST /v1/usage`).
    Usage,
    /// Upstream latency (`POST /v1/report`).
    Latency,
}

impl ReportKind {
    fn path(self) -> &'static str {
        match self {
            ReportKind::Usage => USAGE_PATH,
            ReportKind::Latency => REPORT_PATH,
        }
    }
}

/// Reports and batched checks waiting for the root context to send them.
#[derive(Default)]
struct Outbox {
    reports: VecDeque<(ReportKind, Vec<u8>)>,
    /// Checks for the next batch callout (`batching` on).
    checks: Vec<Member>,
    /// Single check callouts of this worker in flight.
    singles: u32,
    /// A tick is scheduled to drain the queue.
    armed: bool,
}

/// Most checks waiting for a batch on one worker; past it a check goes
/// alone (more callouts, never a refusal).
const MAX_WAITING_CHECKS: usize = 4096;
/// Largest batch answer the filter parses (a few hundred bytes a check).
const MAX_BATCH_ANSWER_BYTES: usize = 1024 * 1024;

/// Most reports queued at once. Past it a report is dropped (and counted as
/// failed): its reservation then simply stands.
const MAX_OUTBOX: usize = 4096;
/// Timeout of a usage report callout: nothing waits on it, so it can be long.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A lease this worker stored in the slot table, to report on expiry.
struct Watch {
    slot: u32,
    id: u64,
    expires_at_ms: u64,
}

/// Most leases one worker watches, and most returns it holds; past that a
/// grant is given back at once, and the oldest pending return is dropped
/// (units lost that way are only ever under-admission, never over).
const MAX_WATCHED: usize = 8_192;
const MAX_PENDING_RETURNS: usize = 4_096;

/// Per-worker lease bookkeeping, shared by the root context and its requests.
#[derive(Default)]
struct LeaseBook {
    watched: RefCell<Vec<Watch>>,
    returns: RefCell<Vec<LeaseReturn>>,
    /// The batch of the return callout in flight (re-queued if it fails).
    in_flight: RefCell<Option<(u32, Vec<LeaseReturn>)>>,
    counter: Cell<u64>,
}

impl LeaseBook {
    /// A lease id unique across this Envoy's workers: the host time in ns
    /// (no two workers store a lease at the same nanosecond in practice)
    /// mixed with a per-worker counter.
    fn next_id(&self) -> u64 {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        host::now_ns().rotate_left(16) ^ n
    }

    fn give_back(&self, r: LeaseReturn) {
        let mut returns = self.returns.borrow_mut();
        if returns.len() >= MAX_PENDING_RETURNS {
            let lost = returns.remove(0);
            log::warn!("lease returns backed up; {} units of {} will not be given back", lost.units, lost.tenant);
        }
        returns.push(r);
    }

    fn watch(&self, w: Watch) -> bool {
        let mut watched = self.watched.borrow_mut();
        if watched.len() >= MAX_WATCHED {
            return false;
        }
        watched.push(w);
        true
    }
}

/// What a lease owes the service when it leaves the table.
fn return_of(e: &Entry) -> LeaseReturn {
    LeaseReturn {
        tenant: e.tenant.clone(),
        units: e.units_left,
        spent: e.spent_requests(),
        day: e.day.clone(),
        charged: e.charged.clone(),
    }
}

#[derive(Default)]
struct Root {
    /// The root context's own id, made effective again after it acted on
    /// the requests of a batch.
    id: u32,
    config: Option<Rc<CompiledConfig>>,
    metrics: Rc<Metrics>,
    outbox: Rc<RefCell<Outbox>>,
    /// Report callouts in flight (the configure-time probe is not one).
    reports_in_flight: HashMap<u32, ReportKind>,
    /// Whether `queue_cluster` is set and Envoy knows it (probed at configure).
    can_queue: bool,
    book: Rc<LeaseBook>,
    /// The tick period when no report is queued: the lease tick, or none.
    idle_tick_ms: u64,
    /// Batch callouts in flight, with their checks in order.
    batches: HashMap<u32, Vec<Member>>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if let Some(members) = self.batches.remove(&token) {
            let status = host::header(MapType::HttpCallResponseHeaders, ":status");
            let body = if body_size > 0 && body_size <= MAX_BATCH_ANSWER_BYTES {
                host::buffer(BufferType::HttpCallResponseBody, 0, body_size)
            } else if body_size > MAX_BATCH_ANSWER_BYTES {
                Some(vec![b' '; MAX_BATCH_ANSWER_BYTES + 1])
            } else {
                None
            };
            let answers = decision::parse_batch_answer(status.as_deref(), body.as_deref(), members.len(), MAX_BATCH_ANSWER_BYTES);
            self.decide_batch(members, answers);
            return;
        }
        if self.lease_return_answered(token, body_size) {
            return;
        }
        let Some(kind) = self.reports_in_flight.remove(&token) else {
            return;
        };
        let status = host::header(MapType::HttpCallResponseHeaders, ":status");
        if kind == ReportKind::Latency {
            // Best effort: a lost latency report only thins the histogram.
            if status.as_deref() == Some(b"204") {
                self.metrics.inc(Metric::LatencyReports);
            }
            return;
        }
        if status.as_deref() == Some(b"200") {
            self.metrics.inc(Metric::UsageReported);
        } else {
            self.metrics.inc(Metric::UsageReportFailed);
            log::warn!("usage report failed (status {:?}); the reservation stands", status.map(|s| String::from_utf8_lossy(&s).into_owned()));
        }
    }
}

impl Root {
    /// Handles the answer of a lease return callout; false if `token` is not one.
    fn lease_return_answered(&mut self, token: u32, body_size: usize) -> bool {
        let batch = {
            let mut in_flight = self.book.in_flight.borrow_mut();
            match in_flight.as_ref() {
                Some((t, _)) if *t == token => in_flight.take().map(|(_, b)| b).unwrap_or_default(),
                _ => return false,
            }
        };
        let status = host::header(MapType::HttpCallResponseHeaders, ":status");
        let body = if body_size > 0 && body_size <= decision::MAX_ANSWER_BYTES {
            host::buffer(BufferType::HttpCallResponseBody, 0, body_size)
        } else {
            None
        };
        let answer = match (status.as_deref(), body) {
            (Some(b"200"), Some(b)) => serde_json::from_slice::<LeaseReturnResponse>(&b).ok(),
            _ => None,
        };
        match answer {
            Some(a) => self.metrics.add(Metric::LeaseUnitsReturned, a.returned),
            None => {
                log::warn!("lease return callout failed; retrying on the next tick");
                self.metrics.inc(Metric::LeaseReturnErrors);
                for r in batch {
                    self.book.give_back(r);
                }
            }
        }
        true
    }

    /// Takes every watched lease that has expired out of use (CAS-marking
    /// it returned, so no worker spends it after), then sends what is
    /// pending in one return callout.
    fn return_expired(&self, config: &CompiledConfig) {
        let now = now_ms();
        let expired: Vec<Watch> = {
            let mut watched = self.book.watched.borrow_mut();
            let (expired, live): (Vec<Watch>, Vec<Watch>) = watched.drain(..).partition(|w| w.expires_at_ms <= now);
            *watched = live;
            expired
        };
        for w in expired {
            let key = lease::slot_key(w.slot);
            let mut settled = false;
            for _ in 0..lease::CAS_ATTEMPTS {
                let (value, cas) = host::get_shared(&key);
                let Some(entry) = value.as_deref().and_then(Entry::decode) else {
                    settled = true;
                    break;
                };
                // Pushed out (its evictor reported it) or already reported.
                if entry.id != w.id || !entry.owes_return() {
                    settled = true;
                    break;
                }
                let done = Entry { units_left: 0, returned: true, ..entry.clone() };
                if host::set_shared(&key, &done.encode(), cas) {
                    self.book.give_back(return_of(&entry));
                    settled = true;
                    break;
                }
                self.metrics.inc(Metric::LeaseCasRetries);
            }
            if !settled {
                self.book.watch(w);
            }
        }
        self.send_returns(config);
    }

    /// Sends the waiting checks, `max_checks` to a callout.
    fn send_batches(&mut self, config: &CompiledConfig, mut checks: Vec<Member>) {
        checks.retain(|m| !m.gone());
        let max = config.batching.map_or(1, |b| b.max_checks as usize).max(1);
        while !checks.is_empty() {
            let rest = checks.split_off(checks.len().min(max));
            let batch = std::mem::replace(&mut checks, rest);
            let mut body = Vec::with_capacity(16 + batch.iter().map(|m| m.body.len() + 1).sum::<usize>());
            body.extend_from_slice(b"{\"checks\":[");
            for (i, m) in batch.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(&m.body);
            }
            body.extend_from_slice(b"]}");
            let headers = vec![
                (":method", "POST"),
                (":path", CHECK_BATCH_PATH),
                (":authority", config.quota_authority.as_str()),
                ("content-type", "application/json"),
            ];
            let timeout = Duration::from_millis(config.timeout_ms);
            self.metrics.add(Metric::BatchedChecks, batch.len() as u64);
            match hostcalls::dispatch_http_call(&config.quota_cluster, headers, Some(&body), vec![], timeout) {
                Ok(token) => {
                    self.batches.insert(token, batch);
                }
                Err(status) => {
                    log::warn!("batch dispatch to {:?} failed: {status:?}", config.quota_cluster);
                    let n = batch.len();
                    self.decide_batch(batch, (0..n).map(|_| Err(CalloutFailure::Dispatch)).collect());
                }
            }
        }
    }

    /// Carries out each check's answer on its own request: the root makes
    /// that request's stream the effective one, resumes it or answers it,
    /// and leaves the rest of the decision in its mailbox.
    fn decide_batch(&self, members: Vec<Member>, answers: Vec<Result<CheckResponse, CalloutFailure>>) {
        let Some(config) = self.config.clone() else { return };
        let env = Env { config: &config, metrics: &self.metrics, book: &self.book, can_queue: self.can_queue };
        for (m, answer) in members.into_iter().zip(answers) {
            if m.gone() || !host::set_effective_context(m.context_id) {
                continue;
            }
            let Member { waits, mailbox, .. } = m;
            let (outcome, tracker) = answer_outcome(&env, waits, answer);
            let mut tracker = tracker;
            let action = carry_out(&self.metrics, outcome, &mut |phase, forwarded| {
                *mailbox.borrow_mut() =
                    Some(Resolved { phase, tracker: tracker.take(), forwarded_at: forwarded.then(host::now).flatten() });
            });
            if let Action::Continue = action {
                host::resume_request();
            }
        }
        // Later host calls of this callback (reports, lease returns) are the root's own.
        if !host::set_effective_context(self.id) {
            log::warn!("could not make the root context effective again");
        }
    }

    fn send_returns(&self, config: &CompiledConfig) {
        if self.book.in_flight.borrow().is_some() || self.book.returns.borrow().is_empty() {
            return;
        }
        let batch: Vec<LeaseReturn> = {
            let mut returns = self.book.returns.borrow_mut();
            let n = returns.len().min(MAX_LEASE_RETURNS);
            returns.drain(..n).collect()
        };
        let request = LeaseReturnRequest { returns: batch };
        let Ok(body) = serde_json::to_vec(&request) else { return };
        let batch = request.returns;
        let headers = vec![
            (":method", "POST"),
            (":path", LEASE_RETURN_PATH),
            (":authority", config.quota_authority.as_str()),
            ("content-type", "application/json"),
        ];
        match hostcalls::dispatch_http_call(&config.quota_cluster, headers, Some(&body), vec![], REPORT_TIMEOUT) {
            Ok(token) => *self.book.in_flight.borrow_mut() = Some((token, batch)),
            Err(_) => {
                self.metrics.inc(Metric::LeaseReturnErrors);
                for r in batch {
                    self.book.give_back(r);
                }
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        self.metrics = Rc::new(Metrics::define());
        let bytes = host::buffer(BufferType::PluginConfiguration, 0, size).unwrap_or_default();
        match config::compile(&bytes) {
            Ok(c) => {
                probe_cluster(&c);
                self.can_queue = probe_queue_cluster(&c);
                self.idle_tick_ms = 0;
                if let Some(ttl) = c.shortest_lease_ttl_ms() {
                    host::create_slots(c.lease_slots, lease::slot_key);
                    // Expired leases are noticed within a quarter of the
                    // shortest lifetime (25 ms .. 500 ms).
                    self.idle_tick_ms = (ttl / 4).clamp(25, 500);
                    set_tick_period_ms(self.idle_tick_ms);
                }
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id: context_id,
            single: false,
            config: self.config.clone(),
            metrics: Rc::clone(&self.metrics),
            outbox: Rc::clone(&self.outbox),
            can_queue: self.can_queue,
            book: Rc::clone(&self.book),
            phase: Phase::Start,
            tracker: None,
            latency: None,
            lease: None,
        }))
    }

    /// Sends every queued report, then goes back to the idle tick (none,
    /// or the lease tick) until the next report arms it again; with leases,
    /// also takes expired leases back.
    fn on_tick(&mut self) {
        let (reports, checks): (Vec<(ReportKind, Vec<u8>)>, Vec<Member>) = {
            let mut outbox = self.outbox.borrow_mut();
            let was_armed = std::mem::replace(&mut outbox.armed, false);
            if was_armed {
                set_tick_period_ms(self.idle_tick_ms);
            }
            (outbox.reports.drain(..).collect(), std::mem::take(&mut outbox.checks))
        };
        let Some(config) = self.config.clone() else { return };
        if !checks.is_empty() {
            self.send_batches(&config, checks);
        }
        if self.idle_tick_ms > 0 {
            self.return_expired(&config);
        }
        for (kind, body) in reports {
            let headers = vec![
                (":method", "POST"),
                (":path", kind.path()),
                (":authority", config.quota_authority.as_str()),
                ("content-type", "application/json"),
            ];
            match hostcalls::dispatch_http_call(&config.quota_cluster, headers, Some(&body), vec![], REPORT_TIMEOUT) {
                Ok(token) => {
                    self.reports_in_flight.insert(token, kind);
                }
                Err(status) if kind == ReportKind::Usage => {
                    self.metrics.inc(Metric::UsageReportFailed);
                    log::warn!("usage report dispatch failed: {status:?}; the reservation stands");
                }
                Err(_) => {}
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Says at configure time, rather than on the first request, when the quota
/// cluster is unknown to Envoy: a misspelt cluster would otherwise only show
/// as every request taking the failure mode.
fn probe_cluster(c: &CompiledConfig) {
    let headers = vec![
        (":method", "GET"),
        (":path", "/healthz"),
        (":authority", c.quota_authority.as_str()),
        ("content-type", "application/json"),
    ];
    if hostcalls::dispatch_http_call(&c.quota_cluster, headers, None, vec![], Duration::from_millis(c.timeout_ms))
        .is_err()
    {
        log::error!(
            "quota_cluster {:?} is not a cluster this Envoy knows; every request will take its route's failure mode",
            c.quota_cluster
        );
    }
}

/// Whether overflow can be queued: `queue_cluster` is set and Envoy knows
/// it. Without it, overflow is answered 429 (case H13) and never forwarded.
fn probe_queue_cluster(c: &CompiledConfig) -> bool {
    let Some(cluster) = c.queue_cluster.as_deref() else {
        if c.uses_upstreams() {
            log::warn!("routes have an upstream but no queue_cluster is set; overflow is answered 429");
        }
        return false;
    };
    let headers = vec![
        (":method", "GET"),
        (":path", "/healthz"),
        (":authority", c.quota_authority.as_str()),
        ("content-type", "application/json"),
    ];
    match hostcalls::dispatch_http_call(cluster, headers, None, vec![], Duration::from_millis(c.timeout_ms)) {
        Ok(_) => true,
        Err(_) => {
            log::error!("queue_cluster {cluster:?} is not a cluster this Envoy knows; overflow is answered 429");
            false
        }
    }
}

/// A check that waits for the request body to know its cost.
struct Pending {
    request: CheckRequest,
    failure_mode: config::FailureMode,
    rules: Arc<CostRules>,
    /// Body bytes buffered so far.
    seen: usize,
}

enum Phase {
    Start,
    ReadingBody(Pending),
    AwaitingQuota {
        failure_mode: config::FailureMode,
        retry_after_s: u64,
        /// Tenant and rules, when the check reserves tokens.
        tokens: Option<(String, Arc<CostRules>)>,
        /// The route is in shadow mode.
        shadow: bool,
    },
    Admitted { headers: decision::Headers },
    /// The check waits in the worker's batch (or its batch callout is in
    /// flight); the root context resumes or answers the request and leaves
    /// the rest of the decision in the mailbox.
    Batched(Rc<RefCell<Option<Resolved>>>),
    Done,
}

/// A batched check's decision, for the request's own later callbacks.
struct Resolved {
    phase: Phase,
    tracker: Option<Tracker>,
    forwarded_at: Option<SystemTime>,
}

/// A check waiting for the root's next tick, then for its batch's answer.
struct Member {
    context_id: u32,
    /// The check, as JSON.
    body: Vec<u8>,
    waits: Waits,
    mailbox: Rc<RefCell<Option<Resolved>>>,
}

impl Member {
    /// The request is gone (reset by the client): nothing to decide.
    fn gone(&self) -> bool {
        Rc::strong_count(&self.mailbox) == 1
    }
}

/// Where the response's usage is read from.
enum UsageSource {
    /// Not known before the response headers.
    Unknown,
    /// The configured header had it: the body is not looked at.
    Header,
    Sse(SseScanner),
    /// A copy of the JSON body, up to `usage::MAX_JSON_BODY`.
    Json { copy: Vec<u8>, overflow: bool },
}

/// Follows the response of a request that reserved tokens.
struct Tracker {
    tenant: String,
    reservation: String,
    rules: Arc<CostRules>,
    source: UsageSource,
    usage: Option<u64>,
    /// The response reached its end (not aborted or reset).
    complete: bool,
}

/// A latency report to send once the upstream answers: the tenant, and
/// when the request was forwarded (host time).
struct PendingLatency {
    tenant: String,
    forwarded_at: Option<SystemTime>,
}

struct Request {
    id: u32,
    /// A single check callout of this request is in flight (counted in
    /// the outbox's `singles`).
    single: bool,
    config: Option<Rc<CompiledConfig>>,
    metrics: Rc<Metrics>,
    outbox: Rc<RefCell<Outbox>>,
    can_queue: bool,
    book: Rc<LeaseBook>,
    phase: Phase,
    tracker: Option<Tracker>,
    latency: Option<PendingLatency>,
    /// Set when the route leases: where to store what the callout answers.
    lease: Option<LeaseSlot>,
}

struct LeaseSlot {
    slot: u32,
    tenant: String,
    policy: String,
    config: LeaseConfig,
}

impl Request {
    fn finish(&mut self, outcome: Outcome) -> Action {
        let mut settled: Option<(Phase, bool)> = None;
        let action = carry_out(&self.metrics, outcome, &mut |phase, forwarded| settled = Some((phase, forwarded)));
        if let Some((phase, forwarded)) = settled {
            self.settle(phase, None, forwarded.then(host::now).flatten());
        }
        action
    }

    /// Moves the request to `phase` once its decision is made; `forwarded_at`
    /// is when an admitted request went on (none: it did not).
    fn settle(&mut self, phase: Phase, tracker: Option<Tracker>, forwarded_at: Option<SystemTime>) {
        self.phase = phase;
        if tracker.is_some() {
            self.tracker = tracker;
        }
        match forwarded_at {
            Some(at) => {
                if let Some(l) = self.latency.as_mut() {
                    l.forwarded_at = Some(at);
                }
            }
            None => self.latency = None,
        }
    }

    /// A batched check's answer, left in its mailbox by the root context
    /// (which already resumed or answered the request), taken into the
    /// request's own state at its next callback.
    fn take_batched(&mut self) {
        let Phase::Batched(mailbox) = &self.phase else { return };
        let mailbox = Rc::clone(mailbox);
        let Some(r) = mailbox.borrow_mut().take() else { return };
        self.settle(r.phase, r.tracker, r.forwarded_at);
    }

    fn release_single(&mut self) {
        if std::mem::replace(&mut self.single, false) {
            let mut outbox = self.outbox.borrow_mut();
            outbox.singles = outbox.singles.saturating_sub(1);
        }
    }

    /// With `batching`, joins the worker's next batch when enough single
    /// checks are in flight; gives the check back when it goes alone.
    fn join_batch(&mut self, config: &CompiledConfig, body: Vec<u8>, waits: Waits) -> Result<Action, (Vec<u8>, Waits)> {
        let Some(b) = config.batching else { return Err((body, waits)) };
        let arm = {
            let mut outbox = self.outbox.borrow_mut();
            if outbox.singles < b.in_flight || outbox.checks.len() >= MAX_WAITING_CHECKS {
                return Err((body, waits));
            }
            let mailbox = Rc::new(RefCell::new(None));
            outbox.checks.push(Member { context_id: self.id, body, waits, mailbox: Rc::clone(&mailbox) });
            self.phase = Phase::Batched(mailbox);
            !std::mem::replace(&mut outbox.armed, true)
        };
        if arm && !host::set_tick_period(Duration::from_millis(1)) {
            // No tick, no batch: send what waits at once, alone.
            log::warn!("could not schedule a batch; checks go one by one");
            self.outbox.borrow_mut().armed = false;
            if let Some(m) = self.outbox.borrow_mut().checks.pop() {
                self.phase = Phase::Done;
                return Err((m.body, m.waits));
            }
        }
        Ok(Action::Pause)
    }

    /// Queues the upstream latency of an admitted request for the root
    /// context to send (fire and forget, like the usage reports).
    fn report_latency(&mut self) {
        let Some(PendingLatency { tenant, forwarded_at: Some(at) }) = self.latency.take() else {
            return;
        };
        let Some(now) = host::now() else { return };
        let ms = now.duration_since(at).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let report = ReportRequest { tenant, upstream_latency_ms: ms.min(3_600_000) };
        if let Ok(body) = serde_json::to_vec(&report) {
            self.queue(ReportKind::Latency, body);
        }
    }

    /// Puts a report in the root context's outbox and arms its timer.
    fn queue(&mut self, kind: ReportKind, body: Vec<u8>) {
        let arm = {
            let mut outbox = self.outbox.borrow_mut();
            if outbox.reports.len() >= MAX_OUTBOX {
                drop(outbox);
                if kind == ReportKind::Usage {
                    self.metrics.inc(Metric::UsageReportFailed);
                }
                return;
            }
            outbox.reports.push_back((kind, body));
            !std::mem::replace(&mut outbox.armed, true)
        };
        // Sets the root context's timer (Envoy keeps one per root context).
        if arm && !host::set_tick_period(Duration::from_millis(1)) {
            self.outbox.borrow_mut().armed = false;
            log::warn!("could not schedule a report");
        }
    }

    fn fail(&mut self, failure_mode: config::FailureMode, retry_after_s: u64, why: CalloutFailure) -> Outcome {
        fail(&self.metrics, failure_mode, retry_after_s, why)
    }

    fn on_request_headers(&mut self, config: &CompiledConfig, end_of_stream: bool) -> Action {
        let raw = host::header_pairs(MapType::HttpRequestHeaders);
        let Some(headers) = pairs::decode(&raw) else {
            return self.finish(decision::invalid_tenant(&config.tenant_header, "unreadable request headers"));
        };

        // Internal headers are the filter's own; a client must never be able
        // to set them (e.g. to pick a route that skips quotas).
        let mut internal: Vec<&[u8]> = Vec::new();
        let mut tenant_values: Vec<&[u8]> = Vec::new();
        let mut path: &[u8] = b"/";
        for (name, value) in &headers {
            if name.len() >= 9 && name.get(..9).is_some_and(|p| p.eq_ignore_ascii_case(b"x-sluice-")) {
                if !internal.contains(name) {
                    internal.push(name);
                }
            } else if name.eq_ignore_ascii_case(config.tenant_header.as_bytes()) {
                tenant_values.push(value);
            } else if *name == b":path" {
                path = value;
            }
        }
        let stripped = !internal.is_empty();
        // One the routes match on (the shipped configs drop these before routing).
        let routing = internal
            .iter()
            .find(|n| [QUEUE_HEADER, TICKET_HEADER, POOL_HEADER].iter().any(|h| n.eq_ignore_ascii_case(h.as_bytes())))
            .and_then(|n| std::str::from_utf8(n).ok())
            .map(str::to_ascii_lowercase);
        for name in internal {
            if let Ok(name) = std::str::from_utf8(name) {
                host::set_header(MapType::HttpRequestHeaders, name, None);
            }
        }
        if stripped {
            // Envoy may already have picked a route with the client's
            // header (e.g. a forged x-sluice-pool): pick it again without.
            host::foreign("clear_route_cache");
            // But the route name and metadata Envoy shows the filter stay
            // those of the first pick: a policy chosen by them could be
            // skipped. The shipped configs drop these headers before
            // routing (early_header_mutation_extensions); without that,
            // refuse rather than price the request by a forged route.
            if let Some(name) = routing.filter(|_| config.has_named_policies()) {
                self.metrics.inc(Metric::InvalidRequest);
                return self.finish(decision::invalid_request(
                    &name,
                    "is an internal Sluice routing header and must not be sent by clients",
                ));
            }
        }

        let path = std::str::from_utf8(path).unwrap_or("/");
        let path = path.split('?').next().unwrap_or(path);
        if config.is_exempt_path(path) {
            self.metrics.inc(Metric::Exempt);
            self.phase = Phase::Done;
            return Action::Continue;
        }

        let (route_name, meta_policy) = if config.has_named_policies() {
            (
                if config.uses_route_name() { property_string(&["xds", "route_name"]) } else { None },
                if config.uses_route_metadata() {
                    property_string(&["xds", "route_metadata", "filter_metadata", "sluice", "policy"])
                } else {
                    None
                },
            )
        } else {
            (None, None)
        };
        let policy = config.select(path, route_name.as_deref(), meta_policy.as_deref());
        if policy.exempt {
            self.metrics.inc(Metric::Exempt);
            self.phase = Phase::Done;
            return Action::Continue;
        }

        let tenant = match tenant::extract(&tenant_values) {
            Ok(t) => t,
            Err(TenantError::Missing) => {
                self.metrics.inc(Metric::MissingTenant);
                return self.finish(decision::missing_tenant(&config.tenant_header));
            }
            Err(TenantError::Invalid(why)) => {
                self.metrics.inc(Metric::InvalidTenant);
                return self.finish(decision::invalid_tenant(&config.tenant_header, why));
            }
        };

        let request = CheckRequest {
            tenant: tenant.to_string(),
            cost: policy.cost,
            policy: Some(policy.name.clone()),
            route_limits: policy.limits.clone(),
            tokens: 0,
            upload: policy.upload,
            shadow: policy.shadow,
            upstream: policy.upstream.clone(),
            can_queue: self.can_queue && policy.upstream.is_some(),
            on_quota_exceeded: policy.on_quota_exceeded,
            max_wait_ms: policy.max_wait_ms,
            lease: None,
        };
        // A route in shadow mode never blocks, not even when the service is down.
        let failure_mode = if policy.shadow { config::FailureMode::Open } else { policy.failure_mode };
        if policy.report_latency {
            self.latency = Some(PendingLatency { tenant: tenant.to_string(), forwarded_at: None });
        }
        let mut request = request;
        if let Some(lcfg) = policy.lease {
            let now = now_ms();
            let slot = lease::slot_of(tenant, &policy.name, config.lease_slots);
            let key = lease::slot_key(slot);
            for _ in 0..lease::CAS_ATTEMPTS {
                let (value, cas) = host::get_shared(&key);
                match lease::on_request(value.as_deref(), tenant, &policy.name, policy.cost, now, &lcfg) {
                    Found::Spend { new_value, entry } => {
                        if host::set_shared(&key, &new_value, cas) {
                            self.metrics.inc(Metric::Allowed);
                            self.metrics.inc(Metric::LeaseAdmitted);
                            return self.finish(decision::admit_from_lease(&entry, now));
                        }
                        // Another worker changed the slot first: look again.
                        self.metrics.inc(Metric::LeaseCasRetries);
                    }
                    Found::Deny { entry } => {
                        self.metrics.inc(Metric::Denied);
                        self.metrics.inc(Metric::LeaseDenied);
                        return self.finish(decision::deny_from_lease(&entry, entry.unit_cost.max(policy.cost), now));
                    }
                    Found::Callout { want } => {
                        request.lease = (want > 0).then_some(LeaseAsk { want });
                        break;
                    }
                }
            }
            self.lease = Some(LeaseSlot { slot, tenant: tenant.to_string(), policy: policy.name.clone(), config: lcfg });
        }
        if let Some(rules) = &policy.cost_rules {
            let pending = Pending { request, failure_mode, rules: Arc::clone(rules), seen: 0 };
            if end_of_stream {
                return self.price_and_dispatch(config, pending, Body::Missing);
            }
            // Only body routes wait for the body; every other route calls out
            // now. The headers go on (Envoy's wasm host turns a paused
            // header callback into "stop everything", so the body would
            // never reach the filter); the body is held below until the
            // decision, and Envoy's buffer filter after this one keeps the
            // headers from the router until then (see envoy/envoy.yaml).
            self.phase = Phase::ReadingBody(pending);
            return Action::Continue;
        }
        self.dispatch(config, request, failure_mode, None)
    }

    /// Prices the request from its body (400 for bad client numbers), then
    /// calls out.
    fn price_and_dispatch(&mut self, config: &CompiledConfig, pending: Pending, body: Body<'_>) -> Action {
        let Pending { mut request, failure_mode, rules, .. } = pending;
        match rules.estimate(request.cost, body) {
            Ok(estimate) => {
                request.cost = estimate.units;
                request.tokens = estimate.tokens;
                let track = (estimate.tokens > 0).then(|| (request.tenant.clone(), rules));
                self.dispatch(config, request, failure_mode, track)
            }
            Err(e) => {
                self.metrics.inc(Metric::InvalidRequest);
                if e.too_large {
                    self.finish(decision::payload_too_large(&e.message))
                } else {
                    self.finish(decision::invalid_request(&e.field, &e.message))
                }
            }
        }
    }

    fn dispatch(
        &mut self,
        config: &CompiledConfig,
        request: CheckRequest,
        failure_mode: config::FailureMode,
        tokens: Option<(String, Arc<CostRules>)>,
    ) -> Action {
        let retry_after_s = config.unavailable_retry_after_s;
        let shadow = request.shadow;
        let Ok(body) = serde_json::to_vec(&request) else {
            let outcome = self.fail(failure_mode, retry_after_s, CalloutFailure::Dispatch);
            return self.finish(outcome);
        };
        let waits = Waits { failure_mode, retry_after_s, tokens, shadow, lease: self.lease.take() };
        let (body, Waits { tokens, lease, .. }) = match self.join_batch(config, body, waits) {
            Ok(action) => return action,
            Err(alone) => alone,
        };
        self.lease = lease;
        let call_headers = vec![
            (":method", "POST"),
            (":path", CHECK_PATH),
            (":authority", config.quota_authority.as_str()),
            ("content-type", "application/json"),
        ];
        match hostcalls::dispatch_http_call(
            &config.quota_cluster,
            call_headers,
            Some(&body),
            vec![],
            Duration::from_millis(config.timeout_ms),
        ) {
            Ok(_) => {
                if config.batching.is_some() {
                    self.single = true;
                    self.outbox.borrow_mut().singles += 1;
                }
                self.phase = Phase::AwaitingQuota { failure_mode, retry_after_s, tokens, shadow };
                Action::Pause
            }
            Err(status) => {
                log::warn!("dispatch to {:?} failed: {status:?}", config.quota_cluster);
                let outcome = self.fail(failure_mode, retry_after_s, CalloutFailure::Dispatch);
                self.finish(outcome)
            }
        }
    }

    /// The request body (or its end) arrived while the body route waits for it.
    fn on_body_part(&mut self, body_size: usize, complete: bool) -> Action {
        let Some(config) = self.config.clone() else { return Action::Continue };
        let Phase::ReadingBody(mut pending) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return Action::Continue;
        };
        pending.seen = body_size;
        if body_size > pending.rules.max_body_bytes {
            return self.price_and_dispatch(&config, pending, Body::TooLarge);
        }
        if !complete {
            self.phase = Phase::ReadingBody(pending);
            return Action::Pause;
        }
        let bytes = if body_size == 0 { None } else { host::buffer(BufferType::HttpRequestBody, 0, body_size) };
        match bytes {
            Some(b) => self.price_and_dispatch(&config, pending, Body::Bytes(&b)),
            None => self.price_and_dispatch(&config, pending, Body::Missing),
        }
    }

    /// Queues the usage report of a finished (or aborted) response for the
    /// root context. Without a usage figure nothing is sent: the
    /// reservation stands.
    fn report_usage(&mut self) {
        let Some(mut t) = self.tracker.take() else { return };
        if t.usage.is_none() {
            t.usage = match &mut t.source {
                UsageSource::Sse(scanner) => {
                    scanner.finish();
                    scanner.usage().map(|u| u.total)
                }
                UsageSource::Json { copy, overflow: false } if t.complete => usage::from_json_body(copy).map(|u| u.total),
                _ => None,
            };
        }
        let Some(total_tokens) = t.usage else {
            self.metrics.inc(Metric::UsageMissing);
            return;
        };
        let report = UsageReport { tenant: t.tenant, reservation: t.reservation, total_tokens, complete: t.complete };
        let Ok(body) = serde_json::to_vec(&report) else { return };
        self.queue(ReportKind::Usage, body);
    }

    /// Reads usage from a response body chunk as it passes.
    fn track_body(&mut self, body_size: usize, end_of_stream: bool) {
        let Some(t) = self.tracker.as_mut() else { return };
        match &mut t.source {
            UsageSource::Sse(scanner) if body_size > 0 => {
                if let Some(chunk) = host::buffer(BufferType::HttpResponseBody, 0, body_size) {
                    scanner.feed(&chunk);
                }
            }
            UsageSource::Json { copy, overflow } if body_size > 0 && !*overflow => {
                let room = usage::MAX_JSON_BODY.saturating_sub(copy.len());
                if body_size > room {
                    *overflow = true;
                    copy.clear();
                } else if let Some(chunk) = host::buffer(BufferType::HttpResponseBody, 0, body_size) {
                    copy.extend_from_slice(&chunk);
                }
            }
            _ => {}
        }
        if end_of_stream {
            t.complete = true;
        }
    }
}

/// Puts what the callout answered into the tenant's slot: a grant; or,
/// without one, a probe that lets the next request size its lease from
/// the tenant's rate; or a denial, kept for one lease lifetime at most
/// and never past the binding window's reset. Probes and denials never
/// push out a live lease with units; a lease pushed out is reported back
/// by the worker that pushed it, and a grant that can not be stored is
/// given back whole.
fn store_lease(book: &LeaseBook, metrics: &Metrics, slot: LeaseSlot, resp: &CheckResponse) {
    let now = now_ms();
    let grant = resp.lease.as_ref().filter(|l| l.units > 0 && resp.allowed);
    let units = grant.map_or(0, |l| l.units);
    let life = if !resp.allowed {
        let reset_ms = resp.windows.get(resp.binding).map_or(0, |w| w.reset.saturating_mul(1000));
        slot.config.ttl_ms.min(reset_ms.saturating_sub(now))
    } else if let Some(l) = grant {
        slot.config.ttl_ms.min(l.valid_ms)
    } else {
        slot.config.ttl_ms
    };
    let entry = Entry {
        denied: !resp.allowed,
        returned: false,
        id: book.next_id(),
        units_left: units,
        expires_at_ms: now.saturating_add(life),
        granted: units,
        granted_at_ms: now,
        unit_cost: grant.map_or(0, |l| l.unit_cost),
        tenant: slot.tenant,
        policy: slot.policy,
        tier: resp.tier.clone(),
        pool: resp.reserved_pool.clone().unwrap_or_default(),
        day: grant.map(|l| l.day.clone()).unwrap_or_default(),
        charged: grant.map(|l| l.charged.clone()).unwrap_or_default(),
        windows: resp
            .windows
            .iter()
            .map(|w| WindowSnap { name: w.name.clone(), window: w.window, limit: w.limit, remaining: w.remaining, reset: w.reset })
            .collect(),
    };
    let key = lease::slot_key(slot.slot);
    let bytes = entry.encode();
    for _ in 0..lease::CAS_ATTEMPTS {
        let (value, cas) = host::get_shared(&key);
        let old = value.as_deref().and_then(Entry::decode);
        if !lease::may_replace(old.as_ref(), units > 0, now) {
            return;
        }
        if host::set_shared(&key, &bytes, cas) {
            if let Some(old) = old.filter(Entry::owes_return) {
                book.give_back(return_of(&old));
            }
            if units > 0
                && !book.watch(Watch { slot: slot.slot, id: entry.id, expires_at_ms: entry.expires_at_ms })
            {
                // Too many leases watched: take this one back out now.
                let done = Entry { units_left: 0, returned: true, ..entry.clone() };
                let (_, cas) = host::get_shared(&key);
                if host::set_shared(&key, &done.encode(), cas) {
                    book.give_back(return_of(&entry));
                }
            }
            return;
        }
        metrics.inc(Metric::LeaseCasRetries);
    }
    if units > 0 {
        book.give_back(return_of(&entry));
    }
}

/// Carries out a decision on the current (effective) stream. `settle` gets
/// the phase the request moves to, and whether it went on, before any host
/// call that could call back into the stream.
fn carry_out(metrics: &Metrics, outcome: Outcome, settle: &mut dyn FnMut(Phase, bool)) -> Action {
    match outcome {
        Outcome::Admit { headers, pool, shadow_denied } => {
            if shadow_denied {
                metrics.inc(Metric::ShadowDenied);
            }
            settle(if headers.is_empty() { Phase::Done } else { Phase::Admitted { headers } }, true);
            if let Some(pool) = pool {
                route_to_pool(metrics, &pool);
            }
            Action::Continue
        }
        Outcome::Queue { ticket } => {
            // The queue service answers with the dispatch-time rate-limit
            // headers itself: leave the response alone.
            if forward_to_queue(&ticket) {
                metrics.inc(Metric::Queued);
                settle(Phase::Done, false);
                Action::Continue
            } else {
                metrics.inc(Metric::OverflowRejected);
                carry_out(metrics, decision::no_queue(), settle)
            }
        }
        Outcome::Reply { status, headers, body } => {
            settle(Phase::Done, false);
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            if !host::send_response(status, &hs, body.as_bytes()) {
                // Never leave the request paused with nothing pending:
                // the same status without our headers (a refusal must
                // not turn into an admission).
                log::warn!("could not send the local {status} reply; sending it bare");
                if !host::send_response(status, &[], &[]) {
                    log::error!("could not send a local {status} reply at all");
                }
            }
            Action::Pause
        }
    }
}

/// Sets the internal pool header and makes Envoy pick the route again
/// (Envoy documents the `clear_route_cache` foreign function as the way
/// to re-route after a filter changed request headers).
fn route_to_pool(metrics: &Metrics, pool: &str) {
    if !host::set_header(MapType::HttpRequestHeaders, POOL_HEADER, Some(pool)) {
        log::warn!("could not set {POOL_HEADER}");
        return;
    }
    if !host::foreign("clear_route_cache") {
        log::warn!("clear_route_cache is not available; the request keeps its first route");
    }
    metrics.inc(Metric::Reserved);
}

/// Adds the queue's internal routing headers; Envoy then picks the route
/// again (Envoy 1.40 clears the route cache whenever a wasm filter
/// changes request headers, proved by tests/tests/e2e_queue.rs, and the
/// foreign function makes it explicit), so the queue route, which
/// matches `x-sluice-queue` and comes first in the route table, takes
/// the request. Envoy's `xds.*` properties keep describing the first
/// route, so the new route can not be checked from here: the route
/// table must have the queue route (tests/tests/configs_validate.rs
/// checks the shipped ones). False, and the caller answers 429, when the
/// headers can not be set.
fn forward_to_queue(ticket: &QueueTicket) -> bool {
    if !host::set_header(MapType::HttpRequestHeaders, QUEUE_HEADER, Some(&ticket.upstream))
        || !host::set_header(MapType::HttpRequestHeaders, TICKET_HEADER, Some(&ticket.ticket))
    {
        host::set_header(MapType::HttpRequestHeaders, QUEUE_HEADER, None);
        return false;
    }
    host::foreign("clear_route_cache");
    true
}

fn now_ms() -> u64 {
    host::now_ms()
}

fn set_tick_period_ms(ms: u64) {
    if !host::set_tick_period(Duration::from_millis(ms)) {
        log::error!("could not set the tick period; queued reports and expired leases wait");
    }
}

fn property_string(path: &[&str]) -> Option<String> {
    host::property(path).and_then(|bytes| String::from_utf8(bytes).ok()).filter(|s| !s.is_empty())
}

impl Drop for Request {
    fn drop(&mut self) {
        // A request reset while its single callout was in flight: the SDK
        // drops the answer, so the count is given back here.
        self.release_single();
    }
}

impl Context for Request {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        self.release_single();
        let Some(config) = self.config.clone() else { return };
        let Phase::AwaitingQuota { failure_mode, retry_after_s, tokens, shadow } =
            std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return;
        };
        // A failed callout (a reset) has no response headers: Envoy answers
        // BadArgument, which the SDK's reader would panic on (host.rs).
        let status = host::header(MapType::HttpCallResponseHeaders, ":status");
        let body = if body_size > 0 && body_size <= decision::MAX_ANSWER_BYTES {
            host::buffer(BufferType::HttpCallResponseBody, 0, body_size)
        } else if body_size > decision::MAX_ANSWER_BYTES {
            // Too big to be ours: let parse_answer reject it by size without reading it.
            Some(vec![b' '; decision::MAX_ANSWER_BYTES + 1])
        } else {
            None
        };
        let answer = decision::parse_answer(status.as_deref(), body.as_deref());
        let waits = Waits { failure_mode, retry_after_s, tokens, shadow, lease: self.lease.take() };
        let env = Env { config: &config, metrics: &self.metrics, book: &self.book, can_queue: self.can_queue };
        let (outcome, tracker) = answer_outcome(&env, waits, answer);
        let mut settled: Option<(Phase, bool)> = None;
        let action = carry_out(&self.metrics, outcome, &mut |phase, forwarded| settled = Some((phase, forwarded)));
        if let Some((phase, forwarded)) = settled {
            self.settle(phase, tracker, forwarded.then(host::now).flatten());
        }
        if let Action::Continue = action {
            host::resume_request();
        }
    }
}

/// What a decision needs to know of the request that waits for it.
struct Waits {
    failure_mode: config::FailureMode,
    retry_after_s: u64,
    /// Tenant and rules, when the check reserves tokens.
    tokens: Option<(String, Arc<CostRules>)>,
    /// The route is in shadow mode.
    shadow: bool,
    /// Set when the route leases: where to store what the answer says.
    lease: Option<LeaseSlot>,
}

/// What the decisions of a worker share.
struct Env<'a> {
    config: &'a CompiledConfig,
    metrics: &'a Metrics,
    book: &'a LeaseBook,
    can_queue: bool,
}

/// Turns the quota service's answer to one check (or its failure) into the
/// outcome for the request, counting it, storing a lease the answer grants
/// and, for a token reservation, the tracker that will report usage. The
/// same for a check sent alone and one sent in a batch.
fn answer_outcome(env: &Env<'_>, w: Waits, answer: Result<CheckResponse, CalloutFailure>) -> (Outcome, Option<Tracker>) {
    let resp = match answer {
        Ok(resp) => resp,
        Err(why) => {
            log::warn!("quota callout failed: {}", why.as_str());
            return (fail(env.metrics, w.failure_mode, w.retry_after_s, why), None);
        }
    };
    let metrics = env.metrics;
    let in_shadow = w.shadow || resp.shadow;
    let storage_denied = !resp.allowed && resp.storage.as_ref().is_some_and(|s| s.exceeded);
    if resp.allowed {
        metrics.inc(Metric::Allowed);
    } else if !in_shadow {
        match resp.reason {
            // Counted by carry_out(), once forwarded (or refused).
            Some(Reason::Queued) => {}
            Some(Reason::Capacity | Reason::QueueFull | Reason::SystemOverloaded) => metrics.inc(Metric::OverflowRejected),
            _ => metrics.inc(if storage_denied { Metric::StorageDenied } else { Metric::Denied }),
        }
    }
    if let Some(slot) = w.lease {
        // A tenant in shadow mode is never leased to (nor denied from the table).
        if !in_shadow {
            store_lease(env.book, metrics, slot, &resp);
        }
    }
    let tracker = match (resp.allowed, &resp.reservation, w.tokens) {
        (true, Some(r), Some((tenant, rules))) => Some(Tracker {
            tenant,
            reservation: r.id.clone(),
            rules,
            source: UsageSource::Unknown,
            usage: None,
            complete: false,
        }),
        _ => None,
    };
    (decision::decide(&resp, w.shadow, env.config.shadow_headers, env.can_queue), tracker)
}

fn fail(metrics: &Metrics, failure_mode: config::FailureMode, retry_after_s: u64, why: CalloutFailure) -> Outcome {
    metrics.inc(Metric::CalloutErrors);
    metrics.inc(match failure_mode {
        config::FailureMode::Open => Metric::FailedOpen,
        config::FailureMode::Closed => Metric::FailedClosed,
    });
    decision::on_failure(failure_mode, retry_after_s, why)
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            // on_configure failed; Envoy normally refuses the plugin then,
            // but never let an unconfigured filter admit anyone.
            let outcome = decision::on_failure(config::FailureMode::Closed, 1, CalloutFailure::Dispatch);
            return self.finish(outcome);
        };
        self.on_request_headers(&config, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.take_batched();
        match self.phase {
            Phase::ReadingBody(_) => self.on_body_part(body_size, end_of_stream),
            // Returning Continue here would send the request upstream before
            // the decision: keep buffering until the callout answers.
            Phase::AwaitingQuota { .. } | Phase::Batched(_) => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.take_batched();
        match &self.phase {
            Phase::ReadingBody(p) => {
                let seen = p.seen;
                self.on_body_part(seen, true)
            }
            Phase::AwaitingQuota { .. } | Phase::Batched(_) => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.take_batched();
        self.report_latency();
        if let Phase::Admitted { headers } = &self.phase {
            // Setting a header replaces every value the upstream gave it, so
            // one host call per header keeps exactly one of each.
            for (name, value) in headers {
                host::set_header(MapType::HttpResponseHeaders, name, Some(value));
            }
            for name in OWNED_RESPONSE_HEADERS {
                if !headers.iter().any(|(n, _)| n == name) {
                    host::set_header(MapType::HttpResponseHeaders, name, None);
                }
            }
            self.phase = Phase::Done;
        }
        if let Some(t) = self.tracker.as_mut() {
            let from_header = t.rules.usage_header.as_deref().and_then(|h| {
                host::header(MapType::HttpResponseHeaders, h).and_then(|v| usage::from_header(&v))
            });
            let content_type = host::header(MapType::HttpResponseHeaders, "content-type");
            let sse = content_type.is_some_and(|ct| ct.len() >= 17 && ct.get(..17).is_some_and(|p| p.eq_ignore_ascii_case(b"text/event-stream")));
            t.source = if from_header.is_some() {
                t.usage = from_header;
                UsageSource::Header
            } else if sse {
                UsageSource::Sse(SseScanner::new())
            } else {
                UsageSource::Json { copy: Vec::new(), overflow: false }
            };
            if end_of_stream {
                t.complete = true;
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.track_body(body_size, end_of_stream);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if let Some(t) = self.tracker.as_mut() {
            t.complete = true;
        }
        Action::Continue
    }

    /// Runs once per stream, also when the client aborted it.
    fn on_log(&mut self) {
        self.take_batched();
        self.report_usage();
    }
}
