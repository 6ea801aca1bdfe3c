//! `bot` (create, start, stop, rm, ls, inspect) and `logs`.

use std::io::Write;
use std::path::Path;

use clap::Subcommand;
use futures::StreamExt;
use memoh_proto::pb::agent as pb;

use super::{control, status_err, CliError};

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

fn bot_json(b: &pb::BotInfo) -> serde_json::Value {
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
    })
}

/// Runs a bot subcommand.
pub async fn bot(socket: &Path, cmd: BotCmd) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let e = |s| status_err(socket, s);
    match cmd {
        BotCmd::Create { bot, image } => {
            let r = c
                .create_bot(pb::CreateBotRequest {
                    bot_id: bot,
                    image: image.unwrap_or_default(),
                })
                .await
                .map_err(e)?
                .into_inner();
            println!("{} {} {}", r.bot_id, r.status, r.ip);
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
