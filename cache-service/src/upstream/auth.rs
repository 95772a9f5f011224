//! `WWW-Authenticate` challenge parsing (RFC 7235 lists) and the bearer-token cache.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// One challenge: lower-cased scheme and lower-cased parameter names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn param(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str)
    }
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~/:".contains(c)
}

struct Lexer<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<char> {
        self.s.get(self.i..).and_then(|r| r.chars().next())
    }
    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += c.len_utf8();
        Some(c)
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.bump();
        }
    }
    fn token(&mut self) -> &'a str {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.bump();
        }
        self.s.get(start..self.i).unwrap_or("")
    }
    fn quoted(&mut self) -> String {
        let mut out = String::new();
        // opening quote already consumed
        while let Some(c) = self.bump() {
            match c {
                '"' => break,
                '\\' => {
                    if let Some(n) = self.bump() {
                        out.push(n);
                    }
                }
                c => out.push(c),
            }
        }
        out
    }
}

/// Parse a `WWW-Authenticate` value into its challenges, e.g.
/// `Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io"`.
pub fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut lx = Lexer { s: value, i: 0 };
    let mut out = Vec::new();
    loop {
        while matches!(lx.peek(), Some(' ' | '\t' | ',')) {
            lx.bump();
        }
        if lx.peek().is_none() {
            break;
        }
        let scheme = lx.token();
        if scheme.is_empty() {
            // Garbage: skip one char and keep going.
            lx.bump();
            continue;
        }
        let mut ch = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: BTreeMap::new(),
        };
        loop {
            let save = lx.i;
            while matches!(lx.peek(), Some(' ' | '\t' | ',')) {
                lx.bump();
            }
            let name = lx.token();
            lx.ws();
            if name.is_empty() || lx.peek() != Some('=') {
                lx.i = save;
                break;
            }
            lx.bump(); // '='
            lx.ws();
            let val = if lx.peek() == Some('"') {
                lx.bump();
                lx.quoted()
            } else {
                let start = lx.i;
                while lx.peek().is_some_and(|c| c != ',' && c != ' ' && c != '\t') {
                    lx.bump();
                }
                lx.s.get(start..lx.i).unwrap_or("").to_owned()
            };
            ch.params.insert(name.to_ascii_lowercase(), val);
        }
        out.push(ch);
    }
    out
}

/// Cached bearer tokens per (realm, service, scope), at most [`MAX_TOKEN_ENTRIES`].
#[derive(Debug, Default)]
pub struct TokenCache {
    map: HashMap<(String, String, String), (String, Instant)>,
    /// Bytes of keys and tokens held.
    bytes: usize,
    evictions: u64,
}

/// Lifetime used when the token response has no `expires_in`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Longest a token is used, whatever `expires_in` says (and `Instant` arithmetic stays far
/// from overflow).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(86_400);
/// Tokens kept per client; one per (realm, service, scope), so per repository.
pub const MAX_TOKEN_ENTRIES: usize = 4096;
/// Bytes of keys and tokens kept per client (a hostile challenge's realm or scope can be long).
pub const MAX_TOKEN_CACHE_BYTES: usize = 8 * 1024 * 1024;
/// A token service's answer is read up to this size (Docker Hub's is ~2 KiB).
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// A token longer than this is no plausible header value.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

fn entry_size((realm, service, scope): &(String, String, String), token: &str) -> usize {
    realm.len() + service.len() + scope.len() + token.len()
}

/// How long before its stated expiry a token is no longer used.
pub fn usable_for(expires_in: Duration) -> Duration {
    let expires_in = expires_in.min(MAX_TOKEN_TTL);
    let margin = std::cmp::min(Duration::from_secs(10), expires_in / 5);
    expires_in.saturating_sub(margin)
}

impl TokenCache {
    pub fn get(&self, realm: &str, service: &str, scope: &str, now: Instant) -> Option<String> {
        let (tok, until) =
            self.map
                .get(&(realm.to_owned(), service.to_owned(), scope.to_owned()))?;
        (now < *until).then(|| tok.clone())
    }

    pub fn put(
        &mut self,
        realm: &str,
        service: &str,
        scope: &str,
        token: String,
        expires_in: Duration,
        now: Instant,
    ) {
        let key = (realm.to_owned(), service.to_owned(), scope.to_owned());
        let size = entry_size(&key, &token);
        if size > MAX_TOKEN_CACHE_BYTES / 16 {
            return; // used once, not kept
        }
        self.remove(&key);
        let full =
            |c: &Self| c.map.len() >= MAX_TOKEN_ENTRIES || c.bytes + size > MAX_TOKEN_CACHE_BYTES;
        if full(self) {
            self.map.retain(|_, (_, until)| *until > now);
            self.bytes = self.map.iter().map(|(k, (t, _))| entry_size(k, t)).sum();
        }
        // Still full of live tokens: drop those closest to expiry.
        while full(self) {
            let soonest = self
                .map
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(k, _)| k.clone());
            let Some(k) = soonest else { break };
            self.remove(&k);
            self.evictions += 1;
        }
        let until = now.checked_add(usable_for(expires_in)).unwrap_or(now);
        self.bytes += size;
        self.map.insert(key, (token, until));
    }

    fn remove(&mut self, key: &(String, String, String)) {
        if let Some((t, _)) = self.map.remove(key) {
            self.bytes -= entry_size(key, &t);
        }
    }

    /// Forget `token` for this key (the registry refused it: revoked or expired early). A
    /// different token stored meanwhile by another request stays.
    pub fn invalidate(&mut self, realm: &str, service: &str, scope: &str, token: &str) {
        let key = (realm.to_owned(), service.to_owned(), scope.to_owned());
        if self.map.get(&key).is_some_and(|(t, _)| t == token) {
            self.remove(&key);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Live tokens dropped because the cache was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

/// Why a token service's answer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("response is not JSON: {0}")]
    Json(String),
    #[error("response has no token")]
    Missing,
    #[error("token is not a plausible header value ({0} bytes, or characters outside token68)")]
    Implausible(usize),
}

/// A token that can go into `Authorization: Bearer <token>`: RFC 7235 token68 (what JWTs and
/// OAuth2 access tokens are made of), bounded in length.
pub fn plausible_token(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && t.len() <= MAX_TOKEN_LEN
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// A token service's answer (already read, bounded): the token and how long to use it.
pub fn parse_token_response(body: &[u8]) -> Result<(String, Duration), TokenError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| TokenError::Json(e.to_string()))?;
    let token = token_of(&v).ok_or(TokenError::Missing)?;
    if !plausible_token(token) {
        return Err(TokenError::Implausible(token.len()));
    }
    let ttl = v
        .get("expires_in")
        .and_then(|e| e.as_u64())
        .filter(|e| *e > 0)
        .map(|e| Duration::from_secs(e).min(MAX_TOKEN_TTL))
        .unwrap_or(DEFAULT_TOKEN_TTL);
    Ok((token.to_owned(), ttl))
}

/// The token request for a Bearer challenge: `<realm>?service=…&scope=…` (the realm's own
/// query kept). Only http(s) realms.
pub fn token_url(realm: &str, service: &str, scope: &str) -> Result<url::Url, String> {
    let mut url = url::Url::parse(realm).map_err(|e| e.to_string())?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err("realm is not an http(s) URL".into());
    }
    {
        let mut query = url.query_pairs_mut();
        if !service.is_empty() {
            query.append_pair("service", service);
        }
        if !scope.is_empty() {
            query.append_pair("scope", scope);
        }
    }
    Ok(url)
}

/// The token of a token service's JSON answer: `token`, else OAuth2's `access_token`.
fn token_of(body: &serde_json::Value) -> Option<&str> {
    body.get("token")
        .or_else(|| body.get("access_token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/alpine:pull"));
    }

    #[test]
    fn list_of_challenges() {
        let c = parse_challenges(
            r#"Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("quay.io"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("service"), Some("quay.io"));
    }

    #[test]
    fn odd_input() {
        let c = parse_challenges(r#"Bearer realm = "a\"b, c" , service=tok , Basic"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("a\"b, c"));
        assert_eq!(c[0].param("service"), Some("tok"));
        assert_eq!(c[1].scheme, "basic");
        assert!(parse_challenges("").is_empty());
        let _ = parse_challenges("\"\"\"=,,,=\u{e9}");
        let c = parse_challenges("BEARER REALM=\"x\"");
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("x"));
    }

    #[test]
    fn token_expiry() {
        let mut tc = TokenCache::default();
        let t0 = Instant::now();
        tc.put("r", "s", "sc", "tok".into(), Duration::from_secs(60), t0);
        assert_eq!(tc.get("r", "s", "sc", t0).as_deref(), Some("tok"));
        assert_eq!(tc.get("r", "s", "other", t0), None);
        assert!(tc
            .get("r", "s", "sc", t0 + Duration::from_secs(49))
            .is_some());
        assert!(tc
            .get("r", "s", "sc", t0 + Duration::from_secs(51))
            .is_none());
        tc.put("r", "s", "sc", "t2".into(), Duration::from_secs(5), t0);
        assert!(tc
            .get("r", "s", "sc", t0 + Duration::from_secs(3))
            .is_some());
        assert!(tc
            .get("r", "s", "sc", t0 + Duration::from_secs(5))
            .is_none());
    }

    #[test]
    fn huge_expires_in_is_capped_not_a_panic() {
        let body = br#"{"token":"abc.def-_","expires_in":18446744073709551615}"#;
        let (t, ttl) = parse_token_response(body).unwrap();
        assert_eq!((t.as_str(), ttl), ("abc.def-_", MAX_TOKEN_TTL));
        let mut tc = TokenCache::default();
        let t0 = Instant::now();
        tc.put("r", "s", "sc", t, Duration::MAX, t0);
        assert!(tc
            .get("r", "s", "sc", t0 + Duration::from_secs(3600))
            .is_some());
        assert!(tc.get("r", "s", "sc", t0 + MAX_TOKEN_TTL).is_none());
    }

    #[test]
    fn implausible_tokens_refused() {
        let long = format!(r#"{{"token":"{}"}}"#, "a".repeat(MAX_TOKEN_LEN + 1));
        for body in [
            r#"{"token":"a\r\nX-Evil: 1"}"#,
            r#"{"token":"two words"}"#,
            r#"{"token":"==="}"#,
            r#"{"token":"caf\u00e9"}"#,
            long.as_str(),
        ] {
            assert!(
                matches!(
                    parse_token_response(body.as_bytes()),
                    Err(TokenError::Implausible(_))
                ),
                "{body}"
            );
        }
        assert_eq!(
            parse_token_response(br#"{"access_token":"ya29.a0Af/x+y=="}"#)
                .unwrap()
                .0,
            "ya29.a0Af/x+y=="
        );
        assert_eq!(parse_token_response(b"{}"), Err(TokenError::Missing));
        assert!(matches!(
            parse_token_response(b"<html>"),
            Err(TokenError::Json(_))
        ));
    }

    #[test]
    fn token_cache_is_bounded_and_invalidates() {
        let mut tc = TokenCache::default();
        let t0 = Instant::now();
        for i in 0..MAX_TOKEN_ENTRIES + 10 {
            let ttl = Duration::from_secs(1000 + i as u64);
            tc.put("r", "s", &format!("sc{i}"), format!("t{i}"), ttl, t0);
        }
        assert_eq!(tc.len(), MAX_TOKEN_ENTRIES);
        assert_eq!(tc.evictions(), 10);
        assert!(
            tc.get("r", "s", "sc0", t0).is_none(),
            "closest to expiry went first"
        );
        let last = format!("sc{}", MAX_TOKEN_ENTRIES + 9);
        assert!(tc.get("r", "s", &last, t0).is_some());

        tc.invalidate("r", "s", &last, "someone else's");
        assert!(
            tc.get("r", "s", &last, t0).is_some(),
            "only the refused token goes"
        );
        tc.invalidate("r", "s", &last, &format!("t{}", MAX_TOKEN_ENTRIES + 9));
        assert!(tc.get("r", "s", &last, t0).is_none());

        // Long realms and scopes (a hostile challenge): bounded in bytes too.
        let mut tc = TokenCache::default();
        let long = "x".repeat(MAX_TOKEN_CACHE_BYTES / 64);
        for i in 0..200 {
            tc.put(
                &long,
                "s",
                &format!("sc{i}"),
                "t".into(),
                Duration::from_secs(60 + i),
                t0,
            );
            assert!(tc.bytes <= MAX_TOKEN_CACHE_BYTES);
        }
        assert!(tc.len() < 200 && tc.len() > 50, "{}", tc.len());
        tc.put(
            &"y".repeat(MAX_TOKEN_CACHE_BYTES),
            "s",
            "c",
            "t".into(),
            Duration::from_secs(60),
            t0,
        );
        assert!(
            tc.get(&"y".repeat(MAX_TOKEN_CACHE_BYTES), "s", "c", t0)
                .is_none(),
            "not kept"
        );
        assert_eq!(
            tc.bytes,
            tc.map
                .iter()
                .map(|(k, (t, _))| entry_size(k, t))
                .sum::<usize>()
        );
    }

    mod proptest_challenges {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testserver::proptest_config())]

            #[test]
            fn proptest_parse_challenges_never_panics(s in "\\PC{0,200}") {
                for c in parse_challenges(&s) {
                    prop_assert!(!c.scheme.is_empty());
                    prop_assert_eq!(c.scheme.clone(), c.scheme.to_ascii_lowercase());
                }
            }

            #[test]
            fn proptest_challenge_round_trip(
                scheme in "[A-Za-z][A-Za-z0-9]{0,10}",
                realm in "[ -~]{0,60}",
                service in "[A-Za-z0-9.:-]{1,30}",
            ) {
                let quoted = realm.replace('\\', "\\\\").replace('"', "\\\"");
                let header = format!("{scheme} realm=\"{quoted}\", service={service}, Basic");
                let c = parse_challenges(&header);
                prop_assert_eq!(c.len(), 2);
                prop_assert_eq!(c[0].scheme.clone(), scheme.to_ascii_lowercase());
                prop_assert_eq!(c[0].param("realm"), Some(realm.as_str()));
                prop_assert_eq!(c[0].param("service"), Some(service.as_str()));
            }

            #[test]
            fn proptest_token_response_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300), exp in any::<u64>()) {
                let _ = parse_token_response(&body);
                let json = format!(r#"{{"token":"t","expires_in":{exp}}}"#);
                let (_, ttl) = parse_token_response(json.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(ttl <= MAX_TOKEN_TTL);
                let mut tc = TokenCache::default();
                tc.put("r", "s", "c", "t".into(), Duration::from_secs(exp), Instant::now());
            }
        }
    }
}
