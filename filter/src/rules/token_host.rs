//! Token hosts: signed redirect targets that are resource servers of their registry's
//! token service (they challenge with the registry's own realm), so the registry's
//! tokens are meant for them and are not dropped when a client repeats one.
//!
//! Recorded per Envoy in proxy-wasm shared data, one key per registry
//! ([`key`]) holding a bounded newline-separated list of hosts ([`TokenHosts`]).

use super::config::Registry;
use super::token::learn_realm;

/// Shared-data key prefix; the key is `mirror.token_host.<registry>`.
pub const KEY_PREFIX: &str = "mirror.token_host.";

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

impl TokenHosts {
    /// Parses a shared-data value; malformed entries are ignored, at most [`MAX_HOSTS`] kept.
    pub fn decode(bytes: &[u8]) -> Self {
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
    pub fn encode(&self) -> String {
        self.hosts.join("\n")
    }

    /// Is `host` (lowercase `host[:port]`) recorded?
    pub fn contains(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
    }

    /// Adds `host`; false when it was already there, the list is full or `host` is
    /// not a plain lowercase authority.
    pub fn insert(&mut self, host: &str) -> bool {
        if self.contains(host) || self.hosts.len() >= MAX_HOSTS || !is_recordable(host) {
            return false;
        }
        self.hosts.push(host.to_string());
        true
    }
}

fn is_recordable(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOST_LEN
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:[]".contains(&b))
}

/// Response phase of a signed redirect target: does this answer make the target a token
/// host of `registry`? Only a 401 whose Bearer challenge names a realm on the registry's
/// `realm_hosts` (S3-style stores never challenge with a registry's realm).
pub fn is_token_host_challenge(
    registry: &Registry,
    status: Option<u32>,
    www_authenticate: &[String],
) -> bool {
    status == Some(401) && learn_realm(registry, www_authenticate).is_ok()
}

/// Request phase of a signed redirect target: remove the client's `Authorization`?
/// Yes when its fingerprint is the URL's `<cred>` (a token issued for the registry that
/// redirected), unless the target is a recorded token host of that registry, which wants
/// that very token. `is_token_host` is only asked when the fingerprint matches.
pub fn strip_credential(
    cred: &str,
    authorization: Option<&str>,
    is_token_host: impl FnOnce() -> bool,
) -> bool {
    let matches = cred != "-"
        && authorization.is_some_and(|a| super::redirect::credential_fingerprint(Some(a)) == cred);
    matches && !is_token_host()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::config::parse as parse_config;
    use crate::rules::redirect::credential_fingerprint;

    #[test]
    fn strip_decision() {
        let cred = credential_fingerprint(Some("Bearer quay"));
        // The registry's token on a store that is not a token host: dropped.
        assert!(strip_credential(&cred, Some("Bearer quay"), || false));
        // On a recorded token host: kept.
        assert!(!strip_credential(&cred, Some("Bearer quay"), || true));
        // Another credential (from the target's own challenge) or none: never stripped,
        // and the token-host state is not consulted.
        let never = || -> bool { panic!("consulted") };
        assert!(!strip_credential(&cred, Some("Bearer fresh"), never));
        assert!(!strip_credential(&cred, None, never));
        assert!(!strip_credential("-", Some("Bearer quay"), never));
        assert!(!strip_credential("-", None, never));
    }

    #[test]
    fn recording_decision() {
        let cfg = parse_config(b"").unwrap();
        let quay = cfg.registry("quay.io").unwrap();
        let own = vec![
            r#"Bearer realm="https://quay.io/v2/auth",service="quay.io",scope="repository:a/b:pull""#
                .to_string(),
        ];
        assert!(is_token_host_challenge(quay, Some(401), &own));
        // Not a 401, or a realm not on quay's realm_hosts, or no Bearer: not recorded.
        assert!(!is_token_host_challenge(quay, Some(403), &own));
        assert!(!is_token_host_challenge(quay, None, &own));
        let foreign =
            vec![r#"Bearer realm="https://auth.docker.io/token",service="x""#.to_string()];
        assert!(!is_token_host_challenge(quay, Some(401), &foreign));
        let basic = vec![r#"Basic realm="https://quay.io/v2/auth""#.to_string()];
        assert!(!is_token_host_challenge(quay, Some(401), &basic));
        assert!(!is_token_host_challenge(quay, Some(401), &[]));
        // A foreign challenge followed by the registry's own: recorded.
        let both = vec![foreign[0].clone(), own[0].clone()];
        assert!(is_token_host_challenge(quay, Some(401), &both));
        // docker.io's realm is another registry's: not a token host of quay.io.
        let docker = cfg.registry("docker.io").unwrap();
        assert!(!is_token_host_challenge(docker, Some(401), &own));
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
