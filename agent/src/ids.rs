//! Bot ids and the names derived from them (fixed by DESIGN.md).

use std::path::{Path, PathBuf};

use crate::error::AgentError;

/// Label carrying the bot id on containers and snapshots.
pub const LABEL_BOT_ID: &str = "mcp.bot_id";
/// Label with the desired state of a bot's container (`running` or `stopped`): what the agent
/// restores after a crash or a restart.
pub const LABEL_DESIRED: &str = "memoh.desired";
/// Label naming the image reference a bot was created from.
pub const LABEL_IMAGE: &str = "memoh.image";
/// Label on a bot's container naming the parent of its active snapshot (the image's top layer
/// or a version): where recovery puts the bot when containerd loses that snapshot.
pub const LABEL_SNAPSHOT_PARENT: &str = "memoh.snapshot.parent";
/// Label on a bot's container recording that containerd once lost its state (when, what was
/// lost, what the bot runs on since). Shown by `bot inspect` as `lost_state`.
pub const LABEL_LOST_STATE: &str = "memoh.lost-state";

/// Longest bot id accepted.
pub const MAX_BOT_ID_LEN: usize = 128;

/// Checks a bot id against `[-_a-zA-Z0-9]+`.
pub fn validate(bot: &str) -> Result<(), AgentError> {
    if !bot.is_empty()
        && bot.len() <= MAX_BOT_ID_LEN
        && bot
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        Ok(())
    } else {
        Err(AgentError::InvalidBotId(bot.to_string()))
    }
}

/// The containerd container id of a bot: `mcp-<bot>`.
pub fn container_id(bot: &str) -> String {
    format!("mcp-{bot}")
}

/// The bot id of a container id, if it is one of ours.
pub fn bot_of_container(id: &str) -> Option<&str> {
    id.strip_prefix("mcp-").filter(|b| validate(b).is_ok())
}

/// The agent's per-bot state directory.
pub fn bot_dir(state_dir: &Path, bot: &str) -> PathBuf {
    state_dir.join("bots").join(bot)
}

/// The bot server's log file (its stdout and stderr).
pub fn log_path(state_dir: &Path, bot: &str) -> PathBuf {
    bot_dir(state_dir, bot).join("server.log")
}

/// The file holding the bearer token of the bot's current container.
pub fn token_path(state_dir: &Path, bot: &str) -> PathBuf {
    bot_dir(state_dir, bot).join("token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bot_ids() {
        for ok in ["a", "bot-1", "B_2", "x".repeat(128).as_str()] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "..", "é", "a.b", "x".repeat(129).as_str()] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
        assert_eq!(container_id("b1"), "mcp-b1");
        assert_eq!(bot_of_container("mcp-b1"), Some("b1"));
        assert_eq!(bot_of_container("other"), None);
        assert_eq!(bot_of_container("mcp-a b"), None);
    }
}
