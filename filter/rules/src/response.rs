//! Response phase: what to do with an upstream's answer, decided here and applied by the
//! glue. A forwarded request's `WWW-Authenticate` values ([`plan_challenges`]: rewrite,
//! store the realm, record issued realms and token hosts), `Location` ([`plan_redirect`]:
//! sign, leave, or refuse with a local 502) and `Link` ([`plan_link`]: name the registry
//! as the client did); a realm-learning call's answer ([`plan_realm_call`]: store the
//! realm, resume or answer the paused request).

use super::challenge::{rewrite_challenges, LearnedRealm, Unrewritten, MAX_HEADER_VALUES};
use super::config::{CompiledConfig, Registry};
use super::link::{rewrite_links, ClientView};
use super::oci_error::ErrorCode;
use super::realms::RealmUrl;
use super::redirect::{rewrite_location, LocationOutcome, SignParams, NO_CREDENTIAL};
use super::route::{
    error_reply, ping_reply, realm_failure, token_after_realm_call, Forward, ForwardKind,
    LearnRealm, Ping, Reply,
};
use super::token::{classify_realm_call, RealmCall};

/// The response a plan is made for.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The route's registry.
    pub registry: &'a Registry,
    /// What the request was forwarded as.
    pub kind: ForwardKind,
    /// `:status`.
    pub status: Option<u32>,
    /// Base of URLs handed to the client.
    pub mirror_base: &'a str,
    /// Path-prefix mode: the registry component the client used.
    pub scope_prefix: Option<&'a str>,
    /// See [`Forward::withhold_client_credential`].
    pub withhold_client_credential: bool,
}

/// What the glue applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChallengePlan {
    /// Replacement `WWW-Authenticate` values (none: remove the header); `None`: leave the
    /// headers alone.
    pub values: Option<Vec<Vec<u8>>>,
    /// Bearer realms rewritten to the mirror.
    pub rewritten: usize,
    /// Realms left alone, or values that did not parse.
    pub rejected: usize,
    /// Challenges removed ([`Answer::withhold_client_credential`]).
    pub dropped: usize,
    /// The realms of the rewritten challenges of an answer that learns, in order.
    learned: Vec<LearnedRealm>,
    /// The first of `learned` is the registry's realm.
    stores: bool,
    /// The redirect target is a token host of the registry (see [`super::token_host`]).
    pub record_token_host: bool,
}

impl ChallengePlan {
    /// The registry's realm to store: only from a well-formed challenge on a 401 of the
    /// registry's own upstream, with its realm host on `realm_hosts`.
    pub(crate) fn store_realm(&self) -> Option<&LearnedRealm> {
        self.learned.first().filter(|_| self.stores)
    }

    /// Realm URLs the registry issued, for its set of issued realms. Computed on demand:
    /// the glue needs them only when the stored realm changed or from a redirect target.
    pub(crate) fn issued(&self) -> Vec<RealmUrl> {
        let mut issued: Vec<RealmUrl> = Vec::new();
        for u in self
            .learned
            .iter()
            .filter_map(|l| RealmUrl::from_realm(&l.realm))
        {
            if !issued.contains(&u) {
                issued.push(u);
            }
        }
        issued
    }

    /// Realm URLs to add to the registry's issued set. With a realm to store, only when
    /// `store` (which stores it) reports a change: the same realm again adds nothing new,
    /// and skipping spares the shared-data round trips on every 401. Else (a token host's
    /// challenge) all of them.
    pub fn record(&self, store: impl FnOnce(&LearnedRealm) -> bool) -> Vec<RealmUrl> {
        match self.store_realm() {
            Some(l) if !store(l) => Vec::new(),
            _ => self.issued(),
        }
    }
}

/// Plans the rewrite of `values` and what may be learned from them.
///
/// Learned only on a 401: from the registry's own upstream (its realm, stored, and its
/// issued realms), or from a signed redirect target that challenges with a realm on the
/// registry's `realm_hosts` (a token host; its realm is issued too). A challenge on any
/// other answer, a token service's or one that does not parse is rewritten at most.
///
/// When the client's credential is withheld from the registry, only the challenges
/// rewritten to the mirror's Bearer realm are passed on: a Basic one, or a realm of another
/// host, would have the client send the login it keeps for the mirror host (another
/// registry's) on to this one. With none left the header goes: the client sees a 401
/// without a challenge and fails as unauthorized, asked for no credential. No Bearer
/// challenge is invented in its place (the registry named no realm the mirror may route).
pub fn plan_challenges(a: &Answer<'_>, values: Vec<Vec<u8>>) -> ChallengePlan {
    let mut plan = ChallengePlan::default();
    if values.is_empty() {
        return plan;
    }
    let learns = a.status == Some(401) && a.kind != ForwardKind::Auth;
    plan.stores = learns && a.kind == ForwardKind::Registry;
    let unrewritten = if a.withhold_client_credential {
        Unrewritten::Drop
    } else {
        Unrewritten::Keep
    };
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        match String::from_utf8(v) {
            Ok(s) => {
                let r = rewrite_challenges(
                    &s,
                    &a.registry.realm_hosts,
                    a.mirror_base,
                    a.scope_prefix,
                    unrewritten,
                );
                plan.rewritten += r.rewritten;
                plan.rejected += r.rejected;
                plan.dropped += r.dropped;
                if learns {
                    plan.learned.extend(r.realms);
                }
                // A value whose every challenge was dropped goes.
                if !(unrewritten == Unrewritten::Drop && r.value.is_empty()) {
                    out.push(r.value.into_bytes());
                }
            }
            Err(e) => {
                plan.rejected += 1;
                match unrewritten {
                    Unrewritten::Keep => out.push(e.into_bytes()),
                    Unrewritten::Drop => plan.dropped += 1,
                }
            }
        }
    }
    plan.record_token_host = a.kind == ForwardKind::Redirect && !plan.issued().is_empty();
    if plan.rewritten > 0 || plan.dropped > 0 {
        plan.values = Some(out);
    }
    plan
}

/// What to do with an upstream answer's `Location`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedirectPlan {
    /// Not a redirect status, or no `Location`: nothing to do.
    None,
    /// Replace the `Location` with this signed mirror URL.
    Signed(String),
    /// Leave the `Location` as it is (see [`LocationOutcome::Passthrough`]).
    Passthrough,
    /// Refused (not UTF-8, or [`LocationOutcome::Rejected`]): the client gets this reply
    /// instead of the answer. Passed on, the `Location` would take the client, and any
    /// header it sends the mirror (a mirror login in a custom header survives cross-host
    /// redirects), to a host the registry's declaration does not list, or over plain http.
    /// The reply's `message` says why, for the log.
    Refused(Reply),
}

/// What the client reads in the error of a refused redirect.
const REDIRECT_REFUSED: &str = "the upstream redirected to a location this mirror does not allow (only https on the registry's redirect hosts)";

/// The 502 `UNAVAILABLE` of a refused redirect; `why` goes to the log only.
fn refused(why: String) -> RedirectPlan {
    let mut r = error_reply(502, ErrorCode::Unavailable, None, REDIRECT_REFUSED);
    r.message = why;
    RedirectPlan::Refused(r)
}

/// Plans the `Location` of the answer to `fwd`: on a redirect status (301, 302, 303, 307,
/// 308) signed into a mirror URL as [`rewrite_location`] allows, else refused.
/// `key_and_now` (the signing key, unix seconds) is asked only for a redirect.
pub fn plan_redirect(
    cfg: &CompiledConfig,
    fwd: &Forward,
    status: Option<u32>,
    location: Option<&[u8]>,
    key_and_now: impl FnOnce() -> (Vec<u8>, u64),
) -> RedirectPlan {
    if !matches!(status, Some(301 | 302 | 303 | 307 | 308)) {
        return RedirectPlan::None;
    }
    let Some(loc) = location else {
        return RedirectPlan::None;
    };
    let Ok(loc) = std::str::from_utf8(loc) else {
        return refused(format!(
            "redirect from {} with a non-UTF-8 Location refused",
            fwd.authority
        ));
    };
    // cache-service follows its upstreams' redirects itself: the one it answers with is a
    // presigned URL of the mirror's own store (`redirect = true`), meant for the client.
    if fwd.reaches_cache(cfg) {
        return RedirectPlan::Passthrough;
    }
    let (key, now) = key_and_now();
    let params = SignParams {
        registry: &fwd.registry,
        base_host: &fwd.authority,
        base_path: &fwd.path,
        mirror_base: &fwd.mirror_base,
        cred: NO_CREDENTIAL,
        key: &key,
        now,
    };
    match rewrite_location(cfg, &params, loc) {
        LocationOutcome::Signed(u) => RedirectPlan::Signed(u),
        LocationOutcome::Passthrough => RedirectPlan::Passthrough,
        LocationOutcome::Rejected => refused(format!(
            "redirect from {} for {} refused (host not allowed, not https, or no key): {}",
            fwd.authority,
            fwd.registry,
            loc.chars().take(200).collect::<String>()
        )),
    }
}

/// What the glue applies to an answer's `Link` values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkPlan {
    /// Replacement `Link` values (none: remove the header); `None`: leave them alone.
    pub values: Option<Vec<Vec<u8>>>,
    /// Links removed (see [`super::link::RewrittenLinks::dropped`]); a value that is not
    /// UTF-8, or one past [`MAX_HEADER_VALUES`], counts as one.
    pub dropped: usize,
}

/// Plans the `Link` values of the answer to a `/v2/` forward (the next page of a tags or
/// referrers list) with [`rewrite_links`]: the client resolves them against the mirror, so
/// they must name the registry as the client did. Token services and redirect targets
/// send no pages: their answers are left alone.
pub fn plan_link(fwd: &Forward, values: Vec<Vec<u8>>) -> LinkPlan {
    let mut plan = LinkPlan::default();
    if fwd.kind != ForwardKind::Registry || values.is_empty() {
        return plan;
    }
    let view = ClientView {
        mirror_base: &fwd.mirror_base,
        upstream: &fwd.authority,
        upstream_path: &fwd.path,
        path_prefix: fwd.path_prefix.as_deref(),
        ns: fwd.oci_namespace_echo.as_deref(),
    };
    let mut changed = false;
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.into_iter().enumerate() {
        let s = match String::from_utf8(v) {
            Ok(s) if i < MAX_HEADER_VALUES => s,
            _ => {
                plan.dropped += 1;
                changed = true;
                continue;
            }
        };
        let r = rewrite_links(&s, &view);
        plan.dropped += r.dropped;
        changed |= r.rewritten > 0 || r.dropped > 0;
        if !r.value.is_empty() {
            out.push(r.value.into_bytes());
        }
    }
    if changed {
        plan.values = Some(out);
    }
    plan
}

/// A request paused while its registry's realm is learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealmWait {
    /// A token request for the target registry's realm.
    Token(Box<LearnRealm>),
    /// A shared-host `/v2/` ping.
    Ping(Ping),
}

impl RealmWait {
    /// The registry whose realm is learned.
    pub fn registry(&self) -> &str {
        match self {
            RealmWait::Token(lr) => &lr.registry,
            RealmWait::Ping(p) => &p.registry,
        }
    }
}

/// How a paused request goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Forward it upstream after rewriting it.
    Forward(Forward),
    /// Answer it locally.
    Reply(Reply),
}

/// What to do once a realm-learning call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealmCallPlan {
    /// The registry's realm to store (and mark issued): only from a 401 with an
    /// allowlisted Bearer challenge ([`classify_realm_call`]).
    pub store: Option<LearnedRealm>,
    /// The paused request's fate.
    pub resume: Resume,
}

/// Plans the end of a realm-learning call for `wait` (`status`: the call's `:status`,
/// `None` when it failed): a ping gets [`ping_reply`], a token request
/// [`token_after_realm_call`]; a registry gone from the configuration meanwhile, a 502.
pub fn plan_realm_call(
    cfg: &CompiledConfig,
    wait: &RealmWait,
    status: Option<u32>,
    www_authenticate: &[String],
) -> RealmCallPlan {
    let Some(reg) = cfg.registry(wait.registry()) else {
        return RealmCallPlan {
            store: None,
            resume: Resume::Reply(realm_failure(ErrorCode::Unavailable, "registry gone")),
        };
    };
    let call = classify_realm_call(reg, status, www_authenticate);
    let resume = match wait {
        RealmWait::Ping(ping) => {
            let learned = match &call {
                RealmCall::Learned(l) => Some(l),
                _ => None,
            };
            Resume::Reply(ping_reply(ping, learned))
        }
        RealmWait::Token(lr) => match token_after_realm_call(cfg, lr, &call, status) {
            Ok(f) => Resume::Forward(f),
            Err(r) => Resume::Reply(r),
        },
    };
    let store = match call {
        RealmCall::Learned(l) => Some(l),
        RealmCall::Anonymous | RealmCall::Failed(_) => None,
    };
    RealmCallPlan { store, resume }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::parse as parse_config;
    use crate::route::Decision;

    /// The default registries, each also on its own host under `mirror.test`.
    fn host_mode() -> CompiledConfig {
        let mut c = crate::config::default_config();
        c.host_suffix = Some("mirror.test".into());
        crate::config::compile(&c).unwrap()
    }

    const QUAY: &str =
        r#"Bearer realm="https://quay.io/v2/auth",service="quay.io",scope="repository:a/b:pull""#;

    fn plan(
        cfg: &crate::CompiledConfig,
        reg: &str,
        kind: ForwardKind,
        status: u32,
        values: &[&str],
    ) -> ChallengePlan {
        let a = Answer {
            registry: cfg.registry(reg).unwrap(),
            kind,
            status: Some(status),
            mirror_base: "https://m",
            scope_prefix: None,
            withhold_client_credential: false,
        };
        plan_challenges(&a, values.iter().map(|v| v.as_bytes().to_vec()).collect())
    }

    #[test]
    fn only_a_401_of_the_registry_stores_its_realm() {
        let cfg = parse_config(b"").unwrap();
        let quay_realm = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io"));
        let p = plan(&cfg, "quay.io", ForwardKind::Registry, 401, &[QUAY]);
        assert_eq!(p.store_realm().cloned(), quay_realm);
        assert_eq!(p.issued(), [RealmUrl::new("quay.io", "/v2/auth").unwrap()]);
        assert!(!p.record_token_host);
        assert_eq!(p.rewritten, 1);
        let v = String::from_utf8(p.values.unwrap().remove(0)).unwrap();
        assert!(v.contains(r#"realm="https://m/_mirror/auth/quay.io/v2/auth""#));
        // The same challenge on another status, from a token service or a redirect
        // target: rewritten, never stored.
        for (kind, status) in [
            (ForwardKind::Registry, 200),
            (ForwardKind::Registry, 403),
            (ForwardKind::Registry, 404),
            (ForwardKind::Auth, 401),
            (ForwardKind::Redirect, 401),
            (ForwardKind::Redirect, 307),
        ] {
            let p = plan(&cfg, "quay.io", kind, status, &[QUAY]);
            assert_eq!(p.store_realm(), None, "{kind:?} {status}");
            assert_eq!(p.rewritten, 1, "{kind:?} {status}");
        }
        // A hostile challenge: realm not on quay's realm_hosts, or malformed.
        for hostile in [
            r#"Bearer realm="https://evil.example/token",service="quay.io""#,
            r#"Bearer realm="https://quay.io/v2/auth",service="quay.io", ="x"#,
            r#"Bearer realm="http://quay.io@evil.example/x""#,
            r#"Basic realm="https://quay.io/v2/auth""#,
        ] {
            let p = plan(&cfg, "quay.io", ForwardKind::Registry, 401, &[hostile]);
            assert_eq!(p.store_realm(), None, "{hostile}");
            assert!(p.issued().is_empty(), "{hostile}");
            assert_eq!(p.values, None, "{hostile}");
        }
        // Non-UTF-8 values are counted, not rewritten.
        let a = Answer {
            registry: cfg.registry("quay.io").unwrap(),
            kind: ForwardKind::Registry,
            status: Some(401),
            mirror_base: "https://m",
            scope_prefix: None,
            withhold_client_credential: false,
        };
        let p = plan_challenges(&a, vec![vec![0xff], QUAY.as_bytes().to_vec()]);
        assert_eq!((p.rejected, p.rewritten), (1, 1));
        assert_eq!(p.values.as_ref().map(Vec::len), Some(2));
        assert_eq!(p.store_realm().cloned(), quay_realm);
    }

    #[test]
    fn a_redirect_target_challenging_with_the_realm_is_a_token_host() {
        let cfg = parse_config(b"").unwrap();
        let p = plan(&cfg, "quay.io", ForwardKind::Redirect, 401, &[QUAY]);
        assert!(p.record_token_host);
        assert_eq!(p.issued(), [RealmUrl::new("quay.io", "/v2/auth").unwrap()]);
        // registry.k8s.io → Artifact Registry: its own realm on *.pkg.dev is issued.
        let pkg =
            r#"Bearer realm="https://us-docker.pkg.dev/v2/token",service="us-docker.pkg.dev""#;
        let p = plan(&cfg, "registry.k8s.io", ForwardKind::Redirect, 401, &[pkg]);
        assert!(p.record_token_host);
        assert_eq!(
            p.issued(),
            [RealmUrl::new("us-docker.pkg.dev", "/v2/token").unwrap()]
        );
        // Another registry's realm, no Bearer, or not a 401: not a token host.
        let docker = r#"Bearer realm="https://auth.docker.io/token",service="x""#;
        for (values, status) in [
            (&[docker][..], 401),
            (&[r#"Basic realm="https://quay.io/v2/auth""#][..], 401),
            (&[QUAY][..], 403),
            (&[][..], 401),
        ] {
            let p = plan(&cfg, "quay.io", ForwardKind::Redirect, status, values);
            assert!(!p.record_token_host, "{values:?} {status}");
            assert!(p.issued().is_empty());
        }
        // A foreign challenge followed by the registry's own: recorded.
        let p = plan(&cfg, "quay.io", ForwardKind::Redirect, 401, &[docker, QUAY]);
        assert!(p.record_token_host);
    }

    #[test]
    fn issued_realms_are_recorded_when_the_stored_realm_changed_or_from_a_token_host() {
        let cfg = parse_config(b"").unwrap();
        let quay_url = RealmUrl::new("quay.io", "/v2/auth").unwrap();
        let own = plan(&cfg, "quay.io", ForwardKind::Registry, 401, &[QUAY]);
        // The registry's own 401: stored first; issued realms only when that changed.
        let mut stored = Vec::new();
        let changed = own.record(|l| {
            stored.push(l.clone());
            true
        });
        assert_eq!(changed, std::slice::from_ref(&quay_url));
        assert_eq!(
            stored,
            own.store_realm().cloned().into_iter().collect::<Vec<_>>()
        );
        assert_eq!(stored.len(), 1);
        assert!(own.record(|_| false).is_empty());
        // A token host's challenge: nothing to store, every issued realm recorded.
        let target = plan(&cfg, "quay.io", ForwardKind::Redirect, 401, &[QUAY]);
        let unasked = |_: &LearnedRealm| -> bool { panic!("nothing to store") };
        assert_eq!(target.record(unasked), [quay_url]);
        // Nothing learned (another status, a token service): nothing recorded.
        for (kind, status) in [(ForwardKind::Registry, 200), (ForwardKind::Auth, 401)] {
            let p = plan(&cfg, "quay.io", kind, status, &[QUAY]);
            assert!(p.record(unasked).is_empty(), "{kind:?} {status}");
        }
    }

    /// quay.io's answer offering Basic beside its Bearer realm.
    const QUAY_BASIC: &str =
        r#"Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io""#;

    /// The forward of a GET of `path` on `authority`.
    fn routed(cfg: &crate::CompiledConfig, authority: &str, path: &str) -> Forward {
        let req = crate::route::Request {
            method: "GET",
            authority,
            path,
            scheme: "https",
            ..Default::default()
        };
        match crate::route::route(cfg, &req, &[], 0) {
            Decision::Forward(f) => f,
            other => panic!("{path}: {other:?}"),
        }
    }

    /// The plan for a 401 carrying `values` to the request `authority` + `path`, as the glue
    /// builds it from the routed forward.
    fn plan_routed(
        cfg: &crate::CompiledConfig,
        authority: &str,
        path: &str,
        values: &[&str],
    ) -> ChallengePlan {
        let f = routed(cfg, authority, path);
        let a = Answer {
            registry: cfg.registry(&f.registry).unwrap(),
            kind: f.kind,
            status: Some(401),
            mirror_base: &f.mirror_base,
            scope_prefix: f.path_prefix.as_deref(),
            withhold_client_credential: f.withhold_client_credential,
        };
        plan_challenges(&a, values.iter().map(|v| v.as_bytes().to_vec()).collect())
    }

    fn written(p: &ChallengePlan) -> Vec<String> {
        p.values
            .iter()
            .flatten()
            .map(|v| String::from_utf8(v.clone()).unwrap())
            .collect()
    }

    #[test]
    fn a_shared_host_registry_without_the_login_is_offered_only_the_mirrors_bearer_realm() {
        let cfg = parse_config(b"").unwrap();
        let mirror_bearer =
            r#"Bearer realm="https://m/_mirror/auth/quay.io/v2/auth",service="quay.io""#;
        // Basic would make the client send its login for the mirror host (docker.io's) on.
        for path in [
            "/v2/quay.io/org/img/manifests/x",
            "/v2/org/img/manifests/x?ns=quay.io",
        ] {
            let p = plan_routed(&cfg, "m", path, &[QUAY_BASIC]);
            assert_eq!(written(&p), [mirror_bearer], "{path}");
            assert_eq!((p.rewritten, p.dropped), (1, 1));
            assert_eq!(
                p.store_realm().map(|l| l.realm.as_str()),
                Some("https://quay.io/v2/auth")
            );
            // Challenges in separate values; one not UTF-8: only the Bearer one is left.
            let a = Answer {
                registry: cfg.registry("quay.io").unwrap(),
                kind: ForwardKind::Registry,
                status: Some(401),
                mirror_base: "https://m",
                scope_prefix: None,
                withhold_client_credential: true,
            };
            let values = vec![
                br#"Basic realm="quay.io""#.to_vec(),
                vec![0xff],
                br#"Bearer realm="https://quay.io/v2/auth",service="quay.io""#.to_vec(),
            ];
            let p = plan_challenges(&a, values);
            assert_eq!(written(&p), [mirror_bearer]);
            assert_eq!((p.rewritten, p.dropped), (1, 2));
            // No Bearer realm the mirror routes: no challenge at all (the header goes).
            let p = plan_routed(
                &cfg,
                "m",
                path,
                &[r#"Basic realm="quay.io", Bearer realm="https://evil.example/t""#],
            );
            assert_eq!(p.values, Some(Vec::new()), "{path}");
        }
        // The default registry, host mode, a registry the operator opted in: as sent, but
        // for the realm.
        let hub = r#"Basic realm="hub", Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#;
        let p = plan_routed(&cfg, "m", "/v2/library/alpine/manifests/3", &[hub]);
        assert_eq!(
            written(&p),
            [
                r#"Basic realm="hub", Bearer realm="https://m/_mirror/auth/auth.docker.io/token",service="registry.docker.io""#
            ]
        );
        let as_today = r#"Basic realm="quay.io", Bearer realm="https://m/_mirror/auth/quay.io/v2/auth",service="quay.io""#;
        let hosts = host_mode();
        let p = plan_routed(
            &hosts,
            "quay.mirror.test",
            "/v2/org/img/manifests/x",
            &[QUAY_BASIC],
        );
        assert_eq!(
            written(&p),
            [as_today.replace("https://m/", "https://quay.mirror.test/")]
        );
        let mut c = crate::config::default_config();
        for r in &mut c.registries {
            r.forward_client_credentials = Some(r.name == "quay.io");
        }
        let opted = crate::config::compile(&c).unwrap();
        let p = plan_routed(
            &opted,
            "m",
            "/v2/quay.io/org/img/manifests/x",
            &[QUAY_BASIC],
        );
        assert_eq!(written(&p), [as_today]);
    }

    fn forward_to(registry: &str, authority: &str, path: &str) -> Forward {
        Forward {
            kind: ForwardKind::Registry,
            registry: registry.into(),
            authority: authority.into(),
            path: path.into(),
            oci_namespace_echo: None,
            strip_authorization: false,
            withhold_client_credential: false,
            mirror_base: "https://m".into(),
            path_prefix: None,
            cache_key: None,
        }
    }

    /// A Docker Hub blob GET, the request Docker Hub answers with a 307 to its CDN.
    fn hub_blob() -> Forward {
        forward_to(
            "docker.io",
            "registry-1.docker.io",
            "/v2/library/a/blobs/sha256:ab",
        )
    }

    #[test]
    fn only_a_redirect_status_with_a_location_is_signed() {
        let cfg = parse_config(b"").unwrap();
        let f = hub_blob();
        let cdn = b"https://production.cloudflare.docker.com/x?verify=1".as_slice();
        let key = || (vec![7u8; 32], 1_800_000_000);
        for status in [301, 302, 303, 307, 308] {
            match plan_redirect(&cfg, &f, Some(status), Some(cdn), key) {
                RedirectPlan::Signed(u) => {
                    assert!(u.starts_with("https://m/_mirror/redirect/"), "{u}");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        // Not a redirect, or no Location: nothing to do, the key not even read.
        let unread = || -> (Vec<u8>, u64) { panic!("key read") };
        for status in [None, Some(200), Some(304), Some(300), Some(401)] {
            assert_eq!(
                plan_redirect(&cfg, &f, status, Some(cdn), unread),
                RedirectPlan::None
            );
        }
        assert_eq!(
            plan_redirect(&cfg, &f, Some(307), None, unread),
            RedirectPlan::None
        );
        // A registry that asks for pass-through.
        let pass = parse_config(
            br#"{"registries":[{"name":"docker.io","upstream":"registry-1.docker.io","redirects":"passthrough"}]}"#,
        )
        .unwrap();
        let p = plan_redirect(&pass, &f, Some(307), Some(cdn), key);
        assert_eq!(p, RedirectPlan::Passthrough);
    }

    /// A refused redirect answers the client itself: the 502 `UNAVAILABLE` the filter always
    /// sent, with the headers of every other local answer, the reason only in the log.
    #[test]
    fn a_refused_redirect_is_a_502_unavailable_with_the_registry_headers() {
        let cfg = parse_config(b"").unwrap();
        let f = hub_blob();
        let key = || (vec![7u8; 32], 1);
        let cdn = b"https://production.cloudflare.docker.com/x".as_slice();
        // Not UTF-8 (the key not even read); a host the policy refuses, plain http, or no
        // usable key.
        let refusals = [
            plan_redirect(&cfg, &f, Some(307), Some(&[0xff, b'/']), || {
                panic!("key read")
            }),
            plan_redirect(
                &cfg,
                &f,
                Some(307),
                Some(b"https://evil.example/x".as_slice()),
                key,
            ),
            plan_redirect(
                &cfg,
                &f,
                Some(307),
                Some(b"http://production.cloudflare.docker.com/x".as_slice()),
                key,
            ),
            plan_redirect(&cfg, &f, Some(307), Some(cdn), || (Vec::new(), 1)),
        ];
        let headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            (
                "docker-distribution-api-version".to_owned(),
                "registry/2.0".to_owned(),
            ),
        ];
        for p in refusals {
            let RedirectPlan::Refused(r) = p else {
                panic!("not refused: {p:?}");
            };
            assert_eq!(r.status, 502);
            let e = crate::oci_error::parse_first(r.body.as_bytes()).unwrap();
            assert_eq!(e.code, "UNAVAILABLE");
            assert!(e.message.contains("does not allow"), "{}", e.message);
            assert_eq!(r.headers, headers);
            assert_eq!(r.reason, None);
            assert!(r.message.starts_with("redirect from registry-1.docker.io"));
        }
    }

    #[test]
    fn a_store_url_from_cache_service_reaches_the_client_unchanged() {
        let cfg =
            parse_config(br#"{"registries":[{"name":"gcr.io","upstream":"gcr.io","cache":true}]}"#)
                .unwrap();
        let f = forward_to("gcr.io", "gcr.io", "/v2/a/blobs/sha256:ab");
        assert!(f.reaches_cache(&cfg));
        let store = b"https://s3.example/bucket/blobs/sha256/ab?X-Amz-Signature=1".as_slice();
        let unread = || -> (Vec<u8>, u64) { panic!("key read") };
        assert_eq!(
            plan_redirect(&cfg, &f, Some(307), Some(store), unread),
            RedirectPlan::Passthrough
        );
    }

    /// The `Link` plan for `values` in the answer to `authority` + `path`.
    fn links_routed(
        cfg: &crate::CompiledConfig,
        authority: &str,
        path: &str,
        values: &[&str],
    ) -> LinkPlan {
        let f = routed(cfg, authority, path);
        plan_link(&f, values.iter().map(|v| v.as_bytes().to_vec()).collect())
    }

    fn link_values(p: &LinkPlan) -> Option<Vec<String>> {
        p.values.as_ref().map(|vs| {
            vs.iter()
                .map(|v| String::from_utf8(v.clone()).unwrap())
                .collect()
        })
    }

    #[test]
    fn a_next_page_link_names_the_registry_the_client_asked() {
        let cfg = parse_config(b"").unwrap();
        let next = r#"</v2/org/img/tags/list?last=x&n=50>; rel="next""#;
        // Path prefix: the prefix goes back in front of the name.
        let p = links_routed(&cfg, "m", "/v2/quay.io/org/img/tags/list?n=50", &[next]);
        assert_eq!(
            link_values(&p),
            Some(vec![
                r#"</v2/quay.io/org/img/tags/list?last=x&n=50>; rel="next""#.into()
            ])
        );
        // ns: the client's ns goes back into the query.
        let p = links_routed(&cfg, "m", "/v2/org/img/tags/list?n=50&ns=quay.io", &[next]);
        assert_eq!(
            link_values(&p),
            Some(vec![
                r#"</v2/org/img/tags/list?last=x&n=50&ns=quay.io>; rel="next""#.into()
            ])
        );
        // An absolute link to the upstream: onto the mirror; to any other host: dropped.
        let abs = r#"<https://quay.io/v2/org/img/tags/list?last=x&n=50>; rel="next""#;
        let p = links_routed(&cfg, "m", "/v2/quay.io/org/img/tags/list?n=50", &[abs]);
        assert_eq!(
            link_values(&p),
            Some(vec![
                r#"<https://m/v2/quay.io/org/img/tags/list?last=x&n=50>; rel="next""#.into()
            ])
        );
        let evil = r#"<https://evil.example/v2/org/img/tags/list?last=x>; rel="next""#;
        let p = links_routed(&cfg, "m", "/v2/quay.io/org/img/tags/list", &[evil]);
        assert_eq!((link_values(&p), p.dropped), (Some(Vec::new()), 1));
        // Host mode: the upstream's own relative link is already right.
        let hosts = host_mode();
        let p = links_routed(
            &hosts,
            "quay.mirror.test",
            "/v2/org/img/tags/list?n=50",
            &[next],
        );
        assert_eq!(p, LinkPlan::default());
        // Garbage: dropped, not passed on.
        let p = links_routed(
            &cfg,
            "m",
            "/v2/quay.io/org/img/tags/list",
            &["</v2/org/img/tags/list?last=x; rel=next"],
        );
        assert_eq!((link_values(&p), p.dropped), (Some(Vec::new()), 1));
        // Several values: each mapped, the ones left kept; a non-UTF-8 one dropped.
        let f = routed(&cfg, "m", "/v2/quay.io/org/img/tags/list");
        let values = vec![
            next.into(),
            vec![0xff],
            evil.into(),
            "</v2/a/tags/list>".into(),
        ];
        let p = plan_link(&f, values);
        assert_eq!(
            link_values(&p),
            Some(vec![
                r#"</v2/quay.io/org/img/tags/list?last=x&n=50>; rel="next""#.into(),
                "</v2/quay.io/a/tags/list>".into()
            ])
        );
        assert_eq!(p.dropped, 2);
        // A token service's answer is no page of the registry: left alone.
        let token = Forward {
            kind: ForwardKind::Auth,
            ..f
        };
        assert_eq!(plan_link(&token, vec![evil.into()]), LinkPlan::default());
    }

    fn token_wait(cfg: &crate::CompiledConfig, expect: Option<RealmUrl>) -> RealmWait {
        let reg = cfg.registry("quay.io").unwrap();
        RealmWait::Token(Box::new(LearnRealm {
            registry: reg.name.clone(),
            cluster: reg.cluster.clone(),
            upstream: reg.upstream.clone(),
            query: Some("scope=repository:a/b:pull".into()),
            mirror_base: "https://m".into(),
            expect,
            strip_authorization: true,
        }))
    }

    #[test]
    fn a_realm_call_stores_only_a_learned_realm_and_resumes_the_paused_request() {
        let cfg = parse_config(b"").unwrap();
        let quay_realm = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io"));
        let challenge = [QUAY.to_string()];
        // A token request: forwarded to the learned realm, which is stored.
        let p = plan_realm_call(&cfg, &token_wait(&cfg, None), Some(401), &challenge);
        assert_eq!(p.store, quay_realm);
        match p.resume {
            Resume::Forward(f) => {
                assert_eq!(
                    (f.kind, f.authority.as_str()),
                    (ForwardKind::Auth, "quay.io")
                );
                assert!(f.strip_authorization);
            }
            other => panic!("{other:?}"),
        }
        // Anonymous (2xx): placeholder token; no answer, another status or a challenge off
        // realm_hosts: 502. Nothing stored.
        let evil = [r#"Bearer realm="https://evil.example/t""#.to_string()];
        for (status, values, want) in [
            (Some(200), &[][..], 200),
            (None, &[][..], 502),
            (Some(503), &challenge[..], 502),
            (Some(401), &evil[..], 502),
            (Some(401), &[][..], 502),
        ] {
            let p = plan_realm_call(&cfg, &token_wait(&cfg, None), status, values);
            assert_eq!(p.store, None, "{status:?}");
            match p.resume {
                Resume::Reply(r) => assert_eq!(r.status, want, "{status:?}"),
                other => panic!("{status:?}: {other:?}"),
            }
        }
        // A realm URL the client asked: a learned realm that differs is stored, the
        // request refused.
        let other = RealmUrl::new("quay.io", "/other");
        let p = plan_realm_call(&cfg, &token_wait(&cfg, other), Some(401), &challenge);
        assert_eq!(p.store, quay_realm);
        assert!(
            matches!(p.resume, Resume::Reply(ref r) if r.status == 403),
            "{p:?}"
        );
        // A ping: 401 with the learned challenge, else an anonymous 200.
        let reg = cfg.registry("quay.io").unwrap();
        let ping = RealmWait::Ping(Ping {
            registry: reg.name.clone(),
            cluster: reg.cluster.clone(),
            upstream: reg.upstream.clone(),
            mirror_base: "https://m".into(),
        });
        let p = plan_realm_call(&cfg, &ping, Some(401), &challenge);
        assert_eq!(p.store, quay_realm);
        assert!(
            matches!(p.resume, Resume::Reply(ref r) if r.status == 401),
            "{p:?}"
        );
        let p = plan_realm_call(&cfg, &ping, None, &[]);
        assert_eq!(p.store, None);
        assert!(
            matches!(p.resume, Resume::Reply(ref r) if r.status == 200),
            "{p:?}"
        );
        // The registry left the configuration while the call ran: 502, nothing stored.
        let gone = parse_config(
            br#"{"registries":[{"name":"docker.io","upstream":"registry-1.docker.io"}]}"#,
        )
        .unwrap();
        for wait in [token_wait(&cfg, None), ping] {
            let p = plan_realm_call(&gone, &wait, Some(401), &challenge);
            assert_eq!(p.store, None);
            assert!(
                matches!(p.resume, Resume::Reply(ref r) if r.status == 502),
                "{p:?}"
            );
        }
    }
}
