//! The Redis adapter: the only module that talks to Redis.
//!
//! One multiplexed connection (redis-rs `ConnectionManager`) is shared by all
//! requests and reconnects by itself after Redis restarts. A connection
//! that stops answering without closing (a black-holed network path: the
//! manager only reconnects on errors, never on timeouts) is replaced by
//! [`Healing`] on the first timeout, so the service recovers by itself once
//! the path works again. With `--redis-cluster` it is a redis-rs cluster
//! connection instead (one multiplexed connection per primary, commands
//! routed by their first key's slot, MOVED/ASK followed); [`Conn`] hides
//! which, so nothing else here knows. Every script names one key of one
//! tenant in KEYS and builds its other keys from prefixes with the same hash
//! tag, so it runs on the node owning that tenant's slot and never meets
//! CROSSSLOT. Every call is
//! bounded by `--redis-timeout-ms` on top of the client's own timeouts, so a
//! black-holed Redis yields a fast error instead of a hung request. Scripts go
//! out as EVALSHA and are re-loaded by redis-rs when Redis answers NOSCRIPT
//! (after a restart or SCRIPT FLUSH).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::HistogramVec;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use sluice_wire::Window;

use sluice_wire::{StorageState, UsageAnswer};

use crate::config::{ServeConfig, LIMITS, RESERVATION_TTL_S, SETTLED_TTL_S};
use crate::decision::{
    RowKind, ScriptDecision, ValidCheck, ValidReturn, ValidUsage, Verdict, WindowRow,
};
use crate::tiers::TiersSnapshot;
use crate::upstreams::Upstream;
use crate::{keys, scripts};

#[derive(Debug)]
pub enum StoreError {
    /// No answer within the configured timeout.
    Timeout,
    Redis(redis::RedisError),
    /// Redis answered something the scripts never return (a bug, or a
    /// different script under our SHA).
    BadReply(String),
}

impl StoreError {
    /// Whether retrying later may succeed (Redis down, slow or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Timeout => true,
            StoreError::Redis(e) => e.is_io_error() || e.is_timeout() || e.is_connection_dropped(),
            StoreError::BadReply(_) => false,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout => f.write_str("redis did not answer in time"),
            StoreError::Redis(e) => write!(f, "redis error: {e}"),
            StoreError::BadReply(m) => write!(f, "unexpected redis reply: {m}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Redis(e)
    }
}

/// One limit of the tenant view, as the status script reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRow {
    pub name: String,
    /// `None`: not enforced (no value anywhere).
    pub effective: Option<u64>,
    /// `tier`, `custom`, `override` or `none`.
    pub source: String,
    /// For an override: its expiry, epoch ms.
    pub override_until_ms: Option<u64>,
    pub tier_value: Option<u64>,
    pub custom_value: Option<u64>,
    pub override_value: Option<u64>,
    /// For an enforced window: units used in the current window.
    pub current: Option<u64>,
    pub reset: u64,
    pub reset_in: u64,
}

/// A tenant's configuration and usage at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStatus {
    /// The tier in effect (the default tier when none is set or the set one
    /// no longer exists).
    pub tier: String,
    /// The tier stored for the tenant, if any.
    pub stored_tier: Option<String>,
    pub shadow: bool,
    pub pool: Option<String>,
    /// Reported storage use in bytes (0 if never reported).
    pub storage_used: u64,
    pub limits: Vec<LimitRow>,
}

/// One audit entry as stored: its stream id and its fields.
pub type AuditRecord = (String, Vec<(String, String)>);

/// The shared connection, replaced with a fresh (lazily connecting) one
/// when a call on it times out and no call has succeeded on it for
/// `min_age`: a dead path, not a busy Redis (under load some calls time out
/// while others succeed, and replacing would only add handshakes). Calls
/// already in flight keep the connection they started on; new calls take
/// the current one. Without this, a connection whose path was cut (no RST,
/// no FIN) would be used forever: every call would time out even after the
/// network healed (fault test `redis_black_holed_by_the_network_...`).
#[derive(Clone)]
pub struct Healing {
    current: Arc<Mutex<Slot>>,
    client: redis::Client,
    config: ConnectionManagerConfig,
    min_age: Duration,
}

struct Slot {
    conn: ConnectionManager,
    /// When `conn` was created, or last answered a call.
    last_ok: Instant,
}

impl Healing {
    fn new(client: redis::Client, config: ConnectionManagerConfig, min_age: Duration) -> Result<Healing, StoreError> {
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Healing {
            current: Arc::new(Mutex::new(Slot { conn, last_ok: Instant::now() })),
            client,
            config,
            min_age,
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> ConnectionManager {
        self.slot().conn.clone()
    }

    /// A call answered (with a reply or a Redis error): the path works.
    pub fn answered(&self) {
        self.slot().last_ok = Instant::now();
    }

    /// A call timed out: replace the connection if nothing has answered on
    /// it (or since it was created) for `min_age`.
    pub fn replace_stale(&self) {
        let mut g = self.slot();
        if g.last_ok.elapsed() < self.min_age {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                *g = Slot { conn: fresh, last_ok: Instant::now() };
                tracing::warn!("redis calls time out and none answered for {:?}: replaced the connection", self.min_age);
            }
            Err(e) => tracing::warn!("could not replace the redis connection: {e}"),
        }
    }
}

impl ConnectionLike for Healing {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let mut conn = self.current();
        Box::pin(async move {
            let r = conn.req_packed_command(cmd).await;
            if r.as_ref().is_err_and(redis::RedisError::is_timeout) {
                self.replace_stale();
            }
            r
        })
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        let mut conn = self.current();
        Box::pin(async move {
            let r = conn.req_packed_commands(pipeline, offset, count).await;
            if r.as_ref().is_err_and(redis::RedisError::is_timeout) {
                self.replace_stale();
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.current().get_db()
    }
}

/// The queue scripts, loaded together.
#[derive(Clone)]
struct QueueScripts {
    charge: Script,
    enqueue: Script,
    dequeue: Script,
    complete: Script,
    give_back: Script,
    cancel: Script,
    stats: Script,
}

/// How a queued request is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The client's connection is held until the answer (the default).
    Wait,
    /// `Prefer: respond-async`: 202 and a Location to read the answer later.
    Async,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Wait => "wait",
            Mode::Async => "async",
        }
    }
}

/// The connection every Store call goes through: one Redis, or a Redis
/// Cluster. Both multiplex all requests over few connections and reconnect
/// by themselves.
#[derive(Clone)]
// Cloned for every call (a clone of the multiplexed handle): boxing the
// larger variant would add an allocation to each of them.
#[allow(clippy::large_enum_variant)]
pub enum Conn {
    Single(Healing),
    Cluster(ClusterConnection),
}

impl Conn {
    /// A call answered: see [`Healing::answered`]. The cluster connection
    /// keeps its own per-node connections and reconnects them on errors.
    fn answered(&self) {
        if let Conn::Single(h) = self {
            h.answered();
        }
    }

    /// A call timed out: see [`Healing::replace_stale`].
    fn replace_stale(&self) {
        if let Conn::Single(h) = self {
            h.replace_stale();
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A request to take into the queue.
#[derive(Debug, Clone)]
pub struct NewItem<'a> {
    pub id: &'a str,
    pub ticket: &'a str,
    pub tenant: &'a str,
    pub mode: Mode,
    pub method: &'a str,
    pub path: &'a str,
    pub headers_json: &'a str,
    pub body: &'a [u8],
}

/// What ENQUEUE did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Ok { deadline_ms: i64, now_ms: i64 },
    BadTicket,
    QueueFull { depth: u64 },
    Overloaded { depth: u64 },
}

/// A request a worker has leased.
#[derive(Debug, Clone)]
pub struct Leased {
    pub id: String,
    pub attempt: u64,
    pub now_ms: i64,
    pub tenant: String,
    pub policy: Option<String>,
    pub cost: u64,
    pub route_spec: String,
    pub queue_on_quota: bool,
    /// Token estimate of the request (charged as is at dispatch).
    pub tokens: u64,
    pub mode: Mode,
    pub method: String,
    pub path: String,
    pub headers_json: String,
    pub body: Vec<u8>,
    pub created_ms: i64,
    pub deadline_ms: i64,
}

/// What DEQUEUE found.
#[derive(Debug, Clone)]
pub enum Dequeued {
    Item(Box<Leased>),
    /// No capacity (token or concurrency) for this long.
    Wait(Duration),
    Empty,
    /// Visited its bound without finding work; call again.
    Busy,
}

/// A final answer stored with a queued request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers_json: String,
    pub body: Vec<u8>,
}

/// A queued request as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemView {
    /// queued | deferred | leased | done | expired | failed
    pub state: String,
    pub tenant: String,
    pub mode: String,
    pub answer: Option<Answer>,
}

/// Depth of one tenant's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantDepth {
    pub tenant: String,
    pub depth: u64,
    /// Epoch ms the oldest queued request arrived (None: only deferred ones).
    pub oldest_ms: Option<i64>,
}

/// An upstream's queue at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    pub now_ms: i64,
    pub queued: u64,
    pub in_flight: u64,
    pub deferred: u64,
    pub tenants_total: u64,
    /// Epoch ms the oldest queued request arrived.
    pub oldest_ms: Option<i64>,
    pub tenants: Vec<TenantDepth>,
}

#[derive(Clone)]
pub struct Store {
    conn: Conn,
    /// For the queue's pub/sub (a Redis Cluster broadcasts PUBLISH to
    /// every node, so one node of it is enough).
    client: redis::Client,
    timeout: Duration,
    check: Script,
    status: Script,
    reconcile: Script,
    tenant_update: Script,
    report: Script,
    audit_append: Script,
    tiers_seed: Script,
    tiers_write: Script,
    queue: QueueScripts,
    lease_return: Script,
    redis_seconds: Option<HistogramVec>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Creates the store without connecting: the service starts (and
    /// answers /healthz and /readyz) even while Redis is down.
    pub fn new(config: &ServeConfig) -> Result<Store, StoreError> {
        // TCP_NODELAY: many scripts share one multiplexed connection, and a
        // small command must not wait behind Nagle's algorithm (and the
        // peer's delayed ACK, ~40 ms): measured by make bench-fairness.
        let first = config.redis_urls().first().copied().unwrap_or(config.redis_url.as_str());
        let info = redis::IntoConnectionInfo::into_connection_info(first)?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info)?;
        let conn = if config.redis_cluster {
            let client = ClusterClient::builder(config.redis_urls())
                .connection_timeout(config.redis_timeout)
                .response_timeout(config.redis_timeout)
                .retries(2)
                .build()?;
            let cluster_config = ClusterConfig::new()
                .set_connection_timeout(config.redis_timeout)
                .set_response_timeout(config.redis_timeout);
            // Connects in the background, like the single-node manager, so
            // the service starts (and /readyz tells) while the cluster is down.
            Conn::Cluster(client.get_pending_async_connection_with_config(cluster_config))
        } else {
            Conn::Single(Store::single(config, client.clone())?)
        };
        Ok(Store {
            conn,
            client,
            timeout: config.redis_timeout,
            check: Script::new(scripts::CHECK),
            status: Script::new(scripts::STATUS),
            reconcile: Script::new(scripts::RECONCILE),
            tenant_update: Script::new(scripts::TENANT_UPDATE),
            report: Script::new(scripts::REPORT),
            audit_append: Script::new(scripts::AUDIT_APPEND),
            tiers_seed: Script::new(scripts::TIERS_SEED),
            tiers_write: Script::new(scripts::TIERS_WRITE),
            queue: QueueScripts {
                charge: Script::new(scripts::CHARGE),
                enqueue: Script::new(scripts::ENQUEUE),
                dequeue: Script::new(scripts::DEQUEUE),
                complete: Script::new(scripts::COMPLETE),
                give_back: Script::new(scripts::GIVE_BACK),
                cancel: Script::new(scripts::CANCEL),
                stats: Script::new(scripts::QUEUE_STATS),
            },
            lease_return: Script::new(scripts::LEASE_RETURN),
            redis_seconds: None,
        })
    }

    fn single(config: &ServeConfig, client: redis::Client) -> Result<Healing, StoreError> {
        let mgr_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.redis_timeout))
            .set_connection_timeout(Some(config.redis_timeout))
            // Few, short retries: requests fail fast on their own timeout
            // anyway, and a short backoff lets the service notice a
            // restarted Redis within a second.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let min_age = config.redis_timeout.max(Duration::from_millis(200));
        Healing::new(client, mgr_config, min_age)
    }

    /// Observes every Redis call's duration in `hist` (label `op`).
    pub fn with_latency_histogram(mut self, hist: HistogramVec) -> Store {
        self.redis_seconds = Some(hist);
        self
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => {
                self.conn.answered();
                Ok(v)
            }
            Ok(Err(e)) => {
                // A reply from Redis (an error one) also proves the path works.
                if !(e.is_timeout() || e.is_io_error() || e.is_connection_dropped()) {
                    self.conn.answered();
                }
                Err(StoreError::Redis(e))
            }
            Err(_) => {
                self.conn.replace_stale();
                Err(StoreError::Timeout)
            }
        };
        if let Some(h) = &self.redis_seconds {
            h.with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Runs the check script: decides and, if admitted, counts (and adds the
    /// decision to the day's usage rollup).
    pub async fn check(
        &self,
        c: &ValidCheck,
        offset_ms: i64,
        tiers: &TiersSnapshot,
        usage_ttl_s: u64,
        upstream: Option<&Upstream>,
        ticket: &str,
    ) -> Result<ScriptDecision, StoreError> {
        let mut inv = self.check.prepare_invoke();
        inv.key(keys::cfg(&c.tenant))
            .arg(offset_ms)
            .arg(c.cost)
            .arg(tiers.tiers.default_tier())
            .arg(&tiers.script_arg)
            .arg(keys::tier_counter_prefix(&c.tenant))
            .arg(
                c.policy
                    .as_deref()
                    .map(|p| keys::route_counter_prefix(&c.tenant, p))
                    .unwrap_or_default(),
            )
            .arg(c.tokens)
            .arg(keys::token_counter_prefix(&c.tenant))
            .arg(keys::reservation_prefix(&c.tenant))
            .arg(keys::reservation_seq(&c.tenant))
            .arg(if c.upload {
                keys::storage(&c.tenant)
            } else {
                String::new()
            })
            .arg(RESERVATION_TTL_S)
            .arg(keys::usage_prefix(&c.tenant))
            .arg(usage_ttl_s)
            .arg(u8::from(c.shadow))
            .arg(keys::rate_bucket(&c.tenant));
        match upstream {
            Some(u) => {
                let max_wait = c
                    .max_wait_ms
                    .unwrap_or_else(|| u64::try_from(u.max_wait.as_millis()).unwrap_or(u64::MAX));
                inv.arg(keys::upstream_prefix(&u.name))
                    .arg(format!(
                        "{},{},{},{},{}",
                        u.rate, u.burst, u.debt, u.tenant_queue_depth, u.global_queue_depth
                    ))
                    .arg(&c.tenant)
                    .arg(u8::from(c.can_queue))
                    .arg(u8::from(!c.on_quota_exceeded.is_reject()))
                    .arg(max_wait);
            }
            None => {
                inv.arg("").arg("").arg(&c.tenant).arg(0).arg(0).arg(0);
            }
        }
        inv.arg(ticket)
            .arg(c.policy.as_deref().unwrap_or(""))
            .arg(c.lease_want);
        for rl in &c.route_limits {
            inv.arg(rl.window.as_str()).arg(rl.limit);
        }
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("check", inv.invoke_async(&mut conn)).await?;
        parse_check(reply)
    }

    /// Gives the unspent units of one lease back to its counters and books
    /// its spent requests; returns the units given back.
    pub async fn lease_return(&self, r: &ValidReturn) -> Result<u64, StoreError> {
        let mut inv = self.lease_return.prepare_invoke();
        inv.key(&r.rollup);
        for key in &r.keys {
            inv.key(key);
        }
        inv.arg(r.units).arg(r.spent);
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("lease_return", inv.invoke_async(&mut conn)).await?;
        as_u64(&reply)
    }

    /// Reads a tenant's tier, every limit with its source, and current usage.
    pub async fn status(
        &self,
        tenant: &str,
        offset_ms: i64,
        tiers: &TiersSnapshot,
    ) -> Result<TenantStatus, StoreError> {
        let mut inv = self.status.prepare_invoke();
        inv.key(keys::cfg(tenant))
            .arg(offset_ms)
            .arg(tiers.tiers.default_tier())
            .arg(&tiers.script_arg)
            .arg(keys::tier_counter_prefix(tenant))
            .arg(keys::token_counter_prefix(tenant))
            .arg(keys::storage(tenant));
        for def in LIMITS {
            inv.arg(def.name);
        }
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("status", inv.invoke_async(&mut conn)).await?;
        parse_status(reply)
    }

    /// Replaces a reservation with real usage (idempotent).
    pub async fn reconcile(
        &self,
        u: &ValidUsage,
        offset_ms: i64,
    ) -> Result<UsageAnswer, StoreError> {
        let mut inv = self.reconcile.prepare_invoke();
        inv.key(keys::reservation(&u.tenant, &u.reservation))
            .arg(offset_ms)
            .arg(u.total_tokens)
            .arg(if u.complete { 1 } else { 0 })
            .arg(keys::token_counter_prefix(&u.tenant))
            .arg(SETTLED_TTL_S);
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("usage", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        Ok(UsageAnswer {
            status: as_text(f.next()?)?,
            reserved: as_u64(f.next()?)?,
            charged: as_u64(f.next()?)?,
        })
    }

    /// Records the bytes a tenant stores (`None` forgets it).
    pub async fn set_storage(&self, tenant: &str, used: Option<u64>) -> Result<(), StoreError> {
        let mut cmd = redis::cmd(if used.is_some() { "SET" } else { "DEL" });
        cmd.arg(keys::storage(tenant));
        if let Some(b) = used {
            cmd.arg(b);
        }
        let mut conn = self.conn.clone();
        self.bounded("admin", cmd.query_async::<()>(&mut conn)).await
    }

    /// The tenant's raw cfg hash (what an admin change is about to replace).
    pub async fn tenant_cfg(&self, tenant: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(keys::cfg(tenant));
        let mut conn = self.conn.clone();
        self.bounded("admin", cmd.query_async(&mut conn)).await
    }

    /// Sets (`Some`) or deletes (`None`) cfg fields in one atomic step,
    /// dropping expired overrides on the way.
    pub async fn tenant_update(
        &self,
        tenant: &str,
        offset_ms: i64,
        changes: &[(String, Option<String>)],
    ) -> Result<(), StoreError> {
        let mut inv = self.tenant_update.prepare_invoke();
        inv.key(keys::cfg(tenant)).arg(offset_ms);
        for (field, value) in changes {
            inv.arg(field).arg(value.as_deref().unwrap_or(""));
        }
        let mut conn = self.conn.clone();
        self.bounded("admin", inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Adds one latency report to the tenant's daily rollup.
    pub async fn report(
        &self,
        tenant: &str,
        offset_ms: i64,
        usage_ttl_s: u64,
        bucket: usize,
        latency_ms: u64,
    ) -> Result<String, StoreError> {
        let mut inv = self.report.prepare_invoke();
        inv.key(keys::cfg(tenant))
            .arg(offset_ms)
            .arg(keys::usage_prefix(tenant))
            .arg(usage_ttl_s)
            .arg(bucket)
            .arg(latency_ms);
        let mut conn = self.conn.clone();
        self.bounded("report", inv.invoke_async(&mut conn)).await
    }

    /// Appends an audit entry; returns its id.
    pub async fn audit_append(
        &self,
        offset_ms: i64,
        retention: Duration,
        fields: &[(&str, String)],
    ) -> Result<String, StoreError> {
        let mut inv = self.audit_append.prepare_invoke();
        inv.key(keys::audit())
            .arg(offset_ms)
            .arg(retention_ms(retention));
        for (k, v) in fields {
            inv.arg(*k).arg(v);
        }
        let mut conn = self.conn.clone();
        self.bounded("audit", inv.invoke_async(&mut conn)).await
    }

    /// Audit entries with ids in `[start, end]` (`-`/`+` for open ends),
    /// newest first, at most `count`.
    pub async fn audit_range(
        &self,
        end: &str,
        start: &str,
        count: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(keys::audit())
            .arg(end)
            .arg(start)
            .arg("COUNT")
            .arg(count);
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("audit", cmd.query_async(&mut conn)).await?;
        parse_stream(reply)
    }

    /// Seeds the tiers document if Redis has none; returns
    /// `(seeded, document, version)` of what Redis holds afterwards.
    pub async fn tiers_seed(
        &self,
        doc: &str,
        offset_ms: i64,
        retention: Duration,
        entry: &[(&str, String)],
    ) -> Result<(bool, String, u64), StoreError> {
        let mut inv = self.tiers_seed.prepare_invoke();
        inv.key(keys::tiers())
            .key(keys::audit())
            .arg(doc)
            .arg(offset_ms)
            .arg(retention_ms(retention));
        for (k, v) in entry {
            inv.arg(*k).arg(v);
        }
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("tiers", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        let seeded = as_int(f.next()?)? == 1;
        let doc = as_text(f.next()?)?;
        let version = as_u64(f.next()?)?;
        Ok((seeded, doc, version))
    }

    /// The tiers version in Redis (`None`: no tiers stored).
    pub async fn tiers_version(&self) -> Result<Option<u64>, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(keys::tiers()).arg("version");
        let mut conn = self.conn.clone();
        self.bounded("tiers", cmd.query_async(&mut conn)).await
    }

    /// The tiers document and its version, read together.
    pub async fn tiers_read(&self) -> Result<Option<(String, u64)>, StoreError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(keys::tiers()).arg("doc").arg("version");
        let mut conn = self.conn.clone();
        let (doc, version): (Option<String>, Option<u64>) =
            self.bounded("tiers", cmd.query_async(&mut conn)).await?;
        Ok(doc.zip(version))
    }

    /// Compare-and-set of the tiers document with its audit entry:
    /// `Ok(Some((version, audit id)))`, or `Ok(None)` when the version moved.
    pub async fn tiers_write(
        &self,
        expected_version: u64,
        doc: &str,
        offset_ms: i64,
        retention: Duration,
        entry: &[(&str, String)],
    ) -> Result<Option<(u64, String)>, StoreError> {
        let mut inv = self.tiers_write.prepare_invoke();
        inv.key(keys::tiers())
            .key(keys::audit())
            .arg(expected_version)
            .arg(doc)
            .arg(offset_ms)
            .arg(retention_ms(retention));
        for (k, v) in entry {
            inv.arg(*k).arg(v);
        }
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("tiers", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        if as_int(f.next()?)? != 1 {
            return Ok(None);
        }
        let version = as_u64(f.next()?)?;
        let id = as_text(f.next()?)?;
        Ok(Some((version, id)))
    }

    /// Adds `tenant` to the usage index of `day` (kept `ttl_s` seconds).
    pub async fn usage_index_add(
        &self,
        day: &str,
        tenant: &str,
        ttl_s: u64,
    ) -> Result<(), StoreError> {
        let key = keys::usage_index(day);
        let mut pipe = redis::pipe();
        pipe.sadd(&key, tenant).ignore();
        pipe.cmd("EXPIRE").arg(&key).arg(ttl_s).ignore();
        let mut conn = self.conn.clone();
        self.bounded("usage", pipe.query_async::<()>(&mut conn)).await
    }

    /// Tenants with usage on `day`.
    pub async fn usage_index(&self, day: &str) -> Result<Vec<String>, StoreError> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(keys::usage_index(day));
        let mut conn = self.conn.clone();
        let mut v: Vec<String> = self.bounded("usage", cmd.query_async(&mut conn)).await?;
        v.sort();
        Ok(v)
    }

    /// The rollup hashes of `(tenant, day)` pairs, in order (empty maps for
    /// days without usage).
    pub async fn usage_rollups(
        &self,
        pairs: &[(String, String)],
    ) -> Result<Vec<BTreeMap<String, u64>>, StoreError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (tenant, day) in pairs {
            pipe.hgetall(keys::usage_day(tenant, day));
        }
        let mut conn = self.conn.clone();
        self.bounded("usage", pipe.query_async(&mut conn)).await
    }

    /// Redis's clock plus the test offset, in epoch ms.
    pub async fn now_ms(&self, offset_ms: i64) -> Result<i64, StoreError> {
        let mut conn = self.conn.clone();
        let (s, us): (i64, i64) = self
            .bounded("time", redis::cmd("TIME").query_async(&mut conn))
            .await?;
        Ok(s.saturating_mul(1000)
            .saturating_add(us / 1000)
            .saturating_add(offset_ms))
    }

    /// `used_memory` and `maxmemory` from `INFO memory`.
    pub async fn memory(&self) -> Result<(u64, u64), StoreError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("memory");
        let mut conn = self.conn.clone();
        let text: String = self.bounded("info", cmd.query_async(&mut conn)).await?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let used = field("used_memory").ok_or_else(|| bad("INFO memory has no used_memory"))?;
        Ok((used, field("maxmemory").unwrap_or(0)))
    }

    /// Loads every script so the first calls do not all meet NOSCRIPT at
    /// once. Optional: EVALSHA reloads on NOSCRIPT anyway.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let q = &self.queue;
        for script in [
            &self.check,
            &self.status,
            &self.reconcile,
            &self.tenant_update,
            &self.report,
            &self.audit_append,
            &q.charge,
            &q.enqueue,
            &q.dequeue,
            &q.complete,
            &q.give_back,
            &q.cancel,
            &q.stats,
            &self.lease_return,
        ] {
            self.bounded("load", script.prepare_invoke().load_async(&mut conn))
                .await?;
        }
        Ok(())
    }

    /// A new connection for pub/sub (subscriptions need their own).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, StoreError> {
        self.bounded("queue", self.client.get_async_pubsub()).await
    }

    /// CHARGE: the quota of a queued request, once, at dispatch.
    pub async fn charge(
        &self,
        item: &Leased,
        offset_ms: i64,
        tiers: &TiersSnapshot,
        usage_ttl_s: u64,
        marker_ttl: Duration,
    ) -> Result<ScriptDecision, StoreError> {
        let mut inv = self.queue.charge.prepare_invoke();
        inv.key(keys::cfg(&item.tenant))
            .key(keys::charged(&item.tenant, &item.id))
            .arg(offset_ms)
            .arg(item.cost)
            .arg(tiers.tiers.default_tier())
            .arg(&tiers.script_arg)
            .arg(keys::tier_counter_prefix(&item.tenant))
            .arg(
                item.policy
                    .as_deref()
                    .map(|p| keys::route_counter_prefix(&item.tenant, p))
                    .unwrap_or_default(),
            )
            .arg(&item.route_spec)
            .arg(item.tokens)
            .arg(keys::token_counter_prefix(&item.tenant))
            .arg(keys::usage_prefix(&item.tenant))
            .arg(usage_ttl_s)
            .arg(u64::try_from(marker_ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("queue", inv.invoke_async(&mut conn)).await?;
        parse_charge(reply)
    }

    /// ENQUEUE: consumes the ticket and stores the request.
    pub async fn enqueue(
        &self,
        up: &Upstream,
        item: &NewItem<'_>,
        offset_ms: i64,
    ) -> Result<Enqueued, StoreError> {
        let mut inv = self.queue.enqueue.prepare_invoke();
        inv.key(keys::ticket(&up.name, item.ticket))
            .key(keys::item(&up.name, item.id))
            .arg(keys::upstream_prefix(&up.name))
            .arg(offset_ms)
            .arg(item.id)
            .arg(item.mode.as_str())
            .arg(item.method)
            .arg(item.path)
            .arg(item.headers_json)
            .arg(item.body)
            .arg(up.tenant_queue_depth)
            .arg(up.global_queue_depth)
            .arg(ms(up.keep_after_deadline()))
            .arg(item.tenant)
            .arg(keys::QUEUE_EVENTS)
            .arg(format!("w:{}", up.name));
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("queue", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        Ok(match as_text(f.next()?)?.as_str() {
            "ok" => Enqueued::Ok {
                deadline_ms: as_int(f.next()?)?,
                now_ms: as_int(f.next()?)?,
            },
            "bad_ticket" => Enqueued::BadTicket,
            "queue_full" => Enqueued::QueueFull {
                depth: as_u64(f.next()?)?,
            },
            "overloaded" => Enqueued::Overloaded {
                depth: as_u64(f.next()?)?,
            },
            other => return Err(bad(format!("enqueue answered {other:?}"))),
        })
    }

    /// DEQUEUE: reaps, then leases the next request in DRR order.
    /// `failed` and `expired` are the answers stored for requests out of
    /// attempts or past their deadline.
    pub async fn dequeue(
        &self,
        up: &Upstream,
        offset_ms: i64,
        failed: &Answer,
        expired: &Answer,
    ) -> Result<Dequeued, StoreError> {
        let mut inv = self.queue.dequeue.prepare_invoke();
        inv.arg(keys::upstream_prefix(&up.name))
            .arg(offset_ms)
            .arg(up.rate)
            .arg(up.burst)
            .arg(up.concurrency)
            .arg(ms(up.lease))
            .arg(up.max_attempts)
            .arg(ms(up.result_ttl))
            .arg(failed.status)
            .arg(&failed.headers_json)
            .arg(&failed.body)
            .arg(expired.status)
            .arg(&expired.headers_json)
            .arg(&expired.body)
            .arg(keys::QUEUE_EVENTS);
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("queue", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        Ok(match as_text(f.next()?)?.as_str() {
            "item" => {
                let id = as_text(f.next()?)?;
                let attempt = as_u64(f.next()?)?;
                let now_ms = as_int(f.next()?)?;
                let tenant = as_text(f.next()?)?;
                let policy = Some(as_text(f.next()?)?).filter(|p| !p.is_empty());
                let cost = as_u64(f.next()?)?;
                let route_spec = as_text(f.next()?)?;
                let queue_on_quota = as_text(f.next()?)? == "1";
                let mode = if as_text(f.next()?)? == "async" { Mode::Async } else { Mode::Wait };
                let method = as_text(f.next()?)?;
                let path = as_text(f.next()?)?;
                let headers_json = as_text(f.next()?)?;
                let body = as_bytes(f.next()?)?;
                let created_ms = as_int(f.next()?)?;
                let deadline_ms = as_int(f.next()?)?;
                let tokens = as_int(f.next()?).ok().and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
                Dequeued::Item(Box::new(Leased {
                    id,
                    attempt,
                    now_ms,
                    tenant,
                    policy,
                    cost,
                    route_spec,
                    queue_on_quota,
                    tokens,
                    mode,
                    method,
                    path,
                    headers_json,
                    body,
                    created_ms,
                    deadline_ms,
                }))
            }
            "wait" => Dequeued::Wait(Duration::from_millis(as_u64(f.next()?)?.clamp(1, 1_000))),
            "empty" => Dequeued::Empty,
            "busy" => Dequeued::Busy,
            other => return Err(bad(format!("dequeue answered {other:?}"))),
        })
    }

    /// COMPLETE: stores the answer; false if an answer was already final.
    pub async fn complete(
        &self,
        up: &Upstream,
        id: &str,
        answer: &Answer,
        refund: bool,
        offset_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut inv = self.queue.complete.prepare_invoke();
        inv.key(keys::item(&up.name, id))
            .arg(keys::upstream_prefix(&up.name))
            .arg(id)
            .arg(offset_ms)
            .arg(answer.status)
            .arg(&answer.headers_json)
            .arg(&answer.body)
            .arg(ms(up.result_ttl))
            .arg(keys::QUEUE_EVENTS)
            .arg(u8::from(refund))
            .arg(up.rate)
            .arg(up.burst);
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("queue", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        Ok(as_text(f.next()?)? == "ok")
    }

    /// GIVE_BACK: a leased request goes back to the queue (front), or is
    /// deferred until `not_before_ms`; false if the lease was lost.
    pub async fn give_back(
        &self,
        up: &Upstream,
        item: &Leased,
        not_before_ms: i64,
        offset_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut inv = self.queue.give_back.prepare_invoke();
        inv.key(keys::item(&up.name, &item.id))
            .arg(keys::upstream_prefix(&up.name))
            .arg(&item.id)
            .arg(item.attempt)
            .arg(offset_ms)
            .arg(not_before_ms)
            .arg(up.rate)
            .arg(up.burst)
            .arg(keys::QUEUE_EVENTS)
            .arg(format!("w:{}", up.name));
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("queue", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        Ok(as_text(f.next()?)? == "ok")
    }

    /// CANCEL: takes a waiting request out (`timeout` stores `expired` as
    /// its answer, `gone` deletes it). Returns `removed` or the state it
    /// was in (`leased`, a final state, or `gone`).
    pub async fn cancel(
        &self,
        up: &Upstream,
        id: &str,
        timeout: bool,
        expired: &Answer,
        offset_ms: i64,
    ) -> Result<String, StoreError> {
        let mut inv = self.queue.cancel.prepare_invoke();
        inv.key(keys::item(&up.name, id))
            .arg(keys::upstream_prefix(&up.name))
            .arg(id)
            .arg(offset_ms)
            .arg(if timeout { "timeout" } else { "gone" })
            .arg(expired.status)
            .arg(&expired.headers_json)
            .arg(&expired.body)
            .arg(ms(up.result_ttl))
            .arg(keys::QUEUE_EVENTS);
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("queue", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        as_text(f.next()?)
    }

    /// A queued request's state and answer (None: unknown or expired).
    pub async fn item(&self, up: &str, id: &str) -> Result<Option<ItemView>, StoreError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(keys::item(up, id))
            .arg("st")
            .arg("t")
            .arg("m")
            .arg("rs")
            .arg("rh")
            .arg("rb");
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("queue", cmd.query_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        let state = match f.next()? {
            Value::Nil => return Ok(None),
            v => as_text(v)?,
        };
        let tenant = as_text(f.next()?)?;
        let mode = as_text(f.next()?).unwrap_or_default();
        let answer = match f.next()? {
            Value::Nil => None,
            status => Some(Answer {
                status: u16::try_from(as_int(status)?).map_err(|_| bad("bad status"))?,
                headers_json: as_text(f.next()?)?,
                body: as_bytes(f.next()?)?,
            }),
        };
        Ok(Some(ItemView {
            state,
            tenant,
            mode,
            answer,
        }))
    }

    /// Deletes a wait-mode request whose answer its waiter has sent.
    pub async fn forget_item(&self, up: &str, id: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(keys::item(up, id));
        let mut conn = self.conn.clone();
        self.bounded("queue", cmd.query_async::<()>(&mut conn)).await
    }

    /// QUEUE_STATS: depth and oldest wait of an upstream's queue.
    pub async fn queue_stats(
        &self,
        up: &str,
        offset_ms: i64,
        max_tenants: usize,
    ) -> Result<QueueStats, StoreError> {
        let mut inv = self.queue.stats.prepare_invoke();
        inv.arg(keys::upstream_prefix(up))
            .arg(offset_ms)
            .arg(max_tenants);
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded("queue", inv.invoke_async(&mut conn)).await?;
        let mut f = fields(&reply)?;
        let now_ms = as_int(f.next()?)?;
        let queued = as_u64(f.next()?)?;
        let in_flight = as_u64(f.next()?)?;
        let deferred = as_u64(f.next()?)?;
        let tenants_total = as_u64(f.next()?)?;
        let oldest = as_int(f.next()?)?;
        let listed = as_u64(f.next()?)?;
        let mut tenants = Vec::new();
        for _ in 0..listed {
            let tenant = as_text(f.next()?)?;
            let depth = as_u64(f.next()?)?;
            let oldest = as_int(f.next()?)?;
            tenants.push(TenantDepth {
                tenant,
                depth,
                oldest_ms: (oldest > 0).then_some(oldest),
            });
        }
        Ok(QueueStats {
            now_ms,
            queued,
            in_flight,
            deferred,
            tenants_total,
            oldest_ms: (oldest > 0).then_some(oldest),
            tenants,
        })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let reply: String = self
            .bounded("ping", redis::cmd("PING").query_async(&mut conn))
            .await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(StoreError::BadReply(format!("PING answered {reply:?}")))
        }
    }
}

fn retention_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn bad(msg: impl Into<String>) -> StoreError {
    StoreError::BadReply(msg.into())
}

fn as_int(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("non-numeric string where a number was expected")),
        other => Err(bad(format!("expected a number, got {other:?}"))),
    }
}

fn as_bytes(v: &Value) -> Result<Vec<u8>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(b.clone()),
        Value::SimpleString(s) => Ok(s.clone().into_bytes()),
        Value::Nil => Ok(Vec::new()),
        other => Err(bad(format!("expected bytes, got {other:?}"))),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn as_u64(v: &Value) -> Result<u64, StoreError> {
    let i = as_int(v)?;
    u64::try_from(i).map_err(|_| bad(format!("negative value {i}")))
}

fn as_text(v: &Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| bad("non-UTF-8 string")),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(bad(format!("expected a string, got {other:?}"))),
    }
}

fn as_window(v: &Value) -> Result<Window, StoreError> {
    match as_text(v)?.as_str() {
        "second" => Ok(Window::Second),
        "hour" => Ok(Window::Hour),
        "day" => Ok(Window::Day),
        "month" => Ok(Window::Month),
        other => Err(bad(format!("unknown window {other:?}"))),
    }
}

/// A cursor over a flat script reply, so a short reply is an error, never a panic.
struct Fields<'a>(std::slice::Iter<'a, Value>);

impl<'a> Fields<'a> {
    fn next(&mut self) -> Result<&'a Value, StoreError> {
        self.0.next().ok_or_else(|| bad("reply too short"))
    }
}

fn fields(reply: &Value) -> Result<Fields<'_>, StoreError> {
    match reply {
        Value::Array(items) => Ok(Fields(items.iter())),
        other => Err(bad(format!("expected an array, got {other:?}"))),
    }
}

fn opt_u64(v: &Value) -> Result<Option<u64>, StoreError> {
    Ok(u64::try_from(as_int(v)?).ok())
}

/// A count and that many window rows, as CHECK and CHARGE return them:
/// window, kind, limit, used, remaining, reset, reset_in, exceeded, window id.
fn parse_rows(f: &mut Fields<'_>) -> Result<Vec<WindowRow>, StoreError> {
    let n = as_u64(f.next()?)?;
    let mut rows = Vec::new();
    for _ in 0..n {
        rows.push(WindowRow {
            window: as_window(f.next()?)?,
            kind: match as_int(f.next()?)? {
                0 => RowKind::Tier,
                1 => RowKind::Route,
                2 => RowKind::Tokens,
                3 => RowKind::Rate,
                k => return Err(bad(format!("unknown row kind {k}"))),
            },
            limit: as_u64(f.next()?)?,
            used: as_u64(f.next()?)?,
            remaining: as_u64(f.next()?)?,
            reset: as_u64(f.next()?)?,
            reset_in: as_u64(f.next()?)?,
            exceeded: as_int(f.next()?)? == 1,
            window_id: as_text(f.next()?)?,
        });
    }
    Ok(rows)
}

fn parse_check(reply: Value) -> Result<ScriptDecision, StoreError> {
    let mut f = fields(&reply)?;
    let allowed = as_int(f.next()?)? == 1;
    let tier = as_text(f.next()?)?;
    let rid = as_text(f.next()?)?;
    let storage_used = as_u64(f.next()?)?;
    let storage_limit = as_int(f.next()?)?;
    let storage_exceeded = as_int(f.next()?)? == 1;
    let rows = parse_rows(&mut f)?;
    let shadow = as_int(f.next()?)? == 1;
    let pool = as_text(f.next()?)?;
    let day = as_text(f.next()?)?;
    let cost = as_u64(f.next()?)?;
    let verdict_text = as_text(f.next()?)?;
    let verdict = Verdict::parse(&verdict_text)
        .ok_or_else(|| bad(format!("unknown verdict {verdict_text:?}")))?;
    let extra = as_u64(f.next()?)?;
    let lease_units = as_u64(f.next()?)?;
    let lease_valid_ms = as_u64(f.next()?)?;
    Ok(ScriptDecision {
        verdict,
        extra,
        allowed,
        tier,
        rows,
        reservation: (!rid.is_empty()).then_some(rid),
        storage: u64::try_from(storage_limit).ok().map(|limit| StorageState {
            used: storage_used,
            limit,
            exceeded: storage_exceeded,
        }),
        shadow,
        pool: (!pool.is_empty()).then_some(pool),
        day,
        cost,
        lease_units,
        lease_valid_ms,
    })
}

/// CHARGE's reply: {verdict, tier, n, rows (as CHECK's), reset}.
fn parse_charge(reply: Value) -> Result<ScriptDecision, StoreError> {
    let mut f = fields(&reply)?;
    let verdict_text = as_text(f.next()?)?;
    let verdict = Verdict::parse(&verdict_text)
        .ok_or_else(|| bad(format!("unknown verdict {verdict_text:?}")))?;
    let tier = as_text(f.next()?)?;
    let rows = parse_rows(&mut f)?;
    let extra = as_u64(f.next()?)?;
    let day = as_text(f.next()?)?;
    Ok(ScriptDecision {
        allowed: verdict.allowed(),
        tier,
        rows,
        reservation: None,
        storage: None,
        shadow: false,
        pool: None,
        day,
        cost: 0,
        verdict,
        extra,
        lease_units: 0,
        lease_valid_ms: 0,
    })
}

fn parse_status(reply: Value) -> Result<TenantStatus, StoreError> {
    let mut f = fields(&reply)?;
    let tier = as_text(f.next()?)?;
    let stored = as_text(f.next()?)?;
    let shadow = as_int(f.next()?)? == 1;
    let pool = as_text(f.next()?)?;
    let storage_used = as_u64(f.next()?)?;
    let n = as_u64(f.next()?)?;
    let mut limits = Vec::new();
    for _ in 0..n {
        let name = as_text(f.next()?)?;
        let effective = opt_u64(f.next()?)?;
        let source = as_text(f.next()?)?;
        let until = as_u64(f.next()?)?;
        limits.push(LimitRow {
            name,
            effective,
            source,
            override_until_ms: (until > 0).then_some(until),
            tier_value: opt_u64(f.next()?)?,
            custom_value: opt_u64(f.next()?)?,
            override_value: opt_u64(f.next()?)?,
            current: opt_u64(f.next()?)?,
            reset: as_u64(f.next()?)?,
            reset_in: as_u64(f.next()?)?,
        });
    }
    Ok(TenantStatus {
        tier,
        stored_tier: (!stored.is_empty()).then_some(stored),
        shadow,
        pool: (!pool.is_empty()).then_some(pool),
        storage_used,
        limits,
    })
}

/// An XRANGE/XREVRANGE reply: `[[id, [k, v, k, v...]], ...]`.
fn parse_stream(reply: Value) -> Result<Vec<AuditRecord>, StoreError> {
    let Value::Array(entries) = reply else {
        return Err(bad("stream reply is not an array"));
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in &entries {
        let mut f = fields(e)?;
        let id = as_text(f.next()?)?;
        let mut kv = Vec::new();
        if let Value::Array(items) = f.next()? {
            let mut it = items.iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                kv.push((as_text(k)?, as_text(v)?));
            }
        }
        out.push((id, kv));
    }
    Ok(out)
}
