//! Envoy bootstrap YAML rendered from the declaration.
//!
//! Written as text rather than through a YAML serializer so the shipped files read like
//! hand-written Envoy configs, with comments a user can follow.

use super::declaration::Declaration;
use crate::http::server::ClientTimeouts;
use registry_rules::declaration::CacheService;
use registry_rules::hosts::HostPattern;
use registry_rules::oci_error::{self, ErrorCode};
use registry_rules::route::{AUTH_PREFIX, CACHE_KEY_HEADER};
use std::fmt::Write;
use std::time::Duration;

/// Which listener layout to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `just up`: plain HTTP on 127.0.0.1:5000.
    Local,
    /// A standalone mirror: TLS on :443 with certificate files, :80 redirects to HTTPS.
    Standalone,
    /// Behind a TLS-terminating proxy (Caddy with ACME certificates): plain HTTP on :8080,
    /// trusting the proxy's x-forwarded-proto.
    BehindTlsProxy,
}

impl Variant {
    /// `just up` runs from the repository root against the fresh build; a standalone
    /// mirror installs the module next to its certificates.
    pub(super) fn wasm_path(self) -> &'static str {
        match self {
            Self::Local => "target/wasm32-wasip1/wasm/mirror_filter.wasm",
            Self::Standalone | Self::BehindTlsProxy => "/etc/regmirror/mirror_filter.wasm",
        }
    }
}

/// Cluster for the upstreams matched by wildcard patterns (resolved per request by the
/// dynamic forward proxy; the filter has checked the host against the allowlist).
const DYNAMIC_CLUSTER: &str = "dynamic_redirect_targets";
const CACHE_CLUSTER: &str = "cache_service";

/// How long Envoy (and the Istio gateway) keep an idle connection to the cache: half of what
/// the cache waits for a request head on one (`ClientTimeouts::request_head`).
pub(super) const CACHE_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const _: () =
    assert!(CACHE_IDLE_TIMEOUT.as_secs() * 2 <= ClientTimeouts::DEFAULT.request_head.as_secs());
pub const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const TLS_CERT: &str = "/etc/regmirror/tls/tls.crt";
pub const TLS_KEY: &str = "/etc/regmirror/tls/tls.key";

/// Request headers that say something about the mirror or its clients: removed on every
/// route that leaves the mirror (registries, realms, CDNs). Only cache-service, which needs
/// `x-mirror-registry`, gets them. Envoy's own `x-envoy-*` headers are suppressed at the
/// router; `x-envoy-internal` and `x-envoy-external-address` are set by the connection
/// manager before it and removed here.
pub const INTERNAL_HEADERS: &[&str] = &[
    "x-mirror-registry",
    CACHE_KEY_HEADER,
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-request-id",
    "x-envoy-external-address",
    "x-envoy-internal",
    "x-envoy-original-path",
    "x-envoy-decorator-operation",
];

fn quoted(value: &str) -> String {
    // JSON string syntax is valid YAML double-quoted scalar syntax.
    serde_json::Value::String(value.to_owned()).to_string()
}

pub fn render(declaration: &Declaration, filter_json: &str, variant: Variant) -> String {
    let hosts = declaration.upstream_hosts();
    let has_wildcards = hosts.iter().any(|h| matches!(h, HostPattern::Wildcard(_)));
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# Rendered by `regmirror render` from envoy/registries.toml: edit that file, not this one.\n\
         # {}\n\
         admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: 9901 }}\n\
         overload_manager:\n  resource_monitors:\n  - name: envoy.resource_monitors.global_downstream_max_connections\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig\n      max_active_downstream_connections: 50000\n\
         static_resources:\n  listeners:",
        match variant {
            Variant::Local => "Local mirror (`just up`): plain HTTP on 127.0.0.1:5000.",
            Variant::Standalone =>
                "Standalone mirror: HTTPS on :443 (certificate files below), HTTP on :80 redirects to HTTPS.",
            Variant::BehindTlsProxy =>
                "Mirror behind a TLS-terminating proxy (compose profile `acme`): HTTP on :8080.",
        }
    );
    let client_ca = declaration
        .access
        .as_ref()
        .is_some_and(|a| a.client_ca.is_some());
    if client_ca && variant != Variant::Standalone {
        // Said where an operator reads it: this listener does not check client certificates.
        let _ = writeln!(
            w,
            "  # [access] client_ca is NOT enforced here: {}",
            match variant {
                Variant::BehindTlsProxy =>
                    "TLS ends at the proxy in front, which must require the client certificates.",
                _ => "this listener speaks plain HTTP.",
            }
        );
    }
    match variant {
        Variant::Local => listener(w, "mirror_http", "127.0.0.1", 5000, 0),
        Variant::Standalone => listener(w, "mirror_https", "0.0.0.0", 443, 0),
        Variant::BehindTlsProxy => listener(w, "mirror_http", "0.0.0.0", 8080, 1),
    }
    let _ = writeln!(w, "          http_filters:");
    if let Some(access) = &declaration.access {
        access.render_filters(w);
    }
    wasm_filter(w, filter_json, variant.wasm_path());
    if has_wildcards {
        let _ = writeln!(
            w,
            "          - name: envoy.filters.http.dynamic_forward_proxy\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig\n{}",
            dns_cache_config("              ")
        );
    }
    let _ = writeln!(
        w,
        "          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n              # No x-envoy-expected-rq-timeout-ms & co. towards registries, realms and CDNs.\n              suppress_envoy_headers: true"
    );
    route_config(w, declaration, &hosts, variant);
    if variant == Variant::Standalone {
        let client_ca = declaration
            .access
            .as_ref()
            .and_then(|a| a.client_ca.as_deref());
        downstream_tls(w, client_ca);
        https_redirect_listener(w);
    }
    let _ = writeln!(w, "  clusters:");
    let cas = declaration.upstream_cas();
    for pattern in &hosts {
        if let Some((host, port)) = pattern.host_port(443) {
            let ca = cas.get(pattern).map(|ca| ca.to_string_lossy());
            tls_cluster(w, &pattern.to_string(), host, port, ca.as_deref());
        }
    }
    if has_wildcards {
        dynamic_cluster(w);
    }
    cache_cluster(w, &declaration.mirror.cache_service);
    out
}

/// What one client may make a client-facing connection manager hold, in each of them.
const CLIENT_BOUNDS: &str = "          # A request head must be complete 10 s after its first byte: a client trickling\n          # headers holds no connection for long.\n          request_headers_timeout: 10s\n          # Clients of a pull-only mirror send requests, not bodies: small upload windows and\n          # at most 100 streams a connection bound what one client can make Envoy hold. A\n          # download is paced by the client's window, not these.\n          http2_protocol_options: { max_concurrent_streams: 100, initial_stream_window_size: 65536, initial_connection_window_size: 1048576 }\n";

/// `trusted_hops`: proxies in front whose x-forwarded-* headers Envoy keeps.
fn listener(w: &mut String, name: &str, address: &str, port: u16, trusted_hops: u32) {
    let _ = writeln!(
        w,
        "  - name: {name}\n    address:\n      socket_address: {{ address: {address}, port_value: {port} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: {name}\n          codec_type: AUTO\n          # Sets x-forwarded-proto from the connection, which the filter uses for mirror URLs.\n          use_remote_address: true\n          xff_num_trusted_hops: {trusted_hops}\n          # A multi-gigabyte layer over a slow link may take hours: only idle streams are cut.\n          stream_idle_timeout: 300s\n          request_timeout: 0s\n{CLIENT_BOUNDS}          access_log:\n          - name: envoy.access_loggers.stdout\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
    );
}

fn downstream_tls(w: &mut String, client_ca: Option<&str>) {
    let _ = writeln!(
        w,
        "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          common_tls_context:\n            alpn_protocols: [h2, http/1.1]\n            tls_certificates:\n            - certificate_chain: {{ filename: {TLS_CERT} }}\n              private_key: {{ filename: {TLS_KEY} }}"
    );
    if let Some(ca) = client_ca {
        let _ = writeln!(
            w,
            "            # [access] client_ca: only clients with a certificate from this CA connect.\n            validation_context:\n              trusted_ca: {{ filename: {} }}\n          require_client_certificate: true",
            quoted(ca)
        );
    }
}

fn https_redirect_listener(w: &mut String) {
    let _ = writeln!(
        w,
        "  - name: mirror_http_redirect\n    address:\n      socket_address: {{ address: 0.0.0.0, port_value: 80 }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: mirror_http_redirect\n{CLIENT_BOUNDS}          http_filters:\n          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n          route_config:\n            virtual_hosts:\n            - name: https_redirect\n              domains: [\"*\"]\n              routes:\n              - match: {{ prefix: \"/\" }}\n                redirect: {{ https_redirect: true }}"
    );
}

fn wasm_filter(w: &mut String, filter_json: &str, wasm_path: &str) {
    let _ = writeln!(
        w,
        "          - name: envoy.filters.http.wasm\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n              config:\n                name: mirror\n                root_id: mirror\n                # Fail closed: if the VM is gone, nothing is forwarded unchecked.\n                fail_open: false\n                vm_config:\n                  vm_id: mirror\n                  runtime: envoy.wasm.runtime.v8\n                  code:\n                    local:\n                      filename: {}\n                configuration:\n                  \"@type\": type.googleapis.com/google.protobuf.StringValue\n                  # Same content as envoy/filter.json.\n                  value: {}",
        quoted(wasm_path),
        quoted(filter_json)
    );
}

fn dns_cache_config(indent: &str) -> String {
    format!(
        "{indent}dns_cache_config:\n{indent}  name: redirect_targets\n{indent}  dns_lookup_family: V4_PREFERRED"
    )
}

fn route_config(
    w: &mut String,
    declaration: &Declaration,
    hosts: &std::collections::BTreeSet<HostPattern>,
    variant: Variant,
) {
    let _ = writeln!(
        w,
        "          route_config:\n            name: mirror\n            virtual_hosts:"
    );
    let credential = declaration
        .access
        .as_ref()
        .and_then(|a| a.credential_header());
    // Leaving the mirror: nothing internal, and never the client's mirror credential.
    let external: Vec<&str> = INTERNAL_HEADERS.iter().copied().chain(credential).collect();
    for host in hosts {
        let (vhost, cluster) = match host {
            HostPattern::Exact(authority) => (authority.clone(), authority.clone()),
            HostPattern::Wildcard(_) => (host.to_string(), DYNAMIC_CLUSTER.to_owned()),
        };
        upstream_virtual_host(w, &vhost, &cluster, &external, false);
    }
    let to_cache: Vec<&str> = credential.into_iter().collect();
    let replicated = declaration.mirror.cache_service.is_replicated();
    for registry in declaration.cached_registries() {
        upstream_virtual_host(w, &registry.upstream, CACHE_CLUSTER, &to_cache, replicated);
    }
    let hsts = matches!(variant, Variant::Standalone | Variant::BehindTlsProxy);
    // The OCI error JSON has no single quote, so it sits in a single-quoted YAML scalar as is.
    let unrouted = format!(
        "direct_response:\n                  status: 404\n                  body:\n                    inline_string: '{}'",
        oci_error::render(ErrorCode::NameUnknown, "not routed by the mirror filter")
    );
    let _ = writeln!(
        w,
        "            # What clients address. The filter rewrites :authority to an upstream host\n            # above, which re-selects the route; a request it did not rewrite stops here.\n            - name: unrouted\n              domains: [\"*\"]\n              routes:"
    );
    if declaration
        .access
        .as_ref()
        .is_some_and(|a| a.basic_auth.is_some())
    {
        // containerd fetches tokens without its hosts.toml headers, and a token request
        // carries the registry's credentials, not the mirror's; the token is worth nothing
        // without the mirror login on /v2/.
        let _ = writeln!(
            w,
            "              - match: {{ prefix: \"{AUTH_PREFIX}\" }}\n                {unrouted}\n                typed_per_filter_config:\n                  envoy.filters.http.basic_auth:\n                    \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig\n                    disabled: true"
        );
    }
    let _ = writeln!(
        w,
        "              - match: {{ prefix: \"/\" }}\n                {unrouted}"
    );
    if hsts {
        let _ = writeln!(
            w,
            "            response_headers_to_add:\n            - header: {{ key: strict-transport-security, value: \"max-age=31536000\" }}\n              append_action: OVERWRITE_IF_EXISTS_OR_ADD"
        );
    }
}

/// `replicated`: the cluster is cache-service replicas on a ring: each route hashes the
/// filter's cache key and retries another replica when one is gone.
fn upstream_virtual_host(
    w: &mut String,
    domain: &str,
    cluster: &str,
    remove: &[&str],
    replicated: bool,
) {
    let domains = match domain.split_once(':') {
        Some(_) => quoted(domain),
        // Clients may keep an explicit :443 on the authority.
        None => format!("{}, {}", quoted(domain), quoted(&format!("{domain}:443"))),
    };
    let remove = if remove.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = remove.iter().map(|h| quoted(h)).collect();
        format!(
            "\n              request_headers_to_remove: [{}]",
            names.join(", ")
        )
    };
    let (manifest_retry, blob_retry) = if replicated {
        // A reset before the answer started is a replica gone mid-request: the next one on
        // the ring takes it. previous_hosts rejects the replica that failed, and each host
        // selection attempt steps one ring entry on, which is that same replica again with a
        // chance of 1 in N: 3 attempts left ~1 key in 30 of a dead replica (of 3) on it until
        // the health check removed it. 32 steps cost nothing unless retried.
        let other_host = "retry_host_predicate: [{ name: envoy.retry_host_predicates.previous_hosts, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate } }], host_selection_retry_max_attempts: 32";
        (
            format!("retry_policy: {{ retry_on: \"connect-failure,refused-stream,reset,retriable-status-codes\", retriable_status_codes: [502, 503, 504], num_retries: 2, {other_host} }}"),
            format!("retry_policy: {{ retry_on: \"connect-failure,refused-stream,reset\", num_retries: 2, {other_host} }}"),
        )
    } else {
        (
            "retry_policy: { retry_on: \"connect-failure,refused-stream,reset,retriable-status-codes\", retriable_status_codes: [502, 503, 504], num_retries: 2 }".to_owned(),
            "retry_policy: { retry_on: \"connect-failure,refused-stream\", num_retries: 2 }".to_owned(),
        )
    };
    let hash = if replicated {
        format!("\n                  # One key, one replica (the filter sets it: a blob's digest, a tag's name).\n                  hash_policy: [{{ header: {{ header_name: {CACHE_KEY_HEADER} }} }}]")
    } else {
        String::new()
    };
    let _ = writeln!(
        w,
        "            - name: {}\n              domains: [{domains}]{remove}\n              routes:\n              - match: {{ safe_regex: {{ regex: \"^/v2/.+/manifests/[^/]+$\" }} }}\n                route:\n                  cluster: {}\n                  timeout: 60s{hash}\n                  {manifest_retry}\n              # Blobs, redirect targets and tokens: no route timeout, multi-gigabyte layers\n              # over slow links must finish; stalled transfers end on the idle timeout.\n              - match: {{ prefix: \"/\" }}\n                route:\n                  cluster: {}\n                  timeout: 0s\n                  idle_timeout: 300s{hash}\n                  {blob_retry}",
        quoted(domain),
        quoted(cluster),
        quoted(cluster)
    );
}

/// `ca`: the registry's declared `ca_file`; absent: the system's CAs.
fn tls_cluster(w: &mut String, name: &str, host: &str, port: u16, ca: Option<&str>) {
    let trusted_ca = match ca {
        Some(ca) => format!(
            "# The registry's ca_file.\n            trusted_ca: {{ filename: {} }}",
            quoted(ca)
        ),
        None => format!("trusted_ca: {{ filename: {SYSTEM_CA} }}"),
    };
    let _ = writeln!(
        w,
        "  - name: {}\n    type: LOGICAL_DNS\n    dns_lookup_family: V4_PREFERRED\n    connect_timeout: 10s\n    load_assignment:\n      cluster_name: {}\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {port} }}\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: {}\n        common_tls_context:\n          validation_context:\n            {trusted_ca}\n            match_typed_subject_alt_names:\n            - san_type: DNS\n              matcher: {{ exact: {} }}",
        quoted(name),
        quoted(name),
        quoted(host),
        quoted(host),
        quoted(host)
    );
}

fn dynamic_cluster(w: &mut String) {
    let _ = writeln!(
        w,
        "  - name: {DYNAMIC_CLUSTER}\n    connect_timeout: 10s\n    lb_policy: CLUSTER_PROVIDED\n    cluster_type:\n      name: envoy.clusters.dynamic_forward_proxy\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig\n{}\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        upstream_http_protocol_options: {{ auto_sni: true, auto_san_validation: true }}\n        auto_config: {{ http2_protocol_options: {{}} }}\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        common_tls_context:\n          validation_context:\n            trusted_ca: {{ filename: {SYSTEM_CA} }}",
        dns_cache_config("        ")
    );
}

/// One replica: as before. Several: a ring over them (small: a few replicas need no more
/// entries to spread evenly), each checked on `/readyz` so a dead or storeless replica
/// leaves the ring and its keys move to the others.
fn cache_cluster(w: &mut String, cache: &CacheService) {
    let _ = writeln!(
        w,
        "  - name: {CACHE_CLUSTER}\n    type: STRICT_DNS\n    connect_timeout: 5s\n    # Idle connections closed well before the cache closes them ({}s), so a request rarely\n    # meets a connection the cache is closing.\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{ http_protocol_options: {{}} }}\n        common_http_protocol_options: {{ idle_timeout: {}s }}",
        ClientTimeouts::DEFAULT.request_head.as_secs(),
        CACHE_IDLE_TIMEOUT.as_secs()
    );
    if cache.is_replicated() {
        let _ = writeln!(
            w,
            "    # cache-service replicas on one shared store: consistent hashing on the filter's\n    # {CACHE_KEY_HEADER}, so each blob is fetched upstream by one replica.\n    lb_policy: RING_HASH\n    ring_hash_lb_config: {{ minimum_ring_size: 128, maximum_ring_size: 4096 }}\n    health_checks:\n    - timeout: 2s\n      interval: 5s\n      no_traffic_interval: 5s\n      unhealthy_threshold: 2\n      healthy_threshold: 1\n      http_health_check: {{ path: /readyz }}\n    # When a replica dies, every request in flight on its keys retries at once: Envoy's\n    # default of 3 concurrent retries per cluster would turn the rest into 503s.\n    circuit_breakers: {{ thresholds: [{{ max_retries: 1024 }}] }}"
        );
    }
    let _ = writeln!(
        w,
        "    load_assignment:\n      cluster_name: {CACHE_CLUSTER}\n      endpoints:\n      - lb_endpoints:"
    );
    for replica in cache.replicas() {
        // `validate` has checked host:port.
        let (host, port) = replica.rsplit_once(':').unwrap_or((replica, "5001"));
        let _ = writeln!(
            w,
            "        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {port} }}",
            quoted(host)
        );
    }
}
