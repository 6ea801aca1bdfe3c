//! The OCI runtime spec of a bot container, built from the image config and the bot's options.
//!
//! Pure: the host facts it needs (TZ, whether `/etc/resolv.conf` exists) come in through
//! [`SpecOptions`], which [`SpecOptions::with_host_files`] fills from the real host.
//!
//! Every bot runs code an AI wrote, so its process gets the privileges of a hardened container
//! and nothing more, each layer on its own enough to stop the common escapes:
//! - a seccomp allow-list ([`seccomp`], data in `spec/seccomp.toml`): no keyrings, BPF, perf,
//!   mounts, namespaces (clone with namespace flags, unshare, setns), ptrace, module or kexec
//!   calls, vsock;
//! - `no_new_privileges`: no setuid binary or file capability raises what a process holds;
//! - a minimal capability set ([`default_capabilities`]): no NET_RAW, MKNOD, SYS_ADMIN, ...;
//! - masked and read-only paths in `/proc` and `/sys` ([`MASKED_PATHS`], [`READONLY_PATHS`]);
//! - the standard device nodes only, the device cgroup denying every other
//!   ([`device_rules`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use super::ImageConfig;
use crate::error::AgentError;

pub mod seccomp;

/// `type_url` containerd expects on a container record's spec.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// PATH used when the image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// What the spec takes besides the image config.
#[derive(Debug, Clone)]
pub struct SpecOptions {
    /// The container id; names the cgroup.
    pub container_id: String,
    /// Hostname inside the container (the bot id).
    pub hostname: String,
    /// Network namespace to join; `None` makes a new, empty one.
    pub netns_path: Option<PathBuf>,
    /// Environment added after the image's (later entries win), e.g. `MCP_AUTH_TOKEN_FILE`.
    pub extra_env: Vec<(String, String)>,
    /// The host's `TZ`, passed on when set.
    pub host_tz: Option<String>,
    /// Host resolv.conf to bind read-only at `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
    /// Host localtime to bind read-only at `/etc/localtime`.
    pub localtime: Option<PathBuf>,
    /// More bind mounts.
    pub extra_mounts: Vec<BindMount>,
    /// Cgroup path; `None` means `/memoh/<container id>`.
    pub cgroups_path: Option<String>,
    /// Soft and hard `RLIMIT_NOFILE`; 1024 by default, as containerd does. Must not exceed
    /// containerd's own hard limit, which runc cannot raise.
    pub nofile: u64,
    /// Replaces the image's entrypoint and cmd when set.
    pub args: Option<Vec<String>>,
}

impl SpecOptions {
    /// Options with no host files, a new network namespace and the default limits.
    pub fn new(container_id: impl Into<String>, hostname: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            hostname: hostname.into(),
            netns_path: None,
            extra_env: Vec::new(),
            host_tz: None,
            resolv_conf: None,
            localtime: None,
            extra_mounts: Vec::new(),
            cgroups_path: None,
            nofile: 1024,
            args: None,
        }
    }

    /// Fills the host facts from this machine: `TZ` and the resolv.conf and localtime files
    /// that exist.
    pub fn with_host_files(mut self) -> Self {
        self.host_tz = std::env::var("TZ").ok().filter(|tz| !tz.is_empty());
        let existing = |p: &str| Path::new(p).exists().then(|| PathBuf::from(p));
        self.resolv_conf = existing(HOST_RESOLV_CONF);
        self.localtime = existing(HOST_LOCALTIME);
        self
    }
}

fn spec_err(e: oci_spec::OciSpecError) -> AgentError {
    AgentError::InvalidArgument(format!("oci spec: {e}"))
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

/// Parses an image `User` value: numeric `uid[:gid]` or `root`. Names other than `root` need
/// the container's `/etc/passwd`, which the spec cannot read.
fn parse_user(user: &str) -> Result<(u32, u32), AgentError> {
    let bad = || AgentError::InvalidArgument(format!("image user {user:?}: use numeric uid[:gid]"));
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = match u {
        "root" => 0,
        _ => u.parse().map_err(|_| bad())?,
    };
    let gid = match g {
        None => uid,
        Some("root") => 0,
        Some(g) => g.parse().map_err(|_| bad())?,
    };
    Ok((uid, gid))
}

/// Merges environment lists by key; later values replace earlier ones, order of first
/// appearance is kept.
fn merge_env(image_env: &[String], extra: &[(String, String)]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        if !values.contains_key(k) {
            order.push(k.to_string());
        }
        values.insert(k.to_string(), v.to_string());
    };
    for kv in image_env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        put(k, v);
    }
    for (k, v) in extra {
        put(k, v);
    }
    if !values.contains_key("PATH") {
        order.insert(0, "PATH".to_string());
        values.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    }
    order
        .into_iter()
        .map(|k| {
            let v = &values[&k];
            format!("{k}={v}")
        })
        .collect()
}

/// Capabilities every bot's root gets (bounding, permitted and effective): what package
/// managers, build tools and servers need from root inside their own filesystem, and nothing
/// that reaches the kernel or the host. This is podman's default set: containerd's minus
/// NET_RAW, MKNOD and AUDIT_WRITE.
///
/// Kept, and why:
/// - CHOWN, DAC_OVERRIDE, FOWNER, FSETID: root's file semantics (tar and package installs that
///   keep owners and modes, writing files of other users);
/// - SETUID, SETGID: dropping to another user (`su`, daemons that shed root);
/// - SETPCAP: dropping capabilities from the bounding set (`capsh`, hardened daemons);
/// - SETFCAP: package scripts that `setcap` a binary (iputils' ping); with no new privileges
///   such a file capability grants nothing on exec anyway;
/// - KILL: signalling the bot's processes of other users;
/// - NET_BIND_SERVICE: a server on a port below 1024;
/// - SYS_CHROOT: build tools and package managers chroot into their own trees.
///
/// Dropped beyond containerd's set: NET_RAW (raw and packet sockets: spoofing on the bridge,
/// sniffing), MKNOD (block and character device nodes; the device cgroup is then a second
/// wall, not the only one), AUDIT_WRITE (no login daemon runs in a bot). Never granted:
/// SYS_ADMIN, NET_ADMIN, SYS_MODULE, SYS_PTRACE, SYS_RAWIO, SYS_BOOT, SYS_TIME, SYSLOG,
/// DAC_READ_SEARCH (open_by_handle_at), AUDIT_CONTROL, MAC_ADMIN, MAC_OVERRIDE, BPF, PERFMON.
pub fn default_capabilities() -> Vec<Capability> {
    vec![
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fowner,
        Capability::Fsetid,
        Capability::Kill,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setpcap,
        Capability::Setfcap,
        Capability::NetBindService,
        Capability::SysChroot,
    ]
}

/// Paths runc covers (files with `/dev/null`, directories with an empty read-only tmpfs) so a
/// bot cannot read host state through the kernel's shared `/proc` and `/sys`: the container
/// engines' default list, plus `/proc/kallsyms` (kernel addresses are readable by everyone
/// where `kptr_restrict` is 0, as on these hosts, and they defeat KASLR).
pub const MASKED_PATHS: &[&str] = &[
    // Hardware and firmware of the host.
    "/proc/acpi",
    "/proc/asound",
    "/proc/scsi",
    "/sys/firmware",
    // Kernel memory and kernel addresses.
    "/proc/kcore",
    "/proc/kallsyms",
    // The host's keys (keyrings are not namespaced).
    "/proc/keys",
    // Timers and scheduler state of every process on the host (side channels).
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    // RAPL energy counters (power side channels such as Platypus, CVE-2020-8694).
    "/sys/devices/virtual/powercap",
];

/// Paths runc remounts read-only: kernel knobs that are not namespaced and would change the
/// host (`/proc/sys` holds both; the bot's network namespace needs none set from inside).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The device cgroup of a bot: deny everything, then allow the standard character devices
/// runc creates in `/dev` (null, zero, full, random, urandom, tty, console) and the bot's own
/// pseudo-terminals (ptmx, pts). runc 1.1 appends its own list after these (the same devices,
/// plus mknod-only wildcards and /dev/net/tun); without CAP_MKNOD and CAP_NET_ADMIN a bot can
/// use none of that.
pub fn device_rules() -> Result<Vec<oci_spec::runtime::LinuxDeviceCgroup>, AgentError> {
    let mut rules = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .map_err(spec_err)?];
    let chars: &[(i64, Option<i64>)] = &[
        (1, Some(3)), // null
        (1, Some(5)), // zero
        (1, Some(7)), // full
        (1, Some(8)), // random
        (1, Some(9)), // urandom
        (5, Some(0)), // tty
        (5, Some(1)), // console
        (5, Some(2)), // ptmx
        (136, None),  // pts/*
    ];
    for &(major, minor) in chars {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(major)
            .access("rwm");
        if let Some(m) = minor {
            b = b.minor(m);
        }
        rules.push(b.build().map_err(spec_err)?);
    }
    Ok(rules)
}

/// Builds the runtime spec of a bot container.
pub fn build_spec(image: &ImageConfig, opts: &SpecOptions) -> Result<Spec, AgentError> {
    let args: Vec<String> = match &opts.args {
        Some(a) => a.clone(),
        None => image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect(),
    };
    if args.is_empty() {
        return Err(AgentError::InvalidArgument(
            "image has no entrypoint or cmd and no args were given".into(),
        ));
    }
    let mut extra_env = opts.extra_env.clone();
    if let Some(tz) = &opts.host_tz {
        extra_env.push(("TZ".into(), tz.clone()));
    }
    let env = merge_env(&image.env, &extra_env);
    let cwd = if image.working_dir.is_empty() {
        "/".to_string()
    } else {
        image.working_dir.clone()
    };
    let (uid, gid) = parse_user(&image.user)?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(spec_err)?,
        )
        .args(args)
        .env(env)
        .cwd(cwd)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(opts.nofile)
            .hard(opts.nofile)
            .build()
            .map_err(spec_err)?])
        .build()
        .map_err(spec_err)?;

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
        let mut options = vec!["rbind", "rprivate"];
        options.push(if b.readonly { "ro" } else { "rw" });
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

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(spec_err)?,
        );
    }
    let mut net = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
    if let Some(path) = &opts.netns_path {
        net = net.path(path);
    }
    namespaces.push(net.build().map_err(spec_err)?);

    let cgroups_path = opts
        .cgroups_path
        .clone()
        .unwrap_or_else(|| format!("/memoh/{}", opts.container_id));
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(cgroups_path)
        .resources(LinuxResourcesBuilder::default().build().map_err(spec_err)?)
        .build()
        .map_err(spec_err)?;

    let mut spec = SpecBuilder::default()
        .version("1.0.2-dev")
        .process(process)
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .map_err(spec_err)?,
        )
        .hostname(opts.hostname.clone())
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(spec_err)?;
    apply_privileges(&mut spec)?;
    Ok(spec)
}

/// The capability sets of a bot's process: [`default_capabilities`] bounding, permitted and
/// effective. Inheritable and ambient stay empty (oci-spec's default would fill them): an
/// inheritable set lets file capabilities grant more to a non-root exec (CVE-2022-24769), an
/// ambient set would hand capabilities to every non-root exec.
fn bot_capabilities() -> Result<oci_spec::runtime::LinuxCapabilities, AgentError> {
    let caps: oci_spec::runtime::Capabilities = default_capabilities().into_iter().collect();
    LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(oci_spec::runtime::Capabilities::new())
        .ambient(oci_spec::runtime::Capabilities::new())
        .build()
        .map_err(spec_err)
}

/// The sysctl that lets a bot ping without `NET_RAW`, and its value (every group).
pub const PING_GROUP_RANGE: (&str, &str) = ("net.ipv4.ping_group_range", "0 2147483647");

/// Puts today's process privileges on `spec` (see the module docs): the seccomp profile,
/// no new privileges, the capability sets, masked and read-only paths and the device rules.
/// Everything else (resource limits included) stays. Returns whether the spec changed, so a
/// container record an older agent wrote can be brought up to date before its task starts.
pub fn apply_privileges(spec: &mut Spec) -> Result<bool, AgentError> {
    let before = spec.clone();
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| AgentError::InvalidArgument("oci spec: no process".into()))?;
    // No setuid binary or file capability raises a bot's privileges on exec.
    process.set_no_new_privileges(Some(true));
    process.set_capabilities(Some(bot_capabilities()?));
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| AgentError::InvalidArgument("oci spec: no linux section".into()))?;
    linux.set_seccomp(Some(seccomp::default_profile()?));
    linux.set_masked_paths(Some(MASKED_PATHS.iter().map(|s| s.to_string()).collect()));
    linux.set_readonly_paths(Some(READONLY_PATHS.iter().map(|s| s.to_string()).collect()));
    // Ping without raw sockets (NET_RAW is gone): ICMP echo datagram sockets for every group,
    // in the bot's own network namespace only, as container engines set by default. Nothing
    // else a raw socket could do comes with it.
    linux
        .sysctl_mut()
        .get_or_insert_with(Default::default)
        .insert(
            PING_GROUP_RANGE.0.to_string(),
            PING_GROUP_RANGE.1.to_string(),
        );
    let resources = linux
        .resources_mut()
        .get_or_insert_with(oci_spec::runtime::LinuxResources::default);
    resources.set_devices(Some(device_rules()?));
    Ok(*spec != before)
}

/// Serialises a spec into the `Any` a containerd container record carries.
pub fn spec_to_any(spec: &Spec) -> Result<prost_types::Any, AgentError> {
    let value = serde_json::to_vec(spec)
        .map_err(|e| AgentError::InvalidArgument(format!("oci spec: {e}")))?;
    Ok(prost_types::Any {
        type_url: SPEC_TYPE_URL.to_string(),
        value,
    })
}

/// Reads a spec back from a container record's `Any`.
pub fn spec_from_any(any: &prost_types::Any) -> Result<Spec, AgentError> {
    serde_json::from_slice(&any.value)
        .map_err(|e| AgentError::InvalidArgument(format!("oci spec in container record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            env: vec!["PATH=/bin".into(), "A=1".into()],
            entrypoint: vec!["/entrypoint.sh".into()],
            cmd: vec!["serve".into(), "--x".into()],
            working_dir: "/app".into(),
            user: String::new(),
        }
    }

    #[test]
    fn process_from_image_and_options() {
        let mut opts = SpecOptions::new("mcp-b1", "b1");
        opts.extra_env = vec![
            ("MCP_AUTH_TOKEN_FILE".into(), "/run/memoh/token".into()),
            ("A".into(), "2".into()),
        ];
        opts.host_tz = Some("Europe/Berlin".into());
        let spec = build_spec(&image(), &opts).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec!["/entrypoint.sh".to_string(), "serve".into(), "--x".into()]
        );
        assert_eq!(
            p.env().as_ref().unwrap(),
            &vec![
                "PATH=/bin".to_string(),
                "A=2".into(),
                "MCP_AUTH_TOKEN_FILE=/run/memoh/token".into(),
                "TZ=Europe/Berlin".into()
            ]
        );
        assert_eq!(p.cwd(), &PathBuf::from("/app"));
        assert_eq!(p.user().uid(), 0);
        assert_eq!(p.no_new_privileges(), Some(true));
        let rl = &p.rlimits().as_ref().unwrap()[0];
        assert_eq!(rl.typ(), PosixRlimitType::RlimitNofile);
        assert_eq!(rl.hard(), 1024);
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&Capability::Kill));
        assert!(!caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&Capability::SysAdmin));
        assert_eq!(spec.hostname().as_deref(), Some("b1"));
    }

    #[test]
    fn privileges_of_a_bot() {
        let spec = build_spec(&image(), &SpecOptions::new("mcp-b1", "b1")).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.no_new_privileges(), Some(true));

        // The same eleven capabilities in every set that runc applies; none in ambient.
        let caps = p.capabilities().as_ref().unwrap();
        let want: oci_spec::runtime::Capabilities = default_capabilities().into_iter().collect();
        assert_eq!(want.len(), 11);
        assert_eq!(caps.bounding().as_ref(), Some(&want));
        assert_eq!(caps.effective().as_ref(), Some(&want));
        assert_eq!(caps.permitted().as_ref(), Some(&want));
        assert!(caps.ambient().as_ref().is_none_or(|a| a.is_empty()));
        assert!(caps.inheritable().as_ref().is_none_or(|i| i.is_empty()));
        for never in [
            Capability::NetRaw,
            Capability::Mknod,
            Capability::SysAdmin,
            Capability::SysModule,
            Capability::SysPtrace,
            Capability::SysBoot,
            Capability::SysRawio,
            Capability::SysTime,
            Capability::Syslog,
            Capability::NetAdmin,
            Capability::AuditControl,
            Capability::AuditWrite,
            Capability::MacAdmin,
            Capability::MacOverride,
            Capability::DacReadSearch,
            Capability::Bpf,
            Capability::Perfmon,
        ] {
            assert!(!want.contains(&never), "{never:?}");
        }

        let linux = spec.linux().as_ref().unwrap();
        // The seccomp allow-list: EPERM by default, the host's architectures, keyctl denied.
        let sc = linux.seccomp().as_ref().expect("a seccomp profile");
        assert_eq!(
            sc.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
        );
        assert_eq!(sc.default_errno_ret(), Some(libc::EPERM as u32));
        assert!(!sc.architectures().as_ref().unwrap().is_empty());
        let rules = sc.syscalls().as_ref().unwrap();
        assert!(rules
            .iter()
            .any(|r| r.names().contains(&"read".to_string())));
        assert!(!rules
            .iter()
            .any(|r| r.names().iter().any(|n| n == "keyctl" || n == "unshare")));

        // Masked and read-only paths.
        let masked = linux.masked_paths().as_ref().unwrap();
        for m in [
            "/proc/kcore",
            "/proc/kallsyms",
            "/proc/keys",
            "/proc/timer_list",
            "/proc/sched_debug",
            "/proc/acpi",
            "/proc/scsi",
            "/sys/firmware",
        ] {
            assert!(masked.iter().any(|p| p == m), "{m} not masked");
        }
        let ro = linux.readonly_paths().as_ref().unwrap();
        for r in [
            "/proc/sys",
            "/proc/sysrq-trigger",
            "/proc/irq",
            "/proc/bus",
            "/proc/fs",
        ] {
            assert!(ro.iter().any(|p| p == r), "{r} not read-only");
        }

        // Devices: deny all first, then only character devices, each named.
        let devs = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap();
        assert!(!devs[0].allow() && devs[0].typ().is_none() && devs[0].major().is_none());
        assert_eq!(devs[0].access().as_deref(), Some("rwm"));
        for d in &devs[1..] {
            assert!(d.allow());
            assert_eq!(d.typ(), Some(LinuxDeviceType::C));
            assert!(d.major().is_some());
        }
        let has = |maj: i64, min: Option<i64>| {
            devs[1..]
                .iter()
                .any(|d| d.major() == Some(maj) && d.minor() == min)
        };
        assert!(has(1, Some(3)) && has(1, Some(9)) && has(5, Some(2)) && has(136, None));
        assert!(!has(10, Some(200)), "no /dev/net/tun");
        assert!(spec.linux().as_ref().unwrap().devices().is_none());
    }

    #[test]
    fn an_older_record_is_brought_up_to_date_and_keeps_the_rest() {
        let fresh = build_spec(&image(), &SpecOptions::new("mcp-b1", "b1")).unwrap();
        // What an agent before the hardening wrote: containerd's caps, nnp off, no seccomp,
        // devices deny-all only; plus a memory limit that must survive.
        let mut old = fresh.clone();
        let p = old.process_mut().as_mut().unwrap();
        p.set_no_new_privileges(Some(false));
        let mut caps: oci_spec::runtime::Capabilities =
            default_capabilities().into_iter().collect();
        caps.insert(Capability::NetRaw);
        caps.insert(Capability::Mknod);
        p.set_capabilities(Some(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .unwrap(),
        ));
        let linux = old.linux_mut().as_mut().unwrap();
        linux.set_seccomp(None);
        linux.set_masked_paths(Some(vec!["/proc/kcore".into()]));
        linux.set_resources(Some(
            LinuxResourcesBuilder::default()
                .memory(
                    oci_spec::runtime::LinuxMemoryBuilder::default()
                        .limit(1 << 30)
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        ));

        let mut updated = old.clone();
        assert!(apply_privileges(&mut updated).unwrap());
        let u = |s: &Spec| {
            let l = s.linux().as_ref().unwrap().clone();
            (
                s.process().as_ref().unwrap().capabilities().clone(),
                s.process().as_ref().unwrap().no_new_privileges(),
                l.seccomp().clone(),
                l.masked_paths().clone(),
                l.readonly_paths().clone(),
                l.resources().as_ref().unwrap().devices().clone(),
            )
        };
        assert_eq!(u(&updated), u(&fresh));
        let mem = updated
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap();
        assert_eq!(mem.memory().as_ref().unwrap().limit(), Some(1 << 30));
        assert_eq!(updated.mounts(), old.mounts());
        assert_eq!(
            updated.process().as_ref().unwrap().args(),
            old.process().as_ref().unwrap().args()
        );
        // Up to date: nothing to change, nothing to write.
        assert!(!apply_privileges(&mut updated).unwrap());
        let mut f = fresh.clone();
        assert!(!apply_privileges(&mut f).unwrap());
    }

    #[test]
    fn namespaces_mounts_cgroup() {
        let mut opts = SpecOptions::new("mcp-b1", "b1");
        opts.netns_path = Some("/var/run/netns/mcp-b1".into());
        opts.resolv_conf = Some("/etc/resolv.conf".into());
        let spec = build_spec(&image(), &opts).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let ns = linux.namespaces().as_ref().unwrap();
        let types: Vec<_> = ns.iter().map(|n| n.typ()).collect();
        assert_eq!(
            types,
            vec![
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Network
            ]
        );
        assert_eq!(
            ns[4].path().as_deref(),
            Some(Path::new("/var/run/netns/mcp-b1"))
        );
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/memoh/mcp-b1"))
        );
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_string()));
        let mounts = spec.mounts().as_ref().unwrap();
        let dests: Vec<_> = mounts
            .iter()
            .map(|m| m.destination().to_str().unwrap().to_string())
            .collect();
        for want in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
            "/etc/resolv.conf",
        ] {
            assert!(dests.iter().any(|d| d == want), "missing {want}");
        }
        assert!(!dests.iter().any(|d| d == "/etc/localtime"));
        let resolv = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/etc/resolv.conf"))
            .unwrap();
        assert!(resolv
            .options()
            .as_ref()
            .unwrap()
            .contains(&"ro".to_string()));
        let sys = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert!(sys.options().as_ref().unwrap().contains(&"ro".to_string()));
    }

    #[test]
    fn new_netns_without_path_and_default_path_env() {
        let img = ImageConfig {
            env: vec![],
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            working_dir: String::new(),
            user: "1000:1001".into(),
        };
        let spec = build_spec(&img, &SpecOptions::new("c", "h")).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let net = linux.namespaces().as_ref().unwrap().last().unwrap();
        assert!(net.path().is_none());
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.env().as_ref().unwrap()[0], format!("PATH={DEFAULT_PATH}"));
        assert_eq!(p.cwd(), &PathBuf::from("/"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1001));
    }

    #[test]
    fn errors() {
        let mut img = image();
        img.entrypoint.clear();
        img.cmd.clear();
        assert!(build_spec(&img, &SpecOptions::new("c", "h")).is_err());
        let mut img = image();
        img.user = "nobody".into();
        assert!(build_spec(&img, &SpecOptions::new("c", "h")).is_err());
        let mut opts = SpecOptions::new("c", "h");
        opts.extra_mounts.push(BindMount {
            source: "relative".into(),
            destination: "/x".into(),
            readonly: true,
        });
        assert!(build_spec(&image(), &opts).is_err());
    }

    #[test]
    fn any_round_trip() {
        let spec = build_spec(&image(), &SpecOptions::new("c", "h")).unwrap();
        let any = spec_to_any(&spec).unwrap();
        assert_eq!(any.type_url, SPEC_TYPE_URL);
        assert_eq!(spec_from_any(&any).unwrap(), spec);
    }
}
