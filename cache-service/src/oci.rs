//! OCI distribution names, references, digests and media types.
//!
//! Every value that ends up in a filesystem path or an upstream URL goes through one of these
//! newtypes first; constructing one is the validation (distribution grammar).

// The distribution grammar lives in one place, the filter's rules, which check the same
// requests before they reach the cache.
use registry_rules::names;
use std::fmt;

use sha2::{Digest as _, Sha256};

/// Why a name, tag or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("invalid repository name")]
    Name,
    #[error("invalid tag")]
    Tag,
    #[error("invalid digest (only sha256:<64 lowercase hex> is accepted)")]
    Digest,
}

/// Repository name, e.g. `library/alpine`. At most 255 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, GrammarError> {
        names::RepositoryName::parse(s)
            .map(|name| Self(name.as_str().to_owned()))
            .map_err(|_| GrammarError::Name)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, GrammarError> {
        if names::is_valid_tag(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(GrammarError::Tag)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A sha256 digest: `sha256:` + 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, GrammarError> {
        let hex = s.strip_prefix("sha256:").ok_or(GrammarError::Digest)?;
        if hex.len() == 64
            && hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(GrammarError::Digest)
        }
    }
    /// Digest from a finished hash.
    pub fn from_sha256(hash: Sha256) -> Self {
        Self(format!("sha256:{}", hex::encode(hash.finalize())))
    }
    pub fn of_bytes(b: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b);
        Self::from_sha256(h)
    }
    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        self.0.get(7..).unwrap_or("")
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: tag or digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, GrammarError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
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

pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What the cache asks upstreams for: the four schema2/OCI types, never schema1.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest accepted from an upstream (distribution uses 4 MiB too).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Media types that mean schema1 (or were treated as schema1 by clients).
pub fn is_schema1(media_type: &str) -> bool {
    let mt = media_type.split(';').next().unwrap_or("").trim();
    matches!(
        mt,
        "application/vnd.docker.distribution.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v1+prettyjws"
            | "text/plain"
    )
}

/// Decide the media type of a manifest body: the upstream's Content-Type when it is a known
/// schema2/OCI type, else the body's `mediaType`; schema1 and non-JSON bodies are refused.
pub fn manifest_media_type(content_type: Option<&str>, body: &[u8]) -> Result<String, String> {
    let ct = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_owned())
        .unwrap_or_default();
    if is_schema1(&ct) {
        return Err(format!("schema1 manifest ({ct}) is not supported"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "manifest is not JSON".to_owned())?;
    if v.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err("only schemaVersion 2 manifests are supported".to_owned());
    }
    if matches!(
        ct.as_str(),
        MT_DOCKER_MANIFEST | MT_DOCKER_LIST | MT_OCI_MANIFEST | MT_OCI_INDEX
    ) {
        return Ok(ct);
    }
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        if is_schema1(mt) {
            return Err("schema1 manifest is not supported".to_owned());
        }
        return Ok(mt.to_owned());
    }
    if !ct.is_empty() && ct != "application/json" && ct != "application/octet-stream" {
        return Ok(ct);
    }
    // OCI manifests may omit mediaType; an index has `manifests`, an image manifest `layers`.
    if v.get("manifests").is_some() {
        Ok(MT_OCI_INDEX.to_owned())
    } else {
        Ok(MT_OCI_MANIFEST.to_owned())
    }
}

/// The (digest, size) of every descriptor a manifest names: `config`, `layers`, an index's
/// `manifests`. Malformed entries are skipped (the manifest was verified by its digest; the
/// sizes only bound later downloads).
pub fn descriptor_sizes(body: &[u8]) -> Vec<(Digest, u64)> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let one = |d: &serde_json::Value| {
        let digest = Digest::parse(d.get("digest")?.as_str()?).ok()?;
        Some((digest, d.get("size")?.as_u64()?))
    };
    let lists = ["layers", "manifests"]
        .into_iter()
        .filter_map(|k| v.get(k).and_then(|l| l.as_array()))
        .flatten();
    v.get("config")
        .into_iter()
        .chain(lists)
        .filter_map(one)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_sizes_of_manifests() {
        let (a, b) = (Digest::of_bytes(b"a"), Digest::of_bytes(b"b"));
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}","size":3}},"layers":[{{"digest":"{b}","size":1000}},{{"digest":"bad","size":1}},{{"digest":"{a}"}}]}}"#
        );
        assert_eq!(
            descriptor_sizes(m.as_bytes()),
            vec![(a.clone(), 3), (b, 1000)]
        );
        let i = format!(r#"{{"manifests":[{{"digest":"{a}","size":7}}]}}"#);
        assert_eq!(descriptor_sizes(i.as_bytes()), vec![(a, 7)]);
        assert!(descriptor_sizes(b"[1,2]").is_empty());
    }

    #[test]
    fn names() {
        for ok in [
            "a",
            "library/alpine",
            "a.b/c_d/e__f/g--h",
            "foo-bar/b-a-z",
            "0/1",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "a/../b",
            "a/./b",
            "/a",
            "a/",
            "a//b",
            "A",
            "a___b",
            "a.-b",
            "-a",
            "a-",
            "%2e%2e",
            "a/%2e%2e/b",
            "a b",
            "a\0",
            "a\\b",
            "ä",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RepoName::parse(&"a".repeat(255)).is_ok());
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags() {
        assert!(Tag::parse("latest").is_ok());
        assert!(Tag::parse("_x.y-Z").is_ok());
        assert!(Tag::parse(&"a".repeat(128)).is_ok());
        for bad in ["", ".x", "-x", "a/b", "..", "a:b", &"a".repeat(129), "a%2e"] {
            assert!(Tag::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digests() {
        let good = format!("sha256:{}", "a".repeat(64));
        let d = Digest::parse(&good).unwrap();
        assert_eq!(d.hex(), "a".repeat(64));
        for bad in [
            "sha256:".to_owned(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "a".repeat(65)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:../{}", "a".repeat(61)),
            "sha256:%2e%2e".to_owned(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Digest::of_bytes(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn references() {
        assert!(matches!(Reference::parse("v1"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse(&format!("sha256:{}", "0".repeat(64))),
            Ok(Reference::Digest(_))
        ));
        assert!(Reference::parse("sha256:zz").is_err());
    }

    #[test]
    fn media_types() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(manifest_media_type(None, body).unwrap(), MT_OCI_INDEX);
        assert!(manifest_media_type(
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            br#"{"schemaVersion":1}"#
        )
        .is_err());
        assert!(manifest_media_type(Some("text/plain"), body).is_err());
        assert!(manifest_media_type(None, br#"{"schemaVersion":1}"#).is_err());
        assert_eq!(
            manifest_media_type(Some(MT_DOCKER_MANIFEST), br#"{"schemaVersion":2}"#).unwrap(),
            MT_DOCKER_MANIFEST
        );
    }

    mod proptest_grammar {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testserver::proptest_config())]

            #[test]
            fn proptest_parsers_never_panic(s in "\\PC{0,300}") {
                if let Ok(n) = RepoName::parse(&s) {
                    prop_assert!(n.as_str().len() <= 255);
                    prop_assert_eq!(RepoName::parse(n.as_str()), Ok(n.clone()));
                }
                if let Ok(t) = Tag::parse(&s) {
                    prop_assert_eq!(t.as_str(), s.as_str());
                    prop_assert!(t.as_str().len() <= 128);
                }
                if let Ok(d) = Digest::parse(&s) {
                    prop_assert_eq!(d.as_str(), s.as_str());
                    prop_assert_eq!(d.hex().len(), 64);
                }
                if let Ok(r) = Reference::parse(&s) {
                    prop_assert_eq!(r.to_string(), s.clone());
                }
                let _ = manifest_media_type(None, s.as_bytes());
            }

            #[test]
            fn proptest_valid_names_round_trip(
                parts in proptest::collection::vec("[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", 1..5),
                tag in "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}",
                bytes in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let name = parts.join("/");
                prop_assert_eq!(RepoName::parse(&name).map(|n| n.to_string()), Ok(name.clone()));
                prop_assert_eq!(Reference::parse(&tag).map(|r| r.to_string()), Ok(tag.clone()));
                let d = Digest::of_bytes(&bytes);
                prop_assert_eq!(Digest::parse(d.as_str()), Ok(d.clone()));
                prop_assert!(Digest::parse(&d.as_str().to_uppercase()).is_err());
                prop_assert!(Digest::parse(d.hex()).is_err());
            }
        }
    }
}
