//! The token server: a real HTTPS service issuing ES256 JWTs that distribution verifies.
//!
//! Paths: `/token` (Docker Hub realm `https://auth.docker.io/token`), `/v2/auth` (quay
//! realm `https://quay.io/v2/auth`), `/v2/token` (gcr style).
//!
//! Users (Basic): `pusher` (`pull,push`), `alice` and `bob` (`pull`); a wrong password → 401.
//! Repositories under `private/` are readable only by users granted them (alice:
//! `private/*` of the seeded images; [`TokenServer::grant`] / [`TokenServer::revoke`] change
//! that at run time): anyone else gets a token with empty `actions`, as distribution's token
//! servers do, and the registry answers `insufficient_scope`. Every other repository:
//! anonymous `pull`, as before. Every request is recorded in [`TokenServer::requests`].

use anyhow::Result;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// `iss` of every token; distribution's `auth.token.issuer`.
pub const ISSUER: &str = "mirror-tests-token-server";
pub const PUSH_USER: &str = "pusher";
pub const PUSH_PASSWORD: &str = "pusher-secret";
/// May read the `private/` repositories she is granted.
pub const ALICE: &str = "alice";
pub const ALICE_PASSWORD: &str = "alice-secret";
/// A valid login without any grant.
pub const BOB: &str = "bob";
pub const BOB_PASSWORD: &str = "bob-secret";
/// Repositories under this prefix are readable only by users granted them.
pub const PRIVATE_PREFIX: &str = "private/";
/// The private repositories alice is granted when the server starts.
pub const ALICE_GRANTS: &[&str] = &["private/secret", "private/revocable", "private/node-agent"];

const USERS: &[(&str, &str)] = &[
    (PUSH_USER, PUSH_PASSWORD),
    (ALICE, ALICE_PASSWORD),
    (BOB, BOB_PASSWORD),
];

/// user → the `private/` repositories it may pull.
type Grants = Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>;

/// One request the token server saw.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub host: String,
    pub path: String,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    /// An `Authorization` header was present.
    pub authorization: bool,
    /// The Basic user, when the credentials were valid.
    pub user: Option<String>,
    pub status: u16,
    /// Every request header, names lowercase.
    pub headers: Vec<(String, String)>,
}

#[derive(Serialize)]
struct Access {
    #[serde(rename = "type")]
    typ: String,
    name: String,
    actions: Vec<String>,
}

#[derive(Serialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

struct Inner {
    key: jsonwebtoken::EncodingKey,
    x5c: String,
    log: Arc<Mutex<Vec<TokenRequest>>>,
    grants: Grants,
}

pub struct TokenServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<TokenRequest>>>,
    grants: Grants,
    handle: axum_server::Handle,
}

impl TokenServer {
    pub fn start(pki: &crate::pki::Pki) -> Result<TokenServer> {
        crate::install_crypto_provider();
        let log = Arc::new(Mutex::new(Vec::new()));
        let grants: Grants = Arc::new(Mutex::new(BTreeMap::from([(
            ALICE.to_string(),
            ALICE_GRANTS.iter().map(|r| r.to_string()).collect(),
        )])));
        let inner = Arc::new(Inner {
            key: jsonwebtoken::EncodingKey::from_ec_pem(pki.token_key_pem.as_bytes())?,
            x5c: pki.token_cert_x5c.clone(),
            log: log.clone(),
            grants: grants.clone(),
        });
        let app = axum::Router::new()
            .fallback(handle_request)
            .with_state(inner);
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(
            pki.rustls_server_config()?,
        ));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let handle = axum_server::Handle::new();
        let h = handle.clone();
        let rt = crate::runtime();
        let _guard = rt.enter();
        let server = axum_server::from_tcp_rustls(listener, tls).handle(h);
        rt.spawn(async move {
            if let Err(e) = server.serve(app.into_make_service()).await {
                eprintln!("token server stopped: {e}");
            }
        });
        Ok(TokenServer {
            addr,
            log,
            grants,
            handle,
        })
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Lets `user` pull the private repository `repository` in tokens issued from now on.
    pub fn grant(&self, user: &str, repository: &str) {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        grants
            .entry(user.to_string())
            .or_default()
            .insert(repository.to_string());
    }

    /// Takes `repository` from `user`: tokens issued from now on carry no `pull` for it
    /// (tokens already issued stay valid at the registry until they expire, as anywhere).
    pub fn revoke(&self, user: &str, repository: &str) {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(repos) = grants.get_mut(user) {
            repos.remove(repository);
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn basic_user(headers: &HeaderMap) -> (bool, Option<Result<String, ()>>) {
    let Some(v) = headers.get("authorization") else {
        return (false, None);
    };
    let v = v.to_str().unwrap_or("");
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return (true, Some(Err(())));
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|d| String::from_utf8(d).ok());
    match decoded.as_deref().and_then(|s| s.split_once(':')) {
        Some((u, p)) if USERS.contains(&(u, p)) => (true, Some(Ok(u.to_string()))),
        _ => (true, Some(Err(()))),
    }
}

/// The actions of `wanted` that `user` (None: anonymous) gets on `repository`.
fn allowed_actions(
    grants: &BTreeMap<String, BTreeSet<String>>,
    user: Option<&str>,
    repository: &str,
    wanted: Vec<String>,
) -> Vec<String> {
    let allowed: &[&str] = if repository.starts_with(PRIVATE_PREFIX) {
        let granted = user
            .and_then(|u| grants.get(u))
            .is_some_and(|repos| repos.contains(repository));
        if granted {
            &["pull"]
        } else {
            &[]
        }
    } else if user == Some(PUSH_USER) {
        &["pull", "push"]
    } else {
        &["pull"]
    };
    wanted
        .into_iter()
        .filter(|a| allowed.contains(&a.as_str()))
        .collect()
}

/// `repository:<name>:<actions>` → (type, name, actions).
pub fn parse_scope(scope: &str) -> Option<(String, String, Vec<String>)> {
    let (typ, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        typ.to_string(),
        name.to_string(),
        actions.split(',').map(str::to_string).collect(),
    ))
}

async fn handle_request(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let mut service = None;
    let mut scopes = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*k {
            "service" => service = Some(v.into_owned()),
            "scope" => scopes.extend(v.split(' ').map(str::to_string)),
            _ => {}
        }
    }
    let (authorization, user) = basic_user(&headers);
    let mut rec = TokenRequest {
        host,
        path: uri.path().to_string(),
        service: service.clone(),
        scopes: scopes.clone(),
        authorization,
        user: user.clone().and_then(Result::ok),
        status: 200,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let resp = match (uri.path(), user) {
        ("/token" | "/v2/auth" | "/v2/token", Some(Err(()))) => (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"mirror-tests\"")],
            r#"{"details":"incorrect username or password"}"#,
        )
            .into_response(),
        ("/token" | "/v2/auth" | "/v2/token", user) => {
            let user = user.and_then(Result::ok);
            let grants = inner.grants.lock().map(|g| g.clone()).unwrap_or_default();
            let access = scopes
                .iter()
                .filter_map(|s| parse_scope(s))
                .filter(|(t, _, _)| t == "repository")
                .map(|(typ, name, actions)| Access {
                    actions: allowed_actions(&grants, user.as_deref(), &name, actions),
                    typ,
                    name,
                })
                .collect();
            let t = now();
            let claims = Claims {
                iss: ISSUER.to_string(),
                sub: user.unwrap_or_default(),
                aud: service.unwrap_or_default(),
                exp: t + 300,
                nbf: t.saturating_sub(30),
                iat: t,
                jti: hex::encode(rand::random::<[u8; 16]>()),
                access,
            };
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            header.x5c = Some(vec![inner.x5c.clone()]);
            match jsonwebtoken::encode(&header, &claims, &inner.key) {
                Ok(token) => {
                    let issued_at = humantime_rfc3339(t);
                    axum::Json(serde_json::json!({
                        "token": token,
                        "access_token": token,
                        "expires_in": 300,
                        "issued_at": issued_at,
                    }))
                    .into_response()
                }
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    rec.status = resp.status().as_u16();
    if let Ok(mut l) = inner.log.lock() {
        l.push(rec);
    }
    resp
}

/// Unix seconds → `YYYY-MM-DDTHH:MM:SSZ`.
fn humantime_rfc3339(t: u64) -> String {
    let days = t / 86400;
    let secs = t % 86400;
    // Civil-from-days (Howard Hinnant).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::humantime_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            super::humantime_rfc3339(1_700_000_000),
            "2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn private_repositories_need_a_grant() {
        let grants = std::collections::BTreeMap::from([(
            "alice".to_string(),
            std::collections::BTreeSet::from(["private/secret".to_string()]),
        )]);
        let pull = || vec!["pull".to_string(), "push".to_string()];
        let got = |user, repo| super::allowed_actions(&grants, user, repo, pull());
        assert_eq!(got(Some("alice"), "private/secret"), vec!["pull"]);
        assert!(got(Some("alice"), "private/other").is_empty());
        assert!(got(Some("bob"), "private/secret").is_empty());
        assert!(got(None, "private/secret").is_empty());
        assert_eq!(got(None, "library/alpine"), vec!["pull"]);
        assert_eq!(got(Some("bob"), "library/alpine"), vec!["pull"]);
        assert_eq!(got(Some("pusher"), "library/alpine"), vec!["pull", "push"]);
    }

    #[test]
    fn scope() {
        let (t, n, a) = super::parse_scope("repository:library/alpine:pull,push").unwrap();
        assert_eq!((t.as_str(), n.as_str()), ("repository", "library/alpine"));
        assert_eq!(a, vec!["pull", "push"]);
    }
}
