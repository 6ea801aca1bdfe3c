//! What is inside a bot's network namespace, read and written in-process.
//!
//! A thread of its own enters the namespace ([`in_netns`]), does its work and ends with it, so
//! no other thread ever runs in a bot's namespace. The periodic health check reads every
//! bot's interface this way ([`links_in`]); it used to cost an `nsenter` and an `ip` process
//! per bot and pass. The namespace's sysctls are written the same way.

use std::net::IpAddr;
use std::path::Path;

use crate::error::AgentError;

use super::netns::{is_nsfs, mac_string};

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

/// The interfaces of the namespace at `path` ([`links_in`]), `None` when it is not a live
/// namespace. The runtime only waits: the work is on the namespace's own thread.
pub(super) async fn read_links(op: &str, path: &Path) -> Result<Option<Vec<LinkView>>, AgentError> {
    let ns = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let fail = |reason: String| AgentError::Network {
        op: op.to_string(),
        reason,
    };
    std::thread::Builder::new()
        .name("memoh-netns".into())
        .spawn(move || {
            let r = if is_nsfs(&ns) {
                links_in(&ns).map(Some)
            } else {
                Ok(None)
            };
            let _ = tx.send(r);
        })
        .map_err(|e| fail(e.to_string()))?;
    rx.await
        .map_err(|_| fail("namespace thread ended without an answer".into()))?
        .map_err(|e| fail(e.to_string()))
}

/// The interfaces of the network namespace at `ns`, read in-process (`getifaddrs`, one
/// netlink dump) on a thread that enters the namespace ([`in_netns`]).
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
                link.mac = Some(mac_string(&hw));
            } else if let Some(ip) = ip_of(&addr) {
                let len = ifa.netmask.as_ref().and_then(ip_of).map_or(
                    if ip.is_ipv4() { 32 } else { 128 },
                    |m| match m {
                        IpAddr::V4(m) => u32::from(m).count_ones(),
                        IpAddr::V6(m) => u128::from(m).count_ones(),
                    },
                );
                link.addrs.push((ip, len as u8));
            }
        }
        Ok(links)
    })
}

/// The IP address of a socket address, when it is one.
fn ip_of(a: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    a.as_sockaddr_in()
        .map(|v4| IpAddr::V4(v4.ip()))
        .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
}

/// Runs `f` on a thread of its own that first enters the network namespace at `ns`, and
/// ends with it (a thread that entered a namespace never serves anything else).
pub(super) fn in_netns<T: Send + 'static>(
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
/// namespace at `ns` (network sysctls belong to the namespace of the task that opens them).
pub(super) fn write_sysctls_in(ns: &Path, keys: &[&str], value: &str) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;

    /// `ip -j addr show` of a whole namespace as [`LinkView`]s.
    fn parse_ip_addr_all(stdout: &[u8]) -> Vec<LinkView> {
        let v: Value = serde_json::from_slice(stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| LinkView {
                name: l["ifname"].as_str().unwrap().to_string(),
                up: l["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "UP")),
                mac: l["address"]
                    .as_str()
                    .filter(|m| !m.is_empty())
                    .map(str::to_ascii_lowercase),
                addrs: l["addr_info"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| {
                        let ip: IpAddr = a["local"].as_str()?.parse().ok()?;
                        Some((ip, a["prefixlen"].as_u64()? as u8))
                    })
                    .collect(),
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

    /// A path that is no namespace is `None`, not an error.
    #[tokio::test]
    async fn a_missing_namespace_has_no_links() {
        let dir = tempfile::tempdir().unwrap();
        let got = read_links("test", &dir.path().join("gone")).await.unwrap();
        assert_eq!(got, None);
    }
}
