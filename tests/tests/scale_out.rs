//! A platform team runs the cache as 3 `regmirror` replicas on one S3 bucket (a real
//! SeaweedFS) behind one Envoy whose cache cluster is the rendered consistent-hash cluster
//! (ring hash on `x-mirror-cache-key`, health checks on `/readyz`, retry to another host).
//! Upstreams: the gcr-like front (distribution + token auth behind nginx) and the fault
//! upstream (distribution + token auth, seen through one proxy per replica, so a story
//! knows which replica fetched, can slow a body or take the upstream away).
//!
//! Stories that kill, restart or cut off replicas get a replica set of their own; the
//! others share one. Each story pulls an image no other story touches.

use mirror_tests::clients::{self, PulledDir, SkopeoPull};
use mirror_tests::faults::{self, Fault};
use mirror_tests::images::{SeededImage, MT_MANIFEST};
use mirror_tests::replicas::{ScaleOut, WarmReads, FAULTY};
use mirror_tests::upstreams::Front;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const REPLICAS: usize = 3;

fn shared() -> &'static ScaleOut {
    static S: OnceLock<Result<ScaleOut, String>> = OnceLock::new();
    match S.get_or_init(start) {
        Ok(s) => s,
        Err(e) => panic!("scale-out fixture failed to start: {e}"),
    }
}

/// 3 replicas on a fresh prefix of the shared SeaweedFS bucket, behind an Envoy of their own.
fn start() -> Result<ScaleOut, String> {
    ScaleOut::start(mirror_tests::s3::shared(), REPLICAS).map_err(|e| format!("{e:#}"))
}

/// A replica set of its own (stories that kill, restart or cut off replicas).
fn own() -> ScaleOut {
    start().unwrap_or_else(|e| panic!("scale-out fixture failed to start: {e}"))
}

fn ok<T>(s: &ScaleOut, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}\n{}", s.logs()))
}

fn skopeo(s: &ScaleOut, reference: &str) -> anyhow::Result<PulledDir> {
    let opts = SkopeoPull {
        all: false,
        cert_dir: Some(s.up.pki.cert_dir.clone()),
        registries_conf: None,
    };
    clients::skopeo_pull(reference, &opts)
}

/// `127.0.0.1:PORT/faulty.test/<repo>:<tag>` (path-prefix mode).
fn faulty_ref(s: &ScaleOut, image: &SeededImage) -> String {
    format!("{}/{FAULTY}/{}:{}", s.addr(), image.name, image.tag)
}

/// Upstream GETs answered 200 per blob of `image` at the gcr front.
fn gcr_blob_gets(s: &ScaleOut, image: &SeededImage) -> BTreeMap<String, usize> {
    let blobs = image.all_blobs();
    let last = format!("/blobs/{}", blobs[blobs.len() - 1]);
    let log =
        s.up.access_log_with(Front::Gcr, |e| e.path().ends_with(&last));
    blobs
        .iter()
        .map(|b| {
            let n = log
                .iter()
                .filter(|e| {
                    e.method == "GET"
                        && e.status() == 200
                        && e.path().ends_with(&format!("/blobs/{b}"))
                })
                .count();
            (b.clone(), n)
        })
        .collect()
}

/// Requests for `image`'s repository the fault upstream saw, over all replicas' proxies.
fn faulty_requests(s: &ScaleOut, image: &SeededImage) -> Vec<String> {
    let repo = format!("/v2/{}/", image.name);
    s.replicas
        .iter()
        .flat_map(|r| r.proxy.seen())
        .filter(|x| x.path.starts_with(&repo))
        .map(|x| format!("{} {} -> {}", x.method, x.path, x.status))
        .collect()
}

/// Every blob of `image` is in the bucket under its digest, with bytes that hash to it.
/// Every blob of `image` is in the bucket, verified. A client gets a blob's last bytes once
/// they verified; the upload completes just after (the download stays open for other
/// requests until then), so this waits a little for it.
fn assert_in_bucket(s: &ScaleOut, image: &SeededImage) {
    for d in image.all_blobs() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let bytes = loop {
            match s.s3.read(&s.blob_key(&d)) {
                Ok(b) => break b,
                Err(e) if Instant::now() > deadline => {
                    panic!("{d} not in the bucket: {e}\n{}", s.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        assert_eq!(mirror_tests::digest_of(&bytes), d, "bucket object of {d}");
    }
}

/// Upstream GETs of a fault-upstream blob answered 200, over all replicas.
fn layer_fetches(s: &ScaleOut, digest: &str) -> usize {
    s.replicas
        .iter()
        .map(|r| r.proxy.count_ok("GET", &format!("/blobs/{digest}")))
        .sum()
}

/// A GET straight to one replica, naming the registry as Envoy's filter does.
fn replica_get(s: &ScaleOut, i: usize, path: &str) -> faults::Got {
    faults::get(
        &faults::client(),
        &s.replicas[i].url(path),
        &[("x-mirror-registry", FAULTY), ("accept", MT_MANIFEST)],
    )
}

#[test]
fn skopeo_and_containerd_pull_through_three_replicas_on_one_bucket() {
    let s = shared();
    let image = &s.up.images.distroless;
    let reference = format!("{}/{}:{}", s.host("gcr"), image.name, image.tag);
    ok(s, skopeo(s, &reference)).assert_is(image, false);

    let ctrd = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    clients::write_hosts_toml(hosts.path(), "gcr.io", &s.addr(), &s.up.pki.ca).unwrap();
    let ns = format!("scale-{}", hex::encode(rand::random::<[u8; 4]>()));
    let cref = format!("gcr.io/{}:{}", image.name, image.tag);
    ok(s, ctrd.pull(&ns, hosts.path(), &cref, &[]));
    assert_eq!(ok(s, ctrd.image_digest(&ns, &cref)), image.digest);
    for d in image.all_blobs() {
        ok(s, ctrd.verify_content(&ns, &d));
    }

    // Two clients, three replicas: each blob came from the upstream once and sits in the
    // shared bucket, verified.
    let gets = gcr_blob_gets(s, image);
    assert!(
        gets.values().all(|&n| n == 1),
        "upstream blob GETs per digest: {gets:?}\n{}",
        s.logs()
    );
    assert_in_bucket(s, image);
}

#[test]
fn thirty_two_concurrent_cold_pulls_fetch_each_blob_once() {
    let s = shared();
    let image = &s.up.images.pause;
    let reference = format!("{}/{}:{}", s.host("gcr"), image.name, image.tag);
    let before = ok(s, s.requests_per_replica());
    let results: Vec<anyhow::Result<PulledDir>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..32)
            .map(|_| sc.spawn(|| skopeo(s, &reference)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("pull thread panicked")))
            })
            .collect()
    });
    for r in results {
        ok(s, r).assert_is(image, false);
    }
    let gets = gcr_blob_gets(s, image);
    assert!(
        gets.values().all(|&n| n == 1),
        "32 concurrent pulls over {REPLICAS} replicas: upstream blob GETs per digest {gets:?}\n{}",
        s.logs()
    );
    assert_in_bucket(s, image);
    let after = ok(s, s.requests_per_replica());
    let spread: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!("32 cold pulls: requests per replica {spread:?}, upstream blob GETs {gets:?}");
}

/// `scale/killed:1` on the fault upstream: one 20 MiB layer, more than one multipart part of
/// the S3 backend (8 MiB), so a replica killed mid-layer leaves an upload in progress.
fn large_image() -> &'static SeededImage {
    static I: OnceLock<Result<SeededImage, String>> = OnceLock::new();
    let r = I.get_or_init(|| {
        (|| {
            let dir = mirror_tests::temp_dir("scale-large")?; // only until pushed
            let image = mirror_tests::images::build_layout(
                &dir.path().join("layout"),
                FAULTY,
                "scale/killed",
                "1",
                301,
                &["amd64"],
                &[20 * 1024 * 1024 + 3],
            )?;
            faults::shared().push(&image)?;
            Ok::<_, anyhow::Error>(image)
        })()
        .map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(i) => i,
        Err(e) => panic!("large image: {e}"),
    }
}

#[test]
fn a_replica_killed_mid_pull_the_retry_succeeds_and_nothing_partial_is_served() {
    let mut s = own();
    let image = large_image();
    let layer = image.first_layer();
    let blob_path = format!("/blobs/{layer}");
    // 20 MiB at 4 MiB/s: the replica that fetches it is still uploading when it is killed.
    for r in &s.replicas {
        r.proxy.set_fault(&layer, Fault::Throttle(4 * 1024 * 1024));
    }
    let reference = faulty_ref(&s, image);
    let opts = SkopeoPull {
        all: false,
        cert_dir: Some(s.up.pki.cert_dir.clone()),
        registries_conf: None,
    };
    let first = {
        let (reference, opts) = (reference.clone(), opts.clone());
        std::thread::spawn(move || clients::skopeo_pull(&reference, &opts))
    };
    // SIGKILL the replica fetching the layer once its multipart upload is under way (its
    // marker under uploads/ is in the bucket).
    let uploads = format!("{}/uploads/", s.prefix);
    let deadline = Instant::now() + Duration::from_secs(60);
    let fetching = loop {
        let fetcher = s.replicas.iter().position(|r| r.fetched(&blob_path) > 0);
        if let (Some(i), false) = (fetcher, ok(&s, s.s3.list(&uploads)).is_empty()) {
            break i;
        }
        assert!(
            Instant::now() < deadline && !first.is_finished(),
            "no upload of the layer began while the pull ran\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    s.replicas[fetching].kill9();
    assert!(
        !ok(&s, s.s3.exists(&s.blob_key(&layer))),
        "the killed replica's half-written layer is visible"
    );
    let first = first
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("pull thread panicked")));
    // skopeo_pull verifies every digest: a first attempt that "succeeded" is the real image.
    if let Ok(p) = &first {
        p.assert_is(image, false);
    }

    // The client's retry (unthrottled) goes to another replica and verifies.
    for r in &s.replicas {
        r.proxy.clear_faults();
    }
    ok(&s, clients::skopeo_pull(&reference, &opts)).assert_is(image, false);
    let others: usize = (0..s.replicas.len())
        .filter(|&i| i != fetching)
        .map(|i| s.replicas[i].fetched(&blob_path))
        .sum();
    assert!(
        others >= 1,
        "the retry's layer did not come through another replica\n{}",
        s.logs()
    );
    // Nothing the killed replica wrote half-way is visible: every blob object in the bucket
    // hashes to its name, and the layer is there, whole.
    assert_in_bucket(&s, image);
    let (bad, checked) = ok(&s, s.unverified_blobs());
    assert!(bad.is_empty(), "unverified objects under blobs/: {bad:?}");
    assert!(checked >= image.all_blobs().len(), "{checked} blob objects");
    // The killed replica comes back and serves the layer from the bucket, verified.
    let restarted = s.replicas[fetching].start();
    ok(&s, restarted);
    let got = replica_get(&s, fetching, &format!("/v2/{}{blob_path}", image.name));
    assert_eq!(
        (got.status, mirror_tests::digest_of(&got.body)),
        (200, layer.clone()),
        "the restarted replica serving the layer"
    );
    eprintln!(
        "killed replica {fetching} mid-layer; first attempt: {}",
        match &first {
            Ok(_) => "completed".to_string(),
            Err(e) => format!("failed ({})", e.to_string().lines().next().unwrap_or("")),
        }
    );
}

#[test]
fn restarted_replicas_serve_warm_pulls_without_asking_the_upstream() {
    let mut s = own();
    let image = &faults::shared().images.crowd;
    let reference = faulty_ref(&s, image);
    ok(&s, skopeo(&s, &reference)).assert_is(image, false);
    let before = faulty_requests(&s, image);
    assert!(!before.is_empty(), "the cold pull reached no upstream");

    let restarted = s.restart_all();
    ok(&s, restarted);
    ok(&s, skopeo(&s, &reference)).assert_is(image, false);
    // Blobs AND the tag (within its TTL) come from the bucket.
    let after = faulty_requests(&s, image);
    assert_eq!(
        after[before.len()..],
        [] as [String; 0],
        "after a restart of every replica the warm pull asked the upstream\n{}",
        s.logs()
    );
}

#[test]
fn with_the_upstream_down_every_replica_serves_cached_tags() {
    let mut s = own();
    let up = faults::shared();
    let image = &up.images.small;
    let reference = faulty_ref(&s, image);
    ok(&s, skopeo(&s, &reference)).assert_is(image, false);
    assert_in_bucket(&s, image);

    for r in &s.replicas {
        r.proxy.set_upstream_up(false, up.registry.addr);
    }
    let tag_path = format!("/v2/{}/manifests/{}", image.name, image.tag);
    for i in 0..s.replicas.len() {
        let m = replica_get(&s, i, &tag_path);
        assert_eq!(
            (m.status, mirror_tests::digest_of(&m.body)),
            (200, image.digest.clone()),
            "replica {i}: the cached tag with the upstream down\n{}",
            s.logs()
        );
        for d in image.all_blobs() {
            let b = replica_get(&s, i, &format!("/v2/{}/blobs/{d}", image.name));
            assert_eq!(
                (b.status, mirror_tests::digest_of(&b.body)),
                (200, d.clone()),
                "replica {i}: blob {d} with the upstream down"
            );
        }
    }

    // Through Envoy, after the replica that fetched the tag is gone.
    let manifests = format!("/v2/{}/manifests/", image.name);
    let fetched_tag = s
        .replicas
        .iter()
        .position(|r| {
            r.proxy
                .seen()
                .iter()
                .any(|x| x.path.starts_with(&manifests))
        })
        .unwrap_or_else(|| {
            panic!(
                "no replica asked the upstream for the manifest\n{}",
                s.logs()
            )
        });
    s.replicas[fetched_tag].kill9();
    // What a user can rely on is a pull retried with back-off (containerd, kubelet): Envoy
    // bounds its own retries (2, each walking a few ring entries for another replica, see
    // the test above), so a first request can still reach the dead replica and get Envoy's
    // 503 until health checks (2 failures, 5 s apart) take it off the ring. A failed pull
    // must be that 503, never bad bytes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = Vec::new();
    let pulled = loop {
        match skopeo(&s, &reference) {
            Ok(p) => break p,
            Err(e) => {
                let e = format!("{e:#}");
                assert!(
                    e.contains("503") && Instant::now() < deadline,
                    "pull after the replica that fetched the tag was killed (earlier failures {failures:?}): {e}\n{}",
                    s.logs()
                );
                failures.push(e);
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    };
    pulled.assert_is(image, false);
    eprintln!(
        "pull after a SIGKILL: {} failed attempts before it succeeded",
        failures.len()
    );
}

#[test]
fn a_corrupted_object_in_the_bucket_is_never_served_as_its_digest() {
    let s = shared();
    let image = &faults::shared().images.flip;
    let layer = image.first_layer();
    let reference = faulty_ref(s, image);
    ok(s, skopeo(s, &reference)).assert_is(image, false);
    assert_in_bucket(s, image);
    let key = s.blob_key(&layer);
    ok(s, s.s3.corrupt(&key));
    let fetched_at_corruption = layer_fetches(s, &layer);

    let path = format!("/v2/{}/blobs/{layer}", image.name);
    let mut outcomes = Vec::new();
    for i in 0..s.replicas.len() {
        let got = replica_get(s, i, &path);
        let digest = mirror_tests::digest_of(&got.body);
        assert!(
            got.status != 200 || got.error.is_some() || digest == layer,
            "replica {i} served {digest} as {layer} (complete 200)\n{}",
            s.logs()
        );
        outcomes.push(match (got.status, &got.error) {
            (200, None) => "200, verified".to_string(),
            (200, Some(e)) => format!("200 cut short ({e})"),
            (st, _) => format!("error {st}"),
        });
    }
    // The replica that read the bad bytes deletes the object; a later pull refetches the
    // layer from the upstream and stores it verified again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s
        .s3
        .read(&key)
        .is_ok_and(|b| mirror_tests::digest_of(&b) != layer)
    {
        assert!(
            Instant::now() < deadline,
            "the corrupted object stayed in the bucket ({outcomes:?})\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(s, skopeo(s, &reference)).assert_is(image, false);
    assert!(
        layer_fetches(s, &layer) > fetched_at_corruption,
        "the layer was never refetched from the upstream\n{}",
        s.logs()
    );
    assert_in_bucket(s, image);
    eprintln!(
        "corrupted {key}: direct GETs per replica {outcomes:?}; upstream refetches of the layer: {}",
        layer_fetches(s, &layer) - fetched_at_corruption
    );
}

/// Envoy's retry after a connect failure walks the ring from the key's place to the next
/// entry of another replica (`previous_hosts`), trying at most `host_selection_retry_max_attempts`
/// entries. With 3 replicas each owns ~1/3 of the entries in runs: with 3 attempts about
/// 1 key in 40 of a dead replica found only that replica and got Envoy's 503 (URX,UF) until
/// the health checks (2 failures 5 s apart) took it off the ring; render gives 32.
#[test]
fn a_killed_replicas_keys_are_served_by_another_on_the_first_request() {
    let mut s = own();
    let image = &faults::shared().images.small;
    let client = ok(&s, s.up.pki.client(&[]));
    s.replicas[0].kill9();
    let dead = s.replicas[0].addr;
    let mut refused = Vec::new();
    for i in 0..200u32 {
        // Unknown digests: any answer of a live replica (401/404) is fine, only Envoy's own
        // 503 after its retries is not.
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(i.to_be_bytes())));
        let url = format!(
            "https://{}/v2/{FAULTY}/{}/blobs/{digest}",
            s.addr(),
            image.name
        );
        let got = faults::get(&client, &url, &[]);
        if got.status == 503 || got.error.is_some() {
            refused.push(format!(
                "{digest}: {} {}",
                got.status,
                String::from_utf8_lossy(&got.body)
            ));
        }
    }
    let per_replica = ok(&s, s.requests_per_replica());
    assert_eq!(
        refused,
        [] as [String; 0],
        "keys of the killed replica {dead} not served on the first request (requests per replica {per_replica:?})\n{}",
        s.logs()
    );
}

/// The sum of one counter over every replica's `/metrics`.
fn replicas_counter(s: &ScaleOut, name: &str) -> u64 {
    (0..s.replicas.len())
        .map(|i| {
            let got = faults::get(&faults::client(), &s.replicas[i].url("/metrics"), &[]);
            String::from_utf8_lossy(&got.body)
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in replica {i}'s /metrics"))
        })
        .sum()
}

/// `redirect = true`: the operator's clients reach the bucket, and warm layers go from it to
/// them by presigned URLs instead of through the replicas. Misses still stream through a
/// replica (verified on the way), HEADs and small blobs are answered by the replica.
#[test]
fn with_redirect_on_warm_layers_come_from_the_bucket_by_presigned_urls() {
    const TTL: u64 = 3;
    let s = ScaleOut::start_with(
        mirror_tests::s3::shared(),
        2,
        WarmReads::Redirect { ttl_seconds: TTL },
    )
    .unwrap_or_else(|e| panic!("scale-out fixture failed to start: {e:#}"));
    let image = large_image();
    let layer = image.first_layer();
    let reference = faulty_ref(&s, image);
    // Cold: streamed through the replica that fetched it.
    ok(&s, skopeo(&s, &reference)).assert_is(image, false);
    assert_in_bucket(&s, image);
    assert_eq!(replicas_counter(&s, "regmirror_store_redirects_total"), 0);

    // Warm, skopeo and containerd: the layer by redirect, digests verified by both clients.
    ok(&s, skopeo(&s, &reference)).assert_is(image, false);
    let ctrd = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    let decl = s.declaration();
    ok(
        &s,
        clients::write_hosts_toml_of(&decl, hosts.path(), FAULTY, &s.addr(), &s.up.pki.ca),
    );
    let ns = format!("redirect-{}", hex::encode(rand::random::<[u8; 4]>()));
    let cref = format!("{FAULTY}/{}:{}", image.name, image.tag);
    ok(&s, ctrd.pull(&ns, hosts.path(), &cref, &[]));
    assert_eq!(ok(&s, ctrd.image_digest(&ns, &cref)), image.digest);
    for d in image.all_blobs() {
        ok(&s, ctrd.verify_content(&ns, &d));
    }
    let redirected = replicas_counter(&s, "regmirror_store_redirects_total");
    assert!(
        redirected >= 2,
        "{redirected} redirects for two warm pulls of a 20 MiB layer\n{}",
        s.logs()
    );
    assert_eq!(
        layer_fetches(&s, &layer),
        1,
        "upstream fetches of the layer"
    );

    // What a client is handed: a URL of the bucket object, signed, that serves the verified
    // bytes (and ranges of them); it expires.
    let client = ok(&s, s.up.pki.client(&[]));
    let blob_url = |d: &str| format!("https://{}/v2/{FAULTY}/{}/blobs/{d}", s.addr(), image.name);
    let resp = ok(&s, client.get(blob_url(&layer)).send().map_err(Into::into));
    assert_eq!(resp.status(), 307, "{}", s.logs());
    let header = |r: &reqwest::blocking::Response, h: &str| {
        r.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header(&resp, "docker-content-digest"), layer);
    let location = header(&resp, "location");
    let object = format!("{}/{}/{}", s.s3.endpoint, s.s3.bucket, s.blob_key(&layer));
    assert!(
        location.starts_with(&format!("{object}?")) && location.contains("X-Amz-Signature="),
        "Location {location:?}, expected a presigned URL of {object}"
    );
    let plain = faults::client();
    let got = faults::get(&plain, &location, &[]);
    assert_eq!(
        (got.status, mirror_tests::digest_of(&got.body)),
        (200, layer.clone()),
        "the presigned URL"
    );
    let part = ok(
        &s,
        plain
            .get(&location)
            .header("range", "bytes=100-199")
            .send()
            .and_then(|r| Ok((r.status().as_u16(), r.bytes()?)))
            .map_err(Into::into),
    );
    assert_eq!((part.0, &part.1[..]), (206, &got.body[100..200]));
    let unsigned = faults::get(&plain, &object, &[]);
    assert_eq!(
        unsigned.status, 403,
        "the bucket object without a signature"
    );
    // HEAD and a small blob (the config) are the replica's.
    let head = ok(&s, client.head(blob_url(&layer)).send().map_err(Into::into));
    assert_eq!(
        (head.status().as_u16(), header(&head, "content-length")),
        (200, got.body.len().to_string())
    );
    let config = &image.platforms[0].config_digest;
    let small = faults::get(&client, &blob_url(config), &[]);
    assert_eq!(
        (small.status, mirror_tests::digest_of(&small.body)),
        (200, config.clone())
    );
    // Past its lifetime the URL is refused; the mirror hands out a fresh one.
    std::thread::sleep(Duration::from_secs(TTL + 2));
    assert_eq!(
        faults::get(&plain, &location, &[]).status,
        403,
        "expired URL"
    );
    let again = ok(&s, client.get(blob_url(&layer)).send().map_err(Into::into));
    let fresh = faults::get(&plain, &header(&again, "location"), &[]);
    assert_eq!(
        (
            again.status().as_u16(),
            fresh.status,
            mirror_tests::digest_of(&fresh.body)
        ),
        (307, 200, layer.clone())
    );
    assert_eq!(
        layer_fetches(&s, &layer),
        1,
        "upstream fetches of the layer"
    );
}
