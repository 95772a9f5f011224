//! Token hosts: signed redirect targets that are resource servers of their registry's
//! token service (they challenge with the registry's own realm), so Bearer tokens are
//! meant for them; every other redirect target gets no credential at all.
//!
//! Recorded per Envoy in proxy-wasm shared data, one key per registry
//! ([`key`]) holding a bounded newline-separated list of hosts ([`TokenHosts`]).

use super::challenge::is_token68;
use super::SharedSet;

/// Shared-data key prefix; the key is `mirror.token_host.<registry>`.
const KEY_PREFIX: &str = "mirror.token_host.";

/// At most this many token hosts are recorded per registry; further ones are not.
pub const MAX_HOSTS: usize = 16;

/// Longest host (`host[:port]`) recorded.
const MAX_HOST_LEN: usize = 255;

/// Shared-data key of `registry`'s token hosts.
pub fn key(registry: &str) -> String {
    format!("{KEY_PREFIX}{registry}")
}

/// The recorded token hosts of one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenHosts {
    hosts: Vec<String>,
}

impl SharedSet for TokenHosts {
    type Item = str;

    /// Parses a shared-data value; malformed entries are ignored, at most [`MAX_HOSTS`] kept.
    fn decode(bytes: &[u8]) -> Self {
        let hosts = std::str::from_utf8(bytes)
            .unwrap_or_default()
            .split('\n')
            .filter(|h| is_recordable(h))
            .take(MAX_HOSTS)
            .map(str::to_string)
            .collect();
        TokenHosts { hosts }
    }

    /// Shared-data value.
    fn encode(&self) -> String {
        self.hosts.join("\n")
    }

    /// Adds `host`; false when it was already there, the list is full or `host` is
    /// not a plain lowercase authority.
    fn insert(&mut self, host: &str) -> bool {
        if self.contains(host) || self.hosts.len() >= MAX_HOSTS || !is_recordable(host) {
            return false;
        }
        self.hosts.push(host.to_string());
        true
    }
}

impl TokenHosts {
    /// Is `host` (lowercase `host[:port]`) recorded?
    pub fn contains(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
    }
}

fn is_recordable(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOST_LEN
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:[]".contains(&b))
}

/// Request phase of a signed redirect target: remove the client's `Authorization`?
/// Always, except a Bearer token (scheme case-insensitive) to a recorded token host of
/// the registry, which challenged with that registry's realm and so wants its tokens.
/// Basic credentials never reach a redirect target. `is_token_host` is only asked for a
/// Bearer credential.
pub fn strip_credential(authorization: Option<&str>, is_token_host: impl FnOnce() -> bool) -> bool {
    match authorization {
        None => false,
        Some(a) => !(is_bearer(a) && is_token_host()),
    }
}

/// `Bearer <token>`, the scheme compared case-insensitively, the token one token68 (RFC
/// 6750 `b64token`): several credentials in one value (`Bearer t, Basic …`, as repeated
/// headers are joined) are not one Bearer token.
pub(crate) fn is_bearer(authorization: &str) -> bool {
    authorization
        .split_once(' ')
        .is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && is_token68(token.trim())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_decision() {
        // Any credential to a target that is not a token host: dropped (a refreshed
        // token, Basic, another spelling of the scheme alike).
        for a in [
            "Bearer quay",
            "bearer quay",
            "BEARER fresh",
            "Basic dTpw",
            "Bearer",
            "x",
        ] {
            assert!(strip_credential(Some(a), || false), "{a}");
        }
        // A Bearer token to a recorded token host: kept, whatever the spelling.
        for a in ["Bearer quay", "bearer fresh", "BeArEr t"] {
            assert!(!strip_credential(Some(a), || true), "{a}");
        }
        // Basic (or no token) never passes, and the token-host state is not consulted.
        let never = || -> bool { panic!("consulted") };
        for a in ["Basic dTpw", "Bearer ", "Bearer", "Token abc"] {
            assert!(strip_credential(Some(a), never), "{a}");
        }
        // Only a single token68 is a Bearer token: not a Basic login joined behind one.
        for a in [
            "Bearer t, Basic dTpw",
            "Bearer t,Basic dTpw",
            "Bearer a b",
            "Bearer =x",
            "Bearer ==",
        ] {
            assert!(strip_credential(Some(a), never), "{a}");
        }
        for a in ["Bearer eyJ.eyJ-_.sig~+/==", "Bearer t "] {
            assert!(!strip_credential(Some(a), || true), "{a}");
        }
        // Nothing to strip.
        assert!(!strip_credential(None, never));
    }

    #[test]
    fn list_is_bounded() {
        assert_eq!(key("quay.io"), "mirror.token_host.quay.io");
        let mut t = TokenHosts::decode(b"");
        assert!(!t.contains("cdn.quay.io"));
        assert!(t.insert("cdn.quay.io"));
        assert!(!t.insert("cdn.quay.io"));
        assert!(!t.insert("Bad Host"));
        assert!(t.contains("cdn.quay.io"));
        let again = TokenHosts::decode(t.encode().as_bytes());
        assert_eq!(again, t);
        for i in 0..40 {
            t.insert(&format!("h{i}.example:8443"));
        }
        assert_eq!(t.hosts.len(), MAX_HOSTS);
        assert!(t.contains("cdn.quay.io"));
        let long: String = (0..40)
            .map(|i| format!("h{i}.example"))
            .collect::<Vec<_>>()
            .join("\n");
        let d = TokenHosts::decode(format!("{long}\nBAD\n\u{1}").as_bytes());
        assert_eq!(d.hosts.len(), MAX_HOSTS);
        assert_eq!(TokenHosts::decode(&[0xff, 0xfe]), TokenHosts::default());
    }
}
