//! Typed client of `mcpcontainer.ContainerService`.
//!
//! One [`ContainerClient`] wraps one cloneable tonic [`Channel`]; cloning the client is cheap and
//! shares the connection. Unary calls carry a deadline (sent as `grpc-timeout` and enforced
//! locally); streaming calls carry none, because an exec or a transfer may legitimately run for
//! hours. An optional bearer token and an optional bot id (for routing through the agent's
//! socket) are attached to every call.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status, Streaming};

use crate::limits::{self, MAX_MESSAGE_SIZE, RAW_CHUNK_SIZE};
use crate::pb::mcpcontainer as pb;
use pb::container_service_client::ContainerServiceClient;

/// The generated client with our metadata interceptor.
pub type Inner = ContainerServiceClient<InterceptedService<Channel, CallMetadata>>;

/// Metadata attached to every call: `authorization: Bearer TOKEN` and `x-memoh-bot: BOT`.
#[derive(Clone, Default, Debug)]
pub struct CallMetadata {
    token: Option<AsciiMetadataValue>,
    bot: Option<AsciiMetadataValue>,
}

impl tonic::service::Interceptor for CallMetadata {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        if let Some(b) = &self.bot {
            req.metadata_mut()
                .insert(limits::BOT_METADATA_KEY, b.clone());
        }
        Ok(req)
    }
}

/// The collected result of a finished exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Everything the command wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything the command wrote to stderr.
    pub stderr: Vec<u8>,
    /// The exit code from the EXIT message (-1: killed by a signal or the timeout).
    pub exit_code: i32,
}

/// Client of one container server (or of the agent's routing socket).
#[derive(Clone, Debug)]
pub struct ContainerClient {
    inner: Inner,
    http: InterceptedService<Channel, CallMetadata>,
    unary_deadline: Duration,
}

/// Builds an endpoint with the settings every connection of ours uses.
pub fn endpoint(uri: Uri) -> Endpoint {
    Endpoint::from(uri)
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024))
        .max_frame_size(1 << 20)
}

/// Returns a lazily connecting channel to `host:port` over TCP.
pub fn tcp_channel(host_port: &str) -> Result<Channel, tonic::transport::Error> {
    let uri: Uri = format!("http://{host_port}")
        .parse()
        .map_err(|_| Endpoint::from_shared(host_port.to_string()).unwrap_err())?;
    Ok(endpoint(uri).connect_lazy())
}

/// Returns a lazily connecting channel over the unix socket at `path`.
pub fn unix_channel(path: impl Into<PathBuf>) -> Channel {
    let path = path.into();
    let uri = Uri::from_static("http://localhost");
    endpoint(uri).connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    }))
}

fn unary<T>(msg: T, deadline: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(deadline);
    r
}

impl ContainerClient {
    /// Wraps `channel`; no token, no bot routing, the default unary deadline.
    pub fn new(channel: Channel) -> Self {
        Self::with_metadata(channel, CallMetadata::default())
    }

    fn with_metadata(channel: Channel, md: CallMetadata) -> Self {
        let http = InterceptedService::new(channel.clone(), md.clone());
        let inner = ContainerServiceClient::with_interceptor(channel, md)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Self {
            inner,
            http,
            unary_deadline: limits::DEFAULT_UNARY_DEADLINE,
        }
    }

    /// Builds a client that sends `authorization: Bearer TOKEN` and, when `bot` is set,
    /// `x-memoh-bot: BOT` on every call.
    pub fn with_auth(
        channel: Channel,
        token: Option<&str>,
        bot: Option<&str>,
    ) -> Result<Self, Status> {
        let parse = |v: String| {
            AsciiMetadataValue::try_from(v)
                .map_err(|_| Status::invalid_argument("metadata value is not printable ascii"))
        };
        let md = CallMetadata {
            token: token.map(|t| parse(format!("Bearer {t}"))).transpose()?,
            bot: bot.map(|b| parse(b.to_string())).transpose()?,
        };
        Ok(Self::with_metadata(channel, md))
    }

    /// The generated client underneath, carrying the same metadata; for forwarding calls
    /// unchanged (the agent's proxy).
    pub fn raw(&self) -> Inner {
        self.inner.clone()
    }

    /// The channel as an HTTP service with this client's metadata (token, bot) added to every
    /// request: for forwarding calls as they are, without decoding their messages.
    pub fn http(&self) -> InterceptedService<Channel, CallMetadata> {
        self.http.clone()
    }

    /// The deadline of unary calls.
    pub fn deadline_of_unary(&self) -> Duration {
        self.unary_deadline
    }

    /// Sets the deadline of every unary call made through this client.
    pub fn unary_deadline(mut self, d: Duration) -> Self {
        self.unary_deadline = d;
        self
    }

    async fn deadline<T>(
        &self,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        // grpc-timeout tells the server; this bound also covers a peer that never answers.
        match tokio::time::timeout(self.unary_deadline + Duration::from_millis(250), fut).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("deadline exceeded")),
        }
    }

    /// `ReadFile`: a window of numbered lines.
    pub async fn read_file(
        &self,
        path: &str,
        line_offset: i32,
        n_lines: i32,
    ) -> Result<pb::ReadFileResponse, Status> {
        let mut c = self.inner.clone();
        let req = pb::ReadFileRequest {
            path: path.into(),
            line_offset,
            n_lines,
        };
        self.deadline(c.read_file(unary(req, self.unary_deadline)))
            .await
    }

    /// `WriteFile`: replaces the file's content atomically.
    pub async fn write_file(&self, path: &str, content: impl Into<Bytes>) -> Result<(), Status> {
        let mut c = self.inner.clone();
        let req = pb::WriteFileRequest {
            path: path.into(),
            content: content.into(),
        };
        self.deadline(c.write_file(unary(req, self.unary_deadline)))
            .await
            .map(|_| ())
    }

    /// `ListDir`.
    pub async fn list_dir(
        &self,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<pb::FileEntry>, Status> {
        let mut c = self.inner.clone();
        let req = pb::ListDirRequest {
            path: path.into(),
            recursive,
        };
        self.deadline(c.list_dir(unary(req, self.unary_deadline)))
            .await
            .map(|r| r.entries)
    }

    /// `Stat` (follows symlinks).
    pub async fn stat(&self, path: &str) -> Result<pb::FileEntry, Status> {
        let mut c = self.inner.clone();
        let req = pb::StatRequest { path: path.into() };
        let r = self
            .deadline(c.stat(unary(req, self.unary_deadline)))
            .await?;
        r.entry
            .ok_or_else(|| Status::internal("stat response carries no entry"))
    }

    /// `Mkdir` (creates parents).
    pub async fn mkdir(&self, path: &str) -> Result<(), Status> {
        let mut c = self.inner.clone();
        let req = pb::MkdirRequest { path: path.into() };
        self.deadline(c.mkdir(unary(req, self.unary_deadline)))
            .await
            .map(|_| ())
    }

    /// `Rename`.
    pub async fn rename(&self, old_path: &str, new_path: &str) -> Result<(), Status> {
        let mut c = self.inner.clone();
        let req = pb::RenameRequest {
            old_path: old_path.into(),
            new_path: new_path.into(),
        };
        self.deadline(c.rename(unary(req, self.unary_deadline)))
            .await
            .map(|_| ())
    }

    /// `DeleteFile`.
    pub async fn delete(&self, path: &str, recursive: bool) -> Result<(), Status> {
        let mut c = self.inner.clone();
        let req = pb::DeleteFileRequest {
            path: path.into(),
            recursive,
        };
        self.deadline(c.delete_file(unary(req, self.unary_deadline)))
            .await
            .map(|_| ())
    }

    /// `ReadRaw`: the file as a stream of chunks (no deadline).
    pub async fn read_raw(&self, path: &str) -> Result<Streaming<pb::DataChunk>, Status> {
        let mut c = self.inner.clone();
        let req = pb::ReadRawRequest { path: path.into() };
        Ok(c.read_raw(req).await?.into_inner())
    }

    /// `WriteRaw`: sends `path` in the first chunk, then every buffer of `data` split into chunks
    /// of at most 64 KiB. Returns the server's `bytes_written`.
    pub async fn write_raw<S>(&self, path: &str, data: S) -> Result<i64, Status>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        self.try_write_raw(path, data.map(Ok::<_, std::convert::Infallible>))
            .await
    }

    /// `WriteRaw` of a source that can fail (a local file being read): a failure sends a chunk
    /// with `abort` set and keeps the stream open, so the server discards the upload and keeps
    /// the old file, whatever it makes of the stream's end. The error names the local failure.
    pub async fn try_write_raw<S, E>(&self, path: &str, data: S) -> Result<i64, Status>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let mut c = self.inner.clone();
        let first = futures::stream::once(futures::future::ready(pb::WriteRawChunk {
            path: path.into(),
            data: Bytes::new(),
            abort: false,
        }));
        let failure = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let record = failure.clone();
        // Data until the source fails; after its failure, never an end: a clean end of the
        // request stream is the one thing that commits.
        let source = futures::stream::unfold(Some(Box::pin(data)), |state| async move {
            let mut data = state?;
            match data.next().await {
                Some(Ok(buf)) => Some((Ok(buf), Some(data))),
                Some(Err(e)) => Some((Err(e.to_string()), None)),
                None => None,
            }
        });
        let rest = source
            .flat_map(move |item| {
                let mut chunks = Vec::new();
                match item {
                    Ok(buf) => {
                        let mut rest = buf;
                        while rest.len() > RAW_CHUNK_SIZE {
                            chunks.push(pb::WriteRawChunk {
                                data: rest.split_to(RAW_CHUNK_SIZE),
                                ..Default::default()
                            });
                        }
                        if !rest.is_empty() {
                            chunks.push(pb::WriteRawChunk {
                                data: rest,
                                ..Default::default()
                            });
                        }
                    }
                    Err(e) => {
                        *record.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        chunks.push(pb::WriteRawChunk {
                            abort: true,
                            ..Default::default()
                        });
                    }
                }
                futures::stream::iter(chunks)
            })
            .chain(futures::stream::poll_fn({
                let failure = failure.clone();
                move |_| {
                    if failure.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(None)
                    }
                }
            }));
        let r = c.write_raw(first.chain(rest)).await;
        if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(Status::aborted(format!("upload aborted: {e}")));
        }
        Ok(r?.into_inner().bytes_written)
    }

    /// `Exec`: sends `first` (command, work dir, env, timeout, optional stdin) followed by the
    /// items of `stdin`; ending `stdin` closes the child's stdin. No deadline. Dropping the
    /// returned [`ExecStream`] cancels the call, and the server kills the command's process
    /// group, even while `stdin` is still open.
    pub async fn exec<S>(&self, first: pb::ExecInput, stdin: S) -> Result<ExecStream, Status>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        let mut c = self.inner.clone();
        let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
        let stdin = stdin.take_until(cancelled).map(|d| pb::ExecInput {
            stdin_data: d,
            ..Default::default()
        });
        let input = futures::stream::once(futures::future::ready(first)).chain(stdin);
        let inner = c.exec(input).await?.into_inner();
        Ok(ExecStream {
            inner,
            _cancel: cancel,
        })
    }

    /// Runs `command` with no stdin and collects its output and exit code.
    pub async fn exec_collect(
        &self,
        command: &str,
        work_dir: &str,
        timeout_seconds: i32,
    ) -> Result<ExecResult, Status> {
        let first = pb::ExecInput {
            command: command.into(),
            work_dir: work_dir.into(),
            timeout_seconds,
            ..Default::default()
        };
        let mut out = self.exec(first, futures::stream::empty()).await?;
        collect_exec(&mut out).await
    }

    /// Health of the far side: a cheap `Stat` of `/`.
    pub async fn ping(&self) -> Result<(), Status> {
        self.stat("/").await.map(|_| ())
    }
}

/// The output of an exec. Dropping it ends the call: the request side closes too, so the
/// server sees the cancellation and kills the command.
pub struct ExecStream {
    inner: Streaming<pb::ExecOutput>,
    _cancel: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecStream")
    }
}

impl ExecStream {
    /// The next output message; `None` after the last.
    pub async fn message(&mut self) -> Result<Option<pb::ExecOutput>, Status> {
        self.inner.message().await
    }
}

impl Stream for ExecStream {
    type Item = Result<pb::ExecOutput, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// How long [`finish_after_exit`] waits for the call to end after the EXIT message.
const AFTER_EXIT_WAIT: Duration = Duration::from_secs(2);
/// How many further messages [`finish_after_exit`] reads (and drops) after the EXIT message.
const AFTER_EXIT_MESSAGES: usize = 16;

/// Reads an exec's stream to its end once its EXIT message has arrived.
///
/// Only the trailers should follow EXIT. A stream dropped before they are read is reset
/// (`RST_STREAM(CANCEL)`) while they are in flight; h2 then meets them on a stream it may
/// already have forgotten, answers with a reset of its own and counts it against the
/// connection, which it closes after 1024 of them: on a long-lived connection (the agent's
/// pooled one to a bot, a client doing thousands of execs) a later call fails with
/// `CANCELLED`. A peer that keeps the stream open or goes on sending is given up on after
/// [`AFTER_EXIT_WAIT`] or [`AFTER_EXIT_MESSAGES`] messages; what it sends is dropped.
pub async fn finish_after_exit<S, T>(out: &mut S)
where
    S: Stream<Item = T> + Unpin,
{
    let drain = async {
        for _ in 0..AFTER_EXIT_MESSAGES {
            if out.next().await.is_none() {
                break;
            }
        }
    };
    // Off a tokio runtime (an executor of its own, a test's) there is no timer: the message
    // bound alone applies.
    if tokio::runtime::Handle::try_current().is_ok() {
        let _ = tokio::time::timeout(AFTER_EXIT_WAIT, drain).await;
    } else {
        drain.await;
    }
}

/// Drains an exec output stream into an [`ExecResult`]. A stream that ends without an EXIT
/// message is an error (`UNAVAILABLE`): the server went away mid-command.
pub async fn collect_exec<S>(out: &mut S) -> Result<ExecResult, Status>
where
    S: Stream<Item = Result<pb::ExecOutput, Status>> + Unpin,
{
    let mut res = ExecResult::default();
    while let Some(msg) = out.next().await.transpose()? {
        match pb::exec_output::Stream::try_from(msg.stream) {
            Ok(pb::exec_output::Stream::Stdout) => res.stdout.extend_from_slice(&msg.data),
            Ok(pb::exec_output::Stream::Stderr) => res.stderr.extend_from_slice(&msg.data),
            Ok(pb::exec_output::Stream::Exit) => {
                res.exit_code = msg.exit_code;
                finish_after_exit(out).await;
                return Ok(res);
            }
            Err(_) => return Err(Status::internal("unknown exec output stream kind")),
        }
    }
    Err(Status::unavailable(
        "exec stream ended without an exit status",
    ))
}
