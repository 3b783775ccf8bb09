//! Sluice quota service: per-tenant quota decisions for the Envoy filter.
//!
//! Map of the crate:
//! - [`config`]: tiers (built-in or a JSON file) and validated settings;
//!   secrets redacted in Debug output.
//! - [`keys`]: every Redis key, with the tenant hash tag `{t:<tenant>}`.
//! - [`scripts`]: every Lua script, each with its KEYS/ARGV contract.
//! - [`decision`]: pure logic: request validation, binding window,
//!   retry-after. No I/O.
//! - [`store`]: the Redis adapter (timeouts, reconnects, EVALSHA).
//! - [`http`]: the router, `/v1/check`, health, metrics, JSON errors.
//! - [`admin`]: the bearer-token admin API under `/v1/admin`.
//! - [`metrics`]: Prometheus metrics with bounded labels.
//! - [`demo`]: the demo upstream (`sluice demo-upstream`).
//!
//! The binary `sluice` only parses flags and calls [`run`] or
//! [`demo::run_demo_upstream`]; tests call them directly on port 0.

pub mod admin;
pub mod config;
pub mod decision;
pub mod demo;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod scripts;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::{ServeConfig, ServeOptions, Tiers};
pub use demo::run_demo_upstream;

/// Why the service could not start or stopped with an error.
#[derive(Debug)]
pub enum RunError {
    Store(store::StoreError),
    Metrics(prometheus::Error),
    Io(std::io::Error),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Store(e) => write!(f, "redis client: {e}"),
            RunError::Metrics(e) => write!(f, "metrics registry: {e}"),
            RunError::Io(e) => write!(f, "server: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// The service's router over a lazily connected Redis, for embedding and tests.
pub fn app(config: ServeConfig) -> Result<(axum::Router, http::Shared), RunError> {
    let store = store::Store::new(&config).map_err(RunError::Store)?;
    let metrics = metrics::Metrics::new().map_err(RunError::Metrics)?;
    let state: http::Shared = Arc::new(http::AppState::new(store, metrics, config));
    Ok((http::router(state.clone()), state))
}

/// Serves the quota service on `listener` (HTTP/1.1 and h2c prior knowledge
/// on the same port) until `shutdown` resolves, then drains open requests.
/// Redis is connected lazily: the service starts while Redis is down and
/// `/readyz` says so.
pub async fn run(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    tracing::info!(config = ?config, "starting sluice service");
    let (router, state) = app(config)?;
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.load_scripts().await {
            tracing::warn!("could not preload scripts (Redis down?); they load on first use: {e}");
        }
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "quota service listening");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(RunError::Io)?;
    tracing::info!("quota service stopped");
    Ok(())
}
