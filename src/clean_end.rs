//! A request stream ends cleanly only when the client half-closed it and the call was not
//! reset: the layer every server of this workspace puts in front of its services.
//!
//! # Why a layer
//!
//! Handlers commit uploads (WriteRaw) and close a child's stdin (Exec) when their request
//! stream ends. What the handler is told depends on how the client ended the stream, and on
//! the stack below it. What the clients send, at the HTTP/2 frame level (grpcio 1.85 and the
//! tonic/hyper client observed on the wire by the foreign-client tier, `tests/wire/test_aborts.py`
//! and `tests/server_raw.rs`; grpc-go from its transport's source):
//!
//! | client ending          | grpcio (C-core)                   | grpc-go                   | tonic / hyper client |
//! |------------------------|-----------------------------------|---------------------------|----------------------|
//! | clean half-close       | DATA with END_STREAM              | DATA with END_STREAM      | DATA with END_STREAM |
//! | cancel                 | RST_STREAM CANCEL, connection kept| RST_STREAM CANCEL         | RST_STREAM CANCEL (call dropped) |
//! | deadline               | `grpc-timeout` sent, then RST_STREAM CANCEL, never END_STREAM | RST_STREAM CANCEL | `grpc-timeout`; RST_STREAM CANCEL |
//! | channel closed mid-call| RST_STREAM CANCEL, then TCP close (no GOAWAY) | connection closed | connection closed |
//! | process killed, link lost | TCP FIN or RST                 | TCP FIN or RST            | TCP FIN or RST       |
//!
//! A raw HTTP/2 client (the tier's `h2` one) adds RST_STREAM NO_ERROR and GOAWAY then close.
//! The server's own `grpc-timeout` enforcement (tonic's) may fire first and answer CANCELLED;
//! either way the call is over before a clean end.
//!
//! What hyper 1.x and tonic 0.14 then hand the handler's `Streaming`, for each:
//!
//! - END_STREAM: `Ok(None)`, the clean end.
//! - RST_STREAM NO_ERROR: hyper's `Incoming` returns end of body (RFC 9113 8.1 lets a server
//!   stop reading that way), so `Ok(None)`: **indistinguishable from a clean end**.
//! - RST_STREAM CANCEL: hyper returns an error, tonic turns it into `Code::Cancelled`, and
//!   tonic's decoder maps a cancelled *request* stream to `Ok(None)`: **also a clean end**.
//!   This is how a grpcio `future.cancel()` or channel close committed a partial upload.
//! - Other RST_STREAM codes, a closed connection (h2 reports a broken pipe), GOAWAY with an
//!   error: an error (`Err(status)`).
//!
//! A body wrapper alone cannot tell the two "clean" cases from a real end: hyper reports them
//! identically. What can tell them apart is the stream's reset state, which h2 has already
//! recorded when the body reports its end, and which hyper checks between two polls of the
//! call: while the service future is pending (`H2Stream::poll2` polls `reply.poll_reset` after
//! the service returned `Pending`) and before every poll of the response body
//! (`PipeToSendStream::poll` checks `poll_reset` at the top of its loop). A reset makes hyper
//! drop the call: the future, the response body and with them everything of the handler.
//!
//! So the layer holds back the end of the request body of every call it gates (the methods
//! with a request stream, [`CONTAINER_STREAMING_REQUESTS`]): when the inner body ends, the
//! wrapper answers `Pending`, and the *watcher* (the service future while it runs, then the
//! response body) arms once hyper is about to check for a reset and confirms on its next poll.
//! Only then does the handler see the end. A reset stream never gets that far: hyper drops the
//! watcher, and the body reports an error. A cancel code is also remapped so tonic's decoder
//! reports it instead of swallowing it. The cost is one extra wake-up per gated call.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// The methods of `mcpcontainer.ContainerService` and `bridgepb.ContainerService` whose
/// request is a stream (Exec's stdin, the uploads' chunks, a tunnel's or terminal's input, a
/// host's ReverseHTTP answers): the calls whose handlers act on the stream's end (a tunnel's
/// half-close shuts its socket's write side; a reset must close it instead).
pub const CONTAINER_STREAMING_REQUESTS: &[&str] = &[
    "/mcpcontainer.ContainerService/Exec",
    "/mcpcontainer.ContainerService/WriteRaw",
    "/bridgepb.ContainerService/Exec",
    "/bridgepb.ContainerService/WriteRaw",
    "/bridgepb.ContainerService/WriteRawNoFollow",
    "/bridgepb.ContainerService/Tunnel",
    "/bridgepb.ContainerService/ReverseHTTP",
    "/bridgepb.ContainerService/Terminal",
];

/// Wraps a service so the handlers of the calls at the given paths see a request stream's end
/// only when the client really half-closed it (see the module docs). Other calls pass through
/// untouched: a unary request is one complete message, whose end decides nothing, and the
/// gate's extra wake-up would cost them 10 to 15 % of their rate (measured: BENCHMARKS.md,
/// 2026-12-07).
#[derive(Debug, Clone, Copy)]
pub struct CleanEndLayer {
    paths: &'static [&'static str],
}

impl CleanEndLayer {
    /// Gates the request streams of the calls at `paths` (`/package.Service/Method`).
    pub const fn for_paths(paths: &'static [&'static str]) -> Self {
        Self { paths }
    }
}

impl<S> Layer<S> for CleanEndLayer {
    type Service = CleanEnd<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CleanEnd {
            inner,
            paths: self.paths,
        }
    }
}

/// The service of [`CleanEndLayer`].
#[derive(Debug, Clone)]
pub struct CleanEnd<S> {
    inner: S,
    paths: &'static [&'static str],
}

impl<S, ResBody> Service<http::Request<Body>> for CleanEnd<S>
where
    S: Service<http::Request<Body>, Response = http::Response<ResBody>>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = CleanEndFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if !self.paths.contains(&req.uri().path()) {
            return CleanEndFuture {
                inner: Box::pin(self.inner.call(req)),
                watcher: None,
            };
        }
        let gate = Gate::default();
        let req = req.map(|body| {
            Body::new(GatedRequest {
                inner: body,
                gate: gate.clone(),
                ended: false,
            })
        });
        CleanEndFuture {
            inner: Box::pin(self.inner.call(req)),
            watcher: Some(Watcher(gate)),
        }
    }
}

/// Where the end of one call's request body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The body has not ended.
    Open,
    /// The inner body ended; the watcher has not yet let hyper check for a reset.
    EndSeen,
    /// The watcher returned to hyper, which checks for a reset before polling it again.
    Armed,
    /// No reset: the handler may see the end.
    Confirmed,
    /// The watcher went away before confirming: the call was reset, timed out or finished.
    Gone,
}

#[derive(Debug)]
struct GateState {
    phase: Phase,
    body: Option<Waker>,
    watcher: Option<Waker>,
}

#[derive(Debug, Clone)]
struct Gate(Arc<Mutex<GateState>>);

impl Default for Gate {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(GateState {
            phase: Phase::Open,
            body: None,
            watcher: None,
        })))
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The state is a few words updated in single steps: a panic elsewhere cannot leave
        // it half-written.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The side of the gate hyper drops when the stream is reset.
#[derive(Debug)]
struct Watcher(Gate);

impl Watcher {
    /// Called at the start of a poll that hyper made after checking for a reset.
    fn confirm(&self, cx: &Context<'_>) {
        let mut s = self.0.lock();
        if s.phase == Phase::Armed {
            s.phase = Phase::Confirmed;
            if let Some(w) = s.body.take() {
                w.wake();
            }
        }
        if !s.watcher.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.watcher = Some(cx.waker().clone());
        }
    }

    /// Called when the poll is about to return to hyper, which then checks for a reset.
    fn arm(&self, cx: &Context<'_>) {
        let mut s = self.0.lock();
        if s.phase == Phase::EndSeen {
            s.phase = Phase::Armed;
            cx.waker().wake_by_ref();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        if s.phase != Phase::Confirmed {
            s.phase = Phase::Gone;
            if let Some(w) = s.body.take() {
                w.wake();
            }
        }
    }
}

/// The request body: its end is held back until the watcher confirmed it.
struct GatedRequest {
    inner: Body,
    gate: Gate,
    ended: bool,
}

/// The error a request body reports when its call ended before a clean half-close.
fn ended_badly() -> Status {
    Status::aborted("the client ended the call before closing its request stream")
}

impl HttpBody for GatedRequest {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        while !self.ended {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                // An empty DATA frame carries nothing, and the end it may have come with is
                // held here: passed on, it would leave a proxy as an empty DATA frame without
                // END_STREAM, and h2 answers the 101st such frame on a connection with GOAWAY
                // ENHANCE_YOUR_CALM (every 101st exec through the agent failed).
                Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(|d| d.is_empty()) => {
                    continue
                }
                Poll::Ready(Some(Ok(frame))) => return Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(s))) => {
                    self.ended = true;
                    // tonic's decoder takes a cancelled request stream for a clean end.
                    let s = if s.code() == Code::Cancelled {
                        Status::aborted(format!("the client cancelled the call: {}", s.message()))
                    } else {
                        s
                    };
                    let mut g = self.gate.lock();
                    g.phase = Phase::Gone;
                    return Poll::Ready(Some(Err(s)));
                }
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let mut g = self.gate.lock();
        match g.phase {
            Phase::Confirmed => Poll::Ready(None),
            Phase::Gone => Poll::Ready(Some(Err(ended_badly()))),
            Phase::Open | Phase::EndSeen | Phase::Armed => {
                if g.phase == Phase::Open {
                    g.phase = Phase::EndSeen;
                    if let Some(w) = g.watcher.take() {
                        w.wake();
                    }
                }
                if !g.body.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    g.body = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.gate.lock().phase == Phase::Confirmed
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The future of [`CleanEnd`]: the watcher while the handler runs.
pub struct CleanEndFuture<F> {
    inner: Pin<Box<F>>,
    watcher: Option<Watcher>,
}

impl<F, ResBody, E> Future for CleanEndFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(w) = &self.watcher {
            w.confirm(cx);
        }
        match self.inner.as_mut().poll(cx) {
            Poll::Pending => {
                if let Some(w) = &self.watcher {
                    w.arm(cx);
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(resp)) => match self.watcher.take() {
                // A call whose request is not gated: its body as it is (no extra box for a
                // tonic body).
                None => Poll::Ready(Ok(resp.map(Body::new))),
                watcher => Poll::Ready(Ok(resp.map(|body| {
                    Body::new(WatchedResponse {
                        inner: Box::pin(body),
                        watcher,
                    })
                }))),
            },
        }
    }
}

/// The response body: the watcher once the handler returned (streaming responses).
struct WatchedResponse<B> {
    inner: Pin<Box<B>>,
    watcher: Option<Watcher>,
}

impl<B> HttpBody for WatchedResponse<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // hyper checks for a reset before every poll of a response body, so a poll may both
        // confirm an end armed earlier and arm one seen since.
        if let Some(w) = &self.watcher {
            w.confirm(cx);
        }
        let r = self.inner.as_mut().poll_frame(cx).map_err(Into::into);
        if let Some(w) = &self.watcher {
            w.arm(cx);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn gated(body: Body) -> (GatedRequest, Watcher) {
        let gate = Gate::default();
        (
            GatedRequest {
                inner: body,
                gate: gate.clone(),
                ended: false,
            },
            Watcher(gate),
        )
    }

    fn poll(b: &mut GatedRequest) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut cx = Context::from_waker(noop_waker_ref());
        Pin::new(b).poll_frame(&mut cx)
    }

    #[test]
    fn the_end_waits_for_the_watcher_to_arm_and_confirm() {
        let (mut b, w) = gated(Body::empty());
        let cx = Context::from_waker(noop_waker_ref());
        assert!(poll(&mut b).is_pending(), "end seen, not yet confirmed");
        w.confirm(&cx);
        assert!(poll(&mut b).is_pending(), "confirm before arm does nothing");
        w.arm(&cx);
        assert!(
            poll(&mut b).is_pending(),
            "armed, hyper has not checked yet"
        );
        w.confirm(&cx);
        assert!(
            matches!(poll(&mut b), Poll::Ready(None)),
            "confirmed: a clean end"
        );
        drop(w);
        assert!(
            matches!(poll(&mut b), Poll::Ready(None)),
            "stays clean after the watcher"
        );
    }

    #[test]
    fn a_watcher_dropped_before_confirming_is_an_error() {
        for steps in 0..3 {
            let (mut b, w) = gated(Body::empty());
            let cx = Context::from_waker(noop_waker_ref());
            assert!(poll(&mut b).is_pending());
            if steps > 0 {
                w.arm(&cx);
            }
            if steps > 1 {
                // Armed and polled by hyper again would confirm; a reset drops it instead.
                assert!(poll(&mut b).is_pending());
            }
            drop(w);
            match poll(&mut b) {
                Poll::Ready(Some(Err(s))) => assert_eq!(s.code(), Code::Aborted),
                other => panic!("steps {steps}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_cancelled_body_is_reported_not_swallowed() {
        let inner = http_body_util::StreamBody::new(futures::stream::iter(vec![
            Ok::<_, Status>(Frame::data(Bytes::from_static(b"abc"))),
            Err(Status::cancelled(
                "h2 protocol error: stream no longer needed",
            )),
        ]));
        let (mut b, _w) = gated(Body::new(inner));
        assert!(matches!(poll(&mut b), Poll::Ready(Some(Ok(_)))));
        match poll(&mut b) {
            Poll::Ready(Some(Err(s))) => {
                assert_eq!(s.code(), Code::Aborted);
                assert!(s.message().contains("cancelled"), "{}", s.message());
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn empty_data_frames_are_not_passed_on() {
        let inner = http_body_util::StreamBody::new(futures::stream::iter(vec![
            Ok::<_, Status>(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::new())),
        ]));
        let (mut b, w) = gated(Body::new(inner));
        match poll(&mut b) {
            Poll::Ready(Some(Ok(f))) => assert_eq!(f.data_ref().map(|d| &d[..]), Some(&b"abc"[..])),
            other => panic!("expected the data, got {other:?}"),
        }
        // The trailing empty frame is skipped: the next thing is the held end.
        assert!(poll(&mut b).is_pending());
        let cx = Context::from_waker(noop_waker_ref());
        w.arm(&cx);
        w.confirm(&cx);
        assert!(matches!(poll(&mut b), Poll::Ready(None)));
    }
}
