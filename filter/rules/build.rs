//! Embeds `envoy/registries.toml`, the one registry declaration, as JSON: the filter's
//! built-in registries are that file, read with the crate's own declaration types, and no
//! TOML parser goes into the wasm module.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let source = Path::new(&manifest).join("../../envoy/registries.toml");
    println!("cargo:rerun-if-changed={}", source.display());
    let text = std::fs::read_to_string(&source)
        .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
    let value: toml::Value =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", source.display()))?;
    let out = Path::new(&std::env::var("OUT_DIR")?).join("registries.json");
    std::fs::write(out, serde_json::to_string(&value)?)?;
    Ok(())
}
