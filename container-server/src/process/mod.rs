//! Processes that outlive the call (`memoh.process.v1.ProcessService`): the registry of a
//! bot's started processes, their bounds, and the tasks that own them.
//!
//! A process is spawned like an exec (`/bin/sh -c`, its own process group, the same child
//! setup, reaped by the server's [`Reaper`]) or on a terminal like a PTY exec, and from then
//! on belongs to the registry, not to a call: one task per process reads its output whether
//! or not anyone is attached, into two [`output::Stream`]s (a ring in memory spilled to files
//! under the process directory), enforces the timeout, and records the exit once the process
//! was reaped and its output read to the end. Attachers, waiters and the janitor only read the
//! record and wake on its change counter ([`tokio::sync::watch`]), so no call can block the
//! reader or the process.
//!
//! Bounds: at most `max_live` running processes (more is RESOURCE_EXHAUSTED), at most
//! `max_kept` finished ones (the oldest dropped first, with its files), each kept at most
//! `retention` after its end. On shutdown (the server's kill token) every live group is
//! killed.

pub mod output;
mod run;
pub mod service;

use run::{feed_pipe, feed_pty, run_pipes, run_pty};

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::ServerError;
use crate::exec::{self, Dialect, ExecSpec};
use crate::pty::{self, TermSize, DEFAULT_SIZE};
use crate::reaper::{Exit, Reaped, Reaper, Usage};

use output::Stream;

/// Default directory of the processes' spill files, inside the bot's writable layer.
pub const DEFAULT_PROCESS_DIR: &str = "/var/lib/memoh/processes";
/// Default bytes of each stream kept in memory.
pub const DEFAULT_RING_BYTES: usize = 4 * 1024 * 1024;
/// Default bytes of each stream kept on disk.
pub const DEFAULT_SPILL_BYTES: u64 = 64 * 1024 * 1024;
/// Default most processes running at once.
pub const DEFAULT_MAX_LIVE: usize = 32;
/// Default most finished processes kept.
pub const DEFAULT_MAX_KEPT: usize = 64;
/// Default time a finished process is kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 128;
/// Read size of the output pipes.
const READ_CHUNK: usize = 32 * 1024;

/// Settings of the process service.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Where each process's spill files go (`<dir>/<id>/stdout.log`); made 0700 when missing.
    pub dir: PathBuf,
    /// Bytes of each stream kept in memory.
    pub ring_bytes: usize,
    /// Bytes of each stream kept on disk (older output is dropped and reported as lost).
    pub spill_bytes: u64,
    /// Most processes running at once.
    pub max_live: usize,
    /// Most finished processes kept.
    pub max_kept: usize,
    /// How long a finished process is kept.
    pub retention: Duration,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_PROCESS_DIR),
            ring_bytes: DEFAULT_RING_BYTES,
            spill_bytes: DEFAULT_SPILL_BYTES,
            max_live: DEFAULT_MAX_LIVE,
            max_kept: DEFAULT_MAX_KEPT,
            retention: DEFAULT_RETENTION,
        }
    }
}

/// A validated start request.
#[derive(Debug, Clone)]
pub struct StartSpec {
    /// The command, its work dir, environment and initial stdin.
    pub exec: ExecSpec,
    /// `Some`: run on a terminal of this size.
    pub pty: Option<TermSize>,
    /// The caller's label.
    pub tag: String,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The reaper's status.
    pub exit: Exit,
    /// Its resource use, when known.
    pub usage: Option<Usage>,
    /// Unix time of the end, milliseconds.
    pub at_ms: i64,
    /// The timeout killed it.
    pub timed_out: bool,
}

impl Ended {
    /// The exit code as a shell reports it (128+N after signal N).
    pub fn code(&self) -> i32 {
        Dialect::Bridge.exit_code(self.exit)
    }
}

/// Input for a process's stdin task.
enum Input {
    Data(Bytes),
}

/// The mutable part of a process record.
pub struct State {
    /// Stdout (on a terminal: everything).
    pub out: Stream,
    /// Stderr (empty on a terminal).
    pub err: Stream,
    /// Set once the process was reaped and its output read to the end.
    pub ended: Option<Ended>,
    /// Feeds the stdin task; `None` once closed.
    stdin: Option<mpsc::Sender<Input>>,
    /// The terminal, for Resize; `None` for a piped process or once ended.
    master: Option<Arc<AsyncFd<OwnedFd>>>,
    /// When it ended, for retention.
    ended_at: Option<Instant>,
}

/// One started process.
pub struct Process {
    /// Its id.
    pub id: String,
    /// The caller's label.
    pub tag: String,
    /// The command line.
    pub command: String,
    /// Its pid (and process group).
    pub pid: i32,
    /// Unix time of the start, milliseconds.
    pub started_at_ms: i64,
    /// On a terminal.
    pub pty: bool,
    dir: PathBuf,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Process {
    /// The record, locked.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that sees every later change (output, the end).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn touch(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether it still runs (or its output is still being read).
    pub fn is_live(&self) -> bool {
        self.lock().ended.is_none()
    }

    /// Sends `sig` to its whole group. FAILED_PRECONDITION once it ended.
    pub fn signal(&self, sig: i32) -> Result<(), ServerError> {
        let st = self.lock();
        if st.ended.is_some() {
            return Err(ServerError::FailedPrecondition(format!(
                "process {} has ended",
                self.id
            )));
        }
        // SAFETY: killpg takes plain integers; it only sends a signal.
        let rc = unsafe { libc::killpg(self.pid, sig) };
        drop(st);
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(ServerError::InvalidArgument(format!(
                    "signal {sig} to process {}: {e}",
                    self.id
                )));
            }
        }
        Ok(())
    }

    /// Queues `data` for its stdin. FAILED_PRECONDITION once stdin is closed or it ended.
    pub async fn write_stdin(&self, data: Bytes) -> Result<(), ServerError> {
        let tx = {
            let st = self.lock();
            match (&st.stdin, st.ended) {
                (Some(tx), None) => tx.clone(),
                (_, Some(_)) => {
                    return Err(ServerError::FailedPrecondition(format!(
                        "process {} has ended",
                        self.id
                    )))
                }
                (None, None) => {
                    return Err(ServerError::FailedPrecondition(format!(
                        "stdin of process {} is closed",
                        self.id
                    )))
                }
            }
        };
        if data.is_empty() {
            return Ok(());
        }
        tx.send(Input::Data(data)).await.map_err(|_| {
            ServerError::FailedPrecondition(format!(
                "stdin of process {} is closed (the process closed it)",
                self.id
            ))
        })
    }

    /// Closes its stdin (on a terminal: types end-of-file, `^D`, and stops taking input).
    pub async fn close_stdin(&self) -> Result<(), ServerError> {
        let tx = {
            let mut st = self.lock();
            if st.ended.is_some() {
                return Err(ServerError::FailedPrecondition(format!(
                    "process {} has ended",
                    self.id
                )));
            }
            st.stdin.take()
        };
        if let (Some(tx), true) = (tx, self.pty) {
            let _ = tx.send(Input::Data(Bytes::from_static(b"\x04"))).await;
        }
        Ok(())
    }

    /// Changes its terminal's size. FAILED_PRECONDITION for a piped or ended process.
    pub fn resize(&self, size: TermSize) -> Result<(), ServerError> {
        let st = self.lock();
        let Some(master) = &st.master else {
            return Err(ServerError::FailedPrecondition(if self.pty {
                format!("process {} has ended", self.id)
            } else {
                format!("process {} has no terminal (started without pty)", self.id)
            }));
        };
        pty::set_size(master.get_ref().as_raw_fd(), size).map_err(|e| {
            ServerError::FailedPrecondition(format!("resize of process {}: {e}", self.id))
        })
    }

    /// Waits until it ended, at most `limit`. Returns whether it did.
    pub async fn wait(&self, limit: Option<Duration>) -> bool {
        let mut rx = self.subscribe();
        let until = limit.map(|l| Instant::now() + l);
        loop {
            rx.borrow_and_update();
            if !self.is_live() {
                return true;
            }
            match until {
                Some(t) => match tokio::time::timeout_at(t, rx.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return !self.is_live(),
                    Err(_) => return false,
                },
                None => {
                    if rx.changed().await.is_err() {
                        return !self.is_live();
                    }
                }
            }
        }
    }
}

/// The bot's processes; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProcessConfig,
    reaper: Reaper,
    kill: CancellationToken,
    /// Oldest first.
    procs: Mutex<Vec<Arc<Process>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new id: 12 lowercase hex digits from the kernel's random source.
fn new_id() -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom fills at most the buffer's length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Practically unreachable; time and pid are unique enough for one bot.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&(t as u64 ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether `id` has the shape of one of ours.
pub fn valid_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

impl Registry {
    /// A registry with `config`, spawning through `reaper`; `kill` ends every live process
    /// (shutdown). Clears what an earlier run left in the process directory and starts the
    /// janitor that ages finished processes out.
    pub fn new(config: ProcessConfig, reaper: Reaper, kill: CancellationToken) -> Self {
        clear_leftovers(&config.dir);
        let r = Self {
            inner: Arc::new(Inner {
                config,
                reaper,
                kill,
                procs: Mutex::default(),
            }),
        };
        let weak = Arc::downgrade(&r.inner);
        let kill = r.inner.kill.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = kill.cancelled() => return,
                }
                match weak.upgrade() {
                    Some(inner) => Registry { inner }.prune(),
                    None => return,
                }
            }
        });
        r
    }

    /// The settings.
    pub fn config(&self) -> &ProcessConfig {
        &self.inner.config
    }

    fn procs(&self) -> MutexGuard<'_, Vec<Arc<Process>>> {
        self.inner.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process `id`: INVALID_ARGUMENT for a malformed id, NOT_FOUND for an unknown one.
    pub fn get(&self, id: &str) -> Result<Arc<Process>, ServerError> {
        if !valid_id(id) {
            return Err(ServerError::InvalidArgument(format!(
                "process id {id:?} is malformed: want 12 hex digits"
            )));
        }
        self.procs()
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| ServerError::NoSuchProcess(format!("no process {id}")))
    }

    /// Live and kept processes, oldest first, with `tag` (empty: all).
    pub fn list(&self, tag: &str) -> Vec<Arc<Process>> {
        self.prune();
        self.procs()
            .iter()
            .filter(|p| tag.is_empty() || p.tag == tag)
            .cloned()
            .collect()
    }

    /// Forgets a finished process and deletes its files.
    pub fn remove(&self, id: &str) -> Result<(), ServerError> {
        let p = self.get(id)?;
        if p.is_live() {
            return Err(ServerError::FailedPrecondition(format!(
                "process {id} is still running; signal it first"
            )));
        }
        self.procs().retain(|q| q.id != id);
        drop_files(&p);
        Ok(())
    }

    /// Drops finished processes past the retention, then the oldest finished ones beyond
    /// `max_kept`, with their files.
    pub fn prune(&self) {
        let cfg = &self.inner.config;
        let mut dropped = Vec::new();
        {
            let mut procs = self.procs();
            let now = Instant::now();
            procs.retain(|p| {
                let old = p
                    .lock()
                    .ended_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= cfg.retention);
                if old {
                    dropped.push(p.clone());
                }
                !old
            });
            let finished: Vec<usize> = procs
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.is_live())
                .map(|(i, _)| i)
                .collect();
            if finished.len() > cfg.max_kept {
                // Oldest ended first.
                let mut by_end: Vec<(Instant, usize)> = finished
                    .iter()
                    .map(|&i| (procs[i].lock().ended_at.unwrap_or(now), i))
                    .collect();
                by_end.sort();
                let mut gone: Vec<usize> = by_end[..finished.len() - cfg.max_kept]
                    .iter()
                    .map(|(_, i)| *i)
                    .collect();
                gone.sort_unstable_by(|a, b| b.cmp(a));
                for i in gone {
                    dropped.push(procs.remove(i));
                }
            }
        }
        for p in dropped {
            debug!(id = %p.id, "finished process aged out");
            drop_files(&p);
        }
    }

    /// Starts a process and hands it to its own task.
    pub fn start(&self, spec: StartSpec) -> Result<Arc<Process>, ServerError> {
        if spec.tag.len() > MAX_TAG_BYTES {
            return Err(ServerError::InvalidArgument(format!(
                "tag is {} bytes; at most {MAX_TAG_BYTES}",
                spec.tag.len()
            )));
        }
        if self.inner.kill.is_cancelled() {
            return Err(ServerError::ShuttingDown);
        }
        self.prune();
        let cfg = &self.inner.config;
        // The slot is held under the lock from the count to the insert.
        let mut procs = self.procs();
        let live = procs.iter().filter(|p| p.is_live()).count();
        if live >= cfg.max_live {
            return Err(ServerError::Exhausted(format!(
                "too many live processes ({}); wait for one or signal it",
                cfg.max_live
            )));
        }
        let id = loop {
            let id = new_id();
            if !procs.iter().any(|p| p.id == id) {
                break id;
            }
        };
        let dir = cfg.dir.join(&id);
        make_dirs(&cfg.dir, &dir)?;
        let base = |name: &str| Some(dir.join(name));
        let command = spec.exec.command.clone();
        let timeout = spec.exec.timeout;
        let stdin = spec.exec.stdin.clone();
        let (out_cap, spill) = (cfg.ring_bytes, cfg.spill_bytes);
        let (stdin_tx, stdin_rx) = mpsc::channel::<Input>(16);
        let started = match spec.pty {
            Some(size) => pty::start(spec.exec, size, &self.inner.reaper).map(|r| {
                let (pgid, master, exit) = r.into_parts();
                Spawned::Pty {
                    pgid,
                    master: Arc::new(master),
                    exit,
                }
            }),
            None => {
                exec::start(spec.exec, &self.inner.reaper).map(|r| Spawned::Pipes(r.into_parts()))
            }
        };
        let spawned = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let (pid, master) = match &spawned {
            Spawned::Pty { pgid, master, .. } => (pgid.as_raw(), Some(master.clone())),
            Spawned::Pipes(p) => (p.pgid.as_raw(), None),
        };
        let pty = master.is_some();
        let proc = Arc::new(Process {
            id: id.clone(),
            tag: spec.tag,
            command,
            pid,
            started_at_ms: now_ms(),
            pty,
            dir: dir.clone(),
            state: Mutex::new(State {
                out: Stream::new(out_cap, spill, base("stdout.log")),
                err: Stream::new(out_cap, spill, base("stderr.log")),
                ended: None,
                stdin: Some(stdin_tx),
                master,
                ended_at: None,
            }),
            changed: watch::Sender::new(0),
        });
        procs.push(proc.clone());
        drop(procs);
        info!(id = %id, pid, pty, command = %proc.command, "process started");
        let kill = self.inner.kill.clone();
        let p = proc.clone();
        match spawned {
            Spawned::Pipes(parts) => {
                let exec::RunningParts {
                    pgid,
                    exit,
                    stdout,
                    stderr,
                    stdin: pipe_in,
                } = parts;
                tokio::spawn(feed_pipe(pipe_in, stdin, stdin_rx));
                tokio::spawn(run_pipes(p, pgid, exit, [stdout, stderr], timeout, kill));
            }
            Spawned::Pty { pgid, master, exit } => {
                tokio::spawn(feed_pty(master.clone(), stdin, stdin_rx));
                tokio::spawn(run_pty(p, pgid, master, exit, timeout, kill));
            }
        }
        Ok(proc)
    }
}

enum Spawned {
    Pipes(exec::RunningParts),
    Pty {
        pgid: Pid,
        master: Arc<AsyncFd<OwnedFd>>,
        exit: oneshot::Receiver<Reaped>,
    },
}

/// Makes the process directory (0700) and one process's directory in it; a failure is
/// FAILED_PRECONDITION naming the directory.
fn make_dirs(root: &Path, dir: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::DirBuilderExt;
    let fail = |p: &Path, e: std::io::Error| {
        ServerError::FailedPrecondition(format!(
            "process directory {} cannot be created: {e}",
            p.display()
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| fail(root, e))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(dir, e))
}

/// Deletes the per-process directories an earlier run left (only names shaped like ids).
fn clear_leftovers(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if name.to_str().is_some_and(valid_id) {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                warn!(path = %e.path().display(), error = %err, "old process output not removed");
            }
        }
    }
}

fn drop_files(p: &Process) {
    {
        let mut st = p.lock();
        st.out.remove_files();
        st.err.remove_files();
    }
    let _ = std::fs::remove_dir_all(&p.dir);
}

/// The initial size of a PTY process from a request's `cols` and `rows` (0: 80x24).
pub fn start_size(cols: u32, rows: u32) -> TermSize {
    TermSize::from_request(cols, rows).unwrap_or(DEFAULT_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_twelve_hex_digits_and_differ() {
        let a = new_id();
        let b = new_id();
        assert!(valid_id(&a), "{a}");
        assert_ne!(a, b);
        for bad in [
            "",
            "abc",
            "ABCDEF012345",
            "0123456789ag",
            "0123456789abc",
            "../../etc/x",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
