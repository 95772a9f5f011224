//! Pass-through of small answers (tags lists, referrers): read bounded, kept briefly in a
//! cache bounded in entries and bytes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, LINK};
use reqwest::{Method, StatusCode};

use super::{
    header_text, lock, read_limited, status_error, within, Cache, CacheError, Kind, Source,
};
use crate::metrics::Metrics;
use registry_rules::names::RepositoryName;

/// A small passthrough response (tags list, referrers).
#[derive(Debug, Clone)]
pub struct SmallReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub link: Option<String>,
    pub body: Bytes,
}

const SMALL_TTL: Duration = Duration::from_secs(30);
/// A tags list or referrers answer is read up to this size.
const MAX_SMALL_BYTES: usize = 8 * 1024 * 1024;
/// Small answers larger than this are served but not kept.
const MAX_SMALL_ENTRY_BYTES: usize = 1024 * 1024;
/// Bounds of the small-answer cache as a whole.
const MAX_SMALL_CACHE_BYTES: usize = 32 * 1024 * 1024;
const MAX_SMALL_ENTRIES: usize = 1000;

/// Short-lived answers (tags lists, referrers), bounded in entries and bytes.
#[derive(Debug, Default)]
pub(super) struct SmallCache {
    map: HashMap<String, (Instant, SmallReply)>,
    bytes: usize,
    evictions: u64,
}

impl SmallCache {
    /// Entries, bytes and evictions, for the metrics page.
    pub(super) fn stats(&self) -> (usize, usize, u64) {
        (self.map.len(), self.bytes, self.evictions)
    }

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

impl Cache {
    /// GET a small JSON document (tags list, referrers) with a short cache.
    pub async fn small(
        &self,
        up: &Source,
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
        let reply = within(self.metadata_deadline, async {
            let resp = up
                .send(Method::GET, path_and_query, name, accept, 3)
                .await?;
            let status = resp.status();
            if !(status == StatusCode::OK || status == StatusCode::NOT_FOUND) {
                return Err(status_error(&resp, Kind::Other));
            }
            let (content_type, link) = (header_text(&resp, CONTENT_TYPE), header_text(&resp, LINK));
            Ok(SmallReply {
                status: status.as_u16(),
                content_type,
                link,
                body: read_limited(resp, MAX_SMALL_BYTES).await?,
            })
        })
        .await?;
        if reply.status == StatusCode::OK.as_u16() {
            lock(&self.small).put(key, reply.clone(), Instant::now());
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
