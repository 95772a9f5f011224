//! `regmirror` as a library: the pull-through cache (http → cache → store, upstream) and the
//! operator tools. `main.rs` is the command line over it.

mod app;
pub mod authorize;
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

/// Lock a mutex, through poisoning: every critical section here is a plain update that
/// leaves the data consistent, so a panic elsewhere must not take the lock down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod testserver;
