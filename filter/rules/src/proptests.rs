//! Property tests of every parser and rewriter in `rules`: hostile input never panics,
//! round trips hold, URLs handed to clients stay on the mirror and forwards only go to
//! hosts the configuration allows. `PROPTEST_CASES` sets the cases per property
//! (`just fuzz` runs many more than the default).

use super::challenge::{self, rewrite_challenges, serialize, LearnedRealm, Unrewritten};
use super::config::{
    compile, default_config, parse, ClientAuth, FilterConfig, RedirectMode, RegistryConfig,
};
use super::digest::Digest;
use super::hosts::any_match;
use super::link::{self, rewrite_links, ClientView};
use super::names::{NameError, Reference, RepositoryName};
use super::realms::IssuedRealms;
use super::redirect::{
    mirror_url, resolve_location, rewrite_location, LocationOutcome, SignParams, SignedRedirect,
    Target, PREFIX,
};
use super::response::{plan_challenges, Answer};
use super::route::{
    route_with, Decision, ForwardKind, Learned, NothingLearned, RejectReason, Request,
};
use super::token;
use super::token_host::TokenHosts;
use super::url::{decode_query_value, encode_query_value, is_url_char, parse_url};
use super::{CompiledConfig, SharedSet};
use proptest::prelude::*;

const KEY: [u8; 32] = [5u8; 32];

/// Cases per property: `PROPTEST_CASES`, else enough to find the shallow bugs in a unit
/// test run.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Pieces a hostile client or upstream combines: the grammar's delimiters, encodings,
/// names the configuration knows and parts of the mirror's own paths.
const PIECES: &[&str] = &[
    "/",
    "//",
    "?",
    "&",
    "=",
    "%",
    "%2f",
    "%2F",
    "%2e",
    "%00",
    "%zz",
    "%3A",
    "+",
    "..",
    ".",
    ":",
    "@",
    "#",
    "\\",
    " ",
    "\t",
    "\"",
    "'",
    ",",
    ";",
    "*",
    "-",
    "_",
    "~",
    "\u{1}",
    "é",
    "A",
    "a",
    "0",
    "quay.io",
    "docker.io",
    "gcr.io",
    "auth.docker.io",
    "evil.example",
    "us-docker.pkg.dev",
    "cdn.quay.io",
    "localhost:5000",
    "library",
    "alpine",
    "manifests",
    "blobs",
    "tags",
    "list",
    "referrers",
    "uploads",
    "_catalog",
    "latest",
    "sha256:",
    "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "/v2/",
    "/v2",
    "/_mirror/auth/",
    "/_mirror/redirect/",
    "/token",
    "/v2/auth",
    "scope=",
    "service=",
    "repository:",
    ":pull",
    ":pull,push",
    "registry:catalog:*",
    "ns=",
    "https://",
    "http://",
    "Bearer ",
    "bearer ",
    "Basic ",
    "realm=",
    "realm=\"",
    "\",",
    "service=\"",
    "scope=\"",
    "mirror.test",
    "docker.mirror.test",
    "quay.mirror.test",
];

/// Strings built from [`PIECES`], or arbitrary text.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(prop::sample::select(PIECES), 0..14).prop_map(|v| v.concat()),
        1 => any::<String>(),
        1 => "[ -~]{0,60}",
    ]
}

/// Pieces of `WWW-Authenticate` values: schemes, params, realms on and off the
/// allowlists, quoted-pairs, token68 and list separators.
const CHALLENGE_PIECES: &[&str] = &[
    "Bearer ",
    "bearer ",
    "Basic ",
    "Negotiate abc==",
    "realm=",
    "REALM = ",
    "service=",
    "scope=",
    "x=",
    "\"https://auth.docker.io/token\"",
    "\"https://Auth.Docker.io:443/t?a=1\"",
    "\"https://quay.io/v2/auth\"",
    "\"https://quay.io/v2/a\\\"b?q=\\\\\"",
    "\"https://evil.example/t\"",
    "https://quay.io/x",
    "\"registry.docker.io\"",
    "\"repository:a/b:pull\"",
    "\"repository:a/b:pull repository:c:push\"",
    "\"a\\zb\\é\"",
    "tok",
    ",",
    ", ",
    " ",
    "\t",
    "\"",
    "é",
];

/// Pieces of `Link` values: targets relative, absolute, on the upstream and elsewhere,
/// params with quoted-strings, list separators.
const LINK_PIECES: &[&str] = &[
    "</v2/org/img/tags/list?last=x&n=50>",
    "</v2/a/tags/list?ns=docker.io&ns=evil>",
    "<https://quay.io/v2/a/tags/list?last=b>",
    "<HTTP://QUAY.IO:80/v2/a/referrers/sha256:ab>",
    "<https://evil.example/v2/a/tags/list>",
    "<//quay.io/v2/a/tags/list>",
    "<?last=y>",
    "<list?n=1>",
    "<../../x>",
    "</v2/a/../b>",
    "<>",
    "; rel=\"next\"",
    ";rel=next",
    "; title=\"a, <b>; \\\" c\"",
    ", ",
    ",",
    "<",
    ">",
    "\"",
    " ",
    "é",
];

/// Auth-param values, tokens and quoted-strings with quoted-pairs.
const PARAM_VALUES: &[&str] = &[
    "\"https://auth.docker.io/token\"",
    "\"https://quay.io/v2/auth?a=\\\"b\\\\c\"",
    "\"https://quay.io/v2/a\\\"b\"",
    "https://quay.io/v2/auth",
    "\"https://evil.example/t\"",
    "\"quay.io\"",
    "\"repository:a/b:pull\"",
    "\"repository:a\\\"b:pull\"",
    "\"x\\\"y\\\\z\\q\"",
    "\"é\\é\"",
    "tok",
    "\"\"",
];

/// `rewrite_challenges` as parse, edit, serialize (its definition before the one-pass
/// rewrite): `(value, rewritten, rejected, dropped, realms)`.
fn rewrite_by_parse(
    header: &str,
    allowlist: &[super::hosts::HostPattern],
    mirror_base: &str,
    scope_prefix: Option<&str>,
    unrewritten: Unrewritten,
) -> (String, usize, usize, usize, Vec<LearnedRealm>) {
    let drop = unrewritten == Unrewritten::Drop;
    let Ok(mut challenges) = challenge::parse(header) else {
        return if drop {
            (String::new(), 0, 1, 1, Vec::new())
        } else {
            (header.to_string(), 0, 1, 0, Vec::new())
        };
    };
    let (mut rewritten, mut rejected, mut realms) = (0, 0, Vec::new());
    // Per challenge: Bearer, every realm (at least one) rewritten.
    let mut all_rewritten = Vec::new();
    for ch in challenges.iter_mut() {
        if !ch.scheme.eq_ignore_ascii_case("bearer") {
            all_rewritten.push(false);
            continue;
        }
        let service = ch.param("service").map(str::to_string);
        let (mut named, mut this_rewritten) = (0, 0);
        for (k, v) in ch.params.iter_mut() {
            if !k.eq_ignore_ascii_case("realm") {
                continue;
            }
            named += 1;
            match parse_url(v) {
                Some(u) if any_match(allowlist, &u.authority) => {
                    realms.extend(LearnedRealm::new(v, service.as_deref()));
                    let q = u.query.map(|q| format!("?{q}")).unwrap_or_default();
                    *v = format!("{mirror_base}/_mirror/auth/{}{}{q}", u.authority, u.path);
                    rewritten += 1;
                    this_rewritten += 1;
                }
                _ => rejected += 1,
            }
        }
        all_rewritten.push(named > 0 && this_rewritten == named);
        if let (true, Some(prefix)) = (this_rewritten > 0, scope_prefix) {
            for (k, v) in ch.params.iter_mut() {
                if k.eq_ignore_ascii_case("scope") {
                    *v = challenge::prefix_scope(v, prefix);
                }
            }
        }
    }
    if rewritten == 0 {
        return if drop {
            (String::new(), 0, rejected, challenges.len(), Vec::new())
        } else {
            (header.to_string(), 0, rejected, 0, Vec::new())
        };
    }
    let before = challenges.len();
    if drop {
        let mut keep = all_rewritten.into_iter();
        challenges.retain(|_| keep.next().unwrap_or(false));
    }
    let dropped = before - challenges.len();
    (serialize(&challenges), rewritten, rejected, dropped, realms)
}

/// The shipped registries, host mode on `mirror.test`, with and without `public_url`.
fn configs() -> Vec<CompiledConfig> {
    let plain = default_config();
    let mut host = default_config();
    host.host_suffix = Some("mirror.test".into());
    let mut public = host.clone();
    public.public_url = Some("https://mirror.test:8443".into());
    [plain, host, public]
        .iter()
        .filter_map(|c| compile(c).ok())
        .collect()
}

/// A `/v2/<name>/<kind>/<last>` request for the default registry as the typed parsers
/// route it: the upstream path and cache key, else the rejection's reason. The reference
/// for routing's one-buffer path building.
fn v2_reference(
    cfg: &CompiledConfig,
    name: &str,
    kind: &str,
    last: &str,
) -> Option<Result<(String, Option<String>), RejectReason>> {
    let reg = cfg.default_registry()?;
    let full = if reg.library_namespace && !name.contains('/') {
        format!("library/{name}")
    } else {
        name.to_string()
    };
    let Ok(name) = RepositoryName::parse(&full) else {
        return Some(Err(RejectReason::NameInvalid));
    };
    let reason = |e: NameError| match e {
        NameError::Name => RejectReason::NameInvalid,
        NameError::Tag => RejectReason::TagInvalid,
        NameError::Digest => RejectReason::DigestInvalid,
    };
    let (path, key) = match kind {
        "tags" => {
            let p = format!("/v2/{name}/tags/list");
            (p.clone(), p)
        }
        "manifests" => match Reference::parse(last) {
            Ok(Reference::Digest(d)) => (format!("/v2/{name}/manifests/{d}"), d.to_string()),
            Ok(Reference::Tag(t)) => (
                format!("/v2/{name}/manifests/{t}"),
                format!("{}/{name}:{t}", reg.name),
            ),
            Err(e) => return Some(Err(reason(e))),
        },
        "blobs" => match Digest::parse(last) {
            Ok(d) => (format!("/v2/{name}/blobs/{d}"), d.to_string()),
            Err(e) => return Some(Err(reason(e))),
        },
        _ => match Digest::parse(last) {
            Ok(d) => {
                let p = format!("/v2/{name}/referrers/{d}");
                (p.clone(), p)
            }
            Err(e) => return Some(Err(reason(e))),
        },
    };
    Some(Ok((path, reg.cache.then_some(key))))
}

/// An Envoy that has learned everything: every realm issued, every host a token host.
struct AllLearned;

impl Learned for AllLearned {
    fn is_token_host(&self, _: &str, _: &str) -> bool {
        true
    }
    fn is_issued_realm(&self, _: &str, _: &str, _: &str) -> bool {
        true
    }
}

/// What routing may do with any request, whatever the configuration learned.
fn check_decision(cfg: &CompiledConfig, d: &Decision) -> Result<(), TestCaseError> {
    match d {
        Decision::Forward(f) => {
            let reg = cfg.registry(&f.registry);
            prop_assert!(reg.is_some(), "unknown registry {}", f.registry);
            let reg = reg.unwrap_or_else(|| unreachable!());
            let allowed = match f.kind {
                ForwardKind::Registry => f.authority == reg.upstream,
                ForwardKind::Auth => any_match(&reg.realm_hosts, &f.authority),
                ForwardKind::Redirect => reg.redirect_allowed(&f.authority),
            };
            prop_assert!(
                allowed,
                "{:?} to {} for {}",
                f.kind,
                f.authority,
                f.registry
            );
            prop_assert!(f.path.starts_with('/'));
            prop_assert!(f.path.bytes().all(is_url_char), "{}", f.path);
            if let Some(p) = &cfg.public_url {
                prop_assert!(
                    f.mirror_base == format!("{}://{}{}", p.scheme, p.host, p.port)
                        || (f.mirror_base.starts_with(&format!("{}://", p.scheme))
                            && f.mirror_base.ends_with(&format!(".{}{}", p.host, p.port))),
                    "{}",
                    f.mirror_base
                );
            }
        }
        Decision::LearnRealm(l) => {
            let reg = cfg.registry(&l.registry);
            prop_assert!(reg.is_some_and(|r| r.cluster == l.cluster && !r.cache));
            if let (Some(u), Some(r)) = (&l.expect, reg) {
                prop_assert!(any_match(&r.realm_hosts, &u.authority));
            }
        }
        Decision::Ping(p) => {
            prop_assert_eq!(
                Some(p.registry.as_str()),
                cfg.default_registry().map(|r| r.name.as_str())
            );
        }
        Decision::Reply(r) => {
            prop_assert!((200..600).contains(&r.status));
            prop_assert!(serde_json::from_str::<serde_json::Value>(&r.body).is_ok());
        }
    }
    Ok(())
}

fn registry_config() -> impl Strategy<Value = RegistryConfig> {
    let host = prop::sample::select(
        &[
            "docker.io",
            "quay.io",
            "Quay.IO",
            "localhost:5000",
            "a.io",
            "bad host",
            "",
            "*.pkg.dev",
            "x:0",
        ][..],
    );
    (
        host.clone(),
        prop::collection::vec(host.clone(), 0..3),
        host.clone(),
        prop::option::of(prop::sample::select(
            &["docker", "quay", "", "Q", "a b"][..],
        )),
        prop::collection::vec(host.clone(), 0..3),
        prop::collection::vec(host, 0..3),
        any::<(bool, bool, bool)>(),
        prop::option::of("[ -~]{0,12}"),
        prop::option::of(any::<bool>()),
    )
        .prop_map(
            |(name, aliases, upstream, prefix, realms, redirects, flags, cluster, fwd)| {
                RegistryConfig {
                    name: name.into(),
                    aliases: aliases.into_iter().map(String::from).collect(),
                    upstream: upstream.into(),
                    host_prefix: prefix.map(String::from),
                    realm_hosts: realms.into_iter().map(String::from).collect(),
                    redirect_hosts: redirects.into_iter().map(String::from).collect(),
                    library_namespace: flags.0,
                    cache: flags.1,
                    redirects: if flags.2 {
                        RedirectMode::Sign
                    } else {
                        RedirectMode::Passthrough
                    },
                    cluster,
                    forward_client_credentials: fwd,
                    client_auth: ClientAuth::default(),
                }
            },
        )
}

fn filter_config() -> impl Strategy<Value = FilterConfig> {
    (
        prop::option::of(prop::sample::select(&["mirror.test", "Bad Suffix", ""][..])),
        prop::option::of(prop::sample::select(
            &["docker.io", "quay.io", "nope", ""][..],
        )),
        prop::option::of(0u64..5000),
        prop::option::of(prop::sample::select(
            &[
                "",
                "zz",
                "0001020304050607080900010203040506070809000102030405060708090001",
            ][..],
        )),
        prop::option::of(hostile()),
        prop::collection::vec(registry_config(), 0..4),
    )
        .prop_map(
            |(suffix, default, ttl, key, public_url, registries)| FilterConfig {
                host_suffix: suffix.map(String::from),
                default_registry: default.map(String::from),
                redirect_ttl_seconds: ttl,
                signing_key: key.map(String::from),
                public_url,
                registries,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200), text in hostile()) {
        let _ = parse(&bytes);
        let _ = parse(text.as_bytes());
    }

    #[test]
    fn config_round_trips_through_its_serde_types(cfg in filter_config()) {
        let json = serde_json::to_string(&cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: FilterConfig =
            serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &cfg);
        prop_assert_eq!(parse(json.as_bytes()), compile(&cfg));
    }

    #[test]
    fn routing_any_request_stays_within_the_configuration(
        method in prop::sample::select(&["GET", "HEAD", "POST", "get", "", "GET "][..]),
        authority in prop_oneof![
            prop::sample::select(&["m", "127.0.0.1:5000", "mirror.test:8443", "docker.mirror.test",
                "QUAY.mirror.test:1", "gcr.mirror.test", "evil.example", "[::1]:5000", ""][..])
                .prop_map(String::from),
            hostile(),
        ],
        path in hostile(),
        proto in prop::option::of(prop::sample::select(&["https", "http", "HTTPS, http", "gopher"][..])),
        authorization in prop::option::of(prop::sample::select(&["Bearer t", "Basic dTpw", "bearer", ""][..])),
        learned_all in any::<bool>(),
        now in 0u64..3000,
    ) {
        let learned: &dyn Learned = if learned_all { &AllLearned } else { &NothingLearned };
        for cfg in configs() {
            let req = Request {
                method,
                authority: &authority,
                path: &path,
                scheme: "http",
                forwarded_proto: proto,
                authorization,
            };
            let d = route_with(&cfg, &req, &KEY, now, learned);
            check_decision(&cfg, &d)?;
        }
    }

    #[test]
    fn v2_resource_routes_agree_with_the_typed_parsers(
        first in "[a-z0-9_A-]{1,6}",
        more in prop::collection::vec("[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,5}", 0..4),
        kind in prop::sample::select(&["manifests", "blobs", "tags", "referrers"][..]),
        last in prop_oneof![
            "[a-zA-Z0-9._:-]{0,12}",
            "(sha256|sha512|SHA256|md5):[0-9a-fA-F]{62,66}",
            Just(format!("sha256:{}", "ab".repeat(32))),
            Just("list".to_string()),
        ],
        cached in any::<bool>(),
    ) {
        let name = std::iter::once(first).chain(more).collect::<Vec<_>>().join("/");
        let last = if kind == "tags" { "list".to_string() } else { last };
        // Not a path trick (a dot segment): those are refused before the resource is read.
        prop_assume!(last != "." && last != "..");
        let mut c = default_config();
        for r in &mut c.registries {
            r.cache = cached;
        }
        let Ok(cfg) = compile(&c) else {
            return Err(TestCaseError::reject("configuration"));
        };
        let Some(want) = v2_reference(&cfg, &name, kind, &last) else {
            return Err(TestCaseError::reject("no default registry"));
        };
        let path = format!("/v2/{name}/{kind}/{last}");
        let req = Request {
            method: "GET",
            authority: "127.0.0.1:5000",
            path: &path,
            scheme: "http",
            forwarded_proto: None,
            authorization: None,
        };
        let got = match route_with(&cfg, &req, &KEY, 0, &NothingLearned) {
            Decision::Forward(f) => Ok((f.path, f.cache_key)),
            Decision::Reply(r) => Err(r.reason),
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        match (got, want) {
            (Ok(g), Ok(w)) => prop_assert_eq!(g, w),
            (Err(g), Err(w)) => prop_assert_eq!(g, Some(w)),
            (g, w) => prop_assert!(false, "{path}: got {g:?}, want {w:?}"),
        }
    }

    #[test]
    fn challenge_parse_never_panics_and_round_trips(h in hostile()) {
        if let Ok(c) = challenge::parse(&h) {
            let s = serialize(&c);
            prop_assert_eq!(challenge::parse(&s), Ok(c), "{}", s);
        }
    }

    #[test]
    fn registry_clients_read_bearer_challenges(
        values in prop::collection::vec(hostile(), 0..4),
        scheme in "[Bb][Ee][Aa][Rr][Ee][Rr]",
        realm in "[ -~]{0,60}",
        service in "[A-Za-z0-9._~-]{1,30}",
    ) {
        // Never panics, whatever the values; the bearer answer is one of the challenges.
        let all = challenge::parse_all(values.iter().map(String::as_str));
        if let Some(b) = challenge::bearer(&all) {
            prop_assert!(all.iter().any(|c| c.is("bearer") && c.param("realm") == Some(b.realm.as_str())));
        }
        // A well-formed Bearer challenge after a malformed value is found, realm unescaped.
        let quoted = realm.replace('\\', "\\\\").replace('"', "\\\"");
        let header = format!("{scheme} realm=\"{quoted}\", service={service}, Basic");
        let c = challenge::parse_all(["Basic realm=\"open", header.as_str()]);
        prop_assert_eq!(c.len(), 2);
        let b = challenge::bearer(&c).map(|b| (b.realm, b.service));
        prop_assert_eq!(b, Some((realm, Some(service))));
    }

    #[test]
    fn one_pass_rewrite_equals_parse_edit_serialize(
        header in prop_oneof![
            3 => prop::collection::vec(prop::sample::select(CHALLENGE_PIECES), 0..16)
                .prop_map(|v| v.concat()),
            3 => (
                prop::sample::select(&["Bearer", "bearer", "Basic"][..]),
                prop::collection::vec((
                    prop::sample::select(&["realm", "Realm", "service", "scope", "x"][..]),
                    prop::sample::select(PARAM_VALUES),
                ), 1..5),
                prop::collection::vec(prop::sample::select(CHALLENGE_PIECES), 0..4),
            ).prop_map(|(scheme, params, tail)| {
                let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{scheme} {}{}", params.join(","), tail.concat())
            }),
            1 => hostile(),
        ],
        prefix in prop::option::of(prop::sample::select(&["quay.io", "docker.io"][..])),
        base in prop::sample::select(&["https://m", "http://127.0.0.1:5000", "http://a\"b"][..]),
    ) {
        let cfg = parse(b"").map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (reg, unrewritten) in cfg.registries().iter().flat_map(|r| [(r, Unrewritten::Keep), (r, Unrewritten::Drop)]) {
            let r = rewrite_challenges(&header, &reg.realm_hosts, base, prefix, unrewritten);
            let want = rewrite_by_parse(&header, &reg.realm_hosts, base, prefix, unrewritten);
            prop_assert_eq!((&r.value, r.rewritten, r.rejected, r.dropped, &r.realms), (&want.0, want.1, want.2, want.3, &want.4));
        }
    }

    #[test]
    fn rewritten_realms_always_name_the_mirror(
        realm in prop_oneof![
            prop::sample::select(&["https://auth.docker.io/token", "https://quay.io/v2/auth",
                "http://auth.docker.io/t?x=1", "https://us-docker.pkg.dev/v2/token",
                "https://evil.example/token", "https://auth.docker.io.evil.example/",
                "https://u@auth.docker.io/", "auth.docker.io/token"][..]).prop_map(String::from),
            hostile(),
        ],
        tail in hostile(),
        prefix in prop::option::of(prop::sample::select(&["quay.io", "docker.io"][..])),
        base in prop::sample::select(&["https://m", "http://127.0.0.1:5000"][..]),
    ) {
        let cfg = parse(b"").map_err(|e| TestCaseError::fail(e.to_string()))?;
        for header in [
            format!("Bearer realm=\"{realm}\",service=\"s\"{tail}"),
            format!("{tail}, Bearer realm={realm}"),
            tail.clone(),
        ] {
            for (reg, unrewritten) in cfg.registries().iter().flat_map(|r| [(r, Unrewritten::Keep), (r, Unrewritten::Drop)]) {
                let drop = unrewritten == Unrewritten::Drop;
                let r = rewrite_challenges(&header, &reg.realm_hosts, base, prefix, unrewritten);
                for l in &r.realms {
                    prop_assert!(l.allowed_for(reg));
                }
                if r.rewritten == 0 {
                    prop_assert_eq!(&r.value, if drop { "" } else { &header });
                    continue;
                }
                let parsed = challenge::parse(&r.value);
                prop_assert!(parsed.is_ok(), "{}", r.value);
                for c in parsed.unwrap_or_default() {
                    // Dropping leaves only Bearer challenges naming the mirror's realms.
                    let bearer = c.scheme.eq_ignore_ascii_case("bearer");
                    prop_assert!(bearer || !drop, "{}", r.value);
                    prop_assert!(c.param("realm").is_some() || !drop, "{}", r.value);
                    if !bearer {
                        continue;
                    }
                    for (k, v) in &c.params {
                        if k.eq_ignore_ascii_case("realm") {
                            let on_mirror = v.starts_with(&format!("{base}/_mirror/auth/"));
                            let foreign = parse_url(v)
                                .is_none_or(|u| !any_match(&reg.realm_hosts, &u.authority));
                            prop_assert!(on_mirror || (foreign && !drop), "{}", v);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn challenge_plans_learn_only_from_a_registrys_own_401(
        values in prop::collection::vec(hostile(), 0..3),
        status in prop::option::of(prop::sample::select(&[200u32, 307, 401, 403][..])),
        kind in prop::sample::select(&[ForwardKind::Registry, ForwardKind::Auth, ForwardKind::Redirect][..]),
        withhold in any::<bool>(),
    ) {
        let cfg = parse(b"").map_err(|e| TestCaseError::fail(e.to_string()))?;
        for reg in cfg.registries() {
            let a = Answer {
                registry: reg,
                kind,
                status,
                mirror_base: "https://m",
                scope_prefix: None,
                withhold_client_credential: withhold,
            };
            let p = plan_challenges(&a, values.iter().map(|v| v.as_bytes().to_vec()).collect());
            // Withheld: every challenge left is Bearer with the mirror's realm.
            let left = p.values.as_ref().map_or_else(
                || values.iter().map(|v| challenge::parse(v).unwrap_or_default()).collect::<Vec<_>>(),
                |out| out.iter().map(|v| challenge::parse(&String::from_utf8_lossy(v)).unwrap_or_default()).collect(),
            );
            prop_assert!(!withhold || p.values.is_some() || values.iter().all(|v| challenge::parse(v).is_ok()));
            for c in left.iter().flatten().filter(|_| withhold) {
                prop_assert!(c.is("bearer"), "{:?}", c);
                let realm = c.param("realm").unwrap_or_default();
                prop_assert!(realm.starts_with("https://m/_mirror/auth/"), "{:?}", c);
            }
            if let Some(l) = p.store_realm() {
                prop_assert!(status == Some(401) && kind == ForwardKind::Registry);
                prop_assert!(l.allowed_for(reg));
            }
            for u in &p.issued() {
                prop_assert!(status == Some(401) && kind != ForwardKind::Auth);
                prop_assert!(any_match(&reg.realm_hosts, &u.authority));
            }
            prop_assert!(!p.record_token_host || kind == ForwardKind::Redirect);
        }
    }

    #[test]
    fn query_values_round_trip(s in any::<String>(), delims in any::<bool>()) {
        let e = encode_query_value(&s, delims);
        prop_assert!(e.bytes().all(is_url_char) && !e.contains(['&', '=', '+', '?']));
        prop_assert_eq!(decode_query_value(&e), Some(s));
    }

    #[test]
    fn token_plans_name_valid_repositories(q in hostile(), prefixes in any::<bool>()) {
        let cfg = parse(b"").map_err(|e| TestCaseError::fail(e.to_string()))?;
        for reg in cfg.registries() {
            let Ok(plan) = token::plan(&cfg, reg, prefixes, Some(&q)) else {
                continue;
            };
            for seg in plan.query.iter().flat_map(|q| q.split('&')) {
                let Some(raw) = seg.strip_prefix("scope=") else {
                    continue;
                };
                let decoded = decode_query_value(raw);
                prop_assert!(decoded.is_some(), "{}", raw);
                for s in decoded.unwrap_or_default().split(' ').filter(|s| !s.is_empty()) {
                    if let Some(Ok(r)) = token::parse_repository_scope(s) {
                        prop_assert!(RepositoryName::parse(r.name).is_ok(), "{}", s);
                    }
                }
            }
        }
    }

    #[test]
    fn signed_redirects_round_trip_and_tampering_never_verifies(
        registry in prop::sample::select(&["docker.io", "quay.io", "registry.k8s.io"][..]),
        host in prop::sample::select(&["production.cloudflare.docker.com", "cdn.quay.io",
            "x.r2.cloudflarestorage.com", "us-docker.pkg.dev", "quay.io", "evil.example"][..]),
        path in "/[a-zA-Z0-9._~/:@!$'()*+,;=-]{0,40}",
        query in prop::option::of("[a-zA-Z0-9._~/:@!$'()*+,;=&?%-]{0,30}"),
        expires in 0u64..u64::MAX,
        cred in prop::option::of("[0-9a-f]{32}"),
        base in prop::sample::select(&["https://m", "http://127.0.0.1:5000", "https://quay.mirror.test:8443"][..]),
        at in any::<prop::sample::Index>(),
        with in 0x21u8..0x7f,
    ) {
        let cfg = parse(b"").map_err(|e| TestCaseError::fail(e.to_string()))?;
        // What the parser takes: `-`, or an old URL's 32-hex fingerprint.
        let cred = cred.unwrap_or_else(|| "-".to_string());
        let target = Target { host: host.into(), path: path.clone(), query };
        let url = mirror_url(base, &KEY, registry, expires, &cred, &target);
        let start = format!("{base}{PREFIX}");
        prop_assert!(url.starts_with(&start));
        let path_part = url.strip_prefix(base).unwrap_or_default();
        let sr = SignedRedirect::parse(path_part);
        prop_assert!(sr.is_ok(), "{}", url);
        let sr = sr.map_err(|e| TestCaseError::fail(e.as_str()))?;
        prop_assert_eq!(&sr.target, &target);
        prop_assert_eq!((sr.registry.as_str(), sr.expires, sr.cred.as_str()), (registry, expires, cred.as_str()));
        let allowed = cfg.registry(registry).is_some_and(|r| r.redirect_allowed(host));
        prop_assert_eq!(sr.verify(&cfg, &KEY, expires).is_ok(), allowed);
        prop_assert!(sr.verify(&cfg, &[6u8; 32], expires).is_err());
        if expires < u64::MAX {
            prop_assert!(sr.verify(&cfg, &KEY, expires + 1).is_err());
        }
        // Any one byte changed after the prefix: refused.
        let mut bytes = path_part.as_bytes().to_vec();
        let i = PREFIX.len() + at.index(bytes.len() - PREFIX.len());
        if bytes.get(i) != Some(&with) {
            if let Some(b) = bytes.get_mut(i) {
                *b = with;
            }
            let tampered = String::from_utf8(bytes).unwrap_or_default();
            let ok = SignedRedirect::parse(&tampered).and_then(|t| t.verify(&cfg, &KEY, 0));
            prop_assert!(ok.is_err(), "{}", tampered);
        }
    }

    #[test]
    fn rewritten_locations_stay_on_the_mirror(
        location in prop_oneof![
            prop::sample::select(&["https://production.cloudflare.docker.com/x?verify=1",
                "//cdn.quay.io/a", "/v2/x", "../y", "?q", "http://cdn.quay.io/a",
                "https://evil.example/", "https://cdn.quay.io:8443/a"][..]).prop_map(String::from),
            hostile(),
        ],
        base_path in hostile(),
        registry in prop::sample::select(&["docker.io", "quay.io", "registry.k8s.io", "nope"][..]),
        now in 0u64..(u64::MAX / 2),
    ) {
        let cfg = parse(b"").map_err(|e| TestCaseError::fail(e.to_string()))?;
        let _ = resolve_location(&location, "quay.io", &base_path);
        let mirror_base = "https://m:5000";
        let p = SignParams {
            registry,
            base_host: "quay.io",
            base_path: &base_path,
            mirror_base,
            cred: "-",
            key: &KEY,
            now,
        };
        if let LocationOutcome::Signed(u) = rewrite_location(&cfg, &p, &location) {
            let start = format!("{mirror_base}{PREFIX}");
            prop_assert!(u.starts_with(&start), "{}", u);
            let sr = SignedRedirect::parse(u.strip_prefix(mirror_base).unwrap_or_default());
            prop_assert!(sr.is_ok_and(|s| s.verify(&cfg, &KEY, now).is_ok()), "{}", u);
        }
    }

    #[test]
    fn names_and_references_follow_the_grammar(s in hostile()) {
        if let Ok(n) = RepositoryName::parse(&s) {
            prop_assert!(n.as_str().len() <= 255);
            prop_assert!(n.as_str().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)));
            prop_assert!(!n.as_str().contains("//") && !n.as_str().starts_with('/') && !n.as_str().ends_with('/'));
        }
        if let Ok(r) = Reference::parse(&s) {
            prop_assert_eq!(Reference::parse(&r.to_string()), Ok(r));
        }
        if let Ok(d) = Digest::parse(&s) {
            prop_assert_eq!(d.to_string(), s);
        }
    }

    #[test]
    fn valid_names_parse(
        comps in prop::collection::vec("[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}", 1..5),
        hex in "[a-f0-9]{64}",
        tag in "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}",
        bytes in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let name = comps.join("/");
        prop_assert_eq!(RepositoryName::parse(&name).map(|n| n.to_string()), Ok(name));
        let d = format!("sha256:{hex}");
        prop_assert_eq!(Digest::parse(&d).map(|x| x.to_string()), Ok(d));
        prop_assert_eq!(Reference::parse(&tag).map(|r| r.to_string()), Ok(tag));
        let h = Digest::of_bytes(&bytes);
        prop_assert_eq!(Digest::parse(h.as_str()), Ok(h.clone()));
        prop_assert!(Digest::parse(&h.as_str().to_uppercase()).is_err());
        prop_assert!(Digest::parse(h.hex()).is_err());
    }

    #[test]
    fn links_stay_on_the_mirror_and_name_the_clients_registry(
        value in prop_oneof![
            3 => prop::collection::vec(prop::sample::select(LINK_PIECES), 0..8).prop_map(|v| v.concat()),
            1 => hostile(),
        ],
        prefix in prop::option::of(prop::sample::select(&["quay.io", "docker.io"][..])),
        ns in prop::option::of(prop::sample::select(&["quay.io", "localhost:5000"][..])),
    ) {
        let view = ClientView {
            mirror_base: "https://m",
            upstream: "quay.io",
            upstream_path: "/v2/org/img/tags/list?n=1",
            path_prefix: prefix,
            ns,
        };
        let r = rewrite_links(&value, &view);
        if r.rewritten == 0 && r.dropped == 0 {
            prop_assert_eq!(&r.value, &value);
        }
        let links = link::parse(&r.value);
        prop_assert!(links.is_some(), "{}", r.value);
        for (target, _) in links.unwrap_or_default() {
            if target.is_empty() {
                continue;
            }
            let path = target.strip_prefix("https://m").unwrap_or(target);
            let want = format!("/v2/{}", prefix.map(|p| format!("{p}/")).unwrap_or_default());
            prop_assert!(path.starts_with(&want), "{}", target);
            let q = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
            let nss: Vec<&str> = q.split('&').filter(|s| s.split('=').next() == Some("ns")).collect();
            let client = ns.map(|n| format!("ns={}", encode_query_value(n, true)));
            prop_assert_eq!(nss, client.as_deref().into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn shared_data_values_never_panic_and_stay_bounded(bytes in prop::collection::vec(any::<u8>(), 0..600), text in hostile()) {
        for b in [&bytes[..], text.as_bytes()] {
            let _ = LearnedRealm::decode(b);
            let t = TokenHosts::decode(b);
            prop_assert_eq!(TokenHosts::decode(t.encode().as_bytes()), t);
            let r = IssuedRealms::decode(b);
            prop_assert!(r.len() <= super::realms::MAX_REALMS);
            prop_assert_eq!(IssuedRealms::decode(r.encode().as_bytes()), r);
        }
    }
}
