//! Child-process reaping. The server is PID 1 in its container, so every orphan that
//! re-parents to it must be reaped, or zombies pile up. One task owns `waitpid`: it receives
//! SIGCHLD, reaps, and hands exit statuses of our own children to whoever waits for them.
//!
//! Two modes: `reap_all` (PID 1: `waitpid(-1)`, orphans included) and registered-only (any
//! other process, e.g. tests: only the pids we spawned, so other code's children are left
//! alone).
//!
//! Children are reaped with `wait4`, so each waiter also gets the child's resource use
//! ([`Usage`]: CPU times and peak RSS, its own and that of the children it waited for).
//!
//! A pid is registered after its spawn returns, not under a lock held across it: spawns run
//! in parallel (with `posix_spawn` the spawning thread waits until the child has `exec`'d,
//! which under one lock would serialise every spawn of the server). A child may therefore
//! end, and in `reap_all` mode be reaped, before its pid is registered: such an exit is kept
//! for a while ([`EARLY_KEEP`], at most [`EARLY_MAX`] of them) and handed over when the pid
//! is registered. Registration itself asks `wait4` about the pid, under the same lock as the
//! reaping, so a child that ended before it is delivered at once in both modes, and one the
//! reaper took and no longer keeps is reported [`Reaped::LOST`] rather than waited for forever.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It called `exit(code)`.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl Exit {
    /// The code reported to clients: the process's own, or -1 for a signal.
    pub fn wire_code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(_) => -1,
        }
    }
}

/// Resource use of a reaped child, from `wait4`'s `rusage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// User CPU time.
    pub user: Duration,
    /// System CPU time.
    pub system: Duration,
    /// Peak resident set size in bytes (`ru_maxrss` is KiB on Linux).
    pub max_rss_bytes: u64,
}

impl Usage {
    fn from_rusage(r: &libc::rusage) -> Self {
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        Self {
            user: tv(r.ru_utime),
            system: tv(r.ru_stime),
            max_rss_bytes: (r.ru_maxrss.max(0) as u64).saturating_mul(1024),
        }
    }
}

/// What the reaper hands a waiter: how the child ended and what it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// How it ended.
    pub exit: Exit,
    /// Its resource use; `None` when someone else reaped it.
    pub usage: Option<Usage>,
}

impl Reaped {
    /// A child the reaper lost (reaped elsewhere): no status, no usage.
    pub const LOST: Reaped = Reaped {
        exit: Exit::Signal(0),
        usage: None,
    };
}

/// How long an exit reaped before its pid was registered is kept. Registration follows the
/// spawn at once; this only has to outlast a spawning thread that was preempted in between.
/// Orphans (re-parented to PID 1) land here too, which is why the keep is bounded.
pub const EARLY_KEEP: Duration = Duration::from_secs(10);

/// At most this many early exits are kept; beyond it the oldest go first.
pub const EARLY_MAX: usize = 1024;

#[derive(Default)]
struct Waiters {
    by_pid: HashMap<i32, oneshot::Sender<Reaped>>,
    /// Exits reaped for pids nobody had registered (yet), with when they were reaped.
    early: HashMap<i32, (Reaped, Instant)>,
    /// When the oldest entry of `early` may be due for pruning.
    prune_at: Option<Instant>,
}

impl Waiters {
    /// Keeps an exit of a pid nobody waits for (yet), within the bounds.
    fn keep_early(&mut self, pid: i32, reaped: Reaped) {
        let now = Instant::now();
        if self.prune_at.is_some_and(|t| now >= t) || self.early.len() >= EARLY_MAX {
            self.prune(now);
        }
        if self.early.len() >= EARLY_MAX {
            // Still full of entries younger than the keep: drop the oldest.
            if let Some(oldest) = self
                .early
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(p, _)| *p)
            {
                self.early.remove(&oldest);
            }
        }
        self.early.insert(pid, (reaped, now));
        self.prune_at.get_or_insert(now + EARLY_KEEP);
    }

    /// Drops the early exits older than [`EARLY_KEEP`].
    fn prune(&mut self, now: Instant) {
        self.early
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < EARLY_KEEP);
        self.prune_at = self.early.values().map(|(_, t)| *t + EARLY_KEEP).min();
    }
}

/// Handle to the reaper; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
    reap_all: bool,
}

impl Reaper {
    /// Starts the reaper task on the current tokio runtime.
    pub fn start(reap_all: bool) -> io::Result<Self> {
        let mut sigchld = signal(SignalKind::child())?;
        let r = Self {
            waiters: Arc::default(),
            reap_all,
        };
        let task = r.clone();
        tokio::spawn(async move {
            // The poll interval is only a safety net; SIGCHLD does the work.
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    s = sigchld.recv() => if s.is_none() { break },
                    _ = tick.tick() => {}
                }
                task.reap();
            }
        });
        Ok(r)
    }

    /// Spawns `cmd` and registers its pid. The spawn runs without the reaper's lock, so spawns
    /// from several threads run side by side. It runs on the calling thread, a runtime worker
    /// included: handing it to another thread (`block_in_place`, tried) cost more in thread
    /// hand-offs than the wait for the child's `exec` holds the worker (BENCHMARKS.md, issue
    /// 19, the exec spawn).
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<Reaped>)> {
        self.spawn_then(cmd, |_| {})
    }

    /// [`Reaper::spawn`], with `then` called with the child's pid right after the spawn, before
    /// the registration (for work that must follow the spawn as closely as it can, such as
    /// setting the child's `oom_score_adj`).
    pub fn spawn_then(
        &self,
        cmd: &mut Command,
        then: impl FnOnce(i32),
    ) -> io::Result<(Child, oneshot::Receiver<Reaped>)> {
        let child = cmd.spawn()?;
        then(child.id() as i32);
        let rx = self.register(child.id() as i32);
        Ok((child, rx))
    }

    /// Registers `pid`, a child of this process that the caller started, and returns where its
    /// end will be delivered. A child that already ended is delivered at once: from the exits
    /// kept for unregistered pids (`reap_all` mode), or by reaping it here.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<Reaped> {
        let (tx, rx) = oneshot::channel();
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Under the lock no reap runs: either the child is still ours to wait for, or it was
        // reaped before this, and its exit is kept under its pid.
        let now = loop {
            match wait4(pid) {
                Err(Errno::EINTR) => continue,
                r => break r,
            }
        };
        match now {
            Ok(None) => {
                // Still running. An entry kept under its pid is from an earlier process that
                // had the same pid (an orphan), not from this one.
                w.early.remove(&pid);
                w.by_pid.insert(pid, tx);
            }
            Ok(Some((_, reaped))) => {
                w.early.remove(&pid);
                let _ = tx.send(reaped);
            }
            Err(Errno::ECHILD) => {
                // The reaper took it first (the newest exit of this pid is the kept one), or
                // its exit is no longer kept: report it lost rather than wait forever.
                let reaped = w.early.remove(&pid).map_or(Reaped::LOST, |(r, _)| r);
                let _ = tx.send(reaped);
            }
            Err(e) => {
                // Not expected for a child of ours; the reaper's next pass settles it.
                warn!(pid, error = %e, "wait4 on a registered child failed");
                w.by_pid.insert(pid, tx);
            }
        }
        rx
    }

    fn reap(&self) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if self.reap_all {
            loop {
                match wait4(-1) {
                    Ok(None) | Err(Errno::ECHILD) => break,
                    Ok(Some((pid, reaped))) => Self::deliver(&mut w, pid, reaped),
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        warn!(error = %e, "wait4 failed");
                        break;
                    }
                }
            }
        } else {
            let pids: Vec<i32> = w.by_pid.keys().copied().collect();
            for pid in pids {
                match wait4(pid) {
                    Ok(None) => {}
                    Ok(Some((pid, reaped))) => Self::deliver(&mut w, pid, reaped),
                    Err(Errno::ECHILD) => {
                        // Someone else reaped it; report it as lost rather than hang.
                        if let Some(tx) = w.by_pid.remove(&pid) {
                            let _ = tx.send(Reaped::LOST);
                        }
                    }
                    Err(_) => {}
                }
            }
        }
    }

    fn deliver(w: &mut Waiters, pid: i32, reaped: Reaped) {
        match w.by_pid.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(reaped);
            }
            None => {
                // An orphan, or a child of ours whose spawn has not registered it yet.
                debug!(pid, exit = ?reaped.exit, "reaped an unregistered child");
                w.keep_early(pid, reaped);
            }
        }
    }

    /// How many exits are kept for pids not registered (yet); for tests.
    pub fn early_exits(&self) -> usize {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .early
            .len()
    }
}

/// One non-blocking `wait4` for `pid` (-1: any child). `Ok(None)`: nothing has ended.
fn wait4(pid: i32) -> Result<Option<(i32, Reaped)>, Errno> {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes into the status and rusage we own.
    let got = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    if got < 0 {
        return Err(Errno::last());
    }
    if got == 0 {
        return Ok(None);
    }
    let exit = if libc::WIFEXITED(status) {
        Exit::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        // Stopped or continued: not asked for (no WUNTRACED), nothing to deliver.
        return Ok(None);
    };
    Ok(Some((
        got,
        Reaped {
            exit,
            usage: Some(Usage::from_rusage(&ru)),
        },
    )))
}
