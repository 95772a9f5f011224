//! Pull-through logic: freshness of tags, stale-if-error, single-flight downloads with a tee to
//! every waiting client, verification before anything is stored, size-bounded LRU eviction.

pub mod flight;
pub mod lru;
pub mod single;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LINK};
use reqwest::{Method, StatusCode};
use sha2::Digest as _;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::oci;
use crate::store::{BlobStore, CommitError, TagRecord, TempBlob};
use crate::upstream::{read_body, BodyError, Upstream, UpstreamError};
use flight::{FlightState, InFlight, MemoryBudget, Tail};
use lru::{Lru, PinGuard};
use registry_rules::digest::Digest;
use registry_rules::names::{Reference, RepositoryName, Tag};
use single::{Role, SingleFlight};

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Domain errors of the cache; rendered as OCI errors in `http::error` only.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("registry {0:?} is not configured on this cache")]
    UnknownRegistry(String),
    #[error("manifest unknown to upstream")]
    ManifestUnknown,
    #[error("blob unknown to upstream")]
    BlobUnknown,
    #[error("repository unknown to upstream")]
    NameUnknown,
    #[error("upstream requires authentication")]
    Unauthorized,
    #[error("upstream denied access")]
    Denied,
    #[error("upstream rate limit reached")]
    TooManyRequests { retry_after: Option<String> },
    #[error("upstream answered HTTP {0}")]
    UpstreamStatus(u16),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("invalid manifest from upstream: {0}")]
    ManifestInvalid(String),
    #[error("content from upstream does not match its digest: {0}")]
    DigestMismatch(String),
    #[error("content from upstream is larger than allowed")]
    TooLarge,
    #[error("storage: {0}")]
    Storage(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl CacheError {
    /// Errors for which a stale cached tag may be served instead.
    pub fn is_upstream_failure(&self) -> bool {
        match self {
            CacheError::TooManyRequests { .. } | CacheError::Upstream(_) => true,
            CacheError::UpstreamStatus(s) => *s >= 500 || *s == 408,
            _ => false,
        }
    }
}

fn storage_err(e: std::io::Error) -> CacheError {
    CacheError::Storage(e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Manifest,
    Blob,
    Other,
}

fn status_error(resp: &reqwest::Response, kind: Kind) -> CacheError {
    match resp.status() {
        StatusCode::NOT_FOUND => match kind {
            Kind::Manifest => CacheError::ManifestUnknown,
            Kind::Blob => CacheError::BlobUnknown,
            Kind::Other => CacheError::NameUnknown,
        },
        StatusCode::UNAUTHORIZED => CacheError::Unauthorized,
        StatusCode::FORBIDDEN => CacheError::Denied,
        StatusCode::TOO_MANY_REQUESTS => CacheError::TooManyRequests {
            retry_after: resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        },
        s => CacheError::UpstreamStatus(s.as_u16()),
    }
}

/// Statuses by which an upstream says it does not do HEAD on this resource.
fn head_unsupported(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST | StatusCode::NOT_IMPLEMENTED
    )
}

/// What an upstream HEAD said.
#[derive(Debug, Clone)]
struct HeadInfo {
    status: u16,
    digest: Option<String>,
    content_type: Option<String>,
    /// From the `Content-Length` header (the body of a HEAD answer is empty).
    size: Option<u64>,
}

impl HeadInfo {
    fn of(resp: &reqwest::Response) -> Self {
        let hdr = |n| {
            resp.headers()
                .get(n)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            status: resp.status().as_u16(),
            digest: hdr("docker-content-digest"),
            content_type: hdr(CONTENT_TYPE.as_str()),
            size: hdr(CONTENT_LENGTH.as_str()).and_then(|l| l.trim().parse().ok()),
        }
    }

    /// The Content-Type if it is one of the manifest media types we serve.
    fn manifest_media_type(&self) -> Option<String> {
        self.content_type
            .as_deref()
            .map(|c| c.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|c| {
                matches!(
                    c.as_str(),
                    oci::MT_DOCKER_MANIFEST
                        | oci::MT_DOCKER_LIST
                        | oci::MT_OCI_MANIFEST
                        | oci::MT_OCI_INDEX
                )
            })
    }
}

/// A HEAD answer from a tag record.
fn record_reply(rec: &TagRecord) -> ManifestReply {
    ManifestReply {
        digest: rec.digest.clone(),
        media_type: rec.media_type.clone(),
        size: rec.size,
        body: None,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A manifest answer; `body` is `None` for HEAD answered from a tag record.
#[derive(Debug, Clone)]
pub struct ManifestReply {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub body: Option<Bytes>,
}

/// A blob answer.
pub enum BlobReply {
    /// HEAD answered without a body source.
    Head { size: u64 },
    /// Verified stored content.
    Cached {
        file: std::fs::File,
        size: u64,
        pin: PinGuard,
    },
    /// A download in progress (possibly started by this request).
    Flight {
        flight: Arc<InFlight>,
        size: Option<u64>,
    },
}

/// A small passthrough response (tags list, referrers).
#[derive(Debug, Clone)]
pub struct SmallReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub link: Option<String>,
    pub body: Bytes,
}

type FlightKey = (String, RepositoryName, Digest);
type TagKey = (String, RepositoryName, Tag);
type ManifestKey = (String, RepositoryName, Digest);
type HeadKey = (String, RepositoryName, Digest, Kind);

const SMALL_TTL: Duration = Duration::from_secs(30);
/// A tags list or referrers answer is read up to this size.
const MAX_SMALL_BYTES: usize = 8 * 1024 * 1024;
/// Small answers larger than this are served but not kept.
const MAX_SMALL_ENTRY_BYTES: usize = 1024 * 1024;
/// Bounds of the small-answer cache as a whole.
const MAX_SMALL_CACHE_BYTES: usize = 32 * 1024 * 1024;
const MAX_SMALL_ENTRIES: usize = 1000;
/// Blob sizes remembered from manifests (~100 bytes each); emptied when full.
const MAX_KNOWN_SIZES: usize = 100_000;

/// Size bounds of the cache (see `Config`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stored bytes; 0 = unlimited.
    pub max_size: u64,
    /// Largest blob downloaded at all.
    pub max_blob_size: u64,
    /// Memory all downloads together may hold when the disk cannot take their bytes.
    pub max_pass_through_memory: u64,
}

/// Short-lived answers (tags lists, referrers), bounded in entries and bytes.
#[derive(Debug, Default)]
struct SmallCache {
    map: HashMap<String, (Instant, SmallReply)>,
    bytes: usize,
    evictions: u64,
}

impl SmallCache {
    fn get(&self, key: &str, now: Instant) -> Option<SmallReply> {
        let (at, r) = self.map.get(key)?;
        (now.saturating_duration_since(*at) < SMALL_TTL).then(|| r.clone())
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.map.remove(key) {
            Some((_, r)) => {
                self.bytes -= key.len() + r.body.len();
                true
            }
            None => false,
        }
    }

    fn put(&mut self, key: String, reply: SmallReply, now: Instant) {
        // The key is the client's path and query: counted too.
        let len = key.len() + reply.body.len();
        if reply.body.len() > MAX_SMALL_ENTRY_BYTES {
            return;
        }
        self.remove(&key);
        let expired: Vec<String> =
            if self.map.len() >= MAX_SMALL_ENTRIES || self.bytes + len > MAX_SMALL_CACHE_BYTES {
                self.map
                    .iter()
                    .filter(|(_, (at, _))| now.saturating_duration_since(*at) >= SMALL_TTL)
                    .map(|(k, _)| k.clone())
                    .collect()
            } else {
                Vec::new()
            };
        for k in expired {
            self.remove(&k);
        }
        // Still over: drop the oldest live answers.
        while self.map.len() >= MAX_SMALL_ENTRIES || self.bytes + len > MAX_SMALL_CACHE_BYTES {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.remove(&k);
                    self.evictions += 1;
                }
                None => break,
            }
        }
        self.bytes += len;
        self.map.insert(key, (now, reply));
    }
}

/// The upstreams in force, by name: swapped whole on a reload.
pub type Upstreams = BTreeMap<String, Arc<Upstream>>;

pub struct Cache {
    store: Arc<dyn BlobStore>,
    /// Read once per request (a clone of the `Arc<Upstream>`), so a request keeps the
    /// upstream it started with across a reload.
    upstreams: RwLock<Arc<Upstreams>>,
    /// Seconds; the settings below change on a reload and apply to the next decision.
    tag_ttl: AtomicU64,
    max_size: AtomicU64,
    max_blob_size: AtomicU64,
    /// Shared by every download's in-memory tail.
    pass_through: Arc<MemoryBudget>,
    pub metrics: Arc<Metrics>,
    lru: Arc<Mutex<Lru>>,
    flights: Mutex<HashMap<FlightKey, Arc<InFlight>>>,
    /// Tag resolutions (HEAD, or GET when HEAD says too little) in progress.
    tag_flights: SingleFlight<TagKey, ManifestReply>,
    /// Manifest GETs by digest in progress.
    manifest_flights: SingleFlight<ManifestKey, ManifestReply>,
    /// Upstream HEADs (confirmations, HEAD of uncached content) in progress.
    head_flights: SingleFlight<HeadKey, HeadInfo>,
    small: Mutex<SmallCache>,
    /// Sizes the verified manifests of each repository gave their blobs: a download for
    /// that repository longer than that is aborted at once. Keyed by upstream and
    /// repository: a size is a claim of whoever pushed the manifest, so one repository's
    /// manifests must not bound (or break) another's downloads of a shared layer.
    known_sizes: Mutex<HashMap<(String, String, Digest), u64>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("max_size", &self.max_size())
            .finish()
    }
}

impl Cache {
    /// Open the cache: empties the temp directory, rebuilds LRU order from file times and
    /// evicts down to `max_size`.
    pub fn open(
        store: Arc<dyn BlobStore>,
        upstreams: Upstreams,
        tag_ttl: Duration,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let cleaned = store.clean_tmp()?;
        if cleaned > 0 {
            tracing::info!(cleaned, "removed leftovers of interrupted writes");
        }
        let mut blobs = store.list()?;
        blobs.sort_by_key(|b| b.last_access);
        let mut lru = Lru::default();
        for (i, b) in blobs.iter().enumerate() {
            lru.insert(&b.digest, b.size, Some(i as u64));
        }
        tracing::info!(blobs = blobs.len(), bytes = lru.total(), "cache opened");
        let cache = Self {
            store,
            upstreams: RwLock::new(Arc::new(upstreams)),
            tag_ttl: AtomicU64::new(tag_ttl.as_secs()),
            max_size: AtomicU64::new(limits.max_size),
            max_blob_size: AtomicU64::new(limits.max_blob_size),
            pass_through: Arc::new(MemoryBudget::new(limits.max_pass_through_memory)),
            metrics: Arc::new(Metrics::default()),
            lru: Arc::new(Mutex::new(lru)),
            flights: Mutex::new(HashMap::new()),
            tag_flights: SingleFlight::default(),
            manifest_flights: SingleFlight::default(),
            head_flights: SingleFlight::default(),
            small: Mutex::new(SmallCache::default()),
            known_sizes: Mutex::new(HashMap::new()),
        };
        cache.make_room(0);
        Ok(cache)
    }

    pub fn store_bytes(&self) -> u64 {
        lock(&self.lru).total()
    }

    /// Stored blobs and manifests.
    pub fn entries(&self) -> usize {
        lock(&self.lru).count()
    }

    /// `max_size` in bytes; 0 = unlimited.
    pub fn max_size(&self) -> u64 {
        self.max_size.load(Relaxed)
    }

    fn max_blob_size(&self) -> u64 {
        self.max_blob_size.load(Relaxed)
    }

    /// The upstreams in force now (a snapshot).
    pub fn upstreams(&self) -> Arc<Upstreams> {
        match self.upstreams.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Put a reloaded configuration in force. Requests and downloads already running keep
    /// the upstream they hold; a smaller `max_size` applies at the next eviction, which runs
    /// now.
    pub fn reconfigure(&self, upstreams: Upstreams, tag_ttl: Duration, limits: Limits) {
        match self.upstreams.write() {
            Ok(mut g) => *g = Arc::new(upstreams),
            Err(p) => *p.into_inner() = Arc::new(upstreams),
        }
        self.tag_ttl.store(tag_ttl.as_secs(), Relaxed);
        self.max_size.store(limits.max_size, Relaxed);
        self.max_blob_size.store(limits.max_blob_size, Relaxed);
        self.pass_through.set_limit(limits.max_pass_through_memory);
        self.make_room(0);
    }

    pub fn inflight(&self) -> usize {
        lock(&self.flights).len()
    }

    /// The Prometheus page: counters plus the gauges of every bounded structure.
    pub fn render_metrics(&self) -> String {
        let (tokens, token_evictions) = self
            .upstreams()
            .values()
            .map(|u| u.token_stats())
            .fold((0, 0), |(n, e), (n2, e2)| (n + n2, e + e2));
        let (small_entries, small_bytes, small_evictions) = {
            let s = lock(&self.small);
            (s.map.len(), s.bytes, s.evictions)
        };
        self.metrics.render(&crate::metrics::Gauges {
            store_bytes: self.store_bytes(),
            inflight: self.inflight(),
            pass_through_bytes: self.pass_through.used(),
            pass_through_rejections: self.pass_through.rejections(),
            small_cache_entries: small_entries,
            small_cache_bytes: small_bytes as u64,
            small_cache_evictions: small_evictions,
            token_cache_entries: tokens,
            token_cache_evictions: token_evictions,
        })
    }

    pub fn check_ready(&self) -> std::io::Result<()> {
        self.store.check_writable()
    }

    pub fn upstream_names(&self) -> Vec<String> {
        self.upstreams().keys().cloned().collect()
    }

    /// Upstream for a request: the named registry, or the only one when none is named.
    pub fn upstream(&self, registry: Option<&str>) -> Result<Arc<Upstream>, CacheError> {
        let ups = self.upstreams();
        match registry {
            Some(r) => ups
                .get(r)
                .cloned()
                .ok_or_else(|| CacheError::UnknownRegistry(r.to_owned())),
            None if ups.len() == 1 => ups
                .values()
                .next()
                .cloned()
                .ok_or_else(|| CacheError::UnknownRegistry(String::new())),
            None => Err(CacheError::UnknownRegistry(
                "(none named: send x-mirror-registry or ?ns=)".to_owned(),
            )),
        }
    }

    /// Evict least-recently-used unpinned blobs until `incoming` bytes fit.
    fn make_room(&self, incoming: u64) {
        let victims = lock(&self.lru).victims(incoming, self.max_size());
        for (d, size) in victims {
            match self.store.delete(&d) {
                Ok(_) => {
                    Metrics::inc(&self.metrics.evictions);
                    self.metrics
                        .evicted_bytes
                        .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(digest = %d, size, "evicted");
                }
                Err(e) => tracing::warn!(digest = %d, error = %e, "eviction failed"),
            }
        }
    }

    fn touch(&self, d: &Digest) {
        lock(&self.lru).touch(d);
        self.store.touch(d);
    }

    // ---------------------------------------------------------------- manifests

    pub async fn manifest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        reference: &Reference,
        head: bool,
    ) -> Result<ManifestReply, CacheError> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(up, name, d, head).await,
            Reference::Tag(t) => self.manifest_by_tag(up, name, t, head).await,
        }
    }

    fn load_manifest(&self, d: &Digest) -> Result<Option<ManifestReply>, CacheError> {
        let Some((file, size)) = self.store.open(d).map_err(storage_err)? else {
            return Ok(None);
        };
        if size > oci::MAX_MANIFEST_BYTES as u64 {
            return Ok(None);
        }
        let mut body = Vec::with_capacity(size as usize);
        use std::io::Read;
        (&file).read_to_end(&mut body).map_err(storage_err)?;
        let media_type = match self.store.manifest_media_type(d).map_err(storage_err)? {
            Some(m) => m,
            None => match oci::manifest_media_type(None, &body) {
                Ok(m) => m,
                Err(_) => return Ok(None), // a stored blob, not a manifest
            },
        };
        Ok(Some(ManifestReply {
            digest: d.clone(),
            media_type,
            size: body.len() as u64,
            body: Some(Bytes::from(body)),
        }))
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        d: &Digest,
        head: bool,
    ) -> Result<ManifestReply, CacheError> {
        if let Some(m) = self.load_manifest(d)? {
            if self.store.has_link(&up.name, name, d)
                || self.confirm(up, name, d, Kind::Manifest).await?
            {
                Metrics::inc(&self.metrics.hits);
                self.touch(d);
                return Ok(m);
            }
        }
        Metrics::inc(&self.metrics.misses);
        if head {
            // A HEAD is answered from an upstream HEAD (a GET counts against Docker Hub's pull
            // limit); the body is fetched by the GET that usually follows.
            if let Some(m) = self.head_manifest(up, name, d).await? {
                return Ok(m);
            }
        }
        self.fetch_manifest_shared(up, name, d).await
    }

    /// Upstream HEAD of a manifest by digest; `None` when the answer lacks what a HEAD reply
    /// needs (media type, length) or the upstream does not support HEAD: then GET it.
    async fn head_manifest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        d: &Digest,
    ) -> Result<Option<ManifestReply>, CacheError> {
        let info = self.head_shared(up, name, d, Kind::Manifest).await?;
        if info.status != StatusCode::OK.as_u16() {
            return Ok(None);
        }
        if let Some(h) = info.digest.as_deref().filter(|h| h.starts_with("sha256:")) {
            if h != d.as_str() {
                Metrics::inc(&self.metrics.verify_failures);
                return Err(CacheError::DigestMismatch(format!(
                    "asked {d}, Docker-Content-Digest {h}"
                )));
            }
        }
        let (Some(media_type), Some(size)) = (info.manifest_media_type(), info.size) else {
            return Ok(None);
        };
        if size > oci::MAX_MANIFEST_BYTES as u64 {
            return Err(CacheError::TooLarge);
        }
        // The upstream confirmed the digest belongs to this repository.
        if let Err(e) = self.store.add_link(&up.name, name, d) {
            tracing::warn!(error = %e, "could not write link");
        }
        Ok(Some(ManifestReply {
            digest: d.clone(),
            media_type,
            size,
            body: None,
        }))
    }

    /// One upstream HEAD shared by every concurrent request for the same
    /// (registry, repository, digest, kind); a GET's headers when the upstream does not do
    /// HEAD (405/400/501). `Ok` only for 200; other answers are errors.
    async fn head_shared(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        d: &Digest,
        kind: Kind,
    ) -> Result<HeadInfo, CacheError> {
        let key: HeadKey = (up.name.clone(), name.clone(), d.clone(), kind);
        let (up, name, d) = (up.clone(), name.clone(), d.clone());
        let (r, role) = self
            .head_flights
            .run(key, move || async move {
                let (path, accept) = match kind {
                    Kind::Manifest => (
                        format!("/v2/{name}/manifests/{d}"),
                        Some(oci::MANIFEST_ACCEPT),
                    ),
                    _ => (format!("/v2/{name}/blobs/{d}"), None),
                };
                let mut resp = up.send(Method::HEAD, &path, &name, accept, 3).await?;
                if head_unsupported(resp.status()) {
                    // No HEAD upstream: a GET's headers say the same. Its body is never
                    // read (dropping the response closes the connection).
                    resp = up.send(Method::GET, &path, &name, accept, 3).await?;
                }
                if resp.status() != StatusCode::OK {
                    return Err(status_error(&resp, kind));
                }
                Ok(HeadInfo::of(&resp))
            })
            .await;
        if role == Role::Joined {
            Metrics::inc(&self.metrics.coalesced_waiters);
        }
        r
    }

    fn tag_fresh(&self, rec: &TagRecord) -> bool {
        unix_now().saturating_sub(rec.fetched_at) < self.tag_ttl.load(Relaxed)
    }

    async fn reply_from_record(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        rec: &TagRecord,
        head: bool,
    ) -> Result<ManifestReply, CacheError> {
        if head {
            return Ok(record_reply(rec));
        }
        self.manifest_by_digest(up, name, &rec.digest, false).await
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        tag: &Tag,
        head: bool,
    ) -> Result<ManifestReply, CacheError> {
        let reg = up.name.as_str();
        let rec = self.store.read_tag(reg, name, tag).map_err(storage_err)?;
        if let Some(rec) = &rec {
            if self.tag_fresh(rec) {
                Metrics::inc(&self.metrics.hits);
                return self.reply_from_record(up, name, rec, head).await;
            }
        }
        let result = match self.resolve_tag_shared(up, name, tag).await {
            Ok(m) if m.body.is_none() && !head => {
                let full = self.manifest_by_digest(up, name, &m.digest, false).await;
                if let Ok(f) = &full {
                    if f.media_type != m.media_type || f.size != m.size {
                        // The HEAD's headers disagreed with the body: keep what the body says.
                        self.save_tag(
                            reg,
                            name,
                            tag,
                            &TagRecord {
                                digest: f.digest.clone(),
                                media_type: f.media_type.clone(),
                                size: f.size,
                                fetched_at: unix_now(),
                            },
                        );
                    }
                }
                full
            }
            r => r,
        };
        match (result, rec) {
            (Err(e), Some(rec)) if e.is_upstream_failure() => {
                tracing::warn!(registry = reg, %name, %tag, error = %e, "upstream failed; serving stale tag");
                Metrics::inc(&self.metrics.stale_served);
                self.reply_from_record(up, name, &rec, head).await
            }
            (r, _) => r,
        }
    }

    /// Resolve a tag upstream, once for every concurrent request for the same
    /// (registry, repository, tag). The answer has no body when a HEAD resolved it.
    async fn resolve_tag_shared(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        tag: &Tag,
    ) -> Result<ManifestReply, CacheError> {
        let key: TagKey = (up.name.clone(), name.clone(), tag.clone());
        let (this, up, name, tag) = (self.clone(), up.clone(), name.clone(), tag.clone());
        let (r, role) = self
            .tag_flights
            .run(key, move || async move {
                this.resolve_tag(&up, &name, &tag).await
            })
            .await;
        if role == Role::Joined {
            Metrics::inc(&self.metrics.coalesced_waiters);
        }
        r
    }

    async fn resolve_tag(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        tag: &Tag,
    ) -> Result<ManifestReply, CacheError> {
        let reg = up.name.as_str();
        // Read again: a call that just finished may have refreshed it.
        let rec = self.store.read_tag(reg, name, tag).map_err(storage_err)?;
        if let Some(rec) = rec.as_ref().filter(|r| self.tag_fresh(r)) {
            return Ok(record_reply(rec));
        }
        let path = format!("/v2/{}/manifests/{}", name, tag);
        // A HEAD does not count against Docker Hub's pull limit; one attempt keeps stale
        // answers fast when the upstream is down.
        let resp = up
            .send(Method::HEAD, &path, name, Some(oci::MANIFEST_ACCEPT), 1)
            .await?;
        if head_unsupported(resp.status()) {
            // Upstream without manifest HEAD support: ask with a GET.
            return self
                .fetch_manifest(up, name, &Reference::Tag(tag.clone()))
                .await;
        }
        if resp.status() != StatusCode::OK {
            return Err(status_error(&resp, Kind::Manifest));
        }
        let info = HeadInfo::of(&resp);
        let digest = info
            .digest
            .as_deref()
            .and_then(|d| oci::parse_digest(d).ok());
        if let (Some(d), Some(old)) = (&digest, &rec) {
            if *d == old.digest {
                let mut fresh = old.clone();
                fresh.fetched_at = unix_now();
                if let Err(e) = self.store.write_tag(reg, name, tag, &fresh) {
                    tracing::warn!(error = %e, "could not refresh tag record");
                }
                Metrics::inc(&self.metrics.hits);
                return Ok(record_reply(&fresh));
            }
        }
        Metrics::inc(&self.metrics.misses);
        match (
            digest,
            info.manifest_media_type(),
            info.size.filter(|l| *l > 0),
        ) {
            (Some(d), Some(mt), Some(size)) => {
                let new = TagRecord {
                    digest: d,
                    media_type: mt,
                    size,
                    fetched_at: unix_now(),
                };
                self.save_tag(reg, name, tag, &new);
                Ok(record_reply(&new))
            }
            _ => {
                self.fetch_manifest(up, name, &Reference::Tag(tag.clone()))
                    .await
            }
        }
    }

    fn save_tag(&self, reg: &str, name: &RepositoryName, tag: &Tag, rec: &TagRecord) {
        if let Err(e) = self
            .store
            .add_link(reg, name, &rec.digest)
            .and_then(|()| self.store.write_tag(reg, name, tag, rec))
        {
            tracing::warn!(error = %e, "could not write tag record");
        }
    }

    /// Ask upstream whether `d` belongs to `name` before serving stored content to it.
    async fn confirm(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        d: &Digest,
        kind: Kind,
    ) -> Result<bool, CacheError> {
        let info = self.head_shared(up, name, d, kind).await?;
        if info.status == StatusCode::OK.as_u16() {
            self.store
                .add_link(&up.name, name, d)
                .map_err(storage_err)?;
            return Ok(true);
        }
        Err(CacheError::UpstreamStatus(info.status))
    }

    /// GET a manifest by digest, once for every concurrent request for the same
    /// (registry, repository, digest).
    async fn fetch_manifest_shared(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        d: &Digest,
    ) -> Result<ManifestReply, CacheError> {
        let key: ManifestKey = (up.name.clone(), name.clone(), d.clone());
        let (this, up, name, reference) = (
            self.clone(),
            up.clone(),
            name.clone(),
            Reference::Digest(d.clone()),
        );
        let (r, role) = self
            .manifest_flights
            .run(key, move || async move {
                this.fetch_manifest(&up, &name, &reference).await
            })
            .await;
        if role == Role::Joined {
            Metrics::inc(&self.metrics.coalesced_waiters);
        }
        r
    }

    async fn fetch_manifest(
        &self,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<ManifestReply, CacheError> {
        Metrics::inc(&self.metrics.upstream_fetches);
        let path = format!("/v2/{name}/manifests/{reference}");
        let resp = up
            .send(Method::GET, &path, name, Some(oci::MANIFEST_ACCEPT), 3)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(&resp, Kind::Manifest));
        }
        if resp
            .content_length()
            .is_some_and(|l| l > oci::MAX_MANIFEST_BYTES as u64)
        {
            return Err(CacheError::TooLarge);
        }
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let hdr_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_limited(resp, oci::MAX_MANIFEST_BYTES).await?;
        let media_type =
            oci::manifest_media_type(ct.as_deref(), &body).map_err(CacheError::ManifestInvalid)?;
        let digest = Digest::of_bytes(&body);
        if let Reference::Digest(want) = reference {
            if *want != digest {
                Metrics::inc(&self.metrics.verify_failures);
                return Err(CacheError::DigestMismatch(format!(
                    "asked {want}, got {digest}"
                )));
            }
        }
        if let Some(h) = hdr_digest.filter(|h| h.starts_with("sha256:")) {
            if h != digest.as_str() {
                Metrics::inc(&self.metrics.verify_failures);
                return Err(CacheError::DigestMismatch(format!(
                    "Docker-Content-Digest {h}, body {digest}"
                )));
            }
        }
        self.remember_sizes(&up.name, name, &body);
        // Link first: a request that finds the stored manifest then needs no confirming HEAD.
        if let Err(e) = self.store.add_link(&up.name, name, &digest) {
            tracing::warn!(error = %e, "could not write link");
        }
        if let Err(e) = self.store_manifest(&digest, &body, &media_type).await {
            Metrics::inc(&self.metrics.store_write_errors);
            tracing::error!(%digest, error = %e, "could not store manifest; serving it uncached");
        }
        let reply = ManifestReply {
            digest: digest.clone(),
            media_type: media_type.clone(),
            size: body.len() as u64,
            body: Some(body),
        };
        if let Reference::Tag(tag) = reference {
            self.save_tag(
                &up.name,
                name,
                tag,
                &TagRecord {
                    digest,
                    media_type,
                    size: reply.size,
                    fetched_at: unix_now(),
                },
            );
        }
        Ok(reply)
    }

    fn remember_sizes(&self, registry: &str, name: &RepositoryName, manifest: &[u8]) {
        let sizes = oci::descriptor_sizes(manifest);
        let mut known = lock(&self.known_sizes);
        if known.len() + sizes.len() > MAX_KNOWN_SIZES {
            known.clear();
        }
        for (d, size) in sizes {
            known.insert((registry.to_owned(), name.to_string(), d), size);
        }
    }

    async fn store_manifest(
        &self,
        d: &Digest,
        body: &[u8],
        media_type: &str,
    ) -> Result<(), CacheError> {
        if self.store.size(d).map_err(storage_err)?.is_some() {
            return Ok(());
        }
        self.make_room(body.len() as u64);
        self.store
            .set_manifest_media_type(d, media_type)
            .map_err(storage_err)?;
        let mut t = self.store.begin_write().map_err(storage_err)?;
        t.write(body).await.map_err(storage_err)?;
        t.commit(d, Some(body.len() as u64))
            .await
            .map_err(|e| CacheError::Storage(e.to_string()))?;
        lock(&self.lru).insert(d, body.len() as u64, None);
        Ok(())
    }

    // ---------------------------------------------------------------- blobs

    pub async fn blob(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        d: &Digest,
        head: bool,
    ) -> Result<BlobReply, CacheError> {
        let pin = PinGuard::new(&self.lru, d);
        if let Some((file, size)) = self.store.open(d).map_err(storage_err)? {
            if self.store.has_link(&up.name, name, d)
                || self.confirm(up, name, d, Kind::Blob).await?
            {
                Metrics::inc(&self.metrics.hits);
                self.touch(d);
                return Ok(if head {
                    BlobReply::Head { size }
                } else {
                    BlobReply::Cached { file, size, pin }
                });
            }
        }
        drop(pin);
        let key: FlightKey = (up.name.clone(), name.clone(), d.clone());
        let existing = lock(&self.flights).get(&key).cloned();
        if let Some(flight) = existing {
            Metrics::inc(&self.metrics.coalesced_waiters);
            let size = flight.started().await?;
            return Ok(BlobReply::Flight { flight, size });
        }
        Metrics::inc(&self.metrics.misses);
        if head {
            let info = self.head_shared(up, name, d, Kind::Blob).await?;
            if info.status != StatusCode::OK.as_u16() {
                return Err(CacheError::UpstreamStatus(info.status));
            }
            if let Some(size) = info.size {
                return Ok(BlobReply::Head { size });
            }
            // No length on HEAD: fall through to a download, which tells us.
        }
        let flight = self.start_flight(up, name, d, key);
        let size = flight.started().await?;
        Ok(BlobReply::Flight { flight, size })
    }

    fn start_flight(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        d: &Digest,
        key: FlightKey,
    ) -> Arc<InFlight> {
        let mut flights = lock(&self.flights);
        if let Some(f) = flights.get(&key) {
            Metrics::inc(&self.metrics.coalesced_waiters);
            return f.clone();
        }
        let temp = match self.store.begin_write() {
            Ok(t) => Some(t),
            Err(e) => {
                Metrics::inc(&self.metrics.store_write_errors);
                tracing::error!(digest = %d, error = %e, "cannot create temp file; passing through without caching");
                None
            }
        };
        let read_handle = temp
            .as_ref()
            .and_then(|t| std::fs::File::open(t.path()).ok())
            .map(Arc::new);
        let temp = if read_handle.is_some() { temp } else { None };
        let (tx, rx) = watch::channel(FlightState::default());
        let flight = Arc::new(InFlight {
            file: read_handle,
            state: rx,
            tail: Mutex::new(Tail::new(self.pass_through.clone())),
        });
        flights.insert(key.clone(), flight.clone());
        drop(flights);
        let this = self.clone();
        let up = up.clone();
        let name = name.clone();
        let d = d.clone();
        let f2 = flight.clone();
        tokio::spawn(async move {
            let _pin = PinGuard::new(&this.lru, &d);
            Metrics::inc(&this.metrics.upstream_fetches);
            let r = this.download(&up, &name, &d, &tx, temp, &f2).await;
            lock(&this.flights).remove(&key);
            match &r {
                Ok(()) => tracing::info!(registry = %up.name, %name, digest = %d, "blob fetched"),
                Err(e) => {
                    tracing::warn!(registry = %up.name, %name, digest = %d, error = %e, "blob fetch failed")
                }
            }
            tx.send_modify(|s| s.done = Some(r));
        });
        flight
    }

    async fn download(
        &self,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        d: &Digest,
        tx: &watch::Sender<FlightState>,
        mut temp: Option<TempBlob>,
        flight: &InFlight,
    ) -> Result<(), CacheError> {
        let resp = up
            .send(Method::GET, &format!("/v2/{name}/blobs/{d}"), name, None, 3)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(&resp, Kind::Blob));
        }
        // The upstream served it for this repository. Linked now (a link without content is
        // harmless) so requests that find the committed blob need no confirming HEAD.
        if let Err(e) = self.store.add_link(&up.name, name, d) {
            tracing::warn!(error = %e, "could not write link");
        }
        let total = resp.content_length();
        let known = lock(&self.known_sizes)
            .get(&(up.name.clone(), name.to_string(), d.clone()))
            .copied();
        if let (Some(k), Some(t)) = (known, total) {
            if k != t {
                Metrics::inc(&self.metrics.verify_failures);
                return Err(CacheError::DigestMismatch(format!(
                    "Content-Length {t}, the manifest says {k}"
                )));
            }
        }
        // Bytes this download may bring: what it announced or its manifest said, never past
        // max_blob_size; with no length, no more than the cache could store.
        // Read once: a reload during the download does not move its bounds.
        let (max_size, max_blob_size) = (self.max_size(), self.max_blob_size());
        let limit = match total.or(known) {
            Some(t) if t > max_blob_size => {
                tracing::warn!(digest = %d, size = t, max = max_blob_size, "blob larger than max_blob_size; refused");
                return Err(CacheError::TooLarge);
            }
            Some(t) => t,
            None if max_size > 0 => max_blob_size.min(max_size),
            None => max_blob_size,
        };
        if let Some(t) = total {
            if max_size > 0 && t > max_size {
                tracing::warn!(digest = %d, size = t, "blob larger than max_size; not caching");
                temp = None;
            } else {
                self.make_room(t);
            }
        }
        // Once the disk is out of the picture, hash here.
        let mut hasher = if temp.is_none() {
            Some(sha2::Sha256::new())
        } else {
            None
        };
        tx.send_modify(|s| s.started = Some(total));
        let mut received: u64 = 0;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| CacheError::Upstream(UpstreamError::Connect(e.to_string())))?;
            let len = chunk.len() as u64;
            if received.saturating_add(len) > limit {
                Metrics::inc(&self.metrics.verify_failures);
                return Err(match total {
                    Some(_) => {
                        CacheError::DigestMismatch("upstream sent more than Content-Length".into())
                    }
                    None => CacheError::TooLarge,
                });
            }
            if let Some(t) = temp.as_mut() {
                match t.write(&chunk).await {
                    Ok(()) => {
                        received += len;
                        tx.send_modify(|s| {
                            s.received = received;
                            s.on_disk = received;
                        });
                        continue;
                    }
                    Err(e) => {
                        Metrics::inc(&self.metrics.store_write_errors);
                        tracing::error!(digest = %d, error = %e, "writing the cache failed (disk full?); passing the rest through without caching");
                        if let Some(t) = temp.take() {
                            hasher = Some(t.abandon());
                        }
                        lock(&flight.tail).start = received;
                    }
                }
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            if !lock(&flight.tail).push(chunk) {
                return Err(CacheError::Storage(
                    "disk full and the pass-through memory is spent".into(),
                ));
            }
            received += len;
            tx.send_modify(|s| s.received = received);
        }
        if let Some(t) = total {
            if received != t {
                return Err(CacheError::Upstream(UpstreamError::Connect(format!(
                    "upstream body ended after {received} of {t} bytes"
                ))));
            }
        }
        match (temp, hasher) {
            (Some(t), _) => match t.commit(d, Some(received)).await {
                Ok(_) => {
                    lock(&self.lru).insert(d, received, None);
                    self.make_room(0);
                    Ok(())
                }
                Err(CommitError::Io(e)) => {
                    // Verified already (commit checks first); only storing failed.
                    Metrics::inc(&self.metrics.store_write_errors);
                    tracing::error!(digest = %d, error = %e, "could not commit blob; served uncached");
                    Ok(())
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.verify_failures);
                    Err(CacheError::DigestMismatch(e.to_string()))
                }
            },
            (None, Some(h)) => {
                let got = Digest::from_sha256(h);
                if got == *d {
                    Ok(())
                } else {
                    Metrics::inc(&self.metrics.verify_failures);
                    Err(CacheError::DigestMismatch(format!(
                        "expected {d}, got {got}"
                    )))
                }
            }
            (None, None) => Err(CacheError::Internal("no hash state".into())),
        }
    }

    // ---------------------------------------------------------------- passthrough

    /// GET a small JSON document (tags list, referrers) with a short cache.
    pub async fn small(
        &self,
        up: &Arc<Upstream>,
        name: &RepositoryName,
        path_and_query: &str,
        accept: Option<&str>,
    ) -> Result<SmallReply, CacheError> {
        let key = format!("{}\n{}\n{}", up.name, path_and_query, accept.unwrap_or(""));
        if let Some(r) = lock(&self.small).get(&key, Instant::now()) {
            Metrics::inc(&self.metrics.hits);
            return Ok(r);
        }
        Metrics::inc(&self.metrics.misses);
        let resp = up
            .send(Method::GET, path_and_query, name, accept, 3)
            .await?;
        let status = resp.status();
        if !(status == StatusCode::OK || status == StatusCode::NOT_FOUND) {
            return Err(status_error(&resp, Kind::Other));
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let link = resp
            .headers()
            .get(LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_limited(resp, MAX_SMALL_BYTES).await?;
        let reply = SmallReply {
            status: status.as_u16(),
            content_type,
            link,
            body,
        };
        if status == StatusCode::OK {
            lock(&self.small).put(key, reply.clone(), Instant::now());
        }
        Ok(reply)
    }

    /// Wait (bounded) for downloads in progress to finish.
    pub async fn drain(&self, grace: Duration) {
        let now = Instant::now();
        let deadline = now
            .checked_add(grace)
            .or_else(|| now.checked_add(crate::config::MAX_SHUTDOWN_GRACE))
            .unwrap_or(now);
        loop {
            let n = self.inflight()
                + self.tag_flights.len()
                + self.manifest_flights.len()
                + self.head_flights.len();
            if n == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(inflight = n, "shutdown grace over; abandoning downloads");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn clean_tmp(&self) {
        if let Err(e) = self.store.clean_tmp() {
            tracing::warn!(error = %e, "cleaning temp directory");
        }
    }
}

async fn read_limited(resp: reqwest::Response, max: usize) -> Result<Bytes, CacheError> {
    read_body(resp, max).await.map_err(|e| match e {
        BodyError::TooLarge(_) => CacheError::TooLarge,
        BodyError::Read(r) => CacheError::Upstream(UpstreamError::Connect(r)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use crate::testserver::{endless, reply, TestServer};

    const MIB: u64 = 1024 * 1024;

    fn open(
        root: &std::path::Path,
        server: &TestServer,
        limits: Limits,
    ) -> (Arc<Cache>, Arc<Upstream>) {
        let up = Arc::new(
            Upstream::new(
                &UpstreamConfig {
                    name: "lab".into(),
                    url: url::Url::parse(&server.url("")).unwrap(),
                    ca_pems: vec![],
                    credentials: None,
                    realm_hosts: vec![],
                    redirect_hosts: vec![],
                    client_token: None,
                },
                None,
            )
            .unwrap(),
        );
        let store = Arc::new(crate::store::fs::FsStore::new(root).unwrap());
        let ups = BTreeMap::from([("lab".to_owned(), up.clone())]);
        let cache = Cache::open(store, ups, Duration::from_secs(60), limits).unwrap();
        (Arc::new(cache), up)
    }

    fn limits(max_blob_size: u64) -> Limits {
        Limits {
            max_size: 0,
            max_blob_size,
            max_pass_through_memory: 16 * MIB,
        }
    }

    fn name(s: &str) -> RepositoryName {
        RepositoryName::parse(s).unwrap()
    }

    async fn outcome(flight: &InFlight) -> Result<(), CacheError> {
        let mut rx = flight.state.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().done.clone() {
                return r;
            }
            rx.changed().await.unwrap();
        }
    }

    #[tokio::test]
    async fn upstream_without_head_answers_from_a_get() {
        let blob = Bytes::from(vec![7u8; 3000]);
        let d = Digest::of_bytes(&blob);
        let path = format!("/blobs/{d}");
        let body = blob.clone();
        let server = TestServer::start(move |seen| {
            if seen.method == axum::http::Method::HEAD {
                return reply(405, &[], "");
            }
            if seen.uri.ends_with(&path) {
                return reply(200, &[], body.clone());
            }
            reply(404, &[], "")
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, up) = open(dir.path(), &server, limits(MIB));

        // HEAD of an uncached blob: the GET's headers give the size.
        match cache.blob(&up, &name("lab/app"), &d, true).await {
            Ok(BlobReply::Head { size }) => assert_eq!(size, 3000),
            Ok(_) => panic!("not a HEAD answer"),
            Err(e) => panic!("{e}"),
        }
        // Fetch it, then ask through another repository: the confirmation falls back to GET.
        let Ok(BlobReply::Flight { flight, .. }) =
            cache.blob(&up, &name("lab/app"), &d, false).await
        else {
            panic!("no download")
        };
        outcome(&flight).await.unwrap();
        match cache.blob(&up, &name("lab/other"), &d, true).await {
            Ok(BlobReply::Head { size }) => assert_eq!(size, 3000),
            Ok(_) => panic!("not a HEAD answer"),
            Err(e) => panic!("confirmation without HEAD support: {e}"),
        }
        let gets = server
            .seen()
            .iter()
            .filter(|s| s.method == axum::http::Method::GET)
            .count();
        assert_eq!(gets, 3, "one download and two HEAD fallbacks");
    }

    #[tokio::test]
    async fn oversized_downloads_are_aborted_and_nothing_is_kept() {
        let big = Bytes::from(vec![1u8; (2 * MIB) as usize]);
        let declared = Digest::of_bytes(&big);
        let endless_digest = Digest::of_bytes(b"never");
        let (e1, d1) = (endless_digest.clone(), declared.clone());
        let server = TestServer::start(move |seen| {
            if seen.uri.ends_with(e1.as_str()) {
                reply(200, &[], endless())
            } else if seen.uri.ends_with(d1.as_str()) {
                reply(200, &[], big.clone())
            } else {
                reply(404, &[], "")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, up) = open(dir.path(), &server, limits(MIB));

        // Content-Length over the bound: refused before a byte is stored.
        let r = cache.blob(&up, &name("lab/app"), &declared, false).await;
        assert!(matches!(r, Err(CacheError::TooLarge)), "{:?}", r.err());

        // No length and an endless body: aborted at the bound, the temp file removed.
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            let Ok(BlobReply::Flight { flight, .. }) = cache
                .blob(&up, &name("lab/app"), &endless_digest, false)
                .await
            else {
                panic!("no download")
            };
            outcome(&flight).await
        })
        .await
        .expect("aborted, not written forever");
        assert!(matches!(r, Err(CacheError::TooLarge)), "{r:?}");
        let tmp: Vec<_> = std::fs::read_dir(dir.path().join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "{tmp:?}");
        assert_eq!(cache.entries(), 0);
    }

    #[tokio::test]
    async fn a_blob_longer_than_its_manifest_says_is_cut_at_that_size() {
        let layer = Digest::of_bytes(b"the real layer, 29 bytes long");
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{layer}","size":29}},"layers":[]}}"#,
            oci::MT_OCI_MANIFEST
        );
        let md = Digest::of_bytes(manifest.as_bytes());
        let (l2, m2) = (layer.clone(), manifest.clone());
        let server = TestServer::start(move |seen| {
            if seen.uri.contains("/manifests/") {
                reply(200, &[("content-type", oci::MT_OCI_MANIFEST)], m2.clone())
            } else if seen.uri.ends_with(l2.as_str()) {
                reply(200, &[], endless())
            } else {
                reply(404, &[], "")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, up) = open(dir.path(), &server, limits(1 << 40));
        let repo = name("lab/app");
        cache
            .manifest(&up, &repo, &Reference::Digest(md), false)
            .await
            .unwrap();
        // Cut before the answer is even passed on (the first chunk is already too long), or
        // while streaming: either way an error, never more than 29 bytes.
        let r = match cache.blob(&up, &repo, &layer, false).await {
            Ok(BlobReply::Flight { flight, .. }) => {
                let r = tokio::time::timeout(Duration::from_secs(20), outcome(&flight))
                    .await
                    .expect("cut, not read on");
                assert!(flight.state.borrow().received <= 29);
                r
            }
            Ok(_) => panic!("not a download"),
            Err(e) => Err(e),
        };
        assert!(matches!(r, Err(CacheError::TooLarge)), "{r:?}");
        assert_eq!(cache.entries(), 1, "only the manifest is stored");
    }

    #[tokio::test]
    async fn a_size_claimed_by_one_repository_does_not_break_another() {
        let bytes = Bytes::from_static(b"a popular layer, 33 bytes long..");
        let layer = Digest::of_bytes(&bytes);
        // Anyone may push a manifest to their own repository that lies about a shared layer.
        let lie = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{layer}","size":7}},"layers":[]}}"#,
            oci::MT_OCI_MANIFEST
        );
        let md = Digest::of_bytes(lie.as_bytes());
        let (l2, m2, b2) = (layer.clone(), lie.clone(), bytes.clone());
        let server = TestServer::start(move |seen| {
            if seen.uri.contains("/manifests/") {
                reply(200, &[("content-type", oci::MT_OCI_MANIFEST)], m2.clone())
            } else if seen.uri.ends_with(l2.as_str()) {
                reply(200, &[], b2.clone())
            } else {
                reply(404, &[], "")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, up) = open(dir.path(), &server, limits(1 << 40));
        cache
            .manifest(&up, &name("mallory/lies"), &Reference::Digest(md), false)
            .await
            .unwrap();
        let r = match cache.blob(&up, &name("library/app"), &layer, false).await {
            Ok(BlobReply::Flight { flight, .. }) => {
                tokio::time::timeout(Duration::from_secs(20), outcome(&flight))
                    .await
                    .expect("finished")
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        assert!(
            r.is_ok(),
            "another repository's claim broke the pull: {r:?}"
        );
    }

    #[tokio::test]
    async fn a_blob_larger_than_the_cache_passes_through_memory_not_disk() {
        let blob = Bytes::from(vec![9u8; 3000]);
        let d = Digest::of_bytes(&blob);
        let body = blob.clone();
        let server = TestServer::start(move |_| reply(200, &[], body.clone())).await;
        let dir = tempfile::tempdir().unwrap();
        let tiny = Limits {
            max_size: 1000,
            max_blob_size: MIB,
            max_pass_through_memory: 4000,
        };
        let (cache, up) = open(dir.path(), &server, tiny);
        let Ok(BlobReply::Flight { flight, .. }) =
            cache.blob(&up, &name("lab/app"), &d, false).await
        else {
            panic!("no download")
        };
        let got: Vec<u8> = flight::reader(flight.clone(), 0, None, cache.metrics.clone())
            .map(|c| c.unwrap())
            .collect::<Vec<_>>()
            .await
            .concat();
        assert_eq!(got, blob);
        outcome(&flight).await.unwrap();
        assert_eq!(cache.entries(), 0, "not stored: larger than max_size");
        let on_disk: u64 = std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, 0, "the disk bound holds while it streams");
        assert_eq!(
            cache.pass_through.used(),
            3000,
            "held while the download is referenced"
        );
        drop(flight);
        assert_eq!(cache.pass_through.used(), 0, "given back");
    }

    #[test]
    fn small_cache_bounds() {
        let reply = |n: usize| SmallReply {
            status: 200,
            content_type: None,
            link: None,
            body: Bytes::from(vec![0u8; n]),
        };
        let mut c = SmallCache::default();
        let t0 = Instant::now();
        c.put("too big".into(), reply(MAX_SMALL_ENTRY_BYTES + 1), t0);
        assert!(c.map.is_empty(), "served, not kept");
        for i in 0..(MAX_SMALL_CACHE_BYTES / MAX_SMALL_ENTRY_BYTES + 5) {
            c.put(
                format!("k{i}"),
                reply(MAX_SMALL_ENTRY_BYTES),
                t0 + Duration::from_millis(i as u64),
            );
            assert!(c.bytes <= MAX_SMALL_CACHE_BYTES);
        }
        assert_eq!(c.evictions, 6, "31 entries of 1 MiB plus their keys fit");
        assert!(c.get("k0", t0).is_none(), "oldest went first");
        for i in 0..2 * MAX_SMALL_ENTRIES {
            c.put(format!("n{i}"), reply(1), t0 + Duration::from_secs(1));
            assert!(c.map.len() <= MAX_SMALL_ENTRIES);
        }
        let later = t0 + SMALL_TTL + Duration::from_secs(2);
        c.put("fresh".into(), reply(10), later);
        assert!(c.get("n1999", later).is_none(), "expired");
        assert_eq!(
            c.bytes,
            c.map
                .iter()
                .map(|(k, (_, r))| k.len() + r.body.len())
                .sum::<usize>()
        );
    }

    #[tokio::test]
    async fn drain_with_an_enormous_grace_does_not_panic() {
        let server = TestServer::start(|_| reply(404, &[], "")).await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = open(dir.path(), &server, limits(MIB));
        cache.drain(Duration::MAX).await;
    }
}
