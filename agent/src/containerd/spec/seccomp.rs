//! The default seccomp profile of a bot: `seccomp.toml` next to this file (an allow-list with
//! a reason per group), compiled into the binary and turned into the OCI spec's
//! `linux.seccomp` for the host's architecture.
//!
//! The data file says what is allowed and why; this module only loads it. Its unit tests hold
//! the promises the product makes about it: what must stay denied, how clone and clone3 are
//! answered, which personality values pass.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use serde::Deserialize;

use crate::error::AgentError;

/// The profile's text, as shipped.
pub const PROFILE_TOML: &str = include_str!("seccomp.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    /// errno of every call no rule names.
    default_errno: u32,
    /// Host architecture (`std::env::consts::ARCH`) to the seccomp architectures it filters.
    arches: BTreeMap<String, Vec<Arch>>,
    rule: Vec<Rule>,
    /// Documentation the tests enforce: names no rule may allow.
    deny: Vec<Denied>,
}

fn allow() -> LinuxSeccompAction {
    LinuxSeccompAction::ScmpActAllow
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[allow(dead_code)] // read by people, not by the loader
    why: String,
    names: Vec<String>,
    #[serde(default = "allow")]
    action: LinuxSeccompAction,
    errno: Option<u32>,
    /// Only on these host architectures; every one when empty.
    #[serde(default)]
    host_arches: Vec<String>,
    #[serde(default)]
    args: Vec<Arg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Arg {
    index: usize,
    value: u64,
    value_two: Option<u64>,
    op: LinuxSeccompOperator,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Denied {
    #[allow(dead_code)] // read by people, not by the loader
    why: String,
    names: Vec<String>,
}

fn bad(msg: String) -> AgentError {
    AgentError::InvalidArgument(format!("seccomp profile: {msg}"))
}

fn parse(text: &str) -> Result<Profile, AgentError> {
    toml::from_str(text).map_err(|e| bad(e.to_string()))
}

/// Builds the `linux.seccomp` of profile `text` for host architecture `arch`.
fn build(text: &str, arch: &str) -> Result<LinuxSeccomp, AgentError> {
    let p = parse(text)?;
    let arches = p
        .arches
        .get(arch)
        .ok_or_else(|| {
            bad(format!(
                "no seccomp architectures for host architecture {arch}"
            ))
        })?
        .clone();
    // A bad edit of the data file must not let a denied call in: refuse the whole profile.
    for r in p
        .rule
        .iter()
        .filter(|r| r.action == LinuxSeccompAction::ScmpActAllow)
    {
        if let Some(n) = r
            .names
            .iter()
            .find(|n| p.deny.iter().any(|d| d.names.contains(n)))
        {
            return Err(bad(format!(
                "{n} is allowed by a rule and listed under [[deny]]"
            )));
        }
    }
    let mut syscalls = Vec::with_capacity(p.rule.len());
    for r in p
        .rule
        .iter()
        .filter(|r| r.host_arches.is_empty() || r.host_arches.iter().any(|a| a == arch))
    {
        let mut args = Vec::with_capacity(r.args.len());
        for a in &r.args {
            let mut b = oci_spec::runtime::LinuxSeccompArgBuilder::default()
                .index(a.index)
                .value(a.value)
                .op(a.op);
            if let Some(v2) = a.value_two {
                b = b.value_two(v2);
            }
            args.push(b.build().map_err(|e| bad(e.to_string()))?);
        }
        let mut b = oci_spec::runtime::LinuxSyscallBuilder::default()
            .names(r.names.clone())
            .action(r.action);
        if let Some(e) = r.errno {
            b = b.errno_ret(e);
        }
        if !args.is_empty() {
            b = b.args(args);
        }
        syscalls.push(b.build().map_err(|e| bad(e.to_string()))?);
    }
    oci_spec::runtime::LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(p.default_errno)
        .architectures(arches)
        .syscalls(syscalls)
        .build()
        .map_err(|e| bad(e.to_string()))
}

/// The default profile for this host's architecture, built once.
pub fn default_profile() -> Result<LinuxSeccomp, AgentError> {
    static PROFILE: OnceLock<Result<LinuxSeccomp, String>> = OnceLock::new();
    PROFILE
        .get_or_init(|| build(PROFILE_TOML, std::env::consts::ARCH).map_err(|e| e.to_string()))
        .clone()
        .map_err(AgentError::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxSeccompArg;

    /// Whether `syscall` with first argument `arg0` passes `profile`, the way the kernel filter
    /// decides it for the conditions this profile uses (one argument per rule, the first rule
    /// that matches wins): `Ok(())` when allowed, `Err(errno)` otherwise.
    fn verdict(profile: &LinuxSeccomp, syscall: &str, arg0: u64) -> Result<(), u32> {
        let default = profile.default_errno_ret().unwrap_or(libc::EPERM as u32);
        for s in profile.syscalls().as_deref().unwrap_or_default() {
            if !s.names().iter().any(|n| n == syscall) {
                continue;
            }
            let matches = s
                .args()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .all(|a| a.index() != 0 || arg_matches(a, arg0));
            if !matches {
                continue;
            }
            return match s.action() {
                LinuxSeccompAction::ScmpActAllow => Ok(()),
                _ => Err(s.errno_ret().unwrap_or(default)),
            };
        }
        Err(default)
    }

    fn arg_matches(a: &LinuxSeccompArg, v: u64) -> bool {
        match a.op() {
            LinuxSeccompOperator::ScmpCmpNe => v != a.value(),
            LinuxSeccompOperator::ScmpCmpLt => v < a.value(),
            LinuxSeccompOperator::ScmpCmpLe => v <= a.value(),
            LinuxSeccompOperator::ScmpCmpEq => v == a.value(),
            LinuxSeccompOperator::ScmpCmpGe => v >= a.value(),
            LinuxSeccompOperator::ScmpCmpGt => v > a.value(),
            LinuxSeccompOperator::ScmpCmpMaskedEq => v & a.value() == a.value_two().unwrap_or(0),
        }
    }

    const EPERM: u32 = libc::EPERM as u32;
    const ENOSYS: u32 = libc::ENOSYS as u32;

    fn x86() -> LinuxSeccomp {
        build(PROFILE_TOML, "x86_64").unwrap()
    }

    fn allowed(p: &LinuxSeccomp, name: &str) -> bool {
        verdict(p, name, 0).is_ok()
    }

    #[test]
    fn loads_for_both_architectures_and_denies_by_default() {
        let p = x86();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(EPERM));
        assert_eq!(
            p.architectures().as_deref(),
            Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
        );
        let arm = build(PROFILE_TOML, "aarch64").unwrap();
        assert_eq!(
            arm.architectures().as_deref(),
            Some(&[Arch::ScmpArchAarch64, Arch::ScmpArchArm][..])
        );
        // Architecture-only rules land on their host only.
        assert!(allowed(&p, "arch_prctl") && !allowed(&arm, "arch_prctl"));
        assert!(allowed(&arm, "set_tls") && !allowed(&p, "set_tls"));
        assert!(build(PROFILE_TOML, "riscv64").is_err());
        assert!(default_profile().is_ok());
        // A name that is no system call is just not allowed.
        assert_eq!(verdict(&p, "no_such_call", 0), Err(EPERM));
        // The JSON runc reads spells the enums the way runc expects.
        let json = serde_json::to_string(&p).unwrap();
        for want in [
            "\"defaultAction\":\"SCMP_ACT_ERRNO\"",
            "\"defaultErrnoRet\":1",
            "\"SCMP_ARCH_X86_64\"",
            "\"SCMP_CMP_MASKED_EQ\"",
            "\"valueTwo\":0",
            "\"errnoRet\":38",
        ] {
            assert!(json.contains(want), "{want} not in {json}");
        }
    }

    #[test]
    fn a_denied_call_in_an_allow_rule_refuses_the_profile() {
        let text =
            format!("{PROFILE_TOML}\n[[rule]]\nwhy = \"a bad edit\"\nnames = [\"keyctl\"]\n");
        let e = build(&text, "x86_64").unwrap_err().to_string();
        assert!(e.contains("keyctl"), "{e}");
        assert!(build("default_errno = 1\n[arches]\n", "x86_64").is_err());
    }

    #[test]
    fn what_must_stay_denied_is_denied_everywhere() {
        let profile = parse(PROFILE_TOML).unwrap();
        let denied: Vec<&String> = profile.deny.iter().flat_map(|d| &d.names).collect();
        for arch in ["x86_64", "aarch64"] {
            let p = build(PROFILE_TOML, arch).unwrap();
            for name in &denied {
                for arg0 in [0, 1, 40, 0xffff_ffff, u64::MAX] {
                    assert_eq!(verdict(&p, name, arg0), Err(EPERM), "{name} on {arch}");
                }
            }
        }
        // The calls issue 14 names, whatever else the data file says.
        for name in [
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "mount",
            "umount2",
            "unshare",
            "setns",
            "kexec_load",
            "init_module",
            "finit_module",
            "delete_module",
            "ptrace",
            "perf_event_open",
            "userfaultfd",
            "open_by_handle_at",
            "pivot_root",
            "swapon",
            "swapoff",
            "reboot",
            "io_uring_setup",
            "process_vm_readv",
            "socketcall",
        ] {
            assert!(denied.iter().any(|d| *d == name), "{name} not in [[deny]]");
        }
    }

    #[test]
    fn clone_only_without_namespace_flags_and_clone3_says_enosys() {
        let p = x86();
        let sigchld = libc::SIGCHLD as u64;
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(verdict(&p, "clone", sigchld), Ok(()), "fork");
        assert_eq!(verdict(&p, "clone", thread), Ok(()), "pthread_create");
        for ns in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWCGROUP,
        ] {
            assert_eq!(
                verdict(&p, "clone", sigchld | ns as u64),
                Err(EPERM),
                "clone with {ns:#x}"
            );
        }
        assert_eq!(verdict(&p, "clone3", 0), Err(ENOSYS));
    }

    #[test]
    fn personality_only_known_harmless_values() {
        let p = x86();
        for ok in [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff] {
            assert_eq!(verdict(&p, "personality", ok), Ok(()), "{ok:#x}");
        }
        for denied in [
            0x0040000, /* ADDR_NO_RANDOMIZE */
            0x0400000, /* READ_IMPLIES_EXEC */
            0x1,
        ] {
            assert_eq!(
                verdict(&p, "personality", denied),
                Err(EPERM),
                "{denied:#x}"
            );
        }
    }

    #[test]
    fn sockets_of_any_family_but_vsock() {
        let p = x86();
        for family in [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ] {
            assert_eq!(
                verdict(&p, "socket", family as u64),
                Ok(()),
                "family {family}"
            );
        }
        assert_eq!(verdict(&p, "socket", libc::AF_VSOCK as u64), Err(EPERM));
    }

    #[test]
    fn what_the_container_server_and_ordinary_tools_use_is_allowed() {
        let p = x86();
        // container-server: tokio, pipes with F_SETPIPE_SZ, process groups, the PID 1 reaper.
        for name in [
            "read",
            "write",
            "openat",
            "close",
            "pipe2",
            "fcntl",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "epoll_pwait",
            "eventfd2",
            "futex",
            "mmap",
            "munmap",
            "mprotect",
            "madvise",
            "rt_sigaction",
            "rt_sigprocmask",
            "sigaltstack",
            "setpgid",
            "kill",
            "wait4",
            "waitid",
            "execve",
            "vfork",
            "socket",
            "bind",
            "listen",
            "accept4",
            "getrandom",
            "statx",
            "renameat2",
            "fchownat",
            "utimensat",
            "getdents64",
            "prctl",
            "sched_getaffinity",
            "set_robust_list",
            "rseq",
            "prlimit64",
            "exit_group",
            "pidfd_open",
            "pidfd_send_signal",
            "close_range",
            "chroot",
            "mknodat",
        ] {
            assert!(allowed(&p, name), "{name} must be allowed");
        }
        // No name twice among the rules without conditions (a sign of a bad edit).
        let profile = parse(PROFILE_TOML).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for r in profile.rule.iter().filter(|r| r.args.is_empty()) {
            for n in &r.names {
                assert!(seen.insert(n.clone()), "{n} is listed twice");
                assert!(
                    n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "{n:?} is not a system call name"
                );
            }
        }
    }
}
