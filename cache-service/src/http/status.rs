//! `GET /_status` (and `/`): a plain HTML page for operators — cache fill, hit ratio, bytes
//! served, top repositories, upstream health. No JavaScript, no external assets; every
//! dynamic string is HTML-escaped (repository names come from clients).

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::cache::Cache;
use crate::reload::ConfigState;

/// Repositories tracked at most; the rest are folded in with the Space-Saving algorithm
/// (the least-counted entry is replaced and the newcomer inherits its count), so heavy
/// hitters stay visible with bounded memory.
pub const MAX_TRACKED: usize = 1000;
/// Repositories shown.
pub const TOP_N: usize = 10;

/// Approximate request counts per repository, bounded.
#[derive(Debug, Default)]
pub struct TopCounter {
    counts: HashMap<String, u64>,
}

impl TopCounter {
    pub fn record(&mut self, key: &str, cap: usize) {
        if let Some(c) = self.counts.get_mut(key) {
            *c += 1;
            return;
        }
        if self.counts.len() >= cap {
            let min = self
                .counts
                .iter()
                .min_by_key(|(_, c)| **c)
                .map(|(k, c)| (k.clone(), *c));
            if let Some((k, c)) = min {
                self.counts.remove(&k);
                self.counts.insert(key.to_owned(), c + 1);
                return;
            }
        }
        self.counts.insert(key.to_owned(), 1);
    }

    /// The `n` largest, ties by name.
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.counts.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    pub fn tracked(&self) -> usize {
        self.counts.len()
    }
}

/// In-memory state behind the status page.
#[derive(Debug)]
pub struct StatusState {
    started: Instant,
    repos: Mutex<TopCounter>,
}

impl Default for StatusState {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            repos: Mutex::new(TopCounter::default()),
        }
    }
}

impl StatusState {
    /// Count one request for `registry/name`.
    pub fn record_request(&self, registry: &str, name: &str) {
        let key = format!("{registry}/{name}");
        crate::lock(&self.repos).record(&key, MAX_TRACKED);
    }
}

/// Upstream health as shown.
#[derive(Debug, Clone)]
pub struct UpstreamRow {
    pub name: String,
    pub url: String,
    pub last_success: Option<SystemTime>,
    pub last_failure: Option<SystemTime>,
    pub last_error: Option<String>,
}

/// Everything the page shows, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: String,
    /// The configuration in force, and why the last reload was refused (if it was).
    pub config_version: String,
    pub config_refusal: Option<String>,
    pub uptime_secs: u64,
    pub now: Option<SystemTime>,
    pub store_bytes: u64,
    pub max_size: u64,
    pub entries: usize,
    pub inflight: usize,
    pub hits: u64,
    pub misses: u64,
    pub stale_served: u64,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
    pub upstream_fetches: u64,
    pub coalesced_waiters: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    pub verify_failures: u64,
    pub store_write_errors: u64,
    pub top: Vec<(String, u64)>,
    pub tracked: usize,
    pub upstreams: Vec<UpstreamRow>,
}

impl Snapshot {
    pub fn read(cache: &Cache, st: &StatusState, config: &ConfigState) -> Self {
        let m = &cache.metrics;
        let (top, tracked) = {
            let r = crate::lock(&st.repos);
            (r.top(TOP_N), r.tracked())
        };
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_version: config.current().version.to_string(),
            config_refusal: config.refusal(),
            uptime_secs: st.started.elapsed().as_secs(),
            now: Some(SystemTime::now()),
            store_bytes: cache.store_bytes(),
            max_size: cache.max_size(),
            entries: cache.entries(),
            inflight: cache.inflight(),
            hits: m.hits.load(Relaxed),
            misses: m.misses.load(Relaxed),
            stale_served: m.stale_served.load(Relaxed),
            bytes_from_cache: m.bytes_from_cache.load(Relaxed),
            bytes_from_upstream: m.bytes_from_upstream.load(Relaxed),
            upstream_fetches: m.upstream_fetches.load(Relaxed),
            coalesced_waiters: m.coalesced_waiters.load(Relaxed),
            evictions: m.evictions.load(Relaxed),
            evicted_bytes: m.evicted_bytes.load(Relaxed),
            verify_failures: m.verify_failures.load(Relaxed),
            store_write_errors: m.store_write_errors.load(Relaxed),
            top,
            tracked,
            upstreams: cache
                .upstreams()
                .values()
                .map(|u| {
                    let h = u.health();
                    UpstreamRow {
                        name: u.name.clone(),
                        url: u.base_url().to_string(),
                        last_success: h.last_success,
                        last_failure: h.last_failure,
                        last_error: h.last_error,
                    }
                })
                .collect(),
        }
    }
}

/// HTML-escape text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `part / whole` in percent; `None` when `whole` is 0 (no traffic yet, no limit).
pub fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

fn pct_text(p: Option<f64>) -> String {
    match p {
        Some(p) => format!("{p:.1}%"),
        None => "–".to_owned(),
    }
}

fn bytes(n: u64) -> String {
    crate::tools::warm::human_bytes(n)
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn when(t: Option<SystemTime>, now: Option<SystemTime>) -> String {
    match t {
        None => "never".to_owned(),
        Some(t) => {
            let ago = now
                .and_then(|n| n.duration_since(t).ok())
                .map(|d| format!(" ({} ago)", duration(d.as_secs())))
                .unwrap_or_default();
            format!("{}{ago}", httpdate::fmt_http_date(t))
        }
    }
}

/// A horizontal bar, `p` in percent (clamped).
fn bar(p: Option<f64>, class: &str) -> String {
    let w = p.unwrap_or(0.0).clamp(0.0, 100.0);
    format!("<div class=\"bar\"><div class=\"{class}\" style=\"width:{w:.1}%\"></div></div>")
}

const CSS: &str = "body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#1d2330;background:#f6f7f9}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:0 0 10px;color:#3a4356}\
.sub{color:#6b7385;margin-bottom:18px}\
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:16px;margin-bottom:16px}\
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 16px}\
.big{font-size:26px;font-weight:600}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2;vertical-align:top}\
th{color:#6b7385;font-weight:500}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
.bar{background:#e8ebf0;border-radius:4px;height:10px;overflow:hidden;margin:6px 0}\
.fill{background:#3d7be0;height:100%}.fill.hit{background:#2e9e5b}.fill.warn{background:#e0a03d}\
.ok{color:#2e9e5b;font-weight:600}.bad{color:#c8372d;font-weight:600}.idle{color:#6b7385}\
.err{color:#c8372d;word-break:break-all}code{font-size:13px}";

/// The page.
pub fn render(s: &Snapshot) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>regmirror status</title><style>{CSS}</style></head><body>\
<h1>regmirror cache</h1><div class=\"sub\">version {} · config {} · up {} · counters since start</div>",
        esc(&s.version),
        esc(&s.config_version),
        duration(s.uptime_secs)
    );
    if let Some(why) = &s.config_refusal {
        let _ = write!(
            h,
            "<div class=\"card err\">Last configuration reload refused (config {} still in force): {}</div>",
            esc(&s.config_version),
            esc(why)
        );
    }

    // Storage
    let fill = percent(s.store_bytes, s.max_size);
    let limit = if s.max_size == 0 {
        "unlimited".to_owned()
    } else {
        format!("{} ({} bytes)", bytes(s.max_size), s.max_size)
    };
    h.push_str("<div class=\"grid\"><div class=\"card\"><h2>Storage</h2>");
    let _ = write!(
        h,
        "<div class=\"big\">{}</div><div>{} bytes of {limit}</div>",
        bytes(s.store_bytes),
        s.store_bytes
    );
    if s.max_size > 0 {
        let class = if fill.unwrap_or(0.0) >= 90.0 {
            "fill warn"
        } else {
            "fill"
        };
        let _ = write!(h, "{}<div>{} full</div>", bar(fill, class), pct_text(fill));
    }
    let _ = write!(
        h,
        "<table><tr><td>entries (blobs + manifests)</td><td class=\"n\">{}</td></tr>\
<tr><td>downloads in progress</td><td class=\"n\">{}</td></tr>\
<tr><td>evictions</td><td class=\"n\">{} ({})</td></tr></table></div>",
        s.entries,
        s.inflight,
        s.evictions,
        bytes(s.evicted_bytes)
    );

    // Hit ratio
    let requests = s.hits.saturating_add(s.misses);
    let ratio = percent(s.hits, requests);
    let _ = write!(
        h,
        "<div class=\"card\"><h2>Hit ratio</h2><div class=\"big\">{}</div>{}\
<table><tr><td>hits</td><td class=\"n\">{}</td></tr>\
<tr><td>misses</td><td class=\"n\">{}</td></tr>\
<tr><td>stale tags served (upstream failing)</td><td class=\"n\">{}</td></tr>\
<tr><td>upstream fetches</td><td class=\"n\">{}</td></tr>\
<tr><td>coalesced waiters</td><td class=\"n\">{}</td></tr></table></div>",
        pct_text(ratio),
        bar(ratio, "fill hit"),
        s.hits,
        s.misses,
        s.stale_served,
        s.upstream_fetches,
        s.coalesced_waiters
    );

    // Bytes served
    let served = s.bytes_from_cache.saturating_add(s.bytes_from_upstream);
    let from_cache = percent(s.bytes_from_cache, served);
    let _ = write!(
        h,
        "<div class=\"card\"><h2>Bytes served</h2><div class=\"big\">{}</div>{}\
<table><tr><td>from cache</td><td class=\"n\">{} ({})</td></tr>\
<tr><td>from upstream (while downloading)</td><td class=\"n\">{} ({})</td></tr>\
<tr><td>digest/length verify failures</td><td class=\"n\">{}</td></tr>\
<tr><td>store write errors</td><td class=\"n\">{}</td></tr></table></div></div>",
        bytes(served),
        bar(from_cache, "fill hit"),
        bytes(s.bytes_from_cache),
        pct_text(from_cache),
        bytes(s.bytes_from_upstream),
        pct_text(percent(s.bytes_from_upstream, served)),
        s.verify_failures,
        s.store_write_errors
    );

    // Top repositories
    let _ = write!(
        h,
        "<div class=\"grid\"><div class=\"card\"><h2>Top repositories by requests</h2>"
    );
    if s.top.is_empty() {
        h.push_str("<div class=\"idle\">no requests yet</div>");
    } else {
        h.push_str("<table><tr><th>#</th><th>repository</th><th class=\"n\">requests</th></tr>");
        for (i, (repo, n)) in s.top.iter().enumerate() {
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td class=\"n\">{n}</td></tr>",
                i + 1,
                esc(repo)
            );
        }
        h.push_str("</table>");
    }
    let _ = write!(
        h,
        "<div class=\"idle\">{} tracked (at most {MAX_TRACKED}; counts approximate past that)</div></div>",
        s.tracked
    );

    // Upstreams
    h.push_str("<div class=\"card\"><h2>Upstreams</h2>");
    if s.upstreams.is_empty() {
        h.push_str("<div class=\"idle\">none configured</div>");
    } else {
        h.push_str(
            "<table><tr><th>upstream</th><th>state</th><th>last success / failure</th></tr>",
        );
        for u in &s.upstreams {
            let (class, state) = match (u.last_success, u.last_failure) {
                (None, None) => ("idle", "no calls yet"),
                (Some(_), None) => ("ok", "ok"),
                (None, Some(_)) => ("bad", "failing"),
                (Some(ok), Some(bad)) if ok >= bad => ("ok", "ok"),
                _ => ("bad", "failing"),
            };
            let _ = write!(
                h,
                "<tr><td><b>{}</b><br><code>{}</code></td><td class=\"{class}\">{state}</td>\
<td>✓ {}<br>✗ {}",
                esc(&u.name),
                esc(&u.url),
                esc(&when(u.last_success, s.now)),
                esc(&when(u.last_failure, s.now))
            );
            if let Some(e) = &u.last_error {
                let _ = write!(h, "<br><span class=\"err\">{}</span>", esc(e));
            }
            h.push_str("</td></tr>");
        }
        h.push_str("</table>");
    }
    h.push_str(
        "</div></div><div class=\"sub\">Prometheus metrics: <a href=\"/metrics\">/metrics</a> · \
<a href=\"/healthz\">/healthz</a> · <a href=\"/readyz\">/readyz</a></div></body></html>\n",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn escaping() {
        assert_eq!(
            esc("<script>alert('x')&\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;)&amp;&quot;&lt;/script&gt;"
        );
        let s = Snapshot {
            top: vec![("test/<img src=x onerror=alert(1)>".into(), 3)],
            tracked: 1,
            upstreams: vec![UpstreamRow {
                name: "a&b".into(),
                url: "https://x/\"><b>".into(),
                last_success: None,
                last_failure: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1)),
                last_error: Some("<oops>".into()),
            }],
            ..Snapshot::default()
        };
        let page = render(&s);
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<oops>"));
        assert!(!page.contains("\"><b>"));
        assert!(page.contains("test/&lt;img src=x onerror=alert(1)&gt;"));
        assert!(page.contains("a&amp;b"));
        assert!(page.contains("&lt;oops&gt;"));
        let page = render(&Snapshot {
            config_version: "3-0123456789ab".into(),
            config_refusal: Some("parsing <cache.toml>".into()),
            ..Snapshot::default()
        });
        assert!(page.contains("config 3-0123456789ab"), "{page}");
        assert!(page.contains("reload refused") && page.contains("&lt;cache.toml&gt;"));
        assert!(page.contains("failing"));
        assert!(!page.contains("<script"));
    }

    #[test]
    fn zero_traffic() {
        assert_eq!(percent(0, 0), None);
        assert_eq!(percent(1, 4), Some(25.0));
        let page = render(&Snapshot::default());
        assert!(!page.contains("NaN"), "{page}");
        assert!(!page.contains("inf"));
        assert!(page.contains("unlimited"));
        assert!(page.contains("no requests yet"));
        assert!(page.contains("none configured"));
        assert!(page.contains("width:0.0%"));
    }

    #[test]
    fn numbers() {
        let s = Snapshot {
            store_bytes: 750,
            max_size: 1000,
            hits: 3,
            misses: 1,
            bytes_from_cache: 1,
            bytes_from_upstream: 3,
            ..Snapshot::default()
        };
        let page = render(&s);
        assert!(page.contains("75.0% full"), "{page}");
        assert!(page.contains(">75.0%</div>"), "hit ratio: {page}");
        assert!(page.contains("1 B (25.0%)"));
        assert!(page.contains("3 B (75.0%)"));
        // Over the limit (possible while pinned blobs are served): bar clamped.
        let page = render(&Snapshot {
            store_bytes: 2000,
            max_size: 1000,
            ..Snapshot::default()
        });
        assert!(page.contains("200.0% full") && page.contains("width:100.0%"));
    }

    #[test]
    fn top_counter_bounded() {
        let mut t = TopCounter::default();
        for _ in 0..5 {
            t.record("hot", 3);
        }
        t.record("b", 3);
        t.record("c", 3);
        t.record("d", 3); // replaces b or c (count 1) and inherits it
        assert_eq!(t.tracked(), 3);
        let top = t.top(2);
        assert_eq!(top[0], ("hot".to_owned(), 5));
        assert_eq!(top[1].1, 2);
        assert_eq!(top[1].0, "d");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m 5s");
        assert_eq!(duration(3700), "1h 1m");
        assert_eq!(duration(90000), "1d 1h 0m");
    }
}

/// The Grafana dashboard shipped in envoy/grafana/ only queries metrics `/metrics` exports.
#[cfg(test)]
mod dashboard_tests {
    const DASHBOARD: &str = include_str!("../../../envoy/grafana/regmirror-dashboard.json");
    const ALERTS: &str = include_str!("../../../envoy/prometheus/regmirror-alerts.yaml");

    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }

    fn names(expr: &str, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = expr;
        while let Some(i) = rest.find(prefix) {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
        out
    }

    /// What /metrics exports, by metric name.
    fn exported() -> std::collections::BTreeSet<String> {
        crate::metrics::Metrics::default()
            .render(&crate::metrics::Gauges::default())
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    /// The shipped alerting rules are Prometheus rule groups whose cache metrics exist.
    #[test]
    fn alerts_are_rule_groups_on_exported_metrics() {
        let v: serde_yaml::Value = serde_yaml::from_str(ALERTS).expect("valid YAML");
        let rules = v["groups"][0]["rules"].as_sequence().expect("rules");
        assert!(rules.len() >= 6, "{rules:?}");
        let exported = exported();
        for rule in rules {
            let (alert, expr) = (rule["alert"].as_str(), rule["expr"].as_str());
            let (Some(alert), Some(expr)) = (alert, expr) else {
                panic!("a rule without alert or expr: {rule:?}")
            };
            assert!(rule["annotations"]["summary"].is_string(), "{alert}");
            for n in names(expr, "regmirror_") {
                assert!(
                    exported.contains(&n),
                    "{alert} uses {n}, which /metrics does not export"
                );
            }
        }
        assert!(ALERTS.contains("regmirror_store_ready == 0"));
    }

    #[test]
    fn dashboard_is_valid_and_uses_exported_metrics() {
        let v: serde_json::Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
        let vars = v["templating"]["list"].as_array().unwrap();
        assert!(vars
            .iter()
            .any(|t| t["name"] == "datasource" && t["type"] == "datasource"));
        let mut all = Vec::new();
        exprs(&v, &mut all);
        assert!(all.len() >= 10, "{all:?}");
        let exported = exported();
        let mut used = std::collections::BTreeSet::new();
        for e in &all {
            for n in names(e, "regmirror_") {
                assert!(
                    exported.contains(&n),
                    "dashboard uses {n}, which /metrics does not export ({exported:?})"
                );
                used.insert(n);
            }
        }
        for m in [
            "regmirror_cache_hits_total",
            "regmirror_cache_misses_total",
            "regmirror_bytes_from_cache_total",
            "regmirror_bytes_from_upstream_total",
            "regmirror_upstream_fetches_total",
            "regmirror_coalesced_waiters_total",
            "regmirror_evictions_total",
            "regmirror_errors_total",
            "regmirror_store_bytes",
        ] {
            assert!(used.contains(m), "dashboard has no panel for {m}");
        }
        // The filter's counters on the dashboard: tests/tests/pull_through_filter.rs checks
        // them against a real Envoy's /stats/prometheus.
    }
}
