//! The attach and detach flow of one bot: [`Network::setup`] (CNI ADD with its retry rule,
//! the saved state, the per-attachment part of containment) and [`Network::teardown`] (CNI
//! DEL from the saved state, the namespace, the host rules the bot was the last user of).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use super::Network;
use super::{
    bot_addrs, lock, rules::Change, state, BotNetwork, Firewall, Netns, NetworkConfList,
    PluginExec, RuntimeConf,
};
use crate::error::AgentError;
use crate::ids;

/// Whether a failed ADD is one of the known leftovers of an earlier attachment that a DEL
/// clears: a duplicate IPAM reservation, an interface that already exists, or the bridge
/// refusing its MAC address.
pub fn is_retryable_add_error(e: &AgentError) -> bool {
    let msg = e.to_string().to_ascii_lowercase();
    msg.contains("duplicate allocation")
        || msg.contains("already exists")
        || (msg.contains("bridge") && (msg.contains("mac address") || msg.contains("bridge's mac")))
}

/// How often each of `bots` kept attachments is due for CNI CHECK under `cfg`: never more
/// often than `check_every`, and for the fleet about once every `check_gap` on average.
pub(super) fn check_period(cfg: &super::NetworkConfig, bots: usize) -> std::time::Duration {
    if cfg.check_every.is_zero() {
        return cfg.check_every;
    }
    let fleet = cfg
        .check_gap
        .saturating_mul(u32::try_from(bots).unwrap_or(u32::MAX));
    cfg.check_every.max(fleet)
}

impl<E: PluginExec, F: Firewall, N: Netns> Network<E, F, N> {
    /// Attaches bot `bot`, whose namespace is `netns`, and returns its address.
    ///
    /// A bot whose saved attachment is still healthy (same namespace, its interface holds the
    /// saved address, CHECK passes) keeps it unchanged. Otherwise any stale attachment is
    /// removed and ADD runs; on a duplicate allocation, an existing interface or a bridge MAC
    /// error it removes what is there (ignoring that removal's error) and adds once more,
    /// alone this time (no other plugin runs during that ADD).
    pub async fn setup(&self, bot: &str, netns: &Path) -> Result<BotNetwork, AgentError> {
        let (bn, fresh) = self.attach(bot, netns).await?;
        if let Err(e) = self.host_rules(&bn, false).await {
            if fresh {
                return Err(self.detach_uncontained(&bn, e).await);
            }
            return Err(e);
        }
        Ok(bn)
    }

    /// [`Network::setup`] without the host rules, for a caller that attaches many bots and
    /// then calls [`Network::ensure_host_rules`] once per network (the periodic reconcile:
    /// per bot, the four `iptables` runs cost more than the rest of the check). A new
    /// attachment is still contained before this returns.
    pub async fn setup_without_host_rules(
        &self,
        bot: &str,
        netns: &Path,
    ) -> Result<BotNetwork, AgentError> {
        let (bn, fresh) = self.attach(bot, netns).await?;
        if fresh {
            if let Err(e) = self.contain_one(Change::Attached(&bn)).await {
                return Err(self.detach_uncontained(&bn, e).await);
            }
        }
        Ok(bn)
    }

    /// The attachment of [`Network::setup`]; also says whether it is new (not the healthy one
    /// that was kept). A new attachment has its own part of containment in place (IPv6, port
    /// isolation), not yet the rebuilt ruleset.
    pub(super) async fn attach(
        &self,
        bot: &str,
        netns: &Path,
    ) -> Result<(BotNetwork, bool), AgentError> {
        ids::validate(bot)?;
        let cid = ids::container_id(bot);
        let mut steps = crate::steps::Steps::start();
        let mut previous_ip = None;
        match state::load(&self.cfg.state_dir, bot).await? {
            Some(Ok(saved)) => {
                if saved.netns == netns {
                    match self.healthy(&saved).await {
                        Ok(bn) => {
                            tracing::debug!(bot, ip = %bn.ip, "bot network is healthy; keeping it");
                            return Ok((bn, false));
                        }
                        Err(reason) => {
                            self.forget_checked(bot);
                            tracing::warn!(bot, %reason, "bot network is not healthy; attaching again")
                        }
                    }
                }
                previous_ip = self.describe(&saved).ok().map(|bn| bn.ip);
                self.del_saved_quietly(&saved).await;
                if saved.netns != netns {
                    // The bot moved to another namespace (an older agent's name at its next
                    // start): the old one is the agent's garbage now.
                    self.retire_netns(bot, &saved.netns).await;
                }
            }
            Some(Err(reason)) => {
                tracing::warn!(bot, %reason, "ignoring unusable saved network state")
            }
            None => {}
        }
        if previous_ip.is_none() {
            // A bot that was stopped (or detached otherwise) asks for its address again.
            previous_ip = state::remembered_address(&self.cfg.state_dir, bot).await;
        }

        steps.mark("saved");
        // Containment must work before the bot gets any network: a host where the ruleset
        // cannot be applied refuses the bot before ADD makes its interface. Tables the agent
        // knows are in place need no new proof (a delta that fails after ADD still detaches
        // the bot).
        if (self.cfg.containment.enabled || self.cfg.isolate) && !self.ruleset_known() {
            self.contain().await.map_err(|e| AgentError::Network {
                op: format!("contain bot {bot}"),
                reason: format!("isolation cannot be put in place, the bot is not started: {e}"),
            })?;
        }
        steps.mark("contain_before");
        let net = self.load_network().await?;
        let mut rt = RuntimeConf {
            container_id: cid.clone(),
            netns: Some(netns.to_path_buf()),
            ifname: self.cfg.ifname.clone(),
            // Callers and peers know the bot by its address: ask for the old one back.
            ip: previous_ip,
        };
        let raw = match self.add_with_retry(bot, &net, &rt).await {
            Ok(v) => v,
            Err(e) if rt.ip.is_some() => {
                tracing::warn!(bot, error = %e, "cannot get the bot's old address back; taking a new one");
                rt.ip = None;
                self.add_with_retry(bot, &net, &rt).await?
            }
            Err(e) => return Err(e),
        };
        steps.mark("cni_add");

        let saved = state::Saved::new(bot, &cid, netns, &self.cfg.ifname, net.to_value(), raw);
        let bn = match self.describe(&saved) {
            Ok(bn) => bn,
            Err(e) => return Err(self.undo_add(&net, &rt, e).await),
        };
        if let Err(e) = state::save(&self.cfg.state_dir, &saved).await {
            return Err(self.undo_add(&net, &rt, e).await);
        }
        // The address may have belonged to another bot seconds ago (host-local hands out
        // freed addresses, sooner when a re-attach asked for an old one): forget its MAC.
        if let Some(bridge) = &bn.bridge {
            self.netns.forget_neighbour(bridge, bn.ip).await;
        }
        steps.mark("save");
        // A fresh ADD is as good as a CHECK.
        self.mark_checked(bot);
        if let Err(e) = self.contain_attachment(&bn).await {
            return Err(self.detach_uncontained(&bn, e).await);
        }
        steps.mark("contain_port");
        tracing::debug!(bot, total_ms = steps.total_ms(), %steps, "attach steps");
        tracing::info!(bot, ip = %bn.ip, netns = %netns.display(), "bot attached to the network");
        Ok((bn, true))
    }

    /// The per-attachment part of containment: a bridge port to filter on, IPv6 off in the
    /// namespace when the bot has no IPv6 address, the port isolated from the other bots.
    pub(super) async fn contain_attachment(&self, bn: &BotNetwork) -> Result<(), AgentError> {
        if !self.cfg.containment.enabled && !self.cfg.isolate {
            return Ok(());
        }
        let (Some(bridge), Some(veth)) = (&bn.bridge, &bn.host_veth) else {
            return Err(AgentError::Network {
                op: format!("contain bot {}", bn.bot),
                reason: format!(
                    "network {:?} gave the bot no bridge port (bridge {:?}, host veth {:?}); \
                     containment needs a bridge network",
                    self.cfg.network, bn.bridge, bn.host_veth
                ),
            });
        };
        if self.cfg.containment.enabled && !bot_addrs(bn).iter().any(IpAddr::is_ipv6) {
            self.netns.disable_ipv6(&bn.netns).await?;
        }
        if self.isolates(bridge) {
            self.netns.set_port_isolated(veth, true).await?;
        }
        Ok(())
    }

    /// A new attachment that could not be contained: removed again (its DEL error only
    /// logged), so the bot has no network rather than an open one; returns `e` with context.
    pub(super) async fn detach_uncontained(&self, bn: &BotNetwork, e: AgentError) -> AgentError {
        tracing::error!(bot = %bn.bot, error = %e, "cannot contain the bot's network; detaching it");
        match state::load(&self.cfg.state_dir, &bn.bot).await {
            Ok(Some(Ok(saved))) => {
                self.del_saved_quietly(&saved).await;
                if let Err(re) = state::remove(&self.cfg.state_dir, &bn.bot).await {
                    tracing::warn!(bot = %bn.bot, error = %re, "cannot remove the saved state");
                }
            }
            Ok(_) => {}
            Err(le) => tracing::warn!(bot = %bn.bot, error = %le, "cannot read the saved state"),
        }
        AgentError::Network {
            op: format!("contain bot {}", bn.bot),
            reason: format!("isolation cannot be put in place, the bot is not started: {e}"),
        }
    }

    /// Detaches bot `bot`: CNI DEL with the saved config and result (the namespace may be
    /// gone), then deletes the bot's namespace and its saved state; the address it had is
    /// remembered in its state directory, and its next attach asks for it again. An unknown or
    /// already torn-down bot succeeds. When DEL fails the state is kept so a later teardown can retry.
    pub async fn teardown(&self, bot: &str) -> Result<(), AgentError> {
        ids::validate(bot)?;
        let cid = ids::container_id(bot);
        let canonical = self.netns_path(bot);
        let mut extra_netns: Option<PathBuf> = None;
        let mut freed: Option<BotNetwork> = None;
        match state::load(&self.cfg.state_dir, bot).await? {
            Some(Ok(saved)) => {
                freed = self.describe(&saved).ok();
                let net = self.saved_network(&saved).await?;
                self.del(
                    &net,
                    &saved.container_id,
                    &saved.netns,
                    &saved.ifname,
                    Some(&saved.result),
                )
                .await?;
                if saved.netns != canonical {
                    extra_netns = Some(saved.netns.clone());
                }
            }
            Some(Err(reason)) => {
                tracing::warn!(bot, %reason, "saved network state unusable; tearing down with the current network");
                let net = self.load_network().await?;
                self.del(&net, &cid, &canonical, &self.cfg.ifname, None)
                    .await?;
            }
            None => {}
        }
        self.netns.delete(&self.netns_name(bot)).await?;
        if let Some(p) = extra_netns {
            // Only namespaces in the agent's run dir are the agent's to delete (an older
            // agent's `memoh-<bot>` among them).
            if let Some(name) = self.own_netns_name(&p) {
                self.netns.delete(name).await?;
            }
        }
        state::remove(&self.cfg.state_dir, bot).await?;
        self.forget_checked(bot);
        if let Some(bn) = &freed {
            state::remember_address(&self.cfg.state_dir, bot, bn.ip).await;
        }
        self.release(bot, freed.as_ref()).await;
        tracing::info!(bot, "bot detached from the network");
        Ok(())
    }

    /// After a bot's attachment went: the ruleset without it (the tables go with the last
    /// bot), and the isolation and MASQUERADE rules of its bridge and subnet once no other
    /// bot of this agent uses them. Failures are only logged: they leave a stricter or stale
    /// rule, never an open one, and must not keep a bot from being deleted.
    pub(super) async fn release(&self, bot: &str, freed: Option<&BotNetwork>) {
        let _g = self.contain_lock.lock().await;
        if let Err(e) = self.contain_change(Change::Detached(bot)).await {
            tracing::warn!(error = %e, "cannot take the bot out of the containment ruleset");
        }
        let Some(freed) = freed else { return };
        let left = match self.attached().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the attached bots; host rules kept");
                return;
            }
        };
        if let Some(bridge) = &freed.bridge {
            if !left.iter().any(|b| b.bridge.as_ref() == Some(bridge)) {
                // Whatever this removes, no earlier pass answers for it any more.
                self.forget_passes();
                match self.firewall.remove_isolation(bridge).await {
                    Ok(true) => {
                        tracing::info!(
                            bridge,
                            "last bot of the bridge gone; isolation rule removed"
                        )
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(bridge, error = %e, "cannot remove the isolation rule")
                    }
                }
                lock(&self.lifted).remove(bridge);
            }
        }
        if self.cfg.masquerade && freed.ip.is_ipv4() {
            let subnet = freed.subnet();
            if !left.iter().any(|b| b.subnet() == subnet) {
                // Whatever this removes, no earlier pass answers for it any more.
                self.forget_passes();
                match self.firewall.remove_masquerade(&subnet).await {
                    Ok(true) => {
                        tracing::info!(
                            subnet,
                            "last bot of the subnet gone; masquerade rule removed"
                        )
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(subnet, error = %e, "cannot remove the masquerade rule")
                    }
                }
            }
        }
    }

    /// DEL for one attachment; when the namespace is gone the bridge plugin cannot find the
    /// addresses whose masquerade rules it would remove, so those are removed here.
    pub(super) async fn del(
        &self,
        net: &NetworkConfList,
        cid: &str,
        netns: &Path,
        ifname: &str,
        prev: Option<&Value>,
    ) -> Result<(), AgentError> {
        let alive = self.netns.exists(netns).await;
        let rt = RuntimeConf {
            container_id: cid.to_string(),
            netns: alive.then(|| netns.to_path_buf()),
            ifname: ifname.to_string(),
            ip: None,
        };
        self.cni.del(net, &rt, prev).await?;
        if !alive {
            if let Err(e) = self.firewall.remove_cni_masq(&net.name, cid).await {
                tracing::warn!(container = cid, error = %e, "cannot remove leftover cni masquerade");
            }
        }
        Ok(())
    }

    /// ADD with the retry rule: on a duplicate allocation, an existing interface or a bridge
    /// MAC error, DEL (its error only logged) and ADD once more, that time holding the plugin
    /// lock exclusively (the first ADD may have run alongside others and failed on what one
    /// of them did). A failed ADD is undone.
    pub(super) async fn add_with_retry(
        &self,
        bot: &str,
        net: &NetworkConfList,
        rt: &RuntimeConf,
    ) -> Result<Value, AgentError> {
        match self.add(net, rt, false).await {
            Ok(v) => Ok(v),
            Err(e) if is_retryable_add_error(&e) => {
                tracing::warn!(bot, error = %e, "cni add failed on leftovers; removing and adding again");
                crate::metrics::global().cni_retry();
                if let Err(de) = self.cni.del(net, rt, None).await {
                    tracing::warn!(bot, error = %de, "cni del before the second add failed; ignored");
                }
                match self.add(net, rt, true).await {
                    Ok(v) => Ok(v),
                    Err(e) => Err(self.undo_add(net, rt, e).await),
                }
            }
            Err(e) => Err(self.undo_add(net, rt, e).await),
        }
    }

    /// ADD, after making sure the bridge (if it exists) has a MAC the plugin can set;
    /// `exclusive` holds the plugin lock alone (the retry), otherwise the lock's rule decides.
    pub(super) async fn add(
        &self,
        net: &NetworkConfList,
        rt: &RuntimeConf,
        exclusive: bool,
    ) -> Result<Value, AgentError> {
        if let Some(bridge) = net.bridge_name() {
            if let Err(e) = self.netns.pin_bridge_mac(&bridge).await {
                tracing::warn!(bridge, error = %e, "cannot pin the bridge's mac address");
            }
        }
        if exclusive {
            self.cni.add_exclusive(net, rt).await
        } else {
            self.cni.add(net, rt).await
        }
    }

    /// DEL of a saved attachment whose errors are only logged.
    pub(super) async fn del_saved_quietly(&self, saved: &state::Saved) {
        let result = async {
            let net = self.saved_network(saved).await?;
            self.del(
                &net,
                &saved.container_id,
                &saved.netns,
                &saved.ifname,
                Some(&saved.result),
            )
            .await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(bot = %saved.bot, error = %e, "removing the stale attachment failed; ignored");
        }
    }

    /// After a failed ADD: DEL what may be half set up (ignoring its error), return `e`.
    pub(super) async fn undo_add(
        &self,
        net: &NetworkConfList,
        rt: &RuntimeConf,
        e: AgentError,
    ) -> AgentError {
        crate::metrics::global().cni_error();
        if let Err(de) = self.cni.del(net, rt, None).await {
            tracing::warn!(container = %rt.container_id, error = %de, "cleanup after a failed cni add failed");
        }
        e
    }

    /// The network a bot was attached with; the current one if the saved copy is unusable.
    pub(super) async fn saved_network(
        &self,
        saved: &state::Saved,
    ) -> Result<NetworkConfList, AgentError> {
        match NetworkConfList::parse(&saved.config) {
            Ok(net) => Ok(net),
            Err(reason) => {
                tracing::warn!(bot = %saved.bot, %reason, "saved network config unusable; using the current one");
                self.load_network().await
            }
        }
    }

    /// A healthy saved attachment as a [`BotNetwork`], or why it is not healthy.
    pub(super) async fn healthy(&self, saved: &state::Saved) -> Result<BotNetwork, String> {
        let bn = self.describe(saved).map_err(|e| e.to_string())?;
        let addrs = self
            .netns
            .interface_addrs(&saved.netns, &saved.ifname)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "{} is missing or down in {}",
                    saved.ifname,
                    saved.netns.display()
                )
            })?;
        if !addrs.iter().any(|(ip, _)| *ip == bn.ip) {
            return Err(format!("{} no longer has {}", saved.ifname, bn.ip));
        }
        if !self.check_due(&saved.bot) {
            return Ok(bn);
        }
        let net = NetworkConfList::parse(&saved.config)?;
        let rt = RuntimeConf {
            container_id: saved.container_id.clone(),
            netns: Some(saved.netns.clone()),
            ifname: saved.ifname.clone(),
            ip: None,
        };
        if let Err(e) = self.cni.check(&net, &rt, &saved.result).await {
            self.forget_checked(&saved.bot);
            return Err(e.to_string());
        }
        self.mark_checked(&saved.bot);
        Ok(bn)
    }

    /// Whether bot `bot`'s attachment is due for CNI CHECK: every
    /// [`NetworkConfig::check_every`], or every `bots × check_gap` when that is longer
    /// ([`NetworkConfig::check_gap`]).
    pub(super) fn check_due(&self, bot: &str) -> bool {
        let checked = lock(&self.checked);
        let every = check_period(&self.cfg, checked.len());
        every.is_zero() || checked.get(bot).is_none_or(|t| t.elapsed() >= every)
    }

    /// Bot `bot`'s attachment passed CHECK (or ADD made it) just now.
    fn mark_checked(&self, bot: &str) {
        lock(&self.checked).insert(bot.to_string(), Instant::now());
    }

    /// Bot `bot`'s attachment is gone or failed: its next health check runs CHECK.
    fn forget_checked(&self, bot: &str) {
        lock(&self.checked).remove(bot);
    }

    /// Deletes the namespace at `old` bot `bot` ran in before it moved to another one (an
    /// older agent's name), when it is in the agent's run dir; failures are only logged
    /// (`net cleanup` finds what is left).
    pub async fn retire_netns(&self, bot: &str, old: &Path) {
        if old == self.netns_path(bot) {
            return;
        }
        let Some(name) = self.own_netns_name(old) else {
            return;
        };
        match self.netns.delete(name).await {
            Ok(()) => {
                tracing::info!(bot, netns = %old.display(), "removed the bot's old network namespace")
            }
            Err(e) => {
                tracing::warn!(bot, netns = %old.display(), error = %e, "cannot remove the bot's old network namespace")
            }
        }
    }
}
