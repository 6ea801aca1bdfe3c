//! The bot's server from the host: the configured `server_binary` checked and put on the
//! bot's spec at every start with its run directory (see [`crate::containerd::spec::bridge`]).

use std::path::Path;

use oci_spec::runtime::Spec;

use super::Manager;
use crate::containerd::spec::bridge::{apply_server, check_server_binary, ServerMounts};
use crate::error::AgentError;
use crate::ids;

impl Manager {
    /// The host side of the bot's server mounts.
    pub(super) fn server_mounts(&self, bot: &str) -> ServerMounts {
        ServerMounts {
            binary: self.cfg.server_binary.clone(),
            run_dir: ids::run_dir(&self.cfg.state_dir, &self.cfg.namespace, bot),
        }
    }

    /// Before a start: checks the server binary (a missing or non-executable one fails the
    /// start, naming it), makes the bot's run directory (0750, owned by the bot's user) and
    /// puts both on `spec`. Returns whether `spec` changed.
    pub(super) async fn prepare_server(
        &self,
        bot: &str,
        spec: &mut Spec,
    ) -> Result<bool, AgentError> {
        let m = self.server_mounts(bot);
        let owner = spec
            .process()
            .as_ref()
            .map(|p| (p.user().uid(), p.user().gid()))
            .unwrap_or((0, 0));
        let (binary, dir) = (m.binary.clone(), m.run_dir.clone());
        tokio::task::spawn_blocking(move || {
            check_server_binary(&binary).map_err(|why| {
                AgentError::FailedPrecondition(format!(
                    "server binary {}: {why} (server_binary in agent.toml)",
                    binary.display()
                ))
            })?;
            make_run_dir(&dir, owner)
        })
        .await
        .map_err(|e| AgentError::io(&m.run_dir, std::io::Error::other(e)))??;
        apply_server(spec, &m)
    }

    /// Removes the bot's run directory; a missing one is fine.
    pub(super) async fn remove_run_dir(&self, bot: &str) -> Result<(), AgentError> {
        let dir = ids::run_dir(&self.cfg.state_dir, &self.cfg.namespace, bot);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::io(&dir, e)),
        }
    }
}

/// Makes `dir` (and its parents, 0750) with mode 0750 owned by `owner`. A symlink in its
/// place is refused (the directory is the host's, but its contents are the bot's).
fn make_run_dir(dir: &Path, owner: (u32, u32)) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|e| AgentError::io(dir, e))?;
    let md = std::fs::symlink_metadata(dir).map_err(|e| AgentError::io(dir, e))?;
    if !md.is_dir() {
        return Err(AgentError::FailedPrecondition(format!(
            "{}: the bot's run directory is not a directory",
            dir.display()
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .map_err(|e| AgentError::io(dir, e))?;
    // Only root can give it away (the agent runs as root; unit tests may not).
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(dir, Some(owner.0), Some(owner.1))
            .map_err(|e| AgentError::io(dir, e))?;
    }
    Ok(())
}
