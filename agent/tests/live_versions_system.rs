//! System tests of versions taken without a restart (issue 18): the real `memoh-agent` daemon
//! and CLI against real containerd. A running bot keeps its processes and open exec streams
//! through `snapshot create`; rollback unpacks the version's image; a version pushed from one
//! host (agent + private containerd + network) makes a bot on another through the loopback
//! registry; an agent killed at every step of a live cycle or a rollback leaves the bot
//! running, the version complete or absent, and no lease, view, ingest or blob behind.

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ctrd::PrivateContainerd;
use common::{block_on, Env, TestAgent};
use containerd_client::services::v1::{
    content_client::ContentClient, leases_client::LeasesClient, ListContentRequest,
    ListRequest as LeaseListRequest, ListStatusesRequest,
};
use memoh_agent::containerd::prelude::*;

/// The agent's test-only fault hook (`memoh_agent::bots::fault::FAULT_ENV`).
const FAULT_ENV: &str = "MEMOH_FAULT_SNAPSHOT_STEP";

#[derive(Debug, Clone, PartialEq, Eq)]
struct V {
    number: u64,
    name: String,
    source: String,
    current: bool,
    image: String,
    origin: String,
}

fn versions(a: &TestAgent, bot: &str) -> Vec<V> {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&a.ok(&["snapshot", "ls", bot, "--json"])).expect("ls --json");
    v.iter()
        .map(|e| V {
            number: e["version"].as_u64().unwrap_or_else(|| panic!("{e}")),
            name: e["name"].as_str().unwrap_or_default().to_string(),
            source: e["source"].as_str().unwrap_or_default().to_string(),
            current: e["current"].as_bool().unwrap_or_default(),
            image: e["image"].as_str().unwrap_or_default().to_string(),
            origin: e["origin"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

/// `snapshot create` (live); returns the number and the pause it printed, in ms.
fn snapshot(a: &TestAgent, bot: &str, name: &str) -> (u64, f64, f64) {
    let out = a.ok(&["snapshot", "create", bot, "--name", name]);
    // "version N CREATED paused P ms, took T ms"
    let f: Vec<_> = out.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"version"), "{out:?}");
    assert_eq!(f.get(3), Some(&"paused"), "{out:?}");
    let n = f[1].parse().unwrap_or_else(|_| panic!("{out:?}"));
    let pause = f[4].parse().unwrap_or_else(|_| panic!("{out:?}"));
    let took = f[7].parse().unwrap_or_else(|_| panic!("{out:?}"));
    (n, pause, took)
}

fn wait_exec(a: &TestAgent, bot: &str, what: &str) {
    a.wait_for(what, Duration::from_secs(30), || {
        a.try_cli(&["exec", bot, "--", "true"])
            .is_ok_and(|o| o.status.success())
    });
}

fn wait_dead(a: &mut TestAgent, what: &str) {
    let t = Instant::now();
    while a.running() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: the agent still runs:\n{}",
            a.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ns_request<T>(ns: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", ns.parse().unwrap());
    r
}

/// What a cycle could leave in the agent's namespace: cycle leases, ingests, diff views, and
/// every blob's digest.
#[derive(Debug, Default)]
struct Store {
    leases: Vec<String>,
    ingests: Vec<String>,
    views: Vec<String>,
    actives: Vec<String>,
    blobs: BTreeSet<String>,
}

fn store(a: &TestAgent, bot: &str) -> Store {
    block_on(async {
        let c = a.containerd().await;
        let ns = a.namespace.clone();
        let leases = LeasesClient::new(c.channel())
            .list(ns_request(
                &ns,
                LeaseListRequest {
                    filters: vec![r#"labels."memoh.version.lease""#.to_string()],
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .leases
            .into_iter()
            .map(|l| l.id)
            .collect();
        let ingests = ContentClient::new(c.channel())
            .list_statuses(ns_request(&ns, ListStatusesRequest { filters: vec![] }))
            .await
            .unwrap()
            .into_inner()
            .statuses
            .into_iter()
            .map(|s| s.r#ref)
            .collect();
        let mut blobs = BTreeSet::new();
        let mut s = ContentClient::new(c.channel())
            .list(ns_request(&ns, ListContentRequest { filters: vec![] }))
            .await
            .unwrap()
            .into_inner();
        while let Some(m) = s.message().await.unwrap() {
            blobs.extend(m.info.into_iter().map(|i| i.digest));
        }
        let snaps = c.list_snapshots(&[]).await.unwrap();
        let views = snaps
            .iter()
            .filter(|s| s.name.starts_with("memoh-diff-view-"))
            .map(|s| s.name.clone())
            .collect();
        let actives = snaps
            .iter()
            .filter(|s| {
                s.kind == memoh_agent::containerd::SnapshotKind::Active
                    && s.labels.get("mcp.bot_id").map(String::as_str) == Some(bot)
            })
            .map(|s| s.name.clone())
            .collect();
        Store {
            leases,
            ingests,
            views,
            actives,
            blobs,
        }
    })
}

/// The digests an image references: its manifest, config and layers (all must exist).
fn image_blobs(a: &TestAgent, image: &str) -> BTreeSet<String> {
    block_on(async {
        let c = a.containerd().await;
        let r = c
            .resolve_image(image)
            .await
            .expect("a listed version resolves");
        let mut s = ContentClient::new(c.channel())
            .read(ns_request(
                &a.namespace,
                containerd_client::services::v1::ReadContentRequest {
                    digest: r.manifest_digest.clone(),
                    offset: 0,
                    size: 0,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            bytes.extend(m.data);
        }
        let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let mut out = BTreeSet::from([r.manifest_digest, r.config_digest]);
        for l in m["layers"].as_array().unwrap() {
            out.insert(l["digest"].as_str().unwrap().to_string());
        }
        out
    })
}

fn sha_of(a: &TestAgent, bot: &str, path: &str) -> String {
    a.sh_in(bot, &format!("sha256sum {path} | cut -d' ' -f1"))
}

#[test]
fn live_versions_keep_processes_and_streams_then_rollback() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("live");
    // A detached process counting, and an exec stream printing ticks.
    let pid = a.sh_in(
        &bot,
        "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; \
         mv /tmp/counter.new /tmp/counter; sleep 0.05; done' </dev/null >/dev/null 2>&1 & echo $!",
    );
    let pid = pid.trim().to_string();
    let mut stream = a
        .command(&[
            "exec",
            &bot,
            "--",
            "sh",
            "-c",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("exec stream");
    let ticks: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let reader = {
        let out = stream.stdout.take().unwrap();
        let ticks = ticks.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("tick ").and_then(|n| n.parse().ok()) {
                    ticks.lock().unwrap().push((Instant::now(), n));
                }
            }
        })
    };
    a.wait_for("the stream ticks", Duration::from_secs(10), || {
        ticks.lock().unwrap().len() > 3
    });

    a.sh_in(
        &bot,
        "echo one > /data/v.txt; head -c 1048576 /dev/urandom > /data/blob",
    );
    let blob1 = sha_of(&a, &bot, "/data/blob");
    let counter = |a: &TestAgent| -> u64 {
        a.sh_in(&bot, "cat /tmp/counter")
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let mut pauses = Vec::new();
    let mut last = counter(&a);
    for (i, name) in ["first", "second"].iter().enumerate() {
        if i == 1 {
            a.sh_in(&bot, "echo two > /data/v.txt; echo new > /data/only-in-2");
        }
        let (n, pause, took) = snapshot(&a, &bot, name);
        assert_eq!(n, i as u64 + 1);
        pauses.push((pause, took));
        // The counter was never restarted: same process, counting on.
        assert_eq!(
            a.sh_in(&bot, &format!("kill -0 {pid} && echo alive")),
            "alive\n",
            "the detached counter died in version {n}"
        );
        std::thread::sleep(Duration::from_millis(200));
        let now = counter(&a);
        assert!(
            now > last,
            "the counter restarted or stopped: {last} then {now}"
        );
        last = now;
    }
    // The stream never broke: it still runs and its ticks kept coming in order.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        stream.try_wait().unwrap().is_none(),
        "the exec stream ended during a version"
    );
    {
        let t = ticks.lock().unwrap();
        assert!(
            t.windows(2).all(|w| w[1].1 == w[0].1 + 1),
            "ticks lost or restarted"
        );
        let gap = t
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default();
        println!("longest gap between stream ticks: {gap:?}");
    }
    for (i, (p, t)) in pauses.iter().enumerate() {
        println!("version {}: paused {p:.1} ms, cycle {t:.1} ms", i + 1);
    }
    let v = versions(&a, &bot);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(
        v.iter()
            .all(|v| !v.image.is_empty() && v.source == "manual"),
        "{v:?}"
    );
    assert!(v[1].current && !v[0].current, "{v:?}");

    // Rollback restores the first version's files, from its image.
    let out = a.ok(&["snapshot", "rollback", &bot, "1"]);
    assert!(out.contains("version 1"), "{out:?}");
    wait_exec(&a, &bot, "the bot runs after the rollback");
    assert_eq!(a.sh_in(&bot, "cat /data/v.txt"), "one\n");
    assert_eq!(sha_of(&a, &bot, "/data/blob"), blob1);
    assert_eq!(
        a.sh_in(&bot, "test -e /data/only-in-2 && echo yes || echo no"),
        "no\n"
    );
    let v = versions(&a, &bot);
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(v[0].current, "{v:?}");
    assert_eq!(v[2].source, "rollback", "{v:?}");
    // A version taken after the rollback stacks on version 1's layers and is current.
    a.sh_in(&bot, "echo four > /data/v.txt");
    let (n, _, _) = snapshot(&a, &bot, "after");
    let v = versions(&a, &bot);
    assert!(v.iter().any(|x| x.number == n && x.current), "{v:?}");
    let layers1 = image_blobs(&a, &v[0].image);
    let layers4 = image_blobs(&a, &v.last().unwrap().image);
    assert_eq!(
        layers4.len(),
        layers1.len() + 1,
        "one more layer than the version it stacks on"
    );
    // The version the bot runs on cannot go; another can.
    let why = a.fails(&["snapshot", "rm", &bot, "1"]);
    assert!(why.contains("parent"), "{why}");
    a.ok(&["snapshot", "rm", &bot, "2"]);

    let _ = stream.kill();
    let _ = stream.wait();
    let _ = reader.join();
    let s = store(&a, &bot);
    assert!(s.leases.is_empty() && s.views.is_empty(), "{s:?}");
    assert_eq!(s.actives.len(), 1, "{s:?}");
    a.ok(&["bot", "rm", &bot]);
    let images = block_on(async { a.containerd().await.list_images().await.unwrap() });
    assert!(
        !images.iter().any(|i| i.name.contains(&format!("{bot}.v"))),
        "bot rm left version images: {images:?}"
    );
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

#[test]
fn a_version_pushed_from_one_host_makes_the_bot_on_another() {
    let Some(env) = Env::get(true) else { return };
    let registry = env.registry.clone().expect("registry");
    // Host A: the shared containerd; host B: a containerd of its own, its own network.
    let a = TestAgent::with_image(&env);
    let ctrd_b = PrivateContainerd::new();
    let env_b = ctrd_b.env(&env);
    let mut b = TestAgent::new(&env_b, "");
    b.serve();
    let mut a = a;
    let (bot, _) = a.create_bot("mover");
    a.sh_in(
        &bot,
        "mkdir -p /data/d && echo hello > /data/d/t.txt && \
         head -c 3145728 /dev/urandom > /data/d/blob && ln -s t.txt /data/d/link",
    );
    let (n, _, _) = snapshot(&a, &bot, "to move");
    let reference = format!("{registry}/memoh-e2e-{}/{bot}:v{n}", a.tag);
    let t = Instant::now();
    let out = a.ok(&["snapshot", "push", &bot, &n.to_string(), &reference]);
    println!("push: {:?} ({out:?})", t.elapsed());
    assert!(out.contains("pushed to"), "{out:?}");

    let bot_b = b.bot_id("moved");
    let t = Instant::now();
    b.ok(&["bot", "create", &bot_b, "--from", &reference]);
    println!("create --from: {:?}", t.elapsed());
    wait_exec(&b, &bot_b, "the moved bot runs");
    let listing =
        "cd /data/d && sha256sum t.txt blob && readlink link && stat -c '%a %s' t.txt blob";
    assert_eq!(a.sh_in(&bot, listing), b.sh_in(&bot_b, listing));
    let v = versions(&b, &bot_b);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].source, "pulled", "{v:?}");
    assert!(v[0].current, "{v:?}");
    assert!(
        v[0].origin
            .ends_with(&format!("memoh-e2e-{}/{bot}:v{n}", a.tag)),
        "the origin: {v:?}"
    );
    // The moved bot takes versions of its own, stacked on the pulled one.
    b.sh_in(&bot_b, "echo more > /data/d/t2.txt");
    let (n2, _, _) = snapshot(&b, &bot_b, "on b");
    assert_eq!(n2, 2);
    // Bad input: one line on stderr, nothing changed.
    let line = common::one_line_failure(
        "push of a version that does not exist",
        &a.cli(&["snapshot", "push", &bot, "9", &reference]),
    );
    assert!(line.contains("no version 9"), "{line}");
    let line = common::one_line_failure(
        "push to a malformed reference",
        &a.cli(&["snapshot", "push", &bot, "1", "Not A Ref"]),
    );
    assert!(
        line.to_lowercase().contains("not a ref") || line.contains("reference"),
        "{line}"
    );
    let line = common::one_line_failure(
        "create from a reference nobody pushed",
        &b.cli(&[
            "bot",
            "create",
            "nothere",
            "--from",
            &format!("{reference}-missing"),
        ]),
    );
    assert!(line.contains("-missing"), "{line}");
    assert_eq!(b.list().len(), 1, "a failed create --from made a bot");
    // A push to a registry that is not there fails with one line.
    let out = a.cli(&["snapshot", "push", &bot, "1", "127.0.0.1:1/x/y:z"]);
    let line = common::one_line_failure("push to a closed port", &out);
    assert!(line.contains("127.0.0.1:1"), "{line}");
    b.ok(&["bot", "rm", &bot_b]);
    assert!(b.leftovers(&bot_b).is_empty(), "{:?}", b.leftovers(&bot_b));
    drop(b);
    drop(ctrd_b);
}

#[test]
fn an_agent_killed_at_each_step_of_a_live_version_or_rollback_leaves_no_trace() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("livecrash");
    a.sh_in(&bot, "echo base > /data/base");
    let (first, _, _) = snapshot(&a, &bot, "first");
    let steps = [
        "live-paused",
        "live-diff",
        "live-blob",
        "live-manifest",
        "live-record",
        "rollback-kept",
        "rollback-prepared",
        "rollback-moved",
    ];
    for step in steps {
        a.kill(nix::sys::signal::Signal::SIGTERM);
        a.serve_env = vec![(FAULT_ENV.to_string(), step.to_string())];
        a.serve();
        wait_exec(&a, &bot, &format!("bot runs before {step}"));
        a.sh_in(&bot, &format!("echo {step} > /data/marker"));
        let before = store(&a, &bot);
        let listed_before = versions(&a, &bot);
        let out = if step.starts_with("rollback") {
            a.cli(&["snapshot", "rollback", &bot, &first.to_string()])
        } else {
            a.cli(&["snapshot", "create", &bot, "--name", step])
        };
        assert!(!out.status.success(), "{step}: the agent should have died");
        wait_dead(&mut a, step);

        a.serve_env.clear();
        a.serve();
        wait_exec(
            &a,
            &bot,
            &format!("bot runs (not frozen) after a crash at {step}"),
        );
        let info = a.inspect(&bot);
        assert_eq!(info["status"], "running", "{step}: {info}");
        let after = store(&a, &bot);
        let listed = versions(&a, &bot);
        assert!(
            after.leases.is_empty(),
            "{step}: leases left {:?}",
            after.leases
        );
        assert!(
            after.views.is_empty(),
            "{step}: views left {:?}",
            after.views
        );
        assert!(
            after.ingests.is_empty(),
            "{step}: ingests left {:?}",
            after.ingests
        );
        assert_eq!(after.actives.len(), 1, "{step}: {:?}", after.actives);
        // Every version listed is complete; a blob no version references is a leak.
        let mut referenced = BTreeSet::new();
        for v in listed.iter().filter(|v| !v.image.is_empty()) {
            referenced.extend(image_blobs(&a, &v.image));
        }
        let leaked: Vec<_> = after
            .blobs
            .difference(&before.blobs)
            .filter(|d| !referenced.contains(*d))
            .collect();
        assert!(leaked.is_empty(), "{step}: blobs left {leaked:?}");
        let new: Vec<_> = listed
            .iter()
            .filter(|v| {
                !listed_before.contains(v) && !listed_before.iter().any(|b| b.number == v.number)
            })
            .collect();
        println!("{step}: recovered; new versions {new:?}");
        if step.starts_with("rollback") {
            let marker = a.sh_in(&bot, "cat /data/marker 2>/dev/null || echo none");
            assert!(
                marker == format!("{step}\n") || marker == "none\n",
                "{step}: the bot runs on neither state: {marker:?}"
            );
        } else {
            assert_eq!(a.sh_in(&bot, "cat /data/marker"), format!("{step}\n"));
        }
    }
    // Versions still work.
    let (n, _, _) = snapshot(&a, &bot, "after crashes");
    assert!(versions(&a, &bot)
        .iter()
        .any(|v| v.number == n && v.current));
}

#[test]
fn a_diff_longer_than_the_longest_pause_fails_and_the_bot_resumes() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::new(&env, "version_max_pause_ms = 1");
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let (bot, _) = a.create_bot("slow");
    a.sh_in(&bot, "head -c 67108864 /dev/urandom > /data/big");
    let out = a.cli(&["snapshot", "create", &bot]);
    let line = common::one_line_failure("a diff over the limit", &out);
    assert!(line.contains("longest allowed pause"), "{line}");
    wait_exec(&a, &bot, "the bot was resumed");
    assert_eq!(a.inspect(&bot)["status"], "running");
    assert!(versions(&a, &bot).is_empty());
    let s = store(&a, &bot);
    assert!(s.leases.is_empty() && s.views.is_empty(), "{s:?}");
}

/// When the test kills containerd during a live version.
#[derive(Debug, Clone, Copy)]
enum CtrdKill {
    /// The agent holds at this step (the bot frozen or not, as the step has it); containerd is
    /// killed once `after` has passed since the call started, or once the bot shows paused.
    Hold(&'static str),
    /// No hold: containerd is killed while its diff service writes a 192 MiB layer.
    Diffing,
}

#[test]
fn containerd_killed_at_each_step_of_a_live_version_leaves_the_bot_running() {
    let Some(env) = Env::get(false) else { return };
    let mut ctrd = PrivateContainerd::new();
    let env = ctrd.env(&env);
    let mut a = TestAgent::new(&env, "");
    ctrd.import_image(&env, &a.namespace);
    a.serve();
    let (bot, _) = a.create_bot("ctrdkill");
    a.sh_in(&bot, "echo kept > /data/f");
    // Frozen before the diff, frozen after it (before the thaw), running while the manifest
    // is written, and containerd's diff itself.
    let cases = [
        CtrdKill::Hold("live-paused"),
        CtrdKill::Diffing,
        CtrdKill::Hold("live-blob"),
        CtrdKill::Hold("live-manifest"),
    ];
    for case in cases {
        a.kill(nix::sys::signal::Signal::SIGTERM);
        a.serve_env = match case {
            CtrdKill::Hold(step) => vec![
                ("MEMOH_FAULT_HOLD_STEP".to_string(), step.to_string()),
                ("MEMOH_FAULT_HOLD_MS".to_string(), "4000".to_string()),
            ],
            CtrdKill::Diffing => Vec::new(),
        };
        a.serve();
        wait_exec(&a, &bot, &format!("bot runs before {case:?}"));
        if matches!(case, CtrdKill::Diffing) {
            a.sh_in(&bot, "head -c 201326592 /dev/urandom > /data/big && sync");
        } else {
            a.sh_in(&bot, "rm -f /data/big");
        }
        let before = versions(&a, &bot);
        let out = std::thread::scope(|s| {
            let create = s.spawn(|| a.cli(&["snapshot", "create", &bot, "--name", "held"]));
            match case {
                CtrdKill::Hold("live-manifest") => {
                    // The bot was frozen for a moment and runs again; the agent holds for 4 s
                    // before it writes the manifest.
                    std::thread::sleep(Duration::from_millis(1500));
                }
                CtrdKill::Hold(_) => a.wait_for(
                    "the bot is paused for the version",
                    Duration::from_secs(20),
                    || a.inspect(&bot)["status"] == "paused",
                ),
                CtrdKill::Diffing => {
                    a.wait_for(
                        "the bot is paused for the version",
                        Duration::from_secs(20),
                        || a.inspect(&bot)["status"] == "paused",
                    );
                    std::thread::sleep(Duration::from_millis(150));
                }
            }
            ctrd.kill();
            ctrd.start();
            create.join().unwrap()
        });
        println!(
            "{case:?}: snapshot create across a containerd restart: {} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // Thawed by the cycle's own retries or by the next recovery pass; never left frozen.
        a.wait_for(
            &format!("{case:?}: the bot runs again"),
            Duration::from_secs(60),
            || a.inspect(&bot)["status"] == "running",
        );
        wait_exec(
            &a,
            &bot,
            &format!("{case:?}: the bot answers after containerd's restart"),
        );
        assert_eq!(a.sh_in(&bot, "cat /data/f"), "kept\n", "{case:?}");
        a.wait_for(
            &format!("{case:?}: the cycle's lease is gone"),
            Duration::from_secs(60),
            || store(&a, &bot).leases.is_empty(),
        );
        let s = store(&a, &bot);
        assert!(
            s.views.is_empty() && s.ingests.is_empty(),
            "{case:?}: {s:?}"
        );
        // The version is complete (listed, with its image) or absent.
        let after = versions(&a, &bot);
        assert!(after.len() <= before.len() + 1, "{case:?}: {after:?}");
        for v in after.iter().filter(|v| !v.image.is_empty()) {
            image_blobs(&a, &v.image);
        }
    }
    a.serve_env.clear();
    a.kill(nix::sys::signal::Signal::SIGTERM);
    a.serve();
    a.ok(&["bot", "rm", &bot]);
    drop(a);
    drop(ctrd);
}
