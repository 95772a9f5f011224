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

/// Cached bearer tokens per (realm, service, scope).
#[derive(Debug, Default)]
pub struct TokenCache {
    map: HashMap<(String, String, String), (String, Instant)>,
}

/// Lifetime used when the token response has no `expires_in`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);

/// How long before its stated expiry a token is no longer used.
pub fn usable_for(expires_in: Duration) -> Duration {
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
        if self.map.len() > 4096 {
            self.map.retain(|_, (_, until)| *until > now);
        }
        self.map.insert(
            (realm.to_owned(), service.to_owned(), scope.to_owned()),
            (token, now + usable_for(expires_in)),
        );
    }
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
pub fn token_of(body: &serde_json::Value) -> Option<&str> {
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
}
