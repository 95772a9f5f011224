//! Response phase: what to do with an upstream's `WWW-Authenticate` values, decided here
//! and applied by the glue (rewrite the headers, store the realm, record issued realms
//! and token hosts).

use super::challenge::rewrite_challenges;
use super::config::Registry;
use super::realms::RealmUrl;
use super::route::ForwardKind;
use super::token::LearnedRealm;

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
}

/// What the glue applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChallengePlan {
    /// Replacement `WWW-Authenticate` values; `None`: leave the headers alone.
    pub values: Option<Vec<Vec<u8>>>,
    /// Bearer realms rewritten to the mirror.
    pub rewritten: usize,
    /// Realms left alone, or values that did not parse.
    pub rejected: usize,
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
    pub fn store_realm(&self) -> Option<&LearnedRealm> {
        self.learned.first().filter(|_| self.stores)
    }

    /// Realm URLs the registry issued, for its set of issued realms. Computed on demand:
    /// the glue needs them only when the stored realm changed or from a redirect target.
    pub fn issued(&self) -> Vec<RealmUrl> {
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
}

/// Plans the rewrite of `values` and what may be learned from them.
///
/// Learned only on a 401: from the registry's own upstream (its realm, stored, and its
/// issued realms), or from a signed redirect target that challenges with a realm on the
/// registry's `realm_hosts` (a token host; its realm is issued too). A challenge on any
/// other answer, a token service's or one that does not parse is rewritten at most.
pub fn plan_challenges(a: &Answer<'_>, values: Vec<Vec<u8>>) -> ChallengePlan {
    let mut plan = ChallengePlan::default();
    if values.is_empty() {
        return plan;
    }
    let learns = a.status == Some(401) && a.kind != ForwardKind::Auth;
    plan.stores = learns && a.kind == ForwardKind::Registry;
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        match String::from_utf8(v) {
            Ok(s) => {
                let r =
                    rewrite_challenges(&s, &a.registry.realm_hosts, a.mirror_base, a.scope_prefix);
                plan.rewritten += r.rewritten;
                plan.rejected += r.rejected;
                if learns {
                    plan.learned.extend(r.realms);
                }
                out.push(r.value.into_bytes());
            }
            Err(e) => {
                plan.rejected += 1;
                out.push(e.into_bytes());
            }
        }
    }
    plan.record_token_host = a.kind == ForwardKind::Redirect && !plan.issued().is_empty();
    if plan.rewritten > 0 {
        plan.values = Some(out);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse as parse_config;

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
}
