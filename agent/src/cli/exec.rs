//! `exec` and `cp`: commands and files in a bot, through the agent's ContainerService router.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use memoh_proto::pb::mcpcontainer::exec_output::Stream as OutKind;
use memoh_proto::pb::mcpcontainer::ExecInput;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::progress::{Progress, Unit};
use super::{bot_client, shell_quote, status_err, CliError};

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
    let command = command_line(argv);
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

/// The command line of `argv`: one word as it is (the server runs it through the shell, or
/// directly), several quoted for `/bin/sh`.
pub(super) fn command_line(argv: &[String]) -> String {
    if argv.len() == 1 {
        argv[0].clone()
    } else {
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `cp SRC DST`: exactly one side is `BOT:PATH`. Streams any size; downloads land atomically.
/// On a terminal a bar shows the bytes copied.
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
            let f =
                std::fs::File::open(&local).map_err(|e| CliError::new(format!("{src}: {e}")))?;
            let mut progress = Progress::stderr();
            progress.set("sending", Unit::Bytes, 0, md.len());
            let sent = progress.counter();
            // A read error aborts the upload: the bot keeps its old file.
            let stream = super::fileio::reader(f).inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    sent(chunk.len() as u64);
                }
            });
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
            progress.done();
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
            let file = tmp
                .reopen()
                .map_err(|e| CliError::new(format!("{}: {e}", parent.display())))?;
            let mut out = super::fileio::Writer::new(file)
                .map_err(|e| CliError::new(format!("{}: {e}", local.display())))?;
            let mut progress = Progress::stderr();
            // The size is asked only to draw a bar; without it a spinner counts the bytes.
            let total = if progress.is_drawn() {
                client.stat(path).await.map_or(0, |e| e.size.max(0) as u64)
            } else {
                0
            };
            progress.set("receiving", Unit::Bytes, 0, total);
            let mut s = client
                .read_raw(path)
                .await
                .map_err(|s| status_err(socket, s))?;
            while let Some(c) = s.message().await.map_err(|s| status_err(socket, s))? {
                let n = c.data.len() as u64;
                out.write(c.data)
                    .await
                    .map_err(|e| CliError::new(format!("{}: {e}", local.display())))?;
                progress.inc(n);
            }
            progress.done();
            let file = out
                .finish()
                .await
                .map_err(|e| CliError::new(format!("{}: {e}", local.display())))?;
            drop(file);
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
