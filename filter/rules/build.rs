//! Embeds `envoy/filter.json` (rendered from `envoy/registries.toml`) without its
//! indentation: the built-in configuration is carried by every filter module, so its bytes
//! count. Whitespace outside strings is all that is dropped; the parser sees the same JSON.

use std::path::Path;

fn main() {
    let source = Path::new("../../envoy/filter.json");
    println!("cargo:rerun-if-changed={}", source.display());
    let json = match std::fs::read(source) {
        Ok(bytes) => bytes,
        Err(e) => {
            println!("cargo:warning=cannot read {}: {e}", source.display());
            std::process::exit(1);
        }
    };
    let mut compact = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if b.is_ascii_whitespace() {
            continue;
        }
        compact.push(b);
    }
    let out = Path::new(&std::env::var_os("OUT_DIR").unwrap_or_default()).join("filter.json");
    if let Err(e) = std::fs::write(&out, compact) {
        println!("cargo:warning=cannot write {}: {e}", out.display());
        std::process::exit(1);
    }
}
