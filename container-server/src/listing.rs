//! ListDir for `bridgepb` callers (WIRE-BRIDGE.md section 3, ListDir): `max_entries`
//! counted while walking (the walk stops at entry max + 1), `collapse_threshold` folding big
//! top-level subdirectories into one summary entry, recursive listings sorted by path bytewise
//! (`a`, `a.txt`, `a/b`), unreadable subdirectories skipped and an unreadable listed directory
//! NOT_FOUND. Paging happens after this, in [`crate::bridge::list_dir_page`].
//!
//! Memory stays bounded by what is returned: a collapsed subdirectory keeps a count, not its
//! entries, once it passed the threshold.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use tracing::warn;

use crate::error::ServerError;
use crate::fs::Entry;

/// What to list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListSpec {
    /// Every descendant, not only the children.
    pub recursive: bool,
    /// Above 0, recursive only: a top-level subdirectory with more descendants than this is
    /// folded into one summary entry.
    pub collapse_threshold: i32,
    /// Above 0: a listing of more entries than this (before folding) is RESOURCE_EXHAUSTED.
    pub max_entries: i32,
}

/// One entry of a bridge listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The entry (`path` relative to the listed directory).
    pub entry: Entry,
    /// `FileEntry.summary`: set on a folded subdirectory, `<N> items (not expanded)`.
    pub summary: String,
}

impl Listed {
    fn plain(entry: Entry) -> Self {
        Self {
            entry,
            summary: String::new(),
        }
    }

    /// The entry standing for the `n` descendants of the top-level subdirectory `dir`.
    pub fn folded(dir: &str, n: usize) -> Self {
        Self {
            entry: Entry {
                path: format!("{dir}/"),
                is_dir: true,
                size: 0,
                mode: String::new(),
                mod_time: String::new(),
            },
            summary: format!("{n} items (not expanded)"),
        }
    }
}

/// Counts entries against `max_entries`.
struct Budget {
    max: usize,
    seen: usize,
}

impl Budget {
    fn new(max_entries: i32) -> Self {
        Self {
            max: usize::try_from(max_entries).unwrap_or(0),
            seen: 0,
        }
    }

    fn take(&mut self) -> Result<(), ServerError> {
        self.seen += 1;
        if self.max > 0 && self.seen > self.max {
            return Err(ServerError::TooManyEntries(format!(
                "listing has more than max_entries ({}) entries",
                self.max
            )));
        }
        Ok(())
    }
}

/// The descendants of one top-level subdirectory, kept until they pass the threshold.
#[derive(Default)]
struct Bucket {
    count: usize,
    kept: Vec<Entry>,
}

/// Lists `dir` by `spec` for a `bridgepb` caller, sorted by path bytewise.
pub fn list(dir: &Path, spec: ListSpec) -> Result<Vec<Listed>, ServerError> {
    // Anything that keeps the directory itself from being read is NOT_FOUND to the bridge.
    let md = fs::metadata(dir).map_err(|_| ServerError::NotFound(dir.to_path_buf()))?;
    if !md.is_dir() {
        return Err(ServerError::NotDirectory(dir.to_path_buf()));
    }
    let mut budget = Budget::new(spec.max_entries);
    let mut out = if spec.recursive {
        walk(dir, spec, &mut budget)?
    } else {
        children(dir, &mut budget)?
    };
    sort_by_path(&mut out);
    Ok(out)
}

/// Sorts by path, bytewise: `a`, `a.txt`, `a/`, `a/b`.
pub fn sort_by_path(entries: &mut [Listed]) {
    entries.sort_by(|a, b| a.entry.path.as_bytes().cmp(b.entry.path.as_bytes()));
}

fn children(dir: &Path, budget: &mut Budget) -> Result<Vec<Listed>, ServerError> {
    let rd = fs::read_dir(dir).map_err(|_| ServerError::NotFound(dir.to_path_buf()))?;
    let mut out = Vec::new();
    for e in rd {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                warn!(dir = %dir.display(), error = %err, "skipping unreadable entry");
                continue;
            }
        };
        let name = e.file_name().to_string_lossy().into_owned();
        match fs::symlink_metadata(e.path()) {
            Ok(md) => {
                budget.take()?;
                out.push(Listed::plain(Entry::from_metadata(name, &md)));
            }
            Err(err) => warn!(path = %e.path().display(), error = %err, "skipping entry"),
        }
    }
    Ok(out)
}

fn walk(dir: &Path, spec: ListSpec, budget: &mut Budget) -> Result<Vec<Listed>, ServerError> {
    let threshold = usize::try_from(spec.collapse_threshold).unwrap_or(0);
    let mut out = Vec::new();
    let mut buckets: BTreeMap<String, Bucket> = BTreeMap::new();
    let walker = walkdir::WalkDir::new(dir).min_depth(1).follow_links(false);
    for item in walker {
        let e = match item {
            Ok(e) => e,
            Err(err) if err.depth() == 0 => {
                warn!(dir = %dir.display(), error = %err, "cannot read the listed directory");
                return Err(ServerError::NotFound(dir.to_path_buf()));
            }
            Err(err) => {
                warn!(dir = %dir.display(), error = %err, "skipping unreadable entry");
                continue;
            }
        };
        let md = match e.metadata() {
            Ok(md) => md,
            Err(err) => {
                warn!(path = %e.path().display(), error = %err, "skipping entry");
                continue;
            }
        };
        budget.take()?;
        let rel = e
            .path()
            .strip_prefix(dir)
            .unwrap_or(e.path())
            .to_string_lossy()
            .into_owned();
        let entry = Entry::from_metadata(rel, &md);
        if threshold == 0 || e.depth() == 1 {
            out.push(Listed::plain(entry));
            continue;
        }
        let top = entry.path.split('/').next().unwrap_or_default().to_string();
        let b = buckets.entry(top).or_default();
        b.count += 1;
        if b.count > threshold {
            // Folded: the count is all that is needed from here on.
            b.kept = Vec::new();
        } else {
            b.kept.push(entry);
        }
    }
    for (top, b) in buckets {
        if b.count > threshold {
            out.push(Listed::folded(&top, b.count));
        } else {
            out.extend(b.kept.into_iter().map(Listed::plain));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for p in [
            "a/b/c", "a/x", "big/1", "big/2", "big/3/4", "small/1", "a.txt", "z",
        ] {
            let p = d.path().join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, "").unwrap();
        }
        std::os::unix::fs::symlink("/", d.path().join("link")).unwrap();
        d
    }

    fn paths(v: &[Listed]) -> Vec<String> {
        v.iter()
            .map(|l| {
                if l.summary.is_empty() {
                    l.entry.path.clone()
                } else {
                    format!("{} [{}]", l.entry.path, l.summary)
                }
            })
            .collect()
    }

    fn spec(recursive: bool, collapse: i32, max: i32) -> ListSpec {
        ListSpec {
            recursive,
            collapse_threshold: collapse,
            max_entries: max,
        }
    }

    #[test]
    fn recursive_sorts_bytewise() {
        let d = tree();
        let all = list(d.path(), spec(true, 0, 0)).unwrap();
        let want = [
            "a", "a.txt", "a/b", "a/b/c", "a/x", "big", "big/1", "big/2", "big/3", "big/3/4",
            "link", "small", "small/1", "z",
        ];
        assert_eq!(paths(&all), want);
        let top = list(d.path(), spec(false, 1, 0)).unwrap();
        assert_eq!(paths(&top), ["a", "a.txt", "big", "link", "small", "z"]);
    }

    #[test]
    fn collapse_folds_big_top_level_dirs() {
        let d = tree();
        // big has 4 descendants, a 3, small 1.
        let got = list(d.path(), spec(true, 3, 0)).unwrap();
        let want = [
            "a",
            "a.txt",
            "a/b",
            "a/b/c",
            "a/x",
            "big",
            "big/ [4 items (not expanded)]",
            "link",
            "small",
            "small/1",
            "z",
        ];
        assert_eq!(paths(&got), want);
        let folded = got.iter().find(|l| !l.summary.is_empty()).unwrap();
        assert!(folded.entry.is_dir);
        let got = list(d.path(), spec(true, 1, 0)).unwrap();
        let want = [
            "a",
            "a.txt",
            "a/ [3 items (not expanded)]",
            "big",
            "big/ [4 items (not expanded)]",
            "link",
            "small",
            "small/1",
            "z",
        ];
        assert_eq!(paths(&got), want);
        // Threshold equal to the count keeps every entry.
        let got = list(d.path(), spec(true, 4, 0)).unwrap();
        assert!(got.iter().all(|l| l.summary.is_empty()));
        assert_eq!(got.len(), 14);
    }

    #[test]
    fn max_entries_counts_before_collapse() {
        let d = tree();
        assert_eq!(list(d.path(), spec(true, 1, 14)).unwrap().len(), 9);
        let e = list(d.path(), spec(true, 1, 13)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("max_entries (13)"), "{e}");
        assert!(list(d.path(), spec(false, 0, 5)).is_err());
        assert_eq!(list(d.path(), spec(false, 0, 6)).unwrap().len(), 6);
    }

    #[test]
    fn missing_dir_is_not_found_and_file_is_not_a_dir() {
        let d = tree();
        let e = list(&d.path().join("none"), spec(true, 0, 0)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = list(&d.path().join("z"), spec(false, 0, 0)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
