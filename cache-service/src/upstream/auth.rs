//! The bearer-token cache and the token service's answers (challenges are parsed by
//! `registry_rules::challenge`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

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
    t.len() <= MAX_TOKEN_LEN && registry_rules::challenge::is_token68(t)
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

    mod proptest_token_responses {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testserver::proptest_config())]

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
