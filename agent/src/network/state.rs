//! What the agent keeps per bot so DEL works after the task died or the agent restarted:
//! `<state_dir>/cni/<bot>.json` with the exact network config and result of the last ADD.
//! And the address a detached bot had (`<state_dir>/bots/<bot>/address`), which it asks for
//! again at its next attach: a stopped bot keeps its address, so callers and the platform's
//! view of it stay valid.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::AgentError;

/// Format version of the saved file.
const VERSION: u32 = 1;

/// One bot's saved attachment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Saved {
    /// Format version.
    pub version: u32,
    /// The bot.
    pub bot: String,
    /// `CNI_CONTAINERID` used.
    pub container_id: String,
    /// `CNI_NETNS` used.
    pub netns: PathBuf,
    /// `CNI_IFNAME` used.
    pub ifname: String,
    /// The network (conflist form) the bot was attached with.
    pub config: Value,
    /// The raw result of the ADD, the `prevResult` of CHECK and DEL.
    pub result: Value,
}

impl Saved {
    pub fn new(
        bot: &str,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        config: Value,
        result: Value,
    ) -> Self {
        Self {
            version: VERSION,
            bot: bot.to_string(),
            container_id: container_id.to_string(),
            netns: netns.to_path_buf(),
            ifname: ifname.to_string(),
            config,
            result,
        }
    }
}

/// `<state_dir>/cni/<bot>.json` ([`crate::ids::cni_state_path`]).
pub(crate) fn path(state_dir: &Path, bot: &str) -> PathBuf {
    crate::ids::cni_state_path(state_dir, bot)
}

/// Reads a bot's saved attachment. `Ok(None)`: none. `Ok(Some(Err(reason)))`: a file that
/// cannot be used (the caller decides how to recover).
pub(crate) async fn load(
    state_dir: &Path,
    bot: &str,
) -> Result<Option<Result<Saved, String>>, AgentError> {
    let p = path(state_dir, bot);
    match tokio::fs::read(&p).await {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice::<Saved>(&bytes)
                .map_err(|e| format!("{}: {e}", p.display()))
                .and_then(|s| {
                    if s.version == VERSION && s.bot == bot {
                        Ok(s)
                    } else {
                        Err(format!(
                            "{}: version {} for bot {:?} is not this agent's",
                            p.display(),
                            s.version,
                            s.bot
                        ))
                    }
                }),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(p, e)),
    }
}

/// Every usable saved attachment in `state_dir` (files that cannot be used are skipped with a
/// warning: they name no attachment the agent could act on).
pub(crate) async fn load_all(state_dir: &Path) -> Result<Vec<Saved>, AgentError> {
    let dir = state_dir.join("cni");
    let mut entries = match tokio::fs::read_dir(&dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AgentError::io(dir, e)),
    };
    let mut bots = Vec::new();
    while let Some(e) = entries
        .next_entry()
        .await
        .map_err(|e| AgentError::io(&dir, e))?
    {
        let name = e.file_name();
        let Some(bot) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        bots.push(bot.to_string());
    }
    bots.sort();
    let mut out = Vec::with_capacity(bots.len());
    for bot in bots {
        match load(state_dir, &bot).await? {
            Some(Ok(s)) => out.push(s),
            Some(Err(reason)) => {
                tracing::warn!(bot, %reason, "skipping unusable saved network state")
            }
            None => {}
        }
    }
    Ok(out)
}

/// Writes a bot's attachment atomically (temp file, fsync, rename).
pub(crate) async fn save(state_dir: &Path, saved: &Saved) -> Result<(), AgentError> {
    let p = path(state_dir, &saved.bot);
    let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
    let bytes = serde_json::to_vec_pretty(saved).map_err(|e| AgentError::Network {
        op: format!("save network state of {}", saved.bot),
        reason: e.to_string(),
    })?;
    tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
        use std::io::Write;
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
        let tmp = p.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| AgentError::io(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| AgentError::io(&tmp, e))?;
        f.sync_all().map_err(|e| AgentError::io(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| AgentError::io(&p, e))
    })
    .await
    .map_err(|e| AgentError::Network {
        op: "save network state".into(),
        reason: e.to_string(),
    })?
}

/// Removes a bot's saved attachment; a missing one is fine.
pub(crate) async fn remove(state_dir: &Path, bot: &str) -> Result<(), AgentError> {
    let p = path(state_dir, bot);
    match tokio::fs::remove_file(&p).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(p, e)),
    }
}

/// The file in a bot's state directory holding the address it had when last detached.
pub(crate) const ADDRESS_FILE: &str = "address";

fn address_path(state_dir: &Path, bot: &str) -> PathBuf {
    crate::ids::bot_dir(state_dir, bot).join(ADDRESS_FILE)
}

/// Remembers `ip` as the address of detached bot `bot`, when the bot's state directory exists
/// (a bot the agent does not know gets none made); failures are only logged (the bot then
/// takes whatever address is free next time).
pub(crate) async fn remember_address(state_dir: &Path, bot: &str, ip: std::net::IpAddr) {
    let p = address_path(state_dir, bot);
    let tmp = p.with_extension("tmp");
    let r = async {
        tokio::fs::write(&tmp, format!("{ip}\n")).await?;
        tokio::fs::rename(&tmp, &p).await
    }
    .await;
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(bot, %ip, error = %e, "cannot remember the bot's address; it may get another")
        }
    }
}

/// The address detached bot `bot` had, when one was remembered.
pub(crate) async fn remembered_address(state_dir: &Path, bot: &str) -> Option<std::net::IpAddr> {
    tokio::fs::read_to_string(address_path(state_dir, bot))
        .await
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_detached_bots_address_is_remembered_only_for_a_known_bot() {
        let dir = tempfile::tempdir().unwrap();
        let ip: std::net::IpAddr = "10.88.0.7".parse().unwrap();
        // No state directory: an unknown bot, nothing is made.
        remember_address(dir.path(), "ghost", ip).await;
        assert!(!crate::ids::bot_dir(dir.path(), "ghost").exists());
        assert_eq!(remembered_address(dir.path(), "ghost").await, None);
        std::fs::create_dir_all(crate::ids::bot_dir(dir.path(), "a")).unwrap();
        remember_address(dir.path(), "a", ip).await;
        assert_eq!(remembered_address(dir.path(), "a").await, Some(ip));
        std::fs::write(address_path(dir.path(), "a"), "junk").unwrap();
        assert_eq!(remembered_address(dir.path(), "a").await, None);
    }

    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), "a").await.unwrap().is_none());
        let s = Saved::new(
            "a",
            "mcp-a",
            Path::new("/run/netns/memoh-a"),
            "eth0",
            json!({"name": "n"}),
            json!({"ips": []}),
        );
        save(dir.path(), &s).await.unwrap();
        assert_eq!(load(dir.path(), "a").await.unwrap().unwrap().unwrap(), s);

        std::fs::write(path(dir.path(), "b"), "{").unwrap();
        assert!(load(dir.path(), "b").await.unwrap().unwrap().is_err());
        // A file renamed to another bot's name is not trusted.
        std::fs::copy(path(dir.path(), "a"), path(dir.path(), "c")).unwrap();
        assert!(load(dir.path(), "c").await.unwrap().unwrap().is_err());

        // Only usable files are listed.
        let all = load_all(dir.path()).await.unwrap();
        assert_eq!(all, vec![s.clone()]);

        remove(dir.path(), "a").await.unwrap();
        remove(dir.path(), "a").await.unwrap();
        assert!(load(dir.path(), "a").await.unwrap().is_none());
        assert!(load_all(dir.path()).await.unwrap().is_empty());
        assert!(load_all(&dir.path().join("none")).await.unwrap().is_empty());
    }
}
