//! The README's first command: `just up` starts a local mirror on 127.0.0.1:5000 from the
//! shipped file-based xDS layout `envoy/xds/local` and `envoy/cache.toml`, with nothing
//! else to configure.

use mirror_tests::build::workspace_root;
use mirror_tests::proc::Proc;
use mirror_tests::require_tool;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

#[test]
fn just_up_serves_the_registry_api_on_port_5000() {
    let just = require_tool("just", "pip install rust-just");
    let logs = mirror_tests::temp_dir("just-up").unwrap();
    let mut cmd = Command::new(just);
    cmd.current_dir(workspace_root()).arg("up");
    // As a user's shell: without the `CARGO_*` that cargo sets for this test binary. Build
    // scripts (ring's) fingerprint `CARGO_MANIFEST_DIR`, so `just up`'s cargo would rebuild
    // the TLS stack and regmirror (minutes of CI) instead of finding them built.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            cmd.env_remove(&key);
        }
    }
    let mut up = Proc::spawn("just-up", &cmd, &logs.path().join("up.log")).unwrap();
    // The first run may build the release binaries.
    let mirror: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    up.wait_for_port(mirror, Duration::from_secs(600)).unwrap();
    up.wait_for_port("127.0.0.1:5001".parse().unwrap(), Duration::from_secs(60))
        .unwrap();
    let client = reqwest::blocking::Client::new();

    // gcr.io is declared `cache = true`: Envoy → filter → cache-service, all local, so this
    // answers without the internet.
    let ping = client
        .get("http://127.0.0.1:5000/v2/?ns=gcr.io")
        .send()
        .unwrap();
    assert_eq!(ping.status(), 200, "{}", up.log_tail(40));
    assert_eq!(
        ping.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(ping.headers()["oci-namespace"], "gcr.io");

    // The filter is loaded: pull-only, unknown registries refused, both as OCI errors.
    let push = client
        .post("http://127.0.0.1:5000/v2/library/alpine/blobs/uploads/")
        .send()
        .unwrap();
    assert_eq!(push.status(), 405);
    let unknown = client
        .get("http://127.0.0.1:5000/v2/alpine/manifests/3?ns=evil.example")
        .send()
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN");

    // Plain `GET /v2/` goes to the default registry (Docker Hub). Whether it is reachable
    // from here or not, the answer is Envoy's, never a connection error.
    let hub = client.get("http://127.0.0.1:5000/v2/").send().unwrap();
    assert!(
        [200, 401, 503].contains(&hub.status().as_u16()),
        "{}",
        hub.status()
    );
    // Envoy runs the xDS layout: its listener came from envoy/xds/local/lds.yaml, whose
    // version Envoy reports.
    let lds = std::fs::read_to_string(workspace_root().join("envoy/xds/local/lds.yaml")).unwrap();
    let version = lds
        .lines()
        .find_map(|l| l.strip_prefix("version_info: "))
        .unwrap()
        .to_string();
    let stats = client
        .get("http://127.0.0.1:9901/stats?filter=listener_manager.lds")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        stats.contains(&format!("listener_manager.lds.version_text: {version}")),
        "{stats}"
    );
    up.stop();
}
