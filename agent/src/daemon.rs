//! The daemon: connects to containerd, reconciles, serves the control socket, tells systemd.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use memoh_proto::pb::agent::agent_service_server::AgentServiceServer;
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::api::control::Control;
use crate::api::proxy::{BridgeProxy, McpProxy, ProcessProxy};
use crate::bots::Manager;
use crate::config::Config;
use crate::containerd::{Connection, Containerd, Runtime};
use crate::error::AgentError;
use crate::metrics::Timed;
use crate::network::{Network, NetworkConfig};

/// Connects to containerd, retrying for `wait` (containerd may start after the agent).
pub async fn connect_runtime(cfg: &Config, wait: Duration) -> Result<Containerd, AgentError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match Containerd::from_config(cfg).await {
            Ok(c) => match c.version().await {
                Ok(v) => {
                    info!(version = %v, socket = %cfg.containerd_socket.display(), "containerd answered");
                    return Ok(c);
                }
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => warn!(error = %e, "containerd not ready"),
            },
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => warn!(error = %e, "containerd not reachable yet"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long shutdown waits for background tasks (a migration or a restart under way).
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// Binds the control socket (mode 0660), replacing a stale socket file.
pub fn bind_control(cfg: &Config) -> Result<UnixListener, AgentError> {
    let path = &cfg.control_socket;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| AgentError::io(parent, e))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::FailedPrecondition(format!(
            "another agent is serving {}",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| AgentError::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| AgentError::io(path, e))?;
    Ok(l)
}

/// Tells systemd (when it started us with `Type=notify`) that we are ready.
pub fn notify_ready() {
    let Some(sock) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = sock.to_string_lossy().into_owned();
    let r = (|| -> std::io::Result<()> {
        let d = std::os::unix::net::UnixDatagram::unbound()?;
        if let Some(abstract_name) = sock.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            d.send_to_addr(b"READY=1\nSTATUS=serving", &addr)?;
        } else {
            d.send_to(b"READY=1\nSTATUS=serving", &sock)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        warn!(error = %e, "could not notify systemd");
    }
}

/// How long start-up waits for the first reconcile pass before it serves anyway.
const STARTUP_RECONCILE_WAIT: Duration = Duration::from_secs(20);

/// Runs the agent until `shutdown` resolves: containerd, reconcile, watchers, control socket.
pub async fn run(
    cfg: Config,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let rt = connect_runtime(&cfg, Duration::from_secs(cfg.containerd_wait_secs)).await?;
    let rt: Arc<dyn Runtime> = Arc::new(rt);
    let net = Arc::new(Network::new(NetworkConfig::from_config(&cfg)));
    let mgr = Arc::new(Manager::new(cfg, rt, net));
    mgr.attach_self();
    // Bots come back before the agent says it is ready, but one bot whose start hangs must not
    // keep the control socket closed for the others: after a while the pass goes on in the
    // background.
    let pass = {
        let mgr = mgr.clone();
        tokio::spawn(async move {
            match mgr.reconcile().await {
                Ok(n) => info!(started = n, "reconciled bots from containerd"),
                Err(e) => warn!(error = %e, "reconcile failed; the watcher retries"),
            }
        })
    };
    if tokio::time::timeout(STARTUP_RECONCILE_WAIT, pass)
        .await
        .is_err()
    {
        warn!(
            waited = ?STARTUP_RECONCILE_WAIT,
            "reconcile still running (a bot's start is slow); serving meanwhile"
        );
    }
    let stop = mgr.stop_token();
    mgr.spawn_watchers();
    // MCP is an extra: a busy port must not take the control socket down with it.
    let mcp = match crate::mcp::serve(mgr.clone(), mgr.config(), stop.clone()).await {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "mcp server not started");
            None
        }
    };

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServiceServer<Control>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(memoh_proto::AGENT_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(memoh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(memoh_proto::PROCESS_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AgentError::FailedPrecondition(format!("reflection: {e}")))?;
    let router = tonic::transport::Server::builder()
        // The windows and frames every connection of ours uses (the bots' servers and the
        // clients too): a raw transfer through the socket is not held to 16 KiB frames and
        // the protocol's 64 KiB window.
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .max_frame_size(1 << 20)
        // A client's pooled connection carries calls for as long as it lives: h2's cumulative
        // budget of streams it resets on its own (1024 by default) would end it with a GOAWAY
        // after some thousands of streaming calls, failing the one in flight.
        .http2_max_local_error_reset_streams(None)
        // A request stream's end reaches a handler (and, through the proxy, a bot) only when
        // the caller half-closed it: a reset or cancelled call never looks finished.
        .layer(memoh_proto::clean_end::CleanEndLayer::for_paths(
            memoh_proto::clean_end::CONTAINER_STREAMING_REQUESTS,
        ))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(Timed::new(
            "control",
            AgentServiceServer::new(Control::with_mcp(
                mgr.clone(),
                mcp.as_ref().map(|(hub, _)| hub.clone()),
            )),
        ))
        .add_service(Timed::new("proxy", McpProxy::new(mgr.clone())))
        .add_service(Timed::new("bridge_proxy", BridgeProxy::new(mgr.clone())))
        .add_service(Timed::new("process_proxy", ProcessProxy::new(mgr.clone())));
    notify_ready();
    info!("agent ready");
    // grpc C-core clients (grpcio, grpc++) send the socket path as `:authority`, which h2
    // refuses: every connection goes through the fix that replaces it.
    let r = router
        .serve_with_incoming_shutdown(memoh_proto::authority::incoming(listener), shutdown)
        .await;
    // The one shutdown path: the stop token ends the watchers, restarts, checks, migrations
    // and the MCP server; each is waited for, up to a deadline.
    info!("stopping background tasks");
    mgr.shutdown(SHUTDOWN_DRAIN).await;
    if let Some((_, task)) = mcp {
        if tokio::time::timeout(SHUTDOWN_DRAIN, task).await.is_err() {
            warn!(deadline = ?SHUTDOWN_DRAIN, "the mcp server did not stop in time");
        }
    }
    info!("agent stopped");
    r.map_err(|e| AgentError::FailedPrecondition(format!("control server: {e}")))
}
