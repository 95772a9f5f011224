//! The local file an in-progress write goes to: clients joining the download read it up to the
//! published watermark (as mapped windows, or by `pread` for a body known to be manifest-sized)
//! through a shared read handle, which keeps working after the file is renamed into the store
//! or unlinked.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

pub(crate) struct Spool {
    /// Written on the blocking pool, one write at a time, at the file's position.
    file: Arc<std::fs::File>,
    read: Arc<std::fs::File>,
    /// A named spool (the filesystem store's temp file) is removed on drop unless persisted;
    /// an anonymous one (`O_TMPFILE`) vanishes with its last handle, even after a crash.
    path: Option<PathBuf>,
}

impl Spool {
    /// A new file at `path` (which must not exist).
    pub(crate) fn named(path: PathBuf) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let read = match std::fs::File::open(&path) {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        Ok(Self {
            file: Arc::new(file),
            read: Arc::new(read),
            path: Some(path),
        })
    }

    /// An unnamed file in `dir`.
    pub(crate) fn anonymous(dir: &Path) -> io::Result<Self> {
        let file = tempfile::tempfile_in(dir)?;
        let read = file.try_clone()?;
        Ok(Self {
            file: Arc::new(file),
            read: Arc::new(read),
            path: None,
        })
    }

    /// Append `data`: the write starts on the blocking pool now (the caller may work on the
    /// same bytes meanwhile) and the bytes are readable once the returned future is done.
    /// Writes go at the file's position, so the caller awaits each before starting the next
    /// (`BlobWriter::write` does); the returned future does not borrow the spool.
    pub(crate) fn write(
        &mut self,
        chunks: Vec<Bytes>,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
        let file = self.file.clone();
        let written = tokio::task::spawn_blocking(move || write_all_vectored(&file, &chunks));
        async move { written.await.map_err(io::Error::other)? }
    }

    pub(crate) fn reader(&self) -> SpoolReader {
        SpoolReader(self.read.clone())
    }

    /// fsync, rename to `dest` (creating its directory) and fsync that directory. Once the
    /// rename is done the blob is stored, whatever the directory's fsync says: it is then
    /// served (and must be counted), and a crash can only lose it whole, its bytes having
    /// been synced before it got its name.
    pub(crate) async fn persist(mut self, dest: &Path) -> io::Result<()> {
        let Some(src) = self.path.clone() else {
            return Err(io::Error::other("an anonymous spool cannot be persisted"));
        };
        let file = self.file.clone();
        on_blocking_pool(move || file.sync_all()).await?;
        let dir = dest
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| io::Error::other("blob path without parent"))?;
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::rename(&src, dest).await?;
        // Renamed: nothing left to delete on drop.
        self.path = None;
        if let Err(e) = fsync_dir(&dir).await {
            tracing::warn!(dir = %dir.display(), error = %e, "syncing a blob's directory failed; a crash may lose the blob");
        }
        Ok(())
    }
}

/// All of `chunks`, in order, at the file's position: one `writev` for a batch unless the
/// kernel takes less.
fn write_all_vectored(mut file: &std::fs::File, chunks: &[Bytes]) -> io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    // Skips empty chunks, which would otherwise read as a write of nothing.
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(crate) async fn fsync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    on_blocking_pool(move || std::fs::File::open(&dir)?.sync_all()).await
}

/// Filesystem work that may wait on the disk, run on the blocking pool so that it never holds
/// a runtime thread (and every request scheduled on it).
pub(crate) async fn on_blocking_pool<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// A read handle on a spool (or a stored file).
#[derive(Debug, Clone)]
pub struct SpoolReader(Arc<std::fs::File>);

impl SpoolReader {
    pub(crate) fn of(file: std::fs::File) -> Self {
        Self(Arc::new(file))
    }

    /// Up to `len` bytes at `pos` (fewer at the end of the file), read on the blocking pool.
    pub async fn read_at(&self, pos: u64, len: u64) -> io::Result<Bytes> {
        let f = self.0.clone();
        on_blocking_pool(move || pread(&f, pos, len)).await
    }

    /// Exactly `len` bytes at `pos`: the caller knows that many were written, so fewer is an
    /// error.
    pub async fn read_exact_at(&self, pos: u64, len: u64) -> io::Result<Bytes> {
        let b = self.read_at(pos, len).await?;
        if b.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "spool shorter than written",
            ));
        }
        Ok(b)
    }

    /// Up to `len` bytes at `pos` (fewer at the end of the file) as a mapped window (see
    /// [`super::mapped`]), its pages in the page cache (read in on the blocking pool): of a
    /// stored blob, or of a spool below what was written.
    pub(crate) async fn map_at(&self, pos: u64, len: u64) -> io::Result<Bytes> {
        let f = self.0.clone();
        on_blocking_pool(move || {
            let size = f.metadata()?.len();
            let len = std::cmp::min(len, size.saturating_sub(pos));
            super::mapped::window(&f, pos, usize::try_from(len).map_err(io::Error::other)?)
        })
        .await
    }
}

/// `pread` until `len` bytes or end of file.
fn pread(f: &std::fs::File, pos: u64, len: u64) -> io::Result<Bytes> {
    let n = usize::try_from(len).map_err(io::Error::other)?;
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        let slice = buf.get_mut(filled..).unwrap_or_default();
        let r = f.read_at(slice, pos + filled as u64)?;
        if r == 0 {
            break;
        }
        filled += r;
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_of_chunks_lands_in_order_and_empty_chunks_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::anonymous(dir.path()).unwrap();
        let chunk = |b: u8, n: usize| Bytes::from(vec![b; n]);
        // More slices than one writev takes (IOV_MAX is 1024) and empty ones among them.
        let mut batch: Vec<Bytes> = (0..1500u32).map(|i| chunk(i as u8, 3)).collect();
        batch.insert(0, Bytes::new());
        batch.insert(700, Bytes::new());
        spool.write(batch.clone()).await.unwrap();
        spool.write(vec![chunk(b'z', 5)]).await.unwrap();
        let expected: Vec<u8> = batch.iter().flatten().copied().chain([b'z'; 5]).collect();
        let got = spool.reader().read_at(0, 10_000).await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got[..] == expected[..], "bytes in write order");
    }
}
