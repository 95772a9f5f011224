#!/usr/bin/env python3
"""Packs the filter as an OCI image layout that Istio's WasmPlugin can pull.

Istio's "compat" Wasm image format: an ordinary OCI image with one layer holding
`plugin.wasm`, so any registry and `skopeo copy` handle it. Usage:

    wasm-image.py MODULE.wasm OUT_DIR TAG
    skopeo copy oci:OUT_DIR:TAG docker://registry.example.com/regmirror/filter:TAG

Prints the module's sha256 (the WasmPlugin `sha256` field) and the manifest digest.
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile


def write_blob(out, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(out, "blobs", "sha256", digest)
    with open(path, "wb") as f:
        f.write(data)
    return "sha256:" + digest


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    module, out, tag = sys.argv[1:]
    with open(module, "rb") as f:
        wasm = f.read()
    if wasm[:4] != b"\0asm":
        sys.exit(f"{module} is not a WebAssembly module")
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)

    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mode, info.mtime = len(wasm), 0o444, 0
        tar.addfile(info, io.BytesIO(wasm))
    layer_tar = tar_bytes.getvalue()
    layer = gzip.compress(layer_tar, mtime=0)  # reproducible: same module, same digest

    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": write_blob(out, config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": write_blob(out, layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    manifest_digest = write_blob(out, manifest)

    index_path = os.path.join(out, "index.json")
    index = {"schemaVersion": 2, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    })
    with open(index_path, "w") as f:
        json.dump(index, f, sort_keys=True)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    print(f"module sha256: {hashlib.sha256(wasm).hexdigest()}")
    print(f"oci:{out}:{tag} manifest {manifest_digest}")


if __name__ == "__main__":
    main()
