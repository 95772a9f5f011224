//! The cache as a value: open the store, build the upstream clients and the cache, and wire
//! the HTTP front. `main.rs` serves it (with reload, signals and graceful shutdown); tests and
//! the bench run it in-process.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;

use crate::cache::Cache;
use crate::config::Config;
use crate::reload::{self, ConfigState, ReloadError};
use crate::store::fs::FsStore;
use crate::{http, store};

/// Why the cache could not be built; every one is a configuration or storage problem.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("storage directory {path}: {source}")]
    Storage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] ReloadError),
    #[error("opening the cache in {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A built cache: the router to serve, plus what serving it around needs (drain and temp
/// cleanup at shutdown, the configuration a reload swaps).
pub struct App {
    pub router: Router,
    pub cache: Arc<Cache>,
    pub config: Arc<ConfigState>,
}

/// Build the cache for `config`. `file_text` is the config file's content when there is one:
/// its hash names the configuration version shown on `/readyz`.
pub fn build_app(config: Config, file_text: Option<&str>) -> Result<App, AppError> {
    let store: Arc<dyn store::BlobStore> = Arc::new(FsStore::new(&config.storage).map_err(
        |source| AppError::Storage {
            path: config.storage.clone(),
            source,
        },
    )?);
    // Nothing runs yet: every upstream gets a new client.
    let upstreams = reload::build_upstreams(&config, &BTreeMap::new(), &config)?;
    let cache = Cache::open(store, upstreams, config.tag_ttl, reload::limits(&config)).map_err(
        |source| AppError::Open {
            path: config.storage.clone(),
            source,
        },
    )?;
    let cache = Arc::new(cache);
    let config = Arc::new(ConfigState::new(config, file_text));
    let router = http::router(http::AppState {
        cache: cache.clone(),
        config: config.clone(),
        status: Arc::default(),
    });
    Ok(App {
        router,
        cache,
        config,
    })
}
