//! The agent's one error type and its mapping to gRPC statuses.

use std::path::PathBuf;

/// Everything that can go wrong in the agent. Messages are lowercase and name the problem.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration file could not be read or parsed.
    #[error("config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A bot id that does not match `[-_a-zA-Z0-9]+`.
    #[error("invalid bot id {0:?}: use letters, digits, '-' and '_'")]
    InvalidBotId(String),
    /// No such bot.
    #[error("unknown bot {0:?}")]
    UnknownBot(String),
    /// A create of a bot that exists with another spec (today: another image).
    #[error("bot {bot:?} already exists with image {have}, not {want}")]
    BotConflict {
        /// The bot.
        bot: String,
        /// The image it has.
        have: String,
        /// The image the create asked for.
        want: String,
    },
    /// The bot exists but is not running or not reachable.
    #[error("bot {bot:?} is unavailable: {reason}")]
    BotUnavailable {
        /// The bot.
        bot: String,
        /// Why.
        reason: String,
    },
    /// containerd could not be reached at all.
    #[error("containerd unreachable at {socket}: {reason}")]
    ContainerdUnreachable {
        /// The socket tried.
        socket: PathBuf,
        /// The connection error.
        reason: String,
    },
    /// A containerd call failed.
    #[error("containerd {op}: {status}")]
    Containerd {
        /// The operation, e.g. "create container mcp-a".
        op: String,
        /// containerd's answer.
        status: tonic::Status,
    },
    /// An image reference that cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidImageRef {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The image is not in containerd's image store.
    #[error("image {0:?} not found; import or pull it first")]
    ImageNotFound(String),
    /// An image archive or registry answer that cannot be used.
    #[error("image {reference:?}: {reason}")]
    Image {
        /// The image or archive.
        reference: String,
        /// What went wrong.
        reason: String,
    },
    /// A CNI plugin or network set-up step failed.
    #[error("network {op}: {reason}")]
    Network {
        /// The step, e.g. "cni add mcp-a".
        op: String,
        /// What went wrong.
        reason: String,
    },
    /// A CNI plugin ran and reported failure (its `{code, msg, details}` object, or its
    /// output when it printed none).
    #[error("cni plugin {plugin} {command} for {container} failed (code {code}): {reason}")]
    CniPlugin {
        /// The plugin type, e.g. "bridge".
        plugin: String,
        /// ADD, CHECK or DEL.
        command: String,
        /// The CNI container id.
        container: String,
        /// The CNI error code (0 when the plugin printed no error object).
        code: u64,
        /// The plugin's message and details.
        reason: String,
    },
    /// A call into a bot's container server failed.
    #[error("bot {bot:?}: {status}")]
    Bot {
        /// The bot.
        bot: String,
        /// The server's answer.
        status: tonic::Status,
    },
    /// Local I/O on the host.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A request that is malformed in another way.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Something a request names that does not exist (other than a bot or an image).
    #[error("{0}")]
    NotFound(String),
    /// The operation cannot run in the bot's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl AgentError {
    /// Builds an [`AgentError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds an [`AgentError::Containerd`].
    pub fn containerd(op: impl Into<String>, status: tonic::Status) -> Self {
        Self::Containerd {
            op: op.into(),
            status,
        }
    }
}

impl AgentError {
    /// The gRPC code of this error: the one mapping, exhaustive over the variants (a new
    /// variant must choose its code).
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            AgentError::Config { .. } => Code::FailedPrecondition,
            AgentError::InvalidBotId(_) => Code::InvalidArgument,
            AgentError::UnknownBot(_) => Code::NotFound,
            AgentError::BotConflict { .. } => Code::AlreadyExists,
            AgentError::BotUnavailable { .. } => Code::Unavailable,
            AgentError::ContainerdUnreachable { .. } => Code::Unavailable,
            AgentError::Containerd { status, .. } => match status.code() {
                Code::NotFound => Code::NotFound,
                Code::AlreadyExists => Code::AlreadyExists,
                Code::Unavailable => Code::Unavailable,
                _ => Code::Internal,
            },
            AgentError::InvalidImageRef { .. } => Code::InvalidArgument,
            AgentError::ImageNotFound(_) => Code::NotFound,
            AgentError::Image { .. } => Code::Internal,
            AgentError::Network { .. } => Code::Internal,
            AgentError::CniPlugin { .. } => Code::Internal,
            AgentError::Bot { status, .. } => status.code(),
            AgentError::Io { .. } => Code::Internal,
            AgentError::InvalidArgument(_) => Code::InvalidArgument,
            AgentError::NotFound(_) => Code::NotFound,
            AgentError::FailedPrecondition(_) => Code::FailedPrecondition,
            AgentError::Timeout(_) => Code::DeadlineExceeded,
        }
    }

    /// The HTTP status of this error, for the MCP listener: derived from [`AgentError::code`]
    /// by [`http_status_of`], so both sides of the agent answer alike.
    pub fn http_status(&self) -> u16 {
        http_status_of(self.code())
    }
}

/// The HTTP status of a gRPC code (the usual mapping of gRPC codes onto HTTP).
pub fn http_status_of(code: tonic::Code) -> u16 {
    use tonic::Code;
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::PermissionDenied => 403,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::Unauthenticated => 401,
    }
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// One case per variant (the match above is exhaustive; this pins each code), and for the
    /// pass-through variants one case per kind of inner status.
    #[test]
    fn codes() {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let cases: Vec<(AgentError, Code)> = vec![
            (
                AgentError::Config {
                    path: "/etc/memoh/agent.toml".into(),
                    reason: "bad".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                AgentError::InvalidBotId("a b".into()),
                Code::InvalidArgument,
            ),
            (AgentError::UnknownBot("x".into()), Code::NotFound),
            (
                AgentError::BotConflict {
                    bot: "x".into(),
                    have: "a".into(),
                    want: "b".into(),
                },
                Code::AlreadyExists,
            ),
            (
                AgentError::BotUnavailable {
                    bot: "x".into(),
                    reason: "stopped".into(),
                },
                Code::Unavailable,
            ),
            (
                AgentError::ContainerdUnreachable {
                    socket: "/run/containerd/containerd.sock".into(),
                    reason: "refused".into(),
                },
                Code::Unavailable,
            ),
            (
                AgentError::containerd("get", tonic::Status::not_found("nope")),
                Code::NotFound,
            ),
            (
                AgentError::containerd("create", tonic::Status::already_exists("dup")),
                Code::AlreadyExists,
            ),
            (
                AgentError::containerd("list", tonic::Status::unavailable("down")),
                Code::Unavailable,
            ),
            (
                AgentError::containerd("commit", tonic::Status::failed_precondition("x")),
                Code::Internal,
            ),
            (
                AgentError::InvalidImageRef {
                    reference: "A".into(),
                    reason: "uppercase".into(),
                },
                Code::InvalidArgument,
            ),
            (AgentError::ImageNotFound("x".into()), Code::NotFound),
            (
                AgentError::Image {
                    reference: "x".into(),
                    reason: "bad layer".into(),
                },
                Code::Internal,
            ),
            (
                AgentError::Network {
                    op: "cni add".into(),
                    reason: "no".into(),
                },
                Code::Internal,
            ),
            (
                AgentError::CniPlugin {
                    plugin: "bridge".into(),
                    command: "ADD".into(),
                    container: "mcp-x".into(),
                    code: 11,
                    reason: "no".into(),
                },
                Code::Internal,
            ),
            (
                AgentError::Bot {
                    bot: "x".into(),
                    status: tonic::Status::permission_denied("no"),
                },
                Code::PermissionDenied,
            ),
            (AgentError::io("/x", io()), Code::Internal),
            (
                AgentError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (AgentError::NotFound("x".into()), Code::NotFound),
            (
                AgentError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (AgentError::Timeout("x".into()), Code::DeadlineExceeded),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = tonic::Status::from(e);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
            assert!(!msg.is_empty());
        }
    }

    #[test]
    fn http_statuses_follow_the_grpc_codes() {
        use tonic::Code;
        let cases = [
            (Code::Ok, 200),
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ];
        for (code, http) in cases {
            assert_eq!(http_status_of(code), http, "{code:?}");
        }
        assert_eq!(AgentError::UnknownBot("x".into()).http_status(), 404);
    }
}
