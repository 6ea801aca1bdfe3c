//! Commands never inherit the server's protection from the OOM killer: with the server's own
//! `oom_score_adj` negative (as the bot's spec sets it where the host allows), a command reads
//! 0 in its own `/proc/self/oom_score_adj`; with the server unprotected (0), commands start at
//! 500. Either way a memory hog is the OOM killer's choice, not the server.
//!
//! Lowering one's own `oom_score_adj` below 0 needs CAP_SYS_RESOURCE: the first test reports a
//! skip where even root lacks it (some container hosts), and the reset itself is then tested
//! from a raised value, which needs no privilege. A file of its own because the tests change
//! the whole test process; each puts the old value back at the end, also on failure.

use std::time::Duration;

use bytes::Bytes;
use container_server::exec::{self, ChildOom, ExecEvent, ExecSpec};
use container_server::reaper::Reaper;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ADJ: &str = "/proc/self/oom_score_adj";

/// Puts the process's `oom_score_adj` back when dropped.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(ADJ, &self.0) {
            eprintln!("restoring {ADJ} to {}: {e}", self.0.trim());
        }
    }
}

/// Runs `command` through the server's exec (`oom`: the policy, or `None` for the server's
/// own choice); returns (stdout, exit code).
async fn run(command: &str, oom: Option<ChildOom>) -> (String, i32) {
    let reaper = Reaper::start(false).unwrap();
    let spec = ExecSpec::new(
        command.into(),
        std::env::temp_dir(),
        &[],
        10,
        Duration::from_secs(10),
        Bytes::new(),
    )
    .unwrap();
    let running = match oom {
        Some(oom) => exec::start_with(spec, &reaper, oom),
        None => exec::start(spec, &reaper),
    }
    .unwrap();
    let (_stdin_tx, stdin_rx) = mpsc::channel(1);
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(running.drive(
        stdin_rx,
        tx,
        CancellationToken::new(),
        CancellationToken::new(),
    ));
    let mut out = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            ExecEvent::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
            ExecEvent::Stderr(b) => eprint!("{}", String::from_utf8_lossy(&b)),
            ExecEvent::Exit(code, _) => return (out, code),
        }
    }
    panic!("exec ended without an exit status");
}

/// The tests below change the process's own value: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_do_not_inherit_a_protective_oom_score_adj() {
    let _one = ONE_AT_A_TIME.lock().await;
    let old = std::fs::read_to_string(ADJ).unwrap();
    let _restore = Restore(old.clone());
    if let Err(e) = std::fs::write(ADJ, "-900") {
        // Where even root lacks CAP_SYS_RESOURCE, the mechanism is still tested below.
        println!("skipped: lowering {ADJ} needs CAP_SYS_RESOURCE ({e})");
        return;
    }
    assert_eq!(exec::own_oom_score_adj(), Some(-900));

    let (out, code) = run("cat /proc/self/oom_score_adj", None).await;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "0", "a command's oom_score_adj");
    // The whole group the command starts is unprotected too.
    let (out, code) = run("sh -c 'cat /proc/self/oom_score_adj'", None).await;
    assert_eq!((out.trim(), code), ("0", 0));
    // The server keeps its own.
    assert_eq!(exec::own_oom_score_adj(), Some(-900));
}

/// The reset itself, arranged without privileges: raising one's own value is allowed, and a
/// child may lower its inherited value back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_command_starts_at_zero() {
    let _one = ONE_AT_A_TIME.lock().await;
    let old = std::fs::read_to_string(ADJ).unwrap();
    let _restore = Restore(old.clone());
    std::fs::write(ADJ, "500").unwrap();
    let cat = "cat /proc/self/oom_score_adj";
    assert_eq!(run(cat, Some(ChildOom::Set(0))).await, ("0\n".into(), 0));
    assert_eq!(run(cat, Some(ChildOom::Inherit)).await, ("500\n".into(), 0));
    // A server at or above the commands' value passes its own on.
    assert_eq!(run(cat, None).await, ("500\n".into(), 0));
    std::fs::write(ADJ, "700").unwrap();
    assert_eq!(run(cat, None).await, ("700\n".into(), 0));
}

/// A server that cannot protect itself (0, as on hosts without CAP_SYS_RESOURCE) makes its
/// commands the OOM killer's first choice instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprotected_servers_commands_are_killed_first() {
    let _one = ONE_AT_A_TIME.lock().await;
    let old = std::fs::read_to_string(ADJ).unwrap();
    let _restore = Restore(old.clone());
    if old.trim().parse::<i32>().unwrap() > 0 {
        // Lowering to 0 needs a privilege this host may not give: start from what there is.
        println!("skipped: the test process starts at {}", old.trim());
        return;
    }
    std::fs::write(ADJ, "0").unwrap();
    let (out, code) = run("cat /proc/self/oom_score_adj", None).await;
    assert_eq!((out.trim(), code), ("500", 0));
    assert_eq!(exec::own_oom_score_adj(), Some(0));
}

#[test]
fn commands_never_start_below_the_server() {
    let cases = [
        (Some(-1000), ChildOom::Set(0)),
        (Some(-998), ChildOom::Set(0)),
        (Some(-1), ChildOom::Set(0)),
        (Some(0), ChildOom::Set(500)),
        (Some(300), ChildOom::Set(500)),
        (Some(500), ChildOom::Inherit),
        (Some(900), ChildOom::Inherit),
        (None, ChildOom::Set(500)),
    ];
    for (own, want) in cases {
        assert_eq!(ChildOom::for_server(own), want, "{own:?}");
    }
}
