//! The storage contract (cache-service's `store::BlobStore`) run against BOTH backends: the
//! filesystem store in a temp dir and the object-store backend on a real SeaweedFS (the
//! harness's `s3::shared()`). What the cache relies on: a write is visible only once committed
//! with the right digest and length; a mismatch or a writer dropped mid-way leaves nothing that
//! can be opened, and cleanup removes the leftovers; ranges read back exactly; tags and links
//! round-trip; list and delete agree. Plus what only a bucket has: start-up refuses a wrong
//! secret, a missing bucket and an unreachable endpoint with exit status 2 and the cause; bytes
//! changed in the bucket behind the cache's back are never served complete; the eviction lease
//! has one holder at a time. And the replica's local tier in front of a bucket
//! (`local_cache_size`) keeps the same contract, serves what it verified from its own disk, and
//! stays within its budget.

use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use mirror_tests::harness::{build, s3};
use registry_rules::digest::Digest;
use registry_rules::names::{RepositoryName, Tag};
use regmirror::store::object::{BucketSettings, ObjectBackend, Timings};
use regmirror::store::{self as store, fs::FsStore, BlobStore, Location, TagRecord};

/// The object-store backend reads credentials from the usual AWS variables: set once, before
/// any backend is built, for the shared server.
fn s3_env() -> &'static s3::S3Server {
    static ENV: OnceLock<()> = OnceLock::new();
    let s = s3::shared();
    ENV.get_or_init(|| {
        for (k, v) in s.env() {
            std::env::set_var(k, v);
        }
    });
    s
}

fn settings(s: &s3::S3Server, prefix: &str, spool: &std::path::Path) -> BucketSettings {
    BucketSettings {
        bucket: s.bucket.clone(),
        prefix: prefix.to_owned(),
        endpoint: Some(s.endpoint.clone()),
        region: Some(s.region.clone()),
        spool_dir: spool.to_path_buf(),
        local_cache_size: 0,
        redirect: None,
    }
}

async fn object_backend(prefix: &str, spool: &std::path::Path) -> ObjectBackend {
    let s = s3_env();
    // Abandon age 0: every upload marker found by cleanup counts as abandoned.
    let timings = Timings {
        abandon_after: Duration::ZERO,
        ..Timings::DEFAULT
    };
    ObjectBackend::open_with(&settings(s, prefix, spool), timings)
        .await
        .expect("object backend")
}

/// The harness's S3 helpers block on their own runtime: called from a worker thread here.
fn sync<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn read(store: &dyn BlobStore, d: &Digest, start: u64, end: u64) -> Vec<u8> {
    let blob = store.open(d).await.expect("open").expect("stored");
    let chunks: Vec<Bytes> = blob.range(start, end).try_collect().await.expect("read");
    chunks.concat()
}

async fn write(store: &dyn BlobStore, data: &[u8], chunk: usize) -> Digest {
    let d = Digest::of_bytes(data);
    let mut w = store.begin_write(&d).await.expect("begin");
    for c in data.chunks(chunk.max(1)) {
        w.write(&[Bytes::copy_from_slice(c)]).await.expect("write");
    }
    w.commit(&d, Some(data.len() as u64)).await.expect("commit");
    d
}

/// The contract both backends keep.
async fn contract(store: Arc<dyn BlobStore>) {
    let store = store.as_ref();
    // Larger than one multipart part (8 MiB), not a multiple.
    let big: Vec<u8> = (0..(9 << 20) + 12_345u32)
        .map(|i| (i % 251) as u8)
        .collect();
    let d = write(store, &big, 1 << 20).await;
    let blob = store
        .open(&d)
        .await
        .unwrap()
        .expect("visible once committed");
    assert_eq!(blob.size(), big.len() as u64);
    let n = big.len() as u64;
    assert_eq!(read(store, &d, 0, n).await, big, "whole blob");
    for (s, e) in [
        (0, 1),
        (5, 4 << 20),
        ((4 << 20) - 1, (8 << 20) + 2),
        (n - 3, n),
        (7, 7),
    ] {
        assert_eq!(
            read(store, &d, s, e).await,
            &big[s as usize..e as usize],
            "range {s}-{e}"
        );
    }
    assert_eq!(store.size(&d).await.unwrap(), Some(n));

    // A small blob (one PUT on a bucket).
    let small = write(store, b"hello world", 4).await;
    assert_eq!(read(store, &small, 0, 11).await, b"hello world");

    // Wrong content or length: nothing visible.
    let want = Digest::of_bytes(b"the right bytes");
    let mut w = store.begin_write(&want).await.unwrap();
    w.write(&[Bytes::from_static(b"the wrong bytes")])
        .await
        .unwrap();
    assert!(w.commit(&want, Some(15)).await.is_err());
    let mut w = store.begin_write(&want).await.unwrap();
    w.write(&[Bytes::from_static(b"the right bytes")])
        .await
        .unwrap();
    assert!(w.commit(&want, Some(16)).await.is_err(), "length checked");
    let big_want = Digest::of_bytes(b"never written");
    let mut w = store.begin_write(&big_want).await.unwrap();
    w.write(&[Bytes::from(big.clone())]).await.unwrap();
    assert!(
        w.commit(&big_want, None).await.is_err(),
        "multipart mismatch"
    );
    // Dropped mid-write (an upstream cut): nothing visible.
    let mut w = store.begin_write(&big_want).await.unwrap();
    w.write(&[Bytes::from(big[..(9 << 20)].to_vec())])
        .await
        .unwrap();
    drop(w);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for x in [&want, &big_want] {
        assert!(
            store.open(x).await.unwrap().is_none(),
            "{x} must not be visible"
        );
        assert!(store.size(x).await.unwrap().is_none());
    }

    // Metadata round-trips.
    let name = RepositoryName::parse("library/alpine").unwrap();
    let tag = Tag::parse("3.20").unwrap();
    assert!(store
        .read_tag("docker.io", &name, &tag)
        .await
        .unwrap()
        .is_none());
    let rec = TagRecord {
        digest: d.clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 42,
        fetched_at: 1_700_000_000,
    };
    store
        .write_tag("docker.io", &name, &tag, &rec)
        .await
        .unwrap();
    assert_eq!(
        store.read_tag("docker.io", &name, &tag).await.unwrap(),
        Some(rec)
    );
    assert!(!store.has_link("docker.io", &name, &d).await.unwrap());
    store.add_link("docker.io", &name, &d).await.unwrap();
    assert!(store.has_link("docker.io", &name, &d).await.unwrap());
    assert!(
        !store.has_link("gcr.io", &name, &d).await.unwrap(),
        "per registry"
    );
    store.set_manifest_media_type(&small, "x/y").await.unwrap();
    assert_eq!(
        store.manifest_media_type(&small).await.unwrap().as_deref(),
        Some("x/y")
    );

    // List and delete.
    store.touch(&d).await;
    let listed = store.list().await.unwrap();
    let mut found: Vec<(Digest, u64)> = listed.iter().map(|b| (b.digest.clone(), b.size)).collect();
    found.sort();
    let mut expected = vec![(d.clone(), n), (small.clone(), 11)];
    expected.sort();
    assert_eq!(
        found, expected,
        "metadata is not a blob; nothing unverified listed"
    );
    assert_eq!(store.delete(&d).await.unwrap(), n);
    assert!(store.open(&d).await.unwrap().is_none());
    assert_eq!(store.list().await.unwrap().len(), 1);
    store.check_ready().await.expect("ready");
}

#[test]
fn the_filesystem_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store: Arc<dyn BlobStore> = Arc::new(FsStore::new(dir.path()).unwrap());
        contract(store.clone()).await;
        assert_eq!(
            store.clean_abandoned().await.unwrap(),
            0,
            "nothing left in tmp"
        );
    });
}

#[test]
fn the_object_store_keeps_the_contract() {
    let spool = tempfile::tempdir().unwrap();
    let s = s3_env();
    rt().block_on(async {
        let store: Arc<dyn BlobStore> = Arc::new(object_backend("contract", spool.path()).await);
        contract(store.clone()).await;
        // A dropped writer's upload is aborted in the background, retried for a moment if
        // the store refuses (a part cut off mid-request).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut open = sync(|| s.list("contract/uploads").unwrap());
        while !open.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            open = sync(|| s.list("contract/uploads").unwrap());
        }
        assert!(open.is_empty(), "uploads left open: {open:?}");
        let keys = sync(|| s.list("contract/blobs").unwrap());
        assert_eq!(
            keys.len(),
            1,
            "only verified content under blobs/: {keys:?}"
        );
    });
    assert_eq!(
        std::fs::read_dir(spool.path()).unwrap().count(),
        0,
        "spool files are unnamed"
    );
}

#[test]
fn a_replica_killed_mid_upload_leaves_nothing_served_and_cleanup_aborts_its_upload() {
    let spool = tempfile::tempdir().unwrap();
    let s = s3_env();
    rt().block_on(async {
        let store = object_backend("killed", spool.path()).await;
        let data = vec![7u8; 9 << 20];
        let d = Digest::of_bytes(&data);
        let mut w = store.begin_write(&d).await.unwrap();
        w.write(&[Bytes::from(data)]).await.unwrap();
        // A killed process runs no destructor: its upload stays open.
        std::mem::forget(w);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!sync(|| s
            .exists(&format!("killed/blobs/sha256/{}", d.hex()))
            .unwrap()));
        assert!(store.open(&d).await.unwrap().is_none());
        assert_eq!(
            sync(|| s.list("killed/uploads").unwrap()).len(),
            1,
            "its marker"
        );
        assert_eq!(store.clean_abandoned().await.unwrap(), 1);
        assert!(sync(|| s.list("killed/uploads").unwrap()).is_empty());
        assert!(sync(|| s.list("killed/blobs").unwrap()).is_empty());
    });
}

#[test]
fn an_oversized_record_in_the_bucket_is_refused_not_buffered() {
    let spool = tempfile::tempdir().unwrap();
    let s = s3_env();
    rt().block_on(async {
        let store = object_backend("oversized", spool.path()).await;
        let name = RepositoryName::parse("library/alpine").unwrap();
        let tag = Tag::parse("big").unwrap();
        // A tag record is a few hundred bytes; 1 MiB under its key came from somewhere else.
        let junk = vec![b' '; 1 << 20];
        sync(|| {
            s.put("oversized/tags/docker.io/library/alpine/big.json", &junk)
                .unwrap()
        });
        let err = store
            .read_tag("docker.io", &name, &tag)
            .await
            .expect_err("an oversized record is an error, not a read");
        assert!(
            err.to_string().contains("more than a record may hold"),
            "{err}"
        );
    });
}

/// Each replica keeps what it read in memory: a tag record for `TAG_FRESH` (another replica may
/// refresh it meanwhile), small verified blobs and media types until evicted or deleted.
#[test]
fn a_replica_sees_another_replicas_tag_within_the_fresh_window_and_its_own_writes_and_deletes_at_once(
) {
    let spool = tempfile::tempdir().unwrap();
    let s = s3_env();
    rt().block_on(async {
        let a = object_backend("memory", spool.path()).await;
        let b = object_backend("memory", spool.path()).await;
        let name = RepositoryName::parse("library/alpine").unwrap();
        let tag = Tag::parse("3.21").unwrap();
        let rec = |d: &Digest| TagRecord {
            digest: d.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 2,
            fetched_at: 1_700_000_000,
        };
        let (d1, d2) = (Digest::of_bytes(b"{}"), Digest::of_bytes(b"[]"));
        a.write_tag("docker.io", &name, &tag, &rec(&d1))
            .await
            .unwrap();
        assert_eq!(
            b.read_tag("docker.io", &name, &tag).await.unwrap(),
            Some(rec(&d1))
        );
        // Another replica refreshes the record: seen once the window is over.
        a.write_tag("docker.io", &name, &tag, &rec(&d2))
            .await
            .unwrap();
        assert_eq!(
            a.read_tag("docker.io", &name, &tag).await.unwrap(),
            Some(rec(&d2)),
            "its own write at once"
        );
        // b's copy expires TAG_FRESH after it read it, on std's clock (no clock to pause or
        // inject), so how soon b sees the new record depends on the machine's pace. What
        // holds at every read: the old record or the new one, nothing else; and the new one
        // is seen at all. The deadline, many windows long, only catches a copy that never
        // expires, not a slow machine.
        let deadline = Instant::now() + 30 * regmirror::store::object::TAG_FRESH;
        loop {
            let got = b.read_tag("docker.io", &name, &tag).await.unwrap();
            if got == Some(rec(&d2)) {
                break;
            }
            assert_eq!(got, Some(rec(&d1)), "the old record or the new one");
            assert!(
                Instant::now() < deadline,
                "another replica's tag record never seen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its own write replaces its copy at once, whatever another replica wrote.
        sync(|| {
            s.put(
                "memory/tags/docker.io/library/alpine/3.21.json",
                &serde_json::to_vec(&rec(&d1)).unwrap(),
            )
            .unwrap()
        });
        b.write_tag("docker.io", &name, &tag, &rec(&d2))
            .await
            .unwrap();
        assert_eq!(
            b.read_tag("docker.io", &name, &tag).await.unwrap(),
            Some(rec(&d2))
        );

        // A small blob and its media type, read once by b, then deleted by b: gone at once,
        // in memory and in the bucket; a tag hit needs neither to be asked again meanwhile.
        let manifest = br#"{"schemaVersion":2}"#;
        let d = write(&a, manifest, 64).await;
        a.set_manifest_media_type(&d, "application/vnd.oci.image.manifest.v1+json")
            .await
            .unwrap();
        assert_eq!(read(&b, &d, 0, manifest.len() as u64).await, manifest);
        assert!(b.manifest_media_type(&d).await.unwrap().is_some());
        // The copy in memory is the verified bytes: a changed object in the bucket does not
        // reach a reader of b's copy as that digest.
        sync(|| {
            s.corrupt(&format!("memory/blobs/sha256/{}", d.hex()))
                .unwrap()
        });
        assert_eq!(read(&b, &d, 0, manifest.len() as u64).await, manifest);
        assert_eq!(read(&b, &d, 2, 8).await, &manifest[2..8]);
        b.delete(&d).await.unwrap();
        assert!(
            b.open(&d).await.unwrap().is_none(),
            "deleted by this replica"
        );
        assert!(b.manifest_media_type(&d).await.unwrap().is_none());
        assert!(a.open(&d).await.unwrap().is_none(), "gone from the bucket");
    });
}

/// Where the local tier under `spool` keeps `d`.
fn local_copy(spool: &std::path::Path, d: &Digest) -> std::path::PathBuf {
    let hex = d.hex();
    spool.join("local/blobs/sha256").join(&hex[..2]).join(hex)
}

async fn tiered(prefix: &str, spool: &std::path::Path, budget: u64) -> Arc<dyn BlobStore> {
    let mut b = settings(s3_env(), prefix, spool);
    b.local_cache_size = budget;
    store::open(&Location::Bucket(b))
        .await
        .expect("tiered store")
}

/// The local copy is written beside the response and lands just after it: wait for it.
async fn wait_for(path: &std::path::Path, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() != present {
        assert!(
            Instant::now() < deadline,
            "{} present={present}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_tiered_store_keeps_the_contract() {
    let spool = tempfile::tempdir().unwrap();
    rt().block_on(async {
        contract(tiered("tiered-contract", spool.path(), 1 << 30).await).await;
    });
}

#[test]
fn a_replica_serves_what_it_read_whole_from_its_own_disk_within_its_budget() {
    let spool = tempfile::tempdir().unwrap();
    let s = s3_env();
    let blob = |seed: u32| -> Vec<u8> {
        (0..(5 << 20) as u32)
            .map(|i| (i.wrapping_mul(seed) % 253) as u8)
            .collect()
    };
    let size = (5 << 20) as u64;
    rt().block_on(async {
        // Room for two of the three blobs.
        let store = tiered("tiered", spool.path(), 2 * size + size / 2).await;
        let (a, b, c) = (blob(3), blob(5), blob(7));
        let da = write(store.as_ref(), &a, 1 << 20).await;
        assert!(
            !local_copy(spool.path(), &da).exists(),
            "a write goes to the bucket"
        );
        assert_eq!(read(store.as_ref(), &da, 0, size).await, a);
        wait_for(&local_copy(spool.path(), &da), true).await;

        // The bucket's copy changes behind the cache's back: this replica serves the bytes it
        // verified, from its disk.
        let key_a = format!("tiered/blobs/sha256/{}", da.hex());
        sync(|| s.corrupt(&key_a).unwrap());
        assert_eq!(
            read(store.as_ref(), &da, 0, size).await,
            a,
            "from the local tier"
        );
        assert_eq!(read(store.as_ref(), &da, 7, 4 << 20).await, &a[7..4 << 20]);

        // Bytes that do not match their digest never enter the local tier.
        let db = write(store.as_ref(), &b, 1 << 20).await;
        let key_b = format!("tiered/blobs/sha256/{}", db.hex());
        sync(|| s.corrupt(&key_b).unwrap());
        let items: Vec<_> = store
            .open(&db)
            .await
            .unwrap()
            .unwrap()
            .range(0, size)
            .collect()
            .await;
        assert!(
            items.last().unwrap().is_err(),
            "corrupt bucket bytes fail the read"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !local_copy(spool.path(), &db).exists(),
            "nothing unverified kept"
        );

        // A client that stops early leaves nothing either.
        let dc = write(store.as_ref(), &c, 1 << 20).await;
        let mut partial = store.open(&dc).await.unwrap().unwrap().range(0, size);
        partial.next().await.unwrap().unwrap();
        drop(partial);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !local_copy(spool.path(), &dc).exists(),
            "a partial read keeps nothing"
        );

        // Within the budget, least recently used first: b (rewritten) and c push a out.
        let db = write(store.as_ref(), &b, 1 << 20).await;
        assert_eq!(read(store.as_ref(), &db, 0, size).await, b);
        wait_for(&local_copy(spool.path(), &db), true).await;
        assert_eq!(read(store.as_ref(), &dc, 0, size).await, c);
        wait_for(&local_copy(spool.path(), &dc), true).await;
        wait_for(&local_copy(spool.path(), &da), false).await;

        // A restarted replica picks up what its disk holds.
        drop(store);
        let key_c = format!("tiered/blobs/sha256/{}", dc.hex());
        sync(|| s.corrupt(&key_c).unwrap());
        let store = tiered("tiered", spool.path(), 2 * size + size / 2).await;
        assert_eq!(
            read(store.as_ref(), &dc, 0, size).await,
            c,
            "from disk after a restart"
        );
        // Eviction of the shared store removes the local copy too.
        store.delete(&dc).await.unwrap();
        assert!(!local_copy(spool.path(), &dc).exists());
        assert!(store.open(&dc).await.unwrap().is_none());
    });
}

#[test]
fn bytes_changed_in_the_bucket_are_never_served_complete() {
    let spool = tempfile::tempdir().unwrap();
    let s = s3_env();
    rt().block_on(async {
        let store = object_backend("corrupt", spool.path()).await;
        let data: Vec<u8> = (0..(5 << 20) as u32).map(|i| (i % 13) as u8).collect();
        let d = write(&store, &data, 1 << 20).await;
        let key = format!("corrupt/blobs/sha256/{}", d.hex());
        sync(|| s.corrupt(&key).unwrap());
        let blob = store.open(&d).await.unwrap().expect("still listed");
        let items: Vec<_> = blob.range(0, data.len() as u64).collect().await;
        assert!(
            items.last().unwrap().is_err(),
            "the stream fails before its end"
        );
        let served: usize = items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .map(Bytes::len)
            .sum();
        assert!(served < data.len(), "never the whole body");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !sync(|| s.exists(&key).unwrap()),
            "the corrupt object is deleted"
        );
    });
}

#[test]
fn a_bucket_read_that_stalls_or_is_cut_resumes_where_it_stopped_a_few_times() {
    use mirror_tests::faults::{Fault, FaultProxy};
    let spool = tempfile::tempdir().unwrap();
    let s = s3_env();
    // The replica reaches the bucket through a proxy that misbehaves on demand (SeaweedFS
    // itself cannot); requests are signed for the proxy's host, which it passes on.
    let proxy = FaultProxy::start(s.addr).expect("fault proxy");
    let timings = Timings {
        read_stall: Duration::from_secs(1),
        ..Timings::DEFAULT
    };
    let mut at = settings(s, "resume", spool.path());
    at.endpoint = Some(proxy.url());
    const MIB: u64 = 1 << 20;
    // The bucket's GETs of one blob, as the proxy passed them on.
    let gets_of = |d: &Digest| -> Vec<_> {
        proxy
            .seen()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(d.hex()))
            .collect()
    };
    rt().block_on(async {
        let store = ObjectBackend::open_with(&at, timings)
            .await
            .expect("object backend through the proxy");
        for (seed, what, fault) in [
            (1, "stalls", Fault::StallAfter(2 * MIB)),
            (2, "is cut", Fault::CutAfter(2 * MIB)),
        ] {
            let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 241) as u8 ^ seed).collect();
            let d = write(&store, &data, 1 << 20).await;
            proxy.set_fault(d.hex(), fault);
            let got = tokio::time::timeout(
                Duration::from_secs(20),
                read(&store, &d, 0, data.len() as u64),
            )
            .await
            .unwrap_or_else(|_| panic!("a read that {what} ends"));
            assert!(got == data, "a read that {what} serves the whole blob");
            let ranges: Vec<String> = gets_of(&d)
                .iter()
                .filter_map(|r| r.header("range").map(str::to_owned))
                .collect();
            assert_eq!(
                ranges,
                [
                    format!("bytes=0-{}", data.len() - 1),
                    format!("bytes={}-{}", 2 * MIB, data.len() - 1),
                ],
                "a read that {what} asks the bucket again for the rest only"
            );
        }
        // A bucket that cuts every GET early: each resume gets less than 1 MiB, so the read
        // ends after three, not after as many GETs as the blob has pieces.
        let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 239) as u8).collect();
        let d = write(&store, &data, 1 << 20).await;
        proxy.set_fault(d.hex(), Fault::CutAfter(MIB / 2));
        let blob = store.open(&d).await.unwrap().expect("stored");
        let items: Vec<_> = blob.range(0, data.len() as u64).collect().await;
        assert!(items.last().unwrap().is_err(), "the read fails");
        assert_eq!(gets_of(&d).len(), 4, "the first GET and three resumes");
    });
}

#[test]
fn the_eviction_lease_has_one_holder() {
    let spool = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let a = object_backend("lease", spool.path()).await;
        let b = object_backend("lease", spool.path()).await;
        let (ra, rb) = tokio::join!(a.eviction_lease(), b.eviction_lease());
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(
            ra ^ rb,
            "exactly one of two racing replicas holds it: {ra} {rb}"
        );
        let (holder, other) = if ra { (&a, &b) } else { (&b, &a) };
        assert!(holder.eviction_lease().await.unwrap(), "the holder renews");
        assert!(
            !other.eviction_lease().await.unwrap(),
            "the other still waits"
        );
    });
}

/// `regmirror serve --storage s3://…` with `env`: its exit status and stderr.
fn serve_with(storage: &str, env: &[(&str, String)]) -> (Option<i32>, String) {
    let bin = build::regmirror().expect("regmirror binary");
    let spool = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--storage", storage])
        .args(["--upstream", "lab=http://127.0.0.1:9"])
        .arg("--spool-dir")
        .arg(spool.path())
        .env_remove("AWS_SESSION_TOKEN")
        .envs(env.iter().map(|(k, v)| (*k, v.clone())))
        .output()
        .expect("run regmirror");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_misconfigured_bucket_fails_at_start_naming_the_cause() {
    let s = s3::shared();
    let with = |k: &str, v: &str| {
        s.env()
            .into_iter()
            .map(|(a, b)| if a == k { (a, v.to_owned()) } else { (a, b) })
            .collect::<Vec<_>>()
    };
    let (code, err) = serve_with(&s.url("x"), &with("AWS_SECRET_ACCESS_KEY", "wrong"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("credentials refused"), "{err}");

    let (code, err) = serve_with("s3://no-such-bucket/x", &s.env());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    let dead = format!("http://127.0.0.1:{}", mirror_tests::free_port());
    let env = with("AWS_ENDPOINT_URL", &dead);
    let env: Vec<_> = env
        .into_iter()
        .map(|(k, v)| {
            if k == "AWS_ENDPOINT" {
                (k, dead.clone())
            } else {
                (k, v)
            }
        })
        .collect();
    let (code, err) = serve_with(&s.url("x"), &env);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unreachable"), "{err}");
}

/// Kills the cache at the end of a test, whatever happens.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_store_outage_turns_readyz_false_and_blobs_pass_through() {
    let mut s = s3::S3Server::start().expect("own SeaweedFS");
    // The upstream is the real distribution with token auth the fault tests share, behind a
    // proxy of this test's own that counts what reaches it. Its 3 MiB layer is more than a
    // replica keeps in memory (`MEM_BLOB_MAX`), so a warm pull really reads the bucket.
    let up = mirror_tests::faults::shared();
    let image = &up.images.crowd;
    let d = image.first_layer();
    let hex = d.trim_start_matches("sha256:");
    let blob = std::fs::read(image.layout.join("blobs/sha256").join(hex)).expect("layout blob");
    assert!(blob.len() as u64 > regmirror::store::object::MEM_BLOB_MAX);
    let proxy = mirror_tests::faults::FaultProxy::start(up.registry.addr).expect("fault proxy");
    // 200s only: a 401 before a token fetch, or a HEAD, moves no bytes.
    let upstream_gets = || proxy.count_ok("GET", &format!("/blobs/{d}"));
    // The token realm is the harness' token server on its own port: declared, as a
    // declaration's realm_hosts would be (the cache asks no undeclared realm).
    let shared = mirror_tests::upstreams::shared();
    let realm = format!("faulty=127.0.0.1:{}", shared.token.addr.port());

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("regmirror.log");
    let port = mirror_tests::free_port();
    let _cache = Running(
        Command::new(build::regmirror().unwrap())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--storage", &s.url("outage")])
            .args(["--upstream", &format!("faulty={}", proxy.url())])
            .arg("--upstream-ca")
            .arg(&shared.pki.ca)
            .args(["--realm-host", &realm])
            .arg("--spool-dir")
            .arg(dir.path())
            .envs(s.env())
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("regmirror"),
    );
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let get = |path: &str| http.get(format!("http://127.0.0.1:{port}{path}")).send();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get("/healthz").is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "regmirror did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // /readyz answers from the last store check (refreshed every 2 s in the background),
    // so a change shows within seconds, not on the next probe.
    let readyz = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = get("/readyz").unwrap().status().as_u16();
            if got == want || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // What an alert on /metrics reads (Kubernetes readiness does not follow the store).
    let store_ready = || {
        let metrics = get("/metrics").unwrap().text().unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("regmirror_store_ready "))
            .map(str::to_owned)
    };
    // What a client pulling the layer does: the whole body, or the test fails here.
    let pull = || {
        let r = get(&format!("/v2/{}/blobs/{d}", image.name)).unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().unwrap()
    };
    assert_eq!(readyz(200), 200);
    assert_eq!(store_ready().as_deref(), Some("1"));
    assert_eq!(pull(), blob, "cold");
    assert_eq!(pull(), blob, "warm");
    assert_eq!(upstream_gets(), 1, "warm from the bucket");
    // The client had its last byte once it verified; the upload lands just after.
    let key = format!("outage/blobs/sha256/{hex}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.exists(&key).unwrap() {
        assert!(Instant::now() < deadline, "{key} never stored");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The bucket goes away: not ready (a balancer sends clients elsewhere), yet a client
    // that still gets here is served from the upstream, without the cache.
    s.stop();
    assert_eq!(readyz(503), 503, "the store is down");
    assert_eq!(store_ready().as_deref(), Some("0"));
    assert_eq!(pull(), blob, "passed through, complete");
    assert_eq!(
        upstream_gets(),
        2,
        "fetched again: the bucket cannot serve it"
    );
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("storage unavailable; passing through"),
        "{logs}"
    );

    // The bucket comes back with what it held: ready again, the layer served from it.
    s.restart().unwrap();
    assert_eq!(readyz(200), 200, "back");
    assert_eq!(pull(), blob);
    assert_eq!(upstream_gets(), 2, "its data kept");
}

#[test]
fn a_shared_bucket_is_bounded_by_the_lease_holder_oldest_access_first() {
    use regmirror::cache::{Cache, Limits};
    let spool = tempfile::tempdir().unwrap();
    let s = s3_env();
    rt().block_on(async {
        let store: Arc<dyn BlobStore> = Arc::new(object_backend("evict", spool.path()).await);
        let mut digests = Vec::new();
        for i in 0..3u8 {
            digests.push(write(store.as_ref(), &vec![i; 1 << 20], 1 << 20).await);
            // S3 times have a resolution of one second.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        // The first blob is read again: the second is now the least recently accessed.
        store.touch(&digests[0]).await;
        let limits = Limits {
            max_size: (5 << 20) / 2,
            max_blob_size: 1 << 30,
            max_pass_through_memory: 1 << 20,
        };
        let cache = Cache::open(
            store.clone(),
            Default::default(),
            Duration::from_secs(60),
            limits,
        )
        .await
        .unwrap();
        assert_eq!(
            sync(|| s.list("evict/blobs").unwrap()).len(),
            3,
            "not at open"
        );
        // The replica's gauges are the bucket as it listed it.
        assert_eq!((cache.entries(), cache.store_bytes()), (3, 3 << 20));
        cache.evict_shared().await.unwrap();
        let left: Vec<String> = sync(|| s.list("evict/blobs").unwrap());
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!((cache.entries(), cache.store_bytes()), (2, 2 << 20));
        assert!(
            !left.iter().any(|k| k.ends_with(digests[1].hex())),
            "the oldest access went"
        );
        assert!(store.open(&digests[1]).await.unwrap().is_none());
        // Another replica does not evict while the lease is held.
        let other = object_backend("evict", spool.path()).await;
        assert!(!other.eviction_lease().await.unwrap());
    });
}
