//! System tests of the CLI's interactive verbs over `bridgepb` (tier 3), against a real agent
//! and bot:
//! - `exec -t BOT -- sh` under a pseudo-terminal the test made (the CLI's stdin, stdout and
//!   stderr on its slave, the slave its controlling terminal): the shell sees the window
//!   size, a resize reaches it, the exit code comes back, the terminal is restored; without a
//!   terminal `-t` is refused in one line;
//! - `port-forward` to a TCP echo server inside the bot: several connections at once, data
//!   both ways, the half-close passed on.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"`; without it the tests print "skipped"
//! and pass, except under `CI`, where they fail.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Env, TestAgent};

/// A pseudo-terminal pair: the master (the test's side) and the slave's path.
struct Pty {
    master: std::fs::File,
    slave_path: String,
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

impl Pty {
    fn open(rows: u16, cols: u16) -> Self {
        // SAFETY: plain libc calls on a descriptor this function owns; ptsname_r writes at most
        // `buf.len()` bytes into `buf`.
        unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            check(fd, "posix_openpt");
            let master = std::fs::File::from(OwnedFd::from_raw_fd(fd));
            check(libc::grantpt(fd), "grantpt");
            check(libc::unlockpt(fd), "unlockpt");
            let mut buf = [0 as libc::c_char; 128];
            assert_eq!(
                libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()),
                0,
                "ptsname_r"
            );
            let slave_path = std::ffi::CStr::from_ptr(buf.as_ptr())
                .to_string_lossy()
                .into_owned();
            let pty = Pty { master, slave_path };
            pty.resize(rows, cols);
            pty
        }
    }

    fn open_slave(&self) -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&self.slave_path)
            .unwrap()
    }

    /// Sets the window size; the kernel signals the terminal's foreground group (SIGWINCH).
    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, valid for the call.
        check(
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
            "TIOCSWINSZ",
        );
    }
}

/// The local flags of a terminal.
fn lflags(fd: RawFd) -> libc::tcflag_t {
    // SAFETY: `termios` is plain data; tcgetattr writes one through the pointer.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        check(libc::tcgetattr(fd, &mut t), "tcgetattr");
        t.c_lflag
    }
}

/// Everything read from the master so far, collected by a thread.
struct Screen(Arc<Mutex<Vec<u8>>>);

impl Screen {
    fn start(master: &std::fs::File) -> Self {
        let mut r = master.try_clone().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once no slave is open any more.
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    return;
                }
                s.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Screen(seen)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the output after byte `from` contains `want`; returns the end of the match.
    fn wait_for(&self, from: usize, want: &str, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let t = self.text();
            if let Some(i) = t.get(from..).and_then(|s| s.find(want)) {
                return from + i + want.len();
            }
            assert!(
                Instant::now() < deadline,
                "{want:?} did not appear within {limit:?}; the terminal showed {t:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the CLI did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn exec_t_runs_an_interactive_shell_on_a_terminal() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("tty");

    // Without a terminal: one line, saying what to do.
    let line = a.fails(&["exec", "-t", &bot, "--", "sh"]);
    assert!(
        line.contains("not a terminal") && line.contains("drop -t"),
        "{line}"
    );

    let pty = Pty::open(31, 101);
    let screen = Screen::start(&pty.master);
    // The test's own slave descriptor, to read the terminal's flags after the CLI is gone.
    let watch = pty.open_slave();
    let cooked = lflags(watch.as_raw_fd());
    assert_ne!(cooked & libc::ICANON, 0);
    let mut cmd = a.command(&["exec", "--tty", &bot, "--", "sh"]);
    let slave = pty.open_slave();
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe; the closure touches no other state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let mut keys = pty.master.try_clone().unwrap();

    // Raw mode while the session runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while lflags(watch.as_raw_fd()) & libc::ICANON != 0 {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the CLI ended ({st}) before raw mode: {:?}", screen.text());
        }
        assert!(
            Instant::now() < deadline,
            "the CLI never put the terminal in raw mode: {:?}",
            screen.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    keys.write_all(b"stty size; echo $((6*7))\n").unwrap();
    let at = screen.wait_for(0, "31 101", Duration::from_secs(30));
    let at = screen.wait_for(at, "42", Duration::from_secs(10));

    // A resize reaches the shell (SIGWINCH -> resize message); asked until it shows.
    pty.resize(42, 133);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut from = at;
    loop {
        keys.write_all(b"stty size\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let t = screen.text();
        if t.get(from..).unwrap_or("").contains("42 133") {
            from = t.len();
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new size never reached the shell: {t:?}"
        );
    }

    keys.write_all(b"exit 3\n").unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(3),
        "exit status; the terminal showed {:?}",
        &screen.text()[from.min(screen.text().len())..]
    );
    let restored = lflags(watch.as_raw_fd());
    assert_eq!(
        restored & (libc::ICANON | libc::ECHO | libc::ISIG),
        cooked & (libc::ICANON | libc::ECHO | libc::ISIG),
        "the terminal was not restored"
    );
}

/// Starts `port-forward BOT :PORT`; returns the process and the local address it printed.
fn start_forward(a: &TestAgent, bot: &str, port: u16) -> (Child, String) {
    let mut child = a
        .command(&["port-forward", bot, &format!(":{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while let Ok(1) = out.read(&mut b) {
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("port-forward printed no line");
    // "forwarding 127.0.0.1:PORT -> BOT:PORT"
    let local = line
        .strip_prefix("forwarding ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_string();
    assert!(
        line.ends_with(&format!("-> {bot}:{port}")),
        "unexpected line {line:?}"
    );
    (child, local)
}

/// Sends `data` and reads the echo on one connection, then half-closes and expects the end.
fn echo_round(local: &str, data: Vec<u8>) {
    let mut s = TcpStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == data, "the echo differs from what was sent");
    // Our half-close reaches the target (cat ends), whose close reaches us.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes after the echo", rest.len());
}

#[test]
fn port_forward_carries_several_connections_both_ways() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("fwd");
    let port = 7777;
    // An echo server inside the bot, one `cat` per connection.
    a.sh_in(
        &bot,
        &format!("setsid nc -ll -p {port} -e cat >/dev/null 2>&1 </dev/null &"),
    );
    let (mut fwd, local) = start_forward(&a, &bot, port);
    let mut rounds = Vec::new();
    for i in 0..4u8 {
        let local = local.clone();
        // Several frames each, different content per connection.
        let data: Vec<u8> = (0..300_000u32)
            .map(|n| (n as u8).wrapping_mul(31).wrapping_add(i))
            .collect();
        rounds.push(std::thread::spawn(move || echo_round(&local, data)));
    }
    let failed: Vec<_> = rounds
        .into_iter()
        .map(|t| t.join())
        .filter(|r| r.is_err())
        .collect();
    // A port nobody listens on: that connection fails (reported), the forwarder goes on.
    let (mut refused, refused_local) = start_forward(&a, &bot, port + 1);
    let mut s = TcpStream::connect(&refused_local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    echo_round(&local, b"still there".to_vec());
    for c in [&mut fwd, &mut refused] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
    }
    let st = wait_exit(&mut fwd, Duration::from_secs(10));
    wait_exit(&mut refused, Duration::from_secs(10));
    let mut err = String::new();
    refused
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("connection from"), "stderr: {err:?}");
    assert!(failed.is_empty(), "{} connections failed", failed.len());
    assert!(st.success(), "port-forward ended with {st}");
    a.sh_in(&bot, &format!("pkill -f 'nc -ll -p {port}' || true"));
}
