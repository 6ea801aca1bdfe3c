//! What a bot may use and what it uses: its limits (recorded in labels, put on its spec before
//! every start, changed on a live bot by `update`), pause and resume, and its usage read from
//! its cgroup and its writable layer.

use std::time::Duration;

use tracing::{info, warn};

use super::limits::{Limits, LimitsChange};
use super::{lock, Manager};
use crate::cgroup::{Cgroups, Usage};
use crate::containerd::spec::apply_resources;
use crate::containerd::{label_filter, ContainerInfo, TaskState};
use crate::error::AgentError;
use crate::ids::{LABEL_BOT_ID, LABEL_DESIRED};
use crate::metrics::BotSample;

/// How often the usage watcher reads every bot's cgroup (OOM kills are noticed this soon).
pub const USAGE_INTERVAL: Duration = Duration::from_secs(10);
/// Every how many passes it also measures the writable layers (each walks a layer's files).
pub const DISK_EVERY_PASSES: u32 = 6;

/// `memoh.desired` of a paused bot: the agent neither restarts nor starts it until `resume`.
pub(super) const DESIRED_PAUSED: &str = "paused";

/// A bot's usage: its cgroup's figures and its writable layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BotUsage {
    /// What the cgroup reports (all `None` when the bot has no task).
    pub cgroup: Usage,
    /// Bytes written in the bot's writable layer, as containerd's snapshot usage counts them.
    pub disk: Option<u64>,
}

impl Manager {
    /// The limits of the bot of `c`: those recorded on it, else the configured defaults (a
    /// container from before limits were recorded).
    pub fn limits_of(&self, c: &ContainerInfo) -> Limits {
        let defaults = self.cfg.bot_defaults.limits();
        Limits::from_labels(&c.labels, &defaults).unwrap_or(defaults)
    }

    /// Puts the limits of the bot of `c` on `spec` (its container's, about to start), with the
    /// server's OOM score adjustment, and records them in the labels of a container that has
    /// none. Returns whether `spec` changed. The caller holds the bot's lock.
    pub(super) async fn apply_limits(
        &self,
        bot: &str,
        c: &ContainerInfo,
        spec: &mut oci_spec::runtime::Spec,
    ) -> Result<bool, AgentError> {
        let limits = self.limits_of(c);
        if Limits::from_labels(&c.labels, &limits).is_none() {
            self.rt
                .update_container_labels(&c.id, &limits.labels())
                .await?;
            info!(bot, %limits, "the bot had no recorded limits; the defaults are now its own");
        }
        // The task about to start gets a new cgroup, which counts its OOM kills from zero: a
        // kill before the usage watcher's first look at it is still a new one.
        lock(&self.oom_seen).insert(bot.to_string(), 0);
        apply_resources(spec, &limits.resources()?)
    }

    /// Changes the bot's limits. A running or paused bot gets them at once, without a restart;
    /// all of them hold from its next start on too (labels and spec).
    pub async fn update(
        &self,
        bot: &str,
        change: &LimitsChange,
    ) -> Result<super::BotInfo, AgentError> {
        let _g = self.lock_bot(bot).await;
        let c = self.container_locked(bot).await?;
        let limits = self.limits_of(&c).with(change).check()?;
        let resources = limits.resources()?;
        if let Some(st) = self.rt.task_status(&c.id).await? {
            if matches!(
                st.state,
                TaskState::Running | TaskState::Paused | TaskState::Pausing | TaskState::Created
            ) {
                // The live cgroup first: a limit the kernel refuses (memory below what the bot
                // uses now, say) changes nothing.
                self.rt.update_task_resources(&c.id, &resources).await?;
            }
        }
        self.rt
            .update_container_labels(&c.id, &limits.labels())
            .await?;
        if let Some(mut spec) = c.spec.clone() {
            if apply_resources(&mut spec, &resources)? {
                self.rt.update_container_spec(&c.id, &spec).await?;
            }
        }
        info!(bot, %limits, "limits updated");
        self.info(bot).await
    }

    /// Freezes every process of a running bot. Calls routed to it get UNAVAILABLE "bot is
    /// paused" until [`Manager::resume`]; the agent does not restart it meanwhile.
    pub async fn pause(&self, bot: &str) -> Result<super::BotInfo, AgentError> {
        let _g = self.lock_bot(bot).await;
        let c = self.container_locked(bot).await?;
        match self.rt.task_status(&c.id).await?.map(|s| s.state) {
            Some(TaskState::Running) => {}
            Some(TaskState::Paused | TaskState::Pausing) => return self.info(bot).await,
            _ => {
                return Err(AgentError::FailedPrecondition(format!(
                    "bot {bot:?} is not running"
                )))
            }
        }
        self.forget_route(bot);
        self.rt.pause_task(&c.id).await?;
        if let Err(e) = self.set_desired(bot, DESIRED_PAUSED).await {
            let _ = self.rt.resume_task(&c.id).await;
            return Err(e);
        }
        info!(bot, "paused");
        self.info(bot).await
    }

    /// Thaws a paused bot (a bot whose task ended while paused is started).
    pub async fn resume(&self, bot: &str) -> Result<super::BotInfo, AgentError> {
        let _g = self.lock_bot(bot).await;
        let c = self.container_locked(bot).await?;
        let paused = c.labels.get(LABEL_DESIRED).map(String::as_str) == Some(DESIRED_PAUSED);
        let st = self.rt.task_status(&c.id).await?.map(|s| s.state);
        if !paused && !matches!(st, Some(TaskState::Paused | TaskState::Pausing)) {
            return Err(AgentError::FailedPrecondition(format!(
                "bot {bot:?} is not paused"
            )));
        }
        if matches!(st, Some(TaskState::Paused | TaskState::Pausing)) {
            self.rt.resume_task(&c.id).await?;
        }
        self.set_desired(bot, "running").await?;
        self.start_locked(bot, &c).await?;
        info!(bot, "resumed");
        self.info(bot).await
    }

    /// What the bot of `c` uses now; its writable layer only with `measure_disk` (measuring
    /// walks the layer's files).
    pub async fn usage_of(&self, c: &ContainerInfo, measure_disk: bool) -> BotUsage {
        let cgroup = c
            .spec
            .as_ref()
            .and_then(|s| s.linux().as_ref())
            .and_then(|l| l.cgroups_path().clone());
        let cgroup = match cgroup {
            Some(path) => {
                let path = path.to_string_lossy().into_owned();
                tokio::task::spawn_blocking(move || Cgroups::default().usage(&path).ok())
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            }
            None => Usage::default(),
        };
        let disk = if measure_disk {
            self.rt
                .snapshot_usage(&c.snapshot_key)
                .await
                .ok()
                .flatten()
                .map(|u| u.size)
        } else {
            None
        };
        BotUsage { cgroup, disk }
    }

    /// The OOM kills last seen per bot, for telling a new one (see the usage watcher).
    pub(super) fn note_oom_kills(&self, bot: &str, now: u64) -> Option<u64> {
        let mut seen = lock(&self.oom_seen);
        let before = seen.insert(bot.to_string(), now);
        before.filter(|b| now > *b).map(|b| now - b)
    }

    /// One pass of the usage watcher: reads every bot's usage (its disk too with
    /// `measure_disk`) for `list` and `/metrics`, and logs and counts the OOM kills that
    /// happened since the last pass.
    pub(super) async fn usage_pass(&self, measure_disk: bool) -> Result<(), AgentError> {
        let containers = self
            .rt
            .list_containers(&[label_filter(LABEL_BOT_ID, None)])
            .await?;
        let mut bots = std::collections::HashSet::new();
        for c in containers {
            let Some(bot) = c.labels.get(LABEL_BOT_ID).cloned() else {
                continue;
            };
            let mut u = self.usage_of(&c, measure_disk).await;
            if !measure_disk {
                u.disk = lock(&self.usage).get(&bot).and_then(|u| u.disk);
            }
            if let Some(n) = u
                .cgroup
                .oom_kills
                .and_then(|k| self.note_oom_kills(&bot, k))
            {
                warn!(
                    bot,
                    kills = n,
                    memory_limit = ?self.limits_of(&c).memory,
                    "out of memory: the kernel killed a process of the bot at its memory limit"
                );
                crate::metrics::global().oom_kills(n);
            }
            lock(&self.usage).insert(bot.clone(), u);
            bots.insert(bot);
        }
        lock(&self.usage).retain(|b, _| bots.contains(b));
        lock(&self.oom_seen).retain(|b, _| bots.contains(b));
        Ok(())
    }
}

/// A bot as `/metrics` shows it.
pub fn sample(b: &super::BotInfo) -> BotSample {
    let u = &b.usage;
    BotSample {
        bot: b.bot_id.clone(),
        state: b.status.clone(),
        memory_bytes: u.cgroup.memory,
        memory_limit_bytes: b.limits.memory,
        cpu_seconds: u.cgroup.cpu_nanos.map(|n| n as f64 / 1e9),
        cpu_limit: b.limits.millicpus.map(|m| m as f64 / 1000.0),
        pids: u.cgroup.pids,
        pids_limit: b.limits.pids,
        disk_bytes: u.disk,
        disk_limit_bytes: b.limits.disk,
        oom_kills: u.cgroup.oom_kills,
    }
}
