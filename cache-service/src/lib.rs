//! `regmirror` as a library: the pull-through cache (http → cache → store, upstream) and the
//! operator tools. `main.rs` is the command line over it.

mod app;
pub mod cache;
pub mod config;
pub mod http;
pub mod metrics;
pub mod oci;
pub mod reload;
pub mod store;
pub mod tools;
pub mod upstream;

pub use app::{build_app, App, AppError};

#[cfg(test)]
mod testserver;
