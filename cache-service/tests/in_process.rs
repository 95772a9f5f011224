//! The cache in-process (`build_app`) against a fake upstream: what a client pulling through it
//! depends on — verified bytes, statuses, OCI error codes — and how often the upstream is asked.
// Test code (and its support module): a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use regmirror::http::server::ClientTimeouts;
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

/// A counter or gauge without labels, as the mirror's /metrics reports it.
async fn metric(m: &Mirror, name: &str) -> u64 {
    m.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

async fn sendfile_bytes(m: &Mirror) -> u64 {
    metric(m, "regmirror_bytes_sendfile_total").await
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

/// A range of a cold blob comes out of the download every client shares: its bytes, too, are
/// only complete once the whole blob verified.
#[tokio::test]
async fn a_range_of_a_cold_blob_is_never_complete_before_the_digest_verified() {
    let up = FakeUpstream::start().await;
    let real = vec![7u8; 1 << 20];
    let d = digest_of(&real);
    let mut tampered = real.clone();
    tampered[1000] = 8;
    up.blob(&d, tampered);
    let m = Mirror::start(&up, TTL).await;
    let path = format!("/v2/lab/app/blobs/{d}");
    let (status, body) = fetch(m.get(&path).header("range", "bytes=0-9")).await;
    assert!(
        !(status.is_success() && body.is_some()),
        "bytes of a blob that fails its digest reached the client as a complete body: {status} {body:?}"
    );
}

/// A client that takes no index (an old engine, a script asking for an image manifest) pulling
/// a multi-platform tag gets its linux/amd64 manifest, as from distribution or Docker Hub; by
/// digest it gets exactly what it named or nothing.
#[tokio::test]
async fn a_client_that_takes_no_index_gets_a_tags_linux_amd64_manifest() {
    const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    let up = FakeUpstream::start().await;
    let (arm, amd) = (
        manifest_with(b"arm64 config"),
        manifest_with(b"amd64 config"),
    );
    let (arm_d, amd_d) = (digest_of(arm.as_bytes()), digest_of(amd.as_bytes()));
    up.manifest(&arm_d, &arm);
    up.manifest(&amd_d, &amd);
    let entry = |d: &str, size: usize, arch: &str| {
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":{size},"platform":{{"os":"linux","architecture":"{arch}"}}}}"#
        )
    };
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{},{}]}}"#,
        entry(&arm_d, arm.len(), "arm64"),
        entry(&amd_d, amd.len(), "amd64")
    );
    let index_d = up.manifest("multi", &index);
    let m = Mirror::start(&up, TTL).await;
    let ask = |method: Method, reference: &str, accept: &str| {
        m.request(method, &format!("/v2/lab/app/manifests/{reference}"))
            .header("accept", accept)
            .send()
    };
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    // A client that takes indexes gets the index.
    let resp = ask(Method::GET, "multi", OCI_INDEX).await.expect("answer");
    assert_eq!(
        header(&resp, "docker-content-digest"),
        Some(index_d.clone())
    );
    assert_eq!(resp.bytes().await.expect("body"), index.as_bytes());

    // One that takes only image manifests gets linux/amd64's, by GET and by HEAD.
    let resp = ask(Method::GET, "multi", OCI_MANIFEST)
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "docker-content-digest"), Some(amd_d.clone()));
    assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(resp.bytes().await.expect("body"), amd.as_bytes());
    let resp = ask(Method::HEAD, "multi", OCI_MANIFEST)
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "docker-content-digest"), Some(amd_d.clone()));
    assert_eq!(header(&resp, "content-length"), Some(amd.len().to_string()));

    // By digest the index is what was named: not served to a client that cannot take it.
    let resp = ask(Method::GET, &index_d, OCI_MANIFEST)
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp
        .text()
        .await
        .expect("body")
        .contains("MANIFEST_UNKNOWN"));

    // A tag whose index names no linux/amd64 manifest has nothing for it either.
    let arm_only = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        entry(&arm_d, arm.len(), "arm64")
    );
    up.manifest("arm-only", &arm_only);
    let resp = ask(Method::GET, "arm-only", OCI_MANIFEST)
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// A registry whose HEAD names a digest it does not serve by digest yet: the tag's own GET is
/// what the client gets (and what the tag is stored as), not a 404 for the tag's lifetime.
#[tokio::test]
async fn a_tag_whose_digest_is_not_served_yet_is_fetched_by_tag() {
    let up = FakeUpstream::start().await;
    let body = manifest_with(b"lagging replica");
    up.tag_only("2.0", &body);
    let m = Mirror::start(&up, TTL).await;
    for _ in 0..2 {
        let (status, got) = fetch(
            m.get("/v2/lab/app/manifests/2.0")
                .header("accept", OCI_MANIFEST),
        )
        .await;
        assert_eq!(
            (status, got.as_deref()),
            (StatusCode::OK, Some(body.as_bytes()))
        );
    }
    assert_eq!(
        up.hits(Method::GET, "/manifests/2.0"),
        1,
        "fetched by tag once, then served from the cache"
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

/// A stored blob larger than a mapped window (4 MiB) goes from the page cache to the socket
/// by `sendfile`: whole, and in ranges within and across windows, the bytes are the blob's.
#[tokio::test]
async fn a_large_cached_blob_is_sent_whole_and_in_ranges_from_the_page_cache() {
    let up = FakeUpstream::start().await;
    let blob: Vec<u8> = (0..10 * 1024 * 1024 + 7u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let d = digest_of(&blob);
    up.blob(&d, blob.clone());
    let m = Mirror::start(&up, TTL).await;
    let path = format!("/v2/lab/app/blobs/{d}");
    let (status, body) = fetch(m.get(&path)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.map(|b| digest_of(&b)), Some(d.clone()), "cold");
    // Stored once the download ends (its last bytes reach the client first).
    let mut warm = None;
    for _ in 0..100 {
        let (status, body) = fetch(m.get(&path)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_deref().map(digest_of), Some(d.clone()), "warm");
        if up.hits(Method::GET, &d) == 1 {
            warm = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(warm.is_some(), "never served from the store");
    // Whole: every body byte went from the page cache to the socket.
    let before = sendfile_bytes(&m).await;
    let (_, body) = fetch(m.get(&path)).await;
    assert_eq!(body.as_deref().map(digest_of), Some(d.clone()), "warm");
    assert_eq!(
        sendfile_bytes(&m).await - before,
        blob.len() as u64,
        "the whole body by sendfile"
    );
    let window = 4 * 1024 * 1024;
    for (start, end) in [
        (0, 99),
        (window - 10, window + 10),
        (window + 5, 2 * window + 3),
        (blob.len() - 100, blob.len() - 1),
    ] {
        let before = sendfile_bytes(&m).await;
        let resp = m
            .get(&path)
            .header("range", format!("bytes={start}-{end}"))
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        let got = resp.bytes().await.expect("body");
        assert!(got[..] == blob[start..=end], "bytes {start}-{end}");
        assert_eq!(
            sendfile_bytes(&m).await - before,
            (end - start + 1) as u64,
            "bytes {start}-{end} by sendfile"
        );
    }
    assert_eq!(up.hits(Method::GET, &d), 1, "served from the cache");
}

/// A client that falls behind a cold download gets the rest from the download's spool by
/// `sendfile` (no read back into memory), and the body is still the verified blob.
#[tokio::test]
async fn a_client_behind_a_cold_download_is_sent_the_spool_from_the_page_cache() {
    let up = FakeUpstream::start().await;
    let blob: Vec<u8> = (0..64 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let d = digest_of(&blob);
    up.blob(&d, blob.clone());
    let m = Mirror::start(&up, TTL).await;
    let before = sendfile_bytes(&m).await;
    let resp = m
        .get(&format!("/v2/lab/app/blobs/{d}"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    // The download runs to its end while the client reads nothing: the loopback socket's
    // buffers take a few MiB (tens on a host that raised their limits), the rest waits in the
    // spool. (That windows are mapped while the download still appends is a unit test.)
    let mut stored = false;
    for _ in 0..500 {
        if metric(&m, "regmirror_store_bytes").await >= blob.len() as u64 {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stored, "the download was never stored");
    let body = resp.bytes().await.expect("the whole body");
    assert_eq!(digest_of(&body), d, "the verified blob");
    let by_sendfile = sendfile_bytes(&m).await - before;
    assert!(
        by_sendfile >= blob.len() as u64 / 4,
        "the bytes behind the download went by sendfile: {by_sendfile} of {}",
        blob.len()
    );
    assert_eq!(up.hits(Method::GET, &d), 1);
}

/// Stored blobs go out as mapped page-cache windows that only the kernel may read (a file
/// truncated behind the cache then cuts the response instead of killing the process), so the
/// cache listener speaks HTTP/1.1 only: an HTTP/2 prior-knowledge client is refused.
#[tokio::test]
async fn the_cache_listener_refuses_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let m = Mirror::start(&up, TTL).await;
    let addr = m.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The client preface and an empty SETTINGS frame (RFC 9113 §3.4).
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("write");
    // An HTTP/2 server answers with its SETTINGS frame and keeps the connection open; an
    // HTTP/1.1 one closes it, with a 4xx or without a word.
    let mut answer = vec![0; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
        .await
        .expect("an answer or a close")
        .expect("read");
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(
        n == 0 || text.starts_with("HTTP/1.1 4"),
        "an HTTP/2 answer: {:?}",
        &answer[..n]
    );
    let (status, _) = fetch(m.get("/healthz")).await;
    assert_eq!(status, StatusCode::OK, "HTTP/1.1 still served");
}

/// A client that trickles its request head, or keeps a connection idle, is disconnected after
/// the head timeout: it cannot hold the cache's connections (and descriptors) forever.
#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let timeouts = ClientTimeouts {
        request_head: Duration::from_secs(1),
        ..ClientTimeouts::default()
    };
    let m = Mirror::with_client_timeouts(&up, timeouts).await;
    let addr = m.base.trim_start_matches("http://").to_owned();
    let closed_within = |mut conn: tokio::net::TcpStream| async move {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
            .await
            .is_ok()
    };

    let mut trickling = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    trickling
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(trickling).await,
        "a half-sent head is cut off"
    );

    // A finished request is answered; the idle connection after it is closed in its turn.
    let mut idle = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).await.expect("an answer");
    assert_eq!(&answer, b"HTTP/1.1 200");
    assert!(
        closed_within(idle).await,
        "an idle keep-alive connection is closed"
    );
}

/// A client that stops reading a blob is disconnected once the writes to it made no progress
/// for the stall timeout, so it cannot pin the blob it is sent for as long as it stays
/// connected. A client that reads is not.
#[tokio::test]
async fn a_client_that_stops_reading_a_blob_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let blob: Vec<u8> = (0..64 * 1024 * 1024u32).map(|i| (i >> 9) as u8).collect();
    let d = digest_of(&blob);
    up.blob(&d, blob.clone());
    let timeouts = ClientTimeouts {
        stalled_write: Duration::from_secs(1),
        ..ClientTimeouts::default()
    };
    let m = Mirror::with_client_timeouts(&up, timeouts).await;
    let path = format!("/v2/lab/app/blobs/{d}");
    let (status, body) = fetch(m.get(&path)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body.map(|b| digest_of(&b)),
        Some(d.clone()),
        "a reading client gets it all"
    );

    let addr = m.base.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    stalled
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // Reads nothing for three times the stall timeout, then takes what the sockets held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(
        got.len() < blob.len(),
        "the stalled client was cut off, not sent the whole blob ({} bytes)",
        got.len()
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

/// Private images through the cache (`client_auth = "upstream"`): the fake upstream issues
/// per-user tokens and allows `alice` and `carol` to read `private/secret`, `bob` nothing.
mod authorized_upstream {
    use super::*;
    use support::{basic, token_of, Mirror};

    const REPO: &str = "private/secret";

    struct Lab {
        up: FakeUpstream,
        mirror: Mirror,
        manifest: String,
        manifest_digest: String,
        layer: Vec<u8>,
        layer_digest: String,
    }

    async fn lab(authorization_ttl: Duration) -> Lab {
        let up = FakeUpstream::start().await;
        for user in ["alice", "carol"] {
            up.allow(REPO, user);
        }
        up.allow("other/repo", "bob");
        let layer = b"secret layer".to_vec();
        let layer_digest = digest_of(&layer);
        up.blob(&layer_digest, layer.clone());
        let manifest = manifest_with(&layer);
        let manifest_digest = up.manifest("1.0", &manifest);
        let mirror = Mirror::authorizing(&up, authorization_ttl).await;
        Lab {
            up,
            mirror,
            manifest,
            manifest_digest,
            layer,
            layer_digest,
        }
    }

    impl Lab {
        /// What a client does: the token through the mirror's relay (the realm the
        /// upstream's challenge names), with its login.
        async fn login(&self, user: &str) -> String {
            let resp = self
                .mirror
                .get(&format!(
                    "/_mirror/auth/{}/token?service=fake&scope=repository:{REPO}:pull",
                    self.up.addr
                ))
                .header("x-mirror-registry", "lab")
                .header("authorization", basic(user))
                .send()
                .await
                .expect("answer");
            assert_eq!(resp.status(), StatusCode::OK, "{user} logs in");
            let json: serde_json::Value = resp.json().await.expect("token JSON");
            let token = json
                .get("token")
                .and_then(|t| t.as_str())
                .expect("a token")
                .to_owned();
            assert_eq!(token, token_of(user));
            format!("Bearer {token}")
        }

        /// The manifest by tag and the layer, as `authorization` (`None`: anonymous):
        /// the statuses, and the bytes when served.
        async fn pull(&self, authorization: Option<&str>) -> Vec<(StatusCode, Option<Vec<u8>>)> {
            let mut out = Vec::new();
            for path in [
                format!("/v2/{REPO}/manifests/1.0"),
                format!("/v2/{REPO}/blobs/{}", self.layer_digest),
            ] {
                let mut r = self.mirror.get(&path).header("accept", OCI_MANIFEST);
                if let Some(a) = authorization {
                    r = r.header("authorization", a);
                }
                out.push(fetch(r).await);
            }
            out
        }

        fn assert_served(&self, got: &[(StatusCode, Option<Vec<u8>>)]) {
            let want = [self.manifest.as_bytes(), &self.layer[..]];
            for ((status, body), want) in got.iter().zip(want) {
                assert_eq!(*status, StatusCode::OK);
                assert_eq!(body.as_deref(), Some(want), "the verified bytes");
            }
            assert_eq!(digest_of(self.manifest.as_bytes()), self.manifest_digest);
        }

        /// Upstream requests carrying `authorization`.
        fn requests_as(&self, authorization: &str) -> usize {
            self.up
                .seen()
                .iter()
                .filter(|s| s.authorization.as_deref() == Some(authorization))
                .count()
        }
    }

    /// An upstream behind a login proxy sends anonymous requests to its sign-in page: that
    /// redirect decides nothing, so an anonymous client is not served what alice's pull
    /// cached.
    #[tokio::test]
    async fn a_redirect_to_a_sign_in_page_authorizes_nobody() {
        let lab = lab(Duration::from_secs(60)).await;
        let alice = lab.login("alice").await;
        lab.assert_served(&lab.pull(Some(&alice)).await);
        lab.up.redirect_anonymous_to_login();
        for (status, body) in lab.pull(None).await {
            assert!(!status.is_success(), "anonymous: {status}");
            let body = body.unwrap_or_default();
            assert!(
                !body.windows(lab.layer.len()).any(|w| w == lab.layer)
                    && body != lab.manifest.as_bytes(),
                "cached content reached an anonymous client"
            );
        }
    }

    async fn error_code(resp: reqwest::Response) -> String {
        let json: serde_json::Value = resp.json().await.expect("OCI error JSON");
        json.pointer("/errors/0/code")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_owned()
    }

    #[tokio::test]
    async fn an_anonymous_client_gets_the_upstreams_own_challenge() {
        let lab = lab(Duration::from_secs(60)).await;
        let challenge = format!(
            r#"Bearer realm="http://{}/token",service="fake",scope="repository:{REPO}:pull""#,
            lab.up.addr
        );
        let resp = lab
            .mirror
            .get(&format!("/v2/{REPO}/manifests/1.0"))
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(challenge.as_str()),
            "verbatim, so the client logs in where the upstream says"
        );
        assert_eq!(error_code(resp).await, "UNAUTHORIZED");
        // The ping too: a client's login starts there.
        let resp = lab.mirror.get("/v2/").send().await.expect("answer");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().contains_key("www-authenticate"));
        assert_eq!(
            lab.up.hits(Method::GET, "/manifests/1.0") + lab.up.hits(Method::GET, "/blobs/"),
            0,
            "nothing fetched for a client nobody authorized"
        );
    }

    #[tokio::test]
    async fn an_allowed_client_is_served_and_its_decision_reused_within_the_ttl() {
        let lab = lab(Duration::from_secs(60)).await;
        let alice = lab.login("alice").await;
        lab.assert_served(&lab.pull(Some(&alice)).await);
        let seen = lab.up.seen().len();

        lab.assert_served(&lab.pull(Some(&alice)).await);
        assert_eq!(
            lab.up.seen().len(),
            seen,
            "within the decision's time: no check, nothing fetched: {:?}",
            lab.up.seen().get(seen..)
        );
        let metrics = lab.mirror.metrics().await;
        assert!(
            metrics.contains(
                r#"regmirror_authorization_checks_total{registry="lab",result="allowed"} 1"#
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"regmirror_authorization_cache_hits_total{registry="lab"} 3"#),
            "the first pull's layer and the second pull: {metrics}"
        );
        assert!(
            metrics.contains(r#"regmirror_token_relays_total{registry="lab",status="2xx"} 1"#),
            "{metrics}"
        );
        assert!(
            !metrics.contains("tok-alice"),
            "no credential in the metrics"
        );
    }

    #[tokio::test]
    async fn a_client_the_upstream_refuses_is_refused_although_the_content_is_cached() {
        let lab = lab(Duration::from_secs(60)).await;
        let alice = lab.login("alice").await;
        lab.assert_served(&lab.pull(Some(&alice)).await);

        let bob = lab.login("bob").await;
        for (status, _) in lab.pull(Some(&bob)).await {
            assert_eq!(status, StatusCode::FORBIDDEN);
        }
        let resp = lab
            .mirror
            .get(&format!("/v2/{REPO}/blobs/{}", lab.layer_digest))
            .header("authorization", &bob)
            .send()
            .await
            .expect("answer");
        assert_eq!(error_code(resp).await, "DENIED");
        assert_eq!(
            lab.requests_as(&bob),
            3,
            "a denial is not remembered: one check per request"
        );
        for (status, _) in lab.pull(None).await {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        // A made-up token is the upstream's to judge, never served.
        for (status, _) in lab.pull(Some("Bearer forged")).await {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        let metrics = lab.mirror.metrics().await;
        assert!(
            metrics.contains(
                r#"regmirror_authorization_checks_total{registry="lab",result="denied"} 7"#
            ),
            "{metrics}"
        );
    }

    /// A fleet pulling one image with one pull secret: the requests that need the same
    /// check while it is in progress share its one upstream request, allowed or refused.
    #[tokio::test]
    async fn concurrent_identical_checks_ask_the_upstream_once() {
        let lab = lab(Duration::from_secs(60)).await;
        let (alice, bob) = (lab.login("alice").await, lab.login("bob").await);
        // Each check takes a while, so the requests arrive while it is in progress.
        lab.up.delay_blobs(Duration::from_millis(300));
        let path = format!("/v2/{REPO}/blobs/{}", lab.layer_digest);
        let get = |authorization: &str| {
            let r = lab.mirror.get(&path).header("authorization", authorization);
            fetch(r)
        };
        let (allowed, refused) = tokio::join!(
            futures::future::join_all((0..8).map(|_| get(&alice))),
            futures::future::join_all((0..4).map(|_| get(&bob))),
        );
        for (status, body) in allowed {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body.as_deref(), Some(&lab.layer[..]), "the verified bytes");
        }
        for (status, _) in refused {
            assert_eq!(status, StatusCode::FORBIDDEN);
        }
        let checks_as = |authorization: &str| {
            let seen = lab.up.seen();
            seen.iter()
                .filter(|s| s.method == Method::HEAD && s.path == path)
                .filter(|s| s.authorization.as_deref() == Some(authorization))
                .count()
        };
        assert_eq!(checks_as(&alice), 1, "8 requests, one check");
        assert_eq!(checks_as(&bob), 1, "4 refused requests, one check");
        let metrics = lab.mirror.metrics().await;
        for result in ["allowed", "denied"] {
            let line = format!(
                r#"regmirror_authorization_checks_total{{registry="lab",result="{result}"}} 1"#
            );
            assert!(metrics.contains(&line), "{line} in {metrics}");
        }
    }

    #[tokio::test]
    async fn a_token_refused_upstream_before_its_decision_ran_out_gets_the_challenge_again() {
        let lab = lab(Duration::from_secs(300)).await;
        let alice = lab.login("alice").await;
        let manifest = || {
            lab.mirror
                .get(&format!("/v2/{REPO}/manifests/1.0"))
                .header("accept", OCI_MANIFEST)
                .header("authorization", &alice)
        };
        assert_eq!(fetch(manifest()).await.0, StatusCode::OK);
        // Her token expires upstream while the mirror still holds her decision; the layer
        // is not cached, so it is fetched with that token.
        lab.up.expire("alice");
        let resp = lab
            .mirror
            .get(&format!("/v2/{REPO}/blobs/{}", lab.layer_digest))
            .header("authorization", &alice)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let challenge = format!(
            r#"Bearer realm="http://{}/token",service="fake",scope="repository:{REPO}:pull""#,
            lab.up.addr
        );
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(challenge.as_str()),
            "the upstream's challenge, to log in anew"
        );
        // Nor is the cached manifest served to her on the decision from before.
        assert_eq!(fetch(manifest()).await.0, StatusCode::UNAUTHORIZED);
        let carol = lab.login("carol").await;
        lab.assert_served(&lab.pull(Some(&carol)).await);
    }

    #[tokio::test]
    async fn a_decision_expires_and_a_revoked_client_is_then_refused() {
        let lab = lab(Duration::from_secs(1)).await;
        let alice = lab.login("alice").await;
        lab.assert_served(&lab.pull(Some(&alice)).await);
        let before = lab.requests_as(&alice);

        tokio::time::sleep(Duration::from_millis(1100)).await;
        lab.assert_served(&lab.pull(Some(&alice)).await);
        assert_eq!(
            lab.requests_as(&alice),
            before + 1,
            "one check after the decision expired, the content from the cache"
        );

        lab.up.revoke(REPO, "alice");
        lab.assert_served(&lab.pull(Some(&alice)).await);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for (status, _) in lab.pull(Some(&alice)).await {
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "revoked, once the decision ran out"
            );
        }
    }

    #[tokio::test]
    async fn with_the_upstream_down_only_a_client_with_a_decision_is_served() {
        let lab = lab(Duration::from_secs(60)).await;
        let alice = lab.login("alice").await;
        let carol = lab.login("carol").await;
        lab.assert_served(&lab.pull(Some(&alice)).await);

        lab.up.set_down(true);
        lab.assert_served(&lab.pull(Some(&alice)).await);
        for (status, _) in lab.pull(Some(&carol)).await {
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "allowed upstream, but nobody could say so"
            );
        }
        let resp = lab
            .mirror
            .get(&format!("/v2/{REPO}/manifests/1.0"))
            .header("authorization", &carol)
            .send()
            .await
            .expect("answer");
        assert_eq!(error_code(resp).await, "UNAVAILABLE");

        lab.up.set_down(false);
        lab.assert_served(&lab.pull(Some(&carol)).await);
    }

    #[tokio::test]
    async fn content_is_fetched_once_for_two_allowed_clients() {
        let lab = lab(Duration::from_secs(60)).await;
        let alice = lab.login("alice").await;
        let carol = lab.login("carol").await;
        lab.assert_served(&lab.pull(Some(&alice)).await);
        lab.assert_served(&lab.pull(Some(&carol)).await);
        assert_eq!(lab.up.hits(Method::GET, &lab.layer_digest), 1, "the layer");
        assert_eq!(lab.up.hits(Method::GET, &lab.manifest_digest), 1);
        let carols: Vec<_> = lab
            .up
            .seen()
            .into_iter()
            .filter(|s| s.authorization.as_deref() == Some(carol.as_str()))
            .collect();
        assert_eq!(
            carols.len(),
            1,
            "carol: one check and nothing else: {carols:?}"
        );
        assert_eq!(carols[0].method, Method::HEAD);
    }

    #[tokio::test]
    async fn the_token_relay_forwards_only_the_upstreams_realm_and_relays_its_answer() {
        let lab = lab(Duration::from_secs(60)).await;
        let bystander = FakeUpstream::start().await;
        let relay = |path: String, authorization: &str| {
            lab.mirror
                .get(&path)
                .header("x-mirror-registry", "lab")
                .header("authorization", authorization)
        };
        let alice = basic("alice");
        for path in [
            format!("/_mirror/auth/{}/v2/", lab.up.addr),
            format!("/_mirror/auth/{}/token/../v2/", lab.up.addr),
            format!("/_mirror/auth/{}/token", bystander.addr),
            "/_mirror/auth/evil.example/token".to_owned(),
            "/_mirror/auth/".to_owned(),
        ] {
            let resp = relay(path.clone(), &alice).send().await.expect("answer");
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
            assert_eq!(error_code(resp).await, "DENIED", "{path}");
        }
        assert!(bystander.seen().is_empty(), "{:?}", bystander.seen());
        assert!(
            lab.up
                .seen()
                .iter()
                .all(|s| s.authorization.is_none() && s.path == "/v2/"),
            "the credential went nowhere; the realm was asked anonymously: {:?}",
            lab.up.seen()
        );

        // The realm's answer as it is: a wrong password's 401 and challenge, then a token.
        let resp = relay(
            format!("/_mirror/auth/{}/token?service=fake", lab.up.addr),
            "Basic bm9ib2R5Om5v",
        )
        .send()
        .await
        .expect("answer");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(r#"Basic realm="fake""#)
        );
        assert_eq!(resp.text().await.expect("body"), "bad credentials");
        let token = lab.login("alice").await;
        assert_eq!(token, format!("Bearer {}", token_of("alice")));
        let asked: Vec<_> = lab
            .up
            .seen()
            .into_iter()
            .filter(|s| s.path == "/token")
            .collect();
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert_eq!(asked[1].authorization.as_deref(), Some(alice.as_str()));
        assert_eq!(
            asked[1].query.as_deref(),
            Some("service=fake&scope=repository:private/secret:pull"),
            "the client's query, verbatim"
        );

        // A token request that reached another registry's realm (the shared host's ping
        // named the default registry's): the upstream's own realm, with its own service.
        let resp = relay(
            format!("/_mirror/token?service=registry.docker.io&scope=repository:{REPO}:pull"),
            &alice,
        )
        .send()
        .await
        .expect("answer");
        assert_eq!(resp.status(), StatusCode::OK);
        let json: serde_json::Value = resp.json().await.expect("token JSON");
        assert_eq!(
            json.get("token").and_then(|t| t.as_str()),
            Some(token_of("alice").as_str())
        );
        let last = lab.up.seen().into_iter().last().expect("asked");
        assert_eq!(
            (last.path.as_str(), last.query.as_deref()),
            (
                "/token",
                Some("service=fake&scope=repository%3Aprivate%2Fsecret%3Apull")
            ),
            "the realm's service, the client's scope"
        );

        // A registry whose clients do not log in upstream relays nothing.
        let anonymous = Mirror::start(&lab.up, TTL).await;
        let resp = anonymous
            .get(&format!("/_mirror/auth/{}/token", lab.up.addr))
            .header("x-mirror-registry", "lab")
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
}
