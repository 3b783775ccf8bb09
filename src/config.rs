//! Plugin configuration: JSON in, a validated and compiled [`CompiledConfig`]
//! out. Parsing walks the JSON by hand rather than through serde derive so
//! every error names the exact field (`policies[1].cost must be > 0`), which
//! serde's type errors do not.

use crate::cost::{self, CostRules};
use crate::lease::{self, LeaseConfig};
use hashbrown::HashMap;
use serde_json::{Map, Value};
use sluice_wire::{is_valid_policy_name, OnQuotaExceeded, RouteLimit, Window};
use std::fmt;
use std::sync::Arc;

/// What to do when the quota service can not give an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Forward the request (and count it as failed-open).
    Open,
    /// Answer 503 `quota_service_unavailable`.
    Closed,
}

/// One route policy after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub cost: u64,
    pub failure_mode: FailureMode,
    pub exempt: bool,
    pub limits: Vec<RouteLimit>,
    /// Body-based cost rules; `Some` makes the route buffer the request body.
    pub cost_rules: Option<Arc<CostRules>>,
    /// An upload route: refused (413) while the tenant is at or over its
    /// storage quota.
    pub upload: bool,
    /// Decide and count, but never block: denials are forwarded (and
    /// counted as `sluice_shadow_denied`), a failed callout fails open.
    pub shadow: bool,
    /// Report the upstream latency of admitted requests to the service.
    pub report_latency: bool,
    /// The upstream (named in the service's upstreams file) whose capacity
    /// the route spends; `None`: quotas only.
    pub upstream: Option<String>,
    pub on_quota_exceeded: OnQuotaExceeded,
    /// Max wait in the queue; `None`: the upstream's default.
    pub max_wait_ms: Option<u64>,
    /// Quota leases for this route (`None`: every request is checked).
    pub lease: Option<LeaseConfig>,
}

/// What a policy inherits from the top level.
#[derive(Debug, Clone, Copy)]
struct Inherited {
    failure_mode: FailureMode,
    shadow: bool,
    report_latency: bool,
}

/// The validated configuration shared read-only by every request of a worker.
#[derive(Debug, Clone)]
pub struct CompiledConfig {
    pub quota_cluster: String,
    pub quota_authority: String,
    pub timeout_ms: u64,
    /// Lower-cased: Envoy stores header names lower-case.
    pub tenant_header: String,
    /// Seconds advertised in `Retry-After` of a fail-closed 503.
    pub unavailable_retry_after_s: u64,
    /// In shadow mode, still put the rate-limit headers on responses.
    pub shadow_headers: bool,
    /// Envoy cluster of the queue listener; overflow can only be queued
    /// when it is set and Envoy knows it.
    pub queue_cluster: Option<String>,
    /// Size of the shared lease slot table.
    pub lease_slots: u32,
    /// Batched callouts; `None`: every check is its own callout.
    pub batching: Option<Batching>,
    /// Whether a route's `filter_metadata.sluice.policy` can choose its
    /// policy (one host property read per request when policies exist).
    route_metadata: bool,
    exempt_exact: Vec<String>,
    exempt_prefixes: Vec<String>,
    default_policy: Policy,
    policies: Vec<Policy>,
    by_name: HashMap<String, usize>,
    by_route_name: HashMap<String, usize>,
    /// (prefix, policy index), longest prefix first.
    by_prefix: Vec<(String, usize)>,
}

/// `batching`: past `in_flight` single checks in flight on a worker, a
/// worker's further checks wait for its next tick (1 ms) and go to the
/// service together, at most `max_checks` to a callout. Each is still
/// decided on its own by the service's atomic script before its request
/// goes on: batching changes how checks travel, not what is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub in_flight: u32,
    pub max_checks: u32,
}

pub const DEFAULT_BATCH_IN_FLIGHT: u64 = 8;
pub const DEFAULT_BATCH_MAX_CHECKS: u64 = 64;
/// Most checks in one batched callout (the service takes up to
/// `sluice_wire::MAX_BATCH_CHECKS`).
pub const MAX_BATCH_MAX_CHECKS: u64 = 128;
const BATCHING_FIELDS: &[&str] = &["in_flight", "max_checks"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid sluice config: {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn err<T>(field: &str, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError { field: field.to_string(), message: message.into() })
}

pub const DEFAULT_TIMEOUT_MS: u64 = 100;
pub const DEFAULT_TENANT_HEADER: &str = "x-tenant-id";
pub const DEFAULT_AUTHORITY: &str = "sluice-quota";
/// Upper bound for any cost or limit: large enough for any real quota, small
/// enough that sums of a few of them can never overflow a u64 or a Lua double.
pub const MAX_NUMBER: u64 = 1_000_000_000_000;
const MAX_COST: u64 = 1_000_000;
const MAX_TIMEOUT_MS: u64 = 60_000;
/// Longest max wait a route may ask for (one hour).
pub const MAX_WAIT_MS: u64 = 3_600_000;

const TOP_FIELDS: &[&str] = &[
    "quota_cluster",
    "quota_authority",
    "timeout_ms",
    "tenant_header",
    "failure_mode",
    "exempt_paths",
    "default_policy",
    "policies",
    "unavailable_retry_after_s",
    "shadow",
    "shadow_headers",
    "report_latency",
    "queue_cluster",
    "lease_slots",
    "batching",
    "route_metadata",
];
const POLICY_FIELDS: &[&str] = &[
    "name",
    "path_prefix",
    "route_name",
    "cost",
    "failure_mode",
    "exempt",
    "limits",
    "cost_rules",
    "upload",
    "shadow",
    "report_latency",
    "upstream",
    "on_quota_exceeded",
    "max_wait_ms",
    "lease",
];

/// Parses and validates the plugin configuration.
pub fn compile(bytes: &[u8]) -> Result<CompiledConfig, ConfigError> {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return err("(config)", format!("not valid JSON: {e}")),
    };
    let top = as_object(&value, "(config)")?;
    check_known(top, TOP_FIELDS, "")?;

    let quota_cluster = match opt_str(top, "quota_cluster", "quota_cluster")? {
        Some(s) if !s.trim().is_empty() => s.to_string(),
        Some(_) => return err("quota_cluster", "must not be empty"),
        None => return err("quota_cluster", "is required (the Envoy cluster of the quota service)"),
    };
    let quota_authority = match opt_str(top, "quota_authority", "quota_authority")? {
        Some(s) if !s.trim().is_empty() => s.to_string(),
        Some(_) => return err("quota_authority", "must not be empty"),
        None => DEFAULT_AUTHORITY.to_string(),
    };
    let timeout_ms = opt_positive(top, "timeout_ms", "timeout_ms", MAX_TIMEOUT_MS)?
        .unwrap_or(DEFAULT_TIMEOUT_MS);
    let unavailable_retry_after_s =
        opt_positive(top, "unavailable_retry_after_s", "unavailable_retry_after_s", 3_600)?
            .unwrap_or(1);
    let tenant_header = match opt_str(top, "tenant_header", "tenant_header")? {
        Some(h) => {
            let h = h.to_ascii_lowercase();
            if !is_header_name(&h) {
                return err("tenant_header", "must be a header name (letters, digits, - _ .)");
            }
            if h.starts_with("x-sluice-") {
                return err("tenant_header", "x-sluice-* headers are internal and stripped on entry");
            }
            h
        }
        None => DEFAULT_TENANT_HEADER.to_string(),
    };
    let failure_mode = opt_failure_mode(top, "failure_mode", "failure_mode")?.unwrap_or(FailureMode::Open);
    let inherited = Inherited {
        failure_mode,
        shadow: opt_bool(top, "shadow", "shadow")?.unwrap_or(false),
        report_latency: opt_bool(top, "report_latency", "report_latency")?.unwrap_or(false),
    };
    let shadow_headers = opt_bool(top, "shadow_headers", "shadow_headers")?.unwrap_or(false);
    let queue_cluster = match opt_str(top, "queue_cluster", "queue_cluster")? {
        Some(s) if !s.trim().is_empty() => Some(s.to_string()),
        Some(_) => return err("queue_cluster", "must not be empty"),
        None => None,
    };
    let lease_slots = match opt_number(top, "lease_slots", "lease_slots", u64::from(lease::MAX_SLOTS))? {
        None => lease::DEFAULT_SLOTS,
        Some(n) if n < u64::from(lease::MIN_SLOTS) => {
            return err("lease_slots", format!("must be at least {}", lease::MIN_SLOTS))
        }
        Some(n) => u32::try_from(n).unwrap_or(lease::MAX_SLOTS),
    };
    let batching = match top.get("batching") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(Batching {
            in_flight: DEFAULT_BATCH_IN_FLIGHT as u32,
            max_checks: DEFAULT_BATCH_MAX_CHECKS as u32,
        }),
        Some(v @ Value::Object(_)) => {
            let o = as_object(v, "batching")?;
            check_known(o, BATCHING_FIELDS, "batching")?;
            let in_flight = opt_number(o, "in_flight", "batching.in_flight", 10_000)?.unwrap_or(DEFAULT_BATCH_IN_FLIGHT);
            let max_checks = opt_positive(o, "max_checks", "batching.max_checks", MAX_BATCH_MAX_CHECKS)?
                .unwrap_or(DEFAULT_BATCH_MAX_CHECKS);
            if max_checks < 2 {
                return err("batching.max_checks", "must be at least 2 (1 is no batching: leave batching out)");
            }
            Some(Batching {
                in_flight: u32::try_from(in_flight).unwrap_or(10_000),
                max_checks: u32::try_from(max_checks).unwrap_or(128),
            })
        }
        Some(_) => return err("batching", "must be true, false or an object {\"in_flight\": n, \"max_checks\": n}"),
    };

    let route_metadata = opt_bool(top, "route_metadata", "route_metadata")?.unwrap_or(true);

    let mut exempt_exact = Vec::new();
    let mut exempt_prefixes = Vec::new();
    if let Some(v) = top.get("exempt_paths") {
        let Value::Array(items) = v else { return err("exempt_paths", "must be an array of paths") };
        for (i, item) in items.iter().enumerate() {
            let field = format!("exempt_paths[{i}]");
            let Value::String(p) = item else { return err(&field, "must be a string") };
            if !p.starts_with('/') {
                return err(&field, "must start with /");
            }
            if let Some(prefix) = p.strip_suffix('*') {
                exempt_prefixes.push(prefix.to_string());
            } else if p.ends_with('/') && p.len() > 1 {
                exempt_prefixes.push(p.clone());
            } else {
                exempt_exact.push(p.clone());
            }
        }
    }

    let default_policy = match top.get("default_policy") {
        Some(v) => {
            let p = parse_policy(v, "default_policy", inherited)?;
            let o = as_object(v, "default_policy")?;
            for f in ["path_prefix", "route_name"] {
                if o.contains_key(f) {
                    return err(&format!("default_policy.{f}"), "is not allowed: the default policy matches what nothing else matches");
                }
            }
            p
        }
        None => Policy {
            name: "default".to_string(),
            cost: 1,
            failure_mode,
            exempt: false,
            limits: Vec::new(),
            cost_rules: None,
            upload: false,
            shadow: inherited.shadow,
            report_latency: inherited.report_latency,
            upstream: None,
            on_quota_exceeded: OnQuotaExceeded::Reject,
            max_wait_ms: None,
            lease: None,
        },
    };

    let mut policies = Vec::new();
    let mut by_name = HashMap::new();
    let mut by_route_name = HashMap::new();
    let mut by_prefix = Vec::new();
    if let Some(v) = top.get("policies") {
        let Value::Array(items) = v else { return err("policies", "must be an array of policies") };
        for (i, item) in items.iter().enumerate() {
            let path = format!("policies[{i}]");
            let policy = parse_policy(item, &path, inherited)?;
            let o = as_object(item, &path)?;
            let prefix = opt_str(o, "path_prefix", &format!("{path}.path_prefix"))?;
            let route_name = opt_str(o, "route_name", &format!("{path}.route_name"))?;
            if !o.contains_key("name") {
                return err(&format!("{path}.name"), "is required");
            }
            if policy.name == default_policy.name {
                return err(&format!("{path}.name"), format!("`{}` is the default policy's name", policy.name));
            }
            if by_name.insert(policy.name.clone(), i).is_some() {
                return err(&format!("{path}.name"), format!("duplicate policy name `{}`", policy.name));
            }
            if let Some(p) = prefix {
                if !p.starts_with('/') {
                    return err(&format!("{path}.path_prefix"), "must start with /");
                }
                if by_prefix.iter().any(|(q, _): &(String, usize)| q == p) {
                    return err(&format!("{path}.path_prefix"), format!("`{p}` is used by another policy"));
                }
                by_prefix.push((p.to_string(), i));
            }
            if let Some(r) = route_name {
                if r.is_empty() {
                    return err(&format!("{path}.route_name"), "must not be empty");
                }
                if by_route_name.insert(r.to_string(), i).is_some() {
                    return err(&format!("{path}.route_name"), format!("`{r}` is used by another policy"));
                }
            }
            if !route_metadata && prefix.is_none() && route_name.is_none() {
                return err(
                    &path,
                    format!(
                        "policy `{}` has neither path_prefix nor route_name, and route_metadata is false: nothing could choose it",
                        policy.name
                    ),
                );
            }
            policies.push(policy);
        }
    }
    by_prefix.sort_by_key(|(p, _): &(String, usize)| std::cmp::Reverse(p.len()));

    Ok(CompiledConfig {
        quota_cluster,
        quota_authority,
        timeout_ms,
        tenant_header,
        unavailable_retry_after_s,
        shadow_headers,
        queue_cluster,
        lease_slots,
        batching,
        route_metadata,
        exempt_exact,
        exempt_prefixes,
        default_policy,
        policies,
        by_name,
        by_route_name,
        by_prefix,
    })
}

fn parse_policy(v: &Value, path: &str, inherited: Inherited) -> Result<Policy, ConfigError> {
    let o = as_object(v, path)?;
    check_known(o, POLICY_FIELDS, path)?;
    let name = match opt_str(o, "name", &format!("{path}.name"))? {
        Some(n) if is_valid_policy_name(n) => n.to_string(),
        Some(_) => return err(&format!("{path}.name"), "must be 1-64 characters of A-Z a-z 0-9 . _ -"),
        None => "default".to_string(),
    };
    let cost = opt_positive(o, "cost", &format!("{path}.cost"), MAX_COST)?.unwrap_or(1);
    let failure_mode =
        opt_failure_mode(o, "failure_mode", &format!("{path}.failure_mode"))?.unwrap_or(inherited.failure_mode);
    let shadow = opt_bool(o, "shadow", &format!("{path}.shadow"))?.unwrap_or(inherited.shadow);
    let report_latency =
        opt_bool(o, "report_latency", &format!("{path}.report_latency"))?.unwrap_or(inherited.report_latency);
    let exempt = match o.get("exempt") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return err(&format!("{path}.exempt"), "must be true or false"),
    };
    let mut limits = Vec::new();
    if let Some(l) = o.get("limits") {
        let lpath = format!("{path}.limits");
        let lo = as_object(l, &lpath)?;
        check_known(lo, &["hour", "day", "month"], &lpath)?;
        for window in Window::ALL {
            let f = format!("{lpath}.{}", window.as_str());
            // A route limit of 0 is allowed: it closes the route for everyone.
            if let Some(limit) = opt_number(lo, window.as_str(), &f, MAX_NUMBER)? {
                limits.push(RouteLimit { window, limit });
            }
        }
    }
    let cost_rules = match o.get("cost_rules") {
        None => None,
        Some(v) => Some(Arc::new(cost::compile_rules(v, &format!("{path}.cost_rules"))?)),
    };
    let upload = match o.get("upload") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return err(&format!("{path}.upload"), "must be true or false"),
    };
    if exempt && (cost_rules.is_some() || upload) {
        return err(&format!("{path}.exempt"), "an exempt policy counts nothing: drop cost_rules and upload");
    }
    let upstream = match opt_str(o, "upstream", &format!("{path}.upstream"))? {
        Some(u) if is_valid_policy_name(u) => Some(u.to_string()),
        Some(_) => return err(&format!("{path}.upstream"), "must be 1-64 characters of A-Z a-z 0-9 . _ -"),
        None => None,
    };
    let on_quota_exceeded = match opt_str(o, "on_quota_exceeded", &format!("{path}.on_quota_exceeded"))? {
        None | Some("reject") => OnQuotaExceeded::Reject,
        Some("queue") => OnQuotaExceeded::Queue,
        Some(other) => {
            return err(&format!("{path}.on_quota_exceeded"), format!("must be \"reject\" or \"queue\", not {other:?}"))
        }
    };
    let max_wait_ms = opt_positive(o, "max_wait_ms", &format!("{path}.max_wait_ms"), MAX_WAIT_MS)?;
    if upstream.is_none() {
        for f in ["on_quota_exceeded", "max_wait_ms"] {
            if o.contains_key(f) {
                return err(&format!("{path}.{f}"), "needs `upstream`: only a route with an upstream has a queue");
            }
        }
    }
    if exempt && upstream.is_some() {
        return err(&format!("{path}.upstream"), "an exempt route is never checked, so it can not spend an upstream's capacity");
    }
    let lease = match o.get("lease") {
        None => None,
        Some(v) => {
            let lpath = format!("{path}.lease");
            let lo = as_object(v, &lpath)?;
            check_known(lo, &["max_units", "ttl_ms"], &lpath)?;
            let max_units = opt_positive(lo, "max_units", &format!("{lpath}.max_units"), lease::MAX_MAX_UNITS)?
                .unwrap_or(lease::DEFAULT_MAX_UNITS);
            let ttl_ms = match opt_number(lo, "ttl_ms", &format!("{lpath}.ttl_ms"), lease::MAX_TTL_MS)? {
                None => lease::DEFAULT_TTL_MS,
                Some(t) if t < lease::MIN_TTL_MS => {
                    return err(&format!("{lpath}.ttl_ms"), format!("must be at least {}", lease::MIN_TTL_MS))
                }
                Some(t) => t,
            };
            if max_units < cost.saturating_mul(2) {
                return err(
                    &format!("{lpath}.max_units"),
                    format!("must be at least twice the cost ({}): a smaller lease never covers a second request", cost),
                );
            }
            Some(LeaseConfig { max_units, ttl_ms })
        }
    };
    if lease.is_some() {
        // A lease is spent per request at a cost known in advance; these
        // routes price, reserve or forward each request on its own.
        for (on, field) in [(cost_rules.is_some(), "cost_rules"), (upload, "upload"), (shadow, "shadow")] {
            if on {
                return err(&format!("{path}.lease"), format!("a leasing route can not also have {field}"));
            }
        }
        if exempt {
            return err(&format!("{path}.lease"), "an exempt policy counts nothing: drop lease");
        }
    }
    if lease.is_some() && upstream.is_some() {
        // Capacity and fair admission are decided per request at the
        // service; a lease spent locally would bypass both.
        return err(&format!("{path}.lease"), "a route with an upstream (capacity, fair queue) can not lease: drop lease or upstream");
    }
    Ok(Policy {
        name,
        cost,
        failure_mode,
        exempt,
        limits,
        cost_rules,
        upload,
        shadow,
        report_latency,
        upstream,
        on_quota_exceeded,
        max_wait_ms,
        lease,
    })
}

fn opt_bool(o: &Map<String, Value>, key: &str, field: &str) -> Result<Option<bool>, ConfigError> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => err(field, "must be true or false"),
    }
}

/// A lower-case header name: letters, digits, `-`, `_`, `.`.
pub(crate) fn is_header_name(h: &str) -> bool {
    !h.is_empty() && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

pub(crate) fn as_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ConfigError> {
    match v {
        Value::Object(o) => Ok(o),
        _ => err(path, "must be a JSON object"),
    }
}

pub(crate) fn check_known(o: &Map<String, Value>, known: &[&str], path: &str) -> Result<(), ConfigError> {
    for k in o.keys() {
        if !known.contains(&k.as_str()) {
            let field = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            return err(&field, format!("unknown field (expected one of: {})", known.join(", ")));
        }
    }
    Ok(())
}

pub(crate) fn opt_str<'a>(o: &'a Map<String, Value>, key: &str, field: &str) -> Result<Option<&'a str>, ConfigError> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => err(field, "must be a string"),
    }
}

fn opt_failure_mode(o: &Map<String, Value>, key: &str, field: &str) -> Result<Option<FailureMode>, ConfigError> {
    match opt_str(o, key, field)? {
        None => Ok(None),
        Some("open") => Ok(Some(FailureMode::Open)),
        Some("closed") => Ok(Some(FailureMode::Closed)),
        Some(other) => err(field, format!("must be \"open\" or \"closed\", not {other:?}")),
    }
}

/// A whole number in 0..=max.
pub(crate) fn opt_number(o: &Map<String, Value>, key: &str, field: &str, max: u64) -> Result<Option<u64>, ConfigError> {
    let Some(v) = o.get(key) else { return Ok(None) };
    let Value::Number(n) = v else { return err(field, "must be a number") };
    if let Some(u) = n.as_u64() {
        if u > max {
            return err(field, format!("must be at most {max}"));
        }
        return Ok(Some(u));
    }
    if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f < 0.0) {
        return err(field, "must not be negative");
    }
    err(field, "must be a whole number")
}

/// A whole number in 1..=max.
pub(crate) fn opt_positive(o: &Map<String, Value>, key: &str, field: &str, max: u64) -> Result<Option<u64>, ConfigError> {
    match opt_number(o, key, field, max)? {
        Some(0) => err(field, "must be greater than 0"),
        other => Ok(other),
    }
}

impl CompiledConfig {
    /// Whether a path (without query) is exempt from quotas.
    pub fn is_exempt_path(&self, path: &str) -> bool {
        self.exempt_exact.iter().any(|p| p == path)
            || self.exempt_prefixes.iter().any(|p| path.starts_with(p.as_str()))
    }

    /// Whether policy selection can use the route name or route metadata;
    /// lets the adapter skip the host property reads when it can not.
    pub fn uses_route_name(&self) -> bool {
        !self.by_route_name.is_empty()
    }

    pub fn has_named_policies(&self) -> bool {
        !self.policies.is_empty()
    }

    /// Whether a route's metadata can choose its policy: the adapter reads
    /// the `filter_metadata.sluice.policy` property only then.
    pub fn uses_route_metadata(&self) -> bool {
        self.route_metadata && !self.policies.is_empty()
    }

    /// Whether any route spends an upstream's capacity (and may overflow).
    pub fn uses_upstreams(&self) -> bool {
        self.default_policy.upstream.is_some() || self.policies.iter().any(|p| p.upstream.is_some())
    }

    /// Picks the policy for a request. `metadata_policy` is the
    /// `filter_metadata.sluice.policy` of the matched Envoy route.
    /// Precedence: route metadata, then route name, then longest path
    /// prefix, then the default policy. A metadata name that matches no
    /// policy falls through (and is worth a log line by the caller).
    pub fn select(&self, path: &str, route_name: Option<&str>, metadata_policy: Option<&str>) -> &Policy {
        let by_meta = metadata_policy.and_then(|n| {
            if n == self.default_policy.name {
                Some(&self.default_policy)
            } else {
                self.by_name.get(n).and_then(|i| self.policies.get(*i))
            }
        });
        if let Some(p) = by_meta {
            return p;
        }
        if let Some(p) = route_name.and_then(|r| self.by_route_name.get(r)).and_then(|i| self.policies.get(*i)) {
            return p;
        }
        for (prefix, i) in &self.by_prefix {
            if path.starts_with(prefix.as_str()) {
                if let Some(p) = self.policies.get(*i) {
                    return p;
                }
            }
        }
        &self.default_policy
    }

    pub fn default_policy(&self) -> &Policy {
        &self.default_policy
    }

    /// The shortest lease lifetime of any policy, if any policy leases.
    pub fn shortest_lease_ttl_ms(&self) -> Option<u64> {
        self.policies
            .iter()
            .chain(std::iter::once(&self.default_policy))
            .filter_map(|p| p.lease.map(|l| l.ttl_ms))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batching_is_off_by_default_on_with_defaults_or_bounded_fields() {
        let c = compile(br#"{"quota_cluster":"q"}"#).unwrap();
        assert_eq!(c.batching, None);
        let c = compile(br#"{"quota_cluster":"q","batching":true}"#).unwrap();
        assert_eq!(c.batching, Some(Batching { in_flight: 8, max_checks: 64 }));
        let c = compile(br#"{"quota_cluster":"q","batching":{"in_flight":0,"max_checks":16}}"#).unwrap();
        assert_eq!(c.batching, Some(Batching { in_flight: 0, max_checks: 16 }));
        assert_eq!(compile(br#"{"quota_cluster":"q","batching":false}"#).unwrap().batching, None);
        for (json, field) in [
            (r#"{"quota_cluster":"q","batching":{"max_checks":1}}"#, "batching.max_checks"),
            (r#"{"quota_cluster":"q","batching":{"max_checks":0}}"#, "batching.max_checks"),
            (r#"{"quota_cluster":"q","batching":{"max_checks":129}}"#, "batching.max_checks"),
            (r#"{"quota_cluster":"q","batching":{"in_flight":-1}}"#, "batching.in_flight"),
            (r#"{"quota_cluster":"q","batching":{"in_flight":"8"}}"#, "batching.in_flight"),
            (r#"{"quota_cluster":"q","batching":{"size":8}}"#, "batching.size"),
            (r#"{"quota_cluster":"q","batching":8}"#, "batching"),
        ] {
            assert_eq!(bad(json).field, field, "{json}");
        }
    }

    fn bad(json: &str) -> ConfigError {
        match compile(json.as_bytes()) {
            Ok(_) => panic!("config should be rejected: {json}"),
            Err(e) => e,
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = compile(br#"{"quota_cluster":"q"}"#).unwrap();
        assert_eq!(c.timeout_ms, 100);
        assert_eq!(c.tenant_header, "x-tenant-id");
        assert_eq!(c.quota_authority, "sluice-quota");
        assert_eq!(c.default_policy().cost, 1);
        assert_eq!(c.default_policy().failure_mode, FailureMode::Open);
        assert_eq!(c.unavailable_retry_after_s, 1);
    }

    #[test]
    fn missing_cluster_is_named() {
        assert_eq!(bad("{}").field, "quota_cluster");
        assert_eq!(bad(r#"{"quota_cluster":"  "}"#).field, "quota_cluster");
    }

    #[test]
    fn unknown_fields_are_named_at_every_level() {
        assert_eq!(bad(r#"{"quota_cluster":"q","timeout":5}"#).field, "timeout");
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"name":"a","costt":2}]}"#).field, "policies[0].costt");
        assert_eq!(
            bad(r#"{"quota_cluster":"q","policies":[{"name":"a","limits":{"week":2}}]}"#).field,
            "policies[0].limits.week"
        );
    }

    #[test]
    fn zero_negative_fractional_and_huge_numbers_are_rejected_with_the_field() {
        let e = bad(r#"{"quota_cluster":"q","timeout_ms":0}"#);
        assert_eq!(e.field, "timeout_ms");
        assert!(e.message.contains("greater than 0"));
        let e = bad(r#"{"quota_cluster":"q","policies":[{"name":"a","cost":-5}]}"#);
        assert_eq!(e.field, "policies[0].cost");
        assert!(e.message.contains("negative"));
        assert_eq!(bad(r#"{"quota_cluster":"q","default_policy":{"cost":1.5}}"#).field, "default_policy.cost");
        assert_eq!(bad(r#"{"quota_cluster":"q","timeout_ms":18446744073709551616}"#).field, "timeout_ms");
        assert_eq!(bad(r#"{"quota_cluster":"q","timeout_ms":"100"}"#).field, "timeout_ms");
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"name":"a","limits":{"hour":-1}}]}"#).field, "policies[0].limits.hour");
    }

    #[test]
    fn every_numeric_field_rejects_absurd_numbers_and_wrong_types_naming_the_field() {
        // (field path, JSON with the value spliced in at {v}, whether 0 is valid)
        let base = r#"{"quota_cluster":"q",X}"#;
        let rules = r#""policies":[{"name":"c","cost_rules":{"charge_units":true,"reserve_tokens":true,X}}]"#;
        let cases: Vec<(&str, String, bool)> = vec![
            ("timeout_ms", base.replace('X', r#""timeout_ms":{v}"#), false),
            ("unavailable_retry_after_s", base.replace('X', r#""unavailable_retry_after_s":{v}"#), false),
            ("default_policy.cost", base.replace('X', r#""default_policy":{"cost":{v}}"#), false),
            ("policies[0].cost", base.replace('X', r#""policies":[{"name":"a","cost":{v}}]"#), false),
            ("policies[0].limits.hour", base.replace('X', r#""policies":[{"name":"a","limits":{"hour":{v}}}]"#), true),
            ("policies[0].limits.month", base.replace('X', r#""policies":[{"name":"a","limits":{"month":{v}}}]"#), true),
            ("policies[0].max_wait_ms", base.replace('X', r#""policies":[{"name":"a","upstream":"gpu","max_wait_ms":{v}}]"#), false),
            ("policies[0].cost_rules.tokens_per_unit", base.replace('X', &rules.replace('X', r#""tokens_per_unit":{v}"#)), false),
            ("policies[0].cost_rules.default_max_tokens", base.replace('X', &rules.replace('X', r#""default_max_tokens":{v}"#)), true),
            ("policies[0].cost_rules.max_tokens_limit", base.replace('X', &rules.replace('X', r#""max_tokens_limit":{v}"#)), false),
            ("policies[0].cost_rules.max_body_bytes", base.replace('X', &rules.replace('X', r#""max_body_bytes":{v}"#)), false),
            ("policies[0].cost_rules.fallback_units", base.replace('X', &rules.replace('X', r#""fallback_units":{v}"#)), false),
            ("policies[0].cost_rules.fallback_tokens", base.replace('X', &rules.replace('X', r#""fallback_tokens":{v}"#)), false),
            ("policies[0].cost_rules.unknown_model_multiplier", base.replace('X', &rules.replace('X', r#""unknown_model_multiplier":{v}"#)), false),
            ("policies[0].cost_rules.model_multipliers", base.replace('X', &rules.replace('X', r#""model_multipliers":{"gpt-x":{v}}"#)), false),
            ("policies[0].cost_rules.feature_multipliers", base.replace('X', &rules.replace('X', r#""feature_multipliers":{"tools":{v}}"#)), false),
        ];
        let absurd = ["-1", "18446744073709551616", "1e308", "-1e308", "\"NaN\"", "\"1\"", "true", "null", "[]", "{}", "1e-9", "1.0001"];
        for (field, template, zero_ok) in &cases {
            let zero = if *zero_ok { None } else { Some("0") };
            for v in absurd.iter().copied().chain(zero) {
                let text = template.replace("{v}", v);
                // `null` means "absent" for optional fields: the default applies.
                if v == "null" {
                    let _ = compile(text.as_bytes());
                    continue;
                }
                let e = match compile(text.as_bytes()) {
                    Err(e) => e,
                    // Multipliers may be fractional (3 decimals): 1.0001 is not.
                    Ok(_) => panic!("{field} = {v} was accepted: {text}"),
                };
                assert!(e.field.starts_with(field), "{field} = {v}: the error names {:?}: {e}", e.field);
            }
        }
    }

    #[test]
    fn shadow_and_latency_reports_are_inherited_by_policies_unless_they_say_otherwise() {
        let c = compile(
            br#"{"quota_cluster":"q","shadow":true,"report_latency":true,"shadow_headers":true,
                "policies":[{"name":"enforced","path_prefix":"/e/","shadow":false,"report_latency":false},
                            {"name":"inherits","path_prefix":"/i/"}]}"#,
        )
        .unwrap();
        assert!(c.shadow_headers);
        assert!(c.default_policy().shadow && c.default_policy().report_latency);
        let e = c.select("/e/x", None, None);
        assert!(!e.shadow && !e.report_latency);
        let i = c.select("/i/x", None, None);
        assert!(i.shadow && i.report_latency);
        assert_eq!(bad(r#"{"quota_cluster":"q","shadow":"yes"}"#).field, "shadow");
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"name":"a","shadow":1}]}"#).field, "policies[0].shadow");
        let plain = compile(br#"{"quota_cluster":"q"}"#).unwrap();
        assert!(!plain.default_policy().shadow && !plain.shadow_headers && !plain.default_policy().report_latency);
    }

    #[test]
    fn route_metadata_is_read_only_when_policies_exist_and_it_is_not_turned_off() {
        let policies = r#""policies":[{"name":"chat","route_name":"chat_route"},{"name":"llm","path_prefix":"/llm/"}]"#;
        assert!(!compile(br#"{"quota_cluster":"q"}"#).unwrap().uses_route_metadata(), "no policy to choose");
        let on = compile(format!(r#"{{"quota_cluster":"q",{policies}}}"#).as_bytes()).unwrap();
        assert!(on.uses_route_metadata(), "on by default");
        let off = compile(format!(r#"{{"quota_cluster":"q","route_metadata":false,{policies}}}"#).as_bytes()).unwrap();
        assert!(!off.uses_route_metadata());
        assert!(off.uses_route_name(), "route names still choose");
        assert_eq!(off.select("/llm/x", None, None).name, "llm");
        // A policy only route metadata could choose is refused when it is off.
        let e = bad(r#"{"quota_cluster":"q","route_metadata":false,"policies":[{"name":"a","path_prefix":"/a/"},{"name":"batch","cost":10}]}"#);
        assert_eq!(e.field, "policies[1]");
        assert!(e.message.contains("`batch`") && e.message.contains("route_metadata is false"), "{}", e.message);
        assert_eq!(bad(r#"{"quota_cluster":"q","route_metadata":"no"}"#).field, "route_metadata");
    }

    #[test]
    fn leases_are_off_unless_configured_and_their_bounds_are_checked() {
        let c = compile(br#"{"quota_cluster":"q"}"#).unwrap();
        assert_eq!(c.default_policy().lease, None);
        assert_eq!(c.lease_slots, 4096);
        assert_eq!(c.shortest_lease_ttl_ms(), None);
        let c = compile(br#"{"quota_cluster":"q","lease_slots":64,"default_policy":{"lease":{}},
            "policies":[{"name":"hot","path_prefix":"/hot/","cost":2,"lease":{"max_units":10,"ttl_ms":200}}]}"#).unwrap();
        assert_eq!(c.default_policy().lease, Some(LeaseConfig { max_units: 100, ttl_ms: 1000 }));
        assert_eq!(c.select("/hot/x", None, None).lease, Some(LeaseConfig { max_units: 10, ttl_ms: 200 }));
        assert_eq!(c.lease_slots, 64);
        assert_eq!(c.shortest_lease_ttl_ms(), Some(200));
        assert_eq!(bad(r#"{"quota_cluster":"q","lease_slots":8}"#).field, "lease_slots");
        assert_eq!(bad(r#"{"quota_cluster":"q","lease_slots":100000}"#).field, "lease_slots");
        assert_eq!(bad(r#"{"quota_cluster":"q","default_policy":{"lease":{"ttl_ms":10}}}"#).field, "default_policy.lease.ttl_ms");
        assert_eq!(bad(r#"{"quota_cluster":"q","default_policy":{"lease":{"max_units":0}}}"#).field, "default_policy.lease.max_units");
        assert_eq!(bad(r#"{"quota_cluster":"q","default_policy":{"cost":5,"lease":{"max_units":9}}}"#).field, "default_policy.lease.max_units");
        assert_eq!(bad(r#"{"quota_cluster":"q","default_policy":{"lease":{"size":9}}}"#).field, "default_policy.lease.size");
        assert_eq!(bad(r#"{"quota_cluster":"q","default_policy":{"lease":true}}"#).field, "default_policy.lease");
        // Capacity and fair admission are per request at the service: no lease there.
        let both = r#"{"quota_cluster":"q","policies":[{"name":"llm","path_prefix":"/llm/","upstream":"gpu","lease":{}}]}"#;
        assert_eq!(bad(both).field, "policies[0].lease");
    }

    #[test]
    fn route_limit_zero_is_allowed_to_close_a_route() {
        let c = compile(br#"{"quota_cluster":"q","policies":[{"name":"off","path_prefix":"/off/","limits":{"day":0}}]}"#).unwrap();
        assert_eq!(c.select("/off/x", None, None).limits, vec![RouteLimit { window: Window::Day, limit: 0 }]);
    }

    #[test]
    fn bad_failure_mode_names_and_policy_names_are_rejected() {
        assert_eq!(bad(r#"{"quota_cluster":"q","failure_mode":"maybe"}"#).field, "failure_mode");
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"name":"a b"}]}"#).field, "policies[0].name");
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"path_prefix":"/a"}]}"#).field, "policies[0].name");
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"name":"a"},{"name":"a"}]}"#).field, "policies[1].name");
        assert_eq!(bad(r#"{"quota_cluster":"q","tenant_header":"x-sluice-tenant"}"#).field, "tenant_header");
        assert_eq!(bad("[1]").field, "(config)");
        assert_eq!(bad("not json").field, "(config)");
    }

    #[test]
    fn upstream_routes_take_a_queue_mode_and_a_max_wait() {
        let c = compile(
            br#"{"quota_cluster":"q","queue_cluster":"sluice_queue","policies":[
                {"name":"llm","path_prefix":"/llm/","upstream":"gpu","on_quota_exceeded":"queue","max_wait_ms":5000},
                {"name":"plain","path_prefix":"/p/","upstream":"gpu"}]}"#,
        )
        .unwrap();
        assert_eq!(c.queue_cluster.as_deref(), Some("sluice_queue"));
        let llm = c.select("/llm/x", None, None);
        assert_eq!((llm.upstream.as_deref(), llm.on_quota_exceeded, llm.max_wait_ms), (Some("gpu"), OnQuotaExceeded::Queue, Some(5000)));
        let plain = c.select("/p/x", None, None);
        assert_eq!((plain.on_quota_exceeded, plain.max_wait_ms), (OnQuotaExceeded::Reject, None));
        assert!(c.uses_upstreams());
        assert!(!compile(br#"{"quota_cluster":"q"}"#).unwrap().uses_upstreams());
    }

    #[test]
    fn queue_settings_without_an_upstream_or_out_of_range_are_rejected_with_the_field() {
        let p = |policy: &str| bad(&format!(r#"{{"quota_cluster":"q","policies":[{policy}]}}"#));
        assert_eq!(p(r#"{"name":"a","on_quota_exceeded":"queue"}"#).field, "policies[0].on_quota_exceeded");
        assert_eq!(p(r#"{"name":"a","max_wait_ms":10}"#).field, "policies[0].max_wait_ms");
        assert_eq!(p(r#"{"name":"a","upstream":"u","on_quota_exceeded":"wait"}"#).field, "policies[0].on_quota_exceeded");
        assert_eq!(p(r#"{"name":"a","upstream":"u","max_wait_ms":0}"#).field, "policies[0].max_wait_ms");
        assert_eq!(p(r#"{"name":"a","upstream":"u","max_wait_ms":3600001}"#).field, "policies[0].max_wait_ms");
        assert_eq!(p(r#"{"name":"a","upstream":"a b"}"#).field, "policies[0].upstream");
        assert_eq!(p(r#"{"name":"a","upstream":"u","exempt":true}"#).field, "policies[0].upstream");
        assert_eq!(bad(r#"{"quota_cluster":"q","queue_cluster":""}"#).field, "queue_cluster");
    }

    #[test]
    fn h14_policy_selection_prefers_metadata_then_route_name_then_longest_prefix() {
        let c = compile(
            br#"{"quota_cluster":"q","failure_mode":"closed","exempt_paths":["/healthz","/static/*"],
                "policies":[
                  {"name":"llm","path_prefix":"/v1/llm/","cost":5,"limits":{"hour":50}},
                  {"name":"v1","path_prefix":"/v1/","failure_mode":"open"},
                  {"name":"chat","route_name":"chat_route","cost":2}
                ]}"#,
        )
        .unwrap();
        assert_eq!(c.select("/v1/llm/complete", None, None).name, "llm");
        assert_eq!(c.select("/v1/llm/complete", None, None).cost, 5);
        assert_eq!(c.select("/v1/llm/complete", None, None).failure_mode, FailureMode::Closed);
        assert_eq!(c.select("/v1/other", None, None).name, "v1");
        assert_eq!(c.select("/v1/other", None, None).failure_mode, FailureMode::Open);
        assert_eq!(c.select("/api/x", None, None).name, "default");
        assert_eq!(c.select("/v1/llm/x", Some("chat_route"), None).name, "chat");
        assert_eq!(c.select("/v1/llm/x", Some("chat_route"), Some("v1")).name, "v1");
        assert_eq!(c.select("/x", None, Some("no-such-policy")).name, "default");
        assert!(c.is_exempt_path("/healthz"));
        assert!(!c.is_exempt_path("/healthzz"));
        assert!(c.is_exempt_path("/static/app.js"));
        assert!(!c.is_exempt_path("/v1/llm"));
    }

    #[test]
    fn h15_negative_weights_and_multipliers_are_rejected_at_config_load() {
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"name":"a","cost":-5}]}"#).field, "policies[0].cost");
        let e = bad(r#"{"quota_cluster":"q","policies":[{"name":"a","cost_rules":{"charge_units":true,"model_multipliers":{"gpt-4":-20}}}]}"#);
        assert_eq!(e.field, "policies[0].cost_rules.model_multipliers.gpt-4");
        let e = bad(r#"{"quota_cluster":"q","default_policy":{"cost_rules":{"reserve_tokens":true,"feature_multipliers":{"tools":-1}}}}"#);
        assert_eq!(e.field, "default_policy.cost_rules.feature_multipliers.tools");
    }

    #[test]
    fn cost_rules_and_upload_compile_per_policy_and_conflict_with_exempt() {
        let c = compile(
            br#"{"quota_cluster":"q","policies":[
                {"name":"chat","route_name":"chat_route","cost_rules":{"reserve_tokens":true}},
                {"name":"files","path_prefix":"/v1/files","upload":true}]}"#,
        )
        .unwrap();
        let chat = c.select("/x", Some("chat_route"), None);
        assert!(chat.cost_rules.as_ref().is_some_and(|r| r.reserve_tokens && !r.charge_units));
        assert!(c.select("/v1/files/a", None, None).upload);
        assert!(c.default_policy().cost_rules.is_none());
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"name":"f","upload":"yes"}]}"#).field, "policies[0].upload");
        assert_eq!(
            bad(r#"{"quota_cluster":"q","policies":[{"name":"f","exempt":true,"upload":true}]}"#).field,
            "policies[0].exempt"
        );
        assert_eq!(bad(r#"{"quota_cluster":"q","policies":[{"name":"f","cost_rules":[]}]}"#).field, "policies[0].cost_rules");
    }
}
