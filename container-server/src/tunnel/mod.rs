//! `bridgepb` Tunnel (WIRE-BRIDGE.md section 3): a TCP connection from the bot's server to a
//! loopback service of the bot, carried in `TunnelFrame`s.
//!
//! The first frame is `open{address}`; the address must resolve to loopback addresses only
//! ([`address`]), else PERMISSION_DENIED: the tunnel must not let a caller reach the bot's
//! network neighbours or the host. After the dial (10 s, failure UNAVAILABLE) the server sends
//! one empty `data` frame (opened), then the target's bytes as `data` frames of at most
//! [`CHUNK`] bytes, then `close{""}` at the target's EOF or `close{msg}` on a read error, and
//! waits for the client to end the call. The client's `data` is written to the target; its
//! `close` ends the call (OK, CANCELLED when it has text); its half-close shuts the target's
//! write side and the call ends OK once the target has sent its EOF too.
//!
//! Both directions run on their own and are bounded: the target is read only while the
//! response queue ([`OUT_FRAMES`] frames) has room, and the client's frames are read only as
//! fast as the target takes them, so a slow peer slows its sender instead of growing a buffer.
//! When the client leaves (cancel, reset, lost connection) the TCP connection is closed.

pub mod address;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use memoh_proto::pb::bridgepb as bp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{debug, Instrument};

use crate::error::ServerError;
use crate::stream::BoxStream;
use bp::tunnel_frame::Frame;

/// The largest `data` frame the server sends.
pub const CHUNK: usize = 32 * 1024;

/// How long the dial to the target may take, over all its addresses.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames queued towards the client before the target is no longer read.
pub const OUT_FRAMES: usize = 4;

fn frame(f: Frame) -> bp::TunnelFrame {
    bp::TunnelFrame { frame: Some(f) }
}

fn data(d: Bytes) -> bp::TunnelFrame {
    frame(Frame::Data(bp::TunnelData { data: d }))
}

fn close(error: String) -> bp::TunnelFrame {
    frame(Frame::Close(bp::TunnelClose { error }))
}

/// Serves one Tunnel call: reads the `open` frame, checks and dials the target, and returns the
/// response stream, fed by a task that runs the tunnel until either side ends it.
pub async fn open(
    mut inbound: BoxStream<bp::TunnelFrame>,
) -> Result<BoxStream<bp::TunnelFrame>, Status> {
    let address = match inbound.next().await.transpose()? {
        Some(bp::TunnelFrame {
            frame: Some(Frame::Open(o)),
        }) => o.address,
        Some(_) => {
            return Err(
                ServerError::InvalidArgument("the first tunnel frame must be open".into()).into(),
            )
        }
        None => {
            return Err(ServerError::InvalidArgument(
                "tunnel stream closed before its open frame".into(),
            )
            .into())
        }
    };
    let targets = address::resolve(&address).await?;
    let tcp = dial(&address, &targets).await?;
    let span = tracing::debug_span!("tunnel", address = %address);
    debug!(parent: &span, "tunnel open");
    let (out, rx) = mpsc::channel(OUT_FRAMES);
    // The queue is empty: the "opened" frame always fits.
    let _ = out.try_send(Ok(data(Bytes::new())));
    tokio::spawn(run(tcp, inbound, out).instrument(span));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Tries each checked address in order within [`DIAL_TIMEOUT`] in all.
async fn dial(address: &str, targets: &[std::net::SocketAddr]) -> Result<TcpStream, ServerError> {
    let deadline = tokio::time::Instant::now() + DIAL_TIMEOUT;
    let mut last = String::from("no address to dial");
    for t in targets {
        match tokio::time::timeout_at(deadline, TcpStream::connect(t)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("{t}: {e}"),
            Err(_) => {
                last = format!("{t}: timed out after {} s", DIAL_TIMEOUT.as_secs());
                break;
            }
        }
    }
    Err(ServerError::Unavailable(format!(
        "tunnel dial {address:?} failed: {last}"
    )))
}

/// How the client's side of a tunnel ended.
enum ClientEnd {
    /// The client half-closed its stream: the target's write side is shut.
    HalfClosed,
    /// The call ends now with this status (`Ok` for a `close` without text).
    Done(Result<(), Status>),
    /// The client is gone (reset, lost connection): nothing more to tell it.
    Gone,
}

type Out = mpsc::Sender<Result<bp::TunnelFrame, Status>>;

/// Runs both directions until the call is over; dropping the halves closes the connection.
async fn run(tcp: TcpStream, mut inbound: BoxStream<bp::TunnelFrame>, out: Out) {
    let (rd, mut wr) = tcp.into_split();
    let down = target_to_client(rd, out.clone());
    let up = client_to_target(&mut inbound, &mut wr);
    tokio::pin!(down, up);
    let mut down_done = false;
    let end = loop {
        tokio::select! {
            _ = &mut down, if !down_done => down_done = true,
            end = &mut up => break end,
            _ = out.closed() => {
                debug!("tunnel client left");
                return;
            }
        }
    };
    let status = match end {
        ClientEnd::HalfClosed => {
            if !down_done {
                tokio::select! {
                    _ = &mut down => {}
                    _ = out.closed() => return,
                }
            }
            Ok(())
        }
        ClientEnd::Done(s) => s,
        ClientEnd::Gone => return,
    };
    debug!(ok = status.is_ok(), "tunnel done");
    if let Err(s) = status {
        let _ = out.send(Err(s)).await;
    }
}

/// Copies the target's bytes to the client until the target's EOF or a read error, each told
/// with a `close` frame. Returns early when the client is gone.
async fn target_to_client(mut rd: OwnedReadHalf, out: Out) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let f = match rd.read(&mut buf).await {
            Ok(0) => close(String::new()),
            Ok(n) => data(Bytes::copy_from_slice(&buf[..n])),
            Err(e) => close(format!("read from target: {e}")),
        };
        let last = matches!(f.frame, Some(Frame::Close(_)));
        if out.send(Ok(f)).await.is_err() || last {
            return;
        }
    }
}

/// Writes the client's `data` to the target until the client ends its side.
async fn client_to_target(
    inbound: &mut BoxStream<bp::TunnelFrame>,
    wr: &mut OwnedWriteHalf,
) -> ClientEnd {
    loop {
        let f = match inbound.next().await {
            Some(Ok(f)) => f,
            Some(Err(s)) => {
                debug!(status = %s.message(), "tunnel request stream ended badly");
                return ClientEnd::Gone;
            }
            None => {
                if let Err(e) = wr.shutdown().await {
                    debug!(error = %e, "tunnel write shutdown");
                }
                return ClientEnd::HalfClosed;
            }
        };
        match f.frame {
            Some(Frame::Data(d)) => {
                if let Err(e) = wr.write_all(&d.data).await {
                    return ClientEnd::Done(Err(ServerError::Unavailable(format!(
                        "tunnel write to target failed: {e}"
                    ))
                    .into()));
                }
            }
            Some(Frame::Close(c)) if c.error.is_empty() => return ClientEnd::Done(Ok(())),
            Some(Frame::Close(c)) => {
                return ClientEnd::Done(Err(ServerError::Cancelled(format!(
                    "tunnel closed by the client: {}",
                    c.error
                ))
                .into()))
            }
            Some(Frame::Open(_)) => {
                return ClientEnd::Done(Err(ServerError::InvalidArgument(
                    "tunnel already open: a second open frame".into(),
                )
                .into()))
            }
            None => {
                return ClientEnd::Done(Err(ServerError::InvalidArgument(
                    "empty tunnel frame (no open, data or close)".into(),
                )
                .into()))
            }
        }
    }
}
