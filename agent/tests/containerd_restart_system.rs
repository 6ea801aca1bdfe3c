//! System test of issue 4's fault "stop containerd and start it again (the agent reconnects)".
//!
//! The test starts a containerd of its own ([`PrivateContainerd`]: own root, state, socket,
//! config and opt dir; CRI disabled, as `scripts/test-env.sh` does), imports the test image into
//! it, runs a real agent on it (the [`TestAgent`] harness, pointed at this socket), creates a bot, stops
//! containerd with SIGTERM, starts it again on the same dirs, and checks that the agent keeps
//! serving: `bot ls` answers, exec works, the bot kept its IP and data, and host-local IPAM holds
//! exactly one entry for it. Everything is removed even when the test fails: the agent guard
//! first (bots, bridge, iptables rules, namespace), then this containerd, its shims and every
//! mount under its directory.

mod common;

use std::time::{Duration, Instant};

use common::ctrd::PrivateContainerd;
use common::{Env, TestAgent, IMAGE};

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
