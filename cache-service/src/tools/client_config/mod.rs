//! `regmirror client-config`: what container runtimes need to pull through the mirror,
//! generated from the same registries declaration the mirror runs on.

use crate::tools::render::declaration::{Declaration, Registry};
use crate::upstream::base64_engine;
use registry_rules::declaration::ClientAuth;
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
    /// `USER:PASSWORD` the runtime presents to a mirror with `[access] basic_auth` (from the
    /// environment keeps it out of the process list).
    #[arg(long, env = "REGMIRROR_MIRROR_LOGIN", hide_env_values = true)]
    pub user: Option<String>,
    /// `USER:PASSWORD`: your own login at the registries the mirror authorizes upstream
    /// (`client_auth = "upstream"`), written where the runtime keeps a registry login for the
    /// mirror host; the mirror passes it to that registry's token service only.
    #[arg(long, env = "REGMIRROR_REGISTRY_LOGIN", hide_env_values = true)]
    pub registry_login: Option<String>,
    /// Client certificate for a mirror with `[access] client_ca` (path on the client).
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<String>,
    /// Its private key (path on the client).
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<String>,
}

/// The mirror credential a runtime presents (`[access] basic_auth`).
#[derive(Debug, Clone)]
pub struct Login {
    /// Lowercase header name: `authorization`, or a header of the mirror's own.
    pub header: String,
    pub user: String,
    pub password: String,
}

impl Login {
    pub fn parse(header: &str, user_password: &str) -> Result<Self, String> {
        match user_password.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => Ok(Self {
                header: header.to_owned(),
                user: user.to_owned(),
                password: password.to_owned(),
            }),
            _ => Err("--user must be USER:PASSWORD".to_owned()),
        }
    }

    /// The client's own login at a registry (`--registry-login`): sent in `Authorization`
    /// to the mirror's token endpoint, like any registry login.
    pub fn registry(user_password: &str) -> Result<Self, String> {
        Self::parse("authorization", user_password)
            .map_err(|_| "--registry-login must be USER:PASSWORD".to_owned())
    }

    fn in_authorization(&self) -> bool {
        self.header == "authorization"
    }

    fn basic(&self) -> String {
        format!(
            "Basic {}",
            base64_engine::encode(&format!("{}:{}", self.user, self.password))
        )
    }
}

/// `--registry-login`, refused where the mirror's own login already takes `Authorization`
/// (`mirror_header`: the header of `[access] basic_auth`): one header cannot carry both.
pub fn registry_login(
    value: Option<&str>,
    mirror_header: Option<&str>,
) -> Result<Option<Login>, String> {
    match (value, mirror_header) {
        (None, _) => Ok(None),
        (Some(_), Some("authorization")) => Err("--registry-login: the mirror's own login \
             ([access] basic_auth without `header`) takes the Authorization header a registry \
             login needs: give basic_auth a header of its own"
            .to_owned()),
        (Some(value), _) => Login::registry(value).map(Some),
    }
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
    /// (certificate, key) paths the runtime presents to the mirror (`[access] client_ca`).
    pub client_cert: Option<(String, String)>,
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
            client_cert: None,
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
    let login = result.and_then(|(declaration, mirror)| {
        let header = declaration
            .access
            .as_ref()
            .and_then(|a| a.credential_header());
        let login = match (header, &args.user) {
            (Some(header), Some(user)) => Some(Login::parse(header, user)?),
            (Some(_), None) if args.runtime != Runtime::Docker => {
                return Err("the mirror requires a login ([access] basic_auth in the \
                            declaration): pass --user USER:PASSWORD or set REGMIRROR_MIRROR_LOGIN"
                    .to_owned())
            }
            _ => None,
        };
        let registry_login = registry_login(args.registry_login.as_deref(), header)?;
        Ok((declaration, mirror, login, registry_login))
    });
    let (declaration, mut mirror, login, registry_login) = match login {
        Ok(ok) => ok,
        Err(error) => {
            eprintln!("regmirror client-config: {error}");
            return ExitCode::from(2);
        }
    };
    mirror.client_cert = args.client_cert.clone().zip(args.client_key.clone());
    let needs_cert = declaration
        .access
        .as_ref()
        .is_some_and(|a| a.client_ca.is_some());
    if needs_cert && mirror.client_cert.is_none() {
        eprintln!(
            "note: the mirror requires a client certificate ([access] client_ca): pass \
             --client-cert FILE --client-key FILE"
        );
    }
    let header = declaration
        .access
        .as_ref()
        .and_then(|a| a.credential_header());
    let has_login = login.is_some() || registry_login.is_some();
    let files = generate(
        args.runtime,
        &declaration.registries,
        &mirror,
        Logins {
            mirror: login.as_ref(),
            registry: registry_login.as_ref(),
        },
    );
    for note in login_notes(args.runtime, header, &mirror)
        .into_iter()
        .chain(client_cert_notes(args.runtime, &mirror))
        .chain(upstream_auth_notes(
            args.runtime,
            &declaration,
            &mirror,
            registry_login.is_some(),
        ))
    {
        eprintln!("note: {note}");
    }
    match (&args.out, args.runtime) {
        (Some(dir), _) => {
            // A login given here is in the files (hosts.toml headers, auth files).
            let readers = if has_login {
                super::Readers::Owner
            } else {
                super::Readers::All
            };
            for file in &files {
                let path = dir.join(&file.path);
                let written = super::write_atomically(&path, &file.content, readers);
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

/// The logins a runtime presents to the mirror host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Logins<'a> {
    /// The mirror's own login (`[access] basic_auth`).
    pub mirror: Option<&'a Login>,
    /// The client's login at the registries (`client_auth = "upstream"`, or a pass-through
    /// registry's private images); never together with a mirror login in `Authorization`.
    pub registry: Option<&'a Login>,
}

pub fn generate(
    runtime: Runtime,
    registries: &[Registry],
    mirror: &Mirror,
    logins: Logins,
) -> Vec<ClientFile> {
    let login = logins.mirror;
    // Runtimes that only know registry logins can present the credential only in
    // `Authorization`; a mirror header of its own needs containerd's hosts.toml.
    let registry_login = login.filter(|l| l.in_authorization()).or(logins.registry);
    match runtime {
        Runtime::Containerd => {
            let mut files: Vec<ClientFile> = registries
                .iter()
                .map(|r| ClientFile {
                    path: format!("{}/hosts.toml", r.name),
                    content: containerd_hosts(r, mirror, login),
                })
                .collect();
            // hosts.toml has no place for a registry login: ctr takes `--user`, and the
            // CRI plugin (kubelet's pulls) reads it from containerd's config.toml.
            if let Some(registry) = logins.registry {
                files.push(ClientFile {
                    path: CRI_AUTH_FILE.into(),
                    content: cri_registry_auth(mirror, registry),
                });
            }
            files
        }
        Runtime::ContainerdLegacy => vec![ClientFile {
            path: "config.toml".into(),
            content: containerd_legacy(registries, mirror, registry_login),
        }],
        Runtime::Docker => {
            let mut files = vec![ClientFile {
                path: "daemon.json".into(),
                content: docker_daemon_json(mirror),
            }];
            if let Some(login) = registry_login {
                // The docker CLI's ~/.docker/config.json: what `docker login <mirror>` writes.
                files.push(ClientFile {
                    path: "config.json".into(),
                    content: containers_auth_json(mirror, login),
                });
            }
            files
        }
        Runtime::Podman => {
            let mut files = vec![ClientFile {
                path: "registries.conf".into(),
                content: registries_conf(registries, mirror),
            }];
            if let Some(login) = registry_login {
                files.push(ClientFile {
                    path: "auth.json".into(),
                    content: containers_auth_json(mirror, login),
                });
            }
            files
        }
        Runtime::K3s => vec![ClientFile {
            path: "registries.yaml".into(),
            content: k3s_registries(registries, mirror, registry_login),
        }],
    }
}

/// What the user still has to do, or cannot do, for the mirror's login with `runtime`.
pub fn login_notes(runtime: Runtime, header: Option<&str>, mirror: &Mirror) -> Vec<String> {
    let Some(header) = header else {
        return vec![];
    };
    let authority = &mirror.authority;
    match (runtime, header == "authorization") {
        (Runtime::Containerd, _) => vec![],
        (Runtime::Docker, true) => vec![format!(
            "the mirror requires a login: run `docker login {authority}` on each Docker host"
        )],
        (Runtime::Podman, true) => vec![format!(
            "the mirror requires a login: install auth.json as ${{XDG_RUNTIME_DIR}}/containers/auth.json \
             (or /etc/containers/auth.json for CRI-O), or run `podman login {authority}`"
        )],
        (Runtime::ContainerdLegacy | Runtime::K3s, true) => vec![],
        (_, false) => vec![format!(
            "the mirror expects its login in the `{header}` header, which only containerd's \
             hosts.toml can send (`regmirror client-config containerd`); this runtime cannot pull \
             through it"
        )],
    }
}

/// The registries whose clients log in at the upstream themselves.
fn upstream_auth_registries(registries: &[Registry]) -> Vec<&Registry> {
    registries
        .iter()
        .filter(|r| r.cache && r.client_auth == Some(ClientAuth::Upstream))
        .collect()
}

/// What each runtime needs for registries with `client_auth = "upstream"`: the client's own
/// registry login, presented to the mirror host (and, on the shared host, passed on only
/// where `forward_client_credentials` allows it).
pub fn upstream_auth_notes(
    runtime: Runtime,
    declaration: &Declaration,
    mirror: &Mirror,
    login_written: bool,
) -> Vec<String> {
    let upstream = upstream_auth_registries(&declaration.registries);
    let Some(example) = upstream.first().map(|r| r.name.as_str()) else {
        return vec![];
    };
    let names = upstream
        .iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let authority = &mirror.authority;
    let mut notes = vec![format!(
        "{names}: each client is authorized at the registry with its own login \
         (client_auth = \"upstream\"); the runtime presents that login to the mirror host \
         {authority}, which passes it to the registry's token service only"
    )];
    let how = match (runtime, login_written) {
        (Runtime::Containerd, true) => format!(
            "ctr: `ctr images pull --hosts-dir /etc/containerd/certs.d --user USER:PASSWORD \
             {example}/<image>`; kubelet (CRI): merge {CRI_AUTH_FILE} into \
             /etc/containerd/config.toml and restart containerd"
        ),
        (Runtime::Containerd, false) => format!(
            "ctr: `ctr images pull --hosts-dir /etc/containerd/certs.d --user USER:PASSWORD \
             {example}/<image>`; kubelet (CRI): pass --registry-login USER:PASSWORD to write \
             the CRI plugin's registry.configs.\"{authority}\".auth ({CRI_AUTH_FILE})"
        ),
        (Runtime::ContainerdLegacy | Runtime::K3s, true) => {
            format!("the login is in the configs of {authority} above")
        }
        (Runtime::ContainerdLegacy | Runtime::K3s, false) => {
            format!("pass --registry-login USER:PASSWORD to write the login for {authority}")
        }
        (Runtime::Docker, true) => format!(
            "merge config.json into ~/.docker/config.json (or run `docker login {authority}`), \
             then pull {authority}/{example}/<image>"
        ),
        (Runtime::Docker, false) => {
            format!("run `docker login {authority}`, then pull {authority}/{example}/<image>")
        }
        (Runtime::Podman, true) => "install auth.json as ${XDG_RUNTIME_DIR}/containers/auth.json \
             (or /etc/containers/auth.json for CRI-O); skopeo: `--src-authfile auth.json` or \
             `--src-creds USER:PASSWORD`"
            .to_owned(),
        (Runtime::Podman, false) => format!(
            "run `podman login {authority}` (or pass --registry-login to write auth.json); \
             skopeo: `--src-creds USER:PASSWORD`"
        ),
    };
    notes.push(how);
    // The filter's own rule for which realm gets a client's login on the shared host.
    let compiled = registry_rules::config::compile(&declaration.filter_config(false)).ok();
    let forwards = |name: &str| {
        compiled
            .as_ref()
            .and_then(|c| c.registry(name))
            .is_some_and(|r| r.forward_client_credentials)
    };
    let suffix = declaration
        .mirror
        .host_suffix
        .as_deref()
        .unwrap_or("<host_suffix>");
    for r in upstream.iter().filter(|r| !forwards(&r.name)) {
        // Host mode: the registry's own host name is its own credential domain.
        let own = r
            .host_prefix
            .as_deref()
            .map(|prefix| format!(", or pull through its own host name {prefix}.{suffix}"))
            .unwrap_or_default();
        notes.push(format!(
            "{}: on the shared host {authority} (path prefix, containerd's ?ns=) the mirror \
             passes no client login to its token service (forward_client_credentials is not \
             set): set forward_client_credentials = true{own}",
            r.name
        ));
    }
    notes
}

/// The CRI plugin stanza for kubelet's pulls, beside the hosts.toml files.
const CRI_AUTH_FILE: &str = "cri-registry-auth.toml";

/// containerd 1.5-1.7's CRI plugin (config version 2): the hosts.toml directory and the
/// registry login it presents to the mirror host. Merged by hand: an `imports` file would
/// replace the whole CRI plugin table.
fn cri_registry_auth(mirror: &Mirror, login: &Login) -> String {
    format!(
        "# Merge into /etc/containerd/config.toml (version = 2) and restart containerd: kubelet's\n\
         # pulls (the CRI plugin) read the mirror from config_path and present this login to the\n\
         # mirror host. containerd 2.x: the same keys under [plugins.\"io.containerd.cri.v1.images\"].\n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{}.auth]\n  username = {}\n  password = {}\n",
        toml_str(&mirror.authority),
        toml_str(&login.user),
        toml_str(&login.password)
    )
}

/// Where Docker and containers/image read a client certificate for a host: no config key.
pub fn client_cert_notes(runtime: Runtime, mirror: &Mirror) -> Vec<String> {
    let dir = match (runtime, &mirror.client_cert) {
        (Runtime::Docker, Some(_)) => "/etc/docker/certs.d",
        (Runtime::Podman, Some(_)) => "/etc/containers/certs.d",
        _ => return vec![],
    };
    vec![format!(
        "the mirror requires a client certificate: copy it to {dir}/{}/client.cert and its key \
         to {dir}/{}/client.key",
        mirror.authority, mirror.authority
    )]
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
fn containerd_hosts(registry: &Registry, mirror: &Mirror, login: Option<&Login>) -> String {
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
    if let Some((cert, key)) = &mirror.client_cert {
        let _ = writeln!(out, "  client = [[{}, {}]]", toml_str(cert), toml_str(key));
    }
    if let Some(login) = login {
        // Sent to the mirror host only, on every request: the mirror's login.
        let _ = write!(
            out,
            "\n  [host.{}.header]\n    {} = [{}]\n",
            toml_str(&mirror.url),
            toml_str(&login.header),
            toml_str(&login.basic())
        );
    }
    out
}

fn containerd_legacy(registries: &[Registry], mirror: &Mirror, login: Option<&Login>) -> String {
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
    if mirror.ca.is_some() || mirror.client_cert.is_some() {
        let _ = writeln!(
            out,
            "[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{}.tls]",
            toml_str(&mirror.authority)
        );
    }
    if let Some(ca) = &mirror.ca {
        let _ = writeln!(out, "  ca_file = {}", toml_str(ca));
    }
    if let Some((cert, key)) = &mirror.client_cert {
        let _ = writeln!(
            out,
            "  cert_file = {}\n  key_file = {}",
            toml_str(cert),
            toml_str(key)
        );
    }
    if let Some(login) = login {
        let _ = write!(
            out,
            "[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{}.auth]\n  username = {}\n  password = {}\n",
            toml_str(&mirror.authority),
            toml_str(&login.user),
            toml_str(&login.password)
        );
    }
    out
}

/// containers-auth.json(5): podman, CRI-O, skopeo and buildah read it.
fn containers_auth_json(mirror: &Mirror, login: &Login) -> String {
    let auth = base64_engine::encode(&format!("{}:{}", login.user, login.password));
    let doc = serde_json::json!({ "auths": { &mirror.authority: { "auth": auth } } });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
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

fn k3s_registries(registries: &[Registry], mirror: &Mirror, login: Option<&Login>) -> String {
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
    if mirror.ca.is_some() || mirror.client_cert.is_some() || login.is_some() {
        let _ = write!(out, "configs:\n  {}:\n", json_str(&mirror.authority));
    }
    if mirror.ca.is_some() || mirror.client_cert.is_some() {
        out.push_str("    tls:\n");
    }
    if let Some(ca) = &mirror.ca {
        let _ = writeln!(out, "      ca_file: {}", json_str(ca));
    }
    if let Some((cert, key)) = &mirror.client_cert {
        let _ = writeln!(
            out,
            "      cert_file: {}\n      key_file: {}",
            json_str(cert),
            json_str(key)
        );
    }
    if let Some(login) = login {
        let _ = write!(
            out,
            "    auth:\n      username: {}\n      password: {}\n",
            json_str(&login.user),
            json_str(&login.password)
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
        Declaration::load(&path).unwrap().registries.clone()
    }

    fn mirror() -> Mirror {
        Mirror::parse(
            "https://mirror.example.com",
            Some("/etc/ssl/mirror-ca.crt".into()),
        )
        .unwrap()
    }

    fn mirror_login(login: &Login) -> Logins<'_> {
        Logins {
            mirror: Some(login),
            registry: None,
        }
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
        let files = generate(
            Runtime::Containerd,
            &registries(),
            &mirror(),
            Logins::default(),
        );
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
            Logins::default(),
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
        let generated: serde_json::Value = serde_json::from_str(&only(generate(
            Runtime::Docker,
            &registries(),
            &mirror(),
            Logins::default(),
        )))
        .unwrap();
        assert_eq!(
            generated,
            serde_json::json!({ "registry-mirrors": ["https://mirror.example.com"] })
        );
        let http = Mirror::parse("http://10.0.0.5:5000", None).unwrap();
        let generated: serde_json::Value = serde_json::from_str(&only(generate(
            Runtime::Docker,
            &registries(),
            &http,
            Logins::default(),
        )))
        .unwrap();
        assert_eq!(
            generated,
            serde_json::json!({ "registry-mirrors": ["http://10.0.0.5:5000"],
                                "insecure-registries": ["10.0.0.5:5000"] })
        );
    }

    #[test]
    fn registries_conf_uses_path_prefix_mirrors() {
        let generated: toml::Value = toml::from_str(&only(generate(
            Runtime::Podman,
            &registries(),
            &mirror(),
            Logins::default(),
        )))
        .unwrap();
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
        let generated: serde_yaml::Value = serde_yaml::from_str(&only(generate(
            Runtime::K3s,
            &registries(),
            &mirror(),
            Logins::default(),
        )))
        .unwrap();
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

    /// A mirror with `[access] basic_auth`: each runtime gets the login in the form it reads.
    #[test]
    fn mirror_login_reaches_each_runtime_in_its_own_form() {
        let basic = "Basic YWxpY2U6czNjcmV0"; // alice:s3cret
        let header = Login::parse("x-mirror-authorization", "alice:s3cret").unwrap();
        let files = generate(
            Runtime::Containerd,
            &registries(),
            &mirror(),
            mirror_login(&header),
        );
        let hub: toml::Value = toml::from_str(&files[0].content).unwrap();
        assert_eq!(
            hub["host"]["https://mirror.example.com"]["header"]["x-mirror-authorization"],
            toml::Value::try_from([basic]).unwrap()
        );
        // Registry-login runtimes cannot send a header of the mirror's own: no login
        // written, and the note says so.
        assert!(!only(generate(
            Runtime::K3s,
            &registries(),
            &mirror(),
            mirror_login(&header)
        ))
        .contains("alice"));
        let notes = login_notes(Runtime::Podman, Some("x-mirror-authorization"), &mirror());
        assert!(notes[0].contains("only containerd"), "{notes:?}");

        let authz = Login::parse("authorization", "alice:s3cret").unwrap();
        let files = generate(
            Runtime::Podman,
            &registries(),
            &mirror(),
            mirror_login(&authz),
        );
        let auth: serde_json::Value = serde_json::from_str(&files[1].content).unwrap();
        assert_eq!(files[1].path, "auth.json");
        assert_eq!(
            auth,
            serde_json::json!({ "auths": { "mirror.example.com": { "auth": "YWxpY2U6czNjcmV0" } } })
        );
        let k3s: serde_yaml::Value = serde_yaml::from_str(&only(generate(
            Runtime::K3s,
            &registries(),
            &mirror(),
            mirror_login(&authz),
        )))
        .unwrap();
        let config = &k3s["configs"]["mirror.example.com"];
        assert_eq!(config["auth"]["username"].as_str(), Some("alice"));
        assert_eq!(config["auth"]["password"].as_str(), Some("s3cret"));
        assert_eq!(
            config["tls"]["ca_file"].as_str(),
            Some("/etc/ssl/mirror-ca.crt")
        );
        let legacy: toml::Value = toml::from_str(&only(generate(
            Runtime::ContainerdLegacy,
            &registries(),
            &mirror(),
            mirror_login(&authz),
        )))
        .unwrap();
        let configs = &legacy["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["configs"];
        assert_eq!(
            configs["mirror.example.com"]["auth"]["username"].as_str(),
            Some("alice")
        );
        let notes = login_notes(Runtime::Docker, Some("authorization"), &mirror());
        assert!(
            notes[0].contains("docker login mirror.example.com"),
            "{notes:?}"
        );
        assert!(Login::parse("authorization", "alice").is_err());
    }

    /// A mirror with `[access] client_ca`: the certificate reaches each runtime's TLS settings.
    #[test]
    fn client_certificate_reaches_each_runtime() {
        let mut m = mirror();
        m.client_cert = Some((
            "/etc/regmirror/client.crt".into(),
            "/etc/regmirror/client.key".into(),
        ));
        let files = generate(Runtime::Containerd, &registries(), &m, Logins::default());
        let hub: toml::Value = toml::from_str(&files[0].content).unwrap();
        assert_eq!(
            hub["host"]["https://mirror.example.com"]["client"],
            toml::Value::try_from([["/etc/regmirror/client.crt", "/etc/regmirror/client.key"]])
                .unwrap()
        );
        let k3s: serde_yaml::Value = serde_yaml::from_str(&only(generate(
            Runtime::K3s,
            &registries(),
            &m,
            Logins::default(),
        )))
        .unwrap();
        let tls = &k3s["configs"]["mirror.example.com"]["tls"];
        assert_eq!(tls["cert_file"].as_str(), Some("/etc/regmirror/client.crt"));
        assert_eq!(tls["key_file"].as_str(), Some("/etc/regmirror/client.key"));
        assert_eq!(tls["ca_file"].as_str(), Some("/etc/ssl/mirror-ca.crt"));
        let legacy: toml::Value = toml::from_str(&only(generate(
            Runtime::ContainerdLegacy,
            &registries(),
            &m,
            Logins::default(),
        )))
        .unwrap();
        let tls = &legacy["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["configs"]
            ["mirror.example.com"]["tls"];
        assert_eq!(tls["cert_file"].as_str(), Some("/etc/regmirror/client.crt"));
        assert_eq!(tls["ca_file"].as_str(), Some("/etc/ssl/mirror-ca.crt"));
        let notes = client_cert_notes(Runtime::Docker, &m);
        assert!(
            notes[0].contains("/etc/docker/certs.d/mirror.example.com/client.cert"),
            "{notes:?}"
        );
        assert!(client_cert_notes(Runtime::Docker, &mirror()).is_empty());
    }

    /// A declaration whose gcr.io authorizes each client upstream; `forward`: its
    /// `forward_client_credentials`.
    fn upstream_declaration(forward: Option<bool>) -> Declaration {
        let forward = forward
            .map(|f| format!("forward_client_credentials = {f}\n"))
            .unwrap_or_default();
        let text = format!(
            "[mirror]\nhost_suffix = \"mirror.example.com\"\ndefault_registry = \"docker.io\"\n\
             cache_service = \"127.0.0.1:5001\"\n\n\
             [[registry]]\nname = \"docker.io\"\nupstream = \"registry-1.docker.io\"\n\
             host_prefix = \"docker\"\nrealm_hosts = [\"auth.docker.io\"]\n\n\
             [[registry]]\nname = \"gcr.io\"\nupstream = \"gcr.io\"\nhost_prefix = \"gcr\"\n\
             realm_hosts = [\"gcr.io\"]\ncache = true\nclient_auth = \"upstream\"\n{forward}"
        );
        Declaration::parse(&text, std::path::Path::new("registries.toml")).unwrap()
    }

    /// `--registry-login`: each runtime gets the client's registry login for the mirror host
    /// where it reads one; containerd's hosts.toml never carries it (it would go out on
    /// every request as the mirror's header), the CRI stanza does.
    #[test]
    fn registry_login_reaches_each_runtime_for_the_mirror_host() {
        let declaration = upstream_declaration(Some(true));
        let alice = Login::registry("alice:s3cret").unwrap();
        let logins = Logins {
            mirror: None,
            registry: Some(&alice),
        };
        let files = generate(
            Runtime::Containerd,
            &declaration.registries,
            &mirror(),
            logins,
        );
        assert_eq!(files.len(), declaration.registries.len() + 1);
        for hosts in files.iter().filter(|f| f.path.ends_with("hosts.toml")) {
            assert!(!hosts.content.contains("alice"), "{}", hosts.content);
            assert!(
                !hosts.content.contains("YWxpY2U6czNjcmV0"),
                "{}",
                hosts.content
            );
        }
        let cri = files.iter().find(|f| f.path == CRI_AUTH_FILE).unwrap();
        let cri: toml::Value = toml::from_str(&cri.content).unwrap();
        let registry = &cri["plugins"]["io.containerd.grpc.v1.cri"]["registry"];
        assert_eq!(
            registry["config_path"].as_str(),
            Some("/etc/containerd/certs.d")
        );
        let auth = &registry["configs"]["mirror.example.com"]["auth"];
        assert_eq!(auth["username"].as_str(), Some("alice"));
        assert_eq!(auth["password"].as_str(), Some("s3cret"));

        let expected_auths = serde_json::json!({ "auths": { "mirror.example.com": { "auth": "YWxpY2U6czNjcmV0" } } });
        let files = generate(Runtime::Podman, &declaration.registries, &mirror(), logins);
        let auth_json = files.iter().find(|f| f.path == "auth.json").unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&auth_json.content).unwrap(),
            expected_auths
        );
        let files = generate(Runtime::Docker, &declaration.registries, &mirror(), logins);
        let config = files.iter().find(|f| f.path == "config.json").unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&config.content).unwrap(),
            expected_auths
        );
        let k3s: serde_yaml::Value = serde_yaml::from_str(&only(generate(
            Runtime::K3s,
            &declaration.registries,
            &mirror(),
            logins,
        )))
        .unwrap();
        assert_eq!(
            k3s["configs"]["mirror.example.com"]["auth"]["username"].as_str(),
            Some("alice")
        );
        let legacy: toml::Value = toml::from_str(&only(generate(
            Runtime::ContainerdLegacy,
            &declaration.registries,
            &mirror(),
            logins,
        )))
        .unwrap();
        assert_eq!(
            legacy["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["configs"]
                ["mirror.example.com"]["auth"]["password"]
                .as_str(),
            Some("s3cret")
        );
        // Without a registry login nothing credential-shaped is written.
        let files = generate(
            Runtime::Containerd,
            &declaration.registries,
            &mirror(),
            Logins::default(),
        );
        assert!(files.iter().all(|f| f.path != CRI_AUTH_FILE));
    }

    #[test]
    fn registry_login_cannot_share_authorization_with_the_mirrors_login() {
        assert!(registry_login(Some("alice:s3cret"), Some("authorization")).is_err());
        assert!(registry_login(Some("alice"), None).is_err());
        let login = registry_login(Some("alice:s3cret"), Some("x-mirror-authorization"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (login.header.as_str(), login.user.as_str()),
            ("authorization", "alice")
        );
        assert!(registry_login(None, Some("authorization"))
            .unwrap()
            .is_none());
    }

    /// The notes name what each runtime needs for a registry in upstream mode, and warn when
    /// the shared host would withhold the login from the registry.
    #[test]
    fn upstream_auth_notes_say_what_each_runtime_needs() {
        let shipped = Declaration::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/registries.toml"),
        )
        .unwrap();
        assert!(upstream_auth_notes(Runtime::Containerd, &shipped, &mirror(), false).is_empty());

        let forwarded = upstream_declaration(Some(true));
        let notes = upstream_auth_notes(Runtime::Containerd, &forwarded, &mirror(), false);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("gcr.io: "), "{notes:?}");
        assert!(notes[1].contains("ctr images pull") && notes[1].contains("--user"));
        assert!(notes[1].contains("--registry-login"), "{notes:?}");
        let written = upstream_auth_notes(Runtime::Containerd, &forwarded, &mirror(), true);
        assert!(written[1].contains(CRI_AUTH_FILE), "{written:?}");
        let docker = upstream_auth_notes(Runtime::Docker, &forwarded, &mirror(), false);
        assert!(
            docker[1].contains("docker login mirror.example.com"),
            "{docker:?}"
        );
        let podman = upstream_auth_notes(Runtime::Podman, &forwarded, &mirror(), false);
        assert!(podman[1].contains("--src-creds"), "{podman:?}");

        for withheld in [None, Some(false)] {
            let notes = upstream_auth_notes(
                Runtime::Containerd,
                &upstream_declaration(withheld),
                &mirror(),
                false,
            );
            assert_eq!(notes.len(), 3, "{notes:?}");
            assert!(
                notes[2].contains("forward_client_credentials = true")
                    && notes[2].contains("gcr.mirror.example.com"),
                "{notes:?}"
            );
        }
    }
}
