//! Raw transfers shared by every streaming file call: [`stream_file`] sends an open file as
//! `DataChunk`s (ReadRaw, ReadRawNoFollow); [`upload`] feeds an upload's chunks into a
//! [`Sink`] and commits it only at the stream's clean end (WriteRaw, WriteRawNoFollow).
//!
//! What a sink keeps when an upload is called off is the sink's choice: an
//! [`AtomicFile`](crate::fs::AtomicFile) drops its temp file (nothing lands), an anchored
//! NoFollow file keeps what was written (WIRE-BRIDGE.md section 3).

use std::fs::File;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use memoh_proto::limits::RAW_CHUNK_SIZE;
use memoh_proto::pb::mcpcontainer as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::debug;

use crate::error::ServerError;
use crate::stream::BoxStream;

/// Where an upload's bytes go. Runs on a blocking thread.
pub trait Sink: Send + 'static {
    /// Appends `data`.
    fn write(&mut self, data: &[u8]) -> Result<(), ServerError>;
    /// Finishes the upload (the stream ended cleanly), returning the bytes written.
    fn commit(self) -> Result<u64, ServerError>;
}

impl Sink for crate::fs::AtomicFile {
    fn write(&mut self, data: &[u8]) -> Result<(), ServerError> {
        crate::fs::AtomicFile::write(self, data)
    }

    fn commit(self) -> Result<u64, ServerError> {
        crate::fs::AtomicFile::commit(self)
    }
}

/// One chunk of an upload after its first: the data and whether the client called it off.
#[derive(Debug, Default)]
pub struct Piece {
    /// Bytes to append.
    pub data: Bytes,
    /// The client aborts the upload.
    pub abort: bool,
}

/// Streams `file` (opened by the caller) in messages of at most 64 KiB. A read error ends the
/// stream with its status; a client that leaves stops the reader.
///
/// The reader makes 1 MiB reads into memory it does not clear first, splits each into 64 KiB
/// messages without copying, and hands them over 16 at a time, so the sending side is woken
/// once per read, not once per message.
pub fn stream_file(file: File, path: PathBuf) -> Result<BoxStream<pb::DataChunk>, ServerError> {
    let (tx, rx) = mpsc::channel::<Result<Vec<pb::DataChunk>, Status>>(1);
    crate::runtime::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        const READ: usize = 16 * RAW_CHUNK_SIZE;
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ);
            let spare = buf.spare_capacity_mut();
            let want = spare.len().min(READ);
            // SAFETY: read(2) into the buffer's spare capacity, at most `want` bytes of it; the
            // length is advanced below only by what the kernel reports as written.
            let n = unsafe { libc::read(file.as_raw_fd(), spare.as_mut_ptr().cast(), want) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                let _ = tx.blocking_send(Err(ServerError::io(&path, e).into()));
                return;
            }
            if n == 0 {
                return;
            }
            // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n as usize) };
            let mut block = buf.split().freeze();
            let mut batch = Vec::with_capacity(block.len().div_ceil(RAW_CHUNK_SIZE));
            while !block.is_empty() {
                let data = block.split_to(block.len().min(RAW_CHUNK_SIZE));
                batch.push(pb::DataChunk { data });
            }
            if tx.blocking_send(Ok(batch)).is_err() {
                return; // the client left
            }
        }
    })?;
    let chunks = ReceiverStream::new(rx).flat_map(|batch| {
        let items: Vec<Result<pb::DataChunk, Status>> = match batch {
            Ok(chunks) => chunks.into_iter().map(Ok).collect(),
            Err(s) => vec![Err(s)],
        };
        futures::stream::iter(items)
    });
    Ok(Box::pin(chunks))
}

enum RawWrite {
    Data(Bytes),
    Commit,
}

/// Writes `first` and then every chunk of `rest` into `sink` on a blocking thread, and commits
/// it when `rest` ends cleanly. Returns the bytes written.
///
/// The commit decision: the sink is committed only when the stream ended cleanly, `Ok(None)`
/// from a stream behind `memoh_proto::clean_end`, which turns every other ending (a reset of
/// any code, a lost connection, a GOAWAY before the half-close; see that module for what each
/// client stack sends and what hyper and tonic make of it) into an error, or has hyper drop
/// this future. A chunk with `abort` set (ABORTED), an oversized chunk (RESOURCE_EXHAUSTED),
/// the server's `kill` at the end of its shutdown grace and a deadline (tonic drops this
/// future) leave the sink uncommitted: it is dropped after every byte received was written.
pub async fn upload<S: Sink>(
    sink: S,
    first: Bytes,
    mut rest: BoxStream<Piece>,
    kill: CancellationToken,
) -> Result<u64, Status> {
    let (tx, mut rx) = mpsc::channel::<RawWrite>(16);
    let writer = crate::runtime::spawn_blocking(move || -> Result<Option<u64>, ServerError> {
        let mut sink = sink;
        let mut batch: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Some(m) = rx.blocking_recv() {
            let mut next = Some(m);
            // Take whatever else is already queued, so one write covers many chunks.
            while let Some(m) = next.take() {
                match m {
                    RawWrite::Data(d) => {
                        if batch.is_empty() && d.len() >= (1 << 20) {
                            sink.write(&d)?;
                        } else {
                            batch.extend_from_slice(&d);
                        }
                    }
                    RawWrite::Commit => {
                        sink.write(&batch)?;
                        return sink.commit().map(Some);
                    }
                }
                if batch.len() >= (1 << 20) {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if !batch.is_empty() {
                sink.write(&batch)?;
                batch.clear();
            }
        }
        // The sender went away without Commit: the upload was called off; the sink is
        // dropped uncommitted.
        Ok(None)
    })?;
    let mut pending = Some(first);
    let outcome: Result<(), Status> = loop {
        let data = match pending.take() {
            Some(d) => d,
            None => {
                let next = tokio::select! {
                    biased;
                    _ = kill.cancelled() => break Err(ServerError::ShuttingDown.into()),
                    m = rest.next() => m.transpose(),
                };
                match next {
                    Ok(Some(m)) if m.abort => {
                        break Err(
                            ServerError::Aborted("the client aborted the upload".into()).into()
                        )
                    }
                    Ok(Some(m)) => m.data,
                    Ok(None) => break Ok(()),
                    Err(s) => break Err(inbound_error(s)),
                }
            }
        };
        if !data.is_empty() && tx.send(RawWrite::Data(data)).await.is_err() {
            // The writer stopped on an error; it is reported below.
            break Ok(());
        }
    };
    if outcome.is_ok() {
        let _ = tx.send(RawWrite::Commit).await;
    }
    drop(tx);
    let written = match writer.await {
        Ok(r) => r?,
        Err(e) => return Err(Status::internal(format!("writer failed: {e}"))),
    };
    if let Err(s) = outcome {
        debug!(status = %s.message(), "upload called off");
        return Err(s);
    }
    written.ok_or_else(|| Status::internal("upload was not committed"))
}

/// Maps a receive error on a client stream: an oversized message becomes RESOURCE_EXHAUSTED.
pub(crate) fn inbound_error(s: Status) -> Status {
    crate::error::rewrite_too_large(&s).unwrap_or(s)
}
