//! HTTP context: reads the headers, asks the rules, applies their decision or plan.

use crate::metrics::Counter;
use crate::root::Shared;
use crate::rules::challenge::LearnedRealm;
use crate::rules::response::{
    plan_challenges, plan_link, plan_realm_call, plan_redirect, Answer, RealmWait, RedirectPlan,
    Resume,
};
use crate::rules::route::{
    forward_with_stored, needs_signing_key, ping_reply, realm_call_failed, route_with, Decision,
    Failure, Forward, ForwardKind, LearnRealm, Ping, Reply, Request, CACHE_KEY_HEADER,
};
use crate::shared_data::{self, SharedLearned};
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType, Status};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// Timeout of the `GET /v2/` the filter sends to learn a registry's realm.
const REALM_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A request paused while a registry's realm is learned.
struct Pending {
    token: u32,
    wait: RealmWait,
    client: RequestHeaders,
}

pub struct MirrorHttp {
    shared: Option<Rc<Shared>>,
    /// The forward applied to the request, for its response phase.
    forwarded: Option<Forward>,
    pending: Option<Pending>,
}

impl MirrorHttp {
    pub fn new(shared: Option<Rc<Shared>>) -> Self {
        MirrorHttp {
            shared,
            forwarded: None,
            pending: None,
        }
    }
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
        let Some(p) = self.pending.take_if(|p| p.token == token_id) else {
            return;
        };
        let h = hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders)
            .map(ResponseHeaders::from_map)
            .unwrap_or_default();
        let challenges: Vec<String> = h
            .challenges
            .into_iter()
            .filter_map(|v| String::from_utf8(v).ok())
            .collect();
        let plan = plan_realm_call(&shared.cfg, &p.wait, h.status, &challenges);
        if let Some(l) = &plan.store {
            shared_data::store_realm(p.wait.registry(), l);
        }
        match plan.resume {
            Resume::Reply(r) => self.reply_paused(&shared, &r),
            Resume::Forward(f) => {
                if let Err(e) = self.apply_forward(&shared, f, &p.client) {
                    warn!("cannot rewrite the paused token request: {e:?}");
                    self.reply_paused(&shared, &Failure::TokenRewrite.reply());
                    return;
                }
                if let Err(e) = hostcalls::resume_http_request() {
                    warn!("cannot resume the token request: {e:?}");
                }
            }
        }
    }
}

fn set_response_header(name: &str, value: &str) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)) {
        warn!("cannot set response header {name}: {e:?}");
    }
}

/// Replaces every value of the response header `name` with `values` (none: removes it).
fn replace_response_header(name: &str, values: &[Vec<u8>]) {
    let resp = MapType::HttpResponseHeaders;
    // One value (the usual case) replaces the only one in one host call; more are removed
    // and added (older Envoys replace only the first on a set).
    let written = match values {
        [v] => hostcalls::set_map_value_bytes(resp, name, Some(v)),
        _ => hostcalls::set_map_value(resp, name, None).and_then(|()| {
            values
                .iter()
                .try_for_each(|v| hostcalls::add_map_value_bytes(resp, name, v))
        }),
    };
    if let Err(e) = written {
        warn!("cannot rewrite response header {name}: {e:?}");
    }
}

/// Sends a local answer.
fn send(status: u32, headers: &[(String, String)], body: &str) -> Result<(), Status> {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    hostcalls::send_http_response(status, h, Some(body.as_bytes()))
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
    /// The client sent an `x-mirror-registry` (only the filter's own may reach a route).
    registry_header: bool,
}

impl RequestHeaders {
    /// The first value of each header, every `authorization` joined; `Err(name)` when one
    /// of them is not UTF-8.
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
                    h.registry_header = true;
                    continue;
                }
                _ => continue,
            };
            match slot {
                None => *slot = Some(String::from_utf8(value).map_err(|_| label)?),
                // Repeated credentials all go upstream: judged as one list, they never pass
                // for a single Bearer token.
                Some(first) if name == "authorization" => {
                    first.push_str(", ");
                    first.push_str(&String::from_utf8_lossy(&value));
                }
                Some(_) => {}
            }
        }
        h.method = method.unwrap_or_default();
        h.authority = authority.unwrap_or_default();
        h.path = path.unwrap_or_default();
        Ok(h)
    }
}

/// The response headers the filter looks at, from one read of the whole map (of a
/// forwarded request's answer or of a realm call's). Envoy hands names over lowercase.
#[derive(Default)]
struct ResponseHeaders {
    status: Option<u32>,
    challenges: Vec<Vec<u8>>,
    location: Option<Vec<u8>>,
    links: Vec<Vec<u8>>,
}

impl ResponseHeaders {
    fn from_map(map: Vec<(String, Vec<u8>)>) -> Self {
        let mut h = ResponseHeaders::default();
        for (name, value) in map {
            match name.as_str() {
                ":status" => {
                    h.status = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok());
                }
                "www-authenticate" => h.challenges.push(value),
                "location" if h.location.is_none() => h.location = Some(value),
                "link" => h.links.push(value),
                _ => {}
            }
        }
        h
    }
}

impl MirrorHttp {
    fn reply(&self, r: &Reply) -> Action {
        if let Err(e) = send(r.status, &r.headers, &r.body) {
            warn!("cannot send the local reply {}: {e:?}", r.status);
        }
        Action::Pause
    }

    /// Sends a local answer, counting it if it rejects the request.
    fn answer(&self, shared: &Shared, r: &Reply) -> Action {
        if let Some(reason) = r.reason {
            shared.metrics.rejection(reason);
        }
        self.reply(r)
    }

    /// Sends the reply to a failure of the filter's own.
    fn fail(&self, shared: &Shared, failure: Failure) -> Action {
        self.answer(shared, &failure.reply())
    }

    /// Answers a paused request locally (from a callback: errors only logged).
    fn reply_paused(&self, shared: &Shared, r: &Reply) {
        if let Some(reason) = r.reason {
            shared.metrics.rejection(reason);
        }
        info!("paused request: {} ({})", r.status, r.message);
        if let Err(e) = send(r.status, &r.headers, &r.body) {
            warn!("cannot answer the paused request: {e:?}");
        }
    }

    /// Rewrites the request headers for `f` and keeps it for the response phase.
    /// Touches only headers that change: every host call costs more than the rules.
    fn apply_forward(
        &mut self,
        shared: &Shared,
        f: Forward,
        client: &RequestHeaders,
    ) -> Result<(), Status> {
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
        if f.sets_registry_header(&shared.cfg, client.registry_header) {
            hostcalls::set_map_value(req, "x-mirror-registry", Some(&f.registry))?;
        }
        // Only routes to the cache are hashed on it; Envoy strips it on every other route.
        if let Some(key) = &f.cache_key {
            hostcalls::set_map_value(req, CACHE_KEY_HEADER, Some(key))?;
        }
        if f.strip_authorization && client.authorization.is_some() {
            hostcalls::set_map_value(req, "authorization", None)?;
        }
        self.forwarded = Some(f);
        Ok(())
    }

    /// A token request for another registry: forward to its stored realm, or pause
    /// and learn the realm with a `GET /v2/` to the registry's cluster.
    fn learn_and_forward(
        &mut self,
        shared: &Shared,
        lr: LearnRealm,
        client: RequestHeaders,
    ) -> Action {
        let stored = || shared_data::stored_realm(&lr.registry);
        if let Some(f) = forward_with_stored(&shared.cfg, &lr, stored) {
            debug!(
                "token request for {} -> {} {}",
                lr.registry, f.authority, f.path
            );
            return match self.apply_forward(shared, f, &client) {
                Ok(()) => Action::Continue,
                Err(e) => {
                    warn!("cannot rewrite the token request: {e:?}");
                    self.fail(shared, Failure::TokenRewrite)
                }
            };
        }
        let (cluster, upstream) = (lr.cluster.clone(), lr.upstream.clone());
        let wait = RealmWait::Token(Box::new(lr));
        if let Err(e) = self.learn_realm(&cluster, &upstream, wait, client) {
            let r = realm_call_failed(&cluster, &format!("{e:?}"));
            self.reply_paused(shared, &r);
        }
        Action::Pause
    }

    /// Sends the realm-learning `GET /v2/` to `cluster` and keeps the paused request for
    /// its answer.
    fn learn_realm(
        &mut self,
        cluster: &str,
        upstream: &str,
        wait: RealmWait,
        client: RequestHeaders,
    ) -> Result<(), Status> {
        let headers = vec![
            (":method", "GET"),
            (":path", "/v2/"),
            (":authority", upstream),
            (":scheme", "https"),
        ];
        let token =
            hostcalls::dispatch_http_call(cluster, headers, None, vec![], REALM_CALL_TIMEOUT)?;
        debug!("learning a token realm via cluster {cluster}");
        self.pending = Some(Pending {
            token,
            wait,
            client,
        });
        Ok(())
    }

    /// A shared-host `/v2/` ping: the default registry's known challenge, else learn it
    /// (its upstream may be down: then anonymous 200, see [`ping_reply`]).
    fn answer_ping(&mut self, shared: &Shared, ping: Ping, client: RequestHeaders) -> Action {
        if let Some(learned) = shared_data::stored_realm(&ping.registry) {
            return self.reply(&ping_reply(&ping, Some(&learned)));
        }
        let (cluster, upstream) = (ping.cluster.clone(), ping.upstream.clone());
        if let Err(e) = self.learn_realm(&cluster, &upstream, RealmWait::Ping(ping.clone()), client)
        {
            debug!("cannot call cluster {cluster} for the /v2/ ping: {e:?}");
            self.reply_paused(shared, &ping_reply(&ping, None));
        }
        Action::Pause
    }

    /// Applies [`plan_challenges`] to the answer's `WWW-Authenticate` values.
    fn apply_challenges(shared: &Shared, fwd: &Forward, status: Option<u32>, values: Vec<Vec<u8>>) {
        // Most answers carry no challenge: not even a registry lookup then.
        if values.is_empty() {
            return;
        }
        let Some(reg) = shared.cfg.registry(&fwd.registry) else {
            return;
        };
        let answer = Answer {
            registry: reg,
            kind: fwd.kind,
            status,
            mirror_base: &fwd.mirror_base,
            scope_prefix: fwd.path_prefix.as_deref(),
            withhold_client_credential: fwd.withhold_client_credential,
        };
        let plan = plan_challenges(&answer, values);
        if let Some(out) = &plan.values {
            replace_response_header("www-authenticate", out);
        }
        if plan.rejected > 0 {
            info!(
                "{} challenge realm(s) from {} not allowlisted for {}, left alone",
                plan.rejected, fwd.authority, fwd.registry
            );
        }
        if plan.dropped > 0 {
            info!(
                "{} challenge(s) from {} dropped: {} gets no client credential from the shared host",
                plan.dropped, fwd.authority, fwd.registry
            );
        }
        shared
            .metrics
            .inc(Counter::ChallengesRewritten, plan.rewritten);
        shared
            .metrics
            .inc(Counter::ChallengesRejected, plan.rejected);
        if plan.record_token_host {
            shared_data::record_token_host(&fwd.registry, &fwd.authority);
        }
        let store = |l: &LearnedRealm| shared.seen_realms.store(&fwd.registry, l);
        for u in &plan.record(store) {
            shared_data::add_issued_realm(&fwd.registry, u);
        }
    }

    /// Applies [`plan_link`] to the answer's `Link` values.
    fn apply_link(fwd: &Forward, values: Vec<Vec<u8>>) {
        let plan = plan_link(fwd, values);
        if let Some(out) = &plan.values {
            replace_response_header("link", out);
        }
        if plan.dropped > 0 {
            info!(
                "{} link(s) from {} for {} dropped: not a page on the mirror",
                plan.dropped, fwd.authority, fwd.registry
            );
        }
    }

    /// Applies [`plan_redirect`] to the answer's `Location`; the reply to send instead of
    /// the answer when the redirect is refused.
    fn apply_redirect(
        shared: &Shared,
        fwd: &Forward,
        status: Option<u32>,
        location: Option<&[u8]>,
    ) -> Option<Reply> {
        let key_and_now = || (shared.signing_key(), now_secs());
        let unsigned = || shared.metrics.inc(Counter::RedirectsUnsigned, 1);
        match plan_redirect(&shared.cfg, fwd, status, location, key_and_now) {
            RedirectPlan::None => None,
            RedirectPlan::Signed(u) => {
                set_response_header("location", &u);
                shared.metrics.inc(Counter::RedirectsSigned, 1);
                None
            }
            RedirectPlan::Passthrough => {
                unsigned();
                None
            }
            RedirectPlan::Refused(r) => {
                unsigned();
                info!("{}", r.message);
                Some(r)
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
            return self.reply(&Failure::NotConfigured.reply());
        };
        let map = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(m) => m,
            Err(e) => {
                warn!("cannot read the request headers: {e:?}");
                return self.fail(&shared, Failure::UnreadableRequest);
            }
        };
        let client = match RequestHeaders::from_map(map) {
            Ok(h) => h,
            Err(name) => {
                debug!("rejected request: header {name} is not UTF-8");
                return self.fail(&shared, Failure::HeaderEncoding);
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
        let (key, now) = if needs_signing_key(&client.path) {
            (shared.signing_key(), now_secs())
        } else {
            (Vec::new(), 0)
        };
        match route_with(&shared.cfg, &req, &key, now, &SharedLearned) {
            Decision::Reply(r) => {
                if let Some(reason) = r.reason {
                    debug!(
                        "{} {} {}: {} ({})",
                        r.status,
                        client.method,
                        client.path.chars().take(300).collect::<String>(),
                        reason.as_str(),
                        r.message
                    );
                }
                self.answer(&shared, &r)
            }
            Decision::Forward(f) => match self.apply_forward(&shared, f, &client) {
                Ok(()) => Action::Continue,
                Err(e) => {
                    warn!("cannot rewrite the request: {e:?}");
                    self.fail(&shared, Failure::Rewrite)
                }
            },
            Decision::LearnRealm(lr) => self.learn_and_forward(&shared, lr, client),
            Decision::Ping(ping) => self.answer_ping(&shared, ping, client),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(shared), Some(fwd)) = (self.shared.as_ref(), self.forwarded.as_ref()) else {
            return Action::Continue;
        };
        let h = match hostcalls::get_map_bytes(MapType::HttpResponseHeaders) {
            Ok(m) => ResponseHeaders::from_map(m),
            Err(e) => {
                warn!("cannot read the response headers: {e:?}");
                return Action::Continue;
            }
        };
        Self::apply_challenges(shared, fwd, h.status, h.challenges);
        if let Some(r) = Self::apply_redirect(shared, fwd, h.status, h.location.as_deref()) {
            return self.reply(&r);
        }
        Self::apply_link(fwd, h.links);
        if let Some(ns) = &fwd.oci_namespace_echo {
            set_response_header("oci-namespace", ns);
        }
        Action::Continue
    }
}
