//! `memoh-agent net cleanup`: what the agent's containerd namespace left behind on the host
//! and no existing bot uses, removed ([`Network::cleanup`]).
//!
//! In order: saved attachments of bots that no longer exist (torn down as a delete would:
//! CNI DEL frees their address, their namespace and state go); namespaces named for this
//! agent's namespace ([`ids::netns_name`]) of bots that no longer exist; namespaces an older
//! agent named `memoh-<bot>` of bots that no longer exist and that hold no interface but `lo`
//! (the name is the same in every containerd namespace and the prefix is not only the
//! agent's, so one with an interface may be another agent's live bot or someone's own); host-local reservations of the agent's network held by `mcp-<bot>` of a
//! bot that no longer exists and for an address no namespace on the host holds; and, when no
//! bot is attached any more, the agent's nftables tables, the isolation rule of its bridge
//! and the MASQUERADE rule of its subnet.
//!
//! The candidates are listed before the live bots are asked for: a bot's container exists
//! before its namespace does, so a bot created meanwhile is never taken for a leftover.

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::{containment, state, Firewall, Netns, Network, PluginExec};
use crate::error::AgentError;
use crate::ids;

/// Where host-local keeps its reservations when the network does not say.
pub const HOST_LOCAL_DEFAULT_DIR: &str = "/var/lib/cni/networks";

/// What a leftover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LeftoverKind {
    /// A saved attachment of a bot that no longer exists (torn down).
    Attachment,
    /// A network namespace.
    Netns,
    /// A host-local address reservation.
    Reservation,
    /// One of the agent's nftables tables.
    Table,
    /// The iptables isolation rule of a bridge.
    IsolationRule,
    /// The iptables MASQUERADE rule of a subnet.
    MasqueradeRule,
}

/// One thing [`Network::cleanup`] removed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Leftover {
    /// What it was.
    pub kind: LeftoverKind,
    /// Its name (a bot, a namespace, an address, a table, a bridge or a subnet).
    pub name: String,
}

impl std::fmt::Display for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            LeftoverKind::Attachment => "network attachment of bot",
            LeftoverKind::Netns => "network namespace",
            LeftoverKind::Reservation => "address reservation",
            LeftoverKind::Table => "nftables table",
            LeftoverKind::IsolationRule => "isolation rule of bridge",
            LeftoverKind::MasqueradeRule => "masquerade rule of subnet",
        };
        write!(f, "{what} {}", self.name)
    }
}

fn found(kind: LeftoverKind, name: impl Into<String>) -> Leftover {
    Leftover {
        kind,
        name: name.into(),
    }
}

impl<E: PluginExec, F: Firewall, N: Netns> Network<E, F, N> {
    /// Removes what this agent's namespace left behind and no existing bot uses (see the
    /// module docs); `live_bots` names the bots that exist. Returns what it removed.
    pub async fn cleanup<Fut>(
        &self,
        live_bots: impl FnOnce() -> Fut,
    ) -> Result<Vec<Leftover>, AgentError>
    where
        Fut: Future<Output = Result<HashSet<String>, AgentError>>,
    {
        let saved = state::load_all(&self.cfg.state_dir).await?;
        let namespaces = self.netns.list().await?;
        let ipam_dir = self.ipam_dir().await;
        let reservations = match &ipam_dir {
            Some(dir) => read_reservations(dir).await?,
            None => Vec::new(),
        };
        let live = live_bots().await?;
        let mut removed = Vec::new();

        for s in saved.iter().filter(|s| !live.contains(&s.bot)) {
            self.teardown(&s.bot).await?;
            removed.push(found(LeftoverKind::Attachment, &s.bot));
        }

        let attached: HashSet<PathBuf> = state::load_all(&self.cfg.state_dir)
            .await?
            .into_iter()
            .map(|s| s.netns)
            .collect();
        // Only those listed before the live bots were, and not gone with a teardown above.
        let still: HashSet<String> = self.netns.list().await?.into_iter().collect();
        for name in namespaces.iter().filter(|n| still.contains(*n)) {
            let path = self.netns.path(name);
            if attached.contains(&path) {
                continue;
            }
            let ours =
                ids::bot_of_netns(&self.cfg.namespace, name).is_some_and(|b| !live.contains(b));
            let old = ids::bot_of_legacy_netns(name).is_some_and(|b| !live.contains(b))
                && self.netns.links(&path).await?.iter().all(|l| l == "lo");
            if ours || old {
                self.netns.delete(name).await?;
                tracing::info!(netns = %name, "removed a leftover network namespace");
                removed.push(found(LeftoverKind::Netns, name.as_str()));
            }
        }

        let stale: Vec<&Reservation> = reservations
            .iter()
            .filter(|r| ids::bot_of_container(&r.owner).is_some_and(|b| !live.contains(b)))
            .collect();
        if !stale.is_empty() {
            let held = self.addresses_held().await?;
            for r in stale.into_iter().filter(|r| !held.contains(&r.ip)) {
                match tokio::fs::remove_file(&r.path).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(AgentError::io(&r.path, e)),
                }
                tracing::info!(ip = %r.ip, owner = %r.owner, "removed a leftover address reservation");
                removed.push(found(
                    LeftoverKind::Reservation,
                    format!("{} ({})", r.ip, r.owner),
                ));
            }
        }

        removed.extend(self.remove_idle_rules().await?);
        Ok(removed)
    }

    /// With no bot attached: the agent's tables, the isolation rule of its bridge and the
    /// MASQUERADE rule of its subnet, those that are there. Holds the containment lock, so an
    /// attach that starts meanwhile rebuilds after it.
    async fn remove_idle_rules(&self) -> Result<Vec<Leftover>, AgentError> {
        let _g = self.contain_lock.lock().await;
        if !state::load_all(&self.cfg.state_dir).await?.is_empty() {
            return Ok(Vec::new());
        }
        // What is removed here no earlier pass answers for any more.
        self.forget_passes();
        let mut removed = Vec::new();
        let table = &self.cfg.containment.table;
        let ours: Vec<String> = self
            .firewall
            .tables()
            .await?
            .into_iter()
            .filter(|(family, name)| name == table && (family == "bridge" || family == "inet"))
            .map(|(family, name)| format!("{family} {name}"))
            .collect();
        if !ours.is_empty() {
            self.firewall
                .apply_ruleset(&containment::remove_script(table))
                .await?;
            removed.extend(ours.into_iter().map(|t| found(LeftoverKind::Table, t)));
        }
        let bridge = match self.load_network().await {
            Ok(net) => net.bridge_name(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the network; using the configured bridge");
                Some(self.cfg.bridge.clone())
            }
        };
        if let Some(bridge) = bridge {
            if self.firewall.remove_isolation(&bridge).await? {
                removed.push(found(LeftoverKind::IsolationRule, bridge));
            }
        }
        if self.firewall.remove_masquerade(&self.cfg.subnet).await? {
            removed.push(found(LeftoverKind::MasqueradeRule, self.cfg.subnet.clone()));
        }
        Ok(removed)
    }

    /// host-local's directory for the agent's network, when the network uses host-local.
    async fn ipam_dir(&self) -> Option<PathBuf> {
        let net = match self.load_network().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the network; skipping address reservations");
                return None;
            }
        };
        let ipam = net.to_value()["plugins"]
            .as_array()?
            .iter()
            .find_map(|p| p.get("ipam").filter(|i| i["type"] == "host-local").cloned())?;
        let base = ipam["dataDir"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(HOST_LOCAL_DEFAULT_DIR));
        Some(base.join(&net.name))
    }

    /// The addresses the interfaces of every namespace on the host hold (the agent's and any
    /// other agent's bots).
    async fn addresses_held(&self) -> Result<HashSet<IpAddr>, AgentError> {
        let mut held = HashSet::new();
        for name in self.netns.list().await? {
            let path = self.netns.path(&name);
            if let Some(addrs) = self.netns.interface_addrs(&path, &self.cfg.ifname).await? {
                held.extend(addrs.into_iter().map(|(ip, _)| ip));
            }
        }
        Ok(held)
    }
}

/// One host-local reservation: the file named by the address, holding its owner's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reservation {
    pub path: PathBuf,
    pub ip: IpAddr,
    /// `CNI_CONTAINERID` of the owner.
    pub owner: String,
}

/// The reservations in host-local directory `dir` (files named by an address; the first line
/// is the owner).
pub(super) async fn read_reservations(dir: &Path) -> Result<Vec<Reservation>, AgentError> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AgentError::io(dir, e)),
    };
    let mut out = Vec::new();
    while let Some(e) = entries
        .next_entry()
        .await
        .map_err(|e| AgentError::io(dir, e))?
    {
        let Some(ip) = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let path = e.path();
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            continue;
        };
        let owner = text.lines().next().unwrap_or_default().trim().to_string();
        out.push(Reservation { path, ip, owner });
    }
    out.sort_by_key(|r| r.ip);
    Ok(out)
}
