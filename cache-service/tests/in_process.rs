//! The cache in-process (`build_app`) against a fake upstream: what a client pulling through it
//! depends on — verified bytes, statuses, OCI error codes — and how often the upstream is asked.
// Test code (and its support module): a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use support::{digest_of, FakeUpstream, Mirror, OCI_MANIFEST, TOKEN};

const TTL: Duration = Duration::from_secs(300);

fn manifest_with(layer: &[u8]) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
        digest_of(layer),
        layer.len()
    )
}

/// Status and the whole body, or `None` for the body when the response was cut.
async fn fetch(r: reqwest::RequestBuilder) -> (StatusCode, Option<Vec<u8>>) {
    let resp = r.send().await.expect("the cache answers");
    let status = resp.status();
    (status, resp.bytes().await.ok().map(|b| b.to_vec()))
}

#[tokio::test]
async fn a_blob_is_served_and_kept_only_after_its_digest_verified() {
    let up = FakeUpstream::start().await;
    let real = b"the real layer".to_vec();
    let d = digest_of(&real);
    up.blob(&d, b"tampered bytes".to_vec());
    let m = Mirror::start(&up, TTL).await;
    let path = format!("/v2/lab/app/blobs/{d}");

    let (status, body) = fetch(m.get(&path)).await;
    assert!(
        !(status == StatusCode::OK && body.is_some()),
        "wrong bytes must not reach the client as a complete body: {status} {body:?}"
    );
    // Nothing was kept: the next request asks upstream again.
    let _ = fetch(m.get(&path)).await;
    assert_eq!(up.hits(Method::GET, &d), 2);

    up.blob(&d, real.clone());
    let (status, body) = fetch(m.get(&path)).await;
    assert_eq!((status, body.as_deref()), (StatusCode::OK, Some(&real[..])));
    let (status, body) = fetch(m.get(&path)).await;
    assert_eq!((status, body.as_deref()), (StatusCode::OK, Some(&real[..])));
    assert_eq!(
        up.hits(Method::GET, &d),
        3,
        "the verified blob is served from the cache"
    );
}

#[tokio::test]
async fn a_tag_is_resolved_once_per_ttl() {
    let up = FakeUpstream::start().await;
    let body = manifest_with(b"config");
    let d = up.manifest("1.0", &body);
    let m = Mirror::start(&up, TTL).await;
    let accept = ("accept", OCI_MANIFEST);

    for _ in 0..3 {
        let resp = m
            .get("/v2/lab/app/manifests/1.0")
            .header(accept.0, accept.1)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok()),
            Some(d.as_str())
        );
        assert_eq!(resp.bytes().await.expect("body"), body.as_bytes());
    }
    let tag_calls =
        up.hits(Method::HEAD, "/manifests/1.0") + up.hits(Method::GET, "/manifests/1.0");
    assert_eq!(
        tag_calls, 1,
        "the tag is asked upstream once within the TTL"
    );
    assert_eq!(
        up.hits(Method::GET, &d),
        1,
        "the manifest body is fetched once"
    );

    // With a TTL of 0 every pull revalidates the tag (a HEAD), the body stays cached.
    let m0 = Mirror::start(&up, Duration::ZERO).await;
    for _ in 0..2 {
        let (status, got) = fetch(
            m0.get("/v2/lab/app/manifests/1.0")
                .header(accept.0, accept.1),
        )
        .await;
        assert_eq!(
            (status, got.as_deref()),
            (StatusCode::OK, Some(body.as_bytes()))
        );
    }
    assert_eq!(up.hits(Method::HEAD, "/manifests/1.0"), 3);
    assert_eq!(
        up.hits(Method::GET, &d),
        2,
        "one more body: a new cache, fetched once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_a_cold_blob_share_one_download() {
    const N: usize = 16;
    let up = FakeUpstream::start().await;
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = digest_of(&blob);
    up.blob(&d, blob.clone());
    up.delay_blobs(Duration::from_millis(300));
    let m = std::sync::Arc::new(Mirror::start(&up, TTL).await);

    let pulls: Vec<_> = (0..N)
        .map(|_| {
            let (m, path) = (m.clone(), format!("/v2/lab/app/blobs/{d}"));
            tokio::spawn(async move { fetch(m.get(&path)).await })
        })
        .collect();
    for p in pulls {
        let (status, body) = p.await.expect("pull");
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.as_deref() == Some(&blob[..]),
            "every client gets the verified bytes"
        );
    }
    assert_eq!(
        up.hits(Method::GET, &d),
        1,
        "one upstream download for {N} clients"
    );
}

#[tokio::test]
async fn a_range_of_a_cached_blob() {
    let up = FakeUpstream::start().await;
    let blob = b"0123456789abcdef".to_vec();
    let d = digest_of(&blob);
    up.blob(&d, blob.clone());
    let m = Mirror::start(&up, TTL).await;
    let path = format!("/v2/lab/app/blobs/{d}");
    assert_eq!(fetch(m.get(&path)).await.0, StatusCode::OK);

    let resp = m
        .get(&path)
        .header("range", "bytes=2-5")
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some("bytes 2-5/16")
    );
    assert_eq!(resp.bytes().await.expect("body"), &blob[2..6]);
    let (status, _) = fetch(m.get(&path).header("range", "bytes=99-")).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        up.hits(Method::GET, &d),
        1,
        "ranges are served from the cache"
    );
}

#[tokio::test]
async fn unknown_content_upstream_is_an_oci_error() {
    let up = FakeUpstream::start().await;
    let m = Mirror::start(&up, TTL).await;
    let missing = digest_of(b"nowhere");
    for (path, code) in [
        ("/v2/lab/app/manifests/nope".to_owned(), "MANIFEST_UNKNOWN"),
        (
            format!("/v2/lab/app/manifests/{missing}"),
            "MANIFEST_UNKNOWN",
        ),
        (format!("/v2/lab/app/blobs/{missing}"), "BLOB_UNKNOWN"),
    ] {
        let resp = m.get(&path).send().await.expect("answer");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let json: serde_json::Value = resp.json().await.expect("OCI error JSON");
        assert_eq!(json["errors"][0]["code"], code, "{path}: {json}");
    }
}

#[tokio::test]
async fn the_upstreams_bearer_challenge_is_answered_with_a_token() {
    let up = FakeUpstream::start().await;
    up.require_token();
    let body = manifest_with(b"private config");
    let d = up.manifest("1.0", &body);
    let m = Mirror::start(&up, TTL).await;

    let (status, got) = fetch(m.get(&format!("/v2/lab/app/manifests/{d}"))).await;
    assert_eq!(
        (status, got.as_deref()),
        (StatusCode::OK, Some(body.as_bytes()))
    );
    let (status, _) = fetch(m.get("/v2/lab/app/manifests/1.0")).await;
    assert_eq!(status, StatusCode::OK);

    let seen = up.seen();
    assert_eq!(
        seen.iter().filter(|s| s.path == "/token").count(),
        1,
        "one token for the repository, cached: {seen:?}"
    );
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        seen.iter()
            .any(|s| s.path.ends_with(&d) && s.authorization.as_deref() == Some(&bearer)),
        "retried with the token: {seen:?}"
    );
}
