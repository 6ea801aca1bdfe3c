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

use std::path::PathBuf;
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
        let path = common::append_to_benchmarks(&section(&report, &body, secs, &faults));
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

fn section(r: &SoakReport, body: &str, secs: u64, faults: &[soak::FaultKind]) -> String {
    let machine = common::Machine::now();
    format!(
        "\n## Soak with faults ({date})\n\n\
         Machine: {described}; the cores were shared with other work, load average at the end \
         {load}. Release build of `memoh-agent` (`cargo bench -p memoh-agent --bench soak -- \
         --seconds {secs}`), a private containerd and the agent in a network namespace of its \
         own. Faults: {faults}, one at a time, every 3 to 10 s after the last one recovered; \
         {workers} workers with up to {bots} bots each run calls back to back. A call may fail \
         only while a fault that concerns it is open, and only with one clear error line; each \
         bot's `/data/ledger` is tracked through appends, snapshots and rollbacks and checked \
         with `sha256sum` in the bot, over MCP and by copying it out.\n\n{body}",
        date = machine.date,
        described = machine.describe(),
        load = common::load_average(),
        faults = faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", "),
        workers = r.workers,
        bots = r.bots_per_worker,
    )
}
