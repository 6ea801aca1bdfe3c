//! The bot server's log: a small program containerd's shim runs next to every bot task. It
//! copies the task's stdout and stderr into `<state_dir>/bots/BOT/server.log` and rotates that
//! file at a size bound, so a bot writing without end cannot fill the host's disk.
//!
//! Holds:
//! - [`task_io`] and [`create_server_task`]: how the lifecycle asks containerd for it, and the
//!   `file://` fallback (unbounded, warned about once) when the program cannot be used;
//! - [`from_shim`], [`parse_args`] and [`run`]: the program itself, entered from `main` before
//!   any argument parsing (the shim's argument list is not a CLI);
//! - [`Rotator`]: the size-bounded, rotating writer;
//! - [`log_files`]: a bot's current and rotated log files, oldest first, for `bot logs`.
//!
//! How containerd 1.6's runc shim runs a logging program (`pkg/process/io.go`: `createIO`,
//! `NewBinaryIO`, `newBinaryCmd`, `binaryIO.Close` and `cancel`): a task whose stdout URI is
//! `binary:///PATH?KEY=VALUE&...` gets three pipes; the shim starts PATH with the read ends of
//! the task's stdout and stderr pipes as fds 3 and 4 and the write end of a readiness pipe as fd
//! 5 (Go's `ExtraFiles` begin at fd 3); stdin, stdout and stderr are /dev/null. The arguments are
//! each query key followed by its first value, in Go map order, which is random: only the pairs
//! are kept together. The environment holds only `CONTAINER_ID` and `CONTAINER_NAMESPACE`. The
//! shim reads one byte (end of file counts too) from fd 5 before it goes on creating the task.
//! The program is the shim's child, not the agent's, so it outlives agent restarts. When the
//! task is deleted the shim closes its ends of the pipes, sends SIGTERM, and kills the program
//! if it has not exited 12 s later.
//!
//! When the disk takes lines slower than the bot writes them, the program simply stops reading:
//! the pipe fills and the bot's writes block. Nothing is buffered beyond one read (64 KiB).
//! Output that cannot be written (disk full, log directory gone) is counted and replaced by one
//! marker line once writing works again.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Config, MIN_SERVER_LOG_BYTES};
use crate::containerd::{LogProgram, RootfsMount, Runtime, TaskIo};
use crate::error::AgentError;

/// Argument key whose value is the log file's path; its presence (with `CONTAINER_ID` in the
/// environment) is what makes `memoh-agent` run as the logging program.
pub const KEY_PATH: &str = "memoh-server-log";
/// Argument key of the rotation size in bytes.
pub const KEY_MAX_BYTES: &str = "max-bytes";
/// Argument key of the number of rotated files kept.
pub const KEY_KEEP: &str = "keep";
/// Largest read from a pipe, and so the most output the program holds at once.
pub const READ_BUF: usize = 64 * 1024;
/// After SIGTERM: how long the program keeps copying output that is still arriving.
const TERM_DRAIN: Duration = Duration::from_secs(2);
/// After a failed write: how long before the log file is opened again.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// The readiness pipe's fd.
const READY_FD: RawFd = 5;
/// The task's stdout and stderr pipes.
const STREAM_FDS: [RawFd; 2] = [3, 4];

/// What the logging program was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The log file (`server.log`).
    pub path: PathBuf,
    /// Rotation size.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

impl Settings {
    /// The argument pairs that carry these settings.
    pub fn args(&self) -> Vec<(String, String)> {
        vec![
            (KEY_PATH.into(), self.path.display().to_string()),
            (KEY_MAX_BYTES.into(), self.max_bytes.to_string()),
            (KEY_KEEP.into(), self.keep.to_string()),
        ]
    }
}

/// The settings when this process was started by containerd's shim as the logging program:
/// `CONTAINER_ID` is set and the arguments carry [`KEY_PATH`]. `None` for any other start.
pub fn from_shim() -> Option<Result<Settings, String>> {
    std::env::var_os("CONTAINER_ID")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    parse_args(&args)
}

/// Reads `KEY VALUE` pairs in any order. `None` when no pair's key is [`KEY_PATH`].
pub fn parse_args(args: &[OsString]) -> Option<Result<Settings, String>> {
    let pairs: Vec<(&OsString, Option<&OsString>)> =
        args.chunks(2).map(|c| (&c[0], c.get(1))).collect();
    if !pairs.iter().any(|(k, _)| k.as_os_str() == KEY_PATH) {
        return None;
    }
    Some(settings_of(pairs))
}

fn settings_of(pairs: Vec<(&OsString, Option<&OsString>)>) -> Result<Settings, String> {
    let mut path = None;
    let mut max_bytes = None;
    let mut keep = None;
    for (k, v) in pairs {
        let v = v.ok_or_else(|| format!("argument {k:?} has no value"))?;
        let number = |what: &str| {
            v.to_str()
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| format!("{what} {v:?} is not a number"))
        };
        match k.to_str() {
            Some(KEY_PATH) => path = Some(PathBuf::from(v)),
            Some(KEY_MAX_BYTES) => max_bytes = Some(number(KEY_MAX_BYTES)?),
            Some(KEY_KEEP) => {
                let n = number(KEY_KEEP)?;
                keep = Some(u32::try_from(n).map_err(|_| format!("{KEY_KEEP} {n} is too big"))?);
            }
            _ => return Err(format!("unknown argument {k:?}")),
        }
    }
    let path = path
        .filter(|p| p.is_absolute())
        .ok_or("the log path must be absolute")?;
    let d = Config::default();
    Ok(Settings {
        path,
        max_bytes: max_bytes
            .unwrap_or(d.server_log_max_bytes)
            .max(MIN_SERVER_LOG_BYTES),
        keep: keep.unwrap_or(d.server_log_keep),
    })
}

/// Set by the SIGTERM handler.
static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERMINATED.store(true, Ordering::Relaxed);
}

/// Runs the logging program until both of the task's streams end; returns the exit code.
pub fn run(s: &Settings) -> u8 {
    for fd in STREAM_FDS.into_iter().chain([READY_FD]) {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            eprintln!("memoh-agent: the log program needs the shim's pipes on fds 3, 4 and 5");
            return 2;
        }
    }
    // SAFETY: the handler only stores to an atomic; SA_RESTART is off so a blocked poll wakes.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_term as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGTERM, &act, std::ptr::null_mut());
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // A name of its own, so that `pkill memoh-agent` aimed at the daemon spares the bots' logs
    // (a log process gone would leave the bot's writes blocked on a full pipe).
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"memoh-serverlog".as_ptr());
    }
    // The shim starts it in the task's bundle directory; hold nothing of the task's open.
    let _ = std::env::set_current_dir("/");
    let mut rot = Rotator::open(&s.path, s.max_bytes, s.keep);
    signal_ready();
    pump(&mut |data| rot.write(data));
    0
}

/// Reads and drops the task's output until it ends: what the program does when its arguments
/// are wrong, so that the bot's writes never block on a pipe nobody reads.
pub fn discard() -> u8 {
    if STREAM_FDS
        .into_iter()
        .chain([READY_FD])
        // SAFETY: F_GETFD only inspects the descriptor table.
        .any(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0)
    {
        return 2;
    }
    signal_ready();
    pump(&mut |_| {});
    2
}

/// Tells the shim the program is ready (one byte on fd 5, then closed).
fn signal_ready() {
    // SAFETY: fd 5 was checked by the caller, and nothing else in this process owns it.
    let mut ready = unsafe { File::from_raw_fd(READY_FD) };
    let _ = ready.write_all(b"1");
}

/// Copies the two streams into `sink` until both end (or SIGTERM and a short drain).
fn pump(sink: &mut dyn FnMut(&[u8])) {
    let mut open = [true, true];
    let mut buf = vec![0u8; READ_BUF];
    let mut term_at: Option<Instant> = None;
    while open.iter().any(|o| *o) {
        if term_at.is_none() && TERMINATED.load(Ordering::Relaxed) {
            term_at = Some(Instant::now());
        }
        let timeout = match term_at {
            Some(t) if t.elapsed() >= TERM_DRAIN => return,
            Some(_) => 100,
            None => -1,
        };
        let mut fds: Vec<libc::pollfd> = STREAM_FDS
            .iter()
            .zip(open)
            .filter(|(_, o)| *o)
            .map(|(fd, _)| libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if rc == 0 && term_at.is_some() {
            return;
        }
        for p in fds.iter().filter(|p| p.revents != 0) {
            // SAFETY: `buf` is writable for its whole length.
            let n = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
            let i = usize::from(p.fd == STREAM_FDS[1]);
            match usize::try_from(n) {
                Ok(0) => open[i] = false,
                Ok(n) => sink(&buf[..n]),
                Err(_) => {
                    let e = io::Error::last_os_error().kind();
                    if e != io::ErrorKind::Interrupted && e != io::ErrorKind::WouldBlock {
                        open[i] = false;
                    }
                }
            }
        }
    }
}

/// A log file that never grows past `max` bytes: when the next bytes do not fit, it becomes
/// `PATH.1` (the older ones shift up to `PATH.KEEP`, the oldest is removed) and a new file
/// starts. Lines are kept whole when they fit in a file.
#[derive(Debug)]
pub struct Rotator {
    path: PathBuf,
    max: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
    /// Bytes lost to write errors since the last successful write.
    lost: u64,
    last_error: String,
    last_open: Option<Instant>,
}

impl Rotator {
    /// Opens (appends to) `path`; a failure is remembered and retried on later writes.
    pub fn open(path: &Path, max: u64, keep: u32) -> Self {
        let mut r = Self {
            path: path.to_path_buf(),
            max: max.max(MIN_SERVER_LOG_BYTES),
            keep,
            file: None,
            size: 0,
            lost: 0,
            last_error: String::new(),
            last_open: None,
        };
        r.reopen();
        r
    }

    fn reopen(&mut self) -> bool {
        self.last_open = Some(Instant::now());
        let opened = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&self.path)
            .and_then(|f| Ok((f.metadata()?.len(), f)));
        match opened {
            Ok((size, f)) => {
                self.file = Some(f);
                self.size = size;
                true
            }
            Err(e) => {
                self.last_error = e.to_string();
                false
            }
        }
    }

    /// The path of rotated file `n` (`PATH.n`).
    pub fn rotated(path: &Path, n: u32) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                rename_if_exists(
                    &Self::rotated(&self.path, n),
                    &Self::rotated(&self.path, n + 1),
                )?;
            }
            rename_if_exists(&self.path, &Self::rotated(&self.path, 1))?;
        }
        if !self.reopen() {
            return Err(io::Error::other(self.last_error.clone()));
        }
        Ok(())
    }

    /// Appends `data`, rotating as needed. Never fails: what cannot be written is counted and
    /// reported by a marker line in the log once writing works again.
    pub fn write(&mut self, data: &[u8]) {
        if self.file.is_none() {
            let retry = self.last_open.is_none_or(|t| t.elapsed() >= REOPEN_DELAY);
            if !retry || !self.reopen() {
                self.lost += data.len() as u64;
                return;
            }
        }
        if self.lost > 0 {
            let marker = format!(
                "[memoh-agent: {} bytes of the server's output were lost: {}]\n",
                self.lost, self.last_error
            );
            let mut done = 0;
            if let Err(e) = self.put(marker.as_bytes(), &mut done) {
                self.fail(e, data.len());
                return;
            }
            self.lost = 0;
        }
        let mut done = 0;
        if let Err(e) = self.put(data, &mut done) {
            self.fail(e, data.len() - done);
        }
    }

    fn fail(&mut self, e: io::Error, lost: usize) {
        self.file = None;
        self.last_error = e.to_string();
        self.lost += lost as u64;
    }

    /// Writes all of `data`, counting what was written in `done`.
    fn put(&mut self, data: &[u8], done: &mut usize) -> io::Result<()> {
        while *done < data.len() {
            let rest = &data[*done..];
            let room = usize::try_from(self.max.saturating_sub(self.size)).unwrap_or(usize::MAX);
            let n = if rest.len() <= room {
                rest.len()
            } else {
                // Up to the last whole line that fits; a line longer than a whole file is cut.
                match rest[..room].iter().rposition(|b| *b == b'\n') {
                    Some(i) => i + 1,
                    None if self.size == 0 => room,
                    None => 0,
                }
            };
            if n > 0 {
                let f = self
                    .file
                    .as_mut()
                    .ok_or_else(|| io::Error::other("log file not open"))?;
                f.write_all(&rest[..n])?;
                self.size += n as u64;
                *done += n;
            }
            if *done < data.len() {
                self.rotate()?;
            }
        }
        Ok(())
    }
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A bot's log files that exist, oldest first: `PATH.keep` ... `PATH.1`, then `PATH`.
pub fn log_files(path: &Path, keep: u32) -> Vec<PathBuf> {
    (1..=keep)
        .rev()
        .map(|n| Rotator::rotated(path, n))
        .chain([path.to_path_buf()])
        .filter(|p| p.exists())
        .collect()
}

/// Set once the agent fell back to `file://` logs (warned about once).
static FELL_BACK: AtomicBool = AtomicBool::new(false);

fn fall_back(why: &str) {
    if !FELL_BACK.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            reason = why,
            "bot server logs go to plain files without a size bound"
        );
    }
}

/// This binary, when containerd's shim can run it: an absolute, executable, still existing
/// file.
fn own_program() -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the agent binary: {e}"))?;
    let meta =
        std::fs::metadata(&exe).map_err(|e| format!("agent binary {}: {e}", exe.display()))?;
    if !exe.is_absolute() || exe.to_str().is_none() {
        return Err(format!("agent binary path {} is not usable", exe.display()));
    }
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("agent binary {} is not executable", exe.display()));
    }
    Ok(exe)
}

/// The task output of a bot's server: the logging program when it can be used, else the plain
/// log file.
pub fn task_io(cfg: &Config, log: &Path) -> TaskIo {
    if FELL_BACK.load(Ordering::Relaxed) {
        return TaskIo::log_file(log);
    }
    match own_program() {
        Ok(path) => TaskIo::log_program(LogProgram {
            path,
            args: Settings {
                path: log.to_path_buf(),
                max_bytes: cfg.server_log_max_bytes,
                keep: cfg.server_log_keep,
            }
            .args(),
        }),
        Err(why) => {
            fall_back(&why);
            TaskIo::log_file(log)
        }
    }
}

/// Creates a bot server's task with [`task_io`]; when containerd cannot start the logging
/// program, creates it once more with the plain log file (and keeps to that from then on).
pub async fn create_server_task(
    rt: &dyn Runtime,
    cfg: &Config,
    container_id: &str,
    rootfs: &[RootfsMount],
    log: &Path,
) -> Result<u32, AgentError> {
    let io = task_io(cfg, log);
    match rt.create_task(container_id, rootfs, &io).await {
        Err(e) if io.program.is_some() && e.to_string().contains("binary") => {
            fall_back(&e.to_string());
            let _ = rt.delete_task(container_id).await;
            rt.create_task(container_id, rootfs, &TaskIo::log_file(log))
                .await
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn shim_arguments_in_any_order() {
        let want = Settings {
            path: "/s/bots/b/server.log".into(),
            max_bytes: 8192,
            keep: 1,
        };
        let pairs = want.args();
        // Every order of the three pairs the shim may choose.
        for order in [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ] {
            let args: Vec<OsString> = order
                .iter()
                .flat_map(|i| [pairs[*i].0.clone().into(), pairs[*i].1.clone().into()])
                .collect();
            assert_eq!(parse_args(&args), Some(Ok(want.clone())), "{order:?}");
        }
        // Not for us: ordinary command lines.
        assert_eq!(parse_args(&os(&["serve", "--config", "x"])), None);
        assert_eq!(parse_args(&os(&[])), None);
        // For us but wrong.
        let bad = [
            os(&[KEY_PATH, "rel.log"]),
            os(&[KEY_PATH, "/a", KEY_KEEP]),
            os(&[KEY_PATH, "/a", KEY_KEEP, "x"]),
            os(&[KEY_PATH, "/a", "other", "1"]),
        ];
        for b in bad {
            assert!(matches!(parse_args(&b), Some(Err(_))), "{b:?}");
        }
        // Defaults, and a tiny bound is raised to the minimum.
        let s = parse_args(&os(&[KEY_MAX_BYTES, "1", KEY_PATH, "/a"]))
            .unwrap()
            .unwrap();
        assert_eq!((s.max_bytes, s.keep), (MIN_SERVER_LOG_BYTES, 2));
    }

    fn sizes(dir: &Path) -> Vec<(String, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rotation_keeps_the_bound_and_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.log");
        let max = 8192u64;
        let mut r = Rotator::open(&path, max, 2);
        let mut last = String::new();
        for i in 0..5000 {
            last = format!("line {i:05} of the server's output\n");
            r.write(last.as_bytes());
            let total: u64 = sizes(dir.path()).iter().map(|(_, s)| s).sum();
            assert!(total <= 3 * max, "{total} after line {i}");
        }
        let names: Vec<String> = sizes(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["server.log", "server.log.1", "server.log.2"]);
        for (_, s) in sizes(dir.path()) {
            assert!(s <= max, "{s}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(&last), "{text}");
        // Files hold whole lines, and the rotated ones follow on from each other.
        let files = log_files(&path, 2);
        assert_eq!(files.len(), 3);
        let all: String = files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        let nums: Vec<u32> = all.lines().map(|l| l[5..10].parse().unwrap()).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(*nums.last().unwrap(), 4999);
    }

    #[test]
    fn big_chunks_long_lines_and_keep_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.log");
        let max = 4096u64;
        let mut r = Rotator::open(&path, max, 0);
        // One read's worth without a newline, several times the bound.
        let chunk = vec![b'x'; READ_BUF];
        for _ in 0..10 {
            r.write(&chunk);
        }
        r.write(b"\nthe end\n");
        let s = sizes(dir.path());
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(s[0].1 <= max);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("\nthe end\n"));
    }

    #[test]
    fn an_existing_full_file_is_rotated_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.log");
        std::fs::write(&path, vec![b'a'; 10_000]).unwrap();
        let mut r = Rotator::open(&path, 4096, 1);
        r.write(b"new\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
        assert_eq!(
            std::fs::metadata(Rotator::rotated(&path, 1)).unwrap().len(),
            10_000
        );
        r.write(&[b'b'; 5000]);
        // The old oversized file is gone (keep 1); nothing is over the bound now.
        for (_, s) in sizes(dir.path()) {
            assert!(s <= 4096, "{s}");
        }
    }

    #[test]
    fn lost_output_is_counted_and_marked() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("bot");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("server.log");
        let mut r = Rotator::open(&path, 4096, 1);
        r.write(b"before\n");
        // The directory goes away: rotation fails, and the output is counted, not kept.
        std::fs::remove_dir_all(&sub).unwrap();
        for _ in 0..3 {
            r.write(&[b'z'; 3000]);
        }
        std::fs::create_dir(&sub).unwrap();
        r.last_open = None;
        r.write(b"after\n");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("bytes of the server's output were lost"),
            "{text}"
        );
        assert!(text.ends_with("after\n"), "{text}");
    }
}
