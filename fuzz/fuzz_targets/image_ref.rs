//! Fuzzes `image_ref`: see `memoh_agent::fuzz_checks::image_ref_check` for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    memoh_agent::fuzz_checks::image_ref_check(data);
});
