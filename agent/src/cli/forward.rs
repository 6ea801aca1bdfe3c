//! `port-forward`: a local TCP port to a port inside a bot, through the agent, over `bridgepb`
//! Tunnel (WIRE-BRIDGE.md section 3).
//!
//! Every accepted connection gets its own Tunnel call: `open{127.0.0.1:PORT}`, then the empty
//! `data` frame that says the bot connected, then bytes both ways in frames of at most 32 KiB.
//! Each direction waits for the other side to take what it was given (a bounded channel
//! one way, HTTP/2 flow control and the local socket the other), so a slow reader slows the
//! writer instead of filling memory. The local client's half-close ends the request stream
//! (the bot half-closes the target); the target's close shuts the local write side. A failed
//! connection is reported on stderr and the forwarder goes on until Ctrl-C.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use bytes::Bytes;
use memoh_proto::pb::bridgepb::tunnel_frame::Frame;
use memoh_proto::pb::bridgepb::{TunnelClose, TunnelData, TunnelFrame, TunnelOpen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::Streaming;

use super::{bot_client, bridge_client, status_err, BridgeClient, CliError};

/// Largest `data` frame sent (the bot's frames are as large).
const FRAME: usize = 32 * 1024;

/// `LOCAL:BOT`, or `BOT` alone (the same port on both sides). A local port of 0 (or `:BOT`)
/// lets the system pick one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The local port (0: any free one).
    pub local: u16,
    /// The port inside the bot.
    pub remote: u16,
}

/// Parses a [`PortSpec`].
pub fn parse_ports(s: &str) -> Result<PortSpec, String> {
    let port = |p: &str, what: &str| -> Result<u16, String> {
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!("{what} port {p:?} is not a number"));
        }
        p.parse::<u16>()
            .map_err(|_| format!("{what} port {p} is out of range (1-65535)"))
    };
    let (local, remote) = match s.split_once(':') {
        Some(("", r)) => (0, port(r, "bot")?),
        Some((l, r)) => (port(l, "local")?, port(r, "bot")?),
        None => {
            let p = port(s, "bot")?;
            (p, p)
        }
    };
    if remote == 0 {
        return Err("bot port 0 is out of range (1-65535)".to_string());
    }
    Ok(PortSpec { local, remote })
}

/// The local address to bind: loopback unless the operator named another.
fn bind_address(address: Option<&str>) -> Result<IpAddr, CliError> {
    match address {
        None => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Some("localhost") => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Some(a) => a
            .parse()
            .map_err(|_| CliError::new(format!("--address {a:?} is not an ip address"))),
    }
}

/// Forwards `ports` of the local `address` to `bot` until Ctrl-C (or SIGTERM).
pub async fn port_forward(
    socket: &Path,
    bot: &str,
    ports: &str,
    address: Option<&str>,
) -> Result<u8, CliError> {
    let spec = parse_ports(ports).map_err(CliError::new)?;
    let ip = bind_address(address)?;
    // Before listening: an unknown or stopped bot is one error now, not one per connection.
    bot_client(socket, bot)?
        .stat("/")
        .await
        .map_err(|s| status_err(socket, s))?;
    let client = bridge_client(socket, bot)?;
    let listener = TcpListener::bind(SocketAddr::new(ip, spec.local))
        .await
        .map_err(|e| CliError::new(format!("cannot listen on {ip}:{}: {e}", spec.local)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::new(format!("cannot listen on {ip}:{}: {e}", spec.local)))?;
    if !ip.is_loopback() {
        eprintln!(
            "memoh-agent: port-forward: {local} is not a loopback address: whoever reaches it \
             reaches port {} of bot {bot}",
            spec.remote
        );
    }
    println!("forwarding {local} -> {bot}:{}", spec.remote);
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let (conn, peer) = tokio::select! {
            _ = &mut stop => return Ok(0),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    eprintln!("memoh-agent: port-forward: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let client = client.clone();
        let socket = socket.to_path_buf();
        let port = spec.remote;
        tokio::spawn(async move {
            if let Err(e) = forward(&socket, client, conn, port).await {
                eprintln!(
                    "memoh-agent: port-forward: connection from {peer}: {}",
                    e.message
                );
            }
        });
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn frame(f: Frame) -> TunnelFrame {
    TunnelFrame { frame: Some(f) }
}

/// One connection over one Tunnel call.
async fn forward(
    socket: &Path,
    mut client: BridgeClient,
    conn: TcpStream,
    port: u16,
) -> Result<(), CliError> {
    let _ = conn.set_nodelay(true);
    let (tx, rx) = mpsc::channel::<TunnelFrame>(4);
    let open = frame(Frame::Open(TunnelOpen {
        address: format!("127.0.0.1:{port}"),
    }));
    // The channel is empty and its receiver alive: the first frame always fits.
    let _ = tx.try_send(open);
    let mut from_bot = client
        .tunnel(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| status_err(socket, s))?
        .into_inner();
    match from_bot
        .message()
        .await
        .map_err(|s| status_err(socket, s))?
    {
        Some(TunnelFrame {
            frame: Some(Frame::Data(d)),
        }) if d.data.is_empty() => {}
        Some(TunnelFrame {
            frame: Some(Frame::Close(c)),
        }) => {
            return Err(CliError::new(format!(
                "the bot could not connect to port {port}: {}",
                c.error
            )))
        }
        Some(other) => {
            return Err(CliError::new(format!(
                "the bot's server opened the tunnel with {other:?} instead of an empty data frame"
            )))
        }
        None => {
            return Err(CliError::new(
                "the bot's server ended the tunnel before it opened",
            ))
        }
    }
    let (rd, wr) = conn.into_split();
    let up = tokio::spawn(to_bot(rd, tx));
    let down = from_bot_to_local(socket, &mut from_bot, wr).await;
    // The call is over: nothing more can reach the bot.
    up.abort();
    let up = match up.await {
        Ok(r) => r,
        Err(_) => Ok(()),
    };
    // A local failure explains the call's end (a CANCELLED the close caused) better.
    up.and(down)
}

/// Local bytes to the bot; the local half-close ends the request stream, a read error sends
/// `close` with it (the bot cancels the call and closes the target).
async fn to_bot(mut rd: OwnedReadHalf, tx: mpsc::Sender<TunnelFrame>) -> Result<(), CliError> {
    let mut buf = vec![0u8; FRAME];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => {
                let f = frame(Frame::Data(TunnelData {
                    data: Bytes::copy_from_slice(&buf[..n]),
                }));
                if tx.send(f).await.is_err() {
                    return Ok(());
                }
            }
            Err(e) => {
                let msg = format!("local connection: {e}");
                let _ = tx
                    .send(frame(Frame::Close(TunnelClose { error: msg.clone() })))
                    .await;
                return Err(CliError::new(msg));
            }
        }
    }
}

/// The bot's bytes to the local side until the call ends; the target's close shuts the local
/// write side.
async fn from_bot_to_local(
    socket: &Path,
    from_bot: &mut Streaming<TunnelFrame>,
    mut wr: OwnedWriteHalf,
) -> Result<(), CliError> {
    let mut failure = None;
    let mut open = true;
    while let Some(f) = from_bot
        .message()
        .await
        .map_err(|s| status_err(socket, s))?
    {
        match f.frame {
            Some(Frame::Data(d)) if open => {
                if let Err(e) = wr.write_all(&d.data).await {
                    return Err(CliError::new(format!("local connection: {e}")));
                }
            }
            Some(Frame::Close(c)) if open => {
                open = false;
                let _ = wr.shutdown().await;
                if !c.error.is_empty() {
                    failure = Some(format!(
                        "the bot's end of the connection failed: {}",
                        c.error
                    ));
                }
            }
            _ => {}
        }
    }
    let _ = wr.shutdown().await;
    failure.map_or(Ok(()), |m| Err(CliError::new(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        let ok = |s: &str, local, remote| {
            assert_eq!(parse_ports(s), Ok(PortSpec { local, remote }), "{s}")
        };
        ok("8080:80", 8080, 80);
        ok("80", 80, 80);
        ok("65535", 65535, 65535);
        ok(":3000", 0, 3000);
        ok("0:3000", 0, 3000);
        for bad in [
            "", ":", "80:", "0", "65536", "1:65536", "-1", "+80", "a:80", "80:b", "1:2:3", " 80",
            "80 ", "0x50", "8080:0",
        ] {
            assert!(parse_ports(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_ports("70000").unwrap_err().contains("out of range"));
        assert!(parse_ports("x").unwrap_err().contains("not a number"));
    }

    #[test]
    fn the_default_bind_is_loopback() {
        assert!(bind_address(None).unwrap().is_loopback());
        assert!(bind_address(Some("localhost")).unwrap().is_loopback());
        assert!(bind_address(Some("::1")).unwrap().is_loopback());
        assert!(!bind_address(Some("0.0.0.0")).unwrap().is_loopback());
        assert!(bind_address(Some("example.com")).is_err());
    }
}
