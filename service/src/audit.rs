//! The audit log: who changed what, from which value to which, when and why.
//!
//! Entries live in one Redis stream (`keys::audit()`), each with fields
//! `ts` (ms), `actor`, `token`, `action`, `tenant`, `target`, `old`, `new`
//! (JSON text), `reason`, and for a change that did not land `result` =
//! `failed` plus `ref` (the id of the entry it voids). Entry ids carry the
//! same ms, so a time range is an id range. The stream is trimmed to the
//! retention on every write and expires a retention after the last one.
//!
//! Order of writes (why no change can exist without its entry):
//! - tiers changes: the document, its version and the entry are written by
//!   one script in one slot (`{g}`): all or nothing.
//! - tenant changes: the tenant's cfg lives in the tenant's slot, the log in
//!   `{g}`, and one script may not span two slots (Redis Cluster). So the
//!   entry is written first (write-ahead) and the change only if that
//!   succeeded. If the change then fails, a `failed` entry referencing it is
//!   appended (best effort); if the replica dies in between, the entry stays
//!   without its `failed` twin. The log may thus name an attempted change
//!   that did not land, never miss one that did.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::store::AuditRecord;

/// Who is making an admin request: the `X-Admin-Actor` header if given,
/// else the token's name; and always the token's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub actor: String,
    pub token: String,
}

/// Actor of changes the service makes by itself (the tiers seed).
pub const SYSTEM_ACTOR: &str = "sluice";

/// Fields of an entry the service writes by itself.
pub fn system_entry(action: &str, tenant: &str, old: &str, new: &str) -> Vec<(&'static str, String)> {
    vec![
        ("actor", SYSTEM_ACTOR.to_string()),
        ("token", String::new()),
        ("action", action.to_string()),
        ("tenant", tenant.to_string()),
        ("target", String::new()),
        ("old", old.to_string()),
        ("new", new.to_string()),
        ("reason", "initial seed from the tiers file or the built-in tiers".to_string()),
    ]
}

/// One change, before it is written.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub who: &'a Identity,
    pub action: &'static str,
    /// Empty for changes that concern no tenant (tiers).
    pub tenant: &'a str,
    /// What inside the tenant or the tiers changed (a tier name, a limit...).
    pub target: String,
    pub old: Value,
    pub new: Value,
    pub reason: Option<String>,
}

impl Change<'_> {
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("actor", self.who.actor.clone()),
            ("token", self.who.token.clone()),
            ("action", self.action.to_string()),
            ("tenant", self.tenant.to_string()),
            ("target", self.target.clone()),
            ("old", self.old.to_string()),
            ("new", self.new.to_string()),
            ("reason", self.reason.clone().unwrap_or_default()),
        ]
    }
}

/// The fields of the entry voiding `id` (its change did not land).
pub fn failed_fields(change: &Change<'_>, id: &str, why: &str) -> Vec<(&'static str, String)> {
    let mut f = change.fields();
    f.push(("result", "failed".to_string()));
    f.push(("ref", id.to_string()));
    if let Some(r) = f.iter_mut().find(|(k, _)| *k == "reason") {
        r.1 = why.to_string();
    }
    f
}

/// An entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntryView {
    pub id: String,
    /// Epoch ms.
    pub ts: u64,
    /// The same instant, RFC 3339 UTC.
    pub time: String,
    pub actor: String,
    pub token: String,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub old: Value,
    pub new: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `failed` for the twin of a change that did not land.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub refers_to: Option<String>,
}

fn json_or_text(s: &str) -> Value {
    if s.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

pub fn view(record: AuditRecord) -> EntryView {
    let (id, fields) = record;
    let m: BTreeMap<String, String> = fields.into_iter().collect();
    let get = |k: &str| m.get(k).cloned().unwrap_or_default();
    let opt = |k: &str| m.get(k).filter(|v| !v.is_empty()).cloned();
    let ts = m
        .get("ts")
        .and_then(|t| t.parse().ok())
        .or_else(|| id.split('-').next().and_then(|t| t.parse().ok()))
        .unwrap_or(0);
    EntryView {
        time: crate::timefmt::rfc3339_ms(ts),
        id,
        ts,
        actor: get("actor"),
        token: get("token"),
        action: get("action"),
        tenant: opt("tenant"),
        target: opt("target"),
        old: json_or_text(&get("old")),
        new: json_or_text(&get("new")),
        reason: opt("reason"),
        result: opt("result"),
        refers_to: opt("ref"),
    }
}

/// What a reader asks for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Inclusive bounds, epoch ms.
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: usize,
}

impl Filter {
    pub fn matches(&self, e: &EntryView) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        eq(&self.tenant, e.tenant.as_deref())
            && eq(&self.actor, Some(e.actor.as_str()))
            && eq(&self.action, Some(e.action.as_str()))
            && self.since_ms.is_none_or(|s| e.ts >= s)
            && self.until_ms.is_none_or(|u| e.ts <= u)
    }
}
