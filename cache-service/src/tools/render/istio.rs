//! Istio manifests for running the mirror on an existing ingress gateway.

use super::declaration::{Declaration, UpstreamHost};
use super::envoy::INTERNAL_HEADERS;
use std::fmt::Write;

/// Where `just wasm-image` pushes the filter; users point this at their own registry.
const WASM_IMAGE: &str = "oci://registry.example.com/regmirror/filter:0.1.0";
const NAMESPACE: &str = "istio-system";
const CACHE_SERVICE: &str = "regmirror-cache.regmirror.svc.cluster.local";

fn quoted(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

fn indent(text: &str, by: &str) -> String {
    text.lines().map(|l| format!("{by}{l}\n")).collect()
}

/// The filter configuration with Istio's cluster names: the filter calls an upstream's
/// `/v2/` (to learn its token realm) through `outbound|80||<host>`, the cluster Istio builds
/// from the ServiceEntry below.
fn plugin_config(filter_json: &str) -> String {
    let Ok(mut config) = serde_json::from_str::<serde_json::Value>(filter_json) else {
        return filter_json.to_owned();
    };
    let registries = config
        .get_mut("registries")
        .and_then(serde_json::Value::as_array_mut)
        .into_iter()
        .flatten();
    for registry in registries.filter_map(serde_json::Value::as_object_mut) {
        let cached = registry.get("cache") == Some(&serde_json::Value::Bool(true));
        let upstream = registry.get("upstream").and_then(|u| u.as_str());
        if let (false, Some(upstream)) = (cached, upstream) {
            let cluster = serde_json::Value::String(format!("outbound|80||{upstream}"));
            registry.insert("cluster".to_owned(), cluster);
        }
    }
    serde_json::to_string_pretty(&config).unwrap_or_else(|_| filter_json.to_owned())
}

pub fn render(declaration: &Declaration, filter_json: &str) -> String {
    let mut out = String::new();
    let w = &mut out;
    let suffix = declaration
        .mirror
        .host_suffix
        .clone()
        .unwrap_or_else(|| "mirror.example.com".to_owned());
    let exact: Vec<(String, u16)> = declaration
        .upstream_hosts()
        .into_iter()
        .filter_map(|h| match h {
            UpstreamHost::Exact { host, port } => Some((host, port)),
            // Wildcard targets need DNS per request: use an egress gateway, or declare the
            // registry `redirects = "passthrough"` on Istio.
            UpstreamHost::Wildcard(_) => None,
        })
        .collect();
    if declaration.access.is_some() {
        // Silently dropping a declared restriction would open what the operator closed.
        let _ = write!(
            w,
            "# [access] is not rendered for Istio: restrict the gateway with an AuthorizationPolicy\n\
             # (remoteIpBlocks), Istio's local rate limit and mTLS or RequestAuthentication.\n"
        );
    }
    let _ = write!(
        w,
        "# Rendered by `regmirror render` from envoy/registries.toml: edit that file, not this one.\n\
         # The mirror on an Istio ingress gateway: the wasm filter, the gateway, the upstreams.\n\
         # Replace the WasmPlugin url/sha256 with where `just wasm-image` pushed the module.\n\
         apiVersion: extensions.istio.io/v1alpha1\n\
         kind: WasmPlugin\n\
         metadata:\n  name: regmirror\n  namespace: {NAMESPACE}\n\
         spec:\n  selector:\n    matchLabels:\n      istio: ingressgateway\n\
         \x20 url: {WASM_IMAGE}\n  imagePullPolicy: IfNotPresent\n\
         \x20 pluginName: mirror\n  type: HTTP\n\
         \x20 # Before authorization: the filter decides where a request may go at all.\n\
         \x20 phase: AUTHN\n\
         \x20 # Fail closed: without the filter nothing may be forwarded unchecked.\n\
         \x20 failStrategy: FAIL_CLOSE\n\
         \x20 # envoy/filter.json, plus each upstream's Istio cluster name.\n\
         \x20 pluginConfig:\n{}",
        indent(&plugin_config(filter_json), "    ")
    );
    let mirror_hosts = vec![suffix.clone(), format!("*.{suffix}")];
    let mut gateway_hosts = mirror_hosts.clone();
    gateway_hosts.extend(exact.iter().map(|(h, _)| h.clone()));
    gateway_hosts.extend(declaration.cached_registries().map(|r| r.upstream.clone()));
    let hosts_list = |indent: &str, hosts: &[String]| -> String {
        hosts
            .iter()
            .map(|h| format!("{indent}- {}\n", quoted(h)))
            .collect()
    };
    let _ = write!(
        w,
        "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: regmirror\n  namespace: {NAMESPACE}\n\
         spec:\n  selector:\n    istio: ingressgateway\n  servers:\n\
         \x20 - port: {{ number: 443, name: https, protocol: HTTPS }}\n\
         \x20   tls: {{ mode: SIMPLE, credentialName: regmirror-tls }}\n\
         \x20   # Mirror names clients use, and the upstream names the filter rewrites :authority to\n\
         \x20   # (Istio builds a route only for hosts a Gateway lists).\n\
         \x20   hosts:\n{}\
         \x20 - port: {{ number: 80, name: http, protocol: HTTP }}\n\
         \x20   tls: {{ httpsRedirect: true }}\n\
         \x20   hosts:\n{}",
        hosts_list("    ", &gateway_hosts),
        hosts_list("    ", &mirror_hosts),
    );
    let mut routes = String::new();
    let internal: Vec<String> = INTERNAL_HEADERS.iter().map(|h| quoted(h)).collect();
    for (host, _) in &exact {
        let _ = write!(
            routes,
            "  - match:\n    - authority: {{ exact: {} }}\n    route:\n    - destination: {{ host: {}, port: {{ number: 80 }} }}\n    # No route timeout: multi-gigabyte layers over slow links.\n    timeout: 0s\n    # Mirror-internal and client-identifying headers stay on the mirror.\n    headers:\n      request:\n        remove: [{}]\n",
            quoted(host),
            quoted(host),
            internal.join(", ")
        );
    }
    for registry in declaration.cached_registries() {
        let _ = write!(
            routes,
            "  - match:\n    - authority: {{ exact: {} }}\n    route:\n    - destination: {{ host: {CACHE_SERVICE}, port: {{ number: 5001 }} }}\n    timeout: 0s\n",
            quoted(&registry.upstream)
        );
    }
    let mut vs_hosts: Vec<String> = exact.iter().map(|(h, _)| h.clone()).collect();
    vs_hosts.extend(declaration.cached_registries().map(|r| r.upstream.clone()));
    let _ = write!(
        w,
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: regmirror-upstreams\n  namespace: {NAMESPACE}\n\
         spec:\n  gateways:\n  - regmirror\n  hosts:\n{}  http:\n{routes}",
        hosts_list("  ", &vs_hosts)
    );
    for (host, port) in &exact {
        let name = host.replace('.', "-");
        let _ = write!(
            w,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
             spec:\n  hosts:\n  - {}\n  location: MESH_EXTERNAL\n  resolution: DNS\n  ports:\n  # The gateway speaks HTTP to port 80 and the DestinationRule originates TLS to {port}.\n  - {{ number: 80, name: http, protocol: HTTP, targetPort: {port} }}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
             spec:\n  host: {}\n  trafficPolicy:\n    portLevelSettings:\n    - port: {{ number: 80 }}\n      tls: {{ mode: SIMPLE, sni: {} }}\n",
            quoted(host),
            quoted(host),
            quoted(host)
        );
    }
    out
}
