//! System tests of bot versions and of the migration of legacy bind-mounted data (issue 5):
//! the real `memoh-agent` daemon and CLI against the private containerd of
//! `scripts/test-env.sh up`. Same environment and skip rules as `agent_system.rs`; each test
//! runs its own agent on its own namespace, network and /24 (see `common`).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{sh, Env, TestAgent};

/// The agent's test-only fault hook (`memoh_agent::bots::fault::FAULT_ENV`).
const FAULT_ENV: &str = "MEMOH_FAULT_SNAPSHOT_STEP";

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `snapshot ls --json` as (number, name, source, current), oldest first.
fn versions(a: &TestAgent, bot: &str) -> Vec<(u64, String, String, bool)> {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&a.ok(&["snapshot", "ls", bot, "--json"])).expect("ls --json");
    v.iter()
        .map(|e| {
            (
                e["version"].as_u64().unwrap_or_else(|| panic!("{e}")),
                e["name"].as_str().unwrap_or_default().to_string(),
                e["source"].as_str().unwrap_or_default().to_string(),
                e["current"].as_bool().unwrap_or_else(|| panic!("{e}")),
            )
        })
        .collect()
}

/// `snapshot create`; returns the version number it printed.
fn snapshot(a: &TestAgent, bot: &str, name: &str) -> u64 {
    let out = a.ok(&["snapshot", "create", bot, "--name", name]);
    let f: Vec<_> = out.split_whitespace().collect();
    assert_eq!(
        f.first(),
        Some(&"version"),
        "snapshot create printed {out:?}"
    );
    f[1].parse().unwrap_or_else(|_| panic!("{out:?}"))
}

/// `snapshot create --restart` (the commit-based cycle, whose versions are committed
/// snapshots); returns the version number it printed.
fn snapshot_restart(a: &TestAgent, bot: &str, name: &str) -> u64 {
    let out = a.ok(&["snapshot", "create", bot, "--name", name, "--restart"]);
    let f: Vec<_> = out.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"version"), "{out:?}");
    f[1].parse().unwrap_or_else(|_| panic!("{out:?}"))
}

/// Waits until `exec` works in `bot` (after a restart the bot may come back in the background).
fn wait_exec(a: &TestAgent, bot: &str, what: &str) {
    a.wait_for(what, Duration::from_secs(30), || {
        a.try_cli(&["exec", bot, "--", "true"])
            .is_ok_and(|o| o.status.success())
    });
}

#[test]
fn versions_create_list_rollback_remove() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("ver");
    assert!(versions(&a, &bot).is_empty(), "a new bot has no versions");

    // Versions of the commit-based cycle (`--restart`): committed snapshots, which upgraded
    // hosts keep listing, rolling back to and removing.
    a.sh_in(&bot, "echo one > /data/v.txt");
    assert_eq!(snapshot_restart(&a, &bot, "first"), 1);
    // The bot comes back on the same data, reachable.
    assert_eq!(a.sh_in(&bot, "cat /data/v.txt"), "one\n");
    a.sh_in(&bot, "echo two > /data/v.txt; echo new > /data/only-in-2");
    assert_eq!(snapshot_restart(&a, &bot, "second"), 2);
    assert_eq!(a.sh_in(&bot, "cat /data/v.txt"), "two\n");

    let v = versions(&a, &bot);
    assert_eq!(
        v,
        vec![
            (1, "first".into(), "manual".into(), false),
            (2, "second".into(), "manual".into(), true),
        ]
    );
    let table = a.ok(&["snapshot", "ls", &bot]);
    assert!(
        table.contains("VERSION") && table.contains("second"),
        "{table}"
    );

    // Changed after version 2; the rollback keeps that state as version 3.
    a.sh_in(&bot, "echo three > /data/v.txt");
    let out = a.ok(&["snapshot", "rollback", &bot, "1"]);
    assert!(out.contains("version 1"), "rollback printed {out:?}");
    assert_eq!(a.sh_in(&bot, "cat /data/v.txt"), "one\n");
    assert_eq!(
        a.sh_in(&bot, "test -e /data/only-in-2 && echo yes || echo no"),
        "no\n"
    );
    let v = versions(&a, &bot);
    assert_eq!(v.len(), 3, "{v:?}");
    assert_eq!(
        (v[0].0, v[0].3),
        (1, true),
        "the bot runs on version 1: {v:?}"
    );
    assert_eq!((v[1].0, v[1].3), (2, false), "{v:?}");
    assert_eq!(v[2].0, 3);
    assert_eq!(v[2].2, "rollback", "{v:?}");
    assert!(!v[2].3, "{v:?}");

    // A parent is refused, with the reason; a leaf goes.
    let why = a.fails(&["snapshot", "rm", &bot, "1"]);
    assert!(why.contains("parent"), "refusal without a reason: {why}");
    // Version 3 (the state before the rollback) is an image holding its whole tree, so
    // nothing depends on version 2 any more.
    let why = a.fails(&["snapshot", "rm", &bot, "9"]);
    assert!(why.contains('9'), "{why}");
    a.ok(&["snapshot", "rm", &bot, "3"]);
    let nums: Vec<u64> = versions(&a, &bot).iter().map(|v| v.0).collect();
    assert_eq!(nums, vec![1, 2]);

    // Rolling back to 3 is impossible now, and numbers are never reused.
    a.fails(&["snapshot", "rollback", &bot, "3"]);
    assert_eq!(snapshot(&a, &bot, ""), 4);
    let nums: Vec<u64> = versions(&a, &bot).iter().map(|v| v.0).collect();
    assert_eq!(nums, vec![1, 2, 4]);
    assert_eq!(a.sh_in(&bot, "cat /data/v.txt"), "one\n");
    assert_eq!(a.list().len(), 1);
}

#[test]
fn agent_killed_at_each_cycle_step_recovers_the_bot() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("crash");
    for step in 1..=5u32 {
        a.kill(nix::sys::signal::Signal::SIGTERM);
        a.serve_env = vec![(FAULT_ENV.to_string(), step.to_string())];
        a.serve();
        wait_exec(&a, &bot, &format!("bot runs before step {step}"));
        a.sh_in(&bot, &format!("echo step{step} > /data/marker{step}"));

        let name = format!("s{step}");
        let out = a.cli(&["snapshot", "create", &bot, "--name", &name, "--restart"]);
        assert!(
            !out.status.success(),
            "step {step}: the agent should have died mid-cycle"
        );
        let t = std::time::Instant::now();
        while a.running() {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "step {step}: the agent still runs:\n{}",
                a.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        a.serve_env.clear();
        a.serve();
        wait_exec(&a, &bot, &format!("bot runs after a crash at step {step}"));
        for k in 1..=step {
            assert_eq!(
                a.sh_in(&bot, &format!("cat /data/marker{k}")),
                format!("step{k}\n"),
                "crash at step {step}: data written before step {k} lost"
            );
        }
        let bots = a.list();
        assert_eq!(bots.len(), 1, "crash at step {step}: {bots:?}");
        // Versions still list, and a full cycle works again.
        versions(&a, &bot);
    }
    let n = snapshot(&a, &bot, "after crashes");
    assert!(versions(&a, &bot).iter().any(|v| v.0 == n && v.3));
    assert_eq!(a.sh_in(&bot, "cat /data/marker5"), "step5\n");
}

#[test]
fn delete_interrupted_by_a_crash_is_finished_not_undone() {
    use memoh_agent::containerd::prelude::*;
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("del");
    a.sh_in(&bot, "echo doomed > /data/f");
    snapshot(&a, &bot, "v1");
    // The agent dies right after `bot rm` marked the record, before it removed anything.
    a.kill(nix::sys::signal::Signal::SIGKILL);
    common::block_on(async {
        let c = a.containerd().await;
        let labels =
            std::collections::HashMap::from([("memoh.desired".to_string(), "deleted".to_string())]);
        c.update_container_labels(&format!("mcp-{bot}"), &labels)
            .await
            .expect("mark the container deleted");
    });
    a.serve();
    a.wait_for(
        "the interrupted delete finished",
        Duration::from_secs(20),
        || a.leftovers(&bot).is_empty(),
    );
    assert!(a.list().is_empty(), "{:?}", a.list());
    // The id is free again, and a new bot under it starts empty.
    a.ok(&["bot", "create", &bot]);
    wait_exec(&a, &bot, "recreated bot");
    assert_eq!(
        a.sh_in(&bot, "cat /data/f 2>/dev/null || echo gone"),
        "gone\n"
    );
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

/// The bot's container record and its `mcp-BOT` snapshot, as containerd has them.
fn record_and_snapshot(a: &TestAgent, bot: &str) -> (bool, bool) {
    use memoh_agent::containerd::prelude::*;
    let cid = format!("mcp-{bot}");
    common::block_on(async {
        let c = a.containerd().await;
        (
            c.get_container(&cid)
                .await
                .expect("get container")
                .is_some(),
            c.stat_snapshot(&cid).await.expect("stat").is_some(),
        )
    })
}

/// Waits until the agent process has exited.
fn wait_dead(a: &mut TestAgent, what: &str) {
    let t = std::time::Instant::now();
    while a.running() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{what}: the agent still runs:\n{}",
            a.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_create_that_died_before_its_record_leaves_no_bot() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    a.kill(nix::sys::signal::Signal::SIGTERM);
    a.serve_env = vec![(FAULT_ENV.to_string(), "create".to_string())];
    a.serve();
    let bot = a.bot_id("halfmade");
    let out = a.cli(&["bot", "create", &bot]);
    assert!(
        !out.status.success(),
        "the agent should have died mid-create"
    );
    wait_dead(&mut a, "fault at create");
    assert_eq!(
        record_and_snapshot(&a, &bot),
        (false, true),
        "the agent died between the bot's snapshot and its record"
    );

    // The client was told the create failed: recovery must not bring the bot in after all.
    a.serve_env.clear();
    a.serve();
    a.wait_for(
        "the failed create's snapshot and state are removed",
        Duration::from_secs(20),
        || a.leftovers(&bot).is_empty(),
    );
    assert!(a.list().is_empty(), "{:?}", a.list());
    assert!(
        a.log_tail(200)
            .contains("removing the snapshot of a create that did not finish"),
        "{}",
        a.log_tail(30)
    );

    // The id is free: a create now works and gives an empty bot.
    a.ok(&["bot", "create", &bot]);
    wait_exec(&a, &bot, "bot created after the failed create");
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

#[test]
fn a_create_whose_record_fails_takes_its_snapshot_back() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let bot = a.bot_id("norecord");
    // A file where the bot's state directory goes: the token cannot be written, so the
    // container record is never made.
    let blocker = a.state_dir.join("bots").join(&bot);
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, "in the way").unwrap();
    let why = a.fails(&["bot", "create", &bot]);
    assert!(
        why.contains(&blocker.display().to_string()),
        "the error should name the path: {why}"
    );
    // Undone by the create itself, not by a later recovery pass.
    assert_eq!(record_and_snapshot(&a, &bot), (false, false));
    assert!(a.list().is_empty(), "{:?}", a.list());
    assert_eq!(
        std::fs::read_to_string(&blocker).unwrap(),
        "in the way",
        "a file the agent did not make is not removed"
    );
    std::fs::remove_file(&blocker).unwrap();
    a.ok(&["bot", "create", &bot]);
    wait_exec(&a, &bot, "bot created once the path is free");
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

#[test]
fn bot_rm_keep_versions_keeps_them_for_the_next_bot_of_that_id() {
    use memoh_agent::bots::versions::LABEL_VERSION;
    use memoh_agent::containerd::{label_filter, prelude::*, SnapshotKind};
    use memoh_agent::ids::LABEL_BOT_ID;
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("keep");
    a.sh_in(&bot, "echo kept > /data/f");
    assert_eq!(snapshot_restart(&a, &bot, "keep me"), 1);
    a.ok(&["bot", "rm", &bot, "--keep-versions"]);
    assert!(a.list().is_empty(), "{:?}", a.list());

    // A restart runs recovery, which must not take the kept versions for a lost bot.
    a.kill(nix::sys::signal::Signal::SIGTERM);
    a.serve();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        a.list().is_empty(),
        "the deleted bot came back: {:?}\n{}",
        a.list(),
        a.log_tail(20)
    );
    let kept: Vec<(SnapshotKind, Option<String>)> = common::block_on(async {
        let c = a.containerd().await;
        c.list_snapshots(&[label_filter(LABEL_BOT_ID, Some(&bot))])
            .await
            .expect("list snapshots")
            .into_iter()
            .map(|s| (s.kind, s.labels.get(LABEL_VERSION).cloned()))
            .collect()
    });
    assert_eq!(
        kept,
        vec![(SnapshotKind::Committed, Some("1".to_string()))],
        "only the version is left"
    );

    // A new bot of that id starts empty, sees the kept version and can go back to it.
    a.ok(&["bot", "create", &bot]);
    wait_exec(&a, &bot, "the new bot of that id");
    assert_eq!(
        a.sh_in(&bot, "cat /data/f 2>/dev/null || echo empty"),
        "empty\n"
    );
    let v = versions(&a, &bot);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].0, v[0].1.as_str()), (1, "keep me"), "{v:?}");
    a.ok(&["snapshot", "rollback", &bot, "1"]);
    assert_eq!(a.sh_in(&bot, "cat /data/f"), "kept\n");
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

#[test]
fn a_bot_whose_record_vanished_comes_back_with_its_data() {
    use memoh_agent::containerd::prelude::*;
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("vanished");
    a.sh_in(&bot, "echo precious > /data/f");
    let cid = format!("mcp-{bot}");
    // The record goes behind the agent's back (say `ctr containers rm`); the snapshot with
    // the bot's data stays.
    a.kill(nix::sys::signal::Signal::SIGKILL);
    common::block_on(async {
        let c = a.containerd().await;
        c.kill_task(&cid, 9, true).await.expect("kill task");
        c.wait_task(&cid, Duration::from_secs(10))
            .await
            .expect("wait task");
        c.delete_task(&cid).await.expect("delete task");
        assert!(c.delete_container(&cid).await.expect("delete container"));
    });
    assert_eq!(record_and_snapshot(&a, &bot), (false, true));
    a.serve();
    wait_exec(&a, &bot, "the bot is back");
    assert_eq!(a.sh_in(&bot, "cat /data/f"), "precious\n");
    assert_eq!(a.list().len(), 1, "{:?}", a.list());
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

#[test]
fn a_call_finds_a_bot_whose_cut_short_cycle_lost_its_record() {
    use memoh_agent::bots::versions::{
        active_snapshot_key, version_snapshot_name, LABEL_VERSION, LABEL_VERSION_CREATED,
        LABEL_VERSION_NAME, LABEL_VERSION_SOURCE,
    };
    use memoh_agent::containerd::{prelude::*, LABEL_GC_ROOT};
    use memoh_agent::ids::{LABEL_BOT_ID, LABEL_IMAGE};
    use std::collections::HashMap;
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("cutshort");
    a.sh_in(&bot, "echo survived > /data/f");
    a.ok(&["bot", "stop", &bot]);
    // What a version cycle leaves when containerd dies between deleting the container record
    // and recreating it: the state committed as a version, a new active snapshot on it, and no
    // record. The agent keeps running; its next reconcile is up to 15 s away.
    let cid = format!("mcp-{bot}");
    common::block_on(async {
        let c = a.containerd().await;
        let image = "docker.io/memohai/mcp:latest".to_string();
        let version = version_snapshot_name(&bot, 1);
        let labels = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.clone()),
            (LABEL_VERSION.to_string(), "1".to_string()),
            (LABEL_VERSION_NAME.to_string(), "cut short".to_string()),
            (LABEL_VERSION_SOURCE.to_string(), "manual".to_string()),
            (
                LABEL_VERSION_CREATED.to_string(),
                "2026-11-22T00:00:00Z".to_string(),
            ),
            (
                LABEL_GC_ROOT.to_string(),
                "2026-11-22T00:00:00Z".to_string(),
            ),
            (LABEL_IMAGE.to_string(), image.clone()),
        ]);
        c.commit_snapshot(&version, &cid, &labels)
            .await
            .expect("commit");
        let active = HashMap::from([
            (LABEL_BOT_ID.to_string(), bot.clone()),
            (LABEL_IMAGE.to_string(), image),
            (
                LABEL_GC_ROOT.to_string(),
                "2026-11-22T00:00:00Z".to_string(),
            ),
        ]);
        c.prepare_snapshot(&active_snapshot_key(&bot, 2), Some(&version), &active)
            .await
            .expect("prepare");
        assert!(c.delete_container(&cid).await.expect("delete container"));
    });
    // The first call finds the bot, running on its state (not "unknown bot").
    let out = a.cli(&["exec", &bot, "--", "cat", "/data/f"]);
    assert!(
        out.status.success(),
        "exec right after the cut-short cycle: {}\n{}",
        stderr(&out),
        a.log_tail(20)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "survived\n");
    let log = a.log_tail(400);
    assert!(
        log.contains("recovered the bot's container record for a call")
            || log.contains("recovered bots from an interrupted cycle"),
        "{}",
        a.log_tail(30)
    );
    assert_eq!(a.list().len(), 1, "{:?}", a.list());
    let v = versions(&a, &bot);
    assert_eq!((v.len(), v[0].0, v[0].3), (1, 1, true), "{v:?}");
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

/// What a test expects of one migrated entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    size: u64,
    mode: u32,
    mtime: i64,
}

/// The kinds, sizes, modes and mtimes of everything under `root` (no link followed), as
/// busybox `stat -c %F` names the kinds; FIFOs are left out (the migration skips them).
fn walk(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "directory"
            } else if ft.is_symlink() {
                "symbolic link"
            } else if ft.is_file() && md.len() == 0 {
                "regular empty file"
            } else if ft.is_file() {
                "regular file"
            } else {
                continue;
            };
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(
                rel,
                Entry {
                    kind,
                    size: if ft.is_dir() { 0 } else { md.len() },
                    mode: md.mode() & 0o7777,
                    mtime: md.mtime(),
                },
            );
        }
    }
    out
}

fn touch_d(p: &Path, when: &str) {
    let o = sh("touch", &["-h", "-d", when, &p.display().to_string()]);
    assert!(o.status.success(), "touch {}: {}", p.display(), stderr(&o));
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A legacy tree with every kind of entry the issue names; returns a secret outside it that a
/// symlink in the tree points at.
fn legacy_tree(src: &Path, outside: &Path) -> String {
    let secret = format!("secret-{}", common::tag());
    std::fs::write(outside, format!("{secret}\n")).unwrap();
    std::fs::create_dir_all(src.join("a/b/c")).unwrap();
    std::fs::create_dir_all(src.join("empty-dir/empty-child")).unwrap();
    std::fs::write(src.join("a/b/c/deep.txt"), "deep\n").unwrap();
    std::fs::write(src.join("a/b/c/big.bin"), common::random_bytes(300 * 1024)).unwrap();
    std::fs::write(src.join("empty-file"), "").unwrap();
    std::fs::write(src.join("private"), "only me\n").unwrap();
    set_mode(&src.join("private"), 0o600);
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    set_mode(&src.join("run.sh"), 0o755);
    std::fs::write(src.join("old.txt"), "from 2001\n").unwrap();
    touch_d(&src.join("old.txt"), "2001-02-03 04:05:06 UTC");
    std::os::unix::fs::symlink("/etc/shadow", src.join("shadow-link")).unwrap();
    std::os::unix::fs::symlink(outside, src.join("secret-link")).unwrap();
    std::os::unix::fs::symlink("a/b/c/deep.txt", src.join("inner-link")).unwrap();
    std::os::unix::fs::symlink("../../empty-file", src.join("a/b/up-link")).unwrap();
    // A FIFO is skipped with a warning, not a failure (reading it would block forever).
    let fifo = src.join("a/pipe");
    assert!(sh("mkfifo", &[&fifo.display().to_string()])
        .status
        .success());
    // Root reads a 0000 directory; it must arrive with its mode (the unreadable case is
    // `migration_failure_leaves_the_source`).
    std::fs::create_dir(src.join("locked")).unwrap();
    std::fs::write(src.join("locked/inside"), "x").unwrap();
    set_mode(&src.join("locked"), 0o000);
    // Directory mtimes last: creating their children changed them.
    touch_d(&src.join("a/b"), "2005-06-07 08:09:10 UTC");
    touch_d(
        &src.join("empty-dir/empty-child"),
        "2010-01-01 00:00:00 UTC",
    );
    touch_d(&src.join("locked"), "2011-01-01 00:00:00 UTC");
    secret
}

/// `stat -c` of every path under /data in the bot, by relative path.
fn stat_in_bot(a: &TestAgent, bot: &str) -> BTreeMap<String, (String, u64, u32, i64)> {
    let out = a.sh_in(
        bot,
        "cd /data && find . -mindepth 1 -exec stat -c '%n|%F|%s|%a|%Y' {} \\;",
    );
    out.lines()
        .map(|l| {
            let f: Vec<_> = l.split('|').collect();
            assert_eq!(f.len(), 5, "{l}");
            (
                f[0].trim_start_matches("./").to_string(),
                (
                    f[1].to_string(),
                    f[2].parse().unwrap(),
                    u32::from_str_radix(f[3], 8).unwrap(),
                    f[4].parse().unwrap(),
                ),
            )
        })
        .collect()
}

#[test]
fn migration_of_legacy_data() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let bot = a.bot_id("mig");
    let src = a.data_root().join("bots").join(&bot);
    let outside = a.dir.path().join("outside-secret");
    let secret = legacy_tree(&src, &outside);
    let want = walk(&src);
    assert!(want.len() >= 15, "{want:?}");

    // Creating the bot starts the migration in the background.
    a.create_bot("mig");
    a.wait_for("background migration", Duration::from_secs(60), || {
        a.try_cli(&["exec", &bot, "--", "cat", "/data/.memoh/migrated"])
            .is_ok_and(|o| o.status.success())
    });
    let mut done = src.clone().into_os_string();
    done.push(".migrated");
    let done = PathBuf::from(done);
    a.wait_for("source renamed", Duration::from_secs(10), || done.is_dir());
    assert!(!src.exists(), "the source is still at {}", src.display());

    let got = stat_in_bot(&a, &bot);
    let mut problems = Vec::new();
    for (path, w) in &want {
        let Some((kind, size, mode, mtime)) = got.get(path) else {
            problems.push(format!("{path}: missing"));
            continue;
        };
        if kind != w.kind {
            problems.push(format!("{path}: {kind}, want {}", w.kind));
            continue;
        }
        if w.kind != "directory" && *size != w.size {
            problems.push(format!("{path}: {size} bytes, want {}", w.size));
        }
        if w.kind != "symbolic link" {
            if *mode != w.mode {
                problems.push(format!("{path}: mode {mode:o}, want {:o}", w.mode));
            }
            if *mtime != w.mtime {
                problems.push(format!("{path}: mtime {mtime}, want {}", w.mtime));
            }
        }
    }
    assert!(!got.contains_key("a/pipe"), "the FIFO was copied");

    // Links are links with their targets; nothing was read through them.
    assert_eq!(a.sh_in(&bot, "readlink /data/shadow-link"), "/etc/shadow\n");
    assert_eq!(
        a.sh_in(&bot, "readlink /data/secret-link"),
        format!("{}\n", outside.display())
    );
    assert_eq!(a.sh_in(&bot, "cat /data/inner-link"), "deep\n");
    assert_eq!(
        a.sh_in(&bot, &format!("grep -rl {secret} /data || echo none")),
        "none\n",
        "the out-of-tree target's content reached /data"
    );
    assert_eq!(
        a.sh_in(&bot, "cat /data/a/b/c/deep.txt /data/locked/inside"),
        "deep\nx"
    );

    // A pre-migration version to undo it with.
    let v = versions(&a, &bot);
    assert!(
        v.iter().any(|v| v.2 == "pre-migration"),
        "no pre-migration version: {v:?}"
    );

    // On demand afterwards: nothing to migrate.
    let why = a.fails(&["migrate", &bot]);
    assert!(why.contains("no legacy data"), "{why}");

    // Never again, even if the source reappears: the marker in the bot wins, and what the bot
    // changed stays.
    a.sh_in(&bot, "echo changed > /data/old.txt");
    std::fs::rename(&done, &src).unwrap();
    let out = a.ok(&["migrate", &bot]);
    assert!(out.contains("already migrated"), "{out}");
    assert!(out.contains("source renamed: true"), "{out}");
    assert_eq!(a.sh_in(&bot, "cat /data/old.txt"), "changed\n");
    assert!(done.is_dir() && !src.exists());

    // A legacy directory that is itself a symlink is refused, not followed: nothing of where
    // it points reaches the bot, and the operator gets one line saying why.
    let linked = a.bot_id("migln");
    let elsewhere = a.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("stolen.txt"), "host data\n").unwrap();
    let link = a.data_root().join("bots").join(&linked);
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    a.create_bot("migln");
    let why = a.fails(&["migrate", &linked]);
    assert!(why.contains("symlink"), "{why}");
    assert_eq!(
        a.sh_in(&linked, "ls -A /data | grep -c stolen || true"),
        "0\n",
        "the symlinked legacy data reached the bot"
    );
    assert!(link.is_symlink() && elsewhere.join("stolen.txt").is_file());

    // Last, so that everything above is checked too.
    assert!(problems.is_empty(), "migrated tree differs:\n{problems:#?}");
}

/// Unmounts a bind mount when dropped (before the guard's temp dir goes).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = sh("umount", &["-l", &self.0.display().to_string()]);
    }
}

#[test]
fn migration_failure_leaves_the_source() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let bot = a.bot_id("migbad");
    let src = a.data_root().join("bots").join(&bot);
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("ok.txt"), "fine\n").unwrap();
    // Root reads any mode, so an unreadable entry has to be real: a bind mount of a
    // write-only procfs file of this test process, which opens but fails every read (EINVAL).
    let bad = src.join("sub/unreadable");
    std::fs::write(&bad, "").unwrap();
    let proc_file = format!("/proc/{}/clear_refs", std::process::id());
    let m = sh("mount", &["--bind", &proc_file, &bad.display().to_string()]);
    if !m.status.success() {
        println!(
            "skipped: cannot bind-mount {proc_file} ({}); no unreadable entry as root",
            stderr(&m).trim()
        );
        return;
    }
    let _unmount = Unmount(bad.clone());
    assert!(
        std::fs::read(&bad).is_err(),
        "the entry should be unreadable"
    );

    a.create_bot("migbad");
    // The explicit migration waits for the background one (the bot's lock) and fails too.
    let out = a.cli(&["migrate", &bot]);
    assert!(
        !out.status.success(),
        "migrate should fail: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.starts_with("failed:") && l.contains("unreadable")),
        "the failure is not named: {err}"
    );
    assert!(err.contains("source was left in place"), "{err}");
    assert!(
        src.join("ok.txt").is_file(),
        "the source was not left in place"
    );
    let mut renamed = src.clone().into_os_string();
    renamed.push(".migrated");
    assert!(!PathBuf::from(renamed).exists());
    let marker = a.cli(&["exec", &bot, "--", "test", "-e", "/data/.memoh/migrated"]);
    assert!(
        !marker.status.success(),
        "a failed migration must not be marked complete"
    );
    let v = versions(&a, &bot);
    assert!(v.iter().any(|v| v.2 == "pre-migration"), "{v:?}");
}
