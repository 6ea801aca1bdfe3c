//! Checks of the host itself (sysctls, the control socket's directory) and [`RealHost`],
//! the production [`Host`].

use std::path::{Path, PathBuf};

use super::{can_write, Cgroups, Check, Host, Status, PROBE_LIMIT};
use crate::config::Config;
use crate::containerd::{Connection, Containerd, Images};

pub(super) fn sysctl(
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

/// The host's IPv4 neighbour (ARP) table against the bots the subnet holds: the agent calls
/// every running bot, one entry each. Above `gc_thresh2` entries the kernel collects them
/// forcibly, at `gc_thresh3` it refuses new ones, and calls to bots fail (measured: at 1 000
/// bots with the kernel's 512 / 1 024, 1 385 of 3 000 execs and 75 of 990 creates failed).
pub(super) fn neighbours(cfg: &Config, host: &dyn Host) -> Check {
    const BASE: &str = "/proc/sys/net/ipv4/neigh/default";
    let read = |name: &str| -> Option<u64> { host.read(&Path::new(BASE).join(name))?.parse().ok() };
    // The bots the subnet can hold, bounded: past a few thousand a host has other limits.
    let hosts = cfg
        .cni_subnet
        .split_once('/')
        .and_then(|(_, len)| len.parse::<u32>().ok())
        .filter(|len| (8..=30).contains(len))
        .map_or(NEIGHBOUR_BOTS, |len| {
            ((1u64 << (32 - len)) - 3).min(NEIGHBOUR_BOTS)
        });
    let (Some(thresh2), Some(thresh3)) = (read("gc_thresh2"), read("gc_thresh3")) else {
        return Check::ok("neighbours", "no IPv4 neighbour table limits to read");
    };
    if thresh2 >= hosts && thresh3 > thresh2 {
        return Check::ok(
            "neighbours",
            format!("the ARP table holds {thresh2} entries before forced collection (gc_thresh2)"),
        );
    }
    let want = hosts.next_power_of_two();
    Check::bad(
        "neighbours",
        Status::Warn,
        format!(
            "the ARP table is collected forcibly above {thresh2} entries and full at {thresh3} \
             (net.ipv4.neigh.default.gc_thresh2, gc_thresh3), the subnet {} holds {hosts} bots: \
             with more than about {thresh2} bots running, calls to bots fail",
            cfg.cni_subnet
        ),
        format!(
            "sysctl -w net.ipv4.neigh.default.gc_thresh1={} net.ipv4.neigh.default.gc_thresh2={want} \
             net.ipv4.neigh.default.gc_thresh3={} (and the same in /etc/sysctl.d)",
            want / 2,
            want * 2
        ),
    )
}

/// The most bots the neighbour check plans for.
const NEIGHBOUR_BOTS: u64 = 4096;

pub(super) fn socket_dir(cfg: &Config, host: &dyn Host) -> Check {
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

/// The server binary every bot runs (`server_binary`): an executable file, or no bot starts;
/// statically linked, or it starts only in images that carry its loader and libraries.
pub(super) fn server_binary(cfg: &Config, config_path: &str, host: &dyn Host) -> Check {
    let p = &cfg.server_binary;
    match host.executable(p).and_then(|()| host.interpreter(p)) {
        Ok(None) => Check::ok(
            "server",
            format!("{} is executable and statically linked", p.display()),
        ),
        Ok(Some(loader)) => Check::bad(
            "server",
            Status::Warn,
            format!(
                "server binary {} is dynamically linked (loader {loader}): bots whose image \
                 lacks that loader and its libraries fail to start with \"exec {}: no such \
                 file or directory\"",
                p.display(),
                crate::containerd::spec::bridge::BRIDGE_PATH
            ),
            format!(
                "RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
                 --target x86_64-unknown-linux-gnu -p container-server, then install it as {}",
                p.display()
            ),
        ),
        Err(why) => Check::bad(
            "server",
            Status::Problem,
            format!("server binary {} {why}: no bot can start", p.display()),
            format!(
                "install -D -m 0755 container-server {} (or set server_binary in {config_path})",
                p.display()
            ),
        ),
    }
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

    fn executable(&self, path: &Path) -> Result<(), String> {
        crate::containerd::spec::bridge::check_server_binary(path)
    }

    fn interpreter(&self, path: &Path) -> Result<Option<String>, String> {
        crate::containerd::spec::bridge::elf_interpreter(path)
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
