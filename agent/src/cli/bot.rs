//! `bot` (create, update, pause, resume, stats, start, stop, rm, ls, inspect) and `logs`.

use std::io::Write;
use std::path::Path;

use clap::{Args, Subcommand};
use futures::StreamExt;
use memoh_proto::pb::agent as pb;

use super::{control, status_err, CliError};

/// Resource limits on the command line; each may be `unlimited`.
#[derive(Args, Debug, Default)]
pub struct LimitArgs {
    /// Memory (hard, no swap), e.g. `512MiB`, `2GiB`.
    #[arg(long)]
    memory: Option<String>,
    /// CPUs, e.g. `0.5`, `1.5`.
    #[arg(long)]
    cpus: Option<String>,
    /// Processes and threads, e.g. `256`.
    #[arg(long)]
    pids: Option<String>,
    /// Writable layer bound (measured and reported), e.g. `10GiB`.
    #[arg(long)]
    disk: Option<String>,
}

impl LimitArgs {
    fn to_pb(&self) -> pb::LimitsChange {
        let s = |v: &Option<String>| v.clone().unwrap_or_default();
        pb::LimitsChange {
            memory: s(&self.memory),
            cpus: s(&self.cpus),
            pids: s(&self.pids),
            disk: s(&self.disk),
        }
    }
}

/// The bot spec on the command line: environment, DNS, hostname, mounts.
#[derive(Args, Debug, Default)]
pub struct SpecArgs {
    /// Environment variable `NAME=VALUE`, added after the image's (repeatable; a later one
    /// wins).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Nameserver address (repeatable, at most 3; default: the host's, loopback ones
    /// replaced by the agent's `dns_fallback`).
    #[arg(long = "dns", value_name = "IP")]
    dns: Vec<String>,
    /// DNS search domain (repeatable; default: the host's).
    #[arg(long = "dns-search", value_name = "DOMAIN")]
    dns_search: Vec<String>,
    /// Hostname inside the bot (default: the bot id).
    #[arg(long)]
    hostname: Option<String>,
    /// Read-only bind mount of a host directory under the agent's `mount_allowed`
    /// (repeatable).
    #[arg(long = "mount", value_name = "HOST:CONTAINER")]
    mount: Vec<String>,
}

impl SpecArgs {
    fn to_pb(&self) -> Result<pb::BotSpec, CliError> {
        let mounts = self
            .mount
            .iter()
            .map(|m| {
                crate::bots::spec::parse_mount(m)
                    .map(|m| pb::BotMount {
                        host: m.host.display().to_string(),
                        container: m.container.display().to_string(),
                    })
                    .map_err(|e| super::CliError {
                        message: e.to_string(),
                        code: 2,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pb::BotSpec {
            env: self.env.clone(),
            dns: self.dns.clone(),
            dns_search: self.dns_search.clone(),
            hostname: self.hostname.clone().unwrap_or_default(),
            mounts,
        })
    }
}

/// Bot subcommands.
#[derive(Subcommand, Debug)]
pub enum BotCmd {
    /// Create and start a bot; returns once its server answers.
    Create {
        /// Bot id (`[-_a-zA-Z0-9]+`).
        bot: String,
        /// Image reference (default: the configured image).
        #[arg(long)]
        image: Option<String>,
        /// Limits (default: the agent's `[bot_defaults]`).
        #[command(flatten)]
        limits: LimitArgs,
        /// Environment, DNS, hostname and mounts (fixed for the bot's life).
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Change a bot's limits; a running bot gets them at once, without a restart.
    Update {
        /// Bot id.
        bot: String,
        /// The limits to change.
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Freeze every process of a running bot.
    Pause {
        /// Bot id.
        bot: String,
    },
    /// Thaw a paused bot.
    Resume {
        /// Bot id.
        bot: String,
    },
    /// Show what bots use against their limits (all bots, or one).
    Stats {
        /// Bot id (default: every bot).
        bot: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every two seconds until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Start a stopped bot.
    Start {
        /// Bot id.
        bot: String,
    },
    /// Stop a bot (SIGTERM, then SIGKILL).
    Stop {
        /// Bot id.
        bot: String,
    },
    /// Delete a bot, its container and its data.
    Rm {
        /// Bot id.
        bot: String,
        /// Keep the bot's committed versions.
        #[arg(long)]
        keep_versions: bool,
    },
    /// List bots.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one bot as JSON.
    Inspect {
        /// Bot id.
        bot: String,
    },
}

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

/// Runs a bot subcommand.
pub async fn bot(socket: &Path, cmd: BotCmd) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let e = |s| status_err(socket, s);
    match cmd {
        BotCmd::Create {
            bot,
            image,
            limits,
            spec,
        } => {
            let spec = spec.to_pb()?;
            let r = c
                .create_bot(pb::CreateBotRequest {
                    bot_id: bot,
                    image: image.unwrap_or_default(),
                    limits: Some(limits.to_pb()),
                    spec: Some(spec),
                })
                .await
                .map_err(e)?
                .into_inner();
            println!("{} {} {}", r.bot_id, r.status, r.ip);
        }
        BotCmd::Update { bot, limits } => {
            let r = c
                .update_bot(pb::UpdateBotRequest {
                    bot_id: bot,
                    limits: Some(limits.to_pb()),
                })
                .await
                .map_err(e)?
                .into_inner();
            println!("{} {}", r.bot_id, limits_line(r.limits.as_ref()));
        }
        BotCmd::Pause { bot } => {
            let r = c.pause_bot(pb::BotRef { bot_id: bot }).await.map_err(e)?;
            let r = r.into_inner();
            println!("{} {}", r.bot_id, r.status);
        }
        BotCmd::Resume { bot } => {
            let r = c.resume_bot(pb::BotRef { bot_id: bot }).await.map_err(e)?;
            let r = r.into_inner();
            println!("{} {} {}", r.bot_id, r.status, r.ip);
        }
        BotCmd::Stats { bot, json, watch } => {
            return super::stats::stats(socket, &mut c, bot, json, watch).await;
        }
        BotCmd::Start { bot } => {
            let r = c.start_bot(pb::BotRef { bot_id: bot }).await.map_err(e)?;
            let r = r.into_inner();
            println!("{} {} {}", r.bot_id, r.status, r.ip);
        }
        BotCmd::Stop { bot } => {
            let r = c.stop_bot(pb::BotRef { bot_id: bot }).await.map_err(e)?;
            let r = r.into_inner();
            println!("{} {}", r.bot_id, r.status);
        }
        BotCmd::Rm { bot, keep_versions } => {
            c.delete_bot(pb::DeleteBotRequest {
                bot_id: bot.clone(),
                keep_versions,
            })
            .await
            .map_err(e)?;
            println!("{bot} deleted");
        }
        BotCmd::Ls { json } => {
            let bots = c
                .list_bots(pb::ListBotsRequest {})
                .await
                .map_err(e)?
                .into_inner()
                .bots;
            if json {
                let v: Vec<_> = bots.iter().map(bot_json).collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!(
                    "{:<24} {:<10} {:<16} {:<8} IMAGE",
                    "BOT", "STATUS", "IP", "RESTARTS"
                );
                for b in bots {
                    println!(
                        "{:<24} {:<10} {:<16} {:<8} {}",
                        b.bot_id, b.status, b.ip, b.restart_count, b.image
                    );
                }
            }
        }
        BotCmd::Inspect { bot } => {
            let b = c
                .inspect_bot(pb::BotRef { bot_id: bot })
                .await
                .map_err(e)?
                .into_inner();
            println!(
                "{}",
                serde_json::to_string_pretty(&bot_json(&b)).unwrap_or_default()
            );
        }
    }
    Ok(0)
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

/// Prints the bot's server log.
pub async fn logs(socket: &Path, bot: String, follow: bool, tail: u64) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let mut s = c
        .bot_logs(pb::BotLogsRequest {
            bot_id: bot,
            tail_bytes: tail,
            follow,
        })
        .await
        .map_err(|s| status_err(socket, s))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(m) = s.next().await {
        let m = m.map_err(|s| status_err(socket, s))?;
        let _ = out.write_all(&m.data);
        let _ = out.flush();
    }
    Ok(0)
}
