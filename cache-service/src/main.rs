//! `regmirror`: pull-through OCI registry cache (`serve`, the default), the mirror's config
//! generator (`render`), client configuration (`client-config`) and operator tools (`warm`,
//! `doctor`).

use regmirror::reload;
use regmirror::tools::{client_config, doctor, render, warm};
use regmirror::{build_app, App};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use regmirror::config::{Config, LogFormat, ServeArgs};

/// Pull-through cache for OCI/Docker registries.
///
/// Quick start (no config file):
///   regmirror --listen 127.0.0.1:5001 --storage /var/lib/regmirror --upstream gcr.io=https://gcr.io
///
/// Requests pick their upstream by the `x-mirror-registry` header (set by the mirror's Envoy
/// filter), else the `ns` query parameter, else the only configured upstream. The cache only
/// pulls: writes are refused with 405 UNSUPPORTED.
#[derive(Debug, Parser)]
#[command(
    name = "regmirror",
    version,
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true,
    after_long_help = CONFIG_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

const CONFIG_HELP: &str = r#"Configuration file (--config FILE; flags override it):

  listen = "127.0.0.1:5001"
  storage = "/var/lib/regmirror"  # or "s3://BUCKET/PREFIX", shared by replicas (AWS_* env)
  # s3_endpoint = "http://127.0.0.1:8333"  # optional; overrides AWS_ENDPOINT_URL
  # s3_region = "us-east-1"     # optional; overrides AWS_REGION
  # spool_dir = "/var/tmp/regmirror-spool"  # downloads in progress when storage is a bucket
  # local_cache_size = "20GiB"  # a bucket: blobs this replica also keeps on its spool disk
  # redirect = true             # a bucket, instead of local_cache_size: warm blob GETs get a
                                # 307 to a presigned URL of the object (clients must reach it)
  # redirect_endpoint = "https://s3.example.com"  # the bucket as clients reach it, if not s3_endpoint
  # redirect_ttl_seconds = 300  # how long a presigned URL can be used
  max_size = "50GiB"            # optional; 0 or absent = unlimited (a bucket: its total)
  tag_ttl_seconds = 300
  shutdown_grace_seconds = 30   # optional; at most 86400
  max_blob_size = "32GiB"       # optional; larger downloads are aborted
  max_pass_through_memory = "256MiB"  # optional; memory for downloads when the disk is full
  [[upstream]]
  name = "gcr.io"               # matched against x-mirror-registry / ?ns=
  url = "https://gcr.io"
  ca_file = "/path/ca.pem"      # optional extra CA for this upstream
  username = "..."              # optional; password from password_env or password_file
  password_env = "GCR_PASSWORD"
  realm_hosts = ["auth.example.com", "*.pkg.dev"]  # token realms besides the upstream host
  redirect_hosts = ["storage.googleapis.com"]      # redirect targets besides the upstream host
  client_auth = "upstream"      # or "anonymous" (the default; must be stated with username):
                                # "upstream" checks each client's own Authorization upstream
  authorization_ttl_seconds = 60      # "upstream": how long an allowed decision is reused

Endpoints: /v2/... (pull API), /_mirror/auth/... and /_mirror/token (client_auth = "upstream":
token requests relayed to the upstream's own realm only), /healthz, /readyz (storage reachable and writable; the config
version in force), /metrics (Prometheus), /_status and / (HTML status page).
SIGHUP, or a change of the config file (watched), reloads it without dropping anything; an
invalid file, or a changed listen or store setting (storage, s3_*, spool_dir,
local_cache_size, redirect*), is logged and the running config kept.
Logs go to stderr; RUST_LOG filters them (default info). Exit status 2: bad configuration, or a
bucket that cannot be used (unreachable endpoint, refused credentials, no such bucket)."#;

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cache (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Render the Envoy, filter and cache configs from envoy/registries.toml.
    Render(render::RenderArgs),
    /// Print (or write) a container runtime's configuration for pulling through the mirror.
    ClientConfig(client_config::ClientConfigArgs),
    /// Pre-pull images through a running mirror so its caches fill.
    Warm(warm::WarmArgs),
    /// Check a running mirror, registry by registry: /v2/, token round-trip, manifest HEAD.
    Doctor(doctor::DoctorArgs),
    /// Start Envoy with these arguments: through func-e (>= 1.5.0) with an explicit Envoy
    /// when func-e is installed, else `envoy`.
    Envoy(render::launcher::EnvoyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Render(args)) => render::run(&args),
        Some(Command::ClientConfig(args)) => client_config::run(&args),
        Some(Command::Warm(args)) => warm::run(&args),
        Some(Command::Doctor(args)) => doctor::run(&args),
        Some(Command::Envoy(args)) => render::launcher::run(&args),
        Some(Command::Serve(args)) => serve(&args),
        None => serve(&cli.serve),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let (cfg, text) = match Config::load(args, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regmirror: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(cfg.log_format);
    raise_open_files_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regmirror: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args.clone(), cfg, text))
}

/// Each client holds a descriptor, each download a spool (two) and an upstream connection,
/// and the soft limit is often 1024 (systemd's default) under a far higher hard one: raised
/// to the hard one, as Go's runtime does for Go servers (capped at Linux's default
/// `fs.nr_open`, which an unlimited hard limit would exceed).
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const NR_OPEN: u64 = 1 << 20;
    match getrlimit(Resource::RLIMIT_NOFILE).map(|(soft, hard)| (soft, hard, hard.min(NR_OPEN))) {
        Ok((soft, hard, to)) if soft < to => match setrlimit(Resource::RLIMIT_NOFILE, to, hard) {
            Ok(()) => tracing::info!(from = soft, to, "raised the open files limit"),
            Err(e) => tracing::warn!(soft, error = %e, "could not raise the open files limit"),
        },
        Ok((soft, _, _)) => tracing::debug!(soft, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not read the open files limit"),
    }
}

async fn run(args: ServeArgs, cfg: Config, text: Option<String>) -> ExitCode {
    // Before anything can be reached: SIGHUP's default action would end the process.
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("regmirror: cannot install the SIGHUP handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    let App {
        router,
        cache,
        config,
    } = match build_app(cfg, text.as_deref()).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("regmirror: {e}");
            return ExitCode::from(2);
        }
    };
    let live = config.current();
    let cfg = &live.config;
    let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("regmirror: cannot listen on {}: {e}", cfg.listen);
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        listen = %cfg.listen,
        storage = %cfg.storage,
        upstreams = ?cache.upstream_names(),
        max_size = cfg.max_size,
        max_blob_size = cfg.max_blob_size,
        tag_ttl_seconds = cfg.tag_ttl.as_secs(),
        config_version = %live.version,
        "regmirror serving"
    );
    let reloader =
        tokio::spawn(reload::Reloader::new(args, cache.clone(), config.clone()).run(hup));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(regmirror::http::server::serve_http1(
        regmirror::http::zero_copy::ZeroCopyListener::new(listener, cache.metrics.clone()),
        router,
        regmirror::http::server::ClientTimeouts::default(),
        async {
            let _ = stop_rx.await;
        },
    ));
    tokio::select! {
        r = &mut server => {
            if let Err(e) = r {
                tracing::error!(error = %e, "server failed");
            }
            cache.clean_abandoned().await;
            return ExitCode::FAILURE;
        }
        () = shutdown_signal() => {}
    }
    reloader.abort();
    // The grace in force now: a reload may have changed it.
    let grace = config.current().config.shutdown_grace;
    tracing::info!(
        grace_seconds = grace.as_secs(),
        "shutting down: no new connections; letting downloads and responses finish"
    );
    // The grace is capped at load; checked anyway: an overflow here would panic.
    let now = tokio::time::Instant::now();
    let deadline = now.checked_add(grace).unwrap_or(now);
    let _ = stop_tx.send(());
    cache.drain(grace).await;
    if tokio::time::timeout_at(deadline, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace over; closing remaining connections");
        server.abort();
    }
    cache.clean_abandoned().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
