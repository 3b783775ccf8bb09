//! Sluice on a Redis Cluster: a local 3-primary cluster, two quota service
//! replicas started with `--redis-cluster`, two Envoys with two workers each.
//! Enforcement must stay exact (H01) with tenants spread over every node.

mod common;

use common::*;
use serde_json::json;
use sluice_tests::{DemoUpstream, Envoy, EnvoyOpts, RedisCluster, Service, ServiceOpts};

fn cluster_service(cluster: &RedisCluster) -> Service {
    Service::start(
        &cluster.urls(),
        ServiceOpts { extra_args: vec!["--redis-cluster".into()], ..ServiceOpts::default() },
    )
}

#[test]
fn h01_on_a_three_node_redis_cluster_two_envoys_and_two_replicas_admit_exactly_each_limit() {
    let cluster = RedisCluster::start(3);
    let a = cluster_service(&cluster);
    let b = cluster_service(&cluster);
    let upstream = DemoUpstream::start();
    let mut oa = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), a.addr(), upstream.addr());
    oa.concurrency = 2;
    let mut ob = EnvoyOpts::new(plugin_config(json!({"timeout_ms": 2000})), b.addr(), upstream.addr());
    ob.concurrency = 2;
    let (ea, eb) = (Envoy::start(oa), Envoy::start(ob));
    let targets = [ea.listener_addr(), eb.listener_addr()];

    // The admin write (an atomic MULTI on the tenant's cfg hash) goes through
    // one replica; the other sees it on its next check.
    let r = a.admin("PUT", "/v1/admin/tenants/race/limits", Some(&json!({"hour": 10})));
    assert_eq!(r.status, 200, "{}", r.text());
    let statuses = fire(&targets, 200, 50, "GET", "/v1/models", &[("x-tenant-id", "race")]);
    assert_eq!(count(&statuses, 200), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 190, "{statuses:?}");
    assert_eq!(admitted(&upstream, "race"), 10);

    // Many tenants, so their slots fall on every node; each gets exactly its limit.
    let tenants: Vec<String> = (0..12).map(|i| format!("spread-{i}")).collect();
    for t in &tenants {
        let r = b.admin("PUT", &format!("/v1/admin/tenants/{t}/limits"), Some(&json!({"hour": 3})));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for t in &tenants {
        let statuses = fire(&targets, 12, 6, "GET", "/v1/models", &[("x-tenant-id", t.as_str())]);
        assert_eq!(count(&statuses, 200), 3, "{t}: {statuses:?}");
        assert_eq!(count(&statuses, 429), 9, "{t}: {statuses:?}");
        assert_eq!(admitted(&upstream, t), 3, "{t}");
    }

    // Every key of a tenant sits in its tenant's slot on one node; the
    // tenants cover every node; no counter is without its expiry (H04).
    let by_node = cluster.keys_by_node("sluice:*");
    let nodes_used = by_node.iter().filter(|keys| !keys.is_empty()).count();
    assert_eq!(nodes_used, cluster.len(), "tenant keys should spread over every node: {by_node:?}");
    for t in tenants.iter().map(String::as_str).chain(["race"]) {
        let tag = format!("{{t:{t}}}");
        let holders: Vec<usize> =
            by_node.iter().enumerate().filter(|(_, keys)| keys.iter().any(|k| k.contains(&tag))).map(|(i, _)| i).collect();
        assert_eq!(holders.len(), 1, "keys of {t} on nodes {holders:?}");
        let keys: Vec<&String> = by_node.iter().flatten().filter(|k| k.contains(&tag)).collect();
        assert!(keys.len() >= 2, "{t}: cfg and a counter expected, got {keys:?}");
        let slots: Vec<i64> = keys.iter().map(|k| cluster.keyslot(k)).collect();
        assert!(slots.windows(2).all(|w| w[0] == w[1]), "{t}: keys in several slots {keys:?} {slots:?}");
        for k in keys.iter().filter(|k| !k.ends_with(":cfg")) {
            let holder = holders[0];
            let ttl = cluster.command_on(holder, &["TTL", k]).as_i64().unwrap();
            assert!(ttl > 0, "{k} has TTL {ttl}");
        }
    }

    assert_eq!(a.get("/readyz").status, 200);
    // The read-only status script works through the cluster too.
    let status = a.admin("GET", "/v1/admin/tenants/race", None);
    assert_eq!(status.status, 200, "{}", status.text());
    let body = status.json();
    assert_eq!(body["windows"][0]["current"], 10, "{body}");
}

#[test]
fn a_cluster_service_starts_while_the_cluster_is_down_and_answers_503_not_500() {
    // Nothing listens on these ports: the cluster connection is made lazily.
    let urls = format!("redis://127.0.0.1:{}/,redis://127.0.0.1:{}/", sluice_tests::free_port(), sluice_tests::free_port());
    let service = Service::start(
        &urls,
        ServiceOpts { extra_args: vec!["--redis-cluster".into()], redis_timeout_ms: Some(300), ..ServiceOpts::default() },
    );
    let r = service.get("/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    let r = sluice_tests::http::send_json(service.addr(), "POST", "/v1/check", &[], &json!({"tenant": "t", "cost": 1})).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "redis_unavailable");
}

#[test]
fn several_redis_urls_without_the_cluster_flag_are_a_config_error_naming_the_flag() {
    let out = sluice_tests::service::run_sluice(&[
        "serve",
        "--check-config",
        "--redis-url",
        "redis://127.0.0.1:1/,redis://127.0.0.1:2/",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--redis-cluster"), "{err}");
    let out = sluice_tests::service::run_sluice(&[
        "serve",
        "--check-config",
        "--redis-cluster",
        "--redis-url",
        "redis://127.0.0.1:1/,redis://127.0.0.1:2/",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cluster"));
}

#[test]
fn token_reservations_and_quota_leases_work_on_a_three_node_cluster() {
    let cluster = RedisCluster::start(3);
    let s = cluster_service(&cluster);
    let post = |path: &str, body: serde_json::Value| {
        sluice_tests::http::send_json(s.addr(), "POST", path, &[], &body).expect("the service answers")
    };

    // A token budget: the estimate is reserved with the check, the real
    // usage replaces it (CHECK and USAGE scripts on the tenant's node).
    let r = s.admin("PUT", "/v1/admin/tenants/tok/limits", Some(&json!({"tokens_hour": 1000})));
    assert_eq!(r.status, 200, "{}", r.text());
    let c = post("/v1/check", json!({"tenant": "tok", "tokens": 600}));
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["allowed"], true, "{}", c.text());
    let id = c.json()["reservation"]["id"].as_str().expect("a reservation").to_string();
    let over = post("/v1/check", json!({"tenant": "tok", "tokens": 600}));
    assert_eq!(over.json()["allowed"], false, "600 + 600 > 1000: {}", over.text());
    let u = post("/v1/usage", json!({"tenant": "tok", "reservation": id, "total_tokens": 250, "complete": true}));
    assert_eq!(u.status, 200, "{}", u.text());
    assert_eq!(u.json()["status"], "settled", "{}", u.text());
    assert_eq!(u.json()["charged"], 250, "{}", u.text());
    let after = post("/v1/check", json!({"tenant": "tok", "tokens": 600}));
    assert_eq!(after.json()["allowed"], true, "250 + 600 fit once the usage replaced the estimate: {}", after.text());

    // A lease: charged with the check, what it did not spend given back
    // (LEASE_RETURN over the tenant's counters, one slot).
    let r = s.admin("PUT", "/v1/admin/tenants/lz/limits", Some(&json!({"hour": 100})));
    assert_eq!(r.status, 200, "{}", r.text());
    let c = post("/v1/check", json!({"tenant": "lz", "cost": 1, "lease": {"want": 8}}));
    assert_eq!(c.status, 200, "{}", c.text());
    let body = c.json();
    let grant = &body["lease"];
    let units = grant["units"].as_u64().unwrap_or_else(|| panic!("a lease is granted: {body}"));
    assert!(units >= 1, "{body}");
    let hour = |s: &Service| s.admin("GET", "/v1/admin/tenants/lz", None).json()["windows"][0]["current"].as_u64();
    assert_eq!(hour(&s), Some(1 + units), "the lease is charged when granted");
    let ret = json!({"returns": [{"tenant": "lz", "units": units, "spent": 0, "day": grant["day"], "charged": grant["charged"]}]});
    let r = post("/v1/lease/return", ret);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["returned"], units, "{}", r.text());
    assert_eq!(hour(&s), Some(1), "unspent units went back");
}
