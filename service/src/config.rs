//! Service configuration: the tiers (built-in or from a JSON file) and the
//! validated settings `run` needs. Parsing is two-phase: serde structs that
//! reject unknown fields, then a fallible compile step into [`ServeConfig`],
//! which is immutable and shared by every request.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_wire::Window;

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

/// Limits of one tier. A limit left out is not enforced for the tier. Token
/// budgets (`tokens_hour`, `tokens_month`) are charged by checks that carry
/// a token estimate; `storage_bytes` bounds uploads (see [`LimitField`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hour: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_hour: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_month: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
}

/// Every limit a tier (or a per-tenant override) can set, in the order the
/// scripts take them. The admin API, the tiers table passed to the scripts
/// and the tenant's cfg hash all iterate this one list, so a new limit is
/// added here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitField {
    Hour,
    Day,
    Month,
    TokensHour,
    TokensMonth,
    StorageBytes,
}

impl LimitField {
    pub const ALL: [LimitField; 6] = [
        LimitField::Hour,
        LimitField::Day,
        LimitField::Month,
        LimitField::TokensHour,
        LimitField::TokensMonth,
        LimitField::StorageBytes,
    ];

    /// The field name in tiers files, admin bodies and the cfg hash.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitField::Hour => "hour",
            LimitField::Day => "day",
            LimitField::Month => "month",
            LimitField::TokensHour => "tokens_hour",
            LimitField::TokensMonth => "tokens_month",
            LimitField::StorageBytes => "storage_bytes",
        }
    }

    pub fn parse(name: &str) -> Option<LimitField> {
        LimitField::ALL.into_iter().find(|f| f.as_str() == name)
    }

    pub fn of_window(window: Window) -> LimitField {
        match window {
            Window::Hour => LimitField::Hour,
            Window::Day => LimitField::Day,
            Window::Month => LimitField::Month,
        }
    }
}

impl TierLimits {
    pub fn window(&self, window: Window) -> Option<u64> {
        self.get(LimitField::of_window(window))
    }

    pub fn get(&self, field: LimitField) -> Option<u64> {
        match field {
            LimitField::Hour => self.hour,
            LimitField::Day => self.day,
            LimitField::Month => self.month,
            LimitField::TokensHour => self.tokens_hour,
            LimitField::TokensMonth => self.tokens_month,
            LimitField::StorageBytes => self.storage_bytes,
        }
    }
}

/// The tiers file as written on disk.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TiersFile {
    #[serde(default)]
    default_tier: Option<String>,
    tiers: BTreeMap<String, TierLimits>,
}

/// Compiled tiers: every tier has at least one window, every limit is in
/// range, and the default tier exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    default_tier: String,
    tiers: BTreeMap<String, TierLimits>,
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
        let tier = |h, d, m, tokens, storage| TierLimits {
            hour: Some(h),
            day: Some(d),
            month: Some(m),
            tokens_hour: None,
            tokens_month: Some(tokens),
            storage_bytes: Some(storage),
        };
        let mut tiers = BTreeMap::new();
        tiers.insert(
            "free".to_string(),
            tier(100, 1_000, 20_000, 500_000, 5_000_000_000),
        );
        tiers.insert(
            "pro".to_string(),
            tier(1_000, 10_000, 200_000, 5_000_000, 50_000_000_000),
        );
        tiers.insert(
            "enterprise".to_string(),
            tier(10_000, 100_000, 2_000_000, 50_000_000, 500_000_000_000),
        );
        Tiers::compile(default_tier.unwrap_or(FALLBACK_DEFAULT_TIER), tiers)
    }

    /// Parses a tiers file. The `default_tier` argument (flag/env) wins over
    /// the file's own `default_tier`.
    pub fn from_json(text: &str, default_tier: Option<&str>) -> Result<Tiers, ConfigError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let file: TiersFile = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| err(format!("tiers file: {e}")))?;
        de.end().map_err(|e| err(format!("tiers file: {e}")))?;
        let default = default_tier
            .map(str::to_string)
            .or(file.default_tier)
            .unwrap_or_else(|| FALLBACK_DEFAULT_TIER.to_string());
        Tiers::compile(&default, file.tiers)
    }

    pub fn from_file(path: &Path, default_tier: Option<&str>) -> Result<Tiers, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("tiers file {}: {e}", path.display())))?;
        Tiers::from_json(&text, default_tier)
            .map_err(|e| err(format!("{} ({})", e.0, path.display())))
    }

    fn compile(
        default_tier: &str,
        tiers: BTreeMap<String, TierLimits>,
    ) -> Result<Tiers, ConfigError> {
        if tiers.is_empty() {
            return Err(err("tiers: at least one tier is required"));
        }
        for (name, limits) in &tiers {
            if !sluice_wire::is_valid_policy_name(name) {
                return Err(err(format!(
                    "tiers.{name}: tier names are 1..=64 bytes of A-Z a-z 0-9 . _ -"
                )));
            }
            if Window::ALL.iter().all(|w| limits.window(*w).is_none()) {
                return Err(err(format!(
                    "tiers.{name}: a tier needs at least one of hour, day, month"
                )));
            }
            for f in LimitField::ALL {
                if let Some(limit) = limits.get(f) {
                    if limit > MAX_LIMIT {
                        return Err(err(format!(
                            "tiers.{name}.{}: {limit} exceeds the maximum {MAX_LIMIT}",
                            f.as_str()
                        )));
                    }
                }
            }
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

    pub fn get(&self, name: &str) -> Option<&TierLimits> {
        self.tiers.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &TierLimits)> {
        self.tiers.iter()
    }

    /// The tier table as the scripts take it:
    /// `{"free":[hour,day,month,tokens_hour,tokens_month,storage_bytes]}`
    /// ([`LimitField::ALL`] order) with -1 for a limit the tier does not
    /// enforce. Built once at start-up.
    pub fn script_arg(&self) -> String {
        let table: BTreeMap<&str, Vec<i64>> = self
            .tiers
            .iter()
            .map(|(name, l)| {
                let lim = |f| l.get(f).map_or(-1, |v| i64::try_from(v).unwrap_or(-1));
                (name.as_str(), LimitField::ALL.into_iter().map(lim).collect())
            })
            .collect();
        serde_json::to_string(&table).unwrap_or_else(|_| "{}".to_string())
    }
}

/// Everything `run` needs, validated.
#[derive(Clone)]
pub struct ServeConfig {
    pub redis_url: String,
    pub tiers: Tiers,
    pub admin_token: Option<Secret>,
    pub redis_timeout: Duration,
    pub enable_test_clock: bool,
}

/// Raw settings as the binary parsed them (flags or env), before validation.
#[derive(Clone, Default)]
pub struct ServeOptions {
    pub redis_url: String,
    pub tiers_file: Option<PathBuf>,
    pub admin_token: Option<Secret>,
    pub admin_token_file: Option<PathBuf>,
    pub default_tier: Option<String>,
    pub redis_timeout_ms: u64,
    pub enable_test_clock: bool,
}

// Hand-written so a password inside the Redis URL never reaches a log line.
impl fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeConfig")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("tiers", &self.tiers)
            .field("admin_token", &self.admin_token)
            .field("redis_timeout", &self.redis_timeout)
            .field("enable_test_clock", &self.enable_test_clock)
            .finish()
    }
}

impl fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeOptions")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("tiers_file", &self.tiers_file)
            .field("admin_token", &self.admin_token)
            .field("admin_token_file", &self.admin_token_file)
            .field("default_tier", &self.default_tier)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("enable_test_clock", &self.enable_test_clock)
            .finish()
    }
}

impl ServeOptions {
    /// Validates everything without touching the network (what
    /// `--check-config` runs, and what `serve` runs before binding).
    pub fn compile(&self) -> Result<ServeConfig, ConfigError> {
        redis::Client::open(self.redis_url.as_str())
            .map_err(|e| err(format!("redis-url {}: {e}", redact_url(&self.redis_url))))?;
        if self.redis_timeout_ms == 0 || self.redis_timeout_ms > 60_000 {
            return Err(err("redis-timeout-ms: must be between 1 and 60000"));
        }
        let default_tier = self.default_tier.as_deref();
        let tiers = match &self.tiers_file {
            Some(path) => Tiers::from_file(path, default_tier)?,
            None => Tiers::builtin(default_tier)?,
        };
        let admin_token = match (&self.admin_token, &self.admin_token_file) {
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
        if let Some(token) = &admin_token {
            let t = token.expose();
            if t.is_empty() {
                return Err(err("admin token: must not be empty"));
            }
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(
                    "admin token: only printable ASCII without spaces is allowed",
                ));
            }
        }
        Ok(ServeConfig {
            redis_url: self.redis_url.clone(),
            tiers,
            admin_token,
            redis_timeout: Duration::from_millis(self.redis_timeout_ms),
            enable_test_clock: self.enable_test_clock,
        })
    }
}

impl ServeConfig {
    /// Human summary printed by `--check-config`; secrets are never shown.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "redis-url:        {}\n",
            redact_url(&self.redis_url)
        ));
        out.push_str(&format!(
            "redis-timeout-ms: {}\n",
            self.redis_timeout.as_millis()
        ));
        out.push_str(&format!(
            "admin API:        {}\n",
            if self.admin_token.is_some() {
                "enabled (token set)"
            } else {
                "disabled (no token)"
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
            "default tier:     {}\n",
            self.tiers.default_tier()
        ));
        out.push_str("tiers:            name: hour / day / month\n");
        for (name, l) in self.tiers.iter() {
            let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            out.push_str(&format!(
                "  {name}: {} / {} / {}\n",
                show(l.hour),
                show(l.day),
                show(l.month)
            ));
        }
        out
    }
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

    #[test]
    fn builtin_tiers_match_the_design() {
        let t = Tiers::builtin(None).unwrap();
        assert_eq!(t.default_tier(), "free");
        let free = t.get("free").unwrap();
        assert_eq!(
            (free.hour, free.day, free.month),
            (Some(100), Some(1000), Some(20000))
        );
        assert_eq!(
            t.get("enterprise").unwrap().storage_bytes,
            Some(500_000_000_000)
        );
        assert_eq!(
            t.script_arg(),
            r#"{"enterprise":[10000,100000,2000000,-1,50000000,500000000000],"free":[100,1000,20000,-1,500000,5000000000],"pro":[1000,10000,200000,-1,5000000,50000000000]}"#
        );
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
        assert_eq!(ok.script_arg(), r#"{"gold":[5,-1,-1,-1,-1,-1]}"#);
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
}
