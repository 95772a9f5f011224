//! Request routing: from the client's request line to a [`Decision`].

use super::config::{is_valid_authority, CompiledConfig, Registry};
use super::names::{Digest, NameError, Reference, RepositoryName};
use super::oci_error::{render, ErrorCode};
use super::redirect::{SignedRedirect, PREFIX as REDIRECT_PREFIX};
use super::token::{self, LearnedRealm};
use super::token_host::strip_credential;

/// Path prefix of token requests.
pub const AUTH_PREFIX: &str = "/_mirror/auth/";

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
    /// Set `x-mirror-registry: <registry>` (client values are always removed).
    pub set_registry_header: bool,
    /// Value for an `OCI-Namespace` response header.
    pub oci_namespace_echo: Option<String>,
    /// Remove the client's `Authorization`.
    pub strip_authorization: bool,
    /// `<scheme>://<client authority>` for URLs handed back to the client.
    pub mirror_base: String,
    /// Path-prefix mode: the registry component the client put in front of the name
    /// (lowercase); challenge scopes are rewritten into that namespace.
    pub path_prefix: Option<String>,
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
}

impl RejectReason {
    /// All reasons (for defining metrics).
    pub const ALL: [RejectReason; 10] = [
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
        }
    }
}

/// Answer locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u32,
    /// Body (OCI error JSON or `{}`).
    pub body: String,
    /// Headers, including `content-type`.
    pub headers: Vec<(String, String)>,
    /// Rejection reason; `None` for the local `/v2/` 200.
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
    /// Token request for another registry's realm: learn it, then forward.
    LearnRealm(LearnRealm),
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

fn reject(status: u32, code: ErrorCode, reason: RejectReason, message: &str) -> Decision {
    let mut headers = base_headers();
    if status == 405 {
        headers.push(("allow".into(), "GET, HEAD".into()));
    }
    Decision::Reply(Reply {
        status,
        body: render(code, message, None),
        headers,
        reason: Some(reason),
        message: message.to_string(),
    })
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

/// `<scheme>://<authority>` for URLs given back to the client.
fn mirror_base(req: &Request<'_>) -> String {
    let proto = req
        .forwarded_proto
        .and_then(|p| p.split(',').next())
        .map(|p| p.trim().to_ascii_lowercase())
        .filter(|p| p == "http" || p == "https");
    let scheme = proto.unwrap_or_else(|| {
        let s = req.scheme.to_ascii_lowercase();
        if s == "https" {
            s
        } else {
            "http".to_string()
        }
    });
    format!("{scheme}://{}", req.authority)
}

/// A client authority we are willing to echo into URLs.
fn is_sane_authority(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 255
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
}

/// Host part of an authority, lowercased, without port.
fn host_without_port(a: &str) -> String {
    let h = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        a.split(':').next().unwrap_or_default()
    };
    h.to_ascii_lowercase()
}

/// Path tricks that must not reach routing components.
fn has_path_tricks(path: &str) -> bool {
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
fn take_ns(query: Option<&str>) -> (Option<String>, Option<String>) {
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

fn with_query(path: String, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// Routes one request.
///
/// `key` is the signing key (only used for `/_mirror/redirect/`; shorter than
/// 32 bytes means every signed URL is refused), `now` is unix seconds.
pub fn route(cfg: &CompiledConfig, req: &Request<'_>, key: &[u8], now: u64) -> Decision {
    route_with(cfg, req, key, now, &|_, _| false)
}

/// [`route`], with `is_token_host(registry, host)` telling whether a signed redirect
/// target is a recorded token host of its registry (see [`super::token_host`]).
pub fn route_with(
    cfg: &CompiledConfig,
    req: &Request<'_>,
    key: &[u8],
    now: u64,
    is_token_host: &dyn Fn(&str, &str) -> bool,
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
    let full = req.path;
    if !full.starts_with('/') || !full.bytes().all(super::challenge::is_url_char) {
        return bad_request("invalid request path");
    }
    let (path, query) = match full.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (full, None),
    };

    if full.starts_with(REDIRECT_PREFIX) {
        return route_redirect(cfg, req, key, now, is_token_host);
    }
    if has_path_tricks(path) {
        return bad_request("invalid request path");
    }
    if let Some(rest) = path.strip_prefix(AUTH_PREFIX) {
        return route_auth(cfg, req, rest, query);
    }
    if path == "/v2" || path == "/v2/" {
        return route_v2(cfg, req, None, query);
    }
    if let Some(rest) = path.strip_prefix("/v2/") {
        return route_v2(cfg, req, Some(rest), query);
    }
    not_found("unsupported path")
}

enum Kind {
    Manifests,
    Blobs,
    Tags,
    Referrers,
}

fn route_v2(
    cfg: &CompiledConfig,
    req: &Request<'_>,
    rest: Option<&str>,
    query: Option<&str>,
) -> Decision {
    let (ns_raw, query_rest) = take_ns(query);

    // Parse the resource path first (without touching the registry).
    let parsed = match rest {
        None => None,
        Some(rest) => {
            let comps: Vec<&str> = rest.split('/').collect();
            let n = comps.len();
            if n < 3 {
                return not_found("unsupported path");
            }
            let (Some(&kind), Some(&last), Some(name_comps)) =
                (comps.get(n - 2), comps.get(n - 1), comps.get(..n - 2))
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
            Some((name_comps.to_vec(), kind, last))
        }
    };

    // Registry selection: host mode, ns, path prefix, default.
    let host = host_without_port(req.authority);
    let ns_reg = match &ns_raw {
        None => None,
        Some(raw) => match percent_decode(raw).and_then(|d| cfg.registry(&d).map(|r| (d, r))) {
            Some(x) => Some(x),
            None => {
                if cfg.registry_for_host(&host).is_none() {
                    return name_unknown("unknown registry in ns");
                }
                None
            }
        },
    };
    let echo = ns_reg.as_ref().map(|(d, _)| d.clone());
    let mut name_comps = parsed.as_ref().map(|p| p.0.clone()).unwrap_or_default();
    let mut path_prefix = None;
    let registry: Option<&Registry> = if let Some(r) = cfg.registry_for_host(&host) {
        Some(r)
    } else if let Some((_, r)) = ns_reg {
        // containerd's path-prefix mode (`override_path`) still adds `ns`: a first
        // component naming the ns registry itself is the client's prefix, not part of
        // the name. A component naming another registry stays (a legal repository path).
        if let Some(first) = name_comps
            .first()
            .copied()
            .filter(|f| cfg.registry(f).is_some_and(|p| p.name == r.name))
        {
            path_prefix = Some(first.to_ascii_lowercase());
            name_comps.remove(0);
        }
        Some(r)
    } else if let Some(first) = name_comps
        .first()
        .copied()
        .filter(|f| f.contains(['.', ':']))
    {
        match cfg.registry(first) {
            Some(r) => {
                path_prefix = Some(first.to_ascii_lowercase());
                name_comps.remove(0);
                Some(r)
            }
            None => return name_unknown("unknown registry"),
        }
    } else {
        cfg.default_registry()
    };

    let Some((_, kind, last)) = parsed else {
        // `/v2/` itself.
        return match registry {
            None => Decision::Reply(Reply {
                status: 200,
                body: "{}".into(),
                headers: base_headers(),
                reason: None,
                message: "local /v2/".into(),
            }),
            Some(r) => forward(r, req, "/v2/".into(), query_rest.as_deref(), echo, None),
        };
    };
    let Some(registry) = registry else {
        return name_unknown("no registry selected");
    };
    if name_comps.is_empty() {
        return reject(
            400,
            ErrorCode::NameInvalid,
            RejectReason::NameInvalid,
            "invalid repository name",
        );
    }
    let mut name = name_comps.join("/");
    if registry.library_namespace && name_comps.len() == 1 {
        name = format!("library/{name}");
    }
    let name = match RepositoryName::parse(&name) {
        Ok(n) => n,
        Err(_) => {
            return reject(
                400,
                ErrorCode::NameInvalid,
                RejectReason::NameInvalid,
                "invalid repository name",
            )
        }
    };
    let upstream_path = match kind {
        Kind::Tags => format!("/v2/{name}/tags/list"),
        Kind::Manifests => match Reference::parse(last) {
            Ok(r) => format!("/v2/{name}/manifests/{r}"),
            Err(e) => return reference_error(&e),
        },
        Kind::Blobs | Kind::Referrers => match Digest::parse(last) {
            Ok(d) => {
                let k = if matches!(kind, Kind::Blobs) {
                    "blobs"
                } else {
                    "referrers"
                };
                format!("/v2/{name}/{k}/{d}")
            }
            Err(e) => return reference_error(&e),
        },
    };
    forward(
        registry,
        req,
        upstream_path,
        query_rest.as_deref(),
        echo,
        path_prefix,
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

fn forward(
    r: &Registry,
    req: &Request<'_>,
    path: String,
    query: Option<&str>,
    echo: Option<String>,
    path_prefix: Option<String>,
) -> Decision {
    Decision::Forward(Forward {
        kind: ForwardKind::Registry,
        registry: r.name.clone(),
        authority: r.upstream.clone(),
        path: with_query(path, query),
        set_registry_header: true,
        oci_namespace_echo: echo,
        strip_authorization: false,
        mirror_base: mirror_base(req),
        path_prefix,
    })
}

fn route_auth(
    cfg: &CompiledConfig,
    req: &Request<'_>,
    rest: &str,
    query: Option<&str>,
) -> Decision {
    let (host, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.to_ascii_lowercase();
    if !is_valid_authority(&host) {
        return denied(RejectReason::RealmDenied, "realm host not allowed");
    }
    // Prefer the registry the client addresses by host mode, else the first match.
    let host_mode = cfg.registry_for_host(&host_without_port(req.authority));
    let preferred = host_mode.filter(|r| super::config::any_match(&r.realm_hosts, &host));
    let Some(realm_registry) = preferred.or_else(|| cfg.registry_for_realm(&host)) else {
        return denied(RejectReason::RealmDenied, "realm host not allowed");
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
    if target.cache {
        // Envoy sends a cached registry to cache-service, which authenticates upstream
        // itself and ignores the client's Authorization: no upstream token is needed.
        return Decision::Reply(placeholder_token(&format!(
            "placeholder token for cached registry {}",
            target.name
        )));
    }
    if !super::config::any_match(&target.realm_hosts, &host) {
        return Decision::LearnRealm(LearnRealm {
            registry: target.name.clone(),
            cluster: target.cluster.clone(),
            upstream: target.upstream.clone(),
            query: plan.query,
            mirror_base: mirror_base(req),
        });
    }
    Decision::Forward(Forward {
        kind: ForwardKind::Auth,
        registry: target.name.clone(),
        authority: host,
        path: with_query(format!("/{tail}"), plan.query.as_deref()),
        set_registry_header: true,
        oci_namespace_echo: None,
        strip_authorization: false,
        mirror_base: mirror_base(req),
        path_prefix: None,
    })
}

/// The token request of `lr` sent to `learned`, the target registry's realm; the realm
/// host must be on the registry's `realm_hosts`, else 502 `DENIED`.
pub fn forward_to_learned(
    cfg: &CompiledConfig,
    lr: &LearnRealm,
    learned: &LearnedRealm,
) -> Result<Forward, Reply> {
    let allowed = cfg
        .registry(&lr.registry)
        .is_some_and(|r| learned.allowed_for(r));
    let target = if allowed {
        token::learned_target(learned, lr.query.as_deref())
    } else {
        None
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
        set_registry_header: true,
        oci_namespace_echo: None,
        strip_authorization: false,
        mirror_base: lr.mirror_base.clone(),
        path_prefix: None,
    })
}

/// Local 200 with a placeholder token, for registries that need no upstream token
/// (cached ones; ones whose `/v2/` answers 2xx without a challenge).
pub fn placeholder_token(message: &str) -> Reply {
    Reply {
        status: 200,
        body: token::PLACEHOLDER_TOKEN_BODY.into(),
        headers: base_headers(),
        reason: None,
        message: message.to_string(),
    }
}

/// 502 with an OCI error: a registry's realm could not be learned or is not allowed.
pub fn realm_failure(code: ErrorCode, message: &str) -> Reply {
    Reply {
        status: 502,
        body: render(code, message, None),
        headers: base_headers(),
        reason: Some(RejectReason::RealmUnavailable),
        message: message.to_string(),
    }
}

fn route_redirect(
    cfg: &CompiledConfig,
    req: &Request<'_>,
    key: &[u8],
    now: u64,
    is_token_host: &dyn Fn(&str, &str) -> bool,
) -> Decision {
    let sr = match SignedRedirect::parse(req.path).and_then(|sr| {
        sr.verify(cfg, key, now)?;
        Ok(sr)
    }) {
        Ok(sr) => sr,
        Err(e) => return denied(RejectReason::RedirectDenied, e.as_str()),
    };
    let strip = strip_credential(&sr.cred, req.authorization, || {
        is_token_host(&sr.registry, &sr.target.host)
    });
    Decision::Forward(Forward {
        kind: ForwardKind::Redirect,
        path: sr.target.path_and_query(),
        authority: sr.target.host,
        registry: sr.registry,
        set_registry_header: true,
        oci_namespace_echo: None,
        strip_authorization: strip,
        mirror_base: mirror_base(req),
        path_prefix: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::config::parse as parse_config;
    use crate::rules::redirect::{credential_fingerprint, mirror_url, Target};

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

    fn host_cfg() -> CompiledConfig {
        let mut c = crate::rules::config::default_config();
        c.host_suffix = Some("mirror.test".into());
        crate::rules::config::compile(&c).unwrap()
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
        assert!(f.set_registry_header);
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
        for p in ["/v2/", "/v2"] {
            let f = fwd(route(&cfg, &get("m", p), &KEY, 0));
            assert_eq!(
                (f.authority.as_str(), f.path.as_str()),
                ("registry-1.docker.io", "/v2/")
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
                ..get("m", "/v2/")
            },
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "https://m");
        let f = fwd(route(
            &cfg,
            &Request {
                scheme: "https",
                ..get("m", "/v2/")
            },
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "https://m");
        let f = fwd(route(
            &cfg,
            &Request {
                forwarded_proto: Some("gopher"),
                ..get("m", "/v2/")
            },
            &KEY,
            0,
        ));
        assert_eq!(f.mirror_base, "http://m");
    }

    #[test]
    fn auth() {
        let cfg = parse_config(b"").unwrap();
        let f = fwd(route(
            &cfg,
            &get("m", "/_mirror/auth/auth.docker.io/token?service=registry.docker.io&scope=repository:library/alpine:pull&scope=x"),
            &KEY,
            0,
        ));
        assert_eq!(f.kind, ForwardKind::Auth);
        assert_eq!(f.registry, "docker.io");
        assert_eq!(f.authority, "auth.docker.io");
        assert_eq!(
            f.path,
            "/token?service=registry.docker.io&scope=repository:library/alpine:pull&scope=x"
        );
        let f = fwd(route(
            &cfg,
            &get("m", "/_mirror/auth/us-docker.pkg.dev/v2/token"),
            &KEY,
            0,
        ));
        assert_eq!(
            (f.registry.as_str(), f.path.as_str()),
            ("registry.k8s.io", "/v2/token")
        );
        let f = fwd(route(&cfg, &get("m", "/_mirror/auth/quay.io"), &KEY, 0));
        assert_eq!(f.path, "/");
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
            "/v2/",
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
        let f = fwd(route(
            &cfg,
            &get("127.0.0.1:5000", "/_mirror/auth/auth.docker.io/token?account=a&scope=repository%3Adocker.io%2Flibrary%2Falpine%3Apull&service=registry.docker.io"),
            &KEY,
            0,
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
        let f = fwd(route(
            &cfg,
            &get("m", "/_mirror/auth/quay.io/v2/auth?scope=repository:quay.io/coreos/etcd:pull&service=quay.io"),
            &KEY,
            0,
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
        let f = fwd(route(
            &host_cfg(),
            &get(
                "docker.mirror.test",
                "/_mirror/auth/auth.docker.io/token?scope=repository:alpine:pull",
            ),
            &KEY,
            0,
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
            {"name":"quay.io","upstream":"quay.io","realm_hosts":["quay.io"],"cluster":"outbound|443||quay.io"}]}"#).unwrap();
        let l = learn(route(
            &ist,
            &get(
                "m",
                "/_mirror/auth/auth.docker.io/token?scope=repository:quay.io/a/b:pull",
            ),
            &KEY,
            0,
        ));
        assert_eq!(l.cluster, "outbound|443||quay.io");
    }

    #[test]
    fn redirects() {
        let cfg = parse_config(b"").unwrap();
        let target = Target {
            host: "production.cloudflare.docker.com".into(),
            path: "/registry-v2/x/data".into(),
            query: Some("verify=1".into()),
        };
        let cred = credential_fingerprint(Some("Bearer up"));
        let url = mirror_url("", &KEY, "docker.io", 100, &cred, &target);
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
        let f = fwd(route(
            &cfg,
            &Request {
                authorization: Some("Bearer other"),
                ..get("m", &url)
            },
            &KEY,
            50,
        ));
        assert!(!f.strip_authorization);
        let f = fwd(route(&cfg, &get("m", &url), &KEY, 50));
        assert!(!f.strip_authorization);
        // A recorded token host of the registry keeps the registry's token.
        let asked = std::cell::RefCell::new(Vec::new());
        let is_token_host = |r: &str, h: &str| {
            asked.borrow_mut().push(format!("{r} {h}"));
            true
        };
        let f = fwd(route_with(
            &cfg,
            &Request {
                authorization: Some("Bearer up"),
                ..get("m", &url)
            },
            &KEY,
            50,
            &is_token_host,
        ));
        assert!(!f.strip_authorization);
        assert_eq!(
            asked.borrow().as_slice(),
            ["docker.io production.cloudflare.docker.com"]
        );
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
}
