//! The one single-flight mechanism: concurrent requests for the same key share one upstream
//! call. What followers share is the flight's handle: for a blob download, the download
//! itself (`streams::InFlight`, teed to every reader while it streams); for tag resolutions,
//! manifest GETs and HEADs, the call's result (`Outcome`).
//!
//! The work runs in its own task, so a client that goes away does not cancel it for the
//! others. The key is released when the work ends and only then is its outcome published: a
//! request arriving after the end starts afresh (and finds in the store whatever the work
//! kept) instead of joining a finished flight. Nothing is cached here.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

use super::{lock, CacheError};

type Map<K, H> = Arc<Mutex<HashMap<K, H>>>;

pub struct SingleFlight<K, H> {
    map: Map<K, H>,
    /// Flights ended so far (counted under the map's lock as each key is released).
    ended: Arc<AtomicU64>,
    /// Flights in progress at once: past it a new one is refused ([`CacheError::Busy`])
    /// until one ends; joining one in progress always works. The work goes on when its
    /// callers leave, so without a bound a client could start flights faster than they end.
    limit: usize,
}

/// Blob downloads in progress at once: each holds a spool (two descriptors), an upstream
/// connection and up to 1 MiB of recent bytes (`streams::Recent`).
pub const MAX_DOWNLOADS: usize = 512;

/// Upstream calls of every other kind in progress at once (tag resolutions, manifest GETs,
/// HEADs, authorization checks): an upstream connection and a small answer each.
pub const MAX_CALLS: usize = 4096;

/// For upstream calls: [`MAX_CALLS`] at once.
impl<K, H> Default for SingleFlight<K, H> {
    fn default() -> Self {
        Self::new(MAX_CALLS)
    }
}

impl<K, H> SingleFlight<K, H> {
    pub fn new(limit: usize) -> Self {
        Self {
            map: Arc::new(Mutex::new(HashMap::new())),
            ended: Arc::default(),
            limit,
        }
    }
}

impl<K, H> std::fmt::Debug for SingleFlight<K, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight")
            .field("in_flight", &lock(&self.map).len())
            .finish()
    }
}

/// Removes the key when the work ends, including by panic or runtime shutdown.
struct Release<K: Hash + Eq, H> {
    map: Map<K, H>,
    ended: Arc<AtomicU64>,
    key: K,
}

impl<K: Hash + Eq, H> Drop for Release<K, H> {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        self.ended.fetch_add(1, Ordering::Release);
        map.remove(&self.key);
    }
}

/// Whether a caller started the work or joined one in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Joined,
}

impl<K, H> SingleFlight<K, H>
where
    K: Hash + Eq + Clone + Send + 'static,
    H: Clone + Send + 'static,
{
    /// The handle of the flight in progress for `key`, if any.
    pub fn get(&self, key: &K) -> Option<H> {
        lock(&self.map).get(key).cloned()
    }

    /// How many flights have ended: taken before a caller looks for what a flight keeps
    /// (the store), and given to [`Self::join_or_start_since`].
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Acquire)
    }

    /// Join the flight for `key`, or start one: `start` runs under the map's lock (so one
    /// caller starts) and gives the handle followers share and the work. The work's output is
    /// the publication of its outcome, run once the key is released.
    pub fn join_or_start<W, P>(
        &self,
        key: K,
        start: impl FnOnce() -> (H, W),
    ) -> Result<(H, Role), CacheError>
    where
        W: Future<Output = P> + Send + 'static,
        P: FnOnce() + Send + 'static,
    {
        let map = lock(&self.map);
        if let Some(h) = map.get(&key) {
            return Ok((h.clone(), Role::Joined));
        }
        self.start(map, key, start)
    }

    /// [`Self::join_or_start`], except that with no flight in progress for `key` and some
    /// flight ended after `since` (a value of [`Self::ended`]), nothing starts: `None`. The
    /// flight for `key` may have come and gone between the caller's looks, and what it kept
    /// is to be looked for again rather than fetched twice.
    pub fn join_or_start_since<W, P>(
        &self,
        key: K,
        since: u64,
        start: impl FnOnce() -> (H, W),
    ) -> Result<Option<(H, Role)>, CacheError>
    where
        W: Future<Output = P> + Send + 'static,
        P: FnOnce() + Send + 'static,
    {
        let map = lock(&self.map);
        if let Some(h) = map.get(&key) {
            return Ok(Some((h.clone(), Role::Joined)));
        }
        if self.ended.load(Ordering::Acquire) != since {
            return Ok(None);
        }
        self.start(map, key, start).map(Some)
    }

    /// Start the flight for `key` (not in `map`, whose lock the caller holds), unless
    /// [`Self::limit`] flights are in progress.
    fn start<W, P>(
        &self,
        mut map: std::sync::MutexGuard<'_, HashMap<K, H>>,
        key: K,
        start: impl FnOnce() -> (H, W),
    ) -> Result<(H, Role), CacheError>
    where
        W: Future<Output = P> + Send + 'static,
        P: FnOnce() + Send + 'static,
    {
        if map.len() >= self.limit {
            return Err(CacheError::Busy);
        }
        let (handle, work) = start();
        let release = Release {
            map: self.map.clone(),
            ended: self.ended.clone(),
            key: key.clone(),
        };
        map.insert(key, handle.clone());
        // The task cannot remove the key before it is inserted: we hold the lock.
        tokio::spawn(async move {
            let publish = work.await;
            drop(release);
            publish();
        });
        Ok((handle, Role::Leader))
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The shared result of a call (tag resolution, manifest GET, HEAD).
pub type Outcome<T> = Shared<BoxFuture<'static, Result<T, CacheError>>>;

impl<K, T> SingleFlight<K, Outcome<T>>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Run `make()` for `key`, or wait for the run already in progress for it.
    pub async fn run<F, Fut>(&self, key: K, make: F) -> (Result<T, CacheError>, Role)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, CacheError>> + Send + 'static,
    {
        let started = self.join_or_start(key, || {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let work = make();
            let outcome = async move {
                rx.await.unwrap_or_else(|_| {
                    Err(CacheError::Internal(
                        "upstream call ended without an answer".into(),
                    ))
                })
            }
            .boxed()
            .shared();
            let work = async move {
                let r = work.await;
                move || {
                    // Every follower may have left: nobody to tell.
                    let _ = tx.send(r);
                }
            };
            (outcome, work)
        });
        match started {
            Ok((outcome, role)) => (outcome.await, role),
            Err(busy) => (Err(busy), Role::Leader),
        }
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
        let sf = Arc::new(SingleFlight::<TagKey, Outcome<TagRecord>>::default());
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
        let sf = Arc::new(SingleFlight::<TagKey, Outcome<TagRecord>>::default());
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

    /// Past its limit a new flight is refused until one ends, while joining one in
    /// progress still works: the work outlives its callers, so starting must be bounded.
    #[tokio::test]
    async fn past_the_limit_a_new_flight_is_refused_and_joining_still_works() {
        let sf = Arc::new(SingleFlight::<TagKey, Outcome<TagRecord>>::new(2));
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let mut running = Vec::new();
        for tag in ["1", "2"] {
            let (sf, calls, gate) = (sf.clone(), calls.clone(), gate.clone());
            running.push(tokio::spawn(async move {
                sf.run(key(tag), || upstream(&calls, &gate, Ok(record())))
                    .await
            }));
        }
        while sf.len() < 2 {
            tokio::task::yield_now().await;
        }
        let (refused, _) = sf.run(key("3"), || async { Ok(record()) }).await;
        assert!(matches!(refused, Err(CacheError::Busy)), "{refused:?}");
        let joiner = {
            let sf = sf.clone();
            tokio::spawn(async move { sf.run(key("1"), || async { Ok(record()) }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.notify_waiters();
        for t in running {
            assert_eq!(t.await.unwrap().0.unwrap(), record());
        }
        let (joined, role) = joiner.await.unwrap();
        assert_eq!((joined.unwrap(), role), (record(), Role::Joined));
        // Both ended: room again.
        let (r, role) = sf.run(key("3"), || async { Ok(record()) }).await;
        assert_eq!((r.unwrap(), role), (record(), Role::Leader));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
