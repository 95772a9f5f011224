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

use sha2::{Digest as _, Sha256};

use super::{BlobInfo, BlobStore, TagRecord, TempBlob};
use registry_rules::digest::Digest;
use registry_rules::names::{RepositoryName, Tag};

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

    /// Write a small file atomically (temp + rename).
    fn write_small(&self, dest: &Path, data: &[u8]) -> io::Result<()> {
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.tmp_dir().join(format!(
            "meta-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dest)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
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

impl BlobStore for FsStore {
    fn clean_tmp(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(self.tmp_dir())? {
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
    }

    fn check_writable(&self) -> io::Result<()> {
        let p = self
            .tmp_dir()
            .join(format!(".ready-{}", std::process::id()));
        std::fs::write(&p, b"ok")?;
        std::fs::remove_file(&p)
    }

    fn open(&self, digest: &Digest) -> io::Result<Option<(std::fs::File, u64)>> {
        let Some(f) = not_found_is_none(std::fs::File::open(blob_path(&self.root, digest)))? else {
            return Ok(None);
        };
        let len = f.metadata()?.len();
        Ok(Some((f, len)))
    }

    fn size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        Ok(not_found_is_none(std::fs::metadata(blob_path(&self.root, digest)))?.map(|m| m.len()))
    }

    fn begin_write(&self) -> io::Result<TempBlob> {
        let path = self.tmp_dir().join(format!(
            "blob-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let root = self.root.clone();
        Ok(TempBlob {
            path,
            file: Some(tokio::fs::File::from_std(file)),
            hasher: Sha256::new(),
            len: 0,
            dest_for: Box::new(move |d| blob_path(&root, d)),
        })
    }

    fn delete(&self, digest: &Digest) -> io::Result<u64> {
        let p = blob_path(&self.root, digest);
        let size = not_found_is_none(std::fs::metadata(&p))?.map_or(0, |m| m.len());
        not_found_is_none(std::fs::remove_file(&p))?;
        let _ = std::fs::remove_file(p.with_extension("json"));
        Ok(size)
    }

    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        let mut out = Vec::new();
        let base = self.root.join("blobs").join("sha256");
        for shard in std::fs::read_dir(&base)? {
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

    fn touch(&self, digest: &Digest) {
        if let Ok(f) = std::fs::File::options()
            .write(true)
            .open(blob_path(&self.root, digest))
        {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    fn manifest_media_type(&self, digest: &Digest) -> io::Result<Option<String>> {
        let p = blob_path(&self.root, digest).with_extension("json");
        let Some(text) = not_found_is_none(std::fs::read(p))? else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(io::Error::other)?;
        Ok(v.get("media_type")
            .and_then(|m| m.as_str())
            .map(str::to_owned))
    }

    fn set_manifest_media_type(&self, digest: &Digest, media_type: &str) -> io::Result<()> {
        let p = blob_path(&self.root, digest).with_extension("json");
        let body = serde_json::json!({ "media_type": media_type }).to_string();
        self.write_small(&p, body.as_bytes())
    }

    fn read_tag(
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

    fn write_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        tag: &Tag,
        rec: &TagRecord,
    ) -> io::Result<()> {
        let body = serde_json::to_vec(rec).map_err(io::Error::other)?;
        self.write_small(&self.tag_path(registry, name, tag), &body)
    }

    fn has_link(&self, registry: &str, name: &RepositoryName, digest: &Digest) -> bool {
        self.link_path(registry, name, digest).exists()
    }

    fn add_link(&self, registry: &str, name: &RepositoryName, digest: &Digest) -> io::Result<()> {
        let p = self.link_path(registry, name, digest);
        if p.exists() {
            return Ok(());
        }
        self.write_small(&p, b"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_verifies_and_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let good = Digest::of_bytes(b"hello world");

        // Mismatching content: nothing stored, temp removed.
        let mut t = store.begin_write().unwrap();
        let tmp_path = t.path().to_path_buf();
        t.write(b"hello WORLD").await.unwrap();
        assert!(t.commit(&good, Some(11)).await.is_err());
        assert!(!tmp_path.exists());
        assert!(store.open(&good).unwrap().is_none());

        // Wrong length: refused.
        let mut t = store.begin_write().unwrap();
        t.write(b"hello world").await.unwrap();
        assert!(t.commit(&good, Some(12)).await.is_err());
        assert!(store.open(&good).unwrap().is_none());

        // Dropped (upstream cut): temp removed.
        let mut t = store.begin_write().unwrap();
        let tmp_path = t.path().to_path_buf();
        t.write(b"hello").await.unwrap();
        drop(t);
        assert!(!tmp_path.exists());

        // Good content.
        let mut t = store.begin_write().unwrap();
        t.write(b"hello ").await.unwrap();
        t.write(b"world").await.unwrap();
        t.commit(&good, Some(11)).await.unwrap();
        let (_, len) = store.open(&good).unwrap().unwrap();
        assert_eq!(len, 11);
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        store.set_manifest_media_type(&good, "x/y").unwrap();
        assert_eq!(
            store.manifest_media_type(&good).unwrap().as_deref(),
            Some("x/y")
        );
        assert_eq!(store.list().unwrap().len(), 1, "metadata is not a blob");
        assert_eq!(store.delete(&good).unwrap(), 11);
        assert!(store.open(&good).unwrap().is_none());
    }

    #[test]
    fn tmp_cleaned_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/blob-crashed"), b"partial").unwrap();
        std::fs::create_dir_all(dir.path().join("tmp/sub")).unwrap();
        let store2 = FsStore::new(dir.path()).unwrap();
        assert_eq!(store2.clean_tmp().unwrap(), 2);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        drop(store);
    }

    #[test]
    fn tags_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let name = RepositoryName::parse("library/alpine").unwrap();
        let tag = Tag::parse("3.20").unwrap();
        let d = Digest::of_bytes(b"x");
        assert!(store.read_tag("docker.io", &name, &tag).unwrap().is_none());
        let rec = TagRecord {
            digest: d.clone(),
            media_type: "m".into(),
            size: 1,
            fetched_at: 5,
        };
        store.write_tag("docker.io", &name, &tag, &rec).unwrap();
        assert_eq!(store.read_tag("docker.io", &name, &tag).unwrap(), Some(rec));
        assert!(!store.has_link("docker.io", &name, &d));
        store.add_link("docker.io", &name, &d).unwrap();
        assert!(store.has_link("docker.io", &name, &d));
        assert!(!store.has_link("gcr.io", &name, &d));
    }
}
