//! Helpers of the limits tests and the `limits` bench: a bot's limits as its cgroup files hold
//! them (v1 or v2), a noisy bot's load (a memory hog, a fork storm and CPU burners, all
//! bounded), a neighbour's exec latency through the agent, and `/metrics` with the MCP token.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use memoh_proto::client::unix_channel;
use memoh_proto::ContainerClient;

use super::TestAgent;

/// Where the host mounts its cgroups.
const ROOT: &str = "/sys/fs/cgroup";
/// v1 reports "no limit" as a huge number (the page-rounded `i64::MAX`).
const V1_NO_LIMIT: u64 = 1 << 60;

/// The cgroup of a bot's task, found from `/proc/<pid>/cgroup`.
#[derive(Debug, Clone)]
pub struct BotCgroup {
    /// Unified hierarchy.
    pub v2: bool,
    /// The task's path inside each hierarchy, e.g. `/memoh/ns/mcp-b` (v2: the one path).
    pub path: String,
}

/// A bot's limits as its cgroup holds them; `None` is no limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLimits {
    /// v1 `memory.limit_in_bytes`, v2 `memory.max`.
    pub memory: Option<u64>,
    /// Whether swap is off: v1 `memory.memsw.limit_in_bytes` equal to the memory limit, v2
    /// `memory.swap.max` 0.
    pub swap_off: bool,
    /// Quota and period in µs: v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`, v2 `cpu.max`.
    pub cpu: Option<(u64, u64)>,
    /// v1 and v2 `pids.max`.
    pub pids: Option<u64>,
}

impl CgroupLimits {
    /// What a bot with these limits must have: swap off, the quota over a 100 ms period.
    pub fn expected(memory: u64, millicpus: u64, pids: u64) -> Self {
        Self {
            memory: Some(memory),
            swap_off: true,
            cpu: Some((millicpus * 100, 100_000)),
            pids: Some(pids),
        }
    }
}

impl BotCgroup {
    /// The cgroup of process `pid` (v1: its memory hierarchy's path, which runc makes the same
    /// in every hierarchy).
    pub fn of(pid: u64) -> Self {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/cgroup: {e}"));
        let v2 = Path::new(ROOT).join("cgroup.controllers").exists();
        let path = text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            let hit = if v2 {
                ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == "memory")
            };
            hit.then(|| path.to_string())
        });
        let path = path.unwrap_or_else(|| panic!("no cgroup of {pid} in:\n{text}"));
        Self { v2, path }
    }

    /// The directory of `controller` (ignored on v2).
    pub fn dir(&self, controller: &str) -> PathBuf {
        let rel = self.path.trim_start_matches('/');
        if self.v2 {
            Path::new(ROOT).join(rel)
        } else {
            Path::new(ROOT).join(controller).join(rel)
        }
    }

    /// A file of `controller`, trimmed.
    pub fn read(&self, controller: &str, file: &str) -> String {
        let p = self.dir(controller).join(file);
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    }

    /// The limits the kernel enforces on the bot now.
    pub fn limits(&self) -> CgroupLimits {
        let num = |s: String| -> Option<u64> {
            if s == "max" || s == "-1" {
                return None;
            }
            let n: u64 = s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}"));
            (n < V1_NO_LIMIT).then_some(n)
        };
        if self.v2 {
            let cpu = self.read("", "cpu.max");
            let (q, p) = cpu.split_once(' ').unwrap_or((&cpu, "100000"));
            CgroupLimits {
                memory: num(self.read("", "memory.max")),
                swap_off: self.read("", "memory.swap.max") == "0",
                cpu: num(q.to_string()).map(|q| (q, p.parse().unwrap())),
                pids: num(self.read("", "pids.max")),
            }
        } else {
            let memory = num(self.read("memory", "memory.limit_in_bytes"));
            let memsw = num(self.read("memory", "memory.memsw.limit_in_bytes"));
            let period: u64 = self.read("cpu", "cpu.cfs_period_us").parse().unwrap();
            CgroupLimits {
                memory,
                swap_off: memory.is_some() && memsw == memory,
                cpu: num(self.read("cpu", "cpu.cfs_quota_us")).map(|q| (q, period)),
                pids: num(self.read("pids", "pids.max")),
            }
        }
    }

    /// Whether the freezer holds the bot (v1 `freezer.state` FROZEN, v2 `cgroup.freeze` 1).
    pub fn frozen(&self) -> bool {
        if self.v2 {
            self.read("", "cgroup.freeze") == "1"
        } else {
            self.read("freezer", "freezer.state") == "FROZEN"
        }
    }

    /// OOM kills in the bot's memory cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        let (file, ctrl) = if self.v2 {
            ("memory.events", "")
        } else {
            ("memory.oom_control", "memory")
        };
        self.read(ctrl, file)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The bot's server pid from `bot inspect` (0 while it has no running task).
pub fn server_pid(a: &TestAgent, bot: &str) -> u64 {
    a.inspect(bot)["pid"].as_u64().unwrap_or(0)
}

/// The cgroup limits of `bot`'s running server.
pub fn limits_of(a: &TestAgent, bot: &str) -> CgroupLimits {
    let pid = server_pid(a, bot);
    assert!(pid > 0, "{bot} has no running server: {}", a.inspect(bot));
    BotCgroup::of(pid).limits()
}

/// The bytes `syscall-probe hog` is asked for: past a 256 MiB limit (the probe itself holds at
/// most 256 MiB, whatever it is asked, so the host is safe even if the limit failed).
pub const HOG_BYTES: u64 = 400 << 20;

/// A noisy bot's load, every part bounded: CPU burners on every core (ended by the exec
/// timeout's group kill), a memory hog past the bot's limit, and a fork storm held at the
/// bot's pids limit until the exec timeout of `secs` ends it. The CLI processes are killed when it is dropped.
pub struct Noise {
    children: Vec<(String, Child)>,
}

impl Noise {
    /// Starts the load in `bot` for about `secs` seconds.
    pub fn start(a: &TestAgent, bot: &str, secs: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let timeout = secs.to_string();
        let mut children = Vec::new();
        let mut spawn = |what: String, args: &[&str]| {
            let mut full = vec!["exec", "--timeout", &timeout, bot, "--"];
            full.extend_from_slice(args);
            let child = a
                .command(&full)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
            children.push((what, child));
        };
        let burn = format!("timeout {secs} sh -c 'while :; do :; done'");
        for i in 0..cores {
            spawn(format!("burner {i}"), &["sh", "-c", &burn]);
        }
        spawn(
            "hog".to_string(),
            &["syscall-probe", "hog", &HOG_BYTES.to_string()],
        );
        // The storm last: at the pids limit nothing else could start.
        std::thread::sleep(Duration::from_millis(500));
        // Asked for longer than the exec timeout, which must end it, children and all.
        spawn(
            "storm".to_string(),
            &["syscall-probe", "storm", &(secs * 3).to_string()],
        );
        Self { children }
    }

    /// Waits up to `limit` for every part to end; returns each one's name, exit code and
    /// output.
    pub fn wait(mut self, limit: Duration) -> Vec<(String, Option<i32>, String)> {
        let start = Instant::now();
        let mut done = Vec::new();
        for (what, mut child) in std::mem::take(&mut self.children) {
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                if start.elapsed() > limit {
                    let _ = child.kill();
                    break child.wait().unwrap();
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut out);
            }
            done.push((what, status.code(), out));
        }
        done
    }
}

impl Drop for Noise {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Exec of `true` in one bot through the agent's socket (the proxy path), timed.
pub struct Execs {
    rt: tokio::runtime::Runtime,
    c: ContainerClient,
}

impl Execs {
    /// A client of `bot` through `a`'s socket.
    pub fn new(a: &TestAgent, bot: &str) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let c = {
            let _in = rt.enter();
            ContainerClient::with_auth(unix_channel(&a.socket), None, Some(bot)).unwrap()
        };
        Self { rt, c }
    }

    /// One exec of `true`: its round trip, or what went wrong.
    pub fn once(&self) -> Result<Duration, String> {
        let t = Instant::now();
        match self.rt.block_on(self.c.exec_collect("true", "", 10)) {
            Ok(r) if r.exit_code == 0 => Ok(t.elapsed()),
            Ok(r) => Err(format!("exit code {}", r.exit_code)),
            Err(s) => Err(format!("{:?} {}", s.code(), s.message())),
        }
    }

    /// `n` execs one after another; panics at the first failure.
    pub fn times(&self, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|i| self.once().unwrap_or_else(|e| panic!("exec {i}: {e}")))
            .collect()
    }

    /// Execs one after another for `window` (at least `min` of them); returns the round trips
    /// and the failures.
    pub fn during(&self, window: Duration, min: usize) -> (Vec<Duration>, Vec<String>) {
        let start = Instant::now();
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        while start.elapsed() < window || ok.len() + failed.len() < min {
            match self.once() {
                Ok(d) => ok.push(d),
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` on `port` with the agent's MCP token; the body.
pub fn scrape_metrics(a: &TestAgent, port: u16) -> String {
    let token = a.ok(&["mcp", "token"]).trim().to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of `series` (name and labels, e.g. `x{bot="b"}`) in a metrics body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
