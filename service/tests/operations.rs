//! Operating Sluice at runtime against a real Redis: tiers as data, their
//! propagation between replicas, overrides that revert at their expiry,
//! the audit log, named admin tokens, usage rollups and their export.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{default_config, epoch, mid_hour_ms, RedisServer, Service, TOKEN};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use sluice_service::config::{AdminToken, Secret};

fn hour_limit(r: &common::Reply) -> u64 {
    r.json["windows"][0]["limit"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_are_seeded_once_and_then_redis_wins_over_the_tiers_file() {
    let redis = RedisServer::start();
    let a = Service::on(&redis).await;
    let r = a.admin(Method::GET, "/v1/admin/tiers", None).await;
    assert_eq!(r.json["version"], 1, "{}", r.text);
    // A replica started later with another tiers file enforces Redis's tiers.
    let mut config = default_config(&redis.url());
    config.tiers = common::tiers(r#"{"tiers":{"free":{"hour":3}}}"#);
    let b = Service::start(config).await;
    let r = b.request(Method::GET, "/readyz", None, &[]).await;
    assert_eq!((r.status, r.json["tiers_version"].as_u64()), (StatusCode::OK, Some(1)));
    let r = b.check(json!({"tenant": "x"})).await;
    assert_eq!(hour_limit(&r), 100);
    let r = b.admin(Method::GET, "/v1/admin/tiers", None).await;
    assert_eq!(r.json["tiers"]["free"]["hour"], 100);
    assert!(r.json["tiers"]["pro"].is_object());
    // The seed is in the audit log.
    let r = a.admin(Method::GET, "/v1/admin/audit?action=seed_tiers", None).await;
    assert_eq!(r.json["count"], 1, "{}", r.text);
    assert_eq!(r.json["entries"][0]["actor"], "sluice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_are_created_replaced_and_deleted_at_runtime_and_the_default_is_protected() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    let r = svc
        .admin(Method::PUT, "/v1/admin/tiers/trial", Some(json!({"hour": 5, "month": 50, "reason": "pilot"})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["tier"], json!({"hour": 5, "month": 50}));
    let v1 = r.json["version"].as_u64().unwrap();
    svc.admin(Method::PUT, "/v1/admin/tenants/t1/tier", Some(json!({"tier": "trial"}))).await;
    assert_eq!(hour_limit(&svc.check(json!({"tenant": "t1"})).await), 5);

    let r = svc.admin(Method::PUT, "/v1/admin/tiers/trial", Some(json!({"hour": 8}))).await;
    assert_eq!(r.json["version"].as_u64().unwrap(), v1 + 1);
    let r = svc.check(json!({"tenant": "t1"})).await;
    assert_eq!(r.json["windows"].as_array().unwrap().len(), 1, "month is no longer enforced");
    assert_eq!(hour_limit(&r), 8);

    for (body, needle) in [
        (json!({"hour": -1}), "tier.hour"),
        (json!({"tokens_month": 5}), "at least one of hour, day, month"),
        (json!({"hour": 1, "weekly": 2}), "tier.weekly"),
        (json!({"hour": 1, "reserved_pool": "a b"}), "tier.reserved_pool"),
    ] {
        let r = svc.admin(Method::PUT, "/v1/admin/tiers/bad", Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.json["message"].as_str().unwrap().contains(needle), "{}", r.text);
    }

    let r = svc.admin(Method::DELETE, "/v1/admin/tiers/free", None).await;
    assert_eq!((r.status, r.error()), (StatusCode::CONFLICT, "default_tier"));
    let r = svc.admin(Method::DELETE, "/v1/admin/tiers/nope", None).await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "unknown_tier"));

    // Deleting a tier in use: its tenants fall back to the default tier.
    let r = svc.admin(Method::DELETE, "/v1/admin/tiers/trial", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = svc.check(json!({"tenant": "t1"})).await;
    assert_eq!((r.json["tier"].as_str(), hour_limit(&r)), (Some("free"), 100));
    let r = svc.admin(Method::GET, "/v1/admin/tenants/t1", None).await;
    assert_eq!((r.json["tier"].as_str(), r.json["stored_tier"].as_str()), (Some("free"), Some("trial")));

    // Another default; the old default may then go.
    let r = svc.admin(Method::PUT, "/v1/admin/default-tier", Some(json!({"tier": "pro"}))).await;
    assert_eq!(r.json["default_tier"], "pro", "{}", r.text);
    assert_eq!(hour_limit(&svc.check(json!({"tenant": "fresh"})).await), 1000);
    let r = svc.admin(Method::DELETE, "/v1/admin/tiers/free", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = svc.admin(Method::GET, "/v1/admin/tiers/free", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_change_on_one_replica_is_enforced_by_another_within_the_bound() {
    let redis = RedisServer::start();
    let a = Service::on(&redis).await;
    let b = Service::on(&redis).await;
    assert_eq!(hour_limit(&b.check(json!({"tenant": "p"})).await), 100);
    let changed = Instant::now();
    let r = a.admin(Method::PUT, "/v1/admin/tiers/free", Some(json!({"hour": 42}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Every check B starts 1 s (the documented bound) after the change sees it;
    // the first one that does gives the measured propagation time.
    let mut seen_after = None;
    loop {
        let sent = changed.elapsed();
        let limit = hour_limit(&b.check(json!({"tenant": "p"})).await);
        if limit == 42 {
            seen_after.get_or_insert(sent);
        } else {
            assert!(sent < Duration::from_secs(1), "B still enforced the old tier {sent:?} after the change");
            assert!(seen_after.is_none(), "B went back to the old tier");
        }
        if sent > Duration::from_millis(1200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("tier change propagated to the other replica after {:?}", seen_after.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_raises_the_limit_until_its_expiry_and_then_the_old_limit_returns() {
    let redis = RedisServer::start();
    let svc = Arc::new(Service::on(&redis).await);
    let start = mid_hour_ms();
    svc.set_now(&redis, start).await;
    svc.admin(Method::PUT, "/v1/admin/tenants/o/limits", Some(json!({"hour": 5}))).await;
    let (admitted, _) = svc.burst("o", 8).await;
    assert_eq!(admitted, 5);

    let r = svc
        .admin(
            Method::PUT,
            "/v1/admin/tenants/o/overrides",
            Some(json!({"limits": {"hour": 12}, "duration_s": 600, "reason": "customer call"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let until_ms = (start / 1000 + 600) as u64 * 1000;
    let hour = &r.json["limits"]["hour"];
    assert_eq!(hour["effective"], 12);
    assert_eq!(hour["source"], "override");
    assert_eq!(hour["custom"], 5);
    assert_eq!(hour["tier"], 100);
    let shown = hour["until_ms"].as_u64().unwrap();
    assert!(shown.abs_diff(until_ms) < 2_000, "{shown} vs {until_ms}");
    assert_eq!(r.json["windows"][0]["source"], "override");
    let (admitted, _) = svc.burst("o", 10).await;
    assert_eq!(admitted, 7, "12 in the hour, 5 used");

    // One second past the expiry: the custom limit is back, nothing ran.
    svc.set_now(&redis, shown as i64 + 1_000).await;
    let r = svc.check(json!({"tenant": "o"})).await;
    assert_eq!((r.json["allowed"].as_bool(), hour_limit(&r)), (Some(false), 5));
    let r = svc.admin(Method::GET, "/v1/admin/tenants/o", None).await;
    assert_eq!(r.json["limits"]["hour"]["source"], "custom");
    assert_eq!(r.json["overrides"], json!({}));
    // The expired override is still in the hash until the next admin change cleans it up.
    let cfg: Vec<String> = redis::cmd("HKEYS").arg("sluice:{t:o}:cfg").query(&mut redis.conn()).unwrap();
    assert!(cfg.contains(&"o:hour".to_string()));
    svc.admin(Method::PUT, "/v1/admin/tenants/o/mode", Some(json!({"shadow": false}))).await;
    let cfg: Vec<String> = redis::cmd("HKEYS").arg("sluice:{t:o}:cfg").query(&mut redis.conn()).unwrap();
    assert!(!cfg.contains(&"o:hour".to_string()), "{cfg:?}");

    // Default duration: 7 days; revoking ends it at once.
    let r = svc
        .admin(Method::PUT, "/v1/admin/tenants/o/overrides", Some(json!({"limits": {"hour": 50, "cost_weight": 2}})))
        .await;
    let until = r.json["limits"]["hour"]["until_ms"].as_u64().unwrap() as i64;
    let now = shown as i64 + 1_000;
    assert!((until - now - 7 * 86_400_000).abs() < 2_000, "{until} vs {now}");
    let r = svc.check(json!({"tenant": "o", "cost": 3})).await;
    assert_eq!(r.json["windows"][0]["used"], 12 + 6, "cost 3 x override weight 2: {}", r.text);
    let r = svc.admin(Method::DELETE, "/v1/admin/tenants/o/overrides/hour", None).await;
    assert_eq!(r.json["limits"]["hour"]["effective"], 5);
    assert_eq!(r.json["limits"]["cost_weight"]["source"], "override");
    let r = svc.admin(Method::DELETE, "/v1/admin/tenants/o/overrides", None).await;
    assert_eq!(r.json["overrides"], json!({}));

    for (body, needle) in [
        (json!({"limits": {}}), "limits"),
        (json!({"limits": {"hour": -1}}), "limits.hour"),
        (json!({"limits": {"weekly": 1}}), "limits.weekly"),
        (json!({"limits": {"hour": 1}, "duration_s": 0}), "duration_s"),
        (json!({"limits": {"hour": 1}, "until": "2001-01-01T00:00:00Z"}), "until"),
        (json!({"limits": {"hour": 1}, "duration_s": 5, "until": "2099-01-01"}), "duration_s and until"),
    ] {
        let r = svc.admin(Method::PUT, "/v1/admin/tenants/o/overrides", Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert!(r.json["message"].as_str().unwrap().starts_with(needle), "{}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_change_writes_one_audit_entry_with_actor_old_new_and_reason() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.set_now(&redis, mid_hour_ms()).await;
    let auth = format!("Bearer {TOKEN}");
    let h = |actor: &'static str| vec![("authorization", auth.clone()), ("x-admin-actor", actor.to_string())];
    let send = |method: Method, path: &'static str, body: Option<Value>, headers: Vec<(&'static str, String)>| {
        let svc = &svc;
        async move {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = svc.request(method, path, body, &hs).await;
            assert!(r.status.is_success(), "{path}: {}", r.text);
            r
        }
    };
    send(Method::PUT, "/v1/admin/tenants/acme/tier", Some(json!({"tier": "pro", "reason": "upgrade"})), h("alice")).await;
    send(Method::PUT, "/v1/admin/tenants/acme/limits", Some(json!({"hour": 5000})), h("bob")).await;
    let mut hs = h("alice");
    hs.push(("x-admin-reason", "ticket 42".into()));
    send(Method::PUT, "/v1/admin/tenants/acme/limits", Some(json!({"hour": 6000})), hs).await;
    send(Method::PUT, "/v1/admin/tenants/acme/overrides", Some(json!({"limits": {"day": 9}})), h("carol")).await;
    send(Method::PUT, "/v1/admin/tenants/acme/mode", Some(json!({"shadow": true, "reserved_pool": "gold"})), h("carol")).await;
    send(Method::DELETE, "/v1/admin/tenants/acme/limits", None, h("bob")).await;
    send(Method::PUT, "/v1/admin/tenants/other/tier", Some(json!({"tier": "enterprise"})), vec![("authorization", auth.clone())]).await;
    send(Method::PUT, "/v1/admin/tiers/gold", Some(json!({"hour": 7})), h("dave")).await;

    let r = svc.admin(Method::GET, "/v1/admin/audit?tenant=acme", None).await;
    let e = r.json["entries"].as_array().unwrap();
    let actions: Vec<&str> = e.iter().map(|x| x["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["clear_limits", "set_mode", "grant_override", "set_limits", "set_limits", "set_tier"], "newest first");
    let tier = &e[5];
    assert_eq!((tier["actor"].as_str(), tier["token"].as_str()), (Some("alice"), Some("admin")));
    assert_eq!((tier["old"].clone(), tier["new"].clone()), (Value::Null, json!("pro")));
    assert_eq!(tier["reason"], "upgrade");
    assert_eq!(e[3]["old"], json!({"hour": 5000}));
    assert_eq!(e[3]["new"], json!({"hour": 6000}));
    assert_eq!(e[3]["reason"], "ticket 42");
    assert_eq!(e[2]["new"]["day"]["value"], 9);
    assert_eq!(e[1]["new"], json!({"shadow": true, "reserved_pool": "gold"}));
    assert_eq!(e[0]["old"], json!({"hour": 6000}));
    assert!(e[0]["time"].as_str().unwrap().starts_with("2031-03-12T10:30:"), "{}", e[0]["time"]);

    // Without X-Admin-Actor the token's name is the actor.
    let r = svc.admin(Method::GET, "/v1/admin/audit?tenant=other", None).await;
    assert_eq!(r.json["entries"][0]["actor"], "admin");
    let r = svc.admin(Method::GET, "/v1/admin/audit?actor=carol", None).await;
    assert_eq!(r.json["count"], 2);
    let r = svc.admin(Method::GET, "/v1/admin/audit?action=put_tier", None).await;
    assert_eq!((r.json["count"].as_u64(), r.json["entries"][0]["target"].as_str()), (Some(1), Some("gold")));
    let r = svc.admin(Method::GET, "/v1/admin/audit?limit=2", None).await;
    assert_eq!(r.json["count"], 2);
    let r = svc
        .admin(Method::GET, "/v1/admin/audit?since=2031-03-12T10:00:00Z&until=2031-03-12T11:00:00Z&tenant=acme", None)
        .await;
    assert_eq!(r.json["count"], 6);
    let r = svc.admin(Method::GET, "/v1/admin/audit?until=2031-03-12T10:00:00Z", None).await;
    assert_eq!(r.json["count"], 0);
    for bad in ["limit=0", "since=yesterday", "colour=red"] {
        let r = svc.admin(Method::GET, &format!("/v1/admin/audit?{bad}"), None).await;
        assert_eq!((r.status, r.error()), (StatusCode::BAD_REQUEST, "invalid_request"), "{bad}");
    }
    let r = svc
        .request(Method::GET, "/v1/admin/audit", None, &[("authorization", auth.as_str()), ("x-admin-actor", "")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_older_than_the_retention_are_dropped() {
    let redis = RedisServer::start();
    let mut config = default_config(&redis.url());
    config.audit_retention = Duration::from_secs(86_400);
    let svc = Service::start(config).await;
    let t0 = mid_hour_ms();
    svc.set_now(&redis, t0).await;
    svc.admin(Method::PUT, "/v1/admin/tenants/r/tier", Some(json!({"tier": "pro"}))).await;
    let r = svc.admin(Method::GET, "/v1/admin/audit?tenant=r", None).await;
    assert_eq!(r.json["count"], 1);
    // Two days later the entry is past the retention: hidden, then trimmed by the next write.
    svc.set_now(&redis, t0 + 2 * 86_400_000).await;
    let r = svc.admin(Method::GET, "/v1/admin/audit?tenant=r", None).await;
    assert_eq!(r.json["count"], 0, "{}", r.text);
    svc.admin(Method::PUT, "/v1/admin/tenants/r/tier", Some(json!({"tier": "free"}))).await;
    let len: i64 = redis::cmd("XLEN").arg("sluice:{g}:audit").query(&mut redis.conn()).unwrap();
    assert_eq!(len, 1, "the old entries were trimmed");
    let ttl = redis.ttl("sluice:{g}:audit");
    assert!((1..=86_400).contains(&ttl), "the log expires a retention after its last write: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_audit_entry_cannot_be_written_is_not_applied() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.admin(Method::PUT, "/v1/admin/tenants/w/limits", Some(json!({"hour": 5}))).await;
    // Make the audit stream unwritable: a key of another type under its name.
    let _: () = redis::cmd("DEL").arg("sluice:{g}:audit").query(&mut redis.conn()).unwrap();
    let _: () = redis::cmd("SET").arg("sluice:{g}:audit").arg("x").query(&mut redis.conn()).unwrap();
    let r = svc.admin(Method::PUT, "/v1/admin/tenants/w/limits", Some(json!({"hour": 9}))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    let hour: String = redis::cmd("HGET").arg("sluice:{t:w}:cfg").arg("hour").query(&mut redis.conn()).unwrap();
    assert_eq!(hour, "5", "no change without its audit entry");
    let r = svc.admin(Method::PUT, "/v1/admin/tiers/gold", Some(json!({"hour": 1}))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = svc.admin(Method::GET, "/v1/admin/tiers/gold", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "the tiers change rolled back with its entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_admin_tokens_are_each_accepted_and_name_the_actor() {
    let redis = RedisServer::start();
    let mut config = default_config(&redis.url());
    config.admin_tokens = vec![
        AdminToken { name: "alice".into(), token: Secret::new("tok-alice") },
        AdminToken { name: "ci".into(), token: Secret::new("tok-ci") },
    ];
    let svc = Service::start(config).await;
    for (token, name) in [("tok-alice", "alice"), ("tok-ci", "ci")] {
        let auth = format!("Bearer {token}");
        let r = svc
            .request(Method::PUT, "/v1/admin/tenants/n/tier", Some(json!({"tier": "pro"})), &[("authorization", auth.as_str())])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = svc
            .request(Method::GET, "/v1/admin/audit?limit=1&tenant=n", None, &[("authorization", auth.as_str())])
            .await;
        assert_eq!((r.json["entries"][0]["actor"].as_str(), r.json["entries"][0]["token"].as_str()), (Some(name), Some(name)));
    }
    let r = svc
        .request(Method::GET, "/v1/admin/tiers", None, &[("authorization", &format!("Bearer {TOKEN}"))])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_rollups_count_decisions_cost_and_latency_and_export_as_json_and_csv() {
    let redis = RedisServer::start();
    let svc = Arc::new(Service::on(&redis).await);
    let day1 = epoch(2031, 3, 12, 10, 0, 0) * 1000;
    svc.set_now(&redis, day1).await;
    svc.admin(Method::PUT, "/v1/admin/tenants/u1/limits", Some(json!({"hour": 4, "cost_weight": 2}))).await;
    for _ in 0..3 {
        svc.check(json!({"tenant": "u1"})).await;
    }
    svc.check(json!({"tenant": "u2", "cost": 5})).await;
    for ms in [3, 20, 20, 400] {
        let r = svc.request(Method::POST, "/v1/report", Some(json!({"tenant": "u1", "upstream_latency_ms": ms})), &[]).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    }
    let day2 = epoch(2031, 3, 13, 9, 0, 0) * 1000;
    svc.set_now(&redis, day2).await;
    svc.check(json!({"tenant": "u1"})).await;
    // Shadow mode: a would-be denial is counted apart.
    svc.admin(Method::PUT, "/v1/admin/tenants/u3/limits", Some(json!({"hour": 0}))).await;
    svc.check(json!({"tenant": "u3", "shadow": true})).await;
    // The index is written off the request path: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let n: i64 = redis::cmd("SCARD").arg("sluice:{g}:u:idx:20310313").query(&mut redis.conn()).unwrap();
        if n == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let r = svc.admin(Method::GET, "/v1/admin/usage?from=2031-03-12&to=2031-03-13", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let rows = r.json["rows"].as_array().unwrap();
    let find = |d: &str, t: &str| rows.iter().find(|x| x["date"] == d && x["tenant"] == t).cloned().unwrap_or_else(|| panic!("no row {d} {t}: {rows:?}"));
    let u1 = find("2031-03-12", "u1");
    assert_eq!((u1["admitted"].as_u64(), u1["denied"].as_u64(), u1["cost_units"].as_u64()), (Some(2), Some(1), Some(4)));
    assert_eq!(u1["latency_count"], 4);
    assert_eq!(u1["latency_mean_ms"], json!(110.75));
    assert_eq!(u1["latency_p95_ms"], 500, "the 400 ms report falls in the <=500 ms bucket");
    assert_eq!(find("2031-03-12", "u2")["cost_units"], 5);
    assert_eq!(find("2031-03-13", "u1")["denied"], 0);
    let u3 = find("2031-03-13", "u3");
    assert_eq!((u3["shadow_denied"].as_u64(), u3["denied"].as_u64()), (Some(1), Some(0)));
    assert_eq!(rows.len(), 4);

    let r = svc.admin(Method::GET, "/v1/admin/usage?from=2031-03-12&to=2031-03-12&tenant=u1&format=csv", None).await;
    assert!(r.headers["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert_eq!(
        r.text,
        "date,tenant,admitted,denied,shadow_denied,queued,tokens,cost_units,latency_count,latency_mean_ms,latency_p95_ms\n\
         2031-03-12,u1,2,1,0,0,0,4,4,110.75,500\n"
    );
    let ttl = redis.ttl("sluice:{t:u1}:u:20310313");
    let expected = 15 * 3600 + 90 * 86_400;
    assert!((expected - 5..=expected).contains(&ttl), "kept the retention after its day: {ttl}");
    for bad in ["from=2031-03-14&to=2031-03-13", "from=2030-01-01&to=2031-03-13", "format=xml", "from=13.03.2031", "tenant=a%20b"] {
        let r = svc.admin(Method::GET, &format!("/v1/admin/usage?{bad}"), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
    }
    let r = svc.request(Method::POST, "/v1/report", Some(json!({"tenant": "u1", "upstream_latency_ms": 3_600_001})), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_tenants_and_reserved_pools_come_back_in_the_decision() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.set_now(&redis, mid_hour_ms()).await;
    svc.admin(Method::PUT, "/v1/admin/tiers/gold", Some(json!({"hour": 1000, "reserved_pool": "gold"}))).await;
    svc.admin(Method::PUT, "/v1/admin/tenants/g/tier", Some(json!({"tier": "gold"}))).await;
    let r = svc.check(json!({"tenant": "g"})).await;
    assert_eq!(r.json["reserved_pool"], "gold", "{}", r.text);
    let r = svc.admin(Method::PUT, "/v1/admin/tenants/g/mode", Some(json!({"reserved_pool": "vip"}))).await;
    assert_eq!(r.json["reserved_pool"], "vip");
    assert_eq!(svc.check(json!({"tenant": "g"})).await.json["reserved_pool"], "vip");
    svc.admin(Method::PUT, "/v1/admin/tenants/g/mode", Some(json!({"reserved_pool": null}))).await;
    assert_eq!(svc.check(json!({"tenant": "g"})).await.json["reserved_pool"], "gold");
    assert!(svc.check(json!({"tenant": "plain"})).await.json.get("reserved_pool").is_none());

    svc.admin(Method::PUT, "/v1/admin/tenants/s/limits", Some(json!({"hour": 1}))).await;
    let r = svc.admin(Method::PUT, "/v1/admin/tenants/s/mode", Some(json!({"shadow": true}))).await;
    assert_eq!(r.json["shadow"], true);
    for _ in 0..3 {
        svc.check(json!({"tenant": "s"})).await;
    }
    let r = svc.check(json!({"tenant": "s"})).await;
    assert_eq!((r.json["allowed"].as_bool(), r.json["shadow"].as_bool()), (Some(false), Some(true)));
    let m = svc.request(Method::GET, "/metrics", None, &[]).await.text;
    assert!(m.contains("sluice_shadow_decisions_total{result=\"denied\"} 3"), "{m}");
    assert!(m.contains("sluice_shadow_decisions_total{result=\"allowed\"} 1"));
    assert!(m.contains("sluice_rejections_total{reason=\"hour\"} 0"), "shadow denials are not rejections");
    let r = svc.admin(Method::PUT, "/v1/admin/tenants/s/mode", Some(json!({}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = svc.admin(Method::PUT, "/v1/admin/tenants/s/mode", Some(json!({"reserved_pool": "a b"}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_export_redis_latency_memory_and_the_tiers_version() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.check(json!({"tenant": "m"})).await;
    let value_in = |m: &str, name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in {m}"))
            .parse()
            .unwrap()
    };
    // The tiers refresher loads the seeded version in the background: on a
    // loaded machine the first scrape can come before it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let m = loop {
        let m = svc.request(Method::GET, "/metrics", None, &[]).await.text;
        if value_in(&m, "sluice_tiers_version") >= 1.0 || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let value = |name: &str| value_in(&m, name);
    assert!(value("sluice_redis_memory_used_bytes") > 0.0);
    assert_eq!(value("sluice_redis_up"), 1.0);
    assert!(value("sluice_redis_command_duration_seconds_count{op=\"check\"}") >= 1.0);
    assert_eq!(value("sluice_tiers_version"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reservations_land_in_the_daily_rollup_and_an_override_raises_a_token_budget() {
    let redis = RedisServer::start();
    let svc = Service::on(&redis).await;
    svc.set_now(&redis, mid_hour_ms()).await;
    svc.admin(Method::PUT, "/v1/admin/tenants/tk/limits", Some(json!({"tokens_hour": 500}))).await;
    let r = svc.check(json!({"tenant": "tk", "tokens": 400})).await;
    assert_eq!(r.json["allowed"], true, "{}", r.text);
    let id = r.json["reservation"]["id"].as_str().unwrap().to_string();
    // The second 400 does not fit in 500: an override lifts the budget for a while.
    assert_eq!(svc.check(json!({"tenant": "tk", "tokens": 400})).await.json["allowed"], false);
    let v = svc
        .admin(Method::PUT, "/v1/admin/tenants/tk/overrides", Some(json!({"limits": {"tokens_hour": 2000}, "duration_s": 60})))
        .await;
    assert_eq!(v.json["limits"]["tokens_hour"]["source"], "override", "{}", v.text);
    let tokens_row = v.json["windows"].as_array().unwrap().iter().find(|w| w["window"] == "tokens_hour").cloned().unwrap();
    assert_eq!((tokens_row["current"].as_u64(), tokens_row["limit"].as_u64()), (Some(400), Some(2000)));
    let r = svc.check(json!({"tenant": "tk", "tokens": 400})).await;
    assert_eq!(r.json["allowed"], true, "{}", r.text);
    // Reconciling the first one with its real usage corrects the rollup too.
    let r = svc
        .request(Method::POST, "/v1/usage", Some(json!({"tenant": "tk", "reservation": id, "total_tokens": 250})), &[])
        .await;
    assert_eq!(r.json["status"], "settled", "{}", r.text);
    let r = svc.admin(Method::GET, "/v1/admin/usage?tenant=tk&from=2031-03-12&to=2031-03-12", None).await;
    let row = &r.json["rows"][0];
    assert_eq!((row["tokens"].as_u64(), row["admitted"].as_u64(), row["denied"].as_u64()), (Some(250 + 400), Some(2), Some(1)), "{}", r.text);
}
