//! Conversions between the control API's wire messages and the agent's domain types: the
//! only place that knows both.

use std::time::SystemTime;

use memoh_proto::pb::agent as pb;

use crate::bots::versions::Version;
use crate::bots::BotInfo;
use crate::containerd::{Progress, ProgressPhase};
use crate::mcp::ServerListing;

/// RFC 3339 in UTC with seconds, empty for none.
pub fn rfc3339(t: Option<SystemTime>) -> String {
    t.map(|t| {
        chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    })
    .unwrap_or_default()
}

/// A domain bot as the wire `BotInfo`.
pub fn bot_info(b: BotInfo) -> pb::BotInfo {
    let hostname = b.spec.hostname_of(&b.bot_id).to_string();
    pb::BotInfo {
        bot_id: b.bot_id,
        container_id: b.container_id,
        image: b.image,
        status: b.status,
        ip: b.ip.map(|i| i.to_string()).unwrap_or_default(),
        created_at: rfc3339(b.created_at),
        pid: b.pid,
        restart_count: b.restart_count,
        last_exit_code: b.last_exit_code.unwrap_or(-1),
        last_exit_at: rfc3339(b.last_exit_at),
        lost_state: b.lost_state.unwrap_or_default(),
        limits: Some(pb::BotLimits {
            memory_bytes: b.limits.memory.unwrap_or(0),
            millicpus: b.limits.millicpus.unwrap_or(0),
            pids: b.limits.pids.unwrap_or(0),
            disk_bytes: b.limits.disk.unwrap_or(0),
        }),
        usage: Some(pb::BotUsage {
            memory_bytes: b.usage.cgroup.memory,
            memory_peak_bytes: b.usage.cgroup.memory_peak,
            cpu_nanos: b.usage.cgroup.cpu_nanos,
            pids: b.usage.cgroup.pids,
            disk_bytes: b.usage.disk,
            oom_kills: b.usage.cgroup.oom_kills,
        }),
        spec: Some(pb::BotSpec {
            env: b.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            dns: b.spec.dns.iter().map(ToString::to_string).collect(),
            dns_search: b.spec.dns_search.clone(),
            hostname,
            mounts: b
                .spec
                .mounts
                .iter()
                .map(|m| pb::BotMount {
                    host: m.host.display().to_string(),
                    container: m.container.display().to_string(),
                })
                .collect(),
        }),
    }
}

/// The wire's bot spec as the domain's (parsed and checked, the mounts' host side not yet);
/// none is the default spec.
pub fn bot_spec(
    s: Option<&pb::BotSpec>,
) -> Result<crate::bots::spec::BotSpec, crate::error::AgentError> {
    let Some(s) = s else {
        return Ok(Default::default());
    };
    let mounts = s
        .mounts
        .iter()
        .map(|m| crate::bots::spec::SpecMount {
            host: m.host.clone().into(),
            container: m.container.clone().into(),
        })
        .collect();
    crate::bots::spec::BotSpec::parse(&s.env, &s.dns, &s.dns_search, &s.hostname, mounts)
}

/// The wire's limits change as the domain's (parsed and checked); none is no change.
pub fn limits_change(
    l: Option<&pb::LimitsChange>,
) -> Result<crate::bots::limits::LimitsChange, crate::error::AgentError> {
    match l {
        None => Ok(Default::default()),
        Some(l) => crate::bots::limits::LimitsChange::parse(&l.memory, &l.cpus, &l.pids, &l.disk),
    }
}

/// A domain version as the wire `SnapshotInfo`.
pub fn snapshot_info(v: Version) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        version: v.number,
        name: v.name,
        source: v.source,
        created_at: v.created_at,
        snapshot: v.snapshot,
        current: v.current,
        image: v.image,
        pause_us: v
            .times
            .map(|t| t.pause.as_micros() as u64)
            .unwrap_or_default(),
        elapsed_us: v
            .times
            .map(|t| t.elapsed.as_micros() as u64)
            .unwrap_or_default(),
        origin: v.origin,
    }
}

/// Image job progress as the wire message.
pub fn progress_msg(p: Progress) -> pb::Progress {
    let phase = match p.phase {
        ProgressPhase::Reading => "reading",
        ProgressPhase::Writing => "fetching",
        ProgressPhase::Unpacking => "unpacking",
        ProgressPhase::Done => "done",
    };
    pb::Progress {
        phase: phase.into(),
        current: p.current,
        total: p.total,
        ..Default::default()
    }
}

/// A registered stdio MCP server as the wire message.
pub fn server_info(l: ServerListing, replaced: bool) -> pb::McpServerInfo {
    let session = l.status.is_some();
    let (running, starts, last_exit) = l
        .status
        .map(|s| (s.running, s.starts, s.last_exit.unwrap_or_default()))
        .unwrap_or_default();
    pb::McpServerInfo {
        name: l.spec.name,
        command: l.spec.command,
        env: l.spec.env,
        cwd: l.spec.cwd.unwrap_or_default(),
        replaced,
        session,
        running,
        starts,
        last_exit,
    }
}
