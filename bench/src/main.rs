//! `just bench`: the mirror's data path measured side by side against its peers, all on
//! 127.0.0.1. Prints a markdown table and writes it to bench/RESULTS.md.
//!
//! `mirror-bench [SECTION…]` runs a subset (filter, pull, peers, s3, front, profile); no argument runs
//! everything. `MIRROR_BENCH_PAIRS=N` sets the pairs per interleaved comparison (default 9);
//! a subset or fewer pairs writes `target/bench-RESULTS.md` instead. `mirror-bench hot FUNC
//! N` is the callgrind target (see `profile`).

mod filter_overhead;
mod front;
mod profile;
mod pull;
mod s3;
mod util;

use anyhow::{Context, Result};
use std::time::Instant;
use util::{Figure, Row, Verdict};

fn machine() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let envoy = std::process::Command::new("envoy")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    format!("- date: {date}\n- nproc: {nproc}\n- CPU: {cpu}\n- memory: {mem}\n- envoy: {envoy}\n- /proc/loadavg at the end: {} (other work on this machine skews every row)\n", load.trim())
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| section | metric | mirror | peer | median | range (min–max) | pairs | target | verdict |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        // Ratios with two decimals, differences (µs) signed and whole, rates (MB/s) whole.
        let fig = |x: f64| match r.unit {
            "×" => format!("{x:.2}"),
            " µs" => format!("{x:+.0}"),
            _ => format!("{x:.0}"),
        };
        let (median, range, pairs) = match r.figure {
            Figure::None => ("—".into(), "—".into(), "—".into()),
            Figure::One(x) => (format!("{}{}", fig(x), r.unit), "—".into(), "—".into()),
            Figure::Pairs(p) => (
                format!("{}{}", fig(p.median), r.unit),
                format!("{}–{}{}", fig(p.min), fig(p.max), r.unit),
                p.n.to_string(),
            ),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {median} | {range} | {pairs} | {} | {} |\n",
            r.section,
            r.metric,
            r.ours,
            r.peer,
            r.target,
            r.verdict.map_or("—", Verdict::label),
        ));
    }
    s
}

/// The rows whose range straddles their target: what this run cannot decide.
fn noise_bound(rows: &[Row]) -> String {
    let noisy: Vec<String> = rows
        .iter()
        .filter(|r| r.verdict == Some(Verdict::Noise))
        .map(|r| format!("- {}: {}\n", r.section, r.metric))
        .collect();
    if noisy.is_empty() {
        "Noise-bound rows (range straddles the target): none.\n".into()
    } else {
        format!(
            "Noise-bound rows (range straddles the target; this machine cannot decide them):\n\n{}",
            noisy.concat()
        )
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("hot") {
        return profile::hot(args.get(1..).unwrap_or_default());
    }
    let pairs = util::pairs()?;
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix("mirror-bench-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let mut rows = Vec::new();
    let mut log = util::Log::default();
    let mut profile_text = String::new();

    let bins = prepare(&args);
    if want("filter") {
        let t = Instant::now();
        match bins
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|b| filter_overhead::run(&dir, &b.wasm, &b.floor_wasm, pairs, &mut log))
        {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::not_measured(
                "1. filter overhead",
                "all",
                &format!("{e:#}"),
            )),
        }
        eprintln!("[bench] filter overhead: {:.0}s", t.elapsed().as_secs_f64());
    }
    if want("pull") || want("peers") {
        let t = Instant::now();
        match bins.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")) {
            Ok(b) => rows.extend(pull::run(
                &dir,
                b,
                want("pull"),
                want("peers"),
                pairs,
                &mut log,
            )),
            Err(e) => rows.push(Row::not_measured("2-4. pulls", "all", &format!("{e:#}"))),
        }
        eprintln!("[bench] pulls and peers: {:.0}s", t.elapsed().as_secs_f64());
    }
    if want("s3") {
        let t = Instant::now();
        match bins.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")) {
            Ok(b) => rows.extend(s3::run(&dir, b, pairs, &mut log)),
            Err(e) => rows.push(Row::not_measured(
                "5. object storage (S3)",
                "all",
                &format!("{e:#}"),
            )),
        }
        eprintln!("[bench] object storage: {:.0}s", t.elapsed().as_secs_f64());
    }
    if want("front") {
        let t = Instant::now();
        match bins.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")) {
            Ok(b) => rows.extend(front::run(&dir, b, pairs, &mut log)),
            Err(e) => rows.push(Row::not_measured(
                "6. Envoy TLS front",
                "all",
                &format!("{e:#}"),
            )),
        }
        eprintln!("[bench] Envoy TLS front: {:.0}s", t.elapsed().as_secs_f64());
    }
    if want("profile") {
        match profile::run(&dir, &mut log) {
            Ok(p) => profile_text = p,
            Err(e) => profile_text = format!("profile not measured: {e:#}\n"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let t = table(&rows);
    let noise = noise_bound(&rows);
    println!("{t}\n{noise}");
    println!("total wall time: {elapsed:.0} s");
    let smoke = if pairs < util::DEFAULT_PAIRS {
        format!(
            "- {pairs} pairs per comparison (MIRROR_BENCH_PAIRS): a smoke run, not for quoting\n"
        )
    } else {
        String::new()
    };
    let out = format!(
        "# Benchmark results\n\nGenerated by `just bench` (`cargo run --release -p mirror-bench`); do not edit by hand.\n\n## Machine\n\n{}- bench wall time: {elapsed:.0} s\n{smoke}\n## Results\n\nEvery wall-clock comparison runs mirror and peer alternately (A B A B …, {pairs} pairs after {warmup} uncounted warm-up pair): `median` is the median of the per-pair ratios mirror / peer (or differences, in µs), `range` their min–max. Verdict: PASS when the whole range clears the target, MISS when the whole range misses it, noise when the range straddles it. Rows without a range are deterministic (callgrind, bytes) or informational. `mirror` and `peer` are each side's median. Where a metric says *fastest of {best}*, a pair is {best} rounds of mirror then peer (A B A B A B) of a job that needs no fresh state (a warm blob, a warm or filter-route pull), and each side's figure is its fastest run: other work on this machine only ever slows a run, and a side that is truly slower is slower in all of its runs. Section 6 runs its four variants in rotation (Envoy with 1, 2, 4 workers, the cache alone, then again, after one uncounted round): its `median` and `range` are of the rates themselves (MB/s), not ratios. Everything runs on 127.0.0.1 on this one machine: client, proxies and upstreams share the CPUs.\n\n{t}\n{noise}\n## Profile\n\n{profile_text}\n## Log\n\n```\n{}\n```\n",
        machine(),
        log.0.join("\n"),
        warmup = util::WARMUP_PAIRS,
        best = util::BEST_OF,
    );
    // bench/RESULTS.md is what the README quotes: only a full run replaces it.
    let path = if args.is_empty() && pairs >= util::DEFAULT_PAIRS {
        mirror_tests::build::workspace_root().join("bench/RESULTS.md")
    } else {
        target_dir().join("bench-RESULTS.md")
    };
    std::fs::write(&path, out).with_context(|| format!("write {}", path.display()))?;
    eprintln!("[bench] wrote {}", path.display());
    Ok(())
}

/// The built artefacts.
pub struct Bins {
    pub wasm: std::path::PathBuf,
    /// `bench/floor-filter`, the filter-overhead baseline.
    pub floor_wasm: std::path::PathBuf,
    pub regmirror: std::path::PathBuf,
}

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| mirror_tests::build::workspace_root().join("target"))
}

fn prepare(_args: &[String]) -> Result<Bins> {
    // `just bench` depends on `just build`, which builds both; the harness' variables
    // override the paths.
    let target = target_dir();
    let pick =
        |var: &str, default: std::path::PathBuf, build: &str| -> Result<std::path::PathBuf> {
            let p = std::env::var_os(var)
                .map(std::path::PathBuf::from)
                .unwrap_or(default);
            if !p.is_file() {
                anyhow::bail!("{} is missing: run `just build` ({build})", p.display());
            }
            Ok(p)
        };
    Ok(Bins {
        wasm: pick(
            "MIRROR_WASM",
            target.join("wasm32-wasip1/wasm/mirror_filter.wasm"),
            "cargo build -p mirror-filter --target wasm32-wasip1 --profile wasm; python3 filter/trim-exports.py FILE",
        )?,
        floor_wasm: pick(
            "MIRROR_BENCH_FLOOR_WASM",
            target.join("wasm32-wasip1/wasm/mirror_bench_floor.wasm"),
            "cargo build -p mirror-bench-floor --target wasm32-wasip1 --profile wasm; python3 filter/trim-exports.py FILE",
        )?,
        regmirror: pick(
            "REGMIRROR_BIN",
            target.join("release/regmirror"),
            "cargo build --release -p cache-service",
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use util::{Goal, Paired};

    #[test]
    fn table_shows_median_range_pairs_and_verdict_and_names_noise_rows() {
        let p = Paired {
            mirror: vec![1.0, 1.3, 1.05],
            peer: vec![1.0, 1.0, 1.0],
        };
        let rows = vec![
            Row::paired(
                "2. pull",
                "noisy row",
                &p,
                |x| *x,
                ("s", "s"),
                Some(Goal::AtMost(1.1)),
            ),
            Row::ratio(
                "3. bytes",
                "bytes row",
                (1.0, "MB"),
                (1.0, "MB"),
                Goal::AtMost(1.0),
            ),
        ];
        let t = table(&rows);
        assert!(
            t.contains("| noisy row | 1.05 s | 1.00 s | 1.05× | 1.00–1.30× | 3 | ≤ 1.1× | noise |"),
            "{t}"
        );
        assert!(
            t.contains("| bytes row | 1.00 MB | 1.00 MB | 1.00× | — | — | ≤ 1× | PASS |"),
            "{t}"
        );
        let n = noise_bound(&rows);
        assert!(
            n.contains("- 2. pull: noisy row") && !n.contains("bytes row"),
            "{n}"
        );
        assert!(noise_bound(&rows[1..]).contains("none"));
        let mut diff = Row::info("1. filter", "added p99", "a".into(), "b".into());
        diff.figure = Figure::Pairs(util::Spread::of(&[-12.0, 40.4, 95.0]));
        diff.unit = " µs";
        assert!(table(&[diff]).contains("| +40 µs | -12–+95 µs | 3 |"));
    }
}
