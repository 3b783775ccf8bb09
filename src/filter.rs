//! The proxy-wasm adapter: the only module that talks to the host.
//!
//! Each request is a small state machine ([`Phase`]) advanced by host
//! callbacks. Every path out of `AwaitingQuota` either resumes the request or
//! sends a local reply, so no request is ever left paused.

use crate::config::{self, CompiledConfig};
use crate::decision::{self, CalloutFailure, Outcome, OWNED_RESPONSE_HEADERS};
use crate::pairs;
use crate::tenant::{self, TenantError};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use sluice_wire::{CheckRequest, CHECK_PATH};
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Envoy stat names (exported with Envoy's `wasmcustom.` prefix).
const METRIC_NAMES: [&str; 8] = [
    "sluice.allowed",
    "sluice.denied",
    "sluice.failed_open",
    "sluice.failed_closed",
    "sluice.missing_tenant",
    "sluice.invalid_tenant",
    "sluice.exempt",
    "sluice.callout_errors",
];

#[derive(Clone, Copy)]
enum Metric {
    Allowed = 0,
    Denied,
    FailedOpen,
    FailedClosed,
    MissingTenant,
    InvalidTenant,
    Exempt,
    CalloutErrors,
}

#[derive(Default)]
struct Metrics {
    ids: [Option<u32>; METRIC_NAMES.len()],
}

impl Metrics {
    fn define() -> Metrics {
        let mut m = Metrics::default();
        for (slot, name) in m.ids.iter_mut().zip(METRIC_NAMES) {
            *slot = hostcalls::define_metric(MetricType::Counter, name).ok();
        }
        m
    }

    fn inc(&self, metric: Metric) {
        if let Some(Some(id)) = self.ids.get(metric as usize) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}

#[derive(Default)]
struct Root {
    config: Option<Rc<CompiledConfig>>,
    metrics: Rc<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        self.metrics = Rc::new(Metrics::define());
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(b)) => b,
            _ => Vec::new(),
        };
        match config::compile(&bytes) {
            Ok(c) => {
                probe_cluster(&c);
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            config: self.config.clone(),
            metrics: Rc::clone(&self.metrics),
            phase: Phase::Start,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Says at configure time, rather than on the first request, when the quota
/// cluster is unknown to Envoy: a misspelt cluster would otherwise only show
/// as every request taking the failure mode.
fn probe_cluster(c: &CompiledConfig) {
    let headers = vec![(":method", "GET"), (":path", "/healthz"), (":authority", c.quota_authority.as_str())];
    if hostcalls::dispatch_http_call(&c.quota_cluster, headers, None, vec![], Duration::from_millis(c.timeout_ms))
        .is_err()
    {
        log::error!(
            "quota_cluster {:?} is not a cluster this Envoy knows; every request will take its route's failure mode",
            c.quota_cluster
        );
    }
}

enum Phase {
    Start,
    AwaitingQuota { failure_mode: config::FailureMode, retry_after_s: u64 },
    Admitted { headers: decision::Headers },
    Done,
}

struct Request {
    config: Option<Rc<CompiledConfig>>,
    metrics: Rc<Metrics>,
    phase: Phase,
}

impl Request {
    fn finish(&mut self, outcome: Outcome) -> Action {
        match outcome {
            Outcome::Admit { headers } => {
                self.phase = if headers.is_empty() { Phase::Done } else { Phase::Admitted { headers } };
                Action::Continue
            }
            Outcome::Reply { status, headers, body } => {
                self.phase = Phase::Done;
                let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                if hostcalls::send_http_response(status, hs, Some(body.as_bytes())).is_err() {
                    log::warn!("could not send the local {status} reply");
                }
                Action::Pause
            }
        }
    }

    fn fail(&mut self, failure_mode: config::FailureMode, retry_after_s: u64, why: CalloutFailure) -> Outcome {
        self.metrics.inc(Metric::CalloutErrors);
        self.metrics.inc(match failure_mode {
            config::FailureMode::Open => Metric::FailedOpen,
            config::FailureMode::Closed => Metric::FailedClosed,
        });
        decision::on_failure(failure_mode, retry_after_s, why)
    }

    fn on_request_headers(&mut self, config: &CompiledConfig) -> Action {
        let raw = read_pairs(MapType::HttpRequestHeaders);
        let Some(headers) = pairs::decode(&raw) else {
            return self.finish(decision::invalid_tenant(&config.tenant_header, "unreadable request headers"));
        };

        // Internal headers are the filter's own; a client must never be able
        // to set them (e.g. to pick a route that skips quotas).
        let mut internal: Vec<&[u8]> = Vec::new();
        let mut tenant_values: Vec<&[u8]> = Vec::new();
        let mut path: &[u8] = b"/";
        for (name, value) in &headers {
            if name.len() >= 9 && name.get(..9).is_some_and(|p| p.eq_ignore_ascii_case(b"x-sluice-")) {
                if !internal.contains(name) {
                    internal.push(name);
                }
            } else if name.eq_ignore_ascii_case(config.tenant_header.as_bytes()) {
                tenant_values.push(value);
            } else if *name == b":path" {
                path = value;
            }
        }
        for name in internal {
            if let Ok(name) = std::str::from_utf8(name) {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
            }
        }

        let path = std::str::from_utf8(path).unwrap_or("/");
        let path = path.split('?').next().unwrap_or(path);
        if config.is_exempt_path(path) {
            self.metrics.inc(Metric::Exempt);
            self.phase = Phase::Done;
            return Action::Continue;
        }

        let (route_name, meta_policy) = if config.has_named_policies() {
            (
                if config.uses_route_name() { property_string(&["xds", "route_name"]) } else { None },
                property_string(&["xds", "route_metadata", "filter_metadata", "sluice", "policy"]),
            )
        } else {
            (None, None)
        };
        let policy = config.select(path, route_name.as_deref(), meta_policy.as_deref());
        if policy.exempt {
            self.metrics.inc(Metric::Exempt);
            self.phase = Phase::Done;
            return Action::Continue;
        }

        let tenant = match tenant::extract(&tenant_values) {
            Ok(t) => t,
            Err(TenantError::Missing) => {
                self.metrics.inc(Metric::MissingTenant);
                return self.finish(decision::missing_tenant(&config.tenant_header));
            }
            Err(TenantError::Invalid(why)) => {
                self.metrics.inc(Metric::InvalidTenant);
                return self.finish(decision::invalid_tenant(&config.tenant_header, why));
            }
        };

        let request = CheckRequest {
            tenant: tenant.to_string(),
            cost: policy.cost,
            policy: Some(policy.name.clone()),
            route_limits: policy.limits.clone(),
        };
        let (failure_mode, retry_after_s) = (policy.failure_mode, config.unavailable_retry_after_s);
        let Ok(body) = serde_json::to_vec(&request) else {
            let outcome = self.fail(failure_mode, retry_after_s, CalloutFailure::Dispatch);
            return self.finish(outcome);
        };
        let call_headers = vec![
            (":method", "POST"),
            (":path", CHECK_PATH),
            (":authority", config.quota_authority.as_str()),
            ("content-type", "application/json"),
        ];
        match hostcalls::dispatch_http_call(
            &config.quota_cluster,
            call_headers,
            Some(&body),
            vec![],
            Duration::from_millis(config.timeout_ms),
        ) {
            Ok(_) => {
                self.phase = Phase::AwaitingQuota { failure_mode, retry_after_s };
                Action::Pause
            }
            Err(status) => {
                log::warn!("dispatch to {:?} failed: {status:?}", config.quota_cluster);
                let outcome = self.fail(failure_mode, retry_after_s, CalloutFailure::Dispatch);
                self.finish(outcome)
            }
        }
    }
}

fn read_pairs(map: MapType) -> Vec<u8> {
    // The SDK decodes names with an unwrap; read the raw map instead.
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(map_type: MapType, data: *mut *mut u8, size: *mut usize) -> u32;
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host allocates `size` bytes through the SDK's
    // proxy_on_memory_allocate (a Vec allocation) and hands us ownership.
    unsafe {
        if proxy_get_header_map_pairs(map, &mut data, &mut size) != 0 || data.is_null() {
            return Vec::new();
        }
        Vec::from_raw_parts(data, size, size)
    }
}

fn property_string(path: &[&str]) -> Option<String> {
    match hostcalls::get_property(path.to_vec()) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok().filter(|s| !s.is_empty()),
        _ => None,
    }
}

impl Context for Request {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Phase::AwaitingQuota { failure_mode, retry_after_s } = self.phase else {
            return;
        };
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status").ok().flatten();
        let body = if body_size > 0 && body_size <= decision::MAX_ANSWER_BYTES {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten()
        } else if body_size > decision::MAX_ANSWER_BYTES {
            // Too big to be ours: let parse_answer reject it by size without reading it.
            Some(vec![b' '; decision::MAX_ANSWER_BYTES + 1])
        } else {
            None
        };
        let outcome = match decision::parse_answer(status.as_deref(), body.as_deref()) {
            Ok(resp) => {
                self.metrics.inc(if resp.allowed { Metric::Allowed } else { Metric::Denied });
                decision::decide(&resp)
            }
            Err(why) => {
                log::warn!("quota callout failed: {}", why.as_str());
                self.fail(failure_mode, retry_after_s, why)
            }
        };
        if let Action::Continue = self.finish(outcome) {
            let _ = hostcalls::resume_http_request();
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            // on_configure failed; Envoy normally refuses the plugin then,
            // but never let an unconfigured filter admit anyone.
            let outcome = decision::on_failure(config::FailureMode::Closed, 1, CalloutFailure::Dispatch);
            return self.finish(outcome);
        };
        self.on_request_headers(&config)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Phase::Admitted { headers } = &self.phase {
            for name in OWNED_RESPONSE_HEADERS {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, None);
            }
            for (name, value) in headers {
                let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
            }
            self.phase = Phase::Done;
        }
        Action::Continue
    }
}
