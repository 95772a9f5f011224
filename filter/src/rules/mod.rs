//! Pure routing and rewriting logic: no proxy-wasm calls, unit-tested on the host.

pub mod challenge;
pub mod config;
pub mod names;
pub mod oci_error;
#[cfg(test)]
mod proptests;
pub mod realms;
pub mod redirect;
pub mod response;
pub mod route;
pub mod token;
pub mod token_host;

pub use config::{
    compile, default_config, parse, CompiledConfig, ConfigError, FilterConfig, RegistryConfig,
};
