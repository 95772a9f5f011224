//! Host names and host patterns: the one DNS-name, authority and pattern grammar used by
//! the filter, the cache and the generator.

use std::fmt;

/// Validates a DNS host name (lowercase labels, IPv4 allowed); no port.
pub fn is_valid_hostname(h: &str) -> bool {
    if h.is_empty() || h.len() > 253 {
        return false;
    }
    // One pass over the bytes (every realm and redirect target is checked): each label
    // non-empty, at most 63 of `[a-z0-9-]`, neither starting nor ending with `-`.
    let mut label = 0usize;
    let mut prev = b'.';
    for &c in h.as_bytes() {
        if c == b'.' {
            if label == 0 || prev == b'-' {
                return false;
            }
            label = 0;
        } else {
            let ok = c.is_ascii_lowercase() || c.is_ascii_digit() || (c == b'-' && label > 0);
            label += 1;
            if !ok || label > 63 {
                return false;
            }
        }
        prev = c;
    }
    label > 0 && prev != b'-'
}

/// Validates a port: 1..=65535, digits only, no leading zero.
fn is_valid_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && !p.starts_with('0')
        && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
}

/// Validates `host[:port]` (lowercase).
pub fn is_valid_authority(a: &str) -> bool {
    let colon = crate::url::find_byte(a, b':');
    match (a.get(..colon), a.get(colon + 1..)) {
        (Some(h), Some(p)) => is_valid_hostname(h) && is_valid_port(p),
        _ => is_valid_hostname(a),
    }
}

/// A host or host pattern that is not `host[:port]` or `*.suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHost(pub String);

impl fmt::Display for BadHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid host or host pattern {:?}", self.0)
    }
}

impl std::error::Error for BadHost {}

/// An exact `host[:port]` or a leading wildcard `*.suffix`.
///
/// Ordered (exact hosts first) so a set of them renders in a stable order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostPattern {
    /// Matches exactly this `host[:port]`.
    Exact(String),
    /// Matches any host ending in `.<suffix>` with at least one more label (no port).
    Wildcard(String),
}

impl HostPattern {
    /// Parses a pattern; input is lowercased first.
    pub fn parse(s: &str) -> Result<Self, BadHost> {
        let l = s.trim().to_ascii_lowercase();
        if let Some(suffix) = l.strip_prefix("*.") {
            if is_valid_hostname(suffix) {
                return Ok(HostPattern::Wildcard(suffix.to_string()));
            }
        } else if is_valid_authority(&l) {
            return Ok(HostPattern::Exact(l));
        }
        Err(BadHost(s.to_string()))
    }

    /// Does this pattern match a (lowercase, normalized) `host[:port]`?
    pub fn matches(&self, authority: &str) -> bool {
        match self {
            HostPattern::Exact(e) => e == authority,
            HostPattern::Wildcard(suffix) => {
                if authority.contains(':') {
                    return false;
                }
                authority
                    .strip_suffix(suffix.as_str())
                    .and_then(|p| p.strip_suffix('.'))
                    .is_some_and(|label| !label.is_empty())
            }
        }
    }

    /// An exact pattern's host and port (`default_port` when it names none).
    pub fn host_port(&self, default_port: u16) -> Option<(&str, u16)> {
        let HostPattern::Exact(authority) = self else {
            return None;
        };
        Some(match authority.split_once(':') {
            // Validated by `parse`: 1..=65535.
            Some((host, port)) => (host, port.parse().unwrap_or(default_port)),
            None => (authority.as_str(), default_port),
        })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(e) => f.write_str(e),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// True when any pattern matches.
pub fn any_match(patterns: &[HostPattern], authority: &str) -> bool {
    patterns.iter().any(|p| p.matches(authority))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// The grammar of [`is_valid_hostname`] as stated, label by label.
    fn hostname_reference(h: &str) -> bool {
        !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|label| {
                let b = label.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && b.iter()
                        .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                    && b.first() != Some(&b'-')
                    && b.last() != Some(&b'-')
            })
    }

    proptest! {
        #[test]
        fn hostname_check_agrees_with_the_grammar(
            h in prop_oneof!["[a-z0-9.-]{0,12}", "[a-zA-Z0-9._:-]{0,20}", "([a-z-]{0,64}\\.){0,5}[a-z0-9-]{0,64}"],
        ) {
            prop_assert_eq!(is_valid_hostname(&h), hostname_reference(&h), "{}", h);
        }
    }

    use super::*;

    #[test]
    fn patterns() {
        let w = HostPattern::parse("*.Example.com").unwrap();
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("aexample.com"));
        assert!(!w.matches("a.example.com:8443"));
        let e = HostPattern::parse("localhost:5000").unwrap();
        assert!(e.matches("localhost:5000"));
        assert!(!e.matches("localhost"));
        assert_eq!(w.to_string(), "*.example.com");
        assert_eq!(e.host_port(443), Some(("localhost", 5000)));
        assert_eq!(
            HostPattern::parse("quay.io").unwrap().host_port(443),
            Some(("quay.io", 443))
        );
        assert_eq!(w.host_port(443), None);
        for bad in [
            "",
            "*",
            "*.",
            "a..b",
            "a b",
            "-a.io",
            "a.io:0",
            "a.io:0443",
            "a.io:99999",
            "a.*.io",
            "http://a",
        ] {
            assert_eq!(HostPattern::parse(bad), Err(BadHost(bad.into())), "{bad:?}");
        }
    }

    #[test]
    fn names_and_authorities() {
        assert!(is_valid_hostname("registry-1.docker.io"));
        assert!(is_valid_hostname("127.0.0.1"));
        for bad in [
            "",
            "UPPER.io",
            "a..b",
            "-a.io",
            "a-.io",
            "a_b.io",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_hostname(bad), "{bad:?}");
        }
        assert!(is_valid_authority("localhost:5000"));
        assert!(!is_valid_authority("localhost:"));
        assert!(!is_valid_authority("localhost:65536"));
    }
}
