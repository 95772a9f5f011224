//! What the cache adds to the shared registry model: its sha256-only rule, manifest media
//! types and descriptor reading. Names, tags, references and digests are
//! `registry_rules::{names, digest}`; every value that ends up in a filesystem path or an
//! upstream URL is one of those validated types first.

use registry_rules::digest::{Algorithm, Digest};
use registry_rules::names::{NameError, Reference};

/// The cache stores, hashes and verifies sha256 content only: any other digest a request or
/// an upstream names is refused as invalid (`DIGEST_INVALID`), as it always was.
fn require_sha256(digest: Digest) -> Result<Digest, NameError> {
    if digest.algorithm() == Algorithm::Sha256 {
        Ok(digest)
    } else {
        Err(NameError::Digest)
    }
}

/// A digest the cache can store: [`Digest::parse`] plus [`require_sha256`].
pub fn parse_digest(s: &str) -> Result<Digest, NameError> {
    Digest::parse(s).and_then(require_sha256)
}

/// A manifest reference the cache can serve: a tag, or a digest per [`parse_digest`].
pub fn parse_reference(s: &str) -> Result<Reference, NameError> {
    match Reference::parse(s)? {
        Reference::Digest(d) => require_sha256(d).map(Reference::Digest),
        tag => Ok(tag),
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
        return media_type(mt);
    }
    if !ct.is_empty() && ct != "application/json" && ct != "application/octet-stream" {
        return media_type(&ct);
    }
    // OCI manifests may omit mediaType; an index has `manifests`, an image manifest `layers`.
    if v.get("manifests").is_some() {
        Ok(MT_OCI_INDEX.to_owned())
    } else {
        Ok(MT_OCI_MANIFEST.to_owned())
    }
}

/// `mt` if it is a `type/subtype` media type (RFC 6838 names): it becomes the Content-Type of
/// every answer for the manifest, so anything else would be stored and then never servable.
fn media_type(mt: &str) -> Result<String, String> {
    let name = |s: &str| {
        (1..=127).contains(&s.len())
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
    };
    match mt.split_once('/') {
        Some((t, sub)) if name(t) && name(sub) => Ok(mt.to_owned()),
        _ => Err(format!("manifest media type {mt:?} is not type/subtype")),
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
        let digest = parse_digest(d.get("digest")?.as_str()?).ok()?;
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

/// Whether `media_type` is a list of manifests (an OCI index or a Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    matches!(media_type, MT_OCI_INDEX | MT_DOCKER_LIST)
}

/// The manifest an index names for linux/amd64: what a registry answers by tag to a client
/// that takes no index (distribution's default platform, as Docker Hub's). `None` when the
/// index names none (or is not one).
pub fn default_platform_manifest(index: &[u8]) -> Option<Digest> {
    let v: serde_json::Value = serde_json::from_slice(index).ok()?;
    let want = Platform {
        os: "linux".to_owned(),
        arch: "amd64".to_owned(),
        variant: None,
    };
    v.get("manifests")?.as_array()?.iter().find_map(|m| {
        want.matches(&Platform::of_descriptor(m)?)
            .then(|| parse_digest(m.get("digest")?.as_str()?).ok())
            .flatten()
    })
}

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut p = s.split('/');
        match (p.next(), p.next(), p.next(), p.next()) {
            (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => {
                Ok(Self {
                    os: os.to_owned(),
                    arch: arch.to_owned(),
                    variant: variant.filter(|v| !v.is_empty()).map(str::to_owned),
                })
            }
            _ => Err(format!("platform {s:?}: expected os/arch[/variant]")),
        }
    }

    pub(crate) fn of_descriptor(d: &serde_json::Value) -> Option<Self> {
        let p = d.get("platform")?;
        Some(Self {
            os: p.get("os")?.as_str()?.to_owned(),
            arch: p.get("architecture")?.as_str()?.to_owned(),
            variant: p.get("variant").and_then(|v| v.as_str()).map(str::to_owned),
        })
    }

    /// Does an index entry's platform satisfy this wanted platform? A wanted platform
    /// without a variant takes any variant (arm64 ≡ arm64/v8).
    pub(crate) fn matches(&self, have: &Platform) -> bool {
        self.os == have.os
            && self.arch == have.arch
            && match (&self.variant, &have.variant) {
                (None, _) => true,
                (Some(w), Some(h)) => w == h,
                (Some(w), None) => self.arch == "arm64" && w == "v8",
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_names_its_linux_amd64_manifest() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MT_OCI_INDEX}","manifests":[
                {{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"digest":"{}","size":1,"platform":{{"os":"windows","architecture":"amd64"}}}},
                {{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        assert_eq!(
            default_platform_manifest(index.as_bytes()).map(|x| x.to_string()),
            Some(d('c'))
        );
        let arm_only = index.replace("\"amd64\"}}]", "\"s390x\"}}]");
        assert_eq!(default_platform_manifest(arm_only.as_bytes()), None);
        assert_eq!(default_platform_manifest(b"not json"), None);
        assert!(is_index(MT_DOCKER_LIST) && is_index(MT_OCI_INDEX) && !is_index(MT_OCI_MANIFEST));
    }

    #[test]
    fn a_media_type_that_cannot_be_a_header_is_refused() {
        let body = |mt: &str| format!(r#"{{"schemaVersion":2,"mediaType":{mt:?},"layers":[]}}"#);
        for bad in ["a\nb", "text", "/x", "a/b/c", "a/b; x=\"1\"", "a/\u{e9}"] {
            assert!(
                manifest_media_type(Some("application/json"), body(bad).as_bytes()).is_err(),
                "{bad:?}"
            );
        }
        assert!(manifest_media_type(Some("bad type"), br#"{"schemaVersion":2}"#).is_err());
        let artifact = "application/vnd.example.thing.v1+json";
        assert_eq!(
            manifest_media_type(None, body(artifact).as_bytes()),
            Ok(artifact.to_owned())
        );
    }

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
    fn only_sha256_is_accepted() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(parse_digest(&good).map(|d| d.to_string()), Ok(good.clone()));
        let long = format!("sha512:{}", "a".repeat(128));
        assert!(Digest::parse(&long).is_ok());
        assert_eq!(parse_digest(&long), Err(NameError::Digest));
        assert_eq!(parse_reference(&long), Err(NameError::Digest));
        assert_eq!(parse_digest("sha256:zz"), Err(NameError::Digest));
        assert!(matches!(parse_reference(&good), Ok(Reference::Digest(_))));
        assert!(matches!(parse_reference("v1"), Ok(Reference::Tag(_))));
        assert_eq!(parse_reference("..."), Err(NameError::Tag));
        let m = format!(r#"{{"layers":[{{"digest":"{long}","size":1}}]}}"#);
        assert!(descriptor_sizes(m.as_bytes()).is_empty());
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
                if let Ok(d) = parse_digest(&s) {
                    prop_assert_eq!(d.as_str(), s.as_str());
                    prop_assert_eq!(d.hex().len(), 64);
                }
                if let Ok(r) = parse_reference(&s) {
                    prop_assert_eq!(r.to_string(), s.clone());
                }
                let _ = manifest_media_type(None, s.as_bytes());
                let _ = descriptor_sizes(s.as_bytes());
            }

            #[test]
            fn proptest_hashed_digests_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let d = Digest::of_bytes(&bytes);
                prop_assert_eq!(parse_digest(d.as_str()), Ok(d.clone()));
                prop_assert!(parse_digest(&d.as_str().to_uppercase()).is_err());
                prop_assert!(parse_digest(d.hex()).is_err());
            }
        }
    }
}
