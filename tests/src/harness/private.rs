//! A mirror whose cached registry (gcr.io, the gcr-like upstream) authorizes every client
//! at the upstream with the client's own login (`client_auth = "upstream"`, issue 12).
//!
//! Built the way an operator builds it: a declaration (`registries.toml`) rendered by
//! `regmirror render`; the rendered `cache.toml` runs `regmirror serve` and the rendered
//! `local.yaml` runs Envoy (with the harness' usual substitution). The gcr front's realm is
//! `https://127.0.0.1:<port>/v2/token`, so that is the registry's upstream and realm host.

use crate::clients::{self, PulledDir};
use crate::mirror::Mirror;
use crate::proc::{run, Proc};
use crate::upstreams::{AccessLogEntry, Front, Upstreams};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The declaration of the private mirror: Docker Hub (the default registry) passes through,
/// gcr.io is cached and authorizes each client upstream.
/// `upstream`: where the cache reaches the gcr registry API (the gcr front, or an
/// [`Outage`] in front of it); its token realm stays on the gcr front.
pub fn declaration(
    up: &Upstreams,
    cache: SocketAddr,
    authorization_ttl: Option<u64>,
    upstream: SocketAddr,
) -> String {
    let realm = up.nginx.gcr_front;
    let ttl = authorization_ttl
        .map(|s| format!("authorization_ttl_seconds = {s}\n"))
        .unwrap_or_default();
    format!(
        r#"[mirror]
default_registry = "docker.io"
cache_service = "{cache}"

[[registry]]
name = "docker.io"
upstream = "registry-1.docker.io"
host_prefix = "docker"
realm_hosts = ["auth.docker.io"]
redirect_hosts = ["production.cloudflare.docker.com"]
library_namespace = true

[[registry]]
name = "gcr.io"
upstream = "{upstream}"
host_prefix = "gcr"
realm_hosts = ["{realm}"]
ca_file = {ca:?}
cache = true
# Each client logs in at gcr with its own credentials; the cache checks them per repository.
client_auth = "upstream"
{ttl}# containerd (`?ns=`) and path-prefix clients send their login to the shared host.
forward_client_credentials = true
"#,
        ca = up.pki.ca.display().to_string(),
    )
}

/// `regmirror serve` from a rendered `cache.toml`, plus Envoy from the rendered `local.yaml`.
pub struct PrivateMirror {
    pub mirror: Mirror,
    pub cache_addr: SocketAddr,
    pub cache: Proc,
    /// The declaration it was rendered from.
    pub declaration: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The process-wide private mirror (the default authorization TTL).
pub fn shared() -> &'static PrivateMirror {
    static P: OnceLock<Result<PrivateMirror, String>> = OnceLock::new();
    match P.get_or_init(|| {
        let up = crate::upstreams::shared();
        PrivateMirror::start(up, None, up.nginx.gcr_front).map_err(|e| format!("{e:#}"))
    }) {
        Ok(p) => p,
        Err(e) => panic!("the private mirror failed to start: {e}"),
    }
}

impl PrivateMirror {
    /// Renders [`declaration`] and starts both parts; `authorization_ttl`: seconds an
    /// authorization decision is reused (None: the default); `upstream`: where the cache
    /// reaches the gcr registry API.
    pub fn start(
        up: &'static Upstreams,
        authorization_ttl: Option<u64>,
        upstream: SocketAddr,
    ) -> Result<PrivateMirror> {
        let bin = crate::build::regmirror()?;
        let tmp = crate::fixture_dir("private")?;
        let dir = tmp.path();
        let cache_addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let declaration = dir.join("registries.toml");
        std::fs::write(
            &declaration,
            self::declaration(up, cache_addr, authorization_ttl, upstream),
        )?;
        let rendered = dir.join("rendered");
        run(Command::new(&bin)
            .arg("render")
            .arg("--registries")
            .arg(&declaration)
            .arg("--out")
            .arg(&rendered))
        .context("regmirror render of the private declaration")?;

        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(rendered.join("cache.toml"))
            .arg("--listen")
            .arg(cache_addr.to_string())
            .arg("--storage")
            .arg(&storage)
            .env("RUST_LOG", "info,regmirror=debug,cache_service=debug");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGMIRROR_") {
                cmd.env_remove(k);
            }
        }
        let mut cache = Proc::spawn("regmirror", &cmd, &dir.join("regmirror.log"))?;
        cache.wait_for_port(cache_addr, Duration::from_secs(30))?;
        let mirror = Mirror::start_with(
            up,
            &rendered.join("local.yaml"),
            true,
            BTreeMap::from([("cache_service".to_string(), cache_addr)]),
        )?;
        Ok(PrivateMirror {
            mirror,
            cache_addr,
            cache,
            declaration,
            _tmp: tmp,
        })
    }

    /// Host mode: `gcr.mirror.test:PORT/<name>:<tag>`.
    pub fn reference(&self, image: &crate::images::SeededImage) -> String {
        format!("{}/{}:{}", self.mirror.host("gcr"), image.name, image.tag)
    }

    /// `skopeo copy` of `reference` as `login` (`USER:PASSWORD`, `--src-creds`; None:
    /// `--src-no-creds`), every blob verified against its digest.
    pub fn skopeo_pull(&self, reference: &str, login: Option<&str>) -> Result<PulledDir> {
        let skopeo = crate::require_tool("skopeo", "apt-get install skopeo");
        let out = crate::temp_dir("skopeo")?;
        let mut cmd = Command::new(skopeo);
        cmd.args(["--insecure-policy", "copy", "--retry-times", "0"]);
        match login {
            Some(login) => cmd.arg("--src-creds").arg(login),
            None => cmd.arg("--src-no-creds"),
        };
        cmd.arg("--src-cert-dir")
            .arg(&self.mirror.up.pki.cert_dir)
            .arg(format!("docker://{reference}"))
            .arg(format!("dir:{}", out.path().display()));
        run(&mut cmd).with_context(|| format!("skopeo pull {reference} as {login:?}"))?;
        clients::verify_dir(out)
    }

    /// The gcr front's requests for `/v2/<repository>/…`, once nginx has written every line
    /// of the requests made so far (it writes after answering: wait until the log holds
    /// still for 300 ms).
    pub fn upstream_requests(&self, repository: &str) -> Vec<AccessLogEntry> {
        let prefix = format!("/v2/{repository}/");
        let read = || {
            self.mirror
                .up
                .access_log(Front::Gcr)
                .into_iter()
                .filter(|e| e.path().starts_with(&prefix))
                .collect::<Vec<_>>()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = read();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = read();
            if now.len() == last.len() || Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }

    /// Envoy's, the gcr front's and the cache-service's logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "{}\n--- gcr front ---\n{}\n--- regmirror ---\n{}",
            self.mirror.logs(),
            crate::proc::log_tail(&self.mirror.up.nginx.dir.join("gcr-front.log"), 40),
            self.cache.log_tail(80)
        )
    }
}

/// What the upstream did for one repository between two [`PrivateMirror::upstream_requests`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamCounts {
    /// `GET …/manifests/…` answered 200.
    pub manifest_gets: usize,
    /// `GET …/blobs/…` answered 200 (a content fetch).
    pub blob_gets: usize,
    /// `HEAD`s of any status: the cache's authorization checks.
    pub heads: usize,
}

impl UpstreamCounts {
    /// Counts `entries[from..]`.
    pub fn since(entries: &[AccessLogEntry], from: usize) -> UpstreamCounts {
        let mut c = UpstreamCounts::default();
        for e in entries.iter().skip(from) {
            match (e.method.as_str(), e.status()) {
                ("GET", 200) if e.path().contains("/manifests/") => c.manifest_gets += 1,
                ("GET", 200) if e.path().contains("/blobs/") => c.blob_gets += 1,
                ("HEAD", _) => c.heads += 1,
                _ => {}
            }
        }
        c
    }
}

/// A TCP forwarder to the gcr front that can be switched off: an upstream outage for one
/// cache (the shared front keeps serving everyone else). TLS passes through untouched.
pub struct Outage {
    pub addr: SocketAddr,
    state: Arc<OutageState>,
}

#[derive(Default)]
struct OutageState {
    down: AtomicBool,
    stopped: AtomicBool,
    /// Both ends of every forwarded connection, shut down when the upstream goes down.
    open: Mutex<Vec<TcpStream>>,
}

impl OutageState {
    fn cut(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for s in open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Outage {
    pub fn start(target: SocketAddr) -> Result<Outage> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(OutageState::default());
        let st = state.clone();
        std::thread::Builder::new()
            .name("outage-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if st.stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    // While down, an accepted connection is dropped: closed at once.
                    let Ok(client) = client else { continue };
                    if st.down.load(Ordering::SeqCst) {
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let clones = (
                        client.try_clone(),
                        server.try_clone(),
                        client.try_clone(),
                        server.try_clone(),
                    );
                    let (Ok(client_in), Ok(server_in), Ok(client_kept), Ok(server_kept)) = clones
                    else {
                        continue;
                    };
                    // A story opens a handful of connections: kept until cut or dropped.
                    st.open
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend([client_kept, server_kept]);
                    let pipe = |mut from: TcpStream, mut to: TcpStream| {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(Shutdown::Write);
                        });
                    };
                    pipe(client_in, server);
                    pipe(server_in, client);
                }
            })?;
        Ok(Outage { addr, state })
    }

    /// Down: new connections are closed, open ones cut. Up: forwarded again.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.state.cut();
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.state.cut();
        // Wakes the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}
