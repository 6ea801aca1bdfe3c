//! The host rules around the attachments: the containment ruleset rebuilt from the saved
//! attachments ([`Network::contain`]), the MASQUERADE fallback and the iptables layer of
//! bot-to-bot isolation ([`Network::ensure_host_rules`]), and lifting isolation.

//!
//! Both are host-wide passes over every attachment, and every setup asks for them: under
//! concurrent creates the passes, not the plugins, were what the setups queued for. So a
//! request takes a ticket ([`Passes`]) and a pass that began after the ticket was issued
//! answers it: such a pass read the saved attachments (and checked the host rules) after the
//! caller's own change, exactly as a pass of the caller's own would have.

use std::collections::{BTreeMap, HashMap};
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

/// What the agent's tables hold, as far as the agent knows: the ports and sets of the last
/// ruleset it applied, with every change since applied as a delta. `None` (the
/// [`Network`]'s `applied`) when the agent does not know: before its first rebuild, after a
/// failure, after it removed tables or rules, and while it has no bot attached.
#[derive(Debug, Clone)]
pub(super) struct Applied {
    /// The ports in the tables, by bot.
    ports: BTreeMap<String, containment::BotPort>,
    /// The sets in the tables.
    sets: Vec<containment::Set>,
}

/// One attachment change that [`Network::contain_change`] brings into the ruleset.
#[derive(Debug, Clone, Copy)]
pub(super) enum Change<'a> {
    /// The bot was attached (or attached again, maybe on another port).
    Attached(&'a BotNetwork),
    /// The bot's attachment is gone.
    Detached(&'a str),
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
        drop(p);
        *lock(&self.applied) = None;
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

    /// The rebuild itself; records what the tables hold now (nothing known when it fails).
    async fn rebuild_ruleset(&self) -> Result<(), AgentError> {
        *lock(&self.applied) = None;
        let policy = &self.cfg.containment;
        if !policy.enabled && !self.cfg.isolate {
            return Ok(());
        }
        let mut ports = BTreeMap::new();
        for bn in self.attached().await? {
            let Some(port) = self.bot_port(&bn).await else {
                continue;
            };
            // Re-asserted on every rebuild: nothing but the agent should ever clear it.
            if port.isolated && self.netns.link_exists(&port.veth).await {
                match self.netns.set_port_isolated(&port.veth, true).await {
                    Ok(true) => {
                        tracing::warn!(bot = %bn.bot, port = %port.veth, "bridge port was not isolated; isolated it again")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(bot = %bn.bot, port = %port.veth, error = %e, "cannot isolate the bridge port")
                    }
                }
            }
            ports.insert(bn.bot.clone(), port);
        }
        let resolvers = self.resolvers().await;
        let list: Vec<containment::BotPort> = ports.values().cloned().collect();
        let script = if list.is_empty() {
            containment::remove_script(&policy.table)
        } else {
            containment::render(policy, &list, &resolvers).map_err(|reason| {
                AgentError::Network {
                    op: "render the containment ruleset".into(),
                    reason,
                }
            })?
        };
        self.firewall.apply_ruleset(&script).await?;
        if !list.is_empty() {
            *lock(&self.applied) = Some(Applied {
                sets: containment::sets(policy, &list, &resolvers),
                ports,
            });
        }
        tracing::debug!(table = %policy.table, bots = list.len(), "containment ruleset applied");
        Ok(())
    }

    /// Brings one attachment change into the ruleset: when the agent knows what its tables
    /// hold, one `nft -f` transaction adds and deletes the set elements that change (its
    /// cost does not grow with the number of bots); otherwise, or when that transaction
    /// fails (the tables were changed behind the agent's back), or when the change is more
    /// than elements, a rebuild. The caller holds `contain_lock`.
    pub(super) async fn contain_change(&self, change: Change<'_>) -> Result<(), AgentError> {
        let policy = &self.cfg.containment;
        if !policy.enabled && !self.cfg.isolate {
            return Ok(());
        }
        let Some(old) = lock(&self.applied).clone() else {
            return self.contain_locked().await;
        };
        let mut ports = old.ports;
        match change {
            Change::Attached(bn) => {
                let Some(port) = self.bot_port(bn).await else {
                    return self.contain_locked().await;
                };
                ports.insert(bn.bot.clone(), port);
            }
            Change::Detached(bot) => {
                if ports.remove(bot).is_none() {
                    return Ok(());
                }
            }
        }
        if ports.is_empty() {
            // The last bot: the tables go, as a rebuild removes them.
            return self.contain_locked().await;
        }
        let list: Vec<containment::BotPort> = ports.values().cloned().collect();
        if let Err(reason) = containment::validate(policy, &list) {
            return Err(AgentError::Network {
                op: "render the containment ruleset".into(),
                reason,
            });
        }
        let resolvers = self.resolvers().await;
        let sets = containment::sets(policy, &list, &resolvers);
        let Some(script) = containment::delta(&policy.table, &old.sets, &sets) else {
            return self.contain_locked().await;
        };
        if !script.is_empty() {
            if let Err(e) = self.firewall.apply_ruleset(&script).await {
                tracing::warn!(error = %e, "cannot change the containment ruleset in place; rebuilding it");
                return self.contain_locked().await;
            }
        }
        *lock(&self.applied) = Some(Applied { ports, sets });
        tracing::debug!(table = %policy.table, bots = list.len(), "containment ruleset changed in place");
        Ok(())
    }

    /// [`Network::contain_change`] under `contain_lock`.
    pub(super) async fn contain_one(&self, change: Change<'_>) -> Result<(), AgentError> {
        let _g = self.contain_lock.lock().await;
        self.contain_change(change).await
    }

    /// Whether the agent knows what its tables hold (a rebuild succeeded and nothing
    /// removed or failed since): then the tables can be changed in place.
    pub(super) fn ruleset_known(&self) -> bool {
        lock(&self.applied).is_some()
    }

    /// The port `bn` has in the ruleset; `None` (logged) for an attachment without a bridge
    /// port.
    async fn bot_port(&self, bn: &BotNetwork) -> Option<containment::BotPort> {
        let (Some(bridge), Some(veth)) = (bn.bridge.clone(), bn.host_veth.clone()) else {
            tracing::warn!(bot = %bn.bot, "attachment without a bridge port; not in the ruleset");
            return None;
        };
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
        Some(containment::BotPort {
            bot: bn.bot.clone(),
            addrs: bot_addrs(bn),
            gateways: bn.gateway.into_iter().collect(),
            isolated: self.isolates(&bridge),
            veth,
            bridge,
            mac,
        })
    }

    /// The nameservers bots may reach (from the policy's resolv.conf; none when unreadable).
    async fn resolvers(&self) -> Vec<std::net::IpAddr> {
        match &self.cfg.containment.resolv_conf {
            Some(p) => tokio::fs::read_to_string(p)
                .await
                .map(|t| containment::nameservers(&t))
                .unwrap_or_default(),
            None => Vec::new(),
        }
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
    /// subnet and the isolation of its bridge (as [`Network::setup`] does), and rebuilds the
    /// containment ruleset from the saved attachments (the periodic reconcile: whatever
    /// changed the tables behind the agent's back is undone).
    pub async fn ensure_host_rules(&self, bn: &BotNetwork) -> Result<(), AgentError> {
        self.host_rules(bn, true).await
    }

    /// MASQUERADE for the bot's subnet, isolation on its bridge (with bridge netfilter on for
    /// its iptables layer), and the containment ruleset: rebuilt when `rebuild`, otherwise
    /// with `bn`'s attachment brought in ([`Network::contain_change`]), as configured.
    /// A check of the same rules, and a rebuild, that began after this call answer for it too.
    pub(super) async fn host_rules(
        &self,
        bn: &BotNetwork,
        rebuild: bool,
    ) -> Result<(), AgentError> {
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
        let (shared, r) = if rebuild {
            self.contain_unless_covered(ticket).await
        } else {
            (false, self.contain_change(Change::Attached(bn)).await)
        };
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
