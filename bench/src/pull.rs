//! Rows 2–4: end-to-end pulls (direct / filter route / cache route), 32 concurrent cold
//! pulls through the cache route, and regmirror against distribution's proxy mode and nginx.
//!
//! Layout of the fixtures (all 127.0.0.1):
//! - the harness' upstreams: hub distribution with token auth behind the nginx hub front
//!   (307 to the CDN), token server — the filter route pulls through these;
//! - `hub_direct`: the filter route's baseline, the same work without the mirror: a second
//!   hub distribution over the same storage whose realm is the harness' token server by
//!   address (`auth.docker.io` does not resolve here), behind an nginx with the same hub
//!   front (blob GET → 307) and CDN, whose `Location` names the CDN by address;
//! - `direct`: a distribution over the same storage without auth, TLS with the test leaf —
//!   the cache route's baseline (its upstream has no token auth and no CDN either);
//! - `origin`: a distribution over the same storage without auth, plain HTTP, behind an nginx
//!   that logs `$body_bytes_sent` — the upstream of regmirror and of distribution's proxy;
//! - Envoy from the shipped `envoy/local.yaml` (harness substitution, TLS listener) whose
//!   `cache_service` cluster points at regmirror (`gcr.io` = cache route).

use crate::util::{self, fmt_runs, Figure, Goal, Paired, Row, Side, Spread};
use crate::Bins;
use anyhow::{anyhow, bail, Context, Result};
use mirror_tests::envoy::{Envoy, Substitution};
use mirror_tests::images::{build_layout, SeededImage, MT_MANIFEST};
use mirror_tests::proc::{run as run_cmd, Proc};
use mirror_tests::upstreams::{Front, Upstreams, CDN_HOST, HUB_HOST, HUB_SERVICE};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const S2: &str = "2. end-to-end pull";
const S3: &str = "3. concurrency";
const S4: &str = "4. cache vs peers";
const MIB: usize = 1024 * 1024;

pub(crate) struct Fixture {
    pub(crate) up: Upstreams,
    pub(crate) dir: PathBuf,
    big: SeededImage,
    pub(crate) huge: SeededImage,
    pub(crate) three: SeededImage,
    /// Bytes of each blob, by digest.
    pub(crate) sizes: BTreeMap<String, u64>,
    direct: SocketAddr,
    direct_pid: u32,
    /// The hub front of the fair direct baseline.
    hub_direct: SocketAddr,
    /// Its CDN's access log (one line per request).
    hub_direct_cdn_log: PathBuf,
    pub(crate) origin: SocketAddr,
    pub(crate) origin_log: PathBuf,
    _procs: Vec<Proc>,
}

impl Fixture {
    /// The one 256 MiB layer of bench/huge and its size.
    pub fn huge_layer(&self) -> Result<(String, u64)> {
        let layer = self
            .huge
            .platforms
            .first()
            .and_then(|p| p.layer_digests.first())
            .cloned()
            .ok_or_else(|| anyhow!("bench/huge has no layer"))?;
        let size = self
            .sizes
            .get(&layer)
            .copied()
            .ok_or_else(|| anyhow!("no size for {layer}"))?;
        Ok((layer, size))
    }

    pub(crate) fn image_bytes(&self, img: &SeededImage) -> u64 {
        img.all_blobs()
            .iter()
            .map(|d| self.sizes.get(d).copied().unwrap_or(0))
            .sum::<u64>()
            + self.sizes.get(&img.digest).copied().unwrap_or(0)
    }
    fn blob_path(&self, img: &SeededImage, digest: &str) -> PathBuf {
        img.layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }
}

fn push(image: &SeededImage, registry: SocketAddr) -> Result<()> {
    let skopeo = util::which_or("skopeo", "apt-get install skopeo")?;
    run_cmd(
        Command::new(skopeo)
            .args([
                "--insecure-policy",
                "copy",
                "--preserve-digests",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:{}", image.layout.display(), image.tag))
            .arg(format!("docker://{registry}/{}:{}", image.name, image.tag)),
    )
    .with_context(|| format!("seed {}", image.name))?;
    Ok(())
}

pub(crate) fn setup(base: &Path, log: &mut crate::util::Log) -> Result<Fixture> {
    let t = Instant::now();
    mirror_tests::ensure_etc_hosts()?;
    let up = Upstreams::start().context("harness upstreams")?;
    let dir = base.join("pulls");
    std::fs::create_dir_all(&dir)?;
    let layouts = dir.join("layouts");
    let big = build_layout(
        &layouts.join("big"),
        "gcr.io",
        "bench/big",
        "1",
        101,
        &["amd64"],
        &[40 * MIB; 5],
    )?;
    let huge = build_layout(
        &layouts.join("huge"),
        "gcr.io",
        "bench/huge",
        "1",
        102,
        &["amd64"],
        &[256 * MIB],
    )?;
    let three = build_layout(
        &layouts.join("three"),
        "gcr.io",
        "bench/three",
        "1",
        103,
        &["amd64"],
        &[16 * MIB, 8 * MIB, 24 * MIB],
    )?;
    let mut sizes = BTreeMap::new();
    for img in [&big, &huge, &three] {
        for entry in std::fs::read_dir(img.layout.join("blobs/sha256"))? {
            let e = entry?;
            sizes.insert(
                format!("sha256:{}", e.file_name().to_string_lossy()),
                e.metadata()?.len(),
            );
        }
    }
    let storage = &up.hub.storage;
    let mut procs = Vec::new();
    // Plain-HTTP distribution over the hub storage: seeding, then the origin.
    let plain = util::addr();
    procs.push(util::start_distribution(
        &dir,
        "plain-distribution",
        storage,
        plain,
        "",
    )?);
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = [&big, &huge, &three]
            .into_iter()
            .map(|i| s.spawn(move || push(i, plain)))
            .collect();
        for h in hs {
            h.join().map_err(|_| anyhow!("seed thread panicked"))??;
        }
        Ok(())
    })?;
    let direct = util::addr();
    procs.push(util::start_distribution(
        &dir,
        "direct-distribution",
        storage,
        direct,
        &format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            up.pki.cert.display(),
            up.pki.key.display()
        ),
    )?);
    let direct_pid = procs.last().map_or(0, Proc::pid);
    let hub_direct_cdn_log = dir.join("hub-direct-cdn.log");
    let (hub_direct, hub_procs) = start_hub_direct(&up, &dir, &hub_direct_cdn_log)?;
    procs.extend(hub_procs);
    let origin = util::addr();
    let origin_log = dir.join("origin-nginx/origin.log");
    procs.push(util::start_nginx(
        &dir,
        "origin-nginx",
        &format!(
            "  log_format bytes '$body_bytes_sent $status $request_method $uri';\n  server {{\n    listen {origin};\n    access_log {} bytes;\n    proxy_http_version 1.1;\n    proxy_buffering off;\n    proxy_request_buffering off;\n    location / {{ proxy_set_header Host $http_host; proxy_pass http://{plain}; }}\n  }}",
            origin_log.display()
        ),
        &[origin],
    )?);
    let f = Fixture {
        up,
        dir,
        big,
        huge,
        three,
        sizes,
        direct,
        direct_pid,
        hub_direct,
        hub_direct_cdn_log,
        origin,
        origin_log,
        _procs: procs,
    };
    log.push(format!(
        "setup {:.1}s: images bench/big {} B (5 layers), bench/huge {} B, bench/three {} B",
        t.elapsed().as_secs_f64(),
        f.image_bytes(&f.big),
        f.image_bytes(&f.huge),
        f.image_bytes(&f.three)
    ));
    Ok(f)
}

/// Docker Hub's shape reachable without the mirror: a token-auth distribution over the hub
/// storage whose realm is the harness' token server by address, and an nginx with the
/// harness' hub front (blob GET authorised by a HEAD, then 307) and CDN (refuses
/// `Authorization`, needs `verify`), the `Location` naming the CDN by address. The client
/// trusts the test CA; the leaf certificate carries `127.0.0.1`. Returns the front.
fn start_hub_direct(up: &Upstreams, dir: &Path, cdn_log: &Path) -> Result<(SocketAddr, Vec<Proc>)> {
    let realm = format!("https://{}/token", up.token.addr);
    let registry = mirror_tests::upstreams::start_distribution(
        "hub-direct-registry",
        dir,
        &up.hub.storage,
        Some((&up.pki.cert, &up.pki.key)),
        Some((&realm, HUB_SERVICE, &up.pki.token_cert)),
    )?;
    let (front, cdn) = (util::addr(), util::addr());
    let empty = dir.join("hub-direct-empty");
    std::fs::create_dir_all(&empty)?;
    let reg = registry.addr;
    let body = format!(
        r#"  ssl_certificate {cert};
  ssl_certificate_key {key};
  proxy_ssl_trusted_certificate {ca};
  proxy_ssl_verify on;
  proxy_ssl_server_name on;
  proxy_http_version 1.1;
  proxy_buffering off;
  proxy_request_buffering off;
  proxy_redirect off;
  client_max_body_size 0;
  server {{
    listen {front} ssl;
    server_name {HUB_HOST};
    root {empty};
    location ~ "^/v2/.+/blobs/sha256:[a-f0-9]{{64}}$" {{
      auth_request /_blob_auth;
      try_files /_never_ @cdn_redirect;
    }}
    location = /_blob_auth {{
      internal;
      proxy_method HEAD;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Host {HUB_HOST};
      proxy_ssl_name {HUB_HOST};
      proxy_pass https://{reg}$request_uri;
    }}
    location @cdn_redirect {{
      if ($uri ~ "^/v2/.+/blobs/sha256:(?<p2>[a-f0-9]{{2}})(?<rest>[a-f0-9]{{62}})$") {{
        return 307 "https://{cdn}/registry-v2/docker/registry/v2/blobs/sha256/$p2/$p2$rest/data?verify=$request_id";
      }}
      return 404;
    }}
    location / {{
      proxy_set_header Host {HUB_HOST};
      proxy_ssl_name {HUB_HOST};
      proxy_pass https://{reg};
    }}
  }}
  server {{
    listen {cdn} ssl;
    server_name {CDN_HOST};
    access_log {cdn_log};
    location /registry-v2/ {{
      if ($http_authorization) {{
        return 400 "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>";
      }}
      if ($arg_verify = "") {{
        return 403 "<Error><Code>AccessDenied</Code><Message>missing verify</Message></Error>";
      }}
      alias {storage}/;
    }}
    location / {{
      return 404;
    }}
  }}"#,
        cert = up.pki.cert.display(),
        key = up.pki.key.display(),
        ca = up.pki.ca.display(),
        empty = empty.display(),
        storage = up.hub.storage.display(),
        cdn_log = cdn_log.display(),
    );
    let nginx = util::start_nginx(dir, "hub-direct-nginx", &body, &[front, cdn])?;
    Ok((front, vec![registry.proc, nginx]))
}

/// Where a bench regmirror's `gcr.io` upstream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The metered origin: nginx (counting body bytes) in front of the plain distribution.
    Metered,
    /// The TLS distribution the direct pull reads: a cold pull through the mirror then does
    /// the direct pull's work plus the mirror's, and nothing else.
    Direct,
}

/// A regmirror with fresh (or given) storage at `listen`, upstream `gcr.io` = `origin`.
fn regmirror(
    f: &Fixture,
    bins: &Bins,
    name: &str,
    listen: SocketAddr,
    storage: &Path,
    origin: Origin,
) -> Result<Proc> {
    let (upstream, ca) = match origin {
        Origin::Metered => (format!("gcr.io=http://{}", f.origin), None),
        Origin::Direct => (
            format!("gcr.io=https://{}", f.direct),
            Some(f.up.pki.ca.as_path()),
        ),
    };
    util::start_regmirror(
        &bins.regmirror,
        &f.dir,
        name,
        listen,
        storage,
        &upstream,
        ca,
    )
}

fn fresh(f: &Fixture, what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    f.dir.join(format!("storage-{what}-{n}"))
}

/// containerd-style pull with reqwest: manifest by tag, then config and layers; bodies
/// discarded, byte counts checked. Returns the bytes read.
pub(crate) fn client_pull(
    c: &reqwest::blocking::Client,
    base: &str,
    img: &SeededImage,
    f: &Fixture,
) -> Result<u64> {
    let url = format!(
        "{base}/v2/{}/manifests/{}",
        img.name.trim_start_matches("gcr.io/"),
        img.tag
    );
    let resp = c.get(&url).header("Accept", MT_MANIFEST).send()?;
    if !resp.status().is_success() {
        bail!("GET {url}: {}", resp.status());
    }
    let m: serde_json::Value = serde_json::from_slice(&resp.bytes()?)?;
    let mut total = 0;
    let digest_of = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.get("digest"))
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_string()
    };
    let mut digests = vec![digest_of(m.get("config"))];
    for l in m
        .get("layers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        digests.push(digest_of(Some(l)));
    }
    for d in digests {
        let n = util::get_discard(c, &format!("{base}/v2/{}/blobs/{d}", img.name), None)?;
        if Some(n) != f.sizes.get(&d).copied() {
            bail!("blob {d}: read {n} bytes, expected {:?}", f.sizes.get(&d));
        }
        total += n;
    }
    Ok(total)
}

pub(crate) fn tls_client(f: &Fixture, envoy_port: u16) -> Result<reqwest::blocking::Client> {
    let ca = reqwest::Certificate::from_pem(f.up.pki.ca_pem.as_bytes())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], envoy_port));
    let mut b = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(300));
    for h in mirror_tests::MIRROR_HOSTS {
        b = b.resolve(h, addr);
    }
    Ok(b.build()?)
}

pub fn run(
    base: &Path,
    bins: &Bins,
    pulls: bool,
    peers: bool,
    pairs: usize,
    log: &mut crate::util::Log,
) -> Vec<Row> {
    let f = match setup(base, log) {
        Ok(f) => f,
        Err(e) => return vec![Row::not_measured(S2, "fixtures", &format!("{e:#}"))],
    };
    let mut rows = Vec::new();
    if pulls {
        match pull_rows(&f, bins, pairs, log) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::not_measured(
                S2,
                "end-to-end / concurrency",
                &format!("{e:#}"),
            )),
        }
    }
    if peers {
        match peer_rows(&f, bins, pairs, log) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::not_measured(S4, "cache vs peers", &format!("{e:#}"))),
        }
    }
    rows
}

/// A regmirror at a fixed address (Envoy's `cache_service` cluster points at it) that
/// restarts on fresh storage for each cold run.
struct Cache<'a> {
    f: &'a Fixture,
    bins: &'a Bins,
    addr: SocketAddr,
    what: &'static str,
    storage: PathBuf,
    /// Where the next (re)start fetches from.
    origin: Origin,
    proc: Option<Proc>,
    starts: usize,
}

impl<'a> Cache<'a> {
    fn start(f: &'a Fixture, bins: &'a Bins, addr: SocketAddr, what: &'static str) -> Result<Self> {
        let mut c = Cache {
            f,
            bins,
            addr,
            what,
            storage: fresh(f, what),
            origin: Origin::Metered,
            proc: None,
            starts: 0,
        };
        c.restart_cold()?;
        Ok(c)
    }

    /// Stops the running regmirror (before the new one binds the same address), drops its
    /// storage and starts a new one on empty storage.
    fn restart_cold(&mut self) -> Result<()> {
        self.proc = None;
        let old = std::mem::replace(&mut self.storage, fresh(self.f, self.what));
        // Only disk space is at stake: the directory is under the bench's temp dir.
        let _ = std::fs::remove_dir_all(old);
        self.starts += 1;
        self.proc = Some(regmirror(
            self.f,
            self.bins,
            &format!("regmirror-{}-{}", self.what, self.starts),
            self.addr,
            &self.storage,
            self.origin,
        )?);
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    fn log_tail(&self, lines: usize) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }
}

pub(crate) fn log_pairs(log: &mut crate::util::Log, what: &str, p: &Paired<f64>) {
    log.push(format!(
        "{what}: mirror {}; peer {}",
        fmt_runs(&p.mirror),
        fmt_runs(&p.peer)
    ));
}

fn pull_rows(
    f: &Fixture,
    bins: &Bins,
    pairs: usize,
    log: &mut crate::util::Log,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let rm_addr = util::addr();
    let mut rm = Cache::start(f, bins, rm_addr, "route")?;
    let envoy_dir = f.dir.join("envoy");
    std::fs::create_dir_all(&envoy_dir)?;
    let mut sub = Substitution::for_upstreams(&f.up, true)?;
    sub.clusters.insert("cache_service".to_string(), rm_addr);
    sub.wasm = Some(bins.wasm.clone());
    let envoy = Envoy::start(
        &mirror_tests::build::workspace_root().join("envoy/local.yaml"),
        &sub,
        &envoy_dir,
    )?;
    let port = envoy.port();
    let cert_dir = f.up.pki.cert_dir.clone();
    let image = |host: &str| format!("{host}/{}:{}", f.big.name, f.big.tag);
    let hub_direct_ref = image(&f.hub_direct.to_string());
    let direct_ref = image(&f.direct.to_string());
    let filter_ref = image(&format!("docker.mirror.test:{port}"));
    let cache_ref = image(&format!("gcr.mirror.test:{port}"));
    let pull = |r: &str| util::timed(|| util::skopeo_copy(r, Some(&cert_dir), false));
    let warmup = util::WARMUP_PAIRS;

    // Each run also counts the token requests and CDN GETs it caused: the baseline must do
    // the work the filter route does, or the ratio measures something else.
    let hub_pull = |side: Side| -> Result<HubPull> {
        let cdn_lines = || match side {
            Side::Mirror => f.up.access_log(Front::Cdn).len(),
            Side::Peer => util::count_log_lines(&f.hub_direct_cdn_log),
        };
        let (tokens0, cdn0) = (f.up.token.requests().len(), cdn_lines());
        let secs = match side {
            Side::Mirror => pull(&filter_ref).with_context(|| envoy.log_tail(20))?,
            Side::Peer => pull(&hub_direct_ref)?,
        };
        Ok(HubPull {
            secs,
            tokens: f.up.token.requests().len().saturating_sub(tokens0),
            cdn_gets: cdn_lines().saturating_sub(cdn0),
        })
    };
    let filter = util::interleaved_fastest(pairs, warmup, |side, _| hub_pull(side), |r| r.secs)?;
    let work = |runs: &[HubPull]| {
        runs.iter()
            .map(|r| format!("{}/{}", r.tokens, r.cdn_gets))
            .collect::<Vec<_>>()
            .join(" ")
    };
    log.push(format!(
        "token requests/CDN GETs per pull: filter route {}; direct {}",
        work(&filter.mirror),
        work(&filter.peer)
    ));
    if let Some(r) = filter
        .peer
        .iter()
        .find(|r| r.tokens == 0 || r.cdn_gets == 0)
    {
        bail!(
            "the direct baseline skipped the token exchange or the CDN ({} token requests, {} CDN GETs): not the filter route's work",
            r.tokens,
            r.cdn_gets
        );
    }
    let filter = Paired {
        mirror: filter.mirror.iter().map(|r| r.secs).collect(),
        peer: filter.peer.iter().map(|r| r.secs).collect(),
    };
    log_pairs(
        log,
        "pull s, filter route (Envoy TLS → hub front → 307 CDN, token auth) vs direct (hub front → 307 CDN, token auth)",
        &filter,
    );
    // The cold route reads the very server the direct pull reads (TLS distribution), so the
    // ratio is what Envoy and regmirror add; the metered origin's extra nginx hop is the
    // bench's meter, not the mirror's (sections 3 and 4 use it to count bytes).
    // Each pull also counts the machine's busy CPU-seconds: on two shared cores a pull that
    // needs more CPU cannot be faster than CPU-s / 2, whatever the waiting.
    rm.origin = Origin::Direct;
    let cold_runs = util::interleaved(pairs, warmup, |side, _| -> Result<ColdPull> {
        if side == Side::Mirror {
            rm.restart_cold()?;
        }
        let meters = [
            Meter::WaitedChildren,
            Meter::Process(f.direct_pid),
            Meter::Process(envoy.proc.pid()),
            Meter::Process(rm.pid()),
        ];
        let before = CpuUse::sample(meters)?;
        let secs = match side {
            Side::Mirror => pull(&cache_ref)
                .with_context(|| format!("{}\n{}", envoy.log_tail(20), rm.log_tail(20)))?,
            Side::Peer => pull(&direct_ref)?,
        };
        let cpu = CpuUse::sample(meters)?.minus(&before);
        Ok(ColdPull { secs, cpu })
    })?;
    // The same pulls with the client on a core of its own and the servers on the others, as
    // when the client is another machine: what the route adds without taking the client's CPU.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let isolated = if cores >= 2 {
        let servers = format!("1-{}", cores - 1);
        let pull_on_0 =
            |r: &str| util::timed(|| util::skopeo_copy_on(Some("0"), r, Some(&cert_dir), false));
        let runs = util::interleaved(pairs, warmup, |side, _| -> Result<f64> {
            if side == Side::Mirror {
                rm.restart_cold()?;
            }
            util::pin(&[f.direct_pid, envoy.proc.pid(), rm.pid()], &servers)?;
            match side {
                Side::Mirror => pull_on_0(&cache_ref),
                Side::Peer => pull_on_0(&direct_ref),
            }
        });
        // Unpinned for the sections after this one, whatever the runs gave.
        util::pin(
            &[f.direct_pid, envoy.proc.pid(), rm.pid()],
            &format!("0-{}", cores - 1),
        )?;
        Some(runs?)
    } else {
        None
    };
    rm.origin = Origin::Metered;
    let part = |value: fn(&ColdPull) -> f64| Paired {
        mirror: cold_runs.mirror.iter().map(value).collect(),
        peer: cold_runs.peer.iter().map(value).collect(),
    };
    let (cold, cold_cpu) = (part(|r| r.secs), part(|r| r.cpu.machine_busy_s));
    log_pairs(
        log,
        "pull s, cache route cold (Envoy → regmirror → the direct pull's distribution over TLS) vs direct distribution (TLS, no auth)",
        &cold,
    );
    log_pairs(
        log,
        "busy CPU-s of the machine per pull, cache route cold vs direct",
        &cold_cpu,
    );
    let by_process = |side: Side| {
        // Meters in the order sampled: skopeo, distribution, Envoy, regmirror.
        let m = |g: fn(&[f64; 4]) -> f64| cold_runs.median_of(side, |r| g(&r.cpu.process_s));
        let rest = cold_runs.median_of(side, |r| {
            r.cpu.machine_busy_s - r.cpu.process_s.iter().sum::<f64>()
        });
        let own = match side {
            Side::Mirror => format!(", Envoy {:.2}, regmirror {:.2}", m(|p| p[2]), m(|p| p[3])),
            Side::Peer => String::new(),
        };
        format!(
            "skopeo {:.2}, distribution {:.2}{own}, rest {rest:.2}",
            m(|p| p[0]),
            m(|p| p[1])
        )
    };
    if let Some(isolated) = &isolated {
        log_pairs(
            log,
            "pull s, cache route cold vs direct, client on CPU 0 and the servers on the others",
            isolated,
        );
    }
    let cpu_split = Row::info(
        S2,
        "same cold pulls: CPU-seconds per pull by process (medians; rest: the kernel's own threads and anything else running), cache route cold vs direct",
        by_process(Side::Mirror),
        by_process(Side::Peer),
    );
    let warm = util::interleaved_fastest(
        pairs,
        warmup,
        |side, _| match side {
            Side::Mirror => pull(&cache_ref),
            Side::Peer => pull(&direct_ref),
        },
        |t| *t,
    )?;
    log_pairs(
        log,
        "pull s, cache route warm vs direct distribution (TLS, no auth)",
        &warm,
    );
    let mb = f.image_bytes(&f.big) as f64 / 1e6;
    let secs = |x: &f64| *x;
    rows.push(Row::paired(
        S2,
        &format!("skopeo copy {mb:.0} MB 5-layer image: filter route (Envoy TLS + wasm → nginx hub front, token auth, 307 → CDN) vs the same pull direct (nginx hub front, token auth, 307 → CDN), fastest of {}", util::BEST_OF),
        &filter,
        secs,
        ("s", "s direct"),
        Some(Goal::AtMost(1.10)),
    ));
    rows.push(Row::paired(
        S2,
        "same image: cache route cold (Envoy TLS + wasm → regmirror → the same TLS distribution the direct pull reads, no auth) vs direct distribution (TLS, no auth)",
        &cold,
        secs,
        ("s", "s direct"),
        Some(Goal::AtMost(1.1)),
    ));
    const ISOLATED: &str = "same cold pulls, the client on a core of its own (skopeo on CPU 0 by taskset; Envoy, regmirror and distribution on the others), as when the client is another machine";
    rows.push(match &isolated {
        Some(isolated) => {
            let mut r = Row::paired(S2, ISOLATED, isolated, secs, ("s", "s direct"), None);
            r.target = "info: what the cold route adds when the mirror's work does not take the client's CPU (the row above shares both cores with it)".into();
            r
        }
        None => Row::not_measured(S2, ISOLATED, "one CPU: no core to give the client"),
    });
    let mut cpu_row = Row::paired(
        S2,
        "same cold pulls: busy CPU-seconds of the whole machine per pull (clients, Envoy, regmirror, distribution), cache route cold vs direct",
        &cold_cpu,
        secs,
        ("CPU-s", "CPU-s direct"),
        None,
    );
    cpu_row.target = "info: the mirror's own work (Envoy TLS, hashing, writing the cache); with 2 cores busy the wall-time ratio cannot beat it".into();
    rows.push(cpu_row);
    rows.push(cpu_split);
    rows.push(Row::paired(
        S2,
        &format!("same image: cache route warm (Envoy TLS + wasm → regmirror) vs direct distribution (TLS, no auth), fastest of {}", util::BEST_OF),
        &warm,
        secs,
        ("s", "s direct"),
        Some(Goal::AtMost(1.0)),
    ));

    // 3. Concurrency: 32 clients against one, same cold image, cache route, fresh storage
    // for every run.
    let client = tls_client(f, port)?;
    let base = format!("https://gcr.mirror.test:{port}");
    let img_bytes = f.image_bytes(&f.big);
    let conc = util::interleaved(pairs, warmup, |side, _| -> Result<Conc> {
        let n = match side {
            Side::Mirror => 32,
            Side::Peer => 1,
        };
        rm.restart_cold()?;
        let before = util::sum_log_bytes(&f.origin_log);
        let lines_before = util::count_log_lines(&f.origin_log);
        let meters = [
            Meter::Process(std::process::id()),
            Meter::Process(envoy.proc.pid()),
            Meter::Process(rm.pid()),
        ];
        let cpu0 = CpuUse::sample(meters)?;
        let t = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = (0..n)
                .map(|_| s.spawn(|| client_pull(&client, &base, &f.big, f)))
                .collect();
            for h in hs {
                h.join().map_err(|_| anyhow!("client thread panicked"))??;
            }
            Ok(())
        })?;
        let secs = t.elapsed().as_secs_f64();
        let cpu = CpuUse::sample(meters)?.minus(&cpu0);
        Ok(Conc {
            secs,
            upstream_bytes: util::sum_log_bytes(&f.origin_log).saturating_sub(before),
            upstream_requests: util::count_log_lines(&f.origin_log).saturating_sub(lines_before),
            cpu,
        })
    })?;
    for (label, runs) in [("32 clients", &conc.mirror), ("1 client", &conc.peer)] {
        for c in runs {
            log.push(format!(
                "concurrency {label}: {:.2}s, upstream {} B in {} requests, CPU {}; image {img_bytes} B",
                c.secs, c.upstream_bytes, c.upstream_requests, c.cpu
            ));
        }
    }
    // Bytes are not noise: the worst run decides.
    let worst = |runs: &[Conc]| runs.iter().map(|c| c.upstream_bytes).max().unwrap_or(0);
    let (b32, b1) = (worst(&conc.mirror), worst(&conc.peer));
    let mut r = Row::ratio(
        S3,
        &format!("32 concurrent cold pulls (reqwest, manifest + blobs) via cache route: upstream body bytes / image size (worst of {pairs} runs)"),
        (b32 as f64 / 1e6, "MB upstream"),
        (img_bytes as f64 / 1e6, "MB image"),
        Goal::AtMost(1.0),
    );
    r.target = format!(
        "≤ 1.0× (1.0 = fetched once; {} B more than the image)",
        b32 as i64 - img_bytes as i64
    );
    rows.push(r);
    rows.push(Row::paired(
        S3,
        "32 concurrent cold pulls: wall time vs one cold pull",
        &conc,
        |c| c.secs,
        ("s (32)", "s (1)"),
        Some(Goal::AtMost(1.5)),
    ));
    // All of it runs on this machine's cores: the CPU work of 32 pulls bounds the wall time.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let floor = |c: &Conc| c.cpu.machine_busy_s / cores;
    let to_floor = Spread::of(
        &conc
            .mirror
            .iter()
            .map(|c| c.secs / floor(c).max(1e-9))
            .collect::<Vec<_>>(),
    );
    let m32 = |g: fn(&Conc) -> f64| conc.median_of(Side::Mirror, g);
    let m1 = |g: fn(&Conc) -> f64| conc.median_of(Side::Peer, g);
    let mut r = Row::info(
        S3,
        "32 concurrent cold pulls: wall time vs the machine's CPU floor (busy CPU-seconds / cores), same run",
        format!("{:.2} s", m32(|c| c.secs)),
        format!(
            "{:.2} s floor ({:.1} CPU-s on {cores:.0} cores)",
            conc.median_of(Side::Mirror, floor),
            m32(|c| c.cpu.machine_busy_s)
        ),
    );
    r.figure = Figure::Pairs(to_floor);
    r.target = format!(
        "info (medians): CPU-s clients {:.1}, Envoy {:.1}, regmirror {:.1} (one pull: {:.1}/{:.1}/{:.1}); clients + Envoy alone (TLS at both ends) need {:.2} s of the {cores:.0} cores, against 1.5× one pull = {:.2} s",
        m32(|c| c.cpu.process_s[0]),
        m32(|c| c.cpu.process_s[1]),
        m32(|c| c.cpu.process_s[2]),
        m1(|c| c.cpu.process_s[0]),
        m1(|c| c.cpu.process_s[1]),
        m1(|c| c.cpu.process_s[2]),
        m32(|c| c.cpu.process_s[0] + c.cpu.process_s[1]) / cores,
        1.5 * m1(|c| c.secs),
    );
    rows.push(r);
    rows.push(Row::ratio(
        S3,
        &format!("one cold pull via cache route: upstream body bytes / image size (worst of {pairs} runs)"),
        (b1 as f64 / 1e6, "MB upstream"),
        (img_bytes as f64 / 1e6, "MB image"),
        Goal::AtMost(1.0),
    ));
    drop(rm);
    drop(envoy);
    Ok(rows)
}

/// One skopeo pull from the Docker Hub-shaped upstream.
struct HubPull {
    secs: f64,
    tokens: usize,
    cdn_gets: usize,
}

/// One run of the concurrency comparison.
struct Conc {
    secs: f64,
    upstream_bytes: u64,
    upstream_requests: usize,
    /// Clients (this process), Envoy, regmirror.
    cpu: CpuUse<3>,
}

/// One cold pull of section 2: its wall time and the CPU it took.
struct ColdPull {
    secs: f64,
    /// skopeo, the direct distribution, Envoy, regmirror.
    cpu: CpuUse<4>,
}

/// Whose CPU time a [`CpuUse`] counts.
#[derive(Clone, Copy, Debug)]
enum Meter {
    Process(u32),
    /// This process's children that have ended and been waited for (the skopeo runs).
    WaitedChildren,
}

/// CPU-seconds used so far by the machine (all cores, non-idle) and by each of `N` meters.
#[derive(Clone, Copy, Debug)]
struct CpuUse<const N: usize> {
    machine_busy_s: f64,
    process_s: [f64; N],
}

impl<const N: usize> CpuUse<N> {
    fn sample(meters: [Meter; N]) -> Result<Self> {
        let mut process_s = [0.0; N];
        for (slot, meter) in process_s.iter_mut().zip(meters) {
            let us = match meter {
                Meter::Process(pid) => util::proc_cpu_us(pid)?,
                Meter::WaitedChildren => util::children_cpu_us()?,
            };
            *slot = us as f64 / 1e6;
        }
        Ok(CpuUse {
            machine_busy_s: util::machine_busy_s()?,
            process_s,
        })
    }

    fn minus(&self, before: &CpuUse<N>) -> CpuUse<N> {
        let mut process_s = self.process_s;
        for (p, b) in process_s.iter_mut().zip(before.process_s) {
            *p -= b;
        }
        CpuUse {
            machine_busy_s: self.machine_busy_s - before.machine_busy_s,
            process_s,
        }
    }
}

impl std::fmt::Display for CpuUse<3> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "machine {:.1} s, clients {:.1} s, envoy {:.1} s, regmirror {:.1} s",
            self.machine_busy_s, self.process_s[0], self.process_s[1], self.process_s[2]
        )
    }
}

pub(crate) fn curl_blob(url: &str) -> Result<(u64, f64)> {
    let o = run_cmd(Command::new("curl").args([
        "-sfL",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total}",
        url,
    ]))?;
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    let mut it = s.split_whitespace();
    let n = it.next().and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0) as u64;
    let t = it
        .next()
        .and_then(|x| x.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    Ok((n, t))
}

/// Samples VmRSS of `pid` while `work` runs; returns (max VmRSS, VmHWM) in KiB.
pub(crate) fn rss_during(pid: u32, work: impl FnOnce() -> Result<()> + Send) -> Result<(u64, u64)> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (max, res) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut max = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(v) = util::proc_status_kib(pid, "VmRSS") {
                    max = max.max(v);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        });
        let res = work();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (sampler.join().unwrap_or(0), res)
    });
    res?;
    Ok((max, util::proc_status_kib(pid, "VmHWM")?))
}

pub(crate) fn eight_blobs(url: &str, size: u64) -> Result<()> {
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..8).map(|_| s.spawn(|| curl_blob(url))).collect();
        for h in hs {
            let (n, _) = h.join().map_err(|_| anyhow!("curl thread panicked"))??;
            if n != size {
                bail!("{url}: {n} bytes, expected {size}");
            }
        }
        Ok(())
    })
}

fn peer_rows(
    f: &Fixture,
    bins: &Bins,
    pairs: usize,
    log: &mut crate::util::Log,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let warmup = util::WARMUP_PAIRS;
    let proxy_cfg = format!("proxy:\n  remoteurl: http://{}\n", f.origin);
    let rm_addr = util::addr();
    let rm_storage = fresh(f, "peer-rm");
    let rm = regmirror(
        f,
        bins,
        "regmirror-peer",
        rm_addr,
        &rm_storage,
        Origin::Metered,
    )?;
    let dp_addr = util::addr();
    let dp = util::start_distribution(
        &f.dir,
        "distribution-proxy",
        &fresh(f, "peer-dp"),
        dp_addr,
        &proxy_cfg,
    )?;
    let (layer, size) = f.huge_layer()?;
    let blob_path = f.blob_path(&f.huge, &layer);
    let www = f.dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::hard_link(&blob_path, www.join("layer"))
        .or_else(|_| std::fs::copy(&blob_path, www.join("layer")).map(|_| ()))?;
    let ng_addr = util::addr();
    let ng = util::start_nginx(
        &f.dir,
        "nginx-sendfile",
        &format!("  sendfile on;\n  tcp_nopush on;\n  server {{\n    listen {ng_addr};\n    root {};\n  }}", www.display()),
        &[ng_addr],
    )?;
    let rm_url = format!("http://{rm_addr}/v2/{}/blobs/{layer}", f.huge.name);
    let dp_url = format!("http://{dp_addr}/v2/{}/blobs/{layer}", f.huge.name);
    let ng_url = format!("http://{ng_addr}/layer");
    // Fill both caches (and the page cache) before any warm run.
    for u in [&rm_url, &dp_url, &ng_url] {
        let (n, t) = curl_blob(u)?;
        log.push(format!("fill {u}: {n} B in {t:.2}s"));
        if n != size {
            bail!("{u}: {n} bytes, expected {size}");
        }
    }
    // The fills left dirty pages: written back now, not during the first timed runs.
    util::sync_disks()?;
    for (peer_url, peer, peer_pid, goal) in [
        (&dp_url, "distribution proxy", dp.pid(), 1.5),
        (&ng_url, "nginx sendfile (same file)", ng.pid(), 0.95),
    ] {
        // The servers' own CPU over all of these runs: a figure the machine's other work
        // hardly moves, unlike the wall clock.
        let cpu_before = (util::proc_cpu_us(rm.pid())?, util::proc_cpu_us(peer_pid)?);
        let (mut rm_sent, mut peer_sent) = (0u64, 0u64);
        let runs = util::interleaved_fastest(
            pairs,
            warmup,
            |side, _| match side {
                Side::Mirror => {
                    rm_sent += size;
                    util::blob_mbps(&rm_url, size)
                }
                Side::Peer => {
                    peer_sent += size;
                    util::blob_mbps(peer_url, size)
                }
            },
            |rate| 1.0 / rate,
        )?;
        let per_gb = |before: u64, after: u64, sent: u64| {
            after.saturating_sub(before) as f64 / 1e6 / (sent as f64 / 1e9)
        };
        let rm_cpu = per_gb(cpu_before.0, util::proc_cpu_us(rm.pid())?, rm_sent);
        let peer_cpu = per_gb(cpu_before.1, util::proc_cpu_us(peer_pid)?, peer_sent);
        let short = peer.split(' ').next().unwrap_or(peer);
        let mut cpu_row = Row::info(
            S4,
            &format!("same warm runs: server CPU-seconds per GB sent (utime + stime over all runs), regmirror vs {peer}"),
            format!("{rm_cpu:.3} CPU-s/GB"),
            format!("{peer_cpu:.3} CPU-s/GB {short}"),
        );
        cpu_row.figure = Figure::One(rm_cpu / peer_cpu);
        cpu_row.target =
            "info (lower is better; one figure per side over all runs, in 10 ms clock ticks)"
                .into();
        log_pairs(
            log,
            &format!("warm 256 MiB blob MB/s, regmirror vs {peer}"),
            &runs,
        );
        rows.push(Row::paired(
            S4,
            &format!(
                "warm 256 MiB blob throughput (one GET, fastest of {}): regmirror vs {peer}",
                util::BEST_OF
            ),
            &runs,
            |x| *x,
            ("MB/s", &format!("MB/s {short}")),
            Some(Goal::AtLeast(goal)),
        ));
        rows.push(cpu_row);
    }

    // Manifests: make both caches hold bench/three, then short wrk runs by digest and by
    // tag, regmirror and distribution alternately.
    util::skopeo_copy(
        &format!("{rm_addr}/{}:{}", f.three.name, f.three.tag),
        None,
        true,
    )?;
    util::skopeo_copy(
        &format!("{dp_addr}/{}:{}", f.three.name, f.three.tag),
        None,
        true,
    )?;
    let accept = format!("Accept: {MT_MANIFEST}");
    const WRK_S: u32 = 2;
    for (kind, reference, goal) in [
        ("digest", f.three.digest.as_str(), None),
        ("tag", f.three.tag.as_str(), Some(Goal::AtLeast(10.0))),
    ] {
        let rps = |a: SocketAddr, side: &str| -> Result<f64> {
            let r = util::wrk(
                &format!("http://{a}/v2/{}/manifests/{reference}", f.three.name),
                16,
                WRK_S,
                &[&accept],
            )?;
            if r.non2xx > 0 {
                bail!(
                    "manifest by {kind} on {side}: {} non-2xx responses",
                    r.non2xx
                );
            }
            Ok(r.rps)
        };
        let runs = util::interleaved(pairs, warmup, |side, _| match side {
            Side::Mirror => rps(rm_addr, "regmirror"),
            Side::Peer => rps(dp_addr, "distribution"),
        })?;
        log_pairs(
            log,
            &format!("wrk manifest by {kind} req/s, regmirror vs distribution"),
            &runs,
        );
        rows.push(Row::paired(
            S4,
            &format!("manifest by {kind}, req/s (wrk -t1 -c16 -d{WRK_S}s)"),
            &runs,
            |x| *x,
            ("req/s", "req/s distribution"),
            goal,
        ));
    }

    // Cold pull of the 3-layer image: a fresh process on fresh storage for every run.
    let cold = util::interleaved(pairs, warmup, |side, i| -> Result<f64> {
        let a = util::addr();
        let st = fresh(f, "cold");
        let p = match side {
            Side::Mirror => regmirror(
                f,
                bins,
                &format!("regmirror-cold-{i}"),
                a,
                &st,
                Origin::Metered,
            )?,
            Side::Peer => util::start_distribution(
                &f.dir,
                &format!("distribution-cold-{i}"),
                &st,
                a,
                &proxy_cfg,
            )?,
        };
        let t = util::timed(|| {
            util::skopeo_copy(&format!("{a}/{}:{}", f.three.name, f.three.tag), None, true)
        });
        drop(p);
        // Only disk space is at stake: the directory is under the bench's temp dir.
        let _ = std::fs::remove_dir_all(&st);
        t
    })?;
    log_pairs(
        log,
        "cold pull bench/three s, regmirror vs distribution proxy",
        &cold,
    );
    rows.push(Row::paired(
        S4,
        &format!(
            "cold pull of a 3-layer {:.0} MB image (skopeo, plain HTTP), time",
            f.image_bytes(&f.three) as f64 / 1e6
        ),
        &cold,
        |x| *x,
        ("s", "s distribution"),
        Some(Goal::AtMost(1.0)),
    ));

    // RSS while streaming 8 concurrent 256 MiB blobs: warm (fresh process over the warm
    // storage) and cold (fresh storage, coalesced).
    drop(rm);
    drop(dp);
    let mut rss_rows = Vec::new();
    for (label, warm) in [("warm", true), ("cold, coalesced", false)] {
        let a = util::addr();
        let st = if warm {
            rm_storage.clone()
        } else {
            fresh(f, "rss-rm")
        };
        let p = regmirror(
            f,
            bins,
            &format!("regmirror-rss-{}", if warm { "warm" } else { "cold" }),
            a,
            &st,
            Origin::Metered,
        )?;
        let url = format!("http://{a}/v2/{}/blobs/{layer}", f.huge.name);
        let (max_rm, hwm_rm) = rss_during(p.pid(), || eight_blobs(&url, size))?;
        drop(p);
        let a = util::addr();
        let dst = if warm {
            fresh(f, "rss-dp-warm")
        } else {
            fresh(f, "rss-dp")
        };
        let p = util::start_distribution(
            &f.dir,
            &format!("distribution-rss-{}", if warm { "warm" } else { "cold" }),
            &dst,
            a,
            &proxy_cfg,
        )?;
        let url = format!("http://{a}/v2/{}/blobs/{layer}", f.huge.name);
        if warm {
            curl_blob(&url)?;
        }
        let (max_dp, hwm_dp) = rss_during(p.pid(), || eight_blobs(&url, size))?;
        drop(p);
        log.push(format!("RSS 8×256 MiB {label}: regmirror max VmRSS {max_rm} KiB VmHWM {hwm_rm} KiB; distribution max VmRSS {max_dp} KiB VmHWM {hwm_dp} KiB"));
        let hwm = util::mib(hwm_rm);
        rss_rows.push(Row {
            section: S4,
            metric: format!(
                "regmirror memory streaming 8 concurrent 256 MiB blobs ({label}), VmHWM"
            ),
            ours: format!("{hwm:.1} MiB (max sampled VmRSS {:.1})", util::mib(max_rm)),
            peer: format!(
                "{:.1} MiB distribution (max VmRSS {:.1})",
                util::mib(hwm_dp),
                util::mib(max_dp)
            ),
            figure: Figure::One(hwm_rm as f64 / hwm_dp as f64),
            unit: "×",
            target: "≤ 64 MiB".into(),
            verdict: Some(Goal::AtMost(64.0).verdict_one(hwm)),
        });
    }
    rows.extend(rss_rows);
    Ok(rows)
}
