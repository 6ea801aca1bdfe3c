//! The container tools on one bot's [`ContainerClient`]: `read`, `write`, `list`, `edit`,
//! `exec` (with `background`), and the process tools of [`process`] (`process_output`,
//! `process_list`, `process_signal`, `process_wait`). Everything here works on a client, never
//! on the lifecycle manager, so the tools can be tested against an in-process container server.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use memoh_proto::ContainerClient;
use rmcp::model::{JsonObject, Tool};
use serde_json::{json, Value};
use tonic::{Code, Status};

use super::edit::{self, EditError};

/// The data directory inside every bot container.
pub const DATA_DIR: &str = "/data";
/// Most entries a `list` result carries; the rest are cut and `truncated` is set.
pub const MAX_LIST_ENTRIES: usize = 1000;
/// Output of `exec` over this many bytes (per stream) is cut to its head and tail.
pub const MAX_OUTPUT_BYTES: usize = 10 * 1024;
/// Output of `exec` over this many lines (per stream) is cut to its head and tail.
pub const MAX_OUTPUT_LINES: usize = 250;
/// Most bytes of a command's stdout that `exec` holds while the command runs: the first and
/// the last half of it. Output between them is dropped as it arrives (and counted); the command
/// keeps running, its output drained, until it ends or its timeout kills it, so its exit code
/// stays meaningful and the agent's memory stays bounded whatever it writes.
pub const EXEC_STDOUT_LIMIT: usize = 1024 * 1024;
/// [`EXEC_STDOUT_LIMIT`] for stderr.
pub const EXEC_STDERR_LIMIT: usize = 256 * 1024;
/// Default `max_bytes` of `process_output`.
pub const DEFAULT_PROCESS_OUTPUT_BYTES: u64 = process::DEFAULT_OUTPUT_BYTES;
/// Largest `max_bytes` of `process_output`.
pub const MAX_PROCESS_OUTPUT_BYTES: u64 = process::MAX_OUTPUT_BYTES;
/// Default `exec` timeout in seconds.
pub const DEFAULT_EXEC_TIMEOUT: i32 = 30;
/// Largest file the `edit` tool reads (the server's message limit is the same order).
pub const MAX_EDIT_BYTES: usize = 16 * 1024 * 1024;

/// Why a tool call failed; the text goes back to the model as a tool error.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The arguments do not fit the tool's schema.
    #[error("invalid arguments: {0}")]
    InvalidArgument(String),
    /// No tool of that name.
    #[error(
        "unknown tool {0:?}; the tools are read, write, list, edit, exec, process_output, \
         process_list, process_signal and process_wait"
    )]
    UnknownTool(String),
    /// The bot could not be reached at all.
    #[error("{0}")]
    Unreachable(String),
    /// A container-server call failed.
    #[error("{op} {path}: {}", status_text(.status))]
    Call {
        /// The operation, e.g. "read".
        op: &'static str,
        /// The path (or command) involved.
        path: String,
        /// The server's answer.
        status: Status,
    },
    /// `read` of a binary file.
    #[error("{0}: the read tool only supports text files")]
    Binary(String),
    /// The edit could not be applied.
    #[error("edit {path}: {source}")]
    Edit {
        /// The file.
        path: String,
        /// Why.
        source: EditError,
    },
    /// Another write changed the file between the edit's read and its write.
    #[error(
        "edit {0}: the file changed while the edit was being applied; read it again and retry"
    )]
    Raced(String),
    /// A file too large for `edit`.
    #[error("edit {0}: the file is larger than 16 MiB")]
    TooLarge(String),
}

fn status_text(s: &Status) -> String {
    match s.code() {
        Code::NotFound => format!("not found ({})", s.message()),
        Code::Unavailable => format!("the bot is unreachable ({})", s.message()),
        Code::DeadlineExceeded => format!("timed out ({})", s.message()),
        _ => s.message().to_string(),
    }
}

impl ToolError {
    /// The gRPC status underneath, when the failure came from the container server.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ToolError::Call { status, .. } => Some(status),
            _ => None,
        }
    }
}

fn schema(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(m) => Arc::new(m),
        _ => Arc::new(JsonObject::new()),
    }
}

/// The tools' definitions with their input schemas.
pub fn definitions() -> Vec<Tool> {
    vec![
        Tool::new(
            "read",
            "Read a text file in the bot's container as numbered lines (`%6d\\t` + line). \
             Relative paths are under /data. Returns {content, total_lines}.",
            schema(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "file path; relative paths are under /data"},
                    "line_offset": {"type": "integer", "minimum": 1, "default": 1, "description": "first line, 1-based"},
                    "n_lines": {"type": "integer", "minimum": 1, "maximum": 200, "default": 200, "description": "how many lines"}
                },
                "required": ["path"]
            })),
        ),
        Tool::new(
            "write",
            "Write a whole file in the bot's container (parents are created). Returns {ok: true}.",
            schema(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string", "description": "the complete new content, kept byte for byte"}
                },
                "required": ["path", "content"]
            })),
        ),
        Tool::new(
            "list",
            "List a directory in the bot's container. Returns {path, entries: [{path, is_dir, \
             size, mode, mod_time}], truncated}.",
            schema(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "default": "."},
                    "recursive": {"type": "boolean", "default": false}
                }
            })),
        ),
        Tool::new(
            "edit",
            "Replace one occurrence of old_text with new_text in a file. An exact match is \
             tried first, then one that ignores trailing whitespace and quote, dash and space \
             variants; the match must be unique. Returns {ok: true}.",
            schema(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "old_text": {"type": "string"},
                    "new_text": {"type": "string"}
                },
                "required": ["path", "old_text", "new_text"]
            })),
        ),
        Tool::new(
            "exec",
            "Run a shell command (/bin/sh -c) in the bot's container. Returns {stdout, stderr, \
             exit_code}; long output is cut to its head and tail (only the first and last \
             512 KiB of stdout and 128 KiB of stderr are kept while it runs). With background: \
             true it starts the command as a process that keeps running after the call and \
             returns {id, pid} at once; read its output with process_output, stop it with \
             process_signal.",
            schema(json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string"},
                    "work_dir": {"type": "string", "default": "/data"},
                    "timeout_seconds": {"type": "integer", "minimum": 1, "default": 30, "description": "kill the command after this long; in the background the default is no timeout"},
                    "background": {"type": "boolean", "default": false, "description": "start it as a background process and return its id at once"},
                    "tag": {"type": "string", "maxLength": 128, "description": "background only: a label for process_list"}
                },
                "required": ["command"]
            })),
        ),
        Tool::new(
            "process_output",
            "Read a background process's output from byte offsets, without waiting. Returns \
             {stdout, stderr, next_offset, next_stderr_offset, more, state, running, exit_code \
             (once ended)}; pass next_offset back as offset to get only what is new. lost and a \
             LOST note appear when output was no longer kept.",
            schema(json!({
                "type": "object",
                "properties": {
                    "id": {"type": "string", "description": "the process id from exec with background"},
                    "offset": {"type": "integer", "minimum": 0, "default": 0, "description": "stdout byte offset to read from"},
                    "stderr_offset": {"type": "integer", "minimum": 0, "default": 0, "description": "stderr byte offset to read from"},
                    "max_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_PROCESS_OUTPUT_BYTES, "default": DEFAULT_PROCESS_OUTPUT_BYTES, "description": "most bytes returned, both streams together"}
                },
                "required": ["id"]
            })),
        ),
        Tool::new(
            "process_list",
            "List the bot's background processes, running and finished, oldest first. Returns \
             {processes: [{id, tag, command, pid, state, exit_code, signal, started_at, ...}]}.",
            schema(json!({
                "type": "object",
                "properties": {
                    "tag": {"type": "string", "description": "only processes with this tag"}
                }
            })),
        ),
        Tool::new(
            "process_signal",
            "Send a signal to a background process and its children (its process group). \
             Returns {ok, signal}.",
            schema(json!({
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "signal": {
                        "type": ["string", "integer"],
                        "default": "TERM",
                        "description": "a name (TERM, KILL, INT, HUP, SIGTERM) or a number (15)"
                    }
                },
                "required": ["id"]
            })),
        ),
        Tool::new(
            "process_wait",
            "Wait for a background process to end, up to timeout_seconds. Returns {exited, \
             state, exit_code, signal, timed_out, user_cpu_ms, system_cpu_ms, max_rss_bytes, \
             summary}; exited is false when the time ran out first.",
            schema(json!({
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "timeout_seconds": {"type": "integer", "minimum": 0, "maximum": process::MAX_WAIT_SECONDS, "default": process::DEFAULT_WAIT_SECONDS}
                },
                "required": ["id"]
            })),
        ),
    ]
}

/// Maps a tool path to the server's form: `/data` and `/data/...` become relative (the server
/// resolves those under its data directory), other paths pass unchanged.
pub fn server_path(p: &str) -> String {
    if p == DATA_DIR || p == "/data/" {
        return ".".into();
    }
    match p.strip_prefix("/data/") {
        Some(rest) => rest.to_string(),
        None => p.to_string(),
    }
}

/// The absolute form of a tool path, for results.
pub fn display_path(p: &str) -> String {
    let sp = server_path(p);
    let joined = if sp.starts_with('/') {
        sp
    } else {
        format!("{DATA_DIR}/{sp}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for seg in joined.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

fn str_arg<'a>(args: &'a JsonObject, key: &str) -> Result<Option<&'a str>, ToolError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ToolError::InvalidArgument(format!(
            "{key} must be a string"
        ))),
    }
}

fn req_str<'a>(args: &'a JsonObject, key: &str) -> Result<&'a str, ToolError> {
    str_arg(args, key)?.ok_or_else(|| ToolError::InvalidArgument(format!("{key} is required")))
}

fn path_arg(args: &JsonObject) -> Result<&str, ToolError> {
    let p = req_str(args, "path")?;
    if p.is_empty() {
        return Err(ToolError::InvalidArgument("path is empty".into()));
    }
    Ok(p)
}

fn int_arg(args: &JsonObject, key: &str) -> Result<Option<i64>, ToolError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| ToolError::InvalidArgument(format!("{key} must be an integer"))),
    }
}

fn bool_arg(args: &JsonObject, key: &str) -> Result<bool, ToolError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ToolError::InvalidArgument(format!(
            "{key} must be a boolean"
        ))),
    }
}

fn call_err<'a>(op: &'static str, path: &'a str) -> impl FnOnce(Status) -> ToolError + 'a {
    move |status| ToolError::Call {
        op,
        path: path.to_string(),
        status,
    }
}

/// Runs tool `name` with `args` against `client`; the result is the tool's JSON object.
pub async fn call(
    client: &ContainerClient,
    name: &str,
    args: &JsonObject,
) -> Result<Value, ToolError> {
    match name {
        "read" => read(client, args).await,
        "write" => write(client, args).await,
        "list" => list(client, args).await,
        "edit" => edit(client, args).await,
        "exec" => exec(client, args).await,
        "process_output" => process::output(client, args).await,
        "process_list" => process::list(client, args).await,
        "process_signal" => process::signal(client, args).await,
        "process_wait" => process::wait(client, args).await,
        other => Err(ToolError::UnknownTool(other.to_string())),
    }
}

async fn read(client: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let path = path_arg(args)?;
    let offset = int_arg(args, "line_offset")?.unwrap_or(1);
    if offset < 1 {
        return Err(ToolError::InvalidArgument(
            "line_offset must be at least 1".into(),
        ));
    }
    let n = int_arg(args, "n_lines")?.unwrap_or(200);
    if !(1..=200).contains(&n) {
        return Err(ToolError::InvalidArgument(
            "n_lines must be between 1 and 200".into(),
        ));
    }
    let offset = i32::try_from(offset)
        .map_err(|_| ToolError::InvalidArgument("line_offset is too large".into()))?;
    let r = client
        .read_file(&server_path(path), offset, n as i32)
        .await
        .map_err(call_err("read", path))?;
    if r.binary {
        return Err(ToolError::Binary(path.to_string()));
    }
    Ok(json!({"content": r.content, "total_lines": r.total_lines}))
}

async fn write(client: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let path = path_arg(args)?;
    let content = req_str(args, "content")?;
    client
        .write_file(
            &server_path(path),
            Bytes::copy_from_slice(content.as_bytes()),
        )
        .await
        .map_err(call_err("write", path))?;
    Ok(json!({"ok": true}))
}

async fn list(client: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let path = match str_arg(args, "path")? {
        None | Some("") => ".",
        Some(p) => p,
    };
    let recursive = bool_arg(args, "recursive")?;
    let entries = client
        .list_dir(&server_path(path), recursive)
        .await
        .map_err(call_err("list", path))?;
    let truncated = entries.len() > MAX_LIST_ENTRIES;
    let entries: Vec<Value> = entries
        .into_iter()
        .take(MAX_LIST_ENTRIES)
        .map(|e| {
            json!({"path": e.path, "is_dir": e.is_dir, "size": e.size, "mode": e.mode, "mod_time": e.mod_time})
        })
        .collect();
    Ok(json!({"path": display_path(path), "entries": entries, "truncated": truncated}))
}

/// Reads a whole file through `ReadRaw`.
async fn read_all(client: &ContainerClient, path: &str, shown: &str) -> Result<Vec<u8>, ToolError> {
    let mut s = client
        .read_raw(path)
        .await
        .map_err(call_err("edit", shown))?;
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(call_err("edit", shown))?;
        out.extend_from_slice(&chunk.data);
        if out.len() > MAX_EDIT_BYTES {
            return Err(ToolError::TooLarge(shown.to_string()));
        }
    }
    Ok(out)
}

async fn edit(client: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let path = path_arg(args)?;
    let old_text = req_str(args, "old_text")?;
    let new_text = req_str(args, "new_text")?;
    edit_with_hook(client, path, old_text, new_text, || async {}).await
}

/// The `edit` tool with `between` run after the edit was computed and before the race check
/// (tests use it to write the file concurrently).
pub async fn edit_with_hook<F, Fut>(
    client: &ContainerClient,
    path: &str,
    old_text: &str,
    new_text: &str,
    between: F,
) -> Result<Value, ToolError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let sp = server_path(path);
    let before = read_all(client, &sp, path).await?;
    let (after, kind) =
        edit::apply(&before, old_text, new_text).map_err(|source| ToolError::Edit {
            path: path.to_string(),
            source,
        })?;
    between().await;
    // Race check: the file must still hold exactly what the edit was computed from. What is
    // left is the short window between this read and the write below.
    let now = read_all(client, &sp, path).await?;
    if now != before {
        return Err(ToolError::Raced(path.to_string()));
    }
    client
        .write_file(&sp, Bytes::from(after))
        .await
        .map_err(call_err("edit", path))?;
    tracing::debug!(path, ?kind, "edit applied");
    Ok(json!({"ok": true}))
}

async fn exec(client: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let command = req_str(args, "command")?;
    if command.trim().is_empty() {
        return Err(ToolError::InvalidArgument("command is empty".into()));
    }
    let work_dir = process::work_dir(args)?;
    if process::background(args)? {
        return process::start(client, command, work_dir, args).await;
    }
    if args.get("tag").is_some_and(|t| !t.is_null()) {
        return Err(ToolError::InvalidArgument(
            "tag is only for background: true".into(),
        ));
    }
    let timeout = int_arg(args, "timeout_seconds")?.unwrap_or(DEFAULT_EXEC_TIMEOUT as i64);
    if timeout < 1 {
        return Err(ToolError::InvalidArgument(
            "timeout_seconds must be at least 1".into(),
        ));
    }
    let timeout = i32::try_from(timeout).unwrap_or(i32::MAX);
    let first = memoh_proto::pb::mcpcontainer::ExecInput {
        command: command.into(),
        work_dir,
        timeout_seconds: timeout,
        ..Default::default()
    };
    let mut out = client
        .exec(first, futures::stream::empty())
        .await
        .map_err(call_err("exec", command))?;
    let (stdout, stderr, exit_code) =
        collect_bounded(&mut out, EXEC_STDOUT_LIMIT, EXEC_STDERR_LIMIT)
            .await
            .map_err(call_err("exec", command))?;
    Ok(json!({
        "stdout": stdout.render(),
        "stderr": stderr.render(),
        "exit_code": exit_code,
    }))
}

mod output;
pub use output::*;

mod process;

#[cfg(test)]
mod tests;
