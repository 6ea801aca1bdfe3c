//! Load benchmark of `memoh-agent` (issue 7, "Scale and load") on the private containerd of
//! `scripts/test-env.sh up` (needs root and `eval "$(scripts/test-env.sh env)"`).
//!
//! One agent grows from 10 to 50 to 100 bots (the steps are configurable); at every step the
//! bench creates the additional bots and then measures:
//!
//! - creation throughput: `CreateBot` on the control API at concurrency 8 (the call returns
//!   once the bot's server answers), against a same-run baseline of `ctr run -d --null-io` of
//!   the same image, the same count at the same concurrency, in a containerd namespace of its
//!   own (no network, no health check), beside the bots of the earlier steps; the baseline's
//!   containers are removed again before the agent creates its bots, so both meet the same
//!   host;
//! - the agent daemon's RSS (`VmRSS`), threads and open descriptors;
//! - the sum of the bots' container-server RSS (each task's pid from `ListBots`) and of their
//!   runc shims;
//! - exec of `true` across all bots through the agent's socket (`memoh_proto::ContainerClient`
//!   with `x-memoh-bot`, the proxy path) at concurrency 64 over a fixed number of calls, after
//!   one warm-up call per bot: calls per second, p50 and p99 latency, failed calls.
//!
//! At the end every bot is deleted through the agent (concurrency 8) and the bench checks that
//! containerd, the host and the agent's state hold nothing of them; the `ctr` baseline's
//! namespace is removed as well. Both are also cleaned up on a panic (drop guards).
//!
//! Run with `cargo bench -p memoh-agent --bench load`; `-- --bots 10,50` or
//! `MEMOH_LOAD_STEPS=10,50` changes the steps, `MEMOH_LOAD_CALLS` the number of exec calls per
//! step (2000). More than 250 bots (up to 1 000) run on a /22. A step starts only if the host
//! can take it: memory, kernel tasks (`pid_max`) and disk, estimated from the previous step.
//! Prints a markdown section; the default steps also append it to
//! `BENCHMARKS.md` at the workspace root (a run with other steps only prints it).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{output_within, percentile, Env, TestAgent, IMAGE};
use futures::StreamExt;
use memoh_proto::client::unix_channel;
use memoh_proto::pb::agent as pb;
use memoh_proto::pb::agent::agent_service_client::AgentServiceClient;
use memoh_proto::ContainerClient;

/// The steps of a recorded run.
const DEFAULT_STEPS: &[usize] = &[10, 50, 100];
/// Concurrency of bot creation (agent and baseline) and of the final delete.
const CREATE_CONCURRENCY: usize = 8;
/// Concurrency of the exec load.
const EXEC_CONCURRENCY: usize = 64;
/// Exec calls per step.
const DEFAULT_CALLS: usize = 2000;
/// The longest one exec call may take before it counts as failed.
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// Default length of the idle window in which the agent's CPU use is measured.
const DEFAULT_IDLE: Duration = Duration::from_secs(30);
/// Agent RSS target at the largest step.
const AGENT_RSS_TARGET_MIB: f64 = 100.0;
/// Creation time target against the `ctr run -d` baseline (issue 19).
const CREATE_RATIO_TARGET: f64 = 1.2;
/// Exec rate target at the largest step against the first step's (issue 19).
const EXEC_SCALE_TARGET: f64 = 0.8;
/// Host memory per idle bot target (server + shim + the agent's share), MiB (issue 19).
const BOT_MEMORY_TARGET_MIB: f64 = 12.0;
/// A step starts only while the host has this much `MemAvailable` (the machine is shared),
/// beyond what its bots are expected to take.
const MIN_AVAILABLE_KIB: u64 = 6 * 1024 * 1024;
/// Host memory one more bot (or its baseline container, the larger) is assumed to take
/// before a step has measured it, KiB.
const FIRST_KIB_PER_BOT: u64 = 48 * 1024;
/// Kernel tasks (threads) one more bot (or its baseline container, the larger) is assumed
/// to take before a step has measured it: shims, servers, log drivers.
const FIRST_TASKS_PER_BOT: u64 = 48;
/// Disk one more bot (or its baseline container, the larger) is assumed to take before a
/// step has measured it, KiB.
const FIRST_DISK_KIB_PER_BOT: u64 = 8 * 1024;
/// A step starts only if the host's tasks stay under this share of `pid_max` and
/// `threads-max` (a fork failure would hit everything else on the machine).
const MAX_TASK_SHARE: f64 = 0.8;
/// A step starts only with this much free disk under the containerd state and `/tmp`, KiB.
const MIN_FREE_DISK_KIB: u64 = 10 * 1024 * 1024;
/// The most bots one bench agent runs: a Linux bridge has at most 1 024 ports, and the
/// wide subnet (a /22) holds 1 021 bots.
const MAX_BOTS: usize = 1000;

/// What one step measured.
#[derive(Debug, Default)]
struct Step {
    /// Bots after the step.
    bots: usize,
    /// Bots created in this step.
    added: usize,
    /// Wall time of the agent's creations.
    create_wall: Duration,
    /// Per-call latencies of successful creations.
    create_lat: Vec<Duration>,
    /// Failed creations (first messages kept in `errors`).
    create_failed: usize,
    /// Wall time of the same number of `ctr run -d`.
    ctr_wall: Duration,
    /// Busy CPU time of the whole machine while the baseline ran, seconds.
    ctr_cpu: f64,
    /// Busy CPU time of the whole machine while the agent created this step's bots, seconds.
    create_cpu: f64,
    /// The agent's own CPU time in that window, seconds.
    create_agent_cpu: f64,
    /// CPU time of the agent's reaped children (CNI plugins, iptables, nft) in that window.
    create_child_cpu: f64,
    /// Agent VmRSS, KiB.
    agent_rss: u64,
    /// Agent threads.
    agent_threads: u64,
    /// Agent open descriptors.
    agent_fds: usize,
    /// The agent's own CPU time in the idle window, seconds.
    idle_cpu: f64,
    /// CPU time of the agent's reaped children (CNI plugins, iptables, ip) in that window.
    idle_child_cpu: f64,
    /// The idle window.
    idle: Duration,
    /// Sum of the bots' container-server VmRSS, KiB.
    servers_rss: u64,
    /// Sum of the bots' shims' VmRSS, KiB (each shim once).
    shims_rss: u64,
    /// Sum of the bots' container-server `Pss` (`/proc/PID/smaps_rollup`), KiB.
    servers_pss: u64,
    /// Sum of the shims' `Pss`, KiB (each shim once).
    shims_pss: u64,
    /// Distinct shim processes.
    shims: usize,
    /// Sum of the `Pss` of the shims' other children (the per-bot log driver, a
    /// `memoh-agent` process the shim starts for the server's output), KiB.
    drivers_pss: u64,
    /// Those processes.
    drivers: usize,
    /// The agent's `Pss` after the step, KiB.
    agent_pss: u64,
    /// Bots with a running task and a pid.
    running: usize,
    /// Exec calls made (warm-up excluded).
    calls: usize,
    /// Wall time of the measured calls.
    exec_wall: Duration,
    /// Latencies of the successful measured calls.
    exec_lat: Vec<Duration>,
    /// Failed calls, warm-up included.
    exec_failed: usize,
    /// Warm-up calls (one per bot).
    warmup: usize,
    /// Kernel tasks (threads) of the whole host after the step.
    host_tasks: u64,
    /// Host `MemAvailable` after the step, KiB.
    mem_available: u64,
    /// First error messages of this step.
    errors: Vec<String>,
}

/// The end of the run: delete and leftovers.
#[derive(Debug, Default)]
struct Teardown {
    deleted: usize,
    delete_failed: usize,
    wall: Duration,
    leftovers: Vec<String>,
    agent_rss_after: u64,
    ctr_left: Vec<String>,
    errors: Vec<String>,
}

/// The `ctr run -d` baseline: containers in a namespace of their own, removed with the
/// namespace on [`CtrBaseline::cleanup`] or on drop.
struct CtrBaseline {
    env: Env,
    ns: String,
    next: usize,
    cleaned: bool,
}

impl CtrBaseline {
    /// A fresh namespace holding the test image.
    fn new(env: &Env, tag: &str) -> Self {
        let b = Self {
            env: env.clone(),
            ns: format!("memoh-load-ctr-{tag}"),
            next: 0,
            cleaned: false,
        };
        let mut c = b.ctr();
        c.args(["images", "import"]).arg(&env.tar);
        let out = output_within(c, None, Duration::from_secs(300));
        assert!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        b
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.env.sock).arg("-n").arg(&self.ns);
        c
    }

    /// Starts `count` more containers at `concurrency`; returns the wall time.
    fn run(&mut self, count: usize, concurrency: usize) -> Duration {
        let first = self.next;
        self.next += count;
        let next = AtomicUsize::new(first);
        let errors = Mutex::new(Vec::new());
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..concurrency.min(count) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= first + count {
                        return;
                    }
                    let mut c = self.ctr();
                    c.args(["run", "-d", "--null-io"]);
                    if let Some(r) = &self.env.runc_root {
                        c.arg("--runc-root").arg(r);
                    }
                    if let Some(f) = &self.env.fifo_dir {
                        c.arg("--fifo-dir").arg(f);
                    }
                    // The image's server as PID 1, as in a bot (which runs the host's copy):
                    // the image's entrypoint would first copy the server into each
                    // container's writable layer (156 MiB a container with a debug build).
                    c.args([IMAGE, &format!("load-{i}"), "/opt/mcp"]);
                    let out = output_within(c, None, Duration::from_secs(120));
                    if !out.status.success() {
                        errors.lock().unwrap().push(format!(
                            "ctr run load-{i}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        ));
                    }
                });
            }
        });
        let d = t.elapsed();
        let errors = errors.into_inner().unwrap();
        assert!(errors.is_empty(), "baseline failed: {errors:?}");
        d
    }

    /// Kills and removes the containers started so far (and their snapshots), keeping the
    /// namespace and its image, so the next step's baseline and the agent's creations meet
    /// the same host: the agent's bots, no baseline containers.
    fn clear(&mut self) {
        let (sock, ns) = (self.env.sock.clone(), self.ns.clone());
        let r = std::thread::spawn(move || {
            common::block_on(async {
                stop_tasks(&sock, &ns).await?;
                remove_containers(&sock, &ns).await
            })
        })
        .join()
        .unwrap_or_else(|_| Err("clearing panicked".into()));
        if let Err(e) = r {
            panic!("ctr baseline: clearing its containers: {e}");
        }
    }

    /// Kills and removes everything in the namespace, then the namespace; returns what is left.
    fn cleanup(&mut self) -> Vec<String> {
        self.cleaned = true;
        let (sock, ns) = (self.env.sock.clone(), self.ns.clone());
        let r = std::thread::spawn(move || {
            common::block_on(async {
                stop_tasks(&sock, &ns).await?;
                common::clean_namespace(&sock, &ns).await
            })
        })
        .join()
        .unwrap_or_else(|_| Err("cleanup panicked".into()));
        let mut left = Vec::new();
        if let Err(e) = r {
            left.push(format!("ctr baseline cleanup: {e}"));
        }
        left.extend(ctr_ids(&self.env, &self.ns));
        let mut c = Command::new("ctr");
        c.arg("-a")
            .arg(&self.env.sock)
            .args(["namespaces", "ls", "-q"]);
        let out = output_within(c, None, Duration::from_secs(30));
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == self.ns)
        {
            left.push(format!("namespace {}", self.ns));
        }
        left
    }
}

/// SIGKILLs, waits for and deletes the task of every container of namespace `ns`.
///
/// The containers come from the container list: `common::list_tasks` reads `container_id`,
/// which containerd 1.6 leaves empty in `ListTasks` (it fills `id`), so it finds no task.
async fn stop_tasks(sock: &Path, ns: &str) -> Result<(), String> {
    use memoh_agent::containerd::{prelude::*, Containerd};
    let c = Containerd::connect(sock, ns, "overlayfs", "io.containerd.runc.v2")
        .await
        .map_err(|e| e.to_string())?;
    let ids: Vec<String> = c
        .list_containers(&[])
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|c| c.id)
        .collect();
    let mut live = Vec::new();
    for id in &ids {
        if c.task_status(id)
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            let _ = c.kill_task(id, libc::SIGKILL, true).await;
            live.push(id);
        }
    }
    for id in live {
        let _ = c.wait_task(id, Duration::from_secs(10)).await;
        if let Err(e) = c.delete_task(id).await {
            eprintln!("ctr baseline: delete task {id}: {e}");
        }
    }
    Ok(())
}

/// Deletes every (task-less) container of namespace `ns` and its snapshot (`ctr run` names
/// the snapshot after the container).
async fn remove_containers(sock: &Path, ns: &str) -> Result<(), String> {
    use memoh_agent::containerd::{prelude::*, Containerd};
    let c = Containerd::connect(sock, ns, "overlayfs", "io.containerd.runc.v2")
        .await
        .map_err(|e| e.to_string())?;
    for ct in c.list_containers(&[]).await.map_err(|e| e.to_string())? {
        c.delete_container(&ct.id)
            .await
            .map_err(|e| format!("delete container {}: {e}", ct.id))?;
        c.remove_snapshot(&ct.id)
            .await
            .map_err(|e| format!("remove snapshot {}: {e}", ct.id))?;
    }
    Ok(())
}

/// Task and container ids left in containerd namespace `ns` (none when it is gone).
fn ctr_ids(env: &Env, ns: &str) -> Vec<String> {
    let mut left = Vec::new();
    for what in ["tasks", "containers"] {
        let mut c = Command::new("ctr");
        c.arg("-a")
            .arg(&env.sock)
            .args(["-n", ns, what, "ls", "-q"]);
        let out = output_within(c, None, Duration::from_secs(30));
        left.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("{what} {}", l.trim())),
        );
    }
    left
}

impl Drop for CtrBaseline {
    fn drop(&mut self) {
        if !self.cleaned {
            for l in self.cleanup() {
                eprintln!("ctr baseline left: {l}");
            }
        }
    }
}

/// Fields of `/proc/PID/status`: (VmRSS KiB, Threads, PPid).
fn proc_status(pid: u32) -> Option<(u64, u64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("Threads:")?, field("PPid:")? as u32))
}

/// (own, children's) CPU seconds of `pid` from `/proc/PID/stat` (utime+stime, cutime+cstime).
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is field 3, utime 14.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let at = |i: usize| f.get(i - 3).copied().unwrap_or(0.0);
    ((at(14) + at(15)) / tick, (at(16) + at(17)) / tick)
}

/// `cpu` seconds spread over the bots `st` created, in milliseconds a bot.
fn per_bot_ms(cpu: f64, st: &Step) -> f64 {
    cpu * 1000.0 / st.added.max(1) as f64
}

/// Busy CPU time of the whole machine since boot (every core; all but idle and iowait),
/// seconds, from the first line of `/proc/stat`.
fn machine_busy() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // user nice system idle iowait irq softirq steal
    let busy: f64 = f.iter().take(8).sum::<f64>()
        - f.get(3).copied().unwrap_or(0.0)
        - f.get(4).copied().unwrap_or(0.0);
    busy / tick
}

/// `Pss` of `pid` from `/proc/PID/smaps_rollup`, KiB (shared pages divided among their users).
fn pss(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Kernel tasks (threads) on the host, from `/proc/loadavg`'s `running/total`.
fn host_tasks() -> u64 {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .unwrap_or(0)
}

/// The fewest tasks the kernel allows: `kernel.pid_max` or `kernel.threads-max`.
fn task_limit() -> u64 {
    ["/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
        .min()
        .unwrap_or(32768)
}

/// Free space of the file system holding `path`, KiB (0 when it cannot be read).
fn free_disk(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available() * s.fragment_size() / 1024)
        .unwrap_or(0)
}

/// Free disk under the containerd state (`MEMOH_TEST_LIB`, else `/var/lib`) and `/tmp`, the
/// lower, KiB.
fn free_state_disk() -> u64 {
    let state = std::env::var("MEMOH_TEST_LIB").unwrap_or_else(|_| "/var/lib".into());
    free_disk(Path::new(&state)).min(free_disk(&std::env::temp_dir()))
}

/// What one more bot (or its baseline container, the larger) takes: memory and disk in KiB,
/// kernel tasks.
#[derive(Clone, Copy)]
struct PerBot {
    mem_kib: u64,
    tasks: u64,
    disk_kib: u64,
}

/// Why a step adding `added` bots must not start on this host now, if it must not.
fn refuse_step(added: usize, per_bot: PerBot) -> Option<String> {
    let added = added as u64;
    let available = mem_available();
    let need = MIN_AVAILABLE_KIB + added * per_bot.mem_kib;
    if available < need {
        return Some(format!(
            "MemAvailable {} is below {} ({} reserved and {} a bot)",
            mib(available),
            mib(need),
            mib(MIN_AVAILABLE_KIB),
            mib(per_bot.mem_kib)
        ));
    }
    let (tasks, limit) = (host_tasks(), task_limit());
    let after = tasks + added * per_bot.tasks;
    if after as f64 > MAX_TASK_SHARE * limit as f64 {
        return Some(format!(
            "the host would run about {after} tasks ({tasks} now and {} a bot), over {:.0} % \
             of the kernel's {limit} (pid_max, threads-max)",
            per_bot.tasks,
            MAX_TASK_SHARE * 100.0
        ));
    }
    let free = free_state_disk();
    let need = MIN_FREE_DISK_KIB + added * per_bot.disk_kib;
    if free < need {
        return Some(format!(
            "the containerd state and /tmp have {} free, below {} ({} reserved and {} a bot)",
            mib(free),
            mib(need),
            mib(MIN_FREE_DISK_KIB),
            mib(per_bot.disk_kib)
        ));
    }
    None
}

/// `MemAvailable` of the host, KiB.
fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// With `MEMOH_LOAD_PERF=DIR`: `perf record -a -g` (the whole host: agent, servers, shims,
/// plugins) during the exec load of every step, into `DIR/exec-<bots>.data` (stopped with
/// SIGINT when the load ends); `perf report --comm memoh-agent` picks the agent out.
fn start_perf(bots: usize) -> Option<std::process::Child> {
    let dir = std::env::var("MEMOH_LOAD_PERF").ok()?;
    let out = Path::new(&dir).join(format!("exec-{bots}.data"));
    let child = Command::new("perf")
        .args(["record", "-a", "-g", "-q", "-o"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("perf: {e}"))
        .ok()?;
    // perf needs a moment to attach before the load starts.
    std::thread::sleep(Duration::from_millis(500));
    Some(child)
}

fn stop_perf(child: Option<std::process::Child>) {
    if let Some(mut c) = child {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = c.wait();
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// The steps from `--bots A,B,C`, `MEMOH_LOAD_STEPS` or the default; strictly increasing.
fn steps() -> (Vec<usize>, bool) {
    let args: Vec<String> = std::env::args().collect();
    let from_args = args
        .iter()
        .position(|a| a == "--bots")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--bots=").map(String::from))
        });
    let Some(text) = from_args.or_else(|| std::env::var("MEMOH_LOAD_STEPS").ok()) else {
        return (DEFAULT_STEPS.to_vec(), true);
    };
    let v: Vec<usize> = text
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad step {s:?} in {text:?}"))
        })
        .collect();
    assert!(
        !v.is_empty() && v[0] > 0 && v.windows(2).all(|w| w[0] < w[1]),
        "steps must be positive and increasing: {text:?}"
    );
    (v.clone(), v == DEFAULT_STEPS)
}

fn main() {
    let Some(env) = Env::get(false) else { return };
    let (steps, record) = steps();
    let calls: usize = std::env::var("MEMOH_LOAD_CALLS")
        .ok()
        .map(|s| s.parse().expect("MEMOH_LOAD_CALLS is a number"))
        .unwrap_or(DEFAULT_CALLS);
    let idle = std::env::var("MEMOH_LOAD_IDLE_SECS")
        .ok()
        .map(|s| Duration::from_secs(s.parse().expect("MEMOH_LOAD_IDLE_SECS is a number")))
        .unwrap_or(DEFAULT_IDLE);
    let max = *steps.last().unwrap();
    assert!(
        max <= MAX_BOTS,
        "at most {MAX_BOTS} bots (a bridge has 1 024 ports)"
    );

    // MCP off: the bench measures bots, and a second agent must not take 127.0.0.1:8091.
    // A /24 holds 253 bots; more take a /22.
    let mut a = if max <= 250 {
        TestAgent::new(&env, "mcp_listen = \"\"")
    } else {
        TestAgent::wide(&env, "mcp_listen = \"\"")
    };
    a.serve();
    let out = a.ok(&["image", "import", &env.tar.display().to_string()]);
    assert!(out.contains(IMAGE), "import printed {out:?}");
    let agent_pid = a.pid().expect("the agent runs");
    let mut baseline = CtrBaseline::new(&env, &a.tag);
    let all: Vec<String> = (0..max).map(|i| a.bot_id(&format!("l{i:03}"))).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let mut results = Vec::new();
    let mut have = 0;
    // What one bot (with its baseline container while that runs) took in the last step.
    let mut per_bot = PerBot {
        mem_kib: FIRST_KIB_PER_BOT,
        tasks: FIRST_TASKS_PER_BOT,
        disk_kib: FIRST_DISK_KIB_PER_BOT,
    };
    for &n in &steps {
        if let Some(why) = refuse_step(n - have, per_bot) {
            println!("step {n} skipped: {why}");
            break;
        }
        let mut st = Step {
            bots: n,
            added: n - have,
            ..Step::default()
        };
        println!("step {n}: {} more bots", st.added);
        let (tasks_before, mem_before, disk_before) =
            (host_tasks(), mem_available(), free_state_disk());
        let busy = machine_busy();
        st.ctr_wall = baseline.run(st.added, CREATE_CONCURRENCY);
        st.ctr_cpu = machine_busy() - busy;
        let (tasks_ctr, mem_ctr, disk_ctr) = (host_tasks(), mem_available(), free_state_disk());
        baseline.clear();
        let new = &all[have..n];
        let (busy, (own, children)) = (machine_busy(), cpu_seconds(agent_pid));
        rt.block_on(create_bots(&a.socket, new, &mut st));
        let (own2, children2) = cpu_seconds(agent_pid);
        st.create_cpu = machine_busy() - busy;
        (st.create_agent_cpu, st.create_child_cpu) = (own2 - own, children2 - children);
        (st.host_tasks, st.mem_available) = (host_tasks(), mem_available());
        // The next step's baseline runs beside the bots and is cleared before the agent
        // creates more, so a bot costs the larger of the two; with a margin (memory moves
        // with the page cache, tasks with the calls in flight).
        let added = st.added.max(1) as u64;
        let bot_tasks = st.host_tasks.saturating_sub(tasks_before);
        let ctr_tasks = tasks_ctr.saturating_sub(tasks_before);
        let bot_kib = mem_before.saturating_sub(st.mem_available);
        let ctr_kib = mem_before.saturating_sub(mem_ctr);
        let bot_disk = disk_before.saturating_sub(free_state_disk());
        let ctr_disk = disk_before.saturating_sub(disk_ctr);
        per_bot = PerBot {
            mem_kib: (bot_kib.max(ctr_kib) * 3 / 2 / added).max(FIRST_KIB_PER_BOT / 8),
            tasks: (bot_tasks.max(ctr_tasks) * 11 / 10 / added).max(FIRST_TASKS_PER_BOT / 3),
            disk_kib: (bot_disk.max(ctr_disk) * 2 / added).max(FIRST_DISK_KIB_PER_BOT / 8),
        };
        have = n;
        let live = &all[..n];
        rt.block_on(bot_rss(&a.socket, &mut st));
        if let Some((rss, threads, _)) = proc_status(agent_pid) {
            st.agent_rss = rss;
            st.agent_threads = threads;
        }
        st.agent_fds = open_fds(agent_pid);
        // The agent's background work with N idle bots (periodic reconcile every 15 s).
        let (own, children) = cpu_seconds(agent_pid);
        std::thread::sleep(idle);
        let (own2, children2) = cpu_seconds(agent_pid);
        (st.idle_cpu, st.idle_child_cpu, st.idle) = (own2 - own, children2 - children, idle);
        let perf = start_perf(n);
        rt.block_on(exec_load(&a.socket, live, calls, &mut st));
        stop_perf(perf);
        st.agent_pss = pss(agent_pid);
        // RSS again after the load: the peak of the step.
        if let Some((rss, threads, _)) = proc_status(agent_pid) {
            st.agent_rss = st.agent_rss.max(rss);
            st.agent_threads = st.agent_threads.max(threads);
        }
        st.agent_fds = st.agent_fds.max(open_fds(agent_pid));
        println!("{st:#?}", st = Summary(&st));
        results.push(st);
    }

    // Delete everything through the agent, then look for leftovers.
    let mut td = Teardown::default();
    rt.block_on(delete_bots(&a.socket, &all, &mut td));
    td.agent_rss_after = proc_status(agent_pid).map_or(0, |s| s.0);
    let listed = a.list();
    td.leftovers.extend(listed.iter().filter_map(|b| {
        b["bot_id"]
            .as_str()
            .map(|b| format!("bot {b} still listed"))
    }));
    for bot in &all {
        td.leftovers.extend(a.leftovers(bot));
    }
    td.leftovers.extend(ctr_ids(&env, &a.namespace));
    td.leftovers.extend(
        a.ipam_entries()
            .iter()
            .map(|(ip, o)| format!("ipam {ip} ({o})")),
    );
    td.ctr_left = baseline.cleanup();
    drop(rt);
    // With `MEMOH_LOAD_LOG=PATH` the agent's log (its step timings at debug level) is kept.
    if let Ok(keep) = std::env::var("MEMOH_LOAD_LOG") {
        if let Err(e) = std::fs::copy(a.log_path(), &keep) {
            eprintln!("cannot keep the agent log at {keep}: {e}");
        }
    }
    drop(a);

    let section = section(&env, &steps, calls, &results, &td);
    println!("\n{section}");
    if record {
        let path = common::append_to_benchmarks(&section);
        println!("appended the load section to {}", path.display());
    } else {
        println!("(steps other than the default: not recorded in BENCHMARKS.md)");
    }
    let failed = results
        .iter()
        .map(|s| s.create_failed + s.exec_failed)
        .sum::<usize>()
        + td.delete_failed;
    assert!(
        failed == 0 && td.leftovers.is_empty() && td.ctr_left.is_empty(),
        "load run had {failed} failed calls, leftovers {:?}, baseline leftovers {:?}",
        td.leftovers,
        td.ctr_left
    );
}

/// A short progress line of a step.
struct Summary<'a>(&'a Step);

impl std::fmt::Debug for Summary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        write!(
            f,
            "{} bots: create {:.1}/s (ctr {:.1}/s, {} failed), agent {} ({} threads, {} fds), \
             servers {}, idle cpu {:.2}+{:.2} s, exec {:.0}/s p50 {} p99 {} ({} failed){}",
            s.bots,
            rate(s.added - s.create_failed, s.create_wall),
            rate(s.added, s.ctr_wall),
            s.create_failed,
            mib(s.agent_rss),
            s.agent_threads,
            s.agent_fds,
            mib(s.servers_rss),
            s.idle_cpu,
            s.idle_child_cpu,
            rate(s.exec_lat.len(), s.exec_wall),
            s.exec_lat
                .is_empty()
                .then(String::new)
                .unwrap_or_else(|| ms(percentile(&s.exec_lat, 50))),
            s.exec_lat
                .is_empty()
                .then(String::new)
                .unwrap_or_else(|| ms(percentile(&s.exec_lat, 99))),
            s.exec_failed,
            if s.errors.is_empty() {
                String::new()
            } else {
                format!("; errors {:?}", s.errors)
            }
        )
    }
}

fn keep_error(errors: &mut Vec<String>, e: String) {
    if errors.len() < 5 {
        errors.push(e);
    }
}

/// Creates `bots` through the control API at [`CREATE_CONCURRENCY`].
async fn create_bots(sock: &Path, bots: &[String], st: &mut Step) {
    let client = AgentServiceClient::new(unix_channel(sock));
    let t = Instant::now();
    let results: Vec<_> = futures::stream::iter(bots.iter().cloned())
        .map(|bot| {
            let mut c = client.clone();
            async move {
                let t = Instant::now();
                let r = c
                    .create_bot(pb::CreateBotRequest {
                        bot_id: bot.clone(),
                        image: String::new(),
                        limits: None,
                        spec: None,
                        ..Default::default()
                    })
                    .await;
                (bot, r.map(|r| r.into_inner()), t.elapsed())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    st.create_wall = t.elapsed();
    for (bot, r, d) in results {
        match r {
            Ok(info) if info.status == "running" && !info.ip.is_empty() => st.create_lat.push(d),
            Ok(info) => {
                st.create_failed += 1;
                keep_error(&mut st.errors, format!("create {bot}: {info:?}"));
            }
            Err(s) => {
                st.create_failed += 1;
                keep_error(&mut st.errors, format!("create {bot}: {}", s.message()));
            }
        }
    }
}

/// Sums the container-server and shim RSS of every bot `ListBots` reports running.
async fn bot_rss(sock: &Path, st: &mut Step) {
    let mut client = AgentServiceClient::new(unix_channel(sock));
    let bots = client
        .list_bots(pb::ListBotsRequest {})
        .await
        .expect("list bots")
        .into_inner()
        .bots;
    let mut shims = std::collections::HashSet::new();
    let mut servers = std::collections::HashSet::new();
    let mut shim_children = std::collections::HashSet::new();
    for b in bots {
        if b.status != "running" || b.pid == 0 {
            keep_error(
                &mut st.errors,
                format!("{} is {} (pid {})", b.bot_id, b.status, b.pid),
            );
            continue;
        }
        let Some((rss, _, ppid)) = proc_status(b.pid) else {
            keep_error(&mut st.errors, format!("{}: no /proc/{}", b.bot_id, b.pid));
            continue;
        };
        st.running += 1;
        st.servers_rss += rss;
        st.servers_pss += pss(b.pid);
        if shims.insert(ppid) {
            st.shims += 1;
            st.shims_rss += proc_status(ppid).map_or(0, |s| s.0);
            st.shims_pss += pss(ppid);
            shim_children.extend(children(ppid));
        }
        servers.insert(b.pid);
    }
    for pid in shim_children.difference(&servers) {
        st.drivers += 1;
        st.drivers_pss += pss(*pid);
    }
}

/// The children of every thread of `pid` (`/proc/PID/task/*/children`).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// One exec of `true` through the proxy; the error message on failure.
async fn exec_true(c: ContainerClient) -> (Duration, Result<(), String>) {
    let t = Instant::now();
    let r = match tokio::time::timeout(CALL_LIMIT, c.exec_collect("true", "", 0)).await {
        Ok(Ok(r)) if r.exit_code == 0 => Ok(()),
        Ok(Ok(r)) => Err(format!("exit code {}", r.exit_code)),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {CALL_LIMIT:?}")),
    };
    (t.elapsed(), r)
}

/// One warm-up exec per bot, then `calls` execs spread round-robin over `bots` at
/// [`EXEC_CONCURRENCY`], all on one connection to the agent's socket.
async fn exec_load(sock: &Path, bots: &[String], calls: usize, st: &mut Step) {
    let ch = unix_channel(sock);
    let clients: Vec<ContainerClient> = bots
        .iter()
        .map(|b| ContainerClient::with_auth(ch.clone(), None, Some(b)).unwrap())
        .collect();
    let run = |n: usize| {
        futures::stream::iter(0..n)
            .map(|i| exec_true(clients[i % clients.len()].clone()))
            .buffer_unordered(EXEC_CONCURRENCY)
            .collect::<Vec<_>>()
    };
    st.warmup = clients.len();
    for (_, r) in run(clients.len()).await {
        if let Err(e) = r {
            st.exec_failed += 1;
            keep_error(&mut st.errors, format!("warm-up exec: {e}"));
        }
    }
    let t = Instant::now();
    let results = run(calls).await;
    st.exec_wall = t.elapsed();
    st.calls = calls;
    for (d, r) in results {
        match r {
            Ok(()) => st.exec_lat.push(d),
            Err(e) => {
                st.exec_failed += 1;
                keep_error(&mut st.errors, format!("exec: {e}"));
            }
        }
    }
}

/// Deletes `bots` through the control API at [`CREATE_CONCURRENCY`].
async fn delete_bots(sock: &Path, bots: &[String], td: &mut Teardown) {
    let client = AgentServiceClient::new(unix_channel(sock));
    let t = Instant::now();
    let results: Vec<_> = futures::stream::iter(bots.iter().cloned())
        .map(|bot| {
            let mut c = client.clone();
            async move {
                let r = c
                    .delete_bot(pb::DeleteBotRequest {
                        bot_id: bot.clone(),
                        keep_versions: false,
                    })
                    .await;
                (bot, r)
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    td.wall = t.elapsed();
    for (bot, r) in results {
        match r {
            Ok(_) => td.deleted += 1,
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => {
                td.delete_failed += 1;
                keep_error(&mut td.errors, format!("delete {bot}: {}", s.message()));
            }
        }
    }
}

fn yes_no(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "**no**"
    }
}

/// The markdown table: one row per figure, one column per step.
fn table(steps: &[Step], calls: usize, td: &Teardown) -> String {
    let mut s = String::from("| figure |");
    for st in steps {
        s.push_str(&format!(" {} bots |", st.bots));
    }
    s.push_str(" target | met? |\n|---|");
    for _ in steps {
        s.push_str("---|");
    }
    s.push_str("---|---|\n");
    let mut row = |name: &str, cell: &dyn Fn(&Step) -> String, target: &str, met: &str| {
        s.push_str(&format!("| {name} |"));
        for st in steps {
            s.push_str(&format!(" {} |", cell(st)));
        }
        s.push_str(&format!(" {target} | {met} |\n"));
    };
    let ratio = |st: &Step| st.create_wall.as_secs_f64() / st.ctr_wall.as_secs_f64().max(1e-9);
    let create_ok = |st: &Step| st.added - st.create_failed;
    row(
        "bots created in this step",
        &|st| st.added.to_string(),
        "-",
        "-",
    );
    row(
        "agent `CreateBot` at concurrency 8, bots/s",
        &|st| format!("{:.2}", rate(create_ok(st), st.create_wall)),
        "-",
        "-",
    );
    row(
        "`ctr run -d --null-io` at concurrency 8 (baseline), containers/s",
        &|st| format!("{:.2}", rate(st.added, st.ctr_wall)),
        "-",
        "-",
    );
    row(
        "creation time, agent / baseline",
        &|st| format!("{:.2}x", ratio(st)),
        "<= 1.2x",
        yes_no(steps.iter().all(|st| ratio(st) <= CREATE_RATIO_TARGET)),
    );
    row(
        "machine CPU per container created: baseline / agent, core-ms",
        &|st| {
            format!(
                "{:.0} / {:.0}",
                per_bot_ms(st.ctr_cpu, st),
                per_bot_ms(st.create_cpu, st)
            )
        },
        "-",
        "-",
    );
    row(
        "of the agent's: the agent itself / its children (CNI plugins, iptables, nft), core-ms per bot",
        &|st| {
            format!(
                "{:.0} / {:.0}",
                per_bot_ms(st.create_agent_cpu, st),
                per_bot_ms(st.create_child_cpu, st)
            )
        },
        "-",
        "-",
    );
    row(
        "`CreateBot` latency p50 / p99",
        &|st| {
            if st.create_lat.is_empty() {
                "-".into()
            } else {
                format!(
                    "{} / {}",
                    ms(percentile(&st.create_lat, 50)),
                    ms(percentile(&st.create_lat, 99))
                )
            }
        },
        "-",
        "-",
    );
    row(
        "failed creations",
        &|st| st.create_failed.to_string(),
        "0",
        yes_no(steps.iter().all(|st| st.create_failed == 0)),
    );
    row(
        "agent VmRSS (peak of the step)",
        &|st| mib(st.agent_rss),
        "<= 100 MiB at 100 bots",
        yes_no(
            steps
                .last()
                .is_some_and(|st| st.agent_rss as f64 / 1024.0 <= AGENT_RSS_TARGET_MIB),
        ),
    );
    row(
        "agent threads / open fds",
        &|st| format!("{} / {}", st.agent_threads, st.agent_fds),
        "-",
        "-",
    );
    row(
        &format!(
            "agent CPU while idle ({} s): own + children (CNI, iptables), % of one core",
            steps.first().map_or(0, |st| st.idle.as_secs())
        ),
        &|st| {
            let secs = st.idle.as_secs_f64().max(1e-9);
            format!(
                "{:.1} % + {:.1} %",
                st.idle_cpu * 100.0 / secs,
                st.idle_child_cpu * 100.0 / secs
            )
        },
        "-",
        "-",
    );
    row(
        "host: kernel tasks / MemAvailable after the creates",
        &|st| format!("{} / {}", st.host_tasks, mib(st.mem_available)),
        "-",
        "-",
    );
    row(
        "bots running (from `ListBots`)",
        &|st| st.running.to_string(),
        "all",
        yes_no(steps.iter().all(|st| st.running == st.bots)),
    );
    row(
        "container-server VmRSS, sum over bots (per bot)",
        &|st| {
            format!(
                "{} ({})",
                mib(st.servers_rss),
                mib(st.servers_rss / st.running.max(1) as u64)
            )
        },
        "-",
        "-",
    );
    row(
        "runc shims' VmRSS, sum over distinct shims (shims)",
        &|st| format!("{} ({})", mib(st.shims_rss), st.shims),
        "-",
        "-",
    );
    row(
        "container-server Pss, sum (per bot)",
        &|st| {
            format!(
                "{} ({})",
                mib(st.servers_pss),
                mib(st.servers_pss / st.running.max(1) as u64)
            )
        },
        "-",
        "-",
    );
    row(
        "shims' Pss, sum (per bot)",
        &|st| {
            format!(
                "{} ({})",
                mib(st.shims_pss),
                mib(st.shims_pss / st.running.max(1) as u64)
            )
        },
        "-",
        "-",
    );
    row(
        "log drivers' Pss (the shims' other children), sum (processes)",
        &|st| format!("{} ({})", mib(st.drivers_pss), st.drivers),
        "-",
        "-",
    );
    let per_bot = |st: &Step| {
        (st.servers_pss + st.shims_pss + st.drivers_pss + st.agent_pss) as f64
            / 1024.0
            / st.running.max(1) as f64
    };
    row(
        "host memory per bot: (servers + shims + log drivers + agent) Pss / bots",
        &|st| format!("{:.1} MiB", per_bot(st)),
        "<= 12 MiB",
        yes_no(
            steps
                .last()
                .is_some_and(|st| per_bot(st) <= BOT_MEMORY_TARGET_MIB),
        ),
    );
    row(
        &format!("exec `true` through the proxy at concurrency 64, calls/s ({calls} calls)"),
        &|st| format!("{:.0}", rate(st.exec_lat.len(), st.exec_wall)),
        "-",
        "-",
    );
    let exec_rate = |st: &Step| rate(st.exec_lat.len(), st.exec_wall);
    let first_rate = steps.first().map_or(0.0, exec_rate);
    row(
        "exec calls/s over the first step's",
        &|st| format!("{:.2}x", exec_rate(st) / first_rate.max(1e-9)),
        ">= 0.8x",
        yes_no(
            steps
                .last()
                .is_some_and(|st| exec_rate(st) >= EXEC_SCALE_TARGET * first_rate),
        ),
    );
    row(
        "exec latency p50 / p99",
        &|st| {
            if st.exec_lat.is_empty() {
                "-".into()
            } else {
                format!(
                    "{} / {}",
                    ms(percentile(&st.exec_lat, 50)),
                    ms(percentile(&st.exec_lat, 99))
                )
            }
        },
        "-",
        "-",
    );
    row(
        "failed exec calls (incl. one warm-up call per bot)",
        &|st| format!("{} of {}", st.exec_failed, st.calls + st.warmup),
        "0",
        yes_no(steps.iter().all(|st| st.exec_failed == 0)),
    );
    let max = steps.last().map_or(0, |st| st.bots);
    s.push_str(&format!(
        "| delete all {max} bots through the agent at concurrency 8 | {:.2} bots/s ({} deleted, \
         {} failed); agent VmRSS afterwards {} |{} 0 failed | {} |\n",
        rate(td.deleted, td.wall),
        td.deleted,
        td.delete_failed,
        mib(td.agent_rss_after),
        " |".repeat(steps.len().saturating_sub(1)),
        yes_no(td.delete_failed == 0),
    ));
    s.push_str(&format!(
        "| leftovers after delete (containers, tasks, snapshots, netns, IPAM, state; ctr \
         baseline namespace) | {} |{} none | {} |\n",
        if td.leftovers.is_empty() && td.ctr_left.is_empty() {
            "none".to_string()
        } else {
            format!("{:?} {:?}", td.leftovers, td.ctr_left)
        },
        " |".repeat(steps.len().saturating_sub(1)),
        yes_no(td.leftovers.is_empty() && td.ctr_left.is_empty()),
    ));
    s
}

fn section(env: &Env, steps: &[usize], calls: usize, results: &[Step], td: &Teardown) -> String {
    let idle = results.first().map_or(0, |s| s.idle.as_secs());
    let machine = common::Machine::now();
    let names = steps
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut errors: Vec<String> = results
        .iter()
        .flat_map(|s| {
            s.errors
                .iter()
                .map(move |e| format!("{} bots: {e}", s.bots))
        })
        .collect();
    errors.extend(td.errors.iter().cloned());
    let errors = if errors.is_empty() {
        String::new()
    } else {
        format!(
            "\nErrors seen (first of each step):\n\n{}\n",
            errors
                .iter()
                .map(|e| format!("- `{e}`\n"))
                .collect::<String>()
        )
    };
    format!(
        "\n## Load: {names} bots ({date})\n\n\
         Machine: {described} (private instance, socket {sock}); the cores were shared with \
         other work, load average at the end {load}. Release build of `memoh-agent`, `cargo \
         bench -p memoh-agent --bench load` (`agent/benches/load.rs`). One agent (MCP endpoint off) grows to {names} bots; each \
         step creates the additional bots through `CreateBot` on the control API at \
         concurrency 8 (the call returns once the bot's server answers its health check), \
         after the baseline started the same number of `ctr run -d --null-io` containers of \
         the same image at concurrency 8 in a namespace of its own (no network, no health \
         check; they run beside the bots of the earlier steps and are removed before the \
         agent creates its bots, so both meet the same host). Then RSS is read \
         from `/proc/PID/status` (agent: the higher of before and after the exec load; bots: \
         each task's pid from `ListBots`, its parent is the shim), the agent's CPU time (its \
         own and its reaped children's, from `/proc/PID/stat`) is taken over an idle window \
         of {idle} s, and {calls} exec calls of `true` are spread round-robin over all bots \
         through the agent's socket \
         (`ContainerClient` with `x-memoh-bot`, one HTTP/2 connection, concurrency 64) after \
         one warm-up call per bot. The bench client runs on the same 2 cores.\n\n{table}{errors}",
        date = machine.date,
        described = machine.describe(),
        sock = env.sock.display(),
        load = common::load_average(),
        table = table(results, calls, td),
    )
}
