//! Validated names from the distribution grammar, parsed by hand (no regex).

use std::fmt;

use crate::digest::Digest;

/// Maximum length of a full repository name.
pub const MAX_NAME_LEN: usize = 255;

/// Why a name, tag or digest was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Repository name does not match the grammar or is too long.
    Name,
    /// Tag does not match the grammar.
    Tag,
    /// Digest does not match `sha256:[a-f0-9]{64}` / `sha512:[a-f0-9]{128}`.
    Digest,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Name => f.write_str("invalid repository name"),
            NameError::Tag => f.write_str("invalid tag"),
            NameError::Digest => f.write_str("invalid digest"),
        }
    }
}

impl std::error::Error for NameError {}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let mut i = 0;
    // Must start with an alphanumeric run.
    loop {
        let start = i;
        while i < b.len() && b.get(i).copied().is_some_and(is_alnum_lower) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // Separator run.
        let sep_start = i;
        while i < b.len() && b.get(i).copied().is_some_and(|x| !is_alnum_lower(x)) {
            i += 1;
        }
        let sep = b.get(sep_start..i).unwrap_or_default();
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&x| x == b'-');
        if !ok || sep.is_empty() {
            return false;
        }
    }
}

/// What [`RepositoryName::parse`] accepts, checked without building one (routing checks
/// a name inside the path it builds).
pub(crate) fn is_valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.split('/').all(is_valid_component)
}

/// A repository name such as `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryName(String);

impl RepositoryName {
    /// Parses and validates a full repository name.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if is_valid_name(s) {
            Ok(RepositoryName(s.to_string()))
        } else {
            Err(NameError::Name)
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    match b.first() {
        Some(&f) if f.is_ascii_alphanumeric() || f == b'_' => {}
        _ => return false,
    }
    b.len() <= 128
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

/// A validated tag such as `3.20`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    /// Parses and validates a tag.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if is_valid_tag(s) {
            Ok(Tag(s.to_owned()))
        } else {
            Err(NameError::Tag)
        }
    }

    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A tag such as `3.20`.
    Tag(Tag),
    /// A digest.
    Digest(Digest),
}

impl Reference {
    /// Anything containing `:` is parsed as a digest, the rest as a tag.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }

    /// What [`Reference::parse`] accepts, checked without building one; true for a digest.
    pub(crate) fn check(s: &str) -> Result<bool, NameError> {
        if s.contains(':') {
            Digest::check(s).map(|_| true)
        } else if is_valid_tag(s) {
            Ok(false)
        } else {
            Err(NameError::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "library/alpine",
            "a.b_c__d---e/f0",
            "coreos/etcd",
            "x/y/z/w",
            "a-b",
            "0",
        ] {
            assert!(RepositoryName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a/",
            "/a",
            "a//b",
            "a..b",
            "a___b",
            "a._b",
            "-a",
            "a-",
            "a_",
            ".a",
            "a b",
            "a/../b",
            "é",
            "a:b",
            "a%2fb",
            "a/B",
            "..",
            "a/./b",
            "a.-b",
            "%2e%2e",
            "a/%2e%2e/b",
            "a\0",
            "a\\b",
            "ä",
        ] {
            assert_eq!(RepositoryName::parse(bad), Err(NameError::Name), "{bad}");
        }
        let long = "a".repeat(255);
        assert!(RepositoryName::parse(&long).is_ok());
        let long = "a".repeat(256);
        assert!(RepositoryName::parse(&long).is_err());
        assert_eq!(
            RepositoryName::parse("library/alpine").map(|n| n.as_str().to_owned()),
            Ok("library/alpine".to_owned())
        );
    }

    #[test]
    fn tags() {
        assert!(is_valid_tag("latest"));
        assert!(is_valid_tag("_x"));
        assert!(is_valid_tag("v3.5.0-rc.1_b"));
        assert!(is_valid_tag(&"a".repeat(128)));
        assert!(!is_valid_tag(&"a".repeat(129)));
        assert!(!is_valid_tag(""));
        assert!(!is_valid_tag(".x"));
        assert!(!is_valid_tag("-x"));
        assert!(!is_valid_tag("a/b"));
        assert!(!is_valid_tag("a+b"));
        assert_eq!(
            Tag::parse("_x.y-Z").map(|t| t.to_string()),
            Ok("_x.y-Z".into())
        );
        for bad in ["..", "a:b", "a%2e"] {
            assert_eq!(Tag::parse(bad), Err(NameError::Tag), "{bad:?}");
        }
    }

    #[test]
    fn references() {
        assert_eq!(Reference::parse("3"), Ok(Reference::Tag(Tag("3".into()))));
        assert_eq!(Reference::parse("sha256:xyz"), Err(NameError::Digest));
        assert_eq!(Reference::parse("..."), Err(NameError::Tag));
        let d = format!("sha256:{}", "f".repeat(64));
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        assert_eq!(Reference::parse(&d).unwrap().to_string(), d);
    }
}
