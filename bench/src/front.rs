//! Row 6: sizing the Envoy TLS front. The real front (Envoy on the shipped `envoy/local.yaml`
//! with the harness' substitution: TLS listener with the test leaf, the fresh wasm filter,
//! `cache_service` → one regmirror on the filesystem store) at `--concurrency` 1, 2 and 4,
//! and the same regmirror alone (plain HTTP, no Envoy). The regmirror holds the warm 256 MiB
//! layer of pull.rs's `bench/huge` (fetched once from pull.rs's origin before any run).
//!
//! One run: [`CLIENTS`] concurrent curl processes fetch the blob once each. Measured: the
//! aggregate MB/s, and the CPU-seconds Envoy, regmirror and the clients spent meanwhile
//! (utime + stime from /proc/PID/stat before and after; the clients' from this process'
//! cutime + cstime, the reaped curls), per GB served. MB per Envoy CPU-second is what one
//! core of Envoy TLS carries.
//!
//! The four variants run in rotation (1, 2, 4 workers, alone, 1, 2, 4, alone, …) after an
//! uncounted warm-up round, so a drift of the machine reaches all of them alike. The rows
//! are info (no target): clients, Envoy and regmirror share this machine's cores.

use crate::pull::{self, Fixture};
use crate::util::{self, Figure, Row, Spread};
use crate::Bins;
use anyhow::{anyhow, bail, Context, Result};
use mirror_tests::envoy::{self, Substitution};
use mirror_tests::proc::{run as run_cmd, Proc};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const S6: &str = "6. Envoy TLS front";
/// Envoy `--concurrency` values compared.
const WORKERS: [u32; 3] = [1, 2, 4];
/// Concurrent clients of one run: one connection per worker at the most workers, the
/// same for every variant so that each sees the same load.
const CLIENTS: usize = 4;
/// The host the clients address; the filter routes it to `cache_service`.
const HOST: &str = "gcr.mirror.test";

/// What a run goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// Envoy with this many workers, then regmirror.
    Envoy(u32),
    /// regmirror alone, plain HTTP.
    Alone,
}

/// One run: [`CLIENTS`] blobs fetched at once.
#[derive(Clone, Copy, Debug)]
struct Run {
    secs: f64,
    bytes: u64,
    envoy_cpu_s: f64,
    regmirror_cpu_s: f64,
    /// The curl processes (TLS at the client end costs about what Envoy's costs).
    clients_cpu_s: f64,
    /// Every process on the machine (/proc/stat, all but idle and iowait): what the three
    /// above left to other work shows how much of the machine they had.
    machine_busy_s: f64,
}

impl Run {
    fn mb(&self) -> f64 {
        self.bytes as f64 / 1e6
    }
    fn mb_per_s(&self) -> f64 {
        self.mb() / self.secs
    }
    /// CPU-seconds per GB served (NaN when nothing was served).
    fn per_gb(&self, cpu_s: f64) -> f64 {
        cpu_s / (self.mb() / 1e3)
    }
    /// MB served per CPU-second: what one fully busy core would carry (infinite, so left
    /// out of a [`Spread`], when the process used no measurable CPU).
    fn mb_per_cpu_s(&self, cpu_s: f64) -> f64 {
        self.mb() / cpu_s
    }
    /// Cores the process kept busy on average.
    fn cores(&self, cpu_s: f64) -> f64 {
        cpu_s / self.secs
    }
}

pub fn run(base: &Path, bins: &Bins, pairs: usize, log: &mut util::Log) -> Vec<Row> {
    let f = match pull::setup(base, log) {
        Ok(f) => f,
        Err(e) => return vec![Row::not_measured(S6, "fixtures", &format!("{e:#}"))],
    };
    match measure(&f, bins, pairs, log) {
        Ok(runs) => rows(&runs, cores()),
        Err(e) => vec![Row::not_measured(S6, "all", &format!("{e:#}"))],
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `warmup` uncounted rounds, then `rounds` counted ones; each round runs every one of
/// `variants` once, in order (0, 1, …, 0, 1, …). `run` gets the variant and the round
/// (warm-up rounds included). Returns each variant's counted runs.
fn rotation<T>(
    variants: usize,
    rounds: usize,
    warmup: usize,
    mut run: impl FnMut(usize, usize) -> Result<T>,
) -> Result<Vec<Vec<T>>> {
    let mut out: Vec<Vec<T>> = (0..variants).map(|_| Vec::with_capacity(rounds)).collect();
    for round in 0..warmup + rounds {
        for (v, runs) in out.iter_mut().enumerate() {
            let r = run(v, round).with_context(|| format!("variant {v}, round {round}"))?;
            if round >= warmup {
                runs.push(r);
            }
        }
    }
    Ok(out)
}

/// Envoy on the shipped `local.yaml` (harness substitution, TLS listener) with `workers`
/// worker threads, `cache_service` → `cache`; returns it and its listener's port. Started
/// here rather than by the harness' `Envoy::start`, which fixes `--concurrency 2` and the
/// tests' debug log level.
fn start_front(f: &Fixture, bins: &Bins, cache: SocketAddr, workers: u32) -> Result<(Proc, u16)> {
    let dir = f.dir.join(format!("front-envoy-c{workers}"));
    std::fs::create_dir_all(&dir)?;
    let mut sub = Substitution::for_upstreams(&f.up, true)?;
    sub.clusters.insert("cache_service".to_string(), cache);
    sub.wasm = Some(bins.wasm.clone());
    let source = mirror_tests::build::workspace_root().join("envoy/local.yaml");
    let yaml =
        std::fs::read_to_string(&source).with_context(|| format!("read {}", source.display()))?;
    let s = envoy::substitute(&yaml, &sub, &mut mirror_tests::free_port)?;
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, &s.yaml)?;
    let port = s
        .listeners
        .first()
        .map(|l| l.1)
        .ok_or_else(|| anyhow!("{} has no listener", source.display()))?;
    // The operator's log level: the tests' wasm:debug would add work per request.
    let mut cmd = envoy::command(["-c".as_ref(), config.as_os_str()])?;
    cmd.args([
        "--concurrency",
        &workers.to_string(),
        "--disable-hot-restart",
    ])
    .args(["--log-level", "warn"]);
    let mut proc = Proc::spawn(
        &format!("envoy-front-c{workers}"),
        &cmd,
        &dir.join("envoy.log"),
    )?;
    envoy::wait_ready(&mut proc, s.admin_port, [port])?;
    Ok((proc, port))
}

/// How a client reaches the blob.
struct Target {
    url: String,
    /// Test CA and Envoy's port: TLS to `HOST`, pinned to 127.0.0.1.
    tls: Option<(PathBuf, u16)>,
    envoy_pid: Option<u32>,
}

/// curl for the target: the test CA and the pinned address for TLS.
fn curl_cmd(t: &Target) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "-o", "/dev/null"]);
    if let Some((ca, port)) = &t.tls {
        cmd.arg("--cacert")
            .arg(ca)
            .arg("--resolve")
            .arg(format!("{HOST}:{port}:127.0.0.1"));
    }
    cmd
}

/// The TLS version and cipher curl negotiates with the target (a HEAD, for the log).
fn tls_session(t: &Target) -> Result<String> {
    let mut cmd = curl_cmd(t);
    cmd.args(["-v", "-I"]).arg(&t.url);
    let out = run_cmd(&mut cmd).with_context(|| format!("curl -I {}", t.url))?;
    let err = String::from_utf8_lossy(&out.stderr);
    Ok(err
        .lines()
        .find_map(|l| l.split_once("SSL connection using ").map(|(_, v)| v.trim()))
        .unwrap_or("no TLS session reported by curl")
        .to_string())
}

/// One curl GET of the target, body discarded: (bytes received, HTTP version).
fn curl(t: &Target) -> Result<(u64, String)> {
    let mut cmd = curl_cmd(t);
    cmd.args(["-w", "%{size_download} %{http_version}"])
        .arg(&t.url);
    let out = run_cmd(&mut cmd).with_context(|| format!("curl {}", t.url))?;
    let s = String::from_utf8_lossy(&out.stdout);
    let mut it = s.split_whitespace();
    let bytes = it
        .next()
        .and_then(|x| x.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("curl {}: no byte count in {s:?}", t.url))?;
    Ok((bytes as u64, it.next().unwrap_or("?").to_string()))
}

/// User + system CPU-seconds of this process' reaped children (`cutime` + `cstime` of
/// /proc/self/stat): the curls of a run once they are waited for.
fn children_cpu_s() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the `(comm)`, from state (field 3) on: cutime is field 16, cstime 17.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    match (f.get(13), f.get(14)) {
        (Some(u), Some(s)) => Ok((u + s) as f64 / util::clk_tck() as f64),
        _ => bail!("/proc/self/stat has no cutime/cstime: {s:?}"),
    }
}

/// [`CLIENTS`] concurrent fetches of the blob, with the CPU Envoy, regmirror and the
/// clients spent.
fn one_run(t: &Target, size: u64, regmirror_pid: u32) -> Result<Run> {
    let cpu = |pid: Option<u32>| -> Result<f64> {
        pid.map_or(Ok(0.0), |p| Ok(util::proc_cpu_us(p)? as f64 / 1e6))
    };
    let (e0, r0, c0, m0) = (
        cpu(t.envoy_pid)?,
        cpu(Some(regmirror_pid))?,
        children_cpu_s()?,
        util::machine_busy_s()?,
    );
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..CLIENTS).map(|_| s.spawn(|| curl(t))).collect();
        for h in hs {
            let (n, _) = h.join().map_err(|_| anyhow!("curl thread panicked"))??;
            if n != size {
                bail!("{}: {n} bytes, expected {size}", t.url);
            }
        }
        Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    Ok(Run {
        secs,
        bytes: size * CLIENTS as u64,
        envoy_cpu_s: cpu(t.envoy_pid)? - e0,
        regmirror_cpu_s: cpu(Some(regmirror_pid))? - r0,
        clients_cpu_s: children_cpu_s()? - c0,
        machine_busy_s: util::machine_busy_s()? - m0,
    })
}

fn measure(
    f: &Fixture,
    bins: &Bins,
    pairs: usize,
    log: &mut util::Log,
) -> Result<Vec<(Via, Vec<Run>)>> {
    let (layer, size) = f.huge_layer()?;
    let path = format!("/v2/{}/blobs/{layer}", f.huge.name);
    let rm_addr = util::addr();
    let rm = util::start_regmirror(
        &bins.regmirror,
        &f.dir,
        "regmirror-front",
        rm_addr,
        &f.dir.join("storage-front"),
        &format!("gcr.io=http://{}", f.origin),
        None,
    )?;
    let mut fronts = Vec::new();
    for w in WORKERS {
        fronts.push((w, start_front(f, bins, rm_addr, w)?));
    }
    let mut targets = vec![];
    for (w, (proc, port)) in &fronts {
        targets.push((
            Via::Envoy(*w),
            Target {
                url: format!("https://{HOST}:{port}{path}"),
                tls: Some((f.up.pki.ca.clone(), *port)),
                envoy_pid: Some(proc.pid()),
            },
        ));
    }
    let alone = Target {
        url: format!("http://{rm_addr}{path}"),
        tls: None,
        envoy_pid: None,
    };
    // Warm the cache (one fetch from the origin), then check every front serves the blob.
    let t = Instant::now();
    let (n, _) = curl(&alone)?;
    if n != size {
        bail!("warming {}: {n} bytes, expected {size}", alone.url);
    }
    log.push(format!(
        "front: warmed {layer} ({size} B) in {:.2}s",
        t.elapsed().as_secs_f64()
    ));
    for (via, t) in &targets {
        let (n, version) = curl(t)?;
        if n != size {
            bail!("{via:?}: {n} bytes, expected {size}");
        }
        log.push(format!(
            "front: {via:?} serves the blob over HTTP/{version}, {}",
            tls_session(t)?
        ));
    }
    targets.push((Via::Alone, alone));

    // Every counted byte must come from the cache: the origin serves nothing meanwhile.
    let origin_before = util::sum_log_bytes(&f.origin_log);
    let runs = rotation(targets.len(), pairs, util::WARMUP_PAIRS, |v, _| {
        let (via, t) = targets.get(v).ok_or_else(|| anyhow!("no variant {v}"))?;
        one_run(t, size, rm.pid()).with_context(|| format!("{via:?}: {}", rm.log_tail(20)))
    })?;
    let from_origin = util::sum_log_bytes(&f.origin_log).saturating_sub(origin_before);
    if from_origin > 0 {
        bail!("the origin served {from_origin} B during the warm runs: not a warm cache");
    }
    let out: Vec<(Via, Vec<Run>)> = targets.iter().map(|(via, _)| *via).zip(runs).collect();
    for (via, runs) in &out {
        let line: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{:.0} MB/s (CPU-s: Envoy {:.2}, regmirror {:.2}, clients {:.2}, machine {:.2} in {:.2}s)",
                    r.mb_per_s(),
                    r.envoy_cpu_s,
                    r.regmirror_cpu_s,
                    r.clients_cpu_s,
                    r.machine_busy_s,
                    r.secs
                )
            })
            .collect();
        log.push(format!("front {via:?}: {}", line.join("; ")));
    }
    drop(fronts);
    drop(rm);
    Ok(out)
}

fn spread(runs: &[Run], value: impl Fn(&Run) -> f64) -> Spread {
    Spread::of(&runs.iter().map(value).collect::<Vec<_>>())
}

/// An info row whose figure (median and range) is in MB/s.
fn rate_row(metric: String, ours: String, peer: String, figure: Spread, cores: usize) -> Row {
    Row {
        section: S6,
        metric,
        ours,
        peer,
        figure: Figure::Pairs(figure),
        unit: " MB/s",
        target: format!("info ({cores} cores shared by clients, Envoy and regmirror)"),
        verdict: None,
    }
}

/// The section's rows from each variant's runs.
fn rows(runs: &[(Via, Vec<Run>)], cores: usize) -> Vec<Row> {
    let of = |via: Via| {
        runs.iter()
            .find(|(v, _)| *v == via)
            .map_or(&[][..], |(_, r)| r.as_slice())
    };
    let alone = of(Via::Alone);
    let alone_mbps = spread(alone, Run::mb_per_s).median;
    let med = |runs: &[Run], value: fn(&Run) -> f64| spread(runs, value).median;
    let workers = |w: u32| {
        if w as usize > cores {
            format!(" ({w} workers on {cores} cores: oversubscribed)")
        } else {
            String::new()
        }
    };
    let mut rows = Vec::new();
    for w in WORKERS {
        let r = of(Via::Envoy(w));
        rows.push(rate_row(
            format!("warm 256 MiB blob, {CLIENTS} concurrent curl over TLS through Envoy --concurrency {w} (TLS + wasm filter) → regmirror: aggregate throughput{}", workers(w)),
            format!(
                "CPU-s/GB: Envoy {:.2}, regmirror {:.2}, clients {:.2}",
                med(r, |x| x.per_gb(x.envoy_cpu_s)),
                med(r, |x| x.per_gb(x.regmirror_cpu_s)),
                med(r, |x| x.per_gb(x.clients_cpu_s))
            ),
            format!("cache alone {alone_mbps:.0} MB/s"),
            spread(r, Run::mb_per_s),
            cores,
        ));
    }
    rows.push(rate_row(
        format!("same blob, {CLIENTS} concurrent curl straight to regmirror (plain HTTP, no Envoy): aggregate throughput"),
        format!(
            "CPU-s/GB: regmirror {:.2}, clients {:.2}",
            med(alone, |x| x.per_gb(x.regmirror_cpu_s)),
            med(alone, |x| x.per_gb(x.clients_cpu_s))
        ),
        "—".into(),
        spread(alone, Run::mb_per_s),
        cores,
    ));
    for w in WORKERS {
        let r = of(Via::Envoy(w));
        rows.push(rate_row(
            format!("what one core of Envoy TLS carries: MB served per Envoy CPU-second, --concurrency {w}{}", workers(w)),
            format!(
                "Envoy busy {:.2} cores (whole machine {:.2})",
                med(r, |x| x.cores(x.envoy_cpu_s)),
                med(r, |x| x.cores(x.machine_busy_s))
            ),
            format!(
                "regmirror behind it {:.0} MB per CPU-s",
                med(r, |x| x.mb_per_cpu_s(x.regmirror_cpu_s))
            ),
            spread(r, |x| x.mb_per_cpu_s(x.envoy_cpu_s)),
            cores,
        ));
    }
    rows.push(rate_row(
        "what one core of regmirror serves: MB served per regmirror CPU-second, alone".into(),
        format!(
            "regmirror busy {:.2} cores (whole machine {:.2})",
            med(alone, |x| x.cores(x.regmirror_cpu_s)),
            med(alone, |x| x.cores(x.machine_busy_s))
        ),
        "—".into(),
        spread(alone, |x| x.mb_per_cpu_s(x.regmirror_cpu_s)),
        cores,
    ));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_runs_every_variant_each_round_and_drops_the_warmup() {
        let mut calls = Vec::new();
        let out = rotation(3, 2, 1, |v, round| {
            calls.push((v, round));
            Ok(v * 10 + round)
        })
        .unwrap();
        assert_eq!(
            calls,
            [
                (0, 0),
                (1, 0),
                (2, 0),
                (0, 1),
                (1, 1),
                (2, 1),
                (0, 2),
                (1, 2),
                (2, 2)
            ]
        );
        assert_eq!(out, [vec![1, 2], vec![11, 12], vec![21, 22]]);
    }

    #[test]
    fn rotation_stops_at_the_first_failure_and_names_it() {
        let mut n = 0;
        let e = rotation(4, 3, 1, |v, round| {
            n += 1;
            if (v, round) == (2, 1) {
                bail!("front down");
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(n, 7);
        assert_eq!(format!("{e:#}"), "variant 2, round 1: front down");
    }

    fn run(secs: f64, envoy: f64, regmirror: f64) -> Run {
        Run {
            secs,
            bytes: 2_000_000_000,
            envoy_cpu_s: envoy,
            regmirror_cpu_s: regmirror,
            clients_cpu_s: 3.0,
            machine_busy_s: 8.0,
        }
    }

    #[test]
    fn rows_give_throughput_cpu_per_gb_and_mb_per_cpu_second() {
        let runs = vec![
            (
                Via::Envoy(1),
                vec![run(4.0, 4.0, 1.0), run(5.0, 4.0, 1.0), run(8.0, 5.0, 1.0)],
            ),
            (Via::Envoy(2), vec![run(2.0, 2.0, 0.5)]),
            (Via::Envoy(4), vec![run(2.0, 2.0, 0.5)]),
            (Via::Alone, vec![run(1.0, 0.0, 0.6), run(1.0, 0.0, 0.0)]),
        ];
        let rows = rows(&runs, 2);
        let t = crate::table(&rows);
        // 2 GB in 4, 5, 8 s: 500, 400, 250 MB/s; Envoy 4, 4, 5 CPU-s → 2.00 CPU-s/GB median.
        assert!(
            t.contains("--concurrency 1 (TLS + wasm filter) → regmirror: aggregate throughput | CPU-s/GB: Envoy 2.00, regmirror 0.50, clients 1.50 | cache alone 2000 MB/s | 400 MB/s | 250–500 MB/s | 3 | info (2 cores shared by clients, Envoy and regmirror) | — |"),
            "{t}"
        );
        // One core of Envoy carries 2000 MB / 4 CPU-s = 500, 500, 400 MB per CPU-second.
        assert!(
            t.contains("MB served per Envoy CPU-second, --concurrency 1 | Envoy busy 0.80 cores (whole machine 1.60) | regmirror behind it 2000 MB per CPU-s | 500 MB/s | 400–500 MB/s | 3 |"),
            "{t}"
        );
        // A run without measurable CPU has no per-core figure, rather than an infinite one.
        assert!(
            t.contains("per regmirror CPU-second, alone | regmirror busy 0.30 cores (whole machine 8.00) | — | 3333 MB/s | 3333–3333 MB/s | 1 |"),
            "{t}"
        );
        assert!(t.contains("--concurrency 4 (TLS + wasm filter) → regmirror: aggregate throughput (4 workers on 2 cores: oversubscribed)"), "{t}");
        assert!(!t.contains("2 workers on 2 cores"), "{t}");
        assert!(
            t.contains("no Envoy): aggregate throughput | CPU-s/GB: regmirror 0.15, clients 1.50 | — | 2000 MB/s |"),
            "{t}"
        );
        assert!(rows.iter().all(|r| r.verdict.is_none()));
        assert_eq!(rows.len(), 8);
    }
}
