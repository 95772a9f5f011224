//! proxy-wasm HTTP filter of the registry mirror.
//!
//! All decisions live in [`rules`] (plain Rust, unit-tested on the host); this file
//! is the thin glue to the proxy-wasm host: read headers, call `rules`, apply.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod rules;

use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use rules::challenge::rewrite_realms;
use rules::redirect::{credential_fingerprint, rewrite_location, LocationOutcome, SignParams};
use rules::route::{route, Decision, ForwardKind, RejectReason, Request};
use rules::CompiledConfig;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// Shared-data key holding the per-Envoy signing key.
pub const SIGNING_KEY_SHARED_DATA: &str = "mirror.signing_key";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(MirrorRoot::default()) });
}}

/// Counter ids, defined once per VM.
#[derive(Default)]
struct Metrics {
    requests: HashMap<String, u32>,
    named: HashMap<&'static str, u32>,
    rejections: HashMap<&'static str, u32>,
}

const COUNTERS: [&str; 7] = [
    "mirror_challenges_rewritten",
    "mirror_challenges_rejected",
    "mirror_redirects_signed",
    "mirror_redirects_unsigned",
    "mirror_redirects_followed",
    "mirror_auth_requests",
    "mirror_rejections",
];

fn define(name: &str) -> Option<u32> {
    match hostcalls::define_metric(MetricType::Counter, name) {
        Ok(id) => Some(id),
        Err(e) => {
            warn!("cannot define metric {name}: {e:?}");
            None
        }
    }
}

impl Metrics {
    fn define(cfg: &CompiledConfig) -> Self {
        let mut m = Metrics::default();
        for r in cfg.registries() {
            if let Some(id) = define(&format!("mirror_requests_{}", r.metric_name)) {
                m.requests.insert(r.name.clone(), id);
            }
        }
        for c in COUNTERS {
            if let Some(id) = define(c) {
                m.named.insert(c, id);
            }
        }
        for r in RejectReason::ALL {
            if let Some(id) = define(&format!("mirror_rejections_{}", r.as_str())) {
                m.rejections.insert(r.as_str(), id);
            }
        }
        m
    }

    fn add(id: Option<&u32>, n: usize) {
        if let (Some(&id), Ok(n)) = (id, i64::try_from(n)) {
            if n > 0 {
                let _ = hostcalls::increment_metric(id, n);
            }
        }
    }

    fn inc(&self, name: &'static str, n: usize) {
        Self::add(self.named.get(name), n);
    }

    fn request(&self, registry: &str) {
        Self::add(self.requests.get(registry), 1);
    }

    fn rejection(&self, reason: RejectReason) {
        self.inc("mirror_rejections", 1);
        Self::add(self.rejections.get(reason.as_str()), 1);
    }
}

struct Shared {
    cfg: CompiledConfig,
    metrics: Metrics,
}

impl Shared {
    /// The configured key, else the per-Envoy key from shared data (read each
    /// time so every worker uses whatever value won the start-up race).
    fn signing_key(&self) -> Vec<u8> {
        if let Some(k) = &self.cfg.signing_key {
            return k.clone();
        }
        match hostcalls::get_shared_data(SIGNING_KEY_SHARED_DATA) {
            Ok((Some(v), _)) => v,
            _ => Vec::new(),
        }
    }
}

/// Makes sure a shared signing key exists; true when one is readable afterwards.
fn ensure_shared_key() -> bool {
    let read = || {
        matches!(hostcalls::get_shared_data(SIGNING_KEY_SHARED_DATA),
            Ok((Some(v), _)) if v.len() >= rules::redirect::MIN_KEY_LEN)
    };
    if read() {
        return true;
    }
    let mut buf = [0u8; 32];
    if let Err(e) = getrandom::getrandom(&mut buf) {
        warn!("cannot generate a signing key: {e}");
        return false;
    }
    // Another worker may have won the race; either way read back what is stored.
    if let Err(e) = hostcalls::set_shared_data(SIGNING_KEY_SHARED_DATA, Some(&buf), Some(0)) {
        debug!("signing key already set by another VM ({e:?})");
    }
    read()
}

#[derive(Default)]
struct MirrorRoot {
    shared: Option<Rc<Shared>>,
}

impl Context for MirrorRoot {}

impl RootContext for MirrorRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            info!("no plugin configuration, using the built-in registries");
        }
        let cfg = match rules::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                warn!("invalid plugin configuration: {e}");
                return false;
            }
        };
        if cfg.signing_key.is_none() && !ensure_shared_key() {
            warn!("no signing key available; redirects will not be signed");
        }
        let metrics = Metrics::define(&cfg);
        info!(
            "configured {} registries, default {:?}",
            cfg.registries().len(),
            cfg.default_registry().map(|r| r.name.as_str())
        );
        self.shared = Some(Rc::new(Shared { cfg, metrics }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(MirrorHttp {
            shared: self.shared.clone(),
            state: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What the response phase needs from the request phase.
struct ResponseState {
    registry: String,
    mirror_base: String,
    upstream_authority: String,
    upstream_path: String,
    cred: String,
    oci_namespace: Option<String>,
}

struct MirrorHttp {
    shared: Option<Rc<Shared>>,
    state: Option<ResponseState>,
}

impl Context for MirrorHttp {}

fn now_secs(ctx: &dyn Context) -> u64 {
    ctx.get_current_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

enum HeaderError {
    NotUtf8(&'static str),
}

impl MirrorHttp {
    fn req_header(&self, name: &'static str) -> Result<Option<String>, HeaderError> {
        match self.get_http_request_header_bytes(name) {
            None => Ok(None),
            Some(b) => String::from_utf8(b)
                .map(Some)
                .map_err(|_| HeaderError::NotUtf8(name)),
        }
    }

    fn reply(&self, status: u32, headers: &[(String, String)], body: &str) -> Action {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.send_http_response(status, h, Some(body.as_bytes()));
        Action::Pause
    }

    fn fail(&self, status: u32, code: rules::oci_error::ErrorCode, msg: &str) -> Action {
        let body = rules::oci_error::render(code, msg, None);
        let headers = [("content-type".to_string(), "application/json".to_string())];
        self.reply(status, &headers, &body)
    }

    fn rewrite_challenges(&self, shared: &Shared, st: &ResponseState) {
        let Some(reg) = shared.cfg.registry(&st.registry) else {
            return;
        };
        let values: Vec<Vec<u8>> = self
            .get_http_response_headers_bytes()
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
            .map(|(_, v)| v)
            .collect();
        if values.is_empty() {
            return;
        }
        let (mut rewritten, mut rejected) = (0, 0);
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            match String::from_utf8(v) {
                Ok(s) => {
                    let r = rewrite_realms(&s, &reg.realm_hosts, &st.mirror_base);
                    rewritten += r.rewritten;
                    rejected += r.rejected;
                    out.push(r.value.into_bytes());
                }
                Err(e) => {
                    rejected += 1;
                    out.push(e.into_bytes());
                }
            }
        }
        if rewritten > 0 {
            self.set_http_response_header("www-authenticate", None);
            for v in &out {
                self.add_http_response_header_bytes("www-authenticate", v);
            }
        }
        if rejected > 0 {
            info!(
                "{rejected} challenge realm(s) from {} not allowlisted for {}, left alone",
                st.upstream_authority, st.registry
            );
        }
        shared.metrics.inc("mirror_challenges_rewritten", rewritten);
        shared.metrics.inc("mirror_challenges_rejected", rejected);
    }

    fn rewrite_redirect(&self, shared: &Shared, st: &ResponseState) {
        let status = self
            .get_http_response_header_bytes(":status")
            .and_then(|s| String::from_utf8(s).ok())
            .and_then(|s| s.parse::<u32>().ok());
        if !matches!(status, Some(301 | 302 | 303 | 307 | 308)) {
            return;
        }
        let Some(loc) = self.get_http_response_header_bytes("location") else {
            return;
        };
        let Ok(loc) = String::from_utf8(loc) else {
            shared.metrics.inc("mirror_redirects_unsigned", 1);
            info!("non-UTF-8 Location left alone");
            return;
        };
        let key = shared.signing_key();
        let params = SignParams {
            registry: &st.registry,
            base_host: &st.upstream_authority,
            base_path: &st.upstream_path,
            mirror_base: &st.mirror_base,
            cred: &st.cred,
            key: &key,
            now: now_secs(self),
        };
        match rewrite_location(&shared.cfg, &params, &loc) {
            LocationOutcome::Signed(u) => {
                self.set_http_response_header("location", Some(&u));
                shared.metrics.inc("mirror_redirects_signed", 1);
            }
            LocationOutcome::Passthrough => {
                shared.metrics.inc("mirror_redirects_unsigned", 1);
            }
            LocationOutcome::Rejected => {
                shared.metrics.inc("mirror_redirects_unsigned", 1);
                info!(
                    "redirect from {} for {} not signed (host not allowed, not https, or no key): {}",
                    st.upstream_authority,
                    st.registry,
                    loc.chars().take(200).collect::<String>()
                );
            }
        }
    }
}

impl HttpContext for MirrorHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        use rules::oci_error::ErrorCode;
        let Some(shared) = self.shared.clone() else {
            return self.fail(500, ErrorCode::Unsupported, "mirror not configured");
        };
        let headers = (|| -> Result<_, HeaderError> {
            Ok((
                self.req_header(":method")?,
                self.req_header(":authority")?,
                self.req_header(":path")?,
                self.req_header(":scheme")?,
                self.req_header("x-forwarded-proto")?,
                self.req_header("authorization")?,
            ))
        })();
        let (method, authority, path, scheme, xfp, authorization) = match headers {
            Ok(h) => h,
            Err(HeaderError::NotUtf8(name)) => {
                info!("rejected request: header {name} is not UTF-8");
                shared.metrics.rejection(RejectReason::BadRequest);
                return self.fail(400, ErrorCode::Unsupported, "invalid header encoding");
            }
        };
        let method = method.unwrap_or_default();
        let path = path.unwrap_or_default();
        let req = Request {
            method: &method,
            authority: authority.as_deref().unwrap_or_default(),
            path: &path,
            scheme: scheme.as_deref().unwrap_or("http"),
            forwarded_proto: xfp.as_deref(),
            authorization: authorization.as_deref(),
        };
        let key = if path.starts_with(rules::redirect::PREFIX) {
            shared.signing_key()
        } else {
            Vec::new()
        };
        match route(&shared.cfg, &req, &key, now_secs(self)) {
            Decision::Reply(r) => {
                if let Some(reason) = r.reason {
                    shared.metrics.rejection(reason);
                    info!(
                        "{} {} {}: {} ({})",
                        r.status,
                        method,
                        path.chars().take(300).collect::<String>(),
                        reason.as_str(),
                        r.message
                    );
                }
                self.reply(r.status, &r.headers, &r.body)
            }
            Decision::Forward(f) => {
                debug!(
                    "{method} {path} -> {} {} ({})",
                    f.authority, f.path, f.registry
                );
                shared.metrics.request(&f.registry);
                match f.kind {
                    ForwardKind::Auth => shared.metrics.inc("mirror_auth_requests", 1),
                    ForwardKind::Redirect => shared.metrics.inc("mirror_redirects_followed", 1),
                    ForwardKind::Registry => {}
                }
                self.set_http_request_header(":authority", Some(&f.authority));
                self.set_http_request_header(":path", Some(&f.path));
                self.set_http_request_header("x-mirror-registry", None);
                if f.set_registry_header {
                    self.set_http_request_header("x-mirror-registry", Some(&f.registry));
                }
                if f.strip_authorization {
                    self.set_http_request_header("authorization", None);
                }
                self.state = Some(ResponseState {
                    cred: credential_fingerprint(authorization.as_deref()),
                    registry: f.registry,
                    mirror_base: f.mirror_base,
                    upstream_authority: f.authority,
                    upstream_path: f.path,
                    oci_namespace: f.oci_namespace_echo,
                });
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(shared), Some(st)) = (self.shared.as_ref(), self.state.as_ref()) else {
            return Action::Continue;
        };
        self.rewrite_challenges(shared, st);
        self.rewrite_redirect(shared, st);
        if let Some(ns) = &st.oci_namespace {
            self.set_http_response_header("oci-namespace", Some(ns));
        }
        Action::Continue
    }
}
