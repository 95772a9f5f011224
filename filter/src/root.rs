//! Root context: compiles the plugin configuration once per `on_configure` (an invalid one
//! is refused with its reason logged), holds the signing key and the counters' flush tick.

use crate::http::MirrorHttp;
use crate::metrics::{self, Metrics};
use crate::rules::redirect::MIN_KEY_LEN;
use crate::rules::{self, CompiledConfig};
use crate::shared_data::{self, SeenRealms};
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::rc::Rc;

/// What every HTTP context of a VM shares, replaced as a whole on reconfiguration.
pub struct Shared {
    pub cfg: CompiledConfig,
    pub metrics: Metrics,
    pub seen_realms: SeenRealms,
}

impl Shared {
    /// The configured key, else the per-Envoy key from shared data (read each
    /// time so every worker uses whatever value won the start-up race).
    pub fn signing_key(&self) -> Vec<u8> {
        match &self.cfg.signing_key {
            Some(k) => k.clone(),
            None => shared_data::signing_key().unwrap_or_default(),
        }
    }
}

/// Makes sure a shared signing key exists; true when one is readable afterwards.
fn ensure_shared_key() -> bool {
    let usable = || shared_data::signing_key().is_some_and(|k| k.len() >= MIN_KEY_LEN);
    if usable() {
        return true;
    }
    let mut buf = [0u8; 32];
    if let Err(e) = getrandom::getrandom(&mut buf) {
        warn!("cannot generate a signing key: {e}");
        return false;
    }
    // Another worker may have won the race; either way read back what is stored.
    if let Err(e) = shared_data::offer_signing_key(&buf) {
        debug!("signing key already set by another VM ({e:?})");
    }
    usable()
}

/// Filters log records in the VM at the host's level, so records the host would drop
/// are neither formatted nor copied across the VM boundary.
fn use_host_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

#[derive(Default)]
pub struct MirrorRoot {
    shared: Option<Rc<Shared>>,
}

impl Context for MirrorRoot {}

impl RootContext for MirrorRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        use_host_log_level();
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        use_host_log_level();
        // The SDK's accessors unwrap host errors (a panic kills the VM): host calls direct.
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            info!("no plugin configuration, using the built-in registries");
        }
        let cfg = match rules::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                warn!("invalid plugin configuration: {e}");
                return false;
            }
        };
        if cfg.signing_key.is_none() && !ensure_shared_key() {
            warn!("no signing key available; redirects will not be signed");
        }
        let metrics = Metrics::define(&cfg);
        info!(
            "configured {} registries, default {:?}",
            cfg.registries().len(),
            cfg.default_registry().map(|r| r.name.as_str())
        );
        if let Some(previous) = &self.shared {
            previous.metrics.flush();
        }
        if let Err(e) = hostcalls::set_tick_period(metrics::FLUSH_PERIOD) {
            warn!("no tick from the host ({e:?}): counters will not be reported");
        }
        self.shared = Some(Rc::new(Shared {
            cfg,
            metrics,
            seen_realms: SeenRealms::default(),
        }));
        true
    }

    fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            shared.metrics.flush();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(MirrorHttp::new(self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
