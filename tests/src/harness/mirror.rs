//! The mirror under test: Envoy running the shipped `envoy/local.yaml` (switched to TLS
//! with the test leaf certificate) with the fresh wasm filter, in front of the shared
//! upstream fixtures. One per test binary.

use crate::envoy::{Envoy, Substitution};
use crate::upstreams::Upstreams;
use anyhow::Result;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `host_suffix` the tests put into the filter configuration.
pub const HOST_SUFFIX: &str = "mirror.test";

pub struct Mirror {
    pub up: &'static Upstreams,
    pub envoy: Envoy,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The process-wide mirror (shared upstreams + one Envoy from `envoy/local.yaml`).
pub fn shared() -> &'static Mirror {
    static M: OnceLock<Result<Mirror, String>> = OnceLock::new();
    match M.get_or_init(|| {
        let source = crate::build::workspace_root().join("envoy/local.yaml");
        Mirror::start(crate::upstreams::shared(), &source).map_err(|e| format!("{e:#}"))
    }) {
        Ok(m) => m,
        Err(e) => panic!("the mirror failed to start: {e}"),
    }
}

impl Mirror {
    /// Starts Envoy from `source` (a shipped config) against `up`, over TLS.
    pub fn start(up: &'static Upstreams, source: &std::path::Path) -> Result<Mirror> {
        Self::start_with(up, source, true, BTreeMap::new())
    }

    /// Starts Envoy from `source`; `add_tls` switches a plain listener that runs the
    /// filter to TLS with the leaf certificate (shipped TLS listeners always get the leaf);
    /// `extra_clusters` adds endpoints (e.g. `cache_service`) to the upstream map.
    pub fn start_with(
        up: &'static Upstreams,
        source: &std::path::Path,
        add_tls: bool,
        extra_clusters: BTreeMap<String, SocketAddr>,
    ) -> Result<Mirror> {
        crate::ensure_etc_hosts()?;
        let tmp = crate::fixture_dir("envoy")?;
        let dir = tmp.path().to_path_buf();
        let mut s = Substitution::for_upstreams(up, add_tls)?;
        s.clusters.extend(extra_clusters);
        let envoy = Envoy::start(source, &s, &dir)?;
        Ok(Mirror {
            up,
            envoy,
            dir,
            _tmp: tmp,
        })
    }

    pub fn port(&self) -> u16 {
        self.envoy.port()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Host mode: `<prefix>.mirror.test:PORT`.
    pub fn host(&self, prefix: &str) -> String {
        format!("{prefix}.{HOST_SUFFIX}:{}", self.port())
    }

    /// `https://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr())
    }

    /// A client trusting the test CA, `*.mirror.test` resolved to Envoy, no redirects
    /// followed.
    pub fn client(&self) -> reqwest::blocking::Client {
        self.up.pki.mirror_client(self.port())
    }

    /// Envoy's log tail and the fixtures' access logs, for failure messages.
    pub fn logs(&self) -> String {
        let nginx = |f: &str| crate::proc::log_tail(&self.up.nginx.dir.join(f), 30);
        format!(
            "--- envoy ---\n{}\n--- hub front ---\n{}\n--- cdn ---\n{}\n--- quay front ---\n{}\n--- nginx errors ---\n{}\n--- token server ---\n{:#?}",
            self.envoy.log_tail(80),
            nginx("hub-front.log"),
            nginx("cdn.log"),
            nginx("quay-front.log"),
            nginx("error.log"),
            self.up.token.requests().iter().rev().take(10).collect::<Vec<_>>()
        )
    }
}

/// A response read off the wire by [`Mirror::raw`].
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::header_value(&self.headers, name)
    }
}

impl Mirror {
    /// Sends one HTTP/1.1 request over TLS exactly as given (no path normalisation, any
    /// Host header): for requests a well-behaved client library refuses to send.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        host: &str,
        headers: &[(&str, &str)],
    ) -> Result<RawResponse> {
        use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
        use std::io::{Read, Write};
        crate::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.up.pki.ca)? {
            roots.add(c?)?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1")?.to_owned();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name)?;
        let sock = std::net::TcpStream::connect(("127.0.0.1", self.port()))?;
        sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: mirror-tests-raw\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Content-Length: 0\r\n\r\n");
        tls.write_all(req.as_bytes())?;
        // Read the head, then Content-Length bytes (Envoy delays its close after
        // `Connection: close` until the client closes; don't wait for it).
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            let n = match tls.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())
                        .flatten()
                });
                if len.is_some_and(|len| body.len() >= len) {
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status line in {text:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(RawResponse {
            status,
            headers,
            body: body.to_string(),
        })
    }
}
