//! The server's tokio runtime, made so the server keeps answering while its bot is at its
//! process limit (`pids.max`) or memory limit: every thread the server needs for calls that
//! start no process exists before the bot can use up its pids, and is kept.
//!
//! - [`build`]: the multi-thread runtime, its workers and [`KEPT_BLOCKING_THREADS`] blocking
//!   threads started at boot and, like any blocking thread made later (at most
//!   [`MAX_BLOCKING_THREADS`]), kept for the life of the server (tokio would otherwise let an
//!   idle blocking thread exit after ten seconds and make a new one on the next call, which
//!   fails once the bot's processes fill `pids.max`, and panics when the pool is empty).
//! - [`spawn_blocking`]: tokio's `spawn_blocking` that answers [`ServerError::AtLimit`] where
//!   tokio would panic because no thread could be made.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::error::{BotLimit, ServerError};

/// Blocking threads made at boot. Beyond these tokio makes more when it can, up to
/// [`MAX_BLOCKING_THREADS`]; at the bot's process limit, work waits for a free one instead.
pub const KEPT_BLOCKING_THREADS: usize = 8;

/// The most blocking threads the server ever has. Every thread made is kept (an idle one never
/// exits), so this bounds the pids the server itself takes from its bot's `pids.max`: at most
/// this many plus the workers and the main thread. Long transfers (ReadRaw, WriteRaw) hold a
/// thread each for their duration; past this many at once, blocking work queues.
pub const MAX_BLOCKING_THREADS: usize = 32;

/// How long an idle blocking thread lives: for the life of the server.
const KEEP_ALIVE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long boot waits for the kept threads to start together.
const PRESTART_WAIT: Duration = Duration::from_secs(5);

/// Builds the server's runtime and starts its kept blocking threads. A bot already at its limit
/// at boot gets a server with fewer kept threads (logged), not none at all.
pub fn build() -> std::io::Result<Runtime> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("container-server")
        .thread_keep_alive(KEEP_ALIVE)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()?;
    let started = prestart(&rt, KEPT_BLOCKING_THREADS);
    if started < KEPT_BLOCKING_THREADS {
        warn!(
            started,
            wanted = KEPT_BLOCKING_THREADS,
            "could not start every kept blocking thread"
        );
    }
    Ok(rt)
}

/// Makes the runtime's blocking pool hold `n` threads: `n` tasks that each wait until all `n`
/// run at once, so each needs a thread of its own. Returns how many started together.
pub fn prestart(rt: &Runtime, n: usize) -> usize {
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let _entered = rt.enter();
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let arrived = arrived.clone();
        let task = spawn_blocking(move || {
            let (count, cv) = &*arrived;
            let mut c = count.lock().unwrap_or_else(|p| p.into_inner());
            *c += 1;
            cv.notify_all();
            // A bot at its limit at boot: stop waiting for threads that cannot come.
            let _ = cv.wait_timeout_while(c, PRESTART_WAIT, |c| *c < n);
        });
        match task {
            Ok(h) => handles.push(h),
            Err(_) => break,
        }
    }
    rt.block_on(async {
        for h in handles {
            let _ = h.await;
        }
    });
    let started = *arrived.0.lock().unwrap_or_else(|p| p.into_inner());
    started
}

/// Runs `f` on the blocking pool. Where tokio cannot make a thread for it and has none to
/// queue it on, it panics; that becomes [`ServerError::AtLimit`] here, so the call gets a
/// clear status instead of a reset stream.
pub fn spawn_blocking<F, T>(f: F) -> Result<JoinHandle<T>, ServerError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::panic::catch_unwind(AssertUnwindSafe(|| tokio::task::spawn_blocking(f))).map_err(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        warn!(panic = text, "no thread for blocking work");
        let limit = if text.contains(&format!("(os error {})", libc::ENOMEM)) {
            BotLimit::Memory
        } else {
            BotLimit::Process
        };
        ServerError::AtLimit {
            what: "a worker thread",
            limit,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of this process named by [`build`] (`comm` keeps 15 bytes of the name).
    fn server_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| "container-server".starts_with(c.trim()))
            })
            .count()
    }

    #[test]
    fn kept_threads_start_at_boot_and_serve_the_work() {
        let rt = build().unwrap();
        let at_boot = server_threads();
        assert!(
            at_boot > KEPT_BLOCKING_THREADS,
            "{at_boot} threads after boot"
        );
        // Work runs on the kept threads without making more. Tokio makes a thread when it sees
        // none idle, and a thread whose task just ended counts as idle a moment later: each
        // call waits for that moment, so only the kept threads can serve.
        let sum = rt.block_on(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut sum = 0;
            for i in 0..20 {
                sum += spawn_blocking(move || i).unwrap().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sum
        });
        assert_eq!(sum, (0..20).sum::<usize>());
        assert_eq!(server_threads(), at_boot, "threads after the work");

        // Bursts wider than the kept threads make more, never past the bound, and none exit.
        rt.block_on(async {
            for _ in 0..3 {
                let handles: Vec<_> = (0..2 * MAX_BLOCKING_THREADS)
                    .map(|_| {
                        spawn_blocking(|| std::thread::sleep(Duration::from_millis(20))).unwrap()
                    })
                    .collect();
                for h in handles {
                    h.await.unwrap();
                }
            }
        });
        let after = server_threads();
        assert!(
            (at_boot..=at_boot - KEPT_BLOCKING_THREADS + MAX_BLOCKING_THREADS).contains(&after),
            "{after} threads after bursts, {at_boot} at boot"
        );
    }
}
