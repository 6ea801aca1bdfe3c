//! System tests of the bot spec a platform sets (environment, DNS, hostname, read-only mounts)
//! and of a bot's address across stop and start: the real `memoh-agent` daemon and CLI against
//! the private containerd of `scripts/test-env.sh up`. Same environment and skip rules as
//! `agent_system.rs`; each test runs its own agent on its own namespace, network and /24 (see
//! `common`). No DNS traffic is sent: the bot's resolv.conf is read inside the bot.

mod common;

use std::path::{Path, PathBuf};

use common::{Env, TestAgent, IMAGE};

/// An agent with the test image whose `mount_allowed` is `allowed`.
fn agent(env: &Env, allowed: &Path) -> TestAgent {
    let mut a = TestAgent::new(
        env,
        &format!(
            "mount_allowed = [{:?}]\ndns_fallback = [\"9.9.9.9\"]",
            allowed.display().to_string()
        ),
    );
    a.serve();
    let out = a.ok(&["image", "import", &env.tar.display().to_string()]);
    assert!(out.contains(IMAGE), "import printed {out:?}");
    a
}

/// Host directories: `allowed/data` (holding `hello`) and `other`, outside what is allowed.
struct HostDirs {
    _dir: tempfile::TempDir,
    allowed: PathBuf,
    data: PathBuf,
    other: PathBuf,
}

fn host_dirs() -> HostDirs {
    let dir = tempfile::Builder::new()
        .prefix("memoh-spec-")
        .tempdir()
        .unwrap();
    let allowed = dir.path().join("allowed");
    let data = allowed.join("data");
    let other = dir.path().join("other");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(data.join("hello"), "hello from the host\n").unwrap();
    HostDirs {
        _dir: dir,
        allowed,
        data,
        other,
    }
}

/// The image's PATH with a directory in front: an image variable overridden in place.
const PATH: &str = "/opt/tools/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment of the bot's server (its PID 1), in order.
fn server_env(a: &TestAgent, bot: &str) -> Vec<String> {
    a.sh_in(bot, "tr '\\0' '\\n' < /proc/1/environ")
        .lines()
        .map(str::to_string)
        .collect()
}

/// The process environment of the bot's container record (`ctr containers info`).
fn spec_env(a: &TestAgent, bot: &str) -> Vec<String> {
    let out = common::sh(
        "ctr",
        &[
            "--address",
            &a.env.sock.display().to_string(),
            "-n",
            &a.namespace,
            "containers",
            "info",
            &format!("mcp-{bot}"),
        ],
    );
    assert!(out.status.success(), "ctr containers info: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ctr prints JSON");
    v["Spec"]["process"]["env"]
        .as_array()
        .unwrap_or_else(|| panic!("no process env in {v}"))
        .iter()
        .map(|e| e.as_str().unwrap_or_default().to_string())
        .collect()
}

/// Everything the spec of the bot made by the main test puts in the bot, checked inside it.
fn check_spec(a: &TestAgent, bot: &str, data: &Path, when: &str) {
    // The record's process environment, in order: the image's PATH in its place with the
    // bot's value, the bot's variables (a later one of a name wins), the agent's own last.
    let ours: Vec<String> = spec_env(a, bot)
        .into_iter()
        .filter(|l| {
            ["PATH=", "A=", "B=", "MCP_AUTH_TOKEN_FILE="]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert_eq!(
        ours,
        [
            format!("PATH={PATH}"),
            "A=3".into(),
            "B=two words".into(),
            "MCP_AUTH_TOKEN_FILE=/run/memoh/token".into()
        ],
        "{when}"
    );
    // The server (its entrypoint's shell orders what it exports) has the same values.
    let mut env = server_env(a, bot);
    env.retain(|l| ours.contains(l));
    env.sort();
    let mut want = ours.clone();
    want.sort();
    assert_eq!(env, want, "{when}: the server's environment");
    // A command the bot runs sees it too.
    let out = a.ok(&["exec", bot, "--", "env"]);
    assert!(
        out.lines().any(|l| l == "A=3") && out.lines().any(|l| l == "B=two words"),
        "{when}: exec env printed {out:?}"
    );
    assert_eq!(
        a.sh_in(bot, "cat /proc/sys/kernel/hostname").trim(),
        "spec-host",
        "{when}"
    );
    let resolv = a.sh_in(bot, "cat /etc/resolv.conf");
    let lines: Vec<&str> = resolv.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        ["nameserver 10.9.8.7", "search corp.example lab.example"],
        "{when}: resolv.conf is {resolv:?}"
    );
    assert_eq!(
        a.sh_in(bot, "cat /mnt/data/hello"),
        "hello from the host\n",
        "{when}"
    );
    let w = a.sh_in(
        bot,
        "if echo x > /mnt/data/new 2>/dev/null; then echo writable; else echo read-only; fi",
    );
    assert_eq!(w.trim(), "read-only", "{when}: the mount is {w:?}");
    assert!(
        !data.join("new").exists(),
        "{when}: the bot wrote to the host"
    );
    let info = a.inspect(bot);
    let spec = &info["spec"];
    assert_eq!(
        spec["env"],
        serde_json::json!([format!("PATH={PATH}"), "A=1", "B=two words", "A=3"]),
        "{when}: {info}"
    );
    assert_eq!(
        spec["dns"],
        serde_json::json!(["10.9.8.7"]),
        "{when}: {info}"
    );
    assert_eq!(
        spec["dns_search"],
        serde_json::json!(["corp.example", "lab.example"]),
        "{when}"
    );
    assert_eq!(spec["hostname"], "spec-host", "{when}");
    let real = std::fs::canonicalize(data).unwrap();
    assert_eq!(
        spec["mounts"],
        serde_json::json!([{"host": real.display().to_string(), "container": "/mnt/data", "readonly": true}]),
        "{when}: {info}"
    );
}

/// Waits until `exec` works in `bot` (after an agent restart the bot may come back in the
/// background).
fn wait_exec(a: &TestAgent, bot: &str, what: &str) {
    a.wait_for(what, std::time::Duration::from_secs(30), || {
        a.try_cli(&["exec", bot, "--", "true"])
            .is_ok_and(|o| o.status.success())
    });
}

fn ip_of(a: &TestAgent, bot: &str) -> String {
    a.inspect(bot)["ip"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_bot_spec_is_applied_and_kept_across_every_lifecycle_step() {
    let Some(env) = Env::get(false) else { return };
    let dirs = host_dirs();
    let mut a = agent(&env, &dirs.allowed);
    let bot = a.bot_id("spec");
    let mount = format!("{}:/mnt/data", dirs.data.display());
    let create: Vec<String> = [
        "bot",
        "create",
        &bot,
        "--env",
        &format!("PATH={PATH}"),
        "--env",
        "A=1",
        "--env",
        "B=two words",
        "--env",
        "A=3",
        "--dns",
        "10.9.8.7",
        "--dns-search",
        "corp.example",
        "--dns-search",
        "lab.example",
        "--hostname",
        "spec-host",
        "--mount",
        &mount,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    let out = a.ok(&create);
    assert!(out.contains("running"), "create printed {out:?}");
    check_spec(&a, &bot, &dirs.data, "after create");
    let ip = ip_of(&a, &bot);

    // Create is idempotent with the same spec; another spec is a conflict on one line.
    a.ok(&create);
    let why = a.fails(&["bot", "create", &bot, "--env", "A=9"]);
    assert!(why.contains("another spec"), "{why}");

    a.ok(&["bot", "pause", &bot]);
    a.ok(&["bot", "resume", &bot]);
    check_spec(&a, &bot, &dirs.data, "after pause and resume");

    a.ok(&["bot", "stop", &bot]);
    a.ok(&["bot", "start", &bot]);
    check_spec(&a, &bot, &dirs.data, "after stop and start");
    assert_eq!(ip_of(&a, &bot), ip, "the address moved at stop and start");

    let out = a.ok(&["snapshot", "create", &bot, "--name", "one"]);
    assert!(out.starts_with("version 1"), "snapshot printed {out:?}");
    check_spec(&a, &bot, &dirs.data, "after snapshot create");
    a.ok(&["snapshot", "rollback", &bot, "1"]);
    check_spec(&a, &bot, &dirs.data, "after rollback");

    a.kill(nix::sys::signal::Signal::SIGTERM);
    a.serve();
    wait_exec(&a, &bot, "the bot after an agent restart");
    check_spec(&a, &bot, &dirs.data, "after an agent restart");
    a.ok(&["bot", "stop", &bot]);
    a.ok(&["bot", "start", &bot]);
    check_spec(
        &a,
        &bot,
        &dirs.data,
        "after an agent restart, stop and start",
    );

    // A bot without a spec: the image's environment, its id as hostname, the host's
    // resolvers without the loopback ones (the fallback when none is left).
    let (plain, _) = a.create_bot("plain");
    let env = server_env(&a, &plain);
    assert!(
        env.iter()
            .any(|l| l == "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "{env:?}"
    );
    assert!(!env.iter().any(|l| l.starts_with("A=")), "{env:?}");
    assert_eq!(
        a.sh_in(&plain, "cat /proc/sys/kernel/hostname").trim(),
        plain
    );
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let host_ns: Vec<String> = host
        .lines()
        .filter(|l| l.split_whitespace().next() == Some("nameserver"))
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .is_some_and(|a| !a.is_loopback() && !a.is_unspecified())
        })
        .map(|l| l.trim().to_string())
        .collect();
    let want = if host_ns.is_empty() {
        vec!["nameserver 9.9.9.9".to_string()]
    } else {
        host_ns
    };
    let resolv = a.sh_in(&plain, "cat /etc/resolv.conf");
    let got: Vec<&str> = resolv
        .lines()
        .filter(|l| l.starts_with("nameserver"))
        .collect();
    assert_eq!(got, want, "host {host:?}, bot {resolv:?}");
    assert_eq!(a.inspect(&plain)["spec"]["hostname"], plain.as_str());
}

#[test]
fn a_bad_spec_is_refused_with_one_line_and_makes_no_bot() {
    let Some(env) = Env::get(false) else { return };
    let dirs = host_dirs();
    let mut a = agent(&env, &dirs.allowed);
    let bot = a.bot_id("bad");
    let other = format!("{}:/mnt/data", dirs.other.display());
    let escape = dirs.allowed.join("escape");
    std::os::unix::fs::symlink(&dirs.other, &escape).unwrap();
    let escape = format!("{}:/mnt/data", escape.display());
    let data_over_proc = format!("{}:/proc/x", dirs.data.display());
    for (args, says) in [
        (
            vec!["--mount", other.as_str()],
            "not under a directory mount_allowed",
        ),
        (vec!["--mount", escape.as_str()], "not under"),
        (vec!["--mount", data_over_proc.as_str()], "/proc"),
        (vec!["--mount", "/nope:/mnt/x"], "No such file"),
        (vec!["--env", "1A=x"], "env"),
        (vec!["--dns", "resolver"], "not an ip address"),
        (vec!["--hostname", "bad_host"], "hostname"),
    ] {
        let mut all = vec!["bot", "create", bot.as_str()];
        all.extend(args.iter());
        let why = a.fails(&all);
        assert!(why.contains(says), "{args:?}: {why}");
    }
    assert!(a.list().is_empty(), "a refused create left a bot");
}

#[test]
fn a_bot_keeps_its_address_across_stop_and_start() {
    let Some(env) = Env::get(false) else { return };
    let dirs = host_dirs();
    let mut a = agent(&env, &dirs.allowed);
    let (bot, ip) = a.create_bot("ip");
    a.ok(&["bot", "stop", &bot]);
    a.ok(&["bot", "start", &bot]);
    assert_eq!(ip_of(&a, &bot), ip, "the address moved at stop and start");
    // Another bot made while it is stopped takes another address; the bot gets its own back.
    a.ok(&["bot", "stop", &bot]);
    let (other, other_ip) = a.create_bot("ip2");
    assert_ne!(other_ip, ip);
    a.ok(&["bot", "start", &bot]);
    assert_eq!(
        ip_of(&a, &bot),
        ip,
        "the address moved after another bot came"
    );
    // And across an agent restart while stopped.
    a.ok(&["bot", "stop", &bot]);
    a.kill(nix::sys::signal::Signal::SIGTERM);
    a.serve();
    a.ok(&["bot", "start", &bot]);
    assert_eq!(
        ip_of(&a, &bot),
        ip,
        "the address moved across an agent restart"
    );
    assert_eq!(ip_of(&a, &other), other_ip);
}
