//! The soak with fault injection (issue 7), the recorded long run: mixed create, exec, copy,
//! snapshot, rollback, MCP calls and delete across bots while the agent, containerd, bot
//! servers, the nat table and bots' veths are knocked out at random (see
//! `tests/common/soak.rs` for what is checked and how).
//!
//! ```sh
//! eval "$(scripts/test-env.sh env)"       # the image archive; containerd is a private one
//! cargo bench -p memoh-agent --bench soak -- --minutes 30
//! cargo bench -p memoh-agent --bench soak -- --seconds 120 --no-record
//! ```
//!
//! The length also comes from `MEMOH_SOAK_SECONDS`, the seed from `MEMOH_SOAK_SEED` (printed at
//! the start, for replays), the fault kinds from `MEMOH_SOAK_FAULTS`. Prints the report,
//! appends a dated "Soak with faults" section to `BENCHMARKS.md` (unless `--no-record`), keeps
//! the agent's and containerd's logs under `target/tmp/`, and exits non-zero on any violation
//! or ledger mismatch. Needs root.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::soak::{self, SoakConfig, SoakReport};
use common::Env;

fn main() {
    let mut secs: Option<u64> = std::env::var("MEMOH_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut record = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => {
                secs = args
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|m| m * 60)
            }
            "--seconds" => secs = args.next().and_then(|v| v.parse().ok()),
            "--no-record" => record = false,
            // cargo bench passes --bench; other harness flags mean nothing here.
            _ => {}
        }
    }
    let secs = secs.unwrap_or(30 * 60);
    let Some(env) = Env::get(false) else { return };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the soak needs root (containerd, network namespaces, iptables)");
        std::process::exit(2);
    }
    let mut cfg = SoakConfig::new(env, Duration::from_secs(secs));
    cfg.log_dir = Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let faults = cfg.faults.clone();
    let report = soak::run(cfg);
    let body = report.render();
    println!("\n{body}");
    if record {
        let path = workspace_root().join("BENCHMARKS.md");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(section(&report, &body, secs, &faults).as_bytes())
            .unwrap();
        println!("appended the soak section to {}", path.display());
    }
    if !report.passed() {
        eprintln!(
            "soak failed: {} violations, {} ledger mismatches, {} data mismatches (seed {})",
            report.violations.len(),
            report.ledger_mismatches.len(),
            report.data_mismatches.len(),
            report.seed
        );
        std::process::exit(1);
    }
}

fn field(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| {
            v.trim_start_matches([':', '=', ' ', '\t'])
                .trim_matches('"')
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "unknown".into())
}

fn section(r: &SoakReport, body: &str, secs: u64, faults: &[soak::FaultKind]) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = field("/proc/meminfo", "MemTotal")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let date = common::first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    format!(
        "\n## Soak with faults ({date})\n\n\
         Machine: {cpu}, {cores} cores, {mem:.0} GiB, {os}, kernel {kernel}, {containerd}; the \
         cores were shared with other engineers' builds and tests (load average at the end \
         {load}). Release build of `memoh-agent` (`cargo bench -p memoh-agent --bench soak -- \
         --seconds {secs}`), a private containerd and the agent in a network namespace of its \
         own. Faults: {faults}, one at a time, every 3 to 10 s after the last one recovered; \
         {workers} workers with up to {bots} bots each run calls back to back. A call may fail \
         only while a fault that concerns it is open, and only with one clear error line; each \
         bot's `/data/ledger` is tracked through appends, snapshots and rollbacks and checked \
         with `sha256sum` in the bot, over MCP and by copying it out.\n\n{body}",
        cpu = field("/proc/cpuinfo", "model name"),
        mem = mem_kib as f64 / (1024.0 * 1024.0),
        os = field("/etc/os-release", "PRETTY_NAME"),
        kernel = common::first_line("uname", &["-r"]),
        containerd = common::first_line("containerd", &["--version"]),
        faults = faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", "),
        workers = r.workers,
        bots = r.bots_per_worker,
    )
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}
