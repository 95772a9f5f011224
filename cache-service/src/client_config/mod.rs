//! `regmirror client-config`: what container runtimes need to pull through the mirror,
//! generated from the same registries declaration the mirror runs on.

use crate::render::declaration::{Declaration, Registry};
use std::fmt::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// containerd >= 1.5: one `<registry>/hosts.toml` per registry (`config_path` layout).
    Containerd,
    /// containerd < 1.5: the `registry.mirrors` block of config.toml.
    ContainerdLegacy,
    /// Docker: daemon.json `registry-mirrors` (Docker Hub only).
    Docker,
    /// podman, CRI-O, skopeo, buildah: registries.conf.
    Podman,
    /// k3s and RKE2: registries.yaml.
    K3s,
}

#[derive(Debug, clap::Args)]
pub struct ClientConfigArgs {
    /// The runtime to configure.
    #[arg(value_enum)]
    pub runtime: Runtime,
    /// The mirror's base URL, as clients reach it.
    #[arg(long)]
    pub mirror: String,
    /// A private CA the runtime must trust for the mirror (path on the client machine).
    #[arg(long)]
    pub ca: Option<String>,
    /// The registries declaration.
    #[arg(long, default_value = "envoy/registries.toml")]
    pub registries: PathBuf,
    /// containerd: write `<dir>/<registry>/hosts.toml` files instead of printing them.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The mirror as clients address it.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// `https://mirror.example.com:5000`, no trailing slash.
    pub url: String,
    /// `mirror.example.com:5000`.
    pub authority: String,
    pub insecure: bool,
    pub ca: Option<String>,
}

impl Mirror {
    pub fn parse(url: &str, ca: Option<String>) -> Result<Self, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("--mirror {url:?}: {e}"))?;
        let insecure = match parsed.scheme() {
            "https" => false,
            "http" => true,
            other => {
                return Err(format!(
                    "--mirror: scheme {other:?} is neither https nor http"
                ))
            }
        };
        if parsed.path() != "/" || parsed.query().is_some() {
            return Err(format!(
                "--mirror {url:?}: must be a host root (Docker and containerd reject paths)"
            ));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("--mirror {url:?}: no host"))?;
        let authority = match parsed.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Ok(Self {
            url: format!("{}://{authority}", parsed.scheme()),
            authority,
            insecure,
            ca,
        })
    }
}

/// One generated file: a path relative to the runtime's config directory, and its content.
pub struct ClientFile {
    pub path: String,
    pub content: String,
}

pub fn run(args: &ClientConfigArgs) -> ExitCode {
    let result = Declaration::load(&args.registries)
        .map_err(|e| e.to_string())
        .and_then(|declaration| {
            Mirror::parse(&args.mirror, args.ca.clone()).map(|mirror| (declaration, mirror))
        });
    let (declaration, mirror) = match result {
        Ok(ok) => ok,
        Err(error) => {
            eprintln!("regmirror client-config: {error}");
            return ExitCode::from(2);
        }
    };
    let files = generate(args.runtime, &declaration.registries, &mirror);
    match (&args.out, args.runtime) {
        (Some(dir), _) => {
            for file in &files {
                let path = dir.join(&file.path);
                let written = path
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&path, &file.content));
                if let Err(error) = written {
                    eprintln!("regmirror client-config: {}: {error}", path.display());
                    return ExitCode::from(2);
                }
                eprintln!("wrote {}", path.display());
            }
        }
        (None, _) => {
            for file in &files {
                if files.len() > 1 {
                    println!("# {}", file.path);
                }
                print!("{}", file.content);
            }
        }
    }
    if args.runtime == Runtime::Docker {
        eprintln!(
            "note: Docker's registry-mirrors applies to Docker Hub only. For other registries pull \
             {}/<registry>/<image> (e.g. {}/quay.io/coreos/etcd:v3.5) or <prefix>.<mirror domain>/<image>.",
            mirror.authority, mirror.authority
        );
    }
    ExitCode::SUCCESS
}

pub fn generate(runtime: Runtime, registries: &[Registry], mirror: &Mirror) -> Vec<ClientFile> {
    match runtime {
        Runtime::Containerd => registries
            .iter()
            .map(|r| ClientFile {
                path: format!("{}/hosts.toml", r.name),
                content: containerd_hosts(r, mirror),
            })
            .collect(),
        Runtime::ContainerdLegacy => vec![ClientFile {
            path: "config.toml".into(),
            content: containerd_legacy(registries, mirror),
        }],
        Runtime::Docker => vec![ClientFile {
            path: "daemon.json".into(),
            content: docker_daemon_json(mirror),
        }],
        Runtime::Podman => vec![ClientFile {
            path: "registries.conf".into(),
            content: registries_conf(registries, mirror),
        }],
        Runtime::K3s => vec![ClientFile {
            path: "registries.yaml".into(),
            content: k3s_registries(registries, mirror),
        }],
    }
}

fn toml_str(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

fn json_str(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

/// The registry's own endpoint, where containerd falls back when the mirror fails.
fn upstream_url(registry: &Registry) -> String {
    format!("https://{}", registry.upstream)
}

/// containerd sends `?ns=<registry>` to a mirror host, which is how the mirror tells
/// registries apart on one name.
fn containerd_hosts(registry: &Registry, mirror: &Mirror) -> String {
    let mut out = format!(
        "# /etc/containerd/certs.d/{}/hosts.toml (containerd config_path layout)\nserver = {}\n\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        registry.name,
        toml_str(&upstream_url(registry)),
        toml_str(&mirror.url)
    );
    if let Some(ca) = &mirror.ca {
        let _ = writeln!(out, "  ca = {}", toml_str(ca));
    }
    if mirror.insecure {
        out.push_str("  # plain HTTP mirror\n  skip_verify = true\n");
    }
    out
}

fn containerd_legacy(registries: &[Registry], mirror: &Mirror) -> String {
    let mut out = String::from(
        "# containerd < 1.5: merge into /etc/containerd/config.toml and restart containerd.\n",
    );
    for registry in registries {
        let _ = write!(
            out,
            "[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.{}]\n  endpoint = [{}, {}]\n",
            toml_str(&registry.name),
            toml_str(&mirror.url),
            toml_str(&upstream_url(registry))
        );
    }
    if let Some(ca) = &mirror.ca {
        let _ = write!(
            out,
            "[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{}.tls]\n  ca_file = {}\n",
            toml_str(&mirror.authority),
            toml_str(ca)
        );
    }
    out
}

fn docker_daemon_json(mirror: &Mirror) -> String {
    let insecure = if mirror.insecure {
        format!(
            ",\n  \"insecure-registries\": [{}]",
            json_str(&mirror.authority)
        )
    } else {
        String::new()
    };
    format!(
        "{{\n  \"registry-mirrors\": [{}]{insecure}\n}}\n",
        json_str(&mirror.url)
    )
}

/// Path-prefix mode: podman's mirror location `<mirror>/<registry>` asks for
/// `/v2/<registry>/<repository>/...`.
fn registries_conf(registries: &[Registry], mirror: &Mirror) -> String {
    let mut out = String::from(
        "# /etc/containers/registries.conf (podman, CRI-O, skopeo, buildah)\nunqualified-search-registries = [\"docker.io\"]\n",
    );
    for registry in registries {
        let _ = write!(
            out,
            "\n[[registry]]\nprefix = {}\nlocation = {}\n\n[[registry.mirror]]\nlocation = {}\n",
            toml_str(&registry.name),
            toml_str(&registry.name),
            toml_str(&format!("{}/{}", mirror.authority, registry.name))
        );
        if mirror.insecure {
            out.push_str("insecure = true\n");
        }
    }
    out
}

fn k3s_registries(registries: &[Registry], mirror: &Mirror) -> String {
    let mut out = String::from(
        "# /etc/rancher/k3s/registries.yaml (k3s, RKE2), then restart k3s\nmirrors:\n",
    );
    for registry in registries {
        let _ = writeln!(
            out,
            "  {}:\n    endpoint:\n    - {}",
            json_str(&registry.name),
            json_str(&mirror.url)
        );
    }
    if let Some(ca) = &mirror.ca {
        let _ = write!(
            out,
            "configs:\n  {}:\n    tls:\n      ca_file: {}\n",
            json_str(&mirror.authority),
            json_str(ca)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registries() -> Vec<Registry> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/registries.toml");
        Declaration::load(&path).unwrap().registries
    }

    fn mirror() -> Mirror {
        Mirror::parse(
            "https://mirror.example.com",
            Some("/etc/ssl/mirror-ca.crt".into()),
        )
        .unwrap()
    }

    fn only(files: Vec<ClientFile>) -> String {
        assert_eq!(files.len(), 1);
        files.into_iter().next().unwrap().content
    }

    #[test]
    fn mirror_url_must_be_a_host_root() {
        assert!(Mirror::parse("https://m.example.com/v2", None).is_err());
        assert!(Mirror::parse("ftp://m.example.com", None).is_err());
        let m = Mirror::parse("http://127.0.0.1:5000/", None).unwrap();
        assert_eq!(
            (m.url.as_str(), m.authority.as_str(), m.insecure),
            ("http://127.0.0.1:5000", "127.0.0.1:5000", true)
        );
    }

    /// What a user following containerd's hosts.toml docs would write for Docker Hub.
    #[test]
    fn containerd_hosts_toml_matches_a_hand_written_one() {
        let files = generate(Runtime::Containerd, &registries(), &mirror());
        let hub = files
            .iter()
            .find(|f| f.path == "docker.io/hosts.toml")
            .unwrap();
        let generated: toml::Value = toml::from_str(&hub.content).unwrap();
        let expected: toml::Value = toml::from_str(
            r#"
            server = "https://registry-1.docker.io"
            [host."https://mirror.example.com"]
              capabilities = ["pull", "resolve"]
              ca = "/etc/ssl/mirror-ca.crt"
            "#,
        )
        .unwrap();
        assert_eq!(generated, expected);
        assert_eq!(files.len(), registries().len());
    }

    #[test]
    fn containerd_legacy_block() {
        let generated: toml::Value = toml::from_str(&only(generate(
            Runtime::ContainerdLegacy,
            &registries(),
            &mirror(),
        )))
        .unwrap();
        let mirrors = &generated["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["mirrors"];
        assert_eq!(
            mirrors["quay.io"]["endpoint"],
            toml::Value::try_from(["https://mirror.example.com", "https://quay.io"]).unwrap()
        );
        assert_eq!(
            generated["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["configs"]
                ["mirror.example.com"]["tls"]["ca_file"]
                .as_str(),
            Some("/etc/ssl/mirror-ca.crt")
        );
    }

    #[test]
    fn docker_daemon_json_is_hub_only() {
        let generated: serde_json::Value =
            serde_json::from_str(&only(generate(Runtime::Docker, &registries(), &mirror())))
                .unwrap();
        assert_eq!(
            generated,
            serde_json::json!({ "registry-mirrors": ["https://mirror.example.com"] })
        );
        let http = Mirror::parse("http://10.0.0.5:5000", None).unwrap();
        let generated: serde_json::Value =
            serde_json::from_str(&only(generate(Runtime::Docker, &registries(), &http))).unwrap();
        assert_eq!(
            generated,
            serde_json::json!({ "registry-mirrors": ["http://10.0.0.5:5000"],
                                "insecure-registries": ["10.0.0.5:5000"] })
        );
    }

    #[test]
    fn registries_conf_uses_path_prefix_mirrors() {
        let generated: toml::Value =
            toml::from_str(&only(generate(Runtime::Podman, &registries(), &mirror()))).unwrap();
        let expected: toml::Value = toml::from_str(
            r#"
            prefix = "quay.io"
            location = "quay.io"
            [[mirror]]
            location = "mirror.example.com/quay.io"
            "#,
        )
        .unwrap();
        let quay = generated["registry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["prefix"].as_str() == Some("quay.io"))
            .unwrap();
        assert_eq!(quay, &expected);
    }

    #[test]
    fn k3s_registries_yaml() {
        let generated: serde_yaml::Value =
            serde_yaml::from_str(&only(generate(Runtime::K3s, &registries(), &mirror()))).unwrap();
        let expected: serde_yaml::Value = serde_yaml::from_str(
            r#"
            docker.io:
              endpoint: ["https://mirror.example.com"]
            "#,
        )
        .unwrap();
        assert_eq!(
            generated["mirrors"]["docker.io"], expected["docker.io"],
            "{generated:?}"
        );
        assert_eq!(
            generated["mirrors"].as_mapping().unwrap().len(),
            registries().len()
        );
        assert_eq!(
            generated["configs"]["mirror.example.com"]["tls"]["ca_file"].as_str(),
            Some("/etc/ssl/mirror-ca.crt")
        );
    }
}
