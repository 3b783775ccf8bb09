//! Pure decision logic around the check script: validating a
//! [`CheckRequest`] and turning the script's per-window rows into a
//! [`CheckResponse`] (names, binding window, retry-after). No I/O here.

use sluice_wire::{
    CheckRequest, CheckResponse, LeaseGrant, LeaseReturn, OnQuotaExceeded, QueueTicket, Reason,
    Reservation, RouteLimit, StorageState, UsageReport, Window, WindowState, MAX_LEASE_RETURNS,
    MAX_LEASE_UNITS, MAX_TOKENS,
};

use crate::config::{MAX_COST, MAX_LIMIT, MAX_ROUTE_LIMITS, MIN_COST};
use crate::upstreams::MAX_WAIT_MS;

/// Why a request was refused before reaching Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// The tenant id is outside the safe set (`invalid_tenant`).
    Tenant(String),
    /// Any other field (`invalid_request`); the message names the field.
    Request(String),
}

/// A check that passed validation: safe to embed in keys and script args.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCheck {
    pub tenant: String,
    pub cost: u64,
    pub policy: Option<String>,
    pub route_limits: Vec<RouteLimit>,
    pub tokens: u64,
    pub upload: bool,
    pub shadow: bool,
    pub upstream: Option<String>,
    pub can_queue: bool,
    pub on_quota_exceeded: OnQuotaExceeded,
    pub max_wait_ms: Option<u64>,
    /// Lease units wanted on top of the cost (0 = no lease).
    pub lease_want: u64,
}

impl ValidCheck {
    /// The route windows as queued items carry them: `hour=50,day=20`.
    pub fn route_spec(&self) -> String {
        route_spec(&self.route_limits)
    }
}

/// `hour=50,day=20`: route windows as the queue scripts carry them.
pub fn route_spec(limits: &[RouteLimit]) -> String {
    limits
        .iter()
        .map(|rl| format!("{}={}", rl.window.as_str(), rl.limit))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn validate(req: CheckRequest) -> Result<ValidCheck, Invalid> {
    if !sluice_wire::is_valid_tenant(req.tenant.as_bytes()) {
        return Err(Invalid::Tenant(
            "tenant: must be 1..=128 bytes of A-Z a-z 0-9 . _ - : @".to_string(),
        ));
    }
    if !(MIN_COST..=MAX_COST).contains(&req.cost) {
        return Err(Invalid::Request(format!(
            "cost: must be between {MIN_COST} and {MAX_COST}, got {}",
            req.cost
        )));
    }
    if let Some(policy) = &req.policy {
        if !sluice_wire::is_valid_policy_name(policy) {
            return Err(Invalid::Request(
                "policy: must be 1..=64 bytes of A-Z a-z 0-9 . _ -".to_string(),
            ));
        }
    }
    if req.route_limits.len() > MAX_ROUTE_LIMITS {
        return Err(Invalid::Request(format!(
            "route_limits: may have at most {MAX_ROUTE_LIMITS} entries, got {}",
            req.route_limits.len()
        )));
    }
    if !req.route_limits.is_empty() && req.policy.is_none() {
        return Err(Invalid::Request(
            "policy: is required when route_limits are given (route counters are kept per policy)"
                .to_string(),
        ));
    }
    for (i, rl) in req.route_limits.iter().enumerate() {
        if rl.window == Window::Second {
            return Err(Invalid::Request(format!(
                "route_limits[{i}].window: route limits are counted in hour, day or month"
            )));
        }
        if rl.limit > MAX_LIMIT {
            return Err(Invalid::Request(format!(
                "route_limits[{i}].limit: must be at most {MAX_LIMIT}"
            )));
        }
        // Two entries for one window would share one counter and be charged twice.
        if req
            .route_limits
            .iter()
            .take(i)
            .any(|other| other.window == rl.window)
        {
            return Err(Invalid::Request(format!(
                "route_limits[{i}].window: duplicate window {:?}",
                rl.window.as_str()
            )));
        }
    }
    if req.tokens > MAX_TOKENS {
        return Err(Invalid::Request(format!(
            "tokens: must be at most {MAX_TOKENS}, got {}",
            req.tokens
        )));
    }
    if let Some(up) = &req.upstream {
        if !sluice_wire::is_valid_policy_name(up) {
            return Err(Invalid::Request(
                "upstream: must be 1..=64 bytes of A-Z a-z 0-9 . _ -".to_string(),
            ));
        }
    } else {
        if !req.on_quota_exceeded.is_reject() {
            return Err(Invalid::Request(
                "on_quota_exceeded: queue needs an upstream (only a route with an upstream has a queue)".to_string(),
            ));
        }
        if req.max_wait_ms.is_some() {
            return Err(Invalid::Request("max_wait_ms: needs an upstream".to_string()));
        }
    }
    if let Some(ms) = req.max_wait_ms {
        if ms == 0 || ms > MAX_WAIT_MS {
            return Err(Invalid::Request(format!(
                "max_wait_ms: must be between 1 and {MAX_WAIT_MS}, got {ms}"
            )));
        }
    }
    let lease_want = match &req.lease {
        None => 0,
        Some(l) if (1..=MAX_LEASE_UNITS).contains(&l.want) => l.want,
        Some(l) => {
            return Err(Invalid::Request(format!(
                "lease.want: must be between 1 and {MAX_LEASE_UNITS}, got {}",
                l.want
            )))
        }
    };
    Ok(ValidCheck {
        tenant: req.tenant,
        cost: req.cost,
        policy: req.policy,
        route_limits: req.route_limits,
        tokens: req.tokens,
        upload: req.upload,
        shadow: req.shadow,
        can_queue: req.can_queue && req.upstream.is_some(),
        upstream: req.upstream,
        on_quota_exceeded: req.on_quota_exceeded,
        max_wait_ms: req.max_wait_ms,
        lease_want,
    })
}

/// One lease return that passed validation: its keys are rebuilt here from
/// the tenant (so they carry its hash tag) and checked parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidReturn {
    pub tenant: String,
    pub units: u64,
    pub spent: u64,
    /// The usage rollup of the grant's day.
    pub rollup: String,
    pub keys: Vec<String>,
}

/// Most counters one lease can have been charged to (3 tier + route windows).
const MAX_CHARGED: usize = 3 + MAX_ROUTE_LIMITS;

fn is_digits(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit())
}

pub fn validate_returns(returns: Vec<LeaseReturn>) -> Result<Vec<ValidReturn>, Invalid> {
    if returns.len() > MAX_LEASE_RETURNS {
        return Err(Invalid::Request(format!(
            "returns: may have at most {MAX_LEASE_RETURNS} entries, got {}",
            returns.len()
        )));
    }
    returns
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if !sluice_wire::is_valid_tenant(r.tenant.as_bytes()) {
                return Err(Invalid::Tenant(format!(
                    "returns[{i}].tenant: must be 1..=128 bytes of A-Z a-z 0-9 . _ - : @"
                )));
            }
            if r.units > MAX_LEASE_UNITS {
                return Err(Invalid::Request(format!(
                    "returns[{i}].units: must be at most {MAX_LEASE_UNITS}, got {}",
                    r.units
                )));
            }
            if r.spent > MAX_LEASE_UNITS {
                return Err(Invalid::Request(format!(
                    "returns[{i}].spent: must be at most {MAX_LEASE_UNITS}, got {}",
                    r.spent
                )));
            }
            if r.units == 0 && r.spent == 0 {
                return Err(Invalid::Request(format!(
                    "returns[{i}].units: nothing to give back or book (units and spent are 0)"
                )));
            }
            if !is_digits(&r.day, 8) {
                return Err(Invalid::Request(format!(
                    "returns[{i}].day: must be YYYYMMDD, got {:?}",
                    r.day
                )));
            }
            if r.charged.is_empty() || r.charged.len() > MAX_CHARGED {
                return Err(Invalid::Request(format!(
                    "returns[{i}].charged: must list 1..={MAX_CHARGED} counters"
                )));
            }
            let mut keys = Vec::with_capacity(r.charged.len());
            for (j, c) in r.charged.iter().enumerate() {
                let key = charged_key(&r.tenant, c).ok_or_else(|| {
                    Invalid::Request(format!(
                        "returns[{i}].charged[{j}]: {c:?} is not q:<window>:<id> or r:<policy>:<window>:<id>"
                    ))
                })?;
                if keys.contains(&key) {
                    return Err(Invalid::Request(format!(
                        "returns[{i}].charged[{j}]: {c:?} is listed twice"
                    )));
                }
                keys.push(key);
            }
            Ok(ValidReturn {
                rollup: crate::keys::usage_day(&r.tenant, &r.day),
                tenant: r.tenant,
                units: r.units,
                spent: r.spent,
                keys,
            })
        })
        .collect()
}

/// The counter key named by a lease's `charged` entry, if it is well formed.
fn charged_key(tenant: &str, charged: &str) -> Option<String> {
    let parts: Vec<&str> = charged.split(':').collect();
    let (policy, window, id) = match parts.as_slice() {
        ["q", w, id] => (None, *w, *id),
        ["r", p, w, id] if sluice_wire::is_valid_policy_name(p) => (Some(*p), *w, *id),
        _ => return None,
    };
    let window = Window::ALL.into_iter().find(|x| x.as_str() == window)?;
    let id_len = match window {
        Window::Hour => 10,
        Window::Day => 8,
        Window::Month => 6,
        // Leases are never granted against a short-term rate.
        Window::Second => return None,
    };
    if !is_digits(id, id_len) {
        return None;
    }
    Some(match policy {
        None => crate::keys::tier_counter(tenant, window, id),
        Some(p) => crate::keys::route_counter(tenant, p, window, id),
    })
}

/// The `charged` entry of a unit row (see [`charged_key`]); token rows are
/// never part of a lease.
fn charged_name(row: &WindowRow, policy: Option<&str>) -> Option<String> {
    match (row.kind, policy) {
        (RowKind::Route, Some(p)) => Some(format!("r:{p}:{}:{}", row.window.as_str(), row.window_id)),
        (RowKind::Tier, _) => Some(format!("q:{}:{}", row.window.as_str(), row.window_id)),
        _ => None,
    }
}

/// A usage report that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidUsage {
    pub tenant: String,
    pub reservation: String,
    pub total_tokens: u64,
    pub complete: bool,
}

pub fn validate_usage(r: UsageReport) -> Result<ValidUsage, Invalid> {
    if !sluice_wire::is_valid_tenant(r.tenant.as_bytes()) {
        return Err(Invalid::Tenant(
            "tenant: must be 1..=128 bytes of A-Z a-z 0-9 . _ - : @".to_string(),
        ));
    }
    // Ids are the decimal numbers the check script hands out.
    if r.reservation.is_empty()
        || r.reservation.len() > 20
        || !r.reservation.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Invalid::Request(
            "reservation: must be the decimal id a check returned".to_string(),
        ));
    }
    if r.total_tokens > MAX_TOKENS {
        return Err(Invalid::Request(format!(
            "total_tokens: must be at most {MAX_TOKENS}, got {}",
            r.total_tokens
        )));
    }
    Ok(ValidUsage {
        tenant: r.tenant,
        reservation: r.reservation,
        total_tokens: r.total_tokens,
        complete: r.complete,
    })
}

/// What kind of window a script row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// A tier window (`hour`, `day`, `month`), charged the cost in units.
    Tier,
    /// A route window (`<policy>-<window>`), charged the cost in units.
    Route,
    /// A token window (`tokens_hour`, `tokens_month`), charged the estimate.
    Tokens,
    /// The tier's short-term rate (window `second`), only in a denial.
    Rate,
}

/// The script's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// CHARGE only: already charged for this request (a replay).
    Charged,
    /// A quota window or the storage quota said no.
    Quota,
    Rate,
    Queued,
    Capacity,
    QueueFull,
    Overloaded,
}

impl Verdict {
    pub fn parse(s: &str) -> Option<Verdict> {
        Some(match s {
            "allow" => Verdict::Allow,
            "charged" => Verdict::Charged,
            "quota" => Verdict::Quota,
            "rate" => Verdict::Rate,
            "queued" => Verdict::Queued,
            "capacity" => Verdict::Capacity,
            "queue_full" => Verdict::QueueFull,
            "overloaded" => Verdict::Overloaded,
            _ => return None,
        })
    }

    pub fn allowed(self) -> bool {
        matches!(self, Verdict::Allow | Verdict::Charged)
    }

    fn reason(self) -> Option<Reason> {
        match self {
            Verdict::Allow | Verdict::Charged => None,
            Verdict::Quota => Some(Reason::Quota),
            Verdict::Rate => Some(Reason::Rate),
            Verdict::Queued => Some(Reason::Queued),
            Verdict::Capacity => Some(Reason::Capacity),
            Verdict::QueueFull => Some(Reason::QueueFull),
            Verdict::Overloaded => Some(Reason::SystemOverloaded),
        }
    }

    /// Whether the capacity step (not a quota) refused the request.
    pub fn is_overflow_rejection(self) -> bool {
        matches!(self, Verdict::Capacity | Verdict::QueueFull | Verdict::Overloaded)
    }
}

/// One window as the check script reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRow {
    pub window: Window,
    pub kind: RowKind,
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    pub reset: u64,
    pub reset_in: u64,
    /// Whether this window refused the request (`used + amount > limit`).
    pub exceeded: bool,
    /// `YYYYMMDDHH`, `YYYYMMDD` or `YYYYMM`.
    pub window_id: String,
}

/// What the check script decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptDecision {
    pub allowed: bool,
    pub tier: String,
    pub rows: Vec<WindowRow>,
    /// Reservation id when tokens were reserved.
    pub reservation: Option<String>,
    /// Storage (used, limit, exceeded) when the check was an upload and the
    /// tenant has a storage quota.
    pub storage: Option<StorageState>,
    /// The tenant or the route is in shadow mode.
    pub shadow: bool,
    /// The tenant's reserved pool, if any.
    pub pool: Option<String>,
    /// Day id (`YYYYMMDD`) of the decision, from Redis TIME.
    pub day: String,
    /// Units charged: the request's cost times the tenant's cost weight.
    pub cost: u64,
    pub verdict: Verdict,
    /// CHECK: seconds until a retry can succeed for the rate and capacity
    /// verdicts (0: take it from the binding window). CHARGE: epoch seconds
    /// when the exceeded windows reset.
    pub extra: u64,
    /// Lease units charged on top of the cost.
    pub lease_units: u64,
    /// Milliseconds until the earliest reset of the charged windows.
    pub lease_valid_ms: u64,
}

/// Builds the wire answer. `tokens` is the request's token estimate (what
/// the reservation holds); `queue` is where a `queued` verdict goes.
pub fn respond(
    decision: ScriptDecision,
    tokens: u64,
    policy: Option<&str>,
    queue: Option<QueueTicket>,
) -> CheckResponse {
    let windows: Vec<WindowState> = decision
        .rows
        .iter()
        .map(|r| WindowState {
            name: match (r.kind, policy) {
                (RowKind::Route, Some(p)) => format!("{p}-{}", r.window.as_str()),
                (RowKind::Tokens, _) => format!("tokens_{}", r.window.as_str()),
                (RowKind::Rate, _) => Window::Second.as_str().to_string(),
                _ => r.window.as_str().to_string(),
            },
            window: r.window,
            limit: r.limit,
            used: r.used,
            remaining: r.remaining,
            reset: r.reset,
            reset_in: r.reset_in.max(1),
        })
        .collect();
    let exceeded: Vec<bool> = decision.rows.iter().map(|r| r.exceeded).collect();
    let lease = (decision.allowed && decision.lease_units > 0).then(|| LeaseGrant {
        units: decision.lease_units,
        unit_cost: decision.cost,
        day: decision.day.clone(),
        valid_ms: decision.lease_valid_ms,
        charged: decision
            .rows
            .iter()
            .filter_map(|r| charged_name(r, policy))
            .collect(),
    });
    let binding = binding_index(&windows, decision.allowed, &exceeded);
    let retry_after = match decision.verdict {
        Verdict::Allow | Verdict::Charged => None,
        Verdict::Quota if !decision.allowed => windows.get(binding).map(|w| w.reset_in),
        Verdict::Quota => None,
        _ => Some(decision.extra.max(1)),
    };
    let reason = if decision.allowed { None } else { decision.verdict.reason() };
    let queue = queue.filter(|_| decision.verdict == Verdict::Queued && !decision.allowed);
    CheckResponse {
        allowed: decision.allowed,
        tier: decision.tier,
        windows,
        binding,
        retry_after,
        reservation: decision
            .reservation
            .filter(|_| decision.allowed)
            .map(|id| Reservation { id, tokens }),
        storage: decision.storage,
        shadow: decision.shadow,
        reserved_pool: decision.pool,
        reason,
        queue,
        lease,
    }
}

/// The `reason` label of `sluice_rejections_total` for a denial bound by a
/// row of this kind and window (one of `metrics::REJECT_REASONS`).
pub fn reject_reason(kind: RowKind, window: Window) -> &'static str {
    match (kind, window) {
        (RowKind::Rate, _) | (_, Window::Second) => "second",
        (RowKind::Tokens, Window::Hour) => "tokens_hour",
        (RowKind::Tokens, _) => "tokens_month",
        (RowKind::Route, Window::Hour) => "route_hour",
        (RowKind::Route, Window::Day) => "route_day",
        (RowKind::Route, _) => "route_month",
        (RowKind::Tier, Window::Hour) => "hour",
        (RowKind::Tier, Window::Day) => "day",
        (RowKind::Tier, _) => "month",
    }
}

/// Denied: among the exceeded windows, the one that resets last (retrying
/// before it resets cannot succeed). Allowed: the fewest remaining units,
/// ties going to the shorter window, then to the earlier entry.
pub fn binding_index(windows: &[WindowState], allowed: bool, exceeded: &[bool]) -> usize {
    let indexed = windows.iter().enumerate();
    let pick = if allowed {
        indexed.min_by_key(|(i, w)| (w.remaining, w.window.nominal_secs(), *i))
    } else {
        indexed
            .filter(|(i, _)| exceeded.get(*i).copied().unwrap_or(false))
            // max_by_key keeps the last maximum; reverse the index so ties keep the first.
            .max_by_key(|(i, w)| (w.reset, std::cmp::Reverse(*i)))
    };
    pick.map_or(0, |(i, _)| i)
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

    #[test]
    fn every_rejection_reason_is_a_metric_label_and_token_windows_are_not_route_windows() {
        let kinds = [RowKind::Tier, RowKind::Route, RowKind::Tokens, RowKind::Rate];
        let windows = [Window::Second, Window::Hour, Window::Day, Window::Month];
        for k in kinds {
            for w in windows {
                let r = reject_reason(k, w);
                assert!(crate::metrics::REJECT_REASONS.contains(&r), "{r}");
            }
        }
        assert_eq!(reject_reason(RowKind::Tokens, Window::Hour), "tokens_hour");
        assert_eq!(reject_reason(RowKind::Tokens, Window::Month), "tokens_month");
        assert_eq!(reject_reason(RowKind::Route, Window::Day), "route_day");
        assert_eq!(reject_reason(RowKind::Tier, Window::Month), "month");
        assert_eq!(reject_reason(RowKind::Rate, Window::Second), "second");
    }

    fn req(tenant: &str, cost: u64) -> CheckRequest {
        CheckRequest {
            tenant: tenant.into(),
            cost,
            policy: None,
            route_limits: vec![],
            tokens: 0,
            upload: false,
            shadow: false,
            upstream: None,
            can_queue: false,
            on_quota_exceeded: OnQuotaExceeded::Reject,
            max_wait_ms: None,
            lease: None,
        }
    }

    fn row(window: Window, route: bool, limit: u64, used: u64, reset: u64) -> WindowRow {
        WindowRow {
            window,
            kind: if route { RowKind::Route } else { RowKind::Tier },
            limit,
            used,
            remaining: limit.saturating_sub(used),
            reset,
            reset_in: 10,
            exceeded: used + 1 > limit,
            window_id: match window {
                Window::Hour => "2026010203".into(),
                Window::Day => "20260102".into(),
                Window::Month => "202601".into(),
                Window::Second => "1767322800".into(),
            },
        }
    }

    fn decision(allowed: bool, rows: Vec<WindowRow>) -> ScriptDecision {
        ScriptDecision {
            allowed,
            tier: "free".into(),
            rows,
            reservation: None,
            storage: None,
            shadow: false,
            pool: None,
            day: "20310312".into(),
            cost: 1,
            verdict: if allowed { Verdict::Allow } else { Verdict::Quota },
            extra: 0,
            lease_units: 0,
            lease_valid_ms: 0,
        }
    }

    #[test]
    fn queue_settings_need_an_upstream_and_a_sane_max_wait() {
        let mut r = req("a", 1);
        r.on_quota_exceeded = OnQuotaExceeded::Queue;
        assert!(matches!(validate(r.clone()), Err(Invalid::Request(m)) if m.starts_with("on_quota_exceeded")));
        r.upstream = Some("llm".into());
        r.max_wait_ms = Some(0);
        assert!(matches!(validate(r.clone()), Err(Invalid::Request(m)) if m.starts_with("max_wait_ms")));
        r.max_wait_ms = Some(5_000);
        r.can_queue = true;
        let v = validate(r.clone()).unwrap();
        assert!(v.can_queue);
        r.upstream = Some("no such".into());
        assert!(matches!(validate(r), Err(Invalid::Request(m)) if m.starts_with("upstream")));
    }

    #[test]
    fn a_queued_verdict_carries_its_ticket_and_other_verdicts_never_do() {
        let ticket = QueueTicket { upstream: "llm".into(), ticket: "ab".repeat(16) };
        let d = |verdict| ScriptDecision {
            verdict,
            extra: 3,
            ..decision(false, vec![row(Window::Hour, false, 10, 1, 5)])
        };
        let q = respond(d(Verdict::Queued), 0, None, Some(ticket.clone()));
        assert_eq!((q.allowed, q.reason, q.queue), (false, Some(Reason::Queued), Some(ticket.clone())));
        let full = respond(d(Verdict::QueueFull), 0, None, Some(ticket));
        assert_eq!((full.reason, full.queue, full.retry_after), (Some(Reason::QueueFull), None, Some(3)));
    }

    #[test]
    fn a_lease_names_every_unit_counter_it_was_charged_to_and_a_return_maps_back_to_those_keys() {
        let mut d = decision(
            true,
            vec![
                row(Window::Hour, false, 100, 9, 3_600),
                row(Window::Day, true, 100, 9, 86_400),
            ],
        );
        d.lease_units = 8;
        d.lease_valid_ms = 1_000;
        d.cost = 2;
        let lease = respond(d, 0, Some("llm"), None).lease.unwrap();
        assert_eq!((lease.units, lease.unit_cost, lease.day.as_str()), (8, 2, "20310312"));
        assert_eq!(lease.charged, ["q:hour:2026010203", "r:llm:day:20260102"]);
        let back = validate_returns(vec![LeaseReturn {
            tenant: "acme".into(),
            units: 3,
            spent: 2,
            day: lease.day,
            charged: lease.charged,
        }])
        .unwrap();
        assert_eq!(
            back[0].keys,
            [
                "sluice:{t:acme}:q:hour:2026010203",
                "sluice:{t:acme}:r:llm:day:20260102"
            ]
        );
        assert_eq!(back[0].rollup, "sluice:{t:acme}:u:20310312");
    }

    #[test]
    fn malformed_lease_returns_name_the_field_and_never_reach_redis() {
        let ret = |tenant: &str, units, day: &str, charged: &[&str]| LeaseReturn {
            tenant: tenant.into(),
            units,
            spent: 0,
            day: day.into(),
            charged: charged.iter().map(|c| c.to_string()).collect(),
        };
        let h = "q:hour:2026010203";
        let d = "20260102";
        for (r, field) in [
            (ret("a b", 1, d, &[h]), "returns[0].tenant"),
            (ret("a", 0, d, &[h]), "returns[0].units"),
            (ret("a", 1, "2026-01-02", &[h]), "returns[0].day"),
            (ret("a", 1, d, &[]), "returns[0].charged"),
            (ret("a", 1, d, &["q:hour:20260102"]), "returns[0].charged[0]"),
            (ret("a", 1, d, &["q:week:2026010203"]), "returns[0].charged[0]"),
            (ret("a", 1, d, &["cfg"]), "returns[0].charged[0]"),
            (ret("a", 1, d, &["r:bad name:day:20260102"]), "returns[0].charged[0]"),
            (ret("a", 1, d, &[h, h]), "returns[0].charged[1]"),
        ] {
            let m = match validate_returns(vec![r]) {
                Err(Invalid::Request(m)) | Err(Invalid::Tenant(m)) => m,
                Ok(v) => panic!("accepted {v:?}"),
            };
            assert!(m.starts_with(field), "{m} should name {field}");
        }
        let mut r = req("a", 1);
        r.lease = Some(sluice_wire::LeaseAsk { want: 0 });
        assert!(matches!(validate(r), Err(Invalid::Request(m)) if m.starts_with("lease.want")));
    }

    #[test]
    fn h10_tenant_ids_outside_the_safe_set_are_invalid_tenant() {
        for t in ["", "a b", "a,b", "{a}", "café", &"x".repeat(129)] {
            assert!(
                matches!(validate(req(t, 1)), Err(Invalid::Tenant(_))),
                "{t:?}"
            );
        }
        assert!(validate(req("acme-01:eu@x", 1)).is_ok());
    }

    #[test]
    fn cost_outside_one_to_a_million_names_the_field() {
        for cost in [0, MAX_COST + 1] {
            match validate(req("a", cost)) {
                Err(Invalid::Request(m)) => assert!(m.starts_with("cost"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(validate(req("a", MAX_COST)).is_ok());
    }

    #[test]
    fn route_limits_need_a_valid_policy_and_distinct_windows() {
        let mut r = req("a", 1);
        r.route_limits = vec![RouteLimit {
            window: Window::Hour,
            limit: 5,
        }];
        assert!(validate(r.clone()).is_err());
        r.policy = Some("bad name".into());
        assert!(validate(r.clone()).is_err());
        r.policy = Some("llm".into());
        assert!(validate(r.clone()).is_ok());
        r.route_limits.push(RouteLimit {
            window: Window::Hour,
            limit: 7,
        });
        assert!(
            matches!(validate(r.clone()), Err(Invalid::Request(m)) if m.contains("route_limits[1]"))
        );
        r.route_limits = (0..9)
            .map(|_| RouteLimit {
                window: Window::Day,
                limit: 1,
            })
            .collect();
        assert!(matches!(validate(r), Err(Invalid::Request(m)) if m.contains("at most 8")));
    }

    #[test]
    fn a_denial_binds_the_exceeded_window_that_resets_last() {
        let d = decision(
            false,
            vec![
                row(Window::Hour, false, 10, 10, 3_600),
                row(Window::Day, false, 100, 50, 86_400),
                row(Window::Month, false, 20, 20, 2_000_000),
            ],
        );
        let r = respond(d, 0, None, None);
        assert_eq!(r.binding, 2);
        assert_eq!(r.retry_after, Some(10));
    }

    #[test]
    fn an_allowed_answer_binds_the_fewest_remaining_and_ties_go_to_the_shorter_window() {
        let d = decision(
            true,
            vec![
                row(Window::Month, false, 10, 5, 3),
                row(Window::Hour, false, 10, 5, 1),
                row(Window::Day, true, 10, 5, 2),
            ],
        );
        let r = respond(d, 0, Some("llm"), None);
        assert_eq!(r.binding, 1);
        assert_eq!(r.retry_after, None);
        assert_eq!(r.windows[2].name, "llm-day");
    }

    #[test]
    fn h16_zero_limits_bind_without_dividing() {
        let d = decision(false, vec![row(Window::Hour, false, 0, 0, 5)]);
        let r = respond(d, 0, None, None);
        assert_eq!(
            (r.binding, r.windows[0].remaining, r.retry_after),
            (0, 0, Some(10))
        );
    }

    #[test]
    fn h02_a_token_denial_binds_the_token_window_and_names_it() {
        let mut tokens = row(Window::Month, false, 1000, 900, 2_000_000);
        tokens.kind = RowKind::Tokens;
        tokens.exceeded = true;
        let hour = row(Window::Hour, false, 100, 3, 3_600);
        let r = respond(decision(false, vec![hour, tokens]), 300, None, None);
        assert_eq!(r.windows[r.binding].name, "tokens_month");
        assert_eq!(r.reservation, None, "a denial reserves nothing");
    }

    #[test]
    fn usage_reports_need_a_decimal_reservation_and_bounded_tokens() {
        let ok = UsageReport {
            tenant: "a".into(),
            reservation: "12".into(),
            total_tokens: 5,
            complete: true,
        };
        assert!(validate_usage(ok.clone()).is_ok());
        for bad in ["", "1a", "-1", "123456789012345678901"] {
            let mut r = ok.clone();
            r.reservation = bad.into();
            assert!(
                matches!(validate_usage(r), Err(Invalid::Request(m)) if m.starts_with("reservation")),
                "{bad:?}"
            );
        }
        let mut r = ok;
        r.total_tokens = MAX_TOKENS + 1;
        assert!(matches!(validate_usage(r), Err(Invalid::Request(m)) if m.starts_with("total_tokens")));
    }
}
