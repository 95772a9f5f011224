//! Typed access to proxy-wasm shared data, where every worker VM of an Envoy sees what one
//! of them learned: each registry's stored realm, issued realms and token hosts (the
//! rules' [`SharedSet`]s), and the per-Envoy signing key.

use crate::rules::challenge::LearnedRealm;
use crate::rules::realms::{self, IssuedRealms, RealmUrl};
use crate::rules::route::Learned;
use crate::rules::token::realm_key;
use crate::rules::token_host::{self, TokenHosts};
use crate::rules::SharedSet;
use log::{info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use std::cell::Cell;

/// Shared-data key holding the per-Envoy signing key.
const SIGNING_KEY: &str = "mirror.signing_key";

/// The per-Envoy signing key, if one is stored.
pub fn signing_key() -> Option<Vec<u8>> {
    match hostcalls::get_shared_data(SIGNING_KEY) {
        Ok((Some(v), _)) => Some(v),
        _ => None,
    }
}

/// Stores `key` as the per-Envoy signing key. The host has no create-if-absent (a CAS is not
/// compared for a key not stored yet), so two VMs configuring at the same moment may both
/// store one, the last winning: every VM reads the key at use time, and this happens at
/// start, before a URL is signed; a `signing_key` in the config has no such window.
pub fn offer_signing_key(key: &[u8]) -> Result<(), Status> {
    hostcalls::set_shared_data(SIGNING_KEY, Some(key), Some(0))
}

/// The stored realm of `registry`, if present and well-formed.
pub fn stored_realm(registry: &str) -> Option<LearnedRealm> {
    match hostcalls::get_shared_data(&realm_key(registry)) {
        Ok((Some(v), _)) => LearnedRealm::decode(&v),
        _ => None,
    }
}

/// Stores `learned` as `registry`'s realm (and marks it issued) unless it is already there.
pub fn store_realm(registry: &str, learned: &LearnedRealm) {
    if stored_realm(registry).as_ref() == Some(learned) {
        return;
    }
    let v = learned.encode();
    match hostcalls::set_shared_data(&realm_key(registry), Some(v.as_bytes()), None) {
        Ok(()) => info!("learned token realm of {registry}: {}", learned.realm),
        Err(e) => warn!("cannot store the token realm of {registry}: {e:?}"),
    }
    if let Some(u) = RealmUrl::from_realm(&learned.realm) {
        add_issued_realm(registry, &u);
    }
}

/// The set under `key` and the shared-data CAS of that key.
fn read_set<S: SharedSet>(key: &str) -> (S, Option<u32>) {
    match hostcalls::get_shared_data(key) {
        Ok((Some(v), cas)) => (S::decode(&v), cas),
        Ok((None, cas)) => (S::default(), cas),
        Err(_) => (S::default(), None),
    }
}

/// Adds `item` to the set under `key`, retrying on a CAS race with another VM. True when
/// this call stored a changed set. The first store of a set is not compared (the host has no
/// create-if-absent), so two VMs adding at that moment may lose one item; it is added again
/// at its next sighting (the next 401 that names it).
fn add_to_set<S: SharedSet>(key: &str, item: &S::Item) -> bool {
    for _ in 0..3 {
        let (mut set, cas) = read_set::<S>(key);
        if !set.insert(item) {
            return false;
        }
        match hostcalls::set_shared_data(key, Some(set.encode().as_bytes()), cas) {
            Ok(()) => return true,
            Err(Status::CasMismatch) => continue,
            Err(e) => {
                warn!("cannot update shared data {key}: {e:?}");
                return false;
            }
        }
    }
    false
}

/// Adds `realm` to `registry`'s issued realms (bounded).
pub fn add_issued_realm(registry: &str, realm: &RealmUrl) {
    add_to_set::<IssuedRealms>(&realms::key(registry), realm);
}

/// Records `host` as a token host of `registry` (bounded).
pub fn record_token_host(registry: &str, host: &str) {
    if add_to_set::<TokenHosts>(&token_host::key(registry), host) {
        info!("{host} challenges with the realm of {registry}: its tokens now pass there");
    }
}

/// What this Envoy learned, read from shared data when routing asks.
pub struct SharedLearned;

impl Learned for SharedLearned {
    fn is_token_host(&self, registry: &str, host: &str) -> bool {
        read_set::<TokenHosts>(&token_host::key(registry))
            .0
            .contains(host)
    }

    fn is_issued_realm(&self, registry: &str, authority: &str, path: &str) -> bool {
        read_set::<IssuedRealms>(&realms::key(registry)).0.issued(
            || stored_realm(registry),
            authority,
            path,
        )
    }
}

/// The realm this VM last stored (or found stored) per registry, so that a registry's own
/// challenge (on every 401) costs no shared-data round trip when it did not change. One
/// entry per configured registry at most: only routed registries' names reach it.
#[derive(Default)]
pub struct SeenRealms {
    seen: Cell<Vec<(String, LearnedRealm)>>,
}

impl SeenRealms {
    /// [`store_realm`] unless this VM already stored or found this very value for
    /// `registry`. False when skipped.
    pub fn store(&self, registry: &str, learned: &LearnedRealm) -> bool {
        let mut seen = self.seen.take();
        let changed = match seen.iter_mut().find(|(r, _)| r == registry) {
            Some((_, l)) if l == learned => false,
            Some((_, l)) => {
                l.clone_from(learned);
                true
            }
            None => {
                seen.push((registry.to_string(), learned.clone()));
                true
            }
        };
        self.seen.set(seen);
        if changed {
            store_realm(registry, learned);
        }
        changed
    }
}
