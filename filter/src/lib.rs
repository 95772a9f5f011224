//! proxy-wasm HTTP filter of the registry mirror.
//!
//! All decisions live in [`rules`] (plain Rust, unit-tested on the host); the modules here
//! are the thin glue to the proxy-wasm host: read headers, ask `rules`, apply the plan.

pub use registry_rules as rules;

mod http;
mod metrics;
mod root;
mod shared_data;

proxy_wasm::main! {{
    // Until the host's level is known (see `MirrorRoot::on_vm_start`): Envoy's default.
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::MirrorRoot::default())
    });
}}
