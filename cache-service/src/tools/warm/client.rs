//! A small registry client for talking to the mirror the way a container runtime does:
//! Bearer challenges answered anonymously through the (rewritten) realm, redirects followed
//! by hand, and an `Authorization` only ever sent to the host whose challenge issued it.
//! Used by `regmirror warm` and `regmirror doctor`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use url::Url;

use crate::upstream::auth::{parse_challenges, Challenge, TokenCache, MAX_TOKEN_RESPONSE_BYTES};
use crate::upstream::{read_body, redirect_target, RedirectError};

/// An error answer's body is read up to this size (for its message only).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The text of an error answer, bounded; empty when it cannot be read.
pub async fn error_body(resp: reqwest::Response) -> String {
    read_body(resp, MAX_ERROR_BODY)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("token from {realm}: {reason}")]
    Token { realm: String, reason: String },
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

/// The Bearer challenge of a response, if any: (realm, service, scope).
pub fn bearer_challenge(resp: &reqwest::Response) -> Option<(String, String, Option<String>)> {
    let challenges: Vec<Challenge> = resp
        .headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_challenges)
        .collect();
    let b = challenges.iter().find(|c| c.scheme == "bearer")?;
    Some((
        b.param("realm")?.to_owned(),
        b.param("service").unwrap_or("").to_owned(),
        b.param("scope").map(str::to_owned),
    ))
}

#[derive(Debug)]
pub struct MirrorClient {
    pub base: Url,
    http: reqwest::Client,
    /// Refuse challenges whose realm is not on the mirror (`doctor`: such a realm means the
    /// mirror did not rewrite it).
    pub strict_realms: bool,
    /// Tokens by (realm, service, scope), expiring as the token service said (the same
    /// cache type and rules as the cache's upstream client).
    tokens: Mutex<TokenCache>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MirrorClient {
    /// From the `--mirror URL [--ca FILE]` flags warm and doctor share.
    pub fn from_flags(
        mirror: &str,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let ca_pem = ca_file
            .map(|path| {
                std::fs::read(path)
                    .map_err(|e| ClientError::Setup(format!("--ca {}: {e}", path.display())))
            })
            .transpose()?;
        Self::new(mirror, ca_pem.as_deref())
    }

    /// `mirror`: base URL (`https://mirror.example.com`); `ca_pem`: extra trusted CAs.
    pub fn new(mirror: &str, ca_pem: Option<&[u8]>) -> Result<Self, ClientError> {
        let base = Url::parse(mirror)
            .map_err(|e| ClientError::Setup(format!("--mirror {mirror:?}: {e}")))?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(ClientError::Setup(format!(
                "--mirror {mirror:?}: not an http(s) URL"
            )));
        }
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .use_rustls_tls();
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientError::Setup(format!("--ca: {e}")))?;
            if certs.is_empty() {
                return Err(ClientError::Setup("--ca: no PEM certificate found".into()));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let http = b.build().map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Self {
            base,
            http,
            strict_realms: false,
            tokens: Mutex::new(TokenCache::default()),
        })
    }

    /// `<mirror>/v2/<repo>/<kind>/<reference>?ns=<registry>` (or `/v2/?ns=` for an empty repo).
    pub fn v2_url(&self, registry: &str, repo: &str, rest: &str) -> Result<Url, ClientError> {
        let path = if repo.is_empty() {
            "v2/".to_owned()
        } else {
            format!("v2/{repo}/{rest}")
        };
        let mut u = self.base.join(&path).map_err(|e| ClientError::Http {
            url: path.clone(),
            reason: e.to_string(),
        })?;
        u.query_pairs_mut().append_pair("ns", registry);
        Ok(u)
    }

    /// Does `u` point at the mirror itself?
    pub fn on_mirror(&self, u: &Url) -> bool {
        host_key(u) == host_key(&self.base)
    }

    /// Anonymous token from a realm (`realm?service=…&scope=…`), cached until it expires.
    pub async fn token(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<String, ClientError> {
        if let Some(t) = lock(&self.tokens).get(realm, service, scope, Instant::now()) {
            return Ok(t);
        }
        let terr = |reason: String| ClientError::Token {
            realm: realm.to_owned(),
            reason,
        };
        let url = crate::upstream::auth::token_url(realm, service, scope).map_err(terr)?;
        let resp = self
            .http
            .get(url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| terr(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(terr(format!("HTTP {}", resp.status())));
        }
        let body = read_body(resp, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(|e| terr(e.to_string()))?;
        let (token, ttl) =
            crate::upstream::auth::parse_token_response(&body).map_err(|e| terr(e.to_string()))?;
        lock(&self.tokens).put(realm, service, scope, token.clone(), ttl, Instant::now());
        Ok(token)
    }

    /// A GET with nothing done about challenges or redirects: the raw answer, to be checked.
    pub async fn get_raw(&self, url: Url) -> Result<reqwest::Response, String> {
        self.http.get(url).send().await.map_err(|e| error_chain(&e))
    }

    /// One request with challenges answered and redirects followed. `auth` optionally seeds an
    /// `Authorization` for the first URL's host. A 401 is answered once per URL, and once more
    /// with a fresh token if the cached one was refused (expired or revoked); an
    /// `Authorization` goes only to the host it was issued for.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        accept: Option<&str>,
        default_scope: &str,
        auth: Option<String>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut url = url;
        let mut auth: Option<(String, HeaderValue)> = auth
            .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok())
            .map(|v| (host_key(&url), v));
        let mut redirects = 0;
        let mut answered = false;
        // The cached token last sent, to drop it if refused: (realm, service, scope, token).
        let mut cached: Option<(String, String, String, String)> = None;
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
            let resp = req.send().await.map_err(|e| ClientError::Http {
                url: url.to_string(),
                reason: error_chain(&e),
            })?;
            let status = resp.status();
            let refused = cached.take().filter(|_| status == StatusCode::UNAUTHORIZED);
            if let Some((realm, service, scope, tok)) = &refused {
                lock(&self.tokens).invalidate(realm, service, scope, tok);
            }
            if status == StatusCode::UNAUTHORIZED && (!answered || refused.is_some()) {
                if let Some((realm, service, scope)) = bearer_challenge(&resp) {
                    let scope = scope.unwrap_or_else(|| default_scope.to_owned());
                    if self.strict_realms && !Url::parse(&realm).is_ok_and(|r| self.on_mirror(&r)) {
                        return Err(ClientError::Token {
                            realm,
                            reason: "realm points away from the mirror (not rewritten)".into(),
                        });
                    }
                    let was_cached = lock(&self.tokens)
                        .get(&realm, &service, &scope, Instant::now())
                        .is_some();
                    let tok = self.token(&realm, &service, &scope).await?;
                    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {tok}")) {
                        auth = Some((hk, v));
                        answered = true;
                        if was_cached {
                            cached = Some((realm, service, scope, tok));
                        }
                        continue;
                    }
                }
                return Ok(resp);
            }
            if let Some(next) = redirect_target(&url, &resp, &mut redirects)? {
                url = next;
                answered = false;
                continue;
            }
            return Ok(resp);
        }
    }
}

/// An error with its sources (reqwest hides the interesting part in them).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_hosts() {
        let c = MirrorClient::new("http://127.0.0.1:5000", None).unwrap();
        assert_eq!(
            c.v2_url("docker.io", "library/alpine", "manifests/3.20")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:5000/v2/library/alpine/manifests/3.20?ns=docker.io"
        );
        assert_eq!(
            c.v2_url("quay.io", "", "").unwrap().as_str(),
            "http://127.0.0.1:5000/v2/?ns=quay.io"
        );
        assert!(c.on_mirror(&Url::parse("http://127.0.0.1:5000/_mirror/auth/x").unwrap()));
        assert!(!c.on_mirror(&Url::parse("https://127.0.0.1:5000/x").unwrap()));
        assert!(!c.on_mirror(&Url::parse("http://auth.docker.io/token").unwrap()));
        assert!(MirrorClient::new("ftp://x", None).is_err());
    }

    /// A registry behind the mirror whose tokens live `expires_in` = 1 s (Docker Hub: 300 s),
    /// and which can revoke every token issued so far.
    #[tokio::test]
    async fn tokens_expire_and_refused_tokens_are_refreshed() {
        use crate::testserver::{reply, TestServer};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        use std::time::Instant;

        #[derive(Default)]
        struct State {
            realm: Mutex<String>,
            /// Token number → when issued.
            issued: Mutex<Vec<Instant>>,
            revoked_below: AtomicU64,
        }
        let st: Arc<State> = Arc::default();
        let s2 = st.clone();
        let server = TestServer::start(move |seen| {
            let mut issued = s2.issued.lock().unwrap();
            if seen.uri.starts_with("/token") {
                issued.push(Instant::now());
                let body = format!(r#"{{"token":"tok-{}","expires_in":1}}"#, issued.len() - 1);
                return reply(200, &[], body);
            }
            let valid = seen
                .authorization()
                .and_then(|a| a.strip_prefix("Bearer tok-"))
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n >= s2.revoked_below.load(Ordering::SeqCst))
                .and_then(|n| issued.get(n as usize))
                .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
            if valid {
                return reply(200, &[], "ok");
            }
            let c = format!(
                r#"Bearer realm="{}",service="lab""#,
                s2.realm.lock().unwrap()
            );
            reply(401, &[("www-authenticate", c.as_str())], "")
        })
        .await;
        *st.realm.lock().unwrap() = server.url("/token");
        let c = MirrorClient::new(&server.url(""), None).unwrap();
        let get = || async {
            let url = c.v2_url("lab", "lab/app", "manifests/1").unwrap();
            c.send(Method::GET, url, None, "repository:lab/app:pull", None)
                .await
                .unwrap()
                .status()
        };
        assert_eq!(get().await, 200);
        assert_eq!(get().await, 200, "cached token reused");
        assert_eq!(st.issued.lock().unwrap().len(), 1);

        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(get().await, 200, "expired token not reused");
        assert_eq!(st.issued.lock().unwrap().len(), 2);

        st.revoked_below.store(2, Ordering::SeqCst);
        assert_eq!(
            get().await,
            200,
            "revoked token dropped, a fresh one fetched"
        );
        assert_eq!(st.issued.lock().unwrap().len(), 3);
    }
}
