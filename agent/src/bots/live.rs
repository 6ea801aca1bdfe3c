//! Versions without a restart: a version is a layer, and a version's image is the bot's image
//! plus one layer per version on its line.
//!
//! Taking one freezes a running bot (containerd's task pause, the cgroup freezer) only while
//! containerd's diff service writes the difference of its active snapshot against the
//! snapshot's parent into the content store, bounded by `version_max_pause_ms`; the bot then
//! resumes, and the config, the manifest and the image record labelled as the bot's version
//! are written while it runs. No process restarts and no connection breaks.
//!
//! Everything a cycle writes is attached to a lease labelled with the bot: an agent or
//! containerd killed at any step leaves either the finished image record (which keeps its
//! blobs through the `containerd.io/gc.ref.content.*` labels) or only leased content, which
//! recovery removes by deleting the bot's cycle leases. A bot found paused although its
//! desired state is not `paused` is resumed by recovery.
//!
//! Rolling back to a version image unpacks it (layers already unpacked are reused, as for any
//! image) and restarts the bot on a new active snapshot of its top layer. Versions of the
//! earlier commit-based cycle stay listed, readable, removable, and can be rolled back to.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::fault::fault;
use super::versions::{
    active_snapshot_key, nanos, record_label, version_of, Source, Version, LABEL_NEXT_VERSION,
    LABEL_RECORD, LABEL_VERSION, LABEL_VERSION_CREATED, LABEL_VERSION_NAME, LABEL_VERSION_SOURCE,
};
use super::{Manager, STOP_GRACE};
use crate::containerd::{label_filter, ImageSummary, PullOptions, TaskState, LABEL_GC_ROOT};
use crate::error::AgentError;
use crate::ids::{self, LABEL_BOT_ID, LABEL_DESIRED, LABEL_IMAGE};

/// Label on the container: the image whose top layer the bot's active snapshot is prepared
/// on (a version image after a rollback or `create --from`; the bot's image when absent).
pub const LABEL_VERSION_BASE: &str = "memoh.version.base";
/// Label on the container: the number of the version the bot's state descends from.
pub const LABEL_VERSION_CURRENT: &str = "memoh.version.current";
/// Label on a version image: the registry reference it came from (`bot create --from`).
pub const LABEL_VERSION_ORIGIN: &str = "memoh.version.origin";

/// The image name of a bot's version. A tag may hold every character of a bot id, and `.`
/// cannot appear in one, so names of different bots never collide.
pub fn version_image_name(bot: &str, number: u64) -> String {
    format!("memoh.local/versions:{bot}.v{number}")
}

/// Label on the active snapshot a rollback prepares (until the record is on it, recovery
/// removes it).
const LABEL_ROLLBACK_NEW: &str = "memoh.rollback.new";
/// Label on the active snapshot a rollback leaves: the key of the one replacing it (once the
/// record is on that one, recovery removes this one).
const LABEL_ROLLBACK_REPLACED: &str = "memoh.rollback.replaced-by";

/// What a live cycle measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleTimes {
    /// How long the bot was frozen (zero when it was not running).
    pub pause: Duration,
    /// The whole cycle.
    pub elapsed: Duration,
}

fn version_from_image(i: &ImageSummary, current: Option<u64>) -> Option<Version> {
    let number: u64 = i.labels.get(LABEL_VERSION)?.parse().ok()?;
    let get = |k: &str| i.labels.get(k).cloned().unwrap_or_default();
    Some(Version {
        number,
        name: get(LABEL_VERSION_NAME),
        source: get(LABEL_VERSION_SOURCE),
        created_at: get(LABEL_VERSION_CREATED),
        snapshot: String::new(),
        image: i.name.clone(),
        origin: get(LABEL_VERSION_ORIGIN),
        current: current == Some(number),
        times: None,
    })
}

impl Manager {
    /// The bot's version images, oldest first (`current` from the container's label).
    pub(super) async fn image_versions(
        &self,
        bot: &str,
        current: Option<u64>,
    ) -> Result<Vec<Version>, AgentError> {
        let mut out: Vec<Version> = self
            .runtime()
            .list_images()
            .await?
            .iter()
            .filter(|i| i.labels.get(LABEL_BOT_ID).map(String::as_str) == Some(bot))
            .filter_map(|i| version_from_image(i, current))
            .collect();
        out.sort_by_key(|v| v.number);
        Ok(out)
    }

    /// Takes a version of the running bot without restarting it (see the module docs).
    pub async fn snapshot_live(
        &self,
        bot: &str,
        name: &str,
        source: Source,
    ) -> Result<Version, AgentError> {
        let _g = self.lock_bot(bot).await;
        self.snapshot_live_locked(bot, name, source).await
    }

    /// Where a version of the bot's state stacks: the image whose top layer the active
    /// snapshot's parent is (its layers come first, and the diff is against that parent), or,
    /// when the parent is no image's top (a commit-based version), the bot's image for its
    /// config only and a diff against an empty tree (one layer holding the whole tree).
    async fn version_base(
        &self,
        c: &crate::containerd::ContainerInfo,
        parent: Option<&str>,
    ) -> Result<(String, bool), AgentError> {
        let Some(parent) = parent else {
            return Ok((c.image.clone(), false));
        };
        let mut candidates = Vec::new();
        if let Some(b) = c.labels.get(LABEL_VERSION_BASE) {
            candidates.push(b.clone());
        }
        candidates.push(c.image.clone());
        for base in candidates {
            match self.runtime().resolve_image(&base).await {
                Ok(r) if r.chain_id == parent => return Ok((base, true)),
                Ok(_) => {}
                Err(AgentError::ImageNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((c.image.clone(), false))
    }

    /// [`Manager::snapshot_live`] under the bot's lock.
    pub(super) async fn snapshot_live_locked(
        &self,
        bot: &str,
        name: &str,
        source: Source,
    ) -> Result<Version, AgentError> {
        let started = Instant::now();
        let c = self.container_locked(bot).await?;
        let rt = self.runtime().clone();
        let active = rt.stat_snapshot(&c.snapshot_key).await?.ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "bot {bot:?} has no state to version (its snapshot {} is missing)",
                c.snapshot_key
            ))
        })?;
        let (base, stack) = self.version_base(&c, active.parent.as_deref()).await?;
        let diff_parent = if stack { active.parent.clone() } else { None };
        let number = self.next_version(bot, &c).await?;
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let running = matches!(
            rt.task_status(&c.id).await?.map(|s| s.state),
            Some(TaskState::Running)
        );
        let lease = rt.create_cycle_lease(bot).await?;
        let mut pause = Duration::ZERO;

        // 1. Freeze, diff, resume. The bot is resumed whatever the diff did.
        let diffed = {
            // Counted from the pause request: the freeze takes effect within it.
            let frozen_at = Instant::now();
            if running {
                if let Err(e) = rt.pause_task(&c.id).await {
                    self.drop_cycle_lease(bot, &lease).await;
                    return Err(e);
                }
            }
            fault("live-paused");
            super::fault::hold("live-paused").await;
            let limit = Duration::from_millis(self.config().version_max_pause_ms.max(1));
            let diff = rt.diff_snapshot(&c.snapshot_key, diff_parent.as_deref(), &lease);
            let r = if std::env::var(super::fault::FAULT_ENV).is_ok_and(|v| v == "live-diff") {
                // Die while containerd is writing the layer.
                tokio::select! {
                    r = diff => r.map_err(|e| e.to_string()),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                        fault("live-diff");
                        Err(String::new())
                    }
                }
            } else {
                match tokio::time::timeout(limit, diff).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!(
                        "the diff of bot {bot:?} took longer than the longest allowed pause \
                         ({} ms, version_max_pause_ms); the bot was resumed and no version was \
                         taken",
                        limit.as_millis()
                    )),
                }
            };
            fault("live-blob");
            super::fault::hold("live-blob").await;
            if running {
                self.resume_after_diff(bot, &c.id).await?;
                pause = frozen_at.elapsed();
            }
            r
        };
        let layer = match diffed {
            Ok(l) => l,
            Err(e) => {
                self.drop_cycle_lease(bot, &lease).await;
                return Err(AgentError::FailedPrecondition(e));
            }
        };

        // 2. The config, the manifest and the image record, while the bot runs.
        let image_name = version_image_name(bot, number);
        let mut labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_VERSION.to_string(), number.to_string()),
            (LABEL_VERSION_NAME.to_string(), name.to_string()),
            (
                LABEL_VERSION_SOURCE.to_string(),
                source.as_str().to_string(),
            ),
            (LABEL_VERSION_CREATED.to_string(), created.clone()),
        ]);
        if let Some(image) = c.labels.get(LABEL_IMAGE) {
            labels.insert(LABEL_IMAGE.to_string(), image.clone());
        }
        super::fault::hold("live-manifest").await;
        let written = rt
            .write_version_image(&image_name, &base, stack, &layer, name, &labels, &lease)
            .await;
        fault("live-record");
        self.drop_cycle_lease(bot, &lease).await;
        let image = written?;

        // 3. The counter and the current version on the record (listing works without them).
        let record = HashMap::from([
            (LABEL_NEXT_VERSION.to_string(), (number + 1).to_string()),
            (LABEL_VERSION_CURRENT.to_string(), number.to_string()),
        ]);
        if let Err(e) = rt.update_container_labels(&c.id, &record).await {
            warn!(bot, error = %e, "could not note the new version on the bot's record");
        }
        let times = CycleTimes {
            pause,
            elapsed: started.elapsed(),
        };
        info!(
            bot, number, source = source.as_str(), layers = image.layers,
            layer_bytes = layer.size, pause = ?times.pause, elapsed = ?times.elapsed,
            "version taken live"
        );
        crate::metrics::global().snapshot(times.elapsed);
        Ok(Version {
            number,
            name: name.to_string(),
            source: source.as_str().to_string(),
            created_at: created,
            snapshot: String::new(),
            image: image.name,
            origin: String::new(),
            current: true,
            times: Some(times),
        })
    }

    /// Thaws a task frozen for a diff, trying again a few times: a bot is never left frozen
    /// while the agent lives (and recovery thaws it should the agent die).
    async fn resume_after_diff(&self, bot: &str, id: &str) -> Result<(), AgentError> {
        let mut last = None;
        for attempt in 0..RESUME_ATTEMPTS {
            match self.runtime().resume_task(id).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!(bot, attempt, error = %e, "resuming the bot after its diff failed");
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn drop_cycle_lease(&self, bot: &str, lease: &str) {
        if let Err(e) = self.runtime().delete_cycle_lease(lease).await {
            warn!(bot, lease, error = %e, "could not delete a version's lease; recovery will");
        }
    }

    /// What an interrupted live cycle left of `bot`, whose lock the caller holds: its cycle
    /// leases go (and with them every blob and view nothing else references), and a task
    /// frozen although the bot is not meant to be paused is thawed. Returns whether it
    /// changed anything.
    pub(super) async fn recover_live_cycle(
        &self,
        bot: &str,
        container: Option<&crate::containerd::ContainerInfo>,
    ) -> Result<bool, AgentError> {
        let rt = self.runtime().clone();
        let mut changed = false;
        for lease in rt.cycle_leases(bot).await? {
            warn!(bot, lease, "removing what an interrupted version left");
            rt.delete_cycle_lease(&lease).await?;
            changed = true;
        }
        let cid = ids::container_id(bot);
        if let Some(c) = container {
            let paused_on_purpose = c.labels.get(LABEL_DESIRED).map(String::as_str)
                == Some(super::resources::DESIRED_PAUSED);
            let frozen = matches!(
                rt.task_status(&cid).await?.map(|s| s.state),
                Some(TaskState::Paused | TaskState::Pausing)
            );
            if frozen && !paused_on_purpose {
                warn!(
                    bot,
                    "the bot was left paused by an interrupted version; resuming it"
                );
                rt.resume_task(&cid).await?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Rolls the bot back to version `number`, of either kind: the task stops, its current
    /// state is kept as a new version first (source `rollback`), then the bot runs on a fresh
    /// active snapshot of that version (a version image is unpacked first).
    pub async fn rollback_live(&self, bot: &str, number: u64) -> Result<Version, AgentError> {
        let _g = self.lock_bot(bot).await;
        let target = self
            .versions(bot)
            .await?
            .into_iter()
            .find(|v| v.number == number)
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("bot {bot:?} has no version {number}"))
            })?;
        let c = self.container_locked(bot).await?;
        let running = super::wants_running(&c);
        let rt = self.runtime().clone();

        // 1. Stop; the network namespace (and so the address) stays.
        self.forget_route(bot);
        self.kill_and_delete_task(&c.id, STOP_GRACE).await?;
        // 2. The current state as a version (nothing runs, so nothing is paused).
        let name = format!("before rollback to {number}");
        self.snapshot_live_locked(bot, &name, Source::Rollback)
            .await?;
        fault("rollback-kept");
        // 3. The target's top snapshot.
        let (parent, base) = if target.image.is_empty() {
            (target.snapshot.clone(), None)
        } else {
            let r = rt.ensure_unpacked(&target.image).await?;
            (r.chain_id, Some(target.image.clone()))
        };
        // 4. A new active snapshot on it, and the record moved there.
        let c = self.container_locked(bot).await?;
        let key = active_snapshot_key(bot, nanos());
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut moved = c.clone();
        match &base {
            Some(b) => moved
                .labels
                .insert(LABEL_VERSION_BASE.to_string(), b.clone()),
            None => moved.labels.remove(LABEL_VERSION_BASE),
        };
        moved
            .labels
            .insert(LABEL_VERSION_CURRENT.to_string(), number.to_string());
        let mut active_labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_IMAGE.to_string(), c.image.clone()),
            (LABEL_GC_ROOT.to_string(), created),
        ]);
        if let Some(record) = record_label(&moved.labels) {
            active_labels.insert(LABEL_RECORD.to_string(), record);
        }
        // Marked, so recovery knows which of two states a rollback cut short left: the new
        // one while the record is not on it, the old one once it is.
        active_labels.insert(LABEL_ROLLBACK_NEW.to_string(), "1".to_string());
        rt.prepare_snapshot(&key, Some(&parent), &active_labels)
            .await?;
        rt.update_snapshot_labels(
            &c.snapshot_key,
            &HashMap::from([(LABEL_ROLLBACK_REPLACED.to_string(), key.clone())]),
        )
        .await?;
        fault("rollback-prepared");
        let next = self.next_version(bot, &c).await?;
        self.replace_container(&moved, &key, &parent, next, None)
            .await?;
        fault("rollback-moved");
        // 5. The old state is kept as a version: its active snapshot goes.
        if let Err(e) = rt.remove_snapshot(&c.snapshot_key).await {
            warn!(bot, error = %e, "could not remove the state rolled back from; recovery will");
        }
        if running {
            let c2 = self.container(bot).await?;
            self.start_locked(bot, &c2).await?;
        }
        info!(bot, number, "rolled back");
        Ok(Version {
            current: true,
            ..target
        })
    }

    /// Removes the active snapshots of `bot` other than `keep` (the one its record uses) that a
    /// rollback cut short left: the new one it prepared, or the old one it moved away from.
    /// Returns whether there were any.
    pub(super) async fn remove_stray_actives(
        &self,
        bot: &str,
        keep: &str,
    ) -> Result<bool, AgentError> {
        let rt = self.runtime().clone();
        let mut changed = false;
        for s in rt
            .list_snapshots(&[label_filter(LABEL_BOT_ID, Some(bot))])
            .await?
        {
            let replaced = s.labels.get(LABEL_ROLLBACK_REPLACED).map(String::as_str) == Some(keep);
            if s.kind == crate::containerd::SnapshotKind::Active
                && s.name != keep
                && version_of(&s).is_none()
                && (replaced || s.labels.contains_key(LABEL_ROLLBACK_NEW))
            {
                warn!(
                    bot,
                    key = s.name,
                    "removing a state an interrupted rollback left"
                );
                rt.remove_snapshot(&s.name).await?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Removes every version image of `bot` (its layers go with the last image using them).
    pub(super) async fn remove_version_images(&self, bot: &str) -> Result<(), AgentError> {
        for v in self.image_versions(bot, None).await? {
            self.runtime().delete_image(&v.image).await?;
        }
        Ok(())
    }

    /// Removes version image `image` of `bot`.
    pub(super) async fn remove_version_image(
        &self,
        bot: &str,
        number: u64,
        image: &str,
    ) -> Result<(), AgentError> {
        let c = self.container_locked(bot).await.ok();
        if c.as_ref()
            .and_then(|c| c.labels.get(LABEL_VERSION_BASE))
            .is_some_and(|b| b == image)
        {
            return Err(AgentError::FailedPrecondition(format!(
                "version {number} of bot {bot:?} is the parent of the bot's current state; \
                 roll back to another version first"
            )));
        }
        self.runtime().delete_image(image).await?;
        info!(bot, number, "version removed");
        Ok(())
    }

    /// Pushes version `number` of `bot` to registry reference `target`; returns the normalised
    /// reference and the manifest's digest.
    pub async fn push_version(
        &self,
        bot: &str,
        number: u64,
        target: &str,
        options: &PullOptions,
    ) -> Result<(String, String), AgentError> {
        let reference = crate::containerd::normalize_image_ref(target)?;
        let v = self
            .versions(bot)
            .await?
            .into_iter()
            .find(|v| v.number == number)
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("bot {bot:?} has no version {number}"))
            })?;
        if v.image.is_empty() {
            return Err(AgentError::FailedPrecondition(format!(
                "version {number} of bot {bot:?} was taken by the commit-based cycle and has no \
                 image; roll back to it and take a new version to push it"
            )));
        }
        let digest = self.runtime().push_image(&v.image, target, options).await?;
        info!(bot, number, reference, digest, "version pushed");
        Ok((reference, digest))
    }

    /// Pulls version image `from` and creates `bot` on it (its data included); the bot's
    /// versions list starts with that version, its origin recorded.
    pub async fn create_from(
        &self,
        bot: &str,
        from: &str,
        options: &PullOptions,
        limits: &super::limits::LimitsChange,
        spec: &super::spec::BotSpec,
    ) -> Result<super::BotInfo, AgentError> {
        ids::validate(bot)?;
        let name = self
            .runtime()
            .pull_image(from, options, &crate::containerd::no_progress)
            .await?;
        let info = self.create(bot, Some(&name), limits, spec).await?;
        let _g = self.lock_bot(bot).await;
        let c = self.container_locked(bot).await?;
        if !self.image_versions(bot, None).await?.is_empty() {
            return Ok(info); // a create retried: the origin is recorded already
        }
        let number = self.next_version(bot, &c).await?;
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_VERSION.to_string(), number.to_string()),
            (LABEL_VERSION_NAME.to_string(), format!("from {name}")),
            (LABEL_VERSION_SOURCE.to_string(), "pulled".to_string()),
            (LABEL_VERSION_CREATED.to_string(), created),
            (LABEL_VERSION_ORIGIN.to_string(), name.clone()),
            (LABEL_IMAGE.to_string(), name.clone()),
        ]);
        let version = version_image_name(bot, number);
        self.runtime().tag_image(&name, &version, &labels).await?;
        let record = HashMap::from([
            (LABEL_NEXT_VERSION.to_string(), (number + 1).to_string()),
            (LABEL_VERSION_CURRENT.to_string(), number.to_string()),
        ]);
        self.runtime()
            .update_container_labels(&c.id, &record)
            .await?;
        info!(bot, from = name, number, "bot created from a version image");
        Ok(info)
    }
}

/// How often a frozen bot's resume is tried before the cycle reports the failure.
const RESUME_ATTEMPTS: u32 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_image_names_are_references_and_distinct() {
        let a = version_image_name("a", 11);
        assert_eq!(a, "memoh.local/versions:a.v11");
        assert_ne!(version_image_name("a-1", 1), version_image_name("a", 11));
        assert_eq!(
            crate::containerd::normalize_image_ref(&version_image_name("Bot_1", 3)).unwrap(),
            version_image_name("Bot_1", 3)
        );
    }
}
