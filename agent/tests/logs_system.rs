//! System test of the bot server's log bound (tier 3): a process in a bot floods the server's
//! own stdout (`/proc/1/fd/1`); the bot's log files on the host stay within
//! `(server_log_keep + 1) * server_log_max_bytes`, the newest output is there, `logs` reads it
//! across the rotation, the bot keeps answering, and logging goes on while the agent is down.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"`; without it the test prints "skipped"
//! and passes, except under `CI`, where it fails.

mod common;

use std::time::Duration;

use common::{Env, TestAgent};
use nix::sys::signal::Signal;

/// The configured rotation size.
const MAX: u64 = 1024 * 1024;
/// The configured number of rotated files.
const KEEP: u64 = 1;

/// The bot's log files on the host and their sizes.
fn log_files(a: &TestAgent, bot: &str) -> Vec<(String, u64)> {
    let dir = a.state_dir.join("bots").join(bot);
    let mut v: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("server.log")
                .then(|| (name, e.metadata().map(|m| m.len()).unwrap_or(0)))
        })
        .collect();
    v.sort();
    v
}

fn assert_bounded(a: &TestAgent, bot: &str, when: &str) {
    let files = log_files(a, bot);
    let total: u64 = files.iter().map(|(_, s)| s).sum();
    assert!(
        files.len() as u64 <= KEEP + 1 && total <= (KEEP + 1) * MAX,
        "{when}: the bot's logs exceed {} bytes: {files:?}",
        (KEEP + 1) * MAX
    );
}

fn current_log(a: &TestAgent, bot: &str) -> String {
    let p = a.state_dir.join("bots").join(bot).join("server.log");
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

fn wait_for_last_line(a: &TestAgent, bot: &str, line: &str) {
    a.wait_for(
        &format!("{line:?} at the end of server.log"),
        Duration::from_secs(30),
        || current_log(a, bot).ends_with(line),
    );
}

/// A `logs --tail 100 --follow` process whose output is scanned as it arrives (only a small
/// window of it is kept).
struct Follower {
    child: std::process::Child,
    seen: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    fn start(a: &TestAgent, bot: &str) -> Self {
        use std::io::Read;
        let mut child = a
            .command(&["logs", bot, "--tail", "100", "--follow"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, seen) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut window = String::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    return;
                }
                window.push_str(&String::from_utf8_lossy(&buf[..n]));
                let cut = window.len().saturating_sub(256);
                let cut = (cut..=window.len())
                    .find(|i| window.is_char_boundary(*i))
                    .unwrap_or(0);
                window.drain(..cut);
                if tx.send(window.clone()).is_err() {
                    return;
                }
            }
        });
        Self { child, seen }
    }

    fn wait_for(mut self, line: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while !last.ends_with(line) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.seen.recv_timeout(left) {
                Ok(w) => last = w,
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        assert!(last.ends_with(line), "logs --follow ended with {last:?}");
    }
}

/// `MIB` MiB of lines tagged `tag` into the server's stdout, then `tag-done` on its stderr.
fn flood(a: &TestAgent, bot: &str, tag: &str, mib: u64) {
    let script = format!(
        "yes '{tag} 0123456789 abcdefghijklmnopqrstuvwxyz' | head -c {} > /proc/1/fd/1; \
         echo {tag}-done > /proc/1/fd/2",
        mib * 1024 * 1024
    );
    a.ok(&["exec", bot, "--timeout", "300", "--", "sh", "-c", &script]);
}

#[test]
fn a_bot_flooding_its_server_log_stays_within_the_bound() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::new(
        &env,
        &format!("server_log_max_bytes = {MAX}\nserver_log_keep = {KEEP}"),
    );
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let (bot, _) = a.create_bot("logs");

    flood(&a, &bot, "first", 40);
    // The pipe may still hold the last lines when the exec ends.
    wait_for_last_line(&a, &bot, "first-done\n");
    assert_bounded(&a, &bot, "after 40 MiB");

    // `logs --tail` past the current file's size reads the rotated one too.
    let files = log_files(&a, &bot);
    let total: u64 = files.iter().map(|(_, s)| s).sum();
    let current = files
        .iter()
        .find(|(n, _)| n == "server.log")
        .map(|(_, s)| *s)
        .unwrap_or(0);
    let want = (current + 4096).min(total);
    let out = a.cli(&["logs", &bot, "--tail", &want.to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        out.stdout.len() as u64,
        want,
        "logs --tail {want} of {files:?}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("first-done\n"));
    let all = a.cli(&["logs", &bot]);
    assert_eq!(all.stdout.len() as u64, total, "logs of {files:?}");

    // A writer that goes on while the agent is down: the log process belongs to the shim.
    a.sh_in(
        &bot,
        "setsid sh -c 'sleep 2; yes during-restart | head -c 3145728 > /proc/1/fd/1; \
         echo restart-done > /proc/1/fd/1' >/dev/null 2>&1 </dev/null &",
    );
    a.kill(Signal::SIGKILL);
    wait_for_last_line(&a, &bot, "restart-done\n");
    assert_bounded(&a, &bot, "with the agent down");
    a.serve();

    // `logs --follow` goes on through the rotations the next flood makes.
    let follow = Follower::start(&a, &bot);
    flood(&a, &bot, "second", 10);
    follow.wait_for("second-done\n");
    wait_for_last_line(&a, &bot, "second-done\n");
    assert_bounded(&a, &bot, "after the restart");
    let tail = a.ok(&["logs", &bot, "--tail", "100"]);
    assert!(tail.ends_with("second-done\n"), "{tail:?}");
    assert_eq!(a.sh_in(&bot, "echo alive"), "alive\n");
}
