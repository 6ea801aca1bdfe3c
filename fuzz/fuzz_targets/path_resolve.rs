//! Fuzzes `path_resolve`: see `container_server::fuzz_checks::path_resolve_check` for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    container_server::fuzz_checks::path_resolve_check(data);
});
