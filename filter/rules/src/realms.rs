//! Issued realms: the token realm URLs a registry actually sent in a challenge the filter
//! rewrote. Only those may be asked through `/_mirror/auth/`: a realm host on
//! `realm_hosts` alone would open every path of that host (or of every host a wildcard
//! matches) to clients and their credentials.
//!
//! Recorded per Envoy in proxy-wasm shared data, one key per registry ([`key`]) holding a
//! bounded newline-separated list of `<host[:port]><path>` ([`IssuedRealms`]).

use super::challenge::LearnedRealm;
use super::hosts::is_valid_authority;
use super::url::{is_url_char, parse_url};
use super::SharedSet;

/// Shared-data key prefix; the key is `mirror.realms.<registry>`.
const KEY_PREFIX: &str = "mirror.realms.";

/// At most this many realm URLs are kept per registry; the oldest goes first.
pub const MAX_REALMS: usize = 8;

/// Longest realm URL (`host` + `path`) kept.
const MAX_LEN: usize = 512;

/// Shared-data key of `registry`'s issued realms.
pub fn key(registry: &str) -> String {
    format!("{KEY_PREFIX}{registry}")
}

/// A realm URL without scheme and query: what a `/_mirror/auth/<host><path>` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealmUrl {
    /// Lowercase `host[:port]` (default port dropped).
    pub authority: String,
    /// Path starting with `/`.
    pub path: String,
}

impl RealmUrl {
    /// From a realm URL as a challenge sends it; `None` unless absolute http(s).
    pub fn from_realm(realm: &str) -> Option<Self> {
        let u = parse_url(realm)?;
        let path = if u.path.is_empty() {
            "/".to_string()
        } else {
            u.path
        };
        RealmUrl::new(&u.authority, &path)
    }

    /// Validated: a plain authority and a printable path without query.
    pub fn new(authority: &str, path: &str) -> Option<Self> {
        let ok = is_valid_authority(authority)
            && path.starts_with('/')
            && authority.len() + path.len() <= MAX_LEN
            && path.bytes().all(|b| is_url_char(b) && b != b'?');
        ok.then(|| RealmUrl {
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }

    fn encode(&self) -> String {
        format!("{}{}", self.authority, self.path)
    }

    fn decode(s: &str) -> Option<Self> {
        let i = s.find('/')?;
        RealmUrl::new(s.get(..i)?, s.get(i..)?)
    }
}

/// The issued realm URLs of one registry, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssuedRealms {
    realms: Vec<RealmUrl>,
}

impl SharedSet for IssuedRealms {
    type Item = RealmUrl;

    /// Parses a shared-data value; malformed entries are ignored, at most [`MAX_REALMS`].
    fn decode(bytes: &[u8]) -> Self {
        let realms = std::str::from_utf8(bytes)
            .unwrap_or_default()
            .split('\n')
            .filter_map(RealmUrl::decode)
            .take(MAX_REALMS)
            .collect();
        IssuedRealms { realms }
    }

    /// Shared-data value.
    fn encode(&self) -> String {
        let v: Vec<String> = self.realms.iter().map(RealmUrl::encode).collect();
        v.join("\n")
    }

    /// Adds `realm` (dropping the oldest when full); false when it was already there.
    fn insert(&mut self, realm: &RealmUrl) -> bool {
        if self.contains(&realm.authority, &realm.path) {
            return false;
        }
        if self.realms.len() >= MAX_REALMS {
            self.realms.remove(0);
        }
        self.realms.push(realm.clone());
        true
    }
}

impl IssuedRealms {
    /// Was `authority` + `path` issued?
    pub fn contains(&self, authority: &str, path: &str) -> bool {
        self.realms
            .iter()
            .any(|r| r.authority == authority && r.path == path)
    }

    /// Was `authority` + `path` issued: in the set, or the registry's `stored` realm (stored
    /// with the set, but the set drops its oldest entries, the stored realm stays)?
    /// `stored` is read only when the set does not have it.
    pub fn issued(
        &self,
        stored: impl FnOnce() -> Option<LearnedRealm>,
        authority: &str,
        path: &str,
    ) -> bool {
        self.contains(authority, path)
            || stored()
                .and_then(|l| RealmUrl::from_realm(&l.realm))
                .is_some_and(|u| u.authority == authority && u.path == path)
    }

    /// Number of realm URLs kept (the property tests check the bound).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.realms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_round_trips() {
        assert_eq!(key("quay.io"), "mirror.realms.quay.io");
        let mut s = IssuedRealms::decode(b"");
        assert!(s.realms.is_empty());
        let quay = RealmUrl::from_realm("https://Quay.io:443/v2/auth?x=1").unwrap();
        assert_eq!(
            quay,
            RealmUrl {
                authority: "quay.io".into(),
                path: "/v2/auth".into()
            }
        );
        assert!(s.insert(&quay));
        assert!(!s.insert(&quay));
        assert!(s.contains("quay.io", "/v2/auth"));
        assert!(!s.contains("quay.io", "/api/v1/user/"));
        assert!(!s.contains("quay.io", "/v2/auth/"));
        assert_eq!(IssuedRealms::decode(s.encode().as_bytes()), s);
        for i in 0..20 {
            s.insert(&RealmUrl::new(&format!("h{i}.pkg.dev"), "/v2/token").unwrap());
        }
        assert_eq!(s.realms.len(), MAX_REALMS);
        // The oldest went first; the newest are kept.
        assert!(!s.contains("quay.io", "/v2/auth"));
        assert!(s.contains("h19.pkg.dev", "/v2/token"));
        let d = IssuedRealms::decode(b"quay.io/v2/auth\nBAD HOST/x\nnoslash\nq.io/a?b\n\x01");
        assert_eq!(d.realms.len(), 1);
        assert_eq!(IssuedRealms::decode(&[0xff]), IssuedRealms::default());
        for bad in ["ftp://quay.io/x", "quay.io/v2/auth", "https://u@quay.io/x"] {
            assert_eq!(RealmUrl::from_realm(bad), None, "{bad}");
        }
        // The stored realm counts as issued even when the set dropped it.
        let stored = || LearnedRealm::new("https://quay.io/v2/auth", Some("quay.io"));
        assert!(!s.contains("quay.io", "/v2/auth"));
        assert!(s.issued(stored, "quay.io", "/v2/auth"));
        assert!(!s.issued(stored, "quay.io", "/v2/auth/x"));
        assert!(!s.issued(|| None, "quay.io", "/v2/auth"));
        let unread = || -> Option<LearnedRealm> { panic!("store read") };
        assert!(s.issued(unread, "h19.pkg.dev", "/v2/token"));
        assert_eq!(
            RealmUrl::from_realm("https://quay.io").unwrap().path,
            "/".to_string()
        );
    }
}
