//! Host firewall rules: the MASQUERADE fallback for the bot subnet, bot-to-bot isolation on
//! the bridge, clean-up of the bridge plugin's masquerade chains, and the nftables ruleset of
//! [`super::containment`] (anti-spoofing, bot-to-host, egress, and the bridge-level layers of
//! isolation).
//!
//! Isolation is an iptables chain (default `MEMOH-ISOLATION`) jumped to from the top of
//! `FORWARD`, holding one `-i BRIDGE -o BRIDGE -j DROP` rule per bridge. With bridge netfilter
//! on, frames switched between two ports of the bridge traverse `FORWARD` with the bridge as
//! both input and output device, so bot-to-bot traffic is dropped, while traffic to the host
//! (the gateway, `INPUT`) and out of the host (`-o` another device) is untouched. Being per
//! bridge, it also covers bots attached after it was set, with no per-veth state to keep. It is
//! the third of the isolation layers [`super::containment`] describes (IPv4, and only with bridge
//! netfilter on, which [`Firewall::ensure_bridge_netfilter`] sees to).

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::error::AgentError;

use super::cmd;

/// Default chain for isolation rules.
pub const DEFAULT_ISOLATION_CHAIN: &str = "MEMOH-ISOLATION";
/// Default comment marking the agent's MASQUERADE rule.
pub const DEFAULT_MASQ_COMMENT: &str = "memoh-masq";

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// The bridge netfilter settings the iptables layer of isolation needs.
pub const BRIDGE_NETFILTER_SYSCTLS: &[&str] = &[
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

/// The outside system: the host's packet filter.
pub trait Firewall: Send + Sync {
    /// Makes sure `-s SUBNET ! -d SUBNET -j MASQUERADE` exists in nat `POSTROUTING`; returns
    /// whether it had to be added.
    fn ensure_masquerade(
        &self,
        subnet: &str,
    ) -> impl Future<Output = Result<bool, AgentError>> + Send;

    /// Removes that rule; returns whether it was there.
    fn remove_masquerade(
        &self,
        subnet: &str,
    ) -> impl Future<Output = Result<bool, AgentError>> + Send;

    /// Makes sure traffic between two ports of `bridge` is dropped; returns whether the rule
    /// had to be added.
    fn ensure_isolation(
        &self,
        bridge: &str,
    ) -> impl Future<Output = Result<bool, AgentError>> + Send;

    /// Removes the isolation of `bridge` (and the chain and its jump once no bridge is left);
    /// returns whether the rule was there.
    fn remove_isolation(
        &self,
        bridge: &str,
    ) -> impl Future<Output = Result<bool, AgentError>> + Send;

    /// Replaces the agent's nftables tables with `script` (from [`super::containment::render`]
    /// or [`super::containment::remove_script`]) in one transaction.
    fn apply_ruleset(&self, script: &str) -> impl Future<Output = Result<(), AgentError>> + Send;

    /// The nftables tables on the host, as `(family, name)` pairs.
    fn tables(&self) -> impl Future<Output = Result<Vec<(String, String)>, AgentError>> + Send;

    /// Turns bridge netfilter's `bridge-nf-call-iptables` and `-ip6tables` on (the iptables
    /// layer of isolation needs them); returns the settings it changed. Settings the kernel
    /// does not have are reported as an error naming them.
    fn ensure_bridge_netfilter(
        &self,
    ) -> impl Future<Output = Result<Vec<String>, AgentError>> + Send;

    /// Removes the bridge plugin's per-container masquerade rule and chain for `container`
    /// on `network`. The plugin only removes them itself when the container's namespace still
    /// exists at DEL; returns how many rules it removed.
    fn remove_cni_masq(
        &self,
        network: &str,
        container: &str,
    ) -> impl Future<Output = Result<usize, AgentError>> + Send;
}

/// [`Firewall`] through the `iptables` command (either backend).
#[derive(Debug, Clone)]
pub struct Iptables {
    chain: String,
    masq_comment: String,
    // Check-then-add sequences must not interleave within the process...
    lock: Arc<Mutex<()>>,
    // ...nor with another agent's on the same host (tests run several; an operator may run
    // a second one by mistake): a file lock held for the same sequences.
    host_lock: PathBuf,
}

/// The file whose lock orders firewall changes across processes.
pub const HOST_LOCK_PATH: &str = "/run/memoh-firewall.lock";

/// Both locks, held while a check-then-change sequence runs.
struct Locked {
    _file: Option<nix::fcntl::Flock<std::fs::File>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Default for Iptables {
    fn default() -> Self {
        Self::with_names(DEFAULT_ISOLATION_CHAIN, DEFAULT_MASQ_COMMENT)
    }
}

impl Iptables {
    /// The production names.
    pub fn new() -> Self {
        Self::default()
    }

    /// Custom chain and comment, so tests never touch the production rules.
    pub fn with_names(chain: &str, masq_comment: &str) -> Self {
        Self {
            chain: chain.to_string(),
            masq_comment: masq_comment.to_string(),
            lock: Arc::new(Mutex::new(())),
            host_lock: PathBuf::from(HOST_LOCK_PATH),
        }
    }

    /// Takes the process lock, then the host's file lock (waiting for other processes). A
    /// lock file that cannot be opened leaves only the process lock, with a warning.
    async fn locked(&self) -> Locked {
        let guard = self.lock.clone().lock_owned().await;
        let path = self.host_lock.clone();
        let file = tokio::task::spawn_blocking(move || {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| std::io::Error::from(errno))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        let file = match file {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %self.host_lock.display(), error = %e, "cannot take the firewall's host lock; ordering changes within this process only");
                None
            }
        };
        Locked {
            _file: file,
            _guard: guard,
        }
    }

    /// The isolation chain.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// The MASQUERADE comment.
    pub fn masq_comment(&self) -> &str {
        &self.masq_comment
    }

    async fn run(op: &str, args: &[&str]) -> Result<cmd::Finished, AgentError> {
        let mut full = vec!["-w", "5"];
        full.extend_from_slice(args);
        cmd::run(op, "iptables".as_ref(), full, &[], None, TOOL_TIMEOUT).await
    }

    /// Runs a command that must succeed.
    async fn must(op: &str, args: &[&str]) -> Result<(), AgentError> {
        let out = Self::run(op, args).await?;
        if out.success() {
            Ok(())
        } else {
            Err(AgentError::Network {
                op: op.to_string(),
                reason: format!("iptables {}: {}", args.join(" "), out.stderr_text()),
            })
        }
    }

    /// `-C`: exit 0 means present, 1 means absent; anything else is an error.
    async fn rule_exists(
        op: &str,
        table: &str,
        chain: &str,
        rule: &[&str],
    ) -> Result<bool, AgentError> {
        let mut args = vec!["-t", table, "-C", chain];
        args.extend_from_slice(rule);
        let out = Self::run(op, &args).await?;
        match out.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(AgentError::Network {
                op: op.to_string(),
                reason: format!("iptables {}: {}", args.join(" "), out.stderr_text()),
            }),
        }
    }

    async fn chain_exists(op: &str, table: &str, chain: &str) -> Result<bool, AgentError> {
        Ok(Self::run(op, &["-t", table, "-S", chain]).await?.success())
    }

    /// `-N`; a chain that another process (a second agent, an operator's script) created
    /// since the caller looked is fine: the lock only orders this process's changes.
    async fn create_chain(op: &str, table: &str, chain: &str) -> Result<(), AgentError> {
        match Self::must(op, &["-t", table, "-N", chain]).await {
            Err(_) if Self::chain_exists(op, table, chain).await? => Ok(()),
            r => r,
        }
    }

    fn masq_rule<'a>(&'a self, subnet: &'a str) -> Vec<&'a str> {
        vec![
            "-s",
            subnet,
            "!",
            "-d",
            subnet,
            "-j",
            "MASQUERADE",
            "-m",
            "comment",
            "--comment",
            &self.masq_comment,
        ]
    }
}

/// Checks `subnet` is an IPv4 CIDR (iptables is the IPv4 table).
fn check_subnet(subnet: &str) -> Result<(), AgentError> {
    match super::result::parse_cidr(subnet) {
        Ok((IpAddr::V4(_), _)) => Ok(()),
        Ok(_) => Err(AgentError::InvalidArgument(format!(
            "subnet {subnet:?} is not IPv4"
        ))),
        Err(e) => Err(AgentError::InvalidArgument(format!("subnet: {e}"))),
    }
}

/// Checks an interface name as the kernel would accept it.
fn check_ifname(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "interface name {name:?}"
        )))
    }
}

impl Firewall for Iptables {
    async fn ensure_masquerade(&self, subnet: &str) -> Result<bool, AgentError> {
        check_subnet(subnet)?;
        let op = format!("ensure masquerade for {subnet}");
        let _g = self.locked().await;
        let rule = self.masq_rule(subnet);
        if Self::rule_exists(&op, "nat", "POSTROUTING", &rule).await? {
            return Ok(false);
        }
        let mut args = vec!["-t", "nat", "-A", "POSTROUTING"];
        args.extend_from_slice(&rule);
        Self::must(&op, &args).await?;
        tracing::info!(subnet, "added masquerade rule");
        Ok(true)
    }

    async fn remove_masquerade(&self, subnet: &str) -> Result<bool, AgentError> {
        check_subnet(subnet)?;
        let op = format!("remove masquerade for {subnet}");
        let _g = self.locked().await;
        let rule = self.masq_rule(subnet);
        let mut removed = false;
        while Self::rule_exists(&op, "nat", "POSTROUTING", &rule).await? {
            let mut args = vec!["-t", "nat", "-D", "POSTROUTING"];
            args.extend_from_slice(&rule);
            Self::must(&op, &args).await?;
            removed = true;
        }
        Ok(removed)
    }

    async fn ensure_isolation(&self, bridge: &str) -> Result<bool, AgentError> {
        check_ifname(bridge)?;
        let op = format!("ensure isolation on {bridge}");
        let chain = self.chain.as_str();
        let _g = self.locked().await;
        if !Self::chain_exists(&op, "filter", chain).await? {
            Self::create_chain(&op, "filter", chain).await?;
        }
        let rule = ["-i", bridge, "-o", bridge, "-j", "DROP"];
        let added = if Self::rule_exists(&op, "filter", chain, &rule).await? {
            false
        } else {
            let mut args = vec!["-t", "filter", "-A", chain];
            args.extend_from_slice(&rule);
            Self::must(&op, &args).await?;
            tracing::info!(bridge, chain, "isolated bridge ports");
            true
        };
        if !Self::rule_exists(&op, "filter", "FORWARD", &["-j", chain]).await? {
            Self::must(&op, &["-t", "filter", "-I", "FORWARD", "1", "-j", chain]).await?;
        }
        Ok(added)
    }

    async fn remove_isolation(&self, bridge: &str) -> Result<bool, AgentError> {
        check_ifname(bridge)?;
        let op = format!("remove isolation on {bridge}");
        let chain = self.chain.as_str();
        let _g = self.locked().await;
        if !Self::chain_exists(&op, "filter", chain).await? {
            return Ok(false);
        }
        let rule = ["-i", bridge, "-o", bridge, "-j", "DROP"];
        let mut removed = false;
        while Self::rule_exists(&op, "filter", chain, &rule).await? {
            let mut args = vec!["-t", "filter", "-D", chain];
            args.extend_from_slice(&rule);
            Self::must(&op, &args).await?;
            removed = true;
        }
        let listing = Self::run(&op, &["-t", "filter", "-S", chain]).await?;
        let rules_left = listing
            .stdout_text()
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        if rules_left == 0 {
            while Self::rule_exists(&op, "filter", "FORWARD", &["-j", chain]).await? {
                Self::must(&op, &["-t", "filter", "-D", "FORWARD", "-j", chain]).await?;
            }
            // Another process may have used it again meanwhile (it stays) or removed it
            // (gone anyway); a chain still there, empty and unreferenced, is a real failure.
            if let Err(e) = Self::must(&op, &["-t", "filter", "-X", chain]).await {
                let listing = Self::run(&op, &["-t", "filter", "-S", chain]).await?;
                let in_use = !listing.success()
                    || listing.stdout_text().lines().any(|l| l.starts_with("-A "))
                    || Self::rule_exists(&op, "filter", "FORWARD", &["-j", chain]).await?;
                if !in_use {
                    return Err(e);
                }
                tracing::debug!(chain, error = %e, "isolation chain in use again or gone");
            }
        }
        Ok(removed)
    }

    async fn apply_ruleset(&self, script: &str) -> Result<(), AgentError> {
        let op = "apply the containment ruleset";
        let out = cmd::run(
            op,
            "nft".as_ref(),
            ["-f", "-"],
            &[],
            Some(script.as_bytes()),
            TOOL_TIMEOUT,
        )
        .await
        .map_err(|e| match e {
            AgentError::Network { op, reason } => AgentError::Network {
                op,
                reason: format!(
                    "{reason} (bots are contained with nftables: install the nftables package)"
                ),
            },
            e => e,
        })?;
        if out.success() {
            Ok(())
        } else {
            Err(AgentError::Network {
                op: op.to_string(),
                reason: format!("nft -f: {}", out.stderr_text()),
            })
        }
    }

    async fn tables(&self) -> Result<Vec<(String, String)>, AgentError> {
        let op = "list nftables tables";
        let out = cmd::run(
            op,
            "nft".as_ref(),
            ["list", "tables"],
            &[],
            None,
            TOOL_TIMEOUT,
        )
        .await?;
        if !out.success() {
            return Err(AgentError::Network {
                op: op.to_string(),
                reason: format!("nft list tables: {}", out.stderr_text()),
            });
        }
        Ok(parse_tables(&String::from_utf8_lossy(&out.stdout)))
    }

    async fn ensure_bridge_netfilter(&self) -> Result<Vec<String>, AgentError> {
        tokio::task::spawn_blocking(|| {
            let mut changed = Vec::new();
            let mut missing = Vec::new();
            for path in BRIDGE_NETFILTER_SYSCTLS {
                match std::fs::read_to_string(path) {
                    Ok(v) if v.trim() == "1" => {}
                    Ok(_) => {
                        std::fs::write(path, "1").map_err(|e| AgentError::io(path, e))?;
                        changed.push(path.to_string());
                    }
                    Err(_) => missing.push(path.to_string()),
                }
            }
            if missing.is_empty() {
                Ok(changed)
            } else {
                Err(AgentError::Network {
                    op: "turn bridge netfilter on".into(),
                    reason: format!(
                        "{} missing (br_netfilter is not loaded)",
                        missing.join(", ")
                    ),
                })
            }
        })
        .await
        .map_err(|e| AgentError::Network {
            op: "turn bridge netfilter on".into(),
            reason: e.to_string(),
        })?
    }

    async fn remove_cni_masq(&self, network: &str, container: &str) -> Result<usize, AgentError> {
        let op = format!("remove cni masquerade of {container}");
        let _g = self.locked().await;
        let listing = Self::run(&op, &["-t", "nat", "-S", "POSTROUTING"]).await?;
        if !listing.success() {
            return Err(AgentError::Network {
                op,
                reason: listing.stderr_text(),
            });
        }
        let comment = cni_masq_comment(network, container);
        let found = find_cni_masq_rules(&listing.stdout_text(), network, container);
        for (source, chain) in &found {
            let del = [
                "-t",
                "nat",
                "-D",
                "POSTROUTING",
                "-s",
                source,
                "-j",
                chain,
                "-m",
                "comment",
                "--comment",
                &comment,
            ];
            Self::must(&op, &del).await?;
            // Other rules may still jump to the chain (a second address): only drop it when
            // the kernel agrees it is unused.
            let _ = Self::run(&op, &["-t", "nat", "-F", chain]).await;
            let _ = Self::run(&op, &["-t", "nat", "-X", chain]).await;
        }
        if !found.is_empty() {
            tracing::info!(
                container,
                rules = found.len(),
                "removed leftover cni masquerade"
            );
        }
        Ok(found.len())
    }
}

/// The comment the bridge plugin puts on its masquerade rules.
/// The `(family, name)` pairs of an `nft list tables` listing.
fn parse_tables(listing: &str) -> Vec<(String, String)> {
    listing
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("table"), Some(family), Some(name), None) => {
                    Some((family.to_string(), name.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

fn cni_masq_comment(network: &str, container: &str) -> String {
    format!("name: \"{network}\" id: \"{container}\"")
}

/// Finds the bridge plugin's rules for `container` in `iptables -t nat -S POSTROUTING`
/// output: `(source, chain)` pairs of `-A POSTROUTING -s SRC -m comment --comment
/// "name: \"NET\" id: \"ID\"" -j CNI-...`.
fn find_cni_masq_rules(listing: &str, network: &str, container: &str) -> Vec<(String, String)> {
    let quoted = format!(
        "\"{}\"",
        cni_masq_comment(network, container).replace('"', "\\\"")
    );
    listing
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING ") && l.contains(&quoted))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let after = |flag: &str| {
                words
                    .iter()
                    .rposition(|w| *w == flag)
                    .and_then(|i| words.get(i + 1))
                    .map(|w| w.to_string())
            };
            let source = after("-s")?;
            let chain = after("-j")?;
            chain.starts_with("CNI-").then_some((source, chain))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bridge_plugin_masquerade() {
        let listing = r#"-P POSTROUTING ACCEPT
-A POSTROUTING -s 10.88.0.5/32 -m comment --comment "name: \"memoh-cni\" id: \"mcp-a\"" -j CNI-0123456789abcdef01234567
-A POSTROUTING -s 10.88.0.6/32 -m comment --comment "name: \"memoh-cni\" id: \"mcp-ab\"" -j CNI-aaaaaaaaaaaaaaaaaaaaaaaa
-A POSTROUTING -s 10.89.0.5/32 -m comment --comment "name: \"other\" id: \"mcp-a\"" -j CNI-bbbbbbbbbbbbbbbbbbbbbbbb
-A POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 -m comment --comment memoh-masq -j MASQUERADE"#;
        let cases = [
            (
                "memoh-cni",
                "mcp-a",
                vec![("10.88.0.5/32", "CNI-0123456789abcdef01234567")],
            ),
            (
                "memoh-cni",
                "mcp-ab",
                vec![("10.88.0.6/32", "CNI-aaaaaaaaaaaaaaaaaaaaaaaa")],
            ),
            (
                "other",
                "mcp-a",
                vec![("10.89.0.5/32", "CNI-bbbbbbbbbbbbbbbbbbbbbbbb")],
            ),
            ("memoh-cni", "mcp-z", vec![]),
        ];
        for (net, id, want) in cases {
            let got = find_cni_masq_rules(listing, net, id);
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(got, want, "{net} {id}");
        }
    }

    #[test]
    fn table_listing() {
        assert_eq!(
            parse_tables("table ip filter\ntable bridge memoh-a.b\n\njunk\n"),
            vec![
                ("ip".to_string(), "filter".to_string()),
                ("bridge".to_string(), "memoh-a.b".to_string())
            ]
        );
    }

    #[test]
    fn validation() {
        assert!(check_subnet("10.88.0.0/16").is_ok());
        for bad in ["10.88.0.0", "fd00::/64", "x/8", "-j ACCEPT"] {
            assert!(check_subnet(bad).is_err(), "{bad}");
        }
        assert!(check_ifname("cni0").is_ok());
        for bad in ["", "-i", "a b", "abcdefghijklmnop"] {
            assert!(check_ifname(bad).is_err(), "{bad}");
        }
    }
}
