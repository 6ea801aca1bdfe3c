//! Unit tests of the lifecycle's decisions over the in-memory runtime
//! ([`crate::containerd::fake::FakeRuntime`]): crash recovery of a version cycle cut short after
//! each of its steps, a create that died before its record or whose record failed, what
//! `bot rm --keep-versions` leaves, a state containerd lost mid-commit, versions, and the
//! restart backoff. The system tier (`agent/tests/versions_system.rs`) runs the same stories
//! against a real containerd.
//!
//! The tests only take paths that never reach the host's network or a bot's server: starting
//! a task is followed by the network set-up (`ip`, CNI plugins), so the harness makes every
//! `snapshot_mounts` fail, and a start always ends there, before the network. No test starts a
//! bot whose task runs (that attaches it at once) or reconciles one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::versions::{
    active_snapshot_key, nanos, version_snapshot_name, Source, LABEL_NEXT_VERSION, LABEL_VERSION,
    LABEL_VERSION_CREATED, LABEL_VERSION_NAME, LABEL_VERSION_SOURCE,
};
use super::watch::restart_delay;
use super::{Health, Manager, DESIRED_DELETED};
use crate::config::Config;
use crate::containerd::fake::FakeRuntime;
use crate::containerd::prelude::*;
use crate::containerd::{
    NewContainer, ResolvedImage, SnapshotKind, TaskIo, TaskState, LABEL_GC_ROOT,
};
use crate::error::AgentError;
use crate::ids::{
    self, LABEL_BOT_ID, LABEL_DESIRED, LABEL_IMAGE, LABEL_LOST_STATE, LABEL_SNAPSHOT_PARENT,
};
use crate::network::{Network, NetworkConfig};

/// A manager over a fresh fake runtime holding the default image, with its state, CNI and
/// containerd directories in a temporary directory.
struct Harness {
    _dir: tempfile::TempDir,
    rt: Arc<FakeRuntime>,
    m: Arc<Manager>,
    image: ResolvedImage,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path();
    let cfg = Config {
        containerd_state: p.join("containerd"),
        cni_conf_dir: p.join("cni/net.d"),
        cni_bin_dirs: vec![p.join("cni/bin")],
        cni_ipam_dir: Some(p.join("cni/ipam")),
        data_root: p.join("data"),
        state_dir: p.join("state"),
        control_socket: p.join("agent.sock"),
        mcp_listen: String::new(),
        server_binary: p.join("bin/container-server"),
        ..Config::default()
    };
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(p.join("bin")).expect("bin dir");
        std::fs::write(&cfg.server_binary, "#!/bin/sh\n").expect("server binary");
        std::fs::set_permissions(&cfg.server_binary, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let rt = Arc::new(FakeRuntime::new());
    let image = rt.add_image(&cfg.image);
    // Every start ends here, before the network set-up (see the module documentation).
    rt.fail_always("snapshot_mounts");
    let net = Arc::new(Network::new(NetworkConfig::from_config(&cfg)));
    let m = Arc::new(Manager::new(cfg, rt.clone(), net));
    Harness {
        _dir: dir,
        rt,
        m,
        image,
    }
}

impl Harness {
    fn bot_dir(&self, bot: &str) -> std::path::PathBuf {
        ids::bot_dir(&self.m.config().state_dir, bot)
    }

    /// The container record of `bot`.
    fn record(&self, bot: &str) -> crate::containerd::ContainerInfo {
        self.rt
            .container(&ids::container_id(bot))
            .unwrap_or_else(|| panic!("{bot} has no container record"))
    }

    /// What the bot's container sees: the files of its snapshot and of its parents.
    fn bot_view(&self, bot: &str) -> BTreeMap<String, String> {
        self.rt.view(&self.record(bot).snapshot_key)
    }

    /// The bot's versions as (number, current).
    async fn versions(&self, bot: &str) -> Vec<(u64, bool)> {
        self.m
            .versions(bot)
            .await
            .expect("versions")
            .iter()
            .map(|v| (v.number, v.current))
            .collect()
    }

    /// `recover`, then a second one, which must change nothing. Returns the first's answer.
    async fn recover_twice(&self, what: &str) -> Vec<String> {
        let repaired = self.m.recover().await.expect("recover");
        let after = self.rt.world();
        let again = self.m.recover().await.expect("second recover");
        assert!(
            again.is_empty(),
            "{what}: second recover repaired {again:?}"
        );
        assert_eq!(
            self.rt.world(),
            after,
            "{what}: second recover changed things"
        );
        repaired
    }

    /// Asserts the lifecycle must not have reached a bot's network: teardown finds nothing
    /// to do for a bot without a saved attachment and without a namespace on the host.
    fn assert_no_host_namespace(&self, bot: &str) {
        let ns = self.m.network().netns_path(bot);
        assert!(
            !ns.exists(),
            "{} exists on this host: pick another bot id for this test",
            ns.display()
        );
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A file the bot wrote, and the content it wrote.
fn marker(n: u32) -> (String, String) {
    (format!("/data/marker{n}"), format!("step{n}"))
}

/// What `create` leaves of `bot` before its container record: the active snapshot `mcp-BOT`
/// on the image's top layer, labelled as create labels it, and the bot's state directory.
async fn create_snapshot(h: &Harness, bot: &str) -> String {
    let cid = ids::container_id(bot);
    let l = labels(&[
        (LABEL_BOT_ID, bot),
        (LABEL_IMAGE, &h.image.name),
        (LABEL_GC_ROOT, "2026-01-01T00:00:00Z"),
    ]);
    h.rt.prepare_snapshot(&cid, Some(&h.image.chain_id), &l)
        .await
        .expect("prepare the bot's snapshot");
    std::fs::create_dir_all(h.bot_dir(bot)).expect("bot dir");
    cid
}

/// A bot as a finished create leaves it: running on `mcp-BOT`, its record made by the real
/// [`Manager::create_container_record`].
async fn running_bot(h: &Harness, bot: &str) {
    let cid = create_snapshot(h, bot).await;
    h.m.create_container_record(
        bot,
        &h.image.name,
        &h.image.config,
        &cid,
        Some(&h.image.chain_id),
        &HashMap::new(),
    )
    .await
    .expect("container record");
    h.rt.create_task(&cid, &[], &TaskIo::default())
        .await
        .expect("create task");
    h.rt.start_task(&cid).await.expect("start task");
}

/// The steps of a version cycle, in the order `snapshot_locked` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Stop,
    Commit,
    Prepare,
    DeleteRecord,
    Recreate,
    Start,
}

const STEPS: [Step; 6] = [
    Step::Stop,
    Step::Commit,
    Step::Prepare,
    Step::DeleteRecord,
    Step::Recreate,
    Step::Start,
];

/// The names one cycle uses.
struct Cycle {
    /// The committed version.
    version: String,
    /// The new active snapshot.
    new_key: String,
}

/// What a version cycle of `bot` taking version `number` leaves when the agent dies right
/// after step `last`, built call by call as `snapshot_locked` makes them (with
/// `restore_from`, a rollback to that version).
async fn cycle_cut_after(
    h: &Harness,
    bot: &str,
    number: u64,
    restore_from: Option<&str>,
    last: Step,
) -> Cycle {
    let rt = &h.rt;
    let cid = ids::container_id(bot);
    let c = h.record(bot);
    let now = nanos();
    let cycle = Cycle {
        version: version_snapshot_name(bot, now),
        new_key: active_snapshot_key(bot, now),
    };
    // 1. Stop.
    rt.kill_task(&cid, libc::SIGTERM, false)
        .await
        .expect("kill");
    rt.wait_task(&cid, Duration::from_secs(1))
        .await
        .expect("wait");
    rt.delete_task(&cid).await.expect("delete task");
    if last == Step::Stop {
        return cycle;
    }
    // 2. Commit.
    let created = "2026-01-01T00:00:00Z";
    let n = number.to_string();
    let l = labels(&[
        (LABEL_BOT_ID, bot),
        (LABEL_VERSION, &n),
        (LABEL_VERSION_NAME, "cut short"),
        (LABEL_VERSION_SOURCE, "manual"),
        (LABEL_VERSION_CREATED, created),
        (LABEL_GC_ROOT, created),
        (LABEL_IMAGE, &c.image),
    ]);
    rt.commit_snapshot(&cycle.version, &c.snapshot_key, &l)
        .await
        .expect("commit");
    if last == Step::Commit {
        return cycle;
    }
    // 3. Prepare.
    let parent = restore_from.unwrap_or(&cycle.version);
    let l = labels(&[
        (LABEL_BOT_ID, bot),
        (LABEL_IMAGE, &c.image),
        (LABEL_GC_ROOT, created),
    ]);
    rt.prepare_snapshot(&cycle.new_key, Some(parent), &l)
        .await
        .expect("prepare");
    if last == Step::Prepare {
        return cycle;
    }
    // 4. Delete the record.
    assert!(rt.delete_container(&cid).await.expect("delete container"));
    if last == Step::DeleteRecord {
        return cycle;
    }
    // 5. Recreate it on the new snapshot.
    let mut l = c.labels.clone();
    l.insert(LABEL_NEXT_VERSION.to_string(), (number + 1).to_string());
    l.insert(LABEL_SNAPSHOT_PARENT.to_string(), parent.to_string());
    rt.create_container(&NewContainer {
        id: cid.clone(),
        image: c.image.clone(),
        snapshot_key: cycle.new_key.clone(),
        labels: l,
        spec: c.spec.clone().expect("spec"),
    })
    .await
    .expect("recreate");
    if last == Step::Recreate {
        return cycle;
    }
    // 6. Start.
    rt.create_task(&cid, &[], &TaskIo::default())
        .await
        .expect("create task");
    rt.start_task(&cid).await.expect("start task");
    cycle
}

#[tokio::test]
async fn a_cycle_cut_short_after_each_step_recovers_onto_the_old_or_the_new_state() {
    // Each step, as the first cycle of the bot (its state is `mcp-BOT`) and as its second.
    for earlier_cycles in [0u64, 1] {
        for step in STEPS {
            let what = format!("crash after {step:?}, {earlier_cycles} earlier cycle(s)");
            let h = harness();
            let bot = "cyc";
            running_bot(&h, bot).await;
            let mut written = BTreeMap::new();
            for k in 0..=earlier_cycles {
                let key = h.record(bot).snapshot_key;
                let (path, content) = marker(k as u32);
                h.rt.write(&key, &path, &content);
                written.insert(path, content);
                if k < earlier_cycles {
                    cycle_cut_after(&h, bot, k + 1, None, Step::Start).await;
                }
            }
            let old_key = h.record(bot).snapshot_key;
            let number = earlier_cycles + 1;
            let cycle = cycle_cut_after(&h, bot, number, None, step).await;
            // containerd's collector may run while the agent is down: the state survives it.
            assert_eq!(h.rt.collect_garbage(), Vec::<String>::new(), "{what}");

            let repaired = h.recover_twice(&what).await;
            let moved = matches!(step, Step::Commit | Step::Prepare | Step::DeleteRecord);
            let want: Vec<String> = if moved { vec![bot.into()] } else { vec![] };
            assert_eq!(repaired, want, "{what}");

            let c = h.record(bot);
            let snap = h.rt.snapshot(&c.snapshot_key).expect("the bot's snapshot");
            assert_eq!(snap.kind, SnapshotKind::Active, "{what}");
            if step == Step::Stop {
                // The old state, untouched; no new version.
                assert_eq!(c.snapshot_key, old_key, "{what}");
                assert_eq!(h.versions(bot).await.len() as u64, earlier_cycles, "{what}");
            } else {
                // The new state: on the version just taken, which is current.
                if matches!(step, Step::Prepare | Step::DeleteRecord | Step::Recreate) {
                    assert_eq!(c.snapshot_key, cycle.new_key, "{what}");
                }
                assert_eq!(
                    snap.parent.as_deref(),
                    Some(cycle.version.as_str()),
                    "{what}"
                );
                let v = h.versions(bot).await;
                assert_eq!(v.last(), Some(&(number, true)), "{what}: {v:?}");
                assert_eq!(v.len() as u64, number, "{what}: {v:?}");
                assert_eq!(
                    c.labels.get(LABEL_SNAPSHOT_PARENT),
                    Some(&cycle.version),
                    "{what}: where a later loss of this state would put the bot"
                );
                assert_eq!(
                    c.labels.get(LABEL_NEXT_VERSION).map(String::as_str),
                    Some((number + 1).to_string().as_str()),
                    "{what}"
                );
            }
            // Never a fresh one from the image: everything written before the cycle is there.
            let view = h.bot_view(bot);
            for (path, content) in &written {
                assert_eq!(view.get(path), Some(content), "{what}: {path} lost");
            }
            assert_eq!(c.labels.get(LABEL_BOT_ID).map(String::as_str), Some(bot));
            assert_eq!(
                h.rt.task_state(&c.id),
                (step == Step::Start).then_some(TaskState::Running),
                "{what}: recovery starts nothing (reconcile does)"
            );
            // Recovery's own snapshots are held too.
            assert_eq!(h.rt.collect_garbage(), Vec::<String>::new(), "{what}");
            assert_eq!(h.m.list().await.expect("list").len(), 1, "{what}");
        }
    }
}

#[tokio::test]
async fn recovery_takes_the_newest_active_snapshot_of_the_bot() {
    // An older active snapshot of the bot lies around (left by some earlier incident) when a
    // cycle is cut short with its new snapshot prepared: the bot goes on the new one, both
    // with its record (moved) and without (recreated).
    for step in [Step::Prepare, Step::DeleteRecord] {
        let what = format!("crash after {step:?}");
        let h = harness();
        let bot = "newest";
        running_bot(&h, bot).await;
        let stray = format!("{}@a1", ids::container_id(bot));
        let l = labels(&[
            (LABEL_BOT_ID, bot),
            (LABEL_IMAGE, &h.image.name),
            (LABEL_GC_ROOT, "2026-01-01T00:00:00Z"),
        ]);
        h.rt.prepare_snapshot(&stray, Some(&h.image.chain_id), &l)
            .await
            .expect("stray");
        let (path, content) = marker(1);
        h.rt.write(&h.record(bot).snapshot_key, &path, &content);
        let cycle = cycle_cut_after(&h, bot, 1, None, step).await;
        assert_eq!(h.recover_twice(&what).await, vec![bot.to_string()]);
        assert_eq!(h.record(bot).snapshot_key, cycle.new_key, "{what}");
        assert_eq!(h.bot_view(bot).get(&path), Some(&content), "{what}");
    }
}

/// Runs a real cycle of `bot` whose containerd call `method` fails (after its work when
/// `lost_answer`); the harness makes the cycle's start fail anyway. Returns the cycle's error.
async fn cycle_failing_at(h: &Harness, bot: &str, method: &str, lost_answer: bool) -> AgentError {
    if lost_answer {
        h.rt.fail_after(method, 1);
    } else {
        h.rt.fail(method, 1);
    }
    let e =
        h.m.snapshot(bot, "s", Source::Manual)
            .await
            .expect_err("the cycle cannot finish in a unit test");
    assert!(
        h.rt.pending_faults().is_empty(),
        "{method}: the cycle never called it"
    );
    e
}

#[tokio::test]
async fn the_real_cycle_stopped_by_a_failed_call_leaves_a_recoverable_bot() {
    // (the call that fails, version 1 exists afterwards, recovery has work to do)
    let cases = [
        // Step 2: the cycle's own error path restarts the bot on its state.
        (Some("commit_snapshot"), false, false),
        (Some("prepare_snapshot"), true, true),
        (Some("delete_container"), true, true),
        (Some("create_container"), true, true),
        // Only the start fails, as every start does here.
        (None, true, false),
    ];
    for (method, versioned, repairs) in cases {
        let h = harness();
        let bot = "real";
        running_bot(&h, bot).await;
        let (path, content) = marker(1);
        h.rt.write(&h.record(bot).snapshot_key, &path, &content);
        let method = match method {
            Some(method) => {
                cycle_failing_at(&h, bot, method, false).await;
                method
            }
            None => {
                let e = h.m.snapshot(bot, "s", Source::Manual).await.unwrap_err();
                assert!(e.to_string().contains("snapshot_mounts"), "{e}");
                "start"
            }
        };
        let repaired = h.recover_twice(method).await;
        assert_eq!(
            repaired.len(),
            usize::from(repairs),
            "{method}: {repaired:?}"
        );
        let c = h.record(bot);
        assert_eq!(h.bot_view(bot).get(&path), Some(&content), "{method}");
        let want = if versioned { vec![(1, true)] } else { vec![] };
        assert_eq!(h.versions(bot).await, want, "{method}");
        if versioned {
            let v = h.m.versions(bot).await.unwrap().remove(0);
            assert_eq!(c.labels.get(LABEL_SNAPSHOT_PARENT), Some(&v.snapshot));
        }
        assert_eq!(
            h.rt.task_state(&c.id),
            None,
            "{method}: the cycle stopped it"
        );
    }
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_goes_on_from_the_version() {
    let h = harness();
    let bot = "lostcommit";
    running_bot(&h, bot).await;
    let (path, content) = marker(1);
    h.rt.write(&h.record(bot).snapshot_key, &path, &content);
    let e = cycle_failing_at(&h, bot, "commit_snapshot", true).await;
    // The cycle went on past the commit and got as far as every start here does.
    assert!(
        e.to_string().contains("snapshot_mounts"),
        "the cycle stopped at the commit: {e}"
    );
    assert!(h.recover_twice("lost commit answer").await.is_empty());
    assert_eq!(h.bot_view(bot).get(&path), Some(&content));
    assert_eq!(h.versions(bot).await, vec![(1, true)]);
    assert_eq!(
        h.record(bot)
            .labels
            .get(LABEL_NEXT_VERSION)
            .map(String::as_str),
        Some("2")
    );
}

#[tokio::test]
async fn a_stopped_bot_is_versioned_and_rolled_back_without_being_started() {
    let h = harness();
    let bot = "stoppedv";
    running_bot(&h, bot).await;
    h.m.stop(bot).await.expect("stop");
    let (path, content) = marker(1);
    h.rt.write(&h.record(bot).snapshot_key, &path, &content);
    // Every start fails in this harness: a cycle that tried one would fail.
    let v =
        h.m.snapshot(bot, "s", Source::Manual)
            .await
            .expect("snapshot");
    assert_eq!(v.number, 1);
    let cid = ids::container_id(bot);
    assert_eq!(h.rt.task_state(&cid), None, "the snapshot started the bot");
    h.rt.write(&h.record(bot).snapshot_key, "/data/later", "x");
    h.m.rollback(bot, 1).await.expect("rollback");
    assert_eq!(h.rt.task_state(&cid), None, "the rollback started the bot");
    let c = h.record(bot);
    assert_eq!(
        c.labels.get(LABEL_DESIRED).map(String::as_str),
        Some("stopped")
    );
    let view = h.bot_view(bot);
    assert_eq!(view.get(&path), Some(&content));
    assert_eq!(view.get("/data/later"), None);
    assert_eq!(h.versions(bot).await, vec![(1, true), (2, false)]);
}

#[tokio::test]
async fn a_record_lost_mid_cycle_comes_back_with_what_it_carried() {
    let h = harness();
    let bot = "carried";
    running_bot(&h, bot).await;
    h.m.stop(bot).await.expect("stop");
    // The record is deleted and its re-creation fails: only snapshots are left.
    cycle_failing_at(&h, bot, "create_container", false).await;
    assert!(h.rt.container(&ids::container_id(bot)).is_none());
    assert_eq!(h.recover_twice("record lost").await, vec![bot.to_string()]);
    let c = h.record(bot);
    assert_eq!(
        c.labels.get(LABEL_DESIRED).map(String::as_str),
        Some("stopped"),
        "a stopped bot came back wanting to run"
    );
    assert_eq!(
        c.labels.get(LABEL_NEXT_VERSION).map(String::as_str),
        Some("2")
    );
    let v = h.m.versions(bot).await.expect("versions").remove(0);
    assert_eq!(c.labels.get(LABEL_SNAPSHOT_PARENT), Some(&v.snapshot));
    assert_eq!(c.labels.get(LABEL_IMAGE), Some(&h.image.name));
}

#[test]
fn the_record_label_fits_containerd_and_drops_only_the_loss_note() {
    use super::versions::{carried_record, record_label};
    let mut l = labels(&[
        (LABEL_BOT_ID, "b"),
        (LABEL_DESIRED, "stopped"),
        (LABEL_NEXT_VERSION, "7"),
        (LABEL_GC_ROOT, "x"),
    ]);
    let j = record_label(&l).expect("fits");
    let back = carried_record(&labels(&[(super::versions::LABEL_RECORD, &j)]));
    assert_eq!(back.get(LABEL_DESIRED).map(String::as_str), Some("stopped"));
    assert_eq!(back.get(LABEL_NEXT_VERSION).map(String::as_str), Some("7"));
    assert!(!back.contains_key(LABEL_BOT_ID) && !back.contains_key(LABEL_GC_ROOT));
    l.insert(LABEL_LOST_STATE.to_string(), "n".repeat(5000));
    let j = record_label(&l).expect("fits without the note");
    assert!(j.len() < 4000 && !j.contains("nnnn"), "{j}");
}

#[tokio::test]
async fn a_call_finds_a_bot_whose_cut_short_cycle_lost_its_record() {
    let h = harness();
    let bot = "cutshort";
    running_bot(&h, bot).await;
    let cycle = cycle_cut_after(&h, bot, 1, None, Step::DeleteRecord).await;
    assert!(matches!(
        h.m.info(bot).await,
        Err(AgentError::UnknownBot(_))
    ));
    let c = {
        let _g = h.m.lock_bot(bot).await;
        h.m.container_locked(bot)
            .await
            .expect("found through recovery")
    };
    assert_eq!(c.snapshot_key, cycle.new_key);
    assert_eq!(h.m.info(bot).await.expect("info").status, "absent");
}

#[tokio::test]
async fn a_create_that_died_before_its_record_leaves_no_bot() {
    let h = harness();
    let bot = "halfmade";
    let before = h.rt.world();
    create_snapshot(&h, bot).await;
    assert!(h.bot_dir(bot).is_dir());
    assert_eq!(h.recover_twice("create died").await, vec![bot.to_string()]);
    assert_eq!(h.rt.world(), before, "the snapshot stays");
    assert!(!h.bot_dir(bot).exists(), "the bot's state stays");
    assert!(h.m.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn a_bot_snapshot_holding_data_without_a_record_gets_its_container_back() {
    let h = harness();
    let bot = "vanished";
    let cid = create_snapshot(&h, bot).await;
    h.rt.write(&cid, "/data/f", "precious");
    assert_eq!(
        h.recover_twice("record vanished").await,
        vec![bot.to_string()]
    );
    let c = h.record(bot);
    assert_eq!(c.snapshot_key, cid);
    assert_eq!(
        h.bot_view(bot).get("/data/f").map(String::as_str),
        Some("precious")
    );
    assert_eq!(c.labels.get(LABEL_SNAPSHOT_PARENT), Some(&h.image.chain_id));
    assert_eq!(
        c.labels.get(LABEL_DESIRED).map(String::as_str),
        Some("running")
    );
    assert_eq!(c.labels.get(LABEL_IMAGE), Some(&h.image.name));
    assert!(ids::token_path(&h.m.config().state_dir, bot).is_file());
}

#[tokio::test]
async fn a_create_whose_record_fails_takes_its_snapshot_back() {
    let h = harness();
    let bot = "norecord";
    let before = h.rt.world();
    h.rt.fail("create_container", 1);
    let e =
        h.m.create(bot, None, &Default::default(), &Default::default())
            .await
            .expect_err("the record failed");
    assert!(e.to_string().contains("create_container"), "{e}");
    assert_eq!(h.rt.world(), before, "undone by the create itself");
    assert!(!h.bot_dir(bot).exists(), "its token goes too");
    // The id is free: a create now gets as far as the start.
    let e =
        h.m.create(bot, None, &Default::default(), &Default::default())
            .await
            .expect_err("no start in unit tests");
    assert!(e.to_string().contains("snapshot_mounts"), "{e}");
    assert_eq!(h.record(bot).snapshot_key, ids::container_id(bot));
}

#[tokio::test]
async fn a_create_whose_record_was_made_but_not_confirmed_keeps_the_bot() {
    let h = harness();
    let bot = "unconfirmed";
    h.rt.fail_after("create_container", 1);
    h.m.create(bot, None, &Default::default(), &Default::default())
        .await
        .expect_err("the answer was lost");
    // The bot exists (its record does): nothing of it is undone; reconcile starts it.
    let c = h.record(bot);
    assert!(h.rt.snapshot(&c.snapshot_key).is_some());
    assert!(ids::token_path(&h.m.config().state_dir, bot).is_file());
    assert!(h.recover_twice("unconfirmed record").await.is_empty());
}

#[tokio::test]
async fn a_failed_create_containerd_cannot_confirm_is_undone_by_recovery() {
    let h = harness();
    let bot = "unsure";
    let before = h.rt.world();
    h.rt.fail("create_container", 1);
    // The undo asks whether the record exists (the create's fourth look at it, after its
    // own, recovery's and the lookup that found no bot), and containerd does not answer.
    h.rt.fail("get_container", 4);
    let e =
        h.m.create(bot, None, &Default::default(), &Default::default())
            .await
            .expect_err("the record failed");
    assert!(e.to_string().contains("create_container"), "{e}");
    assert!(h.rt.pending_faults().is_empty(), "the undo never asked");
    assert!(
        h.rt.snapshot(&ids::container_id(bot)).is_some(),
        "kept for now"
    );
    assert_eq!(
        h.recover_twice("unsure create").await,
        vec![bot.to_string()]
    );
    assert_eq!(h.rt.world(), before);
    assert!(!h.bot_dir(bot).exists());
}

#[tokio::test]
async fn versions_kept_by_bot_rm_stay_for_a_later_bot_of_that_id() {
    let h = harness();
    let bot = "unit-fake-keep";
    h.assert_no_host_namespace(bot);
    running_bot(&h, bot).await;
    h.rt.write(&h.record(bot).snapshot_key, "/data/f", "kept");
    let v1 = cycle_cut_after(&h, bot, 1, None, Step::Start).await;
    h.m.delete(bot, true).await.expect("bot rm --keep-versions");
    assert!(h.m.list().await.expect("list").is_empty());
    assert!(!h.bot_dir(bot).exists());
    let world = h.rt.world();
    let left: Vec<(&String, SnapshotKind)> = world
        .snapshots
        .iter()
        .filter(|(_, s)| s.labels.contains_key(LABEL_BOT_ID))
        .map(|(k, s)| (k, s.kind))
        .collect();
    assert_eq!(left, vec![(&v1.version, SnapshotKind::Committed)]);

    // Recovery does not take them for a bot that lost its record.
    assert!(h.recover_twice("kept versions").await.is_empty());
    assert_eq!(h.rt.world(), world);

    // A new bot of that id starts empty, sees the kept version, and numbers go on from it.
    h.m.create(bot, None, &Default::default(), &Default::default())
        .await
        .expect_err("no start in unit tests");
    assert_eq!(h.bot_view(bot).get("/data/f"), None);
    assert_eq!(h.versions(bot).await, vec![(1, false)]);
    let c = h.record(bot);
    assert_eq!(h.m.next_version(bot, &c).await.expect("next"), 2);
}

#[tokio::test]
async fn bot_rm_removes_every_version_children_first() {
    let h = harness();
    let bot = "unit-fake-rm";
    h.assert_no_host_namespace(bot);
    running_bot(&h, bot).await;
    let v1 = cycle_cut_after(&h, bot, 1, None, Step::Start).await;
    cycle_cut_after(&h, bot, 2, None, Step::Start).await;
    // A rollback to 1: version 3 keeps the state before it, the bot runs on 1 again.
    cycle_cut_after(&h, bot, 3, Some(&v1.version), Step::Start).await;
    assert_eq!(
        h.versions(bot).await,
        vec![(1, true), (2, false), (3, false)]
    );
    let mut before = h.rt.world();
    h.m.delete(bot, false).await.expect("bot rm");
    before
        .snapshots
        .retain(|_, s| !s.labels.contains_key(LABEL_BOT_ID));
    before.containers.clear();
    before.tasks.clear();
    assert_eq!(h.rt.world(), before, "only the image is left");
    assert!(h.recover_twice("after rm").await.is_empty());
}

#[tokio::test]
async fn an_interrupted_delete_is_finished_by_reconcile_not_undone() {
    let h = harness();
    let bot = "unit-fake-del";
    h.assert_no_host_namespace(bot);
    running_bot(&h, bot).await;
    cycle_cut_after(&h, bot, 1, None, Step::Start).await;
    let before = h.rt.world();
    // The agent died right after `bot rm` marked the record.
    h.rt.update_container_labels(
        &ids::container_id(bot),
        &labels(&[(LABEL_DESIRED, DESIRED_DELETED)]),
    )
    .await
    .expect("mark");
    let marked = h.rt.world();
    assert!(h.recover_twice("marked deleted").await.is_empty());
    assert_eq!(
        h.rt.world(),
        marked,
        "recovery leaves a delete to reconcile"
    );
    // No bot wants running here, so reconcile starts and attaches nothing.
    assert_eq!(h.m.reconcile().await.expect("reconcile"), 0);
    let mut want = before;
    want.snapshots
        .retain(|_, s| !s.labels.contains_key(LABEL_BOT_ID));
    want.containers.clear();
    want.tasks.clear();
    assert_eq!(h.rt.world(), want);
    assert!(!h.bot_dir(bot).exists());
}

#[tokio::test]
async fn a_state_containerd_lost_mid_commit_goes_back_on_the_recorded_parent() {
    // (history before the loss, the parent label kept, the version the bot must run on again:
    // None for its image)
    #[derive(Debug, Clone, Copy)]
    enum History {
        /// Never versioned: the bot runs on `mcp-BOT` from the image.
        Fresh,
        /// Versions 1 and 2, then a rollback to 1 (version 3): the newest version is not
        /// the parent.
        RolledBack,
    }
    let cases = [
        (History::Fresh, true, None),
        (History::RolledBack, true, Some(1u64)),
        // A container from before the parent label was kept: the newest version.
        (History::RolledBack, false, Some(3)),
    ];
    for (history, parent_label, want_version) in cases {
        let what = format!("{history:?}, parent label {parent_label}");
        let h = harness();
        let bot = "lost";
        running_bot(&h, bot).await;
        let (p0, c0) = marker(0);
        h.rt.write(&h.record(bot).snapshot_key, &p0, &c0);
        let mut names = HashMap::new();
        if let History::RolledBack = history {
            let v1 = cycle_cut_after(&h, bot, 1, None, Step::Start).await;
            let v2 = cycle_cut_after(&h, bot, 2, None, Step::Start).await;
            let v3 = cycle_cut_after(&h, bot, 3, Some(&v1.version), Step::Start).await;
            names.insert(1u64, v1.version);
            names.insert(2, v2.version);
            names.insert(3, v3.version);
        }
        if !parent_label {
            h.rt.update_container_labels(
                &ids::container_id(bot),
                &labels(&[(LABEL_SNAPSHOT_PARENT, "")]),
            )
            .await
            .expect("drop the label");
        }
        // Written after the last version: what the loss takes.
        let lost_key = h.record(bot).snapshot_key;
        h.rt.write(&lost_key, "/data/after", "gone");
        h.rt.kill_task(&ids::container_id(bot), libc::SIGKILL, true)
            .await
            .expect("kill");
        h.rt.delete_task(&ids::container_id(bot))
            .await
            .expect("delete task");
        h.rt.lose(&lost_key);

        assert_eq!(
            h.recover_twice(&what).await,
            vec![bot.to_string()],
            "{what}"
        );
        let c = h.record(bot);
        let snap = h.rt.snapshot(&c.snapshot_key).expect("the bot's snapshot");
        let want_parent = match want_version {
            Some(n) => names[&n].clone(),
            None => h.image.chain_id.clone(),
        };
        assert_eq!(snap.parent.as_ref(), Some(&want_parent), "{what}");
        assert_eq!(
            c.labels.get(LABEL_SNAPSHOT_PARENT),
            Some(&want_parent),
            "{what}"
        );
        assert!(
            !h.rt.world().snapshots.contains_key(&lost_key),
            "{what}: the lost key is cleared"
        );
        let view = h.bot_view(bot);
        assert_eq!(view.get("/data/after"), None, "{what}");
        assert_eq!(view.get(&p0), want_version.map(|_| &c0), "{what}");
        let note = h.m.info(bot).await.expect("info").lost_state;
        let note = note.unwrap_or_else(|| panic!("{what}: the loss is not recorded"));
        let on = match want_version {
            Some(n) => format!("runs on version {n} again"),
            None => format!("runs on its image {} again", h.image.name),
        };
        assert!(note.contains(&on), "{what}: {note}");
        assert_eq!(c.labels.get(LABEL_LOST_STATE), Some(&note));
    }
}

#[tokio::test]
async fn version_numbers_are_not_reused_after_a_lost_state() {
    let h = harness();
    let bot = "reuse";
    running_bot(&h, bot).await;
    let v1 = cycle_cut_after(&h, bot, 1, None, Step::Start).await;
    cycle_cut_after(&h, bot, 2, None, Step::Start).await;
    cycle_cut_after(&h, bot, 3, Some(&v1.version), Step::Start).await;
    h.m.remove_version(bot, 3).await.expect("3 is a leaf");
    let c = h.record(bot);
    assert_eq!(h.m.next_version(bot, &c).await.unwrap(), 4);
    h.rt.kill_task(&c.id, libc::SIGKILL, true).await.unwrap();
    h.rt.delete_task(&c.id).await.unwrap();
    h.rt.lose(&c.snapshot_key);
    h.m.recover().await.unwrap();
    let c = h.record(bot);
    assert_eq!(h.m.next_version(bot, &c).await.unwrap(), 4, "3 was removed");
}

#[tokio::test]
async fn one_bot_that_cannot_be_recovered_does_not_block_the_others() {
    let h = harness();
    // "a" lost its record and its image is gone: its recovery fails.
    let a = create_snapshot(&h, "a").await;
    h.rt.write(&a, "/data/f", "x");
    h.rt.update_snapshot_labels(&a, &labels(&[(LABEL_IMAGE, "gone:1")]))
        .await
        .unwrap();
    // "b" was cut short after its commit.
    running_bot(&h, "b").await;
    cycle_cut_after(&h, "b", 1, None, Step::Commit).await;
    let _ = h.m.recover().await;
    let c = h.record("b");
    assert!(
        h.rt.snapshot(&c.snapshot_key).is_some(),
        "b is still broken"
    );
}

#[tokio::test]
async fn versions_list_and_remove_refuses_parents() {
    let h = harness();
    let bot = "ver";
    running_bot(&h, bot).await;
    let v1 = cycle_cut_after(&h, bot, 1, None, Step::Start).await;
    cycle_cut_after(&h, bot, 2, None, Step::Start).await;
    cycle_cut_after(&h, bot, 3, Some(&v1.version), Step::Start).await;
    let v = h.m.versions(bot).await.expect("versions");
    let listed: Vec<(u64, &str, &str, bool)> = v
        .iter()
        .map(|v| (v.number, v.name.as_str(), v.source.as_str(), v.current))
        .collect();
    assert_eq!(
        listed,
        vec![
            (1, "cut short", "manual", true),
            (2, "cut short", "manual", false),
            (3, "cut short", "manual", false),
        ]
    );
    let refused = |e: AgentError| match e {
        AgentError::FailedPrecondition(m) => m,
        e => panic!("not a refusal: {e}"),
    };
    let why = refused(h.m.remove_version(bot, 1).await.unwrap_err());
    assert!(
        why.contains("version 2") && why.contains("the bot's current state"),
        "{why}"
    );
    let why = refused(h.m.remove_version(bot, 2).await.unwrap_err());
    assert!(why.contains("version 3"), "{why}");
    assert!(matches!(
        h.m.remove_version(bot, 9).await,
        Err(AgentError::InvalidArgument(_))
    ));
    h.m.remove_version(bot, 3).await.expect("a leaf goes");
    let numbers: Vec<u64> = h.versions(bot).await.iter().map(|v| v.0).collect();
    assert_eq!(numbers, vec![1, 2]);
    // Numbers are never reused while the container keeps its counter.
    let c = h.record(bot);
    assert_eq!(h.m.next_version(bot, &c).await.expect("next"), 4);
}

#[test]
fn restart_backoff_doubles_from_250_ms_to_30_s_and_starts_over_after_a_minute() {
    let t0 = Instant::now();
    let mut h = Health {
        last_start: Some(t0),
        ..Health::default()
    };
    let ms = Duration::from_millis;
    let mut delays = Vec::new();
    for _ in 0..10 {
        delays.push(restart_delay(&mut h, t0 + Duration::from_secs(1)));
    }
    assert_eq!(
        delays,
        [
            ms(250),
            ms(500),
            ms(1000),
            ms(2000),
            ms(4000),
            ms(8000),
            ms(16000),
            ms(30000),
            ms(30000),
            ms(30000)
        ]
    );
    // An exit the agent caused: the same delay as now, no step further, and only once.
    let mut h = Health {
        last_start: Some(t0),
        backoff: 2,
        stopping: true,
        ..Health::default()
    };
    assert_eq!(restart_delay(&mut h, t0), ms(1000));
    assert_eq!((h.backoff, h.stopping), (2, false));
    assert_eq!(restart_delay(&mut h, t0), ms(1000));
    assert_eq!(h.backoff, 3);
    // A minute up is not enough; more is.
    let at = |secs| t0 + Duration::from_secs(secs);
    let mut h = Health {
        last_start: Some(t0),
        backoff: 5,
        ..Health::default()
    };
    assert_eq!(restart_delay(&mut h, at(60)), ms(8000));
    assert_eq!(restart_delay(&mut h, at(61)), ms(250));
    assert_eq!(h.backoff, 1);
    // Never started by this agent: no reset.
    let mut h = Health {
        backoff: 3,
        ..Health::default()
    };
    assert_eq!(restart_delay(&mut h, at(3600)), ms(2000));
}

#[tokio::test]
async fn limits_are_recorded_put_on_the_spec_and_updated_on_a_live_task() {
    use super::limits::{Limits, LimitsChange, LABEL_MEMORY, LABEL_PIDS};
    let h = harness();
    let bot = "limited";
    running_bot(&h, bot).await;
    // A record from before limits: none recorded, nothing on its spec.
    assert!(!h.record(bot).labels.contains_key(LABEL_MEMORY));
    let cid = ids::container_id(bot);
    let st = h.m.info(bot).await.expect("info");
    assert_eq!(st.limits, h.m.config().bot_defaults.limits());

    // A live update: the task's cgroup at once, the labels and the spec for later starts.
    let change = LimitsChange::parse("256MiB", "0.5", "128", "").unwrap();
    let info = h.m.update(bot, &change).await.expect("update");
    let want = Limits {
        memory: Some(256 << 20),
        millicpus: Some(500),
        pids: Some(128),
        disk: h.m.config().bot_defaults.limits().disk,
    };
    assert_eq!(info.limits, want);
    let r = h.rt.task_resources(&cid).expect("the task was updated");
    assert_eq!(r.memory().as_ref().unwrap().limit(), Some(256 << 20));
    assert_eq!(r.pids().as_ref().unwrap().limit(), 128);
    let c = h.record(bot);
    assert_eq!(c.labels.get(LABEL_PIDS).map(String::as_str), Some("128"));
    let spec = c.spec.as_ref().unwrap();
    let res = spec.linux().as_ref().unwrap().resources().as_ref().unwrap();
    assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(50_000));
    assert!(
        res.devices().as_ref().is_some_and(|d| !d.is_empty()),
        "device rules kept"
    );
    assert_eq!(
        spec.process().as_ref().unwrap().oom_score_adj(),
        crate::containerd::spec::server_oom_score_adj()
    );

    // A limit no bot can run under changes nothing.
    let e =
        h.m.update(
            bot,
            &LimitsChange {
                pids: Some(Some(2)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pids limit below"), "{e}");
    assert_eq!(h.m.info(bot).await.unwrap().limits, want);

    // They survive a version cycle (the record is recreated with its labels and spec).
    let _ = h.m.snapshot(bot, "s", Source::Manual).await;
    assert_eq!(h.m.info(bot).await.unwrap().limits, want);
}

#[tokio::test]
async fn a_start_records_the_defaults_on_a_bot_from_before_limits() {
    use super::limits::LABEL_MEMORY;
    let h = harness();
    let bot = "oldbot";
    running_bot(&h, bot).await;
    h.m.stop(bot).await.expect("stop");
    // The start ends at the harness's failing mounts call, after the limits went on.
    let _ = h.m.start(bot).await.unwrap_err();
    let c = h.record(bot);
    assert_eq!(
        c.labels.get(LABEL_MEMORY).map(String::as_str),
        Some((1u64 << 30).to_string().as_str())
    );
    let spec = c.spec.as_ref().unwrap();
    let res = spec.linux().as_ref().unwrap().resources().as_ref().unwrap();
    assert_eq!(res.memory().as_ref().unwrap().limit(), Some(1 << 30));
    assert_eq!(res.memory().as_ref().unwrap().swap(), Some(1 << 30));
}

#[tokio::test]
async fn an_oom_kill_before_the_watchers_first_look_at_a_new_task_is_a_new_one() {
    let h = harness();
    let bot = "hungry";
    running_bot(&h, bot).await;
    h.m.stop(bot).await.expect("stop");
    // The start ends at the harness's failing mounts call, after the limits went on.
    let _ = h.m.start(bot).await.unwrap_err();
    // The new task's cgroup counts from zero: its first kill is reported at the first look.
    assert_eq!(h.m.note_oom_kills(bot, 1), Some(1));
    assert_eq!(h.m.note_oom_kills(bot, 1), None);
    assert_eq!(h.m.note_oom_kills(bot, 3), Some(2));
}

#[tokio::test]
async fn a_paused_bot_is_left_alone_and_says_so() {
    let h = harness();
    let bot = "frozen";
    running_bot(&h, bot).await;
    let cid = ids::container_id(bot);
    let info = h.m.pause(bot).await.expect("pause");
    assert_eq!(info.status, "paused");
    assert_eq!(h.rt.task_state(&cid), Some(TaskState::Paused));
    assert_eq!(
        h.record(bot).labels.get(LABEL_DESIRED).map(String::as_str),
        Some("paused")
    );
    // Calls get UNAVAILABLE at once, with the reason.
    let e = h.m.client(bot).await.unwrap_err();
    assert!(matches!(e, AgentError::BotUnavailable { .. }), "{e}");
    assert!(e.to_string().contains("bot is paused"), "{e}");
    // Reconcile neither starts nor restarts it.
    assert_eq!(h.m.reconcile().await.expect("reconcile"), 0);
    assert_eq!(h.rt.task_state(&cid), Some(TaskState::Paused));
    // A stopped bot says "stopped", not "absent"; stopping a paused one works.
    let info = h.m.stop(bot).await.expect("stop a paused bot");
    assert_eq!(info.status, "stopped");
    assert!(
        h.m.pause(bot).await.is_err(),
        "a stopped bot cannot be paused"
    );
}

/// A spec with environment, DNS and hostname (mounts need a directory `mount_allowed` names).
fn some_spec() -> super::spec::BotSpec {
    super::spec::BotSpec::parse(
        &["A=1".into(), "A=2".into()],
        &["10.9.8.7".into()],
        &["corp.example".into()],
        "spec-host",
        vec![],
    )
    .expect("spec")
}

/// The checks of [`some_spec`] on the record of `bot` and its resolv.conf.
fn assert_has_some_spec(h: &Harness, bot: &str, what: &str) {
    let c = h.record(bot);
    assert_eq!(
        super::spec::BotSpec::from_labels(&c.labels).expect("label"),
        some_spec(),
        "{what}"
    );
    let spec = c.spec.expect("runtime spec");
    assert_eq!(spec.hostname().as_deref(), Some("spec-host"), "{what}");
    let env = spec.process().as_ref().unwrap().env().clone().unwrap();
    assert!(env.contains(&"A=2".to_string()), "{what}: {env:?}");
    assert!(!env.contains(&"A=1".to_string()), "{what}: {env:?}");
    let resolv = h.bot_dir(bot).join("resolv.conf");
    let mount = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == std::path::Path::new("/etc/resolv.conf"))
        .expect("resolv.conf mount");
    assert_eq!(mount.source().as_deref(), Some(resolv.as_path()), "{what}");
    let text = std::fs::read_to_string(&resolv).expect("resolv.conf written");
    assert!(
        text.contains("nameserver 10.9.8.7\nsearch corp.example\n"),
        "{what}: {text}"
    );
}

#[tokio::test]
async fn a_lost_record_is_rebuilt_with_the_bots_spec() {
    let h = harness();
    let bot = "spec";
    let cid = create_snapshot(&h, bot).await;
    h.m.create_container_record(
        bot,
        &h.image.name,
        &h.image.config,
        &cid,
        Some(&h.image.chain_id),
        &some_spec().labels(),
    )
    .await
    .expect("container record");
    assert_has_some_spec(&h, bot, "created");
    h.m.stop(bot).await.expect("stop");
    cycle_failing_at(&h, bot, "create_container", false).await;
    assert!(h.rt.container(&ids::container_id(bot)).is_none());
    std::fs::remove_file(h.bot_dir(bot).join("resolv.conf")).expect("resolv.conf");
    assert_eq!(h.recover_twice("record lost").await, vec![bot.to_string()]);
    assert_has_some_spec(&h, bot, "rebuilt by recovery");
}

#[tokio::test]
async fn a_create_of_an_existing_bot_with_another_spec_is_a_conflict() {
    let h = harness();
    let bot = "specconflict";
    running_bot(&h, bot).await;
    let e =
        h.m.create(bot, None, &Default::default(), &some_spec())
            .await
            .expect_err("another spec");
    assert!(
        matches!(&e, AgentError::FailedPrecondition(m) if m.contains("another spec")),
        "{e}"
    );
    // A mount outside `mount_allowed` (none here) is refused before anything is looked at.
    let mut with_mount = some_spec();
    with_mount.mounts.push(super::spec::SpecMount {
        host: h.bot_dir(bot),
        container: "/mnt/x".into(),
    });
    let e =
        h.m.create("other", None, &Default::default(), &with_mount)
            .await
            .expect_err("no mount allowed");
    assert!(e.to_string().contains("mount_allowed"), "{e}");
    assert!(h.rt.container(&ids::container_id("other")).is_none());
}

/// A mount as (destination, source, options).
type MountView = (String, String, Vec<String>);

/// The spec of `bot`'s record: its process args and its mounts.
fn args_and_mounts(h: &Harness, bot: &str) -> (Vec<String>, Vec<MountView>) {
    let c = h.record(bot);
    let spec = c.spec.expect("spec");
    let args = spec.process().as_ref().unwrap().args().clone().unwrap();
    let mounts = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m.destination().display().to_string(),
                m.source()
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_default(),
                m.options().clone().unwrap_or_default(),
            )
        })
        .collect();
    (args, mounts)
}

#[tokio::test]
async fn a_record_of_an_older_agent_runs_the_hosts_server_from_its_next_start() {
    use crate::containerd::spec::bridge::{BRIDGE_PATH, RUN_DIR};
    let h = harness();
    let bot = "oldsrv";
    running_bot(&h, bot).await;
    let (args, mounts) = args_and_mounts(&h, bot);
    assert_eq!(args, [BRIDGE_PATH], "a new record runs the host's server");
    assert!(mounts.iter().any(|m| m.0 == BRIDGE_PATH));
    // What an older agent wrote: the image's entrypoint, no server mounts.
    let cid = ids::container_id(bot);
    let mut old = h.record(bot).spec.unwrap();
    old.process_mut()
        .as_mut()
        .unwrap()
        .set_args(Some(vec!["/entrypoint.sh".into(), "--flag".into()]));
    let kept: Vec<_> = old
        .mounts()
        .clone()
        .unwrap()
        .into_iter()
        .filter(|m| m.destination() != std::path::Path::new(BRIDGE_PATH))
        .filter(|m| m.destination() != std::path::Path::new(RUN_DIR))
        .collect();
    old.set_mounts(Some(kept));
    h.rt.update_container_spec(&cid, &old).await.unwrap();
    h.m.stop(bot).await.expect("stop");
    // The start ends at the harness's failing mounts call, after the spec was rewritten.
    let _ = h.m.start(bot).await.unwrap_err();
    let (args, mounts) = args_and_mounts(&h, bot);
    assert_eq!(args, [BRIDGE_PATH, "--flag"]);
    let cfg = h.m.config();
    let bridge = mounts
        .iter()
        .find(|m| m.0 == BRIDGE_PATH)
        .expect("bridge mount");
    assert_eq!(bridge.1, cfg.server_binary.display().to_string());
    for o in ["bind", "ro", "nosuid", "nodev"] {
        assert!(bridge.2.iter().any(|x| x == o), "{o} missing: {bridge:?}");
    }
    assert!(
        !bridge.2.iter().any(|x| x == "rw" || x == "rbind"),
        "{bridge:?}"
    );
    let run_dir = ids::run_dir(&cfg.state_dir, &cfg.namespace, bot);
    let at = |d: &str| mounts.iter().position(|m| m.0 == d).expect(d);
    let run = &mounts[at(RUN_DIR)];
    assert_eq!(run.1, run_dir.display().to_string());
    assert!(run.2.iter().any(|x| x == "rw") && run.2.iter().any(|x| x == "noexec"));
    assert!(at("/run") < at(RUN_DIR) && at(RUN_DIR) < at(super::TOKEN_MOUNT));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&run_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o750);
    // The run directory goes with the bot.
    h.m.delete(bot, false).await.expect("delete");
    assert!(!run_dir.exists());
}

#[tokio::test]
async fn a_missing_or_non_executable_server_binary_fails_the_start_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    let h = harness();
    let bot = "nosrv";
    running_bot(&h, bot).await;
    h.m.stop(bot).await.expect("stop");
    let bin = h.m.config().server_binary.clone();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = h.m.start(bot).await.unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "server binary {}: is not executable (server_binary in agent.toml)",
            bin.display()
        )
    );
    std::fs::remove_file(&bin).unwrap();
    let e = h.m.start(bot).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("server binary {}: does not exist", bin.display())),
        "{e}"
    );
}

#[tokio::test]
async fn a_bot_gets_a_relay_only_with_an_allow_list_and_loses_it_with_its_route() {
    let h = harness();
    h.m.attach_self();
    h.m.ensure_relay("b1", true);
    assert!(
        super::lock(&h.m.relays).is_empty(),
        "no allow-list, no relay"
    );
    let mut cfg = h.m.config().clone();
    cfg.reverse_http =
        crate::config::Config::parse("[reverse_http]\nallow = [\"http://127.0.0.1:9/hooks/\"]")
            .unwrap()
            .reverse_http;
    let rt: Arc<dyn crate::containerd::Runtime> = h.rt.clone();
    let m = Arc::new(Manager::new(cfg, rt, h.m.network().clone()));
    m.attach_self();
    m.ensure_relay("b1", false);
    m.ensure_relay("b1", true);
    assert_eq!(super::lock(&m.relays).len(), 1, "one relay a bot");
    // Stop, delete and a crash all forget the route: the relay ends with it.
    m.forget_route("b1");
    assert!(super::lock(&m.relays).is_empty());
    assert!(
        m.shutdown(Duration::from_secs(5)).await,
        "the relay's task ended"
    );
}
