//! The floor of `make bench` (mode e): the least a proxy-wasm filter costs
//! on this machine. It reads the tenant header, as every limiter must, and
//! lets the request through: what is left between this and Envoy alone is
//! the price of the Wasm VM itself (a context and every stream callback),
//! which no filter can avoid.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Floor) });
}}

struct Floor;

impl Context for Floor {}

impl RootContext for Floor {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // The SDK's getter panics only on statuses Envoy does not return
        // for a header read in this callback.
        let _tenant = self.get_http_request_header_bytes("x-tenant-id");
        Action::Continue
    }
}
