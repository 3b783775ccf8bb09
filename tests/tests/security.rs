//! Security behaviours (README "Security"): the admin token from the
//! environment or a file and never logged, 401/403, the admin API never
//! reachable through Envoy and optionally on its own listener, size caps.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_tests::envoy::load_yaml;
use sluice_tests::paths::{repo_root, sluice_bin};
use sluice_tests::process::{ChildProc, TestDir};
use sluice_tests::{free_addr, http, DemoUpstream, Envoy, EnvoyOpts, Redis, Service, ServiceOpts};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

/// `sluice serve` started by hand, to control its environment.
fn serve(redis: &Redis, dir: &TestDir, env: &[(&str, &str)], args: &[&str]) -> (ChildProc, SocketAddr) {
    let addr = free_addr();
    let mut cmd = Command::new(sluice_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .args(["serve", "--redis-url", &redis.url(), "--listen", &addr.to_string()])
        .args(args);
    let mut p = ChildProc::spawn("sluice serve", cmd, &dir.path().join(format!("service-{}.log", addr.port())));
    if let Err(e) = p.wait_ready(Duration::from_secs(30), || http::answers_ok(addr, "/healthz")) {
        p.fail(&format!("not ready: {e:?}"));
    }
    (p, addr)
}

fn admin_call(addr: SocketAddr, auth: Option<&str>, method: &str, path: &str, body: Option<&Value>) -> sluice_tests::Response {
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    http::request(addr, method, path, &headers, bytes.as_deref(), Duration::from_secs(10)).unwrap()
}

/// Right token, wrong tokens (other lengths too), no credential, other
/// schemes: 200, 403, 401 (with `WWW-Authenticate: Bearer`).
fn assert_auth_split(addr: SocketAddr, token: &str) {
    let ok = admin_call(addr, Some(&format!("Bearer {token}")), "PUT", "/v1/admin/tenants/sec/tier", Some(&json!({"tier": "pro", "reason": "security test"})));
    assert_eq!(ok.status, 200, "{}", ok.text());
    for wrong in [format!("Bearer {token}x"), format!("Bearer {}", &token[1..]), "Bearer x".to_string(), format!("bearer {}", token.to_uppercase())] {
        let r = admin_call(addr, Some(&wrong), "GET", "/v1/admin/tiers", None);
        assert_eq!(r.status, 403, "{wrong}: {}", r.text());
        assert_eq!(r.json()["error"], "forbidden");
    }
    for bad in [None, Some("Basic YWRtaW46YWRtaW4="), Some("Bearer"), Some("Bearer  "), Some(token)] {
        let r = admin_call(addr, bad, "GET", "/v1/admin/tiers", None);
        assert_eq!(r.status, 401, "{bad:?}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{bad:?}");
        assert_eq!(r.json()["error"], "unauthorized", "{bad:?}");
    }
}

#[test]
fn the_admin_token_from_env_or_file_works_is_compared_401_403_and_is_never_logged_or_echoed() {
    let redis = Redis::start();
    let dir = TestDir::new("security");
    let env_token = "env-secret-7f3a9c1e5b2d4f60";
    let file_token = "file-secret-0a1b2c3d4e5f6a7b";
    let named_token = "named-secret-99887766554433";
    let wrong = "wrong-secret-deadbeefcafe";

    // From the environment, at the most verbose log level.
    let (mut p_env, a_env) = serve(&redis, &dir, &[("SLUICE_ADMIN_TOKEN", env_token), ("RUST_LOG", "trace")], &[]);
    assert_auth_split(a_env, env_token);
    // From files (a single token and named tokens), with the same log level.
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{file_token}\n")).unwrap();
    let named_file = dir.path().join("tokens");
    std::fs::write(&named_file, format!("# ops\nalice:{named_token}\n")).unwrap();
    let (mut p_file, a_file) = serve(
        &redis,
        &dir,
        &[("RUST_LOG", "trace")],
        &["--admin-token-file", token_file.to_str().unwrap(), "--admin-tokens-file", named_file.to_str().unwrap()],
    );
    assert_auth_split(a_file, file_token);
    let r = admin_call(a_file, Some(&format!("Bearer {named_token}")), "GET", "/v1/admin/audit?limit=5", None);
    assert_eq!(r.status, 200, "{}", r.text());
    // The audit log names tokens, never their values.
    let audit = r.text();
    assert!(audit.contains("\"token\":\"admin\""), "{audit}");
    for t in [env_token, file_token, named_token, wrong] {
        assert!(!audit.contains(t), "the audit log holds a token value");
    }
    // Failures with the token around: a bad body, an unknown tier, a wrong token.
    let _ = admin_call(a_file, Some(&format!("Bearer {file_token}")), "PUT", "/v1/admin/tenants/sec/tier", Some(&json!({"tier": file_token})));
    let _ = admin_call(a_file, Some(&format!("Bearer {wrong}")), "GET", "/v1/admin/tiers", None);
    let _ = admin_call(a_env, Some(&format!("Bearer {wrong}")), "PUT", "/v1/admin/tiers/x", Some(&json!({"hour": -1})));

    // --check-config and --help print no token either.
    let out = Command::new(sluice_bin())
        .env("SLUICE_ADMIN_TOKEN", env_token)
        .args(["serve", "--check-config"])
        .output()
        .unwrap();
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{printed}");
    let help = Command::new(sluice_bin()).env("SLUICE_ADMIN_TOKEN", env_token).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();

    p_env.stop();
    p_file.stop();
    let logs = format!("{}{}", p_env.log(), p_file.log());
    assert!(logs.contains("starting sluice service"), "the logs were read: {logs}");
    for (what, text) in [("service logs", &logs), ("--check-config", &printed), ("--help", &help)] {
        for t in [env_token, file_token, named_token, wrong] {
            assert!(!text.contains(t), "{what} contain a token ({t}):\n{text}");
        }
    }
}

const SHIPPED_CONFIGS: [&str; 3] = ["envoy.yaml", "envoy.docker.yaml", "reserved-capacity.yaml"];

/// Every object of a config that has both keys `a` and `b`.
fn objects_with(config: &Value, a: &str, b: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stack = vec![config.clone()];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(o) => {
                if o.contains_key(a) && o.contains_key(b) {
                    out.push(Value::Object(o.clone()));
                }
                stack.extend(o.into_iter().map(|(_, v)| v));
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    out
}

/// Every route of every shipped Envoy config and the cluster it sends to.
fn shipped_routes() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for f in SHIPPED_CONFIGS {
        let config = load_yaml(&repo_root().join("envoy").join(f));
        for r in objects_with(&config, "match", "route") {
            out.push((f.to_string(), json!({"match": r["match"], "route": r["route"]})));
        }
    }
    out
}

/// The queue listener's routes: overflow the filter marked (the header
/// only the filter sets, with a ticket the queue checks) and async reads.
fn is_queue_route(r: &Value) -> bool {
    let headers = r.pointer("/match/headers").and_then(Value::as_array).cloned().unwrap_or_default();
    let marked = headers.iter().any(|h| h["name"] == "x-sluice-queue" && h["present_match"] == true);
    let reads = r.pointer("/match/prefix").and_then(Value::as_str) == Some("/v1/queue/requests/") && headers.is_empty();
    marked || reads
}

#[test]
fn no_shipped_envoy_route_leads_to_the_quota_service_and_admin_requests_through_envoy_never_reach_it() {
    let routes = shipped_routes();
    assert!(routes.len() >= 8, "the configs were read: {routes:?}");
    for (file, r) in &routes {
        let cluster = r.pointer("/route/cluster").and_then(Value::as_str).unwrap_or_default();
        if cluster == "sluice_queue" {
            assert!(is_queue_route(r), "{file}: a route to the queue listener that is neither overflow nor async reads: {r}");
            continue;
        }
        assert!(!cluster.contains("quota") && !cluster.contains("sluice"), "{file}: a route to the quota service: {r}");
    }
    // The queue listener is its own port (it serves no check, usage or admin route).
    for f in SHIPPED_CONFIGS {
        let config = load_yaml(&repo_root().join("envoy").join(f));
        let clusters = objects_with(&config, "name", "load_assignment");
        let port = |name: &str| {
            clusters
                .iter()
                .find(|c| c["name"] == name)
                .and_then(|c| c.pointer("/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address").cloned())
                .map(|a| (a["address"].clone(), a["port_value"].clone()))
        };
        if let (Some(queue), Some(quota)) = (port("sluice_queue"), port("sluice_quota")) {
            assert_ne!(queue, quota, "{f}: the queue cluster must not be the quota service's port");
        }
    }

    let s = Stack::start();
    let token = format!("Bearer {}", s.service.admin_token().unwrap());
    let before = s.service.admin("GET", "/v1/admin/audit", None).json();
    let changes = |m: String| m.lines().filter(|l| l.starts_with("sluice_admin_changes_total")).map(str::to_string).collect::<Vec<_>>();
    let changes_before = changes(s.service.metrics());
    for (method, path, body) in [
        ("PUT", "/v1/admin/tenants/victim/tier", Some(json!({"tier": "enterprise"}))),
        ("PUT", "/v1/admin/tenants/victim/limits", Some(json!({"hour": 1000000}))),
        ("GET", "/v1/admin/tenants/victim", None),
        ("PUT", "/v1/admin/test-clock", Some(json!({"offset_ms": 86400000}))),
        ("GET", "/v1/check", None),
        // Queue depths of every tenant: the service's, never a tenant's.
        ("GET", "/v1/queue/stats", None),
    ] {
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        let r = s.envoy.request(method, path, &[("x-tenant-id", "victim"), ("authorization", &token)], bytes.as_deref());
        // Counted like any request of the tenant and answered by the upstream.
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["path"], path, "{method} {path}: the demo upstream answered, not the service");
    }
    let view = s.service.admin("GET", "/v1/admin/tenants/victim", None).json();
    assert_eq!(view["tier"], "free", "nothing changed: {view}");
    let after = s.service.admin("GET", "/v1/admin/audit", None).json();
    assert_eq!(before, after, "no admin change was made");
    assert_eq!(changes(s.service.metrics()), changes_before, "no admin change was counted");
}

#[test]
fn with_admin_listen_the_data_port_serves_no_admin_api_and_the_admin_port_no_data_plane() {
    let redis = Redis::start();
    let admin_addr = free_addr();
    let service = Service::start(
        &redis.url(),
        ServiceOpts { extra_args: vec!["--admin-listen".into(), admin_addr.to_string()], ..ServiceOpts::default() },
    );
    let token = format!("Bearer {}", service.admin_token().unwrap());
    let data = service.addr();
    let r = admin_call(data, Some(&token), "GET", "/v1/admin/tiers", None);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], "not_found");
    let r = admin_call(data, Some(&token), "PUT", "/v1/admin/tenants/a/tier", Some(&json!({"tier": "pro"})));
    assert_eq!(r.status, 404);
    let r = http::send_json(data, "POST", "/v1/check", &[], &json!({"tenant": "a"})).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tier"], "free", "the tier was not changed through the data port");

    let r = admin_call(admin_addr, Some(&token), "PUT", "/v1/admin/tenants/a/tier", Some(&json!({"tier": "pro"})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(admin_call(admin_addr, None, "GET", "/v1/admin/tiers", None).status, 401);
    let r = http::send_json(admin_addr, "POST", "/v1/check", &[], &json!({"tenant": "a"})).unwrap();
    assert_eq!(r.status, 404, "no data plane on the admin port: {}", r.text());
    assert_eq!(http::get(admin_addr, "/healthz").unwrap().status, 200);

    // Envoy pointed at the data port enforces the admin change.
    let upstream = DemoUpstream::start();
    let envoy = Envoy::start(EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), data, upstream.addr()));
    let r = envoy.request("GET", "/v1/models", &[("x-tenant-id", "a")], None);
    assert_eq!(r.header("x-ratelimit-limit"), Some("1000"), "pro tier: {:?}", r.headers);
}

#[test]
fn oversized_bodies_get_413_json_on_every_service_route_and_nothing_is_counted() {
    let redis = Redis::start();
    let service = Service::start(&redis.url(), ServiceOpts::default());
    let token = format!("Bearer {}", service.admin_token().unwrap());
    let mut big = br#"{"tenant":"big","policy":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend_from_slice(b"\"}");
    for (path, auth) in [("/v1/check", None), ("/v1/usage", None), ("/v1/report", None), ("/v1/admin/tenants/big/limits", Some(token.as_str()))] {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let method = if path.starts_with("/v1/admin") { "PUT" } else { "POST" };
        let r = http::request(service.addr(), method, path, &headers, Some(&big), Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, 413, "{path}: {}", r.text());
        assert_eq!(r.json()["error"], "payload_too_large", "{path}");
        assert!(r.json()["message"].as_str().unwrap().contains("65536"), "{path}: the limit is named");
    }
    let keys = keys_and_ttls(&redis);
    assert!(keys.iter().all(|(k, _)| !k.contains("{t:big}")), "{keys:?}");
}

/// The queue stack: the `gpu` upstream (1 request/s, burst 1, queued
/// bodies capped at 1 KiB), the queue listener, one worker.
fn queue_stack() -> (Redis, DemoUpstream, Service, Envoy) {
    let redis = Redis::start();
    let upstream = DemoUpstream::start();
    let gpu = json!({"url": format!("http://{}", upstream.addr()), "rate": 1, "burst": 1, "debt": 0, "max_body_bytes": 1024});
    let service = Service::start(
        &redis.url(),
        ServiceOpts { upstreams: Some(json!({"upstreams": {"gpu": gpu}})), queue: true, workers: Some(1), ..ServiceOpts::default() },
    );
    let mut eo = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), service.addr(), upstream.addr());
    eo.queue_addr = service.queue_addr();
    let envoy = Envoy::start(eo);
    (redis, upstream, service, envoy)
}

fn hour_used(service: &Service, tenant: &str) -> u64 {
    let v = service.admin("GET", &format!("/v1/admin/tenants/{tenant}"), None).json();
    v["windows"].as_array().unwrap().iter().find(|w| w["window"] == "hour").unwrap()["current"].as_u64().unwrap()
}

#[test]
fn a_forged_queue_routing_header_on_a_queue_route_skips_no_quota_and_queued_bodies_are_capped_with_413_json() {
    let (_redis, upstream, service, envoy) = queue_stack();
    let forged = |tenant: &'static str| {
        vec![("x-tenant-id", tenant), ("x-sluice-queue", "gpu"), ("x-sluice-ticket", "0123456789abcdef0123456789abcdef"), ("prefer", "respond-async")]
    };
    let depth = || service.get("/v1/queue/stats").json()["upstreams"]["gpu"]["depth"].as_u64().unwrap();

    // A suspended tenant (hour limit 0) can not reach the queue by naming it.
    let r = service.admin("PUT", "/v1/admin/tenants/suspended/limits", Some(&json!({"hour": 0})));
    assert_eq!(r.status, 200);
    for _ in 0..3 {
        let r = envoy.request("GET", "/v1/gpu/run", &forged("suspended"), None);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["error"], "quota_exceeded");
    }
    assert_eq!(depth(), 0, "nothing was queued");
    assert_eq!(admitted(&upstream, "suspended"), 0);

    // A tenant with quota: the forged headers are stripped, the request is
    // checked and charged like any other (here: capacity left, so direct).
    let r = envoy.request("GET", "/v1/gpu/run", &forged("payer"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-sluice-request-id").is_none(), "it did not go through the queue");
    assert!(!r.json()["header_names"].to_string().contains("x-sluice"), "{}", r.json()["header_names"]);
    assert_eq!(hour_used(&service, "payer"), 1);

    // Overflow with a body above the upstream's max_body_bytes: 413 JSON from
    // the queue, nothing queued, sent or charged.
    // (The bucket refills 1/s: on a slow machine a request may find capacity
    // and go directly; the next one overflows.)
    let big = vec![b'x'; 4096];
    let mut direct = 0;
    let r = loop {
        let r = envoy.request("POST", "/v1/gpu/run", &[("x-tenant-id", "payer"), ("prefer", "respond-async")], Some(&big));
        if r.status == 200 && direct < 5 {
            direct += 1;
            continue;
        }
        break r;
    };
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    assert!(r.json()["message"].as_str().unwrap().contains("1024"), "{}", r.text());
    assert_eq!(depth(), 0);
    assert_eq!(admitted(&upstream, "payer"), 1 + direct);
    assert_eq!(hour_used(&service, "payer"), 1 + direct, "a refused queued request is not charged");
    assert!(
        sluice_tests::PromMetrics::parse(&service.metrics())
            .get("sluice_queue_rejections_total", &[("upstream", "gpu"), ("reason", "payload_too_large")])
            == Some(1.0)
    );
}

/// A route policy picked by route metadata (the shipped `batch`: cost 10,
/// 20 a day) for a client that names the queue route in its own headers.
fn forged_batch(envoy: &Envoy, tenant: &str) -> sluice_tests::Response {
    let h = [("x-tenant-id", tenant), ("x-sluice-queue", "gpu"), ("x-sluice-ticket", "0123456789abcdef0123456789abcdef")];
    envoy.request("GET", "/v1/batch/job", &h, None)
}

#[test]
fn a_forged_queue_header_never_changes_the_route_policy_that_prices_a_request() {
    // Shipped config: the header is dropped before Envoy routes, so the
    // batch route (and its policy) is the one that prices the request.
    let (_redis, upstream, service, envoy) = queue_stack();
    let statuses: Vec<u16> = (0..3).map(|_| forged_batch(&envoy, "batcher").status).collect();
    assert_eq!(statuses, [200, 200, 429], "cost 10 against the batch policy's 20 a day");
    let r = forged_batch(&envoy, "batcher");
    assert!(r.header("ratelimit").is_some_and(|v| v.contains("batch-day")), "{:?}", r.headers);
    assert_eq!(admitted(&upstream, "batcher"), 2);
    assert_eq!(hour_used(&service, "batcher"), 20);
    drop(envoy);

    // A deployment without the early header removal: Envoy routed on the
    // client's header and describes that route to the filter, so the filter
    // refuses the request instead of pricing it by the wrong policy.
    let mut eo = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), service.addr(), upstream.addr());
    eo.queue_addr = service.queue_addr();
    eo.early_header_mutation = false;
    let bare = Envoy::start(eo);
    let r = forged_batch(&bare, "batcher2");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid_request");
    assert_eq!(r.json()["field"], "x-sluice-queue", "{}", r.text());
    assert_eq!(admitted(&upstream, "batcher2"), 0);
    // Without forged headers, the same Envoy prices batch as usual.
    let ok = bare.request("GET", "/v1/batch/job", &[("x-tenant-id", "batcher2")], None);
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(hour_used(&service, "batcher2"), 10);
}
