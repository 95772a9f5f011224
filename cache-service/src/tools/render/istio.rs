//! Istio manifests for running the mirror on an existing ingress gateway.

use super::declaration::Declaration;
use super::envoy::INTERNAL_HEADERS;
use super::RenderError;
use registry_rules::route::CACHE_KEY_HEADER;
use registry_rules::FilterConfig;
use std::fmt::Write;

/// Where `just wasm-image` pushes the filter; users point this at their own registry.
const WASM_IMAGE: &str = "oci://registry.example.com/regmirror/filter:0.1.0";
const NAMESPACE: &str = "istio-system";
/// The cache replicas' Service (istio/cache.yaml), which the gateway routes to.
const CACHE_NAME: &str = "regmirror-cache";
const CACHE_NAMESPACE: &str = "regmirror";
const CACHE_PORT: u16 = 5001;
/// A placeholder: where the operator pushed the Dockerfile's `cache` target.
const CACHE_IMAGE: &str = "registry.example.com/regmirror/cache:0.1.0";
/// The Secret with the replicas' S3 settings (the AWS_* variables object_store reads).
const S3_SECRET: &str = "regmirror-s3";
const REPLICAS: u32 = 3;

fn quoted(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

fn indent(text: &str, by: &str) -> String {
    text.lines()
        .map(|l| match l {
            "" => "\n".to_owned(),
            l => format!("{by}{l}\n"),
        })
        .collect()
}

/// The filter configuration with Istio's cluster names: the filter calls an upstream's
/// `/v2/` (to learn its token realm) through `outbound|80||<host>`, the cluster Istio builds
/// from the ServiceEntry below.
fn plugin_config(filter: &FilterConfig) -> Result<String, RenderError> {
    let mut config = filter.clone();
    for registry in config.registries.iter_mut().filter(|r| !r.cache) {
        registry.cluster = Some(format!("outbound|80||{}", registry.upstream));
    }
    serde_json::to_string_pretty(&config).map_err(|e| RenderError::Serialize {
        what: "Istio plugin configuration",
        reason: e.to_string(),
    })
}

pub fn render(declaration: &Declaration, filter: &FilterConfig) -> Result<String, RenderError> {
    let mut out = String::new();
    let w = &mut out;
    let suffix = declaration
        .mirror
        .host_suffix
        .clone()
        .unwrap_or_else(|| "mirror.example.com".to_owned());
    let cas = declaration.upstream_cas();
    // Wildcard targets need DNS per request: use an egress gateway, or declare the
    // registry `redirects = "passthrough"` on Istio.
    let exact: Vec<(String, u16, Option<String>)> = declaration
        .upstream_hosts()
        .iter()
        .filter_map(|pattern| {
            let (host, port) = pattern.host_port(443)?;
            let ca = cas.get(pattern).map(|ca| ca.to_string_lossy().into_owned());
            Some((host.to_owned(), port, ca))
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
        indent(&plugin_config(filter)?, "    ")
    );
    let mirror_hosts = vec![suffix.clone(), format!("*.{suffix}")];
    let mut gateway_hosts = mirror_hosts.clone();
    gateway_hosts.extend(exact.iter().map(|(h, _, _)| h.clone()));
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
    for (host, _, _) in &exact {
        let _ = write!(
            routes,
            "  - match:\n    - authority: {{ exact: {} }}\n    route:\n    - destination: {{ host: {}, port: {{ number: 80 }} }}\n    # No route timeout: multi-gigabyte layers over slow links.\n    timeout: 0s\n    # Mirror-internal and client-identifying headers stay on the mirror.\n    headers:\n      request:\n        remove: [{}]\n",
            quoted(host),
            quoted(host),
            internal.join(", ")
        );
    }
    let cache_service = format!("{CACHE_NAME}.{CACHE_NAMESPACE}.svc.cluster.local");
    for registry in declaration.cached_registries() {
        let _ = write!(
            routes,
            "  - match:\n    - authority: {{ exact: {} }}\n    route:\n    - destination: {{ host: {cache_service}, port: {{ number: {CACHE_PORT} }} }}\n    timeout: 0s\n    # A replica gone before it answered: another one (Istio retries on other hosts).\n    retries: {{ attempts: 2, retryOn: \"connect-failure,refused-stream,reset\" }}\n",
            quoted(&registry.upstream)
        );
    }
    let mut vs_hosts: Vec<String> = exact.iter().map(|(h, _, _)| h.clone()).collect();
    vs_hosts.extend(declaration.cached_registries().map(|r| r.upstream.clone()));
    let _ = write!(
        w,
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: regmirror-upstreams\n  namespace: {NAMESPACE}\n\
         spec:\n  gateways:\n  - regmirror\n  hosts:\n{}  http:\n{routes}",
        hosts_list("  ", &vs_hosts)
    );
    if declaration.cached_registries().next().is_some() {
        // One key, one replica: the gateway hashes the filter's cache key over the replicas
        // (istio/cache.yaml), so each blob is fetched upstream by one of them.
        let _ = write!(
            w,
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {CACHE_NAME}\n  namespace: {NAMESPACE}\n\
             spec:\n  host: {cache_service}\n  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        httpHeaderName: {CACHE_KEY_HEADER}\n\
             \x20   # Idle connections closed well before the cache closes them, so a request rarely meets one it is closing.\n\
             \x20   connectionPool: {{ http: {{ idleTimeout: {}s }} }}\n\
             \x20   # A replica that cannot be reached (connect failures, resets) leaves the ring for a while;\n\
             \x20   # its keys move on. Its 5xx answers do not count: a cache says 502 for an upstream that is\n\
             \x20   # down, which every replica would say, and ejecting them only moves the load.\n\
             \x20   outlierDetection: {{ splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 5, consecutive5xxErrors: 0, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50 }}\n",
            super::envoy::CACHE_IDLE_TIMEOUT.as_secs()
        );
    }
    for (host, port, ca) in &exact {
        let name = host.replace('.', "-");
        let _ = write!(
            w,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
             spec:\n  hosts:\n  - {}\n  location: MESH_EXTERNAL\n  resolution: DNS\n  ports:\n  # The gateway speaks HTTP to port 80 and the DestinationRule originates TLS to {port}.\n  - {{ number: 80, name: http, protocol: HTTP, targetPort: {port} }}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
             spec:\n  host: {}\n  trafficPolicy:\n    portLevelSettings:\n    - port: {{ number: 80 }}\n      tls: {{ mode: SIMPLE, sni: {}{} }}\n",
            quoted(host),
            quoted(host),
            quoted(host),
            // The registry's ca_file, on the gateway; absent: the gateway's system CAs.
            ca.as_deref()
                .map(|ca| format!(", caCertificates: {}", quoted(ca)))
                .unwrap_or_default()
        );
    }
    Ok(out)
}

/// Seconds a stopping replica lets downloads and responses run (`--shutdown-grace`): a
/// multi-GB layer to a slow client takes minutes, and one cut is fetched again.
const SHUTDOWN_GRACE: u64 = 120;
/// Kubernetes' grace before it kills the pod: the preStop pause, the shutdown grace and
/// a margin.
const TERMINATION_GRACE: u64 = SHUTDOWN_GRACE + 15;

/// The cache replicas for the gateway of `render`: a Deployment on one shared S3 bucket
/// prefix (settings from the Secret [`S3_SECRET`]), its Service and PodDisruptionBudget, and
/// cache.toml as a ConfigMap. Readiness is `/healthz`: a replica that lost the store still
/// serves, by pass-through, and Kubernetes has no panic threshold to keep a Service whose
/// every pod lost a shared bucket; `/readyz` says whether the store is reachable, for alerts.
pub fn render_cache(cache_toml: &str) -> String {
    format!(
        "# Rendered by `regmirror render` from envoy/registries.toml: edit that file, not this one.\n\
         # cache-service replicas behind the Istio gateway of mirror.yaml (which hashes the cached\n\
         # routes over them on {CACHE_KEY_HEADER}), all on one S3 bucket prefix. Before applying:\n\
         #   kubectl create namespace {CACHE_NAMESPACE}\n\
         #   kubectl -n {CACHE_NAMESPACE} create secret generic {S3_SECRET} \\\n\
         #     --from-literal=AWS_ENDPOINT_URL=https://s3.example.com --from-literal=AWS_REGION=us-east-1 \\\n\
         #     --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...\n\
         # and replace the image with where you pushed the Dockerfile's `cache` target.\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {CACHE_NAME}\n  namespace: {CACHE_NAMESPACE}\n\
         data:\n  cache.toml: |\n{config}\
         ---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {CACHE_NAME}\n  namespace: {CACHE_NAMESPACE}\n  labels: {{ app: {CACHE_NAME} }}\n\
         spec:\n  replicas: {REPLICAS}\n  selector:\n    matchLabels: {{ app: {CACHE_NAME} }}\n\
         \x20 # Replicas are stateless (the bucket is the cache): replace them one at a time.\n\
         \x20 strategy:\n    type: RollingUpdate\n    rollingUpdate: {{ maxUnavailable: 1, maxSurge: 1 }}\n\
         \x20 template:\n    metadata:\n      labels: {{ app: {CACHE_NAME} }}\n\
         \x20     annotations: {{ prometheus.io/scrape: \"true\", prometheus.io/port: \"{CACHE_PORT}\", prometheus.io/path: /metrics }}\n\
         \x20   spec:\n\
         \x20     securityContext: {{ runAsNonRoot: true, runAsUser: 10001, fsGroup: 10001 }}\n\
         \x20     # One replica a node where there are nodes enough: a node lost takes one replica's keys.\n\
         \x20     topologySpreadConstraints:\n\
         \x20     - {{ maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {{ matchLabels: {{ app: {CACHE_NAME} }} }} }}\n\
         \x20     # SIGTERM closes the port and lets downloads and responses run for --shutdown-grace:\n\
         \x20     # Kubernetes waits the preStop pause, that grace and 10 s more before it kills the pod.\n\
         \x20     terminationGracePeriodSeconds: {TERMINATION_GRACE}\n\
         \x20     containers:\n      - name: cache\n        image: {CACHE_IMAGE}\n\
         \x20       args: [\"serve\", \"--config\", \"/etc/regmirror/cache.toml\", \"--listen\", \"0.0.0.0:{CACHE_PORT}\", \"--storage\", \"s3://regmirror/cache\", \"--spool-dir\", \"/var/spool/regmirror\", \"--local-cache-size\", \"40GiB\", \"--shutdown-grace\", \"{SHUTDOWN_GRACE}\"]\n\
         \x20       # AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (+ AWS_ALLOW_HTTP).\n\
         \x20       envFrom:\n        - secretRef: {{ name: {S3_SECRET} }}\n\
         \x20       ports:\n        - {{ name: http, containerPort: {CACHE_PORT} }}\n\
         \x20       # Ready while it answers: without its store it still serves, by pass-through\n\
         \x20       # (/readyz, false then, is for alerts: a bucket outage must not empty the Service).\n\
         \x20       readinessProbe:\n          httpGet: {{ path: /healthz, port: http }}\n          periodSeconds: 5\n          failureThreshold: 2\n\
         \x20       livenessProbe:\n          httpGet: {{ path: /healthz, port: http }}\n          periodSeconds: 10\n          failureThreshold: 3\n\
         \x20       # Taken off the Service's endpoints before the port closes.\n\
         \x20       lifecycle: {{ preStop: {{ exec: {{ command: [\"sleep\", \"5\"] }} }} }}\n\
         \x20       # The spool volume below: the scheduler places the pod where that much disk is free.\n\
         \x20       resources:\n          requests: {{ cpu: 500m, memory: 256Mi, ephemeral-storage: 64Gi }}\n          limits: {{ memory: 1Gi }}\n\
         \x20       securityContext: {{ allowPrivilegeEscalation: false, readOnlyRootFilesystem: true }}\n\
         \x20       volumeMounts:\n        - {{ name: config, mountPath: /etc/regmirror, readOnly: true }}\n\
         \x20       # In-flight downloads before they are verified and uploaded (a layer or a few), and the\n\
         \x20       # replica's local tier: up to 40 GiB of the blobs it serves, read from disk when warm.\n\
         \x20       - {{ name: spool, mountPath: /var/spool/regmirror }}\n\
         \x20     volumes:\n      - name: config\n        configMap: {{ name: {CACHE_NAME} }}\n\
         \x20     - name: spool\n        emptyDir: {{ sizeLimit: 64Gi }}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {CACHE_NAME}\n  namespace: {CACHE_NAMESPACE}\n\
         spec:\n  selector: {{ app: {CACHE_NAME} }}\n  ports:\n  - {{ name: http, port: {CACHE_PORT}, targetPort: http, appProtocol: http }}\n\
         ---\napiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: {CACHE_NAME}\n  namespace: {CACHE_NAMESPACE}\n\
         spec:\n  # Node drains take one replica at a time, as the rolling update does.\n  maxUnavailable: 1\n  selector:\n    matchLabels: {{ app: {CACHE_NAME} }}\n",
        config = indent(cache_toml, "    "),
    )
}
