//! Shared pieces: result rows, medians, wrk parsing, RSS sampling, process launchers.

use anyhow::{anyhow, bail, Context, Result};
use mirror_tests::proc::{run, Proc};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Pairs per interleaved comparison unless `MIRROR_BENCH_PAIRS` says otherwise.
pub const DEFAULT_PAIRS: usize = 9;
/// Uncounted pairs before the counted ones (caches, JIT, connection pools warm up).
pub const WARMUP_PAIRS: usize = 1;

/// Counted pairs per comparison: `MIRROR_BENCH_PAIRS` (e.g. 3 for a smoke run), else
/// [`DEFAULT_PAIRS`].
pub fn pairs() -> Result<usize> {
    pairs_from(std::env::var("MIRROR_BENCH_PAIRS").ok().as_deref())
}

fn pairs_from(var: Option<&str>) -> Result<usize> {
    match var {
        None => Ok(DEFAULT_PAIRS),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("MIRROR_BENCH_PAIRS={v:?}: expected a whole number of pairs ≥ 1"),
        },
    }
}

/// Which side of a pair a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Mirror,
    Peer,
}

/// Runs of an interleaved comparison: `mirror[i]` and `peer[i]` ran back to back.
#[derive(Clone, Debug)]
pub struct Paired<T> {
    pub mirror: Vec<T>,
    pub peer: Vec<T>,
}

impl<T> Paired<T> {
    /// The spread of `f(mirror[i], peer[i])` over the pairs.
    pub fn per_pair(&self, f: impl Fn(&T, &T) -> f64) -> Spread {
        let v: Vec<f64> = self
            .mirror
            .iter()
            .zip(&self.peer)
            .map(|(m, p)| f(m, p))
            .collect();
        Spread::of(&v)
    }

    /// The spread of the per-pair ratios `value(mirror) / value(peer)`.
    pub fn ratio(&self, value: impl Fn(&T) -> f64) -> Spread {
        self.per_pair(|m, p| value(m) / value(p))
    }

    /// Median of `value` over one side's runs.
    pub fn median_of(&self, side: Side, value: impl Fn(&T) -> f64) -> f64 {
        let runs = match side {
            Side::Mirror => &self.mirror,
            Side::Peer => &self.peer,
        };
        median(&runs.iter().map(value).collect::<Vec<_>>())
    }
}

/// Runs `warmup` uncounted pairs, then `pairs` counted ones, each pair mirror then peer
/// (A B A B …): both runs of a pair see the same machine, so a drift of the machine
/// between two blocks of runs cannot turn into a ratio. `run` gets the side and the pair's
/// index (warm-up pairs included), and returns what it measured.
pub fn interleaved<T>(
    pairs: usize,
    warmup: usize,
    mut run: impl FnMut(Side, usize) -> Result<T>,
) -> Result<Paired<T>> {
    let mut out = Paired {
        mirror: Vec::with_capacity(pairs),
        peer: Vec::with_capacity(pairs),
    };
    for i in 0..warmup + pairs {
        let m = run(Side::Mirror, i).context("mirror side")?;
        let p = run(Side::Peer, i).context("peer side")?;
        if i >= warmup {
            out.mirror.push(m);
            out.peer.push(p);
        }
    }
    Ok(out)
}

/// Rounds per pair of [`interleaved_fastest`].
pub const BEST_OF: usize = 3;

/// As [`interleaved`], for a fixed job that needs no fresh state (a warm blob, a warm pull):
/// each pair is [`BEST_OF`] rounds of mirror then peer, and each side's figure is its fastest
/// run by `secs`. Other work on this shared machine only ever slows a run down, so the fastest
/// of a few is the closest to the job's own cost, while a side that is truly slower is slower
/// in every one of its runs; alternating within the pair lets both sides sample the same
/// moments. `run` still checks each run, and its first failure ends the comparison.
pub fn interleaved_fastest<T>(
    pairs: usize,
    warmup: usize,
    mut run: impl FnMut(Side, usize) -> Result<T>,
    secs: impl Fn(&T) -> f64,
) -> Result<Paired<T>> {
    let faster = |best: Option<T>, new: T| match best {
        Some(b) if secs(&b) <= secs(&new) => Some(b),
        _ => Some(new),
    };
    let mut out = Paired {
        mirror: Vec::with_capacity(pairs),
        peer: Vec::with_capacity(pairs),
    };
    for i in 0..warmup + pairs {
        let (mut m, mut p) = (None, None);
        for _ in 0..BEST_OF {
            m = faster(m, run(Side::Mirror, i).context("mirror side")?);
            p = faster(p, run(Side::Peer, i).context("peer side")?);
        }
        if let (Some(m), Some(p), true) = (m, p, i >= warmup) {
            out.mirror.push(m);
            out.peer.push(p);
        }
    }
    Ok(out)
}

/// Flushes dirty pages to disk, so that writing back what a fill stored does not fall into
/// the timed runs after it.
pub fn sync_disks() -> Result<()> {
    run(&mut Command::new("sync")).context("sync")?;
    Ok(())
}

/// Receive buffer of [`fetch_blob`]: a read per MiB keeps the client's own cost (one copy
/// out of the socket) well under what a server on this machine can send.
const FETCH_BUFFER: usize = 1 << 20;

/// GETs a plain-HTTP `url` (following up to 5 redirects) and discards the body as it comes:
/// `(body bytes, seconds from connecting to the last byte)`. A throughput row measures the
/// server, so the client must not be the limit: curl reads 16 KiB at a time and tops out
/// near what a `sendfile` server sends it here, while this reads a MiB per call.
pub fn fetch_blob(url: &str) -> Result<(u64, f64)> {
    let t = Instant::now();
    let mut url = url.to_string();
    for _ in 0..=5 {
        match fetch_once(&url)? {
            Fetched::Body(n) => return Ok((n, t.elapsed().as_secs_f64())),
            Fetched::Redirect(to) => url = to,
        }
    }
    bail!("GET {url}: more than 5 redirects")
}

/// One [`fetch_blob`] of `url` in MB/s; Err unless it read `size` bytes.
pub fn blob_mbps(url: &str, size: u64) -> Result<f64> {
    let (n, t) = fetch_blob(url)?;
    if n != size {
        bail!("{url}: {n} bytes, expected {size}");
    }
    Ok(n as f64 / 1e6 / t)
}

enum Fetched {
    Body(u64),
    Redirect(String),
}

fn fetch_once(url: &str) -> Result<Fetched> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut conn =
        std::net::TcpStream::connect(authority).with_context(|| format!("connect {authority}"))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: mirror-bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; FETCH_BUFFER];
    let mut received = Vec::new();
    let head_end = loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            bail!("GET {url}: connection closed in the response head");
        }
        received.extend_from_slice(buf.get(..n).unwrap_or_default());
        if let Some(i) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if received.len() > 64 << 10 {
            bail!("GET {url}: response head over 64 KiB");
        }
    };
    let head = String::from_utf8_lossy(received.get(..head_end).unwrap_or_default()).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {url}: no status in {head:?}"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    if (300..400).contains(&status) {
        let to =
            header("location").with_context(|| format!("GET {url}: {status} without Location"))?;
        return Ok(Fetched::Redirect(if to.starts_with('/') {
            format!("http://{authority}{to}")
        } else {
            to
        }));
    }
    if status != 200 {
        bail!("GET {url}: {status}");
    }
    if header("transfer-encoding").is_some() {
        bail!("GET {url}: a chunked body, expected a Content-Length");
    }
    let length: Option<u64> = header("content-length").and_then(|v| v.parse().ok());
    let mut got = (received.len() - head_end) as u64;
    while length.is_none_or(|l| got < l) {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    Ok(Fetched::Body(got))
}

/// Wall time of `f` in seconds.
pub fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Median and range of per-pair values (non-finite values, e.g. a division by zero, are
/// left out; `n` counts the ones kept).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let kept: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        Spread {
            median: median(&kept),
            min: kept.iter().copied().reduce(f64::min).unwrap_or(f64::NAN),
            max: kept.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
            n: kept.len(),
        }
    }
}

/// Which side of `target` is good.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

impl Goal {
    fn met(self, x: f64) -> bool {
        match self {
            Goal::AtLeast(t) => x >= t,
            Goal::AtMost(t) => x <= t,
        }
    }

    /// PASS when the whole range is on the good side of the target, MISS when the whole
    /// range is on the bad side, noise when the range straddles it (or nothing was
    /// measured): only a range that clears the target says more than the machine's noise.
    pub fn verdict(self, s: &Spread) -> Verdict {
        if s.n == 0 || !s.min.is_finite() || !s.max.is_finite() {
            Verdict::Noise
        } else if self.met(s.min) && self.met(s.max) {
            Verdict::Pass
        } else if !self.met(s.min) && !self.met(s.max) {
            Verdict::Miss
        } else {
            Verdict::Noise
        }
    }

    /// A deterministic figure (counts, bytes, callgrind): one value, no noise.
    pub fn verdict_one(self, x: f64) -> Verdict {
        if self.met(x) {
            Verdict::Pass
        } else {
            Verdict::Miss
        }
    }

    pub fn describe(self, unit: &str) -> String {
        match self {
            Goal::AtLeast(t) => format!("≥ {t}{unit}"),
            Goal::AtMost(t) => format!("≤ {t}{unit}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Miss,
    Noise,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::Noise => "noise",
        }
    }
}

/// The figure a row compares.
#[derive(Clone, Copy, Debug)]
pub enum Figure {
    None,
    /// One value: deterministic, or a single run.
    One(f64),
    /// Median and range over interleaved pairs.
    Pairs(Spread),
}

/// One line of the results table.
#[derive(Clone, Debug)]
pub struct Row {
    pub section: &'static str,
    pub metric: String,
    /// Value of the mirror side, formatted.
    pub ours: String,
    /// Value of the peer side, formatted (with the peer's name).
    pub peer: String,
    pub figure: Figure,
    /// Unit of the figure: `×` for ratios, ` µs` for differences.
    pub unit: &'static str,
    pub target: String,
    /// None: informational / not measured.
    pub verdict: Option<Verdict>,
}

impl Row {
    pub fn info(section: &'static str, metric: &str, ours: String, peer: String) -> Row {
        Row {
            section,
            metric: metric.to_string(),
            ours,
            peer,
            figure: Figure::None,
            unit: "×",
            target: "—".into(),
            verdict: None,
        }
    }

    pub fn not_measured(section: &'static str, metric: &str, why: &str) -> Row {
        Row::info(
            section,
            metric,
            format!("not measured: {}", why.replace('|', "/").replace('\n', " ")),
            "—".into(),
        )
    }

    /// A ratio of one measurement per side (`ours / peer`): for deterministic figures
    /// (bytes, instruction counts), never for wall-clock comparisons.
    pub fn ratio(
        section: &'static str,
        metric: &str,
        ours: (f64, &str),
        peer: (f64, &str),
        goal: Goal,
    ) -> Row {
        let ratio = ours.0 / peer.0;
        Row {
            section,
            metric: metric.to_string(),
            ours: format!("{:.2} {}", ours.0, ours.1),
            peer: format!("{:.2} {}", peer.0, peer.1),
            figure: Figure::One(ratio),
            unit: "×",
            target: goal.describe("×"),
            verdict: ratio.is_finite().then(|| goal.verdict_one(ratio)),
        }
    }

    /// An interleaved comparison: the sides' medians of `value`, and the median and range
    /// of the per-pair ratios `value(mirror) / value(peer)` judged against `goal`
    /// (None: informational).
    pub fn paired<T>(
        section: &'static str,
        metric: &str,
        runs: &Paired<T>,
        value: impl Fn(&T) -> f64,
        units: (&str, &str),
        goal: Option<Goal>,
    ) -> Row {
        let spread = runs.ratio(&value);
        Row {
            section,
            metric: metric.to_string(),
            ours: format!("{:.2} {}", runs.median_of(Side::Mirror, &value), units.0),
            peer: format!("{:.2} {}", runs.median_of(Side::Peer, &value), units.1),
            figure: Figure::Pairs(spread),
            unit: "×",
            target: goal.map_or_else(|| "info".into(), |g| g.describe("×")),
            verdict: goal.map(|g| g.verdict(&spread)),
        }
    }
}

/// Median of the finite values (NaN when there are none).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s.get(n / 2).copied().unwrap_or(f64::NAN),
        n => {
            let a = s.get(n / 2 - 1).copied().unwrap_or(f64::NAN);
            let b = s.get(n / 2).copied().unwrap_or(f64::NAN);
            (a + b) / 2.0
        }
    }
}

/// Median and the individual runs, for the log.
pub fn fmt_runs(v: &[f64]) -> String {
    let parts: Vec<String> = v.iter().map(|x| format!("{x:.3}")).collect();
    format!("median {:.3} of [{}]", median(v), parts.join(", "))
}

/// What one wrk run reports.
#[derive(Clone, Copy, Debug)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub non2xx: u64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|x| x * mult)
}

pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut non2xx = 0;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = parse_duration_us(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_duration_us(v);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            non2xx = v.trim().parse().unwrap_or(0);
        }
    }
    Ok(WrkResult {
        rps: rps.ok_or_else(|| anyhow!("no Requests/sec in wrk output:\n{out}"))?,
        p50_us: p50.ok_or_else(|| anyhow!("no 50% latency in wrk output:\n{out}"))?,
        p99_us: p99.ok_or_else(|| anyhow!("no 99% latency in wrk output:\n{out}"))?,
        non2xx,
    })
}

/// `wrk -t1 -cC -dDs --latency [-H …] URL`.
pub fn wrk(url: &str, conns: u32, secs: u32, headers: &[&str]) -> Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(url);
    let out = run(&mut cmd).with_context(|| format!("wrk {url}"))?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// User + system CPU time of `pid` so far, in µs (from `/proc/PID/stat`, clock ticks).
pub fn proc_cpu_us(pid: u32) -> Result<u64> {
    stat_cpu_us(pid, 10)
}

/// User + system CPU time of this process's children that have ended and been waited for
/// (a `skopeo` run, say), in µs.
pub fn children_cpu_us() -> Result<u64> {
    stat_cpu_us(std::process::id(), 12)
}

/// The two clock-tick fields from `first` on (counted after the state) of `/proc/PID/stat`.
fn stat_cpu_us(pid: u32, first: usize) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(first).copied().unwrap_or(0) + f.get(first + 1).copied().unwrap_or(0);
    Ok(ticks * 1_000_000 / clk_tck())
}

pub fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// A field (`VmRSS`, `VmHWM`) of /proc/<pid>/status in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            let v = l.strip_prefix(field)?.strip_prefix(':')?;
            v.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], mirror_tests::free_port()))
}

pub fn which_or(name: &str, hint: &str) -> Result<PathBuf> {
    mirror_tests::which(name).ok_or_else(|| anyhow!("`{name}` is not on PATH ({hint})"))
}

/// nginx with the given `http {}` body, in its own prefix `dir`.
pub fn start_nginx(dir: &Path, name: &str, http_body: &str, ports: &[SocketAddr]) -> Result<Proc> {
    let bin = which_or("nginx", "apt-get install nginx")?;
    let ndir = dir.join(name);
    std::fs::create_dir_all(ndir.join("tmp"))?;
    let d = ndir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  default_type application/octet-stream;\n  keepalive_requests 1000000;\n{http_body}\n}}\n"
    );
    let path = ndir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&ndir)
        .arg("-e")
        .arg(ndir.join("error.log"))
        .arg("-c")
        .arg(&path);
    let mut p = Proc::spawn(name, &cmd, &ndir.join("stdout.log"))?;
    for a in ports {
        p.wait_for_port(*a, Duration::from_secs(10))
            .with_context(|| mirror_tests::proc::log_tail(&ndir.join("error.log"), 20))?;
    }
    Ok(p)
}

/// A distribution (`docker-registry serve`) with `extra` YAML appended (proxy, tls).
pub fn start_distribution(
    dir: &Path,
    name: &str,
    storage: &Path,
    listen: SocketAddr,
    extra: &str,
) -> Result<Proc> {
    std::fs::create_dir_all(storage)?;
    let driver = format!("  filesystem:\n    rootdirectory: {}\n", storage.display());
    start_distribution_on(dir, name, &driver, listen, extra)
}

/// A distribution whose `storage:` section holds `driver` (YAML indented by two spaces: the
/// driver and its options, e.g. `  s3:\n    bucket: …\n`), with `extra` YAML appended.
pub fn start_distribution_on(
    dir: &Path,
    name: &str,
    driver: &str,
    listen: SocketAddr,
    extra: &str,
) -> Result<Proc> {
    let bin = which_or("docker-registry", "apt-get install docker-registry")?;
    let cfg = dir.join(format!("{name}.yml"));
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n{driver}  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {listen}\n  secret: benchsecret{name}\n{extra}"
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg(&cfg);
    // The s3 driver reads its settings from the YAML alone: an inherited AWS_* variable
    // (AWS_CA_BUNDLE on some machines) makes its SDK panic at start.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(&k);
        }
    }
    let mut p = Proc::spawn(name, &cmd, &dir.join(format!("{name}.log")))?;
    p.wait_for_port(listen, Duration::from_secs(20))?;
    Ok(p)
}

/// `regmirror serve --listen ADDR --storage DIR --upstream NAME=URL [--upstream-ca CA]`.
pub fn start_regmirror(
    bin: &Path,
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    storage: &Path,
    upstream: &str,
    ca: Option<&Path>,
) -> Result<Proc> {
    std::fs::create_dir_all(storage)?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--storage")
        .arg(storage)
        .arg("--upstream")
        .arg(upstream);
    if let Some(ca) = ca {
        cmd.arg("--upstream-ca").arg(ca);
    }
    cmd.env("RUST_LOG", "warn");
    let mut p = Proc::spawn(name, &cmd, &dir.join(format!("{name}.log")))?;
    p.wait_for_port(listen, Duration::from_secs(20))?;
    Ok(p)
}

/// `skopeo copy docker://REF dir:TMP` (plain HTTP when `insecure`, else `cert_dir`).
pub fn skopeo_copy(reference: &str, cert_dir: Option<&Path>, insecure: bool) -> Result<()> {
    skopeo_copy_on(None, reference, cert_dir, insecure)
}

/// [`skopeo_copy`], confined to the CPUs of `cpus` (a `taskset` list such as `0`) if given.
pub fn skopeo_copy_on(
    cpus: Option<&str>,
    reference: &str,
    cert_dir: Option<&Path>,
    insecure: bool,
) -> Result<()> {
    let skopeo = which_or("skopeo", "apt-get install skopeo")?;
    let out = tempfile::Builder::new().prefix("bench-pull-").tempdir()?;
    let mut cmd = match cpus {
        Some(cpus) => {
            let mut c = Command::new(which_or("taskset", "apt-get install util-linux")?);
            c.arg("-c").arg(cpus).arg(skopeo);
            c
        }
        None => Command::new(skopeo),
    };
    cmd.args([
        "--insecure-policy",
        "copy",
        "--src-no-creds",
        "--retry-times",
        "0",
    ]);
    if insecure {
        cmd.arg("--src-tls-verify=false");
    }
    if let Some(d) = cert_dir {
        cmd.arg("--src-cert-dir").arg(d);
    }
    cmd.arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", out.path().display()));
    run(&mut cmd).with_context(|| format!("skopeo copy {reference}"))?;
    Ok(())
}

/// Confines every thread of each of `pids` to the CPUs of `cpus` (a `taskset` list).
pub fn pin(pids: &[u32], cpus: &str) -> Result<()> {
    let taskset = which_or("taskset", "apt-get install util-linux")?;
    for pid in pids {
        run(Command::new(&taskset)
            .args(["-a", "-p", "-c", cpus])
            .arg(pid.to_string()))
        .with_context(|| format!("taskset pid {pid} to CPUs {cpus}"))?;
    }
    Ok(())
}

/// GETs `url` with `client`, discarding the body; returns the bytes read.
pub fn get_discard(
    client: &reqwest::blocking::Client,
    url: &str,
    accept: Option<&str>,
) -> Result<u64> {
    let mut req = client.get(url);
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let mut resp = req.send().with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url}: {}", resp.status());
    }
    Ok(std::io::copy(&mut resp, &mut std::io::sink())?)
}

/// Sum of `$bytes_sent` lines (one integer per line) in an nginx access log.
pub fn sum_log_bytes(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The lines of an access log after the first `skip` (what one run asked).
pub fn log_lines_after(path: &Path, skip: usize) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(skip)
        .map(str::to_owned)
        .collect()
}

/// The run log: kept for RESULTS.md and echoed to stderr as progress.
#[derive(Default)]
pub struct Log(pub Vec<String>);

impl Log {
    pub fn push(&mut self, line: String) {
        eprintln!("[bench] {line}");
        self.0.push(line);
    }
}

/// Requests in an nginx access log (one line each).
pub fn count_log_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

/// CPU-seconds the whole machine spent so far (first line of /proc/stat: user nice system
/// idle iowait irq softirq steal, all but idle and iowait).
pub fn machine_busy_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let jiffies: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if jiffies.len() < 5 {
        bail!("/proc/stat has no cpu line");
    }
    let idle: f64 = jiffies.iter().skip(3).take(2).sum();
    Ok((jiffies.iter().sum::<f64>() - idle) / clk_tck() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_count_defaults_to_nine_and_refuses_nonsense() {
        assert_eq!(pairs_from(None).unwrap(), DEFAULT_PAIRS);
        assert_eq!(pairs_from(Some("3")).unwrap(), 3);
        for bad in ["0", "-1", "three", ""] {
            let e = pairs_from(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("MIRROR_BENCH_PAIRS"), "{bad}: {e}");
        }
    }

    #[test]
    fn interleaved_alternates_and_drops_the_warmup() {
        let mut calls = Vec::new();
        let p = interleaved(3, 1, |side, i| {
            calls.push((side, i));
            Ok(format!("{side:?}{i}"))
        })
        .unwrap();
        use Side::{Mirror as M, Peer as P};
        assert_eq!(
            calls,
            [
                (M, 0),
                (P, 0),
                (M, 1),
                (P, 1),
                (M, 2),
                (P, 2),
                (M, 3),
                (P, 3)
            ]
        );
        assert_eq!(p.mirror, ["Mirror1", "Mirror2", "Mirror3"]);
        assert_eq!(p.peer, ["Peer1", "Peer2", "Peer3"]);
    }

    #[test]
    fn interleaved_stops_at_the_first_failure_and_names_the_side() {
        let mut runs = 0;
        let e = interleaved(5, 0, |side, i| {
            runs += 1;
            if side == Side::Peer && i == 1 {
                bail!("peer down");
            }
            Ok(1.0)
        })
        .unwrap_err();
        assert_eq!(runs, 4);
        assert_eq!(format!("{e:#}"), "peer side: peer down");
    }

    #[test]
    fn the_figure_is_the_median_of_per_pair_ratios_not_the_ratio_of_medians() {
        // The machine slows down for the second pair: both sides take 10× longer there.
        let p = Paired {
            mirror: vec![1.0, 10.0, 1.1],
            peer: vec![2.0, 5.0, 2.0],
        };
        let s = p.ratio(|x| *x);
        assert_eq!(s.n, 3);
        assert!((s.median - 0.55).abs() < 1e-9, "{s:?}");
        assert!(
            (s.min - 0.5).abs() < 1e-9 && (s.max - 2.0).abs() < 1e-9,
            "{s:?}"
        );
        assert_eq!(p.median_of(Side::Mirror, |x| *x), 1.1);
        assert_eq!(p.median_of(Side::Peer, |x| *x), 2.0);
    }

    #[test]
    fn spread_leaves_out_what_was_not_measured() {
        let s = Spread::of(&[3.0, f64::NAN, 1.0, f64::INFINITY, 2.0, 4.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        let none = Spread::of(&[f64::NAN]);
        assert_eq!(none.n, 0);
        assert_eq!(Goal::AtMost(1.0).verdict(&none), Verdict::Noise);
    }

    fn spread(min: f64, median: f64, max: f64) -> Spread {
        Spread {
            median,
            min,
            max,
            n: 9,
        }
    }

    #[test]
    fn fetch_blob_follows_a_redirect_and_counts_the_body() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for conn in listener.incoming().take(2) {
                let mut conn = conn.unwrap();
                // The whole request head is read: closing with bytes unread would reset.
                let mut reader = BufReader::new(&conn);
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut rest = String::new();
                while reader.read_line(&mut rest).unwrap() > 2 {
                    rest.clear();
                }
                let answer = if line.starts_with("GET /start ") {
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: /blob\r\nContent-Length: 0\r\n\r\n".to_string()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n{}",
                        "x".repeat(3_000_000)
                    )
                };
                conn.write_all(answer.as_bytes()).unwrap();
            }
        });
        let (n, secs) = fetch_blob(&format!("http://{addr}/start")).unwrap();
        assert_eq!(n, 3_000_000);
        assert!(secs > 0.0);
        server.join().unwrap();
    }

    #[test]
    fn interleaved_fastest_alternates_within_a_pair_and_keeps_each_sides_fastest() {
        let mut order = Vec::new();
        let mut times = [0.9, 2.0, 0.5, 1.0, 0.7, 3.0].into_iter();
        let p = interleaved_fastest(
            1,
            0,
            |side, _| {
                order.push(side);
                Ok(times.next().unwrap())
            },
            |t| *t,
        )
        .unwrap();
        use Side::{Mirror as M, Peer as P};
        assert_eq!(order, [M, P, M, P, M, P]);
        assert_eq!((p.mirror, p.peer), (vec![0.5], vec![1.0]));

        let mut calls = 0;
        let e = interleaved_fastest(
            2,
            1,
            |_, _| {
                calls += 1;
                if calls == 4 {
                    bail!("short body")
                }
                Ok(0.1)
            },
            |t| *t,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("peer side: short body"), "{e:#}");
        assert_eq!(calls, 4, "no run after a failure");
    }

    #[test]
    fn verdict_needs_the_whole_range_on_one_side() {
        let more = Goal::AtLeast(1.5);
        assert_eq!(more.verdict(&spread(1.5, 1.8, 2.0)), Verdict::Pass);
        assert_eq!(more.verdict(&spread(1.0, 1.2, 1.49)), Verdict::Miss);
        // The median clears the target but one pair did not: noise, not PASS.
        assert_eq!(more.verdict(&spread(1.4, 1.9, 2.0)), Verdict::Noise);
        assert_eq!(more.verdict(&spread(1.2, 1.3, 1.6)), Verdict::Noise);
        let less = Goal::AtMost(1.1);
        assert_eq!(less.verdict(&spread(0.9, 1.0, 1.1)), Verdict::Pass);
        assert_eq!(less.verdict(&spread(1.11, 1.3, 1.5)), Verdict::Miss);
        assert_eq!(less.verdict(&spread(1.0, 1.05, 1.2)), Verdict::Noise);
        assert_eq!(less.verdict_one(1.1), Verdict::Pass);
        assert_eq!(less.verdict_one(1.2), Verdict::Miss);
    }

    #[test]
    fn paired_row_carries_range_pairs_and_verdict() {
        let p = Paired {
            mirror: vec![2.0, 2.2, 1.9],
            peer: vec![2.0, 2.0, 2.0],
        };
        let r = Row::paired(
            "s",
            "m",
            &p,
            |x| *x,
            ("s", "s direct"),
            Some(Goal::AtMost(1.05)),
        );
        let Figure::Pairs(s) = r.figure else {
            panic!("{:?}", r.figure)
        };
        assert_eq!(s.n, 3);
        assert_eq!(r.verdict, Some(Verdict::Noise));
        assert_eq!(r.target, "≤ 1.05×");
        assert_eq!(r.ours, "2.00 s");
        let info = Row::paired("s", "m", &p, |x| *x, ("s", "s"), None);
        assert_eq!((info.verdict, info.target.as_str()), (None, "info"));
    }

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 16 connections\n  Latency Distribution\n     50%  291.00us\n     75%  400.00us\n     90%  1.20ms\n     99%    2.50ms\n  9438 requests in 2.00s, 1.2MB read\n  Non-2xx or 3xx responses: 7\nRequests/sec:   4719.52\nTransfer/sec:      1.2MB\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(
            (r.rps, r.p50_us, r.p99_us, r.non2xx),
            (4719.52, 291.0, 2500.0, 7)
        );
        assert!(parse_wrk("garbage").is_err());
    }
}
