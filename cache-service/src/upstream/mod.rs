//! The registry client (`client`: auth and redirects, token cache) and the cache's use of it
//! for one upstream: the declared hosts it may reach, retries, health, bounded body reads.

pub mod auth;
pub mod client;

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use registry_rules::hosts::{any_match, HostPattern};
use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use url::Url;

use crate::config::UpstreamConfig;
use crate::lock;
use client::{host_key, Credential, Reach, RegistryClient};
use registry_rules::names::RepositoryName;

const MAX_REDIRECTS: usize = 5;
/// A Retry-After longer than this is not waited for: the 429 goes to the client.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// A redirect the registry clients (the cache's and `warm`'s) will not follow.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedirectError {
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooMany,
    #[error("bad redirect: {0}")]
    Bad(String),
    #[error("refused redirect to {target}: {reason}")]
    Refused { target: String, reason: HostRefusal },
}

/// Why a redirect target or token realm is not contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostRefusal {
    #[error("not an http(s) URL")]
    Scheme,
    #[error("https to http downgrade")]
    Downgrade,
    #[error("it is this cache's own address")]
    OwnAddress,
    #[error("it carries user info (credentials chosen by whoever wrote the URL)")]
    UserInfo,
    #[error("host not declared for this upstream")]
    NotDeclared,
    #[error("it points away from the mirror (the mirror did not rewrite it)")]
    AwayFromMirror,
}

/// Resolve a `Location` against the URL that answered it; only http(s) results.
pub fn resolve_location(current: &Url, location: &str) -> Result<Url, RedirectError> {
    // Named in the error without its query (see `client::without_query`).
    let named = location
        .split_once('?')
        .map_or(location, |(before, _)| before);
    let next = current
        .join(location)
        .map_err(|e| RedirectError::Bad(format!("{named}: {e}")))?;
    if next.scheme() != "https" && next.scheme() != "http" {
        return Err(RedirectError::Bad(format!("{named}: not http(s)")));
    }
    Ok(next)
}

/// Where `resp` redirects the next request, counting `hops`: `None` when it is no redirect
/// to follow (not 3xx, 304, or no `Location`). Relative locations resolve against `current`.
pub fn redirect_target(
    current: &Url,
    resp: &reqwest::Response,
    hops: &mut usize,
) -> Result<Option<Url>, RedirectError> {
    let status = resp.status();
    if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    let Some(loc) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) else {
        return Ok(None);
    };
    *hops += 1;
    if *hops > MAX_REDIRECTS {
        return Err(RedirectError::TooMany);
    }
    resolve_location(current, loc).map(Some)
}

/// The hosts one upstream may send the cache to: its own host, the declared realm and
/// redirect hosts, never a scheme downgrade and never the cache itself.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    base: Url,
    realm_hosts: Vec<HostPattern>,
    redirect_hosts: Vec<HostPattern>,
    /// The cache's listen address: a target there would be a request to itself.
    own_addr: Option<SocketAddr>,
}

/// `host[:port]` as the declaration writes it: lowercase, port only when not the default.
fn authority(u: &Url) -> Option<String> {
    let host = u.host_str()?.to_ascii_lowercase();
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

impl HostPolicy {
    pub fn new(cfg: &UpstreamConfig, own_addr: Option<SocketAddr>) -> Self {
        Self {
            base: cfg.url.clone(),
            realm_hosts: cfg.realm_hosts.clone(),
            redirect_hosts: cfg.redirect_hosts.clone(),
            own_addr,
        }
    }

    fn is_upstream_host(&self, u: &Url) -> bool {
        host_key(u) == host_key(&self.base)
    }

    fn is_own_address(&self, u: &Url) -> bool {
        let Some(own) = self.own_addr else {
            return false;
        };
        if u.port_or_known_default() != Some(own.port()) {
            return false;
        }
        let ip = match u.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(d)) => {
                return d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost")
            }
            None => return false,
        };
        let local = |a: IpAddr| a.is_loopback() || a.is_unspecified();
        ip == own.ip() || own.ip().is_unspecified() || (local(ip) && local(own.ip()))
    }

    fn check(&self, from: &Url, to: &Url, declared: &[HostPattern]) -> Result<(), HostRefusal> {
        if to.scheme() != "https" && to.scheme() != "http" {
            return Err(HostRefusal::Scheme);
        }
        if from.scheme() == "https" && to.scheme() == "http" {
            return Err(HostRefusal::Downgrade);
        }
        if !to.username().is_empty() || to.password().is_some() {
            return Err(HostRefusal::UserInfo);
        }
        // The upstream's own host was configured by the operator: with the cache listening
        // on 0.0.0.0:P, an upstream at some-ip:P is not the cache.
        if !self.is_upstream_host(to) && self.is_own_address(to) {
            return Err(HostRefusal::OwnAddress);
        }
        let declared = authority(to).is_some_and(|a| any_match(declared, &a));
        if self.is_upstream_host(to) || declared {
            Ok(())
        } else {
            Err(HostRefusal::NotDeclared)
        }
    }

    /// May a redirect from `from` be followed to `to`?
    pub fn check_redirect(&self, from: &Url, to: &Url) -> Result<(), RedirectError> {
        self.check(from, to, &self.redirect_hosts)
            .map_err(|reason| RedirectError::Refused {
                target: client::without_query(to),
                reason,
            })
    }

    /// May the cache ask this token realm for tokens (no downgrade from the upstream's scheme)?
    pub fn check_realm(&self, realm: &Url) -> Result<(), HostRefusal> {
        self.check(&self.base, realm, &self.realm_hosts)
    }
}

/// Why a body was not read whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the body: {0}")]
    Read(String),
}

/// Statuses by which an upstream says it does not do HEAD on this resource.
pub fn head_unsupported(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST | StatusCode::NOT_IMPLEMENTED
    )
}

/// Read a response body of at most `max` bytes; stops reading as soon as it is over.
pub async fn read_body(mut resp: reqwest::Response, max: usize) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    let mut buf = BytesMut::new();
    while let Some(c) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Read(e.to_string()))?
    {
        if buf.len().saturating_add(c.len()) > max {
            return Err(BodyError::TooLarge(max));
        }
        buf.extend_from_slice(&c);
    }
    Ok(buf.freeze())
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Connect(String),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("token request to {realm} failed: {reason}")]
    Token { realm: String, reason: String },
    #[error("building the HTTP client: {0}")]
    Client(String),
}

/// Outcome of the latest upstream calls, for the status page. A call fails when no response
/// came (connection, TLS, redirect or token errors) or the answer was 5xx/429.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub last_success: Option<std::time::SystemTime>,
    pub last_failure: Option<std::time::SystemTime>,
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub client: RegistryClient,
    /// Clients' authorization decisions and the realm they log in at
    /// (`client_auth = "upstream"`).
    pub access: crate::authorize::Access,
    health: Mutex<Health>,
}

/// Parsed `Retry-After` (seconds or HTTP date).
pub fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let t = httpdate::parse_http_date(v).ok()?;
    Some(
        t.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn retryable(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS
}

impl Upstream {
    /// `own_addr`: the cache's listen address, never contacted as an upstream target.
    pub fn new(cfg: &UpstreamConfig, own_addr: Option<SocketAddr>) -> Result<Self, UpstreamError> {
        let mut cas = Vec::new();
        for pem in &cfg.ca_pems {
            cas.extend(
                reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| UpstreamError::Client(e.to_string()))?,
            );
        }
        let reach = Reach::Declared {
            policy: Box::new(HostPolicy::new(cfg, own_addr)),
            credentials: cfg.credentials.clone(),
        };
        Ok(Self {
            name: cfg.name.clone(),
            client: RegistryClient::new(
                &cfg.name,
                cfg.url.clone(),
                reach,
                cas,
                Duration::from_secs(60),
            )?,
            access: crate::authorize::Access::default(),
            health: Mutex::new(Health::default()),
        })
    }

    pub fn base_url(&self) -> &Url {
        self.client.base()
    }

    pub fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    fn record(&self, r: &Result<reqwest::Response, UpstreamError>) {
        let now = std::time::SystemTime::now();
        let mut h = lock(&self.health);
        match r {
            Ok(resp) if !retryable(resp.status()) => h.last_success = Some(now),
            Ok(resp) => {
                h.last_failure = Some(now);
                h.last_error = Some(format!("HTTP {}", resp.status()));
            }
            Err(e) => {
                h.last_failure = Some(now);
                h.last_error = Some(e.to_string());
            }
        }
    }

    /// Tokens cached and live tokens dropped because the cache was full.
    pub fn token_stats(&self) -> (usize, u64) {
        self.client.token_stats()
    }

    /// One request to `url` with a client's credential (or none) as given, no retry: see
    /// [`RegistryClient::send_as_is`]. Counted in the upstream's health.
    pub async fn send_as_client(
        &self,
        method: Method,
        url: Url,
        accept: Option<&str>,
        credential: Option<&client::ClientCredential>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let r = self
            .client
            .send_as_is(method, url, accept, credential)
            .await;
        self.record(&r);
        r
    }

    /// One request for `path_and_query` on the upstream, with auth and redirects.
    async fn send_once(
        &self,
        method: &Method,
        path_and_query: &str,
        name: &RepositoryName,
        accept: Option<&str>,
        credential: &Credential,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = self
            .base_url()
            .join(path_and_query)
            .map_err(|e| RedirectError::Bad(e.to_string()))?;
        let scope = format!("repository:{}:pull", name.as_str());
        self.client
            .send_with(method, url, accept, &scope, credential)
            .await
    }

    /// Send with up to `attempts` tries on connection errors, 5xx and 429 (honouring a short
    /// Retry-After). The last response is returned as is, errors included.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        name: &RepositoryName,
        accept: Option<&str>,
        attempts: u32,
        credential: &Credential,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let r = self
                .send_once(&method, path_and_query, name, accept, credential)
                .await;
            self.record(&r);
            let last = attempt >= attempts;
            let wait = match &r {
                Ok(resp) if retryable(resp.status()) && !last => {
                    match retry_after(resp.headers()) {
                        Some(w) if w > MAX_RETRY_WAIT => return r,
                        Some(w) => w,
                        None => backoff,
                    }
                }
                Err(UpstreamError::Connect(_)) if !last => backoff,
                _ => return r,
            };
            tracing::debug!(upstream = %self.name, attempt, ?wait, "retrying upstream request");
            tokio::time::sleep(wait).await;
            backoff *= 2;
            attempt += 1;
        }
    }
}

/// Minimal base64 (standard alphabet, padded) for Basic credentials.
pub(crate) mod base64_engine {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
        for chunk in b.chunks(3) {
            let n = chunk.len();
            let v = (u32::from(chunk.first().copied().unwrap_or(0)) << 16)
                | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
                | u32::from(chunk.get(2).copied().unwrap_or(0));
            for i in 0..4 {
                if i <= n {
                    let idx = ((v >> (18 - 6 * i)) & 63) as usize;
                    out.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'=')));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[cfg(test)]
    #[test]
    fn known() {
        assert_eq!(encode("user:pass"), "dXNlcjpwYXNz");
        assert_eq!(encode("a"), "YQ==");
        assert_eq!(encode("ab"), "YWI=");
        assert_eq!(encode(""), "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Credentials;
    use reqwest::header::HeaderValue;

    fn up(url: &str, realm_hosts: &[&str]) -> Upstream {
        Upstream::new(
            &UpstreamConfig {
                name: "x".into(),
                url: Url::parse(url).unwrap(),
                ca_pems: vec![],
                credentials: Some(Credentials {
                    username: "u".into(),
                    password: "p".into(),
                }),
                realm_hosts: realm_hosts
                    .iter()
                    .map(|s| HostPattern::parse(s).unwrap())
                    .collect(),
                redirect_hosts: vec![],
                client_auth: Default::default(),
                authorization_ttl: Duration::from_secs(60),
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn credentials_only_for_trusted_realms() {
        let u = up("https://registry-1.docker.io", &["auth.docker.io"]);
        let ok = |s: &str| {
            u.client
                .credentials_for_realm(&Url::parse(s).unwrap())
                .is_some()
        };
        assert!(ok("https://auth.docker.io/token"));
        assert!(ok("https://registry-1.docker.io/token"));
        assert!(!ok("https://evil.example.com/token"));
        assert!(!ok("https://auth.docker.io.evil.com/token"));
        assert!(!ok("http://auth.docker.io/token"), "never over plain http");
        assert!(!ok("https://registry-1.docker.io:8443/token"), "other port");
    }

    #[test]
    fn retry_after_parsing() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    mod served {
        use super::*;
        use crate::testserver::{endless, reply, TestServer};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;

        pub(super) fn config(url: &str, realms: &[&str], redirects: &[&str]) -> UpstreamConfig {
            let p = |v: &[&str]| v.iter().map(|h| HostPattern::parse(h).unwrap()).collect();
            UpstreamConfig {
                name: "lab".into(),
                url: Url::parse(url).unwrap(),
                ca_pems: vec![],
                credentials: None,
                realm_hosts: p(realms),
                redirect_hosts: p(redirects),
                client_auth: Default::default(),
                authorization_ttl: Duration::from_secs(60),
            }
        }

        fn repo() -> RepositoryName {
            RepositoryName::parse("lab/app").unwrap()
        }

        async fn get(u: &Upstream, path: &str) -> Result<reqwest::Response, UpstreamError> {
            tokio::time::timeout(
                Duration::from_secs(20),
                u.send(Method::GET, path, &repo(), None, 1, &Credential::Cache),
            )
            .await
            .expect("answered in time, not hung")
        }

        /// A registry whose realm (`realm_path` on `realm`) issues `tok-<generation>` tokens;
        /// only the current generation is accepted.
        fn registry(
            realm: String,
            generation: Arc<AtomicU64>,
        ) -> impl Fn(&crate::testserver::Seen) -> axum::response::Response {
            move |seen| {
                let g = generation.load(Ordering::SeqCst);
                if seen.uri.starts_with("/token") {
                    let body = format!(r#"{{"token":"tok-{g}","expires_in":300}}"#);
                    return reply(200, &[("content-type", "application/json")], body);
                }
                // u64::MAX: a registry that refuses every token.
                if g != u64::MAX && seen.authorization() == Some(&format!("Bearer tok-{g}")) {
                    return reply(200, &[], "ok");
                }
                let challenge = format!(r#"Bearer realm="{realm}",service="lab""#);
                reply(401, &[("www-authenticate", challenge.as_str())], "")
            }
        }

        #[tokio::test]
        async fn revoked_token_is_dropped_and_refetched_once() {
            let generation = Arc::new(AtomicU64::new(0));
            let server = {
                let slot: Arc<Mutex<String>> = Arc::default();
                let s2 = slot.clone();
                let g = generation.clone();
                let srv = TestServer::start(move |seen| {
                    let realm = s2.lock().unwrap().clone();
                    registry(realm, g.clone())(seen)
                })
                .await;
                *slot.lock().unwrap() = srv.url("/token");
                srv
            };
            let u = Upstream::new(&config(&server.url(""), &[], &[]), None).unwrap();
            let r = get(&u, "/v2/lab/app/manifests/1").await.unwrap();
            assert_eq!(r.status(), 200);

            // The registry revokes every token issued so far.
            generation.store(1, Ordering::SeqCst);
            let r = get(&u, "/v2/lab/app/manifests/1").await.unwrap();
            assert_eq!(
                r.status(),
                200,
                "a fresh token after the cached one was refused"
            );
            let tokens = server
                .seen()
                .iter()
                .filter(|s| s.uri.starts_with("/token"))
                .count();
            assert_eq!(tokens, 2);

            // A registry that refuses every token: one fresh token, then the 401 goes back.
            generation.store(u64::MAX, Ordering::SeqCst);
            let before = server.seen().len();
            let r = get(&u, "/v2/lab/app/manifests/1").await.unwrap();
            assert_eq!(r.status(), 401);
            let after: Vec<_> = server.seen().into_iter().skip(before).collect();
            assert_eq!(
                after.iter().filter(|s| s.uri.starts_with("/token")).count(),
                1,
                "{after:?}"
            );
            assert!(after.len() <= 3, "bounded: {after:?}");
        }

        #[tokio::test]
        async fn endless_or_bad_token_answers_are_refused() {
            for body in ["endless", "control", "huge-expiry"] {
                let slot: Arc<Mutex<String>> = Arc::default();
                let s2 = slot.clone();
                let server = TestServer::start(move |seen| {
                    if seen.uri.starts_with("/token") {
                        return match body {
                            "endless" => reply(200, &[], endless()),
                            "control" => reply(200, &[], r#"{"token":"a\r\nx-evil: 1"}"#),
                            _ => reply(
                                200,
                                &[],
                                r#"{"token":"t","expires_in":18446744073709551615}"#,
                            ),
                        };
                    }
                    if seen.authorization() == Some("Bearer t") {
                        return reply(200, &[], "ok");
                    }
                    let c = format!(r#"Bearer realm="{}""#, s2.lock().unwrap());
                    reply(401, &[("www-authenticate", c.as_str())], "")
                })
                .await;
                *slot.lock().unwrap() = server.url("/token");
                let u = Upstream::new(&config(&server.url(""), &[], &[]), None).unwrap();
                let r = get(&u, "/v2/lab/app/manifests/1").await;
                match body {
                    "huge-expiry" => assert_eq!(r.unwrap().status(), 200, "capped, no panic"),
                    _ => assert!(
                        matches!(r, Err(UpstreamError::Token { .. })),
                        "{body}: {r:?}"
                    ),
                }
                assert_eq!(u.token_stats().0, usize::from(body == "huge-expiry"));
            }
        }

        #[tokio::test]
        async fn undeclared_redirects_and_realms_are_never_contacted() {
            let bystander = TestServer::start(|_| {
                reply(
                    200,
                    &[("content-type", "application/json")],
                    r#"{"token":"t"}"#,
                )
            })
            .await;
            let target = bystander.url("/metrics");
            let own: SocketAddr = "127.0.0.1:5001".parse().unwrap();
            let to_self = "http://localhost:5001/metrics".to_owned();
            let hostile_realm = bystander.url("/token");
            let server = TestServer::start(move |seen| match seen.uri.as_str() {
                "/v2/lab/app/blobs/undeclared" => reply(307, &[("location", target.as_str())], ""),
                "/v2/lab/app/blobs/self" => reply(307, &[("location", to_self.as_str())], ""),
                "/v2/lab/app/blobs/loop" => {
                    reply(307, &[("location", "/v2/lab/app/blobs/loop")], "")
                }
                _ => {
                    let c = format!(r#"Bearer realm="{hostile_realm}""#);
                    reply(401, &[("www-authenticate", c.as_str())], "")
                }
            })
            .await;
            let u = Upstream::new(&config(&server.url(""), &[], &[]), Some(own)).unwrap();
            for (path, want) in [
                ("undeclared", HostRefusal::NotDeclared),
                ("self", HostRefusal::OwnAddress),
            ] {
                match get(&u, &format!("/v2/lab/app/blobs/{path}")).await {
                    Err(UpstreamError::Redirect(RedirectError::Refused { reason, .. })) => {
                        assert_eq!(reason, want, "{path}")
                    }
                    r => panic!("{path}: {r:?}"),
                }
            }
            assert!(matches!(
                get(&u, "/v2/lab/app/blobs/loop").await,
                Err(UpstreamError::Redirect(RedirectError::TooMany))
            ));
            // A challenge naming an undeclared realm: no token request, and not remembered.
            assert!(matches!(
                get(&u, "/v2/lab/app/manifests/1").await,
                Err(UpstreamError::Token { .. })
            ));
            assert!(u.client.learned_challenge().is_none());
            assert!(bystander.seen().is_empty(), "{:?}", bystander.seen());

            // Declared, the same redirect is followed.
            let declared = bystander.addr.to_string();
            let u = Upstream::new(&config(&server.url(""), &[], &[&declared]), Some(own)).unwrap();
            let r = get(&u, "/v2/lab/app/blobs/undeclared").await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(bystander.seen().len(), 1);
        }

        #[tokio::test]
        async fn a_clients_credential_goes_to_the_upstream_host_only_and_answers_no_challenge() {
            // One bystander host, declared as both a redirect target (a CDN) and a realm.
            let cdn = TestServer::start(|_| {
                reply(
                    200,
                    &[("content-type", "application/json")],
                    r#"{"token":"t"}"#,
                )
            })
            .await;
            let (to_cdn, realm) = (cdn.url("/blob"), cdn.url("/token"));
            let server = TestServer::start(move |seen| match seen.uri.as_str() {
                "/v2/lab/app/blobs/redirected" => reply(307, &[("location", to_cdn.as_str())], ""),
                _ => {
                    let c = format!(r#"Bearer realm="{realm}",service="lab""#);
                    reply(401, &[("www-authenticate", c.as_str())], "")
                }
            })
            .await;
            let declared = cdn.addr.to_string();
            let u =
                Upstream::new(&config(&server.url(""), &[&declared], &[&declared]), None).unwrap();
            let value = HeaderValue::from_static("Bearer alices-token");
            let alice =
                Credential::Client(client::ClientCredential::from_header(Some(&value)).unwrap());
            let send = |path: &'static str| {
                let (u, alice) = (&u, alice.clone());
                async move {
                    u.send(Method::GET, path, &repo(), None, 1, &alice)
                        .await
                        .unwrap()
                }
            };
            let r = send("/v2/lab/app/blobs/redirected").await;
            assert_eq!(r.status(), 200, "the redirect is followed");
            let r = send("/v2/lab/app/manifests/1").await;
            assert_eq!(
                r.status(),
                401,
                "the upstream's refusal of the client is the answer, not the cache's token"
            );
            assert!(
                server
                    .seen()
                    .iter()
                    .all(|s| s.authorization() == Some("Bearer alices-token")),
                "{:?}",
                server.seen()
            );
            let at_cdn = cdn.seen();
            assert_eq!(
                at_cdn.len(),
                1,
                "the redirect only, no token request: {at_cdn:?}"
            );
            assert_eq!(
                at_cdn.first().and_then(|s| s.authorization()),
                None,
                "the credential stays home"
            );
        }

        #[tokio::test]
        async fn a_basic_challenge_gets_the_credentials_on_the_upstream_host_only() {
            // base64("u:p")
            let server = TestServer::start(|seen| match seen.authorization() {
                Some("Basic dTpw") => reply(200, &[], "ok"),
                _ => reply(401, &[("www-authenticate", r#"Basic realm="lab""#)], ""),
            })
            .await;
            let mut cfg = config(&server.url(""), &[], &[]);
            cfg.credentials = Some(Credentials {
                username: "u".into(),
                password: "p".into(),
            });
            let u = Upstream::new(&cfg, None).unwrap();
            assert_eq!(
                get(&u, "/v2/lab/app/manifests/1").await.unwrap().status(),
                200
            );
            // Without credentials the 401 goes back as is, asked once.
            let anonymous = Upstream::new(&config(&server.url(""), &[], &[]), None).unwrap();
            let before = server.seen().len();
            assert_eq!(
                get(&anonymous, "/v2/lab/app/manifests/1")
                    .await
                    .unwrap()
                    .status(),
                401
            );
            assert_eq!(server.seen().len(), before + 1);
        }
    }

    #[test]
    fn host_policy() {
        let cfg = |url: &str| UpstreamConfig {
            name: "x".into(),
            url: Url::parse(url).unwrap(),
            ca_pems: vec![],
            credentials: None,
            realm_hosts: vec![HostPattern::parse("*.pkg.dev").unwrap()],
            redirect_hosts: vec![
                HostPattern::parse("storage.googleapis.com").unwrap(),
                HostPattern::parse("127.0.0.1:9000").unwrap(),
            ],
            client_auth: Default::default(),
            authorization_ttl: Duration::from_secs(60),
        };
        let own = Some("0.0.0.0:5001".parse().unwrap());
        let p = HostPolicy::new(&cfg("https://registry.k8s.io"), own);
        let u = |s: &str| Url::parse(s).unwrap();
        let from = u("https://registry.k8s.io/v2/x/blobs/y");
        let redirect = |to: &str| {
            p.check_redirect(&from, &u(to)).map_err(|e| match e {
                RedirectError::Refused { reason, .. } => reason,
                e => panic!("{e}"),
            })
        };
        assert_eq!(redirect("https://storage.googleapis.com/b/o"), Ok(()));
        assert_eq!(redirect("https://registry.k8s.io:443/v2/"), Ok(()));
        assert_eq!(
            redirect("http://storage.googleapis.com/b"),
            Err(HostRefusal::Downgrade)
        );
        assert_eq!(
            redirect("https://evil.example/"),
            Err(HostRefusal::NotDeclared)
        );
        assert_eq!(
            redirect("https://storage.googleapis.com.evil/"),
            Err(HostRefusal::NotDeclared)
        );
        assert_eq!(
            redirect("https://registry.k8s.io:8443/"),
            Err(HostRefusal::NotDeclared)
        );
        assert_eq!(redirect("https://127.0.0.1:9000/"), Ok(()));
        assert_eq!(
            redirect("https://127.0.0.1:5001/metrics"),
            Err(HostRefusal::OwnAddress)
        );
        assert_eq!(
            redirect("https://[::1]:5001/"),
            Err(HostRefusal::OwnAddress)
        );
        assert_eq!(
            redirect("ftp://storage.googleapis.com/"),
            Err(HostRefusal::Scheme)
        );
        assert_eq!(
            redirect("https://u:p@storage.googleapis.com/"),
            Err(HostRefusal::UserInfo)
        );
        assert_eq!(p.check_realm(&u("https://us-docker.pkg.dev/token")), Ok(()));
        assert_eq!(
            p.check_realm(&u("https://pkg.dev/token")),
            Err(HostRefusal::NotDeclared)
        );
        assert_eq!(
            p.check_realm(&u("http://us-docker.pkg.dev/token")),
            Err(HostRefusal::Downgrade)
        );
        // Listening on 0.0.0.0:5001, an upstream at another address on port 5001 is not
        // the cache: its own realm and same-host redirects stay allowed.
        let lan = HostPolicy::new(&cfg("https://10.0.0.5:5001"), own);
        let on_lan = u("https://10.0.0.5:5001/v2/x/blobs/y");
        assert_eq!(lan.check_realm(&u("https://10.0.0.5:5001/token")), Ok(()));
        assert!(lan
            .check_redirect(&on_lan, &u("https://10.0.0.5:5001/b"))
            .is_ok());
        assert!(lan
            .check_redirect(&on_lan, &u("https://127.0.0.1:5001/metrics"))
            .is_err());
        // A plain-http upstream (a lab) may use an http realm on its own host.
        let lab = HostPolicy::new(&cfg("http://127.0.0.1:5000"), own);
        assert_eq!(lab.check_realm(&u("http://127.0.0.1:5000/token")), Ok(()));
        assert_eq!(
            lab.check_realm(&u("http://127.0.0.1:5002/token")),
            Err(HostRefusal::NotDeclared)
        );
    }

    mod proptest_retry_after {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testserver::proptest_config())]

            #[test]
            fn proptest_retry_after_never_panics(v in "[ -~]{0,40}", secs in any::<u64>()) {
                let mut h = HeaderMap::new();
                if let Ok(hv) = HeaderValue::from_str(&v) {
                    h.insert(RETRY_AFTER, hv);
                    let _ = retry_after(&h);
                }
                h.insert(RETRY_AFTER, HeaderValue::from_str(&secs.to_string()).unwrap());
                prop_assert_eq!(retry_after(&h), Some(Duration::from_secs(secs)));
                // A date far in the future is a long wait, never a panic.
                let far = std::time::SystemTime::now() + Duration::from_secs(secs % (1 << 34));
                h.insert(RETRY_AFTER, HeaderValue::from_str(&httpdate::fmt_http_date(far)).unwrap());
                prop_assert!(retry_after(&h).is_some());
            }
        }
    }

    mod proptest_redirects {
        use super::*;
        use proptest::prelude::*;

        fn policy() -> HostPolicy {
            HostPolicy::new(
                &UpstreamConfig {
                    name: "x".into(),
                    url: Url::parse("https://reg.example").unwrap(),
                    ca_pems: vec![],
                    credentials: None,
                    realm_hosts: vec![],
                    redirect_hosts: vec![
                        HostPattern::parse("cdn.example").unwrap(),
                        HostPattern::parse("*.blob.example").unwrap(),
                    ],
                    client_auth: Default::default(),
                    authorization_ttl: Duration::from_secs(60),
                },
                Some("127.0.0.1:5001".parse().unwrap()),
            )
        }

        /// Independent of the pattern matcher: what the allowlist above means.
        fn allowed(u: &Url) -> bool {
            let host = u.host_str().unwrap_or("");
            let port = u.port_or_known_default();
            u.scheme() == "https"
                && port == Some(443)
                && u.username().is_empty()
                && u.password().is_none()
                && (host == "reg.example"
                    || host == "cdn.example"
                    || (host.ends_with(".blob.example") && host.len() > ".blob.example".len()))
        }

        fn location() -> impl Strategy<Value = String> {
            let scheme = prop_oneof![
                Just("https://"),
                Just("http://"),
                Just("//"),
                Just(""),
                Just("ftp://"),
                Just("HTTPS://")
            ];
            let host = prop_oneof![
                Just("reg.example".to_owned()),
                Just("cdn.example".to_owned()),
                Just("a.blob.example".to_owned()),
                Just("blob.example".to_owned()),
                Just("cdn.example.evil".to_owned()),
                Just("127.0.0.1".to_owned()),
                Just("localhost".to_owned()),
                Just("[::1]".to_owned()),
                Just("CDN.Example".to_owned()),
                Just("user@cdn.example".to_owned()),
                "[a-z0-9.-]{1,20}",
            ];
            let port = prop_oneof![
                Just(String::new()),
                Just(":443".to_owned()),
                Just(":5001".to_owned()),
                (1u16..).prop_map(|p| format!(":{p}"))
            ];
            let path = "[ -~]{0,30}";
            (scheme, host, port, path).prop_map(|(s, h, p, path)| format!("{s}{h}{p}/{path}"))
        }

        proptest! {
            #![proptest_config(crate::testserver::proptest_config())]

            #[test]
            fn proptest_redirect_target_stays_on_the_allowlist(loc in prop_oneof![location(), "\\PC{0,60}"]) {
                let p = policy();
                let from = Url::parse("https://reg.example/v2/x/blobs/sha256:0").unwrap();
                if let Ok(next) = resolve_location(&from, &loc) {
                    prop_assert_eq!(
                        p.check_redirect(&from, &next).is_ok(),
                        allowed(&next),
                        "{} -> {}", loc, next
                    );
                }
            }
        }
    }

    /// What the cache says about a URL (in logs and error bodies) leaves out its query: for
    /// a signed CDN or bucket URL that is the credential.
    #[tokio::test]
    async fn errors_name_urls_without_their_query() {
        let signed = "http://127.0.0.1:1/blob?X-Amz-Signature=secret";
        let e = reqwest::Client::new().get(signed).send().await.unwrap_err();
        let said = client::error_chain(&e);
        assert!(said.contains("127.0.0.1:1/blob"), "{said}");
        assert!(!said.contains("secret"), "{said}");

        let policy = HostPolicy::new(&served::config("https://registry.example", &[], &[]), None);
        let from = Url::parse("https://registry.example/v2/a/blobs/x").unwrap();
        let to = Url::parse("https://cdn.example/b?sig=secret").unwrap();
        let refused = policy.check_redirect(&from, &to).unwrap_err().to_string();
        assert!(
            refused.contains("cdn.example/b") && !refused.contains("secret"),
            "{refused}"
        );
    }
}
