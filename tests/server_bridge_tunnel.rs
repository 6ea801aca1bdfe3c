//! In-process tests of the bridge's Tunnel and ReverseHTTP (WIRE-BRIDGE.md section 3): the real
//! server on a temporary unix socket, the generated `bridgepb` client, TCP targets and HTTP
//! clients started by the tests on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{expect_code, pseudo_random, TestServer};
use memoh_proto::pb::bridgepb as bp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use bp::reverse_http_frame::Frame as RFrame;
use bp::tunnel_frame::Frame;

fn open(address: &str) -> bp::TunnelFrame {
    bp::TunnelFrame {
        frame: Some(Frame::Open(bp::TunnelOpen {
            address: address.into(),
        })),
    }
}

fn data(d: &[u8]) -> bp::TunnelFrame {
    bp::TunnelFrame {
        frame: Some(Frame::Data(bp::TunnelData {
            data: Bytes::copy_from_slice(d),
        })),
    }
}

fn close(error: &str) -> bp::TunnelFrame {
    bp::TunnelFrame {
        frame: Some(Frame::Close(bp::TunnelClose {
            error: error.into(),
        })),
    }
}

type Tunnel = (mpsc::Sender<bp::TunnelFrame>, Streaming<bp::TunnelFrame>);

/// Opens a tunnel to `address` and checks the "opened" frame.
async fn tunnel(s: &TestServer, address: &str) -> Result<Tunnel, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(open(address)).await.unwrap();
    let mut out = s
        .bridge()
        .tunnel(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = out.message().await?.expect("opened frame");
    assert!(
        matches!(&first.frame, Some(Frame::Data(d)) if d.data.is_empty()),
        "{first:?}"
    );
    Ok((tx, out))
}

/// Reads a tunnel until its `close` frame: the bytes and the close text.
async fn read_to_close(out: &mut Streaming<bp::TunnelFrame>) -> (Vec<u8>, String) {
    let mut got = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(30), out.message())
            .await
            .expect("a frame in time")
            .expect("frame")
            .expect("close before end");
        match f.frame {
            Some(Frame::Data(d)) => {
                assert!(d.data.len() <= 32 * 1024, "data frame of {}", d.data.len());
                got.extend_from_slice(&d.data);
            }
            Some(Frame::Close(c)) => return (got, c.error),
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// A TCP echo server: what it reads it writes back; at the client's EOF it shuts its write
/// side. Counts accepted connections.
async fn echo_server(bind: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// A server that handles one connection with `f`.
async fn one_shot<F, Fut>(f: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((s, _)) = l.accept().await {
            f(s).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_megabytes_both_ways_and_ends_ok_after_half_close() {
    let s = TestServer::start().await;
    let (addr, _) = echo_server("127.0.0.1:0").await;
    let (tx, mut out) = tunnel(&s, &addr.to_string()).await.unwrap();
    let payload = pseudo_random(3 * 512 * 1024 + 77, 7);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        for c in sent.chunks(100_000) {
            tx.send(data(c)).await.unwrap();
        }
        // Dropping the sender half-closes the request stream.
    });
    let (got, err) = read_to_close(&mut out).await;
    writer.await.unwrap();
    assert_eq!(err, "");
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "echoed bytes differ");
    // Half-closed by the client, EOF from the target: the call ends OK.
    assert!(out.message().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_shuts_only_the_write_side() {
    let s = TestServer::start().await;
    // Reads to EOF, then answers: only works if the tunnel shut the write side alone.
    let addr = one_shot(|mut t| async move {
        let mut buf = Vec::new();
        t.read_to_end(&mut buf).await.unwrap();
        let reply = format!("got {} bytes", buf.len());
        t.write_all(reply.as_bytes()).await.unwrap();
    })
    .await;
    let (tx, mut out) = tunnel(&s, &addr.to_string()).await.unwrap();
    tx.send(data(b"abc")).await.unwrap();
    tx.send(data(b"")).await.unwrap();
    tx.send(data(b"defg")).await.unwrap();
    drop(tx);
    let (got, err) = read_to_close(&mut out).await;
    assert_eq!(String::from_utf8_lossy(&got), "got 7 bytes");
    assert_eq!(err, "");
    assert!(out.message().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_eof_sends_close_and_the_call_waits_for_the_client() {
    let s = TestServer::start().await;
    for (client_close, want) in [("", None), ("bye now", Some(Code::Cancelled))] {
        let addr = one_shot(|mut t| async move {
            t.write_all(b"hello").await.unwrap();
        })
        .await;
        let (tx, mut out) = tunnel(&s, &addr.to_string()).await.unwrap();
        let (got, err) = read_to_close(&mut out).await;
        assert_eq!((got.as_slice(), err.as_str()), (&b"hello"[..], ""));
        // The call stays open until the client ends it.
        let waiting = tokio::time::timeout(Duration::from_millis(300), out.message()).await;
        assert!(waiting.is_err(), "call ended on its own: {waiting:?}");
        tx.send(close(client_close)).await.unwrap();
        match (out.message().await, want) {
            (Ok(None), None) => {}
            (Err(st), Some(code)) => {
                assert_eq!(st.code(), code);
                assert!(st.message().contains("bye now"), "{}", st.message());
            }
            (other, want) => panic!("{client_close:?}: {other:?}, wanted {want:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_reach_loopback_only() {
    let s = TestServer::start().await;
    // A target on every interface: a refused address is refused by policy, not by a failed
    // dial, and the target sees no connection at all.
    let (addr, accepted) = echo_server("0.0.0.0:0").await;
    let port = addr.port();
    let mut denied = vec![
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
        format!("[::ffff:0.0.0.0]:{port}"),
        format!("[::ffff:10.0.0.1]:{port}"),
        format!("169.254.169.254:{port}"),
    ];
    // Without a non-loopback interface, an address that would be one is refused the same way.
    let own = own_ip().unwrap_or_else(|| "192.0.2.2".parse().unwrap());
    denied.push(format!("{own}:{port}"));
    denied.push(format!("[::ffff:{own}]:{port}"));
    for a in &denied {
        let st = expect_code(tunnel(&s, a).await, Code::PermissionDenied);
        assert!(
            st.message().contains("not a loopback address"),
            "{a}: {st:?}"
        );
    }
    // Numeric shorthands that resolvers read as 127.0.0.1 (or elsewhere) are not accepted.
    for a in [
        format!("2130706433:{port}"),
        format!("0x7f000001:{port}"),
        format!("127.1:{port}"),
        format!("0177.0.0.1:{port}"),
        format!("167772161:{port}"),
        format!("no-such-host.invalid:{port}"),
        format!("::1:{port}"),
        "127.0.0.1".to_string(),
        format!("127.0.0.1:{port}0000"),
    ] {
        let st = expect_code(tunnel(&s, &a).await, Code::InvalidArgument);
        assert!(st.message().contains("tunnel address"), "{a}: {st:?}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused tunnel connected"
    );
    // The loopback forms work: a name, an IPv4-mapped address, another 127/8 address.
    for a in [
        format!("localhost:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.0.0.2:{port}"),
    ] {
        let (tx, mut out) = tunnel(&s, &a)
            .await
            .unwrap_or_else(|e| panic!("{a}: {e:?}"));
        tx.send(data(b"ping")).await.unwrap();
        drop(tx);
        assert_eq!(
            read_to_close(&mut out).await,
            (b"ping".to_vec(), String::new())
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

/// This machine's address on its default route, if it has one that is not loopback.
fn own_ip() -> Option<std::net::IpAddr> {
    for probe in ["192.0.2.1:9", "10.255.255.255:9", "8.8.8.8:53"] {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        if u.connect(probe).is_ok() {
            if let Ok(a) = u.local_addr() {
                if !a.ip().is_loopback() && !a.ip().is_unspecified() {
                    return Some(a.ip());
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_failure_is_unavailable() {
    let s = TestServer::start().await;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let st = expect_code(
        tunnel(&s, &format!("127.0.0.1:{port}")).await,
        Code::Unavailable,
    );
    assert!(st.message().contains("dial"), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_invalid_argument() {
    let s = TestServer::start().await;
    let mut b = s.bridge();
    let empty = bp::TunnelFrame { frame: None };
    for first in [
        vec![],
        vec![data(b"x")],
        vec![close("")],
        vec![empty.clone()],
    ] {
        let r = b.tunnel(futures::stream::iter(first)).await;
        expect_code(r, Code::InvalidArgument);
    }
    let (addr, _) = echo_server("127.0.0.1:0").await;
    for second in [open(&addr.to_string()), empty] {
        let (tx, mut out) = tunnel(&s, &addr.to_string()).await.unwrap();
        tx.send(second.clone()).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), out.message())
            .await
            .expect("an answer in time");
        let st = expect_code(end, Code::InvalidArgument);
        assert!(!st.message().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_closes_the_target_connection() {
    let s = TestServer::start().await;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // After the EOF the target keeps writing: that fails only once the tunnel's socket is
    // closed, not merely shut for writing.
    let addr = one_shot(|mut t| async move {
        let mut buf = [0u8; 64];
        let _ = t.read(&mut buf).await;
        let mut closed = false;
        for _ in 0..200 {
            if t.write_all(b"still here").await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = done_tx.send(closed);
    })
    .await;
    let (tx, out) = tunnel(&s, &addr.to_string()).await.unwrap();
    drop(out);
    drop(tx);
    let closed = tokio::time::timeout(Duration::from_secs(10), done_rx)
        .await
        .expect("target finished")
        .unwrap();
    assert!(closed, "the tunnel's TCP connection stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_holds_the_target_back() {
    let s = TestServer::start().await;
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let addr = one_shot(|mut t| async move {
        let chunk = vec![7u8; 64 * 1024];
        while t.write_all(&chunk).await.is_ok() {
            w.fetch_add(chunk.len(), Ordering::SeqCst);
        }
    })
    .await;
    let (_tx, mut out) = tunnel(&s, &addr.to_string()).await.unwrap();
    // The client reads nothing for a while: the target must stall, not fill server memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled = written.load(Ordering::SeqCst);
    assert!(
        stalled < 48 * 1024 * 1024,
        "target wrote {stalled} bytes to a client that read none"
    );
    // Reading resumes the flow.
    let mut got = 0;
    while got < stalled + 8 * 1024 * 1024 {
        match out.message().await.unwrap().unwrap().frame {
            Some(Frame::Data(d)) => got += d.data.len(),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tunnels_at_once() {
    let s = TestServer::start().await;
    let (addr, accepted) = echo_server("127.0.0.1:0").await;
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let (tx, mut out) = tunnel(&s, &addr.to_string()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let payload = pseudo_random(100_000, i);
            for c in payload.chunks(10_000) {
                tx.send(data(c)).await.unwrap();
            }
            drop(tx);
            let (got, err) = read_to_close(&mut out).await;
            assert!(got == payload && err.is_empty(), "tunnel {i}");
            assert!(out.message().await.unwrap().is_none());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 40);
}

// ReverseHTTP.

type Host = (
    mpsc::Sender<bp::ReverseHttpFrame>,
    Streaming<bp::ReverseHttpFrame>,
);

/// Opens a ReverseHTTP stream as the host, under `route` when given.
async fn host(s: &TestServer, route: Option<&str>) -> Host {
    let (tx, rx) = mpsc::channel(8);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(r) = route {
        req.metadata_mut()
            .insert("x-memoh-reverse-http-route", r.parse().unwrap());
    }
    let out = s.bridge().reverse_http(req).await.unwrap().into_inner();
    (tx, out)
}

async fn next_request(out: &mut Streaming<bp::ReverseHttpFrame>) -> bp::ReverseHttpRequest {
    let f = tokio::time::timeout(Duration::from_secs(10), out.message())
        .await
        .expect("a request in time")
        .expect("frame")
        .expect("stream open");
    match f.frame {
        Some(RFrame::Request(r)) => r,
        other => panic!("{other:?}"),
    }
}

fn header(name: &str, values: &[&str]) -> bp::HttpHeader {
    bp::HttpHeader {
        name: name.into(),
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

fn respond(
    id: &str,
    status: i32,
    headers: Vec<bp::HttpHeader>,
    body: &str,
) -> bp::ReverseHttpFrame {
    bp::ReverseHttpFrame {
        frame: Some(RFrame::Response(bp::ReverseHttpResponse {
            id: id.into(),
            status_code: status,
            headers,
            body: Bytes::copy_from_slice(body.as_bytes()),
        })),
    }
}

/// An HTTP/1.1 answer: status, headers (lower-case names), body.
#[derive(Debug)]
struct HttpAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpAnswer {
    fn get(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Sends `head` (request line and headers, without the blank line; `Connection: close` is
/// added) and `body`, reads the whole answer.
fn http(addr: SocketAddr, head: &str, body: &[u8]) -> tokio::task::JoinHandle<HttpAnswer> {
    let mut raw = format!("{head}\r\nConnection: close\r\n\r\n").into_bytes();
    raw.extend_from_slice(body);
    tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&raw).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut buf))
            .await
            .expect("an http answer in time")
            .unwrap();
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of head");
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        HttpAnswer {
            status,
            headers,
            body: buf[split + 4..].to_vec(),
        }
    })
}

fn names(r: &bp::ReverseHttpRequest) -> Vec<&str> {
    r.headers.iter().map(|h| h.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_http_round_trip_drops_hop_by_hop_headers() {
    let s = TestServer::builder()
        .reverse_http(Duration::from_secs(30))
        .start()
        .await;
    let addr = s.reverse_http_addr().await;
    let (tx, mut out) = host(&s, None).await;
    let client = http(
        addr,
        "POST /mcp/x?a=1&b=2 HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n\
         Keep-Alive: timeout=5\r\nX-Hop: secret\r\nConnection: x-hop\r\nProxy-Authorization: x\r\n\
         Accept: a/b\r\nAccept: c/d\r\nContent-Length: 5",
        b"hello",
    );
    let r = next_request(&mut out).await;
    assert!(r.id.starts_with("reverse-http-"), "{}", r.id);
    assert_eq!(
        (r.method.as_str(), r.url.as_str()),
        ("POST", "/mcp/x?a=1&b=2")
    );
    assert_eq!(&r.body[..], b"hello");
    assert_eq!(names(&r), ["Host", "Content-Type", "Accept"]);
    assert_eq!(r.headers[2].values, ["a/b", "c/d"]);
    tx.send(respond(
        &r.id,
        201,
        vec![
            header("X-Reply", &["one", "two"]),
            header("Transfer-Encoding", &["chunked"]),
            header("Content-Length", &["999"]),
            header("Connection", &["x-drop"]),
            header("X-Drop", &["1"]),
            header("Upgrade", &["h2c"]),
        ],
        "world",
    ))
    .await
    .unwrap();
    let a = client.await.unwrap();
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.get("x-reply"), ["one", "two"]);
    assert_eq!(a.body, b"world");
    assert_eq!(a.get("content-length"), ["5"]);
    for gone in ["x-drop", "transfer-encoding", "upgrade"] {
        assert!(a.get(gone).is_empty(), "{gone}: {a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_http_errors_no_stream_and_any_order() {
    let s = TestServer::builder()
        .reverse_http(Duration::from_secs(30))
        .start()
        .await;
    let addr = s.reverse_http_addr().await;
    // No stream at all: 503.
    assert_eq!(
        http(addr, "GET / HTTP/1.1\r\nHost: b", b"")
            .await
            .unwrap()
            .status,
        503
    );
    let (tx, mut out) = host(&s, None).await;
    let first = http(addr, "GET /one HTTP/1.1\r\nHost: b", b"");
    let r1 = next_request(&mut out).await;
    let second = http(addr, "GET /two HTTP/1.1\r\nHost: b", b"");
    let r2 = next_request(&mut out).await;
    assert_ne!(r1.id, r2.id);
    // Answers in the other order; an error frame is a 502 with its text; an unknown id is
    // ignored.
    tx.send(respond("reverse-http-999999", 200, vec![], "nobody"))
        .await
        .unwrap();
    tx.send(respond(&r2.id, 0, vec![], "second")).await.unwrap();
    tx.send(bp::ReverseHttpFrame {
        frame: Some(RFrame::Error(bp::ReverseHttpError {
            id: r1.id.clone(),
            error: "upstream exploded".into(),
        })),
    })
    .await
    .unwrap();
    let (a1, a2) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((a2.status, a2.body.as_slice()), (200, &b"second"[..]));
    assert_eq!(a1.status, 502);
    assert!(String::from_utf8_lossy(&a1.body).contains("upstream exploded"));
    // Too large a body: 413 before anything reaches the host.
    let big = http(
        addr,
        "PUT /x HTTP/1.1\r\nHost: b\r\nContent-Length: 16777217",
        b"",
    );
    assert_eq!(big.await.unwrap().status, 413);
    // The host ending its stream: waiting requests get 502, the call ends OK.
    let waiting = http(addr, "GET /three HTTP/1.1\r\nHost: b", b"");
    let _ = next_request(&mut out).await;
    drop(tx);
    assert_eq!(waiting.await.unwrap().status, 502);
    assert!(out.message().await.unwrap().is_none());
    assert_eq!(
        http(addr, "GET / HTTP/1.1\r\nHost: b", b"")
            .await
            .unwrap()
            .status,
        503
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_http_bounds_the_bodies_it_holds() {
    let s = TestServer::builder()
        .reverse_http(Duration::from_secs(30))
        .start()
        .await;
    let addr = s.reverse_http_addr().await;
    let (tx, mut out) = host(&s, None).await;
    // Four clients announce 16 MiB bodies and send none: together they hold the whole budget
    // (64 MiB) while the server waits for their bytes.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /big HTTP/1.1\r\nHost: b\r\nContent-Length: 16777216\r\n\r\nx")
            .await
            .unwrap();
        holders.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = http(
        addr,
        "POST /small HTTP/1.1\r\nHost: b\r\nContent-Length: 2",
        b"hi",
    )
    .await
    .unwrap();
    assert_eq!(a.status, 503, "{a:?}");
    assert!(String::from_utf8_lossy(&a.body).contains("bytes in flight"));
    // Once they leave, the budget is back.
    drop(holders);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = http(
        addr,
        "POST /small HTTP/1.1\r\nHost: b\r\nContent-Length: 2",
        b"hi",
    );
    let r = next_request(&mut out).await;
    assert_eq!((r.url.as_str(), &r.body[..]), ("/small", &b"hi"[..]));
    tx.send(respond(&r.id, 200, vec![], "ok")).await.unwrap();
    assert_eq!(c.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_http_routes_and_replacement() {
    let s = TestServer::builder()
        .reverse_http(Duration::from_secs(30))
        .start()
        .await;
    let addr = s.reverse_http_addr().await;
    let (tx_a, mut out_a) = host(&s, Some("/mcp/a")).await;
    // Only the routed stream: other paths have none.
    assert_eq!(
        http(addr, "GET /mcp/b HTTP/1.1\r\nHost: b", b"")
            .await
            .unwrap()
            .status,
        503
    );
    let (tx_d, mut out_d) = host(&s, None).await;
    for (path, routed) in [("/mcp/a", true), ("/mcp/b", false), ("/mcp/a/more", false)] {
        let (tx, out) = if routed {
            (&tx_a, &mut out_a)
        } else {
            (&tx_d, &mut out_d)
        };
        let c = http(addr, &format!("GET {path}?q HTTP/1.1\r\nHost: b"), b"");
        let r = next_request(out).await;
        assert_eq!(r.url, format!("{path}?q"));
        tx.send(respond(&r.id, 200, vec![], path)).await.unwrap();
        assert_eq!(c.await.unwrap().body, path.as_bytes());
    }
    // A newer stream for /mcp/a: the old one's waiting request gets 502, it ends ABORTED, and
    // the route now uses the new one.
    let pending = http(addr, "GET /mcp/a HTTP/1.1\r\nHost: b", b"");
    let _ = next_request(&mut out_a).await;
    let (tx_a2, mut out_a2) = host(&s, Some("/mcp/a")).await;
    assert_eq!(pending.await.unwrap().status, 502);
    expect_code(out_a.message().await, Code::Aborted);
    let c = http(addr, "GET /mcp/a HTTP/1.1\r\nHost: b", b"");
    let r = next_request(&mut out_a2).await;
    tx_a2.send(respond(&r.id, 204, vec![], "")).await.unwrap();
    assert_eq!(c.await.unwrap().status, 204);
    drop(tx_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_http_times_out_with_504() {
    let s = TestServer::builder()
        .reverse_http(Duration::from_millis(700))
        .start()
        .await;
    let addr = s.reverse_http_addr().await;
    let (tx, mut out) = host(&s, None).await;
    let c = http(addr, "GET /slow HTTP/1.1\r\nHost: b", b"");
    let r = next_request(&mut out).await;
    let a = c.await.unwrap();
    assert_eq!(a.status, 504, "{a:?}");
    // A late answer is ignored; the stream still serves the next request.
    tx.send(respond(&r.id, 200, vec![], "late")).await.unwrap();
    let c = http(addr, "GET /fast HTTP/1.1\r\nHost: b", b"");
    let r = next_request(&mut out).await;
    tx.send(respond(&r.id, 200, vec![], "fast")).await.unwrap();
    assert_eq!(c.await.unwrap().body, b"fast");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listener_address_is_refused_and_the_server_runs() {
    let probe = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let s = TestServer::builder()
        .reverse_http_at(&format!("0.0.0.0:{port}"), Duration::from_secs(5))
        .start()
        .await;
    let st = s
        .bridge()
        .stat(bp::StatRequest { path: "/".into() })
        .await
        .expect("the server serves without its listener");
    assert!(st.into_inner().entry.is_some_and(|e| e.is_dir));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "something listens on the refused address"
    );
}
