//! Child-process reaping. The server is PID 1 in its container, so every orphan that
//! re-parents to it must be reaped, or zombies pile up. One task owns `waitpid`: it receives
//! SIGCHLD, reaps, and hands exit statuses of our own children to whoever waits for them.
//!
//! Two modes: `reap_all` (PID 1: `waitpid(-1)`, orphans included) and registered-only (any
//! other process, e.g. tests: only the pids we spawned, so other code's children are left
//! alone).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
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

#[derive(Default)]
struct Waiters {
    by_pid: HashMap<i32, oneshot::Sender<Exit>>,
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
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<Exit>)> {
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
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(st) => Self::deliver(&mut w, st),
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        warn!(error = %e, "waitpid failed");
                        break;
                    }
                }
            }
        } else {
            let pids: Vec<i32> = w.by_pid.keys().copied().collect();
            for pid in pids {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {}
                    Ok(st) => Self::deliver(&mut w, st),
                    Err(Errno::ECHILD) => {
                        // Someone else reaped it; report it as lost rather than hang.
                        if let Some(tx) = w.by_pid.remove(&pid) {
                            let _ = tx.send(Exit::Signal(0));
                        }
                    }
                    Err(_) => {}
                }
            }
        }
    }

    fn deliver(w: &mut Waiters, st: WaitStatus) {
        let (pid, exit) = match st {
            WaitStatus::Exited(pid, code) => (pid, Exit::Code(code)),
            WaitStatus::Signaled(pid, sig, _) => (pid, Exit::Signal(sig as i32)),
            _ => return,
        };
        match w.by_pid.remove(&pid.as_raw()) {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => debug!(pid = pid.as_raw(), ?exit, "reaped orphan"),
        }
    }
}
