//! A small libcni: runs a network's plugins for ADD, CHECK and DEL.
//!
//! [`PluginExec`] is the outside system (plugin binaries); [`ExecPlugins`] is the real one.
//! [`CniChain`] holds the protocol logic (prevResult chaining, reverse DEL) and serialises
//! every plugin invocation in the process through one lock, because the reference plugins
//! are not safe to run concurrently (host-local's store, the bridge's MAC, iptables).

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Mutex;

use crate::error::AgentError;

use super::cmd;
use super::conf::NetworkConfList;
use super::result::PluginError;

/// One lock for every plugin invocation in the process. It is a process-wide lock (not per
/// [`CniChain`]) so that two chains built from different configs still never overlap.
static PLUGIN_LOCK: Mutex<()> = Mutex::const_new(());

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
}

/// The outside system: running one CNI plugin binary.
pub trait PluginExec: Send + Sync {
    /// Runs the plugin; returns its parsed stdout (`None` when empty, as for DEL and CHECK).
    /// A plugin that fails returns [`AgentError::CniPlugin`].
    fn exec(
        &self,
        inv: Invocation<'_>,
    ) -> impl Future<Output = Result<Option<Value>, AgentError>> + Send;
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
        tracing::debug!(plugin = inv.plugin, command = inv.command.as_str(), container = %inv.runtime.container_id, "running cni plugin");
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

    /// ADD: each plugin in order, each one given the previous one's result; returns the last.
    pub async fn add(&self, net: &NetworkConfList, rt: &RuntimeConf) -> Result<Value, AgentError> {
        let mut steps = crate::steps::Steps::start();
        let _guard = PLUGIN_LOCK.lock().await;
        steps.mark("lock");
        let mut prev: Option<Value> = None;
        for i in 0..net.plugins.len() {
            let inv = Invocation {
                command: CniCommand::Add,
                plugin: net.plugin_type(i),
                runtime: rt,
                config: net.plugin_stdin(i, prev.as_ref()),
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
        steps.mark("plugins");
        tracing::debug!(container = %rt.container_id, total_ms = steps.total_ms(), %steps, "cni add steps");
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
        let _guard = PLUGIN_LOCK.lock().await;
        for i in 0..net.plugins.len() {
            let inv = Invocation {
                command: CniCommand::Check,
                plugin: net.plugin_type(i),
                runtime: rt,
                config: net.plugin_stdin(i, Some(prev)),
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
        let _guard = PLUGIN_LOCK.lock().await;
        let mut first_err = None;
        for i in (0..net.plugins.len()).rev() {
            let inv = Invocation {
                command: CniCommand::Del,
                plugin: net.plugin_type(i),
                runtime: rt,
                config: net.plugin_stdin(i, prev),
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

    use std::collections::VecDeque;
    use std::sync::Mutex;

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
    }

    type Answer = (CniCommand, Result<Option<Value>, String>);

    /// Answers come from a queue per command; a missing answer is `Ok(None)` for
    /// DEL/CHECK and an error for ADD.
    #[derive(Default)]
    pub struct FakeExec {
        pub calls: Mutex<Vec<Call>>,
        pub answers: Mutex<VecDeque<Answer>>,
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
        async fn exec(&self, inv: Invocation<'_>) -> Result<Option<Value>, AgentError> {
            self.calls.lock().unwrap().push(Call {
                command: inv.command,
                plugin: inv.plugin.to_string(),
                netns: inv.runtime.netns.clone(),
                config: inv.config.clone(),
                ip: inv.runtime.ip,
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
mod tests {
    use super::fake::FakeExec;
    use super::*;
    use serde_json::json;

    fn two_plugins() -> NetworkConfList {
        NetworkConfList::parse(&json!({
            "cniVersion": "1.0.0", "name": "n",
            "plugins": [{"type": "bridge"}, {"type": "tuning"}]
        }))
        .unwrap()
    }

    fn rt() -> RuntimeConf {
        RuntimeConf {
            container_id: "mcp-a".into(),
            netns: Some("/run/netns/memoh-a".into()),
            ifname: "eth0".into(),
            ip: None,
        }
    }

    #[test]
    fn cni_args_ask_for_an_address_only_when_given() {
        assert_eq!(rt().cni_args(), "");
        let with_ip = RuntimeConf {
            ip: Some("10.88.0.7".parse().unwrap()),
            ..rt()
        };
        assert_eq!(with_ip.cni_args(), "IgnoreUnknown=1;IP=10.88.0.7");
    }

    #[tokio::test]
    async fn add_chains_prev_result() {
        let fake = FakeExec::default();
        fake.answer(CniCommand::Add, Ok(Some(json!({"step": 1}))));
        fake.answer(CniCommand::Add, Ok(Some(json!({"step": 2}))));
        let chain = CniChain::new(fake);
        let out = chain.add(&two_plugins(), &rt()).await.unwrap();
        assert_eq!(out, json!({"step": 2}));
        let calls = chain.exec().calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].plugin, "bridge");
        assert!(calls[0].config.get("prevResult").is_none());
        assert_eq!(calls[0].config["name"], "n");
        assert_eq!(calls[1].plugin, "tuning");
        assert_eq!(calls[1].config["prevResult"], json!({"step": 1}));
    }

    #[tokio::test]
    async fn add_stops_at_first_error() {
        let fake = FakeExec::default();
        fake.answer(CniCommand::Add, Err("boom"));
        let chain = CniChain::new(fake);
        let e = chain.add(&two_plugins(), &rt()).await.unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        assert_eq!(chain.exec().calls().len(), 1);
    }

    #[tokio::test]
    async fn del_runs_in_reverse_and_all_of_them() {
        let fake = FakeExec::default();
        fake.answer(CniCommand::Del, Err("tuning broke"));
        let chain = CniChain::new(fake);
        let prev = json!({"ips": []});
        let e = chain
            .del(&two_plugins(), &rt(), Some(&prev))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("tuning broke"), "{e}");
        let calls = chain.exec().calls();
        let order: Vec<_> = calls.iter().map(|c| c.plugin.as_str()).collect();
        assert_eq!(order, ["tuning", "bridge"]);
        assert!(calls.iter().all(|c| c.config["prevResult"] == prev));
    }

    #[tokio::test]
    async fn check_skipped_when_disabled_or_old() {
        for net in [
            json!({"cniVersion": "1.0.0", "name": "n", "disableCheck": true, "plugins": [{"type": "bridge"}]}),
            json!({"cniVersion": "0.3.1", "name": "n", "plugins": [{"type": "bridge"}]}),
        ] {
            let chain = CniChain::new(FakeExec::default());
            let net = NetworkConfList::parse(&net).unwrap();
            chain.check(&net, &rt(), &json!({})).await.unwrap();
            assert!(chain.exec().calls().is_empty());
        }
        let chain = CniChain::new(FakeExec::default());
        chain
            .check(&two_plugins(), &rt(), &json!({"x": 1}))
            .await
            .unwrap();
        let calls = chain.exec().calls();
        assert_eq!(calls.len(), 2);
        assert!(calls.iter().all(|c| c.command == CniCommand::Check));
    }

    #[test]
    fn failures_become_plugin_errors() {
        let rt = rt();
        let inv = Invocation {
            command: CniCommand::Add,
            plugin: "bridge",
            runtime: &rt,
            config: json!({}),
        };
        let cases: [(&[u8], &str, u64, &str); 3] = [
            (
                br#"{"code":11,"msg":"failed to allocate","details":"duplicate allocation is not allowed"}"#,
                "",
                11,
                "failed to allocate; duplicate allocation is not allowed",
            ),
            (b"", "panic: oops", 0, "panic: oops"),
            (b"", "", 0, "no output"),
        ];
        for (stdout, stderr, code, reason) in cases {
            match plugin_failure(&inv, stdout, stderr) {
                AgentError::CniPlugin {
                    code: c, reason: r, ..
                } => {
                    assert_eq!((c, r.as_str()), (code, reason));
                }
                other => panic!("{other:?}"),
            }
        }
        let msg = plugin_failure(&inv, br#"{"code":7,"msg":"bad config"}"#, "").to_string();
        assert_eq!(
            msg,
            "cni plugin bridge ADD for mcp-a failed (code 7): bad config"
        );
    }

    #[tokio::test]
    async fn missing_plugin_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let exec = ExecPlugins::new(vec![dir.path().to_path_buf()], DEFAULT_PLUGIN_TIMEOUT);
        let rt = rt();
        let e = exec
            .exec(Invocation {
                command: CniCommand::Add,
                plugin: "nope",
                runtime: &rt,
                config: json!({}),
            })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("plugin \"nope\" not found"), "{e}");
    }
}
