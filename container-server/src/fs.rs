//! Filesystem operations behind the file RPCs. Blocking functions: the service runs them on
//! tokio's blocking pool. Writes are atomic (temp file in the same directory, then rename).

use std::fs::{self, File, Metadata};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::error::ServerError;
use crate::mode::{go_mode_string, rfc3339_local};
use crate::paths::base_name;
use crate::window::{read_window, Window, WindowSpec};

/// Mode of files the server creates.
pub const NEW_FILE_MODE: u32 = 0o644;
/// Mode of directories the server creates.
pub const NEW_DIR_MODE: u32 = 0o755;
/// Mode of files a `bridgepb` write creates (WIRE-BRIDGE.md section 3).
pub const BRIDGE_FILE_MODE: u32 = 0o600;
/// Mode of directories a `bridgepb` call creates (WIRE-BRIDGE.md section 3).
pub const BRIDGE_DIR_MODE: u32 = 0o750;

/// Which protocol called: the two share every handler, but WIRE-BRIDGE.md section 3 changed
/// some behaviour of `bridgepb` callers without a new field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// `mcpcontainer.ContainerService` (WIRE.md).
    Mcp,
    /// `bridgepb.ContainerService` (WIRE-BRIDGE.md).
    Bridge,
}

impl Caller {
    /// Mode of the directories this caller's writes create.
    pub fn dir_mode(self) -> u32 {
        match self {
            Caller::Mcp => NEW_DIR_MODE,
            Caller::Bridge => BRIDGE_DIR_MODE,
        }
    }
}

/// One entry of a listing or a stat, in domain form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Name, relative path or base name, depending on the call.
    pub path: String,
    /// The entry is a directory.
    pub is_dir: bool,
    /// `st_size`.
    pub size: i64,
    /// Go `FileMode.String()` form.
    pub mode: String,
    /// RFC 3339 modification time, local zone.
    pub mod_time: String,
}

impl Entry {
    /// The entry of `md`, named `path`.
    pub(crate) fn from_metadata(path: String, md: &Metadata) -> Self {
        Self {
            path,
            is_dir: md.is_dir(),
            size: md.size() as i64,
            mode: go_mode_string(md.mode()),
            mod_time: rfc3339_local(md.mtime()),
        }
    }
}

/// `ReadFile`: the window of a regular file (numbered or raw lines, by `spec`).
pub fn read_file(path: &Path, spec: WindowSpec) -> Result<Window, ServerError> {
    let f = File::open(path).map_err(|e| ServerError::io(path, e))?;
    let md = f.metadata().map_err(|e| ServerError::io(path, e))?;
    if md.is_dir() {
        return Err(ServerError::IsDirectory(path.to_path_buf()));
    }
    let w = read_window(BufReader::with_capacity(64 * 1024, f), spec)
        .map_err(|e| ServerError::io(path, e))?;
    if w.too_large {
        return Err(ServerError::TooLarge(format!(
            "{}: the lines asked for exceed the {}-byte message limit; ask for fewer lines or \
             use ReadRaw",
            path.display(),
            memoh_proto::limits::MAX_MESSAGE_SIZE
        )));
    }
    Ok(w)
}

/// Opens a file for `ReadRaw`, refusing directories.
pub fn open_for_read(path: &Path) -> Result<File, ServerError> {
    let f = File::open(path).map_err(|e| ServerError::io(path, e))?;
    let md = f.metadata().map_err(|e| ServerError::io(path, e))?;
    if md.is_dir() {
        return Err(ServerError::IsDirectory(path.to_path_buf()));
    }
    Ok(f)
}

/// Creates `dir` and its missing parents with mode 0755.
pub fn create_dirs(dir: &Path) -> Result<(), ServerError> {
    create_dirs_mode(dir, NEW_DIR_MODE)
}

/// Creates `dir` and its missing parents with `mode`.
fn create_dirs_mode(dir: &Path, mode: u32) -> Result<(), ServerError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| ServerError::io(dir, e))
}

/// A file being written: bytes go to a temp file next to the target, which replaces the target
/// only on [`AtomicFile::commit`]. Dropping it without committing leaves the target untouched.
pub struct AtomicFile {
    target: PathBuf,
    tmp: tempfile::NamedTempFile,
    mode: u32,
    owner: Option<(u32, u32)>,
    written: u64,
}

impl AtomicFile {
    /// Prepares to replace `path` for an `mcpcontainer` caller: creates missing parents
    /// (0755), keeps an existing file's permission bits and owner (new files get 0644), follows
    /// a symlink to its target.
    pub fn create(path: &Path) -> Result<Self, ServerError> {
        Self::create_as(path, Caller::Mcp)
    }

    /// Prepares to replace `path` by `caller`'s rules: [`AtomicFile::create`] for
    /// [`Caller::Mcp`]; for [`Caller::Bridge`] missing parents get 0750, the temp file is
    /// `.<name>.tmp-*` beside `path`, and the result is a new 0600 file owned by the server
    /// that replaces whatever was at `path`: the old mode and owner are lost and a symlink is
    /// replaced, not followed.
    pub fn create_as(path: &Path, caller: Caller) -> Result<Self, ServerError> {
        let existing = fs::symlink_metadata(path);
        if caller == Caller::Bridge {
            match existing {
                Ok(md) if md.is_dir() => return Err(ServerError::IsDirectory(path.to_path_buf())),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ServerError::io(path, e)),
            }
            return Self::in_parent(path.to_path_buf(), BRIDGE_FILE_MODE, None, caller);
        }
        let mut target = path.to_path_buf();
        let mut mode = NEW_FILE_MODE;
        let mut owner = None;
        match existing {
            Ok(md) if md.file_type().is_symlink() => {
                // Write through the link as the Go server does, keeping the link itself.
                if let Ok(real) = fs::canonicalize(path) {
                    target = real;
                    if let Ok(md) = fs::metadata(&target) {
                        mode = md.mode() & 0o7777;
                        owner = Some((md.uid(), md.gid()));
                    }
                }
            }
            Ok(md) if md.is_dir() => return Err(ServerError::IsDirectory(path.to_path_buf())),
            Ok(md) => {
                mode = md.mode() & 0o7777;
                owner = Some((md.uid(), md.gid()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ServerError::io(path, e)),
        }
        Self::in_parent(target, mode, owner, caller)
    }

    /// Makes the temp file in `target`'s directory (created first when missing).
    fn in_parent(
        target: PathBuf,
        mode: u32,
        owner: Option<(u32, u32)>,
        caller: Caller,
    ) -> Result<Self, ServerError> {
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("/"))
            .to_path_buf();
        create_dirs_mode(&parent, caller.dir_mode())?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (prefix, suffix) = match caller {
            Caller::Mcp => (format!(".{name}."), ".tmp"),
            Caller::Bridge => (format!(".{name}.tmp-"), ""),
        };
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(suffix)
            .tempfile_in(&parent)
            .map_err(|e| ServerError::io(&parent, e))?;
        Ok(Self {
            target,
            tmp,
            mode,
            owner,
            written: 0,
        })
    }

    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ServerError> {
        self.tmp
            .as_file_mut()
            .write_all(data)
            .map_err(|e| ServerError::io(&self.target, e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Sets mode and owner, then renames the temp file over the target.
    pub fn commit(self) -> Result<u64, ServerError> {
        let f = self.tmp.as_file();
        f.set_permissions(fs::Permissions::from_mode(self.mode))
            .map_err(|e| ServerError::io(&self.target, e))?;
        if let Some((uid, gid)) = self.owner {
            // Only root can give a file away; elsewhere the owner is already right or cannot be.
            if let Err(e) = std::os::unix::fs::fchown(f, Some(uid), Some(gid)) {
                if e.raw_os_error() != Some(libc::EPERM) {
                    return Err(ServerError::io(&self.target, e));
                }
            }
        }
        let written = self.written;
        self.tmp
            .persist(&self.target)
            .map_err(|e| ServerError::io(&self.target, e.error))?;
        Ok(written)
    }
}

/// `WriteFile`: replaces the file with `content` atomically.
pub fn write_file(path: &Path, content: &[u8]) -> Result<(), ServerError> {
    write_file_as(path, content, Caller::Mcp)
}

/// `WriteFile` by `caller`'s rules (see [`AtomicFile::create_as`]).
pub fn write_file_as(path: &Path, content: &[u8], caller: Caller) -> Result<(), ServerError> {
    let mut f = AtomicFile::create_as(path, caller)?;
    f.write(content)?;
    f.commit().map(|_| ())
}

/// `ListDir`: children sorted by name, or every descendant in pre-order with paths relative to
/// `dir`. Symlinks are reported as links and never descended into.
pub fn list_dir(dir: &Path, recursive: bool) -> Result<Vec<Entry>, ServerError> {
    let md = fs::metadata(dir).map_err(|e| ServerError::io(dir, e))?;
    if !md.is_dir() {
        return Err(ServerError::NotDirectory(dir.to_path_buf()));
    }
    let mut out = Vec::new();
    if !recursive {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(|e| ServerError::io(dir, e))?
            .filter_map(|e| match e {
                Ok(e) => Some(e),
                Err(err) => {
                    warn!(dir = %dir.display(), error = %err, "skipping unreadable entry");
                    None
                }
            })
            .collect();
        names.sort_by_key(|a| a.file_name());
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            match fs::symlink_metadata(e.path()) {
                Ok(md) => out.push(Entry::from_metadata(name, &md)),
                Err(err) => warn!(path = %e.path().display(), error = %err, "skipping entry"),
            }
        }
        return Ok(out);
    }
    let walker = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for item in walker {
        match item {
            Ok(e) => {
                let rel = e
                    .path()
                    .strip_prefix(dir)
                    .unwrap_or(e.path())
                    .to_string_lossy()
                    .into_owned();
                match e.metadata() {
                    Ok(md) => out.push(Entry::from_metadata(rel, &md)),
                    Err(err) => warn!(path = %e.path().display(), error = %err, "skipping entry"),
                }
            }
            Err(err) => warn!(dir = %dir.display(), error = %err, "skipping unreadable entry"),
        }
    }
    Ok(out)
}

/// `Stat`: follows symlinks; the entry's path is the base name of the cleaned path.
pub fn stat(path: &Path) -> Result<Entry, ServerError> {
    let md = fs::metadata(path).map_err(|e| ServerError::io(path, e))?;
    Ok(Entry::from_metadata(base_name(path), &md))
}

/// `Mkdir`: creates the directory and all missing parents.
pub fn mkdir(path: &Path) -> Result<(), ServerError> {
    mkdir_as(path, Caller::Mcp)
}

/// `Mkdir` by `caller`'s rules: the new directories get [`Caller::dir_mode`] (0755 for
/// `mcpcontainer`, 0750 for the bridge).
pub fn mkdir_as(path: &Path, caller: Caller) -> Result<(), ServerError> {
    if let Ok(md) = fs::metadata(path) {
        if !md.is_dir() {
            return Err(ServerError::NotDirectory(path.to_path_buf()));
        }
    }
    create_dirs_mode(path, caller.dir_mode())
}

/// `Rename`: creates the new path's parent first.
pub fn rename(old: &Path, new: &Path) -> Result<(), ServerError> {
    rename_as(old, new, Caller::Mcp)
}

/// `Rename` by `caller`'s rules: a missing `old` is NOT_FOUND for both; the new path's missing
/// parents get [`Caller::dir_mode`].
pub fn rename_as(old: &Path, new: &Path, caller: Caller) -> Result<(), ServerError> {
    fs::symlink_metadata(old).map_err(|e| ServerError::io(old, e))?;
    if let Some(parent) = new.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs_mode(parent, caller.dir_mode())?;
    }
    fs::rename(old, new).map_err(|e| ServerError::io(new, e))
}

/// `DeleteFile`: a missing path succeeds; a directory needs `recursive` unless it is empty.
pub fn delete(path: &Path, recursive: bool) -> Result<(), ServerError> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ServerError::io(path, e)),
    };
    let r = if md.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(|e| ServerError::io(path, e)),
    }
}

/// Creates the data directory and copies each regular file of `template` into it when no file
/// of that name is there yet. A missing template directory is not an error.
pub fn seed_data_dir(data_dir: &Path, template: &Path) -> Result<usize, ServerError> {
    create_dirs(data_dir)?;
    let entries = match fs::read_dir(template) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ServerError::io(template, e)),
    };
    let mut copied = 0;
    for e in entries {
        let e = e.map_err(|err| ServerError::io(template, err))?;
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_file() {
            continue;
        }
        let dest = data_dir.join(e.file_name());
        if fs::symlink_metadata(&dest).is_ok() {
            continue;
        }
        let mut src = File::open(e.path()).map_err(|err| ServerError::io(e.path(), err))?;
        let mut buf = Vec::new();
        src.read_to_end(&mut buf)
            .map_err(|err| ServerError::io(e.path(), err))?;
        write_file(&dest, &buf)?;
        copied += 1;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_keeps_mode_and_replaces_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/f.txt");
        write_file(&p, b"hello world").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello world");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(
            fs::metadata(d.path().join("a")).unwrap().mode() & 0o7777,
            0o755
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        write_file(&p, b"hi").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hi");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        // No temp files left behind.
        assert_eq!(fs::read_dir(d.path().join("a/b")).unwrap().count(), 1);
    }

    #[test]
    fn aborted_write_leaves_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_file(&p, b"old").unwrap();
        let mut w = AtomicFile::create(&p).unwrap();
        w.write(b"new partial").unwrap();
        drop(w);
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_through_symlink_keeps_link() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        write_file(&real, b"1").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_file(&link, b"2").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&real).unwrap(), b"2");
    }

    #[test]
    fn bridge_writes_replace_with_0600_and_never_follow() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        write_file(&real, b"1").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_file_as(&link, b"2", Caller::Bridge).unwrap();
        let md = fs::symlink_metadata(&link).unwrap();
        assert!(md.is_file(), "the link itself was replaced");
        assert_eq!(md.mode() & 0o7777, 0o600);
        assert_eq!(fs::read(&real).unwrap(), b"1", "the target is untouched");
        write_file_as(&real, b"3", Caller::Bridge).unwrap();
        assert_eq!(
            fs::metadata(&real).unwrap().mode() & 0o7777,
            0o600,
            "old mode lost"
        );
        write_file_as(&d.path().join("n/m/f"), b"4", Caller::Bridge).unwrap();
        assert_eq!(
            fs::metadata(d.path().join("n/m")).unwrap().mode() & 0o7777,
            0o750
        );
        let mut w = AtomicFile::create_as(&d.path().join("n/m/f"), Caller::Bridge).unwrap();
        w.write(b"partial").unwrap();
        let names: Vec<String> = fs::read_dir(d.path().join("n/m"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.starts_with(".f.tmp-")), "{names:?}");
        drop(w);
        assert_eq!(fs::read_dir(d.path().join("n/m")).unwrap().count(), 1);
        assert_eq!(fs::read(d.path().join("n/m/f")).unwrap(), b"4");
        rename_as(&real, &d.path().join("r/s/real"), Caller::Bridge).unwrap();
        assert_eq!(
            fs::metadata(d.path().join("r")).unwrap().mode() & 0o7777,
            0o750
        );
        let e = rename_as(&real, &d.path().join("x"), Caller::Bridge).unwrap_err();
        assert!(matches!(e, ServerError::NotFound(_)), "{e}");
    }

    #[test]
    fn delete_rules() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x");
        write_file(&dir.join("f"), b"1").unwrap();
        assert!(matches!(
            delete(&dir, false),
            Err(ServerError::DirectoryNotEmpty(_))
        ));
        delete(&dir, true).unwrap();
        assert!(!dir.exists());
        delete(&dir, false).unwrap();
    }

    #[test]
    fn recursive_listing_is_preorder_sorted() {
        let d = tempfile::tempdir().unwrap();
        for p in ["b/z", "b/a", "a", "c/d/e"] {
            write_file(&d.path().join(p), b"").unwrap();
        }
        std::os::unix::fs::symlink("/", d.path().join("l")).unwrap();
        let names: Vec<_> = list_dir(d.path(), true)
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(names, ["a", "b", "b/a", "b/z", "c", "c/d", "c/d/e", "l"]);
        let top: Vec<_> = list_dir(d.path(), false)
            .unwrap()
            .into_iter()
            .map(|e| (e.path, e.mode.chars().next().unwrap()))
            .collect();
        assert_eq!(
            top,
            [('a', '-'), ('b', 'd'), ('c', 'd'), ('l', 'L')].map(|(n, m)| (n.to_string(), m))
        );
    }

    #[test]
    fn seeding_copies_only_missing_files() {
        let d = tempfile::tempdir().unwrap();
        let tpl = d.path().join("tpl");
        let data = d.path().join("data");
        write_file(&tpl.join("a.md"), b"template a").unwrap();
        write_file(&tpl.join("b.md"), b"template b").unwrap();
        fs::create_dir_all(tpl.join("sub")).unwrap();
        write_file(&data.join("a.md"), b"mine").unwrap();
        assert_eq!(seed_data_dir(&data, &tpl).unwrap(), 1);
        assert_eq!(fs::read(data.join("a.md")).unwrap(), b"mine");
        assert_eq!(fs::read(data.join("b.md")).unwrap(), b"template b");
        assert!(!data.join("sub").exists());
        assert_eq!(seed_data_dir(&data, &d.path().join("none")).unwrap(), 0);
    }
}
