//! The cache-service (`regmirror`) when things go wrong: a real distribution upstream with
//! real token auth behind a fault-injecting proxy (cut bodies, flipped bytes, slow or
//! stopped upstream), regmirror killed mid-download, a full disk, a crowd of cold
//! requests, moved tags, and bad client input. Each test runs its own regmirror on its own
//! storage and its own proxy; the upstream (harness `faults::shared`) is shared.

use mirror_tests::clients::{self, PulledDir};
use mirror_tests::faults::{
    self, client, get, Fault, FaultProxy, FaultUpstream, Got, Regmirror, Tmpfs,
};
use mirror_tests::images::SeededImage;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

/// One user's regmirror: own storage, own log, own proxy to the shared upstream.
struct Session {
    cache: Regmirror,
    _tmpfs: Option<Tmpfs>,
    proxy: FaultProxy,
    up: &'static FaultUpstream,
    _dir: tempfile::TempDir,
}

fn session(name: &str, extra: &[&str]) -> Session {
    session_with(name, extra, None)
}

fn session_with(name: &str, extra: &[&str], tmpfs_size: Option<&str>) -> Session {
    let up = faults::shared();
    let dir = mirror_tests::temp_dir(name).expect("temp dir");
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).expect("storage dir");
    let tmpfs = tmpfs_size.map(|s| Tmpfs::mount(&storage, s).expect("mount tmpfs"));
    let proxy = FaultProxy::start(up.registry.addr).expect("fault proxy");
    // The token realm is the harness' token server on its own port: declared, as the
    // declaration's realm_hosts would (the cache asks no undeclared realm).
    let realm = format!(
        "faulty=127.0.0.1:{}",
        mirror_tests::upstreams::shared().token.addr.port()
    );
    let mut args = vec!["--realm-host", realm.as_str()];
    args.extend_from_slice(extra);
    let cache = Regmirror::start(
        &storage,
        &dir.path().join("regmirror.log"),
        &proxy.url(),
        &args,
    )
    .expect("regmirror starts");
    Session {
        cache,
        _tmpfs: tmpfs,
        proxy,
        up,
        _dir: dir,
    }
}

impl Session {
    fn logs(&self) -> String {
        let seen: Vec<String> = self
            .proxy
            .seen()
            .iter()
            .map(|s| format!("{} {} -> {}", s.method, s.path, s.status))
            .collect();
        format!(
            "--- upstream requests (proxy) ---\n{}\n--- regmirror ---\n{}\n--- upstream registry ---\n{}",
            seen.join("\n"),
            mirror_tests::proc::log_tail(&self.cache.log, 60),
            self.up.log_tail(15)
        )
    }

    fn blob_url(&self, image: &SeededImage, digest: &str) -> String {
        self.cache
            .url(&format!("/v2/{}/blobs/{digest}", image.name))
    }

    /// `skopeo copy docker://127.0.0.1:<regmirror>/<name>:<tag> dir:…` (plain HTTP), every
    /// blob verified.
    fn skopeo_pull(&self, image: &SeededImage) -> anyhow::Result<PulledDir> {
        let out = mirror_tests::temp_dir("skopeo")?;
        let reference = format!("{}/{}:{}", self.cache.addr, image.name, image.tag);
        mirror_tests::proc::run(
            Command::new("skopeo")
                .args([
                    "--insecure-policy",
                    "copy",
                    "--src-no-creds",
                    "--src-tls-verify=false",
                    "--retry-times",
                    "0",
                ])
                .arg(format!("docker://{reference}"))
                .arg(format!("dir:{}", out.path().display())),
        )?;
        clients::verify_dir(out)
    }

    /// A client's GET of `image`'s first layer (digest, size, the client), throttled to
    /// 256 KiB/s (~8 s for its ~2 MiB), returned once part of it is in tmp/: a download in
    /// progress to interrupt.
    fn slow_download(&self, image: &SeededImage) -> (String, u64, std::thread::JoinHandle<Got>) {
        let layer = image.first_layer();
        let size = blob_bytes(image, &layer).len() as u64;
        self.proxy.set_fault(&layer, Fault::Throttle(256 * 1024));
        let url = self.blob_url(image, &layer);
        let client_thread = std::thread::spawn(move || get(&client(), &url, &[]));
        let start = Instant::now();
        while !self.cache.tmp_files().iter().any(|(_, len)| *len > 0) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no partial download appeared in tmp/\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (layer, size, client_thread)
    }

    fn upstream_blob_gets(&self, digest: &str) -> usize {
        self.proxy.count_ok("GET", &format!("/blobs/{digest}"))
    }

    /// Nothing of `digest` in the store and nothing left in tmp/ (waits up to 5 s for the
    /// cleanup of an aborted download).
    fn assert_not_cached(&self, digest: &str) {
        let start = Instant::now();
        while !self.cache.tmp_files().is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let path = self.cache.blob_path(digest);
        assert!(
            !path.exists(),
            "a failed download left {} in the store\n{}",
            path.display(),
            self.logs()
        );
        assert_eq!(
            self.cache.tmp_files(),
            Vec::<(PathBuf, u64)>::new(),
            "temp files left after a failed download\n{}",
            self.logs()
        );
    }

    /// The stored blob exists and hashes to its digest. A client has its last byte once the
    /// download verified; the store's fsync and rename follow, so this waits up to 10 s.
    fn assert_cached(&self, digest: &str) {
        let path = self.cache.blob_path(digest);
        let start = Instant::now();
        while !path.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{} not stored: {e}\n{}", path.display(), self.logs()));
        assert_eq!(
            mirror_tests::digest_of(&bytes),
            digest,
            "stored blob content"
        );
    }
}

/// The seeded bytes of a blob (from the image's OCI layout).
fn blob_bytes(image: &SeededImage, digest: &str) -> Vec<u8> {
    let hex = digest.trim_start_matches("sha256:");
    std::fs::read(image.layout.join("blobs/sha256").join(hex)).expect("layout blob")
}

#[test]
fn upstream_closing_mid_blob_fails_the_pull_caches_nothing_and_the_next_pull_succeeds() {
    let s = session("cut", &[]);
    let image = &s.up.images.cut;
    let layer = image.first_layer();
    let size = blob_bytes(image, &layer).len() as u64;
    s.proxy.set_fault(&layer, Fault::CutAfter(MIB));

    let pulled = s.skopeo_pull(image);
    assert!(
        pulled.is_err(),
        "skopeo pull succeeded although the upstream cut the layer after 1 MiB\n{}",
        s.logs()
    );
    // A direct client sees the truncation too: never a complete 200.
    let got = get(&client(), &s.blob_url(image, &layer), &[]);
    assert!(
        !got.complete_200(size),
        "a complete 200 for a blob the upstream cut: status {} len {}\n{}",
        got.status,
        got.body.len(),
        s.logs()
    );
    assert!(s.upstream_blob_gets(&layer) >= 1, "{}", s.logs());
    s.assert_not_cached(&layer);

    s.proxy.clear_faults();
    match s.skopeo_pull(image) {
        Ok(p) => p.assert_is(image, false),
        Err(e) => panic!("pull after the fault was removed: {e:#}\n{}", s.logs()),
    }
    s.assert_cached(&layer);
}

#[test]
fn upstream_serving_wrong_bytes_is_never_passed_off_as_the_blob() {
    let s = session("flip", &[]);
    let image = &s.up.images.flip;
    let layer = image.first_layer();
    let want = blob_bytes(image, &layer);
    let size = want.len() as u64;
    let c = client();

    for offset in [size / 2, size - 1] {
        s.proxy.set_fault(&layer, Fault::FlipByte(offset));
        let got = get(&c, &s.blob_url(image, &layer), &[]);
        assert!(
            !got.complete_200(size),
            "byte {offset} flipped upstream, yet the client got a complete 200 (hash {} vs {layer})\n{}",
            mirror_tests::digest_of(&got.body),
            s.logs()
        );
        // Whatever did arrive is a prefix of the real blob minus the flipped byte: the
        // client never gets the wrong byte as a complete body.
        s.assert_not_cached(&layer);
    }
    assert!(
        s.skopeo_pull(image).is_err(),
        "skopeo pull succeeded with a corrupted layer upstream\n{}",
        s.logs()
    );
    s.assert_not_cached(&layer);

    s.proxy.clear_faults();
    let got = get(&c, &s.blob_url(image, &layer), &[]);
    assert!(got.complete_200(size), "{got:?}\n{}", s.logs());
    assert_eq!(mirror_tests::digest_of(&got.body), layer);
    match s.skopeo_pull(image) {
        Ok(p) => p.assert_is(image, false),
        Err(e) => panic!("pull after the fault was removed: {e:#}\n{}", s.logs()),
    }
    s.assert_cached(&layer);
}

#[test]
fn regmirror_killed_mid_download_restarts_clean_and_fetches_the_blob_again() {
    let mut s = session("kill", &[]);
    let image = &s.up.images.kill;
    let (layer, size, client_thread) = s.slow_download(image);
    s.cache.kill9();
    let got = client_thread.join().expect("client thread");
    assert!(
        !got.complete_200(size),
        "the client got a complete body from a regmirror killed mid-download\n{}",
        s.logs()
    );
    // Killed mid-download: a partial temp file, nothing in the store.
    let partial = s.cache.tmp_files();
    assert!(
        partial.iter().any(|(_, len)| *len > 0 && *len < size)
            && !s.cache.blob_path(&layer).exists(),
        "after SIGKILL the partial download should be in tmp/ only: {partial:?}"
    );

    s.proxy.clear_faults();
    let gets_before = s.upstream_blob_gets(&layer);
    s.cache.restart().expect("restart on the same storage");
    let start = Instant::now();
    while !s.cache.tmp_files().is_empty() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        s.cache.tmp_files(),
        Vec::<(PathBuf, u64)>::new(),
        "tmp/ not emptied at startup\n{}",
        s.logs()
    );

    let got = get(&client(), &s.blob_url(image, &layer), &[]);
    assert!(got.complete_200(size), "{got:?}\n{}", s.logs());
    assert_eq!(mirror_tests::digest_of(&got.body), layer);
    assert_eq!(
        s.upstream_blob_gets(&layer),
        gets_before + 1,
        "the restarted regmirror should fetch the blob again, once\n{}",
        s.logs()
    );
    s.assert_cached(&layer);
    match s.skopeo_pull(image) {
        Ok(p) => p.assert_is(image, false),
        Err(e) => panic!("pull after restart: {e:#}\n{}", s.logs()),
    }
}

#[test]
fn sigterm_lets_a_download_in_progress_finish_and_takes_no_new_connection() {
    let mut s = session("term", &["--shutdown-grace", "60"]);
    let image = &s.up.images.kill;
    let (layer, size, client_thread) = s.slow_download(image);
    s.cache.sigterm();
    let start = Instant::now();
    while std::net::TcpStream::connect_timeout(&s.cache.addr, Duration::from_millis(200)).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "still taking connections after SIGTERM\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !client_thread.is_finished(),
        "the download ended before the port closed: nothing was tested"
    );
    let got = client_thread.join().expect("client thread");
    assert!(got.complete_200(size), "{got:?}\n{}", s.logs());
    assert_eq!(mirror_tests::digest_of(&got.body), layer);
    let start = Instant::now();
    while s.cache.check_running().is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still running after its download finished\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.assert_cached(&layer);
}

#[test]
fn a_full_disk_still_serves_the_blob_logs_it_and_keeps_serving() {
    let mut s = session_with("tmpfs", &[], Some("4m"));
    let big = &s.up.images.big;
    let layer = big.first_layer();
    let want = blob_bytes(big, &layer);
    assert!(want.len() as u64 > 4 * MIB);

    let got = get(&client(), &s.blob_url(big, &layer), &[]);
    assert!(
        got.complete_200(want.len() as u64),
        "a blob larger than the disk was not passed through: status {} len {} error {:?}\n{}",
        got.status,
        got.body.len(),
        got.error,
        s.logs()
    );
    assert_eq!(mirror_tests::digest_of(&got.body), layer);

    let start = Instant::now();
    let disk_full = |log: &str| {
        log.lines().any(|l| {
            (l.contains("No space left on device") || l.contains("disk full"))
                && l.contains(layer.trim_start_matches("sha256:"))
        })
    };
    while !disk_full(&s.cache.log_text()) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        disk_full(&s.cache.log_text()),
        "no disk-full message naming the blob in the log\n{}",
        s.logs()
    );
    s.assert_not_cached(&layer);

    // Still serving, and the space of the failed download was given back: a small image
    // pulls and is cached.
    s.cache.check_running().expect("regmirror still running");
    let health = get(&client(), &s.cache.url("/healthz"), &[]);
    assert_eq!(health.status, 200, "{health:?}");
    let small = &s.up.images.small;
    match s.skopeo_pull(small) {
        Ok(p) => p.assert_is(small, false),
        Err(e) => panic!("pull of another image after disk full: {e:#}\n{}", s.logs()),
    }
    s.assert_cached(&small.first_layer());
    // The big blob again: still correct.
    let again = get(&client(), &s.blob_url(big, &layer), &[]);
    assert!(again.complete_200(want.len() as u64), "{}", s.logs());
    assert_eq!(mirror_tests::digest_of(&again.body), layer);
}

#[test]
fn fifty_concurrent_cold_requests_fetch_the_blob_once() {
    let s = session("crowd", &[]);
    let image = &s.up.images.crowd;
    let layer = image.first_layer();
    let size = blob_bytes(image, &layer).len() as u64;
    // ~3 MiB at 1 MiB/s: the download is in flight while all 50 requests arrive.
    s.proxy.set_fault(&layer, Fault::Throttle(MIB));
    let url = s.blob_url(image, &layer);
    let barrier = std::sync::Barrier::new(50);
    let c = client();
    let results: Vec<Got> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..50)
            .map(|_| {
                sc.spawn(|| {
                    barrier.wait();
                    get(&c, &url, &[])
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for (i, g) in results.iter().enumerate() {
        assert!(
            g.complete_200(size),
            "request {i}: status {} len {} error {:?}\n{}",
            g.status,
            g.body.len(),
            g.error,
            s.logs()
        );
        assert_eq!(mirror_tests::digest_of(&g.body), layer, "request {i}");
    }
    assert_eq!(
        s.upstream_blob_gets(&layer),
        1,
        "50 concurrent cold requests -> upstream blob GETs\n{}",
        s.logs()
    );
    s.assert_cached(&layer);
}

#[test]
fn a_stopped_upstream_serves_the_cached_tag_and_a_moved_tag_is_picked_up_after_the_ttl() {
    let s = session("tagmove", &["--tag-ttl", "1"]);
    let (a, b) = (&s.up.images.tag_a, &s.up.images.tag_b);
    let pull = |want: &SeededImage, what: &str| match s.skopeo_pull(want) {
        Ok(p) => p,
        Err(e) => panic!("{what}: {e:#}\n{}", s.logs()),
    };
    pull(a, "first pull").assert_is(a, false);

    // Upstream gone; after the TTL the tag is revalidated, fails, and the cached one is
    // served (with its cached blobs).
    s.proxy.set_upstream_up(false, s.up.registry.addr);
    std::thread::sleep(Duration::from_millis(1500));
    let before = s.proxy.seen().len();
    pull(a, "pull with the upstream stopped").assert_is(a, false);
    assert!(
        s.proxy.seen().len() > before,
        "the expired tag was not revalidated against the upstream\n{}",
        s.logs()
    );

    // Upstream back with the tag moved to another image.
    s.proxy.set_upstream_up(true, s.up.registry.addr);
    s.up.push(b).expect("move the tag upstream");
    std::thread::sleep(Duration::from_millis(1500));
    let p = pull(b, "pull after the tag moved");
    assert_eq!(
        p.digest,
        b.digest,
        "after the TTL the moved tag must be served (old digest {})\n{}",
        a.digest,
        s.logs()
    );
    p.assert_is(b, false);
}

/// A raw HTTP/1.1 exchange: the target goes out byte for byte (no client normalises
/// `..` or `%2e%2e`).
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_string)
    }
}

fn raw(addr: std::net::SocketAddr, method: &str, target: &str, extra: &[(&str, &str)]) -> Raw {
    let mut conn = std::net::TcpStream::connect(addr).expect("connect regmirror");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if matches!(method, "PUT" | "POST" | "PATCH") {
        req.push_str("Content-Length: 2\r\n\r\n{}");
    } else {
        req.push_str("\r\n");
    }
    conn.write_all(req.as_bytes()).expect("send");
    let mut buf = Vec::new();
    let _ = conn.read_to_end(&mut buf);
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&buf)));
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let n =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16).unwrap_or(0);
            if n == 0 || rest.len() < i + 2 + n {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + n]);
            rest = &rest[(i + 4 + n).min(rest.len())..];
        }
        body = out;
    }
    Raw {
        status,
        headers,
        body,
    }
}

#[test]
fn bad_input_gets_a_clear_oci_error_and_never_reaches_the_upstream() {
    let s = session("badinput", &[]);
    let small = &s.up.images.small;
    let name = &small.name;
    let layer = small.first_layer();
    let blob = blob_bytes(small, &layer);
    let addr = s.cache.addr;
    let failures = std::cell::RefCell::new(Vec::<String>::new());
    let check = |method: &str,
                 target: &str,
                 extra: &[(&str, &str)],
                 status: u16,
                 codes: &[&str]| {
        let r = raw(addr, method, target, extra);
        let code = r.error_code();
        let json = r
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json"));
        if r.status != status || !json || !code.as_deref().is_some_and(|c| codes.contains(&c)) {
            failures.borrow_mut().push(format!(
                "{method} {target} {extra:?}: want {status} {codes:?} (JSON), got {} {:?} content-type {:?} body {}",
                r.status,
                code,
                r.header("content-type"),
                String::from_utf8_lossy(&r.body)
            ));
        }
        r
    };

    // Names.
    check("GET", "/v2/UPPER/manifests/x", &[], 400, &["NAME_INVALID"]);
    check(
        "GET",
        "/v2/faults/../etc/manifests/x",
        &[],
        400,
        &["NAME_INVALID"],
    );
    check(
        "GET",
        "/v2/../faults/small/manifests/1",
        &[],
        400,
        &["NAME_INVALID"],
    );
    check(
        "GET",
        "/v2/faults/%2e%2e/small/manifests/1",
        &[],
        400,
        &["NAME_INVALID"],
    );
    check(
        "GET",
        &format!("/v2/faults/%2E%2E/small/blobs/{layer}"),
        &[],
        400,
        &["NAME_INVALID"],
    );
    check(
        "GET",
        &format!("/v2/{name}/manifests/..%2f..%2fetc"),
        &[],
        400,
        &["NAME_INVALID", "TAG_INVALID", "MANIFEST_INVALID"],
    );
    // Digests.
    check(
        "GET",
        &format!("/v2/{name}/blobs/sha256:xyz"),
        &[],
        400,
        &["DIGEST_INVALID"],
    );
    check(
        "GET",
        &format!("/v2/{name}/blobs/md5:{}", "0".repeat(32)),
        &[],
        400,
        &["DIGEST_INVALID"],
    );
    check(
        "GET",
        &format!("/v2/{name}/manifests/sha256:xyz"),
        &[],
        400,
        &["DIGEST_INVALID"],
    );
    check(
        "GET",
        &format!("/v2/{name}/blobs/sha256:{}", "A".repeat(64)),
        &[],
        400,
        &["DIGEST_INVALID"],
    );
    // Pagination.
    for n in ["99999999999999999999999", "4294967296", "-1", "abc"] {
        check(
            "GET",
            &format!("/v2/{name}/tags/list?n={n}"),
            &[],
            400,
            &["PAGINATION_NUMBER_INVALID"],
        );
    }
    // Writes.
    for (method, target) in [
        ("PUT", format!("/v2/{name}/manifests/1")),
        ("DELETE", format!("/v2/{name}/manifests/1")),
        ("POST", format!("/v2/{name}/blobs/uploads/")),
        ("PATCH", format!("/v2/{name}/blobs/uploads/x")),
        ("DELETE", format!("/v2/{name}/blobs/{layer}")),
    ] {
        let r = check(method, &target, &[], 405, &["UNSUPPORTED"]);
        if r.status == 405 && r.header("allow").is_none() {
            failures
                .borrow_mut()
                .push(format!("{method} {target}: 405 without Allow"));
        }
    }
    let forwarded: Vec<String> = s
        .proxy
        .seen()
        .iter()
        .map(|x| format!("{} {}", x.method, x.path))
        .collect();
    assert!(
        forwarded.is_empty(),
        "invalid requests were forwarded upstream: {forwarded:#?}"
    );

    // Ranges, on a blob that is cached.
    let full = get(&client(), &s.blob_url(small, &layer), &[]);
    assert!(
        full.complete_200(blob.len() as u64),
        "{full:?}\n{}",
        s.logs()
    );
    let target = format!("/v2/{name}/blobs/{layer}");
    let ok = raw(addr, "GET", &target, &[("Range", "bytes=10-19")]);
    assert_eq!(ok.status, 206, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.body, &blob[10..20]);
    assert_eq!(
        ok.header("content-range"),
        Some(format!("bytes 10-19/{}", blob.len()).as_str())
    );
    for bad in ["bytes=abc", "bytes=5-2", "bytes=", "bytes=0-1,5-6"] {
        check("GET", &target, &[("Range", bad)], 400, &["RANGE_INVALID"]);
    }
    // A range unit the cache does not know is ignored (RFC 9110 §14.2): the whole blob.
    let other_unit = raw(addr, "GET", &target, &[("Range", "items=0-1")]);
    assert_eq!(
        (other_unit.status, other_unit.body.len()),
        (200, blob.len()),
        "Range: items=0-1"
    );
    let size = blob.len().to_string();
    for unsat in [
        format!("bytes={size}-"),
        format!("bytes={}-", blob.len() + 100),
        "bytes=-0".to_string(),
    ] {
        let r = check(
            "GET",
            &target,
            &[("Range", &unsat)],
            416,
            &["RANGE_INVALID"],
        );
        if r.status == 416 && r.header("content-range") != Some(format!("bytes */{size}").as_str())
        {
            failures.borrow_mut().push(format!(
                "Range {unsat}: 416 without Content-Range bytes */{size}: {:?}",
                r.header("content-range")
            ));
        }
    }
    let failures = failures.into_inner();
    assert!(
        failures.is_empty(),
        "{} bad requests were not answered as expected:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        s.logs()
    );
}

/// Started under a low soft limit of open files (systemd's default is 1024), regmirror raises
/// it to the hard limit, as Go servers do: every client and every download holds descriptors.
#[test]
fn a_low_open_files_limit_is_raised_at_start() {
    let dir = mirror_tests::temp_dir("nofile").expect("temp dir");
    let bin = mirror_tests::build::regmirror().expect("regmirror");
    let listen = format!("127.0.0.1:{}", mirror_tests::free_port());
    let log_path = dir.path().join("regmirror.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$@\"")
        .arg("sh")
        .arg(&bin)
        .args(["serve", "--listen", &listen, "--storage"])
        .arg(dir.path().join("storage"))
        .args(["--upstream", "lab=http://127.0.0.1:9"])
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    let open_files = |limits: &str, column: usize| -> Option<u64> {
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(column)?.parse().ok()
    };
    let hard = open_files(
        &std::fs::read_to_string("/proc/self/limits").expect("own limits"),
        4,
    )
    .expect("this process's hard limit");
    // Read once it serves: the limit is raised before the listener opens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("regmirror serving")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let soft = std::fs::read_to_string(format!("/proc/{}/limits", child.id()))
        .ok()
        .and_then(|l| open_files(&l, 3));
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        logs.contains("regmirror serving"),
        "it never served:\n{logs}"
    );
    assert!(
        hard > 256,
        "this machine's hard limit ({hard}) leaves nothing to raise"
    );
    assert_eq!(
        soft,
        Some(hard.min(1 << 20)),
        "the soft limit once serving\n{logs}"
    );
}
