//! The Istio manifests under envoy/istio/: the WasmPlugin validates against
//! Istio's CRD schema (../shared/schemas/istio-wasmplugin-crd.yaml), passes
//! the CRD's CEL rules that matter here, carries a plugin config the filter
//! compiles (the same policies as envoy/envoy.yaml), and names a quota
//! cluster that the DestinationRule beside it configures for HTTP/2.

use serde::Deserialize;
use serde_json::{json, Value};
use sluice_tests::envoy::{load_yaml, plugin_config_of};
use sluice_tests::paths::{repo_root, shared_dir};
use std::path::PathBuf;

const WASMPLUGIN_API: &str = "extensions.istio.io/v1alpha1";

/// Every YAML document in envoy/istio/*.yaml, with its file name.
fn manifests() -> Vec<(String, Value)> {
    let dir = repo_root().join("envoy").join("istio");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v =
                Value::deserialize(doc).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            if !v.is_null() {
                docs.push((name.clone(), v));
            }
        }
    }
    docs
}

fn of_kind(kind: &str) -> Vec<(String, Value)> {
    manifests()
        .into_iter()
        .filter(|(_, d)| d.get("kind").and_then(Value::as_str) == Some(kind))
        .collect()
}

fn the_wasmplugin() -> (String, Value) {
    let mut plugins = of_kind("WasmPlugin");
    assert_eq!(
        plugins.len(),
        1,
        "expected exactly one WasmPlugin under envoy/istio/"
    );
    plugins.remove(0)
}

/// The CRD's `openAPIV3Schema` for v1alpha1, made a JSON Schema for a whole
/// manifest: `apiVersion`, `kind` and `metadata` (implicit in Kubernetes) are
/// added, and every object with declared properties rejects undeclared ones
/// unless it preserves unknown fields. That is what `kubectl apply` does with
/// strict field validation (its default), which turns a misspelt field into an
/// error instead of silently dropping it.
fn wasmplugin_schema() -> Value {
    let path = shared_dir()
        .join("schemas")
        .join("istio-wasmplugin-crd.yaml");
    assert!(
        path.is_file(),
        "the Istio WasmPlugin CRD is missing: expected {}",
        path.display()
    );
    let crd = load_yaml(&path);
    let version = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .and_then(|vs| {
            vs.iter()
                .find(|v| v.get("name").and_then(Value::as_str) == Some("v1alpha1"))
        })
        .unwrap_or_else(|| panic!("{}: no v1alpha1 version", path.display()));
    let mut schema = version
        .pointer("/schema/openAPIV3Schema")
        .cloned()
        .unwrap_or_else(|| panic!("{}: v1alpha1 has no openAPIV3Schema", path.display()));
    let props = schema
        .get_mut("properties")
        .and_then(Value::as_object_mut)
        .expect("openAPIV3Schema has properties");
    props.insert(
        "apiVersion".into(),
        json!({"type": "string", "const": WASMPLUGIN_API}),
    );
    props.insert(
        "kind".into(),
        json!({"type": "string", "const": "WasmPlugin"}),
    );
    props.insert(
        "metadata".into(),
        json!({"type": "object", "required": ["name"]}),
    );
    schema["required"] = json!(["apiVersion", "kind", "metadata", "spec"]);
    strict(&mut schema);
    schema
}

fn strict(schema: &mut Value) {
    let Value::Object(m) = schema else { return };
    let preserves = m.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if m.contains_key("properties") && !m.contains_key("additionalProperties") && !preserves {
        m.insert("additionalProperties".into(), Value::Bool(false));
    }
    if let Some(Value::Object(props)) = m.get_mut("properties") {
        props.values_mut().for_each(strict);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(v) = m.get_mut(key) {
            strict(v);
        }
    }
    for key in ["anyOf", "allOf", "oneOf"] {
        if let Some(Value::Array(vs)) = m.get_mut(key) {
            vs.iter_mut().for_each(strict);
        }
    }
}

fn schema_errors(manifest: &Value) -> Vec<String> {
    let schema = wasmplugin_schema();
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("the CRD schema does not compile: {e}"));
    validator
        .iter_errors(manifest)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The CRD's CEL rules (`x-kubernetes-validations`) that JSON Schema cannot
/// express and that our manifest could break.
fn cel_rule_errors(spec: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let url = spec.get("url").and_then(Value::as_str).unwrap_or("");
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if !["", "http", "https", "oci", "file"].contains(&scheme) {
        errors.push(format!(
            "url must have schema one of [http, https, file, oci]: {url}"
        ));
    }
    let targets = ["selector", "targetRef", "targetRefs"]
        .iter()
        .filter(|k| spec.get(**k).is_some())
        .count();
    if targets > 1 {
        errors.push("only one of targetRefs or selector can be set".into());
    }
    if let Some(Value::Object(labels)) = spec.pointer("/selector/matchLabels") {
        for (k, v) in labels {
            if k.is_empty() || k.contains('*') || v.as_str().is_some_and(|v| v.contains('*')) {
                errors.push(format!(
                    "selector.matchLabels: empty key or wildcard in {k}={v}"
                ));
            }
        }
    }
    errors
}

#[test]
fn the_wasmplugin_validates_against_the_istio_crd_schema() {
    let (file, plugin) = the_wasmplugin();
    let errors = schema_errors(&plugin);
    assert!(
        errors.is_empty(),
        "{file} does not match the WasmPlugin CRD schema:\n{}",
        errors.join("\n")
    );
    let spec = plugin.get("spec").expect("spec");
    let errors = cel_rule_errors(spec);
    assert!(
        errors.is_empty(),
        "{file} breaks the CRD's validation rules:\n{}",
        errors.join("\n")
    );
}

#[test]
fn the_strict_schema_rejects_misspelt_fields_and_bad_enums() {
    // Guards the check above against passing vacuously.
    let (_, plugin) = the_wasmplugin();
    let mut misspelt = plugin.clone();
    misspelt["spec"]["pluginconfig"] = json!({});
    assert!(
        !schema_errors(&misspelt).is_empty(),
        "a misspelt spec field passed the schema"
    );
    let mut bad_phase = plugin.clone();
    bad_phase["spec"]["phase"] = json!("QUOTA");
    assert!(
        !schema_errors(&bad_phase).is_empty(),
        "an unknown phase passed the schema"
    );
    let mut no_url = plugin;
    no_url["spec"]
        .as_object_mut()
        .expect("spec object")
        .remove("url");
    assert!(
        !schema_errors(&no_url).is_empty(),
        "a WasmPlugin without url passed the schema"
    );
}

#[test]
fn the_wasmplugin_plugin_config_compiles_with_the_filter() {
    let (file, plugin) = the_wasmplugin();
    let config = plugin
        .pointer("/spec/pluginConfig")
        .unwrap_or_else(|| panic!("{file}: no spec.pluginConfig"));
    let bytes = serde_json::to_vec(config).expect("serialize");
    if let Err(e) = sluice_filter::config::compile(&bytes) {
        panic!("{file}: the filter rejects spec.pluginConfig: {e}");
    }
}

#[test]
fn the_wasmplugin_carries_the_policies_of_envoy_yaml() {
    let (file, plugin) = the_wasmplugin();
    let mut istio = plugin
        .pointer("/spec/pluginConfig")
        .cloned()
        .expect("spec.pluginConfig");
    let mut local = plugin_config_of(&load_yaml(&repo_root().join("envoy/envoy.yaml")));
    // Only the quota and queue clusters' names differ between Envoy and Istio.
    for key in ["quota_cluster", "quota_authority", "queue_cluster"] {
        istio.as_object_mut().expect("object").remove(key);
        local.as_object_mut().expect("object").remove(key);
    }
    assert_eq!(
        istio, local,
        "{file}: pluginConfig differs from envoy/envoy.yaml's plugin config"
    );
}

#[test]
fn the_quota_cluster_is_the_destination_rule_host_over_http2() {
    let (file, plugin) = the_wasmplugin();
    let cluster = plugin
        .pointer("/spec/pluginConfig/quota_cluster")
        .and_then(Value::as_str)
        .expect("quota_cluster");
    // Istio names a mesh service's cluster `outbound|<port>|<subset>|<fqdn>`.
    let parts: Vec<&str> = cluster.split('|').collect();
    assert!(
        parts.len() == 4
            && parts[0] == "outbound"
            && parts[1].parse::<u16>().is_ok()
            && !parts[3].is_empty(),
        "{file}: quota_cluster {cluster:?} is not an Istio outbound cluster name"
    );
    let host = parts[3];

    let rules = of_kind("DestinationRule");
    let (dr_file, rule) = rules
        .iter()
        .find(|(_, r)| r.pointer("/spec/host").and_then(Value::as_str) == Some(host))
        .unwrap_or_else(|| panic!("no DestinationRule under envoy/istio/ has host {host}"));
    let api = rule.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    assert!(
        api.starts_with("networking.istio.io/"),
        "{dr_file}: apiVersion {api}"
    );
    assert_eq!(
        rule.pointer("/spec/trafficPolicy/connectionPool/http/h2UpgradePolicy")
            .and_then(Value::as_str),
        Some("UPGRADE"),
        "{dr_file}: the quota service must be reached over HTTP/2"
    );
    let authority = plugin
        .pointer("/spec/pluginConfig/quota_authority")
        .and_then(Value::as_str);
    assert_eq!(
        authority,
        Some(host),
        "{file}: quota_authority should be the service host"
    );
}
