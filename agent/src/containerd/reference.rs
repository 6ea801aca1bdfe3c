//! Image references: parsing and normalisation to containerd's full names.
//!
//! Rules (DESIGN.md): a name without `/` lives in `docker.io/library/`; a first segment that
//! contains `.` or `:` or is `localhost` names a registry and stays; anything else gets
//! `docker.io/`. A reference without tag or digest gets `:latest`.

use std::fmt;

use crate::error::AgentError;

/// The registry of references that name none.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// Longest reference accepted, before and after normalisation.
pub const MAX_REF_LEN: usize = 4096;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host, with port when one was given (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/busybox`, `memohai/mcp`).
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Content digest (`sha256:...`) when the reference pins one.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalises `reference`.
    pub fn parse(reference: &str) -> Result<Self, AgentError> {
        let bad = |reason: &str| AgentError::InvalidImageRef {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        if reference.is_empty() {
            return Err(bad("empty reference"));
        }
        if reference.len() > MAX_REF_LEN {
            return Err(bad("reference is too long"));
        }
        if reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad("contains whitespace"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest).map_err(|r| bad(&r))?;
                (rest, Some(digest.to_string()))
            }
            None => (reference, None),
        };
        // A tag is whatever follows the last ':' after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                check_tag(tag).map_err(|r| bad(&r))?;
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(bad("missing repository name"));
        }
        let segments: Vec<&str> = name.split('/').collect();
        let first = segments[0];
        let has_registry = segments.len() > 1
            && (first.contains('.') || first.contains(':') || first == "localhost");
        let (mut registry, path) = if has_registry {
            check_registry(first).map_err(|r| bad(&r))?;
            (first.to_string(), &segments[1..])
        } else {
            (DEFAULT_REGISTRY.to_string(), &segments[..])
        };
        if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            registry = DEFAULT_REGISTRY.to_string();
        }
        for seg in path {
            check_path_segment(seg).map_err(|r| bad(&r))?;
        }
        let mut repository = path.join("/");
        if registry == DEFAULT_REGISTRY && path.len() == 1 {
            repository = format!("library/{repository}");
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (tag, _) => tag,
        };
        let r = Self {
            registry,
            repository,
            tag,
            digest,
        };
        // Checked on the full name too, so a normalised reference always parses again
        // (`a` x 4090 is short enough, `docker.io/library/a...a:latest` is not).
        if r.to_string().len() > MAX_REF_LEN {
            return Err(bad("normalised reference is too long"));
        }
        Ok(r)
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Normalises an image reference to the full name containerd stores
/// (`busybox` becomes `docker.io/library/busybox:latest`).
pub fn normalize_image_ref(reference: &str) -> Result<String, AgentError> {
    ImageRef::parse(reference).map(|r| r.to_string())
}

fn check_digest(digest: &str) -> Result<(), String> {
    let (algo, hex) = digest
        .split_once(':')
        .ok_or_else(|| format!("digest {digest:?} lacks an algorithm"))?;
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(format!("unsupported digest algorithm {algo:?}")),
    };
    if hex.len() != want
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("digest must be {want} lowercase hex digits"));
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid tag {tag:?}"))
    }
}

fn check_registry(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !name.starts_with(['.', '-'])
        && !name.ends_with(['.', '-']);
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    if name_ok && port_ok {
        Ok(())
    } else {
        Err(format!("invalid registry {host:?}"))
    }
}

fn check_path_segment(seg: &str) -> Result<(), String> {
    let ok = !seg.is_empty()
        && seg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && seg.as_bytes()[0].is_ascii_alphanumeric()
        && seg.as_bytes()[seg.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid repository component {seg:?}: use lowercase letters, digits and '.', '_', '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalises() {
        let digest_ref = format!("busybox@{D}");
        let digest_out = format!("docker.io/library/busybox@{D}");
        let tag_digest = format!("127.0.0.1:5000/memohai/mcp:test@{D}");
        let cases: Vec<(&str, String)> = vec![
            ("busybox", "docker.io/library/busybox:latest".into()),
            ("busybox:1.36", "docker.io/library/busybox:1.36".into()),
            ("memohai/mcp", "docker.io/memohai/mcp:latest".into()),
            ("memohai/mcp:latest", "docker.io/memohai/mcp:latest".into()),
            (
                "docker.io/memohai/mcp",
                "docker.io/memohai/mcp:latest".into(),
            ),
            (
                "docker.io/busybox",
                "docker.io/library/busybox:latest".into(),
            ),
            (
                "index.docker.io/memohai/mcp",
                "docker.io/memohai/mcp:latest".into(),
            ),
            ("localhost/x", "localhost/x:latest".into()),
            ("localhost:5000/x", "localhost:5000/x:latest".into()),
            (
                "127.0.0.1:5000/memohai/mcp:test",
                "127.0.0.1:5000/memohai/mcp:test".into(),
            ),
            ("ghcr.io/a/b/c:v1.2-rc_3", "ghcr.io/a/b/c:v1.2-rc_3".into()),
            (digest_ref.as_str(), digest_out),
            (tag_digest.as_str(), tag_digest.clone()),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_image_ref(input).unwrap(), want, "input {input:?}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        let cases = [
            "",
            " busybox",
            "busy box",
            "Busybox",
            "memohai/MCP",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a//b",
            "/a",
            "a/",
            "localhost:99999/x",
            "bad_host:5000/x:latest:tag",
            ":latest",
        ];
        let long = "a".repeat(MAX_REF_LEN - 6);
        for input in cases.iter().copied().chain([long.as_str()]) {
            let err = normalize_image_ref(input).expect_err(input);
            assert!(
                matches!(err, AgentError::InvalidImageRef { .. }),
                "{input:?}: {err}"
            );
        }
    }

    #[test]
    fn parts() {
        let r = ImageRef::parse("127.0.0.1:5000/memohai/mcp:test").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "memohai/mcp");
        assert_eq!(r.tag.as_deref(), Some("test"));
        assert_eq!(r.name(), "127.0.0.1:5000/memohai/mcp");
    }
}
