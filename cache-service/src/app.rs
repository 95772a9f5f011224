//! The cache as a value: open the store, build the upstream clients and the cache, and wire
//! the HTTP front. `main.rs` serves it (with reload, signals and graceful shutdown); tests and
//! the bench run it in-process.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;

use crate::cache::Cache;
use crate::config::Config;
use crate::reload::{self, ConfigState, ReloadError};
use crate::{http, store};

/// Why the cache could not be built; every one is a configuration or storage problem.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Storage(#[from] store::OpenError),
    #[error(transparent)]
    Upstream(#[from] ReloadError),
    #[error("opening the cache in {location}: {source}")]
    Open {
        location: store::Location,
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
///
/// A bucket is checked first (probe put/get/list/delete): an unreachable endpoint, refused
/// credentials or a missing bucket is an error naming the cause. A shared store gets its
/// background upkeep (eviction under the lease, cleanup of abandoned uploads) spawned here.
pub async fn build_app(config: Config, file_text: Option<&str>) -> Result<App, AppError> {
    let store = store::open(&config.storage).await?;
    // Nothing runs yet: every upstream gets a new client.
    let upstreams = reload::build_upstreams(&config, &BTreeMap::new(), &config)?;
    let cache = Cache::open(store, upstreams, config.tag_ttl, reload::limits(&config))
        .await
        .map_err(|source| AppError::Open {
            location: config.storage.clone(),
            source,
        })?;
    let cache = Arc::new(cache);
    // Ends by itself once the cache is dropped.
    cache.spawn_upkeep();
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
