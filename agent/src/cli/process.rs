//! Durable processes in a bot through the agent's `memoh.process.v1.ProcessService` router:
//! `exec --detach`, `ps`, `attach`, `kill`, `wait` and `rm`. A process started here belongs to
//! the bot, not to this CLI call: it keeps running when the call ends, when the connection
//! drops and when the agent restarts; its output stays addressable by byte offsets.

use std::path::Path;
use std::time::Duration;

use memoh_proto::client::CallMetadata;
use memoh_proto::limits::MAX_MESSAGE_SIZE;
use memoh_proto::pb::process::attach_output::Kind;
use memoh_proto::pb::process::process_service_client::ProcessServiceClient;
use memoh_proto::pb::process::{
    AttachRequest, ListRequest, ProcessInfo, RemoveRequest, SignalRequest, StartRequest,
    WaitRequest,
};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::exec::command_line;
use super::{bot_client, status_err, CliError};
use crate::procs;

/// The exit code of `wait --timeout` when the process still runs (as timeout(1) uses it).
pub const STILL_RUNNING: u8 = 124;
/// The exit code of `attach` detached by Ctrl-C (128 + SIGINT).
pub const DETACHED: u8 = 130;

/// The generated `ProcessService` client, routed to one bot by the agent.
type Client = ProcessServiceClient<InterceptedService<Channel, CallMetadata>>;

/// A process client of `bot` through the agent's socket (`x-memoh-bot` metadata).
fn client(socket: &Path, bot: &str) -> Result<Client, CliError> {
    let c = bot_client(socket, bot)?;
    Ok(ProcessServiceClient::new(c.http())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE))
}

/// What `exec --detach` starts.
#[derive(Debug, Default)]
pub struct Detached {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// Working directory inside the bot (empty: the data directory).
    pub work_dir: Option<String>,
    /// `KEY=VALUE` entries added to the environment.
    pub env: Vec<String>,
    /// Label for `ps --tag`.
    pub tag: Option<String>,
    /// Run on a pseudo-terminal of its own.
    pub tty: bool,
    /// Seconds before the process group is killed (0: never).
    pub timeout: i32,
}

/// Checks `KEY=VALUE` entries: a non-empty key without `=` or NUL.
fn check_env(env: &[String]) -> Result<(), CliError> {
    for e in env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() && !e.contains('\0') => {}
            _ => {
                return Err(CliError {
                    message: format!("-e {e:?}: expected KEY=VALUE"),
                    code: 2,
                })
            }
        }
    }
    Ok(())
}

/// `exec --detach`: starts the process and prints its id alone on stdout.
pub async fn exec_detach(socket: &Path, bot: &str, d: Detached) -> Result<u8, CliError> {
    if d.argv.is_empty() {
        return Err(CliError::new("exec needs a command after --"));
    }
    check_env(&d.env)?;
    let mut c = client(socket, bot)?;
    let r = c
        .start(StartRequest {
            command: command_line(&d.argv),
            env: d.env,
            work_dir: d.work_dir.unwrap_or_default(),
            pty: d.tty,
            tag: d.tag.unwrap_or_default(),
            timeout_seconds: d.timeout,
            ..Default::default()
        })
        .await
        .map_err(|s| status_err(socket, s))?
        .into_inner();
    println!("{}", r.id);
    Ok(0)
}

/// `ps`: the bot's live and kept processes, as a table or one JSON array.
pub async fn ps(socket: &Path, bot: &str, json: bool, tag: Option<String>) -> Result<u8, CliError> {
    let mut c = client(socket, bot)?;
    let list = c
        .list(ListRequest {
            tag: tag.unwrap_or_default(),
        })
        .await
        .map_err(|s| status_err(socket, s))?
        .into_inner()
        .processes;
    if json {
        let v: Vec<_> = list.iter().map(procs::info_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| "[]".into())
        );
    } else {
        print!("{}", procs::table(&list));
    }
    Ok(0)
}

/// The exit status of an ended process, with its one line on stderr.
fn report_end(verb: &str, id: &str, info: &ProcessInfo) -> u8 {
    eprintln!("memoh-agent: {verb}: {id} {}", procs::end_line(info));
    procs::exit_status(info)
}

/// How long `attach` keeps trying to attach again after its connection was lost (an agent
/// restart, a dropped socket) before it gives up.
const REATTACH_FOR: Duration = Duration::from_secs(60);

/// How one attach call ended.
enum Followed {
    /// The process ended, or the user detached: the CLI's exit status.
    Done(u8),
    /// The call broke (the reason); attaching again at the offsets reached goes on.
    Broken(String),
    /// The call failed in a way attaching again would not mend.
    Failed(tonic::Status),
}

/// Whether a failed attach call may be made again: the connection or the agent went away,
/// not the process or the request.
fn may_reattach(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// `attach`: output to stdout and stderr as it comes (from now, or replayed from the start),
/// ending with the process's exit status as `wait` gives it. SIGINT or SIGTERM detaches and
/// leaves the process running. A lost connection (the agent restarting, the socket dropped)
/// is attached again at the byte offsets reached, so nothing is printed twice or skipped; the
/// CLI gives up after [`REATTACH_FOR`] without a working call.
pub async fn attach(socket: &Path, bot: &str, id: &str, from_start: bool) -> Result<u8, CliError> {
    let mut c = client(socket, bot)?;
    // Watched before the call: a Ctrl-C must never kill this CLI with the call half done.
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return Err(CliError::new("cannot watch for Ctrl-C"));
    };
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    // "From now" is the output's current length, so that attaching again after a lost
    // connection goes on from offsets and never skips what was written in between.
    let mut at = if from_start {
        Some((0, 0))
    } else {
        let list = c
            .list(ListRequest::default())
            .await
            .map_err(|s| status_err(socket, s))?
            .into_inner()
            .processes;
        list.iter()
            .find(|p| p.id == id)
            .map(|p| (p.stdout_bytes, p.stderr_bytes))
    };
    let mut attached_once = false;
    let mut lost_since: Option<std::time::Instant> = None;
    loop {
        let req = match at {
            Some((stdout_offset, stderr_offset)) => AttachRequest {
                id: id.to_string(),
                stdout_offset,
                stderr_offset,
                ..Default::default()
            },
            // Not listed: the server's answer to the attach names the problem.
            None => AttachRequest {
                id: id.to_string(),
                from_end: true,
                ..Default::default()
            },
        };
        let broken = match c.attach(req).await {
            Ok(r) => {
                attached_once = true;
                let mut s = r.into_inner();
                let followed = follow(
                    id,
                    &mut s,
                    &mut at,
                    &mut lost_since,
                    (&mut stdout, &mut stderr),
                    (&mut int, &mut term),
                )
                .await;
                match followed {
                    Followed::Done(code) => return Ok(code),
                    Followed::Broken(why) => why,
                    Followed::Failed(s) => return Err(status_err(socket, s)),
                }
            }
            Err(s) if attached_once && may_reattach(&s) => s.message().to_string(),
            Err(s) => return Err(status_err(socket, s)),
        };
        let since = *lost_since.get_or_insert_with(|| {
            eprintln!("memoh-agent: attach: lost the connection ({broken}); attaching again");
            std::time::Instant::now()
        });
        if since.elapsed() >= REATTACH_FOR {
            return Err(CliError::new(format!(
                "lost the output of {id} ({broken}) and could not attach again within {} s; \
                 attach again to go on",
                REATTACH_FOR.as_secs()
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = int.recv() => return Ok(detach(id, &mut stdout).await),
            _ = term.recv() => return Ok(detach(id, &mut stdout).await),
        }
    }
}

/// Prints one attach call's output, keeping `at` at the next offsets of both streams.
async fn follow(
    id: &str,
    s: &mut tonic::Streaming<memoh_proto::pb::process::AttachOutput>,
    at: &mut Option<(u64, u64)>,
    lost_since: &mut Option<std::time::Instant>,
    (stdout, stderr): (&mut tokio::io::Stdout, &mut tokio::io::Stderr),
    (int, term): (
        &mut tokio::signal::unix::Signal,
        &mut tokio::signal::unix::Signal,
    ),
) -> Followed {
    loop {
        let m = tokio::select! {
            m = s.message() => m,
            _ = int.recv() => return Followed::Done(detach(id, stdout).await),
            _ = term.recv() => return Followed::Done(detach(id, stdout).await),
        };
        let m = match m {
            Ok(Some(m)) => m,
            Ok(None) => return Followed::Broken("the output ended before the process".into()),
            Err(s) if may_reattach(&s) => return Followed::Broken(s.message().to_string()),
            Err(s) => return Followed::Failed(s),
        };
        *lost_since = None;
        let (out_next, err_next) = at.get_or_insert((0, 0));
        match Kind::try_from(m.kind) {
            Ok(Kind::Stdout) => {
                *out_next = m.offset + m.data.len() as u64;
                let _ = stdout.write_all(&m.data).await;
                let _ = stdout.flush().await;
            }
            Ok(Kind::Stderr) => {
                *err_next = m.offset + m.data.len() as u64;
                let _ = stderr.write_all(&m.data).await;
                let _ = stderr.flush().await;
            }
            Ok(Kind::Lost) => {
                let stream = if m.stream == Kind::Stderr as i32 {
                    *err_next = m.next_offset;
                    "stderr"
                } else {
                    *out_next = m.next_offset;
                    "stdout"
                };
                eprintln!(
                    "memoh-agent: attach: {} bytes of {stream} were not kept (offsets {} to {})",
                    m.next_offset.saturating_sub(m.offset),
                    m.offset,
                    m.next_offset
                );
            }
            Ok(Kind::Exit) => {
                let _ = stdout.flush().await;
                let info = m.info.unwrap_or_default();
                return Followed::Done(report_end("attach", id, &info));
            }
            Ok(Kind::End) => {
                return Followed::Broken(
                    "the server ended the output while the process runs".into(),
                )
            }
            Err(_) => {}
        }
    }
}

/// Leaves the process running: flushes what was printed and says so.
async fn detach(id: &str, stdout: &mut tokio::io::Stdout) -> u8 {
    let _ = stdout.flush().await;
    eprintln!("memoh-agent: attach: detached; {id} keeps running");
    DETACHED
}

/// `kill`: sends `sig` (a name or number) to the process's group.
pub async fn kill(socket: &Path, bot: &str, id: &str, sig: &str) -> Result<u8, CliError> {
    let n = procs::parse_signal(sig).map_err(|e| CliError {
        message: e,
        code: 2,
    })?;
    let mut c = client(socket, bot)?;
    c.signal(SignalRequest {
        id: id.to_string(),
        signal: n,
    })
    .await
    .map_err(|s| status_err(socket, s))?;
    Ok(0)
}

/// `wait`: waits for the process to end (at most `timeout` seconds, 0: no limit) and exits
/// with its status: its code, or 128+N after signal N, saying which on stderr.
pub async fn wait(socket: &Path, bot: &str, id: &str, timeout: u32) -> Result<u8, CliError> {
    let mut c = client(socket, bot)?;
    let timeout_ms =
        u32::try_from(Duration::from_secs(u64::from(timeout)).as_millis()).unwrap_or(u32::MAX);
    let r = c
        .wait(WaitRequest {
            id: id.to_string(),
            timeout_ms,
        })
        .await
        .map_err(|s| status_err(socket, s))?
        .into_inner();
    let info = r.info.unwrap_or_default();
    if !r.exited {
        return Err(CliError {
            message: format!("{id} is still running after {timeout} s"),
            code: STILL_RUNNING,
        });
    }
    Ok(report_end("wait", id, &info))
}

/// `rm`: forgets a finished process and deletes its kept output.
pub async fn rm(socket: &Path, bot: &str, id: &str) -> Result<u8, CliError> {
    let mut c = client(socket, bot)?;
    c.remove(RemoveRequest { id: id.to_string() })
        .await
        .map_err(|s| status_err(socket, s))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_entries() {
        assert!(check_env(&["A=1".into(), "B=".into(), "C=x=y".into()]).is_ok());
        for bad in ["A", "=1", ""] {
            let e = check_env(&[bad.into()]).unwrap_err();
            assert_eq!(e.code, 2, "{bad}");
            assert!(e.message.contains("KEY=VALUE"), "{}", e.message);
        }
    }
}
