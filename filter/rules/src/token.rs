//! Token requests (`/_mirror/auth/…`): scope translation between the client's namespace
//! and the upstream's, target-registry selection, and learned realms.
//!
//! In path-prefix mode the client sees `<registry>/<name>`; it asks whatever realm it
//! learned (often the default registry's, from its `/v2/` ping) for
//! `repository:<registry>/<name>:<actions>`. The rules here strip the prefix, add
//! `library/` where the registry wants it, and decide which registry the token is for.

use super::challenge::{self, LearnedRealm};
use super::config::{CompiledConfig, Registry};
use super::names::RepositoryName;
use super::url::{decode_query_value, encode_query_value};
use std::fmt;

/// Most scopes accepted in one token request (all `scope` parameters together).
pub const MAX_SCOPES: usize = 16;
/// Longest single scope accepted (decoded).
pub const MAX_SCOPE_LEN: usize = 512;
/// Shared-data key prefix of learned realms: `mirror.realm.<registry name>`.
pub const REALM_SHARED_DATA_PREFIX: &str = "mirror.realm.";

/// Shared-data key holding the learned realm of `registry`.
pub fn realm_key(registry: &str) -> String {
    format!("{REALM_SHARED_DATA_PREFIX}{registry}")
}

/// Why a token request's query was refused (all 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeError {
    /// More than [`MAX_SCOPES`] scopes.
    TooMany,
    /// A scope longer than [`MAX_SCOPE_LEN`].
    TooLong,
    /// Bad percent-encoding or not UTF-8.
    BadEncoding,
    /// A repository scope without a valid name or actions.
    NameInvalid,
}

impl ScopeError {
    /// Message for the client and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeError::TooMany => "too many scopes in token request",
            ScopeError::TooLong => "scope too long in token request",
            ScopeError::BadEncoding => "invalid encoding in token request scope",
            ScopeError::NameInvalid => "invalid repository name in token request scope",
        }
    }
}

impl fmt::Display for ScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `repository:<name>:<actions>` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryScope<'a> {
    /// The name as sent (client namespace).
    pub name: &'a str,
    /// The actions, e.g. `pull` or `pull,push`.
    pub actions: &'a str,
}

/// Parses a scope of type exactly `repository`: type up to the first `:`, actions after
/// the last `:` (so a prefix with a port, `localhost:5000/x`, stays in the name).
/// `None`: another resource type. `Some(Err)`: a malformed repository scope.
pub fn parse_repository_scope(scope: &str) -> Option<Result<RepositoryScope<'_>, ScopeError>> {
    let rest = scope.strip_prefix("repository:")?;
    let Some((name, actions)) = rest.rsplit_once(':') else {
        return Some(Err(ScopeError::NameInvalid));
    };
    let actions_ok = !actions.is_empty()
        && actions.len() <= 64
        && actions
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"*,_-".contains(&b));
    if name.is_empty() || !actions_ok {
        return Some(Err(ScopeError::NameInvalid));
    }
    Some(Ok(RepositoryScope { name, actions }))
}

/// Registry selection for a client-side repository name, as for `/v2/` path prefixes:
/// a first component that contains `.` or `:` and is a registry name or alias selects
/// that registry and is stripped. Returns the explicitly named registry (if any) and the
/// rest of the name.
pub fn split_registry_prefix<'c, 'n>(
    cfg: &'c CompiledConfig,
    name: &'n str,
) -> (Option<&'c Registry>, &'n str) {
    if let Some((first, rest)) = name.split_once('/') {
        if first.contains(['.', ':']) {
            if let Some(r) = cfg.registry(first) {
                return (Some(r), rest);
            }
        }
    } else if name.contains(['.', ':']) {
        // The whole name is a registry: nothing left (refused by the caller).
        if let Some(r) = cfg.registry(name) {
            return (Some(r), "");
        }
    }
    (None, name)
}

/// The upstream name for a name in `registry`'s namespace: `library/` added to
/// one-component names where `library_namespace`; validated.
pub fn upstream_name(registry: &Registry, name: &str) -> Result<RepositoryName, ScopeError> {
    if name.is_empty() {
        return Err(ScopeError::NameInvalid);
    }
    let full = if registry.library_namespace && !name.contains('/') {
        format!("library/{name}")
    } else {
        name.to_string()
    };
    RepositoryName::parse(&full).map_err(|_| ScopeError::NameInvalid)
}

/// The outcome of [`plan`]: who the token is for and the query to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPlan<'c> {
    /// The registry the token is for.
    pub target: &'c Registry,
    /// The query with scopes in the target's namespace; other parameters byte for byte.
    pub query: Option<String>,
    /// Scopes dropped because they named another registry.
    pub dropped: usize,
}

struct ParsedScope<'a> {
    text: String,
    /// `Some((registry, upstream name))` for repository scopes; `None` for other types.
    repo: Option<(&'a Registry, String, String)>,
}

/// Plans a token request: parses the `scope` parameters of `query`, selects the target
/// registry (the first explicitly prefixed scope's, else `realm_registry`), and rewrites
/// the scopes into the target's namespace. Scopes of other registries are dropped;
/// non-repository scopes are kept only when the target is `realm_registry`. With
/// `prefixes = false` (host mode: the client's names are the registry's own) no prefix
/// is interpreted.
pub fn plan<'c>(
    cfg: &'c CompiledConfig,
    realm_registry: &'c Registry,
    prefixes: bool,
    query: Option<&str>,
) -> Result<TokenPlan<'c>, ScopeError> {
    let Some(query) = query else {
        return Ok(TokenPlan {
            target: realm_registry,
            query: None,
            dropped: 0,
        });
    };
    // Pass 1: parse every scope parameter.
    let mut count = 0usize;
    let mut params: Vec<(&str, Option<Vec<ParsedScope<'c>>>)> = Vec::new();
    let mut target: Option<&'c Registry> = None;
    for seg in query.split('&') {
        let Some(raw) = seg.strip_prefix("scope=") else {
            params.push((seg, None));
            continue;
        };
        let decoded = decode_query_value(raw).ok_or(ScopeError::BadEncoding)?;
        let mut scopes = Vec::new();
        for s in decoded.split(' ').filter(|s| !s.is_empty()) {
            count += 1;
            if count > MAX_SCOPES {
                return Err(ScopeError::TooMany);
            }
            if s.len() > MAX_SCOPE_LEN {
                return Err(ScopeError::TooLong);
            }
            if s.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
                return Err(ScopeError::BadEncoding);
            }
            let repo = match parse_repository_scope(s) {
                None => None,
                Some(r) => {
                    let r = r?;
                    let (explicit, rest) = if prefixes {
                        split_registry_prefix(cfg, r.name)
                    } else {
                        (None, r.name)
                    };
                    if let (Some(e), None) = (explicit, target) {
                        target = Some(e);
                    }
                    let owner = explicit.unwrap_or(realm_registry);
                    let name = upstream_name(owner, rest)?;
                    Some((owner, name.to_string(), r.actions.to_string()))
                }
            };
            scopes.push(ParsedScope {
                text: s.to_string(),
                repo,
            });
        }
        params.push((raw, Some(scopes)));
    }
    let target = target.unwrap_or(realm_registry);
    let same_as_realm = target.name == realm_registry.name;

    // Pass 2: rewrite.
    let mut dropped = 0usize;
    let mut out: Vec<String> = Vec::with_capacity(params.len());
    for (raw, scopes) in params {
        let Some(scopes) = scopes else {
            out.push(raw.to_string());
            continue;
        };
        let mut kept: Vec<String> = Vec::with_capacity(scopes.len());
        let mut changed = false;
        for s in scopes {
            match s.repo {
                Some((owner, name, actions)) => {
                    if owner.name != target.name {
                        dropped += 1;
                        changed = true;
                        continue;
                    }
                    let t = format!("repository:{name}:{actions}");
                    changed |= t != s.text;
                    kept.push(t);
                }
                None => {
                    if same_as_realm {
                        kept.push(s.text);
                    } else {
                        dropped += 1;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            out.push(format!("scope={raw}"));
        } else if !kept.is_empty() {
            let encode_delims = raw.contains('%');
            out.push(format!(
                "scope={}",
                encode_query_value(&kept.join(" "), encode_delims)
            ));
        }
    }
    let query = if out.is_empty() {
        None
    } else {
        Some(out.join("&"))
    };
    Ok(TokenPlan {
        target,
        query,
        dropped,
    })
}

/// Replaces every `service` parameter of `query` with one `service=<service>` (at the
/// first one's place, else appended); an empty `service` removes them.
pub fn replace_service(query: Option<&str>, service: &str) -> Option<String> {
    let new = if service.is_empty() {
        None
    } else {
        Some(format!("service={}", encode_query_value(service, true)))
    };
    let mut out: Vec<String> = Vec::new();
    let mut placed = false;
    for seg in query.into_iter().flat_map(|q| q.split('&')) {
        let key = seg.split('=').next().unwrap_or_default();
        if key == "service" {
            if let (false, Some(n)) = (placed, &new) {
                out.push(n.clone());
            }
            placed = true;
        } else {
            out.push(seg.to_string());
        }
    }
    if let (false, Some(n)) = (placed, new) {
        out.push(n);
    }
    if out.is_empty() {
        None
    } else {
        Some(out.join("&"))
    }
}

/// Why a realm could not be learned from a registry's `/v2/` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LearnError {
    /// No Bearer challenge with a usable realm.
    NoChallenge,
    /// The realm host is not on the registry's `realm_hosts`.
    NotAllowlisted(String),
}

/// Learns `registry`'s realm from the `WWW-Authenticate` values of its `/v2/` answer:
/// the first Bearer challenge whose realm host is allowlisted wins.
pub fn learn_realm(
    registry: &Registry,
    www_authenticate: &[String],
) -> Result<LearnedRealm, LearnError> {
    let mut refused: Option<String> = None;
    let challenges = challenge::parse_all(www_authenticate.iter().map(String::as_str));
    for c in challenges.iter().filter(|c| c.is("bearer")) {
        let Some(realm) = c.param("realm") else {
            continue;
        };
        let Some(l) = LearnedRealm::new(realm, c.param("service")) else {
            continue;
        };
        if l.allowed_for(registry) {
            return Ok(l);
        }
        if refused.is_none() {
            refused = l.url().map(|u| u.authority);
        }
    }
    Err(refused.map_or(LearnError::NoChallenge, LearnError::NotAllowlisted))
}

/// What a realm-learning `GET /v2/` call to a registry's own upstream answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealmCall {
    /// A 401 with a well-formed Bearer challenge naming a realm on `realm_hosts`.
    Learned(LearnedRealm),
    /// 2xx: an anonymous registry, nothing to learn.
    Anonymous,
    /// Anything else (no answer, another status, no usable challenge).
    Failed(LearnError),
}

/// Classifies the answer of a realm-learning call: a realm is learned only from a 401.
pub fn classify_realm_call(
    registry: &Registry,
    status: Option<u32>,
    www_authenticate: &[String],
) -> RealmCall {
    match status {
        Some(401) => match learn_realm(registry, www_authenticate) {
            Ok(l) => RealmCall::Learned(l),
            Err(e) => RealmCall::Failed(e),
        },
        Some(200..=299) => RealmCall::Anonymous,
        _ => RealmCall::Failed(LearnError::NoChallenge),
    }
}

/// `:authority` and `:path` for a token request sent to a learned realm: the realm's
/// path and query, then `query` with `service` set to the learned service.
pub fn learned_target(learned: &LearnedRealm, query: Option<&str>) -> Option<(String, String)> {
    let u = learned.url()?;
    let query = replace_service(query, &learned.service);
    let path = if u.path.is_empty() {
        "/".to_string()
    } else {
        u.path
    };
    let q: Vec<String> = u.query.into_iter().chain(query).collect();
    let path = if q.is_empty() {
        path
    } else {
        format!("{path}?{}", q.join("&"))
    };
    Some((u.authority, path))
}

/// Local answer to a token request for a registry that needs no upstream token: a cached
/// one (cache-service authenticates upstream itself and ignores the client's
/// `Authorization`) or one whose `/v2/` answers 2xx without a challenge (anonymous).
/// The client only needs something to present.
pub const PLACEHOLDER_TOKEN_BODY: &str = r#"{"token":"mirror-no-upstream-token","access_token":"mirror-no-upstream-token","expires_in":300}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse as parse_config;

    fn cfg() -> CompiledConfig {
        parse_config(b"").unwrap()
    }

    fn plan_q<'c>(
        c: &'c CompiledConfig,
        realm: &str,
        q: &str,
    ) -> Result<TokenPlan<'c>, ScopeError> {
        plan(c, c.registry(realm).unwrap(), true, Some(q))
    }

    #[test]
    fn repository_scopes() {
        let r = parse_repository_scope("repository:localhost:5000/a/b:pull")
            .unwrap()
            .unwrap();
        assert_eq!((r.name, r.actions), ("localhost:5000/a/b", "pull"));
        assert!(parse_repository_scope("registry:catalog:*").is_none());
        assert!(parse_repository_scope("repository(plugin):a:pull").is_none());
        for bad in [
            "repository:",
            "repository:a",
            "repository::pull",
            "repository:a:",
            "repository:a:pu ll",
            "repository:a:pull;x",
        ] {
            assert_eq!(
                parse_repository_scope(bad),
                Some(Err(ScopeError::NameInvalid)),
                "{bad}"
            );
        }
    }

    #[test]
    fn path_prefixed_scopes_select_the_target() {
        let c = cfg();
        // The skopeo case: realm learned at ping time is docker.io's.
        let p = plan_q(
            &c,
            "docker.io",
            "account=x&scope=repository%3Aquay.io%2Fcoreos%2Fetcd%3Apull&service=registry.docker.io",
        )
        .unwrap();
        assert_eq!(p.target.name, "quay.io");
        assert_eq!(
            p.query.as_deref(),
            Some("account=x&scope=repository%3Acoreos%2Fetcd%3Apull&service=registry.docker.io")
        );
        // docker.io prefix: stripped, library/ added.
        let p = plan_q(
            &c,
            "docker.io",
            "scope=repository:docker.io/alpine:pull&service=registry.docker.io",
        )
        .unwrap();
        assert_eq!(p.target.name, "docker.io");
        assert_eq!(
            p.query.as_deref(),
            Some("scope=repository:library/alpine:pull&service=registry.docker.io")
        );
        // Aliases, unprefixed library names, other params byte for byte.
        let p = plan_q(
            &c,
            "docker.io",
            "a=%20b&&scope=repository:index.docker.io/library/x:pull&scope=repository:y:pull,push",
        )
        .unwrap();
        assert_eq!(p.target.name, "docker.io");
        assert_eq!(
            p.query.as_deref(),
            Some("a=%20b&&scope=repository:library/x:pull&scope=repository:library/y:pull,push")
        );
        // Unchanged scopes keep their bytes.
        let p = plan_q(
            &c,
            "docker.io",
            "scope=repository%3alibrary%2fa%3apull&service=s",
        )
        .unwrap();
        assert_eq!(
            p.query.as_deref(),
            Some("scope=repository%3alibrary%2fa%3apull&service=s")
        );
        // Unprefixed scopes of another registry's realm are that realm's.
        let p = plan_q(&c, "quay.io", "scope=repository:coreos/etcd:pull").unwrap();
        assert_eq!(p.target.name, "quay.io");
        assert_eq!(
            p.query.as_deref(),
            Some("scope=repository:coreos/etcd:pull")
        );
        // A host-like first component that is no registry stays in the name.
        let p = plan_q(&c, "quay.io", "scope=repository:evil.example/x:pull").unwrap();
        assert_eq!(p.target.name, "quay.io");
        assert_eq!(
            p.query.as_deref(),
            Some("scope=repository:evil.example/x:pull")
        );
        // No query, no scope.
        let p = plan(&c, c.registry("quay.io").unwrap(), true, None).unwrap();
        assert_eq!((p.target.name.as_str(), p.query), ("quay.io", None));
        let p = plan_q(&c, "quay.io", "service=quay.io").unwrap();
        assert_eq!(p.query.as_deref(), Some("service=quay.io"));
    }

    #[test]
    fn scopes_of_other_registries_are_dropped() {
        let c = cfg();
        // First explicit prefix wins; docker.io's scope and the catalog scope are dropped.
        let p = plan_q(
            &c,
            "docker.io",
            "scope=repository:library/a:pull&scope=repository:quay.io/c/e:pull&scope=repository:docker.io/b:pull&scope=registry:catalog:*&service=x",
        )
        .unwrap();
        assert_eq!(p.target.name, "quay.io");
        assert_eq!(p.dropped, 3);
        assert_eq!(
            p.query.as_deref(),
            Some("scope=repository:c/e:pull&service=x")
        );
        // Non-repository scopes stay when the target is the realm's registry.
        let p = plan_q(
            &c,
            "docker.io",
            "scope=registry:catalog:*&scope=repository:docker.io/a:pull",
        )
        .unwrap();
        assert_eq!(
            p.query.as_deref(),
            Some("scope=registry:catalog:*&scope=repository:library/a:pull")
        );
        // Space-separated scopes in one parameter (OAuth2 style).
        let p = plan_q(
            &c,
            "docker.io",
            "scope=repository:quay.io/a/b:pull+repository:ghcr.io/c/d:pull+repository:quay.io/e/f:push",
        )
        .unwrap();
        assert_eq!(p.target.name, "quay.io");
        assert_eq!(
            p.query.as_deref(),
            Some("scope=repository:a/b:pull%20repository:e/f:push")
        );
    }

    #[test]
    fn host_mode_interprets_no_prefix() {
        let c = cfg();
        let p = plan(
            &c,
            c.registry("docker.io").unwrap(),
            false,
            Some("scope=repository:quay.io/x:pull&scope=repository:alpine:pull"),
        )
        .unwrap();
        assert_eq!(p.target.name, "docker.io");
        assert_eq!(
            p.query.as_deref(),
            Some("scope=repository:quay.io/x:pull&scope=repository:library/alpine:pull")
        );
    }

    #[test]
    fn hostile_scopes() {
        let c = cfg();
        let many: Vec<String> = (0..17)
            .map(|i| format!("scope=repository:a{i}:pull"))
            .collect();
        assert_eq!(
            plan_q(&c, "docker.io", &many.join("&")),
            Err(ScopeError::TooMany)
        );
        let ok: Vec<String> = (0..16)
            .map(|i| format!("scope=repository:a{i}:pull"))
            .collect();
        assert!(plan_q(&c, "docker.io", &ok.join("&")).is_ok());
        let spaced = vec!["repository:a:pull"; 17].join("%20");
        assert_eq!(
            plan_q(&c, "docker.io", &format!("scope={spaced}")),
            Err(ScopeError::TooMany)
        );
        let huge = format!("scope=repository:{}:pull", "a/".repeat(400));
        assert_eq!(plan_q(&c, "docker.io", &huge), Err(ScopeError::TooLong));
        let long_name = format!("scope=repository:{}:pull", "a".repeat(300));
        assert_eq!(
            plan_q(&c, "docker.io", &long_name),
            Err(ScopeError::NameInvalid)
        );
        for bad in [
            "scope=repository%3",
            "scope=%zz",
            "scope=%ff",
            "scope=repository:a%0A:pull",
            "scope=repository:a%00b:pull",
        ] {
            assert_eq!(
                plan_q(&c, "docker.io", bad),
                Err(ScopeError::BadEncoding),
                "{bad}"
            );
        }
        for bad in [
            "scope=repository::pull",
            "scope=repository:quay.io:pull",
            "scope=repository:quay.io/:pull",
            "scope=repository:Alpine:pull",
            "scope=repository:a/../b:pull",
            "scope=repository:a//b:pull",
            "scope=repository:a%2F%2E%2E%2Fb:pull",
            "scope=repository:a",
            "scope=repository:a:pull%26x%3Dy",
        ] {
            assert_eq!(
                plan_q(&c, "docker.io", bad),
                Err(ScopeError::NameInvalid),
                "{bad}"
            );
        }
        // Empty scope parameters are dropped harmlessly.
        let p = plan_q(&c, "docker.io", "scope=&scope=+").unwrap();
        assert_eq!(p.query.as_deref(), Some("scope=&scope=+"));
    }

    #[test]
    fn service_replacement() {
        assert_eq!(
            replace_service(
                Some("a=1&service=registry.docker.io&scope=x&service=y"),
                "quay.io"
            )
            .as_deref(),
            Some("a=1&service=quay.io&scope=x")
        );
        assert_eq!(
            replace_service(Some("scope=x"), "quay.io").as_deref(),
            Some("scope=x&service=quay.io")
        );
        assert_eq!(replace_service(None, "s").as_deref(), Some("service=s"));
        assert_eq!(replace_service(Some("service=a"), ""), None);
        assert_eq!(
            replace_service(Some("servicex=a"), "a b").as_deref(),
            Some("servicex=a&service=a%20b")
        );
    }

    #[test]
    fn realm_keys() {
        assert_eq!(realm_key("quay.io"), "mirror.realm.quay.io");
    }

    #[test]
    fn learning_from_challenges() {
        let c = cfg();
        let quay = c.registry("quay.io").unwrap();
        let l = learn_realm(
            quay,
            &[
                r#"Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io""#
                    .to_string(),
            ],
        )
        .unwrap();
        assert_eq!(
            (l.realm.as_str(), l.service.as_str()),
            ("https://quay.io/v2/auth", "quay.io")
        );
        assert_eq!(
            learn_realm(
                quay,
                &[r#"Bearer realm="https://evil.example/t""#.to_string()]
            ),
            Err(LearnError::NotAllowlisted("evil.example".into()))
        );
        assert_eq!(learn_realm(quay, &[]), Err(LearnError::NoChallenge));
        assert_eq!(
            learn_realm(quay, &["Basic realm=\"x\"".into(), "Bearer \"oops".into()]),
            Err(LearnError::NoChallenge)
        );
        // A bad one first, a good one after.
        let l = learn_realm(
            quay,
            &[
                r#"Bearer realm="https://evil.example/t""#.into(),
                r#"Bearer realm="https://quay.io/v2/auth""#.into(),
            ],
        )
        .unwrap();
        assert_eq!(l.service, "");
    }

    #[test]
    fn learned_targets() {
        let l = LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io")).unwrap();
        assert_eq!(
            learned_target(
                &l,
                Some("scope=repository%3Acoreos%2Fetcd%3Apull&service=registry.docker.io")
            ),
            Some((
                "quay.io".to_string(),
                "/v2/auth?scope=repository%3Acoreos%2Fetcd%3Apull&service=quay.io".to_string()
            ))
        );
        let l = LearnedRealm::new("https://Auth.Example:8443?x=1", None).unwrap();
        assert_eq!(
            learned_target(&l, Some("service=a&scope=s")),
            Some(("auth.example:8443".into(), "/?x=1&scope=s".into()))
        );
        assert_eq!(
            learned_target(&l, None),
            Some(("auth.example:8443".into(), "/?x=1".into()))
        );
    }
}
