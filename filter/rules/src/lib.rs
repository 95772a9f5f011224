//! The registry model and the filter's pure decisions: no proxy-wasm, no async runtime,
//! unit- and property-tested on the host. The filter glue, the cache and the generator use it.

pub mod challenge;
pub mod config;
pub mod declaration;
pub mod digest;
pub mod hosts;
pub mod link;
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
pub mod url;

/// A small bounded set the filter keeps in proxy-wasm shared data (one per registry), so
/// every worker VM of an Envoy sees what one of them learned.
pub trait SharedSet: Default {
    type Item: ?Sized;
    /// Parses a shared-data value; malformed entries are ignored.
    fn decode(bytes: &[u8]) -> Self;
    /// The shared-data value.
    fn encode(&self) -> String;
    /// Adds `item`; false when the set did not change.
    fn insert(&mut self, item: &Self::Item) -> bool;
}

pub use config::{
    compile, default_config, parse, CompiledConfig, ConfigError, FilterConfig, RegistryConfig,
};
