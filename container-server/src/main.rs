//! `container-server` entry point: flags and environment, logging, bind, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use container_server::config::{bridge_listeners, Bind, BridgeEnv};
use container_server::{Config, ListenAddr, Listener};
use memoh_proto::limits;

/// The gRPC server of a bot container: file I/O and streaming exec on port 9090.
#[derive(Parser, Debug)]
#[command(name = "container-server", version, about)]
struct Args {
    /// Listen address: `:PORT` (all interfaces), `IP:PORT`, or `unix:/path/to/socket`; may be
    /// repeated. Without it: `:9090` plus the bridge's socket (see BRIDGE_SOCKET_PATH).
    #[arg(long, env = "MCP_LISTEN_ADDR")]
    listen: Vec<String>,
    /// Data directory: relative paths resolve here and commands run here by default.
    #[arg(long, env = "MCP_DATA_DIR", default_value = limits::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Template directory whose regular files seed the data directory on start.
    #[arg(long, env = "MCP_TEMPLATE_DIR", default_value = limits::DEFAULT_TEMPLATE_DIR)]
    template_dir: PathBuf,
    /// File holding the bearer token callers must present; without it the server is open.
    #[arg(long, env = "MCP_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Seconds running calls may take to finish after SIGTERM before commands are killed.
    #[arg(long, env = "MCP_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace: u64,
    /// The bot's loopback HTTP listener for bridge ReverseHTTP (`IP:PORT`, loopback only; a
    /// non-loopback address is refused in the log and the server runs without it).
    #[arg(long, env = "MEMOH_ACP_TOOLS_PROXY_ADDR", default_value = container_server::reverse_http::listener::DEFAULT_ADDR)]
    reverse_http_addr: String,
    /// Directory of the process service's output files (made 0700; earlier runs' files in it
    /// are removed at start).
    #[arg(long, env = "MEMOH_PROCESS_DIR", default_value = container_server::process::DEFAULT_PROCESS_DIR)]
    process_dir: PathBuf,
    /// Bytes of each process output stream kept in memory.
    #[arg(long, env = "MEMOH_PROCESS_RING_BYTES", default_value_t = container_server::process::DEFAULT_RING_BYTES)]
    process_ring_bytes: usize,
    /// Bytes of each process output stream kept on disk; older output is dropped (and reported
    /// as lost to a replay).
    #[arg(long, env = "MEMOH_PROCESS_SPILL_BYTES", default_value_t = container_server::process::DEFAULT_SPILL_BYTES)]
    process_spill_bytes: u64,
    /// Most processes running at once (Start beyond it is refused).
    #[arg(long, env = "MEMOH_PROCESS_MAX_LIVE", default_value_t = container_server::process::DEFAULT_MAX_LIVE)]
    process_max_live: usize,
    /// Most finished processes kept (the oldest go first).
    #[arg(long, env = "MEMOH_PROCESS_MAX_KEPT", default_value_t = container_server::process::DEFAULT_MAX_KEPT)]
    process_max_kept: usize,
    /// Seconds a finished process is kept.
    #[arg(long, env = "MEMOH_PROCESS_RETENTION", default_value_t = container_server::process::DEFAULT_RETENTION.as_secs())]
    process_retention: u64,
}

/// glibc malloc arenas the server uses, unless `MALLOC_ARENA_MAX` says otherwise.
///
/// glibc gives threads their own arenas (up to 8 per core), and a buffer freed in one arena
/// is not reused by another: under raw transfers, whose 1 MiB buffers are allocated on the
/// runtime's workers and on the blocking threads that read and write files, the server's
/// peak RSS reached 30 to 34 MiB. Two arenas keep it at 20 to 24 MiB at the same CPU per
/// GiB (BENCHMARKS.md, issue 19, tenth session).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 2;

fn main() -> ExitCode {
    bound_malloc_arenas();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MCP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("container-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    // Before any thread exists: commands inherit the server's environment.
    let path = container_server::config::path_with_toolkit(std::env::var("PATH").ok().as_deref());
    std::env::set_var("PATH", path);
    let mut listen = Vec::new();
    for l in &args.listen {
        listen.push(Bind::plain(
            l.parse::<ListenAddr>().map_err(anyhow::Error::msg)?,
            true,
        ));
    }
    if listen.is_empty() {
        listen.push(Bind::plain(
            limits::DEFAULT_LISTEN_ADDR
                .parse()
                .map_err(anyhow::Error::msg)?,
            true,
        ));
    }
    let bridge = bridge_listeners(&BridgeEnv::from_env(), !args.listen.is_empty())
        .map_err(anyhow::Error::msg)?;
    listen.extend(bridge);
    let token = match &args.auth_token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("auth token file {}: {e}", p.display()))?;
            let t = t.trim().to_string();
            anyhow::ensure!(!t.is_empty(), "auth token file {} is empty", p.display());
            Some(t)
        }
        None => None,
    };
    let mut config = Config::new(&args.data_dir);
    config.template_dir = args.template_dir;
    config.auth_token = token;
    config.shutdown_grace = std::time::Duration::from_secs(args.shutdown_grace);
    config.reap_all = std::process::id() == 1;
    config.processes = container_server::process::ProcessConfig {
        dir: args.process_dir,
        ring_bytes: args.process_ring_bytes,
        spill_bytes: args.process_spill_bytes,
        max_live: args.process_max_live,
        max_kept: args.process_max_kept,
        retention: std::time::Duration::from_secs(args.process_retention),
    };
    // Empty means the default, as for the bridge.
    config.reverse_http_addr = Some(match args.reverse_http_addr.as_str() {
        "" => container_server::reverse_http::listener::DEFAULT_ADDR.to_string(),
        a => a.to_string(),
    });

    // Threads made now and kept: at the bot's process limit, no new one can be made.
    let rt = container_server::runtime::build()?;
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for b in &listen {
            match bind(b).await {
                Ok(l) => listeners.push(l),
                Err(e) if !b.required => {
                    tracing::warn!(error = %e, "default bridge socket skipped")
                }
                Err(e) => return Err(e),
            }
        }
        container_server::run_all(listeners, config, shutdown_signal()).await?;
        Ok(())
    })
}

async fn bind(b: &Bind) -> anyhow::Result<Listener> {
    // Every TLS file is read before anything is bound: a bad one stops the server at start.
    let tls = match &b.tls {
        Some(t) => Some(t.server_config().map_err(anyhow::Error::msg)?),
        None => None,
    };
    match &b.addr {
        ListenAddr::Tcp(a) => {
            let l = match tokio::net::TcpListener::bind(a).await {
                Ok(l) => l,
                // `:PORT` binds [::]; fall back to IPv4 where IPv6 is off.
                Err(_) if a.ip().is_unspecified() && a.is_ipv6() => {
                    tokio::net::TcpListener::bind(("0.0.0.0", a.port())).await?
                }
                Err(e) => return Err(anyhow::anyhow!("listen on {a}: {e}")),
            };
            tracing::info!(addr = %l.local_addr()?, tls = tls.is_some(), "listening");
            Ok(match tls {
                Some(config) => Listener::Tls(l, config),
                None => Listener::Tcp(l),
            })
        }
        ListenAddr::Unix(p) => {
            // The bridge's socket directory: the host binds it (0750); make it when missing.
            if let Some(dir) = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty() && !d.exists())
            {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o750)
                    .create(dir)
                    .map_err(|e| anyhow::anyhow!("create {}: {e}", dir.display()))?;
            }
            if let Ok(md) = std::fs::symlink_metadata(p) {
                use std::os::unix::fs::FileTypeExt;
                if md.file_type().is_socket() {
                    std::fs::remove_file(p)?;
                }
            }
            // No chmod, as the bridge does none: the socket's mode follows the umask, and the
            // host's 0750 directory behind /run/memoh is what keeps other users out.
            let l = tokio::net::UnixListener::bind(p)
                .map_err(|e| anyhow::anyhow!("listen on {}: {e}", p.display()))?;
            tracing::info!(path = %p.display(), "listening");
            Ok(Listener::Unix(l))
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is nothing to wait for; run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Applies `MALLOC_ARENAS` (glibc only); first thing in `main`, before any other thread exists. An
/// operator's `MALLOC_ARENA_MAX` (read by glibc itself) wins.
fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` only sets a parameter of the allocator; no other thread exists
        // yet, so nothing allocates concurrently.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}
