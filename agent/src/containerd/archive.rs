//! Reading image archives: OCI layouts (`index.json`, `blobs/sha256/...`) and Docker
//! `save` archives (`manifest.json` with `Config`, `RepoTags`, `Layers`).
//!
//! Synchronous; callers run it under `spawn_blocking`. A first pass keeps small entries
//! (indexes, manifests, configs) in memory and notes the size of the rest; a second pass
//! streams the wanted large entries out in chunks.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path};

use serde::Deserialize;

use crate::error::AgentError;

/// Entries up to this size are kept in memory by the first pass.
pub(crate) const SMALL_ENTRY: u64 = 4 << 20;

/// Annotation holding the full image name (containerd's export writes it).
pub(crate) const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// Annotation holding a reference or just a tag (OCI).
pub(crate) const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What the first pass found.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// Small regular entries by normalised path.
    pub small: HashMap<String, Vec<u8>>,
    /// Size of every regular entry.
    pub sizes: HashMap<String, u64>,
    /// Symlinks and hard links: path -> normalised target path.
    pub links: HashMap<String, String>,
}

impl Scanned {
    /// Follows links to the entry that holds the bytes.
    pub(crate) fn resolve<'a>(&'a self, mut path: &'a str) -> &'a str {
        for _ in 0..16 {
            match self.links.get(path) {
                Some(t) => path = t,
                None => break,
            }
        }
        path
    }

    /// Bytes of a small entry.
    pub(crate) fn small(&self, path: &str) -> Option<&[u8]> {
        self.small.get(self.resolve(path)).map(Vec::as_slice)
    }
}

fn archive_err(path: &Path, reason: impl Into<String>) -> AgentError {
    AgentError::Image {
        reference: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Normalises a path inside the archive: no leading `./` or `/`, no `..`.
pub(crate) fn clean(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_string()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

fn link_target(entry_path: &str, target: &Path, hard: bool) -> Option<String> {
    if hard || target.is_absolute() {
        return clean(target);
    }
    let base = Path::new(entry_path).parent().unwrap_or(Path::new(""));
    clean(&base.join(target))
}

/// First pass over the archive.
pub(crate) fn scan(path: &Path) -> Result<Scanned, AgentError> {
    let file = File::open(path).map_err(|e| AgentError::io(path, e))?;
    scan_reader(path, file)
}

pub(crate) fn scan_reader(path: &Path, reader: impl Read) -> Result<Scanned, AgentError> {
    let mut out = Scanned::default();
    let mut ar = tar::Archive::new(reader);
    let entries = ar
        .entries()
        .map_err(|e| archive_err(path, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_err(path, format!("bad tar entry: {e}")))?;
        let Some(name) = entry.path().ok().and_then(|p| clean(&p)) else {
            continue;
        };
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            if let Some(t) = entry
                .link_name()
                .ok()
                .flatten()
                .and_then(|t| link_target(&name, &t, kind.is_hard_link()))
            {
                out.links.insert(name, t);
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        out.sizes.insert(name.clone(), size);
        if size <= SMALL_ENTRY {
            let mut buf = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut buf)
                .map_err(|e| archive_err(path, format!("reading {name}: {e}")))?;
            out.small.insert(name, buf);
        }
    }
    if out.sizes.is_empty() {
        return Err(archive_err(path, "empty archive"));
    }
    Ok(out)
}

/// Second pass: calls `sink(path, chunk)` for every chunk of every wanted entry, in archive
/// order, and `sink(path, &[])` once at the end of each. A sink error stops the pass.
pub(crate) fn stream_entries(
    path: &Path,
    wanted: &HashSet<String>,
    mut sink: impl FnMut(&str, &[u8]) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let file = File::open(path).map_err(|e| AgentError::io(path, e))?;
    let mut ar = tar::Archive::new(file);
    let entries = ar
        .entries()
        .map_err(|e| archive_err(path, format!("not a tar archive: {e}")))?;
    let mut buf = vec![0u8; super::content::CHUNK];
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_err(path, format!("bad tar entry: {e}")))?;
        let Some(name) = entry.path().ok().and_then(|p| clean(&p)) else {
            continue;
        };
        if !entry.header().entry_type().is_file() || !wanted.contains(&name) {
            continue;
        }
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| archive_err(path, format!("reading {name}: {e}")))?;
            if n == 0 {
                break;
            }
            sink(&name, &buf[..n])?;
        }
        sink(&name, &[])?;
    }
    Ok(())
}

/// One entry of a Docker archive's `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DockerManifestEntry {
    /// Path of the config JSON.
    pub config: String,
    /// `name:tag` references.
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars, bottom first.
    pub layers: Vec<String>,
}

/// Parses a Docker archive's `manifest.json`.
pub(crate) fn docker_manifest(bytes: &[u8]) -> Result<Vec<DockerManifestEntry>, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("manifest.json: {e}"))
}

/// Path of a blob inside an OCI layout.
pub(crate) fn blob_path(digest: &str) -> Option<String> {
    let (algo, hex) = digest.split_once(':')?;
    if algo.is_empty() || hex.is_empty() || hex.contains('/') || algo.contains('/') {
        return None;
    }
    Some(format!("blobs/{algo}/{hex}"))
}

/// Media type of a layer tar judged by its first bytes (gzip and zstd magic).
pub(crate) fn layer_media_type(first_bytes: &[u8]) -> &'static str {
    if first_bytes.starts_with(&[0x1f, 0x8b]) {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        for (name, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, name, target).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn scans_small_entries_and_links() {
        let data = tar_of(
            &[("./index.json", b"{}"), ("blobs/sha256/abc", b"xyz")],
            &[("a/layer.tar", "../blobs/sha256/abc")],
        );
        let s = scan_reader(Path::new("t.tar"), data.as_slice()).unwrap();
        assert_eq!(s.small("index.json"), Some(&b"{}"[..]));
        assert_eq!(s.resolve("a/layer.tar"), "blobs/sha256/abc");
        assert_eq!(s.small("a/layer.tar"), Some(&b"xyz"[..]));
        assert_eq!(s.sizes["blobs/sha256/abc"], 3);
    }

    #[test]
    fn not_a_tar() {
        let e = scan_reader(Path::new("t.tar"), &b"hello world, not a tar"[..]).unwrap_err();
        assert!(matches!(e, AgentError::Image { .. }), "{e}");
    }

    #[test]
    fn paths() {
        assert_eq!(clean(Path::new("./a/b")).as_deref(), Some("a/b"));
        assert_eq!(clean(Path::new("/a/../b")).as_deref(), Some("b"));
        assert_eq!(clean(Path::new("..")), None);
        assert_eq!(blob_path("sha256:ab").as_deref(), Some("blobs/sha256/ab"));
        assert_eq!(blob_path("sha256:a/b"), None);
        assert_eq!(blob_path("nocolon"), None);
    }

    #[test]
    fn docker_manifest_parses() {
        let m = docker_manifest(
            br#"[{"Config":"c.json","RepoTags":["busybox:latest"],"Layers":["l/layer.tar"]}]"#,
        )
        .unwrap();
        assert_eq!(m[0].config, "c.json");
        assert_eq!(m[0].repo_tags.as_ref().unwrap()[0], "busybox:latest");
        assert_eq!(m[0].layers, vec!["l/layer.tar".to_string()]);
    }

    #[test]
    fn media_types_by_magic() {
        assert!(layer_media_type(&[0x1f, 0x8b, 8]).ends_with("+gzip"));
        assert!(layer_media_type(b"plain").ends_with(".tar"));
    }
}
