//! Envoy
