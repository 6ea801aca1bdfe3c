//! How the CLI shows a bot: the JSON of `bot ls --json`, `bot inspect` and `bot stats --json`,
//! and the one line of its limits.

use memoh_proto::pb::agent as pb;

/// The JSON of one bot.
pub(super) fn bot_json(b: &pb::BotInfo) -> serde_json::Value {
    let u = b.usage.as_ref();
    serde_json::json!({
        "bot_id": b.bot_id,
        "container_id": b.container_id,
        "image": b.image,
        "status": b.status,
        "ip": b.ip,
        "created_at": b.created_at,
        "pid": b.pid,
        "restart_count": b.restart_count,
        // null until a task of the bot has exited; -1 when it was killed by a signal.
        "last_exit_code": (!b.last_exit_at.is_empty()).then_some(b.last_exit_code),
        "last_exit_at": (!b.last_exit_at.is_empty()).then_some(&b.last_exit_at),
        // null unless containerd once lost the bot's state (see `memoh.lost-state`).
        "lost_state": (!b.lost_state.is_empty()).then_some(&b.lost_state),
        // Sizes in bytes, CPUs as a number; null is unlimited.
        "limits": limits_json(b.limits.as_ref()),
        // null where the host gives no figure or the bot has no task.
        "usage": {
            "memory": u.and_then(|u| u.memory_bytes),
            "memory_peak": u.and_then(|u| u.memory_peak_bytes),
            "cpu_nanos": u.and_then(|u| u.cpu_nanos),
            "pids": u.and_then(|u| u.pids),
            "disk": u.and_then(|u| u.disk_bytes),
        },
        "oom_kills": u.and_then(|u| u.oom_kills),
        // What the bot was created with; the hostname in effect.
        "spec": spec_json(b.spec.as_ref(), &b.bot_id),
    })
}

fn spec_json(s: Option<&pb::BotSpec>, bot: &str) -> serde_json::Value {
    let d = pb::BotSpec::default();
    let s = s.unwrap_or(&d);
    serde_json::json!({
        "env": s.env,
        "dns": s.dns,
        "dns_search": s.dns_search,
        "hostname": if s.hostname.is_empty() { bot } else { s.hostname.as_str() },
        "mounts": s
            .mounts
            .iter()
            .map(|m| serde_json::json!({"host": m.host, "container": m.container, "readonly": true}))
            .collect::<Vec<_>>(),
    })
}

fn limits_json(l: Option<&pb::BotLimits>) -> serde_json::Value {
    let nz = |v: u64| (v != 0).then_some(v);
    let l = l.copied().unwrap_or_default();
    serde_json::json!({
        "memory": nz(l.memory_bytes),
        "cpus": nz(l.millicpus).map(|m| m as f64 / 1000.0),
        "pids": nz(l.pids),
        "disk": nz(l.disk_bytes),
    })
}

/// `memory 512MiB, cpus 0.5, pids 128, disk unlimited`.
pub(super) fn limits_line(l: Option<&pb::BotLimits>) -> String {
    use crate::bots::limits::{format_cpus, format_size};
    let l = l.copied().unwrap_or_default();
    let or = |v: u64, f: &dyn Fn(u64) -> String| {
        if v == 0 {
            "unlimited".to_string()
        } else {
            f(v)
        }
    };
    format!(
        "memory {}, cpus {}, pids {}, disk {}",
        or(l.memory_bytes, &format_size),
        or(l.millicpus, &format_cpus),
        or(l.pids, &|p| p.to_string()),
        or(l.disk_bytes, &format_size),
    )
}
