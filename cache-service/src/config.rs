//! Configuration: command-line flags (with `REGMIRROR_*` environment overrides) merged over an
//! optional TOML file, validated once at startup into [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::object::BucketSettings;
use registry_rules::declaration::{CacheUpstream, ClientAuth, ClientAuthError};
use registry_rules::hosts::{is_valid_authority, HostPattern};
use serde::{Deserialize, Serialize};

/// Longest `--shutdown-grace` honoured: a larger value is capped (it is added to the clock).
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(86_400);
const DEFAULT_MAX_BLOB_SIZE: u64 = 32 << 30;
const DEFAULT_MAX_PASS_THROUGH_MEMORY: u64 = 256 << 20;

/// Flags of `regmirror serve` (also the default command).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:5001].
    #[arg(long, env = "REGMIRROR_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Cache directory (blobs, manifests, tags, temp files), or `s3://BUCKET/PREFIX` for an
    /// S3 bucket shared by replicas (credentials from the usual AWS_* variables). Required
    /// (flag, env or config).
    #[arg(long, env = "REGMIRROR_STORAGE", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub storage: Option<PathBuf>,
    /// S3 endpoint URL (overrides AWS_ENDPOINT_URL / AWS_ENDPOINT), e.g. http://127.0.0.1:8333.
    #[arg(long, env = "REGMIRROR_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (overrides AWS_REGION).
    #[arg(long, env = "REGMIRROR_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Local scratch for downloads in progress when storage is a bucket
    /// [default: regmirror-spool under the system temp directory].
    #[arg(long, env = "REGMIRROR_SPOOL_DIR", value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// With a bucket: bytes of blobs this replica also keeps on its own disk (under the spool
    /// directory) for fast warm reads, e.g. 20GiB; 0 = none [default: 0].
    #[arg(long, env = "REGMIRROR_LOCAL_CACHE_SIZE", value_name = "BYTES")]
    pub local_cache_size: Option<String>,
    /// With a bucket: answer a blob GET with a 307 to a presigned URL of its object, so
    /// clients fetch the bytes from the bucket (which they must reach) instead of through
    /// the replica. Blobs up to 256 KiB and HEADs are still answered by the replica.
    #[arg(long, env = "REGMIRROR_REDIRECT")]
    pub redirect: bool,
    /// With --redirect: the bucket endpoint clients reach, when it is not --s3-endpoint
    /// (URLs are signed for its host) [default: the replicas' endpoint].
    #[arg(long, env = "REGMIRROR_REDIRECT_ENDPOINT", value_name = "URL")]
    pub redirect_endpoint: Option<String>,
    /// With --redirect: seconds a presigned URL can be used, 1-604800 [default: 300].
    #[arg(long, env = "REGMIRROR_REDIRECT_TTL", value_name = "SECONDS")]
    pub redirect_ttl: Option<u64>,
    /// Upstream registry as NAME=URL, e.g. gcr.io=https://gcr.io (repeatable). NAME is matched
    /// against the `x-mirror-registry` header or the `ns` query parameter.
    #[arg(
        long = "upstream",
        env = "REGMIRROR_UPSTREAM",
        value_name = "NAME=URL",
        value_delimiter = ','
    )]
    pub upstreams: Vec<String>,
    /// Extra PEM CA certificate trusted for all upstreams (repeatable).
    #[arg(
        long = "upstream-ca",
        env = "REGMIRROR_UPSTREAM_CA",
        value_name = "FILE",
        value_delimiter = ','
    )]
    pub upstream_cas: Vec<PathBuf>,
    /// TOML configuration file; flags override its values.
    #[arg(long, env = "REGMIRROR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seconds a tag->digest mapping is trusted before it is revalidated with a HEAD [default: 300].
    #[arg(long, env = "REGMIRROR_TAG_TTL", value_name = "SECONDS")]
    pub tag_ttl: Option<u64>,
    /// Cache size bound, e.g. 50GiB, 500MB, 1048576; 0 means unlimited [default: 0].
    #[arg(long, env = "REGMIRROR_MAX_SIZE", value_name = "BYTES")]
    pub max_size: Option<String>,
    /// Log format.
    #[arg(long, env = "REGMIRROR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Seconds in-flight downloads may run after SIGTERM/SIGINT [default: 30, at most 86400].
    #[arg(long, env = "REGMIRROR_SHUTDOWN_GRACE", value_name = "SECONDS")]
    pub shutdown_grace: Option<u64>,
    /// A token realm host an upstream may use, as NAME=PATTERN (`host[:port]` or `*.suffix`;
    /// repeatable). The upstream's own host is always allowed.
    #[arg(
        long = "realm-host",
        env = "REGMIRROR_REALM_HOST",
        value_name = "NAME=PATTERN",
        value_delimiter = ','
    )]
    pub realm_hosts: Vec<String>,
    /// A host an upstream may redirect to, as NAME=PATTERN (repeatable).
    #[arg(
        long = "redirect-host",
        env = "REGMIRROR_REDIRECT_HOST",
        value_name = "NAME=PATTERN",
        value_delimiter = ','
    )]
    pub redirect_hosts: Vec<String>,
    /// Largest blob the cache downloads; a larger one is aborted [default: 32GiB].
    #[arg(long, env = "REGMIRROR_MAX_BLOB_SIZE", value_name = "BYTES")]
    pub max_blob_size: Option<String>,
    /// Memory all downloads together may hold when the disk cannot take their bytes
    /// (disk full) [default: 256MiB].
    #[arg(long, env = "REGMIRROR_MAX_PASS_THROUGH_MEMORY", value_name = "BYTES")]
    pub max_pass_through_memory: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The TOML file: `regmirror render` writes `envoy/cache.toml` by serializing this type.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_cache_size: Option<SizeValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<SizeValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blob_size: Option<SizeValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pass_through_memory: Option<SizeValue>,
    /// `[[upstream]]`: the registry model's type, which the generator renders.
    #[serde(default)]
    pub upstream: Vec<CacheUpstream>,
}

/// `max_size` may be a string ("50GiB") or a plain number of bytes.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid listen address {0:?} (expected HOST:PORT, e.g. 127.0.0.1:5001)")]
    Listen(String),
    #[error(
        "no storage directory: pass --storage DIR, REGMIRROR_STORAGE or `storage` in the config"
    )]
    NoStorage,
    #[error(transparent)]
    StorageUrl(#[from] crate::store::object::UrlError),
    #[error("local_cache_size is for a bucket store (s3://…); a directory store already serves from its own disk")]
    LocalCacheWithoutBucket,
    #[error("redirect is for a bucket store (s3://…): clients are sent to presigned URLs of its objects")]
    RedirectWithoutBucket,
    #[error("redirect and local_cache_size exclude each other: with redirect clients fetch blobs from the bucket, so this replica's disk would never serve them")]
    RedirectWithLocalCache,
    #[error(
        "redirect_ttl_seconds = {0}: expected 1 to 604800 (S3's longest presigned URL, 7 days)"
    )]
    RedirectTtl(u64),
    #[error("invalid redirect_endpoint {0:?}: expected the URL clients reach the bucket at, e.g. https://s3.example.com")]
    RedirectEndpoint(String),
    #[error("redirect_endpoint / redirect_ttl_seconds are set without redirect = true")]
    RedirectSettingsWithoutRedirect,
    #[error("no upstream configured: pass --upstream NAME=URL or add [[upstream]] to the config")]
    NoUpstream,
    #[error("invalid --upstream {0:?}: expected NAME=URL, e.g. gcr.io=https://gcr.io")]
    UpstreamSyntax(String),
    #[error("upstream {name:?}: invalid name: expected the registry's host[:port] as the filter names it, e.g. gcr.io")]
    UpstreamName { name: String },
    #[error("upstream {name:?} is configured twice")]
    DuplicateUpstream { name: String },
    #[error("upstream {name:?}: invalid URL {url:?}: {reason}")]
    UpstreamUrl {
        name: String,
        url: String,
        reason: String,
    },
    #[error("invalid size {0:?} (expected e.g. 50GiB, 500MB or a number of bytes)")]
    Size(String),
    #[error("reading CA file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("upstream {name:?}: {reason}")]
    Credentials { name: String, reason: String },
    /// Who may read the upstream is unstated or stated with a removed field (the message
    /// says what replaces it).
    #[error("upstream {name:?}: {error}")]
    ClientAuth {
        name: String,
        error: ClientAuthError,
    },
    #[error(
        "invalid host pattern {host:?} for upstream {name:?} (expected host[:port] or *.suffix)"
    )]
    HostPattern { name: String, host: String },
    #[error("invalid --{flag} {spec:?}: expected NAME=PATTERN for a configured upstream NAME")]
    HostFlag { flag: &'static str, spec: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: url::Url,
    /// PEM bundles trusted for this upstream (global --upstream-ca plus ca_file).
    pub ca_pems: Vec<Vec<u8>>,
    pub credentials: Option<Credentials>,
    /// Token realm hosts besides the upstream's own.
    pub realm_hosts: Vec<HostPattern>,
    /// Redirect target hosts besides the upstream's own.
    pub redirect_hosts: Vec<HostPattern>,
    /// Who may read what the cache holds: anyone, or each client authorized upstream.
    pub client_auth: ClientAuth,
    /// `ClientAuth::Upstream`: how long a client's authorization for a repository is reused.
    pub authorization_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub storage: crate::store::Location,
    /// 0 = unlimited.
    pub max_size: u64,
    pub tag_ttl: Duration,
    pub shutdown_grace: Duration,
    /// Downloads larger than this are aborted.
    pub max_blob_size: u64,
    /// Bytes all downloads together may keep in memory when the disk cannot take them.
    pub max_pass_through_memory: u64,
    pub log_format: LogFormat,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
}

/// `redirect` with its endpoint and URL lifetime; the two settings alone are refused (they
/// would silently do nothing).
fn store_redirect(
    args: &ServeArgs,
    redirect: Option<bool>,
    endpoint: Option<String>,
    ttl_seconds: Option<u64>,
) -> Result<Option<crate::store::object::StoreRedirect>, ConfigError> {
    let endpoint = args.redirect_endpoint.clone().or(endpoint);
    let ttl = args.redirect_ttl.or(ttl_seconds);
    if !(args.redirect || redirect == Some(true)) {
        if endpoint.is_some() || ttl.is_some() {
            return Err(ConfigError::RedirectSettingsWithoutRedirect);
        }
        return Ok(None);
    }
    if let Some(e) = endpoint.as_deref().filter(|e| url::Url::parse(e).is_err()) {
        return Err(ConfigError::RedirectEndpoint(e.to_owned()));
    }
    let ttl = ttl.unwrap_or(300);
    if !(1..=604_800).contains(&ttl) {
        return Err(ConfigError::RedirectTtl(ttl));
    }
    Ok(Some(crate::store::object::StoreRedirect {
        endpoint,
        ttl: Duration::from_secs(ttl),
    }))
}

/// Parse `50GiB`, `500MB`, `10k`, `1048576`. Binary (KiB/MiB/GiB/TiB) and decimal (KB/MB/GB/TB)
/// units; a bare `K`/`M`/`G`/`T` is binary.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| ConfigError::Size(s.to_owned()))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(ConfigError::Size(s.to_owned())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError::Size(s.to_owned()))
}

/// An upstream's name as the filter sends it in `x-mirror-registry` (its lowercase
/// authority): a name in any other form would be configured and never asked for.
pub fn upstream_key(name: &str) -> String {
    name.trim().to_ascii_lowercase()
}

/// Host patterns with the declaration's syntax (the filter's parser: one grammar for both).
fn host_patterns(name: &str, raw: &[String]) -> Result<Vec<HostPattern>, ConfigError> {
    raw.iter()
        .map(|h| {
            HostPattern::parse(h).map_err(|_| ConfigError::HostPattern {
                name: name.to_owned(),
                host: h.clone(),
            })
        })
        .collect()
}

/// The config file's text.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

fn read_ca(path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| ConfigError::Ca {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ConfigError::Ca {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(ConfigError::Ca {
            path: path.clone(),
            reason: "no PEM certificate found".to_owned(),
        });
    }
    Ok(pem)
}

fn parse_url(name: &str, raw: &str) -> Result<url::Url, ConfigError> {
    let err = |reason: &str| ConfigError::UpstreamUrl {
        name: name.to_owned(),
        url: raw.to_owned(),
        reason: reason.to_owned(),
    };
    let u = url::Url::parse(raw).map_err(|e| err(&e.to_string()))?;
    if u.scheme() != "https" && u.scheme() != "http" {
        return Err(err("scheme must be https or http"));
    }
    if u.host_str().is_none() {
        return Err(err("no host"));
    }
    if u.path() != "/" && !u.path().is_empty() {
        return Err(err(
            "must not have a path (the registry root, e.g. https://gcr.io)",
        ));
    }
    if u.query().is_some() || !u.username().is_empty() {
        return Err(err("must not carry a query or user info"));
    }
    Ok(u)
}

impl Config {
    /// Merge flags over the file and validate; `env` looks up secrets (passwords, tokens).
    /// Also returns the file's text (`None` without `--config`): its hash names the version.
    pub fn load(
        args: &ServeArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Self, Option<String>), ConfigError> {
        match &args.config {
            Some(path) => {
                let text = read_file(path)?;
                let cfg = Self::from_text(args, path, &text, env)?;
                Ok((cfg, Some(text)))
            }
            None => Ok((Self::merge(args, FileConfig::default(), env)?, None)),
        }
    }

    /// Flags merged over the config file's `text` (read from `path`).
    pub fn from_text(
        args: &ServeArgs,
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let file = toml::from_str::<FileConfig>(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        Self::merge(args, file, env)
    }

    pub fn merge(
        args: &ServeArgs,
        file: FileConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let listen_raw = args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:5001".to_owned());
        let listen: SocketAddr = listen_raw
            .parse()
            .map_err(|_| ConfigError::Listen(listen_raw.clone()))?;
        let storage = args
            .storage
            .clone()
            .or(file.storage)
            .ok_or(ConfigError::NoStorage)?;
        let size = |flag: &Option<String>, file: Option<SizeValue>, default: u64| match (flag, file)
        {
            (Some(s), _) => parse_size(s),
            (None, Some(SizeValue::Bytes(b))) => Ok(b),
            (None, Some(SizeValue::Text(s))) => parse_size(&s),
            (None, None) => Ok(default),
        };
        let redirect = store_redirect(
            args,
            file.redirect,
            file.redirect_endpoint,
            file.redirect_ttl_seconds,
        )?;
        let local_cache_size = size(&args.local_cache_size, file.local_cache_size, 0)?;
        if redirect.is_some() && local_cache_size > 0 {
            return Err(ConfigError::RedirectWithLocalCache);
        }
        let storage = match BucketSettings::parse_url(&storage.to_string_lossy()) {
            None if local_cache_size > 0 => return Err(ConfigError::LocalCacheWithoutBucket),
            None if redirect.is_some() => return Err(ConfigError::RedirectWithoutBucket),
            None => crate::store::Location::Dir(storage),
            Some(url) => {
                let (bucket, prefix) = url?;
                crate::store::Location::Bucket(BucketSettings {
                    bucket,
                    prefix,
                    endpoint: args.s3_endpoint.clone().or(file.s3_endpoint),
                    region: args.s3_region.clone().or(file.s3_region),
                    spool_dir: args
                        .spool_dir
                        .clone()
                        .or(file.spool_dir)
                        .unwrap_or_else(|| std::env::temp_dir().join("regmirror-spool")),
                    local_cache_size,
                    redirect,
                })
            }
        };
        let max_size = size(&args.max_size, file.max_size, 0)?;
        let max_blob_size = size(
            &args.max_blob_size,
            file.max_blob_size,
            DEFAULT_MAX_BLOB_SIZE,
        )?;
        let max_pass_through_memory = size(
            &args.max_pass_through_memory,
            file.max_pass_through_memory,
            DEFAULT_MAX_PASS_THROUGH_MEMORY,
        )?;
        let tag_ttl = Duration::from_secs(args.tag_ttl.or(file.tag_ttl_seconds).unwrap_or(300));
        let shutdown_grace = Duration::from_secs(
            args.shutdown_grace
                .or(file.shutdown_grace_seconds)
                .unwrap_or(30),
        )
        .min(MAX_SHUTDOWN_GRACE);
        let mut global_cas = Vec::new();
        for p in &args.upstream_cas {
            global_cas.push(read_ca(p)?);
        }

        let mut upstreams = BTreeMap::new();
        let mut add = |mut u: UpstreamConfig| -> Result<(), ConfigError> {
            let name = upstream_key(&u.name);
            if !is_valid_authority(&name) {
                return Err(ConfigError::UpstreamName { name: u.name });
            }
            u.name = name;
            if upstreams.contains_key(&u.name) {
                return Err(ConfigError::DuplicateUpstream { name: u.name });
            }
            upstreams.insert(u.name.clone(), u);
            Ok(())
        };
        // Flag upstreams replace file upstreams of the same name.
        let mut flag_names = Vec::new();
        for spec in &args.upstreams {
            let (name, url) = spec
                .split_once('=')
                .ok_or_else(|| ConfigError::UpstreamSyntax(spec.clone()))?;
            let name = name.trim();
            flag_names.push(upstream_key(name));
            add(UpstreamConfig {
                name: name.to_owned(),
                url: parse_url(name, url.trim())?,
                ca_pems: global_cas.clone(),
                credentials: None,
                realm_hosts: Vec::new(),
                redirect_hosts: Vec::new(),
                client_auth: ClientAuth::Anonymous,
                authorization_ttl: Duration::from_secs(
                    registry_rules::declaration::DEFAULT_AUTHORIZATION_TTL_SECONDS,
                ),
            })?;
        }
        for fu in file.upstream {
            if flag_names.contains(&upstream_key(&fu.name)) {
                continue;
            }
            // First: a removed field's message says what replaces it.
            fu.check_client_auth()
                .map_err(|error| ConfigError::ClientAuth {
                    name: fu.name.clone(),
                    error,
                })?;
            let url = parse_url(&fu.name, &fu.url)?;
            let mut ca_pems = global_cas.clone();
            if let Some(p) = &fu.ca_file {
                ca_pems.push(read_ca(p)?);
            }
            let cred_err = |reason: String| ConfigError::Credentials {
                name: fu.name.clone(),
                reason,
            };
            let password = match (&fu.password_env, &fu.password_file) {
                (Some(_), Some(_)) => {
                    return Err(cred_err(
                        "set password_env or password_file, not both".into(),
                    ))
                }
                (Some(var), None) => {
                    Some(env(var).ok_or_else(|| {
                        cred_err(format!("environment variable {var} is not set"))
                    })?)
                }
                (None, Some(path)) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| cred_err(format!("password_file {}: {e}", path.display())))?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                (None, None) => None,
            };
            let credentials = match (&fu.username, password) {
                (Some(u), Some(p)) => Some(Credentials {
                    username: u.clone(),
                    password: p,
                }),
                (None, None) => None,
                _ => {
                    return Err(cred_err(
                        "username and password (password_env/password_file) go together".into(),
                    ))
                }
            };
            add(UpstreamConfig {
                name: fu.name.clone(),
                url,
                ca_pems,
                credentials,
                realm_hosts: host_patterns(&fu.name, &fu.realm_hosts)?,
                redirect_hosts: host_patterns(&fu.name, &fu.redirect_hosts)?,
                client_auth: fu.client_auth(),
                authorization_ttl: fu.authorization_ttl(),
            })?;
        }
        for (flag, specs) in [
            ("realm-host", &args.realm_hosts),
            ("redirect-host", &args.redirect_hosts),
        ] {
            for spec in specs {
                let bad = || ConfigError::HostFlag {
                    flag,
                    spec: spec.clone(),
                };
                let (name, pattern) = spec.split_once('=').ok_or_else(bad)?;
                let u = upstreams.get_mut(&upstream_key(name)).ok_or_else(bad)?;
                let p = host_patterns(&u.name, &[pattern.to_owned()])?;
                if flag == "realm-host" {
                    u.realm_hosts.extend(p);
                } else {
                    u.redirect_hosts.extend(p);
                }
            }
        }
        if upstreams.is_empty() {
            return Err(ConfigError::NoUpstream);
        }
        Ok(Config {
            listen,
            storage,
            max_size,
            tag_ttl,
            shutdown_grace,
            max_blob_size,
            max_pass_through_memory,
            log_format: args.log_format,
            upstreams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50GiB").unwrap(), 50 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn quick_start() {
        let args = ServeArgs {
            storage: Some("/tmp/x".into()),
            upstreams: vec!["gcr.io=https://gcr.io".into()],
            ..Default::default()
        };
        let c = Config::merge(&args, FileConfig::default(), &no_env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5001");
        assert_eq!(c.tag_ttl, Duration::from_secs(300));
        assert_eq!(c.max_size, 0);
        assert!(c.upstreams.contains_key("gcr.io"));
    }

    #[test]
    fn an_upstream_is_named_as_the_filter_names_it() {
        let merge = |upstreams: &[&str]| {
            let args = ServeArgs {
                storage: Some("/tmp/x".into()),
                upstreams: upstreams.iter().map(|u| u.to_string()).collect(),
                ..Default::default()
            };
            Config::merge(&args, FileConfig::default(), &no_env)
        };
        let c = merge(&["Quay.IO=https://quay.io"]).unwrap();
        assert!(
            c.upstreams.contains_key("quay.io"),
            "{:?}",
            c.upstreams.keys()
        );
        for bad in [
            "quay_io=https://quay.io",
            "-quay.io=https://quay.io",
            "quay.io:0=https://quay.io",
        ] {
            let e = merge(&[bad]).unwrap_err();
            assert!(matches!(e, ConfigError::UpstreamName { .. }), "{bad}: {e}");
        }
        let e = merge(&["gcr.io=https://gcr.io", "GCR.io=https://gcr.io"]).unwrap_err();
        assert!(matches!(e, ConfigError::DuplicateUpstream { .. }), "{e}");
        // A flag replaces the file's upstream of that name, and host flags find it, however
        // either spells it.
        let file: FileConfig =
            toml::from_str("[[upstream]]\nname = \"quay.io\"\nurl = \"https://quay.io\"").unwrap();
        let args = ServeArgs {
            storage: Some("/tmp/x".into()),
            upstreams: vec!["Quay.io=https://mirror.quay.example".into()],
            realm_hosts: vec!["QUAY.IO=auth.quay.example".into()],
            ..Default::default()
        };
        let c = Config::merge(&args, file, &no_env).unwrap();
        let quay = &c.upstreams["quay.io"];
        assert_eq!(quay.url.as_str(), "https://mirror.quay.example/");
        assert_eq!(quay.realm_hosts.len(), 1, "{:?}", quay.realm_hosts);
    }

    #[test]
    fn a_local_tier_is_for_a_bucket_store() {
        let up = vec!["gcr.io=https://gcr.io".to_owned()];
        let args = ServeArgs {
            storage: Some("s3://cache-bucket/regmirror".into()),
            local_cache_size: Some("20GiB".into()),
            upstreams: up.clone(),
            ..Default::default()
        };
        let c = Config::merge(&args, FileConfig::default(), &no_env).unwrap();
        let crate::store::Location::Bucket(b) = &c.storage else {
            panic!("{:?}", c.storage)
        };
        assert_eq!(b.local_cache_size, 20 << 30);
        let file: FileConfig =
            toml::from_str("storage = \"s3://cache-bucket\"\nlocal_cache_size = 1048576").unwrap();
        let args = ServeArgs {
            upstreams: up.clone(),
            ..Default::default()
        };
        let c = Config::merge(&args, file, &no_env).unwrap();
        assert!(
            matches!(&c.storage, crate::store::Location::Bucket(b) if b.local_cache_size == 1 << 20)
        );
        let args = ServeArgs {
            storage: Some("/var/lib/regmirror".into()),
            local_cache_size: Some("1GiB".into()),
            upstreams: up,
            ..Default::default()
        };
        let e = Config::merge(&args, FileConfig::default(), &no_env).unwrap_err();
        assert!(matches!(e, ConfigError::LocalCacheWithoutBucket), "{e}");
    }

    #[test]
    fn redirect_is_for_a_bucket_store_without_a_local_tier() {
        let merge = |text: &str| {
            let file: FileConfig = toml::from_str(text).unwrap();
            let args = ServeArgs {
                upstreams: vec!["gcr.io=https://gcr.io".to_owned()],
                ..Default::default()
            };
            Config::merge(&args, file, &no_env)
        };
        let c = merge("storage = \"s3://cache-bucket\"\nredirect = true").unwrap();
        let crate::store::Location::Bucket(b) = &c.storage else {
            panic!("{:?}", c.storage)
        };
        let want = crate::store::object::StoreRedirect {
            endpoint: None,
            ttl: Duration::from_secs(300),
        };
        assert_eq!(b.redirect, Some(want));
        let c = merge(
            "storage = \"s3://cache-bucket\"\nredirect = true\nredirect_endpoint = \"https://s3.example.com\"\nredirect_ttl_seconds = 60",
        )
        .unwrap();
        assert!(matches!(&c.storage, crate::store::Location::Bucket(b)
            if b.redirect.as_ref().is_some_and(|r| r.ttl == Duration::from_secs(60)
                && r.endpoint.as_deref() == Some("https://s3.example.com"))));
        let refused = [
            (
                "storage = \"/var/lib/regmirror\"\nredirect = true",
                "bucket store",
            ),
            (
                "storage = \"s3://cache-bucket\"\nredirect = true\nlocal_cache_size = \"1GiB\"",
                "exclude each other",
            ),
            (
                "storage = \"s3://cache-bucket\"\nredirect = true\nredirect_ttl_seconds = 0",
                "1 to 604800",
            ),
            (
                "storage = \"s3://cache-bucket\"\nredirect = true\nredirect_endpoint = \"s3 host\"",
                "invalid redirect_endpoint",
            ),
            (
                "storage = \"s3://cache-bucket\"\nredirect_ttl_seconds = 60",
                "without redirect = true",
            ),
        ];
        for (text, says) in refused {
            let e = merge(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn file_and_validation() {
        let text = r#"
listen = "127.0.0.1:6000"
storage = "/var/lib/regmirror"
max_size = "1GiB"
tag_ttl_seconds = 10
[[upstream]]
name = "gcr.io"
url = "https://gcr.io"
username = "u"
password_env = "PW"
realm_hosts = ["auth.example.com", "*.pkg.dev"]
redirect_hosts = ["storage.googleapis.com", "*.r2.cloudflarestorage.com"]
client_auth = "anonymous"
"#;
        let file: FileConfig = toml::from_str(text).unwrap();
        let env = |k: &str| (k == "PW").then(|| "secret".to_owned());
        let c = Config::merge(&ServeArgs::default(), file, &env).unwrap();
        assert_eq!(c.max_size, 1 << 30);
        let u = &c.upstreams["gcr.io"];
        assert_eq!(u.credentials.as_ref().unwrap().password, "secret");
        assert_eq!(
            u.realm_hosts,
            vec![
                HostPattern::Exact("auth.example.com".into()),
                HostPattern::Wildcard("pkg.dev".into())
            ]
        );
        assert!(u
            .redirect_hosts
            .iter()
            .any(|p| p.matches("x.r2.cloudflarestorage.com")));
        assert_eq!(c.max_blob_size, DEFAULT_MAX_BLOB_SIZE);

        // Credentials without client_auth: refused, naming both choices.
        let text = r#"
storage = "/x"
[[upstream]]
name = "gcr.io"
url = "https://gcr.io"
username = "u"
password_env = "PW"
"#;
        let refusal = |text: &str| {
            let file: FileConfig = toml::from_str(text).unwrap();
            match Config::merge(&ServeArgs::default(), file, &env) {
                Err(e @ ConfigError::ClientAuth { .. }) => e.to_string(),
                other => panic!("{text}: {other:?}"),
            }
        };
        let e = refusal(text);
        assert!(
            e.contains(r#"client_auth = "anonymous""#) && e.contains(r#"client_auth = "upstream""#),
            "{e}"
        );
        let upstream = Config::merge(
            &ServeArgs::default(),
            toml::from_str(&format!(
                "{text}client_auth = \"upstream\"\nauthorization_ttl_seconds = 30\n"
            ))
            .unwrap(),
            &env,
        )
        .unwrap();
        let u = &upstream.upstreams["gcr.io"];
        assert_eq!(u.client_auth, ClientAuth::Upstream);
        assert_eq!(u.authorization_ttl, Duration::from_secs(30));
        // The removed static-token fields: refused with what replaces them, at start and on
        // reload (the same parser).
        for (field, says) in [
            ("public = true", "`public` was removed"),
            ("client_token_env = \"T\"", "`client_token_env`"),
        ] {
            let anonymous = "storage = \"/x\"\n[[upstream]]\nname = \"g\"\nurl = \"https://g\"\n";
            for text in [format!("{anonymous}{field}\n"), format!("{text}{field}\n")] {
                let e = refusal(&text);
                assert!(e.contains(says) && e.contains("client_auth"), "{e}");
            }
        }

        for bad in ["gcr.io", "x=ftp://a", "x=https://a/path", "../x=https://a"] {
            let args = ServeArgs {
                storage: Some("/x".into()),
                upstreams: vec![bad.into()],
                ..Default::default()
            };
            assert!(
                Config::merge(&args, FileConfig::default(), &no_env).is_err(),
                "{bad}"
            );
        }
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());

        for bad in ["a/b", "*", "user@host", "*.", "http://x"] {
            let text = format!(
                "storage = \"/x\"\n[[upstream]]\nname = \"g\"\nurl = \"https://g\"\nredirect_hosts = [{bad:?}]\n"
            );
            let file: FileConfig = toml::from_str(&text).unwrap();
            assert!(
                matches!(
                    Config::merge(&ServeArgs::default(), file, &no_env),
                    Err(ConfigError::HostPattern { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn host_flags_and_bounds() {
        let args = ServeArgs {
            storage: Some("/x".into()),
            upstreams: vec!["faulty=http://127.0.0.1:5000".into()],
            realm_hosts: vec!["faulty=127.0.0.1:5443".into()],
            redirect_hosts: vec!["faulty=*.cdn.example".into()],
            shutdown_grace: Some(u64::MAX),
            max_blob_size: Some("1GiB".into()),
            ..Default::default()
        };
        let c = Config::merge(&args, FileConfig::default(), &no_env).unwrap();
        let u = &c.upstreams["faulty"];
        assert_eq!(
            u.realm_hosts,
            vec![HostPattern::Exact("127.0.0.1:5443".into())]
        );
        assert!(u.redirect_hosts.iter().any(|p| p.matches("a.cdn.example")));
        assert_eq!(
            c.shutdown_grace, MAX_SHUTDOWN_GRACE,
            "capped, never overflows"
        );
        assert_eq!(c.max_blob_size, 1 << 30);
        assert_eq!(c.max_pass_through_memory, DEFAULT_MAX_PASS_THROUGH_MEMORY);
        for bad in ["127.0.0.1:5443", "other=127.0.0.1", "faulty=a/b"] {
            let args = ServeArgs {
                realm_hosts: vec![bad.into()],
                ..args.clone()
            };
            assert!(
                Config::merge(&args, FileConfig::default(), &no_env).is_err(),
                "{bad}"
            );
        }
    }

    mod proptest_sizes {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testserver::proptest_config())]

            #[test]
            fn proptest_parse_size_never_panics(s in "\\PC{0,30}") {
                let _ = parse_size(&s);
            }

            #[test]
            fn proptest_parse_size_round_trip(
                n in any::<u64>(),
                (unit, mult) in prop_oneof![
                    Just(("", 1u64)), Just(("B", 1)), Just(("k", 1 << 10)), Just(("KiB", 1 << 10)),
                    Just(("MiB", 1 << 20)), Just(("GiB", 1 << 30)), Just(("T", 1 << 40)),
                    Just(("kb", 1_000)), Just(("MB", 1_000_000)), Just(("GB", 1_000_000_000)),
                ],
            ) {
                let got = parse_size(&format!("{n}{unit}")).ok();
                prop_assert_eq!(got, n.checked_mul(mult));
            }
        }
    }
}
