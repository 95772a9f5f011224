//! The operator tools behind `regmirror`'s subcommands. They share the registry model
//! (`registry_rules`) and the upstream client with the cache, not its server or storage.

pub mod client_config;
pub mod doctor;
pub mod render;
pub mod warm;
