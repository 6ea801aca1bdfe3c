//! Where a task's output goes: host files the runc shim appends to (`file://`), or a logging
//! program the shim runs with both streams as pipes (`binary://`).

use std::path::{Path, PathBuf};

use crate::error::AgentError;

/// Where a task's output goes.
#[derive(Debug, Clone, Default)]
pub struct TaskIo {
    /// Host file that receives stdout (appended); `None` discards it.
    pub stdout: Option<PathBuf>,
    /// Host file that receives stderr; `None` discards it.
    pub stderr: Option<PathBuf>,
    /// A logging program the shim starts with both streams as pipes (a `binary://` URI);
    /// when set, `stdout` and `stderr` are not used.
    pub program: Option<LogProgram>,
}

/// A program containerd's shim runs for a task's output: `path ARG VALUE...`, one pair per
/// entry of `args` (the shim passes them in no fixed order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogProgram {
    /// Absolute path of the executable.
    pub path: PathBuf,
    /// Argument pairs.
    pub args: Vec<(String, String)>,
}

impl TaskIo {
    /// Both streams appended to one host log file.
    pub fn log_file(path: impl Into<PathBuf>) -> Self {
        let p = path.into();
        Self {
            stdout: Some(p.clone()),
            stderr: Some(p),
            program: None,
        }
    }

    /// Both streams piped into `program`.
    pub fn log_program(program: LogProgram) -> Self {
        Self {
            program: Some(program),
            ..Self::default()
        }
    }
}

/// The URI of one output stream: the task's logging program (the same URI for both streams),
/// else `file`.
pub(crate) fn stdio_uri(io: &TaskIo, file: Option<&Path>) -> Result<String, AgentError> {
    match &io.program {
        Some(p) => binary_uri(p),
        None => file_uri(file),
    }
}

/// The stdio URI the runc shim opens as an append-only host file.
pub(crate) fn file_uri(path: Option<&Path>) -> Result<String, AgentError> {
    match path {
        None => Ok(String::new()),
        Some(p) if p.is_absolute() => Ok(format!("file://{}", p.display())),
        Some(p) => Err(AgentError::InvalidArgument(format!(
            "task log path {} must be absolute",
            p.display()
        ))),
    }
}

/// The stdio URI of a logging program: `binary://PATH?ARG=VALUE&...`. containerd's runc shim
/// (1.6, `pkg/process/io.go`, `NewBinaryIO` and `newBinaryCmd`) parses it with Go's `net/url`
/// and passes each query key and its first value as two arguments, in map (random) order; every
/// byte outside the unreserved set is percent-encoded here so paths come back unchanged.
pub(crate) fn binary_uri(program: &LogProgram) -> Result<String, AgentError> {
    let path = program.path.to_str().filter(|p| p.starts_with('/'));
    let Some(path) = path else {
        return Err(AgentError::InvalidArgument(format!(
            "log program path {} must be absolute and UTF-8",
            program.path.display()
        )));
    };
    let query: Vec<String> = program
        .args
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k, false), percent_encode(v, false)))
        .collect();
    Ok(format!(
        "binary://{}?{}",
        percent_encode(path, true),
        query.join("&")
    ))
}

/// Percent-encodes every byte but ASCII letters, digits and `-._~` (and `/` in a path).
fn percent_encode(s: &str, path: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (path && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris() {
        assert_eq!(file_uri(None).unwrap(), "");
        assert_eq!(
            file_uri(Some(Path::new("/var/log/b.log"))).unwrap(),
            "file:///var/log/b.log"
        );
        assert!(file_uri(Some(Path::new("rel.log"))).is_err());
    }

    #[test]
    fn binary_uris_encode_what_url_parsing_would_change() {
        let p = LogProgram {
            path: "/opt/my bin/memoh-agent".into(),
            args: vec![
                ("memoh-server-log".into(), "/var/lib/a+b/server.log".into()),
                ("keep".into(), "2".into()),
            ],
        };
        assert_eq!(
            binary_uri(&p).unwrap(),
            "binary:///opt/my%20bin/memoh-agent?memoh-server-log=%2Fvar%2Flib%2Fa%2Bb%2Fserver.log&keep=2"
        );
        let io = TaskIo::log_program(p.clone());
        assert_eq!(stdio_uri(&io, None).unwrap(), binary_uri(&p).unwrap());
        let rel = LogProgram {
            path: "memoh-agent".into(),
            args: Vec::new(),
        };
        assert!(binary_uri(&rel).is_err());
    }
}
