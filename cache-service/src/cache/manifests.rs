//! Manifests: tags resolved upstream at most once per TTL (a HEAD when it says enough), stale
//! tags served when the upstream fails, manifests by digest fetched once, verified and stored,
//! the blob sizes they declare remembered per repository.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode};

use super::single_flight::Role;
use super::{
    head_unsupported, header_text, lock, read_limited, status_error, storage_err, within, Cache,
    CacheError, HeadInfo, Kind, Source,
};
use crate::metrics::Metrics;
use crate::oci;
use crate::store::{self, TagRecord};
use registry_rules::digest::Digest;
use registry_rules::names::{Reference, RepositoryName, Tag};

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

pub(super) type TagKey = (String, RepositoryName, Tag);
pub(super) type ManifestKey = (String, RepositoryName, Digest);

/// Blob sizes remembered from manifests (~100 bytes each); emptied when full.
const MAX_KNOWN_SIZES: usize = 100_000;

impl Cache {
    pub async fn manifest(
        self: &Arc<Self>,
        up: &Source,
        name: &RepositoryName,
        reference: &Reference,
        head: bool,
    ) -> Result<ManifestReply, CacheError> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(up, name, d, head).await,
            Reference::Tag(t) => self.manifest_by_tag(up, name, t, head).await,
        }
    }

    /// A stored manifest; `None` when absent, not a manifest, or the store cannot be read
    /// (then it is fetched upstream).
    async fn load_manifest(&self, d: &Digest) -> Option<ManifestReply> {
        let blob = self.stored(d).await?;
        if blob.size() > oci::MAX_MANIFEST_BYTES as u64 {
            return None;
        }
        let body = match store::read_all(blob).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "reading a stored manifest failed");
                return None;
            }
        };
        // The bytes are in memory anyway: a file changed on disk is never served as `d`.
        if Digest::of_bytes(&body) != *d {
            Metrics::inc(&self.metrics.verify_failures);
            tracing::error!(digest = %d, "a stored manifest no longer matches its digest; removed, fetched again");
            match self.store.delete(d).await {
                Ok(_) => lock(&self.lru).remove(d),
                Err(e) => tracing::warn!(digest = %d, error = %e, "removing it failed"),
            }
            return None;
        }
        let stored_type = self.store.manifest_media_type(d).await.unwrap_or_else(|e| {
            tracing::warn!(digest = %d, error = %e, "reading a manifest's media type failed");
            None
        });
        let media_type = match stored_type {
            Some(m) => m,
            None => match oci::manifest_media_type(None, &body) {
                Ok(m) => m,
                Err(_) => return None, // a stored blob, not a manifest
            },
        };
        Some(ManifestReply {
            digest: d.clone(),
            media_type,
            size: body.len() as u64,
            body: Some(body),
        })
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        up: &Source,
        name: &RepositoryName,
        d: &Digest,
        head: bool,
    ) -> Result<ManifestReply, CacheError> {
        if let Some(m) = self.load_manifest(d).await {
            if self.linked(&up.name, name, d).await
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
        up: &Source,
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
        if let Err(e) = self.store.add_link(&up.name, name, d).await {
            tracing::warn!(error = %e, "could not write link");
        }
        Ok(Some(ManifestReply {
            digest: d.clone(),
            media_type,
            size,
            body: None,
        }))
    }

    fn tag_fresh(&self, rec: &TagRecord) -> bool {
        unix_now().saturating_sub(rec.fetched_at) < self.tag_ttl.load(Relaxed)
    }

    async fn reply_from_record(
        self: &Arc<Self>,
        up: &Source,
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
        up: &Source,
        name: &RepositoryName,
        tag: &Tag,
        head: bool,
    ) -> Result<ManifestReply, CacheError> {
        let reg = up.name.as_str();
        let rec = self.tag_record(reg, name, tag).await;
        if let Some(rec) = &rec {
            if self.tag_fresh(rec) {
                Metrics::inc(&self.metrics.hits);
                return self.reply_from_record(up, name, rec, head).await;
            }
        }
        let result = match self.resolve_tag_shared(up, name, tag).await {
            Ok(m) if m.body.is_none() && !head => {
                let full = match self.manifest_by_digest(up, name, &m.digest, false).await {
                    // The HEAD named a digest the registry does not serve as such (a replica
                    // behind, a HEAD that computes digests its own way): the tag's own GET
                    // decides, and its record replaces the one the HEAD wrote.
                    Err(CacheError::ManifestUnknown | CacheError::DigestMismatch(_)) => {
                        self.fetch_manifest(up, name, &Reference::Tag(tag.clone()))
                            .await
                    }
                    r => r,
                };
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
                        )
                        .await;
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
        up: &Source,
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
        up: &Source,
        name: &RepositoryName,
        tag: &Tag,
    ) -> Result<ManifestReply, CacheError> {
        let reg = up.name.as_str();
        // Read again: a call that just finished may have refreshed it.
        let rec = self.tag_record(reg, name, tag).await;
        if let Some(rec) = rec.as_ref().filter(|r| self.tag_fresh(r)) {
            return Ok(record_reply(rec));
        }
        let path = format!("/v2/{}/manifests/{}", name, tag);
        // A HEAD does not count against Docker Hub's pull limit; one attempt keeps stale
        // answers fast when the upstream is down. Only the upstream's part is bounded: a
        // store write cut off midway would leave it uncounted.
        let resp = within(self.metadata_deadline, async {
            Ok(up
                .send(Method::HEAD, &path, name, Some(oci::MANIFEST_ACCEPT), 1)
                .await?)
        })
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
                if let Err(e) = self.store.write_tag(reg, name, tag, &fresh).await {
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
            // A size no manifest may have is the GET's to refuse (`TooLarge`), not a record's.
            info.size
                .filter(|l| *l > 0 && *l <= oci::MAX_MANIFEST_BYTES as u64),
        ) {
            (Some(d), Some(mt), Some(size)) => {
                let new = TagRecord {
                    digest: d,
                    media_type: mt,
                    size,
                    fetched_at: unix_now(),
                };
                self.save_tag(reg, name, tag, &new).await;
                Ok(record_reply(&new))
            }
            _ => {
                self.fetch_manifest(up, name, &Reference::Tag(tag.clone()))
                    .await
            }
        }
    }

    /// The stored record of a tag; an unreadable one counts as none (asked upstream).
    async fn tag_record(&self, reg: &str, name: &RepositoryName, tag: &Tag) -> Option<TagRecord> {
        self.store
            .read_tag(reg, name, tag)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(registry = reg, %name, %tag, error = %e, "storage unavailable; resolving the tag upstream");
                None
            })
    }

    async fn save_tag(&self, reg: &str, name: &RepositoryName, tag: &Tag, rec: &TagRecord) {
        let r = match self.store.add_link(reg, name, &rec.digest).await {
            Ok(()) => self.store.write_tag(reg, name, tag, rec).await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not write tag record");
        }
    }

    /// GET a manifest by digest, once for every concurrent request for the same
    /// (registry, repository, digest).
    async fn fetch_manifest_shared(
        self: &Arc<Self>,
        up: &Source,
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
        up: &Source,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<ManifestReply, CacheError> {
        Metrics::inc(&self.metrics.upstream_fetches);
        let path = format!("/v2/{name}/manifests/{reference}");
        let (ct, hdr_digest, body) = within(self.metadata_deadline, async {
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
            let (ct, hdr_digest) = (
                header_text(&resp, CONTENT_TYPE),
                header_text(&resp, "docker-content-digest"),
            );
            Ok((
                ct,
                hdr_digest,
                read_limited(resp, oci::MAX_MANIFEST_BYTES).await?,
            ))
        })
        .await?;
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
        if let Err(e) = self.store.add_link(&up.name, name, &digest).await {
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
            )
            .await;
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
        body: &Bytes,
        media_type: &str,
    ) -> Result<(), CacheError> {
        if self.store.size(d).await.map_err(storage_err)?.is_some() {
            return Ok(());
        }
        self.make_room(body.len() as u64).await;
        self.store
            .set_manifest_media_type(d, media_type)
            .await
            .map_err(storage_err)?;
        let mut t = self.store.begin_write(d).await.map_err(storage_err)?;
        t.write(std::slice::from_ref(body))
            .await
            .map_err(storage_err)?;
        t.commit(d, Some(body.len() as u64))
            .await
            .map_err(|e| CacheError::Storage(e.to_string()))?;
        self.count_stored(d, body.len() as u64);
        Ok(())
    }
}
