//! `envoy/registries.toml` read into the registry model's declaration
//! ([`registry_rules::declaration`]), with this generator's `[access]` type.

use super::access::Access;
use std::ops::Deref;
use std::path::Path;

use registry_rules::config::RedirectMode;
pub use registry_rules::declaration::Registry;
use registry_rules::declaration::{CacheService, ClientAuth};

/// The model's declaration with `[access]` read by [`Access`].
pub type Model = registry_rules::declaration::Declaration<Access>;

/// A declaration read from TOML and validated (`[access]` included): the only way to get one.
#[derive(Debug, Clone)]
pub struct Declaration(Model);

impl Deref for Declaration {
    type Target = Model;

    fn deref(&self) -> &Model {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeclarationError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error(transparent)]
    Invalid(#[from] registry_rules::declaration::DeclarationError),
    #[error("{0}")]
    Access(String),
}

impl Declaration {
    pub fn load(path: &Path) -> Result<Self, DeclarationError> {
        let text = std::fs::read_to_string(path).map_err(|source| DeclarationError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// This declaration with Envoy reaching cache-service at `cache` instead (validated).
    pub fn with_cache_service(&self, cache: CacheService) -> Result<Self, DeclarationError> {
        let mut model = self.0.clone();
        model.mirror.cache_service = cache;
        model.validate()?;
        Ok(Self(model))
    }

    /// `text`, read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, DeclarationError> {
        let model: Model = toml::from_str(text).map_err(|source| DeclarationError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        model.validate()?;
        if let Some(access) = &model.access {
            // Pass-through registries and cached ones whose clients log in upstream: their
            // clients present the registry's own tokens in `Authorization`.
            let token_clients: Vec<&str> = model
                .registries
                .iter()
                .filter(|r| !r.cache || r.client_auth == Some(ClientAuth::Upstream))
                .map(|r| r.name.as_str())
                .collect();
            let self_redirected: Vec<&str> = model
                .registries
                .iter()
                .filter(|r| !r.cache && r.redirects == RedirectMode::Passthrough)
                .map(|r| r.name.as_str())
                .collect();
            access
                .validate(&token_clients, &self_redirected)
                .map_err(DeclarationError::Access)?;
        }
        Ok(Self(model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Declaration, DeclarationError> {
        Declaration::parse(text, Path::new("registries.toml"))
    }

    #[test]
    fn shipped_declaration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/registries.toml");
        let declaration = Declaration::load(&path).unwrap();
        // The filter's built-in registries are this declaration's.
        assert_eq!(
            registry_rules::default_config().registries,
            declaration.filter_config(false).registries
        );
    }

    #[test]
    fn refusals_carry_their_reason() {
        let error = parse(
            "[mirror]\ncache_service = \"127.0.0.1:5001\"\n\
             [[registry]]\nname = \"a.io\"\nupstream = \"a.io\"\n\
             [[registry]]\nname = \"b.io\"\naliases = [\"a.io\"]\nupstream = \"b.io\"\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("declared twice"), "{error}");
        let error = parse("registry = []\nbogus = 1\n[mirror]\ncache_service = \"c:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `bogus`"), "{error}");
        let error =
            parse("registry = []\n[mirror]\ncache_service = \"c:1\"\n[access]\nbogus = 1\n")
                .unwrap_err()
                .to_string();
        assert!(error.contains("unknown field `bogus`"), "{error}");
    }
}
