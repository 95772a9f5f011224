//! `regmirror render`: turns `envoy/registries.toml`, the one declaration of registries,
//! into the filter's JSON, the Envoy configs and cache-service's config.

pub mod declaration;
mod envoy;
mod istio;

use declaration::{Declaration, DeclarationError, Registry};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The registries declaration.
    #[arg(long, default_value = "envoy/registries.toml")]
    pub registries: PathBuf,
    /// Directory the rendered files are written to.
    #[arg(long, default_value = "envoy")]
    pub out: PathBuf,
    /// Write nothing; exit 1 when a checked-in file differs from a fresh render.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Declaration(#[from] DeclarationError),
    #[error("the rendered filter configuration is rejected by the filter: {0}")]
    Filter(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// A rendered file: its name under the output directory and its content.
pub struct Rendered {
    pub name: &'static str,
    pub content: String,
}

pub fn run(args: &RenderArgs) -> ExitCode {
    let files = match render_files(&args.registries) {
        Ok(files) => files,
        Err(error) => {
            eprintln!("regmirror render: {error}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        let stale: Vec<_> = files
            .iter()
            .filter(|f| {
                std::fs::read_to_string(args.out.join(f.name))
                    .ok()
                    .as_deref()
                    != Some(&f.content)
            })
            .map(|f| args.out.join(f.name).display().to_string())
            .collect();
        if stale.is_empty() {
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "regmirror render: out of date with {}: {}\nrun `just render` and commit the result",
            args.registries.display(),
            stale.join(", ")
        );
        return ExitCode::FAILURE;
    }
    for file in &files {
        let path = args.out.join(file.name);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(source) = std::fs::write(&path, &file.content) {
            eprintln!(
                "regmirror render: {}",
                RenderError::Write {
                    path: path.display().to_string(),
                    source
                }
            );
            return ExitCode::from(2);
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

pub fn render_files(registries: &Path) -> Result<Vec<Rendered>, RenderError> {
    let declaration = Declaration::load(registries)?;
    let filter_json = filter_json(&declaration);
    validate_with_filter(&filter_json)?;
    Ok(vec![
        Rendered {
            name: "filter.json",
            content: pretty_json(&filter_json),
        },
        Rendered {
            name: "local.yaml",
            content: envoy::render(&declaration, &filter_json, envoy::Variant::Local),
        },
        Rendered {
            name: "mirror.yaml",
            content: envoy::render(&declaration, &filter_json, envoy::Variant::Standalone),
        },
        Rendered {
            name: "behind-tls-proxy.yaml",
            content: envoy::render(&declaration, &filter_json, envoy::Variant::BehindTlsProxy),
        },
        Rendered {
            name: "Caddyfile",
            content: caddyfile(&declaration),
        },
        Rendered {
            name: "cache.toml",
            content: cache_toml(&declaration),
        },
        Rendered {
            name: "istio/mirror.yaml",
            content: istio::render(&declaration, &filter_json),
        },
    ])
}

/// The filter's own parser (the code `on_configure` runs) must accept what we ship.
fn validate_with_filter(filter_json: &str) -> Result<(), RenderError> {
    mirror_filter::rules::parse(filter_json.as_bytes())
        .map(drop)
        .map_err(|error| RenderError::Filter(error.to_string()))
}

/// The filter's plugin configuration (schema in docs/design.md), compact.
fn filter_json(declaration: &Declaration) -> String {
    let registries: Vec<_> = declaration
        .registries
        .iter()
        .map(|r| {
            // A cached registry's challenges and redirects never reach clients:
            // cache-service answers them upstream.
            let (realm_hosts, redirect_hosts) = if r.cache {
                (vec![], vec![])
            } else {
                (r.realm_hosts.clone(), r.redirect_hosts.clone())
            };
            serde_json::json!({
                "name": r.name,
                "aliases": r.aliases,
                "upstream": r.upstream,
                "host_prefix": r.host_prefix,
                "realm_hosts": realm_hosts,
                "redirect_hosts": redirect_hosts,
                "library_namespace": r.library_namespace,
                "cache": r.cache,
                "redirects": r.redirects,
            })
        })
        .collect();
    serde_json::json!({
        "host_suffix": declaration.mirror.host_suffix,
        "default_registry": declaration.mirror.default_registry,
        "redirect_ttl_seconds": declaration.mirror.redirect_ttl_seconds,
        "registries": registries,
    })
    .to_string()
}

fn pretty_json(compact: &str) -> String {
    serde_json::from_str::<serde_json::Value>(compact)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .map(|s| s + "\n")
        .unwrap_or_else(|_| compact.to_owned())
}

/// Compose profile `acme`: Caddy obtains certificates for the mirror's names.
fn caddyfile(declaration: &Declaration) -> String {
    let mut names = vec!["{$MIRROR_DOMAIN}".to_owned()];
    names.extend(
        declaration
            .registries
            .iter()
            .filter_map(|r| r.host_prefix.as_ref())
            .map(|prefix| format!("{prefix}.{{$MIRROR_DOMAIN}}")),
    );
    format!(
        "# Rendered by `regmirror render` from envoy/registries.toml: edit that file, not this one.\n\
         # Compose profile `acme`: Caddy gets certificates from Let's Encrypt for the mirror's names\n\
         # and passes requests to Envoy (envoy/behind-tls-proxy.yaml). HSTS is set by Envoy.\n\
         {} {{\n\
         \treverse_proxy envoy-behind-caddy:8080 {{\n\
         \t\t# Large layers: stream, never buffer, no timeout on the response body.\n\
         \t\tflush_interval -1\n\
         \t\ttransport http {{\n\
         \t\t\tread_timeout 0\n\
         \t\t\twrite_timeout 0\n\
         \t\t}}\n\
         \t}}\n\
         }}\n",
        names.join(", ")
    )
}

/// cache-service's upstreams: the registries declared with `cache = true`.
fn cache_toml(declaration: &Declaration) -> String {
    let mut out = String::from(
        "# Rendered by `regmirror render` from envoy/registries.toml: edit that file, not this one.\n\
         # cache-service configuration: `regmirror serve --config envoy/cache.toml`.\n\
         listen = \"127.0.0.1:5001\"\n\
         storage = \"/var/lib/regmirror\"\n\
         tag_ttl_seconds = 300\n",
    );
    for Registry {
        name,
        upstream,
        realm_hosts,
        ..
    } in declaration.cached_registries()
    {
        out.push_str(&format!(
            "\n[[upstream]]\nname = {}\nurl = {}\nrealm_hosts = {}\n",
            toml_string(name),
            toml_string(&format!("https://{upstream}")),
            toml_list(realm_hosts)
        ));
    }
    out
}

fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

fn toml_list(values: &[String]) -> String {
    toml::Value::Array(values.iter().cloned().map(toml::Value::String).collect()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The checked-in files are what the declaration renders to.
    #[test]
    fn checked_in_configs_are_up_to_date() {
        let root = repo_root();
        for file in render_files(&root.join("envoy/registries.toml")).unwrap() {
            let path = root.join("envoy").join(file.name);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == file.content,
                "{} is stale: run `just render` and commit it",
                path.display()
            );
        }
    }

    #[test]
    fn cached_registry_routes_to_cache_service_only() {
        let files = render_files(&repo_root().join("envoy/registries.toml")).unwrap();
        let local = &files
            .iter()
            .find(|f| f.name == "local.yaml")
            .unwrap()
            .content;
        assert!(
            local.contains("name: \"gcr.io\"\n              domains: [\"gcr.io\", \"gcr.io:443\"]")
        );
        assert!(!local.contains("- name: \"gcr.io\"\n    type: LOGICAL_DNS"));
        let cache = &files
            .iter()
            .find(|f| f.name == "cache.toml")
            .unwrap()
            .content;
        let parsed: toml::Value = toml::from_str(cache).unwrap();
        let upstreams = parsed["upstream"].as_array().unwrap();
        assert_eq!(upstreams.len(), 1);
        assert_eq!(upstreams[0]["url"].as_str(), Some("https://gcr.io"));
    }
}
