//! `bridgepb` Exec's own conventions (WIRE-BRIDGE.md section 3) on top of the shared exec:
//! PTY mode ([`crate::pty`]), the `clean_env` / `unset_env` rule ([`crate::exec_env`]), and for
//! pipe mode 128+N exit codes, no timeout for a negative `timeout_seconds`, and a command with
//! a timeout outliving its client ([`Dialect::Bridge`]). A relative `work_dir` joins the data
//! directory and `timeout_seconds` 0 means the server's default (30 s) as for `mcpcontainer`.

use bytes::Bytes;
use futures::StreamExt;
use memoh_proto::pb::bridgepb as bp;
use memoh_proto::pb::mcpcontainer as mp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::debug;

use crate::convert;
use crate::exec::{Dialect, ExecSpec};
use crate::exec_env;
use crate::pty::{self, PtyInput, TermSize, DEFAULT_SIZE, PTY_DEFAULT_TIMEOUT};
use crate::service::{BoxStream, Service};

/// The bridge's changes to a pipe-mode request, from its first message (`None`: there was
/// none, and the request fails before this matters).
pub(crate) fn pipe_conventions(
    first: Option<&bp::ExecInput>,
) -> impl FnOnce(&mut ExecSpec) + Send + 'static {
    let (no_timeout, clean, unset) = first
        .map(|m| (m.timeout_seconds < 0, m.clean_env, m.unset_env.clone()))
        .unwrap_or_default();
    move |spec: &mut ExecSpec| {
        spec.dialect = Dialect::Bridge;
        if no_timeout {
            spec.timeout = None;
        }
        spec.exact_env = exec_env::bridge_base(std::env::vars_os(), clean, &unset);
    }
}

/// Runs a PTY exec whose first message is `first`; later messages of `inbound` resize the
/// terminal and type into it. The output is in `mcpcontainer` form, for the caller to rename.
pub(crate) async fn pty(
    svc: &Service,
    first: bp::ExecInput,
    mut inbound: Streaming<bp::ExecInput>,
) -> Result<BoxStream<mp::ExecOutput>, Status> {
    let work_dir = svc.exec_work_dir(&first.work_dir)?;
    let size = first
        .resize
        .and_then(|r| TermSize::from_request(r.cols, r.rows))
        .unwrap_or(DEFAULT_SIZE);
    // The first message's stdin is not typed in: the terminal starts empty.
    let mut spec = ExecSpec::new(
        first.command,
        work_dir,
        &first.env,
        first.timeout_seconds,
        PTY_DEFAULT_TIMEOUT,
        Bytes::new(),
    )?;
    spec.dialect = Dialect::Bridge;
    spec.exact_env = exec_env::bridge_base(std::env::vars_os(), first.clean_env, &first.unset_env);
    debug!(command = %spec.command, cols = size.cols, rows = size.rows, "pty exec");
    let running = pty::start(spec, size, svc.reaper())?;
    let (in_tx, in_rx) = mpsc::channel::<PtyInput>(16);
    let gone = CancellationToken::new();
    let abort = gone.clone();
    tokio::spawn(async move {
        loop {
            match inbound.next().await.transpose() {
                Ok(Some(m)) => {
                    let size = m
                        .resize
                        .and_then(|r| TermSize::from_request(r.cols, r.rows));
                    if size.is_none() && m.stdin_data.is_empty() {
                        continue;
                    }
                    let input = PtyInput {
                        size,
                        data: m.stdin_data,
                    };
                    if in_tx.send(input).await.is_err() {
                        return; // the command ended
                    }
                }
                // The client's half-close changes nothing: the terminal runs on.
                Ok(None) => return,
                Err(s) => {
                    debug!(status = %s.message(), "pty exec request stream ended badly");
                    abort.cancel();
                    return;
                }
            }
        }
    });
    let (out_tx, out_rx) = mpsc::channel(32);
    tokio::spawn(running.drive(in_rx, out_tx, svc.kill_token(), gone));
    let stream = ReceiverStream::new(out_rx).map(|ev| Ok(convert::exec_output(ev)));
    Ok(Box::pin(stream))
}
