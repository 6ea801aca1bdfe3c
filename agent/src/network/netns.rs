//! Named network namespaces owned by the agent (`/run/netns/memoh-<ns>.<bot>`, named by
//! [`crate::ids::netns_name`]).
//!
//! The agent creates a bot's namespace before its task and hands the path to the OCI spec,
//! so the namespace outlives the task: CNI DEL still finds the bot's interface after the
//! task died, and after an agent restart.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::AgentError;

use super::cmd;

/// Where iproute2 (and so the agent) keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// How long one `ip`/`nsenter` call may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest namespace name: a file name (`NAME_MAX`).
pub const MAX_NETNS_NAME_LEN: usize = 255;

/// Whether `name` is usable as a namespace name (a plain file name, no path tricks).
pub fn valid_netns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NETNS_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The outside system: the host's named network namespaces (and the one piece of host link
/// plumbing the bridge plugin gets wrong, see [`Netns::pin_bridge_mac`]).
pub trait Netns: Send + Sync {
    /// The path of namespace `name`.
    fn path(&self, name: &str) -> PathBuf;

    /// Creates namespace `name` with its loopback up, or returns the existing one.
    fn create(&self, name: &str) -> impl Future<Output = Result<PathBuf, AgentError>> + Send;

    /// Deletes namespace `name`; a missing one is not an error.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), AgentError>> + Send;

    /// The names of the namespaces that exist (sorted).
    fn list(&self) -> impl Future<Output = Result<Vec<String>, AgentError>> + Send;

    /// Whether `path` is a live namespace (a mounted nsfs file).
    fn exists(&self, path: &Path) -> impl Future<Output = bool> + Send;

    /// The addresses of interface `ifname` inside the namespace at `path`, `None` when the
    /// namespace or the interface does not exist.
    fn interface_addrs(
        &self,
        path: &Path,
        ifname: &str,
    ) -> impl Future<Output = Result<Option<Vec<(IpAddr, u8)>>, AgentError>> + Send;

    /// The names of the interfaces inside the namespace at `path` (`lo` included); empty when
    /// the namespace does not exist.
    fn links(&self, path: &Path) -> impl Future<Output = Result<Vec<String>, AgentError>> + Send;

    /// Gives an existing `bridge` an explicitly set MAC address (its current one, or a random
    /// locally administered one when it has none); returns whether it changed anything.
    ///
    /// Without a set address the kernel derives the bridge's MAC from its ports, and a bridge
    /// whose last port went away has 00:00:00:00:00:00. The bridge plugin then fails ADD with
    /// "could not set bridge's mac" on every attempt, DEL-and-retry included, because DEL
    /// removes the only port again. A set address survives port churn.
    fn pin_bridge_mac(&self, bridge: &str)
        -> impl Future<Output = Result<bool, AgentError>> + Send;

    /// Drops the host's neighbour (ARP) entry for `ip` on `bridge`, if any. An address that
    /// just changed hands (a bot deleted, another given its address) would otherwise be sent
    /// to the old owner's MAC until the entry goes stale, about 30 s of silence.
    fn forget_neighbour(&self, bridge: &str, ip: IpAddr) -> impl Future<Output = ()> + Send;

    /// Sets (or clears) the `isolated` flag of bridge port `port`: the bridge then never
    /// forwards a frame between two isolated ports, whatever its protocol. Returns whether it
    /// changed anything; a port that does not exist (or is on no bridge) is an error.
    fn set_port_isolated(
        &self,
        port: &str,
        on: bool,
    ) -> impl Future<Output = Result<bool, AgentError>> + Send;

    /// Whether link `name` exists on the host.
    fn link_exists(&self, name: &str) -> impl Future<Output = bool> + Send;

    /// Turns IPv6 off in the namespace at `path` (every interface, present and future), so a
    /// bot given no IPv6 address has no link-local one either.
    fn disable_ipv6(&self, path: &Path) -> impl Future<Output = Result<(), AgentError>> + Send;

    /// The MAC address of interface `ifname` inside the namespace at `path`, lowercase;
    /// `None` when the namespace or the interface does not exist.
    fn interface_mac(
        &self,
        path: &Path,
        ifname: &str,
    ) -> impl Future<Output = Result<Option<String>, AgentError>> + Send;
}

/// Namespaces through iproute2 (`ip netns`, `ip link`); what is inside one is read in-process
/// ([`links_in`]).
#[derive(Debug, Clone, Default)]
pub struct IpNetns;

impl IpNetns {
    async fn ip(op: &str, args: &[&str]) -> Result<cmd::Finished, AgentError> {
        cmd::run(op, "ip".as_ref(), args, &[], None, TOOL_TIMEOUT).await
    }
}

/// Whether `path` is a namespace file: a bind mount of nsfs.
fn is_nsfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

impl Netns for IpNetns {
    fn path(&self, name: &str) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(name)
    }

    async fn create(&self, name: &str) -> Result<PathBuf, AgentError> {
        let op = format!("create netns {name}");
        if !valid_netns_name(name) {
            return Err(AgentError::InvalidArgument(format!(
                "network namespace name {name:?}"
            )));
        }
        let path = self.path(name);
        if is_nsfs(&path) {
            return Ok(path);
        }
        if path.exists() {
            // A file left by a crash between create and mount (or after a reboot emptied the
            // mount): not a namespace, so start over.
            tracing::warn!(path = %path.display(), "replacing a stale network namespace file");
            let _ = Self::ip(&op, &["netns", "delete", name]).await;
            let _ = std::fs::remove_file(&path);
        }
        let out = Self::ip(&op, &["netns", "add", name]).await?;
        if !out.success() && !is_nsfs(&path) {
            return Err(AgentError::Network {
                op,
                reason: out.stderr_text(),
            });
        }
        let out = Self::ip(&op, &["-n", name, "link", "set", "lo", "up"]).await?;
        if !out.success() {
            return Err(AgentError::Network {
                op,
                reason: format!("loopback up: {}", out.stderr_text()),
            });
        }
        tracing::debug!(netns = %path.display(), "created network namespace");
        Ok(path)
    }

    async fn delete(&self, name: &str) -> Result<(), AgentError> {
        if !valid_netns_name(name) {
            return Err(AgentError::InvalidArgument(format!(
                "network namespace name {name:?}"
            )));
        }
        let path = self.path(name);
        if !path.exists() {
            return Ok(());
        }
        let op = format!("delete netns {name}");
        let out = Self::ip(&op, &["netns", "delete", name]).await?;
        if out.success() || !path.exists() {
            tracing::debug!(netns = %path.display(), "deleted network namespace");
            return Ok(());
        }
        Err(AgentError::Network {
            op,
            reason: out.stderr_text(),
        })
    }

    async fn list(&self) -> Result<Vec<String>, AgentError> {
        tokio::task::spawn_blocking(|| {
            let dir = Path::new(NETNS_RUN_DIR);
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(AgentError::io(dir, e)),
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| valid_netns_name(n))
                .collect();
            names.sort();
            Ok(names)
        })
        .await
        .map_err(|e| AgentError::Network {
            op: "list network namespaces".into(),
            reason: e.to_string(),
        })?
    }

    async fn exists(&self, path: &Path) -> bool {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || is_nsfs(&path))
            .await
            .unwrap_or(false)
    }

    async fn interface_addrs(
        &self,
        path: &Path,
        ifname: &str,
    ) -> Result<Option<Vec<(IpAddr, u8)>>, AgentError> {
        let op = format!("inspect {ifname} in {}", path.display());
        let Some(links) = read_links(&op, path).await? else {
            return Ok(None);
        };
        Ok(links
            .into_iter()
            .find(|l| l.name == ifname && l.up)
            .map(|l| l.addrs))
    }

    async fn links(&self, path: &Path) -> Result<Vec<String>, AgentError> {
        let op = format!("list the links in {}", path.display());
        let links = read_links(&op, path).await?.unwrap_or_default();
        Ok(links.into_iter().map(|l| l.name).collect())
    }

    async fn pin_bridge_mac(&self, bridge: &str) -> Result<bool, AgentError> {
        if !valid_netns_name(bridge) {
            return Err(AgentError::InvalidArgument(format!(
                "bridge name {bridge:?}"
            )));
        }
        let sys = Path::new("/sys/class/net").join(bridge);
        let read = |f: &str| {
            std::fs::read_to_string(sys.join(f))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        if !sys.join("bridge").is_dir() {
            return Ok(false);
        }
        // NET_ADDR_SET: someone (the plugin, or we) already chose the address.
        if read("addr_assign_type") == "3" {
            return Ok(false);
        }
        let current = read("address");
        let mac = if usable_mac(&current) {
            current
        } else {
            random_mac()
        };
        let op = format!("pin mac of bridge {bridge}");
        let out = Self::ip(&op, &["link", "set", "dev", bridge, "address", &mac]).await?;
        if !out.success() {
            return Err(AgentError::Network {
                op,
                reason: out.stderr_text(),
            });
        }
        tracing::info!(bridge, mac, "pinned the bridge's mac address");
        Ok(true)
    }

    async fn forget_neighbour(&self, bridge: &str, ip: IpAddr) {
        if !valid_netns_name(bridge) {
            return;
        }
        let op = format!("forget neighbour {ip} on {bridge}");
        let ip = ip.to_string();
        // Most of the time there is no entry; "no such entry" is the expected answer.
        match Self::ip(&op, &["neigh", "del", &ip, "dev", bridge]).await {
            Ok(out) if out.success() => {
                tracing::debug!(bridge, ip, "dropped a stale neighbour entry")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(bridge, ip, error = %e, "cannot drop the neighbour entry"),
        }
    }

    async fn set_port_isolated(&self, port: &str, on: bool) -> Result<bool, AgentError> {
        if !valid_netns_name(port) {
            return Err(AgentError::InvalidArgument(format!("port name {port:?}")));
        }
        let op = format!("isolate bridge port {port}");
        let path = Path::new("/sys/class/net")
            .join(port)
            .join("brport/isolated");
        let want = if on { "1" } else { "0" };
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            if std::fs::read_to_string(&path)?.trim() == want {
                return Ok(false);
            }
            std::fs::write(&path, want)?;
            let now = std::fs::read_to_string(&path)?;
            if now.trim() != want {
                return Err(std::io::Error::other(format!(
                    "the flag reads {}",
                    now.trim()
                )));
            }
            Ok(true)
        })
        .await
        .map_err(|e| AgentError::Network {
            op: op.clone(),
            reason: e.to_string(),
        })?;
        r.map_err(|e| AgentError::Network {
            op,
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "no such port on a bridge (or the kernel has no port isolation)".into()
            } else {
                e.to_string()
            },
        })
    }

    async fn link_exists(&self, name: &str) -> bool {
        valid_netns_name(name) && Path::new("/sys/class/net").join(name).exists()
    }

    async fn disable_ipv6(&self, path: &Path) -> Result<(), AgentError> {
        let op = format!("turn ipv6 off in {}", path.display());
        let ns = path.to_path_buf();
        let r = tokio::task::spawn_blocking(move || {
            write_sysctls_in(
                &ns,
                &[
                    "net/ipv6/conf/all/disable_ipv6",
                    "net/ipv6/conf/default/disable_ipv6",
                ],
                "1",
            )
        })
        .await
        .map_err(|e| AgentError::Network {
            op: op.clone(),
            reason: e.to_string(),
        })?;
        match r {
            Ok(()) => Ok(()),
            // A kernel without IPv6 has nothing to turn off.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !Path::new("/proc/sys/net/ipv6").exists() =>
            {
                Ok(())
            }
            Err(e) => Err(AgentError::Network {
                op,
                reason: e.to_string(),
            }),
        }
    }

    async fn interface_mac(&self, path: &Path, ifname: &str) -> Result<Option<String>, AgentError> {
        let op = format!("read the mac of {ifname} in {}", path.display());
        let Some(links) = read_links(&op, path).await? else {
            return Ok(None);
        };
        Ok(links
            .into_iter()
            .find(|l| l.name == ifname)
            .and_then(|l| l.mac))
    }
}

/// One interface as the kernel reports it inside a namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkView {
    /// The interface's name, e.g. `eth0`.
    pub name: String,
    /// Whether it is administratively up (`IFF_UP`).
    pub up: bool,
    /// Its hardware address, lowercase, when it has one.
    pub mac: Option<String>,
    /// Its addresses with their prefix lengths, in the kernel's order.
    pub addrs: Vec<(IpAddr, u8)>,
}

/// The interfaces of the namespace at `path` (see [`links_in`]), `None` when it is not a
/// live namespace.
async fn read_links(op: &str, path: &Path) -> Result<Option<Vec<LinkView>>, AgentError> {
    let ns = path.to_path_buf();
    let r = tokio::task::spawn_blocking(move || {
        if !is_nsfs(&ns) {
            return Ok(None);
        }
        links_in(&ns).map(Some)
    })
    .await
    .map_err(|e| AgentError::Network {
        op: op.to_string(),
        reason: e.to_string(),
    })?;
    r.map_err(|e| AgentError::Network {
        op: op.to_string(),
        reason: e.to_string(),
    })
}

/// The interfaces of the network namespace at `ns`, read in-process: a thread of its own
/// enters the namespace, asks the kernel (`getifaddrs`, a netlink dump) and ends with it, so
/// no other thread ever runs in the bot's namespace. The periodic reconcile reads every bot's
/// interface this way; it used to cost an `nsenter` and an `ip` process per bot and pass.
pub fn links_in(ns: &Path) -> std::io::Result<Vec<LinkView>> {
    in_netns(ns, || {
        let mut links: Vec<LinkView> = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
            let at = match links.iter().position(|l| l.name == ifa.interface_name) {
                Some(i) => i,
                None => {
                    links.push(LinkView {
                        name: ifa.interface_name.clone(),
                        ..LinkView::default()
                    });
                    links.len() - 1
                }
            };
            let link = &mut links[at];
            link.up |= ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
            let Some(addr) = ifa.address else { continue };
            if let Some(hw) = addr.as_link_addr().and_then(|l| l.addr()) {
                link.mac = Some(
                    hw.iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            } else if let Some(v4) = addr.as_sockaddr_in() {
                let len = ifa
                    .netmask
                    .as_ref()
                    .and_then(|m| m.as_sockaddr_in())
                    .map_or(32, |m| u32::from(m.ip()).count_ones());
                link.addrs.push((IpAddr::V4(v4.ip()), len as u8));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                let len = ifa
                    .netmask
                    .as_ref()
                    .and_then(|m| m.as_sockaddr_in6())
                    .map_or(128, |m| u128::from(m.ip()).count_ones());
                link.addrs.push((IpAddr::V6(v6.ip()), len as u8));
            }
        }
        Ok(links)
    })
}

/// Runs `f` on a thread of its own that first enters the network namespace at `ns`, and
/// ends with it (a thread that entered a namespace never serves anything else).
fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = ns.to_path_buf();
    std::thread::Builder::new()
        .name("memoh-netns".into())
        .spawn(move || -> std::io::Result<T> {
            let file = std::fs::File::open(&ns)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            f()
        })?
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}

/// Writes `value` to the sysctls under `/proc/sys/` named in `keys`, inside the network
/// namespace at `ns`: a thread of its own enters the namespace (network sysctls belong to the
/// namespace of the task that opens them) and ends with it, so no other thread ever runs in
/// the wrong namespace.
fn write_sysctls_in(ns: &Path, keys: &[&str], value: &str) -> std::io::Result<()> {
    let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    let value = value.to_string();
    in_netns(ns, move || {
        for k in &keys {
            let p = Path::new("/proc/sys").join(k);
            std::fs::write(&p, &value)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
            let now = std::fs::read_to_string(&p)?;
            if now.trim() != value {
                return Err(std::io::Error::other(format!(
                    "{} is {} after writing {value}",
                    p.display(),
                    now.trim()
                )));
            }
        }
        Ok(())
    })
}

/// A random locally administered unicast MAC address.
fn random_mac() -> String {
    let mut b = [0u8; 6];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            ^ u128::from(std::process::id());
        b.copy_from_slice(&n.to_le_bytes()[..6]);
    }
    b[0] = (b[0] & 0xfe) | 0x02;
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `mac` is usable as an address (not empty, not all zeros).
fn usable_mac(mac: &str) -> bool {
    !mac.is_empty() && mac.split(':').any(|x| x != "00")
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// Parses `ip -j addr show dev X`: the addresses of the first (only) link; `None` when the
    /// output lists no link (for example a link that is down when `up` was asked for).
    fn parse_ip_addr_json(stdout: &[u8]) -> Result<Option<Vec<(IpAddr, u8)>>, String> {
        let text = String::from_utf8_lossy(stdout);
        if text.trim().is_empty() {
            return Ok(None);
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("ip -j output: {e}"))?;
        let Some(link) = v.as_array().and_then(|a| a.first()) else {
            return Ok(None);
        };
        let mut addrs = Vec::new();
        for a in link
            .get("addr_info")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(local), Some(len)) = (
                a.get("local").and_then(Value::as_str),
                a.get("prefixlen").and_then(Value::as_u64),
            ) else {
                continue;
            };
            let ip: IpAddr = local
                .parse()
                .map_err(|e| format!("ip -j address {local:?}: {e}"))?;
            addrs.push((ip, u8::try_from(len).unwrap_or(u8::MAX)));
        }
        Ok(Some(addrs))
    }

    /// The interface names of `ip -j link show` output.
    fn parse_link_names(json: &[u8]) -> Result<Vec<String>, String> {
        let v: Value = serde_json::from_slice(json).map_err(|e| format!("ip -j link: {e}"))?;
        Ok(v.as_array()
            .ok_or("ip -j link: not an array")?
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect())
    }

    #[test]
    fn link_names() {
        let out = br#"[{"ifindex":1,"ifname":"lo"},{"ifindex":2,"ifname":"eth0","link_index":7}]"#;
        assert_eq!(parse_link_names(out).unwrap(), ["lo", "eth0"]);
        assert_eq!(parse_link_names(b"[]").unwrap(), Vec::<String>::new());
        assert!(parse_link_names(b"{").is_err());
    }

    #[test]
    fn names() {
        let longest = "x".repeat(MAX_NETNS_NAME_LEN);
        // The longest name a bot's namespace gets (the longest containerd namespace and bot).
        let bot = "b".repeat(crate::ids::MAX_BOT_ID_LEN);
        assert!(valid_netns_name(&crate::ids::netns_name(
            &"n".repeat(76),
            &bot
        )));
        for ok in ["memoh-a", "memoh-default.a", "x.y", "A_9", longest.as_str()] {
            assert!(valid_netns_name(ok), "{ok}");
        }
        let too_long = "x".repeat(MAX_NETNS_NAME_LEN + 1);
        for bad in ["", ".", "..", "a/b", "a b", "../x", too_long.as_str()] {
            assert!(!valid_netns_name(bad), "{bad}");
        }
    }

    #[test]
    fn macs() {
        for _ in 0..20 {
            let m = random_mac();
            assert_eq!(m.len(), 17, "{m}");
            let first = u8::from_str_radix(&m[..2], 16).unwrap();
            assert_eq!(first & 0x03, 0x02, "{m} is local unicast");
            assert!(usable_mac(&m));
        }
        assert!(!usable_mac("00:00:00:00:00:00"));
        assert!(!usable_mac(""));
        assert!(usable_mac("96:66:84:57:35:22"));
    }

    #[test]
    fn ip_addr_json() {
        let out = br#"[{"ifindex":2,"ifname":"eth0","addr_info":[
            {"family":"inet","local":"10.210.3.7","prefixlen":24,"scope":"global"},
            {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#;
        let got = parse_ip_addr_json(out).unwrap().unwrap();
        assert_eq!(
            got,
            vec![
                ("10.210.3.7".parse().unwrap(), 24),
                ("fe80::1".parse().unwrap(), 64)
            ]
        );
        assert_eq!(parse_ip_addr_json(b"").unwrap(), None);
        assert_eq!(parse_ip_addr_json(b"[]").unwrap(), None);
        assert_eq!(
            parse_ip_addr_json(br#"[{"ifname":"eth0","addr_info":[]}]"#).unwrap(),
            Some(vec![])
        );
        assert!(parse_ip_addr_json(b"{").is_err());
    }

    /// `ip -j addr show` of the whole namespace as [`LinkView`]s.
    fn parse_ip_addr_all(stdout: &[u8]) -> Vec<LinkView> {
        let v: Value = serde_json::from_slice(stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let one = serde_json::to_vec(&[l]).unwrap();
                LinkView {
                    name: l["ifname"].as_str().unwrap().to_string(),
                    up: l["flags"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|x| x == "UP")),
                    mac: l["address"].as_str().map(str::to_ascii_lowercase),
                    addrs: parse_ip_addr_json(&one).unwrap().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The in-process read sees what `ip` sees: every link of the host's own namespace with
    /// its state, hardware address and addresses (prefix lengths included). Needs root (to
    /// enter a namespace) and iproute2; skipped without them.
    #[test]
    fn links_in_agrees_with_ip() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to enter a namespace");
            return;
        }
        let ns = Path::new("/proc/self/ns/net");
        let mut last = String::new();
        // Links come and go on a busy host (other bots' veths): a few tries for one quiet
        // moment in which both reads agree.
        for _ in 0..5 {
            let Ok(out) = std::process::Command::new("ip")
                .args(["-j", "addr", "show"])
                .output()
            else {
                eprintln!("skipped: no ip");
                return;
            };
            let mut want = parse_ip_addr_all(&out.stdout);
            let mut got = links_in(ns).unwrap();
            // `ip` prints no address for a link that has none (a tunnel).
            for l in want.iter_mut().chain(got.iter_mut()) {
                if l.mac.as_deref() == Some("") {
                    l.mac = None;
                }
            }
            want.sort_by(|a, b| a.name.cmp(&b.name));
            got.sort_by(|a, b| a.name.cmp(&b.name));
            if want == got {
                let lo = got.iter().find(|l| l.name == "lo").expect("lo");
                assert!(lo.up);
                assert!(lo.addrs.contains(&("127.0.0.1".parse().unwrap(), 8)));
                return;
            }
            last = format!("ip: {want:?}\nin-process: {got:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the in-process read disagrees with ip:\n{last}");
    }
}
