//! Benchmark of `container-server`, each figure against a baseline taken in the same run.
//!
//! The server runs as its own process (the release binary, as in production) on loopback TCP;
//! the client is [`memoh_proto::ContainerClient`] in this process. Figures:
//!
//! 1. exec round trip of `echo hi` (p50, p99) vs spawning `/bin/sh -c 'echo hi'` locally;
//! 2. ReadRaw / WriteRaw MB/s of a 1 GiB file vs a local copy of the same file;
//! 3. ReadFile calls per second with 64 concurrent clients vs local reads + formatting;
//! 4. the server's idle RSS and the release binary's size.
//!
//! Physical baselines, measured in the same run as the figure each one bounds (issue 19):
//! a unary gRPC no-op round trip (health `Check`) on the same transport; `sh -c 'echo hi'`
//! spawned locally by a pool of 64 threads of the bench's own (the bound of exec at 64
//! concurrent calls); a plain TCP loopback stream of the same bytes in the same 64 KiB
//! chunks from a child process (the bench binary re-executed with a hidden flag, no gRPC, no
//! files on either side) into this one; and a local file write and read of the same size.
//! Each target is printed as "figure / bound = ratio, met/missed".
//!
//! ```text
//! cargo build --release -p container-server
//! cargo bench --bench server [-- --quick] [--out FILE] [--server PATH] [--dir DIR]
//! ```
//!
//! `--quick` is a CI smoke run (small file, few calls, short load); its numbers are not results.
//! The bench prints a markdown table and, with `--out`, writes it to FILE as well.
//!
//! The server runs with its production defaults (log filter `info`, unless `--log` says
//! otherwise); the client uses the production endpoint settings unless `--max-frame` asks for
//! larger HTTP/2 frames. Client and server share the machine's cores, so CPU-bound figures carry
//! the client's cost too; the notes under the table give each side's CPU time. Page caches
//! are not dropped (the machine is shared), so every transfer, local or remote, runs from and
//! into the page cache after a warm-up: the figures compare CPU paths, not the disk.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use memoh_proto::client::tcp_channel;
use memoh_proto::ContainerClient;

const MIB: u64 = 1024 * 1024;
/// Concurrent ReadFile clients.
const CLIENTS: usize = 64;
/// Buffer of the local read+write copy loop and of the WriteRaw source buffers.
const COPY_BUF: usize = 1024 * 1024;
/// The size of a raw transfer's messages, and of the TCP baseline's writes and reads.
const CHUNK: usize = 64 * 1024;
/// Hidden flag: this process is the sending side of the TCP loopback baseline.
const TCP_SOURCE_FLAG: &str = "--tcp-source";

/// Sizes of one run: the full run or the `--quick` smoke run.
struct Plan {
    exec_warmup: usize,
    exec_calls: usize,
    file_bytes: u64,
    transfer_rounds: usize,
    load_time: Duration,
}

impl Plan {
    fn full() -> Self {
        Self {
            exec_warmup: 200,
            exec_calls: 2000,
            file_bytes: 1024 * MIB,
            transfer_rounds: 3,
            load_time: Duration::from_secs(5),
        }
    }

    fn quick() -> Self {
        Self {
            exec_warmup: 20,
            exec_calls: 200,
            file_bytes: 64 * MIB,
            transfer_rounds: 1,
            load_time: Duration::from_secs(1),
        }
    }
}

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    server: PathBuf,
    dir: PathBuf,
    max_frame: Option<u32>,
    log: Option<String>,
    only: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench server -- [--quick] [--out FILE] [--server PATH] [--dir DIR]\n\
         \n  --quick        short smoke run (64 MiB file, 200 execs, 1 s load)\
         \n  --out FILE     also write the results table to FILE\
         \n  --server PATH  container-server binary (default: target/release/container-server)\
         \n  --dir DIR      where the temporary data directory goes (default: $TMPDIR or /tmp)\
         \n  --log FILTER   MCP_LOG for the server (default: unset, the production default `info`)\
         \n  --max-frame N  client tuning: the HTTP/2 frame size the client accepts (default 16384)\
         \n  --only PHASE   run one phase (idle, exec, exec64, readfile, raw), e.g. under a profiler"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut args = Args {
        quick: false,
        out: None,
        server: target.join("release/container-server"),
        dir: std::env::temp_dir(),
        max_frame: None,
        log: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = Some(it.next().unwrap_or_else(|| usage()).into()),
            "--server" => args.server = it.next().unwrap_or_else(|| usage()).into(),
            "--dir" => args.dir = it.next().unwrap_or_else(|| usage()).into(),
            "--log" => args.log = Some(it.next().unwrap_or_else(|| usage())),
            "--only" => args.only = Some(it.next().unwrap_or_else(|| usage())),
            "--max-frame" => {
                let v = it.next().unwrap_or_else(|| usage());
                args.max_frame = Some(v.parse().unwrap_or_else(|_| usage()));
            }
            // cargo bench passes --bench to every bench target.
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

/// The server process; killed (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Child,
    addr: String,
    max_frame: Option<u32>,
    log_file: PathBuf,
}

impl Server {
    /// Starts `bin` on a free loopback port; its log goes to `log_file`.
    fn start(bin: &Path, data_dir: &Path, log_file: &Path, args: &Args, tuned: bool) -> Self {
        // Pick a free port; the tiny race with other processes is acceptable for a bench.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", &addr, "--data-dir"])
            .arg(data_dir)
            .arg("--template-dir")
            .arg(data_dir.join(".no-template"))
            .env_remove("MCP_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log_file).expect("server log file"));
        if let Some(filter) = &args.log {
            cmd.env("MCP_LOG", filter);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; build it first: cargo build --release -p container-server",
                bin.display()
            )
        });
        Self {
            child,
            addr,
            max_frame: if tuned { args.max_frame } else { None },
            log_file: log_file.to_path_buf(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client on a channel (one connection) of its own, with the production settings
    /// unless `--max-frame` asks otherwise.
    fn client(&self) -> ContainerClient {
        let channel = match self.max_frame {
            None => tcp_channel(&self.addr).expect("valid address"),
            Some(n) => memoh_proto::client::endpoint(
                format!("http://{}", self.addr).parse().expect("valid uri"),
            )
            .max_frame_size(n)
            .connect_lazy(),
        };
        ContainerClient::new(channel)
    }

    async fn wait_ready(&self) -> ContainerClient {
        let c = self.client();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match c.ping().await {
                Ok(()) => return c,
                Err(e) if Instant::now() > until => panic!(
                    "server not ready after 10 s: {e}; its log:\n{}",
                    std::fs::read_to_string(&self.log_file).unwrap_or_default()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// `VmRSS` and `VmHWM` of the server, in bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        (kib_field(&status, "VmRSS:"), kib_field(&status, "VmHWM:"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kib_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// User + system CPU time of a process so far (`/proc/PID/stat`, in USER_HZ = 100 ticks/s).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// [`cpu_time`] with that of the process's reaped children added (`cutime`, `cstime`: fields
/// 16 and 17), for the CPU cost of spawning, the children's own run included.
fn cpu_time_with_children(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// CPU used by the server and by this (client) process between `start` and `stop`.
struct CpuMeter {
    server: String,
    at: (Duration, Duration),
}

impl CpuMeter {
    fn start(server: &Server) -> Self {
        let server = server.pid().to_string();
        let at = (cpu_time(&server), cpu_time("self"));
        Self { server, at }
    }

    fn stop(&self) -> (Duration, Duration) {
        (
            cpu_time(&self.server).saturating_sub(self.at.0),
            cpu_time("self").saturating_sub(self.at.1),
        )
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// The results table plus notes printed under it.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
    targets: Vec<String>,
}

impl Report {
    /// Records a target as "figure / bound = ratio, met/missed". `at_most`: the figure must
    /// not exceed the bound (a latency); otherwise it must reach it (a rate).
    fn target(&mut self, name: &str, figure: String, bound: String, ratio: f64, at_most: bool) {
        let met = if at_most { ratio <= 1.0 } else { ratio >= 1.0 };
        self.targets.push(format!(
            "{name}: {figure} / {bound} = {ratio:.2}, {}",
            if met { "met" } else { "**missed**" }
        ));
    }
}

/// One row of the results table.
struct Row {
    figure: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

impl Row {
    fn new(figure: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            figure: figure.into(),
            value: value.into(),
            baseline: "–".into(),
            ratio: "–".into(),
            target: "–".into(),
            met: None,
        }
    }

    fn baseline(mut self, baseline: impl Into<String>, ratio: impl Into<String>) -> Self {
        self.baseline = baseline.into();
        self.ratio = ratio.into();
        self
    }

    fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

// ---- 1. exec round trip -------------------------------------------------------------------

fn local_spawn(n: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = Command::new("/bin/sh")
            .args(["-c", "echo hi"])
            .output()
            .expect("spawn /bin/sh");
        v.push(t.elapsed());
        assert_eq!(out.stdout, b"hi\n");
    }
    v.sort();
    v
}

async fn exec_round_trips(c: &ContainerClient, n: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = c.exec_collect("echo hi", "", 10).await.expect("exec");
        v.push(t.elapsed());
        assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"hi\n"[..], 0));
    }
    v.sort();
    v
}

async fn stat_round_trips(c: &ContainerClient, n: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.stat(".").await.expect("stat");
        v.push(t.elapsed());
    }
    v.sort();
    v
}

/// Sequential health `Check` round trips on a connection of their own to the same listener:
/// the floor of a unary gRPC call on this transport (no file system, no process).
async fn health_round_trips(server: &Server, n: usize) -> Vec<Duration> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tcp_channel(&server.addr).expect("valid address");
    let mut h = HealthClient::new(channel);
    let check = HealthCheckRequest {
        service: String::new(),
    };
    for _ in 0..n.min(100) {
        h.check(check.clone()).await.expect("health check");
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        h.check(check.clone()).await.expect("health check");
        v.push(t.elapsed());
    }
    v.sort();
    v
}

/// `sh -c 'echo hi'` spawned by `CLIENTS` threads of this process for `time`: the machine's
/// own parallel spawn rate. Returns (spawns/s, sorted latencies).
fn local_parallel_spawn(time: Duration) -> (f64, Vec<Duration>) {
    let start = Instant::now();
    let until = start + time;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let out = Command::new("/bin/sh")
                        .args(["-c", "echo hi"])
                        .output()
                        .expect("spawn /bin/sh");
                    v.push(t.elapsed());
                    assert_eq!(out.stdout, b"hi\n");
                }
                v
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().expect("spawn thread"));
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    (rate, all)
}

/// `CLIENTS` tasks sharing one connection (as the agent's pool calls a bot) running
/// `echo hi` for `time`. Returns (execs/s, sorted latencies).
async fn remote_parallel_exec(c: &ContainerClient, time: Duration) -> (f64, Vec<Duration>) {
    let start = Instant::now();
    let until = start + time;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut v = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let r = c.exec_collect("echo hi", "", 10).await.expect("exec");
                    v.push(t.elapsed());
                    assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"hi\n"[..], 0));
                }
                v
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("exec task"));
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    (rate, all)
}

async fn bench_exec_parallel(server: &Server, c: &ContainerClient, plan: &Plan, rep: &mut Report) {
    let secs = plan.load_time.as_secs_f64();
    eprintln!("exec: {CLIENTS} concurrent, local then remote, {secs:.0} s each");
    let local_all = cpu_time_with_children("self");
    let local_start = Instant::now();
    let (local, local_lat) = local_parallel_spawn(plan.load_time);
    let local_n = local * local_start.elapsed().as_secs_f64();
    let local_all = cpu_time_with_children("self").saturating_sub(local_all);
    let spid = server.pid().to_string();
    let remote_all = (
        cpu_time_with_children(&spid),
        cpu_time_with_children("self"),
    );
    let remote_start = Instant::now();
    let cpu = CpuMeter::start(server);
    let (remote, lat) = remote_parallel_exec(c, plan.load_time).await;
    let (server_cpu, client_cpu) = cpu.stop();
    let remote_n = remote * remote_start.elapsed().as_secs_f64();
    let remote_all = cpu_time_with_children(&spid).saturating_sub(remote_all.0)
        + cpu_time_with_children("self").saturating_sub(remote_all.1);
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    let (l50, l99) = (percentile(&local_lat, 50.0), percentile(&local_lat, 99.0));
    rep.rows.push(
        Row::new(
            format!("Exec `echo hi`, {CLIENTS} concurrent on one connection"),
            format!("{remote:.0}/s (p50 {}, p99 {})", ms(p50), ms(p99)),
        )
        .baseline(
            format!(
                "{local:.0}/s (p50 {}, p99 {}; local `sh -c`, {CLIENTS} threads)",
                ms(l50),
                ms(l99)
            ),
            format!("{:.2}×", remote / local),
        ),
    );
    rep.notes.push(format!(
        "Exec at {CLIENTS} concurrent, CPU over {secs:.0} s: server {:.2} s, client {:.2} s \
         (children not counted).",
        server_cpu.as_secs_f64(),
        client_cpu.as_secs_f64()
    ));
    // On a machine whose cores are the limit, the rate ratio cannot exceed the ratio of the
    // CPU each side spends per command, children included.
    let per = |cpu: Duration, n: f64| cpu.as_secs_f64() * 1000.0 / n.max(1.0);
    let (local_per, remote_per) = (per(local_all, local_n), per(remote_all, remote_n));
    rep.notes.push(format!(
        "All CPU per command at {CLIENTS} concurrent: local spawn {local_per:.2} ms (threads and \
         children), exec {remote_per:.2} ms (server, its children and client); the rate ratio \
         this allows where the cores are the limit: {:.2}×.",
        local_per / remote_per
    ));
    rep.target(
        "Exec/s at c=64 ≥ 0.8× local parallel spawn",
        format!("{remote:.0}/s"),
        format!("{:.0}/s (0.8 × {local:.0})", 0.8 * local),
        remote / (0.8 * local),
        false,
    );
    rep.target(
        "Exec p99 at c=64 ≤ 2× its p50",
        ms(p99),
        format!("{} (2 × {})", ms(2 * p50), ms(p50)),
        p99.as_secs_f64() / (2.0 * p50.as_secs_f64()),
        true,
    );
    // The same tail measure of the local spawns: how much of the tail the machine's own
    // scheduling makes at this concurrency, whatever the server does.
    rep.notes.push(format!(
        "Tail of the local parallel spawn in the same run: p99 / (2 × p50) = {:.2}.",
        l99.as_secs_f64() / (2.0 * l50.as_secs_f64())
    ));
}

async fn bench_exec(server: &Server, c: &ContainerClient, plan: &Plan, rep: &mut Report) {
    eprintln!(
        "exec: warm-up {} + {} calls each",
        plan.exec_warmup, plan.exec_calls
    );
    let _ = local_spawn(plan.exec_warmup);
    let _ = exec_round_trips(c, plan.exec_warmup).await;
    // Interleave halves so that drift on the shared machine hits both sides alike.
    let half = plan.exec_calls / 2;
    let mut local = local_spawn(half);
    let cpu = CpuMeter::start(server);
    let mut remote = exec_round_trips(c, half).await;
    let (server_cpu, client_cpu) = cpu.stop();
    local.extend(local_spawn(plan.exec_calls - half));
    remote.extend(exec_round_trips(c, plan.exec_calls - half).await);
    let stat = stat_round_trips(c, plan.exec_calls).await;
    let health = health_round_trips(server, plan.exec_calls).await;
    local.sort();
    remote.sort();
    let (l50, l99) = (percentile(&local, 50.0), percentile(&local, 99.0));
    let (r50, r99) = (percentile(&remote, 50.0), percentile(&remote, 99.0));
    let ratio50 = r50.as_secs_f64() / l50.as_secs_f64();
    let ratio99 = r99.as_secs_f64() / l99.as_secs_f64();
    rep.rows.push(
        Row::new(
            format!("Exec `echo hi` round trip p50 ({} calls)", plan.exec_calls),
            ms(r50),
        )
        .baseline(
            format!("{} (local `sh -c` spawn)", ms(l50)),
            format!("{ratio50:.2}×"),
        )
        .target(
            "≤ 1 ms and ≤ 3× local",
            r50 <= Duration::from_millis(1) && ratio50 <= 3.0,
        ),
    );
    rep.rows.push(
        Row::new("Exec `echo hi` round trip p99", ms(r99))
            .baseline(format!("{} (local)", ms(l99)), format!("{ratio99:.2}×")),
    );
    rep.rows.push(Row::new(
        "Stat round trip p50 / p99, sequential (gRPC floor of a call)",
        format!(
            "{} / {}",
            ms(percentile(&stat, 50.0)),
            ms(percentile(&stat, 99.0))
        ),
    ));
    let h50 = percentile(&health, 50.0);
    rep.rows.push(Row::new(
        "Health `Check` round trip p50 / p99, sequential (unary no-op, same transport)",
        format!("{} / {}", ms(h50), ms(percentile(&health, 99.0))),
    ));
    let bound = h50 + l50.mul_f64(1.1);
    rep.target(
        "Exec p50 ≤ health-check RTT + 1.1× local spawn",
        ms(r50),
        format!("{} ({} + 1.1 × {})", ms(bound), ms(h50), ms(l50)),
        r50.as_secs_f64() / bound.as_secs_f64(),
        true,
    );
    let per = |d: Duration| ms(d / half.max(1) as u32);
    rep.notes.push(format!(
        "Exec CPU per call: server {}, client {} (the child `sh` is not counted).",
        per(server_cpu),
        per(client_cpu)
    ));
}

// ---- 2. raw transfer ----------------------------------------------------------------------

/// Writes `bytes` of non-repeating-looking data (a cheap xorshift stream) to `path`.
fn make_file(path: &Path, bytes: u64) {
    let mut f = std::io::BufWriter::with_capacity(COPY_BUF, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; COPY_BUF];
    let mut left = bytes;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(COPY_BUF as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

/// `std::fs::copy` (copy_file_range on Linux: in-kernel, no user-space buffer).
fn local_fs_copy(src: &Path, dst: &Path) -> Duration {
    let _ = std::fs::remove_file(dst);
    let t = Instant::now();
    std::fs::copy(src, dst).unwrap();
    t.elapsed()
}

/// read() + write() through a 1 MiB buffer, the same system calls the server makes.
fn local_rw_copy(src: &Path, dst: &Path) -> Duration {
    let _ = std::fs::remove_file(dst);
    let t = Instant::now();
    let mut r = std::fs::File::open(src).unwrap();
    let mut w = std::fs::File::create(dst).unwrap();
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).unwrap();
    }
    drop(w);
    t.elapsed()
}

/// Writes the buffers of `src` into a new file `dst` (into the page cache).
fn local_write(src: &[Bytes], dst: &Path) -> Duration {
    let _ = std::fs::remove_file(dst);
    let t = Instant::now();
    let mut w = std::fs::File::create(dst).unwrap();
    for b in src {
        w.write_all(b).unwrap();
    }
    drop(w);
    t.elapsed()
}

/// Reads `src` through a 1 MiB buffer and drops the bytes.
fn local_read(src: &Path) -> Duration {
    let t = Instant::now();
    let mut r = std::fs::File::open(src).unwrap();
    let mut buf = vec![0u8; COPY_BUF];
    while r.read(&mut buf).unwrap() > 0 {}
    t.elapsed()
}

/// The sending side of the TCP baseline, run in a child process: loads `path` into memory,
/// then connects to `addr` and writes the bytes in 64 KiB writes.
fn tcp_source_main(path: &str, addr: &str) -> ! {
    let data = std::fs::read(path).expect("read the TCP source file");
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the TCP sink");
    s.set_nodelay(true).expect("TCP_NODELAY");
    for c in data.chunks(CHUNK) {
        s.write_all(c).expect("TCP write");
    }
    drop(s);
    std::process::exit(0)
}

/// A plain TCP loopback stream of the `bytes` of `src` from a child process (the bench binary
/// re-executed) into this one, 64 KiB writes and 64 KiB reads: no gRPC, no files. Timed
/// from the connection to the end of the stream.
fn tcp_stream(src: &Path, bytes: u64) -> Duration {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("local addr").to_string();
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .arg(TCP_SOURCE_FLAG)
        .arg(src)
        .arg(&addr)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the TCP source");
    let (mut s, _) = l.accept().expect("accept the TCP source");
    let t = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).expect("TCP read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let d = t.elapsed();
    assert!(
        child.wait().expect("TCP source").success(),
        "TCP source failed"
    );
    assert_eq!(got, bytes, "TCP stream length");
    d
}

async fn read_raw(c: &ContainerClient, path: &str, want: u64) -> Duration {
    let t = Instant::now();
    let mut s = c.read_raw(path).await.expect("read_raw");
    let mut got = 0u64;
    while let Some(chunk) = s.message().await.expect("read_raw chunk") {
        got += chunk.data.len() as u64;
    }
    let d = t.elapsed();
    assert_eq!(got, want, "ReadRaw length");
    d
}

/// Uploads `src` (already in memory, so the client side does no disk I/O) to `path`.
async fn write_raw(c: &ContainerClient, dst: &Path, path: &str, src: &[Bytes]) -> Duration {
    let _ = std::fs::remove_file(dst);
    let want: u64 = src.iter().map(|b| b.len() as u64).sum();
    let data = futures::stream::iter(src.to_vec());
    let t = Instant::now();
    let n = c.write_raw(path, data).await.expect("write_raw");
    let d = t.elapsed();
    assert_eq!(n as u64, want, "WriteRaw bytes_written");
    d
}

async fn bench_raw(
    server: &Server,
    c: &ContainerClient,
    data_dir: &Path,
    plan: &Plan,
    rep: &mut Report,
) {
    let bytes = plan.file_bytes;
    let src = data_dir.join("big.bin");
    let dst = data_dir.join("big.copy");
    eprintln!("raw: writing a {} MiB file", bytes / MIB);
    make_file(&src, bytes);
    // The upload's source, held in memory: 1 MiB buffers of the same file.
    let mut mem = Vec::new();
    let mut f = std::fs::File::open(&src).unwrap();
    loop {
        let mut b = vec![0u8; COPY_BUF];
        let n = f.read(&mut b).unwrap();
        if n == 0 {
            break;
        }
        b.truncate(n);
        mem.push(Bytes::from(b));
    }
    // Warm the page cache and both paths once; nothing is measured yet.
    let _ = read_raw(c, "big.bin", bytes).await;
    let _ = local_rw_copy(&src, &dst);

    let (mut fs_copy, mut rw_copy, mut rr, mut wr) = (vec![], vec![], vec![], vec![]);
    let (mut tcp, mut lw, mut lr) = (vec![], vec![], vec![]);
    let _ = tcp_stream(&src, bytes);
    // The peak RSS from here on is the one under the raw transfers (the kernel resets VmHWM
    // on "5" written to clear_refs).
    let _ = std::fs::write(format!("/proc/{}/clear_refs", server.pid()), "5");
    let (mut rr_cpu, mut wr_cpu) = (vec![], vec![]);
    for round in 0..plan.transfer_rounds {
        eprintln!("raw: round {}/{}", round + 1, plan.transfer_rounds);
        fs_copy.push(mb_per_s(bytes, local_fs_copy(&src, &dst)));
        rw_copy.push(mb_per_s(bytes, local_rw_copy(&src, &dst)));
        tcp.push(mb_per_s(bytes, tcp_stream(&src, bytes)));
        lw.push(mb_per_s(bytes, local_write(&mem, &dst)));
        lr.push(mb_per_s(bytes, local_read(&src)));
        let cpu = CpuMeter::start(server);
        let d = read_raw(c, "big.bin", bytes).await;
        rr.push(mb_per_s(bytes, d));
        rr_cpu.push((cpu.stop(), d));
        let cpu = CpuMeter::start(server);
        let d = write_raw(c, &dst, "big.copy", &mem).await;
        wr.push(mb_per_s(bytes, d));
        wr_cpu.push((cpu.stop(), d));
    }
    for (name, cpu) in [("ReadRaw", &rr_cpu), ("WriteRaw", &wr_cpu)] {
        let ((server_cpu, client_cpu), wall) = cpu[cpu.len() / 2];
        rep.notes.push(format!(
            "{name} CPU in one round of {:.2} s wall: server {:.2} s, client {:.2} s \
             (2 cores = {:.2} CPU-s available).",
            wall.as_secs_f64(),
            server_cpu.as_secs_f64(),
            client_cpu.as_secs_f64(),
            2.0 * wall.as_secs_f64()
        ));
    }
    let (_, peak) = server.memory();
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(&src);
    let (fs_copy, rw_copy, rr, wr) = (median(fs_copy), median(rw_copy), median(rr), median(wr));
    let (tcp, lw, lr) = (median(tcp), median(lw), median(lr));
    let mib = |b: u64| b as f64 / MIB as f64;
    rep.target(
        "Server peak RSS under the raw transfers ≤ 24 MiB",
        format!("{:.1} MiB", mib(peak)),
        "24 MiB".into(),
        peak as f64 / (24 * MIB) as f64,
        true,
    );
    // Baseline: `std::fs::copy` (what `cp` does); the read+write loop is shown for reference.
    let size = format!("{} MiB", bytes / MIB);
    for (name, v) in [("ReadRaw", rr), ("WriteRaw", wr)] {
        rep.rows.push(
            Row::new(format!("{name} {size}"), format!("{v:.0} MB/s"))
                .baseline(
                    format!("{fs_copy:.0} MB/s (local std::fs::copy)"),
                    format!("{:.0} %", v / fs_copy * 100.0),
                )
                .target("≥ 1000 MB/s and ≥ 40 %", v >= 1000.0 && v / fs_copy >= 0.4),
        );
    }
    for (name, v) in [("ReadRaw", rr), ("WriteRaw", wr)] {
        rep.target(
            &format!("{name} ≥ 0.6× a plain TCP loopback stream"),
            format!("{v:.0} MB/s"),
            format!("{:.0} MB/s (0.6 × {tcp:.0})", 0.6 * tcp),
            v / (0.6 * tcp),
            false,
        );
    }
    rep.rows.push(
        Row::new(
            format!("TCP loopback stream {size}, 64 KiB chunks, process to process"),
            format!("{tcp:.0} MB/s"),
        )
        .baseline(
            "–",
            format!("ReadRaw {:.2}×, WriteRaw {:.2}×", rr / tcp, wr / tcp),
        ),
    );
    rep.rows.push(
        Row::new(
            format!("Local file write {size} from memory / read {size} (1 MiB buffer)"),
            format!("{lw:.0} MB/s / {lr:.0} MB/s"),
        )
        .baseline(
            "–",
            format!(
                "WriteRaw {:.2}× write, ReadRaw {:.2}× read",
                wr / lw,
                rr / lr
            ),
        ),
    );
    rep.rows.push(
        Row::new(
            format!("Local read+write loop {size} (1 MiB buffer)"),
            format!("{rw_copy:.0} MB/s"),
        )
        .baseline(
            format!("{fs_copy:.0} MB/s (std::fs::copy)"),
            format!("{:.0} %", rw_copy / fs_copy * 100.0),
        ),
    );
}

// ---- 3. ReadFile under load ---------------------------------------------------------------

const SMALL_FILE: &str = "small.txt";

fn make_small_file(data_dir: &Path) -> String {
    let mut s = String::new();
    for i in 0..100 {
        let _ = writeln!(s, "line {i}: the quick brown fox jumps over the lazy dog");
    }
    std::fs::write(data_dir.join(SMALL_FILE), &s).unwrap();
    s
}

/// What ReadFile does, locally: read the file and number up to 200 lines as `%6d\t%s\n`.
fn local_reads(path: &Path, time: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    let mut sink = 0usize;
    while start.elapsed() < time {
        let text = std::fs::read_to_string(path).unwrap();
        let mut out = String::with_capacity(text.len() + 800);
        for (i, line) in text.lines().take(200).enumerate() {
            let _ = writeln!(out, "{:6}\t{}", i + 1, line);
        }
        sink += out.len();
        n += 1;
    }
    assert!(sink > 0);
    n as f64 / start.elapsed().as_secs_f64()
}

#[derive(Clone, Copy)]
enum Call {
    ReadFile,
    Stat,
}

/// Runs `CLIENTS` tasks calling in a loop for `time`; returns (calls/s, errors, sorted
/// latencies of the successful calls).
async fn load(
    clients: Vec<ContainerClient>,
    call: Call,
    time: Duration,
) -> (f64, u64, Vec<Duration>) {
    let ok = Arc::new(AtomicU64::new(0));
    let err = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + time;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let (ok, err) = (ok.clone(), err.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let r = match call {
                        Call::ReadFile => c.read_file(SMALL_FILE, 1, 0).await.map(|_| ()),
                        Call::Stat => c.stat(SMALL_FILE).await.map(|_| ()),
                    };
                    match r {
                        Ok(()) => {
                            lat.push(t.elapsed());
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => err.fetch_add(1, Ordering::Relaxed),
                    };
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("load task"));
    }
    lat.sort();
    let secs = start.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / secs,
        err.load(Ordering::Relaxed),
        lat,
    )
}

async fn bench_read_file(server: &Server, data_dir: &Path, plan: &Plan, rep: &mut Report) {
    let text = make_small_file(data_dir);
    let local = local_reads(&data_dir.join(SMALL_FILE), Duration::from_secs(1));
    let own: Vec<_> = (0..CLIENTS).map(|_| server.client()).collect();
    let shared_one = server.client();
    let shared: Vec<_> = (0..CLIENTS).map(|_| shared_one.clone()).collect();
    // Connect every channel before the clock starts.
    for c in own.iter().chain([&shared_one]) {
        let r = c.read_file(SMALL_FILE, 1, 0).await.expect("read_file");
        assert_eq!(r.total_lines, 100);
    }
    let secs = plan.load_time.as_secs_f64();
    let file = format!("{} B, 100 lines", text.len());
    for (name, clients) in [
        ("64 clients, one connection each", own.clone()),
        ("64 clients sharing one connection", shared),
    ] {
        eprintln!("read_file: {name}, {secs:.0} s");
        let cpu = CpuMeter::start(server);
        let (rate, errors, lat) = load(clients, Call::ReadFile, plan.load_time).await;
        let (server_cpu, client_cpu) = cpu.stop();
        assert_eq!(errors, 0, "ReadFile errors under load");
        let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
        rep.target(
            &format!("ReadFile p99 ≤ 3× p50, {name}"),
            ms(p99),
            format!("{} (3 × {})", ms(3 * p50), ms(p50)),
            p99.as_secs_f64() / (3.0 * p50.as_secs_f64()),
            true,
        );
        rep.notes.push(format!(
            "ReadFile, {name}: CPU over {secs:.0} s: server {:.2} s, client {:.2} s.",
            server_cpu.as_secs_f64(),
            client_cpu.as_secs_f64()
        ));
        rep.rows.push(
            Row::new(
                format!("ReadFile calls/s, {name} ({file})"),
                format!("{rate:.0}/s"),
            )
            .baseline(
                format!("{local:.0}/s (local read + format, 1 thread)"),
                format!("{:.0} %", rate / local * 100.0),
            )
            .target("≥ 10 000/s", rate >= 10_000.0),
        );
    }
    eprintln!("stat: 64 clients, one connection each, {secs:.0} s");
    let (rate, errors, _) = load(own, Call::Stat, plan.load_time).await;
    assert_eq!(errors, 0, "Stat errors under load");
    rep.rows.push(Row::new(
        "Stat calls/s, 64 clients, one connection each (gRPC floor of a unary call)",
        format!("{rate:.0}/s"),
    ));
}

// ---- 4. memory and size -------------------------------------------------------------------

/// RSS of a trivial process (`sleep`), the floor of any process on this kernel and libc.
fn sleep_rss() -> u64 {
    let mut child = Command::new("sleep").arg("5").spawn().expect("spawn sleep");
    std::thread::sleep(Duration::from_millis(200));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    kib_field(&status, "VmRSS:")
}

async fn bench_idle(args: &Args, data_dir: &Path, rep: &mut Report) {
    let bin = &args.server;
    let dir = data_dir.join("idle");
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::start(bin, &dir, &data_dir.join("idle.log"), args, false);
    let c = server.wait_ready().await;
    // A few calls of every kind, then let it settle.
    c.write_file("a.txt", Bytes::from_static(b"one\ntwo\n"))
        .await
        .unwrap();
    c.read_file("a.txt", 1, 0).await.unwrap();
    c.list_dir(".", true).await.unwrap();
    c.stat("a.txt").await.unwrap();
    c.exec_collect("echo hi", "", 10).await.unwrap();
    let mut s = c.read_raw("a.txt").await.unwrap();
    while s.message().await.unwrap().is_some() {}
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, _) = server.memory();
    drop(server);
    let floor = sleep_rss();
    let mib = |b: u64| b as f64 / MIB as f64;
    rep.rows.push(
        Row::new(
            "Idle RSS after start + a few calls",
            format!("{:.1} MiB", mib(rss)),
        )
        .baseline(
            format!("{:.1} MiB (`sleep`)", mib(floor)),
            format!("{:.1}×", rss as f64 / floor as f64),
        )
        .target("≤ 8 MiB", rss <= 8 * MIB),
    );
    rep.target(
        "Server idle RSS ≤ 8 MiB",
        format!("{:.1} MiB", mib(rss)),
        "8 MiB".into(),
        rss as f64 / (8 * MIB) as f64,
        true,
    );
    let size = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0);
    rep.rows.push(Row::new(
        "Release binary size (debuginfo stripped)",
        format!("{:.1} MiB", mib(size)),
    ));
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

// ---- report -------------------------------------------------------------------------------

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| Figure | Value | Baseline (same run) | Ratio | Target | Met? |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.figure, r.value, r.baseline, r.ratio, r.target, met
        );
    }
    s
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(TCP_SOURCE_FLAG) && argv.len() == 4 {
        tcp_source_main(&argv[2], &argv[3]);
    }
    let args = parse_args();
    let plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let tmp = tempfile::Builder::new()
        .prefix("container-server-bench.")
        .tempdir_in(&args.dir)
        .expect("temporary directory");
    let data_dir = tmp.path().to_path_buf();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rep = Report::default();
    let load_before = loadavg();
    rt.block_on(async {
        let run = |phase: &str| args.only.as_deref().is_none_or(|o| o == phase);
        if run("idle") {
            bench_idle(&args, &data_dir, &mut rep).await;
        }
        let log = data_dir.join("server.log");
        let server = Server::start(&args.server, &data_dir, &log, &args, true);
        let c = server.wait_ready().await;
        if run("exec") {
            bench_exec(&server, &c, &plan, &mut rep).await;
        }
        if run("exec64") {
            bench_exec_parallel(&server, &c, &plan, &mut rep).await;
        }
        if run("readfile") {
            bench_read_file(&server, &data_dir, &plan, &mut rep).await;
        }
        if run("raw") {
            bench_raw(&server, &c, &data_dir, &plan, &mut rep).await;
        }
        let (rss, hwm) = server.memory();
        rep.notes.push(format!(
            "Server RSS after the whole run: {:.1} MiB (peak {:.1} MiB).",
            rss as f64 / MIB as f64,
            hwm as f64 / MIB as f64
        ));
    });
    rep.notes.push(format!(
        "Load average (1 min) before / after the run: {load_before} / {} \
         (the machine's 2 cores are shared).",
        loadavg()
    ));
    let mut out = table(&rep.rows);
    out.push('\n');
    for n in &rep.notes {
        let _ = writeln!(out, "- {n}");
    }
    out.push_str("\nTargets (issue 19), each against a bound measured in the same run:\n\n");
    for t in &rep.targets {
        let _ = writeln!(out, "- {t}");
    }
    if args.quick {
        out.push_str("\n(--quick smoke run: small sizes, not results.)\n");
    }
    print!("{out}");
    if let Some(path) = &args.out {
        std::fs::write(path, &out).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}
