//! `memoh-agent doctor`: checks that the host can run bots and prints one line per check,
//! each problem with the command that fixes it.
//!
//! Every probe of the outside world goes through [`Host`] ([`RealHost`] in production), so
//! the checks' logic, the report and the exit code are unit-tested with a fake host.
//!
//! Here: the report ([`Check`], [`render`], [`exit_code`]), the [`Host`] trait and the runner
//! ([`run_checks`]). The checks by the system they look at: `containerd` (half-deleted task
//! bundles), `network` (CNI, iptables, nftables, bridge netfilter, the agent's firewall state),
//! `host` (sysctls, the socket directory, the server binary, and [`RealHost`]).

mod containerd;
mod host;
mod network;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

use self::containerd::task_bundles;
pub use self::host::RealHost;
use self::host::{neighbours, server_binary, socket_dir, sysctl};
use self::network::{
    bridge_netfilter, cni_config, cni_plugins, firewall_state, iptables, nftables,
};

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
    pub(super) fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(super) fn bad(
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
    /// Whether `path` is an executable regular file; why not otherwise.
    fn executable(&self, path: &Path) -> Result<(), String>;
    /// The dynamic loader the ELF executable `path` names (`None`: static); why it cannot be
    /// read otherwise.
    fn interpreter(&self, path: &Path) -> Result<Option<String>, String>;
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
    out.push(neighbours(cfg, host));
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
    out.push(server_binary(cfg, config_path, host));
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

/// Whether `dir` is writable, or missing and creatable under its nearest existing ancestor.
pub(super) fn can_write(host: &dyn Host, dir: &Path) -> (bool, bool) {
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

#[cfg(test)]
mod tests;
