//! Every Envoy config we ship, and the config the e2e harness renders from
//! `envoy/envoy.yaml`, passes `envoy --mode validate`.
//!
//! Validate mode loads the wasm module in V8 and runs the filter's
//! `on_configure` with the plugin config, so a plugin config the filter
//! rejects fails validation (checked below): these tests check each shipped
//! plugin config against the real filter, not only Envoy's schema.
//! Envoy resolves a relative wasm path against its working directory, so
//! validation runs from the repository root, as `make run` does.

use serde_json::{json, Value};
use sluice_tests::envoy::{self, load_yaml, plugin_config_of, render_config, EnvoyOpts};
use sluice_tests::paths::{envoy_bin, repo_root, sluice_wasm};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Validation {
    ok: bool,
    output: String,
}

fn envoy_validate(config: &Path) -> Validation {
    let out = Command::new(envoy_bin())
        .current_dir(repo_root())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config)
        .output()
        .unwrap_or_else(|e| panic!("run envoy --mode validate: {e}"));
    Validation {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Envoy bootstraps under envoy/: YAML/JSON files with `static_resources`.
fn shipped_bootstraps() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![repo_root().join("envoy")];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("read a dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "yml" | "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            // Multi-document files (manifests) are not bootstraps; skip what does not parse as one.
            if let Ok(Value::Object(top)) = serde_yaml_ng::from_str::<Value>(&text) {
                if top.contains_key("static_resources") {
                    found.push(path);
                }
            }
        }
    }
    found.sort();
    found
}

/// Every `vm_config.code.local.filename` in a config, with a pointer to it.
fn wasm_filenames(v: &Value, pointer: String, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            if let Some(f) = v
                .pointer("/vm_config/code/local/filename")
                .and_then(Value::as_str)
            {
                out.push((
                    format!("{pointer}/vm_config/code/local/filename"),
                    f.to_string(),
                ));
            }
            for (k, child) in m {
                wasm_filenames(
                    child,
                    format!("{pointer}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                wasm_filenames(child, format!("{pointer}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_envoy_bootstrap_under_envoy_passes_envoy_validate() {
    let wasm = sluice_wasm();
    let configs = shipped_bootstraps();
    let names: Vec<String> = configs
        .iter()
        .map(|p| {
            p.strip_prefix(repo_root())
                .unwrap_or(p)
                .display()
                .to_string()
        })
        .collect();
    for expected in ["envoy/envoy.yaml", "envoy/envoy.docker.yaml"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not found among Envoy configs {names:?}"
        );
    }

    let scratch = tempfile::tempdir().expect("temp dir");
    let mut failures = Vec::new();
    for (path, name) in configs.iter().zip(&names) {
        let mut config = load_yaml(path);
        let mut files = Vec::new();
        wasm_filenames(&config, String::new(), &mut files);
        assert!(
            !files.is_empty(),
            "{name} loads no wasm module: every shipped config runs the Sluice filter"
        );

        // A relative module path must resolve from the repository root (where
        // `make run` starts Envoy). An absolute one that does not exist here is
        // a container path (the compose file mounts the module there), so that
        // config is validated with SLUICE_WASM put in its place.
        let mut substituted = false;
        for (pointer, file) in &files {
            let p = Path::new(file);
            if p.is_absolute() && !p.exists() {
                *config.pointer_mut(pointer).expect("pointer from the walk") =
                    Value::String(wasm.display().to_string());
                substituted = true;
            } else {
                assert!(
                    repo_root().join(p).is_file(),
                    "{name}: wasm module {file} does not exist relative to the repository root; run `make wasm`"
                );
            }
        }
        let to_validate = if substituted {
            let copy = scratch
                .path()
                .join(name.replace('/', "_"))
                .with_extension("json");
            std::fs::write(
                &copy,
                serde_json::to_vec_pretty(&config).expect("serialize"),
            )
            .expect("write config copy");
            copy
        } else {
            path.clone()
        };
        let v = envoy_validate(&to_validate);
        if !v.ok {
            failures.push(format!("{name}:\n{}", v.output));
        }
    }
    assert!(
        failures.is_empty(),
        "envoy --mode validate failed:\n{}",
        failures.join("\n")
    );
}

fn test_opts() -> EnvoyOpts {
    let mut opts = EnvoyOpts::new(
        envoy::shipped_plugin_config(),
        "127.0.0.1:18081".parse().unwrap(),
        "127.0.0.1:18082".parse().unwrap(),
    );
    opts.extra_clusters.push(json!({
        "name": "second_upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "second_upstream", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18083}}}}]}]}
    }));
    opts.extra_routes.push(json!({
        "name": "extra_route",
        "match": {"prefix": "/extra/"},
        "route": {"cluster": "second_upstream"},
        "metadata": {"filter_metadata": {"sluice": {"policy": "llm"}}}
    }));
    opts
}

fn write_rendered(opts: &EnvoyOpts, dir: &Path) -> PathBuf {
    let config = render_config(opts, 18000, 18001);
    let path = dir.join("rendered.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&config).expect("serialize"),
    )
    .expect("write rendered config");
    path
}

#[test]
fn the_config_the_e2e_harness_renders_passes_envoy_validate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_rendered(&test_opts(), dir.path());
    let v = envoy_validate(&path);
    assert!(
        v.ok,
        "the rendered test config failed validation:\n{}",
        v.output
    );
}

#[test]
fn envoy_validate_fails_when_the_filter_rejects_its_plugin_config() {
    // Proves validation runs the filter's on_configure: an unknown field is
    // valid for Envoy (the config is an opaque string) but not for Sluice.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut opts = test_opts();
    opts.plugin_config = json!({"quota_cluster": "sluice_quota", "no_such_field": 1});
    let v = envoy_validate(&write_rendered(&opts, dir.path()));
    assert!(
        !v.ok,
        "envoy accepted a plugin config the filter must reject:\n{}",
        v.output
    );
    assert!(
        v.output.contains("Unable to create Wasm plugin") || v.output.contains("failed to load"),
        "validation failed, but not because the plugin refused its config:\n{}",
        v.output
    );
}

#[test]
fn the_shipped_plugin_configs_compile_with_the_filter() {
    for file in ["envoy/envoy.yaml", "envoy/envoy.docker.yaml"] {
        let config = plugin_config_of(&load_yaml(&repo_root().join(file)));
        let bytes = serde_json::to_vec(&config).expect("serialize");
        if let Err(e) = sluice_filter::config::compile(&bytes) {
            panic!("{file}: the filter rejects its plugin config: {e}");
        }
    }
}

#[test]
fn the_docker_config_matches_envoy_yaml_in_plugin_config_and_routes() {
    let local = load_yaml(&repo_root().join("envoy/envoy.yaml"));
    let docker = load_yaml(&repo_root().join("envoy/envoy.docker.yaml"));
    assert_eq!(
        plugin_config_of(&local),
        plugin_config_of(&docker),
        "the two configs' plugin configs differ"
    );
    let routes =
        "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config";
    assert_eq!(
        local.pointer(routes),
        docker.pointer(routes),
        "the two configs' routes differ"
    );
}

#[test]
fn the_compose_file_mounts_the_docker_config_and_builds_the_service_image() {
    // No Docker engine here: check what `docker compose up` would need from the repository.
    let envoy_dir = repo_root().join("envoy");
    let compose = load_yaml(&envoy_dir.join("docker-compose.yaml"));
    let services = compose
        .get("services")
        .and_then(Value::as_object)
        .expect("services");
    for name in ["redis", "sluice", "demo-upstream", "envoy"] {
        assert!(
            services.contains_key(name),
            "docker-compose.yaml has no service {name}"
        );
    }
    let envoy = &services["envoy"];
    let image = envoy.get("image").and_then(Value::as_str).unwrap_or("");
    assert!(
        image.starts_with("envoyproxy/envoy:v1.40"),
        "envoy image {image}"
    );
    let volumes: Vec<&str> = envoy
        .get("volumes")
        .and_then(Value::as_array)
        .expect("envoy volumes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        volumes.contains(&"./envoy.docker.yaml:/etc/envoy/envoy.yaml:ro"),
        "envoy volumes {volumes:?}"
    );
    assert!(
        volumes.contains(&"../dist/sluice.wasm:/etc/envoy/sluice.wasm:ro"),
        "envoy volumes {volumes:?}"
    );

    let build = services["sluice"]
        .get("build")
        .expect("the sluice service is built");
    let context = build
        .get("context")
        .and_then(Value::as_str)
        .expect("build.context");
    let dockerfile = build
        .get("dockerfile")
        .and_then(Value::as_str)
        .expect("build.dockerfile");
    let dockerfile = envoy_dir.join(context).join(dockerfile);
    assert!(dockerfile.is_file(), "{} is missing", dockerfile.display());
    let text = std::fs::read_to_string(&dockerfile).expect("read the Dockerfile");
    assert!(
        text.contains("-p sluice-service"),
        "the Dockerfile must build the sluice-service package"
    );
}

fn routes_of(config: &Value) -> Vec<Value> {
    config
        .pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes")
        .and_then(Value::as_array)
        .cloned()
        .expect("routes")
}

fn seconds(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a duration like \"65s\", got {v}"))
}

#[test]
fn the_shipped_route_tables_send_x_sluice_queue_to_the_queue_cluster_before_anything_else() {
    for file in ["envoy/envoy.yaml", "envoy/envoy.docker.yaml"] {
        let config = load_yaml(&repo_root().join(file));
        let routes = routes_of(&config);
        let first = &routes[0];
        assert_eq!(
            first.pointer("/match/headers/0/name").and_then(Value::as_str),
            Some(sluice_wire::QUEUE_HEADER),
            "{file}: the first route must match the filter's queue header: {first}"
        );
        assert_eq!(first.pointer("/match/headers/0/present_match"), Some(&json!(true)), "{file}");
        assert_eq!(first.pointer("/match/prefix"), Some(&json!("/")), "{file}: every path can overflow");
        assert_eq!(first.pointer("/route/cluster").and_then(Value::as_str), Some(envoy::QUEUE_CLUSTER), "{file}");
        // The default max wait (30 s) plus a dispatch (30 s) must fit.
        let timeout = seconds(first.pointer("/route/timeout").expect("the queue route sets a timeout"));
        assert!(timeout >= 60.0, "{file}: queue route timeout {timeout}s");
        let results = routes
            .iter()
            .find(|r| r.pointer("/match/prefix") == Some(&json!("/v1/queue/requests/")))
            .unwrap_or_else(|| panic!("{file}: no route for async results"));
        assert_eq!(results.pointer("/route/cluster").and_then(Value::as_str), Some(envoy::QUEUE_CLUSTER));

        let clusters = config.pointer("/static_resources/clusters").and_then(Value::as_array).expect("clusters");
        let queue = clusters
            .iter()
            .find(|c| c["name"] == envoy::QUEUE_CLUSTER)
            .unwrap_or_else(|| panic!("{file}: no cluster {}", envoy::QUEUE_CLUSTER));
        assert!(
            queue.to_string().contains("http2_protocol_options"),
            "{file}: the queue cluster speaks h2c, so a client that leaves resets its stream"
        );
        let plugin = plugin_config_of(&config);
        assert_eq!(plugin["queue_cluster"], envoy::QUEUE_CLUSTER, "{file}");
        let exempt: Vec<&str> = plugin["exempt_paths"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(exempt.contains(&"/v1/queue/requests/*"), "{file}: reading a result costs no quota");
    }
}

#[test]
fn the_shipped_upstreams_files_pass_check_config_and_name_every_policy_upstream() {
    let plugin = plugin_config_of(&load_yaml(&repo_root().join("envoy/envoy.yaml")));
    let wanted: Vec<String> = plugin["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["upstream"].as_str().map(str::to_string))
        .collect();
    assert!(!wanted.is_empty(), "the shipped config has a queued route");
    for file in ["envoy/upstreams.json", "envoy/upstreams.docker.json"] {
        let path = repo_root().join(file);
        let out = sluice_tests::service::run_sluice(&["serve", "--check-config", "--upstreams", path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file}: {text}{}", String::from_utf8_lossy(&out.stderr));
        for up in &wanted {
            assert!(text.contains(&format!("  {up}: http://")), "{file} must define upstream {up}:\n{text}");
        }
    }
}
