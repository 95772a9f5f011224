//! The floor of `just bench`'s filter-overhead rows: a proxy-wasm filter that makes only the
//! host calls any filter doing the mirror filter's job must make, and none of its rules:
//! read the request headers, set `:authority`, read the response headers and, on a 401,
//! write the challenge back with its realm replaced. Envoy with this filter against Envoy
//! without wasm is the cost of the VM and of those host calls; the mirror filter against
//! this one is the cost of the mirror's own code.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

/// The upstream authority of the bench's Envoy configuration.
const UPSTREAM: &str = "registry-1.docker.io";
const REALM: &str = "https://auth.docker.io";
const MIRROR_REALM: &str = "http://127.0.0.1/_mirror/auth/auth.docker.io";

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FloorRoot) });
}}

struct FloorRoot;

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Floor;

impl Context for Floor {}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = self.get_http_request_headers_bytes();
        std::hint::black_box(headers);
        self.set_http_request_header(":authority", Some(UPSTREAM));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = self.get_http_response_headers_bytes();
        let unauthorized = headers
            .iter()
            .any(|(k, v)| k == ":status" && v.as_slice() == b"401");
        let challenge = headers
            .iter()
            .find(|(k, _)| k == "www-authenticate")
            .and_then(|(_, v)| std::str::from_utf8(v).ok());
        if let (true, Some(c)) = (unauthorized, challenge) {
            let rewritten = c.replacen(REALM, MIRROR_REALM, 1);
            self.set_http_response_header("www-authenticate", Some(&rewritten));
        }
        Action::Continue
    }
}
