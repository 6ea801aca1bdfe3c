//! `snapshot` (create, ls, rollback, rm, push) and `migrate`: a bot's versions and its legacy data.

use std::path::Path;

use clap::Subcommand;
use futures::StreamExt;
use memoh_proto::pb::agent as pb;

use super::progress::{Progress, Unit};
use super::{control, status_err, CliError};

/// Snapshot (version) subcommands.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take the bot's current state as a new version: the bot is paused only while its
    /// changes are written as a layer, and keeps running (no restart).
    Create {
        /// Bot id.
        bot: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        /// Use the older cycle instead: stop the bot, commit its snapshot, start it again.
        #[arg(long)]
        restart: bool,
    },
    /// List the bot's versions.
    Ls {
        /// Bot id.
        bot: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the bot on version N (its current state is kept as a new version first).
    Rollback {
        /// Bot id.
        bot: String,
        /// Version number.
        version: u64,
    },
    /// Remove version N (refused while another version or the bot's state depends on it).
    Rm {
        /// Bot id.
        bot: String,
        /// Version number.
        version: u64,
    },
    /// Push version N's image to a registry (`registry/repo:tag`); `bot create --from` makes a
    /// bot of it on another host.
    Push {
        /// Bot id.
        bot: String,
        /// Version number.
        version: u64,
        /// Registry reference to push to.
        reference: String,
        /// Plain HTTP to the registry (loopback registries always may).
        #[arg(long)]
        insecure: bool,
    },
}

fn snapshot_json(v: &pb::SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "version": v.version,
        "name": v.name,
        "source": v.source,
        "created_at": v.created_at,
        "snapshot": v.snapshot,
        "image": v.image,
        "origin": v.origin,
        "current": v.current,
    })
}

/// Runs a snapshot subcommand.
pub async fn snapshot(socket: &Path, cmd: SnapshotCmd) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let e = |s| status_err(socket, s);
    match cmd {
        SnapshotCmd::Create { bot, name, restart } => {
            let v = c
                .create_snapshot(pb::CreateSnapshotRequest {
                    bot_id: bot,
                    name,
                    restart,
                })
                .await
                .map_err(e)?
                .into_inner();
            if restart {
                println!("version {} {}", v.version, v.created_at);
            } else {
                println!(
                    "version {} {} paused {:.1} ms, took {:.1} ms",
                    v.version,
                    v.created_at,
                    v.pause_us as f64 / 1000.0,
                    v.elapsed_us as f64 / 1000.0
                );
            }
        }
        SnapshotCmd::Ls { bot, json } => {
            let vs = c
                .list_snapshots(pb::BotRef { bot_id: bot })
                .await
                .map_err(e)?
                .into_inner()
                .snapshots;
            if json {
                let v: Vec<_> = vs.iter().map(snapshot_json).collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!(
                    "{:<8} {:<22} {:<14} {:<8} NAME",
                    "VERSION", "CREATED", "SOURCE", "CURRENT"
                );
                for v in vs {
                    let cur = if v.current { "*" } else { "" };
                    println!(
                        "{:<8} {:<22} {:<14} {:<8} {}",
                        v.version, v.created_at, v.source, cur, v.name
                    );
                }
            }
        }
        SnapshotCmd::Rollback { bot, version } => {
            let v = c
                .rollback_snapshot(pb::RollbackSnapshotRequest {
                    bot_id: bot.clone(),
                    version,
                })
                .await
                .map_err(e)?
                .into_inner();
            println!("{bot} now runs on version {}", v.version);
        }
        SnapshotCmd::Rm { bot, version } => {
            c.remove_snapshot(pb::RemoveSnapshotRequest {
                bot_id: bot.clone(),
                version,
            })
            .await
            .map_err(e)?;
            println!("{bot} version {version} removed");
        }
        SnapshotCmd::Push {
            bot,
            version,
            reference,
            insecure,
        } => {
            let r = c
                .push_snapshot(pb::PushSnapshotRequest {
                    bot_id: bot.clone(),
                    version,
                    reference,
                    insecure,
                })
                .await
                .map_err(e)?
                .into_inner();
            println!(
                "{bot} version {version} pushed to {} {}",
                r.reference, r.digest
            );
        }
    }
    Ok(0)
}

/// Copies the bot's legacy data into it, with progress; non-zero exit when anything failed.
pub async fn migrate(socket: &Path, bot: String) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let mut s = c
        .migrate(pb::BotRef {
            bot_id: bot.clone(),
        })
        .await
        .map_err(|s| status_err(socket, s))?
        .into_inner();
    let mut progress = Progress::stderr();
    while let Some(m) = s.next().await {
        let m = m.map_err(|s| status_err(socket, s))?;
        if !m.finished {
            progress.set(&m.phase, Unit::Bytes, m.bytes, m.total_bytes);
            continue;
        }
        progress.done();
        if m.already_done {
            println!(
                "{bot}: already migrated earlier (source renamed: {})",
                m.renamed
            );
            return Ok(0);
        }
        for sk in &m.skipped {
            eprintln!("skipped: {sk}: not a regular file, directory or symlink");
        }
        if !m.failures.is_empty() {
            for f in &m.failures {
                eprintln!("failed: {f}");
            }
            return Err(CliError::new(format!(
                "migration of {bot} incomplete: {} failures; the source was left in place",
                m.failures.len()
            )));
        }
        println!(
            "{bot}: migrated {} entries, {} bytes, {} symlinks, {} skipped; source renamed: {}",
            m.entries,
            m.bytes,
            m.symlinks,
            m.skipped.len(),
            m.renamed
        );
        return Ok(0);
    }
    Err(CliError::new("migration ended without a report"))
}
