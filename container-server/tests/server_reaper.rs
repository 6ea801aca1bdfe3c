//! The reaper when many commands end at once, in both of its modes: `reap_all` (PID 1,
//! `wait4(-1)`) and registered-only. A pid is registered after its spawn returns, so a child
//! can end, and in `reap_all` mode be reaped, before anyone waits for it: its exit must still
//! reach its waiter, with its real status, and nothing may hang.
//!
//! A file of its own: in `reap_all` mode the reaper takes every child of the test process,
//! which would take those of other tests. The tests here run one at a time for the same
//! reason.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use container_server::exec::{self, ExecEvent, ExecSpec};
use container_server::reaper::{Exit, Reaper};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One test at a time: a `reap_all` reaper would take the other tests' children.
static SERIAL: Mutex<()> = Mutex::new(());

/// Bound of each whole test: a lost exit shows as this timeout, not as a hang.
const BOUND: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `command` through the server's exec to its end; returns its exit code.
async fn run(reaper: Reaper, command: String) -> i32 {
    let spec = ExecSpec::new(
        command,
        std::env::temp_dir(),
        &[],
        30,
        Duration::from_secs(30),
        Bytes::new(),
    )
    .unwrap();
    let running = exec::start(spec, &reaper).unwrap();
    let (_stdin_tx, stdin_rx) = mpsc::channel(1);
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(running.drive(
        stdin_rx,
        tx,
        CancellationToken::new(),
        CancellationToken::new(),
    ));
    while let Some(ev) = rx.recv().await {
        if let ExecEvent::Exit(code, usage) = ev {
            assert!(
                usage.is_some(),
                "{code}: no resource use, the exit was lost"
            );
            return code;
        }
    }
    panic!("the stream ended without an exit");
}

/// 200 commands started at once, each ending with its own code at once.
async fn distinct_codes_at_once(reaper: &Reaper) {
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let reaper = reaper.clone();
            tokio::spawn(async move { (n, run(reaper, format!("exit {n}")).await) })
        })
        .collect();
    for t in tasks {
        let (n, code) = t.await.unwrap();
        assert_eq!(code, n, "exit {n}");
    }
}

/// 64 callers, each running `true` 20 times in a row.
async fn true_under_load(reaper: &Reaper) {
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let reaper = reaper.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    assert_eq!(run(reaper.clone(), "true".into()).await, 0);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// A child that ended (and in `reap_all` mode was reaped) before its pid was registered:
/// registering it delivers its real status at once.
async fn registered_after_its_end(reaper: &Reaper, reap_all: bool) {
    let child = std::process::Command::new("/bin/sh")
        .args(["-c", "exit 7"])
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    drop(child);
    // Wait until it ended: a zombie, or (reap_all) reaped and gone.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        let ended = match &stat {
            Ok(s) => s
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => true,
        };
        if ended && (!reap_all || stat.is_err()) {
            break;
        }
        assert!(Instant::now() < until, "pid {pid} did not end");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let kept = reaper.early_exits();
    if reap_all {
        assert!(kept >= 1, "the reaper keeps the exit of pid {pid}");
    }
    let mut rx = reaper.register(pid);
    let reaped = rx.try_recv().expect("the status is there at once");
    assert_eq!(reaped.exit, Exit::Code(7));
    assert!(reaped.usage.is_some(), "the real status, not a lost one");
    if reap_all {
        assert_eq!(
            reaper.early_exits(),
            kept - 1,
            "the kept exit was handed over"
        );
    }
}

fn in_mode(reap_all: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    runtime().block_on(async {
        let reaper = Reaper::start(reap_all).unwrap();
        tokio::time::timeout(BOUND, async {
            registered_after_its_end(&reaper, reap_all).await;
            distinct_codes_at_once(&reaper).await;
            true_under_load(&reaper).await;
        })
        .await
        .expect("every exit reached its waiter within the bound");
    });
}

#[test]
fn every_exit_reaches_its_waiter_when_reaping_all_children() {
    in_mode(true);
}

#[test]
fn every_exit_reaches_its_waiter_when_reaping_registered_children() {
    in_mode(false);
}
