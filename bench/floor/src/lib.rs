//! The floor of `make bench` (mode e): the least a proxy-wasm filter costs
//! on this machine. It reads the tenant header, as every limiter must, and
//! lets the request through: what is left between this and Envoy alone is
//! the price of the Wasm VM itself (a context and every stream callback),
//! which no filter can avoid.
//!
//! With a plugin config it also does chosen host operations on every
//! request, so the bench can price each one against the plain floor in the
//! same kind of run (`SLUICE_BENCH_FLOOR_OPS='<json>' sluice-bench --modes e`):
//! `{"callout": "cluster"}` one callout per request (`GET /healthz`, or
//! `POST /healthz` with `"body"`), `"props": [["xds","route_name"]]`
//! property reads, `"resp_headers": n` response headers set one call each,
//! `"resp_pairs": n` the same set by one call over all pairs, `"shared": true`
//! a shared-data get and CAS set, `"counters": n` counter increments,
//! `"batch": true` with `callout`: the callout sent by the root for all
//! requests waiting at its 1 ms tick.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MetricType};
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Floor::default()) });
}}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct Ops {
    callout: Option<String>,
    body: String,
    props: Vec<Vec<String>>,
    resp_headers: usize,
    shared: bool,
    counters: usize,
    /// Response headers set in one call (all pairs read, ours added).
    resp_pairs: usize,
    /// Callouts batched by the root: a request waits in the worker's queue,
    /// the root sends one callout per tick for all waiting and resumes
    /// each of them on its answer.
    batch: bool,
}

#[derive(Default)]
struct Floor {
    ops: Rc<Ops>,
    counter_ids: Rc<Vec<u32>>,
    waiting: Rc<std::cell::RefCell<Vec<u32>>>,
    in_flight: std::collections::HashMap<u32, Vec<u32>>,
}

impl Context for Floor {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let _ = hostcalls::get_map_value(proxy_wasm::types::MapType::HttpCallResponseHeaders, ":status");
        let _ = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size);
        for id in self.in_flight.remove(&token).unwrap_or_default() {
            if hostcalls::set_effective_context(id).is_ok() {
                let _ = hostcalls::resume_http_request();
            }
        }
    }
}

impl RootContext for Floor {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size).ok().flatten().unwrap_or_default();
        if !bytes.is_empty() {
            match serde_json::from_slice::<Ops>(&bytes) {
                Ok(ops) => self.ops = Rc::new(ops),
                Err(_) => return false,
            }
        }
        let ids: Vec<u32> = (0..self.ops.counters)
            .filter_map(|i| hostcalls::define_metric(MetricType::Counter, &format!("floor.c{i}")).ok())
            .collect();
        self.counter_ids = Rc::new(ids);
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Req {
            id: context_id,
            ops: Rc::clone(&self.ops),
            counters: Rc::clone(&self.counter_ids),
            waiting: Rc::clone(&self.waiting),
        }))
    }

    fn on_tick(&mut self) {
        let ids: Vec<u32> = std::mem::take(&mut *self.waiting.borrow_mut());
        if ids.is_empty() {
            let _ = hostcalls::set_tick_period(Duration::from_millis(0));
            return;
        }
        let cluster = self.ops.callout.clone().unwrap_or_default();
        let headers = vec![(":method", "GET"), (":path", "/healthz"), (":authority", "floor")];
        match hostcalls::dispatch_http_call(&cluster, headers, None, vec![], Duration::from_secs(2)) {
            Ok(token) => {
                self.in_flight.insert(token, ids);
            }
            Err(_) => {
                for id in ids {
                    if hostcalls::set_effective_context(id).is_ok() {
                        let _ = hostcalls::resume_http_request();
                    }
                }
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Req {
    id: u32,
    waiting: Rc<std::cell::RefCell<Vec<u32>>>,
    ops: Rc<Ops>,
    counters: Rc<Vec<u32>>,
}

impl Context for Req {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let _ = hostcalls::get_map_value(proxy_wasm::types::MapType::HttpCallResponseHeaders, ":status");
        let _ = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size);
        let _ = hostcalls::resume_http_request();
    }
}

impl HttpContext for Req {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let _tenant = hostcalls::get_map_value_bytes(proxy_wasm::types::MapType::HttpRequestHeaders, "x-tenant-id");
        for p in &self.ops.props {
            let path: Vec<&str> = p.iter().map(String::as_str).collect();
            let _ = hostcalls::get_property(path);
        }
        if self.ops.shared {
            if let Ok((_, cas)) = hostcalls::get_shared_data("floor") {
                let _ = hostcalls::set_shared_data("floor", Some(b"0123456789abcdef0123456789abcdef"), cas);
            }
        }
        for id in self.counters.iter() {
            let _ = hostcalls::increment_metric(*id, 1);
        }
        if self.ops.batch {
            let first = {
                let mut w = self.waiting.borrow_mut();
                w.push(self.id);
                w.len() == 1
            };
            if first {
                let _ = hostcalls::set_tick_period(Duration::from_millis(1));
            }
            return Action::Pause;
        }
        if let Some(cluster) = &self.ops.callout {
            let headers = vec![
                (":method", "POST"),
                (":path", "/healthz"),
                (":authority", "floor"),
                ("content-type", "application/json"),
            ];
            let body = (!self.ops.body.is_empty()).then_some(self.ops.body.as_bytes());
            let headers = if body.is_some() { headers } else { vec![(":method", "GET"), (":path", "/healthz"), (":authority", "floor")] };
            if hostcalls::dispatch_http_call(cluster, headers, body, vec![], Duration::from_secs(2)).is_ok() {
                return Action::Pause;
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.ops.resp_pairs > 0 {
            if let Ok(mut pairs) = hostcalls::get_map(proxy_wasm::types::MapType::HttpResponseHeaders) {
                for i in 0..self.ops.resp_pairs {
                    let name = HEADER_NAMES.get(i % HEADER_NAMES.len()).copied().unwrap_or("x-floor");
                    pairs.retain(|(k, _)| k != name);
                    pairs.push((name.to_string(), "12345".to_string()));
                }
                let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let _ = hostcalls::set_map(proxy_wasm::types::MapType::HttpResponseHeaders, refs);
            }
        }
        for i in 0..self.ops.resp_headers {
            let _ = hostcalls::set_map_value(
                proxy_wasm::types::MapType::HttpResponseHeaders,
                HEADER_NAMES.get(i % HEADER_NAMES.len()).copied().unwrap_or("x-floor"),
                Some("12345"),
            );
        }
        Action::Continue
    }
}

const HEADER_NAMES: [&str; 6] =
    ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy", "ratelimit", "x-floor"];
