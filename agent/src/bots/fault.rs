//! The test-only fault hook of the lifecycle: with `MEMOH_FAULT_SNAPSHOT_STEP=STEP` in its
//! environment the agent aborts at that step, as a crash would (system tests use it).

use tracing::warn;

/// Environment variable naming the step at which the agent aborts (fault tests only): a cycle
/// step, `1` to `5`, or `create`, between a new bot's snapshot and its container record.
pub const FAULT_ENV: &str = "MEMOH_FAULT_SNAPSHOT_STEP";

/// Aborts the process when the fault hook names `step`.
pub fn fault(step: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|v| v == step) {
        warn!(step, "fault injection: aborting the agent");
        std::process::abort();
    }
}
