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

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

#[derive(Default)]
struct Waiters {
    by_pid: HashMap<i32, oneshot::Sender<Reaped>>,
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

    /// Spawns `cmd` and registers its pid before any reap can see it exit.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<Reaped>)> {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        w.by_pid.insert(child.id() as i32, tx);
        Ok((child, rx))
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
            None => debug!(pid, exit = ?reaped.exit, "reaped orphan"),
        }
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
