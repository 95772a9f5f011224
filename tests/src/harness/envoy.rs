//! Runs Envoy from the shipped configuration with the one documented substitution
//! (docs/design.md, "Envoy"): each cluster whose name is a fixture host gets the fixture's
//! 127.0.0.1:port as its endpoint, every `trusted_ca` becomes the test CA, listener and
//! admin ports become free ports on 127.0.0.1, the wasm `filename` becomes the fresh
//! build. For the tests the filter JSON gets `host_suffix = "mirror.test"` (host mode via
//! `docker.mirror.test` …), and the listener may be switched to TLS with the leaf
//! certificate (skopeo/containerd over TLS).
//!
//! Clusters whose name is not in the map are pointed at a closed local port, so a test
//! never reaches the internet; the dynamic-forward-proxy cluster is left as shipped.

use crate::proc::{run, Proc};
use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What to substitute in a shipped Envoy configuration.
#[derive(Clone, Debug, Default)]
pub struct Substitution {
    /// Cluster name (= upstream host, or `cache_service`) → fixture address.
    pub clusters: BTreeMap<String, SocketAddr>,
    /// Address for every other cluster with a static endpoint (a closed local port).
    pub blackhole: Option<SocketAddr>,
    /// Replaces every `trusted_ca.filename`.
    pub ca: Option<PathBuf>,
    /// Replaces the wasm `filename`.
    pub wasm: Option<PathBuf>,
    /// Sets `host_suffix` in the filter's JSON configuration.
    pub host_suffix: Option<String>,
    /// Downstream TLS: (certificate chain, key). Listeners that already have TLS get these
    /// files; a listener without TLS gets a DownstreamTlsContext when `add_tls` is set.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub add_tls: bool,
}

impl Substitution {
    /// A shipped configuration against the upstream fixtures `up`: their clusters, every other
    /// static cluster on a closed port, their CA and leaf certificate, the fresh wasm and the
    /// tests' `host_suffix`; `add_tls` as on [`Substitution::add_tls`].
    pub fn for_upstreams(up: &crate::upstreams::Upstreams, add_tls: bool) -> Result<Self> {
        Ok(Self {
            clusters: up.cluster_map(),
            blackhole: Some(SocketAddr::from(([127, 0, 0, 1], crate::free_port()))),
            ca: Some(up.pki.ca.clone()),
            wasm: Some(crate::build::wasm()?),
            host_suffix: Some(crate::mirror::HOST_SUFFIX.to_string()),
            tls: Some((up.pki.cert.clone(), up.pki.key.clone())),
            add_tls,
        })
    }
}

/// The substituted configuration and the ports chosen for it.
#[derive(Clone, Debug)]
pub struct Substituted {
    pub yaml: String,
    /// Listener name → port, in configuration order.
    pub listeners: Vec<(String, u16)>,
    pub admin_port: u16,
}

fn key(s: &str) -> Value {
    Value::String(s.to_string())
}

fn get_mut<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    let mut cur = v;
    for p in path {
        cur = cur.as_mapping_mut()?.get_mut(key(p))?;
    }
    Some(cur)
}

fn set_socket_address(sa: &mut Value, addr: SocketAddr) -> Result<()> {
    let m = sa
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("socket_address is not a mapping"))?;
    m.insert(key("address"), Value::String(addr.ip().to_string()));
    m.insert(key("port_value"), Value::Number(addr.port().into()));
    Ok(())
}

/// Walks every mapping in `v`.
fn walk_mut(v: &mut Value, f: &mut dyn FnMut(&mut Mapping) -> Result<()>) -> Result<()> {
    match v {
        Value::Mapping(m) => {
            f(m)?;
            for (_, child) in m.iter_mut() {
                walk_mut(child, f)?;
            }
        }
        Value::Sequence(s) => {
            for child in s {
                walk_mut(child, f)?;
            }
        }
        Value::Tagged(t) => walk_mut(&mut t.value, f)?,
        _ => {}
    }
    Ok(())
}

fn downstream_tls(cert: &Path, key_file: &Path) -> Result<Value> {
    Ok(serde_yaml::from_str(&format!(
        r#"
name: envoy.transport_sockets.tls
typed_config:
  "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
  common_tls_context:
    alpn_protocols: [h2, http/1.1]
    tls_certificates:
    - certificate_chain: {{ filename: "{}" }}
      private_key: {{ filename: "{}" }}
"#,
        cert.display(),
        key_file.display()
    ))?)
}

/// Applies `s` to the YAML text of an Envoy bootstrap; `port` hands out free ports.
pub fn substitute(
    yaml: &str,
    s: &Substitution,
    port: &mut dyn FnMut() -> u16,
) -> Result<Substituted> {
    let mut doc: Value = serde_yaml::from_str(yaml).context("parse Envoy YAML")?;

    // Admin.
    let admin_port = port();
    let admin_sa = get_mut(&mut doc, &["admin", "address", "socket_address"])
        .ok_or_else(|| anyhow!("no admin.address.socket_address"))?;
    set_socket_address(admin_sa, SocketAddr::from(([127, 0, 0, 1], admin_port)))?;

    // Listeners.
    let mut listeners = Vec::new();
    if let Some(Value::Sequence(ls)) = get_mut(&mut doc, &["static_resources", "listeners"]) {
        for l in ls {
            let name = l
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let p = port();
            let sa = get_mut(l, &["address", "socket_address"])
                .ok_or_else(|| anyhow!("listener {name} has no socket_address"))?;
            set_socket_address(sa, SocketAddr::from(([127, 0, 0, 1], p)))?;
            if let (Some((cert, key_file)), Some(Value::Sequence(chains))) =
                (&s.tls, get_mut(l, &["filter_chains"]))
            {
                for chain in chains {
                    let Some(m) = chain.as_mapping_mut() else {
                        continue;
                    };
                    let has_hcm_with_wasm = serde_yaml::to_string(&*m)
                        .map(|t| t.contains("envoy.filters.http.wasm"))
                        .unwrap_or(false);
                    if m.contains_key(key("transport_socket")) {
                        // Shipped TLS: point its certificate files at the test leaf.
                        let ts = m
                            .get_mut(key("transport_socket"))
                            .ok_or_else(|| anyhow!("?"))?;
                        walk_mut(ts, &mut |mm| {
                            if let Some(Value::Sequence(certs)) =
                                mm.get_mut(key("tls_certificates"))
                            {
                                for c in certs {
                                    if let Some(f) = get_mut(c, &["certificate_chain", "filename"])
                                    {
                                        *f = Value::String(cert.display().to_string());
                                    }
                                    if let Some(f) = get_mut(c, &["private_key", "filename"]) {
                                        *f = Value::String(key_file.display().to_string());
                                    }
                                }
                            }
                            Ok(())
                        })?;
                    } else if s.add_tls && has_hcm_with_wasm {
                        m.insert(key("transport_socket"), downstream_tls(cert, key_file)?);
                    }
                }
            }
            listeners.push((name, p));
        }
    }
    if listeners.is_empty() {
        bail!("no listeners in the Envoy configuration");
    }

    // Clusters.
    if let Some(Value::Sequence(cs)) = get_mut(&mut doc, &["static_resources", "clusters"]) {
        for c in cs {
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let target = s.clusters.get(&name).copied().or(s.blackhole);
            let Some(target) = target else { continue };
            if let Some(Value::Sequence(eps)) = get_mut(c, &["load_assignment", "endpoints"]) {
                for ep in eps {
                    if let Some(Value::Sequence(lbs)) = get_mut(ep, &["lb_endpoints"]) {
                        for lb in lbs {
                            if let Some(sa) =
                                get_mut(lb, &["endpoint", "address", "socket_address"])
                            {
                                set_socket_address(sa, target)?;
                            }
                        }
                    }
                }
                // An IP endpoint resolves without DNS whatever the cluster type.
                if let Some(m) = c.as_mapping_mut() {
                    if m.get(key("type")).and_then(Value::as_str) == Some("LOGICAL_DNS") {
                        m.insert(key("type"), key("STATIC"));
                        m.remove(key("dns_lookup_family"));
                    }
                }
            }
        }
    }

    // Trusted CA, wasm file, filter JSON.
    let mut found_wasm = false;
    walk_mut(&mut doc, &mut |m| {
        if let (Some(ca), Some(Value::Mapping(t))) = (&s.ca, m.get_mut(key("trusted_ca"))) {
            t.insert(key("filename"), Value::String(ca.display().to_string()));
        }
        if let Some(Value::Mapping(local)) = m.get_mut(key("local")) {
            let is_wasm = local
                .get(key("filename"))
                .and_then(Value::as_str)
                .is_some_and(|f| f.ends_with(".wasm"));
            if is_wasm {
                found_wasm = true;
                if let Some(w) = &s.wasm {
                    local.insert(key("filename"), Value::String(w.display().to_string()));
                }
            }
        }
        let is_string_value = m
            .get(key("@type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t.ends_with("google.protobuf.StringValue"));
        if let (true, Some(suffix)) = (is_string_value, &s.host_suffix) {
            if let Some(Value::String(json)) = m.get_mut(key("value")) {
                let mut cfg: serde_json::Value =
                    serde_json::from_str(json).context("filter configuration is not JSON")?;
                if let Some(o) = cfg.as_object_mut() {
                    o.insert(
                        "host_suffix".into(),
                        serde_json::Value::String(suffix.clone()),
                    );
                }
                *json = serde_json::to_string(&cfg)?;
            }
        }
        Ok(())
    })?;
    if s.wasm.is_some() && !found_wasm {
        bail!("no wasm `filename` in the Envoy configuration");
    }

    Ok(Substituted {
        yaml: serde_yaml::to_string(&doc)?,
        listeners,
        admin_port,
    })
}

/// Envoy started the one way the project starts it: `regmirror envoy ARGS…` (func-e ≥ 1.5.0
/// with an explicit Envoy when func-e is on PATH, else `envoy`; see
/// cache-service/src/tools/render/launcher.rs).
pub fn command<I, S>(args: I) -> Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(crate::build::regmirror()?);
    cmd.arg("envoy").args(args);
    Ok(cmd)
}

/// `envoy --mode validate -c FILE` through the launcher. No Envoy installed is an error
/// naming the install step, not a panic.
pub fn validate(file: &Path) -> Result<()> {
    let mut cmd = command(["--mode", "validate", "--disable-hot-restart", "-c"])?;
    run(cmd.arg(file)).with_context(|| format!("envoy --mode validate -c {}", file.display()))?;
    Ok(())
}

/// The file-based xDS layout `regmirror render` writes (`envoy.yaml`, `lds.yaml`,
/// `cds.yaml`), substituted as a static config is. The ports chosen at the first
/// substitution are kept for every later one: Envoy refuses to move a listener's address.
pub struct XdsFiles {
    pub bootstrap: String,
    pub lds: String,
    pub cds: String,
    pub ports: Vec<u16>,
    pub listeners: Vec<(String, u16)>,
    pub admin_port: u16,
}

fn read_yaml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

/// Substitutes the layout rendered in `rendered` for a running test Envoy reading `dir`.
/// `ports`: the ports of an earlier substitution (admin, then listeners), or empty.
pub fn substitute_xds(
    rendered: &Path,
    s: &Substitution,
    dir: &Path,
    ports: &[u16],
) -> Result<XdsFiles> {
    let mut bootstrap = read_yaml(&rendered.join("envoy.yaml"))?;
    let lds = read_yaml(&rendered.join("lds.yaml"))?;
    let cds = read_yaml(&rendered.join("cds.yaml"))?;
    // As one static config, so the static substitution applies unchanged.
    let mut as_static = bootstrap.clone();
    let m = as_static
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("bootstrap is not a mapping"))?;
    m.remove(key("dynamic_resources"));
    let mut sr = Mapping::new();
    sr.insert(key("listeners"), lds["resources"].clone());
    sr.insert(key("clusters"), cds["resources"].clone());
    m.insert(key("static_resources"), Value::Mapping(sr));
    let mut given = Vec::new();
    let mut replay = ports.iter().copied();
    let sub = substitute(&serde_yaml::to_string(&as_static)?, s, &mut || {
        let p = replay.next().unwrap_or_else(crate::free_port);
        given.push(p);
        p
    })?;
    let done: Value = serde_yaml::from_str(&sub.yaml)?;
    let resources = |version: &Value, items: &Value| -> Result<String> {
        let mut r = Mapping::new();
        r.insert(key("version_info"), version.clone());
        r.insert(key("resources"), items.clone());
        Ok(serde_yaml::to_string(&r)?)
    };
    let lds_out = resources(&lds["version_info"], &done["static_resources"]["listeners"])?;
    let cds_out = resources(&cds["version_info"], &done["static_resources"]["clusters"])?;
    // The bootstrap: substituted admin, and the xDS paths in `dir`.
    if let Some(admin) = done.get("admin") {
        if let Some(b) = bootstrap.as_mapping_mut() {
            b.insert(key("admin"), admin.clone());
        }
    }
    for kind in ["lds", "cds"] {
        let source = get_mut(
            &mut bootstrap,
            &[
                "dynamic_resources",
                &format!("{kind}_config"),
                "path_config_source",
            ],
        )
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| anyhow!("no {kind}_config.path_config_source in the bootstrap"))?;
        source.insert(
            key("path"),
            Value::String(dir.join(format!("{kind}.yaml")).display().to_string()),
        );
        let mut watched = Mapping::new();
        watched.insert(key("path"), Value::String(dir.display().to_string()));
        source.insert(key("watched_directory"), Value::Mapping(watched));
    }
    Ok(XdsFiles {
        bootstrap: serde_yaml::to_string(&bootstrap)?,
        lds: lds_out,
        cds: cds_out,
        ports: given,
        listeners: sub.listeners,
        admin_port: sub.admin_port,
    })
}

/// Writes `content` to `path` as `regmirror render` does: temp file beside it, rename.
pub fn write_atomically(path: &Path, content: &str) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    let tmp = dir.join(format!(".harness-{}.tmp", rand::random::<u64>()));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A running Envoy.
pub struct Envoy {
    pub config: PathBuf,
    pub listeners: Vec<(String, u16)>,
    pub admin_port: u16,
    pub proc: Proc,
}

impl Envoy {
    /// Substitutes `source` into `dir/envoy.yaml` and starts Envoy on it through the
    /// launcher ([`command`]); waits for `/ready`.
    pub fn start(source: &Path, s: &Substitution, dir: &Path) -> Result<Envoy> {
        let yaml = std::fs::read_to_string(source)
            .with_context(|| format!("read {}", source.display()))?;
        let sub = substitute(&yaml, s, &mut crate::free_port)?;
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, &sub.yaml)?;
        Self::spawn(config, sub.listeners, sub.admin_port, dir)
    }

    /// Starts Envoy on the xDS layout rendered in `rendered` (see [`substitute_xds`]); its
    /// `lds.yaml` / `cds.yaml` live in `dir`, where [`Envoy::apply_xds`] replaces them.
    pub fn start_xds(rendered: &Path, s: &Substitution, dir: &Path) -> Result<(Envoy, Vec<u16>)> {
        let files = substitute_xds(rendered, s, dir, &[])?;
        std::fs::write(dir.join("cds.yaml"), &files.cds)?;
        std::fs::write(dir.join("lds.yaml"), &files.lds)?;
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, &files.bootstrap)?;
        let envoy = Self::spawn(config, files.listeners, files.admin_port, dir)?;
        Ok((envoy, files.ports))
    }

    /// Moves a new render's clusters, then listeners, into the watched directory `dir`.
    pub fn apply_xds(rendered: &Path, s: &Substitution, dir: &Path, ports: &[u16]) -> Result<()> {
        let files = substitute_xds(rendered, s, dir, ports)?;
        write_atomically(&dir.join("cds.yaml"), &files.cds)?;
        write_atomically(&dir.join("lds.yaml"), &files.lds)
    }

    fn spawn(
        config: PathBuf,
        listeners: Vec<(String, u16)>,
        admin_port: u16,
        dir: &Path,
    ) -> Result<Envoy> {
        let mut cmd = command(["-c".as_ref(), config.as_os_str()])?;
        cmd.args(["--concurrency", "2", "--disable-hot-restart"])
            .args(["--log-level", "info", "--component-log-level", "wasm:debug"]);
        let mut proc = Proc::spawn("envoy", &cmd, &dir.join("envoy.log"))?;
        wait_ready(&mut proc, admin_port, listeners.iter().map(|l| l.1))?;
        Ok(Envoy {
            config,
            listeners,
            admin_port,
            proc,
        })
    }

    /// The first listener's port (the client-facing one in the shipped files).
    pub fn port(&self) -> u16 {
        self.listeners.first().map(|l| l.1).unwrap_or(0)
    }

    /// The port of the listener named `name`.
    pub fn listener(&self, name: &str) -> Option<u16> {
        self.listeners.iter().find(|l| l.0 == name).map(|l| l.1)
    }

    /// GET on the admin interface (`/stats`, `/clusters`, …).
    pub fn admin(&self, path: &str) -> Result<String> {
        Ok(
            reqwest::blocking::get(format!("http://127.0.0.1:{}{path}", self.admin_port))?
                .text()?,
        )
    }

    /// The last lines of Envoy's log (includes the stdout access log).
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

/// Waits (60 s at most) for a started Envoy: its admin `/ready`, then each listener port.
pub fn wait_ready(
    proc: &mut Proc,
    admin_port: u16,
    listener_ports: impl IntoIterator<Item = u16>,
) -> Result<()> {
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    proc.wait_for_port(admin, Duration::from_secs(60))?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let start = Instant::now();
    loop {
        proc.check_running()?;
        let ready = client
            .get(format!("http://{admin}/ready"))
            .send()
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("envoy not ready after 60s; log:\n{}", proc.log_tail(80));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in listener_ports {
        proc.wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], p)),
            Duration::from_secs(20),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 9901 }
static_resources:
  listeners:
  - name: mirror_http
    address:
      socket_address: { address: 127.0.0.1, port_value: 5000 }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              config:
                vm_config:
                  code:
                    local:
                      filename: "target/wasm32-wasip1/wasm/mirror_filter.wasm"
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: "{\"host_suffix\":\"mirror.example.com\",\"registries\":[]}"
  clusters:
  - name: "registry-1.docker.io"
    type: LOGICAL_DNS
    dns_lookup_family: V4_PREFERRED
    load_assignment:
      cluster_name: "registry-1.docker.io"
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: "registry-1.docker.io", port_value: 443 }
    transport_socket:
      typed_config:
        sni: "registry-1.docker.io"
        common_tls_context:
          validation_context:
            trusted_ca: { filename: /etc/ssl/certs/ca-certificates.crt }
  - name: "ghcr.io"
    type: LOGICAL_DNS
    load_assignment:
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: "ghcr.io", port_value: 443 }
"#;

    #[test]
    fn substitution_replaces_endpoints_ca_ports_wasm_and_suffix() {
        let mut next = 40000;
        let s = Substitution {
            clusters: BTreeMap::from([(
                "registry-1.docker.io".to_string(),
                "127.0.0.1:1234".parse().unwrap(),
            )]),
            blackhole: Some("127.0.0.1:9".parse().unwrap()),
            ca: Some("/tmp/ca.crt".into()),
            wasm: Some("/tmp/f.wasm".into()),
            host_suffix: Some("mirror.test".into()),
            tls: Some(("/tmp/tls.crt".into(), "/tmp/tls.key".into())),
            add_tls: true,
        };
        let out = substitute(SAMPLE, &s, &mut || {
            next += 1;
            next
        })
        .unwrap();
        assert_eq!(out.admin_port, 40001);
        assert_eq!(out.listeners, vec![("mirror_http".to_string(), 40002)]);
        let v: Value = serde_yaml::from_str(&out.yaml).unwrap();
        let clusters = &v["static_resources"]["clusters"];
        let sa = &clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ["address"]["socket_address"];
        assert_eq!(sa["address"], "127.0.0.1");
        assert_eq!(sa["port_value"], 1234);
        assert_eq!(clusters[0]["type"], "STATIC");
        assert_eq!(
            clusters[0]["transport_socket"]["typed_config"]["sni"],
            "registry-1.docker.io"
        );
        let ca = &clusters[0]["transport_socket"]["typed_config"]["common_tls_context"]
            ["validation_context"]["trusted_ca"]["filename"];
        assert_eq!(ca, "/tmp/ca.crt");
        let gh = &clusters[1]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ["address"]["socket_address"];
        assert_eq!(gh["port_value"], 9);
        let l = &v["static_resources"]["listeners"][0];
        assert_eq!(l["address"]["socket_address"]["port_value"], 40002);
        let chain = &l["filter_chains"][0];
        assert_eq!(
            chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"][0]
                ["certificate_chain"]["filename"],
            "/tmp/tls.crt"
        );
        let wasm =
            &chain["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]["config"];
        assert_eq!(
            wasm["vm_config"]["code"]["local"]["filename"],
            "/tmp/f.wasm"
        );
        let json: serde_json::Value =
            serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(json["host_suffix"], "mirror.test");
        assert_eq!(json["registries"], serde_json::json!([]));
    }
}
