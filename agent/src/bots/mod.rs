//! The bot lifecycle: create, start, stop, delete, list, inspect, reconcile, and the watcher
//! that restarts crashed bots.
//!
//! containerd's metadata is the only record of bots: a bot is a container labelled
//! `mcp.bot_id`, its desired state is the container's `memoh.desired` label, its address is the
//! saved CNI result. In memory the agent only caches what it can rebuild from those: routes for
//! the pool, restart counters. One lock per bot serialises every lifecycle operation on it;
//! operations on different bots run in parallel.
//!
//! The lifecycle lives in one folder, one concern a file:
//! - `mod.rs` (this file): the [`Manager`], its state and what every part reads (records,
//!   locks, routes, listings);
//! - [`create`]: create (and its undo) and delete;
//! - [`bundles`]: task bundles a killed containerd left half-deleted, removed before a start;
//! - [`run`]: start, stop, attaching the network, waiting for the server;
//! - [`server`]: the host's server binary and `/run/memoh` on the bot's spec at every start;
//! - [`spec`]: the bot spec a platform sets (environment, DNS, hostname, mounts);
//! - [`reverse`]: each running bot's ReverseHTTP relay;
//! - [`route`]: the pooled client of a bot and what a failed call triggers;
//! - [`watch`]: reconcile, the task and link watchers, crash restarts with backoff;
//! - [`versions`]: versions (snapshots) of a bot and the cycle that takes them;
//! - [`recover`]: finishing what a dead agent or containerd left half-done;
//! - [`migrate`]: the one-time copy of legacy bind-mounted data into a bot;
//! - [`images`]: image import, pull and listing for the control API;
//! - [`fault`]: the test-only fault hook of the cycle;
//! - `tests` (test builds only): unit tests of the lifecycle's decisions over the in-memory
//!   runtime (`containerd::fake`).

pub mod bundles;
pub mod create;
pub mod fault;
pub mod images;
pub mod limits;
pub mod live;
pub mod migrate;
pub mod recover;
pub mod resources;
pub mod reverse;
pub mod route;
pub mod run;
pub mod server;
pub mod spec;
#[cfg(test)]
mod tests;
pub mod versions;
pub mod watch;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::containerd::{label_filter, ContainerInfo, Runtime, TaskState, TaskStatus};
use crate::error::AgentError;
use crate::ids::{self, LABEL_BOT_ID, LABEL_DESIRED, LABEL_LOST_STATE};
use crate::network::Network;
use crate::pool::{Pool, Route};

/// `memoh.desired` of a bot whose delete has begun (its versions go too).
const DESIRED_DELETED: &str = "deleted";
/// `memoh.desired` of a bot whose delete has begun and whose versions stay.
const DESIRED_DELETED_KEEP_VERSIONS: &str = "deleted-keep-versions";

/// What a container's `memoh.desired` label asks for: `Some(keep_versions)` when the bot is
/// being deleted.
pub(crate) fn deleting(c: &ContainerInfo) -> Option<bool> {
    match c.labels.get(LABEL_DESIRED).map(String::as_str) {
        Some(DESIRED_DELETED) => Some(false),
        Some(DESIRED_DELETED_KEEP_VERSIONS) => Some(true),
        _ => None,
    }
}

/// Whether the agent keeps this bot's task running (not stopped or paused by the operator,
/// not being deleted).
pub(super) fn wants_running(c: &ContainerInfo) -> bool {
    !matches!(
        c.labels.get(LABEL_DESIRED).map(String::as_str),
        Some("stopped" | resources::DESIRED_PAUSED)
    ) && deleting(c).is_none()
}

/// Where the bearer token appears inside a bot's container.
pub const TOKEN_MOUNT: &str = "/run/memoh/token";
/// How long `create` and `start` wait for the bot's server to answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM grace before SIGKILL on stop.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// What `bot ls` and `bot inspect` show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BotInfo {
    /// The bot id.
    pub bot_id: String,
    /// `mcp-<bot>`.
    pub container_id: String,
    /// Image reference of the container.
    pub image: String,
    /// Task state: running, stopped, created, paused, unknown, or absent.
    pub status: String,
    /// Address, when attached.
    pub ip: Option<IpAddr>,
    /// Creation time of the container record.
    pub created_at: Option<SystemTime>,
    /// Host pid of the server, when running.
    pub pid: u32,
    /// Automatic restarts since the agent started.
    pub restart_count: u32,
    /// Exit code of the last task that ended (-1: signal or unknown).
    pub last_exit_code: Option<i32>,
    /// When that task ended.
    pub last_exit_at: Option<SystemTime>,
    /// What containerd lost of the bot's state, if it ever did (see [`LABEL_LOST_STATE`]).
    pub lost_state: Option<String>,
    /// What the bot may use.
    pub limits: limits::Limits,
    /// What it uses (cgroup figures are empty while it has no task).
    pub usage: resources::BotUsage,
    /// Its environment, DNS, hostname and mounts as recorded ([`spec::LABEL_SPEC`]).
    pub spec: spec::BotSpec,
}

#[derive(Debug, Default, Clone)]
struct Health {
    restart_count: u32,
    last_exit_code: Option<i32>,
    last_exit_at: Option<SystemTime>,
    last_start: Option<std::time::Instant>,
    backoff: u32,
    /// The agent itself is stopping the task (stop, delete, a version cycle): its exit is no
    /// crash and must not lengthen the next real crash's restart delay.
    stopping: bool,
    /// When a failed call last made the agent check the bot's network.
    last_net_check: Option<std::time::Instant>,
}

/// The lifecycle manager. Cheap to share behind an `Arc`.
pub struct Manager {
    cfg: Config,
    rt: Arc<dyn Runtime>,
    net: Arc<Network>,
    pool: Pool,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    routes: Mutex<HashMap<String, Route>>,
    /// Bot -> its host-side veth, as its last attach saw it (finds the bot of a deleted link).
    host_veths: Mutex<HashMap<String, String>>,
    health: Mutex<HashMap<String, Health>>,
    me: std::sync::OnceLock<std::sync::Weak<Manager>>,
    /// Bots whose automatic migration already ran in this agent's life (a failed one is only
    /// retried on demand, so a broken source cannot make the bot restart over and over).
    auto_migrated: Mutex<std::collections::HashSet<String>>,
    /// Every background task of the lifecycle (watchers, restarts, network checks,
    /// migrations): drained, with a deadline, by [`Manager::shutdown`].
    tasks: TaskTracker,
    /// Fired by [`Manager::shutdown`]: every background task ends at its next step.
    stop: CancellationToken,
    /// Bot -> the OOM kills its cgroup reported at the last look (tells a new one apart).
    oom_seen: Mutex<HashMap<String, u64>>,
    /// Bot -> its usage at the usage watcher's last pass (what `list` and `/metrics` show).
    usage: Mutex<HashMap<String, resources::BotUsage>>,
    /// Bot -> its ReverseHTTP relay ([`reverse`]).
    relays: Mutex<HashMap<String, reverse::Relay>>,
}

use crate::sync::lock;

fn status_name(s: Option<&TaskStatus>) -> &'static str {
    match s.map(|s| s.state) {
        None => "absent",
        Some(TaskState::Running) => "running",
        Some(TaskState::Stopped) => "stopped",
        Some(TaskState::Created) => "created",
        Some(TaskState::Paused) | Some(TaskState::Pausing) => "paused",
        Some(TaskState::Unknown) => "unknown",
    }
}

fn exit_code(status: u32) -> i32 {
    // runc reports 128+N for a signal; clients see -1 for signals.
    if status > 128 {
        -1
    } else {
        status as i32
    }
}

impl Manager {
    /// A manager over a runtime and the network module.
    pub fn new(cfg: Config, rt: Arc<dyn Runtime>, net: Arc<Network>) -> Self {
        Self {
            cfg,
            rt,
            net,
            pool: Pool::new(memoh_proto::limits::DEFAULT_UNARY_DEADLINE),
            locks: Mutex::default(),
            routes: Mutex::default(),
            host_veths: Mutex::default(),
            health: Mutex::default(),
            me: std::sync::OnceLock::new(),
            auto_migrated: Mutex::default(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            oom_seen: Mutex::default(),
            usage: Mutex::default(),
            relays: Mutex::default(),
        }
    }

    /// The token every background task of the agent ends on (MCP's server uses it too).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `fut` as a background task of the lifecycle: tracked, so shutdown waits for it.
    pub(super) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// The one shutdown path: fires the stop token, then waits up to `deadline` for every
    /// background task to end. Returns whether all did.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        let drained = tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok();
        if !drained {
            warn!(
                left = self.tasks.len(),
                ?deadline,
                "background tasks still running at shutdown; leaving them"
            );
        }
        drained
    }

    /// Lets the manager start background work of its own (migrations). Call once after
    /// wrapping it in an `Arc`.
    pub fn attach_self(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.rt
    }

    /// The network module.
    pub fn network(&self) -> &Arc<Network> {
        &self.net
    }

    /// Takes the bot's lifecycle lock.
    pub async fn lock_bot(&self, bot: &str) -> OwnedMutexGuard<()> {
        let m = lock(&self.locks)
            .entry(bot.to_string())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    pub(super) async fn container(&self, bot: &str) -> Result<ContainerInfo, AgentError> {
        ids::validate(bot)?;
        self.rt
            .get_container(&ids::container_id(bot))
            .await?
            .ok_or_else(|| AgentError::UnknownBot(bot.to_string()))
    }

    /// [`Manager::container`] for a caller that holds the bot's lock. A missing record is first
    /// handed to recovery: a version cycle that containerd's death cut short between deleting
    /// the record and recreating it leaves the bot without one until the next reconcile, and a
    /// call made meanwhile must find the bot, not be told it does not exist.
    pub(super) async fn container_locked(&self, bot: &str) -> Result<ContainerInfo, AgentError> {
        ids::validate(bot)?;
        if let Some(c) = self.rt.get_container(&ids::container_id(bot)).await? {
            return Ok(c);
        }
        let recovered = self.recover_locked(bot).await?;
        let c = self.container(bot).await?;
        if recovered {
            info!(bot, "recovered the bot's container record for a call");
        }
        Ok(c)
    }

    pub(super) async fn set_desired(&self, bot: &str, desired: &str) -> Result<(), AgentError> {
        let labels = HashMap::from([(LABEL_DESIRED.to_string(), desired.to_string())]);
        self.rt
            .update_container_labels(&ids::container_id(bot), &labels)
            .await
            .map(|_| ())
    }

    pub(super) fn forget_route(&self, bot: &str) {
        self.stop_relay(bot);
        lock(&self.routes).remove(bot);
        lock(&self.host_veths).remove(bot);
        self.pool.evict(bot);
    }

    /// Drops the lock of a bot that is gone (deleted, or never there), unless another
    /// operation holds or waits for it: ids that come and go must not pile up.
    pub(super) fn forget_lock(&self, bot: &str) {
        let mut locks = lock(&self.locks);
        if locks.get(bot).is_some_and(|m| Arc::strong_count(m) == 1) {
            locks.remove(bot);
        }
    }

    /// Every bot.
    pub async fn list(&self) -> Result<Vec<BotInfo>, AgentError> {
        let containers = self
            .rt
            .list_containers(&[label_filter(LABEL_BOT_ID, None)])
            .await?;
        let mut out = Vec::with_capacity(containers.len());
        for c in containers {
            let Some(bot) = c.labels.get(LABEL_BOT_ID).cloned() else {
                continue;
            };
            out.push(self.describe(&bot, &c, false).await?);
        }
        out.sort_by(|a, b| a.bot_id.cmp(&b.bot_id));
        Ok(out)
    }

    /// One bot, its disk usage measured now.
    pub async fn info(&self, bot: &str) -> Result<BotInfo, AgentError> {
        let c = self.container(bot).await?;
        self.describe(bot, &c, true).await
    }

    /// The bot of `c` as shown. Its cgroup is read now; its writable layer is measured now
    /// with `measure_disk`, else taken from the usage watcher's last pass (measuring walks
    /// the layer's files).
    pub(super) async fn describe(
        &self,
        bot: &str,
        c: &ContainerInfo,
        measure_disk: bool,
    ) -> Result<BotInfo, AgentError> {
        let st = self.rt.task_status(&c.id).await?;
        let mut usage = self.usage_of(c, measure_disk).await;
        if !measure_disk {
            usage.disk = lock(&self.usage).get(bot).and_then(|u| u.disk);
        }
        let ip = match self.net.saved(bot).await {
            Ok(Some(bn)) if st.as_ref().is_some_and(|s| s.state == TaskState::Running) => {
                Some(bn.ip)
            }
            _ => None,
        };
        let h = lock(&self.health).get(bot).cloned().unwrap_or_default();
        let (mut last_exit_code, mut last_exit_at) = (h.last_exit_code, h.last_exit_at);
        if let Some(s) = st.as_ref().filter(|s| s.state == TaskState::Stopped) {
            last_exit_code = s.exit_status.map(exit_code);
            last_exit_at = s.exited_at;
        }
        Ok(BotInfo {
            bot_id: bot.to_string(),
            container_id: c.id.clone(),
            image: c.image.clone(),
            status: match st.as_ref() {
                // No task: what the operator asked for says more than "absent".
                None if c.labels.get(LABEL_DESIRED).map(String::as_str) == Some("stopped") => {
                    "stopped".to_string()
                }
                st => status_name(st).to_string(),
            },
            ip,
            created_at: c.created_at,
            pid: st
                .as_ref()
                .filter(|s| s.state == TaskState::Running)
                .map(|s| s.pid)
                .unwrap_or(0),
            restart_count: h.restart_count,
            last_exit_code,
            last_exit_at,
            lost_state: c.labels.get(LABEL_LOST_STATE).cloned(),
            limits: self.limits_of(c),
            usage,
            // A label that cannot be read shows as the default; create and rebuilds refuse it.
            spec: spec::BotSpec::from_labels(&c.labels).unwrap_or_default(),
        })
    }
}
