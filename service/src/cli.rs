//! `sluice admin ...`: a CLI over the admin API, for every admin action.
//!
//! Readable tables by default, the API's JSON with `--json`. Any answer
//! other than 2xx is printed as `error <status> <code>: <message>` on stderr
//! with exit code 1; a service that can not be reached exits 2.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use comfy_table::{presets, Table};
use reqwest::{Method, Url};
use serde_json::{json, Map, Value};

use crate::config::LIMITS;

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Base URL of a quota service replica.
    #[arg(long, env = "SLUICE_ADMIN_URL", default_value = "http://127.0.0.1:8081", global = true)]
    url: String,
    /// Admin bearer token (wins over --token-file, so a flag overrides an environment default).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// File holding the admin token (a trailing newline is ignored).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Who is making the change (sent as X-Admin-Actor; default: the token's name).
    #[arg(long, env = "SLUICE_ADMIN_ACTOR", global = true)]
    actor: Option<String>,
    /// Why (recorded in the audit log, sent as X-Admin-Reason).
    #[arg(long, global = true)]
    reason: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Request timeout in seconds.
    #[arg(long, default_value_t = 10, global = true)]
    timeout_s: u64,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Show a tenant: tier, every limit with its source, usage, mode.
    Status { tenant: String },
    /// Set a tenant's tier.
    SetTier { tenant: String, tier: String },
    /// Set custom limits: NAME=VALUE (VALUE `clear` removes the custom limit).
    SetLimits {
        tenant: String,
        #[arg(required = true)]
        limits: Vec<String>,
    },
    /// Remove every custom limit of a tenant (the tier applies again).
    ClearLimits { tenant: String },
    /// Grant a temporary override NAME=VALUE that reverts by itself.
    GrantOverride {
        tenant: String,
        #[arg(required = true)]
        limits: Vec<String>,
        /// How long: 90s, 30m, 12h, 7d (default: 7d).
        #[arg(long = "for", conflicts_with = "until")]
        duration: Option<String>,
        /// Until when: RFC 3339 time or epoch ms.
        #[arg(long)]
        until: Option<String>,
    },
    /// Revoke overrides now (all of them when no limit is named).
    RevokeOverride { tenant: String, limits: Vec<String> },
    /// Shadow mode and reserved pool of a tenant.
    SetMode {
        tenant: String,
        /// on | off
        #[arg(long)]
        shadow: Option<String>,
        /// A pool name, or `none` for the shared capacity.
        #[arg(long)]
        pool: Option<String>,
    },
    /// List the tiers.
    Tiers,
    /// Show one tier.
    Tier { name: String },
    /// Create or replace a tier: NAME=VALUE for each limit.
    PutTier {
        name: String,
        #[arg(required = true)]
        limits: Vec<String>,
        /// Reserved pool of the tier's tenants.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Delete a tier (its tenants fall back to the default tier).
    DeleteTier { name: String },
    /// Make a tier the default tier.
    DefaultTier { name: String },
    /// Show the audit log (newest first).
    Audit {
        /// Only changes to this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only changes by this actor (X-Admin-Actor or the token's name).
        #[arg(long = "by")]
        actor: Option<String>,
        /// Only this action, e.g. set_tier, grant_override, put_tier.
        #[arg(long)]
        action: Option<String>,
        /// From this time on: epoch ms, RFC 3339 or YYYY-MM-DD.
        #[arg(long)]
        since: Option<String>,
        /// Up to this time: epoch ms, RFC 3339 or YYYY-MM-DD.
        #[arg(long)]
        until: Option<String>,
        /// At most this many entries (default 100).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Export daily usage (JSON or CSV).
    Usage {
        /// Only this tenant (default: every tenant with usage).
        #[arg(long)]
        tenant: Option<String>,
        /// First day, YYYY-MM-DD (default: --to).
        #[arg(long)]
        from: Option<String>,
        /// Last day, YYYY-MM-DD (default: today).
        #[arg(long)]
        to: Option<String>,
        /// table (default), json or csv.
        #[arg(long, default_value = "table")]
        format: String,
    },
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// Bad arguments (exit 1).
    Usage(String),
    /// The API answered an error (exit 1).
    Api(u16, String, String),
    /// The service could not be reached (exit 2).
    Transport(String),
}

struct Client {
    http: reqwest::Client,
    base: Url,
    token: String,
    actor: Option<String>,
    reason: Option<String>,
}

impl Client {
    async fn call(&self, method: Method, path: &str, query: &[(&str, String)], body: Option<Value>) -> Result<Value, Failure> {
        let text = self.call_text(method, path, query, body).await?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| Failure::Transport(format!("the answer is not JSON: {e}")))
    }

    async fn call_text(&self, method: Method, path: &str, query: &[(&str, String)], body: Option<Value>) -> Result<String, Failure> {
        let mut url = self
            .base
            .join(path.trim_start_matches('/'))
            .map_err(|e| Failure::Usage(format!("bad URL: {e}")))?;
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(&self.token);
        if let Some(a) = &self.actor {
            req = req.header("x-admin-actor", a);
        }
        if let Some(r) = &self.reason {
            req = req.header("x-admin-reason", r);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| Failure::Transport(e.to_string()))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| Failure::Transport(e.to_string()))?;
        if status.is_success() {
            return Ok(text);
        }
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Err(Failure::Api(
            status.as_u16(),
            at(&v, "error").as_str().unwrap_or("error").to_string(),
            at(&v, "message").as_str().map_or(text.clone(), str::to_string),
        ))
    }
}

/// An answer of the Sluice admin API has `key`; anything else (another
/// HTTP server at `--url`) is an error, not an empty table.
fn shape(v: &Value, key: &str) -> Result<(), Failure> {
    if v.get(key).is_some() {
        Ok(())
    } else {
        Err(Failure::Transport(format!(
            "the answer has no `{key}`: is --url the Sluice quota service (its admin address)?"
        )))
    }
}

fn path_segment(s: &str) -> Result<&str, Failure> {
    // Tenant ids, tier and limit names use an alphabet that needs no escaping.
    if s.is_empty() || !s.bytes().all(sluice_wire::is_tenant_byte) {
        return Err(Failure::Usage(format!("{s:?}: names are A-Z a-z 0-9 . _ - : @")));
    }
    Ok(s)
}

/// `NAME=VALUE` pairs into a JSON object; `clear` (when allowed) is null.
fn assignments(items: &[String], allow_clear: bool) -> Result<Map<String, Value>, Failure> {
    let mut m = Map::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            return Err(Failure::Usage(format!("{item:?}: expected NAME=VALUE")));
        };
        let value = if allow_clear && (v == "clear" || v == "none") {
            Value::Null
        } else {
            let n: u64 = v
                .replace('_', "")
                .parse()
                .map_err(|_| Failure::Usage(format!("{item:?}: the value is not a whole number")))?;
            Value::from(n)
        };
        m.insert(k.to_string(), value);
    }
    Ok(m)
}

/// `90s`, `30m`, `12h`, `7d` or plain seconds.
pub fn parse_duration_s(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (s.get(..i).unwrap_or(""), c),
        _ => (s, 's'),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected e.g. 90s, 30m, 12h, 7d"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?}: too long"))
}

fn table(header: Vec<String>) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header);
    t
}

/// `v[key]` without indexing: Null when absent or not an object.
fn at<'a>(v: &'a Value, key: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    v.get(key).unwrap_or(&NULL)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
        other => other.to_string(),
    }
}

fn print_tenant(v: &Value) {
    println!(
        "tenant {}   tier {}{}   shadow {}   reserved pool {}",
        cell(at(v, "tenant")),
        cell(at(v, "tier")),
        match at(v, "stored_tier").as_str() {
            None => " (default)".to_string(),
            Some(s) if Some(s) != at(v, "tier").as_str() => format!(" (stored {s:?} no longer exists)"),
            Some(_) => String::new(),
        },
        cell(at(v, "shadow")),
        cell(at(v, "reserved_pool")),
    );
    let mut t = table(
        ["LIMIT", "EFFECTIVE", "SOURCE", "UNTIL", "TIER", "CUSTOM", "OVERRIDE", "USED", "REMAINING", "RESET IN"]
            .map(String::from)
            .to_vec(),
    );
    for def in LIMITS {
        let l = at(at(v, "limits"), def.name);
        let w = at(v, "windows")
            .as_array()
            .and_then(|ws| ws.iter().find(|w| at(w, "window") == def.name))
            .cloned()
            .unwrap_or(Value::Null);
        t.add_row(vec![
            def.name.to_string(),
            cell(at(l, "effective")),
            cell(at(l, "source")),
            cell(at(l, "until")),
            cell(at(l, "tier")),
            cell(at(l, "custom")),
            cell(at(l, "override")),
            cell(at(&w, "current")),
            cell(at(&w, "remaining")),
            at(&w, "reset_in").as_u64().map_or("-".to_string(), |s| format!("{s}s")),
        ]);
    }
    println!("{t}");
}

fn print_tiers(v: &Value) {
    let mut header = vec!["TIER".to_string(), "DEFAULT".to_string()];
    header.extend(LIMITS.iter().map(|d| d.name.to_string()));
    header.push("reserved_pool".to_string());
    let mut t = table(header);
    if let Some(tiers) = at(v, "tiers").as_object() {
        for (name, tier) in tiers {
            let mut row = vec![name.clone(), if at(v, "default_tier") == name.as_str() { "yes" } else { "" }.to_string()];
            row.extend(LIMITS.iter().map(|d| cell(at(tier, d.name))));
            row.push(cell(at(tier, "reserved_pool")));
            t.add_row(row);
        }
    }
    println!("tiers version {}", cell(at(v, "version")));
    println!("{t}");
}

fn print_audit(v: &Value) {
    let mut t = table(["TIME", "ACTOR", "ACTION", "TENANT", "TARGET", "OLD", "NEW", "REASON"].map(String::from).to_vec());
    for e in at(v, "entries").as_array().into_iter().flatten() {
        let mut action = cell(at(e, "action"));
        if at(e, "result") == "failed" {
            action.push_str(" (failed)");
        }
        t.add_row(vec![
            cell(at(e, "time")),
            cell(at(e, "actor")),
            action,
            cell(at(e, "tenant")),
            cell(at(e, "target")),
            cell(at(e, "old")),
            cell(at(e, "new")),
            cell(at(e, "reason")),
        ]);
    }
    println!("{t}");
}

fn print_usage(v: &Value) {
    let cols = crate::usage::CSV_HEADER.split(',').collect::<Vec<_>>();
    let mut t = table(cols.iter().map(|c| c.to_ascii_uppercase()).collect());
    for r in at(v, "rows").as_array().into_iter().flatten() {
        t.add_row(cols.iter().map(|c| cell(at(r, c))).collect::<Vec<_>>());
    }
    println!("{t}");
}

async fn execute(args: AdminArgs) -> Result<(), Failure> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| Failure::Usage(format!("--token-file {}: {e}", f.display())))?
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        (None, None) => {
            return Err(Failure::Usage(
                "no admin token: give --token, --token-file, SLUICE_ADMIN_TOKEN or SLUICE_ADMIN_TOKEN_FILE".into(),
            ))
        }
    };
    let mut base = Url::parse(&args.url).map_err(|e| Failure::Usage(format!("--url {:?}: {e}", args.url)))?;
    if !base.path().ends_with('/') {
        let p = format!("{}/", base.path());
        base.set_path(&p);
    }
    let base = base
        .join("v1/admin/")
        .map_err(|e| Failure::Usage(format!("--url: {e}")))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s.max(1)))
        .build()
        .map_err(|e| Failure::Transport(e.to_string()))?;
    let c = Client {
        http,
        base,
        token,
        actor: args.actor.clone(),
        reason: args.reason.clone(),
    };
    let json_out = args.json;
    let show = |v: &Value, table: fn(&Value)| {
        if json_out {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            table(v);
        }
    };
    match args.command {
        AdminCommand::Status { tenant } => {
            let v = c.call(Method::GET, &format!("tenants/{}", path_segment(&tenant)?), &[], None).await?;
            shape(&v, "tenant")?;
            show(&v, print_tenant);
        }
        AdminCommand::SetTier { tenant, tier } => {
            let v = c
                .call(Method::PUT, &format!("tenants/{}/tier", path_segment(&tenant)?), &[], Some(json!({"tier": tier})))
                .await?;
            shape(&v, "tenant")?;
            show(&v, print_tenant);
        }
        AdminCommand::SetLimits { tenant, limits } => {
            let body = assignments(&limits, true)?;
            let v = c
                .call(Method::PUT, &format!("tenants/{}/limits", path_segment(&tenant)?), &[], Some(Value::Object(body)))
                .await?;
            shape(&v, "tenant")?;
            show(&v, print_tenant);
        }
        AdminCommand::ClearLimits { tenant } => {
            let v = c.call(Method::DELETE, &format!("tenants/{}/limits", path_segment(&tenant)?), &[], None).await?;
            shape(&v, "tenant")?;
            show(&v, print_tenant);
        }
        AdminCommand::GrantOverride { tenant, limits, duration, until } => {
            let mut body = Map::new();
            body.insert("limits".into(), Value::Object(assignments(&limits, false)?));
            if let Some(d) = duration {
                body.insert("duration_s".into(), json!(parse_duration_s(&d).map_err(Failure::Usage)?));
            }
            if let Some(u) = until {
                body.insert("until".into(), json!(u));
            }
            let v = c
                .call(Method::PUT, &format!("tenants/{}/overrides", path_segment(&tenant)?), &[], Some(Value::Object(body)))
                .await?;
            shape(&v, "tenant")?;
            show(&v, print_tenant);
        }
        AdminCommand::RevokeOverride { tenant, limits } => {
            let t = path_segment(&tenant)?.to_string();
            let mut v = Value::Null;
            if limits.is_empty() {
                v = c.call(Method::DELETE, &format!("tenants/{t}/overrides"), &[], None).await?;
            }
            for l in &limits {
                v = c.call(Method::DELETE, &format!("tenants/{t}/overrides/{}", path_segment(l)?), &[], None).await?;
            }
            shape(&v, "tenant")?;
            show(&v, print_tenant);
        }
        AdminCommand::SetMode { tenant, shadow, pool } => {
            let mut body = Map::new();
            if let Some(s) = shadow {
                let on = match s.as_str() {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    other => return Err(Failure::Usage(format!("--shadow {other:?}: on or off"))),
                };
                body.insert("shadow".into(), json!(on));
            }
            if let Some(p) = pool {
                body.insert(
                    "reserved_pool".into(),
                    if p == "none" { Value::Null } else { json!(p) },
                );
            }
            let v = c
                .call(Method::PUT, &format!("tenants/{}/mode", path_segment(&tenant)?), &[], Some(Value::Object(body)))
                .await?;
            shape(&v, "tenant")?;
            show(&v, print_tenant);
        }
        AdminCommand::Tiers => {
            let v = c.call(Method::GET, "tiers", &[], None).await?;
            shape(&v, "tiers")?;
            show(&v, print_tiers);
        }
        AdminCommand::Tier { name } => {
            let v = c.call(Method::GET, &format!("tiers/{}", path_segment(&name)?), &[], None).await?;
            shape(&v, "tier")?;
            show(&v, |v| {
                let name = at(v, "name").as_str().unwrap_or("?").to_string();
                let mut tiers = Map::new();
                tiers.insert(name, at(v, "tier").clone());
                let default = if at(v, "default") == &Value::Bool(true) { at(v, "name").clone() } else { Value::Null };
                print_tiers(&json!({"version": at(v, "version"), "default_tier": default, "tiers": tiers}));
            });
        }
        AdminCommand::PutTier { name, limits, pool } => {
            let mut body = assignments(&limits, false)?;
            if let Some(p) = pool {
                body.insert("reserved_pool".into(), json!(p));
            }
            let v = c
                .call(Method::PUT, &format!("tiers/{}", path_segment(&name)?), &[], Some(Value::Object(body)))
                .await?;
            shape(&v, "version")?;
            if json_out {
                show(&v, |_| {});
            } else {
                println!("tier {} written (tiers version {})", name, cell(at(&v, "version")));
            }
        }
        AdminCommand::DeleteTier { name } => {
            let v = c.call(Method::DELETE, &format!("tiers/{}", path_segment(&name)?), &[], None).await?;
            shape(&v, "tiers")?;
            show(&v, print_tiers);
        }
        AdminCommand::DefaultTier { name } => {
            let v = c.call(Method::PUT, "default-tier", &[], Some(json!({"tier": name}))).await?;
            shape(&v, "tiers")?;
            show(&v, print_tiers);
        }
        AdminCommand::Audit { tenant, actor, action, since, until, limit } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            for (k, v) in [("tenant", tenant), ("actor", actor), ("action", action), ("since", since), ("until", until)] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            if let Some(l) = limit {
                q.push(("limit", l.to_string()));
            }
            let v = c.call(Method::GET, "audit", &q, None).await?;
            shape(&v, "entries")?;
            show(&v, print_audit);
        }
        AdminCommand::Usage { tenant, from, to, format } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            for (k, v) in [("tenant", tenant), ("from", from), ("to", to)] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            match (format.as_str(), json_out) {
                ("csv", _) => {
                    q.push(("format", "csv".into()));
                    print!("{}", c.call_text(Method::GET, "usage", &q, None).await?);
                }
                ("json", _) | (_, true) => {
                    let v = c.call(Method::GET, "usage", &q, None).await?;
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                }
                ("table", false) => {
                    let v = c.call(Method::GET, "usage", &q, None).await?;
                    shape(&v, "rows")?;
                    print_usage(&v);
                }
                (other, _) => return Err(Failure::Usage(format!("--format {other:?}: table, json or csv"))),
            }
        }
    }
    Ok(())
}

/// Runs one `sluice admin` command.
pub async fn run(args: AdminArgs) -> ExitCode {
    match execute(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("sluice admin: {m}");
            ExitCode::FAILURE
        }
        Err(Failure::Api(status, code, message)) => {
            eprintln!("sluice admin: error {status} {code}: {message}");
            ExitCode::FAILURE
        }
        Err(Failure::Transport(m)) => {
            eprintln!("sluice admin: could not reach the service: {m}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration_s("90").unwrap(), 90);
        assert_eq!(parse_duration_s("30m").unwrap(), 1_800);
        assert_eq!(parse_duration_s("7d").unwrap(), 604_800);
        assert!(parse_duration_s("7w").is_err());
        assert!(parse_duration_s("d").is_err());
    }

    #[test]
    fn assignments_parse_numbers_and_clear() {
        let m = assignments(&["hour=5_000".into(), "day=clear".into()], true).unwrap();
        assert_eq!(Value::Object(m), json!({"hour": 5000, "day": null}));
        assert!(assignments(&["hour".into()], true).is_err());
        assert!(assignments(&["day=clear".into()], false).is_err());
    }
}
