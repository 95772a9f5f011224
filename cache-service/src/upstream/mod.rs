//! Registry client for one upstream: token auth, manual redirect following, retries.

pub mod auth;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode};
use url::Url;

use crate::config::{Credentials, UpstreamConfig};
use crate::oci::RepoName;
use auth::{parse_challenges, Challenge, TokenCache, DEFAULT_TOKEN_TTL};

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
    let next = current
        .join(loc)
        .map_err(|e| RedirectError::Bad(format!("{loc}: {e}")))?;
    if next.scheme() != "https" && next.scheme() != "http" {
        return Err(RedirectError::Bad(format!("{loc}: not http(s)")));
    }
    Ok(Some(next))
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

impl UpstreamError {
    fn from_reqwest(e: reqwest::Error) -> Self {
        UpstreamError::Connect(e.to_string())
    }
}

/// Host identity a credential is bound to: host and effective port.
fn host_key(u: &Url) -> String {
    format!(
        "{}:{}",
        u.host_str().unwrap_or("").to_ascii_lowercase(),
        u.port_or_known_default().unwrap_or(0)
    )
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
    base: Url,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    realm_hosts: Vec<String>,
    tokens: Mutex<TokenCache>,
    /// Last Bearer challenge (realm, service) seen from the upstream host; lets us fetch a token
    /// before the first request instead of after a 401.
    challenge: Mutex<Option<(String, String)>>,
    health: Mutex<Health>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .use_rustls_tls();
        for pem in &cfg.ca_pems {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| UpstreamError::Client(e.to_string()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let http = b
            .build()
            .map_err(|e| UpstreamError::Client(e.to_string()))?;
        Ok(Self {
            name: cfg.name.clone(),
            base: cfg.url.clone(),
            http,
            credentials: cfg.credentials.clone(),
            realm_hosts: cfg.realm_hosts.clone(),
            tokens: Mutex::new(TokenCache::default()),
            challenge: Mutex::new(None),
            health: Mutex::new(Health::default()),
        })
    }

    pub fn base_url(&self) -> &Url {
        &self.base
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

    /// May the configured credentials be sent to this token realm? Only to the upstream's own
    /// host or a host listed in `realm_hosts` — never to whatever realm a server names.
    fn credentials_for_realm(&self, realm: &Url) -> Option<&Credentials> {
        let creds = self.credentials.as_ref()?;
        let host = realm.host_str()?.to_ascii_lowercase();
        let same_as_upstream = host_key(realm) == host_key(&self.base);
        let listed = self.realm_hosts.iter().any(|h| {
            *h == host
                || realm
                    .port_or_known_default()
                    .is_some_and(|p| *h == format!("{host}:{p}"))
        });
        let secure =
            realm.scheme() == "https" || (same_as_upstream && self.base.scheme() == "http");
        (secure && (same_as_upstream || listed)).then_some(creds)
    }

    async fn token(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<String, UpstreamError> {
        if let Some(t) = lock(&self.tokens).get(realm, service, scope, Instant::now()) {
            return Ok(t);
        }
        let terr = |reason: String| UpstreamError::Token {
            realm: realm.to_owned(),
            reason,
        };
        let url = auth::token_url(realm, service, scope).map_err(terr)?;
        let mut req = self.http.get(url.clone()).timeout(Duration::from_secs(30));
        if let Some(c) = self.credentials_for_realm(&url) {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().await.map_err(|e| terr(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(terr(format!("status {}", resp.status())));
        }
        let body: serde_json::Value = resp.json().await.map_err(|e| terr(e.to_string()))?;
        let token = auth::token_of(&body)
            .ok_or_else(|| terr("response has no token".into()))?
            .to_owned();
        let ttl = body
            .get("expires_in")
            .and_then(|e| e.as_u64())
            .filter(|e| *e > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_TTL);
        lock(&self.tokens).put(realm, service, scope, token.clone(), ttl, Instant::now());
        Ok(token)
    }

    /// Turn a 401's challenges into an Authorization value for the host that sent them.
    async fn answer_challenge(
        &self,
        challenges: &[Challenge],
        target: &Url,
        default_scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Some(b) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = b.param("realm") else {
                return Ok(None);
            };
            let service = b.param("service").unwrap_or("");
            let scope = b.param("scope").unwrap_or(default_scope);
            if host_key(target) == host_key(&self.base) {
                *lock(&self.challenge) = Some((realm.to_owned(), service.to_owned()));
            }
            let tok = self.token(realm, service, scope).await?;
            return Ok(HeaderValue::from_str(&format!("Bearer {tok}")).ok());
        }
        if challenges.iter().any(|c| c.scheme == "basic")
            && host_key(target) == host_key(&self.base)
        {
            if let Some(c) = &self.credentials {
                use base64_engine::encode;
                let v = format!(
                    "Basic {}",
                    encode(&format!("{}:{}", c.username, c.password))
                );
                return Ok(HeaderValue::from_str(&v).ok());
            }
        }
        Ok(None)
    }

    /// One request with auth and redirects, no retries.
    async fn send_once(
        &self,
        method: &Method,
        path_and_query: &str,
        name: &RepoName,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{}:pull", name.as_str());
        let mut url = self
            .base
            .join(path_and_query)
            .map_err(|e| RedirectError::Bad(e.to_string()))?;
        // Authorization bound to the host it was issued for.
        let mut auth: Option<(String, HeaderValue)> = None;
        let known = lock(&self.challenge).clone();
        if let Some((realm, service)) = known {
            if let Ok(tok) = self.token(&realm, &service, &scope).await {
                if let Ok(v) = HeaderValue::from_str(&format!("Bearer {tok}")) {
                    auth = Some((host_key(&self.base), v));
                }
            }
        }
        let mut redirects = 0;
        let mut retried_auth_for: Option<String> = None;
        loop {
            let hk = host_key(&url);
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some((h, v)) = &auth {
                if *h == hk {
                    req = req.header(AUTHORIZATION, v.clone());
                }
            }
            let resp = req.send().await.map_err(UpstreamError::from_reqwest)?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED
                && retried_auth_for.as_deref() != Some(hk.as_str())
            {
                let challenges: Vec<Challenge> = resp
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(parse_challenges)
                    .collect();
                if let Some(v) = self.answer_challenge(&challenges, &url, &scope).await? {
                    auth = Some((hk.clone(), v));
                    retried_auth_for = Some(hk);
                    continue;
                }
                return Ok(resp);
            }
            if let Some(next) = redirect_target(&url, &resp, &mut redirects)? {
                tracing::debug!(upstream = %self.name, from = %url, to = %next, "following redirect");
                url = next;
                retried_auth_for = None;
                continue;
            }
            return Ok(resp);
        }
    }

    /// Send with up to `attempts` tries on connection errors, 5xx and 429 (honouring a short
    /// Retry-After). The last response is returned as is, errors included.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        name: &RepoName,
        accept: Option<&str>,
        attempts: u32,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let r = self.send_once(&method, path_and_query, name, accept).await;
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
mod base64_engine {
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

    fn up(url: &str, realm_hosts: &[&str]) -> Upstream {
        Upstream::new(&UpstreamConfig {
            name: "x".into(),
            url: Url::parse(url).unwrap(),
            ca_pems: vec![],
            credentials: Some(Credentials {
                username: "u".into(),
                password: "p".into(),
            }),
            realm_hosts: realm_hosts.iter().map(|s| s.to_string()).collect(),
            client_token: None,
        })
        .unwrap()
    }

    #[test]
    fn credentials_only_for_trusted_realms() {
        let u = up("https://registry-1.docker.io", &["auth.docker.io"]);
        let ok = |s: &str| u.credentials_for_realm(&Url::parse(s).unwrap()).is_some();
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
}
