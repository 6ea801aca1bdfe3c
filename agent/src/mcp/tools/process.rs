//! The process tools: `exec` with `background` (Start), `process_output` (Attach without
//! following), `process_list`, `process_signal` and `process_wait`, over the bot's
//! `memoh.process.v1.ProcessService`. A process started here belongs to the bot: it keeps
//! running between tool calls, so a model can start a server, poll its log and stop it across
//! many calls.

use memoh_proto::client::CallMetadata;
use memoh_proto::limits::MAX_MESSAGE_SIZE;
use memoh_proto::pb::process::attach_output::Kind;
use memoh_proto::pb::process::process_service_client::ProcessServiceClient;
use memoh_proto::pb::process::{
    AttachRequest, ListRequest, ProcessInfo, SignalRequest, StartRequest, WaitRequest,
};
use memoh_proto::ContainerClient;
use rmcp::model::JsonObject;
use serde_json::{json, Value};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{bool_arg, call_err, int_arg, req_str, server_path, str_arg, ToolError};
use crate::procs;

/// Default `max_bytes` of `process_output`.
pub const DEFAULT_OUTPUT_BYTES: u64 = 64 * 1024;
/// Largest `max_bytes` of `process_output`.
pub const MAX_OUTPUT_BYTES: u64 = 1024 * 1024;
/// Default `timeout_seconds` of `process_wait`.
pub const DEFAULT_WAIT_SECONDS: i64 = 30;
/// Largest `timeout_seconds` of `process_wait` (one tool call should not hang for long).
pub const MAX_WAIT_SECONDS: i64 = 300;

type Client = ProcessServiceClient<InterceptedService<Channel, CallMetadata>>;

fn client(c: &ContainerClient) -> Client {
    ProcessServiceClient::new(c.http())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

fn id_arg(args: &JsonObject) -> Result<&str, ToolError> {
    let id = req_str(args, "id")?;
    if id.is_empty() {
        return Err(ToolError::InvalidArgument("id is empty".into()));
    }
    Ok(id)
}

fn offset_arg(args: &JsonObject, key: &str) -> Result<u64, ToolError> {
    let v = int_arg(args, key)?.unwrap_or(0);
    u64::try_from(v).map_err(|_| ToolError::InvalidArgument(format!("{key} must not be negative")))
}

/// `exec` with `background: true`: starts the command and returns `{id, pid}` at once.
pub(super) async fn start(
    c: &ContainerClient,
    command: &str,
    work_dir: String,
    args: &JsonObject,
) -> Result<Value, ToolError> {
    let tag = str_arg(args, "tag")?.unwrap_or_default();
    // In the background the default 30 s would kill a server: no timeout unless asked.
    let timeout = match int_arg(args, "timeout_seconds")? {
        None => 0,
        Some(t) if t < 1 => {
            return Err(ToolError::InvalidArgument(
                "timeout_seconds must be at least 1".into(),
            ))
        }
        Some(t) => i32::try_from(t).unwrap_or(i32::MAX),
    };
    let r = client(c)
        .start(StartRequest {
            command: command.into(),
            work_dir,
            tag: tag.into(),
            timeout_seconds: timeout,
            ..Default::default()
        })
        .await
        .map_err(call_err("exec", command))?
        .into_inner();
    Ok(json!({"id": r.id, "pid": r.pid}))
}

/// Decodes `bytes` as text up to the last complete character; returns the text and how many
/// bytes it used. Bytes that are not UTF-8 are replaced (and counted as used); an incomplete
/// character at the end is left for the next call unless `last` (nothing more will come).
fn text_of(bytes: &[u8], last: bool) -> (String, usize) {
    let mut out = String::new();
    let mut rest = bytes;
    let mut used = 0;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return (out, used + rest.len());
            }
            Err(e) => {
                let good = e.valid_up_to();
                // SAFETY-free: `good` bytes were just checked to be UTF-8.
                out.push_str(std::str::from_utf8(&rest[..good]).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{fffd}');
                        used += good + bad;
                        rest = &rest[good + bad..];
                    }
                    None if last => {
                        out.push('\u{fffd}');
                        return (out, used + rest.len());
                    }
                    None => return (out, used + good),
                }
            }
        }
    }
}

/// One stream's output of a `process_output` call.
struct Collected {
    data: Vec<u8>,
    next: u64,
}

/// `process_output`: what the process wrote from the given offsets, without waiting.
pub(super) async fn output(c: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let id = id_arg(args)?;
    let stdout_offset = offset_arg(args, "offset")?;
    let stderr_offset = offset_arg(args, "stderr_offset")?;
    let max = match int_arg(args, "max_bytes")? {
        None => DEFAULT_OUTPUT_BYTES,
        Some(n) if n < 1 => {
            return Err(ToolError::InvalidArgument(
                "max_bytes must be at least 1".into(),
            ))
        }
        // At least one whole character of any width.
        Some(n) => (n as u64).clamp(4, MAX_OUTPUT_BYTES),
    };
    let mut s = client(c)
        .attach(AttachRequest {
            id: id.into(),
            stdout_offset,
            stderr_offset,
            no_follow: true,
            max_bytes: max,
            ..Default::default()
        })
        .await
        .map_err(call_err("process_output", id))?
        .into_inner();
    let mut out = Collected {
        data: Vec::new(),
        next: stdout_offset,
    };
    let mut err = Collected {
        data: Vec::new(),
        next: stderr_offset,
    };
    let mut lost = Vec::new();
    let mut info: Option<ProcessInfo> = None;
    while let Some(m) = s.message().await.map_err(call_err("process_output", id))? {
        match Kind::try_from(m.kind) {
            Ok(k @ (Kind::Stdout | Kind::Stderr)) => {
                let c = if k == Kind::Stdout {
                    &mut out
                } else {
                    &mut err
                };
                c.data.extend_from_slice(&m.data);
                c.next = m.offset + m.data.len() as u64;
            }
            Ok(Kind::Lost) => {
                let stderr = m.stream == Kind::Stderr as i32;
                let c = if stderr { &mut err } else { &mut out };
                c.next = c.next.max(m.next_offset);
                lost.push(json!({
                    "stream": if stderr { "stderr" } else { "stdout" },
                    "from": m.offset,
                    "to": m.next_offset,
                    "bytes": m.next_offset.saturating_sub(m.offset),
                }));
            }
            Ok(Kind::Exit | Kind::End) => {
                info = m.info;
                memoh_proto::client::finish_after_exit(&mut s).await;
                break;
            }
            Err(_) => {}
        }
    }
    let info = info.ok_or_else(|| ToolError::Call {
        op: "process_output",
        path: id.into(),
        status: tonic::Status::unavailable("the output ended without the process's state"),
    })?;
    let ended = procs::has_ended(&info);
    // Everything of a stream was read once the next offset reaches what the process wrote.
    let out_last = ended && out.next >= info.stdout_bytes;
    let err_last = ended && err.next >= info.stderr_bytes;
    let (stdout, used) = text_of(&out.data, out_last);
    let next_offset = out.next - (out.data.len() - used) as u64;
    let (stderr, used) = text_of(&err.data, err_last);
    let next_stderr_offset = err.next - (err.data.len() - used) as u64;
    let more = next_offset < info.stdout_bytes || next_stderr_offset < info.stderr_bytes;
    let mut v = json!({
        "id": id,
        "stdout": stdout,
        "stderr": stderr,
        "next_offset": next_offset,
        "next_stderr_offset": next_stderr_offset,
        "more": more,
        "state": procs::state_word(&info),
        "running": !ended,
    });
    if ended {
        v["exit_code"] = json!(info.exit_code);
        if info.signal > 0 {
            v["signal"] = json!(info.signal);
        }
    }
    if !lost.is_empty() {
        let total: u64 = lost.iter().filter_map(|l| l["bytes"].as_u64()).sum();
        v["lost"] = Value::Array(lost);
        v["note"] = json!(format!(
            "LOST: {total} bytes of output were no longer kept and are missing here"
        ));
    }
    Ok(v)
}

/// `process_list`: the bot's processes (optionally of one tag), oldest first.
pub(super) async fn list(c: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let tag = str_arg(args, "tag")?.unwrap_or_default();
    let r = client(c)
        .list(ListRequest { tag: tag.into() })
        .await
        .map_err(call_err("process_list", tag))?
        .into_inner();
    let v: Vec<Value> = r.processes.iter().map(procs::info_json).collect();
    Ok(json!({"processes": v}))
}

/// `process_signal`: a signal (name or number) to the process's group.
pub(super) async fn signal(c: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let id = id_arg(args)?;
    let n = match args.get("signal") {
        None | Some(Value::Null) => 15,
        Some(Value::String(s)) => procs::parse_signal(s).map_err(ToolError::InvalidArgument)?,
        Some(v) => match v.as_i64() {
            Some(n) if (1..=i64::from(procs::MAX_SIGNAL)).contains(&n) => n as i32,
            _ => {
                return Err(ToolError::InvalidArgument(format!(
                    "signal must be a name such as TERM or a number from 1 to {}",
                    procs::MAX_SIGNAL
                )))
            }
        },
    };
    client(c)
        .signal(SignalRequest {
            id: id.into(),
            signal: n,
        })
        .await
        .map_err(call_err("process_signal", id))?;
    Ok(json!({"ok": true, "signal": n, "signal_name": procs::signal_name(n)}))
}

/// `process_wait`: waits up to `timeout_seconds` for the end; says how it ended.
pub(super) async fn wait(c: &ContainerClient, args: &JsonObject) -> Result<Value, ToolError> {
    let id = id_arg(args)?;
    let t = int_arg(args, "timeout_seconds")?.unwrap_or(DEFAULT_WAIT_SECONDS);
    if t < 0 {
        return Err(ToolError::InvalidArgument(
            "timeout_seconds must not be negative".into(),
        ));
    }
    let t = t.min(MAX_WAIT_SECONDS);
    let r = client(c)
        .wait(WaitRequest {
            id: id.into(),
            // 0 would mean no limit: a zero timeout asks for the state now (1 ms).
            timeout_ms: (t as u32 * 1000).max(1),
        })
        .await
        .map_err(call_err("process_wait", id))?
        .into_inner();
    let info = r.info.unwrap_or_default();
    let p = procs::info_json(&info);
    let mut v = json!({
        "id": id,
        "exited": r.exited,
        "state": p["state"],
        "exit_code": p["exit_code"],
        "signal": p["signal"],
        "signal_name": p["signal_name"],
        "timed_out": info.timed_out,
        "user_cpu_ms": p["user_cpu_ms"],
        "system_cpu_ms": p["system_cpu_ms"],
        "max_rss_bytes": p["max_rss_bytes"],
    });
    if r.exited {
        v["summary"] = json!(procs::end_line(&info));
    } else {
        v["summary"] = json!(format!("still running after {t} s"));
    }
    Ok(v)
}

/// Whether `exec` was asked to run in the background.
pub(super) fn background(args: &JsonObject) -> Result<bool, ToolError> {
    bool_arg(args, "background")
}

/// The work directory argument in the server's form.
pub(super) fn work_dir(args: &JsonObject) -> Result<String, ToolError> {
    Ok(match str_arg(args, "work_dir")? {
        None | Some("") => String::new(),
        Some(d) => server_path(d),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stops_before_a_split_character() {
        let s = "a€b".as_bytes(); // € is 3 bytes
        assert_eq!(text_of(s, false), ("a€b".into(), 5));
        assert_eq!(text_of(&s[..2], false), ("a".into(), 1));
        assert_eq!(text_of(&s[..3], false), ("a".into(), 1));
        assert_eq!(text_of(&s[..3], true), ("a\u{fffd}".into(), 3));
        assert_eq!(text_of(b"x\xffy", false), ("x\u{fffd}y".into(), 3));
        assert_eq!(text_of(b"", false), (String::new(), 0));
    }
}
