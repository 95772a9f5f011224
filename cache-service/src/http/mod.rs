//! axum front: routing of `/v2/...`, validation of names/references before anything else,
//! response headers, and the health/readiness/metrics endpoints.

pub mod error;
pub mod range;
pub mod server;
pub mod status;
pub mod zero_copy;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::authorize::{self, Check};
use crate::cache::{streams, BlobReply, Cache, CacheError, ManifestReply, Source};
use crate::metrics::Metrics;
use crate::upstream::client::{ClientCredential, Credential};
use error::{ApiError, RequestError};
use registry_rules::declaration::ClientAuth;
use registry_rules::digest::Digest;
use registry_rules::names::{Reference, RepositoryName, Tag};
use registry_rules::realms::RealmUrl;

#[derive(Clone)]
pub struct AppState {
    pub cache: Arc<Cache>,
    /// The configuration in force (client authorization, version); swapped by a reload.
    pub config: Arc<crate::reload::ConfigState>,
    /// Status page state (request counts per repository).
    pub status: Arc<status::StatusState>,
}

pub fn router(state: AppState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

const API_VERSION: &str = "registry/2.0";
/// On `/readyz`: the configuration version in force (`<serial>-<file hash>`).
pub const CONFIG_VERSION_HEADER: &str = "x-regmirror-config-version";
pub(crate) const MAX_TAGS_N: u32 = 10_000;
/// Token requests of clients of an upstream-authorized registry, forwarded by the filter:
/// `/_mirror/auth/<realm host><realm path>?<query>`.
const AUTH_PREFIX: &str = registry_rules::route::AUTH_PREFIX;
/// The same for a token request that reached another registry's realm: relayed to the
/// upstream's own realm.
const OWN_REALM_PATH: &str = registry_rules::route::OWN_REALM_PATH;

fn base_headers(h: &mut HeaderMap) {
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
}

#[derive(Clone)]
enum Route {
    Base,
    Manifest(RepositoryName, Reference),
    Blob(RepositoryName, Digest),
    Tags(RepositoryName),
    Referrers(RepositoryName, Digest),
}

fn parse_route(path: &str) -> Result<Route, ApiError> {
    if path == "/v2" || path == "/v2/" {
        return Ok(Route::Base);
    }
    let rest = path.strip_prefix("/v2/").ok_or_else(ApiError::not_found)?;
    if rest.contains('%') {
        return Err(RequestError::PercentEncoded.into());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let n = parts.len();
    if n < 3 {
        return Err(ApiError::not_found());
    }
    let (name_parts, kind, last) = match (parts.get(n - 2), parts.last()) {
        (Some(&"tags"), Some(&"list")) => (parts.get(..n - 2), "tags", ""),
        // `tags/list` is the only path under `tags`.
        (Some(&"tags"), _) => return Err(ApiError::not_found()),
        (Some(k), Some(l)) => (parts.get(..n - 2), *k, *l),
        _ => return Err(ApiError::not_found()),
    };
    let name_raw = name_parts.unwrap_or_default().join("/");
    if !matches!(kind, "manifests" | "blobs" | "tags" | "referrers") {
        return Err(ApiError::not_found());
    }
    let name = RepositoryName::parse(&name_raw)?;
    Ok(match kind {
        "manifests" => Route::Manifest(name, crate::oci::parse_reference(last)?),
        "blobs" => Route::Blob(name, crate::oci::parse_digest(last)?),
        "referrers" => Route::Referrers(name, crate::oci::parse_digest(last)?),
        _ => Route::Tags(name),
    })
}

fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

async fn handle(
    State(st): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path();
    match path {
        "/healthz" => return (StatusCode::OK, "ok\n").into_response(),
        "/readyz" => {
            let version = st.config.current().version.to_string();
            let (status, body) = match st.cache.check_ready().await {
                Ok(()) => (StatusCode::OK, "ready".to_owned()),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("storage unavailable: {e}"),
                ),
            };
            let mut r = (status, format!("{body}\nconfig-version: {version}\n")).into_response();
            if let Ok(v) = HeaderValue::from_str(&version) {
                r.headers_mut().insert(CONFIG_VERSION_HEADER, v);
            }
            return r;
        }
        "/metrics" => {
            let body = st.cache.render_metrics(st.config.refusal().is_some()).await;
            return ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response();
        }
        "/_status" | "/" if matches!(method, Method::GET | Method::HEAD) => {
            let body = status::render(&status::Snapshot::read(&st.cache, &st.status, &st.config));
            return (
                [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                body,
            )
                .into_response();
        }
        _ => {}
    }
    let metrics = st.cache.metrics.clone();
    let answer = if path.starts_with(AUTH_PREFIX) || path == OWN_REALM_PATH {
        token_relay(&st, &method, &uri, &headers).await
    } else {
        handle_v2(&st, &method, &uri, &headers).await
    };
    match answer {
        Ok(r) => r,
        Err(e) => {
            metrics.error(e.code);
            if e.status.is_server_error() {
                tracing::warn!(%method, path, code = e.code.as_str(), message = %e.message, "request failed");
            } else {
                tracing::debug!(%method, path, code = e.code.as_str(), message = %e.message, "request refused");
            }
            e.into_response()
        }
    }
}

async fn handle_v2(
    st: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if !uri.path().starts_with("/v2") {
        return Err(ApiError::not_found());
    }
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(ApiError::unsupported()),
    };
    let route = parse_route(uri.path())?;
    let query = query_pairs(uri);
    let ns = query
        .iter()
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.clone());
    let registry = headers
        .get("x-mirror-registry")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(ns.clone());

    if let Route::Base = route {
        // Without a named registry and several upstreams there is nothing to check.
        if let Ok(up) = st.cache.upstream(registry.as_deref()) {
            authorize_client(st, &up, &Check::base(), headers).await?;
        }
        let mut r = (
            [(header::CONTENT_TYPE, "application/json")],
            if head { "" } else { "{}" },
        )
            .into_response();
        base_headers(r.headers_mut());
        if head {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        }
        return Ok(r);
    }

    let up = st.cache.upstream(registry.as_deref())?;
    let check = match &route {
        Route::Base => Check::base(),
        Route::Manifest(name, reference) => Check::manifest(name, reference),
        Route::Blob(name, digest) => Check::blob(name, digest),
        Route::Tags(name) | Route::Referrers(name, _) => Check::repository(name),
    };
    let source = Source {
        credential: authorize_client(st, &up, &check, headers).await?,
        upstream: up.clone(),
    };
    if let Route::Manifest(name, _)
    | Route::Blob(name, _)
    | Route::Tags(name)
    | Route::Referrers(name, _) = &route
    {
        st.status.record_request(&up.name, name.as_str());
    }
    let served = serve_route(st, &source, route.clone(), &query, head, headers).await;
    let mut resp = match served {
        // Fetched with the client's own credential on a decision held from before, and the
        // upstream refused it now (a token expired or revoked since): the decision is stale.
        // Asked again, the client gets the upstream's own answer (its challenge, to log in
        // anew), or, allowed after all (another client's download it joined was refused),
        // one more try.
        Err(e)
            if matches!(source.credential, Credential::Client(_))
                && matches!(e.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) =>
        {
            let client = ClientCredential::from_header(headers.get(header::AUTHORIZATION));
            authorize::forget(&up, &check, client.as_ref());
            let source = Source {
                credential: authorize_client(st, &up, &check, headers).await?,
                upstream: up,
            };
            serve_route(st, &source, route, &query, head, headers).await?
        }
        r => r?,
    };
    base_headers(resp.headers_mut());
    if let Some(ns) = ns {
        if let Ok(v) = HeaderValue::from_str(&ns) {
            resp.headers_mut().insert("oci-namespace", v);
        }
    }
    Ok(resp)
}

/// The answer to one `/v2/` request of a repository, fetched with `up`'s credential.
async fn serve_route(
    st: &AppState,
    up: &Source,
    route: Route,
    query: &[(String, String)],
    head: bool,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    Ok(match route {
        Route::Base => return Err(ApiError::not_found()),
        Route::Manifest(name, reference) => {
            let mut m = st.cache.manifest(up, &name, &reference, head).await?;
            if !accepts(headers, &m.media_type) {
                m = default_platform_for(st, up, &name, &reference, m, head, headers).await?;
            }
            let mut b = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, &m.media_type)
                .header("docker-content-digest", m.digest.as_str())
                .header(header::CONTENT_LENGTH, m.size);
            if let Reference::Digest(_) = reference {
                b = b.header(header::CACHE_CONTROL, "max-age=31536000");
            }
            let body = if head {
                Body::empty()
            } else {
                Body::from(m.body.unwrap_or_default())
            };
            b.body(body).map_err(ApiError::internal)?
        }
        Route::Blob(name, digest) => blob_response(st, up, &name, &digest, head, headers).await?,
        Route::Tags(name) => {
            let q = tags_query(query)?;
            let pq = if q.is_empty() {
                format!("/v2/{name}/tags/list")
            } else {
                format!("/v2/{name}/tags/list?{q}")
            };
            small_response(st, up, &name, &pq, None, head).await?
        }
        Route::Referrers(name, digest) => {
            let q = {
                let mut q = url::form_urlencoded::Serializer::new(String::new());
                for (k, v) in query {
                    if k == "artifactType" {
                        q.append_pair("artifactType", v);
                    }
                }
                q.finish()
            };
            let pq = if q.is_empty() {
                format!("/v2/{name}/referrers/{digest}")
            } else {
                format!("/v2/{name}/referrers/{digest}?{q}")
            };
            small_response(st, up, &name, &pq, Some(crate::oci::MT_OCI_INDEX), head).await?
        }
    })
}

/// How the registry's clients are authorized, from the configuration in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientPolicy {
    pub mode: ClientAuth,
    pub ttl: std::time::Duration,
    /// The cache has its own login: content is fetched with it, not with a client's.
    pub cache_login: bool,
}

/// The policy in force for `registry`. A reload puts the new config in force before it swaps
/// the upstreams: an upstream the new file removed is refused here, never served without the
/// authorization the old file required.
pub(crate) fn client_policy(st: &AppState, registry: &str) -> Result<ClientPolicy, ApiError> {
    let live = st.config.current();
    let Some(upstream) = live.config.upstreams.get(registry) else {
        return Err(CacheError::UnknownRegistry(registry.to_string()).into());
    };
    Ok(ClientPolicy {
        mode: upstream.client_auth,
        ttl: upstream.authorization_ttl,
        cache_login: upstream.credentials.is_some(),
    })
}

/// Authorize the request's client for `check` (`client_auth = "upstream"`; anyone
/// otherwise): the access its content is then fetched with.
async fn authorize_client(
    st: &AppState,
    up: &Arc<crate::upstream::Upstream>,
    check: &Check,
    headers: &HeaderMap,
) -> Result<Credential, ApiError> {
    let policy = client_policy(st, &up.name)?;
    if policy.mode == ClientAuth::Anonymous {
        return Ok(Credential::Cache);
    }
    let client = ClientCredential::from_header(headers.get(header::AUTHORIZATION));
    Ok(authorize::authorize(
        up,
        policy.ttl,
        policy.cache_login,
        check,
        client,
        &st.cache.metrics,
    )
    .await?)
}

/// A client's token request relayed to the upstream's own realm (see [`authorize::relay`]).
/// Only for a registry whose clients are authorized upstream; anything but the realm its
/// challenges name is refused.
async fn token_relay(
    st: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if *method != Method::GET {
        return Err(RequestError::TokenNotGet.into());
    }
    let registry = headers
        .get("x-mirror-registry")
        .and_then(|v| v.to_str().ok());
    let up = st.cache.upstream(registry)?;
    if client_policy(st, &up.name)?.mode != ClientAuth::Upstream {
        return Err(RequestError::NoUpstreamLogin.into());
    }
    // `/_mirror/auth/<authority><path>` names a realm; `/_mirror/token` asks the upstream's own.
    let named = uri
        .path()
        .strip_prefix(AUTH_PREFIX)
        .map(|rest| {
            rest.split_once('/')
                .and_then(|(authority, path)| RealmUrl::new(authority, &format!("/{path}")))
                .ok_or_else(|| authorize::RelayError::NotIssued(rest.to_owned()))
        })
        .transpose()?;
    let requested = named
        .as_ref()
        .map_or(authorize::Realm::Own, authorize::Realm::Named);
    let client = ClientCredential::from_header(headers.get(header::AUTHORIZATION));
    let a = authorize::relay(
        &up,
        requested,
        uri.query(),
        client.as_ref(),
        &st.cache.metrics,
    )
    .await?;
    let mut b = Response::builder()
        .status(StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY))
        .header(header::CONTENT_LENGTH, a.body.len())
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(ct) = &a.content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    for c in &a.challenges {
        b = b.header(header::WWW_AUTHENTICATE, c);
    }
    b.body(Body::from(a.body)).map_err(ApiError::internal)
}

async fn small_response(
    st: &AppState,
    up: &Source,
    name: &RepositoryName,
    pq: &str,
    accept: Option<&str>,
    head: bool,
) -> Result<Response, ApiError> {
    let r = st.cache.small(up, name, pq, accept).await?;
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, r.body.len());
    if let Some(ct) = &r.content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    if let Some(l) = &r.link {
        b = b.header(header::LINK, l);
    }
    b.body(if head {
        Body::empty()
    } else {
        Body::from(r.body)
    })
    .map_err(ApiError::internal)
}

/// Builds the body for `[start, end)`.
type BodyFn = Box<dyn FnOnce(u64, Option<u64>) -> Body + Send>;

async fn blob_response(
    st: &AppState,
    up: &Source,
    name: &RepositoryName,
    digest: &Digest,
    head: bool,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // Parse Range before touching anything so a malformed one costs nothing.
    let range = match headers.get(header::RANGE) {
        Some(v) if !head => {
            let s = v
                .to_str()
                .map_err(|_| RequestError::range(range::RangeError::Malformed, None))?;
            range::parse(s).map_err(|e| RequestError::range(e, None))?
        }
        _ => None,
    };
    let reply = st.cache.blob(up, name, digest, head).await?;
    let metrics: Arc<Metrics> = st.cache.metrics.clone();
    let builder = Response::builder()
        .header("docker-content-digest", digest.as_str())
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "max-age=31536000");
    let (size, body_of): (Option<u64>, BodyFn) = match reply {
        BlobReply::Head { size } => {
            return builder
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, size)
                .body(Body::empty())
                .map_err(ApiError::internal);
        }
        // The store's own URL: the client fetches it there (Range and all); only a
        // presigned object of verified content is handed out.
        BlobReply::Redirect { url } => {
            return Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header("docker-content-digest", digest.as_str())
                .header(header::LOCATION, url)
                .header(header::CONTENT_LENGTH, 0)
                // The URL expires; the content behind it does not.
                .header(header::CACHE_CONTROL, "no-store")
                .body(Body::empty())
                .map_err(ApiError::internal);
        }
        BlobReply::Cached { body, size } => (
            Some(size),
            Box::new(move |s, e| Body::from_stream(body.range(s, e.unwrap_or(size)))),
        ),
        BlobReply::Flight { flight, size } => (
            size,
            Box::new(move |s, e| Body::from_stream(streams::reader(flight, s, e, metrics))),
        ),
    };
    if head {
        let mut b = builder.status(StatusCode::OK);
        if let Some(size) = size {
            b = b.header(header::CONTENT_LENGTH, size);
        }
        return b.body(Body::empty()).map_err(ApiError::internal);
    }
    match (range, size) {
        (Some(spec), Some(size)) => {
            let (s, e) =
                range::resolve(spec, size).map_err(|err| RequestError::range(err, Some(size)))?;
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, e - s)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/{}", s, e - 1, size),
                )
                .body(body_of(s, Some(e)))
                .map_err(ApiError::internal)
        }
        (_, Some(size)) => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, size)
            .body(body_of(0, Some(size)))
            .map_err(ApiError::internal),
        // Unknown length (upstream sent none): the Range is ignored, which HTTP allows.
        (_, None) => builder
            .status(StatusCode::OK)
            .body(body_of(0, None))
            .map_err(ApiError::internal),
    }
}

/// What a registry answers by tag to a client that takes no index when the tag is one: the
/// index's linux/amd64 manifest, if the client takes that (as distribution and Docker Hub
/// do). By digest, or with nothing acceptable, the content asked for is not there in a form
/// the client takes.
async fn default_platform_for(
    st: &AppState,
    up: &Source,
    name: &RepositoryName,
    reference: &Reference,
    index: ManifestReply,
    head: bool,
    headers: &HeaderMap,
) -> Result<ManifestReply, ApiError> {
    let not_accepted =
        |media_type: &str| ApiError::from(RequestError::NotAccepted(media_type.to_owned()));
    if !matches!(reference, Reference::Tag(_)) || !crate::oci::is_index(&index.media_type) {
        return Err(not_accepted(&index.media_type));
    }
    let body = match index.body {
        Some(b) => b,
        // A HEAD's answer has no body: the stored index's.
        None => {
            let by_digest = Reference::Digest(index.digest.clone());
            let whole = st.cache.manifest(up, name, &by_digest, false).await?;
            whole.body.unwrap_or_default()
        }
    };
    let child = crate::oci::default_platform_manifest(&body)
        .ok_or_else(|| not_accepted(&index.media_type))?;
    let m = st
        .cache
        .manifest(up, name, &Reference::Digest(child), head)
        .await?;
    if !accepts(headers, &m.media_type) {
        return Err(not_accepted(&m.media_type));
    }
    Ok(m)
}

/// Accept negotiation: one stored manifest per digest, served unless the client listed
/// manifest media types that exclude it (no wildcard). A missing or generic Accept gets it.
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    use crate::oci::{MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST};
    let listed: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|t| !t.is_empty())
        .collect();
    let names_manifest_types = listed.iter().any(|t| {
        matches!(
            t.as_str(),
            MT_DOCKER_MANIFEST | MT_DOCKER_LIST | MT_OCI_MANIFEST | MT_OCI_INDEX
        ) || crate::oci::is_schema1(t)
    });
    !names_manifest_types
        || listed
            .iter()
            .any(|t| t == "*/*" || t == "application/*" || t == media_type)
}

/// Validated `n`/`last` for tags/list, re-encoded (nothing else is passed upstream).
fn tags_query(query: &[(String, String)]) -> Result<String, ApiError> {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in query {
        match k.as_str() {
            "n" => {
                let n: u32 = v.parse().map_err(|_| RequestError::Pagination)?;
                if n > MAX_TAGS_N {
                    return Err(RequestError::Pagination.into());
                }
                q.append_pair("n", &n.to_string());
            }
            "last" => {
                let t = Tag::parse(v)?;
                q.append_pair("last", t.as_str());
            }
            _ => {}
        }
    }
    Ok(q.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(p: &str) -> &'static str {
        match parse_route(p) {
            Ok(_) => "OK",
            Err(e) => e.code.as_str(),
        }
    }

    #[test]
    fn routes() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(parse_route("/v2/"), Ok(Route::Base)));
        assert!(matches!(
            parse_route("/v2/library/alpine/manifests/3.20"),
            Ok(Route::Manifest(..))
        ));
        assert!(
            matches!(parse_route(&format!("/v2/a/manifests/b/blobs/{d}")), Ok(Route::Blob(n, _)) if n.as_str() == "a/manifests/b")
        );
        assert!(
            matches!(parse_route("/v2/a/b/tags/list"), Ok(Route::Tags(n)) if n.as_str() == "a/b")
        );
        assert!(matches!(
            parse_route(&format!("/v2/a/referrers/{d}")),
            Ok(Route::Referrers(..))
        ));
        assert_eq!(code("/v2/../etc/manifests/x"), "NAME_INVALID");
        assert_eq!(code("/v2/a/%2e%2e/manifests/x"), "NAME_INVALID");
        assert_eq!(code("/v2/a/manifests/..%2f"), "NAME_INVALID");
        assert_eq!(code("/v2/a/manifests/.."), "MANIFEST_INVALID");
        assert_eq!(code("/v2/a/blobs/sha256:abc"), "DIGEST_INVALID");
        // sha512 is a valid digest, but not one the cache stores.
        let long = format!("sha512:{}", "a".repeat(128));
        assert_eq!(code(&format!("/v2/a/blobs/{long}")), "DIGEST_INVALID");
        assert_eq!(code(&format!("/v2/a/manifests/{long}")), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/blobs/../../x"), "NAME_UNKNOWN");
        assert_eq!(code("/v2/../blobs/x"), "NAME_INVALID");
        assert_eq!(code("/v2/a/uploads/x"), "NAME_UNKNOWN");
        assert_eq!(code("/v2/a"), "NAME_UNKNOWN");
        assert_eq!(code("/v2/tags/list"), "NAME_UNKNOWN");
        assert_eq!(code("/v2/a/tags/latest"), "NAME_UNKNOWN");
        assert_eq!(code("/v2//manifests/x"), "NAME_INVALID");
    }

    #[test]
    fn accept_negotiation() {
        use crate::oci::{MT_DOCKER_MANIFEST, MT_OCI_INDEX};
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(accepts(&HeaderMap::new(), MT_OCI_INDEX));
        assert!(accepts(&h("application/json"), MT_OCI_INDEX));
        assert!(accepts(
            &h(&format!("{MT_DOCKER_MANIFEST}, */*")),
            MT_OCI_INDEX
        ));
        assert!(accepts(
            &h(&format!("{MT_DOCKER_MANIFEST};q=0.5, {MT_OCI_INDEX}")),
            MT_OCI_INDEX
        ));
        assert!(!accepts(&h(MT_DOCKER_MANIFEST), MT_OCI_INDEX));
    }
}
