//! Who may use the mirror: `[access]` in the declaration, rendered by `regmirror render`
//! into Envoy's own filters, run by real Envoy in front of the real fixtures.
//!
//! One mirror for the file: the shipped registries plus an allowlist of 127.0.0.1 and
//! 127.0.0.3 (Envoy sees the loopback source address a client binds to), a per-client rate
//! limit, and a Basic login in its own header, which containerd sends from the `hosts.toml`
//! `regmirror client-config containerd --user` writes.

use mirror_tests::build::{regmirror, workspace_root};
use mirror_tests::clients;
use mirror_tests::envoy::{self, Substitution};
use mirror_tests::mirror::{Mirror, HOST_SUFFIX};
use mirror_tests::proc::run;
use mirror_tests::upstreams;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";
const HEADER: &str = "x-mirror-authorization";
const BURST: usize = 60;

/// `alice:{SHA}base64(sha1(password))`, the htpasswd line `htpasswd -s` writes.
fn htpasswd_line() -> String {
    use base64::Engine;
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "printf %s '{PASSWORD}' | openssl dgst -binary -sha1"
    )))
    .unwrap();
    format!(
        "{USER}:{{SHA}}{}\n",
        base64::engine::general_purpose::STANDARD.encode(out.stdout)
    )
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

struct Guarded {
    mirror: Mirror,
    declaration: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The shipped declaration with `[access]`, rendered by the real `regmirror render`, run by
/// Envoy (TLS listener with the test leaf).
fn guarded() -> &'static Guarded {
    static G: OnceLock<Guarded> = OnceLock::new();
    G.get_or_init(|| {
        let dir = mirror_tests::fixture_dir("access").unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, htpasswd_line()).unwrap();
        let shipped =
            std::fs::read_to_string(workspace_root().join("envoy/registries.toml")).unwrap();
        let declaration = dir.path().join("registries.toml");
        std::fs::write(
            &declaration,
            shipped.replacen(
                "\n[[registry]]",
                &format!(
                    "\n[access]\nallow_networks = [\"127.0.0.1/32\", \"127.0.0.3\"]\n\
                     rate_limit = {{ requests_per_second = 1, burst = {BURST} }}\n\
                     basic_auth = {{ htpasswd = {:?}, header = \"{HEADER}\" }}\n\n[[registry]]",
                    htpasswd.display().to_string()
                ),
                1,
            ),
        )
        .unwrap();
        let out = dir.path().join("rendered");
        run(Command::new(regmirror().unwrap())
            .arg("render")
            .arg("--registries")
            .arg(&declaration)
            .arg("--out")
            .arg(&out))
        .unwrap();
        for name in ["local.yaml", "mirror.yaml", "behind-tls-proxy.yaml"] {
            validate(&out.join(name), dir.path());
        }
        let config = out.join("local.yaml");
        let mirror = Mirror::start_with(upstreams::shared(), &config, true, BTreeMap::new())
            .unwrap_or_else(|e| panic!("{e:#}"));
        Guarded {
            mirror,
            declaration,
            _dir: dir,
        }
    })
}

/// `envoy --mode validate` on a rendered config, with the documented substitution.
fn validate(config: &Path, dir: &Path) {
    let up = upstreams::shared();
    let s = Substitution::for_upstreams(up, false).unwrap();
    let yaml = std::fs::read_to_string(config).unwrap();
    let out = envoy::substitute(&yaml, &s, &mut mirror_tests::free_port).unwrap();
    let file = dir.join("validate.yaml");
    std::fs::write(&file, out.yaml).unwrap();
    if let Err(e) = envoy::validate(&file) {
        panic!("{}: {e:#}", config.display());
    }
}

/// A client connecting from `source` (any 127/8 address is local), trusting the test CA.
fn client_from(source: Ipv4Addr) -> reqwest::blocking::Client {
    let ca = std::fs::read(&upstreams::shared().pki.ca).unwrap();
    reqwest::blocking::Client::builder()
        .local_address(IpAddr::V4(source))
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn ping(g: &Guarded, source: Ipv4Addr, login: Option<&str>) -> reqwest::blocking::Response {
    let mut req = client_from(source).get(format!("https://127.0.0.1:{}/v2/", g.mirror.port()));
    if let Some(login) = login {
        req = req.header(HEADER, login);
    }
    req.send().unwrap()
}

const ALLOWED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// Allowed too: the rate-limit test's own client address, so it does not starve the pull.
const HAMMER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[test]
fn containerd_with_the_generated_login_pulls() {
    let g = guarded();
    let m = &g.mirror;
    let hosts = tempfile::tempdir().unwrap();
    run(Command::new(regmirror().unwrap())
        .args(["client-config", "containerd", "--mirror"])
        .arg(format!("https://{}", m.addr()))
        .arg("--ca")
        .arg(&m.up.pki.ca)
        .arg("--registries")
        .arg(&g.declaration)
        .arg("--out")
        .arg(hosts.path())
        .env("REGMIRROR_MIRROR_LOGIN", format!("{USER}:{PASSWORD}")))
    .unwrap();
    // containerd's fallback to the real Docker Hub goes to a closed port instead.
    let file = hosts.path().join("docker.io/hosts.toml");
    let generated = std::fs::read_to_string(&file).unwrap();
    assert!(generated.contains(HEADER), "{generated}");
    let dead = format!("https://127.0.0.1:{}", mirror_tests::free_port());
    std::fs::write(
        &file,
        generated.replace("https://registry-1.docker.io", &dead),
    )
    .unwrap();

    let ctrd = clients::containerd();
    let ns = format!("access-{}", hex::encode(rand::random::<[u8; 4]>()));
    let reference = "docker.io/library/alpine:3.20";
    if let Err(e) = ctrd.pull(&ns, hosts.path(), reference, &[]) {
        panic!("{e:#}\n{}", m.logs());
    }
    let image = &m.up.images.alpine;
    assert_eq!(ctrd.image_digest(&ns, reference).unwrap(), image.digest);
    for d in image.all_blobs() {
        ctrd.verify_content(&ns, &d).unwrap();
    }
}

#[test]
fn no_or_wrong_login_is_asked_for_credentials() {
    let g = guarded();
    for login in [
        None,
        Some(basic(USER, "wrong")),
        Some(basic("mallory", PASSWORD)),
    ] {
        let resp = ping(g, ALLOWED, login.as_deref());
        assert_eq!(resp.status(), 401, "{login:?}\n{}", g.mirror.logs());
        let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Basic realm="), "{challenge}");
        let body = resp.text().unwrap();
        assert!(body.contains("authentication failed"), "{body}");
    }
    // The right login passes to the mirror filter, which answers like the registry: with
    // the registry's own token challenge.
    let resp = ping(g, ALLOWED, Some(&basic(USER, PASSWORD)));
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    // In host mode too: the login guards every name the mirror answers.
    let resp = client_from(ALLOWED)
        .get(format!("https://127.0.0.1:{}/v2/", g.mirror.port()))
        .header("host", format!("quay.{HOST_SUFFIX}"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[test]
fn a_client_outside_the_allowed_networks_is_refused() {
    let g = guarded();
    let resp = ping(g, OUTSIDE, Some(&basic(USER, PASSWORD)));
    assert_eq!(resp.status(), 403, "{}", g.mirror.logs());
    assert!(resp.text().unwrap().contains("access denied"));
}

#[test]
fn a_client_over_its_rate_gets_429_and_others_are_not_slowed() {
    let g = guarded();
    let login = basic(USER, PASSWORD);
    let statuses: Vec<u16> = (0..BURST + 20)
        .map(|_| ping(g, HAMMER, Some(&login)).status().as_u16())
        .collect();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        limited >= 10,
        "{limited} of {} requests limited: {statuses:?}",
        statuses.len()
    );
    // The bucket is per client address: another allowed client still gets through.
    // (Through the login to the registry's own challenge, as any allowed client is.)
    let resp = ping(g, ALLOWED, Some(&login));
    assert_eq!(resp.status(), 401, "{}", g.mirror.logs());
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
}

/// A login in `Authorization` (what `docker login`, podman's auth.json and k3s send) on a
/// mirror whose registries are all cached: cache-service answers the registry's auth
/// itself, so no registry token ever competes with the login for the header.
#[test]
fn a_registry_login_in_authorization_pulls_through_the_cache() {
    let up = upstreams::shared();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, htpasswd_line()).unwrap();
    let declaration = dir.path().join("registries.toml");
    std::fs::write(
        &declaration,
        format!(
            "[mirror]\ndefault_registry = \"gcr.io\"\ncache_service = \"127.0.0.1:5001\"\n\n\
             [access]\nbasic_auth = {{ htpasswd = {:?} }}\n\n\
             [[registry]]\nname = \"gcr.io\"\nupstream = \"gcr.io\"\nhost_prefix = \"gcr\"\n\
             realm_hosts = [\"gcr.io\"]\ncache = true\n",
            htpasswd.display().to_string()
        ),
    )
    .unwrap();
    let out = dir.path().join("rendered");
    run(Command::new(regmirror().unwrap())
        .arg("render")
        .arg("--registries")
        .arg(&declaration)
        .arg("--out")
        .arg(&out))
    .unwrap();
    let cache = mirror_tests::cache::CacheService::start(up).unwrap();
    let m = Mirror::start_with(
        up,
        &out.join("local.yaml"),
        true,
        BTreeMap::from([("cache_service".to_string(), cache.addr)]),
    )
    .unwrap();

    // podman/skopeo: the auth.json `regmirror client-config podman --user` writes.
    let config = tempfile::tempdir().unwrap();
    run(Command::new(regmirror().unwrap())
        .args(["client-config", "podman", "--mirror"])
        .arg(format!("https://{}", m.addr()))
        .arg("--registries")
        .arg(&declaration)
        .arg("--out")
        .arg(config.path())
        .env("REGMIRROR_MIRROR_LOGIN", format!("{USER}:{PASSWORD}")))
    .unwrap();
    let reference = format!("docker://{}/gcr.io/distroless/static:nonroot", m.addr());
    let skopeo = |auth: &[&str]| {
        let target = mirror_tests::temp_dir("skopeo").unwrap();
        let result = run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--retry-times", "0"])
            .args(auth)
            .arg("--src-cert-dir")
            .arg(&up.pki.cert_dir)
            .arg(&reference)
            .arg(format!("dir:{}", target.path().display())));
        (result, target)
    };
    let authfile = config.path().join("auth.json").display().to_string();
    let (result, target) = skopeo(&["--src-authfile", &authfile]);
    if let Err(e) = result {
        panic!("{e:#}\n{}\n{}", m.logs(), cache.proc.log_tail(30));
    }
    clients::verify_dir(target)
        .unwrap()
        .assert_is(&up.images.distroless, false);

    let (result, _) = skopeo(&["--src-no-creds"]);
    let error = format!("{:#}", result.unwrap_err());
    assert!(
        error.contains("401") || error.contains("authentication required"),
        "{error}"
    );
}

/// `client_ca` on the standalone TLS mirror: a client certificate is the credential, so no
/// header is involved and a pass-through registry's token flow runs unchanged.
#[test]
fn a_client_certificate_is_required_on_the_standalone_mirror() {
    let up = upstreams::shared();
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(workspace_root().join("envoy/registries.toml")).unwrap();
    let declaration = dir.path().join("registries.toml");
    std::fs::write(
        &declaration,
        shipped.replacen(
            "\n[[registry]]",
            &format!(
                "\n[access]\nclient_ca = {:?}\n\n[[registry]]",
                up.pki.ca.display().to_string()
            ),
            1,
        ),
    )
    .unwrap();
    let out = dir.path().join("rendered");
    run(Command::new(regmirror().unwrap())
        .arg("render")
        .arg("--registries")
        .arg(&declaration)
        .arg("--out")
        .arg(&out))
    .unwrap();
    let m = Mirror::start_with(up, &out.join("mirror.yaml"), false, BTreeMap::new()).unwrap();
    let port = m.envoy.listener("mirror_https").unwrap();

    // Without a certificate the handshake fails: nothing reaches the filter. The same client
    // with a certificate from the client CA gets the registry's challenge, so what it
    // lacked was the certificate.
    let ca = std::fs::read(&up.pki.ca).unwrap();
    let ping = |identity: Option<reqwest::Identity>| {
        let mut b = reqwest::blocking::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        if let Some(id) = identity {
            b = b.identity(id);
        }
        b.build()
            .unwrap()
            .get(format!("https://127.0.0.1:{port}/v2/"))
            .send()
    };
    let anonymous = ping(None);
    assert!(
        anonymous.is_err(),
        "no certificate, yet an answer: {anonymous:?}"
    );
    let mut pem = std::fs::read(&up.pki.cert).unwrap();
    pem.extend(std::fs::read(&up.pki.key).unwrap());
    let resp = ping(Some(reqwest::Identity::from_pem(&pem).unwrap())).unwrap();
    assert_eq!(resp.status(), 401, "{}", m.logs());
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");

    // skopeo with a certificate from the client CA pulls, token flow and CDN redirect
    // included. containers/image reads client.cert/client.key next to ca.crt.
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(&up.pki.ca, certs.path().join("ca.crt")).unwrap();
    std::fs::copy(&up.pki.cert, certs.path().join("client.cert")).unwrap();
    std::fs::copy(&up.pki.key, certs.path().join("client.key")).unwrap();
    let opts = clients::SkopeoPull {
        all: false,
        cert_dir: Some(certs.path().to_path_buf()),
        registries_conf: None,
    };
    let reference = format!("docker.{HOST_SUFFIX}:{port}/library/alpine:3.20");
    match clients::skopeo_pull(&reference, &opts) {
        Ok(pulled) => pulled.assert_is(&up.images.alpine, false),
        Err(e) => panic!("{e:#}\n{}", m.logs()),
    }
}
