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
use super::inside::{read_links, write_sysctls_in};

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
/// ([`super::inside::links_in`]).
#[derive(Debug, Clone, Default)]
pub struct IpNetns;

impl IpNetns {
    async fn ip(op: &str, args: &[&str]) -> Result<cmd::Finished, AgentError> {
        cmd::run(op, "ip".as_ref(), args, &[], None, TOOL_TIMEOUT).await
    }
}

/// Whether `path` is a namespace file: a bind mount of nsfs.
pub(super) fn is_nsfs(path: &Path) -> bool {
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
    mac_string(&b)
}

/// A hardware address as `aa:bb:cc:dd:ee:ff`.
pub(super) fn mac_string(b: &[u8; 6]) -> String {
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
    use super::*;

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
}
