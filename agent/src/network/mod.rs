//! Bot networking: named namespaces, CNI attach and detach, and the host's firewall rules.
//!
//! The lifecycle uses it like this:
//!
//! 1. [`Network::create_netns`] before creating the container; its path goes into the OCI
//!    spec, so the namespace belongs to the agent and outlives the task.
//! 2. [`Network::setup`] after every (re)start: keeps a healthy bot's address, otherwise runs
//!    CNI ADD (retrying once after a DEL on the known transient errors), saves what DEL will
//!    need, and makes sure the MASQUERADE fallback and bot-to-bot isolation are in place.
//! 3. [`Network::teardown`] on delete: CNI DEL with the saved config and result (so it works
//!    after the task died and after an agent restart), then the namespace and the saved state
//!    go. Tearing down an unknown bot succeeds.
//!
//! Submodules: [`cni`] (the plugin protocol), [`conf`] (network configs), [`result`] (typed
//! results), [`netns`] (namespaces), [`firewall`] (iptables). Each outside system sits behind a
//! trait ([`cni::PluginExec`], [`netns::Netns`], [`firewall::Firewall`]) with the real
//! implementation as the default type parameter.

mod cmd;
pub mod cni;
pub mod conf;
pub mod firewall;
pub mod netns;
pub mod result;
mod state;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::error::AgentError;

pub use cni::{CniChain, ExecPlugins, PluginExec, RuntimeConf};
pub use conf::NetworkConfList;
pub use firewall::{Firewall, Iptables};
pub use netns::{IpNetns, Netns};
pub use result::CniResult;

/// Settings of the network module, usually built with [`NetworkConfig::from_config`].
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// CNI configuration directory.
    pub conf_dir: PathBuf,
    /// Plugin directories, searched in order.
    pub bin_dirs: Vec<PathBuf>,
    /// Name of the network bots join.
    pub network: String,
    /// Bridge of the default network (when the agent writes it).
    pub bridge: String,
    /// Subnet of the default network (when the agent writes it).
    pub subnet: String,
    /// host-local's `dataDir` in the default network; `None` keeps the plugin's default.
    pub ipam_data_dir: Option<PathBuf>,
    /// The agent's state directory (saved results go to `<state_dir>/cni/`).
    pub state_dir: PathBuf,
    /// Interface name inside the bot, `eth0`.
    pub ifname: String,
    /// Time one plugin run may take.
    pub plugin_timeout: Duration,
    /// Ensure the MASQUERADE rule for the bot's subnet on every setup.
    pub masquerade: bool,
    /// Drop bot-to-bot traffic on the network's bridge on every setup.
    pub isolate: bool,
}

impl NetworkConfig {
    /// The settings from the agent's configuration.
    pub fn from_config(c: &Config) -> Self {
        Self {
            conf_dir: c.cni_conf_dir.clone(),
            bin_dirs: c.cni_bin_dirs.clone(),
            network: c.cni_network.clone(),
            bridge: c.cni_bridge.clone(),
            subnet: c.cni_subnet.clone(),
            ipam_data_dir: c.cni_ipam_dir.clone(),
            state_dir: c.state_dir.clone(),
            ifname: "eth0".into(),
            plugin_timeout: cni::DEFAULT_PLUGIN_TIMEOUT,
            masquerade: true,
            isolate: true,
        }
    }
}

/// A bot's attachment to the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotNetwork {
    /// The bot.
    pub bot: String,
    /// The CNI container id (`mcp-<bot>`).
    pub container_id: String,
    /// The namespace path the bot was attached in.
    pub netns: PathBuf,
    /// The bot's address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The gateway (the bridge's address on the host), when reported.
    pub gateway: Option<IpAddr>,
    /// The bridge, when the network has one.
    pub bridge: Option<String>,
    /// The host end of the bot's veth, when reported.
    pub host_veth: Option<String>,
    /// The full typed result.
    pub result: CniResult,
}

impl BotNetwork {
    /// The bot's subnet in CIDR form, e.g. `10.88.0.0/16`.
    pub fn subnet(&self) -> String {
        result::CniIp {
            address: self.ip,
            prefix_len: self.prefix_len,
            gateway: None,
            interface: None,
        }
        .subnet()
    }
}

/// The CNI container id of bot `bot`: `mcp-<bot>`, the same as its containerd container.
pub fn container_id(bot: &str) -> String {
    format!("mcp-{bot}")
}

/// Checks a bot id against `[-_a-zA-Z0-9]+`.
fn check_bot_id(bot: &str) -> Result<(), AgentError> {
    if !bot.is_empty()
        && bot.len() <= 128
        && bot
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(())
    } else {
        Err(AgentError::InvalidBotId(bot.to_string()))
    }
}

/// Whether a failed ADD is one of the known leftovers of an earlier attachment that a DEL
/// clears: a duplicate IPAM reservation, an interface that already exists, or the bridge
/// refusing its MAC address.
pub fn is_retryable_add_error(e: &AgentError) -> bool {
    let msg = e.to_string().to_ascii_lowercase();
    msg.contains("duplicate allocation")
        || msg.contains("already exists")
        || (msg.contains("bridge") && (msg.contains("mac address") || msg.contains("bridge's mac")))
}

/// The network module: owns namespaces, runs CNI, keeps per-bot state, ensures host rules.
#[derive(Debug)]
pub struct Network<E = ExecPlugins, F = Iptables, N = IpNetns> {
    cfg: NetworkConfig,
    cni: CniChain<E>,
    firewall: F,
    netns: N,
}

impl Network {
    /// The real thing: plugins from `cfg.bin_dirs`, `iptables`, `ip netns`.
    pub fn new(cfg: NetworkConfig) -> Self {
        let exec = ExecPlugins::new(cfg.bin_dirs.clone(), cfg.plugin_timeout);
        Self::with_parts(cfg, exec, Iptables::new(), IpNetns)
    }
}

impl<E: PluginExec, F: Firewall, N: Netns> Network<E, F, N> {
    /// Builds the module from its parts (tests pass fakes or custom rule names).
    pub fn with_parts(cfg: NetworkConfig, exec: E, firewall: F, netns: N) -> Self {
        Self {
            cfg,
            cni: CniChain::new(exec),
            firewall,
            netns,
        }
    }

    /// The settings.
    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// The firewall.
    pub fn firewall(&self) -> &F {
        &self.firewall
    }

    /// The namespaces.
    pub fn netns(&self) -> &N {
        &self.netns
    }

    /// The CNI protocol runner.
    pub fn cni(&self) -> &CniChain<E> {
        &self.cni
    }

    /// The namespace path of bot `bot` (`/run/netns/memoh-<bot>`), whether or not it exists.
    pub fn netns_path(&self, bot: &str) -> PathBuf {
        self.netns.path(&netns::netns_name(bot))
    }

    /// Creates (or finds) the bot's namespace; returns its path for the OCI spec.
    pub async fn create_netns(&self, bot: &str) -> Result<PathBuf, AgentError> {
        check_bot_id(bot)?;
        self.netns.create(&netns::netns_name(bot)).await
    }

    /// Deletes the bot's namespace; a missing one is fine.
    pub async fn delete_netns(&self, bot: &str) -> Result<(), AgentError> {
        check_bot_id(bot)?;
        self.netns.delete(&netns::netns_name(bot)).await
    }

    /// Loads the configured network; writes the agent's default network first when the
    /// configured name is missing from the conf dir.
    pub async fn load_network(&self) -> Result<NetworkConfList, AgentError> {
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || {
            if let Some((path, list)) = conf::find_network(&cfg.conf_dir, &cfg.network)? {
                tracing::debug!(path = %path.display(), network = %list.name, "loaded cni network");
                return Ok(list);
            }
            let value = conf::default_conflist(
                &cfg.network,
                &cfg.bridge,
                &cfg.subnet,
                cfg.ipam_data_dir.as_deref(),
            );
            let path = conf::write_conflist(&cfg.conf_dir, &cfg.network, &value)?;
            tracing::info!(path = %path.display(), "wrote default cni network");
            NetworkConfList::parse(&value).map_err(|reason| AgentError::Network {
                op: "default cni network".into(),
                reason,
            })
        })
        .await
        .map_err(|e| AgentError::Network {
            op: "load cni network".into(),
            reason: e.to_string(),
        })?
    }

    /// The bot's saved attachment, if any (no health check).
    pub async fn saved(&self, bot: &str) -> Result<Option<BotNetwork>, AgentError> {
        check_bot_id(bot)?;
        match state::load(&self.cfg.state_dir, bot).await? {
            Some(Ok(s)) => self.describe(&s).map(Some),
            Some(Err(reason)) => Err(AgentError::Network {
                op: format!("saved network of {bot}"),
                reason,
            }),
            None => Ok(None),
        }
    }

    /// Attaches bot `bot`, whose namespace is `netns`, and returns its address.
    ///
    /// A bot whose saved attachment is still healthy (same namespace, its interface holds the
    /// saved address, CHECK passes) keeps it unchanged. Otherwise any stale attachment is
    /// removed and ADD runs; on a duplicate allocation, an existing interface or a bridge MAC
    /// error it removes what is there (ignoring that removal's error) and adds once more.
    pub async fn setup(&self, bot: &str, netns: &Path) -> Result<BotNetwork, AgentError> {
        let bn = self.setup_without_host_rules(bot, netns).await?;
        self.host_rules(&bn).await?;
        Ok(bn)
    }

    /// [`Network::setup`] without the host rules, for a caller that attaches many bots and
    /// then calls [`Network::ensure_host_rules`] once per network (the periodic reconcile:
    /// per bot, the four `iptables` runs cost more than the rest of the check).
    pub async fn setup_without_host_rules(
        &self,
        bot: &str,
        netns: &Path,
    ) -> Result<BotNetwork, AgentError> {
        check_bot_id(bot)?;
        let cid = container_id(bot);
        let mut previous_ip = None;
        match state::load(&self.cfg.state_dir, bot).await? {
            Some(Ok(saved)) => {
                if saved.netns == netns {
                    match self.healthy(&saved).await {
                        Ok(bn) => {
                            tracing::debug!(bot, ip = %bn.ip, "bot network is healthy; keeping it");
                            return Ok(bn);
                        }
                        Err(reason) => {
                            tracing::warn!(bot, %reason, "bot network is not healthy; attaching again")
                        }
                    }
                }
                previous_ip = self.describe(&saved).ok().map(|bn| bn.ip);
                self.del_saved_quietly(&saved).await;
            }
            Some(Err(reason)) => {
                tracing::warn!(bot, %reason, "ignoring unusable saved network state")
            }
            None => {}
        }

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
        tracing::info!(bot, ip = %bn.ip, netns = %netns.display(), "bot attached to the network");
        Ok(bn)
    }

    /// Detaches bot `bot`: CNI DEL with the saved config and result (the namespace may be
    /// gone), then deletes the bot's namespace and its saved state. An unknown or already
    /// torn-down bot succeeds. When DEL fails the state is kept so a later teardown can retry.
    pub async fn teardown(&self, bot: &str) -> Result<(), AgentError> {
        check_bot_id(bot)?;
        let cid = container_id(bot);
        let canonical = self.netns_path(bot);
        let mut extra_netns: Option<PathBuf> = None;
        match state::load(&self.cfg.state_dir, bot).await? {
            Some(Ok(saved)) => {
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
        self.netns.delete(&netns::netns_name(bot)).await?;
        if let Some(p) = extra_netns {
            // Only namespaces in the agent's run dir are the agent's to delete.
            if p.parent() == Some(Path::new(netns::NETNS_RUN_DIR)) {
                if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                    self.netns.delete(name).await?;
                }
            }
        }
        state::remove(&self.cfg.state_dir, bot).await?;
        tracing::info!(bot, "bot detached from the network");
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

    /// Drops bot-to-bot traffic on `bridge`; returns whether the rule was added.
    pub async fn ensure_isolation(&self, bridge: &str) -> Result<bool, AgentError> {
        self.firewall.ensure_isolation(bridge).await
    }

    /// Lifts the isolation of `bridge`; returns whether it was there.
    pub async fn remove_isolation(&self, bridge: &str) -> Result<bool, AgentError> {
        self.firewall.remove_isolation(bridge).await
    }

    /// DEL for one attachment; when the namespace is gone the bridge plugin cannot find the
    /// addresses whose masquerade rules it would remove, so those are removed here.
    async fn del(
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
    /// MAC error, DEL (its error only logged) and ADD once more. A failed ADD is undone.
    async fn add_with_retry(
        &self,
        bot: &str,
        net: &NetworkConfList,
        rt: &RuntimeConf,
    ) -> Result<Value, AgentError> {
        match self.add(net, rt).await {
            Ok(v) => Ok(v),
            Err(e) if is_retryable_add_error(&e) => {
                tracing::warn!(bot, error = %e, "cni add failed on leftovers; removing and adding again");
                crate::metrics::global().cni_retry();
                if let Err(de) = self.cni.del(net, rt, None).await {
                    tracing::warn!(bot, error = %de, "cni del before the second add failed; ignored");
                }
                match self.add(net, rt).await {
                    Ok(v) => Ok(v),
                    Err(e) => Err(self.undo_add(net, rt, e).await),
                }
            }
            Err(e) => Err(self.undo_add(net, rt, e).await),
        }
    }

    /// ADD, after making sure the bridge (if it exists) has a MAC the plugin can set.
    async fn add(&self, net: &NetworkConfList, rt: &RuntimeConf) -> Result<Value, AgentError> {
        if let Some(bridge) = net.bridge_name() {
            if let Err(e) = self.netns.pin_bridge_mac(&bridge).await {
                tracing::warn!(bridge, error = %e, "cannot pin the bridge's mac address");
            }
        }
        self.cni.add(net, rt).await
    }

    /// DEL of a saved attachment whose errors are only logged.
    async fn del_saved_quietly(&self, saved: &state::Saved) {
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
    async fn undo_add(&self, net: &NetworkConfList, rt: &RuntimeConf, e: AgentError) -> AgentError {
        crate::metrics::global().cni_error();
        if let Err(de) = self.cni.del(net, rt, None).await {
            tracing::warn!(container = %rt.container_id, error = %de, "cleanup after a failed cni add failed");
        }
        e
    }

    /// The network a bot was attached with; the current one if the saved copy is unusable.
    async fn saved_network(&self, saved: &state::Saved) -> Result<NetworkConfList, AgentError> {
        match NetworkConfList::parse(&saved.config) {
            Ok(net) => Ok(net),
            Err(reason) => {
                tracing::warn!(bot = %saved.bot, %reason, "saved network config unusable; using the current one");
                self.load_network().await
            }
        }
    }

    /// A healthy saved attachment as a [`BotNetwork`], or why it is not healthy.
    async fn healthy(&self, saved: &state::Saved) -> Result<BotNetwork, String> {
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
        let net = NetworkConfList::parse(&saved.config)?;
        let rt = RuntimeConf {
            container_id: saved.container_id.clone(),
            netns: Some(saved.netns.clone()),
            ifname: saved.ifname.clone(),
            ip: None,
        };
        self.cni
            .check(&net, &rt, &saved.result)
            .await
            .map_err(|e| e.to_string())?;
        Ok(bn)
    }

    /// The typed view of a saved attachment; an attachment without an address is an error.
    fn describe(&self, saved: &state::Saved) -> Result<BotNetwork, AgentError> {
        let op = || format!("cni add {}", saved.container_id);
        let result = result::parse_result(&saved.result)
            .map_err(|reason| AgentError::Network { op: op(), reason })?;
        let ip = result
            .primary_ip(&saved.ifname)
            .cloned()
            .ok_or_else(|| AgentError::Network {
                op: op(),
                reason: "the plugins returned no ip address".into(),
            })?;
        let bridge = NetworkConfList::parse(&saved.config)
            .ok()
            .and_then(|n| n.bridge_name());
        Ok(BotNetwork {
            bot: saved.bot.clone(),
            container_id: saved.container_id.clone(),
            netns: saved.netns.clone(),
            ip: ip.address,
            prefix_len: ip.prefix_len,
            gateway: ip.gateway,
            host_veth: result.host_veth(bridge.as_deref()).map(str::to_string),
            bridge,
            result,
        })
    }

    /// Makes sure the host rules `bn`'s network needs exist: the MASQUERADE fallback for its
    /// subnet and the isolation of its bridge (as [`Network::setup`] does).
    pub async fn ensure_host_rules(&self, bn: &BotNetwork) -> Result<(), AgentError> {
        self.host_rules(bn).await
    }

    /// MASQUERADE for the bot's subnet and isolation on its bridge, as configured.
    async fn host_rules(&self, bn: &BotNetwork) -> Result<(), AgentError> {
        if self.cfg.masquerade && bn.ip.is_ipv4() {
            self.firewall.ensure_masquerade(&bn.subnet()).await?;
        }
        if self.cfg.isolate {
            if let Some(bridge) = &bn.bridge {
                self.firewall.ensure_isolation(bridge).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
