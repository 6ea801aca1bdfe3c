//! Assembles and runs the gRPC server: the container service under both of its names
//! (`mcpcontainer` and `bridgepb`, one implementation, behind the optional bearer-token
//! check), health, reflection, message-size limits, every listener, and the one shutdown path.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use memoh_proto::limits::MAX_MESSAGE_SIZE;
use memoh_proto::pb::bridgepb::container_service_server::ContainerServiceServer as BridgeServer;
use memoh_proto::pb::mcpcontainer::container_service_server::ContainerServiceServer;
use memoh_proto::pb::process::process_service_server::ProcessServiceServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::authority::AuthorityFix;
use crate::config::Config;
use crate::error::{rewrite_too_large, ServerError};
use crate::fs;
use crate::paths::Resolver;
use crate::reaper::Reaper;
use crate::service::Service;

/// A bound listener handed to [`run`].
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket.
    Unix(UnixListener),
    /// TCP with strict mutual TLS ([`crate::tls`]).
    Tls(TcpListener, Arc<rustls::ServerConfig>),
}

/// One accepted connection, from any listener. Unix-socket connections go through
/// [`AuthorityFix`], so grpc C-core clients with default settings work there.
pub enum Conn {
    /// From a TCP listener.
    Tcp(TcpStream),
    /// From a unix-socket listener.
    Unix(Box<AuthorityFix<UnixStream>>),
    /// From a TLS listener, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Where a [`Conn`] came from, for tonic's request extensions.
#[derive(Clone, Debug)]
pub enum ConnInfo {
    /// A TCP peer.
    Tcp(tonic::transport::server::TcpConnectInfo),
    /// A unix-socket peer.
    Unix(tonic::transport::server::UdsConnectInfo),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Tcp(s) => ConnInfo::Tcp(s.connect_info()),
            Conn::Unix(s) => ConnInfo::Unix(s.get_ref().connect_info()),
            Conn::Tls(s) => ConnInfo::Tcp(s.get_ref().0.connect_info()),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Unix(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Unix(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Incoming = std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<Conn>> + Send>>;

fn incoming(l: Listener) -> Incoming {
    match l {
        Listener::Tcp(l) => Box::pin(
            TcpIncoming::from(l)
                .with_nodelay(Some(true))
                .map(|r| r.map(Conn::Tcp)),
        ),
        Listener::Unix(l) => Box::pin(
            UnixListenerStream::new(l)
                .map(|r| r.map(|s| Conn::Unix(Box::new(AuthorityFix::new(s))))),
        ),
        Listener::Tls(l, config) => tls_incoming(l, config),
    }
}

/// Accepted TLS connections, each handshake in a task of its own (a slow or silent client
/// holds up no one) and bounded by [`crate::tls::HANDSHAKE_TIMEOUT`]. A failed handshake (a
/// refused certificate, plain TCP) closes that connection only. The accept loop ends with
/// the server (the stream dropped), which closes the listener.
fn tls_incoming(l: TcpListener, config: Arc<rustls::ServerConfig>) -> Incoming {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(16);
    tokio::spawn(async move {
        let mut tcp = TcpIncoming::from(l).with_nodelay(Some(true));
        loop {
            let accepted = tokio::select! {
                r = tcp.next() => r,
                _ = tx.closed() => return,
            };
            let stream = match accepted {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
                None => return,
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(Conn::Tls(Box::new(s)))).await;
                    }
                    Ok(Err(e)) => warn!(?peer, error = %e, "tls handshake failed"),
                    Err(_) => warn!(?peer, "tls handshake timed out"),
                }
            });
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Checks `authorization: Bearer TOKEN` when a token is configured.
#[derive(Clone)]
pub struct Auth {
    expected: Option<Vec<u8>>,
}

impl Auth {
    /// `None` leaves the service open, as the Go server is.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected: token.map(|t| memoh_proto::auth::bearer(t).into_bytes()),
        }
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        match req.metadata().get("authorization") {
            Some(v) if memoh_proto::auth::constant_time_eq(v.as_bytes(), expected) => Ok(req),
            _ => Err(ServerError::Unauthenticated.into()),
        }
    }
}

/// Rewrites a trailers-only error response produced before a handler ran (tonic rejects an
/// oversized unary request while decoding it).
fn rewrite_response<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers();
    if h.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return resp;
    }
    let Ok(status) = Status::from_header_map(h).ok_or(()) else {
        return resp;
    };
    if let Some(new) = rewrite_too_large(&status) {
        let h = resp.headers_mut();
        h.remove("grpc-status");
        h.remove("grpc-message");
        h.remove("grpc-status-details-bin");
        if let Err(e) = new.add_header(h) {
            warn!(error = %e, "could not rewrite status");
        }
    }
    resp
}

/// Runs the server on `listener` until `shutdown` resolves: [`run_all`] with one listener.
pub async fn run(
    listener: Listener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_all(vec![listener], config, shutdown).await
}

/// Runs the server on every listener (both services on each) until `shutdown` resolves, then
/// stops accepting, gives running calls `config.shutdown_grace` to finish, kills the remaining
/// exec process groups, and returns.
pub async fn run_all(
    listeners: Vec<Listener>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let seeded = {
        let (d, t) = (config.data_dir.clone(), config.template_dir.clone());
        crate::runtime::spawn_blocking(move || fs::seed_data_dir(&d, &t))?
            .await
            .map_err(|e| ServerError::Spawn(std::io::Error::other(e)))??
    };
    if seeded > 0 {
        info!(files = seeded, "seeded data directory from template");
    }
    let reaper = Reaper::start(config.reap_all).map_err(ServerError::Spawn)?;
    let kill = CancellationToken::new();
    let hub = crate::reverse_http::Hub::new(config.reverse_http_timeout);
    let service = Service::new(
        Resolver::new(&config.data_dir),
        reaper.clone(),
        kill.clone(),
        config.default_exec_timeout,
    )
    .with_reverse_http(hub.clone());
    // The bot's loopback HTTP listener for ReverseHTTP; it stops when `kill` fires.
    let reverse_http = match &config.reverse_http_addr {
        Some(a) => crate::reverse_http::listener::start(a, hub, kill.clone()).await,
        None => None,
    };
    let auth = Auth::new(config.auth_token.as_deref());
    let bridge = BridgeServer::new(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let bridge = InterceptedService::new(bridge, auth.clone());
    let registry = crate::process::Registry::new(config.processes.clone(), reaper, kill.clone());
    let processes = ProcessServiceServer::new(crate::process::service::Processes::new(
        registry,
        service.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_SIZE)
    .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let processes = InterceptedService::new(processes, auth.clone());
    let svc = ContainerServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let svc = InterceptedService::new(svc, auth);

    let (health, health_svc) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(memoh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(memoh_proto::BRIDGE_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(memoh_proto::PROCESS_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Spawn(std::io::Error::other(e)))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(memoh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(memoh_proto::BRIDGE_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(memoh_proto::PROCESS_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Spawn(std::io::Error::other(e)))?;

    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        // Large frames: a 64 KiB message travels in one frame instead of four.
        .max_frame_size(1 << 20)
        // No cumulative budget of streams h2 resets on its own (1024 by default, counted over
        // the connection's whole life): the agent's pooled connection carries every call to
        // the bot, and a stream whose client half-closes after the response ended is reset by
        // the library, so the default ended that connection with a GOAWAY after about ten
        // thousand execs, failing the call in flight. Resets a peer provokes stay bounded
        // (h2's pending-accept reset limit).
        .http2_max_local_error_reset_streams(None)
        // The bridge's pings (WIRE-BRIDGE.md section 2): every 60 s, a peer silent for 15 s
        // after one is gone (its calls end, its commands are killed as on a disconnect).
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(15)))
        .layer(tower::util::MapResponseLayer::new(rewrite_response))
        // A request stream's end reaches a handler only when the client half-closed it: a
        // reset or cancelled upload never commits, whatever the client stack.
        .layer(memoh_proto::clean_end::CleanEndLayer::for_paths(
            memoh_proto::clean_end::CONTAINER_STREAMING_REQUESTS,
        ))
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(svc)
        .add_service(bridge)
        .add_service(processes);

    health
        .set_serving::<ContainerServiceServer<Service>>()
        .await;
    health.set_serving::<BridgeServer<Service>>().await;
    health
        .set_serving::<ProcessServiceServer<crate::process::service::Processes>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let fired = CancellationToken::new();
    let signal = {
        let (fired, health) = (fired.clone(), health.clone());
        async move {
            shutdown.await;
            info!("shutting down: no new connections");
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            fired.cancel();
        }
    };
    let grace = config.shutdown_grace;
    let killer = {
        let (fired, kill) = (fired.clone(), kill.clone());
        async move {
            fired.cancelled().await;
            tokio::time::sleep(grace).await;
            warn!("grace period over: killing running commands");
            kill.cancel();
            // Streams end once their process groups are gone; give them a moment, then stop.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    };

    info!(data_dir = %config.data_dir.display(), auth = config.auth_token.is_some(), "serving");
    let all = futures::stream::select_all(listeners.into_iter().map(incoming));
    let serve = router.serve_with_incoming_shutdown(all, signal);
    tokio::select! {
        r = serve => r.map_err(|e| ServerError::Spawn(std::io::Error::other(e)))?,
        _ = killer => warn!("calls still running after the grace period; exiting anyway"),
    }
    kill.cancel();
    if let Some(h) = reverse_http {
        let _ = h.await;
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;
    use tonic::Code;

    #[test]
    fn auth_interceptor() {
        let mut open = Auth::new(None);
        assert!(open.call(Request::new(())).is_ok());
        let mut auth = Auth::new(Some("s3cret"));
        let err = auth.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer wrong!".parse().unwrap());
        assert_eq!(auth.call(req).unwrap_err().code(), Code::Unauthenticated);
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.call(req).is_ok());
    }

    #[test]
    fn too_large_is_rewritten() {
        let s = Status::out_of_range(
            "Error, decoded message length too large: found 20000000 bytes, the limit is: 16777216 bytes",
        );
        let r = rewrite_too_large(&s).unwrap();
        assert_eq!(r.code(), Code::ResourceExhausted);
        assert!(r.message().contains("20000000"), "{}", r.message());
        assert!(r.message().contains("WriteRaw"));
        assert!(rewrite_too_large(&Status::out_of_range("other")).is_none());
    }
}
