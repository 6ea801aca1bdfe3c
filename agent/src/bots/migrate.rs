//! One-time migration of legacy bind-mounted bot data (`<data_root>/bots/<bot>`) into the
//! bot's container, over the gRPC API only.
//!
//! The tree travels as one tar stream into `tar -x` inside the bot (through Exec's stdin), so
//! directories (empty ones too), empty files, modes, modification times and symlinks arrive
//! as they were, at the speed of one stream rather than one call per file. The archive is built
//! here from a walk that never follows symlinks: a link is recreated as a link and never read
//! through, and every path in it is relative to `/data`, so nothing lands outside it.
//!
//! Before copying, the bot gets a `pre-migration` version, so a bad migration can be undone.
//! After copying, sizes and kinds are checked against the walk. Only when nothing failed is a
//! marker written inside the container and the source renamed to `<...>.migrated`; the marker
//! makes the migration run at most once even if that rename fails.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use memoh_proto::client::collect_exec;
use memoh_proto::pb::mcpcontainer::ExecInput;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::versions::Source;
use super::Manager;
use crate::error::AgentError;

/// Marker written inside the container once a migration completed.
pub const MARKER: &str = "/data/.memoh/migrated";
/// Suffix of a migrated source directory.
pub const MIGRATED_SUFFIX: &str = ".migrated";

/// Progress of a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationProgress {
    /// `snapshot`, `copying`, `verifying`, `done`.
    pub phase: String,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Entries copied (files, directories, links).
    pub entries: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
    /// Symlinks recreated as links.
    pub symlinks: u64,
    /// Entries skipped on purpose (sockets, devices), with a warning.
    pub skipped: Vec<String>,
    /// Everything that failed; empty means the migration completed.
    pub failures: Vec<String>,
    /// The source was renamed to `.migrated`.
    pub renamed: bool,
    /// It had already completed earlier (only the rename was retried).
    pub already_done: bool,
}

/// One entry of the walk, for verification.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expect {
    is_dir: bool,
    is_link: bool,
    size: u64,
}

/// The legacy directory of `bot`.
pub fn legacy_dir(data_root: &Path, bot: &str) -> PathBuf {
    data_root.join("bots").join(bot)
}

/// The bot's legacy data directory, if it has one. A symlink in its place is refused: the walk
/// never follows a link, and its root is no exception (a link there would copy whatever it
/// points at on the host into the bot).
pub fn legacy_source(data_root: &Path, bot: &str) -> Result<Option<PathBuf>, AgentError> {
    let p = legacy_dir(data_root, bot);
    match std::fs::symlink_metadata(&p) {
        Ok(md) if md.file_type().is_symlink() => Err(AgentError::FailedPrecondition(format!(
            "legacy data {} is a symlink; refusing to follow it (put the data itself there)",
            p.display()
        ))),
        Ok(md) if md.is_dir() => Ok(Some(p)),
        Ok(_) => Err(AgentError::FailedPrecondition(format!(
            "legacy data {} is not a directory",
            p.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(&p, e)),
    }
}

/// Where a migrated source goes.
fn migrated_path(src: &Path) -> PathBuf {
    let mut dest = src.as_os_str().to_owned();
    dest.push(MIGRATED_SUFFIX);
    PathBuf::from(dest)
}

/// What kind of special file the walk skips, for the operator.
fn special_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Sends chunks of the archive into a channel, from the blocking walker thread.
struct ChunkWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

const CHUNK: usize = 256 * 1024;

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        let n = chunk.len() as u64;
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver gone"))?;
        self.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Walks `src` and writes the archive. Returns what it expects to find afterwards and what
/// failed or was skipped. Never follows a symlink.
type Walked = (
    HashMap<String, Expect>,
    Vec<String>,
    Vec<String>,
    u64,
    Vec<(PathBuf, String)>,
);

fn build_archive(src: &Path, out: ChunkWriter) -> Walked {
    let mut expect = HashMap::new();
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    let mut symlinks = 0u64;
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    let mut dirs: Vec<(PathBuf, String)> = Vec::new();
    for item in walkdir::WalkDir::new(src)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = match item {
            Ok(e) => e,
            Err(e) => {
                let p = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| src.display().to_string());
                failures.push(format!(
                    "{p}: {}",
                    e.io_error()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| e.to_string())
                ));
                continue;
            }
        };
        let rel = match entry.path().strip_prefix(src) {
            Ok(r) => r.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let ft = entry.file_type();
        let md = match entry.metadata() {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{rel}: {e}"));
                continue;
            }
        };
        let r = if ft.is_dir() {
            dirs.push((entry.path().to_path_buf(), rel.clone()));
            expect.insert(
                rel.clone(),
                Expect {
                    is_dir: true,
                    is_link: false,
                    size: 0,
                },
            );
            tar.append_path_with_name(entry.path(), &rel)
        } else if ft.is_symlink() {
            symlinks += 1;
            expect.insert(
                rel.clone(),
                Expect {
                    is_dir: false,
                    is_link: true,
                    size: 0,
                },
            );
            // Stored as a link; its target is never opened.
            tar.append_path_with_name(entry.path(), &rel)
        } else if ft.is_file() {
            match std::fs::File::open(entry.path()) {
                Ok(mut f) => {
                    expect.insert(
                        rel.clone(),
                        Expect {
                            is_dir: false,
                            is_link: false,
                            size: md.size(),
                        },
                    );
                    let mut h = tar::Header::new_gnu();
                    h.set_metadata_in_mode(&md, tar::HeaderMode::Complete);
                    tar.append_data(&mut h, &rel, &mut f)
                }
                Err(e) => {
                    failures.push(format!("{rel}: {e}"));
                    continue;
                }
            }
        } else {
            let kind = special_kind(&ft);
            warn!(path = %rel, kind, "skipping special file in legacy data");
            skipped.push(format!("{rel} ({kind})"));
            continue;
        };
        if let Err(e) = r {
            failures.push(format!("{rel}: {e}"));
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break;
            }
        }
    }
    match tar.into_inner() {
        Ok(mut w) => {
            if let Err(e) = w.flush() {
                failures.push(format!("archive: {e}"));
            }
        }
        Err(e) => failures.push(format!("archive: {e}")),
    }
    (expect, failures, skipped, symlinks, dirs)
}

/// An archive of the directory entries only, deepest first. Extracted after the main one, it
/// sets directories' modes and modification times back: extracting their children (and tar
/// creating some symlinks only at the very end) changed them.
fn dir_times_archive(dirs: &[(PathBuf, String)]) -> (Vec<u8>, Vec<String>) {
    let mut failures = Vec::new();
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Complete);
    for (path, rel) in dirs.iter().rev() {
        if let Err(e) = tar.append_path_with_name(path, rel) {
            failures.push(format!("{rel}: {e}"));
        }
    }
    match tar.into_inner() {
        Ok(v) => (v, failures),
        Err(e) => {
            failures.push(format!("archive: {e}"));
            (Vec::new(), failures)
        }
    }
}

fn total_size(src: &Path) -> u64 {
    walkdir::WalkDir::new(src)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.size())
        .sum()
}

impl Manager {
    /// Whether the bot has legacy data still to migrate (a symlink in its place counts, so
    /// that the migration runs and refuses it with its reason).
    pub fn has_legacy_data(&self, bot: &str) -> bool {
        !matches!(legacy_source(&self.config().data_root, bot), Ok(None))
    }

    /// Migrates the bot's legacy data (see the module docs). Holds the bot's lock throughout.
    pub async fn migrate(
        &self,
        bot: &str,
        progress: &(dyn Fn(MigrationProgress) + Send + Sync),
    ) -> Result<MigrationReport, AgentError> {
        crate::ids::validate(bot)?;
        let dir = legacy_dir(&self.config().data_root, bot);
        let no_data = || {
            AgentError::FailedPrecondition(format!(
                "bot {bot:?} has no legacy data at {}",
                dir.display()
            ))
        };
        let src = legacy_source(&self.config().data_root, bot)?.ok_or_else(no_data)?;
        let _g = self.lock_bot(bot).await;
        let mut report = MigrationReport::default();
        let client = self.client(bot).await?;
        if client.stat(MARKER).await.is_ok() {
            // Completed before; never copy again over what the bot changed since. The rename
            // may have happened meanwhile (a background migration held the lock): then the
            // source is renamed all the same.
            report.already_done = true;
            report.renamed = rename_source(&src).await.is_ok()
                || (!src.exists() && migrated_path(&src).exists());
            return Ok(report);
        }
        // Checked again under the lock: what was checked before may have changed.
        let src = legacy_source(&self.config().data_root, bot)?.ok_or_else(no_data)?;

        progress(MigrationProgress {
            phase: "snapshot".into(),
            ..Default::default()
        });
        self.snapshot_locked(bot, "before migration", Source::PreMigration, None)
            .await?;
        let client = self.client(bot).await?;

        let total = {
            let s = src.clone();
            tokio::task::spawn_blocking(move || total_size(&s))
                .await
                .unwrap_or(0)
        };
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            sent: sent.clone(),
        };
        let walker = {
            let s = src.clone();
            tokio::task::spawn_blocking(move || build_archive(&s, writer))
        };
        let first = ExecInput {
            command: "mkdir -p /data && exec tar -x -f - -C /data".into(),
            work_dir: "/".into(),
            timeout_seconds: i32::MAX,
            ..Default::default()
        };
        let copy_progress = {
            let sent = sent.clone();
            move || MigrationProgress {
                phase: "copying".into(),
                bytes: sent.load(std::sync::atomic::Ordering::Relaxed),
                total_bytes: total,
            }
        };
        let exec = async {
            let mut out = client
                .exec(first, tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?;
            collect_exec(&mut out).await
        };
        tokio::pin!(exec);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        let result = loop {
            tokio::select! {
                r = &mut exec => break r,
                _ = tick.tick() => progress(copy_progress()),
            }
        };
        let (expect, failures, skipped, symlinks, dirs) = walker
            .await
            .map_err(|e| AgentError::io(&src, std::io::Error::other(e)))?;
        report.failures = failures;
        if result.as_ref().is_ok_and(|r| r.exit_code == 0) && !dirs.is_empty() {
            let (archive, dir_failures) =
                tokio::task::spawn_blocking(move || dir_times_archive(&dirs))
                    .await
                    .map_err(|e| AgentError::io(&src, std::io::Error::other(e)))?;
            report.failures.extend(dir_failures);
            let first = ExecInput {
                command: "exec tar -x -f - -C /data".into(),
                work_dir: "/".into(),
                timeout_seconds: i32::MAX,
                ..Default::default()
            };
            let body = futures::stream::iter(
                archive
                    .chunks(256 * 1024)
                    .map(Bytes::copy_from_slice)
                    .collect::<Vec<_>>(),
            );
            let r = match client.exec(first, body).await {
                Ok(mut out) => collect_exec(&mut out).await,
                Err(s) => Err(s),
            };
            match r {
                Ok(r) if r.exit_code == 0 => {}
                Ok(r) => report.failures.push(format!(
                    "directory times: tar exited {}: {}",
                    r.exit_code,
                    String::from_utf8_lossy(&r.stderr).trim()
                )),
                Err(s) => report
                    .failures
                    .push(format!("directory times: {}", s.message())),
            }
        }
        report.skipped = skipped;
        report.symlinks = symlinks;
        report.bytes = sent.load(std::sync::atomic::Ordering::Relaxed);
        match result {
            Ok(r) if r.exit_code == 0 => {}
            Ok(r) => report.failures.push(format!(
                "extract exited {}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr).trim()
            )),
            Err(s) => report.failures.push(format!("extract: {}", s.message())),
        }

        progress(MigrationProgress {
            phase: "verifying".into(),
            bytes: report.bytes,
            total_bytes: total,
        });
        let listed = client
            .list_dir("/data", true)
            .await
            .map_err(|status| AgentError::Bot {
                bot: bot.to_string(),
                status,
            })?;
        let found: HashMap<&str, &memoh_proto::pb::mcpcontainer::FileEntry> =
            listed.iter().map(|e| (e.path.as_str(), e)).collect();
        for (path, want) in &expect {
            match found.get(path.as_str()) {
                None => report.failures.push(format!("{path}: missing after copy")),
                Some(e) => {
                    let is_link = e.mode.starts_with('L');
                    if e.is_dir != want.is_dir || is_link != want.is_link {
                        report
                            .failures
                            .push(format!("{path}: wrong kind after copy ({})", e.mode));
                    } else if !want.is_dir && !want.is_link && e.size as u64 != want.size {
                        report.failures.push(format!(
                            "{path}: {} bytes after copy, {} expected",
                            e.size, want.size
                        ));
                    }
                }
            }
        }
        report.entries = expect.len() as u64;
        if !report.failures.is_empty() {
            warn!(
                bot,
                failures = report.failures.len(),
                "migration incomplete; source left in place"
            );
            return Ok(report);
        }
        let stamp = chrono::Utc::now().to_rfc3339();
        client
            .write_file(MARKER, format!("{stamp}\n"))
            .await
            .map_err(|status| AgentError::Bot {
                bot: bot.to_string(),
                status,
            })?;
        match rename_source(&src).await {
            Ok(()) => report.renamed = true,
            Err(e) => warn!(bot, error = %e, "migration done but the source could not be renamed"),
        }
        progress(MigrationProgress {
            phase: "done".into(),
            bytes: report.bytes,
            total_bytes: total,
        });
        info!(
            bot,
            entries = report.entries,
            bytes = report.bytes,
            "migrated legacy data"
        );
        Ok(report)
    }
}

async fn rename_source(src: &Path) -> Result<(), AgentError> {
    tokio::fs::rename(src, migrated_path(src))
        .await
        .map_err(|e| AgentError::io(src, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_keeps_links_and_never_reads_through_them() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("a/empty")).unwrap();
        std::fs::write(src.join("a/f.txt"), b"hello").unwrap();
        std::fs::write(src.join("zero"), b"").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("leak")).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let w = ChunkWriter {
            tx,
            buf: Vec::new(),
            sent: Default::default(),
        };
        let s = src.clone();
        let (expect, failures, skipped, links, dirs) =
            std::thread::spawn(move || build_archive(&s, w))
                .join()
                .unwrap();
        assert!(failures.is_empty(), "{failures:?}");
        // "a" and "a/empty", for the second pass that restores their times.
        assert_eq!(dirs.len(), 2);
        assert!(skipped.is_empty());
        assert_eq!(links, 1);
        assert_eq!(expect.len(), 5);
        let mut data = Vec::new();
        while let Ok(c) = rx.try_recv() {
            data.extend_from_slice(&c);
        }
        let mut ar = tar::Archive::new(&data[..]);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            assert!(!p.starts_with('/') && !p.contains(".."), "{p}");
            if p == "leak" {
                assert_eq!(e.header().entry_type(), tar::EntryType::Symlink);
                assert_eq!(e.header().size().unwrap(), 0);
            }
            seen.push(p);
        }
        assert!(seen.contains(&"a/empty".to_string()));
        assert!(seen.contains(&"zero".to_string()));
        let passwd = std::fs::read("/etc/passwd").unwrap_or_default();
        assert!(
            passwd.is_empty()
                || !data
                    .windows(passwd.len().min(16))
                    .any(|w| w == &passwd[..passwd.len().min(16)])
        );
    }

    #[test]
    fn special_files_are_skipped_and_named_with_their_kind() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), b"x").unwrap();
        nix::unistd::mkfifo(
            &src.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
        let (tx, _rx) = mpsc::channel(1024);
        let w = ChunkWriter {
            tx,
            buf: Vec::new(),
            sent: Default::default(),
        };
        let s = src.clone();
        let (expect, failures, skipped, _, _) = std::thread::spawn(move || build_archive(&s, w))
            .join()
            .unwrap();
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(skipped, ["pipe (fifo)", "sock (socket)"]);
        assert_eq!(expect.len(), 1);
    }

    #[test]
    fn a_legacy_root_that_is_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("bots")).unwrap();
        assert!(legacy_source(root, "a").unwrap().is_none());
        std::fs::create_dir_all(root.join("bots/a")).unwrap();
        assert_eq!(legacy_source(root, "a").unwrap(), Some(root.join("bots/a")));
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere"), root.join("bots/b")).unwrap();
        let e = legacy_source(root, "b").unwrap_err().to_string();
        assert!(e.contains("symlink") && e.contains("bots/b"), "{e}");
        std::fs::write(root.join("bots/c"), b"file").unwrap();
        assert!(legacy_source(root, "c").is_err());
    }
}
