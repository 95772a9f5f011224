//! Content digests `algorithm:hex`: the one digest type of the filter, the cache and the tools.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::names::NameError;

/// Digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// sha256, 64 hex chars.
    Sha256,
    /// sha512, 128 hex chars.
    Sha512,
}

impl Algorithm {
    /// The wire name (`sha256`).
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated content digest `algorithm:hex` (lowercase hex of the algorithm's length).
/// Ordered and hashed by its text, so it can key maps and sort like the string it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    // The whole `algorithm:hex`, kept so `as_str` borrows instead of formatting.
    text: String,
    algorithm: Algorithm,
}

impl Digest {
    /// Parses `sha256:<64 lower hex>` or `sha512:<128 lower hex>`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        Ok(Digest {
            algorithm: Self::check(s)?,
            text: s.to_owned(),
        })
    }

    /// What [`Digest::parse`] accepts, checked without building one (routing only needs
    /// to know a path's digest is valid): its algorithm.
    pub(crate) fn check(s: &str) -> Result<Algorithm, NameError> {
        let (alg, hex) = s.split_once(':').ok_or(NameError::Digest)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(NameError::Digest),
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(NameError::Digest);
        }
        Ok(algorithm)
    }

    /// The digest of a finished sha256 hash.
    pub fn from_sha256(hash: Sha256) -> Self {
        Digest {
            text: format!("sha256:{:x}", hash.finalize()),
            algorithm: Algorithm::Sha256,
        }
    }

    /// The sha256 digest of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(bytes);
        Self::from_sha256(h)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded part (lower hex).
    pub fn hex(&self) -> &str {
        self.text
            .get(self.algorithm.as_str().len() + 1..)
            .unwrap_or_default()
    }

    /// The whole `algorithm:hex`.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

// As its string, and validated on the way in (the cache keeps digests in its records).
impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let h = "a".repeat(64);
        let d = Digest::parse(&format!("sha256:{h}")).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), format!("sha256:{h}"));
        assert_eq!(d.hex(), h);
        let long = Digest::parse(&format!("sha512:{}", "0".repeat(128))).unwrap();
        assert_eq!(long.algorithm(), Algorithm::Sha512);
        assert_eq!(long.hex(), "0".repeat(128));
        for bad in [
            format!("sha512:{}", "0".repeat(64)),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "a".repeat(65)),
            format!("md5:{}", "a".repeat(32)),
            format!("sha256:../{}", "a".repeat(61)),
            "sha256:%2e%2e".to_owned(),
            "sha256:".to_owned(),
            "sha256".to_owned(),
        ] {
            assert_eq!(Digest::parse(&bad), Err(NameError::Digest), "{bad:?}");
        }
    }

    #[test]
    fn hashing_and_serde() {
        let empty = Digest::of_bytes(b"");
        assert_eq!(
            empty.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(empty.as_str()), Ok(empty.clone()));
        let json = serde_json::to_string(&empty).unwrap();
        assert_eq!(json, format!("\"{empty}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), empty);
        assert!(serde_json::from_str::<Digest>("\"sha256:zz\"").is_err());
        // Ordered as its text.
        let (a, b) = (Digest::of_bytes(b"a"), Digest::of_bytes(b"b"));
        assert_eq!(a.cmp(&b), a.as_str().cmp(b.as_str()));
    }
}
