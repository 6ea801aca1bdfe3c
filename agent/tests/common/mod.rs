//! Harness shared by the agent's system tests and its benchmark: the test environment and
//! [`TestAgent`], a guard that runs the real `memoh-agent serve` on a private configuration
//! (its own containerd namespace, CNI network, bridge, /24 subnet and temp dirs) and removes
//! everything that agent made when it goes out of scope, also when the test panicked: bots,
//! the agent process, the bridge, the bots' namespaces, its iptables rules, images, content,
//! snapshots and the containerd namespace itself.
//!
//! Everything here is synchronous: the CLI is a process, and containerd is queried on a
//! runtime of the helper's own. Don't call these helpers from inside a tokio runtime.

#![allow(dead_code)]

pub mod ctrd;
pub mod limits;
pub mod soak;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::{
    content_client::ContentClient, leases_client::LeasesClient,
    namespaces_client::NamespacesClient, snapshots::snapshots_client::SnapshotsClient,
    snapshots::ListSnapshotsRequest, tasks_client::TasksClient, DeleteContentRequest,
    DeleteNamespaceRequest, DeleteRequest as DeleteLeaseRequest, ListContentRequest,
    ListRequest as ListLeasesRequest, ListTasksRequest,
};
use futures::StreamExt;
use memoh_agent::containerd::{label_filter, prelude::*, Containerd, LABEL_BOT_ID};

/// The agent binary under test (the release build under `cargo bench`).
pub const AGENT: &str = env!("CARGO_BIN_EXE_memoh-agent");

/// The agent binary the guards run: `MEMOH_TEST_AGENT_BIN` when set (a benchmark alternating
/// an older build with this one), [`AGENT`] otherwise.
pub fn agent_binary() -> PathBuf {
    var("MEMOH_TEST_AGENT_BIN").map_or_else(|| PathBuf::from(AGENT), PathBuf::from)
}
/// The image name the test archive carries.
pub const IMAGE: &str = "docker.io/memohai/mcp:latest";
/// The production isolation chain the agent adds its bridge's rule to.
pub const ISOLATION_CHAIN: &str = "MEMOH-ISOLATION";
/// The comment of the agent's MASQUERADE rule.
pub const MASQ_COMMENT: &str = "memoh-masq";
/// The longest a CLI call may take before the test calls it hung.
pub const CLI_LIMIT: Duration = Duration::from_secs(90);

/// What `scripts/test-env.sh env` exports.
#[derive(Debug, Clone)]
pub struct Env {
    /// The private containerd's socket.
    pub sock: PathBuf,
    /// The test image archive (`scripts/build-image.sh`).
    pub tar: PathBuf,
    /// The loopback registry, `127.0.0.1:PORT`.
    pub registry: Option<String>,
    /// runc's state dir for `ctr run`.
    pub runc_root: Option<PathBuf>,
    /// ctr's FIFO dir.
    pub fifo_dir: Option<PathBuf>,
}

fn var(k: &str) -> Option<String> {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty() && v != "127.0.0.1:UNSET")
}

impl Env {
    /// The environment, or `None` after printing why it is missing; under `CI` a missing
    /// environment is a failure, never a skip.
    pub fn get(need_registry: bool) -> Option<Env> {
        let sock = var("MEMOH_TEST_CONTAINERD_SOCK");
        let tar = var("MEMOH_TEST_IMAGE_TAR");
        let registry = var("MEMOH_TEST_REGISTRY");
        let problem = match (&sock, &tar, &registry) {
            (None, _, _) => Some("MEMOH_TEST_CONTAINERD_SOCK is not set".to_string()),
            (_, None, _) => Some("MEMOH_TEST_IMAGE_TAR is not set".to_string()),
            (_, Some(t), _) if !Path::new(t).is_file() => Some(format!(
                "image archive {t} does not exist (scripts/build-image.sh)"
            )),
            (Some(s), _, _) if !Path::new(s).exists() => Some(format!(
                "containerd socket {s} does not exist (scripts/test-env.sh up)"
            )),
            (_, _, None) if need_registry => Some("MEMOH_TEST_REGISTRY is not set".to_string()),
            _ => None,
        };
        if let Some(p) = problem {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "agent system tests need their environment in CI: {p}; run \
                     scripts/build-image.sh, scripts/test-env.sh up and \
                     eval \"$(scripts/test-env.sh env)\""
                );
            }
            println!("skipped: {p}");
            return None;
        }
        Some(Env {
            sock: sock.unwrap().into(),
            tar: tar.unwrap().into(),
            registry,
            runc_root: var("MEMOH_TEST_RUNC_ROOT").map(PathBuf::from),
            fifo_dir: var("MEMOH_TEST_FIFO_DIR").map(PathBuf::from),
        })
    }
}

/// The container-server binary the agents under test bind into their bots: the one the test
/// image was built from (`scripts/build-image.sh --binary target/debug/container-server`), or
/// `MEMOH_TEST_SERVER_BIN`.
pub fn server_binary() -> PathBuf {
    if let Some(p) = var("MEMOH_TEST_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let beside_agent = Path::new(AGENT).with_file_name("container-server");
    if beside_agent.is_file() {
        return beside_agent;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/container-server")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SUBNETS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Serialises the teardown of the shared isolation chain between guards of this process.
static CHAIN_LOCK: Mutex<()> = Mutex::new(());

/// Tags this process has handed out: two guards made at the same moment by parallel tests once
/// got the same one (the mix below is not injective), and so one bridge for two subnets.
static TAGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Four hex digits that differ between guards (never the same twice in one process) and, very
/// likely, between runs.
pub fn tag() -> String {
    let mut taken = TAGS.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let n = nanos ^ (std::process::id() << 7) ^ (COUNTER.fetch_add(1, Ordering::SeqCst) * 7919);
        let t = format!("{:04x}", n & 0xffff);
        if !taken.contains(&t) {
            taken.push(t.clone());
            return t;
        }
    }
}

/// Runs a host tool; panics only when it cannot be started.
pub fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// Runs `cmd` to completion with `input` on its stdin (none: /dev/null); kills it and panics
/// after `limit`.
pub fn output_within(cmd: Command, input: Option<Vec<u8>>, limit: Duration) -> Output {
    try_output_within(cmd, input, limit).unwrap_or_else(|e| panic!("{e}"))
}

/// [`output_within`] that reports instead of panicking (for clean-up paths).
pub fn try_output_within(
    mut cmd: Command,
    input: Option<Vec<u8>>,
    limit: Duration,
) -> Result<Output, String> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    if let Some(data) = input {
        if let Some(mut stdin) = child.stdin.take() {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
    }
    let pid = child.id() as i32;
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(limit).is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return true;
        }
        false
    });
    let out = child.wait_with_output().map_err(|e| format!("{what}: {e}"));
    let _ = done.send(());
    if watchdog.join().unwrap_or(true) {
        return Err(format!("{what} did not finish within {limit:?}"));
    }
    out
}

/// A runtime for one containerd call from synchronous code.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Reads a file the agent keeps, empty when missing.
pub fn read_string(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A real agent on a private configuration; see the module docs.
pub struct TestAgent {
    /// The environment.
    pub env: Env,
    /// Config, sockets, CNI conf, IPAM, state and data live here.
    pub dir: tempfile::TempDir,
    /// Distinguishes this guard's names.
    pub tag: String,
    /// containerd namespace.
    pub namespace: String,
    /// CNI network name.
    pub network: String,
    /// Bridge the CNI plugin creates.
    pub bridge: String,
    /// The bots' subnet, `10.2xx.y.0/24` (or `/22`, see [`TestAgent::wide`]).
    pub subnet: String,
    /// The first three octets of its network address, `10.2xx.y` (the gateway is `.1`).
    pub prefix: String,
    /// The subnet's prefix length, 24 or 22.
    pub subnet_len: u8,
    /// The config file.
    pub config: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// The agent's state dir.
    pub state_dir: PathBuf,
    /// host-local IPAM's dataDir (entries in `<ipam_dir>/<network>`).
    pub ipam_dir: PathBuf,
    /// Extra environment for the next `serve` (e.g. a fault hook); empty by default.
    pub serve_env: Vec<(String, String)>,
    /// A named network namespace (`/run/netns/NAME`, made by the caller) to run `serve` in;
    /// `None` runs it in the host's. The agent's bridge, iptables rules and CNI host side then
    /// live in that namespace, and this guard's host-side checks and clean-up run there too.
    pub netns: Option<String>,
    child: Option<Child>,
    served: bool,
    bots: Vec<String>,
}

impl TestAgent {
    /// A guard with a fresh configuration (`extra` is appended to the TOML); not started.
    pub fn new(env: &Env, extra: &str) -> Self {
        Self::with_subnet(env, extra, 24)
    }

    /// Like [`TestAgent::new`] with a `/22` (1 022 addresses) for more than 250 bots.
    pub fn wide(env: &Env, extra: &str) -> Self {
        Self::with_subnet(env, extra, 22)
    }

    fn with_subnet(env: &Env, extra: &str, subnet_len: u8) -> Self {
        let tag = tag();
        let (prefix, subnet) = free_subnet(&tag, subnet_len);
        let dir = tempfile::Builder::new()
            .prefix("memoh-e2e-")
            .tempdir()
            .unwrap();
        let namespace = format!("memoh-e2e-{tag}");
        let network = format!("memoh-e2e-{tag}");
        let bridge = format!("mte{tag}");
        let socket = dir.path().join("agent.sock");
        let state_dir = dir.path().join("state");
        let ipam_dir = dir.path().join("ipam");
        let config = dir.path().join("agent.toml");
        let text = format!(
            "containerd_socket = {sock:?}\n\
             namespace = {namespace:?}\n\
             cni_conf_dir = {conf:?}\n\
             cni_network = {network:?}\n\
             cni_bridge = {bridge:?}\n\
             cni_subnet = {subnet:?}\n\
             cni_ipam_dir = {ipam:?}\n\
             state_dir = {state:?}\n\
             data_root = {data:?}\n\
             control_socket = {socket:?}\n\
             {server}\
             {mcp}\
             {extra}\n",
            // The server every bot runs, from the host (a test may set its own).
            server = if extra.contains("server_binary") {
                String::new()
            } else {
                format!(
                    "server_binary = {:?}\n",
                    server_binary().display().to_string()
                )
            },
            // MCP off unless the test asks: agents of parallel tests must not race for 8091.
            mcp = if extra.contains("mcp_listen") {
                ""
            } else {
                "mcp_listen = \"\"\n"
            },
            sock = env.sock.display().to_string(),
            conf = dir.path().join("cni").display().to_string(),
            ipam = ipam_dir.display().to_string(),
            state = state_dir.display().to_string(),
            data = dir.path().join("data").display().to_string(),
            socket = socket.display().to_string(),
        );
        std::fs::write(&config, text).unwrap();
        Self {
            env: env.clone(),
            dir,
            tag,
            namespace,
            network,
            bridge,
            subnet,
            prefix,
            subnet_len,
            config,
            socket,
            state_dir,
            ipam_dir,
            serve_env: Vec::new(),
            netns: None,
            child: None,
            served: false,
            bots: Vec::new(),
        }
    }

    /// A guard with a running agent.
    pub fn start(env: &Env) -> Self {
        let mut a = Self::new(env, "");
        a.serve();
        a
    }

    /// A guard with a running agent that has the test image.
    pub fn with_image(env: &Env) -> Self {
        let a = Self::start(env);
        let out = a.ok(&["image", "import", &env.tar.display().to_string()]);
        assert!(out.contains(IMAGE), "import printed {out:?}");
        a
    }

    /// The configured `data_root` (legacy bot data lives in `<data_root>/bots/<bot>`).
    pub fn data_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The agent's log file (both runs, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// A `serve` process on this guard's config (in [`TestAgent::netns`] when set), its output
    /// appended to the log; `MEMOH_TEST_AGENT_LOG` replaces its log filter (e.g. `info,h2=debug`
    /// to see every HTTP/2 frame).
    pub fn spawn_serve(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(agent_binary());
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .env(
                "MEMOH_LOG",
                var("MEMOH_TEST_AGENT_LOG").unwrap_or_else(|| "info,memoh_agent=debug".into()),
            )
            .envs(self.serve_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Kept open until the child has entered it.
        let ns_file = self.netns.as_ref().map(|ns| {
            std::fs::File::open(Path::new("/run/netns").join(ns))
                .unwrap_or_else(|e| panic!("network namespace {ns}: {e}"))
        });
        if let Some(f) = &ns_file {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = f.as_raw_fd();
            // SAFETY: the hook only makes raw system calls (setns, unshare, mount), which are
            // async-signal-safe, and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(move || enter_netns_with_sysfs(fd));
            }
        }
        let child = cmd.spawn().expect("spawn memoh-agent serve");
        drop(ns_file);
        child
    }

    /// Starts the agent and waits until it answers on its socket.
    pub fn serve(&mut self) {
        if let Err(e) = self.try_serve(Duration::from_secs(60)) {
            panic!("{e}");
        }
    }

    /// Starts the agent and waits up to `limit` until `bot ls` answers; reports instead of
    /// panicking (for fault injectors).
    pub fn try_serve(&mut self, limit: Duration) -> Result<(), String> {
        if self.running() {
            return Err("the agent already runs".into());
        }
        self.child = Some(self.spawn_serve());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap_or(None) {
                self.child = None;
                return Err(format!(
                    "memoh-agent serve exited with {status} before answering:\n{}",
                    self.log_tail(40)
                ));
            }
            if self.socket.exists()
                && self
                    .try_cli(&["bot", "ls"])
                    .is_ok_and(|o| o.status.success())
            {
                self.served = true;
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "the agent did not answer within {limit:?}:\n{}",
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a host tool in this guard's network namespace (the host's when none is set).
    pub fn net_sh(&self, program: &str, args: &[&str]) -> Output {
        match &self.netns {
            None => sh(program, args),
            Some(ns) => {
                let mut v = vec!["netns", "exec", ns.as_str(), program];
                v.extend_from_slice(args);
                sh("ip", &v)
            }
        }
    }

    /// Whether the agent process runs.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` to the agent and reaps it (SIGKILL after 15 s).
    pub fn kill(&mut self, sig: nix::sys::signal::Signal) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
        let start = Instant::now();
        while c.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(15) {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = read_string(&self.log_path());
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// A CLI command against this agent's socket.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(agent_binary());
        c.arg("--socket").arg(&self.socket).args(args);
        c.env_remove("MEMOH_LOG");
        c
    }

    /// Runs the CLI (stdin from /dev/null).
    pub fn cli(&self, args: &[&str]) -> Output {
        output_within(self.command(args), None, CLI_LIMIT)
    }

    /// Runs the CLI, reporting a hang instead of panicking.
    pub fn try_cli(&self, args: &[&str]) -> Result<Output, String> {
        try_output_within(self.command(args), None, CLI_LIMIT)
    }

    /// Runs the CLI with `input` on its stdin.
    pub fn cli_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        output_within(self.command(args), Some(input.to_vec()), CLI_LIMIT)
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "memoh-agent {args:?} failed ({}): {}\nagent log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI, asserts a non-zero exit with exactly one line on stderr; returns it.
    pub fn fails(&self, args: &[&str]) -> String {
        one_line_failure(&format!("memoh-agent {args:?}"), &self.cli(args))
    }

    /// A bot id owned by this guard (deleted and its namespace removed on drop).
    pub fn bot_id(&mut self, name: &str) -> String {
        let bot = format!("e{}{name}", self.tag);
        if !self.bots.contains(&bot) {
            self.bots.push(bot.clone());
        }
        bot
    }

    /// Creates bot `name` (a guard-owned id) from the default image; returns its id and IP.
    pub fn create_bot(&mut self, name: &str) -> (String, String) {
        let bot = self.bot_id(name);
        let out = self.ok(&["bot", "create", &bot]);
        let fields: Vec<_> = out.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "bot create printed {out:?}");
        assert_eq!(fields[0], bot);
        assert_eq!(fields[1], "running", "bot create printed {out:?}");
        let ip = fields[2].to_string();
        assert!(self.holds(&ip), "{ip} is not in {}", self.subnet);
        (bot, ip)
    }

    /// Whether IPv4 address `ip` is in the bots' subnet.
    pub fn holds(&self, ip: &str) -> bool {
        let (Ok(ip), Ok(net)) = (
            ip.parse::<std::net::Ipv4Addr>(),
            format!("{}.0", self.prefix).parse::<std::net::Ipv4Addr>(),
        ) else {
            return false;
        };
        let mask = u32::MAX << (32 - u32::from(self.subnet_len));
        u32::from(ip) & mask == u32::from(net) & mask
    }

    /// `bot inspect` as JSON.
    pub fn inspect(&self, bot: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["bot", "inspect", bot])).expect("inspect prints JSON")
    }

    /// `bot ls --json`.
    pub fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["bot", "ls", "--json"])).expect("ls --json prints JSON")
    }

    /// Runs `sh -c script` in `bot`; returns stdout, asserting exit 0.
    pub fn sh_in(&self, bot: &str, script: &str) -> String {
        self.ok(&["exec", bot, "--", "sh", "-c", script])
    }

    /// The bot's token file.
    pub fn token_path(&self, bot: &str) -> PathBuf {
        self.state_dir.join("bots").join(bot).join("token")
    }

    /// host-local's reservations in this network: (address, owner container id).
    pub fn ipam_entries(&self) -> Vec<(IpAddr, String)> {
        let Ok(entries) = std::fs::read_dir(self.ipam_dir.join(&self.network)) else {
            return Vec::new();
        };
        let mut v: Vec<_> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let ip: IpAddr = e.file_name().to_str()?.parse().ok()?;
                let owner = read_string(&e.path());
                let owner = owner.lines().next().unwrap_or_default().trim().to_string();
                Some((ip, owner))
            })
            .collect();
        v.sort();
        v
    }

    /// The gateway: the bridge's address.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// The MASQUERADE rule's spec for this guard's subnet (after `-t nat -X POSTROUTING`).
    pub fn masq_rule(&self) -> Vec<String> {
        [
            "-s",
            &self.subnet,
            "!",
            "-d",
            &self.subnet,
            "-m",
            "comment",
            "--comment",
            MASQ_COMMENT,
            "-j",
            "MASQUERADE",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Whether the agent's MASQUERADE rule for this subnet is in nat POSTROUTING.
    pub fn masq_present(&self) -> bool {
        let mut args = vec!["-w", "5", "-t", "nat", "-C", "POSTROUTING"];
        let rule = self.masq_rule();
        args.extend(rule.iter().map(String::as_str));
        self.net_sh("iptables", &args).status.success()
    }

    /// Deletes that rule (only that rule); returns whether one was deleted.
    pub fn delete_masq(&self) -> bool {
        let mut args = vec!["-w", "5", "-t", "nat", "-D", "POSTROUTING"];
        let rule = self.masq_rule();
        args.extend(rule.iter().map(String::as_str));
        self.net_sh("iptables", &args).status.success()
    }

    /// A client of this guard's containerd namespace (call inside [`block_on`]).
    pub async fn containerd(&self) -> Containerd {
        Containerd::connect(
            &self.env.sock,
            &self.namespace,
            "overlayfs",
            "io.containerd.runc.v2",
        )
        .await
        .expect("connect to the private containerd")
    }

    /// What containerd and the host still hold of `bot`; empty when it is gone for good.
    pub fn leftovers(&self, bot: &str) -> Vec<String> {
        let cid = format!("mcp-{bot}");
        let mut left = block_on(async {
            let c = self.containerd().await;
            let mut left = Vec::new();
            for ct in c.list_containers(&[]).await.unwrap() {
                if ct.id == cid || ct.labels.get(LABEL_BOT_ID).map(String::as_str) == Some(bot) {
                    left.push(format!("container {}", ct.id));
                }
            }
            for t in list_tasks(&c, &self.namespace).await {
                if t == cid {
                    left.push(format!("task {t}"));
                }
            }
            let labelled = c
                .list_snapshots(&[label_filter(LABEL_BOT_ID, Some(bot))])
                .await
                .unwrap();
            left.extend(labelled.iter().map(|s| format!("snapshot {}", s.name)));
            if c.stat_snapshot(&cid).await.unwrap().is_some() {
                left.push(format!("snapshot {cid}"));
            }
            left
        });
        let netns = memoh_agent::ids::netns_name(&self.namespace, bot);
        let listing = String::from_utf8_lossy(&sh("ip", &["netns", "list"]).stdout).into_owned();
        if listing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&netns))
        {
            left.push(format!("netns {netns}"));
        }
        for (ip, owner) in self.ipam_entries() {
            if owner == cid {
                left.push(format!("ipam entry {ip}"));
            }
        }
        for p in [
            self.state_dir.join("cni").join(format!("{bot}.json")),
            self.state_dir.join("bots").join(bot),
        ] {
            if p.exists() {
                left.push(format!("state {}", p.display()));
            }
        }
        left
    }

    /// Waits until `cond` holds, polling; panics with `what` after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}\nagent log:\n{}",
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn teardown(&mut self) {
        // Bots through the agent (restarted if a test left it down), so its own delete path runs.
        self.serve_env.clear();
        if !self.running() && self.served {
            self.child = Some(self.spawn_serve());
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20)
                && !self
                    .try_cli(&["bot", "ls"])
                    .is_ok_and(|o| o.status.success())
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if self.running() {
            let mut bots = self.bots.clone();
            if let Ok(out) = self.try_cli(&["bot", "ls", "--json"]) {
                if let Ok(v) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) {
                    bots.extend(
                        v.iter()
                            .filter_map(|b| b["bot_id"].as_str().map(String::from)),
                    );
                }
            }
            let mut seen = HashSet::new();
            for bot in bots.into_iter().filter(|b| seen.insert(b.clone())) {
                if let Err(e) = self.try_cli(&["bot", "rm", &bot]) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
        self.kill(nix::sys::signal::Signal::SIGTERM);
        // Whatever is left in the namespace, then the namespace.
        let (sock, ns) = (self.env.sock.clone(), self.namespace.clone());
        let cleaned = std::thread::spawn(move || block_on(clean_namespace(&sock, &ns)))
            .join()
            .unwrap_or_else(|_| Err("cleanup panicked".into()));
        if let Err(e) = cleaned {
            eprintln!("cleanup of containerd namespace {}: {e}", self.namespace);
        }
        for bot in &self.bots {
            let ns = memoh_agent::ids::netns_name(&self.namespace, bot);
            if Path::new("/run/netns").join(&ns).exists() {
                let _ = sh("ip", &["netns", "delete", &ns]);
            }
        }
        if self.netns.is_some() {
            let _ = self.net_sh("ip", &["link", "delete", &self.bridge]);
        } else if Path::new("/sys/class/net").join(&self.bridge).exists() {
            let _ = sh("ip", &["link", "delete", &self.bridge]);
        }
        while self.delete_masq() {}
        self.remove_cni_masq();
        self.remove_isolation();
        // The agent's containment tables (named after its namespace, so only this guard's).
        for family in ["bridge", "inet"] {
            let table = memoh_agent::ids::table_name(&self.namespace);
            let _ = self.net_sh("nft", &["delete", "table", family, &table]);
        }
        SUBNETS.lock().unwrap().retain(|s| *s != self.subnet);
    }

    /// The bridge plugin's per-container masquerade rules and chains of this network.
    fn remove_cni_masq(&self) {
        let quoted = format!("name: \\\"{}\\\"", self.network);
        let listing = String::from_utf8_lossy(
            &self
                .net_sh("iptables", &["-w", "5", "-t", "nat", "-S"])
                .stdout,
        )
        .into_owned();
        for rule in listing.lines().filter(|l| l.contains(&quoted)) {
            let Some(spec) = rule.strip_prefix("-A ") else {
                continue;
            };
            let _ = self.net_sh("sh", &["-c", &format!("iptables -w 5 -t nat -D {spec}")]);
            if let Some(chain) = spec
                .split_whitespace()
                .last()
                .filter(|c| c.starts_with("CNI-"))
            {
                let _ = self.net_sh("iptables", &["-w", "5", "-t", "nat", "-F", chain]);
                let _ = self.net_sh("iptables", &["-w", "5", "-t", "nat", "-X", chain]);
            }
        }
    }

    /// This bridge's rule in the shared isolation chain; the chain and its jump only when
    /// nothing else is left in it (put back if another agent added a rule meanwhile).
    fn remove_isolation(&self) {
        let _g = CHAIN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let rule = ["-i", &self.bridge, "-o", &self.bridge, "-j", "DROP"];
        loop {
            let mut args = vec!["-w", "5", "-D", ISOLATION_CHAIN];
            args.extend_from_slice(&rule);
            if !self.net_sh("iptables", &args).status.success() {
                break;
            }
        }
        let listing = self.net_sh("iptables", &["-w", "5", "-S", ISOLATION_CHAIN]);
        if !listing.status.success() {
            return;
        }
        let empty = !String::from_utf8_lossy(&listing.stdout)
            .lines()
            .any(|l| l.starts_with("-A "));
        if !empty {
            return;
        }
        let mut jumps = 0;
        while self
            .net_sh(
                "iptables",
                &["-w", "5", "-D", "FORWARD", "-j", ISOLATION_CHAIN],
            )
            .status
            .success()
        {
            jumps += 1;
        }
        if !self
            .net_sh("iptables", &["-w", "5", "-X", ISOLATION_CHAIN])
            .status
            .success()
            && jumps > 0
        {
            // Someone added a rule between the listing and here: keep their isolation.
            let _ = self.net_sh(
                "iptables",
                &["-w", "5", "-I", "FORWARD", "1", "-j", ISOLATION_CHAIN],
            );
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}\n---",
                self.namespace,
                self.log_tail(80)
            );
        }
        self.teardown();
    }
}

/// Asserts `out` is a failure with exactly one line on stderr; returns that line.
pub fn one_line_failure(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} should fail; stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one stderr line, got {stderr:?}"
    );
    lines[0].to_string()
}

/// A /24 in 10.200-249.x.0 that no route on the host and no other guard of this process uses.
fn free_subnet(tag: &str, len: u8) -> (String, String) {
    assert!(len == 24 || len == 22, "a /24 or a /22");
    // A /22 spans four third octets from a multiple of four.
    let span = 1u32 << (24 - len);
    let routes = String::from_utf8_lossy(&sh("ip", &["-4", "route", "show"]).stdout).into_owned();
    // Every destination the host routes (`default` is not one of ours to avoid).
    let routed: Vec<(u32, u32)> = routes
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(cidr)
        .filter(|&(_, len)| len > 0)
        .collect();
    let seed = u32::from_str_radix(tag, 16).unwrap();
    let mut taken = SUBNETS.lock().unwrap();
    for i in 0..5000u32 {
        let n = seed.wrapping_mul(2654435761).wrapping_add(i * 7);
        let second = 200 + (n % 50);
        let third = (100 + ((n / 50) % 150)) / span * span;
        let prefix = format!("10.{second}.{third}");
        let subnet = format!("{prefix}.0/{len}");
        let mine = cidr(&subnet).expect("a subnet");
        let overlaps = |other: (u32, u32)| {
            let mask = u32::MAX << (32 - mine.1.min(other.1));
            mine.0 & mask == other.0 & mask
        };
        if routed.iter().copied().any(overlaps)
            || taken.iter().filter_map(|s| cidr(s)).any(overlaps)
        {
            continue;
        }
        taken.push(subnet.clone());
        return (prefix, subnet);
    }
    panic!("no free 10.2xx.y.0/{len} subnet");
}

/// `a.b.c.d/len` or a bare address (a /32) as (address, prefix length).
fn cidr(s: &str) -> Option<(u32, u32)> {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((u32::from(addr.parse::<std::net::Ipv4Addr>().ok()?), len))
}

/// Task ids in namespace `ns`.
pub async fn list_tasks(c: &Containerd, ns: &str) -> Vec<String> {
    TasksClient::new(c.channel())
        .list(md(ns, ListTasksRequest::default()))
        .await
        .map(|r| r.into_inner().tasks)
        .unwrap_or_default()
        .into_iter()
        // containerd 1.6 fills `id` and leaves `container_id` empty.
        .map(|t| {
            if t.id.is_empty() {
                t.container_id
            } else {
                t.id
            }
        })
        .collect()
}

/// A request carrying namespace `ns`.
fn md<T>(ns: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", ns.parse().unwrap());
    r
}

/// Removes tasks, containers, images, leases, snapshots and content of `ns`, then `ns`.
pub async fn clean_namespace(sock: &Path, ns: &str) -> Result<(), String> {
    let c = Containerd::connect(sock, ns, "overlayfs", "io.containerd.runc.v2")
        .await
        .map_err(|e| e.to_string())?;
    let ch = c.channel();
    for t in list_tasks(&c, ns).await {
        let _ = c.kill_task(&t, 9, true).await;
        let _ = c.wait_task(&t, Duration::from_secs(10)).await;
        let _ = c.delete_task(&t).await;
    }
    for ct in c.list_containers(&[]).await.map_err(|e| e.to_string())? {
        let _ = c.delete_container(&ct.id).await;
    }
    for img in c.list_images().await.map_err(|e| e.to_string())? {
        let _ = c.delete_image(&img.name).await;
    }
    let leases = LeasesClient::new(ch.clone())
        .list(md(ns, ListLeasesRequest::default()))
        .await
        .map(|r| r.into_inner().leases)
        .unwrap_or_default();
    for l in leases {
        let _ = LeasesClient::new(ch.clone())
            .delete(md(
                ns,
                DeleteLeaseRequest {
                    id: l.id,
                    sync: true,
                },
            ))
            .await;
    }
    // Children before parents: retry while something goes away.
    for _ in 0..32 {
        let Ok(s) = SnapshotsClient::new(ch.clone())
            .list(md(
                ns,
                ListSnapshotsRequest {
                    snapshotter: "overlayfs".into(),
                    filters: vec![],
                },
            ))
            .await
        else {
            break;
        };
        let mut stream = s.into_inner();
        let mut names = Vec::new();
        while let Some(Ok(m)) = stream.next().await {
            names.extend(m.info.into_iter().map(|i| i.name));
        }
        if names.is_empty() {
            break;
        }
        for n in names {
            let _ = c.remove_snapshot(&n).await;
        }
    }
    if let Ok(s) = ContentClient::new(ch.clone())
        .list(md(ns, ListContentRequest::default()))
        .await
    {
        let mut stream = s.into_inner();
        let mut digests = Vec::new();
        while let Some(Ok(m)) = stream.next().await {
            digests.extend(m.info.into_iter().map(|i| i.digest));
        }
        for d in digests {
            let _ = ContentClient::new(ch.clone())
                .delete(md(ns, DeleteContentRequest { digest: d }))
                .await;
        }
    }
    match NamespacesClient::new(ch)
        .delete(tonic::Request::new(DeleteNamespaceRequest {
            name: ns.to_string(),
        }))
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(format!("delete namespace: {}", s.message())),
    }
}

/// Whether a TCP connection to `addr` opens within `limit`.
pub fn tcp_connects(addr: &str, limit: Duration) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    TcpStream::connect_timeout(&addr, limit).is_ok()
}

/// `n` bytes from the kernel's generator.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

/// The p-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    let idx = ((p * v.len()).div_ceil(100)).clamp(1, v.len()) - 1;
    v[idx]
}

/// The `pre_exec` hook of an agent run in a network namespace: enters the namespace behind `fd`
/// and a mount namespace of its own in which `/sys` shows that network namespace (the agent
/// reads its bridge there), as `ip netns exec` does, but keeps every other mount shared with
/// the host: the bots' namespaces the agent bind-mounts under `/run/netns` must reach
/// containerd, which `ip netns exec` (everything a slave) would not let happen.
fn enter_netns_with_sysfs(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let sys = c"/sys";
    // SAFETY: raw system calls on valid, NUL-terminated constant strings and an open fd.
    unsafe {
        check(libc::setns(fd, libc::CLONE_NEWNET))?;
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // This copy of /sys only: nothing mounted on it may propagate to the host.
        check(libc::mount(
            std::ptr::null(),
            sys.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"sysfs".as_ptr(),
            sys.as_ptr(),
            c"sysfs".as_ptr(),
            0,
            std::ptr::null(),
        ))?;
    }
    Ok(())
}

/// The first line a host tool prints on stdout, trimmed; empty when it cannot run (for the
/// machine line of benchmark reports).
pub fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The CPU model from `/proc/cpuinfo`, or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

/// The header `BENCHMARKS.md` starts with.
const BENCHMARKS_HEADER: &str = "# Benchmarks\n\nFigures from this repository's bench commands, \
     each section with its machine, its date and the baseline measured in the same run.\n";

/// `value`, or "unknown" when it is empty.
fn or_unknown(value: String) -> String {
    if value.is_empty() {
        "unknown".into()
    } else {
        value
    }
}

/// The machine a benchmark ran on, for the machine line of its `BENCHMARKS.md` section.
#[derive(Debug, Clone)]
pub struct Machine {
    /// When it was described, `YYYY-MM-DD HH:MM UTC` (`date -u`), or "unknown".
    pub date: String,
    /// The CPU model from `/proc/cpuinfo`, or "unknown".
    pub cpu: String,
    /// The cores this process may use (`available_parallelism`), 0 when unknown.
    pub cores: usize,
    /// `MemTotal` of `/proc/meminfo` in GiB, rounded; 0 when unknown.
    pub mem_gib: u64,
    /// `PRETTY_NAME` of `/etc/os-release`, or "unknown".
    pub os: String,
    /// The kernel release (`uname -r`), or "unknown".
    pub kernel: String,
    /// The first line of `containerd --version`, or "containerd unknown".
    pub containerd: String,
}

impl Machine {
    /// This machine, described now.
    pub fn now() -> Self {
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|k| k.parse::<u64>().ok())
            .unwrap_or(0);
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .unwrap_or_default()
            .trim()
            .trim_matches('"')
            .to_string();
        let containerd = first_line("containerd", &["--version"]);
        Self {
            date: or_unknown(first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])),
            cpu: cpu_model(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_gib: (mem_kib + (1 << 19)) >> 20,
            os: or_unknown(os),
            kernel: or_unknown(first_line("uname", &["-r"])),
            containerd: if containerd.is_empty() {
                "containerd unknown".into()
            } else {
                containerd
            },
        }
    }

    /// The machine in one phrase, the same wording for every bench: "CPU, N cores, M GiB RAM,
    /// OS, kernel K, containerd ...".
    pub fn describe(&self) -> String {
        let mem = if self.mem_gib == 0 {
            "unknown".to_string()
        } else {
            format!("{} GiB", self.mem_gib)
        };
        format!(
            "{}, {} cores, {mem} RAM, {}, kernel {}, {}",
            self.cpu, self.cores, self.os, self.kernel, self.containerd
        )
    }
}

/// The load average over 1, 5 and 15 minutes from `/proc/loadavg` ("0.52 0.61 0.70"), or
/// "unknown".
pub fn load_average() -> String {
    or_unknown(
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Appends `section` to `BENCHMARKS.md` at the workspace root and returns that file's path.
/// The file is created with its header when it is missing (or empty), and opened afresh in
/// append mode, so sections another bench added meanwhile stay. Panics when it cannot be
/// written.
pub fn append_to_benchmarks(section: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate has a workspace root")
        .join("BENCHMARKS.md");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let empty = f
        .metadata()
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
        == 0;
    if empty {
        f.write_all(BENCHMARKS_HEADER.as_bytes())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    f.write_all(section.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
