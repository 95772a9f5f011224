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
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};
use rules::challenge::rewrite_challenges;
use rules::oci_error::ErrorCode;
use rules::redirect::{credential_fingerprint, rewrite_location, LocationOutcome, SignParams};
use rules::route::{
    forward_to_learned, placeholder_token, realm_failure, route_with, Decision, Forward,
    ForwardKind, LearnRealm, RejectReason, Reply, Request,
};
use rules::token::{learn_realm, realm_key, LearnError, LearnedRealm};
use rules::token_host::{self, is_token_host_challenge, TokenHosts};
use rules::CompiledConfig;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// Timeout of the `GET /v2/` the filter sends to learn a registry's realm.
const REALM_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The learned realm of `registry` from shared data, if present and well-formed.
fn stored_realm(registry: &str) -> Option<LearnedRealm> {
    match hostcalls::get_shared_data(&realm_key(registry)) {
        Ok((Some(v), _)) => LearnedRealm::decode(&v),
        _ => None,
    }
}

/// Stores `learned` for `registry` unless that value is already there.
fn store_realm(registry: &str, learned: &LearnedRealm) {
    if stored_realm(registry).as_ref() == Some(learned) {
        return;
    }
    let v = learned.encode();
    match hostcalls::set_shared_data(&realm_key(registry), Some(v.as_bytes()), None) {
        Ok(()) => info!("learned token realm of {registry}: {}", learned.realm),
        Err(e) => warn!("cannot store the token realm of {registry}: {e:?}"),
    }
}

/// [`store_realm`] from a registry's own challenge (every 401): skips the shared-data
/// round trip when this VM already stored or found this very value for `registry`.
fn store_realm_seen(shared: &Shared, registry: &str, learned: LearnedRealm) {
    let Ok(mut seen) = shared.seen_realms.try_borrow_mut() else {
        store_realm(registry, &learned);
        return;
    };
    if let Some((_, l)) = seen.iter().find(|(r, _)| r == registry) {
        if *l == learned {
            return;
        }
    }
    store_realm(registry, &learned);
    match seen.iter_mut().find(|(r, _)| r == registry) {
        Some((_, l)) => *l = learned,
        None => seen.push((registry.to_string(), learned)),
    }
}

/// The recorded token hosts of `registry` and the shared-data CAS of their key.
fn token_hosts(registry: &str) -> (TokenHosts, Option<u32>) {
    match hostcalls::get_shared_data(&token_host::key(registry)) {
        Ok((Some(v), cas)) => (TokenHosts::decode(&v), cas),
        Ok((None, cas)) => (TokenHosts::default(), cas),
        Err(_) => (TokenHosts::default(), None),
    }
}

/// Is `host` a recorded token host of `registry` (its tokens are meant for it)?
fn is_recorded_token_host(registry: &str, host: &str) -> bool {
    token_hosts(registry).0.contains(host)
}

/// Records `host` as a token host of `registry` (bounded list; CAS against other VMs).
fn record_token_host(registry: &str, host: &str) {
    for _ in 0..3 {
        let (mut hosts, cas) = token_hosts(registry);
        if !hosts.insert(host) {
            return;
        }
        let v = hosts.encode();
        match hostcalls::set_shared_data(&token_host::key(registry), Some(v.as_bytes()), cas) {
            Ok(()) => {
                info!("{host} challenges with the realm of {registry}: its tokens now pass there");
                return;
            }
            Err(proxy_wasm::types::Status::CasMismatch) => continue,
            Err(e) => {
                warn!("cannot record token host {host} of {registry}: {e:?}");
                return;
            }
        }
    }
}

/// Shared-data key holding the per-Envoy signing key.
pub const SIGNING_KEY_SHARED_DATA: &str = "mirror.signing_key";

proxy_wasm::main! {{
    // Until the host's level is known (see `MirrorRoot::on_vm_start`): Envoy's default.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(MirrorRoot::default()) });
}}

/// Filters log records in the VM at the host's level, so records the host would drop
/// are neither formatted nor copied across the VM boundary.
fn use_host_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

/// Counter ids, defined once per VM.
#[derive(Default)]
struct Metrics {
    /// `(registry name, id)` in configuration order (a handful: a scan beats hashing).
    requests: Vec<(String, u32)>,
    /// By [`Counter`] index.
    named: [Option<u32>; COUNTERS.len()],
    /// By position in [`RejectReason::ALL`].
    rejections: Vec<(RejectReason, u32)>,
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
enum Counter {
    ChallengesRewritten = 0,
    ChallengesRejected = 1,
    RedirectsSigned = 2,
    RedirectsUnsigned = 3,
    RedirectsFollowed = 4,
    AuthRequests = 5,
    Rejections = 6,
}

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
                m.requests.push((r.name.clone(), id));
            }
        }
        for (slot, c) in m.named.iter_mut().zip(COUNTERS) {
            *slot = define(c);
        }
        for r in RejectReason::ALL {
            if let Some(id) = define(&format!("mirror_rejections_{}", r.as_str())) {
                m.rejections.push((r, id));
            }
        }
        m
    }

    fn add(id: Option<u32>, n: usize) {
        if let (Some(id), Ok(n)) = (id, i64::try_from(n)) {
            if n > 0 {
                let _ = hostcalls::increment_metric(id, n);
            }
        }
    }

    fn inc(&self, c: Counter, n: usize) {
        Self::add(self.named.get(c as usize).copied().flatten(), n);
    }

    fn request(&self, registry: &str) {
        let id = self
            .requests
            .iter()
            .find(|(name, _)| name == registry)
            .map(|&(_, id)| id);
        Self::add(id, 1);
    }

    fn rejection(&self, reason: RejectReason) {
        self.inc(Counter::Rejections, 1);
        let id = self
            .rejections
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|&(_, id)| id);
        Self::add(id, 1);
    }
}

struct Shared {
    cfg: CompiledConfig,
    metrics: Metrics,
    /// Realms this VM last stored (or found stored) per registry; see [`store_realm_seen`].
    seen_realms: RefCell<Vec<(String, LearnedRealm)>>,
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
    fn on_vm_start(&mut self, _size: usize) -> bool {
        use_host_log_level();
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        use_host_log_level();
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
        self.shared = Some(Rc::new(Shared {
            cfg,
            metrics,
            seen_realms: RefCell::new(Vec::new()),
        }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(MirrorHttp {
            shared: self.shared.clone(),
            state: None,
            pending: None,
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
    /// The client's `Authorization`, hashed ([`credential_fingerprint`]) only when a
    /// redirect is signed.
    authorization: Option<String>,
    oci_namespace: Option<String>,
    kind: ForwardKind,
    scope_prefix: Option<String>,
}

/// A token request paused while the target registry's realm is learned.
struct Pending {
    token: u32,
    learn: LearnRealm,
    authorization: Option<String>,
}

struct MirrorHttp {
    shared: Option<Rc<Shared>>,
    state: Option<ResponseState>,
    pending: Option<Pending>,
}

impl Context for MirrorHttp {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Some(p) = self.pending.take() else {
            return;
        };
        if p.token != token_id {
            self.pending = Some(p);
            return;
        }
        let registry = p.learn.registry.clone();
        let headers =
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let challenges: Vec<String> = headers
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
            .filter_map(|(_, v)| String::from_utf8(v).ok())
            .collect();
        let Some(reg) = shared.cfg.registry(&registry) else {
            self.reply_paused(
                &shared,
                &realm_failure(ErrorCode::Unavailable, "registry gone"),
            );
            return;
        };
        let learned = match learn_realm(reg, &challenges) {
            Ok(l) => l,
            Err(LearnError::NoChallenge) if status.starts_with('2') => {
                // An anonymous registry: nothing to learn, no token needed.
                let r = placeholder_token(&format!(
                    "placeholder token: {registry} answered /v2/ {status} without a challenge"
                ));
                self.reply_paused(&shared, &r);
                return;
            }
            Err(LearnError::NoChallenge) => {
                let msg = format!(
                    "cannot learn the token realm of {registry}: its /v2/ answered {status} without a Bearer challenge"
                );
                self.reply_paused(&shared, &realm_failure(ErrorCode::Unavailable, &msg));
                return;
            }
            Err(LearnError::NotAllowlisted(host)) => {
                let msg =
                    format!("the token realm host {host} of {registry} is not on its realm_hosts");
                self.reply_paused(&shared, &realm_failure(ErrorCode::Denied, &msg));
                return;
            }
        };
        store_realm(&registry, &learned);
        match forward_to_learned(&shared.cfg, &p.learn, &learned) {
            Ok(f) => {
                if let Err(e) = self.apply_forward(&shared, f, p.authorization) {
                    warn!("cannot rewrite the paused token request: {e:?}");
                    let r = realm_failure(ErrorCode::Unavailable, "cannot rewrite the request");
                    self.reply_paused(&shared, &r);
                    return;
                }
                if let Err(e) = hostcalls::resume_http_request() {
                    warn!("cannot resume the token request: {e:?}");
                }
            }
            Err(r) => self.reply_paused(&shared, &r),
        }
    }
}

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

    /// Answers a paused request locally (from a callback: errors only logged).
    fn reply_paused(&self, shared: &Shared, r: &Reply) {
        if let Some(reason) = r.reason {
            shared.metrics.rejection(reason);
        }
        info!("token request: {} ({})", r.status, r.message);
        let h: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Err(e) = hostcalls::send_http_response(r.status, h, Some(r.body.as_bytes())) {
            warn!("cannot answer the paused request: {e:?}");
        }
    }

    /// Rewrites the request headers for `f` and keeps what the response phase needs.
    fn apply_forward(
        &mut self,
        shared: &Shared,
        f: Forward,
        authorization: Option<String>,
    ) -> Result<(), proxy_wasm::types::Status> {
        shared.metrics.request(&f.registry);
        match f.kind {
            ForwardKind::Auth => shared.metrics.inc(Counter::AuthRequests, 1),
            ForwardKind::Redirect => shared.metrics.inc(Counter::RedirectsFollowed, 1),
            ForwardKind::Registry => {}
        }
        let req = MapType::HttpRequestHeaders;
        hostcalls::set_map_value(req, ":authority", Some(&f.authority))?;
        hostcalls::set_map_value(req, ":path", Some(&f.path))?;
        // Replacing removes every client-sent copy, so one call either way.
        let registry_header = f.set_registry_header.then_some(f.registry.as_str());
        hostcalls::set_map_value(req, "x-mirror-registry", registry_header)?;
        if f.strip_authorization {
            hostcalls::set_map_value(req, "authorization", None)?;
        }
        self.state = Some(ResponseState {
            authorization,
            registry: f.registry,
            mirror_base: f.mirror_base,
            upstream_authority: f.authority,
            upstream_path: f.path,
            oci_namespace: f.oci_namespace_echo,
            kind: f.kind,
            scope_prefix: f.path_prefix,
        });
        Ok(())
    }

    /// A token request for another registry: forward to its learned realm, or pause
    /// and learn the realm with a `GET /v2/` to the registry's cluster.
    fn learn_and_forward(
        &mut self,
        shared: &Shared,
        lr: LearnRealm,
        authorization: Option<String>,
    ) -> Action {
        if let Some(learned) = stored_realm(&lr.registry) {
            if let Ok(f) = forward_to_learned(&shared.cfg, &lr, &learned) {
                debug!(
                    "token request for {} -> {} {}",
                    lr.registry, f.authority, f.path
                );
                return match self.apply_forward(shared, f, authorization) {
                    Ok(()) => Action::Continue,
                    Err(e) => {
                        warn!("cannot rewrite the token request: {e:?}");
                        self.fail(502, ErrorCode::Unavailable, "cannot rewrite the request")
                    }
                };
            }
            // Stored but no longer allowed (configuration changed): learn again.
        }
        let headers = vec![
            (":method", "GET"),
            (":path", "/v2/"),
            (":authority", lr.upstream.as_str()),
            (":scheme", "https"),
        ];
        match hostcalls::dispatch_http_call(&lr.cluster, headers, None, vec![], REALM_CALL_TIMEOUT)
        {
            Ok(token) => {
                debug!(
                    "learning the token realm of {} via cluster {}",
                    lr.registry, lr.cluster
                );
                self.pending = Some(Pending {
                    token,
                    learn: lr,
                    authorization,
                });
                Action::Pause
            }
            Err(e) => {
                let msg = format!(
                    "cannot learn the token realm of {}: call to cluster {} failed ({e:?})",
                    lr.registry, lr.cluster
                );
                let r = realm_failure(ErrorCode::Unavailable, &msg);
                self.reply_paused(shared, &r);
                Action::Pause
            }
        }
    }

    fn fail(&self, status: u32, code: rules::oci_error::ErrorCode, msg: &str) -> Action {
        let body = rules::oci_error::render(code, msg, None);
        let headers = [("content-type".to_string(), "application/json".to_string())];
        self.reply(status, &headers, &body)
    }

    /// Every `WWW-Authenticate` value. A 401 carries one, so read the whole map at
    /// once; other responses rarely do, so first ask for the one header (the host
    /// returns only the first of several values, hence the full read when present).
    fn challenge_values(&self, status: Option<u32>) -> Vec<Vec<u8>> {
        if status != Some(401)
            && self
                .get_http_response_header_bytes("www-authenticate")
                .is_none()
        {
            return Vec::new();
        }
        self.get_http_response_headers_bytes()
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
            .map(|(_, v)| v)
            .collect()
    }

    fn rewrite_challenges(&self, shared: &Shared, st: &ResponseState, status: Option<u32>) {
        let Some(reg) = shared.cfg.registry(&st.registry) else {
            return;
        };
        let values = self.challenge_values(status);
        if values.is_empty() {
            return;
        }
        // A redirect target challenging with the registry's own realm is a resource
        // server of its token service: record it, so the registry's tokens pass there.
        if st.kind == ForwardKind::Redirect && status == Some(401) {
            let texts: Vec<String> = values
                .iter()
                .filter_map(|v| String::from_utf8(v.clone()).ok())
                .collect();
            if is_token_host_challenge(reg, status, &texts) {
                record_token_host(&st.registry, &st.upstream_authority);
            }
        }
        let (mut rewritten, mut rejected) = (0, 0);
        let mut learned: Option<LearnedRealm> = None;
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            match String::from_utf8(v) {
                Ok(s) => {
                    let r = rewrite_challenges(
                        &s,
                        &reg.realm_hosts,
                        &st.mirror_base,
                        st.scope_prefix.as_deref(),
                    );
                    rewritten += r.rewritten;
                    rejected += r.rejected;
                    // The registry's own challenge names its realm: remember it for
                    // token requests that arrive at another registry's realm.
                    if let (ForwardKind::Registry, None, Some(l)) = (st.kind, &learned, r.learned) {
                        learned = Some(l);
                    }
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
        shared.metrics.inc(Counter::ChallengesRewritten, rewritten);
        shared.metrics.inc(Counter::ChallengesRejected, rejected);
        if let Some(l) = learned {
            store_realm_seen(shared, &st.registry, l);
        }
    }

    fn rewrite_redirect(&self, shared: &Shared, st: &ResponseState, status: Option<u32>) {
        if !matches!(status, Some(301 | 302 | 303 | 307 | 308)) {
            return;
        }
        let Some(loc) = self.get_http_response_header_bytes("location") else {
            return;
        };
        let Ok(loc) = String::from_utf8(loc) else {
            shared.metrics.inc(Counter::RedirectsUnsigned, 1);
            info!("non-UTF-8 Location left alone");
            return;
        };
        let key = shared.signing_key();
        let cred = credential_fingerprint(st.authorization.as_deref());
        let params = SignParams {
            registry: &st.registry,
            base_host: &st.upstream_authority,
            base_path: &st.upstream_path,
            mirror_base: &st.mirror_base,
            cred: &cred,
            key: &key,
            now: now_secs(self),
        };
        match rewrite_location(&shared.cfg, &params, &loc) {
            LocationOutcome::Signed(u) => {
                self.set_http_response_header("location", Some(&u));
                shared.metrics.inc(Counter::RedirectsSigned, 1);
            }
            LocationOutcome::Passthrough => {
                shared.metrics.inc(Counter::RedirectsUnsigned, 1);
            }
            LocationOutcome::Rejected => {
                shared.metrics.inc(Counter::RedirectsUnsigned, 1);
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
                debug!("rejected request: header {name} is not UTF-8");
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
        // Key and clock are only needed to verify a signed redirect.
        let (key, now) = if path.starts_with(rules::redirect::PREFIX) {
            (shared.signing_key(), now_secs(self))
        } else {
            (Vec::new(), 0)
        };
        match route_with(&shared.cfg, &req, &key, now, &is_recorded_token_host) {
            Decision::Reply(r) => {
                if let Some(reason) = r.reason {
                    shared.metrics.rejection(reason);
                    debug!(
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
            Decision::Forward(f) => match self.apply_forward(&shared, f, authorization) {
                Ok(()) => Action::Continue,
                Err(e) => {
                    warn!("cannot rewrite the request: {e:?}");
                    self.fail(500, ErrorCode::Unsupported, "cannot rewrite the request")
                }
            },
            Decision::LearnRealm(lr) => self.learn_and_forward(&shared, lr, authorization),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(shared), Some(st)) = (self.shared.as_ref(), self.state.as_ref()) else {
            return Action::Continue;
        };
        let status = self
            .get_http_response_header_bytes(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
        self.rewrite_challenges(shared, st, status);
        self.rewrite_redirect(shared, st, status);
        if let Some(ns) = &st.oci_namespace {
            self.set_http_response_header("oci-namespace", Some(ns));
        }
        Action::Continue
    }
}
