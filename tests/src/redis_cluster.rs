//! A private Redis Cluster: `n` primaries (no replicas) on free ports, each
//! with its own data dir, joined with `redis-cli --cluster create`.

use crate::paths::which;
use crate::process::{start_with_retry, ChildProc, TestDir};
use crate::redis::{command, spawn_with, RespValue};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// Redis Cluster's bus port is the client port + 10000.
const BUS_OFFSET: u16 = 10_000;
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running cluster; every node is stopped and removed on drop.
pub struct RedisCluster {
    nodes: Vec<(u16, ChildProc)>,
    _dir: TestDir,
}

impl RedisCluster {
    /// Starts `primaries` nodes (3 is the smallest cluster `redis-cli`
    /// creates), assigns all 16384 slots, and waits until every node reports
    /// `cluster_state:ok`.
    pub fn start(primaries: usize) -> RedisCluster {
        let dir = TestDir::new("redis-cluster");
        let mut nodes = Vec::new();
        for i in 0..primaries {
            let node_dir = dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", node_dir.display()));
            let (proc, port) = start_with_retry("redis-server (cluster node)", || {
                let port = crate::free_port_pair(BUS_OFFSET);
                let conf = node_dir.join("nodes.conf");
                let conf = conf.to_string_lossy().into_owned();
                spawn_with(
                    &node_dir,
                    port,
                    false,
                    &["--cluster-enabled", "yes", "--cluster-config-file", &conf, "--cluster-node-timeout", "5000"],
                )
                .map(|p| (p, port))
            });
            nodes.push((port, proc));
        }
        let cli = which("redis-cli").unwrap_or_else(|| {
            panic!("`redis-cli` was not found on PATH: the cluster tests need it. Install it with `make deps`")
        });
        let mut create = Command::new(cli);
        create.arg("--cluster").arg("create");
        for (port, _) in &nodes {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = create.output().unwrap_or_else(|e| panic!("run redis-cli --cluster create: {e}"));
        let cluster = RedisCluster { nodes, _dir: dir };
        if !out.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait_ok();
        cluster
    }

    fn wait_ok(&self) {
        let start = Instant::now();
        loop {
            let all_ok = self.nodes.iter().all(|(port, _)| {
                let info = command(addr(*port), &["CLUSTER", "INFO"])
                    .ok()
                    .and_then(|v| v.as_string())
                    .unwrap_or_default();
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            });
            if all_ok {
                return;
            }
            if start.elapsed() > CLUSTER_READY_TIMEOUT {
                panic!("the Redis Cluster did not reach cluster_state:ok within {CLUSTER_READY_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The nodes' client ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|(p, _)| *p).collect()
    }

    /// Every node as `redis://127.0.0.1:<port>/`, comma-separated: what
    /// `sluice serve --redis-cluster --redis-url` takes.
    pub fn urls(&self) -> String {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs a command on one node (by index).
    pub fn command_on(&self, node: usize, args: &[&str]) -> RespValue {
        let port = self.nodes.get(node).map(|(p, _)| *p).unwrap_or_else(|| panic!("no node {node}"));
        match command(addr(port), args) {
            Ok(RespValue::Error(e)) => panic!("redis {args:?} on node {node} failed: {e}"),
            Ok(v) => v,
            Err(e) => panic!("redis {args:?} on node {node} failed: {e}"),
        }
    }

    /// The keys each node holds that match `pattern`, by node index.
    pub fn keys_by_node(&self, pattern: &str) -> Vec<BTreeSet<String>> {
        (0..self.nodes.len())
            .map(|i| self.command_on(i, &["KEYS", pattern]).strings().into_iter().collect())
            .collect()
    }

    /// The slot of a key as the cluster computes it (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> i64 {
        self.command_on(0, &["CLUSTER", "KEYSLOT", key])
            .as_i64()
            .unwrap_or_else(|| panic!("CLUSTER KEYSLOT {key} did not answer a number"))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
