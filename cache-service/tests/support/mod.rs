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

use regmirror::config::{Config, LogFormat, UpstreamConfig};

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
    pub authorization: Option<String>,
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
    let (token_auth, delay) = {
        let mut c = lock(&f.content);
        c.seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            authorization: authorization.clone(),
        });
        (c.token_auth, c.blob_delay)
    };
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
    } else if path == "/v2/" {
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
        headers.push(("content-type", OCI_MANIFEST.into()));
        headers.push(("docker-content-digest", digest_of(&body)));
    }
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    answer(StatusCode::OK.as_u16(), &headers, body)
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

    pub fn require_token(&self) {
        lock(&self.content).token_auth = true;
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
        let dir = tempfile::tempdir().expect("tempdir");
        let lab = UpstreamConfig {
            name: "lab".into(),
            url: url::Url::parse(&format!("http://{}", upstream.addr)).expect("url"),
            ca_pems: vec![],
            credentials: None,
            realm_hosts: vec![],
            redirect_hosts: vec![],
            client_token: None,
        };
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
        tokio::spawn(async move { axum::serve(listener, app.router).await });
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
        self.http.get(format!("{}{path}", self.base))
    }
}
