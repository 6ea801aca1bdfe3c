//! Unit tests of ReverseHTTP's host side: the allow-list (traversal tricks included), header
//! filtering, one request answered against a real local upstream, and a relay over a real
//! tonic stream whose bot side is a fake bridgepb server in this process.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use memoh_proto::pb::bridgepb as bp;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::allow::{clean_url, AllowEntry, AllowList};
use super::forward::{relay_headers, response_headers, MAX_BODY};
use super::relay::{keep_open, Counters, RelayContext};
use super::{answer, Outcome};

fn list(entries: &[&str]) -> AllowList {
    AllowList(
        entries
            .iter()
            .map(|e| AllowEntry::parse(e).unwrap())
            .collect(),
    )
}

/// Where `url` goes under `allow`: `Ok((authority, path and query))` or the refusal.
fn route(allow: &AllowList, url: &str) -> Result<(String, String), String> {
    let c = clean_url(url)?;
    let e = allow.find(&c).ok_or_else(|| "not allowed".to_string())?;
    Ok((e.authority.clone(), c.path_and_query()))
}

#[test]
fn allow_list_matches_on_segments_and_no_trick_leaves_a_prefix() {
    let allow = list(&[
        "http://127.0.0.1:9000/hooks/",
        "http://127.0.0.1:9001/api/v1",
        "http://127.0.0.1:9002/hooks/special",
    ]);
    let ok = |url: &str, auth: &str, path: &str| {
        assert_eq!(
            route(&allow, url),
            Ok((auth.to_string(), path.to_string())),
            "{url}"
        );
    };
    ok("/hooks", "127.0.0.1:9000", "/hooks");
    ok("/hooks/", "127.0.0.1:9000", "/hooks/");
    ok("/hooks/a?x=1&y=%20", "127.0.0.1:9000", "/hooks/a?x=1&y=%20");
    ok("/hooks/a/../b", "127.0.0.1:9000", "/hooks/b");
    ok("/hooks/./a/", "127.0.0.1:9000", "/hooks/a/");
    ok("//hooks//a", "127.0.0.1:9000", "/hooks/a");
    ok("/hooks/%61", "127.0.0.1:9000", "/hooks/a");
    // Double encoding stays literal: sent re-encoded, never decoded twice here.
    ok(
        "/hooks/%252e%252e/admin",
        "127.0.0.1:9000",
        "/hooks/%252e%252e/admin",
    );
    ok("/api/v1/x", "127.0.0.1:9001", "/api/v1/x");
    ok("/hooks/special/x", "127.0.0.1:9002", "/hooks/special/x");
    ok("/hooks/specialx", "127.0.0.1:9000", "/hooks/specialx");
    for refused in [
        "/hooksx",
        "/hook",
        "/",
        "/api",
        "/api/v10",
        "/hooks/../admin",
        "/hooks/%2e%2e/admin",
        "/hooks/%2E%2E/admin",
        "/hooks/.%2e/admin",
        "/hooks/a/../../admin",
        "/../hooks",
        "/hooks%2f..%2fadmin",
        "/hooks/a%5c..%5c..%5cadmin",
        "/hooks/%00",
        "/hooks/%zz",
        "/hooks/a b",
        "/hooks/a\\b",
        "hooks/a",
        "http://127.0.0.1:9000/hooks/a",
        "*",
        "/hooks/a#frag",
        "/hooks/a?x=<script>",
    ] {
        assert!(route(&allow, refused).is_err(), "{refused} was allowed");
    }
}

#[test]
fn allow_entries_parse_and_bad_ones_are_named() {
    let e = AllowEntry::parse("http://localhost:9000").unwrap();
    assert_eq!(
        (e.authority.as_str(), e.segments.len()),
        ("localhost:9000", 0)
    );
    assert!(e.covers(&["anything".into()]));
    let e = AllowEntry::parse("HTTP://10.0.0.1/x/").unwrap();
    assert_eq!(e.authority, "10.0.0.1:80");
    assert_eq!(e.segments, ["x"]);
    let e = AllowEntry::parse("http://[::1]:8080/x").unwrap();
    assert_eq!(e.authority, "[::1]:8080");
    let err = AllowEntry::parse("https://127.0.0.1/x").unwrap_err();
    assert!(
        err.contains("https is not supported") && err.contains("https://127.0.0.1/x"),
        "{err}"
    );
    for bad in [
        "127.0.0.1:9000/x",
        "ftp://h/x",
        "http:///x",
        "http://user:pw@h/x",
        "http://h/x?y=1",
        "http://h:0/x",
        "http://h:99999/x",
        "http://h/../x",
    ] {
        let err = AllowEntry::parse(bad).unwrap_err();
        assert!(err.contains(bad), "{bad}: {err}");
    }
}

fn header(name: &str, values: &[&str]) -> bp::HttpHeader {
    bp::HttpHeader {
        name: name.into(),
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

#[test]
fn hop_by_hop_host_and_length_headers_are_dropped_both_ways() {
    let h = relay_headers(&[
        header("Connection", &["close, X-Secret"]),
        header("Keep-Alive", &["timeout=5"]),
        header("Host", &["evil.example"]),
        header("Content-Length", &["999"]),
        header("Transfer-Encoding", &["chunked"]),
        header("Upgrade", &["websocket"]),
        header("TE", &["trailers"]),
        header("Proxy-Authorization", &["Basic x"]),
        header("X-Secret", &["named by connection"]),
        header("X-Keep", &["a", "b"]),
        header("Content-Type", &["application/json"]),
    ])
    .unwrap();
    let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
    names.sort();
    assert_eq!(names, ["content-type", "x-keep"]);
    assert_eq!(h.get_all("x-keep").iter().count(), 2);
    assert!(relay_headers(&[header("bad name", &["x"])]).is_err());
    assert!(relay_headers(&[header("x-a", &["line\r\nbreak"])]).is_err());

    let mut m = http::HeaderMap::new();
    m.insert("connection", "x-hop".parse().unwrap());
    m.insert("x-hop", "1".parse().unwrap());
    m.insert("transfer-encoding", "chunked".parse().unwrap());
    m.insert("content-length", "3".parse().unwrap());
    m.append("set-cookie", "a=1".parse().unwrap());
    m.append("set-cookie", "b=2".parse().unwrap());
    let out = response_headers(&m);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].name, "set-cookie");
    assert_eq!(out[0].values, ["a=1", "b=2"]);
}

/// What the upstream saw of one request.
#[derive(Debug, Clone, Default)]
struct Seen {
    method: String,
    uri: String,
    host: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A local upstream: records every request and answers 201 with `x-up: yes` and "made";
/// `/slow` after 500 ms, `/big` with a body over the cap, `/hang` never.
async fn upstream() -> (String, Arc<Mutex<Vec<Seen>>>) {
    use axum::body::{to_bytes, Body};
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |req: http::Request<Body>| {
        let s = s.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = to_bytes(body, usize::MAX).await.unwrap_or_default();
            s.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                host: parts
                    .headers
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect(),
                body: body.to_vec(),
            });
            match parts.uri.path() {
                "/hooks/slow" => tokio::time::sleep(Duration::from_millis(500)).await,
                "/hooks/hang" => std::future::pending::<()>().await,
                _ => {}
            }
            let body = if parts.uri.path() == "/hooks/big" {
                vec![b'x'; MAX_BODY + 1]
            } else {
                b"made".to_vec()
            };
            http::Response::builder()
                .status(201)
                .header("x-up", "yes")
                .header("connection", "keep-alive")
                .body(Body::from(body))
                .unwrap()
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, seen)
}

fn request(id: &str, method: &str, url: &str) -> bp::ReverseHttpRequest {
    bp::ReverseHttpRequest {
        id: id.into(),
        method: method.into(),
        url: url.into(),
        headers: vec![
            header("Host", &["bot.invalid"]),
            header("Connection", &["close"]),
            header("X-Bot", &["1"]),
        ],
        body: bytes::Bytes::from_static(b"payload"),
    }
}

fn as_response(f: &bp::ReverseHttpFrame) -> &bp::ReverseHttpResponse {
    match &f.frame {
        Some(bp::reverse_http_frame::Frame::Response(r)) => r,
        other => panic!("not a response: {other:?}"),
    }
}

fn as_error(f: &bp::ReverseHttpFrame) -> &bp::ReverseHttpError {
    match &f.frame {
        Some(bp::reverse_http_frame::Frame::Error(e)) => e,
        other => panic!("not an error: {other:?}"),
    }
}

#[tokio::test]
async fn one_request_is_relayed_refused_or_failed_with_a_clear_text() {
    let (addr, seen) = upstream().await;
    let allow = list(&[&format!("http://{addr}/hooks/")]);
    let t = Duration::from_secs(5);
    let (f, o) = answer(request("r1", "POST", "/hooks/a/../b?q=1"), &allow, t).await;
    assert_eq!(o, Outcome::Allowed);
    let r = as_response(&f);
    assert_eq!((r.id.as_str(), r.status_code), ("r1", 201));
    assert_eq!(&r.body[..], b"made");
    assert!(r
        .headers
        .iter()
        .any(|h| h.name == "x-up" && h.values == ["yes"]));
    assert!(!r.headers.iter().any(|h| h.name == "connection"));
    let s = seen.lock().unwrap()[0].clone();
    assert_eq!(
        (s.method.as_str(), s.uri.as_str()),
        ("POST", "/hooks/b?q=1")
    );
    assert_eq!(s.host, addr, "the upstream's Host, not the bot's");
    assert_eq!(s.body, b"payload");
    assert!(s.headers.iter().any(|(k, v)| k == "x-bot" && v == "1"));
    assert!(
        !s.headers
            .iter()
            .any(|(k, v)| k == "connection" && v == "close"),
        "{s:?}"
    );

    let (f, o) = answer(request("r2", "GET", "/x"), &allow, t).await;
    assert_eq!(o, Outcome::Refused);
    assert_eq!(
        as_error(&f).error,
        "reverse http: /x is not allowed by the agent's configuration"
    );
    assert_eq!(as_error(&f).id, "r2");
    let (f, o) = answer(request("r3", "GET", "/hooks/%2e%2e/admin"), &allow, t).await;
    assert_eq!(o, Outcome::Refused);
    assert!(as_error(&f).error.contains("not allowed"), "{f:?}");
    let (f, o) = answer(request("r4", "CONNECT", "/hooks/a"), &allow, t).await;
    assert_eq!(o, Outcome::Refused, "{f:?}");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "refused requests never leave"
    );

    let (f, o) = answer(request("r5", "GET", "/hooks/big"), &allow, t).await;
    assert_eq!(o, Outcome::Failed);
    assert!(as_error(&f).error.contains("over 16 MiB"), "{f:?}");
    let (f, o) = answer(
        request("r6", "GET", "/hooks/hang"),
        &allow,
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(o, Outcome::Failed);
    assert!(
        as_error(&f).error.contains("did not answer within"),
        "{f:?}"
    );
    // Nothing listens there.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let allow = list(&[&format!("http://{dead_addr}/")]);
    let (f, o) = answer(request("r7", "GET", "/a"), &allow, t).await;
    assert_eq!(o, Outcome::Failed);
    assert!(
        as_error(&f)
            .error
            .starts_with(&format!("reverse http: upstream http://{dead_addr}: ")),
        "{f:?}"
    );
}

/// The bot side: sends `requests` on every stream it is given, hands back what the agent
/// answered, and ends each stream after `answers_per_stream` answers.
#[derive(Clone)]
struct FakeBot {
    requests: Vec<bp::ReverseHttpRequest>,
    answers: mpsc::UnboundedSender<bp::ReverseHttpFrame>,
    opened: Arc<AtomicUsize>,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn no<T>() -> Result<T, Status> {
    Err(Status::unimplemented("fake"))
}

#[tonic::async_trait]
impl bp::container_service_server::ContainerService for FakeBot {
    async fn read_file(
        &self,
        _: Request<bp::ReadFileRequest>,
    ) -> Result<Response<bp::ReadFileResponse>, Status> {
        no()
    }
    async fn write_file(
        &self,
        _: Request<bp::WriteFileRequest>,
    ) -> Result<Response<bp::WriteFileResponse>, Status> {
        no()
    }
    async fn list_dir(
        &self,
        _: Request<bp::ListDirRequest>,
    ) -> Result<Response<bp::ListDirResponse>, Status> {
        no()
    }
    async fn stat(
        &self,
        _: Request<bp::StatRequest>,
    ) -> Result<Response<bp::StatResponse>, Status> {
        no()
    }
    async fn mkdir(
        &self,
        _: Request<bp::MkdirRequest>,
    ) -> Result<Response<bp::MkdirResponse>, Status> {
        no()
    }
    async fn rename(
        &self,
        _: Request<bp::RenameRequest>,
    ) -> Result<Response<bp::RenameResponse>, Status> {
        no()
    }
    type ExecStream = Boxed<bp::ExecOutput>;
    async fn exec(
        &self,
        _: Request<Streaming<bp::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        no()
    }
    type ReadRawStream = Boxed<bp::DataChunk>;
    async fn read_raw(
        &self,
        _: Request<bp::ReadRawRequest>,
    ) -> Result<Response<Self::ReadRawStream>, Status> {
        no()
    }
    async fn write_raw(
        &self,
        _: Request<Streaming<bp::WriteRawChunk>>,
    ) -> Result<Response<bp::WriteRawResponse>, Status> {
        no()
    }
    async fn delete_file(
        &self,
        _: Request<bp::DeleteFileRequest>,
    ) -> Result<Response<bp::DeleteFileResponse>, Status> {
        no()
    }
    type TunnelStream = Boxed<bp::TunnelFrame>;
    async fn tunnel(
        &self,
        _: Request<Streaming<bp::TunnelFrame>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        no()
    }
    type ReverseHTTPStream = Boxed<bp::ReverseHttpFrame>;
    async fn reverse_http(
        &self,
        req: Request<Streaming<bp::ReverseHttpFrame>>,
    ) -> Result<Response<Self::ReverseHTTPStream>, Status> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (requests, answers) = (self.requests.clone(), self.answers.clone());
        tokio::spawn(async move {
            for r in &requests {
                let f = bp::ReverseHttpFrame {
                    frame: Some(bp::reverse_http_frame::Frame::Request(r.clone())),
                };
                if tx.send(Ok(f)).await.is_err() {
                    return;
                }
            }
            for _ in 0..requests.len() {
                match inbound.message().await {
                    Ok(Some(f)) => {
                        let _ = answers.send(f);
                    }
                    _ => return,
                }
            }
            // Ending the stream: the agent must open a new one.
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
    type ReadRawNoFollowStream = Boxed<bp::DataChunk>;
    async fn read_raw_no_follow(
        &self,
        _: Request<bp::ReadRawNoFollowRequest>,
    ) -> Result<Response<Self::ReadRawNoFollowStream>, Status> {
        no()
    }
    async fn write_raw_no_follow(
        &self,
        _: Request<Streaming<bp::WriteRawNoFollowChunk>>,
    ) -> Result<Response<bp::WriteRawResponse>, Status> {
        no()
    }
    type TerminalStream = Boxed<bp::TerminalServer>;
    async fn terminal(
        &self,
        _: Request<Streaming<bp::TerminalClient>>,
    ) -> Result<Response<Self::TerminalStream>, Status> {
        no()
    }
    type WatchDirStream = Boxed<bp::WatchDirEvent>;
    async fn watch_dir(
        &self,
        _: Request<bp::WatchDirRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        no()
    }
}

#[tokio::test]
async fn a_relay_answers_a_bots_requests_concurrently_and_reopens_a_stream_that_ends() {
    let (addr, _) = upstream().await;
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    let opened = Arc::new(AtomicUsize::new(0));
    let bot = FakeBot {
        // The slow one first: answers arrive in any order.
        requests: vec![
            request("slow", "GET", "/hooks/slow"),
            request("fast", "GET", "/hooks/fast"),
            request("no", "GET", "/etc/passwd"),
        ],
        answers: answers_tx,
        opened: opened.clone(),
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(bp::container_service_server::ContainerServiceServer::new(
                bot,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let channel = memoh_proto::client::tcp_channel(&server_addr.to_string()).unwrap();
    let client = memoh_proto::ContainerClient::new(channel);
    let ctx = RelayContext {
        bot: "b1".into(),
        allow: Arc::new(list(&[&format!("http://{addr}/hooks/")])),
        timeout: Duration::from_secs(5),
        counters: Arc::new(Counters::default()),
        stop: CancellationToken::new(),
        nudge: Arc::new(Notify::new()),
        max_bytes: super::relay::MAX_BYTES_IN_FLIGHT,
    };
    let relay = tokio::spawn(keep_open(ctx.clone(), move || {
        let c = client.clone();
        async move { Some(c) }
    }));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let f = tokio::time::timeout(Duration::from_secs(10), answers.recv())
            .await
            .expect("an answer")
            .unwrap();
        match &f.frame {
            Some(bp::reverse_http_frame::Frame::Response(r)) => ids.push(r.id.clone()),
            Some(bp::reverse_http_frame::Frame::Error(e)) => {
                assert_eq!(
                    e.error,
                    "reverse http: /etc/passwd is not allowed by the agent's configuration"
                );
                ids.push(e.id.clone());
            }
            other => panic!("not an answer: {other:?}"),
        }
    }
    assert_eq!(ids.last().map(String::as_str), Some("slow"), "{ids:?}");
    // The bot ended that stream: the relay opens another, which gets the same requests.
    let f = tokio::time::timeout(Duration::from_secs(10), answers.recv())
        .await
        .expect("an answer on a reopened stream")
        .unwrap();
    assert!(f.frame.is_some());
    assert!(opened.load(Ordering::SeqCst) >= 2);
    let (allowed, refused, _) = ctx.counters.get();
    assert!(allowed >= 2 && refused >= 1, "{allowed} {refused}");
    ctx.stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), relay)
        .await
        .expect("the relay ends when stopped")
        .unwrap();
}

#[tokio::test]
async fn a_bot_cannot_make_the_agent_hold_more_request_bytes_than_its_budget() {
    let (addr, seen) = upstream().await;
    let ctx = RelayContext {
        bot: "b1".into(),
        allow: Arc::new(list(&[&format!("http://{addr}/hooks/")])),
        timeout: Duration::from_secs(5),
        counters: Arc::new(Counters::default()),
        stop: CancellationToken::new(),
        nudge: Arc::new(Notify::new()),
        max_bytes: 3 << 20,
    };
    // Two 1 MiB bodies to a hanging upstream hold 2 MiB; a third of 1.5 MiB is over 3 MiB.
    let big = |id: &str, n: usize| {
        let mut r = request(id, "POST", "/hooks/hang");
        r.body = bytes::Bytes::from(vec![b'x'; n]);
        Ok(bp::ReverseHttpFrame {
            frame: Some(bp::reverse_http_frame::Frame::Request(r)),
        })
    };
    let (in_tx, in_rx) = mpsc::channel(8);
    let (tx, mut out) = mpsc::channel(8);
    let serving = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            super::relay::serve_frames(&ctx, tokio_stream::wrappers::ReceiverStream::new(in_rx), tx)
                .await
        })
    };
    for (id, n) in [("a", 1 << 20), ("b", 1 << 20), ("c", 3 << 19)] {
        in_tx.send(big(id, n)).await.unwrap();
    }
    let f = tokio::time::timeout(Duration::from_secs(5), out.recv())
        .await
        .expect("an answer")
        .unwrap();
    let e = as_error(&f);
    assert_eq!(e.id, "c");
    assert_eq!(
        e.error,
        "reverse http: too many request bytes in flight (at most 3 MiB)"
    );
    // Both held requests did reach the upstream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(seen.lock().unwrap().len(), 2);
    ctx.stop.cancel();
    serving.await.unwrap().unwrap();
}
