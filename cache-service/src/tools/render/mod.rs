//! `regmirror render`: turns `envoy/registries.toml`, the one declaration of registries,
//! into the filter's JSON, the Envoy configs and cache-service's config.

mod access;
pub mod declaration;
mod envoy;
mod istio;
pub mod launcher;
mod xds;

use declaration::{Declaration, DeclarationError};
use registry_rules::FilterConfig;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The registries declaration.
    #[arg(long, default_value = "envoy/registries.toml")]
    pub registries: PathBuf,
    /// Directory the rendered files are written to.
    #[arg(long, default_value = "envoy")]
    pub out: PathBuf,
    /// Write nothing; exit 1 when a checked-in file differs from a fresh render.
    #[arg(long, conflicts_with = "watch")]
    pub check: bool,
    /// Keep running: render again whenever the declaration changes (a broken edit is
    /// refused and nothing is written). Envoy applies the new xDS files by itself.
    #[arg(long)]
    pub watch: bool,
    /// Skip `envoy --mode validate` of the rendered local config.
    #[arg(long)]
    pub no_envoy_validate: bool,
    /// File holding the redirect signing key (hex, at least 32 bytes): rendered into every
    /// filter configuration, so several Envoys behind one load balancer accept each other's
    /// signed URLs. Deployment output only: refused with --check and for the declaration's
    /// own (checked-in) directory.
    #[arg(long, conflicts_with = "check")]
    pub signing_key_file: Option<PathBuf>,
}

/// Envoy's cache cluster in `scale.yaml`: the replicas of compose profile `scale`.
const SCALE_REPLICAS: [&str; 3] = ["cache-1:5001", "cache-2:5001", "cache-3:5001"];

/// A signing key file is a few dozen bytes; anything longer is not one.
const MAX_KEY_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Declaration(#[from] DeclarationError),
    #[error("the rendered filter configuration is rejected by the filter: {0}")]
    Filter(String),
    #[error("cannot serialize the {what}: {reason}")]
    Serialize { what: &'static str, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Split(#[from] xds::SplitError),
    #[error("Envoy rejects the rendered configuration (envoy --mode validate):\n{0}")]
    Envoy(String),
    #[error("signing key {path}: {reason}")]
    SigningKey { path: String, reason: String },
}

/// A rendered file: its name under the output directory and its content.
pub struct Rendered {
    pub name: String,
    pub content: String,
}

pub fn run(args: &RenderArgs) -> ExitCode {
    let signing_key = match args
        .signing_key_file
        .as_deref()
        .map(|file| read_signing_key(file, &args.out, &args.registries))
        .transpose()
    {
        Ok(key) => key,
        Err(error) => {
            eprintln!("regmirror render: {error}\nnothing written");
            return ExitCode::from(2);
        }
    };
    let signing_key = signing_key.as_deref();
    if args.watch {
        return watch(args, signing_key);
    }
    let files = match render_with_key(&args.registries, signing_key).and_then(|files| {
        if !args.check && !args.no_envoy_validate {
            validate_with_envoy(&files)?;
        }
        Ok(files)
    }) {
        Ok(files) => files,
        Err(error) => {
            eprintln!("regmirror render: {error}\nnothing written");
            return ExitCode::from(2);
        }
    };
    if args.check {
        let stale: Vec<_> = files
            .iter()
            .filter(|f| {
                std::fs::read_to_string(args.out.join(&f.name))
                    .ok()
                    .as_deref()
                    != Some(&f.content)
            })
            .map(|f| args.out.join(&f.name).display().to_string())
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
    match write_files(&args.out, &files) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("regmirror render: {error}");
            ExitCode::from(2)
        }
    }
}

/// Writes the files that changed, each atomically: a temp file in the same directory, then
/// a rename, so Envoy (which watches the xDS directory for moves) never reads half a file.
/// In list order: the xDS clusters before the listeners that route to them.
fn write_files(out: &Path, files: &[Rendered]) -> Result<(), RenderError> {
    for file in files {
        let path = out.join(&file.name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(&file.content) {
            continue;
        }
        super::write_atomically(&path, &file.content, super::Readers::All).map_err(|source| {
            RenderError::Write {
                path: path.display().to_string(),
                source,
            }
        })?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `render --watch`: polls the declaration's modification time (no extra dependency, and
/// editors that replace the file are seen too), waits for it to settle, renders.
fn watch(args: &RenderArgs, signing_key: Option<&str>) -> ExitCode {
    const POLL: Duration = Duration::from_millis(250);
    // Editors write in several steps: render once the file has been still this long.
    const SETTLE: Duration = Duration::from_millis(300);
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut rendered: Option<SystemTime> = None;
    let mut seen = modified(&args.registries);
    // The declaration as found at start is rendered at once.
    let mut since = Instant::now()
        .checked_sub(SETTLE)
        .unwrap_or_else(Instant::now);
    eprintln!(
        "regmirror render: watching {} (Ctrl-C to stop)",
        args.registries.display()
    );
    loop {
        let now = modified(&args.registries);
        if now != seen {
            seen = now;
            since = Instant::now();
        }
        if seen.is_some() && seen != rendered && since.elapsed() >= SETTLE {
            rendered = seen;
            let result = render_with_key(&args.registries, signing_key).and_then(|files| {
                if !args.no_envoy_validate {
                    validate_with_envoy(&files)?;
                }
                write_files(&args.out, &files)
            });
            match result {
                Ok(()) => eprintln!("regmirror render: {} applied", args.registries.display()),
                Err(error) => eprintln!(
                    "regmirror render: {} refused: {error}\nnothing written; the running configuration is unchanged",
                    args.registries.display()
                ),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `envoy --mode validate` (through the launcher) on the rendered local config, whose
/// listeners and clusters are those of `xds/local`. Skipped, with a note, when no Envoy is
/// installed or the filter module it loads is not built: the filter's own parser has
/// already accepted the configuration.
fn validate_with_envoy(files: &[Rendered]) -> Result<(), RenderError> {
    let launch = match launcher::plan(&launcher::discover()) {
        Ok(launch) => launch,
        Err(launcher::LaunchError::NoEnvoy) => return Ok(()),
        Err(error) => return Err(RenderError::Envoy(error.to_string())),
    };
    let Some(local) = files.iter().find(|f| f.name == "local.yaml") else {
        return Ok(());
    };
    let wasm = envoy::Variant::Local.wasm_path();
    if !Path::new(wasm).is_file() {
        eprintln!(
            "regmirror render: envoy --mode validate skipped: {wasm} is not built (just build)"
        );
        return Ok(());
    }
    // Exclusively created, owner-only, removed when dropped: it may hold the signing key.
    let tmp = tempfile::Builder::new()
        .prefix("regmirror-render-")
        .suffix(".yaml")
        .tempfile()
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, local.content.as_bytes())?;
            Ok(f)
        })
        .map_err(|source| RenderError::Write {
            path: std::env::temp_dir().display().to_string(),
            source,
        })?;
    let output = launch
        .command([
            "--mode".as_ref(),
            "validate".as_ref(),
            "--disable-hot-restart".as_ref(),
            "--log-level".as_ref(),
            "error".as_ref(),
            "-c".as_ref(),
            tmp.path().as_os_str(),
        ])
        .output();
    drop(tmp);
    match output {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(RenderError::Envoy(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))),
        Err(error) => Err(RenderError::Envoy(format!(
            "cannot run {}: {error}",
            launch.program.display()
        ))),
    }
}

/// The signing key in `file`, for a render into `out`: never beside the declaration, whose
/// directory holds the checked-in renders. Its format is checked by the filter's parser.
fn read_signing_key(file: &Path, out: &Path, registries: &Path) -> Result<String, RenderError> {
    use std::io::Read;
    let error = |reason: String| RenderError::SigningKey {
        path: file.display().to_string(),
        reason,
    };
    let same_dir = match (
        out.canonicalize(),
        registries.parent().map(Path::canonicalize),
    ) {
        (Ok(out), Some(Ok(declared))) => out == declared,
        _ => false,
    };
    if same_dir {
        return Err(error(format!(
            "not rendered into {}, the declaration's directory (checked in): pass --out DIR for the deployment's files",
            out.display()
        )));
    }
    let mut text = String::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_KEY_FILE + 1).read_to_string(&mut text))
        .map_err(|e| error(e.to_string()))?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(error(format!(
            "longer than {MAX_KEY_FILE} bytes: not a hex key"
        )));
    }
    Ok(text.trim().to_owned())
}

#[cfg(test)]
fn render_files(registries: &Path) -> Result<Vec<Rendered>, RenderError> {
    render_with_key(registries, None)
}

/// The rendered files; with `signing_key`, every filter configuration carries it.
fn render_with_key(
    registries: &Path,
    signing_key: Option<&str>,
) -> Result<Vec<Rendered>, RenderError> {
    let declaration = Declaration::load(registries)?;
    // `just up` serves 127.0.0.1:5000, not the public name.
    let mut local = declaration.filter_config(false);
    let mut public = declaration.filter_config(true);
    for config in [&mut local, &mut public] {
        config.signing_key = signing_key.map(str::to_owned);
    }
    let local_json = filter_json(&local)?;
    let public_json = filter_json(&public)?;
    let local = envoy::render(&declaration, &local_json, envoy::Variant::Local);
    let standalone = envoy::render(&declaration, &public_json, envoy::Variant::Standalone);
    let scale =
        declaration.with_cache_service(SCALE_REPLICAS.map(str::to_owned).to_vec().into())?;
    let scale = envoy::render(&scale, &public_json, envoy::Variant::Standalone).replacen(
        "\n",
        "\n# Compose profile `scale`: the cache cluster is the replicas cache-1..3 on one S3 bucket.\n",
        1,
    );
    let cache_toml = cache_toml(&declaration)?;
    let local_xds = xds::from_static(&local, xds::LOCAL)?;
    let standalone_xds = xds::from_static(&standalone, xds::STANDALONE)?;
    let mut files = vec![
        Rendered {
            name: "filter.json".to_owned(),
            content: pretty_json(&public)?,
        },
        Rendered {
            name: "local.yaml".to_owned(),
            content: local,
        },
        Rendered {
            name: "mirror.yaml".to_owned(),
            content: standalone,
        },
        Rendered {
            name: "behind-tls-proxy.yaml".to_owned(),
            content: envoy::render(&declaration, &public_json, envoy::Variant::BehindTlsProxy),
        },
        Rendered {
            name: "Caddyfile".to_owned(),
            content: caddyfile(&declaration),
        },
        Rendered {
            name: "scale.yaml".to_owned(),
            content: scale,
        },
        Rendered {
            name: "istio/mirror.yaml".to_owned(),
            content: istio::render(&declaration, &public)?,
        },
        Rendered {
            name: "istio/cache.yaml".to_owned(),
            content: istio::render_cache(&cache_toml),
        },
        Rendered {
            name: "cache.toml".to_owned(),
            content: cache_toml,
        },
    ];
    // Clusters before listeners: a new route's cluster exists when its listener loads.
    for (dir, xds) in [("xds/local", local_xds), ("xds/mirror", standalone_xds)] {
        let xds::XdsFiles {
            bootstrap,
            lds,
            cds,
        } = xds;
        files.extend(
            [
                (format!("{dir}/envoy.yaml"), bootstrap),
                (format!("{dir}/cds.yaml"), cds),
                (format!("{dir}/lds.yaml"), lds),
            ]
            .map(|(name, content)| Rendered { name, content }),
        );
    }
    Ok(files)
}

/// The filter's plugin configuration (schema in docs/design.md), compact, as Envoy hands
/// it to the filter. The filter's own parser (the code `on_configure` runs) must accept it.
fn filter_json(config: &FilterConfig) -> Result<String, RenderError> {
    let json = serde_json::to_string(config).map_err(|e| RenderError::Serialize {
        what: "filter configuration",
        reason: e.to_string(),
    })?;
    registry_rules::parse(json.as_bytes())
        .map_err(|error| RenderError::Filter(error.to_string()))?;
    Ok(json)
}

/// envoy/filter.json: the same configuration, for a reader.
fn pretty_json(config: &FilterConfig) -> Result<String, RenderError> {
    serde_json::to_string_pretty(config)
        .map(|s| s + "\n")
        .map_err(|e| RenderError::Serialize {
            what: "filter configuration",
            reason: e.to_string(),
        })
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

/// cache-service's configuration: its upstreams are the registries declared with
/// `cache = true`, in the type cache-service reads them with.
fn cache_toml(declaration: &Declaration) -> Result<String, RenderError> {
    let config = crate::config::FileConfig {
        listen: Some("127.0.0.1:5001".to_owned()),
        storage: Some("/var/lib/regmirror".into()),
        tag_ttl_seconds: Some(300),
        upstream: declaration.cache_upstreams(),
        ..Default::default()
    };
    let body = toml::to_string(&config).map_err(|e| RenderError::Serialize {
        what: "cache-service configuration",
        reason: e.to_string(),
    })?;
    Ok(format!(
        "# Rendered by `regmirror render` from envoy/registries.toml: edit that file, not this one.\n\
         # cache-service configuration: `regmirror serve --config envoy/cache.toml`.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_rules::declaration::ClientAuth;

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The checked-in files are what the declaration renders to.
    /// Every client-facing listener bounds what one client can hold: a request head within
    /// 10 s, at most 100 HTTP/2 streams a connection, small upload windows.
    #[test]
    fn every_listener_bounds_what_a_client_can_hold() {
        let files = render_files(&repo_root().join("envoy/registries.toml")).unwrap();
        for name in [
            "local.yaml",
            "mirror.yaml",
            "behind-tls-proxy.yaml",
            "scale.yaml",
            "xds/local/lds.yaml",
            "xds/mirror/lds.yaml",
        ] {
            let text = file(&files, name);
            let managers = text.matches("v3.HttpConnectionManager").count();
            assert!(managers > 0, "{name}");
            for bound in [
                "request_headers_timeout: 10s",
                "max_concurrent_streams: 100",
                "initial_stream_window_size: 65536",
            ] {
                assert_eq!(text.matches(bound).count(), managers, "{name}: {bound}");
            }
        }
    }

    #[test]
    fn checked_in_configs_are_up_to_date() {
        let root = repo_root();
        for file in render_files(&root.join("envoy/registries.toml")).unwrap() {
            let path = root.join("envoy").join(&file.name);
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

    /// Renders the shipped declaration with `edit` applied to its text.
    fn render_edited(edit: impl Fn(String) -> String) -> Result<Vec<Rendered>, RenderError> {
        let shipped = std::fs::read_to_string(repo_root().join("envoy/registries.toml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registries.toml");
        std::fs::write(&path, edit(shipped)).unwrap();
        render_files(&path)
    }

    fn file<'a>(files: &'a [Rendered], name: &str) -> &'a str {
        &files.iter().find(|f| f.name == name).unwrap().content
    }

    /// The filter configuration embedded in an Envoy YAML.
    fn embedded_filter_json(yaml: &str) -> serde_json::Value {
        let doc: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let filters = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["http_filters"];
        let wasm = filters
            .as_sequence()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "envoy.filters.http.wasm")
            .unwrap();
        let value = wasm["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap();
        serde_json::from_str(value).unwrap()
    }

    #[test]
    fn public_url_goes_to_public_configs_only() {
        let files = render_edited(|t| {
            t.replace(
                "[mirror]\n",
                "[mirror]\npublic_url = \"https://mirror.example.com\"\n",
            )
        })
        .unwrap();
        for name in ["mirror.yaml", "behind-tls-proxy.yaml"] {
            assert_eq!(
                embedded_filter_json(file(&files, name))["public_url"],
                "https://mirror.example.com",
                "{name}"
            );
        }
        let filter: serde_json::Value = serde_json::from_str(file(&files, "filter.json")).unwrap();
        assert_eq!(filter["public_url"], "https://mirror.example.com");
        assert!(file(&files, "istio/mirror.yaml")
            .contains("\"public_url\": \"https://mirror.example.com\""));
        // `just up` answers on 127.0.0.1:5000.
        assert!(embedded_filter_json(file(&files, "local.yaml"))
            .get("public_url")
            .is_none());
    }

    #[test]
    fn forward_client_credentials_is_rendered_only_where_declared() {
        let declaration = Declaration::parse(
            r#"
            [mirror]
            cache_service = "127.0.0.1:5001"
            [[registry]]
            name = "a.io"
            upstream = "a.io"
            forward_client_credentials = true
            [[registry]]
            name = "b.io"
            upstream = "b.io"
            "#,
            Path::new("registries.toml"),
        )
        .unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&filter_json(&declaration.filter_config(true)).unwrap()).unwrap();
        assert_eq!(json["registries"][0]["forward_client_credentials"], true);
        assert!(json["registries"][1]
            .get("forward_client_credentials")
            .is_none());
    }

    /// filter.json is what the filter's serde types write: parsed and written again, it
    /// is the same text, and the filter compiles it to what it compiles the declaration to.
    #[test]
    fn filter_json_round_trips_through_the_filters_types() {
        let files = render_files(&repo_root().join("envoy/registries.toml")).unwrap();
        let text = file(&files, "filter.json");
        let parsed: FilterConfig = serde_json::from_str(text).unwrap();
        assert_eq!(pretty_json(&parsed).unwrap(), text);
        let declaration = Declaration::load(&repo_root().join("envoy/registries.toml")).unwrap();
        assert_eq!(parsed, declaration.filter_config(true));
        assert_eq!(
            registry_rules::parse(text.as_bytes()).unwrap(),
            registry_rules::compile(&declaration.filter_config(true)).unwrap()
        );
    }

    /// A registry's `ca_file` is what Envoy trusts for that registry's upstream cluster
    /// (and the Istio gateway for its DestinationRule); for a cached registry, the cache.
    #[test]
    fn a_registry_ca_reaches_its_upstream_cluster() {
        let files = render_edited(|t| {
            t.replacen(
                "upstream = \"quay.io\"\n",
                "upstream = \"quay.io\"\nca_file = \"/etc/regmirror/quay-ca.pem\"\n",
                1,
            )
            .replace(
                "cache = true\n",
                "cache = true\nca_file = \"/etc/regmirror/gcr-ca.pem\"\n",
            )
        })
        .unwrap();
        for name in ["local.yaml", "mirror.yaml", "behind-tls-proxy.yaml"] {
            let doc: serde_yaml::Value = serde_yaml::from_str(file(&files, name)).unwrap();
            let clusters = doc["static_resources"]["clusters"].as_sequence().unwrap();
            let trusted = |cluster: &str| {
                let c = clusters.iter().find(|c| c["name"] == cluster).unwrap();
                c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
                    ["trusted_ca"]["filename"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            };
            assert_eq!(trusted("quay.io"), "/etc/regmirror/quay-ca.pem", "{name}");
            assert_eq!(trusted("ghcr.io"), envoy::SYSTEM_CA, "{name}");
            assert!(!file(&files, name).contains("gcr-ca.pem"), "{name}");
        }
        let cds: serde_yaml::Value =
            serde_yaml::from_str(file(&files, "xds/mirror/cds.yaml")).unwrap();
        assert!(cds["resources"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "quay.io"
                && c["transport_socket"]["typed_config"]["common_tls_context"]
                    ["validation_context"]["trusted_ca"]["filename"]
                    == "/etc/regmirror/quay-ca.pem"));
        assert!(file(&files, "istio/mirror.yaml")
            .contains("sni: \"quay.io\", caCertificates: \"/etc/regmirror/quay-ca.pem\""));
        let cache: crate::config::FileConfig = toml::from_str(file(&files, "cache.toml")).unwrap();
        assert_eq!(
            cache.upstream[0].ca_file.as_deref(),
            Some(Path::new("/etc/regmirror/gcr-ca.pem"))
        );
    }

    /// cache.toml is read by cache-service's own parser into the declared upstreams, and an
    /// upstream read from it is written back as the same text.
    #[test]
    fn cache_toml_is_what_cache_service_reads() {
        let files = render_edited(|t| {
            t.replace(
                "cache = true\n",
                "cache = true\nusername = \"mirror\"\npassword_env = \"GCR_PASSWORD\"\nclient_auth = \"upstream\"\nauthorization_ttl_seconds = 30\n",
            )
        })
        .unwrap();
        let text = file(&files, "cache.toml");
        let parsed: crate::config::FileConfig = toml::from_str(text).unwrap();
        let upstream = &parsed.upstream[0];
        assert_eq!(upstream.username.as_deref(), Some("mirror"));
        assert_eq!(upstream.client_auth, Some(ClientAuth::Upstream));
        assert_eq!(
            upstream.authorization_ttl(),
            std::time::Duration::from_secs(30)
        );
        let env = |k: &str| (k == "GCR_PASSWORD").then(|| "secret".to_owned());
        let config =
            crate::config::Config::merge(&crate::config::ServeArgs::default(), parsed, &env)
                .unwrap();
        let gcr = &config.upstreams["gcr.io"];
        assert_eq!(gcr.url.as_str(), "https://gcr.io/");
        assert_eq!(gcr.credentials.as_ref().unwrap().password, "secret");
        assert_eq!(
            gcr.redirect_hosts,
            [registry_rules::hosts::HostPattern::parse("storage.googleapis.com").unwrap()]
        );
        // Entry by entry: parsed and serialized again, the same text.
        let parsed: crate::config::FileConfig = toml::from_str(text).unwrap();
        let again = toml::to_string(&parsed).unwrap();
        assert!(text.ends_with(&again), "{text}\n---\n{again}");
        let shipped = std::fs::read_to_string(repo_root().join("envoy/cache.toml")).unwrap();
        let entry = &shipped[shipped.find("[[upstream]]").unwrap()..];
        let one: crate::config::FileConfig = toml::from_str(entry).unwrap();
        assert_eq!(toml::to_string(&one).unwrap(), entry);
    }

    #[test]
    fn cache_toml_bounds_where_cache_service_may_go() {
        let files = render_files(&repo_root().join("envoy/registries.toml")).unwrap();
        let parsed: toml::Value = toml::from_str(file(&files, "cache.toml")).unwrap();
        let gcr = &parsed["upstream"][0];
        assert_eq!(
            gcr["realm_hosts"],
            toml::Value::try_from(["gcr.io"]).unwrap()
        );
        assert_eq!(
            gcr["redirect_hosts"],
            toml::Value::try_from(["storage.googleapis.com"]).unwrap()
        );
    }

    /// Every virtual host that leaves the mirror strips the internal headers; the cache
    /// route keeps `x-mirror-registry`, which cache-service needs.
    #[test]
    fn internal_headers_are_stripped_on_every_route_but_the_cache() {
        let files = render_files(&repo_root().join("envoy/registries.toml")).unwrap();
        for name in ["local.yaml", "mirror.yaml", "behind-tls-proxy.yaml"] {
            let doc: serde_yaml::Value = serde_yaml::from_str(file(&files, name)).unwrap();
            let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"];
            let vhosts = hcm["route_config"]["virtual_hosts"].as_sequence().unwrap();
            let mut checked = 0;
            for vhost in vhosts {
                let routes = vhost["routes"].as_sequence().unwrap();
                let to_cache = routes
                    .iter()
                    .all(|r| r["route"]["cluster"] == "cache_service");
                if routes.iter().all(|r| r.get("direct_response").is_some()) {
                    continue;
                }
                let removed: Vec<&str> = vhost["request_headers_to_remove"]
                    .as_sequence()
                    .map(|s| s.iter().filter_map(|h| h.as_str()).collect())
                    .unwrap_or_default();
                if to_cache {
                    assert!(!removed.contains(&"x-mirror-registry"), "{name}: {vhost:?}");
                } else {
                    for header in envoy::INTERNAL_HEADERS {
                        assert!(
                            removed.contains(header),
                            "{name}: {header} kept on {vhost:?}"
                        );
                    }
                    checked += 1;
                }
            }
            // Including the dynamic-forward-proxy wildcard hosts.
            assert!(checked > 10, "{name}: {checked} upstream virtual hosts");
            assert!(vhosts
                .iter()
                .any(|v| v["name"] == "*.r2.cloudflarestorage.com"
                    && v.get("request_headers_to_remove").is_some()));
            let router = hcm["http_filters"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|f| f["name"] == "envoy.filters.http.router")
                .unwrap();
            assert_eq!(router["typed_config"]["suppress_envoy_headers"], true);
        }
    }

    const ACCESS: &str = "[access]\nallow_networks = [\"10.0.0.0/8\"]\n\
        rate_limit = { requests_per_second = 5, burst = 20 }\n\
        basic_auth = { htpasswd = \"/etc/regmirror/htpasswd\", header = \"x-mirror-authorization\" }\n\n";

    /// `[access]` becomes Envoy filters ahead of the mirror filter in every listener, and
    /// the mirror login goes nowhere past Envoy.
    #[test]
    fn access_is_enforced_before_the_filter_and_the_login_stays_on_the_mirror() {
        let shipped = render_files(&repo_root().join("envoy/registries.toml")).unwrap();
        let files =
            render_edited(|t| t.replacen("[[registry]]", &format!("{ACCESS}[[registry]]"), 1))
                .unwrap();
        for name in ["local.yaml", "mirror.yaml", "behind-tls-proxy.yaml"] {
            // Off unless declared.
            assert!(!file(&shipped, name).contains("basic_auth"), "{name}");
            let doc: serde_yaml::Value = serde_yaml::from_str(file(&files, name)).unwrap();
            let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"];
            let order: Vec<&str> = hcm["http_filters"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|f| f["name"].as_str())
                .take(4)
                .collect();
            assert_eq!(
                order,
                [
                    "envoy.filters.http.rbac",
                    "envoy.filters.http.local_ratelimit",
                    "envoy.filters.http.basic_auth",
                    "envoy.filters.http.wasm"
                ],
                "{name}"
            );
            let vhosts = hcm["route_config"]["virtual_hosts"].as_sequence().unwrap();
            for vhost in vhosts.iter().filter(|v| v["name"] != "unrouted") {
                let removed = vhost["request_headers_to_remove"].as_sequence().unwrap();
                assert!(
                    removed.iter().any(|h| h == "x-mirror-authorization"),
                    "{name}: {vhost:?}"
                );
            }
            let unrouted = vhosts.iter().find(|v| v["name"] == "unrouted").unwrap();
            let token_route = &unrouted["routes"][0];
            assert_eq!(token_route["match"]["prefix"], "/_mirror/auth/");
            assert_eq!(
                token_route["typed_per_filter_config"]["envoy.filters.http.basic_auth"]["disabled"],
                true
            );
        }
        assert!(file(&files, "istio/mirror.yaml").contains("[access] is not rendered"));
    }

    #[test]
    fn a_login_in_authorization_needs_every_registry_cached() {
        let error = render_edited(|t| {
            t.replacen(
                "[[registry]]",
                "[access]\nbasic_auth = { htpasswd = \"/etc/regmirror/htpasswd\" }\n\n[[registry]]",
                1,
            )
        })
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains("cache = true"), "{error}");
        // Cached, but its clients log in upstream: their tokens need that header too.
        let cached = |auth: &str| {
            render_edited(|t| {
                let only_gcr = &t[..t.find("[[registry]]").unwrap()];
                format!(
                    "{}[access]\nbasic_auth = {{ htpasswd = \"/etc/regmirror/htpasswd\" }}\n\n\
                     [[registry]]\nname = \"gcr.io\"\nupstream = \"gcr.io\"\nrealm_hosts = [\"gcr.io\"]\n\
                     cache = true\nclient_auth = \"{auth}\"\n",
                    only_gcr.replace("default_registry = \"docker.io\"", "default_registry = \"gcr.io\"")
                )
            })
        };
        assert!(cached("anonymous").is_ok());
        let error = cached("upstream").err().unwrap().to_string();
        assert!(error.contains("anonymous clients"), "{error}");
    }

    #[test]
    fn client_ca_requires_certificates_where_envoy_terminates_tls() {
        let files = render_edited(|t| {
            t.replacen(
                "[[registry]]",
                "[access]\nclient_ca = \"/etc/regmirror/clients-ca.crt\"\n\n[[registry]]",
                1,
            )
        })
        .unwrap();
        let doc: serde_yaml::Value = serde_yaml::from_str(file(&files, "mirror.yaml")).unwrap();
        let tls = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
            ["typed_config"];
        assert_eq!(tls["require_client_certificate"], true);
        assert_eq!(
            tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"],
            "/etc/regmirror/clients-ca.crt"
        );
        for name in ["local.yaml", "behind-tls-proxy.yaml"] {
            assert!(
                file(&files, name).contains("[access] client_ca is NOT enforced here"),
                "{name}"
            );
        }
    }

    /// The xDS layouts carry exactly the static render's listeners and clusters, and a
    /// bootstrap that reads them from files in a watched directory.
    #[test]
    fn xds_layout_is_the_static_config_split_into_watched_files() {
        let files = render_files(&repo_root().join("envoy/registries.toml")).unwrap();
        for (dir, static_name, watched) in [
            ("xds/local", "local.yaml", "envoy/xds/local"),
            ("xds/mirror", "mirror.yaml", "/etc/regmirror/xds"),
        ] {
            let yaml = |name: &str| -> serde_yaml::Value {
                serde_yaml::from_str(file(&files, name)).unwrap()
            };
            let static_doc = yaml(static_name);
            let bootstrap = yaml(&format!("{dir}/envoy.yaml"));
            assert!(bootstrap.get("static_resources").is_none(), "{dir}");
            assert_eq!(bootstrap["admin"], static_doc["admin"]);
            for (kind, key, type_url) in [
                ("lds", "listeners", "envoy.config.listener.v3.Listener"),
                ("cds", "clusters", "envoy.config.cluster.v3.Cluster"),
            ] {
                let source =
                    &bootstrap["dynamic_resources"][format!("{kind}_config")]["path_config_source"];
                assert_eq!(source["path"], format!("{watched}/{kind}.yaml").as_str());
                assert_eq!(source["watched_directory"]["path"], watched);
                let resources = yaml(&format!("{dir}/{kind}.yaml"));
                assert!(resources["version_info"]
                    .as_str()
                    .is_some_and(|v| v.len() == 16));
                let mut items = resources["resources"].as_sequence().unwrap().clone();
                let expected = static_doc["static_resources"][key].as_sequence().unwrap();
                assert_eq!(items.len(), expected.len(), "{dir} {kind}");
                for (item, expected) in items.iter_mut().zip(expected) {
                    let m = item.as_mapping_mut().unwrap();
                    let t = m.remove("@type").unwrap();
                    assert_eq!(
                        t.as_str(),
                        Some(format!("type.googleapis.com/{type_url}").as_str())
                    );
                    if kind == "lds" {
                        // The only difference: routes may name a cluster CDS delivers later.
                        let hcm = &mut item["filter_chains"][0]["filters"][0]["typed_config"];
                        let rc = hcm["route_config"].as_mapping_mut().unwrap();
                        assert_eq!(rc.remove("validate_clusters"), Some(false.into()));
                    }
                    assert_eq!(&*item, expected, "{dir} {kind}");
                }
            }
        }
        // Clusters are written before the listeners that route to them.
        let order: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        let at = |n: &str| order.iter().position(|o| *o == n).unwrap();
        assert!(at("xds/local/cds.yaml") < at("xds/local/lds.yaml"));
    }

    /// A write replaces the file in one step and leaves no temp file behind; an unchanged
    /// file is not rewritten (Envoy would reload it for nothing).
    #[test]
    fn writes_are_atomic_and_only_for_changes() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![Rendered {
            name: "xds/local/lds.yaml".to_owned(),
            content: "a\n".to_owned(),
        }];
        write_files(dir.path(), &files).unwrap();
        let path = dir.path().join("xds/local/lds.yaml");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a\n");
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = inode(&path);
        write_files(dir.path(), &files).unwrap();
        assert_eq!(inode(&path), before, "an unchanged file was rewritten");
        let changed = vec![Rendered {
            name: "xds/local/lds.yaml".to_owned(),
            content: "b\n".to_owned(),
        }];
        write_files(dir.path(), &changed).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b\n");
        // Renamed over, not written in place: a reader never sees a partial file.
        assert_ne!(inode(&path), before);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("xds/local"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["lds.yaml"]);
    }

    /// A list of replicas: one ring-hash cluster over them, health-checked, and every cache
    /// route hashing the filter's key and retrying on another replica. One address renders
    /// as before (no ring, no hash policy).
    #[test]
    fn cache_replicas_are_one_ring_with_health_checks_and_retries_elsewhere() {
        let files = render_edited(|t| {
            t.replace(
                "cache_service = \"127.0.0.1:5001\"",
                "cache_service = [\"10.0.0.1:5001\", \"10.0.0.2:5001\", \"cache-3:6000\"]",
            )
        })
        .unwrap();
        let shipped = render_files(&repo_root().join("envoy/registries.toml")).unwrap();
        for name in ["local.yaml", "mirror.yaml", "behind-tls-proxy.yaml"] {
            let doc: serde_yaml::Value = serde_yaml::from_str(file(&files, name)).unwrap();
            let cluster = doc["static_resources"]["clusters"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "cache_service")
                .unwrap();
            assert_eq!(cluster["lb_policy"], "RING_HASH", "{name}");
            let endpoints: Vec<String> = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|e| {
                    let sa = &e["endpoint"]["address"]["socket_address"];
                    format!(
                        "{}:{}",
                        sa["address"].as_str().unwrap(),
                        sa["port_value"].as_u64().unwrap()
                    )
                })
                .collect();
            assert_eq!(
                endpoints,
                ["10.0.0.1:5001", "10.0.0.2:5001", "cache-3:6000"]
            );
            let check = &cluster["health_checks"][0];
            assert_eq!(check["http_health_check"]["path"], "/readyz");
            assert_eq!(check["unhealthy_threshold"], 2);
            let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"];
            let routes: Vec<&serde_yaml::Value> = hcm["route_config"]["virtual_hosts"]
                .as_sequence()
                .unwrap()
                .iter()
                .flat_map(|v| v["routes"].as_sequence().unwrap())
                .filter(|r| r["route"]["cluster"] == "cache_service")
                .collect();
            assert_eq!(routes.len(), 2, "{name}: manifests and the rest");
            for route in routes {
                let route = &route["route"];
                assert_eq!(
                    route["hash_policy"][0]["header"]["header_name"],
                    registry_rules::route::CACHE_KEY_HEADER
                );
                let retry = &route["retry_policy"];
                assert!(retry["retry_on"].as_str().unwrap().contains("reset"));
                assert_eq!(
                    retry["retry_host_predicate"][0]["name"],
                    "envoy.retry_host_predicates.previous_hosts"
                );
            }
            let single = file(&shipped, name);
            assert!(!single.contains("RING_HASH") && !single.contains("hash_policy"));
        }
        // The xDS clusters carry the same ring.
        assert!(file(&files, "xds/mirror/cds.yaml").contains("lb_policy: RING_HASH"));
    }

    /// An invalid declaration is refused with its reason (`run` writes only after this).
    #[test]
    fn an_invalid_declaration_is_refused_with_its_reason() {
        let error = render_edited(|t| t.replacen("upstream = \"quay.io\"\n", "", 1))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("missing field `upstream`"), "{error}");
    }
}
