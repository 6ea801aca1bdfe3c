//! Replays the committed cargo-fuzz corpora (`fuzz/corpus/<target>/`) through the same
//! invariant checks the fuzz targets run, so CI on stable catches regressions.

use std::path::PathBuf;

use container_server::fuzz_checks::{path_resolve_check, read_window_check};

fn replay(target: &str, check: fn(&[u8])) {
    // The run-time variable first: a test binary in a shared target directory may have been
    // built from another checkout.
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let dir = root.join("../fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
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
    assert!(n > 0, "corpus {} is empty", dir.display());
}

#[test]
fn read_window_corpus() {
    replay("read_window", read_window_check);
}

#[test]
fn path_resolve_corpus() {
    replay("path_resolve", path_resolve_check);
}
