//! MCP over streamable HTTP (rmcp): a bot's container as tools, and stdio MCP servers inside it.
//!
//! Routes (default listen address `127.0.0.1:8091`, optional bearer token):
//! - `/bots/{BOT}/mcp`: [`bridge::ToolsServer`], the tools of [`tools`] (the `edit` matcher
//!   is [`edit`]).
//! - `/bots/{BOT}/mcp/{NAME}`: [`bridge::StdioBridge`] onto the long-lived [`stdio::Session`] of
//!   the server registered as NAME ([`registry`]), which runs inside the bot through `Exec`.
//!
//! Every call into a bot goes through a [`ClientSource`] (the lifecycle manager's pool in
//! production, a fixed client in tests).

pub mod access;
pub mod bridge;
pub mod edit;
pub mod registry;
pub mod stdio;
pub mod tools;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use memoh_proto::pb::mcpcontainer as pb;
use memoh_proto::ContainerClient;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bots::Manager;
use crate::config::Config;
use crate::error::AgentError;
use crate::sync::lock;
use bridge::{StdioBridge, ToolsServer};
use registry::ServerSpec;
use stdio::{Launcher, Output, Pipe, Session, SessionConfig};

/// Hands out the container client of a bot.
#[async_trait::async_trait]
pub trait ClientSource: Send + Sync + 'static {
    /// The client of `bot`'s container server.
    async fn client(&self, bot: &str) -> Result<ContainerClient, AgentError>;
    /// Tells the source a call failed at the transport level.
    fn report_failure(&self, _bot: &str, _status: &tonic::Status) {}
    /// Every bot with its figures, for `/metrics` (`None`: not known to this source).
    async fn bot_samples(&self) -> Option<Vec<crate::metrics::BotSample>> {
        None
    }
}

#[async_trait::async_trait]
impl ClientSource for Manager {
    async fn client(&self, bot: &str) -> Result<ContainerClient, AgentError> {
        Manager::client(self, bot).await
    }
    fn report_failure(&self, bot: &str, status: &tonic::Status) {
        Manager::report_failure(self, bot, status)
    }
    async fn bot_samples(&self) -> Option<Vec<crate::metrics::BotSample>> {
        let bots = self.list().await.ok()?;
        Some(bots.iter().map(crate::bots::resources::sample).collect())
    }
}

/// A client that always goes to the same server (tests, single-bot tools).
pub struct FixedClient(pub ContainerClient);

#[async_trait::async_trait]
impl ClientSource for FixedClient {
    async fn client(&self, _bot: &str) -> Result<ContainerClient, AgentError> {
        Ok(self.0.clone())
    }
}

/// Runs a registered server inside the bot through `Exec`, reading the registration afresh at
/// every start (so a rollback or an `mcp add` that replaced it takes effect on restart).
pub struct ExecLauncher {
    source: Arc<dyn ClientSource>,
    bot: String,
    name: String,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[async_trait::async_trait]
impl Launcher for ExecLauncher {
    async fn launch(&self) -> Result<Pipe, String> {
        let client = self
            .source
            .client(&self.bot)
            .await
            .map_err(|e| e.to_string())?;
        let specs = registry::load(&client, &self.bot)
            .await
            .map_err(|e| e.to_string())?;
        let spec = specs
            .into_iter()
            .find(|s| s.name == self.name)
            .ok_or_else(|| format!("bot {:?} has no mcp server named {:?}", self.bot, self.name))?;
        let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(64);
        let first = pb::ExecInput {
            command: registry::command_line(&spec),
            work_dir: spec
                .cwd
                .clone()
                .map(|d| tools::server_path(&d))
                .unwrap_or_default(),
            env: spec.env.clone(),
            // The server lives as long as the session: effectively no timeout.
            timeout_seconds: i32::MAX,
            ..Default::default()
        };
        let mut out = client
            .exec(first, tokio_stream::wrappers::ReceiverStream::new(stdin_rx))
            .await
            .map_err(|s| format!("exec in bot {:?}: {}", self.bot, s.message()))?;
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let msg = match out.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(s) => {
                        let note = format!("[memoh-agent] exec stream failed: {}\n", s.message());
                        let _ = tx.send(Output::Stderr(Bytes::from(note))).await;
                        break;
                    }
                };
                let item = match pb::exec_output::Stream::try_from(msg.stream) {
                    Ok(pb::exec_output::Stream::Stdout) => Output::Stdout(msg.data),
                    Ok(pb::exec_output::Stream::Stderr) => Output::Stderr(msg.data),
                    Ok(pb::exec_output::Stream::Exit) => Output::Exit(msg.exit_code),
                    Err(_) => continue,
                };
                let exit = matches!(item, Output::Exit(_));
                if tx.send(item).await.is_err() {
                    break;
                }
                if exit {
                    memoh_proto::client::finish_after_exit(&mut out).await;
                    break;
                }
            }
        });
        Ok(Pipe {
            stdin: stdin_tx,
            output: rx,
            guard: Box::new(AbortOnDrop(task)),
        })
    }
}

type ToolsService = StreamableHttpService<ToolsServer, LocalSessionManager>;
type BridgeService = StreamableHttpService<StdioBridge, LocalSessionManager>;

/// The MCP side of the agent: sessions, registrations and the HTTP services.
pub struct Mcp {
    source: Arc<dyn ClientSource>,
    session_cfg: SessionConfig,
    http_cfg: StreamableHttpServerConfig,
    http_keep_alive: Duration,
    tools: Mutex<HashMap<String, ToolsService>>,
    stdio: Mutex<HashMap<(String, String), (Session, BridgeService)>>,
    reg_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The listener's access rules and address, once it serves (for `mcp token`).
    access: Mutex<Option<(access::Access, String)>>,
}

/// What `mcp ls` reports per server.
#[derive(Debug, Clone)]
pub struct ServerListing {
    /// The registration.
    pub spec: ServerSpec,
    /// The live session's state, when one exists.
    pub status: Option<stdio::SessionStatus>,
}

impl Mcp {
    /// Builds the MCP side on `source` with the stdio sessions' settings.
    pub fn new(
        source: Arc<dyn ClientSource>,
        session_cfg: SessionConfig,
        stop: CancellationToken,
    ) -> Self {
        let http_cfg = StreamableHttpServerConfig::default()
            .disable_allowed_hosts()
            .with_cancellation_token(stop);
        Self {
            source,
            http_keep_alive: session_cfg.idle.max(Duration::from_secs(300)),
            session_cfg,
            http_cfg,
            tools: Mutex::new(HashMap::new()),
            stdio: Mutex::new(HashMap::new()),
            reg_locks: Mutex::new(HashMap::new()),
            access: Mutex::new(None),
        }
    }

    fn session_manager(&self) -> Arc<LocalSessionManager> {
        let mut m = LocalSessionManager::default();
        m.session_config.keep_alive = Some(self.http_keep_alive);
        Arc::new(m)
    }

    fn tools_service(&self, bot: &str) -> ToolsService {
        let mut map = lock(&self.tools);
        if let Some(s) = map.get(bot) {
            return s.clone();
        }
        let server = ToolsServer::new(self.source.clone(), bot);
        let svc = StreamableHttpService::new(
            move || Ok(server.clone()),
            self.session_manager(),
            self.http_cfg.clone(),
        );
        map.insert(bot.to_string(), svc.clone());
        svc
    }

    /// The live session of `bot`'s server `name`, created (not started) if the server is
    /// registered.
    pub async fn session(&self, bot: &str, name: &str) -> Result<Session, AgentError> {
        Ok(self.stdio_service(bot, name).await?.0)
    }

    async fn stdio_service(
        &self,
        bot: &str,
        name: &str,
    ) -> Result<(Session, BridgeService), AgentError> {
        let key = (bot.to_string(), name.to_string());
        if let Some(s) = lock(&self.stdio).get(&key) {
            return Ok(s.clone());
        }
        registry::validate_name(name)?;
        let client = self.source.client(bot).await?;
        let specs = registry::load(&client, bot).await?;
        if !specs.iter().any(|s| s.name == name) {
            return Err(AgentError::NotFound(format!(
                "bot {bot:?} has no mcp server named {name:?}"
            )));
        }
        let mut map = lock(&self.stdio);
        if let Some(s) = map.get(&key) {
            return Ok(s.clone());
        }
        let launcher = Arc::new(ExecLauncher {
            source: self.source.clone(),
            bot: bot.to_string(),
            name: name.to_string(),
        });
        let session = Session::new(name, launcher, self.session_cfg.clone());
        let s2 = session.clone();
        let svc = StreamableHttpService::new(
            move || Ok(StdioBridge::new(s2.clone())),
            self.session_manager(),
            self.http_cfg.clone(),
        );
        map.insert(key, (session.clone(), svc.clone()));
        Ok((session, svc))
    }

    fn reg_lock(&self, bot: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.reg_locks)
            .entry(bot.to_string())
            .or_default()
            .clone()
    }

    /// Registers (or replaces) a stdio server in `bot`; a replaced server's session restarts.
    pub async fn add(&self, bot: &str, spec: ServerSpec) -> Result<bool, AgentError> {
        let l = self.reg_lock(bot);
        let _g = l.lock().await;
        let client = self.source.client(bot).await?;
        let name = spec.name.clone();
        let replaced = registry::add(&client, bot, spec).await?;
        if let Some((s, _)) = lock(&self.stdio).remove(&(bot.to_string(), name)) {
            s.close();
        }
        Ok(replaced)
    }

    /// Removes a registration and stops its session.
    pub async fn remove(&self, bot: &str, name: &str) -> Result<(), AgentError> {
        let l = self.reg_lock(bot);
        let _g = l.lock().await;
        let client = self.source.client(bot).await?;
        registry::remove(&client, bot, name).await?;
        if let Some((s, _)) = lock(&self.stdio).remove(&(bot.to_string(), name.to_string())) {
            s.close();
        }
        Ok(())
    }

    /// The bot's registrations with the state of their sessions.
    pub async fn list(&self, bot: &str) -> Result<Vec<ServerListing>, AgentError> {
        let client = self.source.client(bot).await?;
        let specs = registry::load(&client, bot).await?;
        let map = lock(&self.stdio);
        Ok(specs
            .into_iter()
            .map(|spec| {
                let status = map
                    .get(&(bot.to_string(), spec.name.clone()))
                    .map(|(s, _)| s.status());
                ServerListing { spec, status }
            })
            .collect())
    }

    /// The server's kept stderr (empty when it never ran since the agent started).
    pub async fn logs(&self, bot: &str, name: &str) -> Result<String, AgentError> {
        Ok(self.session(bot, name).await?.logs())
    }

    /// The listener's bearer token and address, once it serves.
    pub fn token(&self) -> Option<(String, String)> {
        lock(&self.access)
            .as_ref()
            .map(|(a, listen)| (a.token().to_string(), listen.clone()))
    }

    /// Stops every session.
    pub fn close_all(&self) {
        for (_, (s, _)) in lock(&self.stdio).drain() {
            s.close();
        }
    }

    /// The HTTP router of both kinds of endpoints and `/metrics`, behind [`access::Access`]:
    /// `Host` and `Origin` first (403), then the bearer token (401).
    pub fn router(self: &Arc<Self>, access: access::Access) -> axum::Router {
        axum::Router::new()
            .route("/bots/{bot}/mcp", axum::routing::any(tools_route))
            .route("/bots/{bot}/mcp/{name}", axum::routing::any(stdio_route))
            .route("/metrics", axum::routing::get(metrics_route))
            .layer(axum::middleware::from_fn(
                move |req: Request, next: axum::middleware::Next| {
                    let access = access.clone();
                    async move {
                        if let Err(refused) = access.check(&req) {
                            return refused;
                        }
                        let method = req.method().clone();
                        access::session_end_answer(&method, next.run(req).await)
                    }
                },
            ))
            .with_state(self.clone())
    }
}

async fn metrics_route(State(mcp): State<Arc<Mcp>>) -> Response {
    let text = crate::metrics::global().render(mcp.source.bot_samples().await.as_deref());
    let ct = crate::metrics::CONTENT_TYPE;
    ([(header::CONTENT_TYPE, ct)], text).into_response()
}

/// An error as an HTTP answer, through the agent's one error mapping. A bot id that cannot
/// be valid names no resource: 404, as an unknown bot.
fn error_response(e: &AgentError) -> Response {
    let http = match e {
        AgentError::InvalidBotId(_) => 404,
        e => e.http_status(),
    };
    let code = StatusCode::from_u16(http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, format!("{e}\n")).into_response()
}

async fn tools_route(
    State(mcp): State<Arc<Mcp>>,
    Path(bot): Path<String>,
    req: Request,
) -> Response {
    if let Err(e) = crate::ids::validate(&bot) {
        return error_response(&e);
    }
    let svc = mcp.tools_service(&bot);
    svc.handle(req).await.map(Body::new)
}

async fn stdio_route(
    State(mcp): State<Arc<Mcp>>,
    Path((bot, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    if let Err(e) = crate::ids::validate(&bot) {
        return error_response(&e);
    }
    match mcp.stdio_service(&bot, &name).await {
        Ok((_, svc)) => svc.handle(req).await.map(Body::new),
        Err(e) => error_response(&e),
    }
}

/// Binds the configured address and serves MCP until `stop` is cancelled. Returns the hub (for
/// the control API) and the server task; `None` when `mcp_listen` is empty (MCP disabled).
pub async fn serve(
    source: Arc<dyn ClientSource>,
    cfg: &Config,
    stop: CancellationToken,
) -> Result<Option<(Arc<Mcp>, tokio::task::JoinHandle<()>)>, AgentError> {
    if cfg.mcp_listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(&cfg.mcp_listen)
        .await
        .map_err(|e| AgentError::io(format!("mcp listen address {}", cfg.mcp_listen), e))?;
    let session_cfg = SessionConfig {
        idle: Duration::from_secs(cfg.mcp_idle_secs.max(1)),
        ..Default::default()
    };
    let token = access::load_or_create_token(cfg)?;
    let access = access::Access::new(
        &token,
        &cfg.mcp_listen,
        &cfg.mcp_allowed_hosts,
        cfg.metrics_public,
    );
    let mcp = Arc::new(Mcp::new(source, session_cfg, stop.clone()));
    *lock(&mcp.access) = Some((access.clone(), cfg.mcp_listen.clone()));
    let task = serve_on(mcp.clone(), listener, access, stop);
    Ok(Some((mcp, task)))
}

/// Serves `mcp` on an already bound listener until `stop` is cancelled.
pub fn serve_on(
    mcp: Arc<Mcp>,
    listener: TcpListener,
    access: access::Access,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let addr = listener.local_addr().ok();
    let router = mcp.router(access);
    tokio::spawn(async move {
        info!(address = ?addr, "mcp server listening");
        // Without TCP_NODELAY a streamed (SSE) answer, written as headers first and the event
        // later, waits for the client's delayed ACK: about 40 ms on every forwarded call.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                warn!(error = %e, "mcp: cannot set TCP_NODELAY");
            }
        });
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .await;
        mcp.close_all();
        if let Err(e) = r {
            warn!(error = %e, "mcp server failed");
        }
    })
}
