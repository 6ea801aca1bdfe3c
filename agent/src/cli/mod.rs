//! The operator's CLI: a client of the agent's control socket, one file a verb.
//!
//! - [`bot`]: the `bot` and `logs` verbs; [`stats`]: `bot stats`; [`show`]: a bot as JSON;
//! - [`versions`]: the `snapshot` and `migrate` verbs;
//! - [`image`]: the `image` verb;
//! - [`exec`]: the `exec` and `cp` verbs; [`tty`]: `exec -t`, a terminal through
//!   `bridgepb` Exec; [`forward`]: `port-forward`, local TCP to a bot's port over `bridgepb`
//!   Tunnel;
//! - [`process`]: durable processes, `exec --detach`, `ps`, `attach`, `kill`, `wait`, `rm`,
//!   over `memoh.process.v1.ProcessService`;
//! - [`mcp`]: the `mcp` verb;
//! - [`progress`]: progress bars of long jobs on a terminal.
//! - [`net`]: the `net` verb.

mod bot;
mod exec;
mod fileio;
mod forward;
mod image;
mod mcp;
mod net;
mod process;
mod progress;
mod show;
mod stats;
mod tty;
mod versions;

pub use bot::{bot, logs, BotCmd};
pub use exec::{cp, exec};
pub use forward::port_forward;
pub use image::{image, ImageCmd};
pub use mcp::{mcp, McpCmd};
pub use net::{net, NetCmd};
pub use process::{attach, exec_detach, kill, ps, rm, wait, Detached};
pub use tty::exec_tty;
pub use versions::{migrate, snapshot, SnapshotCmd};

use std::path::Path;

use memoh_proto::client::{unix_channel, CallMetadata};
use memoh_proto::limits::MAX_MESSAGE_SIZE;
use memoh_proto::pb::agent::agent_service_client::AgentServiceClient;
use memoh_proto::pb::bridgepb::container_service_client::ContainerServiceClient as BridgeServiceClient;
use memoh_proto::ContainerClient;
use tonic::service::interceptor::InterceptedService;
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
    if msg.is_empty() {
        // e.g. UNIMPLEMENTED from an agent older than this CLI.
        return CliError::new(format!("the agent answered: {}", s.code().description()));
    }
    CliError::new(msg.to_string())
}

async fn control(socket: &Path) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(unix_channel(socket))
}

fn bot_client(socket: &Path, bot: &str) -> Result<ContainerClient, CliError> {
    crate::ids::validate(bot).map_err(|e| CliError::new(e.to_string()))?;
    ContainerClient::with_auth(unix_channel(socket), None, Some(bot))
        .map_err(|s| CliError::new(s.message().to_string()))
}

/// The generated `bridgepb.ContainerService` client, routed to one bot by the agent.
type BridgeClient = BridgeServiceClient<InterceptedService<Channel, CallMetadata>>;

/// A `bridgepb` client of `bot` through the agent's socket (same metadata as [`bot_client`]).
fn bridge_client(socket: &Path, bot: &str) -> Result<BridgeClient, CliError> {
    let c = bot_client(socket, bot)?;
    Ok(BridgeServiceClient::new(c.http())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE))
}

/// Quotes `s` for `/bin/sh` when it needs it.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}
