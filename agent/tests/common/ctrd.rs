//! [`PrivateContainerd`]: a containerd of a test's own (own root, state, socket, config and opt
//! dir; CRI disabled, as `scripts/test-env.sh` does), for tests that stop, kill or restart
//! containerd without disturbing the shared one other tests use.
//!
//! Its directory lives under `/var/lib/memoh-test/` (the test environment's own place, on the
//! same filesystem as the shared containerd's root), or under the temp dir when that cannot be
//! created. On drop every task of every namespace is killed, containerd is stopped, the shims it
//! started are killed and every mount under its directory is removed, also when the test
//! panicked.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{read_string, sh, Env, IMAGE};

/// Where private containerds put their directories when they can.
pub const BASE_DIR: &str = "/var/lib/memoh-test";

/// A containerd of this test's own; stopped, its shims killed and its mounts removed on drop.
pub struct PrivateContainerd {
    dir: tempfile::TempDir,
    /// Its gRPC socket.
    pub sock: PathBuf,
    child: Option<Child>,
}

impl PrivateContainerd {
    /// A configured and started containerd (panics when it does not answer within 30 s).
    pub fn new() -> Self {
        let dir = std::fs::create_dir_all(BASE_DIR)
            .and_then(|()| {
                tempfile::Builder::new()
                    .prefix("memoh-ctrd-")
                    .tempdir_in(BASE_DIR)
            })
            .or_else(|_| tempfile::Builder::new().prefix("memoh-ctrd-").tempdir())
            .expect("a directory for the private containerd");
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

    /// `env` pointed at this containerd: its socket and runc root, the default fifo dir.
    pub fn env(&self, env: &Env) -> Env {
        let mut env = env.clone();
        env.sock = self.sock.clone();
        env.runc_root = Some(self.path("runc"));
        env.fifo_dir = None;
        env
    }

    /// Imports the test image (`env.tar`) into `namespace`; panics when it does not show.
    pub fn import_image(&self, env: &Env, namespace: &str) {
        let import = self.ctr(
            namespace,
            &["images", "import", &env.tar.display().to_string()],
        );
        assert!(
            import.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&import.stderr)
        );
        let images = self.ctr(namespace, &["images", "ls", "-q"]);
        assert!(
            String::from_utf8_lossy(&images.stdout).contains(IMAGE),
            "image {IMAGE} not imported"
        );
    }

    /// A path inside its directory.
    pub fn path(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    /// Whether the containerd process runs.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// Starts containerd on its dirs and waits until it answers; panics otherwise.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start(Duration::from_secs(30)) {
            panic!("{e}");
        }
    }

    /// Starts containerd and waits up to `limit` until it answers; reports instead of
    /// panicking (for fault injectors and clean-up paths).
    pub fn try_start(&mut self, limit: Duration) -> Result<(), String> {
        if self.running() {
            return Err("containerd already runs".into());
        }
        self.child = None;
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("containerd.log"))
            .map_err(|e| format!("containerd log: {e}"))?;
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
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn containerd: {e}"))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let out = sh("ctr", &["-a", &self.sock.display().to_string(), "version"]);
            if out.status.success() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap_or(None) {
                self.child = None;
                return Err(format!(
                    "containerd exited with {status}:\n{}",
                    self.log_tail()
                ));
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "containerd did not answer within {limit:?}:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (SIGKILL after 15 s).
    pub fn stop(&mut self) {
        self.signal_and_reap(nix::sys::signal::Signal::SIGTERM);
    }

    /// SIGKILL (the shims and their tasks live on), then reaps it.
    pub fn kill(&mut self) {
        self.signal_and_reap(nix::sys::signal::Signal::SIGKILL);
    }

    fn signal_and_reap(&mut self, sig: nix::sys::signal::Signal) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
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

    /// Removes the half-deleted task bundles a killed containerd left (call while it is down);
    /// returns them.
    ///
    /// containerd 1.6 deletes a bundle by renaming `state/io.containerd.runtime.v2.task/NS/ID`
    /// to `.ID`, then removing that. Killed in between, it leaves `.ID` behind, and every later
    /// delete of that container's bundle fails to rename ("file exists"), so the bundle stays and
    /// every later task create fails with "mkdir .../ID: file exists" (the same class of failure
    /// as moby/moby#50040). Lists those half-deleted bundles; the agent removes its own.
    pub fn stale_bundles(&self) -> Vec<String> {
        let mut found = Vec::new();
        let tasks = self.path("state/io.containerd.runtime.v2.task");
        let Ok(namespaces) = std::fs::read_dir(&tasks) else {
            return found;
        };
        for ns in namespaces.filter_map(Result::ok) {
            let Ok(bundles) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for b in bundles.filter_map(Result::ok) {
                if b.file_name().to_string_lossy().starts_with('.') && b.path().is_dir() {
                    found.push(b.path().display().to_string());
                }
            }
        }
        found
    }

    /// Runs `ctr -a SOCK -n NS ARGS...`.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> Output {
        let mut v = vec!["-a", self.sock.to_str().unwrap(), "-n", ns];
        v.extend_from_slice(args);
        sh("ctr", &v)
    }

    /// The last 30 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = read_string(&self.path("containerd.log"));
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
        if self.running() {
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
pub fn unmount_under(dir: &Path) {
    let d = dir.display().to_string();
    let info = read_string(Path::new("/proc/self/mountinfo"));
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
