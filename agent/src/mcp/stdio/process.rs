//! The server process of a [`super::Session`]: starting it (with backoff), the handshake,
//! requests and replies, its output and stderr, and its end (restart or idle close).

use crate::sync::lock;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::jsonrpc::{encode_line, parse_line, request_message, response_message, Incoming};
use super::{
    CallError, Inner, Output, PendingGuard, RpcError, Running, ServerMessage,
    HANDSHAKE_PROTOCOL_VERSION, MAX_LINE, STDERR_KEEP,
};

impl Inner {
    pub(super) fn note(&self, text: &str) {
        let line = format!("[memoh-agent] {text}\n");
        self.push_stderr(line.as_bytes());
    }

    pub(super) fn push_stderr(&self, data: &[u8]) {
        let mut buf = lock(&self.stderr);
        buf.extend(data);
        let over = buf.len().saturating_sub(STDERR_KEEP);
        buf.drain(..over);
    }

    pub(super) fn stderr_tail(&self) -> String {
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
    pub(super) async fn running(self: Arc<Self>) -> Result<Arc<Running>, CallError> {
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

    pub(super) fn start_err(&self, reason: String) -> CallError {
        CallError::Start {
            name: self.name.clone(),
            reason: format!("{reason}; {}", self.stderr_tail()),
        }
    }

    pub(super) fn backoff(&self, failures: u32) -> Duration {
        let f = failures.saturating_sub(1).min(16);
        (self.cfg.backoff_min * 2u32.pow(f)).min(self.cfg.backoff_max)
    }

    pub(super) async fn ensure_handshake(
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

    pub(super) async fn send(&self, run: &Running, msg: &Value) -> bool {
        run.stdin.send(Bytes::from(encode_line(msg))).await.is_ok()
    }

    pub(super) async fn notify(&self, run: &Running, method: &str, params: Option<Value>) {
        let mut msg = json!({"jsonrpc": "2.0", "method": method});
        if let Some(p) = params {
            msg["params"] = p;
        }
        self.send(run, &msg).await;
    }

    pub(super) fn closed_err(&self, run: &Running) -> CallError {
        let why = lock(&run.exit_reason)
            .clone()
            .unwrap_or_else(|| "the server process ended".into());
        CallError::Closed {
            name: self.name.clone(),
            reason: format!("{why}; {}", self.stderr_tail()),
        }
    }

    pub(super) async fn request(
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
    pub(super) fn stop(&self, run: &Running, why: &str) {
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

    pub(super) async fn read_loop(
        self: Arc<Self>,
        run: Arc<Running>,
        mut output: mpsc::Receiver<Output>,
    ) {
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

    pub(super) fn finish(self: Arc<Self>, run: Arc<Running>, code: Option<i32>) {
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

    pub(super) async fn idle_loop(self: Arc<Self>, run: Arc<Running>) {
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

    pub(super) async fn handle_line(&self, run: &Running, line: &[u8]) {
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
