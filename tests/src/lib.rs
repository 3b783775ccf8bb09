//! Harness for Sluice's end-to-end tests: real Envoy, Redis, quota service and
//! demo upstream, each on free loopback ports with its own temp dir.
//!
//! Map of the crate:
//! - [`paths`]: where the things under test are (`SLUICE_BIN`, `SLUICE_WASM`,
//!   `envoy`, `redis-server`, `../shared`). A missing one fails the test with
//!   the command that fixes it; nothing is skipped.
//! - [`process`]: a child process whose output goes to a log file, stopped on
//!   drop (TERM, then KILL), whose log is printed when the test panics.
//! - [`http`]: a tiny blocking HTTP/1.1 client for readiness probes, stats and
//!   admin calls. It works inside and outside a tokio runtime.
//! - [`proxy`]: a TCP proxy that can black-hole its connections (fault suite).
//! - [`redis`], [`service`], [`envoy`]: the components, started by
//!   `Redis::start()`, `Service::start(..)`, `DemoUpstream::start()` and
//!   `Envoy::start(..)`.
//!
//! Start-up calls block until the component answers (and panic with its log if
//! it does not), so tests never sleep to wait for a process.

pub mod envoy;
pub mod http;
pub mod paths;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;
pub mod service;

pub use envoy::{Envoy, EnvoyOpts, PromMetrics};
pub use http::Response;
pub use proxy::Proxy;
pub use redis::{Redis, RespValue};
pub use redis_cluster::RedisCluster;
pub use service::{DemoUpstream, Service, ServiceOpts};

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// Ports already handed out by this process: the OS may offer a port again as
/// soon as our probe socket closes, before the child that was given it binds.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that is free now and was not handed out before by this
/// process. A child that then fails to bind it is restarted on another port by
/// the component's `start` (see [`process::start_with_retry`]).
pub fn free_port() -> u16 {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = guard.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of a bound socket")
            .port();
        if handed.insert(port) {
            return port;
        }
    }
    panic!("could not find a free loopback port in 1000 tries");
}

/// A free port `p` such that `p + offset` is free too (and neither was
/// handed out before): Redis Cluster nodes also listen on port + 10000.
pub fn free_port_pair(offset: u16) -> u16 {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = guard.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of a bound socket")
            .port();
        let Some(other) = port.checked_add(offset) else {
            continue;
        };
        if handed.contains(&port) || handed.contains(&other) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", other)).is_ok() {
            handed.insert(port);
            handed.insert(other);
            return port;
        }
    }
    panic!("could not find a free loopback port pair (offset {offset}) in 1000 tries");
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}
