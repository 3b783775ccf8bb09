//! Service configuration: the tiers (built-in or from a JSON file) and the
//! validated settings `run` needs. Parsing is two-phase: serde structs that
//! reject unknown fields, then a fallible compile step into [`ServeConfig`],
//! which is immutable and shared by every request.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use sluice_wire::Window;

use crate::upstreams::Upstreams;

/// Largest limit (and counter) accepted anywhere. Redis Lua numbers are
/// doubles, so everything the scripts add must stay far below 2^53 to be exact.
pub const MAX_LIMIT: u64 = 1_000_000_000_000_000;

/// Cost bounds of one check (the route weight).
pub const MIN_COST: u64 = 1;
pub const MAX_COST: u64 = 1_000_000;

/// How long a token reservation waits for its usage report (seconds). A
/// report that comes later finds no reservation and changes nothing: the
/// reservation stands.
pub const RESERVATION_TTL_S: u64 = 3_600;

/// How long a settled reservation is kept (seconds): a replayed report
/// within it answers `duplicate`, after it `unknown`; neither changes
/// anything. Keeping settled records for the full hour made Redis hold one
/// hash per token request of the last hour (found by `make soak`).
pub const SETTLED_TTL_S: u64 = 120;

/// Most route windows one check may carry; bounds the work of one script run.
pub const MAX_ROUTE_LIMITS: usize = 8;

/// Most the test clock may be shifted (about 100 years), so window ids stay
/// four-digit years and nothing overflows.
pub const MAX_TEST_OFFSET_MS: i64 = 100 * 366 * 86_400_000;

/// Name used when neither the flag nor the tiers file names a default tier.
pub const FALLBACK_DEFAULT_TIER: &str = "free";

/// A secret string (the admin token). Its Debug and Display never show the
/// value, so it cannot leak through `{:?}` of a config or a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Most a tenant's cost weight may multiply a request's cost by.
pub const MAX_COST_WEIGHT: u64 = 1_000;
/// Largest short-term rate or burst of a tier, and capacity of an upstream.
pub const MAX_RATE: u64 = 1_000_000;
/// Largest fair-share weight of a tier.
pub const MAX_WEIGHT: u64 = 1_000;

/// How a named limit is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// A counted calendar window, enforced by the check script.
    Window(Window),
    /// Multiplies the cost of every request of the tenant (default 1).
    CostWeight,
    /// A token window, charged by checks that carry a token estimate
    /// (reserved at admission, reconciled with real usage).
    TokenWindow(Window),
    /// The storage quota: upload routes are refused while the reported
    /// storage use is at or over it.
    Storage,
    /// The short-term rate: requests per second (a token bucket charged on
    /// arrival, direct or queued); `burst` is its size.
    Rate,
    Burst,
    /// The share of an upstream's capacity (fair admission and DRR credit
    /// are proportional to it; default 1).
    Weight,
}

/// One named limit: a tier field, a custom limit and an override all use
/// these names. Everything generic (tiers, custom limits, overrides, the
/// tenant view, the CLI) iterates [`LIMITS`]; adding a limit is one entry here
/// (plus the code that counts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitDef {
    pub name: &'static str,
    pub kind: LimitKind,
    pub min: u64,
    pub max: u64,
}

/// Every limit Sluice knows, in display order.
pub const LIMITS: &[LimitDef] = &[
    LimitDef {
        name: "hour",
        kind: LimitKind::Window(Window::Hour),
        min: 0,
        max: MAX_LIMIT,
    },
    LimitDef {
        name: "day",
        kind: LimitKind::Window(Window::Day),
        min: 0,
        max: MAX_LIMIT,
    },
    LimitDef {
        name: "month",
        kind: LimitKind::Window(Window::Month),
        min: 0,
        max: MAX_LIMIT,
    },
    LimitDef {
        name: "cost_weight",
        kind: LimitKind::CostWeight,
        min: 1,
        max: MAX_COST_WEIGHT,
    },
    LimitDef {
        name: "tokens_hour",
        kind: LimitKind::TokenWindow(Window::Hour),
        min: 0,
        max: MAX_LIMIT,
    },
    LimitDef {
        name: "tokens_month",
        kind: LimitKind::TokenWindow(Window::Month),
        min: 0,
        max: MAX_LIMIT,
    },
    LimitDef {
        name: "storage_bytes",
        kind: LimitKind::Storage,
        min: 0,
        max: MAX_LIMIT,
    },
    LimitDef {
        name: "rate_per_s",
        kind: LimitKind::Rate,
        min: 1,
        max: MAX_RATE,
    },
    LimitDef {
        name: "burst",
        kind: LimitKind::Burst,
        min: 1,
        max: MAX_RATE,
    },
    LimitDef {
        name: "weight",
        kind: LimitKind::Weight,
        min: 1,
        max: MAX_WEIGHT,
    },
];

/// The definition of limit `name`, if Sluice knows it.
pub fn limit_def(name: &str) -> Option<&'static LimitDef> {
    LIMITS.iter().find(|d| d.name == name)
}

/// `hour, day, month, ...` for error messages.
pub fn limit_names() -> String {
    LIMITS.iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
}

/// Checks `value` against limit `name`'s bounds; the error names `field`.
pub fn check_limit(field: &str, name: &str, value: u64) -> Result<(), ConfigError> {
    let Some(def) = limit_def(name) else {
        return Err(err(format!(
            "{field}: unknown limit {name:?} (known: {})",
            limit_names()
        )));
    };
    if value < def.min || value > def.max {
        return Err(err(format!(
            "{field}: must be between {} and {}, got {value}",
            def.min, def.max
        )));
    }
    Ok(())
}

/// Whether `name` is a valid reserved pool name (same rules as policy names:
/// it becomes a header value the route table matches).
pub fn is_valid_pool_name(name: &str) -> bool {
    sluice_wire::is_valid_policy_name(name)
}

/// One tier: a value for some of the [`LIMITS`] (a window left out is not
/// enforced) and, optionally, the reserved pool its tenants are routed to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tier {
    pub limits: BTreeMap<String, u64>,
    pub reserved_pool: Option<String>,
}

/// The former name of [`Tier`].
pub type TierLimits = Tier;

impl Tier {
    pub fn window(&self, window: Window) -> Option<u64> {
        self.get(window.as_str())
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.limits.get(name).copied()
    }

    /// Parses and validates one tier object; errors name `path.field`.
    pub fn from_value(path: &str, value: &Value) -> Result<Tier, ConfigError> {
        let Value::Object(fields) = value else {
            return Err(err(format!("{path}: a tier must be a JSON object")));
        };
        let mut tier = Tier::default();
        for (field, v) in fields {
            let at = format!("{path}.{field}");
            if field == "reserved_pool" {
                match v {
                    Value::Null => {}
                    Value::String(p) if is_valid_pool_name(p) => {
                        tier.reserved_pool = Some(p.clone())
                    }
                    _ => {
                        return Err(err(format!(
                            "{at}: must be null or 1..=64 bytes of A-Z a-z 0-9 . _ -"
                        )))
                    }
                }
                continue;
            }
            if limit_def(field).is_none() {
                return Err(err(format!(
                    "{at}: unknown field (expected one of: {}, reserved_pool)",
                    limit_names()
                )));
            }
            let n = v.as_u64().ok_or_else(|| {
                err(format!("{at}: must be a whole number, got {v}"))
            })?;
            if n > MAX_LIMIT {
                return Err(err(format!("{at}: {n} exceeds the maximum {MAX_LIMIT}")));
            }
            check_limit(&at, field, n)?;
            tier.limits.insert(field.clone(), n);
        }
        if Window::ALL.iter().all(|w| tier.window(*w).is_none()) {
            return Err(err(format!(
                "{path}: a tier needs at least one of hour, day, month"
            )));
        }
        if tier.get("burst").is_some() && tier.get("rate_per_s").is_none() {
            return Err(err(format!(
                "{path}.burst: needs rate_per_s (the burst of the short-term rate)"
            )));
        }
        Ok(tier)
    }

    /// The tier as JSON, in [`LIMITS`] order.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        for def in LIMITS {
            if let Some(v) = self.get(def.name) {
                m.insert(def.name.to_string(), Value::from(v));
            }
        }
        if let Some(p) = &self.reserved_pool {
            m.insert("reserved_pool".to_string(), Value::String(p.clone()));
        }
        Value::Object(m)
    }
}

impl Serialize for Tier {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

/// Compiled tiers: every tier has at least one window, every limit is in
/// range, and the default tier exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    default_tier: String,
    tiers: BTreeMap<String, Tier>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl Tiers {
    /// The built-in tiers of design.md.
    pub fn builtin(default_tier: Option<&str>) -> Result<Tiers, ConfigError> {
        let tier = |h: u64, d: u64, m: u64, tokens: u64, storage: u64, weight: u64| Tier {
            limits: [
                ("hour", h),
                ("day", d),
                ("month", m),
                ("tokens_month", tokens),
                ("storage_bytes", storage),
                ("weight", weight),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            reserved_pool: None,
        };
        let mut tiers = BTreeMap::new();
        tiers.insert(
            "free".to_string(),
            tier(100, 1_000, 20_000, 500_000, 5_000_000_000, 1),
        );
        tiers.insert(
            "pro".to_string(),
            tier(1_000, 10_000, 200_000, 5_000_000, 50_000_000_000, 2),
        );
        tiers.insert(
            "enterprise".to_string(),
            tier(10_000, 100_000, 2_000_000, 50_000_000, 500_000_000_000, 4),
        );
        Tiers::compile(default_tier.unwrap_or(FALLBACK_DEFAULT_TIER), tiers)
    }

    /// Parses a tiers document (`{"default_tier":..,"tiers":{..}}`). The
    /// `default_tier` argument (flag/env) wins over the document's own.
    pub fn from_json(text: &str, default_tier: Option<&str>) -> Result<Tiers, ConfigError> {
        let doc: Value =
            serde_json::from_str(text).map_err(|e| err(format!("tiers file: {e}")))?;
        let Value::Object(top) = doc else {
            return Err(err("tiers file: must be a JSON object"));
        };
        let mut file_default = None;
        let mut tiers = None;
        for (k, v) in &top {
            match (k.as_str(), v) {
                ("default_tier", Value::String(s)) => file_default = Some(s.clone()),
                ("default_tier", Value::Null) => {}
                ("default_tier", _) => return Err(err("default_tier: must be a string")),
                ("tiers", Value::Object(m)) => {
                    let mut out = BTreeMap::new();
                    for (name, t) in m {
                        out.insert(name.clone(), Tier::from_value(&format!("tiers.{name}"), t)?);
                    }
                    tiers = Some(out);
                }
                ("tiers", _) => return Err(err("tiers: must be an object of tiers")),
                (other, _) => {
                    return Err(err(format!(
                        "{other}: unknown field (expected default_tier, tiers)"
                    )))
                }
            }
        }
        let tiers = tiers.ok_or_else(|| err("tiers: missing field `tiers`"))?;
        let default = default_tier
            .map(str::to_string)
            .or(file_default)
            .unwrap_or_else(|| FALLBACK_DEFAULT_TIER.to_string());
        Tiers::compile(&default, tiers)
    }

    pub fn from_file(path: &Path, default_tier: Option<&str>) -> Result<Tiers, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("tiers file {}: {e}", path.display())))?;
        Tiers::from_json(&text, default_tier)
            .map_err(|e| err(format!("{} ({})", e.0, path.display())))
    }

    fn compile(default_tier: &str, tiers: BTreeMap<String, Tier>) -> Result<Tiers, ConfigError> {
        if tiers.is_empty() {
            return Err(err("tiers: at least one tier is required"));
        }
        for (name, tier) in &tiers {
            if !sluice_wire::is_valid_policy_name(name) {
                return Err(err(format!(
                    "tiers.{name}: tier names are 1..=64 bytes of A-Z a-z 0-9 . _ -"
                )));
            }
            // Tiers built in code (not parsed) are validated here too.
            Tier::from_value(&format!("tiers.{name}"), &tier.to_value())?;
        }
        if !tiers.contains_key(default_tier) {
            let known: Vec<&str> = tiers.keys().map(String::as_str).collect();
            return Err(err(format!(
                "default_tier: unknown tier {default_tier:?} (known: {})",
                known.join(", ")
            )));
        }
        Ok(Tiers {
            default_tier: default_tier.to_string(),
            tiers,
        })
    }

    pub fn default_tier(&self) -> &str {
        &self.default_tier
    }

    pub fn get(&self, name: &str) -> Option<&Tier> {
        self.tiers.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tier)> {
        self.tiers.iter()
    }

    pub fn names(&self) -> Vec<&str> {
        self.tiers.keys().map(String::as_str).collect()
    }

    /// These tiers with `name` created or replaced.
    pub fn with_tier(&self, name: &str, tier: Tier) -> Result<Tiers, ConfigError> {
        let mut tiers = self.tiers.clone();
        tiers.insert(name.to_string(), tier);
        Tiers::compile(&self.default_tier, tiers)
    }

    /// These tiers without `name`; the default tier can not be removed.
    pub fn without_tier(&self, name: &str) -> Result<Tiers, ConfigError> {
        if name == self.default_tier {
            return Err(err(format!(
                "tier {name:?} is the default tier; make another tier the default first"
            )));
        }
        let mut tiers = self.tiers.clone();
        tiers.remove(name);
        Tiers::compile(&self.default_tier, tiers)
    }

    /// These tiers with another default tier.
    pub fn with_default(&self, name: &str) -> Result<Tiers, ConfigError> {
        Tiers::compile(name, self.tiers.clone())
    }

    /// The document stored in Redis and returned by the admin API.
    pub fn to_value(&self) -> Value {
        let tiers: Map<String, Value> = self
            .tiers
            .iter()
            .map(|(k, t)| (k.clone(), t.to_value()))
            .collect();
        serde_json::json!({"default_tier": self.default_tier, "tiers": tiers})
    }

    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    /// The tier table as the scripts take it: `{"free":{"hour":100,...}}`,
    /// each tier as its JSON object. Built once per tiers version.
    pub fn script_arg(&self) -> String {
        let table: Map<String, Value> = self
            .tiers
            .iter()
            .map(|(k, t)| (k.clone(), t.to_value()))
            .collect();
        Value::Object(table).to_string()
    }
}

/// A named admin token. The name is what the audit log records as the
/// actor when a request carries no `X-Admin-Actor` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub token: Secret,
}

/// Name of the token given with `--admin-token`/`--admin-token-file`.
pub const SINGLE_TOKEN_NAME: &str = "admin";

pub const DEFAULT_TIERS_REFRESH_MS: u64 = 200;
pub const DEFAULT_AUDIT_RETENTION_DAYS: u64 = 90;
pub const DEFAULT_USAGE_RETENTION_DAYS: u64 = 90;
pub const DEFAULT_METRICS_TOP_TENANTS: usize = 20;

/// Everything `run` needs, validated.
#[derive(Clone)]
pub struct ServeConfig {
    /// One Redis URL, or with `redis_cluster` a comma-separated list of
    /// cluster nodes to discover the cluster from.
    pub redis_url: String,
    /// Talk to a Redis Cluster (`--redis-cluster`).
    pub redis_cluster: bool,
    /// The seed: written to Redis only when Redis holds no tiers yet, and
    /// used until the tiers have been read from Redis.
    pub tiers: Tiers,
    pub admin_tokens: Vec<AdminToken>,
    pub redis_timeout: Duration,
    pub enable_test_clock: bool,
    /// How often every replica polls the tiers version in Redis.
    pub tiers_refresh: Duration,
    pub audit_retention: Duration,
    pub usage_retention_days: u64,
    /// Tenants shown by name in the utilisation metric; the rest are `other`.
    pub metrics_top_tenants: usize,
    /// Upstreams with a capacity (none: checks never name one).
    pub upstreams: Upstreams,
    /// Queue workers per upstream in this replica (0: this replica takes
    /// queued requests in but never dispatches any).
    pub workers: usize,
    /// Header carrying the tenant on the queue listener (async status reads).
    pub tenant_header: String,
    /// How long an in-flight dispatch may still run after SIGTERM before
    /// its worker puts it back in the queue.
    pub worker_drain: Duration,
}

/// The tenant header of the filter's default config.
pub const DEFAULT_TENANT_HEADER: &str = "x-tenant-id";
/// Queue workers per upstream unless `--workers` says otherwise.
pub const DEFAULT_WORKERS: usize = 4;
/// Most workers per upstream in one replica.
pub const MAX_WORKERS: usize = 1024;

impl ServeConfig {
    /// A config with the defaults of every optional setting.
    pub fn new(redis_url: impl Into<String>, tiers: Tiers) -> ServeConfig {
        ServeConfig {
            redis_url: redis_url.into(),
            redis_cluster: false,
            tiers,
            admin_tokens: Vec::new(),
            redis_timeout: Duration::from_millis(250),
            enable_test_clock: false,
            tiers_refresh: Duration::from_millis(DEFAULT_TIERS_REFRESH_MS),
            audit_retention: Duration::from_secs(DEFAULT_AUDIT_RETENTION_DAYS * 86_400),
            usage_retention_days: DEFAULT_USAGE_RETENTION_DAYS,
            metrics_top_tenants: DEFAULT_METRICS_TOP_TENANTS,
            upstreams: Upstreams::none(),
            workers: DEFAULT_WORKERS,
            tenant_header: DEFAULT_TENANT_HEADER.to_string(),
            worker_drain: Duration::from_secs(5),
        }
    }

    pub fn admin_enabled(&self) -> bool {
        !self.admin_tokens.is_empty()
    }
}

/// Raw settings as the binary parsed them (flags or env), before validation.
#[derive(Clone, Default)]
pub struct ServeOptions {
    pub redis_url: String,
    pub redis_cluster: bool,
    pub tiers_file: Option<PathBuf>,
    pub admin_token: Option<Secret>,
    pub admin_token_file: Option<PathBuf>,
    pub admin_tokens_file: Option<PathBuf>,
    pub default_tier: Option<String>,
    pub redis_timeout_ms: u64,
    pub enable_test_clock: bool,
    /// 0 = the default.
    pub tiers_refresh_ms: u64,
    pub audit_retention_days: u64,
    pub usage_retention_days: u64,
    pub metrics_top_tenants: usize,
    pub upstreams_file: Option<PathBuf>,
    /// `None`: [`DEFAULT_WORKERS`].
    pub workers: Option<usize>,
    pub tenant_header: Option<String>,
    pub worker_drain_ms: Option<u64>,
}

// Hand-written so a password inside the Redis URL never reaches a log line.
impl fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.admin_tokens.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("ServeConfig")
            .field("redis_url", &redact_urls(&self.redis_url))
            .field("redis_cluster", &self.redis_cluster)
            .field("tiers", &self.tiers)
            .field("admin_tokens", &names)
            .field("redis_timeout", &self.redis_timeout)
            .field("enable_test_clock", &self.enable_test_clock)
            .field("tiers_refresh", &self.tiers_refresh)
            .field("audit_retention", &self.audit_retention)
            .field("usage_retention_days", &self.usage_retention_days)
            .field("metrics_top_tenants", &self.metrics_top_tenants)
            .field("upstreams", &self.upstreams.names())
            .field("workers", &self.workers)
            .field("tenant_header", &self.tenant_header)
            .field("worker_drain", &self.worker_drain)
            .finish()
    }
}

impl fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeOptions")
            .field("redis_url", &redact_urls(&self.redis_url))
            .field("redis_cluster", &self.redis_cluster)
            .field("tiers_file", &self.tiers_file)
            .field("admin_token", &self.admin_token)
            .field("admin_token_file", &self.admin_token_file)
            .field("admin_tokens_file", &self.admin_tokens_file)
            .field("default_tier", &self.default_tier)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("enable_test_clock", &self.enable_test_clock)
            .finish_non_exhaustive()
    }
}

fn check_token(what: &str, t: &str) -> Result<(), ConfigError> {
    if t.is_empty() {
        return Err(err(format!("{what}: must not be empty")));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(format!(
            "{what}: only printable ASCII without spaces is allowed"
        )));
    }
    Ok(())
}

/// Parses a tokens file: one `name:token` per line; blank lines and lines
/// starting with `#` are ignored. Names follow the policy-name rules.
pub fn parse_tokens_file(text: &str) -> Result<Vec<AdminToken>, ConfigError> {
    let mut out: Vec<AdminToken> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("admin-tokens-file line {}", i + 1);
        let Some((name, token)) = line.split_once(':') else {
            return Err(err(format!("{at}: expected name:token")));
        };
        if !sluice_wire::is_valid_policy_name(name) {
            return Err(err(format!(
                "{at}: token names are 1..=64 bytes of A-Z a-z 0-9 . _ -"
            )));
        }
        check_token(&at, token)?;
        if out.iter().any(|t| t.name == name) {
            return Err(err(format!("{at}: duplicate token name {name:?}")));
        }
        if out.iter().any(|t| t.token.expose() == token) {
            return Err(err(format!("{at}: the same token is given twice")));
        }
        out.push(AdminToken {
            name: name.to_string(),
            token: Secret::new(token),
        });
    }
    if out.is_empty() {
        return Err(err("admin-tokens-file: no name:token line"));
    }
    Ok(out)
}

impl ServeOptions {
    /// Validates everything without touching the network (what
    /// `--check-config` runs, and what `serve` runs before binding).
    pub fn compile(&self) -> Result<ServeConfig, ConfigError> {
        let urls = split_urls(&self.redis_url);
        if urls.is_empty() {
            return Err(err("redis-url: must not be empty"));
        }
        if urls.len() > 1 && !self.redis_cluster {
            return Err(err(
                "redis-url: several URLs are only accepted with --redis-cluster (they are the cluster's seed nodes)",
            ));
        }
        for url in &urls {
            redis::Client::open(*url)
                .map_err(|e| err(format!("redis-url {}: {e}", redact_url(url))))?;
        }
        if self.redis_timeout_ms == 0 || self.redis_timeout_ms > 60_000 {
            return Err(err("redis-timeout-ms: must be between 1 and 60000"));
        }
        let default_tier = self.default_tier.as_deref();
        let tiers = match &self.tiers_file {
            Some(path) => Tiers::from_file(path, default_tier)?,
            None => Tiers::builtin(default_tier)?,
        };
        let single = match (&self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "admin-token and admin-token-file are mutually exclusive",
                ))
            }
            (Some(token), None) => Some(token.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(format!("admin-token-file {}: {e}", path.display())))?;
                // Files written by editors and `echo` end in a newline that is not part of the token.
                Some(Secret::new(text.trim_end_matches(['\r', '\n'])))
            }
            (None, None) => None,
        };
        let mut admin_tokens = Vec::new();
        if let Some(token) = single {
            check_token("admin token", token.expose())?;
            admin_tokens.push(AdminToken {
                name: SINGLE_TOKEN_NAME.to_string(),
                token,
            });
        }
        if let Some(path) = &self.admin_tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(format!("admin-tokens-file {}: {e}", path.display())))?;
            for t in parse_tokens_file(&text)? {
                if admin_tokens.iter().any(|o| o.name == t.name) {
                    return Err(err(format!(
                        "admin-tokens-file: the name {:?} is taken by --admin-token",
                        t.name
                    )));
                }
                if admin_tokens.iter().any(|o| o.token == t.token) {
                    return Err(err(
                        "admin-tokens-file: a token equals the --admin-token token",
                    ));
                }
                admin_tokens.push(t);
            }
        }
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        let tiers_refresh_ms = or(self.tiers_refresh_ms, DEFAULT_TIERS_REFRESH_MS);
        if !(10..=1_000).contains(&tiers_refresh_ms) {
            return Err(err(
                "tiers-refresh-ms: must be between 10 and 1000 (changes must reach every replica within 1 s)",
            ));
        }
        let audit_days = or(self.audit_retention_days, DEFAULT_AUDIT_RETENTION_DAYS);
        let usage_days = or(self.usage_retention_days, DEFAULT_USAGE_RETENTION_DAYS);
        for (what, days) in [
            ("audit-retention-days", audit_days),
            ("usage-retention-days", usage_days),
        ] {
            if days > 3_660 {
                return Err(err(format!("{what}: must be between 1 and 3660")));
            }
        }
        let top = if self.metrics_top_tenants == 0 {
            DEFAULT_METRICS_TOP_TENANTS
        } else {
            self.metrics_top_tenants
        };
        if top > 1_000 {
            return Err(err("metrics-top-tenants: must be between 1 and 1000"));
        }
        let upstreams = match &self.upstreams_file {
            Some(path) => Upstreams::from_file(path)?,
            None => Upstreams::none(),
        };
        if self.redis_cluster && !upstreams.is_empty() {
            // The capacity step of a check touches the tenant's slot and the
            // upstream's in one script, which a cluster refuses (CROSSSLOT).
            return Err(err(
                "upstreams: capacity and the queue are not supported with --redis-cluster yet (a check would span the tenant's and the upstream's hash slots); run them on one Redis",
            ));
        }
        let workers = self.workers.unwrap_or(DEFAULT_WORKERS);
        if workers > MAX_WORKERS {
            return Err(err(format!("workers: must be at most {MAX_WORKERS}")));
        }
        let tenant_header = match &self.tenant_header {
            Some(h) => {
                let h = h.to_ascii_lowercase();
                if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() || h.starts_with("x-sluice-") {
                    return Err(err("tenant-header: must be a header name other than x-sluice-*"));
                }
                h
            }
            None => DEFAULT_TENANT_HEADER.to_string(),
        };
        Ok(ServeConfig {
            redis_url: self.redis_url.clone(),
            redis_cluster: self.redis_cluster,
            tiers,
            admin_tokens,
            redis_timeout: Duration::from_millis(self.redis_timeout_ms),
            enable_test_clock: self.enable_test_clock,
            tiers_refresh: Duration::from_millis(tiers_refresh_ms),
            audit_retention: Duration::from_secs(audit_days * 86_400),
            usage_retention_days: usage_days,
            metrics_top_tenants: top,
            upstreams,
            workers,
            tenant_header,
            worker_drain: Duration::from_millis(self.worker_drain_ms.unwrap_or(5_000).min(60_000)),
        })
    }
}

impl ServeConfig {
    /// The Redis URLs (several only for a cluster's seed nodes).
    pub fn redis_urls(&self) -> Vec<&str> {
        split_urls(&self.redis_url)
    }

    /// Human summary printed by `--check-config`; secrets are never shown.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "redis-url:        {}\n",
            redact_urls(&self.redis_url)
        ));
        out.push_str(&format!(
            "redis:            {}\n",
            if self.redis_cluster {
                "cluster (nodes discovered from the URLs above)"
            } else {
                "single node"
            }
        ));
        out.push_str(&format!(
            "redis-timeout-ms: {}\n",
            self.redis_timeout.as_millis()
        ));
        let names: Vec<&str> = self.admin_tokens.iter().map(|t| t.name.as_str()).collect();
        out.push_str(&format!(
            "admin API:        {}\n",
            if self.admin_enabled() {
                format!("enabled (tokens: {})", names.join(", "))
            } else {
                "disabled (no token)".to_string()
            }
        ));
        out.push_str(&format!(
            "test clock:       {}\n",
            if self.enable_test_clock {
                "enabled"
            } else {
                "disabled"
            }
        ));
        out.push_str(&format!(
            "tiers refresh:    every {} ms\n",
            self.tiers_refresh.as_millis()
        ));
        out.push_str(&format!(
            "audit retention:  {} days\n",
            self.audit_retention.as_secs() / 86_400
        ));
        out.push_str(&format!(
            "usage retention:  {} days\n",
            self.usage_retention_days
        ));
        out.push_str(&format!(
            "default tier:     {} (seed; Redis wins once it holds tiers)\n",
            self.tiers.default_tier()
        ));
        out.push_str("tiers (seed):     name: hour / day / month, rate/s (burst), weight\n");
        for (name, l) in self.tiers.iter() {
            let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            out.push_str(&format!(
                "  {name}: {} / {} / {}, {} ({}), {}\n",
                show(l.get("hour")),
                show(l.get("day")),
                show(l.get("month")),
                show(l.get("rate_per_s")),
                show(l.get("burst").or(l.get("rate_per_s"))),
                l.get("weight").unwrap_or(1)
            ));
        }
        out.push_str(&format!("workers:          {} per upstream\n", self.workers));
        if self.upstreams.is_empty() {
            out.push_str("upstreams:        none\n");
        } else {
            out.push_str("upstreams:\n");
            for u in self.upstreams.iter() {
                out.push_str(&format!("  {}\n", u.summary()));
            }
        }
        out
    }
}

fn split_urls(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// [`redact_url`] on each of a comma-separated list.
pub fn redact_urls(urls: &str) -> String {
    split_urls(urls)
        .into_iter()
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// Hides the password of a `redis://user:pass@host` URL for logs and output.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = url.get(rest_start..).unwrap_or("");
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = rest.get(..authority_end).unwrap_or("");
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = authority.get(..at).unwrap_or("");
    let user = userinfo.split(':').next().unwrap_or("");
    format!(
        "{}{}:[redacted]{}",
        url.get(..rest_start).unwrap_or(""),
        user,
        rest.get(at..).unwrap_or("")
    )
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
    use serde_json::json;

    #[test]
    fn builtin_tiers_match_the_design() {
        let t = Tiers::builtin(None).unwrap();
        assert_eq!(t.default_tier(), "free");
        let free = t.get("free").unwrap();
        assert_eq!(
            (free.get("hour"), free.get("day"), free.get("month")),
            (Some(100), Some(1000), Some(20000))
        );
        assert_eq!(
            t.get("enterprise").unwrap().get("storage_bytes"),
            Some(500_000_000_000)
        );
        let arg: Value = serde_json::from_str(&t.script_arg()).unwrap();
        assert_eq!(arg["pro"]["hour"], 1000);
        assert_eq!(arg["free"]["month"], 20000);
        assert_eq!((arg["free"]["weight"].clone(), arg["pro"]["weight"].clone()), (json!(1), json!(2)));
        assert_eq!(arg["enterprise"]["weight"], 4);
    }

    #[test]
    fn a_short_term_rate_needs_a_rate_and_weights_are_bounded() {
        let e = Tiers::from_json(r#"{"tiers":{"free":{"hour":1,"burst":2}}}"#, None).unwrap_err();
        assert!(e.0.contains("tiers.free.burst"), "{e}");
        let e = Tiers::from_json(r#"{"tiers":{"free":{"hour":1,"weight":0}}}"#, None).unwrap_err();
        assert!(e.0.contains("tiers.free.weight"), "{e}");
        let e = Tiers::from_json(r#"{"tiers":{"free":{"hour":1,"rate_per_s":0}}}"#, None).unwrap_err();
        assert!(e.0.contains("tiers.free.rate_per_s"), "{e}");
        let ok = Tiers::from_json(r#"{"tiers":{"free":{"hour":1,"rate_per_s":5,"burst":10,"weight":3}}}"#, None).unwrap();
        assert_eq!(ok.get("free").unwrap().get("rate_per_s"), Some(5));
    }

    #[test]
    fn tiers_file_rejects_unknown_fields_naming_the_path() {
        let e = Tiers::from_json(r#"{"tiers":{"free":{"hour":1,"hours":2}}}"#, None).unwrap_err();
        assert!(e.0.contains("tiers.free"), "{e}");
    }

    #[test]
    fn a_tier_without_windows_is_rejected() {
        let e = Tiers::from_json(r#"{"tiers":{"free":{"tokens_month":5}}}"#, None).unwrap_err();
        assert!(e.0.contains("at least one of hour, day, month"), "{e}");
    }

    #[test]
    fn an_unknown_default_tier_is_rejected() {
        let e = Tiers::from_json(r#"{"tiers":{"gold":{"hour":5}}}"#, None).unwrap_err();
        assert!(e.0.contains("default_tier"), "{e}");
        let ok = Tiers::from_json(r#"{"tiers":{"gold":{"hour":5}}}"#, Some("gold")).unwrap();
        assert_eq!(ok.script_arg(), r#"{"gold":{"hour":5}}"#);
    }

    #[test]
    fn the_flag_default_tier_wins_over_the_file() {
        let text = r#"{"default_tier":"a","tiers":{"a":{"hour":1},"b":{"day":2}}}"#;
        assert_eq!(Tiers::from_json(text, None).unwrap().default_tier(), "a");
        assert_eq!(
            Tiers::from_json(text, Some("b")).unwrap().default_tier(),
            "b"
        );
    }

    #[test]
    fn limits_beyond_exact_lua_arithmetic_are_rejected() {
        let text = format!(r#"{{"tiers":{{"free":{{"hour":{}}}}}}}"#, MAX_LIMIT + 1);
        assert!(Tiers::from_json(&text, None).is_err());
    }

    #[test]
    fn upstreams_are_refused_on_a_redis_cluster_with_both_named() {
        let path = std::env::temp_dir().join(format!("sluice-upstreams-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"upstreams":{"gpu":{"url":"http://127.0.0.1:1","rate":5}}}"#).unwrap();
        let opts = |cluster| ServeOptions {
            redis_url: "redis://127.0.0.1:7000,redis://127.0.0.1:7001".into(),
            redis_cluster: cluster,
            upstreams_file: Some(path.clone()),
            redis_timeout_ms: 250,
            ..ServeOptions::default()
        };
        let e = opts(true).compile().unwrap_err().to_string();
        assert!(e.starts_with("upstreams:") && e.contains("--redis-cluster"), "{e}");
        let single = ServeOptions { redis_url: "redis://127.0.0.1:7000".into(), ..opts(false) };
        assert!(single.compile().is_ok());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let opts = ServeOptions {
            redis_url: "redis://u:hunter2@127.0.0.1:6379/".into(),
            admin_token: Some(Secret::new("s3cret-token")),
            redis_timeout_ms: 250,
            ..ServeOptions::default()
        };
        let cfg = opts.compile().unwrap();
        let shown = format!("{opts:?} {cfg:?} {}", cfg.summary());
        assert!(!shown.contains("s3cret-token"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn redis_url_passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://u:p@h:1/0"),
            "redis://u:[redacted]@h:1/0"
        );
        assert_eq!(redact_url("redis://:p@h:1"), "redis://:[redacted]@h:1");
        assert_eq!(redact_url("redis://h:1/"), "redis://h:1/");
    }

    #[test]
    fn tier_edits_keep_the_default_and_refuse_to_drop_it() {
        let t = Tiers::builtin(None).unwrap();
        let gold = Tier::from_value("gold", &serde_json::json!({"hour": 5, "reserved_pool": "gold-pool"})).unwrap();
        let t2 = t.with_tier("gold", gold.clone()).unwrap();
        assert_eq!(t2.get("gold"), Some(&gold));
        assert!(t2.without_tier("free").unwrap_err().0.contains("default tier"));
        let t3 = t2.with_default("gold").unwrap().without_tier("free").unwrap();
        assert_eq!(t3.default_tier(), "gold");
        let back = Tiers::from_json(&t3.to_json(), None).unwrap();
        assert_eq!(back, t3);
    }

    #[test]
    fn tier_fields_are_checked_against_the_limit_list() {
        for (bad, needle) in [
            (serde_json::json!({"hour": 1, "cost_weight": 0}), "tiers.x.cost_weight"),
            (serde_json::json!({"hour": 1, "weekly": 3}), "tiers.x.weekly"),
            (serde_json::json!({"hour": -1}), "tiers.x.hour"),
            (serde_json::json!({"hour": 1, "reserved_pool": "a b"}), "tiers.x.reserved_pool"),
        ] {
            let e = Tier::from_value("tiers.x", &bad).unwrap_err();
            assert!(e.0.starts_with(needle), "{e}");
        }
    }

    #[test]
    fn tokens_files_name_their_tokens_and_reject_bad_lines() {
        let t = parse_tokens_file("# ops team\nalice:tok-a\n\nci-bot:tok-b\n").unwrap();
        assert_eq!(t.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["alice", "ci-bot"]);
        assert!(parse_tokens_file("alice tok").is_err());
        assert!(parse_tokens_file("alice:a\nalice:b").is_err());
        assert!(parse_tokens_file("a:x\nb:x").is_err());
        assert!(parse_tokens_file("a b:x").is_err());
        assert!(parse_tokens_file("").is_err());
    }
}
