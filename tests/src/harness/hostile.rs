//! A fault fixture upstream that misbehaves on purpose (issue 9, "Keep it found"): what a
//! real registry cannot be made to do on demand.
//!
//! - [`Hostile`]: one raw HTTP/1.1 server on 127.0.0.1 (TLS, or plain HTTP on the same
//!   port: the first byte decides, so a `http://` Location to its own host:port is a
//!   real scheme downgrade). Per (host, path prefix) it is told what to answer: endless
//!   or huge bodies with or without `Content-Length`, a body longer than its
//!   `Content-Length`, slow bodies, hostile challenges and `Location`s, token endpoints
//!   answering junk, 405 on HEAD, a token gate whose tokens expire and can be revoked
//!   (what no distribution registry does on demand). It records every request
//!   (method, target, headers, TLS or not). Its certificate names `ghcr.io`,
//!   `pkg-containers.githubusercontent.com`, `registry.k8s.io`, `localhost` and
//!   `127.0.0.1`, signed by its own CA; [`HostilePki::bundle`] trusts it and the harness CA.
//! - A canary listener (plain HTTP) that nothing may ever reach: SSRF targets point at it.
//! - [`Relay`]: a TCP relay that can be switched off (an upstream outage).
//! - [`HostileMirror`]: Envoy from the shipped `envoy/local.yaml` with `ghcr.io`, its CDN
//!   and `registry.k8s.io` pointed at [`Hostile`], everything else at the harness fixtures.
//! - [`Cache`]: a `regmirror serve` with the upstreams `hostile` (this fixture, as
//!   `https://localhost:<port>`) and `gcr.io` (the harness' real gcr-like registry).
//!
//! It serves small images of its own only where a story needs a registry misbehaving
//! around them (revocation, expiry, 405 on HEAD); the normal pull that ends each story
//! goes to the harness' real registries.

use crate::envoy::{Envoy, Substitution};
use crate::proc::Proc;
use crate::upstreams::Upstreams;
use anyhow::{bail, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Registry served by [`Hostile`] behind Envoy (pass-through route).
pub const GHCR: &str = "ghcr.io";
/// ghcr.io's redirect host, also served by [`Hostile`].
pub const GHCR_CDN: &str = "pkg-containers.githubusercontent.com";
/// A second registry served by [`Hostile`] behind Envoy (the realm-poisoning story).
pub const K8S: &str = "registry.k8s.io";
/// Name of the hostile upstream in [`Cache`].
pub const CACHE_UPSTREAM: &str = "hostile";

/// No endless body goes on past this many bytes or [`ENDLESS_TIME`] (bounded fixture).
pub const ENDLESS_CAP: u64 = 1024 * 1024 * 1024;
pub const ENDLESS_TIME: Duration = Duration::from_secs(45);
/// Request heads longer than this are cut off (recorded as `oversized_head`).
const MAX_HEAD: usize = 1024 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// PKI

/// The fixture's own CA and leaf; `bundle` holds the harness CA and this CA.
pub struct HostilePki {
    pub ca: PathBuf,
    pub bundle: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

/// Names on the fixture's leaf certificate.
pub const HOSTILE_NAMES: &[&str] = &[GHCR, GHCR_CDN, K8S, "localhost", "127.0.0.1"];

impl HostilePki {
    fn generate(dir: &Path, harness_ca_pem: &str) -> Result<HostilePki> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
        };
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mirror-tests hostile CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut leaf_params = CertificateParams::new(
            HOSTILE_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "mirror-tests hostile leaf");
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key)?;
        let ca = dir.join("hostile-ca.crt");
        std::fs::write(&ca, ca_cert.pem())?;
        let bundle = dir.join("ca-bundle.crt");
        std::fs::write(&bundle, format!("{harness_ca_pem}{}", ca_cert.pem()))?;
        let certs = vec![
            CertificateDer::from(leaf.der().to_vec()),
            CertificateDer::from(ca_cert.der().to_vec()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HostilePki {
            ca,
            bundle,
            server: Arc::new(cfg),
        })
    }
}

// ---------------------------------------------------------------------------------------
// What to answer

/// A response body.
#[derive(Clone, Debug)]
pub enum Body {
    Bytes(Vec<u8>),
    /// `prefix`, then `a` forever (up to [`ENDLESS_CAP`] / [`ENDLESS_TIME`]). With
    /// `content_length` the header announces that many bytes (and at most that many are
    /// sent); without, the body is delimited by the connection's close.
    Endless {
        prefix: Vec<u8>,
        content_length: Option<u64>,
    },
    /// Announces `declared` bytes in `Content-Length` and sends all of `data`.
    Overlong {
        declared: u64,
        data: Vec<u8>,
    },
    /// `data` at about `bytes_per_sec`.
    Slow {
        data: Vec<u8>,
        bytes_per_sec: usize,
    },
}

/// What the fixture does for a matching request.
#[derive(Clone, Debug)]
pub enum Action {
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Body,
    },
    /// 401 with `challenge` unless the request carries `Bearer <t>` for a token `t` this
    /// fixture issued and has not revoked; then `then`.
    Gated {
        challenge: String,
        then: Box<Action>,
    },
    /// A token endpoint: issues `tok-<ns>-<n>` (valid for [`Action::Gated`]) with the raw
    /// JSON number `expires_in`; the gate refuses it once that many seconds passed.
    Token { ns: String, expires_in: String },
    /// HEAD gets 405; other methods `then`.
    NoHead(Box<Action>),
}

impl Action {
    pub fn reply(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Action {
        Action::Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Body::Bytes(body.into()),
        }
    }

    pub fn redirect(location: &str) -> Action {
        Action::reply(307, &[("location", location)], "")
    }

    pub fn body(status: u16, headers: &[(&str, &str)], body: Body) -> Action {
        Action::Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body,
        }
    }

    pub fn gated(challenge: &str, then: Action) -> Action {
        Action::Gated {
            challenge: challenge.to_string(),
            then: Box::new(then),
        }
    }
}

/// `Bearer realm="<realm>",service="<service>"`.
pub fn bearer(realm: &str, service: &str) -> String {
    format!("Bearer realm=\"{realm}\",service=\"{service}\"")
}

#[derive(Clone, Debug)]
struct Rule {
    /// Host without port, lower case; `None`: any.
    host: Option<String>,
    path_prefix: String,
    action: Action,
}

/// Which listener a request arrived at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Main,
    /// Nothing may ever reach it.
    Canary,
}

/// One request the fixture got.
#[derive(Clone, Debug)]
pub struct Seen {
    pub listener: Listener,
    pub tls: bool,
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// The head was longer than the fixture reads (1 MiB).
    pub oversized_head: bool,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::header_value(&self.headers, name)
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    /// Host without port, lower case.
    pub fn host(&self) -> String {
        host_only(self.header("host").unwrap_or(""))
    }
}

fn host_only(h: &str) -> String {
    let h = h.trim().to_ascii_lowercase();
    match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
        _ => h,
    }
}

#[derive(Default)]
struct Tokens {
    next: u64,
    /// Issued token → when it expires (`None`: an `expires_in` beyond an hour).
    valid: HashMap<String, Option<Instant>>,
    revoked: HashSet<String>,
}

struct State {
    tls: Arc<rustls::ServerConfig>,
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<Seen>>,
    tokens: Mutex<Tokens>,
}

// ---------------------------------------------------------------------------------------
// The server

pub struct Hostile {
    /// TLS or plain HTTP (the first byte decides).
    pub addr: SocketAddr,
    /// Plain HTTP; a request here is an SSRF.
    pub canary: SocketAddr,
    pub pki: HostilePki,
    state: Arc<State>,
    _tmp: tempfile::TempDir,
}

/// The process-wide hostile fixture.
pub fn shared() -> &'static Hostile {
    static H: OnceLock<Result<Hostile, String>> = OnceLock::new();
    match H.get_or_init(|| Hostile::start().map_err(|e| format!("{e:#}"))) {
        Ok(h) => h,
        Err(e) => panic!("hostile fixture failed to start: {e}"),
    }
}

impl Hostile {
    pub fn start() -> Result<Hostile> {
        crate::install_crypto_provider();
        let up = crate::upstreams::shared();
        let tmp = crate::fixture_dir("hostile")?;
        let pki = HostilePki::generate(tmp.path(), &up.pki.ca_pem)?;
        let state = Arc::new(State {
            tls: pki.server.clone(),
            rules: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            tokens: Mutex::new(Tokens::default()),
        });
        let main = TcpListener::bind("127.0.0.1:0")?;
        let canary = TcpListener::bind("127.0.0.1:0")?;
        let addr = main.local_addr()?;
        let canary_addr = canary.local_addr()?;
        for (l, which) in [(main, Listener::Main), (canary, Listener::Canary)] {
            let st = state.clone();
            std::thread::Builder::new()
                .name(format!("hostile-{which:?}"))
                .spawn(move || {
                    for conn in l.incoming().flatten() {
                        let st = st.clone();
                        let _ = std::thread::Builder::new()
                            .name("hostile-conn".into())
                            .spawn(move || {
                                let _ = serve_conn(conn, which, &st);
                            });
                    }
                })?;
        }
        Ok(Hostile {
            addr,
            canary: canary_addr,
            pki,
            state,
            _tmp: tmp,
        })
    }

    /// `https://localhost:<port>` (the cache's name for it; `127.0.0.1` stays off its
    /// allowlist).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// `http://127.0.0.1:<canary port><path>`.
    pub fn canary_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.canary)
    }

    /// Answers requests for `host` (any, when `None`) whose path starts with
    /// `path_prefix` with `action` (the longest matching prefix wins; replaces the rule
    /// for the same host and prefix).
    pub fn on(&self, host: Option<&str>, path_prefix: &str, action: Action) {
        let host = host.map(host_only);
        let mut rules = lock(&self.state.rules);
        rules.retain(|r| !(r.host == host && r.path_prefix == path_prefix));
        rules.push(Rule {
            host,
            path_prefix: path_prefix.to_string(),
            action,
        });
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// Requests whose path starts with `prefix` (any listener).
    pub fn seen_under(&self, prefix: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path().starts_with(prefix))
            .collect()
    }

    /// Revokes every token issued by the token endpoint of namespace `ns`.
    pub fn revoke(&self, ns: &str) {
        let mut t = lock(&self.state.tokens);
        let prefix = format!("tok-{ns}-");
        let gone: Vec<String> = t
            .valid
            .keys()
            .filter(|v| v.starts_with(&prefix))
            .cloned()
            .collect();
        for v in gone {
            t.valid.remove(&v);
            t.revoked.insert(v);
        }
    }

    /// Serves `image` as `repo` for `host` (manifest by tag and digest, blobs), each behind
    /// the token gate `challenge` when given; `no_head`: HEAD gets 405.
    pub fn serve_image(
        &self,
        host: Option<&str>,
        repo: &str,
        image: &TinyImage,
        challenge: Option<&str>,
        no_head: bool,
    ) {
        let wrap = |a: Action| {
            let a = match challenge {
                Some(c) => Action::gated(c, a),
                None => a,
            };
            if no_head {
                Action::NoHead(Box::new(a))
            } else {
                a
            }
        };
        let manifest = Action::reply(
            200,
            &[
                ("content-type", crate::images::MT_MANIFEST),
                ("docker-content-digest", &image.digest),
            ],
            image.manifest.clone(),
        );
        for r in [image.tag.as_str(), image.digest.as_str()] {
            self.on(
                host,
                &format!("/v2/{repo}/manifests/{r}"),
                wrap(manifest.clone()),
            );
        }
        for (d, bytes) in &image.blobs {
            let blob = Action::reply(
                200,
                &[
                    ("content-type", "application/octet-stream"),
                    ("docker-content-digest", d),
                ],
                bytes.clone(),
            );
            self.on(host, &format!("/v2/{repo}/blobs/{d}"), wrap(blob));
        }
    }
}

/// One request per connection: read the head, record it, answer, close.
fn serve_conn(stream: TcpStream, which: Listener, st: &State) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first)?;
    if n == 1 && first[0] == 0x16 {
        let conn = rustls::ServerConnection::new(st.tls.clone()).map_err(io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, stream);
        let r = handle(&mut tls, true, which, st);
        tls.conn.send_close_notify();
        let _ = tls.flush();
        r
    } else {
        let mut plain = stream;
        handle(&mut plain, false, which, st)
    }
}

fn read_head<S: Read>(s: &mut S) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(i);
            return Ok((buf, false));
        }
        if buf.len() > MAX_HEAD {
            return Ok((buf, true));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn handle<S: Read + Write>(s: &mut S, tls: bool, which: Listener, st: &State) -> io::Result<()> {
    let (head, oversized_head) = read_head(s)?;
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let seen = Seen {
        listener: which,
        tls,
        method: method.clone(),
        target,
        headers,
        oversized_head,
    };
    lock(&st.seen).push(seen.clone());
    if oversized_head {
        return write_reply(s, &method, 431, &[], &Body::Bytes(Vec::new()));
    }
    if which == Listener::Canary {
        return write_reply(s, &method, 200, &[], &Body::Bytes(b"canary".to_vec()));
    }
    let action = {
        let rules = lock(&st.rules);
        let host = seen.host();
        rules
            .iter()
            .filter(|r| r.host.as_ref().is_none_or(|h| *h == host))
            .filter(|r| seen.path().starts_with(&r.path_prefix))
            .max_by_key(|r| (r.path_prefix.len(), r.host.is_some()))
            .map(|r| r.action.clone())
    };
    match action {
        Some(a) => act(s, &seen, &a, st),
        None => write_reply(
            s,
            &method,
            404,
            &[("content-type".into(), "application/json".into())],
            &Body::Bytes(br#"{"errors":[{"code":"NAME_UNKNOWN","message":"no rule"}]}"#.to_vec()),
        ),
    }
}

fn act<S: Write>(s: &mut S, seen: &Seen, a: &Action, st: &State) -> io::Result<()> {
    match a {
        Action::Reply {
            status,
            headers,
            body,
        } => write_reply(s, &seen.method, *status, headers, body),
        Action::NoHead(inner) => {
            if seen.method == "HEAD" {
                write_reply(
                    s,
                    "HEAD",
                    405,
                    &[("allow".into(), "GET".into())],
                    &Body::Bytes(Vec::new()),
                )
            } else {
                act(s, seen, inner, st)
            }
        }
        Action::Gated { challenge, then } => {
            let token = seen
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string);
            let ok = token.is_some_and(|t| {
                lock(&st.tokens)
                    .valid
                    .get(&t)
                    .is_some_and(|until| until.is_none_or(|u| Instant::now() < u))
            });
            if ok {
                act(s, seen, then, st)
            } else {
                write_reply(
                    s,
                    &seen.method,
                    401,
                    &[
                        ("www-authenticate".into(), challenge.clone()),
                        ("content-type".into(), "application/json".into()),
                    ],
                    &Body::Bytes(
                        br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#
                            .to_vec(),
                    ),
                )
            }
        }
        Action::Token { ns, expires_in } => {
            let token = {
                let mut t = lock(&st.tokens);
                t.next += 1;
                let tok = format!("tok-{ns}-{}", t.next);
                let until = expires_in
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s <= 3600)
                    .map(|s| Instant::now() + Duration::from_secs(s));
                t.valid.insert(tok.clone(), until);
                tok
            };
            let body = format!(r#"{{"token":"{token}","expires_in":{expires_in}}}"#);
            write_reply(
                s,
                &seen.method,
                200,
                &[("content-type".into(), "application/json".into())],
                &Body::Bytes(body.into_bytes()),
            )
        }
    }
}

fn write_reply<S: Write>(
    s: &mut S,
    method: &str,
    status: u16,
    headers: &[(String, String)],
    body: &Body,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} Hostile\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Body::Bytes(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Body::Endless {
            content_length: Some(n),
            ..
        } => head.push_str(&format!("Content-Length: {n}\r\n")),
        Body::Endless { .. } => {}
        Body::Overlong { declared, .. } => {
            head.push_str(&format!("Content-Length: {declared}\r\n"))
        }
        Body::Slow { data, .. } => head.push_str(&format!("Content-Length: {}\r\n", data.len())),
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return s.flush();
    }
    match body {
        Body::Bytes(b) | Body::Overlong { data: b, .. } => s.write_all(b)?,
        Body::Slow {
            data,
            bytes_per_sec,
        } => {
            for piece in data.chunks((bytes_per_sec / 10).max(1)) {
                s.write_all(piece)?;
                s.flush()?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Body::Endless {
            prefix,
            content_length,
        } => {
            let cap = content_length.unwrap_or(u64::MAX).min(ENDLESS_CAP);
            let start = Instant::now();
            let p = prefix.len().min(cap as usize);
            s.write_all(&prefix[..p])?;
            let mut sent = p as u64;
            let chunk = vec![b'a'; 64 * 1024];
            while sent < cap && start.elapsed() < ENDLESS_TIME {
                let n = chunk.len().min((cap - sent) as usize);
                s.write_all(&chunk[..n])?;
                sent += n as u64;
            }
        }
    }
    s.flush()
}

// ---------------------------------------------------------------------------------------
// A tiny image the fixture serves

/// A one-layer OCI image held in memory.
#[derive(Clone, Debug)]
pub struct TinyImage {
    pub tag: String,
    pub manifest: Vec<u8>,
    pub digest: String,
    /// (digest, bytes): config then layer.
    pub blobs: Vec<(String, Vec<u8>)>,
}

impl TinyImage {
    /// A layer of `layer_size` pseudo-random bytes from `seed`.
    pub fn new(tag: &str, seed: u64, layer_size: usize) -> TinyImage {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layer = vec![0u8; layer_size];
        rng.fill_bytes(&mut layer);
        let layer_digest = crate::digest_of(&layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))
        .unwrap_or_default();
        let config_digest = crate::digest_of(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::images::MT_MANIFEST,
            "config": {
                "mediaType": crate::images::MT_CONFIG,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))
        .unwrap_or_default();
        TinyImage {
            tag: tag.to_string(),
            digest: crate::digest_of(&manifest),
            manifest,
            blobs: vec![(config_digest, config), (layer_digest, layer)],
        }
    }

    pub fn layer(&self) -> &(String, Vec<u8>) {
        &self.blobs[1]
    }
}

// ---------------------------------------------------------------------------------------
// Relay (an upstream outage on demand)

/// A TCP relay to a target on 127.0.0.1 (an upstream that can go down, or a front whose
/// port is known before the Envoy behind it starts). Going down cuts the connections it
/// relays (no pooled connection outlives an outage); while down it closes every new
/// connection at once.
pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    target: Arc<Mutex<SocketAddr>>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Result<Relay> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let target = Arc::new(Mutex::new(target));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (flag, to, conns) = (up.clone(), target.clone(), live.clone());
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                for conn in l.incoming().flatten() {
                    if !flag.load(Ordering::SeqCst) {
                        drop(conn);
                        continue;
                    }
                    let _ = relay_conn(conn, *lock(&to), &conns);
                }
            })?;
        Ok(Relay {
            addr,
            up,
            target,
            live,
        })
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for c in lock(&self.live).drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    pub fn set_target(&self, target: SocketAddr) {
        *lock(&self.target) = target;
    }
}

fn relay_conn(
    client: TcpStream,
    target: SocketAddr,
    live: &Mutex<Vec<TcpStream>>,
) -> io::Result<()> {
    let server = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    {
        // Kept until the next outage; a story makes a handful of connections.
        let mut live = lock(live);
        live.push(client.try_clone()?);
        live.push(server.try_clone()?);
    }
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        })
    };
    pipe(client.try_clone()?, server.try_clone()?);
    pipe(server, client);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Envoy in front of it

/// Envoy from the shipped `envoy/local.yaml` (TLS listener with the harness leaf,
/// `host_suffix = mirror.test`), trusting the harness CA and the hostile CA.
pub struct HostileMirror {
    pub envoy: Envoy,
    pub up: &'static Upstreams,
    pub hostile: &'static Hostile,
    _tmp: tempfile::TempDir,
}

impl HostileMirror {
    /// Clusters: the harness fixtures, [`GHCR`], [`GHCR_CDN`] and [`K8S`] → [`Hostile`],
    /// then `overrides`.
    pub fn start(overrides: BTreeMap<String, SocketAddr>) -> Result<HostileMirror> {
        Self::start_with(overrides, serde_json::Map::new())
    }

    /// [`HostileMirror::start`] with `filter_fields` set in the filter's JSON
    /// configuration (e.g. `public_url`).
    pub fn start_with(
        overrides: BTreeMap<String, SocketAddr>,
        filter_fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<HostileMirror> {
        let up = crate::upstreams::shared();
        let hostile = shared();
        crate::ensure_etc_hosts()?;
        let tmp = crate::fixture_dir("hostile-envoy")?;
        let mut s = Substitution::for_upstreams(up, true)?;
        for h in [GHCR, GHCR_CDN, K8S] {
            s.clusters.insert(h.to_string(), hostile.addr);
        }
        s.clusters.extend(overrides);
        s.ca = Some(hostile.pki.bundle.clone());
        let shipped = crate::build::workspace_root().join("envoy/local.yaml");
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&shipped)?)?;
        set_filter_fields(&mut doc, &filter_fields)?;
        let source = tmp.path().join("local.yaml");
        std::fs::write(&source, serde_yaml::to_string(&doc)?)?;
        let envoy = Envoy::start(&source, &s, tmp.path())?;
        Ok(HostileMirror {
            envoy,
            up,
            hostile,
            _tmp: tmp,
        })
    }

    pub fn port(&self) -> u16 {
        self.envoy.port()
    }

    /// `https://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port())
    }

    /// `https://<prefix>.mirror.test:PORT<path>` (host mode).
    pub fn host_url(&self, prefix: &str, path: &str) -> String {
        format!(
            "https://{prefix}.{}:{}{path}",
            crate::mirror::HOST_SUFFIX,
            self.port()
        )
    }

    /// A client trusting the harness CA, `*.mirror.test` resolved to this Envoy, no
    /// redirects followed.
    pub fn client(&self) -> reqwest::blocking::Client {
        self.up.pki.mirror_client(self.port())
    }

    /// Envoy's log tail and what the hostile fixture saw, for failure messages.
    pub fn logs(&self) -> String {
        let seen: Vec<String> = self
            .hostile
            .seen()
            .iter()
            .rev()
            .take(30)
            .map(|s| {
                format!(
                    "{:?} tls={} {} {} {:?}",
                    s.listener, s.tls, s.method, s.target, s.headers
                )
            })
            .collect();
        format!(
            "--- envoy ---\n{}\n--- hostile fixture (newest first) ---\n{}",
            self.envoy.log_tail(60),
            seen.join("\n")
        )
    }
}

/// Sets `fields` in every filter JSON configuration (`google.protobuf.StringValue`) of an
/// Envoy bootstrap.
fn set_filter_fields(
    v: &mut serde_yaml::Value,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    match v {
        serde_yaml::Value::Mapping(m) => {
            let is_string_value = m
                .get("@type")
                .and_then(serde_yaml::Value::as_str)
                .is_some_and(|t| t.ends_with("google.protobuf.StringValue"));
            if let (true, Some(serde_yaml::Value::String(json))) =
                (is_string_value, m.get_mut("value"))
            {
                let mut cfg: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(json)?;
                cfg.extend(fields.clone());
                *json = serde_json::to_string(&cfg)?;
            }
            for (_, child) in m.iter_mut() {
                set_filter_fields(child, fields)?;
            }
        }
        serde_yaml::Value::Sequence(s) => {
            for child in s {
                set_filter_fields(child, fields)?;
            }
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// regmirror with the hostile upstream

/// `regmirror serve` with upstreams `hostile` = [`Hostile::url`] and `gcr.io` = the
/// harness' real gcr-like registry, trusting both CAs.
pub struct Cache {
    pub addr: SocketAddr,
    pub storage: PathBuf,
    pub log: PathBuf,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl Cache {
    /// Starts one for a test named `name`, with `extra` arguments.
    pub fn start(name: &str, extra: &[&str]) -> Result<Cache> {
        let up = crate::upstreams::shared();
        let hostile = shared();
        let bin = crate::build::regmirror()?;
        let dir = crate::temp_dir(name)?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let log = dir.path().join("regmirror.log");
        let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--storage")
            .arg(&storage)
            .arg("--upstream")
            .arg(format!("{CACHE_UPSTREAM}={}", hostile.url()))
            .arg("--upstream")
            .arg(format!(
                "{}=https://{}",
                crate::upstreams::GCR_SERVICE,
                up.nginx.gcr_front
            ))
            .arg("--upstream-ca")
            .arg(&hostile.pki.bundle)
            .args(extra)
            .env("RUST_LOG", "info,regmirror=debug,cache_service=debug")
            .env("NO_COLOR", "1");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGMIRROR_") {
                cmd.env_remove(k);
            }
        }
        let mut proc = Proc::spawn("regmirror", &cmd, &log)?;
        proc.wait_for_port(addr, Duration::from_secs(30))?;
        Ok(Cache {
            addr,
            storage,
            log,
            proc,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `/v2/<repo>/<kind>/<reference>?ns=hostile`.
    pub fn hostile_url(&self, repo: &str, kind: &str, reference: &str) -> String {
        self.url(&format!(
            "/v2/{repo}/{kind}/{reference}?ns={CACHE_UPSTREAM}"
        ))
    }

    /// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`: the peak RSS).
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// Bytes under `tmp/` of the storage.
    pub fn tmp_bytes(&self) -> u64 {
        std::fs::read_dir(self.storage.join("tmp"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Err with the log when the process is gone.
    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::proc::log_tail(&self.log, lines)
    }

    /// A normal pull through this cache from the real gcr-like registry: the manifest of
    /// `distroless/static:nonroot` by tag and every blob, each verified against its digest.
    pub fn normal_pull(&self) -> Result<()> {
        let img = &crate::upstreams::shared().images.distroless;
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let ns = crate::upstreams::GCR_SERVICE;
        let get = |path: String| -> Result<Vec<u8>> {
            let r = client
                .get(self.url(&format!("{path}?ns={ns}")))
                .header(
                    "accept",
                    format!("{},{}", crate::images::MT_MANIFEST, crate::images::MT_INDEX),
                )
                .send()?;
            let status = r.status();
            let body = r.bytes()?.to_vec();
            if !status.is_success() {
                bail!("GET {path}: {status}: {}", String::from_utf8_lossy(&body));
            }
            Ok(body)
        };
        let m = get(format!("/v2/{}/manifests/{}", img.name, img.tag))?;
        let got = crate::digest_of(&m);
        if got != img.digest {
            bail!("manifest digest {got}, want {}", img.digest);
        }
        for d in img.all_blobs() {
            let b = get(format!("/v2/{}/blobs/{d}", img.name))?;
            let got = crate::digest_of(&b);
            if got != d {
                bail!("blob {d} came back as {got}");
            }
        }
        Ok(())
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `resp`'s body, at most `limit` bytes (a read error ends it early).
pub fn read_bounded(resp: reqwest::blocking::Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = resp.take(limit as u64).read_to_end(&mut out);
    out
}
