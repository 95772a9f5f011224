//! Live reconfiguration: on SIGHUP, and when the config file changes (polled), the file is
//! read again, merged under the same flags and, if valid, put in force without a restart.
//! Running state survives: the store, the LRU, the single-flight maps and every unchanged
//! upstream's client (with its token cache). Requests and downloads already running keep
//! the upstream they started with, even one the new file removes. An invalid file, or one
//! that changes what only a restart can (`listen`, the store settings), is logged and refused: the
//! running configuration stays in force, all of it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use sha2::Digest as _;

use crate::cache::{self, Cache, Limits};
use crate::config::{self, Config, ConfigError, ServeArgs};
use crate::store::object::BucketSettings;
use crate::store::Location;
use crate::upstream::{Upstream, UpstreamError};

/// How often the config file's modification time and length are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The configuration in force: a serial (1 at start, +1 per reload put in force) and a short
/// hash of the file's content (`flags` without a file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigVersion {
    pub serial: u64,
    pub hash: String,
}

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.serial, self.hash)
    }
}

/// First 12 hex digits of the SHA-256 of the file: enough to tell versions apart in logs.
pub fn content_hash(text: &str) -> String {
    let d = sha2::Sha256::digest(text.as_bytes());
    hex::encode(d.get(..6).unwrap_or_default())
}

fn version_hash(text: Option<&str>) -> String {
    text.map_or_else(|| "flags".to_owned(), content_hash)
}

/// A configuration and its version.
#[derive(Debug)]
pub struct Live {
    pub config: Config,
    pub version: ConfigVersion,
}

/// What `/readyz`, the status page and the client-token check read; swapped whole.
#[derive(Debug)]
pub struct ConfigState {
    live: RwLock<Arc<Live>>,
    /// Why the last reload was refused, until one is put in force.
    refusal: Mutex<Option<String>>,
}

impl ConfigState {
    /// The configuration loaded at start (`text`: the file's content, if any).
    pub fn new(config: Config, text: Option<&str>) -> Self {
        Self {
            live: RwLock::new(Arc::new(Live {
                config,
                version: ConfigVersion {
                    serial: 1,
                    hash: version_hash(text),
                },
            })),
            refusal: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(&self, live: Live) {
        match self.live.write() {
            Ok(mut g) => *g = Arc::new(live),
            Err(p) => *p.into_inner() = Arc::new(live),
        }
        self.clear_refusal();
    }

    fn clear_refusal(&self) {
        *crate::lock(&self.refusal) = None;
    }

    fn refuse(&self, why: String) {
        *crate::lock(&self.refusal) = Some(why);
    }

    /// Why the last reload was refused (cleared by the next one put in force).
    pub fn refusal(&self) -> Option<String> {
        crate::lock(&self.refusal).clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{field} cannot change while running ({running} in force, {file} in the file): restart regmirror to apply it")]
    RestartNeeded {
        field: &'static str,
        running: String,
        file: String,
    },
    #[error("upstream {name:?}: {source}")]
    Upstream { name: String, source: UpstreamError },
}

/// What a reload changes, by upstream name and setting.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Anything of theirs differs (URL, CA, credentials, hosts, client authorization): a new
    /// client (with no authorization decisions).
    pub changed: Vec<String>,
    pub settings: Vec<&'static str>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.settings.is_empty()
    }
}

/// The decision of a reload from `old` (in force) to `new` (just loaded): what changes, or
/// why it is refused.
pub fn plan(old: &Config, new: &Config) -> Result<Plan, ReloadError> {
    // The socket is bound and the store open: moving either is a restart, and applying the
    // rest while those stay old would make the version shown lie about what runs.
    if old.listen != new.listen {
        return Err(ReloadError::RestartNeeded {
            field: "listen",
            running: old.listen.to_string(),
            file: new.listen.to_string(),
        });
    }
    if let Some((field, running, file)) = storage_change(&old.storage, &new.storage) {
        return Err(ReloadError::RestartNeeded {
            field,
            running,
            file,
        });
    }
    let mut p = Plan::default();
    for (name, u) in &new.upstreams {
        match old.upstreams.get(name) {
            None => p.added.push(name.clone()),
            Some(o) if o != u => p.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    p.removed = old
        .upstreams
        .keys()
        .filter(|n| !new.upstreams.contains_key(*n))
        .cloned()
        .collect();
    let settings: [(&'static str, bool); 5] = [
        ("max_size", old.max_size != new.max_size),
        ("tag_ttl_seconds", old.tag_ttl != new.tag_ttl),
        (
            "shutdown_grace_seconds",
            old.shutdown_grace != new.shutdown_grace,
        ),
        ("max_blob_size", old.max_blob_size != new.max_blob_size),
        (
            "max_pass_through_memory",
            old.max_pass_through_memory != new.max_pass_through_memory,
        ),
    ];
    p.settings = settings
        .into_iter()
        .filter_map(|(n, changed)| changed.then_some(n))
        .collect();
    Ok(p)
}

/// The first `cache.toml` setting in which two stores differ, with both values as the file
/// writes them (a bucket's URL is the same when only, say, its local tier changed).
fn storage_change(old: &Location, new: &Location) -> Option<(&'static str, String, String)> {
    let (a, b) = match (old, new) {
        (Location::Bucket(a), Location::Bucket(b)) => (a, b),
        _ => {
            return (old != new).then(|| ("storage", old.to_string(), new.to_string()));
        }
    };
    let redirect_endpoint =
        |s: &BucketSettings| s.redirect.as_ref().and_then(|r| r.endpoint.clone());
    let redirect_ttl = |s: &BucketSettings| s.redirect.as_ref().map(|r| r.ttl.as_secs());
    let fields: [(&'static str, String, String); 8] = [
        ("storage", a.to_string(), b.to_string()),
        ("s3_endpoint", shown(&a.endpoint), shown(&b.endpoint)),
        ("s3_region", shown(&a.region), shown(&b.region)),
        (
            "spool_dir",
            a.spool_dir.display().to_string(),
            b.spool_dir.display().to_string(),
        ),
        (
            "local_cache_size",
            a.local_cache_size.to_string(),
            b.local_cache_size.to_string(),
        ),
        (
            "redirect",
            a.redirect.is_some().to_string(),
            b.redirect.is_some().to_string(),
        ),
        (
            "redirect_endpoint",
            shown(&redirect_endpoint(a)),
            shown(&redirect_endpoint(b)),
        ),
        (
            "redirect_ttl_seconds",
            shown(&redirect_ttl(a)),
            shown(&redirect_ttl(b)),
        ),
    ];
    let named = fields.into_iter().find(|(_, x, y)| x != y);
    // Every field of the settings is listed above; this catches one added without a name.
    named.or_else(|| (a != b).then(|| ("storage", a.to_string(), b.to_string())))
}

/// An optional setting as an operator reads it.
fn shown<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "unset".to_string(), T::to_string)
}

pub fn limits(c: &Config) -> Limits {
    Limits {
        max_size: c.max_size,
        max_blob_size: c.max_blob_size,
        max_pass_through_memory: c.max_pass_through_memory,
    }
}

/// The clients of `new`'s upstreams: an unchanged upstream keeps its running client (and its
/// tokens), an added or changed one gets a new client.
pub fn build_upstreams(
    old: &Config,
    running: &cache::Upstreams,
    new: &Config,
) -> Result<cache::Upstreams, ReloadError> {
    let mut out = BTreeMap::new();
    for (name, u) in &new.upstreams {
        let kept = (old.upstreams.get(name) == Some(u))
            .then(|| running.get(name).cloned())
            .flatten();
        let client = match kept {
            Some(c) => c,
            None => Arc::new(Upstream::new(u, Some(new.listen)).map_err(|source| {
                ReloadError::Upstream {
                    name: name.clone(),
                    source,
                }
            })?),
        };
        out.insert(name.clone(), client);
    }
    Ok(out)
}

/// What the poller last saw of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    modified: Option<SystemTime>,
    len: u64,
}

fn seen(path: &Path) -> Option<Seen> {
    let m = std::fs::metadata(path).ok()?;
    Some(Seen {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

/// Reloads on SIGHUP and on file changes for the life of the process.
pub struct Reloader {
    args: ServeArgs,
    cache: Arc<Cache>,
    state: Arc<ConfigState>,
    last_seen: Option<Seen>,
    /// Hash of the file content last read, valid or not: a broken file is reported once.
    last_hash: String,
}

impl Reloader {
    pub fn new(args: ServeArgs, cache: Arc<Cache>, state: Arc<ConfigState>) -> Self {
        let last_seen = args.config.as_deref().and_then(seen);
        let last_hash = state.current().version.hash.clone();
        Self {
            args,
            cache,
            state,
            last_seen,
            last_hash,
        }
    }

    /// Runs until the process ends. `hup` is installed by the caller before the socket is
    /// bound, so a SIGHUP never meets the default action (terminate).
    pub async fn run(mut self, mut hup: tokio::signal::unix::Signal) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = hup.recv() => self.reload("SIGHUP"),
                _ = tick.tick() => self.poll(),
            }
        }
    }

    fn poll(&mut self) {
        let Some(path) = self.args.config.clone() else {
            return;
        };
        let now = seen(&path);
        if now == self.last_seen {
            return;
        }
        self.last_seen = now;
        // A touch without a content change is not a reload.
        match config::read_file(&path) {
            Ok(text) if content_hash(&text) == self.last_hash => {}
            _ => self.reload("config file changed"),
        }
    }

    /// Reads the file and puts it in force, or logs why not and keeps the running config.
    pub fn reload(&mut self, trigger: &'static str) {
        let started = Instant::now();
        match self.try_reload() {
            Ok(None) => {
                // The file says what is in force again: an earlier refusal no longer stands.
                self.state.clear_refusal();
                tracing::info!(trigger, "configuration unchanged");
            }
            Ok(Some((version, plan))) => {
                crate::metrics::Metrics::inc(&self.cache.metrics.config_reloads);
                tracing::info!(
                    trigger,
                    %version,
                    added = ?plan.added,
                    removed = ?plan.removed,
                    changed = ?plan.changed,
                    settings = ?plan.settings,
                    apply_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "configuration reloaded"
                );
            }
            Err(e) => {
                self.cache
                    .metrics
                    .config_reload_failures
                    .fetch_add(1, Relaxed);
                let running = self.state.current().version.clone();
                tracing::error!(trigger, error = %e, %running, "configuration reload refused; the running configuration stays in force");
                self.state.refuse(e.to_string());
            }
        }
    }

    fn try_reload(&mut self) -> Result<Option<(ConfigVersion, Plan)>, ReloadError> {
        let env = |k: &str| std::env::var(k).ok();
        let (new, text) = match &self.args.config {
            Some(path) => {
                let text = config::read_file(path)?;
                self.last_hash = content_hash(&text);
                (
                    Config::from_text(&self.args, path, &text, &env)?,
                    Some(text),
                )
            }
            // Flags only: secrets from the environment or password files may still change.
            None => Config::load(&self.args, &env)?,
        };
        let live = self.state.current();
        let plan = plan(&live.config, &new)?;
        let hash = version_hash(text.as_deref());
        if plan.is_empty() && hash == live.version.hash {
            return Ok(None);
        }
        let ups = build_upstreams(&live.config, &self.cache.upstreams(), &new)?;
        let (tag_ttl, limits) = (new.tag_ttl, limits(&new));
        let version = ConfigVersion {
            serial: live.version.serial + 1,
            hash,
        };
        // Client authorization first, upstreams second: in between, an added or changed
        // upstream is unknown (404) or already authorized as the new file says, never served
        // without it. The new version shows once all of it is in force.
        self.state.set(Live {
            config: new.clone(),
            version: live.version.clone(),
        });
        self.cache.reconfigure(ups, tag_ttl, limits);
        self.state.set(Live {
            config: new,
            version: version.clone(),
        });
        Ok(Some((version, plan)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn cfg(text: &str) -> Config {
        let file: FileConfig = toml::from_str(text).unwrap();
        let env = |k: &str| match k {
            "PW" => Some("one".to_owned()),
            "PW2" => Some("two".to_owned()),
            _ => None,
        };
        Config::merge(&ServeArgs::default(), file, &env).unwrap()
    }

    const BASE: &str = r#"
listen = "127.0.0.1:5001"
storage = "/var/lib/regmirror"
tag_ttl_seconds = 300
[[upstream]]
name = "a"
url = "https://a.example"
[[upstream]]
name = "b"
url = "https://b.example"
username = "u"
password_env = "PW"
client_auth = "anonymous"
"#;

    #[test]
    fn a_plan_names_what_changes() {
        let old = cfg(BASE);
        assert!(plan(&old, &cfg(BASE)).unwrap().is_empty());

        let new = BASE
            .replace("https://a.example", "https://a2.example")
            .replace("password_env = \"PW\"", "password_env = \"PW2\"")
            .replace(
                "tag_ttl_seconds = 300",
                "tag_ttl_seconds = 5\nmax_size = \"1GiB\"",
            )
            + "[[upstream]]\nname = \"c\"\nurl = \"https://c.example\"\n";
        let p = plan(&old, &cfg(&new)).unwrap();
        assert_eq!(p.added, ["c"]);
        assert_eq!(p.changed, ["a", "b"], "URL and credentials are changes");
        assert!(p.removed.is_empty());
        assert_eq!(p.settings, ["max_size", "tag_ttl_seconds"]);

        // Who may read b, and for how long a decision holds: a new client, no decisions kept.
        let mode = |m: &str| cfg(&BASE.replace("client_auth = \"anonymous\"", m));
        let upstream = mode("client_auth = \"upstream\"");
        assert_eq!(plan(&old, &upstream).unwrap().changed, ["b"]);
        let shorter = mode("client_auth = \"upstream\"\nauthorization_ttl_seconds = 5");
        assert_eq!(plan(&upstream, &shorter).unwrap().changed, ["b"]);

        let only_a = BASE.split("[[upstream]]\nname = \"b\"").next().unwrap();
        let p = plan(&old, &cfg(only_a)).unwrap();
        assert_eq!(p.removed, ["b"]);
        assert!(p.added.is_empty() && p.changed.is_empty() && p.settings.is_empty());
    }

    #[test]
    fn listen_and_storage_need_a_restart() {
        let old = cfg(BASE);
        for (from, to, field) in [
            ("127.0.0.1:5001", "127.0.0.1:5002", "listen"),
            ("/var/lib/regmirror", "/srv/regmirror", "storage"),
        ] {
            let e = plan(&old, &cfg(&BASE.replace(from, to))).unwrap_err();
            assert!(
                matches!(e, ReloadError::RestartNeeded { field: f, .. } if f == field),
                "{e}"
            );
            assert!(e.to_string().contains("restart"), "{e}");
        }
    }

    #[test]
    fn a_bucket_setting_that_needs_a_restart_is_named() {
        let bucket = BASE.replace("/var/lib/regmirror", "s3://cache/mirror");
        let with = |extra: &str| {
            cfg(&bucket.replace("tag_ttl_seconds", &format!("{extra}\ntag_ttl_seconds")))
        };
        let old = with("local_cache_size = \"1GiB\"");
        for (file, field, said) in [
            (
                "local_cache_size = \"2GiB\"",
                "local_cache_size",
                "1073741824 in force, 2147483648 in the file",
            ),
            (
                "local_cache_size = \"1GiB\"\ns3_region = \"eu-1\"",
                "s3_region",
                "unset in force, eu-1 in the file",
            ),
            (
                "local_cache_size = \"1GiB\"\nspool_dir = \"/srv/spool\"",
                "spool_dir",
                "/srv/spool in the file",
            ),
        ] {
            let e = plan(&old, &with(file)).unwrap_err();
            assert!(
                matches!(e, ReloadError::RestartNeeded { field: f, .. } if f == field),
                "{file}: {e}"
            );
            assert!(
                e.to_string().starts_with(field) && e.to_string().contains(said),
                "{e}"
            );
        }
        let redirect = with("redirect = true\nredirect_ttl_seconds = 60");
        let e = plan(
            &redirect,
            &with("redirect = true\nredirect_ttl_seconds = 90"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "redirect_ttl_seconds cannot change while running (60 in force, 90 in the file): restart regmirror to apply it"
        );
        let e = plan(&old, &with("")).unwrap_err();
        assert!(e.to_string().starts_with("local_cache_size"), "{e}");
        let e = plan(
            &old,
            &cfg(&bucket.replace("s3://cache/mirror", "s3://cache/other")),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("s3://cache/mirror in force, s3://cache/other in the file"),
            "{e}"
        );
    }

    #[test]
    fn unchanged_upstreams_keep_their_client_and_changed_ones_get_a_new_one() {
        let old = cfg(BASE);
        let running: cache::Upstreams = old
            .upstreams
            .iter()
            .map(|(n, u)| (n.clone(), Arc::new(Upstream::new(u, None).unwrap())))
            .collect();
        let new = cfg(&(BASE.replace("https://a.example", "https://a2.example")
            + "[[upstream]]\nname = \"c\"\nurl = \"https://c.example\"\n"));
        let built = build_upstreams(&old, &running, &new).unwrap();
        assert!(
            Arc::ptr_eq(&built["b"], &running["b"]),
            "b kept (tokens too)"
        );
        assert!(
            !Arc::ptr_eq(&built["a"], &running["a"]),
            "a changed: new client"
        );
        assert_eq!(built["a"].base_url().as_str(), "https://a2.example/");
        assert!(built.contains_key("c"));

        let only_b = cfg(&BASE.replace(
            "[[upstream]]\nname = \"a\"\nurl = \"https://a.example\"\n",
            "",
        ));
        let built = build_upstreams(&old, &running, &only_b).unwrap();
        assert_eq!(built.keys().collect::<Vec<_>>(), ["b"], "a removed");
    }

    /// A cache on a temp store with `text` as its config file, and its reloader.
    fn running(dir: &Path, text: &str) -> (Arc<Cache>, Arc<ConfigState>, Reloader) {
        let path = dir.join("cache.toml");
        let text = text.replace("/var/lib/regmirror", &dir.join("s").display().to_string());
        std::fs::write(&path, &text).unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let (c, t) = Config::load(&args, &|_| None).unwrap();
        let ups = build_upstreams(&c, &BTreeMap::new(), &c).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let cache = rt.block_on(async {
            let store = crate::store::open(&c.storage).await.unwrap();
            Arc::new(
                Cache::open(store, ups, c.tag_ttl, limits(&c))
                    .await
                    .unwrap(),
            )
        });
        let state = Arc::new(ConfigState::new(c, t.as_deref()));
        let r = Reloader::new(args, cache.clone(), state.clone());
        (cache, state, r)
    }

    #[test]
    fn a_reload_puts_a_valid_file_in_force_and_keeps_the_running_config_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        // The reloader reads the process environment: no password_env here.
        let base = BASE.replace("username = \"u\"\npassword_env = \"PW\"\n", "");
        let (cache, state, mut r) = running(dir.path(), &base);
        let path = dir.path().join("cache.toml");
        let b_before = cache.upstream(Some("b")).unwrap();
        let storage = dir.path().join("s").display().to_string();
        let edit =
            |t: &str| std::fs::write(&path, t.replace("/var/lib/regmirror", &storage)).unwrap();

        edit(&(base.clone() + "[[upstream]]\nname = \"c\"\nurl = \"https://c.example\"\n"));
        r.reload("test");
        assert_eq!(cache.upstream_names(), ["a", "b", "c"]);
        assert_eq!(state.current().version.serial, 2);
        assert!(Arc::ptr_eq(&cache.upstream(Some("b")).unwrap(), &b_before));

        for broken in [
            "[[upstream]]\nname = ",
            &base.replace("https://a.example", "ftp://a.example"),
            &base.replace("127.0.0.1:5001", "127.0.0.1:5002"),
            // The removed static client token: refused with what replaces it.
            &base.replace("client_auth = \"anonymous\"", "public = true"),
            &(base.clone() + "client_token_env = \"T\"\n"),
        ] {
            edit(broken);
            r.reload("test");
            assert_eq!(cache.upstream_names(), ["a", "b", "c"], "kept: {broken}");
            assert_eq!(state.current().version.serial, 2);
            assert!(state.refusal().is_some(), "{broken}");
            if broken.contains("public") || broken.contains("client_token_env") {
                let why = state.refusal().unwrap_or_default();
                assert!(
                    why.contains("removed") && why.contains("client_auth"),
                    "{why}"
                );
            }
        }
        // The file put back as it runs: nothing to apply, and the refusal no longer stands.
        edit(&(base.clone() + "[[upstream]]\nname = \"c\"\nurl = \"https://c.example\"\n"));
        r.reload("test");
        assert_eq!(state.current().version.serial, 2);
        assert_eq!(state.refusal(), None, "the file in force again");

        edit(&base.replace(
            "tag_ttl_seconds = 300",
            "tag_ttl_seconds = 300\nmax_size = 7",
        ));
        r.reload("test");
        assert_eq!(cache.upstream_names(), ["a", "b"], "c removed");
        assert_eq!(cache.max_size(), 7);
        assert_eq!(state.current().version.serial, 3);
        assert_eq!(state.refusal(), None);
        r.reload("test");
        assert_eq!(state.current().version.serial, 3, "nothing changed");
    }

    /// Between a reload's two swaps the config in force may lack an upstream the cache
    /// still runs: a request for it is refused, never served without the authorization the
    /// old file required.
    #[test]
    fn an_upstream_missing_from_the_config_in_force_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = BASE.replace("username = \"u\"\npassword_env = \"PW\"\n", "");
        let (cache, _, _) = running(dir.path(), &base);
        let only_a = cfg(base.split("[[upstream]]\nname = \"b\"").next().unwrap());
        let st = crate::http::AppState {
            cache: cache.clone(),
            config: Arc::new(ConfigState::new(only_a, None)),
            status: Arc::default(),
        };
        assert!(cache.upstream(Some("b")).is_ok(), "still running");
        assert!(crate::http::client_policy(&st, "a").is_ok());
        let refused = crate::http::client_policy(&st, "b").unwrap_err();
        assert_eq!(refused.status, axum::http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn versions_name_the_content() {
        let h = content_hash(BASE);
        assert_eq!(h.len(), 12);
        assert_eq!(h, content_hash(BASE));
        assert_ne!(h, content_hash(&format!("{BASE}# comment\n")));
        let s = ConfigState::new(cfg(BASE), Some(BASE));
        assert_eq!(s.current().version.to_string(), format!("1-{h}"));
        assert_eq!(
            ConfigState::new(cfg(BASE), None).current().version.hash,
            "flags"
        );
    }
}
