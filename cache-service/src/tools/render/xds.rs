//! The file-based xDS layout: a small bootstrap whose listeners (LDS) and clusters (CDS)
//! come from `lds.yaml` / `cds.yaml` beside it. Envoy watches the directory and applies a
//! file moved into it without a restart: a changed listener is a new listener (with a
//! fresh filter `on_configure`) while the old one drains its in-flight requests.
//!
//! Cut from the static render's text, so both layouts carry the same listeners, clusters
//! and comments.

use sha2::{Digest, Sha256};
use std::fmt::Write;

/// Where the bootstrap tells Envoy to find `lds.yaml` and `cds.yaml`.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The directory Envoy watches (relative paths are from Envoy's working directory).
    pub dir: &'static str,
    /// The node id Envoy reports (admin `/server_info`).
    pub node: &'static str,
}

/// `just up` runs Envoy from the repository root.
pub const LOCAL: Layout = Layout {
    dir: "envoy/xds/local",
    node: "regmirror-local",
};
/// A standalone mirror installs the directory next to its certificates and module.
pub const STANDALONE: Layout = Layout {
    dir: "/etc/regmirror/xds",
    node: "regmirror",
};

#[derive(Debug, thiserror::Error)]
#[error("the static Envoy render has no `{0}` section to cut the xDS files from")]
pub struct SplitError(&'static str);

/// The three files of one layout.
pub struct XdsFiles {
    pub bootstrap: String,
    pub lds: String,
    pub cds: String,
}

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// Splits a static bootstrap rendered by `envoy::render` into the xDS layout.
pub fn from_static(static_yaml: &str, layout: Layout) -> Result<XdsFiles, SplitError> {
    let (head, rest) = static_yaml
        .split_once("static_resources:\n  listeners:\n")
        .ok_or(SplitError("static_resources.listeners"))?;
    let (listeners, clusters) = rest
        .split_once("\n  clusters:\n")
        .ok_or(SplitError("static_resources.clusters"))?;
    // The rendered header's first two lines are the "edit registries.toml" note and the
    // variant's description; keep them, then the admin and overload sections.
    let (comments, settings) = split_leading_comments(head);
    let lds = resources(
        comments,
        "Listeners (LDS)",
        LISTENER_TYPE,
        // A route table loaded from LDS may name a cluster CDS has not delivered yet (the
        // two files are read independently): with validation Envoy would reject the whole
        // listener, without it that route answers 404 until the cluster arrives.
        &listeners.replace(
            "\n          route_config:\n",
            "\n          route_config:\n            validate_clusters: false\n",
        ),
    );
    let cds = resources(comments, "Clusters (CDS)", CLUSTER_TYPE, clusters);
    let mut bootstrap = String::new();
    let b = &mut bootstrap;
    let _ = write!(
        b,
        "{comments}\
         # Listeners and clusters come from lds.yaml and cds.yaml in {dir}: Envoy applies\n\
         # a new file moved into that directory without a restart (`regmirror render` writes\n\
         # them that way); an update it rejects leaves the previous one serving.\n\
         {settings}\
         node:\n  id: {node}\n  cluster: regmirror\n\
         dynamic_resources:\n",
        dir = layout.dir,
        node = layout.node,
    );
    for kind in ["cds", "lds"] {
        let _ = write!(
            b,
            "  {kind}_config:\n    resource_api_version: V3\n    path_config_source:\n      \
             path: {dir}/{kind}.yaml\n      watched_directory: {{ path: {dir} }}\n",
            dir = layout.dir
        );
    }
    Ok(XdsFiles {
        bootstrap,
        lds,
        cds,
    })
}

fn split_leading_comments(text: &str) -> (&str, &str) {
    let end = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.len() + 1)
        .sum::<usize>()
        .min(text.len());
    text.split_at(end)
}

/// A DiscoveryResponse file: the static block's items (indented two spaces, each starting
/// `  - name:`) become `resources` with their type; `version_info` is a hash of them, so
/// Envoy's admin (`/config_dump`, `*.version_text`) names the render in force.
fn resources(comments: &str, what: &str, type_url: &str, block: &str) -> String {
    let mut items = String::new();
    for line in block.trim_end_matches('\n').lines() {
        let line = line.strip_prefix("  ").unwrap_or(line);
        if let Some(name) = line.strip_prefix("- name: ") {
            let _ = writeln!(items, "- \"@type\": {type_url}\n  name: {name}");
        } else {
            let _ = writeln!(items, "{line}");
        }
    }
    let mut version = hex::encode(Sha256::digest(items.as_bytes()));
    version.truncate(16);
    format!("{comments}# {what} of this mirror.\nversion_info: \"{version}\"\nresources:\n{items}")
}
