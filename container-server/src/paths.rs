//! Path cleaning and resolution against the data directory, as the Go server's
//! `filepath.Clean` / `filepath.Join` do it, plus validation of hostile input.

use std::path::{Path, PathBuf};

use memoh_proto::limits::MAX_PATH_LEN;

use crate::error::ServerError;

/// Cleans a slash-separated path lexically: collapses `//` and `/./`, resolves `..` against
/// earlier elements (never above the root of an absolute path), drops a trailing `/`.
/// An empty result is `.` as in Go.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".to_string(),
        (false, false) => body,
    }
}

/// Resolves request paths: absolute paths are cleaned and used as they are, relative ones are
/// joined to the data directory.
#[derive(Debug, Clone)]
pub struct Resolver {
    data_dir: PathBuf,
}

impl Resolver {
    /// A resolver for `data_dir` (which should be absolute).
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Validates and resolves a required path: empty, overlong or NUL-containing paths are
    /// `InvalidArgument` naming `field`.
    pub fn resolve(&self, field: &str, path: &str) -> Result<PathBuf, ServerError> {
        if path.is_empty() {
            return Err(ServerError::InvalidArgument(format!("{field} is empty")));
        }
        self.resolve_or_data_dir(field, path)
    }

    /// Like [`Resolver::resolve`], but an empty path means the data directory itself.
    pub fn resolve_or_data_dir(&self, field: &str, path: &str) -> Result<PathBuf, ServerError> {
        if path.len() > MAX_PATH_LEN {
            return Err(ServerError::InvalidArgument(format!(
                "{field} is {} bytes long; the limit is {MAX_PATH_LEN}",
                path.len()
            )));
        }
        if path.contains('\0') {
            return Err(ServerError::InvalidArgument(format!(
                "{field} contains a NUL byte"
            )));
        }
        if path.starts_with('/') {
            return Ok(PathBuf::from(clean(path)));
        }
        let joined = format!("{}/{}", self.data_dir.display(), path);
        Ok(PathBuf::from(clean(&joined)))
    }
}

/// Go's `filepath.Base`: the last element of a cleaned path; `/` for the root.
pub fn base_name(path: &Path) -> String {
    let s = path.to_string_lossy();
    let c = clean(&s);
    if c == "/" {
        return "/".into();
    }
    c.rsplit('/').next().unwrap_or(".").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_table() {
        let cases = [
            ("", "."),
            (".", "."),
            ("/", "/"),
            ("//", "/"),
            ("a/../b", "b"),
            ("/a/./b//c/", "/a/b/c"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("../x", "../x"),
            ("a/../../x", "../x"),
            ("sub/../f", "f"),
            ("/data/./x/../y", "/data/y"),
            ("a/b/..", "a"),
        ];
        for (input, want) in cases {
            assert_eq!(clean(input), want, "clean({input:?})");
        }
    }

    #[test]
    fn resolve_table() {
        let r = Resolver::new("/data");
        let cases = [
            ("f.txt", "/data/f.txt"),
            ("sub/../f", "/data/f"),
            ("/etc/passwd", "/etc/passwd"),
            ("/data/", "/data"),
            (".", "/data"),
            ("../etc", "/etc"),
            ("//tmp//x", "/tmp/x"),
        ];
        for (input, want) in cases {
            assert_eq!(
                r.resolve("path", input).unwrap(),
                PathBuf::from(want),
                "{input}"
            );
        }
    }

    #[test]
    fn resolve_rejects_bad_input() {
        let r = Resolver::new("/data");
        let long = "a".repeat(MAX_PATH_LEN + 1);
        for bad in ["", "a\0b", long.as_str()] {
            let e = r.resolve("path", bad).unwrap_err();
            assert!(matches!(e, ServerError::InvalidArgument(_)), "{bad:?}");
        }
        assert_eq!(
            r.resolve_or_data_dir("path", "").unwrap(),
            PathBuf::from("/data")
        );
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name(Path::new("/data")), "data");
        assert_eq!(base_name(Path::new("/")), "/");
        assert_eq!(base_name(Path::new("/a/b.txt")), "b.txt");
    }
}
