//! The byte streams a blob answer is made of: an in-flight download teed to every client that
//! joined it (see `single_flight`), and a stored blob.
//!
//! The download task writes the upstream body into the store's writer (hashing as it goes)
//! and publishes progress through a `watch` channel. Readers share the writer's spool reader
//! and read up to the published watermark, so they keep working after the write is committed
//! (or dropped). If the spool's disk fills up, later bytes are kept in memory (`tail`) so the
//! attached clients are still served, and nothing is cached.
//!
//! Readers never send the final byte of a body of known length, or of a range, before the
//! download verified: if the digest does not match, the stream ends with an error instead,
//! which aborts the HTTP response (the client sees a cut connection, never a complete-looking
//! body).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use super::lru::PinGuard;
use super::CacheError;
use crate::metrics::Metrics;
use crate::oci;
use crate::store::{ByteStream, SpoolReader, StoredBlob};

/// Bytes a reader behind the download takes from the spool at once, copied: for a body known
/// to be small enough to be a manifest.
const READ_CHUNK: u64 = 256 * 1024;
/// The same as a mapped window: for a larger body or one of unknown length (its bytes only go
/// to a socket, which `sendfile`s them from the page cache; see `store::mapped`).
const MAPPED_CHUNK: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Default)]
pub struct FlightState {
    /// `None` until upstream answered; then the body length if upstream sent one.
    pub started: Option<Option<u64>>,
    /// Bytes received from upstream.
    pub received: u64,
    /// Bytes of those readable from the spool.
    pub on_disk: u64,
    /// Final outcome: `Ok` only after the digest verified.
    pub done: Option<Result<(), CacheError>>,
}

/// Memory all downloads together may hold for bytes the disk could not take.
#[derive(Debug, Default)]
pub struct MemoryBudget {
    /// Changes on a reload; bytes already taken stay taken.
    limit: AtomicU64,
    used: AtomicU64,
    rejections: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            limit: AtomicU64::new(limit),
            ..Default::default()
        }
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Relaxed);
    }

    /// Reserve `n` bytes; `false` (counted as a rejection) when that would pass the limit.
    fn take(&self, n: u64) -> bool {
        let ok = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit.load(Relaxed))
            })
            .is_ok();
        if !ok {
            self.rejections.fetch_add(1, Relaxed);
        }
        ok
    }

    fn give(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| Some(u.saturating_sub(n)));
    }

    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    pub fn rejections(&self) -> u64 {
        self.rejections.load(Relaxed)
    }
}

/// Bytes of a download kept in memory after the disk failed, charged to a shared budget
/// until the download (and every reader of it) is gone.
#[derive(Debug, Default)]
pub struct Tail {
    pub start: u64,
    pub chunks: Vec<Bytes>,
    pub len: u64,
    budget: Option<Arc<MemoryBudget>>,
}

impl Tail {
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        Self {
            start: 0,
            chunks: Vec::new(),
            len: 0,
            budget: Some(budget),
        }
    }

    /// Keep `chunk`; `false` when the budget is spent (the download must fail).
    pub fn push(&mut self, chunk: Bytes) -> bool {
        let n = chunk.len() as u64;
        if let Some(b) = &self.budget {
            if !b.take(n) {
                return false;
            }
        }
        self.len += n;
        self.chunks.push(chunk);
        true
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give(self.len);
        }
    }
}

/// The bytes of a download most recently written to its spool, kept in memory so that
/// readers keeping up with the download take them as they are (no read back from the spool,
/// no copy); a reader further behind reads the spool.
#[derive(Debug, Default)]
pub struct Recent {
    start: u64,
    chunks: std::collections::VecDeque<Bytes>,
    len: u64,
}

/// Bytes a download keeps in [`Recent`] beyond its last chunk (per download, in memory).
const RECENT_BYTES: u64 = 1024 * 1024;

impl Recent {
    /// `chunk` was written to the spool at `pos`.
    pub fn push(&mut self, pos: u64, chunk: Bytes) {
        if pos != self.start + self.len {
            // Not contiguous (never, for one writer): start over.
            self.chunks.clear();
            (self.start, self.len) = (pos, 0);
        }
        self.len += chunk.len() as u64;
        self.chunks.push_back(chunk);
        while self.len > RECENT_BYTES + self.chunks.back().map_or(0, |c| c.len() as u64) {
            let Some(old) = self.chunks.pop_front() else {
                break;
            };
            self.start += old.len() as u64;
            self.len -= old.len() as u64;
        }
    }

    fn read(&self, pos: u64, max: u64) -> Option<Bytes> {
        slice_at(self.start, self.chunks.iter(), pos, max)
    }
}

/// Up to `max` bytes at `pos` from `chunks`, which hold the bytes from `start` on.
fn slice_at<'a>(
    start: u64,
    chunks: impl Iterator<Item = &'a Bytes>,
    pos: u64,
    max: u64,
) -> Option<Bytes> {
    if pos < start {
        return None;
    }
    let mut off = start;
    for c in chunks {
        let clen = c.len() as u64;
        if pos < off + clen {
            let from = usize::try_from(pos - off).ok()?;
            let to = usize::try_from(std::cmp::min(clen, pos - off + max)).ok()?;
            return Some(c.slice(from..to));
        }
        off += clen;
    }
    None
}

#[derive(Debug)]
pub struct InFlight {
    pub(super) spool: Option<SpoolReader>,
    pub(super) state: watch::Receiver<FlightState>,
    pub(super) tail: Mutex<Tail>,
    pub(super) recent: Mutex<Recent>,
}

impl InFlight {
    /// Wait until upstream answered: `Ok(Some(len))`/`Ok(None)` (unknown length) or the error.
    pub async fn started(&self) -> Result<Option<u64>, CacheError> {
        let mut rx = self.state.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                if let Some(Err(e)) = &s.done {
                    return Err(e.clone());
                }
                if let Some(len) = s.started {
                    return Ok(len);
                }
                if let Some(Ok(())) = &s.done {
                    return Ok(Some(s.received));
                }
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::Internal("download task vanished".into()));
            }
        }
    }

    fn read_tail(&self, pos: u64, max: u64) -> Option<Bytes> {
        let tail = super::lock(&self.tail);
        slice_at(tail.start, tail.chunks.iter(), pos, max)
    }

    /// Up to `max` bytes at `pos` if the spool holds them: from memory while they are
    /// recent, else read back, or `mapped` (bytes below the watermark never change).
    async fn read_spooled(&self, pos: u64, max: u64, mapped: bool) -> io::Result<Bytes> {
        if let Some(b) = super::lock(&self.recent).read(pos, max) {
            return Ok(b);
        }
        match &self.spool {
            Some(f) if mapped => f.map_at(pos, max).await,
            Some(f) => f.read_at(pos, max).await,
            None => Err(io::Error::other("no spool")),
        }
    }
}

/// Stream bytes `[start, end)` (`end = None`: to the end of the body) of an in-flight download.
pub fn reader(
    flight: Arc<InFlight>,
    start: u64,
    end: Option<u64>,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let rx = flight.state.clone();
    futures::stream::unfold(
        (flight, rx, start, false),
        move |(flight, mut rx, pos, finished)| {
            let metrics = metrics.clone();
            async move {
                if finished {
                    return None;
                }
                loop {
                    let s = rx.borrow_and_update().clone();
                    if let Some(Err(e)) = &s.done {
                        let err = io::Error::other(format!("upstream download failed: {e}"));
                        return Some((Err(err), (flight, rx, pos, true)));
                    }
                    let verified = matches!(s.done, Some(Ok(())));
                    let body_len = s.started.flatten().or(verified.then_some(s.received));
                    let limit = match (end, body_len) {
                        (Some(e), _) => Some(e),
                        (None, l) => l,
                    };
                    if limit.is_some_and(|l| pos >= l) && verified {
                        return None;
                    }
                    // Hold back the last byte of a known-length body, or of a range, until
                    // verified: a range's client cannot check the digest of what it got, so
                    // a complete-looking 206 must not carry bytes the download then rejects.
                    let mut avail = s.received;
                    if let Some(l) = limit {
                        let l = if verified { l } else { l.saturating_sub(1) };
                        avail = std::cmp::min(avail, l);
                    }
                    if pos < avail {
                        let mapped = body_len.is_none_or(|l| l > oci::MAX_MANIFEST_BYTES as u64);
                        let chunk_len = if mapped { MAPPED_CHUNK } else { READ_CHUNK };
                        let want = std::cmp::min(chunk_len, avail - pos);
                        let chunk = if pos < s.on_disk {
                            let want = std::cmp::min(want, s.on_disk - pos);
                            flight.read_spooled(pos, want, mapped).await
                        } else {
                            flight
                                .read_tail(pos, want)
                                .ok_or_else(|| io::Error::other("bytes not available"))
                        };
                        return match chunk {
                            Ok(b) if !b.is_empty() => {
                                metrics.add_upstream_bytes(b.len() as u64);
                                let next = pos + b.len() as u64;
                                Some((Ok(b), (flight, rx, next, false)))
                            }
                            Ok(_) => Some((
                                Err(io::Error::other("spool shorter than watermark")),
                                (flight, rx, pos, true),
                            )),
                            Err(e) => Some((Err(e), (flight, rx, pos, true))),
                        };
                    }
                    if rx.changed().await.is_err() {
                        let err = io::Error::other("download task vanished");
                        return Some((Err(err), (flight, rx, pos, true)));
                    }
                }
            }
        },
    )
}

/// A verified stored blob, as a blob answer holds it: pinned (never evicted by this replica)
/// until its stream is dropped.
pub struct StoredBody {
    blob: Box<dyn StoredBlob>,
    pin: PinGuard,
    metrics: Arc<Metrics>,
}

impl StoredBody {
    pub(super) fn new(blob: Box<dyn StoredBlob>, pin: PinGuard, metrics: Arc<Metrics>) -> Self {
        Self { blob, pin, metrics }
    }

    pub fn size(&self) -> u64 {
        self.blob.size()
    }

    /// Bytes `[start, end)`.
    pub fn range(self, start: u64, end: u64) -> ByteStream {
        let Self { blob, pin, metrics } = self;
        blob.range(start, end)
            .inspect(move |c| {
                let _held = &pin;
                if let Ok(b) = c {
                    metrics.add_cache_bytes(b.len() as u64);
                }
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::io::Write;

    #[test]
    fn recent_bytes_are_bounded_and_sliced_where_asked() {
        let mut r = Recent::default();
        let chunk = |b: u8, n: usize| Bytes::from(vec![b; n]);
        let k = 256 * 1024;
        for i in 0..8u8 {
            r.push(u64::from(i) * k as u64, chunk(i, k));
        }
        // 1 MiB plus the last chunk stay: chunks 3..=7.
        assert_eq!((r.start, r.len), (3 * k as u64, 5 * k as u64));
        assert_eq!(r.read(0, 10), None, "dropped: read back from the spool");
        let got = r.read(3 * k as u64 + 5, 1 << 20).unwrap();
        assert_eq!((got.len(), got[0]), (k - 5, 3), "one chunk's rest at most");
        assert_eq!(r.read(8 * k as u64, 1), None, "not written yet");
        // A chunk bigger than the window is still kept whole while it is the last one.
        r.push(8 * k as u64, chunk(9, 4 << 20));
        assert_eq!(r.read(8 * k as u64 + 7, 3).as_deref(), Some(&[9u8; 3][..]));
        // A gap (never from one writer) starts over rather than serve wrong offsets.
        r.push(100 << 20, chunk(1, 10));
        assert_eq!((r.start, r.len), (100 << 20, 10));
    }

    fn setup() -> (
        tempfile::NamedTempFile,
        Arc<InFlight>,
        watch::Sender<FlightState>,
    ) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let file = SpoolReader::of(std::fs::File::open(tmp.path()).unwrap());
        let (tx, rx) = watch::channel(FlightState::default());
        let f = Arc::new(InFlight {
            spool: Some(file),
            state: rx,
            tail: Mutex::new(Tail::default()),
            recent: Mutex::default(),
        });
        (tmp, f, tx)
    }

    async fn next_within(
        s: &mut (impl Stream<Item = io::Result<Bytes>> + Unpin),
    ) -> Option<Option<io::Result<Bytes>>> {
        tokio::time::timeout(std::time::Duration::from_millis(100), s.next())
            .await
            .ok()
    }

    /// The next chunk of `r`, asserting that it is a mapped window of the spool.
    async fn next_mapped(r: &mut (impl Stream<Item = io::Result<Bytes>> + Unpin)) -> Bytes {
        let c = next_within(r)
            .await
            .expect("bytes below the watermark")
            .unwrap()
            .unwrap();
        assert!(
            crate::store::mapped::region_of(c.as_ptr(), c.len()).is_some(),
            "a mapped window of the spool"
        );
        c
    }

    /// A blob's body behind the download is read as mapped windows of the spool while the
    /// download still appends to it, never past the watermark, and its last byte still waits
    /// for the verification.
    #[tokio::test]
    async fn a_blob_behind_the_download_is_read_as_mapped_windows_below_the_watermark() {
        let (mut tmp, f, tx) = setup();
        let len = oci::MAX_MANIFEST_BYTES + 2 * MAPPED_CHUNK as usize + 5;
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut r = Box::pin(reader(f.clone(), 0, None, Arc::new(Metrics::default())));
        tx.send_modify(|s| s.started = Some(Some(len as u64)));
        let half = len / 2;
        tmp.write_all(&body[..half]).unwrap();
        tx.send_modify(|s| (s.received, s.on_disk) = (half as u64, half as u64));
        let first = next_mapped(&mut r).await;
        let mut got = first.to_vec();
        while got.len() < half {
            got.extend_from_slice(&next_mapped(&mut r).await);
        }
        assert_eq!(got.len(), half, "nothing past the watermark");
        assert!(
            next_within(&mut r).await.is_none(),
            "waits at the watermark"
        );
        // The download appends while a window of the bytes before is still mapped.
        tmp.write_all(&body[half..]).unwrap();
        tx.send_modify(|s| (s.received, s.on_disk) = (len as u64, len as u64));
        while got.len() < len - 1 {
            got.extend_from_slice(&next_mapped(&mut r).await);
        }
        assert_eq!(got.len(), len - 1, "the last byte held back");
        assert!(next_within(&mut r).await.is_none(), "until verified");
        tx.send_modify(|s| s.done = Some(Ok(())));
        got.extend_from_slice(&next_mapped(&mut r).await);
        assert!(got == body, "the spool's bytes, in order");
        assert!(
            first[..] == body[..first.len()],
            "a live window unchanged by the appends"
        );
        assert!(next_within(&mut r).await.unwrap().is_none(), "ended");
    }

    #[tokio::test]
    async fn holds_back_last_byte_until_verified() {
        let (mut tmp, f, tx) = setup();
        let m = Arc::new(Metrics::default());
        let mut r = Box::pin(reader(f.clone(), 0, None, m.clone()));
        tx.send_modify(|s| s.started = Some(Some(10)));
        tmp.write_all(b"0123456789").unwrap();
        tmp.flush().unwrap();
        tx.send_modify(|s| {
            s.received = 10;
            s.on_disk = 10;
        });
        let first = next_within(&mut r).await.unwrap().unwrap().unwrap();
        assert_eq!(&first[..], b"012345678", "last byte held back");
        assert!(
            next_within(&mut r).await.is_none(),
            "waits for verification"
        );
        tx.send_modify(|s| s.done = Some(Ok(())));
        let last = next_within(&mut r).await.unwrap().unwrap().unwrap();
        assert_eq!(&last[..], b"9");
        assert!(
            next_within(&mut r).await.unwrap().is_none(),
            "ends after verified"
        );

        // So is the last byte of a range that stops before the end.
        let (mut tmp, f, tx) = setup();
        let mut r = Box::pin(reader(f.clone(), 2, Some(5), m.clone()));
        tx.send_modify(|s| s.started = Some(Some(10)));
        tmp.write_all(b"0123456789").unwrap();
        tx.send_modify(|s| {
            s.received = 10;
            s.on_disk = 10;
        });
        let b = next_within(&mut r).await.unwrap().unwrap().unwrap();
        assert_eq!(&b[..], b"23");
        assert!(
            next_within(&mut r).await.is_none(),
            "waits for verification"
        );
        tx.send_modify(|s| s.done = Some(Ok(())));
        let last = next_within(&mut r).await.unwrap().unwrap().unwrap();
        assert_eq!(&last[..], b"4");
        assert!(next_within(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn failure_aborts_readers() {
        let (mut tmp, f, tx) = setup();
        let m = Arc::new(Metrics::default());
        let mut r = Box::pin(reader(f.clone(), 0, None, m));
        tx.send_modify(|s| s.started = Some(Some(10)));
        tmp.write_all(b"01234").unwrap();
        tx.send_modify(|s| {
            s.received = 5;
            s.on_disk = 5;
        });
        assert_eq!(
            &next_within(&mut r).await.unwrap().unwrap().unwrap()[..],
            b"01234"
        );
        tx.send_modify(|s| s.done = Some(Err(CacheError::DigestMismatch("x".into()))));
        assert!(next_within(&mut r).await.unwrap().unwrap().is_err());
        assert!(next_within(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn tail_after_disk_full() {
        let (mut tmp, f, tx) = setup();
        let m = Arc::new(Metrics::default());
        tmp.write_all(b"abc").unwrap();
        {
            let mut t = lock_tail(&f);
            t.start = 3;
            assert!(t.push(Bytes::from_static(b"def")));
        }
        tx.send_modify(|s| {
            s.started = Some(None);
            s.received = 6;
            s.on_disk = 3;
            s.done = Some(Ok(()));
        });
        let all: Vec<u8> = reader(f, 0, None, m)
            .map(|c| c.unwrap())
            .collect::<Vec<_>>()
            .await
            .concat();
        assert_eq!(all, b"abcdef");
    }

    #[tokio::test]
    async fn stored_body_is_pinned_while_streamed() {
        use crate::store::BlobStore;
        let m = Arc::new(Metrics::default());
        let lru = Arc::new(Mutex::new(super::super::lru::Lru::default()));
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::fs::FsStore::new(dir.path()).unwrap();
        let data = Bytes::from(vec![3u8; 3 << 20]);
        let d = registry_rules::digest::Digest::of_bytes(&data);
        let mut w = store.begin_write(&d).await.unwrap();
        w.write(&[data]).await.unwrap();
        w.commit(&d, None).await.unwrap();
        let blob = store.open(&d).await.unwrap().unwrap();
        let body = StoredBody::new(blob, super::super::lru::PinGuard::new(&lru, &d), m.clone());
        let mut s = body.range(5, 3 << 20);
        let first = s.next().await.unwrap().unwrap();
        assert!(
            super::super::lock(&lru).is_pinned(&d),
            "pinned while streamed"
        );
        let rest: Vec<Bytes> = s.map(|c| c.unwrap()).collect().await;
        assert_eq!(
            first.len() + rest.iter().map(Bytes::len).sum::<usize>(),
            (3 << 20) - 5
        );
        assert!(
            !super::super::lock(&lru).is_pinned(&d),
            "unpinned when done"
        );
        assert_eq!(m.bytes_from_cache.load(Relaxed), (3 << 20) - 5);
    }

    #[test]
    fn memory_budget_is_global_and_returned() {
        let budget = Arc::new(MemoryBudget::new(10));
        let mut a = Tail::new(budget.clone());
        let mut b = Tail::new(budget.clone());
        assert!(a.push(Bytes::from_static(b"123456")));
        assert!(
            !b.push(Bytes::from_static(b"12345")),
            "6 + 5 > 10 across downloads"
        );
        assert!(b.push(Bytes::from_static(b"1234")));
        assert_eq!((budget.used(), budget.rejections()), (10, 1));
        drop(a);
        assert_eq!(
            budget.used(),
            4,
            "a finished download gives its memory back"
        );
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    fn lock_tail(f: &InFlight) -> std::sync::MutexGuard<'_, Tail> {
        super::super::lock(&f.tail)
    }
}
