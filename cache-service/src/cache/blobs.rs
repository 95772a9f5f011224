//! Blobs: served from the store once linked to the repository (or confirmed upstream), else
//! downloaded once for every concurrent request (single-flight), teed to every waiting client
//! while it streams, verified against its digest before it is stored.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use sha2::Digest as _;
use tokio::sync::watch;

use super::lru::{PinGuard, Reservation};
use super::single_flight::Role;
use super::streams::{FlightState, InFlight, StoredBody, Tail};
use super::{lock, status_error, Cache, CacheError, Kind, Source};
use crate::metrics::Metrics;
use crate::store::BlobWriter;
use crate::upstream::UpstreamError;
use registry_rules::digest::Digest;
use registry_rules::names::RepositoryName;

/// A blob answer.
pub enum BlobReply {
    /// HEAD answered without a body source.
    Head { size: u64 },
    /// Verified stored content.
    Cached { body: StoredBody, size: u64 },
    /// Stored content the client fetches from the store itself, at this URL.
    Redirect { url: String },
    /// A download in progress (possibly started by this request).
    Flight {
        flight: Arc<InFlight>,
        size: Option<u64>,
    },
}

pub(super) type FlightKey = (String, RepositoryName, Digest);

/// How many times a request that missed a blob looks again because a download ended while
/// it looked (the whole download of a small blob can fit between a request's two looks).
const LOOKS_AGAIN: usize = 2;

impl Cache {
    pub async fn blob(
        self: &Arc<Self>,
        up: &Source,
        name: &RepositoryName,
        d: &Digest,
        head: bool,
    ) -> Result<BlobReply, CacheError> {
        let key: FlightKey = (up.name.clone(), name.clone(), d.clone());
        let mut attempt = 0;
        loop {
            // Flights that ended before this look kept what they stored: the store look below
            // sees it. One that ends after it makes the start below look again.
            let since = self.flights.ended();
            // A download in progress first: it stays registered until its copy is stored, so a
            // request that misses it here finds the stored copy below.
            if let Some(flight) = self.flights.get(&key) {
                return self.joined(flight).await;
            }
            let pin = PinGuard::new(&self.lru, d);
            if let Some(blob) = self.stored(d).await {
                if self.linked(&up.name, name, d).await
                    || self.confirm(up, name, d, Kind::Blob).await?
                {
                    Metrics::inc(&self.metrics.hits);
                    self.touch(d);
                    let size = blob.size();
                    if !head {
                        if let Some(url) = self.redirect_url(d, size).await {
                            Metrics::inc(&self.metrics.store_redirects);
                            return Ok(BlobReply::Redirect { url });
                        }
                    }
                    return Ok(if head {
                        BlobReply::Head { size }
                    } else {
                        BlobReply::Cached {
                            body: StoredBody::new(blob, pin, self.metrics.clone()),
                            size,
                        }
                    });
                }
            }
            drop(pin);
            if attempt == 0 {
                Metrics::inc(&self.metrics.misses);
            }
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
            // The last attempt starts (or joins) whatever ended meanwhile.
            let since = (attempt < LOOKS_AGAIN).then_some(since);
            if let Some(flight) = self.start_flight(up, name, d, key.clone(), since).await? {
                let size = flight.started().await?;
                return Ok(BlobReply::Flight { flight, size });
            }
            attempt += 1;
        }
    }

    /// The store's URL for a stored blob, if it hands them out; a store that cannot sign
    /// one now gets the request served through the cache instead.
    async fn redirect_url(&self, d: &Digest, size: u64) -> Option<String> {
        self.store
            .redirect_url(d, size)
            .await
            .inspect_err(|e| {
                tracing::warn!(digest = %d, error = %e, "cannot presign the blob's URL; serving it")
            })
            .ok()
            .flatten()
    }

    /// Answer from a download in progress that this request joins.
    async fn joined(&self, flight: Arc<InFlight>) -> Result<BlobReply, CacheError> {
        Metrics::inc(&self.metrics.coalesced_waiters);
        let size = flight.started().await?;
        Ok(BlobReply::Flight { flight, size })
    }

    /// Join the download of `key` in progress, or start it; with `since`, `None` instead of
    /// starting when a download ended after it (see `SingleFlight::join_or_start_since`).
    async fn start_flight(
        self: &Arc<Self>,
        up: &Source,
        name: &RepositoryName,
        d: &Digest,
        key: FlightKey,
        since: Option<u64>,
    ) -> Result<Option<Arc<InFlight>>, CacheError> {
        // Made before the single-flight lock is taken (it may touch the disk); dropped unused
        // by a request that finds the download already started.
        let temp = match self.store.begin_write(d).await {
            Ok(t) => Some(t),
            Err(e) => {
                Metrics::inc(&self.metrics.store_write_errors);
                tracing::error!(digest = %d, error = %e, "cannot start a store write; passing through without caching");
                None
            }
        };
        let start = || {
            let spool = temp.as_ref().map(BlobWriter::reader);
            let (tx, rx) = watch::channel(FlightState::default());
            let flight = Arc::new(InFlight {
                spool,
                state: rx,
                tail: Mutex::new(Tail::new(self.pass_through.clone())),
                recent: Mutex::default(),
            });
            let (this, up, name, d, f2) = (
                self.clone(),
                up.clone(),
                name.clone(),
                d.clone(),
                flight.clone(),
            );
            let work = async move {
                let pin = PinGuard::new(&this.lru, &d);
                Metrics::inc(&this.metrics.upstream_fetches);
                let r = this.download(&up, &name, &d, &tx, temp, &f2).await;
                match &r {
                    Ok(()) => {
                        tracing::info!(registry = %up.name, %name, digest = %d, "blob fetched")
                    }
                    Err(e) => {
                        tracing::warn!(registry = %up.name, %name, digest = %d, error = %e, "blob fetch failed")
                    }
                }
                move || {
                    tx.send_modify(|s| s.done = Some(r));
                    drop(pin);
                }
            };
            (flight, work)
        };
        let started = match since {
            Some(since) => self.flights.join_or_start_since(key, since, start)?,
            None => Some(self.flights.join_or_start(key, start)?),
        };
        let Some((flight, role)) = started else {
            return Ok(None);
        };
        if role == Role::Joined {
            Metrics::inc(&self.metrics.coalesced_waiters);
        }
        Ok(Some(flight))
    }

    async fn download(
        &self,
        up: &Source,
        name: &RepositoryName,
        d: &Digest,
        tx: &watch::Sender<FlightState>,
        mut temp: Option<BlobWriter>,
        flight: &InFlight,
    ) -> Result<(), CacheError> {
        let resp = up
            .send(Method::GET, &format!("/v2/{name}/blobs/{d}"), name, None, 3)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(&resp, Kind::Blob));
        }
        // The upstream served it for this repository: linked (a link without content is
        // harmless) before the blob is committed, so requests that find the committed blob
        // need no confirming HEAD. Written alongside the body: the link is an fsync on disk
        // and a PUT on a bucket, which the client's first byte does not wait for.
        let link = {
            let (store, registry, name, d) =
                (self.store.clone(), up.name.clone(), name.clone(), d.clone());
            tokio::spawn(async move {
                if let Err(e) = store.add_link(&registry, &name, &d).await {
                    tracing::warn!(error = %e, "could not write link");
                }
            })
        };
        let mut link = Some(link);
        let link_slot = &mut link;
        let filled: Result<(), CacheError> = async move {
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
            // The spool's bytes count against max_size while they are written: with several
            // downloads at once, each one's room must not be the room another is filling.
            let mut reservation = Reservation::new(&self.lru);
            if let Some(t) = total {
                if max_size > 0 && t > max_size {
                    tracing::warn!(digest = %d, size = t, "blob larger than max_size; not caching");
                    temp = None;
                } else {
                    self.reserve(&mut reservation, t).await;
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
            let mut stream = batched(resp.bytes_stream());
            while let Some(group) = stream.next().await {
                let group =
                    group.map_err(|e| CacheError::Upstream(UpstreamError::Connect(e.to_string())))?;
                let len: u64 = group.iter().map(|c| c.len() as u64).sum();
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
                    if total.is_none() {
                        self.reserve(&mut reservation, len).await;
                    }
                    match t.write(&group).await {
                        Ok(()) => {
                            let mut recent = lock(&flight.recent);
                            for c in group {
                                let n = c.len() as u64;
                                recent.push(received, c);
                                received += n;
                            }
                            drop(recent);
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
                            // The spool is gone with its writer: its room is free again.
                            reservation = Reservation::new(&self.lru);
                            lock(&flight.tail).start = received;
                        }
                    }
                }
                if let Some(h) = hasher.as_mut() {
                    for c in &group {
                        h.update(c);
                    }
                }
                let mut tail = lock(&flight.tail);
                for c in group {
                    if !tail.push(c) {
                        return Err(CacheError::Storage(
                            "disk full and the pass-through memory is spent".into(),
                        ));
                    }
                }
                drop(tail);
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
                (Some(t), _) => match t.verify(d, Some(received)) {
                    Ok(verified) => {
                        // The clients get their last bytes now; storing (fsync and rename, or the
                        // upload's completion) happens while this download stays the one that
                        // requests for the digest join, reading the spool.
                        tx.send_modify(|s| s.done = Some(Ok(())));
                        // A failed link task only costs later requests a confirming HEAD.
                        if let Some(link) = link_slot.take() {
                            let _ = link.await;
                        }
                        match verified.store().await {
                            Ok(()) => {
                                // Counted as a stored blob now, no longer as a reservation.
                                self.count_stored(d, received);
                                drop(reservation);
                                self.make_room(0).await;
                            }
                            Err(e) => {
                                // Verified already; only storing failed.
                                Metrics::inc(&self.metrics.store_write_errors);
                                tracing::error!(digest = %d, error = %e, "could not commit blob; served uncached");
                            }
                        }
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
        .await;
        // Every way out waits for the link, so nothing the download started outlives it.
        if let Some(link) = link.take() {
            let _ = link.await;
        }
        filled
    }
}

/// Upstream bytes per spool write at most: the TLS layer hands over 16 KiB records, and one
/// write (a blocking-pool hop, a watermark for the readers) per record costs more than the bytes.
const WRITE_BATCH: usize = 512 * 1024;

/// `body` regrouped: each item is one chunk plus whatever else had already arrived, until the
/// group holds [`WRITE_BATCH`]; nothing waits for more bytes than are there (joined clients see
/// each byte as soon as it is on disk), and no byte is copied. An error ends the stream after
/// the bytes before it.
fn batched<E: Send + 'static>(
    body: impl futures::Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
) -> futures::stream::BoxStream<'static, Result<Vec<Bytes>, E>> {
    use futures::FutureExt;
    futures::stream::unfold(
        (body, None, false),
        |(mut body, held_error, ended)| async move {
            if let Some(e) = held_error {
                return Some((Err(e), (body, None, true)));
            }
            if ended {
                return None;
            }
            let first = match body.next().await? {
                Ok(b) => b,
                Err(e) => return Some((Err(e), (body, None, true))),
            };
            let mut len = first.len();
            let mut group = vec![first];
            let (mut held, mut done) = (None, false);
            while len < WRITE_BATCH {
                match body.next().now_or_never() {
                    Some(Some(Ok(b))) => {
                        len += b.len();
                        group.push(b);
                    }
                    Some(Some(Err(e))) => {
                        held = Some(e);
                        break;
                    }
                    Some(None) => {
                        done = true;
                        break;
                    }
                    None => break,
                }
            }
            Some((Ok(group), (body, held, done)))
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{limits, name, open, open_with, outcome, MIB};
    use super::*;
    use crate::cache::Limits;
    use crate::oci;
    use crate::testserver::{endless, reply, TestServer};
    use bytes::Bytes;
    use futures::StreamExt;
    use registry_rules::names::Reference;
    use std::time::Duration;

    #[tokio::test]
    async fn upstream_chunks_are_regrouped_in_order_without_waiting_for_more() {
        let chunk = |n: usize, b: u8| Ok::<_, &str>(Bytes::from(vec![b; n]));
        // All ready: grouped until a group holds WRITE_BATCH (a larger chunk stays whole),
        // order kept, and an error comes after the bytes before it.
        let items = vec![
            chunk(16 << 10, 1),
            chunk(WRITE_BATCH, 2),
            chunk(100, 3),
            chunk(WRITE_BATCH - 50, 4),
            chunk(10, 5),
            Err("cut"),
            chunk(1, 6),
        ];
        let out: Vec<Result<Vec<Bytes>, &str>> =
            batched(futures::stream::iter(items)).collect().await;
        let sizes: Vec<_> = out
            .iter()
            .map(|r| {
                r.as_ref()
                    .map(|g| g.iter().map(Bytes::len).collect::<Vec<_>>())
            })
            .collect();
        assert_eq!(
            sizes,
            vec![
                Ok(vec![16 << 10, WRITE_BATCH]),
                Ok(vec![100, WRITE_BATCH - 50]),
                Ok(vec![10]),
                Err(&"cut")
            ]
        );
        let bytes: Vec<u8> = out
            .into_iter()
            .filter_map(Result::ok)
            .flatten()
            .flatten()
            .collect();
        assert_eq!(bytes.first(), Some(&1));
        assert_eq!(bytes.last(), Some(&5));
        // A chunk that has arrived is handed on although the next one has not.
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, &str>>();
        let mut s = batched(rx);
        tx.unbounded_send(chunk(10, 7)).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert_eq!(
            first.unwrap().unwrap().unwrap(),
            vec![Bytes::from(vec![7; 10])]
        );
        drop(tx);
        assert!(s.next().await.is_none());
    }

    /// The GETs the upstream has seen.
    fn upstream_gets(server: &TestServer) -> usize {
        server
            .seen()
            .iter()
            .filter(|s| s.method == axum::http::Method::GET)
            .count()
    }

    /// A filesystem store whose first `open` answers late (a bucket's HEAD under load): what
    /// it answers is what the store held when the look began.
    #[derive(Debug)]
    struct FirstLookSlow {
        inner: crate::store::fs::FsStore,
        slow: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl crate::store::BlobStore for FirstLookSlow {
        async fn clean_abandoned(&self) -> std::io::Result<usize> {
            self.inner.clean_abandoned().await
        }
        async fn check_ready(&self) -> std::io::Result<()> {
            self.inner.check_ready().await
        }
        async fn open(
            &self,
            d: &Digest,
        ) -> std::io::Result<Option<Box<dyn crate::store::StoredBlob>>> {
            let found = self.inner.open(d).await;
            if self.slow.swap(false, std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            found
        }
        async fn size(&self, d: &Digest) -> std::io::Result<Option<u64>> {
            self.inner.size(d).await
        }
        async fn begin_write(&self, d: &Digest) -> std::io::Result<BlobWriter> {
            self.inner.begin_write(d).await
        }
        async fn delete(&self, d: &Digest) -> std::io::Result<u64> {
            self.inner.delete(d).await
        }
        async fn list(&self) -> std::io::Result<Vec<crate::store::BlobInfo>> {
            self.inner.list().await
        }
        async fn touch(&self, d: &Digest) {
            self.inner.touch(d).await
        }
        async fn manifest_media_type(&self, d: &Digest) -> std::io::Result<Option<String>> {
            self.inner.manifest_media_type(d).await
        }
        async fn set_manifest_media_type(&self, d: &Digest, mt: &str) -> std::io::Result<()> {
            self.inner.set_manifest_media_type(d, mt).await
        }
        async fn read_tag(
            &self,
            r: &str,
            n: &RepositoryName,
            t: &registry_rules::names::Tag,
        ) -> std::io::Result<Option<crate::store::TagRecord>> {
            self.inner.read_tag(r, n, t).await
        }
        async fn write_tag(
            &self,
            r: &str,
            n: &RepositoryName,
            t: &registry_rules::names::Tag,
            rec: &crate::store::TagRecord,
        ) -> std::io::Result<()> {
            self.inner.write_tag(r, n, t, rec).await
        }
        async fn has_link(&self, r: &str, n: &RepositoryName, d: &Digest) -> std::io::Result<bool> {
            self.inner.has_link(r, n, d).await
        }
        async fn add_link(&self, r: &str, n: &RepositoryName, d: &Digest) -> std::io::Result<()> {
            self.inner.add_link(r, n, d).await
        }
    }

    #[tokio::test]
    async fn a_download_that_comes_and_goes_while_a_request_looks_is_not_fetched_again() {
        let blob = Bytes::from(vec![5u8; 363]);
        let d = Digest::of_bytes(&blob);
        let body = blob.clone();
        let server = TestServer::start(move |_| reply(200, &[], body.clone())).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FirstLookSlow {
            inner: crate::store::fs::FsStore::new(dir.path()).unwrap(),
            slow: true.into(),
        });
        let (cache, up) = open_with(store, &server, limits(MIB)).await;
        let repo = name("lab/app");

        // The first request looks in the store (empty) and hears back late; meanwhile a
        // second request downloads and stores the small blob, and its download ends.
        let (c, u, r, dd) = (cache.clone(), up.clone(), repo.clone(), d.clone());
        let slow = tokio::spawn(async move { c.blob(&u, &r, &dd, false).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(BlobReply::Flight { flight, .. }) = cache.blob(&up, &repo, &d, false).await else {
            panic!("the second request started no download")
        };
        outcome(&flight).await.unwrap();
        drop(flight);
        while !cache.flights.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The first request finds the stored copy instead of fetching the blob again.
        match slow.await.unwrap() {
            Ok(BlobReply::Cached { size, .. }) => assert_eq!(size, 363),
            Ok(_) => panic!("not served from the store"),
            Err(e) => panic!("{e}"),
        }
        assert_eq!(upstream_gets(&server), 1, "upstream GETs of the blob");
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
        let (cache, up) = open(dir.path(), &server, limits(MIB)).await;

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
        assert_eq!(
            upstream_gets(&server),
            3,
            "one download and two HEAD fallbacks"
        );
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
        let (cache, up) = open(dir.path(), &server, limits(MIB)).await;

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
        let (cache, up) = open(dir.path(), &server, limits(1 << 40)).await;
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
        let (cache, up) = open(dir.path(), &server, limits(1 << 40)).await;
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

    /// The one of `bodies` whose digest the request names.
    fn asked_for<'a>(bodies: &'a [Bytes], seen: &crate::testserver::Seen) -> Option<&'a Bytes> {
        bodies
            .iter()
            .find(|b| seen.uri.ends_with(Digest::of_bytes(b).as_str()))
    }

    /// A cache bounded to 1000 bytes holding `blobs` (the first the least recently used).
    async fn holding(
        root: &std::path::Path,
        server: &TestServer,
        blobs: &[&Bytes],
    ) -> (Arc<Cache>, Source) {
        let bounded = Limits {
            max_size: 1000,
            ..limits(MIB)
        };
        let (cache, up) = open(root, server, bounded).await;
        store_all(&cache, &up, blobs).await;
        (cache, up)
    }

    /// Downloads of `blobs`, each to its end, and the wait until they are stored.
    async fn store_all(cache: &Arc<Cache>, up: &Source, blobs: &[&Bytes]) {
        for blob in blobs {
            let d = Digest::of_bytes(blob);
            let Ok(BlobReply::Flight { flight, .. }) =
                cache.blob(up, &name("lab/app"), &d, false).await
            else {
                panic!("no download")
            };
            outcome(&flight).await.unwrap();
            // Stored right after the clients got the verified bytes.
            let mut tries = 0;
            while lock(&cache.lru).size(&d).is_none() {
                tries += 1;
                assert!(tries < 200, "not stored");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn downloads_in_progress_count_against_max_size() {
        let (older, newer) = (Bytes::from(vec![1u8; 400]), Bytes::from(vec![2u8; 300]));
        let (first, second) = (Bytes::from(vec![3u8; 500]), Bytes::from(vec![4u8; 500]));
        let bodies = [older.clone(), newer.clone(), first.clone(), second.clone()];
        // Stored blobs are served whole; the two 500-byte ones send 100 bytes and then stall.
        let server = TestServer::start(move |seen| {
            let Some(b) = asked_for(&bodies, seen) else {
                return reply(404, &[], "");
            };
            if b.len() < 500 {
                return reply(200, &[], b.clone());
            }
            let head = futures::stream::iter([Ok::<_, std::io::Error>(b.slice(..100))]);
            reply(
                200,
                &[("content-length", "500")],
                axum::body::Body::from_stream(head.chain(futures::stream::pending())),
            )
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, up) = holding(dir.path(), &server, &[&older, &newer]).await;
        let mut flights = Vec::new();
        for blob in [&first, &second] {
            let d = Digest::of_bytes(blob);
            let Ok(BlobReply::Flight { flight, .. }) =
                cache.blob(&up, &name("lab/app"), &d, false).await
            else {
                panic!("no download")
            };
            let mut rx = flight.state.clone();
            while rx.borrow_and_update().received < 100 {
                rx.changed().await.unwrap();
            }
            flights.push(flight);
        }
        // 1000 bytes are being written: both stored blobs had to go, not only the older.
        assert_eq!(cache.store_bytes(), 0, "{} stored", cache.entries());
        drop(flights);
    }

    #[tokio::test]
    async fn a_blob_removed_behind_the_cache_no_longer_takes_room() {
        let (older, newer) = (Bytes::from(vec![1u8; 400]), Bytes::from(vec![2u8; 400]));
        let incoming = Bytes::from(vec![3u8; 500]);
        let bodies = [older.clone(), newer.clone(), incoming.clone()];
        let server = TestServer::start(move |seen| match asked_for(&bodies, seen) {
            Some(b) => reply(200, &[], b.clone()),
            None => reply(404, &[], ""),
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (cache, up) = holding(dir.path(), &server, &[&older, &newer]).await;
        // An operator removes the newer blob's file; the next request for it finds it gone.
        let newer_digest = Digest::of_bytes(&newer);
        cache.store.delete(&newer_digest).await.unwrap();
        assert!(cache.stored(&newer_digest).await.is_none());
        store_all(&cache, &up, &[&incoming]).await;
        assert!(
            cache.stored(&Digest::of_bytes(&older)).await.is_some(),
            "400 + 500 fit: the older blob stays"
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
        let (cache, up) = open(dir.path(), &server, tiny).await;
        let Ok(BlobReply::Flight { flight, .. }) =
            cache.blob(&up, &name("lab/app"), &d, false).await
        else {
            panic!("no download")
        };
        let got: Vec<u8> =
            super::super::streams::reader(flight.clone(), 0, None, cache.metrics.clone())
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
}
