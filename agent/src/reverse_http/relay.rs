//! One bot's ReverseHTTP stream: opening it, answering its frames, reopening it with backoff.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use memoh_proto::limits::MAX_MESSAGE_SIZE;
use memoh_proto::pb::bridgepb as bp;
use memoh_proto::ContainerClient;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use super::{answer, AllowList, Outcome};

/// Most requests of one bot answered at once; more get an error at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most request body bytes of one bot held at once (a body is at most 16 MiB); more get an
/// error at once, so a bot cannot make the agent hold 64 bodies of 16 MiB.
pub const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;
/// First pause before reopening a broken stream; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A stream that stayed open this long starts the backoff over when it breaks.
const HEALTHY: Duration = Duration::from_secs(10);
/// Pause after a server that has no ReverseHTTP (UNIMPLEMENTED); a start of the bot ends it.
pub const UNIMPLEMENTED_PAUSE: Duration = Duration::from_secs(300);

/// Requests of one bot by outcome (logged with every refusal and when the stream closes).
#[derive(Debug, Default)]
pub struct Counters {
    /// Relayed and answered by the upstream.
    pub allowed: AtomicU64,
    /// Refused: not in the allow-list, or malformed.
    pub refused: AtomicU64,
    /// Allowed but the upstream failed.
    pub failed: AtomicU64,
}

impl Counters {
    fn count(&self, o: Outcome) -> u64 {
        let c = match o {
            Outcome::Allowed => &self.allowed,
            Outcome::Refused => &self.refused,
            Outcome::Failed => &self.failed,
        };
        c.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `(allowed, refused, failed)` so far.
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.allowed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// What one relay needs besides its bot's client.
#[derive(Clone)]
pub struct RelayContext {
    /// The bot.
    pub bot: String,
    /// Where its requests may go.
    pub allow: Arc<AllowList>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Its counters.
    pub counters: Arc<Counters>,
    /// Fired when the relay must end (bot stopped or deleted, agent stopping).
    pub stop: CancellationToken,
    /// Notified when the bot (re)started: the stream is reopened at once.
    pub nudge: Arc<Notify>,
    /// Request body bytes held at once ([`MAX_BYTES_IN_FLIGHT`]).
    pub max_bytes: usize,
}

/// Opens the ReverseHTTP stream on `client`'s channel (its token goes with it): the sender of
/// the agent's frames and the bot's frames.
pub async fn open(
    client: &ContainerClient,
) -> Result<
    (
        mpsc::Sender<bp::ReverseHttpFrame>,
        tonic::Streaming<bp::ReverseHttpFrame>,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(16);
    let mut c = bp::container_service_client::ContainerServiceClient::new(client.http())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let resp = c
        .reverse_http(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    Ok((tx, resp.into_inner()))
}

/// Answers the `request` frames of `inbound` on `tx`, each in its own task (at most
/// [`MAX_IN_FLIGHT`]), until the stream ends (`Ok`), fails (`Err`), the relay stops or is
/// nudged (`Ok`). Answers in flight are dropped with the stream.
pub async fn serve_frames<S>(
    ctx: &RelayContext,
    mut inbound: S,
    tx: mpsc::Sender<bp::ReverseHttpFrame>,
) -> Result<(), Status>
where
    S: Stream<Item = Result<bp::ReverseHttpFrame, Status>> + Unpin,
{
    let mut tasks: JoinSet<()> = JoinSet::new();
    // In KiB, so 64 MiB fits the semaphore's u32 permits.
    let kib = |n: usize| u32::try_from(n.div_ceil(1024) + 1).unwrap_or(u32::MAX);
    let budget = Arc::new(tokio::sync::Semaphore::new(kib(ctx.max_bytes) as usize));
    loop {
        let frame = tokio::select! {
            _ = ctx.stop.cancelled() => return Ok(()),
            _ = ctx.nudge.notified() => return Ok(()),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            f = inbound.next() => f,
        };
        let req = match frame {
            None => return Ok(()),
            Some(Err(s)) => return Err(s),
            Some(Ok(bp::ReverseHttpFrame {
                frame: Some(bp::reverse_http_frame::Frame::Request(r)),
            })) => r,
            Some(Ok(_)) => {
                debug!(
                    bot = ctx.bot,
                    "reverse http: ignoring a frame that is no request"
                );
                continue;
            }
        };
        let permit = budget.clone().try_acquire_many_owned(kib(req.body.len()));
        let busy = if tasks.len() >= MAX_IN_FLIGHT {
            Some(format!(
                "too many requests in flight (at most {MAX_IN_FLIGHT})"
            ))
        } else if permit.is_err() {
            Some(format!(
                "too many request bytes in flight (at most {} MiB)",
                ctx.max_bytes >> 20
            ))
        } else {
            None
        };
        if let Some(why) = busy {
            let n = ctx.counters.count(Outcome::Refused);
            warn!(
                bot = ctx.bot,
                refused = n,
                why,
                "reverse http: request refused"
            );
            if tx
                .send(error_frame(&req.id, format!("reverse http: {why}")))
                .await
                .is_err()
            {
                return Ok(());
            }
            continue;
        }
        let (ctx2, tx2) = (ctx.clone(), tx.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let (method, url) = (req.method.clone(), req.url.clone());
            let (frame, outcome) = answer(req, &ctx2.allow, ctx2.timeout).await;
            let n = ctx2.counters.count(outcome);
            match (&outcome, &frame.frame) {
                (Outcome::Allowed, _) => {
                    debug!(bot = ctx2.bot, method, url, allowed = n, "reverse http: relayed")
                }
                (_, Some(bp::reverse_http_frame::Frame::Error(e))) => {
                    warn!(bot = ctx2.bot, method, url, count = n, outcome = ?outcome, error = e.error, "reverse http: not relayed")
                }
                _ => {}
            }
            let _ = tx2.send(frame).await;
        });
    }
}

/// An `error` frame for request `id`.
pub fn error_frame(id: &str, text: String) -> bp::ReverseHttpFrame {
    bp::ReverseHttpFrame {
        frame: Some(bp::reverse_http_frame::Frame::Error(bp::ReverseHttpError {
            id: id.to_string(),
            error: text,
        })),
    }
}

/// Keeps the bot's stream open until `ctx.stop`: `client` gives the bot's current client
/// (`None` while it has no route); a broken stream is reopened after a backoff (250 ms
/// doubling to 30 s, over again after a healthy stream), at once after a nudge.
pub async fn keep_open<F, Fut>(ctx: RelayContext, mut client: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<ContainerClient>>,
{
    let mut backoff = FIRST_BACKOFF;
    loop {
        if ctx.stop.is_cancelled() {
            break;
        }
        let began = Instant::now();
        let r = match client().await {
            None => Err(Status::unavailable("the bot has no route yet")),
            Some(c) => match open(&c).await {
                Ok((tx, inbound)) => {
                    info!(bot = ctx.bot, "reverse http stream open");
                    serve_frames(&ctx, inbound, tx).await
                }
                Err(s) => Err(s),
            },
        };
        if ctx.stop.is_cancelled() {
            break;
        }
        if began.elapsed() >= HEALTHY {
            backoff = FIRST_BACKOFF;
        }
        let pause = match &r {
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                info!(
                    bot = ctx.bot,
                    "the bot's server has no ReverseHTTP; asking again at its next start"
                );
                UNIMPLEMENTED_PAUSE
            }
            r => {
                let p = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                match r {
                    Ok(()) => debug!(bot = ctx.bot, ?p, "reverse http stream ended; reopening"),
                    Err(s) => {
                        debug!(bot = ctx.bot, ?p, error = %s, "reverse http stream failed; reopening")
                    }
                }
                p
            }
        };
        tokio::select! {
            _ = ctx.stop.cancelled() => break,
            _ = ctx.nudge.notified() => backoff = FIRST_BACKOFF,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    let (allowed, refused, failed) = ctx.counters.get();
    info!(
        bot = ctx.bot,
        allowed, refused, failed, "reverse http relay closed"
    );
}
