//! `memoh-agent doctor`: checks that the host can run bots and prints one line per check,
//! each problem with the command that fixes it.
//!
//! Every probe of the outside world goes through [`Host`] ([`RealHost`] in production), so
//! the checks' logic, the report and the exit code are unit-tested with a fake host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::containerd::{Connection, Containerd, Images};

/// How long one containerd or control-socket probe may take.
const PROBE_LIMIT: Duration = Duration::from_secs(5);
/// The CNI plugins the agent's network runs.
pub const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but something the agent relies on for a guarantee is missing.
    Warn,
    /// The agent cannot work until this is fixed.
    Problem,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// The verdict.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// The command that fixes it (warnings and problems).
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The cgroup hierarchy mounted at `/sys/fs/cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cgroups {
    /// The unified hierarchy (cgroup2).
    V2,
    /// Legacy per-controller hierarchies.
    V1,
    /// Neither.
    Missing,
}

/// The host as the checks see it.
#[async_trait::async_trait]
pub trait Host: Send + Sync {
    /// containerd's version on the configured socket.
    async fn containerd_version(&self, cfg: &Config) -> Result<String, String>;
    /// Whether the configured image is in the configured namespace.
    async fn image_present(&self, cfg: &Config) -> Result<bool, String>;
    /// Asks the agent on `socket` for its bots; returns how many it has.
    async fn agent_bots(&self, socket: &Path) -> Result<usize, String>;
    /// `program` on `PATH`.
    fn which(&self, program: &str) -> Option<PathBuf>;
    /// Whether `path` is a regular file.
    fn is_file(&self, path: &Path) -> bool;
    /// Whether `dir` is writable; `None` when it does not exist.
    fn writable(&self, dir: &Path) -> Option<bool>;
    /// A small file's contents, trimmed; `None` when it cannot be read.
    fn read(&self, path: &Path) -> Option<String>;
    /// Runs a program; `Err` carries its error output.
    fn run(&self, program: &str, args: &[&str]) -> Result<(), String>;
    /// Whether this process runs as root.
    fn is_root(&self) -> bool;
    /// The cgroup hierarchy.
    fn cgroups(&self) -> Cgroups;
    /// Names of the directories in `dir`; `None` when it cannot be read.
    fn subdirs(&self, dir: &Path) -> Option<Vec<String>>;
    /// Whether network `name` is defined in `dir`.
    fn network_defined(&self, dir: &Path, name: &str) -> Result<bool, String>;
    /// Runs a program; `Ok` carries its standard output, `Err` its error output.
    fn output(&self, program: &str, args: &[&str]) -> Result<String, String>;
    /// Names of the regular files in `dir`; `None` when it cannot be read.
    fn files(&self, dir: &Path) -> Option<Vec<String>>;
}

/// Runs every check against `host`, in report order.
pub async fn run_checks(cfg: &Config, config_path: &str, host: &dyn Host) -> Vec<Check> {
    let mut out = Vec::new();
    let containerd = host.containerd_version(cfg).await;
    out.push(match &containerd {
        Ok(v) => Check::ok(
            "containerd",
            format!(
                "{v} at {} (namespace {})",
                cfg.containerd_socket.display(),
                cfg.namespace
            ),
        ),
        Err(e) => Check::bad(
            "containerd",
            Status::Problem,
            e.clone(),
            format!("systemctl start containerd (or set containerd_socket in {config_path})"),
        ),
    });
    out.push(match host.which("runc") {
        Some(p) => Check::ok("runc", p.display().to_string()),
        None => Check::bad(
            "runc",
            Status::Problem,
            "not found on PATH",
            "apt-get install runc",
        ),
    });
    out.push(cni_plugins(cfg, config_path, host));
    out.push(cni_config(cfg, config_path, host));
    out.push(iptables(host));
    out.push(sysctl(
        host,
        "ip_forward",
        "/proc/sys/net/ipv4/ip_forward",
        Status::Problem,
        "bots cannot reach the outside",
        "sysctl -w net.ipv4.ip_forward=1",
    ));
    out.push(nftables(host));
    out.push(bridge_netfilter(host));
    out.push(firewall_state(cfg, host));
    out.push(match host.cgroups() {
        Cgroups::V2 => Check::ok("cgroups", "cgroup2 at /sys/fs/cgroup"),
        Cgroups::V1 => Check::ok("cgroups", "cgroup v1 at /sys/fs/cgroup"),
        Cgroups::Missing => Check::bad(
            "cgroups",
            Status::Problem,
            "no cgroup hierarchy at /sys/fs/cgroup",
            "mount -t cgroup2 none /sys/fs/cgroup",
        ),
    });
    out.push(if containerd.is_err() {
        Check::bad(
            "image",
            Status::Problem,
            format!("{}: cannot check, containerd does not answer", cfg.image),
            "systemctl start containerd",
        )
    } else {
        match host.image_present(cfg).await {
            Ok(true) => Check::ok(
                "image",
                format!("{} in namespace {}", cfg.image, cfg.namespace),
            ),
            Ok(false) => Check::bad(
                "image",
                Status::Problem,
                format!("{} is not in namespace {}", cfg.image, cfg.namespace),
                format!(
                    "memoh-agent image pull {} (or ctr -a {} -n {} images import FILE)",
                    cfg.image,
                    cfg.containerd_socket.display(),
                    cfg.namespace
                ),
            ),
            Err(e) => Check::bad(
                "image",
                Status::Problem,
                format!("{}: {e}", cfg.image),
                format!("set image in {config_path}"),
            ),
        }
    });
    out.push(task_bundles(cfg, config_path, containerd.is_ok(), host));
    out.push(socket_dir(cfg, host));
    out.push(match host.agent_bots(&cfg.control_socket).await {
        Ok(n) => Check::ok(
            "agent",
            format!("answers on {} ({n} bots)", cfg.control_socket.display()),
        ),
        Err(e) => Check::bad(
            "agent",
            Status::Problem,
            format!("{} does not answer: {e}", cfg.control_socket.display()),
            "systemctl start memoh-agent",
        ),
    });
    out
}

fn cni_plugins(cfg: &Config, config_path: &str, host: &dyn Host) -> Check {
    let dirs = cfg
        .cni_bin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for p in CNI_PLUGINS {
        match cfg
            .cni_bin_dirs
            .iter()
            .map(|d| d.join(p))
            .find(|f| host.is_file(f))
        {
            Some(f) => found.push(f.display().to_string()),
            None => missing.push(*p),
        }
    }
    if missing.is_empty() {
        Check::ok("cni plugins", found.join(" "))
    } else {
        Check::bad(
            "cni plugins",
            Status::Problem,
            format!("{} not in {dirs}", missing.join(", ")),
            format!(
                "apt-get install containernetworking-plugins (or set cni_bin_dirs in {config_path})"
            ),
        )
    }
}

/// Whether `dir` is writable, or missing and creatable under its nearest existing ancestor.
fn can_write(host: &dyn Host, dir: &Path) -> (bool, bool) {
    match host.writable(dir) {
        Some(w) => (true, w),
        None => {
            let creatable = dir
                .ancestors()
                .skip(1)
                .find_map(|a| host.writable(a))
                .unwrap_or(false);
            (false, creatable)
        }
    }
}

fn cni_config(cfg: &Config, config_path: &str, host: &dyn Host) -> Check {
    let dir = &cfg.cni_conf_dir;
    match host.network_defined(dir, &cfg.cni_network) {
        Ok(true) => {
            return Check::ok(
                "cni config",
                format!("network {} in {}", cfg.cni_network, dir.display()),
            )
        }
        Ok(false) => {}
        Err(e) => {
            return Check::bad(
                "cni config",
                Status::Problem,
                e,
                format!("set cni_conf_dir in {config_path}"),
            )
        }
    }
    match can_write(host, dir) {
        (_, true) => Check::ok(
            "cni config",
            format!(
                "{} is writable: the agent writes network {} there",
                dir.display(),
                cfg.cni_network
            ),
        ),
        (true, false) => Check::bad(
            "cni config",
            Status::Problem,
            format!(
                "{} has no network {} and is not writable",
                dir.display(),
                cfg.cni_network
            ),
            format!("chmod u+w {} (the agent runs as root)", dir.display()),
        ),
        (false, false) => Check::bad(
            "cni config",
            Status::Problem,
            format!("{} does not exist and cannot be created", dir.display()),
            format!("mkdir -p {}", dir.display()),
        ),
    }
}

fn iptables(host: &dyn Host) -> Check {
    if host.which("iptables").is_none() {
        return Check::bad(
            "iptables",
            Status::Problem,
            "not found on PATH",
            "apt-get install iptables",
        );
    }
    if !host.is_root() {
        return Check::bad(
            "iptables",
            Status::Warn,
            "not checked: doctor does not run as root",
            "sudo memoh-agent doctor",
        );
    }
    match host.run("iptables", &["-t", "nat", "-S"]) {
        Ok(()) => Check::ok("iptables", "iptables -t nat -S works"),
        Err(e) => Check::bad(
            "iptables",
            Status::Problem,
            format!("iptables -t nat -S failed: {e}"),
            "modprobe iptable_nat",
        ),
    }
}

fn nftables(host: &dyn Host) -> Check {
    if host.which("nft").is_none() {
        return Check::bad(
            "nftables",
            Status::Problem,
            "nft not found on PATH: bots cannot be contained, so the agent refuses to start them",
            "apt-get install nftables",
        );
    }
    if !host.is_root() {
        return Check::ok(
            "nftables",
            "nft found (not run: doctor does not run as root)",
        );
    }
    match host.output("nft", &["list", "tables"]) {
        Ok(_) => Check::ok("nftables", "nft list tables works"),
        Err(e) => Check::bad(
            "nftables",
            Status::Problem,
            format!("nft list tables failed: {e}: bots cannot be contained"),
            "use a kernel with nf_tables (bridge and inet families)",
        ),
    }
}

/// Bridge netfilter is the third layer of bot-to-bot isolation (the iptables one); the
/// bridge-level layers hold without it, so it is a warning, and the agent turns it on itself.
fn bridge_netfilter(host: &dyn Host) -> Check {
    let paths = crate::network::firewall::BRIDGE_NETFILTER_SYSCTLS;
    let off: Vec<String> = paths
        .iter()
        .filter_map(|p| match host.read(Path::new(p)).as_deref() {
            Some("1") => None,
            Some(v) => Some(format!("{p} is {v}")),
            None => Some(format!("{p} is missing")),
        })
        .collect();
    if off.is_empty() {
        return Check::ok("bridge-nf", format!("{} are 1", paths.join(" and ")));
    }
    Check::bad(
        "bridge-nf",
        Status::Warn,
        format!(
            "{}: the iptables layer of bot-to-bot isolation is off (port isolation and the \
             bridge table still hold; the agent turns it on when it attaches a bot)",
            off.join(", ")
        ),
        "modprobe br_netfilter && sysctl -w net.bridge.bridge-nf-call-iptables=1 \
         net.bridge.bridge-nf-call-ip6tables=1",
    )
}

/// The agent's firewall state against its attached bots: its tables missing while bots are
/// attached (they run uncontained), or its tables, isolation rule or MASQUERADE rule left
/// behind with no bot attached.
fn firewall_state(cfg: &Config, host: &dyn Host) -> Check {
    use crate::network::containment::table_name;
    use crate::network::firewall::{DEFAULT_ISOLATION_CHAIN, DEFAULT_MASQ_COMMENT};
    if !host.is_root() {
        return Check::ok("firewall", "not checked: doctor does not run as root");
    }
    let table = table_name(&cfg.namespace);
    let attached = host
        .files(&cfg.state_dir.join("cni"))
        .unwrap_or_default()
        .iter()
        .filter(|f| f.ends_with(".json"))
        .count();
    let Ok(tables) = host.output("nft", &["list", "tables"]) else {
        return Check::ok("firewall", "not checked: nft does not run");
    };
    let present: Vec<String> = ["bridge", "inet"]
        .iter()
        .map(|f| format!("table {f} {table}"))
        .filter(|t| tables.lines().any(|l| l.trim() == t))
        .collect();
    if attached > 0 {
        if present.len() == 2 {
            return Check::ok(
                "firewall",
                format!("tables {table} contain {attached} attached bot(s)"),
            );
        }
        return Check::bad(
            "firewall",
            Status::Problem,
            format!(
                "{attached} bot(s) attached but tables bridge/inet {table} are not both there: \
                 the bots are not contained"
            ),
            "systemctl restart memoh-agent (its reconcile puts the ruleset back)",
        );
    }
    let mut left = Vec::new();
    let mut fixes = Vec::new();
    for t in &present {
        left.push(t.clone());
        fixes.push(format!("nft delete {t}"));
    }
    let bridge = &cfg.cni_bridge;
    let isolation = format!("-A {DEFAULT_ISOLATION_CHAIN} -i {bridge} -o {bridge} -j DROP");
    if host
        .output("iptables", &["-w", "5", "-S", DEFAULT_ISOLATION_CHAIN])
        .is_ok_and(|o| o.lines().any(|l| l.trim() == isolation))
    {
        left.push(format!("isolation rule of {bridge}"));
        fixes.push(format!(
            "iptables -D {DEFAULT_ISOLATION_CHAIN} -i {bridge} -o {bridge} -j DROP"
        ));
    }
    let subnet = &cfg.cni_subnet;
    if host
        .output("iptables", &["-w", "5", "-t", "nat", "-S", "POSTROUTING"])
        .is_ok_and(|o| {
            o.lines().any(|l| {
                l.contains(&format!("-s {subnet} "))
                    && l.contains(DEFAULT_MASQ_COMMENT)
                    && l.contains("MASQUERADE")
            })
        })
    {
        left.push(format!("masquerade rule of {subnet}"));
        fixes.push(format!(
            "iptables -t nat -D POSTROUTING -s {subnet} ! -d {subnet} -j MASQUERADE -m comment \
             --comment {DEFAULT_MASQ_COMMENT}"
        ));
    }
    if left.is_empty() {
        return Check::ok("firewall", "no bot attached and nothing left behind");
    }
    Check::bad(
        "firewall",
        Status::Warn,
        format!(
            "no bot attached, but the agent's {} are left behind",
            left.join(", ")
        ),
        fixes.join("; "),
    )
}

fn sysctl(
    host: &dyn Host,
    name: &'static str,
    path: &str,
    severity: Status,
    why: &str,
    fix: &str,
) -> Check {
    match host.read(Path::new(path)).as_deref() {
        Some("1") => Check::ok(name, format!("{path} is 1")),
        Some(v) => Check::bad(name, severity, format!("{path} is {v}: {why}"), fix),
        None => Check::bad(name, severity, format!("{path} is missing: {why}"), fix),
    }
}

/// containerd 1.6 deletes a task bundle by renaming `<state>/io.containerd.runtime.v2.task/NS/ID`
/// to `.ID`, then removing that. Killed in between, it leaves `.ID`; every later delete of that
/// bundle then fails to rename and every later task create of the container fails ("file
/// exists"): that bot cannot start until `.ID` is gone.
///
/// A `containerd_state` that does not exist while containerd answers is a wrong path (containerd
/// creates its state directory when it starts): a warning, since the check sees nothing there.
fn task_bundles(
    cfg: &Config,
    config_path: &str,
    containerd_answers: bool,
    host: &dyn Host,
) -> Check {
    let dir = cfg
        .containerd_state
        .join("io.containerd.runtime.v2.task")
        .join(&cfg.namespace);
    let Some(names) = host.subdirs(&dir) else {
        if host.subdirs(&cfg.containerd_state).is_some() {
            return Check::ok(
                "task bundles",
                format!("{} holds no bundles yet", dir.display()),
            );
        }
        if !containerd_answers {
            return Check::ok(
                "task bundles",
                "not checked: containerd does not answer".to_string(),
            );
        }
        return Check::bad(
            "task bundles",
            Status::Warn,
            format!(
                "{} does not exist although containerd answers: containerd keeps its state \
                 elsewhere, so half-deleted task bundles cannot be found",
                cfg.containerd_state.display()
            ),
            format!(
                "set containerd_state in {config_path} to the state directory that \
                 `containerd config dump | grep '^state'` names"
            ),
        );
    };
    let stale: Vec<String> = names.into_iter().filter(|n| n.starts_with('.')).collect();
    if stale.is_empty() {
        return Check::ok(
            "task bundles",
            format!("no half-deleted bundle in {}", dir.display()),
        );
    }
    let bots: Vec<&str> = stale
        .iter()
        .filter_map(|n| crate::ids::bot_of_container(&n[1..]))
        .collect();
    let fix = stale
        .iter()
        .map(|n| {
            let p = dir.join(n);
            format!("umount {0}/rootfs 2>/dev/null; rm -rf {0}", p.display())
        })
        .collect::<Vec<_>>()
        .join("; ");
    Check::bad(
        "task bundles",
        Status::Problem,
        format!(
            "{} half-deleted by a killed containerd in {}: {} cannot start until removed (the \
             agent removes its bots' ones at their next start)",
            stale.join(", "),
            dir.display(),
            if bots.is_empty() {
                "their containers".to_string()
            } else {
                format!("bot(s) {}", bots.join(", "))
            }
        ),
        fix,
    )
}

fn socket_dir(cfg: &Config, host: &dyn Host) -> Check {
    let Some(dir) = cfg.control_socket.parent() else {
        return Check::ok("socket dir", "/");
    };
    match can_write(host, dir) {
        (true, true) => Check::ok("socket dir", format!("{} is writable", dir.display())),
        (false, true) => Check::ok(
            "socket dir",
            format!("{} is created when the agent starts", dir.display()),
        ),
        (true, false) => Check::bad(
            "socket dir",
            Status::Problem,
            format!("{} is not writable", dir.display()),
            format!("chmod u+w {} (the agent runs as root)", dir.display()),
        ),
        (false, false) => Check::bad(
            "socket dir",
            Status::Problem,
            format!("{} does not exist and cannot be created", dir.display()),
            format!("mkdir -p {}", dir.display()),
        ),
    }
}

/// The report: one line per check, then a summary line.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let status = match c.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Problem => "problem",
        };
        out.push_str(&format!("{status:<8}{:<12} {}", c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("; fix: {fix}"));
        }
        out.push('\n');
    }
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    let (problems, warnings) = (count(Status::Problem), count(Status::Warn));
    if problems == 0 && warnings == 0 {
        out.push_str("all checks passed\n");
    } else {
        out.push_str(&format!("{problems} problem(s), {warnings} warning(s)\n"));
    }
    out
}

/// 1 when any check found a problem (warnings alone pass), else 0.
pub fn exit_code(checks: &[Check]) -> u8 {
    u8::from(checks.iter().any(|c| c.status == Status::Problem))
}

/// The real host.
pub struct RealHost;

#[async_trait::async_trait]
impl Host for RealHost {
    async fn containerd_version(&self, cfg: &Config) -> Result<String, String> {
        let probe = async {
            let c = Containerd::from_config(cfg).await?;
            c.version().await
        };
        match tokio::time::timeout(PROBE_LIMIT, probe).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    async fn image_present(&self, cfg: &Config) -> Result<bool, String> {
        let probe = async {
            let c = Containerd::from_config(cfg).await?;
            c.resolve_image(&cfg.image).await
        };
        match tokio::time::timeout(PROBE_LIMIT, probe).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(crate::AgentError::ImageNotFound(_))) => Ok(false),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    async fn agent_bots(&self, socket: &Path) -> Result<usize, String> {
        use memoh_proto::pb::agent::{agent_service_client::AgentServiceClient, ListBotsRequest};
        let mut c = AgentServiceClient::new(memoh_proto::client::unix_channel(socket));
        match tokio::time::timeout(PROBE_LIMIT, c.list_bots(ListBotsRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner().bots.len()),
            Ok(Err(s)) => Err(s.message().to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    fn which(&self, program: &str) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    }

    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn writable(&self, dir: &Path) -> Option<bool> {
        if !dir.is_dir() {
            return None;
        }
        Some(nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok())
    }

    fn subdirs(&self, dir: &Path) -> Option<Vec<String>> {
        let entries = std::fs::read_dir(dir).ok()?;
        Some(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
        )
    }

    fn read(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err
            .lines()
            .next()
            .map(str::to_string)
            .unwrap_or_else(|| out.status.to_string()))
    }

    fn is_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn cgroups(&self) -> Cgroups {
        use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, TMPFS_MAGIC};
        match statfs("/sys/fs/cgroup") {
            Ok(s) if s.filesystem_type() == CGROUP2_SUPER_MAGIC => Cgroups::V2,
            Ok(s)
                if s.filesystem_type() == TMPFS_MAGIC
                    && Path::new("/sys/fs/cgroup/memory").is_dir() =>
            {
                Cgroups::V1
            }
            _ => Cgroups::Missing,
        }
    }

    fn network_defined(&self, dir: &Path, name: &str) -> Result<bool, String> {
        crate::network::conf::find_network(dir, name)
            .map(|n| n.is_some())
            .map_err(|e| e.to_string())
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err
            .lines()
            .next()
            .map(str::to_string)
            .unwrap_or_else(|| out.status.to_string()))
    }

    fn files(&self, dir: &Path) -> Option<Vec<String>> {
        let entries = std::fs::read_dir(dir).ok()?;
        Some(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A host where everything is fine unless a field says otherwise.
    struct Fake {
        containerd: Result<String, String>,
        image: Result<bool, String>,
        agent: Result<usize, String>,
        on_path: Vec<&'static str>,
        files: Vec<PathBuf>,
        dirs: HashMap<PathBuf, bool>,
        sysctls: HashMap<PathBuf, String>,
        iptables: Result<(), String>,
        root: bool,
        cgroups: Cgroups,
        network: Result<bool, String>,
        bundles: Option<Vec<String>>,
        /// Whether containerd's state directory exists.
        state_dir: bool,
        /// Outputs of programs by "program args".
        outputs: HashMap<String, Result<String, String>>,
        /// Saved attachments (files in `<state_dir>/cni`).
        attached: Vec<String>,
    }

    impl Default for Fake {
        fn default() -> Self {
            let cfg = Config::default();
            Self {
                containerd: Ok("v2.0.0".into()),
                image: Ok(true),
                agent: Ok(2),
                on_path: vec!["runc", "iptables", "nft"],
                files: CNI_PLUGINS
                    .iter()
                    .map(|p| cfg.cni_bin_dirs[1].join(p))
                    .collect(),
                dirs: HashMap::from([
                    ("/run".into(), true),
                    ("/run/memoh".into(), true),
                    ("/etc".into(), true),
                    ("/".into(), true),
                ]),
                sysctls: HashMap::from([
                    ("/proc/sys/net/ipv4/ip_forward".into(), "1".into()),
                    (
                        "/proc/sys/net/bridge/bridge-nf-call-iptables".into(),
                        "1".into(),
                    ),
                    (
                        "/proc/sys/net/bridge/bridge-nf-call-ip6tables".into(),
                        "1".into(),
                    ),
                ]),
                iptables: Ok(()),
                root: true,
                cgroups: Cgroups::V2,
                network: Ok(false),
                bundles: Some(vec!["mcp-a".into(), "mcp-b".into()]),
                state_dir: true,
                outputs: HashMap::from([
                    (
                        "nft list tables".to_string(),
                        Ok("table ip filter\ntable ip nat\n".to_string()),
                    ),
                    (
                        "iptables -w 5 -S MEMOH-ISOLATION".to_string(),
                        Err("No chain/target/match by that name.".to_string()),
                    ),
                    (
                        "iptables -w 5 -t nat -S POSTROUTING".to_string(),
                        Ok("-P POSTROUTING ACCEPT\n".to_string()),
                    ),
                ]),
                attached: Vec::new(),
            }
        }
    }

    #[async_trait::async_trait]
    impl Host for Fake {
        async fn containerd_version(&self, _: &Config) -> Result<String, String> {
            self.containerd.clone()
        }
        async fn image_present(&self, _: &Config) -> Result<bool, String> {
            self.image.clone()
        }
        async fn agent_bots(&self, _: &Path) -> Result<usize, String> {
            self.agent.clone()
        }
        fn which(&self, program: &str) -> Option<PathBuf> {
            self.on_path
                .contains(&program)
                .then(|| Path::new("/usr/sbin").join(program))
        }
        fn is_file(&self, path: &Path) -> bool {
            self.files.iter().any(|f| f == path)
        }
        fn writable(&self, dir: &Path) -> Option<bool> {
            self.dirs.get(dir).copied()
        }
        fn read(&self, path: &Path) -> Option<String> {
            self.sysctls.get(path).cloned()
        }
        fn run(&self, _: &str, _: &[&str]) -> Result<(), String> {
            self.iptables.clone()
        }
        fn is_root(&self) -> bool {
            self.root
        }
        fn cgroups(&self) -> Cgroups {
            self.cgroups
        }
        fn network_defined(&self, _: &Path, _: &str) -> Result<bool, String> {
            self.network.clone()
        }
        fn output(&self, program: &str, args: &[&str]) -> Result<String, String> {
            let key = format!("{program} {}", args.join(" "));
            self.outputs
                .get(&key)
                .cloned()
                .unwrap_or_else(|| panic!("unexpected run of {key:?}"))
        }
        fn files(&self, dir: &Path) -> Option<Vec<String>> {
            assert_eq!(dir, Path::new("/var/lib/memoh-agent/cni"));
            Some(self.attached.clone())
        }
        fn subdirs(&self, dir: &Path) -> Option<Vec<String>> {
            if dir == Path::new("/run/containerd") {
                return self
                    .state_dir
                    .then(|| vec!["io.containerd.runtime.v2.task".into()]);
            }
            assert_eq!(
                dir,
                Path::new("/run/containerd/io.containerd.runtime.v2.task/default")
            );
            self.bundles.clone()
        }
    }

    fn report(host: &Fake) -> (Vec<Check>, String, u8) {
        let checks = futures::executor::block_on(run_checks(
            &Config::default(),
            "/etc/memoh/agent.toml",
            host,
        ));
        let text = render(&checks);
        let code = exit_code(&checks);
        (checks, text, code)
    }

    fn line<'a>(text: &'a str, name: &str) -> &'a str {
        text.lines()
            .find(|l| {
                l.get(8..)
                    .is_some_and(|r| r.starts_with(&format!("{name} ")))
            })
            .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
    }

    #[test]
    fn a_healthy_host_passes() {
        let (checks, text, code) = report(&Fake::default());
        assert_eq!(code, 0, "{text}");
        assert_eq!(checks.len(), 14);
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{text}");
        assert_eq!(text.lines().count(), 15);
        assert!(text.ends_with("all checks passed\n"));
        assert!(line(&text, "containerd").starts_with("ok      containerd   v2.0.0 at "));
        assert!(line(&text, "cni config").contains("/etc/cni/net.d is writable"));
        assert!(line(&text, "socket").contains("/run/memoh is writable"));
    }

    #[test]
    fn each_problem_names_its_fix() {
        type Break = fn(&mut Fake);
        let cases: &[(&str, Break, &str)] = &[
            (
                "containerd",
                |h| h.containerd = Err("connection refused".into()),
                "systemctl start containerd",
            ),
            (
                "runc",
                |h| h.on_path.retain(|p| *p != "runc"),
                "apt-get install runc",
            ),
            (
                "cni plugins",
                |h| {
                    h.files.pop();
                },
                "apt-get install containernetworking-plugins",
            ),
            (
                "cni config",
                |h| {
                    h.dirs.insert("/etc".into(), false);
                },
                "mkdir -p /etc/cni/net.d",
            ),
            (
                "iptables",
                |h| h.iptables = Err("can't initialize iptables table `nat'".into()),
                "modprobe iptable_nat",
            ),
            (
                "iptables",
                |h| h.on_path.retain(|p| *p != "iptables"),
                "apt-get install iptables",
            ),
            (
                "ip_forward",
                |h| {
                    h.sysctls
                        .insert("/proc/sys/net/ipv4/ip_forward".into(), "0".into());
                },
                "sysctl -w net.ipv4.ip_forward=1",
            ),
            (
                "cgroups",
                |h| h.cgroups = Cgroups::Missing,
                "mount -t cgroup2",
            ),
            (
                "nftables",
                |h| h.on_path.retain(|p| *p != "nft"),
                "apt-get install nftables",
            ),
            (
                "firewall",
                |h| h.attached = vec!["b1.json".into()],
                "systemctl restart memoh-agent",
            ),
            (
                "image",
                |h| h.image = Ok(false),
                "memoh-agent image pull docker.io/memohai/mcp:latest",
            ),
            (
                "task bundles",
                |h| h.bundles = Some(vec!["mcp-a".into(), ".mcp-b".into()]),
                "umount /run/containerd/io.containerd.runtime.v2.task/default/.mcp-b/rootfs \
                 2>/dev/null; rm -rf /run/containerd/io.containerd.runtime.v2.task/default/.mcp-b",
            ),
            (
                "socket dir",
                |h| {
                    h.dirs.insert("/run/memoh".into(), false);
                },
                "chmod u+w /run/memoh",
            ),
            (
                "agent",
                |h| h.agent = Err("connection refused".into()),
                "systemctl start memoh-agent",
            ),
        ];
        for (name, breaks, fix) in cases {
            let mut host = Fake::default();
            breaks(&mut host);
            let (checks, text, code) = report(&host);
            assert_eq!(code, 1, "{name}: {text}");
            let l = line(&text, name);
            assert!(l.starts_with("problem "), "{name}: {l}");
            assert!(l.contains(&format!("; fix: {fix}")), "{name}: {l}");
            // An unreachable containerd also leaves the image unchecked.
            let expect = if *name == "containerd" { 2 } else { 1 };
            let bad = checks.iter().filter(|c| c.status != Status::Ok).count();
            assert_eq!(bad, expect, "{name} broke other checks:\n{text}");
            let summary = format!("{expect} problem(s), 0 warning(s)\n");
            assert!(text.ends_with(&summary), "{text}");
        }
    }

    #[test]
    fn half_deleted_bundles_name_their_bots() {
        let host = Fake {
            bundles: Some(vec![".mcp-a".into(), "mcp-c".into(), ".mcp-b".into()]),
            ..Fake::default()
        };
        let (_, text, code) = report(&host);
        assert_eq!(code, 1);
        let l = line(&text, "task bundles");
        assert!(l.contains(".mcp-a, .mcp-b half-deleted"), "{l}");
        assert!(l.contains("bot(s) a, b cannot start"), "{l}");
        assert!(!l.contains("mcp-c"), "{l}");
        // No task directory yet (no bot ever ran) is fine.
        let host = Fake {
            bundles: None,
            ..Fake::default()
        };
        let (_, text, code) = report(&host);
        assert_eq!(code, 0, "{text}");
        assert!(line(&text, "task bundles").starts_with("ok "), "{text}");
    }

    #[test]
    fn a_missing_containerd_state_dir_is_a_warning_while_containerd_answers() {
        let host = Fake {
            bundles: None,
            state_dir: false,
            ..Fake::default()
        };
        let (checks, text, code) = report(&host);
        assert_eq!(code, 0, "a warning alone passes: {text}");
        let l = line(&text, "task bundles");
        assert!(l.starts_with("warn "), "{l}");
        assert!(l.contains("/run/containerd does not exist"), "{l}");
        assert!(
            l.contains("fix: set containerd_state in /etc/memoh/agent.toml"),
            "{l}"
        );
        assert_eq!(
            checks.iter().filter(|c| c.status != Status::Ok).count(),
            1,
            "{text}"
        );
        // With containerd down its state directory may well be gone: not this check's problem.
        let host = Fake {
            bundles: None,
            state_dir: false,
            containerd: Err("connection refused".into()),
            ..Fake::default()
        };
        let (_, text, _) = report(&host);
        assert!(
            line(&text, "task bundles").contains("not checked"),
            "{text}"
        );
    }

    #[test]
    fn an_unreachable_containerd_also_fails_the_image_check() {
        let host = Fake {
            containerd: Err("no such file".into()),
            ..Fake::default()
        };
        let (_, text, code) = report(&host);
        assert_eq!(code, 1);
        assert!(line(&text, "image").contains("cannot check"), "{text}");
    }

    #[test]
    fn warnings_alone_pass() {
        let mut host = Fake {
            root: false,
            ..Fake::default()
        };
        host.sysctls
            .remove(Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables"));
        let (_, text, code) = report(&host);
        assert_eq!(code, 0, "{text}");
        assert!(line(&text, "bridge-nf").starts_with("warn "), "{text}");
        assert!(
            line(&text, "bridge-nf").contains("modprobe br_netfilter"),
            "{text}"
        );
        assert!(
            line(&text, "bridge-nf").contains("bridge table still hold"),
            "{text}"
        );
        assert!(
            line(&text, "iptables").contains("sudo memoh-agent doctor"),
            "{text}"
        );
        assert!(text.ends_with("0 problem(s), 2 warning(s)\n"), "{text}");
    }

    #[test]
    fn firewall_leftovers_and_missing_tables_are_reported() {
        // No bot attached, everything of the agent's left behind: a warning naming each fix.
        let mut host = Fake::default();
        host.outputs.insert(
            "nft list tables".into(),
            Ok("table ip nat\ntable bridge memoh-default\ntable inet memoh-default\n".into()),
        );
        host.outputs.insert(
            "iptables -w 5 -S MEMOH-ISOLATION".into(),
            Ok("-N MEMOH-ISOLATION\n-A MEMOH-ISOLATION -i cni0 -o cni0 -j DROP\n".into()),
        );
        host.outputs.insert(
            "iptables -w 5 -t nat -S POSTROUTING".into(),
            Ok("-A POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 -m comment --comment memoh-masq -j MASQUERADE\n".into()),
        );
        let (_, text, code) = report(&host);
        assert_eq!(code, 0, "{text}");
        let l = line(&text, "firewall");
        assert!(l.starts_with("warn "), "{l}");
        for want in [
            "nft delete table bridge memoh-default",
            "nft delete table inet memoh-default",
            "iptables -D MEMOH-ISOLATION -i cni0 -o cni0 -j DROP",
            "iptables -t nat -D POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 -j MASQUERADE",
        ] {
            assert!(l.contains(want), "{want}: {l}");
        }
        // Bots attached and the tables there: fine.
        host.attached = vec!["a.json".into(), "b.json".into()];
        let (_, text, code) = report(&host);
        assert_eq!(code, 0, "{text}");
        assert!(
            line(&text, "firewall").contains("contain 2 attached bot(s)"),
            "{text}"
        );
    }

    #[test]
    fn a_defined_network_needs_no_writable_dir() {
        let mut host = Fake {
            network: Ok(true),
            ..Fake::default()
        };
        host.dirs.insert("/etc".into(), false);
        let (_, text, code) = report(&host);
        assert_eq!(code, 0, "{text}");
        assert!(line(&text, "cni config").contains("network memoh-cni in /etc/cni/net.d"));
    }

    #[test]
    fn a_missing_dir_under_a_writable_parent_is_fine() {
        let mut host = Fake::default();
        host.dirs.remove(Path::new("/run/memoh"));
        let (_, text, code) = report(&host);
        assert_eq!(code, 0, "{text}");
        assert!(line(&text, "socket").contains("created when the agent starts"));
    }
}
