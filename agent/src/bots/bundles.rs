//! Task bundles a killed containerd left half-deleted.
//!
//! containerd 1.6 deletes a task's bundle (`STATE/io.containerd.runtime.v2.task/NS/ID`) by
//! renaming it to `.ID` and then removing that. Killed in between, it leaves `.ID` behind;
//! every later delete of the bundle then fails to rename ("file exists"), the bundle stays,
//! and every later task create fails with "mkdir .../ID: file exists": the bot can never run
//! again until someone removes them. `doctor` reports such leftovers; the agent removes those
//! of its own bots itself, before it creates their task, when containerd has no task for the
//! container (so nothing of it is in use).

use std::path::{Path, PathBuf};

use tracing::warn;

use super::Manager;
use crate::error::AgentError;

/// The bundle directory of container `cid` and its half-deleted twin.
fn bundle_paths(state: &Path, namespace: &str, cid: &str) -> (PathBuf, PathBuf) {
    let dir = state.join("io.containerd.runtime.v2.task").join(namespace);
    (dir.join(cid), dir.join(format!(".{cid}")))
}

/// Mount points at or under `dir`, deepest first, from `/proc/self/mountinfo`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes spaces and the like as octal; bundle paths have none.
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// Unmounts what is mounted under `dir` (the rootfs) and removes it.
fn remove_bundle(dir: &Path) -> Result<(), AgentError> {
    for m in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            warn!(mount = %m.display(), error = %e, "unmounting under a stale bundle failed");
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(dir, e)),
    }
}

impl Manager {
    /// Removes the bundle of `cid` and its half-deleted twin when containerd left the twin
    /// behind. Call only while containerd has no task for `cid` and the bot's lock is held.
    pub(super) async fn clear_stale_bundle(&self, bot: &str, cid: &str) -> Result<(), AgentError> {
        let (bundle, hidden) = bundle_paths(&self.cfg.containerd_state, &self.cfg.namespace, cid);
        if !hidden.is_dir() {
            return Ok(());
        }
        let (b, h) = (bundle.clone(), hidden.clone());
        tokio::task::spawn_blocking(move || {
            remove_bundle(&h)?;
            remove_bundle(&b)
        })
        .await
        .map_err(|e| AgentError::io(&hidden, std::io::Error::other(e)))??;
        warn!(
            bot,
            bundle = %bundle.display(),
            "removed a task bundle a killed containerd left half-deleted (the bot could not start)"
        );
        crate::metrics::global().stale_bundle_removed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_paths_follow_containerds_layout() {
        let (b, h) = bundle_paths(Path::new("/run/containerd"), "default", "mcp-a");
        assert_eq!(
            b,
            Path::new("/run/containerd/io.containerd.runtime.v2.task/default/mcp-a")
        );
        assert_eq!(
            h,
            Path::new("/run/containerd/io.containerd.runtime.v2.task/default/.mcp-a")
        );
    }

    #[test]
    fn a_bundle_without_mounts_is_removed_and_a_missing_one_is_fine() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join(".mcp-a");
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        std::fs::write(b.join("config.json"), "{}").unwrap();
        assert!(mounts_under(&b).is_empty());
        remove_bundle(&b).unwrap();
        assert!(!b.exists());
        remove_bundle(&b).unwrap();
    }
}
