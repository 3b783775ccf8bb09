//! The `sluice` binary itself: `--check-config`, serving h2c and HTTP/1.1,
//! stopping on SIGTERM, and the demo upstream.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Http, RedisServer};
use hyper::{Method, StatusCode, Version};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Runs the binary with a clean SLUICE_* environment.
fn sluice(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn output(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

#[test]
fn check_config_prints_a_summary_without_secrets_and_never_connects() {
    // Nothing listens on this port: check-config must not care.
    let url = format!("redis://user:hunter2@127.0.0.1:{}/", free_port());
    let (out, stdout, stderr) = output(
        sluice(&["serve", "--check-config", "--redis-url", &url])
            .env("SLUICE_ADMIN_TOKEN", "very-secret-token"),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("configuration OK"));
    assert!(stdout.contains("admin API:        enabled"));
    assert!(stdout.contains("free: 100 / 1000 / 20000"));
    assert!(!stdout.contains("very-secret-token") && !stderr.contains("very-secret-token"));
    assert!(!stdout.contains("hunter2"));
}

#[test]
fn check_config_reads_tiers_and_token_files_and_env_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let tiers = dir.path().join("tiers.json");
    std::fs::write(
        &tiers,
        r#"{"default_tier":"gold","tiers":{"gold":{"hour":7},"lead":{"day":3}}}"#,
    )
    .unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "file-token\n").unwrap();
    let (out, stdout, stderr) = output(
        sluice(&["serve", "--check-config"])
            .env("SLUICE_TIERS", &tiers)
            .env("SLUICE_ADMIN_TOKEN_FILE", &token)
            .env("SLUICE_DEFAULT_TIER", "lead")
            .env("SLUICE_REDIS_TIMEOUT_MS", "120")
            .env("SLUICE_ENABLE_TEST_CLOCK", "1"),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    for needle in [
        "default tier:     lead",
        "gold: 7 / - / -",
        "redis-timeout-ms: 120",
        "test clock:       enabled",
        "enabled (tokens: admin)",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in {stdout}");
    }
    assert!(!stdout.contains("file-token"));
}

#[test]
fn check_config_shows_upstreams_workers_and_the_queue_listener() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upstreams.json");
    std::fs::write(&up, r#"{"upstreams":{"gpu":{"url":"http://127.0.0.1:8082","rate":5,"concurrency":2}}}"#).unwrap();
    let (out, stdout, stderr) = output(&mut sluice(&[
        "serve", "--check-config", "--upstreams", up.to_str().unwrap(), "--queue-listen", "127.0.0.1:8083", "--workers", "3",
    ]));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("queue-listen:     127.0.0.1:8083"), "{stdout}");
    assert!(stdout.contains("workers:          3 per upstream"), "{stdout}");
    assert!(stdout.contains("gpu: http://127.0.0.1:8082 rate 5/s burst 5 debt 5 concurrency 2"), "{stdout}");
}

#[test]
fn check_config_exits_1_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"tiers":{"free":{"hour":1,"minute":2}}}"#).unwrap();
    let bad_path = bad.to_str().unwrap();
    let bad_up = dir.path().join("upstreams.json");
    std::fs::write(&bad_up, r#"{"upstreams":{"gpu":{"url":"http://h","rate":0}}}"#).unwrap();
    let bad_up_path = bad_up.to_str().unwrap();
    let rate_tier = dir.path().join("rate.json");
    std::fs::write(&rate_tier, r#"{"tiers":{"free":{"hour":1,"burst":2}}}"#).unwrap();
    let rate_tier_path = rate_tier.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--tiers", bad_path], "tiers.free"),
        (vec!["--tiers", "/nonexistent/tiers.json"], "tiers file"),
        (vec!["--default-tier", "gold"], "default_tier"),
        (vec!["--redis-url", "http://nope"], "redis-url"),
        (vec!["--redis-timeout-ms", "0"], "redis-timeout-ms"),
        (
            vec!["--admin-token", "a", "--admin-token-file", bad_path],
            "admin-token",
        ),
        (
            vec!["--admin-token-file", "/nonexistent/token"],
            "admin-token-file",
        ),
        (vec!["--listen", "not-an-address"], "listen"),
        (vec!["--upstreams", bad_up_path], "upstreams.gpu.rate"),
        (vec!["--upstreams", "/nonexistent/up.json"], "upstreams file"),
        (vec!["--tiers", rate_tier_path], "tiers.free.burst"),
        (vec!["--tenant-header", "x-sluice-tenant"], "tenant-header"),
        (vec!["--workers", "5000"], "workers"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["serve", "--check-config"];
        all.extend(&args);
        let (out, stdout, stderr) = output(&mut sluice(&all));
        assert_eq!(
            out.status.code(),
            Some(if needle == "listen" || needle == "admin-token" {
                2
            } else {
                1
            }),
            "{args:?}: {stdout}{stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ok = tokio::time::timeout(Duration::from_millis(500), async {
            let req = hyper::Request::get(url)
                .body(http_body_util::Full::new(hyper::body::Bytes::new()))
                .unwrap();
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<hyper::body::Bytes>>()
                .request(req)
                .await
                .is_ok()
        })
        .await
        .unwrap_or(false);
        if ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never came up");
}

fn sigterm(child: &Child) {
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_h2c_and_http1_on_one_port_and_stops_on_sigterm() {
    let redis = RedisServer::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = sluice(&["serve", "--listen", &listen, "--redis-url", &redis.url()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let http = Http::default();
    wait_for(&format!("http://{listen}/healthz")).await;
    let url = format!("http://{listen}/v1/check");
    let body = json!({"tenant": "bin"}).to_string();
    let h2 = http
        .send(true, Method::POST, &url, Some(body.clone()), &[])
        .await;
    assert_eq!(
        (h2.status, h2.version),
        (StatusCode::OK, Version::HTTP_2),
        "{}",
        h2.text
    );
    let h1 = http.send(false, Method::POST, &url, Some(body), &[]).await;
    assert_eq!((h1.status, h1.version), (StatusCode::OK, Version::HTTP_11));
    assert_eq!(h1.json["windows"][0]["used"], 2);
    let ready = http
        .send(
            true,
            Method::GET,
            &format!("http://{listen}/readyz"),
            None,
            &[],
        )
        .await;
    assert_eq!(ready.status, StatusCode::OK);
    // Without a token the admin API is off.
    let admin = http
        .send(
            false,
            Method::GET,
            &format!("http://{listen}/v1/admin/tiers"),
            None,
            &[],
        )
        .await;
    assert_eq!(admin.error(), "admin_disabled");

    sigterm(&running.0);
    let status = wait_exit(&mut running.0, Duration::from_secs(12));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_upstream_answers_like_an_llm_api_and_counts_per_tenant_and_path() {
    let listen = format!("127.0.0.1:{}", free_port());
    let child = sluice(&["demo-upstream", "--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let http = Http::default();
    let base = format!("http://{listen}");
    wait_for(&format!("{base}/healthz")).await;

    let chat = json!({"model": "m1", "max_tokens": 250, "messages": [{"role": "user", "content": "hi there"}]}).to_string();
    let r = http
        .send(
            false,
            Method::POST,
            &format!("{base}/v1/chat/completions"),
            Some(chat.clone()),
            &[("x-tenant-id", "a"), ("x-demo-usage-total", "300")],
        )
        .await;
    assert_eq!(r.json["object"], "chat.completion");
    assert_eq!(r.json["model"], "m1");
    assert_eq!(r.json["usage"]["total_tokens"], 300);
    let u = &r.json["usage"];
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap(),
        300
    );

    let r = http
        .send(
            true,
            Method::GET,
            &format!("{base}/anything?x=1"),
            None,
            &[("x-tenant-id", "a")],
        )
        .await;
    assert_eq!(
        r.json,
        json!({"method": "GET", "path": "/anything", "query": "x=1", "tenant": "a", "request_id": null,
               "header_names": ["x-tenant-id"]})
    );
    let r = http
        .send(
            false,
            Method::DELETE,
            &format!("{base}/other"),
            None,
            &[("x-tenant-id", "b"), ("x-demo-ratelimit-headers", "1")],
        )
        .await;
    assert_eq!(r.headers["x-ratelimit-limit"], "999");
    assert_eq!(r.headers["x-ratelimit-remaining"], "998");
    assert_eq!(r.headers["ratelimit"], "\"up\";r=1;t=1");
    assert_eq!(r.headers["retry-after"], "7");

    let streamed = json!({"stream": true, "messages": []}).to_string();
    let r = http
        .send(
            false,
            Method::POST,
            &format!("{base}/v1/chat/completions"),
            Some(streamed),
            &[("x-demo-usage-total", "42")],
        )
        .await;
    assert_eq!(r.headers["content-type"], "text/event-stream");
    assert!(r.text.ends_with("data: [DONE]\n\n"));
    assert!(r.text.contains("\"total_tokens\":42"), "{}", r.text);

    let stats = http
        .send(
            false,
            Method::GET,
            &format!("{base}/__demo/stats"),
            None,
            &[],
        )
        .await;
    assert_eq!(stats.json["total"], 4);
    assert_eq!(
        stats.json["by_tenant"],
        json!({"a": 2, "b": 1, "(none)": 1})
    );
    assert_eq!(
        stats.json["by_path"],
        json!({"/v1/chat/completions": 2, "/anything": 1, "/other": 1})
    );
    let r = http
        .send(
            false,
            Method::POST,
            &format!("{base}/__demo/reset"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let stats = http
        .send(
            false,
            Method::GET,
            &format!("{base}/__demo/stats"),
            None,
            &[],
        )
        .await;
    assert_eq!(
        stats.json,
        json!({"total": 0, "by_tenant": {}, "by_path": {}, "by_request_id": {}, "over_capacity": 0, "arrivals": []})
    );

    sigterm(&running.0);
    assert!(wait_exit(&mut running.0, Duration::from_secs(12)).success());
}
