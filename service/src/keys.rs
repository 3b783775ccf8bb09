//! Every Redis key Sluice uses is spelled here and nowhere else.
//!
//! All of a tenant's keys carry the hash tag `{t:<tenant>}`, so in Redis
//! Cluster they live in one slot and a single script may touch all of them.
//! Tenant ids and policy names are validated before they get here: tenant ids
//! cannot contain `{` or `}` (so the tag always closes where we think) and
//! policy names cannot contain `:` (so a route key splits unambiguously). No
//! escaping is needed.
//!
//! An upstream's capacity and queue state carries the hash tag
//! `{u:<upstream>}`: one slot per upstream, so the queue scripts (enqueue,
//! DRR dequeue, complete, leases) each touch a single slot. The scripts get
//! the prefix [`upstream_prefix`] and append the fixed suffixes listed
//! there (plus a tenant or request id).
//!
//! Counter keys end in a window id that only the scripts know (it comes from
//! Redis `TIME`), so for counters this module hands the scripts a prefix and
//! the scripts append `<window>:<window-id>`.

use sluice_wire::Window;

/// Hash tag of the few keys that belong to no tenant (tiers, audit log,
/// usage index). They never appear in a tenant's script: the check script
/// gets the tiers in ARGV, so it stays inside one tenant slot.
pub const GLOBAL_TAG: &str = "{g}";

/// Common prefix of every Sluice key (used by tests and tooling to scan).
pub const PREFIX: &str = "sluice:";

/// `{t:<tenant>}`: the Redis Cluster hash tag of one tenant.
pub fn tenant_tag(tenant: &str) -> String {
    format!("{{t:{tenant}}}")
}

/// `sluice:{t:<tenant>}:cfg`, the tenant's settings hash: `tier`, custom
/// limits by limit name, overrides `o:<limit>` = `<value>:<until_ms>`,
/// `shadow` and `pool`. No expiry: owned by the admin API.
pub fn cfg(tenant: &str) -> String {
    format!("{PREFIX}{}:cfg", tenant_tag(tenant))
}

/// `sluice:{t:<tenant>}:q:`; the scripts append `<window>:<window-id>`.
pub fn tier_counter_prefix(tenant: &str) -> String {
    format!("{PREFIX}{}:q:", tenant_tag(tenant))
}

/// `sluice:{t:<tenant>}:r:<policy>:`; the scripts append `<window>:<window-id>`.
pub fn route_counter_prefix(tenant: &str, policy: &str) -> String {
    format!("{PREFIX}{}:r:{policy}:", tenant_tag(tenant))
}

/// `sluice:{t:<tenant>}:k:`; the scripts append `<window>:<window-id>`
/// (token counters: `tokens_hour` in `k:hour:<id>`, `tokens_month` in
/// `k:month:<id>`). TTL = window end + 60 s, like every counter.
pub fn token_counter_prefix(tenant: &str) -> String {
    format!("{PREFIX}{}:k:", tenant_tag(tenant))
}

/// `sluice:{t:<tenant>}:res:`; the check script appends the reservation id.
/// A reservation is a hash (`tokens`, `state`, `charged`, and `w:<window>` =
/// `<window-id>:<reset>` for each token window it charged) with TTL
/// `RESERVATION_TTL_S`.
pub fn reservation_prefix(tenant: &str) -> String {
    format!("{PREFIX}{}:res:", tenant_tag(tenant))
}

/// `sluice:{t:<tenant>}:res:<id>`.
pub fn reservation(tenant: &str, id: &str) -> String {
    format!("{}{id}", reservation_prefix(tenant))
}

/// `sluice:{t:<tenant>}:resseq`: the counter that numbers reservations. Its
/// TTL is refreshed past every reservation's, so when it expires (and
/// numbering restarts) no reservation it numbered is left.
pub fn reservation_seq(tenant: &str) -> String {
    format!("{PREFIX}{}:resseq", tenant_tag(tenant))
}

/// `sluice:{t:<tenant>}:storage`: bytes the application reported the
/// tenant stores. No expiry; owner: the application, through
/// `PUT /v1/admin/tenants/{tenant}/storage` (DELETE removes it).
pub fn storage(tenant: &str) -> String {
    format!("{PREFIX}{}:storage", tenant_tag(tenant))
}

/// Full tier counter key, e.g. `sluice:{t:acme}:q:hour:2025013114`.
pub fn tier_counter(tenant: &str, window: Window, window_id: &str) -> String {
    format!(
        "{}{}:{window_id}",
        tier_counter_prefix(tenant),
        window.as_str()
    )
}

/// Full route counter key, e.g. `sluice:{t:acme}:r:llm:hour:2025013114`.
pub fn route_counter(tenant: &str, policy: &str, window: Window, window_id: &str) -> String {
    format!(
        "{}{}:{window_id}",
        route_counter_prefix(tenant, policy),
        window.as_str()
    )
}

/// `sluice:{g}:tiers`, a hash: `doc` (the tiers JSON document) and
/// `version` (incremented by every change). No expiry: owned by the admin
/// API and the seed at start-up.
pub fn tiers() -> String {
    format!("{PREFIX}{GLOBAL_TAG}:tiers")
}

/// `sluice:{g}:audit`, the audit log stream. Trimmed by MINID (retention) on
/// every write and expiring a retention period after the last write.
pub fn audit() -> String {
    format!("{PREFIX}{GLOBAL_TAG}:audit")
}

/// `sluice:{g}:u:idx:<YYYYMMDD>`, the set of tenants with usage that day.
/// Expires with the usage retention.
pub fn usage_index(day: &str) -> String {
    format!("{PREFIX}{GLOBAL_TAG}:u:idx:{day}")
}

/// `sluice:{t:<tenant>}:u:`; the scripts append `<YYYYMMDD>`: the tenant's
/// daily usage rollup hash, expiring with the usage retention.
pub fn usage_prefix(tenant: &str) -> String {
    format!("{PREFIX}{}:u:", tenant_tag(tenant))
}

/// Full daily rollup key, e.g. `sluice:{t:acme}:u:20250131`.
pub fn usage_day(tenant: &str, day: &str) -> String {
    format!("{}{day}", usage_prefix(tenant))
}

/// `sluice:{t:<tenant>}:rate`, the tier's short-term rate bucket (hash
/// `tok`, `ts`; expires once it would be full again).
pub fn rate_bucket(tenant: &str) -> String {
    format!("{PREFIX}{}:rate", tenant_tag(tenant))
}

/// `sluice:{t:<tenant>}:chg:<id>`: set when a queued request's quota was
/// charged (at dispatch), so a replay of the same request is never charged
/// twice. Expires with the request.
pub fn charged(tenant: &str, id: &str) -> String {
    format!("{PREFIX}{}:chg:{id}", tenant_tag(tenant))
}

/// `{u:<upstream>}`: the Redis Cluster hash tag of one upstream.
pub fn upstream_tag(upstream: &str) -> String {
    format!("{{u:{upstream}}}")
}

/// `sluice:{u:<upstream>}:`. The scripts append (docs/design.md, "Queue
/// keys"): `cap` (global bucket + weight sum), `act` (active tenants, ZSET
/// by last seen), `aw` (their weights), `use` (their decayed usage), `n`
/// (queued count), `tn` (queued count per tenant), `ring` (backlogged
/// tenants, DRR order), `q:<tenant>` (a tenant's FIFO of ids), `drr`
/// (deficits and the turn), `w` (weights of backlogged tenants), `lease`
/// (ZSET id -> lease deadline), `delay` (ZSET `<id>:<tenant>` -> not-before),
/// `tk:<ticket>` (one-time tickets), `it:<id>` (request + result).
pub fn upstream_prefix(upstream: &str) -> String {
    format!("{PREFIX}{}:", upstream_tag(upstream))
}

/// `sluice:{u:<upstream>}:tk:<ticket>`.
pub fn ticket(upstream: &str, ticket: &str) -> String {
    format!("{}tk:{ticket}", upstream_prefix(upstream))
}

/// `sluice:{u:<upstream>}:it:<id>`.
pub fn item(upstream: &str, id: &str) -> String {
    format!("{}it:{id}", upstream_prefix(upstream))
}

/// Pub/sub channel of queue events (`d:<id>` a request finished, `w:<upstream>`
/// new work). A channel, not a key: it has no slot and stores nothing.
pub const QUEUE_EVENTS: &str = "sluice:queue:events";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_tenant_shares_its_hash_tag() {
        assert_eq!(cfg("acme"), "sluice:{t:acme}:cfg");
        assert_eq!(
            tier_counter("acme", Window::Hour, "2025013114"),
            "sluice:{t:acme}:q:hour:2025013114"
        );
        assert_eq!(
            route_counter("acme", "llm", Window::Month, "202501"),
            "sluice:{t:acme}:r:llm:month:202501"
        );
        assert_eq!(usage_day("acme", "20250131"), "sluice:{t:acme}:u:20250131");
        for key in [tiers(), audit(), usage_index("20250131")] {
            assert!(key.contains("{g}"), "{key}");
        }
        for key in [
            usage_prefix("a@b"),
            cfg("a@b"),
            tier_counter_prefix("a@b"),
            route_counter_prefix("a@b", "p"),
            token_counter_prefix("a@b"),
            reservation("a@b", "7"),
            reservation_seq("a@b"),
            storage("a@b"),
        ] {
            assert!(key.contains("{t:a@b}"), "{key}");
        }
    }

    #[test]
    fn the_rate_bucket_and_charge_markers_are_in_the_tenant_slot() {
        assert_eq!(rate_bucket("a"), "sluice:{t:a}:rate");
        assert_eq!(charged("a", "ff"), "sluice:{t:a}:chg:ff");
    }

    #[test]
    fn every_queue_key_of_an_upstream_shares_its_hash_tag() {
        assert_eq!(upstream_prefix("llm"), "sluice:{u:llm}:");
        assert_eq!(ticket("llm", "ab"), "sluice:{u:llm}:tk:ab");
        assert_eq!(item("llm", "cd"), "sluice:{u:llm}:it:cd");
    }
}
