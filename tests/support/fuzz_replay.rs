//! Replays the committed cargo-fuzz inputs of a target through the invariant check its fuzz
//! target runs, so CI on stable catches regressions: the minimized corpus
//! (`fuzz/corpus/<target>/`) and the findings kept for good (`fuzz/regressions/<target>/`,
//! which minimizing never drops). Shared by the server's and the agent's `fuzz_corpus` tests.

use std::path::{Path, PathBuf};

/// Runs `check` on every input of `target`; `crate_dir` is the calling crate's directory
/// (the workspace root is its parent, or itself for the root crate).
pub fn replay(crate_dir: &str, target: &str, check: fn(&[u8])) {
    // The run-time variable first: a test binary in a shared target directory may have been
    // built from another checkout.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(crate_dir), PathBuf::from);
    let root = if dir.join("fuzz").is_dir() {
        dir
    } else {
        dir.join("..")
    };
    let corpus = root.join("fuzz/corpus").join(target);
    let n = replay_dir(&corpus, target, check, true);
    assert!(n > 0, "corpus {} is empty", corpus.display());
    replay_dir(
        &root.join("fuzz/regressions").join(target),
        target,
        check,
        false,
    );
}

fn replay_dir(dir: &Path, target: &str, check: fn(&[u8]), must_exist: bool) -> usize {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(_) if !must_exist => return 0,
        Err(e) => panic!("corpus {} is missing: {e}", dir.display()),
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).expect("corpus file");
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(
            r.is_ok(),
            "{target}: {} breaks an invariant",
            path.display()
        );
        n += 1;
    }
    n
}
