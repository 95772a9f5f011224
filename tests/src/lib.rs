//! Integration-test harness for the registry mirror.
//!
//! Everything here runs real components on 127.0.0.1 with free ports: a token server
//! (in-process, ES256 JWTs), two distribution registries with token auth, nginx fronts
//! that behave like Docker Hub (307 to a CDN) and quay.io (realm on the registry host),
//! Envoy with the shipped configuration and the freshly built wasm filter, skopeo and
//! containerd as clients. See `harness` for the pieces.

pub mod harness;

pub use harness::*;
