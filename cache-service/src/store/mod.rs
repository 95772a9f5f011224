//! Content-addressed storage behind a trait, with a filesystem implementation ([`fs::FsStore`]).
//!
//! Metadata (manifest media types, tag records, repository links) are plain small files, not a
//! database: each is written to a temp file and renamed into place (atomic on POSIX), so a crash
//! never leaves a half-written record; they survive restarts; and they need no extra dependency
//! or compaction. A reader of a record sees either the old or the new version.

pub mod fs;

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use registry_rules::digest::Digest;
use registry_rules::names::{RepositoryName, Tag};

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

/// An in-progress write: bytes go to a file in the store's temp directory while their sha256 is
/// computed. [`TempBlob::commit`] verifies digest and length, fsyncs and renames atomically into
/// place; dropping an uncommitted `TempBlob` deletes the temp file.
pub struct TempBlob {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    len: u64,
    dest_for: Box<dyn Fn(&Digest) -> PathBuf + Send + Sync>,
}

impl std::fmt::Debug for TempBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempBlob")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl TempBlob {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append bytes; when this returns they are readable through another handle on `path()`.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("temp blob already closed"))?;
        file.write_all(data).await?;
        file.flush().await?;
        self.hasher.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// Stop writing to disk (e.g. after ENOSPC) and hand back the hash of the bytes written so
    /// far; the temp file is deleted.
    pub fn abandon(mut self) -> Sha256 {
        std::mem::take(&mut self.hasher)
    }

    /// Verify, fsync, rename into place, fsync the directory. On error the temp file is removed.
    pub async fn commit(
        mut self,
        expected: &Digest,
        expected_len: Option<u64>,
    ) -> Result<PathBuf, CommitError> {
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
        if let Some(mut file) = self.file.take() {
            file.flush().await?;
            file.sync_all().await?;
        }
        let dest = (self.dest_for)(expected);
        let dir = dest
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| io::Error::other("blob path without parent"))?;
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::rename(&self.path, &dest).await?;
        // Renamed: nothing left to delete on drop.
        self.path = PathBuf::new();
        fsync_dir(&dir).await?;
        Ok(dest)
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(crate) async fn fsync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}

/// Storage of content-addressed blobs (layers, configs and manifests alike) plus the small
/// metadata the cache needs. Implementations must make `begin_write` + `TempBlob::commit` atomic:
/// a digest is either absent or present with verified content.
pub trait BlobStore: Send + Sync + 'static {
    /// Delete leftovers of interrupted writes. Called once at startup.
    fn clean_tmp(&self) -> io::Result<usize>;
    /// Can we write? (readiness probe)
    fn check_writable(&self) -> io::Result<()>;
    /// Open a stored blob for reading with its size.
    fn open(&self, digest: &Digest) -> io::Result<Option<(std::fs::File, u64)>>;
    /// Size of a stored blob.
    fn size(&self, digest: &Digest) -> io::Result<Option<u64>>;
    /// Start writing content whose digest will be checked on commit.
    fn begin_write(&self) -> io::Result<TempBlob>;
    /// Remove a blob (and its metadata); returns the bytes freed.
    fn delete(&self, digest: &Digest) -> io::Result<u64>;
    /// Every stored blob with its size and last access time.
    fn list(&self) -> io::Result<Vec<BlobInfo>>;
    /// Record an access (loosely: used to rebuild LRU order after a restart).
    fn touch(&self, digest: &Digest);
    /// Media type of a stored manifest.
    fn manifest_media_type(&self, digest: &Digest) -> io::Result<Option<String>>;
    fn set_manifest_media_type(&self, digest: &Digest, media_type: &str) -> io::Result<()>;
    fn read_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
    ) -> io::Result<Option<TagRecord>>;
    fn write_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
        rec: &TagRecord,
    ) -> io::Result<()>;
    /// Whether `digest` was seen in `registry/name` (blobs are only served to repositories the
    /// upstream confirmed they belong to).
    fn has_link(&self, registry: &str, name: &RepositoryName, digest: &Digest) -> bool;
    fn add_link(&self, registry: &str, name: &RepositoryName, digest: &Digest) -> io::Result<()>;
}
