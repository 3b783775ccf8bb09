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
pub mod pairs;
pub mod tenant;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;

pub use sluice_wire as wire;
