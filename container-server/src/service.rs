//! `mcpcontainer.ContainerService` handlers: span, validate, call one domain function, map the
//! error. Blocking filesystem work runs on tokio's blocking pool, on threads kept from boot
//! (see [`crate::runtime`]), so it goes on while the bot is at its process limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use memoh_proto::pb::mcpcontainer as pb;
use pb::container_service_server::ContainerService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, instrument};

use crate::convert;
use crate::error::ServerError;
use crate::exec::{self, ExecSpec};
use crate::fs::{self, Caller};
use crate::paths::Resolver;
use crate::reaper::Reaper;
use crate::transfer::{self, inbound_error};
use crate::window::WindowSpec;

/// Shared state of the service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: Resolver,
    reaper: Reaper,
    kill: CancellationToken,
    default_timeout: Duration,
    reverse_http: crate::reverse_http::Hub,
}

impl Service {
    /// Builds the service. `kill` fires when running exec groups must die (shutdown).
    pub fn new(
        resolver: Resolver,
        reaper: Reaper,
        kill: CancellationToken,
        default_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                resolver,
                reaper,
                kill,
                default_timeout,
                reverse_http: crate::reverse_http::Hub::new(crate::reverse_http::DEFAULT_TIMEOUT),
            }),
        }
    }

    /// Routes the bridge's ReverseHTTP streams through `hub` (the one the HTTP listener
    /// uses) instead of a hub of the service's own. Only before the service is first cloned;
    /// later it changes nothing and says so in the log.
    pub fn with_reverse_http(mut self, hub: crate::reverse_http::Hub) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.reverse_http = hub,
            None => tracing::warn!("reverse http hub not replaced: the service is shared"),
        }
        self
    }

    /// The ReverseHTTP routing hub.
    pub(crate) fn reverse_http(&self) -> &crate::reverse_http::Hub {
        &self.inner.reverse_http
    }

    fn resolve(&self, field: &str, path: &str) -> Result<PathBuf, ServerError> {
        self.inner.resolver.resolve(field, path)
    }

    /// An exec's work dir: the data directory if empty, a relative one joined to it.
    pub(crate) fn exec_work_dir(&self, work_dir: &str) -> Result<PathBuf, ServerError> {
        if work_dir.is_empty() {
            return Ok(self.inner.resolver.data_dir().to_path_buf());
        }
        self.resolve("work_dir", work_dir)
    }

    /// The reaper commands are spawned through.
    pub(crate) fn reaper(&self) -> &Reaper {
        &self.inner.reaper
    }

    /// Fires when running commands must die (the end of the shutdown grace).
    pub(crate) fn kill_token(&self) -> CancellationToken {
        self.inner.kill.clone()
    }

    /// Exec over any request stream, the implementation behind both services: the first
    /// message starts the command, later ones feed its stdin, the stream's clean end closes it.
    pub(crate) async fn exec_stream(
        &self,
        inbound: BoxStream<pb::ExecInput>,
    ) -> Result<BoxStream<pb::ExecOutput>, Status> {
        self.exec_stream_with(inbound, |_| {}).await
    }

    /// [`Service::exec_stream`] with `adjust` applied to the validated request before the
    /// command starts (the bridge's conventions).
    pub(crate) async fn exec_stream_with(
        &self,
        mut inbound: BoxStream<pb::ExecInput>,
        adjust: impl FnOnce(&mut ExecSpec) + Send,
    ) -> Result<BoxStream<pb::ExecOutput>, Status> {
        let first = match inbound.next().await.transpose() {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(ServerError::InvalidArgument(
                    "exec stream closed before its first message".into(),
                )
                .into())
            }
            Err(s) => return Err(inbound_error(s)),
        };
        let work_dir = self.exec_work_dir(&first.work_dir)?;
        let mut spec = ExecSpec::new(
            first.command,
            work_dir,
            &first.env,
            first.timeout_seconds,
            self.inner.default_timeout,
            first.stdin_data,
        )?;
        adjust(&mut spec);
        debug!(command = %spec.command, "exec");
        let running = exec::start(spec, &self.inner.reaper)?;
        let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
        let aborted = CancellationToken::new();
        let abort = aborted.clone();
        tokio::spawn(async move {
            // The client's clean half-close (`Ok(None)`, see `memoh_proto::clean_end`) closes
            // the child's stdin. Any other ending (a reset, a lost connection) is not a closed
            // stdin but a call that is over: the process group is killed, as on cancel.
            loop {
                match inbound.next().await.transpose() {
                    Ok(Some(m)) => {
                        // A child that closed its stdin drops the rest; the loop goes on to
                        // see how the call ends.
                        if !m.stdin_data.is_empty() {
                            let _ = stdin_tx.send(m.stdin_data).await;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        debug!(status = %s.message(), "exec request stream ended badly");
                        abort.cancel();
                        // Holding the sender keeps the child's stdin open until the driver has
                        // killed the group (it then drops the feeder, which closes this):
                        // dropping it now would race the kill with an EOF the child could act
                        // on.
                        stdin_tx.closed().await;
                        return;
                    }
                }
            }
        });
        let (out_tx, out_rx) = mpsc::channel(32);
        tokio::spawn(running.drive(stdin_rx, out_tx, self.inner.kill.clone(), aborted));
        let stream = ReceiverStream::new(out_rx).map(|ev| Ok(convert::exec_output(ev)));
        Ok(Box::pin(stream))
    }

    /// WriteRaw over any request stream, the implementation behind both services: the path in
    /// the first chunk, the upload committed only at the stream's clean end (see
    /// [`transfer::upload`]); `caller` picks the write rules ([`Caller`]).
    pub(crate) async fn write_raw_stream(
        &self,
        mut inbound: BoxStream<pb::WriteRawChunk>,
        caller: Caller,
    ) -> Result<pb::WriteRawResponse, Status> {
        let first = match inbound.next().await.transpose().map_err(inbound_error)? {
            Some(m) => m,
            None => {
                return Err(ServerError::InvalidArgument(
                    "write stream closed before its first chunk".into(),
                )
                .into())
            }
        };
        if first.abort {
            return Err(ServerError::Aborted("the client aborted the upload".into()).into());
        }
        let path = self.resolve("path", &first.path)?;
        tracing::Span::current().record("path", tracing::field::display(path.display()));
        let file = blocking(move || fs::AtomicFile::create_as(&path, caller)).await?;
        let rest = inbound.map(|r| {
            r.map(|c| transfer::Piece {
                data: c.data,
                abort: c.abort,
            })
        });
        let written = transfer::upload(file, first.data, Box::pin(rest), self.kill()).await?;
        Ok(pb::WriteRawResponse {
            bytes_written: written as i64,
        })
    }

    /// The token that fires when running work must stop (the end of the shutdown grace).
    pub(crate) fn kill(&self) -> CancellationToken {
        self.inner.kill.clone()
    }

    /// The path resolver (data directory).
    pub(crate) fn resolver(&self) -> &Resolver {
        &self.inner.resolver
    }

    /// ReadFile's window of `path` (a request path), read by `spec`'s rules.
    pub(crate) async fn read_file_window(
        &self,
        path: &str,
        spec: WindowSpec,
    ) -> Result<crate::window::Window, Status> {
        let path = self.resolve("path", path)?;
        // Small files are read right here: from the page cache that takes a few microseconds,
        // less than the hand-off to the blocking pool and back.
        let small = std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() <= SMALL_FILE);
        if small {
            Ok(fs::read_file(&path, spec)?)
        } else {
            blocking(move || fs::read_file(&path, spec)).await
        }
    }

    /// WriteFile by `caller`'s rules.
    pub(crate) async fn write_file_as(
        &self,
        path: &str,
        content: Bytes,
        caller: Caller,
    ) -> Result<(), Status> {
        let path = self.resolve("path", path)?;
        blocking(move || fs::write_file_as(&path, &content, caller)).await
    }

    /// Mkdir by `caller`'s rules.
    pub(crate) async fn mkdir_as(&self, path: &str, caller: Caller) -> Result<(), Status> {
        let path = self.resolve("path", path)?;
        blocking(move || fs::mkdir_as(&path, caller)).await
    }

    /// Rename by `caller`'s rules.
    pub(crate) async fn rename_as(
        &self,
        old: &str,
        new: &str,
        caller: Caller,
    ) -> Result<(), Status> {
        let old = self.resolve("old_path", old)?;
        let new = self.resolve("new_path", new)?;
        blocking(move || fs::rename_as(&old, &new, caller)).await
    }
}

/// Files up to this size are read on the async thread (see `read_file`).
const SMALL_FILE: u64 = 64 * 1024;

/// Runs blocking filesystem work off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, ServerError> + Send + 'static,
    T: Send + 'static,
{
    match crate::runtime::spawn_blocking(f)?.await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("worker failed: {e}"))),
    }
}

pub use crate::stream::BoxStream;

#[tonic::async_trait]
impl ContainerService for Service {
    #[instrument(level = "debug", skip_all, fields(path = %req.get_ref().path))]
    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        let r = req.into_inner();
        let spec = WindowSpec::from_request(r.line_offset, r.n_lines);
        let w = self.read_file_window(&r.path, spec).await?;
        Ok(Response::new(convert::read_file_response(w)))
    }

    #[instrument(level = "debug", skip_all, fields(path = %req.get_ref().path, len = req.get_ref().content.len()))]
    async fn write_file(
        &self,
        req: Request<pb::WriteFileRequest>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let r = req.into_inner();
        self.write_file_as(&r.path, r.content, Caller::Mcp).await?;
        Ok(Response::new(pb::WriteFileResponse {}))
    }

    #[instrument(level = "debug", skip_all, fields(path = %req.get_ref().path, recursive = req.get_ref().recursive))]
    async fn list_dir(
        &self,
        req: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        let r = req.into_inner();
        let path = self.inner.resolver.resolve_or_data_dir("path", &r.path)?;
        let entries = blocking(move || fs::list_dir(&path, r.recursive)).await?;
        Ok(Response::new(pb::ListDirResponse {
            entries: entries.into_iter().map(convert::file_entry).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(path = %req.get_ref().path))]
    async fn stat(
        &self,
        req: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        let path = self.resolve("path", &req.into_inner().path)?;
        let e = blocking(move || fs::stat(&path)).await?;
        Ok(Response::new(pb::StatResponse {
            entry: Some(convert::file_entry(e)),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(path = %req.get_ref().path))]
    async fn mkdir(
        &self,
        req: Request<pb::MkdirRequest>,
    ) -> Result<Response<pb::MkdirResponse>, Status> {
        self.mkdir_as(&req.into_inner().path, Caller::Mcp).await?;
        Ok(Response::new(pb::MkdirResponse {}))
    }

    #[instrument(level = "debug", skip_all, fields(old = %req.get_ref().old_path, new = %req.get_ref().new_path))]
    async fn rename(
        &self,
        req: Request<pb::RenameRequest>,
    ) -> Result<Response<pb::RenameResponse>, Status> {
        let r = req.into_inner();
        self.rename_as(&r.old_path, &r.new_path, Caller::Mcp)
            .await?;
        Ok(Response::new(pb::RenameResponse {}))
    }

    type ExecStream = BoxStream<pb::ExecOutput>;

    #[instrument(level = "debug", skip_all)]
    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let stream = self.exec_stream(Box::pin(req.into_inner())).await?;
        Ok(Response::new(stream))
    }

    type ReadRawStream = BoxStream<pb::DataChunk>;

    #[instrument(level = "debug", skip_all, fields(path = %req.get_ref().path))]
    async fn read_raw(
        &self,
        req: Request<pb::ReadRawRequest>,
    ) -> Result<Response<Self::ReadRawStream>, Status> {
        let path = self.resolve("path", &req.into_inner().path)?;
        let p = path.clone();
        let file = blocking(move || fs::open_for_read(&p)).await?;
        Ok(Response::new(transfer::stream_file(file, path)?))
    }

    #[instrument(level = "debug", skip_all, fields(path))]
    async fn write_raw(
        &self,
        req: Request<Streaming<pb::WriteRawChunk>>,
    ) -> Result<Response<pb::WriteRawResponse>, Status> {
        let r = self
            .write_raw_stream(Box::pin(req.into_inner()), Caller::Mcp)
            .await?;
        Ok(Response::new(r))
    }

    #[instrument(level = "debug", skip_all, fields(path = %req.get_ref().path, recursive = req.get_ref().recursive))]
    async fn delete_file(
        &self,
        req: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let r = req.into_inner();
        let path = self.resolve("path", &r.path)?;
        blocking(move || fs::delete(&path, r.recursive)).await?;
        Ok(Response::new(pb::DeleteFileResponse {}))
    }
}
