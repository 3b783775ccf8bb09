//! Queue events between replicas, over one Redis pub/sub connection per
//! replica (never the shared multiplexed connection, which must not block):
//! `d:<id>` (a request's answer is stored: wake its waiter) and
//! `w:<upstream>` (new work: wake a worker). A missed message costs at most
//! a poll interval: waiters re-read their request every second and idle
//! workers poll every 250 ms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, Notify};

use crate::keys;
use crate::store::Store;

/// Waiters (by request id) and the per-upstream work signals of a replica.
#[derive(Default)]
pub struct Events {
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    work: HashMap<String, Arc<Notify>>,
}

impl Events {
    pub fn new<'a>(upstreams: impl Iterator<Item = &'a str>) -> Events {
        Events {
            waiters: Mutex::new(HashMap::new()),
            work: upstreams.map(|u| (u.to_string(), Arc::new(Notify::new()))).collect(),
        }
    }

    /// Registers a waiter for `id`; drop the [`Waiter`] to unregister.
    pub fn wait_for(self: &Arc<Self>, id: &str) -> Waiter {
        let notify = Arc::new(Notify::new());
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(id.to_string(), notify.clone());
        }
        Waiter {
            events: self.clone(),
            id: id.to_string(),
            notify,
        }
    }

    /// The work signal of an upstream.
    pub fn work(&self, upstream: &str) -> Option<Arc<Notify>> {
        self.work.get(upstream).cloned()
    }

    fn deliver(&self, message: &str) {
        if let Some(id) = message.strip_prefix("d:") {
            let waiter = self.waiters.lock().ok().and_then(|w| w.get(id).cloned());
            if let Some(n) = waiter {
                n.notify_one();
            }
        } else if let Some(up) = message.strip_prefix("w:") {
            if let Some(n) = self.work.get(up) {
                n.notify_one();
            }
        }
    }

    /// Keeps a subscription to the events channel until `stop` turns true,
    /// reconnecting after Redis restarts.
    pub async fn run(self: Arc<Self>, store: Store, mut stop: watch::Receiver<bool>) {
        while !*stop.borrow() {
            match store.pubsub().await {
                Ok(mut ps) => {
                    if ps.subscribe(keys::QUEUE_EVENTS).await.is_ok() {
                        let mut stream = ps.on_message();
                        loop {
                            tokio::select! {
                                msg = stream.next() => match msg {
                                    Some(m) => {
                                        if let Ok(text) = m.get_payload::<String>() {
                                            self.deliver(&text);
                                        }
                                    }
                                    None => break,
                                },
                                _ = stop.changed() => return,
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!("queue events: no subscription yet: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// A registered waiter; unregisters on drop.
pub struct Waiter {
    events: Arc<Events>,
    id: String,
    notify: Arc<Notify>,
}

impl Waiter {
    /// Resolves when the request's answer may be stored (or spuriously).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut w) = self.events.waiters.lock() {
            w.remove(&self.id);
        }
    }
}
