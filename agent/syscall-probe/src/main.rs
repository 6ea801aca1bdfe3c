//! `syscall-probe`: makes the system calls a hostile bot would try and prints how the kernel
//! answered, one `NAME=RESULT` line each (`ok`, or the errno's name such as `EPERM`). It has
//! no dependency beyond libc so it links statically into the busybox test image, where
//! the hostile-bot system tests run it (`syscall-probe all`, or a list of names).
//!
//! Every probe uses arguments that do no harm when the call goes through, and most are chosen
//! so the kernel itself would answer something other than `EPERM` (an invalid command, a bad
//! file descriptor, pid 0): an `EPERM` then means the seccomp filter refused the call, not a
//! missing capability. The comment of each probe says what the kernel answers without a filter.
//! Three helpers besides: `ping ADDR` (one ICMP echo), `hog BYTES` (holds up to 256 MiB) and
//! `storm SECONDS` (a bounded fork storm), the last two for the resource-limit tests.
//! Each probe runs in a child process of its own. The arguments are harmless also for a
//! privileged caller (a mount goes to the probe's own directory and is undone, the reboot and
//! kexec arguments are invalid), so a run on a host changes nothing there.

use std::ffi::CString;

/// The errno of the last failed call.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// 0 for a non-negative return, the errno otherwise.
fn code(ret: i64) -> i32 {
    if ret >= 0 {
        0
    } else {
        errno()
    }
}

/// `ok` for 0, the errno's name otherwise.
fn answer(e: i32) -> String {
    let name = match e {
        0 => "ok",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EINVAL => "EINVAL",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ENOKEY => "ENOKEY",
        libc::ENODEV => "ENODEV",
        libc::EEXIST => "EEXIST",
        libc::EROFS => "EROFS",
        _ => return format!("errno{e}"),
    };
    name.to_string()
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in probe strings")
}

/// Forks with `clone(flags | SIGCHLD)`; the child exits at once. 0 when the child ran.
fn clone_with(flags: libc::c_long) -> i32 {
    // SAFETY: a raw clone without CLONE_VM behaves like fork; this program is single-threaded,
    // and the child only calls _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::SIGCHLD as libc::c_long,
            0,
            0,
            0,
            0,
        )
    };
    if pid == 0 {
        // SAFETY: ends the child without running any of the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    if pid < 0 {
        return errno();
    }
    let mut status = 0;
    // SAFETY: waits for the child just made.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    0
}

/// Runs probe `name` in this process: 0 or the errno; `None` for an unknown name.
fn probe(name: &str) -> Option<i32> {
    // SAFETY (all the calls below): raw system calls with null, invalid or freshly made
    // arguments; none writes to memory of this program except through the pointers given.
    let r = unsafe {
        match name {
            // Kernel: the session keyring's id. Keyrings are not namespaced.
            "keyctl" => libc::syscall(
                libc::SYS_keyctl,
                0,  /* GET_KEYRING_ID */
                -3, /* SESSION */
                1,
            ),
            // Kernel: a new key in the process keyring.
            "add_key" => {
                let (t, d) = (cstr("user"), cstr("memoh-probe"));
                libc::syscall(
                    libc::SYS_add_key,
                    t.as_ptr(),
                    d.as_ptr(),
                    b"x".as_ptr(),
                    1,
                    -2, /* PROCESS */
                )
            }
            // Kernel: ENOKEY.
            "request_key" => {
                let (t, d) = (cstr("user"), cstr("memoh-probe-missing"));
                libc::syscall(
                    libc::SYS_request_key,
                    t.as_ptr(),
                    d.as_ptr(),
                    std::ptr::null::<u8>(),
                    0,
                )
            }
            // Kernel: EINVAL (no such command).
            "bpf" => libc::syscall(libc::SYS_bpf, 0xffff, std::ptr::null::<u8>(), 0),
            // Kernel: EFAULT (no attributes).
            "perf_event_open" => libc::syscall(
                libc::SYS_perf_event_open,
                std::ptr::null::<u8>(),
                0,
                -1,
                -1,
                0,
            ),
            // Kernel: a user-mode-only userfaultfd, allowed without privileges.
            "userfaultfd" => libc::syscall(libc::SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */),
            // Kernel: EFAULT (no params).
            "io_uring_setup" => libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null::<u8>()),
            // Kernel: ESRCH (there is no pid 0 to trace).
            "ptrace" => libc::syscall(libc::SYS_ptrace, 0x7fff, 0, 0, 0),
            // Kernel: 0 bytes copied from pid 0: ESRCH.
            "process_vm_readv" => libc::syscall(
                libc::SYS_process_vm_readv,
                0,
                std::ptr::null::<u8>(),
                0,
                std::ptr::null::<u8>(),
                0,
                0,
            ),
            // Kernel: ESRCH.
            "kcmp" => libc::syscall(libc::SYS_kcmp, 0, 0, 0, 0, 0),
            // Kernel: EBADF.
            "pidfd_getfd" => libc::syscall(libc::SYS_pidfd_getfd, -1, 0, 0),
            // Kernel: EBADF.
            "setns" => libc::syscall(libc::SYS_setns, -1, 0),
            // Kernel: a new user namespace (this process is single-threaded).
            "unshare_user" => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
            // Kernel: a new mount namespace needs CAP_SYS_ADMIN: EPERM either way.
            "unshare_mount" => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS),
            // Kernel: a child in a new user namespace.
            "clone_newuser" => return Some(clone_with(libc::CLONE_NEWUSER as libc::c_long)),
            // Kernel: a child. Must stay allowed: it is how threads and fork work.
            "clone" => return Some(clone_with(0)),
            // Kernel: EINVAL (no arguments). glibc falls back to clone on ENOSYS only.
            "clone3" => libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0),
            // Kernel: EPERM without CAP_SYS_ADMIN. The probe's own directory is the target, and
            // a mount that went through is undone at once.
            "mount" => {
                let (s, t, f) = (cstr("none"), cstr("/tmp/memoh-probe-mnt"), cstr("tmpfs"));
                libc::mkdir(t.as_ptr(), 0o700);
                let r = libc::syscall(
                    libc::SYS_mount,
                    s.as_ptr(),
                    t.as_ptr(),
                    f.as_ptr(),
                    0,
                    std::ptr::null::<u8>(),
                );
                if r >= 0 {
                    libc::umount2(t.as_ptr(), libc::MNT_DETACH);
                }
                libc::rmdir(t.as_ptr());
                r
            }
            // Kernel: ENOENT (the path is looked up before the capability check).
            "umount2" => {
                let p = cstr("/nonexistent-memoh-probe");
                libc::syscall(libc::SYS_umount2, p.as_ptr(), 0)
            }
            // Kernel: EPERM without CAP_SYS_ADMIN.
            "pivot_root" => {
                let p = cstr("/nonexistent-memoh-probe");
                libc::syscall(libc::SYS_pivot_root, p.as_ptr(), p.as_ptr())
            }
            // Kernel: EPERM without CAP_SYS_BOOT, else EINVAL (invalid flags; never loads).
            "kexec_load" => libc::syscall(
                libc::SYS_kexec_load,
                0,
                0,
                std::ptr::null::<u8>(),
                0xdead_0000u32 as libc::c_long,
            ),
            // Kernel: EPERM without CAP_SYS_MODULE.
            "init_module" => {
                let a = cstr("");
                libc::syscall(libc::SYS_init_module, std::ptr::null::<u8>(), 0, a.as_ptr())
            }
            // Kernel: EPERM without CAP_SYS_MODULE.
            "finit_module" => {
                let a = cstr("");
                libc::syscall(libc::SYS_finit_module, -1, a.as_ptr(), 0)
            }
            // Kernel: EPERM without CAP_SYS_MODULE.
            "delete_module" => {
                let n = cstr("memoh_probe");
                libc::syscall(libc::SYS_delete_module, n.as_ptr(), 0)
            }
            // Kernel: EPERM without CAP_DAC_READ_SEARCH.
            "open_by_handle_at" => {
                libc::syscall(libc::SYS_open_by_handle_at, -1, std::ptr::null::<u8>(), 0)
            }
            // Kernel: EPERM without CAP_SYS_ADMIN.
            "swapon" => {
                let p = cstr("/nonexistent-memoh-probe");
                libc::syscall(libc::SYS_swapon, p.as_ptr(), 0)
            }
            // Kernel: EPERM without CAP_SYS_ADMIN.
            "swapoff" => {
                let p = cstr("/nonexistent-memoh-probe");
                libc::syscall(libc::SYS_swapoff, p.as_ptr())
            }
            // Kernel: EPERM without CAP_SYS_BOOT (bad magic numbers would give EINVAL after).
            "reboot" => libc::syscall(libc::SYS_reboot, 0, 0, 0, std::ptr::null::<u8>()),
            // Kernel: the old persona (and the flag is set; the probe sets it back).
            "personality_odd" => {
                let r = libc::syscall(
                    libc::SYS_personality,
                    0x0040000, /* ADDR_NO_RANDOMIZE */
                );
                if r >= 0 {
                    libc::syscall(libc::SYS_personality, r);
                }
                r
            }
            // Kernel: the current persona. Must stay allowed (query).
            "personality_query" => {
                libc::syscall(libc::SYS_personality, 0xffff_ffffu32 as libc::c_long)
            }
            // Kernel: a vsock socket (a door to the hypervisor on VMs that have one).
            "socket_vsock" => libc::syscall(libc::SYS_socket, libc::AF_VSOCK, libc::SOCK_STREAM, 0),
            // Kernel: EPERM without CAP_NET_RAW.
            "socket_raw" => libc::syscall(
                libc::SYS_socket,
                libc::AF_INET,
                libc::SOCK_RAW,
                libc::IPPROTO_ICMP,
            ),
            // Kernel: EACCES unless the group is in net.ipv4.ping_group_range.
            "socket_ping" => libc::syscall(
                libc::SYS_socket,
                libc::AF_INET,
                libc::SOCK_DGRAM,
                libc::IPPROTO_ICMP,
            ),
            // Kernel: a TCP socket. Must stay allowed.
            "socket_tcp" => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
            // Kernel: EPERM without CAP_MKNOD (block device 8:0, sda).
            "mknod_block" => {
                let p = cstr("/tmp/memoh-probe-blk");
                let r = libc::syscall(
                    libc::SYS_mknodat,
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    libc::S_IFBLK | 0o600,
                    libc::makedev(8, 0),
                );
                if r >= 0 {
                    libc::unlink(p.as_ptr());
                }
                r
            }
            // Kernel: a FIFO; needs no capability. Must stay allowed.
            "mknod_fifo" => {
                let p = cstr("/tmp/memoh-probe-fifo");
                let r = libc::syscall(
                    libc::SYS_mknodat,
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    libc::S_IFIFO | 0o600,
                    0,
                );
                if r >= 0 {
                    libc::unlink(p.as_ptr());
                }
                r
            }
            // Kernel: the log buffer's size when dmesg_restrict is 0, else EPERM.
            "syslog" => libc::syscall(
                libc::SYS_syslog,
                10, /* SIZE_BUFFER */
                std::ptr::null::<u8>(),
                0,
            ),
            // Kernel: EPERM without CAP_SYS_TIME.
            "settimeofday" => libc::syscall(
                libc::SYS_settimeofday,
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
            ),
            // Kernel: EFAULT (no handle buffer).
            "name_to_handle_at" => {
                let p = cstr("/");
                libc::syscall(
                    libc::SYS_name_to_handle_at,
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    std::ptr::null::<u8>(),
                    std::ptr::null::<u8>(),
                    0,
                )
            }
            // Kernel: the pid. Must stay allowed.
            "getpid" => libc::syscall(libc::SYS_getpid),
            _ => return None,
        }
    };
    Some(code(r))
}

/// Runs probe `name` in a child process, so what one probe changes (a new user namespace, a
/// persona) cannot change what the next one sees: `ok`, the errno's name, or `None` for an
/// unknown name.
fn probe_in_child(name: &str) -> Option<String> {
    // The names are checked here, where a mistake is one clear line, not in the child.
    if !ALL.contains(&name) {
        return None;
    }
    // SAFETY: this program is single-threaded, so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let e = probe(name).unwrap_or(libc::EINVAL);
        // SAFETY: ends the child with the errno as its status (every errno is below 256).
        unsafe { libc::_exit(e) };
    }
    if pid < 0 {
        return Some(format!("fork-failed-{}", answer(errno())));
    }
    let mut status = 0;
    // SAFETY: waits for the child just made.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        Some(answer(libc::WEXITSTATUS(status)))
    } else {
        Some(format!("signal{}", libc::WTERMSIG(status)))
    }
}

/// Every probe, in the order `all` runs them.
const ALL: &[&str] = &[
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "ptrace",
    "process_vm_readv",
    "kcmp",
    "pidfd_getfd",
    "setns",
    "unshare_user",
    "unshare_mount",
    "clone_newuser",
    "clone",
    "clone3",
    "mount",
    "umount2",
    "pivot_root",
    "kexec_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "swapon",
    "swapoff",
    "reboot",
    "personality_odd",
    "personality_query",
    "socket_vsock",
    "socket_raw",
    "socket_ping",
    "socket_tcp",
    "mknod_block",
    "mknod_fifo",
    "syslog",
    "settimeofday",
    "name_to_handle_at",
    "getpid",
];

/// `syscall-probe ping ADDR`: one ICMP echo to IPv4 `ADDR` over an ICMP datagram socket (no
/// `NET_RAW` needed where `net.ipv4.ping_group_range` admits the caller), waiting up to 2 s
/// for the reply. Exit 0 on a reply. busybox's ping only knows raw sockets.
fn ping(addr: &str) -> i32 {
    let Ok(ip) = addr.parse::<std::net::Ipv4Addr>() else {
        eprintln!("syscall-probe: ping: {addr:?} is not an IPv4 address");
        return 2;
    };
    // SAFETY: plain socket calls on a descriptor this function owns and closes; the buffers
    // outlive the calls that use them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
        if fd < 0 {
            println!("ping {addr}: socket: {}", answer(errno()));
            return 1;
        }
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut to: libc::sockaddr_in = std::mem::zeroed();
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
        // Echo request: type 8, code 0; the kernel fills in the id and the checksum.
        let req: [u8; 16] = [
            8, 0, 0, 0, 0, 0, 0, 1, b'm', b'e', b'm', b'o', b'h', 0, 0, 0,
        ];
        let sent = libc::sendto(
            fd,
            req.as_ptr() as *const libc::c_void,
            req.len(),
            0,
            &to as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if sent < 0 {
            println!("ping {addr}: sendto: {}", answer(errno()));
            libc::close(fd);
            return 1;
        }
        let mut buf = [0u8; 256];
        let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
        libc::close(fd);
        if n >= 8 && buf[0] == 0 {
            println!("ping {addr}: reply");
            0
        } else if n < 0 {
            println!("ping {addr}: no reply: {}", answer(errno()));
            1
        } else {
            println!("ping {addr}: unexpected answer of type {}", buf[0]);
            1
        }
    }
}

/// The most `hog` takes, whatever it is asked: a test fixture must not endanger its host.
const HOG_MAX: u64 = 256 << 20;

/// `syscall-probe hog BYTES`: a memory hog for the resource-limit tests. Allocates and touches
/// BYTES (at most 256 MiB) a MiB at a time, printing each 16 MiB held, then holds it for 10 s
/// and exits 0. Under a smaller memory limit without swap, the OOM killer ends it first.
fn hog(bytes: &str) -> i32 {
    let Ok(n) = bytes.parse::<u64>() else {
        eprintln!("syscall-probe: hog: {bytes:?} is not a byte count");
        return 2;
    };
    let n = n.min(HOG_MAX);
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut total = 0u64;
    while total < n {
        let step = (n - total).min(1 << 20) as usize;
        // Non-zero bytes: every page is really there, not the shared zero page.
        held.push(vec![0x5a; step]);
        total += step as u64;
        if total % (16 << 20) == 0 {
            println!("held {} MiB", total >> 20);
        }
    }
    println!("held {total} bytes");
    std::thread::sleep(std::time::Duration::from_secs(10));
    std::hint::black_box(&held);
    0
}

/// The longest `storm` runs, whatever it is asked.
const STORM_MAX: u64 = 300;

/// `syscall-probe storm SECONDS`: a fork storm for the process-limit tests. For SECONDS (at
/// most 300) it forks children that each sleep SECONDS and exit, as fast as it can; a refused
/// fork (EAGAIN at the bot's pids limit) is retried after 10 ms, so the storm holds the limit
/// until it is killed or its time is up (a shell loop would stop at the first refusal). Prints
/// the children made and the forks refused, then exits 0.
fn storm(seconds: &str) -> i32 {
    let Ok(secs) = seconds.parse::<u64>() else {
        eprintln!("syscall-probe: storm: {seconds:?} is not a number of seconds");
        return 2;
    };
    let secs = secs.min(STORM_MAX);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let (mut made, mut refused) = (0u64, 0u64);
    while std::time::Instant::now() < end {
        // SAFETY: this program is single-threaded; the child only sleeps and calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: sleep and _exit are async-signal-safe.
            unsafe {
                libc::sleep(secs as libc::c_uint);
                libc::_exit(0);
            }
        }
        if pid > 0 {
            made += 1;
        } else {
            refused += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Reap the children that are done, so they free their pids.
        // SAFETY: a non-blocking wait for any child of this process.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    }
    println!("made {made} children, {refused} forks refused");
    0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() == 2 && args[0] == "ping" {
        std::process::exit(ping(&args[1]));
    }
    if args.len() == 2 && args[0] == "hog" {
        std::process::exit(hog(&args[1]));
    }
    if args.len() == 2 && args[0] == "storm" {
        std::process::exit(storm(&args[1]));
    }
    if args.is_empty() {
        eprintln!(
            "usage: syscall-probe all | NAME... | ping ADDR | hog BYTES | storm SECONDS   (names: {})",
            ALL.join(" ")
        );
        std::process::exit(2);
    }
    let names: Vec<&str> = if args.len() == 1 && args[0] == "all" {
        ALL.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    let mut unknown = false;
    for n in names {
        match probe_in_child(n) {
            Some(r) => println!("{n}={r}"),
            None => {
                eprintln!("syscall-probe: unknown probe {n}");
                unknown = true;
            }
        }
    }
    if unknown {
        std::process::exit(2);
    }
}
