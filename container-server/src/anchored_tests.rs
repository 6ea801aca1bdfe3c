//! Unit tests of the anchored lookups: validation, and every refusal under both lookups.

use std::os::unix::fs::{symlink, PermissionsExt};

use super::*;

#[test]
fn validation_table() {
    let long = "a".repeat(MAX_PATH_LEN + 1);
    let bad = [
        ("", "f", "root is empty"),
        ("data", "f", "absolute"),
        ("/data", "", "relative_path is empty"),
        ("/data", "/etc/passwd", "relative"),
        ("/data", "..", "'..'"),
        ("/data", "a/../../etc", "'..'"),
        ("/data", "a/..", "'..'"),
        ("/data", ".", "clean"),
        ("/data", "./a", "clean"),
        ("/data", "a//b", "clean"),
        ("/data", "a/./b", "clean"),
        ("/data", "a/", "clean"),
        ("/data", "a\0b", "NUL"),
        ("/da\0ta", "a", "NUL"),
        ("/data", long.as_str(), "limit"),
    ];
    for (root, rel, want) in bad {
        let e = Target::new(root, rel).unwrap_err();
        assert!(
            matches!(e, ServerError::InvalidArgument(_)),
            "{root:?} {rel:?}"
        );
        assert!(e.to_string().contains(want), "{root:?} {rel:?}: {e}");
    }
    let ok = [
        ("/data", "a", "/data/a"),
        ("/", "etc/hostname", "/etc/hostname"),
        ("/data/../srv/", "a/b.c", "/srv/a/b.c"),
        ("//data", ".hidden/..x", "/data/.hidden/..x"),
    ];
    for (root, rel, want) in ok {
        let t = Target::new(root, rel).unwrap();
        assert_eq!(t.path(), PathBuf::from(want), "{root:?} {rel:?}");
    }
}

/// A temp tree: `root/dir/f` ("hello"), `root/link_dir -> dir`, `root/link_f -> dir/f`,
/// `root/fifo`, `outside/secret`, `root/escape -> ../outside`, `root_link -> root`.
fn tree() -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("dir")).unwrap();
    std::fs::write(root.join("dir/f"), "hello").unwrap();
    std::fs::create_dir_all(d.path().join("outside")).unwrap();
    std::fs::write(d.path().join("outside/secret"), "secret").unwrap();
    symlink("dir", root.join("link_dir")).unwrap();
    symlink("dir/f", root.join("link_f")).unwrap();
    symlink("../outside", root.join("escape")).unwrap();
    symlink("root", d.path().join("root_link")).unwrap();
    nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
    let r = root.to_string_lossy().into_owned();
    (d, r)
}

fn code(r: Result<impl std::fmt::Debug, ServerError>) -> tonic::Code {
    r.unwrap_err().code()
}

#[test]
fn reads_refuse_symlinks_and_non_files_both_ways() {
    use tonic::Code::*;
    let (d, root) = tree();
    let link_root = d.path().join("root_link").to_string_lossy().into_owned();
    for how in [Lookup::Openat2, Lookup::Walk] {
        let t = |root: &str, rel: &str| Target::new(root, rel).unwrap();
        let mut f = open_read(how, &t(&root, "dir/f")).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "hello", "{how:?}");
        let cases = [
            (root.as_str(), "link_dir/f", FailedPrecondition),
            (root.as_str(), "link_f", FailedPrecondition),
            (root.as_str(), "escape/secret", FailedPrecondition),
            (root.as_str(), "fifo", FailedPrecondition),
            (root.as_str(), "dir", FailedPrecondition),
            (root.as_str(), "dir/f/x", FailedPrecondition),
            (root.as_str(), "missing", NotFound),
            (root.as_str(), "dir/missing/x", NotFound),
            (link_root.as_str(), "dir/f", FailedPrecondition),
            ("/proc/self/root", "etc", FailedPrecondition),
        ];
        for (r, rel, want) in cases {
            assert_eq!(code(open_read(how, &t(r, rel))), want, "{how:?} {r} {rel}");
        }
        let e = open_read(how, &t(&root, "link_f")).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{how:?}: {e}");
    }
}

#[test]
fn creates_exclusively_beneath_root_both_ways() {
    use tonic::Code::*;
    let (d, root) = tree();
    let rootp = PathBuf::from(&root);
    for (i, how) in [Lookup::Openat2, Lookup::Walk].into_iter().enumerate() {
        let t = |rel: &str| Target::new(&root, rel).unwrap();
        let rel = format!("new{i}/a/b/f");
        let mut f = create(how, &t(&rel)).unwrap();
        f.write(b"data").unwrap();
        assert_eq!(f.commit().unwrap(), 4);
        let p = rootp.join(&rel);
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&p) & 0o777, 0o600, "{how:?}");
        assert_eq!(mode(&rootp.join(format!("new{i}/a"))) & 0o777, 0o750);
        let cases = [
            ("dir/f", AlreadyExists),
            ("link_f", AlreadyExists),
            ("fifo", AlreadyExists),
            ("link_dir/new", FailedPrecondition),
            ("escape/new", FailedPrecondition),
            ("dir/f/new", FailedPrecondition),
        ];
        for (rel, want) in cases {
            assert_eq!(
                code(create(how, &t(rel)).map(|_| ())),
                want,
                "{how:?} {rel}"
            );
        }
        assert_eq!(std::fs::read(rootp.join("dir/f")).unwrap(), b"hello");
        assert!(!d.path().join("outside/new").exists());
        assert!(!rootp.join("dir/new").exists());
        let missing_root = Target::new(&format!("{root}/none"), "f").unwrap();
        assert_eq!(code(create(how, &missing_root).map(|_| ())), NotFound);
    }
}
