//! Unix-socket connections whose client sends a socket path as `:authority`.
//!
//! grpc C-core (grpcio, grpc++) with default settings sends the target of `unix:/run/x.sock`,
//! the path, as the HTTP/2 `:authority`. hyper's HTTP/2 layer (h2) refuses a `/` there as a
//! malformed authority and resets the stream before any service sees the call, so such a
//! client got `INTERNAL: RST_STREAM error code 1` on every call. Go and Rust clients send
//! `localhost`.
//!
//! [`AuthorityFix`] sits between a unix socket and the HTTP/2 server: it decodes every header
//! block the client sends (HPACK, with the client's dynamic table), replaces an `:authority`
//! that is not a valid URI authority with `localhost`, and hands the server the block again,
//! re-encoded as literals that never touch the server's dynamic table. Every other frame, and
//! everything the server writes, passes through untouched. A peer that breaks the framing
//! switches the connection to plain pass-through, so h2 reports the error itself.
//!
//! Both servers on a unix socket use it: container-server's unix listener and the agent's
//! control socket (whose proxy forwards such clients' calls to the bots). [`incoming`] turns a
//! listener into the connection stream tonic serves.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames this wrapper writes never exceed the protocol's minimum maximum frame size.
const OUT_FRAME_MAX: usize = 16_384;
/// What replaces an invalid `:authority`: what Go and Rust clients send on a unix socket.
const REPLACEMENT: &[u8] = b"localhost";

/// A header block being collected (HEADERS, then CONTINUATION frames up to END_HEADERS).
struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    raw: Vec<u8>,
}

/// An I/O stream whose inbound HTTP/2 header blocks get a valid `:authority` (module docs).
pub struct AuthorityFix<S> {
    io: S,
    inbuf: BytesMut,
    out: BytesMut,
    preface_left: usize,
    passthrough: bool,
    decoder: hpack::Decoder<'static>,
    block: Option<Block>,
}

impl<S> AuthorityFix<S> {
    /// Wraps the server side of a fresh connection.
    pub fn new(io: S) -> Self {
        Self {
            io,
            inbuf: BytesMut::with_capacity(16 * 1024),
            out: BytesMut::new(),
            preface_left: PREFACE_LEN,
            passthrough: false,
            decoder: hpack::Decoder::new(),
            block: None,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Moves every complete frame of `inbuf` to `out`, rewriting header blocks.
    fn process(&mut self) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.inbuf.len());
            self.out.extend_from_slice(&self.inbuf.split_to(n));
            self.preface_left -= n;
        }
        while !self.passthrough && self.inbuf.len() >= FRAME_HEADER_LEN {
            let h = &self.inbuf[..FRAME_HEADER_LEN];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if self.inbuf.len() < FRAME_HEADER_LEN + len {
                return;
            }
            let frame = self.inbuf.split_to(FRAME_HEADER_LEN + len);
            self.frame(&frame);
        }
        if self.passthrough {
            let rest = self.inbuf.split();
            self.out.extend_from_slice(&rest);
        }
    }

    fn give_up(&mut self, frame: &[u8]) {
        if let Some(b) = self.block.take() {
            self.out.extend_from_slice(&b.raw);
        }
        self.out.extend_from_slice(frame);
        self.passthrough = true;
    }

    fn frame(&mut self, frame: &[u8]) {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER_LEN..];
        match kind {
            HEADERS if self.block.is_none() => {
                let mut p = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    let Some((&n, rest)) = p.split_first() else {
                        return self.give_up(frame);
                    };
                    pad = usize::from(n);
                    p = rest;
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    if p.len() < 5 {
                        return self.give_up(frame);
                    }
                    priority = Some([p[0], p[1], p[2], p[3], p[4]]);
                    p = &p[5..];
                }
                if p.len() < pad {
                    return self.give_up(frame);
                }
                self.block = Some(Block {
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: p[..p.len() - pad].to_vec(),
                    raw: frame.to_vec(),
                });
            }
            CONTINUATION
                if self
                    .block
                    .as_ref()
                    .is_some_and(|b| b.stream_id == stream_id) =>
            {
                if let Some(b) = self.block.as_mut() {
                    b.fragment.extend_from_slice(payload);
                    b.raw.extend_from_slice(frame);
                }
            }
            _ if self.block.is_some() => return self.give_up(frame),
            _ => {
                self.out.extend_from_slice(frame);
                return;
            }
        }
        if flags & END_HEADERS != 0 {
            if let Some(b) = self.block.take() {
                self.finish(b);
            }
        }
    }

    fn finish(&mut self, b: Block) {
        let headers = match self.decoder.decode(&b.fragment) {
            Ok(h) => h,
            Err(_) => {
                // h2 reports the broken block itself; its table no longer matters.
                self.out.extend_from_slice(&b.raw);
                self.passthrough = true;
                return;
            }
        };
        let mut block = Vec::with_capacity(b.fragment.len() + 64);
        for (name, value) in &headers {
            let value: &[u8] = if name == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                REPLACEMENT
            } else {
                value
            };
            // Literal header field without indexing, new name (RFC 7541 6.2.2), no Huffman.
            block.push(0);
            encode_string(&mut block, name);
            encode_string(&mut block, value);
        }
        let mut first = true;
        let mut rest = block.as_slice();
        loop {
            let head = if first && b.priority.is_some() { 5 } else { 0 };
            let n = rest.len().min(OUT_FRAME_MAX - head);
            let (chunk, tail) = rest.split_at(n);
            let mut flags = 0;
            if tail.is_empty() {
                flags |= END_HEADERS;
            }
            let kind = if first {
                if b.end_stream {
                    flags |= END_STREAM;
                }
                if b.priority.is_some() {
                    flags |= PRIORITY;
                }
                HEADERS
            } else {
                CONTINUATION
            };
            let len = chunk.len() + head;
            self.out.put_uint(len as u64, 3);
            self.out.put_u8(kind);
            self.out.put_u8(flags);
            self.out.put_u32(b.stream_id);
            if let (true, Some(p)) = (first, b.priority) {
                self.out.extend_from_slice(&p);
            }
            self.out.extend_from_slice(chunk);
            first = false;
            rest = tail;
            if rest.is_empty() {
                break;
            }
        }
    }
}

impl tonic::transport::server::Connected for AuthorityFix<UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The connections of `listener`, each wrapped in [`AuthorityFix`]; for
/// `serve_with_incoming(_shutdown)`.
pub fn incoming(
    listener: UnixListener,
) -> impl Stream<Item = io::Result<AuthorityFix<UnixStream>>> {
    UnixListenerStream::new(listener).map(|r| r.map(AuthorityFix::new))
}

/// An HPACK string literal without Huffman coding: a 7-bit-prefix length, then the octets.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            this.inbuf.reserve(16 * 1024);
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.inbuf)
            {
                Poll::Ready(Ok(n)) => n,
                other => return other.map_ok(|_| ()),
            };
            if n == 0 {
                // End of stream: whatever is left goes on as it is, then the end.
                if let Some(b) = this.block.take() {
                    this.out.extend_from_slice(&b.raw);
                }
                let rest = this.inbuf.split();
                this.out.extend_from_slice(&rest);
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.process();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    fn run(input: &[u8]) -> (Vec<Headers>, Vec<u8>) {
        let mut fix = AuthorityFix::new(());
        fix.inbuf.extend_from_slice(input);
        fix.process();
        let out = fix.out.to_vec();
        let mut dec = hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut p = &out[PREFACE_LEN..];
        while p.len() >= FRAME_HEADER_LEN {
            let len = (usize::from(p[0]) << 16) | (usize::from(p[1]) << 8) | usize::from(p[2]);
            if p[3] == HEADERS {
                let body = &p[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
                let body = if p[4] & PRIORITY != 0 {
                    &body[5..]
                } else {
                    body
                };
                blocks.push(dec.decode(body).unwrap());
            }
            p = &p[FRAME_HEADER_LEN + len..];
        }
        (blocks, out)
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_the_table_is_kept() {
        let mut enc = hpack::Encoder::new();
        let h1 = [
            (b":authority".to_vec(), b"/run/memoh/bridge.sock".to_vec()),
            (
                b":path".to_vec(),
                b"/bridgepb.ContainerService/Stat".to_vec(),
            ),
        ];
        // The second block refers to the first one's dynamic-table entries.
        let b1 = enc.encode(h1.iter().map(|(n, v)| (&n[..], &v[..])));
        let b2 = enc.encode(h1.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS passes through
        input.extend(frame(HEADERS, END_HEADERS, 1, &b1));
        // The second block split into HEADERS (padded, with priority) and a CONTINUATION.
        let mut first = vec![2u8, 0, 0, 0, 0, 16];
        first.extend_from_slice(&b2[..1]);
        first.extend_from_slice(&[0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &first));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &b2[1..]));
        let (blocks, out) = run(&input);
        assert_eq!(&out[..PREFACE_LEN], &input[..PREFACE_LEN]);
        assert_eq!(blocks.len(), 2);
        for b in &blocks {
            assert_eq!(b[0], (b":authority".to_vec(), b"localhost".to_vec()));
            assert_eq!(b[1], h1[1]);
        }
    }

    #[test]
    fn a_valid_authority_is_kept_and_garbage_passes_through() {
        let mut enc = hpack::Encoder::new();
        let h = [(&b":authority"[..], &b"localhost:9090"[..])];
        let b = enc.encode(h.iter().copied());
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &b));
        let (blocks, _) = run(&input);
        assert_eq!(blocks[0][0].1, b"localhost:9090".to_vec());

        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let bad = frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff]);
        input.extend(&bad);
        input.extend(b"trailing");
        let mut fix = AuthorityFix::new(());
        fix.inbuf.extend_from_slice(&input);
        fix.process();
        assert_eq!(fix.out.to_vec(), input);
        assert!(fix.passthrough);
    }
}
