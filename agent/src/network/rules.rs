//! The host rules around the attachments: the containment ruleset rebuilt from the saved
//! attachments ([`Network::contain`]), the MASQUERADE fallback and the iptables layer of
//! bot-to-bot isolation ([`Network::ensure_host_rules`]), and lifting isolation.

//!
//! Both are host-wide passes over every attachment, and every setup asks for them: under
//! concurrent creates the passes, not the plugins, were what the setups queued for. So a
//! request takes a ticket ([`Passes`]) and a pass that began after the ticket was issued
//! answers it: such a pass read the saved attachments (and checked the host rules) after the
//! caller's own change, exactly as a pass of the caller's own would have.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::Network;
use super::{bot_addrs, containment, lock, state, BotNetwork, Firewall, Netns, PluginExec};
use crate::error::AgentError;

/// Requests for the host-wide passes, and which of them the finished passes covered.
///
/// A caller makes its change (saves or removes an attachment), then takes a ticket: the
/// request count after its own request. A pass reads the request count under the containment
/// lock before it reads anything else, and once it succeeded, every ticket up to that count
/// is covered. A caller whose ticket is covered when it gets the lock returns at once; a pass
/// that failed covers nothing, so its waiters run their own.
#[derive(Debug, Default)]
pub(super) struct Passes {
    /// Requests made so far (the last ticket issued).
    asked: u64,
    /// Tickets covered by a successful rebuild of the ruleset.
    ruleset: u64,
    /// Tickets covered by a successful check of the host rules, per (MASQUERADE subnet,
    /// isolated bridge) the check was for.
    host: HashMap<(Option<String>, Option<String>), u64>,
}

impl<E: PluginExec, F: Firewall, N: Netns> Network<E, F, N> {
    /// A new ticket: the request count including this request.
    pub(super) fn ticket(&self) -> u64 {
        let mut p = lock(&self.passes);
        p.asked += 1;
        p.asked
    }

    /// The request count a pass starting now covers; read under `contain_lock`.
    fn pass_start(&self) -> u64 {
        lock(&self.passes).asked
    }

    /// Whether a successful rebuild that began after `ticket` was issued has finished.
    pub(super) fn ruleset_covers(&self, ticket: u64) -> bool {
        lock(&self.passes).ruleset >= ticket
    }

    /// Forgets every covered request: host rules or tables were removed, so no earlier pass
    /// answers for what is there now.
    pub(super) fn forget_passes(&self) {
        let mut p = lock(&self.passes);
        p.ruleset = 0;
        p.host.clear();
    }
}

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
    /// A rebuild that began after this call (another caller's) answers for it too.
    pub async fn contain(&self) -> Result<(), AgentError> {
        let mut steps = crate::steps::Steps::start();
        let ticket = self.ticket();
        let _g = self.contain_lock.lock().await;
        steps.mark("lock");
        let (shared, r) = self.contain_unless_covered(ticket).await;
        steps.mark("ruleset");
        tracing::debug!(total_ms = steps.total_ms(), shared, %steps, "contain steps");
        r
    }

    /// Rebuilds the ruleset unless a rebuild that began after `ticket` already succeeded;
    /// whether it was covered, and the result. The caller holds `contain_lock`.
    async fn contain_unless_covered(&self, ticket: u64) -> (bool, Result<(), AgentError>) {
        if self.ruleset_covers(ticket) {
            (true, Ok(()))
        } else {
            (false, self.contain_locked().await)
        }
    }

    /// [`Network::contain`]; the caller holds `contain_lock`. Always rebuilds; a success
    /// covers every ticket issued before it began.
    pub(super) async fn contain_locked(&self) -> Result<(), AgentError> {
        let seen = self.pass_start();
        self.rebuild_ruleset().await?;
        let mut p = lock(&self.passes);
        p.ruleset = p.ruleset.max(seen);
        Ok(())
    }

    /// The rebuild itself.
    async fn rebuild_ruleset(&self) -> Result<(), AgentError> {
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
        self.forget_passes();
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
    /// A check of the same rules, and a rebuild, that began after this call answer for it too.
    pub(super) async fn host_rules(&self, bn: &BotNetwork) -> Result<(), AgentError> {
        let mut steps = crate::steps::Steps::start();
        let ticket = self.ticket();
        let _g = self.contain_lock.lock().await;
        steps.mark("lock");
        let seen = self.pass_start();
        let masquerade = (self.cfg.masquerade && bn.ip.is_ipv4()).then(|| bn.subnet());
        let isolated = bn.bridge.clone().filter(|b| self.isolates(b));
        let key = (masquerade, isolated);
        let checked = lock(&self.passes)
            .host
            .get(&key)
            .is_some_and(|&c| c >= ticket);
        if !checked {
            self.check_host_rules(key.0.as_deref(), key.1.as_deref())
                .await?;
            let mut p = lock(&self.passes);
            let c = p.host.entry(key).or_default();
            *c = (*c).max(seen);
        }
        steps.mark("host_rules");
        let (shared, r) = self.contain_unless_covered(ticket).await;
        steps.mark("ruleset");
        tracing::debug!(bot = %bn.bot, total_ms = steps.total_ms(), checked, shared, %steps, "host rules steps");
        r
    }

    /// MASQUERADE for `subnet`, isolation on `bridge` (with bridge netfilter on for its
    /// iptables layer); the caller holds `contain_lock`.
    async fn check_host_rules(
        &self,
        subnet: Option<&str>,
        bridge: Option<&str>,
    ) -> Result<(), AgentError> {
        if let Some(subnet) = subnet {
            self.firewall.ensure_masquerade(subnet).await?;
        }
        if let Some(bridge) = bridge {
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
        Ok(())
    }
}
