//! Filesystem [`BlobStore`]:
//!
//! ```text
//! <root>/blobs/sha256/<2 hex>/<hex>        content (layers, configs, manifests)
//! <root>/blobs/sha256/<2 hex>/<hex>.json   {"media_type": ...} for manifests
//! <root>/tags/<registry>/<name>/_tags/<tag>.json   TagRecord
//! <root>/links/<registry>/<name>/_links/<hex>     empty marker: digest belongs to that repository
//! <root>/tmp/                               in-progress writes, emptied at startup
//! ```

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::spool::{on_blocking_pool, Spool};
use super::{
    BlobInfo, BlobStore, BlobWriter, ByteStream, Sink, SpoolReader, StoredBlob, TagRecord,
};
use crate::oci;
use registry_rules::digest::Digest;
use registry_rules::names::{RepositoryName, Tag};

/// Chunk size for stored blobs read into memory: few blocking-pool hops and large writes.
const FILE_CHUNK: u64 = 1024 * 1024;
/// Mapped window size: large socket writes; one window is prepared while the previous one is
/// sent, so at most two are resident per response (8 streams measured 54 MiB of RSS).
const MAPPED_WINDOW: u64 = 4 * 1024 * 1024;

#[derive(Debug)]
pub struct FsStore {
    root: PathBuf,
    seq: AtomicU64,
}

fn not_found_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write `data` to `dest` atomically: through `tmp`, fsynced, renamed into place.
fn write_small_at(tmp: &Path, dest: &Path, data: &[u8]) -> io::Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let res = (|| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(tmp, dest)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    res
}

/// Every stored blob under `base` (`blobs/sha256`): digest, size, last access.
fn list_blobs(base: &Path) -> io::Result<Vec<BlobInfo>> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(base)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(shard.path())? {
            let f = f?;
            let name = f.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue; // .json metadata or foreign files
            };
            let md = f.metadata()?;
            out.push(BlobInfo {
                digest,
                size: md.len(),
                last_access: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
    }
    Ok(out)
}

fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    root.join("blobs")
        .join("sha256")
        .join(hex.get(..2).unwrap_or("00"))
        .join(hex)
}

impl FsStore {
    pub fn new(root: &Path) -> io::Result<Self> {
        for d in ["blobs/sha256", "tags", "links", "tmp"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            seq: AtomicU64::new(0),
        })
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn meta_tmp(&self) -> PathBuf {
        self.tmp_dir().join(format!(
            "meta-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// [`write_small_at`] on the blocking pool: an fsync can wait behind the writeback of
    /// other files.
    async fn write_small(&self, dest: PathBuf, data: Vec<u8>) -> io::Result<()> {
        let tmp = self.meta_tmp();
        on_blocking_pool(move || write_small_at(&tmp, &dest, &data)).await
    }

    fn tag_path(&self, registry: &str, name: &RepositoryName, tag: &Tag) -> PathBuf {
        self.root
            .join("tags")
            .join(registry)
            .join(name.as_str())
            .join("_tags")
            .join(format!("{}.json", tag.as_str()))
    }

    fn link_path(&self, registry: &str, name: &RepositoryName, digest: &Digest) -> PathBuf {
        self.root
            .join("links")
            .join(registry)
            .join(name.as_str())
            .join("_links")
            .join(digest.hex())
    }
}

/// A stored file, opened: the handle keeps the content readable even if the blob is evicted
/// (unlinked) while it is served.
struct FsBlob {
    file: SpoolReader,
    size: u64,
}

impl StoredBlob for FsBlob {
    fn size(&self) -> u64 {
        self.size
    }

    /// Chunks prepared on the blocking pool, the next one while the current one is sent: mapped
    /// windows of [`MAPPED_WINDOW`] for blobs larger than any manifest (their bytes only ever go
    /// to a socket), 1 MiB reads otherwise (manifests are parsed, so their bytes are copied).
    fn range(self: Box<Self>, start: u64, end: u64) -> ByteStream {
        let file = self.file;
        let mapped = self.size > oci::MAX_MANIFEST_BYTES as u64;
        let chunk = if mapped { MAPPED_WINDOW } else { FILE_CHUNK };
        let chunks = (start..end)
            .step_by(usize::try_from(chunk).unwrap_or(usize::MAX))
            .map(move |pos| (pos, std::cmp::min(chunk, end - pos)));
        futures::stream::iter(chunks)
            .map(move |(pos, want)| {
                let file = file.clone();
                async move {
                    let b = if mapped {
                        file.map_at(pos, want).await?
                    } else {
                        file.read_at(pos, want).await?
                    };
                    if b.len() as u64 != want {
                        return Err(io::Error::other("stored blob shorter than expected"));
                    }
                    Ok(b)
                }
            })
            // Two in flight: the next chunk is ready when the socket has taken this one. A
            // mapped window of a warm blob holds no memory of its own (see `mapped`).
            .buffered(2)
            .scan(false, |failed, r: io::Result<Bytes>| {
                // Nothing after the first error.
                let out = (!*failed).then_some(r);
                if matches!(out, Some(Err(_))) {
                    *failed = true;
                }
                futures::future::ready(out)
            })
            .boxed()
    }
}

/// A verified write lands by renaming its spool into place.
struct FsSink {
    root: PathBuf,
}

#[async_trait]
impl Sink for FsSink {
    async fn write(&mut self, _data: &Bytes) -> io::Result<()> {
        Ok(())
    }

    async fn commit(self: Box<Self>, digest: &Digest, spool: Spool) -> io::Result<()> {
        spool.persist(&blob_path(&self.root, digest)).await
    }
}

#[async_trait]
impl BlobStore for FsStore {
    async fn clean_abandoned(&self) -> io::Result<usize> {
        let tmp = self.tmp_dir();
        on_blocking_pool(move || {
            let mut n = 0;
            for entry in std::fs::read_dir(tmp)? {
                let entry = entry?;
                let p = entry.path();
                let r = if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                if r.is_ok() {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    async fn check_ready(&self) -> io::Result<()> {
        let p = self
            .tmp_dir()
            .join(format!(".ready-{}", std::process::id()));
        std::fs::write(&p, b"ok")?;
        std::fs::remove_file(&p)
    }

    async fn open(&self, digest: &Digest) -> io::Result<Option<Box<dyn StoredBlob>>> {
        let Some(f) = not_found_is_none(std::fs::File::open(blob_path(&self.root, digest)))? else {
            return Ok(None);
        };
        let size = f.metadata()?.len();
        Ok(Some(Box::new(FsBlob {
            file: SpoolReader::of(f),
            size,
        })))
    }

    async fn size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        Ok(not_found_is_none(std::fs::metadata(blob_path(&self.root, digest)))?.map(|m| m.len()))
    }

    async fn begin_write(&self, _digest: &Digest) -> io::Result<BlobWriter> {
        let path = self.tmp_dir().join(format!(
            "blob-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(BlobWriter::new(
            Spool::named(path)?,
            Box::new(FsSink {
                root: self.root.clone(),
            }),
        ))
    }

    async fn delete(&self, digest: &Digest) -> io::Result<u64> {
        // Unlinking a large file frees its extents: off the runtime's threads.
        let p = blob_path(&self.root, digest);
        on_blocking_pool(move || {
            let size = not_found_is_none(std::fs::metadata(&p))?.map_or(0, |m| m.len());
            not_found_is_none(std::fs::remove_file(&p))?;
            let _ = std::fs::remove_file(p.with_extension("json"));
            Ok(size)
        })
        .await
    }

    async fn list(&self) -> io::Result<Vec<BlobInfo>> {
        let base = self.root.join("blobs").join("sha256");
        on_blocking_pool(move || list_blobs(&base)).await
    }

    async fn touch(&self, digest: &Digest) {
        if let Ok(f) = std::fs::File::options()
            .write(true)
            .open(blob_path(&self.root, digest))
        {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    async fn manifest_media_type(&self, digest: &Digest) -> io::Result<Option<String>> {
        let p = blob_path(&self.root, digest).with_extension("json");
        let Some(text) = not_found_is_none(std::fs::read(p))? else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(io::Error::other)?;
        Ok(v.get("media_type")
            .and_then(|m| m.as_str())
            .map(str::to_owned))
    }

    async fn set_manifest_media_type(&self, digest: &Digest, media_type: &str) -> io::Result<()> {
        let p = blob_path(&self.root, digest).with_extension("json");
        let body = serde_json::json!({ "media_type": media_type }).to_string();
        self.write_small(p, body.into_bytes()).await
    }

    async fn read_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
    ) -> io::Result<Option<TagRecord>> {
        let Some(text) = not_found_is_none(std::fs::read(self.tag_path(registry, name, tag)))?
        else {
            return Ok(None);
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
        self.write_small(self.tag_path(registry, name, tag), body)
            .await
    }

    async fn has_link(
        &self,
        registry: &str,
        name: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<bool> {
        Ok(self.link_path(registry, name, digest).exists())
    }

    async fn add_link(
        &self,
        registry: &str,
        name: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<()> {
        let p = self.link_path(registry, name, digest);
        if p.exists() {
            return Ok(());
        }
        self.write_small(p, Vec::new()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_count(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    #[tokio::test]
    async fn commit_verifies_and_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let good = Digest::of_bytes(b"hello world");

        // Mismatching content: nothing stored, temp removed.
        let mut t = store.begin_write(&good).await.unwrap();
        t.write(&[Bytes::from_static(b"hello WORLD")])
            .await
            .unwrap();
        assert_eq!(tmp_count(dir.path()), 1);
        assert!(t.commit(&good, Some(11)).await.is_err());
        assert_eq!(tmp_count(dir.path()), 0);
        assert!(store.open(&good).await.unwrap().is_none());

        // Wrong length: refused.
        let mut t = store.begin_write(&good).await.unwrap();
        t.write(&[Bytes::from_static(b"hello world")])
            .await
            .unwrap();
        assert!(t.commit(&good, Some(12)).await.is_err());
        assert!(store.open(&good).await.unwrap().is_none());

        // Dropped (upstream cut): temp removed.
        let mut t = store.begin_write(&good).await.unwrap();
        t.write(&[Bytes::from_static(b"hello")]).await.unwrap();
        drop(t);
        assert_eq!(tmp_count(dir.path()), 0);

        // Good content.
        let mut t = store.begin_write(&good).await.unwrap();
        t.write(&[Bytes::from_static(b"hello ")]).await.unwrap();
        t.write(&[Bytes::from_static(b"world")]).await.unwrap();
        t.commit(&good, Some(11)).await.unwrap();
        let blob = store.open(&good).await.unwrap().unwrap();
        assert_eq!(blob.size(), 11);
        assert_eq!(store.list().await.unwrap().len(), 1);
        assert_eq!(tmp_count(dir.path()), 0);

        store.set_manifest_media_type(&good, "x/y").await.unwrap();
        assert_eq!(
            store.manifest_media_type(&good).await.unwrap().as_deref(),
            Some("x/y")
        );
        assert_eq!(
            store.list().await.unwrap().len(),
            1,
            "metadata is not a blob"
        );
        assert_eq!(store.delete(&good).await.unwrap(), 11);
        assert!(store.open(&good).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn tmp_cleaned_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/blob-crashed"), b"partial").unwrap();
        std::fs::create_dir_all(dir.path().join("tmp/sub")).unwrap();
        let store2 = FsStore::new(dir.path()).unwrap();
        assert_eq!(store2.clean_abandoned().await.unwrap(), 2);
        assert_eq!(tmp_count(dir.path()), 0);
        drop(store);
    }

    #[tokio::test]
    async fn tags_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let name = RepositoryName::parse("library/alpine").unwrap();
        let tag = Tag::parse("3.20").unwrap();
        let d = Digest::of_bytes(b"x");
        assert!(store
            .read_tag("docker.io", &name, &tag)
            .await
            .unwrap()
            .is_none());
        let rec = TagRecord {
            digest: d.clone(),
            media_type: "m".into(),
            size: 1,
            fetched_at: 5,
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
        assert!(!store.has_link("gcr.io", &name, &d).await.unwrap());
    }

    #[tokio::test]
    async fn ranges_and_short_files() {
        // Below the manifest limit the blob is read into memory; above it, mapped.
        for size in [
            2 * FILE_CHUNK + 12345,
            crate::oci::MAX_MANIFEST_BYTES as u64 + 2 * MAPPED_WINDOW + 777,
        ] {
            ranges_of(size).await;
        }
    }

    async fn ranges_of(size: u64) {
        use futures::TryStreamExt;
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let d = Digest::of_bytes(&data);
        let mut t = store.begin_write(&d).await.unwrap();
        t.write(&[Bytes::from(data.clone())]).await.unwrap();
        t.commit(&d, None).await.unwrap();
        let len = data.len() as u64;
        for (s, e) in [
            (0, len),
            (5, len - 2),
            (FILE_CHUNK, FILE_CHUNK + 1),
            (MAPPED_WINDOW - 3, MAPPED_WINDOW + 4097),
            (7, 7),
            (len - 1, len),
        ]
        .into_iter()
        .filter(|&(_, e)| e <= len)
        {
            let blob = store.open(&d).await.unwrap().unwrap();
            let got: Vec<Bytes> = blob.range(s, e).try_collect().await.unwrap();
            assert_eq!(
                got.concat(),
                &data[s as usize..e as usize],
                "{size}: range {s}-{e}"
            );
        }
        // Evicted (unlinked) while being served: the open blob still yields every byte.
        let blob = store.open(&d).await.unwrap().unwrap();
        assert_eq!(store.delete(&d).await.unwrap(), len);
        let got: Vec<Bytes> = blob.range(0, len).try_collect().await.unwrap();
        assert_eq!(got.concat(), data, "{size}: evicted while served");
        // The file is shorter than the size the response announced (or was cut short behind
        // the cache's back after it was opened): the stream fails instead of serving less.
        let mut t = store.begin_write(&d).await.unwrap();
        t.write(&[Bytes::from(data.clone())]).await.unwrap();
        t.commit(&d, None).await.unwrap();
        let blob = store.open(&d).await.unwrap().unwrap();
        let items: Vec<_> = blob.range(0, len + 10).collect().await;
        assert!(items.last().unwrap().is_err(), "{size}: past the end");
        let blob = store.open(&d).await.unwrap().unwrap();
        let path = blob_path(dir.path(), &d);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let items: Vec<_> = blob.range(0, len).collect().await;
        assert!(
            items.last().unwrap().is_err(),
            "{size}: truncated after open"
        );
        let served: usize = items
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(Bytes::len)
            .sum();
        assert!(served as u64 <= len / 2, "{size}: nothing past the cut");
    }
}
