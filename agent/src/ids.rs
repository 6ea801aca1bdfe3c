//! Bot ids and every name derived from them (fixed by DESIGN.md); the one place that spells
//! them, the rest of the agent calls these functions.
//!
//! - the bot id rule ([`validate`]) and the labels on a bot's container;
//! - per bot: the container id `mcp-<bot>` (also the CNI container id), the network namespace
//!   `memoh-<ns>.<bot>`, the cgroup `/memoh/<ns>/mcp-<bot>`, the state paths under the
//!   agent's state dir;
//! - per agent: the nftables table `memoh-<ns>`.
//!
//! `<ns>` is the agent's containerd namespace, so two agents on one host never share a name.
//! Namespaces may hold `.`, bot ids never do: in `memoh-<ns>.<bot>` the bot is what follows the
//! last `.`, and no two (namespace, bot) pairs give the same name. Bots an older agent created
//! carry the names without the namespace ([`legacy_netns_name`], [`legacy_cgroup_path`]) in
//! their container's spec until their next start ([`rename_in_spec`]).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

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

/// Prefix of every network namespace and nftables table the agent names.
pub const NAME_PREFIX: &str = "memoh-";

/// The network namespace of bot `bot` of the agent in containerd namespace `namespace`:
/// `memoh-<namespace>.<bot>` (at most 6 + 76 + 1 + 128 = 211 bytes, a valid file name).
pub fn netns_name(namespace: &str, bot: &str) -> String {
    format!("{NAME_PREFIX}{namespace}.{bot}")
}

/// The bot whose namespace (of the agent in `namespace`) is `name`, if it is one.
pub fn bot_of_netns<'a>(namespace: &str, name: &'a str) -> Option<&'a str> {
    name.strip_prefix(NAME_PREFIX)?
        .strip_prefix(namespace)?
        .strip_prefix('.')
        .filter(|b| validate(b).is_ok())
}

/// The namespace name an older agent gave bot `bot`: `memoh-<bot>`, the same in every
/// containerd namespace.
pub fn legacy_netns_name(bot: &str) -> String {
    format!("{NAME_PREFIX}{bot}")
}

/// The bot of an older agent's namespace name `memoh-<bot>`, if `name` is one (new names
/// always hold a `.`, bot ids never do).
pub fn bot_of_legacy_netns(name: &str) -> Option<&str> {
    name.strip_prefix(NAME_PREFIX)
        .filter(|b| validate(b).is_ok())
}

/// The cgroup of bot `bot` of the agent in `namespace`: `/memoh/<namespace>/mcp-<bot>`.
pub fn cgroup_path(namespace: &str, bot: &str) -> String {
    format!("/memoh/{namespace}/{}", container_id(bot))
}

/// The cgroup an older agent gave bot `bot`: `/memoh/mcp-<bot>`.
pub fn legacy_cgroup_path(bot: &str) -> String {
    format!("/memoh/{}", container_id(bot))
}

/// The name of the agent's nftables tables (one per family): `memoh-<namespace>`.
pub fn table_name(namespace: &str) -> String {
    format!("{NAME_PREFIX}{namespace}")
}

/// The network namespace path recorded in a container's spec, if it names one.
pub fn recorded_netns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// Puts today's names in a container spec: the network namespace at `netns` (when the spec
/// has a network namespace with a path) and the cgroup `cgroup`. Returns whether anything
/// changed, so a record an older agent wrote moves to today's names before its task starts.
pub fn rename_in_spec(spec: &mut Spec, netns: &Path, cgroup: &str) -> bool {
    let Some(linux) = spec.linux_mut().as_mut() else {
        return false;
    };
    let mut changed = false;
    if let Some(namespaces) = linux.namespaces_mut().as_mut() {
        for n in namespaces
            .iter_mut()
            .filter(|n| n.typ() == LinuxNamespaceType::Network)
        {
            if n.path().as_ref().is_some_and(|p| p != netns) {
                n.set_path(Some(netns.to_path_buf()));
                changed = true;
            }
        }
    }
    if linux.cgroups_path().as_ref().and_then(|p| p.to_str()) != Some(cgroup) {
        linux.set_cgroups_path(Some(PathBuf::from(cgroup)));
        changed = true;
    }
    changed
}

/// The agent's per-bot state directory.
pub fn bot_dir(state_dir: &Path, bot: &str) -> PathBuf {
    state_dir.join("bots").join(bot)
}

/// The bot server's log file (its stdout and stderr).
pub fn log_path(state_dir: &Path, bot: &str) -> PathBuf {
    bot_dir(state_dir, bot).join("server.log")
}

/// The host directory bound at `/run/memoh` in the bot: `<state_dir>/run/<ns>/<bot>`.
pub fn run_dir(state_dir: &Path, namespace: &str, bot: &str) -> PathBuf {
    state_dir.join("run").join(namespace).join(bot)
}

/// The file holding the bearer token of the bot's current container.
pub fn token_path(state_dir: &Path, bot: &str) -> PathBuf {
    bot_dir(state_dir, bot).join("token")
}

/// The file holding what CNI DEL needs of the bot's attachment: `<state_dir>/cni/<bot>.json`.
pub fn cni_state_path(state_dir: &Path, bot: &str) -> PathBuf {
    state_dir.join("cni").join(format!("{bot}.json"))
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

    /// A name usable as one file name (`NAME_MAX`, no separator).
    fn is_file_name(name: &str) -> bool {
        name.len() <= 255 && !name.contains('/') && name != "." && name != ".."
    }

    #[test]
    fn netns_names_never_collide_across_namespaces() {
        let namespaces = ["default", "a", "a.b", "a-b", "a_b", "b", "memoh", "x.y.z"];
        let bots = ["b", "b.c", "a", "c", "x-1", "y_2", "memoh-a"];
        let mut seen = std::collections::HashMap::new();
        for ns in namespaces {
            for bot in bots.iter().filter(|b| validate(b).is_ok()) {
                let name = netns_name(ns, bot);
                assert!(is_file_name(&name), "{name}");
                if let Some(prev) = seen.insert(name.clone(), (ns, *bot)) {
                    panic!("{name} names both {prev:?} and {:?}", (ns, bot));
                }
                // Each agent finds its own bots, and only them.
                for other in namespaces {
                    let found = bot_of_netns(other, &name);
                    if other == ns {
                        assert_eq!(found, Some(*bot), "{other} {name}");
                    } else {
                        assert_eq!(found, None, "{other} {name}");
                    }
                }
                assert_eq!(bot_of_legacy_netns(&name), None, "{name}");
                let cg = cgroup_path(ns, bot);
                assert!(seen.insert(cg.clone(), (ns, *bot)).is_none(), "{cg}");
            }
        }
        // The longest names still make a valid file name.
        let long = netns_name(&"n".repeat(76), &"b".repeat(MAX_BOT_ID_LEN));
        assert!(is_file_name(&long), "{}", long.len());
        assert_eq!(netns_name("default", "b1"), "memoh-default.b1");
        assert_eq!(cgroup_path("default", "b1"), "/memoh/default/mcp-b1");
        assert_eq!(table_name("default"), "memoh-default");
    }

    #[test]
    fn legacy_names() {
        assert_eq!(legacy_netns_name("b1"), "memoh-b1");
        assert_eq!(bot_of_legacy_netns("memoh-b1"), Some("b1"));
        assert_eq!(bot_of_legacy_netns("memoh-default.b1"), None);
        assert_eq!(bot_of_legacy_netns("other"), None);
        assert_eq!(legacy_cgroup_path("b1"), "/memoh/mcp-b1");
        assert_eq!(bot_of_netns("default", "memoh-b1"), None);
        assert_eq!(bot_of_netns("default", "memoh-default."), None);
    }

    #[test]
    fn an_old_spec_moves_to_todays_names() {
        use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, SpecBuilder};
        let spec = |netns: &str, cgroup: &str| {
            SpecBuilder::default()
                .linux(
                    LinuxBuilder::default()
                        .namespaces(vec![
                            LinuxNamespaceBuilder::default()
                                .typ(LinuxNamespaceType::Mount)
                                .build()
                                .unwrap(),
                            LinuxNamespaceBuilder::default()
                                .typ(LinuxNamespaceType::Network)
                                .path(netns)
                                .build()
                                .unwrap(),
                        ])
                        .cgroups_path(cgroup)
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap()
        };
        let mut old = spec("/run/netns/memoh-b1", "/memoh/mcp-b1");
        assert_eq!(
            recorded_netns(&old).as_deref(),
            Some(Path::new("/run/netns/memoh-b1"))
        );
        let new_ns = Path::new("/run/netns/memoh-default.b1");
        assert!(rename_in_spec(&mut old, new_ns, "/memoh/default/mcp-b1"));
        assert_eq!(
            old,
            spec("/run/netns/memoh-default.b1", "/memoh/default/mcp-b1")
        );
        assert!(!rename_in_spec(&mut old, new_ns, "/memoh/default/mcp-b1"));
    }
}
