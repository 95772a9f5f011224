//! Pull-through logic, by concern: `manifests` (tags with freshness and stale-if-error,
//! manifests by digest), `blobs` (downloads teed to every waiting client through `streams`,
//! verified before anything is stored), `pass_through` (tags lists and referrers, briefly
//! cached). Shared here: the `Cache` itself, the one `single_flight` mechanism, upstream
//! HEADs and confirmations, and size-bounded LRU eviction (`lru`).

mod blobs;
pub mod lru;
mod manifests;
mod pass_through;
pub mod single_flight;
pub mod streams;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use crate::lock;
use crate::metrics::Metrics;
use crate::oci;
use crate::store::{BlobStore, StoredBlob};
use crate::upstream::client::Credential;
use crate::upstream::{head_unsupported, read_body, BodyError, Upstream, UpstreamError};
use lru::{Lru, Reservation};
use pass_through::SmallCache;
use registry_rules::digest::Digest;
use registry_rules::names::RepositoryName;
use single_flight::{Outcome, Role, SingleFlight};
use streams::{InFlight, MemoryBudget};

pub use blobs::BlobReply;
pub use manifests::ManifestReply;
pub use pass_through::SmallReply;

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
    #[error("the upstream refused the mirror's credential for this repository (private, or no such repository)")]
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
    #[error("too many upstream fetches in progress on this cache; try again")]
    Busy,
}

impl CacheError {
    /// Errors for which a stale cached tag may be served instead.
    pub fn is_upstream_failure(&self) -> bool {
        match self {
            // Busy: the upstream cannot be asked now, as when it is down.
            CacheError::TooManyRequests { .. } | CacheError::Upstream(_) | CacheError::Busy => true,
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
            retry_after: header_text(resp, reqwest::header::RETRY_AFTER),
        },
        s => CacheError::UpstreamStatus(s.as_u16()),
    }
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

/// A response header's value, if it is text.
fn header_text(
    resp: &reqwest::Response,
    name: impl reqwest::header::AsHeaderName,
) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl HeadInfo {
    fn of(resp: &reqwest::Response) -> Self {
        Self {
            status: resp.status().as_u16(),
            digest: header_text(resp, "docker-content-digest"),
            content_type: header_text(resp, CONTENT_TYPE),
            size: header_text(resp, CONTENT_LENGTH).and_then(|l| l.trim().parse().ok()),
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

type HeadKey = (String, RepositoryName, Digest, Kind);

/// An upstream as one request reads it: with the cache's own access, or with the credential
/// of the client it was authorized for (`client_auth = "upstream"` without a cache login).
/// Downloads are shared by digest whoever started them: every request that joins one was
/// authorized for its repository first.
#[derive(Debug, Clone)]
pub struct Source {
    pub upstream: Arc<Upstream>,
    pub credential: Credential,
}

impl Source {
    /// The upstream read with the cache's own access.
    pub fn cache(upstream: Arc<Upstream>) -> Self {
        Self {
            upstream,
            credential: Credential::Cache,
        }
    }

    /// [`Upstream::send`] with this source's credential.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        name: &RepositoryName,
        accept: Option<&str>,
        attempts: u32,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.upstream
            .send(
                method,
                path_and_query,
                name,
                accept,
                attempts,
                &self.credential,
            )
            .await
    }
}

impl std::ops::Deref for Source {
    type Target = Upstream;

    fn deref(&self) -> &Upstream {
        &self.upstream
    }
}

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
    /// Size accounting and eviction order of a store this replica owns; for a shared store
    /// only the pins (the bucket's own listing orders its eviction, and a per-blob map here
    /// would grow with the bucket).
    lru: Arc<Mutex<Lru>>,
    /// A shared store's bytes and blobs as this replica last listed them (at start, then at
    /// each eviction pass it runs).
    listed: Mutex<(u64, usize)>,
    /// Blob downloads in progress: followers read the download as it streams.
    flights: SingleFlight<blobs::FlightKey, Arc<InFlight>>,
    /// Tag resolutions (HEAD, or GET when HEAD says too little) in progress.
    tag_flights: SingleFlight<manifests::TagKey, Outcome<ManifestReply>>,
    /// Manifest GETs by digest in progress.
    manifest_flights: SingleFlight<manifests::ManifestKey, Outcome<ManifestReply>>,
    /// Upstream HEADs (confirmations, HEAD of uncached content) in progress.
    head_flights: SingleFlight<HeadKey, Outcome<HeadInfo>>,
    small: Mutex<SmallCache>,
    /// Sizes the verified manifests of each repository gave their blobs: a download for
    /// that repository longer than that is aborted at once. Keyed by upstream and
    /// repository: a size is a claim of whoever pushed the manifest, so one repository's
    /// manifests must not bound (or break) another's downloads of a shared layer.
    known_sizes: Mutex<HashMap<(String, String, Digest), u64>>,
    readiness: Arc<Readiness>,
    /// [`METADATA_DEADLINE`]; shorter in tests.
    metadata_deadline: Duration,
}

/// The longest an upstream answer the cache reads whole (a manifest, a tag's HEAD, a tags
/// list, a confirming HEAD) may take, tries included. The client's read timeout restarts with
/// every byte, so an upstream that trickles would otherwise keep the request, and every one
/// joined to it, waiting past Envoy's 60 s manifest route timeout, and past the stale tag the
/// cache could have served instead.
const METADATA_DEADLINE: Duration = Duration::from_secs(25);

/// `work` if it ends within `deadline`, else an upstream failure (which a stale tag answers).
async fn within<T>(
    deadline: Duration,
    work: impl std::future::Future<Output = Result<T, CacheError>>,
) -> Result<T, CacheError> {
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| {
            Err(CacheError::Upstream(UpstreamError::Connect(format!(
                "no complete answer within {} s",
                deadline.as_secs()
            ))))
        })
}

/// How long a readiness answer stands before the store is asked again.
const READY_RECHECK: Duration = Duration::from_secs(2);
/// A store that has not answered a readiness check within this is not ready.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The store's last readiness answer. Every Envoy probes `/readyz` every few seconds with a
/// short timeout: answering from the last check (refreshed in the background) keeps a slow
/// but working store from failing probes, which would move a replica's keys to another
/// replica, and keeps probes from multiplying store requests.
#[derive(Debug, Default)]
struct Readiness {
    /// When the last check finished, and what it said.
    last: Mutex<Option<(Instant, Result<(), String>)>>,
    refreshing: std::sync::atomic::AtomicBool,
}

impl Readiness {
    async fn check(store: &dyn BlobStore) -> Result<(), String> {
        match tokio::time::timeout(READY_TIMEOUT, store.check_ready()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} s", READY_TIMEOUT.as_secs())),
        }
    }

    fn record(&self, result: Result<(), String>) -> Result<(), String> {
        *lock(&self.last) = Some((Instant::now(), result.clone()));
        result
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("max_size", &self.max_size())
            .finish()
    }
}

impl Cache {
    /// Open the cache: removes leftovers of interrupted writes, rebuilds LRU order from the
    /// stored access times and evicts down to `max_size`.
    pub async fn open(
        store: Arc<dyn BlobStore>,
        upstreams: Upstreams,
        tag_ttl: Duration,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let cleaned = store.clean_abandoned().await?;
        if cleaned > 0 {
            tracing::info!(cleaned, "removed leftovers of interrupted writes");
        }
        let mut blobs = store.list().await?;
        blobs.sort_by_key(|b| b.last_access);
        let listed = (blobs.iter().map(|b| b.size).sum(), blobs.len());
        let mut lru = Lru::default();
        if !store.shared() {
            for (i, b) in blobs.iter().enumerate() {
                lru.insert(&b.digest, b.size, Some(i as u64));
            }
        }
        tracing::info!(blobs = listed.1, bytes = listed.0, "cache opened");
        let cache = Self {
            store,
            upstreams: RwLock::new(Arc::new(upstreams)),
            tag_ttl: AtomicU64::new(tag_ttl.as_secs()),
            max_size: AtomicU64::new(limits.max_size),
            max_blob_size: AtomicU64::new(limits.max_blob_size),
            pass_through: Arc::new(MemoryBudget::new(limits.max_pass_through_memory)),
            metrics: Arc::new(Metrics::default()),
            lru: Arc::new(Mutex::new(lru)),
            listed: Mutex::new(listed),
            flights: SingleFlight::new(single_flight::MAX_DOWNLOADS),
            tag_flights: SingleFlight::default(),
            manifest_flights: SingleFlight::default(),
            head_flights: SingleFlight::default(),
            small: Mutex::new(SmallCache::default()),
            known_sizes: Mutex::new(HashMap::new()),
            readiness: Arc::default(),
            metadata_deadline: METADATA_DEADLINE,
        };
        cache.make_room(0).await;
        Ok(cache)
    }

    /// Bytes stored (a shared store: as last listed by this replica).
    pub fn store_bytes(&self) -> u64 {
        if self.store.shared() {
            return lock(&self.listed).0;
        }
        lock(&self.lru).total()
    }

    /// Stored blobs and manifests (a shared store: as last listed by this replica).
    pub fn entries(&self) -> usize {
        if self.store.shared() {
            return lock(&self.listed).1;
        }
        lock(&self.lru).count()
    }

    /// Count a blob just stored (a shared store's is counted by its next listing).
    fn count_stored(&self, d: &Digest, size: u64) {
        if !self.store.shared() {
            lock(&self.lru).insert(d, size, None);
        }
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
    pub fn reconfigure(self: &Arc<Self>, upstreams: Upstreams, tag_ttl: Duration, limits: Limits) {
        match self.upstreams.write() {
            Ok(mut g) => *g = Arc::new(upstreams),
            Err(p) => *p.into_inner() = Arc::new(upstreams),
        }
        self.tag_ttl.store(tag_ttl.as_secs(), Relaxed);
        self.max_size.store(limits.max_size, Relaxed);
        self.max_blob_size.store(limits.max_blob_size, Relaxed);
        self.pass_through.set_limit(limits.max_pass_through_memory);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let this = self.clone();
            rt.spawn(async move { this.make_room(0).await });
        }
    }

    pub fn inflight(&self) -> usize {
        self.flights.len()
    }

    /// The Prometheus page (`/metrics`): counters plus the gauges of every bounded structure
    /// and of the store's readiness; `config_refused`: the last reload was refused (what the
    /// reloader knows, not the cache).
    pub async fn render_metrics(&self, config_refused: bool) -> String {
        let store_ready = self.check_ready().await.is_ok();
        let (tokens, token_evictions) = self
            .upstreams()
            .values()
            .map(|u| u.token_stats())
            .fold((0, 0), |(n, e), (n2, e2)| (n + n2, e + e2));
        let (small_entries, small_bytes, small_evictions) = lock(&self.small).stats();
        self.metrics.render(&crate::metrics::Gauges {
            store_ready,
            config_refused,
            store_bytes: self.store_bytes(),
            inflight: self.inflight(),
            pass_through_bytes: self.pass_through.used(),
            pass_through_rejections: self.pass_through.rejections(),
            small_cache_entries: small_entries,
            small_cache_bytes: small_bytes as u64,
            small_cache_evictions: small_evictions,
            token_cache_entries: tokens,
            token_cache_evictions: token_evictions,
            authorization_decisions: self
                .upstreams()
                .values()
                .map(|u| u.access.decisions())
                .sum(),
        })
    }

    /// Whether the store answers: the last check's result, refreshed in the background once
    /// it is older than [`READY_RECHECK`]; the first call waits for a check.
    pub async fn check_ready(&self) -> Result<(), String> {
        let last = lock(&self.readiness.last).clone();
        match last {
            None => {
                let result = Readiness::check(self.store.as_ref()).await;
                self.readiness.record(result)
            }
            Some((at, result)) => {
                if at.elapsed() >= READY_RECHECK && !self.readiness.refreshing.swap(true, Relaxed) {
                    let (store, readiness) = (self.store.clone(), self.readiness.clone());
                    tokio::spawn(async move {
                        let result = Readiness::check(store.as_ref()).await;
                        let _ = readiness.record(result);
                        readiness.refreshing.store(false, Relaxed);
                    });
                }
                result
            }
        }
    }

    pub fn upstream_names(&self) -> Vec<String> {
        self.upstreams().keys().cloned().collect()
    }

    /// Upstream for a request: the named registry, or the only one when none is named.
    pub fn upstream(&self, registry: Option<&str>) -> Result<Arc<Upstream>, CacheError> {
        let ups = self.upstreams();
        match registry {
            Some(r) => ups
                .get(&crate::config::upstream_key(r))
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

    /// Evict least-recently-used unpinned blobs until `incoming` bytes fit. A shared store is
    /// bounded by [`Self::evict_shared`] instead: one replica's own view is not the bucket's.
    async fn make_room(&self, incoming: u64) {
        if self.store.shared() {
            return;
        }
        let victims = lock(&self.lru).victims(incoming, self.max_size());
        self.evict(victims).await;
    }

    /// Add `incoming` bytes a download is about to write to its reservation, evicting what no
    /// longer fits beside the stored blobs and every download's reservation.
    async fn reserve(&self, reservation: &mut Reservation, incoming: u64) {
        if self.store.shared() {
            return;
        }
        let victims = reservation.grow(incoming, self.max_size());
        self.evict(victims).await;
    }

    async fn evict(&self, victims: Vec<(Digest, u64)>) {
        for (d, size) in victims {
            self.evicted(&d, size, self.store.delete(&d).await);
        }
    }

    fn evicted(&self, d: &Digest, size: u64, r: std::io::Result<u64>) {
        match r {
            Ok(_) => {
                Metrics::inc(&self.metrics.evictions);
                self.metrics.evicted_bytes.fetch_add(size, Relaxed);
                tracing::info!(digest = %d, size, "evicted");
            }
            Err(e) => tracing::warn!(digest = %d, error = %e, "eviction failed"),
        }
    }

    /// One eviction pass over a shared store, if this replica holds the lease: the least
    /// recently accessed blobs (access recorded by every replica) go until the bucket fits
    /// `max_size`, except those this replica is serving or fetching.
    pub async fn evict_shared(&self) -> std::io::Result<()> {
        let max = self.max_size();
        if max == 0 || !self.store.eviction_lease().await? {
            return Ok(());
        }
        let mut blobs = self.store.list().await?;
        let mut total: u64 = blobs.iter().map(|b| b.size).sum();
        let mut count = blobs.len();
        blobs.sort_by_key(|b| b.last_access);
        for b in blobs {
            if total <= max {
                break;
            }
            if lock(&self.lru).is_pinned(&b.digest) {
                continue;
            }
            let r = self.store.delete(&b.digest).await;
            if r.is_ok() {
                total = total.saturating_sub(b.size);
                count = count.saturating_sub(1);
            }
            self.evicted(&b.digest, b.size, r);
        }
        *lock(&self.listed) = (total, count);
        Ok(())
    }

    /// Background upkeep of a shared store: eviction every minute (under the lease) and
    /// cleanup of abandoned uploads every ten. Nothing for a local store (startup does it).
    pub fn spawn_upkeep(self: &Arc<Self>) {
        if !self.store.shared() {
            return;
        }
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0u64.. {
                tick.tick().await;
                let Some(cache) = this.upgrade() else { return };
                if let Err(e) = cache.evict_shared().await {
                    tracing::warn!(error = %e, "shared eviction failed");
                }
                if n % 10 == 0 {
                    match cache.store.clean_abandoned().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(aborted = n, "abandoned uploads cleaned"),
                        Err(e) => tracing::warn!(error = %e, "cleaning abandoned uploads failed"),
                    }
                }
            }
        });
    }

    /// A stored blob; `None` when absent or when the store cannot be read: the request is then
    /// a miss served from upstream (a store outage degrades to pass-through).
    async fn stored(&self, d: &Digest) -> Option<Box<dyn StoredBlob>> {
        match self.store.open(d).await {
            Ok(Some(b)) => Some(b),
            Ok(None) => {
                // Removed behind the cache's back: it no longer takes room.
                lock(&self.lru).remove(d);
                None
            }
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "storage unavailable; passing through");
                None
            }
        }
    }

    /// Whether `d` is linked to the repository; an unreadable link is asked upstream.
    async fn linked(&self, registry: &str, name: &RepositoryName, d: &Digest) -> bool {
        self.store
            .has_link(registry, name, d)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(digest = %d, error = %e, "storage unavailable; confirming upstream");
                false
            })
    }

    fn touch(&self, d: &Digest) {
        lock(&self.lru).touch(d);
        let (store, d) = (self.store.clone(), d.clone());
        tokio::spawn(async move { store.touch(&d).await });
    }

    /// One upstream HEAD shared by every concurrent request for the same
    /// (registry, repository, digest, kind); a GET's headers when the upstream does not do
    /// HEAD (405/400/501). `Ok` only for 200; other answers are errors.
    async fn head_shared(
        self: &Arc<Self>,
        up: &Source,
        name: &RepositoryName,
        d: &Digest,
        kind: Kind,
    ) -> Result<HeadInfo, CacheError> {
        let key: HeadKey = (up.name.clone(), name.clone(), d.clone(), kind);
        let (up, name, d) = (up.clone(), name.clone(), d.clone());
        let deadline = self.metadata_deadline;
        let (r, role) = self
            .head_flights
            .run(key, move || {
                within(deadline, async move {
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
            })
            .await;
        if role == Role::Joined {
            Metrics::inc(&self.metrics.coalesced_waiters);
        }
        r
    }

    /// Ask upstream whether `d` belongs to `name` before serving stored content to it.
    async fn confirm(
        self: &Arc<Self>,
        up: &Source,
        name: &RepositoryName,
        d: &Digest,
        kind: Kind,
    ) -> Result<bool, CacheError> {
        let info = self.head_shared(up, name, d, kind).await?;
        if info.status == StatusCode::OK.as_u16() {
            if let Err(e) = self.store.add_link(&up.name, name, d).await {
                tracing::warn!(error = %e, "could not write link");
            }
            return Ok(true);
        }
        Err(CacheError::UpstreamStatus(info.status))
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

    /// Remove what interrupted writes left (see [`BlobStore::clean_abandoned`]).
    pub async fn clean_abandoned(&self) {
        if let Err(e) = self.store.clean_abandoned().await {
            tracing::warn!(error = %e, "cleaning leftovers of interrupted writes");
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
pub(super) mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use crate::testserver::{reply, TestServer};

    pub(super) const MIB: u64 = 1024 * 1024;

    pub(super) async fn open(
        root: &std::path::Path,
        server: &TestServer,
        limits: Limits,
    ) -> (Arc<Cache>, Source) {
        let store = Arc::new(crate::store::fs::FsStore::new(root).unwrap());
        open_with(store, server, limits).await
    }

    /// [`open`] on a store of the test's own.
    pub(super) async fn open_with(
        store: Arc<dyn BlobStore>,
        server: &TestServer,
        limits: Limits,
    ) -> (Arc<Cache>, Source) {
        let up = Arc::new(
            Upstream::new(
                &UpstreamConfig {
                    name: "lab".into(),
                    url: url::Url::parse(&server.url("")).unwrap(),
                    ca_pems: vec![],
                    credentials: None,
                    realm_hosts: vec![],
                    redirect_hosts: vec![],
                    client_auth: Default::default(),
                    authorization_ttl: Duration::from_secs(60),
                },
                None,
            )
            .unwrap(),
        );
        let ups = BTreeMap::from([("lab".to_owned(), up.clone())]);
        let cache = Cache::open(store, ups, Duration::from_secs(60), limits)
            .await
            .unwrap();
        (Arc::new(cache), Source::cache(up))
    }

    pub(super) fn limits(max_blob_size: u64) -> Limits {
        Limits {
            max_size: 0,
            max_blob_size,
            max_pass_through_memory: 16 * MIB,
        }
    }

    /// An OCI manifest with no layers, and its digest.
    fn small_manifest() -> (String, Digest) {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{}","size":2}},"layers":[]}}"#,
            oci::MT_OCI_MANIFEST,
            Digest::of_bytes(b"{}")
        );
        let digest = Digest::of_bytes(manifest.as_bytes());
        (manifest, digest)
    }

    pub(super) fn name(s: &str) -> RepositoryName {
        RepositoryName::parse(s).unwrap()
    }

    pub(super) async fn outcome(flight: &InFlight) -> Result<(), CacheError> {
        let mut rx = flight.state.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().done.clone() {
                return r;
            }
            rx.changed().await.unwrap();
        }
    }

    #[tokio::test]
    async fn drain_with_an_enormous_grace_does_not_panic() {
        let server = TestServer::start(|_| reply(404, &[], "")).await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = open(dir.path(), &server, limits(MIB)).await;
        cache.drain(Duration::MAX).await;
    }

    /// An upstream that trickles a manifest keeps no request waiting for its per-read
    /// timeout (which every byte restarts): past the metadata deadline the tag's stale
    /// record is served, as when the upstream is down.
    #[tokio::test]
    async fn a_trickling_upstream_gets_the_stale_tag_after_the_metadata_deadline() {
        use std::sync::atomic::AtomicBool;
        let (manifest, digest) = small_manifest();
        let trickle = Arc::new(AtomicBool::new(false));
        let server = TestServer::start({
            let trickle = trickle.clone();
            move |seen| match seen.method {
                // No HEAD: the tag is resolved by a GET.
                axum::http::Method::HEAD => reply(405, &[], ""),
                _ if trickle.load(Relaxed) => {
                    let first = futures::stream::once(async {
                        Ok::<_, std::io::Error>(Bytes::from_static(b"{"))
                    });
                    let body = axum::body::Body::from_stream(futures::StreamExt::chain(
                        first,
                        futures::stream::pending(),
                    ));
                    reply(200, &[("content-type", oci::MT_OCI_MANIFEST)], body)
                }
                _ => reply(
                    200,
                    &[("content-type", oci::MT_OCI_MANIFEST)],
                    manifest.clone(),
                ),
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::fs::FsStore::new(dir.path()).unwrap());
        let (cache, up) = open_with(store, &server, limits(MIB)).await;
        use registry_rules::names::{Reference, Tag};
        let (app, tag) = (name("app"), Reference::Tag(Tag::parse("1").unwrap()));
        let fresh = cache.manifest(&up, &app, &tag, false).await.unwrap();
        assert_eq!(fresh.digest, digest);

        // The record is stale from now on, and the upstream sends one byte and no more.
        cache.tag_ttl.store(0, Relaxed);
        trickle.store(true, Relaxed);
        let mut impatient = Arc::try_unwrap(cache).expect("only this test holds the cache");
        impatient.metadata_deadline = Duration::from_secs(1);
        let cache = Arc::new(impatient);
        let started = Instant::now();
        let stale = tokio::time::timeout(
            Duration::from_secs(20),
            cache.manifest(&up, &app, &tag, false),
        )
        .await
        .expect("answered before the upstream's read timeout (60 s)")
        .expect("the stale tag");
        assert_eq!(stale.digest, digest);
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "the upstream was asked first"
        );
        assert_eq!(cache.metrics.stale_served.load(Relaxed), 1);
    }

    /// A stored manifest whose file changed on disk is never served as its digest: the
    /// cache drops it, fetches it again and stores the right bytes.
    #[tokio::test]
    async fn a_stored_manifest_changed_on_disk_is_fetched_again_not_served() {
        use registry_rules::names::Reference;
        let (manifest, digest) = small_manifest();
        let server = TestServer::start({
            let manifest = manifest.clone();
            move |_| {
                reply(
                    200,
                    &[("content-type", oci::MT_OCI_MANIFEST)],
                    manifest.clone(),
                )
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, up) = open(dir.path(), &server, limits(MIB)).await;
        let (app, by_digest) = (name("app"), Reference::Digest(digest.clone()));
        let gets = || {
            server
                .seen()
                .iter()
                .filter(|s| s.method == axum::http::Method::GET)
                .count()
        };
        cache.manifest(&up, &app, &by_digest, false).await.unwrap();
        assert_eq!(gets(), 1);

        let hex = digest.hex();
        let file = dir.path().join("blobs/sha256").join(&hex[..2]).join(hex);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&file, bytes).unwrap();

        let again = cache.manifest(&up, &app, &by_digest, false).await.unwrap();
        assert_eq!(again.body.as_deref(), Some(manifest.as_bytes()));
        assert_eq!(gets(), 2, "fetched again");
        assert_eq!(cache.metrics.verify_failures.load(Relaxed), 1);
        let third = cache.manifest(&up, &app, &by_digest, false).await.unwrap();
        assert_eq!(third.body.as_deref(), Some(manifest.as_bytes()));
        assert_eq!(gets(), 2, "stored right the second time");
    }

    /// A tag HEAD whose size no manifest may have is not taken for the record (clients
    /// would use it as the descriptor's size): the tag's GET decides.
    #[tokio::test]
    async fn a_tag_head_with_an_impossible_size_is_checked_by_a_get() {
        use registry_rules::names::{Reference, Tag};
        let (manifest, digest) = small_manifest();
        let server = TestServer::start({
            let (manifest, digest) = (manifest.clone(), digest.to_string());
            move |seen| {
                let ct = ("content-type", oci::MT_OCI_MANIFEST);
                match seen.method {
                    axum::http::Method::HEAD => reply(
                        200,
                        &[
                            ct,
                            ("docker-content-digest", &digest),
                            ("content-length", "99999999999"),
                        ],
                        "",
                    ),
                    _ => reply(200, &[ct], manifest.clone()),
                }
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, up) = open(dir.path(), &server, limits(MIB)).await;
        let tag = Reference::Tag(Tag::parse("1").unwrap());
        let head = cache.manifest(&up, &name("app"), &tag, true).await.unwrap();
        assert_eq!(head.digest, digest);
        assert_eq!(head.size, manifest.len() as u64);
    }
}
