//! The agent's one way of taking a `std` mutex.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking over a lock a panicking holder poisoned: every state the agent keeps
/// behind such a mutex is updated in single steps (inserts, removes, counters), so a panic
/// elsewhere cannot leave it half-written.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
