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
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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

fn error_value(e: &RpcError) -> Value {
    let mut v = json!({"code": e.code, "message": e.message});
    if let Some(d) = &e.data {
        v["data"] = d.clone();
    }
    v
}

impl Inner {
    fn note(&self, text: &str) {
        let line = format!("[memoh-agent] {text}\n");
        self.push_stderr(line.as_bytes());
    }

    fn push_stderr(&self, data: &[u8]) {
        let mut buf = lock(&self.stderr);
        buf.extend(data);
        let over = buf.len().saturating_sub(STDERR_KEEP);
        buf.drain(..over);
    }

    fn stderr_tail(&self) -> String {
        let buf = lock(&self.stderr);
        let n = buf.len().min(2048);
        let v: Vec<u8> = buf.iter().skip(buf.len() - n).copied().collect();
        let s = String::from_utf8_lossy(&v);
        let s = s.trim();
        if s.is_empty() {
            "no stderr output".into()
        } else {
            format!("stderr: {s}")
        }
    }

    /// The running process, started if there is none (after any backoff).
    async fn running(self: Arc<Self>) -> Result<Arc<Running>, CallError> {
        if let Some(r) = lock(&self.state).running.clone() {
            return Ok(r);
        }
        let _g = self.start_lock.lock().await;
        let not_before = {
            let st = lock(&self.state);
            if let Some(r) = st.running.clone() {
                return Ok(r);
            }
            st.not_before
        };
        if self.closed.is_cancelled() {
            return Err(self.start_err("the server was removed".into()));
        }
        if let Some(t) = not_before {
            tokio::time::sleep_until(t.into()).await;
        }
        let pipe = match self.launcher.launch().await {
            Ok(p) => p,
            Err(e) => {
                let mut st = lock(&self.state);
                st.failures += 1;
                st.not_before = Some(Instant::now() + self.backoff(st.failures));
                drop(st);
                self.note(&format!("start failed: {e}"));
                return Err(self.start_err(e));
            }
        };
        let run = {
            let mut st = lock(&self.state);
            st.generation += 1;
            st.starts += 1;
            st.not_before = None;
            let run = Arc::new(Running {
                generation: st.generation,
                started: Instant::now(),
                stdin: pipe.stdin,
                pending: Mutex::new(HashMap::new()),
                handshake: tokio::sync::Mutex::new(None),
                gone: CancellationToken::new(),
                stopping: AtomicBool::new(false),
                last_used: Mutex::new(Instant::now()),
                active: AtomicUsize::new(0),
                guard: Mutex::new(Some(pipe.guard)),
                exit_reason: Mutex::new(None),
            });
            st.running = Some(run.clone());
            run
        };
        info!(server = %self.name, generation = run.generation, "mcp server started");
        self.note(&format!("started (run {})", run.generation));
        tokio::spawn(self.clone().read_loop(run.clone(), pipe.output));
        tokio::spawn(self.clone().idle_loop(run.clone()));
        Ok(run)
    }

    fn start_err(&self, reason: String) -> CallError {
        CallError::Start {
            name: self.name.clone(),
            reason: format!("{reason}; {}", self.stderr_tail()),
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let f = failures.saturating_sub(1).min(16);
        (self.cfg.backoff_min * 2u32.pow(f)).min(self.cfg.backoff_max)
    }

    async fn ensure_handshake(
        &self,
        run: &Running,
        cancel: &CancellationToken,
    ) -> Result<(), CallError> {
        let mut hs = tokio::select! {
            g = run.handshake.lock() => g,
            _ = cancel.cancelled() => return Err(CallError::Cancelled),
        };
        if hs.is_some() {
            return Ok(());
        }
        let params = json!({
            "protocolVersion": HANDSHAKE_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "memoh-agent", "version": env!("CARGO_PKG_VERSION")},
        });
        match self.request(run, "initialize", Some(params), cancel).await {
            Ok(r) => {
                self.notify(run, "notifications/initialized", None).await;
                *hs = Some(r);
                Ok(())
            }
            Err(CallError::Cancelled) => Err(CallError::Cancelled),
            Err(e) => {
                self.note(&format!("initialize failed: {e}"));
                Err(CallError::Handshake {
                    name: self.name.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }

    async fn send(&self, run: &Running, msg: &Value) -> bool {
        run.stdin.send(Bytes::from(encode_line(msg))).await.is_ok()
    }

    async fn notify(&self, run: &Running, method: &str, params: Option<Value>) {
        let mut msg = json!({"jsonrpc": "2.0", "method": method});
        if let Some(p) = params {
            msg["params"] = p;
        }
        self.send(run, &msg).await;
    }

    fn closed_err(&self, run: &Running) -> CallError {
        let why = lock(&run.exit_reason)
            .clone()
            .unwrap_or_else(|| "the server process ended".into());
        CallError::Closed {
            name: self.name.clone(),
            reason: format!("{why}; {}", self.stderr_tail()),
        }
    }

    async fn request(
        &self,
        run: &Running,
        method: &str,
        params: Option<Value>,
        cancel: &CancellationToken,
    ) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        run.active.fetch_add(1, Ordering::SeqCst);
        lock(&run.pending).insert(id, tx);
        let _guard = PendingGuard { run, id };
        if run.gone.is_cancelled() {
            return Err(self.closed_err(run));
        }
        let msg = request_message(id, method, params);
        if !self.send(run, &msg).await {
            return Err(self.closed_err(run));
        }
        tokio::select! {
            r = rx => match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(CallError::Rpc(e)),
                Err(_) => Err(self.closed_err(run)),
            },
            _ = run.gone.cancelled() => Err(self.closed_err(run)),
            _ = cancel.cancelled() => {
                self.notify(run, "notifications/cancelled", Some(json!({"requestId": id, "reason": "client cancelled"}))).await;
                Err(CallError::Cancelled)
            }
        }
    }

    /// Stops `run` on purpose (idle, removal): no restart follows.
    fn stop(&self, run: &Running, why: &str) {
        run.stopping.store(true, Ordering::SeqCst);
        *lock(&run.exit_reason) = Some(why.to_string());
        lock(&run.guard).take();
        run.gone.cancel();
        let mut st = lock(&self.state);
        if st
            .running
            .as_ref()
            .is_some_and(|r| r.generation == run.generation)
        {
            st.running = None;
        }
    }

    async fn read_loop(self: Arc<Self>, run: Arc<Running>, mut output: mpsc::Receiver<Output>) {
        let mut buf: Vec<u8> = Vec::new();
        let mut code = None;
        loop {
            let msg = tokio::select! {
                m = output.recv() => m,
                _ = run.gone.cancelled() => break,
            };
            match msg {
                Some(Output::Stdout(data)) => {
                    buf.extend_from_slice(&data);
                    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=nl).collect();
                        self.handle_line(&run, &line).await;
                    }
                    if buf.len() > MAX_LINE {
                        warn!(server = %self.name, "line over the limit dropped");
                        buf.clear();
                    }
                }
                Some(Output::Stderr(data)) => self.push_stderr(&data),
                Some(Output::Exit(c)) => {
                    code = Some(c);
                    break;
                }
                None => break,
            }
        }
        if !buf.is_empty() {
            self.handle_line(&run, &buf).await;
        }
        self.finish(run, code);
    }

    fn finish(self: Arc<Self>, run: Arc<Running>, code: Option<i32>) {
        let deliberate = run.stopping.load(Ordering::SeqCst);
        let why = match code {
            Some(c) => format!("the server process exited with code {c}"),
            None if deliberate => lock(&run.exit_reason).clone().unwrap_or_default(),
            None => "the connection to the server process was lost".to_string(),
        };
        {
            let mut r = lock(&run.exit_reason);
            if r.is_none() {
                *r = Some(why.clone());
            }
        }
        run.gone.cancel();
        lock(&run.guard).take();
        // Fail everything still waiting, promptly.
        let waiting: Vec<_> = lock(&run.pending).drain().collect();
        drop(waiting);
        let delay = {
            let mut st = lock(&self.state);
            if st
                .running
                .as_ref()
                .is_some_and(|r| r.generation == run.generation)
            {
                st.running = None;
            }
            st.last_exit = Some(why.clone());
            if deliberate {
                None
            } else {
                if run.started.elapsed() >= self.cfg.healthy_after {
                    st.failures = 0;
                }
                st.failures += 1;
                let d = self.backoff(st.failures);
                st.not_before = Some(Instant::now() + d);
                Some(d)
            }
        };
        if deliberate {
            info!(server = %self.name, reason = %why, "mcp server stopped");
            self.note(&format!("stopped: {why}"));
            return;
        }
        let Some(delay) = delay else { return };
        warn!(server = %self.name, reason = %why, ?delay, "mcp server exited; restarting");
        self.note(&format!("{why}; restarting in {} ms", delay.as_millis()));
        if self.closed.is_cancelled() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = me.closed.cancelled() => return,
            }
            if let Err(e) = me.clone().running().await {
                debug!(server = %me.name, error = %e, "restart failed");
            }
        });
    }

    async fn idle_loop(self: Arc<Self>, run: Arc<Running>) {
        let tick = (self.cfg.idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = run.gone.cancelled() => return,
            }
            let idle_for = lock(&run.last_used).elapsed();
            if run.active.load(Ordering::SeqCst) == 0 && idle_for >= self.cfg.idle {
                info!(server = %self.name, "closing idle mcp server");
                self.stop(&run, "closed after being idle");
                return;
            }
        }
    }

    async fn handle_line(&self, run: &Running, line: &[u8]) {
        match parse_line(line) {
            Incoming::Blank => {}
            Incoming::Log(text) => {
                // Servers sometimes print logs on stdout; keep them with stderr.
                self.push_stderr(format!("[stdout] {text}\n").as_bytes());
            }
            Incoming::Reply { id, reply } => {
                let tx = lock(&run.pending).remove(&id);
                match tx {
                    Some(tx) => {
                        let _ = tx.send(reply);
                    }
                    None => {
                        debug!(server = %self.name, id, "answer for a call no longer waiting")
                    }
                }
            }
            Incoming::StrayReply(id) => {
                warn!(server = %self.name, ?id, "answer with an id the agent never used");
            }
            Incoming::Request { id, method, params } => {
                let target = self.last_client.load(Ordering::Relaxed);
                let m = ServerMessage::Request {
                    generation: run.generation,
                    id: id.clone(),
                    method,
                    params,
                    target,
                };
                if self.events.send(m).is_err() {
                    let e = response_message(
                        id,
                        Err(RpcError {
                            code: -32601,
                            message: "no client is connected to answer server requests".into(),
                            data: None,
                        }),
                    );
                    self.send(run, &e).await;
                }
            }
            Incoming::Notification { method, params } => {
                let _ = self
                    .events
                    .send(ServerMessage::Notification { method, params });
            }
            Incoming::Dropped => {
                debug!(server = %self.name, "message without method or id dropped")
            }
        }
    }
}

/// One line of a server's stdout, classified. Pure, so the envelope and id handling can be
/// fuzzed (`fuzz/fuzz_targets/jsonrpc_envelope.rs`).
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// Nothing but whitespace.
    Blank,
    /// Not a JSON object: a log line printed on stdout, trimmed.
    Log(String),
    /// The answer to the agent's request `id`.
    Reply {
        /// The agent's id.
        id: u64,
        /// The result or the error object.
        reply: Result<Value, RpcError>,
    },
    /// An answer whose id the agent cannot have sent (not an unsigned integer).
    StrayReply(Value),
    /// A request from the server to the client.
    Request {
        /// The server's id, echoed in the answer.
        id: Value,
        /// The method.
        method: String,
        /// The params, if any.
        params: Option<Value>,
    },
    /// A notification from the server.
    Notification {
        /// The method.
        method: String,
        /// The params, if any.
        params: Option<Value>,
    },
    /// A JSON object with neither a method nor an id.
    Dropped,
}

/// Classifies one line (with or without its newline) a server printed.
pub fn parse_line(line: &[u8]) -> Incoming {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return Incoming::Blank;
    }
    let Ok(Value::Object(mut msg)) = serde_json::from_str::<Value>(text) else {
        return Incoming::Log(text.to_string());
    };
    let method = msg
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = msg.remove("id");
    let params = msg.remove("params");
    match (method, id) {
        (None, Some(id)) => {
            let Some(id) = id.as_u64() else {
                return Incoming::StrayReply(id);
            };
            let reply = match (msg.remove("result"), msg.remove("error")) {
                (_, Some(e)) => Err(RpcError {
                    code: e.get("code").and_then(Value::as_i64).unwrap_or(-32603),
                    message: e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    data: e.get("data").cloned(),
                }),
                (Some(r), None) => Ok(r),
                (None, None) => Ok(Value::Null),
            };
            Incoming::Reply { id, reply }
        }
        (Some(method), Some(id)) => Incoming::Request { id, method, params },
        (Some(method), None) => Incoming::Notification { method, params },
        (None, None) => Incoming::Dropped,
    }
}

/// The request the agent sends: `{"jsonrpc": "2.0", "id", "method", "params"?}`.
pub fn request_message(id: u64, method: &str, params: Option<Value>) -> Value {
    let mut msg = json!({"jsonrpc": "2.0", "id": id, "method": method});
    if let Some(p) = params {
        msg["params"] = p;
    }
    msg
}

/// The answer to a server's request `id`.
pub fn response_message(id: Value, reply: Result<Value, RpcError>) -> Value {
    match reply {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": error_value(&e)}),
    }
}

/// One message as the line written to the server's stdin: compact JSON and a newline.
pub fn encode_line(msg: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).unwrap_or_default();
    line.push(b'\n');
    line
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
#[path = "stdio_tests.rs"]
mod scripted;
