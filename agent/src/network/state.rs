//! What the agent keeps per bot so DEL works after the task died or the agent restarted:
//! `<state_dir>/cni/<bot>.json` with the exact network config and result of the last ADD.

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

#[cfg(test)]
mod tests {
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
