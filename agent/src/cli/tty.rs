//! `exec -t`: an interactive terminal in a bot through the agent, over `bridgepb` Exec with
//! `pty = true` (WIRE-BRIDGE.md section 3).
//!
//! The local terminal is in raw mode for the session (keys go to the bot as they are typed,
//! Ctrl-C included) and is restored on every way out: the command's exit, an error, a signal
//! to the CLI, a panic ([`RawMode`] restores it when dropped, before anything is printed). The
//! first message carries the window size, every SIGWINCH sends the new one, output is written
//! as it comes, and the remote exit code becomes the CLI's.

use std::io::IsTerminal;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use memoh_proto::pb::bridgepb::exec_output::Stream as OutKind;
use memoh_proto::pb::bridgepb::{ExecInput, TerminalResize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use super::exec::command_line;
use super::{bridge_client, status_err, CliError};

/// The server's own limit of a terminal session when the caller gives none (WIRE-BRIDGE.md).
const DEFAULT_PTY_TIMEOUT: Duration = Duration::from_secs(300);

/// How a session ended.
enum Ended {
    /// The command's exit code, as the server reported it.
    Exit(i32),
    /// The CLI got this signal (its number).
    Signal(i32),
}

/// Runs `argv` in `bot` on a terminal of its own, wired to this process's terminal; returns the
/// command's exit code.
pub async fn exec_tty(
    socket: &Path,
    bot: &str,
    argv: &[String],
    work_dir: Option<String>,
    timeout: i32,
) -> Result<u8, CliError> {
    if argv.is_empty() {
        return Err(CliError::new("exec needs a command after --"));
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliError::new(
            "stdin is not a terminal: drop -t (--tty) to run the command without one",
        ));
    }
    let fd = stdin.as_raw_fd();
    let client = bridge_client(socket, bot)?;
    // Watched before the first size is read, so no resize falls in between.
    let winch = signal(SignalKind::window_change()).ok();
    let first = ExecInput {
        command: command_line(argv),
        work_dir: work_dir.unwrap_or_default(),
        timeout_seconds: timeout,
        pty: true,
        resize: window_size(fd),
        ..Default::default()
    };
    let limit = u64::try_from(timeout)
        .ok()
        .filter(|t| *t > 0)
        .map_or(DEFAULT_PTY_TIMEOUT, Duration::from_secs);
    // Watched before raw mode: a signal's default action would leave the terminal raw.
    let signals = Signals::new();
    let raw = RawMode::enter(fd)
        .map_err(|e| CliError::new(format!("cannot put the terminal in raw mode: {e}")))?;
    let started = Instant::now();
    let ended = session(socket, client, first, fd, winch, signals).await;
    // The terminal is the user's again before any line is printed.
    drop(raw);
    match ended? {
        Ended::Exit(code) if code < 0 => {
            eprintln!("memoh-agent: exec: the command was killed by a signal");
            Ok(137)
        }
        Ended::Exit(137) if started.elapsed() + Duration::from_millis(500) >= limit => {
            eprintln!("memoh-agent: exec: timed out after {} s", limit.as_secs());
            Ok(137)
        }
        Ended::Exit(code) => Ok((code & 0xff) as u8),
        Ended::Signal(n) => Ok((128 + n) as u8),
    }
}

/// The call itself: requests from the stdin and SIGWINCH tasks, output to stdout, until the
/// exit status, a failure, or a signal to the CLI. Dropping the call cancels it (the server
/// kills the command).
async fn session(
    socket: &Path,
    mut client: super::BridgeClient,
    first: ExecInput,
    fd: RawFd,
    winch: Option<Signal>,
    mut signals: Signals,
) -> Result<Ended, CliError> {
    let (tx, rx) = mpsc::channel::<ExecInput>(16);
    // The channel is empty and its receiver alive: the first message always fits.
    let _ = tx.try_send(first);
    let (stdin_failed, mut stdin_error) = tokio::sync::oneshot::channel::<String>();
    let tasks = [
        tokio::spawn(read_stdin(tx.clone(), stdin_failed)),
        tokio::spawn(send_resizes(tx, fd, winch)),
    ];
    let _abort = AbortOnDrop(tasks);
    let mut out = client
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| status_err(socket, s))?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    let mut stdin_settled = false;
    loop {
        tokio::select! {
            m = out.message() => {
                let Some(m) = m.map_err(|s| status_err(socket, s))? else {
                    return Err(CliError::new(
                        "the bot's server ended the terminal without an exit status",
                    ));
                };
                match OutKind::try_from(m.stream) {
                    Ok(OutKind::Stdout | OutKind::Stderr) => {
                        let _ = stdout.write_all(&m.data).await;
                        let _ = stdout.flush().await;
                    }
                    Ok(OutKind::Exit) => return Ok(Ended::Exit(m.exit_code)),
                    Err(_) => {}
                }
            }
            n = signals.next() => return Ok(Ended::Signal(n)),
            r = &mut stdin_error, if !stdin_settled => match r {
                Ok(e) => {
                    return Err(CliError::new(format!(
                        "reading the terminal failed ({e}); the command was cancelled"
                    )))
                }
                Err(_) => stdin_settled = true,
            },
        }
    }
}

/// Sends what is typed, as it is read (raw mode: no line buffering). The end of input only
/// stops the reading: the server ignores a half-close in pty mode, and the session ends with
/// the command. A read error is reported through `failed`.
async fn read_stdin(tx: mpsc::Sender<ExecInput>, failed: tokio::sync::oneshot::Sender<String>) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 4096];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                let m = ExecInput {
                    stdin_data: Bytes::copy_from_slice(&buf[..n]),
                    ..Default::default()
                };
                if tx.send(m).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = failed.send(e.to_string());
                return;
            }
        }
    }
}

/// Sends the window size again on every SIGWINCH.
async fn send_resizes(tx: mpsc::Sender<ExecInput>, fd: RawFd, winch: Option<Signal>) {
    let Some(mut winch) = winch else {
        tracing::warn!("cannot watch the window size; the bot's terminal keeps its first size");
        return;
    };
    while winch.recv().await.is_some() {
        let Some(size) = window_size(fd) else {
            continue;
        };
        let m = ExecInput {
            resize: Some(size),
            ..Default::default()
        };
        if tx.send(m).await.is_err() {
            return;
        }
    }
}

/// The terminal's window size (TIOCGWINSZ), when it has one.
fn window_size(fd: RawFd) -> Option<TerminalResize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then(|| TerminalResize {
        cols: ws.ws_col.into(),
        rows: ws.ws_row.into(),
    })
}

/// The terminal in raw mode while this lives; its settings are put back when it is dropped
/// (every return, `?` and panic passes through the drop).
struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: RawFd) -> std::io::Result<Self> {
        // SAFETY: `termios` is plain integers and arrays, for which all zeroes is a valid value.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one `termios` through the pointer, valid for the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only changes the flags of the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads one `termios` through the pointer, valid for the call.
        if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; `saved` is what tcgetattr returned.
        if unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) } != 0 {
            eprintln!(
                "memoh-agent: cannot restore the terminal ({}); run `reset`",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The signals that end a session (the CLI's exit code is then 128 + N). Raw mode turns
/// Ctrl-C into a byte for the bot, so these come from elsewhere (`kill`, a closed terminal).
struct Signals {
    rx: mpsc::Receiver<i32>,
    _tasks: AbortOnDrop<4>,
}

impl Signals {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel(4);
        let watch = |kind: SignalKind, tx: mpsc::Sender<i32>| {
            let stream = signal(kind);
            tokio::spawn(async move {
                let Ok(mut s) = stream else {
                    return std::future::pending().await;
                };
                if s.recv().await.is_some() {
                    let _ = tx.send(kind.as_raw_value()).await;
                }
            })
        };
        let tasks = [
            watch(SignalKind::hangup(), tx.clone()),
            watch(SignalKind::interrupt(), tx.clone()),
            watch(SignalKind::quit(), tx.clone()),
            watch(SignalKind::terminate(), tx),
        ];
        Self {
            rx,
            _tasks: AbortOnDrop(tasks),
        }
    }

    async fn next(&mut self) -> i32 {
        match self.rx.recv().await {
            Some(n) => n,
            None => std::future::pending().await,
        }
    }
}

/// Background tasks that end with their owner.
struct AbortOnDrop<const N: usize>([tokio::task::JoinHandle<()>; N]);

impl<const N: usize> Drop for AbortOnDrop<N> {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
