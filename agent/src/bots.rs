//! The bot lifecycle: create, start, stop, delete, list, inspect, reconcile, and the watcher
//! that restarts crashed bots.
//!
//! containerd's metadata is the only record of bots: a bot is a container labelled
//! `mcp.bot_id`, its desired state is the container's `memoh.desired` label, its address is the
//! saved CNI result. In memory the agent only caches what it can rebuild from those: routes for
//! the pool, restart counters. One lock per bot serialises every lifecycle operation on it;
//! operations on different bots run in parallel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use memoh_proto::ContainerClient;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::containerd::spec::{build_spec, BindMount, SpecOptions};
use crate::containerd::{
    label_filter, ContainerInfo, NewContainer, Runtime, TaskIo, TaskState, TaskStatus,
};
use crate::error::AgentError;
use crate::ids::{
    self, LABEL_BOT_ID, LABEL_DESIRED, LABEL_IMAGE, LABEL_LOST_STATE, LABEL_SNAPSHOT_PARENT,
};

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

/// Least time between two network checks of one bot that failed calls ask for.
const NET_CHECK_GAP: Duration = Duration::from_secs(2);

/// The interface an `ip -o monitor link` line reports deleted: `Deleted 12: veth1@if3: ...`
/// gives `veth1`.
fn deleted_link(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("Deleted ")?;
    let (_, rest) = rest.split_once(": ")?;
    let name = rest.split(':').next()?.split('@').next()?;
    (!name.is_empty()).then_some(name)
}

/// Why a task that should be starting will never serve: it exited or is gone. `None` while it
/// may still come up.
fn task_gone(st: Option<&TaskStatus>) -> Option<String> {
    match st {
        None => Some("has no task (it was removed)".to_string()),
        Some(s) if s.state == TaskState::Stopped => Some(match s.exit_status {
            Some(code) => format!("exited with status {code}"),
            None => "exited".to_string(),
        }),
        Some(_) => None,
    }
}

/// Whether the agent keeps this bot's task running (not stopped by the operator, not being
/// deleted).
fn wants_running(c: &ContainerInfo) -> bool {
    c.labels.get(LABEL_DESIRED).map(String::as_str) != Some("stopped") && deleting(c).is_none()
}
use crate::network::Network;
use crate::pool::{Pool, Route};

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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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

/// A random token from the kernel's generator, hex encoded.
fn new_token() -> Result<String, AgentError> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| AgentError::io("/dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
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
        }
    }

    /// Lets the manager start background work of its own (migrations). Call once after
    /// wrapping it in an `Arc`.
    pub fn attach_self(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Starts the one-time migration of the bot's legacy data in the background, if it has
    /// any. It waits for the bot's lock, so it never blocks the start that triggered it.
    fn migrate_in_background(&self, bot: &str) {
        if !self.has_legacy_data(bot) || !lock(&self.auto_migrated).insert(bot.to_string()) {
            return;
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let bot = bot.to_string();
        tokio::spawn(async move {
            info!(bot, "legacy data found; migrating in the background");
            match me.migrate(&bot, &|_| {}).await {
                Ok(r) if r.failures.is_empty() => {
                    info!(
                        bot,
                        entries = r.entries,
                        renamed = r.renamed,
                        "background migration done"
                    )
                }
                Ok(r) => warn!(bot, failures = ?r.failures, "background migration incomplete"),
                Err(e) => warn!(bot, error = %e, "background migration failed"),
            }
        });
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

    pub(crate) async fn container(&self, bot: &str) -> Result<ContainerInfo, AgentError> {
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
    pub(crate) async fn container_locked(&self, bot: &str) -> Result<ContainerInfo, AgentError> {
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

    pub(crate) async fn set_desired(&self, bot: &str, desired: &str) -> Result<(), AgentError> {
        let labels = HashMap::from([(LABEL_DESIRED.to_string(), desired.to_string())]);
        self.rt
            .update_container_labels(&ids::container_id(bot), &labels)
            .await
            .map(|_| ())
    }

    pub(crate) fn forget_route(&self, bot: &str) {
        lock(&self.routes).remove(bot);
        lock(&self.host_veths).remove(bot);
        self.pool.evict(bot);
    }

    /// Creates the bot's container from `image` (the configured default when `None`) and starts
    /// it; returns once its server answers. A leftover container or snapshot of the bot is
    /// reused, never discarded: a stopped one is started, a running one is an error.
    pub async fn create(&self, bot: &str, image: Option<&str>) -> Result<BotInfo, AgentError> {
        ids::validate(bot)?;
        let _g = self.lock_bot(bot).await;
        let cid = ids::container_id(bot);
        let mut existing = match self.container_locked(bot).await {
            Ok(c) => Some(c),
            Err(AgentError::UnknownBot(_)) => None,
            Err(e) => return Err(e),
        };
        if let Some(keep_versions) = existing.as_ref().and_then(deleting) {
            // The operator asked for this bot to go: finish that before creating it anew.
            let c = existing.take().expect("checked above");
            info!(bot, "finishing an interrupted delete before create");
            self.delete_locked(bot, &c, keep_versions).await?;
        }
        if let Some(c) = existing {
            let st = self.rt.task_status(&cid).await?;
            if st.as_ref().is_some_and(|s| s.state == TaskState::Running) {
                return Err(AgentError::BotExists(bot.to_string()));
            }
            info!(bot, "container exists without a running task; starting it");
            self.set_desired(bot, "running").await?;
            self.start_locked(bot, &c).await?;
            return self.info(bot).await;
        }
        let image = image
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.cfg.image)
            .to_string();
        let resolved = self.rt.ensure_unpacked(&image).await?;
        // The bot label finds the snapshot again after a crash; gc.root keeps containerd's
        // collector off it while no container references it (mid-create or mid-cycle).
        let bot_labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_IMAGE.to_string(), resolved.name.clone()),
            (
                crate::containerd::LABEL_GC_ROOT.to_string(),
                chrono::Utc::now().to_rfc3339(),
            ),
        ]);
        // An existing active snapshot holds the bot's data from an earlier container: keep it.
        let snapshot_key = cid.clone();
        let (parent, prepared) = match self.rt.stat_snapshot(&snapshot_key).await? {
            None => {
                self.rt
                    .prepare_snapshot(&snapshot_key, Some(&resolved.chain_id), &bot_labels)
                    .await?;
                (Some(resolved.chain_id.clone()), true)
            }
            Some(s) => {
                info!(bot, "reusing the bot's existing snapshot");
                (s.parent, false)
            }
        };
        crate::versions::fault("create");
        let c = match self
            .create_container_record(
                bot,
                &resolved.name,
                &resolved.config,
                &snapshot_key,
                parent.as_deref(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.undo_create(bot, prepared.then_some(snapshot_key.as_str()))
                    .await;
                return Err(e);
            }
        };
        if let Err(e) = self.start_locked(bot, &c).await {
            warn!(bot, error = %e, "start after create failed; the container is kept");
            return Err(e);
        }
        self.migrate_in_background(bot);
        self.info(bot).await
    }

    /// A create that failed before its container record: the bot does not exist, so what the
    /// create made goes too (`snapshot`, when it prepared it, and the bot's state directory).
    /// Only when containerd confirms there is no record: the call that failed may have made it
    /// (then the bot exists and reconcile starts it). When containerd cannot answer, the next
    /// recovery pass does this ([`Manager::recover`]).
    async fn undo_create(&self, bot: &str, snapshot: Option<&str>) {
        match self.rt.get_container(&ids::container_id(bot)).await {
            Ok(None) => {}
            Ok(Some(_)) => return,
            Err(e) => {
                warn!(bot, error = %e, "cannot undo the failed create now; recovery will");
                return;
            }
        }
        if let Some(key) = snapshot {
            if let Err(e) = self.rt.remove_snapshot(key).await {
                warn!(bot, error = %e, "cannot remove the failed create's snapshot now; recovery will");
                return;
            }
        }
        if let Err(e) = self.remove_bot_dir(bot).await {
            warn!(bot, error = %e, "cannot remove the failed create's state");
        }
    }

    /// Removes the agent's state directory of `bot` (its token); a missing one is fine.
    pub(crate) async fn remove_bot_dir(&self, bot: &str) -> Result<(), AgentError> {
        let dir = ids::bot_dir(&self.cfg.state_dir, bot);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::io(&dir, e)),
        }
    }

    /// Writes a fresh token and creates the container record (spec, labels) on `snapshot_key`,
    /// whose parent is `parent`.
    pub(crate) async fn create_container_record(
        &self,
        bot: &str,
        image: &str,
        image_config: &crate::containerd::ImageConfig,
        snapshot_key: &str,
        parent: Option<&str>,
    ) -> Result<ContainerInfo, AgentError> {
        let cid = ids::container_id(bot);
        let dir = ids::bot_dir(&self.cfg.state_dir, bot);
        let token = new_token()?;
        let token_path = ids::token_path(&self.cfg.state_dir, bot);
        {
            let (d, p, t) = (dir.clone(), token_path.clone(), token.clone());
            tokio::task::spawn_blocking(move || write_private(&d, &p, &t))
                .await
                .map_err(|e| AgentError::io(&dir, std::io::Error::other(e)))??;
        }
        let netns = self.net.netns_path(bot);
        let mut opts = SpecOptions::new(&cid, bot).with_host_files();
        opts.netns_path = Some(netns);
        // runc cannot raise a limit above the hard limit it inherits from containerd.
        opts.nofile = opts.nofile.min(host_nofile_limit());
        opts.extra_env
            .push(("MCP_AUTH_TOKEN_FILE".into(), TOKEN_MOUNT.into()));
        opts.extra_mounts.push(BindMount {
            source: token_path,
            destination: PathBuf::from(TOKEN_MOUNT),
            readonly: true,
        });
        let spec = build_spec(image_config, &opts)?;
        let mut labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_DESIRED.to_string(), "running".to_string()),
            (LABEL_IMAGE.to_string(), image.to_string()),
        ]);
        if let Some(p) = parent {
            labels.insert(LABEL_SNAPSHOT_PARENT.to_string(), p.to_string());
        }
        self.rt
            .create_container(&NewContainer {
                id: cid,
                image: image.to_string(),
                snapshot_key: snapshot_key.to_string(),
                labels,
                spec,
            })
            .await
    }

    /// Starts a stopped bot (no-op for a running one, which gets its network checked).
    pub async fn start(&self, bot: &str) -> Result<BotInfo, AgentError> {
        let _g = self.lock_bot(bot).await;
        let c = self.container_locked(bot).await?;
        self.set_desired(bot, "running").await?;
        self.start_locked(bot, &c).await?;
        self.migrate_in_background(bot);
        self.info(bot).await
    }

    /// Starts the task of `c` (deleting a stopped task entry first), attaches the network,
    /// and waits until the server answers. The caller holds the bot's lock.
    pub(crate) async fn start_locked(
        &self,
        bot: &str,
        c: &ContainerInfo,
    ) -> Result<(), AgentError> {
        let cid = &c.id;
        match self.rt.task_status(cid).await? {
            Some(s) if s.state == TaskState::Running => {
                let ip = self.attach(bot, c).await?;
                debug!(bot, %ip, "already running");
                return self.wait_ready(bot).await;
            }
            Some(_) => {
                self.rt.delete_task(cid).await?;
            }
            None => {}
        }
        let mounts = self.rt.snapshot_mounts(&c.snapshot_key).await?;
        self.net.create_netns(bot).await?;
        let log = ids::log_path(&self.cfg.state_dir, bot);
        if let Some(parent) = log.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| AgentError::io(parent, e))?;
        }
        self.rt
            .create_task(cid, &mounts, &TaskIo::log_file(&log))
            .await?;
        if let Err(e) = self.rt.start_task(cid).await {
            let _ = self.rt.delete_task(cid).await;
            return Err(e);
        }
        lock(&self.health)
            .entry(bot.to_string())
            .or_default()
            .last_start = Some(std::time::Instant::now());
        // A new task is a new server: drop any channel to the old one.
        self.pool.evict(bot);
        if let Err(e) = self.attach(bot, c).await {
            warn!(bot, error = %e, "network setup failed; stopping the task");
            let _ = self.kill_and_delete_task(cid, Duration::from_secs(5)).await;
            return Err(e);
        }
        self.wait_ready(bot).await
    }

    /// Attaches the bot (keeping a healthy address), makes sure the host rules exist, and
    /// records its route.
    async fn attach(&self, bot: &str, c: &ContainerInfo) -> Result<IpAddr, AgentError> {
        let bn = self.attach_without_host_rules(bot, c).await?;
        self.net.ensure_host_rules(&bn).await?;
        Ok(bn.ip)
    }

    /// [`Manager::attach`] without the host rules (the caller ensures them, once per network).
    async fn attach_without_host_rules(
        &self,
        bot: &str,
        c: &ContainerInfo,
    ) -> Result<crate::network::BotNetwork, AgentError> {
        let netns = self.net.netns_path(bot);
        let bn = self.net.setup_without_host_rules(bot, &netns).await?;
        let token = tokio::fs::read_to_string(ids::token_path(&self.cfg.state_dir, bot))
            .await
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let generation = format!(
            "{}:{}",
            c.snapshot_key,
            c.created_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let route = Route {
            ip: bn.ip,
            token,
            generation,
        };
        {
            let mut routes = lock(&self.routes);
            if routes.get(bot) != Some(&route) {
                self.pool.evict(bot);
                routes.insert(bot.to_string(), route);
            }
        }
        let mut veths = lock(&self.host_veths);
        match &bn.host_veth {
            Some(v) => {
                veths.insert(bot.to_string(), v.clone());
            }
            None => {
                veths.remove(bot);
            }
        }
        Ok(bn)
    }

    /// Polls the bot's server until it answers or [`READY_TIMEOUT`] passes.
    async fn wait_ready(&self, bot: &str) -> Result<(), AgentError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut delay = Duration::from_millis(5);
        loop {
            let last = match self.cached_client(bot) {
                Some(c) => match c.ping().await {
                    Ok(()) => return Ok(()),
                    Err(s) => s.message().to_string(),
                },
                None => "no route".into(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(AgentError::BotUnavailable {
                    bot: bot.to_string(),
                    reason: format!("server did not answer within {READY_TIMEOUT:?}: {last}"),
                });
            }
            // A server whose task already ended will never answer: say so now instead of
            // holding the bot's lock for the whole timeout. Checked once the quick polls are
            // over (a starting server usually answers within a few of them).
            if delay >= Duration::from_millis(100) {
                let cid = ids::container_id(bot);
                if let Ok(st) = self.rt.task_status(&cid).await {
                    if let Some(why) = task_gone(st.as_ref()) {
                        return Err(AgentError::BotUnavailable {
                            bot: bot.to_string(),
                            reason: format!("server {why} before answering: {last}"),
                        });
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    fn cached_client(&self, bot: &str) -> Option<ContainerClient> {
        let route = lock(&self.routes).get(bot).cloned()?;
        let c = self.pool.client(bot, &route).ok()?;
        Some(c.unary_deadline(Duration::from_secs(2)))
    }

    /// The client of a bot's server: NOT_FOUND for an unknown bot, UNAVAILABLE (with the
    /// reason) for one that is down.
    pub async fn client(&self, bot: &str) -> Result<ContainerClient, AgentError> {
        ids::validate(bot)?;
        let route = lock(&self.routes).get(bot).cloned();
        if let Some(route) = route {
            return self.pool.client(bot, &route);
        }
        // Not cached: explain why, or repair it.
        let c = match self.rt.get_container(&ids::container_id(bot)).await? {
            Some(c) => c,
            None => {
                // No record: recovery may bring the bot back (see `container_locked`); then it
                // is started as the next reconcile would.
                let g = self.lock_bot(bot).await;
                let c = match self.container_locked(bot).await {
                    Ok(c) => c,
                    Err(e) => {
                        drop(g);
                        self.forget_lock(bot);
                        return Err(e);
                    }
                };
                if wants_running(&c) {
                    self.start_locked(bot, &c).await?;
                }
                c
            }
        };
        let st = self.rt.task_status(&c.id).await?;
        let reason = match st.as_ref().map(|s| s.state) {
            Some(TaskState::Running) => {
                // Running but unknown to us (e.g. mid-reconcile): attach and answer.
                let _g = self.lock_bot(bot).await;
                self.attach(bot, &c).await?;
                let route = lock(&self.routes).get(bot).cloned();
                if let Some(route) = route {
                    return self.pool.client(bot, &route);
                }
                "no address".to_string()
            }
            _ => format!("task is {}", status_name(st.as_ref())),
        };
        Err(AgentError::BotUnavailable {
            bot: bot.to_string(),
            reason,
        })
    }

    /// Reports a failed call on `bot`'s channel: transport failures evict it so the next call
    /// dials afresh, and so does a deadline, which bounds a channel stuck connecting (calls
    /// in flight keep their own handle on the old connection).
    pub fn report_failure(&self, bot: &str, status: &tonic::Status) {
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        ) {
            if let Some(route) = lock(&self.routes).get(bot).cloned() {
                self.pool.evict_if(bot, &route);
            }
            self.check_network_soon(bot, false);
        }
    }

    /// A call to `bot` failed at the transport level: its network is checked (and attached
    /// again if broken, the host rules restored) now, not at the next periodic reconcile, so a
    /// deleted veth or a flushed nat table costs a bot about a second instead of up to 15.
    /// At most one check per bot every [`NET_CHECK_GAP`], unless `now` (a link really went).
    fn check_network_soon(&self, bot: &str, now: bool) {
        {
            let mut health = lock(&self.health);
            let h = health.entry(bot.to_string()).or_default();
            if !now
                && h.last_net_check
                    .is_some_and(|t| t.elapsed() < NET_CHECK_GAP)
            {
                return;
            }
            h.last_net_check = Some(std::time::Instant::now());
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let bot = bot.to_string();
        tokio::spawn(async move {
            if now {
                // The kernel reports the host end before the bot's end is gone: give it a
                // moment, or the check can still find the bot's interface up.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _g = me.lock_bot(&bot).await;
            let Ok(Some(c)) = me.rt.get_container(&ids::container_id(&bot)).await else {
                return;
            };
            let running = me
                .rt
                .task_status(&c.id)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.state == TaskState::Running);
            // A stopped task is the exit watcher's to restart.
            if wants_running(&c) && running {
                if let Err(e) = me.attach(&bot, &c).await {
                    warn!(bot, error = %e, "network check after a failed call failed");
                }
            }
        });
    }

    pub(crate) async fn kill_and_delete_task(
        &self,
        cid: &str,
        grace: Duration,
    ) -> Result<(), AgentError> {
        let Some(st) = self.rt.task_status(cid).await? else {
            return Ok(());
        };
        if st.state == TaskState::Running || st.state == TaskState::Created {
            if let Some(bot) = ids::bot_of_container(cid) {
                lock(&self.health)
                    .entry(bot.to_string())
                    .or_default()
                    .stopping = true;
            }
            if !grace.is_zero() {
                self.rt.kill_task(cid, libc::SIGTERM, false).await.ok();
                if self.rt.wait_task(cid, grace).await.is_ok() {
                    self.rt.delete_task(cid).await?;
                    return Ok(());
                }
            }
            self.rt.kill_task(cid, libc::SIGKILL, true).await.ok();
            if let Err(e) = self.rt.wait_task(cid, Duration::from_secs(10)).await {
                warn!(container = cid, error = %e, "task did not exit after SIGKILL");
            }
        }
        self.rt.delete_task(cid).await?;
        Ok(())
    }

    /// Stops the bot: SIGTERM, bounded wait, SIGKILL, bounded wait; removes the task entry and
    /// detaches the network. The bot stays stopped across agent restarts.
    pub async fn stop(&self, bot: &str) -> Result<BotInfo, AgentError> {
        let _g = self.lock_bot(bot).await;
        let c = self.container_locked(bot).await?;
        self.set_desired(bot, "stopped").await?;
        self.forget_route(bot);
        self.kill_and_delete_task(&c.id, STOP_GRACE).await?;
        self.net.teardown(bot).await?;
        self.info(bot).await
    }

    /// Deletes the bot: task entries first, then the network, the container, its snapshots
    /// and the agent's state of it.
    pub async fn delete(&self, bot: &str, keep_versions: bool) -> Result<(), AgentError> {
        let r = async {
            let _g = self.lock_bot(bot).await;
            let c = self.container_locked(bot).await?;
            // The intent goes on the record first: an agent that dies mid-delete finishes it
            // on its next reconcile instead of resurrecting the bot from a leftover snapshot.
            let intent = if keep_versions {
                DESIRED_DELETED_KEEP_VERSIONS
            } else {
                DESIRED_DELETED
            };
            self.set_desired(bot, intent).await?;
            self.delete_locked(bot, &c, keep_versions).await
        }
        .await;
        self.forget_lock(bot);
        r
    }

    /// Drops the lock of a bot that is gone (deleted, or never there), unless another
    /// operation holds or waits for it: ids that come and go must not pile up.
    fn forget_lock(&self, bot: &str) {
        let mut locks = lock(&self.locks);
        if locks.get(bot).is_some_and(|m| Arc::strong_count(m) == 1) {
            locks.remove(bot);
        }
    }

    /// The delete itself; the caller holds the bot's lock and has marked the record. The
    /// container record goes last, so every earlier step is retried after a crash.
    async fn delete_locked(
        &self,
        bot: &str,
        c: &ContainerInfo,
        keep_versions: bool,
    ) -> Result<(), AgentError> {
        self.forget_route(bot);
        self.kill_and_delete_task(&c.id, Duration::ZERO).await?;
        self.net.teardown(bot).await?;
        self.remove_snapshots(bot, &c.snapshot_key, keep_versions)
            .await?;
        // The agent's state of the bot goes before the record too: killed after the record
        // went, nothing would find the directory again (the soak caught that).
        self.remove_bot_dir(bot).await?;
        self.rt.delete_container(&c.id).await?;
        lock(&self.health).remove(bot);
        info!(bot, "deleted");
        Ok(())
    }

    /// Removes the bot's active snapshot and (unless `keep_versions`) every snapshot labelled
    /// with the bot, children before parents.
    async fn remove_snapshots(
        &self,
        bot: &str,
        active: &str,
        keep_versions: bool,
    ) -> Result<(), AgentError> {
        self.rt.remove_snapshot(active).await?;
        if keep_versions {
            return Ok(());
        }
        let mut left = self
            .rt
            .list_snapshots(&[label_filter(LABEL_BOT_ID, Some(bot))])
            .await?;
        // Remove leaves first; each pass removes every snapshot nothing else depends on.
        while !left.is_empty() {
            let parents: std::collections::HashSet<String> =
                left.iter().filter_map(|s| s.parent.clone()).collect();
            let (leaves, rest): (Vec<_>, Vec<_>) =
                left.into_iter().partition(|s| !parents.contains(&s.name));
            if leaves.is_empty() {
                warn!(bot, "snapshot cycle; leaving {} snapshots", rest.len());
                break;
            }
            for s in leaves {
                self.rt.remove_snapshot(&s.name).await?;
            }
            left = rest;
        }
        Ok(())
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
            out.push(self.describe(&bot, &c).await?);
        }
        out.sort_by(|a, b| a.bot_id.cmp(&b.bot_id));
        Ok(out)
    }

    /// One bot.
    pub async fn info(&self, bot: &str) -> Result<BotInfo, AgentError> {
        let c = self.container(bot).await?;
        self.describe(bot, &c).await
    }

    async fn describe(&self, bot: &str, c: &ContainerInfo) -> Result<BotInfo, AgentError> {
        let st = self.rt.task_status(&c.id).await?;
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
            status: status_name(st.as_ref()).to_string(),
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
        })
    }

    /// Brings every bot whose desired state is `running` back: a missing or stopped task is
    /// started again and re-networked; a running one keeps its address. Returns how many bots
    /// were started.
    pub async fn reconcile(&self) -> Result<usize, AgentError> {
        // Finish any version cycle an earlier agent died in, before starting anything.
        match self.recover().await {
            Ok(r) if !r.is_empty() => info!(bots = ?r, "recovered bots from an interrupted cycle"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "recovery of interrupted cycles failed"),
        }
        let containers = self
            .rt
            .list_containers(&[label_filter(LABEL_BOT_ID, None)])
            .await?;
        let mut started = 0;
        // Running bots' host rules are per network, not per bot: checked once per pass, after
        // the loop (100 bots would otherwise cost 400 `iptables` runs every pass).
        let mut networks: Vec<crate::network::BotNetwork> = Vec::new();
        for c in containers {
            let Some(bot) = c.labels.get(LABEL_BOT_ID).cloned() else {
                continue;
            };
            if c.labels.get(LABEL_DESIRED).map(String::as_str) == Some("stopped") {
                continue;
            }
            let _g = self.lock_bot(&bot).await;
            // Re-read under the lock: another operation may have changed it.
            let Some(c) = self.rt.get_container(&c.id).await? else {
                continue;
            };
            if let Some(keep_versions) = deleting(&c) {
                info!(bot, "reconcile: finishing an interrupted delete");
                if let Err(e) = self.delete_locked(&bot, &c, keep_versions).await {
                    warn!(bot, error = %e, "finishing the delete failed");
                }
                continue;
            }
            if !wants_running(&c) {
                continue;
            }
            let running = self
                .rt
                .task_status(&c.id)
                .await?
                .is_some_and(|s| s.state == TaskState::Running);
            let r = if running {
                self.attach_without_host_rules(&bot, &c).await.map(|bn| {
                    if !networks
                        .iter()
                        .any(|n| n.subnet() == bn.subnet() && n.bridge == bn.bridge)
                    {
                        networks.push(bn);
                    }
                })
            } else {
                started += 1;
                info!(bot, "reconcile: starting");
                self.start_locked(&bot, &c).await
            };
            match r {
                Ok(()) => self.migrate_in_background(&bot),
                Err(e) => warn!(bot, error = %e, "reconcile failed for bot"),
            }
        }
        for bn in &networks {
            if let Err(e) = self.net.ensure_host_rules(bn).await {
                warn!(subnet = %bn.subnet(), error = %e, "reconcile: host rules failed");
            }
        }
        Ok(started)
    }

    /// Watches task exits and restarts bots that should be running, with backoff; re-runs
    /// [`Manager::reconcile`] periodically and after containerd comes back. Ends on `stop`.
    pub fn spawn_watchers(self: &Arc<Self>, stop: CancellationToken) {
        let me = self.clone();
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let events = tokio::select! {
                    _ = s.cancelled() => return,
                    r = me.rt.subscribe_task_exits() => r,
                };
                match events {
                    Ok(mut events) => loop {
                        let ev = tokio::select! {
                            _ = s.cancelled() => return,
                            ev = events.next() => ev,
                        };
                        match ev {
                            Some(Ok(exit)) => me.on_exit(exit),
                            Some(Err(e)) => {
                                warn!(error = %e, "task event stream failed");
                                break;
                            }
                            None => break,
                        }
                    },
                    Err(e) => debug!(error = %e, "cannot subscribe to task events yet"),
                }
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // containerd may have restarted: make sure every bot is up.
                if let Err(e) = me.reconcile().await {
                    debug!(error = %e, "reconcile after event stream loss failed");
                }
            }
        });
        let me = self.clone();
        let s = stop.clone();
        tokio::spawn(async move { me.watch_links(s).await });
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = me.reconcile().await {
                    debug!(error = %e, "periodic reconcile failed");
                }
            }
        });
    }

    /// Follows link deletions (`ip -o monitor link`, in the agent's network namespace): when
    /// the host end of a running bot's veth goes, that bot is attached again at once instead
    /// of at the next periodic reconcile (its calls would hang on the dead link until then).
    /// Without `ip` the periodic reconcile still repairs it.
    async fn watch_links(self: Arc<Self>, stop: CancellationToken) {
        use tokio::io::AsyncBufReadExt;
        loop {
            let child = tokio::process::Command::new("ip")
                .args(["-o", "monitor", "link"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "cannot follow link deletions (ip monitor); relying on the periodic reconcile");
                    return;
                }
            };
            let Some(out) = child.stdout.take() else {
                return;
            };
            let mut lines = tokio::io::BufReader::new(out).lines();
            // A bridge port's deletion is reported twice in a row.
            let mut last: Option<String> = None;
            loop {
                let line = tokio::select! {
                    _ = stop.cancelled() => return,
                    l = lines.next_line() => l,
                };
                match line {
                    Ok(Some(l)) => match deleted_link(&l) {
                        Some(link) if last.as_deref() != Some(link) => {
                            last = Some(link.to_string());
                            self.on_link_deleted(link);
                        }
                        _ => {}
                    },
                    _ => break,
                }
            }
            debug!("ip monitor ended; starting it again");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// `link` was deleted: the running bot whose host veth it was gets its network checked.
    fn on_link_deleted(&self, link: &str) {
        let bot = lock(&self.host_veths)
            .iter()
            .find(|(_, veth)| *veth == link)
            .map(|(bot, _)| bot.clone());
        if let Some(bot) = bot {
            info!(bot, link, "the bot's veth was deleted; attaching it again");
            self.check_network_soon(&bot, true);
        }
    }

    fn on_exit(self: &Arc<Self>, exit: crate::containerd::TaskExit) {
        let Some(bot) = ids::bot_of_container(&exit.container_id).map(str::to_string) else {
            return;
        };
        let delay = {
            let mut h = lock(&self.health);
            let h = h.entry(bot.clone()).or_default();
            h.last_exit_code = Some(exit_code(exit.exit_status));
            h.last_exit_at = exit.exited_at.or(Some(SystemTime::now()));
            // A bot that ran for a minute starts its backoff over.
            if h.last_start
                .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
            {
                h.backoff = 0;
            }
            let d = Duration::from_millis(250) * 2u32.saturating_pow(h.backoff.min(7));
            if std::mem::take(&mut h.stopping) {
                // The agent stopped it on purpose; whoever did restarts it if it should run.
            } else {
                h.backoff += 1;
            }
            d.min(Duration::from_secs(30))
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _g = me.lock_bot(&bot).await;
            let Ok(Some(c)) = me.rt.get_container(&ids::container_id(&bot)).await else {
                return;
            };
            if !wants_running(&c) {
                return;
            }
            if let Ok(Some(st)) = me.rt.task_status(&c.id).await {
                if st.state == TaskState::Running {
                    return;
                }
            }
            me.forget_route(&bot);
            info!(bot, ?delay, "bot's server exited; restarting");
            match me.start_locked(&bot, &c).await {
                Ok(()) => {
                    crate::metrics::global().restart();
                    lock(&me.health)
                        .entry(bot.clone())
                        .or_default()
                        .restart_count += 1;
                }
                Err(e) => warn!(bot, error = %e, "restart failed; will retry"),
            }
        });
    }
}

/// The hard `RLIMIT_NOFILE` of this process (containerd normally runs with the same or more).
fn host_nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024)
}

/// Writes `content` to `path` (mode 0600) inside `dir` (created 0700).
fn write_private(
    dir: &std::path::Path,
    path: &std::path::Path,
    content: &str,
) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| AgentError::io(dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| AgentError::io(&tmp, e))?;
    f.write_all(content.as_bytes())
        .map_err(|e| AgentError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| AgentError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: TaskState, exit_status: Option<u32>) -> TaskStatus {
        TaskStatus {
            state,
            pid: 0,
            exit_status,
            exited_at: None,
        }
    }

    #[test]
    fn deleted_links_are_read_from_ip_monitor_lines() {
        let del = "Deleted 1304: veth5c1e2f3a@if2: <BROADCAST,MULTICAST> mtu 1500 qdisc noop \
                   master cni0 state DOWN group default \\    link/ether 8a:51:63:e6:3e:6f";
        assert_eq!(deleted_link(del), Some("veth5c1e2f3a"));
        assert_eq!(
            deleted_link("Deleted 7: tap0: <BROADCAST> mtu 1500"),
            Some("tap0")
        );
        let add = "1304: veth5c1e2f3a@if2: <BROADCAST,MULTICAST> mtu 1500 master cni0";
        assert_eq!(deleted_link(add), None);
        assert_eq!(deleted_link("Deleted "), None);
        assert_eq!(deleted_link("Deleted 3: : <>"), None);
    }

    #[test]
    fn only_an_ended_or_missing_task_is_given_up_on() {
        assert_eq!(
            task_gone(None).as_deref(),
            Some("has no task (it was removed)")
        );
        assert_eq!(
            task_gone(Some(&status(TaskState::Stopped, Some(127)))).as_deref(),
            Some("exited with status 127")
        );
        assert_eq!(
            task_gone(Some(&status(TaskState::Stopped, None))).as_deref(),
            Some("exited")
        );
        for state in [TaskState::Running, TaskState::Created, TaskState::Paused] {
            assert_eq!(task_gone(Some(&status(state, None))), None, "{state:?}");
        }
    }
}
