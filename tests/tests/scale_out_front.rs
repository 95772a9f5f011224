//! Stateless fronts: several Envoys behind one load balancer hand out signed redirect URLs
//! that any of them accepts, because `regmirror render --signing-key-file` gives every
//! filter the same key. Real Envoys with the fresh filter, in front of the shared upstream
//! fixtures (the hub front answers a blob with a redirect to its CDN).

use mirror_tests::build::{regmirror, workspace_root};
use mirror_tests::mirror::Mirror;
use mirror_tests::proc::run;
use mirror_tests::upstreams::{self, HUB_REALM, HUB_SERVICE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Renders the shipped declaration into `dir/<name>` with the key in `dir/<name>.key`;
/// returns the rendered `local.yaml`.
fn render_with_key(dir: &Path, name: &str, key: &str) -> PathBuf {
    let key_file = dir.join(format!("{name}.key"));
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let out = dir.join(name);
    run(Command::new(regmirror().unwrap())
        .arg("render")
        .arg("--registries")
        .arg(workspace_root().join("envoy/registries.toml"))
        .arg("--out")
        .arg(&out)
        .arg("--signing-key-file")
        .arg(&key_file)
        .arg("--no-envoy-validate"))
    .unwrap();
    out.join("local.yaml")
}

/// The path and query of a signed mirror URL (the Envoy's own host and port dropped).
fn redirect_path(location: &str) -> &str {
    let at = location
        .find("/_mirror/redirect/")
        .unwrap_or_else(|| panic!("not a signed mirror URL: {location}"));
    &location[at..]
}

#[test]
fn a_shared_key_lets_every_front_verify_the_others_redirects() {
    let up = upstreams::shared();
    let dir = tempfile::tempdir().unwrap();
    let shared_key = "5a".repeat(32);
    let config = render_with_key(dir.path(), "shared", &shared_key);
    let other = render_with_key(dir.path(), "other", &"c3".repeat(32));
    // The key is in every filter configuration render wrote, and in no checked-in file.
    for file in [
        "local.yaml",
        "mirror.yaml",
        "filter.json",
        "istio/mirror.yaml",
    ] {
        let rendered = std::fs::read_to_string(dir.path().join("shared").join(file)).unwrap();
        assert!(rendered.contains(&shared_key), "{file}");
        let shipped = std::fs::read_to_string(workspace_root().join("envoy").join(file)).unwrap();
        assert!(!shipped.contains("signing_key"), "envoy/{file}");
    }

    let start = |config: &Path| Mirror::start_with(up, config, true, BTreeMap::new()).unwrap();
    let (a, b, c) = (start(&config), start(&config), start(&other));

    // Envoy A signs the CDN redirect of a blob.
    let token = up
        .pull_token(HUB_REALM, HUB_SERVICE, "library/alpine")
        .unwrap();
    let blob = &up.images.alpine.all_blobs()[0];
    let resp = a
        .client()
        .get(format!(
            "https://{}/v2/library/alpine/blobs/{blob}",
            a.host("docker")
        ))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 307, "{}", a.logs());
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let path = redirect_path(&location);

    // Envoy B, same key: follows it to the CDN, the blob's bytes verified.
    let resp = b
        .client()
        .get(format!("https://{}{path}", b.host("docker")))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "{location}\n{}", b.logs());
    let body = resp.bytes().unwrap();
    assert_eq!(
        &registry_rules::digest::Digest::of_bytes(&body).to_string(),
        blob
    );

    // An Envoy with another key: the URL is not its own, refused.
    let resp = c
        .client()
        .get(format!("https://{}{path}", c.host("docker")))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403, "{location}\n{}", c.logs());
    let body = resp.text().unwrap();
    assert!(body.contains("DENIED"), "{body}");
}

/// The key never lands in the checked-in directory, and a bad key writes nothing.
#[test]
fn the_signing_key_is_for_deployment_output_only() {
    let dir = tempfile::tempdir().unwrap();
    let declaration = dir.path().join("registries.toml");
    std::fs::copy(workspace_root().join("envoy/registries.toml"), &declaration).unwrap();
    let key = dir.path().join("key");
    let render = |key_text: &str, out: &Path| {
        std::fs::write(&key, key_text).unwrap();
        Command::new(regmirror().unwrap())
            .arg("render")
            .arg("--registries")
            .arg(&declaration)
            .arg("--out")
            .arg(out)
            .arg("--signing-key-file")
            .arg(&key)
            .arg("--no-envoy-validate")
            .output()
            .unwrap()
    };
    // Beside the declaration: refused.
    let beside = render(&"ab".repeat(32), dir.path());
    assert_eq!(beside.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&beside.stderr);
    assert!(stderr.contains("checked in"), "{stderr}");
    assert!(!dir.path().join("local.yaml").exists());
    // Too short for the filter: its own parser's reason, nothing written.
    let out = dir.path().join("out");
    let short = render(&"ab".repeat(16), &out);
    assert_eq!(short.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&short.stderr);
    assert!(stderr.contains("at least 32 bytes"), "{stderr}");
    assert!(
        !stderr.contains(&"ab".repeat(16)),
        "the key is echoed: {stderr}"
    );
    assert!(!out.exists());
}
