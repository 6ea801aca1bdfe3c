//! Long-lived sessions with stdio MCP servers running inside a bot.
//!
//! A [`Session`] owns one server process (started through a [`Launcher`]: in production an
//! `Exec` in the bot with no timeout) and forwards JSON-RPC to it. Ids sent to the server are the
//! session's own counter, so the ids of the different clients (kept by the HTTP layer) and the
//! ids of the agent's own requests can never collide. The `initialize` handshake happens once
//! per process: a client's `initialize` is forwarded the first time and its result replayed
//! later; a call before any `initialize` makes the session shake hands itself. A failed
//! handshake is retried on the next call. The process is restarted with backoff when it exits,
//! closed when idle, and its stderr (last 64 KiB) is kept for logs and error messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

mod jsonrpc;
mod process;

pub use jsonrpc::{encode_line, parse_line, request_message, response_message, Incoming};

/// Bytes of stderr kept per session.
pub const STDERR_KEEP: usize = 64 * 1024;
/// The protocol version the agent asks for when it shakes hands itself.
pub const HANDSHAKE_PROTOCOL_VERSION: &str = "2025-06-18";
/// Longest line accepted from a server (bigger ones are dropped with a warning).
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// Output of a launched server process.
#[derive(Debug)]
pub enum Output {
    /// Bytes on stdout.
    Stdout(Bytes),
    /// Bytes on stderr.
    Stderr(Bytes),
    /// The process ended with this code (-1: signal).
    Exit(i32),
}

/// A running server process as the session sees it.
pub struct Pipe {
    /// The process's stdin; dropping every sender closes it.
    pub stdin: mpsc::Sender<Bytes>,
    /// The process's output; ends (or yields [`Output::Exit`]) when it is gone.
    pub output: mpsc::Receiver<Output>,
    /// Dropping this stops the process.
    pub guard: Box<dyn Send + Sync>,
}

/// Starts server processes. The real one runs the command in the bot through `Exec`; tests use
/// a scripted peer.
#[async_trait::async_trait]
pub trait Launcher: Send + Sync + 'static {
    /// Starts one process.
    async fn launch(&self) -> Result<Pipe, String>;
}

/// A JSON-RPC error object, passed through unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// `code`.
    pub code: i64,
    /// `message`.
    pub message: String,
    /// `data`.
    pub data: Option<Value>,
}

/// Why a call through a session failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The server answered with an error object.
    #[error("server error {}: {}", .0.code, .0.message)]
    Rpc(RpcError),
    /// The server could not be started.
    #[error("mcp server {name:?} could not be started: {reason}")]
    Start {
        /// The server.
        name: String,
        /// Why, with its recent stderr.
        reason: String,
    },
    /// The handshake the session performed itself failed.
    #[error("mcp server {name:?} failed the initialize handshake: {reason}")]
    Handshake {
        /// The server.
        name: String,
        /// Why.
        reason: String,
    },
    /// The process went away while the call was in flight.
    #[error("mcp server {name:?} closed: {reason}")]
    Closed {
        /// The server.
        name: String,
        /// Why, with its recent stderr.
        reason: String,
    },
    /// The caller cancelled.
    #[error("call cancelled")]
    Cancelled,
}

/// A message from the server to its clients.
#[derive(Debug, Clone)]
pub enum ServerMessage {
    /// A notification: `method`, `params`.
    Notification {
        /// The method.
        method: String,
        /// The params, if any.
        params: Option<Value>,
    },
    /// A request the client must answer through [`Session::respond`].
    Request {
        /// The process generation it came from (answers to an older process are dropped).
        generation: u64,
        /// The server's own id, to be used in the answer.
        id: Value,
        /// The method.
        method: String,
        /// The params, if any.
        params: Option<Value>,
        /// The client that should answer (the last one that called), 0 for any.
        target: u64,
    },
}

/// Timing knobs of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Close the process after this long without calls.
    pub idle: Duration,
    /// First restart delay after an exit.
    pub backoff_min: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
    /// How long a started process must live for its failures to be forgotten.
    pub healthy_after: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(600),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
        }
    }
}

/// What `mcp ls` shows about a live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    /// Whether a process is running now.
    pub running: bool,
    /// Processes started so far.
    pub starts: u64,
    /// How the last process ended, if one did.
    pub last_exit: Option<String>,
}

/// One long-lived session with one stdio MCP server.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    launcher: Arc<dyn Launcher>,
    cfg: SessionConfig,
    state: Mutex<State>,
    start_lock: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    next_client: AtomicU64,
    last_client: AtomicU64,
    events: broadcast::Sender<ServerMessage>,
    stderr: Mutex<VecDeque<u8>>,
    closed: CancellationToken,
}

#[derive(Default)]
struct State {
    running: Option<Arc<Running>>,
    generation: u64,
    failures: u32,
    not_before: Option<Instant>,
    starts: u64,
    last_exit: Option<String>,
}

type Reply = Result<Value, RpcError>;

struct Running {
    generation: u64,
    started: Instant,
    stdin: mpsc::Sender<Bytes>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    handshake: tokio::sync::Mutex<Option<Value>>,
    gone: CancellationToken,
    stopping: AtomicBool,
    last_used: Mutex<Instant>,
    active: AtomicUsize,
    guard: Mutex<Option<Box<dyn Send + Sync>>>,
    exit_reason: Mutex<Option<String>>,
}

/// Removes a pending entry when the call ends in any way (answer, close, cancel, drop).
struct PendingGuard<'a> {
    run: &'a Running,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.run.pending).remove(&self.id);
        self.run.active.fetch_sub(1, Ordering::SeqCst);
        *lock(&self.run.last_used) = Instant::now();
    }
}

impl Session {
    /// A session for server `name`; nothing starts until the first call.
    pub fn new(name: impl Into<String>, launcher: Arc<dyn Launcher>, cfg: SessionConfig) -> Self {
        let (events, _) = broadcast::channel(256);
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                launcher,
                cfg,
                state: Mutex::new(State::default()),
                start_lock: tokio::sync::Mutex::new(()),
                next_id: AtomicU64::new(1),
                next_client: AtomicU64::new(1),
                last_client: AtomicU64::new(0),
                events,
                stderr: Mutex::new(VecDeque::new()),
                closed: CancellationToken::new(),
            }),
        }
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A new client id, for [`Session::call`] and for filtering [`ServerMessage::Request`].
    pub fn new_client(&self) -> u64 {
        self.inner.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// Messages from the server (requests and notifications) for the clients.
    pub fn subscribe(&self) -> broadcast::Receiver<ServerMessage> {
        self.inner.events.subscribe()
    }

    /// The last 64 KiB of the server's stderr (and the session's own notes).
    pub fn logs(&self) -> String {
        let buf = lock(&self.inner.stderr);
        let (a, b) = buf.as_slices();
        let mut v = Vec::with_capacity(buf.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Whether a process runs, how often one started, how the last one ended.
    pub fn status(&self) -> SessionStatus {
        let st = lock(&self.inner.state);
        SessionStatus {
            running: st.running.is_some(),
            starts: st.starts,
            last_exit: st.last_exit.clone(),
        }
    }

    /// Stops the process for good (the registration was removed or the agent stops).
    pub fn close(&self) {
        self.inner.closed.cancel();
        let run = lock(&self.inner.state).running.take();
        if let Some(run) = run {
            self.inner.stop(&run, "session closed");
        }
    }

    /// Sends request `method` with `params` and waits for the server's answer. `client` is the
    /// caller's id from [`Session::new_client`] (0 if none); `cancel` abandons the call.
    pub async fn call(
        &self,
        client: u64,
        method: &str,
        params: Option<Value>,
        cancel: &CancellationToken,
    ) -> Result<Value, CallError> {
        if client != 0 {
            self.inner.last_client.store(client, Ordering::Relaxed);
        }
        let run = tokio::select! {
            r = self.inner.clone().running() => r?,
            _ = cancel.cancelled() => return Err(CallError::Cancelled),
        };
        *lock(&run.last_used) = Instant::now();
        if method == "initialize" {
            let mut hs = tokio::select! {
                g = run.handshake.lock() => g,
                _ = cancel.cancelled() => return Err(CallError::Cancelled),
            };
            if let Some(r) = hs.as_ref() {
                return Ok(r.clone());
            }
            let r = self.inner.request(&run, method, params, cancel).await?;
            self.inner
                .notify(&run, "notifications/initialized", None)
                .await;
            *hs = Some(r.clone());
            return Ok(r);
        }
        self.inner.ensure_handshake(&run, cancel).await?;
        self.inner.request(&run, method, params, cancel).await
    }

    /// Forwards a client notification. `notifications/initialized` is dropped: the session sends
    /// its own right after the handshake.
    pub async fn notify(&self, method: &str, params: Option<Value>) {
        if method == "notifications/initialized" {
            return;
        }
        let run = lock(&self.inner.state).running.clone();
        if let Some(run) = run {
            self.inner.notify(&run, method, params).await;
        }
    }

    /// Answers server request `id` of process `generation`.
    pub async fn respond(&self, generation: u64, id: Value, reply: Result<Value, RpcError>) {
        let run = lock(&self.inner.state).running.clone();
        let Some(run) = run.filter(|r| r.generation == generation) else {
            debug!(server = %self.inner.name, "answer for a process that is gone dropped");
            return;
        };
        let msg = response_message(id, reply);
        self.inner.send(&run, &msg).await;
    }

    /// The number of calls waiting for the server (for tests and diagnostics).
    pub fn pending(&self) -> usize {
        lock(&self.inner.state)
            .running
            .as_ref()
            .map_or(0, |r| lock(&r.pending).len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let s = Session::new(
            "x",
            Arc::new(NoLaunch),
            SessionConfig {
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(1),
                ..Default::default()
            },
        );
        let b: Vec<_> = (1..=6).map(|f| s.inner.backoff(f).as_millis()).collect();
        assert_eq!(b, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn stderr_ring_keeps_the_last_64k() {
        let s = Session::new("x", Arc::new(NoLaunch), SessionConfig::default());
        s.inner.push_stderr(&vec![b'a'; 60_000]);
        s.inner.push_stderr(&vec![b'b'; 10_000]);
        let l = s.logs();
        assert_eq!(l.len(), STDERR_KEEP);
        assert!(l.ends_with(&"b".repeat(10_000)));
    }

    struct NoLaunch;
    #[async_trait::async_trait]
    impl Launcher for NoLaunch {
        async fn launch(&self) -> Result<Pipe, String> {
            Err("no".into())
        }
    }
}

#[cfg(test)]
mod scripted;
