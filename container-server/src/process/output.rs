//! One output stream of a process: every byte gets an absolute offset (bytes since the
//! process started). The newest `ring_bytes` are kept in memory as the chunks the reader
//! produced; everything is also appended to a spill file inside the bot, itself bounded: once
//! the current file holds half the bound it becomes the previous file (the one before is
//! deleted) and a new one starts, so between half and all of `spill_bytes` stay on disk. What
//! neither holds any more is before [`Stream::first_offset`] and is reported, never skipped.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tracing::warn;

/// Where a read at an offset lands.
#[derive(Debug)]
pub enum Read {
    /// Nothing at or past the offset yet.
    Nothing,
    /// The offset is no longer kept; the first kept one.
    Lost {
        /// The first offset still kept.
        first: u64,
    },
    /// Bytes from memory, starting at the offset asked for.
    Data(Bytes),
    /// Bytes to read from a spill file: `len` bytes at `pos` of `file` (opened while the
    /// segment existed, so a rotation meanwhile changes nothing).
    File {
        /// The open segment.
        file: File,
        /// Position in the file.
        pos: u64,
        /// How many bytes to read.
        len: usize,
    },
}

/// A spill file and the stream offset of its first byte.
struct Segment {
    path: PathBuf,
    start: u64,
    file: File,
    len: u64,
}

/// One stream's kept output.
pub struct Stream {
    /// The next offset (bytes written so far).
    total: u64,
    ring: VecDeque<(u64, Bytes)>,
    ring_len: usize,
    ring_cap: usize,
    /// Previous and current spill files, oldest first; empty when spilling is off or failed.
    segments: VecDeque<Segment>,
    spill_cap: u64,
    base: Option<PathBuf>,
    /// Set once a spill write failed: from then on only the ring is kept.
    spill_failed: bool,
}

impl Stream {
    /// A stream kept in a ring of `ring_cap` bytes and spilled to `base` (`stdout.log`; the
    /// previous segment is `stdout.log.1`), at most `spill_cap` bytes on disk. `None`: memory
    /// only.
    pub fn new(ring_cap: usize, spill_cap: u64, base: Option<PathBuf>) -> Self {
        Self {
            total: 0,
            ring: VecDeque::new(),
            ring_len: 0,
            ring_cap: ring_cap.max(1),
            segments: VecDeque::new(),
            spill_cap: spill_cap.max(2),
            base,
            spill_failed: false,
        }
    }

    /// Bytes written so far: the next chunk's offset.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The first offset still kept (in a spill file or the ring).
    pub fn first_offset(&self) -> u64 {
        let ring_first = self.ring.front().map(|(o, _)| *o).unwrap_or(self.total);
        match self.segments.front() {
            Some(s) => s.start.min(ring_first),
            None => ring_first,
        }
    }

    /// Appends a chunk: to the ring, and to the spill file.
    pub fn append(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let off = self.total;
        self.total += chunk.len() as u64;
        if !self.spill_failed {
            if let Err(e) = self.spill(&chunk, off) {
                warn!(error = %e, "process output spill failed; keeping only the ring from now");
                self.spill_failed = true;
                self.segments.clear();
            }
        }
        self.ring_len += chunk.len();
        self.ring.push_back((off, chunk));
        while self.ring_len > self.ring_cap {
            match self.ring.pop_front() {
                Some((_, c)) => self.ring_len -= c.len(),
                None => break,
            }
        }
    }

    fn spill(&mut self, chunk: &[u8], off: u64) -> io::Result<()> {
        let Some(base) = self.base.clone() else {
            return Ok(());
        };
        let half = (self.spill_cap / 2).max(1);
        let mut rest = chunk;
        let mut off = off;
        while !rest.is_empty() {
            let full = self.segments.back().is_none_or(|s| s.len >= half);
            if full {
                self.rotate(&base, off)?;
            }
            let seg = self.segments.back_mut().expect("a segment after rotate");
            let room = (half - seg.len.min(half)) as usize;
            let n = room.min(rest.len()).max(1).min(rest.len());
            seg.file.write_all(&rest[..n])?;
            seg.len += n as u64;
            off += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Starts a new current segment at `off`; the current one becomes the previous one, the
    /// previous one is deleted.
    fn rotate(&mut self, base: &Path, off: u64) -> io::Result<()> {
        let prev = {
            let mut p = base.as_os_str().to_owned();
            p.push(".1");
            PathBuf::from(p)
        };
        if self.segments.len() >= 2 {
            if let Some(old) = self.segments.pop_front() {
                let _ = std::fs::remove_file(&old.path);
            }
        }
        if let Some(cur) = self.segments.back_mut() {
            std::fs::rename(&cur.path, &prev)?;
            cur.path = prev;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .mode(0o600)
            .open(base)?;
        self.segments.push_back(Segment {
            path: base.to_path_buf(),
            start: off,
            file,
            len: 0,
        });
        Ok(())
    }

    /// What to send for offset `off`, at most `max` bytes (at least 1 when there is data).
    pub fn read_at(&self, off: u64, max: usize) -> io::Result<Read> {
        if off >= self.total {
            return Ok(Read::Nothing);
        }
        let first = self.first_offset();
        if off < first {
            return Ok(Read::Lost { first });
        }
        let max = max.max(1);
        if let Some((ring_first, _)) = self.ring.front() {
            if off >= *ring_first {
                // The chunk holding `off`: the last one starting at or before it.
                let i = self.ring.partition_point(|(o, _)| *o <= off) - 1;
                let (start, chunk) = &self.ring[i];
                let from = (off - start) as usize;
                let to = (from + max).min(chunk.len());
                return Ok(Read::Data(chunk.slice(from..to)));
            }
        }
        let seg = self
            .segments
            .iter()
            .rev()
            .find(|s| s.start <= off)
            .expect("off is at or past the first segment");
        let pos = off - seg.start;
        let len = (seg.len - pos).min(max as u64) as usize;
        Ok(Read::File {
            file: seg.file.try_clone()?,
            pos,
            len,
        })
    }

    /// Frees the ring once the stream is complete, when the spill files hold everything it
    /// has (a kept finished process then costs no memory for its output); replays read the
    /// files. Without working spill files the ring stays, as the only copy.
    pub fn release_ring(&mut self) {
        let ring_first = self.ring.front().map(|(o, _)| *o).unwrap_or(self.total);
        let spilled = self.base.is_some()
            && !self.spill_failed
            && self.segments.front().is_some_and(|s| s.start <= ring_first);
        if spilled {
            self.ring.clear();
            self.ring_len = 0;
        }
    }

    /// Deletes the spill files.
    pub fn remove_files(&mut self) {
        for s in self.segments.drain(..) {
            let _ = std::fs::remove_file(&s.path);
        }
    }
}

/// Reads `len` bytes at `pos` of a spill segment (a short read if the file is shorter).
pub fn read_file(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], pos + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(s: &Stream, mut off: u64) -> (Vec<u8>, Option<u64>) {
        let mut out = Vec::new();
        let mut lost = None;
        loop {
            match s.read_at(off, 7).unwrap() {
                Read::Nothing => return (out, lost),
                Read::Lost { first } => {
                    lost = Some(first);
                    off = first;
                }
                Read::Data(b) => {
                    off += b.len() as u64;
                    out.extend_from_slice(&b);
                }
                Read::File { file, pos, len } => {
                    let b = read_file(&file, pos, len).unwrap();
                    assert_eq!(b.len(), len);
                    off += b.len() as u64;
                    out.extend_from_slice(&b);
                }
            }
        }
    }

    #[test]
    fn ring_and_spill_give_every_byte_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Stream::new(10, 1 << 20, Some(dir.path().join("out.log")));
        let all: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        for c in all.chunks(3) {
            s.append(Bytes::copy_from_slice(c));
        }
        assert_eq!(s.total(), 200);
        assert_eq!(s.first_offset(), 0);
        for from in [0u64, 1, 50, 189, 190, 199, 200] {
            let (got, lost) = collect(&s, from);
            assert_eq!(got, all[from as usize..], "from {from}");
            assert_eq!(lost, None);
        }
        // Complete: the ring goes, the files answer alone.
        s.release_ring();
        assert!(s.ring.is_empty());
        for from in [0u64, 150, 199] {
            assert_eq!(collect(&s, from).0, all[from as usize..], "from {from}");
        }
    }

    #[test]
    fn the_spill_bound_moves_the_first_offset_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("out.log");
        let mut s = Stream::new(8, 40, Some(base.clone()));
        let all: Vec<u8> = (0..100u8).collect();
        for c in all.chunks(6) {
            s.append(Bytes::copy_from_slice(c));
        }
        let first = s.first_offset();
        assert!(first > 0 && first <= 100 - 20, "first {first}");
        let (got, lost) = collect(&s, 0);
        assert_eq!(lost, Some(first));
        assert_eq!(got, all[first as usize..]);
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 40, "{on_disk} bytes on disk");
        s.remove_files();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_ring_larger_than_the_files_stays() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Stream::new(64, 20, Some(dir.path().join("out.log")));
        let all: Vec<u8> = (0..60u8).collect();
        for c in all.chunks(4) {
            s.append(Bytes::copy_from_slice(c));
        }
        assert_eq!(s.first_offset(), 0, "the ring still has everything");
        s.release_ring();
        assert_eq!(s.first_offset(), 0);
        assert_eq!(collect(&s, 0), (all, None));
    }

    #[test]
    fn memory_only_loses_what_leaves_the_ring() {
        let mut s = Stream::new(10, 1 << 20, None);
        for c in (0..30u8).collect::<Vec<_>>().chunks(5) {
            s.append(Bytes::copy_from_slice(c));
        }
        assert_eq!(s.first_offset(), 20);
        s.release_ring();
        let (got, lost) = collect(&s, 3);
        assert_eq!(lost, Some(20));
        assert_eq!(got, (20..30u8).collect::<Vec<_>>());
    }
}
