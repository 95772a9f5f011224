//! Shared pieces: result rows, medians, wrk parsing, RSS sampling, process launchers.

use anyhow::{anyhow, bail, Context, Result};
use mirror_tests::proc::{run, Proc};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One line of the results table.
#[derive(Clone, Debug)]
pub struct Row {
    pub section: &'static str,
    pub metric: String,
    /// Value of the mirror side, formatted.
    pub ours: String,
    /// Value of the peer side, formatted (with the peer's name).
    pub peer: String,
    pub ratio: Option<f64>,
    pub target: String,
    /// Some(true) PASS, Some(false) MISS, None informational / not measured.
    pub pass: Option<bool>,
}

impl Row {
    pub fn info(section: &'static str, metric: &str, ours: String, peer: String) -> Row {
        Row {
            section,
            metric: metric.to_string(),
            ours,
            peer,
            ratio: None,
            target: "—".into(),
            pass: None,
        }
    }

    pub fn not_measured(section: &'static str, metric: &str, why: &str) -> Row {
        Row {
            section,
            metric: metric.to_string(),
            ours: format!("not measured: {}", why.replace('|', "/").replace('\n', " ")),
            peer: "—".into(),
            ratio: None,
            target: "—".into(),
            pass: None,
        }
    }

    /// A ratio row: `ratio = ours / peer`; `higher_is_better` decides the comparison with
    /// `target` (ratio ≥ target, else ratio ≤ target).
    pub fn ratio(
        section: &'static str,
        metric: &str,
        ours: (f64, &str),
        peer: (f64, &str),
        target: f64,
        higher_is_better: bool,
    ) -> Row {
        let ratio = if peer.0 > 0.0 {
            Some(ours.0 / peer.0)
        } else {
            None
        };
        let pass = ratio.map(|r| {
            if higher_is_better {
                r >= target
            } else {
                r <= target
            }
        });
        Row {
            section,
            metric: metric.to_string(),
            ours: format!("{:.2} {}", ours.0, ours.1),
            peer: format!("{:.2} {}", peer.0, peer.1),
            ratio,
            target: format!("{} {target}×", if higher_is_better { "≥" } else { "≤" }),
            pass,
        }
    }
}

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

/// A field (`VmRSS`, `VmHWM`) of /proc/<pid>/status in KiB.
/// User + system CPU time of `pid` so far, in µs (from `/proc/PID/stat`, clock ticks).
pub fn proc_cpu_us(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
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
    let bin = which_or("docker-registry", "apt-get install docker-registry")?;
    std::fs::create_dir_all(storage)?;
    let cfg = dir.join(format!("{name}.yml"));
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {listen}\n  secret: benchsecret{name}\n{extra}",
            storage.display()
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg(&cfg);
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

/// Runs `f` `n` times and returns the wall times in seconds.
pub fn time_runs(n: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        f(i)?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(v)
}

/// `skopeo copy docker://REF dir:TMP` (plain HTTP when `insecure`, else `cert_dir`).
pub fn skopeo_copy(reference: &str, cert_dir: Option<&Path>, insecure: bool) -> Result<()> {
    let skopeo = which_or("skopeo", "apt-get install skopeo")?;
    let out = tempfile::Builder::new().prefix("bench-pull-").tempdir()?;
    let mut cmd = Command::new(skopeo);
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
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
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
