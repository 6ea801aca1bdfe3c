//! Sending one allowed request to its upstream over plain HTTP/1.1 and reading the answer.
//!
//! One connection per request (no pool to go stale, no proxy from the environment, no
//! redirects followed: a 3xx goes back to the bot as it is).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use memoh_proto::pb::bridgepb as bp;

/// Longest answer body relayed: the response frame must fit in one 16 MiB gRPC message.
pub const MAX_BODY: usize = memoh_proto::limits::MAX_MESSAGE_SIZE - HEADER_ROOM;
/// Room left in the frame for the status and headers.
const HEADER_ROOM: usize = 64 * 1024;
/// How long one request may take, connect to last byte of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(110);

/// Headers never relayed in either direction: the hop-by-hop ones (RFC 9110 7.6.1), the
/// caller's `Host` (the upstream's is set) and `Content-Length` (set from the body).
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// The headers of `list` that may be relayed: without [`DROPPED`] ones and those the
/// `Connection` header names. Invalid names or values are an error.
pub fn relay_headers(list: &[bp::HttpHeader]) -> Result<http::HeaderMap, String> {
    let named_by_connection: Vec<String> = list
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.values.iter())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = http::HeaderMap::new();
    for h in list {
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("header name {:?} is not valid", h.name))?;
        if DROPPED.contains(&name.as_str())
            || named_by_connection.iter().any(|n| n == name.as_str())
        {
            continue;
        }
        for v in &h.values {
            let value = http::HeaderValue::from_str(v)
                .map_err(|_| format!("header {name}: the value is not valid"))?;
            out.append(name.clone(), value);
        }
    }
    Ok(out)
}

/// The headers of an upstream answer as frames, without [`DROPPED`] ones (values that are not
/// text are left out).
pub fn response_headers(map: &http::HeaderMap) -> Vec<bp::HttpHeader> {
    let connection: Vec<String> = map
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out: Vec<bp::HttpHeader> = Vec::new();
    for name in map.keys() {
        if DROPPED.contains(&name.as_str()) || connection.iter().any(|n| n == name.as_str()) {
            continue;
        }
        let values: Vec<String> = map
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        if !values.is_empty() {
            out.push(bp::HttpHeader {
                name: name.as_str().to_string(),
                values,
            });
        }
    }
    out
}

/// What an upstream answered.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: u16,
    /// Its headers, filtered.
    pub headers: Vec<bp::HttpHeader>,
    /// Its body.
    pub body: Bytes,
}

/// Sends `method` `path_and_query` with `headers` and `body` to `authority` (`HOST:PORT`),
/// within `timeout`.
pub async fn send(
    authority: &str,
    method: http::Method,
    path_and_query: &str,
    mut headers: http::HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<Answer, String> {
    match tokio::time::timeout(
        timeout,
        send_inner(authority, method, path_and_query, &mut headers, body),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(format!(
            "upstream http://{authority} did not answer within {}s",
            timeout.as_secs()
        )),
    }
}

async fn send_inner(
    authority: &str,
    method: http::Method,
    path_and_query: &str,
    headers: &mut http::HeaderMap,
    body: Bytes,
) -> Result<Answer, String> {
    let up = |e: &dyn std::fmt::Display| format!("upstream http://{authority}: {e}");
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| up(&e))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| up(&e))?;
    // The connection ends when the answer is read or this future is dropped (the timeout).
    let conn = tokio::spawn(conn);
    let _abort = AbortOnDrop(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path_and_query)
        .body(Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    headers.insert(
        http::header::HOST,
        http::HeaderValue::from_str(authority).map_err(|e| up(&e))?,
    );
    *req.headers_mut() = std::mem::take(headers);
    let resp = sender.send_request(req).await.map_err(|e| up(&e))?;
    let status = resp.status().as_u16();
    let headers = response_headers(resp.headers());
    let mut body = resp.into_body();
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| up(&e))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_BODY {
                return Err(format!(
                    "upstream http://{authority}: the answer is over {} MiB",
                    (MAX_BODY + HEADER_ROOM) >> 20
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Answer {
        status,
        headers,
        body: buf.freeze(),
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
