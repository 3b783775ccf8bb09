//! Quota leases, the pure part: the slot table's entry format, spending,
//! and how large a lease to ask for. No host calls here.
//!
//! The quota service may grant an Envoy a lease of units for a hot tenant,
//! charged in Redis when granted, so a lease can never over-admit. The
//! Envoy's workers share it through proxy-wasm shared data: one key per
//! *slot* of a fixed table (`lease_slots`, the tenant and policy hashed into
//! it), never one per tenant, because Envoy never deletes shared-data keys
//! and memory must stay flat with any number of tenants. The value names the
//! tenant and policy it belongs to, so a collision is seen, never mistaken.
//! Every change goes through compare-and-swap on the host's CAS token.

use sluice_wire::{Window, WindowState};

/// What a policy's `lease` config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Largest lease asked for, in units.
    pub max_units: u64,
    /// Lifetime of a lease; unspent units go back after it.
    pub ttl_ms: u64,
}

pub const DEFAULT_MAX_UNITS: u64 = 100;
pub const DEFAULT_TTL_MS: u64 = 1_000;
pub const MAX_MAX_UNITS: u64 = 100_000;
pub const MIN_TTL_MS: u64 = 50;
pub const MAX_TTL_MS: u64 = 60_000;
pub const DEFAULT_SLOTS: u32 = 4_096;
pub const MIN_SLOTS: u32 = 16;
pub const MAX_SLOTS: u32 = 65_536;
/// Compare-and-swap attempts before a worker gives up and makes a normal
/// callout (spending) or returns the units (storing a grant).
pub const CAS_ATTEMPTS: usize = 4;

/// The shared-data key of slot `i`.
pub fn slot_key(i: u32) -> String {
    format!("sluice.lease.{i}")
}

/// FNV-1a over tenant, a separator and policy: stable across workers and
/// restarts, spreads similar ids.
pub fn slot_of(tenant: &str, policy: &str, slots: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain(std::iter::once(0u8)).chain(policy.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(slots.max(1))) as u32
}

/// One window as it stood when the lease was granted (for headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSnap {
    pub name: String,
    pub window: Window,
    pub limit: u64,
    /// Remaining at the grant, with the whole lease counted as used.
    pub remaining: u64,
    /// Epoch seconds of the reset.
    pub reset: u64,
}

/// A slot's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// A denial kept for the tenant until `expires_at_ms` (no units): the
    /// tenant is over its limit, so requests are answered 429 here without
    /// a callout until the lease lifetime or the window's reset.
    pub denied: bool,
    /// The lease has been taken out of use and reported back to the service
    /// (units given back, spent requests booked): never reported twice.
    pub returned: bool,
    /// Unique per grant (the worker's clock and counter).
    pub id: u64,
    /// Units still to spend (0: a rate probe or a spent lease).
    pub units_left: u64,
    /// Host time (ms) after which nothing may be spent from it.
    pub expires_at_ms: u64,
    /// Units granted by the last callout (0 for a probe).
    pub granted: u64,
    /// Host time (ms) of the last callout: with `granted - units_left` it
    /// tells the tenant's rate.
    pub granted_at_ms: u64,
    /// Units one request spends (the route's cost times the tenant's cost
    /// weight, as the service charged it); 0 in a probe.
    pub unit_cost: u64,
    pub tenant: String,
    pub policy: String,
    pub tier: String,
    /// The tenant's reserved pool ("" = shared capacity).
    pub pool: String,
    /// `YYYYMMDD` of the grant (the usage rollup a return books into).
    pub day: String,
    /// The counters it was charged to (`LeaseGrant::charged`).
    pub charged: Vec<String>,
    pub windows: Vec<WindowSnap>,
}

const VERSION: u8 = 1;
/// Offset of `units_left` in the encoding (spending rewrites only it).
const UNITS_AT: usize = 10;

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(b.get(..n).unwrap_or(&[]));
}

fn window_code(w: Window) -> u8 {
    match w {
        Window::Hour => 0,
        Window::Day => 1,
        Window::Month => 2,
        Window::Second => 3,
    }
}

impl Entry {
    /// Little-endian binary: version, flags (bit 0 denied, bit 1
    /// returned), id, units_left, expires_at, granted, granted_at,
    /// unit_cost (u64 each), then tenant, policy, tier, pool, day, the
    /// charged list and the window snapshots (length-prefixed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(112 + self.charged.len() * 24 + self.windows.len() * 40);
        out.push(VERSION);
        out.push(u8::from(self.denied) | (u8::from(self.returned) << 1));
        for v in [self.id, self.units_left, self.expires_at_ms, self.granted, self.granted_at_ms, self.unit_cost] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        put_str(&mut out, &self.tenant);
        put_str(&mut out, &self.policy);
        put_str(&mut out, &self.tier);
        put_str(&mut out, &self.pool);
        put_str(&mut out, &self.day);
        out.push(self.charged.len().min(255) as u8);
        for c in self.charged.iter().take(255) {
            put_str(&mut out, c);
        }
        out.push(self.windows.len().min(255) as u8);
        for w in self.windows.iter().take(255) {
            put_str(&mut out, &w.name);
            out.push(window_code(w.window));
            for v in [w.limit, w.remaining, w.reset] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// `None` for anything that is not a well-formed entry (an empty slot,
    /// another version): the slot is then treated as free.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let mut r = Reader { buf: bytes, at: 0 };
        if r.u8()? != VERSION {
            return None;
        }
        let flags = r.u8()?;
        if flags > 3 {
            return None;
        }
        let (denied, returned) = (flags & 1 == 1, flags & 2 == 2);
        let id = r.u64()?;
        let units_left = r.u64()?;
        let expires_at_ms = r.u64()?;
        let granted = r.u64()?;
        let granted_at_ms = r.u64()?;
        let unit_cost = r.u64()?;
        let tenant = r.str()?;
        let policy = r.str()?;
        let tier = r.str()?;
        let pool = r.str()?;
        let day = r.str()?;
        let n = r.u8()?;
        let mut charged = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            charged.push(r.str()?);
        }
        let n = r.u8()?;
        let mut windows = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let name = r.str()?;
            let window = match r.u8()? {
                0 => Window::Hour,
                1 => Window::Day,
                2 => Window::Month,
                3 => Window::Second,
                _ => return None,
            };
            windows.push(WindowSnap { name, window, limit: r.u64()?, remaining: r.u64()?, reset: r.u64()? });
        }
        Some(Entry {
            denied,
            returned,
            id,
            units_left,
            expires_at_ms,
            granted,
            granted_at_ms,
            unit_cost,
            tenant,
            policy,
            tier,
            pool,
            day,
            charged,
            windows,
        })
    }

    /// Reads only the fixed fields, tenant and policy, borrowing: whether
    /// the slot is this tenant's and has room is known without allocating.
    pub fn peek(bytes: &[u8]) -> Option<Peek<'_>> {
        let mut r = Reader { buf: bytes, at: 0 };
        if r.u8()? != VERSION {
            return None;
        }
        let _flags = r.u8()?;
        let _id = r.u64()?;
        let units_left = r.u64()?;
        let expires_at_ms = r.u64()?;
        let _granted = r.u64()?;
        let _granted_at = r.u64()?;
        let _unit_cost = r.u64()?;
        let tenant = r.bytes()?;
        let policy = r.bytes()?;
        Some(Peek { units_left, expires_at_ms, tenant, policy })
    }

    pub fn is_for(&self, tenant: &str, policy: &str) -> bool {
        self.tenant == tenant && self.policy == policy
    }

    /// Requests admitted from this lease so far.
    pub fn spent_requests(&self) -> u64 {
        self.granted.saturating_sub(self.units_left) / self.unit_cost.max(1)
    }

    /// Whether a return must still report this lease (units to give back
    /// or spent requests to book).
    pub fn owes_return(&self) -> bool {
        !self.denied && !self.returned && self.granted > 0
    }

    /// Whether units may still be spent at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }
}

/// The fixed part of an entry, borrowed from the slot's bytes.
pub struct Peek<'a> {
    pub units_left: u64,
    pub expires_at_ms: u64,
    pub tenant: &'a [u8],
    pub policy: &'a [u8],
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    fn str(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
}

/// What a request finds in its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A live lease of this tenant and policy with room for the cost: the
    /// new value (units_left lowered) to swap in, and the entry as spent.
    Spend { new_value: Vec<u8>, entry: Entry },
    /// A kept denial of this tenant and policy: answer 429 from it.
    Deny { entry: Entry },
    /// Nothing to spend: make a callout, asking for `want` lease units.
    Callout { want: u64 },
}

/// Decides what a request does with the slot's `value`. `cost` is the
/// route's cost (used to size a lease when the slot holds only a probe);
/// a lease is spent in its own `unit_cost`.
pub fn on_request(value: Option<&[u8]>, tenant: &str, policy: &str, cost: u64, now_ms: u64, cfg: &LeaseConfig) -> Found {
    let Some(bytes) = value else { return Found::Callout { want: 0 } };
    // Another tenant's slot (a collision, or a cold tenant) costs no allocation.
    match Entry::peek(bytes) {
        Some(p) if p.tenant == tenant.as_bytes() && p.policy == policy.as_bytes() => {}
        _ => return Found::Callout { want: 0 },
    }
    let Some(mut entry) = Entry::decode(bytes) else { return Found::Callout { want: 0 } };
    if entry.denied {
        return if entry.is_live(now_ms) { Found::Deny { entry } } else { Found::Callout { want: 0 } };
    }
    let unit = entry.unit_cost.max(1);
    if entry.granted > 0 && entry.is_live(now_ms) && entry.units_left >= unit {
        entry.units_left -= unit;
        let mut new_value = bytes.to_vec();
        if let Some(slot) = new_value.get_mut(UNITS_AT..UNITS_AT + 8) {
            slot.copy_from_slice(&entry.units_left.to_le_bytes());
        }
        return Found::Spend { new_value, entry };
    }
    Found::Callout { want: want(&entry, cost, now_ms, cfg) }
}

/// How many units to ask for: what the tenant spent since the last callout
/// (the lease's spent units plus the request that made that callout),
/// scaled to one lease lifetime, in whole requests of `cost`, at most
/// `max_units`. Below two requests per lifetime a lease would only come
/// back unspent, so it is 0 and the request is checked on its own.
pub fn want(last: &Entry, cost: u64, now_ms: u64, cfg: &LeaseConfig) -> u64 {
    let cost = if last.unit_cost > 0 { last.unit_cost } else { cost.max(1) };
    let spent = last.granted.saturating_sub(last.units_left).saturating_add(cost);
    let elapsed = now_ms.saturating_sub(last.granted_at_ms).max(1);
    let per_ttl = u128::from(spent) * u128::from(cfg.ttl_ms) / u128::from(elapsed);
    let per_ttl = u64::try_from(per_ttl).unwrap_or(u64::MAX).min(cfg.max_units);
    let units = per_ttl / cost * cost;
    if units < cost.saturating_mul(2) {
        0
    } else {
        units
    }
}

/// Whether a new entry may take a slot holding `old`: a grant may always
/// (the caller returns what it evicts); a probe (no units) never pushes out
/// a live lease that still has units.
pub fn may_replace(old: Option<&Entry>, new_has_units: bool, now_ms: u64) -> bool {
    new_has_units || old.is_none_or(|o| o.units_left == 0 || !o.is_live(now_ms))
}

/// The rate-limit headers' windows for a request admitted from a lease:
/// each window's remaining is what it had at the grant plus the units still
/// in this lease (they are this tenant's and not spent yet), and the time
/// to reset is from now. Other Envoys' admissions since the grant are not
/// seen: `remaining` can be high by what they admitted within one lease
/// lifetime (the documented precision).
pub fn window_states(entry: &Entry, now_ms: u64) -> Vec<WindowState> {
    let now_s = now_ms / 1000;
    entry
        .windows
        .iter()
        .map(|w| {
            let remaining = w.remaining.saturating_add(entry.units_left).min(w.limit);
            WindowState {
                name: w.name.clone(),
                window: w.window,
                limit: w.limit,
                used: w.limit - remaining,
                remaining,
                reset: w.reset,
                reset_in: w.reset.saturating_sub(now_s).max(1),
            }
        })
        .collect()
}

/// Admitted binding window: fewest remaining, ties to the shorter window
/// (as the service picks it).
pub fn admitted_binding(windows: &[WindowState]) -> usize {
    windows
        .iter()
        .enumerate()
        .min_by_key(|(i, w)| (w.remaining, w.window.nominal_secs(), *i))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig { max_units: 64, ttl_ms: 1000 }
    }

    fn entry(units_left: u64, expires_at_ms: u64) -> Entry {
        Entry {
            denied: false,
            returned: false,
            id: 7,
            units_left,
            expires_at_ms,
            granted: 20,
            granted_at_ms: 1_000,
            unit_cost: 1,
            tenant: "acme".into(),
            policy: "default".into(),
            tier: "free".into(),
            pool: "gold".into(),
            day: "20260102".into(),
            charged: vec!["q:hour:2026010203".into()],
            windows: vec![
                WindowSnap { name: "hour".into(), window: Window::Hour, limit: 100, remaining: 50, reset: 3_600 },
                WindowSnap { name: "day".into(), window: Window::Day, limit: 1000, remaining: 900, reset: 86_400 },
            ],
        }
    }

    #[test]
    fn entries_round_trip_and_garbage_decodes_to_nothing() {
        let e = entry(5, 2_000);
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        let bytes = e.encode();
        for cut in 0..bytes.len() {
            assert_eq!(Entry::decode(&bytes[..cut]), None, "cut {cut}");
        }
        assert_eq!(Entry::decode(b""), None);
        assert_eq!(Entry::decode(&[9u8; 64]), None);
    }

    #[test]
    fn a_live_lease_of_the_tenant_is_spent_by_rewriting_only_its_units() {
        let mut e = entry(5, 2_000);
        e.unit_cost = 2;
        let bytes = e.encode();
        let Found::Spend { new_value, entry } = on_request(Some(&bytes), "acme", "default", 1, 1_500, &cfg()) else {
            panic!("should spend")
        };
        assert_eq!(entry.units_left, 3, "spends its own unit cost (cost x weight), not the route cost");
        assert_eq!(entry.spent_requests(), 8);
        assert_eq!(Entry::decode(&new_value).unwrap().units_left, 3);
        assert_eq!(new_value.len(), bytes.len());
    }

    #[test]
    fn expired_exhausted_or_foreign_leases_are_never_spent() {
        let bytes = entry(5, 2_000).encode();
        assert!(matches!(on_request(Some(&bytes), "acme", "default", 1, 2_000, &cfg()), Found::Callout { .. }));
        assert!(matches!(on_request(Some(&entry(0, 2_000).encode()), "acme", "default", 1, 1_500, &cfg()), Found::Callout { .. }));
        assert_eq!(on_request(Some(&bytes), "other", "default", 1, 1_500, &cfg()), Found::Callout { want: 0 });
        assert_eq!(on_request(Some(&bytes), "acme", "llm", 1, 1_500, &cfg()), Found::Callout { want: 0 });
        assert_eq!(on_request(None, "acme", "default", 1, 1_500, &cfg()), Found::Callout { want: 0 });
    }

    #[test]
    fn a_kept_denial_answers_until_it_expires_then_the_service_is_asked_again() {
        let mut e = entry(0, 2_000);
        e.denied = true;
        let bytes = e.encode();
        assert!(matches!(on_request(Some(&bytes), "acme", "default", 1, 1_500, &cfg()), Found::Deny { .. }));
        assert_eq!(on_request(Some(&bytes), "acme", "default", 1, 2_000, &cfg()), Found::Callout { want: 0 });
        assert_eq!(on_request(Some(&bytes), "other", "default", 1, 1_500, &cfg()), Found::Callout { want: 0 });
        assert_eq!(Entry::decode(&bytes), Some(e));
    }

    #[test]
    fn lease_size_follows_the_tenant_rate_and_is_zero_for_slow_tenants() {
        // 20 granted, all spent, plus the request that asked: 21 units in 100 ms -> 210 per second, capped at 64.
        let mut e = entry(0, 2_000);
        assert_eq!(want(&e, 1, 1_100, &cfg()), 64);
        // 21 units in 1 s -> 21.
        assert_eq!(want(&e, 1, 2_000, &cfg()), 21);
        // In whole requests of unit cost 5: 25 units in 1 s -> 25.
        e.unit_cost = 5;
        assert_eq!(want(&e, 1, 2_000, &cfg()), 25);
        e.unit_cost = 1;
        // One request a second (a probe: nothing granted): no lease.
        e.granted = 0;
        e.unit_cost = 0;
        assert_eq!(want(&e, 1, 2_000, &cfg()), 0);
        // Two requests a second: a lease of 2.
        assert_eq!(want(&e, 1, 1_500, &cfg()), 2);
    }

    #[test]
    fn a_probe_never_evicts_a_live_lease_with_units_but_a_grant_may() {
        let live = entry(5, 2_000);
        assert!(!may_replace(Some(&live), false, 1_500));
        assert!(may_replace(Some(&live), true, 1_500));
        assert!(may_replace(Some(&live), false, 2_500));
        assert!(may_replace(Some(&entry(0, 2_000)), false, 1_500));
        assert!(may_replace(None, false, 0));
    }

    #[test]
    fn lease_headers_count_the_units_still_in_the_lease_and_time_from_now() {
        let states = window_states(&entry(5, 2_000), 1_800_500);
        assert_eq!(states[0].remaining, 55);
        assert_eq!(states[0].used, 45);
        assert_eq!(states[0].reset_in, 1_800);
        assert_eq!(states[1].remaining, 905);
        assert_eq!(admitted_binding(&states), 0);
        // Never more remaining than the limit.
        let mut e = entry(500, 2_000);
        e.windows[0].remaining = 90;
        assert_eq!(window_states(&e, 0)[0].remaining, 100);
    }

    #[test]
    fn slots_are_stable_and_in_range() {
        assert_eq!(slot_of("acme", "default", 4096), slot_of("acme", "default", 4096));
        assert_ne!(slot_of("acme", "default", 4096), slot_of("acme", "llm", 4096));
        for i in 0..1000 {
            assert!(slot_of(&format!("t{i}"), "p", 16) < 16);
        }
    }
}
