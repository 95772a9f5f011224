//! Size accounting and least-recently-used eviction order, with pins: a pinned digest (being
//! served or fetched) is never chosen as a victim.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use registry_rules::digest::Digest;

/// Entries by digest plus an index ordered by last access, so choosing victims walks the
/// oldest entries only (it runs under the cache's lock on every download).
#[derive(Debug, Default)]
pub struct Lru {
    entries: HashMap<Digest, (u64, u64)>, // size, last-access tick
    order: BTreeSet<(u64, Digest)>,
    pins: HashMap<Digest, usize>,
    total: u64,
    /// Bytes downloads in progress are writing to disk (see [`Reservation`]).
    reserved: u64,
    tick: u64,
}

impl Lru {
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Stored blobs and manifests.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// Register a stored blob (idempotent: a blob shared by repositories is counted once).
    /// `order` lets startup seed the order from file times; `None` means "now".
    pub fn insert(&mut self, d: &Digest, size: u64, order: Option<u64>) {
        self.tick += 1;
        let t = order.unwrap_or(self.tick);
        if let Some((old, old_t)) = self.entries.insert(d.clone(), (size, t)) {
            self.total -= old;
            self.order.remove(&(old_t, d.clone()));
        }
        self.order.insert((t, d.clone()));
        self.total += size;
    }

    /// Size of a registered digest.
    pub fn size(&self, d: &Digest) -> Option<u64> {
        self.entries.get(d).map(|e| e.0)
    }

    pub fn touch(&mut self, d: &Digest) {
        self.tick += 1;
        let t = self.tick;
        if let Some(e) = self.entries.get_mut(d) {
            self.order.remove(&(e.1, d.clone()));
            e.1 = t;
            self.order.insert((t, d.clone()));
        }
    }

    pub fn remove(&mut self, d: &Digest) {
        if let Some((size, t)) = self.entries.remove(d) {
            self.total -= size;
            self.order.remove(&(t, d.clone()));
        }
    }

    pub fn pin(&mut self, d: &Digest) {
        *self.pins.entry(d.clone()).or_default() += 1;
    }

    pub fn unpin(&mut self, d: &Digest) {
        if let Some(n) = self.pins.get_mut(d) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(d);
            }
        }
    }

    pub fn is_pinned(&self, d: &Digest) -> bool {
        self.pins.contains_key(d)
    }

    /// Choose and forget victims until `incoming` more bytes fit under `max` (0 = unlimited)
    /// beside what is stored and what downloads have reserved. Pinned entries are skipped, so
    /// the result may not free enough.
    pub fn victims(&mut self, incoming: u64, max: u64) -> Vec<(Digest, u64)> {
        if max == 0 {
            return Vec::new();
        }
        let mut chosen = Vec::new();
        let mut freed: u64 = 0;
        let held = self.total.saturating_add(self.reserved);
        for (_, d) in &self.order {
            if held.saturating_sub(freed).saturating_add(incoming) <= max {
                break;
            }
            if self.pins.contains_key(d) {
                continue;
            }
            if let Some((size, _)) = self.entries.get(d) {
                freed += size;
                chosen.push((d.clone(), *size));
            }
        }
        for (d, _) in &chosen {
            self.remove(d);
        }
        chosen
    }
}

/// Disk bytes a download is writing, counted against the size bound until dropped (the
/// download then either stored them, counted as a blob, or removed them).
#[derive(Debug)]
pub struct Reservation {
    lru: Arc<Mutex<Lru>>,
    bytes: u64,
}

impl Reservation {
    pub fn new(lru: &Arc<Mutex<Lru>>) -> Self {
        Self {
            lru: lru.clone(),
            bytes: 0,
        }
    }

    /// Reserve `incoming` more bytes; returns the victims to delete to make room for them.
    pub fn grow(&mut self, incoming: u64, max: u64) -> Vec<(Digest, u64)> {
        let mut lru = super::lock(&self.lru);
        let victims = lru.victims(incoming, max);
        lru.reserved = lru.reserved.saturating_add(incoming);
        self.bytes = self.bytes.saturating_add(incoming);
        victims
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut lru = super::lock(&self.lru);
        lru.reserved = lru.reserved.saturating_sub(self.bytes);
    }
}

/// Keeps a digest pinned until dropped.
#[derive(Debug)]
pub struct PinGuard {
    lru: Arc<Mutex<Lru>>,
    digest: Digest,
}

impl PinGuard {
    pub fn new(lru: &Arc<Mutex<Lru>>, digest: &Digest) -> Self {
        super::lock(lru).pin(digest);
        Self {
            lru: lru.clone(),
            digest: digest.clone(),
        }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        super::lock(&self.lru).unpin(&self.digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of_bytes(&[n])
    }

    #[test]
    fn evicts_least_recent_first_and_skips_pins() {
        let mut l = Lru::default();
        l.insert(&d(1), 10, None);
        l.insert(&d(2), 10, None);
        l.insert(&d(3), 10, None);
        l.insert(&d(3), 10, None); // shared blob: counted once
        assert_eq!(l.total(), 30);
        l.touch(&d(1)); // 2 is now the oldest
        l.pin(&d(2));
        let v = l.victims(10, 30);
        assert_eq!(v, vec![(d(3), 10)], "2 is pinned, 3 is next oldest");
        assert_eq!(l.total(), 20);
        l.unpin(&d(2));
        assert!(!l.is_pinned(&d(2)));
        let v = l.victims(25, 30);
        assert_eq!(v, vec![(d(2), 10), (d(1), 10)]);
        assert_eq!(l.total(), 0);
        assert!(l.victims(1000, 0).is_empty(), "0 = unlimited");
    }

    #[test]
    fn order_index_follows_touches_and_removals() {
        let mut l = Lru::default();
        for i in 0..100u8 {
            l.insert(&d(i), 1, None);
        }
        for i in (0..50u8).rev() {
            l.touch(&d(i));
        }
        l.remove(&d(60));
        l.insert(&d(70), 1, None); // re-insert = most recent
        assert_eq!(l.order.len(), l.count());
        let v: Vec<Digest> = l.victims(0, 95).into_iter().map(|(d, _)| d).collect();
        assert_eq!(
            v,
            vec![d(50), d(51), d(52), d(53)],
            "oldest untouched first"
        );
        assert_eq!(l.total(), 95);
    }

    #[test]
    fn reservations_count_until_dropped() {
        let lru = Arc::new(Mutex::new(Lru::default()));
        super::super::lock(&lru).insert(&d(1), 400, None);
        super::super::lock(&lru).insert(&d(2), 400, None);
        let mut a = Reservation::new(&lru);
        assert_eq!(a.grow(600, 1000), vec![(d(1), 400)], "400 + 600 fit");
        let mut b = Reservation::new(&lru);
        assert_eq!(b.grow(300, 1000), vec![(d(2), 400)], "a's 600 count");
        assert!(b.grow(100, 1000).is_empty(), "600 + 400 fit");
        drop(a);
        super::super::lock(&lru).insert(&d(3), 500, None);
        assert!(b.grow(100, 1000).is_empty(), "500 + 400 + 100");
        drop(b);
        assert_eq!(super::super::lock(&lru).reserved, 0, "all given back");
    }

    #[test]
    fn pin_guard() {
        let lru = Arc::new(Mutex::new(Lru::default()));
        super::super::lock(&lru).insert(&d(1), 5, None);
        {
            let _g = PinGuard::new(&lru, &d(1));
            let _g2 = PinGuard::new(&lru, &d(1));
            assert!(super::super::lock(&lru).victims(100, 10).is_empty());
        }
        assert_eq!(super::super::lock(&lru).victims(100, 10).len(), 1);
    }
}
