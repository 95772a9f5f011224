//! Day-2 operations a user follows from the README: warm images into the cache through the
//! mirror, see them on the status page (rendered by a real headless Chromium), and run
//! `doctor` against the running mirror.

use mirror_tests::cache::{self, CachedMirror};
use mirror_tests::clients::{self, SkopeoPull};
use mirror_tests::proc::run;
use mirror_tests::upstreams::Front;
use mirror_tests::{build, require_tool};
use std::process::{Command, Output};

fn regmirror(c: &CachedMirror, args: &[&str]) -> Output {
    let mut cmd = Command::new(build::regmirror().unwrap());
    cmd.current_dir(build::workspace_root());
    cmd.args(args)
        .arg("--mirror")
        .arg(format!("https://{}", c.mirror.addr()))
        .arg("--ca")
        .arg(&c.mirror.up.pki.ca);
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn warm_fills_the_cache_and_the_status_page_shows_it() {
    let c = cache::shared();
    let pause = &c.mirror.up.images.pause;
    let reference = format!("gcr.io/{}:{}", pause.name, pause.tag);
    let out = regmirror(c, &["warm", &reference]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.logs());
    assert!(text(&out).contains(&pause.name), "{}", text(&out));
    let fetched = c.upstream_blob_gets(pause);
    assert_eq!(fetched, pause.all_blobs().len(), "each blob fetched once");

    // Now a node pulls it: everything comes from the cache, the upstream sees nothing new.
    let pulled = clients::skopeo_pull(
        &format!("{}/{}:{}", c.mirror.host("gcr"), pause.name, pause.tag),
        &SkopeoPull {
            all: false,
            cert_dir: Some(c.mirror.up.pki.cert_dir.clone()),
            registries_conf: None,
        },
    )
    .unwrap();
    pulled.assert_is(pause, false);
    assert_eq!(c.upstream_blob_gets(pause), fetched, "{}", c.logs());

    // The status page (cache-service's own port, as an operator opens it).
    let url = format!("http://{}/_status", c.cache.addr);
    let page = reqwest::blocking::get(&url).unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().unwrap();
    assert!(
        html.contains(&pause.name),
        "top repositories lack {}",
        pause.name
    );
    assert!(html.contains("gcr.io"), "upstream health lacks gcr.io");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "external assets"
    );

    // A real browser renders it: the DOM holds the repository, the screenshot is a page.
    let chromium = require_tool("chromium", "apt-get install chromium");
    let profile = mirror_tests::temp_dir("chromium").unwrap();
    let browser = |extra: &[&str]| {
        run(Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1200,900",
            ])
            .arg(format!(
                "--user-data-dir={}",
                profile.path().join("p").display()
            ))
            .args(extra)
            .arg(&url))
        .unwrap()
    };
    let dom = String::from_utf8(browser(&["--dump-dom"]).stdout).unwrap();
    assert!(dom.contains(&pause.name), "{dom}");
    let shot = profile.path().join("status.png");
    browser(&[&format!("--screenshot={}", shot.display())]);
    let decoder = png::Decoder::new(std::fs::File::open(&shot).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (1200, 900));
    let distinct: std::collections::BTreeSet<&[u8]> = pixels[..frame.buffer_size()]
        .chunks(frame.color_type.samples())
        .collect();
    assert!(
        distinct.len() > 8,
        "the screenshot is blank ({} colours)",
        distinct.len()
    );
}

#[test]
fn warm_reports_failures_and_exits_non_zero() {
    let c = cache::shared();
    let out = regmirror(c, &["warm", "gcr.io/distroless/does-not-exist:1"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("FAILED"), "{}", text(&out));
}

#[test]
fn doctor_tells_which_registries_work_and_why_others_do_not() {
    let c = cache::shared();
    let up = c.mirror.up;
    let images = [&up.images.alpine, &up.images.etcd, &up.images.distroless];
    let probes: Vec<String> = images
        .iter()
        .map(|i| format!("--image={}={}:{}", i.registry, i.name, i.tag))
        .collect();
    let mut args = vec!["doctor"];
    args.extend(probes.iter().map(String::as_str));
    let out = regmirror(c, &args);
    let report = text(&out);
    let row = |registry: &str| {
        report
            .lines()
            .find(|l| l.split_whitespace().next() == Some(registry))
            .unwrap_or_else(|| panic!("no row for {registry}:\n{report}"))
            .to_string()
    };
    // The registries the test upstreams serve pass every check, through the rewritten realm.
    for registry in ["docker.io", "quay.io"] {
        let line = row(registry);
        assert!(!line.contains("FAIL"), "{line}\n{report}\n{}", c.logs());
        assert_eq!(line.matches("OK").count(), 3, "{line}");
    }
    // gcr.io goes to the cache-service, which needs no client token.
    let gcr = row("gcr.io");
    assert!(
        !gcr.contains("FAIL") && gcr.contains("no challenge"),
        "{gcr}"
    );
    assert_eq!(gcr.matches("OK").count(), 2, "{gcr}");
    // ghcr.io and registry.k8s.io have no upstream here: reported as failing, with a reason,
    // and the exit status says so.
    for registry in ["ghcr.io", "registry.k8s.io"] {
        let line = row(registry);
        assert!(line.contains("FAIL"), "{line}");
        assert!(
            line.split_whitespace().count() > 4,
            "no reason given: {line}"
        );
    }
    assert!(!out.status.success());
}

#[test]
fn warm_follows_docker_hub_redirects_without_leaking_the_token() {
    let c = cache::shared();
    let multi = &c.mirror.up.images.multi;
    let out = regmirror(
        c,
        &[
            "warm",
            "--all-platforms",
            &format!("docker.io/{}:{}", multi.name, multi.tag),
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), c.logs());
    // Every blob of both platforms came from the CDN, none of them with a credential.
    let cdn = c.mirror.up.access_log(Front::Cdn);
    for blob in multi.all_blobs() {
        let hex = blob.trim_start_matches("sha256:");
        let hits: Vec<_> = cdn.iter().filter(|e| e.path().contains(hex)).collect();
        assert!(!hits.is_empty(), "{blob} never fetched from the CDN");
        assert!(
            hits.iter()
                .all(|e| e.status() == 200 && !e.has_authorization()),
            "{hits:#?}"
        );
    }
}
