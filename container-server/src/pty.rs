//! PTY exec (`bridgepb` Exec with `pty = true`, WIRE-BRIDGE.md section 3): the command runs
//! on a new pseudo-terminal as the leader of its own session and process group, the terminal
//! its controlling one and its stdin, stdout and stderr. One task owns the master side: it
//! applies size changes, writes the client's keystrokes, reads the merged output as STDOUT
//! chunks of at most [`PTY_CHUNK`] bytes, and after the terminal's end (EIO once no process
//! holds the slave) and the reap sends exactly one EXIT, signal N as 128+N. The whole group is
//! killed (SIGKILL) on timeout, when the client leaves or cancels, and on shutdown.
//!
//! The child setup, `oom_score_adj`, exit codes and the group kill are [`crate::exec`]'s.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::ServerError;
use crate::exec::{
    kill_group, own_oom_score_adj, prepare_child, ChildOom, Dialect, ExecEvent, ExecSpec,
    KillOnDrop, EXIT_DRAIN_GRACE,
};
use crate::reaper::{Exit, Reaped, Reaper, Usage};

/// The largest STDOUT chunk a PTY exec sends.
pub const PTY_CHUNK: usize = 4096;

/// The timeout of a PTY exec whose request gives none (`timeout_seconds` <= 0).
pub const PTY_DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The terminal size when the first message gives none.
pub const DEFAULT_SIZE: TermSize = TermSize { cols: 80, rows: 24 };

/// `TERM` of every PTY command, set after its other variables.
pub const TERM: &str = "xterm-256color";

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

impl TermSize {
    /// The size a `TerminalResize` asks for: `None` unless both values are above zero; values
    /// above what a terminal can hold (65535) are capped.
    pub fn from_request(cols: u32, rows: u32) -> Option<Self> {
        if cols == 0 || rows == 0 {
            return None;
        }
        let cap = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        Some(Self {
            cols: cap(cols),
            rows: cap(rows),
        })
    }
}

/// Whether `command` runs as it is (a program path or name) rather than through `/bin/sh -c`:
/// non-empty, none of space, tab, ``|&;<>$()` ``, and starting with `/` or without any `/`.
pub fn is_bare(command: &str) -> bool {
    const SHELL: &[char] = &[' ', '\t', '|', '&', ';', '<', '>', '$', '(', ')', '`'];
    !command.is_empty()
        && !command.contains(SHELL)
        && (command.starts_with('/') || !command.contains('/'))
}

/// One later message of the client: a size change (applied first), then keystrokes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PtyInput {
    /// The new size, if the message asked for one.
    pub size: Option<TermSize>,
    /// Bytes typed into the terminal.
    pub data: Bytes,
}

/// A command started on its terminal. [`PtyRunning::drive`] runs it to the end.
pub struct PtyRunning {
    pgid: Pid,
    master: AsyncFd<OwnedFd>,
    exit: oneshot::Receiver<Reaped>,
    timeout: Option<Duration>,
}

impl PtyRunning {
    /// The parts of the started command, for an owner that drives it itself (the process
    /// service): its group, the terminal's master side and its reap status.
    pub(crate) fn into_parts(self) -> (Pid, AsyncFd<OwnedFd>, oneshot::Receiver<Reaped>) {
        (self.pgid, self.master, self.exit)
    }
}

/// Starts `spec` (its `stdin` is not used) on a new terminal of `size`, with the server's
/// `oom_score_adj` policy. A failure to open the terminal or to start the command is
/// [`ServerError::Spawn`] (INTERNAL), or [`ServerError::AtLimit`] at the bot's limits.
pub fn start(spec: ExecSpec, size: TermSize, reaper: &Reaper) -> Result<PtyRunning, ServerError> {
    start_with(
        spec,
        size,
        reaper,
        ChildOom::for_server(own_oom_score_adj()),
    )
}

/// [`start`] with the command's `oom_score_adj` chosen by the caller.
pub fn start_with(
    spec: ExecSpec,
    size: TermSize,
    reaper: &Reaper,
    oom: ChildOom,
) -> Result<PtyRunning, ServerError> {
    let (master, slave) = open_pty().map_err(|e| ServerError::spawn("a terminal", e))?;
    set_size(master.as_raw_fd(), size).map_err(ServerError::Spawn)?;
    let mut cmd = if is_bare(&spec.command) {
        std::process::Command::new(&spec.command)
    } else {
        let mut c = std::process::Command::new("/bin/sh");
        c.arg("-c").arg(&spec.command);
        c
    };
    prepare_child(&mut cmd, &spec, oom);
    cmd.env("TERM", TERM);
    let stdio = |fd: &OwnedFd| -> Result<Stdio, ServerError> {
        Ok(Stdio::from(
            fd.try_clone()
                .map_err(|e| ServerError::spawn("a terminal", e))?,
        ))
    };
    cmd.stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe system calls; the error is built from
    // errno without allocating.
    unsafe {
        cmd.pre_exec(|| {
            // A new session and process group led by the command, whose controlling terminal
            // is the one on its stdin (already the slave when this runs).
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (child, exit) = reaper
        .spawn(&mut cmd)
        .map_err(|e| ServerError::spawn("a process", e))?;
    let pgid = Pid::from_raw(child.id() as i32);
    // The reaper owns waiting; the parent's copies of the slave go with `cmd`, so the
    // terminal's end is seen once the command's processes have closed theirs.
    drop(child);
    drop(cmd);
    let master = set_nonblocking(master)
        .and_then(|fd| {
            // SAFETY: an `OwnedFd` is a valid open fd that stays the same until dropped.
            unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
        })
        .map_err(|e| {
            kill_group(pgid);
            ServerError::Spawn(e)
        })?;
    debug!(pgid = pgid.as_raw(), command = %spec.command, "pty exec started");
    Ok(PtyRunning {
        pgid,
        master,
        exit,
        timeout: spec.timeout,
    })
}

/// Opens a new pseudo-terminal pair, both ends close-on-exec and neither becoming the
/// server's controlling terminal.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: posix_openpt returns a new fd or -1; we own the fd from here on.
    let master = unsafe {
        let fd = libc::posix_openpt(flags);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    let m = master.as_raw_fd();
    // SAFETY: grantpt and unlockpt act on the master fd we own.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The slave straight from the master (Linux 4.13+), immune to a foreign /dev/pts...
    // SAFETY: TIOCGPTPEER returns a new fd or -1.
    let fd = unsafe { libc::ioctl(m, libc::TIOCGPTPEER, flags) };
    if fd >= 0 {
        // SAFETY: a new fd we own.
        return Ok((master, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    // ... else by its name.
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer and its length are ours; ptsname_r NUL-terminates on success.
    let rc = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let path = CString::from(path);
    // SAFETY: a NUL-terminated path; open returns a new fd or -1.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok((master, unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Sets the terminal's size (TIOCSWINSZ); its foreground process group gets SIGWINCH.
pub(crate) fn set_size(master: RawFd, size: TermSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own from the pointer.
    if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// One non-blocking read of the master. `Ok(None)`: the terminal ended (EIO once no process
/// holds the slave, or end of file).
pub(crate) fn read_master(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: reads into a buffer we own, at most its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n > 0 {
        return Ok(Some(n as usize));
    }
    if n == 0 {
        return Ok(None);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EIO) => Ok(None),
        _ => Err(e),
    }
}

/// One non-blocking write to the master.
pub(crate) fn write_master(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: writes at most `data.len()` bytes from a buffer we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl PtyRunning {
    /// Runs the command to its end: applies `input` in order (a message's size, then its
    /// bytes; the next message only once those are written), streams the terminal's output
    /// into `out` as [`ExecEvent::Stdout`], then sends one [`ExecEvent::Exit`] (128+N for
    /// signal N) once the terminal ended and the command was reaped. `input` closing (the
    /// client's half-close) changes nothing. Kills the whole group on timeout, when `shutdown`
    /// fires, and when the client leaves (`out` closes or `gone` fires): then nothing more is
    /// sent and None is returned.
    pub async fn drive(
        mut self,
        mut input: mpsc::Receiver<PtyInput>,
        out: mpsc::Sender<ExecEvent>,
        shutdown: CancellationToken,
        gone: CancellationToken,
    ) -> Option<i32> {
        let pgid = self.pgid;
        // Kill the group if this future is dropped mid-way (a panic, the runtime's end).
        let guard = KillOnDrop(Some(pgid));
        let deadline = self.timeout.and_then(|t| Instant::now().checked_add(t));
        let sleep = tokio::time::sleep_until(
            deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365 * 10)),
        );
        tokio::pin!(sleep);
        let drain = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(drain);
        let mut draining = false;
        let mut buf = vec![0u8; PTY_CHUNK];
        let mut pending_out: Option<Bytes> = None;
        let mut pending_in = Bytes::new();
        let mut input_open = true;
        let mut ended = false;
        let mut exit: Option<Exit> = None;
        let mut usage: Option<Usage> = None;
        let mut killed = false;
        loop {
            if ended && exit.is_some() && pending_out.is_none() {
                break;
            }
            if !draining && (exit.is_some() || killed) {
                // Whoever still holds the terminal after the command's end (a background job,
                // a process that left the group) gets this long, then the call ends.
                draining = true;
                drain.as_mut().reset(Instant::now() + EXIT_DRAIN_GRACE);
            }
            tokio::select! {
                _ = out.closed() => {
                    debug!(pgid = pgid.as_raw(), "client left; killing pty process group");
                    kill_group(pgid);
                    return None;
                }
                _ = gone.cancelled() => {
                    debug!(pgid = pgid.as_raw(), "client reset the call; killing pty process group");
                    kill_group(pgid);
                    return None;
                }
                _ = shutdown.cancelled(), if !killed => {
                    kill_group(pgid);
                    killed = true;
                }
                _ = &mut sleep, if !killed && deadline.is_some() => {
                    debug!(pgid = pgid.as_raw(), "timeout; killing pty process group");
                    kill_group(pgid);
                    killed = true;
                }
                _ = &mut drain, if draining => {
                    debug!(pgid = pgid.as_raw(), "terminal still open after the exit; closing it");
                    ended = true;
                    if exit.is_none() {
                        // Killed, yet no exit status within the grace: report the kill.
                        exit = Some(Exit::Signal(9));
                    }
                }
                permit = out.reserve(), if pending_out.is_some() => match permit {
                    Ok(p) => p.send(ExecEvent::Stdout(pending_out.take().unwrap_or_default())),
                    Err(_) => {
                        kill_group(pgid);
                        return None;
                    }
                },
                r = self.master.readable(), if !ended && pending_out.is_none() => {
                    let mut ready = match r {
                        Ok(g) => g,
                        Err(e) => {
                            warn!(pgid = pgid.as_raw(), error = %e, "pty poll failed");
                            ended = true;
                            continue;
                        }
                    };
                    match ready.try_io(|fd| read_master(fd.get_ref(), &mut buf)) {
                        Ok(Ok(Some(n))) => pending_out = Some(Bytes::copy_from_slice(&buf[..n])),
                        Ok(Ok(None)) => ended = true,
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        Ok(Err(e)) => {
                            debug!(pgid = pgid.as_raw(), error = %e, "pty read failed");
                            ended = true;
                        }
                        Err(_would_block) => {}
                    }
                }
                r = self.master.writable(), if !pending_in.is_empty() && !ended => {
                    let mut ready = match r {
                        Ok(g) => g,
                        Err(_) => {
                            pending_in.clear();
                            continue;
                        }
                    };
                    match ready.try_io(|fd| write_master(fd.get_ref(), &pending_in)) {
                        Ok(Ok(n)) => {
                            let _ = pending_in.split_to(n.min(pending_in.len()));
                        }
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        Ok(Err(e)) => {
                            // The terminal is going away: what was typed is dropped.
                            debug!(pgid = pgid.as_raw(), error = %e, "pty write failed");
                            pending_in.clear();
                        }
                        Err(_would_block) => {}
                    }
                }
                m = input.recv(), if input_open && pending_in.is_empty() => match m {
                    Some(m) => {
                        if let Some(size) = m.size {
                            if let Err(e) = set_size(self.master.as_raw_fd(), size) {
                                debug!(pgid = pgid.as_raw(), error = %e, "pty resize failed");
                            }
                        }
                        if !ended {
                            pending_in = m.data;
                        }
                    }
                    // The client's half-close: the terminal stays as it is.
                    None => input_open = false,
                },
                st = &mut self.exit, if exit.is_none() => {
                    let st = st.unwrap_or(Reaped::LOST);
                    exit = Some(st.exit);
                    usage = st.usage;
                }
            }
        }
        if killed {
            // Anything the group left running is gone too.
            kill_group(pgid);
        }
        drop(guard.disarm());
        let code = exit.map(|e| Dialect::Bridge.exit_code(e)).unwrap_or(-1);
        let _ = out.send(ExecEvent::Exit(code, usage)).await;
        Some(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_commands() {
        let cases = [
            ("bash", true),
            ("/bin/bash", true),
            ("vim", true),
            ("/usr/bin/env", true),
            ("python3.12", true),
            ("", false),
            ("ls -l", false),
            ("ls\t-l", false),
            ("bin/bash", false),
            ("./run", false),
            ("a|b", false),
            ("a&", false),
            ("a;b", false),
            ("a<b", false),
            ("a>b", false),
            ("$SHELL", false),
            ("(x)", false),
            ("x)", false),
            ("`x`", false),
            ("/bin/sh;x", false),
        ];
        for (cmd, want) in cases {
            assert_eq!(is_bare(cmd), want, "{cmd:?}");
        }
    }

    #[test]
    fn sizes_from_requests() {
        let size = |cols, rows| Some(TermSize { cols, rows });
        let cases = [
            ((0, 0), None),
            ((100, 0), None),
            ((0, 40), None),
            ((100, 40), size(100, 40)),
            ((1, 1), size(1, 1)),
            ((70_000, 40), size(u16::MAX, 40)),
            ((u32::MAX, u32::MAX), size(u16::MAX, u16::MAX)),
        ];
        for ((cols, rows), want) in cases {
            assert_eq!(TermSize::from_request(cols, rows), want, "{cols}x{rows}");
        }
    }
}
