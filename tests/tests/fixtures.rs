//! The fixtures are real and correct, without the mirror: distribution's token auth,
//! the token server, Docker Hub's blob redirect to the CDN, and the CDN's S3 behaviour.

use base64::Engine;
use mirror_tests::upstreams::{self, AccessLogEntry, Front};
use mirror_tests::{digest_of, images};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

fn jwt_claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("JWT payload is base64url");
    serde_json::from_slice(&bytes).expect("JWT payload is JSON")
}

#[test]
fn hub_registry_challenges_with_the_docker_hub_realm() {
    let up = upstreams::shared();
    let resp = up
        .client()
        .unwrap()
        .get("https://registry-1.docker.io/v2/")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains(r#"realm="https://auth.docker.io/token""#)
            && challenge.contains(r#"service="registry.docker.io""#),
        "{challenge}"
    );
    // nginx writes its access log line after the answer: wait for it.
    let seen = |e: &AccessLogEntry| {
        e.path() == "/v2/" && e.host == "registry-1.docker.io" && e.status() == 401
    };
    assert!(up.access_log_with(Front::Hub, seen).iter().any(seen));
}

#[test]
fn anonymous_token_pulls_the_manifest_by_tag() {
    let up = upstreams::shared();
    let client = up.client().unwrap();
    let token = up
        .pull_token(
            upstreams::HUB_REALM,
            upstreams::HUB_SERVICE,
            "library/alpine",
        )
        .unwrap();
    let claims = jwt_claims(&token);
    assert_eq!(claims["aud"], "registry.docker.io");
    assert_eq!(claims["access"][0]["name"], "library/alpine");
    assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull"]));

    let resp = client
        .get("https://registry-1.docker.io/v2/library/alpine/manifests/3.20")
        .bearer_auth(&token)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let alpine = &up.images.alpine;
    assert_eq!(
        resp.headers()["docker-content-digest"].to_str().unwrap(),
        alpine.digest
    );
    let body = resp.bytes().unwrap();
    assert_eq!(digest_of(&body), alpine.digest);
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 3);

    let seen = up.token.requests();
    assert!(seen.iter().any(|r| r.path == "/token"
        && r.service.as_deref() == Some("registry.docker.io")
        && r.scopes == ["repository:library/alpine:pull"]
        && !r.authorization));
}

#[test]
fn a_token_for_another_repository_is_refused_by_distribution() {
    let up = upstreams::shared();
    let token = up
        .pull_token(upstreams::HUB_REALM, upstreams::HUB_SERVICE, "someorg/tool")
        .unwrap();
    let resp = up
        .client()
        .unwrap()
        .get("https://registry-1.docker.io/v2/library/alpine/manifests/3.20")
        .bearer_auth(&token)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains(r#"scope="repository:library/alpine:pull""#),
        "{challenge}"
    );
}

#[test]
fn pusher_gets_push_and_wrong_credentials_are_refused() {
    let up = upstreams::shared();
    let client = up.client().unwrap();
    let resp = client
        .get(upstreams::HUB_REALM)
        .basic_auth("pusher", Some("pusher-secret"))
        .query(&[
            ("service", "registry.docker.io"),
            ("scope", "repository:someorg/tool:pull,push"),
            ("scope", "repository:library/alpine:pull"),
        ])
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().unwrap();
    assert_eq!(v["expires_in"], 300);
    assert_eq!(v["token"], v["access_token"]);
    let claims = jwt_claims(v["token"].as_str().unwrap());
    assert_eq!(
        claims["access"],
        serde_json::json!([
            {"type": "repository", "name": "someorg/tool", "actions": ["pull", "push"]},
            {"type": "repository", "name": "library/alpine", "actions": ["pull"]},
        ])
    );
    let resp = client
        .get(upstreams::HUB_REALM)
        .basic_auth("pusher", Some("wrong"))
        .query(&[("service", "registry.docker.io")])
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(up
        .token
        .requests()
        .iter()
        .any(|r| r.authorization && r.user.as_deref() == Some("pusher")));
}

#[test]
fn blob_get_is_a_307_to_the_cdn_which_refuses_authorization() {
    let up = upstreams::shared();
    let client = up.client().unwrap();
    let alpine = &up.images.alpine;
    let layer = &alpine.platforms[0].layer_digests[1];
    let url = format!("https://registry-1.docker.io/v2/library/alpine/blobs/{layer}");

    // Without a token: the hub front's auth_request passes distribution's challenge on.
    let resp = client.get(&url).send().unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("auth.docker.io"));

    let token = up
        .pull_token(
            upstreams::HUB_REALM,
            upstreams::HUB_SERVICE,
            "library/alpine",
        )
        .unwrap();
    let resp = client.get(&url).bearer_auth(&token).send().unwrap();
    assert_eq!(resp.status(), 307);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let hex = layer.trim_start_matches("sha256:");
    let expected_prefix = format!(
        "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/{}/{hex}/data?verify=",
        &hex[..2]
    );
    assert!(location.starts_with(&expected_prefix), "{location}");

    // S3 behaviour: Authorization next to a presigned query → 400.
    let resp = client.get(&location).bearer_auth(&token).send().unwrap();
    assert_eq!(resp.status(), 400);
    // Without `verify` → 403.
    let bare = location.split('?').next().unwrap();
    assert_eq!(client.get(bare).send().unwrap().status(), 403);
    // As a client should: no Authorization → the bytes.
    let resp = client.get(&location).send().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().unwrap();
    assert_eq!(&digest_of(&body), layer);

    let cdn = up.access_log(Front::Cdn);
    assert!(cdn
        .iter()
        .any(|e| e.status() == 200 && !e.has_authorization() && e.query_param("verify").is_some()));
    assert!(cdn
        .iter()
        .any(|e| e.status() == 400 && e.has_authorization()));
}

#[test]
fn multi_platform_index_is_served_as_an_oci_index() {
    let up = upstreams::shared();
    let multi = &up.images.multi;
    assert!(multi.is_index());
    let token = up
        .pull_token(
            upstreams::HUB_REALM,
            upstreams::HUB_SERVICE,
            "library/multi",
        )
        .unwrap();
    let resp = up
        .client()
        .unwrap()
        .get("https://registry-1.docker.io/v2/library/multi/manifests/1")
        .bearer_auth(&token)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        images::MT_INDEX
    );
    let body = resp.bytes().unwrap();
    assert_eq!(digest_of(&body), multi.digest);
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let arches: Vec<_> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(arches, ["amd64", "arm64"]);
}

#[test]
fn quay_realm_is_on_the_registry_host() {
    let up = upstreams::shared();
    let client = up.client().unwrap();
    let resp = client.get("https://quay.io/v2/").send().unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains(r#"realm="https://quay.io/v2/auth""#)
            && challenge.contains(r#"service="quay.io""#),
        "{challenge}"
    );
    let token = up
        .pull_token(
            upstreams::QUAY_REALM,
            upstreams::QUAY_SERVICE,
            "coreos/etcd",
        )
        .unwrap();
    let etcd = &up.images.etcd;
    let resp = client
        .get("https://quay.io/v2/coreos/etcd/manifests/v3.5")
        .bearer_auth(&token)
        .header("accept", ACCEPT)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(digest_of(&resp.bytes().unwrap()), etcd.digest);
    // quay serves blobs itself.
    let layer = &etcd.platforms[0].layer_digests[0];
    let resp = client
        .get(format!("https://quay.io/v2/coreos/etcd/blobs/{layer}"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(&digest_of(&resp.bytes().unwrap()), layer);
    assert!(up.token.requests().iter().any(|r| r.path == "/v2/auth"
        && r.host == "quay.io"
        && r.service.as_deref() == Some("quay.io")));
}
