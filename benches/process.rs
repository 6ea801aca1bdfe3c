//! Benchmark of the process service against a plain Exec of the same work, same run:
//!
//! 1. Attach-to-first-byte: `Start` of `printf x` then `Attach` from offset 0 until the first
//!    STDOUT byte (p50, p99 over N runs), vs one `mcpcontainer` Exec of the same command until
//!    its first STDOUT byte;
//! 2. Replay throughput: `Attach` from 0 (`no_follow`) of a finished process's 64 MiB of
//!    output (4 MiB in the ring, the rest from its spill file), vs an Exec of `cat` of a file
//!    holding the same bytes.
//!
//! The server runs as its own process (the release binary) on loopback TCP; the tonic client is
//! this process; both share the machine's cores.
//!
//! ```text
//! cargo build --release -p container-server
//! cargo bench --bench process [-- --quick] [--out FILE] [--server PATH]
//! ```

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use memoh_proto::pb::mcpcontainer as mp;
use memoh_proto::pb::process as pb;
use pb::attach_output::Kind;
use tonic::transport::Channel;

type Procs = pb::process_service_client::ProcessServiceClient<Channel>;
type Exec = mp::container_service_client::ContainerServiceClient<Channel>;

const MIB: usize = 1024 * 1024;

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    server: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench process -- [--quick] [--out FILE] [--server PATH]\n\
         \n  --quick        short smoke run (20 starts, 16 MiB)\
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
    data: PathBuf,
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
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["--listen", &addr, "--data-dir"])
            .arg(&data)
            .arg("--template-dir")
            .arg(dir.path().join("none"))
            .env("MEMOH_ACP_TOOLS_PROXY_ADDR", "127.0.0.1:0")
            .env("MEMOH_PROCESS_DIR", dir.path().join("processes"))
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
            data,
            _dir: dir,
        }
    }

    async fn clients(&self) -> (Procs, Exec) {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let ch = memoh_proto::client::tcp_channel(&self.addr).expect("address");
            let mut p = Procs::new(ch.clone()).max_decoding_message_size(16 * MIB);
            if p.list(pb::ListRequest::default()).await.is_ok() {
                return (p, Exec::new(ch).max_decoding_message_size(16 * MIB));
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

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mb_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn exec_input(command: &str) -> mp::ExecInput {
    mp::ExecInput {
        command: command.into(),
        ..Default::default()
    }
}

/// Start + Attach until the first STDOUT byte; then waits for the end and removes the
/// process (outside the timing).
async fn process_first_byte(c: &mut Procs, command: &str) -> Duration {
    let t = Instant::now();
    let id = c
        .start(pb::StartRequest {
            command: command.into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .id;
    let mut s = c
        .attach(pb::AttachRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("attach")
        .into_inner();
    let mut took = None;
    while let Some(m) = s.next().await {
        let m = m.expect("attach message");
        if m.kind == Kind::Stdout as i32 && !m.data.is_empty() && took.is_none() {
            took = Some(t.elapsed());
        }
    }
    let took = took.expect("a stdout byte");
    c.remove(pb::RemoveRequest { id }).await.expect("remove");
    took
}

/// One Exec until its first STDOUT byte (read to the end afterwards).
async fn exec_first_byte(c: &mut Exec, command: &str) -> Duration {
    let t = Instant::now();
    let mut s = c
        .exec(tokio_stream::iter(vec![exec_input(command)]))
        .await
        .expect("exec")
        .into_inner();
    let mut took = None;
    while let Some(m) = s.next().await {
        let m = m.expect("exec message");
        if m.stream == mp::exec_output::Stream::Stdout as i32
            && !m.data.is_empty()
            && took.is_none()
        {
            took = Some(t.elapsed());
        }
    }
    took.expect("a stdout byte")
}

/// Attach from 0 without following until EXIT; returns the time and checks the byte count.
async fn replay(c: &mut Procs, id: &str, want: usize) -> Duration {
    let t = Instant::now();
    let mut s = c
        .attach(pb::AttachRequest {
            id: id.into(),
            no_follow: true,
            ..Default::default()
        })
        .await
        .expect("attach")
        .into_inner();
    let mut got = 0usize;
    let mut exit = false;
    while let Some(m) = s.next().await {
        let m = m.expect("attach message");
        match Kind::try_from(m.kind) {
            Ok(Kind::Stdout) => got += m.data.len(),
            Ok(Kind::Exit) => exit = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(exit, "replay ended with EXIT");
    assert_eq!(got, want, "replayed bytes");
    t.elapsed()
}

/// An Exec of `cat FILE`, reading every byte.
async fn exec_cat(c: &mut Exec, file: &str, want: usize) -> Duration {
    let t = Instant::now();
    let mut s = c
        .exec(tokio_stream::iter(vec![exec_input(&format!("cat {file}"))]))
        .await
        .expect("exec")
        .into_inner();
    let mut got = 0usize;
    while let Some(m) = s.next().await {
        let m = m.expect("exec message");
        if m.stream == mp::exec_output::Stream::Stdout as i32 {
            got += m.data.len();
        }
    }
    assert_eq!(got, want, "cat bytes");
    t.elapsed()
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let (starts, bytes, rounds) = if args.quick {
        (20, 16 * MIB, 1)
    } else {
        (300, 64 * MIB, 3)
    };
    let server = Server::start(&args.server);
    let (mut procs, mut exec) = server.clients().await;
    let mut table =
        String::from("| figure | process service | Exec (same run) | ratio |\n|---|---|---|---|\n");

    let cmd = "printf x";
    // Warm both paths once.
    process_first_byte(&mut procs, cmd).await;
    exec_first_byte(&mut exec, cmd).await;
    let (mut p, mut e) = (Vec::new(), Vec::new());
    for _ in 0..starts {
        p.push(process_first_byte(&mut procs, cmd).await);
        e.push(exec_first_byte(&mut exec, cmd).await);
    }
    p.sort();
    e.sort();
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (a, b) = (percentile(&p, q), percentile(&e, q));
        let _ = writeln!(
            table,
            "| first byte of `{cmd}`, {name} ({starts} runs) | {} (Start + Attach) | {} | {:.2}x |",
            ms(a),
            ms(b),
            a.as_secs_f64() / b.as_secs_f64()
        );
    }

    // The same bytes in a file for `cat`, and as a finished process's output.
    let data: Vec<u8> = (0..bytes)
        .map(|i| (i as u64).wrapping_mul(2654435761).to_le_bytes()[2])
        .collect();
    std::fs::write(server.data.join("replay.bin"), &data).expect("write data");
    drop(data);
    let id = procs
        .start(pb::StartRequest {
            command: "cat replay.bin".into(),
            ..Default::default()
        })
        .await
        .expect("start cat")
        .into_inner()
        .id;
    let w = procs
        .wait(pb::WaitRequest {
            id: id.clone(),
            timeout_ms: 0,
        })
        .await
        .expect("wait")
        .into_inner();
    assert_eq!(w.info.expect("info").stdout_bytes, bytes as u64);
    let (mut r, mut c) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        r.push(mb_s(bytes, replay(&mut procs, &id, bytes).await));
        c.push(mb_s(bytes, exec_cat(&mut exec, "replay.bin", bytes).await));
    }
    let (r, c) = (median(r), median(c));
    let _ = writeln!(
        table,
        "| replay of {} MiB finished output, median of {rounds} | {r:.0} MB/s (Attach from 0) | {c:.0} MB/s (`cat` of the same bytes) | {:.2} |",
        bytes / MIB,
        r / c
    );
    println!("{table}");
    if let Some(out) = args.out {
        std::fs::write(&out, &table).expect("write --out");
    }
}
