//! Benchmark of bot versions and of the legacy-data migration (issue 5) against baselines
//! measured in the same run, on the private containerd of `scripts/test-env.sh up` (needs root
//! and `eval "$(scripts/test-env.sh env)"`):
//!
//! - `snapshot create` and `snapshot rollback` through the release CLI, each after a small
//!   change in `/data` (p50 over 10 each), against a bare `ctr` cycle of a container of the same
//!   image in the same namespace: `tasks kill -s SIGKILL` + `tasks delete`, `snapshots commit`,
//!   `snapshots prepare` of a new active snapshot on the commit (under the container's key),
//!   `tasks start -d` (p50 over 10);
//! - migration throughput for 10 000 small files and for one large file (1 GiB by default,
//!   `MEMOH_BENCH_BIG_MIB` to change it) through the control API's `Migrate` (on demand: the
//!   tree is created after `bot create`, so no background migration races it), against a local
//!   `cp -a` of the same tree on the same filesystem.
//!
//! - with `MEMOH_BENCH_LIVE=1` instead (issue 18): a live `snapshot create` of a running bot
//!   (pause and whole cycle) with 1 MiB, 100 MiB and 1 GiB changed against the
//!   stop-commit-start cycle (`snapshot create --restart`) with the same changes in the same
//!   run; then `snapshot push` of a 100 MiB version to the loopback registry and
//!   `bot create --from` of it on a second host (an agent on a containerd of its own) against
//!   `skopeo copy` of the same image (registry to an OCI directory, and that directory to a new
//!   repository). Appends a "Live versions" section.
//!
//! Run with `cargo bench -p memoh-agent --bench versions`. Prints a markdown table and appends a
//! dated "Versions and migration" section with the machine to `BENCHMARKS.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{block_on, output_within, percentile, Env, TestAgent, IMAGE};
use futures::StreamExt;
use memoh_proto::client::unix_channel;
use memoh_proto::pb::agent as pb;
use memoh_proto::pb::agent::agent_service_client::AgentServiceClient;

const CYCLE_RUNS: usize = 10;
const SMALL_FILES: usize = 10_000;
const SMALL_SIZE: usize = 1024;

struct Row {
    what: String,
    value: String,
    baseline_name: &'static str,
    baseline: String,
    ratio: String,
    target: &'static str,
    met: Option<bool>,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mibs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn ctr(env: &Env, ns: &str) -> Command {
    let mut c = Command::new("ctr");
    c.arg("-a").arg(&env.sock).arg("-n").arg(ns);
    c
}

fn run(cmd: Command) {
    let what = format!("{cmd:?}");
    let out = output_within(cmd, None, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn timed(cmd: Command) -> Duration {
    let t = Instant::now();
    run(cmd);
    t.elapsed()
}

/// One bare ctr stop, commit, prepare and start of container `id`.
fn ctr_cycle(env: &Env, ns: &str, id: &str, commit: &str) -> Duration {
    let t = Instant::now();
    let mut c = ctr(env, ns);
    c.args(["tasks", "kill", "-s", "SIGKILL", id]);
    run(c);
    // `tasks delete` refuses a task that has not exited yet: retry until it has.
    let start = Instant::now();
    loop {
        let mut c = ctr(env, ns);
        c.args(["tasks", "delete", id]);
        let out = output_within(c, None, Duration::from_secs(60));
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "tasks delete {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut c = ctr(env, ns);
    c.args(["snapshots", "commit", commit, id]);
    run(c);
    let mut c = ctr(env, ns);
    c.args(["snapshots", "prepare", id, commit]);
    run(c);
    let mut c = ctr(env, ns);
    c.args(["tasks", "start", "-d"]);
    if let Some(f) = &env.fifo_dir {
        c.arg("--fifo-dir").arg(f);
    }
    c.arg(id);
    run(c);
    t.elapsed()
}

fn main() {
    if std::env::var_os("MEMOH_BENCH_LIVE").is_some() {
        return live();
    }
    let Some(env) = Env::get(false) else { return };
    let big_mib: u64 = std::env::var("MEMOH_BENCH_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let mut a = TestAgent::with_image(&env);
    let ns = a.namespace.clone();
    let mut rows = Vec::new();

    // (a) snapshot create and rollback against a bare ctr cycle.
    let (bot, _ip) = a.create_bot("ver");
    let mut create = Vec::new();
    for i in 0..CYCLE_RUNS {
        a.sh_in(&bot, &format!("echo {i} > /data/change"));
        let t = Instant::now();
        a.ok(&["snapshot", "create", &bot, "--restart"]);
        create.push(t.elapsed());
    }
    let mut rollback = Vec::new();
    for i in 0..CYCLE_RUNS {
        a.sh_in(&bot, &format!("echo r{i} > /data/change"));
        let v = (i % 3 + 1).to_string();
        let t = Instant::now();
        a.ok(&["snapshot", "rollback", &bot, &v]);
        rollback.push(t.elapsed());
    }
    let after = a.sh_in(&bot, "cat /data/change");
    assert_eq!(after.trim(), ((CYCLE_RUNS - 1) % 3).to_string());

    let id = format!("bench-ver-{}", a.tag);
    let mut c = ctr(&env, &ns);
    c.args(["run", "-d"]);
    if let Some(r) = &env.runc_root {
        c.arg("--runc-root").arg(r);
    }
    if let Some(f) = &env.fifo_dir {
        c.arg("--fifo-dir").arg(f);
    }
    c.args([IMAGE, &id]);
    run(c);
    let mut bare = Vec::new();
    for i in 0..CYCLE_RUNS {
        bare.push(ctr_cycle(&env, &ns, &id, &format!("{id}-c{i}")));
    }
    // The harness's namespace clean-up does not stop a task `ctr run` made: do it here.
    let mut c = ctr(&env, &ns);
    c.args(["tasks", "kill", "-s", "SIGKILL", &id]);
    run(c);
    let start = Instant::now();
    loop {
        let mut c = ctr(&env, &ns);
        c.args(["tasks", "delete", &id]);
        if output_within(c, None, Duration::from_secs(60))
            .status
            .success()
            || start.elapsed() > Duration::from_secs(20)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = ctr(&env, &ns);
    c.args(["containers", "delete", &id]);
    run(c);
    let b = percentile(&bare, 50);
    for (what, samples) in [
        ("`snapshot create` (CLI), small change, p50 of 10", &create),
        (
            "`snapshot rollback` (CLI), small change, p50 of 10",
            &rollback,
        ),
    ] {
        let v = percentile(samples, 50);
        let ratio = v.as_secs_f64() / b.as_secs_f64();
        rows.push(Row {
            what: what.into(),
            value: ms(v),
            baseline_name: "bare `ctr` kill+delete task, snapshots commit+prepare, tasks start -d",
            baseline: ms(b),
            ratio: format!("{ratio:.2}x"),
            target: "<= 1.2x baseline and < 500 ms",
            met: Some(ratio <= 1.2 && v < Duration::from_millis(500)),
        });
    }
    println!(
        "create {:?}\nrollback {:?}\nbare {:?}",
        create, rollback, bare
    );

    // (b) migration throughput against `cp -a`.
    let work = tempfile::Builder::new()
        .prefix("memoh-bench-mig-")
        .tempdir()
        .unwrap();
    let big = big_mib << 20;
    for (name, label) in [
        ("small", format!("{SMALL_FILES} files of 1 KiB")),
        ("big", format!("one {big_mib} MiB file")),
    ] {
        let (bot, _) = a.create_bot(name);
        // Staged outside `bots/` and renamed in right before `Migrate`, so the agent's periodic
        // check does not start a background migration first.
        let src = a.data_root().join("stage").join(&bot);
        std::fs::create_dir_all(&src).unwrap();
        let bytes = if name == "small" {
            let chunk = common::random_bytes(SMALL_SIZE);
            for d in 0..100 {
                let dir = src.join(format!("d{d:03}"));
                std::fs::create_dir(&dir).unwrap();
                for f in 0..SMALL_FILES / 100 {
                    std::fs::write(dir.join(format!("f{f:03}")), &chunk).unwrap();
                }
            }
            (SMALL_FILES * SMALL_SIZE) as u64
        } else {
            let chunk = common::random_bytes(1 << 20);
            let mut f = std::fs::File::create(src.join("big.bin")).unwrap();
            for _ in 0..big_mib {
                f.write_all(&chunk).unwrap();
            }
            big
        };
        run(Command::new("sync"));
        let dst = work.path().join(name);
        let mut c = Command::new("cp");
        c.arg("-a").arg(&src).arg(&dst);
        let cp = timed(c);
        run(Command::new("sync"));
        let _ = std::fs::remove_dir_all(&dst);
        run(Command::new("sync"));

        let legacy = a.data_root().join("bots").join(&bot);
        std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
        std::fs::rename(&src, &legacy).unwrap();
        let (total, copy) = migrate(&a.socket, &bot);
        let marker = a.cli(&["exec", &bot, "--", "test", "-e", "/data/.memoh/migrated"]);
        assert!(marker.status.success(), "no migration marker in {bot}");
        let base = mibs(bytes, cp);
        for (what, d) in [
            (
                format!("migrate {label}: end to end (incl. pre-migration snapshot)"),
                total,
            ),
            (format!("migrate {label}: copy and verify phase"), copy),
        ] {
            let v = mibs(bytes, d);
            let pct = v * 100.0 / base;
            rows.push(Row {
                what,
                value: format!("{v:.1} MiB/s ({})", ms(d)),
                baseline_name: "local `cp -a` of the same tree",
                baseline: format!("{base:.1} MiB/s ({})", ms(cp)),
                ratio: format!("{pct:.0} %"),
                target: ">= 50 % of baseline",
                met: Some(pct >= 50.0),
            });
        }
        a.ok(&["bot", "rm", &bot]);
        let _ = std::fs::remove_dir_all(a.data_root().join("bots"));
        let _ = std::fs::remove_dir_all(a.data_root().join("stage"));
    }
    drop(a);

    let table = render(&rows);
    println!("\n{table}");
    let path = common::append_to_benchmarks(&section(&table, &env, big_mib));
    println!("appended the versions section to {}", path.display());
}

/// Runs `Migrate` on `bot`; returns (whole call, from the first `copying` report to the end).
fn migrate(sock: &Path, bot: &str) -> (Duration, Duration) {
    block_on(async {
        let mut c = AgentServiceClient::new(unix_channel(sock));
        let t = Instant::now();
        let mut s = c
            .migrate(pb::BotRef {
                bot_id: bot.to_string(),
            })
            .await
            .expect("migrate")
            .into_inner();
        let mut copying = None;
        while let Some(m) = s.next().await {
            let m = m.expect("migrate stream");
            if m.phase == "copying" && copying.is_none() {
                copying = Some(Instant::now());
            }
            if m.finished {
                assert!(m.failures.is_empty(), "migration failed: {:?}", m.failures);
                assert!(!m.already_done, "{bot} was migrated before");
                let end = Instant::now();
                return (end - t, end - copying.unwrap_or(t));
            }
        }
        panic!("migrate ended without a report");
    })
}

fn render(rows: &[Row]) -> String {
    let mut s = String::from(
        "| measure | value | baseline | baseline value | ratio | target | met? |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.what,
            r.value,
            r.baseline_name,
            r.baseline,
            r.ratio,
            r.target,
            match r.met {
                None => "-",
                Some(true) => "yes",
                Some(false) => "no",
            }
        ));
    }
    s
}

fn section(table: &str, env: &Env, big_mib: u64) -> String {
    let machine = common::Machine::now();
    format!(
        "\n## Versions and migration ({date})\n\n\
         Machine: {described} (private instance, socket {sock}); the cores were shared with \
         other work, load average at the end {load}. Release build of `memoh-agent` (`cargo \
         bench -p memoh-agent --bench versions`); baselines measured in the same run, same \
         image and namespace. \
         Snapshot figures include spawning the CLI; the agent's cycle also re-networks the bot \
         (CNI CHECK, keeping its address) and waits for its server to answer, which the bare `ctr` cycle does not. Migration: \
         the legacy tree is staged after `bot create`, renamed into `<data_root>/bots/BOT` and \
         copied at once by an on-demand `Migrate` call (the control API, as `memoh-agent \
         migrate` does; not the background migration); \"end to end\" includes the \
         pre-migration snapshot cycle, \"copy and verify\" starts at the first `copying` progress \
         report. `cp -a` copies the same tree (page cache warm for both, `sync` before each) \
         on the same filesystem; the large file is {big_mib} MiB.\n\n{table}",
        date = machine.date,
        described = machine.describe(),
        sock = env.sock.display(),
        load = common::load_average(),
    )
}

/// "version N CREATED paused P ms, took T ms" -> (P, T).
fn live_times(out: &str) -> (Duration, Duration) {
    let f: Vec<_> = out.split_whitespace().collect();
    let num = |i: usize| -> Duration {
        let v: f64 = f
            .get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("snapshot create printed {out:?}"));
        Duration::from_secs_f64(v / 1e3)
    };
    (num(4), num(7))
}

/// The live-versions bench (issue 18); see the module docs.
fn live() {
    let Some(env) = Env::get(true) else { return };
    let registry = env.registry.clone().expect("registry");
    let mut a = TestAgent::new(&env, "version_max_pause_ms = 300000");
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let mut rows = Vec::new();
    let (bot, _) = a.create_bot("live");
    // A process counting in the bot all along, as a dev server would run.
    a.sh_in(
        &bot,
        "setsid sh -c 'while true; do date +%s%N > /tmp/alive; sleep 0.1; done' \
         </dev/null >/dev/null 2>&1 &",
    );
    let sizes: [(u64, &str); 3] = [(1, "1 MiB"), (100, "100 MiB"), (1024, "1 GiB")];
    let mut live = Vec::new();
    let mut pushed = None;
    for (n, (mib, _)) in sizes.iter().enumerate() {
        a.sh_in(
            &bot,
            &format!(
                "rm -f /data/chg*; head -c {} /dev/urandom > /data/chg{n}; sync",
                mib << 20
            ),
        );
        let t = Instant::now();
        let out = a.ok(&["snapshot", "create", &bot]);
        let cli = t.elapsed();
        let (pause, took) = live_times(&out);
        println!("live {mib} MiB: pause {pause:?}, cycle {took:?}, CLI {cli:?}");
        live.push((pause, took, cli));
        if *mib == 100 {
            pushed = Some(out.split_whitespace().nth(1).unwrap().to_string());
        }
    }
    // The versions of 1 MiB and 1 GiB go (disk); the 100 MiB one is pushed below.
    let v100 = pushed.expect("the 100 MiB version");
    for v in ["1", "3"] {
        a.ok(&["snapshot", "rm", &bot, v]);
    }
    let mut restart = Vec::new();
    for (n, (mib, _)) in sizes.iter().enumerate() {
        a.sh_in(
            &bot,
            &format!(
                "rm -f /data/chg*; head -c {} /dev/urandom > /data/re{n}; sync",
                mib << 20
            ),
        );
        let t = Instant::now();
        a.ok(&["snapshot", "create", &bot, "--restart"]);
        let d = t.elapsed();
        println!("restart cycle {mib} MiB: {d:?}");
        restart.push(d);
        a.sh_in(&bot, &format!("rm -f /data/re{n}"));
    }
    for (i, (_, label)) in sizes.iter().enumerate() {
        let (pause, took, cli) = live[i];
        let ratio = pause.as_secs_f64() / restart[i].as_secs_f64();
        rows.push(Row {
            what: format!(
                "live `snapshot create`, {label} changed: pause (cycle {}, CLI {})",
                ms(took),
                ms(cli)
            ),
            value: ms(pause),
            baseline_name: "`snapshot create --restart` (stop, commit, start; CLI)",
            baseline: ms(restart[i]),
            ratio: format!("{ratio:.2}x"),
            target: "no process restarts; pause bounded",
            met: None,
        });
    }

    // Push and create-from of the 100 MiB version against skopeo.
    let repo = format!("{registry}/memoh-bench-{}", a.tag);
    let reference = format!("{repo}/live:v{v100}");
    let t = Instant::now();
    a.ok(&["snapshot", "push", &bot, &v100, &reference]);
    let push = t.elapsed();
    let ctrd_b = common::ctrd::PrivateContainerd::new();
    let env_b = ctrd_b.env(&env);
    let mut b = TestAgent::new(&env_b, "");
    b.serve();
    let bot_b = b.bot_id("moved");
    let t = Instant::now();
    b.ok(&["bot", "create", &bot_b, "--from", &reference]);
    let create_from = t.elapsed();
    b.ok(&["bot", "rm", &bot_b]);
    drop(b);
    drop(ctrd_b);
    let dir = tempfile::Builder::new()
        .prefix("memoh-bench-oci-")
        .tempdir()
        .unwrap();
    let oci = format!("oci:{}/img:v", dir.path().display());
    let mut c = Command::new("skopeo");
    c.args([
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &oci,
    ]);
    let skopeo_pull = timed(c);
    let mut c = Command::new("skopeo");
    c.args([
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &oci,
        &format!("docker://{repo}/skopeo:v{v100}"),
    ]);
    let skopeo_push = timed(c);
    for (what, v, base_name, base) in [
        (
            "`snapshot push` of the 100 MiB version (whole image)",
            push,
            "`skopeo copy` OCI directory -> registry (new repository)",
            skopeo_push,
        ),
        (
            "`bot create --from` of it on a second host (pull, unpack, start)",
            create_from,
            "`skopeo copy` registry -> OCI directory (pull only)",
            skopeo_pull,
        ),
    ] {
        rows.push(Row {
            what: what.into(),
            value: ms(v),
            baseline_name: base_name,
            baseline: ms(base),
            ratio: format!("{:.2}x", v.as_secs_f64() / base.as_secs_f64()),
            target: "-",
            met: None,
        });
    }
    a.ok(&["bot", "rm", &bot]);
    drop(a);
    let table = render(&rows);
    println!("\n{table}");
    let machine = common::Machine::now();
    let text = format!(
        "\n## Live versions ({date})\n\n\
         Machine: {described}; containerd 1.6, the cores shared with other work (load average at \
         the end {load}). `MEMOH_BENCH_LIVE=1 cargo bench -p memoh-agent --bench versions \
         {profile}` ({build} build of the agent; the diff and the unpacking run in containerd, \
         the push's and pull's copies and digests in the agent). A live version pauses the bot only while containerd's diff service writes \
         its changes as an uncompressed tar layer; \"cycle\" adds the config, manifest and \
         image record written after the resume; the CLI figure includes spawning the CLI. The \
         baseline is the stop-commit-start cycle with the same amount changed, in the same run \
         (its figure includes the restart and the wait for the bot's server). Pushes go to the \
         loopback registry (plain HTTP, uncompressed layers); `bot create --from` runs on a \
         second agent with a containerd of its own.\n\n{table}",
        date = machine.date,
        described = machine.describe(),
        load = common::load_average(),
        profile = if cfg!(debug_assertions) { "--profile dev" } else { "" },
        build = if cfg!(debug_assertions) { "debug" } else { "release" },
    );
    let path = common::append_to_benchmarks(&text);
    println!("appended the live versions section to {}", path.display());
}
