//! Upstreams: the shared backends whose capacity Sluice protects, defined
//! once in the service's upstreams file (`--upstreams`). A filter policy
//! names its upstream; every number lives here, so all Envoys agree.
//!
//! Two phases like the tiers: serde structs that reject unknown fields,
//! then a compile step into [`Upstream`], with defaults filled in and every
//! bound checked (errors name the field).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, MAX_RATE};

/// Largest max wait (one hour), as in the filter.
pub const MAX_WAIT_MS: u64 = 3_600_000;
/// Largest request or response body a queued request may carry.
pub const MAX_BODY_LIMIT: u64 = 64 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamsFile {
    upstreams: BTreeMap<String, UpstreamSpec>,
}

/// One upstream as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSpec {
    url: String,
    rate: u64,
    #[serde(default)]
    burst: Option<u64>,
    #[serde(default)]
    debt: Option<u64>,
    #[serde(default)]
    concurrency: Option<u64>,
    #[serde(default)]
    tenant_queue_depth: Option<u64>,
    #[serde(default)]
    global_queue_depth: Option<u64>,
    #[serde(default)]
    max_wait_ms: Option<u64>,
    #[serde(default)]
    result_ttl_s: Option<u64>,
    #[serde(default)]
    dispatch_timeout_ms: Option<u64>,
    #[serde(default)]
    lease_ms: Option<u64>,
    #[serde(default)]
    max_attempts: Option<u64>,
    #[serde(default)]
    max_body_bytes: Option<u64>,
}

/// A validated upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// Where workers send queued requests: `http://host:port[/base]`; the
    /// original path (and query) is appended.
    pub url: String,
    /// Capacity: requests per second (the global token bucket's refill).
    pub rate: u64,
    /// Bucket size: how many requests may go at once after a quiet spell.
    pub burst: u64,
    /// How far below zero tenants under their fair share may take the
    /// bucket, so they are never queued behind a backlog.
    pub debt: u64,
    /// Most queued requests in flight to this upstream at once, over all
    /// replicas (0: unlimited).
    pub concurrency: u64,
    pub tenant_queue_depth: u64,
    pub global_queue_depth: u64,
    pub max_wait: Duration,
    pub result_ttl: Duration,
    pub dispatch_timeout: Duration,
    /// How long a worker owns a request it took; past it the request is
    /// requeued (or failed after `max_attempts`).
    pub lease: Duration,
    pub max_attempts: u64,
    pub max_body_bytes: u64,
}

/// All upstreams by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams(BTreeMap<String, Upstream>);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl Upstreams {
    pub fn none() -> Upstreams {
        Upstreams::default()
    }

    pub fn from_json(text: &str) -> Result<Upstreams, ConfigError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let file: UpstreamsFile = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| err(format!("upstreams file: {e}")))?;
        de.end().map_err(|e| err(format!("upstreams file: {e}")))?;
        let mut out = BTreeMap::new();
        for (name, spec) in file.upstreams {
            let up = compile(&name, spec)?;
            out.insert(name, up);
        }
        Ok(Upstreams(out))
    }

    pub fn from_file(path: &Path) -> Result<Upstreams, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("upstreams file {}: {e}", path.display())))?;
        Upstreams::from_json(&text).map_err(|e| err(format!("{} ({})", e.0, path.display())))
    }

    pub fn get(&self, name: &str) -> Option<&Upstream> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.0.values()
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn compile(name: &str, s: UpstreamSpec) -> Result<Upstream, ConfigError> {
    let field = |f: &str| format!("upstreams.{name}.{f}");
    if !sluice_wire::is_valid_policy_name(name) {
        return Err(err(format!(
            "upstreams.{name}: upstream names are 1..=64 bytes of A-Z a-z 0-9 . _ -"
        )));
    }
    let range = |f: &str, v: u64, min: u64, max: u64| -> Result<u64, ConfigError> {
        if v < min || v > max {
            Err(err(format!("{}: must be between {min} and {max}, got {v}", field(f))))
        } else {
            Ok(v)
        }
    };
    let url = s.url.trim_end_matches('/').to_string();
    let parsed = reqwest::Url::parse(&url).map_err(|e| err(format!("{}: {e}", field("url"))))?;
    if parsed.scheme() != "http" || parsed.host_str().is_none() {
        return Err(err(format!(
            "{}: must be an http://host[:port][/base] URL (for TLS upstreams point it at an Envoy listener that originates TLS)",
            field("url")
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(err(format!("{}: must not have a query or fragment", field("url"))));
    }
    let rate = range("rate", s.rate, 1, MAX_RATE)?;
    let burst = range("burst", s.burst.unwrap_or(rate), 1, MAX_RATE)?;
    let debt = range("debt", s.debt.unwrap_or(burst), 0, MAX_RATE)?;
    let concurrency = range("concurrency", s.concurrency.unwrap_or(0), 0, MAX_RATE)?;
    let tenant_queue_depth = range("tenant_queue_depth", s.tenant_queue_depth.unwrap_or(100), 1, 1_000_000)?;
    let global_queue_depth = range("global_queue_depth", s.global_queue_depth.unwrap_or(5_000), 1, 10_000_000)?;
    let max_wait_ms = range("max_wait_ms", s.max_wait_ms.unwrap_or(30_000), 1, MAX_WAIT_MS)?;
    let result_ttl_s = range("result_ttl_s", s.result_ttl_s.unwrap_or(3_600), 1, 7 * 86_400)?;
    let dispatch_ms = range("dispatch_timeout_ms", s.dispatch_timeout_ms.unwrap_or(30_000), 1, MAX_WAIT_MS)?;
    let lease_ms = range(
        "lease_ms",
        s.lease_ms.unwrap_or(dispatch_ms.saturating_add(5_000)),
        dispatch_ms.saturating_add(1),
        MAX_WAIT_MS.saturating_mul(2),
    )
    .map_err(|e| err(format!("{} (a lease must outlast dispatch_timeout_ms)", e.0)))?;
    let max_attempts = range("max_attempts", s.max_attempts.unwrap_or(3), 1, 10)?;
    let max_body_bytes = range("max_body_bytes", s.max_body_bytes.unwrap_or(1024 * 1024), 1, MAX_BODY_LIMIT)?;
    Ok(Upstream {
        name: name.to_string(),
        url,
        rate,
        burst,
        debt,
        concurrency,
        tenant_queue_depth,
        global_queue_depth,
        max_wait: Duration::from_millis(max_wait_ms),
        result_ttl: Duration::from_secs(result_ttl_s),
        dispatch_timeout: Duration::from_millis(dispatch_ms),
        lease: Duration::from_millis(lease_ms),
        max_attempts,
        max_body_bytes,
    })
}

impl Upstream {
    /// How long an item may stay in Redis past its deadline: every lease it
    /// may still take, then its result's lifetime.
    pub fn keep_after_deadline(&self) -> Duration {
        let leases = u32::try_from(self.max_attempts).unwrap_or(10);
        self.lease.saturating_mul(leases).saturating_add(self.result_ttl)
    }

    /// The one-line summary printed by `--check-config`.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} rate {}/s burst {} debt {} concurrency {} depth {}/{} max-wait {}ms",
            self.name,
            self.url,
            self.rate,
            self.burst,
            self.debt,
            if self.concurrency == 0 { "unlimited".to_string() } else { self.concurrency.to_string() },
            self.tenant_queue_depth,
            self.global_queue_depth,
            self.max_wait.as_millis()
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_documented_values() {
        let u = Upstreams::from_json(r#"{"upstreams":{"llm":{"url":"http://127.0.0.1:8082/","rate":20}}}"#).unwrap();
        let llm = u.get("llm").unwrap();
        assert_eq!(llm.url, "http://127.0.0.1:8082");
        assert_eq!((llm.rate, llm.burst, llm.debt, llm.concurrency), (20, 20, 20, 0));
        assert_eq!((llm.tenant_queue_depth, llm.global_queue_depth), (100, 5_000));
        assert_eq!(llm.max_wait, Duration::from_secs(30));
        assert_eq!(llm.lease, Duration::from_secs(35));
        assert_eq!((llm.max_attempts, llm.max_body_bytes), (3, 1_048_576));
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = |body: &str| {
            Upstreams::from_json(&format!(r#"{{"upstreams":{{"llm":{body}}}}}"#)).unwrap_err().0
        };
        assert!(e(r#"{"url":"http://h","rate":0}"#).contains("upstreams.llm.rate"));
        assert!(e(r#"{"url":"https://h","rate":1}"#).contains("upstreams.llm.url"));
        assert!(e(r#"{"url":"nope","rate":1}"#).contains("upstreams.llm.url"));
        assert!(e(r#"{"url":"http://h","rate":1,"lease_ms":10,"dispatch_timeout_ms":10}"#).contains("upstreams.llm.lease_ms"));
        assert!(e(r#"{"url":"http://h","rate":1,"tenant_queue_depth":0}"#).contains("tenant_queue_depth"));
        assert!(e(r#"{"url":"http://h","rate":1,"rates":2}"#).contains("upstreams.llm"));
        let bad_name = Upstreams::from_json(r#"{"upstreams":{"a b":{"url":"http://h","rate":1}}}"#).unwrap_err().0;
        assert!(bad_name.contains("upstream names"), "{bad_name}");
    }
}
