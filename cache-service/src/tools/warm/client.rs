//! The mirror as its clients see it, for `regmirror warm` and `regmirror doctor`: the one
//! registry client (`upstream::client`) pointed at the mirror, anonymous, with Bearer
//! challenges answered through the (rewritten) realm, redirects followed by hand and an
//! `Authorization` only ever sent to the host whose challenge issued it.

use std::time::Duration;

use reqwest::Method;
use url::Url;

use crate::upstream::client::{host_key, Reach, RegistryClient};
use crate::upstream::{read_body, RedirectError, UpstreamError};
use registry_rules::oci_error::MAX_ERROR_BODY;

pub use crate::upstream::client::{bearer_challenge, error_chain};

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

impl ClientError {
    fn of(url: &Url, e: UpstreamError) -> Self {
        match e {
            UpstreamError::Connect(reason) => ClientError::Http {
                url: url.to_string(),
                reason,
            },
            UpstreamError::Redirect(r) => ClientError::Redirect(r),
            UpstreamError::Token { realm, reason } => ClientError::Token { realm, reason },
            UpstreamError::Client(reason) => ClientError::Setup(reason),
        }
    }
}

#[derive(Debug)]
pub struct MirrorClient {
    client: RegistryClient,
}

impl MirrorClient {
    /// From the `--mirror URL [--ca FILE]` flags warm and doctor share. `strict_realms`:
    /// refuse challenges whose realm is not on the mirror (`doctor`: such a realm means the
    /// mirror did not rewrite it).
    pub fn from_flags(
        mirror: &str,
        ca_file: Option<&std::path::Path>,
        strict_realms: bool,
    ) -> Result<Self, ClientError> {
        let ca_pem = ca_file
            .map(|path| {
                std::fs::read(path)
                    .map_err(|e| ClientError::Setup(format!("--ca {}: {e}", path.display())))
            })
            .transpose()?;
        Self::new(mirror, ca_pem.as_deref(), strict_realms)
    }

    /// `mirror`: base URL (`https://mirror.example.com`); `ca_pem`: extra trusted CAs.
    pub fn new(
        mirror: &str,
        ca_pem: Option<&[u8]>,
        strict_realms: bool,
    ) -> Result<Self, ClientError> {
        let base = Url::parse(mirror)
            .map_err(|e| ClientError::Setup(format!("--mirror {mirror:?}: {e}")))?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(ClientError::Setup(format!(
                "--mirror {mirror:?}: not an http(s) URL"
            )));
        }
        let certs = match ca_pem {
            Some(pem) => {
                let certs = reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| ClientError::Setup(format!("--ca: {e}")))?;
                if certs.is_empty() {
                    return Err(ClientError::Setup("--ca: no PEM certificate found".into()));
                }
                certs
            }
            None => Vec::new(),
        };
        let reach = Reach::Anonymous {
            realms_on_base: strict_realms,
        };
        let client = RegistryClient::new("mirror", base, reach, certs, Duration::from_secs(120))
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Self { client })
    }

    pub fn base(&self) -> &Url {
        self.client.base()
    }

    /// `<mirror>/v2/<repo>/<kind>/<reference>?ns=<registry>` (or `/v2/?ns=` for an empty repo).
    pub fn v2_url(&self, registry: &str, repo: &str, rest: &str) -> Result<Url, ClientError> {
        let path = if repo.is_empty() {
            "v2/".to_owned()
        } else {
            format!("v2/{repo}/{rest}")
        };
        let mut u = self.base().join(&path).map_err(|e| ClientError::Http {
            url: path.clone(),
            reason: e.to_string(),
        })?;
        u.query_pairs_mut().append_pair("ns", registry);
        Ok(u)
    }

    /// Does `u` point at the mirror itself?
    pub fn on_mirror(&self, u: &Url) -> bool {
        host_key(u) == host_key(self.base())
    }

    /// Anonymous token from a realm (`realm?service=…&scope=…`), cached until it expires.
    pub async fn token(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<String, ClientError> {
        match self.client.token(realm, service, scope).await {
            Ok((t, _)) => Ok(t),
            Err(e) => Err(ClientError::of(self.base(), e)),
        }
    }

    /// A GET with nothing done about challenges or redirects: the raw answer, to be checked.
    pub async fn get_raw(&self, url: Url) -> Result<reqwest::Response, String> {
        self.client
            .send_as_is(Method::GET, url, None, None)
            .await
            .map_err(|e| e.to_string())
    }

    /// One request with challenges answered and redirects followed (see `RegistryClient`).
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        accept: Option<&str>,
        default_scope: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let first = url.clone();
        self.client
            .send(&method, url, accept, default_scope)
            .await
            .map_err(|e| ClientError::of(&first, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn urls_and_hosts() {
        let c = MirrorClient::new("http://127.0.0.1:5000", None, false).unwrap();
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
        assert!(MirrorClient::new("ftp://x", None, false).is_err());
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
        let c = MirrorClient::new(&server.url(""), None, false).unwrap();
        let get = || async {
            let url = c.v2_url("lab", "lab/app", "manifests/1").unwrap();
            c.send(Method::GET, url, None, "repository:lab/app:pull")
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

    /// `doctor`: a realm the mirror did not rewrite is refused, and never contacted.
    #[tokio::test]
    async fn strict_realms_refuse_a_realm_away_from_the_mirror() {
        use crate::testserver::{reply, TestServer};
        let away = TestServer::start(|_| reply(200, &[], r#"{"token":"t"}"#)).await;
        let realm = away.url("/token");
        let mirror = TestServer::start(move |_| {
            let c = format!(r#"Bearer realm="{realm}",service="lab""#);
            reply(401, &[("www-authenticate", c.as_str())], "")
        })
        .await;
        let url = |c: &MirrorClient| c.v2_url("lab", "lab/app", "manifests/1").unwrap();
        let strict = MirrorClient::new(&mirror.url(""), None, true).unwrap();
        let r = strict
            .send(Method::HEAD, url(&strict), None, "repository:lab/app:pull")
            .await;
        assert!(matches!(r, Err(ClientError::Token { .. })), "{r:?}");
        assert!(away.seen().is_empty(), "{:?}", away.seen());
        // warm follows the realm the mirror hands out, wherever it is.
        let warm = MirrorClient::new(&mirror.url(""), None, false).unwrap();
        let r = warm
            .send(Method::HEAD, url(&warm), None, "repository:lab/app:pull")
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "the token did not open the fake mirror");
        assert_eq!(away.seen().len(), 1);
    }
}
