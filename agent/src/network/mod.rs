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
//! 3. [`Network::teardown`] on stop and delete: CNI DEL with the saved config and result (so it works
//!    after the task died and after an agent restart), then the namespace and the saved state
//!    go, the ruleset is rebuilt without the bot, and with the last bot of a bridge, subnet or
//!    the whole agent go its isolation rule, its MASQUERADE rule and the agent's tables.
//!    Tearing down an unknown bot succeeds. The address the bot had is remembered in its
//!    state directory; its next setup asks IPAM for it again (`CNI_ARGS` `IP=`), and takes a
//!    new one, with a warning, when another bot holds it meanwhile.
//!
//! 4. [`Network::cleanup`] (`memoh-agent net cleanup`): removes what the agent's namespace
//!    left behind and no existing bot uses.
//!
//! Here: the settings, the [`Network`] type, the bot's namespace and saved attachment. The flow
//! is split by concern: `attach` (setup and teardown of one bot), `rules` (the containment
//! ruleset, MASQUERADE and isolation around the attachments), `cleanup` (leftovers).
//! Names (namespaces, tables, state files) come from [`crate::ids`].
//!
//! Submodules: [`cni`] (the plugin protocol), [`conf`] (network configs), [`result`] (typed
//! results), [`netns`] (namespaces), [`inside`] (what is inside one, read in-process),
//! [`firewall`] (iptables and nftables), [`containment`]
//! (what a bot may reach, rendered as an nftables ruleset; its docs are the security model).
//! Each outside system sits behind a trait ([`cni::PluginExec`], [`netns::Netns`],
//! [`firewall::Firewall`]) with the real implementation as the default type parameter.

mod attach;
mod cleanup;
mod cmd;
pub mod cni;
pub mod conf;
pub mod containment;
pub mod firewall;
pub mod inside;
pub mod netns;
pub mod result;
mod rules;
mod state;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::AgentError;
use crate::ids;

pub use attach::is_retryable_add_error;
pub use cleanup::{Leftover, LeftoverKind};
pub use cni::{CniChain, ExecPlugins, PluginExec, RuntimeConf};
pub use conf::NetworkConfList;
pub use containment::Policy;
pub use firewall::{Firewall, Iptables};
pub use netns::{IpNetns, Netns};
pub use result::CniResult;

/// How often a kept attachment gets a CNI CHECK by default: every eighth periodic pass. The
/// address check of every pass finds a lost interface or address; CHECK adds the plugins'
/// view (the port on its bridge, the IPAM reservation), and at 15 s for every bot it was
/// most of the agent's idle CPU at 100 bots.
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(120);

/// The least average time between two CNI CHECKs across all bots by default: a kept
/// attachment is due every [`NetworkConfig::check_every`], or every `bots × check_gap` when
/// that is longer, so however many bots run, CHECK costs about one pair of plugin runs a
/// second at most (at 1 000 bots the 120 s period alone meant eight a second, 40 % of a core
/// of an idle host).
pub const DEFAULT_CHECK_GAP: Duration = Duration::from_secs(1);

/// Settings of the network module, usually built with [`NetworkConfig::from_config`].
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The agent's containerd namespace: part of every host-wide name (see [`crate::ids`]).
    pub namespace: String,
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
    /// How often the health check of a kept attachment also runs CNI CHECK (two plugin
    /// processes); the in-process address check runs every time. Zero: CHECK every time.
    pub check_every: Duration,
    /// The least average time between two CHECKs across all bots ([`DEFAULT_CHECK_GAP`]):
    /// with many bots each one's CHECK comes less often than `check_every`. Zero: no bound.
    pub check_gap: Duration,
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
            namespace: c.namespace.clone(),
            conf_dir: c.cni_conf_dir.clone(),
            bin_dirs: c.cni_bin_dirs.clone(),
            network: c.cni_network.clone(),
            bridge: c.cni_bridge.clone(),
            subnet: c.cni_subnet.clone(),
            ipam_data_dir: c.cni_ipam_dir.clone(),
            state_dir: c.state_dir.clone(),
            ifname: "eth0".into(),
            plugin_timeout: cni::DEFAULT_PLUGIN_TIMEOUT,
            check_every: DEFAULT_CHECK_EVERY,
            check_gap: DEFAULT_CHECK_GAP,
            masquerade: true,
            isolate: true,
            containment: Policy {
                enabled: true,
                table: crate::ids::table_name(&c.namespace),
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
pub use crate::ids::container_id;

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
    /// Which requests for a rebuild and for host rules a finished pass already covers, so
    /// concurrent setups share one pass instead of queueing one each ([`rules`]).
    passes: std::sync::Mutex<rules::Passes>,
    /// What the agent's tables hold, when it knows (changed only under `contain_lock`), so
    /// one attachment change is a delta, not a rebuild ([`Network::contain_change`]).
    applied: std::sync::Mutex<Option<rules::Applied>>,
    /// Bridges whose isolation [`Network::remove_isolation`] lifted (until
    /// [`Network::ensure_isolation`]).
    lifted: std::sync::Mutex<HashSet<String>>,
    /// Whether the missing bridge netfilter was reported already (once is enough).
    warned_bridge_nf: AtomicBool,
    /// When each bot's attachment last passed CNI CHECK (or was made by ADD), for
    /// [`NetworkConfig::check_every`].
    checked: std::sync::Mutex<HashMap<String, Instant>>,
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
            passes: std::sync::Mutex::default(),
            applied: std::sync::Mutex::default(),
            lifted: std::sync::Mutex::new(HashSet::new()),
            warned_bridge_nf: AtomicBool::new(false),
            checked: std::sync::Mutex::default(),
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

    /// The namespace name of bot `bot` ([`ids::netns_name`] in the agent's namespace).
    pub fn netns_name(&self, bot: &str) -> String {
        ids::netns_name(&self.cfg.namespace, bot)
    }

    /// The namespace path of bot `bot` (`/run/netns/memoh-<ns>.<bot>`), whether or not it
    /// exists.
    pub fn netns_path(&self, bot: &str) -> PathBuf {
        self.netns.path(&self.netns_name(bot))
    }

    /// Creates (or finds) the bot's namespace; returns its path for the OCI spec.
    pub async fn create_netns(&self, bot: &str) -> Result<PathBuf, AgentError> {
        ids::validate(bot)?;
        self.netns.create(&self.netns_name(bot)).await
    }

    /// Deletes the bot's namespace; a missing one is fine.
    pub async fn delete_netns(&self, bot: &str) -> Result<(), AgentError> {
        ids::validate(bot)?;
        self.netns.delete(&self.netns_name(bot)).await
    }

    /// The name of the agent's namespace at `path`, when it is one the agent may delete (in
    /// the run dir, a valid name).
    fn own_netns_name<'a>(&self, path: &'a Path) -> Option<&'a str> {
        if path.parent() != Some(Path::new(netns::NETNS_RUN_DIR)) {
            return None;
        }
        path.file_name()
            .and_then(|n| n.to_str())
            .filter(|n| netns::valid_netns_name(n))
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
        ids::validate(bot)?;
        match state::load(&self.cfg.state_dir, bot).await? {
            Some(Ok(s)) => self.describe(&s).map(Some),
            Some(Err(reason)) => Err(AgentError::Network {
                op: format!("saved network of {bot}"),
                reason,
            }),
            None => Ok(None),
        }
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
