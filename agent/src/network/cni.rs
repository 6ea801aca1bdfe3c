//! A small libcni: runs a network's plugins for ADD, CHECK and DEL.
//!
//! [`PluginExec`] is the outside system (plugin binaries); [`ExecPlugins`] is the real one.
//! [`CniChain`] holds the protocol logic (prevResult chaining, reverse DEL) and orders the
//! plugin invocations of the whole process with one read-write lock (`PLUGIN_LOCK`):
//!
//! - **exclusive** (nothing else runs): an ADD whose network's bridge does not exist yet, the
//!   retry ADD after a failed one ([`CniChain::add_exclusive`]), and every command of a
//!   network that has a plugin the agent does not know to be safe concurrently;
//! - **shared** (overlapping each other): any other ADD, every CHECK and every DEL.
//!
//! Why sharing is safe for the known plugins (`bridge` with `host-local` or `static` IPAM,
//! `portmap`, `firewall`, `tuning`, `bandwidth`, `loopback`): host-local takes its own file
//! lock around its store for every allocation and release; the bridge plugin accepts an
//! existing bridge, finds an existing gateway address and leaves the bridge's MAC alone (the
//! agent pins it before ADD); each container's veth, masquerade chain and reservation are
//! named after the container, so two containers never write the same object; iptables calls
//! wait for each other (`-w`, and nf_tables transactions). containerd's CRI runs the same
//! plugins with no global lock. What is not safe is the first ADD of a bridge network: it
//! creates the bridge and sets its gateway address, and two of those at once race on the
//! same link. Such an ADD therefore runs alone, and so does the retry of any failed ADD.

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::AgentError;

use super::cmd;
use super::conf::NetworkConfList;
use super::result::PluginError;

/// The lock of every plugin invocation in the process (see the module docs for who holds it
/// shared and who exclusive). It is process-wide, not per [`CniChain`], so that two chains
/// built from different configs never overlap in unsafe ways either: an exclusive holder
/// excludes every chain, and only chains made of known plugins ever share it. tokio's lock
/// is fair: a waiting exclusive ADD holds back shared ones that come after it.
static PLUGIN_LOCK: RwLock<()> = RwLock::const_new(());

/// Plugins known to run safely next to each other once their network's bridge exists.
const SHAREABLE_PLUGINS: &[&str] = &[
    "bridge",
    "portmap",
    "firewall",
    "tuning",
    "bandwidth",
    "loopback",
];

/// IPAM plugins known to be safe concurrently (host-local locks its store; static has none).
const SHAREABLE_IPAM: &[&str] = &["host-local", "static"];

/// How an invocation holds [`PLUGIN_LOCK`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Alongside other shared holders.
    Shared,
    /// Alone.
    Exclusive,
}

/// A held [`PLUGIN_LOCK`]; released when dropped.
enum PluginGuard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

impl PluginGuard {
    async fn take(mode: LockMode) -> Self {
        match mode {
            LockMode::Shared => PluginGuard::Shared(PLUGIN_LOCK.read().await),
            LockMode::Exclusive => PluginGuard::Exclusive(PLUGIN_LOCK.write().await),
        }
    }
}

/// Whether every plugin of `net` (and its IPAM) is known to be safe concurrently.
fn shareable(net: &NetworkConfList) -> bool {
    net.plugins.iter().enumerate().all(|(i, p)| {
        SHAREABLE_PLUGINS.contains(&net.plugin_type(i))
            && p.get("ipam").is_none_or(|ipam| {
                ipam.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| SHAREABLE_IPAM.contains(&t))
            })
    })
}

/// Whether `name` can be an interface name (so a path under `/sys/class/net` is that link).
fn valid_link_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        && !name.chars().any(char::is_whitespace)
}

/// Default time one plugin may take.
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The CNI command of an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    /// Attach the container to the network.
    Add,
    /// Verify the attachment.
    Check,
    /// Detach and release.
    Del,
}

impl CniCommand {
    /// The `CNI_COMMAND` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Check => "CHECK",
            CniCommand::Del => "DEL",
        }
    }
}

/// Who is being attached: the runtime side of an invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConf {
    /// `CNI_CONTAINERID`; host-local keys its reservations on it.
    pub container_id: String,
    /// `CNI_NETNS`; `None` on a DEL whose namespace is gone.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`, e.g. `eth0`.
    pub ifname: String,
    /// An address to ask IPAM for (`CNI_ARGS` `IP=`, which host-local honours), so a bot
    /// attached again gets its old address back.
    pub ip: Option<std::net::IpAddr>,
}

impl RuntimeConf {
    /// `CNI_ARGS`: empty, or `IgnoreUnknown=1;IP=ADDR` (plugins that do not know `IP` skip it).
    pub fn cni_args(&self) -> String {
        match self.ip {
            Some(ip) => format!("IgnoreUnknown=1;IP={ip}"),
            None => String::new(),
        }
    }
}

/// One plugin invocation.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// The command.
    pub command: CniCommand,
    /// The plugin `type` (binary name).
    pub plugin: &'a str,
    /// The runtime side.
    pub runtime: &'a RuntimeConf,
    /// The full stdin config.
    pub config: Value,
    /// How the invocation holds the plugin lock (for logs and tests).
    pub lock: LockMode,
}

/// The outside system: running one CNI plugin binary.
pub trait PluginExec: Send + Sync {
    /// Runs the plugin; returns its parsed stdout (`None` when empty, as for DEL and CHECK).
    /// A plugin that fails returns [`AgentError::CniPlugin`].
    fn exec(
        &self,
        inv: Invocation<'_>,
    ) -> impl Future<Output = Result<Option<Value>, AgentError>> + Send;

    /// Whether network interface `name` exists in the agent's namespace (a network's bridge,
    /// which its first ADD creates). A name that cannot be an interface does not exist.
    fn link_exists(&self, name: &str) -> bool {
        valid_link_name(name) && Path::new("/sys/class/net").join(name).exists()
    }
}

/// Runs plugin binaries found in a list of directories.
#[derive(Debug, Clone)]
pub struct ExecPlugins {
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
}

impl ExecPlugins {
    /// Plugins are looked up in `bin_dirs` in order (also passed to them as `CNI_PATH`, which
    /// the bridge plugin uses to find its IPAM plugin); each run may take up to `timeout`.
    pub fn new(bin_dirs: Vec<PathBuf>, timeout: Duration) -> Self {
        Self { bin_dirs, timeout }
    }

    /// The first `dir/plugin` that exists.
    pub fn find(&self, plugin: &str) -> Option<PathBuf> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
    }

    fn cni_path(&self) -> std::ffi::OsString {
        std::env::join_paths(self.bin_dirs.iter().filter(|d| d.is_dir())).unwrap_or_default()
    }
}

impl PluginExec for ExecPlugins {
    async fn exec(&self, inv: Invocation<'_>) -> Result<Option<Value>, AgentError> {
        let op = format!(
            "cni {} {} for {}",
            inv.command.as_str(),
            inv.plugin,
            inv.runtime.container_id
        );
        let binary = self.find(inv.plugin).ok_or_else(|| AgentError::Network {
            op: op.clone(),
            reason: format!(
                "plugin {:?} not found in {}",
                inv.plugin,
                self.bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        let stdin = serde_json::to_vec(&inv.config).map_err(|e| AgentError::Network {
            op: op.clone(),
            reason: e.to_string(),
        })?;
        let netns = inv
            .runtime
            .netns
            .as_deref()
            .map(Path::as_os_str)
            .unwrap_or_default();
        let cni_path = self.cni_path();
        let cni_args = inv.runtime.cni_args();
        let envs: [(&str, &OsStr); 6] = [
            ("CNI_COMMAND", OsStr::new(inv.command.as_str())),
            ("CNI_CONTAINERID", OsStr::new(&inv.runtime.container_id)),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", OsStr::new(&inv.runtime.ifname)),
            ("CNI_PATH", &cni_path),
            ("CNI_ARGS", OsStr::new(&cni_args)),
        ];
        let no_args: [&str; 0] = [];
        tracing::debug!(plugin = inv.plugin, command = inv.command.as_str(), container = %inv.runtime.container_id, lock = ?inv.lock, "running cni plugin");
        let out = cmd::run(
            &op,
            binary.as_os_str(),
            no_args,
            &envs,
            Some(&stdin),
            self.timeout,
        )
        .await?;
        if !out.success() {
            return Err(plugin_failure(&inv, &out.stdout, &out.stderr_text()));
        }
        let text = out.stdout_text();
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| AgentError::Network {
                op,
                reason: format!("plugin printed invalid JSON ({e}): {text}"),
            })
    }
}

/// Turns a failed plugin's output into [`AgentError::CniPlugin`].
fn plugin_failure(inv: &Invocation<'_>, stdout: &[u8], stderr: &str) -> AgentError {
    let (code, reason) = match PluginError::parse(stdout) {
        Some(e) => (e.code, e.reason()),
        None => {
            let out = String::from_utf8_lossy(stdout).trim().to_string();
            let reason = [out.as_str(), stderr]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            (
                0,
                if reason.is_empty() {
                    "no output".into()
                } else {
                    reason
                },
            )
        }
    };
    AgentError::CniPlugin {
        plugin: inv.plugin.to_string(),
        command: inv.command.as_str().to_string(),
        container: inv.runtime.container_id.clone(),
        code,
        reason,
    }
}

/// The protocol: runs a whole network for ADD, CHECK and DEL over a [`PluginExec`].
#[derive(Debug, Clone)]
pub struct CniChain<E> {
    exec: E,
}

impl<E: PluginExec> CniChain<E> {
    /// Wraps an executor.
    pub fn new(exec: E) -> Self {
        Self { exec }
    }

    /// The executor.
    pub fn exec(&self) -> &E {
        &self.exec
    }

    /// How an ADD of `net` holds the plugin lock now: shared once the network's bridge exists
    /// and every plugin is known to be safe concurrently, exclusive otherwise.
    pub fn add_mode(&self, net: &NetworkConfList) -> LockMode {
        if !shareable(net) {
            return LockMode::Exclusive;
        }
        match net.bridge_name() {
            Some(bridge) if !self.exec.link_exists(&bridge) => LockMode::Exclusive,
            _ => LockMode::Shared,
        }
    }

    /// How CHECK and DEL of `net` hold the plugin lock: shared for a network of known plugins
    /// (neither creates the bridge), exclusive otherwise.
    fn other_mode(net: &NetworkConfList) -> LockMode {
        if shareable(net) {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        }
    }

    /// ADD: each plugin in order, each one given the previous one's result; returns the last.
    /// Runs shared or exclusive as [`CniChain::add_mode`] says.
    pub async fn add(&self, net: &NetworkConfList, rt: &RuntimeConf) -> Result<Value, AgentError> {
        self.add_locked(net, rt, self.add_mode(net)).await
    }

    /// ADD holding the plugin lock exclusively, whatever the network: the retry after a
    /// failed ADD, which may have failed on something a concurrent ADD did.
    pub async fn add_exclusive(
        &self,
        net: &NetworkConfList,
        rt: &RuntimeConf,
    ) -> Result<Value, AgentError> {
        self.add_locked(net, rt, LockMode::Exclusive).await
    }

    async fn add_locked(
        &self,
        net: &NetworkConfList,
        rt: &RuntimeConf,
        mut mode: LockMode,
    ) -> Result<Value, AgentError> {
        let mut steps = crate::steps::Steps::start();
        let mut guard = PluginGuard::take(mode).await;
        if mode == LockMode::Shared && self.add_mode(net) == LockMode::Exclusive {
            // The bridge went while this ADD waited (someone deleted it): recreating it is
            // the first ADD's job, which runs alone.
            drop(guard);
            mode = LockMode::Exclusive;
            guard = PluginGuard::take(mode).await;
        }
        steps.mark("lock");
        let mut prev: Option<Value> = None;
        for i in 0..net.plugins.len() {
            let inv = Invocation {
                command: CniCommand::Add,
                plugin: net.plugin_type(i),
                runtime: rt,
                config: net.plugin_stdin(i, prev.as_ref()),
                lock: mode,
            };
            match self.exec.exec(inv).await? {
                Some(v) => prev = Some(v),
                None => {
                    return Err(AgentError::Network {
                        op: format!("cni ADD {} for {}", net.plugin_type(i), rt.container_id),
                        reason: "plugin printed no result".into(),
                    })
                }
            }
        }
        drop(guard);
        steps.mark("plugins");
        tracing::debug!(container = %rt.container_id, lock = ?mode, total_ms = steps.total_ms(), %steps, "cni add steps");
        prev.ok_or_else(|| AgentError::Network {
            op: format!("cni ADD {} for {}", net.name, rt.container_id),
            reason: "network has no plugins".into(),
        })
    }

    /// CHECK: each plugin in order with the saved result. A network with `disableCheck`, or
    /// a version before 0.4.0, passes without running anything.
    pub async fn check(
        &self,
        net: &NetworkConfList,
        rt: &RuntimeConf,
        prev: &Value,
    ) -> Result<(), AgentError> {
        if net.disable_check || !net.supports_check() {
            return Ok(());
        }
        let mode = Self::other_mode(net);
        let _guard = PluginGuard::take(mode).await;
        for i in 0..net.plugins.len() {
            let inv = Invocation {
                command: CniCommand::Check,
                plugin: net.plugin_type(i),
                runtime: rt,
                config: net.plugin_stdin(i, Some(prev)),
                lock: mode,
            };
            self.exec.exec(inv).await?;
        }
        Ok(())
    }

    /// DEL: each plugin in reverse order (with the saved result as `prevResult` from 0.4.0
    /// on). Every plugin runs even if an earlier one failed, so one broken plugin does not
    /// leak the others' state; the first error is returned.
    pub async fn del(
        &self,
        net: &NetworkConfList,
        rt: &RuntimeConf,
        prev: Option<&Value>,
    ) -> Result<(), AgentError> {
        let prev = prev.filter(|_| net.supports_check());
        let mode = Self::other_mode(net);
        let _guard = PluginGuard::take(mode).await;
        let mut first_err = None;
        for i in (0..net.plugins.len()).rev() {
            let inv = Invocation {
                command: CniCommand::Del,
                plugin: net.plugin_type(i),
                runtime: rt,
                config: net.plugin_stdin(i, prev),
                lock: mode,
            };
            if let Err(e) = self.exec.exec(inv).await {
                tracing::warn!(error = %e, "cni DEL step failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A scripted [`PluginExec`] for unit tests of the protocol logic.

    use std::collections::{HashSet, VecDeque};
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;

    /// One recorded call.
    #[derive(Debug, Clone)]
    pub struct Call {
        pub command: CniCommand,
        pub plugin: String,
        pub netns: Option<PathBuf>,
        pub config: Value,
        /// The address asked for (`CNI_ARGS` `IP=`).
        pub ip: Option<std::net::IpAddr>,
        /// The container (`CNI_CONTAINERID`).
        pub container: String,
        /// How the call held the plugin lock.
        pub lock: LockMode,
        /// When the call began and ended.
        pub span: (Instant, Instant),
    }

    type Answer = (CniCommand, Result<Option<Value>, String>);

    /// Answers come from a queue per command; a missing answer is `Ok(None)` for
    /// DEL/CHECK and an error for ADD. Each call takes `delay`; `links` are the interfaces
    /// that exist (none by default, so every bridge is still to be created).
    #[derive(Default)]
    pub struct FakeExec {
        pub calls: Mutex<Vec<Call>>,
        pub answers: Mutex<VecDeque<Answer>>,
        pub links: Mutex<HashSet<String>>,
        pub delay: Mutex<Duration>,
    }

    impl FakeExec {
        pub fn answer(&self, cmd: CniCommand, r: Result<Option<Value>, &str>) {
            self.answers
                .lock()
                .unwrap()
                .push_back((cmd, r.map_err(str::to_string)));
        }

        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl PluginExec for FakeExec {
        fn link_exists(&self, name: &str) -> bool {
            self.links.lock().unwrap().contains(name)
        }

        async fn exec(&self, inv: Invocation<'_>) -> Result<Option<Value>, AgentError> {
            let start = Instant::now();
            let delay = *self.delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            self.calls.lock().unwrap().push(Call {
                command: inv.command,
                plugin: inv.plugin.to_string(),
                netns: inv.runtime.netns.clone(),
                config: inv.config.clone(),
                ip: inv.runtime.ip,
                container: inv.runtime.container_id.clone(),
                lock: inv.lock,
                span: (start, Instant::now()),
            });
            let mut q = self.answers.lock().unwrap();
            let pos = q.iter().position(|(c, _)| *c == inv.command);
            match pos.and_then(|p| q.remove(p)) {
                Some((_, Ok(v))) => Ok(v),
                Some((_, Err(reason))) => Err(AgentError::CniPlugin {
                    plugin: inv.plugin.to_string(),
                    command: inv.command.as_str().into(),
                    container: inv.runtime.container_id.clone(),
                    code: 11,
                    reason,
                }),
                None if inv.command == CniCommand::Add => Err(AgentError::Network {
                    op: "fake".into(),
                    reason: "no scripted ADD answer".into(),
                }),
                None => Ok(None),
            }
        }
    }
}

#[cfg(test)]
#[path = "cni_tests.rs"]
mod tests;
