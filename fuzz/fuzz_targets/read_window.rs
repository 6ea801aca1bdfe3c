//! Fuzzes `read_window`: see `container_server::fuzz_checks::read_window_check` for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    container_server::fuzz_checks::read_window_check(data);
});
