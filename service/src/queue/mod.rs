//! The queue service: overflowed requests wait here, scheduled across
//! tenants by weighted deficit round robin, and workers on any replica
//! dispatch them to the upstream.
//!
//! Map of the module:
//! - [`model`]: pure: which headers are kept, how they are stored, the
//!   answers the queue itself gives.
//! - [`events`]: the pub/sub subscription that wakes waiters and workers.
//! - [`intake`]: the queue listener (`--queue-listen`): takes overflowed
//!   requests in (wait or async mode) and serves async results.
//! - [`worker`]: dispatch workers (`--workers` per upstream), leases and
//!   graceful shutdown.
//!
//! All state is in Redis (scripts in `scripts.rs`, keys in `keys.rs`), so
//! any replica's workers serve any replica's requests, and queued requests
//! survive restarts.

pub mod events;
pub mod intake;
pub mod model;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::http::Shared;

/// What the queue's handlers and workers share.
pub struct Queue {
    pub app: Shared,
    pub events: Arc<events::Events>,
    pub client: reqwest::Client,
    /// Turns true on shutdown: workers stop taking work, waiters whose
    /// request is still queued answer 503 so their clients retry elsewhere.
    pub stop: watch::Receiver<bool>,
}

impl Queue {
    pub fn new(app: Shared, stop: watch::Receiver<bool>) -> Arc<Queue> {
        let events = Arc::new(events::Events::new(
            app.config.upstreams.iter().map(|u| u.name.as_str()),
        ));
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Queued requests are sent as they came; a redirect is the
            // upstream's answer to the client, not something to follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Arc::new(Queue {
            app,
            events,
            client,
            stop,
        })
    }

    pub fn offset_ms(&self) -> i64 {
        self.app.offset_ms()
    }

    /// Starts the events subscription and `--workers` workers per upstream.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![tokio::spawn(
            self.events
                .clone()
                .run(self.app.store.clone(), self.stop.clone()),
        )];
        for up in self.app.config.upstreams.iter() {
            for n in 0..self.app.config.workers {
                tasks.push(tokio::spawn(worker::run(self.clone(), up.clone(), n)));
            }
        }
        tasks
    }
}
