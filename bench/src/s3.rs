//! Row 5: the cache on object storage: SeaweedFS (the harness' [`S3Server`]), a fresh server
//! for each part (warm side by side, cold side by side, replicas).
//!
//! - Side by side: regmirror `--storage s3://BUCKET/regmirror` against distribution 2.8's
//!   proxy mode on its `s3` driver (`rootdirectory: /distribution`, redirects off so that both
//!   stream the bytes themselves), both pulling from pull.rs's origin (nginx in front of a
//!   plain distribution, logging `$body_bytes_sent`): warm 256 MiB blob throughput, cold pull
//!   of the 3-layer image, manifest-by-tag requests/s.
//! - Replicas: aggregate warm throughput of [`CLIENTS`] concurrent clients spread over 1, 2
//!   or 3 replicas on the one prefix (no Envoy), and the origin's bytes for [`PULLS`]
//!   concurrent cold pulls through Envoy on the rendered `cache_service` list (ring hash on
//!   `x-mirror-cache-key`) over 3 replicas.

use crate::pull::{self, Fixture};
use crate::util::{self, Figure, Goal, Row, Side};
use crate::Bins;
use anyhow::{anyhow, bail, Context, Result};
use mirror_tests::envoy::Envoy;
use mirror_tests::images::MT_MANIFEST;
use mirror_tests::proc::Proc;
use mirror_tests::s3::S3Server;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const S5: &str = "5. object storage (S3)";
/// regmirror's bucket prefix in the side-by-side and aggregate runs.
const RM_PREFIX: &str = "regmirror";
/// distribution's `rootdirectory` in the same bucket.
const DP_ROOT: &str = "distribution";
/// Concurrent clients of an aggregate-throughput run: divisible by 1, 2 and 3 replicas.
const CLIENTS: usize = 6;
/// Concurrent cold pulls through Envoy.
const PULLS: usize = 32;
const REPLICAS: usize = 3;
/// How long a replica may take to answer `/readyz` (store reachable) after it bound its port.
const READY_WITHIN: Duration = Duration::from_secs(30);

pub fn run(base: &Path, bins: &Bins, pairs: usize, log: &mut util::Log) -> Vec<Row> {
    let f = match pull::setup(base, log) {
        Ok(f) => f,
        Err(e) => return vec![Row::not_measured(S5, "fixtures", &format!("{e:#}"))],
    };
    type Part = fn(&Fixture, &Bins, &S3Server, usize, &mut util::Log) -> Result<Vec<Row>>;
    let parts: [(&str, Part); 3] = [
        ("regmirror vs distribution on S3, warm", warm_rows),
        ("regmirror vs distribution on S3, cold", cold_rows),
        ("replicas", replica_rows),
    ];
    // MIRROR_BENCH_S3_PARTS=warm,cold,replicas runs a subset (while tuning one of them).
    let only = std::env::var("MIRROR_BENCH_S3_PARTS").ok();
    let mut rows = Vec::new();
    for (what, part) in parts {
        if let Some(only) = &only {
            if !only.split(',').any(|p| !p.is_empty() && what.ends_with(p)) {
                continue;
            }
        }
        // A SeaweedFS of its own per part: the fixture caps a server at ~2 GB of volumes, and
        // the cold runs of a full bench alone write about 1.5 GB.
        let t = Instant::now();
        let s3 = match S3Server::start() {
            Ok(s) => s,
            Err(e) => {
                rows.push(Row::not_measured(S5, what, &format!("SeaweedFS: {e:#}")));
                continue;
            }
        };
        log.push(format!(
            "SeaweedFS S3 for {what} at {} ready in {:.1}s",
            s3.endpoint,
            t.elapsed().as_secs_f64()
        ));
        match part(&f, bins, &s3, pairs, log) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::not_measured(S5, what, &format!("{e:#}"))),
        }
        log.push(format!(
            "SeaweedFS after {what}: {:.0} MB on disk, RSS {:.0} MiB",
            s3.disk_usage() as f64 / 1e6,
            s3.rss_kib().map_or(f64::NAN, util::mib)
        ));
    }
    rows
}

/// `regmirror serve --storage s3://BUCKET/PREFIX` with the store's AWS variables (and none
/// inherited), upstream `gcr.io` = the origin; returns once `/readyz` says the store answers.
fn replica(
    f: &Fixture,
    bins: &Bins,
    s3: &S3Server,
    name: &str,
    listen: SocketAddr,
    prefix: &str,
) -> Result<Proc> {
    replica_with(f, bins, s3, name, listen, prefix, &[])
}

/// [`replica`] with more `serve` arguments.
fn replica_with(
    f: &Fixture,
    bins: &Bins,
    s3: &S3Server,
    name: &str,
    listen: SocketAddr,
    prefix: &str,
    extra: &[&str],
) -> Result<Proc> {
    let spool = f.dir.join(format!("spool-{name}"));
    std::fs::create_dir_all(&spool)?;
    let mut cmd = Command::new(&bins.regmirror);
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--storage")
        .arg(s3.url(prefix))
        .arg("--spool-dir")
        .arg(&spool)
        .arg("--upstream")
        .arg(format!("gcr.io=http://{}", f.origin))
        .args(extra);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("REGMIRROR_") {
            cmd.env_remove(&*k);
        }
    }
    cmd.envs(s3.env()).env("RUST_LOG", "warn");
    let mut p = Proc::spawn(name, &cmd, &f.dir.join(format!("{name}.log")))?;
    p.wait_for_port(listen, READY_WITHIN)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + READY_WITHIN;
    let readyz = format!("http://{listen}/readyz");
    while !client
        .get(&readyz)
        .send()
        .is_ok_and(|r| r.status().is_success())
    {
        p.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{name}: /readyz not 200 within {READY_WITHIN:?}:\n{}",
                p.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(p)
}

/// distribution's proxy mode on its `s3` driver, in the same bucket under `/ROOT`.
fn distribution(
    f: &Fixture,
    s3: &S3Server,
    name: &str,
    listen: SocketAddr,
    root: &str,
) -> Result<Proc> {
    // Redirects off: by default distribution answers a blob GET with a 307 to a presigned
    // store URL, and the comparison is of two caches streaming the bytes themselves.
    let driver = format!(
        "  s3:\n    region: {}\n    regionendpoint: {}\n    bucket: {}\n    accesskey: {}\n    secretkey: {}\n    secure: false\n    v4auth: true\n    rootdirectory: /{root}\n  redirect:\n    disable: true\n",
        s3.region, s3.endpoint, s3.bucket, s3.access_key, s3.secret_key
    );
    util::start_distribution_on(
        &f.dir,
        name,
        &driver,
        listen,
        &format!("proxy:\n  remoteurl: http://{}\n", f.origin),
    )
}

/// Seconds until `key` exists in the bucket (Err after `timeout`).
fn wait_for_key(s3: &S3Server, key: &str, timeout: Duration) -> Result<f64> {
    let t = Instant::now();
    while !s3.exists(key)? {
        if t.elapsed() > timeout {
            bail!("s3://{}/{key} not there after {timeout:?}", s3.bucket);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Warm whole-blob MB/s of a regmirror against distribution, interleaved (fastest of
/// [`util::BEST_OF`] rounds per pair); a run that reaches
/// the origin is not warm and fails the comparison.
fn warm_pairs(
    f: &Fixture,
    pairs: usize,
    (who, url, rm): (&str, &str, &Proc),
    (dp_url, dp): (&str, &Proc),
    size: u64,
) -> Result<util::Paired<f64>> {
    util::interleaved_fastest(
        pairs,
        util::WARMUP_PAIRS,
        |side, _| {
            let before = util::sum_log_bytes(&f.origin_log);
            let (who, x) = match side {
                Side::Mirror => (who, util::blob_mbps(url, size)?),
                Side::Peer => ("distribution", util::blob_mbps(dp_url, size)?),
            };
            let fetched = util::sum_log_bytes(&f.origin_log).saturating_sub(before);
            if fetched > 0 {
                bail!("{who} fetched {fetched} B from the origin during a warm run: not warm");
            }
            Ok(x)
        },
        |rate| 1.0 / rate,
    )
    .with_context(|| format!("{}\n{}", rm.log_tail(20), dp.log_tail(20)))
}

fn blob_url(f: &Fixture, addr: SocketAddr, layer: &str) -> String {
    format!("http://{addr}/v2/{}/blobs/{layer}", f.huge.name)
}

fn warm_rows(
    f: &Fixture,
    bins: &Bins,
    s3: &S3Server,
    pairs: usize,
    log: &mut util::Log,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let warmup = util::WARMUP_PAIRS;
    let rm_addr = util::addr();
    let rm = replica(f, bins, s3, "regmirror-s3", rm_addr, RM_PREFIX)?;
    let dp_addr = util::addr();
    let dp = distribution(f, s3, "distribution-s3", dp_addr, DP_ROOT)?;
    let (layer, size) = f.huge_layer()?;
    let (rm_url, dp_url) = (blob_url(f, rm_addr, &layer), blob_url(f, dp_addr, &layer));
    // distribution serves a miss from the origin while a second fetch of its own stores the
    // blob in the background: the warm runs start once both copies are in the bucket.
    let hex = layer.trim_start_matches("sha256:");
    let stored = [
        format!("{RM_PREFIX}/blobs/sha256/{hex}"),
        format!(
            "{DP_ROOT}/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            hex.get(..2).unwrap_or_default()
        ),
    ];
    let mut fill = Vec::new();
    for (u, key) in [&rm_url, &dp_url].into_iter().zip(&stored) {
        let before = util::sum_log_bytes(&f.origin_log);
        let (n, t) = pull::curl_blob(u)?;
        if n != size {
            bail!("{u}: {n} bytes, expected {size}");
        }
        let t_stored = wait_for_key(s3, key, Duration::from_secs(300))?;
        let fetched = util::sum_log_bytes(&f.origin_log).saturating_sub(before);
        log.push(format!(
            "fill over S3 {u}: {n} B in {t:.2}s, in the bucket after {t_stored:.2}s, {fetched} B from the origin"
        ));
        fill.push((fetched as f64, t));
    }
    if let [(rm_bytes, rm_s), (dp_bytes, dp_s)] = fill[..] {
        let mut r = Row::info(
            S5,
            "cold miss of the 256 MiB blob (one curl): upstream body bytes (client's time to the last byte)",
            format!("{:.1} MB ({rm_s:.2} s)", rm_bytes / 1e6),
            format!("{:.1} MB distribution ({dp_s:.2} s)", dp_bytes / 1e6),
        );
        r.figure = Figure::One(rm_bytes / dp_bytes);
        r.target = "info (distribution's proxy fetches a miss twice: once for the client, once to store it)".into();
        rows.push(r);
    }
    // A warm run must be served from the bucket: the origin's byte count proves it.
    let warm = warm_pairs(f, pairs, ("regmirror", &rm_url, &rm), (&dp_url, &dp), size)?;
    pull::log_pairs(
        log,
        "S3: warm 256 MiB blob MB/s, regmirror vs distribution proxy",
        &warm,
    );
    rows.push(Row::paired(
        S5,
        &format!("warm 256 MiB blob throughput (one GET, fastest of {}), both on S3 (streamed): regmirror vs distribution proxy", util::BEST_OF),
        &warm,
        |x| *x,
        ("MB/s", "MB/s distribution"),
        Some(Goal::AtLeast(1.5)),
    ));

    // The same bucket prefix through a replica with a local tier (`--local-cache-size`): one
    // read from the bucket fills its disk, the runs after it are served from there.
    let tier_addr = util::addr();
    let tier = replica_with(
        f,
        bins,
        s3,
        "regmirror-s3-tier",
        tier_addr,
        RM_PREFIX,
        &["--local-cache-size", "2GiB"],
    )?;
    let tier_url = blob_url(f, tier_addr, &layer);
    let (n, t) = pull::curl_blob(&tier_url)?;
    let local = f
        .dir
        .join("spool-regmirror-s3-tier/local/blobs/sha256")
        .join(hex.get(..2).unwrap_or_default())
        .join(hex);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !local.exists() {
        if Instant::now() > deadline {
            bail!(
                "{} not in the local tier:\n{}",
                local.display(),
                tier.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    log.push(format!(
        "S3 tier: first read {n} B in {t:.2}s from the bucket, then on local disk"
    ));
    let warm_tier = warm_pairs(
        f,
        pairs,
        ("regmirror (local tier)", &tier_url, &tier),
        (&dp_url, &dp),
        size,
    )?;
    pull::log_pairs(
        log,
        "S3: warm 256 MiB blob MB/s, regmirror with a local tier vs distribution proxy",
        &warm_tier,
    );
    rows.push(Row::paired(
        S5,
        &format!("warm 256 MiB blob throughput (one GET, fastest of {}), bucket on S3: regmirror with its local tier (--local-cache-size) vs distribution proxy (streamed from S3)", util::BEST_OF),
        &warm_tier,
        |x| *x,
        ("MB/s", "MB/s distribution"),
        Some(Goal::AtLeast(1.5)),
    ));
    drop(tier);

    // The same prefix through a replica with `--redirect`: a blob GET is a 307 to a presigned
    // URL of the object, which curl follows, so the bytes come from SeaweedFS itself.
    let redirect_addr = util::addr();
    let redirect = replica_with(
        f,
        bins,
        s3,
        "regmirror-s3-redirect",
        redirect_addr,
        RM_PREFIX,
        &["--redirect"],
    )?;
    let redirect_url = blob_url(f, redirect_addr, &layer);
    let status = mirror_tests::proc::run(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &redirect_url,
    ]))?;
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    if !status.starts_with("307 ") {
        bail!(
            "{redirect_url}: {status}, expected a 307 to the bucket:\n{}",
            redirect.log_tail(20)
        );
    }
    log.push(format!("S3 redirect: {redirect_url} -> {status}"));
    let warm_redirect = warm_pairs(
        f,
        pairs,
        ("regmirror (redirect)", &redirect_url, &redirect),
        (&dp_url, &dp),
        size,
    )?;
    pull::log_pairs(
        log,
        "S3: warm 256 MiB blob MB/s, regmirror with redirect = true (curl -L) vs distribution proxy",
        &warm_redirect,
    );
    rows.push(Row::paired(
        S5,
        &format!("warm 256 MiB blob throughput (one GET following the 307, fastest of {}), bucket on S3: regmirror with redirect = true (307 to a presigned URL, bytes from SeaweedFS) vs distribution proxy (streamed from S3)", util::BEST_OF),
        &warm_redirect,
        |x| *x,
        ("MB/s", "MB/s distribution"),
        Some(Goal::AtLeast(1.5)),
    ));
    drop(redirect);

    // Manifest by tag: both caches hold bench/three, then short wrk runs alternately.
    util::skopeo_copy(&three(f, rm_addr), None, true)?;
    util::skopeo_copy(&three(f, dp_addr), None, true)?;
    let accept = format!("Accept: {MT_MANIFEST}");
    const WRK_S: u32 = 2;
    let rps = |a: SocketAddr, who: &str| -> Result<f64> {
        let r = util::wrk(
            &format!("http://{a}/v2/{}/manifests/{}", f.three.name, f.three.tag),
            16,
            WRK_S,
            &[&accept],
        )?;
        if r.non2xx > 0 {
            bail!("manifest by tag on {who}: {} non-2xx responses", r.non2xx);
        }
        Ok(r.rps)
    };
    let tags = util::interleaved(pairs, warmup, |side, _| match side {
        Side::Mirror => rps(rm_addr, "regmirror"),
        Side::Peer => rps(dp_addr, "distribution"),
    })?;
    pull::log_pairs(
        log,
        "S3: wrk manifest by tag req/s, regmirror vs distribution proxy",
        &tags,
    );
    rows.push(Row::paired(
        S5,
        &format!("manifest by tag, req/s (wrk -t1 -c16 -d{WRK_S}s), both on S3"),
        &tags,
        |x| *x,
        ("req/s", "req/s distribution"),
        Some(Goal::AtLeast(10.0)),
    ));

    // Memory of 8 concurrent warm streams from the bucket (read-ahead is per stream).
    let (max_rm, hwm_rm) = pull::rss_during(rm.pid(), || pull::eight_blobs(&rm_url, size))?;
    let (max_dp, hwm_dp) = pull::rss_during(dp.pid(), || pull::eight_blobs(&dp_url, size))?;
    log.push(format!("S3: RSS 8×256 MiB warm: regmirror max VmRSS {max_rm} KiB (VmHWM {hwm_rm} KiB); distribution max VmRSS {max_dp} KiB (VmHWM {hwm_dp} KiB)"));
    let mut r = Row::info(
        S5,
        "memory streaming 8 concurrent warm 256 MiB blobs from S3: max sampled VmRSS",
        format!("{:.1} MiB", util::mib(max_rm)),
        format!("{:.1} MiB distribution", util::mib(max_dp)),
    );
    r.figure = Figure::One(max_rm as f64 / max_dp as f64);
    r.target =
        "info (per stream: one GET streamed at the client's pace, its connection's buffers)".into();
    rows.push(r);
    Ok(rows)
}

fn three(f: &Fixture, a: SocketAddr) -> String {
    format!("{a}/{}:{}", f.three.name, f.three.tag)
}

/// Cold pull of the 3-layer image: a fresh process on a fresh prefix for every run.
fn cold_rows(
    f: &Fixture,
    bins: &Bins,
    s3: &S3Server,
    pairs: usize,
    log: &mut util::Log,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let warmup = util::WARMUP_PAIRS;
    let cold = util::interleaved(pairs, warmup, |side, i| -> Result<f64> {
        let a = util::addr();
        let p = match side {
            Side::Mirror => replica(
                f,
                bins,
                s3,
                &format!("regmirror-s3-cold-{i}"),
                a,
                &format!("cold-{i}"),
            )?,
            Side::Peer => distribution(
                f,
                s3,
                &format!("distribution-s3-cold-{i}"),
                a,
                &format!("{DP_ROOT}-cold-{i}"),
            )?,
        };
        util::timed(|| util::skopeo_copy(&three(f, a), None, true)).with_context(|| p.log_tail(20))
    })?;
    pull::log_pairs(
        log,
        "S3: cold pull bench/three s, regmirror vs distribution proxy",
        &cold,
    );
    rows.push(Row::paired(
        S5,
        &format!(
            "cold pull of a 3-layer {:.0} MB image (skopeo, plain HTTP), both on S3, time",
            f.image_bytes(&f.three) as f64 / 1e6
        ),
        &cold,
        |x| *x,
        ("s", "s distribution"),
        Some(Goal::AtMost(1.0)),
    ));
    Ok(rows)
}

/// [`REPLICAS`] regmirror processes on one prefix, each keeping its address across restarts
/// (Envoy's cache cluster names them).
struct Replicas<'a> {
    f: &'a Fixture,
    bins: &'a Bins,
    s3: &'a S3Server,
    addrs: Vec<SocketAddr>,
    procs: Vec<Proc>,
    starts: usize,
}

impl<'a> Replicas<'a> {
    fn new(f: &'a Fixture, bins: &'a Bins, s3: &'a S3Server) -> Self {
        Replicas {
            f,
            bins,
            s3,
            addrs: (0..REPLICAS).map(|_| util::addr()).collect(),
            procs: Vec::new(),
            starts: 0,
        }
    }

    /// Stops the running replicas (before new ones bind their ports) and starts all of them
    /// on `prefix`.
    fn start(&mut self, prefix: &str) -> Result<()> {
        self.procs.clear();
        self.starts += 1;
        for (i, a) in self.addrs.iter().enumerate() {
            let name = format!("regmirror-replica-{i}-{}", self.starts);
            self.procs
                .push(replica(self.f, self.bins, self.s3, &name, *a, prefix)?);
        }
        Ok(())
    }

    fn log_tails(&self) -> String {
        self.procs
            .iter()
            .map(|p| p.log_tail(15))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// MB/s of [`CLIENTS`] concurrent GETs of the blob, client `i` on replica `i % k`.
fn aggregate(urls: &[String], k: usize, size: u64) -> Result<f64> {
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = urls
            .iter()
            .take(k)
            .cycle()
            .take(CLIENTS)
            .map(|u| s.spawn(move || pull::curl_blob(u)))
            .collect();
        for h in hs {
            let (n, _) = h.join().map_err(|_| anyhow!("curl thread panicked"))??;
            if n != size {
                bail!("{n} bytes, expected {size}");
            }
        }
        Ok(())
    })?;
    Ok((CLIENTS as u64 * size) as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// Waits until Envoy's active health checks see `n` healthy hosts in the cache cluster.
fn wait_healthy(envoy: &Envoy, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let clusters = envoy.admin("/clusters").unwrap_or_default();
        let healthy = clusters
            .lines()
            .filter(|l| l.starts_with("cache_service::") && l.ends_with("::health_flags::healthy"))
            .count();
        if healthy >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{healthy} of {n} cache replicas healthy in Envoy after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn replica_rows(
    f: &Fixture,
    bins: &Bins,
    s3: &S3Server,
    pairs: usize,
    log: &mut util::Log,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut reps = Replicas::new(f, bins, s3);

    // Aggregate warm throughput: the first GET fills the prefix, the others read it warm.
    reps.start(RM_PREFIX)?;
    let (layer, size) = f.huge_layer()?;
    let urls: Vec<String> = reps.addrs.iter().map(|a| blob_url(f, *a, &layer)).collect();
    for u in &urls {
        util::blob_mbps(u, size).with_context(|| reps.log_tails())?;
    }
    let key = format!(
        "{RM_PREFIX}/blobs/sha256/{}",
        layer.trim_start_matches("sha256:")
    );
    wait_for_key(s3, &key, Duration::from_secs(300))?;
    let origin_before = util::sum_log_bytes(&f.origin_log);
    let one = aggregate(&urls, 1, size)?;
    log.push(format!(
        "S3: aggregate warm, {CLIENTS} clients on 1 replica: {one:.0} MB/s (uncounted)"
    ));
    for k in 2..=REPLICAS {
        let runs = util::interleaved(pairs, util::WARMUP_PAIRS, |side, _| match side {
            Side::Mirror => aggregate(&urls, k, size),
            Side::Peer => aggregate(&urls, 1, size),
        })
        .with_context(|| reps.log_tails())?;
        pull::log_pairs(
            log,
            &format!("S3: aggregate warm MB/s, {CLIENTS} clients over {k} replicas vs 1"),
            &runs,
        );
        rows.push(Row::paired(
            S5,
            &format!("aggregate warm throughput, {CLIENTS} concurrent clients × 256 MiB blob spread over {k} replicas (one bucket prefix) vs all on 1 replica"),
            &runs,
            |x| *x,
            (&format!("MB/s ({k})"), "MB/s (1)"),
            None,
        ));
    }

    let fetched = util::sum_log_bytes(&f.origin_log).saturating_sub(origin_before);
    if fetched > 0 {
        bail!("the replicas fetched {fetched} B from the origin during the warm aggregate runs: not warm");
    }

    // 32 concurrent cold pulls through Envoy's ring-hash cache cluster over the replicas, a
    // fresh prefix for every run; the origin's nginx counts the bytes.
    let dir = f.dir.join("envoy-replicas");
    std::fs::create_dir_all(&dir)?;
    let envoy = mirror_tests::replicas::start_envoy(&f.up, &reps.addrs, &dir)?;
    let port = envoy.port();
    let client = pull::tls_client(f, port)?;
    let base = format!("https://gcr.mirror.test:{port}");
    let img_bytes = f.image_bytes(&f.three);
    let manifest = f.sizes.get(&f.three.digest).copied().unwrap_or(0);
    let mut worst = 0;
    for run in 0..pairs {
        reps.start(&format!("envoy-cold-{run}"))?;
        wait_healthy(&envoy, REPLICAS)?;
        let (bytes0, reqs0) = (
            util::sum_log_bytes(&f.origin_log),
            util::count_log_lines(&f.origin_log),
        );
        let secs = util::timed(|| {
            std::thread::scope(|s| -> Result<()> {
                let hs: Vec<_> = (0..PULLS)
                    .map(|_| s.spawn(|| pull::client_pull(&client, &base, &f.three, f)))
                    .collect();
                for h in hs {
                    h.join().map_err(|_| anyhow!("client thread panicked"))??;
                }
                Ok(())
            })
        })
        .with_context(|| format!("{}\n{}", envoy.log_tail(20), reps.log_tails()))?;
        let bytes = util::sum_log_bytes(&f.origin_log).saturating_sub(bytes0);
        let reqs = util::count_log_lines(&f.origin_log).saturating_sub(reqs0);
        log.push(format!(
            "S3: {PULLS} concurrent cold pulls via Envoy over {REPLICAS} replicas: {secs:.2}s, upstream {bytes} B in {reqs} requests; image {img_bytes} B (its manifest {manifest} B)"
        ));
        if bytes > img_bytes {
            log.push(format!(
                "  the origin's log of that run (bytes status method path): {}",
                util::log_lines_after(&f.origin_log, reqs0).join("; ")
            ));
        }
        worst = worst.max(bytes);
    }
    let mut r = Row::ratio(
        S5,
        &format!("{PULLS} concurrent cold pulls (reqwest, manifest + blobs) via Envoy ring hash over {REPLICAS} replicas on one prefix: upstream body bytes / image size (worst of {pairs} runs)"),
        (worst as f64 / 1e6, "MB upstream"),
        (img_bytes as f64 / 1e6, "MB image"),
        Goal::AtMost(1.0),
    );
    r.target = format!(
        "≤ 1.0× (1.0 = each blob fetched once; {} B more than the image)",
        worst as i64 - img_bytes as i64
    );
    rows.push(r);
    Ok(rows)
}
