//! Shared harness: a real redis-server per test (own port, own temp dir,
//! killed on drop), the service started in-process on port 0, and an HTTP
//! client that speaks HTTP/1.1 or h2c prior knowledge.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, StatusCode, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sluice_service::config::{AdminToken, Secret, ServeConfig, Tiers};
use sluice_service::http::Shared;

pub const TOKEN: &str = "test-admin-token";

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("redis-server");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/usr/bin/redis-server")
}

/// A private redis-server: no persistence, its own port and directory.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        // A freshly probed port can be taken before redis binds it; retry.
        for _ in 0..5 {
            let mut r = RedisServer {
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                child: None,
            };
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new(redis_binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut c).is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Stops the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Freezes the process: connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Redis's own clock in ms (the clock the scripts use).
    pub fn now_ms(&self) -> i64 {
        let (s, us): (i64, i64) = redis::cmd("TIME").query(&mut self.conn()).unwrap();
        s * 1000 + us / 1000
    }

    pub fn keys(&self) -> Vec<String> {
        let mut c = self.conn();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
        keys
    }

    pub fn ttl(&self, key: &str) -> i64 {
        redis::cmd("TTL").arg(key).query(&mut self.conn()).unwrap()
    }

    pub fn get(&self, key: &str) -> Option<i64> {
        redis::cmd("GET").arg(key).query(&mut self.conn()).unwrap()
    }

    pub fn hget(&self, key: &str, field: &str) -> Option<i64> {
        redis::cmd("HGET").arg(key).arg(field).query(&mut self.conn()).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            // A paused server ignores SIGKILL until continued on some systems; be sure.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Reply {
    /// The `error` code of a JSON error body.
    pub fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or("<no error field>")
    }
}

#[derive(Clone)]
pub struct Http {
    h1: Client<HttpConnector, Full<Bytes>>,
    h2: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            h1: Client::builder(TokioExecutor::new()).build_http(),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }
}

impl Http {
    pub async fn send(
        &self,
        h2c: bool,
        method: Method,
        url: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let client = if h2c { &self.h2 } else { &self.h1 };
        let resp = client.request(req).await.expect("request failed");
        let status = resp.status();
        let version = resp.version();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            version,
            headers,
            text,
            json,
        }
    }
}

/// Config used by most tests. The Redis timeout is generous because a
/// debug build running every test file at once on two cores can stall a
/// burst past 250 ms; the failure tests use [`fast_config`].
pub fn default_config(redis_url: &str) -> ServeConfig {
    let mut c = ServeConfig::new(redis_url, Tiers::builtin(None).unwrap());
    c.admin_tokens = vec![AdminToken {
        name: "admin".into(),
        token: Secret::new(TOKEN),
    }];
    c.redis_timeout = Duration::from_millis(3000);
    c.enable_test_clock = true;
    c
}

/// The production default timeout (250 ms), for tests of Redis failures.
pub fn fast_config(redis_url: &str) -> ServeConfig {
    ServeConfig {
        redis_timeout: Duration::from_millis(250),
        ..default_config(redis_url)
    }
}

pub fn tiers(json: &str) -> Tiers {
    Tiers::from_json(json, None).unwrap()
}

/// The service running in-process on a port-0 listener.
pub struct Service {
    pub addr: SocketAddr,
    pub http: Http,
    pub state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    pub async fn start(config: ServeConfig) -> Service {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (router, state) = sluice_service::app(config).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Service {
            addr,
            http: Http::default(),
            state,
            shutdown: Some(tx),
            task,
        }
    }

    pub async fn on(redis: &RedisServer) -> Service {
        Service::start(default_config(&redis.url())).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.http
            .send(
                false,
                method,
                &self.url(path),
                body.map(|b| b.to_string()),
                headers,
            )
            .await
    }

    pub async fn raw(&self, method: Method, path: &str, body: &str) -> Reply {
        self.http
            .send(false, method, &self.url(path), Some(body.to_string()), &[])
            .await
    }

    pub async fn check(&self, body: Value) -> Reply {
        self.request(Method::POST, "/v1/check", Some(body), &[])
            .await
    }

    /// A check of `cost` for `tenant`, returning whether it was admitted.
    pub async fn admit(&self, tenant: &str, cost: u64) -> bool {
        let r = self
            .check(serde_json::json!({"tenant": tenant, "cost": cost}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.json["allowed"].as_bool().unwrap()
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {TOKEN}");
        self.request(method, path, body, &[("authorization", auth.as_str())])
            .await
    }

    /// An admin call with a raw (possibly invalid) JSON body.
    pub async fn raw_admin(&self, method: Method, path: &str, body: &str) -> Reply {
        let auth = format!("Bearer {TOKEN}");
        self.http
            .send(false, method, &self.url(path), Some(body.to_string()), &[("authorization", auth.as_str())])
            .await
    }

    /// Shifts the test clock so the scripts see `target_ms` (epoch ms) now.
    pub async fn set_now(&self, redis: &RedisServer, target_ms: i64) {
        let offset = target_ms - redis.now_ms();
        let r = self
            .admin(
                Method::PUT,
                "/v1/admin/test-clock",
                Some(serde_json::json!({"offset_ms": offset})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }

    /// Runs `n` checks at once and counts the admitted ones.
    pub async fn burst(self: &Arc<Self>, tenant: &str, n: usize) -> (usize, Vec<Reply>) {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let svc = self.clone();
            let tenant = tenant.to_string();
            tasks.push(tokio::spawn(async move {
                svc.check(serde_json::json!({"tenant": tenant})).await
            }));
        }
        let mut replies = Vec::new();
        for t in tasks {
            replies.push(t.await.unwrap());
        }
        let admitted = replies
            .iter()
            .filter(|r| {
                assert_eq!(r.status, StatusCode::OK, "{}", r.text);
                r.json["allowed"] == Value::Bool(true)
            })
            .count();
        (admitted, replies)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

/// Epoch seconds of a UTC date-time, by plain counting (independent of the
/// Lua arithmetic it checks). Years >= 1970 only.
pub fn epoch(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> i64 {
    let mut days = 0;
    for year in 1970..y {
        days += if is_leap(year) { 366 } else { 365 };
    }
    for month in 1..mo {
        days += month_len(y, month);
    }
    days += d - 1;
    ((days * 24 + h) * 60 + mi) * 60 + s
}

pub fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub fn month_len(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// A fixed, unremarkable instant (2031-03-12 10:30:00 UTC) in ms, so tests
/// never straddle a real window boundary by accident.
pub fn mid_hour_ms() -> i64 {
    epoch(2031, 3, 12, 10, 30, 0) * 1000
}
