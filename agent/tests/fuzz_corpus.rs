//! Replays the committed cargo-fuzz corpora (`fuzz/corpus/<target>/`) through the same
//! invariant checks the fuzz targets run, so CI on stable catches regressions.

use std::path::PathBuf;

use memoh_agent::fuzz_checks::{
    cni_result_check, edit_matcher_check, image_ref_check, jsonrpc_envelope_check,
};

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
fn edit_matcher_corpus() {
    replay("edit_matcher", edit_matcher_check);
}

#[test]
fn cni_result_corpus() {
    replay("cni_result", cni_result_check);
}

#[test]
fn image_ref_corpus() {
    replay("image_ref", image_ref_check);
}

#[test]
fn jsonrpc_envelope_corpus() {
    replay("jsonrpc_envelope", jsonrpc_envelope_check);
}
