//! `sluice`: parses flags (with environment defaults) and hands over to the
//! library. All behaviour lives in `sluice_service`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};
use sluice_service::config::{Secret, ServeOptions};

/// How long in-flight requests may take to finish after SIGINT/SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice per-tenant quota service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the quota service (POST /v1/check, admin API, metrics).
    Serve(ServeArgs),
    /// Run the OpenAI-compatible demo upstream used by `make run` and the tests.
    DemoUpstream(DemoArgs),
    /// Operate a running service through its admin API (tiers, limits,
    /// overrides, modes, audit, usage).
    Admin(sluice_service::cli::AdminArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (HTTP/1.1 and h2c on the same port).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Serve the admin API only on this address (the --listen port then
    /// answers 404 under /v1/admin) [default: the admin API is on --listen].
    #[arg(long, env = "SLUICE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Redis URL.
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        default_value = "redis://127.0.0.1:6380/",
        hide_env_values = true
    )]
    redis_url: String,
    /// Redis Cluster mode: --redis-url is a comma-separated list of cluster
    /// nodes (any few of them; the rest are discovered).
    #[arg(long, env = "SLUICE_REDIS_CLUSTER", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    redis_cluster: bool,
    /// Tiers JSON file (built-in tiers when absent).
    #[arg(long, env = "SLUICE_TIERS")]
    tiers: Option<PathBuf>,
    /// Admin API bearer token (admin API disabled when no token is set).
    #[arg(
        long,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    admin_token: Option<String>,
    /// File holding the admin token (a trailing newline is ignored).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File of named admin tokens, one `name:token` per line (the name is
    /// the audit log's actor unless X-Admin-Actor says otherwise).
    #[arg(long, env = "SLUICE_ADMIN_TOKENS_FILE")]
    admin_tokens_file: Option<PathBuf>,
    /// How often each replica polls Redis for tier changes, in ms (10..=1000).
    #[arg(long, env = "SLUICE_TIERS_REFRESH_MS", default_value_t = 200)]
    tiers_refresh_ms: u64,
    /// Days audit entries are kept.
    #[arg(long, env = "SLUICE_AUDIT_RETENTION_DAYS", default_value_t = 90)]
    audit_retention_days: u64,
    /// Days daily usage rollups are kept.
    #[arg(long, env = "SLUICE_USAGE_RETENTION_DAYS", default_value_t = 90)]
    usage_retention_days: u64,
    /// Tenants shown by name in the utilisation metric (the rest are `other`).
    #[arg(long, env = "SLUICE_METRICS_TOP_TENANTS", default_value_t = 20)]
    metrics_top_tenants: usize,
    /// Tier of tenants without one [default: the tiers file's, else free].
    #[arg(long, env = "SLUICE_DEFAULT_TIER")]
    default_tier: Option<String>,
    /// Bound on every Redis call, in milliseconds.
    #[arg(long, env = "SLUICE_REDIS_TIMEOUT_MS", default_value_t = 250)]
    redis_timeout_ms: u64,
    /// Enable PUT /v1/admin/test-clock (tests only).
    #[arg(long, env = "SLUICE_ENABLE_TEST_CLOCK", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    enable_test_clock: bool,
    /// Upstreams JSON file: capacities and queue settings (none when absent).
    #[arg(long, env = "SLUICE_UPSTREAMS")]
    upstreams: Option<PathBuf>,
    /// Address of the queue listener, where Envoy's queue route sends
    /// overflow (HTTP/1.1 and h2c); no queue listener when absent.
    #[arg(long, env = "SLUICE_QUEUE_LISTEN")]
    queue_listen: Option<SocketAddr>,
    /// Queue workers per upstream in this replica (0: dispatch nothing).
    #[arg(long, env = "SLUICE_WORKERS", default_value_t = 4)]
    workers: usize,
    /// How long an in-flight dispatch may still run after SIGTERM before it
    /// is put back in the queue (at most 60000; the drain is 10 s in all).
    #[arg(long, env = "SLUICE_WORKER_DRAIN_MS", default_value_t = 5000)]
    worker_drain_ms: u64,
    /// Tenant header on the queue listener (must match the filter's).
    #[arg(long, env = "SLUICE_TENANT_HEADER", default_value = "x-tenant-id")]
    tenant_header: String,
    /// Validate flags, the tiers and upstreams files, print a summary and exit (never connects).
    #[arg(long)]
    check_config: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8082")]
    listen: SocketAddr,
    /// Requests per second it serves (counted paths); beyond, 503
    /// `over_capacity`. 0: unlimited.
    #[arg(long, default_value_t = 0)]
    capacity: u64,
    /// Time each counted request takes, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

fn init_logging() {
    let level = match std::env::var("RUST_LOG")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received, draining");
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Admin(args) => sluice_service::cli::run(args).await,
        Command::DemoUpstream(args) => {
            init_logging();
            let listener = match tokio::net::TcpListener::bind(args.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("sluice: cannot listen on {}: {e}", args.listen);
                    return ExitCode::FAILURE;
                }
            };
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let demo = sluice_service::demo::DemoOptions {
                capacity: args.capacity,
                latency: Duration::from_millis(args.latency_ms),
            };
            let server = sluice_service::demo::run_demo_upstream_with(listener, demo, async move {
                let _ = rx.await;
            });
            serve_with_trigger(server, tx).await
        }
    }
}

/// Runs `server`, firing `trigger` (its graceful-shutdown input) on
/// SIGINT/SIGTERM, then gives in-flight requests DRAIN_TIMEOUT to finish.
async fn serve_with_trigger<F, E>(server: F, trigger: tokio::sync::oneshot::Sender<()>) -> ExitCode
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (sig_tx, sig_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = trigger.send(());
        let _ = sig_tx.send(());
    });
    let mut task = tokio::spawn(server);
    let result = tokio::select! {
        r = &mut task => r,
        _ = sig_rx => match tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("drain timed out; exiting");
                return ExitCode::SUCCESS;
            }
        },
    };
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("server task failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let options = ServeOptions {
        redis_url: args.redis_url,
        redis_cluster: args.redis_cluster,
        tiers_file: args.tiers,
        admin_token: args.admin_token.map(Secret::new),
        admin_token_file: args.admin_token_file,
        admin_tokens_file: args.admin_tokens_file,
        default_tier: args.default_tier,
        redis_timeout_ms: args.redis_timeout_ms,
        enable_test_clock: args.enable_test_clock,
        tiers_refresh_ms: args.tiers_refresh_ms,
        audit_retention_days: args.audit_retention_days,
        usage_retention_days: args.usage_retention_days,
        metrics_top_tenants: args.metrics_top_tenants,
        upstreams_file: args.upstreams,
        workers: Some(args.workers),
        tenant_header: Some(args.tenant_header),
        worker_drain_ms: Some(args.worker_drain_ms),
    };
    let config = match options.compile() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        // Written with write! so a closed pipe (`| head`) is not a panic.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let queue = args.queue_listen.map_or("none".to_string(), |a| a.to_string());
        let _ = write!(
            out,
            "configuration OK\nlisten:           {}\nadmin listen:     {}\nqueue-listen:     {queue}\n{}",
            args.listen,
            args.admin_listen.map_or_else(|| "same as listen".to_string(), |a| a.to_string()),
            config.summary()
        );
        let _ = out.flush();
        return ExitCode::SUCCESS;
    }
    init_logging();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sluice: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let admin_listener = match args.admin_listen {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("sluice: cannot listen on {addr} (--admin-listen): {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let queue_listener = match args.queue_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("sluice: cannot listen on {addr} (queue): {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let listeners = sluice_service::Listeners {
        data: listener,
        admin: admin_listener,
        queue: queue_listener,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = sluice_service::run_listeners(listeners, config, async move {
        let _ = rx.await;
    });
    serve_with_trigger(server, tx).await
}
