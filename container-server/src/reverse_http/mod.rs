//! `bridgepb` ReverseHTTP (WIRE-BRIDGE.md section 3): HTTP requests made inside the bot, to a
//! loopback listener of the server ([`listener`]), answered by the host over gRPC streams it
//! opened to the server.
//!
//! The [`Hub`] is the routing table between the two. Each ReverseHTTP stream registers under
//! its route (the `x-memoh-reverse-http-route` metadata, a path; none is the default stream);
//! a newer stream replaces the older one of its route, whose waiting requests get 502 and which
//! ends ABORTED. An HTTP request goes to the stream whose route equals its path, else to the
//! default stream, else gets 503; it travels as a `request` frame with a fresh id and waits for
//! the `response` or `error` frame with that id (any order), at most the hub's timeout (504).
//! When a stream ends, its waiting requests get 502.

pub mod headers;
pub mod listener;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use memoh_proto::pb::bridgepb as bp;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::debug;

use crate::error::ServerError;
use crate::stream::BoxStream;
use bp::reverse_http_frame::Frame;

/// The gRPC metadata key naming a stream's route.
pub const ROUTE_METADATA: &str = "x-memoh-reverse-http-route";

/// How long an HTTP request waits for the host's answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Requests queued towards one stream before senders wait.
const REQUEST_QUEUE: usize = 16;

/// The longest route accepted.
const MAX_ROUTE_LEN: usize = 2048;

/// What an HTTP request gets from the hub.
#[derive(Debug)]
pub enum Outcome {
    /// The host's answer.
    Response(bp::ReverseHttpResponse),
    /// 502 with this text: the host's `error`, or the stream ended or was replaced.
    BadGateway(String),
    /// 503: no stream for the path and no default stream.
    NoStream,
    /// 504: no answer in time.
    TimedOut,
}

/// Why a stream's response ends: `None` is a plain end (OK).
struct EndSignal {
    token: CancellationToken,
    reason: Mutex<Option<Status>>,
}

impl EndSignal {
    fn end(&self, reason: Option<Status>) {
        if let Some(r) = reason {
            lock(&self.reason).get_or_insert(r);
        }
        self.token.cancel();
    }
}

/// One registered stream: where its requests go and who waits for an answer.
struct Entry {
    id: u64,
    requests: mpsc::Sender<bp::ReverseHttpRequest>,
    pending: HashMap<String, oneshot::Sender<Outcome>>,
    end: Arc<EndSignal>,
}

impl Entry {
    /// Answers every waiting request with 502 `why` and ends the stream's response.
    fn fail(self, why: &str, reason: Option<Status>) {
        for (_, waiter) in self.pending {
            let _ = waiter.send(Outcome::BadGateway(why.to_string()));
        }
        self.end.end(reason);
    }
}

/// The routing table: route ("" for the default stream) to its current stream.
#[derive(Default)]
struct Table {
    streams: HashMap<String, Entry>,
}

impl Table {
    /// The route serving `path`: the stream registered under exactly that path, else the
    /// default one.
    fn route_for(&self, path: &str) -> Option<&str> {
        if !path.is_empty() {
            if let Some((route, _)) = self.streams.get_key_value(path) {
                return Some(route);
            }
        }
        self.streams.get_key_value("").map(|(r, _)| r.as_str())
    }

    /// Registers `entry` under `route`, returning the stream it replaces.
    fn insert(&mut self, route: String, entry: Entry) -> Option<Entry> {
        self.streams.insert(route, entry)
    }

    /// Removes the stream `id` of `route`, if it is still the registered one.
    fn remove(&mut self, route: &str, id: u64) -> Option<Entry> {
        if self.streams.get(route).is_some_and(|e| e.id == id) {
            return self.streams.remove(route);
        }
        None
    }

    /// The current stream `id` of `route`.
    fn get(&mut self, route: &str, id: u64) -> Option<&mut Entry> {
        self.streams.get_mut(route).filter(|e| e.id == id)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared routing state of ReverseHTTP: streams by route and the requests waiting on them.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    timeout: Duration,
    next_request: AtomicU64,
    next_stream: AtomicU64,
    table: Mutex<Table>,
}

/// Removes a waiting request from its stream when the request is answered, times out or its
/// HTTP client leaves.
struct Waiting<'a> {
    hub: &'a Hub,
    route: String,
    stream: u64,
    id: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut t = lock(&self.hub.inner.table);
        if let Some(e) = t.get(&self.route, self.stream) {
            e.pending.remove(&self.id);
        }
    }
}

impl Hub {
    /// An empty hub whose requests wait at most `timeout` for an answer.
    pub fn new(timeout: Duration) -> Self {
        Self {
            inner: Arc::new(HubInner {
                timeout,
                next_request: AtomicU64::new(0),
                next_stream: AtomicU64::new(0),
                table: Mutex::new(Table::default()),
            }),
        }
    }

    /// How long a request waits for the host's answer.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Sends `req` (its id set here) to the stream serving `path` and waits for the answer.
    pub async fn forward(&self, path: &str, mut req: bp::ReverseHttpRequest) -> Outcome {
        let n = self.inner.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        req.id = format!("reverse-http-{n}");
        let (tx, mut rx) = oneshot::channel();
        let (sender, waiting) = {
            let mut t = lock(&self.inner.table);
            let Some(route) = t.route_for(path).map(str::to_string) else {
                return Outcome::NoStream;
            };
            let Some(e) = t.streams.get_mut(&route) else {
                return Outcome::NoStream;
            };
            e.pending.insert(req.id.clone(), tx);
            let w = Waiting {
                hub: self,
                route,
                stream: e.id,
                id: req.id.clone(),
            };
            (e.requests.clone(), w)
        };
        let ended = || Outcome::BadGateway("reverse http stream ended".into());
        let wait = async {
            tokio::select! {
                sent = sender.send(req) => {
                    if sent.is_err() {
                        return ended();
                    }
                }
                answer = &mut rx => return answer.unwrap_or_else(|_| ended()),
            }
            rx.await.unwrap_or_else(|_| ended())
        };
        let outcome = tokio::time::timeout(self.inner.timeout, wait)
            .await
            .unwrap_or(Outcome::TimedOut);
        drop(waiting);
        outcome
    }

    /// Registers a ReverseHTTP stream under `route` (from its metadata; "" for the default
    /// stream) and returns its response stream: the requests routed to it. Its `inbound`
    /// answers are read by a task of their own.
    pub fn attach(
        &self,
        route: String,
        inbound: BoxStream<bp::ReverseHttpFrame>,
    ) -> BoxStream<bp::ReverseHttpFrame> {
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let end = Arc::new(EndSignal {
            token: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        let entry = Entry {
            id,
            requests: tx,
            pending: HashMap::new(),
            end: end.clone(),
        };
        let old = lock(&self.inner.table).insert(route.clone(), entry);
        if let Some(old) = old {
            debug!(route = %route, "reverse http stream replaced");
            old.fail(
                "reverse http stream replaced by a newer one",
                Some(Status::aborted(format!(
                    "reverse http stream for route {route:?} replaced by a newer one"
                ))),
            );
        }
        tokio::spawn(self.clone().read_answers(route, id, inbound, end.clone()));
        response_stream(rx, end)
    }

    /// Hands the host's answers to the waiting requests until the stream ends, then fails the
    /// requests still waiting on it.
    async fn read_answers(
        self,
        route: String,
        id: u64,
        mut inbound: BoxStream<bp::ReverseHttpFrame>,
        end: Arc<EndSignal>,
    ) {
        let reason = loop {
            let next = tokio::select! {
                m = inbound.next() => m,
                _ = end.token.cancelled() => return,
            };
            let (rid, outcome) = match next {
                None => break None,
                Some(Err(s)) => {
                    debug!(status = %s.message(), "reverse http stream ended badly");
                    break None;
                }
                Some(Ok(f)) => match f.frame {
                    Some(Frame::Response(r)) => (r.id.clone(), Outcome::Response(r)),
                    Some(Frame::Error(e)) => (e.id, Outcome::BadGateway(e.error)),
                    Some(Frame::Request(_)) => {
                        break Some(Status::invalid_argument(
                            "the host sends only response and error frames on reverse http",
                        ))
                    }
                    None => break Some(Status::invalid_argument("empty reverse http frame")),
                },
            };
            let waiter = lock(&self.inner.table)
                .get(&route, id)
                .and_then(|e| e.pending.remove(&rid));
            match waiter {
                Some(w) => {
                    let _ = w.send(outcome);
                }
                None => debug!(id = %rid, "reverse http answer for no waiting request"),
            }
        };
        let gone = lock(&self.inner.table).remove(&route, id);
        match gone {
            Some(e) => e.fail("reverse http stream ended", reason),
            None => end.end(reason),
        }
    }
}

/// The route a ReverseHTTP call asks for in its metadata ([`ROUTE_METADATA`]): absent or
/// empty is the default stream; else a path (INVALID_ARGUMENT otherwise).
pub fn route_of(metadata: &tonic::metadata::MetadataMap) -> Result<String, ServerError> {
    let route = match metadata.get(ROUTE_METADATA) {
        Some(v) => Some(v.to_str().map_err(|_| {
            ServerError::InvalidArgument(format!("{ROUTE_METADATA} is not printable ascii"))
        })?),
        None => None,
    };
    check_route(route)
}

/// A route from metadata: absent or empty is the default stream; else a path.
fn check_route(route: Option<&str>) -> Result<String, ServerError> {
    let r = route.unwrap_or("");
    if !r.is_empty() && (!r.starts_with('/') || r.len() > MAX_ROUTE_LEN) {
        return Err(ServerError::InvalidArgument(format!(
            "{ROUTE_METADATA} must be a path starting with / (at most {MAX_ROUTE_LEN} bytes)"
        )));
    }
    Ok(r.to_string())
}

/// The requests of one stream as `request` frames, ended by its [`EndSignal`].
fn response_stream(
    rx: mpsc::Receiver<bp::ReverseHttpRequest>,
    end: Arc<EndSignal>,
) -> BoxStream<bp::ReverseHttpFrame> {
    let s = futures::stream::unfold(Some((rx, end)), |state| async move {
        let (mut rx, end) = state?;
        tokio::select! {
            biased;
            _ = end.token.cancelled() => {
                let reason = lock(&end.reason).take();
                reason.map(|s| (Err(s), None))
            }
            m = rx.recv() => {
                let req = m?;
                let f = bp::ReverseHttpFrame { frame: Some(Frame::Request(req)) };
                Some((Ok(f), Some((rx, end))))
            }
        }
    });
    Box::pin(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> (Entry, mpsc::Receiver<bp::ReverseHttpRequest>) {
        let (tx, rx) = mpsc::channel(1);
        let e = Entry {
            id,
            requests: tx,
            pending: HashMap::new(),
            end: Arc::new(EndSignal {
                token: CancellationToken::new(),
                reason: Mutex::new(None),
            }),
        };
        (e, rx)
    }

    #[test]
    fn routing_table() {
        let mut t = Table::default();
        assert_eq!(t.route_for("/mcp/a"), None);
        let (a, _ra) = entry(1);
        assert!(t.insert("/mcp/a".into(), a).is_none());
        // Only an exact path match uses a routed stream; no default stream yet.
        assert_eq!(t.route_for("/mcp/a"), Some("/mcp/a"));
        assert_eq!(t.route_for("/mcp/a/"), None);
        assert_eq!(t.route_for("/mcp/ab"), None);
        assert_eq!(t.route_for("/mcp"), None);
        let (d, _rd) = entry(2);
        assert!(t.insert(String::new(), d).is_none());
        assert_eq!(t.route_for("/mcp/a"), Some("/mcp/a"));
        assert_eq!(t.route_for("/mcp/b"), Some(""));
        assert_eq!(t.route_for("/"), Some(""));
        assert_eq!(t.route_for(""), Some(""));
        // A newer stream replaces the route's; removing the old id then does nothing.
        let (a2, _ra2) = entry(3);
        let old = t.insert("/mcp/a".into(), a2).expect("replaced");
        assert_eq!(old.id, 1);
        assert!(t.remove("/mcp/a", 1).is_none());
        assert!(t.get("/mcp/a", 1).is_none());
        assert!(t.get("/mcp/a", 3).is_some());
        assert_eq!(t.remove("/mcp/a", 3).map(|e| e.id), Some(3));
        assert_eq!(t.route_for("/mcp/a"), Some(""));
    }

    #[test]
    fn replaced_entry_fails_its_waiters() {
        let (mut e, _rx) = entry(1);
        let (tx, mut rx) = oneshot::channel();
        e.pending.insert("reverse-http-1".into(), tx);
        let end = e.end.clone();
        e.fail("replaced", Some(Status::aborted("x")));
        assert!(matches!(rx.try_recv(), Ok(Outcome::BadGateway(m)) if m == "replaced"));
        assert!(end.token.is_cancelled());
        assert_eq!(
            lock(&end.reason).take().map(|s| s.code()),
            Some(tonic::Code::Aborted)
        );
    }

    #[test]
    fn routes_from_metadata() {
        assert_eq!(check_route(None).unwrap(), "");
        assert_eq!(check_route(Some("")).unwrap(), "");
        assert_eq!(check_route(Some("/mcp/x")).unwrap(), "/mcp/x");
        for bad in ["mcp/x", "x"] {
            assert!(check_route(Some(bad)).is_err(), "{bad}");
        }
        assert!(check_route(Some(&format!("/{}", "a".repeat(3000)))).is_err());
    }
}
