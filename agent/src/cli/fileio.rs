//! `cp`'s local file on a thread of its own.
//!
//! The CLI runs on a current-thread runtime. Through `tokio::fs` every read or write is a
//! hand-off to a blocking thread plus a copy into the file's own buffer (and, downloading,
//! one more into a `BufWriter`), and only one of them is in flight while the network waits.
//! Here one plain thread does the file's side: uploading, it reads 1 MiB buffers that go to
//! the request as they are; downloading, it writes the received chunks as they came off the
//! wire, without copying them, while the runtime goes on receiving. A bounded channel
//! between the two keeps at most [`DEPTH`] MiB in memory.

use std::fs::File;
use std::io::{Read, Write};
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// The size of one read of the local file (and the batch of received chunks a write takes).
pub const CHUNK: usize = 1 << 20;

/// How many chunks may wait between the file's thread and the network.
const DEPTH: usize = 4;

/// Reads `file` on a thread of its own, [`CHUNK`] at a time, into a stream of buffers that
/// ends at the end of the file; a read error ends it with that error.
pub fn reader(mut file: File) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(DEPTH);
    let spawned = std::thread::Builder::new()
        .name("memoh-cp-read".into())
        .spawn(move || loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let r = read_full(&mut file, &mut buf);
            let end = !matches!(r, Ok(n) if n == CHUNK);
            let item = r.map(|_| buf.freeze());
            match item {
                Ok(b) if b.is_empty() => return,
                item => {
                    let failed = item.is_err();
                    if tx.blocking_send(item).is_err() || end || failed {
                        return;
                    }
                }
            }
        });
    let rx = match spawned {
        Ok(_) => rx,
        Err(e) => {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Err(e));
            rx
        }
    };
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Fills `buf` (up to its capacity) from `file`; fewer bytes only at the end of the file.
fn read_full(file: &mut File, buf: &mut BytesMut) -> std::io::Result<usize> {
    let want = buf.capacity();
    buf.resize(want, 0);
    let mut n = 0;
    while n < want {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(n)
}

/// A file written by a thread of its own from the chunks handed to [`Writer::write`].
pub struct Writer {
    tx: Option<mpsc::Sender<Vec<Bytes>>>,
    batch: Vec<Bytes>,
    batched: usize,
    thread: Option<JoinHandle<std::io::Result<File>>>,
}

impl Writer {
    /// Starts the thread that writes `file`.
    pub fn new(mut file: File) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(DEPTH);
        let thread = std::thread::Builder::new()
            .name("memoh-cp-write".into())
            .spawn(move || {
                while let Some(batch) = rx.blocking_recv() {
                    for b in &batch {
                        file.write_all(b)?;
                    }
                }
                Ok(file)
            })?;
        Ok(Self {
            tx: Some(tx),
            batch: Vec::new(),
            batched: 0,
            thread: Some(thread),
        })
    }

    /// Queues `chunk`; hands a batch of [`CHUNK`] bytes to the thread, waiting while
    /// [`DEPTH`] batches are queued. A write that failed is reported here or by
    /// [`Writer::finish`].
    pub async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.batched += chunk.len();
        self.batch.push(chunk);
        if self.batched >= CHUNK {
            self.hand_over().await?;
        }
        Ok(())
    }

    async fn hand_over(&mut self) -> std::io::Result<()> {
        let batch = std::mem::take(&mut self.batch);
        self.batched = 0;
        let sent = match &self.tx {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The thread stopped: it failed, and says why.
        self.tx = None;
        Err(self
            .join()
            .err()
            .unwrap_or_else(|| std::io::Error::other("the file's writer stopped early")))
    }

    /// Writes what is queued and waits for the thread; returns the file.
    pub async fn finish(mut self) -> std::io::Result<File> {
        if !self.batch.is_empty() {
            self.hand_over().await?;
        }
        self.tx = None;
        let thread = self.thread.take();
        tokio::task::spawn_blocking(move || join(thread))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The thread's outcome, once it ended.
    fn join(&mut self) -> std::io::Result<File> {
        join(self.thread.take())
    }
}

/// The outcome of the writer's thread (waiting for it to end).
fn join(thread: Option<JoinHandle<std::io::Result<File>>>) -> std::io::Result<File> {
    match thread {
        Some(t) => t
            .join()
            .map_err(|_| std::io::Error::other("the file's writer panicked"))?,
        None => Err(std::io::Error::other("the file's writer stopped early")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// Every size around the chunk boundaries reads back whole and in order.
    #[tokio::test]
    async fn reader_reads_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let p = dir.path().join(format!("f{n}"));
            let data = pattern(n);
            std::fs::write(&p, &data).unwrap();
            let mut s = std::pin::pin!(reader(File::open(&p).unwrap()));
            let mut got = Vec::new();
            while let Some(b) = s.next().await {
                let b = b.unwrap();
                assert!(
                    !b.is_empty() && b.len() <= CHUNK,
                    "{n}: chunk of {}",
                    b.len()
                );
                got.extend_from_slice(&b);
            }
            assert_eq!(got.len(), n);
            assert!(got == data, "{n}: bytes differ");
        }
    }

    /// A read error reaches the stream as an error, not as an end of the file.
    #[tokio::test]
    async fn reader_reports_a_read_error() {
        // Reading a directory fails with EISDIR.
        let dir = tempfile::tempdir().unwrap();
        let mut s = std::pin::pin!(reader(File::open(dir.path()).unwrap()));
        let first = s.next().await.expect("an item");
        assert!(first.is_err(), "{first:?}");
        assert!(s.next().await.is_none());
    }

    /// Chunks of odd sizes land whole and in order, and `finish` returns the file.
    #[tokio::test]
    async fn writer_writes_every_chunk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let data = pattern(5 * CHUNK + 12345);
        let mut w = Writer::new(File::create(&p).unwrap()).unwrap();
        let mut at = 0;
        let mut size = 1;
        while at < data.len() {
            let end = (at + size).min(data.len());
            w.write(Bytes::copy_from_slice(&data[at..end]))
                .await
                .unwrap();
            at = end;
            size = size * 3 % 200_003 + 1;
        }
        let f = w.finish().await.unwrap();
        drop(f);
        assert!(std::fs::read(&p).unwrap() == data);
    }

    /// A write that fails (a full device) is reported, not swallowed.
    #[tokio::test]
    async fn writer_reports_a_write_error() {
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            eprintln!("skipped: no /dev/full");
            return;
        };
        let mut w = Writer::new(full).unwrap();
        let mut failed = false;
        for _ in 0..(DEPTH + 2) {
            if w.write(Bytes::from(vec![1u8; CHUNK])).await.is_err() {
                failed = true;
                break;
            }
        }
        if !failed {
            failed = w.finish().await.is_err();
        }
        assert!(failed, "writing to /dev/full reported no error");
    }
}
