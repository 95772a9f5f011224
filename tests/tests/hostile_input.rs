//! Hostile input against the running mirror (issue 9, "Keep it found"): one story per
//! finding class, told as an attacker or operator would. A fault fixture upstream
//! (`harness::hostile`) misbehaves on purpose; the filter stories run through a real Envoy
//! with the shipped `envoy/local.yaml` and the fresh filter (ghcr.io, its CDN and
//! registry.k8s.io point at the fixture, docker.io and quay.io at the harness' real
//! registries); the cache stories run a real `regmirror` with the fixture as upstream
//! `hostile` next to the harness' real gcr-like registry. Every story ends with a normal
//! pull through the same mirror, digests verified.

use mirror_tests::clients::{self, SkopeoPull};
use mirror_tests::hostile::{
    self, bearer, Action, Body, Cache, Hostile, HostileMirror, Listener, Relay, TinyImage, GHCR,
    GHCR_CDN, K8S,
};
use mirror_tests::token_server::{PUSH_PASSWORD, PUSH_USER};
use mirror_tests::upstreams::{Front, HUB_HOST};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// The most RSS regmirror may ever reach in these stories: its idle ~20 MiB, plus what it
/// may legitimately hold in memory (pass-through buffers, small-response cache; a few
/// hundred MiB by default), well below the fixture's 1 GiB endless bodies that an
/// unbounded read holds whole (issue 9 saw 4.4 GB in 10 s).
const RSS_BOUND_KIB: u64 = 400 * 1024;
/// A hostile answer must end in an error this fast (not after the fixture gives up).
const ERROR_WITHIN: Duration = Duration::from_secs(20);
/// Mirror-internal headers no realm, CDN or upstream may see.
const INTERNAL_HEADERS: &[&str] = &[
    "x-mirror-registry",
    "x-forwarded-for",
    "x-envoy-external-address",
    "x-request-id",
];

fn mirror() -> &'static HostileMirror {
    static M: OnceLock<Result<HostileMirror, String>> = OnceLock::new();
    match M.get_or_init(|| HostileMirror::start(BTreeMap::new()).map_err(|e| format!("{e:#}"))) {
        Ok(m) => m,
        Err(e) => panic!("the hostile mirror failed to start: {e}"),
    }
}

fn basic() -> String {
    use base64::Engine;
    let b64 =
        base64::engine::general_purpose::STANDARD.encode(format!("{PUSH_USER}:{PUSH_PASSWORD}"));
    format!("Basic {b64}")
}

/// Plain client for the cache (no redirects followed).
fn http() -> reqwest::blocking::Client {
    match reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
    {
        Ok(c) => c,
        Err(e) => panic!("http client: {e}"),
    }
}

/// `key="value"` of a challenge.
fn param(challenge: &str, key: &str) -> Option<String> {
    let re = regex::Regex::new(&format!(r#"{key}="([^"]*)""#)).ok()?;
    re.captures(challenge).map(|c| c[1].to_string())
}

/// The `WWW-Authenticate` of `GET url`.
fn challenge_of(client: &reqwest::blocking::Client, url: &str) -> String {
    let r = client
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(r.status().as_u16(), 401, "GET {url} should be challenged");
    r.headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("GET {url}: 401 without a challenge"))
        .to_string()
}

/// A token for `scope` from the realm named in `challenge` (the mirror's rewritten realm).
fn token(client: &reqwest::blocking::Client, challenge: &str, scope: &str) -> String {
    let realm = param(challenge, "realm").unwrap_or_else(|| panic!("no realm in {challenge}"));
    let service = param(challenge, "service").unwrap_or_default();
    let r = client
        .get(&realm)
        .query(&[("service", service.as_str()), ("scope", scope)])
        .send()
        .unwrap_or_else(|e| panic!("GET {realm}: {e}"));
    let status = r.status();
    let v: serde_json::Value = r.json().unwrap_or_default();
    assert!(status.is_success(), "token from {realm}: {status} {v}");
    v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token from {realm}: {v}"))
        .to_string()
}

/// The normal pull after the hostile part: skopeo pulls the real hub image through `m`
/// in host mode, every digest verified.
fn normal_pull_through(m: &HostileMirror) {
    normal_pull_at(m, m.port());
}

/// [`normal_pull_through`] on `port` (a front relaying to `m`).
fn normal_pull_at(m: &HostileMirror, port: u16) {
    let img = &m.up.images.alpine;
    let reference = format!(
        "docker.{}:{port}/{}:{}",
        mirror_tests::mirror::HOST_SUFFIX,
        img.name,
        img.tag
    );
    let opts = SkopeoPull {
        all: false,
        cert_dir: Some(m.up.pki.cert_dir.clone()),
        registries_conf: None,
    };
    match clients::skopeo_pull(&reference, &opts) {
        Ok(p) => p.assert_is(img, false),
        Err(e) => panic!(
            "the normal pull after the hostile part failed: {e:#}\n{}",
            m.logs()
        ),
    }
}

/// The normal pull through the cache, and the process still running.
fn cache_still_serves(cache: &mut Cache) {
    if let Err(e) = cache.check_running() {
        panic!("regmirror died under hostile input: {e:#}");
    }
    if let Err(e) = cache.normal_pull() {
        panic!(
            "the normal pull after the hostile part failed: {e:#}\n--- regmirror ---\n{}",
            cache.log_tail(40)
        );
    }
}

/// Peak RSS so far within [`RSS_BOUND_KIB`], and the process alive.
fn assert_memory_bounded(cache: &mut Cache, what: &str) {
    if let Err(e) = cache.check_running() {
        panic!("regmirror died after {what}: {e:#}");
    }
    let peak = cache.status_kib("VmHWM").unwrap_or(u64::MAX);
    assert!(
        peak < RSS_BOUND_KIB,
        "regmirror's peak RSS reached {} MiB after {what} (bound {} MiB)\n{}",
        peak / 1024,
        RSS_BOUND_KIB / 1024,
        cache.log_tail(30)
    );
}

/// `GET url`; the status (0: no answer) and how long it took.
fn timed_get(
    client: &reqwest::blocking::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, Duration) {
    let start = Instant::now();
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let status = match req.send() {
        Ok(r) => {
            let s = r.status().as_u16();
            let _ = hostile::read_bounded(r, MIB as usize);
            s
        }
        Err(_) => 0,
    };
    (status, start.elapsed())
}

// ---------------------------------------------------------------------------------------
// The fixture's registries behind Envoy

/// ghcr.io as the fixture plays it: `/v2/` challenges with realm `https://ghcr.io/token`,
/// which issues tokens.
fn ghcr() -> &'static Hostile {
    let h = hostile::shared();
    h.on(
        Some(GHCR),
        "/v2/",
        Action::reply(
            401,
            &[("www-authenticate", &bearer("https://ghcr.io/token", GHCR))],
            "",
        ),
    );
    h.on(
        Some(GHCR),
        "/token",
        Action::Token {
            ns: "ghcr".into(),
            expires_in: "300".into(),
        },
    );
    h
}

/// The challenge for `repo` on ghcr.io.
fn ghcr_challenge(repo: &str) -> String {
    format!(
        "{},scope=\"repository:{repo}:pull\"",
        bearer("https://ghcr.io/token", GHCR)
    )
}

/// Serves `image` as ghcr.io `repo` behind the token gate, its layer as a `307` to the CDN
/// (`pkg-containers.githubusercontent.com/<cdn_dir>/…`), which serves it to anyone.
fn ghcr_image_with_cdn(h: &Hostile, repo: &str, cdn_dir: &str, image: &TinyImage) {
    let challenge = ghcr_challenge(repo);
    h.serve_image(Some(GHCR), repo, image, Some(&challenge), false);
    let (d, bytes) = image.layer();
    let hex = d.trim_start_matches("sha256:");
    let cdn_path = format!("/{cdn_dir}/{hex}");
    h.on(
        Some(GHCR),
        &format!("/v2/{repo}/blobs/{d}"),
        Action::gated(
            &challenge,
            Action::redirect(&format!("https://{GHCR_CDN}{cdn_path}?sig=hostile")),
        ),
    );
    h.on(
        Some(GHCR_CDN),
        &cdn_path,
        Action::reply(
            200,
            &[("content-type", "application/octet-stream")],
            bytes.clone(),
        ),
    );
}

// ---------------------------------------------------------------------------------------
// cache-service stories

/// Finding 1: a realm answering an endless body, a 100 MB token, or a token with control
/// characters, and a 256 KiB challenge. regmirror answers with an error, stays small and
/// alive, and never sends such a token upstream.
#[test]
fn token_answers_that_never_end_or_are_no_header_value_are_refused() {
    let h = hostile::shared();
    let mut cache = Cache::start("hostile-token", &[]).expect("regmirror starts");
    let realm = |p: &str| format!("{}/token/t1-{p}", h.url());
    let json = [("content-type", "application/json")];
    h.on(
        None,
        "/token/t1-endless",
        Action::body(
            200,
            &json,
            Body::Endless {
                prefix: br#"{"token":""#.to_vec(),
                content_length: None,
            },
        ),
    );
    h.on(
        None,
        "/token/t1-endless-cl",
        Action::body(
            200,
            &json,
            Body::Endless {
                prefix: br#"{"token":""#.to_vec(),
                content_length: Some(8 * 1024 * MIB),
            },
        ),
    );
    let mut huge = br#"{"token":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100 * MIB as usize));
    huge.extend_from_slice(br#"","expires_in":300}"#);
    h.on(None, "/token/t1-huge", Action::reply(200, &json, huge));
    h.on(
        None,
        "/token/t1-ctl",
        Action::reply(
            200,
            &json,
            r#"{"token":"tok\u0001\r\nx-injected: 1","expires_in":300}"#,
        ),
    );
    let image = TinyImage::new("1", 11, 4096);
    let client = http();
    // A 256 KiB challenge naming an honest realm: only a bounded reader refuses it.
    h.on(
        None,
        "/token/t1-enormous",
        Action::Token {
            ns: "t1".into(),
            expires_in: "300".into(),
        },
    );
    let enormous = format!(
        "{},scope=\"{}\"",
        bearer(&realm("enormous"), "hostile"),
        "a".repeat(256 * 1024)
    );
    for case in ["endless", "endless-cl", "huge", "ctl", "enormous"] {
        let repo = format!("t1/{case}");
        let challenge = match case {
            "enormous" => enormous.clone(),
            _ => bearer(&realm(case), "hostile"),
        };
        h.serve_image(None, &repo, &image, Some(&challenge), false);
        let (status, took) = timed_get(&client, &cache.hostile_url(&repo, "manifests", "1"), &[]);
        assert!(
            (400..600).contains(&status),
            "the token answer `{case}` gave the client {status}, not an error\n{}",
            cache.log_tail(30)
        );
        assert!(
            took < ERROR_WITHIN,
            "the token answer `{case}` took {took:?} to fail"
        );
        assert_memory_bounded(&mut cache, &format!("the token answer `{case}`"));
    }
    for s in h.seen_under("/v2/t1/") {
        let auth = s.header("authorization").unwrap_or("");
        assert!(
            !s.oversized_head && auth.len() < 8192,
            "a {} byte Authorization reached the registry ({} {})",
            auth.len(),
            s.method,
            s.target
        );
        assert!(
            s.header("x-injected").is_none() && !auth.contains("tok"),
            "a token with control characters was sent upstream: {:?}",
            s.headers
        );
    }
    cache_still_serves(&mut cache);
}

/// Finding 6: `expires_in` = u64::MAX and `--shutdown-grace` = u64::MAX: no panic, the
/// token works, the process shuts down cleanly on SIGTERM.
#[test]
fn expires_in_and_shutdown_grace_near_u64_max_do_not_panic() {
    let h = hostile::shared();
    let mut cache = Cache::start(
        "hostile-expiry",
        &["--shutdown-grace", "18446744073709551615"],
    )
    .expect("regmirror starts with --shutdown-grace u64::MAX");
    h.on(
        None,
        "/token/t2",
        Action::Token {
            ns: "t2".into(),
            expires_in: "18446744073709551615".into(),
        },
    );
    let image = TinyImage::new("1", 12, 8192);
    let challenge = bearer(&format!("{}/token/t2", h.url()), "hostile");
    h.serve_image(None, "t2/app", &image, Some(&challenge), false);
    let client = http();
    let r = client
        .get(cache.hostile_url("t2/app", "manifests", "1"))
        .header("accept", mirror_tests::images::MT_MANIFEST)
        .send()
        .expect("regmirror answers");
    let status = r.status();
    let body = r.bytes().unwrap_or_default();
    assert_eq!(
        status.as_u16(),
        200,
        "manifest with an `expires_in` of u64::MAX: {}\n{}",
        String::from_utf8_lossy(&body),
        cache.log_tail(30)
    );
    assert_eq!(mirror_tests::digest_of(&body), image.digest);
    let (d, bytes) = image.layer();
    let blob = client
        .get(cache.hostile_url("t2/app", "blobs", d))
        .send()
        .and_then(|r| r.bytes())
        .expect("blob");
    assert_eq!(&blob[..], &bytes[..], "the blob through the same token");
    cache_still_serves(&mut cache);

    let pid = nix::unistd::Pid::from_raw(cache.proc.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(
        hostile::wait_until(Duration::from_secs(10), || cache.check_running().is_err()),
        "regmirror did not exit within 10 s of SIGTERM with nothing in flight"
    );
    let log = std::fs::read_to_string(&cache.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "regmirror panicked:\n{log}");
}

/// Finding 7: the upstream revokes the token regmirror holds. The next request's 401
/// drops it and exactly one fresh token is fetched; the client never sees the 401.
#[test]
fn a_revoked_token_is_replaced_once() {
    let h = hostile::shared();
    let mut cache = Cache::start("hostile-revoke", &[]).expect("regmirror starts");
    h.on(
        None,
        "/token/t3",
        Action::Token {
            ns: "t3".into(),
            expires_in: "300".into(),
        },
    );
    let image = TinyImage::new("1", 13, 16384);
    let challenge = bearer(&format!("{}/token/t3", h.url()), "hostile");
    h.serve_image(None, "t3/app", &image, Some(&challenge), false);
    let client = http();
    let (status, _) = timed_get(&client, &cache.hostile_url("t3/app", "manifests", "1"), &[]);
    assert_eq!(status, 200, "the first pull\n{}", cache.log_tail(30));
    let before = h.seen_under("/token/t3").len();
    assert_eq!(before, 1, "one token for the first pull");

    h.revoke("t3");
    let (d, bytes) = image.layer();
    let r = client
        .get(cache.hostile_url("t3/app", "blobs", d))
        .send()
        .expect("regmirror answers");
    let status = r.status();
    let blob = r.bytes().unwrap_or_default();
    assert_eq!(
        status.as_u16(),
        200,
        "after the upstream revoked its token regmirror answered {status}\n{}",
        cache.log_tail(30)
    );
    assert_eq!(&blob[..], &bytes[..]);
    assert_eq!(
        h.seen_under("/token/t3").len(),
        before + 1,
        "exactly one fresh token after the revocation"
    );
    cache_still_serves(&mut cache);
}

/// Finding 5 (SSRF): redirects to a non-allowlisted `http://127.0.0.1:<port>`, to the
/// cache itself (for content it serves, and for the very request), in a loop, and from https to http; a
/// challenge naming a realm off the allowlist. Nothing reaches the canary, nothing is
/// served, each ends quickly; a relative redirect on the upstream's own host still works.
#[test]
fn the_cache_follows_no_redirect_or_realm_off_its_allowlist() {
    let h = hostile::shared();
    let mut cache = Cache::start("hostile-ssrf", &[]).expect("regmirror starts");
    let image = TinyImage::new("1", 14, 4096);
    let manifest = Action::reply(
        200,
        &[("content-type", mirror_tests::images::MT_MANIFEST)],
        image.manifest.clone(),
    );
    let m = |repo: &str| format!("/v2/{repo}/manifests/1");
    h.on(
        None,
        "/token/t4",
        Action::Token {
            ns: "t4".into(),
            expires_in: "300".into(),
        },
    );
    let honest = bearer(&format!("{}/token/t4", h.url()), "hostile");
    h.serve_image(None, "t4/good", &image, Some(&honest), false);
    let cases: Vec<(&str, String)> = vec![
        ("t4/canary", h.canary_url("/canary/t4-redirect")),
        // The cache itself, for content it can serve: following it would answer 200.
        (
            "t4/via-self",
            cache.hostile_url("t4/good", "manifests", "1"),
        ),
        ("t4/self", cache.hostile_url("t4/self", "manifests", "1")),
        ("t4/loop", format!("{}{}", h.url(), m("t4/loop"))),
        (
            "t4/downgrade",
            format!("http://localhost:{}{}", h.addr.port(), m("t4/plain")),
        ),
    ];
    // What a followed downgrade would fetch.
    h.on(None, &m("t4/plain"), manifest.clone());
    let client = http();
    for (repo, location) in &cases {
        h.on(None, &m(repo), Action::redirect(location));
        let (status, took) = timed_get(&client, &cache.hostile_url(repo, "manifests", "1"), &[]);
        assert!(
            (400..600).contains(&status),
            "a redirect to {location} gave the client {status}\n{}",
            cache.log_tail(30)
        );
        assert!(
            took < Duration::from_secs(10),
            "a redirect to {location} took {took:?}"
        );
        // Nothing was stored either: asked again, still an error.
        let (again, _) = timed_get(&client, &cache.hostile_url(repo, "manifests", "1"), &[]);
        assert!(
            (400..600).contains(&again),
            "{repo} answered {again} the second time"
        );
    }
    assert!(
        h.seen_under("/v2/t4/plain").iter().all(|s| s.tls),
        "regmirror followed an https → http downgrade"
    );

    // A challenge naming a realm off the allowlist, then a repository with an honest one:
    // the hostile realm is neither called nor remembered.
    h.on(
        None,
        &m("t4/realm"),
        Action::reply(
            401,
            &[(
                "www-authenticate",
                &bearer(&h.canary_url("/canary/t4-realm"), "hostile"),
            )],
            "",
        ),
    );
    let (status, _) = timed_get(
        &client,
        &cache.hostile_url("t4/realm", "manifests", "1"),
        &[],
    );
    assert!((400..600).contains(&status), "hostile realm: {status}");
    let (status, _) = timed_get(
        &client,
        &cache.hostile_url("t4/good", "manifests", "1"),
        &[],
    );
    assert_eq!(
        status,
        200,
        "honest realm after a hostile one\n{}",
        cache.log_tail(30)
    );

    // A relative redirect on the upstream's own host is followed (Artifact Registry does it).
    h.on(None, &m("t4/moved-target"), manifest);
    h.on(
        None,
        &m("t4/moved"),
        Action::redirect(&m("t4/moved-target")),
    );
    let (status, _) = timed_get(
        &client,
        &cache.hostile_url("t4/moved", "manifests", "1"),
        &[],
    );
    assert_eq!(
        status,
        200,
        "a relative redirect on the upstream host\n{}",
        cache.log_tail(30)
    );

    let canary: Vec<_> = h
        .seen()
        .into_iter()
        .filter(|s| s.listener == Listener::Canary && s.path().starts_with("/canary/t4-"))
        .collect();
    assert!(
        canary.is_empty(),
        "regmirror reached the canary: {canary:?}"
    );
    cache_still_serves(&mut cache);
}

/// Finding 13: an upstream that answers HEAD with 405. A HEAD of a manifest and of a
/// blob through the cache falls back to GET and answers 200 with digest and length.
#[test]
fn head_on_an_upstream_without_head_falls_back_to_get() {
    let h = hostile::shared();
    let mut cache = Cache::start("hostile-nohead", &[]).expect("regmirror starts");
    h.on(
        None,
        "/token/t5",
        Action::Token {
            ns: "t5".into(),
            expires_in: "300".into(),
        },
    );
    let image = TinyImage::new("1", 15, 32768);
    let challenge = bearer(&format!("{}/token/t5", h.url()), "hostile");
    h.serve_image(None, "t5/app", &image, Some(&challenge), true);
    let client = http();
    let r = client
        .head(cache.hostile_url("t5/app", "manifests", "1"))
        .header("accept", mirror_tests::images::MT_MANIFEST)
        .send()
        .expect("regmirror answers");
    assert_eq!(
        r.status().as_u16(),
        200,
        "manifest HEAD\n{}",
        cache.log_tail(30)
    );
    assert_eq!(
        r.headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(image.digest.as_str())
    );
    let (d, bytes) = image.layer();
    let r = client
        .head(cache.hostile_url("t5/app", "blobs", d))
        .send()
        .expect("regmirror answers");
    assert_eq!(
        r.status().as_u16(),
        200,
        "blob HEAD\n{}",
        cache.log_tail(30)
    );
    assert_eq!(
        r.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(bytes.len().to_string().as_str())
    );
    cache_still_serves(&mut cache);
}

/// Finding 12 (and 1 for manifests, tags lists, error bodies): blobs of unknown length
/// that never end, a blob announcing 8 GiB, a blob longer than its `Content-Length`, and
/// a manifest, a tags list and an error body that never end.
/// With `--max-size 32MiB`, tmp/ never holds much more than the bound, nothing is stored,
/// RSS stays bounded, the process lives.
#[test]
fn bodies_of_unknown_or_lying_length_are_bounded() {
    let h = hostile::shared();
    let mut cache =
        Cache::start("hostile-bodies", &["--max-size", "32MiB"]).expect("regmirror starts");
    let tmp_bound = 48 * MIB;
    let octets = [("content-type", "application/octet-stream")];
    let never = mirror_tests::digest_of(b"this digest never matches");
    let client = http();
    for (case, content_length) in [("unknown", None), ("announced", Some(8 * 1024 * MIB))] {
        let repo = format!("t6/{case}");
        h.on(
            None,
            &format!("/v2/{repo}/blobs/{never}"),
            Action::body(
                200,
                &octets,
                Body::Endless {
                    prefix: Vec::new(),
                    content_length,
                },
            ),
        );
        let max_tmp = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let storage = cache.storage.clone();
        let sampler = {
            let (max_tmp, done) = (max_tmp.clone(), done.clone());
            std::thread::spawn(move || {
                let tmp = |s: &std::path::Path| -> u64 {
                    std::fs::read_dir(s.join("tmp"))
                        .map(|rd| {
                            rd.flatten()
                                .filter_map(|e| e.metadata().ok())
                                .map(|m| m.len())
                                .sum()
                        })
                        .unwrap_or(0)
                };
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    max_tmp.fetch_max(tmp(&storage), std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let url = cache.hostile_url(&repo, "blobs", &never);
        let (status, body_len) = match client.get(&url).send() {
            Ok(r) => {
                let s = r.status().as_u16();
                let b = hostile::read_bounded(r, 64 * MIB as usize);
                (s, b.len())
            }
            Err(_) => (0, 0),
        };
        // The client left; a download that goes on without it must stop at the bound too.
        std::thread::sleep(Duration::from_secs(3));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = sampler.join();
        let peak_tmp = max_tmp.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            peak_tmp <= tmp_bound,
            "blob of {case} length: tmp/ grew to {} MiB with --max-size 32MiB (client got {status}, {body_len} bytes)\n{}",
            peak_tmp / MIB,
            cache.log_tail(30)
        );
        assert!(
            hostile::wait_until(Duration::from_secs(10), || cache.tmp_bytes() == 0),
            "blob of {case} length: tmp/ not cleaned up ({} bytes left)",
            cache.tmp_bytes()
        );
        let hex = never.trim_start_matches("sha256:");
        assert!(
            !cache
                .storage
                .join("blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .exists(),
            "an unverified blob was stored"
        );
        assert_memory_bounded(&mut cache, &format!("a blob of {case} length"));
    }

    // Longer than its Content-Length: what the client gets is the verified blob or an error.
    let image = TinyImage::new("1", 16, MIB as usize);
    let (d, layer) = image.layer().clone();
    let mut data = layer.clone();
    data.extend(std::iter::repeat_n(b'x', 4 * MIB as usize));
    h.on(
        None,
        &format!("/v2/t6/over/blobs/{d}"),
        Action::body(
            200,
            &octets,
            Body::Overlong {
                declared: layer.len() as u64,
                data,
            },
        ),
    );
    let r = client
        .get(cache.hostile_url("t6/over", "blobs", &d))
        .send()
        .expect("regmirror answers");
    if r.status().is_success() {
        let got = hostile::read_bounded(r, 8 * MIB as usize);
        assert!(
            got.len() <= layer.len() && layer.starts_with(&got),
            "a body longer than its Content-Length reached the client ({} bytes)",
            got.len()
        );
    }

    // A manifest, a tags list and an error body that never end. The client gets an error
    // (or, for the error, at most what it reads); the cache never buffers them whole.
    let endless_json = |prefix: &[u8]| Body::Endless {
        prefix: prefix.to_vec(),
        content_length: None,
    };
    let json = [("content-type", "application/json")];
    h.on(
        None,
        "/v2/t6/manifest/manifests/1",
        Action::body(
            200,
            &[("content-type", mirror_tests::images::MT_MANIFEST)],
            endless_json(br#"{"schemaVersion":2,"x":""#),
        ),
    );
    h.on(
        None,
        "/v2/t6/tags/tags/list",
        Action::body(200, &json, endless_json(br#"{"name":"t6/tags","tags":[""#)),
    );
    h.on(
        None,
        "/v2/t6/error/manifests/1",
        Action::body(500, &json, endless_json(br#"{"errors":[{"message":""#)),
    );
    for (what, url) in [
        (
            "manifest",
            cache.hostile_url("t6/manifest", "manifests", "1"),
        ),
        ("tags list", cache.hostile_url("t6/tags", "tags", "list")),
        (
            "error body",
            cache.hostile_url("t6/error", "manifests", "1"),
        ),
    ] {
        let (status, took) = timed_get(&client, &url, &[]);
        assert!((400..600).contains(&status), "endless {what}: {status}");
        assert!(took < ERROR_WITHIN, "endless {what} took {took:?} to fail");
        assert_memory_bounded(&mut cache, &format!("an endless {what}"));
    }
    cache_still_serves(&mut cache);
}

// ---------------------------------------------------------------------------------------
// filter stories

/// Finding 2: `/_mirror/auth/<realm host>/<path>` reaches only the realm path the
/// registry issued in its challenge; any other path on a realm host (quay's API, its
/// `_catalog`, a ghcr.io path, any `*.pkg.dev`) is 403 and never leaves the mirror.
#[test]
fn realm_hosts_serve_only_the_realm_path_they_issued() {
    let m = mirror();
    let h = ghcr();
    let client = m.client();
    let quay_challenge = challenge_of(&client, &m.host_url("quay", "/v2/"));
    // Control: the issued realm answers.
    token(&client, &quay_challenge, "repository:coreos/etcd:pull");
    challenge_of(&client, &m.host_url("ghcr", "/v2/"));

    let probes = [
        m.url("/_mirror/auth/quay.io/api/v1/user/"),
        m.url("/_mirror/auth/quay.io/v2/_catalog?n=99999"),
        m.url("/_mirror/auth/quay.io/v2/INVALID..name/tags/list"),
        m.url("/_mirror/auth/quay.io/v2/coreos/etcd/manifests/v3.5"),
        m.host_url("quay", "/_mirror/auth/quay.io/api/v1/user/"),
        m.url("/_mirror/auth/ghcr.io/v2/_catalog"),
        m.url("/_mirror/auth/ghcr.io/t7-not-the-realm"),
        m.url("/_mirror/auth/us-docker.pkg.dev/v2/token"),
        m.url("/_mirror/auth/evil.pkg.dev/t7-anything"),
    ];
    for url in probes {
        let r = client
            .get(&url)
            .header("authorization", basic())
            .send()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(r.status().as_u16(), 403, "GET {url}\n{}", m.logs());
    }
    let quay_paths: Vec<String> =
        m.up.access_log(Front::Quay)
            .iter()
            .map(|e| e.path().to_string())
            .filter(|p| p.starts_with("/api/") || p.contains("_catalog") || p.contains("INVALID"))
            .collect();
    assert!(
        quay_paths.is_empty(),
        "quay.io was reached at {quay_paths:?}"
    );
    let leaked: Vec<String> = h
        .seen()
        .iter()
        .filter(|s| s.path().contains("_catalog") || s.path().starts_with("/t7-"))
        .map(|s| format!("{} {}", s.header("host").unwrap_or(""), s.target))
        .collect();
    assert!(leaked.is_empty(), "the fixture was reached at {leaked:?}");
    normal_pull_through(m);
}

/// Finding 3: Basic credentials sent to the mirror's docker.io realm with a quay.io scope,
/// or in host mode to `docker.<suffix>/_mirror/auth/quay.io/…`, never reach quay.io's
/// realm. They do reach the default registry's realm (path prefix: one credential domain)
/// and quay's realm when the client addressed quay in host mode.
#[test]
fn client_credentials_reach_only_the_realm_of_the_registry_addressed() {
    let m = mirror();
    let client = m.client();
    let hub = challenge_of(&client, &m.url("/v2/"));
    let hub_realm = param(&hub, "realm").expect("hub realm");
    let quay = challenge_of(&client, &m.host_url("quay", "/v2/"));
    let quay_realm = param(&quay, "realm").expect("quay realm");
    let sends = [
        (
            hub_realm.clone(),
            "registry.docker.io",
            "repository:quay.io/t8-cred/a:pull",
        ),
        (
            m.host_url("docker", "/_mirror/auth/quay.io/v2/auth"),
            "quay.io",
            "repository:t8-cred/b:pull",
        ),
        (hub_realm, "registry.docker.io", "repository:t8-cred/c:pull"),
        (quay_realm, "quay.io", "repository:t8-cred/d:pull"),
    ];
    for (realm, service, scope) in &sends {
        let _ = client
            .get(realm)
            .query(&[("service", *service), ("scope", *scope)])
            .header("authorization", basic())
            .send();
    }
    let reqs = m.up.token.requests();
    let with = |name: &str| -> Vec<_> {
        reqs.iter()
            .filter(|r| r.scopes.iter().any(|s| s.contains(name)))
            .cloned()
            .collect()
    };
    for name in ["t8-cred/a", "t8-cred/b"] {
        let to_quay: Vec<_> = with(name)
            .into_iter()
            .filter(|r| r.host == "quay.io" && r.authorization)
            .collect();
        assert!(
            to_quay.is_empty(),
            "credentials for {name} reached quay.io's realm: {to_quay:?}"
        );
    }
    assert!(
        with("t8-cred/c")
            .iter()
            .any(|r| r.host == "auth.docker.io" && r.user.as_deref() == Some(PUSH_USER)),
        "the default registry's realm did not get the client's credentials: {:?}",
        with("t8-cred/c")
    );
    assert!(
        with("t8-cred/d")
            .iter()
            .any(|r| r.host == "quay.io" && r.user.as_deref() == Some(PUSH_USER)),
        "quay.io's realm did not get the credentials of a client that addressed quay: {:?}",
        with("t8-cred/d")
    );
    normal_pull_through(m);
}

/// Finding 4: a signed redirect to ghcr.io's CDN followed with credentials the upstream
/// never saw: the same token spelled `bearer`, a fresh token, Basic credentials, a forged
/// token, and a token on a URL signed for an anonymous request. The CDN gets none.
#[test]
fn redirect_targets_get_no_credential() {
    let m = mirror();
    let h = ghcr();
    let repo = "hostile/t9";
    let image = TinyImage::new("1", 19, 65536);
    ghcr_image_with_cdn(h, repo, "t9", &image);
    // The config blob redirects anonymous requests.
    let (config_digest, config) = image.blobs[0].clone();
    let config_cdn = format!("/t9/{}", config_digest.trim_start_matches("sha256:"));
    h.on(
        Some(GHCR),
        &format!("/v2/{repo}/blobs/{config_digest}"),
        Action::redirect(&format!("https://{GHCR_CDN}{config_cdn}?sig=anon")),
    );
    h.on(
        Some(GHCR_CDN),
        &config_cdn,
        Action::reply(200, &[], config.clone()),
    );

    let client = m.client();
    let challenge = challenge_of(&client, &m.host_url("ghcr", "/v2/"));
    let scope = format!("repository:{repo}:pull");
    let tok = token(&client, &challenge, &scope);
    let fresh = token(&client, &challenge, &scope);
    let (d, layer) = image.layer();
    let location = |path: &str, auth: Option<&str>| -> String {
        let mut req = client.get(m.host_url("ghcr", path));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().expect("blob GET");
        assert_eq!(r.status().as_u16(), 307, "blob GET {path}\n{}", m.logs());
        r.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("Location")
            .to_string()
    };
    let signed = location(
        &format!("/v2/{repo}/blobs/{d}"),
        Some(&format!("Bearer {tok}")),
    );
    let anon = location(&format!("/v2/{repo}/blobs/{config_digest}"), None);
    let abs = |l: &str| {
        if l.starts_with('/') {
            m.host_url("ghcr", l)
        } else {
            l.to_string()
        }
    };
    let follow = |url: &str, auth: &str, want: &[u8]| {
        let r = client
            .get(abs(url))
            .header("authorization", auth)
            .send()
            .expect("follow");
        let status = r.status().as_u16();
        let body = r.bytes().unwrap_or_default();
        assert_eq!(status, 200, "following {url} with `{auth}`\n{}", m.logs());
        assert_eq!(&body[..], want);
    };
    for auth in [
        format!("bearer {tok}"),
        format!("Bearer {fresh}"),
        basic(),
        "Bearer forged-by-the-client".to_string(),
    ] {
        follow(&signed, &auth, layer);
    }
    follow(&anon, &format!("Bearer {tok}"), &config);
    let at_cdn = h
        .seen()
        .into_iter()
        .filter(|s| s.host() == GHCR_CDN && s.path().starts_with("/t9/"))
        .collect::<Vec<_>>();
    assert_eq!(at_cdn.len(), 5, "every follow reached the CDN: {at_cdn:?}");
    for s in at_cdn {
        assert!(
            s.header("authorization").is_none(),
            "the CDN got `Authorization: {}` on {}",
            s.header("authorization").unwrap_or(""),
            s.target
        );
    }
    normal_pull_through(m);
}

/// Hostile `Location`s from ghcr.io (siblings of finding 5 on the filter side): to a
/// non-allowlisted `http://127.0.0.1:<port>`, an https → http downgrade to its own CDN,
/// and hosts that only look like its CDN. The mirror signs none of them and passes none on:
/// the client gets a 502, no mirror URL ever fetches them, and Envoy never contacts them.
#[test]
fn hostile_locations_are_refused() {
    let m = mirror();
    let h = ghcr();
    let repo = "hostile/t15";
    let challenge = ghcr_challenge(repo);
    let locations = [
        h.canary_url("/canary/t15"),
        format!("http://{GHCR_CDN}/t15/downgrade"),
        format!("https://{GHCR_CDN}.evil.example/t15/suffix"),
        "https://evil.example/t15/other".to_string(),
    ];
    let client = m.client();
    let ping = challenge_of(&client, &m.host_url("ghcr", "/v2/"));
    let tok = token(&client, &ping, &format!("repository:{repo}:pull"));
    for (i, loc) in locations.iter().enumerate() {
        let d = mirror_tests::digest_of(&[i as u8]);
        h.on(
            Some(GHCR),
            &format!("/v2/{repo}/blobs/{d}"),
            Action::gated(&challenge, Action::redirect(loc)),
        );
        let r = client
            .get(m.host_url("ghcr", &format!("/v2/{repo}/blobs/{d}")))
            .header("authorization", format!("Bearer {tok}"))
            .send()
            .expect("blob GET");
        // Refused, not passed on: a client following it would take whatever it sends the
        // mirror (a login in a custom header survives cross-host redirects) to that host.
        assert!(
            r.headers().get("location").is_none(),
            "the mirror passed on `{loc}`"
        );
        assert_eq!(r.status().as_u16(), 502, "`{loc}`");
        let body = r.text().expect("body");
        assert!(
            body.contains("\"UNAVAILABLE\""),
            "an OCI error for `{loc}`: {body}"
        );
    }
    let reached: Vec<_> = h
        .seen()
        .into_iter()
        .filter(|s| s.path().starts_with("/canary/t15") || s.path().starts_with("/t15/"))
        .collect();
    assert!(
        reached.is_empty(),
        "hostile Locations were fetched: {reached:?}"
    );
    normal_pull_through(m);
}

/// Finding 8: a client pulling from ghcr.io through the mirror while sending its own
/// internal-looking headers. Neither those nor the mirror's own reach the realm, the
/// registry or the CDN.
#[test]
fn internal_headers_stay_inside_the_mirror() {
    let m = mirror();
    let h = ghcr();
    let repo = "hostile/t10";
    let image = TinyImage::new("1", 20, 8192);
    ghcr_image_with_cdn(h, repo, "t10", &image);
    let client = m.client();
    let spoofed = [
        ("x-forwarded-for", "203.0.113.7"),
        ("x-request-id", "client-chosen-id"),
        ("x-mirror-registry", "quay.io"),
        ("x-envoy-external-address", "203.0.113.8"),
    ];
    let get = |url: &str, auth: Option<&str>| {
        let mut req = client.get(url);
        for (k, v) in spoofed {
            req = req.header(k, v);
        }
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"))
    };
    let challenge = get(&m.host_url("ghcr", "/v2/"), None)
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .expect("challenge")
        .to_string();
    let realm = param(&challenge, "realm").expect("realm");
    let r = get(
        &format!("{realm}?service={GHCR}&scope=repository:{repo}:pull"),
        None,
    );
    let v: serde_json::Value = r.json().unwrap_or_default();
    let tok = v["token"].as_str().expect("token").to_string();
    let auth = format!("Bearer {tok}");
    let r = get(
        &m.host_url("ghcr", &format!("/v2/{repo}/manifests/1")),
        Some(&auth),
    );
    assert_eq!(r.status().as_u16(), 200, "manifest\n{}", m.logs());
    let (d, layer) = image.layer();
    let r = get(
        &m.host_url("ghcr", &format!("/v2/{repo}/blobs/{d}")),
        Some(&auth),
    );
    let loc = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("signed Location")
        .to_string();
    let loc = if loc.starts_with('/') {
        m.host_url("ghcr", &loc)
    } else {
        loc
    };
    let body = get(&loc, None).bytes().unwrap_or_default();
    assert_eq!(&body[..], &layer[..], "the blob from the CDN");

    let arrived: Vec<_> = h
        .seen()
        .into_iter()
        .filter(|s| {
            s.target.contains("hostile/t10")
                || s.target.contains("hostile%2Ft10")
                || s.path().starts_with("/t10/")
        })
        .collect();
    for (host, what) in [(GHCR, "/token"), (GHCR, "/v2/"), (GHCR_CDN, "/t10/")] {
        assert!(
            arrived
                .iter()
                .any(|s| s.host() == host && s.path().starts_with(what)),
            "no request for {host}{what} arrived: {arrived:?}"
        );
    }
    for s in &arrived {
        for name in INTERNAL_HEADERS {
            assert!(
                s.header(name).is_none(),
                "{} {}{} carried `{name}: {}`",
                s.method,
                s.host(),
                s.target,
                s.header(name).unwrap_or("")
            );
        }
    }
    normal_pull_through(m);
}

/// Finding 9: registry.k8s.io answers a 200 and a 404 carrying a challenge that names
/// another realm path, a 200 with a 40 KiB one, and a 401 with a malformed challenge.
/// Token requests that arrive at the docker.io realm with a registry.k8s.io scope still
/// go to the realm of registry.k8s.io's own well-formed 401.
#[test]
fn a_hostile_challenge_does_not_move_the_realm() {
    let m = mirror();
    let h = hostile::shared();
    h.on(
        Some(K8S),
        "/v2/",
        Action::reply(
            401,
            &[(
                "www-authenticate",
                &bearer("https://registry.k8s.io/token", K8S),
            )],
            "",
        ),
    );
    h.on(
        Some(K8S),
        "/token",
        Action::Token {
            ns: "k8s".into(),
            expires_in: "300".into(),
        },
    );
    h.on(
        Some(K8S),
        "/stolen",
        Action::Token {
            ns: "stolen".into(),
            expires_in: "300".into(),
        },
    );
    let stolen = bearer("https://registry.k8s.io/stolen", "evil");
    let image = TinyImage::new("1", 21, 1024);
    h.on(
        Some(K8S),
        "/v2/hostile/t11/manifests/ok",
        Action::reply(
            200,
            &[
                ("www-authenticate", &stolen),
                ("content-type", mirror_tests::images::MT_MANIFEST),
            ],
            image.manifest.clone(),
        ),
    );
    h.on(
        Some(K8S),
        "/v2/hostile/t11/manifests/missing",
        Action::reply(404, &[("www-authenticate", &stolen)], ""),
    );
    h.on(
        Some(K8S),
        "/v2/hostile/t11/manifests/malformed",
        Action::reply(
            401,
            &[(
                "www-authenticate",
                "Bearer realm=\"https://registry.k8s.io/stolen",
            )],
            "",
        ),
    );
    // 40 KiB: under Envoy's response header limit, so it reaches the filter.
    let enormous = format!("{stolen},scope=\"{}\"", "a".repeat(40 * 1024));
    h.on(
        Some(K8S),
        "/v2/hostile/t11/manifests/enormous",
        Action::reply(200, &[("www-authenticate", &enormous)], ""),
    );
    let client = m.client();
    challenge_of(&client, &m.host_url("k8s", "/v2/"));
    for tag in ["ok", "missing", "malformed", "enormous"] {
        let _ = client
            .get(m.host_url("k8s", &format!("/v2/hostile/t11/manifests/{tag}")))
            .send();
    }
    let hub = challenge_of(&client, &m.url("/v2/"));
    let hub_realm = param(&hub, "realm").expect("hub realm");
    let r = client
        .get(&hub_realm)
        .query(&[
            ("service", "registry.docker.io"),
            ("scope", "repository:registry.k8s.io/hostile/t11:pull"),
        ])
        .send()
        .expect("token request");
    assert_eq!(
        r.status().as_u16(),
        200,
        "token for a registry.k8s.io scope\n{}",
        m.logs()
    );
    let stolen_hits = h.seen_under("/stolen");
    assert!(
        stolen_hits.is_empty(),
        "a hostile challenge moved registry.k8s.io's realm: {stolen_hits:?}"
    );
    assert!(
        h.seen_under("/token")
            .iter()
            .any(|s| s.host() == K8S && s.target.contains("t11")),
        "the token request did not reach registry.k8s.io's own realm\n{}",
        m.logs()
    );
    normal_pull_through(m);
}

/// Finding 10: the operator configures `public_url` (the mirror behind a front on
/// `https://127.0.0.1:<front port>`). A client sending a Host the mirror does not serve
/// gets 421 for a ping, a realm URL and a blob; served Hosts get challenge realms and
/// signed Locations built from the configuration, never from the request.
#[test]
fn with_public_url_hosts_the_mirror_does_not_serve_get_421() {
    let h = ghcr();
    let repo = "hostile/t12";
    let image = TinyImage::new("1", 22, 2048);
    ghcr_image_with_cdn(h, repo, "t12", &image);
    let front = Relay::start(SocketAddr::from(([127, 0, 0, 1], 9))).expect("front");
    let port = front.addr.port();
    let public = format!("https://127.0.0.1:{port}");
    let fields = serde_json::json!({ "public_url": public });
    let m = HostileMirror::start_with(
        BTreeMap::new(),
        fields.as_object().cloned().unwrap_or_default(),
    )
    .expect("mirror with public_url");
    front.set_target(SocketAddr::from(([127, 0, 0, 1], m.port())));
    let resolve: Vec<(&str, SocketAddr)> = mirror_tests::MIRROR_HOSTS
        .iter()
        .map(|h| (*h, front.addr))
        .collect();
    let client = m.up.pki.client(&resolve).expect("client");

    // HTTP/1.1: an HTTP/2 client takes `:authority` from the URL and drops a `Host` header.
    let ca = reqwest::Certificate::from_pem(m.up.pki.ca_pem.as_bytes()).expect("test CA");
    let h1 = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .http1_only()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP/1.1 client");
    let evil = "evil.example";
    for path in [
        "/v2/".to_string(),
        "/_mirror/auth/auth.docker.io/token?service=registry.docker.io".to_string(),
        format!("/v2/{repo}/manifests/1?ns={GHCR}"),
    ] {
        let r = h1
            .get(format!("{public}{path}"))
            .header("host", evil)
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status().as_u16();
        let headers = format!("{:?}", r.headers());
        assert_eq!(status, 421, "Host {evil}, {path}\n{}", m.logs());
        assert!(!headers.contains(evil), "Host {evil} reflected: {headers}");
    }

    let realm =
        param(&challenge_of(&client, &format!("{public}/v2/")), "realm").unwrap_or_default();
    assert!(
        realm.starts_with(&format!("{public}/_mirror/auth/")),
        "realm `{realm}` is not built from public_url {public}"
    );
    let ghcr_base = format!("https://ghcr.{}:{port}", mirror_tests::mirror::HOST_SUFFIX);
    let challenge = challenge_of(&client, &format!("{ghcr_base}/v2/"));
    assert!(
        param(&challenge, "realm")
            .is_some_and(|r| r.starts_with(&format!("{ghcr_base}/_mirror/auth/"))),
        "host-mode realm `{challenge}`"
    );
    let tok = token(&client, &challenge, &format!("repository:{repo}:pull"));
    let (d, layer) = image.layer();
    let r = client
        .get(format!("{ghcr_base}/v2/{repo}/blobs/{d}"))
        .header("authorization", format!("Bearer {tok}"))
        .send()
        .expect("blob GET");
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        location.starts_with(&format!("{ghcr_base}/_mirror/redirect/")),
        "signed Location `{location}` is not built from the configuration"
    );
    let body = client
        .get(&location)
        .send()
        .and_then(|r| r.bytes())
        .expect("follow");
    assert_eq!(&body[..], &layer[..]);
    normal_pull_at(&m, port);
}

/// Finding 11: Docker Hub's upstream goes down. The mirror's `/v2/` still answers with
/// Docker Hub's last known challenge, and skopeo pulls a quay.io image by path prefix
/// (ping first, then the realm from that challenge); with Hub back, Hub pulls work.
#[test]
fn the_v2_ping_answers_while_docker_hub_is_down() {
    let up = mirror_tests::upstreams::shared();
    let relay = Relay::start(up.nginx.hub_front).expect("relay");
    let m = HostileMirror::start(BTreeMap::from([(HUB_HOST.to_string(), relay.addr)]))
        .expect("mirror with Hub behind a relay");
    let client = m.client();
    let live = challenge_of(&client, &m.url("/v2/"));
    relay.set_up(false);
    let r = client.get(m.url("/v2/")).send().expect("ping");
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert_eq!(
        (status, param(&challenge, "realm")),
        (401, param(&live, "realm")),
        "`/v2/` with Docker Hub down (live challenge was `{live}`)\n{}",
        m.logs()
    );
    let etcd = &up.images.etcd;
    let opts = SkopeoPull {
        all: false,
        cert_dir: Some(up.pki.cert_dir.clone()),
        registries_conf: None,
    };
    let reference = format!("127.0.0.1:{}/quay.io/{}:{}", m.port(), etcd.name, etcd.tag);
    match clients::skopeo_pull(&reference, &opts) {
        Ok(p) => p.assert_is(etcd, false),
        Err(e) => panic!("path-prefix pull with Docker Hub down: {e:#}\n{}", m.logs()),
    }
    relay.set_up(true);
    normal_pull_through(&m);
}

/// Finding 14: an operator warms two images of one repository from a registry whose
/// tokens live 2 s, the first with a layer that takes 3 s. `regmirror warm` gets a fresh
/// token for the second image instead of sending the expired one.
#[test]
fn warm_fetches_a_fresh_token_after_the_old_one_expired() {
    let h = hostile::shared();
    h.on(
        None,
        "/token/t14",
        Action::Token {
            ns: "t14".into(),
            expires_in: "2".into(),
        },
    );
    let challenge = bearer(&format!("{}/token/t14", h.url()), "hostile");
    let first = TinyImage::new("1", 24, 300 * 1024);
    let second = TinyImage::new("2", 25, 4096);
    h.serve_image(None, "t14/app", &first, Some(&challenge), false);
    h.serve_image(None, "t14/app", &second, Some(&challenge), false);
    let (d, bytes) = first.layer();
    h.on(
        None,
        &format!("/v2/t14/app/blobs/{d}"),
        Action::gated(
            &challenge,
            Action::body(
                200,
                &[("content-type", "application/octet-stream")],
                Body::Slow {
                    data: bytes.clone(),
                    bytes_per_sec: 100 * 1024,
                },
            ),
        ),
    );
    let bin = mirror_tests::build::regmirror().expect("regmirror binary");
    let out = std::process::Command::new(bin)
        .arg("warm")
        .arg("--mirror")
        .arg(h.url())
        .arg("--ca")
        .arg(&h.pki.bundle)
        .args([
            "--quiet",
            "--jobs",
            "1",
            "hostile=t14/app:1",
            "hostile=t14/app:2",
        ])
        .env_remove("REGMIRROR_MIRROR")
        .output()
        .expect("regmirror warm runs");
    assert!(
        out.status.success(),
        "regmirror warm failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        h.seen_under("/token/t14").len() >= 2,
        "warm never asked for a fresh token"
    );
    let second_layer = &second.layer().0;
    assert!(
        h.seen_under(&format!("/v2/t14/app/blobs/{second_layer}"))
            .iter()
            .any(|s| s.header("authorization").is_some()),
        "the second image's layer was not fetched"
    );
    // The token the slow layer went out with had expired by then: nothing of the second
    // image was asked for with it.
    let first_token = h
        .seen_under(&format!("/v2/t14/app/blobs/{d}"))
        .iter()
        .find_map(|s| s.header("authorization").map(str::to_owned))
        .expect("the first layer was fetched with a token");
    for path in [
        "/v2/t14/app/manifests/2".to_string(),
        format!("/v2/t14/app/blobs/{second_layer}"),
    ] {
        for s in h.seen_under(&path) {
            assert_ne!(
                s.header("authorization"),
                Some(first_token.as_str()),
                "{path} was asked for with the expired token"
            );
        }
    }
}
