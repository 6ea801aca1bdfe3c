//! The server's one error type and its single mapping to gRPC statuses.

use std::path::PathBuf;

use memoh_proto::limits::MAX_MESSAGE_SIZE;
use tonic::{Code, Status};

/// Everything a server operation can fail with. Messages are lowercase and name the path.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The request lacks a required field or has a malformed one.
    #[error("{0}")]
    InvalidArgument(String),
    /// The path does not exist.
    #[error("{}: no such file or directory", .0.display())]
    NotFound(PathBuf),
    /// The operation needs a file but found a directory.
    #[error("{}: is a directory", .0.display())]
    IsDirectory(PathBuf),
    /// The operation needs a directory but found something else.
    #[error("{}: not a directory", .0.display())]
    NotDirectory(PathBuf),
    /// Non-recursive delete of a directory that has entries.
    #[error("{}: directory not empty (set recursive to delete it)", .0.display())]
    DirectoryNotEmpty(PathBuf),
    /// A request message above the size limit.
    #[error("{0}")]
    TooLarge(String),
    /// The caller did not present the expected bearer token.
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    /// Any other I/O failure.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The command could not be started.
    #[error("exec: {0}")]
    Spawn(std::io::Error),
    /// A process or thread could not be made because the bot is at one of its limits
    /// (`pids.max`, its memory limit): the call cannot run now, and may later.
    #[error("cannot start {what}: the bot is at its {limit} limit")]
    AtLimit {
        /// What could not be started: "a process", "a worker thread".
        what: &'static str,
        /// The limit that stopped it.
        limit: BotLimit,
    },
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The client called the operation off (an upload chunk with `abort` set).
    #[error("{0}")]
    Aborted(String),
    /// A method or request field this server does not implement (yet): the message names it.
    #[error("{0}")]
    Unimplemented(String),
    /// A listing past the caller's `max_entries`.
    #[error("{0}")]
    TooManyEntries(String),
    /// The request asks for something the server refuses on principle (a tunnel to a
    /// non-loopback address).
    #[error("{0}")]
    PermissionDenied(String),
    /// Something the call needs cannot be reached now (a tunnel's target).
    #[error("{0}")]
    Unavailable(String),
    /// The client called the operation off with a reason (a tunnel `close` with text).
    #[error("{0}")]
    Cancelled(String),
    /// An exclusive create found the path taken (WriteRawNoFollow).
    #[error("{}: already exists", .0.display())]
    AlreadyExists(PathBuf),
    /// No process with this id (the process service).
    #[error("{0}")]
    NoSuchProcess(String),
    /// The object is in the wrong state for the operation (a process that ended, a stdin
    /// already closed, a directory that cannot be made).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bound of the server was reached (too many live processes).
    #[error("{0}")]
    Exhausted(String),
    /// An anchored (NoFollow) lookup refused the path: a symlink on it, a path leaving its
    /// root, a target that is not a regular file.
    #[error("{}: refused: {reason}", path.display())]
    Refused {
        /// The path involved.
        path: PathBuf,
        /// Why, lowercase.
        reason: String,
    },
}

/// A bot limit that can stop the server from making a process or thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BotLimit {
    /// `pids.max` of the bot's cgroup (or `RLIMIT_NPROC`): fork or clone failed with EAGAIN.
    Process,
    /// The bot's memory limit: fork, clone or the new stack failed with ENOMEM.
    Memory,
}

impl std::fmt::Display for BotLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BotLimit::Process => "process",
            BotLimit::Memory => "memory",
        })
    }
}

impl BotLimit {
    /// The limit behind a failed fork, clone or thread creation, if the errno names one.
    pub fn of(e: &std::io::Error) -> Option<Self> {
        match e.raw_os_error() {
            Some(libc::EAGAIN) => Some(BotLimit::Process),
            Some(libc::ENOMEM) => Some(BotLimit::Memory),
            _ => None,
        }
    }
}

impl ServerError {
    /// Classifies a failure to start `what` (a process or thread): EAGAIN and ENOMEM are the
    /// bot's limits ([`ServerError::AtLimit`]), anything else is [`ServerError::Spawn`].
    pub fn spawn(what: &'static str, source: std::io::Error) -> Self {
        match BotLimit::of(&source) {
            Some(limit) => Self::AtLimit { what, limit },
            None => Self::Spawn(source),
        }
    }

    /// Classifies an I/O error on `path`: a missing path is [`ServerError::NotFound`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        match source.kind() {
            std::io::ErrorKind::NotFound => Self::NotFound(path),
            std::io::ErrorKind::IsADirectory => Self::IsDirectory(path),
            std::io::ErrorKind::NotADirectory => Self::NotDirectory(path),
            std::io::ErrorKind::DirectoryNotEmpty => Self::DirectoryNotEmpty(path),
            _ => Self::Io { path, source },
        }
    }

    /// The gRPC code of this error. Exhaustive on purpose: a new variant must choose its code.
    pub fn code(&self) -> Code {
        match self {
            ServerError::InvalidArgument(_) => Code::InvalidArgument,
            ServerError::NotFound(_) => Code::NotFound,
            ServerError::IsDirectory(_) => Code::InvalidArgument,
            ServerError::NotDirectory(_) => Code::InvalidArgument,
            ServerError::DirectoryNotEmpty(_) => Code::FailedPrecondition,
            ServerError::TooLarge(_) => Code::ResourceExhausted,
            ServerError::Unauthenticated => Code::Unauthenticated,
            ServerError::Io { .. } => Code::Internal,
            ServerError::Spawn(_) => Code::Internal,
            ServerError::AtLimit { .. } => Code::ResourceExhausted,
            ServerError::ShuttingDown => Code::Unavailable,
            ServerError::Aborted(_) => Code::Aborted,
            ServerError::Unimplemented(_) => Code::Unimplemented,
            ServerError::TooManyEntries(_) => Code::ResourceExhausted,
            ServerError::PermissionDenied(_) => Code::PermissionDenied,
            ServerError::Unavailable(_) => Code::Unavailable,
            ServerError::Cancelled(_) => Code::Cancelled,
            ServerError::AlreadyExists(_) => Code::AlreadyExists,
            ServerError::Refused { .. } => Code::FailedPrecondition,
            ServerError::NoSuchProcess(_) => Code::NotFound,
            ServerError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServerError::Exhausted(_) => Code::ResourceExhausted,
        }
    }
}

/// If `s` is tonic's "decoded message length too large" error, the status clients expect
/// instead: RESOURCE_EXHAUSTED, pointing large uploads at WriteRaw.
pub fn rewrite_too_large(s: &Status) -> Option<Status> {
    if s.code() != Code::OutOfRange || !s.message().contains("message length too large") {
        return None;
    }
    let found = s
        .message()
        .split("found ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or("?");
    Some(
        ServerError::TooLarge(format!(
            "request message of {found} bytes exceeds the {MAX_MESSAGE_SIZE}-byte limit; \
             stream large files with WriteRaw"
        ))
        .into(),
    )
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn every_variant_has_its_code() {
        let p = || PathBuf::from("/data/x");
        let cases = [
            (
                ServerError::InvalidArgument("path is empty".into()),
                Code::InvalidArgument,
            ),
            (ServerError::NotFound(p()), Code::NotFound),
            (ServerError::IsDirectory(p()), Code::InvalidArgument),
            (ServerError::NotDirectory(p()), Code::InvalidArgument),
            (
                ServerError::DirectoryNotEmpty(p()),
                Code::FailedPrecondition,
            ),
            (ServerError::TooLarge("big".into()), Code::ResourceExhausted),
            (ServerError::Unauthenticated, Code::Unauthenticated),
            (
                ServerError::Io {
                    path: p(),
                    source: Error::from(ErrorKind::PermissionDenied),
                },
                Code::Internal,
            ),
            (
                ServerError::Spawn(Error::from(ErrorKind::Other)),
                Code::Internal,
            ),
            (
                ServerError::AtLimit {
                    what: "a process",
                    limit: BotLimit::Process,
                },
                Code::ResourceExhausted,
            ),
            (ServerError::ShuttingDown, Code::Unavailable),
            (
                ServerError::Aborted("the client aborted the upload".into()),
                Code::Aborted,
            ),
            (
                ServerError::Unimplemented("bridgepb Tunnel is not implemented".into()),
                Code::Unimplemented,
            ),
            (
                ServerError::TooManyEntries("more than 3 entries".into()),
                Code::ResourceExhausted,
            ),
            (
                ServerError::PermissionDenied("not a loopback address".into()),
                Code::PermissionDenied,
            ),
            (
                ServerError::Unavailable("connection refused".into()),
                Code::Unavailable,
            ),
            (
                ServerError::Cancelled("closed by the client".into()),
                Code::Cancelled,
            ),
            (ServerError::AlreadyExists(p()), Code::AlreadyExists),
            (
                ServerError::NoSuchProcess("no process x".into()),
                Code::NotFound,
            ),
            (
                ServerError::FailedPrecondition("process x has ended".into()),
                Code::FailedPrecondition,
            ),
            (
                ServerError::Exhausted("too many live processes (1)".into()),
                Code::ResourceExhausted,
            ),
            (
                ServerError::Refused {
                    path: p(),
                    reason: "a symlink is on the path".into(),
                },
                Code::FailedPrecondition,
            ),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(!s.message().is_empty());
        }
    }

    #[test]
    fn spawn_failures_name_the_limit() {
        let cases = [
            (
                libc::EAGAIN,
                Code::ResourceExhausted,
                "cannot start a process: the bot is at its process limit",
            ),
            (
                libc::ENOMEM,
                Code::ResourceExhausted,
                "cannot start a process: the bot is at its memory limit",
            ),
            (libc::ENOENT, Code::Internal, "exec: "),
        ];
        for (errno, code, msg) in cases {
            let s = Status::from(ServerError::spawn(
                "a process",
                Error::from_raw_os_error(errno),
            ));
            assert_eq!(s.code(), code, "errno {errno}: {}", s.message());
            assert!(
                s.message().starts_with(msg),
                "errno {errno}: {}",
                s.message()
            );
        }
    }

    #[test]
    fn io_classification() {
        let e = ServerError::io("/x", Error::from(ErrorKind::NotFound));
        assert!(matches!(e, ServerError::NotFound(_)));
        assert_eq!(e.to_string(), "/x: no such file or directory");
        let e = ServerError::io("/x", Error::from_raw_os_error(libc::ENOTEMPTY));
        assert!(matches!(e, ServerError::DirectoryNotEmpty(_)));
    }
}
