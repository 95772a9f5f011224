//! Test PKI: one CA, one leaf certificate for every fixture host name, and the ES256
//! token-signing key with its certificate (distribution's `auth.token.rootcertbundle`).

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use std::path::PathBuf;

/// Subject alternative names of the leaf certificate (docs/design.md, "Fixture host names").
pub const LEAF_NAMES: &[&str] = &[
    "registry-1.docker.io",
    "auth.docker.io",
    "production.cloudflare.docker.com",
    "quay.io",
    "cdn.quay.io",
    "gcr.io",
    "ghcr.io",
    "registry.k8s.io",
    "*.mirror.test",
    "localhost",
    "127.0.0.1",
];

pub struct Pki {
    /// `ca.crt`, `tls.crt`, `tls.key`, `token.crt`, `token.key` live here.
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A directory holding only `ca.crt` (skopeo `--src-cert-dir`, containers/image
    /// treats any `*.key` there as a client key).
    pub cert_dir: PathBuf,
    /// PKCS#8 PEM of the ES256 token-signing key.
    pub token_key_pem: String,
    pub token_cert: PathBuf,
    /// Base64 (standard) DER of the token certificate: the JWT header's `x5c[0]`.
    pub token_cert_x5c: String,
    _tmp: tempfile::TempDir,
}

impl Pki {
    pub fn generate() -> Result<Pki> {
        let tmp = crate::fixture_dir("pki")?;
        let dir = tmp.path().to_path_buf();

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mirror-tests CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut leaf_params =
            CertificateParams::new(LEAF_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .context("leaf SANs")?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "mirror-tests leaf");
        leaf_params.is_ca = IsCa::NoCa;
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_cert = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key)?;

        // Token signing: a self-signed ES256 certificate listed in distribution's
        // rootcertbundle; tokens carry it in `x5c`.
        let token_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut token_params = CertificateParams::new(Vec::<String>::new())?;
        token_params
            .distinguished_name
            .push(DnType::CommonName, "mirror-tests token signer");
        let token_cert = token_params.self_signed(&token_key)?;

        let ca = dir.join("ca.crt");
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        let token_crt = dir.join("token.crt");
        std::fs::write(&ca, ca_cert.pem())?;
        // The chain: leaf then CA (servers send both).
        std::fs::write(&cert, format!("{}{}", leaf_cert.pem(), ca_cert.pem()))?;
        std::fs::write(&key, leaf_key.serialize_pem())?;
        std::fs::write(&token_crt, token_cert.pem())?;
        std::fs::write(dir.join("token.key"), token_key.serialize_pem())?;
        let cert_dir = dir.join("certs.d");
        std::fs::create_dir_all(&cert_dir)?;
        std::fs::write(cert_dir.join("ca.crt"), ca_cert.pem())?;

        Ok(Pki {
            ca_pem: ca_cert.pem(),
            ca,
            cert,
            key,
            cert_dir,
            token_key_pem: token_key.serialize_pem(),
            token_cert: token_crt,
            token_cert_x5c: base64::engine::general_purpose::STANDARD.encode(token_cert.der()),
            dir,
            _tmp: tmp,
        })
    }

    /// A rustls server configuration presenting the leaf certificate.
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.key)?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// A blocking HTTP client trusting only the test CA, resolving every fixture and
    /// mirror host name in `resolve` to the given addresses.
    /// A client trusting the test CA with every mirror host name (`*.mirror.test`)
    /// resolved to the Envoy listening on 127.0.0.1:`port`; no redirects followed.
    pub fn mirror_client(&self, port: u16) -> reqwest::blocking::Client {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let resolve: Vec<(&str, std::net::SocketAddr)> =
            crate::MIRROR_HOSTS.iter().map(|h| (*h, addr)).collect();
        match self.client(&resolve) {
            Ok(c) => c,
            Err(e) => panic!("http client: {e:#}"),
        }
    }

    pub fn client(
        &self,
        resolve: &[(&str, std::net::SocketAddr)],
    ) -> Result<reqwest::blocking::Client> {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?;
        let mut b = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(60));
        for (host, addr) in resolve {
            b = b.resolve(host, *addr);
        }
        Ok(b.build()?)
    }
}
