//! Running the host tools the network module depends on (`ip`, `iptables`, CNI plugins).
//!
//! Every child runs in its own process group with `kill_on_drop`, so a timeout or a dropped
//! future takes the whole group down, not just the first process.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::AgentError;

/// What a finished child produced.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

impl Finished {
    /// Whether the child exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Standard error as trimmed text, for error messages.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }

    /// Standard output as trimmed text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

/// Runs `program args` with `envs` added to the inherited environment (minus `CNI_ARGS`, which
/// must never leak from the agent's own environment into a plugin), feeding `stdin`, and
/// waits at most `timeout`. `op` names the step in errors.
pub(crate) async fn run<I, S>(
    op: &str,
    program: &OsStr,
    args: I,
    envs: &[(&str, &OsStr)],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Finished, AgentError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd.env_remove("CNI_ARGS");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| AgentError::Network {
        op: op.to_string(),
        reason: format!("cannot run {}: {e}", program.to_string_lossy()),
    })?;
    let pid = child.id();
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        // A separate task, so a child that writes before reading all its input cannot
        // deadlock against us.
        tokio::spawn(async move {
            let _ = pipe.write_all(&data).await;
            let _ = pipe.shutdown().await;
        });
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Finished {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: out.stderr,
        }),
        Ok(Err(e)) => Err(AgentError::Network {
            op: op.to_string(),
            reason: format!("waiting for {}: {e}", program.to_string_lossy()),
        }),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // The child leads its own group (process_group(0)): kill all of it.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(AgentError::Timeout(format!(
                "{op}: {} did not finish within {timeout:?}",
                program.to_string_lossy()
            )))
        }
    }
}
