//! Signed redirect URLs: resolving `Location`, signing, parsing and verifying.

use super::config::{CompiledConfig, RedirectMode};
use super::hosts::is_valid_authority;
use super::url::{is_url_char, parse_url};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Path prefix of signed redirect URLs.
pub const PREFIX: &str = "/_mirror/redirect/";

/// Minimum signing key length in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// An absolute https target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Lowercase `host[:port]` (no default port).
    pub host: String,
    /// Absolute path starting with `/`.
    pub path: String,
    /// Query without `?`.
    pub query: Option<String>,
}

impl Target {
    /// `<path>[?<query>]`.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{}", self.path, q),
            None => self.path.clone(),
        }
    }
}

/// Lower hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    // Digit by digit, not `write!` per byte (formatting cost more than the HMAC it encodes).
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.extend(char::from_digit(u32::from(b >> 4), 16));
        s.extend(char::from_digit(u32::from(b & 0xf), 16));
    }
    s
}

/// The `<cred>` the mirror signs. The field stays in the URL format (and URLs signed with a
/// credential fingerprint still verify), but no decision reads it any more: which
/// credential reaches a redirect target is [`super::token_host::strip_credential`]'s call.
pub const NO_CREDENTIAL: &str = "-";

/// RFC 3986 remove_dot_segments.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').collect();
    let n = segs.len();
    for (i, seg) in segs.iter().enumerate().skip(1) {
        let last = i + 1 == n;
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Resolves a `Location` against `https://<base_host><base_path_and_query>`.
pub fn resolve_location(location: &str, base_host: &str, base_path: &str) -> Option<Target> {
    let location = location.trim();
    if location.is_empty() || !location.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return None;
    }
    let location = location.split('#').next().unwrap_or_default();
    let abs = if location.starts_with("//") {
        format!("https:{location}")
    } else if location.contains("://")
        && location.split("://").next().is_some_and(|s| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        })
    {
        location.to_string()
    } else {
        let base_path_only = base_path.split('?').next().unwrap_or_default();
        let joined = if location.starts_with('/') {
            location.to_string()
        } else if let Some(q) = location.strip_prefix('?') {
            format!("{base_path_only}?{q}")
        } else {
            let dir = match base_path_only.rfind('/') {
                Some(i) => base_path_only.get(..=i).unwrap_or("/"),
                None => "/",
            };
            format!("{dir}{location}")
        };
        format!("https://{base_host}{joined}")
    };
    let u = parse_url(&abs)?;
    if u.scheme != "https" {
        return None;
    }
    let path = if u.path.is_empty() {
        "/".to_string()
    } else {
        remove_dot_segments(&u.path)
    };
    Some(Target {
        host: u.authority,
        path,
        query: u.query,
    })
}

/// Feeds the signed message `<registry>\n<expires>\n<cred>\n<host>\n<tail…>` to `mac`
/// piece by piece (never built as one string).
fn feed(mac: &mut HmacSha256, registry: &str, expires: u64, cred: &str, host: &str, tail: &[&str]) {
    let expires = expires.to_string();
    for part in [registry, "\n", &expires, "\n", cred, "\n", host, "\n"]
        .iter()
        .chain(tail)
    {
        mac.update(part.as_bytes());
    }
}

/// Hex HMAC-SHA256 over `<registry>\n<expires>\n<cred>\n<host>\n<path>[?<query>]`.
pub fn sign(
    key: &[u8],
    registry: &str,
    expires: u64,
    cred: &str,
    host: &str,
    path_and_query: &str,
) -> String {
    match HmacSha256::new_from_slice(key) {
        Ok(mut mac) => {
            feed(&mut mac, registry, expires, cred, host, &[path_and_query]);
            hex(&mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// `<mirror_base>/_mirror/redirect/<registry>/<expires>/<cred>/<sig>/<host><path>[?query]`.
pub fn mirror_url(
    mirror_base: &str,
    key: &[u8],
    registry: &str,
    expires: u64,
    cred: &str,
    target: &Target,
) -> String {
    let pq = target.path_and_query();
    let sig = sign(key, registry, expires, cred, &target.host, &pq);
    let expires = expires.to_string();
    let parts = [
        mirror_base,
        PREFIX,
        registry,
        "/",
        &expires,
        "/",
        cred,
        "/",
        &sig,
        "/",
        &target.host,
        &pq,
    ];
    // One allocation (`format!` grew it several times).
    let mut url = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    parts.iter().for_each(|p| url.push_str(p));
    url
}

/// A parsed (not yet verified) signed redirect path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRedirect {
    /// Registry name.
    pub registry: String,
    /// Unix seconds.
    pub expires: u64,
    /// Credential fingerprint or `-`.
    pub cred: String,
    /// Hex signature.
    pub sig: String,
    /// Target.
    pub target: Target,
}

/// Why a signed redirect was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectError {
    /// Path does not have the signed-URL shape.
    Malformed,
    /// Registry unknown.
    UnknownRegistry,
    /// Signature mismatch (or no usable key).
    BadSignature,
    /// Expired.
    Expired,
    /// Target host not allowed for the registry.
    HostNotAllowed,
}

impl RedirectError {
    /// Short reason for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectError::Malformed => "malformed signed redirect",
            RedirectError::UnknownRegistry => "unknown registry in signed redirect",
            RedirectError::BadSignature => "bad signature",
            RedirectError::Expired => "signed redirect expired",
            RedirectError::HostNotAllowed => "redirect host not allowed",
        }
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl SignedRedirect {
    /// Parses a request path (with query) starting with [`PREFIX`].
    pub fn parse(path_and_query: &str) -> Result<Self, RedirectError> {
        let rest = path_and_query
            .strip_prefix(PREFIX)
            .ok_or(RedirectError::Malformed)?;
        if !rest.bytes().all(is_url_char) {
            return Err(RedirectError::Malformed);
        }
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (rest, None),
        };
        let mut it = path.splitn(6, '/');
        let registry = it.next().ok_or(RedirectError::Malformed)?;
        let expires = it.next().ok_or(RedirectError::Malformed)?;
        let cred = it.next().ok_or(RedirectError::Malformed)?;
        let sig = it.next().ok_or(RedirectError::Malformed)?;
        let host = it.next().ok_or(RedirectError::Malformed)?;
        let tail = it.next().unwrap_or_default();
        if expires.is_empty()
            || expires.len() > 20
            || !expires.bytes().all(|b| b.is_ascii_digit())
            || (expires.len() > 1 && expires.starts_with('0'))
        {
            return Err(RedirectError::Malformed);
        }
        let expires: u64 = expires.parse().map_err(|_| RedirectError::Malformed)?;
        if cred != "-" && !is_hex(cred, 32) {
            return Err(RedirectError::Malformed);
        }
        if !is_hex(sig, 64) || !is_valid_authority(host) {
            return Err(RedirectError::Malformed);
        }
        Ok(SignedRedirect {
            registry: registry.to_string(),
            expires,
            cred: cred.to_string(),
            sig: sig.to_string(),
            target: Target {
                host: host.to_string(),
                path: format!("/{tail}"),
                query,
            },
        })
    }

    /// Checks signature, expiry (`now` in unix seconds) and host allowlist.
    pub fn verify(&self, cfg: &CompiledConfig, key: &[u8], now: u64) -> Result<(), RedirectError> {
        if key.len() < MIN_KEY_LEN {
            return Err(RedirectError::BadSignature);
        }
        let sig = super::config::decode_hex(&self.sig).ok_or(RedirectError::BadSignature)?;
        let mut mac = HmacSha256::new_from_slice(key).map_err(|_| RedirectError::BadSignature)?;
        let t = &self.target;
        let tail = match &t.query {
            Some(q) => [t.path.as_str(), "?", q],
            None => [t.path.as_str(), "", ""],
        };
        feed(
            &mut mac,
            &self.registry,
            self.expires,
            &self.cred,
            &t.host,
            &tail,
        );
        mac.verify_slice(&sig)
            .map_err(|_| RedirectError::BadSignature)?;
        if self.expires < now {
            return Err(RedirectError::Expired);
        }
        let reg = cfg
            .registry(&self.registry)
            .filter(|r| r.name == self.registry)
            .ok_or(RedirectError::UnknownRegistry)?;
        if !reg.redirect_allowed(&self.target.host) {
            return Err(RedirectError::HostNotAllowed);
        }
        Ok(())
    }
}

/// What happened to a `Location` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocationOutcome {
    /// Replace with this signed mirror URL.
    Signed(String),
    /// Leave it as it is: the registry's `redirects` is passthrough (also what
    /// [`super::response::plan_redirect`] makes of a redirect cache-service answered with).
    Passthrough,
    /// Not resolvable, not https, host not allowed, or no signing key: refused
    /// ([`super::response::RedirectPlan::Refused`] answers the client with a 502).
    Rejected,
}

/// Everything needed to sign a `Location` from a response.
#[derive(Debug, Clone, Copy)]
pub struct SignParams<'a> {
    /// Registry name.
    pub registry: &'a str,
    /// Host the response came from.
    pub base_host: &'a str,
    /// Path (and query) of the upstream request.
    pub base_path: &'a str,
    /// `<scheme>://<client authority>`.
    pub mirror_base: &'a str,
    /// Fingerprint of the client's Authorization.
    pub cred: &'a str,
    /// Signing key.
    pub key: &'a [u8],
    /// Unix seconds now.
    pub now: u64,
}

/// Rewrites a redirect `Location` per the registry's policy.
pub fn rewrite_location(
    cfg: &CompiledConfig,
    p: &SignParams<'_>,
    location: &str,
) -> LocationOutcome {
    let Some(reg) = cfg.registry(p.registry) else {
        return LocationOutcome::Rejected;
    };
    if reg.redirects == RedirectMode::Passthrough {
        return LocationOutcome::Passthrough;
    }
    if p.key.len() < MIN_KEY_LEN {
        return LocationOutcome::Rejected;
    }
    match resolve_location(location, p.base_host, p.base_path) {
        Some(t) if reg.redirect_allowed(&t.host) => {
            let expires = p.now.saturating_add(cfg.redirect_ttl_seconds);
            LocationOutcome::Signed(mirror_url(
                p.mirror_base,
                p.key,
                &reg.name,
                expires,
                p.cred,
                &t,
            ))
        }
        _ => LocationOutcome::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse as parse_config;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let want: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&all), want);
        assert_eq!(hex(&[]), "");
    }

    const KEY: [u8; 32] = [7u8; 32];

    fn t(host: &str, path: &str, q: Option<&str>) -> Target {
        Target {
            host: host.into(),
            path: path.into(),
            query: q.map(Into::into),
        }
    }

    #[test]
    fn resolves() {
        let b = (
            "registry-1.docker.io",
            "/v2/library/alpine/blobs/sha256:ab?x=1",
        );
        let r = |l: &str| resolve_location(l, b.0, b.1);
        assert_eq!(
            r("https://production.cloudflare.docker.com/x?verify=1"),
            Some(t(
                "production.cloudflare.docker.com",
                "/x",
                Some("verify=1")
            ))
        );
        assert_eq!(r("//cdn.quay.io/a/b"), Some(t("cdn.quay.io", "/a/b", None)));
        assert_eq!(r("/p?q"), Some(t("registry-1.docker.io", "/p", Some("q"))));
        assert_eq!(
            r("other"),
            Some(t(
                "registry-1.docker.io",
                "/v2/library/alpine/blobs/other",
                None
            ))
        );
        assert_eq!(
            r("../x/./y"),
            Some(t("registry-1.docker.io", "/v2/library/alpine/x/y", None))
        );
        assert_eq!(r("/a/../../b"), Some(t("registry-1.docker.io", "/b", None)));
        assert_eq!(
            r("?z=2"),
            Some(t(
                "registry-1.docker.io",
                "/v2/library/alpine/blobs/sha256:ab",
                Some("z=2")
            ))
        );
        assert_eq!(r("https://h.example:443"), Some(t("h.example", "/", None)));
        assert_eq!(r("http://h.example/x"), None);
        assert_eq!(r("https://u:p@h.example/x"), None);
        assert_eq!(r("https://h.example/a b"), None);
        assert_eq!(r(""), None);
        assert_eq!(
            r("javascript:alert(1)"),
            Some(t(
                "registry-1.docker.io",
                "/v2/library/alpine/blobs/javascript:alert(1)",
                None
            ))
        );
    }

    #[test]
    fn sign_format() {
        // Known answer: HMAC-SHA256 with the message layout from design.md.
        let s = sign(&KEY, "docker.io", 100, "-", "h", "/p?q");
        let mut mac = HmacSha256::new_from_slice(&KEY).unwrap();
        mac.update(b"docker.io\n100\n-\nh\n/p?q");
        assert_eq!(s, hex(&mac.finalize().into_bytes()));
        assert_eq!(s.len(), 64);
        assert_ne!(s, sign(&KEY, "docker.io", 100, "-", "h", "/p"));
    }

    #[test]
    fn roundtrip_and_verify() {
        let cfg = parse_config(b"").unwrap();
        let target = t(
            "production.cloudflare.docker.com",
            "/x/y",
            Some("verify=1&a=%2F"),
        );
        let url = mirror_url("http://m:5000", &KEY, "docker.io", 2000, "-", &target);
        let path = url.strip_prefix("http://m:5000").unwrap();
        assert!(path.starts_with("/_mirror/redirect/docker.io/2000/-/"));
        assert!(path.ends_with("/production.cloudflare.docker.com/x/y?verify=1&a=%2F"));
        let sr = SignedRedirect::parse(path).unwrap();
        assert_eq!(sr.target, target);
        assert_eq!(sr.verify(&cfg, &KEY, 1000), Ok(()));
        assert_eq!(sr.verify(&cfg, &KEY, 2000), Ok(()));
        assert_eq!(sr.verify(&cfg, &KEY, 2001), Err(RedirectError::Expired));
        assert_eq!(
            sr.verify(&cfg, &[8u8; 32], 1000),
            Err(RedirectError::BadSignature)
        );
        assert_eq!(sr.verify(&cfg, &[], 1000), Err(RedirectError::BadSignature));
        // Tampering anywhere breaks the signature.
        for (a, b) in [
            ("verify=1", "verify=2"),
            ("/2000/", "/2001/"),
            ("/x/y", "/x/z"),
            ("docker.io/", "quay.io/"),
        ] {
            let p2 = path.replacen(a, b, 1);
            let r = SignedRedirect::parse(&p2).and_then(|s| s.verify(&cfg, &KEY, 1000));
            assert!(r.is_err(), "{a}->{b}");
        }
        let p2 = path.replace("?verify=1&a=%2F", "");
        assert_eq!(
            SignedRedirect::parse(&p2).unwrap().verify(&cfg, &KEY, 1000),
            Err(RedirectError::BadSignature)
        );
        // A validly signed URL to a host outside the allowlist is refused.
        let evil = mirror_url(
            "",
            &KEY,
            "docker.io",
            2000,
            "-",
            &t("evil.example", "/", None),
        );
        assert_eq!(
            SignedRedirect::parse(&evil)
                .unwrap()
                .verify(&cfg, &KEY, 1000),
            Err(RedirectError::HostNotAllowed)
        );
        let unk = mirror_url(
            "",
            &KEY,
            "nope.io",
            2000,
            "-",
            &t("evil.example", "/", None),
        );
        assert_eq!(
            SignedRedirect::parse(&unk)
                .unwrap()
                .verify(&cfg, &KEY, 1000),
            Err(RedirectError::UnknownRegistry)
        );
        // No query and no path.
        let bare = mirror_url(
            "",
            &KEY,
            "docker.io",
            5,
            "-",
            &t("registry-1.docker.io", "/", None),
        );
        assert_eq!(
            SignedRedirect::parse(&bare).unwrap().verify(&cfg, &KEY, 1),
            Ok(())
        );
    }

    #[test]
    fn malformed() {
        let sig = "a".repeat(64);
        for p in [
            "/_mirror/redirect/".to_string(),
            "/_mirror/redirect/docker.io/1/-".to_string(),
            format!("/_mirror/redirect/docker.io/x/-/{sig}/h/p"),
            format!("/_mirror/redirect/docker.io/01/-/{sig}/h/p"),
            format!("/_mirror/redirect/docker.io/1/abc/{sig}/h/p"),
            format!("/_mirror/redirect/docker.io/1/-/{}/h/p", "a".repeat(63)),
            format!("/_mirror/redirect/docker.io/1/-/{sig}/bad host/p"),
            format!("/_mirror/redirect/docker.io/1/-/{sig}/h/p\u{1}"),
            format!("/_mirror/redirect/docker.io/1/-/{sig}/H/p"),
            format!("/_mirror/redirect/docker.io/99999999999999999999999/-/{sig}/h/p"),
        ] {
            assert_eq!(
                SignedRedirect::parse(&p),
                Err(RedirectError::Malformed),
                "{p}"
            );
        }
    }

    #[test]
    fn locations() {
        let cfg = parse_config(b"").unwrap();
        let p = SignParams {
            registry: "docker.io",
            base_host: "registry-1.docker.io",
            base_path: "/v2/library/alpine/blobs/sha256:aa",
            mirror_base: "http://127.0.0.1:5000",
            cred: "-",
            key: &KEY,
            now: 1000,
        };
        match rewrite_location(
            &cfg,
            &p,
            "https://production.cloudflare.docker.com/x?verify=1",
        ) {
            LocationOutcome::Signed(u) => {
                assert!(u.starts_with("http://127.0.0.1:5000/_mirror/redirect/docker.io/2200/-/"));
                let sr = SignedRedirect::parse(u.strip_prefix("http://127.0.0.1:5000").unwrap())
                    .unwrap();
                assert_eq!(sr.verify(&cfg, &KEY, 1500), Ok(()));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(
            rewrite_location(&cfg, &p, "https://evil.example/x"),
            LocationOutcome::Rejected
        );
        let no_key = SignParams { key: &[], ..p };
        assert_eq!(
            rewrite_location(&cfg, &no_key, "https://production.cloudflare.docker.com/x"),
            LocationOutcome::Rejected
        );
        let cfg2 = parse_config(br#"{"registries":[{"name":"docker.io","upstream":"registry-1.docker.io","redirects":"passthrough"}]}"#).unwrap();
        assert_eq!(
            rewrite_location(&cfg2, &p, "/x"),
            LocationOutcome::Passthrough
        );
    }
}
