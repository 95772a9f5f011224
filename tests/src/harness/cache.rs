//! The cache-service (`regmirror serve`) as a fixture, and a mirror whose `cache_service`
//! cluster points at it. The cache reaches the gcr-like upstream by address
//! (`--upstream gcr.io=https://127.0.0.1:<gcr front>`, `--upstream-ca` = test CA).

use crate::mirror::Mirror;
use crate::proc::Proc;
use crate::upstreams::{self, Upstreams, GCR_SERVICE};
use anyhow::Result;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub struct CacheService {
    pub addr: SocketAddr,
    pub storage: PathBuf,
    pub proc: Proc,
    _tmp: tempfile::TempDir,
}

impl CacheService {
    /// `regmirror serve --listen … --storage … --upstream gcr.io=… --upstream-ca …`.
    pub fn start(up: &Upstreams) -> Result<CacheService> {
        let bin = crate::build::regmirror()?;
        let tmp = crate::fixture_dir("cache")?;
        let storage = tmp.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--storage")
            .arg(&storage)
            .arg("--upstream")
            .arg(format!("{GCR_SERVICE}=https://{}", up.nginx.gcr_front))
            .arg("--upstream-ca")
            .arg(&up.pki.ca)
            .env("RUST_LOG", "info,regmirror=debug,cache_service=debug");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGMIRROR_") {
                cmd.env_remove(k);
            }
        }
        let mut proc = Proc::spawn("regmirror", &cmd, &tmp.path().join("regmirror.log"))?;
        proc.wait_for_port(addr, Duration::from_secs(30))?;
        Ok(CacheService {
            addr,
            storage,
            proc,
            _tmp: tmp,
        })
    }
}

/// Mirror + cache-service, shared by a test binary.
pub struct CachedMirror {
    pub cache: CacheService,
    pub mirror: Mirror,
}

impl CachedMirror {
    /// Blob GETs the gcr-like upstream answered (200) for `image`'s blobs.
    pub fn upstream_blob_gets(&self, image: &crate::images::SeededImage) -> usize {
        let blobs = image.all_blobs();
        self.mirror
            .up
            .access_log(crate::upstreams::Front::Gcr)
            .iter()
            .filter(|e| {
                e.method == "GET"
                    && e.status() == 200
                    && blobs
                        .iter()
                        .any(|b| e.path().ends_with(&format!("/blobs/{b}")))
            })
            .count()
    }

    /// Envoy's log, the fixtures' logs and the cache-service's log.
    pub fn logs(&self) -> String {
        format!(
            "{}\n--- gcr front ---\n{}\n--- regmirror ---\n{}",
            self.mirror.logs(),
            crate::proc::log_tail(&self.mirror.up.nginx.dir.join("gcr-front.log"), 30),
            self.cache.proc.log_tail(60)
        )
    }
}

/// The process-wide mirror with the cache-service behind `cache_service`.
pub fn shared() -> &'static CachedMirror {
    static C: OnceLock<Result<CachedMirror, String>> = OnceLock::new();
    let r = C.get_or_init(|| {
        (|| -> Result<CachedMirror> {
            let up = upstreams::shared();
            let cache = CacheService::start(up)?;
            let mirror = Mirror::start_with(
                up,
                &crate::build::workspace_root().join("envoy/local.yaml"),
                true,
                BTreeMap::from([("cache_service".to_string(), cache.addr)]),
            )?;
            Ok(CachedMirror { cache, mirror })
        })()
        .map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(c) => c,
        Err(e) => panic!("mirror with cache failed to start: {e}"),
    }
}
