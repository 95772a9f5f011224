//! Private images through the cache (issue 12): gcr.io is cached with
//! `client_auth = "upstream"`, so every client logs in at the gcr-like upstream's own token
//! service through the mirror, and cache-service checks each client's token against the
//! upstream before it serves anything it holds.
//!
//! The lab token service knows `alice` (granted `private/secret`, `private/revocable`,
//! `private/node-agent`), `bob` (a valid login, no grant) and anonymous clients (public
//! repositories only). The gcr front's access log shows what reached the upstream: content
//! fetches (`GET` manifests and blobs) and the cache's authorization checks (`HEAD`s).

use mirror_tests::clients;
use mirror_tests::images::SeededImage;
use mirror_tests::private::{self, Outage, PrivateMirror, UpstreamCounts};
use mirror_tests::token_server::{ALICE, ALICE_PASSWORD, BOB, BOB_PASSWORD};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn alice() -> String {
    format!("{ALICE}:{ALICE_PASSWORD}")
}

fn bob() -> String {
    format!("{BOB}:{BOB_PASSWORD}")
}

fn ok<T>(p: &PrivateMirror, r: anyhow::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e:#}\n{}", p.logs()),
    }
}

/// A refused pull: it failed, and on authorization (401/403 from the mirror), not on
/// anything else.
fn assert_denied(p: &PrivateMirror, who: &str, r: anyhow::Result<clients::PulledDir>) {
    let error = match r {
        Ok(_) => panic!("{who} pulled a private image\n{}", p.logs()),
        Err(e) => format!("{e:#}"),
    };
    let lower = error.to_lowercase();
    assert!(
        [
            "unauthorized",
            "denied",
            "authentication required",
            "401",
            "403"
        ]
        .iter()
        .any(|s| lower.contains(s)),
        "{who}'s pull failed, but not on authorization:\n{error}\n{}",
        p.logs()
    );
}

/// Each blob of `image` fetched from the upstream exactly once since its `from`-th request.
fn assert_fetched_once(p: &PrivateMirror, image: &SeededImage, from: usize) {
    let log = p.upstream_requests(&image.name);
    let mut fetches: BTreeMap<String, usize> = BTreeMap::new();
    for e in log.iter().skip(from) {
        if e.method == "GET" && e.status() == 200 {
            if let Some((_, digest)) = e.path().split_once("/blobs/") {
                *fetches.entry(digest.to_string()).or_default() += 1;
            }
        }
    }
    let want: BTreeMap<String, usize> = image.all_blobs().into_iter().map(|b| (b, 1)).collect();
    assert_eq!(fetches, want, "blob fetches at the upstream\n{}", p.logs());
    assert!(
        log.iter().all(|e| e.ua.starts_with("regmirror/")),
        "only the cache-service talks to the upstream: {log:#?}"
    );
}

/// What a client does on a 401: read the challenge the mirror relayed, ask its (rewritten)
/// realm for a token with `credentials` (`USER:PASSWORD`, None: anonymous), return the
/// token. Also checks the realm stayed on the mirror.
fn login(p: &PrivateMirror, repository: &str, credentials: Option<&str>) -> String {
    let m = &p.mirror;
    let client = m.client();
    let url = format!("https://{}/v2/{repository}/manifests/1", m.host("gcr"));
    let resp = ok(p, client.get(&url).send().map_err(Into::into));
    assert_eq!(
        resp.status(),
        401,
        "an anonymous request is challenged\n{}",
        p.logs()
    );
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let param = |key: &str| {
        challenge
            .split(&format!("{key}=\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(str::to_string)
    };
    let realm = param("realm").unwrap_or_default();
    assert!(
        realm.starts_with(&format!("https://{}/_mirror/auth/", m.host("gcr"))),
        "the upstream's realm is rewritten to the mirror: {challenge}"
    );
    let mut req = client.get(&realm).query(&[
        ("service", param("service").unwrap_or_default()),
        ("scope", param("scope").unwrap_or_default()),
    ]);
    if let Some((user, password)) = credentials.and_then(|l| l.split_once(':')) {
        req = req.basic_auth(user, Some(password));
    }
    let resp = ok(p, req.send().map_err(Into::into));
    assert_eq!(
        resp.status(),
        200,
        "token request through the mirror\n{}",
        p.logs()
    );
    let body: serde_json::Value = ok(p, resp.json().map_err(Into::into));
    match body["token"].as_str() {
        Some(token) if !token.is_empty() => token.to_string(),
        _ => panic!("no token in the realm's answer: {body}"),
    }
}

/// cache-service's `/metrics`: `name{registry="gcr.io"[,label="value"]}` → value.
fn metric(p: &PrivateMirror, series: &str) -> u64 {
    let text = ok(
        p,
        reqwest::blocking::get(format!("http://{}/metrics", p.cache_addr))
            .and_then(|r| r.text())
            .map_err(Into::into),
    );
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

const DENIED: &str = r#"regmirror_authorization_checks_total{registry="gcr.io",result="denied"}"#;
const ALLOWED: &str = r#"regmirror_authorization_checks_total{registry="gcr.io",result="allowed"}"#;
const HITS: &str = r#"regmirror_authorization_cache_hits_total{registry="gcr.io"}"#;

/// `GET <path>` on the gcr host of the mirror with `token`: (status, body).
fn get(p: &PrivateMirror, path: &str, token: &str) -> (u16, Vec<u8>) {
    let url = format!("https://{}{path}", p.mirror.host("gcr"));
    let resp = ok(
        p,
        p.mirror
            .client()
            .get(url)
            .bearer_auth(token)
            .header(
                "accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
            )
            .send()
            .map_err(Into::into),
    );
    let status = resp.status().as_u16();
    (status, resp.bytes().map(|b| b.to_vec()).unwrap_or_default())
}

/// `GET /v2/<repository>/manifests/<digest>` on the mirror with `token`.
fn get_manifest(p: &PrivateMirror, image: &SeededImage, token: &str) -> (u16, Vec<u8>) {
    get(
        p,
        &format!("/v2/{}/manifests/{}", image.name, image.digest),
        token,
    )
}

/// `GET /v2/<repository>/blobs/<digest>` on the mirror with `token`.
fn get_blob(p: &PrivateMirror, image: &SeededImage, digest: &str, token: &str) -> (u16, Vec<u8>) {
    get(p, &format!("/v2/{}/blobs/{digest}", image.name), token)
}

#[test]
fn alice_pulls_her_private_image_and_bob_and_anonymous_are_denied_although_it_is_cached() {
    let p = private::shared();
    let image = &p.mirror.up.images.secret;
    let reference = p.reference(image);

    // alice logs in with skopeo's --src-creds: the upstream's token service issues her
    // token through the mirror, the cache checks it and fetches the image once.
    let start = p.upstream_requests(&image.name).len();
    ok(p, p.skopeo_pull(&reference, Some(&alice()))).assert_is(image, false);
    assert_fetched_once(p, image, start);

    // bob and an anonymous client get nothing, and the upstream is not asked for content.
    let mark = p.upstream_requests(&image.name).len();
    let denied = metric(p, DENIED);
    assert_denied(p, "bob", p.skopeo_pull(&reference, Some(&bob())));
    assert_denied(p, "anonymous", p.skopeo_pull(&reference, None));
    // Not even a blob by digest, which the cache holds: bob's token does not open it.
    let bobs = login(p, &image.name, Some(&bob()));
    let layer = image.first_layer();
    let (status, body) = get_blob(p, image, &layer, &bobs);
    assert!(
        matches!(status, 401 | 403),
        "bob's blob GET: {status}\n{}",
        p.logs()
    );
    assert_ne!(mirror_tests::digest_of(&body), layer, "bob read the layer");
    let after = UpstreamCounts::since(&p.upstream_requests(&image.name), mark);
    assert_eq!(
        (after.manifest_gets, after.blob_gets),
        (0, 0),
        "denied clients made the cache fetch content\n{}",
        p.logs()
    );
    // Operators see the denials (other stories share this cache: lower bounds).
    assert!(metric(p, DENIED) >= denied + 2, "{DENIED}\n{}", p.logs());

    // alice again: everything from the cache, one authorization check for her new token.
    let mark = p.upstream_requests(&image.name).len();
    let (allowed, hits) = (metric(p, ALLOWED), metric(p, HITS));
    ok(p, p.skopeo_pull(&reference, Some(&alice()))).assert_is(image, false);
    assert!(metric(p, ALLOWED) > allowed, "{ALLOWED}\n{}", p.logs());
    // The config and layers were served on the decision the manifest request made.
    assert!(
        metric(p, HITS) >= hits + image.all_blobs().len() as u64,
        "{HITS}\n{}",
        p.logs()
    );
    let again = UpstreamCounts::since(&p.upstream_requests(&image.name), mark);
    assert_eq!(
        again,
        UpstreamCounts {
            manifest_gets: 0,
            blob_gets: 0,
            heads: 1
        },
        "alice's second pull: no content from upstream, one authorization check\n{}",
        p.logs()
    );
}

#[test]
fn a_public_image_is_fetched_once_for_anonymous_clients_and_alice() {
    let p = private::shared();
    let image = &p.mirror.up.images.distroless;
    let reference = p.reference(image);
    let start = p.upstream_requests(&image.name).len();
    ok(p, p.skopeo_pull(&reference, None)).assert_is(image, false);
    ok(p, p.skopeo_pull(&reference, Some(&alice()))).assert_is(image, false);
    assert_fetched_once(p, image, start);
}

/// alice's access revoked at the token service (a cache of its own with a 4 s decision
/// time): her next login yields a token without `pull`, which the cache checks like any new
/// credential, so she is denied at once and certainly after the decision time. A token she
/// got before stays valid at the registry until it expires (the upstream's rule); the cache
/// asks the upstream again with it once the decision time is over.
#[test]
fn revoking_alices_access_denies_her_after_the_decision_time() {
    const TTL: u64 = 4;
    let up = mirror_tests::upstreams::shared();
    let p =
        PrivateMirror::start(up, Some(TTL), up.nginx.gcr_front).unwrap_or_else(|e| panic!("{e:#}"));
    let p = &p;
    let image = &up.images.revocable;
    let reference = p.reference(image);
    ok(p, p.skopeo_pull(&reference, Some(&alice()))).assert_is(image, false);

    // A token alice holds from before the revocation: the cache reuses its decision for
    // the TTL, then asks the upstream again (one more HEAD there).
    let token = login(p, &image.name, Some(&alice()));
    let checks =
        |p: &PrivateMirror| UpstreamCounts::since(&p.upstream_requests(&image.name), 0).heads;
    // The decision is made during this request, so no earlier than `decided`.
    let decided = Instant::now();
    let (status, body) = get_manifest(p, image, &token);
    assert_eq!(status, 200, "{}", p.logs());
    assert_eq!(mirror_tests::digest_of(&body), image.digest);
    let checked = checks(p);

    up.token.revoke(ALICE, &image.name);
    let revoked = Instant::now();
    get_manifest(p, image, &token);
    // Milliseconds after the decision; a stall of the whole TTL fails here rather than
    // leaving the reuse unchecked.
    assert!(
        decided.elapsed() < Duration::from_secs(TTL),
        "the second request came {:?} after the decision, past the TTL: reuse not checked",
        decided.elapsed()
    );
    assert_eq!(
        checks(p),
        checked,
        "a decision within its TTL is reused\n{}",
        p.logs()
    );
    // After the TTL the same token is checked upstream again. (The upstream still accepts
    // it: a registry token stays valid until it expires, 300 s here, which is the
    // upstream's rule; what the cache owns is not trusting its own decision longer.)
    let deadline = Instant::now() + Duration::from_secs(TTL + 10);
    while checks(p) == checked {
        assert!(
            Instant::now() < deadline,
            "no new authorization check {}s after the decision\n{}",
            TTL + 10,
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
        get_manifest(p, image, &token);
    }

    // alice's next login carries no pull for the repository: she is denied, at the
    // latest once the decision time has passed.
    let deadline = revoked + Duration::from_secs(TTL + 10);
    loop {
        match p.skopeo_pull(&reference, Some(&alice())) {
            Err(e) => {
                assert_denied(p, "alice after revocation", Err(e));
                break;
            }
            Ok(_) => assert!(
                Instant::now() < deadline,
                "alice still pulls {}s after her access was revoked\n{}",
                TTL + 10,
                p.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Her fresh token for the repository opens nothing either.
    let fresh = login(p, &image.name, Some(&alice()));
    let (status, _) = get_manifest(p, image, &fresh);
    assert!(matches!(status, 401 | 403), "{status}\n{}", p.logs());
    up.token.grant(ALICE, &image.name);
}

/// The upstream down: the cache serves what it holds only to a client whose authorization
/// it decided before (within the decision time); nobody else gets content, not even alice
/// with a token the cache has not checked.
#[test]
fn with_the_upstream_down_only_a_client_with_a_held_decision_is_served() {
    let up = mirror_tests::upstreams::shared();
    let outage = Outage::start(up.nginx.gcr_front).unwrap_or_else(|e| panic!("{e:#}"));
    let p = PrivateMirror::start(up, None, outage.addr).unwrap_or_else(|e| panic!("{e:#}"));
    let p = &p;
    let image = &up.images.node_agent;
    let verified = |(status, body): (u16, Vec<u8>), digest: &str| {
        assert_eq!(status, 200, "{digest}\n{}", p.logs());
        assert_eq!(mirror_tests::digest_of(&body), digest);
    };
    // Logins while the upstream is up; alice reads the image with one of her tokens.
    let held = login(p, &image.name, Some(&alice()));
    let unchecked = login(p, &image.name, Some(&alice()));
    let bobs = login(p, &image.name, Some(&bob()));
    verified(get_manifest(p, image, &held), &image.digest);
    for blob in image.all_blobs() {
        verified(get_blob(p, image, &blob, &held), &blob);
    }

    outage.set_down(true);
    verified(get_manifest(p, image, &held), &image.digest);
    for blob in image.all_blobs() {
        verified(get_blob(p, image, &blob, &held), &blob);
    }
    let layer = image.first_layer();
    for (who, token) in [("alice's unchecked token", &unchecked), ("bob", &bobs)] {
        let (status, body) = get_blob(p, image, &layer, token);
        assert_eq!(
            status,
            503,
            "{who} while the upstream is down\n{}",
            p.logs()
        );
        assert_ne!(
            mirror_tests::digest_of(&body),
            layer,
            "{who} read the layer"
        );
        assert_eq!(get_manifest(p, image, token).0, 503, "{who}\n{}", p.logs());
    }

    // Back up: alice's other token is checked and served, bob is denied.
    outage.set_down(false);
    verified(get_manifest(p, image, &unchecked), &image.digest);
    let (status, _) = get_blob(p, image, &layer, &bobs);
    assert!(matches!(status, 401 | 403), "bob: {status}\n{}", p.logs());
}

#[test]
fn containerd_pulls_a_private_image_with_alices_login_and_not_with_bobs() {
    let p = private::shared();
    let m = &p.mirror;
    let ctrd = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    ok(
        p,
        clients::write_hosts_toml(hosts.path(), "gcr.io", &m.addr(), &m.up.pki.ca),
    );
    let image = &m.up.images.node_agent;
    let reference = format!("gcr.io/{}:{}", image.name, image.tag);
    let ns = |who: &str| format!("private-{who}-{}", hex::encode(rand::random::<[u8; 4]>()));

    let alices = ns("alice");
    ok(
        p,
        ctrd.pull(&alices, hosts.path(), &reference, &["--user", &alice()]),
    );
    assert_eq!(ok(p, ctrd.image_digest(&alices, &reference)), image.digest);
    for d in image.all_blobs() {
        ok(p, ctrd.verify_content(&alices, &d));
    }

    for (who, extra) in [
        ("bob", vec!["--user".to_string(), bob()]),
        ("anonymous", vec![]),
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let r = ctrd.pull(&ns(who), hosts.path(), &reference, &extra);
        let error = match r {
            Ok(out) => panic!(
                "{who} pulled {reference} with containerd: {out}\n{}",
                p.logs()
            ),
            Err(e) => format!("{e:#}").to_lowercase(),
        };
        assert!(
            ["unauthorized", "denied", "401", "403"]
                .iter()
                .any(|s| error.contains(s)),
            "{who}'s containerd pull failed, but not on authorization:\n{error}"
        );
    }
}

/// podman, CRI-O, skopeo: the auth.json `regmirror client-config podman --registry-login`
/// writes holds alice's login for the mirror host; skopeo pulls with a path prefix on the
/// shared host, where `forward_client_credentials = true` lets the login reach gcr's realm.
#[test]
fn skopeo_pulls_with_the_auth_json_client_config_writes() {
    let p = private::shared();
    let m = &p.mirror;
    let out = tempfile::tempdir().unwrap();
    ok(
        p,
        mirror_tests::proc::run(
            std::process::Command::new(mirror_tests::build::regmirror().unwrap())
                .args(["client-config", "podman", "--mirror"])
                .arg(format!("https://{}", m.addr()))
                .arg("--registries")
                .arg(&p.declaration)
                .arg("--out")
                .arg(out.path())
                .env("REGMIRROR_REGISTRY_LOGIN", alice()),
        ),
    );
    let image = &m.up.images.node_agent;
    let reference = format!("docker://{}/gcr.io/{}:{}", m.addr(), image.name, image.tag);
    let target = mirror_tests::temp_dir("skopeo").unwrap();
    ok(
        p,
        mirror_tests::proc::run(
            std::process::Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--retry-times", "0"])
                .arg("--src-authfile")
                .arg(out.path().join("auth.json"))
                .arg("--src-cert-dir")
                .arg(&m.up.pki.cert_dir)
                .arg(&reference)
                .arg(format!("dir:{}", target.path().display())),
        ),
    );
    ok(p, clients::verify_dir(target)).assert_is(image, false);
}

/// Kubernetes nodes: kubelet asks containerd's CRI plugin to pull, which presents the login
/// of `registry.configs."<mirror>".auth` to the mirror host. A real CRI pull needs kubelet
/// (or crictl), which this machine does not have: the stanza `regmirror client-config`
/// writes is checked as containerd reads it (TOML keys), and the same login is what the
/// `ctr --user` story above proves the mirror accepts.
#[test]
fn client_config_writes_the_cri_registry_login_for_kubernetes_nodes() {
    let p = private::shared();
    let m = &p.mirror;
    let out = tempfile::tempdir().unwrap();
    let run = mirror_tests::proc::run(
        std::process::Command::new(mirror_tests::build::regmirror().unwrap())
            .args(["client-config", "containerd", "--mirror"])
            .arg(format!("https://{}", m.addr()))
            .arg("--registries")
            .arg(&p.declaration)
            .arg("--ca")
            .arg(&m.up.pki.ca)
            .arg("--out")
            .arg(out.path())
            .env("REGMIRROR_REGISTRY_LOGIN", alice()),
    );
    let run = ok(p, run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let cri = std::fs::read_to_string(out.path().join("cri-registry-auth.toml"))
        .unwrap_or_else(|e| panic!("no CRI stanza written ({e}); stderr:\n{stderr}"));
    let doc: toml::Value = toml::from_str(&cri).unwrap_or_else(|e| panic!("{e}\n{cri}"));
    let registry = &doc["plugins"]["io.containerd.grpc.v1.cri"]["registry"];
    assert_eq!(
        registry["config_path"].as_str(),
        Some("/etc/containerd/certs.d"),
        "{cri}"
    );
    let auth = &registry["configs"][m.addr().as_str()]["auth"];
    assert_eq!(auth["username"].as_str(), Some(ALICE), "{cri}");
    assert_eq!(auth["password"].as_str(), Some(ALICE_PASSWORD), "{cri}");
    assert!(
        out.path().join("gcr.io/hosts.toml").is_file(),
        "hosts.toml for gcr.io; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("ctr images pull") && stderr.contains("--user"),
        "the note names ctr's login flag:\n{stderr}"
    );
}
