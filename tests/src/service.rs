//! The quota service (`$SLUICE_BIN serve`) and the demo upstream
//! (`$SLUICE_BIN demo-upstream`) on free ports.

use crate::http::{self, Response};
use crate::paths::sluice_bin;
use crate::process::{start_with_retry, write_file, ChildProc, TestDir};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The admin token [`ServiceOpts::default`] configures.
pub const TEST_ADMIN_TOKEN: &str = "sluice-test-admin-token-0123456789";

/// Environment variables the service reads; cleared from every child so the
/// developer's shell cannot change what a test runs.
const SLUICE_ENV: &[&str] = &[
    "SLUICE_LISTEN",
    "SLUICE_ADMIN_LISTEN",
    "SLUICE_REDIS_URL",
    "SLUICE_REDIS_CLUSTER",
    "SLUICE_TIERS",
    "SLUICE_ADMIN_TOKEN",
    "SLUICE_ADMIN_TOKEN_FILE",
    "SLUICE_DEFAULT_TIER",
    "SLUICE_REDIS_TIMEOUT_MS",
    "SLUICE_ENABLE_TEST_CLOCK",
    "SLUICE_ADMIN_TOKENS_FILE",
    "SLUICE_TIERS_REFRESH_MS",
    "SLUICE_AUDIT_RETENTION_DAYS",
    "SLUICE_USAGE_RETENTION_DAYS",
    "SLUICE_METRICS_TOP_TENANTS",
    "SLUICE_ADMIN_URL",
    "SLUICE_ADMIN_ACTOR",
    "SLUICE_UPSTREAMS",
    "SLUICE_QUEUE_LISTEN",
    "SLUICE_WORKERS",
    "SLUICE_TENANT_HEADER",
    "SLUICE_WORKER_DRAIN_MS",
];

/// How to run `sluice serve`. `Default` gives an admin token
/// ([`TEST_ADMIN_TOKEN`]), the test clock on, built-in tiers, a 2 s Redis
/// timeout.
#[derive(Debug, Clone)]
pub struct ServiceOpts {
    /// Written to a file passed with `--admin-token-file`; `None` runs without
    /// an admin token (the admin API then answers 503 `admin_disabled`).
    pub admin_token: Option<String>,
    /// `--enable-test-clock` (needed for `PUT /v1/admin/test-clock`).
    pub enable_test_clock: bool,
    /// A tiers document, written to a file passed with `--tiers`.
    pub tiers: Option<serde_json::Value>,
    /// `--default-tier`.
    pub default_tier: Option<String>,
    /// `--redis-timeout-ms`.
    pub redis_timeout_ms: Option<u64>,
    /// An upstreams document, written to a file passed with `--upstreams`.
    pub upstreams: Option<serde_json::Value>,
    /// Start the queue listener (`--queue-listen` on a free port).
    pub queue: bool,
    /// `--workers` (the service's default, 4, when `None`).
    pub workers: Option<usize>,
    /// Appended to the command line as is.
    pub extra_args: Vec<String>,
}

impl Default for ServiceOpts {
    fn default() -> Self {
        ServiceOpts {
            admin_token: Some(TEST_ADMIN_TOKEN.to_string()),
            enable_test_clock: true,
            tiers: None,
            default_tier: None,
            // Generous: on a loaded 2-core machine a 250 ms bound on Redis
            // calls turns checks into 503s and routes into their failure
            // mode. Tests of Redis timeouts set their own.
            redis_timeout_ms: Some(2_000),
            upstreams: None,
            queue: false,
            workers: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running quota service.
pub struct Service {
    proc: ChildProc,
    addr: SocketAddr,
    queue_addr: Option<SocketAddr>,
    /// The command line (without `--listen` and `--queue-listen`), for
    /// [`Service::restart`].
    args: Vec<String>,
    admin_token: Option<String>,
    dir: TestDir,
}

impl Service {
    /// Runs `$SLUICE_BIN serve --listen 127.0.0.1:<free> --redis-url <redis_url> ...`
    /// and waits until `GET /healthz` answers 200 (and the queue listener,
    /// if any, accepts connections).
    pub fn start(redis_url: &str, opts: ServiceOpts) -> Service {
        let dir = TestDir::new("service");
        let mut args: Vec<String> = vec!["serve".into(), "--redis-url".into(), redis_url.into()];
        if let Some(token) = &opts.admin_token {
            let file = dir.path().join("admin-token");
            write_file(&file, token);
            args.extend(["--admin-token-file".into(), path_arg(&file)]);
        }
        if opts.enable_test_clock {
            args.push("--enable-test-clock".into());
        }
        if let Some(tiers) = &opts.tiers {
            let file = dir.path().join("tiers.json");
            write_file(
                &file,
                serde_json::to_vec_pretty(tiers).expect("serialize tiers"),
            );
            args.extend(["--tiers".into(), path_arg(&file)]);
        }
        if let Some(t) = &opts.default_tier {
            args.extend(["--default-tier".into(), t.clone()]);
        }
        if let Some(ms) = opts.redis_timeout_ms {
            args.extend(["--redis-timeout-ms".into(), ms.to_string()]);
        }
        if let Some(ups) = &opts.upstreams {
            let file = dir.path().join("upstreams.json");
            write_file(
                &file,
                serde_json::to_vec_pretty(ups).expect("serialize upstreams"),
            );
            args.extend(["--upstreams".into(), path_arg(&file)]);
        }
        if let Some(n) = opts.workers {
            args.extend(["--workers".into(), n.to_string()]);
        }
        args.extend(opts.extra_args.iter().cloned());

        let (proc, addr, queue_addr) = start_with_retry("sluice serve", || {
            let addr = crate::free_addr();
            let queue_addr = opts.queue.then(crate::free_addr);
            let mut proc = spawn_service(&dir, &args, addr, queue_addr);
            match wait_service(&mut proc, addr, queue_addr) {
                Ok(()) => Ok((proc, addr, queue_addr)),
                Err(reason) => Err((proc, reason)),
            }
        });
        Service {
            proc,
            addr,
            queue_addr,
            args,
            admin_token: opts.admin_token,
            dir,
        }
    }

    /// The queue listener's address (if started with `queue: true`).
    pub fn queue_addr(&self) -> Option<SocketAddr> {
        self.queue_addr
    }

    /// Kills the service with SIGKILL (no draining: a crash; requests in
    /// flight are cut off) and reaps it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the service to exit;
    /// its exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.signal(libc::SIGTERM);
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(s) = self.proc.exit_status() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// [`Service::restart`] with `--workers n` instead of the old count.
    pub fn restart_with_workers(&mut self, n: usize) {
        if let Some(i) = self.args.iter().position(|a| a == "--workers") {
            self.args.drain(i..=i + 1);
        }
        self.args.extend(["--workers".into(), n.to_string()]);
        self.restart();
    }

    /// Starts the service again with the same arguments and ports (after
    /// [`Service::kill`] or [`Service::terminate`]), so Envoy's clusters
    /// still reach it.
    pub fn restart(&mut self) {
        self.proc.stop();
        let mut last = None;
        for _ in 0..50 {
            let mut proc = spawn_service(&self.dir, &self.args, self.addr, self.queue_addr);
            match wait_service(&mut proc, self.addr, self.queue_addr) {
                Ok(()) => {
                    self.proc = proc;
                    return;
                }
                Err(reason) => {
                    // The old sockets may linger a moment: try again.
                    last = Some(format!("{reason:?}"));
                    drop(proc);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("sluice serve did not restart on {}: {last:?}\n{}", self.addr, self.proc.log_report());
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The child process (to pause, signal or stop it).
    pub fn process(&mut self) -> &mut ChildProc {
        &mut self.proc
    }

    /// `GET path` on the service.
    pub fn get(&self, path: &str) -> Response {
        http::get(self.addr, path)
            .unwrap_or_else(|e| self.proc_fail_msg(&format!("GET {path}: {e}")))
    }

    /// An admin call with `Authorization: Bearer <admin token>`.
    pub fn admin(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Response {
        let token = self
            .admin_token
            .as_deref()
            .expect("admin(): the service was started without an admin token");
        let auth = format!("Bearer {token}");
        let headers = [("authorization", auth.as_str())];
        let result = match body {
            Some(b) => http::send_json(self.addr, method, path, &headers, b),
            None => http::request(
                self.addr,
                method,
                path,
                &headers,
                None,
                http::DEFAULT_TIMEOUT,
            ),
        };
        result.unwrap_or_else(|e| self.proc_fail_msg(&format!("{method} {path}: {e}")))
    }

    /// Shifts the service's clock (`PUT /v1/admin/test-clock`); panics unless 200.
    pub fn set_clock_offset_ms(&self, offset_ms: i64) {
        let r = self.admin(
            "PUT",
            "/v1/admin/test-clock",
            Some(&serde_json::json!({ "offset_ms": offset_ms })),
        );
        assert_eq!(
            r.status,
            200,
            "PUT /v1/admin/test-clock answered {}: {}",
            r.status,
            r.text()
        );
    }

    /// The Prometheus text of `GET /metrics`.
    pub fn metrics(&self) -> String {
        self.get("/metrics").text()
    }

    fn proc_fail_msg(&self, msg: &str) -> ! {
        panic!("{msg}\n{}", self.proc.log_report());
    }
}

/// Runs `$SLUICE_BIN <args>` to completion (for `--check-config` and `--help`),
/// with the SLUICE_* environment cleared.
pub fn run_sluice(args: &[&str]) -> Output {
    sluice_command()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", sluice_bin().display()))
}

fn spawn_service(dir: &TestDir, args: &[String], addr: SocketAddr, queue_addr: Option<SocketAddr>) -> ChildProc {
    let mut cmd = sluice_command();
    cmd.args(args).arg("--listen").arg(addr.to_string());
    if let Some(q) = queue_addr {
        cmd.arg("--queue-listen").arg(q.to_string());
    }
    ChildProc::spawn("sluice serve", cmd, &dir.path().join("service.log"))
}

fn wait_service(
    proc: &mut ChildProc,
    addr: SocketAddr,
    queue_addr: Option<SocketAddr>,
) -> Result<(), crate::process::NotReady> {
    proc.wait_ready(READY_TIMEOUT, || {
        http::answers_ok(addr, "/healthz") && queue_addr.is_none_or(|q| http::answers_ok(q, "/healthz"))
    })
}

fn sluice_command() -> Command {
    let mut cmd = Command::new(sluice_bin());
    for var in SLUICE_ENV {
        cmd.env_remove(var);
    }
    cmd
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A running `sluice demo-upstream`.
pub struct DemoUpstream {
    proc: ChildProc,
    addr: SocketAddr,
    _dir: TestDir,
}

impl DemoUpstream {
    /// Runs `$SLUICE_BIN demo-upstream --listen 127.0.0.1:<free>` and waits
    /// until it accepts connections.
    pub fn start() -> DemoUpstream {
        DemoUpstream::start_with(&[])
    }

    /// [`DemoUpstream::start`] with extra flags (`--capacity N`, `--latency-ms N`).
    pub fn start_with(extra: &[&str]) -> DemoUpstream {
        let dir = TestDir::new("upstream");
        let (proc, addr) = start_with_retry("sluice demo-upstream", || {
            let addr = crate::free_addr();
            let mut cmd = sluice_command();
            cmd.args(["demo-upstream", "--listen", &addr.to_string()]).args(extra);
            let mut proc = ChildProc::spawn(
                "sluice demo-upstream",
                cmd,
                &dir.path().join("upstream.log"),
            );
            match proc.wait_ready(READY_TIMEOUT, || http::accepts(addr)) {
                Ok(()) => Ok((proc, addr)),
                Err(reason) => Err((proc, reason)),
            }
        });
        DemoUpstream {
            proc,
            addr,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// `GET /__demo/stats` as JSON (what the upstream has been sent).
    pub fn stats(&self) -> serde_json::Value {
        let r = http::get(self.addr, "/__demo/stats")
            .unwrap_or_else(|e| panic!("GET /__demo/stats: {e}\n{}", self.proc.log_report()));
        assert_eq!(
            r.status,
            200,
            "GET /__demo/stats answered {}: {}",
            r.status,
            r.text()
        );
        r.json()
    }
}
