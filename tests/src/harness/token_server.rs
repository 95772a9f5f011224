//! The token server: a real HTTPS service issuing ES256 JWTs that distribution verifies.
//!
//! Paths: `/token` (Docker Hub realm `https://auth.docker.io/token`), `/v2/auth` (quay
//! realm `https://quay.io/v2/auth`), `/v2/token` (gcr style). Anonymous → `pull` on any
//! repository; Basic `pusher:pusher-secret` → `pull,push`; other credentials → 401.
//! Every request is recorded in [`TokenServer::requests`].

use anyhow::Result;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// `iss` of every token; distribution's `auth.token.issuer`.
pub const ISSUER: &str = "mirror-tests-token-server";
pub const PUSH_USER: &str = "pusher";
pub const PUSH_PASSWORD: &str = "pusher-secret";

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
}

pub struct TokenServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<TokenRequest>>>,
    handle: axum_server::Handle,
}

impl TokenServer {
    pub fn start(pki: &crate::pki::Pki) -> Result<TokenServer> {
        crate::install_crypto_provider();
        let log = Arc::new(Mutex::new(Vec::new()));
        let inner = Arc::new(Inner {
            key: jsonwebtoken::EncodingKey::from_ec_pem(pki.token_key_pem.as_bytes())?,
            x5c: pki.token_cert_x5c.clone(),
            log: log.clone(),
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
        Ok(TokenServer { addr, log, handle })
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
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
        Some((u, p)) if u == PUSH_USER && p == PUSH_PASSWORD => (true, Some(Ok(u.to_string()))),
        _ => (true, Some(Err(()))),
    }
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
            let allowed: &[&str] = if user.is_some() {
                &["pull", "push"]
            } else {
                &["pull"]
            };
            let access = scopes
                .iter()
                .filter_map(|s| parse_scope(s))
                .filter(|(t, _, _)| t == "repository")
                .map(|(typ, name, actions)| Access {
                    typ,
                    name,
                    actions: actions
                        .into_iter()
                        .filter(|a| allowed.contains(&a.as_str()))
                        .collect(),
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
    fn scope() {
        let (t, n, a) = super::parse_scope("repository:library/alpine:pull,push").unwrap();
        assert_eq!((t.as_str(), n.as_str()), ("repository", "library/alpine"));
        assert_eq!(a, vec!["pull", "push"]);
    }
}
