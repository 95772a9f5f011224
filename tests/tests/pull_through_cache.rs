//! A user's session with a `cache = true` registry (gcr.io in the shipped declaration):
//! Envoy's filter routes it to the cache-service, which pulls from the gcr-like upstream
//! (real distribution, token realm on its own host) once and serves repeats itself.

use mirror_tests::cache::{self, CachedMirror};
use mirror_tests::clients::{self, SkopeoPull};
use mirror_tests::upstreams::Front;

fn ok<T>(c: &CachedMirror, r: anyhow::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e:#}\n{}", c.logs()),
    }
}

fn skopeo(c: &CachedMirror, reference: &str) -> clients::PulledDir {
    let opts = SkopeoPull {
        all: false,
        cert_dir: Some(c.mirror.up.pki.cert_dir.clone()),
        registries_conf: None,
    };
    ok(c, clients::skopeo_pull(reference, &opts))
}

#[test]
fn skopeo_pulls_through_the_cache_and_repeats_are_served_from_it() {
    let c = cache::shared();
    let m = &c.mirror;
    let image = &m.up.images.distroless;
    let reference = format!("{}/distroless/static:nonroot", m.host("gcr"));
    skopeo(c, &reference).assert_is(image, false);
    let after_first = c.upstream_blob_gets(image);
    assert!(
        after_first >= image.all_blobs().len(),
        "the upstream served {after_first} blobs\n{}",
        c.logs()
    );
    // Everything the upstream saw came from the cache-service, never from Envoy directly.
    let gcr = m.up.access_log(Front::Gcr);
    assert!(
        gcr.iter().all(|e| e.ua.starts_with("regmirror/")),
        "{gcr:#?}"
    );

    skopeo(c, &reference).assert_is(image, false);
    assert_eq!(
        c.upstream_blob_gets(image),
        after_first,
        "a repeat pull fetched blobs from the upstream again\n{}",
        c.logs()
    );
}

#[test]
fn skopeo_pulls_a_cached_registry_with_a_path_prefix() {
    let c = cache::shared();
    let m = &c.mirror;
    skopeo(c, &format!("{}/gcr.io/distroless/static:nonroot", m.addr()))
        .assert_is(&m.up.images.distroless, false);
}

#[test]
fn containerd_pulls_through_the_cache() {
    let c = cache::shared();
    let m = &c.mirror;
    let ctrd = clients::containerd();
    let hosts = tempfile::tempdir().unwrap();
    clients::write_hosts_toml(hosts.path(), "gcr.io", &m.addr(), &m.up.pki.ca).unwrap();
    let ns = format!("gcr-{}", hex::encode(rand::random::<[u8; 4]>()));
    let reference = "gcr.io/distroless/static:nonroot";
    ok(c, ctrd.pull(&ns, hosts.path(), reference, &[]));
    let image = &m.up.images.distroless;
    assert_eq!(ok(c, ctrd.image_digest(&ns, reference)), image.digest);
    for d in image.all_blobs() {
        ok(c, ctrd.verify_content(&ns, &d));
    }
}

#[test]
fn concurrent_cold_pulls_fetch_each_blob_once() {
    let c = cache::shared();
    let m = &c.mirror;
    let image = &m.up.images.pause;
    let reference = format!("{}/google-containers/pause:3.9", m.host("gcr"));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| skopeo(c, &reference))).collect();
        for h in handles {
            h.join().unwrap().assert_is(image, false);
        }
    });
    let layer = &image.platforms[0].layer_digests[0];
    let fetches =
        m.up.access_log(Front::Gcr)
            .iter()
            .filter(|e| e.method == "GET" && e.path().ends_with(&format!("/blobs/{layer}")))
            .count();
    assert_eq!(
        fetches,
        1,
        "4 concurrent pulls fetched the layer {fetches} times\n{}",
        c.logs()
    );
}
