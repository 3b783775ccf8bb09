//! The Redis adapter: the only module that talks to Redis.
//!
//! One multiplexed connection (redis-rs `ConnectionManager`) is shared by all
//! requests and reconnects by itself after Redis restarts. Every call is
//! bounded by `--redis-timeout-ms` on top of the client's own timeouts, so a
//! black-holed Redis yields a fast error instead of a hung request. Scripts go
//! out as EVALSHA and are re-loaded by redis-rs when Redis answers NOSCRIPT
//! (after a restart or SCRIPT FLUSH).

use std::fmt;
use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use sluice_wire::Window;

use sluice_wire::{StorageState, UsageAnswer};

use crate::config::{LimitField, ServeConfig, RESERVATION_TTL_S};
use crate::decision::{RowKind, ScriptDecision, ValidCheck, ValidUsage, WindowRow};
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

/// A tier or token window as the admin view reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    /// `hour`, `day`, `month`, `tokens_hour` or `tokens_month`.
    pub name: String,
    pub window: Window,
    pub limit: u64,
    pub current: u64,
    pub reset: u64,
    pub reset_in: u64,
}

/// A tenant's configuration and usage at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStatus {
    pub tier: String,
    /// Custom limits, [`LimitField::ALL`] order.
    pub custom: Vec<(LimitField, Option<u64>)>,
    pub windows: Vec<StatusRow>,
    /// Reported storage use in bytes (0 if never reported).
    pub storage_used: u64,
    /// The storage quota in force, if any.
    pub storage_limit: Option<u64>,
}

#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    timeout: Duration,
    check: Script,
    status: Script,
    reconcile: Script,
    tiers_arg: String,
    default_tier: String,
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
        let client = redis::Client::open(config.redis_url.as_str())?;
        let mgr_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.redis_timeout))
            .set_connection_timeout(Some(config.redis_timeout))
            // Few, short retries: requests fail fast on their own timeout
            // anyway, and a short backoff lets the service notice a
            // restarted Redis within a second.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, mgr_config)?;
        Ok(Store {
            conn,
            timeout: config.redis_timeout,
            check: Script::new(scripts::CHECK),
            status: Script::new(scripts::STATUS),
            reconcile: Script::new(scripts::RECONCILE),
            tiers_arg: config.tiers.script_arg(),
            default_tier: config.tiers.default_tier().to_string(),
        })
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(StoreError::Redis),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Runs the check script: decides and, if admitted, counts.
    pub async fn check(
        &self,
        c: &ValidCheck,
        offset_ms: i64,
    ) -> Result<ScriptDecision, StoreError> {
        let mut inv = self.check.prepare_invoke();
        inv.key(keys::cfg(&c.tenant))
            .arg(offset_ms)
            .arg(c.cost)
            .arg(&self.default_tier)
            .arg(&self.tiers_arg)
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
            .arg(RESERVATION_TTL_S);
        for rl in &c.route_limits {
            inv.arg(rl.window.as_str()).arg(rl.limit);
        }
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded(inv.invoke_async(&mut conn)).await?;
        parse_check(reply)
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
            .arg(keys::token_counter_prefix(&u.tenant));
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded(inv.invoke_async(&mut conn)).await?;
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
        self.bounded(cmd.query_async::<()>(&mut conn)).await
    }

    /// Reads a tenant's tier, custom limits and current usage (read-only).
    pub async fn status(&self, tenant: &str, offset_ms: i64) -> Result<TenantStatus, StoreError> {
        let mut inv = self.status.prepare_invoke();
        inv.key(keys::cfg(tenant))
            .arg(offset_ms)
            .arg(&self.default_tier)
            .arg(&self.tiers_arg)
            .arg(keys::tier_counter_prefix(tenant))
            .arg(keys::token_counter_prefix(tenant))
            .arg(keys::storage(tenant));
        let mut conn = self.conn.clone();
        let reply: Value = self.bounded(inv.invoke_async(&mut conn)).await?;
        parse_status(reply)
    }

    /// Sets the tenant's tier (validated against the tiers by the caller).
    pub async fn set_tier(&self, tenant: &str, tier: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(keys::cfg(tenant)).arg("tier").arg(tier);
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async::<()>(&mut conn)).await
    }

    /// Sets (`Some`) or clears (`None`) custom limits, all in one MULTI so a
    /// check never sees half of a change.
    pub async fn set_limits(
        &self,
        tenant: &str,
        changes: &[(LimitField, Option<u64>)],
    ) -> Result<(), StoreError> {
        let key = keys::cfg(tenant);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (window, value) in changes {
            match value {
                Some(v) => pipe.hset(&key, window.as_str(), *v).ignore(),
                None => pipe.hdel(&key, window.as_str()).ignore(),
            };
        }
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async::<()>(&mut conn)).await
    }

    /// Removes every custom limit (the tier applies again).
    pub async fn clear_limits(&self, tenant: &str) -> Result<(), StoreError> {
        let changes: Vec<(LimitField, Option<u64>)> =
            LimitField::ALL.iter().map(|f| (*f, None)).collect();
        self.set_limits(tenant, &changes).await
    }

    /// Loads both scripts so the first checks do not all meet NOSCRIPT at
    /// once. Optional: EVALSHA reloads on NOSCRIPT anyway.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        for script in [&self.check, &self.status, &self.reconcile] {
            self.bounded(script.prepare_invoke().load_async(&mut conn))
                .await?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let reply: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(StoreError::BadReply(format!("PING answered {reply:?}")))
        }
    }
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

fn parse_check(reply: Value) -> Result<ScriptDecision, StoreError> {
    let mut f = fields(&reply)?;
    let allowed = as_int(f.next()?)? == 1;
    let tier = as_text(f.next()?)?;
    let rid = as_text(f.next()?)?;
    let storage_used = as_u64(f.next()?)?;
    let storage_limit = as_int(f.next()?)?;
    let storage_exceeded = as_int(f.next()?)? == 1;
    let n = as_u64(f.next()?)?;
    let mut rows = Vec::new();
    for _ in 0..n {
        rows.push(WindowRow {
            window: as_window(f.next()?)?,
            kind: match as_int(f.next()?)? {
                0 => RowKind::Tier,
                1 => RowKind::Route,
                2 => RowKind::Tokens,
                k => return Err(bad(format!("unknown row kind {k}"))),
            },
            limit: as_u64(f.next()?)?,
            used: as_u64(f.next()?)?,
            remaining: as_u64(f.next()?)?,
            reset: as_u64(f.next()?)?,
            reset_in: as_u64(f.next()?)?,
            exceeded: as_int(f.next()?)? == 1,
        });
    }
    Ok(ScriptDecision {
        allowed,
        tier,
        rows,
        reservation: (!rid.is_empty()).then_some(rid),
        storage: u64::try_from(storage_limit).ok().map(|limit| StorageState {
            used: storage_used,
            limit,
            exceeded: storage_exceeded,
        }),
    })
}

fn parse_status(reply: Value) -> Result<TenantStatus, StoreError> {
    let mut f = fields(&reply)?;
    let tier = as_text(f.next()?)?;
    let mut custom = Vec::new();
    for field in LimitField::ALL {
        custom.push((field, u64::try_from(as_int(f.next()?)?).ok()));
    }
    let storage_used = as_u64(f.next()?)?;
    let storage_limit = u64::try_from(as_int(f.next()?)?).ok();
    let n = as_u64(f.next()?)?;
    let mut windows = Vec::new();
    for _ in 0..n {
        windows.push(StatusRow {
            name: as_text(f.next()?)?,
            window: as_window(f.next()?)?,
            limit: as_u64(f.next()?)?,
            current: as_u64(f.next()?)?,
            reset: as_u64(f.next()?)?,
            reset_in: as_u64(f.next()?)?,
        });
    }
    Ok(TenantStatus {
        tier,
        custom,
        windows,
        storage_used,
        storage_limit,
    })
}
