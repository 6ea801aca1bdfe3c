//! `mcpcontainer.ContainerService` on the agent's socket, routed to a bot by the
//! `x-memoh-bot` request metadata. Callers use the same client they use against a bot's
//! server and never learn bot addresses or tokens. Unknown bot: NOT_FOUND; a bot that is
//! down: UNAVAILABLE with the reason.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use memoh_proto::limits::BOT_METADATA_KEY;
use memoh_proto::pb::mcpcontainer as pb;
use memoh_proto::ContainerClient;
use pb::container_service_server::ContainerService;
use tonic::{Request, Response, Status, Streaming};

use crate::bots::Manager;

/// The routing service.
#[derive(Clone)]
pub struct Proxy {
    mgr: Arc<Manager>,
}

impl Proxy {
    /// Routes through `mgr`.
    pub fn new(mgr: Arc<Manager>) -> Self {
        Self { mgr }
    }

    async fn target<T>(&self, req: &Request<T>) -> Result<(String, ContainerClient), Status> {
        let bot = req
            .metadata()
            .get(BOT_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "missing {BOT_METADATA_KEY} metadata naming the bot"
                ))
            })?
            .to_string();
        let client = self.mgr.client(&bot).await?;
        Ok((bot, client))
    }

    fn fail(&self, bot: &str, s: Status) -> Status {
        self.mgr.report_failure(bot, &s);
        // The bot's own answers pass through unchanged; a failure to reach it at all (a
        // local transport error, which has a source) names the bot.
        let local = std::error::Error::source(&s).is_some();
        if local && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
            return Status::unavailable(format!("bot {bot:?} is unreachable: {}", s.message()));
        }
        s
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Forwards a unary call: same message, the pool's deadline.
macro_rules! unary {
    ($self:ident, $req:ident, $method:ident) => {{
        let (bot, client) = $self.target(&$req).await?;
        let mut raw = client.raw();
        let mut out = Request::new($req.into_inner());
        out.set_timeout(client.deadline_of_unary());
        match raw.$method(out).await {
            Ok(r) => Ok(Response::new(r.into_inner())),
            Err(s) => Err($self.fail(&bot, s)),
        }
    }};
}

#[tonic::async_trait]
impl ContainerService for Proxy {
    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        unary!(self, req, read_file)
    }

    async fn write_file(
        &self,
        req: Request<pb::WriteFileRequest>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        unary!(self, req, write_file)
    }

    async fn list_dir(
        &self,
        req: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        unary!(self, req, list_dir)
    }

    async fn stat(
        &self,
        req: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        unary!(self, req, stat)
    }

    async fn mkdir(
        &self,
        req: Request<pb::MkdirRequest>,
    ) -> Result<Response<pb::MkdirResponse>, Status> {
        unary!(self, req, mkdir)
    }

    async fn rename(
        &self,
        req: Request<pb::RenameRequest>,
    ) -> Result<Response<pb::RenameResponse>, Status> {
        unary!(self, req, rename)
    }

    async fn delete_file(
        &self,
        req: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        unary!(self, req, delete_file)
    }

    type ExecStream = BoxStream<pb::ExecOutput>;

    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let (bot, client) = self.target(&req).await?;
        let inbound = req.into_inner();
        // Forward the caller's messages as they come; a caller error ends our side too.
        let upstream = inbound.take_while(|m| futures::future::ready(m.is_ok()));
        let upstream = upstream.filter_map(|m| futures::future::ready(m.ok()));
        match client.raw().exec(upstream).await {
            Ok(r) => Ok(Response::new(Box::pin(r.into_inner()))),
            Err(s) => Err(self.fail(&bot, s)),
        }
    }

    type ReadRawStream = BoxStream<pb::DataChunk>;

    async fn read_raw(
        &self,
        req: Request<pb::ReadRawRequest>,
    ) -> Result<Response<Self::ReadRawStream>, Status> {
        let (bot, client) = self.target(&req).await?;
        match client.raw().read_raw(req.into_inner()).await {
            Ok(r) => Ok(Response::new(Box::pin(r.into_inner()))),
            Err(s) => Err(self.fail(&bot, s)),
        }
    }

    async fn write_raw(
        &self,
        req: Request<Streaming<pb::WriteRawChunk>>,
    ) -> Result<Response<pb::WriteRawResponse>, Status> {
        let (bot, client) = self.target(&req).await?;
        let inbound = req.into_inner();
        // A caller error must abort the upload, not commit a truncated file: end the
        // upstream with an error by dropping the call (the server then discards its temp file).
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteRawChunk>(16);
        let (err_tx, err_rx) = tokio::sync::oneshot::channel::<Status>();
        tokio::spawn(async move {
            let mut inbound = inbound;
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        let _ = err_tx.send(s);
                        return;
                    }
                }
            }
        });
        let upstream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut raw = client.raw();
        let call = raw.write_raw(upstream);
        tokio::pin!(call);
        let mut err_rx = err_rx;
        tokio::select! {
            r = &mut call => match r {
                Ok(r) => Ok(Response::new(r.into_inner())),
                Err(s) => Err(self.fail(&bot, s)),
            },
            Ok(s) = &mut err_rx => {
                // Dropping `call` resets the upstream stream: the bot keeps its old file.
                Err(s)
            }
        }
    }
}
