//! The shipped Envoy configurations, run with the documented substitution only:
//! every one validates; the standalone TLS config (`envoy/mirror.yaml`) serves the mirror
//! and redirects plain HTTP to HTTPS; the behind-a-TLS-proxy config builds `https` mirror
//! URLs from the proxy's `X-Forwarded-Proto`.

use mirror_tests::build::workspace_root;
use mirror_tests::envoy::{self, Substitution};
use mirror_tests::mirror::{Mirror, HOST_SUFFIX};
use mirror_tests::upstreams;
use std::collections::BTreeMap;
use std::net::SocketAddr;

fn substituted(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let up = upstreams::shared();
    let wasm = mirror_tests::build::wasm().unwrap();
    let yaml = std::fs::read_to_string(workspace_root().join("envoy").join(name)).unwrap();
    let s = Substitution {
        clusters: up.cluster_map(),
        blackhole: Some(SocketAddr::from((
            [127, 0, 0, 1],
            mirror_tests::free_port(),
        ))),
        ca: Some(up.pki.ca.clone()),
        wasm: Some(wasm),
        host_suffix: Some(HOST_SUFFIX.into()),
        tls: Some((up.pki.cert.clone(), up.pki.key.clone())),
        add_tls: false,
    };
    let out = envoy::substitute(&yaml, &s, &mut mirror_tests::free_port).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(name);
    std::fs::write(&file, out.yaml).unwrap();
    (dir, file)
}

#[test]
fn every_shipped_envoy_config_validates() {
    for name in ["local.yaml", "mirror.yaml", "behind-tls-proxy.yaml"] {
        let (_dir, file) = substituted(name);
        if let Err(e) = envoy::validate(&file) {
            panic!("envoy/{name}: {e:#}");
        }
    }
}

#[test]
fn standalone_tls_config_serves_the_mirror_and_redirects_http() {
    let up = upstreams::shared();
    let m = Mirror::start_with(
        up,
        &workspace_root().join("envoy/mirror.yaml"),
        false,
        BTreeMap::new(),
    )
    .unwrap();
    let https = m
        .envoy
        .listener("mirror_https")
        .expect("listener mirror_https");
    let http = m
        .envoy
        .listener("mirror_http_redirect")
        .expect("listener mirror_http_redirect");
    let client = m.client();
    let resp = client
        .get(format!("https://docker.{HOST_SUFFIX}:{https}/v2/"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401, "{}", m.logs());
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains(&format!(
            "realm=\"https://docker.{HOST_SUFFIX}:{https}/_mirror/auth/auth.docker.io/token\""
        )),
        "{challenge}"
    );
    assert!(resp.headers().contains_key("strict-transport-security"));

    let resp = client
        .get(format!(
            "http://docker.{HOST_SUFFIX}:{http}/v2/library/alpine/manifests/3.20"
        ))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 301);
    let location = resp.headers()["location"].to_str().unwrap();
    assert!(
        location.starts_with(&format!("https://docker.{HOST_SUFFIX}")),
        "{location}"
    );
}

#[test]
fn behind_a_tls_proxy_mirror_urls_are_https() {
    let up = upstreams::shared();
    let m = Mirror::start_with(
        up,
        &workspace_root().join("envoy/behind-tls-proxy.yaml"),
        false,
        BTreeMap::new(),
    )
    .unwrap();
    // What a TLS-terminating proxy in front would send.
    let resp = m
        .client()
        .get(format!("http://127.0.0.1:{}/v2/", m.port()))
        .header("host", format!("docker.{HOST_SUFFIX}"))
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-for", "192.0.2.10")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401, "{}", m.logs());
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains(&format!(
            "realm=\"https://docker.{HOST_SUFFIX}/_mirror/auth/auth.docker.io/token\""
        )),
        "{challenge}"
    );
}
