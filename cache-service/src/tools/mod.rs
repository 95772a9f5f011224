//! The operator tools behind `regmirror`'s subcommands. They share the registry model
//! (`registry_rules`) and the upstream client with the cache, not its server or storage.

pub mod client_config;
pub mod doctor;
pub mod render;
pub mod warm;

/// ` CODE: message` of the first OCI error in a registry's answer body, or nothing: what the
/// tools append to an HTTP status in their reports.
fn oci_error_suffix(body: &str) -> String {
    registry_rules::oci_error::parse_first(body.as_bytes())
        .map(|e| format!(" {e}"))
        .unwrap_or_default()
}
