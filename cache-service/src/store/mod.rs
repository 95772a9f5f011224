//! Content-addressed storage behind one async trait, [`BlobStore`], with a filesystem backend
//! ([`fs::FsStore`], the embedded default) and an object-store backend ([`object::ObjectBackend`],
//! S3 through the `object_store` crate).
//!
//! The boundary is streams, not files: a stored blob is opened as a [`StoredBlob`] that yields
//! any byte range as a stream of `Bytes`; a write is a [`BlobWriter`] whose bytes become visible
//! under their digest only after [`BlobWriter::commit`] verified them (dropping it aborts). While
//! a write is in progress its bytes sit in a local spool file ([`SpoolReader`]) that clients
//! joining the download read.
//!
//! Metadata (manifest media types, tag records, repository links) are small records: on the
//! filesystem written to a temp file and renamed into place; in a bucket single PUTs (atomic per
//! object). A reader of a record sees either the old or the new version.

pub mod fs;
pub(crate) mod mapped;
pub mod object;
mod spool;
pub mod tiered;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use registry_rules::digest::Digest;
use registry_rules::names::{RepositoryName, Tag};
use spool::Spool;
pub use spool::SpoolReader;

/// Where the cache lives: a directory (one process) or a bucket (any number of replicas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    Bucket(object::BucketSettings),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Dir(p) => write!(f, "{}", p.display()),
            Location::Bucket(b) => b.fmt(f),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("storage directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Bucket(#[from] object::OpenError),
}

/// Open (and for a bucket, check) the store at `location`.
pub async fn open(location: &Location) -> Result<Arc<dyn BlobStore>, OpenError> {
    Ok(match location {
        Location::Dir(path) => {
            Arc::new(fs::FsStore::new(path).map_err(|source| OpenError::Dir {
                path: path.clone(),
                source,
            })?)
        }
        Location::Bucket(b) => {
            let bucket: Arc<dyn BlobStore> = Arc::new(object::ObjectBackend::open(b).await?);
            if b.local_cache_size == 0 {
                bucket
            } else {
                let dir = b.spool_dir.join("local");
                Arc::new(
                    tiered::Tiered::new(bucket, &dir, b.local_cache_size)
                        .await
                        .map_err(|source| OpenError::Dir { path: dir, source })?,
                )
            }
        }
    })
}

/// A stream of body bytes; an `Err` item aborts the HTTP response.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("length mismatch: expected {expected} bytes, got {actual}")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("storage I/O: {0}")]
    Io(#[from] io::Error),
}

/// What the cache remembers about a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// Unix seconds of the last time the upstream confirmed this mapping.
    pub fetched_at: u64,
}

/// A stored blob as seen by eviction.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    pub last_access: SystemTime,
}

/// A verified blob, opened: its size is fixed at open time and any range of it can be read.
pub trait StoredBlob: Send + 'static {
    fn size(&self) -> u64;
    /// Bytes `[start, end)`; the stream fails if the stored content turns out shorter (or, where
    /// the backend checks it, different from its digest).
    fn range(self: Box<Self>, start: u64, end: u64) -> ByteStream;
}

/// Where a verified write goes; the bytes themselves are in the writer's spool.
#[async_trait]
pub(crate) trait Sink: Send {
    /// Take the next bytes (after they were spooled). An error stops this sink only: the
    /// download goes on for its clients and the commit reports it.
    async fn write(&mut self, data: &Bytes) -> io::Result<()>;
    /// Make the verified content visible under `digest`.
    async fn commit(self: Box<Self>, digest: &Digest, spool: Spool) -> io::Result<()>;
}

/// An in-progress write: bytes go to a local spool file while their sha256 is computed (and, for
/// a remote store, into the upload). [`BlobWriter::commit`] verifies digest and length before the
/// content becomes visible; dropping an uncommitted writer removes everything it wrote.
pub struct BlobWriter {
    spool: Spool,
    hasher: Sha256,
    len: u64,
    sink: Box<dyn Sink>,
    /// The first error of the sink: the bytes still reach the spool (for the clients of the
    /// download), but nothing will be stored.
    sink_error: Option<io::Error>,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("len", &self.len)
            .finish()
    }
}

impl BlobWriter {
    pub(crate) fn new(spool: Spool, sink: Box<dyn Sink>) -> Self {
        Self {
            spool,
            hasher: Sha256::new(),
            len: 0,
            sink,
            sink_error: None,
        }
    }

    /// A read handle on the bytes written so far (for clients joining the download).
    pub fn reader(&self) -> SpoolReader {
        self.spool.reader()
    }

    /// Append `chunks` (in order, each as it is: one vectored write, no copy); when this returns
    /// they are readable through [`Self::reader`]. An error means the local spool failed (disk
    /// full): the caller passes the rest through.
    pub async fn write(&mut self, chunks: &[Bytes]) -> io::Result<()> {
        // The spool write runs on the blocking pool while this task hashes the same bytes;
        // if it fails, the hash goes back to the bytes written (see `abandon`).
        let written = self.spool.write(chunks.to_vec());
        let before = self.hasher.clone();
        for c in chunks {
            self.hasher.update(c);
        }
        if let Err(e) = written.await {
            self.hasher = before;
            return Err(e);
        }
        self.len += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        for c in chunks {
            if self.sink_error.is_some() {
                break;
            }
            if let Err(e) = self.sink.write(c).await {
                tracing::error!(error = %e, "storing the download failed; it goes on uncached");
                self.sink_error = Some(e);
            }
        }
        Ok(())
    }

    /// Stop writing (e.g. after ENOSPC) and hand back the hash of the bytes written so far;
    /// everything written is removed.
    pub fn abandon(mut self) -> Sha256 {
        std::mem::take(&mut self.hasher)
    }

    /// Verify digest and length, then make the content visible. Nothing is visible on error.
    pub async fn commit(
        self,
        expected: &Digest,
        expected_len: Option<u64>,
    ) -> Result<(), CommitError> {
        self.verify(expected, expected_len)?.store().await
    }

    /// Check digest and length: the bytes written are the content of `expected` (what a client
    /// may be given in full), though not stored yet. Dropping the result removes them.
    pub fn verify(
        mut self,
        expected: &Digest,
        expected_len: Option<u64>,
    ) -> Result<VerifiedWrite, CommitError> {
        let actual = Digest::from_sha256(std::mem::take(&mut self.hasher));
        if &actual != expected {
            return Err(CommitError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if let Some(want) = expected_len {
            if want != self.len {
                return Err(CommitError::LengthMismatch {
                    expected: want,
                    actual: self.len,
                });
            }
        }
        Ok(VerifiedWrite {
            digest: actual,
            spool: self.spool,
            sink: self.sink,
            sink_error: self.sink_error,
        })
    }
}

/// A write whose bytes matched their digest, not yet visible in the store.
pub struct VerifiedWrite {
    digest: Digest,
    spool: Spool,
    sink: Box<dyn Sink>,
    sink_error: Option<io::Error>,
}

impl VerifiedWrite {
    /// Make the content visible under its digest (the filesystem: fsync and rename; a bucket:
    /// the upload's last part and its completion).
    pub async fn store(self) -> Result<(), CommitError> {
        if let Some(e) = self.sink_error {
            return Err(CommitError::Io(e));
        }
        self.sink.commit(&self.digest, self.spool).await?;
        Ok(())
    }
}

/// Storage of content-addressed blobs (layers, configs and manifests alike) plus the small
/// metadata the cache needs. A digest is either absent or present with verified content.
#[async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug + 'static {
    /// Remove what interrupted writes left (the filesystem: everything in its temp directory, so
    /// only at startup and shutdown; a bucket: uploads older than the abandon age, any time).
    async fn clean_abandoned(&self) -> io::Result<usize>;
    /// Can we read and write? (readiness probe)
    async fn check_ready(&self) -> io::Result<()>;
    /// Open a stored blob.
    async fn open(&self, digest: &Digest) -> io::Result<Option<Box<dyn StoredBlob>>>;
    /// A URL the client can fetch the stored blob of `size` bytes from itself, for a while
    /// (a bucket with `redirect = true`); `None`: the cache serves it.
    async fn redirect_url(&self, _digest: &Digest, _size: u64) -> io::Result<Option<String>> {
        Ok(None)
    }
    /// Size of a stored blob.
    async fn size(&self, digest: &Digest) -> io::Result<Option<u64>>;
    /// Start writing content expected to have `digest` (checked on commit).
    async fn begin_write(&self, digest: &Digest) -> io::Result<BlobWriter>;
    /// Remove a blob (and its metadata); returns the bytes freed.
    async fn delete(&self, digest: &Digest) -> io::Result<u64>;
    /// Every stored blob with its size and last access time.
    async fn list(&self) -> io::Result<Vec<BlobInfo>>;
    /// Record an access (loosely: it orders eviction, also after a restart).
    async fn touch(&self, digest: &Digest);
    /// Media type of a stored manifest.
    async fn manifest_media_type(&self, digest: &Digest) -> io::Result<Option<String>>;
    async fn set_manifest_media_type(&self, digest: &Digest, media_type: &str) -> io::Result<()>;
    async fn read_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
    ) -> io::Result<Option<TagRecord>>;
    async fn write_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
        rec: &TagRecord,
    ) -> io::Result<()>;
    /// Whether `digest` was seen in `registry/name` (blobs are only served to repositories the
    /// upstream confirmed they belong to).
    async fn has_link(
        &self,
        registry: &str,
        name: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<bool>;
    async fn add_link(
        &self,
        registry: &str,
        name: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<()>;
    /// `true` when several replicas share this store: its size is bounded by one replica at a
    /// time under [`Self::eviction_lease`], not by each replica's own accounting.
    fn shared(&self) -> bool {
        false
    }
    /// Take or renew the lease that lets this replica evict from a shared store.
    async fn eviction_lease(&self) -> io::Result<bool> {
        Ok(true)
    }
}

/// Read a whole small stored blob (a manifest) into memory.
pub async fn read_all(blob: Box<dyn StoredBlob>) -> io::Result<Bytes> {
    use futures::TryStreamExt;
    let size = blob.size();
    let chunks: Vec<Bytes> = blob.range(0, size).try_collect().await?;
    Ok(Bytes::from(chunks.concat()))
}
