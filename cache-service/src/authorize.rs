//! Clients authorized against the upstream with their own credentials
//! (`client_auth = "upstream"`): before anything of a repository is served, the client's
//! `Authorization` is tried at the upstream on the very resource it asked for, and an
//! allowed decision is reused for a short time; and the token relay, through which clients
//! log in at the upstream's own realm by way of the mirror.
//!
//! Why a request for the resource itself and not a `/v2/` ping: a valid token at `/v2/` only
//! proves the token is valid, not that it grants pull on this repository, and a registry's
//! token scopes are opaque (Docker Hub, GCR and distribution each encode them their own way).
//! The upstream answering the resource is the only statement of access that holds for every
//! registry. Manifests and blobs get a `HEAD` (not counted as a pull by Docker Hub), a tags
//! list or referrers request a `GET /v2/<repo>/tags/list?n=1`, the base `/v2/` a `GET /v2/`.
//!
//! Denials are not remembered: a refused client costs one upstream request each time, which
//! a client that was just refused rarely repeats (it logs in first), and a cached denial
//! would keep refusing a client whose access was just granted. Identical checks in progress
//! at once (a fleet's nodes pulling one image with one pull secret) are one request, whose
//! answer, allowed or not, they all get.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use sha2::Digest as _;
use url::Url;

use crate::cache::single_flight::{Outcome, Role, SingleFlight};
use crate::lock;
use crate::metrics::{Family, Metrics};
use crate::upstream::auth::MAX_TOKEN_RESPONSE_BYTES;
use crate::upstream::client::{bearer_challenge, host_key, ClientCredential, Credential};
use crate::upstream::{head_unsupported, read_body, redirect_target, Upstream};
use registry_rules::digest::Digest;
use registry_rules::names::{Reference, RepositoryName};
use registry_rules::oci_error::ErrorCode;
use registry_rules::realms::RealmUrl;

/// Allowed decisions kept per upstream; expired ones go first, then those expiring soonest.
pub const MAX_DECISIONS: usize = 16_384;
/// A relayed token service answer is read up to this size (the cache's own limit).
pub const MAX_RELAY_BYTES: usize = MAX_TOKEN_RESPONSE_BYTES;
/// A realm that does not match is learned again from the upstream at most this often, so
/// requests for made-up realms do not each cost an upstream request.
const REALM_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// SHA-256 of a client's whole `Authorization` value (of nothing for an anonymous client):
/// what a decision is remembered under. The credential itself is never kept in a decision,
/// written anywhere or logged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(credential: Option<&ClientCredential>) -> Self {
        let bytes = credential.map_or(&[][..], |c| c.header().as_bytes());
        Self(sha2::Sha256::digest(bytes).into())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

/// (credential, repository; `None` for the base `/v2/`) of one upstream.
type DecisionKey = (Fingerprint, Option<RepositoryName>);

/// One check of one credential: the same request to the upstream, so the same answer.
type CheckKey = (Fingerprint, Method, String);

/// Allowed decisions, each until it expires; bounded by [`MAX_DECISIONS`].
#[derive(Debug, Default)]
struct Decisions {
    map: HashMap<DecisionKey, Instant>,
}

impl Decisions {
    fn allowed(&self, key: &DecisionKey, now: Instant) -> bool {
        self.map.get(key).is_some_and(|until| now < *until)
    }

    fn allow(&mut self, key: DecisionKey, until: Instant, now: Instant) {
        if !self.map.contains_key(&key) && self.map.len() >= MAX_DECISIONS {
            self.map.retain(|_, u| *u > now);
            while self.map.len() >= MAX_DECISIONS {
                let soonest = self.map.iter().min_by_key(|(_, u)| **u);
                let Some(k) = soonest.map(|(k, _)| k.clone()) else {
                    break;
                };
                self.map.remove(&k);
            }
        }
        self.map.insert(key, until);
    }
}

/// The realm (and service) the upstream's own challenge names, and when it was last asked.
#[derive(Debug, Default)]
struct RealmState {
    realm: Option<(Url, Option<String>)>,
    refreshed: Option<Instant>,
}

/// One upstream's authorization state: decisions and the realm its challenges name. Built
/// with the upstream's client, so a changed upstream starts with none.
#[derive(Debug, Default)]
pub struct Access {
    decisions: Mutex<Decisions>,
    realm: Mutex<RealmState>,
    /// Checks in progress (at most `single_flight::MAX_CALLS`).
    checks: SingleFlight<CheckKey, Outcome<Result<(), Refusal>>>,
}

impl Access {
    /// Decisions held (expired ones included until they are pushed out).
    pub fn decisions(&self) -> usize {
        lock(&self.decisions).map.len()
    }

    /// Remember the realm of a 401's Bearer challenge, if the upstream may send the cache
    /// (and so a client's credential) there.
    fn learn(&self, up: &Upstream, resp: &reqwest::Response) {
        let Some(bearer) = bearer_challenge(resp) else {
            return;
        };
        let Ok(url) = Url::parse(&bearer.realm) else {
            return;
        };
        if up.client.check_realm(&url).is_ok() {
            let service = bearer.service.filter(|s| !s.is_empty());
            lock(&self.realm).realm = Some((url, service));
        }
    }

    /// The learned realm and service, if the realm is `requested` (any for [`Realm::Own`]).
    fn issued(&self, requested: Realm<'_>) -> Option<(Url, Option<String>)> {
        lock(&self.realm)
            .realm
            .clone()
            .filter(|(u, _)| match requested {
                Realm::Named(r) => RealmUrl::from_realm(u.as_str()).as_ref() == Some(r),
                Realm::Own => true,
            })
    }
}

/// What the authorization check asks the upstream for one request.
#[derive(Debug, Clone)]
pub struct Check {
    repository: Option<RepositoryName>,
    method: Method,
    path_and_query: String,
    accept: Option<&'static str>,
    /// The client's error when the upstream does not know the resource.
    not_found: ErrorCode,
}

impl Check {
    /// `/v2/`: the credential's validity only (nothing of a repository is served on it).
    pub fn base() -> Self {
        Self {
            repository: None,
            method: Method::GET,
            path_and_query: "/v2/".into(),
            accept: None,
            not_found: ErrorCode::NameUnknown,
        }
    }

    pub fn manifest(name: &RepositoryName, reference: &Reference) -> Self {
        Self {
            repository: Some(name.clone()),
            method: Method::HEAD,
            path_and_query: format!("/v2/{name}/manifests/{reference}"),
            accept: Some(crate::oci::MANIFEST_ACCEPT),
            not_found: ErrorCode::ManifestUnknown,
        }
    }

    pub fn blob(name: &RepositoryName, digest: &Digest) -> Self {
        Self {
            repository: Some(name.clone()),
            method: Method::HEAD,
            path_and_query: format!("/v2/{name}/blobs/{digest}"),
            accept: None,
            not_found: ErrorCode::BlobUnknown,
        }
    }

    /// Tags lists and referrers: pull access to the repository, shown by its first tag.
    pub fn repository(name: &RepositoryName) -> Self {
        Self {
            repository: Some(name.clone()),
            method: Method::GET,
            path_and_query: format!("/v2/{name}/tags/list?n=1"),
            accept: None,
            not_found: ErrorCode::NameUnknown,
        }
    }
}

/// Why a client is not served; rendered as an OCI error by the http layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// 401 from the upstream: its challenges go to the client, which logs in and retries.
    #[error("the upstream requires authentication for this repository")]
    Unauthorized { challenges: Vec<String> },
    /// 403 from the upstream.
    #[error("the upstream denied this client access to the repository")]
    Denied { challenges: Vec<String> },
    /// 404 from the upstream: nothing to serve, nothing decided.
    #[error("unknown to the upstream")]
    NotFound(ErrorCode),
    #[error("the upstream's rate limit was reached while authorizing")]
    TooManyRequests { retry_after: Option<String> },
    /// The upstream could not be asked (down, 5xx, an answer that decides nothing) and no
    /// decision for this client is held.
    #[error("the upstream could not authorize this client: {0}")]
    Unavailable(String),
}

fn header_values(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> Vec<String> {
    resp.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect()
}

/// Authorize a client for `check` at `up`: a decision held for its credential and repository,
/// else the upstream asked with the client's `Authorization` verbatim (none: anonymously).
/// Returns the access content is then fetched with: the cache's login when it has one
/// (`cache_login`), else the client's own credential.
pub async fn authorize(
    up: &Arc<Upstream>,
    ttl: Duration,
    cache_login: bool,
    check: &Check,
    client: Option<ClientCredential>,
    metrics: &Metrics,
) -> Result<Credential, Refusal> {
    let fingerprint = Fingerprint::of(client.as_ref());
    let key = (fingerprint, check.repository.clone());
    let fetch_with = match (&client, cache_login) {
        (Some(c), false) => Credential::Client(c.clone()),
        _ => Credential::Cache,
    };
    if lock(&up.access.decisions).allowed(&key, Instant::now()) {
        metrics.count(Family::AuthorizationCacheHits, &up.name, "");
        return Ok(fetch_with);
    }
    let flight = (
        fingerprint,
        check.method.clone(),
        check.path_and_query.clone(),
    );
    let (asked, role) = up
        .access
        .checks
        .run(flight, || {
            let (up, check) = (up.clone(), check.clone());
            async move { Ok(ask(&up, &check, client.as_ref()).await) }
        })
        .await;
    let r = asked.unwrap_or_else(|e| Err(Refusal::Unavailable(e.to_string())));
    if role == Role::Leader {
        let result = match &r {
            Ok(()) => "allowed",
            Err(Refusal::Unauthorized { .. } | Refusal::Denied { .. }) => "denied",
            Err(Refusal::NotFound(_)) => "not_found",
            Err(Refusal::TooManyRequests { .. } | Refusal::Unavailable(_)) => "unavailable",
        };
        metrics.count(Family::AuthorizationChecks, &up.name, result);
    }
    r?;
    let now = Instant::now();
    let until = now.checked_add(ttl).unwrap_or(now);
    lock(&up.access.decisions).allow(key, until, now);
    Ok(fetch_with)
}

/// Drop the decision held for `client` on `check`'s repository: fetching with that credential
/// was refused since (an expired or revoked token), so the next authorization asks again.
pub fn forget(up: &Upstream, check: &Check, client: Option<&ClientCredential>) {
    let key = (Fingerprint::of(client), check.repository.clone());
    lock(&up.access.decisions).map.remove(&key);
}

/// The check itself: one request, no challenge answered, no redirect followed. A 3xx to
/// where the cache itself would follow it (the upstream's host, its redirect hosts) is the
/// registry deciding to serve it, as Docker Hub sends an authorized blob to its CDN; any
/// other (a login proxy sending the request to its sign-in page) decides nothing. The
/// credential never goes to the redirect's target.
async fn ask(
    up: &Upstream,
    check: &Check,
    client: Option<&ClientCredential>,
) -> Result<(), Refusal> {
    let url = up
        .base_url()
        .join(&check.path_and_query)
        .map_err(|e| Refusal::Unavailable(e.to_string()))?;
    let unavailable = |e: crate::upstream::UpstreamError| Refusal::Unavailable(e.to_string());
    let mut resp = up
        .send_as_client(check.method.clone(), url.clone(), check.accept, client)
        .await
        .map_err(unavailable)?;
    if check.method == Method::HEAD && head_unsupported(resp.status()) {
        // No HEAD upstream: a GET's status says the same; its body is never read.
        resp = up
            .send_as_client(Method::GET, url, check.accept, client)
            .await
            .map_err(unavailable)?;
    }
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    if status.is_redirection() {
        let from = resp.url().clone();
        return match redirect_target(&from, &resp, &mut 0) {
            Ok(Some(to)) if up.client.check_redirect(&from, &to).is_ok() => Ok(()),
            _ => Err(Refusal::Unavailable(format!(
                "the upstream answered the authorization check with HTTP {status} to a location it does not serve from"
            ))),
        };
    }
    Err(match status {
        StatusCode::UNAUTHORIZED => {
            up.access.learn(up, &resp);
            Refusal::Unauthorized {
                challenges: header_values(&resp, WWW_AUTHENTICATE),
            }
        }
        StatusCode::FORBIDDEN => Refusal::Denied {
            challenges: header_values(&resp, WWW_AUTHENTICATE),
        },
        StatusCode::NOT_FOUND => Refusal::NotFound(check.not_found),
        StatusCode::TOO_MANY_REQUESTS => Refusal::TooManyRequests {
            retry_after: header_values(&resp, RETRY_AFTER).into_iter().next(),
        },
        s => Refusal::Unavailable(format!("HTTP {s}")),
    })
}

/// A token service's answer, relayed to the client.
#[derive(Debug, Clone)]
pub struct RelayAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub challenges: Vec<String>,
    pub body: Bytes,
}

/// The realm a client's token request is for.
#[derive(Debug, Clone, Copy)]
pub enum Realm<'a> {
    /// `/_mirror/auth/<authority><path>`: relayed only if it is the upstream's own realm, with
    /// the client's query as it is.
    Named(&'a RealmUrl),
    /// `/_mirror/token`: the client asked another registry's realm (on the shared host it
    /// pings first, the default registry's); relayed to the upstream's own realm, with that
    /// realm's `service` instead of the one the client had.
    Own,
}

/// Why a token request is not relayed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    #[error("{0} is not the token realm this registry's challenges name")]
    NotIssued(String),
    #[error("the upstream's challenges name no token realm the cache may use")]
    NoRealm,
    #[error("the realm {0} is plain http on another host than the upstream's: no client credential goes there")]
    Insecure(String),
    #[error("the token service could not be reached: {0}")]
    Unavailable(String),
    #[error("the token service's answer is larger than {MAX_RELAY_BYTES} bytes")]
    TooLarge,
}

/// Relay a client's token request for `requested` (`/_mirror/auth/<authority><path>`) to
/// the upstream's realm, only if that is the realm the upstream's own challenge names (asked
/// again, anonymously, when it does not match and was not asked lately). The client's
/// `Authorization` goes verbatim to that realm and nowhere else; a plain-http realm gets it
/// only on the upstream's own (plain-http) host.
pub async fn relay(
    up: &Upstream,
    requested: Realm<'_>,
    query: Option<&str>,
    client: Option<&ClientCredential>,
    metrics: &Metrics,
) -> Result<RelayAnswer, RelayError> {
    let r = relay_inner(up, requested, query, client).await;
    let status = match &r {
        Ok(a) => match a.status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
        Err(RelayError::NotIssued(_) | RelayError::NoRealm | RelayError::Insecure(_)) => "refused",
        Err(RelayError::Unavailable(_) | RelayError::TooLarge) => "unavailable",
    };
    metrics.count(Family::TokenRelays, &up.name, status);
    r
}

async fn relay_inner(
    up: &Upstream,
    requested: Realm<'_>,
    query: Option<&str>,
    client: Option<&ClientCredential>,
) -> Result<RelayAnswer, RelayError> {
    let refused = || match requested {
        Realm::Named(r) => RelayError::NotIssued(format!("{}{}", r.authority, r.path)),
        Realm::Own => RelayError::NoRealm,
    };
    let (realm, service) = match up.access.issued(requested) {
        Some(r) => r,
        None => {
            refresh_realm(up).await;
            up.access.issued(requested).ok_or_else(refused)?
        }
    };
    let secure = realm.scheme() == "https" || host_key(&realm) == host_key(up.base_url());
    if !secure {
        return Err(RelayError::Insecure(realm.to_string()));
    }
    let mut url = realm;
    match requested {
        Realm::Named(_) => url.set_query(query.filter(|q| !q.is_empty())),
        Realm::Own => {
            let client_pairs: Vec<(String, String)> = query
                .map(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default();
            let mut pairs = url.query_pairs_mut();
            if let Some(s) = &service {
                pairs.append_pair("service", s);
            }
            for (k, v) in client_pairs.iter().filter(|(k, _)| k != "service") {
                pairs.append_pair(k, v);
            }
        }
    }
    let resp = up
        .send_as_client(Method::GET, url, None, client)
        .await
        .map_err(|e| RelayError::Unavailable(e.to_string()))?;
    let status = resp.status().as_u16();
    let content_type = header_values(&resp, CONTENT_TYPE).into_iter().next();
    let challenges = header_values(&resp, WWW_AUTHENTICATE);
    let body = read_body(resp, MAX_RELAY_BYTES)
        .await
        .map_err(|e| match e {
            crate::upstream::BodyError::TooLarge(_) => RelayError::TooLarge,
            crate::upstream::BodyError::Read(r) => RelayError::Unavailable(r),
        })?;
    Ok(RelayAnswer {
        status,
        content_type,
        challenges,
        body,
    })
}

/// Ask the upstream anonymously for its challenge (`GET /v2/`), at most once per
/// [`REALM_REFRESH_INTERVAL`].
async fn refresh_realm(up: &Upstream) {
    {
        let mut r = lock(&up.access.realm);
        let now = Instant::now();
        if r.refreshed
            .is_some_and(|at| now.saturating_duration_since(at) < REALM_REFRESH_INTERVAL)
        {
            return;
        }
        r.refreshed = Some(now);
    }
    let Ok(url) = up.base_url().join("/v2/") else {
        return;
    };
    if let Ok(resp) = up.send_as_client(Method::GET, url, None, None).await {
        if resp.status() == StatusCode::UNAUTHORIZED {
            up.access.learn(up, &resp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> DecisionKey {
        (
            Fingerprint([0; 32]),
            Some(RepositoryName::parse(&format!("r/{i}")).unwrap()),
        )
    }

    #[test]
    fn decisions_expire_and_stay_bounded() {
        let mut d = Decisions::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        d.allow(key(0), t0 + s(60), t0);
        assert!(d.allowed(&key(0), t0 + s(59)));
        assert!(!d.allowed(&key(0), t0 + s(60)), "expired");
        assert!(!d.allowed(&key(1), t0), "another repository");
        let other = (Fingerprint::of(None), key(0).1);
        assert!(!d.allowed(&other, t0), "another credential");

        for i in 1..MAX_DECISIONS + 100 {
            d.allow(key(i), t0 + s(100 + i as u64), t0);
            assert!(d.map.len() <= MAX_DECISIONS);
        }
        assert!(d.allowed(&key(MAX_DECISIONS + 99), t0), "the newest kept");
        assert!(!d.allowed(&key(1), t0), "the soonest to expire went first");
        // Once they expire, a new decision pushes the expired ones out, not live ones.
        let later = t0 + s(100_000);
        d.allow(key(0), later + s(60), later);
        assert_eq!(d.map.len(), 1);
    }

    #[test]
    fn fingerprints_tell_credentials_apart_and_hide_them() {
        let c = |v: &str| {
            ClientCredential::from_header(Some(&reqwest::header::HeaderValue::from_str(v).unwrap()))
        };
        let alice = c("Bearer alice-token");
        assert_ne!(
            Fingerprint::of(alice.as_ref()),
            Fingerprint::of(c("Bearer bob-token").as_ref())
        );
        assert_eq!(
            Fingerprint::of(alice.as_ref()),
            Fingerprint::of(c("Bearer alice-token").as_ref())
        );
        assert!(c("  ").is_none(), "a blank Authorization is none");
        assert_eq!(
            format!("{:?} {:?}", Fingerprint::of(alice.as_ref()), alice),
            "Fingerprint(..) Some(ClientCredential(..))"
        );
    }
}
