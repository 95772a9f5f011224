//! Request routing: from the client's request line to a [`Decision`].

use super::challenge::LearnedRealm;
use super::config::{ClientAuth, CompiledConfig, Registry};
use super::digest::Digest;
use super::hosts::{any_match, is_valid_authority};
use super::names::{is_valid_name, NameError, Reference};
use super::oci_error::{render, ErrorCode};
use super::realms::RealmUrl;
use super::redirect::{SignedRedirect, PREFIX as REDIRECT_PREFIX};
use super::token::{self, LearnError, RealmCall};
use super::token_host::{is_bearer, strip_credential};
use std::borrow::Cow;

/// Path prefix of token requests.
pub const AUTH_PREFIX: &str = "/_mirror/auth/";

/// cache-service's token relay to the upstream's own realm, whatever realm the client's
/// token request reached (`/_mirror/auth/<host>/<path>` names one the cache checks).
pub const OWN_REALM_PATH: &str = "/_mirror/token";

/// Request header the filter sets on routes to cache-service: Envoy's ring hash over the
/// cache replicas hashes it, so one blob goes to one replica whatever repository names it.
pub const CACHE_KEY_HEADER: &str = "x-mirror-cache-key";

/// The parts of a client request routing needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:authority` as sent by the client.
    pub authority: &'a str,
    /// `:path` including the query.
    pub path: &'a str,
    /// `:scheme`.
    pub scheme: &'a str,
    /// `x-forwarded-proto`, if any.
    pub forwarded_proto: Option<&'a str>,
    /// `authorization`, if any.
    pub authorization: Option<&'a str>,
}

/// What kind of forward this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardKind {
    /// A `/v2/` API request to the registry upstream.
    Registry,
    /// A token request to a realm host.
    Auth,
    /// A signed redirect target.
    Redirect,
}

/// Forward the request upstream after rewriting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Kind of forward.
    pub kind: ForwardKind,
    /// Registry name (canonical).
    pub registry: String,
    /// New `:authority`.
    pub authority: String,
    /// New `:path` (with query).
    pub path: String,
    /// The client's `ns` (decoded): echoed in an `OCI-Namespace` response header, and put
    /// back into the answer's links.
    pub oci_namespace_echo: Option<String>,
    /// Remove the client's `Authorization`.
    pub strip_authorization: bool,
    /// A `/v2/` forward from the shared host to a registry without
    /// `forward_client_credentials`: the credential the client keeps for the mirror host is
    /// not this registry's, so only a Bearer token (issued through the mirror-routed realm)
    /// reaches it, and its answer's challenges are cut to the mirror's Bearer realms
    /// ([`super::response::plan_challenges`]).
    pub withhold_client_credential: bool,
    /// `<scheme>://<client authority>` for URLs handed back to the client.
    pub mirror_base: String,
    /// Path-prefix mode: the registry component the client put in front of the name
    /// (lowercase); challenge scopes are rewritten into that namespace.
    pub path_prefix: Option<String>,
    /// For a cached registry: the [`CACHE_KEY_HEADER`] value (see [`CacheKey`]).
    pub cache_key: Option<String>,
}

impl Forward {
    /// Whether Envoy sends this forward to cache-service: it carries a cache key, or its new
    /// authority is a cached registry's upstream (Envoy picks the route by authority).
    pub fn reaches_cache(&self, cfg: &CompiledConfig) -> bool {
        self.cache_key.is_some()
            || cfg
                .registries()
                .iter()
                .any(|r| r.cache && r.upstream == self.authority)
    }

    /// Whether the forwarded request gets `x-mirror-registry: <registry>`, `client_sent`
    /// saying the client sent one itself. Only cache-service reads it, and Envoy strips it
    /// on every other route; a client's copy must still never reach an upstream, so it is
    /// overwritten wherever one came. Otherwise not written: one host call fewer.
    pub fn sets_registry_header(&self, cfg: &CompiledConfig, client_sent: bool) -> bool {
        client_sent || self.reaches_cache(cfg)
    }
}

/// What a request to cache-service is hashed on, so that every replica-bound request for
/// the same content lands on the same replica: a blob or a manifest by digest on its
/// digest (content-addressed, whatever repository or registry names it), a manifest by
/// tag on `registry/name:tag` (one tag record), anything else on its path.
#[derive(Debug, Clone, Copy)]
enum CacheKey<'a> {
    /// A validated digest.
    Digest(&'a str),
    Tag {
        registry: &'a str,
        /// A validated repository name.
        name: &'a str,
        tag: &'a str,
    },
    Path(&'a str),
}

impl CacheKey<'_> {
    fn header_value(self) -> String {
        match self {
            Self::Digest(digest) => digest.to_owned(),
            Self::Tag {
                registry,
                name,
                tag,
            } => format!("{registry}/{name}:{tag}"),
            Self::Path(path) => path.to_owned(),
        }
    }
}

/// A token request for a registry whose realm is not the one the client asked: the
/// filter must know that registry's realm (shared data, else a `GET /v2/` to `cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnRealm {
    /// Target registry (canonical name).
    pub registry: String,
    /// Envoy cluster of its upstream.
    pub cluster: String,
    /// Its upstream `host[:port]` (`:authority` of the `/v2/` call).
    pub upstream: String,
    /// The client's query with scopes rewritten (`service` replaced once learned).
    pub query: Option<String>,
    /// `<scheme>://<client authority>`.
    pub mirror_base: String,
    /// The realm URL the client asked, when it is the registry's own realm host but not
    /// (yet) known as issued: forwarded only if the learned realm is exactly this one.
    pub expect: Option<RealmUrl>,
    /// Remove the client's `Authorization` (see [`Forward::strip_authorization`]).
    pub strip_authorization: bool,
}

/// A `/v2/` ping on the shared mirror host, answered locally so that it does not depend
/// on the default registry's upstream: `401` with that registry's last known challenge,
/// else learned with a `GET /v2/` to `cluster` (see [`ping_reply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    /// The default registry (canonical name).
    pub registry: String,
    /// Envoy cluster of its upstream.
    pub cluster: String,
    /// Its upstream `host[:port]`.
    pub upstream: String,
    /// Base of URLs handed to the client.
    pub mirror_base: String,
}

/// What the filter has learned from upstream answers (shared data, in the glue).
pub trait Learned {
    /// Is `host` a recorded token host of `registry` (see [`super::token_host`])?
    fn is_token_host(&self, registry: &str, host: &str) -> bool;
    /// Did `registry` issue the realm `authority` + `path` (see [`super::realms`])?
    fn is_issued_realm(&self, registry: &str, authority: &str, path: &str) -> bool;
}

/// Nothing learned yet (a fresh Envoy).
pub struct NothingLearned;

impl Learned for NothingLearned {
    fn is_token_host(&self, _: &str, _: &str) -> bool {
        false
    }
    fn is_issued_realm(&self, _: &str, _: &str, _: &str) -> bool {
        false
    }
}

/// Why a request was answered locally with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Method not GET/HEAD.
    Method,
    /// Path not served.
    NotFound,
    /// Malformed path, authority or header.
    BadRequest,
    /// Invalid repository name.
    NameInvalid,
    /// Invalid tag.
    TagInvalid,
    /// Invalid digest.
    DigestInvalid,
    /// Unknown registry.
    NameUnknown,
    /// Realm host not allowlisted.
    RealmDenied,
    /// Signed redirect refused.
    RedirectDenied,
    /// A registry's realm could not be learned.
    RealmUnavailable,
    /// The request's Host is not one the mirror serves (`public_url` set).
    Misdirected,
}

impl RejectReason {
    /// All reasons (for defining metrics).
    pub const ALL: [RejectReason; 11] = [
        RejectReason::Method,
        RejectReason::NotFound,
        RejectReason::BadRequest,
        RejectReason::NameInvalid,
        RejectReason::TagInvalid,
        RejectReason::DigestInvalid,
        RejectReason::NameUnknown,
        RejectReason::RealmDenied,
        RejectReason::RedirectDenied,
        RejectReason::RealmUnavailable,
        RejectReason::Misdirected,
    ];

    /// Snake-case name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Method => "method",
            RejectReason::NotFound => "not_found",
            RejectReason::BadRequest => "bad_request",
            RejectReason::NameInvalid => "name_invalid",
            RejectReason::TagInvalid => "tag_invalid",
            RejectReason::DigestInvalid => "digest_invalid",
            RejectReason::NameUnknown => "name_unknown",
            RejectReason::RealmDenied => "realm_denied",
            RejectReason::RedirectDenied => "redirect_denied",
            RejectReason::RealmUnavailable => "realm_unavailable",
            RejectReason::Misdirected => "misdirected",
        }
    }
}

/// Answer locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u32,
    /// Body: OCI error JSON, `{}` (a `/v2/` 200) or a placeholder token.
    pub body: String,
    /// Headers: `content-type`, `docker-distribution-api-version` and any the answer needs.
    pub headers: Vec<(String, String)>,
    /// Why the request was rejected, for the rejection metric; `None` for an answer that
    /// rejects nothing (a `/v2/` ping's 200 or 401, a placeholder token), a refused upstream
    /// redirect, and the filter's own [`Failure`]s that are no fault of the request.
    pub reason: Option<RejectReason>,
    /// Human-readable detail for logs.
    pub message: String,
}

/// Routing result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward upstream.
    Forward(Forward),
    /// Reply locally.
    Reply(Reply),
    /// Token request for a realm the filter must learn first: learn it, then forward.
    LearnRealm(LearnRealm),
    /// Shared-host `/v2/` ping: answer from the default registry's known challenge.
    Ping(Ping),
}

fn base_headers() -> Vec<(String, String)> {
    vec![
        ("content-type".into(), "application/json".into()),
        (
            "docker-distribution-api-version".into(),
            "registry/2.0".into(),
        ),
    ]
}

/// A local OCI error: `message` is both the error's and the log's.
pub(crate) fn error_reply(
    status: u32,
    code: ErrorCode,
    reason: Option<RejectReason>,
    message: &str,
) -> Reply {
    let mut headers = base_headers();
    if status == 405 {
        headers.push(("allow".into(), "GET, HEAD".into()));
    }
    Reply {
        status,
        body: render(code, message),
        headers,
        reason,
        message: message.to_string(),
    }
}

fn reject_reply(status: u32, code: ErrorCode, reason: RejectReason, message: &str) -> Reply {
    error_reply(status, code, Some(reason), message)
}

/// A request the filter could not handle for a reason of its own (no configuration, a
/// failed host call, headers it cannot read): answered here like every other, the glue
/// only sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No configuration loaded: 500 `UNSUPPORTED`.
    NotConfigured,
    /// The request headers could not be read: 500 `UNSUPPORTED`.
    UnreadableRequest,
    /// A request header the rules read is not UTF-8: 400 `UNSUPPORTED`, a
    /// [`RejectReason::BadRequest`].
    HeaderEncoding,
    /// A routed request could not be rewritten for its forward: 500 `UNSUPPORTED`.
    Rewrite,
    /// A token request could not be rewritten for its registry's realm: 502 `UNAVAILABLE`,
    /// a [`RejectReason::RealmUnavailable`] as when the realm cannot be learned.
    TokenRewrite,
}

impl Failure {
    /// The local answer.
    pub fn reply(self) -> Reply {
        let unsupported = ErrorCode::Unsupported;
        match self {
            Failure::NotConfigured => error_reply(500, unsupported, None, "mirror not configured"),
            Failure::UnreadableRequest => {
                error_reply(500, unsupported, None, "cannot read the request")
            }
            Failure::HeaderEncoding => reject_reply(
                400,
                unsupported,
                RejectReason::BadRequest,
                "invalid header encoding",
            ),
            Failure::Rewrite => error_reply(500, unsupported, None, "cannot rewrite the request"),
            Failure::TokenRewrite => {
                realm_failure(ErrorCode::Unavailable, "cannot rewrite the request")
            }
        }
    }
}

fn reject(status: u32, code: ErrorCode, reason: RejectReason, message: &str) -> Decision {
    Decision::Reply(reject_reply(status, code, reason, message))
}

fn not_found(message: &str) -> Decision {
    reject(404, ErrorCode::Unsupported, RejectReason::NotFound, message)
}

fn bad_request(message: &str) -> Decision {
    reject(
        400,
        ErrorCode::Unsupported,
        RejectReason::BadRequest,
        message,
    )
}

fn name_unknown(message: &str) -> Decision {
    reject(
        404,
        ErrorCode::NameUnknown,
        RejectReason::NameUnknown,
        message,
    )
}

fn denied(reason: RejectReason, message: &str) -> Decision {
    reject(403, ErrorCode::Denied, reason, message)
}

/// `<scheme>://<authority>` for URLs given back to the client: from `public_url` when
/// configured (host-mode hosts keep their name), else from the request.
fn mirror_base(cfg: &CompiledConfig, req: &Request<'_>) -> String {
    if let Some(p) = &cfg.public_url {
        let host = host_without_port(req.authority);
        return if cfg.registry_for_host(&host).is_some() {
            p.base_for(&host)
        } else {
            p.base_for(&p.host)
        };
    }
    let known = |p: &str| {
        ["http", "https"]
            .into_iter()
            .find(|k| p.eq_ignore_ascii_case(k))
    };
    let proto = req
        .forwarded_proto
        .and_then(|p| p.split(',').next())
        .and_then(|p| known(p.trim()));
    let scheme = proto.unwrap_or(if req.scheme.eq_ignore_ascii_case("https") {
        "https"
    } else {
        "http"
    });
    // Built in place: this runs on every forwarded request.
    let mut base = String::with_capacity(scheme.len() + 3 + req.authority.len());
    base.push_str(scheme);
    base.push_str("://");
    base.push_str(req.authority);
    base
}

/// A client authority we are willing to echo into URLs.
fn is_sane_authority(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 255
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
}

/// Host part of an authority, lowercased, without port (borrowed when already lowercase:
/// routing asks it on every request).
fn host_without_port(a: &str) -> Cow<'_, str> {
    let h = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        a.get(..crate::url::find_byte(a, b':')).unwrap_or_default()
    };
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        h.to_ascii_lowercase().into()
    } else {
        h.into()
    }
}

/// Path tricks that must not reach routing components: `//`, `\`, `.` or `..` segments,
/// encoded `/`, `.`, `\` or NUL. One pass over the bytes (it runs on every request).
pub(crate) fn has_path_tricks(path: &str) -> bool {
    let b = path.as_bytes();
    let dot_segment = |s: Option<&[u8]>| matches!(s, Some(b"." | b".."));
    let mut segment = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' => return true,
            b'/' => {
                if b.get(i + 1) == Some(&b'/') || dot_segment(b.get(segment..i)) {
                    return true;
                }
                segment = i + 1;
            }
            b'%' if matches!(
                b.get(i + 1..i + 3),
                Some([b'2', b'f' | b'F' | b'e' | b'E'] | [b'5', b'c' | b'C'] | [b'0', b'0'])
            ) =>
            {
                return true
            }
            _ => {}
        }
    }
    dot_segment(b.get(segment..))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let h = std::str::from_utf8(h).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits out `ns` (first value, decoded) and returns the rest of the query byte for byte.
pub(crate) fn take_ns(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(q) = query else {
        return (None, None);
    };
    let mut ns = None;
    let mut kept: Vec<&str> = Vec::new();
    for seg in q.split('&') {
        let key = seg.split('=').next().unwrap_or_default();
        if key == "ns" {
            if ns.is_none() {
                ns = Some(seg.get(3..).unwrap_or_default().to_string());
            }
        } else {
            kept.push(seg);
        }
    }
    let rest = if kept.is_empty() {
        None
    } else {
        Some(kept.join("&"))
    };
    (ns, rest)
}

pub(crate) fn with_query(mut path: String, query: Option<&str>) -> String {
    if let Some(q) = query {
        path.reserve(1 + q.len());
        path.push('?');
        path.push_str(q);
    }
    path
}

/// Does routing `path` verify a signed redirect, so that it needs the signing key and the
/// clock (reading them costs host calls the other requests skip)?
pub fn needs_signing_key(path: &str) -> bool {
    path.starts_with(REDIRECT_PREFIX)
}

/// Routes one request on a fresh Envoy (nothing learned).
///
/// `key` is the signing key (only used for `/_mirror/redirect/`; shorter than
/// 32 bytes means every signed URL is refused), `now` is unix seconds.
pub fn route(cfg: &CompiledConfig, req: &Request<'_>, key: &[u8], now: u64) -> Decision {
    route_with(cfg, req, key, now, &NothingLearned)
}

/// [`route`], with what the filter has `learned` (token hosts, issued realms).
pub fn route_with(
    cfg: &CompiledConfig,
    req: &Request<'_>,
    key: &[u8],
    now: u64,
    learned: &dyn Learned,
) -> Decision {
    if req.method != "GET" && req.method != "HEAD" {
        return reject(
            405,
            ErrorCode::Unsupported,
            RejectReason::Method,
            "the mirror only serves GET and HEAD",
        );
    }
    if !is_sane_authority(req.authority) {
        return bad_request("invalid host");
    }
    let host = host_without_port(req.authority);
    if !cfg.serves_host(&host) {
        return reject(
            421,
            ErrorCode::Denied,
            RejectReason::Misdirected,
            &format!("host {host} is not served by this mirror"),
        );
    }
    let full = req.path;
    if !full.starts_with('/') || !full.bytes().all(super::url::is_url_char) {
        return bad_request("invalid request path");
    }
    let q = super::url::find_byte(full, b'?');
    let (path, query) = (full.get(..q).unwrap_or(full), full.get(q + 1..));

    if needs_signing_key(full) {
        return route_redirect(cfg, req, key, now, learned);
    }
    if has_path_tricks(path) {
        return bad_request("invalid request path");
    }
    if let Some(rest) = path.strip_prefix(AUTH_PREFIX) {
        return route_auth(cfg, req, rest, query, learned);
    }
    if path == "/v2" || path == "/v2/" {
        return route_v2(cfg, req, &host, None, query);
    }
    if let Some(rest) = path.strip_prefix("/v2/") {
        return route_v2(cfg, req, &host, Some(rest), query);
    }
    not_found("unsupported path")
}

/// The first `/`-separated component of a name.
fn first_component(name: Option<&str>) -> Option<&str> {
    name.map(|n| n.split('/').next().unwrap_or(n))
}

/// The name without its first component; `None` when that was the only one.
fn drop_first(name: Option<&str>) -> Option<&str> {
    name.and_then(|n| n.split_once('/')).map(|(_, r)| r)
}

enum Kind {
    Manifests,
    Blobs,
    Tags,
    Referrers,
}

/// `host`: the client's, as [`host_without_port`] gives it.
fn route_v2(
    cfg: &CompiledConfig,
    req: &Request<'_>,
    host: &str,
    rest: Option<&str>,
    query: Option<&str>,
) -> Decision {
    let (ns_raw, query_rest) = take_ns(query);

    // Parse the resource path first (without touching the registry): `<name>/<kind>/<last>`,
    // the name kept as the slice of its `/`-separated components (at least one).
    let (parsed, mut name) = match rest {
        None => (None, None),
        Some(rest) => {
            // The last two `/` (a byte loop: this runs on every request).
            let slash_before =
                |end: usize| rest.as_bytes().get(..end)?.iter().rposition(|&b| b == b'/');
            let Some((k, n)) = slash_before(rest.len()).and_then(|k| Some((k, slash_before(k)?)))
            else {
                return not_found("unsupported path");
            };
            let (Some(name), Some(kind), Some(last)) =
                (rest.get(..n), rest.get(n + 1..k), rest.get(k + 1..))
            else {
                return not_found("unsupported path");
            };
            let kind = match (kind, last) {
                ("tags", "list") => Kind::Tags,
                ("manifests", _) => Kind::Manifests,
                ("blobs", _) => Kind::Blobs,
                ("referrers", _) => Kind::Referrers,
                _ => return not_found("unsupported path"),
            };
            (Some((kind, last)), Some(name))
        }
    };

    // Registry selection: host mode, ns, path prefix, default.
    let host_mode = cfg.registry_for_host(host);
    let ns_reg = match &ns_raw {
        None => None,
        Some(raw) => match percent_decode(raw).and_then(|d| cfg.registry(&d).map(|r| (d, r))) {
            Some(x) => Some(x),
            None => {
                if host_mode.is_none() {
                    return name_unknown("unknown registry in ns");
                }
                None
            }
        },
    };
    let echo = ns_reg.as_ref().map(|(d, _)| d.clone());
    let mut path_prefix = None;
    let mut by_default = false;
    let registry: Option<&Registry> = if let Some(r) = host_mode {
        Some(r)
    } else if let Some((_, r)) = ns_reg {
        // containerd's path-prefix mode (`override_path`) still adds `ns`: a first
        // component naming the ns registry itself is the client's prefix, not part of
        // the name. A component naming another registry stays (a legal repository path).
        if let Some(first) =
            first_component(name).filter(|f| cfg.registry(f).is_some_and(|p| p.name == r.name))
        {
            path_prefix = Some(first.to_ascii_lowercase());
            name = drop_first(name);
        }
        Some(r)
    } else if let Some(first) = first_component(name).filter(|f| f.contains(['.', ':'])) {
        match cfg.registry(first) {
            Some(r) => {
                path_prefix = Some(first.to_ascii_lowercase());
                name = drop_first(name);
                Some(r)
            }
            None => return name_unknown("unknown registry"),
        }
    } else {
        by_default = true;
        cfg.default_registry()
    };

    let Some((kind, last)) = parsed else {
        // `/v2/` itself.
        return match registry {
            None => Decision::Reply(Reply {
                status: 200,
                body: "{}".into(),
                headers: base_headers(),
                reason: None,
                message: "local /v2/".into(),
            }),
            // The shared host's ping must not depend on one upstream being up (a cached
            // default registry's ping goes to the local cache-service, as before).
            Some(r) if by_default && !r.cache => Decision::Ping(Ping {
                registry: r.name.clone(),
                cluster: r.cluster.clone(),
                upstream: r.upstream.clone(),
                mirror_base: mirror_base(cfg, req),
            }),
            Some(r) => forward(
                cfg,
                r,
                req,
                ("/v2/".into(), None),
                query_rest.as_deref(),
                Naming {
                    by_host: host_mode.is_some(),
                    ns: echo,
                    path_prefix: None,
                },
            ),
        };
    };
    let Some(registry) = registry else {
        return name_unknown("no registry selected");
    };
    let invalid_name = || {
        reject(
            400,
            ErrorCode::NameInvalid,
            RejectReason::NameInvalid,
            "invalid repository name",
        )
    };
    let Some(name) = name else {
        return invalid_name();
    };
    // The upstream path is built in one buffer and the name checked where it lies in it
    // (this runs on every request): `/v2/<name>/<kind>/<last>`.
    const V2: &str = "/v2/";
    const LIBRARY: &str = "library/";
    let library = registry.library_namespace && !name.contains('/');
    let mut path = String::with_capacity(
        V2.len() + LIBRARY.len() + name.len() + "/referrers/".len() + last.len(),
    );
    path.push_str(V2);
    if library {
        path.push_str(LIBRARY);
    }
    path.push_str(name);
    let name_end = path.len();
    if !path.get(V2.len()..).is_some_and(is_valid_name) {
        return invalid_name();
    }
    let (segment, is_digest) = match kind {
        Kind::Tags => ("/tags/", false),
        Kind::Manifests => match Reference::check(last) {
            Ok(is_digest) => ("/manifests/", is_digest),
            Err(e) => return reference_error(&e),
        },
        Kind::Blobs | Kind::Referrers => match Digest::check(last) {
            Ok(_) => (
                if matches!(kind, Kind::Blobs) {
                    "/blobs/"
                } else {
                    "/referrers/"
                },
                true,
            ),
            Err(e) => return reference_error(&e),
        },
    };
    path.push_str(segment);
    path.push_str(last);
    // Only a cached registry's requests carry the key: not computed for the others.
    let key = registry.cache.then(|| {
        let name = path.get(V2.len()..name_end).unwrap_or_default();
        match kind {
            Kind::Manifests | Kind::Blobs if is_digest => CacheKey::Digest(last),
            Kind::Manifests => CacheKey::Tag {
                registry: &registry.name,
                name,
                tag: last,
            },
            Kind::Tags | Kind::Blobs | Kind::Referrers => CacheKey::Path(&path),
        }
        .header_value()
    });
    forward(
        cfg,
        registry,
        req,
        (path, key),
        query_rest.as_deref(),
        Naming {
            by_host: host_mode.is_some(),
            ns: echo,
            path_prefix,
        },
    )
}

fn reference_error(e: &NameError) -> Decision {
    match e {
        NameError::Tag => reject(
            400,
            ErrorCode::TagInvalid,
            RejectReason::TagInvalid,
            "invalid tag",
        ),
        NameError::Digest => reject(
            400,
            ErrorCode::DigestInvalid,
            RejectReason::DigestInvalid,
            "invalid digest",
        ),
        NameError::Name => reject(
            400,
            ErrorCode::NameInvalid,
            RejectReason::NameInvalid,
            "invalid repository name",
        ),
    }
}

/// How the client named the registry of a `/v2/` request.
struct Naming {
    /// By the mirror host name (host mode): that host is the registry's own credential domain.
    by_host: bool,
    /// The client's `ns` (decoded), echoed in `OCI-Namespace`.
    ns: Option<String>,
    /// The registry component the client put in front of the name (lowercase).
    path_prefix: Option<String>,
}

/// Does the client's credential for the mirror host stay away from `r`? On the shared host
/// (one credential domain for every registry) unless the operator opted `r` in.
fn withholds_client_credential(by_host: bool, r: &Registry) -> bool {
    !by_host && !r.forward_client_credentials
}

/// `(path, key)`: the upstream path and, for a resource, its [`CacheKey`] value (a cached
/// registry's other requests are keyed on their path).
fn forward(
    cfg: &CompiledConfig,
    r: &Registry,
    req: &Request<'_>,
    (path, key): (String, Option<String>),
    query: Option<&str>,
    naming: Naming,
) -> Decision {
    let cache_key = r
        .cache
        .then(|| key.unwrap_or_else(|| CacheKey::Path(&path).header_value()));
    let withhold = withholds_client_credential(naming.by_host, r);
    Decision::Forward(Forward {
        kind: ForwardKind::Registry,
        registry: r.name.clone(),
        authority: r.upstream.clone(),
        path: with_query(path, query),
        oci_namespace_echo: naming.ns,
        // A Bearer token came from the mirror-routed realm, which withholds the login
        // already; anything else (Basic) is the mirror host's login itself.
        strip_authorization: withhold && req.authorization.is_some_and(|a| !is_bearer(a)),
        withhold_client_credential: withhold,
        mirror_base: mirror_base(cfg, req),
        path_prefix: naming.path_prefix,
        cache_key,
    })
}

fn route_auth(
    cfg: &CompiledConfig,
    req: &Request<'_>,
    rest: &str,
    query: Option<&str>,
    learned: &dyn Learned,
) -> Decision {
    let (host, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.to_ascii_lowercase();
    if !is_valid_authority(&host) {
        return denied(RejectReason::RealmDenied, "realm host not allowed");
    }
    // Host mode: the host is one registry's own credential domain; only its realms.
    let host_mode = cfg.registry_for_host(&host_without_port(req.authority));
    let realm_registry = match host_mode {
        Some(r) if any_match(&r.realm_hosts, &host) => r,
        Some(r) => {
            return denied(
                RejectReason::RealmDenied,
                &format!("realm host not allowed for {}", r.name),
            )
        }
        None => match cfg.registry_for_realm(&host) {
            Some(r) => r,
            None => return denied(RejectReason::RealmDenied, "realm host not allowed"),
        },
    };
    // Scopes in the client's namespace (path prefixes) → the target registry's.
    let plan = match token::plan(cfg, realm_registry, host_mode.is_none(), query) {
        Ok(p) => p,
        Err(token::ScopeError::NameInvalid) => {
            return reject(
                400,
                ErrorCode::NameInvalid,
                RejectReason::NameInvalid,
                token::ScopeError::NameInvalid.as_str(),
            )
        }
        Err(e) => return bad_request(e.as_str()),
    };
    let target = plan.target;
    // The shared host is one credential domain: the operator says per registry whether
    // its realm gets the client's credentials.
    let strip_authorization = withholds_client_credential(host_mode.is_some(), target);
    if target.cache {
        return match target.client_auth {
            // cache-service authenticates upstream itself and ignores the client's
            // Authorization: no upstream token is needed.
            ClientAuth::Anonymous => Decision::Reply(placeholder_token(&format!(
                "placeholder token for cached registry {}",
                target.name
            ))),
            // The client logs in at the upstream's realm by way of cache-service, which
            // forwards only the realm URL the upstream itself issues. A token request that
            // reached another registry's realm (the shared host's ping named the default
            // registry's) goes to the target's own realm, as for any registry.
            ClientAuth::Upstream => {
                let realm = if any_match(&target.realm_hosts, &host) {
                    format!("{AUTH_PREFIX}{host}/{tail}")
                } else {
                    OWN_REALM_PATH.to_owned()
                };
                let path = with_query(realm, plan.query.as_deref());
                Decision::Forward(Forward {
                    kind: ForwardKind::Auth,
                    registry: target.name.clone(),
                    authority: target.upstream.clone(),
                    cache_key: Some(CacheKey::Path(&path).header_value()),
                    path,
                    oci_namespace_echo: None,
                    strip_authorization,
                    withhold_client_credential: false,
                    mirror_base: mirror_base(cfg, req),
                    path_prefix: None,
                })
            }
        };
    }
    let path = format!("/{tail}");
    let learn = |expect| {
        Decision::LearnRealm(LearnRealm {
            registry: target.name.clone(),
            cluster: target.cluster.clone(),
            upstream: target.upstream.clone(),
            query: plan.query.clone(),
            mirror_base: mirror_base(cfg, req),
            expect,
            strip_authorization,
        })
    };
    if !any_match(&target.realm_hosts, &host) {
        // Another registry's token: sent to that registry's own (learned) realm.
        return learn(None);
    }
    if !learned.is_issued_realm(&target.name, &host, &path) {
        // Only a realm URL the registry issued: a realm call confirms it, else 403.
        return match RealmUrl::new(&host, &path) {
            Some(u) => learn(Some(u)),
            None => denied(RejectReason::RealmDenied, "realm URL not issued"),
        };
    }
    Decision::Forward(Forward {
        kind: ForwardKind::Auth,
        registry: target.name.clone(),
        authority: host,
        path: with_query(path, plan.query.as_deref()),
        oci_namespace_echo: None,
        strip_authorization,
        withhold_client_credential: false,
        mirror_base: mirror_base(cfg, req),
        path_prefix: None,
        cache_key: None,
    })
}

/// The token request of `lr` once `learned` (the target registry's realm) is known: sent
/// to that realm (its host must be on the registry's `realm_hosts`, else 502 `DENIED`);
/// when the client asked a realm URL itself (`expect`), sent there only if it is the
/// learned one, else 403 `DENIED`.
fn forward_to_learned(
    cfg: &CompiledConfig,
    lr: &LearnRealm,
    learned: &LearnedRealm,
) -> Result<Forward, Reply> {
    let allowed = cfg
        .registry(&lr.registry)
        .is_some_and(|r| learned.allowed_for(r));
    let target = match (&lr.expect, allowed) {
        (_, false) => None,
        (None, true) => token::learned_target(learned, lr.query.as_deref()),
        (Some(want), true) => {
            if RealmUrl::from_realm(&learned.realm).as_ref() != Some(want) {
                return Err(reject_reply(
                    403,
                    ErrorCode::Denied,
                    RejectReason::RealmDenied,
                    &format!("realm URL not issued by {}", lr.registry),
                ));
            }
            Some((
                want.authority.clone(),
                with_query(want.path.clone(), lr.query.as_deref()),
            ))
        }
    };
    let Some((authority, path)) = target else {
        return Err(realm_failure(
            ErrorCode::Denied,
            &format!(
                "the token realm {:?} of {} is not on its realm_hosts",
                learned.realm, lr.registry
            ),
        ));
    };
    Ok(Forward {
        kind: ForwardKind::Auth,
        registry: lr.registry.clone(),
        authority,
        path,
        oci_namespace_echo: None,
        strip_authorization: lr.strip_authorization,
        withhold_client_credential: false,
        mirror_base: lr.mirror_base.clone(),
        path_prefix: None,
        cache_key: None,
    })
}

/// A token request sent to its registry's `stored` realm while that one is still allowed;
/// `None`: learn the realm with a call first. A realm URL the client asked itself
/// (`expect`) is checked against a fresh answer, so `stored` is not even read then.
pub fn forward_with_stored(
    cfg: &CompiledConfig,
    lr: &LearnRealm,
    stored: impl FnOnce() -> Option<LearnedRealm>,
) -> Option<Forward> {
    if lr.expect.is_some() {
        return None;
    }
    forward_to_learned(cfg, lr, &stored()?).ok()
}

/// A paused token request once its realm call answered (`status`: the call's
/// `:status`, `None` when it failed): forwarded to the learned realm, a local
/// placeholder token for an anonymous registry, else an error. A realm URL the client
/// asked itself (`expect`) that cannot be confirmed is refused with 403 `DENIED`.
pub fn token_after_realm_call(
    cfg: &CompiledConfig,
    lr: &LearnRealm,
    call: &RealmCall,
    status: Option<u32>,
) -> Result<Forward, Reply> {
    let registry = &lr.registry;
    let status = status.map_or("no answer".to_string(), |s| s.to_string());
    let (code, message) = match call {
        RealmCall::Learned(l) => return forward_to_learned(cfg, lr, l),
        RealmCall::Anonymous if lr.expect.is_none() => {
            // An anonymous registry: nothing to learn, no token needed.
            return Err(placeholder_token(&format!(
                "placeholder token: {registry} answered /v2/ {status} without a challenge"
            )));
        }
        RealmCall::Anonymous => (ErrorCode::Denied, String::new()),
        RealmCall::Failed(LearnError::NoChallenge) => (
            ErrorCode::Unavailable,
            format!("cannot learn the token realm of {registry}: its /v2/ answered {status} without a Bearer challenge"),
        ),
        RealmCall::Failed(LearnError::NotAllowlisted(host)) => (
            ErrorCode::Denied,
            format!("the token realm host {host} of {registry} is not on its realm_hosts"),
        ),
    };
    if lr.expect.is_some() {
        return Err(reject_reply(
            403,
            ErrorCode::Denied,
            RejectReason::RealmDenied,
            &format!("realm URL not issued by {registry}"),
        ));
    }
    Err(realm_failure(code, &message))
}

/// Local 200 with a placeholder token, for registries that need no upstream token
/// (cached ones; ones whose `/v2/` answers 2xx without a challenge).
fn placeholder_token(message: &str) -> Reply {
    Reply {
        status: 200,
        body: token::PLACEHOLDER_TOKEN_BODY.into(),
        headers: base_headers(),
        reason: None,
        message: message.to_string(),
    }
}

/// 502 with an OCI error: a registry's realm could not be learned or is not allowed.
pub(crate) fn realm_failure(code: ErrorCode, message: &str) -> Reply {
    error_reply(502, code, Some(RejectReason::RealmUnavailable), message)
}

/// The answer to a token request whose realm call could not be sent to `cluster`: 502
/// `UNAVAILABLE`.
pub fn realm_call_failed(cluster: &str, error: &str) -> Reply {
    realm_failure(
        ErrorCode::Unavailable,
        &format!("cannot learn the token realm: call to cluster {cluster} failed ({error})"),
    )
}

fn route_redirect(
    cfg: &CompiledConfig,
    req: &Request<'_>,
    key: &[u8],
    now: u64,
    learned: &dyn Learned,
) -> Decision {
    let sr = match SignedRedirect::parse(req.path).and_then(|sr| {
        sr.verify(cfg, key, now)?;
        Ok(sr)
    }) {
        Ok(sr) => sr,
        Err(e) => return denied(RejectReason::RedirectDenied, e.as_str()),
    };
    let strip = strip_credential(req.authorization, || {
        learned.is_token_host(&sr.registry, &sr.target.host)
    });
    Decision::Forward(Forward {
        kind: ForwardKind::Redirect,
        path: sr.target.path_and_query(),
        authority: sr.target.host,
        registry: sr.registry,
        oci_namespace_echo: None,
        strip_authorization: strip,
        withhold_client_credential: false,
        mirror_base: mirror_base(cfg, req),
        path_prefix: None,
        cache_key: None,
    })
}

/// The local answer to a shared-host `/v2/` ping: `401` with the default registry's
/// challenge rewritten to the mirror when its realm is known, else `200 {}` (anonymous;
/// the addressed registry challenges on its own if it needs a token).
pub fn ping_reply(ping: &Ping, realm: Option<&LearnedRealm>) -> Reply {
    let challenge = realm.and_then(|l| {
        let u = super::url::parse_url(&l.realm)?;
        let mut realm = format!(
            "{}/_mirror/auth/{}{}",
            ping.mirror_base, u.authority, u.path
        );
        if let Some(q) = &u.query {
            realm.push('?');
            realm.push_str(q);
        }
        let mut params = vec![("realm".to_string(), realm)];
        if !l.service.is_empty() {
            params.push(("service".to_string(), l.service.clone()));
        }
        Some(super::challenge::serialize(&[
            super::challenge::Challenge {
                scheme: "Bearer".into(),
                token68: None,
                params,
            },
        ]))
    });
    let mut headers = base_headers();
    match challenge {
        Some(c) => {
            headers.push(("www-authenticate".into(), c));
            Reply {
                status: 401,
                body: render(ErrorCode::Unauthorized, "authentication required"),
                headers,
                reason: None,
                message: format!("local /v2/ with the challenge of {}", ping.registry),
            }
        }
        None => Reply {
            status: 200,
            body: "{}".into(),
            headers,
            reason: None,
            message: format!("local /v2/ ({} challenge unknown)", ping.registry),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse as parse_config;
    use crate::redirect::{mirror_url, Target};

    const KEY: [u8; 32] = [9u8; 32];

    fn get<'a>(authority: &'a str, path: &'a str) -> Request<'a> {
        Request {
            method: "GET",
            authority,
            path,
            scheme: "http",
            forwarded_proto: None,
            authorization: None,
        }
    }

    fn fwd(d: Decision) -> Forward {
        match d {
            Decision::Forward(f) => f,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    fn reply(d: Decision) -> Reply {
        match d {
            Decision::Reply(r) => r,
            other => panic!("expected reply, got {other:?}"),
        }
    }

    fn learn(d: Decision) -> LearnRealm {
        match d {
            Decision::LearnRealm(l) => l,
            other => panic!("expected learn-realm, got {other:?}"),
        }
    }

    fn code(r: &Reply) -> String {
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        v["errors"][0]["code"].as_str().unwrap().to_string()
    }

    /// What a running Envoy has learned: issued realms and token hosts.
    #[derive(Default)]
    struct Known {
        realms: Vec<(&'static str, &'static str, &'static str)>,
        token_hosts: Vec<(&'static str, &'static str)>,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl Learned for Known {
        fn is_token_host(&self, registry: &str, host: &str) -> bool {
            self.asked.borrow_mut().push(format!("{registry} {host}"));
            self.token_hosts.contains(&(registry, host))
        }
        fn is_issued_realm(&self, registry: &str, authority: &str, path: &str) -> bool {
            self.realms.contains(&(registry, authority, path))
        }
    }

    /// The realms the shipped registries' challenges name.
    fn known() -> Known {
        Known {
            realms: vec![
                ("docker.io", "auth.docker.io", "/token"),
                ("quay.io", "quay.io", "/v2/auth"),
                ("registry.k8s.io", "us-docker.pkg.dev", "/v2/token"),
            ],
            ..Known::default()
        }
    }

    /// [`route`] on an Envoy that has seen the shipped registries' challenges.
    fn route_known(cfg: &CompiledConfig, req: &Request<'_>) -> Decision {
        route_with(cfg, req, &KEY, 0, &known())
    }

    fn host_cfg() -> CompiledConfig {
        let mut c = crate::config::default_config();
        c.host_suffix = Some("mirror.test".into());
        crate::config::compile(&c).unwrap()
    }

    #[test]
    fn methods() {
        let cfg = parse_config(b"").unwrap();
        for m in ["POST", "PUT", "DELETE", "PATCH", "get", "OPTIONS"] {
            let r = reply(route(
                &cfg,
                &Request {
                    method: m,
                    ..get("m", "/v2/")
                },
                &KEY,
                0,
            ));
            assert_eq!(r.status, 405);
            assert_eq!(code(&r), "UNSUPPORTED");
        }
        let f = fwd(route(
            &cfg,
            &Request {
                method: "HEAD",
                ..get("m", "/v2/alpine/manifests/3")
            },
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/library/alpine/manifests/3");
    }

    #[test]
    fn default_registry_and_library() {
        let cfg = parse_config(b"").unwrap();
        let f = fwd(route(
            &cfg,
            &get("127.0.0.1:5000", "/v2/library/alpine/manifests/3"),
            &KEY,
            0,
        ));
        assert_eq!(f.kind, ForwardKind::Registry);
        assert_eq!(f.registry, "docker.io");
        assert_eq!(f.authority, "registry-1.docker.io");
        assert_eq!(f.path, "/v2/library/alpine/manifests/3");
        assert_eq!(f.mirror_base, "http://127.0.0.1:5000");
        assert!(!f.strip_authorization);
        assert_eq!(f.oci_namespace_echo, None);
        let d = format!("sha256:{}", "0".repeat(64));
        let f = fwd(route(
            &cfg,
            &get("m", &format!("/v2/alpine/blobs/{d}")),
            &KEY,
            0,
        ));
        assert_eq!(f.path, format!("/v2/library/alpine/blobs/{d}"));
        let f = fwd(route(&cfg, &get("m", "/v2/a/b/manifests/1"), &KEY, 0));
        assert_eq!(f.path, "/v2/a/b/manifests/1");
    }

    #[test]
    fn ns_selection_and_query() {
        let cfg = parse_config(b"").unwrap();
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/alpine/manifests/3?ns=docker.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/library/alpine/manifests/3");
        assert_eq!(f.oci_namespace_echo.as_deref(), Some("docker.io"));
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/coreos/etcd/manifests/v3.5?a=%20b&ns=quay.io&&z"),
            &KEY,
            0,
        ));
        assert_eq!(f.registry, "quay.io");
        assert_eq!(f.authority, "quay.io");
        assert_eq!(f.path, "/v2/coreos/etcd/manifests/v3.5?a=%20b&&z");
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/x/manifests/1?ns=index.docker.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.registry, "docker.io");
        assert_eq!(f.path, "/v2/library/x/manifests/1");
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/x/y/manifests/1?ns=registry.k8s%2Eio"),
            &KEY,
            0,
        ));
        assert_eq!(f.registry, "registry.k8s.io");
        let r = reply(route(
            &cfg,
            &get("m", "/v2/x/manifests/1?ns=evil.example"),
            &KEY,
            0,
        ));
        assert_eq!((r.status, code(&r).as_str()), (404, "NAME_UNKNOWN"));
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/r/tags/list?n=10&last=b&ns=ghcr.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/r/tags/list?n=10&last=b");
        assert_eq!(f.authority, "ghcr.io");
        // nsx is not ns.
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/r/tags/list?nsx=quay.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.registry, "docker.io");
        assert_eq!(f.path, "/v2/library/r/tags/list?nsx=quay.io");
    }

    #[test]
    fn path_prefix_selection() {
        let cfg = parse_config(b"").unwrap();
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/quay.io/coreos/etcd/manifests/v3.5"),
            &KEY,
            0,
        ));
        assert_eq!(f.registry, "quay.io");
        assert_eq!(f.path, "/v2/coreos/etcd/manifests/v3.5");
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/docker.io/alpine/manifests/3"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/library/alpine/manifests/3");
        let r = reply(route(
            &cfg,
            &get("m", "/v2/evil.example/x/manifests/1"),
            &KEY,
            0,
        ));
        assert_eq!((r.status, code(&r).as_str()), (404, "NAME_UNKNOWN"));
        let r = reply(route(&cfg, &get("m", "/v2/quay.io/manifests/1"), &KEY, 0));
        assert_eq!((r.status, code(&r).as_str()), (400, "NAME_INVALID"));
    }

    #[test]
    fn ns_with_its_own_path_prefix() {
        let cfg = parse_config(b"").unwrap();
        // containerd `override_path` on `https://mirror/v2/quay.io`: prefix and ns agree.
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/quay.io/coreos/etcd/manifests/v3.5?ns=quay.io"),
            &KEY,
            0,
        ));
        assert_eq!(
            (f.registry.as_str(), f.authority.as_str()),
            ("quay.io", "quay.io")
        );
        assert_eq!(f.path, "/v2/coreos/etcd/manifests/v3.5");
        assert_eq!(f.oci_namespace_echo.as_deref(), Some("quay.io"));
        // An alias of the ns registry is stripped too, then library/ applies.
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/index.docker.io/alpine/manifests/3?ns=docker.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/library/alpine/manifests/3");
        assert_eq!(f.path_prefix.as_deref(), Some("index.docker.io"));
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/docker.io/alpine/manifests/3?ns=index.docker.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/library/alpine/manifests/3");
        // A first component naming another registry stays part of the name.
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/docker.io/library/x/manifests/1?ns=quay.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.registry, "quay.io");
        assert_eq!(f.path, "/v2/docker.io/library/x/manifests/1");
        // A host-like component that is no registry: also part of the name.
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/example.com/x/manifests/1?ns=quay.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/example.com/x/manifests/1");
        // Only the prefix: no name left.
        let r = reply(route(
            &cfg,
            &get("m", "/v2/quay.io/manifests/1?ns=quay.io"),
            &KEY,
            0,
        ));
        assert_eq!((r.status, code(&r).as_str()), (400, "NAME_INVALID"));
        // Host mode wins over ns; nothing is stripped there.
        let f = fwd(route(
            &host_cfg(),
            &get("quay.mirror.test", "/v2/quay.io/x/manifests/1?ns=quay.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/quay.io/x/manifests/1");
        assert_eq!(f.path_prefix, None);
    }

    #[test]
    fn host_mode() {
        let cfg = host_cfg();
        let f = fwd(route(
            &cfg,
            &get(
                "quay.mirror.test:8443",
                "/v2/coreos/etcd/manifests/v3.5?ns=docker.io",
            ),
            &KEY,
            0,
        ));
        assert_eq!(f.registry, "quay.io");
        assert_eq!(f.path, "/v2/coreos/etcd/manifests/v3.5");
        assert_eq!(f.mirror_base, "http://quay.mirror.test:8443");
        let f = fwd(route(&cfg, &get("GCR.mirror.test", "/v2/"), &KEY, 0));
        assert_eq!((f.registry.as_str(), f.path.as_str()), ("gcr.io", "/v2/"));
        let f = fwd(route(
            &cfg,
            &get("docker.mirror.test", "/v2/alpine/manifests/3"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/library/alpine/manifests/3");
        // Host mode wins over an unknown ns.
        let f = fwd(route(
            &cfg,
            &get("ghcr.mirror.test", "/v2/a/b/manifests/1?ns=zzz"),
            &KEY,
            0,
        ));
        assert_eq!(f.registry, "ghcr.io");
        assert_eq!(f.path, "/v2/a/b/manifests/1");
    }

    #[test]
    fn v2_base() {
        let cfg = parse_config(b"").unwrap();
        // The shared host's ping is answered locally (see `ping_on_the_shared_host`).
        for p in ["/v2/", "/v2"] {
            let ping = match route(&cfg, &get("m", p), &KEY, 0) {
                Decision::Ping(ping) => ping,
                other => panic!("expected a ping, got {other:?}"),
            };
            assert_eq!(
                ping,
                Ping {
                    registry: "docker.io".into(),
                    cluster: "registry-1.docker.io".into(),
                    upstream: "registry-1.docker.io".into(),
                    mirror_base: "http://m".into(),
                }
            );
        }
        let f = fwd(route(&cfg, &get("m", "/v2/?ns=quay.io"), &KEY, 0));
        assert_eq!((f.authority.as_str(), f.path.as_str()), ("quay.io", "/v2/"));
        assert_eq!(f.oci_namespace_echo.as_deref(), Some("quay.io"));
        let none =
            parse_config(br#"{"registries":[{"name":"quay.io","upstream":"quay.io"}]}"#).unwrap();
        let r = reply(route(&none, &get("m", "/v2/"), &KEY, 0));
        assert_eq!((r.status, r.body.as_str(), r.reason), (200, "{}", None));
        let r = reply(route(&none, &get("m", "/v2/a/manifests/1"), &KEY, 0));
        assert_eq!((r.status, code(&r).as_str()), (404, "NAME_UNKNOWN"));
    }

    #[test]
    fn validation() {
        let cfg = parse_config(b"").unwrap();
        let d = format!("sha256:{}", "a".repeat(64));
        let cases: Vec<(String, u32, &str)> = vec![
            ("/v2/Alpine/manifests/3".into(), 400, "NAME_INVALID"),
            ("/v2/a/manifests/-bad".into(), 400, "TAG_INVALID"),
            ("/v2/a/manifests/sha256:abc".into(), 400, "DIGEST_INVALID"),
            ("/v2/a/blobs/latest".into(), 400, "DIGEST_INVALID"),
            ("/v2/a/referrers/latest".into(), 400, "DIGEST_INVALID"),
            ("/v2/a/blobs/uploads/".into(), 404, "UNSUPPORTED"),
            ("/v2/a/manifests/".into(), 400, "TAG_INVALID"),
            ("/v2/_catalog".into(), 404, "UNSUPPORTED"),
            ("/v2/a/tags/other".into(), 404, "UNSUPPORTED"),
            ("/v2/a/../b/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2/a/./b/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2//a/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2/a%2fb/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2/a%2Fb/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2/%2e%2e/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2/a%62/manifests/1".into(), 400, "NAME_INVALID"),
            ("/v2/a b/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2/a\u{1}/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2/ä/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/v2/a/manifests/1#x".into(), 400, "UNSUPPORTED"),
            ("v2/a/manifests/1".into(), 400, "UNSUPPORTED"),
            ("/".into(), 404, "UNSUPPORTED"),
            ("/v1/_ping".into(), 404, "UNSUPPORTED"),
            ("/v2x".into(), 404, "UNSUPPORTED"),
            ("/_mirror/other".into(), 404, "UNSUPPORTED"),
            (
                format!("/v2/{}/manifests/1", "a".repeat(250)),
                400,
                "NAME_INVALID",
            ),
        ];
        for (p, status, c) in cases {
            let r = reply(route(&cfg, &get("m", &p), &KEY, 0));
            assert_eq!((r.status, code(&r).as_str()), (status, c), "{p}");
            assert!(r
                .headers
                .iter()
                .any(|(k, v)| k == "content-type" && v == "application/json"));
        }
        let f = fwd(route(
            &cfg,
            &get("m", &format!("/v2/a/b/blobs/{d}")),
            &KEY,
            0,
        ));
        assert_eq!(f.path, format!("/v2/a/b/blobs/{d}"));
        let f = fwd(route(
            &cfg,
            &get("m", &format!("/v2/a/b/referrers/{d}?artifactType=x")),
            &KEY,
            0,
        ));
        assert_eq!(f.path, format!("/v2/a/b/referrers/{d}?artifactType=x"));
        let f = fwd(route(
            &cfg,
            &get("m", &format!("/v2/a/manifests/{d}")),
            &KEY,
            0,
        ));
        assert_eq!(f.path, format!("/v2/library/a/manifests/{d}"));
        // A repository whose name contains "manifests".
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/manifests/manifests/manifests/1"),
            &KEY,
            0,
        ));
        assert_eq!(f.path, "/v2/manifests/manifests/manifests/1");
        // Bad hosts.
        for a in ["", "a b", "a\"b", "a/b"] {
            let r = reply(route(&cfg, &get(a, "/v2/"), &KEY, 0));
            assert_eq!(r.status, 400, "{a:?}");
        }
    }

    #[test]
    fn scheme() {
        let cfg = parse_config(b"").unwrap();
        let f = fwd(route(
            &cfg,
            &Request {
                forwarded_proto: Some("HTTPS, http"),
                ..get("m", "/v2/a/manifests/1")
            },
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "https://m");
        let f = fwd(route(
            &cfg,
            &Request {
                scheme: "https",
                ..get("m", "/v2/a/manifests/1")
            },
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "https://m");
        let f = fwd(route(
            &cfg,
            &Request {
                forwarded_proto: Some("gopher"),
                ..get("m", "/v2/a/manifests/1")
            },
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "http://m");
    }

    #[test]
    fn auth() {
        let cfg = parse_config(b"").unwrap();
        let f = fwd(route_known(
            &cfg,
            &get("m", "/_mirror/auth/auth.docker.io/token?service=registry.docker.io&scope=repository:library/alpine:pull&scope=x"),
        ));
        assert_eq!(f.kind, ForwardKind::Auth);
        assert_eq!(f.registry, "docker.io");
        assert_eq!(f.authority, "auth.docker.io");
        assert_eq!(
            f.path,
            "/token?service=registry.docker.io&scope=repository:library/alpine:pull&scope=x"
        );
        let f = fwd(route_known(
            &cfg,
            &get("m", "/_mirror/auth/us-docker.pkg.dev/v2/token"),
        ));
        assert_eq!(
            (f.registry.as_str(), f.path.as_str()),
            ("registry.k8s.io", "/v2/token")
        );
        for p in [
            "/_mirror/auth/evil.example/token",
            "/_mirror/auth/auth.docker.io.evil.example/token",
            "/_mirror/auth/auth.docker.io:8443/token",
            "/_mirror/auth/user@auth.docker.io/token",
            "/_mirror/auth//token",
        ] {
            let r = reply(route(&cfg, &get("m", p), &KEY, 0));
            assert!(r.status == 403 || r.status == 400, "{p}");
        }
        let r = reply(route(
            &cfg,
            &get("m", "/_mirror/auth/evil.example/token"),
            &KEY,
            0,
        ));
        assert_eq!((r.status, code(&r).as_str()), (403, "DENIED"));
        let r = reply(route(
            &cfg,
            &get("m", "/_mirror/auth/auth.docker.io/../x"),
            &KEY,
            0,
        ));
        assert_eq!(r.status, 400);
    }

    #[test]
    fn only_issued_realm_urls_are_forwarded() {
        let cfg = parse_config(b"").unwrap();
        // Paths a realm host serves besides its realm: never forwarded as they are; the
        // registry's realm is learned once, and they are refused unless it is that one.
        for (p, registry, host, path) in [
            (
                "/_mirror/auth/quay.io/api/v1/user/",
                "quay.io",
                "quay.io",
                "/api/v1/user/",
            ),
            (
                "/_mirror/auth/quay.io/v2/_catalog?n=99999",
                "quay.io",
                "quay.io",
                "/v2/_catalog",
            ),
            ("/_mirror/auth/quay.io", "quay.io", "quay.io", "/"),
            (
                "/_mirror/auth/auth.docker.io/v2/token",
                "docker.io",
                "auth.docker.io",
                "/v2/token",
            ),
            (
                "/_mirror/auth/evil.pkg.dev/v2/token",
                "registry.k8s.io",
                "evil.pkg.dev",
                "/v2/token",
            ),
            (
                "/_mirror/auth/us-docker.pkg.dev/v2/x/y",
                "registry.k8s.io",
                "us-docker.pkg.dev",
                "/v2/x/y",
            ),
        ] {
            let l = learn(route_known(&cfg, &get("m", p)));
            assert_eq!(l.registry, registry, "{p}");
            assert_eq!(l.expect, RealmUrl::new(host, path), "{p}");
            // The registry's realm as learned from its /v2/: not the asked URL → 403.
            let own = match registry {
                "quay.io" => "https://quay.io/v2/auth",
                "docker.io" => "https://auth.docker.io/token",
                _ => "https://us-docker.pkg.dev/v2/token",
            };
            let learned = LearnedRealm::new(own, Some("s")).unwrap();
            let r = forward_to_learned(&cfg, &l, &learned).unwrap_err();
            assert_eq!((r.status, code(&r).as_str()), (403, "DENIED"), "{p}");
            assert_eq!(r.reason, Some(RejectReason::RealmDenied));
        }
        // An unknown realm URL that the learned realm confirms: forwarded there, the
        // client's query kept.
        let l = learn(route(
            &cfg,
            &get(
                "m",
                "/_mirror/auth/quay.io/v2/auth?service=quay.io&scope=repository:a/b:pull",
            ),
            &KEY,
            0,
        ));
        let learned = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io")).unwrap();
        let f = forward_to_learned(&cfg, &l, &learned).unwrap();
        assert_eq!(
            (f.authority.as_str(), f.path.as_str()),
            (
                "quay.io",
                "/v2/auth?service=quay.io&scope=repository:a/b:pull"
            )
        );
        // Host mode: only the host registry's realm hosts.
        let hc = host_cfg();
        for p in [
            "/_mirror/auth/quay.io/v2/auth?scope=repository:a/b:pull",
            "/_mirror/auth/us-docker.pkg.dev/v2/token",
        ] {
            let r = reply(route_known(&hc, &get("docker.mirror.test", p)));
            assert_eq!((r.status, code(&r).as_str()), (403, "DENIED"), "{p}");
        }
        let f = fwd(route_known(
            &hc,
            &get("quay.mirror.test", "/_mirror/auth/quay.io/v2/auth"),
        ));
        assert_eq!(f.registry, "quay.io");
    }

    #[test]
    fn token_requests_after_the_realm_call() {
        let cfg = parse_config(b"").unwrap();
        let issued = learn(route(
            &cfg,
            &get(
                "m",
                "/_mirror/auth/quay.io/v2/auth?scope=repository:a/b:pull",
            ),
            &KEY,
            0,
        ));
        let other = learn(route(
            &cfg,
            &get(
                "m",
                "/_mirror/auth/auth.docker.io/token?scope=repository:quay.io/a/b:pull",
            ),
            &KEY,
            0,
        ));
        assert!(issued.expect.is_some() && other.expect.is_none());
        let quay = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io")).unwrap();
        let learned = RealmCall::Learned(quay);
        for lr in [&issued, &other] {
            let f = token_after_realm_call(&cfg, lr, &learned, Some(401)).unwrap();
            assert_eq!(
                (f.kind, f.authority.as_str()),
                (ForwardKind::Auth, "quay.io")
            );
        }
        // The registry is anonymous, or its realm cannot be learned: a realm URL the
        // client asked is refused (403); a token for another registry gets a placeholder
        // or 502.
        for call in [
            RealmCall::Anonymous,
            RealmCall::Failed(LearnError::NoChallenge),
            RealmCall::Failed(LearnError::NotAllowlisted("evil.example".into())),
        ] {
            let r = token_after_realm_call(&cfg, &issued, &call, None).unwrap_err();
            assert_eq!((r.status, code(&r).as_str()), (403, "DENIED"), "{call:?}");
            let r = token_after_realm_call(&cfg, &other, &call, Some(503)).unwrap_err();
            let want = match call {
                RealmCall::Anonymous => (200, None),
                _ => (502, Some(RejectReason::RealmUnavailable)),
            };
            assert_eq!((r.status, r.reason), want, "{call:?}");
        }
    }

    #[test]
    fn a_stored_realm_serves_token_requests_without_a_call() {
        let cfg = parse_config(b"").unwrap();
        let other = learn(route(
            &cfg,
            &get(
                "m",
                "/_mirror/auth/auth.docker.io/token?scope=repository:quay.io/a/b:pull",
            ),
            &KEY,
            0,
        ));
        let quay = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io")).unwrap();
        let f = forward_with_stored(&cfg, &other, || Some(quay.clone())).unwrap();
        assert_eq!(
            (f.kind, f.authority.as_str()),
            (ForwardKind::Auth, "quay.io")
        );
        // Nothing stored, or a stored realm no longer on realm_hosts: learn it again.
        assert_eq!(forward_with_stored(&cfg, &other, || None), None);
        let evil = LearnedRealm::new("https://evil.example/token", None).unwrap();
        assert_eq!(forward_with_stored(&cfg, &other, || Some(evil)), None);
        // A realm URL the client asked itself: always a fresh call, the store unread.
        let asked = learn(route(
            &cfg,
            &get(
                "m",
                "/_mirror/auth/quay.io/v2/auth?scope=repository:a/b:pull",
            ),
            &KEY,
            0,
        ));
        assert!(asked.expect.is_some());
        let unread = || -> Option<LearnedRealm> { panic!("store read") };
        assert_eq!(forward_with_stored(&cfg, &asked, unread), None);
    }

    #[test]
    fn only_signed_redirects_need_the_key() {
        assert!(needs_signing_key("/_mirror/redirect/x"));
        for p in [
            "/v2/",
            "/_mirror/auth/quay.io/v2/auth",
            "/_mirror/redirec",
            "/x/_mirror/redirect/",
        ] {
            assert!(!needs_signing_key(p), "{p}");
        }
    }

    #[test]
    fn client_credentials_go_only_to_the_addressed_registry() {
        let cfg = parse_config(b"").unwrap();
        let with_basic = |authority: &'static str, path: &'static str| Request {
            authorization: Some("Basic dTpw"),
            ..get(authority, path)
        };
        // Shared host, the default registry's own realm: forwarded (docker login).
        let f = fwd(route_known(
            &cfg,
            &with_basic(
                "m",
                "/_mirror/auth/auth.docker.io/token?service=registry.docker.io",
            ),
        ));
        assert!(!f.strip_authorization);
        // docker.io's realm URL with a quay.io scope: quay's realm, without the credential.
        let l = learn(route_known(
            &cfg,
            &with_basic(
                "m",
                "/_mirror/auth/auth.docker.io/token?scope=repository:quay.io/a/b:pull",
            ),
        ));
        assert_eq!(
            (l.registry.as_str(), l.strip_authorization),
            ("quay.io", true)
        );
        let learned = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io")).unwrap();
        assert!(
            forward_to_learned(&cfg, &l, &learned)
                .unwrap()
                .strip_authorization
        );
        // quay's own realm on the shared host: the credential is stripped too.
        let f = fwd(route_known(
            &cfg,
            &with_basic(
                "m",
                "/_mirror/auth/quay.io/v2/auth?scope=repository:a/b:pull",
            ),
        ));
        assert_eq!(
            (f.registry.as_str(), f.strip_authorization),
            ("quay.io", true)
        );
        // The operator opts quay.io in (and docker.io out).
        let mut c = crate::config::default_config();
        for r in &mut c.registries {
            r.forward_client_credentials = Some(r.name == "quay.io");
        }
        let opted = crate::config::compile(&c).unwrap();
        let f = fwd(route_known(
            &opted,
            &with_basic(
                "m",
                "/_mirror/auth/quay.io/v2/auth?scope=repository:a/b:pull",
            ),
        ));
        assert!(!f.strip_authorization);
        let f = fwd(route_known(
            &opted,
            &with_basic("m", "/_mirror/auth/auth.docker.io/token"),
        ));
        assert!(f.strip_authorization);
        // Host mode: the host is the registry's own credential domain, flag or not.
        let hc = host_cfg();
        let f = fwd(route_known(
            &hc,
            &with_basic("quay.mirror.test", "/_mirror/auth/quay.io/v2/auth"),
        ));
        assert!(!f.strip_authorization);
        // ...and another registry's scope is not translated into it.
        let f = fwd(route_known(
            &hc,
            &with_basic(
                "docker.mirror.test",
                "/_mirror/auth/auth.docker.io/token?scope=repository:quay.io/a/b:pull",
            ),
        ));
        assert_eq!(f.registry, "docker.io");
        assert_eq!(f.path, "/token?scope=repository:quay.io/a/b:pull");
    }

    #[test]
    fn v2_forwards_on_the_shared_host_carry_only_tokens_to_registries_without_the_login() {
        let cfg = parse_config(b"").unwrap();
        let with =
            |authorization: &'static str, authority: &'static str, path: &'static str| Request {
                authorization: Some(authorization),
                ..get(authority, path)
            };
        // quay.io by path prefix, ns or its own ping: the mirror host's login (docker.io's)
        // is removed; a token from the mirror-routed realm passes.
        for path in [
            "/v2/quay.io/org/img/manifests/x",
            "/v2/org/img/manifests/x?ns=quay.io",
            "/v2/?ns=quay.io",
        ] {
            for (a, strip) in [
                ("Basic dTpw", true),
                ("Bearer xyz", false),
                ("bearer xyz", false),
                ("Bearer ", true),
                ("Token abc", true),
                // Repeated headers, joined: the login is in there.
                ("Bearer xyz, Basic dTpw", true),
            ] {
                let f = fwd(route(&cfg, &with(a, "m", path), &KEY, 0));
                assert_eq!(
                    (f.registry.as_str(), f.strip_authorization),
                    ("quay.io", strip),
                    "{path} {a}"
                );
                assert!(f.withhold_client_credential);
            }
            assert!(!fwd(route(&cfg, &get("m", path), &KEY, 0)).strip_authorization);
        }
        // The default registry has `forward_client_credentials`: its login passes.
        for path in [
            "/v2/library/alpine/manifests/3",
            "/v2/docker.io/alpine/manifests/3",
            "/v2/alpine/manifests/3?ns=docker.io",
        ] {
            let f = fwd(route(&cfg, &with("Basic dTpw", "m", path), &KEY, 0));
            assert_eq!(
                (f.registry.as_str(), f.strip_authorization),
                ("docker.io", false),
                "{path}"
            );
            assert!(!f.withhold_client_credential);
        }
        // Host mode: the host is quay's own credential domain.
        let f = fwd(route(
            &host_cfg(),
            &with("Basic dTpw", "quay.mirror.test", "/v2/org/img/manifests/x"),
            &KEY,
            0,
        ));
        assert_eq!(
            (f.registry.as_str(), f.strip_authorization),
            ("quay.io", false)
        );
        assert!(!f.withhold_client_credential);
        // The operator opts quay.io in and docker.io out.
        let mut c = crate::config::default_config();
        for r in &mut c.registries {
            r.forward_client_credentials = Some(r.name == "quay.io");
        }
        let opted = crate::config::compile(&c).unwrap();
        let basic = |path| fwd(route(&opted, &with("Basic dTpw", "m", path), &KEY, 0));
        assert!(!basic("/v2/quay.io/org/img/manifests/x").strip_authorization);
        assert!(basic("/v2/library/alpine/manifests/3").strip_authorization);
    }

    #[test]
    fn public_url_builds_every_client_url_and_refuses_other_hosts() {
        let mut c = crate::config::default_config();
        c.host_suffix = Some("mirror.example.com".into());
        c.public_url = Some("https://mirror.example.com:8443".into());
        let cfg = crate::config::compile(&c).unwrap();
        // The client's Host is never echoed: the configured URL is.
        let f = fwd(route(
            &cfg,
            &Request {
                scheme: "http",
                forwarded_proto: Some("http"),
                ..get("MIRROR.example.com:1234", "/v2/a/manifests/1")
            },
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "https://mirror.example.com:8443");
        let f = fwd(route(
            &cfg,
            &get("quay.mirror.example.com", "/v2/a/b/manifests/1"),
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "https://quay.mirror.example.com:8443");
        // Hosts the mirror does not serve: 421 before anything else.
        for host in [
            "evil.example",
            "127.0.0.1:5000",
            "mirror.example.com.evil",
            "x.mirror.example.com",
        ] {
            for p in [
                "/v2/",
                "/v2/a/manifests/1",
                "/_mirror/auth/auth.docker.io/token",
                "/_mirror/redirect/x",
            ] {
                let r = reply(route_known(&cfg, &get(host, p)));
                assert_eq!((r.status, code(&r).as_str()), (421, "DENIED"), "{host} {p}");
                assert_eq!(r.reason, Some(RejectReason::Misdirected));
                assert!(r.message.contains("not served"), "{}", r.message);
            }
        }
        // Without public_url, today's behaviour: the client's authority.
        let f = fwd(route(
            &parse_config(b"").unwrap(),
            &get("evil.example", "/v2/a/manifests/1"),
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "http://evil.example");
    }

    /// One blob, one replica: the cache key names content, not the repository or the way
    /// the client addressed the registry.
    #[test]
    fn cache_routes_carry_the_ring_hash_key() {
        let cfg = parse_config(
            br#"{"host_suffix":"m.test","default_registry":"docker.io","registries":[
                {"name":"gcr.io","upstream":"gcr.io","host_prefix":"gcr","cache":true},
                {"name":"docker.io","upstream":"registry-1.docker.io","library_namespace":true},
                {"name":"quay.io","upstream":"quay.io"}]}"#,
        )
        .unwrap();
        let digest = format!("sha256:{}", "ab".repeat(32));
        let key = |authority: &str, path: &str| {
            fwd(route(&cfg, &get(authority, path), &KEY, 0)).cache_key
        };
        let blob = Some(digest.clone());
        for (authority, path) in [
            ("m", format!("/v2/gcr.io/proj/app/blobs/{digest}")),
            ("m", format!("/v2/gcr.io/other/base/blobs/{digest}")),
            ("m", format!("/v2/proj/app/blobs/{digest}?ns=gcr.io")),
            ("gcr.m.test", format!("/v2/proj/app/blobs/{digest}")),
        ] {
            assert_eq!(key(authority, &path), blob, "{authority}{path}");
        }
        // A manifest by digest: its digest too, whatever tag or repository led there.
        assert_eq!(
            key("m", &format!("/v2/gcr.io/proj/app/manifests/{digest}")),
            blob
        );
        // By tag: one tag record, however the client names the registry.
        let tag = Some("gcr.io/proj/app:v1".to_owned());
        assert_eq!(key("m", "/v2/gcr.io/proj/app/manifests/v1"), tag);
        assert_eq!(key("gcr.m.test", "/v2/proj/app/manifests/v1"), tag);
        assert_eq!(key("m", "/v2/proj/app/manifests/v1?ns=gcr.io"), tag);
        assert_ne!(key("m", "/v2/gcr.io/proj/app/manifests/v2"), tag);
        // Anything else: its upstream path (query left out).
        assert_eq!(
            key("m", "/v2/gcr.io/proj/app/tags/list?n=10"),
            Some("/v2/proj/app/tags/list".to_owned())
        );
        assert_eq!(
            key("m", &format!("/v2/gcr.io/proj/app/referrers/{digest}")),
            Some(format!("/v2/proj/app/referrers/{digest}"))
        );
        assert_eq!(key("gcr.m.test", "/v2/"), Some("/v2/".to_owned()));
        // Registries Envoy serves directly never go to the cache: no key.
        assert_eq!(key("m", &format!("/v2/library/a/blobs/{digest}")), None);
        assert_eq!(key("m", "/v2/quay.io/a/b/manifests/v1"), None);
    }

    /// `client_auth = "upstream"`: the client's token request goes to cache-service, which
    /// forwards it to the upstream's realm; nothing (no realm learned) is needed first.
    #[test]
    fn a_forward_reaches_cache_service_by_its_cache_key_or_a_cached_upstream_as_authority() {
        let cfg = parse_config(
            br#"{"host_suffix":"m.test","default_registry":"docker.io","registries":[
                {"name":"gcr.io","upstream":"gcr.io","host_prefix":"gcr","cache":true},
                {"name":"docker.io","upstream":"registry-1.docker.io","library_namespace":true,
                 "realm_hosts":["auth.docker.io"]}]}"#,
        )
        .unwrap();
        let cached = fwd(route(
            &cfg,
            &get("gcr.m.test", "/v2/p/i/manifests/1"),
            &KEY,
            0,
        ));
        assert!(cached.reaches_cache(&cfg));
        let passed = fwd(route(
            &cfg,
            &get("m.test", "/v2/alpine/manifests/3"),
            &KEY,
            0,
        ));
        assert!(!passed.reaches_cache(&cfg));
        // No cache key, but Envoy routes by the new authority: a cached registry's upstream.
        let by_authority = Forward {
            authority: "gcr.io".into(),
            ..passed.clone()
        };
        assert!(by_authority.reaches_cache(&cfg));
        let elsewhere = Forward {
            authority: "auth.docker.io".into(),
            ..passed
        };
        assert!(!elsewhere.reaches_cache(&cfg));
    }

    /// A client's own `x-mirror-registry` never reaches an upstream: overwritten on every
    /// route; without one, only routes to cache-service get it.
    #[test]
    fn a_client_sent_registry_header_is_overwritten_and_none_is_added_off_the_cache() {
        let cfg = parse_config(
            br#"{"host_suffix":"m.test","default_registry":"docker.io","registries":[
                {"name":"gcr.io","upstream":"gcr.io","host_prefix":"gcr","cache":true},
                {"name":"docker.io","upstream":"registry-1.docker.io","library_namespace":true}]}"#,
        )
        .unwrap();
        let direct = fwd(route(
            &cfg,
            &get("m.test", "/v2/alpine/manifests/3"),
            &KEY,
            0,
        ));
        assert!(direct.sets_registry_header(&cfg, true));
        assert!(!direct.sets_registry_header(&cfg, false));
        let cached = fwd(route(
            &cfg,
            &get("gcr.m.test", "/v2/p/i/manifests/1"),
            &KEY,
            0,
        ));
        assert!(cached.sets_registry_header(&cfg, true));
        assert!(cached.sets_registry_header(&cfg, false));
    }

    /// The filter's own failures: the statuses and codes the glue always sent, now with the
    /// headers of every other local answer.
    #[test]
    fn the_filters_own_failures_are_oci_errors_with_the_registry_headers() {
        let headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            (
                "docker-distribution-api-version".to_owned(),
                "registry/2.0".to_owned(),
            ),
        ];
        for (f, status, c, reason) in [
            (Failure::NotConfigured, 500, "UNSUPPORTED", None),
            (Failure::UnreadableRequest, 500, "UNSUPPORTED", None),
            (
                Failure::HeaderEncoding,
                400,
                "UNSUPPORTED",
                Some(RejectReason::BadRequest),
            ),
            (Failure::Rewrite, 500, "UNSUPPORTED", None),
            (
                Failure::TokenRewrite,
                502,
                "UNAVAILABLE",
                Some(RejectReason::RealmUnavailable),
            ),
        ] {
            let r = f.reply();
            assert_eq!(
                (r.status, code(&r).as_str(), r.reason),
                (status, c, reason),
                "{f:?}"
            );
            assert_eq!(r.headers, headers, "{f:?}");
        }
        let r = realm_call_failed("quay.io", "InternalFailure");
        assert_eq!((r.status, code(&r).as_str()), (502, "UNAVAILABLE"));
        assert_eq!(r.headers, headers);
        assert!(
            r.message.contains("cluster quay.io failed"),
            "{}",
            r.message
        );
    }

    #[test]
    fn cached_registries_with_upstream_login_send_token_requests_to_the_cache() {
        let cfg = parse_config(
            br#"{"host_suffix":"m.test","default_registry":"docker.io","registries":[
                {"name":"gcr.io","upstream":"gcr.io","host_prefix":"gcr","cache":true,
                 "client_auth":"upstream","realm_hosts":["gcr.io"]},
                {"name":"k8s.io","upstream":"k8s.io","cache":true,"client_auth":"upstream",
                 "realm_hosts":["auth.k8s.io"],"forward_client_credentials":true},
                {"name":"docker.io","upstream":"registry-1.docker.io","library_namespace":true,
                 "realm_hosts":["auth.docker.io"]}]}"#,
        )
        .unwrap();
        let mut req = get(
            "gcr.m.test",
            "/_mirror/auth/gcr.io/v2/token?scope=repository:p/i:pull&service=gcr.io",
        );
        req.authorization = Some("Basic YWxpY2U6cw==");
        let f = fwd(route(&cfg, &req, &KEY, 0));
        assert_eq!(f.kind, ForwardKind::Auth);
        assert_eq!(
            (f.registry.as_str(), f.authority.as_str()),
            ("gcr.io", "gcr.io")
        );
        assert_eq!(
            f.path,
            "/_mirror/auth/gcr.io/v2/token?scope=repository:p/i:pull&service=gcr.io"
        );
        // Host mode is the registry's own credential domain.
        assert!(!f.strip_authorization);
        assert!(f.cache_key.is_some());
        // The shared host: scopes in the client's names become the registry's; the login
        // goes along only where the operator said so.
        let mut req = get(
            "m",
            "/_mirror/auth/gcr.io/v2/token?scope=repository:gcr.io/p/i:pull&service=gcr.io",
        );
        req.authorization = Some("Basic YWxpY2U6cw==");
        let f = fwd(route(&cfg, &req, &KEY, 0));
        assert_eq!(
            f.path,
            "/_mirror/auth/gcr.io/v2/token?scope=repository:p/i:pull&service=gcr.io"
        );
        assert!(f.strip_authorization);
        // Another registry's realm (the shared host's ping names the default registry's):
        // the target's own realm, which cache-service knows.
        req.path = "/_mirror/auth/auth.docker.io/token?scope=repository:gcr.io/p/i:pull&service=x";
        let f = fwd(route(&cfg, &req, &KEY, 0));
        assert_eq!(
            (f.registry.as_str(), f.authority.as_str()),
            ("gcr.io", "gcr.io")
        );
        assert_eq!(f.path, "/_mirror/token?scope=repository:p/i:pull&service=x");
        req.path = "/_mirror/auth/auth.k8s.io/token?scope=repository:k8s.io/pause:pull";
        let f = fwd(route(&cfg, &req, &KEY, 0));
        assert_eq!(
            (f.registry.as_str(), f.authority.as_str()),
            ("k8s.io", "k8s.io")
        );
        assert_eq!(
            f.path,
            "/_mirror/auth/auth.k8s.io/token?scope=repository:pause:pull"
        );
        assert!(!f.strip_authorization);
        // Only the registry's own realm hosts, as for any registry.
        let r = reply(route(
            &cfg,
            &get("gcr.m.test", "/_mirror/auth/auth.k8s.io/token"),
            &KEY,
            0,
        ));
        assert_eq!((r.status, code(&r).as_str()), (403, "DENIED"));
        // Resource requests keep the client's Authorization for the cache to check upstream.
        let mut req = get("gcr.m.test", "/v2/p/i/manifests/v1");
        req.authorization = Some("Bearer t");
        assert!(!fwd(route(&cfg, &req, &KEY, 0)).strip_authorization);
    }

    #[test]
    fn ping_on_the_shared_host() {
        let ping = Ping {
            registry: "docker.io".into(),
            cluster: "registry-1.docker.io".into(),
            upstream: "registry-1.docker.io".into(),
            mirror_base: "https://m:5000".into(),
        };
        let learned =
            LearnedRealm::new("https://auth.docker.io/token", Some("registry.docker.io")).unwrap();
        let r = ping_reply(&ping, Some(&learned));
        assert_eq!((r.status, code(&r).as_str()), (401, "UNAUTHORIZED"));
        let c = r
            .headers
            .iter()
            .find(|(k, _)| k == "www-authenticate")
            .map(|(_, v)| v.as_str());
        assert_eq!(
            c,
            Some(
                r#"Bearer realm="https://m:5000/_mirror/auth/auth.docker.io/token",service="registry.docker.io""#
            )
        );
        // Unknown (the upstream is down and never answered): anonymous 200.
        let r = ping_reply(&ping, None);
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
        assert!(r.headers.iter().all(|(k, _)| k != "www-authenticate"));
        // A cached default registry: the ping goes to cache-service, as any request.
        let gcr = parse_config(
            br#"{"default_registry":"gcr.io","registries":[{"name":"gcr.io","upstream":"gcr.io","cache":true}]}"#,
        )
        .unwrap();
        let f = fwd(route(&gcr, &get("m", "/v2/"), &KEY, 0));
        assert_eq!((f.authority.as_str(), f.path.as_str()), ("gcr.io", "/v2/"));
        // Host mode and ?ns= pings still go to their registry.
        let f = fwd(route(
            &host_cfg(),
            &get("quay.mirror.test", "/v2/"),
            &KEY,
            0,
        ));
        assert_eq!((f.authority.as_str(), f.path.as_str()), ("quay.io", "/v2/"));
        let f = fwd(route(
            &parse_config(b"").unwrap(),
            &get("m", "/v2/?ns=docker.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.authority, "registry-1.docker.io");
    }

    #[test]
    fn path_prefix_is_remembered_for_challenges() {
        let cfg = parse_config(b"").unwrap();
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/Quay.io/coreos/etcd/manifests/v3.5"),
            &KEY,
            0,
        ));
        assert_eq!(f.path_prefix.as_deref(), Some("quay.io"));
        // ns plus the ns registry's own prefix (containerd `override_path`): the client's
        // names carry the prefix, so challenges do too.
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/Quay.io/coreos/etcd/manifests/v3.5?ns=quay.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.path_prefix.as_deref(), Some("quay.io"));
        // Another registry's name after ns: part of the repository name, no prefix.
        let f = fwd(route(
            &cfg,
            &get("m", "/v2/docker.io/x/manifests/1?ns=quay.io"),
            &KEY,
            0,
        ));
        assert_eq!(f.path_prefix, None);
        for p in [
            "/v2/coreos/etcd/manifests/v3.5?ns=quay.io",
            "/v2/library/alpine/manifests/1",
            "/v2/?ns=docker.io",
        ] {
            assert_eq!(fwd(route(&cfg, &get("m", p), &KEY, 0)).path_prefix, None);
        }
        let f = fwd(route(
            &host_cfg(),
            &get("docker.mirror.test", "/v2/quay.io/x/manifests/1"),
            &KEY,
            0,
        ));
        assert_eq!(f.path_prefix, None);
    }

    #[test]
    fn auth_with_path_prefixed_scopes() {
        let cfg = parse_config(b"").unwrap();
        // docker.io prefix on docker.io's realm: stripped, forwarded.
        let f = fwd(route_known(
            &cfg,
            &get("127.0.0.1:5000", "/_mirror/auth/auth.docker.io/token?account=a&scope=repository%3Adocker.io%2Flibrary%2Falpine%3Apull&service=registry.docker.io"),
        ));
        assert_eq!(
            (f.registry.as_str(), f.authority.as_str()),
            ("docker.io", "auth.docker.io")
        );
        assert_eq!(
            f.path,
            "/token?account=a&scope=repository%3Alibrary%2Falpine%3Apull&service=registry.docker.io"
        );
        // quay.io prefix on docker.io's realm: learn quay's realm.
        let l = learn(route(
            &cfg,
            &get("127.0.0.1:5000", "/_mirror/auth/auth.docker.io/token?scope=repository:quay.io/coreos/etcd:pull&service=registry.docker.io"),
            &KEY,
            0,
        ));
        assert_eq!(
            l,
            LearnRealm {
                registry: "quay.io".into(),
                cluster: "quay.io".into(),
                upstream: "quay.io".into(),
                query: Some("scope=repository:coreos/etcd:pull&service=registry.docker.io".into()),
                mirror_base: "http://127.0.0.1:5000".into(),
                expect: None,
                strip_authorization: true,
            }
        );
        let learned = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io")).unwrap();
        let f = forward_to_learned(&cfg, &l, &learned).unwrap();
        assert_eq!(f.kind, ForwardKind::Auth);
        assert_eq!(
            (f.registry.as_str(), f.authority.as_str()),
            ("quay.io", "quay.io")
        );
        assert_eq!(
            f.path,
            "/v2/auth?scope=repository:coreos/etcd:pull&service=quay.io"
        );
        // A learned realm that is not on the registry's realm_hosts: 502 DENIED.
        let evil = LearnedRealm::new("https://auth.docker.io/token", Some("x")).unwrap();
        let r = forward_to_learned(&cfg, &l, &evil).unwrap_err();
        assert_eq!((r.status, code(&r).as_str()), (502, "DENIED"));
        assert_eq!(r.reason, Some(RejectReason::RealmUnavailable));
        // quay.io prefix on quay's own realm: forwarded with the name stripped.
        let f = fwd(route_known(
            &cfg,
            &get("m", "/_mirror/auth/quay.io/v2/auth?scope=repository:quay.io/coreos/etcd:pull&service=quay.io"),
        ));
        assert_eq!(
            f.path,
            "/v2/auth?scope=repository:coreos/etcd:pull&service=quay.io"
        );
        // A cached registry needs no upstream token: answered locally.
        let r = reply(route(
            &cfg,
            &get(
                "m",
                "/_mirror/auth/auth.docker.io/token?scope=repository:gcr.io/p/i:pull",
            ),
            &KEY,
            0,
        ));
        assert_eq!((r.status, r.reason), (200, None));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert!(v["token"].as_str().is_some_and(|t| !t.is_empty()));
        // Host mode: the client's names are the registry's own; no prefix interpreted.
        let f = fwd(route_known(
            &host_cfg(),
            &get(
                "docker.mirror.test",
                "/_mirror/auth/auth.docker.io/token?scope=repository:alpine:pull",
            ),
        ));
        assert_eq!(f.path, "/token?scope=repository:library/alpine:pull");
        // Hostile scopes.
        let r = reply(route(
            &cfg,
            &get(
                "m",
                "/_mirror/auth/auth.docker.io/token?scope=repository:quay.io:pull",
            ),
            &KEY,
            0,
        ));
        assert_eq!((r.status, code(&r).as_str()), (400, "NAME_INVALID"));
        let r = reply(route(
            &cfg,
            &get("m", "/_mirror/auth/auth.docker.io/token?scope=%zz"),
            &KEY,
            0,
        ));
        assert_eq!((r.status, code(&r).as_str()), (400, "UNSUPPORTED"));
        // Configured cluster names are used for the realm call.
        let ist = parse_config(br#"{"default_registry":"docker.io","registries":[
            {"name":"docker.io","upstream":"registry-1.docker.io","realm_hosts":["auth.docker.io"],"library_namespace":true},
            {"name":"quay.io","upstream":"quay.io","realm_hosts":["quay.io"],"cluster":"outbound|80||quay.io"}]}"#).unwrap();
        let l = learn(route(
            &ist,
            &get(
                "m",
                "/_mirror/auth/auth.docker.io/token?scope=repository:quay.io/a/b:pull",
            ),
            &KEY,
            0,
        ));
        assert_eq!(l.cluster, "outbound|80||quay.io");
    }

    #[test]
    fn redirects() {
        let cfg = parse_config(b"").unwrap();
        let target = Target {
            host: "production.cloudflare.docker.com".into(),
            path: "/registry-v2/x/data".into(),
            query: Some("verify=1".into()),
        };
        // A URL signed before the fingerprint stopped deciding anything still carries one.
        let cred = "0123456789abcdef0123456789abcdef";
        let url = mirror_url("", &KEY, "docker.io", 100, cred, &target);
        let f = fwd(route(
            &cfg,
            &Request {
                authorization: Some("Bearer up"),
                ..get("m", &url)
            },
            &KEY,
            50,
        ));
        assert_eq!(f.kind, ForwardKind::Redirect);
        assert_eq!(f.authority, "production.cloudflare.docker.com");
        assert_eq!(f.path, "/registry-v2/x/data?verify=1");
        assert_eq!(f.registry, "docker.io");
        assert!(f.strip_authorization);
        // Any other credential to a host that is not a token host: dropped too (a
        // refreshed token, another spelling of the scheme, Basic).
        for a in ["Bearer other", "bearer up", "Basic dTpw"] {
            let f = fwd(route(
                &cfg,
                &Request {
                    authorization: Some(a),
                    ..get("m", &url)
                },
                &KEY,
                50,
            ));
            assert!(f.strip_authorization, "{a}");
        }
        let f = fwd(route(&cfg, &get("m", &url), &KEY, 50));
        assert!(!f.strip_authorization);
        // A recorded token host of the registry gets Bearer tokens, never Basic.
        let learned = Known {
            token_hosts: vec![("docker.io", "production.cloudflare.docker.com")],
            ..Known::default()
        };
        for (a, strip) in [
            ("Bearer up", false),
            ("BEARER fresh", false),
            ("Basic dTpw", true),
        ] {
            let f = fwd(route_with(
                &cfg,
                &Request {
                    authorization: Some(a),
                    ..get("m", &url)
                },
                &KEY,
                50,
                &learned,
            ));
            assert_eq!(f.strip_authorization, strip, "{a}");
        }
        assert_eq!(
            learned.asked.borrow().as_slice(),
            [
                "docker.io production.cloudflare.docker.com",
                "docker.io production.cloudflare.docker.com"
            ]
        );
        // Another registry's token host does not count.
        let other = Known {
            token_hosts: vec![("quay.io", "production.cloudflare.docker.com")],
            ..Known::default()
        };
        let f = fwd(route_with(
            &cfg,
            &Request {
                authorization: Some("Bearer up"),
                ..get("m", &url)
            },
            &KEY,
            50,
            &other,
        ));
        assert!(f.strip_authorization);
        // Expired, wrong key, no key, tampered.
        for (k, now, u) in [
            (&KEY[..], 101, url.clone()),
            (&[1u8; 32][..], 50, url.clone()),
            (&[][..], 50, url.clone()),
            (&KEY[..], 50, url.replace("verify=1", "verify=2")),
        ] {
            let r = reply(route(&cfg, &get("m", &u), k, now));
            assert_eq!((r.status, code(&r).as_str()), (403, "DENIED"));
            assert_eq!(r.reason, Some(RejectReason::RedirectDenied));
        }
        let r = reply(route(&cfg, &get("m", "/_mirror/redirect/junk"), &KEY, 0));
        assert_eq!(r.status, 403);
    }

    /// `has_path_tricks` as it was defined before its one-pass scan.
    fn path_tricks_by_search(path: &str) -> bool {
        let encoded_trick = |w: &[u8]| {
            matches!(
                w,
                [b'%', b'2', b'f' | b'F' | b'e' | b'E']
                    | [b'%', b'5', b'c' | b'C']
                    | [b'%', b'0', b'0']
            )
        };
        path.contains("//")
            || path.contains('\\')
            || path.as_bytes().windows(3).any(encoded_trick)
            || path.split('/').any(|s| s == "." || s == "..")
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 4096, failure_persistence: None, ..Default::default() })]
        #[test]
        fn path_tricks_scan_equals_search(
            parts in proptest::collection::vec(proptest::sample::select(
                &["/", "a", ".", "..", "%", "%2", "%2f", "%2E", "%5c", "%5C", "%00", "%0", "\\", "é", "v2"][..]), 0..10)
        ) {
            let path = parts.concat();
            proptest::prop_assert_eq!(has_path_tricks(&path), path_tricks_by_search(&path), "{}", path);
        }
    }

    #[test]
    fn host_without_port_lowercases_only_when_needed() {
        assert!(matches!(
            host_without_port("m.test:5000"),
            Cow::Borrowed("m.test")
        ));
        assert_eq!(host_without_port("M.Test:5000"), "m.test");
        assert_eq!(host_without_port("[::1]:5000"), "::1");
    }
}
