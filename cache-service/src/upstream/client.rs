//! The one registry client: a request with its Bearer (or Basic) challenges answered and its
//! redirects followed by hand, one token cache with expiry, an `Authorization` only ever sent
//! to the host it was issued for. The cache's upstreams (`Upstream`) and the operator tools'
//! mirror client (`warm`, `doctor`) are this client with a different `Reach`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use url::Url;

use super::auth::{self, TokenCache, MAX_TOKEN_RESPONSE_BYTES};
use super::{read_body, redirect_target, HostPolicy, HostRefusal, RedirectError, UpstreamError};
use crate::config::Credentials;
use crate::lock;
use registry_rules::challenge::{self, Challenge};

/// Where a client may go beyond its base URL, and with what: the one place the cache's
/// upstream client and the operator tools' mirror client differ.
#[derive(Debug, Clone)]
pub enum Reach {
    /// The cache's upstream: redirects and token realms only to the declared hosts; the
    /// configured credentials only to allowed realms (Basic: only to the upstream host).
    Declared {
        policy: Box<HostPolicy>,
        credentials: Option<Credentials>,
    },
    /// A client of the mirror: anonymous, following the redirects the mirror hands out.
    /// `realms_on_base`: refuse a token realm away from the mirror (`doctor`: such a realm
    /// means the mirror did not rewrite it).
    Anonymous { realms_on_base: bool },
}

/// A client's `Authorization` header value, held only in memory and never printed: it goes
/// verbatim to the upstream's own host (and, through the token relay, to its realm) only.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredential(HeaderValue);

impl ClientCredential {
    /// The request's `Authorization`, if it has a non-empty one.
    pub fn from_header(value: Option<&HeaderValue>) -> Option<Self> {
        value
            .filter(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
            .map(|v| Self(v.clone()))
    }

    pub fn header(&self) -> &HeaderValue {
        &self.0
    }
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCredential(..)")
    }
}

/// Whose access a request to the upstream uses.
#[derive(Debug, Clone)]
pub enum Credential {
    /// The cache's own: its configured login, or anonymous tokens, through the challenge flow.
    Cache,
    /// An authorized client's, verbatim and to the upstream's host only: a challenge is not
    /// answered (the 401 is the answer) and a redirect to another host goes without it.
    Client(ClientCredential),
}

/// Host identity an `Authorization` is bound to: scheme, host and effective port.
pub fn host_key(u: &Url) -> String {
    format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str().unwrap_or("").to_ascii_lowercase(),
        u.port_or_known_default().unwrap_or(0)
    )
}

/// `u` without its query: for a signed CDN or bucket URL the query is the credential, and
/// what is said about a URL reaches logs and clients' error bodies.
pub fn without_query(u: &Url) -> String {
    let mut u = u.clone();
    if u.query().is_some() {
        u.set_query(Some("…"));
    }
    u.to_string()
}

/// An error with its sources (reqwest hides the interesting part in them); a URL reqwest
/// names loses its query ([`without_query`]).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    if let Some(u) = e
        .downcast_ref::<reqwest::Error>()
        .and_then(reqwest::Error::url)
    {
        s = s.replace(u.as_str(), &without_query(u));
    }
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The challenges of a response's `WWW-Authenticate` headers.
fn challenges(resp: &reqwest::Response) -> Vec<Challenge> {
    challenge::parse_all(
        resp.headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// The Bearer challenge of a response, if any.
pub fn bearer_challenge(resp: &reqwest::Response) -> Option<challenge::BearerChallenge> {
    challenge::bearer(&challenges(resp))
}

/// (realm, service, scope) a token is cached under.
type TokenKey = (String, String, String);

/// The token key a set of challenges asks for: the first Bearer challenge's
/// (realm, service, scope), `default_scope` when it names none.
fn bearer_key(challenges: &[Challenge], default_scope: &str) -> Option<TokenKey> {
    let b = challenge::bearer(challenges)?;
    Some((
        b.realm,
        b.service.unwrap_or_default(),
        b.scope.unwrap_or_else(|| default_scope.to_owned()),
    ))
}

/// An `Authorization` for one host and, for a Bearer token, the key it is cached under.
#[derive(Debug, Clone)]
struct SentAuth {
    host: String,
    value: HeaderValue,
    token: Option<(TokenKey, String)>,
    /// Fetched for this request (not from the cache): if refused, nothing better exists.
    fresh: bool,
}

impl SentAuth {
    fn key(&self) -> Option<&TokenKey> {
        self.token.as_ref().map(|(k, _)| k)
    }

    fn bearer(host: String, key: TokenKey, (tok, fresh): (String, bool)) -> Option<Self> {
        let value = HeaderValue::from_str(&format!("Bearer {tok}")).ok()?;
        Some(Self {
            host,
            value,
            token: Some((key, tok)),
            fresh,
        })
    }
}

/// Idle upstream connections kept per host (the pool is a cache like any other: bounded).
const MAX_IDLE_CONNECTIONS_PER_HOST: usize = 16;

#[derive(Debug)]
pub struct RegistryClient {
    base: Url,
    http: reqwest::Client,
    reach: Reach,
    tokens: Mutex<TokenCache>,
    /// Last Bearer challenge (realm, service) from the base host whose realm proved allowed:
    /// a token is fetched before the first request instead of after a 401.
    challenge: Mutex<Option<(String, String)>>,
    /// Names the client in log lines.
    label: String,
}

impl RegistryClient {
    /// `cas`: extra trusted CAs; `read_timeout`: longest silence within a response.
    pub fn new(
        label: &str,
        base: Url,
        reach: Reach,
        cas: Vec<reqwest::Certificate>,
        read_timeout: Duration,
    ) -> Result<Self, UpstreamError> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(read_timeout)
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .use_rustls_tls()
            // HTTP/1.1 even where the upstream offers h2: a blob download gets a TCP stream of
            // its own (h2's default flow-control windows, 2 MiB a stream and 5 MiB a
            // connection, would cap every download sharing it at a few MiB per round trip),
            // and a cold byte costs ~14% less CPU than over h2 (measured on TLS distribution).
            .http1_only()
            // A burst of downloads opens a connection each; the pool keeps a few for reuse
            // and closes the rest once they are idle.
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS_PER_HOST);
        for cert in cas {
            b = b.add_root_certificate(cert);
        }
        let http = b
            .build()
            .map_err(|e| UpstreamError::Client(e.to_string()))?;
        Ok(Self {
            base,
            http,
            reach,
            tokens: Mutex::new(TokenCache::default()),
            challenge: Mutex::new(None),
            label: label.to_owned(),
        })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Tokens cached and live tokens dropped because the cache was full.
    pub fn token_stats(&self) -> (usize, u64) {
        let t = lock(&self.tokens);
        (t.len(), t.evictions())
    }

    /// One request with a client's credential (or none) exactly as given: no challenge
    /// answered, no redirect followed (a 3xx is the answer), to `url` only. The authorization
    /// check and the token relay; the caller decides `url` may see the credential.
    pub async fn send_as_is(
        &self,
        method: Method,
        url: Url,
        accept: Option<&str>,
        credential: Option<&ClientCredential>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = self
            .http
            .request(method, url)
            .timeout(Duration::from_secs(30));
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        if let Some(c) = credential {
            req = req.header(AUTHORIZATION, c.header().clone());
        }
        req.send()
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))
    }

    /// May a request follow a redirect from `from` to `to` (the declared hosts; anything for
    /// an anonymous reach)?
    pub fn check_redirect(&self, from: &Url, to: &Url) -> Result<(), RedirectError> {
        match &self.reach {
            Reach::Declared { policy, .. } => policy.check_redirect(from, to),
            Reach::Anonymous { .. } => Ok(()),
        }
    }

    /// May a token realm be asked (the declared hosts; for a mirror client, its rules)?
    pub fn check_realm(&self, realm: &Url) -> Result<(), HostRefusal> {
        match &self.reach {
            Reach::Declared { policy, .. } => policy.check_realm(realm),
            Reach::Anonymous {
                realms_on_base: true,
            } if host_key(realm) != host_key(&self.base) => Err(HostRefusal::AwayFromMirror),
            Reach::Anonymous { .. } => Ok(()),
        }
    }

    /// May the configured credentials be sent to this token realm? Only to an allowed realm
    /// (the upstream's own host or `realm_hosts`), over https unless the upstream itself is
    /// plain http on that very host.
    pub(super) fn credentials_for_realm(&self, realm: &Url) -> Option<&Credentials> {
        let Reach::Declared {
            credentials: Some(creds),
            ..
        } = &self.reach
        else {
            return None;
        };
        let same_as_base = host_key(realm) == host_key(&self.base);
        let secure = realm.scheme() == "https" || same_as_base;
        (secure && self.check_realm(realm).is_ok()).then_some(creds)
    }

    /// A token for (realm, service, scope): cached (`false`), else fetched from an allowed
    /// realm (`true`).
    pub async fn token(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<(String, bool), UpstreamError> {
        if let Some(t) = lock(&self.tokens).get(realm, service, scope, Instant::now()) {
            return Ok((t, false));
        }
        let terr = |reason: String| UpstreamError::Token {
            realm: realm.to_owned(),
            reason,
        };
        let url = auth::token_url(realm, service, scope).map_err(terr)?;
        if let Err(why) = self.check_realm(&url) {
            tracing::warn!(client = %self.label, %realm, reason = %why, "token realm refused");
            return Err(terr(format!("realm refused: {why}")));
        }
        let mut req = self.http.get(url.clone()).timeout(Duration::from_secs(30));
        if let Some(c) = self.credentials_for_realm(&url) {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().await.map_err(|e| terr(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(terr(format!("HTTP {}", resp.status())));
        }
        let body = read_body(resp, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(|e| terr(e.to_string()))?;
        let (token, ttl) = auth::parse_token_response(&body).map_err(|e| terr(e.to_string()))?;
        lock(&self.tokens).put(realm, service, scope, token.clone(), ttl, Instant::now());
        Ok((token, true))
    }

    /// Turn a 401's challenges into an Authorization for the host that sent them, with the
    /// token key it came from (to drop it if the host refuses it).
    async fn answer_challenge(
        &self,
        challenges: &[Challenge],
        target: &Url,
        default_scope: &str,
    ) -> Result<Option<SentAuth>, UpstreamError> {
        let on_base = host_key(target) == host_key(&self.base);
        if let Some(key) = bearer_key(challenges, default_scope) {
            let tok = self.token(&key.0, &key.1, &key.2).await?;
            // Remembered only once the realm proved allowed (token() checks it).
            if on_base {
                *lock(&self.challenge) = Some((key.0.clone(), key.1.clone()));
            }
            return Ok(SentAuth::bearer(host_key(target), key, tok));
        }
        if challenges.iter().any(|c| c.is("bearer")) {
            return Ok(None);
        }
        let basic = match &self.reach {
            Reach::Declared {
                credentials: Some(c),
                ..
            } if on_base && challenges.iter().any(|c| c.is("basic")) => c,
            _ => return Ok(None),
        };
        let v = format!(
            "Basic {}",
            super::base64_engine::encode(&format!("{}:{}", basic.username, basic.password))
        );
        Ok(HeaderValue::from_str(&v).ok().map(|value| SentAuth {
            host: host_key(target),
            value,
            token: None,
            fresh: true,
        }))
    }

    /// One request with challenges answered and redirects followed, no retries. A refused
    /// cached token is dropped and a fresh one fetched once; a refused fresh one ends it.
    pub async fn send(
        &self,
        method: &Method,
        url: Url,
        accept: Option<&str>,
        scope: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_with(method, url, accept, scope, &Credential::Cache)
            .await
    }

    /// [`Self::send`] with whose access: with a client's credential, that credential is the
    /// only one sent (see [`Credential`]).
    pub async fn send_with(
        &self,
        method: &Method,
        url: Url,
        accept: Option<&str>,
        scope: &str,
        credential: &Credential,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut url = url;
        // Authorization bound to the host it was issued for.
        let mut auth: Option<SentAuth> = None;
        let client = match credential {
            Credential::Client(c) => {
                auth = Some(SentAuth {
                    host: host_key(&self.base),
                    value: c.header().clone(),
                    token: None,
                    fresh: true,
                });
                true
            }
            Credential::Cache => false,
        };
        let known = lock(&self.challenge).clone();
        if let (Some((realm, service)), false) = (known, client) {
            if let Ok(tok) = self.token(&realm, &service, scope).await {
                auth = SentAuth::bearer(host_key(&self.base), (realm, service, scope.into()), tok);
            }
        }
        let mut redirects = 0;
        // Challenges answered on the current host: a guard on top of the rule above.
        let mut answered = 0;
        loop {
            let hk = host_key(&url);
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            let sent = auth.as_ref().filter(|a| a.host == hk);
            if let Some(a) = sent {
                req = req.header(AUTHORIZATION, a.value.clone());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                if let Some(((realm, service, scope), tok)) = sent.and_then(|a| a.token.as_ref()) {
                    // Revoked or expired early: never send it again.
                    lock(&self.tokens).invalidate(realm, service, scope, tok);
                }
                let challenges = challenges(&resp);
                // A fresh credential refused for the very challenge it answered: no better
                // one exists. (A challenge asking another realm or scope is answered.)
                let hopeless = sent
                    .is_some_and(|a| a.fresh && a.key() == bearer_key(&challenges, scope).as_ref());
                if answered < 2 && !hopeless && !client {
                    if let Some(a) = self.answer_challenge(&challenges, &url, scope).await? {
                        auth = Some(a);
                        answered += 1;
                        continue;
                    }
                }
                return Ok(resp);
            }
            if let Some(next) = redirect_target(&url, &resp, &mut redirects)? {
                if let Err(e) = self.check_redirect(&url, &next) {
                    tracing::warn!(client = %self.label, from = %without_query(&url), error = %e, "redirect refused");
                    return Err(e.into());
                }
                tracing::debug!(client = %self.label, from = %without_query(&url), to = %without_query(&next), "following redirect");
                url = next;
                answered = 0;
                continue;
            }
            return Ok(resp);
        }
    }

    #[cfg(test)]
    pub(super) fn learned_challenge(&self) -> Option<(String, String)> {
        lock(&self.challenge).clone()
    }
}
