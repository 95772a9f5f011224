//! The registries declaration (`envoy/registries.toml`) and its validation.

use super::access::Access;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    pub mirror: Mirror,
    #[serde(rename = "registry")]
    pub registries: Vec<Registry>,
    /// Who may use the mirror; absent: anyone who can reach it.
    pub access: Option<Access>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub host_suffix: Option<String>,
    pub default_registry: Option<String>,
    #[serde(default = "default_redirect_ttl")]
    pub redirect_ttl_seconds: u64,
    /// host:port where Envoy reaches cache-service.
    pub cache_service: String,
    /// `https://host[:port]` clients reach a public mirror at: the filter builds the URLs it
    /// hands out from it and refuses other Hosts. Rendered into the public configs only.
    pub public_url: Option<String>,
}

fn default_redirect_ttl() -> u64 {
    1200
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub upstream: String,
    pub host_prefix: Option<String>,
    #[serde(default)]
    pub realm_hosts: Vec<String>,
    #[serde(default)]
    pub redirect_hosts: Vec<String>,
    #[serde(default)]
    pub library_namespace: bool,
    #[serde(default)]
    pub cache: bool,
    #[serde(default = "default_redirects")]
    pub redirects: String,
    /// Whether the client's `Authorization` may reach this registry's realm; absent: the
    /// filter's default (the default registry only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_client_credentials: Option<bool>,
}

fn default_redirects() -> String {
    "sign".to_owned()
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
    #[error("{0}")]
    Invalid(String),
}

/// A host Envoy connects to: an exact `host[:port]`, or a `*.suffix` pattern served by
/// the dynamic forward proxy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum UpstreamHost {
    Exact { host: String, port: u16 },
    Wildcard(String),
}

impl UpstreamHost {
    pub fn parse(pattern: &str) -> Result<Self, DeclarationError> {
        let invalid = || DeclarationError::Invalid(format!("invalid host pattern {pattern:?}"));
        if let Some(suffix) = pattern.strip_prefix("*.") {
            if is_dns_name(suffix) && suffix.contains('.') {
                return Ok(Self::Wildcard(pattern.to_owned()));
            }
            return Err(invalid());
        }
        let (host, port) = match pattern.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().map_err(|_| invalid())?),
            None => (pattern, 443),
        };
        if !is_dns_name(host) || port == 0 {
            return Err(invalid());
        }
        Ok(Self::Exact {
            host: host.to_owned(),
            port,
        })
    }

    /// The Envoy cluster (and virtual host) name: the pattern as declared.
    pub fn name(&self) -> String {
        match self {
            Self::Exact { host, port: 443 } => host.clone(),
            Self::Exact { host, port } => format!("{host}:{port}"),
            Self::Wildcard(pattern) => pattern.clone(),
        }
    }
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// `https://host[:port]`: a base the filter appends paths to, so nothing else.
fn validate_public_url(url: &str) -> Result<(), DeclarationError> {
    let invalid = || {
        DeclarationError::Invalid(format!(
            "public_url {url:?} must be https://host[:port] without path, query or credentials"
        ))
    };
    let parsed = url::Url::parse(url).map_err(|_| invalid())?;
    let bare = parsed.scheme() == "https"
        && parsed.host_str().is_some()
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none()
        && !url.ends_with('/');
    if bare {
        Ok(())
    } else {
        Err(invalid())
    }
}

impl Declaration {
    pub fn load(path: &std::path::Path) -> Result<Self, DeclarationError> {
        let text = std::fs::read_to_string(path).map_err(|source| DeclarationError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let declaration: Self =
            toml::from_str(&text).map_err(|source| DeclarationError::Parse {
                path: path.display().to_string(),
                source,
            })?;
        declaration.validate()?;
        Ok(declaration)
    }

    /// Checks what the generator relies on; the filter's own parser checks the rest.
    fn validate(&self) -> Result<(), DeclarationError> {
        let mut names = BTreeSet::new();
        for registry in &self.registries {
            for name in std::iter::once(&registry.name).chain(&registry.aliases) {
                if !names.insert(name.clone()) {
                    return Err(DeclarationError::Invalid(format!(
                        "registry name or alias {name:?} is declared twice"
                    )));
                }
            }
            UpstreamHost::parse(&registry.upstream)?;
            for host in registry.realm_hosts.iter().chain(&registry.redirect_hosts) {
                UpstreamHost::parse(host)?;
            }
        }
        let direct: BTreeSet<String> = self
            .upstream_hosts()
            .iter()
            .map(UpstreamHost::name)
            .collect();
        for registry in self.cached_registries() {
            if direct.contains(&registry.upstream) {
                return Err(DeclarationError::Invalid(format!(
                    "{:?} is the upstream of cached registry {:?} and also a host Envoy reaches directly",
                    registry.upstream, registry.name
                )));
            }
        }
        if let Some(default) = &self.mirror.default_registry {
            if !self.registries.iter().any(|r| &r.name == default) {
                return Err(DeclarationError::Invalid(format!(
                    "default_registry {default:?} is not a declared registry"
                )));
            }
        }
        if let Some(url) = &self.mirror.public_url {
            validate_public_url(url)?;
        }
        if let Some(access) = &self.access {
            let pass_through: Vec<&str> = self
                .registries
                .iter()
                .filter(|r| !r.cache)
                .map(|r| r.name.as_str())
                .collect();
            access
                .validate(&pass_through)
                .map_err(DeclarationError::Invalid)?;
        }
        if self.mirror.cache_service.rsplit_once(':').is_none() {
            return Err(DeclarationError::Invalid(format!(
                "cache_service {:?} must be host:port",
                self.mirror.cache_service
            )));
        }
        Ok(())
    }

    /// Every host Envoy connects to, each once: the upstream, realm and redirect hosts of
    /// the registries Envoy serves directly. A cached registry's upstream, realms and
    /// redirects are cache-service's business; Envoy only routes its name to the cache.
    pub fn upstream_hosts(&self) -> BTreeSet<UpstreamHost> {
        let mut hosts = BTreeSet::new();
        for registry in self.registries.iter().filter(|r| !r.cache) {
            for pattern in std::iter::once(&registry.upstream)
                .chain(&registry.realm_hosts)
                .chain(&registry.redirect_hosts)
            {
                // Validated in `load`.
                if let Ok(host) = UpstreamHost::parse(pattern) {
                    hosts.insert(host);
                }
            }
        }
        hosts
    }

    pub fn cached_registries(&self) -> impl Iterator<Item = &Registry> {
        self.registries.iter().filter(|r| r.cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert_eq!(
            UpstreamHost::parse("quay.io").unwrap(),
            UpstreamHost::Exact {
                host: "quay.io".into(),
                port: 443
            }
        );
        assert_eq!(
            UpstreamHost::parse("registry.local:5000").unwrap().name(),
            "registry.local:5000"
        );
        assert!(matches!(
            UpstreamHost::parse("*.pkg.dev").unwrap(),
            UpstreamHost::Wildcard(_)
        ));
        for bad in [
            "",
            "*.com",
            "a..b",
            "UPPER.io",
            "x.io:0",
            "x.io:99999",
            "-a.io",
            "a b",
        ] {
            assert!(UpstreamHost::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn shipped_declaration_loads() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/registries.toml");
        let declaration = Declaration::load(&path).unwrap();
        let hosts: Vec<_> = declaration
            .upstream_hosts()
            .iter()
            .map(UpstreamHost::name)
            .collect();
        assert!(hosts.contains(&"registry-1.docker.io".to_owned()));
        assert!(hosts.contains(&"auth.docker.io".to_owned()));
        assert!(hosts.contains(&"*.r2.cloudflarestorage.com".to_owned()));
        // gcr.io is cached: only cache-service talks to it.
        assert!(!hosts.contains(&"gcr.io".to_owned()));
        assert_eq!(declaration.cached_registries().count(), 1);
    }

    #[test]
    fn duplicate_alias_is_rejected() {
        let text = r#"
            [mirror]
            cache_service = "127.0.0.1:5001"
            [[registry]]
            name = "a.io"
            upstream = "a.io"
            [[registry]]
            name = "b.io"
            aliases = ["a.io"]
            upstream = "b.io"
        "#;
        let declaration: Declaration = toml::from_str(text).unwrap();
        assert!(declaration.validate().is_err());
    }

    #[test]
    fn public_url_is_an_https_origin() {
        let with = |url: &str| {
            let text = format!(
                "[mirror]\ncache_service = \"127.0.0.1:5001\"\npublic_url = {url:?}\n\
                 [[registry]]\nname = \"a.io\"\nupstream = \"a.io\"\n"
            );
            toml::from_str::<Declaration>(&text).unwrap().validate()
        };
        assert!(with("https://mirror.example.com").is_ok());
        assert!(with("https://mirror.example.com:8443").is_ok());
        for bad in [
            "http://mirror.example.com",
            "https://mirror.example.com/",
            "https://mirror.example.com/v2",
            "https://u:p@mirror.example.com",
            "https://mirror.example.com?x=1",
            "mirror.example.com",
        ] {
            assert!(with(bad).is_err(), "{bad:?} accepted");
        }
    }
}
