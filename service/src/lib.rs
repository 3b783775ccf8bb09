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
//! - [`tiers`]: the tiers every replica enforces, seeded into and followed
//!   from Redis (poll + Arc swap).
//! - [`audit`]: audit entries (who, what, old, new, when, why) and filters.
//! - [`usage`]: daily usage rollups and their JSON/CSV export.
//! - [`timefmt`]: RFC 3339 instants and `YYYY-MM-DD` days.
//! - [`cli`]: `sluice admin ...`, the CLI over the admin API.
//! - [`http`]: the router, `/v1/check`, health, metrics, JSON errors.
//! - [`admin`]: the bearer-token admin API under `/v1/admin`.
//! - [`metrics`]: Prometheus metrics with bounded labels.
//! - [`demo`]: the demo upstream (`sluice demo-upstream`).
//!
//! The binary `sluice` only parses flags and calls [`run`] or
//! [`demo::run_demo_upstream`]; tests call them directly on port 0.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod decision;
pub mod demo;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod scripts;
pub mod store;
pub mod tiers;
pub mod timefmt;
pub mod usage;

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
/// Inside a tokio runtime it also starts the tiers refresher, which stops
/// when the last handle to the state is dropped.
pub fn app(config: ServeConfig) -> Result<(axum::Router, http::Shared), RunError> {
    let metrics = metrics::Metrics::with_top_n(config.metrics_top_tenants)
        .map_err(RunError::Metrics)?;
    let store = store::Store::new(&config)
        .map_err(RunError::Store)?
        .with_latency_histogram(metrics.redis_histogram());
    let refresh = config.tiers_refresh;
    let state: http::Shared = Arc::new(http::AppState::new(store, metrics, config));
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(tiers::refresh_loop(Arc::downgrade(&state), refresh));
    }
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
    run_split(listener, None, config, shutdown).await
}

/// [`run`], with the admin API on `admin_listener` only when one is given
/// (`--admin-listen`): `listener` then answers `/v1/admin/...` with 404.
pub async fn run_split(
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    tracing::info!(config = ?config, "starting sluice service");
    let (router, state) = app(config)?;
    let (router, admin) = match admin_listener {
        Some(l) => {
            let (data, admin) = http::split_routers(state.clone());
            (data, Some((l, admin)))
        }
        None => (router, None),
    };
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.load_scripts().await {
            tracing::warn!("could not preload scripts (Redis down?); they load on first use: {e}");
        }
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "quota service listening");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin_task = admin.map(|(l, r)| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "admin API listening (only here)");
        }
        let rx = stop_rx.clone();
        tokio::spawn(async move { axum::serve(l, r).with_graceful_shutdown(stopped(rx)).await })
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(stopped(stop_rx))
        .await
        .map_err(RunError::Io)?;
    if let Some(t) = admin_task {
        match t.await {
            Ok(r) => r.map_err(RunError::Io)?,
            Err(e) => tracing::warn!("admin listener task failed: {e}"),
        }
    }
    tracing::info!("quota service stopped");
    Ok(())
}
