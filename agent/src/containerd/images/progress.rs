//! Progress of imports and pulls, and the one loop that copies blobs into containerd's content
//! store while reporting it: archive entries and registry blobs both arrive as a stream of
//! [`Piece`]s.

use std::collections::HashMap;

use futures::{Stream, StreamExt};

use crate::containerd::content::ContentWriter;
use crate::containerd::Containerd;
use crate::error::AgentError;

/// Phase of an import or pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressPhase {
    /// Reading the archive's index.
    Reading,
    /// Writing blobs into containerd's content store (or fetching them).
    Writing,
    /// Applying layers onto snapshots.
    Unpacking,
    /// Finished.
    Done,
}

/// Progress of an import or pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// What is happening.
    pub phase: ProgressPhase,
    /// Bytes (or layers, while unpacking) done.
    pub current: u64,
    /// Bytes (or layers) in all.
    pub total: u64,
}

/// Progress callback.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// A progress callback that ignores everything.
pub fn no_progress(_: Progress) {}

/// Reports `phase` at `current` of `total`.
pub(super) fn report(progress: ProgressFn<'_>, phase: ProgressPhase, current: u64, total: u64) {
    progress(Progress {
        phase,
        current,
        total,
    });
}

/// Reports the start of an import or pull (reading what there is to write).
pub(super) fn started(progress: ProgressFn<'_>) {
    report(progress, ProgressPhase::Reading, 0, 0);
}

/// Reports the end of an import or pull.
pub(super) fn finished(progress: ProgressFn<'_>) {
    report(progress, ProgressPhase::Done, 1, 1);
}

/// Bytes written of an import or pull, reported as [`ProgressPhase::Writing`].
pub(super) struct Meter<'a> {
    progress: ProgressFn<'a>,
    done: u64,
    total: u64,
}

impl<'a> Meter<'a> {
    /// A meter at `done` of `total` bytes.
    pub(super) fn new(progress: ProgressFn<'a>, done: u64, total: u64) -> Self {
        Self {
            progress,
            done,
            total,
        }
    }

    /// Counts `bytes` more written and reports it.
    pub(super) fn add(&mut self, bytes: u64) {
        self.done += bytes;
        report(self.progress, ProgressPhase::Writing, self.done, self.total);
    }
}

/// How to open the ingest of a blob.
#[derive(Debug, Clone)]
pub(super) struct BlobStart {
    /// The caller's name for the blob; [`Containerd::copy_blobs`] answers by it.
    pub key: String,
    /// Ingest ref, unique per writer.
    pub ingest: String,
    /// Size when known, else 0.
    pub size: i64,
    /// Digest the blob must have, when known.
    pub expected: Option<String>,
}

/// One step of a blob copy: a blob begins, some of its bytes, its end.
#[derive(Debug)]
pub(super) enum Piece<B> {
    /// A new blob begins.
    Begin(BlobStart),
    /// Bytes of the current blob.
    Bytes(B),
    /// The current blob is complete: commit it.
    End,
}

/// What a copy wrote, by blob key: digest, size and the first bytes (to sniff compression).
pub(super) type Written = HashMap<String, (String, i64, Vec<u8>)>;

impl Containerd {
    /// Copies blobs into the content store under `lease`, one ingest per blob, counting the
    /// bytes on `meter`. The one copy loop of imports and pulls.
    pub(super) async fn copy_blobs<B: AsRef<[u8]>>(
        &self,
        pieces: impl Stream<Item = Result<Piece<B>, AgentError>>,
        lease: &str,
        meter: &mut Meter<'_>,
    ) -> Result<Written, AgentError> {
        let mut pieces = std::pin::pin!(pieces);
        let mut out = Written::new();
        let mut current: Option<(String, ContentWriter, Vec<u8>)> = None;
        while let Some(piece) = pieces.next().await {
            match piece? {
                Piece::Begin(b) => {
                    let w = self
                        .content_writer(&b.ingest, lease, b.size, b.expected.as_deref())
                        .await?;
                    current = Some((b.key, w, Vec::new()));
                }
                Piece::Bytes(chunk) => {
                    let chunk = chunk.as_ref();
                    let (_, w, head) = current.as_mut().expect("a blob begins before its bytes");
                    if head.len() < 16 {
                        head.extend_from_slice(&chunk[..chunk.len().min(16)]);
                    }
                    w.write(chunk).await?;
                    meter.add(chunk.len() as u64);
                }
                Piece::End => {
                    let (key, w, head) = current.take().expect("a blob begins before its end");
                    let (digest, size) = w.commit(HashMap::new()).await?;
                    out.insert(key, (digest, size, head));
                }
            }
        }
        Ok(out)
    }
}
