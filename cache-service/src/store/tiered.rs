//! A replica's own disk in front of the shared bucket (`local_cache_size`): the bucket stays the
//! one truth that every replica reads and writes (tags, links, metadata, eviction), and each
//! replica keeps the blobs it serves in a bounded local [`FsStore`]. Envoy's consistent hashing
//! sends a digest to the same replica, so its warm reads come from local disk and the page
//! cache instead of a bucket round trip per range; after a restart or when a replica's keys move,
//! the bucket still has everything.
//!
//! A blob enters the local tier when a client reads it whole from the bucket: the bytes are
//! written to a local writer beside the response, and that writer verifies digest and length
//! before the file appears (as every write of the filesystem store does). A read that fails, a
//! client that goes away, or bucket bytes that do not match the digest leave nothing behind.
//! Small blobs (up to [`MEM_BLOB_MAX`]) stay in the bucket store's memory copy instead.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::StreamExt;

use super::fs::FsStore;
use super::object::MEM_BLOB_MAX;
use super::{BlobInfo, BlobStore, BlobWriter, ByteStream, StoredBlob, TagRecord};
use crate::cache::lru::{Lru, Reservation};
use registry_rules::digest::Digest;
use registry_rules::names::{RepositoryName, Tag};

/// The local blobs: the cache's own size accounting and least-recently-used order (nothing is
/// pinned: evicting a blob being served only unlinks its file), within `budget` bytes.
#[derive(Debug)]
struct Local {
    store: FsStore,
    lru: Arc<Mutex<Lru>>,
    budget: u64,
    /// Digests whose local copy is being written (at most one per digest; bounded by the
    /// whole reads in progress).
    filling: Mutex<HashSet<Digest>>,
}

impl Local {
    fn lru(&self) -> MutexGuard<'_, Lru> {
        crate::lock(&self.lru)
    }

    /// Register `digest` as the most recent, then remove what no longer fits the budget.
    async fn admit(&self, digest: Digest, size: u64) {
        let evict = {
            let mut lru = self.lru();
            lru.insert(&digest, size, None);
            lru.victims(0, self.budget)
        };
        self.remove(evict).await;
    }

    async fn remove(&self, blobs: Vec<(Digest, u64)>) {
        for (d, _) in blobs {
            if let Err(e) = self.store.delete(&d).await {
                tracing::warn!(digest = %d, error = %e, "removing a blob from the local tier failed");
            }
        }
    }

    /// A writer for the local copy of `digest`, unless one is being written already: a fleet
    /// reading one layer from the bucket at once writes it once, in room made for it first.
    async fn begin_fill(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
    ) -> Option<(BlobWriter, Fill)> {
        if !crate::lock(&self.filling).insert(digest.clone()) {
            return None;
        }
        let mut room = Reservation::new(&self.lru);
        let evict = room.grow(size, self.budget);
        let fill = Fill {
            local: self.clone(),
            digest: digest.clone(),
            room: Some(room),
        };
        self.remove(evict).await;
        let writer = self.store.begin_write(digest).await.ok()?;
        Some((writer, fill))
    }
}

/// A local copy being written: its digest claimed and its size reserved in the budget until
/// it lands (then counted as a stored blob) or is dropped.
struct Fill {
    local: Arc<Local>,
    digest: Digest,
    room: Option<Reservation>,
}

impl Fill {
    /// The verified copy is in place: count it as a stored blob instead of a reservation.
    async fn landed(mut self, size: u64) {
        self.room = None;
        self.local.admit(self.digest.clone(), size).await;
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        crate::lock(&self.local.filling).remove(&self.digest);
    }
}

/// The shared store with a bounded local tier of blobs in front of it.
#[derive(Debug)]
pub struct Tiered {
    shared: Arc<dyn BlobStore>,
    local: Arc<Local>,
}

impl Tiered {
    /// Keep up to `budget` bytes of blobs under `dir` (what an earlier run left there counts,
    /// ordered by when each file was written; hits are not recorded on disk).
    pub async fn new(shared: Arc<dyn BlobStore>, dir: &Path, budget: u64) -> io::Result<Self> {
        let local = Arc::new(Local {
            store: FsStore::new(dir)?,
            lru: Arc::default(),
            budget,
            filling: Mutex::default(),
        });
        // `dir` is this replica's own: what its temp directory holds now are the fills of a
        // run that was killed mid-write. Only here: the bucket's periodic cleanup
        // (`clean_abandoned`) must not remove this run's fills in progress.
        let abandoned = local.store.clean_abandoned().await?;
        if abandoned > 0 {
            tracing::info!(abandoned, "removed the local tier's interrupted fills");
        }
        let mut found = local.store.list().await?;
        found.sort_by_key(|b| b.last_access);
        for b in found {
            local.admit(b.digest, b.size).await;
        }
        Ok(Self { shared, local })
    }
}

/// A blob opened from the bucket that copies itself into the local tier when read whole.
struct FillOnRead {
    inner: Box<dyn StoredBlob>,
    digest: Digest,
    local: Arc<Local>,
}

impl StoredBlob for FillOnRead {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn range(self: Box<Self>, start: u64, end: u64) -> ByteStream {
        let size = self.inner.size();
        if start != 0 || end != size {
            return self.inner.range(start, end);
        }
        let FillOnRead {
            inner,
            digest,
            local,
        } = *self;
        struct State {
            inner: ByteStream,
            writer: Option<(BlobWriter, Fill)>,
            started: bool,
            digest: Digest,
            local: Arc<Local>,
            size: u64,
            sent: u64,
        }
        let state = State {
            inner: inner.range(0, size),
            writer: None,
            started: false,
            digest,
            local,
            size,
            sent: 0,
        };
        futures::stream::unfold(state, |mut st| async move {
            if !st.started {
                st.started = true;
                st.writer = st.local.begin_fill(&st.digest, st.size).await;
            }
            let item = st.inner.next().await?;
            match &item {
                Ok(b) => {
                    st.sent += b.len() as u64;
                    if let Some((w, _)) = st.writer.as_mut() {
                        if w.write(std::slice::from_ref(b)).await.is_err() {
                            st.writer = None;
                        }
                    }
                    if st.sent == st.size {
                        if let Some((w, fill)) = st.writer.take() {
                            // The client gets its last bytes now; the local copy lands after.
                            let (digest, size) = (st.digest.clone(), st.size);
                            tokio::spawn(async move {
                                match w.commit(&digest, Some(size)).await {
                                    Ok(()) => fill.landed(size).await,
                                    Err(e) => tracing::warn!(%digest, error = %e, "not kept in the local tier"),
                                }
                            });
                        }
                    }
                }
                // Dropping the writer removes what it wrote.
                Err(_) => st.writer = None,
            }
            Some((item, st))
        })
        .boxed()
    }
}

#[async_trait]
impl BlobStore for Tiered {
    async fn clean_abandoned(&self) -> io::Result<usize> {
        self.shared.clean_abandoned().await
    }

    async fn check_ready(&self) -> io::Result<()> {
        self.shared.check_ready().await
    }

    async fn open(&self, digest: &Digest) -> io::Result<Option<Box<dyn StoredBlob>>> {
        let here = {
            let mut lru = self.local.lru();
            lru.touch(digest);
            lru.size(digest).is_some()
        };
        if here {
            match self.local.store.open(digest).await {
                Ok(Some(blob)) => {
                    // Eviction of the bucket orders by access: count this one there too.
                    let (shared, digest) = (self.shared.clone(), digest.clone());
                    tokio::spawn(async move { shared.touch(&digest).await });
                    return Ok(Some(blob));
                }
                // Gone behind our back: forget it and read the bucket.
                Ok(None) => self.local.lru().remove(digest),
                // Unreadable: removed, so that no uncounted file stays behind, and read
                // from the bucket (which fills the local tier again).
                Err(e) => {
                    tracing::warn!(digest = %digest, error = %e, "local tier unreadable; removed, reading the bucket");
                    if let Err(e) = self.local.store.delete(digest).await {
                        tracing::warn!(digest = %digest, error = %e, "removing the local copy failed");
                    }
                    self.local.lru().remove(digest);
                }
            }
        }
        let Some(blob) = self.shared.open(digest).await? else {
            return Ok(None);
        };
        let fits = blob.size() <= self.local.budget;
        Ok(Some(if blob.size() > MEM_BLOB_MAX && fits {
            Box::new(FillOnRead {
                inner: blob,
                digest: digest.clone(),
                local: self.local.clone(),
            })
        } else {
            blob
        }))
    }

    async fn size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        let local = self.local.lru().size(digest);
        match local {
            Some(size) => Ok(Some(size)),
            None => self.shared.size(digest).await,
        }
    }

    async fn begin_write(&self, digest: &Digest) -> io::Result<BlobWriter> {
        self.shared.begin_write(digest).await
    }

    async fn delete(&self, digest: &Digest) -> io::Result<u64> {
        self.local.lru().remove(digest);
        if let Err(e) = self.local.store.delete(digest).await {
            tracing::warn!(%digest, error = %e, "removing a blob from the local tier failed");
        }
        self.shared.delete(digest).await
    }

    async fn list(&self) -> io::Result<Vec<BlobInfo>> {
        self.shared.list().await
    }

    async fn touch(&self, digest: &Digest) {
        self.shared.touch(digest).await
    }

    async fn manifest_media_type(&self, digest: &Digest) -> io::Result<Option<String>> {
        self.shared.manifest_media_type(digest).await
    }

    async fn set_manifest_media_type(&self, digest: &Digest, media_type: &str) -> io::Result<()> {
        self.shared
            .set_manifest_media_type(digest, media_type)
            .await
    }

    async fn read_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
    ) -> io::Result<Option<TagRecord>> {
        self.shared.read_tag(registry, name, tag).await
    }

    async fn write_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
        rec: &TagRecord,
    ) -> io::Result<()> {
        self.shared.write_tag(registry, name, tag, rec).await
    }

    async fn has_link(
        &self,
        registry: &str,
        name: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<bool> {
        self.shared.has_link(registry, name, digest).await
    }

    async fn add_link(
        &self,
        registry: &str,
        name: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<()> {
        self.shared.add_link(registry, name, digest).await
    }

    fn shared(&self) -> bool {
        self.shared.shared()
    }

    async fn eviction_lease(&self) -> io::Result<bool> {
        self.shared.eviction_lease().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_killed_runs_partial_fills_are_removed_at_start() {
        let bucket = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let shared: Arc<dyn BlobStore> = Arc::new(FsStore::new(bucket.path()).unwrap());
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/blob-1-0"), vec![0; 4096]).unwrap();
        let _tiered = Tiered::new(shared, dir.path(), 1 << 20).await.unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path().join("tmp")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_blob_read_whole_by_two_clients_at_once_is_copied_locally_once() {
        let bucket = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let shared: Arc<dyn BlobStore> = Arc::new(FsStore::new(bucket.path()).unwrap());
        let blob = bytes::Bytes::from(vec![5u8; 3 << 20]);
        let d = Digest::of_bytes(&blob);
        let mut w = shared.begin_write(&d).await.unwrap();
        w.write(std::slice::from_ref(&blob)).await.unwrap();
        w.commit(&d, Some(blob.len() as u64)).await.unwrap();
        let tiered = Tiered::new(shared, dir.path(), 3 << 20).await.unwrap();
        let size = blob.len() as u64;
        let mut a = tiered.open(&d).await.unwrap().unwrap().range(0, size);
        let mut b = tiered.open(&d).await.unwrap().unwrap().range(0, size);
        a.next().await.unwrap().unwrap();
        b.next().await.unwrap().unwrap();
        let writing = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        assert_eq!(writing, 1, "one local copy in progress");
        for s in [&mut a, &mut b] {
            while let Some(chunk) = s.next().await {
                chunk.unwrap();
            }
        }
        for _ in 0..200 {
            if tiered.local.lru().size(&d).is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(tiered.local.lru().size(&d), Some(size), "kept locally");
        assert!(crate::lock(&tiered.local.filling).is_empty());
    }
}
