//! Hostile-bot system tests (tier 3): what code running inside a real bot must not be able to
//! do, and what it must still be able to do, with the process privileges the agent gives every
//! bot (seccomp allow-list, no new privileges, a minimal capability set, masked and read-only
//! kernel files, the standard device nodes only).
//!
//! Everything runs through the agent (`memoh-agent exec`), as a bot's own code would. The test
//! image ships `syscall-probe`, which makes the system calls a hostile bot would try and prints
//! how the kernel answered (`NAME=EPERM`); its arguments are chosen so the kernel itself would
//! answer something else, so an `EPERM` there is the seccomp filter's.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"`, like the other `*_system` tests; each
//! test runs its own agent and removes everything it made, also on failure (see `common`).
//! The privileged checks are collected and reported together, so one run against a spec
//! without the hardening lists every hole at once.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{random_bytes, Env, TestAgent};
use memoh_agent::containerd::prelude::*;

/// The bounding, permitted and effective set a bot's root gets: CHOWN, DAC_OVERRIDE, FOWNER,
/// FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT, SETFCAP.
const BOT_CAPS: &str = "00000000800405fb";

/// Capabilities a bot must never hold, with their bit numbers.
const FORBIDDEN_CAPS: &[(&str, u32)] = &[
    ("DAC_READ_SEARCH", 2),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("SYS_MODULE", 16),
    ("SYS_RAWIO", 17),
    ("SYS_PTRACE", 19),
    ("SYS_ADMIN", 21),
    ("SYS_BOOT", 22),
    ("SYS_TIME", 25),
    ("MKNOD", 27),
    ("AUDIT_CONTROL", 30),
    ("MAC_OVERRIDE", 32),
    ("MAC_ADMIN", 33),
    ("SYSLOG", 34),
    ("PERFMON", 38),
    ("BPF", 39),
];

/// Probes the seccomp filter must refuse with EPERM.
const DENIED: &[&str] = &[
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
    "socket_vsock",
    "socket_raw",
    "mknod_block",
    "syslog",
    "settimeofday",
    "name_to_handle_at",
];

/// Probes that must keep working: threads, fork, sockets, FIFOs, the persona query.
const ALLOWED: &[&str] = &[
    "clone",
    "personality_query",
    "socket_tcp",
    "mknod_fifo",
    "getpid",
];

/// Runs `script` in the bot: (exit code, stdout, stderr).
fn run(a: &TestAgent, bot: &str, script: &str) -> (i32, String, String) {
    let out = a.cli(&["exec", bot, "--", "sh", "-c", script]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `syscall-probe all` in the bot, as a map from probe to answer.
fn probe(a: &TestAgent, bot: &str) -> BTreeMap<String, String> {
    let (code, out, err) = run(a, bot, "syscall-probe all");
    assert_eq!(
        code, 0,
        "syscall-probe did not run (rebuild the image with scripts/build-image.sh): {err}"
    );
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The value of `key:` in the bot's `/proc/self/status` (of the shell that reads it).
fn status_field(a: &TestAgent, bot: &str, key: &str) -> String {
    let (_, out, _) = run(a, bot, &format!("grep '^{key}:' /proc/self/status"));
    out.split_once(':')
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn privileged_operations_fail_inside_a_bot() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _ip) = a.create_bot("hostile");
    let mut holes: Vec<String> = Vec::new();

    // Shell commands a hostile bot would try; each must fail.
    let must_fail = [
        // A user namespace with a full capability set in it: the door to mounts, netfilter and
        // many kernel bugs reachable only with CAP_SYS_ADMIN.
        ("unshare -U -r true", "user namespace"),
        (
            "mkdir -p /tmp/m && unshare -U -r -m sh -c 'mount -t tmpfs none /tmp/m'",
            "mount in a user namespace",
        ),
        ("mknod /tmp/blk b 8 0", "block device node"),
        ("mkdir -p /tmp/m && mount -t tmpfs none /tmp/m", "mount"),
    ];
    for (cmd, what) in must_fail {
        let (code, out, err) = run(&a, &bot, cmd);
        if code == 0 {
            holes.push(format!("{what}: `{cmd}` succeeded ({out}{err})"));
        }
    }
    let (_, out, _) = run(&a, &bot, "test -e /tmp/blk && echo exists; rm -f /tmp/blk");
    if out.contains("exists") {
        holes.push("mknod left a block device node in /tmp".into());
    }

    // Raw sockets need CAP_NET_RAW. busybox ping opens one; it could only fall back to an
    // ICMP datagram socket when the bot's group is in its netns's ping_group_range (the
    // kernel's default, "1 0", has no group in it). Loopback only: nothing leaves the bot.
    let (_, range, _) = run(&a, &bot, "cat /proc/sys/net/ipv4/ping_group_range");
    let bounds: Vec<i64> = range
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let gid0_may_ping = bounds.len() == 2 && bounds[0] <= 0 && 0 <= bounds[1];
    let (code, out, err) = run(&a, &bot, "ping -c 1 -W 2 127.0.0.1");
    if gid0_may_ping {
        println!("ping_group_range {range:?} lets gid 0 ping without NET_RAW; ping exited {code}");
    } else if code == 0 {
        holes.push(format!("ping (raw socket) worked: {out}{err}"));
    }

    // Kernel memory and other host state behind masked paths read as empty.
    for path in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/kallsyms",
    ] {
        let (_, out, _) = run(
            &a,
            &bot,
            &format!("test -e {path} && (head -c 64 {path} 2>/dev/null | wc -c) || echo 0"),
        );
        if out.trim() != "0" {
            holes.push(format!("{path} is readable ({} bytes)", out.trim()));
        }
    }
    let (_, out, _) = run(&a, &bot, "ls -A /sys/firmware 2>/dev/null | head -3");
    if !out.trim().is_empty() {
        holes.push(format!("/sys/firmware is visible: {}", out.trim()));
    }
    // Kernel knobs are read-only (checked on the mount table: writing would touch the host).
    let (_, mountinfo, _) = run(&a, &bot, "cat /proc/self/mountinfo");
    for path in [
        "/proc/sys",
        "/proc/sysrq-trigger",
        "/proc/irq",
        "/proc/bus",
        "/proc/fs",
        "/sys",
    ] {
        let ro = mountinfo.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 5 && f[4] == path && f[5].split(',').any(|o| o == "ro")
        });
        let exists = run(&a, &bot, &format!("test -e {path}")).0 == 0;
        if exists && !ro {
            holes.push(format!("{path} is not mounted read-only"));
        }
    }

    // Only the standard device nodes.
    let (_, out, _) = run(&a, &bot, "find /dev -type b -o -type c");
    for node in out.lines() {
        let allowed = [
            "/dev/null",
            "/dev/zero",
            "/dev/full",
            "/dev/random",
            "/dev/urandom",
            "/dev/tty",
            "/dev/console",
            "/dev/ptmx",
            "/dev/pts/ptmx",
        ];
        if !allowed.contains(&node) {
            holes.push(format!("unexpected device node {node}"));
        }
    }

    // The device cgroup, seen from the host (cgroup v1; v2 enforces it with a BPF program
    // that cannot be listed): no read or write on any block device, nor on a character
    // device other than the standard ones (runc 1.1 adds /dev/net/tun, 10:200, itself; it is
    // of no use without CAP_NET_ADMIN) and the bot's pseudo-terminals.
    let list = format!(
        "/sys/fs/cgroup/devices{}/devices.list",
        memoh_agent::ids::cgroup_path(&a.namespace, &bot)
    );
    match std::fs::read_to_string(&list) {
        Ok(rules) => {
            let standard = [
                "c 1:3", "c 1:5", "c 1:7", "c 1:8", "c 1:9", "c 5:0", "c 5:1", "c 5:2", "c 136:*",
                "c 10:200",
            ];
            for rule in rules.lines() {
                let (dev, access) = rule.rsplit_once(' ').unwrap_or((rule, ""));
                let reads_or_writes = access.contains('r') || access.contains('w');
                if reads_or_writes && !standard.contains(&dev) {
                    holes.push(format!("device cgroup allows {rule:?}"));
                }
            }
        }
        Err(e) => println!("no device cgroup list at {list} ({e}); cgroup v2?"),
    }

    // The process flags and capabilities of a bot's process.
    if status_field(&a, &bot, "NoNewPrivs") != "1" {
        holes.push("NoNewPrivs is not 1".into());
    }
    if status_field(&a, &bot, "Seccomp") != "2" {
        holes.push("no seccomp filter (Seccomp is not 2)".into());
    }
    for set in ["CapBnd", "CapPrm", "CapEff"] {
        let v = status_field(&a, &bot, set);
        let bits = u64::from_str_radix(&v, 16).unwrap_or(u64::MAX);
        for (name, bit) in FORBIDDEN_CAPS {
            if bits & (1 << bit) != 0 {
                holes.push(format!("{set} has CAP_{name}"));
            }
        }
        if v != BOT_CAPS {
            holes.push(format!("{set} is {v}, want {BOT_CAPS}"));
        }
    }

    for set in ["CapInh", "CapAmb"] {
        let v = status_field(&a, &bot, set);
        if v != "0000000000000000" {
            holes.push(format!("{set} is {v}, want none"));
        }
    }

    // System calls, one child process each.
    let answers = probe(&a, &bot);
    for name in DENIED {
        match answers.get(*name).map(String::as_str) {
            Some("EPERM") => {}
            other => holes.push(format!("{name}: {other:?}, want EPERM")),
        }
    }
    // clone3 must say ENOSYS, so glibc falls back to clone, whose flags the filter can see.
    if answers.get("clone3").map(String::as_str) != Some("ENOSYS") {
        holes.push(format!("clone3: {:?}, want ENOSYS", answers.get("clone3")));
    }

    assert!(
        holes.is_empty(),
        "{} hole(s) in a bot:\n  {}\nprobe: {answers:?}",
        holes.len(),
        holes.join("\n  ")
    );
}

#[test]
fn a_hardened_bot_still_does_its_work() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _ip) = a.create_bot("worker");

    // exec: output, exit codes, stdin.
    assert_eq!(a.sh_in(&bot, "echo $((6 * 7))"), "42\n");
    assert_eq!(run(&a, &bot, "exit 9").0, 9);
    let out = a.cli_stdin(&["exec", &bot, "--", "wc", "-c"], &random_bytes(300_000));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "300000");
    // Output larger than a pipe's default buffer streams through.
    let out = a.cli(&["exec", &bot, "--", "head", "-c", "3000000", "/dev/urandom"]);
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 3_000_000);

    // Files: cp in, read and write in the bot, cp out.
    let dir = a.dir.path().to_path_buf();
    let data = random_bytes(2 << 20);
    let src = dir.join("in.bin");
    std::fs::write(&src, &data).unwrap();
    a.ok(&["cp", src.to_str().unwrap(), &format!("{bot}:/data/in.bin")]);
    a.sh_in(
        &bot,
        "cp /data/in.bin /data/copy.bin && mkdir -p /data/d && echo hi > /data/d/f",
    );
    let dst = dir.join("out.bin");
    a.ok(&[
        "cp",
        &format!("{bot}:/data/copy.bin"),
        dst.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&dst).unwrap() == data, "the copy differs");
    assert_eq!(a.sh_in(&bot, "cat /data/d/f"), "hi\n");

    // What root in a container does with the capabilities it keeps: chown, setuid down,
    // chroot, FIFOs, signals to another user's process.
    assert_eq!(
        a.sh_in(
            &bot,
            "touch /tmp/o && chown 65534:65534 /tmp/o && stat -c %u:%g /tmp/o"
        ),
        "65534:65534\n"
    );
    assert_eq!(a.sh_in(&bot, "su -s /bin/sh nobody -c 'id -u'"), "65534\n");
    a.sh_in(&bot, "chroot / true && mkfifo /tmp/fifo && rm /tmp/fifo");
    a.sh_in(
        &bot,
        "su -s /bin/sh nobody -c 'exec sleep 100' & p=$!; sleep 0.3; \
         test \"$(stat -c %u /proc/$p)\" = 65534 && kill $p; wait $p; test $? = 143",
    );

    // A timeout kills the command's whole process group, background children included.
    let t = Instant::now();
    let out = a.cli(&[
        "exec",
        &bot,
        "--timeout",
        "2",
        "--",
        "sh",
        "-c",
        "sleep 1000 & echo $! > /tmp/bg.pid; sleep 1001",
    ]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "a timed-out command exits 137"
    );
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    a.wait_for(
        "the background child killed",
        Duration::from_secs(10),
        || {
            run(
                &a,
                &bot,
                "kill -0 $(cat /tmp/bg.pid) 2>/dev/null && echo alive",
            )
            .1 != "alive\n"
        },
    );

    // System calls normal programs need still go through.
    let answers = probe(&a, &bot);
    for name in ALLOWED {
        assert_eq!(
            answers.get(*name).map(String::as_str),
            Some("ok"),
            "{name} must work in a bot: {answers:?}"
        );
    }
}

#[test]
fn a_bot_an_older_agent_created_is_hardened_on_its_next_start() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _ip) = a.create_bot("legacy");
    a.ok(&["bot", "stop", &bot]);

    // Rewrite the record as an agent before the hardening wrote it: containerd's default
    // capabilities (NET_RAW, MKNOD, AUDIT_WRITE), no_new_privileges off, no seccomp.
    let cid = format!("mcp-{bot}");
    common::block_on(async {
        let rt = a.containerd().await;
        let c = rt
            .get_container(&cid)
            .await
            .unwrap()
            .expect("the bot's container");
        let mut spec = c.spec.expect("a spec");
        let mut caps: oci_spec::runtime::Capabilities =
            memoh_agent::containerd::spec::default_capabilities()
                .into_iter()
                .collect();
        for extra in [
            oci_spec::runtime::Capability::NetRaw,
            oci_spec::runtime::Capability::Mknod,
            oci_spec::runtime::Capability::AuditWrite,
        ] {
            caps.insert(extra);
        }
        let p = spec.process_mut().as_mut().unwrap();
        p.set_no_new_privileges(Some(false));
        p.set_capabilities(Some(
            oci_spec::runtime::LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .unwrap(),
        ));
        spec.linux_mut().as_mut().unwrap().set_seccomp(None);
        rt.update_container_spec(&cid, &spec).await.unwrap();
    });

    a.ok(&["bot", "start", &bot]);
    assert_eq!(status_field(&a, &bot, "Seccomp"), "2");
    assert_eq!(status_field(&a, &bot, "NoNewPrivs"), "1");
    assert_eq!(status_field(&a, &bot, "CapEff"), BOT_CAPS);
    assert_ne!(run(&a, &bot, "unshare -U -r true").0, 0);
    // The record itself now carries the privileges (a later start does not depend on this one).
    common::block_on(async {
        let rt = a.containerd().await;
        let c = rt.get_container(&cid).await.unwrap().unwrap();
        let spec = c.spec.unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().no_new_privileges(),
            Some(true)
        );
        assert!(spec.linux().as_ref().unwrap().seccomp().is_some());
    });
}

/// What is left of a runc experiment: containers, a network namespace; removed on drop.
struct RuncExperiment {
    dir: tempfile::TempDir,
    ids: Vec<String>,
    netns: Option<String>,
}

impl RuncExperiment {
    fn state(&self) -> String {
        self.dir.path().join("state").display().to_string()
    }

    /// Runs a bundle whose config is `config` to completion (60 s at most).
    fn run(&mut self, id: &str, config: &serde_json::Value) -> std::process::Output {
        let bundle = self.dir.path().join("bundle");
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
        self.ids.push(id.to_string());
        let mut cmd = std::process::Command::new("runc");
        cmd.args(["--root", &self.state(), "run", "--bundle"])
            .arg(&bundle)
            .arg(id);
        common::output_within(cmd, None, Duration::from_secs(60))
    }
}

impl Drop for RuncExperiment {
    fn drop(&mut self) {
        let state = self.state();
        for id in &self.ids {
            let _ = common::sh("runc", &["--root", &state, "delete", "--force", id]);
        }
        if let Some(ns) = &self.netns {
            let _ = common::sh("ip", &["netns", "delete", ns]);
        }
    }
}

/// Unpacks the single layer of the OCI archive `tar` into `rootfs`.
fn unpack_test_image(tar: &std::path::Path, dir: &std::path::Path, rootfs: &std::path::Path) {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr))
    };
    ok(common::sh(
        "tar",
        &["-xf", tar.to_str().unwrap(), "-C", layout.to_str().unwrap()],
    ));
    let json = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest[7..]);
    let index = json(layout.join("index.json"));
    let manifest = json(blob(index["manifests"][0]["digest"].as_str().unwrap()));
    for layer in manifest["layers"].as_array().unwrap() {
        let path = blob(layer["digest"].as_str().unwrap());
        ok(common::sh(
            "tar",
            &[
                "-xzf",
                path.to_str().unwrap(),
                "-C",
                rootfs.to_str().unwrap(),
            ],
        ));
    }
}

/// A documented experiment, kept as a test so it speaks up when the platform changes: why a
/// bot's root is not mapped to an unprivileged host range on containerd 1.6 with runc 1.1.
///
/// runc itself runs a container in a user namespace (root inside is host uid 100000 here), but
/// 1. the image's files keep their owners on disk (root), which the namespace does not map, so
///    the bot's root cannot write its own `/data`: containerd 1.6's overlayfs snapshots are
///    not remapped, runc 1.1 has no idmapped mounts (1.2 has), and chowning every snapshot
///    copies the whole image up into each bot's layer and shifts the owners of every version;
/// 2. a bot joins the network namespace the agent made before the task (so that CNI teardown
///    works after the task died); that namespace belongs to the host's user namespace, and the
///    kernel then refuses the bot's sysfs mount, so the task does not start at all.
///
/// When this test fails, one of the two stopped being true: user namespaces may be in reach.
#[test]
fn user_namespaces_on_this_runc_need_a_shifted_rootfs_and_their_own_netns() {
    let Some(env) = Env::get(false) else { return };
    let dir = tempfile::Builder::new()
        .prefix("memoh-userns-")
        .tempdir()
        .unwrap();
    let bundle = dir.path().join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    unpack_test_image(&env.tar, dir.path(), &rootfs);
    let tag = common::tag();
    let mut x = RuncExperiment {
        dir,
        ids: Vec::new(),
        netns: None,
    };
    let spec = common::sh("runc", &["spec", "--bundle", bundle.to_str().unwrap()]);
    assert!(spec.status.success(), "runc spec: {spec:?}");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!([
        "/bin/sh",
        "-c",
        "echo uid=$(id -u) map=$(cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //'); \
         touch /data/x 2>/dev/null && echo data=writable || echo data=denied"
    ]);
    config["root"]["readonly"] = false.into();
    config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "user"}));
    let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    config["linux"]["uidMappings"] = map.clone();
    config["linux"]["gidMappings"] = map;

    // 1. A user namespace runs, but root inside does not own the image's files.
    let out = x.run(&format!("memoh-userns-{tag}-a"), &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "runc with a user namespace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("uid=0 map=0 100000 65536"), "{stdout}");
    assert!(
        stdout.contains("data=denied"),
        "root in a user namespace could write the unshifted image's /data: {stdout}"
    );

    // 2. Joining a network namespace made outside (as the agent does for CNI) fails at sysfs.
    let ns = format!("memoh-userns-{tag}");
    assert!(common::sh("ip", &["netns", "add", &ns]).status.success());
    x.netns = Some(ns.clone());
    for n in config["linux"]["namespaces"].as_array_mut().unwrap() {
        if n["type"] == "network" {
            n["path"] = format!("/run/netns/{ns}").into();
        }
    }
    let out = x.run(&format!("memoh-userns-{tag}-b"), &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the task started: {stderr}");
    assert!(
        stderr.contains("sysfs") && stderr.contains("operation not permitted"),
        "{stderr}"
    );
}
