//! Fuzzes `cni_result`: see `memoh_agent::fuzz_checks::cni_result_check` for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    memoh_agent::fuzz_checks::cni_result_check(data);
});
