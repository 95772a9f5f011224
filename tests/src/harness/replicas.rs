//! Scale-out: N `regmirror serve` replicas on ONE S3 bucket prefix (the SeaweedFS fixture)
//! behind one Envoy whose `cache_service` cluster is what `regmirror render` writes for a
//! `[mirror] cache_service` list (ring hash on `x-mirror-cache-key`, health checks on
//! `/readyz`, retries to another host).
//!
//! Every replica reaches two upstreams: `gcr.io` (the shared gcr-like front: distribution
//! with token auth behind nginx) and `faulty.test` (the fault upstream through a
//! [`FaultProxy`] of its own, so a test sees which replica fetched what, can slow a body
//! down or take the upstream away). The declaration used is the shipped
//! `envoy/registries.toml` with the replicas' addresses and `faulty.test` added.

use crate::envoy::{Envoy, Substitution};
use crate::faults::{self, FaultProxy};
use crate::mirror::HOST_SUFFIX;
use crate::proc::{run, Proc};
use crate::s3::S3Server;
use crate::upstreams::{self, Upstreams, GCR_SERVICE};
use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The fault upstream's registry name in the test declaration (`x-mirror-registry`).
pub const FAULTY: &str = "faulty.test";

/// The file in a replica set's directory that Envoy's configuration is rendered from.
const DECLARATION: &str = "registries.toml";

/// The cache cluster's name in the rendered Envoy configuration.
const CACHE_CLUSTER: &str = "cache_service";

/// One `regmirror serve --storage s3://…` process; keeps its port across restarts (Envoy's
/// cluster names it).
pub struct Replica {
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// The fault upstream as this replica reaches it.
    pub proxy: FaultProxy,
    cmd: Command,
    proc: Option<Proc>,
}

impl Replica {
    /// Starts it (again) on its port and waits for `/readyz` (the store reachable).
    pub fn start(&mut self) -> Result<()> {
        if self.proc.is_some() {
            bail!("replica {} is still running", self.addr);
        }
        let mut proc = Proc::spawn("regmirror", &self.cmd, &self.log)?;
        proc.wait_for_port(self.addr, Duration::from_secs(30))?;
        let client = faults::client();
        let deadline = Instant::now() + Duration::from_secs(30);
        while faults::get(&client, &self.url("/readyz"), &[]).status != 200 {
            proc.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "replica {} not ready after 30 s:\n{}",
                    self.addr,
                    proc.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// SIGKILL (no cleanup possible), reaped.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            p.stop();
        }
    }

    /// SIGTERM (graceful), then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Whether this replica's fault proxy forwarded a GET whose path ends with `suffix`.
    pub fn fetched(&self, suffix: &str) -> usize {
        self.proxy.count("GET", suffix)
    }
}

/// N replicas on one bucket prefix behind one Envoy.
pub struct ScaleOut {
    pub up: &'static Upstreams,
    pub s3: &'static S3Server,
    /// The bucket prefix the replicas share (`s3://<bucket>/<prefix>`).
    pub prefix: String,
    pub replicas: Vec<Replica>,
    pub envoy: Envoy,
    tmp: tempfile::TempDir,
}

/// How the replicas serve a warm blob that is in the bucket.
#[derive(Debug, Clone, Copy)]
pub enum WarmReads {
    /// From their local tier once read whole (`--local-cache-size`), as deployed.
    LocalTier,
    /// By a 307 to a presigned URL of the object valid this many seconds (`--redirect`).
    Redirect { ttl_seconds: u64 },
}

impl ScaleOut {
    /// `n` replicas on a fresh prefix of `s3`'s bucket, and Envoy on the rendered declaration.
    pub fn start(s3: &'static S3Server, n: usize) -> Result<ScaleOut> {
        Self::start_with(s3, n, WarmReads::LocalTier)
    }

    /// [`Self::start`], serving warm blobs as `warm` says.
    pub fn start_with(s3: &'static S3Server, n: usize, warm: WarmReads) -> Result<ScaleOut> {
        crate::ensure_etc_hosts()?;
        let up = upstreams::shared();
        let fault_up = faults::shared();
        let bin = crate::build::regmirror()?;
        let tmp = crate::fixture_dir("scale")?;
        let prefix = format!("scale-{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut replicas = Vec::with_capacity(n);
        for i in 0..n {
            let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
            let proxy = FaultProxy::start(fault_up.registry.addr)?;
            let spool = tmp.path().join(format!("spool-{i}"));
            std::fs::create_dir_all(&spool)?;
            let mut cmd = Command::new(&bin);
            cmd.arg("serve")
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--storage")
                .arg(s3.url(&prefix))
                .arg("--spool-dir")
                .arg(&spool)
                .arg("--upstream")
                .arg(format!("{GCR_SERVICE}=https://{}", up.nginx.gcr_front))
                .arg("--upstream")
                .arg(format!("{FAULTY}={}", proxy.url()))
                // The fault upstream's realm is the harness' token server on its own port.
                .arg("--realm-host")
                .arg(format!("{FAULTY}=127.0.0.1:{}", up.token.addr.port()))
                .arg("--upstream-ca")
                .arg(&up.pki.ca)
                .env("RUST_LOG", "info,regmirror=debug")
                .env("NO_COLOR", "1");
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy();
                if k.starts_with("REGMIRROR_") || k.starts_with("AWS_") {
                    cmd.env_remove(&*k);
                }
            }
            cmd.envs(s3.env());
            match warm {
                // As deployed (compose `scale`, the Kubernetes Deployment).
                WarmReads::LocalTier => cmd.args(["--local-cache-size", "1GiB"]),
                WarmReads::Redirect { ttl_seconds } => cmd
                    .arg("--redirect")
                    .args(["--redirect-ttl", &ttl_seconds.to_string()]),
            };
            let mut r = Replica {
                addr,
                log: tmp.path().join(format!("regmirror-{i}.log")),
                proxy,
                cmd,
                proc: None,
            };
            r.start()?;
            replicas.push(r);
        }
        let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        let envoy = start_envoy(up, &addrs, tmp.path())?;
        let s = ScaleOut {
            up,
            s3,
            prefix,
            replicas,
            envoy,
            tmp,
        };
        s.wait_healthy(n)?;
        Ok(s)
    }

    /// Waits until Envoy's health checks see `n` healthy cache replicas.
    pub fn wait_healthy(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let clusters = self.envoy.admin("/clusters").unwrap_or_default();
            let healthy = clusters
                .lines()
                .filter(|l| {
                    l.starts_with(&format!("{CACHE_CLUSTER}::"))
                        && l.ends_with("::health_flags::healthy")
                })
                .count();
            if healthy >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{healthy} of {n} cache replicas healthy in Envoy after 60 s:\n{clusters}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Requests Envoy sent to each replica so far (its `rq_total` in `/clusters`), in order.
    pub fn requests_per_replica(&self) -> Result<Vec<u64>> {
        let clusters = self.envoy.admin("/clusters")?;
        self.replicas
            .iter()
            .map(|r| {
                let key = format!("{CACHE_CLUSTER}::{}::rq_total::", r.addr);
                clusters
                    .lines()
                    .find_map(|l| l.strip_prefix(&key))
                    .and_then(|n| n.trim().parse().ok())
                    .ok_or_else(|| anyhow!("no {key} in Envoy's /clusters"))
            })
            .collect()
    }

    /// Restarts every replica (all down first, then all up) and waits until Envoy routes to
    /// them again.
    pub fn restart_all(&mut self) -> Result<()> {
        for r in &mut self.replicas {
            r.stop();
        }
        for r in &mut self.replicas {
            r.start()?;
        }
        self.wait_healthy(self.replicas.len())
    }

    /// The bucket key of a blob: `<prefix>/blobs/sha256/<hex>` (the agreed layout).
    pub fn blob_key(&self, digest: &str) -> String {
        format!(
            "{}/blobs/sha256/{}",
            self.prefix,
            digest.trim_start_matches("sha256:")
        )
    }

    /// Keys under `<prefix>/blobs/` whose bytes do not hash to their name (must stay empty:
    /// nothing unverified is ever visible), and how many keys were checked.
    pub fn unverified_blobs(&self) -> Result<(Vec<String>, usize)> {
        let keys = self.s3.list(&format!("{}/blobs/", self.prefix))?;
        let mut bad = Vec::new();
        for k in &keys {
            let name = k.rsplit('/').next().unwrap_or_default();
            let got = crate::digest_of(&self.s3.read(k)?);
            if got != format!("sha256:{name}") {
                bad.push(format!("{k} hashes to {got}"));
            }
        }
        Ok((bad, keys.len()))
    }

    /// The declaration Envoy's configuration was rendered from (the shipped one with the
    /// replicas and `faulty.test`).
    pub fn declaration(&self) -> PathBuf {
        self.tmp.path().join(DECLARATION)
    }

    /// The port of Envoy's client-facing listener.
    pub fn port(&self) -> u16 {
        self.envoy.port()
    }

    /// `127.0.0.1:PORT` (path-prefix mode: `<addr>/faulty.test/<repo>:<tag>`).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Host mode: `<prefix>.mirror.test:PORT`.
    pub fn host(&self, prefix: &str) -> String {
        format!("{prefix}.{HOST_SUFFIX}:{}", self.port())
    }

    /// Envoy's log, the gcr front's access log and every replica's log tail.
    pub fn logs(&self) -> String {
        let mut s = format!(
            "--- envoy ---\n{}\n--- gcr front ---\n{}",
            self.envoy.log_tail(60),
            crate::proc::log_tail(&self.up.nginx.dir.join("gcr-front.log"), 20)
        );
        for (i, r) in self.replicas.iter().enumerate() {
            s.push_str(&format!(
                "\n--- replica {i} ({}, {}) ---\n{}",
                r.addr,
                if r.is_running() { "running" } else { "down" },
                crate::proc::log_tail(&r.log, 40)
            ));
        }
        s
    }
}

/// The shipped declaration with `cache_service` = the replicas and the fault upstream as a
/// cached registry (path-prefix mode only: `faulty.mirror.test` is not in /etc/hosts).
fn declaration(replicas: &[SocketAddr]) -> Result<String> {
    let shipped = crate::build::workspace_root().join("envoy/registries.toml");
    let text =
        std::fs::read_to_string(&shipped).with_context(|| format!("read {}", shipped.display()))?;
    let mut doc: toml::Table = toml::from_str(&text).context("parse registries.toml")?;
    let mirror = doc
        .get_mut("mirror")
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| anyhow!("registries.toml has no [mirror]"))?;
    mirror.insert(
        "cache_service".into(),
        toml::Value::Array(
            replicas
                .iter()
                .map(|a| toml::Value::String(a.to_string()))
                .collect(),
        ),
    );
    let registries = doc
        .get_mut("registry")
        .and_then(toml::Value::as_array_mut)
        .ok_or_else(|| anyhow!("registries.toml has no [[registry]]"))?;
    let faulty: toml::Table = toml::from_str(&format!(
        "name = \"{FAULTY}\"\nupstream = \"{FAULTY}\"\nhost_prefix = \"faulty\"\nrealm_hosts = [\"{FAULTY}\"]\ncache = true\n"
    ))?;
    registries.push(toml::Value::Table(faulty));
    Ok(toml::to_string(&doc)?)
}

/// Renders the declaration with `regmirror render` and starts Envoy on its `local.yaml`:
/// the usual substitution (fixture upstreams, test CA, fresh wasm, TLS, host suffix), with
/// the cache cluster's endpoints kept as rendered (the replicas' addresses).
pub fn start_envoy(up: &Upstreams, replicas: &[SocketAddr], dir: &Path) -> Result<Envoy> {
    let rendered = dir.join("rendered");
    std::fs::create_dir_all(&rendered)?;
    let decl = dir.join(DECLARATION);
    std::fs::write(&decl, declaration(replicas)?)?;
    run(Command::new(crate::build::regmirror()?)
        .arg("render")
        .arg("--registries")
        .arg(&decl)
        .arg("--out")
        .arg(&rendered)
        .arg("--no-envoy-validate"))
    .context("regmirror render of the scale-out declaration")?;
    let yaml = std::fs::read_to_string(rendered.join("local.yaml"))?;
    let s = Substitution::for_upstreams(up, true)?;
    let sub = crate::envoy::substitute(&yaml, &s, &mut crate::free_port)?;
    let mut doc: Value = serde_yaml::from_str(&sub.yaml)?;
    restore_cache_endpoints(&mut doc, replicas)?;
    access_log_upstreams(&mut doc);
    // The substitution sends every unmapped cluster to the blackhole and maps a cluster to
    // ONE address; the cache cluster's N endpoints are restored above, and this second pass
    // only hands out the ports again.
    let source = dir.join("scale-out.yaml");
    std::fs::write(&source, serde_yaml::to_string(&doc)?)?;
    Envoy::start(&source, &Substitution::default(), dir)
}

/// Envoy's access log lines (in its log, shown by [`ScaleOut::logs`]) name the replica each
/// request went to, the response flags and why a connection failed: a failed request in a
/// story says whether the ring, a retry or a replica answered it.
const ACCESS_LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(:PATH)%\" %RESPONSE_CODE% %RESPONSE_FLAGS% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% upstream=%UPSTREAM_HOST% cluster=%UPSTREAM_CLUSTER% failure=%UPSTREAM_TRANSPORT_FAILURE_REASON% details=%RESPONSE_CODE_DETAILS% %DURATION%ms\n";

fn access_log_upstreams(doc: &mut Value) {
    let listeners = doc
        .get_mut("static_resources")
        .and_then(|r| r.get_mut("listeners"))
        .and_then(Value::as_sequence_mut);
    for l in listeners.into_iter().flatten() {
        let chains = l.get_mut("filter_chains").and_then(Value::as_sequence_mut);
        for chain in chains.into_iter().flatten() {
            let filters = chain.get_mut("filters").and_then(Value::as_sequence_mut);
            for f in filters.into_iter().flatten() {
                let logs = f
                    .get_mut("typed_config")
                    .and_then(|t| t.get_mut("access_log"))
                    .and_then(Value::as_sequence_mut);
                for log in logs.into_iter().flatten() {
                    if let Some(tc) = log.get_mut("typed_config").and_then(Value::as_mapping_mut) {
                        let mut src = serde_yaml::Mapping::new();
                        src.insert("inline_string".into(), ACCESS_LOG_FORMAT.into());
                        let mut fmt = serde_yaml::Mapping::new();
                        fmt.insert("text_format_source".into(), Value::Mapping(src));
                        tc.insert("log_format".into(), Value::Mapping(fmt));
                    }
                }
            }
        }
    }
}

/// Sets the cache cluster's endpoints, in order, to `replicas` (Err unless the render named
/// exactly that many).
fn restore_cache_endpoints(doc: &mut Value, replicas: &[SocketAddr]) -> Result<()> {
    let cache = doc
        .get_mut("static_resources")
        .and_then(|r| r.get_mut("clusters"))
        .and_then(Value::as_sequence_mut)
        .and_then(|cs| {
            cs.iter_mut()
                .find(|c| c.get("name").and_then(Value::as_str) == Some(CACHE_CLUSTER))
        })
        .ok_or_else(|| anyhow!("no {CACHE_CLUSTER} cluster in the rendered config"))?;
    let mut addresses = Vec::new();
    let groups = cache
        .get_mut("load_assignment")
        .and_then(|l| l.get_mut("endpoints"))
        .and_then(Value::as_sequence_mut);
    for group in groups.into_iter().flatten() {
        let eps = group
            .get_mut("lb_endpoints")
            .and_then(Value::as_sequence_mut);
        for ep in eps.into_iter().flatten() {
            let sa = ep
                .get_mut("endpoint")
                .and_then(|e| e.get_mut("address"))
                .and_then(|a| a.get_mut("socket_address"))
                .and_then(Value::as_mapping_mut)
                .ok_or_else(|| anyhow!("a {CACHE_CLUSTER} endpoint without socket_address"))?;
            addresses.push(sa);
        }
    }
    if addresses.len() != replicas.len() {
        bail!(
            "the rendered {CACHE_CLUSTER} cluster has {} endpoints, expected {}",
            addresses.len(),
            replicas.len()
        );
    }
    for (sa, addr) in addresses.into_iter().zip(replicas) {
        sa.insert("address".into(), Value::String(addr.ip().to_string()));
        sa.insert("port_value".into(), Value::Number(addr.port().into()));
    }
    Ok(())
}
