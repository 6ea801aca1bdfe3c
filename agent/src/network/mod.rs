//! Bot networking: named namespaces, CNI attach and detach, and the host's firewall rules.
//!
//! The lifecycle uses it like this:
//!
//! 1. [`Network::create_netns`] before creating the container; its path goes into the OCI
//!    spec, so the namespace belongs to the agent and outlives the task.
//! 2. [`Network::setup`] after every (re)start: keeps a healthy bot's address, otherwise runs
//!    CNI ADD (retrying once after a DEL on the known transient errors), saves what DEL will
//!    need, contains the new attachment (IPv6 off in the namespace unless it was given an
//!    IPv6 address, its bridge port isolated, the containment ruleset rebuilt), and makes sure
//!    the MASQUERADE fallback and bot-to-bot isolation are in place. An attachment that cannot
//!    be contained is removed again and setup fails: a bot never runs uncontained.
//! 3. [`Network::teardown`] on delete: CNI DEL with the saved config and result (so it works
//!    after the task died and after an agent restart), then the namespace and the saved state
//!    go, the ruleset is rebuilt without the bot, and with the last bot of a bridge, subnet or
//!    the whole agent go its isolation rule, its MASQUERADE rule and the agent's tables.
//!    Tearing down an unknown bot succeeds.
//!
//! Submodules: [`cni`] (the plugin protocol), [`conf`] (network configs), [`result`] (typed
//! results), [`netns`] (namespaces), [`firewall`] (iptables and nftables), [`containment`]
//! (what a bot may reach, rendered as an nftables ruleset; its docs are the security model).
//! Each outside system sits behind a trait ([`cni::PluginExec`], [`netns::Netns`],
//! [`firewall::Firewall`]) with the real implementation as the default type parameter.

mod cmd;
pub mod cni;
pub mod conf;
pub mod containment;
pub mod firewall;
pub mod netns;
pub mod result;
mod state;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::error::AgentError;

pub use cni::{CniChain, ExecPlugins, PluginExec, RuntimeConf};
pub use conf::NetworkConfList;
pub use containment::Policy;
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
    /// What else bots may reach, and the agent's nftables tables.
    pub containment: Policy,
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
            containment: Policy {
                enabled: true,
                table: containment::table_name(&c.namespace),
                host_ports_allowed: c.host_ports_allowed.clone(),
                egress_allowed: c.egress_allowed.clone(),
                resolv_conf: Some(crate::containerd::spec::HOST_RESOLV_CONF.into()),
            },
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
    /// Orders rebuilding the ruleset from the saved attachments with the host-rule changes
    /// around it, so the last rebuild always sees the last attachment change.
    contain_lock: tokio::sync::Mutex<()>,
    /// Bridges whose isolation [`Network::remove_isolation`] lifted (until
    /// [`Network::ensure_isolation`]).
    lifted: std::sync::Mutex<HashSet<String>>,
    /// Whether the missing bridge netfilter was reported already (once is enough).
    warned_bridge_nf: AtomicBool,
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
            contain_lock: tokio::sync::Mutex::new(()),
            lifted: std::sync::Mutex::new(HashSet::new()),
            warned_bridge_nf: AtomicBool::new(false),
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
        let (bn, fresh) = self.attach(bot, netns).await?;
        if let Err(e) = self.host_rules(&bn).await {
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
            if let Err(e) = self.contain().await {
                return Err(self.detach_uncontained(&bn, e).await);
            }
        }
        Ok(bn)
    }

    /// The attachment of [`Network::setup`]; also says whether it is new (not the healthy one
    /// that was kept). A new attachment has its own part of containment in place (IPv6, port
    /// isolation), not yet the rebuilt ruleset.
    async fn attach(&self, bot: &str, netns: &Path) -> Result<(BotNetwork, bool), AgentError> {
        check_bot_id(bot)?;
        let cid = container_id(bot);
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

        // Containment must work before the bot gets any network: a host where the ruleset
        // cannot be applied refuses the bot before ADD makes its interface.
        if self.cfg.containment.enabled || self.cfg.isolate {
            self.contain().await.map_err(|e| AgentError::Network {
                op: format!("contain bot {bot}"),
                reason: format!("isolation cannot be put in place, the bot is not started: {e}"),
            })?;
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
        if let Err(e) = self.contain_attachment(&bn).await {
            return Err(self.detach_uncontained(&bn, e).await);
        }
        tracing::info!(bot, ip = %bn.ip, netns = %netns.display(), "bot attached to the network");
        Ok((bn, true))
    }

    /// The per-attachment part of containment: a bridge port to filter on, IPv6 off in the
    /// namespace when the bot has no IPv6 address, the port isolated from the other bots.
    async fn contain_attachment(&self, bn: &BotNetwork) -> Result<(), AgentError> {
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
    async fn detach_uncontained(&self, bn: &BotNetwork, e: AgentError) -> AgentError {
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
    /// gone), then deletes the bot's namespace and its saved state. An unknown or already
    /// torn-down bot succeeds. When DEL fails the state is kept so a later teardown can retry.
    pub async fn teardown(&self, bot: &str) -> Result<(), AgentError> {
        check_bot_id(bot)?;
        let cid = container_id(bot);
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
        self.release(freed.as_ref()).await;
        tracing::info!(bot, "bot detached from the network");
        Ok(())
    }

    /// After a bot's attachment went: the ruleset without it (the tables go with the last
    /// bot), and the isolation and MASQUERADE rules of its bridge and subnet once no other
    /// bot of this agent uses them. Failures are only logged: they leave a stricter or stale
    /// rule, never an open one, and must not keep a bot from being deleted.
    async fn release(&self, freed: Option<&BotNetwork>) {
        let _g = self.contain_lock.lock().await;
        if let Err(e) = self.contain_locked().await {
            tracing::warn!(error = %e, "cannot rebuild the containment ruleset");
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
                match self.firewall.remove_isolation(bridge).await {
                    Ok(true) => tracing::info!(
                        bridge,
                        "last bot of the bridge gone; isolation rule removed"
                    ),
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
                match self.firewall.remove_masquerade(&subnet).await {
                    Ok(true) => tracing::info!(
                        subnet,
                        "last bot of the subnet gone; masquerade rule removed"
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(subnet, error = %e, "cannot remove the masquerade rule")
                    }
                }
            }
        }
    }

    /// Every bot this agent has attached (its saved attachments), described.
    async fn attached(&self) -> Result<Vec<BotNetwork>, AgentError> {
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
    fn isolates(&self, bridge: &str) -> bool {
        self.cfg.isolate && !lock(&self.lifted).contains(bridge)
    }

    /// Rebuilds the containment ruleset from the saved attachments (see
    /// [`containment`]); with no attachment left, removes the agent's tables.
    pub async fn contain(&self) -> Result<(), AgentError> {
        let _g = self.contain_lock.lock().await;
        self.contain_locked().await
    }

    /// [`Network::contain`]; the caller holds `contain_lock`.
    async fn contain_locked(&self) -> Result<(), AgentError> {
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

    /// MASQUERADE for the bot's subnet, isolation on its bridge (with bridge netfilter on for
    /// its iptables layer), and the containment ruleset rebuilt, as configured.
    async fn host_rules(&self, bn: &BotNetwork) -> Result<(), AgentError> {
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

/// The bot's own addresses: those on its interface in the result (every address when the
/// result does not say which interface holds it).
fn bot_addrs(bn: &BotNetwork) -> Vec<IpAddr> {
    let r = &bn.result;
    let mine: Vec<IpAddr> = r
        .ips
        .iter()
        .filter(|ip| {
            ip.interface
                .and_then(|i| r.interfaces.get(i))
                .is_some_and(|itf| itf.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
        })
        .map(|ip| ip.address)
        .collect();
    if mine.is_empty() {
        r.ips.iter().map(|ip| ip.address).collect()
    } else {
        mine
    }
}

/// Locks a std mutex, recovering from a poisoned one (the data is a plain set).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
