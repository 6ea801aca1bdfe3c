//! The host rules around the attachments: the containment ruleset rebuilt from the saved
//! attachments ([`Network::contain`]), the MASQUERADE fallback and the iptables layer of
//! bot-to-bot isolation ([`Network::ensure_host_rules`]), and lifting isolation.

use std::sync::atomic::Ordering;

use super::Network;
use super::{bot_addrs, containment, lock, state, BotNetwork, Firewall, Netns, PluginExec};
use crate::error::AgentError;

impl<E: PluginExec, F: Firewall, N: Netns> Network<E, F, N> {
    /// Every bot this agent has attached (its saved attachments), described.
    pub(super) async fn attached(&self) -> Result<Vec<BotNetwork>, AgentError> {
        Ok(state::load_all(&self.cfg.state_dir)
            .await?
            .iter()
            .filter_map(|s| match self.describe(s) {
                Ok(bn) => Some(bn),
                Err(e) => {
                    tracing::warn!(bot = %s.bot, error = %e, "skipping an unusable attachment");
                    None
                }
            })
            .collect())
    }

    /// Whether bot-to-bot isolation applies to `bridge`.
    pub(super) fn isolates(&self, bridge: &str) -> bool {
        self.cfg.isolate && !lock(&self.lifted).contains(bridge)
    }

    /// Rebuilds the containment ruleset from the saved attachments (see
    /// [`containment`]); with no attachment left, removes the agent's tables.
    pub async fn contain(&self) -> Result<(), AgentError> {
        let _g = self.contain_lock.lock().await;
        self.contain_locked().await
    }

    /// [`Network::contain`]; the caller holds `contain_lock`.
    pub(super) async fn contain_locked(&self) -> Result<(), AgentError> {
        let policy = &self.cfg.containment;
        if !policy.enabled && !self.cfg.isolate {
            return Ok(());
        }
        let mut ports = Vec::new();
        for bn in self.attached().await? {
            let (Some(bridge), Some(veth)) = (bn.bridge.clone(), bn.host_veth.clone()) else {
                tracing::warn!(bot = %bn.bot, "attachment without a bridge port; not in the ruleset");
                continue;
            };
            let isolated = self.isolates(&bridge);
            // Re-asserted on every rebuild: nothing but the agent should ever clear it.
            if isolated && self.netns.link_exists(&veth).await {
                match self.netns.set_port_isolated(&veth, true).await {
                    Ok(true) => {
                        tracing::warn!(bot = %bn.bot, port = %veth, "bridge port was not isolated; isolated it again")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(bot = %bn.bot, port = %veth, error = %e, "cannot isolate the bridge port")
                    }
                }
            }
            let mut mac = bn
                .result
                .interfaces
                .iter()
                .find(|i| {
                    i.name == self.cfg.ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty())
                })
                .and_then(|i| i.mac.clone());
            if mac.is_none() {
                mac = match self.netns.interface_mac(&bn.netns, &self.cfg.ifname).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(bot = %bn.bot, error = %e, "cannot read the bot's mac; all it sends is dropped");
                        None
                    }
                };
            }
            ports.push(containment::BotPort {
                bot: bn.bot.clone(),
                addrs: bot_addrs(&bn),
                gateways: bn.gateway.into_iter().collect(),
                veth,
                bridge,
                mac,
                isolated,
            });
        }
        let resolvers = match &policy.resolv_conf {
            Some(p) => tokio::fs::read_to_string(p)
                .await
                .map(|t| containment::nameservers(&t))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let script = if ports.is_empty() {
            containment::remove_script(&policy.table)
        } else {
            containment::render(policy, &ports, &resolvers).map_err(|reason| {
                AgentError::Network {
                    op: "render the containment ruleset".into(),
                    reason,
                }
            })?
        };
        self.firewall.apply_ruleset(&script).await?;
        tracing::debug!(table = %policy.table, bots = ports.len(), "containment ruleset applied");
        Ok(())
    }

    /// Makes sure the MASQUERADE rule for `subnet` exists; returns whether it was added.
    pub async fn ensure_masquerade(&self, subnet: &str) -> Result<bool, AgentError> {
        self.firewall.ensure_masquerade(subnet).await
    }

    /// Removes the MASQUERADE rule for `subnet`; returns whether it was there.
    pub async fn remove_masquerade(&self, subnet: &str) -> Result<bool, AgentError> {
        self.firewall.remove_masquerade(subnet).await
    }

    /// Drops bot-to-bot traffic on `bridge` (every layer: the bots' ports isolated, the
    /// ruleset, the iptables rule); returns whether the iptables rule was added.
    pub async fn ensure_isolation(&self, bridge: &str) -> Result<bool, AgentError> {
        let _g = self.contain_lock.lock().await;
        lock(&self.lifted).remove(bridge);
        let added = self.firewall.ensure_isolation(bridge).await?;
        self.contain_locked().await?;
        Ok(added)
    }

    /// Lifts every layer of the isolation of `bridge` until [`Network::ensure_isolation`];
    /// returns whether the iptables rule was there.
    pub async fn remove_isolation(&self, bridge: &str) -> Result<bool, AgentError> {
        let _g = self.contain_lock.lock().await;
        lock(&self.lifted).insert(bridge.to_string());
        let removed = self.firewall.remove_isolation(bridge).await?;
        for bn in self.attached().await? {
            if bn.bridge.as_deref() == Some(bridge) {
                if let Some(veth) = &bn.host_veth {
                    if self.netns.link_exists(veth).await {
                        self.netns.set_port_isolated(veth, false).await?;
                    }
                }
            }
        }
        self.contain_locked().await?;
        Ok(removed)
    }

    /// Makes sure the host rules `bn`'s network needs exist: the MASQUERADE fallback for its
    /// subnet and the isolation of its bridge (as [`Network::setup`] does).
    pub async fn ensure_host_rules(&self, bn: &BotNetwork) -> Result<(), AgentError> {
        self.host_rules(bn).await
    }

    /// MASQUERADE for the bot's subnet, isolation on its bridge (with bridge netfilter on for
    /// its iptables layer), and the containment ruleset rebuilt, as configured.
    pub(super) async fn host_rules(&self, bn: &BotNetwork) -> Result<(), AgentError> {
        let _g = self.contain_lock.lock().await;
        if self.cfg.masquerade && bn.ip.is_ipv4() {
            self.firewall.ensure_masquerade(&bn.subnet()).await?;
        }
        if let Some(bridge) = bn.bridge.as_deref().filter(|b| self.isolates(b)) {
            self.firewall.ensure_isolation(bridge).await?;
            match self.firewall.ensure_bridge_netfilter().await {
                Ok(changed) if !changed.is_empty() => tracing::info!(
                    settings = ?changed,
                    "turned bridge netfilter on for the iptables layer of bot isolation"
                ),
                Ok(_) => {}
                Err(e) => {
                    // The bridge-level layers hold without it: worth saying once, not failing.
                    if !self.warned_bridge_nf.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "bridge netfilter unavailable: the iptables layer of bot isolation is inactive, the bridge-level layers hold");
                    }
                }
            }
        }
        self.contain_locked().await
    }
}
