//! Test images built in Rust as OCI image layouts (no internet): random-content gzip'd tar
//! layers, a config, a manifest, and an OCI index with two platforms.

use anyhow::{Context, Result};
use rand::{RngCore, SeedableRng};
use serde_json::json;
use std::path::Path;

pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One platform image inside a seeded image.
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub os: String,
    pub architecture: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
}

impl PlatformImage {
    /// Config then layers.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut v = vec![self.config_digest.clone()];
        v.extend(self.layer_digests.iter().cloned());
        v
    }
}

/// An image the harness seeded into an upstream registry.
#[derive(Clone, Debug)]
pub struct SeededImage {
    /// Public registry name: `docker.io` or `quay.io`.
    pub registry: String,
    /// Repository name as stored upstream (`library/alpine`).
    pub name: String,
    pub tag: String,
    /// Digest of the top-level manifest (an index for multi-platform images).
    pub digest: String,
    pub media_type: String,
    /// One entry for a single-platform image, one per platform for an index.
    pub platforms: Vec<PlatformImage>,
    /// OCI layout directory it was pushed from.
    pub layout: std::path::PathBuf,
}

impl SeededImage {
    /// The first layer of the first platform.
    pub fn first_layer(&self) -> String {
        self.platforms[0].layer_digests[0].clone()
    }

    pub fn is_index(&self) -> bool {
        self.media_type == MT_INDEX
    }

    pub fn platform(&self, arch: &str) -> Option<&PlatformImage> {
        self.platforms.iter().find(|p| p.architecture == arch)
    }

    /// Every blob digest (configs + layers) of every platform.
    pub fn all_blobs(&self) -> Vec<String> {
        self.platforms
            .iter()
            .flat_map(PlatformImage::blob_digests)
            .collect()
    }
}

struct Layout<'a> {
    dir: &'a Path,
}

impl Layout<'_> {
    fn blob(&self, bytes: &[u8]) -> Result<String> {
        let digest = crate::digest_of(bytes);
        let hex = digest.trim_start_matches("sha256:");
        let p = self.dir.join("blobs/sha256").join(hex);
        std::fs::write(&p, bytes).with_context(|| format!("write {}", p.display()))?;
        Ok(digest)
    }
}

/// A gzip'd tar with one file of `size` random bytes; returns (gz bytes, diff_id).
fn random_layer(
    rng: &mut rand::rngs::StdRng,
    name: &str,
    size: usize,
) -> Result<(Vec<u8>, String)> {
    let mut content = vec![0u8; size];
    rng.fill_bytes(&mut content);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(1_700_000_000);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append_data(&mut header, format!("data/{name}"), &content[..])?;
    let tar_bytes = builder.into_inner()?;
    let diff_id = crate::digest_of(&tar_bytes);
    // Level 0 (stored) keeps debug builds fast; it is still a valid gzip stream.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(0));
    std::io::Write::write_all(&mut gz, &tar_bytes)?;
    Ok((gz.finish()?, diff_id))
}

fn platform_image(
    layout: &Layout,
    rng: &mut rand::rngs::StdRng,
    arch: &str,
    layer_sizes: &[usize],
) -> Result<(PlatformImage, usize)> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, size) in layer_sizes.iter().enumerate() {
        let (gz, diff_id) = random_layer(rng, &format!("{arch}-layer-{i}"), *size)?;
        let d = layout.blob(&gz)?;
        layers.push(json!({"mediaType": MT_LAYER, "digest": d, "size": gz.len()}));
        diff_ids.push(diff_id);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "created": "2026-11-23T00:00:00Z",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let config_digest = layout.blob(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": layers,
    }))?;
    let manifest_digest = layout.blob(&manifest)?;
    let layer_digests = layers
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect();
    Ok((
        PlatformImage {
            os: "linux".into(),
            architecture: arch.into(),
            manifest_digest,
            config_digest,
            layer_digests,
        },
        manifest.len(),
    ))
}

/// Writes an OCI layout under `dir` holding one image tagged `tag`: a single-platform
/// image when `arches` has one entry, else an index over those platforms.
pub fn build_layout(
    dir: &Path,
    registry: &str,
    name: &str,
    tag: &str,
    seed: u64,
    arches: &[&str],
    layer_sizes: &[usize],
) -> Result<SeededImage> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let layout = Layout { dir };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut platforms = Vec::new();
    let mut sizes = Vec::new();
    for arch in arches {
        let (p, size) = platform_image(&layout, &mut rng, arch, layer_sizes)?;
        platforms.push(p);
        sizes.push(size);
    }
    let (digest, media_type, size) = if let ([p], [size]) = (&platforms[..], &sizes[..]) {
        (p.manifest_digest.clone(), MT_MANIFEST.to_string(), *size)
    } else {
        let manifests: Vec<_> = platforms
            .iter()
            .zip(&sizes)
            .map(|(p, size)| {
                json!({
                    "mediaType": MT_MANIFEST,
                    "digest": p.manifest_digest,
                    "size": size,
                    "platform": {"os": p.os, "architecture": p.architecture},
                })
            })
            .collect();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": manifests,
        }))?;
        (layout.blob(&index)?, MT_INDEX.to_string(), index.len())
    };
    let top = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))?;
    std::fs::write(dir.join("index.json"), top)?;
    Ok(SeededImage {
        registry: registry.into(),
        name: name.into(),
        tag: tag.into(),
        digest,
        media_type,
        platforms,
        layout: dir.to_path_buf(),
    })
}
