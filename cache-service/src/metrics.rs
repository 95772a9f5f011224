//! Prometheus text metrics from plain atomics.

use registry_rules::oci_error::ErrorCode;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Counters labelled by registry (a configured upstream's name) and one more fixed label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// `result` = allowed | denied | not_found | unavailable.
    AuthorizationChecks,
    /// No second label.
    AuthorizationCacheHits,
    /// `status` = 2xx | 3xx | 4xx | 5xx (the token service's) | refused | unavailable.
    TokenRelays,
}

impl Family {
    const ALL: [Family; 3] = [
        Family::AuthorizationChecks,
        Family::AuthorizationCacheHits,
        Family::TokenRelays,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::AuthorizationChecks => "regmirror_authorization_checks_total",
            Family::AuthorizationCacheHits => "regmirror_authorization_cache_hits_total",
            Family::TokenRelays => "regmirror_token_relays_total",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Family::AuthorizationChecks => {
                "Clients' credentials tried at the upstream before serving (client_auth = upstream), by result."
            }
            Family::AuthorizationCacheHits => {
                "Requests served on a client's authorization decided within authorization_ttl_seconds."
            }
            Family::TokenRelays => {
                "Client token requests relayed to the upstream's realm, by the answer's status class (refused: not the upstream's realm)."
            }
        }
    }

    /// The second label's name, if any.
    fn label(self) -> Option<&'static str> {
        match self {
            Family::AuthorizationChecks => Some("result"),
            Family::AuthorizationCacheHits => None,
            Family::TokenRelays => Some("status"),
        }
    }
}

/// Label sets kept; registry names come from the configuration, so this is only reached
/// after very many reloads renaming upstreams (further sets count under registry "other").
const MAX_LABEL_SETS: usize = 1024;

/// `regmirror_errors_total{code=...}`: one counter per OCI code, in [`ErrorCode::ALL`]'s order.
const ERROR_COUNTERS: usize = ErrorCode::ALL.len();

/// Levels of the bounded structures, read when the page is rendered.
#[derive(Debug, Default)]
pub struct Gauges {
    /// The store answered its last readiness check (what `/readyz` says).
    pub store_ready: bool,
    /// The last reload was refused and no later one put in force.
    pub config_refused: bool,
    pub store_bytes: u64,
    pub inflight: usize,
    pub pass_through_bytes: u64,
    pub pass_through_rejections: u64,
    pub small_cache_entries: usize,
    pub small_cache_bytes: u64,
    pub small_cache_evictions: u64,
    pub token_cache_entries: usize,
    pub token_cache_evictions: u64,
    pub authorization_decisions: usize,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub hits: AtomicU64,
    /// Hits answered with a presigned URL of the bucket object (`redirect = true`).
    pub store_redirects: AtomicU64,
    pub misses: AtomicU64,
    pub stale_served: AtomicU64,
    pub bytes_from_cache: AtomicU64,
    /// Of those, bytes the socket took straight from the page cache (`sendfile`).
    pub bytes_sendfile: AtomicU64,
    pub bytes_from_upstream: AtomicU64,
    pub upstream_fetches: AtomicU64,
    pub coalesced_waiters: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub store_write_errors: AtomicU64,
    pub verify_failures: AtomicU64,
    /// Configuration reloads put in force / refused (invalid file, restart-only change).
    pub config_reloads: AtomicU64,
    pub config_reload_failures: AtomicU64,
    errors: [AtomicU64; ERROR_COUNTERS],
    labeled: Mutex<BTreeMap<(Family, String, &'static str), u64>>,
}

impl Metrics {
    pub fn add_cache_bytes(&self, n: u64) {
        self.bytes_from_cache.fetch_add(n, Relaxed);
    }
    pub fn add_upstream_bytes(&self, n: u64) {
        self.bytes_from_upstream.fetch_add(n, Relaxed);
    }
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
    pub fn error(&self, code: ErrorCode) {
        let i = ErrorCode::ALL.iter().position(|c| *c == code);
        if let Some(c) = i.and_then(|i| self.errors.get(i)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Count one event of `family` for `registry` (`label`: the family's second label's value).
    pub fn count(&self, family: Family, registry: &str, label: &'static str) {
        let mut m = crate::lock(&self.labeled);
        let mut key = (family, registry.to_owned(), label);
        if m.len() >= MAX_LABEL_SETS && !m.contains_key(&key) {
            key.1 = "other".to_owned();
        }
        *m.entry(key).or_default() += 1;
    }

    fn render_labeled(&self, s: &mut String) {
        let m = crate::lock(&self.labeled);
        for family in Family::ALL {
            let name = family.name();
            let _ = writeln!(s, "# HELP {name} {}\n# TYPE {name} counter", family.help());
            for ((_, registry, label), v) in m.iter().filter(|((f, _, _), _)| *f == family) {
                let registry = registry.replace(['\\', '"', '\n'], "_");
                match family.label() {
                    Some(l) => {
                        let _ =
                            writeln!(s, "{name}{{registry=\"{registry}\",{l}=\"{label}\"}} {v}");
                    }
                    None => {
                        let _ = writeln!(s, "{name}{{registry=\"{registry}\"}} {v}");
                    }
                }
            }
        }
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "regmirror_cache_hits_total",
            "Requests answered from the cache.",
            self.hits.load(Relaxed),
        );
        counter(
            "regmirror_store_redirects_total",
            "Blob hits answered with a 307 to a presigned URL of the bucket object (redirect = true).",
            self.store_redirects.load(Relaxed),
        );
        counter(
            "regmirror_cache_misses_total",
            "Requests that needed upstream content.",
            self.misses.load(Relaxed),
        );
        counter(
            "regmirror_stale_served_total",
            "Tags served from cache because upstream failed.",
            self.stale_served.load(Relaxed),
        );
        counter(
            "regmirror_bytes_from_cache_total",
            "Body bytes served from stored blobs.",
            self.bytes_from_cache.load(Relaxed),
        );
        counter(
            "regmirror_bytes_sendfile_total",
            "Stored blob bytes sent from the page cache with sendfile (plain HTTP/1.1 connections), no copy through regmirror's memory.",
            self.bytes_sendfile.load(Relaxed),
        );
        counter(
            "regmirror_bytes_from_upstream_total",
            "Body bytes served from in-progress downloads.",
            self.bytes_from_upstream.load(Relaxed),
        );
        counter(
            "regmirror_upstream_fetches_total",
            "Content downloads started from upstreams.",
            self.upstream_fetches.load(Relaxed),
        );
        counter(
            "regmirror_coalesced_waiters_total",
            "Requests that joined a download already in progress.",
            self.coalesced_waiters.load(Relaxed),
        );
        counter(
            "regmirror_evictions_total",
            "Blobs evicted to respect max_size.",
            self.evictions.load(Relaxed),
        );
        counter(
            "regmirror_evicted_bytes_total",
            "Bytes evicted to respect max_size.",
            self.evicted_bytes.load(Relaxed),
        );
        counter(
            "regmirror_store_write_errors_total",
            "Downloads not cached because writing failed (e.g. disk full).",
            self.store_write_errors.load(Relaxed),
        );
        counter(
            "regmirror_verify_failures_total",
            "Downloads whose digest or length did not verify.",
            self.verify_failures.load(Relaxed),
        );
        counter(
            "regmirror_config_reloads_total",
            "Configuration reloads put in force (SIGHUP or the config file changed).",
            self.config_reloads.load(Relaxed),
        );
        counter(
            "regmirror_config_reload_failures_total",
            "Configuration reloads refused; the running configuration was kept.",
            self.config_reload_failures.load(Relaxed),
        );
        counter(
            "regmirror_pass_through_rejections_total",
            "Downloads failed because the pass-through memory (max_pass_through_memory) was spent.",
            g.pass_through_rejections,
        );
        counter(
            "regmirror_small_cache_evictions_total",
            "Live tags-list/referrers answers dropped to keep the small cache in bounds.",
            g.small_cache_evictions,
        );
        counter(
            "regmirror_token_cache_evictions_total",
            "Live upstream tokens dropped to keep the token caches in bounds.",
            g.token_cache_evictions,
        );
        self.render_labeled(&mut s);
        let _ = writeln!(s, "# HELP regmirror_errors_total Error responses by OCI code.\n# TYPE regmirror_errors_total counter");
        for (code, c) in ErrorCode::ALL.iter().zip(self.errors.iter()) {
            let _ = writeln!(
                s,
                "regmirror_errors_total{{code=\"{}\"}} {}",
                code.as_str(),
                c.load(Relaxed)
            );
        }
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "regmirror_config_reload_refused",
            "1 while the config file's last change was refused (the previous configuration runs), 0 once one is put in force.",
            u64::from(g.config_refused),
        );
        gauge(
            "regmirror_store_ready",
            "1 while the store answers (as /readyz says), 0 while requests pass through to upstreams.",
            u64::from(g.store_ready),
        );
        gauge(
            "regmirror_store_bytes",
            "Bytes of blobs and manifests stored.",
            g.store_bytes,
        );
        gauge(
            "regmirror_inflight_downloads",
            "Downloads in progress.",
            g.inflight as u64,
        );
        gauge(
            "regmirror_pass_through_bytes",
            "Download bytes held in memory because the disk could not take them.",
            g.pass_through_bytes,
        );
        gauge(
            "regmirror_small_cache_entries",
            "Tags-list/referrers answers cached.",
            g.small_cache_entries as u64,
        );
        gauge(
            "regmirror_small_cache_bytes",
            "Body bytes of the cached tags-list/referrers answers.",
            g.small_cache_bytes,
        );
        gauge(
            "regmirror_token_cache_entries",
            "Upstream tokens cached (all upstreams).",
            g.token_cache_entries as u64,
        );
        gauge(
            "regmirror_authorization_decisions",
            "Clients' authorization decisions held (all upstreams; expired ones until pushed out).",
            g.authorization_decisions as u64,
        );
        s
    }
}
