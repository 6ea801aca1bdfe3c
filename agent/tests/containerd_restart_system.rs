//! System test of issue 4's fault "stop containerd and start it again (the agent reconnects)".
//!
//! The test starts a containerd of its own (own root, state, socket, config and opt dir under a
//! temp dir; CRI disabled, as `scripts/test-env.sh` does), imports the test image into it, runs
//! a real agent on it (the [`TestAgent`] harness, pointed at this socket), creates a bot, stops
//! containerd with SIGTERM, starts it again on the same dirs, and checks that the agent keeps
//! serving: `bot ls` answers, exec works, the bot kept its IP and data, and host-local IPAM holds
//! exactly one entry for it. Everything is removed even when the test fails: the agent guard
//! first (bots, bridge, iptables rules, namespace), then this containerd, its shims and every
//! mount under the temp dir.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{sh, Env, TestAgent, IMAGE};

/// A containerd of this test's own; stopped, its shims killed and its mounts removed on drop.
struct PrivateContainerd {
    dir: tempfile::TempDir,
    sock: PathBuf,
    child: Option<Child>,
}

impl PrivateContainerd {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("memoh-ctrd-")
            .tempdir()
            .unwrap();
        let sock = dir.path().join("run/containerd.sock");
        for d in ["root", "state", "run", "opt", "runc"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let p = |s: &str| dir.path().join(s).display().to_string();
        let config = format!(
            "version = 2\n\
             root = {root:?}\n\
             state = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = {sock:?}\n\n\
             [ttrpc]\n  address = {ttrpc:?}\n\n\
             [debug]\n  address = \"\"\n\n\
             [metrics]\n  address = \"\"\n\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n",
            root = p("root"),
            state = p("state"),
            sock = sock.display().to_string(),
            ttrpc = format!("{}.ttrpc", sock.display()),
            opt = p("opt"),
        );
        std::fs::write(dir.path().join("containerd.toml"), config).unwrap();
        let mut c = Self {
            dir,
            sock,
            child: None,
        };
        c.start();
        c
    }

    fn path(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "containerd already runs");
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("containerd.log"))
            .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.path("containerd.toml"))
            .arg("--root")
            .arg(self.path("root"))
            .arg("--state")
            .arg(self.path("state"))
            .arg("--address")
            .arg(&self.sock)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let out = sh("ctr", &["-a", &self.sock.display().to_string(), "version"]);
            if out.status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("containerd exited with {status}:\n{}", self.log_tail());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd did not answer within 30 s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (SIGKILL after 15 s).
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while c.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(15) {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ctr(&self, ns: &str, args: &[&str]) -> std::process::Output {
        let mut v = vec!["-a", self.sock.to_str().unwrap(), "-n", ns];
        v.extend_from_slice(args);
        sh("ctr", &v)
    }

    fn log_tail(&self) -> String {
        let text = common::read_string(&self.path("containerd.log"));
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- containerd log ---\n{}\n---", self.log_tail());
        }
        // Tasks first, so no shim outlives containerd.
        if self.child.is_some() {
            let ns_out = self.ctr("default", &["namespaces", "ls", "-q"]);
            for ns in String::from_utf8_lossy(&ns_out.stdout).lines() {
                let tasks = self.ctr(ns, &["tasks", "ls", "-q"]);
                for t in String::from_utf8_lossy(&tasks.stdout).lines() {
                    let _ = self.ctr(ns, &["tasks", "kill", "-a", "-s", "SIGKILL", t]);
                    let _ = self.ctr(ns, &["tasks", "delete", "-f", t]);
                }
            }
        }
        self.stop();
        // Shims of this containerd name its socket on their command line.
        let needle = format!("-address {} ", self.sock.display());
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.filter_map(Result::ok) {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(p.path().join("cmdline"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                    .unwrap_or_default();
                if cmd.contains("containerd-shim") && cmd.contains(&needle) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        unmount_under(self.dir.path());
    }
}

/// Unmounts everything mounted at or below `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let d = dir.display().to_string();
    let info = common::read_string(Path::new("/proc/self/mountinfo"));
    let mut mounts: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .collect();
    mounts.sort();
    mounts.reverse();
    for m in mounts {
        if !sh("umount", &[&m]).status.success() {
            let _ = sh("umount", &["-l", &m]);
        }
    }
}

#[test]
fn agent_reconnects_after_containerd_restarts() {
    let Some(env) = Env::get(false) else { return };
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "this test needs root");
        println!("skipped: needs root");
        return;
    }
    let mut ctrd = PrivateContainerd::new();
    let mut env = env;
    env.sock = ctrd.sock.clone();
    env.runc_root = Some(ctrd.path("runc"));
    env.fifo_dir = None;
    // Declared after the containerd guard, so it is dropped (and cleans up) first.
    let mut a = TestAgent::new(&env, "");
    let import = ctrd.ctr(
        &a.namespace,
        &["images", "import", &env.tar.display().to_string()],
    );
    assert!(
        import.status.success(),
        "ctr images import: {}",
        String::from_utf8_lossy(&import.stderr)
    );
    let images = ctrd.ctr(&a.namespace, &["images", "ls", "-q"]);
    assert!(
        String::from_utf8_lossy(&images.stdout).contains(IMAGE),
        "image {IMAGE} not imported"
    );
    a.serve();
    let (bot, ip) = a.create_bot("rst");
    a.sh_in(&bot, "echo kept > /data/before-restart");
    let cid = format!("mcp-{bot}");
    let before = a.inspect(&bot);
    let entries = a.ipam_entries();
    assert_eq!(
        entries.iter().filter(|(_, o)| *o == cid).count(),
        1,
        "{entries:?}"
    );

    ctrd.stop();
    // While containerd is down the agent stays up and answers (an error is fine).
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        a.running(),
        "the agent exited with containerd:\n{}",
        a.log_tail(30)
    );
    let down = a.try_cli(&["bot", "ls"]);
    assert!(
        down.is_ok(),
        "bot ls hung while containerd was down: {down:?}"
    );
    ctrd.start();

    // `bot ls` answers within a few seconds once containerd is back.
    let back = Instant::now();
    a.wait_for(
        "bot ls after containerd restart",
        Duration::from_secs(10),
        || {
            a.try_cli(&["bot", "ls"]).is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains(&bot)
            })
        },
    );
    println!(
        "bot ls answered {:?} after containerd was back",
        back.elapsed()
    );
    a.wait_for(
        "exec after containerd restart",
        Duration::from_secs(15),
        || {
            a.try_cli(&["exec", &bot, "--", "true"])
                .is_ok_and(|o| o.status.success())
        },
    );
    assert!(a.running(), "the agent exited:\n{}", a.log_tail(30));
    assert_eq!(a.sh_in(&bot, "cat /data/before-restart").trim(), "kept");
    let info = a.inspect(&bot);
    assert_eq!(info["ip"].as_str(), Some(ip.as_str()), "IP changed: {info}");
    assert_eq!(info["status"].as_str(), Some("running"), "{info}");
    // The task outlived containerd in its shim: the bot was not restarted.
    assert_eq!(
        info["pid"], before["pid"],
        "the bot's task was replaced: {info}"
    );
    assert_eq!(
        info["restart_count"], before["restart_count"],
        "the bot was restarted: {info}"
    );
    let entries = a.ipam_entries();
    let mine: Vec<_> = entries.iter().filter(|(_, o)| *o == cid).collect();
    assert_eq!(mine.len(), 1, "IPAM entries of {cid}: {entries:?}");
    assert_eq!(mine[0].0.to_string(), ip);
    // The agent still manages bots on the restarted containerd.
    let (other, other_ip) = a.create_bot("new");
    assert_ne!(other_ip, ip);
    a.ok(&["bot", "rm", &other]);
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}
