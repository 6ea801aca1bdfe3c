//! `bot` (create, update, pause, resume, stats, start, stop, rm, ls, inspect) and `logs`.

use std::io::Write;
use std::path::Path;

use clap::{Args, Subcommand};
use futures::StreamExt;
use memoh_proto::pb::agent as pb;

use super::show::{bot_json, limits_line};
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
        /// Make the bot of a version pushed with `snapshot push` (`registry/repo:tag`): pulled,
        /// its data included; its versions list starts with that one.
        #[arg(long, conflicts_with = "image")]
        from: Option<String>,
        /// Plain HTTP to the registry of `--from` (loopback registries always may).
        #[arg(long, requires = "from")]
        insecure: bool,
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
            from,
            insecure,
        } => {
            let spec = spec.to_pb()?;
            let r = c
                .create_bot(pb::CreateBotRequest {
                    bot_id: bot,
                    image: image.unwrap_or_default(),
                    limits: Some(limits.to_pb()),
                    spec: Some(spec),
                    from: from.unwrap_or_default(),
                    from_insecure: insecure,
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
