//! The privileges of a bot's process (see the [`super`] module docs): capabilities, masked
//! and read-only paths, device rules, and [`apply_privileges`] that puts them, with the
//! seccomp profile, on a spec.

use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, Spec,
};

use super::{seccomp, spec_err};
use crate::error::AgentError;

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

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxResourcesBuilder;

    use crate::containerd::spec::tests::image;
    use crate::containerd::spec::{build_spec, SpecOptions};

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
}
