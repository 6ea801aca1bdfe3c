//! `mcpcontainer.ContainerService`, `bridgepb.ContainerService` and
//! `memoh.process.v1.ProcessService` on the agent's socket, routed to a bot by the
//! `x-memoh-bot` request metadata. One forwarding code serves all three names ([`Proxy`] is
//! generic over the [`Routed`] service name): a bot's server answers them all on the same port,
//! so a call goes to it under the name it came with. Callers use the same client they use against a bot's
//! server and never learn bot addresses or tokens. Unknown bot: NOT_FOUND; a bot that is
//! down: UNAVAILABLE with the reason.
//!
//! The proxy forwards each call as it is, HTTP/2 body for body: messages are neither decoded
//! nor re-encoded, and the way the caller ends its request stream reaches the bot unchanged.
//! That is what keeps an aborted upload from committing: the caller's body arrives through
//! [`memoh_proto::clean_end`], so anything but a clean half-close is a body *error* here, and
//! hyper's client answers a body error with RST_STREAM (INTERNAL_ERROR) towards the bot, never
//! with END_STREAM. When the caller's call is dropped (a reset seen by hyper, a deadline),
//! the upstream call is dropped too and hyper resets it (CANCEL); the bot's own
//! `clean_end` takes either for an abort. The `abort` flag of a WriteRaw chunk travels as it
//! came.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use memoh_proto::limits::BOT_METADATA_KEY;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;
use tower::{Service, ServiceExt};

use crate::bots::Manager;

/// The name of a container service the proxy routes (`package.Service`).
pub trait Routed: Send + Sync + 'static {
    /// The gRPC service name, the first part of every path routed.
    const NAME: &'static str;
}

/// `mcpcontainer.ContainerService` (WIRE.md).
#[derive(Debug)]
pub enum Mcp {}

impl Routed for Mcp {
    const NAME: &'static str = "mcpcontainer.ContainerService";
}

/// `bridgepb.ContainerService` (WIRE-BRIDGE.md).
#[derive(Debug)]
pub enum Bridge {}

impl Routed for Bridge {
    const NAME: &'static str = "bridgepb.ContainerService";
}

/// `memoh.process.v1.ProcessService` (proto/process.proto): processes that outlive the call.
/// They live in the bot, so they survive the caller's disconnect and the agent's restart.
#[derive(Debug)]
pub enum Process {}

impl Routed for Process {
    const NAME: &'static str = "memoh.process.v1.ProcessService";
}

/// The routing service for the container service named by `S`.
pub struct Proxy<S> {
    mgr: Arc<Manager>,
    service: PhantomData<fn() -> S>,
}

/// The router of `mcpcontainer.ContainerService`.
pub type McpProxy = Proxy<Mcp>;
/// The router of `bridgepb.ContainerService`.
pub type BridgeProxy = Proxy<Bridge>;
/// The router of `memoh.process.v1.ProcessService`.
pub type ProcessProxy = Proxy<Process>;

impl<S> Proxy<S> {
    /// Routes through `mgr`.
    pub fn new(mgr: Arc<Manager>) -> Self {
        Self {
            mgr,
            service: PhantomData,
        }
    }
}

impl<S> Clone for Proxy<S> {
    fn clone(&self) -> Self {
        Self::new(self.mgr.clone())
    }
}

impl<S: Routed> NamedService for Proxy<S> {
    const NAME: &'static str = S::NAME;
}

/// The methods whose calls may run for as long as they like (no deadline of ours): every
/// method with a request or a response stream, of any routed service.
fn is_streaming(method: &str) -> bool {
    matches!(
        method,
        "Exec"
            | "Attach"
            | "ReadRaw"
            | "WriteRaw"
            | "Tunnel"
            | "ReverseHTTP"
            | "ReadRawNoFollow"
            | "WriteRawNoFollow"
            | "Terminal"
            | "WatchDir"
    )
}

impl<S: Routed> Service<http::Request<Body>> for Proxy<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let mgr = self.mgr.clone();
        Box::pin(async move {
            Ok(forward::<S>(mgr, req)
                .await
                .unwrap_or_else(Status::into_http))
        })
    }
}

/// Whether a call of `method` on `service` runs without a deadline of ours: a streaming call,
/// or the process service's `Wait`, which blocks by design until the process ends or its own
/// `timeout_ms` passes (the caller's `grpc-timeout`, if any, still reaches the bot).
fn is_unbounded(service: &str, method: &str) -> bool {
    is_streaming(method) || (service == Process::NAME && method == "Wait")
}

/// A failure to reach the bot at all (a local transport error, which has a source) names the
/// bot; the bot's own answers pass through unchanged.
fn failed(mgr: &Manager, bot: &str, s: Status) -> Status {
    mgr.report_failure(bot, &s);
    let local = std::error::Error::source(&s).is_some();
    if local && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
        return Status::unavailable(format!("bot {bot:?} is unreachable: {}", s.message()));
    }
    s
}

/// Parses a `grpc-timeout` value (`<digits><unit>`), as far as a deadline needs it.
fn parse_grpc_timeout(v: &http::HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

async fn forward<S: Routed>(
    mgr: Arc<Manager>,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    let (mut parts, body) = req.into_parts();
    let bot = parts
        .headers
        .get(BOT_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "missing {BOT_METADATA_KEY} metadata naming the bot"
            ))
        })?
        .to_string();
    let client = mgr.client(&bot).await?;
    let method = parts
        .uri
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    // The bot's token is the agent's to add; nothing of the caller's routing goes on.
    parts.headers.remove(BOT_METADATA_KEY);
    parts.headers.remove(http::header::AUTHORIZATION);
    parts.extensions = http::Extensions::new();
    let deadline = (!is_unbounded(S::NAME, &method)).then(|| {
        let ours = client.deadline_of_unary();
        let theirs = parts
            .headers
            .get("grpc-timeout")
            .and_then(parse_grpc_timeout);
        let d = theirs.map_or(ours, |t| t.min(ours));
        // Whole milliseconds, rounded up: at most 8 digits as the protocol asks.
        let ms = (d.as_millis() as u64).clamp(1, 99_999_999);
        if let Ok(v) = http::HeaderValue::from_str(&format!("{ms}m")) {
            parts.headers.insert("grpc-timeout", v);
        }
        d
    });
    let req = http::Request::from_parts(parts, body);
    let mut svc = client.http();
    let call = async {
        let svc = svc.ready().await?;
        svc.call(req).await
    };
    let resp = match deadline {
        Some(d) => match tokio::time::timeout(d, call).await {
            Ok(r) => r,
            Err(_) => {
                let s = Status::deadline_exceeded(format!(
                    "bot {bot:?} did not answer {method} within {d:?}"
                ));
                mgr.report_failure(&bot, &s);
                return Err(s);
            }
        },
        None => call.await,
    };
    let resp = resp.map_err(|e| failed(&mgr, &bot, Status::from_error(e.into())))?;
    Ok(resp.map(|inner| {
        Body::new(FromBot {
            inner: Box::pin(inner),
            mgr,
            bot,
            done: false,
        })
    }))
}

/// The bot's response body: passed through, except that a transport failure in the middle
/// of it ends the caller's call with a status naming the bot (trailers) instead of a reset.
struct FromBot<B> {
    inner: Pin<Box<B>>,
    mgr: Arc<Manager>,
    bot: String,
    done: bool,
}

impl<B> HttpBody for FromBot<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                let s = failed(&self.mgr, &self.bot, Status::from_error(e.into()));
                let mut trailers = http::HeaderMap::new();
                match s.add_header(&mut trailers) {
                    Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Err(s) => Poll::Ready(Some(Err(s))),
                }
            }
            other => other.map_err(|e| Status::from_error(e.into())),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        let p = |s: &str| parse_grpc_timeout(&http::HeaderValue::from_str(s).unwrap());
        assert_eq!(p("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(p("2S"), Some(Duration::from_secs(2)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("10u"), Some(Duration::from_micros(10)));
        assert_eq!(p("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(p("3M"), Some(Duration::from_secs(180)));
        assert_eq!(p("m"), None);
        assert_eq!(p("12x"), None);
        assert_eq!(p(""), None);
    }

    /// Every method of both services, with whether it has a stream (either direction), read
    /// from the descriptor sets the servers are built from.
    fn methods() -> Vec<(String, String, bool)> {
        use prost::Message;
        let mut v = Vec::new();
        for set in [
            memoh_proto::FILE_DESCRIPTOR_SET,
            memoh_proto::BRIDGE_FILE_DESCRIPTOR_SET,
            memoh_proto::PROCESS_FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).unwrap();
            for f in set.file {
                for s in &f.service {
                    for m in &s.method {
                        let streaming = m.client_streaming.unwrap_or(false)
                            || m.server_streaming.unwrap_or(false);
                        v.push((
                            format!("{}.{}", f.package(), s.name()),
                            m.name().to_string(),
                            streaming,
                        ));
                    }
                }
            }
        }
        v
    }

    #[test]
    fn only_the_streaming_methods_run_without_a_deadline() {
        let all = methods();
        assert!(all.len() > 20, "{all:?}");
        for (service, method, streaming) in &all {
            assert_eq!(
                is_streaming(method),
                *streaming,
                "{service}/{method}: streaming {streaming}"
            );
        }
        for m in [
            "Exec",
            "ReadRaw",
            "WriteRaw",
            "Tunnel",
            "ReverseHTTP",
            "ReadRawNoFollow",
            "WriteRawNoFollow",
            "Terminal",
            "WatchDir",
            "Attach",
        ] {
            assert!(is_streaming(m), "{m}");
        }
        for m in [
            "ReadFile",
            "WriteFile",
            "ListDir",
            "Stat",
            "Mkdir",
            "Rename",
            "DeleteFile",
        ] {
            assert!(!is_streaming(m), "{m}");
        }
    }

    #[test]
    fn wait_of_the_process_service_alone_has_no_deadline_among_unary_calls() {
        for (service, method, streaming) in methods() {
            let expected = streaming || (service == Process::NAME && method == "Wait");
            assert_eq!(
                is_unbounded(&service, &method),
                expected,
                "{service}/{method}"
            );
        }
        assert!(is_unbounded(Process::NAME, "Wait"));
        assert!(is_unbounded(Process::NAME, "Attach"));
        for m in ["Start", "List", "Signal", "Remove", "WriteStdin", "Resize"] {
            assert!(!is_unbounded(Process::NAME, m), "{m}");
        }
        assert!(!is_unbounded(Mcp::NAME, "Wait"));
    }

    #[test]
    fn both_services_are_routed_under_their_own_names() {
        assert_eq!(
            <McpProxy as NamedService>::NAME,
            "mcpcontainer.ContainerService"
        );
        assert_eq!(
            <BridgeProxy as NamedService>::NAME,
            "bridgepb.ContainerService"
        );
        let names: std::collections::BTreeSet<_> = methods().into_iter().map(|m| m.0).collect();
        assert_eq!(
            <ProcessProxy as NamedService>::NAME,
            "memoh.process.v1.ProcessService"
        );
        assert!(
            names.contains(Mcp::NAME)
                && names.contains(Bridge::NAME)
                && names.contains(Process::NAME),
            "{names:?}"
        );
    }
}
