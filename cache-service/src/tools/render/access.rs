//! `[access]`: who may use the mirror, enforced by Envoy's own filters in front of the wasm
//! filter (network allowlist → 403, per-client rate limit → 429, Basic credentials → 401),
//! and by the TLS handshake (client certificates) where Envoy terminates TLS.

use serde::Deserialize;
use std::fmt::Write;
use std::net::IpAddr;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Client networks allowed to use the mirror; empty: every network.
    #[serde(default)]
    pub allow_networks: Vec<Network>,
    /// Per client address.
    pub rate_limit: Option<RateLimit>,
    pub basic_auth: Option<BasicAuth>,
    /// CA file (on the Envoy host) whose client certificates may connect: mutual TLS on
    /// the standalone mirror's listener. Needs no header, so it works with every runtime
    /// and every registry.
    pub client_ca: Option<String>,
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a single address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Network {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl TryFrom<String> for Network {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let invalid = || format!("allow_networks: {value:?} is not an address or a CIDR network");
        let (address, prefix_len) = match value.split_once('/') {
            Some((address, len)) => (address, Some(len.parse::<u8>().map_err(|_| invalid())?)),
            None => (value.as_str(), None),
        };
        let address: IpAddr = address.parse().map_err(|_| invalid())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = prefix_len.unwrap_or(max);
        if prefix_len > max {
            return Err(invalid());
        }
        Ok(Self {
            address,
            prefix_len,
        })
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "RawRateLimit")]
pub struct RateLimit {
    /// Sustained requests per second per client address.
    pub requests_per_second: u32,
    /// Requests a client may send at once before the sustained rate applies.
    pub burst: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests_per_second: u32,
    burst: u32,
}

impl TryFrom<RawRateLimit> for RateLimit {
    type Error = String;

    fn try_from(raw: RawRateLimit) -> Result<Self, Self::Error> {
        if raw.requests_per_second == 0 || raw.burst < raw.requests_per_second {
            return Err(format!(
                "rate_limit: requests_per_second must be > 0 and burst >= requests_per_second (got {} and {})",
                raw.requests_per_second, raw.burst
            ));
        }
        Ok(Self {
            requests_per_second: raw.requests_per_second,
            burst: raw.burst,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// htpasswd file on the Envoy host, `{SHA}` hashes (`htpasswd -s`): Envoy supports no other.
    pub htpasswd: String,
    /// The request header carrying `Basic <credentials>`.
    #[serde(default)]
    pub header: AuthHeader,
}

/// A lowercase HTTP header name. `authorization` is what `docker login`, podman and k3s
/// send; any other name keeps `Authorization` free for the registries' own tokens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AuthHeader(String);

impl Default for AuthHeader {
    fn default() -> Self {
        Self(AUTHORIZATION.to_owned())
    }
}

const AUTHORIZATION: &str = "authorization";

impl TryFrom<String> for AuthHeader {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let valid = !value.is_empty()
            && value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !value.starts_with("x-envoy-")
            && !super::envoy::INTERNAL_HEADERS.contains(&value.as_str())
            && value != "host";
        if valid {
            Ok(Self(value))
        } else {
            Err(format!(
                "basic_auth.header {value:?}: must be a lowercase header name that is neither \
                 Envoy's nor one the mirror uses itself"
            ))
        }
    }
}

impl AuthHeader {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_authorization(&self) -> bool {
        self.0 == AUTHORIZATION
    }
}

impl Access {
    /// `token_clients`: registries whose clients present the registry's own tokens (served
    /// straight from upstream, or cached with `client_auth = "upstream"`). `self_redirected`:
    /// registries whose clients follow the upstream's redirects themselves (`redirects =
    /// "passthrough"`).
    pub fn validate(&self, token_clients: &[&str], self_redirected: &[&str]) -> Result<(), String> {
        if let (Some(auth), Some(first)) = (&self.basic_auth, self_redirected.first()) {
            if !auth.header.is_authorization() {
                // Go's HTTP client (containerd) drops Authorization on a redirect to another
                // host but keeps every other header it was given.
                return Err(format!(
                    "access.basic_auth.header {:?} with redirects = \"passthrough\" on {first:?}: \
                     its clients follow the upstream's redirects themselves and would send the \
                     mirror login to the CDN. Leave redirects at \"sign\" (signed mirror URLs)",
                    auth.header.as_str()
                ));
            }
        }
        if let (Some(auth), Some(first)) = (&self.basic_auth, token_clients.first()) {
            if auth.header.is_authorization() {
                return Err(format!(
                    "access.basic_auth in the Authorization header needs every registry to be \
                     `cache = true` with anonymous clients ({first:?} is not): its clients \
                     present the registry's own Bearer tokens, which travel in that same header. Set \
                     basic_auth.header = \"x-mirror-authorization\" (containerd sends it from \
                     hosts.toml) or cache every registry"
                ));
            }
        }
        if self
            .basic_auth
            .as_ref()
            .is_some_and(|a| !a.htpasswd.starts_with('/'))
        {
            return Err("access.basic_auth.htpasswd must be an absolute path".to_owned());
        }
        if self
            .client_ca
            .as_ref()
            .is_some_and(|ca| !ca.starts_with('/'))
        {
            return Err("access.client_ca must be an absolute path".to_owned());
        }
        Ok(())
    }

    /// The header carrying the mirror credential, which must reach no upstream.
    pub fn credential_header(&self) -> Option<&str> {
        self.basic_auth.as_ref().map(|a| a.header.as_str())
    }

    /// Envoy HTTP filters, in order, rendered before the wasm filter: an address outside the
    /// allowlist learns nothing else, and the rate limit counts failed logins too.
    pub fn render_filters(&self, w: &mut String) {
        let i = "          ";
        if !self.allow_networks.is_empty() {
            let _ = writeln!(
                w,
                "{i}# [access] allow_networks: other client addresses get 403.\n\
                 {i}- name: envoy.filters.http.rbac\n\
                 {i}  typed_config:\n\
                 {i}    \"@type\": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n\
                 {i}    rules:\n\
                 {i}      action: ALLOW\n\
                 {i}      policies:\n\
                 {i}        allowed_networks:\n\
                 {i}          permissions: [{{ any: true }}]\n\
                 {i}          # remote_ip: the client address after the trusted x-forwarded-for hops.\n\
                 {i}          principals:"
            );
            for n in &self.allow_networks {
                let _ = writeln!(
                    w,
                    "{i}          - remote_ip: {{ address_prefix: \"{}\", prefix_len: {} }}",
                    n.address, n.prefix_len
                );
            }
        }
        if let Some(limit) = &self.rate_limit {
            let _ = writeln!(
                w,
                "{i}# [access] rate_limit: one token bucket per client address; over it, 429.\n\
                 {i}- name: envoy.filters.http.local_ratelimit\n\
                 {i}  typed_config:\n\
                 {i}    \"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n\
                 {i}    stat_prefix: mirror_client_rate_limit\n\
                 {i}    # Requests without a client address are not limited by the per-client buckets.\n\
                 {i}    token_bucket: {{ max_tokens: 4294967295, tokens_per_fill: 4294967295, fill_interval: 1s }}\n\
                 {i}    filter_enabled: {{ default_value: {{ numerator: 100, denominator: HUNDRED }} }}\n\
                 {i}    filter_enforced: {{ default_value: {{ numerator: 100, denominator: HUNDRED }} }}\n\
                 {i}    # Bounds the number of client buckets (least recently used ones are dropped).\n\
                 {i}    max_dynamic_descriptors: 100000\n\
                 {i}    rate_limits:\n\
                 {i}    - actions: [{{ remote_address: {{}} }}]\n\
                 {i}    descriptors:\n\
                 {i}    # No value: a bucket per distinct client address.\n\
                 {i}    - entries: [{{ key: remote_address }}]\n\
                 {i}      token_bucket: {{ max_tokens: {}, tokens_per_fill: {}, fill_interval: 1s }}",
                limit.burst, limit.requests_per_second
            );
        }
        if let Some(auth) = &self.basic_auth {
            let _ = writeln!(
                w,
                "{i}# [access] basic_auth: no or wrong credentials get 401 with\n\
                 {i}# `WWW-Authenticate: Basic`, so clients send their login.\n\
                 {i}- name: envoy.filters.http.basic_auth\n\
                 {i}  typed_config:\n\
                 {i}    \"@type\": type.googleapis.com/envoy.extensions.filters.http.basic_auth.v3.BasicAuth\n\
                 {i}    users: {{ filename: {} }}\n\
                 {i}    authentication_header: {}",
                quoted(&auth.htpasswd),
                auth.header.as_str()
            );
        }
    }
}

fn quoted(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_reject_garbage() {
        let n = Network::try_from("10.0.0.0/8".to_owned()).unwrap();
        assert_eq!(
            (n.address.to_string(), n.prefix_len),
            ("10.0.0.0".into(), 8)
        );
        let one = Network::try_from("2001:db8::1".to_owned()).unwrap();
        assert_eq!(one.prefix_len, 128);
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "",
            "10.0.0.0/",
            "::/129",
            "host.example",
        ] {
            assert!(Network::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn headers_the_mirror_uses_cannot_carry_the_credential() {
        for bad in [
            "x-mirror-registry",
            "x-envoy-foo",
            "Host",
            "host",
            "a b",
            "",
        ] {
            assert!(AuthHeader::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
        assert!(AuthHeader::try_from("x-mirror-authorization".to_owned()).is_ok());
    }

    fn access(toml_text: &str) -> Result<Access, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn rate_limit_needs_a_positive_rate_and_a_burst_at_least_that() {
        assert!(access("rate_limit = { requests_per_second = 0, burst = 5 }").is_err());
        assert!(access("rate_limit = { requests_per_second = 10, burst = 5 }").is_err());
        assert!(access("rate_limit = { requests_per_second = 5, burst = 5 }").is_ok());
    }

    #[test]
    fn basic_auth_in_authorization_refuses_pass_through_registries() {
        let a = access("basic_auth = { htpasswd = \"/etc/regmirror/htpasswd\" }").unwrap();
        let e = a.validate(&["docker.io"], &[]).unwrap_err();
        assert!(e.contains("\"docker.io\""), "{e}");
        assert!(a.validate(&[], &[]).is_ok());
        let a = access(
            "basic_auth = { htpasswd = \"/etc/regmirror/htpasswd\", header = \"x-mirror-authorization\" }",
        )
        .unwrap();
        assert!(a.validate(&["docker.io"], &[]).is_ok());
        let relative =
            access("basic_auth = { htpasswd = \"htpasswd\", header = \"x-a\" }").unwrap();
        assert!(relative.validate(&[], &[]).is_err());
    }

    #[test]
    fn a_login_in_its_own_header_refuses_registries_whose_clients_follow_redirects() {
        let custom = access(
            "basic_auth = { htpasswd = \"/etc/regmirror/htpasswd\", header = \"x-mirror-authorization\" }",
        )
        .unwrap();
        let e = custom.validate(&[], &["docker.io"]).unwrap_err();
        assert!(
            e.contains("\"docker.io\"") && e.contains("passthrough"),
            "{e}"
        );
        // In Authorization it is dropped on a cross-host redirect (and refused with token
        // clients for its own reason).
        let standard = access("basic_auth = { htpasswd = \"/etc/regmirror/htpasswd\" }").unwrap();
        assert!(standard.validate(&[], &["docker.io"]).is_ok());
    }
}
