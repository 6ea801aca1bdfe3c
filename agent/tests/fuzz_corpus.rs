//! Replays the committed cargo-fuzz corpora and findings of this crate's fuzz targets (see
//! `tests/support/fuzz_replay.rs`).

#[path = "../../tests/support/fuzz_replay.rs"]
mod fuzz_replay;

use memoh_agent::fuzz_checks::{
    cni_result_check, edit_matcher_check, image_ref_check, jsonrpc_envelope_check,
};

fn replay(target: &str, check: fn(&[u8])) {
    fuzz_replay::replay(env!("CARGO_MANIFEST_DIR"), target, check);
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
