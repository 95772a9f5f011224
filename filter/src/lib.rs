//! proxy-wasm HTTP filter of the registry mirror.
//!
//! All decisions live in [`rules`] (plain Rust, unit-tested on the host); this file
//! is the thin glue to the proxy-wasm host: read headers, call `rules`, apply.

pub use registry_rules as rules;

use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use rules::oci_error::ErrorCode;
use rules::realms::{self, IssuedRealms, RealmUrl};
use rules::redirect::{rewrite_location, LocationOutcome, SignParams, NO_CREDENTIAL};
use rules::response::{plan_challenges, Answer};
use rules::route::{
    forward_to_learned, ping_reply, realm_failure, route_with, token_after_realm_call, Decision,
    Forward, ForwardKind, LearnRealm, Learned, Ping, RejectReason, Reply, Request,
};
use rules::token::{classify_realm_call, realm_key, LearnedRealm, RealmCall};
use rules::token_host::{self, TokenHosts};
use rules::{CompiledConfig, SharedSet};
use std::cell::{Cell, RefCell};
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

/// Stores `learned` for `registry` (and marks it issued) unless it is already there.
fn store_realm(registry: &str, learned: &LearnedRealm) {
    if stored_realm(registry).as_ref() == Some(learned) {
        return;
    }
    let v = learned.encode();
    match hostcalls::set_shared_data(&realm_key(registry), Some(v.as_bytes()), None) {
        Ok(()) => info!("learned token realm of {registry}: {}", learned.realm),
        Err(e) => warn!("cannot store the token realm of {registry}: {e:?}"),
    }
    if let Some(u) = RealmUrl::from_realm(&learned.realm) {
        add_issued_realm(registry, &u);
    }
}

/// The set under `key` and the shared-data CAS of that key.
fn read_set<S: SharedSet>(key: &str) -> (S, Option<u32>) {
    match hostcalls::get_shared_data(key) {
        Ok((Some(v), cas)) => (S::decode(&v), cas),
        Ok((None, cas)) => (S::default(), cas),
        Err(_) => (S::default(), None),
    }
}

/// Adds `item` to the set under `key`, retrying on a CAS race with another VM. True when
/// this call stored a changed set.
fn add_to_set<S: SharedSet>(key: &str, item: &S::Item) -> bool {
    for _ in 0..3 {
        let (mut set, cas) = read_set::<S>(key);
        if !set.insert(item) {
            return false;
        }
        match hostcalls::set_shared_data(key, Some(set.encode().as_bytes()), cas) {
            Ok(()) => return true,
            Err(proxy_wasm::types::Status::CasMismatch) => continue,
            Err(e) => {
                warn!("cannot update shared data {key}: {e:?}");
                return false;
            }
        }
    }
    false
}

/// Adds `realm` to `registry`'s issued realms (bounded).
fn add_issued_realm(registry: &str, realm: &RealmUrl) {
    add_to_set::<IssuedRealms>(&realms::key(registry), realm);
}

/// What this Envoy learned, read from shared data when routing asks.
struct SharedLearned;

impl Learned for SharedLearned {
    fn is_token_host(&self, registry: &str, host: &str) -> bool {
        read_set::<TokenHosts>(&token_host::key(registry))
            .0
            .contains(host)
    }

    fn is_issued_realm(&self, registry: &str, authority: &str, path: &str) -> bool {
        read_set::<IssuedRealms>(&realms::key(registry))
            .0
            .contains(authority, path)
            || stored_realm(registry)
                .and_then(|l| RealmUrl::from_realm(&l.realm))
                .is_some_and(|u| u.authority == authority && u.path == path)
    }
}

/// [`store_realm`] from a registry's own challenge (every 401): skips the shared-data
/// round trip when this VM already stored or found this very value for `registry`.
/// False when skipped.
fn store_realm_seen(shared: &Shared, registry: &str, learned: &LearnedRealm) -> bool {
    let Ok(mut seen) = shared.seen_realms.try_borrow_mut() else {
        store_realm(registry, learned);
        return true;
    };
    if let Some((_, l)) = seen.iter().find(|(r, _)| r == registry) {
        if l == learned {
            return false;
        }
    }
    store_realm(registry, learned);
    match seen.iter_mut().find(|(r, _)| r == registry) {
        Some((_, l)) => *l = learned.clone(),
        None => seen.push((registry.to_string(), learned.clone())),
    }
    true
}

/// Records `host` as a token host of `registry` (bounded list).
fn record_token_host(registry: &str, host: &str) {
    let key = token_host::key(registry);
    if add_to_set::<TokenHosts>(&key, host) {
        info!("{host} challenges with the realm of {registry}: its tokens now pass there");
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

/// How often each VM hands its counted events to Envoy's stats.
const METRICS_FLUSH_PERIOD: Duration = Duration::from_secs(1);

/// One Envoy counter, counted inside the VM and flushed on the root context's tick:
/// a host call costs more than the filter's own work on a request (see bench/RESULTS.md).
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

/// The filter's counters, defined once per VM.
#[derive(Default)]
struct Metrics {
    /// `(registry name, counter)` in configuration order (a handful: a scan beats hashing).
    requests: Vec<(String, BatchedCounter)>,
    /// By [`Counter`] index.
    named: [Option<BatchedCounter>; COUNTERS.len()],
    /// By position in [`RejectReason::ALL`].
    rejections: Vec<(RejectReason, BatchedCounter)>,
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

impl Metrics {
    fn define(cfg: &CompiledConfig) -> Self {
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

    fn inc(&self, c: Counter, n: usize) {
        if let Some(Some(counter)) = self.named.get(c as usize) {
            counter.add(n);
        }
    }

    fn request(&self, registry: &str) {
        if let Some((_, c)) = self.requests.iter().find(|(name, _)| name == registry) {
            c.add(1);
        }
    }

    fn rejection(&self, reason: RejectReason) {
        self.inc(Counter::Rejections, 1);
        if let Some((_, c)) = self.rejections.iter().find(|(r, _)| *r == reason) {
            c.add(1);
        }
    }

    fn flush(&self) {
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
        // The SDK's accessors unwrap host errors (a panic kills the VM): host calls direct.
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
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
        if let Some(previous) = &self.shared {
            previous.metrics.flush();
        }
        if let Err(e) = hostcalls::set_tick_period(METRICS_FLUSH_PERIOD) {
            warn!("no tick from the host ({e:?}): counters will not be reported");
        }
        self.shared = Some(Rc::new(Shared {
            cfg,
            metrics,
            seen_realms: RefCell::new(Vec::new()),
        }));
        true
    }

    fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            shared.metrics.flush();
        }
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
    oci_namespace: Option<String>,
    kind: ForwardKind,
    scope_prefix: Option<String>,
}

/// A request paused while a registry's realm is learned.
struct Pending {
    token: u32,
    what: Paused,
}

enum Paused {
    /// A token request for the target registry's realm.
    Token {
        learn: Box<LearnRealm>,
        client: RequestHeaders,
    },
    /// A shared-host `/v2/` ping.
    Ping(Ping),
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
        let headers =
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let status: Option<u32> = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
        let challenges: Vec<String> = headers
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
            .filter_map(|(_, v)| String::from_utf8(v).ok())
            .collect();
        let registry = match &p.what {
            Paused::Token { learn, .. } => learn.registry.clone(),
            Paused::Ping(ping) => ping.registry.clone(),
        };
        let Some(reg) = shared.cfg.registry(&registry) else {
            self.reply_paused(
                &shared,
                &realm_failure(ErrorCode::Unavailable, "registry gone"),
            );
            return;
        };
        let call = classify_realm_call(reg, status, &challenges);
        if let RealmCall::Learned(l) = &call {
            store_realm(&registry, l);
        }
        let (learn, client) = match p.what {
            Paused::Ping(ping) => {
                let learned = match &call {
                    RealmCall::Learned(l) => Some(l),
                    _ => None,
                };
                self.reply_paused(&shared, &ping_reply(&ping, learned));
                return;
            }
            Paused::Token { learn, client } => (learn, client),
        };
        match token_after_realm_call(&shared.cfg, &learn, &call, status) {
            Ok(f) => {
                if let Err(e) = self.apply_forward(&shared, f, client) {
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

fn set_response_header(name: &str, value: &str) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)) {
        warn!("cannot set response header {name}: {e:?}");
    }
}

/// Seconds since the epoch; 0 (every signature expired) if the host cannot tell.
fn now_secs() -> u64 {
    hostcalls::get_current_time()
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The request headers the rules look at, from one read of the whole map (one host
/// call instead of one per header). Envoy hands names over lowercase.
#[derive(Default)]
struct RequestHeaders {
    method: String,
    authority: String,
    path: String,
    scheme: Option<String>,
    forwarded_proto: Option<String>,
    authorization: Option<String>,
    /// A client-sent `x-mirror-registry`, which must never reach an upstream.
    has_registry_header: bool,
}

impl RequestHeaders {
    /// The first value of each header; `Err(name)` when one of them is not UTF-8.
    fn from_map(map: Vec<(String, Vec<u8>)>) -> Result<Self, &'static str> {
        let mut h = RequestHeaders::default();
        let (mut method, mut authority, mut path) = (None, None, None);
        for (name, value) in map {
            let (slot, label) = match name.as_str() {
                ":method" => (&mut method, ":method"),
                ":authority" => (&mut authority, ":authority"),
                ":path" => (&mut path, ":path"),
                ":scheme" => (&mut h.scheme, ":scheme"),
                "x-forwarded-proto" => (&mut h.forwarded_proto, "x-forwarded-proto"),
                "authorization" => (&mut h.authorization, "authorization"),
                "x-mirror-registry" => {
                    h.has_registry_header = true;
                    continue;
                }
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(String::from_utf8(value).map_err(|_| label)?);
            }
        }
        h.method = method.unwrap_or_default();
        h.authority = authority.unwrap_or_default();
        h.path = path.unwrap_or_default();
        Ok(h)
    }
}

/// The response headers the filter looks at, from one read of the whole map.
struct ResponseHeaders {
    status: Option<u32>,
    challenges: Vec<Vec<u8>>,
    location: Option<Vec<u8>>,
}

impl ResponseHeaders {
    fn from_map(map: Vec<(String, Vec<u8>)>) -> Self {
        let mut h = ResponseHeaders {
            status: None,
            challenges: Vec::new(),
            location: None,
        };
        for (name, value) in map {
            match name.as_str() {
                ":status" => {
                    h.status = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok());
                }
                "www-authenticate" => h.challenges.push(value),
                "location" if h.location.is_none() => h.location = Some(value),
                _ => {}
            }
        }
        h
    }
}

impl MirrorHttp {
    fn reply(&self, status: u32, headers: &[(String, String)], body: &str) -> Action {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Err(e) = hostcalls::send_http_response(status, h, Some(body.as_bytes())) {
            warn!("cannot send the local reply {status}: {e:?}");
        }
        Action::Pause
    }

    /// Answers a paused request locally (from a callback: errors only logged).
    fn reply_paused(&self, shared: &Shared, r: &Reply) {
        if let Some(reason) = r.reason {
            shared.metrics.rejection(reason);
        }
        info!("paused request: {} ({})", r.status, r.message);
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
    /// Touches only headers that change: every host call costs more than the rules.
    fn apply_forward(
        &mut self,
        shared: &Shared,
        f: Forward,
        client: RequestHeaders,
    ) -> Result<(), proxy_wasm::types::Status> {
        shared.metrics.request(&f.registry);
        match f.kind {
            ForwardKind::Auth => shared.metrics.inc(Counter::AuthRequests, 1),
            ForwardKind::Redirect => shared.metrics.inc(Counter::RedirectsFollowed, 1),
            ForwardKind::Registry => {}
        }
        let req = MapType::HttpRequestHeaders;
        if f.authority != client.authority {
            hostcalls::set_map_value(req, ":authority", Some(&f.authority))?;
        }
        if f.path != client.path {
            hostcalls::set_map_value(req, ":path", Some(&f.path))?;
        }
        // Replacing removes every client-sent copy, so one call either way.
        if f.set_registry_header {
            hostcalls::set_map_value(req, "x-mirror-registry", Some(&f.registry))?;
        } else if client.has_registry_header {
            hostcalls::set_map_value(req, "x-mirror-registry", None)?;
        }
        if f.strip_authorization && client.authorization.is_some() {
            hostcalls::set_map_value(req, "authorization", None)?;
        }
        self.state = Some(ResponseState {
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
        client: RequestHeaders,
    ) -> Action {
        // A realm URL the client asked itself is checked against a fresh answer.
        let stored = lr.expect.is_none().then(|| stored_realm(&lr.registry));
        if let Some(learned) = stored.flatten() {
            if let Ok(f) = forward_to_learned(&shared.cfg, &lr, &learned) {
                debug!(
                    "token request for {} -> {} {}",
                    lr.registry, f.authority, f.path
                );
                return match self.apply_forward(shared, f, client) {
                    Ok(()) => Action::Continue,
                    Err(e) => {
                        warn!("cannot rewrite the token request: {e:?}");
                        self.fail(502, ErrorCode::Unavailable, "cannot rewrite the request")
                    }
                };
            }
            // Stored but no longer allowed (configuration changed): learn again.
        }
        let (cluster, upstream) = (lr.cluster.clone(), lr.upstream.clone());
        let paused = Paused::Token {
            learn: Box::new(lr),
            client,
        };
        match self.learn_realm(&cluster, &upstream, paused) {
            Ok(()) => Action::Pause,
            Err(e) => {
                let msg = format!(
                    "cannot learn the token realm: call to cluster {cluster} failed ({e:?})"
                );
                self.reply_paused(shared, &realm_failure(ErrorCode::Unavailable, &msg));
                Action::Pause
            }
        }
    }

    /// Sends the realm-learning `GET /v2/` to `cluster` and keeps `what` for its answer.
    fn learn_realm(
        &mut self,
        cluster: &str,
        upstream: &str,
        what: Paused,
    ) -> Result<(), proxy_wasm::types::Status> {
        let headers = vec![
            (":method", "GET"),
            (":path", "/v2/"),
            (":authority", upstream),
            (":scheme", "https"),
        ];
        let token =
            hostcalls::dispatch_http_call(cluster, headers, None, vec![], REALM_CALL_TIMEOUT)?;
        debug!("learning a token realm via cluster {cluster}");
        self.pending = Some(Pending { token, what });
        Ok(())
    }

    /// A shared-host `/v2/` ping: the default registry's known challenge, else learn it
    /// (its upstream may be down: then anonymous 200, see [`ping_reply`]).
    fn answer_ping(&mut self, shared: &Shared, ping: Ping) -> Action {
        if let Some(learned) = stored_realm(&ping.registry) {
            let r = ping_reply(&ping, Some(&learned));
            return self.reply(r.status, &r.headers, &r.body);
        }
        let (cluster, upstream) = (ping.cluster.clone(), ping.upstream.clone());
        match self.learn_realm(&cluster, &upstream, Paused::Ping(ping.clone())) {
            Ok(()) => Action::Pause,
            Err(e) => {
                debug!("cannot call cluster {cluster} for the /v2/ ping: {e:?}");
                self.reply_paused(shared, &ping_reply(&ping, None));
                Action::Pause
            }
        }
    }

    fn fail(&self, status: u32, code: rules::oci_error::ErrorCode, msg: &str) -> Action {
        let body = rules::oci_error::render(code, msg, None);
        let headers = [("content-type".to_string(), "application/json".to_string())];
        self.reply(status, &headers, &body)
    }

    fn rewrite_challenges(
        &self,
        shared: &Shared,
        st: &ResponseState,
        status: Option<u32>,
        values: Vec<Vec<u8>>,
    ) {
        if values.is_empty() {
            return;
        }
        let Some(reg) = shared.cfg.registry(&st.registry) else {
            return;
        };
        let answer = Answer {
            registry: reg,
            kind: st.kind,
            status,
            mirror_base: &st.mirror_base,
            scope_prefix: st.scope_prefix.as_deref(),
        };
        let plan = plan_challenges(&answer, values);
        if let Some(out) = &plan.values {
            let resp = MapType::HttpResponseHeaders;
            // One value (the usual case) replaces the only one in one host call; more are
            // removed and added (older Envoys replace only the first on a set).
            let written = match out.as_slice() {
                [v] => hostcalls::set_map_value_bytes(resp, "www-authenticate", Some(v)),
                _ => hostcalls::set_map_value(resp, "www-authenticate", None).and_then(|()| {
                    out.iter().try_for_each(|v| {
                        hostcalls::add_map_value_bytes(resp, "www-authenticate", v)
                    })
                }),
            };
            if let Err(e) = written {
                warn!("cannot rewrite the challenge: {e:?}");
            }
        }
        if plan.rejected > 0 {
            info!(
                "{} challenge realm(s) from {} not allowlisted for {}, left alone",
                plan.rejected, st.upstream_authority, st.registry
            );
        }
        shared
            .metrics
            .inc(Counter::ChallengesRewritten, plan.rewritten);
        shared
            .metrics
            .inc(Counter::ChallengesRejected, plan.rejected);
        // A redirect target challenging with the registry's own realm is a resource
        // server of its token service: its tokens pass there, its realm is issued.
        if plan.record_token_host {
            record_token_host(&st.registry, &st.upstream_authority);
        }
        // The registry's own 401: its realm (and the other issued ones) once per VM.
        let changed = plan
            .store_realm()
            .is_none_or(|l| store_realm_seen(shared, &st.registry, l));
        if changed {
            for u in &plan.issued() {
                add_issued_realm(&st.registry, u);
            }
        }
    }

    fn rewrite_redirect(
        &self,
        shared: &Shared,
        st: &ResponseState,
        status: Option<u32>,
        location: Option<Vec<u8>>,
    ) {
        if !matches!(status, Some(301 | 302 | 303 | 307 | 308)) {
            return;
        }
        let Some(loc) = location else {
            return;
        };
        let Ok(loc) = String::from_utf8(loc) else {
            shared.metrics.inc(Counter::RedirectsUnsigned, 1);
            info!("non-UTF-8 Location left alone");
            return;
        };
        let key = shared.signing_key();
        let params = SignParams {
            registry: &st.registry,
            base_host: &st.upstream_authority,
            base_path: &st.upstream_path,
            mirror_base: &st.mirror_base,
            cred: NO_CREDENTIAL,
            key: &key,
            now: now_secs(),
        };
        match rewrite_location(&shared.cfg, &params, &loc) {
            LocationOutcome::Signed(u) => {
                set_response_header("location", &u);
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

/// Header callbacks only. The body, trailer and log callbacks keep the SDK's defaults and
/// `filter/trim-exports.py` removes their exports, so Envoy never enters the VM for them
/// (no VM entry per blob chunk); implementing one means removing it from that list.
impl HttpContext for MirrorHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return self.fail(500, ErrorCode::Unsupported, "mirror not configured");
        };
        let map = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(m) => m,
            Err(e) => {
                warn!("cannot read the request headers: {e:?}");
                return self.fail(500, ErrorCode::Unsupported, "cannot read the request");
            }
        };
        let client = match RequestHeaders::from_map(map) {
            Ok(h) => h,
            Err(name) => {
                debug!("rejected request: header {name} is not UTF-8");
                shared.metrics.rejection(RejectReason::BadRequest);
                return self.fail(400, ErrorCode::Unsupported, "invalid header encoding");
            }
        };
        let req = Request {
            method: &client.method,
            authority: &client.authority,
            path: &client.path,
            scheme: client.scheme.as_deref().unwrap_or("http"),
            forwarded_proto: client.forwarded_proto.as_deref(),
            authorization: client.authorization.as_deref(),
        };
        // Key and clock are only needed to verify a signed redirect.
        let (key, now) = if client.path.starts_with(rules::redirect::PREFIX) {
            (shared.signing_key(), now_secs())
        } else {
            (Vec::new(), 0)
        };
        match route_with(&shared.cfg, &req, &key, now, &SharedLearned) {
            Decision::Reply(r) => {
                if let Some(reason) = r.reason {
                    shared.metrics.rejection(reason);
                    debug!(
                        "{} {} {}: {} ({})",
                        r.status,
                        client.method,
                        client.path.chars().take(300).collect::<String>(),
                        reason.as_str(),
                        r.message
                    );
                }
                self.reply(r.status, &r.headers, &r.body)
            }
            Decision::Forward(f) => match self.apply_forward(&shared, f, client) {
                Ok(()) => Action::Continue,
                Err(e) => {
                    warn!("cannot rewrite the request: {e:?}");
                    self.fail(500, ErrorCode::Unsupported, "cannot rewrite the request")
                }
            },
            Decision::LearnRealm(lr) => self.learn_and_forward(&shared, lr, client),
            Decision::Ping(ping) => self.answer_ping(&shared, ping),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(shared), Some(st)) = (self.shared.as_ref(), self.state.as_ref()) else {
            return Action::Continue;
        };
        let h = match hostcalls::get_map_bytes(MapType::HttpResponseHeaders) {
            Ok(m) => ResponseHeaders::from_map(m),
            Err(e) => {
                warn!("cannot read the response headers: {e:?}");
                return Action::Continue;
            }
        };
        self.rewrite_challenges(shared, st, h.status, h.challenges);
        self.rewrite_redirect(shared, st, h.status, h.location);
        if let Some(ns) = &st.oci_namespace {
            set_response_header("oci-namespace", ns);
        }
        Action::Continue
    }
}
