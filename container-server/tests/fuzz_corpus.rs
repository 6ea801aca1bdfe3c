//! Replays the committed cargo-fuzz corpora and findings of this crate's fuzz targets (see
//! `tests/support/fuzz_replay.rs`).

#[path = "../../tests/support/fuzz_replay.rs"]
mod fuzz_replay;

use container_server::fuzz_checks::{path_resolve_check, read_window_check};

fn replay(target: &str, check: fn(&[u8])) {
    fuzz_replay::replay(env!("CARGO_MANIFEST_DIR"), target, check);
}

#[test]
fn read_window_corpus() {
    replay("read_window", read_window_check);
}

#[test]
fn path_resolve_corpus() {
    replay("path_resolve", path_resolve_check);
}
