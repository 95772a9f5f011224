//! The registry declaration: what `envoy/registries.toml` deserializes into, its
//! validation, and the configurations produced from it (the filter's [`FilterConfig`],
//! cache-service's [`CacheUpstream`]s). Serde only: the generator reads the TOML and
//! writes what the filter and the cache read.

pub use crate::config::ClientAuth;
use crate::config::{FilterConfig, PublicUrl, RedirectMode, RegistryConfig};
use crate::hosts::{is_valid_authority, is_valid_hostname, HostPattern};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// The whole declaration. `A` is the `[access]` section's type: enforced by Envoy, so it
/// is the generator's (cache-service's) business, read with its own type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration<A> {
    /// `[mirror]`.
    pub mirror: Mirror,
    /// `[[registry]]`, in declaration order.
    #[serde(rename = "registry")]
    pub registries: Vec<Registry>,
    /// Who may use the mirror; absent: anyone who can reach it.
    pub access: Option<A>,
}

/// `[mirror]`: the settings of the mirror as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// Host mode: `<host_prefix>.<host_suffix>` selects a registry.
    pub host_suffix: Option<String>,
    /// Registry for requests that name none.
    pub default_registry: Option<String>,
    /// Lifetime of a signed redirect URL.
    #[serde(default = "default_redirect_ttl")]
    pub redirect_ttl_seconds: u64,
    /// Where Envoy reaches cache-service: one `host:port`, or a list of replicas.
    pub cache_service: CacheService,
    /// `https://host[:port]` clients reach a public mirror at: the filter builds the URLs it
    /// hands out from it and refuses other Hosts. Rendered into the public configs only.
    pub public_url: Option<String>,
}

/// `cache_service`: the `host:port` of each cache-service replica, in declaration order.
/// One string (the original form) or a list; with more than one, Envoy spreads the cache
/// routes over them by consistent hashing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "OneOrMany")]
pub struct CacheService(Vec<String>);

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<OneOrMany> for CacheService {
    fn from(value: OneOrMany) -> Self {
        match value {
            OneOrMany::One(one) => Self(vec![one]),
            OneOrMany::Many(many) => Self(many),
        }
    }
}

/// More replicas than this is a typo, not a deployment: every Envoy keeps a ring entry set
/// and a health check per replica.
pub const MAX_CACHE_REPLICAS: usize = 64;

impl CacheService {
    /// Replicas as declared (`validate` has checked each is `host:port`, none twice).
    pub fn replicas(&self) -> &[String] {
        &self.0
    }

    /// More than one replica: the cache routes need a hash policy and the cluster a ring.
    pub fn is_replicated(&self) -> bool {
        self.0.len() > 1
    }

    fn validate(&self) -> Result<(), DeclarationError> {
        if self.0.is_empty() || self.0.len() > MAX_CACHE_REPLICAS {
            return Err(DeclarationError::CacheReplicaCount(self.0.len()));
        }
        let mut seen = BTreeSet::new();
        for replica in &self.0 {
            // An explicit port: Envoy's cluster endpoint has no default.
            if !(is_valid_authority(replica) && replica.contains(':')) {
                return Err(DeclarationError::BadCacheService(replica.clone()));
            }
            if !seen.insert(replica) {
                return Err(DeclarationError::DuplicateCacheService(replica.clone()));
            }
        }
        Ok(())
    }
}

impl From<Vec<String>> for CacheService {
    fn from(replicas: Vec<String>) -> Self {
        Self(replicas)
    }
}

fn default_redirect_ttl() -> u64 {
    crate::config::DEFAULT_REDIRECT_TTL_SECONDS
}

/// `[[registry]]`: one registry, for the filter and, when `cache = true`, for the cache.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Public name (`docker.io`).
    pub name: String,
    /// Other names accepted in `ns` and path prefixes.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `host[:port]` of the upstream (TLS).
    pub upstream: String,
    /// Host-mode prefix.
    pub host_prefix: Option<String>,
    /// Token realm hosts (patterns) the registry's challenges may name.
    #[serde(default)]
    pub realm_hosts: Vec<String>,
    /// Hosts (patterns) the registry may redirect to.
    #[serde(default)]
    pub redirect_hosts: Vec<String>,
    /// One-component names get `library/`.
    #[serde(default)]
    pub library_namespace: bool,
    /// Served through cache-service instead of straight from upstream.
    #[serde(default)]
    pub cache: bool,
    /// Redirect handling.
    #[serde(default)]
    pub redirects: RedirectMode,
    /// Whether the client's `Authorization` on the shared mirror host may reach this
    /// registry, its realm and its `/v2/` API alike; absent: the filter's default (the
    /// default registry only).
    pub forward_client_credentials: Option<bool>,
    /// PEM CA file trusted for the upstream: by cache-service for a cached registry, by
    /// Envoy's upstream cluster otherwise.
    pub ca_file: Option<PathBuf>,
    /// Cache-side only (`cache = true`): the cache's own login at the upstream.
    pub username: Option<String>,
    /// Cache-side only: environment variable holding the password.
    pub password_env: Option<String>,
    /// Cache-side only: file holding the password.
    pub password_file: Option<PathBuf>,
    /// Cache-side only: who may read what the cache holds (see [`ClientAuth`]).
    pub client_auth: Option<ClientAuth>,
    /// Cache-side only, `client_auth = "upstream"`: how long a client's authorization for a
    /// repository is reused before the upstream is asked again.
    pub authorization_ttl_seconds: Option<u64>,
    /// Removed (see [`RemovedField`]): kept so that a declaration naming it is refused
    /// with what replaces it.
    pub public: Option<bool>,
    /// Removed (see [`RemovedField`]).
    pub client_token_env: Option<String>,
}

/// One `[[upstream]]` of cache-service's configuration: rendered from a cached registry
/// and read back by cache-service with this same type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheUpstream {
    /// The registry name the filter sends (`x-mirror-registry` / `ns`).
    pub name: String,
    /// `https://host[:port]` of the upstream.
    pub url: String,
    /// Token realm hosts (besides the upstream's own host) the cache asks for tokens; they
    /// may receive the credentials. `host[:port]` or `*.suffix`.
    #[serde(default)]
    pub realm_hosts: Vec<String>,
    /// Hosts (besides the upstream's own host) the cache follows redirects to.
    #[serde(default)]
    pub redirect_hosts: Vec<String>,
    /// Extra PEM CA trusted for this upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The cache's login at the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// File holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Who may read what the cache holds; absent: anonymous, which an upstream with
    /// credentials must state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
    /// `client_auth = "upstream"`: seconds a client's authorization for a repository is
    /// reused (default [`DEFAULT_AUTHORIZATION_TTL_SECONDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_ttl_seconds: Option<u64>,
    /// Removed: refused with [`RemovedField::Public`]'s message, never written.
    #[serde(default, skip_serializing)]
    pub public: Option<bool>,
    /// Removed: refused with [`RemovedField::ClientTokenEnv`]'s message, never written.
    #[serde(default, skip_serializing)]
    pub client_token_env: Option<String>,
}

/// How long an authorization decision is reused unless configured: a revoked client
/// keeps reading what it was allowed for at most this long.
pub const DEFAULT_AUTHORIZATION_TTL_SECONDS: u64 = 60;
/// The longest configurable reuse of an authorization decision.
pub const MAX_AUTHORIZATION_TTL_SECONDS: u64 = 3600;

/// A cache-side field that no longer exists. The static client token let any holder of
/// one shared secret read everything the cache's login could; `client_auth` replaced both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovedField {
    /// `public = true`.
    Public,
    /// `client_token_env`.
    ClientTokenEnv,
}

impl fmt::Display for RemovedField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Public => write!(
                f,
                "`public` was removed: write client_auth = \"anonymous\" (anyone who reaches the mirror reads what the cache's login reads) or client_auth = \"upstream\" (each client is authorized at the upstream with its own login)"
            ),
            Self::ClientTokenEnv => write!(
                f,
                "`client_token_env` (one static token for every client) was removed: use client_auth = \"upstream\" (each client logs in at the upstream through the mirror) or the mirror's own login, [access] basic_auth"
            ),
        }
    }
}

/// Why a cache upstream's client authorization settings are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuthError {
    /// A removed field is set.
    Removed(RemovedField),
    /// The cache logs in upstream and nobody said who may read what that login fetches.
    Unstated,
    /// `authorization_ttl_seconds` outside 1..=[`MAX_AUTHORIZATION_TTL_SECONDS`].
    BadTtl(u64),
    /// `authorization_ttl_seconds` without `client_auth = "upstream"`.
    TtlWithoutUpstream,
}

impl fmt::Display for ClientAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Removed(field) => field.fmt(f),
            Self::Unstated => write!(
                f,
                "the cache logs in to this upstream (username): say who may read what it fetches, client_auth = \"anonymous\" (anyone who reaches the mirror) or client_auth = \"upstream\" (each client with its own login at the upstream)"
            ),
            Self::BadTtl(s) => write!(
                f,
                "authorization_ttl_seconds = {s}: 1 to {MAX_AUTHORIZATION_TTL_SECONDS}"
            ),
            Self::TtlWithoutUpstream => write!(
                f,
                "authorization_ttl_seconds applies only with client_auth = \"upstream\""
            ),
        }
    }
}

impl std::error::Error for ClientAuthError {}

impl CacheUpstream {
    /// The removed field this upstream still names, if any.
    pub fn removed_field(&self) -> Option<RemovedField> {
        if self.public.is_some() {
            Some(RemovedField::Public)
        } else if self.client_token_env.is_some() {
            Some(RemovedField::ClientTokenEnv)
        } else {
            None
        }
    }

    /// Checks the client authorization settings (both the generator and cache-service).
    pub fn check_client_auth(&self) -> Result<(), ClientAuthError> {
        if let Some(field) = self.removed_field() {
            return Err(ClientAuthError::Removed(field));
        }
        if self.username.is_some() && self.client_auth.is_none() {
            return Err(ClientAuthError::Unstated);
        }
        match (self.authorization_ttl_seconds, self.client_auth()) {
            (None, _) => Ok(()),
            (Some(_), ClientAuth::Anonymous) => Err(ClientAuthError::TtlWithoutUpstream),
            (Some(s), ClientAuth::Upstream)
                if !(1..=MAX_AUTHORIZATION_TTL_SECONDS).contains(&s) =>
            {
                Err(ClientAuthError::BadTtl(s))
            }
            (Some(_), ClientAuth::Upstream) => Ok(()),
        }
    }

    /// The mode in force (absent: anonymous).
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth.unwrap_or_default()
    }

    /// How long an authorization decision is reused.
    pub fn authorization_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.authorization_ttl_seconds
                .unwrap_or(DEFAULT_AUTHORIZATION_TTL_SECONDS),
        )
    }
}

/// Why a declaration is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclarationError {
    /// A name or alias is declared twice.
    DuplicateName(String),
    /// A name, alias, `host_prefix` or `host_suffix` is not a lowercase host name as written
    /// (it names directories, TOML tables and headers of every generated file).
    BadName(String),
    /// A host or pattern is not canonical `host[:port]` or `*.domain.tld`.
    BadHost(String),
    /// A cached registry's upstream is also a host Envoy reaches directly.
    CachedUpstreamIsDirect { registry: String, upstream: String },
    /// `default_registry` names no declared registry.
    UnknownDefaultRegistry(String),
    /// `public_url` is not a bare https origin.
    BadPublicUrl(String),
    /// A `cache_service` replica is not `host:port`.
    BadCacheService(String),
    /// `cache_service` names a replica twice.
    DuplicateCacheService(String),
    /// `cache_service` is an empty list or longer than [`MAX_CACHE_REPLICAS`].
    CacheReplicaCount(usize),
    /// A cache-side field on a registry that cache-service does not serve.
    CacheFieldWithoutCache {
        registry: String,
        field: &'static str,
    },
    /// Two registries whose upstream is the same Envoy cluster trust different CAs.
    ConflictingCa(String),
    /// A cached registry's client authorization settings are refused.
    ClientAuth {
        registry: String,
        error: ClientAuthError,
    },
}

impl fmt::Display for DeclarationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DuplicateName(n) => write!(f, "registry name or alias {n:?} is declared twice"),
            Self::BadName(n) => write!(
                f,
                "{n:?} is not a host name as the mirror writes it: lowercase host[:port] for a \
                 name or alias (e.g. \"gcr.io\"), one lowercase DNS name for host_prefix and \
                 host_suffix"
            ),
            Self::BadHost(h) => write!(
                f,
                "invalid host pattern {h:?} (lowercase host[:port] or *.domain.tld)"
            ),
            Self::CachedUpstreamIsDirect { registry, upstream } => write!(
                f,
                "{upstream:?} is the upstream of cached registry {registry:?} and also a host Envoy reaches directly"
            ),
            Self::UnknownDefaultRegistry(d) => {
                write!(f, "default_registry {d:?} is not a declared registry")
            }
            Self::BadPublicUrl(u) => write!(
                f,
                "public_url {u:?} must be https://host[:port] without path, query or credentials"
            ),
            Self::BadCacheService(c) => write!(f, "cache_service {c:?} must be host:port"),
            Self::DuplicateCacheService(c) => {
                write!(f, "cache_service names replica {c:?} twice")
            }
            Self::CacheReplicaCount(n) => write!(
                f,
                "cache_service lists {n} replicas: one to {MAX_CACHE_REPLICAS} host:port"
            ),
            Self::CacheFieldWithoutCache { registry, field } => write!(
                f,
                "registry {registry:?}: {field} is for cache-service, which serves only registries with cache = true"
            ),
            Self::ConflictingCa(host) => {
                write!(f, "registries with upstream {host:?} declare different ca_file")
            }
            Self::ClientAuth { registry, error } => write!(f, "registry {registry:?}: {error}"),
        }
    }
}

impl std::error::Error for DeclarationError {}

/// A declared host pattern, which must already be in canonical form (it names Envoy
/// clusters and virtual hosts as written) and, as a wildcard, cover less than a TLD.
fn declared_host(pattern: &str) -> Result<HostPattern, DeclarationError> {
    let bad = || DeclarationError::BadHost(pattern.to_owned());
    let host = HostPattern::parse(pattern).map_err(|_| bad())?;
    let broad = matches!(&host, HostPattern::Wildcard(suffix) if !suffix.contains('.'));
    if broad || host.to_string() != pattern {
        return Err(bad());
    }
    Ok(host)
}

impl Registry {
    /// The filter's view. A cached registry's redirects never reach clients (cache-service
    /// follows them), nor do its challenges unless its clients log in upstream
    /// (`client_auth = "upstream"`): then the filter rewrites their realms as for any
    /// registry, so it gets the realm hosts.
    pub fn filter_registry(&self) -> RegistryConfig {
        let client_auth = self.client_auth.unwrap_or_default();
        let realms_reach_clients = !self.cache || client_auth == ClientAuth::Upstream;
        let hosts = |h: &Vec<String>, kept: bool| if kept { h.clone() } else { Vec::new() };
        RegistryConfig {
            name: self.name.clone(),
            aliases: self.aliases.clone(),
            upstream: self.upstream.clone(),
            host_prefix: self.host_prefix.clone(),
            realm_hosts: hosts(&self.realm_hosts, realms_reach_clients),
            redirect_hosts: hosts(&self.redirect_hosts, !self.cache),
            library_namespace: self.library_namespace,
            cache: self.cache,
            redirects: self.redirects,
            cluster: None,
            forward_client_credentials: self.forward_client_credentials,
            client_auth,
        }
    }

    /// cache-service's view: the realm and redirect hosts are the only hosts it may follow
    /// a challenge or a redirect to.
    pub fn cache_upstream(&self) -> CacheUpstream {
        CacheUpstream {
            name: self.name.clone(),
            url: format!("https://{}", self.upstream),
            realm_hosts: self.realm_hosts.clone(),
            redirect_hosts: self.redirect_hosts.clone(),
            ca_file: self.ca_file.clone(),
            username: self.username.clone(),
            password_env: self.password_env.clone(),
            password_file: self.password_file.clone(),
            client_auth: self.client_auth,
            authorization_ttl_seconds: self.authorization_ttl_seconds,
            public: self.public,
            client_token_env: self.client_token_env.clone(),
        }
    }

    /// The first cache-side field set, if any.
    fn cache_field(&self) -> Option<&'static str> {
        [
            ("username", self.username.is_some()),
            ("password_env", self.password_env.is_some()),
            ("password_file", self.password_file.is_some()),
            ("client_auth", self.client_auth.is_some()),
            (
                "authorization_ttl_seconds",
                self.authorization_ttl_seconds.is_some(),
            ),
        ]
        .into_iter()
        .find_map(|(field, set)| set.then_some(field))
    }
}

impl<A> Declaration<A> {
    /// Checks what the generator relies on; the filter's and the cache's parsers check
    /// the configurations produced from it, and cache-service's generator checks `[access]`.
    pub fn validate(&self) -> Result<(), DeclarationError> {
        // Names as written end up in paths (`certs.d/<name>/hosts.toml`), TOML, Caddy and
        // the header the filter sends cache-service: only the canonical form means one
        // thing to all of them.
        let bad_name = |n: &String| DeclarationError::BadName(n.clone());
        if let Some(suffix) = &self.mirror.host_suffix {
            if !is_valid_hostname(suffix) {
                return Err(bad_name(suffix));
            }
        }
        let mut names = BTreeSet::new();
        for registry in &self.registries {
            for name in std::iter::once(&registry.name).chain(&registry.aliases) {
                if !is_valid_authority(name) {
                    return Err(bad_name(name));
                }
                if !names.insert(name.as_str()) {
                    return Err(DeclarationError::DuplicateName(name.clone()));
                }
            }
            if let Some(prefix) = &registry.host_prefix {
                if !is_valid_hostname(prefix) {
                    return Err(bad_name(prefix));
                }
            }
            for host in std::iter::once(&registry.upstream)
                .chain(&registry.realm_hosts)
                .chain(&registry.redirect_hosts)
            {
                declared_host(host)?;
            }
            if let (false, Some(field)) = (registry.cache, registry.cache_field()) {
                return Err(DeclarationError::CacheFieldWithoutCache {
                    registry: registry.name.clone(),
                    field,
                });
            }
            // Removed fields are refused here on any registry (they are no cache fields).
            registry
                .cache_upstream()
                .check_client_auth()
                .map_err(|error| DeclarationError::ClientAuth {
                    registry: registry.name.clone(),
                    error,
                })?;
        }
        let direct = self.upstream_hosts();
        for registry in self.cached_registries() {
            if direct.contains(&declared_host(&registry.upstream)?) {
                return Err(DeclarationError::CachedUpstreamIsDirect {
                    registry: registry.name.clone(),
                    upstream: registry.upstream.clone(),
                });
            }
        }
        let mut cas = BTreeMap::new();
        for registry in self.registries.iter().filter(|r| !r.cache) {
            if let Some(ca) = &registry.ca_file {
                if cas
                    .insert(&registry.upstream, ca)
                    .is_some_and(|old| old != ca)
                {
                    return Err(DeclarationError::ConflictingCa(registry.upstream.clone()));
                }
            }
        }
        if let Some(default) = &self.mirror.default_registry {
            if !self.registries.iter().any(|r| &r.name == default) {
                return Err(DeclarationError::UnknownDefaultRegistry(default.clone()));
            }
        }
        if let Some(url) = &self.mirror.public_url {
            // The filter's own grammar, narrowed to what a public mirror may be.
            let bare = PublicUrl::parse(url).is_ok_and(|p| p.scheme == "https")
                && url.starts_with("https://")
                && !url.ends_with('/');
            if !bare {
                return Err(DeclarationError::BadPublicUrl(url.clone()));
            }
        }
        self.mirror.cache_service.validate()
    }

    /// The filter's configuration. `public`: for the public mirrors (`public_url`
    /// included); without it, for `just up` on 127.0.0.1.
    pub fn filter_config(&self, public: bool) -> FilterConfig {
        FilterConfig {
            host_suffix: self.mirror.host_suffix.clone(),
            default_registry: self.mirror.default_registry.clone(),
            redirect_ttl_seconds: Some(self.mirror.redirect_ttl_seconds),
            signing_key: None,
            public_url: self.mirror.public_url.clone().filter(|_| public),
            registries: self
                .registries
                .iter()
                .map(Registry::filter_registry)
                .collect(),
        }
    }

    /// Every host Envoy connects to, each once: the upstream, realm and redirect hosts of
    /// the registries Envoy serves directly. A cached registry's upstream, realms and
    /// redirects are cache-service's business; Envoy only routes its name to the cache.
    pub fn upstream_hosts(&self) -> BTreeSet<HostPattern> {
        self.registries
            .iter()
            .filter(|r| !r.cache)
            .flat_map(|r| {
                std::iter::once(&r.upstream)
                    .chain(&r.realm_hosts)
                    .chain(&r.redirect_hosts)
            })
            // Invalid ones are refused by `validate`.
            .filter_map(|pattern| declared_host(pattern).ok())
            .collect()
    }

    /// The CA file each directly served upstream's Envoy cluster trusts, where declared
    /// (two registries on one upstream with different CAs are refused by `validate`).
    pub fn upstream_cas(&self) -> BTreeMap<HostPattern, &Path> {
        self.registries
            .iter()
            .filter(|r| !r.cache)
            .filter_map(|r| Some((declared_host(&r.upstream).ok()?, r.ca_file.as_deref()?)))
            .collect()
    }

    /// The registries cache-service serves.
    pub fn cached_registries(&self) -> impl Iterator<Item = &Registry> {
        self.registries.iter().filter(|r| r.cache)
    }

    /// cache-service's `[[upstream]]` entries.
    pub fn cache_upstreams(&self) -> Vec<CacheUpstream> {
        self.cached_registries()
            .map(Registry::cache_upstream)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[access]` unread: any content passes here.
    type Declaration = super::Declaration<serde::de::IgnoredAny>;

    /// The shipped declaration (toml is a dev-dependency only: it stays out of the wasm).
    fn shipped() -> Declaration {
        toml::from_str(include_str!("../../../envoy/registries.toml")).unwrap()
    }

    fn declaration(registries: &str) -> Declaration {
        let json = format!(
            r#"{{"mirror":{{"cache_service":"127.0.0.1:5001"}},"registry":[{registries}]}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn host_patterns_are_canonical() {
        for good in [
            "quay.io",
            "registry.local:5000",
            "*.pkg.dev",
            "127.0.0.1:5443",
        ] {
            assert!(declared_host(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "*.com",
            "a..b",
            "UPPER.io",
            "x.io:0",
            "x.io:99999",
            "-a.io",
            "a b",
            " a.io",
        ] {
            assert_eq!(
                declared_host(bad),
                Err(DeclarationError::BadHost(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn shipped_declaration_is_valid() {
        let d = shipped();
        d.validate().unwrap();
        let hosts: Vec<String> = d.upstream_hosts().iter().map(|h| h.to_string()).collect();
        assert!(hosts.contains(&"registry-1.docker.io".to_owned()));
        assert!(hosts.contains(&"auth.docker.io".to_owned()));
        assert!(hosts.contains(&"*.r2.cloudflarestorage.com".to_owned()));
        // gcr.io is cached: only cache-service talks to it.
        assert!(!hosts.contains(&"gcr.io".to_owned()));
        assert_eq!(d.cached_registries().count(), 1);
    }

    #[test]
    fn names_must_be_written_as_the_mirror_uses_them() {
        for bad in [
            "GCR.io",
            "../x",
            "/etc/x",
            "a.io\n",
            " a.io",
            "a.io x",
            "a.io\n[x]",
        ] {
            let name = serde_json::to_string(bad).unwrap();
            let d = declaration(&format!(r#"{{"name":{name},"upstream":"a.io"}}"#));
            assert_eq!(
                d.validate(),
                Err(DeclarationError::BadName(bad.into())),
                "{bad:?}"
            );
            let d = declaration(&format!(
                r#"{{"name":"b.io","aliases":[{name}],"upstream":"a.io"}}"#
            ));
            assert_eq!(
                d.validate(),
                Err(DeclarationError::BadName(bad.into())),
                "{bad:?}"
            );
        }
        for bad in ["docker ", "Docker", "a/b"] {
            let prefix = serde_json::to_string(bad).unwrap();
            let d = declaration(&format!(
                r#"{{"name":"a.io","upstream":"a.io","host_prefix":{prefix}}}"#
            ));
            assert_eq!(
                d.validate(),
                Err(DeclarationError::BadName(bad.into())),
                "{bad:?}"
            );
        }
        let d = declaration(r#"{"name":"registry.local:5000","upstream":"a.io"}"#);
        assert_eq!(d.validate(), Ok(()));
    }

    #[test]
    fn refusals() {
        let dup = declaration(
            r#"{"name":"a.io","upstream":"a.io"},{"name":"b.io","aliases":["a.io"],"upstream":"b.io"}"#,
        );
        assert_eq!(
            dup.validate(),
            Err(DeclarationError::DuplicateName("a.io".into()))
        );
        let direct = declaration(
            r#"{"name":"a.io","upstream":"a.io"},{"name":"b.io","upstream":"a.io","cache":true}"#,
        );
        assert!(matches!(
            direct.validate(),
            Err(DeclarationError::CachedUpstreamIsDirect { .. })
        ));
        let login = declaration(r#"{"name":"a.io","upstream":"a.io","username":"u"}"#);
        let error = login.validate().unwrap_err();
        assert!(error.to_string().contains("cache = true"), "{error}");
        let cas = declaration(
            r#"{"name":"a.io","upstream":"a.io","ca_file":"/x"},{"name":"b.io","upstream":"a.io","ca_file":"/y"}"#,
        );
        assert_eq!(
            cas.validate(),
            Err(DeclarationError::ConflictingCa("a.io".into()))
        );
        let mut d = declaration(r#"{"name":"a.io","upstream":"a.io"}"#);
        d.mirror.default_registry = Some("b.io".into());
        assert!(matches!(
            d.validate(),
            Err(DeclarationError::UnknownDefaultRegistry(_))
        ));
        d.mirror.default_registry = None;
        d.mirror.cache_service = vec!["cache".to_owned()].into();
        assert!(matches!(
            d.validate(),
            Err(DeclarationError::BadCacheService(_))
        ));
        // Unknown fields are refused at every level.
        for bad in [
            r#"{"mirror":{"cache_service":"c:1","x":1},"registry":[]}"#,
            r#"{"mirror":{"cache_service":"c:1"},"registry":[{"name":"a","upstream":"a","x":1}]}"#,
            r#"{"mirror":{"cache_service":"c:1"},"registry":[],"x":1}"#,
            r#"{"mirror":{"cache_service":"c:1"},"registry":[{"name":"a","upstream":"a","redirects":"follow"}]}"#,
        ] {
            assert!(serde_json::from_str::<Declaration>(bad).is_err(), "{bad}");
        }
        // `[access]` is opaque here: any content passes, its own type checks it.
        let with_access =
            r#"{"mirror":{"cache_service":"c:1"},"registry":[],"access":{"anything":[1]}}"#;
        assert!(serde_json::from_str::<Declaration>(with_access).is_ok());
    }

    #[test]
    fn cache_service_is_one_address_or_a_list_of_replicas() {
        let parse = |value: &str| {
            let json = format!(r#"{{"mirror":{{"cache_service":{value}}},"registry":[]}}"#);
            serde_json::from_str::<Declaration>(&json).map(|d| (d.validate(), d))
        };
        // The original single string keeps working.
        let (valid, one) = parse(r#""127.0.0.1:5001""#).unwrap();
        assert_eq!(valid, Ok(()));
        assert_eq!(one.mirror.cache_service.replicas(), ["127.0.0.1:5001"]);
        assert!(!one.mirror.cache_service.is_replicated());
        let (valid, three) = parse(r#"["cache-1:5001","cache-2:5001","cache-3:5001"]"#).unwrap();
        assert_eq!(valid, Ok(()));
        assert_eq!(three.mirror.cache_service.replicas().len(), 3);
        assert!(three.mirror.cache_service.is_replicated());
        for (bad, error) in [
            ("[]", DeclarationError::CacheReplicaCount(0)),
            (
                r#"["c:1","c:1"]"#,
                DeclarationError::DuplicateCacheService("c:1".into()),
            ),
            (
                r#"["c:1","c"]"#,
                DeclarationError::BadCacheService("c".into()),
            ),
            (
                r#"["c:0"]"#,
                DeclarationError::BadCacheService("c:0".into()),
            ),
            (
                r#"["c:1 "]"#,
                DeclarationError::BadCacheService("c:1 ".into()),
            ),
        ] {
            assert_eq!(parse(bad).unwrap().0, Err(error), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_CACHE_REPLICAS)
            .map(|i| format!(r#""c:{}""#, i + 1))
            .collect();
        let (valid, _) = parse(&format!("[{}]", many.join(","))).unwrap();
        assert_eq!(
            valid,
            Err(DeclarationError::CacheReplicaCount(MAX_CACHE_REPLICAS + 1))
        );
        // Neither a number nor a table.
        assert!(parse("5001").is_err());
        assert!(parse(r#"{"a":"c:1"}"#).is_err());
    }

    #[test]
    fn public_url_is_an_https_origin() {
        let mut d = declaration(r#"{"name":"a.io","upstream":"a.io"}"#);
        for good in [
            "https://mirror.example.com",
            "https://mirror.example.com:8443",
        ] {
            d.mirror.public_url = Some(good.into());
            assert_eq!(d.validate(), Ok(()), "{good}");
        }
        for bad in [
            "http://mirror.example.com",
            "https://mirror.example.com/",
            "https://mirror.example.com/v2",
            "https://u:p@mirror.example.com",
            "https://mirror.example.com?x=1",
            "mirror.example.com",
        ] {
            d.mirror.public_url = Some(bad.into());
            assert_eq!(
                d.validate(),
                Err(DeclarationError::BadPublicUrl(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn cached_registries_keep_their_hosts_for_the_cache_only() {
        let d = declaration(
            r#"{"name":"a.io","upstream":"a.io:5000","realm_hosts":["auth.a.io"],"redirect_hosts":["*.cdn.a.io"],
                "cache":true,"username":"u","password_env":"PW","ca_file":"/ca.pem","client_auth":"anonymous"}"#,
        );
        d.validate().unwrap();
        let filter = d.filter_config(true);
        assert!(filter.registries[0].realm_hosts.is_empty());
        assert!(filter.registries[0].redirect_hosts.is_empty());
        let upstream = &d.cache_upstreams()[0];
        assert_eq!(upstream.url, "https://a.io:5000");
        assert_eq!(upstream.realm_hosts, ["auth.a.io"]);
        assert_eq!(upstream.redirect_hosts, ["*.cdn.a.io"]);
        assert_eq!(upstream.username.as_deref(), Some("u"));
        assert_eq!(upstream.ca_file, Some(PathBuf::from("/ca.pem")));
        // Envoy never reaches a cached upstream: its CA is the cache's.
        assert!(d.upstream_cas().is_empty());
        assert!(d.upstream_hosts().is_empty());
    }

    /// Clients that log in upstream see the registry's challenges (rewritten by the filter),
    /// never its redirects (the cache follows them).
    #[test]
    fn upstream_client_auth_gives_the_filter_the_realm_hosts() {
        let d = declaration(
            r#"{"name":"a.io","upstream":"a.io","realm_hosts":["auth.a.io"],"redirect_hosts":["cdn.a.io"],
                "cache":true,"client_auth":"upstream","authorization_ttl_seconds":5}"#,
        );
        d.validate().unwrap();
        let filter = &d.filter_config(true).registries[0];
        assert_eq!(filter.realm_hosts, ["auth.a.io"]);
        assert!(filter.redirect_hosts.is_empty());
        assert_eq!(filter.client_auth, ClientAuth::Upstream);
        let upstream = &d.cache_upstreams()[0];
        assert_eq!(upstream.client_auth(), ClientAuth::Upstream);
        assert_eq!(
            upstream.authorization_ttl(),
            std::time::Duration::from_secs(5)
        );
        // The filter's JSON names the mode only where it is not the default.
        let anonymous = declaration(r#"{"name":"b.io","upstream":"b.io","cache":true}"#);
        let json = serde_json::to_string(&anonymous.filter_config(true)).unwrap();
        assert!(!json.contains("client_auth"), "{json}");
        assert_eq!(
            anonymous.cache_upstreams()[0].authorization_ttl(),
            std::time::Duration::from_secs(DEFAULT_AUTHORIZATION_TTL_SECONDS)
        );
    }

    #[test]
    fn client_auth_settings_are_refused_with_what_to_write_instead() {
        let refused = |fields: &str| {
            let d = declaration(&format!(
                r#"{{"name":"a.io","upstream":"a.io","cache":true{fields}}}"#
            ));
            match d.validate() {
                Err(DeclarationError::ClientAuth { registry, error }) => {
                    assert_eq!(registry, "a.io");
                    error
                }
                other => panic!("{fields}: {other:?}"),
            }
        };
        let public = refused(r#","username":"u","password_env":"P","public":true"#);
        assert_eq!(public, ClientAuthError::Removed(RemovedField::Public));
        assert!(public.to_string().contains("client_auth = \"anonymous\""));
        let token = refused(r#","client_token_env":"T""#);
        assert_eq!(
            token,
            ClientAuthError::Removed(RemovedField::ClientTokenEnv)
        );
        assert!(token.to_string().contains("client_auth = \"upstream\""));
        assert_eq!(
            refused(r#","username":"u","password_env":"P""#),
            ClientAuthError::Unstated
        );
        assert_eq!(
            refused(r#","authorization_ttl_seconds":30"#),
            ClientAuthError::TtlWithoutUpstream
        );
        for bad in [0, MAX_AUTHORIZATION_TTL_SECONDS + 1] {
            assert_eq!(
                refused(&format!(
                    r#","client_auth":"upstream","authorization_ttl_seconds":{bad}"#
                )),
                ClientAuthError::BadTtl(bad)
            );
        }
        // Removed fields are refused on any registry, with the same message.
        let direct = declaration(r#"{"name":"a.io","upstream":"a.io","public":true}"#);
        assert!(matches!(
            direct.validate(),
            Err(DeclarationError::ClientAuth { .. })
        ));
        // client_auth is cache-service's business.
        let direct = declaration(r#"{"name":"a.io","upstream":"a.io","client_auth":"upstream"}"#);
        assert_eq!(
            direct.validate(),
            Err(DeclarationError::CacheFieldWithoutCache {
                registry: "a.io".into(),
                field: "client_auth"
            })
        );
    }

    /// What render writes for the filter is exactly what the filter's parser reads, both ways.
    #[test]
    fn the_filter_reads_what_the_declaration_renders() {
        let d = shipped();
        for public in [false, true] {
            let rendered = d.filter_config(public);
            let json = serde_json::to_string_pretty(&rendered).unwrap();
            assert_eq!(
                crate::config::parse(json.as_bytes()).unwrap(),
                crate::config::compile(&rendered).unwrap()
            );
            let parsed: FilterConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(parsed, rendered);
            assert_eq!(serde_json::to_string_pretty(&parsed).unwrap(), json);
        }
    }
}
