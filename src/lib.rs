//! Sluice filter: per-tenant quotas for Envoy, as a proxy-wasm HTTP filter.
//!
//! Map of the crate:
//! - [`config`]: plugin JSON -> validated, compiled config (pure).
//! - [`cost`]: an LLM request body -> standard units and a token estimate;
//!   400s for bad client numbers (pure).
//! - [`usage`]: real token usage from a JSON body, an SSE stream (parsed
//!   incrementally, bounded memory) or a header (pure).
//! - [`tenant`]: tenant id rules (pure).
//! - [`decision`]: callout answer -> admit / local reply, and every header
//!   and body the client sees (pure).
//! - [`lease`]: quota leases: the shared slot entry, spending, lease size (pure).
//! - [`pairs`]: panic-free decoding of proxy-wasm header maps (pure).
//! - `filter` (wasm32 only): the proxy-wasm adapter; one small state machine
//!   per request, advanced by host callbacks.
//! - `host` (wasm32 only): panic-free host calls (the SDK's panic on
//!   statuses they do not expect, which would kill the VM).
//!
//! Everything but the adapter builds and is unit-tested on the native target.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod config;
pub mod cost;
pub mod decision;
pub mod lease;
pub mod pairs;
pub mod tenant;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;

pub use sluice_wire as wire;

/// Counts heap allocations per thread in unit tests, so the hot paths'
/// allocations can be measured natively (see `hot_path_allocations`).
#[cfg(test)]
pub(crate) mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    pub struct Counting;

    // SAFETY: forwards to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            System.dealloc(ptr, layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            System.realloc(ptr, layout, new_size)
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Allocations made by `f` on this thread.
    pub fn count<T>(f: impl FnOnce() -> T) -> (T, u64) {
        let before = COUNT.with(Cell::get);
        let out = f();
        (out, COUNT.with(Cell::get) - before)
    }
}

#[cfg(test)]
mod hot_path_allocations {
    use crate::alloc_count::count;
    use crate::{decision, lease};
    use sluice_wire::Window;

    /// Not a speed assertion: allocation counts are deterministic. The
    /// bounds catch a hot path that starts allocating per window or per byte.
    #[test]
    fn the_lease_path_and_the_callout_answer_path_allocate_a_bounded_few_times() {
        let entry = lease::Entry {
            denied: false,
            returned: false,
            id: 1,
            units_left: 10,
            expires_at_ms: 10_000,
            granted: 20,
            granted_at_ms: 0,
            unit_cost: 1,
            tenant: "tenant-0001".into(),
            policy: "default".into(),
            tier: "free".into(),
            pool: String::new(),
            day: "20260102".into(),
            charged: vec!["q:hour:2026010203".into(), "q:day:20260102".into(), "q:month:202601".into()],
            windows: [(Window::Hour, "hour"), (Window::Day, "day"), (Window::Month, "month")]
                .iter()
                .map(|(w, n)| lease::WindowSnap { name: n.to_string(), window: *w, limit: 1000, remaining: 500, reset: 3600 })
                .collect(),
        };
        let bytes = entry.encode();
        let cfg = lease::LeaseConfig { max_units: 64, ttl_ms: 1000 };
        let (outcome, lease_allocs) = count(|| {
            match lease::on_request(Some(&bytes), "tenant-0001", "default", 1, 5_000, &cfg) {
                lease::Found::Spend { entry, .. } => decision::admit_from_lease(&entry, 5_000),
                _ => panic!("should spend"),
            }
        });
        assert!(matches!(outcome, decision::Outcome::Admit { .. }));

        let answer = br#"{"allowed":true,"tier":"free","binding":0,"windows":[
            {"name":"hour","window":"hour","limit":1000,"used":500,"remaining":500,"reset":3600,"reset_in":1800},
            {"name":"day","window":"day","limit":10000,"used":500,"remaining":9500,"reset":86400,"reset_in":9000},
            {"name":"month","window":"month","limit":100000,"used":500,"remaining":99500,"reset":2592000,"reset_in":90000}]}"#;
        let (outcome, callout_allocs) = count(|| {
            let resp = decision::parse_answer(Some(b"200"), Some(answer)).unwrap();
            decision::decide(&resp, false, false, true)
        });
        assert!(matches!(outcome, decision::Outcome::Admit { .. }));
        eprintln!("allocations: lease spend + headers {lease_allocs}, callout answer parse + headers {callout_allocs}");
        assert!(lease_allocs <= 40, "lease path: {lease_allocs} allocations");
        assert!(callout_allocs <= 60, "callout path: {callout_allocs} allocations");
    }
}
