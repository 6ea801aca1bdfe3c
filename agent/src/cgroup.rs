//! What a bot's cgroup says it uses, on cgroup v1 (one hierarchy per controller) and v2 (one
//! unified hierarchy), whichever the host runs.
//!
//! | figure | v2 file | v1 file |
//! |---|---|---|
//! | memory now | `memory.current` | `memory/…/memory.usage_in_bytes` |
//! | memory peak | `memory.peak` (Linux 5.19+) | `memory/…/memory.max_usage_in_bytes` |
//! | OOM kills | `memory.events` `oom_kill` | `memory/…/memory.oom_control` `oom_kill` (4.13+) |
//! | CPU time | `cpu.stat` `usage_usec` | `cpuacct/…/cpuacct.usage` (ns) |
//! | processes | `pids.current` | `pids/…/pids.current` |
//! | frozen | `cgroup.freeze` | `freezer/…/freezer.state` |

use std::io;
use std::path::{Path, PathBuf};

/// Where the host mounts its cgroups.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup layout of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller (`memory/`, `cpuacct/`, `pids/` ...).
    V1,
    /// The unified hierarchy.
    V2,
}

/// Which layout the cgroups under `root` have: v2 when its top holds `cgroup.controllers`.
pub fn version(root: &Path) -> Version {
    if root.join("cgroup.controllers").exists() {
        Version::V2
    } else {
        Version::V1
    }
}

/// A bot's use of its resources; a figure the host does not provide is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Memory charged to the bot now, in bytes (page cache included).
    pub memory: Option<u64>,
    /// The most memory it was charged, in bytes.
    pub memory_peak: Option<u64>,
    /// Processes killed by the kernel for passing the memory limit, since the cgroup began.
    pub oom_kills: Option<u64>,
    /// CPU time used, in nanoseconds.
    pub cpu_nanos: Option<u64>,
    /// Processes and threads now.
    pub pids: Option<u64>,
}

/// Reads the cgroups of one bot.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    version: Version,
}

impl Default for Cgroups {
    fn default() -> Self {
        Self::at(CGROUP_ROOT)
    }
}

impl Cgroups {
    /// The cgroups mounted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let version = version(&root);
        Self { root, version }
    }

    /// The host's layout.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The directory of cgroup `path` (as in an OCI spec, e.g. `/memoh/mcp-b`) for
    /// `controller` (ignored on v2).
    pub fn dir(&self, controller: &str, path: &str) -> PathBuf {
        let rel = path.trim_start_matches('/');
        match self.version {
            Version::V2 => self.root.join(rel),
            Version::V1 => self.root.join(controller).join(rel),
        }
    }

    /// What cgroup `path` uses; `Err` with `NotFound` when it does not exist (the bot's task
    /// is not running).
    pub fn usage(&self, path: &str) -> io::Result<Usage> {
        match self.version {
            Version::V2 => {
                let d = self.dir("", path);
                if !d.is_dir() {
                    return Err(io::Error::new(io::ErrorKind::NotFound, "no such cgroup"));
                }
                Ok(Usage {
                    memory: read_u64(&d.join("memory.current")),
                    memory_peak: read_u64(&d.join("memory.peak")),
                    oom_kills: read_key(&d.join("memory.events"), "oom_kill"),
                    cpu_nanos: read_key(&d.join("cpu.stat"), "usage_usec")
                        .map(|us| us.saturating_mul(1000)),
                    pids: read_u64(&d.join("pids.current")),
                })
            }
            Version::V1 => {
                let mem = self.dir("memory", path);
                if !mem.is_dir() {
                    return Err(io::Error::new(io::ErrorKind::NotFound, "no such cgroup"));
                }
                Ok(Usage {
                    memory: read_u64(&mem.join("memory.usage_in_bytes")),
                    memory_peak: read_u64(&mem.join("memory.max_usage_in_bytes")),
                    oom_kills: read_key(&mem.join("memory.oom_control"), "oom_kill"),
                    cpu_nanos: read_u64(&self.dir("cpuacct", path).join("cpuacct.usage")),
                    pids: read_u64(&self.dir("pids", path).join("pids.current")),
                })
            }
        }
    }

    /// Whether cgroup `path` is frozen (paused); `None` when the host cannot tell.
    pub fn frozen(&self, path: &str) -> Option<bool> {
        match self.version {
            Version::V2 => read_u64(&self.dir("", path).join("cgroup.freeze")).map(|v| v == 1),
            Version::V1 => std::fs::read_to_string(self.dir("freezer", path).join("freezer.state"))
                .ok()
                .map(|s| s.trim() == "FROZEN"),
        }
    }
}

/// A file holding one number (`max` counts as absent).
fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The value of `key` in a file of `key value` lines.
fn read_key(p: &Path, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: PathBuf, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn v2_usage_is_read_from_the_unified_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        write(root.path().join("cgroup.controllers"), "cpu memory pids\n");
        let d = root.path().join("memoh/ns/mcp-b");
        write(d.join("memory.current"), "1048576\n");
        write(d.join("memory.peak"), "2097152\n");
        write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n",
        );
        write(d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n");
        write(d.join("pids.current"), "7\n");
        write(d.join("cgroup.freeze"), "1\n");
        let c = Cgroups::at(root.path());
        assert_eq!(c.version(), Version::V2);
        let u = c.usage("/memoh/ns/mcp-b").unwrap();
        assert_eq!(
            u,
            Usage {
                memory: Some(1 << 20),
                memory_peak: Some(2 << 20),
                oom_kills: Some(2),
                cpu_nanos: Some(1_500_000),
                pids: Some(7),
            }
        );
        assert_eq!(c.frozen("/memoh/ns/mcp-b"), Some(true));
        let e = c.usage("/memoh/ns/other").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn v1_usage_is_read_from_each_controller() {
        let root = tempfile::tempdir().unwrap();
        let p = "memoh/ns/mcp-b";
        let r = root.path();
        write(
            r.join("memory").join(p).join("memory.usage_in_bytes"),
            "4096\n",
        );
        write(
            r.join("memory").join(p).join("memory.max_usage_in_bytes"),
            "8192\n",
        );
        write(
            r.join("memory").join(p).join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
        write(
            r.join("cpuacct").join(p).join("cpuacct.usage"),
            "123456789\n",
        );
        write(r.join("pids").join(p).join("pids.current"), "12\n");
        write(r.join("freezer").join(p).join("freezer.state"), "THAWED\n");
        let c = Cgroups::at(r);
        assert_eq!(c.version(), Version::V1);
        let u = c.usage("/memoh/ns/mcp-b").unwrap();
        assert_eq!(u.memory, Some(4096));
        assert_eq!(u.memory_peak, Some(8192));
        assert_eq!(u.oom_kills, Some(3));
        assert_eq!(u.cpu_nanos, Some(123_456_789));
        assert_eq!(u.pids, Some(12));
        assert_eq!(c.frozen("/memoh/ns/mcp-b"), Some(false));
    }

    #[test]
    fn this_hosts_own_cgroup_reads() {
        // The agent's own process is in some cgroup of this host; its root one always exists.
        let c = Cgroups::default();
        let u = c.usage("/").expect("the root cgroup");
        if c.version() == Version::V1 {
            assert!(u.memory.is_some(), "{u:?}");
        }
    }
}
