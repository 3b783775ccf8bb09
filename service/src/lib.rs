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
//! - [`upstreams`]: the upstreams file: capacities and queue settings.
//! - [`queue`]: the queue listener, the workers and their events.
//! - [`ids`]: unguessable request ids and tickets.
//!
//! The binary `sluice` only parses flags and calls [`run_listeners`] or
//! [`demo::run_demo_upstream`]; tests call them directly on port 0.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod decision;
pub mod demo;
pub mod http;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod queue;
pub mod scripts;
pub mod store;
pub mod tiers;
pub mod timefmt;
pub mod upstreams;
pub mod usage;

use std::future::Future;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

/// Small answers on multiplexed h2c connections must not wait for Nagle's
/// algorithm (and the peer's delayed ACK, ~40 ms) behind other streams.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("could not set TCP_NODELAY: {e}");
    }
}

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
    metrics
        .register_upstreams(&config.upstreams.names())
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
/// `/readyz` says so. No queue listener; workers run if configured.
pub async fn run(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_listeners(Listeners::data(listener), config, shutdown).await
}

/// [`run`], plus the queue listener on `queue_listener` (HTTP/1.1 and h2c).
pub async fn run_with_queue(
    listener: TcpListener,
    queue_listener: Option<TcpListener>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let listeners = Listeners {
        queue: queue_listener,
        ..Listeners::data(listener)
    };
    run_listeners(listeners, config, shutdown).await
}

/// The listeners one service process serves.
pub struct Listeners {
    /// Check, usage, report, health, metrics, queue stats; the admin API too
    /// unless `admin` is given.
    pub data: TcpListener,
    /// `--admin-listen`: the admin API only here; `data` then answers
    /// `/v1/admin/...` with 404.
    pub admin: Option<TcpListener>,
    /// `--queue-listen`: the queue intake (the Envoy queue cluster).
    pub queue: Option<TcpListener>,
}

impl Listeners {
    /// Only the data listener (admin API on it, no queue intake).
    pub fn data(data: TcpListener) -> Self {
        Listeners {
            data,
            admin: None,
            queue: None,
        }
    }
}

/// Serves every listener in `listeners` and runs `config.workers` queue
/// workers per upstream. On `shutdown` workers stop taking work and finish
/// or put back their in-flight dispatch, waiters whose request is still
/// queued answer 503, and every listener drains.
pub async fn run_listeners(
    listeners: Listeners,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let Listeners {
        data: listener,
        admin: admin_listener,
        queue: queue_listener,
    } = listeners;
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let queue = queue::Queue::new(state.clone(), stop_rx.clone());
    let background = queue.spawn_background();
    let queue_server = queue_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "queue listener");
        }
        let q = queue::intake::router(queue.clone());
        let rx = stop_rx.clone();
        tokio::spawn(async move {
            axum::serve(l.tap_io(no_delay), q)
                .with_graceful_shutdown(stopped(rx))
                .await
        })
    });
    let admin_server = admin.map(|(l, r)| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "admin API listening (only here)");
        }
        let rx = stop_rx.clone();
        tokio::spawn(async move { axum::serve(l, r).with_graceful_shutdown(stopped(rx)).await })
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "quota service listening");
    }
    let rx = stop_rx.clone();
    let main = tokio::spawn(async move {
        axum::serve(listener.tap_io(no_delay), router)
            .with_graceful_shutdown(stopped(rx))
            .await
    });
    shutdown.await;
    tracing::info!("shutting down: workers stop taking work, listeners drain");
    let _ = stop_tx.send(true);
    for t in background {
        let _ = t.await;
    }
    for server in [queue_server, admin_server].into_iter().flatten() {
        match server.await {
            Ok(r) => r.map_err(RunError::Io)?,
            Err(e) => tracing::warn!("listener task failed: {e}"),
        }
    }
    match main.await {
        Ok(r) => r.map_err(RunError::Io)?,
        Err(e) => return Err(RunError::Io(std::io::Error::other(e))),
    }
    tracing::info!("quota service stopped");
    Ok(())
}
