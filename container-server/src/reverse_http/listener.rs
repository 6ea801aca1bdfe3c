//! The HTTP/1.1 side of ReverseHTTP: a loopback listener inside the bot
//! (`MEMOH_ACP_TOOLS_PROXY_ADDR`, default [`DEFAULT_ADDR`]) whose requests the [`Hub`] carries
//! to the host. The bot's code is hostile: bodies are capped ([`MAX_BODY`], 413), as are
//! the body bytes held at once ([`BODY_BUDGET`], 503), requests in flight, connections, and
//! the time to send headers and body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use memoh_proto::pb::bridgepb as bp;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{headers, Hub, Outcome};

/// The listener's address when none is configured.
pub const DEFAULT_ADDR: &str = "127.0.0.1:18732";

/// The largest request body forwarded (the gRPC message limit).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// Requests read or waiting for the host at once; more get 503.
const MAX_IN_FLIGHT: usize = 64;

/// Bytes of request bodies held at once, counted from the declared length before the body is
/// read (16 MiB for a chunked one); a request whose body does not fit gets 503, so hostile
/// clients cannot make the server hold more than this.
pub const BODY_BUDGET: usize = 64 * 1024 * 1024;

/// The listener's shared limits.
#[derive(Clone)]
struct Budget {
    requests: Arc<Semaphore>,
    body_bytes: Arc<Semaphore>,
}

/// Open HTTP connections at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses the listener address: `IP:PORT` or `localhost:PORT`, loopback only.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .map_err(|_| format!("invalid port in reverse http address {s:?}"))?,
        None => s
            .parse::<SocketAddr>()
            .map_err(|_| format!("invalid reverse http address {s:?}: use IP:PORT"))?,
    };
    if !addr.ip().is_loopback() {
        return Err(format!(
            "reverse http address {s:?} is not a loopback address; the listener serves the bot only"
        ));
    }
    Ok(addr)
}

/// Binds the listener on `addr` and serves it until `stop` fires. A bad or non-loopback
/// address or a failed bind is logged and leaves the listener off; the gRPC server runs on.
pub async fn start(addr: &str, hub: Hub, stop: CancellationToken) -> Option<JoinHandle<()>> {
    let sa = match parse_addr(addr) {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "reverse http listener not started");
            return None;
        }
    };
    let listener = match TcpListener::bind(sa).await {
        Ok(l) => l,
        Err(e) => {
            error!(addr = %sa, error = %e, "reverse http listener not started: bind failed");
            return None;
        }
    };
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "reverse http listening");
    }
    Some(tokio::spawn(accept_loop(listener, hub, stop)))
}

async fn accept_loop(listener: TcpListener, hub: Hub, stop: CancellationToken) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let budget = Budget {
        requests: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        body_bytes: Arc::new(Semaphore::new(BODY_BUDGET)),
    };
    loop {
        let sock = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "reverse http accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!("reverse http: too many connections, one closed");
            continue;
        };
        let (hub, stop, budget) = (hub.clone(), stop.clone(), budget.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (hub, budget) = (hub.clone(), budget.clone());
                async move { Ok::<_, Infallible>(answer(hub, budget, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(sock), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(error = %e, "reverse http connection");
                },
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
    info!("reverse http listener stopped");
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Reads one request, forwards it through the hub and turns the outcome into a response.
async fn answer(hub: Hub, budget: Budget, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Ok(_permit) = budget.requests.try_acquire_owned() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many reverse http requests in flight\n",
        );
    };
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes\n"),
        )
    };
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let need = body.size_hint().exact().unwrap_or(MAX_BODY as u64);
    let need = u32::try_from(need.min(MAX_BODY as u64)).unwrap_or(u32::MAX);
    let Ok(_bytes) = budget.body_bytes.try_acquire_many_owned(need) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many reverse http request bytes in flight\n",
        );
    };
    let body =
        match tokio::time::timeout(hub.timeout(), Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
            Ok(Err(e)) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("reading request body: {e}\n"),
                )
            }
            Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "request body too slow\n"),
        };
    let pairs = parts.headers.iter().map(|(n, v)| {
        (
            n.as_str(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        )
    });
    let request = bp::ReverseHttpRequest {
        id: String::new(),
        method: parts.method.to_string(),
        url: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        headers: headers::forwardable(pairs),
        body,
    };
    match hub.forward(parts.uri.path(), request).await {
        Outcome::Response(r) => response(r),
        Outcome::BadGateway(why) => text(StatusCode::BAD_GATEWAY, why),
        Outcome::NoStream => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no reverse http stream for this path\n",
        ),
        Outcome::TimedOut => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer from the host within {} s\n",
                hub.timeout().as_secs()
            ),
        ),
    }
}

/// The HTTP response for the host's answer: a status outside 100..=999 becomes 200; headers
/// that are hop-by-hop or not valid HTTP are left out.
pub fn response(r: bp::ReverseHttpResponse) -> Response<Full<Bytes>> {
    let status = u16::try_from(r.status_code)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let pairs = r
        .headers
        .iter()
        .flat_map(|h| h.values.iter().map(move |v| (h.name.as_str(), v.clone())));
    let kept = headers::forwardable(pairs);
    let mut resp = Response::new(Full::new(r.body));
    *resp.status_mut() = status;
    for h in kept {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            debug!(name = %h.name, "reverse http: invalid header name dropped");
            continue;
        };
        for v in h.values {
            match HeaderValue::from_str(&v) {
                Ok(v) => {
                    resp.headers_mut().append(name.clone(), v);
                }
                Err(_) => debug!(name = %name, "reverse http: invalid header value dropped"),
            }
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_addresses() {
        assert_eq!(
            parse_addr("127.0.0.1:18732").unwrap(),
            "127.0.0.1:18732".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_addr("localhost:1").unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert!(parse_addr("[::1]:5").is_ok());
        assert!(parse_addr("127.0.0.2:0").is_ok());
        for bad in [
            "0.0.0.0:18732",
            "[::]:1",
            "192.0.2.2:1",
            ":18732",
            "x:1",
            "",
        ] {
            let e = parse_addr(bad).unwrap_err();
            assert!(e.contains("reverse http address"), "{bad}: {e}");
        }
        assert!(parse_addr("0.0.0.0:1").unwrap_err().contains("loopback"));
    }

    #[test]
    fn host_answers_become_responses() {
        let header = |n: &str, v: &[&str]| bp::HttpHeader {
            name: n.into(),
            values: v.iter().map(|s| s.to_string()).collect(),
        };
        for (code, want) in [
            (201, 201),
            (0, 200),
            (-5, 200),
            (99, 200),
            (1000, 200),
            (999, 999),
        ] {
            let r = response(bp::ReverseHttpResponse {
                status_code: code,
                ..Default::default()
            });
            assert_eq!(r.status().as_u16(), want, "{code}");
        }
        let r = response(bp::ReverseHttpResponse {
            status_code: 200,
            headers: vec![
                header("X-A", &["1", "2"]),
                header("Transfer-Encoding", &["chunked"]),
                header("Content-Length", &["999"]),
                header("Connection", &["x-gone"]),
                header("x-gone", &["v"]),
                header("bad name", &["v"]),
                header("x-bad-value", &["a\nb"]),
            ],
            body: Bytes::from_static(b"hi"),
            ..Default::default()
        });
        let h = r.headers();
        let a: Vec<_> = h.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        for gone in [
            "transfer-encoding",
            "content-length",
            "connection",
            "x-gone",
            "x-bad-value",
        ] {
            assert!(h.get(gone).is_none(), "{gone}");
        }
    }
}
