//! Absurd numbers and wrong types in every request the service parses
//! (checks, usage and latency reports, tiers, limits, overrides, modes,
//! storage, the test clock, audit and usage queries): each is a 400 with a
//! JSON error naming the field, nothing is stored, and no tenant becomes
//! unlimited.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{RedisServer, Service};
use hyper::{Method, StatusCode};
use serde_json::json;

/// Raw JSON texts, so 2^64, 1e308, -0 and NaN can be written as clients send them.
const ABSURD: &[&str] = &["-1", "18446744073709551616", "1e308", "1.5", "\"NaN\"", "NaN", "\"12\"", "true", "[]", "{}", "-9223372036854775809"];

fn assert_400(r: &common::Reply, what: &str, field: &str) {
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text);
    let msg = r.json["message"].as_str().unwrap_or_default();
    assert!(["invalid_request", "invalid_tenant", "unknown_tier"].contains(&r.json["error"].as_str().unwrap_or_default()), "{what}: {}", r.text);
    if !field.is_empty() && !msg.starts_with("invalid JSON body") {
        assert!(msg.contains(field), "{what}: the message names {field}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_numbers_in_checks_and_reports_are_400s_naming_the_field() {
    let redis = RedisServer::start();
    let s = Service::on(&redis).await;
    for v in ABSURD.iter().chain(&["0"]) {
        for (path, field, body) in [
            ("/v1/check", "cost", format!(r#"{{"tenant":"abs","cost":{v}}}"#)),
            ("/v1/check", "tokens", format!(r#"{{"tenant":"abs","tokens":{v}}}"#)),
            ("/v1/check", "limit", format!(r#"{{"tenant":"abs","policy":"p","route_limits":[{{"window":"hour","limit":{v}}}]}}"#)),
            ("/v1/usage", "total_tokens", format!(r#"{{"tenant":"abs","reservation":"1","total_tokens":{v},"complete":true}}"#)),
            ("/v1/report", "upstream_latency_ms", format!(r#"{{"tenant":"abs","upstream_latency_ms":{v}}}"#)),
        ] {
            // 0 is a valid token count, route limit, total and latency.
            if *v == "0" && field != "cost" {
                continue;
            }
            let r = s.raw(Method::POST, path, &body).await;
            assert_400(&r, &format!("{path} {body}"), field);
        }
    }
    for body in [
        r#"{"tenant":"abs","route_limits":[{"window":"fortnight","limit":1}],"policy":"p"}"#,
        r#"{"tenant":"{t:abs}"}"#,
        r#"{"tenant":""}"#,
        r#"{"tenant":"abs","policy":"a b"}"#,
        r#"{"tenant":"abs","upload":"yes"}"#,
        r#"{"tenant":123}"#,
        r#"{"tenant":"abs"} trailing"#,
        r#"[{"tenant":"abs"}]"#,
    ] {
        let r = s.raw(Method::POST, "/v1/check", body).await;
        assert_400(&r, body, "");
    }
    assert!(redis.keys().iter().all(|k| !k.contains("{t:abs}")), "nothing was counted: {:?}", redis.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_numbers_in_tiers_limits_overrides_storage_and_the_clock_are_400s_and_change_nothing() {
    let redis = RedisServer::start();
    let s = Service::on(&redis).await;
    let tiers_before = s.admin(Method::GET, "/v1/admin/tiers", None).await.text;
    let view_before = s.admin(Method::GET, "/v1/admin/tenants/abs", None).await.json;
    for v in ABSURD {
        for (method, path, field, body) in [
            (Method::PUT, "/v1/admin/tiers/t1", "hour", format!(r#"{{"hour":{v}}}"#)),
            (Method::PUT, "/v1/admin/tiers/t1", "cost_weight", format!(r#"{{"hour":1,"cost_weight":{v}}}"#)),
            (Method::PUT, "/v1/admin/tiers/t1", "tokens_month", format!(r#"{{"hour":1,"tokens_month":{v}}}"#)),
            (Method::PUT, "/v1/admin/tenants/abs/limits", "hour", format!(r#"{{"hour":{v}}}"#)),
            (Method::PUT, "/v1/admin/tenants/abs/limits", "storage_bytes", format!(r#"{{"storage_bytes":{v}}}"#)),
            (Method::PUT, "/v1/admin/tenants/abs/overrides", "hour", format!(r#"{{"limits":{{"hour":{v}}}}}"#)),
            (Method::PUT, "/v1/admin/tenants/abs/overrides", "duration_s", format!(r#"{{"limits":{{"hour":5}},"duration_s":{v}}}"#)),
            (Method::PUT, "/v1/admin/tenants/abs/storage", "used_bytes", format!(r#"{{"used_bytes":{v}}}"#)),
            (Method::PUT, "/v1/admin/test-clock", "offset_ms", format!(r#"{{"offset_ms":{v}}}"#)),
        ] {
            // Some values are valid for some fields (-1 for the clock offset).
            if path.ends_with("test-clock") && *v == "-1" {
                continue;
            }
            let r = s.raw_admin(method, path, &body).await;
            assert_400(&r, &format!("{path} {body}"), field);
        }
    }
    for (path, body) in [
        ("/v1/admin/tiers/t1", r#"{}"#),
        ("/v1/admin/tiers/t1", r#"{"hourly":5}"#),
        ("/v1/admin/tiers/t1", r#"{"hour":1,"reserved_pool":"a b"}"#),
        ("/v1/admin/tenants/abs/limits", r#"{}"#),
        ("/v1/admin/tenants/abs/limits", r#"{"cost_weight":0}"#),
        ("/v1/admin/tenants/abs/limits", r#"{"cost_weight":1001}"#),
        ("/v1/admin/tenants/abs/overrides", r#"{"limits":{"hour":5},"duration_s":0}"#),
        ("/v1/admin/tenants/abs/overrides", r#"{"limits":{"hour":5},"until":"2000-01-01T00:00:00Z"}"#),
        ("/v1/admin/tenants/abs/overrides", r#"{"limits":{"hour":5},"until":"not a date"}"#),
        ("/v1/admin/tenants/abs/overrides", r#"{"limits":{}}"#),
        ("/v1/admin/tenants/abs/mode", r#"{"shadow":"yes"}"#),
        ("/v1/admin/tenants/abs/mode", r#"{"reserved_pool":"{t:x}"}"#),
        ("/v1/admin/tenants/abs/tier", r#"{"tier":"does-not-exist"}"#),
        ("/v1/admin/tenants/abs/tier", r#"{"tier":5}"#),
        ("/v1/admin/default-tier", r#"{"tier":"nope"}"#),
        ("/v1/admin/tenants/abs/limits", r#"{"hour":1,"reason":5}"#),
    ] {
        let r = s.raw_admin(Method::PUT, path, body).await;
        assert_400(&r, &format!("{path} {body}"), "");
    }
    for q in ["limit=0", "limit=-1", "limit=18446744073709551616", "limit=abc", "since=yesterday", "until=2025-13-45"] {
        let r = s.admin(Method::GET, &format!("/v1/admin/audit?{q}"), None).await;
        assert_400(&r, q, "");
    }
    for q in ["from=2025-01-01&to=2027-01-01", "from=nope", "from=2025-02-30", "tenant={t:x}", "format=xml"] {
        let r = s.admin(Method::GET, &format!("/v1/admin/usage?{q}"), None).await;
        assert_400(&r, q, "");
    }
    assert_eq!(s.admin(Method::GET, "/v1/admin/tiers", None).await.text, tiers_before, "the tiers did not change");
    let view = s.admin(Method::GET, "/v1/admin/tenants/abs", None).await.json;
    assert_eq!(view["limits"], view_before["limits"], "the tenant did not change");
    // The tenant is still limited by its tier: never unlimited.
    let r = s.check(json!({"tenant": "abs"})).await;
    assert_eq!(r.json["windows"][0]["limit"], 100, "{}", r.text);
}
