//! Benchmark of `memoh-agent` against baselines measured in the same run, on the private
//! containerd of `scripts/test-env.sh up` (needs root and `eval "$(scripts/test-env.sh env)"`):
//!
//! - bot create to first successful exec (p50 over 10 bots) against
//!   `ctr run --rm IMAGE id /bin/true` of the same image (p50 over 10);
//! - `exec BOT -- true` through the agent CLI against `ctr tasks exec` of the same command
//!   (p50 over 20);
//! - the proxy's cost: exec through the agent's socket with the Rust client against the same
//!   exec straight to the bot's address with its token (p50 over 300 each, interleaved);
//! - that in-process exec against `ctr tasks exec`, and the cost of spawning `/bin/true`, the
//!   floor under every CLI figure on this machine;
//! - the CLI's own overhead (a CLI exec minus the in-process exec over the socket) against the
//!   spawn of `memoh-agent --version` (p50 over 20);
//! - raw transfers through the proxy: `WriteRaw` and `ReadRaw` of 512 MiB through the agent's
//!   socket against the same transfers straight to the bot (best of 3 each, alternating);
//! - `cp` of 1 GiB into and out of the bot through the CLI (a local file on each side) against
//!   the same transfer straight to the bot from and into memory, and from and into a local
//!   file on the same disk (best of 3 each, alternating);
//! - the machine's own cost of one more hop, the floor under the proxy's download figures:
//!   512 MiB read from a TCP loopback socket through a plain relay thread (TCP in, unix
//!   socket out, 64 KiB reads and writes) against the same bytes read straight (best of 3).
//!
//! Run with `cargo bench -p memoh-agent --bench agent`. Prints a markdown table and appends a
//! dated "memoh-agent" section with the machine to `BENCHMARKS.md` at the workspace root.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{output_within, percentile, Env, TestAgent, IMAGE};
use memoh_proto::client::{tcp_channel, unix_channel};
use memoh_proto::ContainerClient;

const CREATE_RUNS: usize = 10;
const EXEC_RUNS: usize = 20;
const PROXY_RUNS: usize = 300;
/// Size of the raw transfers through the proxy, MiB.
const RAW_MIB: usize = 512;
/// Runs of every transfer (the best is kept).
const TRANSFER_RUNS: usize = 3;

struct Row {
    what: &'static str,
    value: Duration,
    baseline_name: &'static str,
    baseline: Duration,
    target: &'static str,
    met: bool,
    ratio: String,
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn ctr(env: &Env, ns: &str) -> Command {
    let mut c = Command::new("ctr");
    c.arg("-a").arg(&env.sock).arg("-n").arg(ns);
    c
}

fn timed(cmd: Command) -> Duration {
    let what = format!("{cmd:?}");
    let t = Instant::now();
    let out = output_within(cmd, None, Duration::from_secs(120));
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn main() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let ns = a.namespace.clone();
    let mut rows = Vec::new();

    // (a) create to first successful exec, against `ctr run --rm`.
    let mut create = Vec::new();
    for i in 0..CREATE_RUNS {
        let bot = a.bot_id(&format!("c{i}"));
        let t = Instant::now();
        a.ok(&["bot", "create", &bot]);
        let mut tries = 0;
        while !a.cli(&["exec", &bot, "--", "true"]).status.success() {
            tries += 1;
            assert!(tries < 100, "{bot} never ran a command");
        }
        create.push(t.elapsed());
        a.ok(&["bot", "rm", &bot]);
    }
    let mut ctr_run = Vec::new();
    for i in 0..CREATE_RUNS {
        let mut c = ctr(&env, &ns);
        c.args(["run", "--rm"]);
        if let Some(r) = &env.runc_root {
            c.arg("--runc-root").arg(r);
        }
        if let Some(f) = &env.fifo_dir {
            c.arg("--fifo-dir").arg(f);
        }
        c.args([IMAGE, &format!("bench-run-{}-{i}", a.tag), "/bin/true"]);
        ctr_run.push(timed(c));
    }
    let (v, b) = (percentile(&create, 50), percentile(&ctr_run, 50));
    let ratio = v.as_secs_f64() / b.as_secs_f64();
    rows.push(Row {
        what: "bot create to first exec (CLI), p50 of 10",
        value: v,
        baseline_name: "`ctr run --rm IMAGE id /bin/true`",
        baseline: b,
        target: "<= 1.5x baseline",
        met: ratio <= 1.5,
        ratio: format!("{ratio:.2}x"),
    });

    // (b) exec through the CLI, against `ctr tasks exec`.
    let (bot, ip) = a.create_bot("exec");
    for _ in 0..3 {
        a.ok(&["exec", &bot, "--", "true"]);
    }
    let mut cli = Vec::new();
    for _ in 0..EXEC_RUNS {
        cli.push(timed(a.command(&["exec", &bot, "--", "true"])));
    }
    let mut ctr_exec = Vec::new();
    for i in 0..EXEC_RUNS {
        let mut c = ctr(&env, &ns);
        c.args(["tasks", "exec"]);
        if let Some(f) = &env.fifo_dir {
            c.arg("--fifo-dir").arg(f);
        }
        c.args([
            "--exec-id",
            &format!("bench-{i}"),
            &format!("mcp-{bot}"),
            "/bin/true",
        ]);
        ctr_exec.push(timed(c));
    }
    let (v, b) = (percentile(&cli, 50), percentile(&ctr_exec, 50));
    let speedup = b.as_secs_f64() / v.as_secs_f64();
    rows.push(Row {
        what: "exec `true` through the agent CLI, p50 of 20",
        value: v,
        baseline_name: "`ctr tasks exec --exec-id X mcp-BOT /bin/true`",
        baseline: b,
        target: ">= 20x faster",
        met: speedup >= 20.0,
        ratio: format!("{speedup:.1}x faster"),
    });

    // (c) the proxy: exec through the agent's socket vs straight to the bot.
    let token = std::fs::read_to_string(a.token_path(&bot)).unwrap();
    let (via, direct) = proxy_cost(&a.socket, &bot, &ip, token.trim());
    let (v, b) = (percentile(&via, 50), percentile(&direct, 50));
    let added = v.saturating_sub(b);
    rows.push(Row {
        what: "exec `true` through the agent's socket (Rust client), p50 of 300",
        value: v,
        baseline_name: "direct to BOT_IP:9090 with its token",
        baseline: b,
        target: "<= 0.5 ms added",
        met: v <= b + Duration::from_micros(500),
        ratio: format!("+{}", ms(added)),
    });
    // The same exec without a process spawn, against the same `ctr tasks exec` baseline, and
    // what one process spawn costs on this machine (the floor under any CLI figure).
    let speedup = percentile(&ctr_exec, 50).as_secs_f64() / v.as_secs_f64();
    rows.push(Row {
        what: "exec `true` through the agent's socket (Rust client, no spawn), p50 of 300",
        value: v,
        baseline_name: "`ctr tasks exec --exec-id X mcp-BOT /bin/true`",
        baseline: percentile(&ctr_exec, 50),
        target: ">= 20x faster",
        met: speedup >= 20.0,
        ratio: format!("{speedup:.1}x faster"),
    });
    let mut spawn = Vec::new();
    for _ in 0..EXEC_RUNS {
        spawn.push(timed(Command::new("/bin/true")));
    }
    let floor = percentile(&spawn, 50);
    rows.push(Row {
        what: "spawn `/bin/true` on the host (floor of any CLI call), p50 of 20",
        value: floor,
        baseline_name: "exec through the agent CLI (above)",
        baseline: percentile(&cli, 50),
        target: "-",
        met: true,
        ratio: format!(
            "{:.0} % of the CLI exec",
            floor.as_secs_f64() * 100.0 / percentile(&cli, 50).as_secs_f64()
        ),
    });
    // The CLI's own overhead: a CLI exec minus the same exec over the socket in-process,
    // against the spawn of `memoh-agent --version` (process start, argument parsing, exit).
    let mut version = Vec::new();
    for _ in 0..EXEC_RUNS {
        version.push(timed(a.command(&["--version"])));
    }
    let version = percentile(&version, 50);
    let overhead = percentile(&cli, 50).saturating_sub(v);
    let ratio = overhead.as_secs_f64() / version.as_secs_f64();
    rows.push(Row {
        what: "the CLI's own overhead: CLI exec p50 minus in-process socket exec p50",
        value: overhead,
        baseline_name: "spawn of `memoh-agent --version`, p50 of 20",
        baseline: version,
        target: "<= 2x baseline",
        met: ratio <= 2.0,
        ratio: format!("{ratio:.2}x"),
    });

    // (d) raw transfers: through the agent's socket against straight to the bot, then `cp`
    // through the CLI against straight to the bot.
    let t = transfers(&a, &bot, &ip, token.trim());
    for (what, via, direct, target) in [
        (
            "WriteRaw 512 MiB through the agent's socket",
            t.write_via,
            t.write_direct,
            0.8,
        ),
        (
            "ReadRaw 512 MiB through the agent's socket",
            t.read_via,
            t.read_direct,
            0.8,
        ),
        (
            "`cp` 1 GiB into the bot through the CLI",
            t.cp_in,
            t.cp_in_direct,
            0.7,
        ),
        (
            "`cp` 1 GiB out of the bot through the CLI",
            t.cp_out,
            t.cp_out_direct,
            0.7,
        ),
    ] {
        let ratio = direct.as_secs_f64() / via.as_secs_f64();
        rows.push(Row {
            what,
            value: via,
            baseline_name: "straight to BOT_IP:9090 (Rust client, memory), best of 3",
            baseline: direct,
            target: if target == 0.8 {
                ">= 0.8x direct"
            } else {
                ">= 0.7x direct"
            },
            met: ratio >= target,
            ratio: format!(
                "{ratio:.2}x ({:.0} vs {:.0} MB/s)",
                mbps(via, what),
                mbps(direct, what)
            ),
        });
    }
    // The same copies done straight to the bot with the local file on the same disk: what a
    // copy costs without the CLI and the agent in between.
    for (what, via, direct) in [
        (
            "`cp` 1 GiB into the bot through the CLI",
            t.cp_in,
            t.cp_in_file,
        ),
        (
            "`cp` 1 GiB out of the bot through the CLI",
            t.cp_out,
            t.cp_out_file,
        ),
    ] {
        let ratio = direct.as_secs_f64() / via.as_secs_f64();
        rows.push(Row {
            what,
            value: via,
            baseline_name:
                "straight to BOT_IP:9090 (Rust client) from or into a local file, best of 3",
            baseline: direct,
            target: ">= 0.7x direct",
            met: ratio >= 0.7,
            ratio: format!(
                "{ratio:.2}x ({:.0} vs {:.0} MB/s)",
                mbps(via, what),
                mbps(direct, what)
            ),
        });
    }
    // The machine's own cost of one more hop: the same bytes read from a TCP loopback socket
    // straight, and through a plain relay (TCP in, unix socket out, as the agent sits between
    // a bot and a client), best of 3 each, alternating.
    let (relayed, straight) = relay_baseline();
    let relay_ratio = straight.as_secs_f64() / relayed.as_secs_f64();
    rows.push(Row {
        what: "plain relay of 512 MiB: TCP loopback in, unix socket out, 64 KiB reads and writes",
        value: relayed,
        baseline_name: "the same bytes straight from the TCP loopback socket, best of 3",
        baseline: straight,
        target: "-",
        met: true,
        ratio: format!(
            "{relay_ratio:.2}x ({:.0} vs {:.0} MB/s)",
            mbps(relayed, "512"),
            mbps(straight, "512")
        ),
    });
    let read_ratio = t.read_direct.as_secs_f64() / t.read_via.as_secs_f64();
    rows.push(Row {
        what: "ReadRaw through the socket over direct, against the plain relay's own ratio",
        value: t.read_via,
        baseline_name: "the plain relay's ratio (above)",
        baseline: relayed,
        target: "-",
        met: true,
        ratio: format!(
            "{:.2}x ({read_ratio:.2} / {relay_ratio:.2})",
            read_ratio / relay_ratio
        ),
    });
    drop(a);

    let table = render(&rows);
    println!("\n{table}");
    let path = common::append_to_benchmarks(&section(&table, &env));
    println!("appended the memoh-agent section to {}", path.display());
}

/// Best wall times (of [`TRANSFER_RUNS`]) of the raw transfers and `cp`.
struct Transfers {
    write_via: Duration,
    write_direct: Duration,
    read_via: Duration,
    read_direct: Duration,
    cp_in: Duration,
    cp_in_direct: Duration,
    cp_out: Duration,
    cp_out_direct: Duration,
    cp_in_file: Duration,
    cp_out_file: Duration,
}

/// MB/s of a transfer named `what` (its size in MiB is in the name) that took `d`.
fn mbps(d: Duration, what: &str) -> f64 {
    let mib = if what.contains("1 GiB") {
        1024.0
    } else {
        RAW_MIB as f64
    };
    mib * 1024.0 * 1024.0 / 1e6 / d.as_secs_f64()
}

/// Best wall times (of [`TRANSFER_RUNS`], alternating) of reading [`RAW_MIB`] from a TCP
/// loopback source through a relay thread (TCP in, unix socket out, 64 KiB reads and
/// writes, no splice) and straight from the source: (relayed, straight).
fn relay_baseline() -> (Duration, Duration) {
    use std::io::{Read, Write};
    const CHUNK: usize = 64 * 1024;
    let total = RAW_MIB * 1024 * 1024;
    let source = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let source_addr = source.local_addr().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; CHUNK];
        for conn in source.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn({
                let chunk = chunk.clone();
                move || {
                    let _ = conn.set_nodelay(true);
                    for _ in 0..total / CHUNK {
                        if conn.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let relay_path = dir.path().join("relay.sock");
    let relay = std::os::unix::net::UnixListener::bind(&relay_path).unwrap();
    std::thread::spawn(move || {
        for conn in relay.incoming() {
            let Ok(mut out) = conn else { return };
            std::thread::spawn(move || {
                let Ok(mut inp) = std::net::TcpStream::connect(source_addr) else {
                    return;
                };
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match inp.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    fn drain(mut r: impl Read) -> usize {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n,
            }
        }
    }
    let (mut relayed, mut straight) = (Vec::new(), Vec::new());
    for _ in 0..TRANSFER_RUNS {
        let t = Instant::now();
        let got = drain(std::os::unix::net::UnixStream::connect(&relay_path).unwrap());
        relayed.push(t.elapsed());
        assert_eq!(got, total, "the relay moved {got} of {total} bytes");
        let t = Instant::now();
        let got = drain(std::net::TcpStream::connect(source_addr).unwrap());
        straight.push(t.elapsed());
        assert_eq!(got, total, "the source sent {got} of {total} bytes");
    }
    (best(&relayed), best(&straight))
}

/// `n` MiB of incompressible-looking bytes in 1 MiB buffers.
fn payload(mib: usize) -> Vec<bytes::Bytes> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let block: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let block = bytes::Bytes::from(block);
    vec![block; mib]
}

/// One `WriteRaw` of `data` to `path`; its wall time.
async fn write_once(c: &ContainerClient, path: &str, data: &[bytes::Bytes]) -> Duration {
    let total: usize = data.iter().map(|b| b.len()).sum();
    let t = Instant::now();
    let n = c
        .write_raw(path, futures::stream::iter(data.to_vec()))
        .await
        .unwrap();
    assert_eq!(n as usize, total);
    t.elapsed()
}

/// One `ReadRaw` of `path`, counting `want` bytes; its wall time.
async fn read_once(c: &ContainerClient, path: &str, want: usize) -> Duration {
    let t = Instant::now();
    let mut s = c.read_raw(path).await.unwrap();
    let mut n = 0;
    while let Some(m) = s.message().await.unwrap() {
        n += m.data.len();
    }
    assert_eq!(n, want);
    t.elapsed()
}

/// One `WriteRaw` of the local file `src` to `path`, read 1 MiB at a time; its wall time.
async fn write_from_file(c: &ContainerClient, path: &str, src: &Path) -> Duration {
    use std::io::Read;
    let t = Instant::now();
    let mut f = std::fs::File::open(src).unwrap();
    let total = f.metadata().unwrap().len();
    let chunks = futures::stream::iter(std::iter::from_fn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let n = f.read(&mut buf).unwrap();
        buf.truncate(n);
        (n > 0).then(|| bytes::Bytes::from(buf))
    }));
    let n = c.write_raw(path, chunks).await.unwrap();
    assert_eq!(n as u64, total);
    t.elapsed()
}

/// One `ReadRaw` of `path` into the local file `dst`; its wall time.
async fn read_into_file(c: &ContainerClient, path: &str, dst: &Path) -> Duration {
    use std::io::Write;
    let t = Instant::now();
    let mut f = std::fs::File::create(dst).unwrap();
    let mut s = c.read_raw(path).await.unwrap();
    while let Some(m) = s.message().await.unwrap() {
        f.write_all(&m.data).unwrap();
    }
    drop(f);
    t.elapsed()
}

fn best(v: &[Duration]) -> Duration {
    v.iter().copied().min().unwrap()
}

/// The raw transfers through the agent's socket and straight to the bot, alternating, and
/// `cp` of 1 GiB through the CLI against the same bytes straight to the bot.
fn transfers(a: &TestAgent, bot: &str, ip: &str, token: &str) -> Transfers {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (via, direct) = rt.block_on(async {
        let via = ContainerClient::with_auth(unix_channel(&a.socket), None, Some(bot)).unwrap();
        let direct = ContainerClient::with_auth(
            tcp_channel(&format!("{ip}:9090")).unwrap(),
            Some(token),
            None,
        )
        .unwrap();
        (via, direct)
    });
    let raw = payload(RAW_MIB);
    let gib = payload(1024);
    let mut m = [(); 10].map(|_| Vec::new());
    rt.block_on(async {
        for _ in 0..TRANSFER_RUNS {
            m[0].push(write_once(&via, "/data/bench-raw", &raw).await);
            m[1].push(write_once(&direct, "/data/bench-raw", &raw).await);
            m[2].push(read_once(&via, "/data/bench-raw", RAW_MIB << 20).await);
            m[3].push(read_once(&direct, "/data/bench-raw", RAW_MIB << 20).await);
        }
        via.delete("/data/bench-raw", false).await.unwrap();
    });
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = dir.path().join("gib");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&src).unwrap();
        for b in &gib {
            f.write_all(b).unwrap();
        }
        f.sync_all().unwrap();
    }
    let back = dir.path().join("back");
    let remote = format!("{bot}:/data/bench-gib");
    for _ in 0..TRANSFER_RUNS {
        m[4].push(timed(a.command(&[
            "cp",
            &src.display().to_string(),
            &remote,
        ])));
        m[5].push(rt.block_on(write_once(&direct, "/data/bench-gib", &gib)));
        m[6].push(timed(a.command(&[
            "cp",
            &remote,
            &back.display().to_string(),
        ])));
        m[7].push(rt.block_on(read_once(&direct, "/data/bench-gib", 1 << 30)));
        let _ = std::fs::remove_file(&back);
        m[8].push(rt.block_on(write_from_file(&direct, "/data/bench-gib", &src)));
        m[9].push(rt.block_on(read_into_file(&direct, "/data/bench-gib", &back)));
        let _ = std::fs::remove_file(&back);
    }
    rt.block_on(direct.delete("/data/bench-gib", false))
        .unwrap();
    Transfers {
        write_via: best(&m[0]),
        write_direct: best(&m[1]),
        read_via: best(&m[2]),
        read_direct: best(&m[3]),
        cp_in: best(&m[4]),
        cp_in_direct: best(&m[5]),
        cp_out: best(&m[6]),
        cp_out_direct: best(&m[7]),
        cp_in_file: best(&m[8]),
        cp_out_file: best(&m[9]),
    }
}

/// p50 samples of one exec of `true` through the agent's socket and straight to the bot.
fn proxy_cost(sock: &Path, bot: &str, ip: &str, token: &str) -> (Vec<Duration>, Vec<Duration>) {
    common::block_on(async {
        let via = ContainerClient::with_auth(unix_channel(sock), None, Some(bot)).unwrap();
        let direct = ContainerClient::with_auth(
            tcp_channel(&format!("{ip}:9090")).unwrap(),
            Some(token),
            None,
        )
        .unwrap();
        let run = |c: ContainerClient| async move {
            let t = Instant::now();
            let r = c.exec_collect("true", "", 0).await.unwrap();
            assert_eq!(r.exit_code, 0);
            t.elapsed()
        };
        for _ in 0..20 {
            run(via.clone()).await;
            run(direct.clone()).await;
        }
        let (mut v, mut d) = (Vec::new(), Vec::new());
        for _ in 0..PROXY_RUNS {
            v.push(run(via.clone()).await);
            d.push(run(direct.clone()).await);
        }
        (v, d)
    })
}

fn render(rows: &[Row]) -> String {
    let mut s = String::from(
        "| measure | value | baseline | baseline value | ratio | target | met? |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.what,
            ms(r.value),
            r.baseline_name,
            ms(r.baseline),
            r.ratio,
            r.target,
            match (r.target, r.met) {
                ("-", _) => "-",
                (_, true) => "yes",
                (_, false) => "no",
            }
        ));
    }
    s
}

fn section(table: &str, env: &Env) -> String {
    let machine = common::Machine::now();
    format!(
        "\n## memoh-agent ({date})\n\n\
         Machine: {described} (private instance, socket {sock}); the cores were shared with \
         other work, load average at the end {load}. Release build of `memoh-agent` (`cargo \
         bench -p memoh-agent --bench agent`); baselines measured in the same run against the \
         same image and namespace. The CLI figures include spawning the CLI process; \
         create-to-exec includes CNI attach and the health check.\n\n{table}",
        date = machine.date,
        described = machine.describe(),
        sock = env.sock.display(),
        load = common::load_average(),
    )
}
