//! Real clients: skopeo (containers/image, the podman/CRI-O path) and containerd + ctr.

use crate::images::{SeededImage, MT_INDEX};
use crate::proc::{run, Proc};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// Options of one `skopeo copy docker://… dir:…`.
#[derive(Clone, Debug, Default)]
pub struct SkopeoPull {
    /// `--all`: every platform of an index.
    pub all: bool,
    /// `--src-cert-dir` (a directory holding only `ca.crt`).
    pub cert_dir: Option<PathBuf>,
    /// Global `--registries-conf FILE`.
    pub registries_conf: Option<PathBuf>,
}

/// What skopeo wrote with `dir:OUT`, every blob verified against its digest.
pub struct PulledDir {
    pub dir: tempfile::TempDir,
    /// Digest of `manifest.json` (the top-level manifest or index).
    pub digest: String,
    pub manifest: serde_json::Value,
    /// Digests of the blob files (configs and layers).
    pub blobs: BTreeSet<String>,
    /// Digests of the per-platform manifests (`--all` on an index).
    pub child_manifests: BTreeSet<String>,
}

impl PulledDir {
    /// Asserts this is exactly `image` as seeded: same top-level digest, every platform's
    /// manifest (with `--all`) and every blob present and verified.
    pub fn assert_is(&self, image: &SeededImage, all_platforms: bool) {
        assert_eq!(
            self.digest, image.digest,
            "manifest digest of {}:{}",
            image.name, image.tag
        );
        if image.is_index() && all_platforms {
            let want: BTreeSet<String> = image
                .platforms
                .iter()
                .map(|p| p.manifest_digest.clone())
                .collect();
            assert_eq!(self.child_manifests, want, "platform manifests");
            let blobs: BTreeSet<String> = image.all_blobs().into_iter().collect();
            assert_eq!(self.blobs, blobs, "blobs of every platform");
        } else if !image.is_index() {
            let blobs: BTreeSet<String> = image.all_blobs().into_iter().collect();
            assert_eq!(self.blobs, blobs, "blobs");
        }
    }
}

/// `skopeo copy [--all] --src-cert-dir D --src-no-creds docker://<reference> dir:OUT`,
/// then [`verify_dir`].
pub fn skopeo_pull(reference: &str, opts: &SkopeoPull) -> Result<PulledDir> {
    let skopeo = crate::require_tool("skopeo", "apt-get install skopeo");
    let out = crate::temp_dir("skopeo")?;
    let mut cmd = Command::new(skopeo);
    cmd.arg("--insecure-policy");
    if let Some(conf) = &opts.registries_conf {
        cmd.arg("--registries-conf").arg(conf);
    }
    cmd.arg("copy")
        .args(["--src-no-creds", "--retry-times", "0"]);
    if opts.all {
        cmd.arg("--all");
    }
    if let Some(d) = &opts.cert_dir {
        cmd.arg("--src-cert-dir").arg(d);
    }
    cmd.arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", out.path().display()));
    run(&mut cmd).with_context(|| format!("skopeo pull {reference}"))?;
    verify_dir(out)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Checks a skopeo `dir:` copy: every blob file hashes to its name, every per-platform
/// manifest file to its digest, and every blob a manifest names is there.
pub fn verify_dir(dir: tempfile::TempDir) -> Result<PulledDir> {
    let manifest_bytes = std::fs::read(dir.path().join("manifest.json"))?;
    let digest = crate::digest_of(&manifest_bytes);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes)?;
    let mut blobs = BTreeSet::new();
    let mut child_manifests = BTreeSet::new();
    let mut manifests_to_check = vec![manifest.clone()];
    for entry in std::fs::read_dir(dir.path())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let bytes = || std::fs::read(entry.path());
        if is_hex64(&name) {
            let got = crate::digest_of(&bytes()?);
            if got != format!("sha256:{name}") {
                bail!("blob {name} hashes to {got}");
            }
            blobs.insert(got);
        } else if let Some(hex) = name.strip_suffix(".manifest.json") {
            let b = bytes()?;
            let got = crate::digest_of(&b);
            if got != format!("sha256:{hex}") {
                bail!("manifest {name} hashes to {got}");
            }
            child_manifests.insert(got);
            manifests_to_check.push(serde_json::from_slice(&b)?);
        }
    }
    for m in &manifests_to_check {
        let mut wanted = Vec::new();
        if let Some(c) = m["config"]["digest"].as_str() {
            wanted.push(c.to_string());
        }
        for l in m["layers"].as_array().into_iter().flatten() {
            if let Some(d) = l["digest"].as_str() {
                wanted.push(d.to_string());
            }
        }
        for w in wanted {
            if !blobs.contains(&w) {
                bail!("blob {w} named by a manifest is missing from the copy");
            }
        }
    }
    // An index (skopeo --all) comes with every manifest it names; without --all skopeo
    // keeps one platform, and manifest.json is that platform's manifest.
    if manifest["mediaType"] == MT_INDEX {
        for m in manifest["manifests"].as_array().into_iter().flatten() {
            let d = m["digest"].as_str().unwrap_or_default();
            if !child_manifests.contains(d) {
                bail!("manifest {d:?} named by the index is missing from the copy");
            }
        }
    }
    Ok(PulledDir {
        dir,
        digest,
        manifest,
        blobs,
        child_manifests,
    })
}

/// Runs `regmirror client-config RUNTIME --mirror https://<mirror> [ARGS]`, the generator
/// users run, over the shipped `envoy/registries.toml`.
fn client_config(runtime: &str, mirror: &str, args: &[&str]) -> Result<String> {
    let shipped = crate::build::workspace_root().join("envoy/registries.toml");
    client_config_of(&shipped, runtime, mirror, args)
}

/// [`client_config`] for the declaration at `registries`.
fn client_config_of(
    registries: &Path,
    runtime: &str,
    mirror: &str,
    args: &[&str],
) -> Result<String> {
    let out = crate::proc::run(
        std::process::Command::new(crate::build::regmirror()?)
            .args([
                "client-config",
                runtime,
                "--mirror",
                &format!("https://{mirror}"),
            ])
            .arg("--registries")
            .arg(registries)
            .args(args),
    )?;
    Ok(String::from_utf8(out.stdout)?)
}

/// Points every fallback to a real registry at a closed local port, so a failing mirror
/// can never make a client reach the internet. The only change the tests make to the
/// generated client configuration.
fn close_fallbacks(config: &str, key: &str, keep: impl Fn(&str) -> bool) -> String {
    let dead = format!("127.0.0.1:{}", crate::free_port());
    config
        .lines()
        .map(|line| match line.strip_prefix(key) {
            Some(value) if !keep(value) => format!("{key}\"{dead}\""),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The registries.conf `regmirror client-config podman` generates for `mirror`
/// (host:port): a path-prefix mirror location per registry, the podman / CRI-O way.
pub fn write_registries_conf(path: &Path, registry: &str, mirror: &str) -> Result<()> {
    let generated = client_config("podman", mirror, &[])?;
    anyhow::ensure!(
        generated.contains(&format!("prefix = \"{registry}\"")),
        "the generated registries.conf has no entry for {registry}:\n{generated}"
    );
    // Primary locations are bare registry names; mirror locations start with the mirror.
    let closed = close_fallbacks(&generated, "location = ", |v| v.contains(mirror));
    std::fs::write(path, closed)?;
    Ok(())
}

/// The `hosts.toml` files `regmirror client-config containerd --ca CA` generates for
/// `mirror` (host:port), in `hosts_dir/<registry>/hosts.toml`.
pub fn write_hosts_toml(hosts_dir: &Path, registry: &str, mirror: &str, ca: &Path) -> Result<()> {
    let shipped = crate::build::workspace_root().join("envoy/registries.toml");
    write_hosts_toml_of(&shipped, hosts_dir, registry, mirror, ca)
}

/// [`write_hosts_toml`] for the declaration at `registries`.
pub fn write_hosts_toml_of(
    registries: &Path,
    hosts_dir: &Path,
    registry: &str,
    mirror: &str,
    ca: &Path,
) -> Result<()> {
    let ca = ca.display().to_string();
    client_config_of(
        registries,
        "containerd",
        mirror,
        &["--ca", &ca, "--out", &hosts_dir.display().to_string()],
    )?;
    let file = hosts_dir.join(registry).join("hosts.toml");
    let generated = std::fs::read_to_string(&file)
        .map_err(|e| anyhow::anyhow!("no generated {}: {e}", file.display()))?;
    // `server` is containerd's fallback to the real registry.
    let closed = close_fallbacks(&generated, "server = ", |_| false)
        .replace("server = \"127.0.0.1", "server = \"https://127.0.0.1");
    std::fs::write(&file, closed)?;
    Ok(())
}

/// A private containerd (own root, state and socket), shared by a test binary.
pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub proc: Proc,
    _tmp: tempfile::TempDir,
}

/// The process-wide containerd.
pub fn containerd() -> &'static Containerd {
    static C: OnceLock<Result<Containerd, String>> = OnceLock::new();
    match C.get_or_init(|| Containerd::start().map_err(|e| format!("{e:#}"))) {
        Ok(c) => c,
        Err(e) => panic!("containerd failed to start: {e}"),
    }
}

impl Containerd {
    pub fn start() -> Result<Containerd> {
        let bin = crate::require_tool("containerd", "apt-get install containerd");
        crate::require_tool("ctr", "apt-get install containerd");
        // Under /tmp whatever TMPDIR says: the socket path must stay short.
        let tmp = crate::fixture_dir_in(std::path::Path::new("/tmp"), "ctrd")?;
        let dir = tmp.path().to_path_buf();
        let sock = dir.join("c.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\n[grpc]\n  address = \"{s}\"\n\n[ttrpc]\n  address = \"{d}/t.sock\"\n\n[debug]\n  address = \"\"\n\n[metrics]\n  address = \"\"\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
                d = dir.display(),
                s = sock.display()
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config);
        let mut proc = Proc::spawn("containerd", &cmd, &dir.join("containerd.log"))?;
        let start = std::time::Instant::now();
        loop {
            proc.check_running()?;
            if sock.exists() {
                let ok = Command::new("ctr")
                    .arg("--address")
                    .arg(&sock)
                    .arg("version")
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if ok {
                    break;
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "containerd did not answer within 30s:\n{}",
                    proc.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Containerd {
            dir,
            sock,
            proc,
            _tmp: tmp,
        })
    }

    /// `ctr --address SOCK -n <namespace> …`.
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.sock).args(["-n", namespace]);
        c
    }

    /// `ctr images pull --hosts-dir DIR [extra…] REF` in `namespace` (use one namespace
    /// per test so content is fetched again, not found in another test's namespace).
    pub fn pull(
        &self,
        namespace: &str,
        hosts_dir: &Path,
        reference: &str,
        extra: &[&str],
    ) -> Result<String> {
        let out = run(self
            .ctr(namespace)
            .args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(hosts_dir)
            .args(extra)
            .arg(reference))
        .with_context(|| {
            format!(
                "ctr images pull {reference}\ncontainerd log:\n{}",
                self.proc.log_tail(30)
            )
        })?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// The target digest of `reference` in `ctr images ls`.
    pub fn image_digest(&self, namespace: &str, reference: &str) -> Result<String> {
        let out = run(self.ctr(namespace).args(["images", "ls"]))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .skip(1)
            .find(|l| l.split_whitespace().next() == Some(reference))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{reference} not in `ctr images ls`:\n{text}"))
    }

    /// Digests in the content store of `namespace`.
    pub fn content(&self, namespace: &str) -> Result<BTreeSet<String>> {
        let out = run(self.ctr(namespace).args(["content", "ls", "-q"]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| l.starts_with("sha256:"))
            .collect())
    }

    /// `ctr content get DIGEST` hashed: the stored bytes match their digest.
    pub fn verify_content(&self, namespace: &str, digest: &str) -> Result<()> {
        let out = run(self.ctr(namespace).args(["content", "get", digest]))?;
        let got = crate::digest_of(&out.stdout);
        if got != digest {
            bail!("content {digest} hashes to {got}");
        }
        Ok(())
    }
}
