//! Limits benchmark of `memoh-agent` (issue 15, "Bounded bots") on the private containerd of
//! `scripts/test-env.sh up` (needs root and `eval "$(scripts/test-env.sh env)"`).
//!
//! In one run it measures:
//!
//! - bot creation with limits (`--memory 256MiB --cpus 0.5 --pids 128 --disk 1GiB`) against
//!   creation without (`unlimited` for each), alternating one of each, `MEMOH_LIMITS_CREATES`
//!   (10) of each; every bot is removed right after (not timed), so each create finds the same
//!   agent. Min, median and max of the `bot create` CLI call, which returns once the bot's
//!   server answers;
//! - a neighbour's exec latency: exec of `true` through the agent's socket in a bot with the
//!   default limits, p50 and p95, idle (`MEMOH_LIMITS_EXECS`, 200, one after another) and
//!   while a bounded bot (256 MiB, 0.5 CPU, 128 processes) runs a memory hog past its limit,
//!   a fork storm at its pids limit and a CPU burner on every core (the load of
//!   `limits_system`), for 15 s of the load's 20.
//!
//! Run with `cargo bench -p memoh-agent --bench limits`. Prints a markdown section and appends
//! it to `BENCHMARKS.md` at the workspace root.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::limits::{BotCgroup, Execs, Noise};
use common::{percentile, Env, TestAgent, IMAGE};

/// Creations of each kind.
const DEFAULT_CREATES: usize = 10;
/// Idle execs of the neighbour.
const DEFAULT_EXECS: usize = 200;
/// How long the noisy bot's load runs, and how long the neighbour is measured during it.
const NOISE_SECS: u64 = 20;
const MEASURED: Duration = Duration::from_secs(15);

const LIMITED: &[&str] = &[
    "--memory", "256MiB", "--cpus", "0.5", "--pids", "128", "--disk", "1GiB",
];
const UNLIMITED: &[&str] = &[
    "--memory",
    "unlimited",
    "--cpus",
    "unlimited",
    "--pids",
    "unlimited",
    "--disk",
    "unlimited",
];

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Min, median and max.
fn spread(v: &[Duration]) -> (Duration, Duration, Duration) {
    let mut v = v.to_vec();
    v.sort();
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Times `bot create` of `bot` with `flags`, then removes the bot.
fn timed_create(a: &mut TestAgent, name: &str, flags: &[&str]) -> Duration {
    let bot = a.bot_id(name);
    let mut args = vec!["bot", "create", bot.as_str()];
    args.extend_from_slice(flags);
    let t = Instant::now();
    a.ok(&args);
    let took = t.elapsed();
    a.ok(&["bot", "rm", &bot]);
    took
}

fn main() {
    let Some(env) = Env::get(false) else { return };
    let creates = env_number("MEMOH_LIMITS_CREATES", DEFAULT_CREATES);
    let idle_execs = env_number("MEMOH_LIMITS_EXECS", DEFAULT_EXECS);
    let machine = common::Machine::now();

    let mut a = TestAgent::new(&env, "mcp_listen = \"\"");
    a.serve();
    let out = a.ok(&["image", "import", &env.tar.display().to_string()]);
    assert!(out.contains(IMAGE), "import printed {out:?}");

    // (a) Creation with and without limits, alternating; one warm-up of each first.
    timed_create(&mut a, "warm-l", LIMITED);
    timed_create(&mut a, "warm-u", UNLIMITED);
    let (mut limited, mut unlimited) = (Vec::new(), Vec::new());
    for i in 0..creates {
        limited.push(timed_create(&mut a, &format!("l{i}"), LIMITED));
        unlimited.push(timed_create(&mut a, &format!("u{i}"), UNLIMITED));
    }
    println!("created {creates} of each");

    // (b) A neighbour's exec latency, idle and next to a bounded bot under load.
    let noisy = a.bot_id("noisy");
    a.ok(&[
        "bot", "create", &noisy, "--memory", "256MiB", "--cpus", "0.5", "--pids", "128",
    ]);
    let quiet = a.bot_id("quiet");
    a.ok(&["bot", "create", &quiet]);
    let execs = Execs::new(&a, &quiet);
    // Warm-up calls, not counted.
    for _ in 0..10 {
        let _ = execs.once();
    }
    let (mut idle, mut idle_failed) = (Vec::new(), Vec::new());
    for _ in 0..idle_execs {
        match execs.once() {
            Ok(d) => idle.push(d),
            Err(e) => idle_failed.push(e),
        }
    }
    let noisy_pid = a.inspect(&noisy)["pid"].as_u64().unwrap();
    let cg = BotCgroup::of(noisy_pid);
    let ooms_before = cg.oom_kills();
    let noise = Noise::start(&a, &noisy, NOISE_SECS);
    std::thread::sleep(Duration::from_secs(1));
    let (busy, failed) = execs.during(MEASURED, 20);
    let parts = noise.wait(Duration::from_secs(NOISE_SECS + 30));
    let ooms = cg.oom_kills() - ooms_before;
    let noisy_info = a.inspect(&noisy);
    let storm = parts
        .iter()
        .find(|p| p.0 == "storm")
        .map(|p| p.2.trim().replace('\n', " "))
        .unwrap_or_default();
    let hog = parts
        .iter()
        .find(|p| p.0 == "hog")
        .map(|p| format!("{:?}", p.1))
        .unwrap_or_default();
    drop(a);
    let mut errors: Vec<&String> = idle_failed.iter().chain(&failed).collect();
    errors.sort();
    errors.dedup();

    let (lmin, lmed, lmax) = spread(&limited);
    let (umin, umed, umax) = spread(&unlimited);
    let row = |what: &str, v: &[Duration]| {
        format!(
            "| {what} | {} | {} | {} |\n",
            v.len(),
            ms(percentile(v, 50)),
            ms(percentile(v, 95))
        )
    };
    let mut s = format!(
        "\n## Limits (issue 15) ({date})\n\n\
         Machine: {machine}; cgroup {cg}; load average {load} at the end (other builds ran on \
         the machine meanwhile). `cargo bench -p memoh-agent --bench limits`, release build, \
         the debug test image.\n\n\
         ### Creating a bot with and without limits\n\n\
         `bot create` (the CLI call, until the bot's server answers), alternating, each bot \
         removed after (not timed). With limits: `--memory 256MiB --cpus 0.5 --pids 128 \
         --disk 1GiB`; without: `unlimited` for each.\n\n\
         | create | n | min ms | median ms | max ms |\n|---|---|---|---|---|\n\
         | with limits | {n} | {} | {} | {} |\n\
         | without limits | {n} | {} | {} | {} |\n\n\
         ### A neighbour's exec latency next to a bounded bot under load\n\n\
         Exec of `true` in a bot with the default limits through the agent's socket, one after \
         another. The load, in a bot of 256 MiB, 0.5 CPU and 128 processes: `syscall-probe hog` \
         of 400 MiB (it holds at most 256 MiB), `syscall-probe storm` at the pids limit until \
         the exec timeout ends it, and `sh -c 'while :; do :; done'` on each of the {cores} cores, for \
         {NOISE_SECS} s; measured over {measured} s of it.\n\n\
         | neighbour's exec | n | p50 ms | p95 ms |\n|---|---|---|---|\n",
        ms(lmin),
        ms(lmed),
        ms(lmax),
        ms(umin),
        ms(umed),
        ms(umax),
        date = machine.date,
        machine = machine.describe(),
        cg = if cg.v2 { "v2" } else { "v1" },
        load = common::load_average(),
        n = creates,
        cores = machine.cores,
        measured = MEASURED.as_secs(),
    );
    s.push_str(&row("idle", &idle));
    s.push_str(&row("next to the load", &busy));
    s.push_str(&format!(
        "\nFailed execs of the neighbour (not in the figures): {} idle, {} next to the load; \
         what they said: {errors:?}. The hog exited with {hog} (137: killed), the noisy bot's \
         cgroup counted {ooms} OOM kill(s) and `bot inspect` shows restart_count {} for it; \
         the storm's CLI said {storm:?}.\n",
        idle_failed.len(),
        failed.len(),
        noisy_info["restart_count"],
    ));
    println!("\n{s}");
    let path = common::append_to_benchmarks(&s);
    println!("appended the limits section to {}", path.display());
}
