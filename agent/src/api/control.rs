//! The control API (`memoh.agent.v1.AgentService`) served on the agent's unix socket.
//! Handlers validate, call the [`Manager`], and map errors; conversions live at the bottom.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use memoh_proto::pb::agent as pb;
use pb::agent_service_server::AgentService;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{bot_info, bot_spec, limits_change, progress_msg, snapshot_info};
use super::detached;
use crate::bots::Manager;
use crate::containerd::{Progress, PullOptions};
use crate::error::AgentError;
use crate::ids;
use crate::logdriver;

/// The control service.
#[derive(Clone)]
pub struct Control {
    mgr: Arc<Manager>,
    mcp: Option<Arc<crate::mcp::Mcp>>,
}

impl Control {
    /// Serves `mgr` (the MCP calls answer that MCP is disabled).
    pub fn new(mgr: Arc<Manager>) -> Self {
        Self { mgr, mcp: None }
    }

    /// Serves `mgr` and, for the MCP calls, the MCP hub `mcp` (none: MCP is disabled).
    pub fn with_mcp(mgr: Arc<Manager>, mcp: Option<Arc<crate::mcp::Mcp>>) -> Self {
        Self { mgr, mcp }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Runs an image job in the background, streaming its progress and a final message.
fn progress_stream<F, Fut>(job: F) -> BoxStream<pb::Progress>
where
    F: FnOnce(mpsc::Sender<Result<pb::Progress, Status>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<pb::Progress, AgentError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let last = job(tx.clone()).await;
        let _ = tx.send(last.map_err(Status::from)).await;
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl AgentService for Control {
    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn create_bot(
        &self,
        req: Request<pb::CreateBotRequest>,
    ) -> Result<Response<pb::BotInfo>, Status> {
        let r = req.into_inner();
        let mgr = self.mgr.clone();
        // Detached: the bot is created even if the caller goes away mid-way.
        let info = detached("create", async move {
            let limits = limits_change(r.limits.as_ref())?;
            let spec = bot_spec(r.spec.as_ref())?;
            if r.from.is_empty() {
                return mgr.create(&r.bot_id, Some(&r.image), &limits, &spec).await;
            }
            if !r.image.is_empty() {
                return Err(crate::error::AgentError::InvalidArgument(
                    "give either an image or a version to create from (`from`), not both".into(),
                ));
            }
            let options = crate::containerd::PullOptions {
                insecure: r.from_insecure,
                credentials: None,
            };
            mgr.create_from(&r.bot_id, &r.from, &options, &limits, &spec)
                .await
        })
        .await?;
        Ok(Response::new(bot_info(info)))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn start_bot(&self, req: Request<pb::BotRef>) -> Result<Response<pb::BotInfo>, Status> {
        let bot = req.into_inner().bot_id;
        let mgr = self.mgr.clone();
        let info = detached("start", async move { mgr.start(&bot).await }).await?;
        Ok(Response::new(bot_info(info)))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn stop_bot(&self, req: Request<pb::BotRef>) -> Result<Response<pb::BotInfo>, Status> {
        let bot = req.into_inner().bot_id;
        let mgr = self.mgr.clone();
        let info = detached("stop", async move { mgr.stop(&bot).await }).await?;
        Ok(Response::new(bot_info(info)))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn delete_bot(
        &self,
        req: Request<pb::DeleteBotRequest>,
    ) -> Result<Response<pb::DeleteBotResponse>, Status> {
        let r = req.into_inner();
        let mgr = self.mgr.clone();
        detached("delete", async move {
            mgr.delete(&r.bot_id, r.keep_versions).await
        })
        .await?;
        Ok(Response::new(pb::DeleteBotResponse {}))
    }

    async fn list_bots(
        &self,
        _req: Request<pb::ListBotsRequest>,
    ) -> Result<Response<pb::ListBotsResponse>, Status> {
        let bots = self.mgr.list().await?;
        Ok(Response::new(pb::ListBotsResponse {
            bots: bots.into_iter().map(bot_info).collect(),
        }))
    }

    async fn inspect_bot(&self, req: Request<pb::BotRef>) -> Result<Response<pb::BotInfo>, Status> {
        let info = self.mgr.info(&req.into_inner().bot_id).await?;
        Ok(Response::new(bot_info(info)))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn update_bot(
        &self,
        req: Request<pb::UpdateBotRequest>,
    ) -> Result<Response<pb::BotInfo>, Status> {
        let r = req.into_inner();
        let change = limits_change(r.limits.as_ref())?;
        if change.is_empty() {
            return Err(Status::invalid_argument(
                "nothing to update: give at least one limit",
            ));
        }
        let mgr = self.mgr.clone();
        let info = detached(
            "update",
            async move { mgr.update(&r.bot_id, &change).await },
        )
        .await?;
        Ok(Response::new(bot_info(info)))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn pause_bot(&self, req: Request<pb::BotRef>) -> Result<Response<pb::BotInfo>, Status> {
        let bot = req.into_inner().bot_id;
        let mgr = self.mgr.clone();
        let info = detached("pause", async move { mgr.pause(&bot).await }).await?;
        Ok(Response::new(bot_info(info)))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn resume_bot(&self, req: Request<pb::BotRef>) -> Result<Response<pb::BotInfo>, Status> {
        let bot = req.into_inner().bot_id;
        let mgr = self.mgr.clone();
        let info = detached("resume", async move { mgr.resume(&bot).await }).await?;
        Ok(Response::new(bot_info(info)))
    }

    type BotLogsStream = BoxStream<pb::LogChunk>;

    async fn bot_logs(
        &self,
        req: Request<pb::BotLogsRequest>,
    ) -> Result<Response<Self::BotLogsStream>, Status> {
        let r = req.into_inner();
        // Unknown bots are NOT_FOUND even if a log file is left over.
        self.mgr.info(&r.bot_id).await?;
        let cfg = self.mgr.config();
        let path = ids::log_path(&cfg.state_dir, &r.bot_id);
        // The rotated files and the current one, oldest first, all opened now: a rotation while
        // they are read renames them but loses nothing.
        let mut files = Vec::new();
        for p in logdriver::log_files(&path, cfg.server_log_keep) {
            match tokio::fs::File::open(&p).await {
                Ok(f) => {
                    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                    files.push((f, len));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AgentError::io(&p, e).into()),
            }
        }
        if files.is_empty() {
            if !r.follow {
                return Ok(Response::new(Box::pin(futures::stream::empty())));
            }
            let e = std::io::Error::from(std::io::ErrorKind::NotFound);
            return Err(AgentError::io(&path, e).into());
        }
        if r.tail_bytes > 0 {
            // The last `tail_bytes` may begin in a rotated file.
            let total: u64 = files.iter().map(|(_, len)| len).sum();
            let mut skip = total.saturating_sub(r.tail_bytes);
            while files.len() > 1 && skip >= files[0].1 {
                skip -= files.remove(0).1;
            }
            files[0]
                .0
                .seek(std::io::SeekFrom::Start(skip))
                .await
                .map_err(|e| AgentError::io(&path, e))?;
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut files = files.into_iter().map(|(f, _)| f).collect::<Vec<_>>();
            let Some(mut cur) = files.pop() else {
                return;
            };
            for mut f in files {
                if !send_to_end(&mut f, &mut buf, &tx).await {
                    return;
                }
            }
            loop {
                if !send_to_end(&mut cur, &mut buf, &tx).await || !r.follow {
                    return;
                }
                // Rotated: what was written before the rename, then the new file.
                if let Some(next) = replaced(&path, &cur).await {
                    if !send_to_end(&mut cur, &mut buf, &tx).await {
                        return;
                    }
                    cur = next;
                    continue;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ImportImageStream = BoxStream<pb::Progress>;

    #[instrument(skip_all, fields(path = %req.get_ref().path))]
    async fn import_image(
        &self,
        req: Request<pb::ImportImageRequest>,
    ) -> Result<Response<Self::ImportImageStream>, Status> {
        let r = req.into_inner();
        if r.path.is_empty() || !r.path.starts_with('/') {
            return Err(AgentError::InvalidArgument(
                "import needs the absolute path of an archive".into(),
            )
            .into());
        }
        let mgr = self.mgr.clone();
        Ok(Response::new(progress_stream(move |tx| async move {
            let cb = move |p: Progress| {
                let _ = tx.try_send(Ok(progress_msg(p)));
            };
            let name = (!r.name.is_empty()).then_some(r.name.as_str());
            let names = mgr
                .import_image(std::path::Path::new(&r.path), name, &cb)
                .await?;
            Ok(pb::Progress {
                phase: "done".into(),
                image: names.join(","),
                ..Default::default()
            })
        })))
    }

    type PullImageStream = BoxStream<pb::Progress>;

    #[instrument(skip_all, fields(reference = %req.get_ref().reference))]
    async fn pull_image(
        &self,
        req: Request<pb::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let r = req.into_inner();
        if r.reference.is_empty() {
            return Err(AgentError::InvalidArgument("image reference is empty".into()).into());
        }
        let mgr = self.mgr.clone();
        Ok(Response::new(progress_stream(move |tx| async move {
            let cb = move |p: Progress| {
                let _ = tx.try_send(Ok(progress_msg(p)));
            };
            let opts = PullOptions {
                insecure: r.insecure,
                credentials: None,
            };
            let name = mgr.pull_image(&r.reference, &opts, &cb).await?;
            let digest = mgr
                .resolve_image(&name)
                .await
                .map(|i| i.target_digest)
                .unwrap_or_default();
            Ok(pb::Progress {
                phase: "done".into(),
                image: name,
                digest,
                ..Default::default()
            })
        })))
    }

    async fn list_images(
        &self,
        _req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let images = self.mgr.list_images().await?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images
                .into_iter()
                .map(|i| pb::ImageInfo {
                    name: i.name,
                    digest: i.target_digest,
                    size: i.size,
                    created_at: String::new(),
                })
                .collect(),
        }))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let r = req.into_inner();
        let mgr = self.mgr.clone();
        // Detached: the cycle finishes even if the caller goes away.
        let v = detached("snapshot", async move {
            let source = crate::bots::versions::Source::Manual;
            if r.restart {
                mgr.snapshot(&r.bot_id, &r.name, source).await
            } else {
                mgr.snapshot_live(&r.bot_id, &r.name, source).await
            }
        })
        .await?;
        Ok(Response::new(snapshot_info(v)))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::BotRef>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let vs = self.mgr.versions(&req.into_inner().bot_id).await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: vs.into_iter().map(snapshot_info).collect(),
        }))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id, version = req.get_ref().version))]
    async fn rollback_snapshot(
        &self,
        req: Request<pb::RollbackSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let r = req.into_inner();
        let mgr = self.mgr.clone();
        let v = detached("rollback", async move {
            mgr.rollback_live(&r.bot_id, r.version).await
        })
        .await?;
        Ok(Response::new(snapshot_info(v)))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id, version = req.get_ref().version))]
    async fn remove_snapshot(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<pb::RemoveSnapshotResponse>, Status> {
        let r = req.into_inner();
        self.mgr.remove_version(&r.bot_id, r.version).await?;
        Ok(Response::new(pb::RemoveSnapshotResponse {}))
    }

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id, version = req.get_ref().version))]
    async fn push_snapshot(
        &self,
        req: Request<pb::PushSnapshotRequest>,
    ) -> Result<Response<pb::PushSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.reference.is_empty() {
            return Err(Status::invalid_argument(
                "a registry reference to push to is required",
            ));
        }
        let mgr = self.mgr.clone();
        let (reference, digest) = detached("push", async move {
            let options = crate::containerd::PullOptions {
                insecure: r.insecure,
                credentials: None,
            };
            mgr.push_version(&r.bot_id, r.version, &r.reference, &options)
                .await
        })
        .await?;
        Ok(Response::new(pb::PushSnapshotResponse {
            reference,
            digest,
        }))
    }

    type MigrateStream = BoxStream<pb::MigrateProgress>;

    #[instrument(skip_all, fields(bot = %req.get_ref().bot_id))]
    async fn migrate(
        &self,
        req: Request<pb::BotRef>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        let bot = req.into_inner().bot_id;
        crate::ids::validate(&bot)?;
        if !self.mgr.has_legacy_data(&bot) {
            self.mgr.info(&bot).await?;
            return Err(AgentError::FailedPrecondition(format!(
                "bot {bot:?} has no legacy data to migrate"
            ))
            .into());
        }
        let (tx, rx) = mpsc::channel(64);
        let mgr = self.mgr.clone();
        // Detached: the migration finishes under the bot's lock even if the caller leaves.
        tokio::spawn(async move {
            let ptx = tx.clone();
            let cb = move |p: crate::bots::migrate::MigrationProgress| {
                let _ = ptx.try_send(Ok(pb::MigrateProgress {
                    phase: p.phase,
                    bytes: p.bytes,
                    total_bytes: p.total_bytes,
                    ..Default::default()
                }));
            };
            let last = match mgr.migrate(&bot, &cb).await {
                Ok(r) => Ok(pb::MigrateProgress {
                    phase: "done".into(),
                    bytes: r.bytes,
                    total_bytes: r.bytes,
                    finished: true,
                    entries: r.entries,
                    symlinks: r.symlinks,
                    skipped: r.skipped,
                    failures: r.failures,
                    renamed: r.renamed,
                    already_done: r.already_done,
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn version(
        &self,
        _req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let containerd_version = self.mgr.containerd_version().await?;
        Ok(Response::new(pb::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            containerd_version,
        }))
    }

    #[instrument(skip_all)]
    async fn net_cleanup(
        &self,
        _req: Request<pb::NetCleanupRequest>,
    ) -> Result<Response<pb::NetCleanupResponse>, Status> {
        let mgr = self.mgr.clone();
        let live = || async move { Ok(mgr.list().await?.into_iter().map(|b| b.bot_id).collect()) };
        let removed = self.mgr.network().cleanup(live).await?;
        Ok(Response::new(pb::NetCleanupResponse {
            removed: removed.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn mcp_add(
        &self,
        req: Request<pb::McpAddRequest>,
    ) -> Result<Response<pb::McpServerInfo>, Status> {
        super::control_mcp::add(self.mcp.as_ref(), req).await
    }

    async fn mcp_list(
        &self,
        req: Request<pb::BotRef>,
    ) -> Result<Response<pb::McpListResponse>, Status> {
        super::control_mcp::list(self.mcp.as_ref(), req).await
    }

    async fn mcp_remove(
        &self,
        req: Request<pb::McpServerRef>,
    ) -> Result<Response<pb::McpRemoveResponse>, Status> {
        super::control_mcp::remove(self.mcp.as_ref(), req).await
    }

    async fn mcp_logs(
        &self,
        req: Request<pb::McpServerRef>,
    ) -> Result<Response<pb::McpLogsResponse>, Status> {
        super::control_mcp::logs(self.mcp.as_ref(), req).await
    }

    async fn mcp_token(
        &self,
        _req: Request<pb::McpTokenRequest>,
    ) -> Result<Response<pb::McpTokenResponse>, Status> {
        super::control_mcp::token(self.mcp.as_ref())
    }
}

/// Sends what is left of `f` to `tx`; false when the client left or reading failed.
async fn send_to_end(
    f: &mut tokio::fs::File,
    buf: &mut [u8],
    tx: &mpsc::Sender<Result<pb::LogChunk, Status>>,
) -> bool {
    loop {
        match f.read(buf).await {
            Ok(0) => return true,
            Ok(n) => {
                let chunk = pb::LogChunk {
                    data: buf[..n].to_vec(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return false;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                return false;
            }
        }
    }
}

/// The file now at `path` when it is not the one `cur` reads (the log was rotated).
async fn replaced(path: &std::path::Path, cur: &tokio::fs::File) -> Option<tokio::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let now = tokio::fs::File::open(path).await.ok()?;
    let (a, b) = (cur.metadata().await.ok()?, now.metadata().await.ok()?);
    ((a.dev(), a.ino()) != (b.dev(), b.ino())).then_some(now)
}
