//! Checks of containerd's state on the host: task bundles a killed containerd left
//! half-deleted.

use super::{Check, Host, Status};
use crate::config::Config;

/// containerd 1.6 deletes a task bundle by renaming `<state>/io.containerd.runtime.v2.task/NS/ID`
/// to `.ID`, then removing that. Killed in between, it leaves `.ID`; every later delete of that
/// bundle then fails to rename and every later task create of the container fails ("file
/// exists"): that bot cannot start until `.ID` is gone.
///
/// A `containerd_state` that does not exist while containerd answers is a wrong path (containerd
/// creates its state directory when it starts): a warning, since the check sees nothing there.
pub(super) fn task_bundles(
    cfg: &Config,
    config_path: &str,
    containerd_answers: bool,
    host: &dyn Host,
) -> Check {
    let dir = cfg
        .containerd_state
        .join("io.containerd.runtime.v2.task")
        .join(&cfg.namespace);
    let Some(names) = host.subdirs(&dir) else {
        if host.subdirs(&cfg.containerd_state).is_some() {
            return Check::ok(
                "task bundles",
                format!("{} holds no bundles yet", dir.display()),
            );
        }
        if !containerd_answers {
            return Check::ok(
                "task bundles",
                "not checked: containerd does not answer".to_string(),
            );
        }
        return Check::bad(
            "task bundles",
            Status::Warn,
            format!(
                "{} does not exist although containerd answers: containerd keeps its state \
                 elsewhere, so half-deleted task bundles cannot be found",
                cfg.containerd_state.display()
            ),
            format!(
                "set containerd_state in {config_path} to the state directory that \
                 `containerd config dump | grep '^state'` names"
            ),
        );
    };
    let stale: Vec<String> = names.into_iter().filter(|n| n.starts_with('.')).collect();
    if stale.is_empty() {
        return Check::ok(
            "task bundles",
            format!("no half-deleted bundle in {}", dir.display()),
        );
    }
    let bots: Vec<&str> = stale
        .iter()
        .filter_map(|n| crate::ids::bot_of_container(&n[1..]))
        .collect();
    let fix = stale
        .iter()
        .map(|n| {
            let p = dir.join(n);
            format!("umount {0}/rootfs 2>/dev/null; rm -rf {0}", p.display())
        })
        .collect::<Vec<_>>()
        .join("; ");
    Check::bad(
        "task bundles",
        Status::Problem,
        format!(
            "{} half-deleted by a killed containerd in {}: {} cannot start until removed (the \
             agent removes its bots' ones at their next start)",
            stale.join(", "),
            dir.display(),
            if bots.is_empty() {
                "their containers".to_string()
            } else {
                format!("bot(s) {}", bots.join(", "))
            }
        ),
        fix,
    )
}
