//! Instruction counts per call of the filter's hot functions on a host build, measured with
//! `valgrind --tool=callgrind` on `mirror-bench hot FUNC N`: the difference between N=N2 and
//! N=N1 runs divided by N2-N1 removes start-up and configuration parsing.

use anyhow::{anyhow, bail, Context, Result};
use registry_rules::challenge::rewrite_realms;
use registry_rules::redirect::{rewrite_location, LocationOutcome, SignParams};
use registry_rules::route::{route, Decision, Request};
use std::hint::black_box;
use std::path::Path;
use std::process::Command;

const KEY: [u8; 32] = [7u8; 32];
const NOW: u64 = 1_800_000_000;
const MIRROR_BASE: &str = "https://127.0.0.1:5000";
const LOCATION: &str = "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/ab/abababababababababababababababababababababababababababababababab/data?verify=1763900000-2XbRj%2Bq9dW0Z7k&expires=1763901200";

fn config() -> Result<registry_rules::CompiledConfig> {
    let bytes = std::fs::read(mirror_tests::build::workspace_root().join("envoy/filter.json"))?;
    registry_rules::parse(&bytes).map_err(|e| anyhow!("filter.json: {e:?}"))
}

/// `mirror-bench hot route|realms|location|none N`.
pub fn hot(args: &[String]) -> Result<()> {
    let func = args.first().map(String::as_str).unwrap_or("none");
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let cfg = config()?;
    let reg = cfg
        .registry("docker.io")
        .ok_or_else(|| anyhow!("no docker.io in filter.json"))?;
    let mut sink = 0usize;
    for i in 0..n {
        match func {
            "route" => {
                let path = if i % 2 == 0 {
                    "/v2/library/alpine/manifests/3.20"
                } else {
                    "/v2/alpine/blobs/sha256:abababababababababababababababababababababababababababababababab"
                };
                let req = Request {
                    method: "GET",
                    authority: "127.0.0.1:5000",
                    path: black_box(path),
                    scheme: "https",
                    forwarded_proto: Some("https"),
                    authorization: Some("Bearer eyJhbGciOiJFUzI1NiJ9.e30.sig"),
                };
                if let Decision::Forward(f) = route(&cfg, black_box(&req), &KEY, NOW) {
                    sink += f.path.len();
                }
            }
            "realms" => {
                let r = rewrite_realms(
                    black_box(crate::filter_overhead::CHALLENGE),
                    &reg.realm_hosts,
                    MIRROR_BASE,
                );
                sink += r.value.len();
            }
            "location" => {
                let p = SignParams {
                    registry: "docker.io",
                    base_host: "registry-1.docker.io",
                    base_path: "/v2/library/alpine/blobs/sha256:abababababababababababababababababababababababababababababababab",
                    mirror_base: MIRROR_BASE,
                    cred: "0123456789abcdef0123456789abcdef",
                    key: &KEY,
                    now: NOW,
                };
                if let LocationOutcome::Signed(u) = rewrite_location(&cfg, &p, black_box(LOCATION))
                {
                    sink += u.len();
                }
            }
            "none" => {}
            other => bail!("unknown hot function {other}"),
        }
    }
    println!("{}", black_box(sink));
    Ok(())
}

/// Total instructions of one callgrind run (`Collected : N` / `refs: N` on stderr).
fn callgrind_ir(exe: &Path, out: &Path, func: &str, n: u64) -> Result<u64> {
    let o = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(exe)
        .args(["hot", func, &n.to_string()])
        .output()
        .context("run valgrind")?;
    if !o.status.success() {
        bail!("valgrind failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let err = String::from_utf8_lossy(&o.stderr);
    err.lines()
        .find_map(|l| {
            let v = l
                .split_once("Collected :")
                .map(|x| x.1)
                .or_else(|| l.split_once("refs:").map(|x| x.1))?;
            v.trim().replace(',', "").parse::<u64>().ok()
        })
        .ok_or_else(|| anyhow!("no instruction total in valgrind output:\n{err}"))
}

/// Top self-cost functions of a callgrind output file.
fn annotate_top(out: &Path, lines: usize) -> String {
    Command::new("callgrind_annotate")
        .arg(out)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .skip_while(|l| !l.contains("file:function"))
                .skip(1)
                .filter(|l| !l.trim().is_empty())
                .take(lines)
                .map(|l| l.chars().take(160).collect::<String>())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| format!("callgrind_annotate: {e}"))
}

pub fn run(dir: &Path, log: &mut crate::util::Log) -> Result<String> {
    if mirror_tests::which("valgrind").is_none() {
        bail!("valgrind is not on PATH (apt-get install valgrind)");
    }
    let exe = std::env::current_exe()?;
    let (n1, n2) = (1_000u64, 11_000u64);
    let mut s = String::from(
        "Instructions per call on a host (x86_64, release) build of `registry_rules`, from `valgrind --tool=callgrind` on `mirror-bench hot FUNC N` ((Ir(N=11000) − Ir(N=1000)) / 10000). The wasm build runs the same code under V8's JIT, plus the proxy-wasm host calls that copy headers in and out of the VM.\n\n| function | input | instructions / call |\n| --- | --- | --- |\n",
    );
    let mut tops = String::new();
    for (func, input) in [
        (
            "route",
            "GET /v2/library/alpine/manifests/3.20 and /v2/alpine/blobs/sha256:… alternately",
        ),
        (
            "realms",
            "Docker Hub Bearer challenge (realm, service, scope)",
        ),
        (
            "location",
            "307 to production.cloudflare.docker.com with a signed query (HMAC-SHA256)",
        ),
    ] {
        let f1 = dir.join(format!("callgrind.{func}.1"));
        let f2 = dir.join(format!("callgrind.{func}.2"));
        let a = callgrind_ir(&exe, &f1, func, n1)?;
        let b = callgrind_ir(&exe, &f2, func, n2)?;
        let per = (b.saturating_sub(a)) as f64 / (n2 - n1) as f64;
        log.push(format!(
            "callgrind {func}: Ir(N={n1}) = {a}, Ir(N={n2}) = {b}"
        ));
        s.push_str(&format!("| `{func}` | {input} | {per:.0} |\n"));
        tops.push_str(&format!(
            "\nTop self-cost functions, `hot {func} {n2}` (callgrind_annotate):\n\n```\n{}\n```\n",
            annotate_top(&f2, 12)
        ));
    }
    s.push_str(&tops);
    Ok(s)
}
