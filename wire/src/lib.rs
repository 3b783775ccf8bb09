//! Wire types spoken between the Sluice filter (inside Envoy) and the quota
//! service. Both sides depend on this crate, so the contract is defined once.
//!
//! The filter POSTs a [`CheckRequest`] as JSON to `/v1/check` on the quota
//! cluster and reads back a [`CheckResponse`]. Field names are short but
//! readable; every optional field has a serde default so either side can be
//! upgraded first.

use serde::{Deserialize, Serialize};

pub mod reply;

/// Path of the decision endpoint on the quota service.
pub const CHECK_PATH: &str = "/v1/check";

/// Path of the usage report endpoint (token reconciliation).
pub const USAGE_PATH: &str = "/v1/usage";

/// Largest token figure accepted anywhere (an estimate, a reservation, a
/// reported usage): far above any real request, far below where sums of a
/// few of them stop being exact in a Lua double.
pub const MAX_TOKENS: u64 = 1_000_000_000;

/// Longest tenant id accepted anywhere, in bytes.
pub const MAX_TENANT_LEN: usize = 128;

/// Whether `id` is a tenant id Sluice accepts: 1..=128 bytes of
/// `A-Z a-z 0-9 . _ - : @`. The set excludes `{`, `}` (Redis Cluster hash-tag
/// delimiters), `,` (header list joining), whitespace, control characters and
/// any non-ASCII byte, so an id can be embedded in Redis keys, JSON and
/// headers without escaping.
pub fn is_valid_tenant(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_TENANT_LEN && id.iter().all(|b| is_tenant_byte(*b))
}

/// One byte of the tenant safe set (see [`is_valid_tenant`]).
pub fn is_tenant_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@')
}

/// Whether `name` is a valid policy (route) name: 1..=64 bytes of
/// `A-Z a-z 0-9 . _ -`. Route names become part of Redis keys.
pub fn is_valid_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The windows a limit can be counted over: the calendar windows (UTC) of
/// the quotas, and `second`, the tier's short-term rate (a token bucket of
/// `rate_per_s` requests per second), which only ever appears in a denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Second,
    Hour,
    Day,
    Month,
}

impl Window {
    /// The calendar windows: the ones quotas and route limits are counted in.
    pub const ALL: [Window; 3] = [Window::Hour, Window::Day, Window::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// Nominal length in seconds, used for the `w` parameter of
    /// `RateLimit-Policy` (a calendar month is advertised as 30 days).
    pub fn nominal_secs(self) -> u64 {
        match self {
            Window::Second => 1,
            Window::Hour => 3_600,
            Window::Day => 86_400,
            Window::Month => 2_592_000,
        }
    }
}

/// A limit attached to a route policy in the filter config, counted on top of
/// the tenant's tier windows under the policy's own name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteLimit {
    pub window: Window,
    pub limit: u64,
}

/// Body of `POST /v1/check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    /// Already validated with [`is_valid_tenant`] by the filter; the service
    /// validates again.
    pub tenant: String,
    /// Units this request costs (the route's weight), >= 1.
    #[serde(default = "one")]
    pub cost: u64,
    /// Name of the route policy that matched (for route-specific windows and
    /// for metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Route-specific windows, counted under `policy` in the same atomic step
    /// as the tenant's tier windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route_limits: Vec<RouteLimit>,
    /// Estimated LLM tokens to reserve in the tenant's token windows
    /// (`tokens_hour`, `tokens_month`) in the same atomic step; 0 = the
    /// route does not count tokens.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens: u64,
    /// An upload route: denied while the tenant's reported storage use is at
    /// or over its storage quota.
    #[serde(default, skip_serializing_if = "is_false")]
    pub upload: bool,
    /// The route is in shadow mode: decide and count as usual, but the
    /// filter forwards the request whatever the answer (counted as
    /// `shadow_denied` when it would have been denied).
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
    /// The upstream (a name in the service's upstreams file) whose capacity
    /// this route spends. Absent: no capacity limit, quotas only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Whether the filter can forward overflow to the queue (its queue
    /// cluster exists). When false, overflow is answered 429
    /// `capacity_exceeded` instead of a queue ticket.
    #[serde(default, skip_serializing_if = "is_false")]
    pub can_queue: bool,
    /// What a request over its hour/day/month quota gets on this route.
    #[serde(default, skip_serializing_if = "OnQuotaExceeded::is_reject")]
    pub on_quota_exceeded: OnQuotaExceeded,
    /// The route's max wait in the queue; absent: the upstream's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    /// Asks for a quota lease on top of this request (see [`LeaseAsk`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseAsk>,
}

/// Most units one lease may ask for.
pub const MAX_LEASE_UNITS: u64 = 1_000_000;

/// A lease request: charge up to `want` more units now, to be spent by the
/// asking Envoy's workers without a callout per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAsk {
    /// Units wanted on top of the request's own cost (1..=[`MAX_LEASE_UNITS`]).
    pub want: u64,
}

/// A granted lease. Its units are already counted in every window of the
/// answer (`used` includes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// Units granted on top of the request's cost (a multiple of
    /// `unit_cost`, >= 1).
    pub units: u64,
    /// Units one request of this route costs the tenant (its cost times the
    /// tenant's cost weight): what each request spends from the lease.
    pub unit_cost: u64,
    /// `YYYYMMDD` of the grant: the usage rollup a return books into.
    pub day: String,
    /// Milliseconds until the earliest reset of the windows it was charged
    /// to: the lease must not be spent after that.
    pub valid_ms: u64,
    /// The counters it was charged to, as `q:<window>:<window-id>` and
    /// `r:<policy>:<window>:<window-id>`, handed back with a return.
    pub charged: Vec<String>,
}

/// Path of the lease return endpoint on the quota service.
pub const LEASE_RETURN_PATH: &str = "/v1/lease/return";

/// Most returns in one `POST /v1/lease/return`.
pub const MAX_LEASE_RETURNS: usize = 256;

/// Unspent units of one lease going back to its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReturn {
    pub tenant: String,
    /// Units not spent, given back (may be 0 when all were spent).
    pub units: u64,
    /// Requests admitted from the lease (booked in the usage rollup).
    #[serde(default)]
    pub spent: u64,
    /// [`LeaseGrant::day`] of the lease.
    pub day: String,
    /// [`LeaseGrant::charged`] of the lease.
    pub charged: Vec<String>,
}

/// Body of `POST /v1/lease/return`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReturnRequest {
    pub returns: Vec<LeaseReturn>,
}

/// Answer of `POST /v1/lease/return`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReturnResponse {
    /// Units given back, summed over the returns (a counter whose window is
    /// over, or that holds less, gives back less).
    pub returned: u64,
}

/// What a route does with a request over its hour/day/month quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnQuotaExceeded {
    /// 429 `quota_exceeded` (the default).
    #[default]
    Reject,
    /// Queue it until the binding window resets, if that is within the
    /// route's max wait; otherwise 429 as with `reject`.
    Queue,
}

impl OnQuotaExceeded {
    pub fn is_reject(&self) -> bool {
        *self == OnQuotaExceeded::Reject
    }
}

/// Why a check did not admit a request directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An hour/day/month window (tier, route or tokens) or the storage quota
    /// is exhausted: 429 `quota_exceeded` (or the storage answer).
    Quota,
    /// The tier's short-term rate (window `second`): 429 `rate_limited`.
    Rate,
    /// The upstream is at capacity and this tenant over its fair share:
    /// forward to the queue with the ticket in [`CheckResponse::queue`].
    Queued,
    /// Overflow, but the filter has no queue: 429 `capacity_exceeded`.
    Capacity,
    /// The tenant's queue is at its depth bound: 429 `queue_full`.
    QueueFull,
    /// The upstream's whole queue is at its bound: 503 `system_overloaded`.
    SystemOverloaded,
}

/// Where an overflowed request goes: the filter adds these as internal
/// headers and Envoy's route table sends the request to the queue cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueTicket {
    pub upstream: String,
    /// One-time ticket (32 hex digits) the queue service consumes on
    /// enqueue: only requests the quota service sent there are accepted.
    pub ticket: String,
}

/// Internal request header naming the upstream of an overflowed request;
/// the queue route of the Envoy route table matches on it.
pub const QUEUE_HEADER: &str = "x-sluice-queue";
/// Internal request header carrying the [`QueueTicket::ticket`].
pub const TICKET_HEADER: &str = "x-sluice-ticket";

fn one() -> u64 {
    1
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The tokens a check reserved; the filter reports real usage against `id`.
/// The window ids the tokens went into are kept in the reservation record
/// by the service, so a report lands in the right windows even when the
/// hour rolls over while the response streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: String,
    pub tokens: u64,
}

/// Storage use against the storage quota, on answers for upload routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageState {
    pub used: u64,
    pub limit: u64,
    /// Whether the upload was refused for storage (`used >= limit`).
    pub exceeded: bool,
}

/// State of one window after the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowState {
    /// Policy name for headers: `hour`, `day`, `month` for tier windows,
    /// `<policy>-<window>` for route windows.
    pub name: String,
    pub window: Window,
    pub limit: u64,
    /// Units used in the window after this decision.
    pub used: u64,
    pub remaining: u64,
    /// Unix epoch seconds at which the window resets.
    pub reset: u64,
    /// Whole seconds from the decision until the reset (>= 1).
    pub reset_in: u64,
}

/// Body of a 200 answer from `POST /v1/check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResponse {
    pub allowed: bool,
    pub tier: String,
    /// Every window that applied, tier windows first.
    pub windows: Vec<WindowState>,
    /// Index into `windows` of the binding window: when denied, the exceeded
    /// window that resets last (the earliest moment a retry can succeed);
    /// when allowed, the window with the fewest remaining units.
    pub binding: usize,
    /// When denied: whole seconds until the request could be admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// When admitted with `tokens > 0` and the tenant has a token window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Reservation>,
    /// On upload routes whose tenant has a storage quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageState>,
    /// The tenant (or the request's route) is in shadow mode: the filter
    /// forwards the request even when `allowed` is false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
    /// The reserved pool the tenant's admitted requests are routed to (the
    /// filter sets [`POOL_HEADER`] to it); absent for the shared capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_pool: Option<String>,
    /// When not allowed: why (absent from older services: `quota`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// When `reason` is `queued`: where to forward the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueTicket>,
    /// The lease granted with this admission, if one was asked for and the
    /// windows had room for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseGrant>,
}

/// Path of the batched check on the quota service: several requests'
/// checks in one callout, each decided on its own exactly as by
/// [`CHECK_PATH`] (its own atomic script), answered in the same order.
pub const CHECK_BATCH_PATH: &str = "/v1/check/batch";

/// Most checks in one batch the service accepts.
pub const MAX_BATCH_CHECKS: usize = 256;

/// Body of `POST /v1/check/batch`: each element is a [`CheckRequest`].
/// The service answers 200 with a [`CheckBatchResponse`] whenever the batch
/// itself is readable; an element that is not a valid check gets its own
/// error result, and the others are decided. Unknown fields are ignored, as
/// in a check, so filter and service can be upgraded in either order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckBatchRequest<T> {
    pub checks: Vec<T>,
}

/// Answer to a batch, one result per check, in the order of the checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckBatchResponse {
    pub results: Vec<CheckResult>,
}

/// One check's result in a batch: the status `POST /v1/check` would have
/// answered it with, and its body (the decision, or the error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<CheckResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Request header the filter sets to the reserved pool of an admitted
/// request, for the route table to match (clients can never set it: every
/// `x-sluice-*` request header is removed on entry).
pub const POOL_HEADER: &str = "x-sluice-pool";

/// Path of the upstream latency report on the quota service.
pub const REPORT_PATH: &str = "/v1/report";

/// Body of `POST /v1/report`: what the filter measured for one admitted
/// request, sent after the upstream answered (fire and forget).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRequest {
    pub tenant: String,
    /// Milliseconds from forwarding the request to the upstream's response headers.
    pub upstream_latency_ms: u64,
}

/// Body of `POST /v1/usage`: the real usage of an admitted request,
/// replacing its reservation. Idempotent: a replay changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub tenant: String,
    pub reservation: String,
    pub total_tokens: u64,
    /// False when the response did not finish (client abort, upstream
    /// reset): the tenant is then charged at least the reservation.
    #[serde(default = "yes")]
    pub complete: bool,
}

fn yes() -> bool {
    true
}

/// Answer of `POST /v1/usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAnswer {
    /// `settled` (applied now), `duplicate` (already settled: nothing
    /// changed) or `unknown` (no such reservation, e.g. expired: nothing
    /// changed).
    pub status: String,
    pub reserved: u64,
    pub charged: u64,
}

/// JSON error body used by the filter's local replies and the service alike:
/// `{"error":"<code>","message":"<human text>", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_safe_set_accepts_typical_ids_and_rejects_delimiters() {
        assert!(is_valid_tenant(b"acme-corp_01.eu:prod@x"));
        for bad in [&b""[..], b"a b", b"a,b", b"{a}", b"caf\xc3\xa9", b"\x80", b"a\tb"] {
            assert!(!is_valid_tenant(bad), "{bad:?}");
        }
        assert!(is_valid_tenant(&[b'a'; 128]));
        assert!(!is_valid_tenant(&[b'a'; 129]));
    }
}
