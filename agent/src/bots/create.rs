//! Creating a bot (and undoing a create that failed) and deleting one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::containerd::spec::{build_spec, BindMount, SpecOptions, HOST_RESOLV_CONF};
use crate::containerd::{label_filter, ContainerInfo, NewContainer, TaskState};
use crate::error::AgentError;
use crate::ids::{self, LABEL_BOT_ID, LABEL_DESIRED, LABEL_IMAGE, LABEL_SNAPSHOT_PARENT};

use super::fault::fault;
use super::limits::LimitsChange;
use super::spec::{resolv_conf, BotSpec};
use super::{
    deleting, lock, BotInfo, Manager, DESIRED_DELETED, DESIRED_DELETED_KEEP_VERSIONS, TOKEN_MOUNT,
};

/// A random token from the kernel's generator, hex encoded.
pub(crate) fn new_token() -> Result<String, AgentError> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| AgentError::io("/dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Manager {
    /// Creates the bot's container from `image` (the configured default when `None`) and starts
    /// it; returns once its server answers. A leftover container or snapshot of the bot is
    /// reused, never discarded: a stopped one is started, a running one with the same image is
    /// the answer (create is idempotent), one with another image is [`AgentError::BotConflict`].
    /// `limits` changes the configured defaults for this bot; asking an existing bot for other
    /// limits than it has is refused (that is `bot update`). `spec` (environment, DNS,
    /// hostname, mounts) is the bot's for good: its mounts' host directories must lie under
    /// the configured `mount_allowed`, and asking an existing bot for another spec is a
    /// conflict.
    pub async fn create(
        &self,
        bot: &str,
        image: Option<&str>,
        limits: &LimitsChange,
        spec: &BotSpec,
    ) -> Result<BotInfo, AgentError> {
        ids::validate(bot)?;
        let mut steps = crate::steps::Steps::start();
        let wanted = self.cfg.bot_defaults.limits().with(limits).check()?;
        spec.check()?;
        let spec = {
            let (s, allowed) = (spec.clone(), self.cfg.mount_allowed.clone());
            tokio::task::spawn_blocking(move || s.resolve_mounts(&allowed))
                .await
                .map_err(|e| AgentError::io("mount check", std::io::Error::other(e)))??
        };
        let _g = self.lock_bot(bot).await;
        steps.mark("lock");
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
        let image = image
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.cfg.image)
            .to_string();
        if let Some(c) = existing {
            // Create is idempotent: a retry after a lost connection (the first create may have
            // finished after the caller gave up) finds the bot as asked and succeeds. A bot of
            // that id with another image is a conflict, never silently replaced.
            let want = crate::containerd::reference::normalize_image_ref(&image)?;
            if let Some(have) = c.labels.get(LABEL_IMAGE).filter(|have| **have != want) {
                return Err(AgentError::BotConflict {
                    bot: bot.to_string(),
                    have: have.clone(),
                    want,
                });
            }
            let have_spec = BotSpec::from_labels(&c.labels)?;
            if have_spec != spec {
                return Err(AgentError::FailedPrecondition(format!(
                    "bot {bot:?} already exists with another spec (env, dns, hostname or \
                     mounts); delete it to create it anew"
                )));
            }
            let have = self.limits_of(&c);
            if have.with(limits) != have {
                return Err(AgentError::FailedPrecondition(format!(
                    "bot {bot:?} already exists with limits {have}; change them with `bot update`"
                )));
            }
            let st = self.rt.task_status(&cid).await?;
            if st.as_ref().is_some_and(|s| s.state == TaskState::Running) {
                info!(
                    bot,
                    "create of a running bot with the same image: nothing to do"
                );
                return self.info(bot).await;
            }
            info!(bot, "container exists without a running task; starting it");
            self.set_desired(bot, "running").await?;
            self.start_locked(bot, &c).await?;
            return self.info(bot).await;
        }
        steps.mark("lookup");
        let resolved = self.rt.ensure_unpacked(&image).await?;
        steps.mark("image");
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
        steps.mark("snapshot");
        fault("create");
        let mut record_labels = wanted.labels();
        record_labels.extend(spec.labels());
        let c = match self
            .create_container_record(
                bot,
                &resolved.name,
                &resolved.config,
                &snapshot_key,
                parent.as_deref(),
                &record_labels,
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
        steps.mark("record");
        if let Err(e) = self.start_locked(bot, &c).await {
            warn!(bot, error = %e, "start after create failed; the container is kept");
            return Err(e);
        }
        steps.mark("start");
        self.migrate_in_background(bot);
        let info = self.info(bot).await;
        steps.mark("info");
        debug!(bot, total_ms = steps.total_ms(), %steps, "create steps");
        info
    }

    /// A create that failed before its container record: the bot does not exist, so what the
    /// create made goes too (`snapshot`, when it prepared it, and the bot's state directory).
    /// Only when containerd confirms there is no record: the call that failed may have made it
    /// (then the bot exists and reconcile starts it). When containerd cannot answer, the next
    /// recovery pass does this ([`Manager::recover`]).
    pub(super) async fn undo_create(&self, bot: &str, snapshot: Option<&str>) {
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

    /// Removes the agent's state directory of `bot` (its token) and its run directory; a
    /// missing one is fine.
    pub(super) async fn remove_bot_dir(&self, bot: &str) -> Result<(), AgentError> {
        self.remove_run_dir(bot).await?;
        let dir = ids::bot_dir(&self.cfg.state_dir, bot);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::io(&dir, e)),
        }
    }

    /// Writes a fresh token and the bot's resolv.conf and creates the container record
    /// (runtime spec, labels) on `snapshot_key`, whose parent is `parent`. The bot spec
    /// recorded in `extra_labels` ([`BotSpec::from_labels`]) goes on the runtime spec, its
    /// mounts checked against `mount_allowed` again (a directory since disallowed is refused).
    pub(super) async fn create_container_record(
        &self,
        bot: &str,
        image: &str,
        image_config: &crate::containerd::ImageConfig,
        snapshot_key: &str,
        parent: Option<&str>,
        extra_labels: &HashMap<String, String>,
    ) -> Result<ContainerInfo, AgentError> {
        let cid = ids::container_id(bot);
        let bot_spec = {
            let (s, allowed) = (
                BotSpec::from_labels(extra_labels)?,
                self.cfg.mount_allowed.clone(),
            );
            tokio::task::spawn_blocking(move || s.resolve_mounts(&allowed))
                .await
                .map_err(|e| AgentError::io("mount check", std::io::Error::other(e)))??
        };
        let dir = ids::bot_dir(&self.cfg.state_dir, bot);
        let token = new_token()?;
        let token_path = ids::token_path(&self.cfg.state_dir, bot);
        {
            let (d, p, t) = (dir.clone(), token_path.clone(), token.clone());
            tokio::task::spawn_blocking(move || write_private(&d, &p, &t))
                .await
                .map_err(|e| AgentError::io(&dir, std::io::Error::other(e)))??;
        }
        let resolv = self.write_resolv_conf(bot, &bot_spec).await?;
        let netns = self.net.netns_path(bot);
        let mut opts = SpecOptions::new(&cid, bot_spec.hostname_of(bot)).with_host_files();
        opts.resolv_conf = Some(resolv);
        opts.netns_path = Some(netns);
        opts.cgroups_path = Some(ids::cgroup_path(&self.cfg.namespace, bot));
        // runc cannot raise a limit above the hard limit it inherits from containerd.
        opts.nofile = opts.nofile.min(host_nofile_limit());
        // The bot's environment after the image's, the agent's own last; a TZ of the bot's
        // own wins over the host's.
        opts.extra_env = bot_spec.env.clone();
        if bot_spec.env.iter().any(|(k, _)| k == "TZ") {
            opts.host_tz = None;
        }
        opts.extra_env
            .push(("MCP_AUTH_TOKEN_FILE".into(), TOKEN_MOUNT.into()));
        opts.extra_mounts.push(BindMount {
            source: token_path,
            destination: PathBuf::from(TOKEN_MOUNT),
            readonly: true,
        });
        opts.extra_mounts.extend(bot_spec.bind_mounts());
        opts.server = Some(self.server_mounts(bot));
        let spec = build_spec(image_config, &opts)?;
        let mut labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.to_string()),
            (LABEL_DESIRED.to_string(), "running".to_string()),
            (LABEL_IMAGE.to_string(), image.to_string()),
        ]);
        if let Some(p) = parent {
            labels.insert(LABEL_SNAPSHOT_PARENT.to_string(), p.to_string());
        }
        labels.extend(extra_labels.clone());
        // The spec as applied (its mounts' host directories as resolved now).
        labels.extend(bot_spec.labels());
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

    /// Writes the bot's resolv.conf (`<state_dir>/bots/BOT/resolv.conf`, bound read-only at
    /// `/etc/resolv.conf`) from its spec, or from the host's with loopback resolvers replaced
    /// by `dns_fallback`; returns its path. Done at every record build and every start, so a
    /// bot follows the host's resolvers.
    pub(super) async fn write_resolv_conf(
        &self,
        bot: &str,
        spec: &BotSpec,
    ) -> Result<PathBuf, AgentError> {
        let host = match tokio::fs::read_to_string(HOST_RESOLV_CONF).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(AgentError::io(HOST_RESOLV_CONF, e)),
        };
        let text = resolv_conf(spec, &host, &self.cfg.dns_fallback);
        let dir = ids::bot_dir(&self.cfg.state_dir, bot);
        let path = dir.join(RESOLV_CONF_FILE);
        let p = path.clone();
        tokio::task::spawn_blocking(move || write_readable(&dir, &p, &text))
            .await
            .map_err(|e| AgentError::io(&path, std::io::Error::other(e)))??;
        Ok(path)
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

    /// The delete itself; the caller holds the bot's lock and has marked the record. The
    /// container record goes last, so every earlier step is retried after a crash.
    pub(super) async fn delete_locked(
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

    /// Removes the bot's active snapshot and (unless `keep_versions`) its version images and
    /// every snapshot labelled with the bot, children before parents.
    pub(super) async fn remove_snapshots(
        &self,
        bot: &str,
        active: &str,
        keep_versions: bool,
    ) -> Result<(), AgentError> {
        self.rt.remove_snapshot(active).await?;
        if keep_versions {
            return Ok(());
        }
        self.remove_version_images(bot).await?;
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
}

/// The hard `RLIMIT_NOFILE` of this process (containerd normally runs with the same or more).
pub(super) fn host_nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024)
}

/// Name of a bot's resolv.conf in its state directory.
pub const RESOLV_CONF_FILE: &str = "resolv.conf";

/// Writes `content` to `path` (mode 0600) inside `dir` (created 0700).
pub(crate) fn write_private(
    dir: &std::path::Path,
    path: &std::path::Path,
    content: &str,
) -> Result<(), AgentError> {
    write_file(dir, path, content, 0o600)
}

/// Writes `content` to `path` (mode 0644: a bot's processes of any user read it) inside `dir`
/// (created 0700).
fn write_readable(
    dir: &std::path::Path,
    path: &std::path::Path,
    content: &str,
) -> Result<(), AgentError> {
    write_file(dir, path, content, 0o644)
}

/// Writes `content` to `path` with `mode` through a temporary file and a rename.
fn write_file(
    dir: &std::path::Path,
    path: &std::path::Path,
    content: &str,
    mode: u32,
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
        .mode(mode)
        .open(&tmp)
        .map_err(|e| AgentError::io(&tmp, e))?;
    f.write_all(content.as_bytes())
        .map_err(|e| AgentError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| AgentError::io(path, e))
}
