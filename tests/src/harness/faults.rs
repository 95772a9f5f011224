//! Fault injection for the cache-service: a real upstream that misbehaves on demand.
//!
//! - [`FaultUpstream`]: a real distribution registry with real token auth (realm = the
//!   harness' token server) on plain HTTP, so a proxy can see and alter what it serves,
//!   plus an auth-less distribution on the same storage that stays up for pushes (tags
//!   can be moved at any time). Process-wide: [`shared`].
//! - [`FaultProxy`]: an HTTP/1.1 proxy (tokio) in front of it, one per test. Every request
//!   is forwarded with `Connection: close` and recorded; rules keyed by a path substring
//!   (e.g. a blob digest) cut the response body after N bytes, flip one body byte, or
//!   throttle it; the upstream can be taken away ("stopped") and brought back at runtime.
//! - [`Regmirror`]: a `regmirror serve` with its own storage and log, killable with
//!   SIGKILL and restartable on the same storage.
//! - [`Tmpfs`]: a size-limited tmpfs mount, unmounted on drop.

use crate::images::SeededImage;
use crate::proc::{run, Proc};
use anyhow::{anyhow, bail, Context, Result};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// Service name distribution expects in the token's `aud`.
pub const SERVICE: &str = "faulty.test";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Upstream

/// One distribution process.
pub struct Registry {
    pub addr: SocketAddr,
    pub proc: Proc,
}

fn spawn_distribution(
    name: &str,
    dir: &Path,
    storage: &Path,
    auth: Option<(&str, &Path)>,
) -> Result<Registry> {
    let bin = crate::require_tool("docker-registry", "apt-get install docker-registry");
    let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
    let mut cfg = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  secret: {}\n",
        storage.display(),
        hex::encode(rand::random::<[u8; 16]>())
    );
    if let Some((realm, bundle)) = auth {
        cfg.push_str(&format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {}\n    rootcertbundle: {}\n",
            crate::token_server::ISSUER,
            bundle.display()
        ));
    }
    let cfg_path = dir.join(format!("{name}.yml"));
    std::fs::write(&cfg_path, cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg(&cfg_path);
    let mut proc = Proc::spawn(name, &cmd, &dir.join(format!("{name}.log")))?;
    proc.wait_for_port(addr, Duration::from_secs(20))?;
    Ok(Registry { addr, proc })
}

/// Images of the fault upstream (one per scenario, so scenarios never share blobs).
pub struct FaultImages {
    /// `faults/cut:1`, one 2 MiB layer.
    pub cut: SeededImage,
    /// `faults/flip:1`, one 1 MiB layer.
    pub flip: SeededImage,
    /// `faults/kill:1`, one 2 MiB layer.
    pub kill: SeededImage,
    /// `faults/big:1`, one 6 MiB layer (more than a 4 MiB tmpfs).
    pub big: SeededImage,
    /// `faults/small:1`, one 64 KiB layer.
    pub small: SeededImage,
    /// `faults/crowd:1`, one 3 MiB layer.
    pub crowd: SeededImage,
    /// `faults/tagmove:latest`, pushed at start.
    pub tag_a: SeededImage,
    /// Another image for `faults/tagmove:latest`, pushed by the test that moves the tag.
    pub tag_b: SeededImage,
}

/// The real upstream of the fault tests.
pub struct FaultUpstream {
    /// distribution with token auth (plain HTTP): what the proxies forward to.
    pub registry: Registry,
    /// distribution without auth on the same storage: pushes.
    pub seed: Registry,
    pub storage: PathBuf,
    pub images: FaultImages,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The process-wide fault upstream (uses the harness' shared PKI and token server).
pub fn shared() -> &'static FaultUpstream {
    static UP: OnceLock<Result<FaultUpstream, String>> = OnceLock::new();
    match UP.get_or_init(|| FaultUpstream::start().map_err(|e| format!("{e:#}"))) {
        Ok(u) => u,
        Err(e) => panic!("fault upstream failed to start: {e}"),
    }
}

impl FaultUpstream {
    fn start() -> Result<FaultUpstream> {
        crate::require_tool("skopeo", "apt-get install skopeo");
        let up = crate::upstreams::shared();
        let tmp = crate::fixture_dir("faults-up")?;
        let dir = tmp.path().to_path_buf();
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)?;
        const MIB: usize = 1024 * 1024;
        let l = dir.join("layouts");
        let b = |n: &str, name: &str, tag: &str, seed: u64, sizes: &[usize]| {
            crate::images::build_layout(&l.join(n), SERVICE, name, tag, seed, &["amd64"], sizes)
        };
        let images = FaultImages {
            cut: b("cut", "faults/cut", "1", 101, &[2 * MIB + 11])?,
            flip: b("flip", "faults/flip", "1", 102, &[MIB + 13])?,
            kill: b("kill", "faults/kill", "1", 103, &[2 * MIB + 17])?,
            big: b("big", "faults/big", "1", 104, &[6 * MIB + 19])?,
            small: b("small", "faults/small", "1", 105, &[64 * 1024])?,
            crowd: b("crowd", "faults/crowd", "1", 106, &[3 * MIB + 23])?,
            tag_a: b("tag-a", "faults/tagmove", "latest", 107, &[100 * 1024])?,
            tag_b: b("tag-b", "faults/tagmove", "latest", 108, &[200 * 1024])?,
        };
        let seed = spawn_distribution("faults-seed", &dir, &storage, None)?;
        let i = &images;
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = [
                &i.cut, &i.flip, &i.kill, &i.big, &i.small, &i.crowd, &i.tag_a,
            ]
            .into_iter()
            .map(|img| s.spawn(move || crate::upstreams::push(img, seed.addr)))
            .collect();
            for h in hs {
                h.join().map_err(|_| anyhow!("seeding thread panicked"))??;
            }
            Ok(())
        })?;
        let realm = format!("https://127.0.0.1:{}/v2/token", up.token.addr.port());
        let registry = spawn_distribution(
            "faults-registry",
            &dir,
            &storage,
            Some((&realm, &up.pki.token_cert)),
        )?;
        Ok(FaultUpstream {
            registry,
            seed,
            storage,
            images,
            dir,
            _tmp: tmp,
        })
    }

    /// Pushes `image` (its layout's tag) through the auth-less instance: moves the tag.
    pub fn push(&self, image: &SeededImage) -> Result<()> {
        crate::upstreams::push(image, self.seed.addr)
    }

    /// The token-auth registry's log tail.
    pub fn log_tail(&self, lines: usize) -> String {
        self.registry.proc.log_tail(lines)
    }
}

// ---------------------------------------------------------------------------------------
// Proxy

/// What to do to a matching response body (200 and 206 answers to GET only; the offsets
/// count from the start of that response's body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection after this many body bytes.
    CutAfter(u64),
    /// XOR the body byte at this offset with 0xff (same length, wrong content).
    FlipByte(u64),
    /// Send at most this many body bytes per second.
    Throttle(u64),
    /// Send this many body bytes, then nothing more for a minute, with the connection open.
    StallAfter(u64),
}

/// One request the proxy received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Status the upstream answered (0: no answer, e.g. the upstream was down).
    pub status: u16,
    /// The request's header lines as received, `(name, value)`.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// The value of header `name` (any case), if the request had it.
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::header_value(&self.headers, name)
    }
}

#[derive(Default)]
struct ProxyState {
    target: Mutex<Option<SocketAddr>>,
    rules: Mutex<Vec<(String, Fault)>>,
    seen: Mutex<Vec<Seen>>,
}

/// HTTP/1.1 fault-injecting proxy on 127.0.0.1 (stops accepting on drop).
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy forwarding to `target`.
    pub fn start(target: SocketAddr) -> Result<FaultProxy> {
        let rt = crate::runtime();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(ProxyState::default());
        *lock(&state.target) = Some(target);
        let st = state.clone();
        let task = rt.spawn(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            while let Ok((conn, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve_conn(conn, st).await;
                });
            }
        });
        Ok(FaultProxy { addr, state, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `fault` to responses whose path contains `path_contains` (replaces an
    /// existing rule for the same key).
    pub fn set_fault(&self, path_contains: &str, fault: Fault) {
        let mut rules = lock(&self.state.rules);
        rules.retain(|(k, _)| k != path_contains);
        rules.push((path_contains.to_string(), fault));
    }

    pub fn clear_faults(&self) {
        lock(&self.state.rules).clear();
    }

    /// `false`: the upstream is gone (connections are closed without an answer).
    pub fn set_upstream_up(&self, up: bool, target: SocketAddr) {
        *lock(&self.state.target) = up.then_some(target);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// Requests with `method` whose path ends with `suffix` (any answer or none).
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        lock(&self.state.seen)
            .iter()
            .filter(|s| s.method == method && s.path.ends_with(suffix))
            .count()
    }

    /// [`FaultProxy::count`] of requests the upstream answered 200 (not the 401 that
    /// precedes a token fetch).
    pub fn count_ok(&self, method: &str, suffix: &str) -> usize {
        lock(&self.state.seen)
            .iter()
            .filter(|s| s.method == method && s.path.ends_with(suffix) && s.status == 200)
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until the end of an HTTP head; returns (bytes read, index after CRLFCRLF).
async fn read_head(s: &TcpStream) -> io::Result<(Vec<u8>, usize)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((buf, i + 4));
        }
        if buf.len() > 1 << 20 {
            return Err(io::Error::other("head too large"));
        }
        let n = read_some(s, &mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve_conn(client: TcpStream, st: Arc<ProxyState>) -> io::Result<()> {
    let (buf, end) = read_head(&client).await?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let headers = lines
        .clone()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let index = {
        let mut seen = lock(&st.seen);
        seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            status: 0,
            headers,
        });
        seen.len() - 1
    };
    let Some(addr) = *lock(&st.target) else {
        return Ok(()); // upstream "stopped": close without an answer
    };
    let up = TcpStream::connect(addr).await?;
    let mut out = format!("{request_line}\r\n");
    let mut body_len = 0usize;
    for l in lines.filter(|l| !l.is_empty()) {
        let name = l
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "connection" | "keep-alive" | "proxy-connection"
        ) {
            continue;
        }
        if name == "content-length" {
            body_len = l
                .split_once(':')
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    write_all(&up, out.as_bytes()).await?;
    let mut rest = buf[end..].to_vec();
    let mut chunk = vec![0u8; 16 * 1024];
    while rest.len() < body_len {
        let n = read_some(&client, &mut chunk).await?;
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    write_all(&up, &rest).await?;

    let (rbuf, rend) = read_head(&up).await?;
    write_all(&client, &rbuf[..rend]).await?;
    let status: u16 = String::from_utf8_lossy(&rbuf[..rend])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if let Some(s) = lock(&st.seen).get_mut(index) {
        s.status = status;
    }
    let fault = if method == "GET" && matches!(status, 200 | 206) {
        lock(&st.rules)
            .iter()
            .find(|(k, _)| path.contains(k.as_str()))
            .map(|(_, f)| *f)
    } else {
        None
    };
    let mut pending = rbuf[rend..].to_vec();
    let mut offset = 0u64;
    let body_start = tokio::time::Instant::now();
    loop {
        let mut data = if pending.is_empty() {
            let n = read_some(&up, &mut chunk).await?;
            if n == 0 {
                break;
            }
            chunk[..n].to_vec()
        } else {
            std::mem::take(&mut pending)
        };
        let len = data.len() as u64;
        match fault {
            Some(f @ (Fault::CutAfter(n) | Fault::StallAfter(n))) if offset + len >= n => {
                let keep = (n - offset) as usize;
                write_all(&client, &data[..keep]).await?;
                if matches!(f, Fault::StallAfter(_)) {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                return Ok(()); // both sockets dropped: the body ends short
            }
            Some(Fault::FlipByte(k)) if (offset..offset + len).contains(&k) => {
                data[(k - offset) as usize] ^= 0xff;
                write_all(&client, &data).await?;
            }
            Some(Fault::Throttle(bps)) => {
                // Paced against the start of the body: `bps` on average.
                let piece = (bps / 20).max(1) as usize;
                let mut sent = offset;
                for p in data.chunks(piece) {
                    write_all(&client, p).await?;
                    sent += p.len() as u64;
                    let due = Duration::from_secs_f64(sent as f64 / bps.max(1) as f64);
                    tokio::time::sleep_until(body_start + due).await;
                }
            }
            _ => write_all(&client, &data).await?,
        }
        offset += len;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// regmirror

/// A `regmirror serve` process with its own storage.
pub struct Regmirror {
    pub addr: SocketAddr,
    pub storage: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    proc: Option<Proc>,
}

impl Regmirror {
    /// `regmirror serve --listen <free port> --storage <storage> --upstream faulty=<url>
    /// --upstream-ca <test CA> [extra…]` (the token realm is the harness' HTTPS token
    /// server); the log goes to `log`.
    pub fn start(
        storage: &Path,
        log: &Path,
        upstream_url: &str,
        extra: &[&str],
    ) -> Result<Regmirror> {
        let ca = &crate::upstreams::shared().pki.ca;
        let mut args = vec![
            "--upstream".to_string(),
            format!("faulty={upstream_url}"),
            "--upstream-ca".to_string(),
            ca.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = Regmirror {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            storage: storage.to_path_buf(),
            log: log.to_path_buf(),
            args,
            proc: None,
        };
        r.restart()?;
        Ok(r)
    }

    /// Starts it (again) on the same storage, on a fresh port.
    pub fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            bail!("regmirror is still running");
        }
        let bin = crate::build::regmirror()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--storage")
            .arg(&self.storage)
            .args(&self.args)
            .env("RUST_LOG", "info,regmirror=debug,cache_service=debug")
            .env("NO_COLOR", "1");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGMIRROR_") {
                cmd.env_remove(k);
            }
        }
        let mut proc = Proc::spawn("regmirror", &cmd, &self.log)?;
        proc.wait_for_port(addr, Duration::from_secs(30))?;
        self.addr = addr;
        self.proc = Some(proc);
        Ok(())
    }

    /// SIGKILL (no cleanup possible), reaped.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            p.stop(); // reaps it
        }
    }

    /// SIGTERM, as an orchestrator stopping it does; `check_running` says when it is gone.
    pub fn sigterm(&self) {
        if let Some(p) = &self.proc {
            let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Err when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match &mut self.proc {
            Some(p) => p.check_running(),
            None => bail!("regmirror is not running"),
        }
    }

    /// The stored file of a blob: `blobs/sha256/<2>/<hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    /// Files in `tmp/` (missing directory = none).
    pub fn tmp_files(&self) -> Vec<(PathBuf, u64)> {
        std::fs::read_dir(self.storage.join("tmp"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Regmirror {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------
// tmpfs

/// `mount -t tmpfs -o size=<size> tmpfs <path>`, unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path))
        .context("mount tmpfs (the tests run as root)")?;
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if Command::new("umount")
                .arg(&self.path)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A plain-HTTP client for a cache-service under test (no proxy; generous timeout, since
/// fault tests slow bodies down on purpose).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("http client")
}

/// What a client got for one GET.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub body: Vec<u8>,
    /// Transport error (connect, or the body ended early / was aborted).
    pub error: Option<String>,
}

impl Got {
    /// A 200 whose body arrived completely (whatever its content).
    pub fn complete_200(&self, size: u64) -> bool {
        self.status == 200 && self.error.is_none() && self.body.len() as u64 == size
    }
}

/// GET `url` with `headers`, reading the body as far as it comes.
pub fn get(client: &reqwest::blocking::Client, url: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match req.send() {
        Err(e) => Got {
            status: 0,
            body: Vec::new(),
            error: Some(format!("{e:#}")),
        },
        Ok(mut r) => {
            let status = r.status().as_u16();
            let mut body = Vec::new();
            let error = io::Read::read_to_end(&mut r, &mut body)
                .err()
                .map(|e| format!("{e:#}"));
            Got {
                status,
                body,
                error,
            }
        }
    }
}
