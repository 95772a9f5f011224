//! The cache-service (`regmirror`) reconfigured while it runs: its config file edited, then
//! SIGHUP (or nothing: the file is watched). A real distribution upstream with real token
//! auth behind the harness' fault proxies (one per configured upstream, so each upstream's
//! requests are counted apart); each test runs its own regmirror on its own storage.
//! How long each change took to apply is printed (run with `--nocapture` to see it).

use mirror_tests::faults::{self, client, Fault, FaultProxy, FaultUpstream, Got, Regmirror};
use mirror_tests::images::SeededImage;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the cache reports the configuration in force.
const VERSION_HEADER: &str = "x-regmirror-config-version";

struct Session {
    cache: Regmirror,
    /// The upstream given by flag (`faulty`), present in every configuration.
    proxy: FaultProxy,
    /// The upstream the config file adds (`second`).
    second: FaultProxy,
    up: &'static FaultUpstream,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

/// The config file: settings, and the `second` upstream when `with_second`. The token realm
/// is the harness' token server: declared as the declaration's realm_hosts would be.
fn config_text(second: Option<&FaultProxy>) -> String {
    let mut t = String::from("tag_ttl_seconds = 300\nshutdown_grace_seconds = 5\n");
    if let Some(p) = second {
        t.push_str(&format!(
            "[[upstream]]\nname = \"second\"\nurl = \"{}\"\nrealm_hosts = [\"{}\"]\n",
            p.url(),
            realm_host()
        ));
    }
    t
}

fn realm_host() -> String {
    format!(
        "127.0.0.1:{}",
        mirror_tests::upstreams::shared().token.addr.port()
    )
}

/// Replaces the file the way an operator's tooling should (and as an editor may not):
/// whole, by rename.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

fn session(name: &str, with_second: bool) -> Session {
    let up = faults::shared();
    let dir = mirror_tests::temp_dir(name).expect("temp dir");
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).expect("storage dir");
    let proxy = FaultProxy::start(up.registry.addr).expect("fault proxy");
    let second = FaultProxy::start(up.registry.addr).expect("second fault proxy");
    let config = dir.path().join("cache.toml");
    write_atomically(&config, &config_text(with_second.then_some(&second)));
    let realm = format!("faulty={}", realm_host());
    let config_arg = config.display().to_string();
    let cache = Regmirror::start(
        &storage,
        &dir.path().join("regmirror.log"),
        &proxy.url(),
        &["--realm-host", &realm, "--config", &config_arg],
    )
    .expect("regmirror starts");
    Session {
        cache,
        proxy,
        second,
        up,
        config,
        _dir: dir,
    }
}

impl Session {
    fn logs(&self) -> String {
        let seen = |p: &FaultProxy| {
            p.seen()
                .iter()
                .map(|s| format!("{} {} -> {}", s.method, s.path, s.status))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "--- faulty (proxy) ---\n{}\n--- second (proxy) ---\n{}\n--- regmirror ---\n{}",
            seen(&self.proxy),
            seen(&self.second),
            mirror_tests::proc::log_tail(&self.cache.log, 60),
        )
    }

    /// The version `/readyz` reports, checking it is ready.
    fn version(&self) -> String {
        let r = client()
            .get(self.cache.url("/readyz"))
            .send()
            .expect("GET /readyz");
        assert_eq!(r.status(), 200, "readyz\n{}", self.logs());
        let v = r
            .headers()
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("/readyz without {VERSION_HEADER}\n{}", self.logs()));
        let body = r.text().expect("readyz body");
        assert!(body.contains(&v), "the body names the version too: {body}");
        v
    }

    /// Waits (up to 10 s) until `/readyz` reports a version other than `old`; how long it took.
    fn wait_for_new_version(&self, old: &str) -> (String, Duration) {
        let start = Instant::now();
        loop {
            let v = self.version();
            if v != old {
                return (v, start.elapsed());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the configuration change was not applied within 10 s (still {old})\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 10 s) for `text` in the log; how long it took.
    fn wait_for_log(&self, text: &str) -> Duration {
        let start = Instant::now();
        while !self.cache.log_text().contains(text) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no {text:?} in the log within 10 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }

    /// A value of the Prometheus page.
    fn metric(&self, name: &str) -> u64 {
        let page = client()
            .get(self.cache.url("/metrics"))
            .send()
            .and_then(|r| r.text())
            .expect("GET /metrics");
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    /// SIGHUP to this session's regmirror (found by its unique config path).
    fn sighup(&self) {
        let needle = self.config.display().to_string();
        let pid = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        let args: Vec<String> = c
                            .split(|b| *b == 0)
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect();
                        args.first().is_some_and(|a| a.ends_with("regmirror"))
                            && args.contains(&needle)
                    })
                    .unwrap_or(false)
            })
            .expect("the session's regmirror process");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("send SIGHUP");
    }

    /// Pulls `image` through the upstream `registry` by hand: tag → manifest (by the
    /// digest the upstream gave), then its first layer, each checked against its digest.
    fn pull_named(&self, registry: &str, image: &SeededImage) {
        let c = client();
        let m = get(
            &c,
            &self
                .cache
                .url(&format!("/v2/{}/manifests/{}", image.name, image.tag)),
            registry,
        );
        assert_eq!(
            m.status,
            200,
            "manifest via {registry}: {:?}\n{}",
            String::from_utf8_lossy(&m.body),
            self.logs()
        );
        assert_eq!(
            mirror_tests::digest_of(&m.body),
            image.digest,
            "manifest via {registry}"
        );
        let layer = image.first_layer();
        let b = get(
            &c,
            &self.cache.url(&format!("/v2/{}/blobs/{layer}", image.name)),
            registry,
        );
        assert_eq!(b.status, 200, "blob via {registry}\n{}", self.logs());
        assert_eq!(
            mirror_tests::digest_of(&b.body),
            layer,
            "blob via {registry}"
        );
    }
}

/// A GET naming its upstream as the mirror's filter does (`x-mirror-registry`).
fn get(client: &reqwest::blocking::Client, url: &str, registry: &str) -> Got {
    faults::get(client, url, &[("x-mirror-registry", registry)])
}

#[test]
fn an_upstream_added_by_sighup_while_eight_clients_share_a_cold_download() {
    let s = session("reload-hup", false);
    let v1 = s.version();
    assert!(v1.starts_with("1-"), "first version: {v1}");
    let image = &s.up.images.crowd;
    let layer = image.first_layer();
    let url = s.cache.url(&format!("/v2/{}/blobs/{layer}", image.name));
    // ~3 MiB at 512 KiB/s: the download runs ~6 s, long enough to reload in its middle.
    s.proxy.set_fault(&layer, Fault::Throttle(512 * 1024));
    let barrier = std::sync::Barrier::new(8);
    let c = client();
    let results: Vec<Got> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| {
                    barrier.wait();
                    get(&c, &url, "faulty")
                })
            })
            .collect();

        // All 8 on one download before the reload.
        let start = Instant::now();
        while s.metric("regmirror_coalesced_waiters_total") < 7 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the 8 requests were not coalesced\n{}",
                s.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        write_atomically(&s.config, &config_text(Some(&s.second)));
        s.sighup();
        let (v2, took) = s.wait_for_new_version(&v1);
        println!(
            "cache config change (upstream added) applied {took:?} after SIGHUP ({v1} -> {v2})"
        );
        assert!(v2.starts_with("2-"), "second version: {v2}");
        assert_eq!(
            s.metric("regmirror_inflight_downloads"),
            1,
            "the reload happened while the download ran\n{}",
            s.logs()
        );

        // The new upstream serves while the old download still runs.
        s.pull_named("second", &s.up.images.small);
        assert!(
            s.second
                .seen()
                .iter()
                .any(|r| r.path.contains("/manifests/") && r.status == 200),
            "the manifest came through the added upstream\n{}",
            s.logs()
        );
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let size = std::fs::metadata(
        image
            .layout
            .join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:")),
    )
    .expect("layout blob")
    .len();
    for (i, g) in results.iter().enumerate() {
        assert!(
            g.status == 200 && g.error.is_none() && g.body.len() as u64 == size,
            "request {i}: status {} len {} of {size}, error {:?}\n{}",
            g.status,
            g.body.len(),
            g.error,
            s.logs()
        );
        assert_eq!(mirror_tests::digest_of(&g.body), layer, "request {i}");
    }
    assert_eq!(
        s.proxy.count_ok("GET", &format!("/blobs/{layer}")),
        1,
        "one upstream download for the 8 clients, reload or not\n{}",
        s.logs()
    );
    assert!(s.cache.log_text().contains("configuration reloaded"));
}

#[test]
fn a_broken_config_file_is_logged_and_the_running_config_kept() {
    let mut s = session("reload-broken", true);
    let v1 = s.version();
    s.pull_named("second", &s.up.images.small);

    // Broken by an edit, no signal: the watcher notices, logs, keeps what runs.
    write_atomically(&s.config, "[[upstream]]\nname = \"second\"\nurl = ");
    let took = s.wait_for_log("configuration reload refused");
    println!("broken cache config noticed and refused in {took:?} (file watch)");
    assert_eq!(s.version(), v1, "the running configuration stays in force");
    let status = client()
        .get(s.cache.url("/_status"))
        .send()
        .and_then(|r| r.text())
        .expect("GET /_status");
    assert!(
        status.contains(&format!("config {v1}")) && status.contains("reload refused"),
        "the status page shows the version in force and the refusal\n{status}"
    );
    // SIGHUP with the file still broken: refused again, still serving both upstreams.
    s.sighup();
    std::thread::sleep(Duration::from_millis(500));
    s.cache.check_running().expect("still running");
    assert_eq!(s.version(), v1);
    assert_eq!(s.metric("regmirror_config_reload_failures_total"), 2);
    // What an alert reads, for as long as the file stays broken.
    assert_eq!(s.metric("regmirror_config_reload_refused"), 1);
    s.pull_named("second", &s.up.images.small);
    s.pull_named("faulty", &s.up.images.cut);

    // Fixed by an edit that also removes `second`: applied by the watcher alone.
    write_atomically(&s.config, &config_text(None));
    let (v2, took) = s.wait_for_new_version(&v1);
    println!(
        "cache config change (upstream removed) applied in {took:?} (file watch; {v1} -> {v2})"
    );
    let gone = get(
        &client(),
        &s.cache.url(&format!(
            "/v2/{}/manifests/{}",
            s.up.images.small.name, s.up.images.small.tag
        )),
        "second",
    );
    assert_eq!(
        gone.status,
        404,
        "a removed upstream is unknown\n{}",
        s.logs()
    );
    assert!(String::from_utf8_lossy(&gone.body).contains("NAME_UNKNOWN"));
    s.pull_named("faulty", &s.up.images.flip);
    let status = client()
        .get(s.cache.url("/_status"))
        .send()
        .and_then(|r| r.text())
        .expect("GET /_status");
    assert!(
        status.contains(&format!("config {v2}")) && !status.contains("reload refused"),
        "{status}"
    );
    assert_eq!(s.metric("regmirror_config_reload_refused"), 0);
}
