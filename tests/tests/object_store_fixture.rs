//! The S3 fixture is real: SeaweedFS answers the `object_store` crate with the fixture's
//! credentials, refuses a wrong secret and anonymous requests (403), and a missing bucket is
//! an error. Needs neither the wasm filter nor regmirror.

use mirror_tests::s3::{self, S3Server};
use object_store::{ObjectStoreExt, PutPayload};

#[test]
fn put_get_list_overwrite_delete_round_trip() {
    let s3 = s3::shared();
    let a = b"layer bytes one".to_vec();
    let b = vec![7u8; 5 * 1024 * 1024 + 3]; // > filer.maxMB (4): stored as several chunks
    s3.put("roundtrip/blobs/sha256/aa", &a).unwrap();
    s3.put("roundtrip/blobs/sha256/bb", &b).unwrap();
    s3.put("elsewhere/cc", b"not under the prefix").unwrap();

    assert_eq!(s3.read("roundtrip/blobs/sha256/aa").unwrap(), a);
    assert_eq!(s3.read("roundtrip/blobs/sha256/bb").unwrap(), b);
    assert_eq!(
        s3.list("roundtrip/").unwrap(),
        ["roundtrip/blobs/sha256/aa", "roundtrip/blobs/sha256/bb"]
    );
    assert!(s3.list("").unwrap().contains(&"elsewhere/cc".to_string()));

    // Behind the cache's back: same key, other bytes.
    s3.overwrite("roundtrip/blobs/sha256/aa", b"corrupted")
        .unwrap();
    assert_eq!(s3.read("roundtrip/blobs/sha256/aa").unwrap(), b"corrupted");
    s3.corrupt("roundtrip/blobs/sha256/bb").unwrap();
    let corrupted = s3.read("roundtrip/blobs/sha256/bb").unwrap();
    assert_eq!(corrupted.len(), b.len());
    assert_ne!(corrupted, b);
    assert!(
        s3.overwrite("roundtrip/never-written", b"x").is_err(),
        "overwrite must refuse a key that does not exist"
    );

    s3.delete("roundtrip/blobs/sha256/aa").unwrap();
    assert!(!s3.exists("roundtrip/blobs/sha256/aa").unwrap());
    assert!(s3.read("roundtrip/blobs/sha256/aa").is_err());
    assert_eq!(
        s3.list("roundtrip/").unwrap(),
        ["roundtrip/blobs/sha256/bb"]
    );

    // The fixture's client is the plain object_store API the cache will use.
    let store = s3.store();
    mirror_tests::runtime().block_on(async {
        let p = object_store::path::Path::from("roundtrip/direct");
        store
            .put(&p, PutPayload::from_static(b"direct"))
            .await
            .unwrap();
        let got = store.get(&p).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"direct");
    });
}

#[test]
fn a_wrong_secret_and_anonymous_requests_are_refused() {
    let s3 = s3::shared();
    s3.put("auth/object", b"secret bytes").unwrap();

    // object_store with the right key id but a wrong secret: 403 → PermissionDenied.
    let wrong = s3
        .store_with(&s3.bucket, &s3.access_key, "not-the-secret-0123456789")
        .unwrap();
    let err = mirror_tests::runtime()
        .block_on(async { wrong.get(&"auth/object".into()).await })
        .expect_err("a wrong secret must not read");
    assert!(
        matches!(err, object_store::Error::PermissionDenied { .. }),
        "{err:?}"
    );
    let err = mirror_tests::runtime()
        .block_on(async {
            wrong
                .put(&"auth/intruder".into(), PutPayload::from_static(b"x"))
                .await
        })
        .expect_err("a wrong secret must not write");
    assert!(
        matches!(err, object_store::Error::PermissionDenied { .. }),
        "{err:?}"
    );
    assert!(!s3.exists("auth/intruder").unwrap());

    // Raw signed requests: the right secret 200, a wrong one 403 SignatureDoesNotMatch, an
    // unknown key id 403.
    let path = format!("/{}/auth/object", s3.bucket);
    let (status, body) = s3.signed("GET", &path, b"").unwrap();
    assert_eq!((status, body.as_str()), (200, "secret bytes"));
    let (status, body) = s3
        .signed_as(&s3.access_key, "wrong-secret", "GET", &path, b"")
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("SignatureDoesNotMatch"), "{body}");
    let (status, body) = s3
        .signed_as("AKNOBODY", &s3.secret_key, "GET", &path, b"")
        .unwrap();
    assert_eq!(status, 403, "{body}");

    // Anonymous: no read, no listing, no bucket creation.
    for (method, p) in [
        ("GET", path.as_str()),
        ("GET", &format!("/{}", s3.bucket)),
        ("GET", "/"),
        ("PUT", "/anonymous-bucket"),
    ] {
        let (status, body) = s3.anonymous(method, p).unwrap();
        assert_eq!(status, 403, "anonymous {method} {p}: {body}");
    }
}

#[test]
fn a_missing_bucket_is_an_error() {
    let s3 = s3::shared();
    let missing = s3
        .store_with("no-such-bucket", &s3.access_key, &s3.secret_key)
        .unwrap();
    let rt = mirror_tests::runtime();
    let put = rt.block_on(async {
        missing
            .put(&"k".into(), PutPayload::from_static(b"x"))
            .await
    });
    let put_err = format!(
        "{:?}",
        put.expect_err("a put into a missing bucket must fail")
    );
    assert!(put_err.contains("NoSuchBucket"), "{put_err}");
    let get = rt.block_on(async { missing.get(&"k".into()).await });
    assert!(get.is_err(), "a get from a missing bucket must fail");
    // autoCreateBucket is off: the put above did not create it.
    let (status, _) = s3.signed("HEAD", "/no-such-bucket", b"").unwrap();
    assert_eq!(status, 404);
}

/// A server of its own: start-up time, footprint, an outage, and data kept across a restart.
#[test]
fn starts_small_fails_fast_when_down_and_keeps_data_across_a_restart() {
    let mut s3 = S3Server::start().unwrap();
    let first_start = s3.started_in;
    s3.put("restart/k", b"kept").unwrap();
    let rss = s3.rss_kib().expect("the weed process's VmRSS");
    let disk = s3.disk_usage();
    // An outage: a stopped store is a refused connection (an error the client reports, not
    // a hang).
    s3.stop();
    let outage = format!(
        "{:?}",
        s3.read("restart/k").expect_err("read from a stopped store")
    );
    assert!(outage.contains("Connection refused"), "{outage}");
    s3.restart().unwrap();
    assert_eq!(s3.read("restart/k").unwrap(), b"kept");
    eprintln!(
        "SeaweedFS: first start {first_start:?}, restart {:?}, RSS {} MiB, data dir {} KiB",
        s3.started_in,
        rss / 1024,
        disk / 1024
    );
    assert!(
        disk < 64 * 1024 * 1024,
        "volumes must not preallocate: data dir {disk} bytes"
    );
    assert!(
        rss < 256 * 1024,
        "weed started with {} MiB resident",
        rss / 1024
    );
    let dir = s3.data_dir.clone();
    drop(s3);
    assert!(!dir.exists(), "the data dir is removed on drop");
}
