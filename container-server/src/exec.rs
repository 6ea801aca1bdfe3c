//! Streaming exec: `/bin/sh -c COMMAND` in its own process group, stdin fed from the client,
//! stdout and stderr streamed as they arrive by exactly one task, and the whole group killed on
//! timeout, cancellation or shutdown. A command that cannot start because the bot is at its
//! process or memory limit is [`ServerError::AtLimit`]; commands never inherit the server's
//! protection from the OOM killer (a negative `oom_score_adj`).
//!
//! The child setup (work dir, environment, `oom_score_adj`), the group kill and the exit-code
//! conventions ([`Dialect`]) are shared with PTY exec ([`crate::pty`]).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::ServerError;
use crate::reaper::{Exit, Reaped, Reaper, Usage};

/// Read size for the child's output pipes.
const READ_CHUNK: usize = 32 * 1024;

/// How long output is still read after the command exited (or was killed). Whoever holds the
/// pipes then (a grandchild that left the group with `setsid`, a background job) no longer
/// keeps the call open: the pipes are closed and EXIT is sent.
pub const EXIT_DRAIN_GRACE: Duration = Duration::from_secs(2);

/// A validated exec request.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// Passed to `/bin/sh -c`.
    pub command: String,
    /// Existing directory to run in.
    pub work_dir: PathBuf,
    /// Added to the server's own environment (or to `exact_env`).
    pub env: Vec<(String, String)>,
    /// When set, the child's environment starts from exactly these variables instead of the
    /// server's own (the bridge's `clean_env` / `unset_env`, see [`crate::exec_env`]).
    pub exact_env: Option<Vec<(OsString, OsString)>>,
    /// Kill the process group after this long; `None`: no timeout.
    pub timeout: Option<Duration>,
    /// Delivered to stdin before anything else.
    pub stdin: Bytes,
    /// The conventions of the protocol that asked: exit codes, the client leaving.
    pub dialect: Dialect,
}

impl ExecSpec {
    /// Validates the first message's fields. `timeout_seconds` of zero or less means `default`.
    pub fn new(
        command: String,
        work_dir: PathBuf,
        env: &[String],
        timeout_seconds: i32,
        default_timeout: Duration,
        stdin: Bytes,
    ) -> Result<Self, ServerError> {
        if command.trim().is_empty() {
            return Err(ServerError::InvalidArgument("command is empty".into()));
        }
        if command.contains('\0') {
            return Err(ServerError::InvalidArgument(
                "command contains a NUL byte".into(),
            ));
        }
        let mut vars = Vec::with_capacity(env.len());
        for e in env {
            match e.split_once('=') {
                Some((k, v)) if !k.is_empty() && !e.contains('\0') => {
                    vars.push((k.to_string(), v.to_string()))
                }
                _ => {
                    return Err(ServerError::InvalidArgument(format!(
                        "env entry {e:?} is not KEY=VALUE"
                    )))
                }
            }
        }
        match std::fs::metadata(&work_dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(ServerError::InvalidArgument(format!(
                    "work dir {} is not a directory",
                    work_dir.display()
                )))
            }
            Err(_) => {
                return Err(ServerError::InvalidArgument(format!(
                    "work dir {} does not exist",
                    work_dir.display()
                )))
            }
        }
        let timeout = if timeout_seconds <= 0 {
            default_timeout
        } else {
            Duration::from_secs(timeout_seconds as u64)
        };
        Ok(Self {
            command,
            work_dir,
            env: vars,
            exact_env: None,
            timeout: Some(timeout),
            stdin,
            dialect: Dialect::Mcp,
        })
    }
}

/// Which protocol's exec conventions apply (WIRE.md or WIRE-BRIDGE.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// `mcpcontainer`: a signal is exit code -1; the client leaving kills the group.
    #[default]
    Mcp,
    /// `bridgepb`: signal N is exit code 128+N (the timeout's kill 137); with a timeout the
    /// command outlives the client (its output is read and dropped), without one the client
    /// leaving kills the group.
    Bridge,
}

impl Dialect {
    /// The exit code reported for `exit`.
    pub fn exit_code(self, exit: Exit) -> i32 {
        match (self, exit) {
            (Dialect::Mcp, e) => e.wire_code(),
            (Dialect::Bridge, Exit::Code(c)) => c,
            // Signal 0 is the reaper's "lost" status: there is no signal to report.
            (Dialect::Bridge, Exit::Signal(0)) => -1,
            (Dialect::Bridge, Exit::Signal(n)) => 128 + n,
        }
    }
}

/// What the exec stream carries, in domain form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes from stdout.
    Stdout(Bytes),
    /// Bytes from stderr.
    Stderr(Bytes),
    /// The last event: the exit code (-1 for a signal or the timeout's kill) and the
    /// command's resource use when the reaper saw it end.
    Exit(i32, Option<Usage>),
}

/// A started command. [`Running::drive`] streams it to the end.
pub struct Running {
    pgid: Pid,
    exit: tokio::sync::oneshot::Receiver<Reaped>,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    stdin: Option<pipe::Sender>,
    initial_stdin: Bytes,
    timeout: Option<Duration>,
    dialect: Dialect,
}

/// The `oom_score_adj` commands start at when the server's own is not negative: the OOM
/// killer then takes a command's memory hog long before the server, even where the host
/// grants no privilege to lower the server's own value (no CAP_SYS_RESOURCE). A command may
/// lower its own back to what it inherited, never below.
pub const COMMAND_OOM_SCORE_ADJ: i32 = 500;

/// What a command's `oom_score_adj` starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildOom {
    /// The server's own, as `fork` leaves it.
    Inherit,
    /// This value. Where the server protects itself (its own value is negative) or the value
    /// is below the server's own, the child sets it before it runs the command, which makes
    /// the spawn a `fork`; where it raises an unprotected server's value, the server sets it
    /// right after the spawn, which keeps the spawn a `posix_spawn` (`vfork`): see
    /// [`start_with`].
    Set(i32),
}

impl ChildOom {
    /// The policy for a server whose own `oom_score_adj` is `own`: a server that protects
    /// itself (a negative value, from the bot's spec) must not pass that on, or a memory hog
    /// would be protected and the server killed instead, so commands start at 0; a server
    /// that cannot protect itself makes its commands the OOM killer's first choice
    /// ([`COMMAND_OOM_SCORE_ADJ`]); a higher value is passed on.
    pub fn for_server(own: Option<i32>) -> Self {
        match own {
            Some(adj) if adj < 0 => ChildOom::Set(0),
            Some(adj) if adj < COMMAND_OOM_SCORE_ADJ => ChildOom::Set(COMMAND_OOM_SCORE_ADJ),
            Some(_) => ChildOom::Inherit,
            None => ChildOom::Set(COMMAND_OOM_SCORE_ADJ),
        }
    }
}

/// Starts the command. Errors here are the caller's to report as a status.
pub fn start(spec: ExecSpec, reaper: &Reaper) -> Result<Running, ServerError> {
    let own = own_oom_score_adj();
    start_inner(spec, reaper, ChildOom::for_server(own), own)
}

/// [`start`] with the command's `oom_score_adj` chosen by the caller.
///
/// How the value is set depends on the server's own:
/// - a protected server (a negative value; commands get `Set(0)`), or a value below the
///   server's own: the child writes it between `fork` and `exec`, so the command never runs
///   with the server's protection, not even for an instant. `std` must then `fork` (a
///   `pre_exec` hook rules out `posix_spawn`), which copies the server's page tables and
///   makes its next writes to every page fault.
/// - an unprotected server (0 or more) raising its commands (`Set(500)`): the child is
///   started with `posix_spawn` (`clone(CLONE_VM|CLONE_VFORK)`, no page-table copy) and the
///   server writes `/proc/PID/oom_score_adj` as soon as the spawn returns, then does the
///   same for any child the shell has already made. The trade-off: for the moment between
///   the `exec` and that write (microseconds; longer only if the server thread is
///   preempted), the shell runs at the server's own value, which is never a protection
///   relative to the server, only the absence of the handicap. A process the shell forked in
///   that moment is raised too (the server follows the shell's children), except one whose
///   `fork` outlasts the server's whole pass: it keeps the server's own value, still no
///   protection.
pub fn start_with(spec: ExecSpec, reaper: &Reaper, oom: ChildOom) -> Result<Running, ServerError> {
    let own = match oom {
        ChildOom::Inherit => None,
        ChildOom::Set(_) => own_oom_score_adj(),
    };
    start_inner(spec, reaper, oom, own)
}

/// [`start_with`], `own` being the server's own `oom_score_adj` when known.
fn start_inner(
    spec: ExecSpec,
    reaper: &Reaper,
    oom: ChildOom,
    own: Option<i32>,
) -> Result<Running, ServerError> {
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&spec.command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // A server without protection (its own value not negative) has none to pass on: raising
    // the command's value needs no hook in the child, and the spawn stays a posix_spawn. A
    // protected server's commands drop the protection in the child, before `exec`.
    let raise = match oom {
        ChildOom::Set(adj) if own.is_some_and(|o| o >= 0 && adj >= o) => Some(adj),
        _ => None,
    };
    prepare_child(
        &mut cmd,
        &spec,
        if raise.is_some() {
            ChildOom::Inherit
        } else {
            oom
        },
    );
    // The raise follows the spawn at once, before the pid is registered.
    let (mut child, exit) = reaper
        .spawn_then(&mut cmd, |pid| {
            if let Some(adj) = raise {
                raise_oom_score_adj(pid, adj);
            }
        })
        .map_err(|e| ServerError::spawn("a process", e))?;
    let pgid = Pid::from_raw(child.id() as i32);
    let conv = |e: std::io::Error| {
        let _ = killpg(pgid, Signal::SIGKILL);
        ServerError::Spawn(e)
    };
    let out_fd: std::os::fd::OwnedFd = child.stdout.take().expect("piped").into();
    let err_fd: std::os::fd::OwnedFd = child.stderr.take().expect("piped").into();
    let in_fd: std::os::fd::OwnedFd = child.stdin.take().expect("piped").into();
    for fd in [&out_fd, &in_fd] {
        grow_pipe(fd);
    }
    let stdout = pipe::Receiver::from_owned_fd(out_fd).map_err(conv)?;
    let stderr = pipe::Receiver::from_owned_fd(err_fd).map_err(conv)?;
    let stdin = pipe::Sender::from_owned_fd(in_fd).map_err(conv)?;
    // The reaper owns waiting; dropping std's handle neither waits nor kills.
    drop(child);
    debug!(pgid = pgid.as_raw(), command = %spec.command, "exec started");
    Ok(Running {
        pgid,
        exit,
        stdout,
        stderr,
        stdin: Some(stdin),
        initial_stdin: spec.stdin,
        timeout: spec.timeout,
        dialect: spec.dialect,
    })
}

/// What every command gets, piped or on a terminal: its work dir, its environment and its
/// `oom_score_adj`.
pub(crate) fn prepare_child(cmd: &mut std::process::Command, spec: &ExecSpec, oom: ChildOom) {
    cmd.current_dir(&spec.work_dir);
    if let Some(base) = &spec.exact_env {
        cmd.env_clear().envs(base.iter().map(|(k, v)| (k, v)));
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let ChildOom::Set(adj) = oom {
        // Formatted before the fork: the child may only make async-signal-safe calls.
        let value = adj.to_string().into_bytes();
        // SAFETY: the hook only makes raw system calls (open, write, close), which are
        // async-signal-safe, on a static path and a buffer made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                set_oom_score_adj(&value);
                Ok(())
            });
        }
    }
}

/// Writes `adj` as the `oom_score_adj` of the just spawned `pid` and of every process it has
/// already started (followed down a few generations), best effort: a process that already
/// exited needs nothing. Two passes: a child whose `fork` was under way during the first
/// write to its parent inherited the old value but may not be listed yet; the second pass
/// finds it (the remaining window is a `fork` that outlasts the whole first pass).
fn raise_oom_score_adj(pid: i32, adj: i32) {
    let value = adj.to_string();
    for _ in 0..2 {
        raise_tree(pid, &value);
    }
}

/// One pass of [`raise_oom_score_adj`].
fn raise_tree(pid: i32, value: &str) {
    let mut todo = vec![(pid, 0u8)];
    while let Some((pid, depth)) = todo.pop() {
        if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), value) {
            if e.kind() != std::io::ErrorKind::NotFound && e.raw_os_error() != Some(libc::ESRCH) {
                debug!(pid, error = %e, "setting a command's oom_score_adj failed");
            }
            continue;
        }
        if depth >= 4 {
            continue;
        }
        // Children the process made before the write above inherited the old value.
        let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        else {
            continue;
        };
        todo.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .map(|c| (c, depth + 1)),
        );
    }
}

/// The server's own `oom_score_adj`, when it can be read.
pub fn own_oom_score_adj() -> Option<i32> {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sets the calling process's `oom_score_adj` to `value` (ASCII), best effort: a child about
/// to exec. Raising it needs no privilege. Only async-signal-safe calls, for use between fork
/// and exec.
fn set_oom_score_adj(value: &[u8]) {
    const PATH: &[u8] = b"/proc/self/oom_score_adj\0";
    // SAFETY: a NUL-terminated static path, a buffer the caller owns, and an fd we close.
    unsafe {
        let fd = libc::open(PATH.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            let _ = libc::write(fd, value.as_ptr().cast(), value.len());
            libc::close(fd);
        }
    }
}

/// Bulk transfers through a command (a tar stream in, 50 MiB of output out) move in
/// fewer, larger steps with a 1 MiB pipe than with the default 64 KiB. Best effort: the
/// kernel may cap it (`/proc/sys/fs/pipe-max-size`).
fn grow_pipe(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own; it only changes the pipe's capacity.
    let _ = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
}

/// Capacity asked for the stdin and stdout pipes of a command.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// SIGKILL to the whole process group `pgid`; a group already gone is fine.
pub(crate) fn kill_group(pgid: Pid) {
    match killpg(pgid, Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => warn!(pgid = pgid.as_raw(), error = %e, "killing process group failed"),
    }
}

/// Feeds stdin: the first message's bytes, then each chunk from the client; the client's
/// half-close (the channel ending) closes the child's stdin.
async fn feed_stdin(mut pipe: pipe::Sender, first: Bytes, mut rx: mpsc::Receiver<Bytes>) {
    if !first.is_empty() && pipe.write_all(&first).await.is_err() {
        return;
    }
    while let Some(chunk) = rx.recv().await {
        if pipe.write_all(&chunk).await.is_err() {
            // The child closed its stdin or exited; drain nothing more.
            return;
        }
    }
}

impl Running {
    /// Streams the command to its end into `out`, then sends exactly one [`ExecEvent::Exit`].
    /// Kills the whole process group when the timeout passes, when `shutdown` fires, and when
    /// the client leaves: `out` closes or `aborted` fires (the client's request stream ended
    /// other than by a clean half-close). A [`Dialect::Bridge`] command with a timeout
    /// outlives its client instead: its stdin closes, its output is read and dropped until it
    /// ends or its timeout kills it. Output is read until both pipes close, but for at most
    /// [`EXIT_DRAIN_GRACE`] after the command exited or was killed. Returns the exit code sent
    /// (None if the client left).
    pub async fn drive(
        mut self,
        stdin_rx: mpsc::Receiver<Bytes>,
        out: mpsc::Sender<ExecEvent>,
        shutdown: CancellationToken,
        aborted: CancellationToken,
    ) -> Option<i32> {
        let pgid = self.pgid;
        // Kill the group if this future is dropped mid-way (e.g. a panic or runtime shutdown).
        let guard = KillOnDrop(Some(pgid));
        let feeder = tokio::spawn(feed_stdin(
            self.stdin.take().expect("stdin is set at start"),
            std::mem::take(&mut self.initial_stdin),
            stdin_rx,
        ));
        let outlives_client = self.dialect == Dialect::Bridge && self.timeout.is_some();
        let deadline = self.timeout.and_then(|t| Instant::now().checked_add(t));
        let sleep = tokio::time::sleep_until(
            deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365 * 10)),
        );
        tokio::pin!(sleep);
        let mut out_buf = BytesMut::with_capacity(READ_CHUNK);
        let mut err_buf = BytesMut::with_capacity(READ_CHUNK);
        let (mut out_open, mut err_open) = (true, true);
        let mut exit: Option<Exit> = None;
        let mut usage: Option<Usage> = None;
        let mut killed = false;
        let drain = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(drain);
        let mut draining = false;
        // The client left and the command outlives it: output is dropped, no EXIT is sent.
        let mut gone = false;
        loop {
            if exit.is_some() && !out_open && !err_open {
                break;
            }
            if !draining && (exit.is_some() || killed) {
                draining = true;
                drain.as_mut().reset(Instant::now() + EXIT_DRAIN_GRACE);
            }
            let mut left = false;
            tokio::select! {
                _ = out.closed(), if !gone => left = true,
                _ = aborted.cancelled(), if !gone => left = true,
                _ = shutdown.cancelled(), if !killed => {
                    kill_group(pgid);
                    killed = true;
                }
                _ = &mut sleep, if !killed && deadline.is_some() => {
                    debug!(pgid = pgid.as_raw(), "timeout; killing process group");
                    kill_group(pgid);
                    killed = true;
                }
                _ = &mut drain, if draining => {
                    // A process outside the group (or a background job) still holds the pipes.
                    debug!(pgid = pgid.as_raw(), "output pipes still open after the exit; closing them");
                    out_open = false;
                    err_open = false;
                    if exit.is_none() {
                        // Killed, yet no exit status within the grace: report the kill.
                        exit = Some(Exit::Signal(9));
                    }
                }
                r = self.stdout.read_buf(&mut out_buf), if out_open => match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(_) => {
                        let chunk = out_buf.split().freeze();
                        out_buf.reserve(READ_CHUNK);
                        left = !gone && out.send(ExecEvent::Stdout(chunk)).await.is_err();
                    }
                },
                r = self.stderr.read_buf(&mut err_buf), if err_open => match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(_) => {
                        let chunk = err_buf.split().freeze();
                        err_buf.reserve(READ_CHUNK);
                        left = !gone && out.send(ExecEvent::Stderr(chunk)).await.is_err();
                    }
                },
                st = &mut self.exit, if exit.is_none() => {
                    let st = st.unwrap_or(Reaped::LOST);
                    exit = Some(st.exit);
                    usage = st.usage;
                }
            }
            if left {
                feeder.abort();
                if !outlives_client {
                    debug!(pgid = pgid.as_raw(), "client left; killing process group");
                    kill_group(pgid);
                    return None;
                }
                debug!(
                    pgid = pgid.as_raw(),
                    "client left; the command runs on until its end or timeout"
                );
                gone = true;
            }
        }
        feeder.abort();
        if killed {
            // Anything the group left running is gone too.
            kill_group(pgid);
        }
        drop(guard.disarm());
        if gone {
            return None;
        }
        let code = exit.map(|e| self.dialect.exit_code(e)).unwrap_or(-1);
        let _ = out.send(ExecEvent::Exit(code, usage)).await;
        Some(code)
    }
}

/// A started command taken apart, for an owner that drives it itself (the process service).
pub(crate) struct RunningParts {
    /// The command's process group (its pid).
    pub pgid: Pid,
    /// Its reap status.
    pub exit: tokio::sync::oneshot::Receiver<Reaped>,
    /// Its stdout pipe.
    pub stdout: pipe::Receiver,
    /// Its stderr pipe.
    pub stderr: pipe::Receiver,
    /// Its stdin pipe.
    pub stdin: pipe::Sender,
}

impl Running {
    /// The parts of the started command; the caller owns killing and reaping from here on.
    pub(crate) fn into_parts(mut self) -> RunningParts {
        RunningParts {
            pgid: self.pgid,
            exit: self.exit,
            stdout: self.stdout,
            stderr: self.stderr,
            stdin: self.stdin.take().expect("stdin is set at start"),
        }
    }
}

/// Kills a process group when dropped, unless disarmed first.
pub(crate) struct KillOnDrop(pub(crate) Option<Pid>);

impl KillOnDrop {
    /// Leaves the group alone on drop.
    pub(crate) fn disarm(mut self) -> Self {
        self.0 = None;
        self
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_group(pgid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_per_dialect() {
        let cases = [
            (Exit::Code(0), 0, 0),
            (Exit::Code(3), 3, 3),
            (Exit::Signal(9), -1, 137),
            (Exit::Signal(15), -1, 143),
            // The reaper lost the child: no signal to report.
            (Exit::Signal(0), -1, -1),
        ];
        for (exit, mcp, bridge) in cases {
            assert_eq!(Dialect::Mcp.exit_code(exit), mcp, "{exit:?}");
            assert_eq!(Dialect::Bridge.exit_code(exit), bridge, "{exit:?}");
        }
    }
}
