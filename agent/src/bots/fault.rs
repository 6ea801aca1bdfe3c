//! The test-only fault hook of the lifecycle: with `MEMOH_FAULT_SNAPSHOT_STEP=STEP` in its
//! environment the agent aborts at that step, as a crash would (system tests use it).

use tracing::warn;

/// Environment variable naming the step at which the agent aborts (fault tests only): a cycle
/// step, `1` to `5`, or `create`, between a new bot's snapshot and its container record; a
/// live version's `live-paused`, `live-diff` (while containerd writes the layer), `live-blob`,
/// `live-manifest`, `live-record`; a rollback's `rollback-kept`, `rollback-prepared`,
/// `rollback-moved`.
pub const FAULT_ENV: &str = "MEMOH_FAULT_SNAPSHOT_STEP";

/// Aborts the process when the fault hook names `step`.
pub fn fault(step: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|v| v == step) {
        warn!(step, "fault injection: aborting the agent");
        std::process::abort();
    }
}

/// Environment variable naming a step at which the agent waits (fault tests only), so a test
/// can kill containerd while the agent is there; [`HOLD_MS_ENV`] says how long.
pub const HOLD_ENV: &str = "MEMOH_FAULT_HOLD_STEP";
/// How long the agent waits at [`HOLD_ENV`]'s step, in milliseconds (default 3000).
pub const HOLD_MS_ENV: &str = "MEMOH_FAULT_HOLD_MS";

/// Waits at `step` when the hold hook names it.
pub async fn hold(step: &str) {
    if std::env::var(HOLD_ENV).is_ok_and(|v| v == step) {
        let ms = std::env::var(HOLD_MS_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        warn!(step, ms, "fault injection: holding the agent");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
