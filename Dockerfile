# syntax=docker/dockerfile:1
# Images for `docker compose up` (compose.yaml): `--target envoy` is the official Envoy
# 1.40 image with the filter added; `--target cache` is cache-service alone, non-root.

FROM rust:1-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip1
COPY . .
RUN cargo build -p mirror-filter --target wasm32-wasip1 --profile wasm \
 && python3 filter/trim-exports.py target/wasm32-wasip1/wasm/mirror_filter.wasm \
 && cargo build --release -p cache-service

FROM envoyproxy/envoy:v1.40-latest AS envoy
COPY --from=build /src/target/wasm32-wasip1/wasm/mirror_filter.wasm /etc/regmirror/mirror_filter.wasm
COPY envoy/mirror.yaml /etc/regmirror/mirror.yaml
CMD ["envoy", "-c", "/etc/regmirror/mirror.yaml", "--log-level", "warn"]

FROM debian:bookworm-slim AS cache
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/regmirror regmirror \
 && mkdir -p /var/lib/regmirror && chown regmirror /var/lib/regmirror
COPY --from=build /src/target/release/regmirror /usr/local/bin/regmirror
COPY envoy/cache.toml /etc/regmirror/cache.toml
USER regmirror
VOLUME /var/lib/regmirror
ENTRYPOINT ["regmirror"]
CMD ["serve", "--config", "/etc/regmirror/cache.toml", "--listen", "0.0.0.0:5001"]
