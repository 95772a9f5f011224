//! In-process test tier: the cache built by `regmirror::build_app` on 127.0.0.1:0, in front of
//! a fake upstream (axum, also on 127.0.0.1:0) whose content and answers a test sets and whose
//! every request is counted. For the cases that need no real registry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use sha2::Digest as _;

use registry_rules::declaration::ClientAuth;
use regmirror::config::{Config, LogFormat, UpstreamConfig};
use regmirror::http::server::ClientTimeouts;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Token the fake upstream's realm issues and its API accepts (token mode only).
pub const TOKEN: &str = "fake-token";

pub fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// One request the fake upstream got.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
}

/// Password of every user of the per-user token mode.
pub const PASSWORD: &str = "pw";

/// `Authorization: Basic` of `user` with [`PASSWORD`].
pub fn basic(user: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = format!("{user}:{PASSWORD}").into_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let v = chunk
            .iter()
            .enumerate()
            .fold(0u32, |v, (i, c)| v | u32::from(*c) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(
                    ALPHABET
                        .get(((v >> (18 - 6 * i)) & 63) as usize)
                        .copied()
                        .unwrap_or(b'='),
                )
            } else {
                '='
            });
        }
    }
    format!("Basic {out}")
}

/// The token the per-user mode issues to `user` ("anonymous" without credentials).
pub fn token_of(user: &str) -> String {
    format!("tok-{user}")
}

#[derive(Default)]
struct Content {
    /// By digest: the bytes served for it (a test may make them wrong).
    blobs: HashMap<String, Bytes>,
    /// By tag or digest: the manifest body.
    manifests: HashMap<String, Bytes>,
    /// Bearer token flow: the API answers 401 with a challenge to `/token` unless the request
    /// carries `Bearer TOKEN`.
    token_auth: bool,
    /// Per-user token flow: `/token` issues `tok-<user>` for Basic `<user>:pw` (without
    /// credentials `tok-anonymous`); the API answers 401 with a challenge naming the
    /// repository without a token it issued, 403 when the token's user may not read the
    /// repository (repository -> users), else serves.
    readers: Option<HashMap<String, Vec<String>>>,
    /// Per-user mode: users whose tokens issued so far are no longer accepted (401 with the
    /// challenge, as for an expired token).
    expired: Vec<String>,
    /// Registry requests without credentials are sent to a sign-in page on another host
    /// (a login proxy in front of the registry).
    login_redirect: bool,
    /// Every answer a 503 (the upstream is down).
    down: bool,
    /// Delay before a blob answer (so concurrent requests overlap).
    blob_delay: Duration,
    seen: Vec<Seen>,
}

/// A registry in this process: `/v2/<repo>/{manifests,blobs}/<ref>` and `/token`.
#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    content: Arc<Mutex<Content>>,
}

fn lock(m: &Mutex<Content>) -> std::sync::MutexGuard<'_, Content> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn answer(status: u16, headers: &[(&str, String)], body: Bytes) -> Response {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    r.body(Body::from(body)).expect("valid response")
}

async fn serve(State(f): State<FakeUpstream>, req: Request) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let authorization = header(req.headers(), "authorization");
    let (token_auth, readers, expired, down, delay, login_redirect) = {
        let mut c = lock(&f.content);
        c.seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            query: req.uri().query().map(str::to_owned),
            authorization: authorization.clone(),
        });
        (
            c.token_auth,
            c.readers.clone(),
            c.expired.clone(),
            c.down,
            c.blob_delay,
            c.login_redirect,
        )
    };
    if down {
        return answer(503, &[], Bytes::from_static(b"down"));
    }
    if login_redirect && authorization.is_none() && path.starts_with("/v2/") && path != "/v2/" {
        let to = format!("https://sso.invalid/login?next={path}");
        return answer(302, &[("location", to)], Bytes::new());
    }
    if let Some(readers) = readers {
        let accepted = authorization.as_deref().filter(|a| {
            !expired
                .iter()
                .any(|u| *a == format!("Bearer {}", token_of(u)))
        });
        if let Some(refusal) = per_user(&f, &path, accepted, &readers) {
            return refusal;
        }
    }
    if path == "/token" {
        return answer(
            200,
            &[],
            Bytes::from(format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#)),
        );
    }
    if token_auth && authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        let challenge = format!(
            r#"Bearer realm="http://{}/token",service="fake",scope="repository:lab/app:pull""#,
            f.addr
        );
        return answer(401, &[("www-authenticate", challenge)], Bytes::new());
    }
    let body = if let Some((_, d)) = path.split_once("/blobs/") {
        tokio::time::sleep(delay).await;
        lock(&f.content).blobs.get(d).cloned()
    } else if let Some((_, r)) = path.split_once("/manifests/") {
        lock(&f.content).manifests.get(r).cloned()
    } else if path == "/v2/" || path.ends_with("/tags/list") {
        Some(Bytes::from_static(b"{}"))
    } else {
        None
    };
    let Some(body) = body else {
        let code = if path.contains("/blobs/") {
            "BLOB_UNKNOWN"
        } else {
            "MANIFEST_UNKNOWN"
        };
        let json = format!(r#"{{"errors":[{{"code":"{code}","message":"unknown"}}]}}"#);
        return answer(
            404,
            &[("content-type", "application/json".into())],
            Bytes::from(json),
        );
    };
    let mut headers = vec![("content-length", body.len().to_string())];
    if path.contains("/manifests/") {
        // The manifest's own media type, as a registry sends it.
        let media_type = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| OCI_MANIFEST.into());
        headers.push(("content-type", media_type));
        headers.push(("docker-content-digest", digest_of(&body)));
    }
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    answer(StatusCode::OK.as_u16(), &headers, body)
}

/// The per-user mode's answer when it does not serve the request: a token, a 401 or a 403.
fn per_user(
    f: &FakeUpstream,
    path: &str,
    authorization: Option<&str>,
    readers: &HashMap<String, Vec<String>>,
) -> Option<Response> {
    if path == "/token" {
        let user = match authorization {
            None => Some("anonymous".to_owned()),
            Some(a) => readers.values().flatten().find(|u| basic(u) == a).cloned(),
        };
        return Some(match user {
            Some(u) => answer(
                200,
                &[("content-type", "application/json".into())],
                Bytes::from(format!(
                    r#"{{"token":"{}","expires_in":300}}"#,
                    token_of(&u)
                )),
            ),
            None => answer(
                401,
                &[("www-authenticate", r#"Basic realm="fake""#.into())],
                Bytes::from_static(b"bad credentials"),
            ),
        });
    }
    let user = authorization
        .and_then(|a| a.strip_prefix("Bearer tok-"))
        .map(str::to_owned);
    let repo = path
        .strip_prefix("/v2/")
        .and_then(|p| {
            ["/manifests/", "/blobs/", "/tags/"]
                .iter()
                .find_map(|k| p.split_once(k))
        })
        .map(|(repo, _)| repo.to_owned());
    let scope = repo
        .as_ref()
        .map(|r| format!(r#",scope="repository:{r}:pull""#))
        .unwrap_or_default();
    let challenge = format!(
        r#"Bearer realm="http://{}/token",service="fake"{scope}"#,
        f.addr
    );
    match (user, repo) {
        (None, _) => Some(answer(
            401,
            &[("www-authenticate", challenge)],
            Bytes::from_static(br#"{"errors":[{"code":"UNAUTHORIZED","message":"log in"}]}"#),
        )),
        (Some(_), None) => None,
        (Some(u), Some(r)) if readers.get(&r).is_some_and(|us| us.contains(&u)) => None,
        (Some(_), Some(_)) => Some(answer(
            403,
            &[],
            Bytes::from_static(br#"{"errors":[{"code":"DENIED","message":"no"}]}"#),
        )),
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let f = Self {
            addr: listener.local_addr().expect("addr"),
            content: Arc::default(),
        };
        let app = axum::Router::new().fallback(serve).with_state(f.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        f
    }

    /// Serve `bytes` as the blob `digest` (whether or not they match it).
    pub fn blob(&self, digest: &str, bytes: impl Into<Bytes>) {
        lock(&self.content)
            .blobs
            .insert(digest.to_owned(), bytes.into());
    }

    /// Serve `body` as the manifest `reference` (a tag) and by its digest; returns the digest.
    pub fn manifest(&self, reference: &str, body: &str) -> String {
        let d = digest_of(body.as_bytes());
        let mut c = lock(&self.content);
        c.manifests
            .insert(reference.to_owned(), Bytes::from(body.to_owned()));
        c.manifests.insert(d.clone(), Bytes::from(body.to_owned()));
        d
    }

    /// Serve `body` as the manifest of `tag` only, not by its digest (yet): a registry whose
    /// replicas disagree for a moment.
    pub fn tag_only(&self, tag: &str, body: &str) {
        lock(&self.content)
            .manifests
            .insert(tag.to_owned(), Bytes::from(body.to_owned()));
    }

    pub fn require_token(&self) {
        lock(&self.content).token_auth = true;
    }

    /// Per-user mode (see `Content::readers`): `user` may read `repository`.
    pub fn allow(&self, repository: &str, user: &str) {
        lock(&self.content)
            .readers
            .get_or_insert_with(HashMap::new)
            .entry(repository.to_owned())
            .or_default()
            .push(user.to_owned());
    }

    /// `user` may no longer read `repository` (tokens already issued included).
    pub fn revoke(&self, repository: &str, user: &str) {
        if let Some(users) = lock(&self.content)
            .readers
            .as_mut()
            .and_then(|r| r.get_mut(repository))
        {
            users.retain(|u| u != user);
        }
    }

    /// `user`'s tokens issued so far are answered 401 with the challenge (they expired).
    pub fn expire(&self, user: &str) {
        lock(&self.content).expired.push(user.to_owned());
    }

    /// Registry requests without credentials answered 302 to a sign-in page elsewhere.
    pub fn redirect_anonymous_to_login(&self) {
        lock(&self.content).login_redirect = true;
    }

    /// Every answer a 503 (`true`) or back to normal.
    pub fn set_down(&self, down: bool) {
        lock(&self.content).down = down;
    }

    pub fn delay_blobs(&self, d: Duration) {
        lock(&self.content).blob_delay = d;
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.content).seen.clone()
    }

    /// Requests with this method whose path ends with `suffix`.
    pub fn hits(&self, method: Method, suffix: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path.ends_with(suffix))
            .count()
    }
}

/// The cache, built by `build_app` and served on 127.0.0.1:0 with `upstream` as "lab".
pub struct Mirror {
    pub base: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Mirror {
    pub async fn start(upstream: &FakeUpstream, tag_ttl: Duration) -> Self {
        Self::start_with(upstream, tag_ttl, |_| {}).await
    }

    /// Each client authorized at `upstream` with its own credentials, decisions kept for
    /// `authorization_ttl`.
    pub async fn authorizing(upstream: &FakeUpstream, authorization_ttl: Duration) -> Self {
        Self::start_with(upstream, Duration::from_secs(300), |lab| {
            lab.client_auth = ClientAuth::Upstream;
            lab.authorization_ttl = authorization_ttl;
        })
        .await
    }

    /// `edit` changes the "lab" upstream's configuration first.
    pub async fn start_with(
        upstream: &FakeUpstream,
        tag_ttl: Duration,
        edit: impl FnOnce(&mut UpstreamConfig),
    ) -> Self {
        Self::start_full(upstream, tag_ttl, edit, ClientTimeouts::default()).await
    }

    /// The listener closing on clients after `timeouts`.
    pub async fn with_client_timeouts(upstream: &FakeUpstream, timeouts: ClientTimeouts) -> Self {
        Self::start_full(upstream, Duration::from_secs(300), |_| {}, timeouts).await
    }

    async fn start_full(
        upstream: &FakeUpstream,
        tag_ttl: Duration,
        edit: impl FnOnce(&mut UpstreamConfig),
        timeouts: ClientTimeouts,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut lab = UpstreamConfig {
            name: "lab".into(),
            url: url::Url::parse(&format!("http://{}", upstream.addr)).expect("url"),
            ca_pems: vec![],
            credentials: None,
            realm_hosts: vec![],
            redirect_hosts: vec![],
            client_auth: ClientAuth::Anonymous,
            authorization_ttl: Duration::from_secs(60),
        };
        edit(&mut lab);
        let config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            storage: regmirror::store::Location::Dir(dir.path().to_path_buf()),
            max_size: 0,
            tag_ttl,
            shutdown_grace: Duration::from_secs(1),
            max_blob_size: 1 << 30,
            max_pass_through_memory: 1 << 20,
            log_format: LogFormat::Text,
            upstreams: [("lab".to_owned(), lab)].into(),
        };
        let app = regmirror::build_app(config, None).await.expect("build_app");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        // As `regmirror serve` listens: stored blob windows go out by sendfile.
        let listener =
            regmirror::http::zero_copy::ZeroCopyListener::new(listener, app.cache.metrics.clone());
        tokio::spawn(regmirror::http::server::serve_http1(
            listener,
            app.router,
            timeouts,
            std::future::pending(),
        ));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        Self {
            base,
            http,
            _dir: dir,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// What `/metrics` reports now.
    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}
