//! The Grafana dashboard and the Prometheus alert rules in ops/ only use
//! metrics that a real running service or Envoy exports.

mod common;

use common::*;
use serde_json::Value;
use sluice_tests::paths::repo_root;
use std::collections::BTreeSet;

/// Every `sluice_*` metric name in a PromQL expression.
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr.get(i..).and_then(|r| r.find("sluice_")) {
        let start = i + pos;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start + expr[start..].bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
        if boundary {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
}

fn alert_exprs() -> Vec<(String, String)> {
    let path = repo_root().join("ops/prometheus/alerts.yaml");
    let doc: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut out = Vec::new();
    for g in doc["groups"].as_array().expect("groups") {
        assert!(g["name"].is_string());
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("every rule is an alert with a name");
            assert!(r["labels"]["severity"].is_string(), "{name}: severity label");
            assert!(r["annotations"]["summary"].is_string(), "{name}: summary");
            out.push((name.to_string(), r["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

fn dashboard_exprs() -> Vec<String> {
    let path = repo_root().join("ops/grafana/sluice-dashboard.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in doc["panels"].as_array().expect("panels") {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!targets.is_empty());
        for t in targets {
            out.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    out
}

#[test]
fn the_alert_rules_cover_utilisation_queue_depth_wait_and_rejection_rate() {
    let alerts = alert_exprs();
    let find = |needle: &str| alerts.iter().find(|(_, e)| e.contains(needle)).unwrap_or_else(|| panic!("no alert on {needle}"));
    assert!(find("sluice_tenant_quota_utilization_ratio").1.contains("> 0.9"));
    assert!(find("sluice_queue_depth_total").1.contains('>'));
    assert!(find("sluice_queue_wait_seconds_bucket").1.contains("> 60"));
    assert!(find("result=\"denied\"").1.contains("> 0.05"));
}

#[test]
fn every_metric_the_dashboard_and_alerts_reference_is_exported_by_the_service_or_envoy() {
    let mut referenced = BTreeSet::new();
    for (_, e) in alert_exprs() {
        metric_names(&e, &mut referenced);
    }
    for e in dashboard_exprs() {
        metric_names(&e, &mut referenced);
    }
    assert!(referenced.len() > 20, "{referenced:?}");

    let s = Stack::with(plugin_config(serde_json::json!({"timeout_ms": 2000})), 1);
    s.set_limits("dash", serde_json::json!({"hour": 1}));
    assert_eq!(s.get("/v1/models", "dash").status, 200);
    assert_eq!(s.get("/v1/models", "dash").status, 429);
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for text in [s.service.metrics(), s.envoy.admin_get("/stats/prometheus").text()] {
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            exported.insert(name.to_string());
        }
    }
    let missing: Vec<&String> = referenced.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(missing.is_empty(), "referenced but not exported: {missing:?}");
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let mut out = BTreeSet::new();
    metric_names("sum(rate(sluice_a_total{x=\"y\"}[5m])) / max(my_sluice_b) + sluice_c", &mut out);
    assert_eq!(out.into_iter().collect::<Vec<_>>(), ["sluice_a_total", "sluice_c"]);
}
