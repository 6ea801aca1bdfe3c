//! Bounded bots on real containerd (tier 3): limits, usage, pause and resume.
//!
//! - A bot created with `--memory 256MiB --cpus 0.5 --pids 128` has them in its cgroup files
//!   (swap off, the quota over 100 ms), and a memory hog, a fork storm and a CPU burner on every
//!   core in it leave a neighbour's exec latency within 3x of its idle value and its server
//!   untouched; the hog's OOM kill shows in `bot inspect`, in `/metrics` and in the agent's log
//!   with the bot's id.
//! - The limits survive stop and start, a killed server, a snapshot rollback and an agent
//!   restart; `bot update` changes them on the live bot (same server), and an update below what
//!   a bot can run with is refused with one line and changes nothing.
//! - `bot pause` freezes the bot: exec fails at once with "bot is paused", the agent leaves it
//!   alone, and `bot resume` thaws the same server. A stopped bot is `stopped`.
//! - `bot stats` (table and JSON) shows usage against the limits.
//! - `[bot_defaults]` in agent.toml are the limits of a bot created without flags; a bad
//!   `--memory` is refused with one line.
//!
//! The tests run one at a time (a lock), so the latency one is not measured against the others.
//! Everything is bounded: the hog holds at most 256 MiB whatever it asks, the storm and the
//! burners end by the exec timeout's group kill, and the bots go with their agent's guard, also
//! on failure. Needs root and `eval "$(scripts/test-env.sh env)"`.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::limits::{
    free_port, limits_of, metric, scrape_metrics, server_pid, BotCgroup, CgroupLimits, Execs, Noise,
};
use common::{percentile, Env, TestAgent};
use nix::sys::signal::Signal;

/// One test at a time: the neighbour's latency must not be measured against another test.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const MIB: u64 = 1 << 20;
/// How long the noisy bot's load runs.
const NOISE_SECS: u64 = 20;
/// What the agent logs at an OOM kill.
const OOM_LINE: &str = "out of memory: the kernel killed a process of the bot at its memory limit";

/// Creates bot `name` with `flags`; returns its id.
fn create(a: &mut TestAgent, name: &str, flags: &[&str]) -> String {
    let bot = a.bot_id(name);
    let mut args = vec!["bot", "create", bot.as_str()];
    args.extend_from_slice(flags);
    let out = a.ok(&args);
    assert!(out.contains("running"), "bot create printed {out:?}");
    bot
}

/// The bounded bot of most tests: 256 MiB, half a CPU, 128 processes.
fn create_bounded(a: &mut TestAgent, name: &str) -> String {
    create(
        a,
        name,
        &["--memory", "256MiB", "--cpus", "0.5", "--pids", "128"],
    )
}

/// `bot inspect`'s `limits` as (memory, cpus, pids, disk).
fn inspect_limits(a: &TestAgent, bot: &str) -> (Option<u64>, Option<f64>, Option<u64>) {
    let i = a.inspect(bot);
    let l = &i["limits"];
    (l["memory"].as_u64(), l["cpus"].as_f64(), l["pids"].as_u64())
}

/// Waits until `exec` works in `bot` (after a restart the bot may come back in the background).
fn wait_exec(a: &TestAgent, bot: &str, what: &str) {
    a.wait_for(what, Duration::from_secs(30), || {
        a.try_cli(&["exec", bot, "--", "true"])
            .is_ok_and(|o| o.status.success())
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn a_bounded_bot_under_load_leaves_its_neighbour_alone_and_its_oom_kill_is_reported() {
    let Some(env) = Env::get(false) else { return };
    let _s = serial();
    let port = free_port();
    let mut a = TestAgent::new(&env, &format!("mcp_listen = \"127.0.0.1:{port}\""));
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let noisy = create_bounded(&mut a, "noisy");
    let quiet = create(&mut a, "quiet", &[]);

    let limits = limits_of(&a, &noisy);
    println!("{noisy}'s cgroup: {limits:?}");
    assert_eq!(limits, CgroupLimits::expected(256 * MIB, 500, 128));

    let (quiet_pid, quiet_restarts) = {
        let i = a.inspect(&quiet);
        (i["pid"].as_u64().unwrap(), i["restart_count"].as_u64())
    };
    let execs = Execs::new(&a, &quiet);
    execs.times(3);
    // The same window, execs one after another, idle and next to the load.
    let window = Duration::from_secs(8);
    let (calm, calm_failed) = execs.during(window, 20);
    let idle = percentile(&calm, 50);

    let noise = Noise::start(&a, &noisy, NOISE_SECS);
    std::thread::sleep(Duration::from_secs(2));
    let (busy, failed) = execs.during(window, 20);
    let parts = noise.wait(Duration::from_secs(NOISE_SECS + 30));
    let loaded = percentile(&busy, 50);
    println!(
        "{quiet}'s exec p50: idle {:.1} ms ({} execs, {} failed), next to the load {:.1} ms \
         ({} execs, {} failed)",
        ms(idle),
        calm.len(),
        calm_failed.len(),
        ms(loaded),
        busy.len(),
        failed.len()
    );
    for (what, code, out) in &parts {
        println!("{what}: exit {code:?}: {}", out.trim());
    }
    // Not one of the neighbour's execs may fail (every 101st exec through the agent once did:
    // empty DATA frames the proxy passed on exhausted h2's budget of them per connection).
    let all: Vec<_> = calm_failed.iter().chain(&failed).collect();
    assert!(all.is_empty(), "{quiet}'s execs failed: {all:?}");
    assert!(
        loaded <= idle * 3,
        "{quiet}'s exec p50 went from {idle:?} to {loaded:?} next to the load"
    );
    let hog = parts.iter().find(|p| p.0 == "hog").unwrap();
    assert_eq!(hog.1, Some(137), "the hog was not killed: {}", hog.2);
    let storm = parts.iter().find(|p| p.0 == "storm").unwrap();
    assert!(storm.2.contains("timed out"), "the storm: {}", storm.2);
    let i = a.inspect(&quiet);
    assert_eq!(
        (i["pid"].as_u64().unwrap(), i["restart_count"].as_u64()),
        (quiet_pid, quiet_restarts),
        "{quiet}'s server was restarted: {i}"
    );

    // The noisy bot's server lives on and answers; its OOM kill shows everywhere.
    a.wait_for(
        "the storm's processes are gone",
        Duration::from_secs(20),
        || {
            BotCgroup::of(server_pid(&a, &noisy))
                .read("pids", "pids.current")
                .parse::<u64>()
                .unwrap()
                < 64
        },
    );
    assert_eq!(a.sh_in(&noisy, "echo alive"), "alive\n");
    let i = a.inspect(&noisy);
    assert_eq!(i["restart_count"].as_u64(), Some(0), "{i}");
    assert!(i["oom_kills"].as_u64().unwrap_or(0) >= 1, "inspect: {i}");
    let series = format!("memoh_bot_oom_kills_total{{bot=\"{noisy}\"}}");
    let mut body = String::new();
    let mut logged = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(25) {
        body = scrape_metrics(&a, port);
        logged = common::read_string(&a.log_path())
            .lines()
            .any(|l| l.contains(OOM_LINE) && l.contains(&noisy));
        if logged && metric(&body, &series).is_some_and(|v| v >= 1.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        metric(&body, &series).is_some_and(|v| v >= 1.0),
        "no {series} >= 1 in:\n{body}"
    );
    assert!(
        metric(&body, "memoh_oom_kills_total").is_some_and(|v| v >= 1.0),
        "memoh_oom_kills_total:\n{body}"
    );
    assert!(
        logged,
        "no OOM line for {noisy} in the log:\n{}",
        a.log_tail(40)
    );
    // The neighbour had none.
    assert_eq!(
        metric(
            &body,
            &format!("memoh_bot_oom_kills_total{{bot=\"{quiet}\"}}")
        ),
        Some(0.0),
        "{body}"
    );
}

#[test]
fn limits_survive_restarts_and_rollbacks_and_an_update_applies_to_the_live_bot() {
    let Some(env) = Env::get(false) else { return };
    let _s = serial();
    let mut a = TestAgent::with_image(&env);
    let bot = create_bounded(&mut a, "keep");
    let want = CgroupLimits::expected(256 * MIB, 500, 128);
    assert_eq!(limits_of(&a, &bot), want, "after create");

    a.ok(&["bot", "stop", &bot]);
    a.ok(&["bot", "start", &bot]);
    assert_eq!(limits_of(&a, &bot), want, "after stop and start");

    let pid = server_pid(&a, &bot);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    a.wait_for("the killed server is back", Duration::from_secs(30), || {
        let i = a.inspect(&bot);
        i["status"] == "running" && i["pid"].as_u64().is_some_and(|p| p > 0 && p != pid)
    });
    assert_eq!(limits_of(&a, &bot), want, "after the server was killed");

    a.ok(&["snapshot", "create", &bot, "--name", "one"]);
    a.sh_in(&bot, "echo later > /data/later");
    let out = a.ok(&["snapshot", "rollback", &bot, "1"]);
    assert!(out.contains("version 1"), "rollback printed {out:?}");
    wait_exec(&a, &bot, "the bot answers after the rollback");
    assert_eq!(limits_of(&a, &bot), want, "after the rollback");

    a.kill(Signal::SIGTERM);
    a.serve();
    wait_exec(&a, &bot, "the bot answers after the agent restart");
    assert_eq!(limits_of(&a, &bot), want, "after the agent restart");

    // An update reaches the live cgroup at once, with the same server.
    let pid = server_pid(&a, &bot);
    let out = a.ok(&["bot", "update", &bot, "--memory", "300MiB", "--pids", "200"]);
    println!("update printed {out:?}");
    let updated = CgroupLimits::expected(300 * MIB, 500, 200);
    assert_eq!(limits_of(&a, &bot), updated, "right after the update");
    assert_eq!(server_pid(&a, &bot), pid, "the update restarted the bot");
    assert_eq!(
        inspect_limits(&a, &bot),
        (Some(300 * MIB), Some(0.5), Some(200))
    );

    // Below what a bot can run with: one line, nothing changed.
    let line = a.fails(&["bot", "update", &bot, "--pids", "2"]);
    println!("update --pids 2: {line}");
    assert!(line.contains("pids"), "{line}");
    assert_eq!(
        limits_of(&a, &bot),
        updated,
        "a refused update changed the cgroup"
    );
    assert_eq!(
        inspect_limits(&a, &bot),
        (Some(300 * MIB), Some(0.5), Some(200))
    );
    assert_eq!(server_pid(&a, &bot), pid);

    // And the updated limits hold from the next start on.
    a.ok(&["bot", "stop", &bot]);
    a.ok(&["bot", "start", &bot]);
    assert_eq!(
        limits_of(&a, &bot),
        updated,
        "after a restart of the updated bot"
    );
}

#[test]
fn a_paused_bot_refuses_exec_at_once_and_resumes_in_the_same_server() {
    let Some(env) = Env::get(false) else { return };
    let _s = serial();
    let mut a = TestAgent::with_image(&env);
    let bot = create_bounded(&mut a, "nap");
    let pid = server_pid(&a, &bot);
    let cg = BotCgroup::of(pid);
    assert!(!cg.frozen());

    let out = a.ok(&["bot", "pause", &bot]);
    assert_eq!(out.split_whitespace().nth(1), Some("paused"), "{out:?}");
    assert_eq!(a.inspect(&bot)["status"], "paused");
    assert!(cg.frozen(), "the freezer does not hold {bot}");

    let t = Instant::now();
    let out = a.cli(&["exec", &bot, "--", "true"]);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    println!(
        "exec into the paused bot: {} after {took:?}: {stderr}",
        out.status
    );
    assert!(!out.status.success(), "exec ran in a paused bot");
    assert!(stderr.contains("bot is paused"), "{stderr:?}");
    assert!(took < Duration::from_secs(2), "exec took {took:?} to fail");
    let ls = a.ok(&["bot", "ls"]);
    let row = ls.lines().find(|l| l.starts_with(&bot)).unwrap_or_default();
    assert_eq!(row.split_whitespace().nth(1), Some("paused"), "{ls}");

    // Left alone: no restart, still frozen (the watchers run meanwhile).
    std::thread::sleep(Duration::from_secs(20));
    let i = a.inspect(&bot);
    assert_eq!(i["status"], "paused", "{i}");
    assert_eq!(i["restart_count"].as_u64(), Some(0), "{i}");
    assert!(cg.frozen(), "{bot} was thawed");

    let out = a.ok(&["bot", "resume", &bot]);
    assert_eq!(out.split_whitespace().nth(1), Some("running"), "{out:?}");
    assert!(!cg.frozen());
    assert_eq!(a.sh_in(&bot, "echo awake"), "awake\n");
    assert_eq!(server_pid(&a, &bot), pid, "resume started another server");

    a.ok(&["bot", "stop", &bot]);
    let ls = a.ok(&["bot", "ls"]);
    let row = ls.lines().find(|l| l.starts_with(&bot)).unwrap_or_default();
    assert_eq!(row.split_whitespace().nth(1), Some("stopped"), "{ls}");
    // Pausing a stopped bot is refused with one line.
    let line = a.fails(&["bot", "pause", &bot]);
    assert!(line.contains("not running"), "{line}");
}

#[test]
fn bot_stats_shows_usage_against_limits() {
    let Some(env) = Env::get(false) else { return };
    let _s = serial();
    let mut a = TestAgent::with_image(&env);
    let bot = create_bounded(&mut a, "stats");

    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["bot", "stats", "--json"])).expect("stats --json prints JSON");
    let b = v
        .as_array()
        .and_then(|v| v.iter().find(|b| b["bot_id"] == bot.as_str()))
        .unwrap_or_else(|| panic!("{bot} not in {v}"));
    println!("{b}");
    let u = &b["usage"];
    assert!(u["memory"].as_u64().is_some_and(|m| m > 0), "{b}");
    assert!(u["memory"].as_u64().is_some_and(|m| m < 256 * MIB), "{b}");
    assert!(u["pids"].as_u64().is_some_and(|p| p > 0 && p < 128), "{b}");
    assert!(u["cpu_nanos"].as_u64().is_some_and(|c| c > 0), "{b}");
    assert_eq!(b["limits"]["memory"].as_u64(), Some(256 * MIB), "{b}");
    assert_eq!(b["limits"]["cpus"].as_f64(), Some(0.5), "{b}");
    assert_eq!(b["limits"]["pids"].as_u64(), Some(128), "{b}");
    assert_eq!(b["oom_kills"].as_u64(), Some(0), "{b}");
    assert!(b["cpu_percent"].as_f64().is_some(), "{b}");

    let table = a.ok(&["bot", "stats", &bot]);
    println!("{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&bot))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("/ 256MiB"), "{row}");
    assert!(row.contains("/ 128"), "{row}");
    assert!(!row.contains(" 0B /"), "{row}");
}

#[test]
fn bot_defaults_from_the_config_apply_and_bad_limits_are_refused() {
    let Some(env) = Env::get(false) else { return };
    let _s = serial();
    let mut a = TestAgent::new(
        &env,
        "[bot_defaults]\nmemory = \"192MiB\"\ncpus = 0.25\npids = 96\ndisk = \"2GiB\"\n",
    );
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let bot = create(&mut a, "plain", &[]);
    assert_eq!(
        limits_of(&a, &bot),
        CgroupLimits::expected(192 * MIB, 250, 96)
    );
    let i = a.inspect(&bot);
    assert_eq!(
        inspect_limits(&a, &bot),
        (Some(192 * MIB), Some(0.25), Some(96)),
        "{i}"
    );
    assert_eq!(i["limits"]["disk"].as_u64(), Some(2 << 30), "{i}");

    let bad = a.bot_id("bad");
    let line = a.fails(&["bot", "create", &bad, "--memory", "lots"]);
    println!("--memory lots: {line}");
    assert!(line.contains("lots"), "{line}");
    assert!(
        !a.list().iter().any(|b| b["bot_id"] == bad.as_str()),
        "a refused create left a bot"
    );
}
