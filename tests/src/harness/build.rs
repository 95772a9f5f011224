//! Builds the parts under test once per test process, or takes prebuilt paths from
//! `MIRROR_WASM` / `REGMIRROR_BIN` (the justfile builds first and sets them).

use crate::proc::run;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn once(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    f: fn() -> Result<PathBuf>,
) -> Result<PathBuf> {
    cell.get_or_init(|| f().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `target/wasm32-wasip1/wasm/mirror_filter.wasm`, built with
/// `cargo build -p mirror-filter --target wasm32-wasip1 --profile wasm` and trimmed by
/// `filter/trim-exports.py`, as `just build` does (or `$MIRROR_WASM`).
pub fn wasm() -> Result<PathBuf> {
    static W: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&W, || {
        if let Some(p) = std::env::var_os("MIRROR_WASM") {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("MIRROR_WASM={} does not exist", p.display());
            }
            return Ok(p);
        }
        run(Command::new(cargo()).current_dir(workspace_root()).args([
            "build",
            "-p",
            "mirror-filter",
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
        ]))
        .context("building the wasm filter (rustup target add wasm32-wasip1)")?;
        let p = target_dir().join("wasm32-wasip1/wasm/mirror_filter.wasm");
        if !p.is_file() {
            bail!("cargo built the filter but {} is missing", p.display());
        }
        run(Command::new("python3")
            .arg(workspace_root().join("filter/trim-exports.py"))
            .arg(&p))
        .context("trimming the filter's exports")?;
        Ok(p)
    })
}

/// The `regmirror` binary, built with `cargo build -p cache-service` (or `$REGMIRROR_BIN`).
pub fn regmirror() -> Result<PathBuf> {
    static R: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&R, || {
        if let Some(p) = std::env::var_os("REGMIRROR_BIN") {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("REGMIRROR_BIN={} does not exist", p.display());
            }
            return Ok(p);
        }
        run(Command::new(cargo()).current_dir(workspace_root()).args([
            "build",
            "-p",
            "cache-service",
            "--bin",
            "regmirror",
        ]))
        .context("building regmirror")?;
        let p = target_dir().join("debug/regmirror");
        if !p.is_file() {
            bail!("cargo built cache-service but {} is missing", p.display());
        }
        Ok(p)
    })
}
