//! The pieces of the harness. Test files normally start from [`upstreams::shared`] (fixtures
//! without the mirror) or [`mirror::shared`] (fixtures behind Envoy + the filter).

pub mod build;
pub mod cache;
pub mod clients;
pub mod envoy;
pub mod faults;
pub mod hostile;
pub mod images;
pub mod mirror;
pub mod pki;
pub mod private;
pub mod proc;
pub mod replicas;
pub mod s3;
pub mod token_server;
pub mod upstreams;

use std::sync::OnceLock;

/// The harness' tokio runtime (token server). Lives for the whole test process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("harness-rt")
            .build()
            .expect("tokio runtime for the harness")
    })
}

/// rustls needs one process-wide crypto provider: ring.
pub fn install_crypto_provider() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The value of header `name` (any case) among `(name, value)` pairs, the first if repeated.
pub fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// sha256 of bytes as `sha256:<hex>`.
pub fn digest_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Fails (panics) with the install step when a tool is missing: a missing tool is a test
/// failure, never a silent skip.
pub fn require_tool(name: &str, install: &str) -> std::path::PathBuf {
    match which(name) {
        Some(p) => p,
        None => panic!("required tool `{name}` is not on PATH; install it with: {install}"),
    }
}

/// Looks a program up on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Reserves a free TCP port on 127.0.0.1 (bind :0, read, release).
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    // Never hand the same port out twice in one process, even if the OS would.
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        drop(l);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Host names of the mirror in host mode, resolved through /etc/hosts.
pub const MIRROR_HOSTS: &[&str] = &[
    "docker.mirror.test",
    "quay.mirror.test",
    "gcr.mirror.test",
    "ghcr.mirror.test",
    "k8s.mirror.test",
];

/// Adds `127.0.0.1 docker.mirror.test quay.mirror.test …` to /etc/hosts when a name is
/// missing (the tests run as root), so skopeo and containerd resolve host-mode names.
pub fn ensure_etc_hosts() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let known: Vec<&str> = hosts
            .lines()
            .filter(|l| l.trim_start().starts_with("127.0.0.1"))
            .flat_map(|l| l.split_whitespace().skip(1))
            .collect();
        let missing: Vec<&str> = MIRROR_HOSTS
            .iter()
            .copied()
            .filter(|h| !known.contains(h))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")
            .map_err(|e| format!("cannot append to /etc/hosts (run the tests as root): {e}"))?;
        let nl = if hosts.ends_with('\n') || hosts.is_empty() {
            ""
        } else {
            "\n"
        };
        writeln!(f, "{nl}127.0.0.1 {}", missing.join(" "))
            .map_err(|e| format!("writing /etc/hosts: {e}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

const TEMP_PREFIX: &str = "mirror-tests-";

/// A temporary directory `mirror-tests-<pid>-<name>-XXXX` under the system temp dir.
/// Fixtures held in statics are never dropped, so each new test process first removes
/// the directories of test processes that are gone.
pub fn temp_dir(name: &str) -> anyhow::Result<tempfile::TempDir> {
    temp_dir_in(&std::env::temp_dir(), name)
}

/// [`temp_dir`] under `base`.
pub fn temp_dir_in(base: &std::path::Path, name: &str) -> anyhow::Result<tempfile::TempDir> {
    static SWEPT: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
        if !swept.iter().any(|b| b == base) {
            swept.push(base.to_path_buf());
            sweep_stale(base);
        }
    }
    Ok(tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-{name}-", std::process::id()))
        .tempdir_in(base)?)
}

fn sweep_stale(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A [`temp_dir_in`] for a fixture that lives as long as the test process (a static,
/// never dropped): a watcher process started with PDEATHSIG removes it when the test
/// process exits, however it exits.
pub fn fixture_dir_in(base: &std::path::Path, name: &str) -> anyhow::Result<tempfile::TempDir> {
    static WATCHERS: std::sync::Mutex<Vec<proc::Proc>> = std::sync::Mutex::new(Vec::new());
    let dir = temp_dir_in(base, name)?;
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"trap 'sleep 1; rm -rf -- "$0"; exit 0' TERM; while :; do sleep 1; done"#)
        .arg(dir.path());
    let log = base.join(format!("{TEMP_PREFIX}{}-watchers.log", std::process::id()));
    let watcher = proc::Proc::spawn_with_signal("dir-watcher", &cmd, &log, "TERM")?;
    WATCHERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(watcher);
    let _ = std::fs::remove_file(&log);
    Ok(dir)
}

/// [`fixture_dir_in`] under the system temp dir.
pub fn fixture_dir(name: &str) -> anyhow::Result<tempfile::TempDir> {
    fixture_dir_in(&std::env::temp_dir(), name)
}
