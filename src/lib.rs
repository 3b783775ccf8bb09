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

pub use sluice_wire as wire;
