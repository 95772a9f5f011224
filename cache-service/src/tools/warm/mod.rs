//! `regmirror warm`: pre-pull images through the mirror so its cache fills: manifest (index →
//! selected platforms), then every blob streamed to a sink while hashing, a few at a time.

pub mod client;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};

use crate::oci::{self, Platform};
use crate::upstream::read_body;
use client::{error_chain, MirrorClient};
use registry_rules::digest::Digest;
use registry_rules::names::{Reference, RepositoryName, Tag};

#[derive(Debug, clap::Args)]
pub struct WarmArgs {
    /// Base URL of the mirror (its Envoy listener), e.g. https://mirror.example.com.
    #[arg(long, env = "REGMIRROR_MIRROR")]
    pub mirror: String,
    /// Extra CA certificate(s) (PEM) to trust for the mirror.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Platform(s) to pull from multi-platform images: os/arch[/variant] (repeatable).
    #[arg(long, default_value = "linux/amd64", conflicts_with = "all_platforms")]
    pub platform: Vec<String>,
    /// Pull every platform of a multi-platform image (attestations excluded).
    #[arg(long)]
    pub all_platforms: bool,
    /// Read more references from a file: one a line, `#` starts a comment.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Blobs downloaded at the same time.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub jobs: u32,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
    /// Images: `[registry/]repo[:tag|@digest]` (no registry = docker.io), or
    /// `REGISTRY=repo[:tag|@digest]` to name the registry (`?ns=`) verbatim.
    pub images: Vec<String>,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repo: String,
    pub reference: Reference,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = match self.reference {
            Reference::Digest(_) => '@',
            Reference::Tag(_) => ':',
        };
        write!(f, "{}/{}{sep}{}", self.registry, self.repo, self.reference)
    }
}

fn is_docker_hub(r: &str) -> bool {
    matches!(r, "docker.io" | "index.docker.io" | "registry-1.docker.io")
}

impl ImageRef {
    /// `alpine`, `library/alpine:3.20`, `quay.io/coreos/etcd:v3.5`, `gcr.io/x/y@sha256:…`,
    /// `localhost:5000/x`, or `REGISTRY=repo:tag` (registry taken verbatim).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (registry, rest, explicit) = match s.split_once('=') {
            Some((r, rest)) if !r.is_empty() => (r.to_owned(), rest, true),
            Some(_) => return Err(format!("{s:?}: empty registry")),
            None => match s.split_once('/') {
                Some((first, rest))
                    if first.contains('.') || first.contains(':') || first == "localhost" =>
                {
                    (first.to_ascii_lowercase(), rest, false)
                }
                _ => ("docker.io".to_owned(), s, false),
            },
        };
        let (name, reference) = if let Some((n, d)) = rest.split_once('@') {
            // A tag before the digest (`repo:tag@sha256:…`) is dropped, as Docker does.
            let n = match n.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => n,
                _ => n,
            };
            let digest = Digest::parse(d).map_err(|e| format!("{s:?}: {e}"))?;
            (n, Reference::Digest(digest))
        } else {
            let (n, t) = match rest.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n, t),
                _ => (rest, "latest"),
            };
            let tag = Tag::parse(t).map_err(|e| format!("{s:?}: tag: {e}"))?;
            (n, Reference::Tag(tag))
        };
        let registry = if !explicit && is_docker_hub(&registry) {
            "docker.io".to_owned()
        } else {
            registry
        };
        let repo = if registry == "docker.io" && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_owned()
        };
        RepositoryName::parse(&repo).map_err(|e| format!("{s:?}: repository {repo:?}: {e}"))?;
        Ok(Self {
            registry,
            repo,
            reference,
        })
    }
}

/// Which platforms to take from an index.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Some(Vec<Platform>),
}

/// A content descriptor from a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    pub size: Option<u64>,
}

fn descriptor(v: &serde_json::Value) -> Result<Descriptor, String> {
    let d = v
        .get("digest")
        .and_then(|d| d.as_str())
        .ok_or("descriptor without digest")?;
    let digest = oci::parse_digest(d).map_err(|e| format!("descriptor digest {d:?}: {e}"))?;
    Ok(Descriptor {
        digest,
        size: v.get("size").and_then(|s| s.as_u64()),
    })
}

/// Index entries to follow for `sel`: (platform label, manifest descriptor).
pub fn select_manifests(
    index: &serde_json::Value,
    sel: &Selection,
) -> Result<Vec<(String, Descriptor)>, String> {
    let entries = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .ok_or("index without manifests")?;
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut available = Vec::new();
    for e in entries {
        let Some(p) = Platform::of_descriptor(e) else {
            continue;
        };
        // BuildKit attestation manifests: platform unknown/unknown.
        if p.os == "unknown" {
            continue;
        }
        available.push(p.to_string());
        let take = match sel {
            Selection::All => true,
            Selection::Some(want) => want.iter().any(|w| w.matches(&p)),
        };
        if take {
            let d = descriptor(e)?;
            if seen.insert(d.digest.clone()) {
                out.push((p.to_string(), d));
            }
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no manifest for the requested platform(s); the index has: {}",
            if available.is_empty() {
                "none".to_owned()
            } else {
                available.join(", ")
            }
        ));
    }
    Ok(out)
}

/// Config and layers of an image manifest.
pub fn image_blobs(manifest: &serde_json::Value) -> Result<Vec<Descriptor>, String> {
    let mut out = Vec::new();
    if let Some(c) = manifest.get("config") {
        out.push(descriptor(c)?);
    }
    for l in manifest
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or("image manifest without layers")?
    {
        // Foreign layers (Windows base images) live elsewhere; skip those with URLs.
        if l.get("urls").is_some() {
            continue;
        }
        out.push(descriptor(l)?);
    }
    Ok(out)
}

fn is_index(media_type: &str, v: &serde_json::Value) -> bool {
    oci::is_index(media_type) || (v.get("manifests").is_some() && v.get("layers").is_none())
}

/// One image's result for the summary table.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub image: String,
    pub platforms: Vec<String>,
    pub layers: usize,
    pub bytes: u64,
    pub time: Duration,
    pub error: Option<String>,
}

struct Ctx {
    client: MirrorClient,
    sel: Selection,
    jobs: usize,
    bars: MultiProgress,
    quiet: bool,
}

fn scope(img: &ImageRef) -> String {
    format!("repository:{}:pull", img.repo)
}

async fn get_manifest(
    ctx: &Ctx,
    img: &ImageRef,
    reference: &str,
) -> Result<(String, Digest, serde_json::Value), String> {
    let url = ctx
        .client
        .v2_url(&img.registry, &img.repo, &format!("manifests/{reference}"))
        .map_err(|e| e.to_string())?;
    let resp = ctx
        .client
        .send(Method::GET, url, Some(oci::MANIFEST_ACCEPT), &scope(img))
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    if status != StatusCode::OK {
        let body = client::error_body(resp).await;
        return Err(format!(
            "manifest {reference}: HTTP {}{}",
            status.as_u16(),
            super::oci_error_suffix(&body)
        ));
    }
    let ct = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = read_body(resp, oci::MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| format!("manifest {reference}: {e}"))?;
    let digest = Digest::of_bytes(&body);
    if reference.starts_with("sha256:") && digest.as_str() != reference {
        return Err(format!(
            "manifest {reference}: content hashes to {digest} (digest mismatch)"
        ));
    }
    let mt = oci::manifest_media_type(ct.as_deref(), &body)
        .map_err(|e| format!("manifest {reference}: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("manifest {reference}: {e}"))?;
    Ok((mt, digest, v))
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// GET a blob, stream it to a sink while hashing; verify digest and size.
async fn pull_blob(ctx: &Ctx, img: &ImageRef, d: &Descriptor) -> Result<u64, String> {
    let short = d.digest.hex().get(..12).unwrap_or("").to_owned();
    let url = ctx
        .client
        .v2_url(&img.registry, &img.repo, &format!("blobs/{}", d.digest))
        .map_err(|e| e.to_string())?;
    let resp = ctx
        .client
        .send(Method::GET, url, None, &scope(img))
        .await
        .map_err(|e| format!("blob {short}: {e}"))?;
    if resp.status() != StatusCode::OK {
        let s = resp.status().as_u16();
        let body = client::error_body(resp).await;
        return Err(format!(
            "blob {short}: HTTP {s}{}",
            super::oci_error_suffix(&body)
        ));
    }
    let total = d.size.or(resp.content_length());
    let bar = ctx.bars.add(match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::no_length(),
    });
    bar.set_style(bar_style());
    bar.set_prefix(short.clone());
    let mut hasher = Sha256::new();
    let mut n: u64 = 0;
    let mut sink = tokio::io::sink();
    let mut stream = resp.bytes_stream();
    let result = loop {
        match stream.try_next().await {
            Ok(Some(chunk)) => {
                hasher.update(&chunk);
                n += chunk.len() as u64;
                // Past the manifest's size (or Content-Length): it can only fail; stop now.
                if let Some(t) = total.filter(|t| n > *t) {
                    break Err(format!("blob {short}: more than the {t} bytes expected"));
                }
                if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut sink, &chunk).await {
                    break Err(format!("blob {short}: {e}"));
                }
                bar.inc(chunk.len() as u64);
            }
            Ok(None) => break Ok(()),
            Err(e) => {
                break Err(format!(
                    "blob {short}: after {n} bytes: {}",
                    error_chain(&e)
                ))
            }
        }
    };
    bar.finish_and_clear();
    ctx.bars.remove(&bar);
    result?;
    let got = Digest::from_sha256(hasher);
    if got != d.digest {
        return Err(format!(
            "blob {short}: content hashes to {got} (digest mismatch)"
        ));
    }
    if let Some(size) = d.size {
        if size != n {
            return Err(format!("blob {short}: {n} bytes, manifest says {size}"));
        }
    }
    Ok(n)
}

async fn warm_image(ctx: &Ctx, img: &ImageRef, out: &mut Outcome) -> Result<(), String> {
    let (mt, _digest, top) = get_manifest(ctx, img, &img.reference.to_string()).await?;
    let manifests: Vec<(String, serde_json::Value)> = if is_index(&mt, &top) {
        let mut v = Vec::new();
        for (label, d) in select_manifests(&top, &ctx.sel)? {
            let (_, _, m) = get_manifest(ctx, img, d.digest.as_str()).await?;
            v.push((label, m));
        }
        v
    } else {
        let label = match &ctx.sel {
            Selection::All => "(single)".to_owned(),
            Selection::Some(_) => "(single-platform image)".to_owned(),
        };
        vec![(label, top)]
    };
    let mut blobs: Vec<Descriptor> = Vec::new();
    for (label, m) in &manifests {
        out.platforms.push(label.clone());
        for b in image_blobs(m)? {
            if !blobs.iter().any(|x| x.digest == b.digest) {
                blobs.push(b);
            }
        }
    }
    out.layers = blobs.len();
    let results: Vec<Result<u64, String>> = futures::stream::iter(blobs.iter())
        .map(|d| pull_blob(ctx, img, d))
        .buffer_unordered(ctx.jobs)
        .collect()
        .await;
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(n) => out.bytes += n,
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.join("")),
        k => Err(format!(
            "{k} blobs failed; first: {}",
            errors.first().cloned().unwrap_or_default()
        )),
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    let unit = UNITS.get(u).copied().unwrap_or("B");
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// A plain text table: columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut s = line(header.to_vec());
    s.push_str(&line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    for r in rows {
        s.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    s
}

pub fn summary(outcomes: &[Outcome]) -> String {
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            vec![
                o.image.clone(),
                if o.platforms.is_empty() {
                    "-".to_owned()
                } else {
                    o.platforms.join(",")
                },
                o.layers.to_string(),
                human_bytes(o.bytes),
                format!("{:.1}s", o.time.as_secs_f64()),
                match &o.error {
                    None => "OK".to_owned(),
                    Some(e) => format!("FAILED: {e}"),
                },
            ]
        })
        .collect();
    table(
        &["IMAGE", "PLATFORMS", "BLOBS", "BYTES", "TIME", "RESULT"],
        &rows,
    )
}

/// A progress line: above the bars on a terminal, plain on stderr otherwise (not with -q).
fn say(ctx: &Ctx, line: String) {
    if ctx.bars.is_hidden() {
        if !ctx.quiet {
            eprintln!("{line}");
        }
    } else {
        let _ = ctx.bars.println(line);
    }
}

fn read_images(args: &WarmArgs) -> Result<Vec<ImageRef>, String> {
    let mut raw: Vec<String> = args.images.clone();
    if let Some(f) = &args.file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for line in text.lines() {
            let l = line.split('#').next().unwrap_or("").trim();
            if !l.is_empty() {
                raw.push(l.to_owned());
            }
        }
    }
    if raw.is_empty() {
        return Err("no images given (IMAGE... or --file)".into());
    }
    raw.iter().map(|s| ImageRef::parse(s)).collect()
}

pub fn run(args: &WarmArgs) -> ExitCode {
    let images = match read_images(args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("regmirror warm: {e}");
            return ExitCode::from(2);
        }
    };
    let sel = if args.all_platforms {
        Selection::All
    } else {
        match args
            .platform
            .iter()
            .map(|p| Platform::parse(p))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(p) => Selection::Some(p),
            Err(e) => {
                eprintln!("regmirror warm: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let client = match MirrorClient::from_flags(&args.mirror, args.ca.as_deref(), false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regmirror warm: {e}");
            return ExitCode::from(2);
        }
    };
    let bars = MultiProgress::new();
    if args.quiet {
        bars.set_draw_target(ProgressDrawTarget::hidden());
    }
    let ctx = Arc::new(Ctx {
        client,
        sel,
        jobs: args.jobs as usize,
        bars,
        quiet: args.quiet,
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regmirror warm: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes = rt.block_on(async {
        let mut outcomes = Vec::new();
        for img in &images {
            let start = Instant::now();
            let mut o = Outcome {
                image: img.to_string(),
                platforms: vec![],
                layers: 0,
                bytes: 0,
                time: Duration::ZERO,
                error: None,
            };
            say(&ctx, format!("warming {img}"));
            if let Err(e) = warm_image(&ctx, img, &mut o).await {
                o.error = Some(e);
            }
            o.time = start.elapsed();
            say(
                &ctx,
                format!(
                    "  {} {} in {:.1}s",
                    if o.error.is_some() { "FAILED" } else { "done" },
                    human_bytes(o.bytes),
                    o.time.as_secs_f64()
                ),
            );
            outcomes.push(o);
        }
        outcomes
    });
    let _ = ctx.bars.clear();
    print!("{}", summary(&outcomes));
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    if failed > 0 {
        eprintln!(
            "regmirror warm: {failed} of {} images failed",
            outcomes.len()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(s: &str) -> (String, String, String) {
        let i = ImageRef::parse(s).unwrap();
        (i.registry, i.repo, i.reference.to_string())
    }

    #[test]
    fn references() {
        let t = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
        assert_eq!(r("alpine"), t("docker.io", "library/alpine", "latest"));
        assert_eq!(
            r("docker.io/library/alpine:3.20"),
            t("docker.io", "library/alpine", "3.20")
        );
        assert_eq!(
            r("docker.io/alpine"),
            t("docker.io", "library/alpine", "latest")
        );
        assert_eq!(
            r("index.docker.io/nginx:1"),
            t("docker.io", "library/nginx", "1")
        );
        assert_eq!(r("bitnami/redis:7"), t("docker.io", "bitnami/redis", "7"));
        assert_eq!(
            r("quay.io/coreos/etcd:v3.5"),
            t("quay.io", "coreos/etcd", "v3.5")
        );
        assert_eq!(
            r("gcr.io/distroless/static:nonroot"),
            t("gcr.io", "distroless/static", "nonroot")
        );
        assert_eq!(
            r("localhost:5000/a/b"),
            t("localhost:5000", "a/b", "latest")
        );
        assert_eq!(r("test=a/b:1"), t("test", "a/b", "1"));
        assert_eq!(r("test=alpine"), t("test", "alpine", "latest"));
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(r(&format!("ghcr.io/x/y:tag@{d}")), t("ghcr.io", "x/y", &d));
        // Any digest the registry model knows, said as a digest (not as an invalid tag).
        let d512 = format!("sha512:{}", "b".repeat(128));
        assert_eq!(
            r(&format!("quay.io/x/y@{d512}")),
            t("quay.io", "x/y", &d512)
        );
        assert_eq!(
            ImageRef::parse(&format!("quay.io/x/y@{d}"))
                .unwrap()
                .to_string(),
            format!("quay.io/x/y@{d}")
        );
        assert!(ImageRef::parse("quay.io/X/y").is_err());
        assert!(ImageRef::parse("alpine@sha256:abc").is_err());
        assert!(ImageRef::parse("=a").is_err());
    }

    #[test]
    fn platforms() {
        let idx = json!({"manifests": [
            {"digest": format!("sha256:{}", "1".repeat(64)), "size": 1,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": format!("sha256:{}", "2".repeat(64)), "size": 1,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"digest": format!("sha256:{}", "3".repeat(64)), "size": 1,
             "platform": {"os": "unknown", "architecture": "unknown"}},
        ]});
        let one =
            |p: &str| select_manifests(&idx, &Selection::Some(vec![Platform::parse(p).unwrap()]));
        assert_eq!(one("linux/amd64").unwrap().len(), 1);
        assert_eq!(one("linux/arm64").unwrap()[0].0, "linux/arm64/v8");
        assert_eq!(one("linux/arm64/v8").unwrap().len(), 1);
        let e = one("linux/s390x").unwrap_err();
        assert!(e.contains("linux/amd64, linux/arm64/v8"), "{e}");
        assert_eq!(select_manifests(&idx, &Selection::All).unwrap().len(), 2);
        assert!(Platform::parse("linux").is_err());
    }

    #[test]
    fn blobs_of_manifest() {
        let m = json!({"schemaVersion": 2,
        "config": {"digest": format!("sha256:{}", "c".repeat(64)), "size": 10},
        "layers": [
            {"digest": format!("sha256:{}", "d".repeat(64)), "size": 20},
            {"digest": format!("sha256:{}", "e".repeat(64)), "size": 5, "urls": ["https://x"]}
        ]});
        let b = image_blobs(&m).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].size, Some(20));
    }

    #[test]
    fn summary_table() {
        let s = summary(&[
            Outcome {
                image: "docker.io/library/alpine:3.20".into(),
                platforms: vec!["linux/amd64".into()],
                layers: 2,
                bytes: 3 * 1024 * 1024,
                time: Duration::from_millis(1500),
                error: None,
            },
            Outcome {
                image: "quay.io/x/y:1".into(),
                platforms: vec![],
                layers: 0,
                bytes: 0,
                time: Duration::ZERO,
                error: Some("manifest 1: HTTP 404".into()),
            },
        ]);
        assert!(s.contains("3.0 MiB"), "{s}");
        assert!(s.contains("FAILED: manifest 1: HTTP 404"), "{s}");
        assert!(s.lines().nth(1).unwrap().starts_with("-----"));
        assert_eq!(human_bytes(10), "10 B");
    }
}
