//! `regmirror doctor`: checks a running mirror for every declared registry — `/v2/` answers
//! (200, or a 401 whose Bearer realm points back at the mirror), an anonymous token
//! round-trip through that realm, and a manifest HEAD of a probe image with the token.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use reqwest::{Method, StatusCode};
use url::Url;

use crate::oci;
use crate::tools::render::declaration::Declaration;
use crate::tools::warm::client::{bearer_challenge, MirrorClient};
use crate::tools::warm::{table, ImageRef};

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Base URL of the mirror (its Envoy listener), e.g. https://mirror.example.com.
    #[arg(long, env = "REGMIRROR_MIRROR")]
    pub mirror: String,
    /// Extra CA certificate(s) (PEM) to trust for the mirror.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The registries declaration: which registries to check.
    #[arg(long, default_value = "envoy/registries.toml")]
    pub registries: PathBuf,
    /// Probe image for a registry, `REGISTRY=REPO:TAG` (repeatable; replaces the default).
    #[arg(long = "image", value_name = "REGISTRY=REPO:TAG")]
    pub images: Vec<String>,
}

/// Public images that exist on each well-known registry.
pub fn default_probe(registry: &str) -> Option<&'static str> {
    Some(match registry {
        "docker.io" => "library/alpine:latest",
        "quay.io" => "prometheus/busybox:latest",
        "gcr.io" => "distroless/static:nonroot",
        "ghcr.io" => "containerd/busybox:1.36",
        "registry.k8s.io" => "pause:3.10",
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Pass(String),
    Fail(String),
    Skip(String),
}

impl Check {
    fn cell(&self) -> String {
        match self {
            Check::Pass(s) => format!("OK {s}"),
            Check::Fail(_) => "FAIL".to_owned(),
            Check::Skip(s) => format!("- {s}"),
        }
    }
    fn failed(&self) -> bool {
        matches!(self, Check::Fail(_))
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub registry: String,
    pub v2: Check,
    pub token: Check,
    pub manifest: Check,
    pub notes: Vec<String>,
}

impl Row {
    pub fn failed(&self) -> bool {
        self.v2.failed() || self.token.failed() || self.manifest.failed()
    }
}

/// Is `realm` a rewritten realm on the mirror (`<mirror>/_mirror/auth/<realm-host>/…`)?
/// Returns the upstream realm host it stands for.
pub fn realm_on_mirror(client: &MirrorClient, realm: &str) -> Result<String, String> {
    let u = Url::parse(realm).map_err(|e| format!("realm {realm:?} is not a URL: {e}"))?;
    if !client.on_mirror(&u) {
        return Err(format!(
            "realm {realm} points away from the mirror (not rewritten: clients would go to the upstream directly)"
        ));
    }
    let base = client.base().path().trim_end_matches('/');
    let rest = u
        .path()
        .strip_prefix(base)
        .and_then(|p| p.strip_prefix(registry_rules::route::AUTH_PREFIX))
        .ok_or_else(|| format!("realm {realm} is on the mirror but not under /_mirror/auth/"))?;
    Ok(rest.split('/').next().unwrap_or("").to_owned())
}

async fn check_registry(client: &MirrorClient, registry: &str, probe: Option<&ImageRef>) -> Row {
    let mut row = Row {
        registry: registry.to_owned(),
        v2: Check::Skip(String::new()),
        token: Check::Skip("no challenge".into()),
        manifest: Check::Skip("no probe image (--image REGISTRY=REPO:TAG)".into()),
        notes: vec![],
    };
    // 1. /v2/
    let mut challenge: Option<(String, String)> = None;
    let v2 = match client.v2_url(registry, "", "") {
        Ok(u) => u,
        Err(e) => {
            row.v2 = Check::Fail(e.to_string());
            row.notes.push(e.to_string());
            return row;
        }
    };
    match client.get_raw(v2).await {
        Err(e) => {
            row.v2 = Check::Fail(e.clone());
            row.notes.push(format!("/v2/: {e}"));
            return row;
        }
        Ok(resp) => match resp.status() {
            StatusCode::OK => row.v2 = Check::Pass("200 (open)".into()),
            StatusCode::UNAUTHORIZED => match bearer_challenge(&resp) {
                Some(bearer) => match realm_on_mirror(client, &bearer.realm) {
                    Ok(host) => {
                        row.v2 = Check::Pass(format!("401, realm via mirror ({host})"));
                        challenge = Some((bearer.realm, bearer.service.unwrap_or_default()));
                    }
                    Err(e) => {
                        row.v2 = Check::Fail(e.clone());
                        row.token = Check::Skip("skipped".into());
                        row.notes.push(format!("/v2/: {e}"));
                    }
                },
                None => {
                    let e = "401 without a Bearer challenge".to_owned();
                    row.v2 = Check::Fail(e.clone());
                    row.notes.push(format!("/v2/: {e}"));
                }
            },
            s => {
                let body = crate::tools::warm::client::error_body(resp).await;
                let e = format!("HTTP {}{}", s.as_u16(), super::oci_error_suffix(&body));
                row.v2 = Check::Fail(e.clone());
                row.notes.push(format!("/v2/: {e}"));
                return row;
            }
        },
    }
    let scope = probe
        .map(|p| format!("repository:{}:pull", p.repo))
        .unwrap_or_default();
    // 2. token round-trip through the rewritten realm (kept in the client's token cache for
    // the HEAD below).
    if let Some((realm, service)) = &challenge {
        match client.token(realm, service, &scope).await {
            Ok(_) => row.token = Check::Pass("anonymous".into()),
            Err(e) => {
                let e = e.to_string();
                row.token = Check::Fail(e.clone());
                row.notes.push(format!("token: {e}"));
            }
        }
    }
    // 3. manifest HEAD with the token.
    let Some(p) = probe else {
        return row;
    };
    let url = match client.v2_url(registry, &p.repo, &format!("manifests/{}", p.reference)) {
        Ok(u) => u,
        Err(e) => {
            row.manifest = Check::Fail(e.to_string());
            return row;
        }
    };
    match client
        .send(
            Method::HEAD,
            url,
            Some(oci::MANIFEST_ACCEPT),
            &format!("repository:{}:pull", p.repo),
        )
        .await
    {
        Ok(resp) if resp.status() == StatusCode::OK => {
            if !client.on_mirror(resp.url()) {
                row.notes.push(format!(
                    "manifest answered by {} (a redirect left the mirror)",
                    resp.url().host_str().unwrap_or("?")
                ));
            }
            let digest = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|d| d.strip_prefix("sha256:"))
                .and_then(|h| h.get(..12))
                .map(|h| format!(" sha256:{h}"))
                .unwrap_or_default();
            row.manifest = Check::Pass(format!("200{digest}"));
            row.notes.push(format!("probe {}:{}", p.repo, p.reference));
        }
        Ok(resp) => {
            let e = format!(
                "HEAD {}:{} → HTTP {}{}",
                p.repo,
                p.reference,
                resp.status().as_u16(),
                match resp.status() {
                    StatusCode::NOT_FOUND =>
                        " (probe image missing upstream, or registry not routed)",
                    StatusCode::UNAUTHORIZED => " (token not accepted)",
                    StatusCode::TOO_MANY_REQUESTS => " (rate limited)",
                    _ => "",
                }
            );
            row.manifest = Check::Fail(e.clone());
            row.notes.push(e);
        }
        Err(e) => {
            let e = format!("HEAD {}:{}: {e}", p.repo, p.reference);
            row.manifest = Check::Fail(e.clone());
            row.notes.push(e);
        }
    }
    row
}

pub fn report(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.registry.clone(),
                r.v2.cell(),
                r.token.cell(),
                r.manifest.cell(),
                r.notes.join("; "),
            ]
        })
        .collect();
    table(&["REGISTRY", "/v2/", "TOKEN", "MANIFEST", "NOTES"], &cells)
}

/// Probe images per registry: defaults, replaced by `--image`.
fn probes(names: &[String], images: &[String]) -> Result<BTreeMap<String, ImageRef>, String> {
    let mut out = BTreeMap::new();
    for n in names {
        if let Some(p) = default_probe(n) {
            out.insert(n.clone(), ImageRef::parse(&format!("{n}={p}"))?);
        }
    }
    for i in images {
        if !i.contains('=') {
            return Err(format!("--image {i:?}: expected REGISTRY=REPO:TAG"));
        }
        let r = ImageRef::parse(i)?;
        if !names.contains(&r.registry) {
            return Err(format!(
                "--image {i:?}: {} is not a declared registry ({})",
                r.registry,
                names.join(", ")
            ));
        }
        out.insert(r.registry.clone(), r);
    }
    Ok(out)
}

pub fn run(args: &DoctorArgs) -> ExitCode {
    let decl = match Declaration::load(&args.registries) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("regmirror doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let names: Vec<String> = decl.registries.iter().map(|r| r.name.clone()).collect();
    let probes = match probes(&names, &args.images) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("regmirror doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match MirrorClient::from_flags(&args.mirror, args.ca.as_deref(), true) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regmirror doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regmirror doctor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rows: Vec<Row> = rt.block_on(async {
        let checks = names
            .iter()
            .map(|n| check_registry(&client, n, probes.get(n)));
        futures::future::join_all(checks).await
    });
    print!("{}", report(&rows));
    let failed = rows.iter().filter(|r| r.failed()).count();
    if failed > 0 {
        eprintln!(
            "regmirror doctor: {failed} of {} registries have failing checks",
            rows.len()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realms() {
        let c = MirrorClient::new("http://127.0.0.1:5000", None, true).unwrap();
        assert_eq!(
            realm_on_mirror(
                &c,
                "http://127.0.0.1:5000/_mirror/auth/auth.docker.io/token"
            )
            .unwrap(),
            "auth.docker.io"
        );
        assert!(realm_on_mirror(&c, "https://auth.docker.io/token")
            .unwrap_err()
            .contains("points away"));
        assert!(realm_on_mirror(&c, "http://127.0.0.1:5000/token").is_err());
        assert!(realm_on_mirror(&c, "http://127.0.0.1:5001/_mirror/auth/x/token").is_err());
    }

    #[test]
    fn probe_images() {
        let names: Vec<String> = ["docker.io", "quay.io", "example.com"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = probes(&names, &[]).unwrap();
        assert_eq!(p["docker.io"].repo, "library/alpine");
        assert_eq!(p["quay.io"].repo, "prometheus/busybox");
        assert!(!p.contains_key("example.com"));
        let p = probes(&names, &["example.com=team/app:1".into()]).unwrap();
        assert_eq!(p["example.com"].reference.to_string(), "1");
        assert!(probes(&names, &["ghcr.io=x/y:1".into()]).is_err());
        assert!(probes(&names, &["x/y:1".into()]).is_err());
    }

    #[test]
    fn table_marks_failures() {
        let rows = vec![Row {
            registry: "quay.io".into(),
            v2: Check::Fail("realm elsewhere".into()),
            token: Check::Skip("no challenge".into()),
            manifest: Check::Pass("200".into()),
            notes: vec!["/v2/: realm elsewhere".into()],
        }];
        assert!(rows[0].failed());
        let t = report(&rows);
        assert!(t.contains("FAIL"), "{t}");
        assert!(t.contains("/v2/: realm elsewhere"), "{t}");
    }
}
