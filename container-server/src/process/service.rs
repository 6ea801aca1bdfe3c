//! `memoh.process.v1.ProcessService` handlers over the [`Registry`]: validate, call, map.
//!
//! Attach runs as a task of its own per call: it reads each stream from the record at its own
//! offsets (the ring when the bytes are still there, else the spill file, else a LOST message
//! naming the first kept offset), sends chunks that carry their stream and offset, and sleeps
//! on the record's change counter when it has caught up. A slow attacher only falls behind
//! into the files; it never holds up the reader task or the process.

use std::sync::Arc;
use std::time::Duration;

use memoh_proto::pb::process as pb;
use pb::attach_output::Kind;
use pb::process_service_server::ProcessService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, instrument};

use super::output::{read_file, Read};
use super::{start_size, Process, Registry, StartSpec};
use crate::error::ServerError;
use crate::exec::ExecSpec;
use crate::pty::TermSize;
use crate::service::{BoxStream, Service};

/// The largest chunk an Attach sends.
pub const ATTACH_CHUNK: usize = 1024 * 1024;

/// The process service: the registry plus the container service's work-dir rules.
#[derive(Clone)]
pub struct Processes {
    registry: Registry,
    svc: Service,
}

impl Processes {
    /// The service over `registry`; `svc` resolves work dirs as Exec does.
    pub fn new(registry: Registry, svc: Service) -> Self {
        Self { registry, svc }
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn get(&self, id: &str) -> Result<Arc<Process>, Status> {
        Ok(self.registry.get(id)?)
    }
}

/// A process as List shows it.
pub fn info(p: &Process) -> pb::ProcessInfo {
    let st = p.lock();
    let mut i = pb::ProcessInfo {
        id: p.id.clone(),
        tag: p.tag.clone(),
        command: p.command.clone(),
        pid: p.pid,
        started_at_ms: p.started_at_ms,
        state: pb::State::Running as i32,
        pty: p.pty,
        stdout_bytes: st.out.total(),
        stderr_bytes: st.err.total(),
        stdout_first_offset: st.out.first_offset(),
        stderr_first_offset: st.err.first_offset(),
        ..Default::default()
    };
    if let Some(e) = st.ended {
        i.exit_code = e.code();
        i.state = match e.exit {
            crate::reaper::Exit::Code(_) => pb::State::Exited,
            crate::reaper::Exit::Signal(_) => pb::State::Signaled,
        } as i32;
        if let crate::reaper::Exit::Signal(n) = e.exit {
            i.signal = n;
        }
        i.usage = Some(e.usage.map(usage).unwrap_or_default());
        i.ended_at_ms = e.at_ms;
        i.timed_out = e.timed_out;
    }
    i
}

fn usage(u: crate::reaper::Usage) -> pb::ResourceUsage {
    let w = crate::convert::resource_usage(u);
    pb::ResourceUsage {
        user_cpu_micros: w.user_cpu_micros,
        system_cpu_micros: w.system_cpu_micros,
        max_rss_bytes: w.max_rss_bytes,
    }
}

/// One attacher's position and bounds.
struct Cursor {
    pos: [u64; 2],
    no_follow: bool,
    /// Bytes still allowed (no_follow with max_bytes), else `None`.
    budget: Option<u64>,
}

fn kind_of(stream: usize) -> Kind {
    if stream == 0 {
        Kind::Stdout
    } else {
        Kind::Stderr
    }
}

/// The next message for `stream` at `pos` (at most `max` bytes) and the offset after it;
/// `None` when there is nothing new.
fn step(
    p: &Process,
    stream: usize,
    pos: u64,
    max: usize,
) -> Result<Option<(pb::AttachOutput, u64)>, Status> {
    let read = {
        let st = p.lock();
        let s = if stream == 0 { &st.out } else { &st.err };
        s.read_at(pos, max)
    }
    .map_err(|e| Status::internal(format!("reading output of process {}: {e}", p.id)))?;
    let kind = kind_of(stream);
    let data = match read {
        Read::Nothing => return Ok(None),
        Read::Lost { first } => {
            return Ok(Some((
                pb::AttachOutput {
                    kind: Kind::Lost as i32,
                    offset: pos,
                    stream: kind as i32,
                    next_offset: first,
                    ..Default::default()
                },
                first,
            )))
        }
        Read::Data(b) => b,
        // Page-cache reads of at most one chunk: short enough to do in place.
        Read::File { file, pos: at, len } => read_file(&file, at, len)
            .map_err(|e| Status::internal(format!("reading output of process {}: {e}", p.id)))?,
    };
    if data.is_empty() {
        return Ok(None);
    }
    let next = pos + data.len() as u64;
    Ok(Some((
        pb::AttachOutput {
            kind: kind as i32,
            data,
            offset: pos,
            ..Default::default()
        },
        next,
    )))
}

/// Streams `p` to `tx` from the cursor: replay, then live output, then EXIT (or END).
async fn attach(
    p: Arc<Process>,
    mut c: Cursor,
    tx: mpsc::Sender<Result<pb::AttachOutput, Status>>,
) {
    let mut changed = p.subscribe();
    loop {
        changed.borrow_and_update();
        // Whether the process had ended before this pass read anything: then the pass sees
        // everything there will ever be.
        let ended = !p.is_live();
        let mut sent = false;
        for stream in 0..2 {
            let max = match c.budget {
                Some(0) => break,
                Some(b) => (b as usize).min(ATTACH_CHUNK),
                None => ATTACH_CHUNK,
            };
            match step(&p, stream, c.pos[stream], max) {
                Ok(None) => {}
                Ok(Some((m, next))) => {
                    if m.kind != Kind::Lost as i32 {
                        if let Some(b) = c.budget.as_mut() {
                            *b -= m.data.len() as u64;
                        }
                    }
                    c.pos[stream] = next;
                    sent = true;
                    if tx.send(Ok(m)).await.is_err() {
                        debug!(id = %p.id, "attacher left");
                        return;
                    }
                }
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            }
        }
        if sent && c.budget != Some(0) {
            continue;
        }
        let last = if ended && !sent {
            Kind::Exit
        } else if c.no_follow && (!sent || c.budget == Some(0)) {
            Kind::End
        } else {
            // Caught up: sleep until new output or the end, or until the client leaves (an
            // idle process must not keep a gone attacher's task).
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tx.closed() => {
                    debug!(id = %p.id, "attacher left");
                    return;
                }
            }
            continue;
        };
        let _ = tx
            .send(Ok(pb::AttachOutput {
                kind: last as i32,
                info: Some(info(&p)),
                ..Default::default()
            }))
            .await;
        return;
    }
}

fn check_signal(sig: i32) -> Result<(), ServerError> {
    if (1..=64).contains(&sig) {
        Ok(())
    } else {
        Err(ServerError::InvalidArgument(format!(
            "signal {sig} is not a signal number (1 to 64)"
        )))
    }
}

#[tonic::async_trait]
impl ProcessService for Processes {
    #[instrument(skip_all, fields(command = %req.get_ref().command))]
    async fn start(
        &self,
        req: Request<pb::StartRequest>,
    ) -> Result<Response<pb::StartResponse>, Status> {
        let r = req.into_inner();
        let work_dir = self.svc.exec_work_dir(&r.work_dir)?;
        let mut exec = ExecSpec::new(
            r.command,
            work_dir,
            &r.env,
            r.timeout_seconds,
            Duration::ZERO,
            r.stdin,
        )?;
        if r.timeout_seconds <= 0 {
            exec.timeout = None;
        }
        let spec = StartSpec {
            exec,
            pty: r.pty.then(|| start_size(r.cols, r.rows)),
            tag: r.tag,
        };
        let p = self.registry.start(spec)?;
        Ok(Response::new(pb::StartResponse {
            id: p.id.clone(),
            pid: p.pid,
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let tag = req.into_inner().tag;
        let processes = self.registry.list(&tag).iter().map(|p| info(p)).collect();
        Ok(Response::new(pb::ListResponse { processes }))
    }

    type AttachStream = BoxStream<pb::AttachOutput>;

    #[instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let r = req.into_inner();
        let p = self.get(&r.id)?;
        let pos = if r.from_end {
            let st = p.lock();
            [st.out.total(), st.err.total()]
        } else {
            let st = p.lock();
            for (name, off, total) in [
                ("stdout_offset", r.stdout_offset, st.out.total()),
                ("stderr_offset", r.stderr_offset, st.err.total()),
            ] {
                if off > total {
                    return Err(ServerError::InvalidArgument(format!(
                        "{name} {off} is past the end of the output ({total} bytes so far)"
                    ))
                    .into());
                }
            }
            [r.stdout_offset, r.stderr_offset]
        };
        let cursor = Cursor {
            pos,
            no_follow: r.no_follow,
            budget: (r.no_follow && r.max_bytes > 0).then_some(r.max_bytes),
        };
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(attach(p, cursor, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write_stdin(
        &self,
        req: Request<pb::WriteStdinRequest>,
    ) -> Result<Response<pb::WriteStdinResponse>, Status> {
        let r = req.into_inner();
        self.get(&r.id)?.write_stdin(r.data).await?;
        Ok(Response::new(pb::WriteStdinResponse {}))
    }

    async fn close_stdin(
        &self,
        req: Request<pb::CloseStdinRequest>,
    ) -> Result<Response<pb::CloseStdinResponse>, Status> {
        self.get(&req.into_inner().id)?.close_stdin().await?;
        Ok(Response::new(pb::CloseStdinResponse {}))
    }

    #[instrument(skip_all, fields(id = %req.get_ref().id, signal = req.get_ref().signal))]
    async fn signal(
        &self,
        req: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        let r = req.into_inner();
        check_signal(r.signal)?;
        self.get(&r.id)?.signal(r.signal)?;
        Ok(Response::new(pb::SignalResponse {}))
    }

    async fn resize(
        &self,
        req: Request<pb::ResizeRequest>,
    ) -> Result<Response<pb::ResizeResponse>, Status> {
        let r = req.into_inner();
        let p = self.get(&r.id)?;
        let size = TermSize::from_request(r.cols, r.rows).ok_or_else(|| {
            ServerError::InvalidArgument(format!(
                "terminal size {}x{} is invalid: both must be above zero",
                r.cols, r.rows
            ))
        })?;
        p.resize(size)?;
        Ok(Response::new(pb::ResizeResponse {}))
    }

    async fn wait(
        &self,
        req: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::WaitResponse>, Status> {
        let r = req.into_inner();
        let p = self.get(&r.id)?;
        let limit = (r.timeout_ms > 0).then(|| Duration::from_millis(u64::from(r.timeout_ms)));
        let exited = p.wait(limit).await;
        Ok(Response::new(pb::WaitResponse {
            exited,
            info: Some(info(&p)),
        }))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        self.registry.remove(&req.into_inner().id)?;
        Ok(Response::new(pb::RemoveResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::valid_id;

    #[test]
    fn signal_numbers() {
        for ok in [1, 9, 15, 64] {
            assert!(check_signal(ok).is_ok(), "{ok}");
        }
        for bad in [0, -1, 65, i32::MAX] {
            assert!(check_signal(bad).is_err(), "{bad}");
        }
        assert!(valid_id("0123456789ab"));
    }
}
