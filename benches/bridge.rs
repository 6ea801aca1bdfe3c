//! Benchmark of the bridge's interactive paths, each against the machine's own limit measured
//! in the same run:
//!
//! 1. PTY round trip: one keystroke sent in a `bridgepb` Exec with `pty = true` to
//!    `stty raw -echo; cat` until its echo comes back (p50, p99), vs the same program on a
//!    local pseudo-terminal this process opens (write a byte to the master, read it back);
//! 2. Tunnel throughput, both ways: bytes through `bridgepb` Tunnel to a loopback TCP sink
//!    (upload) and from a loopback TCP source (download), vs a direct TCP connection to the
//!    same sink and source.
//!
//! The server runs as its own process (the release binary) on loopback TCP, the client is tonic
//! in this process, and the TCP targets are threads of this process: everything shares the
//! machine's cores.
//!
//! ```text
//! cargo build --release -p container-server
//! cargo bench --bench bridge [-- --quick] [--out FILE] [--server PATH]
//! ```

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use memoh_proto::pb::bridgepb as bp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

type Client = bp::container_service_client::ContainerServiceClient<Channel>;

const MIB: usize = 1024 * 1024;
/// The tunnel's frame size (WIRE-BRIDGE.md: data frames of at most 32 KiB).
const FRAME: usize = 32 * 1024;
/// The program both PTY measurements run: every byte typed comes straight back.
const ECHO: &str = "stty raw -echo; cat";

struct Plan {
    keystrokes: usize,
    tunnel_bytes: usize,
    rounds: usize,
}

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    server: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench bridge -- [--quick] [--out FILE] [--server PATH]\n\
         \n  --quick        short smoke run (100 keystrokes, 16 MiB)\
         \n  --out FILE     also write the results table to FILE\
         \n  --server PATH  container-server binary (default: target/release/container-server)"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut args = Args {
        quick: false,
        out: None,
        server: target.join("release/container-server"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = Some(it.next().unwrap_or_else(|| usage()).into()),
            "--server" => args.server = it.next().unwrap_or_else(|| usage()).into(),
            "--bench" => {}
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage()
            }
        }
    }
    args
}

/// The server process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(bin: &std::path::Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["--listen", &addr, "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--template-dir")
            .arg(dir.path().join("none"))
            .env("MEMOH_ACP_TOOLS_PROXY_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; build it first: cargo build --release -p container-server",
                    bin.display()
                )
            });
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let ch = memoh_proto::client::tcp_channel(&self.addr).expect("address");
            let mut c = Client::new(ch);
            if c.stat(bp::StatRequest { path: "/".into() }).await.is_ok() {
                return c;
            }
            assert!(Instant::now() < until, "server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn mb_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ---- PTY ----

/// Keystroke round trips on a local pseudo-terminal running [`ECHO`].
fn local_pty(n: usize) -> Vec<Duration> {
    let (mut master, slave) = unsafe {
        let (mut m, mut s) = (-1, -1);
        let rc = libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        );
        assert_eq!(rc, 0, "openpty");
        (
            std::fs::File::from(OwnedFd::from_raw_fd(m)),
            OwnedFd::from_raw_fd(s),
        )
    };
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", ECHO])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn the local echo");
    let mut buf = [0u8; 256];
    // Ready once a byte comes back.
    loop {
        master.write_all(b"r").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut fl = unsafe { libc::fcntl(master.as_raw_fd(), libc::F_GETFL) };
        fl |= libc::O_NONBLOCK;
        unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl) };
        let got = master.read(&mut buf).unwrap_or(0);
        unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) };
        if got > 0 && buf[..got].contains(&b'r') {
            break;
        }
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        master.write_all(b"x").unwrap();
        loop {
            let got = master.read(&mut buf).unwrap();
            if buf[..got].contains(&b'x') {
                break;
            }
        }
        times.push(t.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    times
}

/// Keystroke round trips through a `bridgepb` PTY exec of [`ECHO`].
async fn bridge_pty(c: &mut Client, n: usize) -> Vec<Duration> {
    let (tx, rx) = mpsc::channel::<bp::ExecInput>(4);
    tx.send(bp::ExecInput {
        command: ECHO.into(),
        pty: true,
        timeout_seconds: 600,
        resize: Some(bp::TerminalResize { cols: 80, rows: 24 }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut out = c
        .exec(ReceiverStream::new(rx))
        .await
        .expect("pty exec")
        .into_inner();
    let key = |b: &[u8]| bp::ExecInput {
        stdin_data: bytes::Bytes::copy_from_slice(b),
        ..Default::default()
    };
    // Ready once a byte comes back (stty may not have run when the first one arrives).
    'ready: loop {
        tx.send(key(b"r")).await.unwrap();
        let wait = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                m = out.next() => {
                    let m = m.expect("output").expect("exec");
                    if m.data.contains(&b'r') {
                        break 'ready;
                    }
                }
                _ = &mut wait => break,
            }
        }
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        tx.send(key(b"x")).await.unwrap();
        loop {
            let m = out.next().await.expect("output").expect("exec");
            if m.data.contains(&b'x') {
                break;
            }
        }
        times.push(t.elapsed());
    }
    drop(tx);
    drop(out);
    times
}

// ---- Tunnel ----

/// A loopback TCP sink: reads everything of each connection, then closes it.
fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// A loopback TCP source: writes `bytes` to each connection, then closes it.
fn source(bytes: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let buf = vec![b's'; 256 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(buf.len());
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    addr
}

fn direct_upload(to: SocketAddr, bytes: usize) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(to).unwrap();
    let buf = vec![b'u'; FRAME];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(FRAME);
        s.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // The sink closes once it has read everything.
    let mut end = [0u8; 1];
    let _ = s.read(&mut end);
    t.elapsed()
}

fn direct_download(from: SocketAddr, bytes: usize) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(from).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, bytes);
    t.elapsed()
}

fn frame(f: bp::tunnel_frame::Frame) -> bp::TunnelFrame {
    bp::TunnelFrame { frame: Some(f) }
}

/// Opens a tunnel to `to`; returns the sender of client frames and the server's frames after
/// the opening empty `data`.
async fn open_tunnel(
    c: &mut Client,
    to: SocketAddr,
) -> (
    mpsc::Sender<bp::TunnelFrame>,
    tonic::Streaming<bp::TunnelFrame>,
) {
    let (tx, rx) = mpsc::channel::<bp::TunnelFrame>(8);
    tx.send(frame(bp::tunnel_frame::Frame::Open(bp::TunnelOpen {
        address: to.to_string(),
    })))
    .await
    .unwrap();
    let mut out = c
        .tunnel(ReceiverStream::new(rx))
        .await
        .expect("tunnel")
        .into_inner();
    match out.next().await {
        Some(Ok(bp::TunnelFrame {
            frame: Some(bp::tunnel_frame::Frame::Data(d)),
        })) if d.data.is_empty() => {}
        other => panic!("tunnel did not open: {other:?}"),
    }
    (tx, out)
}

async fn tunnel_upload(c: &mut Client, to: SocketAddr, bytes: usize) -> Duration {
    let t = Instant::now();
    let (tx, mut out) = open_tunnel(c, to).await;
    let chunk = bytes::Bytes::from(vec![b'u'; FRAME]);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(FRAME);
        tx.send(frame(bp::tunnel_frame::Frame::Data(bp::TunnelData {
            data: chunk.slice(..n),
        })))
        .await
        .unwrap();
        left -= n;
    }
    // Half-close: the server shuts the socket's write side, the sink closes, the tunnel ends.
    drop(tx);
    while let Some(m) = out.next().await {
        if let Ok(bp::TunnelFrame {
            frame: Some(bp::tunnel_frame::Frame::Close(_)),
        }) = m
        {
            break;
        }
        m.expect("tunnel");
    }
    t.elapsed()
}

async fn tunnel_download(c: &mut Client, from: SocketAddr, bytes: usize) -> Duration {
    let t = Instant::now();
    let (tx, mut out) = open_tunnel(c, from).await;
    let mut got = 0;
    while let Some(m) = out.next().await {
        match m.expect("tunnel").frame {
            Some(bp::tunnel_frame::Frame::Data(d)) => got += d.data.len(),
            Some(bp::tunnel_frame::Frame::Close(_)) => break,
            other => panic!("unexpected frame {other:?}"),
        }
    }
    drop(tx);
    assert_eq!(got, bytes);
    t.elapsed()
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let plan = if args.quick {
        Plan {
            keystrokes: 100,
            tunnel_bytes: 16 * MIB,
            rounds: 1,
        }
    } else {
        Plan {
            keystrokes: 1000,
            tunnel_bytes: 256 * MIB,
            rounds: 3,
        }
    };
    let server = Server::start(&args.server);
    let mut c = server.client().await;
    let mut table = String::from("| figure | bridge | baseline | ratio |\n|---|---|---|---|\n");

    let n = plan.keystrokes;
    let mut local = tokio::task::spawn_blocking(move || local_pty(n))
        .await
        .unwrap();
    let mut remote = bridge_pty(&mut c, n).await;
    local.sort();
    remote.sort();
    for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (r, l) = (percentile(&remote, p), percentile(&local, p));
        let _ = writeln!(
            table,
            "| PTY keystroke to echo, {name} ({n} keys) | {} | {} (local pty) | {:.1}x |",
            us(r),
            us(l),
            r.as_secs_f64() / l.as_secs_f64()
        );
    }

    let bytes = plan.tunnel_bytes;
    let (to, from) = (sink(), source(bytes));
    let (mut up_t, mut up_d, mut down_t, mut down_d) = (vec![], vec![], vec![], vec![]);
    for _ in 0..plan.rounds {
        up_d.push(mb_s(
            bytes,
            tokio::task::spawn_blocking(move || direct_upload(to, bytes))
                .await
                .unwrap(),
        ));
        up_t.push(mb_s(bytes, tunnel_upload(&mut c, to, bytes).await));
        down_d.push(mb_s(
            bytes,
            tokio::task::spawn_blocking(move || direct_download(from, bytes))
                .await
                .unwrap(),
        ));
        down_t.push(mb_s(bytes, tunnel_download(&mut c, from, bytes).await));
    }
    for (name, t, d) in [("upload", up_t, up_d), ("download", down_t, down_d)] {
        let (t, d) = (median(t), median(d));
        let _ = writeln!(
            table,
            "| Tunnel {name}, {} MiB, median of {} | {t:.0} MB/s | {d:.0} MB/s (direct TCP) | {:.2} |",
            bytes / MIB,
            plan.rounds,
            t / d
        );
    }
    println!("{table}");
    if let Some(out) = args.out {
        std::fs::write(&out, &table).expect("write --out");
    }
}
