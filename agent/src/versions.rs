//! Versions of a bot: committed containerd snapshots a bot can roll back to.
//!
//! A version is a committed snapshot labelled with the bot, its number, display name, source
//! and creation time, and `containerd.io/gc.root` so the garbage collector keeps it. Those
//! labels are the only record: no second store can disagree with containerd.
//!
//! Taking a version is a full cycle under the bot's lock: stop the task, commit the active
//! snapshot (it becomes the read-only version), prepare a new active snapshot on it, delete the
//! container keeping its snapshots, recreate it on the new snapshot, start it (network and pool
//! included). Every step leaves something [`Manager::recover`] can finish from if the agent dies
//! there: the bot then runs on the old or the new state, never on a fresh container from the
//! image.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

use crate::bots::{Manager, STOP_GRACE};
use crate::containerd::{
    label_filter, ContainerInfo, NewContainer, SnapshotInfo, SnapshotKind, LABEL_GC_ROOT,
};
use crate::error::AgentError;
use crate::ids::{self, LABEL_BOT_ID, LABEL_IMAGE, LABEL_LOST_STATE, LABEL_SNAPSHOT_PARENT};

/// Version number label on a committed snapshot.
pub const LABEL_VERSION: &str = "memoh.version";
/// Display name label.
pub const LABEL_VERSION_NAME: &str = "memoh.version.name";
/// Source label: `manual`, `rollback` or `pre-migration`.
pub const LABEL_VERSION_SOURCE: &str = "memoh.version.source";
/// Creation time label (RFC 3339, UTC).
pub const LABEL_VERSION_CREATED: &str = "memoh.version.created";
/// Label on the container: the next version number (numbers are never reused).
pub const LABEL_NEXT_VERSION: &str = "memoh.version.next";
/// Environment variable naming the step at which the agent aborts (fault tests only): a cycle
/// step, `1` to `5`, or `create`, between a new bot's snapshot and its container record.
pub const FAULT_ENV: &str = "MEMOH_FAULT_SNAPSHOT_STEP";

/// Why a version was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `snapshot create`.
    Manual,
    /// The state before a rollback.
    Rollback,
    /// Before migrating legacy data into the bot.
    PreMigration,
}

impl Source {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Manual => "manual",
            Source::Rollback => "rollback",
            Source::PreMigration => "pre-migration",
        }
    }
}

/// One version as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Number, from 1 per bot.
    pub number: u64,
    /// Display name.
    pub name: String,
    /// `manual`, `rollback` or `pre-migration`.
    pub source: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// The committed snapshot's name in containerd.
    pub snapshot: String,
    /// The bot's current state descends directly from this version.
    pub current: bool,
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// Name of a committed version snapshot. `@` cannot appear in bot ids, so names of different
/// bots never collide.
pub fn version_snapshot_name(bot: &str, nanos: u128) -> String {
    format!("mcp-{bot}@v{nanos}")
}

/// Key of an active snapshot made by a cycle.
pub fn active_snapshot_key(bot: &str, nanos: u128) -> String {
    format!("mcp-{bot}@a{nanos}")
}

pub(crate) fn fault(step: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|v| v == step) {
        warn!(step, "fault injection: aborting the agent");
        std::process::abort();
    }
}

fn version_of(s: &SnapshotInfo) -> Option<u64> {
    s.labels.get(LABEL_VERSION)?.parse().ok()
}

impl Manager {
    async fn bot_snapshots(&self, bot: &str) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.runtime()
            .list_snapshots(&[label_filter(LABEL_BOT_ID, Some(bot))])
            .await
    }

    /// The bot's versions, oldest first.
    pub async fn versions(&self, bot: &str) -> Result<Vec<Version>, AgentError> {
        let c = self.container(bot).await?;
        let current_parent = self
            .runtime()
            .stat_snapshot(&c.snapshot_key)
            .await?
            .and_then(|s| s.parent);
        let mut out: Vec<Version> = self
            .bot_snapshots(bot)
            .await?
            .into_iter()
            .filter(|s| s.kind == SnapshotKind::Committed)
            .filter_map(|s| {
                let number = version_of(&s)?;
                Some(Version {
                    number,
                    name: s
                        .labels
                        .get(LABEL_VERSION_NAME)
                        .cloned()
                        .unwrap_or_default(),
                    source: s
                        .labels
                        .get(LABEL_VERSION_SOURCE)
                        .cloned()
                        .unwrap_or_default(),
                    created_at: s
                        .labels
                        .get(LABEL_VERSION_CREATED)
                        .cloned()
                        .unwrap_or_default(),
                    current: current_parent.as_deref() == Some(s.name.as_str()),
                    snapshot: s.name,
                })
            })
            .collect();
        out.sort_by_key(|v| v.number);
        Ok(out)
    }

    async fn next_version(&self, bot: &str, c: &ContainerInfo) -> Result<u64, AgentError> {
        let from_label = c
            .labels
            .get(LABEL_NEXT_VERSION)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1);
        let from_snapshots = self
            .bot_snapshots(bot)
            .await?
            .iter()
            .filter_map(version_of)
            .max()
            .map(|m| m + 1)
            .unwrap_or(1);
        Ok(from_label.max(from_snapshots))
    }

    /// Takes a version of the bot's current state (the full cycle). Returns it.
    pub async fn snapshot(
        &self,
        bot: &str,
        name: &str,
        source: Source,
    ) -> Result<Version, AgentError> {
        let _g = self.lock_bot(bot).await;
        self.snapshot_locked(bot, name, source, None).await
    }

    /// Rolls the bot back to version `number`: the current state is kept as a new version
    /// first (source `rollback`), then the bot runs on a fresh active snapshot of `number`.
    pub async fn rollback(&self, bot: &str, number: u64) -> Result<Version, AgentError> {
        let _g = self.lock_bot(bot).await;
        let versions = self.versions(bot).await?;
        let target = versions
            .iter()
            .find(|v| v.number == number)
            .cloned()
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("bot {bot:?} has no version {number}"))
            })?;
        let name = format!("before rollback to {number}");
        self.snapshot_locked(bot, &name, Source::Rollback, Some(&target.snapshot))
            .await?;
        Ok(target)
    }

    /// Removes version `number` unless another snapshot (a version or the running state)
    /// depends on it.
    pub async fn remove_version(&self, bot: &str, number: u64) -> Result<(), AgentError> {
        let _g = self.lock_bot(bot).await;
        let snaps = self.bot_snapshots(bot).await?;
        let target = snaps
            .iter()
            .find(|s| s.kind == SnapshotKind::Committed && version_of(s) == Some(number))
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("bot {bot:?} has no version {number}"))
            })?;
        let children: Vec<String> = snaps
            .iter()
            .filter(|s| s.parent.as_deref() == Some(target.name.as_str()))
            .map(|s| match version_of(s) {
                Some(n) => format!("version {n}"),
                None => "the bot's current state".to_string(),
            })
            .collect();
        if !children.is_empty() {
            return Err(AgentError::FailedPrecondition(format!(
                "version {number} of bot {bot:?} is the parent of {}; remove those first",
                children.join(", ")
            )));
        }
        self.runtime().remove_snapshot(&target.name).await?;
        info!(bot, number, "version removed");
        Ok(())
    }

    /// The cycle. With `restore_from`, the new active snapshot is prepared on that version
    /// instead of on the one just committed (rollback).
    pub(crate) async fn snapshot_locked(
        &self,
        bot: &str,
        name: &str,
        source: Source,
        restore_from: Option<&str>,
    ) -> Result<Version, AgentError> {
        let c = self.container_locked(bot).await?;
        let rt = self.runtime().clone();
        let number = self.next_version(bot, &c).await?;
        let now = nanos();
        let version_name = version_snapshot_name(bot, now);
        let new_key = active_snapshot_key(bot, now);
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let started = std::time::Instant::now();

        // 1. Stop the task; the network namespace (and so the bot's address) stays.
        self.forget_route(bot);
        self.kill_and_delete_task(&c.id, STOP_GRACE).await?;
        fault("1");

        // 2. Commit the active snapshot as the version.
        let mut labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_VERSION.to_string(), number.to_string()),
            (LABEL_VERSION_NAME.to_string(), name.to_string()),
            (
                LABEL_VERSION_SOURCE.to_string(),
                source.as_str().to_string(),
            ),
            (LABEL_VERSION_CREATED.to_string(), created.clone()),
            (LABEL_GC_ROOT.to_string(), created.clone()),
        ]);
        if let Some(image) = c.labels.get(LABEL_IMAGE) {
            labels.insert(LABEL_IMAGE.to_string(), image.clone());
        }
        if let Err(e) = rt
            .commit_snapshot(&version_name, &c.snapshot_key, &labels)
            .await
        {
            // Usually nothing changed: bring the bot back on its last good state. A commit cut
            // short (containerd died in it) may have consumed the active snapshot or lost it:
            // recovery sorts that out first, as the periodic reconcile would.
            warn!(bot, error = %e, "commit failed; restarting the bot");
            let restarted = async {
                self.recover_locked(bot).await?;
                let c = self.container(bot).await?;
                self.start_locked(bot, &c).await
            };
            if let Err(e2) = restarted.await {
                warn!(bot, error = %e2, "restart after failed commit failed");
            }
            return Err(e);
        }
        fault("2");

        // 3. A new active snapshot on the version (or on the rollback target).
        let parent = restore_from.unwrap_or(&version_name);
        let active_labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_IMAGE.to_string(), c.image.clone()),
            (LABEL_GC_ROOT.to_string(), created.clone()),
        ]);
        rt.prepare_snapshot(&new_key, Some(parent), &active_labels)
            .await?;
        fault("3");

        // 4 and 5. Replace the container record, keeping its spec and labels.
        self.replace_container(&c, &new_key, parent, number + 1, None)
            .await?;
        fault("4");

        // 6. Start, re-network, evict the pooled channel.
        let c2 = self.container(bot).await?;
        self.start_locked(bot, &c2).await?;
        info!(bot, number, source = source.as_str(), elapsed = ?started.elapsed(), "version taken");
        crate::metrics::global().snapshot(started.elapsed());
        Ok(Version {
            number,
            name: name.to_string(),
            source: source.as_str().to_string(),
            created_at: created,
            snapshot: version_name,
            current: restore_from.is_none(),
        })
    }

    /// Deletes the container record (its task is gone) and creates it again on `key`, whose
    /// parent is `parent`; `lost_state` records a loss on it.
    async fn replace_container(
        &self,
        c: &ContainerInfo,
        key: &str,
        parent: &str,
        next_version: u64,
        lost_state: Option<String>,
    ) -> Result<(), AgentError> {
        let rt = self.runtime();
        let spec = c.spec.clone().ok_or_else(|| {
            AgentError::FailedPrecondition(format!("container {} has no runtime spec", c.id))
        })?;
        let mut labels = c.labels.clone();
        labels.insert(LABEL_NEXT_VERSION.to_string(), next_version.to_string());
        labels.insert(LABEL_SNAPSHOT_PARENT.to_string(), parent.to_string());
        if let Some(lost) = lost_state {
            labels.insert(LABEL_LOST_STATE.to_string(), lost);
        }
        rt.delete_container(&c.id).await?;
        fault("5");
        rt.create_container(&NewContainer {
            id: c.id.clone(),
            image: c.image.clone(),
            snapshot_key: key.to_string(),
            labels,
            spec,
        })
        .await?;
        Ok(())
    }

    /// Finishes a cycle the agent died in, for every bot: a bot whose container record is gone
    /// but whose active snapshot exists gets its container back; a container whose snapshot is
    /// gone is moved onto the bot's newest active snapshot, or a fresh one on its newest
    /// version; a container whose snapshot containerd lost mid-commit goes back onto that
    /// snapshot's parent, and the loss is recorded. Returns the bots it repaired.
    pub async fn recover(&self) -> Result<Vec<String>, AgentError> {
        let rt = self.runtime().clone();
        let snaps = rt
            .list_snapshots(&[label_filter(LABEL_BOT_ID, None)])
            .await?;
        let containers = rt
            .list_containers(&[label_filter(LABEL_BOT_ID, None)])
            .await?;
        // Containers too: a bot whose only snapshot containerd lost has no listed snapshot.
        let bots: std::collections::BTreeSet<String> = snaps
            .iter()
            .filter_map(|s| s.labels.get(LABEL_BOT_ID).cloned())
            .chain(
                containers
                    .iter()
                    .filter_map(|c| c.labels.get(LABEL_BOT_ID).cloned()),
            )
            .collect();
        let mut repaired = Vec::new();
        for bot in bots {
            if ids::validate(&bot).is_err() {
                continue;
            }
            let _g = self.lock_bot(&bot).await;
            if self.recover_locked(&bot).await? {
                repaired.push(bot);
            }
        }
        Ok(repaired)
    }

    /// [`Manager::recover`] for one bot whose lock the caller holds. Returns whether it
    /// changed anything.
    pub(crate) async fn recover_locked(&self, bot: &str) -> Result<bool, AgentError> {
        let rt = self.runtime().clone();
        let cid = ids::container_id(bot);
        let container = rt.get_container(&cid).await?;
        let mut lost = false;
        if let Some(c) = &container {
            if crate::bots::deleting(c).is_some() {
                return Ok(false); // reconcile finishes the delete
            }
            if rt.stat_snapshot(&c.snapshot_key).await?.is_some() {
                return Ok(false); // healthy
            }
            // containerd 1.6 killed while committing can keep the active snapshot in its
            // metadata after its snapshotter let go of it: stat and list no longer show it, yet
            // its parent still counts it as a child and can never be removed. Removing the
            // key clears that; that it was there at all means the commit was lost.
            lost = rt.remove_snapshot(&c.snapshot_key).await?;
        }
        // Read under the lock: a delete or cycle that held it may have changed them.
        let snaps = rt
            .list_snapshots(&[label_filter(LABEL_BOT_ID, Some(bot))])
            .await?;
        let next = snaps.iter().filter_map(version_of).max().unwrap_or(0) + 1;
        let newest_version = snaps
            .iter()
            .filter(|s| s.kind == SnapshotKind::Committed && version_of(s).is_some())
            .max_by_key(|s| version_of(s))
            .cloned();
        if let (true, Some(c)) = (lost, &container) {
            self.recover_lost_state(bot, c, newest_version.as_ref(), next)
                .await?;
            return Ok(true);
        }
        let Some(c) = container else {
            return self.recover_record(bot, &snaps, next).await;
        };
        let newest_active = snaps
            .iter()
            .filter(|s| s.kind == SnapshotKind::Active)
            .max_by_key(|s| s.created_at);
        let (key, parent) = match (newest_active, &newest_version) {
            (Some(a), _) => (a.name.clone(), a.parent.clone()),
            (None, Some(v)) => {
                let image = v.labels.get(LABEL_IMAGE).cloned().unwrap_or_default();
                (
                    self.prepare_recovered(bot, &v.name, &image).await?,
                    Some(v.name.clone()),
                )
            }
            (None, None) => return Ok(false),
        };
        warn!(bot, key, "container lost its snapshot mid-cycle; moving it");
        self.replace_container(&c, &key, parent.as_deref().unwrap_or_default(), next, None)
            .await?;
        Ok(true)
    }

    /// The bot's snapshots `snaps` without a container record, which is what makes a bot. One
    /// of three things left them:
    /// - a create that died between the bot's snapshot (key `mcp-BOT`) and its record: the
    ///   create failed, so the snapshot goes with the bot's state directory, as long as nothing
    ///   was written on it (one that holds data, from a record removed behind the agent's back,
    ///   gets its container back instead);
    /// - a cycle that died between deleting the record and recreating it on a new active
    ///   snapshot: the container is recreated on the newest active snapshot;
    /// - `bot rm --keep-versions`: only versions are left, and stay for a later bot of that id.
    async fn recover_record(
        &self,
        bot: &str,
        snaps: &[SnapshotInfo],
        next: u64,
    ) -> Result<bool, AgentError> {
        let rt = self.runtime().clone();
        let cid = ids::container_id(bot);
        let mut actives: Vec<&SnapshotInfo> = snaps
            .iter()
            .filter(|s| s.kind == SnapshotKind::Active)
            .collect();
        actives.sort_by_key(|s| s.created_at);
        let mut changed = false;
        if actives.iter().any(|s| s.name == cid) && self.holds_nothing(&cid).await? {
            info!(bot, "removing the snapshot of a create that did not finish");
            rt.remove_snapshot(&cid).await?;
            self.remove_bot_dir(bot).await?;
            actives.retain(|s| s.name != cid);
            changed = true;
        }
        let Some(a) = actives.last() else {
            return Ok(changed);
        };
        let image = a
            .labels
            .get(LABEL_IMAGE)
            .cloned()
            .unwrap_or_else(|| self.config().image.clone());
        warn!(
            bot,
            key = a.name,
            image,
            "container record lost; recreating it"
        );
        let resolved = rt.resolve_image(&image).await?;
        self.create_container_record(
            bot,
            &resolved.name,
            &resolved.config,
            &a.name,
            a.parent.as_deref(),
        )
        .await?;
        let labels = HashMap::from([(LABEL_NEXT_VERSION.to_string(), next.to_string())]);
        rt.update_container_labels(&cid, &labels).await?;
        Ok(true)
    }

    /// Whether active snapshot `key` holds nothing of its own: no file was written on top of
    /// its parent, so removing it loses nothing. A snapshotter whose active snapshots are full
    /// copies never says so; their snapshots are kept.
    async fn holds_nothing(&self, key: &str) -> Result<bool, AgentError> {
        let usage = self.runtime().snapshot_usage(key).await?;
        debug!(key, ?usage, "usage of an orphaned snapshot");
        Ok(usage.is_some_and(|u| u.inodes <= 1))
    }

    /// A fresh active snapshot of `bot` on `parent`; returns its key.
    async fn prepare_recovered(
        &self,
        bot: &str,
        parent: &str,
        image: &str,
    ) -> Result<String, AgentError> {
        let key = active_snapshot_key(bot, nanos());
        let labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_IMAGE.to_string(), image.to_string()),
            (LABEL_GC_ROOT.to_string(), "recovered".to_string()),
        ]);
        self.runtime()
            .prepare_snapshot(&key, Some(parent), &labels)
            .await?;
        Ok(key)
    }

    /// containerd lost the state `c` ran on: the bot goes back onto that state's parent (the
    /// version it was taken from, or its image), and the loss is logged, counted and written
    /// on the container, where `bot inspect` shows it.
    async fn recover_lost_state(
        &self,
        bot: &str,
        c: &ContainerInfo,
        newest_version: Option<&SnapshotInfo>,
        next: u64,
    ) -> Result<(), AgentError> {
        let rt = self.runtime();
        // The recorded parent when it still exists; containers from before that label was kept
        // fall back to the newest version, then to the image.
        let mut parent = None;
        if let Some(p) = c.labels.get(LABEL_SNAPSHOT_PARENT) {
            parent = rt.stat_snapshot(p).await?;
        }
        let parent = match (parent, newest_version) {
            (Some(p), _) => p,
            (None, Some(v)) => v.clone(),
            (None, None) => {
                let resolved = rt.ensure_unpacked(&c.image).await?;
                rt.stat_snapshot(&resolved.chain_id).await?.ok_or_else(|| {
                    AgentError::FailedPrecondition(format!(
                        "bot {bot:?} lost its state and its image {} has no snapshot",
                        c.image
                    ))
                })?
            }
        };
        let what = match version_of(&parent) {
            Some(n) => format!("version {n}"),
            None => format!("its image {}", c.image),
        };
        let key = self.prepare_recovered(bot, &parent.name, &c.image).await?;
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let note = format!(
            "{at}: containerd lost the bot's state while committing it (it was killed \
             mid-commit); the changes since {what} are gone and the bot runs on {what} again"
        );
        tracing::error!(bot, lost = %c.snapshot_key, now_on = %parent.name, "{note}");
        crate::metrics::global().lost_state();
        self.replace_container(c, &key, &parent.name, next, Some(note))
            .await
    }
}

/// How long a cycle may wait for its task to stop before SIGKILL (for docs and tests).
pub const CYCLE_STOP_GRACE: Duration = STOP_GRACE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_never_collide_across_bots() {
        // "a" at time "-1..." cannot produce the same name as bot "a-1".
        assert_ne!(
            version_snapshot_name("a-1", 5),
            version_snapshot_name("a", 15)
        );
        assert_eq!(version_snapshot_name("b", 7), "mcp-b@v7");
        assert_eq!(active_snapshot_key("b", 7), "mcp-b@a7");
        assert!(ids::validate("b@v7").is_err());
    }
}
