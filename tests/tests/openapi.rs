//! docs/openapi.yaml is true: every documented operation is called on a real
//! service (binary + Redis) with the document's examples and must succeed
//! with a documented status whose schema the answer matches; secured
//! operations answer a documented 401 without a token; and the routes the
//! service's source registers are exactly the documented ones, so a route
//! added without documentation fails here.

use serde_json::{json, Value};
use sluice_tests::http;
use sluice_tests::paths::repo_root;
use sluice_tests::{Redis, Service, ServiceOpts};
use std::collections::BTreeSet;
use std::path::Path;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

fn load_doc() -> Value {
    let path = repo_root().join("docs/openapi.yaml");
    serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// (path, method) in document order (JSON maps here are sorted; YAML's are not).
fn operation_order() -> Vec<(String, String)> {
    let path = repo_root().join("docs/openapi.yaml");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut out = Vec::new();
    for (p, item) in doc["paths"].as_mapping().unwrap() {
        for k in item.as_mapping().unwrap().keys() {
            let k = k.as_str().unwrap();
            if METHODS.contains(&k) {
                out.push((p.as_str().unwrap().to_string(), k.to_string()));
            }
        }
    }
    out
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("unresolved $ref {r}")),
        None => v,
    }
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

// ------------------------------------------------------------ source scan

/// `pub const NAME: &str = "value";` anywhere in the service or wire crates.
fn const_value(name: &str, sources: &[(String, String)]) -> Option<String> {
    let needle = format!("const {name}: &str = \"");
    sources.iter().find_map(|(_, text)| {
        let start = text.find(&needle)? + needle.len();
        let end = text[start..].find('"')?;
        Some(text[start..start + end].to_string())
    })
}

/// The text of a call's arguments: from after `open` to its matching `)`.
fn call_args(text: &str, open: usize) -> &str {
    let mut depth = 1;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..open + i];
                }
            }
            _ => {}
        }
    }
    &text[open..]
}

fn first_arg_path(args: &str, sources: &[(String, String)]) -> String {
    let first = args.split(',').next().unwrap_or("").trim();
    if let Some(lit) = first.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return lit.to_string();
    }
    let name = first.rsplit("::").next().unwrap_or(first);
    const_value(name, sources).unwrap_or_else(|| panic!("route path {first:?} is neither a literal nor a known const"))
}

fn methods_in(chain: &str) -> Vec<String> {
    let mut out = Vec::new();
    for m in METHODS {
        let pat = format!("{m}(");
        let mut from = 0;
        while let Some(p) = chain[from..].find(&pat) {
            let at = from + p;
            let before = chain[..at].chars().last();
            if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
                out.push(m.to_uppercase());
            }
            from = at + pat.len();
        }
    }
    out
}

/// Every (method, full path) registered with `.route(..)` in the service's
/// router (service/src/http.rs) and the modules it nests with
/// `.nest("<prefix>", crate::<module>::router(..))`, prefixes applied. (The
/// demo upstream's router in demo.rs is another server, not this API.)
fn source_routes() -> BTreeSet<(String, String)> {
    let mut sources = Vec::new();
    for dir in ["service/src", "wire/src"] {
        collect_rs(&repo_root().join(dir), &mut sources);
    }
    let mut prefixes: Vec<(String, String)> = Vec::new();
    for (_, text) in &sources {
        let mut from = 0;
        while let Some(p) = text[from..].find(".nest(") {
            let open = from + p + ".nest(".len();
            let args = call_args(text, open);
            let prefix = first_arg_path(args, &sources);
            if let Some(m) = args.split("crate::").nth(1).and_then(|r| r.split("::").next()) {
                prefixes.push((m.to_string(), prefix));
            }
            from = open;
        }
    }
    let mut out = BTreeSet::new();
    for (file, text) in sources.iter().filter(|(f, _)| f.starts_with("service/src")) {
        let module = Path::new(file).file_stem().unwrap().to_string_lossy().into_owned();
        let nested = prefixes.iter().find(|(m, _)| *m == module).map(|(_, p)| p.clone());
        let prefix = match (module.as_str(), nested) {
            ("http", _) => String::new(),
            (_, Some(p)) => p,
            _ => continue,
        };
        let mut from = 0;
        while let Some(p) = text[from..].find(".route(") {
            let open = from + p + ".route(".len();
            let args = call_args(text, open);
            let path = format!("{prefix}{}", first_arg_path(args, &sources));
            let chain = args.split_once(',').map_or("", |(_, c)| c);
            let methods = methods_in(chain);
            assert!(!methods.is_empty(), "{file}: route {path} with no method in {chain:?}");
            for m in methods {
                out.insert((m, path.clone()));
            }
            from = open;
        }
    }
    out
}

fn collect_rs(dir: &Path, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(repo_root()).unwrap().to_string_lossy().into_owned();
            out.push((rel, std::fs::read_to_string(&p).unwrap()));
        }
    }
}

#[test]
fn the_document_lists_exactly_the_routes_the_service_registers() {
    let doc = load_doc();
    let documented = documented(&doc);
    let served = source_routes();
    assert!(served.contains(&("POST".to_string(), "/v1/check".to_string())), "{served:?}");
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(undocumented.is_empty(), "routes missing from docs/openapi.yaml: {undocumented:?}");
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(unserved.is_empty(), "documented routes the service does not register: {unserved:?}");
}

#[test]
fn the_source_scan_finds_routes_nests_and_methods() {
    assert_eq!(methods_in(" get(a).put(b).delete(c)"), ["GET", "PUT", "DELETE"]);
    assert_eq!(methods_in(" forget(a)"), Vec::<String>::new());
    let text = "x.route(\"/a\", post(f))";
    assert_eq!(call_args(text, "x.route(".len()), "\"/a\", post(f)");
}

// ------------------------------------------------------------ live calls

fn validate(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let wrapped = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "allOf": [schema],
        "components": doc["components"],
    });
    let validator = jsonschema::validator_for(&wrapped).unwrap_or_else(|e| panic!("{what}: bad schema: {e}"));
    let errors: Vec<String> = validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{what}: answer does not match the schema: {errors:?}\n{instance}");
}

fn param_example(doc: &Value, p: &Value) -> Option<(String, String, String)> {
    let p = resolve(doc, p);
    let ex = p.get("example")?;
    let value = match ex {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some((p["in"].as_str()?.to_string(), p["name"].as_str()?.to_string(), value))
}

struct Call {
    method: String,
    path: String,
    body: Option<Vec<u8>>,
}

fn build_call(doc: &Value, path: &str, item: &Value, method: &str, op: &Value) -> Call {
    let mut url = path.to_string();
    let mut query = Vec::new();
    let params = item["parameters"].as_array().into_iter().flatten().chain(op["parameters"].as_array().into_iter().flatten());
    for p in params {
        if let Some((place, name, value)) = param_example(doc, p) {
            match place.as_str() {
                "path" => url = url.replace(&format!("{{{name}}}"), &value),
                "query" => query.push(format!("{name}={value}")),
                _ => {}
            }
        }
    }
    assert!(!url.contains('{'), "{method} {path}: a path parameter has no example");
    if !query.is_empty() {
        url = format!("{url}?{}", query.join("&"));
    }
    let body = op.pointer("/requestBody/content/application~1json/example").map(|b| serde_json::to_vec(b).unwrap());
    if op.pointer("/requestBody/required") == Some(&Value::Bool(true)) {
        assert!(body.is_some(), "{method} {path}: the request body has no example");
    }
    Call { method: method.to_uppercase(), path: url, body }
}

fn check_answer(doc: &Value, op: &Value, what: &str, r: &http::Response) {
    let status = r.status.to_string();
    let resp = op["responses"]
        .get(&status)
        .map(|v| resolve(doc, v))
        .unwrap_or_else(|| panic!("{what}: status {status} is not documented: {}", r.text()));
    let ctype = r.header("content-type").unwrap_or("").to_string();
    match resp.get("content").and_then(Value::as_object) {
        None => assert!(r.body.is_empty(), "{what}: {status} documents no body, got {}", r.text()),
        Some(content) => {
            let (mt, media) = content
                .iter()
                .find(|(mt, _)| ctype.starts_with(mt.as_str()))
                .unwrap_or_else(|| panic!("{what}: content-type {ctype:?} not documented for {status}"));
            if mt == "application/json" {
                validate(doc, &media["schema"], &r.json(), what);
            }
        }
    }
}

#[test]
fn every_documented_operation_answers_as_documented_on_a_real_service() {
    let doc = load_doc();
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), ServiceOpts::default());
    let auth = format!("Bearer {}", svc.admin_token().unwrap());
    let mut ops = Vec::new();
    for (path, m) in operation_order() {
        let item = doc["paths"][&path].clone();
        let op = item[&m].clone();
        ops.push((path, item, m, op));
    }
    // Deletes last, so what they delete was created by the operations before.
    ops.sort_by_key(|(_, _, m, _)| m == "delete");
    // A decision first, so usage, audit and the tenant have data.
    let r = http::send_json(svc.addr(), "POST", "/v1/check", &[], &json!({"tenant": "acme"})).unwrap();
    assert_eq!(r.status, 200);
    let mut called = 0;
    for (path, item, m, op) in &ops {
        let call = build_call(&doc, path, item, m, op);
        let what = format!("{} {}", call.method, call.path);
        let secured = op.get("security").and_then(Value::as_array).is_none_or(|s| !s.is_empty());
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        if secured {
            headers.push(("authorization", auth.as_str()));
            headers.push(("x-admin-actor", "openapi-test"));
        }
        let r = http::request(svc.addr(), &call.method, &call.path, &headers, call.body.as_deref(), http::DEFAULT_TIMEOUT).unwrap();
        assert!((200..300).contains(&r.status), "{what}: the documented example must succeed, got {} {}", r.status, r.text());
        check_answer(&doc, op, &what, &r);
        if secured {
            let r = http::request(svc.addr(), &call.method, &call.path, &headers[..1], call.body.as_deref(), http::DEFAULT_TIMEOUT).unwrap();
            assert_eq!(r.status, 401, "{what} without a token");
            check_answer(&doc, op, &format!("{what} (no token)"), &r);
        }
        called += 1;
    }
    assert_eq!(called, documented(&doc).len());
    // Error answers match the documented error shape too.
    let r = http::send_json(svc.addr(), "POST", "/v1/check", &[], &json!({"tenant": "a b"})).unwrap();
    check_answer(&doc, &doc["paths"]["/v1/check"]["post"], "bad check", &r);
    assert_eq!(r.status, 400);
}

#[test]
#[should_panic(expected = "does not match the schema")]
fn an_answer_that_does_not_match_its_schema_fails() {
    let doc = load_doc();
    validate(&doc, &json!({"$ref": "#/components/schemas/Error"}), &json!({"error": 5}), "probe");
}
