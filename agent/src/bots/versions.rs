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

use tracing::{info, warn};

use super::fault::fault;
use super::{Manager, STOP_GRACE};
use crate::containerd::{
    label_filter, ContainerInfo, NewContainer, SnapshotInfo, SnapshotKind, LABEL_GC_ROOT,
};
use crate::error::AgentError;
use crate::ids::{LABEL_BOT_ID, LABEL_IMAGE, LABEL_LOST_STATE, LABEL_SNAPSHOT_PARENT};

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
/// Label on a bot's active snapshot: the bot's own record labels (`memoh.*`, as JSON) when the
/// snapshot was prepared. A cycle cut short between deleting the record and recreating it
/// leaves only snapshots; recovery rebuilds the record with these, so the bot keeps its
/// desired state (a stopped bot stays stopped) and everything else the record carried.
pub const LABEL_RECORD: &str = "memoh.record";

/// containerd refuses a label whose key and value exceed 4 KiB together.
const RECORD_LABEL_MAX: usize = 4000;

/// The [`LABEL_RECORD`] value for a record with `labels`: its `memoh.*` labels, without the
/// note of a lost state when the whole would not fit (that note is the longest and only
/// informs), `None` when it still does not fit.
pub(super) fn record_label(labels: &HashMap<String, String>) -> Option<String> {
    let mut carried: std::collections::BTreeMap<&str, &str> = labels
        .iter()
        .filter(|(k, _)| k.starts_with("memoh.") && k.as_str() != LABEL_RECORD)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let fits = |m: &std::collections::BTreeMap<&str, &str>| {
        serde_json::to_string(m)
            .ok()
            .filter(|j| j.len() + LABEL_RECORD.len() <= RECORD_LABEL_MAX)
    };
    if let Some(j) = fits(&carried) {
        return Some(j);
    }
    carried.remove(LABEL_LOST_STATE);
    let j = fits(&carried);
    if j.is_none() {
        warn!("a bot's record labels do not fit on its snapshot; recovery would lose them");
    }
    j
}

/// The record labels a snapshot with `labels` carries ([`LABEL_RECORD`]); empty when it has
/// none or they do not parse.
pub(super) fn carried_record(labels: &HashMap<String, String>) -> HashMap<String, String> {
    labels
        .get(LABEL_RECORD)
        .and_then(|j| serde_json::from_str::<HashMap<String, String>>(j).ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("memoh.") && k.as_str() != LABEL_RECORD)
        .collect()
}

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
    /// The committed snapshot's name in containerd (versions of the commit-based cycle);
    /// empty for a version image.
    pub snapshot: String,
    /// The version's image in containerd (versions taken live); empty for a committed
    /// snapshot.
    pub image: String,
    /// The registry reference the version came from (`bot create --from`); empty otherwise.
    pub origin: String,
    /// The bot's current state descends directly from this version.
    pub current: bool,
    /// What taking it measured (only on the answer of a live cycle).
    pub times: Option<super::live::CycleTimes>,
}

pub(super) fn nanos() -> u128 {
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

pub(super) fn version_of(s: &SnapshotInfo) -> Option<u64> {
    s.labels.get(LABEL_VERSION)?.parse().ok()
}

impl Manager {
    pub(super) async fn bot_snapshots(&self, bot: &str) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.runtime()
            .list_snapshots(&[label_filter(LABEL_BOT_ID, Some(bot))])
            .await
    }

    /// The bot's versions of both kinds (committed snapshots and version images), oldest
    /// first.
    pub async fn versions(&self, bot: &str) -> Result<Vec<Version>, AgentError> {
        let c = self.container(bot).await?;
        let current_parent = self
            .runtime()
            .stat_snapshot(&c.snapshot_key)
            .await?
            .and_then(|s| s.parent);
        // Live versions and rollbacks note the current version on the record; without that
        // note the state descends from the committed version that is its parent.
        let current_label = c
            .labels
            .get(super::live::LABEL_VERSION_CURRENT)
            .and_then(|v| v.parse::<u64>().ok());
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
                    current: match current_label {
                        Some(n) => n == number,
                        None => current_parent.as_deref() == Some(s.name.as_str()),
                    },
                    snapshot: s.name,
                    image: String::new(),
                    origin: String::new(),
                    times: None,
                })
            })
            .collect();
        out.extend(self.image_versions(bot, current_label).await?);
        out.sort_by_key(|v| v.number);
        Ok(out)
    }

    pub(super) async fn next_version(
        &self,
        bot: &str,
        c: &ContainerInfo,
    ) -> Result<u64, AgentError> {
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
        let from_images = self
            .image_versions(bot, None)
            .await?
            .iter()
            .map(|v| v.number + 1)
            .max()
            .unwrap_or(1);
        Ok(from_label.max(from_snapshots).max(from_images))
    }

    /// Takes a version of the bot's current state by the commit-based cycle (stop, commit,
    /// start again; [`Manager::snapshot_live`] takes one without a restart). Returns it.
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
    /// depends on it. A version image goes unless the bot's state is prepared on it; the
    /// layers it shares with others stay as long as those do.
    pub async fn remove_version(&self, bot: &str, number: u64) -> Result<(), AgentError> {
        let _g = self.lock_bot(bot).await;
        if let Some(v) = self
            .image_versions(bot, None)
            .await?
            .into_iter()
            .find(|v| v.number == number)
        {
            return self.remove_version_image(bot, number, &v.image).await;
        }
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
    pub(super) async fn snapshot_locked(
        &self,
        bot: &str,
        name: &str,
        source: Source,
        restore_from: Option<&str>,
    ) -> Result<Version, AgentError> {
        let c = self.container_locked(bot).await?;
        // A stopped bot is versioned (or rolled back) and stays stopped.
        let running = super::wants_running(&c);
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
            if self.committed_anyway(&version_name).await {
                // containerd did the commit and its answer was lost (it was killed or
                // restarted right after): the version exists, so the cycle goes on from it.
                warn!(bot, error = %e, "the commit's answer was lost but the version exists; going on");
            } else {
                // Usually nothing changed: bring the bot back on its last good state. A commit
                // cut short (containerd died in it) may have consumed the active snapshot or
                // lost it: recovery sorts that out first, as the periodic reconcile would.
                warn!(bot, error = %e, "commit failed; bringing the bot back");
                let restarted = async {
                    self.recover_locked(bot).await?;
                    let c = self.container(bot).await?;
                    if running {
                        self.start_locked(bot, &c).await?;
                    }
                    Ok::<_, AgentError>(())
                };
                if let Err(e2) = restarted.await {
                    warn!(bot, error = %e2, "restart after failed commit failed");
                }
                return Err(e);
            }
        }
        fault("2");

        // 3. A new active snapshot on the version (or on the rollback target).
        let parent = restore_from.unwrap_or(&version_name);
        let mut active_labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_IMAGE.to_string(), c.image.clone()),
            (LABEL_GC_ROOT.to_string(), created.clone()),
        ]);
        if let Some(record) = record_label(&c.labels) {
            active_labels.insert(LABEL_RECORD.to_string(), record);
        }
        rt.prepare_snapshot(&new_key, Some(parent), &active_labels)
            .await?;
        fault("3");

        // 4 and 5. Replace the container record, keeping its spec and labels; the bot now runs
        // on a committed snapshot, so the notes of the live cycle no longer apply.
        let mut moved = c.clone();
        moved.labels.remove(super::live::LABEL_VERSION_CURRENT);
        moved.labels.remove(super::live::LABEL_VERSION_BASE);
        self.replace_container(&moved, &new_key, parent, number + 1, None)
            .await?;
        fault("4");

        // 6. Start, re-network, evict the pooled channel; a stopped bot stays stopped.
        if running {
            let c2 = self.container(bot).await?;
            self.start_locked(bot, &c2).await?;
        }
        info!(bot, number, source = source.as_str(), elapsed = ?started.elapsed(), "version taken");
        crate::metrics::global().snapshot(started.elapsed());
        Ok(Version {
            number,
            name: name.to_string(),
            source: source.as_str().to_string(),
            created_at: created,
            snapshot: version_name,
            image: String::new(),
            origin: String::new(),
            current: restore_from.is_none(),
            times: None,
        })
    }

    /// Whether committed snapshot `name` exists after its commit reported an error: containerd
    /// may have done the commit and lost only its answer. Asks a few times while containerd
    /// does not answer (it may be restarting).
    async fn committed_anyway(&self, name: &str) -> bool {
        for attempt in 0..COMMIT_CHECK_ATTEMPTS {
            match self.runtime().stat_snapshot(name).await {
                Ok(s) => return s.is_some_and(|s| s.kind == SnapshotKind::Committed),
                Err(e) => {
                    tracing::debug!(name, attempt, error = %e, "checking a commit");
                    tokio::time::sleep(COMMIT_CHECK_PAUSE).await;
                }
            }
        }
        false
    }

    /// Deletes the container record (its task is gone) and creates it again on `key`, whose
    /// parent is `parent`; `lost_state` records a loss on it.
    pub(super) async fn replace_container(
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
}

/// How often a failed commit's result is asked for while containerd does not answer.
const COMMIT_CHECK_ATTEMPTS: u32 = 10;
/// The pause between those questions.
const COMMIT_CHECK_PAUSE: Duration = Duration::from_secs(1);

/// How long a cycle may wait for its task to stop before SIGKILL (for docs and tests).
pub const CYCLE_STOP_GRACE: Duration = STOP_GRACE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids;

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
