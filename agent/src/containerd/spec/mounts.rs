//! The mounts of a bot container: the standard kernel filesystems, the host's
//! `resolv.conf` and time zone, and the bind mounts the bot asks for.

use std::path::PathBuf;

use oci_spec::runtime::{Mount, MountBuilder};

use super::{spec_err, SpecOptions};
use crate::error::AgentError;

/// Host files bind-mounted read-only into every bot when they exist.
pub const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// The host's time zone file.
pub const HOST_LOCALTIME: &str = "/etc/localtime";

/// An extra bind mount into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Absolute host path.
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: PathBuf,
    /// Mount read-only.
    pub readonly: bool,
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, AgentError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(spec_err)
}

/// Every mount of a bot container: `/proc`, `/dev`, `/sys` and friends, then the host files
/// and the extra bind mounts of `opts`.
pub(super) fn bot_mounts(opts: &SpecOptions) -> Result<Vec<Mount>, AgentError> {
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
    ];
    let mut binds: Vec<BindMount> = Vec::new();
    if let Some(p) = &opts.resolv_conf {
        binds.push(BindMount {
            source: p.clone(),
            destination: HOST_RESOLV_CONF.into(),
            readonly: true,
        });
    }
    if let Some(p) = &opts.localtime {
        binds.push(BindMount {
            source: p.clone(),
            destination: HOST_LOCALTIME.into(),
            readonly: true,
        });
    }
    binds.extend(opts.extra_mounts.iter().cloned());
    for b in &binds {
        if !b.source.is_absolute() || !b.destination.is_absolute() {
            return Err(AgentError::InvalidArgument(format!(
                "bind mount {} -> {} needs absolute paths",
                b.source.display(),
                b.destination.display()
            )));
        }
        // A read-only bind is not recursive: the kernel would leave the mounts below its
        // source writable.
        let options: &[&str] = if b.readonly {
            &["bind", "rprivate", "ro", "nosuid", "nodev"]
        } else {
            &["rbind", "rprivate", "rw"]
        };
        mounts.push(
            MountBuilder::default()
                .destination(&b.destination)
                .typ("bind")
                .source(&b.source)
                .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .build()
                .map_err(spec_err)?,
        );
    }
    Ok(mounts)
}
