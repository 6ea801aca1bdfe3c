//! Anchored NoFollow I/O, `bridgepb` ReadRawNoFollow and WriteRawNoFollow (WIRE-BRIDGE.md
//! section 3): a file named by a `root` and a `relative_path` beneath it, reached without
//! following any symlink, never leaving `root`.
//!
//! How `root` relates to the data directory: it does not. `root` must be absolute (the bridge's
//! host always sends absolute roots) and is used as it is, cleaned lexically like any absolute
//! request path ([`crate::paths::clean`]; with no symlink allowed on the way, the lexical and
//! the real path agree); a relative `root` is refused rather than joined to the data
//! directory, so a caller never gets a root it did not name. The container is the sandbox and
//! the server may touch any path inside it: what the NoFollow calls add is that nothing on the
//! way, `root` included, is a symlink, and that the result stays beneath `root`.
//!
//! Every lookup starts from `/` and goes through `openat2(2)` with
//! `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS` (nix's wrapper of the raw
//! `SYS_openat2` call with a zeroed `struct open_how`). Where the kernel has no `openat2`
//! (ENOSYS, Linux < 5.6) the same lookup walks the path one component at a time with
//! `openat(O_PATH|O_NOFOLLOW)`, refusing any component that is a symlink (magic links are
//! symlinks to `lstat`) or not a directory; `..`, `.` and empty components never reach it
//! ([`Target::new`] refuses them), so the walk cannot leave `root` either.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use memoh_proto::limits::MAX_PATH_LEN;
use memoh_proto::pb::mcpcontainer as pb;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, mkdirat, Mode, SFlag};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::warn;

use crate::error::ServerError;
use crate::paths::clean;
use crate::service::{blocking, BoxStream};
use crate::transfer::{self, inbound_error, Piece, Sink};

/// Mode of the directories WriteRawNoFollow makes.
pub const DIR_MODE: u32 = 0o750;
/// Mode of the file WriteRawNoFollow makes.
pub const FILE_MODE: u32 = 0o600;

/// How lookups are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// One `openat2(2)` per lookup, the kernel refusing symlinks and escapes.
    Openat2,
    /// Component by component with `openat(O_NOFOLLOW)`, for kernels without `openat2`.
    Walk,
}

/// Set once `openat2` answered ENOSYS: every later lookup walks.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);
/// The test hook of [`force_walk`].
static FORCE_WALK: AtomicBool = AtomicBool::new(false);

/// Test hook: makes every later lookup of this process walk as on a kernel without `openat2`
/// (`true`), or use `openat2` again where the kernel has it (`false`).
#[doc(hidden)]
pub fn force_walk(on: bool) {
    FORCE_WALK.store(on, Ordering::SeqCst);
}

impl Lookup {
    /// `openat2` unless the kernel lacks it (or the [`force_walk`] hook is on).
    pub fn current() -> Self {
        if FORCE_WALK.load(Ordering::SeqCst) || NO_OPENAT2.load(Ordering::Relaxed) {
            Lookup::Walk
        } else {
            Lookup::Openat2
        }
    }
}

/// A validated `root` and `relative_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The cleaned absolute root, `/` included.
    root: String,
    /// Relative, clean, without `..`.
    rel: String,
}

impl Target {
    /// Checks the request's fields: `root` absolute; `relative_path` non-empty, relative,
    /// already clean (no empty, `.` or trailing elements), without `..`; neither with a NUL
    /// byte nor longer than `PATH_MAX`. Anything else is INVALID_ARGUMENT naming the field.
    pub fn new(root: &str, relative_path: &str) -> Result<Self, ServerError> {
        let bad = |m: &str| Err(ServerError::InvalidArgument(m.to_string()));
        for (field, v) in [("root", root), ("relative_path", relative_path)] {
            if v.is_empty() {
                return bad(&format!("{field} is empty"));
            }
            if v.len() > MAX_PATH_LEN {
                return bad(&format!(
                    "{field} is {} bytes long; the limit is {MAX_PATH_LEN}",
                    v.len()
                ));
            }
            if v.contains('\0') {
                return bad(&format!("{field} contains a NUL byte"));
            }
        }
        if !root.starts_with('/') {
            return bad("root must be an absolute path");
        }
        if relative_path.starts_with('/') {
            return bad("relative_path must be relative to root, not absolute");
        }
        if relative_path.split('/').any(|c| c == "..") {
            return bad("relative_path must not contain '..'");
        }
        if relative_path == "." || clean(relative_path) != relative_path {
            return bad(
                "relative_path must be clean: no empty or '.' elements, no trailing '/', \
                 naming an entry beneath root",
            );
        }
        Ok(Self {
            root: clean(root),
            rel: relative_path.to_string(),
        })
    }

    /// The full path, for messages.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.root).join(&self.rel)
    }

    /// `root` relative to `/`, `None` for `/` itself.
    fn root_rel(&self) -> Option<&str> {
        Some(self.root.trim_start_matches('/')).filter(|r| !r.is_empty())
    }

    /// Maps a lookup's errno: ENOENT NOT_FOUND, EEXIST ALREADY_EXISTS, any other refusal
    /// FAILED_PRECONDITION.
    fn error(&self, e: Errno) -> ServerError {
        let path = self.path();
        let reason = match e {
            Errno::ENOENT => return ServerError::NotFound(path),
            Errno::EEXIST => return ServerError::AlreadyExists(path),
            Errno::ELOOP => "a symlink is on the path".to_string(),
            Errno::EXDEV => "the path leaves its root".to_string(),
            Errno::ENOTDIR => "a component of the path is not a directory".to_string(),
            other => std::io::Error::from(other).to_string().to_lowercase(),
        };
        ServerError::Refused { path, reason }
    }
}

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

/// Opens `rel` beneath `dir` with `flags` (plus `O_NOFOLLOW|O_CLOEXEC`), symlinks refused.
fn beneath(
    how: Lookup,
    dir: BorrowedFd<'_>,
    rel: &str,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if how == Lookup::Openat2 {
        let open_how = OpenHow::new().flags(flags).mode(mode).resolve(RESOLVE);
        // EAGAIN: a rename or mount raced the lookup; the kernel asks for a retry.
        let mut tries = 0;
        loop {
            match openat2(dir, rel, open_how) {
                Err(Errno::EAGAIN) if tries < 8 => tries += 1,
                Err(Errno::ENOSYS) => {
                    if !NO_OPENAT2.swap(true, Ordering::Relaxed) {
                        warn!("openat2 is not available: NoFollow lookups walk the path instead");
                    }
                    break;
                }
                r => return r,
            }
        }
    }
    walk(dir, rel, flags, mode)
}

/// The lookup without `openat2`: every component but the last must be a directory, not a
/// symlink; the last is opened with `O_NOFOLLOW`.
fn walk(dir: BorrowedFd<'_>, rel: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
    let mut parts = rel.split('/');
    let last = parts.next_back().unwrap_or(".");
    let mut cur: Option<OwnedFd> = None;
    for part in parts {
        let at = cur.as_ref().map_or(dir, |f| f.as_fd());
        cur = Some(dir_component(at, part)?);
    }
    if matches!(last, "" | "." | "..") {
        // Target::new never lets these through; refuse rather than trust it.
        return Err(Errno::EXDEV);
    }
    let at = cur.as_ref().map_or(dir, |f| f.as_fd());
    openat(at, last, flags, mode)
}

/// One directory component of a walk: not a symlink, a directory.
fn dir_component(at: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, Errno> {
    if matches!(name, "" | "." | "..") {
        return Err(Errno::EXDEV);
    }
    let fd = openat(
        at,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    check_dir(fd)
}

/// `fd` if it is a directory: ELOOP for a symlink, ENOTDIR for anything else.
fn check_dir(fd: OwnedFd) -> Result<OwnedFd, Errno> {
    let kind = SFlag::from_bits_truncate(fstat(&fd)?.st_mode) & SFlag::S_IFMT;
    match kind {
        SFlag::S_IFDIR => Ok(fd),
        SFlag::S_IFLNK => Err(Errno::ELOOP),
        _ => Err(Errno::ENOTDIR),
    }
}

/// Opens the directory `rel` beneath `dir` as an `O_PATH` handle, symlinks refused.
fn open_dir(how: Lookup, dir: BorrowedFd<'_>, rel: &str) -> Result<OwnedFd, Errno> {
    check_dir(beneath(how, dir, rel, OFlag::O_PATH, Mode::empty())?)
}

/// Opens `root` from `/`, the root itself looked up like everything else.
fn open_root(how: Lookup, t: &Target) -> Result<OwnedFd, Errno> {
    let slash = nix::fcntl::open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    match t.root_rel() {
        None => Ok(slash),
        Some(r) => open_dir(how, slash.as_fd(), r),
    }
}

/// Opens the target for ReadRawNoFollow: `O_RDONLY|O_NOFOLLOW|O_NONBLOCK` (a FIFO does not
/// block the open; `O_NOCTTY` too, so a terminal never becomes the server's), then refuses
/// anything but a regular file.
pub fn open_read(how: Lookup, t: &Target) -> Result<File, ServerError> {
    let root = open_root(how, t).map_err(|e| t.error(e))?;
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let fd = beneath(how, root.as_fd(), &t.rel, flags, Mode::empty()).map_err(|e| t.error(e))?;
    let st = fstat(&fd).map_err(|e| t.error(e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(ServerError::Refused {
            path: t.path(),
            reason: "not a regular file".into(),
        });
    }
    Ok(File::from(fd))
}

/// Creates the target for WriteRawNoFollow: missing parents made with `mkdirat` (0750), each
/// opened beneath the one before; then the file made in one lookup from a fresh handle of
/// `root`, `O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW`, 0600. No temp file: an existing entry is
/// ALREADY_EXISTS and stays as it was.
pub fn create(how: Lookup, t: &Target) -> Result<NoFollowFile, ServerError> {
    let mut dir = open_root(how, t).map_err(|e| t.error(e))?;
    if let Some((parents, _)) = t.rel.rsplit_once('/') {
        for part in parents.split('/') {
            match mkdirat(dir.as_fd(), part, Mode::from_bits_truncate(DIR_MODE)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(t.error(e)),
            }
            dir = open_dir(how, dir.as_fd(), part).map_err(|e| t.error(e))?;
        }
    }
    drop(dir);
    // The final lookup starts again from `/`: a parent swapped for a symlink since the walk
    // above is refused here.
    let fresh = open_root(how, t).map_err(|e| t.error(e))?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
    let mode = Mode::from_bits_truncate(FILE_MODE);
    let fd = beneath(how, fresh.as_fd(), &t.rel, flags, mode).map_err(|e| t.error(e))?;
    Ok(NoFollowFile {
        file: File::from(fd),
        path: t.path(),
        written: 0,
    })
}

/// The file of a WriteRawNoFollow upload. Dropped uncommitted (an abort), it keeps what was
/// written: there is no temp file.
pub struct NoFollowFile {
    file: File,
    path: PathBuf,
    written: u64,
}

impl Sink for NoFollowFile {
    fn write(&mut self, data: &[u8]) -> Result<(), ServerError> {
        self.file
            .write_all(data)
            .map_err(|e| ServerError::io(&self.path, e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn commit(self) -> Result<u64, ServerError> {
        Ok(self.written)
    }
}

/// ReadRawNoFollow: the target's bytes as a stream of `DataChunk`s (as ReadRaw streams).
pub async fn read(root: &str, relative_path: &str) -> Result<BoxStream<pb::DataChunk>, Status> {
    let t = Target::new(root, relative_path)?;
    let how = Lookup::current();
    let path = t.path();
    let file = blocking(move || open_read(how, &t)).await?;
    Ok(transfer::stream_file(file, path)?)
}

/// One WriteRawNoFollow chunk in domain form; the path fields count in the first only.
#[derive(Debug, Default)]
pub struct Chunk {
    /// `root`.
    pub root: String,
    /// `relative_path`.
    pub relative_path: String,
    /// `data` and `abort`.
    pub piece: Piece,
}

/// WriteRawNoFollow: creates the target from the first chunk's path fields and appends every
/// chunk's data; no chunk is INVALID_ARGUMENT; `abort` is ABORTED and keeps the partial file.
/// Returns the bytes written.
pub async fn write(mut inbound: BoxStream<Chunk>, kill: CancellationToken) -> Result<u64, Status> {
    let first = match inbound.next().await.transpose().map_err(inbound_error)? {
        Some(m) => m,
        None => {
            return Err(ServerError::InvalidArgument(
                "write stream closed before its first chunk".into(),
            )
            .into())
        }
    };
    let t = Target::new(&first.root, &first.relative_path)?;
    if first.piece.abort {
        return Err(ServerError::Aborted("the client aborted the upload".into()).into());
    }
    let how = Lookup::current();
    let file = blocking(move || create(how, &t)).await?;
    let rest = inbound.map(|r| r.map(|c| c.piece));
    let first_data: Bytes = first.piece.data;
    transfer::upload(file, first_data, Box::pin(rest), kill).await
}

#[cfg(test)]
#[path = "anchored_tests.rs"]
mod tests;
