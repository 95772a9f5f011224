//! A user's session through the mirror: Envoy (shipped `envoy/local.yaml`, TLS added)
//! with the wasm filter in front of Docker Hub-like and quay-like upstreams with real
//! token auth. Clients: skopeo and containerd. All tests share one Envoy and one set of
//! upstreams and run in parallel.

use mirror_tests::clients::{self, SkopeoPull};
use mirror_tests::mirror::{self, Mirror};
use mirror_tests::upstreams::{AccessLogEntry, Front};
use mirror_tests::{digest_of, images::SeededImage};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Unwraps with the mirror's logs in the failure message.
fn ok<T>(m: &Mirror, r: anyhow::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e:#}\n{}", m.logs()),
    }
}

fn skopeo(m: &Mirror, reference: &str, all: bool) -> clients::PulledDir {
    let opts = SkopeoPull {
        all,
        cert_dir: Some(m.up.pki.cert_dir.clone()),
        registries_conf: None,
    };
    ok(m, clients::skopeo_pull(reference, &opts))
}

fn unique() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

fn oci_error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("not OCI error JSON ({e}): {body:?}"));
    v["errors"][0]["code"].as_str().unwrap_or("").to_string()
}

// --- skopeo: the three addressing modes -------------------------------------------------

#[test]
fn skopeo_pulls_alpine_in_host_mode() {
    let m = mirror::shared();
    let pulled = skopeo(
        m,
        &format!("{}/library/alpine:3.20", m.host("docker")),
        false,
    );
    pulled.assert_is(&m.up.images.alpine, false);
}

#[test]
fn skopeo_pulls_alpine_with_a_path_prefix() {
    let m = mirror::shared();
    let pulled = skopeo(
        m,
        &format!("{}/docker.io/library/alpine:3.20", m.addr()),
        false,
    );
    pulled.assert_is(&m.up.images.alpine, false);
}

#[test]
fn skopeo_pulls_alpine_from_the_default_registry() {
    let m = mirror::shared();
    let pulled = skopeo(m, &format!("{}/library/alpine:3.20", m.addr()), false);
    pulled.assert_is(&m.up.images.alpine, false);
}

#[test]
fn skopeo_pulls_a_short_name_through_registries_conf() {
    let m = mirror::shared();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("registries.conf");
    clients::write_registries_conf(&conf, "docker.io", &m.addr()).unwrap();
    let opts = SkopeoPull {
        all: false,
        cert_dir: Some(m.up.pki.cert_dir.clone()),
        registries_conf: Some(conf),
    };
    let pulled = ok(m, clients::skopeo_pull("alpine:3.20", &opts));
    pulled.assert_is(&m.up.images.alpine, false);
    // The client named `alpine`; the upstream's token server was asked for library/alpine.
    assert!(
        m.up.token
            .requests()
            .iter()
            .any(|r| r.host == "auth.docker.io"
                && r.path == "/token"
                && r.service.as_deref() == Some("registry.docker.io")
                && r.scopes
                    .iter()
                    .any(|s| s == "repository:library/alpine:pull")),
        "{}",
        m.logs()
    );
}

#[test]
fn skopeo_pulls_a_two_component_hub_name_without_library() {
    let m = mirror::shared();
    let pulled = skopeo(m, &format!("{}/someorg/tool:v1", m.host("docker")), false);
    pulled.assert_is(&m.up.images.tool, false);
    assert!(m
        .up
        .token
        .requests()
        .iter()
        .any(|r| r.scopes.iter().any(|s| s == "repository:someorg/tool:pull")));
}

#[test]
fn skopeo_pulls_quay_etcd_in_host_mode() {
    let m = mirror::shared();
    let etcd = &m.up.images.etcd;
    skopeo(m, &format!("{}/coreos/etcd:v3.5", m.host("quay")), false).assert_is(etcd, false);
    // quay's realm is on quay.io itself: the token came through the quay front.
    assert!(m
        .up
        .access_log(Front::Quay)
        .iter()
        .any(|e| e.path() == "/v2/auth"
            && e.host == "quay.io"
            && e.query_param("scope").as_deref() == Some("repository:coreos/etcd:pull")));
}

/// skopeo (containers/image) learns the realm from its `/v2/` ping, which on
/// `127.0.0.1:PORT` names the default registry's realm (auth.docker.io); it then asks that
/// realm for `repository:quay.io/coreos/etcd:pull` (the client-side name). The filter
/// follows the path-prefix namespace in token requests: the `quay.io/` prefix selects
/// quay.io as the token's registry, the scope becomes `repository:coreos/etcd:pull`, and
/// the request goes to quay's own realm (learned from quay's `/v2/` challenge, kept in
/// shared data) with quay's `service`. Challenges in path-prefix responses name
/// `repository:quay.io/…`, so a retry with the ping-time realm stays right.
/// containerd (realm from the manifest 401, `?ns=`) is unaffected.
#[test]
fn skopeo_pulls_quay_etcd_with_a_path_prefix() {
    let m = mirror::shared();
    let etcd = &m.up.images.etcd;
    skopeo(m, &format!("{}/quay.io/coreos/etcd:v3.5", m.addr()), false).assert_is(etcd, false);
}

#[test]
fn skopeo_pulls_every_platform_of_an_index() {
    let m = mirror::shared();
    let multi: &SeededImage = &m.up.images.multi;
    let pulled = skopeo(m, &format!("{}/library/multi:1", m.addr()), true);
    pulled.assert_is(multi, true);
    assert_eq!(pulled.manifest["manifests"].as_array().unwrap().len(), 2);
}

// --- containerd -------------------------------------------------------------------------

#[test]
fn containerd_pulls_hub_images_through_the_mirror() {
    let m = mirror::shared();
    let c = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    clients::write_hosts_toml(hosts.path(), "docker.io", &m.addr(), &m.up.pki.ca).unwrap();
    let ns = format!("hub-{}", unique());
    for (reference, image) in [
        ("docker.io/library/alpine:3.20", &m.up.images.alpine),
        ("docker.io/library/multi:1", &m.up.images.multi),
    ] {
        ok(m, c.pull(&ns, hosts.path(), reference, &[]));
        assert_eq!(ok(m, c.image_digest(&ns, reference)), image.digest);
        // The platform containerd runs on (linux/amd64) is complete and verified.
        let amd64 = image.platform("amd64").unwrap();
        let content = ok(m, c.content(&ns));
        for d in amd64.blob_digests().iter().chain([&amd64.manifest_digest]) {
            assert!(content.contains(d), "{d} missing from containerd's store");
            ok(m, c.verify_content(&ns, d));
        }
    }
    // containerd sent ?ns=docker.io; the filter removed it before the upstream.
    let hub = m.up.access_log(Front::Hub);
    assert!(hub
        .iter()
        .any(|e| e.path() == "/v2/library/multi/manifests/1"));
    assert!(
        hub.iter().all(|e| e.query_param("ns").is_none()),
        "{hub:#?}"
    );
}

#[test]
fn containerd_pulls_quay_etcd_through_the_mirror() {
    let m = mirror::shared();
    let c = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    clients::write_hosts_toml(hosts.path(), "quay.io", &m.addr(), &m.up.pki.ca).unwrap();
    let ns = format!("quay-{}", unique());
    let reference = "quay.io/coreos/etcd:v3.5";
    ok(m, c.pull(&ns, hosts.path(), reference, &[]));
    let etcd = &m.up.images.etcd;
    assert_eq!(ok(m, c.image_digest(&ns, reference)), etcd.digest);
    for d in etcd.all_blobs() {
        ok(m, c.verify_content(&ns, &d));
    }
}

// --- the protocol by hand: what the mirror tells clients and what upstreams saw ---------

#[test]
fn a_pull_by_hand_stays_on_the_mirror_and_upstreams_see_what_they_expect() {
    let m = mirror::shared();
    let client = m.client();
    let base = m.url("");

    // 1. The challenge names the mirror, not auth.docker.io.
    let resp = client
        .get(format!("{base}/v2/?ns=docker.io"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401, "{}", m.logs());
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    let realm = format!("{base}/_mirror/auth/auth.docker.io/token");
    assert!(
        challenge.contains(&format!("realm=\"{realm}\"")),
        "{challenge}"
    );
    assert!(
        challenge.contains("service=\"registry.docker.io\""),
        "{challenge}"
    );

    // 2. The token comes from the upstream's token server, through the mirror.
    let probe = unique();
    let scope = "repository:library/alpine:pull".to_string();
    let resp = client
        .get(&realm)
        .query(&[
            ("service", "registry.docker.io"),
            ("scope", &scope),
            ("probe", &probe),
        ])
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", m.logs());
    let token: serde_json::Value = resp.json().unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    let seen = m.up.token.requests();
    assert!(seen
        .iter()
        .any(|r| r.host == "auth.docker.io" && r.scopes == [scope.clone()]));

    // 3. Manifest by tag: 200, digest as seeded, ns echoed.
    let alpine = &m.up.images.alpine;
    let resp = client
        .get(format!(
            "{base}/v2/library/alpine/manifests/3.20?ns=docker.io&probe={probe}"
        ))
        .bearer_auth(&token)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", m.logs());
    assert_eq!(
        resp.headers()["docker-content-digest"],
        alpine.digest.as_str()
    );
    assert_eq!(
        resp.headers()
            .get("oci-namespace")
            .map(|v| v.to_str().unwrap()),
        Some("docker.io")
    );
    assert_eq!(digest_of(&resp.bytes().unwrap()), alpine.digest);
    // Route selection followed the rewrite: the client spoke to 127.0.0.1, the hub front
    // got Host registry-1.docker.io over TLS with that SNI, the query minus ns intact.
    let probed = |e: &AccessLogEntry| e.query_param("probe").as_deref() == Some(probe.as_str());
    let hub = m.up.access_log_with(Front::Hub, probed);
    let line = hub
        .iter()
        .find(|e| probed(e))
        .unwrap_or_else(|| panic!("the hub front never saw probe {probe}: {hub:#?}"));
    assert_eq!(line.host, "registry-1.docker.io");
    assert_eq!(line.sni, "registry-1.docker.io");
    assert_eq!(
        line.uri,
        format!("/v2/library/alpine/manifests/3.20?probe={probe}")
    );
    assert!(line.has_authorization());

    // 4. Blob: the upstream's 307 to the CDN becomes a signed URL on the mirror.
    let layer = &alpine.platforms[0].layer_digests[0];
    let resp = client
        .get(format!("{base}/v2/library/alpine/blobs/{layer}"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 307, "{}", m.logs());
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&format!("{base}/_mirror/redirect/docker.io/")),
        "{location}"
    );
    assert!(location.contains(
        "/production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/"
    ));
    // 5. Following it with the same Authorization (as a client that does not drop it on a
    // same-host redirect): the mirror removes it, the CDN sees none.
    let resp = client.get(&location).bearer_auth(&token).send().unwrap();
    assert_eq!(resp.status(), 200, "{}", m.logs());
    assert_eq!(&digest_of(&resp.bytes().unwrap()), layer);
    let hex = layer.trim_start_matches("sha256:");
    let cdn = m.up.access_log(Front::Cdn);
    let got: Vec<_> = cdn.iter().filter(|e| e.uri.contains(hex)).collect();
    assert!(!got.is_empty(), "the CDN never saw {layer}: {cdn:#?}");
    for e in &got {
        assert_eq!(e.method, "GET");
        assert!(
            !e.has_authorization(),
            "Authorization reached the CDN: {e:?}"
        );
        assert!(
            e.query_param("verify").is_some_and(|v| !v.is_empty()),
            "{e:?}"
        );
        assert_eq!(e.host, "production.cloudflare.docker.com");
        assert_eq!(e.status(), 200);
    }
}

#[test]
fn the_cdn_never_sees_authorization_during_client_pulls() {
    let m = mirror::shared();
    skopeo(
        m,
        &format!("{}/library/alpine:3.20", m.host("docker")),
        false,
    );
    let cdn = m.up.access_log(Front::Cdn);
    let layers = &m.up.images.alpine.platforms[0].layer_digests;
    for l in layers {
        let hex = l.trim_start_matches("sha256:");
        assert!(
            cdn.iter().any(|e| e.uri.contains(hex) && e.status() == 200),
            "no CDN GET for {l}"
        );
    }
    assert!(cdn.iter().all(|e| !e.has_authorization()), "{cdn:#?}");
    assert!(
        cdn.iter().all(|e| e.query_param("verify").is_some()),
        "{cdn:#?}"
    );
    let hub = m.up.access_log(Front::Hub);
    assert!(hub.iter().all(|e| e.host == "registry-1.docker.io"));
}

/// On the shared host one login is kept for every registry the mirror serves: it reaches
/// the default registry (docker.io) and no other, unless the declaration opts one in. A
/// Basic login on a quay.io request is removed before quay sees the request, and quay's
/// 401 offers the client only the mirror's Bearer realm (a Basic challenge would ask for
/// that login). In host mode the host name is quay's own credential domain: kept.
#[test]
fn a_login_for_the_shared_host_reaches_no_registry_but_the_default() {
    let m = mirror::shared();
    let client = m.client();
    let basic = "Basic dXNlcjpwYXNz";
    let quay_saw = |probe: &str| {
        m.up.access_log_with(Front::Quay, |e| {
            e.query_param("probe").as_deref() == Some(probe)
        })
        .into_iter()
        .find(|e| e.query_param("probe").as_deref() == Some(probe))
        .unwrap_or_else(|| panic!("quay never saw probe {probe}\n{}", m.logs()))
    };
    let shared_host = [
        "/v2/quay.io/coreos/etcd/manifests/v3.5?probe=",
        "/v2/coreos/etcd/manifests/v3.5?ns=quay.io&probe=",
    ];
    for path in shared_host {
        let probe = unique();
        let resp = client
            .get(m.url(&format!("{path}{probe}")))
            .header("authorization", basic)
            .header("accept", ACCEPT)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 401, "{path}\n{}", m.logs());
        let challenges: Vec<String> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert!(
            !challenges.is_empty()
                && challenges
                    .iter()
                    .all(|c| c.starts_with("Bearer realm=\"")
                        && c.contains(&m.url("/_mirror/auth/"))),
            "{path}: {challenges:?}"
        );
        assert!(
            !quay_saw(&probe).has_authorization(),
            "{path}: quay got the login"
        );
    }
    let probe = unique();
    let resp = client
        .get(format!(
            "https://{}/v2/coreos/etcd/manifests/v3.5?probe={probe}",
            m.host("quay")
        ))
        .header("authorization", basic)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401, "{}", m.logs());
    assert!(
        quay_saw(&probe).has_authorization(),
        "host mode: quay's own login"
    );
}

// --- refusals ---------------------------------------------------------------------------

#[test]
fn methods_other_than_get_and_head_are_405() {
    let m = mirror::shared();
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = ok(
            m,
            m.raw(method, "/v2/library/alpine/manifests/3.20", &m.addr(), &[]),
        );
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(oci_error_code(&r.body), "UNSUPPORTED", "{method}: {r:?}");
    }
    let r = ok(
        m,
        m.raw(
            "POST",
            "/v2/library/alpine/blobs/uploads/",
            &m.host("docker"),
            &[],
        ),
    );
    assert_eq!(r.status, 405, "{r:?}");
}

#[test]
fn unknown_registries_are_404() {
    let m = mirror::shared();
    let client = m.client();
    let resp = client
        .get(m.url("/v2/library/alpine/manifests/3.20?ns=evil.example"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(oci_error_code(&resp.text().unwrap()), "NAME_UNKNOWN");
    let resp = client
        .get(m.url("/v2/evil.example/library/alpine/manifests/3.20"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = client
        .get(m.url("/v2/evil.example:5000/x/manifests/1"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// A counter of the filter from Envoy's `/stats` (`0` until first reported).
fn filter_counter(m: &Mirror, name: &str) -> u64 {
    let stats = ok(m, m.envoy.admin("/stats?filter=mirror_"));
    stats
        .lines()
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| k.ends_with(name))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_filter_counts_requests_and_rejections_in_envoy_stats() {
    let m = mirror::shared();
    // Other tests share this Envoy: compare against a reading taken first.
    let requests = filter_counter(m, "mirror_requests_docker_io");
    let unknown = filter_counter(m, "mirror_rejections_name_unknown");
    let client = m.client();
    for _ in 0..3 {
        let resp = client
            .get(m.url("/v2/evil.example/library/alpine/manifests/3.20"))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
    let url = format!(
        "https://{}/v2/library/alpine/manifests/3.20",
        m.host("docker")
    );
    let resp = client.head(url).send().unwrap();
    assert_eq!(resp.status(), 401, "anonymous manifest HEAD is challenged");
    // Each VM counts in memory and reports once a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (r, u) = (
            filter_counter(m, "mirror_requests_docker_io"),
            filter_counter(m, "mirror_rejections_name_unknown"),
        );
        if r > requests && u >= unknown + 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counters not reported: requests {requests} -> {r}, name_unknown {unknown} -> {u}\n{}",
            ok(m, m.envoy.admin("/stats?filter=mirror_"))
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // What Prometheus scrapes: every filter counter the shipped Grafana dashboard queries
    // is there under that name (a name ending in `_` is a family, e.g. one per registry).
    let scraped = ok(m, m.envoy.admin("/stats/prometheus"));
    let scraped: Vec<&str> = scraped
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let read = |file: &str| {
        std::fs::read_to_string(mirror_tests::build::workspace_root().join(file)).unwrap()
    };
    let queried = filter_metrics_in(&read("envoy/grafana/regmirror-dashboard.json"));
    for panel in [
        "mirror_requests_",
        "mirror_challenges_rewritten",
        "mirror_challenges_rejected",
        "mirror_redirects_signed",
        "mirror_redirects_followed",
        "mirror_rejections",
        "mirror_rejections_",
    ] {
        assert!(
            queried.contains(panel),
            "no dashboard panel for {panel}: {queried:?}"
        );
    }
    // The alerting rules' filter counters too.
    let alerted = filter_metrics_in(&read("envoy/prometheus/regmirror-alerts.yaml"));
    assert!(!alerted.is_empty());
    for name in queried.iter().chain(&alerted) {
        assert!(
            scraped
                .iter()
                .any(|s| *s == name || (name.ends_with('_') && s.starts_with(name.as_str()))),
            "the dashboard or the alerts query {name}, which Envoy's /stats/prometheus does not have: {:?}",
            scraped
                .iter()
                .filter(|s| s.contains("mirror_"))
                .collect::<Vec<_>>()
        );
    }
}

/// The filter's metric names in a text: `mirror_…` words (not the cache's `regmirror_…`).
fn filter_metrics_in(text: &str) -> std::collections::BTreeSet<String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("mirror_") {
        let starts_a_word = !rest[..i].ends_with(word);
        let tail = &rest[i..];
        let end = tail.find(|c: char| !word(c)).unwrap_or(tail.len());
        if starts_a_word {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn token_requests_to_unlisted_realms_are_403() {
    let m = mirror::shared();
    let resp = m
        .client()
        .get(m.url("/_mirror/auth/evil.example/token?service=x&scope=repository:a/b:pull"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403);
    // A registry host that is not a realm host of any registry either.
    let resp = m
        .client()
        .get(m.url("/_mirror/auth/production.cloudflare.docker.com/token"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[test]
fn tampered_signed_redirects_are_403() {
    let m = mirror::shared();
    let client = m.client();
    let token = ok(
        m,
        m.up.pull_token(
            mirror_tests::upstreams::HUB_REALM,
            mirror_tests::upstreams::HUB_SERVICE,
            "library/alpine",
        ),
    );
    let layer = &m.up.images.alpine.platforms[0].layer_digests[2];
    let resp = client
        .get(m.url(&format!("/v2/library/alpine/blobs/{layer}")))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 307, "{}", m.logs());
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    // /_mirror/redirect/<registry>/<expires>/<cred>/<sig>/<host>/<path>?<query>
    let path = location.split_once("/_mirror/redirect/").unwrap().1;
    let parts: Vec<&str> = path.splitn(5, '/').collect();
    let (registry, expires, cred, sig, rest) = (parts[0], parts[1], parts[2], parts[3], parts[4]);
    let flip = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        b[0] = if b[0] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    let later: u64 = expires.parse::<u64>().unwrap() + 3600;
    let tampered = [
        format!("{registry}/{expires}/{cred}/{}/{rest}", flip(sig)),
        format!("{registry}/{later}/{cred}/{sig}/{rest}"),
        format!(
            "{registry}/{expires}/{cred}/{sig}/{}",
            rest.replace(&layer[7..], &"0".repeat(64))
        ),
        format!(
            "{registry}/{expires}/{cred}/{sig}/{}",
            rest.replace("verify=", "verify=x")
        ),
        format!("quay.io/{expires}/{cred}/{sig}/{rest}"),
        format!("{registry}/{expires}/{cred}/{sig}/evil.example/x"),
    ];
    for t in tampered {
        let resp = client
            .get(m.url(&format!("/_mirror/redirect/{t}")))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 403, "/_mirror/redirect/{t}");
    }
    // The untampered one works (without Authorization: the mirror fetches the CDN).
    let resp = client.get(&location).send().unwrap();
    assert_eq!(resp.status(), 200, "{}", m.logs());
    assert_eq!(&digest_of(&resp.bytes().unwrap()), layer);
}

#[test]
fn a_request_for_the_realm_host_gets_no_token() {
    let m = mirror::shared();
    let probe = format!("repository:probe/{}:pull", unique());
    let r = ok(
        m,
        m.raw(
            "GET",
            &format!("/token?service=registry.docker.io&scope={probe}"),
            "auth.docker.io",
            &[],
        ),
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert!(!r.body.contains("token\""), "{r:?}");
    assert!(m
        .up
        .token
        .requests()
        .iter()
        .all(|t| !t.scopes.contains(&probe)));
}

#[test]
fn invalid_names_and_references_are_refused() {
    let m = mirror::shared();
    for path in [
        "/v2/../etc/manifests/x",
        "/v2/library/../../etc/manifests/x",
        "/v2/Library/Alpine/manifests/3.20",
        "/v2/library/alpine/blobs/sha256:../../../etc/passwd",
        "/v2/library/alpine/blobs/sha256:ZZ",
        "/v2/library/alpine/manifests/-bad-tag",
    ] {
        let r = ok(m, m.raw("GET", path, &m.addr(), &[]));
        assert!(r.status == 400 || r.status == 404, "{path}: {r:?}");
    }
    // Nothing of that reached an upstream.
    let hub = m.up.access_log(Front::Hub);
    assert!(hub
        .iter()
        .all(|e| !e.uri.contains("..") && !e.uri.contains("Library")));
}

#[test]
fn v2_without_a_registry_is_answered_for_every_mode() {
    let m = mirror::shared();
    let client = m.client();
    for url in [
        m.url("/v2/"),
        format!("https://{}/v2/", m.host("docker")),
        format!("https://{}/v2/", m.host("quay")),
    ] {
        let resp = client.get(&url).send().unwrap();
        assert_eq!(resp.status(), 401, "{url}");
        let c = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(c.contains("/_mirror/auth/"), "{url}: {c}");
        let authority = url
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap();
        assert!(
            c.contains(&format!("https://{authority}/_mirror/auth/")),
            "{url}: {c}"
        );
    }
}

// --- containerd in host mode and path-prefix mode (hosts.toml written by hand) -------------

/// A `hosts.toml` as a user writes it for one mirror host: `server` (containerd's fallback
/// to the real registry) points at a closed local port, so nothing can leave the machine.
fn write_hosts_by_hand(hosts_dir: &std::path::Path, registry: &str, host: &str, extra: &str) {
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir).unwrap();
    let dead = mirror_tests::free_port();
    let ca = mirror::shared().up.pki.ca.display().to_string();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"https://127.0.0.1:{dead}\"\n\n[host.\"{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n{extra}"
        ),
    )
    .unwrap();
}

/// Every manifest and blob of `platforms` is in containerd's store and hashes to its digest.
fn assert_containerd_has(
    m: &Mirror,
    c: &clients::Containerd,
    ns: &str,
    platforms: &[&mirror_tests::images::PlatformImage],
) {
    let content = ok(m, c.content(ns));
    for p in platforms {
        for d in p.blob_digests().iter().chain([&p.manifest_digest]) {
            assert!(
                content.contains(d),
                "{d} ({}) missing from containerd's store",
                p.architecture
            );
            ok(m, c.verify_content(ns, d));
        }
    }
}

#[test]
fn containerd_pulls_hub_images_in_host_mode() {
    let m = mirror::shared();
    let c = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    let host = format!("https://{}", m.host("docker"));
    write_hosts_by_hand(hosts.path(), "docker.io", &host, "");
    let ns = format!("hosthub-{}", unique());

    let alpine = &m.up.images.alpine;
    let reference = "docker.io/library/alpine:3.20";
    ok(m, c.pull(&ns, hosts.path(), reference, &[]));
    assert_eq!(ok(m, c.image_digest(&ns, reference)), alpine.digest);
    assert_containerd_has(m, c, &ns, &alpine.platforms.iter().collect::<Vec<_>>());

    // The two-platform index, every platform.
    let multi = &m.up.images.multi;
    let reference = "docker.io/library/multi:1";
    ok(
        m,
        c.pull(&ns, hosts.path(), reference, &["--all-platforms"]),
    );
    assert_eq!(ok(m, c.image_digest(&ns, reference)), multi.digest);
    ok(m, c.verify_content(&ns, &multi.digest));
    assert_eq!(multi.platforms.len(), 2);
    assert_containerd_has(m, c, &ns, &multi.platforms.iter().collect::<Vec<_>>());

    // containerd spoke to docker.mirror.test (and still added ?ns=docker.io, which the
    // filter removed); the hub front saw the upstream's own name.
    let hub = m.up.access_log(Front::Hub);
    assert!(
        hub.iter()
            .any(|e| e.path() == "/v2/library/multi/manifests/1" && e.status() == 200),
        "{hub:#?}"
    );
    assert!(
        hub.iter()
            .all(|e| e.query_param("ns").is_none() && e.host == "registry-1.docker.io"),
        "{hub:#?}"
    );
}

/// containerd adds `?ns=quay.io` even with `override_path` (the mirror host is not
/// quay.io), so the request is `/v2/quay.io/coreos/etcd/manifests/v3.5?ns=quay.io`.
#[test]
fn containerd_pulls_quay_etcd_with_a_path_prefix() {
    let m = mirror::shared();
    let c = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    let host = format!("https://{}/v2/quay.io", m.addr());
    write_hosts_by_hand(hosts.path(), "quay.io", &host, "  override_path = true\n");
    let ns = format!("prefixquay-{}", unique());
    let etcd = &m.up.images.etcd;
    let reference = "quay.io/coreos/etcd:v3.5";
    ok(m, c.pull(&ns, hosts.path(), reference, &[]));
    assert_eq!(ok(m, c.image_digest(&ns, reference)), etcd.digest);
    assert_containerd_has(m, c, &ns, &etcd.platforms.iter().collect::<Vec<_>>());
    // The quay front saw the upstream's name, without the prefix (and the log is read: the
    // tag's manifest is in it).
    let tag =
        |e: &AccessLogEntry| e.path() == "/v2/coreos/etcd/manifests/v3.5" && e.status() == 200;
    let quay = m.up.access_log_with(Front::Quay, tag);
    assert!(quay.iter().any(tag), "{quay:#?}");
    assert!(
        quay.iter().all(|e| !e.path().starts_with("/v2/quay.io/")),
        "{quay:#?}"
    );
}

// --- a redirect target that challenges again (registry.k8s.io → Artifact Registry) -------

/// quay.io answers every `redirected/app` request with a `307` to `cdn.quay.io`, a registry
/// that challenges with quay's realm. The mirror signs the redirect; following it, the
/// quay.io token the client repeats is dropped (its fingerprint is in the URL), so
/// cdn.quay.io challenges; that challenge names the mirror's realm, and the token the
/// client gets there passes.
///
/// containerd 1.6 keeps one token handler per host and caches tokens by scope: the signed
/// URL is on the mirror host, so after cdn.quay.io's challenge it retries with the cached
/// quay.io token, whose fingerprint the URL carries.
#[test]
fn containerd_pulls_through_a_redirect_target_that_challenges_again() {
    // Its own Envoy: which hosts are token hosts is per-Envoy state, and this test is
    // about the first contact with cdn.quay.io.
    let own = Mirror::start(
        mirror::shared().up,
        &mirror_tests::build::workspace_root().join("envoy/local.yaml"),
    )
    .unwrap();
    let m = &own;
    let c = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    clients::write_hosts_toml(hosts.path(), "quay.io", &m.addr(), &m.up.pki.ca).unwrap();
    let ns = format!("redirected-{}", unique());
    let image = &m.up.images.redirected;
    let reference = "quay.io/redirected/app:1";
    if let Err(e) = c.pull(&ns, hosts.path(), reference, &[]) {
        panic!(
            "{e:#}\n{}\n--- cdn.quay.io ---\n{:#?}",
            m.logs(),
            m.up.access_log(Front::QuayCdn)
        );
    }
    assert_eq!(ok(m, c.image_digest(&ns, reference)), image.digest);
    assert_containerd_has(m, c, &ns, &image.platforms.iter().collect::<Vec<_>>());

    // quay.io redirected; nothing of the repository was served there.
    let quay = m.up.access_log(Front::Quay);
    let at_quay: Vec<_> = quay
        .iter()
        .filter(|e| e.path().starts_with("/v2/redirected/app/") && e.query_param("probe").is_none())
        .collect();
    assert!(!at_quay.is_empty(), "{}", m.logs());
    assert!(at_quay.iter().all(|e| e.status() == 307), "{at_quay:#?}");

    // cdn.quay.io: every request came through the mirror. The first carried no
    // Authorization (the quay.io token was dropped, as for any CDN) and was challenged with
    // quay's realm; from then on the mirror knows cdn.quay.io as a token host of quay.io
    // and lets quay's token through to it.
    let cdn = m.up.access_log(Front::QuayCdn);
    assert!(
        cdn.iter()
            .all(|e| e.host == "cdn.quay.io" && e.sni == "cdn.quay.io"),
        "{cdn:#?}"
    );
    let ours: Vec<_> = cdn.iter().filter(|e| e.ua.contains("containerd")).collect();
    let first = ours.first().expect("containerd reached cdn.quay.io");
    assert!(
        !first.has_authorization() && first.status() == 401,
        "first request at cdn.quay.io: {first:?}\n{ours:#?}"
    );
    // A credential that reached cdn.quay.io was always the right one; refusals were only
    // ever for requests that carried none.
    assert!(
        ours.iter()
            .all(|e| (e.status() == 200) == e.has_authorization()),
        "{ours:#?}"
    );
    let served: std::collections::BTreeSet<&str> = ours
        .iter()
        .filter(|e| e.status() == 200)
        .map(|e| e.path())
        .collect();
    let want: Vec<String> = image.platforms[0]
        .blob_digests()
        .iter()
        .map(|d| format!("/v2/redirected/app/blobs/{d}"))
        .collect();
    for w in &want {
        assert!(
            served.contains(w.as_str()),
            "cdn.quay.io never served {w}: {ours:#?}"
        );
    }
    // The token for cdn.quay.io came from quay's realm, through the mirror.
    assert!(
        m.up.token.requests().iter().any(|r| r.host == "quay.io"
            && r.path == "/v2/auth"
            && r.service.as_deref() == Some("quay.io")
            && r.scopes
                .iter()
                .any(|s| s == "repository:redirected/app:pull")
            && r.status == 200),
        "{}",
        m.logs()
    );
}

/// The same by hand: the signed URL to cdn.quay.io, the dropped quay.io token, the
/// rewritten second challenge, a token from it passing; and tampered URLs refused.
#[test]
fn a_redirect_to_cdn_quay_io_is_signed_and_its_challenge_answered_on_the_mirror() {
    use mirror_tests::upstreams::{QUAY_REALM, QUAY_SERVICE};
    let m = mirror::shared();
    let client = m.client();
    let base = m.url("");
    let probe = unique();
    let image = &m.up.images.redirected;
    let token = ok(
        m,
        m.up.pull_token(QUAY_REALM, QUAY_SERVICE, "redirected/app"),
    );
    let resp = client
        .get(format!(
            "{base}/v2/redirected/app/manifests/1?ns=quay.io&probe={probe}"
        ))
        .bearer_auth(&token)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 307, "{}", m.logs());
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&format!("{base}/_mirror/redirect/quay.io/")),
        "{location}"
    );
    assert!(
        location.contains(&format!(
            "/cdn.quay.io/v2/redirected/app/manifests/1?probe={probe}"
        )),
        "{location}"
    );

    // Following with the quay.io token: dropped, so cdn.quay.io challenges; the challenge
    // names the mirror's realm for quay.io.
    let resp = client
        .get(&location)
        .bearer_auth(&token)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401, "{}", m.logs());
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    let realm = format!("{base}/_mirror/auth/quay.io/v2/auth");
    assert!(
        challenge.contains(&format!("realm=\"{realm}\"")),
        "{challenge}"
    );
    assert!(challenge.contains("service=\"quay.io\""), "{challenge}");
    assert!(
        challenge.contains("scope=\"repository:redirected/app:pull\""),
        "{challenge}"
    );

    // A token from that realm passes.
    let resp = client
        .get(&realm)
        .query(&[
            ("service", "quay.io"),
            ("scope", "repository:redirected/app:pull"),
        ])
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", m.logs());
    let v: serde_json::Value = resp.json().unwrap();
    let fresh = v["token"].as_str().unwrap().to_string();
    assert_ne!(fresh, token);
    let resp = client
        .get(&location)
        .bearer_auth(&fresh)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", m.logs());
    assert_eq!(digest_of(&resp.bytes().unwrap()), image.digest);
    let seen = |cdn: &[mirror_tests::upstreams::AccessLogEntry]| -> Vec<(bool, u16)> {
        cdn.iter()
            .filter(|e| e.query_param("probe").as_deref() == Some(probe.as_str()))
            .map(|e| (e.has_authorization(), e.status()))
            .collect()
    };
    // nginx logs a request after its response: wait for the 200's line.
    let before = seen(&m.up.access_log_with(Front::QuayCdn, |e| {
        e.query_param("probe").as_deref() == Some(probe.as_str()) && e.status() == 200
    }));
    assert_eq!(before, [(false, 401), (true, 200)]);

    // Tampered: signature, host (another allowed quay CDN), registry, path, query.
    let path = location.split_once("/_mirror/redirect/").unwrap().1;
    let parts: Vec<&str> = path.splitn(5, '/').collect();
    let (registry, expires, cred, sig, rest) = (parts[0], parts[1], parts[2], parts[3], parts[4]);
    let flip = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        b[0] = if b[0] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    let tampered = [
        format!("{registry}/{expires}/{cred}/{}/{rest}", flip(sig)),
        format!("{registry}/{expires}/{}/{sig}/{rest}", flip(cred)),
        format!(
            "{registry}/{expires}/{cred}/{sig}/{}",
            rest.replacen("cdn.quay.io", "cdn01.quay.io", 1)
        ),
        format!("docker.io/{expires}/{cred}/{sig}/{rest}"),
        format!(
            "{registry}/{expires}/{cred}/{sig}/{}",
            rest.replace("redirected/app", "coreos/etcd")
        ),
        format!("{registry}/{expires}/{cred}/{sig}/{rest}x"),
    ];
    for t in tampered {
        let resp = client
            .get(m.url(&format!("/_mirror/redirect/{t}")))
            .bearer_auth(&fresh)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 403, "/_mirror/redirect/{t}");
        assert_eq!(oci_error_code(&resp.text().unwrap()), "DENIED");
    }
    // None of them reached cdn.quay.io.
    assert_eq!(seen(&m.up.access_log(Front::QuayCdn)), before);
}

/// Only a realm URL a registry issued in a challenge is forwarded: other paths on a realm
/// host (an API, the catalog) are refused before anything reaches that host, whatever
/// credential comes with them.
#[test]
fn token_requests_for_paths_a_registry_never_issued_are_403() {
    let m = mirror::shared();
    let probe = unique();
    for path in [
        format!("/_mirror/auth/quay.io/api/v1/user/?probe={probe}"),
        format!("/_mirror/auth/quay.io/v2/_catalog?n=99999&probe={probe}"),
        format!("/_mirror/auth/quay.io/v2/auth/x?probe={probe}"),
        format!("/_mirror/auth/auth.docker.io/v2/token?probe={probe}"),
    ] {
        let resp = m
            .client()
            .get(m.url(&path))
            .basic_auth("alice", Some("secret"))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 403, "{path}\n{}", m.logs());
        assert_eq!(oci_error_code(&resp.text().unwrap()), "DENIED", "{path}");
    }
    let quay = m.up.access_log(Front::Quay);
    assert!(
        quay.iter()
            .all(|e| e.query_param("probe").as_deref() != Some(probe.as_str())),
        "{quay:#?}"
    );
    assert!(m
        .up
        .token
        .requests()
        .iter()
        .all(|r| !r.path.contains("/api/") && !r.path.contains("_catalog")));
}

// --- the shared host's ping while the default registry's upstream is down ---------------

/// A TCP relay to `target` that can be cut: while cut, its open connections are shut
/// and new ones closed at once (an upstream that is down).
struct Relay {
    addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections made to the relay, up or down: a dial while down is still a contact.
    dialled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(target: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            up: Default::default(),
            dialled: Default::default(),
            open: Default::default(),
        };
        let (up, dialled, open) = (relay.up.clone(), relay.dialled.clone(), relay.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                dialled.fetch_add(1, SeqCst);
                if !up.load(SeqCst) {
                    continue; // dropped: closed without an answer
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let mut open = open.lock().unwrap();
                open.extend(client.try_clone().ok());
                open.extend(server.try_clone().ok());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        relay
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn dialled(&self) -> usize {
        self.dialled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// skopeo pings `/v2/` on the mirror host before every pull, whatever registry it pulls
/// from. With Docker Hub's upstream (the default registry) down, a pull of the cached
/// gcr.io registry by path prefix still works: the ping is answered by the mirror itself.
/// Anonymous `200 {}` while the hub's challenge was never seen; once seen, the hub's
/// challenge (rewritten to the mirror) without asking the hub, so `docker login`-style
/// clients still find the token realm.
#[test]
fn ping_first_clients_pull_a_cached_registry_while_the_default_upstream_is_down() {
    use mirror_tests::cache::CacheService;
    let up = mirror::shared().up;
    let cache = CacheService::start(up).unwrap();
    let hub = Relay::start(up.nginx.hub_front);
    let own = Mirror::start_with(
        up,
        &mirror_tests::build::workspace_root().join("envoy/local.yaml"),
        true,
        std::collections::BTreeMap::from([
            ("cache_service".to_string(), cache.addr),
            ("registry-1.docker.io".to_string(), hub.addr),
        ]),
    )
    .unwrap();
    let m = &own;
    let logs = || {
        format!(
            "{}\n--- regmirror ---\n{}",
            m.logs(),
            cache.proc.log_tail(40)
        )
    };
    let image = &up.images.distroless;
    let reference = format!("{}/gcr.io/distroless/static:nonroot", m.addr());
    let ping = || m.client().get(m.url("/v2/")).send().unwrap();

    // 1. The hub is down and its challenge was never seen: anonymous ping, the pull works.
    hub.set_up(false);
    let resp = ping();
    assert_eq!(resp.status(), 200, "{}", logs());
    assert_eq!(resp.text().unwrap().trim(), "{}");
    let opts = SkopeoPull {
        all: false,
        cert_dir: Some(up.pki.cert_dir.clone()),
        registries_conf: None,
    };
    match clients::skopeo_pull(&reference, &opts) {
        Ok(p) => p.assert_is(image, false),
        Err(e) => panic!("{e:#}\n{}", logs()),
    }

    // 2. The hub is up: the ping learns its challenge.
    hub.set_up(true);
    let realm = format!("https://{}/_mirror/auth/auth.docker.io/token", m.addr());
    let challenge = |resp: reqwest::blocking::Response| {
        assert_eq!(resp.status(), 401, "{}", logs());
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let c = challenge(ping());
    assert!(c.contains(&format!("realm=\"{realm}\"")), "{c}");
    assert!(c.contains("service=\"registry.docker.io\""), "{c}");

    // 3. The hub is down again: the ping still challenges, without contacting the hub,
    // and the cached registry still pulls.
    hub.set_up(false);
    let before = hub.dialled();
    let c = challenge(ping());
    assert!(c.contains(&format!("realm=\"{realm}\"")), "{c}");
    match clients::skopeo_pull(&reference, &opts) {
        Ok(p) => p.assert_is(image, false),
        Err(e) => panic!("{e:#}\n{}", logs()),
    }
    assert_eq!(hub.dialled(), before, "the hub was dialled\n{}", logs());
}
