//! Object-store [`BlobStore`] (S3 through the `object_store` crate), shared by any number of
//! replicas:
//!
//! ```text
//! <prefix>/blobs/sha256/<hex>                  verified content only
//! <prefix>/manifests/sha256/<hex>.json         {"media_type": ...}
//! <prefix>/tags/<registry>/<name>/<tag>.json   TagRecord
//! <prefix>/links/<registry>/<name>/<hex>       empty: digest belongs to that repository
//! <prefix>/access/<hex>                        empty: its time is the blob's last access
//! <prefix>/uploads/<unix>-<replica>-<n>.json   a multipart upload in progress (for cleanup)
//! <prefix>/lease/evict                         who may evict, until when
//! ```
//!
//! Writes stream into a multipart upload straight to the final key while the bytes are hashed:
//! S3 makes the object appear only when the upload completes, which happens after the digest
//! matched (else it is aborted), so no reader ever sees a partial or unverified key and no copy
//! is needed (a server-side copy is limited to 5 GiB). Two replicas racing on one blob both
//! complete identical bytes: the key never disappears in between. A replica killed mid-upload
//! leaves an incomplete upload that is invisible; its marker under `uploads/` lets any replica
//! abort it once it is older than the abandon age. Blobs under one part are a single PUT.
//!
//! A read is one GET of the range asked for, pinned to the e-tag seen at open and streamed at
//! the pace of its client (memory: what the connection buffers, not the blob). A GET that is
//! cut, fails or stalls for [`Timings::read_stall`] is resumed from where it stopped, up to
//! [`READ_RESUMES`] times without [`RESUME_PROGRESS`] read in between (an object without an
//! e-tag only until its first byte: a later GET could read another version). A
//! whole-blob read is hashed on the way and its last piece is withheld unless the digest
//! matched, so bytes changed behind the cache's back are never served complete (and the
//! object is deleted).
//!
//! Small objects read from the bucket are kept in memory, bounded in entries and bytes, least
//! recently used out first: verified blobs up to [`MEM_BLOB_MAX`] (manifests, configs) and media
//! types until evicted (content-addressed: they never change; this replica's delete drops them),
//! tag records for [`TAG_FRESH`] only. A tag hit then costs no request to the bucket.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;

use super::spool::{Spool, SpoolReader};
use super::{BlobInfo, BlobStore, BlobWriter, ByteStream, Sink, StoredBlob, TagRecord};
use crate::lock;
use registry_rules::digest::Digest;
use registry_rules::names::{RepositoryName, Tag};

/// Size of a multipart part (S3's minimum is 5 MiB for all but the last).
const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once: with [`PART_SIZE`], at most 32 MiB per download.
const PARTS_IN_FLIGHT: usize = 4;
/// Times a read from the bucket is resumed (after a cut, a stall or a failed GET) without
/// [`RESUME_PROGRESS`] read in between.
const READ_RESUMES: u32 = 3;
/// Bytes read since the last resume that earn the read its resumes back: a bucket that
/// fails after every few bytes costs a bounded number of GETs per MiB, not one per byte.
const RESUME_PROGRESS: u64 = 1 << 20;
/// Wait before the first resume of a run; the next ones wait twice and three times as long.
const RESUME_BACKOFF: Duration = Duration::from_millis(100);
/// Tries to abort an upload whose writer was dropped before leaving it to cleanup.
const ABORT_TRIES: u32 = 4;
/// A replica records an access to a blob at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(300);
/// How long an eviction lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(120);
/// Bounds of the in-memory sets (cleared when full: they only save requests).
const MAX_REMEMBERED: usize = 100_000;
/// Largest metadata object read from the bucket.
const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// How long a tag record read from the bucket is taken as current. Another replica may have
/// refreshed it (a new digest from the upstream) in the meantime; within a second that is no
/// different from a request that read the bucket just before the write. The ring sends a tag
/// to one replica, so normally this replica is the writer and its own writes update the copy.
pub const TAG_FRESH: Duration = Duration::from_secs(1);
/// Largest blob kept in memory once read and verified (manifests, configs).
pub const MEM_BLOB_MAX: u64 = 256 * 1024;
/// Bounds of the in-memory copies: verified small blobs, and records (tags, media types).
const MEM_BLOBS: (usize, usize) = (2048, 32 << 20);
const MEM_RECORDS: (usize, usize) = (16_384, 4 << 20);

/// How long the backend waits on the bucket and its replicas' leftovers.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// An upload older than this is taken for abandoned (its replica died).
    pub abandon_after: Duration,
    /// How long a blob read waits for the bucket's answer or its next bytes before it
    /// resumes. Blob reads have no whole-request timeout: a client may read a large blob
    /// slowly, and the GET goes at its pace.
    pub read_stall: Duration,
}

impl Timings {
    pub const DEFAULT: Timings = Timings {
        abandon_after: Duration::from_secs(6 * 3600),
        read_stall: Duration::from_secs(30),
    };
}

/// Where the cache lives in a bucket, from `s3://BUCKET/PREFIX` plus the S3 settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSettings {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
    /// Overrides `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`.
    pub endpoint: Option<String>,
    /// Overrides `AWS_REGION`.
    pub region: Option<String>,
    /// Local scratch for in-flight downloads.
    pub spool_dir: PathBuf,
    /// Bytes of blobs this replica keeps on its own disk under `spool_dir` (see
    /// [`super::tiered`]); 0 = none, every read goes to the bucket.
    pub local_cache_size: u64,
    /// `redirect = true`: clients fetch stored blobs from the bucket by presigned URLs.
    pub redirect: Option<StoreRedirect>,
}

/// Blob GETs answered with a `307` to a presigned URL of the object (like distribution's
/// storage redirect): the bytes go from the bucket to the client, not through the replica.
/// Blobs up to [`MEM_BLOB_MAX`] are still served by the replica, from memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRedirect {
    /// The endpoint clients reach the bucket at, when it is not the replicas' (the URL is
    /// signed for its host); `None`: the replicas' endpoint.
    pub endpoint: Option<String>,
    /// How long a presigned URL can be used (S3 checks it when a request starts).
    pub ttl: Duration,
}

impl fmt::Display for BucketSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("invalid storage URL {0:?}: expected s3://BUCKET/PREFIX")]
    Malformed(String),
}

impl BucketSettings {
    /// `s3://bucket/prefix` (the prefix may be empty); `None` when `s` is not an `s3://` URL.
    pub fn parse_url(s: &str) -> Option<Result<(String, String), UrlError>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        let prefix = prefix.trim_matches('/');
        if !valid_bucket || prefix.split('/').any(|p| p == "." || p == "..") && !prefix.is_empty() {
            return Some(Err(UrlError::Malformed(s.to_owned())));
        }
        Some(Ok((bucket.to_owned(), prefix.to_owned())))
    }
}

/// Why the bucket cannot be used; each names its cause (the process exits with status 2).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("S3 client for {url}: {detail}")]
    Client { url: String, detail: String },
    #[error("S3 endpoint {endpoint} is unreachable: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("S3 credentials refused by {endpoint} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {detail}")]
    Credentials { endpoint: String, detail: String },
    #[error("S3 bucket {bucket:?} does not exist at {endpoint}")]
    NoBucket { bucket: String, endpoint: String },
    #[error("S3 start-up check of {url} failed: {detail}")]
    Check { url: String, detail: String },
    #[error("spool directory {path}: {source}")]
    Spool { path: PathBuf, source: io::Error },
}

fn io_err(e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

fn not_found_is_none<T>(r: object_store::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io_err(e)),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Serialize, Deserialize)]
struct UploadMarker {
    key: String,
    upload_id: String,
    started: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    holder: String,
    expires: u64,
}

pub struct ObjectBackend {
    store: Arc<AmazonS3>,
    /// The same bucket without a whole-request timeout, for blob bodies.
    reader: Arc<AmazonS3>,
    /// With `redirect = true`: signs clients' URLs of stored blobs.
    presigner: Option<Presigner>,
    endpoint: String,
    prefix: String,
    spool_dir: PathBuf,
    /// Names this replica's uploads and lease.
    replica: String,
    seq: AtomicU64,
    timings: Timings,
    /// Links seen to exist (never removed from the bucket): skip a HEAD per hit.
    links: Mutex<HashSet<String>>,
    /// Last access recorded per blob by this replica.
    touched: Mutex<HashMap<Digest, Instant>>,
    /// Verified small blobs by digest.
    mem_blobs: Arc<MemCache>,
    /// Tag records and media types by bucket key.
    mem_records: MemCache,
}

/// Small values by key in memory, bounded in entries and bytes; the least recently used go
/// first, an entry may expire.
struct MemCache {
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<MemInner>,
}

#[derive(Default)]
struct MemInner {
    map: HashMap<String, MemEntry>,
    /// Use order: sequence number -> key.
    order: BTreeMap<u64, String>,
    next: u64,
    bytes: usize,
}

struct MemEntry {
    value: Bytes,
    until: Option<Instant>,
    seq: u64,
}

impl MemCache {
    fn new((max_entries, max_bytes): (usize, usize)) -> Self {
        Self {
            max_entries,
            max_bytes,
            inner: Mutex::default(),
        }
    }

    fn get(&self, key: &str) -> Option<Bytes> {
        let mut m = lock(&self.inner);
        let inner = &mut *m;
        let e = inner.map.get_mut(key)?;
        if e.until.is_some_and(|t| t <= Instant::now()) {
            inner.remove(key);
            return None;
        }
        inner.order.remove(&e.seq);
        e.seq = inner.next;
        inner.next += 1;
        inner.order.insert(e.seq, key.to_owned());
        Some(e.value.clone())
    }

    fn put(&self, key: String, value: Bytes, ttl: Option<Duration>) {
        let mut m = lock(&self.inner);
        m.remove(&key);
        if value.len() > self.max_bytes {
            return;
        }
        while m.map.len() >= self.max_entries || m.bytes + value.len() > self.max_bytes {
            let Some((_, oldest)) = m.order.pop_first() else {
                break;
            };
            m.remove(&oldest);
        }
        let seq = m.next;
        m.next += 1;
        m.bytes += value.len();
        m.order.insert(seq, key.clone());
        m.map.insert(
            key,
            MemEntry {
                value,
                until: ttl.map(|t| Instant::now() + t),
                seq,
            },
        );
    }

    fn remove(&self, key: &str) {
        lock(&self.inner).remove(key);
    }
}

impl MemInner {
    fn remove(&mut self, key: &str) {
        if let Some(e) = self.map.remove(key) {
            self.order.remove(&e.seq);
            self.bytes -= e.value.len();
        }
    }
}

/// A verified blob held in memory.
struct MemBlob(Bytes);

impl StoredBlob for MemBlob {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn range(self: Box<Self>, start: u64, end: u64) -> ByteStream {
        let len = self.0.len();
        let end = usize::try_from(end).map_or(len, |e| e.min(len));
        let start = usize::try_from(start).map_or(end, |s| s.min(end));
        futures::stream::once(futures::future::ready(Ok(self.0.slice(start..end)))).boxed()
    }
}

impl fmt::Debug for ObjectBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBackend")
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .field("replica", &self.replica)
            .finish()
    }
}

impl ObjectBackend {
    /// Build the client (env: `AWS_ENDPOINT_URL`/`AWS_ENDPOINT`, `AWS_REGION`, keys,
    /// `AWS_ALLOW_HTTP`; the settings override endpoint and region), then check the bucket with
    /// a probe put/get/list/delete under the prefix.
    pub async fn open(s: &BucketSettings) -> Result<Self, OpenError> {
        Self::open_with(s, Timings::DEFAULT).await
    }

    /// [`Self::open`] with other timings (tests).
    pub async fn open_with(s: &BucketSettings, timings: Timings) -> Result<Self, OpenError> {
        let endpoint = s
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT").ok())
            .unwrap_or_else(|| "the AWS S3 endpoint".to_owned());
        let store = Arc::new(client(s, s.endpoint.as_deref(), ClientUse::Requests)?);
        let reader = Arc::new(client(s, s.endpoint.as_deref(), ClientUse::BlobBodies)?);
        // Signing needs no request: a presigner for another endpoint is a second client
        // that is never used to send one.
        let presigner = match &s.redirect {
            None => None,
            Some(r) => Some(Presigner {
                client: match &r.endpoint {
                    Some(e) => Arc::new(client(s, Some(e), ClientUse::Requests)?),
                    None => store.clone(),
                },
                ttl: r.ttl,
            }),
        };
        std::fs::create_dir_all(&s.spool_dir).map_err(|source| OpenError::Spool {
            path: s.spool_dir.clone(),
            source,
        })?;
        // Proves the directory takes an unnamed file (O_TMPFILE) before the first download.
        Spool::anonymous(&s.spool_dir).map_err(|source| OpenError::Spool {
            path: s.spool_dir.clone(),
            source,
        })?;
        let replica = format!(
            "{}-{}-{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "host".to_owned()),
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let backend = Self {
            store,
            reader,
            presigner,
            endpoint,
            prefix: s.prefix.clone(),
            spool_dir: s.spool_dir.clone(),
            replica,
            seq: AtomicU64::new(0),
            timings,
            links: Mutex::default(),
            touched: Mutex::default(),
            mem_blobs: Arc::new(MemCache::new(MEM_BLOBS)),
            mem_records: MemCache::new(MEM_RECORDS),
        };
        backend.probe(s).await?;
        Ok(backend)
    }

    async fn probe(&self, s: &BucketSettings) -> Result<(), OpenError> {
        let key = self.key(&format!("probe/{}", self.replica));
        let classify = |e: object_store::Error, writing: bool| -> OpenError {
            let text = e.to_string();
            match &e {
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => OpenError::Credentials {
                    endpoint: self.endpoint.clone(),
                    detail: text,
                },
                _ if text.contains("NoSuchBucket")
                    || (writing && matches!(e, object_store::Error::NotFound { .. })) =>
                {
                    OpenError::NoBucket {
                        bucket: s.bucket.clone(),
                        endpoint: self.endpoint.clone(),
                    }
                }
                _ if is_connect_error(&e) => OpenError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    detail: text,
                },
                _ => OpenError::Check {
                    url: s.to_string(),
                    detail: text,
                },
            }
        };
        self.store
            .put(&key, PutPayload::from_static(b"regmirror probe"))
            .await
            .map_err(|e| classify(e, true))?;
        let got = self.store.get(&key).await.map_err(|e| classify(e, false))?;
        let body = got.bytes().await.map_err(|e| classify(e, false))?;
        if &body[..] != b"regmirror probe" {
            return Err(OpenError::Check {
                url: s.to_string(),
                detail: "the probe object read back different bytes".into(),
            });
        }
        let listed: Vec<_> = self
            .store
            .list(Some(&self.key("probe")))
            .try_collect()
            .await
            .map_err(|e| classify(e, false))?;
        if !listed.iter().any(|m| m.location == key) {
            return Err(OpenError::Check {
                url: s.to_string(),
                detail: "the probe object is missing from the listing".into(),
            });
        }
        self.store.delete(&key).await.map_err(|e| classify(e, true))
    }

    fn key(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    fn blob_key(&self, d: &Digest) -> Path {
        self.key(&format!("blobs/sha256/{}", d.hex()))
    }

    fn tag_key(&self, registry: &str, name: &RepositoryName, tag: &Tag) -> Path {
        self.key(&format!("tags/{registry}/{name}/{}.json", tag.as_str()))
    }

    fn link_key(&self, registry: &str, name: &RepositoryName, d: &Digest) -> Path {
        self.key(&format!("links/{registry}/{name}/{}", d.hex()))
    }

    fn meta_key(&self, d: &Digest) -> Path {
        self.key(&format!("manifests/sha256/{}.json", d.hex()))
    }

    fn access_key(&self, d: &Digest) -> Path {
        self.key(&format!("access/{}", d.hex()))
    }

    /// A metadata object (tag record, media type, upload marker): a few hundred bytes when
    /// this cache wrote it; anything larger in the bucket is refused, not buffered.
    async fn read_small(&self, key: &Path) -> io::Result<Option<Bytes>> {
        let Some(got) = not_found_is_none(self.store.get(key).await)? else {
            return Ok(None);
        };
        if got.meta.size > MAX_RECORD_BYTES {
            return Err(io::Error::other(format!(
                "{key}: {} bytes, more than a record may hold ({MAX_RECORD_BYTES})",
                got.meta.size
            )));
        }
        not_found_is_none(got.bytes().await)
    }

    async fn put_small(&self, key: &Path, body: Vec<u8>) -> io::Result<()> {
        self.store
            .put(key, PutPayload::from(body))
            .await
            .map(drop)
            .map_err(io_err)
    }

    /// Every object under `sub` (recursive).
    async fn list_under(&self, sub: &str) -> io::Result<Vec<object_store::ObjectMeta>> {
        self.store
            .list(Some(&self.key(sub)))
            .try_collect()
            .await
            .map_err(io_err)
    }
}

/// What a client of the bucket is for.
#[derive(Debug, Clone, Copy)]
enum ClientUse {
    /// Records, writes, HEADs, listings: each request within 60 s, body included, and
    /// retried twice within 5 s (an outage must turn into pass-through within seconds).
    Requests,
    /// Blob bodies ([`BucketRead`]): no whole-request timeout, since the GET goes at its
    /// client's pace, and no retries of its own: `BucketRead` resumes every failure itself,
    /// so that each GET's answer is checked for the range it asked for.
    BlobBodies,
}

/// The S3 client for `s` at `endpoint` (env: `AWS_ENDPOINT_URL`/`AWS_ENDPOINT`, `AWS_REGION`,
/// keys, `AWS_ALLOW_HTTP`; the settings override endpoint and region).
fn client(
    s: &BucketSettings,
    endpoint: Option<&str>,
    to: ClientUse,
) -> Result<AmazonS3, OpenError> {
    // Replacing the client options drops what `from_env` put there: AWS_ALLOW_HTTP is
    // applied here again.
    let allow_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || endpoint.is_some_and(|e| e.starts_with("http://"));
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&s.bucket)
        // SeaweedFS, MinIO and most S3-compatible stores are path-style.
        .with_virtual_hosted_style_request(false)
        .with_retry(RetryConfig {
            max_retries: match to {
                ClientUse::Requests => 2,
                ClientUse::BlobBodies => 0,
            },
            retry_timeout: Duration::from_secs(5),
            ..RetryConfig::default()
        })
        .with_client_options({
            let o = ClientOptions::new()
                .with_allow_http(allow_http)
                .with_connect_timeout(Duration::from_secs(3));
            match to {
                ClientUse::Requests => o.with_timeout(Duration::from_secs(60)),
                ClientUse::BlobBodies => o.with_timeout_disabled(),
            }
        });
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = &s.region {
        b = b.with_region(r);
    }
    b.build().map_err(|e| OpenError::Client {
        url: s.to_string(),
        detail: e.to_string(),
    })
}

/// Signs GET URLs of blob objects for clients (`redirect = true`).
struct Presigner {
    client: Arc<AmazonS3>,
    ttl: Duration,
}

fn is_connect_error(e: &object_store::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        let t = s.to_string().to_ascii_lowercase();
        if t.contains("connect") || t.contains("dns") || t.contains("timed out") {
            return true;
        }
        src = s.source();
    }
    false
}

/// A verified object, opened at one version (its e-tag).
struct ObjectBlob {
    store: Arc<AmazonS3>,
    reader: Arc<AmazonS3>,
    read_stall: Duration,
    key: Path,
    size: u64,
    e_tag: Option<String>,
    digest: Digest,
    /// Where a verified whole read of a small blob is kept.
    mem: Arc<MemCache>,
}

impl StoredBlob for ObjectBlob {
    fn size(&self) -> u64 {
        self.size
    }

    fn range(self: Box<Self>, start: u64, end: u64) -> ByteStream {
        if start >= end {
            return futures::stream::empty().boxed();
        }
        let whole = start == 0 && end == self.size;
        let check = Verify {
            held: None,
            hasher: whole.then(Sha256::new),
            kept: (whole && self.size <= MEM_BLOB_MAX).then(Vec::new),
        };
        let read = BucketRead {
            blob: *self,
            start,
            pos: start,
            end,
            body: None,
            resumed_at: start,
            resumes_left: READ_RESUMES,
        };
        futures::stream::unfold(Some((read, check)), |state| async move {
            let (mut read, mut check) = state?;
            let out = loop {
                match read.next_piece().await {
                    Ok(Some(b)) => match check.push(b) {
                        Some(ready) => break Ok(ready),
                        None => continue,
                    },
                    Ok(None) => match check.finish(&read.blob.digest) {
                        Ok((last, kept)) => {
                            if let Some(whole) = kept {
                                read.blob.mem.put(read.blob.digest.to_string(), whole, None);
                            }
                            return last.map(|b| (Ok(b), None));
                        }
                        Err(e) => {
                            if e.kind() == io::ErrorKind::InvalidData {
                                read.delete_changed(&e);
                            }
                            break Err(e);
                        }
                    },
                    Err(e) => break Err(e),
                }
            };
            let next = out.is_ok().then_some((read, check));
            Some((out, next))
        })
        .boxed()
    }
}

/// One ranged read of a blob: a GET streamed at its reader's pace, resumed from where it
/// stopped when the connection is cut, the bucket stalls or a GET fails.
struct BucketRead {
    blob: ObjectBlob,
    start: u64,
    /// Offset of the next byte to read.
    pos: u64,
    end: u64,
    body: Option<futures::stream::BoxStream<'static, object_store::Result<Bytes>>>,
    /// Where the last resume started; [`RESUME_PROGRESS`] past it, `resumes_left` is full.
    resumed_at: u64,
    resumes_left: u32,
}

impl BucketRead {
    /// The next bytes, `None` at the end of the body.
    async fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
        let stall = self.blob.read_stall;
        let stalled = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the bucket sent nothing for {} s", stall.as_secs_f64()),
            )
        };
        loop {
            if self.pos >= self.end {
                return Ok(None);
            }
            let failed = match self.body.as_mut() {
                Some(body) => match tokio::time::timeout(stall, body.next()).await {
                    Ok(Some(Ok(b))) => {
                        self.pos += b.len() as u64;
                        if self.pos > self.end {
                            return Err(io::Error::other("stored object longer than expected"));
                        }
                        if self.pos - self.resumed_at >= RESUME_PROGRESS {
                            self.resumes_left = READ_RESUMES;
                        }
                        return Ok(Some(b));
                    }
                    Ok(None) => {
                        return Err(io::Error::other("stored object shorter than expected"))
                    }
                    Ok(Some(Err(e))) => io_err(e),
                    Err(_) => stalled(),
                },
                None => {
                    let opts = GetOptions {
                        range: Some((self.pos..self.end).into()),
                        if_match: self.blob.e_tag.clone(),
                        ..GetOptions::default()
                    };
                    match tokio::time::timeout(
                        stall,
                        self.blob.reader.get_opts(&self.blob.key, opts),
                    )
                    .await
                    {
                        Ok(Ok(got)) => {
                            self.body = Some(got.into_stream());
                            continue;
                        }
                        // The bucket's answer (gone, changed since open, refused): final.
                        Ok(Err(
                            e @ (object_store::Error::NotFound { .. }
                            | object_store::Error::Precondition { .. }
                            | object_store::Error::NotModified { .. }
                            | object_store::Error::PermissionDenied { .. }
                            | object_store::Error::Unauthenticated { .. }),
                        )) => return Err(io_err(e)),
                        // Unreachable, reset, a server error, a wrong range: worth another GET.
                        Ok(Err(e)) => io_err(e),
                        Err(_) => stalled(),
                    }
                }
            };
            self.body = None;
            // Without an e-tag to pin it, a GET after the first byte could read another
            // version of the object.
            let unpinned = self.blob.e_tag.is_none() && self.pos > self.start;
            if self.resumes_left == 0 || unpinned {
                return Err(failed);
            }
            self.resumes_left -= 1;
            self.resumed_at = self.pos;
            tracing::warn!(key = %self.blob.key, at = self.pos, error = %failed, "bucket read interrupted; resuming");
            tokio::time::sleep(RESUME_BACKOFF * (READ_RESUMES - self.resumes_left)).await;
        }
    }

    fn delete_changed(&self, e: &io::Error) {
        let (store, key) = (self.blob.store.clone(), self.blob.key.clone());
        tracing::error!(digest = %self.blob.digest, key = %key, error = %e, "stored object changed in the bucket; deleted");
        tokio::spawn(async move { store.delete(&key).await });
    }
}

/// The digest check of a whole read from the bucket ([`BucketRead`] checks the length of
/// every read), verified before its last piece is released, so that bytes changed behind
/// the cache's back are never served complete.
struct Verify {
    /// The last piece received, released when the next one arrives (or the check passed).
    held: Option<Bytes>,
    hasher: Option<Sha256>,
    /// A small blob's bytes, kept in memory once verified.
    kept: Option<Vec<u8>>,
}

impl Verify {
    /// Takes the next piece; returns the one before it, now safe to send.
    fn push(&mut self, b: Bytes) -> Option<Bytes> {
        if b.is_empty() {
            return None;
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&b);
        }
        if let Some(k) = self.kept.as_mut() {
            k.extend_from_slice(&b);
        }
        self.held.replace(b)
    }

    /// At the end of the body: the last piece, and a small blob's whole bytes to keep.
    fn finish(&mut self, digest: &Digest) -> io::Result<(Option<Bytes>, Option<Bytes>)> {
        if let Some(h) = self.hasher.take() {
            let got = Digest::from_sha256(h);
            if got != *digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stored object does not match its digest (its bytes hash to {got})"),
                ));
            }
        }
        Ok((self.held.take(), self.kept.take().map(Bytes::from)))
    }
}

/// A multipart upload to the final key, or (for a blob under one part) a single PUT. Its
/// parts are read back from the download's spool, so the download never waits for the
/// bucket: a bucket slower than the upstream delays only when the blob becomes visible,
/// not the clients reading the download.
struct ObjectSink {
    backend: Arc<AmazonS3>,
    dest: Path,
    marker_key: Path,
    /// The download's spool: every byte written so far, on local disk.
    spool: SpoolReader,
    /// Bytes in the spool.
    written: u64,
    /// Where the next part not yet sent starts.
    next_start: u64,
    upload: Option<String>,
    next_part: usize,
    in_flight: VecDeque<JoinHandle<object_store::Result<PartId>>>,
    parts: Vec<PartId>,
    committed: bool,
    /// The upload marker's PUT: awaited before the marker is removed.
    marker_put: Option<JoinHandle<()>>,
}

impl ObjectSink {
    /// Send the spool's bytes `[next_start, end)` as the next part.
    async fn send_part(&mut self, end: u64) -> io::Result<()> {
        let id = match &self.upload {
            Some(id) => id.clone(),
            None => {
                let id = self
                    .backend
                    .create_multipart(&self.dest)
                    .await
                    .map_err(io_err)?;
                self.upload = Some(id.clone());
                // Recorded so that any replica can abort it if this one dies.
                let marker = UploadMarker {
                    key: self.dest.to_string(),
                    upload_id: id.clone(),
                    started: unix_now(),
                };
                let body = serde_json::to_vec(&marker).map_err(io::Error::other)?;
                // Beside the first part, not before it: the download waits on neither.
                let (store, key) = (self.backend.clone(), self.marker_key.clone());
                self.marker_put = Some(tokio::spawn(async move {
                    if let Err(e) = store.put(&key, PutPayload::from(body)).await {
                        tracing::warn!(key = %key, error = %e, "recording an upload for cleanup failed");
                    }
                }));
                id
            }
        };
        let (start, len) = (self.next_start, end - self.next_start);
        self.next_start = end;
        let (store, dest, idx, spool) = (
            self.backend.clone(),
            self.dest.clone(),
            self.next_part,
            self.spool.clone(),
        );
        self.next_part += 1;
        self.in_flight.push_back(tokio::spawn(async move {
            // Exactly what was written: fewer bytes would make a part of the wrong length
            // under a digest that verified.
            let bytes = spool.read_exact_at(start, len).await.map_err(|e| {
                object_store::Error::Generic {
                    store: "spool",
                    source: Box::new(e),
                }
            })?;
            store
                .put_part(&dest, &id, idx, PutPayload::from(bytes))
                .await
        }));
        Ok(())
    }

    /// Start the whole parts the spool holds, as many as may be in flight; with `wait`,
    /// until all are started (waiting for parts in flight to finish), else only what can
    /// start now: the download calls it after each write and must not wait for the bucket.
    async fn pump(&mut self, wait: bool) -> io::Result<()> {
        let part = PART_SIZE as u64;
        while self.written - self.next_start >= part {
            if self.in_flight.len() >= PARTS_IN_FLIGHT {
                let done = self.in_flight.front().is_some_and(JoinHandle::is_finished);
                if !(wait || done) {
                    break;
                }
                self.finish_one().await?;
                continue;
            }
            self.send_part(self.next_start + part).await?;
        }
        Ok(())
    }

    async fn finish_one(&mut self) -> io::Result<()> {
        if let Some(h) = self.in_flight.pop_front() {
            let part = h.await.map_err(io::Error::other)?.map_err(io_err)?;
            self.parts.push(part);
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for ObjectSink {
    async fn write(&mut self, data: &Bytes) -> io::Result<()> {
        // The bytes are in the spool already (the writer wrote them there first).
        self.written += data.len() as u64;
        self.pump(false).await
    }

    async fn commit(mut self: Box<Self>, _digest: &Digest, _spool: Spool) -> io::Result<()> {
        if self.upload.is_none() && self.written < PART_SIZE as u64 {
            let bytes = self.spool.read_exact_at(0, self.written).await?;
            self.backend
                .put(&self.dest, PutPayload::from(bytes))
                .await
                .map_err(io_err)?;
            self.committed = true;
            return Ok(());
        }
        self.pump(true).await?;
        if self.written > self.next_start {
            while self.in_flight.len() >= PARTS_IN_FLIGHT {
                self.finish_one().await?;
            }
            self.send_part(self.written).await?;
        }
        while !self.in_flight.is_empty() {
            self.finish_one().await?;
        }
        let id = self.upload.clone().unwrap_or_default();
        let parts = std::mem::take(&mut self.parts);
        self.backend
            .complete_multipart(&self.dest, &id, parts)
            .await
            .map_err(io_err)?;
        self.committed = true;
        if let Some(put) = self.marker_put.take() {
            let _ = put.await;
        }
        let _ = self.backend.delete(&self.marker_key).await;
        Ok(())
    }
}

impl Drop for ObjectSink {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for h in self.in_flight.drain(..) {
            h.abort();
        }
        let (Some(id), Ok(rt)) = (self.upload.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (store, dest, marker) = (
            self.backend.clone(),
            self.dest.clone(),
            self.marker_key.clone(),
        );
        let put = self.marker_put.take();
        rt.spawn(async move {
            if let Some(put) = put {
                let _ = put.await;
            }
            // A part cut off mid-request can make the store refuse the abort for a moment.
            for attempt in 0..ABORT_TRIES {
                match store.abort_multipart(&dest, &id).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                        let _ = store.delete(&marker).await;
                        return;
                    }
                    Err(e) if attempt + 1 == ABORT_TRIES => {
                        tracing::warn!(key = %dest, error = %e, "aborting an upload failed; cleanup will retry");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200 << attempt)).await,
                }
            }
        });
    }
}

#[async_trait]
impl BlobStore for ObjectBackend {
    async fn clean_abandoned(&self) -> io::Result<usize> {
        let now = unix_now();
        let mut n = 0;
        for m in self.list_under("uploads").await? {
            let Some(body) = self.read_small(&m.location).await? else {
                continue;
            };
            let Ok(marker) = serde_json::from_slice::<UploadMarker>(&body) else {
                // Not ours to understand: old enough, it goes.
                continue;
            };
            if now.saturating_sub(marker.started) < self.timings.abandon_after.as_secs() {
                continue;
            }
            let key = Path::from(marker.key.as_str());
            match self.store.abort_multipart(&key, &marker.upload_id).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "aborting an abandoned upload");
                }
            }
            self.store.delete(&m.location).await.map_err(io_err)?;
            n += 1;
        }
        Ok(n)
    }

    async fn check_ready(&self) -> io::Result<()> {
        // A missing key is an answer: the bucket is reachable and the credentials good.
        not_found_is_none(self.store.head(&self.key("ready")).await).map(drop)
    }

    async fn redirect_url(&self, digest: &Digest, size: u64) -> io::Result<Option<String>> {
        let Some(p) = &self.presigner else {
            return Ok(None);
        };
        if size <= MEM_BLOB_MAX {
            return Ok(None);
        }
        let url = p
            .client
            .signed_url(reqwest::Method::GET, &self.blob_key(digest), p.ttl)
            .await
            .map_err(io_err)?;
        Ok(Some(url.into()))
    }

    async fn open(&self, digest: &Digest) -> io::Result<Option<Box<dyn StoredBlob>>> {
        if let Some(b) = self.mem_blobs.get(&digest.to_string()) {
            return Ok(Some(Box::new(MemBlob(b))));
        }
        let key = self.blob_key(digest);
        let Some(meta) = not_found_is_none(self.store.head(&key).await)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(ObjectBlob {
            store: self.store.clone(),
            reader: self.reader.clone(),
            read_stall: self.timings.read_stall,
            key,
            size: meta.size,
            e_tag: meta.e_tag,
            digest: digest.clone(),
            mem: self.mem_blobs.clone(),
        })))
    }

    async fn size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        Ok(not_found_is_none(self.store.head(&self.blob_key(digest)).await)?.map(|m| m.size))
    }

    async fn begin_write(&self, digest: &Digest) -> io::Result<BlobWriter> {
        let spool = Spool::anonymous(&self.spool_dir)?;
        let n = self.seq.fetch_add(1, Relaxed);
        let reader = spool.reader();
        Ok(BlobWriter::new(
            spool,
            Box::new(ObjectSink {
                backend: self.store.clone(),
                dest: self.blob_key(digest),
                marker_key: self.key(&format!("uploads/{}-{}-{n}.json", unix_now(), self.replica)),
                spool: reader,
                written: 0,
                next_start: 0,
                upload: None,
                next_part: 0,
                in_flight: VecDeque::new(),
                parts: Vec::new(),
                committed: false,
                marker_put: None,
            }),
        ))
    }

    async fn delete(&self, digest: &Digest) -> io::Result<u64> {
        self.mem_blobs.remove(&digest.to_string());
        self.mem_records.remove(self.meta_key(digest).as_ref());
        let key = self.blob_key(digest);
        let size = not_found_is_none(self.store.head(&key).await)?.map_or(0, |m| m.size);
        not_found_is_none(self.store.delete(&key).await)?;
        let _ = self.store.delete(&self.meta_key(digest)).await;
        let _ = self.store.delete(&self.access_key(digest)).await;
        Ok(size)
    }

    async fn list(&self) -> io::Result<Vec<BlobInfo>> {
        let mut access: HashMap<String, SystemTime> = HashMap::new();
        for m in self.list_under("access").await? {
            if let Some(hex) = m.location.filename() {
                access.insert(hex.to_owned(), SystemTime::from(m.last_modified));
            }
        }
        let mut out = Vec::new();
        for m in self.list_under("blobs/sha256").await? {
            let Some(hex) = m.location.filename() else {
                continue;
            };
            let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            let written = SystemTime::from(m.last_modified);
            let last_access = access
                .get(hex)
                .map_or(written, |a| std::cmp::max(*a, written));
            out.push(BlobInfo {
                digest,
                size: m.size,
                last_access,
            });
        }
        Ok(out)
    }

    async fn touch(&self, digest: &Digest) {
        {
            let mut t = lock(&self.touched);
            if t.get(digest).is_some_and(|at| at.elapsed() < TOUCH_EVERY) {
                return;
            }
            if t.len() >= MAX_REMEMBERED {
                t.clear();
            }
            t.insert(digest.clone(), Instant::now());
        }
        if let Err(e) = self.put_small(&self.access_key(digest), Vec::new()).await {
            tracing::debug!(%digest, error = %e, "recording an access failed");
        }
    }

    async fn manifest_media_type(&self, digest: &Digest) -> io::Result<Option<String>> {
        let key = self.meta_key(digest);
        let text = match self.mem_records.get(key.as_ref()) {
            Some(t) => t,
            None => {
                let Some(t) = self.read_small(&key).await? else {
                    return Ok(None);
                };
                self.mem_records.put(key.to_string(), t.clone(), None);
                t
            }
        };
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(io::Error::other)?;
        Ok(v.get("media_type")
            .and_then(|m| m.as_str())
            .map(str::to_owned))
    }

    async fn set_manifest_media_type(&self, digest: &Digest, media_type: &str) -> io::Result<()> {
        let body = serde_json::json!({ "media_type": media_type }).to_string();
        let key = self.meta_key(digest);
        self.mem_records.remove(key.as_ref());
        self.put_small(&key, body.clone().into_bytes()).await?;
        self.mem_records
            .put(key.to_string(), Bytes::from(body), None);
        Ok(())
    }

    async fn read_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
    ) -> io::Result<Option<TagRecord>> {
        let key = self.tag_key(registry, name, tag);
        let text = match self.mem_records.get(key.as_ref()) {
            Some(t) => t,
            None => {
                let Some(t) = self.read_small(&key).await? else {
                    return Ok(None);
                };
                self.mem_records
                    .put(key.to_string(), t.clone(), Some(TAG_FRESH));
                t
            }
        };
        Ok(serde_json::from_slice(&text).ok())
    }

    async fn write_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
        rec: &TagRecord,
    ) -> io::Result<()> {
        let body = serde_json::to_vec(rec).map_err(io::Error::other)?;
        let key = self.tag_key(registry, name, tag);
        // A failed write leaves no copy: the next read asks the bucket.
        self.mem_records.remove(key.as_ref());
        self.put_small(&key, body.clone()).await?;
        self.mem_records
            .put(key.to_string(), Bytes::from(body), Some(TAG_FRESH));
        Ok(())
    }

    async fn has_link(
        &self,
        registry: &str,
        name: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<bool> {
        let key = self.link_key(registry, name, digest);
        if lock(&self.links).contains(key.as_ref()) {
            return Ok(true);
        }
        let found = not_found_is_none(self.store.head(&key).await)?.is_some();
        if found {
            self.remember_link(&key);
        }
        Ok(found)
    }

    async fn add_link(
        &self,
        registry: &str,
        name: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<()> {
        let key = self.link_key(registry, name, digest);
        if lock(&self.links).contains(key.as_ref()) {
            return Ok(());
        }
        self.put_small(&key, Vec::new()).await?;
        self.remember_link(&key);
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    /// `PutMode::Create` takes a free lease; an expired (or our own) lease is taken over with
    /// `PutMode::Update` on the e-tag read, so of two replicas racing only one succeeds.
    async fn eviction_lease(&self) -> io::Result<bool> {
        let key = self.key("lease/evict");
        let body = serde_json::to_vec(&Lease {
            holder: self.replica.clone(),
            expires: unix_now() + LEASE_TTL.as_secs(),
        })
        .map_err(io::Error::other)?;
        let put = |mode: PutMode| {
            let (store, key, body) = (self.store.clone(), key.clone(), body.clone());
            async move {
                store
                    .put_opts(
                        &key,
                        PutPayload::from(body),
                        PutOptions {
                            mode,
                            ..PutOptions::default()
                        },
                    )
                    .await
            }
        };
        match put(PutMode::Create).await {
            Ok(_) => return Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {}
            Err(e) => return Err(io_err(e)),
        }
        let got = self.store.get(&key).await.map_err(io_err)?;
        let e_tag = got.meta.e_tag.clone();
        // A lease that is not one (too large to read, or not parsed) counts as expired.
        let current: Option<Lease> = if got.meta.size > MAX_RECORD_BYTES {
            None
        } else {
            serde_json::from_slice(&got.bytes().await.map_err(io_err)?).ok()
        };
        let ours = current.as_ref().is_some_and(|l| l.holder == self.replica);
        let expired = current.as_ref().is_none_or(|l| l.expires <= unix_now());
        if !ours && !expired {
            return Ok(false);
        }
        match put(PutMode::Update(UpdateVersion {
            e_tag,
            version: None,
        }))
        .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => Ok(false),
            Err(e) => Err(io_err(e)),
        }
    }
}

impl ObjectBackend {
    fn remember_link(&self, key: &Path) {
        let mut l = lock(&self.links);
        if l.len() >= MAX_REMEMBERED {
            l.clear();
        }
        l.insert(key.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_copy_is_bounded_least_recently_used_first_and_expires() {
        let c = MemCache::new((3, 10));
        let v = |n: usize| Bytes::from(vec![0u8; n]);
        c.put("a".into(), v(4), None);
        c.put("b".into(), v(4), None);
        assert!(c.get("a").is_some()); // b is now the least recently used
        c.put("c".into(), v(4), None); // 12 bytes > 10: b goes
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some() && c.get("c").is_some());
        c.put("d".into(), v(1), None);
        c.put("e".into(), v(1), None); // 4 entries > 3: a (least recent) goes
        assert!(c.get("a").is_none());
        c.put("big".into(), v(11), None);
        assert!(c.get("big").is_none(), "larger than the whole bound");
        {
            let m = lock(&c.inner);
            assert!(m.map.len() <= 3 && m.bytes <= 10 && m.order.len() == m.map.len());
        }
        c.put("t".into(), v(1), Some(Duration::ZERO));
        assert!(c.get("t").is_none(), "expired");
        c.remove("c");
        assert!(c.get("c").is_none());
    }

    #[test]
    fn a_memory_blob_serves_any_range_without_panicking() {
        let read = |start, end| {
            let s = Box::new(MemBlob(Bytes::from_static(b"0123456789"))).range(start, end);
            futures::executor::block_on(s.try_collect::<Vec<Bytes>>())
                .unwrap()
                .concat()
        };
        assert_eq!(read(2, 5), b"234");
        assert_eq!(read(0, 10), b"0123456789");
        assert_eq!(read(8, 100), b"89");
        assert_eq!(read(7, 3), b"");
    }

    #[test]
    fn storage_urls() {
        let ok = |s: &str| BucketSettings::parse_url(s).unwrap().unwrap();
        assert_eq!(
            ok("s3://cache/regmirror"),
            ("cache".into(), "regmirror".into())
        );
        assert_eq!(ok("s3://cache/a/b/"), ("cache".into(), "a/b".into()));
        assert_eq!(ok("s3://cache"), ("cache".into(), String::new()));
        assert!(
            BucketSettings::parse_url("/var/lib/regmirror").is_none(),
            "a directory"
        );
        for bad in [
            "s3://",
            "s3://Upper/x",
            "s3://ab/x",
            "s3://cache/../x",
            "s3://a_b/x",
        ] {
            assert!(
                matches!(BucketSettings::parse_url(bad), Some(Err(_))),
                "{bad} accepted"
            );
        }
    }
}
