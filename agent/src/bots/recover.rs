//! Finishing what a dead agent or containerd left half-done: a version cycle cut short, a
//! create that died before its record, a snapshot containerd lost mid-commit. The bot then
//! runs on its old or its new state, never on a fresh container from the image.

use super::versions::{
    active_snapshot_key, carried_record, nanos, record_label, version_of, LABEL_NEXT_VERSION,
    LABEL_RECORD,
};
use super::Manager;
use crate::containerd::{label_filter, ContainerInfo, SnapshotInfo, SnapshotKind, LABEL_GC_ROOT};
use crate::error::AgentError;
use crate::ids::{self, LABEL_BOT_ID, LABEL_IMAGE, LABEL_SNAPSHOT_PARENT};
use std::collections::HashMap;
use tracing::{debug, info, warn};

impl Manager {
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
            // One bot that cannot be recovered (its image gone, say) must not hold back the
            // others: it is logged and tried again on the next pass.
            match self.recover_locked(&bot).await {
                Ok(true) => repaired.push(bot),
                Ok(false) => {}
                Err(e) => warn!(bot, error = %e, "recovering the bot failed; the others go on"),
            }
        }
        Ok(repaired)
    }

    /// [`Manager::recover`] for one bot whose lock the caller holds. Returns whether it
    /// changed anything.
    pub(super) async fn recover_locked(&self, bot: &str) -> Result<bool, AgentError> {
        let rt = self.runtime().clone();
        let cid = ids::container_id(bot);
        let container = rt.get_container(&cid).await?;
        // A live version cut short: its lease goes, a frozen bot thaws.
        let live = self.recover_live_cycle(bot, container.as_ref()).await?;
        let mut lost = false;
        if let Some(c) = &container {
            if crate::bots::deleting(c).is_some() {
                return Ok(live); // reconcile finishes the delete
            }
            if rt.stat_snapshot(&c.snapshot_key).await?.is_some() {
                // Healthy, unless a rollback cut short left a second state.
                let strays = self.remove_stray_actives(bot, &c.snapshot_key).await?;
                return Ok(live || strays);
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
        // The record's counter too: a removed newest version's number is never handed out
        // again.
        let from_record = container
            .as_ref()
            .and_then(|c| c.labels.get(LABEL_NEXT_VERSION))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let next = (snaps.iter().filter_map(version_of).max().unwrap_or(0) + 1).max(from_record);
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
                    self.prepare_recovered(bot, &v.name, &image, &c.labels)
                        .await?,
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
    pub(super) async fn recover_record(
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
            &carried_record(&a.labels),
        )
        .await?;
        // What the lost record carried (its desired state above all: a stopped bot stays
        // stopped), then what recovery knows better: where the bot is now, and the counter.
        let mut labels = carried_record(&a.labels);
        let carried_next = labels
            .get(LABEL_NEXT_VERSION)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        labels.insert(
            LABEL_NEXT_VERSION.to_string(),
            next.max(carried_next).to_string(),
        );
        labels.insert(LABEL_IMAGE.to_string(), resolved.name.clone());
        match a.parent.as_deref() {
            Some(p) => labels.insert(LABEL_SNAPSHOT_PARENT.to_string(), p.to_string()),
            None => labels.remove(LABEL_SNAPSHOT_PARENT),
        };
        rt.update_container_labels(&cid, &labels).await?;
        Ok(true)
    }

    /// Whether active snapshot `key` holds nothing of its own: no file was written on top of
    /// its parent, so removing it loses nothing. A snapshotter whose active snapshots are full
    /// copies never says so; their snapshots are kept.
    pub(super) async fn holds_nothing(&self, key: &str) -> Result<bool, AgentError> {
        let usage = self.runtime().snapshot_usage(key).await?;
        debug!(key, ?usage, "usage of an orphaned snapshot");
        Ok(usage.is_some_and(|u| u.inodes <= 1))
    }

    /// A fresh active snapshot of `bot` on `parent`, carrying the labels of the record it is
    /// for; returns its key.
    pub(super) async fn prepare_recovered(
        &self,
        bot: &str,
        parent: &str,
        image: &str,
        record: &HashMap<String, String>,
    ) -> Result<String, AgentError> {
        let key = active_snapshot_key(bot, nanos());
        let mut labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_IMAGE.to_string(), image.to_string()),
            (LABEL_GC_ROOT.to_string(), "recovered".to_string()),
        ]);
        if let Some(r) = record_label(record) {
            labels.insert(LABEL_RECORD.to_string(), r);
        }
        self.runtime()
            .prepare_snapshot(&key, Some(parent), &labels)
            .await?;
        Ok(key)
    }

    /// containerd lost the state `c` ran on: the bot goes back onto that state's parent (the
    /// version it was taken from, or its image), and the loss is logged, counted and written
    /// on the container, where `bot inspect` shows it.
    pub(super) async fn recover_lost_state(
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
        let key = self
            .prepare_recovered(bot, &parent.name, &c.image, &c.labels)
            .await?;
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
