//! System test of issue 4's fault "stop containerd and start it again (the agent reconnects)".
//!
//! The test starts a containerd of its own ([`PrivateContainerd`]: own root, state, socket,
//! config and opt dir; CRI disabled, as `scripts/test-env.sh` does), imports the test image into
//! it, runs a real agent on it (the [`TestAgent`] harness, pointed at this socket), creates a bot, stops
//! containerd with SIGTERM, starts it again on the same dirs, and checks that the agent keeps
//! serving: `bot ls` answers, exec works, the bot kept its IP and data, and host-local IPAM holds
//! exactly one entry for it. Everything is removed even when the test fails: the agent guard
//! first (bots, bridge, iptables rules, namespace), then this containerd, its shims and every
//! mount under its directory.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::ctrd::PrivateContainerd;
use common::{block_on, Env, TestAgent};
use memoh_agent::containerd::{label_filter, prelude::*, Containerd, SnapshotKind, LABEL_BOT_ID};

/// A containerd of the test's own with the test image imported, and an agent configured for
/// it (not started).
fn private_setup(env: Env) -> (PrivateContainerd, TestAgent) {
    let ctrd = PrivateContainerd::new();
    let env = ctrd.env(&env);
    let a = TestAgent::new(&env, "");
    ctrd.import_image(&env, &a.namespace);
    (ctrd, a)
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "this test needs root");
    println!("skipped: needs root");
    false
}

#[test]
fn agent_reconnects_after_containerd_restarts() {
    let Some(env) = Env::get(false) else { return };
    if !is_root() {
        return;
    }
    // The agent is declared after the containerd guard, so it is dropped (and cleans up) first.
    let (mut ctrd, mut a) = private_setup(env);
    a.serve();
    let (bot, ip) = a.create_bot("rst");
    a.sh_in(&bot, "echo kept > /data/before-restart");
    let cid = format!("mcp-{bot}");
    let before = a.inspect(&bot);
    let entries = a.ipam_entries();
    assert_eq!(
        entries.iter().filter(|(_, o)| *o == cid).count(),
        1,
        "{entries:?}"
    );

    ctrd.stop();
    // While containerd is down the agent stays up and answers (an error is fine).
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        a.running(),
        "the agent exited with containerd:\n{}",
        a.log_tail(30)
    );
    let down = a.try_cli(&["bot", "ls"]);
    assert!(
        down.is_ok(),
        "bot ls hung while containerd was down: {down:?}"
    );
    ctrd.start();

    // `bot ls` answers within a few seconds once containerd is back.
    let back = Instant::now();
    a.wait_for(
        "bot ls after containerd restart",
        Duration::from_secs(10),
        || {
            a.try_cli(&["bot", "ls"]).is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains(&bot)
            })
        },
    );
    println!(
        "bot ls answered {:?} after containerd was back",
        back.elapsed()
    );
    a.wait_for(
        "exec after containerd restart",
        Duration::from_secs(15),
        || {
            a.try_cli(&["exec", &bot, "--", "true"])
                .is_ok_and(|o| o.status.success())
        },
    );
    assert!(a.running(), "the agent exited:\n{}", a.log_tail(30));
    assert_eq!(a.sh_in(&bot, "cat /data/before-restart").trim(), "kept");
    let info = a.inspect(&bot);
    assert_eq!(info["ip"].as_str(), Some(ip.as_str()), "IP changed: {info}");
    assert_eq!(info["status"].as_str(), Some("running"), "{info}");
    // The task outlived containerd in its shim: the bot was not restarted.
    assert_eq!(
        info["pid"], before["pid"],
        "the bot's task was replaced: {info}"
    );
    assert_eq!(
        info["restart_count"], before["restart_count"],
        "the bot was restarted: {info}"
    );
    let entries = a.ipam_entries();
    let mine: Vec<_> = entries.iter().filter(|(_, o)| *o == cid).collect();
    assert_eq!(mine.len(), 1, "IPAM entries of {cid}: {entries:?}");
    assert_eq!(mine[0].0.to_string(), ip);
    // The agent still manages bots on the restarted containerd.
    let (other, other_ip) = a.create_bot("new");
    assert_ne!(other_ip, ip);
    a.ok(&["bot", "rm", &other]);
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

/// containerd 1.6 killed in the middle of a snapshot commit can lose the snapshot: its metadata
/// still holds the active snapshot while its snapshotter has let go of it, so stat and list no
/// longer show it, yet its parent counts it as a child and can never be removed. The test makes
/// that happen to a bot's running state for real (killing containerd during commits, the delay
/// homing in on the moment the commit completes), then starts the agent: the bot must come back
/// on the version its lost state was taken from, with the loss recorded for the operator, and
/// `bot rm` must remove everything.
#[test]
fn a_snapshot_containerd_lost_mid_commit_is_recovered_and_reported() {
    let Some(env) = Env::get(false) else { return };
    if !is_root() {
        return;
    }
    let (mut ctrd, mut a) = private_setup(env);
    a.serve();
    let (bot, _) = a.create_bot("lost");
    a.sh_in(&bot, "echo one > /data/v1-file");
    // The commit-based cycle (what containerd can lose mid-commit).
    a.ok(&["snapshot", "create", &bot, "--name", "one", "--restart"]);
    a.sh_in(&bot, "echo two > /data/after-v1");
    let cid = format!("mcp-{bot}");
    let ns = a.namespace.clone();
    // The agent goes away (as in a crash); its bot's task is stopped so nothing uses the state.
    a.kill(nix::sys::signal::Signal::SIGKILL);
    let (key, v1) = block_on(async {
        let c = a.containerd().await;
        let key = c.get_container(&cid).await.unwrap().unwrap().snapshot_key;
        let v1 = c
            .list_snapshots(&[label_filter(LABEL_BOT_ID, Some(&bot))])
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.kind == SnapshotKind::Committed)
            .expect("version 1")
            .name;
        let _ = c.kill_task(&cid, 9, true).await;
        for _ in 0..100 {
            if c.delete_task(&cid).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (key, v1)
    });
    let labels = |k: &str| {
        HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.clone()),
            ("containerd.io/gc.root".to_string(), k.to_string()),
        ])
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connect = |sock: &std::path::Path| {
        rt.block_on(Containerd::connect(
            sock,
            &ns,
            "overlayfs",
            "io.containerd.runc.v2",
        ))
        .expect("connect to the private containerd")
    };
    let mut c = connect(&ctrd.sock);
    // Too early leaves the active snapshot, too late commits it: the delay homes in on the
    // boundary, where containerd loses it.
    let (mut delay, mut step) = (4_000u64, 2_000u64);
    let mut outcomes = (0, 0);
    let mut lost = false;
    for attempt in 0..300 {
        let mounts = match rt.block_on(c.stat_snapshot(&key)).unwrap() {
            Some(_) => rt.block_on(c.snapshot_mounts(&key)).unwrap(),
            None => rt
                .block_on(c.prepare_snapshot(&key, Some(&v1), &labels(&key)))
                .unwrap(),
        };
        let upper = mounts
            .iter()
            .flat_map(|m| &m.options)
            .find_map(|o| o.strip_prefix("upperdir="))
            .expect("an overlay upper dir")
            .to_string();
        // Enough files that the commit takes a few milliseconds, as a bot's state does.
        for f in 0..2000 {
            std::fs::write(format!("{upper}/data/f{f}"), [b'x'; 512])
                .or_else(|_| {
                    std::fs::create_dir_all(format!("{upper}/data"))
                        .and_then(|()| std::fs::write(format!("{upper}/data/f{f}"), [b'x'; 512]))
                })
                .unwrap();
        }
        let name = format!("probe-{attempt}");
        let (c2, n2, k2, l2) = (c.clone(), name.clone(), key.clone(), labels(&name));
        let commit = rt.spawn(async move { c2.commit_snapshot(&n2, &k2, &l2).await });
        std::thread::sleep(Duration::from_micros(delay));
        ctrd.kill();
        let _ = rt.block_on(commit);
        ctrd.start();
        c = connect(&ctrd.sock);
        let active = rt.block_on(c.stat_snapshot(&key)).unwrap().is_some();
        let version = rt.block_on(c.stat_snapshot(&name)).unwrap().is_some();
        match (active, version) {
            (true, false) => {
                outcomes.0 += 1;
                delay += step;
            }
            (false, true) => {
                outcomes.1 += 1;
                rt.block_on(c.remove_snapshot(&name)).unwrap();
                delay = delay.saturating_sub(step).max(50);
                step = (step * 3 / 4).max(50);
            }
            (false, false) => {
                println!(
                    "lost the commit at attempt {attempt} ({delay} us after it began; \
                     {} too early, {} too late)",
                    outcomes.0, outcomes.1
                );
                lost = true;
                break;
            }
            (true, true) => panic!("both {key} and {name} exist after the commit"),
        }
    }
    assert!(
        lost,
        "containerd never lost a commit in 300 kills ({} too early, {} too late)",
        outcomes.0, outcomes.1
    );
    // The state is as containerd leaves it: the bot's snapshot is gone from every listing, and
    // its parent cannot be removed.
    let children = rt
        .block_on(c.list_snapshots(&[]))
        .unwrap()
        .into_iter()
        .filter(|s| s.parent.as_deref() == Some(v1.as_str()))
        .count();
    assert_eq!(children, 0, "the lost snapshot is still listed");
    drop(rt);

    a.serve();
    a.wait_for(
        "the bot back after recovery",
        Duration::from_secs(60),
        || {
            a.try_cli(&["exec", &bot, "--", "true"])
                .is_ok_and(|o| o.status.success())
        },
    );
    assert_eq!(a.sh_in(&bot, "cat /data/v1-file").trim(), "one");
    assert_eq!(
        a.sh_in(
            &bot,
            "test -e /data/after-v1 && echo present || echo absent"
        )
        .trim(),
        "absent"
    );
    let info = a.inspect(&bot);
    let note = info["lost_state"].as_str().unwrap_or_default().to_string();
    assert!(
        note.contains("lost") && note.contains("version 1"),
        "bot inspect does not report the loss: {info}"
    );
    assert!(
        a.log_tail(200).contains("containerd lost the bot's state"),
        "the agent did not log the loss:\n{}",
        a.log_tail(30)
    );
    // Work goes on: a new version, then the bot goes with everything it had.
    a.ok(&["snapshot", "create", &bot, "--name", "two"]);
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}
