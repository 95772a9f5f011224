//! Changing the mirror while it runs (issue 14, the Envoy side): Envoy runs the file-based
//! xDS layout `regmirror render` writes (`envoy/xds/local`, substituted like every shipped
//! config), and an operator's edit of the declaration followed by `regmirror render`
//! reaches the running Envoy without a restart, without cutting a pull in flight.
//!
//! The 100 MB blob is read slowly by the client (1 MiB per 100 ms): the docker.io route's
//! upstream and CDN are TLS fixtures, so the stream is held open from the reading side;
//! what matters here is that it is in flight on the old listener while the new one loads.

use mirror_tests::build::{regmirror, workspace_root};
use mirror_tests::clients::{self, SkopeoPull};
use mirror_tests::envoy::{self, Envoy, Substitution};
use mirror_tests::upstreams::{self, Upstreams};
use sha2::Digest;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;
/// The functional bound of the issue: generous by design, not a performance target.
const APPLY_BOUND: Duration = Duration::from_secs(5);

/// The shipped declaration without its `[[registry]]` block named `name`.
fn without_registry(declaration: &str, name: &str) -> String {
    let mut blocks = declaration.split("[[registry]]");
    let mut out = blocks.next().unwrap_or_default().to_string();
    for block in blocks {
        if !block.contains(&format!("\nname = \"{name}\"\n")) {
            out.push_str("[[registry]]");
            out.push_str(block);
        }
    }
    out
}

/// `regmirror render` of `declaration` into `out`, as an operator runs it (from the
/// repository root, so it also validates with Envoy through the launcher).
fn render(declaration: &str, dir: &Path, out: &Path) -> (bool, String) {
    let file = dir.join("registries.toml");
    std::fs::write(&file, declaration).unwrap();
    let output = Command::new(regmirror().unwrap())
        .current_dir(workspace_root())
        .arg("render")
        .arg("--registries")
        .arg(&file)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

struct Live {
    up: &'static Upstreams,
    envoy: Envoy,
    s: Substitution,
    /// Envoy's watched directory.
    dir: PathBuf,
    /// Where `render` writes (the operator's `envoy/`).
    out: PathBuf,
    ports: Vec<u16>,
    work: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Live {
    fn start(declaration: &str) -> Live {
        mirror_tests::ensure_etc_hosts().unwrap();
        let up = upstreams::shared();
        let tmp = mirror_tests::fixture_dir("live").unwrap();
        let work = tmp.path().to_path_buf();
        let (dir, out) = (work.join("xds"), work.join("envoy"));
        std::fs::create_dir_all(&dir).unwrap();
        let (ok, log) = render(declaration, &work, &out);
        assert!(ok, "{log}");
        let s = Substitution::for_upstreams(up, true).unwrap();
        let (envoy, ports) = Envoy::start_xds(&out.join("xds/local"), &s, &dir).unwrap();
        Live {
            up,
            envoy,
            s,
            dir,
            out,
            ports,
            work,
            _tmp: tmp,
        }
    }

    /// Renders `declaration` and moves the result into Envoy's directory; the time from
    /// the edit until `ready` holds.
    fn change(&self, declaration: &str, what: &str, ready: impl Fn() -> bool) -> Duration {
        let t0 = Instant::now();
        let (ok, log) = render(declaration, &self.work, &self.out);
        assert!(ok, "{log}");
        Envoy::apply_xds(&self.out.join("xds/local"), &self.s, &self.dir, &self.ports).unwrap();
        while !ready() {
            assert!(
                t0.elapsed() < APPLY_BOUND,
                "{what}: not applied after {APPLY_BOUND:?}\n{}",
                self.envoy.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = t0.elapsed();
        eprintln!("live change applied: {what} in {took:?} (render + Envoy)");
        took
    }

    fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.envoy.port())
    }

    fn client(&self) -> reqwest::blocking::Client {
        self.up.pki.client(&[]).unwrap()
    }

    /// The status of a manifest request for `registry`'s `repo` (`?ns=`), no credentials.
    fn manifest_status(&self, registry: &str, repo: &str, tag: &str) -> u16 {
        self.client()
            .get(format!(
                "{}/v2/{repo}/manifests/{tag}?ns={registry}",
                self.base()
            ))
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    fn stat(&self, name: &str) -> String {
        let stats = self.envoy.admin(&format!("/stats?filter={name}")).unwrap();
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_default()
            .to_string()
    }

    fn skopeo(&self, reference: &str) -> anyhow::Result<clients::PulledDir> {
        clients::skopeo_pull(
            reference,
            &SkopeoPull {
                all: false,
                cert_dir: Some(self.up.pki.cert_dir.clone()),
                registries_conf: None,
            },
        )
    }
}

fn param<'a>(challenge: &'a str, key: &str) -> &'a str {
    challenge
        .split(&format!("{key}=\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
}

/// Streams `digest` of `repo` from the docker.io route, token flow and signed CDN redirect
/// through the mirror, reading slowly; counts bytes into `read`; returns the body digest.
fn slow_blob(
    base: &str,
    client: &reqwest::blocking::Client,
    repo: &str,
    digest: &str,
    read: &AtomicU64,
) -> anyhow::Result<String> {
    let url = format!("{base}/v2/{repo}/blobs/{digest}?ns=docker.io");
    let challenge = client.get(&url).send()?;
    anyhow::ensure!(challenge.status() == 401, "{}", challenge.status());
    let header = challenge.headers()["www-authenticate"]
        .to_str()?
        .to_string();
    let token: serde_json::Value = client
        .get(param(&header, "realm"))
        .query(&[
            ("service", param(&header, "service")),
            ("scope", &format!("repository:{repo}:pull")),
        ])
        .send()?
        .error_for_status()?
        .json()?;
    let token = token["token"].as_str().unwrap_or_default();
    let redirect = client.get(&url).bearer_auth(token).send()?;
    anyhow::ensure!(redirect.status() == 307, "{}", redirect.status());
    let location = redirect.headers()["location"].to_str()?.to_string();
    let mut body = client.get(&location).send()?.error_for_status()?;
    let mut hash = sha2::Sha256::new();
    let mut chunk = vec![0u8; MIB];
    loop {
        let n = body.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        hash.update(&chunk[..n]);
        read.fetch_add(n as u64, Ordering::SeqCst);
        // 100 ms per MiB: the 100 MB stream lasts about 10 s.
        std::thread::sleep(Duration::from_micros(100_000 * n as u64 / MIB as u64));
    }
    Ok(format!("sha256:{}", hex::encode(hash.finalize())))
}

#[test]
fn registries_come_and_go_while_a_blob_streams() {
    let shipped = std::fs::read_to_string(workspace_root().join("envoy/registries.toml")).unwrap();
    let without_quay = without_registry(&shipped, "quay.io");
    let live = Live::start(&without_quay);
    let up = live.up;

    // A 100 MB layer on the Docker Hub fixture (seeded through an auth-less instance on
    // its storage, as the fixtures seed).
    let layout = live.work.join("big");
    let big = mirror_tests::images::build_layout(
        &layout,
        "docker.io",
        "library/big",
        "1",
        1414,
        &["amd64"],
        &[100 * MIB],
    )
    .unwrap();
    {
        let seed =
            upstreams::start_distribution("hub-seed-big", &live.work, &up.hub.storage, None, None)
                .unwrap();
        upstreams::push(&big, seed.addr).unwrap();
    }
    let layer = big.platforms[0].layer_digests[0].clone();

    // quay.io is not declared yet: the filter refuses it.
    assert_eq!(live.manifest_status("quay.io", "coreos/etcd", "v3.5"), 404);

    let read = Arc::new(AtomicU64::new(0));
    let stream = {
        let (base, client, read, layer) = (live.base(), live.client(), read.clone(), layer.clone());
        std::thread::spawn(move || slow_blob(&base, &client, "library/big", &layer, &read))
    };
    let t0 = Instant::now();
    while read.load(Ordering::SeqCst) < 8 * MIB as u64 {
        assert!(!stream.is_finished(), "the stream ended early");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the stream does not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Add quay.io back: within the bound it routes, and a real client pulls from it.
    live.change(&shipped, "add quay.io", || {
        live.manifest_status("quay.io", "coreos/etcd", "v3.5") == 401
    });
    let pulled = live
        .skopeo(&format!(
            "127.0.0.1:{}/quay.io/coreos/etcd:v3.5",
            live.envoy.port()
        ))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", live.envoy.log_tail(60)));
    pulled.assert_is(&up.images.etcd, false);
    let in_flight = read.load(Ordering::SeqCst);
    assert!(
        in_flight < (100 * MIB) as u64,
        "the stream had finished before the change was applied: the test proves nothing"
    );

    // The pull that started on the old listener completes: its digest is the layer's.
    let streamed = stream.join().unwrap().unwrap();
    assert_eq!(streamed, layer);

    // Remove quay.io again: the filter's 404 within the bound; docker.io unaffected.
    live.change(&without_quay, "remove quay.io", || {
        live.manifest_status("quay.io", "coreos/etcd", "v3.5") == 404
    });
    let refused = live
        .client()
        .get(format!(
            "{}/v2/coreos/etcd/manifests/v3.5?ns=quay.io",
            live.base()
        ))
        .send()
        .unwrap();
    let body: serde_json::Value = refused.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN");
    let alpine = live
        .skopeo(&format!(
            "127.0.0.1:{}/docker.io/library/alpine:3.20",
            live.envoy.port()
        ))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", live.envoy.log_tail(60)));
    alpine.assert_is(&up.images.alpine, false);
}

#[test]
fn refused_changes_leave_the_running_config_serving() {
    let shipped = std::fs::read_to_string(workspace_root().join("envoy/registries.toml")).unwrap();
    let live = Live::start(&shipped);
    assert_eq!(live.manifest_status("quay.io", "coreos/etcd", "v3.5"), 401);
    let written: Vec<(PathBuf, Vec<u8>)> =
        ["xds/local/lds.yaml", "xds/local/cds.yaml", "local.yaml"]
            .iter()
            .map(|f| (live.out.join(f), std::fs::read(live.out.join(f)).unwrap()))
            .collect();
    let attempts = live.stat("listener_manager.lds.update_attempt");

    // A broken declaration (a registry without an upstream): refused before anything is
    // written, with the reason; Envoy sees nothing.
    let broken = shipped.replacen("upstream = \"quay.io\"\n", "", 1);
    let (ok, log) = render(&broken, &live.work, &live.out);
    assert!(!ok, "a broken declaration was rendered");
    assert!(
        log.contains("upstream") && log.contains("nothing written"),
        "{log}"
    );
    for (path, before) in &written {
        assert_eq!(&std::fs::read(path).unwrap(), before, "{}", path.display());
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(live.stat("listener_manager.lds.update_attempt"), attempts);
    assert_eq!(live.manifest_status("quay.io", "coreos/etcd", "v3.5"), 401);

    // An update Envoy rejects, written past `render` (a filter configuration the filter's
    // parser refuses, so the new listener cannot be built): the old listener keeps serving.
    let version = live.stat("listener_manager.lds.version_text");
    let rejected = live.stat("listener_manager.lds.update_rejected");
    let lds = std::fs::read_to_string(live.dir.join("lds.yaml")).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&lds).unwrap();
    let config =
        &mut doc["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"];
    let wasm = config
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "envoy.filters.http.wasm")
        .unwrap();
    wasm["typed_config"]["config"]["configuration"]["value"] =
        serde_yaml::Value::String("{\"registries\": \"not a list\"}".into());
    doc["version_info"] = serde_yaml::Value::String("bad".into());
    let t0 = Instant::now();
    envoy::write_atomically(
        &live.dir.join("lds.yaml"),
        &serde_yaml::to_string(&doc).unwrap(),
    )
    .unwrap();
    while live.stat("listener_manager.lds.update_rejected") == rejected {
        assert!(
            t0.elapsed() < APPLY_BOUND,
            "Envoy never saw the bad update\n{}",
            live.envoy.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("bad update rejected by Envoy after {:?}", t0.elapsed());
    assert_eq!(live.stat("listener_manager.lds.version_text"), version);
    assert_eq!(live.manifest_status("quay.io", "coreos/etcd", "v3.5"), 401);
    let pulled = live
        .skopeo(&format!(
            "127.0.0.1:{}/quay.io/coreos/etcd:v3.5",
            live.envoy.port()
        ))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", live.envoy.log_tail(60)));
    pulled.assert_is(&live.up.images.etcd, false);
}

/// `regmirror render --watch`: an edit of the declaration is rendered by itself; a broken
/// edit is refused with its reason and nothing is written; the next good edit applies.
#[test]
fn render_watch_follows_the_declaration_and_refuses_broken_edits() {
    let shipped = std::fs::read_to_string(workspace_root().join("envoy/registries.toml")).unwrap();
    let tmp = mirror_tests::temp_dir("watch").unwrap();
    let (decl, out) = (tmp.path().join("registries.toml"), tmp.path().join("envoy"));
    std::fs::write(&decl, without_registry(&shipped, "quay.io")).unwrap();
    let mut cmd = Command::new(regmirror().unwrap());
    cmd.current_dir(workspace_root())
        .args(["render", "--watch", "--registries"])
        .arg(&decl)
        .arg("--out")
        .arg(&out);
    let log = tmp.path().join("watch.log");
    let mut watch = mirror_tests::proc::Proc::spawn("render-watch", &cmd, &log).unwrap();
    let lds = out.join("xds/local/lds.yaml");
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !done() {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{what}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("render --watch: {what} after {:?}", t0.elapsed());
    };
    let has_quay = || {
        std::fs::read_to_string(&lds)
            .map(|t| t.contains("\"quay.io\""))
            .unwrap_or(false)
    };
    wait("first render", &|| lds.is_file());
    assert!(!has_quay());
    let before = std::fs::read(&lds).unwrap();

    std::fs::write(&decl, shipped.replacen("upstream = \"quay.io\"\n", "", 1)).unwrap();
    wait("broken edit refused", &|| {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("refused"))
    });
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("missing field `upstream`"), "{said}");
    assert!(said.contains("nothing written"), "{said}");
    assert_eq!(std::fs::read(&lds).unwrap(), before);

    std::fs::write(&decl, &shipped).unwrap();
    wait("good edit applied", &has_quay);
    watch.check_running().unwrap();
    watch.stop();
}
