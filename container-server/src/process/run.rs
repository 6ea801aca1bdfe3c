//! The task that owns a running process: it feeds stdin, reads stdout and stderr into the
//! record's streams whether or not anyone is attached, enforces the timeout, and records the
//! end. One for piped processes, one for processes on a terminal.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::exec::{kill_group, EXIT_DRAIN_GRACE};

/// Writes the initial stdin, then each queued chunk, to the pipe; ends (closing the child's
/// stdin) when the queue closes or the child stops reading.
pub(super) async fn feed_pipe(mut pipe: pipe::Sender, first: Bytes, mut rx: mpsc::Receiver<Input>) {
    if !first.is_empty() && pipe.write_all(&first).await.is_err() {
        return;
    }
    while let Some(Input::Data(d)) = rx.recv().await {
        if pipe.write_all(&d).await.is_err() {
            return;
        }
    }
}

/// Types the initial stdin, then each queued chunk, into the terminal.
pub(super) async fn feed_pty(
    master: Arc<AsyncFd<OwnedFd>>,
    first: Bytes,
    mut rx: mpsc::Receiver<Input>,
) {
    async fn write_all(master: &AsyncFd<OwnedFd>, mut data: Bytes) -> bool {
        while !data.is_empty() {
            let Ok(mut ready) = master.writable().await else {
                return false;
            };
            match ready.try_io(|fd| pty::write_master(fd.get_ref(), &data)) {
                Ok(Ok(n)) => {
                    let _ = data.split_to(n.min(data.len()));
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => return false,
                Err(_would_block) => {}
            }
        }
        true
    }
    if !write_all(&master, first).await {
        return;
    }
    while let Some(Input::Data(d)) = rx.recv().await {
        if !write_all(&master, d).await {
            return;
        }
    }
}

/// What the owner task of a process needs to decide when to stop.
pub(super) struct Life {
    exit: Option<Reaped>,
    killed: bool,
    timed_out: bool,
    draining: bool,
}

pub(super) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 10)
}

/// Records the end and wakes everyone.
pub(super) fn finish(p: &Process, pgid: Pid, life: Life) {
    if life.killed {
        kill_group(pgid);
    }
    let reaped = life.exit.unwrap_or(Reaped {
        // Killed, yet no status within the grace: report the kill.
        exit: Exit::Signal(9),
        usage: None,
    });
    let ended = Ended {
        exit: reaped.exit,
        usage: reaped.usage,
        at_ms: now_ms(),
        timed_out: life.timed_out,
    };
    {
        let mut st = p.lock();
        st.ended = Some(ended);
        st.ended_at = Some(Instant::now());
        st.stdin = None;
        st.master = None;
        st.out.release_ring();
        st.err.release_ring();
    }
    info!(id = %p.id, code = ended.code(), timed_out = ended.timed_out, "process ended");
    p.touch();
}

/// Owns a piped process: reads both pipes into the record until they close (at most
/// [`EXIT_DRAIN_GRACE`] after the exit), kills the group on timeout or shutdown, records the
/// end.
pub(super) async fn run_pipes(
    p: Arc<Process>,
    pgid: Pid,
    mut exit: oneshot::Receiver<Reaped>,
    [mut stdout, mut stderr]: [pipe::Receiver; 2],
    timeout: Option<Duration>,
    kill: CancellationToken,
) {
    let guard = exec::KillOnDrop(Some(pgid));
    let sleep = tokio::time::sleep_until(
        timeout
            .and_then(|t| Instant::now().checked_add(t))
            .unwrap_or_else(far_future),
    );
    tokio::pin!(sleep);
    let drain = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(drain);
    let mut life = Life {
        exit: None,
        killed: false,
        timed_out: false,
        draining: false,
    };
    let (mut out_open, mut err_open) = (true, true);
    let mut out_buf = BytesMut::with_capacity(READ_CHUNK);
    let mut err_buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if life.exit.is_some() && !out_open && !err_open {
            break;
        }
        if !life.draining && (life.exit.is_some() || life.killed) {
            life.draining = true;
            drain.as_mut().reset(Instant::now() + EXIT_DRAIN_GRACE);
        }
        tokio::select! {
            _ = kill.cancelled(), if !life.killed => {
                kill_group(pgid);
                life.killed = true;
            }
            _ = &mut sleep, if !life.killed && timeout.is_some() => {
                debug!(id = %p.id, "timeout; killing process group");
                kill_group(pgid);
                life.killed = true;
                life.timed_out = true;
            }
            _ = &mut drain, if life.draining => {
                out_open = false;
                err_open = false;
                if life.exit.is_none() {
                    break;
                }
            }
            r = stdout.read_buf(&mut out_buf), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(_) => {
                    let chunk = out_buf.split().freeze();
                    out_buf.reserve(READ_CHUNK);
                    p.lock().out.append(chunk);
                    p.touch();
                }
            },
            r = stderr.read_buf(&mut err_buf), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(_) => {
                    let chunk = err_buf.split().freeze();
                    err_buf.reserve(READ_CHUNK);
                    p.lock().err.append(chunk);
                    p.touch();
                }
            },
            st = &mut exit, if life.exit.is_none() => {
                life.exit = Some(st.unwrap_or(Reaped::LOST));
            }
        }
    }
    drop(guard.disarm());
    finish(&p, pgid, life);
}

/// Owns a PTY process: reads the terminal into STDOUT until it ends (EIO once nobody holds
/// the slave; at most [`EXIT_DRAIN_GRACE`] after the exit), kills the group on timeout or
/// shutdown, records the end.
pub(super) async fn run_pty(
    p: Arc<Process>,
    pgid: Pid,
    master: Arc<AsyncFd<OwnedFd>>,
    mut exit: oneshot::Receiver<Reaped>,
    timeout: Option<Duration>,
    kill: CancellationToken,
) {
    let guard = exec::KillOnDrop(Some(pgid));
    let sleep = tokio::time::sleep_until(
        timeout
            .and_then(|t| Instant::now().checked_add(t))
            .unwrap_or_else(far_future),
    );
    tokio::pin!(sleep);
    let drain = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(drain);
    let mut life = Life {
        exit: None,
        killed: false,
        timed_out: false,
        draining: false,
    };
    let mut open = true;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        if life.exit.is_some() && !open {
            break;
        }
        if !life.draining && (life.exit.is_some() || life.killed) {
            life.draining = true;
            drain.as_mut().reset(Instant::now() + EXIT_DRAIN_GRACE);
        }
        tokio::select! {
            _ = kill.cancelled(), if !life.killed => {
                kill_group(pgid);
                life.killed = true;
            }
            _ = &mut sleep, if !life.killed && timeout.is_some() => {
                debug!(id = %p.id, "timeout; killing pty process group");
                kill_group(pgid);
                life.killed = true;
                life.timed_out = true;
            }
            _ = &mut drain, if life.draining => {
                open = false;
                if life.exit.is_none() {
                    break;
                }
            }
            r = master.readable(), if open => {
                let mut ready = match r {
                    Ok(g) => g,
                    Err(_) => {
                        open = false;
                        continue;
                    }
                };
                match ready.try_io(|fd| pty::read_master(fd.get_ref(), &mut buf)) {
                    Ok(Ok(Some(n))) => {
                        p.lock().out.append(Bytes::copy_from_slice(&buf[..n]));
                        p.touch();
                    }
                    Ok(Ok(None)) => open = false,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Ok(Err(_)) => open = false,
                    Err(_would_block) => {}
                }
            }
            st = &mut exit, if life.exit.is_none() => {
                life.exit = Some(st.unwrap_or(Reaped::LOST));
            }
        }
    }
    drop(guard.disarm());
    finish(&p, pgid, life);
}
