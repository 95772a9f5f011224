//! The filter's counters: counted inside the VM, handed to Envoy's stats on the root
//! context's tick (a host call costs more than the filter's own work on a request, see
//! bench/RESULTS.md).

use crate::rules::route::RejectReason;
use crate::rules::CompiledConfig;
use log::{debug, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::Cell;
use std::time::Duration;

/// How often each VM hands its counted events to Envoy's stats.
pub const FLUSH_PERIOD: Duration = Duration::from_secs(1);

/// One Envoy counter and what this VM counted since the last flush.
struct BatchedCounter {
    id: u32,
    pending: Cell<i64>,
}

impl BatchedCounter {
    fn define(name: &str) -> Option<Self> {
        match hostcalls::define_metric(MetricType::Counter, name) {
            Ok(id) => Some(BatchedCounter {
                id,
                pending: Cell::new(0),
            }),
            Err(e) => {
                warn!("cannot define metric {name}: {e:?}");
                None
            }
        }
    }

    fn add(&self, n: usize) {
        if let Ok(n) = i64::try_from(n) {
            self.pending.set(self.pending.get().saturating_add(n));
        }
    }

    fn flush(&self) {
        let n = self.pending.take();
        if n > 0 {
            if let Err(e) = hostcalls::increment_metric(self.id, n) {
                debug!("cannot increment metric {}: {e:?}", self.id);
            }
        }
    }
}

/// The fixed counters, indexed by [`Counter`].
const COUNTERS: [&str; 7] = [
    "mirror_challenges_rewritten",
    "mirror_challenges_rejected",
    "mirror_redirects_signed",
    "mirror_redirects_unsigned",
    "mirror_redirects_followed",
    "mirror_auth_requests",
    "mirror_rejections",
];

/// Index into [`COUNTERS`].
#[derive(Clone, Copy)]
pub enum Counter {
    ChallengesRewritten = 0,
    ChallengesRejected = 1,
    RedirectsSigned = 2,
    RedirectsUnsigned = 3,
    RedirectsFollowed = 4,
    AuthRequests = 5,
    Rejections = 6,
}

/// The filter's counters, defined once per VM.
#[derive(Default)]
pub struct Metrics {
    /// `(registry name, counter)` in configuration order (a handful: a scan beats hashing).
    requests: Vec<(String, BatchedCounter)>,
    /// By [`Counter`] index.
    named: [Option<BatchedCounter>; COUNTERS.len()],
    /// By position in [`RejectReason::ALL`].
    rejections: Vec<(RejectReason, BatchedCounter)>,
}

impl Metrics {
    pub fn define(cfg: &CompiledConfig) -> Self {
        let mut m = Metrics::default();
        for r in cfg.registries() {
            let name = format!("mirror_requests_{}", r.metric_name);
            if let Some(c) = BatchedCounter::define(&name) {
                m.requests.push((r.name.clone(), c));
            }
        }
        for (slot, name) in m.named.iter_mut().zip(COUNTERS) {
            *slot = BatchedCounter::define(name);
        }
        for r in RejectReason::ALL {
            let name = format!("mirror_rejections_{}", r.as_str());
            if let Some(c) = BatchedCounter::define(&name) {
                m.rejections.push((r, c));
            }
        }
        m
    }

    pub fn inc(&self, c: Counter, n: usize) {
        if let Some(Some(counter)) = self.named.get(c as usize) {
            counter.add(n);
        }
    }

    pub fn request(&self, registry: &str) {
        if let Some((_, c)) = self.requests.iter().find(|(name, _)| name == registry) {
            c.add(1);
        }
    }

    pub fn rejection(&self, reason: RejectReason) {
        self.inc(Counter::Rejections, 1);
        if let Some((_, c)) = self.rejections.iter().find(|(r, _)| *r == reason) {
            c.add(1);
        }
    }

    pub fn flush(&self) {
        let requests = self.requests.iter().map(|(_, c)| c);
        let rejections = self.rejections.iter().map(|(_, c)| c);
        for c in requests
            .chain(self.named.iter().flatten())
            .chain(rejections)
        {
            c.flush();
        }
    }
}
