//! Single-flight for small upstream calls (tag resolution, manifest GETs, HEADs): concurrent
//! callers with the same key share one computation and its result.
//!
//! The computation runs in its own task, so a client that goes away does not cancel it for the
//! others, and the key is released as soon as it finishes (results are not cached here: what
//! should be remembered is written to the store by the computation itself).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

use super::{lock, CacheError};

type Slot<T> = Shared<BoxFuture<'static, Result<T, CacheError>>>;
type Map<K, T> = Arc<Mutex<HashMap<K, Slot<T>>>>;

pub struct SingleFlight<K, T> {
    map: Map<K, T>,
}

impl<K, T> Default for SingleFlight<K, T> {
    fn default() -> Self {
        Self {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, T> std::fmt::Debug for SingleFlight<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight")
            .field("in_flight", &lock(&self.map).len())
            .finish()
    }
}

/// Removes the key when the computation ends, including by panic or runtime shutdown.
struct Release<K: Hash + Eq, T> {
    map: Map<K, T>,
    key: K,
}

impl<K: Hash + Eq, T> Drop for Release<K, T> {
    fn drop(&mut self) {
        lock(&self.map).remove(&self.key);
    }
}

/// Whether a caller started the computation or joined one in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Joined,
}

impl<K, T> SingleFlight<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Run `make()` for `key`, or wait for the run already in progress for it.
    pub async fn run<F, Fut>(&self, key: K, make: F) -> (Result<T, CacheError>, Role)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, CacheError>> + Send + 'static,
    {
        let (fut, role) = {
            let mut map = lock(&self.map);
            if let Some(f) = map.get(&key) {
                (f.clone(), Role::Joined)
            } else {
                let work = make();
                let release = Release {
                    map: self.map.clone(),
                    key: key.clone(),
                };
                // The task cannot remove the key before it is inserted: we hold the lock.
                let task = tokio::spawn(async move {
                    let _release = release;
                    work.await
                });
                let f = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(CacheError::Internal(format!("upstream call failed: {e}")))
                    })
                }
                .boxed()
                .shared();
                map.insert(key, f.clone());
                (f, Role::Leader)
            }
        };
        (fut.await, role)
    }

    /// Calls in progress.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TagRecord;
    use registry_rules::digest::Digest;
    use registry_rules::names::{RepositoryName, Tag};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::Notify;

    type TagKey = (String, RepositoryName, Tag);

    fn key(tag: &str) -> TagKey {
        (
            "docker.io".to_owned(),
            RepositoryName::parse("library/alpine").unwrap(),
            Tag::parse(tag).unwrap(),
        )
    }

    fn record() -> TagRecord {
        TagRecord {
            digest: Digest::of_bytes(b"manifest"),
            media_type: crate::oci::MT_OCI_INDEX.to_owned(),
            size: 8,
            fetched_at: 1,
        }
    }

    /// A stand-in for the upstream HEAD: counts calls and blocks until released.
    fn upstream(
        calls: &Arc<AtomicUsize>,
        gate: &Arc<Notify>,
        answer: Result<TagRecord, CacheError>,
    ) -> impl Future<Output = Result<TagRecord, CacheError>> + Send + 'static {
        let calls = calls.clone();
        let gate = gate.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            answer
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_tag_lookups_share_one_upstream_call() {
        const N: usize = 32;
        let sf = Arc::new(SingleFlight::<TagKey, TagRecord>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..N {
            let (sf, calls, gate) = (sf.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                sf.run(key("3.20"), || upstream(&calls, &gate, Ok(record())))
                    .await
            }));
        }
        // Every lookup is attached before the upstream answers.
        while sf.is_empty() || calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Another tag is a separate call.
        let other = sf.run(key("latest"), || async { Ok(record()) }).await;
        assert_eq!(other.1, Role::Leader);
        gate.notify_one();
        let mut leaders = 0;
        for t in tasks {
            let (r, role) = t.await.unwrap();
            assert_eq!(r.unwrap(), record());
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one upstream call for N lookups"
        );
        assert_eq!(leaders, 1);
        assert_eq!(sf.len(), 0, "key released when done");

        // Released: the next lookup (after the TTL, say) asks upstream again.
        let gate2 = Arc::new(Notify::new());
        gate2.notify_one();
        let (r, role) = sf
            .run(key("3.20"), || upstream(&calls, &gate2, Ok(record())))
            .await;
        assert!(r.is_ok());
        assert_eq!(role, Role::Leader);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn errors_are_shared_and_callers_may_leave() {
        let sf = Arc::new(SingleFlight::<TagKey, TagRecord>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        // The first caller gives up (client disconnected): the call goes on for the others.
        let first = {
            let (sf, calls, gate) = (sf.clone(), calls.clone(), gate.clone());
            tokio::spawn(async move {
                sf.run(key("3.20"), || {
                    upstream(&calls, &gate, Err(CacheError::UpstreamStatus(503)))
                })
                .await
            })
        };
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        first.abort();
        let _ = first.await;
        let second = {
            let sf = sf.clone();
            tokio::spawn(async move {
                sf.run(key("3.20"), || async {
                    Err(CacheError::Internal(
                        "must join the call in progress".into(),
                    ))
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.notify_one();
        let (r, role) = second.await.unwrap();
        assert_eq!(role, Role::Joined);
        assert!(matches!(r, Err(CacheError::UpstreamStatus(503))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(sf.len(), 0);
    }
}
