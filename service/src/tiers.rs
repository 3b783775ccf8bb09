//! Tiers as data: the copy every replica enforces, and how it follows Redis.
//!
//! Redis holds the one tiers document (`keys::tiers()`: `doc` + `version`).
//! The tiers file (or the built-in tiers) is only the seed, written when
//! Redis holds no tiers yet. Every replica keeps the document it enforces in
//! an `Arc` behind a lock: a check takes the `Arc` (a pointer copy) and uses
//! it to the end, a refresh swaps in a new one, so no check ever waits for
//! or sees half of a change.
//!
//! Propagation: every replica polls the version every `--tiers-refresh-ms`
//! (200 ms by default) and reloads the document when it moved; the replica
//! that made a change installs it at once. A replica therefore enforces a
//! change at most one poll interval (plus one Redis round trip) after it was
//! written, and a missed poll (Redis slow or down) is simply retried on the
//! next tick, so no replica stays stale once Redis answers again.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use crate::config::Tiers;
use crate::http::AppState;
use crate::store::StoreError;

/// One version of the tiers, ready for the scripts.
#[derive(Debug, Clone)]
pub struct TiersSnapshot {
    /// Redis's version of the document (0: the seed, not yet read from Redis).
    pub version: u64,
    pub tiers: Tiers,
    /// `tiers.script_arg()`, computed once per version.
    pub script_arg: String,
}

impl TiersSnapshot {
    pub fn new(tiers: Tiers, version: u64) -> TiersSnapshot {
        let script_arg = tiers.script_arg();
        TiersSnapshot {
            version,
            tiers,
            script_arg,
        }
    }

    /// Whether this copy was read from Redis (not just the local seed).
    pub fn from_redis(&self) -> bool {
        self.version > 0
    }
}

/// The replica's current tiers.
pub struct TiersCache {
    current: RwLock<Arc<TiersSnapshot>>,
}

impl TiersCache {
    pub fn new(seed: Tiers) -> TiersCache {
        TiersCache {
            current: RwLock::new(Arc::new(TiersSnapshot::new(seed, 0))),
        }
    }

    pub fn get(&self) -> Arc<TiersSnapshot> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Installs `snap` unless the cache already holds a newer version.
    pub fn install(&self, snap: TiersSnapshot) -> bool {
        let mut g = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if snap.version < g.version {
            return false;
        }
        let changed = snap.version != g.version;
        *g = Arc::new(snap);
        changed
    }
}

/// Why a refresh did not bring the cache up to date.
#[derive(Debug)]
pub enum RefreshError {
    Store(StoreError),
    /// Redis holds a document that does not validate (written by hand?).
    Invalid(String),
}

impl std::fmt::Display for RefreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefreshError::Store(e) => write!(f, "{e}"),
            RefreshError::Invalid(m) => write!(f, "the tiers document in Redis is invalid: {m}"),
        }
    }
}

fn parse(doc: &str, version: u64) -> Result<TiersSnapshot, RefreshError> {
    Tiers::from_json(doc, None)
        .map(|t| TiersSnapshot::new(t, version))
        .map_err(|e| RefreshError::Invalid(e.0))
}

/// One poll: seeds Redis if it holds no tiers, reloads when the version
/// moved. Returns whether the replica's tiers changed.
pub async fn refresh_once(state: &AppState) -> Result<bool, RefreshError> {
    let cached = state.tiers.get();
    let version = state
        .store
        .tiers_version()
        .await
        .map_err(RefreshError::Store)?;
    let snap = match version {
        Some(v) if v == cached.version => return Ok(false),
        Some(_) => match state.store.tiers_read().await.map_err(RefreshError::Store)? {
            Some((doc, v)) => parse(&doc, v)?,
            None => return Ok(false),
        },
        None => {
            // No tiers in Redis: first start, or Redis lost its data. Seed.
            let seed = &state.config.tiers;
            let doc = seed.to_json();
            let entry = crate::audit::system_entry("seed_tiers", "", "", &doc);
            let (seeded, doc, v) = state
                .store
                .tiers_seed(&doc, state.offset_ms(), state.config.audit_retention, &entry)
                .await
                .map_err(RefreshError::Store)?;
            if seeded {
                state.metrics.admin_change("seed_tiers");
                tracing::info!(version = v, "seeded the tiers in Redis from the tiers file / built-in tiers");
            }
            parse(&doc, v)?
        }
    };
    let v = snap.version;
    let changed = state.tiers.install(snap);
    if changed {
        tracing::info!(version = v, "tiers changed");
    }
    Ok(changed)
}

/// Polls until the state is dropped.
pub async fn refresh_loop(state: Weak<AppState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        match refresh_once(&state).await {
            Ok(changed) => {
                let v = state.tiers.get().version;
                state
                    .metrics
                    .tiers_refresh(if changed { "changed" } else { "ok" }, v);
            }
            Err(RefreshError::Store(e)) => {
                state.metrics.tiers_refresh("error", 0);
                state.redis_failed("tiers", &e);
            }
            Err(e @ RefreshError::Invalid(_)) => {
                state.metrics.tiers_refresh("invalid", 0);
                tracing::error!("{e}; keeping version {}", state.tiers.get().version);
            }
        }
    }
}
