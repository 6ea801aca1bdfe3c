//! Registrations of stdio MCP servers, stored inside each bot's container.
//!
//! The list lives in `/data/.memoh/mcp.json` in the bot, read and written through the
//! container-server API (the write is atomic). Keeping it in the container rather than on the
//! host means it travels with the bot: it survives agent restarts, it is part of every snapshot,
//! a rollback brings back exactly the registrations that matched the files (the servers'
//! code) of that snapshot, and deleting the bot deletes them, so no host-side store can ever
//! disagree with containerd about which bots exist. A bot can edit the file itself, which
//! grants it nothing: the commands run inside its own container anyway.

use memoh_proto::ContainerClient;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

/// Where the registrations live inside the bot (relative to the data directory `/data`).
pub const REGISTRY_PATH: &str = ".memoh/mcp.json";

/// One registered stdio server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSpec {
    /// Name, unique per bot, `[-_a-zA-Z0-9]+`.
    pub name: String,
    /// argv of the server.
    pub command: Vec<String>,
    /// `KEY=VALUE` pairs added to the environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (default: the data directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    #[serde(default)]
    servers: Vec<ServerSpec>,
}

/// Checks a server name.
pub fn validate_name(name: &str) -> Result<(), AgentError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(AgentError::InvalidArgument(format!(
            "invalid mcp server name {name:?}: use letters, digits, '-' and '_'"
        )));
    }
    Ok(())
}

/// Checks a whole registration.
pub fn validate(spec: &ServerSpec) -> Result<(), AgentError> {
    validate_name(&spec.name)?;
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err(AgentError::InvalidArgument(
            "mcp server command is empty".into(),
        ));
    }
    for e in &spec.env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => {}
            _ => {
                return Err(AgentError::InvalidArgument(format!(
                    "environment entry {e:?} is not KEY=VALUE"
                )))
            }
        }
    }
    Ok(())
}

/// Largest registry file the agent reads. The bot can write the file, so it is read as a
/// stream and refused as soon as it grows past this, never held whole.
pub const MAX_REGISTRY_BYTES: usize = 1024 * 1024;

/// Reads the bot's registrations (none when the file does not exist).
pub async fn load(client: &ContainerClient, bot: &str) -> Result<Vec<ServerSpec>, AgentError> {
    let mut s = match client.read_raw(REGISTRY_PATH).await {
        Ok(s) => s,
        Err(st) if st.code() == tonic::Code::NotFound => return Ok(Vec::new()),
        Err(status) => {
            return Err(AgentError::Bot {
                bot: bot.into(),
                status,
            })
        }
    };
    let Some(buf) = read_bounded(&mut s, bot, MAX_REGISTRY_BYTES).await? else {
        return Ok(Vec::new());
    };
    parse(&buf, bot)
}

/// Collects a file's chunks up to `limit` bytes; `None` when the file is gone. A bigger file is
/// an error as soon as a chunk crosses the limit.
async fn read_bounded<S>(s: &mut S, bot: &str, limit: usize) -> Result<Option<Vec<u8>>, AgentError>
where
    S: futures::Stream<Item = Result<memoh_proto::pb::mcpcontainer::DataChunk, tonic::Status>>
        + Unpin,
{
    use futures::StreamExt;
    let mut buf = Vec::new();
    while let Some(c) = s.next().await {
        match c {
            Ok(c) if buf.len() + c.data.len() > limit => {
                return Err(AgentError::FailedPrecondition(format!(
                    "bot {bot:?}: /data/{REGISTRY_PATH} is over the {limit}-byte limit; it is \
                     not read"
                )));
            }
            Ok(c) => buf.extend_from_slice(&c.data),
            Err(st) if st.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => {
                return Err(AgentError::Bot {
                    bot: bot.into(),
                    status,
                })
            }
        }
    }
    Ok(Some(buf))
}

fn parse(buf: &[u8], bot: &str) -> Result<Vec<ServerSpec>, AgentError> {
    let f: RegistryFile = serde_json::from_slice(buf).map_err(|e| {
        AgentError::FailedPrecondition(format!(
            "bot {bot:?}: /data/{REGISTRY_PATH} is not valid: {e}"
        ))
    })?;
    Ok(f.servers)
}

async fn store(
    client: &ContainerClient,
    bot: &str,
    servers: Vec<ServerSpec>,
) -> Result<(), AgentError> {
    let f = RegistryFile { servers };
    let mut text = serde_json::to_vec_pretty(&f).unwrap_or_default();
    text.push(b'\n');
    client
        .write_file(REGISTRY_PATH, text)
        .await
        .map_err(|status| AgentError::Bot {
            bot: bot.into(),
            status,
        })
}

/// Adds or replaces a registration; returns whether one of that name was replaced.
pub async fn add(
    client: &ContainerClient,
    bot: &str,
    spec: ServerSpec,
) -> Result<bool, AgentError> {
    validate(&spec)?;
    let mut servers = load(client, bot).await?;
    let replaced = match servers.iter_mut().find(|s| s.name == spec.name) {
        Some(s) => {
            *s = spec;
            true
        }
        None => {
            servers.push(spec);
            false
        }
    };
    store(client, bot, servers).await?;
    Ok(replaced)
}

/// Removes a registration; an unknown name is an error.
pub async fn remove(client: &ContainerClient, bot: &str, name: &str) -> Result<(), AgentError> {
    let mut servers = load(client, bot).await?;
    let before = servers.len();
    servers.retain(|s| s.name != name);
    if servers.len() == before {
        return Err(AgentError::NotFound(format!(
            "bot {bot:?} has no mcp server named {name:?}"
        )));
    }
    store(client, bot, servers).await
}

/// The shell command line that runs `spec` (each argument quoted, `exec` so signals reach it).
pub fn command_line(spec: &ServerSpec) -> String {
    let mut s = String::from("exec");
    for a in &spec.command {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s
}

fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        return a.to_string();
    }
    format!("'{}'", a.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_quote() {
        let s = ServerSpec {
            name: "x".into(),
            command: vec![
                "python3".into(),
                "-c".into(),
                "print('hi there')".into(),
                "".into(),
            ],
            env: vec![],
            cwd: None,
        };
        assert_eq!(
            command_line(&s),
            r#"exec python3 -c 'print('\''hi there'\'')' ''"#
        );
    }

    #[test]
    fn validation() {
        let ok = ServerSpec {
            name: "fs_1".into(),
            command: vec!["a".into()],
            env: vec!["A=1".into(), "B=".into()],
            cwd: None,
        };
        validate(&ok).unwrap();
        for bad in [
            ServerSpec {
                name: "a b".into(),
                ..ok.clone()
            },
            ServerSpec {
                command: vec![],
                ..ok.clone()
            },
            ServerSpec {
                env: vec!["=1".into()],
                ..ok.clone()
            },
            ServerSpec {
                env: vec!["X".into()],
                ..ok.clone()
            },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_registry_file_past_the_limit_is_refused_unread() {
        use memoh_proto::pb::mcpcontainer::DataChunk;
        let chunk = |n: usize| {
            Ok(DataChunk {
                data: vec![b' '; n].into(),
            })
        };
        // Within the limit: read whole.
        let mut ok = futures::stream::iter(vec![chunk(1000), chunk(24)]);
        let got = futures::executor::block_on(read_bounded(&mut ok, "b", 1024)).unwrap();
        assert_eq!(got.map(|b| b.len()), Some(1024));
        // An endless file: refused at the chunk that crosses the limit, the rest never pulled.
        let mut pulled = 0usize;
        let mut endless = futures::stream::repeat_with(|| {
            pulled += 1;
            chunk(64 * 1024)
        });
        let e = futures::executor::block_on(read_bounded(&mut endless, "b", MAX_REGISTRY_BYTES))
            .unwrap_err();
        assert_eq!(pulled, MAX_REGISTRY_BYTES / (64 * 1024) + 1);
        assert!(
            e.to_string().contains(&format!(
                "bot \"b\": /data/{REGISTRY_PATH} is over the 1048576-byte limit; it is not read"
            )),
            "{e}"
        );
        // Gone mid-read: no registrations.
        let mut gone =
            futures::stream::iter(vec![chunk(10), Err(tonic::Status::not_found("gone"))]);
        assert_eq!(
            futures::executor::block_on(read_bounded(&mut gone, "b", 1024)).unwrap(),
            None
        );
    }
}
