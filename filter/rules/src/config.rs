//! Plugin configuration: serde types, defaults, validation and the compiled table.

use crate::hosts::{any_match, is_valid_authority, is_valid_hostname, BadHost, HostPattern};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

/// Default lifetime of a signed redirect URL.
pub const DEFAULT_REDIRECT_TTL_SECONDS: u64 = 1200;

/// The filter's plugin configuration (JSON), as in docs/design.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Host mode: `<host_prefix>.<host_suffix>` selects a registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_suffix: Option<String>,
    /// Registry for requests that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_registry: Option<String>,
    /// Lifetime of a signed redirect URL (default 1200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_ttl_seconds: Option<u64>,
    /// Hex HMAC key (>= 32 bytes); absent: generated once per Envoy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// `http(s)://host[:port]` the mirror is reached at: URLs handed to clients are built
    /// from it (never from the request's Host), and other Hosts are refused with 421.
    /// Absent: the client's (validated) Host is used, fit for local use only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Registries. Empty or absent: the built-in ones, those of `envoy/registries.toml`
    /// (and, when `default_registry` is absent too, its default registry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registries: Vec<RegistryConfig>,
}

/// What to do with upstream redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// Rewrite to a signed mirror URL; the mirror fetches the target.
    #[default]
    Sign,
    /// Leave `Location` alone.
    Passthrough,
}

/// One registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Public name (`docker.io`).
    pub name: String,
    /// Other names accepted in `ns` and path prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// `host[:port]` of the upstream (TLS).
    pub upstream: String,
    /// Host-mode prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_prefix: Option<String>,
    /// Token realm hosts (patterns) whose challenges are rewritten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub realm_hosts: Vec<String>,
    /// Redirect target hosts (patterns) that get signed mirror URLs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_hosts: Vec<String>,
    /// One-component names get `library/`.
    #[serde(default)]
    pub library_namespace: bool,
    /// Envoy sends this registry to cache-service.
    #[serde(default)]
    pub cache: bool,
    /// Redirect handling.
    #[serde(default)]
    pub redirects: RedirectMode,
    /// Envoy cluster of the upstream, for the filter's own calls (learning a realm).
    /// Default: the upstream host string, as the shipped Envoy configs name clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Let the credential a client keeps for the shared mirror host (one credential domain
    /// for every registry) reach this registry. When false, on the shared host: its token
    /// requests go without the client's `Authorization`; its `/v2/` requests go without a
    /// non-Bearer one (a Basic login) and their answers keep only the challenges rewritten
    /// to the mirror's Bearer realms. Default: true for the default registry, false for the
    /// others. Host mode ignores it: `<host_prefix>.<host_suffix>` is the registry's own
    /// credential domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_client_credentials: Option<bool>,
    /// A cached registry's clients: anonymous (the cache's own access serves everyone) or
    /// authorized at the upstream with their own credentials.
    #[serde(default, skip_serializing_if = "ClientAuth::is_anonymous")]
    pub client_auth: ClientAuth,
}

/// Who may read what a cached registry's cache holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Anyone who reaches the mirror: the filter hands out a placeholder token and the cache
    /// reads upstream with its own access.
    #[default]
    Anonymous,
    /// Each client logs in at the upstream through the mirror (token requests go to the
    /// upstream's realm by way of cache-service), and cache-service checks the client's
    /// credential upstream before it serves a repository.
    Upstream,
}

impl ClientAuth {
    pub fn is_anonymous(&self) -> bool {
        *self == Self::Anonymous
    }
}

/// A configuration error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// JSON did not parse or had unknown fields.
    Json(String),
    /// Two registries share a name or alias.
    DuplicateName(String),
    /// Two registries share a host prefix.
    DuplicateHostPrefix(String),
    /// A host or host pattern is malformed.
    BadHost(String),
    /// `default_registry` is not a registry name or alias.
    UnknownDefaultRegistry(String),
    /// The signing key is not hex or shorter than 32 bytes.
    BadSigningKey,
    /// `redirect_ttl_seconds` is 0.
    ZeroTtl,
    /// A `cluster` is empty, too long or has spaces or control characters.
    BadCluster(String),
    /// `public_url` is not `http(s)://host[:port]`.
    BadPublicUrl(String),
    /// The built-in configuration (envoy/filter.json, embedded at build time) does not
    /// read: the configuration must name its registries.
    Builtin(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Json(e) => write!(f, "invalid JSON configuration: {e}"),
            ConfigError::DuplicateName(n) => write!(f, "duplicate registry name or alias {n:?}"),
            ConfigError::DuplicateHostPrefix(p) => write!(f, "duplicate host_prefix {p:?}"),
            ConfigError::BadHost(h) => write!(f, "invalid host or host pattern {h:?}"),
            ConfigError::UnknownDefaultRegistry(n) => {
                write!(f, "default_registry {n:?} is not a configured registry")
            }
            ConfigError::BadSigningKey => {
                f.write_str("signing_key must be hex and at least 32 bytes (64 hex chars)")
            }
            ConfigError::ZeroTtl => f.write_str("redirect_ttl_seconds must be > 0"),
            ConfigError::BadCluster(c) => write!(f, "invalid cluster name {c:?}"),
            ConfigError::BadPublicUrl(u) => write!(
                f,
                "public_url {u:?} must be http(s)://host[:port] without path or query"
            ),
            ConfigError::Builtin(e) => write!(
                f,
                "the built-in registries (envoy/filter.json) do not read: {e}; declare registries"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl From<BadHost> for ConfigError {
    fn from(BadHost(h): BadHost) -> Self {
        ConfigError::BadHost(h)
    }
}

/// The configuration used when the plugin configuration is empty: `envoy/filter.json`,
/// which `regmirror render` writes from the one declaration (`envoy/registries.toml`, a
/// test fails when it drifts), embedded and read by the same parser as any configuration.
/// Its registries and default registry, in path mode without `public_url` (the declared
/// host suffix and public URL are a real deployment's).
///
/// Built-ins that do not read (caught by the tests) leave it empty, which [`compile`]
/// resolves to the built-ins again and so reports.
pub fn default_config() -> FilterConfig {
    builtin_config().unwrap_or_default()
}

fn builtin_config() -> Result<FilterConfig, ConfigError> {
    let rendered: FilterConfig =
        serde_json::from_slice(include_bytes!(concat!(env!("OUT_DIR"), "/filter.json")))
            .map_err(|e| ConfigError::Builtin(e.to_string()))?;
    Ok(FilterConfig {
        host_suffix: None,
        public_url: None,
        ..rendered
    })
}

/// An Envoy cluster name we accept: 1..=255 printable ASCII, no spaces
/// (Istio's `outbound|80||quay.io` included).
pub fn is_valid_cluster_name(c: &str) -> bool {
    !c.is_empty() && c.len() <= 255 && c.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// The validated `public_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// Lowercase host.
    pub host: String,
    /// `:port` or empty (default ports dropped).
    pub port: String,
}

impl PublicUrl {
    /// Parses `http(s)://host[:port]` (one trailing `/` tolerated).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadPublicUrl(s.to_string());
        let t = s.trim();
        let (scheme, rest) = t.split_once("://").ok_or_else(bad)?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => "443",
            "http" => "80",
            _ => return Err(bad()),
        };
        let auth = rest.strip_suffix('/').unwrap_or(rest).to_ascii_lowercase();
        if !is_valid_authority(&auth) {
            return Err(bad());
        }
        let (host, port) = match auth.split_once(':') {
            Some((h, p)) if p != default_port => (h.to_string(), format!(":{p}")),
            Some((h, _)) => (h.to_string(), String::new()),
            None => (auth, String::new()),
        };
        Ok(PublicUrl { scheme, host, port })
    }

    /// `<scheme>://<host>[:port]` for `host` (the public host or a host-mode host).
    pub fn base_for(&self, host: &str) -> String {
        format!("{}://{host}{}", self.scheme, self.port)
    }
}

/// A compiled registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// Public name.
    pub name: String,
    /// Aliases (lowercase).
    pub aliases: Vec<String>,
    /// Upstream `host[:port]`.
    pub upstream: String,
    /// Host-mode prefix.
    pub host_prefix: Option<String>,
    /// Realm host patterns.
    pub realm_hosts: Vec<HostPattern>,
    /// Redirect host patterns.
    pub redirect_hosts: Vec<HostPattern>,
    /// Add `library/` to one-component names.
    pub library_namespace: bool,
    /// Served through cache-service.
    pub cache: bool,
    /// Redirect handling.
    pub redirects: RedirectMode,
    /// Envoy cluster for calls the filter makes to the upstream.
    pub cluster: String,
    /// Name usable in a metric: non-alphanumerics become `_`.
    pub metric_name: String,
    /// The client's credential for the shared mirror host reaches this registry: its realm
    /// and its `/v2/` API (see [`RegistryConfig::forward_client_credentials`]).
    pub forward_client_credentials: bool,
    /// A cached registry's client authorization.
    pub client_auth: ClientAuth,
}

impl Registry {
    /// Is `authority` (normalized) an allowed redirect target?
    pub fn redirect_allowed(&self, authority: &str) -> bool {
        self.upstream == authority || any_match(&self.redirect_hosts, authority)
    }
}

/// Validated, immutable configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledConfig {
    registries: Vec<Registry>,
    by_name: HashMap<String, usize>,
    by_host: HashMap<String, usize>,
    /// The suffix every key of `by_host` ends in (the compiled `host_suffix`).
    by_host_suffix: Option<String>,
    default_registry: Option<usize>,
    /// Host-mode suffix.
    pub host_suffix: Option<String>,
    /// Signed URL lifetime.
    pub redirect_ttl_seconds: u64,
    /// Configured signing key bytes.
    pub signing_key: Option<Vec<u8>>,
    /// Where clients reach the mirror; `None`: the client's Host.
    pub public_url: Option<PublicUrl>,
}

impl CompiledConfig {
    /// All registries in configuration order.
    pub fn registries(&self) -> &[Registry] {
        &self.registries
    }

    /// Registry by name or alias (case-insensitive).
    pub fn registry(&self, name: &str) -> Option<&Registry> {
        let key = lowercase(name);
        self.by_name
            .get(key.as_ref())
            .and_then(|&i| self.registries.get(i))
    }

    /// Registry selected by a host-mode host (no port).
    pub fn registry_for_host(&self, host: &str) -> Option<&Registry> {
        // Every host-mode host ends in the suffix: the shared host (every request there)
        // is told apart without hashing.
        let sfx = self.by_host_suffix.as_deref()?;
        if host.len() <= sfx.len()
            || !host
                .get(host.len() - sfx.len()..)
                .is_some_and(|end| end.eq_ignore_ascii_case(sfx))
        {
            return None;
        }
        let key = lowercase(host);
        self.by_host
            .get(key.as_ref())
            .and_then(|&i| self.registries.get(i))
    }

    /// The default registry.
    pub fn default_registry(&self) -> Option<&Registry> {
        self.default_registry.and_then(|i| self.registries.get(i))
    }

    /// Does the mirror answer requests for `host` (lowercase, no port)? Always, without
    /// `public_url`; with it, its host and the host-mode hosts only.
    pub fn serves_host(&self, host: &str) -> bool {
        match &self.public_url {
            None => true,
            Some(p) => p.host == host || self.by_host.contains_key(host),
        }
    }

    /// First registry whose realm hosts match `authority`.
    pub fn registry_for_realm(&self, authority: &str) -> Option<&Registry> {
        self.registries
            .iter()
            .find(|r| any_match(&r.realm_hosts, authority))
    }
}

/// `s` lowercased, borrowed when it already is (lookups run on every request).
fn lowercase(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        s.to_ascii_lowercase().into()
    } else {
        s.into()
    }
}

/// Decodes lowercase/uppercase hex.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    let b = s.as_bytes();
    b.chunks(2)
        .map(|pair| {
            let hi = (*pair.first()? as char).to_digit(16)?;
            let lo = (*pair.get(1)? as char).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

fn metric_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Validates and compiles a configuration.
pub fn compile(cfg: &FilterConfig) -> Result<CompiledConfig, ConfigError> {
    // No registries: the built-in ones, with their default registry unless one is named.
    let builtin = if cfg.registries.is_empty() {
        Some(builtin_config()?)
    } else {
        None
    };
    let regs = builtin.as_ref().map_or(&cfg.registries, |b| &b.registries);
    let host_suffix = match &cfg.host_suffix {
        Some(s) if !s.trim().is_empty() => {
            let l = s.trim().to_ascii_lowercase();
            if !is_valid_hostname(&l) {
                return Err(ConfigError::BadHost(s.clone()));
            }
            Some(l)
        }
        _ => None,
    };
    let ttl = cfg
        .redirect_ttl_seconds
        .unwrap_or(DEFAULT_REDIRECT_TTL_SECONDS);
    if ttl == 0 {
        return Err(ConfigError::ZeroTtl);
    }
    let signing_key = match &cfg.signing_key {
        None => None,
        Some(k) => {
            let bytes = decode_hex(k.trim()).ok_or(ConfigError::BadSigningKey)?;
            if bytes.len() < 32 {
                return Err(ConfigError::BadSigningKey);
            }
            Some(bytes)
        }
    };

    let public_url = match &cfg.public_url {
        Some(u) => Some(PublicUrl::parse(u)?),
        None => None,
    };

    let mut registries = Vec::with_capacity(regs.len());
    let mut by_name = HashMap::new();
    let mut by_host = HashMap::new();
    let mut prefixes: HashMap<String, usize> = HashMap::new();
    for (i, r) in regs.iter().enumerate() {
        let name = r.name.trim().to_ascii_lowercase();
        if !is_valid_authority(&name) {
            return Err(ConfigError::BadHost(r.name.clone()));
        }
        let upstream = r.upstream.trim().to_ascii_lowercase();
        if !is_valid_authority(&upstream) {
            return Err(ConfigError::BadHost(r.upstream.clone()));
        }
        let mut aliases = Vec::new();
        for n in std::iter::once(&r.name).chain(r.aliases.iter()) {
            let l = n.trim().to_ascii_lowercase();
            if !is_valid_authority(&l) {
                return Err(ConfigError::BadHost(n.clone()));
            }
            if by_name.insert(l.clone(), i).is_some() {
                return Err(ConfigError::DuplicateName(l));
            }
            if l != name {
                aliases.push(l);
            }
        }
        let host_prefix = match &r.host_prefix {
            Some(p) if !p.trim().is_empty() => {
                let l = p.trim().to_ascii_lowercase();
                if !is_valid_hostname(&l) {
                    return Err(ConfigError::BadHost(p.clone()));
                }
                if prefixes.insert(l.clone(), i).is_some() {
                    return Err(ConfigError::DuplicateHostPrefix(l));
                }
                if let Some(sfx) = &host_suffix {
                    by_host.insert(format!("{l}.{sfx}"), i);
                }
                Some(l)
            }
            _ => None,
        };
        let realm_hosts = r
            .realm_hosts
            .iter()
            .map(|h| HostPattern::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        let cluster = match &r.cluster {
            None => upstream.clone(),
            Some(c) => {
                let c = c.trim();
                if !is_valid_cluster_name(c) {
                    return Err(ConfigError::BadCluster(c.to_string()));
                }
                c.to_string()
            }
        };
        let redirect_hosts = r
            .redirect_hosts
            .iter()
            .map(|h| HostPattern::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        registries.push(Registry {
            metric_name: metric_name(&name),
            name,
            aliases,
            upstream,
            host_prefix,
            realm_hosts,
            redirect_hosts,
            library_namespace: r.library_namespace,
            cache: r.cache,
            redirects: r.redirects,
            cluster,
            forward_client_credentials: r.forward_client_credentials.unwrap_or(false),
            client_auth: r.client_auth,
        });
    }

    let default_name = match &cfg.default_registry {
        Some(d) if !d.trim().is_empty() => Some(d.trim().to_string()),
        Some(_) => None,
        None => builtin.as_ref().and_then(|b| b.default_registry.clone()),
    };
    let default_registry = match default_name {
        None => None,
        Some(d) => Some(
            *by_name
                .get(&d.to_ascii_lowercase())
                .ok_or(ConfigError::UnknownDefaultRegistry(d))?,
        ),
    };

    // Default: the default registry's realm gets client credentials (`docker login`).
    for (i, (r, c)) in registries.iter_mut().zip(regs).enumerate() {
        if c.forward_client_credentials.is_none() {
            r.forward_client_credentials = default_registry == Some(i);
        }
    }

    Ok(CompiledConfig {
        registries,
        by_name,
        by_host,
        by_host_suffix: host_suffix.clone(),
        default_registry,
        host_suffix,
        redirect_ttl_seconds: ttl,
        signing_key,
        public_url,
    })
}

/// Parses plugin configuration bytes; empty or whitespace means the defaults.
pub fn parse(bytes: &[u8]) -> Result<CompiledConfig, ConfigError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return compile(&default_config());
    }
    let cfg: FilterConfig =
        serde_json::from_slice(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
    compile(&cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, upstream: &str) -> RegistryConfig {
        RegistryConfig {
            name: name.into(),
            aliases: vec![],
            upstream: upstream.into(),
            host_prefix: None,
            realm_hosts: vec![],
            redirect_hosts: vec![],
            library_namespace: false,
            cache: false,
            redirects: RedirectMode::Sign,
            cluster: None,
            forward_client_credentials: None,
            client_auth: ClientAuth::Anonymous,
        }
    }

    #[test]
    fn clusters() {
        let c = parse(b"").unwrap();
        assert_eq!(
            c.registry("docker.io").unwrap().cluster,
            "registry-1.docker.io"
        );
        let c = parse(
            br#"{"registries":[{"name":"quay.io","upstream":"quay.io","cluster":" outbound|80||quay.io "}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.registry("quay.io").unwrap().cluster,
            "outbound|80||quay.io"
        );
        for bad in ["", "a b", "a\\u0001"] {
            let j = format!(
                r#"{{"registries":[{{"name":"quay.io","upstream":"quay.io","cluster":"{bad}"}}]}}"#
            );
            assert!(
                matches!(parse(j.as_bytes()), Err(ConfigError::BadCluster(_))),
                "{bad:?}"
            );
        }
        // Absent stays absent when serialized (rendered filter.json unchanged).
        let out = serde_json::to_string(&default_config().registries).unwrap();
        assert!(!out.contains("cluster"));
    }

    #[test]
    fn empty_means_defaults() {
        for input in [&b""[..], b"  \n\t", b"{}"] {
            let c = parse(input).unwrap();
            assert_eq!(c.registries().len(), 5);
            assert_eq!(c.default_registry().unwrap().name, "docker.io");
            assert_eq!(c.redirect_ttl_seconds, 1200);
            assert!(c.signing_key.is_none());
            assert!(c.host_suffix.is_none());
        }
        let c = parse(b"").unwrap();
        let d = c.registry("registry-1.docker.io").unwrap();
        assert_eq!(d.name, "docker.io");
        assert!(d.library_namespace);
        assert!(d.redirect_allowed("foo.r2.cloudflarestorage.com"));
        assert!(d.redirect_allowed("registry-1.docker.io"));
        assert!(!d.redirect_allowed("r2.cloudflarestorage.com"));
        assert!(c.registry("GCR.IO").unwrap().cache);
        assert_eq!(
            c.registry_for_realm("us-docker.pkg.dev").unwrap().name,
            "registry.k8s.io"
        );
        assert_eq!(
            c.registry_for_realm("auth.docker.io").unwrap().name,
            "docker.io"
        );
        assert!(c.registry_for_realm("evil.example").is_none());
        assert_eq!(
            c.registry("registry.k8s.io").unwrap().metric_name,
            "registry_k8s_io"
        );
    }

    #[test]
    fn roundtrip_default_config() {
        let json = serde_json::to_string(&default_config()).unwrap();
        let back: FilterConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, default_config());
        assert_eq!(parse(json.as_bytes()).unwrap(), parse(b"").unwrap());
    }

    #[test]
    fn host_mode_and_options() {
        let json = br#"{"host_suffix":"Mirror.Test","default_registry":"index.docker.io",
            "redirect_ttl_seconds":60,
            "signing_key":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            "registries":[{"name":"docker.io","aliases":["index.docker.io"],
              "upstream":"registry-1.docker.io","host_prefix":"docker","library_namespace":true,
              "redirects":"passthrough"},
              {"name":"localhost:5000","upstream":"127.0.0.1:5001"}]}"#;
        let c = parse(json).unwrap();
        assert_eq!(
            c.registry_for_host("docker.mirror.test").unwrap().name,
            "docker.io"
        );
        assert!(c.registry_for_host("quay.mirror.test").is_none());
        assert_eq!(c.default_registry().unwrap().name, "docker.io");
        assert_eq!(c.redirect_ttl_seconds, 60);
        assert_eq!(c.signing_key.as_ref().unwrap().len(), 32);
        assert_eq!(
            c.registry("docker.io").unwrap().redirects,
            RedirectMode::Passthrough
        );
        assert_eq!(
            c.registry("localhost:5000").unwrap().upstream,
            "127.0.0.1:5001"
        );
        // Explicit registries without default_registry: no default.
        let c = parse(br#"{"registries":[{"name":"quay.io","upstream":"quay.io"}]}"#).unwrap();
        assert!(c.default_registry().is_none());
    }

    #[test]
    fn validation_errors() {
        let base = |regs: Vec<RegistryConfig>| FilterConfig {
            registries: regs,
            ..FilterConfig::default()
        };
        let mut a = reg("a.io", "a.io");
        let b = reg("a.io", "b.io");
        assert!(matches!(
            compile(&base(vec![a.clone(), b])),
            Err(ConfigError::DuplicateName(_))
        ));
        let mut b = reg("b.io", "b.io");
        b.aliases = vec!["A.io".into()];
        assert!(matches!(
            compile(&base(vec![a.clone(), b])),
            Err(ConfigError::DuplicateName(_))
        ));
        a.host_prefix = Some("x".into());
        let mut b = reg("b.io", "b.io");
        b.host_prefix = Some("x".into());
        assert!(matches!(
            compile(&base(vec![a.clone(), b])),
            Err(ConfigError::DuplicateHostPrefix(_))
        ));
        for bad in [
            "*",
            "*.",
            "a..b",
            "a b",
            "-a.io",
            "a.io:0",
            "a.io:99999",
            "a.*.io",
            "http://a",
        ] {
            let mut r = reg("a.io", "a.io");
            r.redirect_hosts = vec![bad.into()];
            assert!(
                matches!(compile(&base(vec![r])), Err(ConfigError::BadHost(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            compile(&base(vec![reg("a.io", "bad host")])),
            Err(ConfigError::BadHost(_))
        ));
        let mut c = base(vec![reg("a.io", "a.io")]);
        c.default_registry = Some("b.io".into());
        assert!(matches!(
            compile(&c),
            Err(ConfigError::UnknownDefaultRegistry(_))
        ));
        let mut c = base(vec![]);
        c.signing_key = Some("zz".repeat(32));
        assert_eq!(compile(&c), Err(ConfigError::BadSigningKey));
        c.signing_key = Some("ab".repeat(31));
        assert_eq!(compile(&c), Err(ConfigError::BadSigningKey));
        c.signing_key = Some("abc".into());
        assert_eq!(compile(&c), Err(ConfigError::BadSigningKey));
        c.signing_key = None;
        c.redirect_ttl_seconds = Some(0);
        assert_eq!(compile(&c), Err(ConfigError::ZeroTtl));
        assert!(matches!(parse(b"{\"bogus\":1}"), Err(ConfigError::Json(_))));
        assert!(matches!(
            parse(br#"{"registries":[{"name":"a.io","upstream":"a.io","x":1}]}"#),
            Err(ConfigError::Json(_))
        ));
        assert!(matches!(parse(b"not json"), Err(ConfigError::Json(_))));
        assert!(matches!(
            parse(br#"{"registries":[{"name":"a.io"}]}"#),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn public_url_and_credential_forwarding() {
        let json =
            br#"{"public_url":"HTTPS://Mirror.Example.com:443/","host_suffix":"mirror.example.com",
            "default_registry":"docker.io","registries":[
              {"name":"docker.io","upstream":"registry-1.docker.io","host_prefix":"docker"},
              {"name":"quay.io","upstream":"quay.io","forward_client_credentials":true},
              {"name":"ghcr.io","upstream":"ghcr.io"}]}"#;
        let c = parse(json).unwrap();
        let p = c.public_url.as_ref().unwrap();
        assert_eq!(
            (p.scheme.as_str(), p.host.as_str(), p.port.as_str()),
            ("https", "mirror.example.com", "")
        );
        assert!(c.serves_host("mirror.example.com"));
        assert!(c.serves_host("docker.mirror.example.com"));
        assert!(!c.serves_host("quay.mirror.example.com"));
        assert!(!c.serves_host("evil.example"));
        // Default: only the default registry's realm gets client credentials.
        let fwd = |n: &str| c.registry(n).unwrap().forward_client_credentials;
        assert!(fwd("docker.io"));
        assert!(fwd("quay.io"));
        assert!(!fwd("ghcr.io"));
        let d = parse(b"").unwrap();
        assert!(d.public_url.is_none());
        assert!(d.serves_host("anything.example"));
        assert!(d.registry("docker.io").unwrap().forward_client_credentials);
        for n in ["quay.io", "gcr.io", "ghcr.io", "registry.k8s.io"] {
            assert!(!d.registry(n).unwrap().forward_client_credentials, "{n}");
        }
        let p = PublicUrl::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!(p.base_for(&p.host), "http://127.0.0.1:5000");
        for bad in [
            "mirror.example.com",
            "ftp://mirror.example.com",
            "https://mirror.example.com/v2",
            "https://mirror.example.com?x",
            "https://user@mirror.example.com",
            "https://mirror.example.com:0",
            "https://",
            "https://[::1]",
        ] {
            let j = format!(r#"{{"public_url":"{bad}"}}"#);
            assert!(
                matches!(parse(j.as_bytes()), Err(ConfigError::BadPublicUrl(_))),
                "{bad}"
            );
        }
        // Both fields round-trip through the serde types.
        let cfg: FilterConfig = serde_json::from_slice(json).unwrap();
        let out = serde_json::to_string(&cfg).unwrap();
        assert!(out.contains(r#""public_url":"HTTPS://Mirror.Example.com:443/""#));
        assert!(out.contains(r#""forward_client_credentials":true"#));
        let back: FilterConfig = serde_json::from_str(&out).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(parse(out.as_bytes()).unwrap(), c);
    }

    #[test]
    fn design_example_parses() {
        let json = br#"{
          "host_suffix": "mirror.example.com",
          "default_registry": "docker.io",
          "redirect_ttl_seconds": 1200,
          "registries": [ { "name": "docker.io", "aliases": [], "upstream": "registry-1.docker.io",
                            "host_prefix": "docker", "realm_hosts": [], "redirect_hosts": [],
                            "library_namespace": true, "cache": false, "redirects": "sign" } ]
        }"#;
        let c = parse(json).unwrap();
        assert_eq!(
            c.registry_for_host("docker.mirror.example.com")
                .unwrap()
                .upstream,
            "registry-1.docker.io"
        );
        let cfg: FilterConfig = serde_json::from_slice(json).unwrap();
        let out = serde_json::to_string(&cfg).unwrap();
        let back: FilterConfig = serde_json::from_str(&out).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn hex() {
        assert_eq!(decode_hex("0aFF"), Some(vec![10, 255]));
        assert_eq!(decode_hex("0g"), None);
    }

    /// The built-in registries are the shipped declaration's, as render writes them.
    #[test]
    fn defaults_are_the_declared_registries() {
        let declared: crate::declaration::Declaration<serde::de::IgnoredAny> =
            toml::from_str(include_str!("../../../envoy/registries.toml")).unwrap();
        let defaults = default_config();
        assert_eq!(
            defaults.registries,
            declared.filter_config(false).registries
        );
        assert_eq!(defaults.default_registry, declared.mirror.default_registry);
        assert_eq!(
            defaults.redirect_ttl_seconds,
            Some(declared.mirror.redirect_ttl_seconds)
        );
        assert_eq!(defaults.registries.len(), declared.registries.len());
        assert!(defaults.host_suffix.is_none() && defaults.public_url.is_none());
    }
}
