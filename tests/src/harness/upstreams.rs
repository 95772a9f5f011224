//! The upstream fixtures: token server, two distribution registries with real token auth,
//! and nginx fronts that behave like Docker Hub (blob GET → 307 to a CDN that rejects
//! `Authorization`) and quay.io (token realm on the registry's own host; one repository,
//! `redirected/…`, answered `307` to `cdn.quay.io`, which challenges again with quay's
//! realm, the way registry.k8s.io redirects to Artifact Registry).
//!
//! Seeding: images are pushed with skopeo to a distribution instance WITHOUT auth (plain
//! HTTP) over the same storage directory, which is then stopped before the token-auth
//! instance starts. distribution's storage is the source of truth, and the token-auth
//! realm (`https://auth.docker.io/token`) is not resolvable from skopeo here.

use crate::images::SeededImage;
use crate::pki::Pki;
use crate::proc::{run, Proc};
use crate::token_server::{TokenServer, ISSUER};
use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub const HUB_REALM: &str = "https://auth.docker.io/token";
pub const HUB_SERVICE: &str = "registry.docker.io";
pub const QUAY_REALM: &str = "https://quay.io/v2/auth";
pub const QUAY_SERVICE: &str = "quay.io";
pub const HUB_HOST: &str = "registry-1.docker.io";
pub const HUB_AUTH_HOST: &str = "auth.docker.io";
pub const CDN_HOST: &str = "production.cloudflare.docker.com";
pub const QUAY_HOST: &str = "quay.io";
/// The quay redirect target that challenges again (realm `https://quay.io/v2/auth`).
pub const QUAY_CDN_HOST: &str = "cdn.quay.io";
/// The quay repository whose every `/v2/<name>/…` request is a `307` to [`QUAY_CDN_HOST`].
pub const QUAY_REDIRECTED_REPO: &str = "redirected/app";
/// gcr-like upstream (`cache = true` in the shipped declaration: reached through the
/// cache-service only). Like gcr.io its realm is on its own host, `/v2/token`; its host
/// here is `127.0.0.1:<gcr front port>` because the cache-service dials it by address.
pub const GCR_SERVICE: &str = "gcr.io";

/// A distribution registry process.
pub struct Distribution {
    pub addr: SocketAddr,
    pub storage: PathBuf,
    pub proc: Proc,
}

/// Which nginx server's access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    /// `registry-1.docker.io`.
    Hub,
    /// `production.cloudflare.docker.com`.
    Cdn,
    /// `quay.io`.
    Quay,
    /// `cdn.quay.io`: quay's redirect target, token auth with quay's realm.
    QuayCdn,
    /// The gcr-like upstream of the cache-service.
    Gcr,
}

/// One line of an nginx access log.
#[derive(Clone, Debug, Deserialize)]
pub struct AccessLogEntry {
    pub server: String,
    pub host: String,
    pub method: String,
    pub uri: String,
    pub status: String,
    /// "1" when the request carried `Authorization`.
    pub auth: String,
    pub sni: String,
    /// User-Agent.
    #[serde(default)]
    pub ua: String,
    /// The values of the headers that must not leave the mirror (`x-mirror-*`, what Envoy
    /// adds: `x-forwarded-*`, `x-envoy-*`, `x-request-id`) run together: empty when none came.
    #[serde(default)]
    pub internal: String,
}

impl AccessLogEntry {
    pub fn has_authorization(&self) -> bool {
        self.auth == "1"
    }
    pub fn status(&self) -> u16 {
        self.status.parse().unwrap_or(0)
    }
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or("")
    }
    pub fn query_param(&self, key: &str) -> Option<String> {
        let q = self.uri.split_once('?')?.1;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }
}

pub struct Nginx {
    pub hub_front: SocketAddr,
    pub cdn: SocketAddr,
    pub quay_front: SocketAddr,
    pub quay_cdn: SocketAddr,
    pub gcr_front: SocketAddr,
    pub dir: PathBuf,
    pub proc: Proc,
}

/// The seeded images.
pub struct Images {
    /// hub `library/alpine:3.20`, 3 layers.
    pub alpine: SeededImage,
    /// hub `library/multi:1`, OCI index linux/amd64 + linux/arm64.
    pub multi: SeededImage,
    /// hub `someorg/tool:v1`.
    pub tool: SeededImage,
    /// quay `coreos/etcd:v3.5`, 2 layers.
    pub etcd: SeededImage,
    /// quay `redirected/app:1`, 2 layers; quay.io answers its requests with a `307` to
    /// `cdn.quay.io`.
    pub redirected: SeededImage,
    /// gcr `distroless/static:nonroot`, 2 layers.
    pub distroless: SeededImage,
    /// gcr `google-containers/pause:3.9`, 1 layer (kept cold for the single-flight test).
    pub pause: SeededImage,
    /// gcr `private/secret:1`, 2 layers: only alice may pull it (token server grants).
    pub secret: SeededImage,
    /// gcr `private/revocable:1`, 1 layer: alice's grant is revoked by the revocation story
    /// (its own repository, so other stories keep theirs).
    pub revocable: SeededImage,
    /// gcr `private/node-agent:1`, 1 layer: alice's, pulled by containerd.
    pub node_agent: SeededImage,
}

pub struct Upstreams {
    pub pki: Pki,
    pub token: TokenServer,
    pub hub: Distribution,
    pub quay: Distribution,
    pub gcr: Distribution,
    pub nginx: Nginx,
    pub images: Images,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The process-wide upstream fixtures (started and seeded once per test binary).
pub fn shared() -> &'static Upstreams {
    static UP: OnceLock<Result<Upstreams, String>> = OnceLock::new();
    match UP.get_or_init(|| Upstreams::start().map_err(|e| format!("{e:#}"))) {
        Ok(u) => u,
        Err(e) => panic!("upstream fixtures failed to start: {e}"),
    }
}

fn distribution_config(
    storage: &Path,
    addr: SocketAddr,
    tls: Option<(&Path, &Path)>,
    auth: Option<(&str, &str, &Path)>,
) -> String {
    let mut s = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  secret: {}\n",
        storage.display(),
        hex::encode(rand::random::<[u8; 16]>())
    );
    if let Some((cert, key)) = tls {
        s.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        ));
    }
    if let Some((realm, service, bundle)) = auth {
        s.push_str(&format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            bundle.display()
        ));
    }
    s
}

pub fn start_distribution(
    name: &str,
    dir: &Path,
    storage: &Path,
    tls: Option<(&Path, &Path)>,
    auth: Option<(&str, &str, &Path)>,
) -> Result<Distribution> {
    let bin = crate::require_tool("docker-registry", "apt-get install docker-registry");
    let port = crate::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let cfg = dir.join(format!("{name}.yml"));
    std::fs::write(&cfg, distribution_config(storage, addr, tls, auth))?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg(&cfg);
    let mut proc = Proc::spawn(name, &cmd, &dir.join(format!("{name}.log")))?;
    proc.wait_for_port(addr, Duration::from_secs(20))?;
    Ok(Distribution {
        addr,
        storage: storage.to_path_buf(),
        proc,
    })
}

/// Pushes `image` (every platform) from its OCI layout to a registry without auth.
pub fn push(image: &SeededImage, registry: SocketAddr) -> Result<()> {
    let skopeo = crate::require_tool("skopeo", "apt-get install skopeo");
    run(Command::new(skopeo)
        .args([
            "--insecure-policy",
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--retry-times",
            "2",
        ])
        .arg(format!("oci:{}:{}", image.layout.display(), image.tag))
        .arg(format!("docker://{registry}/{}:{}", image.name, image.tag)))
    .with_context(|| format!("seed {}:{}", image.name, image.tag))?;
    Ok(())
}

impl Upstreams {
    pub fn start() -> Result<Upstreams> {
        crate::require_tool("nginx", "apt-get install nginx");
        crate::require_tool("skopeo", "apt-get install skopeo");
        crate::require_tool("docker-registry", "apt-get install docker-registry");
        let tmp = crate::fixture_dir("up")?;
        let dir = tmp.path().to_path_buf();
        let pki = Pki::generate()?;

        // Images.
        const MIB: usize = 1024 * 1024;
        let layouts = dir.join("layouts");
        let images = Images {
            alpine: crate::images::build_layout(
                &layouts.join("alpine"),
                "docker.io",
                "library/alpine",
                "3.20",
                1,
                &["amd64"],
                &[MIB + 17, 2 * MIB + 5, MIB / 2 + 3],
            )?,
            multi: crate::images::build_layout(
                &layouts.join("multi"),
                "docker.io",
                "library/multi",
                "1",
                2,
                &["amd64", "arm64"],
                &[MIB + 1],
            )?,
            tool: crate::images::build_layout(
                &layouts.join("tool"),
                "docker.io",
                "someorg/tool",
                "v1",
                3,
                &["amd64"],
                &[MIB / 4],
            )?,
            etcd: crate::images::build_layout(
                &layouts.join("etcd"),
                "quay.io",
                "coreos/etcd",
                "v3.5",
                4,
                &["amd64"],
                &[MIB + 9, MIB + MIB / 2],
            )?,
            redirected: crate::images::build_layout(
                &layouts.join("redirected"),
                "quay.io",
                QUAY_REDIRECTED_REPO,
                "1",
                7,
                &["amd64"],
                &[MIB + 11, MIB / 5],
            )?,
            distroless: crate::images::build_layout(
                &layouts.join("distroless"),
                "gcr.io",
                "distroless/static",
                "nonroot",
                5,
                &["amd64"],
                &[MIB + 33, MIB / 3],
            )?,
            pause: crate::images::build_layout(
                &layouts.join("pause"),
                "gcr.io",
                "google-containers/pause",
                "3.9",
                6,
                &["amd64"],
                &[2 * MIB + 7],
            )?,
            secret: crate::images::build_layout(
                &layouts.join("secret"),
                "gcr.io",
                "private/secret",
                "1",
                8,
                &["amd64"],
                &[MIB / 2 + 13, MIB / 7],
            )?,
            revocable: crate::images::build_layout(
                &layouts.join("revocable"),
                "gcr.io",
                "private/revocable",
                "1",
                9,
                &["amd64"],
                &[MIB / 3 + 1],
            )?,
            node_agent: crate::images::build_layout(
                &layouts.join("node-agent"),
                "gcr.io",
                "private/node-agent",
                "1",
                10,
                &["amd64"],
                &[MIB / 4 + 9],
            )?,
        };

        // Seed through auth-less distributions over the same storage directories.
        let hub_storage = dir.join("hub-storage");
        let quay_storage = dir.join("quay-storage");
        std::fs::create_dir_all(&hub_storage)?;
        std::fs::create_dir_all(&quay_storage)?;
        let gcr_storage = dir.join("gcr-storage");
        std::fs::create_dir_all(&gcr_storage)?;
        {
            let hub_seed = start_distribution("hub-seed", &dir, &hub_storage, None, None)?;
            let quay_seed = start_distribution("quay-seed", &dir, &quay_storage, None, None)?;
            let gcr_seed = start_distribution("gcr-seed", &dir, &gcr_storage, None, None)?;
            std::thread::scope(|s| -> Result<()> {
                let a = s.spawn(|| push(&images.alpine, hub_seed.addr));
                let b = s.spawn(|| push(&images.multi, hub_seed.addr));
                let c = s.spawn(|| push(&images.tool, hub_seed.addr));
                let d = s.spawn(|| push(&images.etcd, quay_seed.addr));
                let g = s.spawn(|| push(&images.redirected, quay_seed.addr));
                let e = s.spawn(|| push(&images.distroless, gcr_seed.addr));
                let f = s.spawn(|| push(&images.pause, gcr_seed.addr));
                let p = s.spawn(|| {
                    [&images.secret, &images.revocable, &images.node_agent]
                        .into_iter()
                        .try_for_each(|image| push(image, gcr_seed.addr))
                });
                for h in [a, b, c, d, e, f, g, p] {
                    h.join().map_err(|_| anyhow!("seeding thread panicked"))??;
                }
                Ok(())
            })?;
        }

        let token = TokenServer::start(&pki)?;
        let tls = Some((pki.cert.as_path(), pki.key.as_path()));
        let hub = start_distribution(
            "hub-registry",
            &dir,
            &hub_storage,
            tls,
            Some((HUB_REALM, HUB_SERVICE, &pki.token_cert)),
        )?;
        let quay = start_distribution(
            "quay-registry",
            &dir,
            &quay_storage,
            tls,
            Some((QUAY_REALM, QUAY_SERVICE, &pki.token_cert)),
        )?;
        let ports = NginxPorts::new()?;
        let gcr_realm = format!("https://{}/v2/token", ports.gcr_front);
        let gcr = start_distribution(
            "gcr-registry",
            &dir,
            &gcr_storage,
            tls,
            Some((&gcr_realm, GCR_SERVICE, &pki.token_cert)),
        )?;
        let nginx = start_nginx(
            &dir,
            &pki,
            &ports,
            Backends {
                token: token.addr,
                hub: hub.addr,
                hub_storage: &hub_storage,
                quay: quay.addr,
                gcr: gcr.addr,
            },
        )?;
        Ok(Upstreams {
            pki,
            token,
            hub,
            quay,
            gcr,
            nginx,
            images,
            dir,
            _tmp: tmp,
        })
    }

    /// What Envoy's clusters point at: cluster name (= upstream host) → fixture address.
    pub fn cluster_map(&self) -> BTreeMap<String, SocketAddr> {
        BTreeMap::from([
            (HUB_HOST.to_string(), self.nginx.hub_front),
            (HUB_AUTH_HOST.to_string(), self.token.addr),
            (CDN_HOST.to_string(), self.nginx.cdn),
            (QUAY_HOST.to_string(), self.nginx.quay_front),
            (QUAY_CDN_HOST.to_string(), self.nginx.quay_cdn),
        ])
    }

    /// A client trusting the test CA that resolves the fixture host names to the fixtures
    /// (`registry-1.docker.io` → hub front, `auth.docker.io` → token server, …).
    pub fn client(&self) -> Result<reqwest::blocking::Client> {
        let map = self.cluster_map();
        let resolve: Vec<(&str, SocketAddr)> = map.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.pki.client(&resolve)
    }

    /// Parsed access log of one nginx server.
    pub fn access_log(&self, front: Front) -> Vec<AccessLogEntry> {
        let file = match front {
            Front::Hub => "hub-front.log",
            Front::Cdn => "cdn.log",
            Front::Quay => "quay-front.log",
            Front::QuayCdn => "quay-cdn.log",
            Front::Gcr => "gcr-front.log",
        };
        std::fs::read_to_string(self.nginx.dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The access log of `front` once an entry matches `found`, or as it is after 5 s:
    /// nginx writes a line after the response is sent, so a fast client can be first.
    pub fn access_log_with(
        &self,
        front: Front,
        found: impl Fn(&AccessLogEntry) -> bool,
    ) -> Vec<AccessLogEntry> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let log = self.access_log(front);
            if log.iter().any(&found) || std::time::Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// An anonymous pull token for `repository:<name>:pull` from the token server.
    pub fn pull_token(&self, realm: &str, service: &str, name: &str) -> Result<String> {
        let resp = self
            .client()?
            .get(realm)
            .query(&[
                ("service", service),
                ("scope", &format!("repository:{name}:pull")),
            ])
            .send()?
            .error_for_status()?;
        let v: serde_json::Value = resp.json()?;
        v["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no token in {v}"))
    }
}

/// nginx listen addresses, chosen before the registries start (the gcr realm names one).
pub struct NginxPorts {
    pub hub_front: SocketAddr,
    pub cdn: SocketAddr,
    pub quay_front: SocketAddr,
    pub quay_cdn: SocketAddr,
    pub gcr_front: SocketAddr,
}

impl NginxPorts {
    fn new() -> Result<NginxPorts> {
        let p =
            || -> Result<SocketAddr> { Ok(format!("127.0.0.1:{}", crate::free_port()).parse()?) };
        Ok(NginxPorts {
            hub_front: p()?,
            cdn: p()?,
            quay_front: p()?,
            quay_cdn: p()?,
            gcr_front: p()?,
        })
    }
}

struct Backends<'a> {
    token: SocketAddr,
    hub: SocketAddr,
    hub_storage: &'a Path,
    quay: SocketAddr,
    gcr: SocketAddr,
}

fn start_nginx(dir: &Path, pki: &Pki, ports: &NginxPorts, b: Backends) -> Result<Nginx> {
    let bin = crate::require_tool("nginx", "apt-get install nginx");
    let ndir = dir.join("nginx");
    for sub in ["tmp", "empty"] {
        std::fs::create_dir_all(ndir.join(sub))?;
    }
    let conf = nginx_conf(&NginxConf {
        dir: &ndir,
        cert: &pki.cert,
        key: &pki.key,
        ca: &pki.ca,
        token: b.token,
        hub: b.hub,
        hub_storage: b.hub_storage,
        quay: b.quay,
        gcr: b.gcr,
        hub_front: ports.hub_front,
        cdn: ports.cdn,
        quay_front: ports.quay_front,
        quay_cdn: ports.quay_cdn,
        gcr_front: ports.gcr_front,
    });
    let conf_path = ndir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let err_log = ndir.join("error.log");
    run(Command::new(&bin)
        .arg("-t")
        .arg("-p")
        .arg(&ndir)
        .arg("-e")
        .arg(&err_log)
        .arg("-c")
        .arg(&conf_path))
    .context("nginx -t")?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-p")
        .arg(&ndir)
        .arg("-e")
        .arg(&err_log)
        .arg("-c")
        .arg(&conf_path);
    let mut proc = Proc::spawn("nginx", &cmd, &ndir.join("nginx.stdout"))?;
    for a in [
        ports.hub_front,
        ports.cdn,
        ports.quay_front,
        ports.quay_cdn,
        ports.gcr_front,
    ] {
        proc.wait_for_port(a, Duration::from_secs(10))
            .with_context(|| crate::proc::log_tail(&err_log, 40))?;
    }
    Ok(Nginx {
        hub_front: ports.hub_front,
        cdn: ports.cdn,
        quay_front: ports.quay_front,
        quay_cdn: ports.quay_cdn,
        gcr_front: ports.gcr_front,
        dir: ndir,
        proc,
    })
}

struct NginxConf<'a> {
    dir: &'a Path,
    cert: &'a Path,
    key: &'a Path,
    ca: &'a Path,
    token: SocketAddr,
    hub: SocketAddr,
    hub_storage: &'a Path,
    quay: SocketAddr,
    gcr: SocketAddr,
    hub_front: SocketAddr,
    cdn: SocketAddr,
    quay_front: SocketAddr,
    quay_cdn: SocketAddr,
    gcr_front: SocketAddr,
}

fn nginx_conf(c: &NginxConf) -> String {
    let d = c.dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  default_type application/octet-stream;
  map $http_authorization $mt_auth {{ "" "0"; default "1"; }}
  log_format mt escape=json '{{"server":"$server_name","host":"$host","method":"$request_method","uri":"$request_uri","status":"$status","auth":"$mt_auth","sni":"$ssl_server_name","ua":"$http_user_agent","internal":"$http_x_mirror_registry$http_x_mirror_cache_key$http_x_forwarded_for$http_x_forwarded_proto$http_x_envoy_external_address$http_x_envoy_expected_rq_timeout_ms$http_x_envoy_attempt_count$http_x_envoy_original_path$http_x_request_id"}}';
  ssl_certificate {cert};
  ssl_certificate_key {key};
  proxy_ssl_trusted_certificate {ca};
  proxy_ssl_verify on;
  proxy_ssl_server_name on;
  proxy_http_version 1.1;
  proxy_buffering off;
  proxy_request_buffering off;
  proxy_redirect off;
  client_max_body_size 0;

  # Docker Hub front (registry-1.docker.io): blob GETs are authorised against the hub
  # registry (HEAD with the client's Authorization) and answered with a 307 to the CDN,
  # exactly Docker Hub's shape; everything else goes to the hub registry.
  server {{
    listen {hub_front} ssl;
    server_name registry-1.docker.io;
    access_log {d}/hub-front.log mt;
    root {d}/empty;
    location ~ "^/v2/.+/blobs/sha256:[a-f0-9]{{64}}$" {{
      auth_request /_mt_blob_auth;
      try_files /_never_ @cdn_redirect;
    }}
    location = /_mt_blob_auth {{
      internal;
      proxy_method HEAD;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Host registry-1.docker.io;
      proxy_ssl_name registry-1.docker.io;
      proxy_pass https://{hub}$request_uri;
    }}
    location @cdn_redirect {{
      if ($uri ~ "^/v2/.+/blobs/sha256:(?<mt_p2>[a-f0-9]{{2}})(?<mt_rest>[a-f0-9]{{62}})$") {{
        return 307 "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/$mt_p2/$mt_p2$mt_rest/data?verify=$request_id";
      }}
      return 404;
    }}
    location / {{
      proxy_set_header Host registry-1.docker.io;
      proxy_ssl_name registry-1.docker.io;
      proxy_pass https://{hub};
    }}
  }}

  # The CDN: serves the hub registry's storage; like S3 it refuses a request that carries
  # Authorization next to a presigned query, and requires the `verify` argument.
  server {{
    listen {cdn} ssl;
    server_name production.cloudflare.docker.com;
    access_log {d}/cdn.log mt;
    location /registry-v2/ {{
      if ($http_authorization) {{
        return 400 "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>";
      }}
      if ($arg_verify = "") {{
        return 403 "<Error><Code>AccessDenied</Code><Message>missing verify</Message></Error>";
      }}
      alias {hub_storage}/;
    }}
    location / {{
      return 404;
    }}
  }}

  # quay.io: the token realm lives on the registry's own host. Every request for the
  # repository {redirected} is a 307 to cdn.quay.io (registry.k8s.io's shape: the target
  # registry challenges again).
  server {{
    listen {quay_front} ssl;
    server_name quay.io;
    access_log {d}/quay-front.log mt;
    location ^~ /v2/{redirected}/ {{
      return 307 "https://cdn.quay.io$request_uri";
    }}
    location = /v2/auth {{
      proxy_set_header Host quay.io;
      proxy_ssl_name quay.io;
      proxy_pass https://{token};
    }}
    location / {{
      proxy_set_header Host quay.io;
      proxy_ssl_name quay.io;
      proxy_pass https://{quay};
    }}
  }}

  # cdn.quay.io: the quay registry again (token auth, realm https://quay.io/v2/auth), so
  # a redirect to it is answered with a Bearer challenge of its own.
  server {{
    listen {quay_cdn} ssl;
    server_name cdn.quay.io;
    access_log {d}/quay-cdn.log mt;
    location / {{
      proxy_set_header Host quay.io;
      proxy_ssl_name quay.io;
      proxy_pass https://{quay};
    }}
  }}

  # gcr-like: realm /v2/token on the registry's own host (here 127.0.0.1:port).
  server {{
    listen {gcr_front} ssl;
    server_name gcr.io;
    access_log {d}/gcr-front.log mt;
    location = /v2/token {{
      proxy_set_header Host $http_host;
      proxy_ssl_name gcr.io;
      proxy_pass https://{token};
    }}
    location / {{
      proxy_set_header Host $http_host;
      proxy_ssl_name gcr.io;
      proxy_pass https://{gcr};
    }}
  }}
}}
"#,
        cert = c.cert.display(),
        key = c.key.display(),
        ca = c.ca.display(),
        hub_front = c.hub_front,
        hub = c.hub,
        cdn = c.cdn,
        hub_storage = c.hub_storage.display(),
        quay_front = c.quay_front,
        quay_cdn = c.quay_cdn,
        redirected = QUAY_REDIRECTED_REPO,
        token = c.token,
        quay = c.quay,
        gcr_front = c.gcr_front,
        gcr = c.gcr,
    )
}
