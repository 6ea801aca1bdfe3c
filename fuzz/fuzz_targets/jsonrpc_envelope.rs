//! Fuzzes `jsonrpc_envelope`: see `memoh_agent::fuzz_checks::jsonrpc_envelope_check` for the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    memoh_agent::fuzz_checks::jsonrpc_envelope_check(data);
});
