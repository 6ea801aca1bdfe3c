//! Fuzzes `edit_matcher`: see `memoh_agent::fuzz_checks::edit_matcher_check` for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    memoh_agent::fuzz_checks::edit_matcher_check(data);
});
