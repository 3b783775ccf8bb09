//! Envoy with the Sluice filter, started from the shipped `envoy/envoy.yaml`.
//!
//! The harness renders the test config from the file `make run` uses, changing
//! only what a test must own: listener and admin ports, the two clusters'
//! endpoints, the plugin config, the wasm path (absolute `SLUICE_WASM`), plus
//! any extra routes and clusters. So the e2e tests also test the shipped file.

use crate::http::{self, Response};
use crate::paths::{envoy_bin, repo_root, sluice_wasm};
use crate::process::{start_with_retry, write_file, ChildProc, TestDir};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Compiling the module in V8 on a busy 2-core machine can take a while.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// The cluster name the filter calls (plugin config `quota_cluster`).
pub const QUOTA_CLUSTER: &str = "sluice_quota";
/// The cluster the shipped routes send traffic to.
pub const UPSTREAM_CLUSTER: &str = "demo_upstream";
/// The cluster of the queue listener (plugin config `queue_cluster`).
pub const QUEUE_CLUSTER: &str = "sluice_queue";

/// How to start Envoy. Build it with [`EnvoyOpts::new`] and change fields.
#[derive(Debug, Clone)]
pub struct EnvoyOpts {
    /// The filter's plugin config (JSON), passed as the wasm `configuration`.
    pub plugin_config: Value,
    /// Endpoint of cluster `sluice_quota` (the quota service, h2c).
    pub quota_cluster_addr: SocketAddr,
    /// Endpoint of cluster `demo_upstream`.
    pub upstream_addr: SocketAddr,
    /// Endpoint of cluster `sluice_queue` (the queue listener); `None`
    /// points it at a closed port.
    pub queue_addr: Option<SocketAddr>,
    /// `--concurrency` (worker threads, each with its own wasm VM).
    pub concurrency: u32,
    /// Routes (Envoy route JSON) put before the shipped ones (after the queue
    /// routes, which must stay first), so they win.
    pub extra_routes: Vec<Value>,
    /// Clusters (Envoy cluster JSON) added to the shipped ones.
    pub extra_clusters: Vec<Value>,
    /// The module to load; `None` = `SLUICE_WASM`.
    pub wasm_path: Option<PathBuf>,
    /// `-l` (Envoy's log level).
    pub log_level: String,
    /// `--component-log-level`, e.g. `wasm:debug`.
    pub component_log_level: Option<String>,
    /// `Some(filters)` replaces the Sluice wasm filter with these HTTP
    /// filters (Envoy filter JSON; empty = no limiter at all), for the
    /// baselines of `make bench`. `None` keeps the shipped filter.
    pub replace_wasm_filter: Option<Vec<Value>>,
    /// `false` drops the shipped config's early header mutation (a
    /// deployment that lets clients' `x-sluice-*` headers reach routing).
    pub early_header_mutation: bool,
}

impl EnvoyOpts {
    /// One worker, info logs (wasm logs at debug), no extra routes or clusters.
    pub fn new(
        plugin_config: Value,
        quota_cluster_addr: SocketAddr,
        upstream_addr: SocketAddr,
    ) -> EnvoyOpts {
        EnvoyOpts {
            plugin_config,
            quota_cluster_addr,
            upstream_addr,
            queue_addr: None,
            concurrency: 1,
            extra_routes: Vec::new(),
            extra_clusters: Vec::new(),
            wasm_path: None,
            log_level: "info".to_string(),
            component_log_level: Some("wasm:debug".to_string()),
            replace_wasm_filter: None,
            early_header_mutation: true,
        }
    }
}

/// `envoy/envoy.yaml`, the config of `make run` and the base of every test config.
pub fn shipped_config_path() -> PathBuf {
    repo_root().join("envoy").join("envoy.yaml")
}

/// Parses an Envoy YAML (or JSON) file into JSON.
pub fn load_yaml(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// The plugin config (parsed JSON) of the sluice wasm filter in an Envoy config.
pub fn plugin_config_of(config: &Value) -> Value {
    let raw = wasm_plugin_config(config)
        .pointer("/configuration/value")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("the wasm filter has no configuration.value string"));
    serde_json::from_str(raw)
        .unwrap_or_else(|e| panic!("the wasm filter's plugin config is not JSON: {e}\n{raw}"))
}

/// The plugin config shipped in `envoy/envoy.yaml` (a good start for tests).
pub fn shipped_plugin_config() -> Value {
    plugin_config_of(&load_yaml(&shipped_config_path()))
}

fn run_args(opts: &EnvoyOpts) -> Vec<String> {
    let mut args = vec!["--concurrency".to_string(), opts.concurrency.to_string(), "-l".to_string(), opts.log_level.clone()];
    if let Some(levels) = &opts.component_log_level {
        args.extend(["--component-log-level".to_string(), levels.clone()]);
    }
    args
}

fn spawn_envoy(config_path: &Path, args: &[String], dir: &Path) -> ChildProc {
    let mut cmd = Command::new(envoy_bin());
    cmd.current_dir(repo_root())
        .arg("-c")
        .arg(config_path)
        // No shared memory for hot restart, so any number of Envoys can run at once.
        .arg("--disable-hot-restart")
        .args(args);
    ChildProc::spawn("envoy", cmd, &dir.join("envoy.log"))
}

fn wait_envoy(proc: &mut ChildProc, listener_addr: SocketAddr, admin_addr: SocketAddr) -> Result<(), crate::process::NotReady> {
    proc.wait_ready(READY_TIMEOUT, || {
        matches!(http::get(admin_addr, "/ready"), Ok(r) if r.status == 200 && r.text().trim() == "LIVE")
            && http::accepts(listener_addr)
    })
}

/// Renders the test config from `envoy/envoy.yaml` (see the module docs).
pub fn render_config(opts: &EnvoyOpts, listener_port: u16, admin_port: u16) -> Value {
    let mut config = load_yaml(&shipped_config_path());
    let wasm = opts.wasm_path.clone().unwrap_or_else(sluice_wasm);

    set(
        &mut config,
        "/admin/address/socket_address",
        socket_address(SocketAddr::from(([127, 0, 0, 1], admin_port))),
    );
    set(
        &mut config,
        "/static_resources/listeners/0/address/socket_address",
        socket_address(SocketAddr::from(([127, 0, 0, 1], listener_port))),
    );
    set_cluster_endpoint(&mut config, QUOTA_CLUSTER, opts.quota_cluster_addr);
    set_cluster_endpoint(&mut config, UPSTREAM_CLUSTER, opts.upstream_addr);
    // Port 9 (discard) on loopback: nothing listens, connections are refused.
    let no_queue = SocketAddr::from(([127, 0, 0, 1], 9));
    set_cluster_endpoint(&mut config, QUEUE_CLUSTER, opts.queue_addr.unwrap_or(no_queue));

    let plugin_json =
        serde_json::to_string(&opts.plugin_config).expect("serialize the plugin config");
    let wasm_config = wasm_plugin_config_mut(&mut config);
    set(
        wasm_config,
        "/configuration/value",
        Value::String(plugin_json),
    );
    set(
        wasm_config,
        "/vm_config/code/local/filename",
        Value::String(wasm.to_string_lossy().into_owned()),
    );

    if let Some(replacement) = &opts.replace_wasm_filter {
        let index = wasm_filter_index(&config);
        let filters = config
            .pointer_mut(HTTP_FILTERS)
            .and_then(Value::as_array_mut)
            .expect("envoy/envoy.yaml: the first listener must have http_filters");
        filters.splice(index..=index, replacement.iter().cloned());
    }
    if !opts.extra_routes.is_empty() {
        let routes = hcm_mut(&mut config)
            .pointer_mut("/route_config/virtual_hosts/0/routes")
            .and_then(Value::as_array_mut)
            .expect("envoy/envoy.yaml: route_config.virtual_hosts[0].routes must be a list");
        // After the queue routes (they must stay first: the filter's
        // x-sluice-queue header has to win over any path match).
        let first = routes
            .iter()
            .take_while(|r| r.get("name").and_then(Value::as_str).is_some_and(|n| n.starts_with("sluice_queue")))
            .count();
        for (i, route) in opts.extra_routes.iter().enumerate() {
            routes.insert(first + i, route.clone());
        }
    }
    if !opts.extra_clusters.is_empty() {
        clusters_mut(&mut config).extend(opts.extra_clusters.iter().cloned());
    }
    if !opts.early_header_mutation {
        if let Some(hcm) = hcm_mut(&mut config).as_object_mut() {
            hcm.remove("early_header_mutation_extensions");
        }
    }
    config
}

/// A running Envoy.
pub struct Envoy {
    proc: ChildProc,
    listener_addr: SocketAddr,
    admin_addr: SocketAddr,
    config_path: PathBuf,
    /// `--concurrency`, `-l` and `--component-log-level`, for [`Envoy::restart`].
    run_args: Vec<String>,
    dir: TestDir,
}

impl Envoy {
    /// Renders the config, starts Envoy and waits until the admin `/ready`
    /// says LIVE and the listener accepts connections.
    pub fn start(opts: EnvoyOpts) -> Envoy {
        let dir = TestDir::new("envoy");
        let config_path = dir.path().join("envoy.json");
        let (proc, listener_addr, admin_addr) = start_with_retry("envoy", || {
            let listener_addr = crate::free_addr();
            let admin_addr = crate::free_addr();
            let config = render_config(&opts, listener_addr.port(), admin_addr.port());
            write_file(
                &config_path,
                serde_json::to_vec_pretty(&config).expect("serialize the envoy config"),
            );
            let mut proc = spawn_envoy(&config_path, &run_args(&opts), dir.path());
            match wait_envoy(&mut proc, listener_addr, admin_addr) {
                Ok(()) => Ok((proc, listener_addr, admin_addr)),
                Err(reason) => Err((proc, reason)),
            }
        });
        Envoy {
            proc,
            listener_addr,
            admin_addr,
            config_path,
            run_args: run_args(&opts),
            dir,
        }
    }

    /// Kills Envoy with SIGKILL: every downstream and upstream connection,
    /// and every request in flight, is cut.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts Envoy again with the same config (same listener and admin
    /// ports) and waits until it is ready, after [`Envoy::kill`] or on its own.
    pub fn restart(&mut self) {
        self.proc.stop();
        let mut proc = spawn_envoy(&self.config_path, &self.run_args, self.dir.path());
        if let Err(reason) = wait_envoy(&mut proc, self.listener_addr, self.admin_addr) {
            proc.fail(&format!("envoy did not restart: {reason:?}"));
        }
        self.proc = proc;
    }

    pub fn listener_addr(&self) -> SocketAddr {
        self.listener_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// `http://127.0.0.1:<listener port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listener_addr)
    }

    /// The rendered config Envoy runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The child process (to signal or stop it).
    pub fn process(&mut self) -> &mut ChildProc {
        &mut self.proc
    }

    /// A request through the listener with the blocking client.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        http::request(
            self.listener_addr,
            method,
            path,
            headers,
            body,
            http::DEFAULT_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{method} {path} via envoy: {e}\n{}", self.proc.log_report()))
    }

    /// `GET path` on the admin port.
    pub fn admin_get(&self, path: &str) -> Response {
        http::get(self.admin_addr, path).unwrap_or_else(|e| {
            panic!("GET {path} on envoy admin: {e}\n{}", self.proc.log_report())
        })
    }

    /// All counters and gauges from `/stats` by their Envoy names
    /// (e.g. `cluster.sluice_quota.upstream_rq_200`, `wasmcustom.sluice.allowed`).
    pub fn stats(&self) -> BTreeMap<String, u64> {
        parse_stats(&self.admin_get("/stats").text())
    }

    /// One stat by its Envoy name; 0 if Envoy does not show it (yet).
    pub fn stat(&self, name: &str) -> u64 {
        self.stats().get(name).copied().unwrap_or(0)
    }

    /// A counter the filter defines, by its name in the filter
    /// (`sluice.allowed` is Envoy's `wasmcustom.sluice.allowed`).
    pub fn filter_counter(&self, name: &str) -> u64 {
        self.stat(&format!("wasmcustom.{name}"))
    }

    /// `/stats/prometheus`, parsed.
    pub fn prometheus(&self) -> PromMetrics {
        PromMetrics::parse(&self.admin_get("/stats/prometheus").text())
    }
}

impl Drop for Envoy {
    /// A failing test also shows how the quota callouts went: the quota
    /// cluster's counters (timeouts, resets, response codes) and the filter's.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = http::request(
                self.admin_addr,
                "GET",
                "/stats?filter=(sluice_quota|wasmcustom)",
                &[],
                None,
                Duration::from_secs(2),
            )
            .map(|r| r.text())
            .unwrap_or_else(|e| format!("(could not read /stats: {e})"));
            let nonzero: Vec<&str> = text.lines().filter(|l| !l.ends_with(": 0")).collect();
            eprintln!(
                "===== envoy {} quota callout stats (non-zero) =====\n{}",
                self.listener_addr,
                nonzero.join("\n")
            );
        }
    }
}

/// `name: value` lines of Envoy's `/stats` (histograms are left out).
pub fn parse_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| line.split_once(": "))
        .filter_map(|(k, v)| {
            v.trim()
                .parse::<u64>()
                .ok()
                .map(|n| (k.trim().to_string(), n))
        })
        .collect()
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct PromSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Samples of a Prometheus text exposition.
#[derive(Debug, Clone, Default)]
pub struct PromMetrics {
    pub samples: Vec<PromSample>,
}

impl PromMetrics {
    pub fn parse(text: &str) -> PromMetrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        PromMetrics { samples }
    }

    /// Sum over every series of metric `name` (0 if none).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// The series of `name` whose labels include all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// Whether any series of metric `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Option<PromSample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse::<f64>().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), BTreeMap::new()),
        Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(PromSample {
        name,
        labels,
        value,
    })
}

fn parse_labels(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches(',').trim_start();
        if s.is_empty() {
            return Some(labels);
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        labels.insert(key.trim().to_string(), value);
        s = rest.get(end + 1..)?;
    }
}

fn socket_address(addr: SocketAddr) -> Value {
    serde_json::json!({ "address": addr.ip().to_string(), "port_value": addr.port() })
}

fn set(root: &mut Value, pointer: &str, value: Value) {
    match root.pointer_mut(pointer) {
        Some(slot) => *slot = value,
        None => {
            panic!("envoy/envoy.yaml has no {pointer}: the test harness expects the shipped shape")
        }
    }
}

fn clusters_mut(config: &mut Value) -> &mut Vec<Value> {
    config
        .pointer_mut("/static_resources/clusters")
        .and_then(Value::as_array_mut)
        .expect("envoy/envoy.yaml: static_resources.clusters must be a list")
}

fn set_cluster_endpoint(config: &mut Value, name: &str, addr: SocketAddr) {
    let cluster = clusters_mut(config)
        .iter_mut()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("envoy/envoy.yaml has no cluster {name}"));
    set(
        cluster,
        "/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address",
        socket_address(addr),
    );
}

fn hcm_mut(config: &mut Value) -> &mut Value {
    config
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
        .expect("envoy/envoy.yaml: the first listener's first filter must be the HTTP connection manager")
}

const HTTP_FILTERS: &str =
    "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters";

/// Index of the (first) wasm HTTP filter in the first listener's chain.
fn wasm_filter_index(config: &Value) -> usize {
    config
        .pointer(HTTP_FILTERS)
        .and_then(Value::as_array)
        .and_then(|filters| {
            filters.iter().position(|f| {
                f.pointer("/typed_config/@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE)
            })
        })
        .unwrap_or_else(|| {
            panic!("the Envoy config has no wasm http filter in its first listener")
        })
}

/// JSON pointer to the `config` of the (first) wasm HTTP filter of the first listener.
fn wasm_config_pointer(config: &Value) -> String {
    let index = wasm_filter_index(config);
    format!("{HTTP_FILTERS}/{index}/typed_config/config")
}

fn wasm_plugin_config(config: &Value) -> &Value {
    let pointer = wasm_config_pointer(config);
    config
        .pointer(&pointer)
        .unwrap_or_else(|| panic!("the wasm http filter has no {pointer}"))
}

fn wasm_plugin_config_mut(config: &mut Value) -> &mut Value {
    let pointer = wasm_config_pointer(config);
    config
        .pointer_mut(&pointer)
        .unwrap_or_else(|| panic!("the wasm http filter has no {pointer}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples_with_labels() {
        let m = PromMetrics::parse(
            "# TYPE envoy_cluster_upstream_rq counter\n\
             envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"sluice_quota\"} 7\n\
             sluice_allowed 3\n",
        );
        assert_eq!(
            m.get(
                "envoy_cluster_upstream_rq",
                &[("envoy_cluster_name", "sluice_quota")]
            ),
            Some(7.0)
        );
        assert_eq!(m.sum("sluice_allowed"), 3.0);
        assert!(!m.has("nope"));
    }

    #[test]
    fn parses_envoy_stats_lines() {
        let s =
            parse_stats("wasmcustom.sluice.allowed: 4\ncluster.x.upstream_rq_time: P0(nan,1)\n");
        assert_eq!(s.get("wasmcustom.sluice.allowed"), Some(&4));
        assert_eq!(s.len(), 1);
    }
}
