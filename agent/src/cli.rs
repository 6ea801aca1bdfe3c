//! The operator's CLI: a client of the agent's control socket.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt;
use memoh_proto::client::unix_channel;
use memoh_proto::pb::agent as pb;
use memoh_proto::pb::agent::agent_service_client::AgentServiceClient;
use memoh_proto::pb::mcpcontainer::exec_output::Stream as OutKind;
use memoh_proto::pb::mcpcontainer::ExecInput;
use memoh_proto::ContainerClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// A CLI failure: one line for stderr and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// The line to print.
    pub message: String,
    /// The exit code.
    pub code: u8,
}

impl CliError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }
}

/// Turns a status from the agent into one readable line.
fn status_err(socket: &Path, s: tonic::Status) -> CliError {
    let msg = s.message();
    let transport = matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
        && [
            "transport",
            "connect",
            "No such file",
            "refused",
            "reset",
            "broken pipe",
            "h2 protocol",
        ]
        .iter()
        .any(|w| msg.contains(w));
    if transport {
        let first = msg.lines().next().unwrap_or_default();
        // The call may have failed below gRPC: say whether the agent is gone or only the
        // connection. A status that came over the wire (no local source) is the agent's own
        // answer, e.g. about a bot it cannot reach, and is shown as it is.
        match std::os::unix::net::UnixStream::connect(socket) {
            Err(e) => {
                return CliError::new(format!(
                    "agent not running: cannot connect to {} ({e})",
                    socket.display()
                ))
            }
            Ok(_) if std::error::Error::source(&s).is_some() => {
                return CliError::new(format!(
                    "lost the connection to the agent at {} mid-call ({first})",
                    socket.display()
                ))
            }
            Ok(_) => {}
        }
    }
    CliError::new(msg.to_string())
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

/// Snapshot (version) subcommands.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Commit the bot's current state as a new version (the bot restarts on it).
    Create {
        /// Bot id.
        bot: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
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
}

fn snapshot_json(v: &pb::SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "version": v.version,
        "name": v.name,
        "source": v.source,
        "created_at": v.created_at,
        "snapshot": v.snapshot,
        "current": v.current,
    })
}

/// Runs a snapshot subcommand.
pub async fn snapshot(socket: &Path, cmd: SnapshotCmd) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let e = |s| status_err(socket, s);
    match cmd {
        SnapshotCmd::Create { bot, name } => {
            let v = c
                .create_snapshot(pb::CreateSnapshotRequest { bot_id: bot, name })
                .await
                .map_err(e)?
                .into_inner();
            println!("version {} {}", v.version, v.created_at);
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
    let tty = std::io::stderr().is_terminal();
    while let Some(m) = s.next().await {
        let m = m.map_err(|s| status_err(socket, s))?;
        if !m.finished {
            if tty {
                eprint!(
                    "\r{:<10} {:>12} / {:<12} bytes",
                    m.phase, m.bytes, m.total_bytes
                );
            }
            continue;
        }
        if tty {
            eprintln!();
        }
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

/// Image subcommands.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Import an OCI or Docker archive.
    Import {
        /// The archive.
        file: PathBuf,
        /// Name for an archive that carries none.
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull from a registry.
    Pull {
        /// Image reference.
        reference: String,
        /// Allow plain HTTP to this registry.
        #[arg(long)]
        insecure: bool,
    },
    /// List images.
    Ls,
}

async fn control(socket: &Path) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(unix_channel(socket))
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

/// Runs an image subcommand, with a progress line on a terminal.
pub async fn image(socket: &Path, cmd: ImageCmd) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let e = |s| status_err(socket, s);
    let stream = match cmd {
        ImageCmd::Ls => {
            let images = c
                .list_images(pb::ListImagesRequest {})
                .await
                .map_err(e)?
                .into_inner()
                .images;
            println!("{:<56} DIGEST", "NAME");
            for i in images {
                println!("{:<56} {}", i.name, i.digest);
            }
            return Ok(0);
        }
        ImageCmd::Import { file, name } => {
            let abs = std::fs::canonicalize(&file)
                .map_err(|err| CliError::new(format!("{}: {err}", file.display())))?;
            c.import_image(pb::ImportImageRequest {
                path: abs.to_string_lossy().into_owned(),
                name: name.unwrap_or_default(),
            })
            .await
            .map_err(e)?
            .into_inner()
        }
        ImageCmd::Pull {
            reference,
            insecure,
        } => c
            .pull_image(pb::PullImageRequest {
                reference,
                insecure,
            })
            .await
            .map_err(e)?
            .into_inner(),
    };
    let tty = std::io::stderr().is_terminal();
    let mut stream = stream;
    let mut last = None;
    while let Some(m) = stream.next().await {
        let m = m.map_err(e)?;
        if tty && m.total > 0 {
            let pct = m.current.saturating_mul(100) / m.total.max(1);
            let bar = "#".repeat((pct / 4) as usize);
            eprint!("\r{:<10} [{bar:<25}] {pct:>3}%", m.phase);
        }
        if m.phase == "done" {
            last = Some(m);
        }
    }
    if tty {
        eprintln!();
    }
    match last {
        Some(m) => {
            println!("{}", m.image);
            Ok(0)
        }
        None => Err(CliError::new("image job ended without a result")),
    }
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

fn bot_client(socket: &Path, bot: &str) -> Result<ContainerClient, CliError> {
    crate::ids::validate(bot).map_err(|e| CliError::new(e.to_string()))?;
    ContainerClient::with_auth(unix_channel(socket), None, Some(bot))
        .map_err(|s| CliError::new(s.message().to_string()))
}

/// Runs a command in a bot, streaming output live and stdin through; returns its exit code.
pub async fn exec(
    socket: &Path,
    bot: &str,
    argv: &[String],
    work_dir: Option<String>,
    timeout: i32,
) -> Result<u8, CliError> {
    if argv.is_empty() {
        return Err(CliError::new("exec needs a command after --"));
    }
    let client = bot_client(socket, bot)?;
    let command = if argv.len() == 1 {
        argv[0].clone()
    } else {
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let (stdin_failed, mut stdin_error) = tokio::sync::oneshot::channel::<String>();
    // stdin goes through as it comes; EOF closes the command's stdin. A read error is not an
    // EOF: the call is cancelled (the bot kills the command) and the error reported.
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = stdin_failed.send(e.to_string());
                    // Held open until the call is gone: its end must not look like an EOF.
                    tx.closed().await;
                    return;
                }
            }
        }
    });
    let first = ExecInput {
        command,
        work_dir: work_dir.unwrap_or_default(),
        timeout_seconds: timeout,
        ..Default::default()
    };
    let limit = if timeout > 0 {
        std::time::Duration::from_secs(timeout as u64)
    } else {
        memoh_proto::limits::DEFAULT_EXEC_TIMEOUT
    };
    let started = std::time::Instant::now();
    let mut out = client
        .exec(first, tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| status_err(socket, s))?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut stdin_settled = false;
    loop {
        let m = tokio::select! {
            m = out.message() => m.map_err(|s| status_err(socket, s))?,
            r = &mut stdin_error, if !stdin_settled => {
                match r {
                    Ok(e) => {
                        return Err(CliError::new(format!(
                            "reading stdin failed ({e}); the command was cancelled"
                        )));
                    }
                    // stdin ended (EOF) or the output ended first: nothing to report.
                    Err(_) => stdin_settled = true,
                }
                continue;
            }
        };
        let Some(m) = m else { break };
        match OutKind::try_from(m.stream) {
            Ok(OutKind::Stdout) => {
                let _ = stdout.write_all(&m.data).await;
                let _ = stdout.flush().await;
            }
            Ok(OutKind::Stderr) => {
                let _ = stderr.write_all(&m.data).await;
                let _ = stderr.flush().await;
            }
            Ok(OutKind::Exit) => {
                let code = m.exit_code;
                if code >= 0 {
                    return Ok((code & 0xff) as u8);
                }
                // -1: a signal ended the command, the timeout's kill among them. The exit code
                // is 137 either way (128 + SIGKILL, as a shell reports a killed command); the
                // line on stderr says which.
                let _ = stdout.flush().await;
                if started.elapsed() + std::time::Duration::from_millis(500) >= limit {
                    eprintln!("memoh-agent: exec: timed out after {} s", limit.as_secs());
                } else {
                    eprintln!("memoh-agent: exec: the command was killed by a signal");
                }
                return Ok(137);
            }
            Err(_) => {}
        }
    }
    Err(CliError::new(
        "the bot's server ended the command without an exit status",
    ))
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `cp SRC DST`: exactly one side is `BOT:PATH`. Streams any size; downloads land atomically.
pub async fn cp(socket: &Path, src: &str, dst: &str) -> Result<u8, CliError> {
    match (split_remote(src), split_remote(dst)) {
        (Some(_), Some(_)) => Err(CliError::new("cp between two bots is not supported")),
        (None, None) => Err(CliError::new("cp needs one side as BOT:PATH")),
        (None, Some((bot, path))) => {
            let client = bot_client(socket, bot)?;
            let local = PathBuf::from(src);
            let md = std::fs::metadata(&local).map_err(|e| CliError::new(format!("{src}: {e}")))?;
            if md.is_dir() {
                return Err(CliError::new(format!(
                    "{src} is a directory; cp copies files"
                )));
            }
            let f = tokio::fs::File::open(&local)
                .await
                .map_err(|e| CliError::new(format!("{src}: {e}")))?;
            // A read error aborts the upload: the bot keeps its old file.
            let stream = tokio_util::io::ReaderStream::with_capacity(f, 64 * 1024);
            let n = client
                .try_write_raw(path, stream)
                .await
                .map_err(|s| status_err(socket, s))?;
            if n as u64 != md.len() {
                return Err(CliError::new(format!(
                    "short upload: sent {} bytes, the bot stored {n}",
                    md.len()
                )));
            }
            Ok(0)
        }
        (Some((bot, path)), None) => {
            let client = bot_client(socket, bot)?;
            let mut local = PathBuf::from(dst);
            if local.is_dir() {
                let name = Path::new(path)
                    .file_name()
                    .ok_or_else(|| CliError::new(format!("{path} has no file name")))?;
                local = local.join(name);
            }
            let parent = local
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            let tmp = tempfile::NamedTempFile::new_in(&parent)
                .map_err(|e| CliError::new(format!("{}: {e}", parent.display())))?;
            let mut out = tokio::fs::File::from_std(
                tmp.reopen()
                    .map_err(|e| CliError::new(format!("{}: {e}", parent.display())))?,
            );
            let mut s = client
                .read_raw(path)
                .await
                .map_err(|s| status_err(socket, s))?;
            while let Some(c) = s.message().await.map_err(|s| status_err(socket, s))? {
                out.write_all(&c.data)
                    .await
                    .map_err(|e| CliError::new(format!("{}: {e}", local.display())))?;
            }
            out.flush()
                .await
                .map_err(|e| CliError::new(format!("{}: {e}", local.display())))?;
            drop(out);
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644));
            tmp.persist(&local)
                .map_err(|e| CliError::new(format!("{}: {}", local.display(), e.error)))?;
            Ok(0)
        }
    }
}

/// `BOT:PATH` -> `(BOT, PATH)`; a local path (no colon, or starting with `/` or `.`) -> None.
fn split_remote(s: &str) -> Option<(&str, &str)> {
    if s.starts_with('/') || s.starts_with('.') {
        return None;
    }
    let (bot, path) = s.split_once(':')?;
    if bot.is_empty() || crate::ids::validate(bot).is_err() {
        return None;
    }
    Some((bot, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths() {
        assert_eq!(split_remote("b1:/data/x"), Some(("b1", "/data/x")));
        assert_eq!(split_remote("b1:rel"), Some(("b1", "rel")));
        assert_eq!(split_remote("/tmp/a:b"), None);
        assert_eq!(split_remote("./a:b"), None);
        assert_eq!(split_remote("file.txt"), None);
        assert_eq!(split_remote("a b:x"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}

/// MCP subcommands: stdio MCP servers run inside a bot, served at `/bots/BOT/mcp/NAME`.
#[derive(Subcommand, Debug)]
pub enum McpCmd {
    /// Register (or replace) a stdio MCP server: `mcp add BOT NAME [--env K=V]... -- CMD ARGS...`.
    Add {
        /// Bot id.
        bot: String,
        /// Server name (`[-_a-zA-Z0-9]+`).
        name: String,
        /// `KEY=VALUE` added to the server's environment (repeatable).
        #[arg(long = "env", short = 'e', value_name = "K=V")]
        env: Vec<String>,
        /// Working directory inside the bot (default /data).
        #[arg(long)]
        cwd: Option<String>,
        /// The command and its arguments, run inside the bot.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List the bot's servers and the state of their sessions.
    Ls {
        /// Bot id.
        bot: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a server and stop its session.
    Rm {
        /// Bot id.
        bot: String,
        /// Server name.
        name: String,
    },
    /// Print the server's kept stderr (the last 64 KiB).
    Logs {
        /// Bot id.
        bot: String,
        /// Server name.
        name: String,
    },
}

fn mcp_json(s: &pb::McpServerInfo) -> serde_json::Value {
    serde_json::json!({
        "name": s.name,
        "command": s.command,
        "env": s.env,
        "cwd": s.cwd,
        "session": s.session,
        "running": s.running,
        "starts": s.starts,
        "last_exit": s.last_exit,
    })
}

/// Runs an MCP subcommand.
pub async fn mcp(socket: &Path, cmd: McpCmd) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let e = |s| status_err(socket, s);
    match cmd {
        McpCmd::Add {
            bot,
            name,
            env,
            cwd,
            command,
        } => {
            let r = c
                .mcp_add(pb::McpAddRequest {
                    bot_id: bot.clone(),
                    name,
                    command,
                    env,
                    cwd: cwd.unwrap_or_default(),
                })
                .await
                .map_err(e)?
                .into_inner();
            let verb = if r.replaced { "replaced" } else { "added" };
            println!("{bot}: mcp server {} {verb}", r.name);
        }
        McpCmd::Ls { bot, json } => {
            let servers = c
                .mcp_list(pb::BotRef { bot_id: bot })
                .await
                .map_err(e)?
                .into_inner()
                .servers;
            if json {
                let v: Vec<_> = servers.iter().map(mcp_json).collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!("{:<20} {:<10} {:<7} COMMAND", "NAME", "STATE", "STARTS");
                for s in servers {
                    let state = match (s.session, s.running) {
                        (_, true) => "running",
                        (true, false) => "stopped",
                        (false, false) => "idle",
                    };
                    let argv: Vec<String> = s.command.iter().map(|a| shell_quote(a)).collect();
                    println!(
                        "{:<20} {:<10} {:<7} {}",
                        s.name,
                        state,
                        s.starts,
                        argv.join(" ")
                    );
                }
            }
        }
        McpCmd::Rm { bot, name } => {
            c.mcp_remove(pb::McpServerRef {
                bot_id: bot.clone(),
                name: name.clone(),
            })
            .await
            .map_err(e)?;
            println!("{bot}: mcp server {name} removed");
        }
        McpCmd::Logs { bot, name } => {
            let r = c
                .mcp_logs(pb::McpServerRef { bot_id: bot, name })
                .await
                .map_err(e)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&r.data);
            let _ = out.flush();
        }
    }
    Ok(0)
}
