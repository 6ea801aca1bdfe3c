//! The soak with fault injection (issue 7), shared by `tests/soak_system.rs` (a short run in
//! CI) and `benches/soak.rs` (the recorded long run).
//!
//! [`run`] builds an isolated rig: a [`PrivateContainerd`] of its own (so killing containerd
//! touches nobody else), a network namespace of its own in which the agent runs (so flushing
//! the nat table and deleting veths touches nobody else: the agent's bridge, iptables rules and
//! the CNI host side live there), and a real `memoh-agent serve` on them. Worker threads then
//! run a random mix of calls on bots of their own (create, exec, cp both ways, snapshot create,
//! ls and rollback, MCP tool calls over streamable HTTP, inspect, delete) while an injector
//! thread kills the agent (SIGKILL, then restarts it), kills containerd (SIGKILL, then restarts
//! it), kills a bot's server (`kill -9` of the container's PID 1), flushes the nat table and
//! deletes a bot's host-side veth, one fault at a time.
//!
//! Every bot keeps a ledger file, `/data/ledger`. The soak tracks what it must contain through
//! appends, snapshots and rollbacks (a call that failed leaves a set of candidates: the content
//! with and without its effect) and checks it with `sha256sum` in the bot, through MCP and by
//! copying it out, during the run and at the end.
//!
//! A fault's window runs from just before it is injected until it has recovered:
//!
//! - agent killed: restarted, `bot ls` answers and every bot answers `exec true`;
//! - containerd killed: restarted, `bot ls` answers and every bot answers `exec true`;
//! - bot server killed: that bot answers `exec true` again (the agent restarts it);
//! - nat table flushed: the agent's MASQUERADE rule is back (its periodic check);
//! - veth deleted: that bot answers `exec true` again (the agent re-networks it).
//!
//! A call may fail only if it overlapped the window of a fault that concerns it (the agent,
//! containerd and nat faults concern every call, a bot's faults only calls on that bot), and
//! only with a clear error: a non-zero exit and exactly one line on stderr (an MCP call: an
//! HTTP, JSON-RPC or tool error with a message). Anything else is a violation, as are
//! faults that did not recover within the limit, calls that hung, and leftovers after the final
//! deletes. [`SoakReport::passed`] needs zero violations and zero ledger or data mismatches.
//!
//! Choices come from a seeded generator ([`Rng`]); the seed is printed and `MEMOH_SOAK_SEED`
//! replays it (the threads still interleave as they will). Everything is removed at the end and
//! on panic: bots, the agent, containerd and its shims and mounts, the namespace, temp dirs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::ctrd::PrivateContainerd;
use super::{sh, tag, try_output_within, Env, TestAgent, AGENT};

/// The agent's MCP listener inside the soak's network namespace.
const MCP_ADDR: &str = "127.0.0.1:8091";
/// The soak agent's MCP token (authentication is always on).
const MCP_TOKEN: &str = "soak-mcp-token";
/// A call that takes longer than this hung.
const CALL_LIMIT: Duration = Duration::from_secs(120);
/// An MCP request that takes longer than this hung.
const MCP_LIMIT: Duration = Duration::from_secs(60);
/// A worker's pause after a failed call (a down agent is not hammered).
const BACKOFF: Duration = Duration::from_millis(300);
/// How many excused failure lines the report keeps as examples.
const SAMPLES: usize = 12;

/// A small xorshift64* generator: seeded, so a run's choices can be replayed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Self(splitmix(seed) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// A duration in `lo..=hi`, millisecond resolution.
    pub fn duration(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        Duration::from_millis(self.range(lo.as_millis() as u64, hi.as_millis() as u64))
    }

    /// `n` random hex digits.
    pub fn hex(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from_digit(self.below(16) as u32, 16).unwrap())
            .collect()
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A child generator for a thread (its own stream, fixed by this one's seed).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `MEMOH_SOAK_SEED` when set, else a fresh seed from the clock and the pid.
pub fn seed_from_env() -> u64 {
    if let Some(s) = std::env::var("MEMOH_SOAK_SEED")
        .ok()
        .filter(|s| !s.is_empty())
    {
        return s
            .parse()
            .unwrap_or_else(|_| panic!("MEMOH_SOAK_SEED={s:?} is not a number"));
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    splitmix(nanos ^ (u64::from(std::process::id()) << 32))
}

/// `MEMOH_SOAK_FAULTS` as fault kinds; every kind when unset.
pub fn faults_from_env() -> Vec<FaultKind> {
    let Some(v) = std::env::var("MEMOH_SOAK_FAULTS")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        return FaultKind::ALL.to_vec();
    };
    v.split(',')
        .map(|k| match k.trim() {
            "agent" => FaultKind::AgentKill,
            "containerd" => FaultKind::ContainerdKill,
            "bot" => FaultKind::BotServerKill,
            "nat" => FaultKind::NatFlush,
            "veth" => FaultKind::VethDelete,
            other => panic!("MEMOH_SOAK_FAULTS: unknown fault kind {other:?}"),
        })
        .collect()
}

/// What the injector does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL the agent, then start it again.
    AgentKill,
    /// SIGKILL containerd, then start it again (the shims and bots live on).
    ContainerdKill,
    /// `kill -9` the container-server (PID 1) of a running bot.
    BotServerKill,
    /// `iptables -t nat -F` in the agent's network namespace.
    NatFlush,
    /// Delete a running bot's host-side veth.
    VethDelete,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 5] = [
        FaultKind::AgentKill,
        FaultKind::ContainerdKill,
        FaultKind::BotServerKill,
        FaultKind::NatFlush,
        FaultKind::VethDelete,
    ];

    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::AgentKill => "agent SIGKILL + restart",
            FaultKind::ContainerdKill => "containerd SIGKILL + restart",
            FaultKind::BotServerKill => "bot server kill -9",
            FaultKind::NatFlush => "nat table flush",
            FaultKind::VethDelete => "bot veth deleted",
        }
    }

    /// What counts as recovered.
    pub fn recovery(self) -> &'static str {
        match self {
            FaultKind::AgentKill | FaultKind::ContainerdKill => {
                "restarted, `bot ls` answers, every bot answers exec"
            }
            FaultKind::BotServerKill => "the bot answers exec again",
            FaultKind::NatFlush => "the MASQUERADE rule is back",
            FaultKind::VethDelete => "the bot answers exec again (re-networked)",
        }
    }
}

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The test environment (the image archive; its containerd is replaced by a private one).
    pub env: Env,
    /// How long the workers run calls (longer when the injector still owes a fault kind).
    pub duration: Duration,
    /// The generator's seed.
    pub seed: u64,
    /// Worker threads; each owns its bots.
    pub workers: usize,
    /// Bots each worker keeps.
    pub bots_per_worker: usize,
    /// The pause before each fault, drawn from this range.
    pub fault_gap: (Duration, Duration),
    /// The kinds to inject.
    pub faults: Vec<FaultKind>,
    /// Keep injecting after `duration` until every kind was injected at least once.
    pub every_kind_once: bool,
    /// A fault not recovered within this is a violation.
    pub recovery_limit: Duration,
    /// A bot is deleted after this many calls on it (drawn from the range).
    pub bot_lifetime_ops: (u64, u64),
    /// Print faults, violations and progress as they happen.
    pub verbose: bool,
    /// Where the agent's and containerd's logs are copied at the end (`None`: not kept).
    pub log_dir: Option<PathBuf>,
    /// Kill containerd only while no snapshot or rollback call is in flight (and hold new ones
    /// back until it is up again). containerd 1.6 commits a snapshot in two bolt databases
    /// (its metadata and the overlay snapshotter's); killed between the two it loses the
    /// commit and the bot's current state with it, which the agent cannot undo: it puts the
    /// bot back on the version that state came from and reports the loss, which the soak then
    /// checks (see [`SoakReport::lost_states`]). The CI test spares the cycles so its short run
    /// is not about that (containerd_restart_system tests it on its own); the recorded soak
    /// does not.
    pub spare_snapshot_cycles: bool,
}

impl SoakConfig {
    /// Defaults for a run of `duration`; the seed from [`seed_from_env`], the fault kinds
    /// from `MEMOH_SOAK_FAULTS` (a comma list of `agent`, `containerd`, `bot`, `nat`, `veth`;
    /// all when unset).
    pub fn new(env: Env, duration: Duration) -> Self {
        Self {
            env,
            duration,
            seed: seed_from_env(),
            workers: 2,
            bots_per_worker: 2,
            fault_gap: (Duration::from_secs(3), Duration::from_secs(10)),
            faults: faults_from_env(),
            every_kind_once: true,
            recovery_limit: Duration::from_secs(90),
            bot_lifetime_ops: (25, 70),
            verbose: true,
            log_dir: None,
            spare_snapshot_cycles: false,
        }
    }
}

/// One kind of call's counts.
#[derive(Debug, Default, Clone)]
pub struct CallStats {
    /// Calls made.
    pub calls: u64,
    /// Calls that failed while a fault that concerns them was open (allowed).
    pub failed_in_window: u64,
    /// Calls that failed outside every such window (violations).
    pub failed_outside: u64,
    /// Total time in calls.
    pub time: Duration,
    /// The longest call.
    pub max: Duration,
}

/// One fault kind's counts.
#[derive(Debug, Default, Clone)]
pub struct FaultStats {
    /// Times injected.
    pub injected: u64,
    /// Times recovered within the limit.
    pub recovered: u64,
    /// From injection to recovery, per recovered fault.
    pub recovery: Vec<Duration>,
    /// Failed calls excused by this kind's windows.
    pub excused: u64,
}

/// What a soak found.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    /// The seed.
    pub seed: u64,
    /// The configured run length.
    pub planned: Duration,
    /// How long the calls ran.
    pub elapsed: Duration,
    /// Workers and bots per worker.
    pub workers: usize,
    /// Bots per worker.
    pub bots_per_worker: usize,
    /// Per kind of call.
    pub calls: BTreeMap<&'static str, CallStats>,
    /// Per fault kind.
    pub faults: BTreeMap<FaultKind, FaultStats>,
    /// Everything that must not happen (failures outside windows, unclear failures, hangs,
    /// unrecovered faults, leftovers), one line each.
    pub violations: Vec<String>,
    /// Ledger verifications made.
    pub ledger_checks: u64,
    /// Ledgers that held none of the expected contents.
    pub ledger_mismatches: Vec<String>,
    /// Other data that came back different (cp round trips, MCP write/read, lost versions).
    pub data_mismatches: Vec<String>,
    /// Bots created and deleted.
    pub bots_created: u64,
    /// Bots deleted (by the workers and at the end).
    pub bots_deleted: u64,
    /// A few of the allowed failures' lines, as examples.
    pub excused_samples: Vec<String>,
    /// Bot states containerd lost in a commit it was killed in, each reported by the agent
    /// (`bot inspect` `lost_state`) with the bot back on the version its state came from; an
    /// unreported one is a ledger mismatch.
    pub lost_states: Vec<String>,
    /// Half-deleted task bundles a killed containerd left (see
    /// [`PrivateContainerd::stale_bundles`]); the agent removes those of its bots itself.
    pub stale_bundles: u64,
    /// Bots that stopped answering for good (each also a violation); left out of later
    /// recovery checks so one broken bot does not fail every later fault.
    pub broken_bots: Vec<String>,
}

impl SoakReport {
    /// All calls made.
    pub fn calls_total(&self) -> u64 {
        self.calls.values().map(|c| c.calls).sum()
    }

    /// Failures inside fault windows.
    pub fn failed_in_window(&self) -> u64 {
        self.calls.values().map(|c| c.failed_in_window).sum()
    }

    /// Failures outside fault windows.
    pub fn failed_outside(&self) -> u64 {
        self.calls.values().map(|c| c.failed_outside).sum()
    }

    /// Faults injected.
    pub fn faults_total(&self) -> u64 {
        self.faults.values().map(|f| f.injected).sum()
    }

    /// No violations, no mismatches.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
            && self.ledger_mismatches.is_empty()
            && self.data_mismatches.is_empty()
    }

    /// The report as markdown (no heading).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Seed {} (replay: `MEMOH_SOAK_SEED={}`), planned {} s, calls ran {:.0} s, {} workers \
             with up to {} bots each; {} bots created, {} deleted. Half-deleted task bundles a \
             killed containerd left behind (removed by the injector before restarting it, as an \
             operator would; without that the bot can never start again): {}. Bots that broke \
             for good (violations, then left alone): {}.\n",
            self.seed,
            self.seed,
            self.planned.as_secs(),
            self.elapsed.as_secs_f64(),
            self.workers,
            self.bots_per_worker,
            self.bots_created,
            self.bots_deleted,
            self.stale_bundles,
            if self.broken_bots.is_empty() {
                "none".to_string()
            } else {
                self.broken_bots.join(", ")
            }
        );
        let _ = writeln!(
            s,
            "| result | value |\n|---|---|\n\
             | calls made | {} |\n\
             | faults injected | {} |\n\
             | calls failed inside a fault window (allowed) | {} |\n\
             | calls failed outside fault windows | {} |\n\
             | ledger checks | {} |\n\
             | ledger mismatches | {} |\n\
             | states containerd lost mid-commit (reported by the agent) | {} |\n\
             | other data mismatches | {} |\n\
             | violations (all kinds) | {} |\n\
             | verdict | {} |\n",
            self.calls_total(),
            self.faults_total(),
            self.failed_in_window(),
            self.failed_outside(),
            self.ledger_checks,
            self.ledger_mismatches.len(),
            self.lost_states.len(),
            self.data_mismatches.len(),
            self.violations.len(),
            if self.passed() { "pass" } else { "FAIL" }
        );
        s.push_str(
            "| fault | injected | recovered | recovery p50 | recovery max | failed calls it \
             excused | recovered means |\n|---|---|---|---|---|---|---|\n",
        );
        for (k, f) in &self.faults {
            let mut r = f.recovery.clone();
            r.sort();
            let p50 = r.get(r.len().saturating_sub(1) / 2).copied();
            let max = r.last().copied();
            let secs =
                |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                k.name(),
                f.injected,
                f.recovered,
                secs(p50),
                secs(max),
                f.excused,
                k.recovery()
            );
        }
        s.push_str(
            "\n| call | made | failed in a window | failed outside | mean | max |\n\
             |---|---|---|---|---|---|\n",
        );
        for (name, c) in &self.calls {
            let mean = if c.calls == 0 {
                0.0
            } else {
                c.time.as_secs_f64() * 1e3 / c.calls as f64
            };
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {mean:.0} ms | {:.1} s |",
                c.calls,
                c.failed_in_window,
                c.failed_outside,
                c.max.as_secs_f64()
            );
        }
        let list = |s: &mut String, title: &str, v: &[String]| {
            if v.is_empty() {
                return;
            }
            let _ = writeln!(s, "\n{title} ({}):\n", v.len());
            for l in v.iter().take(40) {
                let _ = writeln!(s, "- {}", l.replace('\n', " "));
            }
            if v.len() > 40 {
                let _ = writeln!(s, "- ... {} more", v.len() - 40);
            }
        };
        list(&mut s, "Violations", &self.violations);
        list(&mut s, "Ledger mismatches", &self.ledger_mismatches);
        list(
            &mut s,
            "States containerd lost mid-commit (reported by the agent)",
            &self.lost_states,
        );
        list(&mut s, "Data mismatches", &self.data_mismatches);
        list(
            &mut s,
            "Examples of allowed failures (inside a window)",
            &self.excused_samples,
        );
        s
    }
}

/// A fault's window.
#[derive(Debug, Clone)]
struct Window {
    kind: FaultKind,
    /// The bot it concerns; `None`: every call.
    bot: Option<String>,
    start: Instant,
    end: Option<Instant>,
}

/// The shared record: fault windows and the report being built.
struct Recorder {
    t0: Instant,
    verbose: bool,
    windows: Mutex<Vec<Window>>,
    report: Mutex<SoakReport>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recorder {
    fn log(&self, msg: &str) {
        if self.verbose {
            println!("[{:7.1} s] {msg}", self.t0.elapsed().as_secs_f64());
        }
    }

    fn open(&self, kind: FaultKind, bot: Option<String>) -> usize {
        let mut w = lock(&self.windows);
        w.push(Window {
            kind,
            bot,
            start: Instant::now(),
            end: None,
        });
        lock(&self.report).faults.entry(kind).or_default().injected += 1;
        w.len() - 1
    }

    /// Closes window `i`; `Ok` carries a note for the log, `Err` why it did not recover (the
    /// window then stays open until the end of the run, excusing what it broke, and is a
    /// violation).
    fn close(&self, i: usize, result: Result<String, String>) {
        let (kind, bot, took) = {
            let mut w = lock(&self.windows);
            let took = w[i].start.elapsed();
            if result.is_ok() {
                w[i].end = Some(Instant::now());
            }
            (w[i].kind, w[i].bot.clone(), took)
        };
        let on = bot.map(|b| format!(" on {b}")).unwrap_or_default();
        match result {
            Ok(note) => {
                {
                    let mut r = lock(&self.report);
                    let f = r.faults.entry(kind).or_default();
                    f.recovered += 1;
                    f.recovery.push(took);
                }
                self.log(&format!(
                    "fault {}{on}: recovered in {:.1} s{note}",
                    kind.name(),
                    took.as_secs_f64()
                ));
            }
            Err(e) => self.violation(format!(
                "fault {}{on} did not recover within {:.0} s: {e}",
                kind.name(),
                took.as_secs_f64()
            )),
        }
    }

    /// The kind of an open-or-overlapping window that excuses a call on `bot` that ran from
    /// `start` to `end`.
    fn excuse(&self, bot: Option<&str>, start: Instant, end: Instant) -> Option<FaultKind> {
        lock(&self.windows)
            .iter()
            .find(|w| {
                w.start <= end
                    && w.end.is_none_or(|e| e >= start)
                    && (w.bot.is_none() || w.bot.as_deref() == bot)
            })
            .map(|w| w.kind)
    }

    /// The faults whose windows overlapped `from..now`, as "kind at T s" items.
    fn faults_since(&self, from: Instant) -> String {
        let v: Vec<String> = lock(&self.windows)
            .iter()
            .filter(|w| w.end.is_none_or(|e| e >= from))
            .map(|w| {
                let on = w
                    .bot
                    .as_deref()
                    .map(|b| format!(" on {b}"))
                    .unwrap_or_default();
                format!(
                    "{}{on} at {:.1} s",
                    w.kind.name(),
                    (w.start - self.t0).as_secs_f64()
                )
            })
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }

    fn violation(&self, msg: String) {
        self.log(&format!("VIOLATION: {msg}"));
        lock(&self.report).violations.push(msg);
    }

    fn call_done(&self, op: &'static str, took: Duration) {
        let mut r = lock(&self.report);
        let c = r.calls.entry(op).or_default();
        c.calls += 1;
        c.time += took;
        c.max = c.max.max(took);
    }

    /// Records a failed call; `clear`: it failed with one readable error line.
    fn failed(&self, op: &'static str, bot: Option<&str>, start: Instant, line: &str, clear: bool) {
        let end = Instant::now();
        self.call_done(op, end - start);
        let on = bot.map(|b| format!(" on {b}")).unwrap_or_default();
        let at = (start - self.t0).as_secs_f64();
        match self.excuse(bot, start, end) {
            Some(kind) => {
                {
                    let mut r = lock(&self.report);
                    r.calls.entry(op).or_default().failed_in_window += 1;
                    r.faults.entry(kind).or_default().excused += 1;
                    if r.excused_samples.len() < SAMPLES {
                        r.excused_samples
                            .push(format!("{op}{on} during {}: {line}", kind.name()));
                    }
                }
                if !clear {
                    self.violation(format!(
                        "{op}{on} at {at:.1} s failed during {} without a clear error line: {line}",
                        kind.name()
                    ));
                }
            }
            None => {
                lock(&self.report)
                    .calls
                    .entry(op)
                    .or_default()
                    .failed_outside += 1;
                self.violation(format!(
                    "{op}{on} at {at:.1} s (took {:.1} s) failed outside any fault window: {line}",
                    (end - start).as_secs_f64()
                ));
            }
        }
    }

    fn ledger_checked(&self) {
        lock(&self.report).ledger_checks += 1;
    }

    fn ledger_mismatch(&self, msg: String) {
        self.log(&format!("LEDGER MISMATCH: {msg}"));
        lock(&self.report).ledger_mismatches.push(msg);
    }

    fn data_mismatch(&self, msg: String) {
        self.log(&format!("DATA MISMATCH: {msg}"));
        lock(&self.report).data_mismatches.push(msg);
    }
}

/// A named network namespace of the soak's own, deleted on drop.
struct NetnsGuard(String);

impl NetnsGuard {
    fn new(name: &str) -> Self {
        let out = sh("ip", &["netns", "add", name]);
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let g = Self(name.to_string());
        let out = sh("ip", &["-n", name, "link", "set", "lo", "up"]);
        assert!(
            out.status.success(),
            "lo up in {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        g
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "delete", &self.0]);
    }
}

/// The rig: containerd, the namespace and the agent. Dropped in the right order: containerd
/// is started again if a fault left it down (the agent's teardown goes through it), then the
/// agent guard (bots, agent, containerd namespace), leftover bot namespaces, containerd, and
/// the network namespace last.
struct Rig {
    agent: Mutex<Option<TestAgent>>,
    ctrd: Mutex<Option<PrivateContainerd>>,
    netns: Option<NetnsGuard>,
    ns_name: String,
    /// The agent's containerd namespace (part of its bots' namespace names).
    agent_namespace: String,
    socket: PathBuf,
    masq_rule: Vec<String>,
    bot_prefix: String,
    files: tempfile::TempDir,
    /// Bots that stopped answering for good: left out of recovery checks.
    broken: Mutex<BTreeSet<String>>,
    /// Snapshot and rollback calls hold it shared; a containerd kill that spares them holds it
    /// exclusively.
    cycle_gate: RwLock<()>,
}

impl Rig {
    fn new(env: &Env) -> Self {
        let ctrd = PrivateContainerd::new();
        let t = tag();
        let ns_name = format!("memoh-soak-{t}");
        let netns = NetnsGuard::new(&ns_name);
        let env = ctrd.env(env);
        // The agent removes what a killed containerd half-deleted of its bots' task bundles
        // itself; it finds them in this containerd's state dir.
        let state = ctrd.path("state").display().to_string();
        let mut a = TestAgent::new(
            &env,
            &format!(
                "mcp_listen = {MCP_ADDR:?}\nmcp_token = {MCP_TOKEN:?}\ncontainerd_state = {state:?}"
            ),
        );
        a.netns = Some(ns_name.clone());
        ctrd.import_image(&env, &a.namespace);
        a.serve();
        Self {
            agent_namespace: a.namespace.clone(),
            socket: a.socket.clone(),
            masq_rule: a.masq_rule(),
            bot_prefix: format!("s{t}"),
            files: tempfile::Builder::new()
                .prefix("memoh-soak-")
                .tempdir()
                .unwrap(),
            broken: Mutex::new(BTreeSet::new()),
            cycle_gate: RwLock::new(()),
            agent: Mutex::new(Some(a)),
            ctrd: Mutex::new(Some(ctrd)),
            netns: Some(netns),
            ns_name,
        }
    }

    /// A CLI command against the agent's socket.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(AGENT);
        c.arg("--socket").arg(&self.socket).args(args);
        c.env_remove("MEMOH_LOG");
        c
    }

    /// Runs the CLI for a probe (not counted): stdout on success.
    fn probe(&self, args: &[&str]) -> Result<String, String> {
        let out = try_output_within(self.command(args), None, Duration::from_secs(30))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn is_broken(&self, bot: &str) -> bool {
        lock(&self.broken).contains(bot)
    }

    /// The soak's bots as `bot ls --json` lists them.
    fn listed(&self) -> Result<Vec<Value>, String> {
        let out = self.probe(&["bot", "ls", "--json"])?;
        let v: Vec<Value> =
            serde_json::from_str(&out).map_err(|e| format!("bot ls --json: {e}"))?;
        Ok(v.into_iter()
            .filter(|b| {
                b["bot_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(&self.bot_prefix))
            })
            .collect())
    }

    /// Whether the agent's MASQUERADE rule is in the namespace's nat POSTROUTING.
    fn masq_present(&self) -> bool {
        let mut args = vec![
            "netns",
            "exec",
            &self.ns_name,
            "iptables",
            "-w",
            "5",
            "-t",
            "nat",
            "-C",
            "POSTROUTING",
        ];
        args.extend(self.masq_rule.iter().map(String::as_str));
        sh("ip", &args).status.success()
    }

    /// Waits until `bot ls` answers and every listed bot answers `exec true` (a bot that goes
    /// away meanwhile is done).
    fn all_bots_answer(&self, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        let mut last;
        let mut failures = 0;
        let mut done: Vec<String> = Vec::new();
        loop {
            match self.listed() {
                Ok(bots) => {
                    let ids: Vec<String> = bots
                        .iter()
                        .filter_map(|b| b["bot_id"].as_str().map(String::from))
                        .filter(|id| !self.is_broken(id))
                        .collect();
                    let mut pending = Vec::new();
                    let todo: Vec<&String> = ids.iter().filter(|id| !done.contains(id)).collect();
                    for id in todo {
                        match self.probe(&["exec", id, "--", "true"]) {
                            Ok(_) => done.push(id.clone()),
                            Err(e) => pending.push((id.clone(), e)),
                        }
                    }
                    if pending.is_empty() {
                        return Ok(String::new());
                    }
                    failures += 1;
                    if start.elapsed() > limit {
                        let last: Vec<String> =
                            pending.iter().map(|(id, e)| format!("{id}: {e}")).collect();
                        lock(&self.broken).extend(pending.into_iter().map(|(id, _)| id));
                        return Err(format!(
                            "{failures} failed probes; these bots are left alone from now on: {}",
                            last.join("; ")
                        ));
                    }
                    last = String::new();
                }
                Err(e) => last = format!("bot ls: {e}"),
            }
            if start.elapsed() > limit {
                return Err(format!("{failures} failed probes; last: {last}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `bot` answers `exec true` or is no longer listed.
    /// The `Ok` note says how many probes failed first and the last error, if any.
    fn bot_answers(&self, bot: &str, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        let mut failures = 0;
        let mut last = String::new();
        let note = |failures: u32, last: &str| {
            if failures == 0 {
                String::new()
            } else {
                format!(" ({failures} failed probes, last: {last})")
            }
        };
        loop {
            let t = Instant::now();
            match self.probe(&["exec", bot, "--", "true"]) {
                Ok(_) => return Ok(note(failures, &last)),
                Err(e) => {
                    failures += 1;
                    last = format!("{e} after {:.1} s", t.elapsed().as_secs_f64());
                }
            }
            if let Ok(bots) = self.listed() {
                if !bots.iter().any(|b| b["bot_id"].as_str() == Some(bot)) {
                    return Ok(" (the bot was deleted meanwhile)".into());
                }
            }
            if start.elapsed() > limit {
                lock(&self.broken).insert(bot.to_string());
                return Err(format!(
                    "{}; the bot is left alone from now on",
                    note(failures, &last)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(c) = lock(&self.ctrd).as_mut() {
            if !c.running() {
                if let Err(e) = c.try_start(Duration::from_secs(30)) {
                    eprintln!("soak clean-up: containerd did not start again: {e}");
                }
            }
        }
        drop(lock(&self.agent).take());
        // Bot namespaces a failed delete may have left.
        let prefix = memoh_agent::ids::netns_name(&self.agent_namespace, &self.bot_prefix);
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    let _ = sh("ip", &["netns", "delete", &name]);
                }
            }
        }
        drop(lock(&self.ctrd).take());
        drop(self.netns.take());
    }
}

/// What the workers and the main thread share.
struct Shared<'a> {
    rig: &'a Rig,
    rec: &'a Recorder,
    cfg: &'a SoakConfig,
    /// Workers stop once this is set.
    stop: AtomicBool,
    /// Set by the injector when it is done (also when it panicked).
    injector_done: AtomicBool,
}

/// Sets a flag when dropped (also while unwinding).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs the soak; see the module docs. Panics only when the rig cannot be built.
pub fn run(cfg: SoakConfig) -> SoakReport {
    println!(
        "soak: seed {seed} (replay with MEMOH_SOAK_SEED={seed}), {} s, {} workers x {} bots, \
         faults: {}",
        cfg.duration.as_secs(),
        cfg.workers,
        cfg.bots_per_worker,
        cfg.faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", "),
        seed = cfg.seed,
    );
    let rig = Rig::new(&cfg.env);
    let rec = Recorder {
        t0: Instant::now(),
        verbose: cfg.verbose,
        windows: Mutex::new(Vec::new()),
        report: Mutex::new(SoakReport {
            seed: cfg.seed,
            planned: cfg.duration,
            workers: cfg.workers,
            bots_per_worker: cfg.bots_per_worker,
            ..Default::default()
        }),
    };
    rec.log(&format!(
        "rig up: agent in netns {}, containerd {}",
        rig.ns_name,
        lock(&rig.ctrd)
            .as_ref()
            .map(|c| c.sock.display().to_string())
            .unwrap_or_default()
    ));
    let shared = Shared {
        rig: &rig,
        rec: &rec,
        cfg: &cfg,
        stop: AtomicBool::new(false),
        injector_done: AtomicBool::new(false),
    };
    let mut rng = Rng::new(cfg.seed);
    let mut injector_rng = rng.fork();
    let worker_rngs: Vec<Rng> = (0..cfg.workers).map(|_| rng.fork()).collect();
    let deadline = rec.t0 + cfg.duration;

    let finished: Vec<Worker<'_>> = std::thread::scope(|s| {
        let ctx = &shared;
        let injector = s.spawn(move || {
            let _done = SetOnDrop(&ctx.injector_done);
            inject_loop(ctx, &mut injector_rng, deadline);
        });
        let workers: Vec<_> = worker_rngs
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                s.spawn(move || {
                    let mut w = Worker::new(ctx, i, r);
                    w.run();
                    w
                })
            })
            .collect();
        while Instant::now() < deadline || !ctx.injector_done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        ctx.stop.store(true, Ordering::SeqCst);
        rec.log("stopping the workers");
        let _ = injector.join();
        workers.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    lock(&rec.report).elapsed = rec.t0.elapsed();
    finish(&rig, &rec, finished);
    if let Some(dir) = &cfg.log_dir {
        keep_logs(&rig, dir, cfg.seed);
    }
    let report = lock(&rec.report).clone();
    // The rig goes (bots, agent, containerd, namespace) before the report is handed back.
    drop(rig);
    report
}

/// Copies the agent's and containerd's logs to `dir` as `soak-SEED-{agent,containerd}.log`.
fn keep_logs(rig: &Rig, dir: &Path, seed: u64) {
    let _ = std::fs::create_dir_all(dir);
    let agent = lock(&rig.agent).as_ref().map(TestAgent::log_path);
    let ctrd = lock(&rig.ctrd).as_ref().map(|c| c.path("containerd.log"));
    for (what, src) in [("agent", agent), ("containerd", ctrd)] {
        let Some(src) = src else { continue };
        let dst = dir.join(format!("soak-{seed}-{what}.log"));
        match std::fs::copy(&src, &dst) {
            Ok(_) => println!("soak: {what} log kept in {}", dst.display()),
            Err(e) => println!("soak: cannot keep the {what} log: {e}"),
        }
    }
}

/// The end: every bot must answer, every ledger must match, every bot must go away cleanly.
fn finish(rig: &Rig, rec: &Recorder, workers: Vec<Worker<'_>>) {
    rec.log("final checks");
    if let Err(e) = rig.all_bots_answer(Duration::from_secs(90)) {
        rec.violation(format!("bots did not all answer after the run: {e}"));
    }
    let mut all_ids = Vec::new();
    for mut w in workers {
        let bots = std::mem::take(&mut w.bots);
        for mut b in bots {
            if rig.is_broken(&b.id) {
                continue;
            }
            all_ids.push(b.id.clone());
            w.verify_sha(&mut b, "final verify (sha256 in the bot)");
            if !b.ledger.contains(&String::new()) {
                w.verify_cp(&mut b);
            }
            if w.delete(&b, "final delete") {
                lock(&rec.report).bots_deleted += 1;
            }
        }
        for id in std::mem::take(&mut w.doomed) {
            all_ids.push(id.clone());
            w.remove_doomed(&id);
        }
        all_ids.extend(std::mem::take(&mut w.deleted));
    }
    let broken: Vec<String> = lock(&rig.broken).iter().cloned().collect();
    all_ids.retain(|id| !broken.contains(id));
    lock(&rec.report).broken_bots = broken.clone();
    match rig.listed().map(|v| {
        v.into_iter()
            .filter(|b| {
                !b["bot_id"]
                    .as_str()
                    .is_some_and(|id| broken.iter().any(|x| x == id))
            })
            .collect::<Vec<_>>()
    }) {
        Ok(left) if left.is_empty() => {}
        Ok(left) => rec.violation(format!(
            "bots still listed after the final deletes: {}",
            left.iter()
                .filter_map(|b| b["bot_id"].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )),
        Err(e) => rec.violation(format!("bot ls after the final deletes: {e}")),
    }
    if let Some(a) = lock(&rig.agent).as_ref() {
        for id in &all_ids {
            let left = a.leftovers(id);
            if !left.is_empty() {
                rec.violation(format!("{id} left {}", left.join(", ")));
            }
        }
    }
}

/// What the soak knows of one bot.
#[derive(Debug, Clone)]
struct Bot {
    id: String,
    /// The ledger's possible contents (one when certain; "" is a missing file).
    ledger: Vec<String>,
    /// Version number -> the ledger's content when it was taken.
    versions: BTreeMap<u64, String>,
    /// The ledger's content in the state the bot's running state was taken from (its image:
    /// empty; a version; a rollback target): where it goes back to if containerd loses it.
    base: String,
    /// Set by a failed version cycle: the candidate that means containerd lost the state.
    lost: Option<String>,
    /// Set by a failed rollback: its target, the new base if the ledger settles on it.
    rollback_target: Option<String>,
    lines: u64,
    ops: u64,
    lifetime: u64,
    born: Instant,
}

impl Bot {
    fn maybe(&mut self, more: impl IntoIterator<Item = String>) {
        for c in more {
            if !self.ledger.contains(&c) {
                self.ledger.push(c);
            }
        }
    }

    /// A version cycle failed: containerd may have lost the state mid-commit, putting the bot
    /// back on its base.
    fn maybe_lost(&mut self) {
        if !self.ledger.contains(&self.base) {
            let base = self.base.clone();
            self.ledger.push(base.clone());
            self.lost = Some(base);
        }
    }

    fn certain(&self) -> Option<&String> {
        (self.ledger.len() == 1).then(|| &self.ledger[0])
    }
}

fn sha_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One worker: its bots, its generator, its calls.
struct Worker<'a> {
    sh: &'a Shared<'a>,
    idx: usize,
    rng: Rng,
    bots: Vec<Bot>,
    /// Bots whose create or delete failed: removed when possible.
    doomed: Vec<String>,
    /// Bots deleted for good.
    deleted: Vec<String>,
    /// Failed deletes per doomed bot.
    rm_tries: BTreeMap<String, u32>,
    created: u64,
    dir: PathBuf,
}

/// The kinds of calls, with their weights.
const OPS: &[(&str, u64)] = &[
    ("append", 22),
    ("append mcp", 10),
    ("verify sha", 8),
    ("verify cp", 6),
    ("verify mcp", 6),
    ("mcp write+read", 5),
    ("cp round trip", 6),
    ("snapshot", 9),
    ("rollback", 8),
    ("snapshot ls", 4),
    ("inspect", 4),
];

impl<'a> Worker<'a> {
    fn new(sh: &'a Shared<'a>, idx: usize, rng: Rng) -> Self {
        let dir = sh.rig.files.path().join(format!("w{idx}"));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            sh,
            idx,
            rng,
            bots: Vec::new(),
            doomed: Vec::new(),
            deleted: Vec::new(),
            rm_tries: BTreeMap::new(),
            created: 0,
            dir,
        }
    }

    fn rec(&self) -> &'a Recorder {
        self.sh.rec
    }

    fn run(&mut self) {
        // The agent's MCP listener is on the namespace's loopback: this thread (and the CLI
        // processes it starts, which reach the agent by its unix socket) lives there.
        let ns = std::fs::File::open(Path::new("/run/netns").join(&self.sh.rig.ns_name))
            .expect("open the soak's network namespace");
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("enter the soak's network namespace");
        while !self.sh.stop.load(Ordering::SeqCst) {
            self.step();
        }
    }

    fn step(&mut self) {
        if !self.doomed.is_empty() && self.rng.below(3) == 0 {
            let id = self.doomed.remove(0);
            self.remove_doomed(&id);
            return;
        }
        if self.bots.len() < self.sh.cfg.bots_per_worker {
            self.create();
            return;
        }
        if let Some(i) = self.bots.iter().position(|b| self.sh.rig.is_broken(&b.id)) {
            let b = self.bots.swap_remove(i);
            self.rec()
                .log(&format!("{}: broken; the worker leaves it alone", b.id));
            return;
        }
        let i = self.rng.below(self.bots.len() as u64) as usize;
        let mut b = self.bots.swap_remove(i);
        if b.ledger.len() > 1 {
            // A failed call left it open what the ledger holds: settle that first.
            self.verify_sha(&mut b, "verify sha");
        } else if b.ops >= b.lifetime {
            self.verify_sha(&mut b, "verify sha");
            if self.delete(&b, "delete") {
                lock(&self.rec().report).bots_deleted += 1;
                self.deleted.push(b.id);
            } else {
                self.doomed.push(b.id);
            }
            return;
        } else {
            b.ops += 1;
            let total: u64 = OPS.iter().map(|(_, w)| w).sum();
            let mut x = self.rng.below(total);
            let op = OPS
                .iter()
                .find(|(_, w)| {
                    if x < *w {
                        true
                    } else {
                        x -= w;
                        false
                    }
                })
                .map(|(n, _)| *n)
                .unwrap();
            match op {
                "append" => self.append(&mut b),
                "append mcp" => self.append_mcp(&mut b),
                "verify sha" => self.verify_sha(&mut b, "verify sha"),
                "verify cp" if !b.ledger.contains(&String::new()) => self.verify_cp(&mut b),
                "verify cp" | "verify mcp" => self.verify_mcp(&mut b),
                "mcp write+read" => self.mcp_write_read(&b),
                "cp round trip" => self.cp_round_trip(&b),
                "snapshot" => self.snapshot(&mut b),
                "rollback" if !b.versions.is_empty() => self.rollback(&mut b),
                "rollback" => self.snapshot(&mut b),
                "snapshot ls" => self.snapshot_ls(&b),
                _ => self.inspect(&b),
            }
        }
        self.bots.push(b);
    }

    /// One CLI call, recorded as `op`; stdout on success, the error line on failure.
    fn cli(&self, op: &'static str, bot: Option<&str>, args: &[&str]) -> Result<String, String> {
        let start = Instant::now();
        match try_output_within(self.sh.rig.command(args), None, CALL_LIMIT) {
            Ok(out) if out.status.success() => {
                self.rec().call_done(op, start.elapsed());
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
                let clear = lines.len() == 1;
                let line = if lines.is_empty() {
                    format!("{} and nothing on stderr", out.status)
                } else {
                    lines.join(" | ")
                };
                self.rec().failed(op, bot, start, &line, clear);
                std::thread::sleep(BACKOFF);
                Err(line)
            }
            Err(e) => {
                let line = format!("hung: {e}");
                self.rec().failed(op, bot, start, &line, false);
                std::thread::sleep(BACKOFF);
                Err(line)
            }
        }
    }

    /// One MCP tool call on `bot` (a session of its own), recorded as `op`; the structured
    /// result on success.
    fn mcp(&self, op: &'static str, bot: &str, tool: &str, args: Value) -> Result<Value, String> {
        let start = Instant::now();
        match mcp_tool_call(bot, tool, args) {
            Ok(v) => {
                self.rec().call_done(op, start.elapsed());
                Ok(v)
            }
            Err(e) => {
                let clear = !e.hung && !e.message.trim().is_empty();
                self.rec().failed(op, Some(bot), start, &e.message, clear);
                std::thread::sleep(BACKOFF);
                Err(e.message)
            }
        }
    }

    fn create(&mut self) {
        let id = format!("{}w{}n{}", self.sh.rig.bot_prefix, self.idx, self.created);
        self.created += 1;
        match self.cli("bot create", Some(&id), &["bot", "create", &id]) {
            Ok(out) => {
                if out.split_whitespace().nth(1) != Some("running") {
                    self.rec()
                        .violation(format!("bot create {id} printed {:?}", out.trim()));
                }
                lock(&self.rec().report).bots_created += 1;
                let (lo, hi) = self.sh.cfg.bot_lifetime_ops;
                let lifetime = self.rng.range(lo, hi);
                self.bots.push(Bot {
                    id,
                    ledger: vec![String::new()],
                    versions: BTreeMap::new(),
                    base: String::new(),
                    lost: None,
                    rollback_target: None,
                    lines: 0,
                    ops: 0,
                    lifetime,
                    born: Instant::now(),
                });
            }
            Err(_) => self.doomed.push(id),
        }
    }

    /// A bot whose create or delete failed: deleted if it is still listed.
    fn remove_doomed(&mut self, id: &str) {
        let listed = match self.sh.rig.listed() {
            Ok(bots) => bots.iter().any(|b| b["bot_id"].as_str() == Some(id)),
            Err(_) => {
                self.doomed.push(id.to_string());
                return;
            }
        };
        if !listed {
            self.deleted.push(id.to_string());
            return;
        }
        let b = Bot {
            id: id.to_string(),
            ledger: vec![],
            versions: BTreeMap::new(),
            base: String::new(),
            lost: None,
            rollback_target: None,
            lines: 0,
            ops: 0,
            lifetime: 0,
            born: Instant::now(),
        };
        if self.delete(&b, "delete") {
            self.deleted.push(id.to_string());
            return;
        }
        let tries = {
            let t = self.rm_tries.entry(id.to_string()).or_insert(0);
            *t += 1;
            *t
        };
        if tries >= 5 {
            self.rec().violation(format!(
                "{id} could not be deleted in {tries} tries; left alone"
            ));
            lock(&self.sh.rig.broken).insert(id.to_string());
        } else {
            self.doomed.push(id.to_string());
        }
    }

    fn delete(&self, b: &Bot, op: &'static str) -> bool {
        self.cli(op, Some(&b.id), &["bot", "rm", &b.id]).is_ok()
    }

    fn new_line(&mut self, b: &mut Bot) -> String {
        b.lines += 1;
        format!("{} {} {}", b.id, b.lines, self.rng.hex(12))
    }

    fn appended(b: &mut Bot, line: &str, ok: bool) {
        let with: Vec<String> = b.ledger.iter().map(|c| format!("{c}{line}\n")).collect();
        if ok {
            b.ledger = with;
        } else {
            b.maybe(with);
        }
    }

    fn append(&mut self, b: &mut Bot) {
        let line = self.new_line(b);
        let script = format!("echo '{line}' >> /data/ledger");
        let r = self.cli(
            "exec (append)",
            Some(&b.id),
            &["exec", &b.id, "--", "sh", "-c", &script],
        );
        Self::appended(b, &line, r.is_ok());
    }

    fn append_mcp(&mut self, b: &mut Bot) {
        let line = self.new_line(b);
        let cmd = format!("echo '{line}' >> /data/ledger");
        let r = self.mcp(
            "mcp exec (append)",
            &b.id,
            "exec",
            json!({"command": cmd, "timeout_seconds": 30}),
        );
        let ok = match r {
            Ok(v) if v["exit_code"] == 0 => true,
            Ok(v) => {
                self.rec()
                    .violation(format!("mcp exec append on {} answered {v}", b.id));
                false
            }
            Err(_) => false,
        };
        Self::appended(b, &line, ok);
    }

    /// Settles the ledger against `matches`; on a mismatch fetches the content to go on.
    fn settle(&self, b: &mut Bot, how: &str, actual: &str, matches: impl Fn(&str) -> bool) {
        self.rec().ledger_checked();
        let lost = b.lost.take();
        let target = b.rollback_target.take();
        if let Some(c) = b.ledger.iter().find(|c| matches(c)).cloned() {
            if target.as_ref() == Some(&c) {
                b.base = c.clone();
            }
            if lost.as_ref() == Some(&c) {
                self.check_lost_reported(b, how);
            }
            b.ledger = vec![c];
            return;
        }
        let expected: Vec<String> = b
            .ledger
            .iter()
            .map(|c| {
                format!(
                    "{} ({} lines)",
                    &sha_hex(c.as_bytes())[..12],
                    c.lines().count()
                )
            })
            .collect();
        let got = self
            .sh
            .rig
            .probe(&[
                "exec",
                &b.id,
                "--",
                "sh",
                "-c",
                "cat /data/ledger 2>/dev/null; true",
            ])
            .ok();
        self.rec().ledger_mismatch(format!(
            "{} ({how}): got {actual}{}, expected one of [{}]; faults in its life: {}",
            b.id,
            got.as_ref()
                .map(|g| format!(" ({} lines)", g.lines().count()))
                .unwrap_or_default(),
            expected.join(", "),
            self.rec().faults_since(b.born)
        ));
        if let Some(g) = got {
            b.ledger = vec![g];
        }
    }

    /// The ledger went back to the bot's base after a failed cycle: containerd lost the state,
    /// and the agent must say so.
    fn check_lost_reported(&self, b: &Bot, how: &str) {
        let info = self.sh.rig.probe(&["bot", "inspect", &b.id]);
        let note = info
            .as_deref()
            .ok()
            .and_then(|o| serde_json::from_str::<Value>(o).ok())
            .and_then(|v| v["lost_state"].as_str().map(str::to_string));
        match note {
            Some(note) => {
                self.rec()
                    .log(&format!("{}: containerd lost its state: {note}", b.id));
                lock(&self.rec().report)
                    .lost_states
                    .push(format!("{}: {note}", b.id));
            }
            None => self.rec().ledger_mismatch(format!(
                "{} ({how}): the ledger went back to the bot's base after a failed cycle, but \
                 bot inspect reports no lost state ({info:?})",
                b.id
            )),
        }
    }

    fn verify_sha(&mut self, b: &mut Bot, op: &'static str) {
        let Ok(out) = self.cli(
            op,
            Some(&b.id),
            &[
                "exec",
                &b.id,
                "--",
                "sh",
                "-c",
                "cat /data/ledger 2>/dev/null | sha256sum",
            ],
        ) else {
            return;
        };
        let actual = out
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        self.settle(
            b,
            "sha256sum in the bot",
            &actual[..actual.len().min(12)],
            |c| sha_hex(c.as_bytes()) == actual,
        );
    }

    fn verify_cp(&mut self, b: &mut Bot) {
        let local = self.dir.join("ledger.copy");
        let _ = std::fs::remove_file(&local);
        let remote = format!("{}:/data/ledger", b.id);
        if self
            .cli(
                "cp out (verify ledger)",
                Some(&b.id),
                &["cp", &remote, &local.display().to_string()],
            )
            .is_err()
        {
            return;
        }
        let got = std::fs::read(&local).unwrap_or_default();
        let actual = sha_hex(&got);
        self.settle(b, "copied out", &actual[..12], |c| c.as_bytes() == got);
    }

    fn verify_mcp(&mut self, b: &mut Bot) {
        let Ok(v) = self.mcp(
            "mcp exec (verify)",
            &b.id,
            "exec",
            json!({"command": "cat /data/ledger 2>/dev/null | sha256sum"}),
        ) else {
            return;
        };
        let out = v["stdout"].as_str().unwrap_or_default();
        let actual = out
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        if v["exit_code"] != 0 || actual.len() != 64 {
            self.rec()
                .violation(format!("mcp exec verify on {} answered {v}", b.id));
            return;
        }
        self.settle(b, "sha256sum over mcp", &actual[..12], |c| {
            sha_hex(c.as_bytes()) == actual
        });
    }

    fn mcp_write_read(&mut self, b: &Bot) {
        let lines: Vec<String> = (0..3).map(|_| self.rng.hex(16)).collect();
        let content = format!("{}\n", lines.join("\n"));
        if self
            .mcp(
                "mcp write",
                &b.id,
                "write",
                json!({"path": "/data/mcp-scratch.txt", "content": content}),
            )
            .is_err()
        {
            return;
        }
        let Ok(v) = self.mcp(
            "mcp read",
            &b.id,
            "read",
            json!({"path": "/data/mcp-scratch.txt"}),
        ) else {
            return;
        };
        // The read tool numbers its lines: "     1\ttext".
        let got: Vec<&str> = v["content"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_once('\t').map_or(l, |(_, t)| t))
            .collect();
        if got != lines {
            self.rec().data_mismatch(format!(
                "{}: mcp read gave {got:?} after writing {lines:?}",
                b.id
            ));
        }
    }

    fn cp_round_trip(&mut self, b: &Bot) {
        let n = self.rng.range(1, 256) as usize * 1024 + self.rng.below(1024) as usize;
        let data = self.rng.bytes(n);
        let up = self.dir.join("blob.up");
        let down = self.dir.join("blob.down");
        std::fs::write(&up, &data).unwrap();
        let _ = std::fs::remove_file(&down);
        let remote = format!("{}:/data/blob.bin", b.id);
        if self
            .cli(
                "cp in",
                Some(&b.id),
                &["cp", &up.display().to_string(), &remote],
            )
            .is_err()
        {
            return;
        }
        if self
            .cli(
                "cp out",
                Some(&b.id),
                &["cp", &remote, &down.display().to_string()],
            )
            .is_err()
        {
            return;
        }
        let got = std::fs::read(&down).unwrap_or_default();
        if got != data {
            self.rec().data_mismatch(format!(
                "{}: cp round trip of {n} bytes came back as {} bytes (sha {} vs {})",
                b.id,
                got.len(),
                &sha_hex(&got)[..12],
                &sha_hex(&data)[..12]
            ));
        }
    }

    fn snapshot(&mut self, b: &mut Bot) {
        let Some(content) = b.certain().cloned() else {
            return;
        };
        let name = format!("soak-{}", b.ops);
        let _cycle = self
            .sh
            .rig
            .cycle_gate
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let Ok(out) = self.cli(
            "snapshot create",
            Some(&b.id),
            &["snapshot", "create", &b.id, "--name", &name],
        ) else {
            b.maybe_lost();
            return;
        };
        // "version N CREATED"
        match out
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(v) => {
                b.versions.insert(v, content.clone());
                b.base = content;
            }
            None => {
                self.rec()
                    .violation(format!("snapshot create {} printed {:?}", b.id, out.trim()))
            }
        }
    }

    fn rollback(&mut self, b: &mut Bot) {
        let keys: Vec<u64> = b.versions.keys().copied().collect();
        let v = keys[self.rng.below(keys.len() as u64) as usize];
        let target = b.versions[&v].clone();
        let _cycle = self
            .sh
            .rig
            .cycle_gate
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let r = self.cli(
            "snapshot rollback",
            Some(&b.id),
            &["snapshot", "rollback", &b.id, &v.to_string()],
        );
        if r.is_ok() {
            b.ledger = vec![target.clone()];
            b.base = target;
        } else {
            b.maybe([target.clone()]);
            b.maybe_lost();
            b.rollback_target = Some(target);
        }
    }

    fn snapshot_ls(&mut self, b: &Bot) {
        let Ok(out) = self.cli(
            "snapshot ls",
            Some(&b.id),
            &["snapshot", "ls", &b.id, "--json"],
        ) else {
            return;
        };
        let listed: Vec<u64> = match serde_json::from_str::<Vec<Value>>(&out) {
            Ok(v) => v.iter().filter_map(|s| s["version"].as_u64()).collect(),
            Err(e) => {
                self.rec()
                    .violation(format!("snapshot ls {} --json: {e}: {out:?}", b.id));
                return;
            }
        };
        for v in b.versions.keys() {
            if !listed.contains(v) {
                self.rec().data_mismatch(format!(
                    "{}: version {v} is gone (listed: {listed:?})",
                    b.id
                ));
            }
        }
    }

    fn inspect(&mut self, b: &Bot) {
        let Ok(out) = self.cli("bot inspect", Some(&b.id), &["bot", "inspect", &b.id]) else {
            return;
        };
        match serde_json::from_str::<Value>(&out) {
            Ok(v) if v["bot_id"].as_str() == Some(b.id.as_str()) => {}
            _ => self
                .rec()
                .violation(format!("bot inspect {} printed {:?}", b.id, out.trim())),
        }
    }
}

/// The injector: one fault at a time until the deadline (and, with `every_kind_once`, until
/// every kind was injected once).
fn inject_loop(ctx: &Shared<'_>, rng: &mut Rng, deadline: Instant) {
    let cfg = ctx.cfg;
    let mut pending: Vec<FaultKind> = cfg.faults.clone();
    // A seeded shuffle, so the first round covers every kind in a random order.
    for i in (1..pending.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        pending.swap(i, j);
    }
    if !cfg.every_kind_once {
        pending.clear();
    }
    let give_up = deadline + Duration::from_secs(300);
    loop {
        let gap = rng.duration(cfg.fault_gap);
        let wake = Instant::now() + gap;
        if wake >= deadline && pending.is_empty() {
            return;
        }
        while Instant::now() < wake {
            if ctx.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let kind = match pending.last() {
            Some(k) => *k,
            None if cfg.faults.is_empty() => return,
            None => cfg.faults[rng.below(cfg.faults.len() as u64) as usize],
        };
        match inject(ctx, rng, kind) {
            Ok(()) => {
                pending.retain(|k| *k != kind);
            }
            Err(why) => {
                ctx.rec
                    .log(&format!("could not inject {} now: {why}", kind.name()));
                if Instant::now() > give_up {
                    ctx.rec.violation(format!(
                        "{} could not be injected before giving up: {why}",
                        kind.name()
                    ));
                    pending.retain(|k| *k != kind);
                }
            }
        }
    }
}

/// A running soak bot: (id, pid).
fn pick_running(ctx: &Shared<'_>, rng: &mut Rng) -> Result<(String, u32), String> {
    let bots = ctx.rig.listed()?;
    let running: Vec<(String, u32)> = bots
        .iter()
        .filter(|b| b["status"] == "running" && b["pid"].as_u64().is_some_and(|p| p > 0))
        .filter(|b| !b["bot_id"].as_str().is_some_and(|id| ctx.rig.is_broken(id)))
        .filter_map(|b| Some((b["bot_id"].as_str()?.to_string(), b["pid"].as_u64()? as u32)))
        .collect();
    if running.is_empty() {
        return Err("no running bot".into());
    }
    Ok(running[rng.below(running.len() as u64) as usize].clone())
}

/// Whether process `pid` lives in bot `bot`'s network namespace (so it is that bot's
/// server, not a recycled pid).
fn in_bot_netns(pid: u32, agent_namespace: &str, bot: &str) -> bool {
    let ns = std::fs::metadata(format!("/proc/{pid}/ns/net"));
    let bot_ns = std::fs::metadata(
        Path::new("/run/netns").join(memoh_agent::ids::netns_name(agent_namespace, bot)),
    );
    match (ns, bot_ns) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// The host-side veth of `bot` (of the agent in `agent_namespace`)'s `eth0` in namespace `ns`.
fn host_veth(ns: &str, agent_namespace: &str, bot: &str) -> Option<String> {
    let bot_ns = memoh_agent::ids::netns_name(agent_namespace, bot);
    let out = sh("ip", &["-n", &bot_ns, "-o", "link", "show", "eth0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "2: eth0@if7: <...>"
    let idx: String = text
        .split_once("eth0@if")?
        .1
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let out = sh("ip", &["-n", ns, "-o", "link", "show"]);
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (i, rest) = l.split_once(": ")?;
        (i.trim() == idx).then(|| {
            rest.split(['@', ':'])
                .next()
                .unwrap_or_default()
                .to_string()
        })
    })
}

/// Injects one fault of `kind` and waits for its recovery.
fn inject(ctx: &Shared<'_>, rng: &mut Rng, kind: FaultKind) -> Result<(), String> {
    let rig = ctx.rig;
    let rec = ctx.rec;
    let limit = ctx.cfg.recovery_limit;
    match kind {
        FaultKind::AgentKill => {
            let mut guard = lock(&rig.agent);
            let a = guard.as_mut().ok_or("no agent")?;
            let pid = a.pid().unwrap_or_default();
            let w = rec.open(kind, None);
            rec.log(&format!("fault: SIGKILL the agent (pid {pid})"));
            a.kill(nix::sys::signal::Signal::SIGKILL);
            std::thread::sleep(rng.duration((Duration::ZERO, Duration::from_millis(1500))));
            let r = a.try_serve(limit);
            drop(guard);
            let r = r.and_then(|()| rig.all_bots_answer(limit));
            rec.close(w, r);
        }
        FaultKind::ContainerdKill => {
            // Sparing the cycles: wait for the running ones, hold new ones back.
            let gate = ctx
                .cfg
                .spare_snapshot_cycles
                .then(|| rig.cycle_gate.write().unwrap_or_else(|p| p.into_inner()));
            let mut guard = lock(&rig.ctrd);
            let c = guard.as_mut().ok_or("no containerd")?;
            let w = rec.open(kind, None);
            rec.log("fault: SIGKILL containerd");
            c.kill();
            std::thread::sleep(rng.duration((Duration::from_millis(200), Duration::from_secs(3))));
            // Counted, not removed: the agent must get past them by itself.
            let stale = c.stale_bundles();
            if !stale.is_empty() {
                rec.log(&format!(
                    "the killed containerd left {} half-deleted bundle(s): {}",
                    stale.len(),
                    stale.join(" ")
                ));
                lock(&rec.report).stale_bundles += stale.len() as u64;
            }
            let r = c.try_start(Duration::from_secs(30));
            drop(guard);
            drop(gate);
            let r = r.and_then(|()| rig.all_bots_answer(limit));
            rec.close(w, r);
        }
        FaultKind::BotServerKill => {
            let (bot, pid) = pick_running(ctx, rng)?;
            if !in_bot_netns(pid, &rig.agent_namespace, &bot) {
                return Err(format!("pid {pid} is no longer {bot}'s server"));
            }
            let w = rec.open(kind, Some(bot.clone()));
            rec.log(&format!("fault: kill -9 {bot}'s server (pid {pid})"));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let r = rig.bot_answers(&bot, limit);
            rec.close(w, r);
        }
        FaultKind::NatFlush => {
            let w = rec.open(kind, None);
            rec.log("fault: iptables -t nat -F in the agent's namespace");
            let out = sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &rig.ns_name,
                    "iptables",
                    "-w",
                    "5",
                    "-t",
                    "nat",
                    "-F",
                ],
            );
            if !out.status.success() {
                let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
                rec.close(w, Err(format!("flush failed: {e}")));
                return Ok(());
            }
            let start = Instant::now();
            let r = loop {
                if rig.masq_present() {
                    break Ok(String::new());
                }
                if start.elapsed() > limit {
                    break Err("the MASQUERADE rule is still missing".to_string());
                }
                std::thread::sleep(Duration::from_millis(250));
            };
            rec.close(w, r);
        }
        FaultKind::VethDelete => {
            let (bot, _) = pick_running(ctx, rng)?;
            let veth = host_veth(&rig.ns_name, &rig.agent_namespace, &bot)
                .ok_or_else(|| format!("no host veth found for {bot}"))?;
            let w = rec.open(kind, Some(bot.clone()));
            rec.log(&format!("fault: delete {bot}'s host veth {veth}"));
            let out = sh("ip", &["-n", &rig.ns_name, "link", "delete", &veth]);
            if !out.status.success() {
                let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
                // Gone already (the bot was re-networked or deleted meanwhile).
                rec.close(w, Ok(" (nothing deleted)".into()));
                return Err(format!("ip link delete {veth}: {e}"));
            }
            let r = rig.bot_answers(&bot, limit);
            rec.close(w, r);
        }
    }
    Ok(())
}

/// Why an MCP call failed.
#[derive(Debug)]
struct McpError {
    message: String,
    /// It timed out rather than failing.
    hung: bool,
}

impl McpError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hung: false,
        }
    }
}

/// One tool call over streamable HTTP with a session of its own: initialize, initialized,
/// tools/call, then the session is deleted. Runs on the calling thread's network namespace.
fn mcp_tool_call(bot: &str, tool: &str, args: Value) -> Result<Value, McpError> {
    let path = format!("/bots/{bot}/mcp");
    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "memoh-soak", "version": "0"}
        }
    });
    let r = http("POST", &path, &[], Some(&init), Some(1), MCP_LIMIT)?;
    let session = r
        .header("mcp-session-id")
        .ok_or_else(|| McpError::new(format!("initialize: no session id (http {})", r.status)))?
        .to_string();
    let init_result = r.rpc_result("initialize")?;
    let version = init_result["protocolVersion"]
        .as_str()
        .unwrap_or("2025-06-18")
        .to_string();
    let headers = [
        ("Mcp-Session-Id", session.as_str()),
        ("MCP-Protocol-Version", version.as_str()),
    ];
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let r = http("POST", &path, &headers, Some(&note), None, MCP_LIMIT)?;
    if !(200..300).contains(&r.status) {
        return Err(McpError::new(format!(
            "notifications/initialized: http {}: {}",
            r.status,
            r.text()
        )));
    }
    let call = json!({
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": tool, "arguments": args}
    });
    let r = http("POST", &path, &headers, Some(&call), Some(2), MCP_LIMIT);
    let _ = http(
        "DELETE",
        &path,
        &headers,
        None,
        None,
        Duration::from_secs(5),
    );
    let result = r?.rpc_result("tools/call")?;
    if result["isError"].as_bool() == Some(true) {
        let text: String = result["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["text"].as_str())
            .collect();
        return Err(McpError::new(format!("tool {tool}: {text}")));
    }
    Ok(result["structuredContent"].clone())
}

/// An HTTP response with the JSON-RPC message it carried, if any.
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    message: Option<Value>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }

    /// The JSON-RPC result, or the error as a failure.
    fn rpc_result(&self, what: &str) -> Result<Value, McpError> {
        if !(200..300).contains(&self.status) {
            return Err(McpError::new(format!(
                "{what}: http {}: {}",
                self.status,
                self.text()
            )));
        }
        let Some(m) = &self.message else {
            return Err(McpError::new(format!(
                "{what}: no json-rpc response in the body"
            )));
        };
        if let Some(e) = m.get("error") {
            return Err(McpError::new(format!(
                "{what}: json-rpc error {}: {}",
                e["code"],
                e["message"].as_str().unwrap_or_default()
            )));
        }
        Ok(m["result"].clone())
    }
}

/// A minimal HTTP/1.1 exchange with the agent's MCP listener (`Connection: close`); for a
/// request with `want_id`, reads until the JSON-RPC response with that id arrived (as JSON or
/// in a server-sent event) and returns without waiting for the stream to end.
fn http(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
    want_id: Option<u64>,
    limit: Duration,
) -> Result<HttpResponse, McpError> {
    let addr: SocketAddr = MCP_ADDR.parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| McpError::new(format!("connect to mcp at {addr}: {e}")))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.set_write_timeout(Some(limit)).unwrap();
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {MCP_ADDR}\r\nAccept: application/json, \
         text/event-stream\r\nConnection: close\r\nContent-Length: {}\r\n",
        payload.len()
    );
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    let _ = write!(req, "Authorization: Bearer {MCP_TOKEN}\r\n");
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    s.write_all(req.as_bytes())
        .map_err(|e| McpError::new(format!("send to mcp: {e}")))?;
    let start = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut eof = false;
    loop {
        if let Some(r) = parse_response(&raw, eof, want_id)? {
            return Ok(r);
        }
        if eof {
            return Err(McpError::new(format!(
                "mcp closed the connection before answering ({} bytes read)",
                raw.len()
            )));
        }
        match s.read(&mut buf) {
            Ok(0) => eof = true,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if start.elapsed() > limit {
                    return Err(McpError {
                        message: format!("no mcp response within {limit:?}"),
                        hung: true,
                    });
                }
            }
            Err(e) => {
                // A reset after the response is complete is fine; anything else is the error.
                if let Some(r) = parse_response(&raw, true, want_id)? {
                    return Ok(r);
                }
                return Err(McpError::new(format!("read from mcp: {e}")));
            }
        }
    }
}

/// The response in `raw` if it is complete enough; `Ok(None)`: read more.
fn parse_response(
    raw: &[u8],
    eof: bool,
    want_id: Option<u64>,
) -> Result<Option<HttpResponse>, McpError> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| McpError::new(format!("bad http status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let rest = &raw[end + 4..];
    let (body, complete) = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        (rest[..rest.len().min(n)].to_vec(), rest.len() >= n)
    } else {
        (rest.to_vec(), eof)
    };
    let complete = complete || eof;
    let sse = get("content-type").is_some_and(|v| v.contains("text/event-stream"));
    let mut message = None;
    if (200..300).contains(&status) {
        if sse {
            message = sse_messages(&body)
                .into_iter()
                .find(|m| want_id.is_some() && m["id"].as_u64() == want_id);
        } else if complete && !body.is_empty() {
            message = serde_json::from_slice(&body).ok();
        }
    }
    if message.is_some() || complete || want_id.is_none() && status == 202 {
        return Ok(Some(HttpResponse {
            status,
            headers,
            body,
            message,
        }));
    }
    Ok(None)
}

/// The chunked body decoded so far, and whether the last chunk arrived.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(nl) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size_text = String::from_utf8_lossy(&raw[..nl]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (out, false);
        };
        if size == 0 {
            return (out, true);
        }
        let start = nl + 2;
        if raw.len() < start + size + 2 {
            return (out, false);
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}

/// The JSON messages in complete server-sent events of `body`.
fn sse_messages(body: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    let mut out = Vec::new();
    let mut events: Vec<&str> = text.split("\n\n").collect();
    // The last piece is an event still arriving.
    events.pop();
    for ev in events {
        let data: Vec<&str> = ev
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            continue;
        }
        if let Ok(v) = serde_json::from_str::<Value>(&data.join("\n")) {
            out.push(v);
        }
    }
    out
}
