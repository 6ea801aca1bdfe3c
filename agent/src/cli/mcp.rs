//! `mcp` (add, ls, rm, logs, token): stdio MCP servers run inside a bot, and the listener's
//! token.

use std::io::Write;
use std::path::Path;

use clap::Subcommand;
use memoh_proto::pb::agent as pb;

use super::{control, shell_quote, status_err, CliError};

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
    /// Print the MCP listener's bearer token (clients send `Authorization: Bearer TOKEN`).
    Token {
        /// Also print the listener's address on a second line.
        #[arg(long)]
        url: bool,
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
        McpCmd::Token { url } => {
            let r = c
                .mcp_token(pb::McpTokenRequest {})
                .await
                .map_err(e)?
                .into_inner();
            println!("{}", r.token);
            if url {
                println!("http://{}", r.listen);
            }
        }
    }
    Ok(0)
}
