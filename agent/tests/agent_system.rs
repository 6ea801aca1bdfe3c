//! System tests of `memoh-agent` (tier 3): the real binary, as daemon and as CLI, against the
//! private containerd of `scripts/test-env.sh up`, with runc, the CNI plugins and iptables.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"` (MEMOH_TEST_CONTAINERD_SOCK,
//! MEMOH_TEST_IMAGE_TAR, MEMOH_TEST_REGISTRY); without them the tests print "skipped" and
//! pass, except under `CI`, where they fail. Each test runs its own agent on its own
//! containerd namespace, CNI network, bridge and /24, and its guard removes everything the
//! agent made (see `common`), so the tests run in parallel.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{block_on, one_line_failure, random_bytes, Env, TestAgent, AGENT, IMAGE};
use memoh_proto::client::{tcp_channel, unix_channel};
use memoh_proto::ContainerClient;
use nix::sys::signal::Signal;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn kill9(pid: u64) {
    assert!(pid > 1, "no pid to kill");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("kill -9 {pid}: {e}"));
}

fn field<'a>(v: &'a serde_json::Value, k: &str) -> &'a serde_json::Value {
    v.get(k).unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn ips_of(a: &TestAgent) -> Vec<(String, String, String)> {
    a.list()
        .iter()
        .map(|b| {
            (
                field(b, "bot_id").as_str().unwrap().to_string(),
                field(b, "status").as_str().unwrap().to_string(),
                field(b, "ip").as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn two_bots_from_import_to_delete() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    assert!(a.ok(&["image", "ls"]).contains(IMAGE));

    let t = Instant::now();
    let (b1, ip1) = a.create_bot("one");
    let created_in = t.elapsed();
    let (b2, ip2) = a.create_bot("two");
    assert_ne!(ip1, ip2);
    println!("bot create took {created_in:?}");

    // exec in both; exit codes, stdout and stderr come through separately.
    assert_eq!(a.sh_in(&b1, "echo $((6 * 7))"), "42\n");
    assert_eq!(
        a.ok(&["exec", &b2, "--", "echo", "two words"]),
        "two words\n"
    );
    let out = a.cli(&[
        "exec",
        &b2,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    assert_eq!(a.cli(&["exec", &b1, "--", "false"]).status.code(), Some(1));
    // stdin passes through, also more than one chunk of it.
    let out = a.cli_stdin(&["exec", &b1, "--", "cat"], b"hello stdin\n");
    assert_eq!(stdout(&out), "hello stdin\n");
    let input = random_bytes(1 << 20);
    let out = a.cli_stdin(&["exec", &b2, "--", "wc", "-c"], &input);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "1048576");
    // Two containers: what one writes the other does not see.
    a.sh_in(&b1, "echo mine > /data/only-in-one");
    assert_eq!(
        a.sh_in(
            &b2,
            "test -e /data/only-in-one && echo shared || echo separate"
        ),
        "separate\n"
    );

    // 50 MiB in and out, byte-exact.
    let dir = a.dir.path().to_path_buf();
    let data = random_bytes(50 << 20);
    let src = dir.join("in.bin");
    std::fs::write(&src, &data).unwrap();
    let t = Instant::now();
    a.ok(&["cp", src.to_str().unwrap(), &format!("{b1}:/data/big.bin")]);
    let up = t.elapsed();
    assert_eq!(a.sh_in(&b1, "wc -c < /data/big.bin").trim(), "52428800");
    let dst = dir.join("out.bin");
    let t = Instant::now();
    a.ok(&["cp", &format!("{b1}:/data/big.bin"), dst.to_str().unwrap()]);
    let down = t.elapsed();
    let back = std::fs::read(&dst).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(
        back == data,
        "the downloaded file differs from the uploaded one"
    );
    println!("cp 50 MiB: in {up:?}, out {down:?}");

    // The server's own output is kept.
    let logs = a.ok(&["logs", &b1]);
    assert!(logs.contains("listening"), "logs: {logs:?}");

    // stop and start; the data stays.
    a.ok(&["bot", "stop", &b1]);
    let info = a.inspect(&b1);
    assert_ne!(field(&info, "status"), "running", "{info}");
    assert!(
        field(&info, "ip").as_str().unwrap_or_default().is_empty(),
        "{info}"
    );
    let line = a.fails(&["exec", &b1, "--", "true"]);
    assert!(line.contains(&b1), "{line}");
    let out = a.ok(&["bot", "start", &b1]);
    assert!(out.contains("running"), "{out}");
    assert_eq!(a.sh_in(&b1, "wc -c < /data/big.bin").trim(), "52428800");
    assert_eq!(a.sh_in(&b1, "cat /data/only-in-one"), "mine\n");

    // Restart the agent: both bots are back with the same addresses.
    let before = ips_of(&a);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before
        .iter()
        .all(|(_, s, ip)| s == "running" && !ip.is_empty()));
    let t = Instant::now();
    a.kill(Signal::SIGTERM);
    // The one shutdown path ran to its end: background tasks drained, well before the 15 s
    // after which the guard would have used SIGKILL.
    assert!(
        t.elapsed() < Duration::from_secs(12),
        "stopping took {:?}",
        t.elapsed()
    );
    let log = a.log_tail(20);
    assert!(
        log.contains("agent stopped"),
        "no clean stop in the log:\n{log}"
    );
    a.serve();
    assert_eq!(ips_of(&a), before);
    assert_eq!(a.sh_in(&b1, "cat /data/only-in-one"), "mine\n");
    assert_eq!(a.sh_in(&b2, "echo alive"), "alive\n");

    // Delete: nothing is left of either bot.
    for b in [&b1, &b2] {
        a.ok(&["bot", "rm", b]);
        let left = a.leftovers(b);
        assert!(left.is_empty(), "{b} left behind: {left:?}");
        let line = a.fails(&["bot", "inspect", b]);
        assert!(line.contains("unknown bot"), "{line}");
    }
    assert!(a.list().is_empty());
    assert!(a.ipam_entries().is_empty(), "{:?}", a.ipam_entries());
}

#[test]
fn pull_from_the_loopback_registry_and_create_a_bot_from_it() {
    let Some(env) = Env::get(true) else { return };
    let mut a = TestAgent::start(&env);
    let registry = env.registry.clone().unwrap();
    let reference = format!("{registry}/memohai/mcp:e2e-{}", a.tag);
    let mut push = std::process::Command::new("skopeo");
    push.args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", env.tar.display()))
        .arg(format!("docker://{reference}"));
    let out = common::output_within(push, None, Duration::from_secs(120));
    assert!(out.status.success(), "skopeo: {}", stderr(&out));

    let out = a.ok(&["image", "pull", &reference]);
    assert!(out.contains(&reference), "pull printed {out:?}");
    assert!(a.ok(&["image", "ls"]).contains(&reference));
    let bot = a.bot_id("pulled");
    let out = a.ok(&["bot", "create", &bot, "--image", &reference]);
    assert!(out.contains("running"), "{out}");
    assert_eq!(field(&a.inspect(&bot), "image"), reference.as_str());
    assert_eq!(a.sh_in(&bot, "echo from-pull"), "from-pull\n");
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

#[test]
fn bad_input_gets_one_line_naming_the_problem() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let ghost = a.bot_id("ghost");

    // Unknown bot, on every command that names one.
    for args in [
        vec!["bot", "inspect", ghost.as_str()],
        vec!["bot", "start", ghost.as_str()],
        vec!["bot", "stop", ghost.as_str()],
        vec!["bot", "rm", ghost.as_str()],
        vec!["logs", ghost.as_str()],
    ] {
        let line = a.fails(&args);
        assert!(
            line.contains("unknown bot") && line.contains(&ghost),
            "{args:?}: {line}"
        );
    }
    for args in [
        vec!["exec", ghost.as_str(), "--", "true"],
        vec!["cp", "/etc/hostname", &format!("{ghost}:/data/x")],
    ] {
        let line = a.fails(&args);
        assert!(line.contains(&ghost), "{args:?}: {line}");
        assert!(
            line.contains("unknown") || line.contains("not found"),
            "{args:?}: {line}"
        );
    }

    // Invalid bot ids never reach containerd.
    for bad in ["a b", "a/b", "..", "bad.id", "ü"] {
        for args in [
            vec!["bot", "create", bad],
            vec!["bot", "inspect", bad],
            vec!["exec", bad, "--", "true"],
        ] {
            let line = a.fails(&args);
            assert!(line.contains("invalid bot id"), "{args:?}: {line}");
        }
    }

    // A missing image: the error names it and no bot is left half-made.
    let nobot = a.bot_id("noimage");
    let missing = "localhost:1/memohai/nope:latest";
    let line = a.fails(&["bot", "create", &nobot, "--image", missing]);
    assert!(
        line.contains(missing) && line.contains("not found"),
        "{line}"
    );
    assert!(a.leftovers(&nobot).is_empty(), "{:?}", a.leftovers(&nobot));
    assert!(a.fails(&["bot", "inspect", &nobot]).contains("unknown bot"));
    let line = a.fails(&["image", "import", "/nonexistent/image.tar"]);
    assert!(line.contains("/nonexistent/image.tar"), "{line}");

    // Create is idempotent: a second create of a running bot with the same image (a retry
    // after a lost connection) succeeds and prints the bot; another image is a conflict.
    let (bot, ip) = a.create_bot("dup");
    let again = a.ok(&["bot", "create", &bot]);
    assert!(again.contains(&bot) && again.contains(&ip), "{again}");
    let line = a.fails(&["bot", "create", &bot, "--image", missing]);
    assert!(
        line.contains(&bot) && line.contains("already exists with image") && line.contains(missing),
        "{line}"
    );
    // A command that times out exits 137 and says so in one line.
    let out = a.cli(&["exec", &bot, "--timeout", "1", "--", "sleep", "5"]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "memoh-agent: exec: timed out after 1 s",
        "{err}"
    );
    // cp without a bot side.
    let line = a.fails(&["cp", "/etc/hostname", "/tmp/x"]);
    assert!(line.contains("BOT:PATH"), "{line}");
    let line = a.fails(&["cp", &format!("{bot}:/data/none"), "/tmp/x"]);
    assert!(line.contains("/data/none"), "{line}");
}

#[test]
fn without_agent_or_containerd_the_cli_and_daemon_say_so() {
    // Needs neither containerd nor root.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    for args in [vec!["bot", "ls"], vec!["exec", "b1", "--", "true"]] {
        let out = common::output_within(
            {
                let mut c = std::process::Command::new(AGENT);
                c.arg("--socket").arg(&sock).args(&args);
                c
            },
            None,
            Duration::from_secs(30),
        );
        let line = one_line_failure(&format!("{args:?}"), &out);
        assert!(line.contains("agent not running"), "{args:?}: {line}");
    }
    // A stale socket file (nobody listening) reads the same.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut c = std::process::Command::new(AGENT);
    c.arg("--socket").arg(&sock).args(["bot", "ls"]);
    let out = common::output_within(c, None, Duration::from_secs(30));
    let line = one_line_failure("bot ls on a stale socket", &out);
    assert!(line.contains("agent not running"), "{line}");

    // containerd down: serve gives up after containerd_wait_secs.
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "containerd_socket = {:?}\ncontainerd_wait_secs = 1\nnamespace = \"memoh-e2e-down\"\n\
             cni_conf_dir = {:?}\nstate_dir = {:?}\ndata_root = {:?}\ncontrol_socket = {:?}\n",
            dir.path().join("no-containerd.sock"),
            dir.path().join("cni"),
            dir.path().join("state"),
            dir.path().join("data"),
            dir.path().join("down.sock"),
        ),
    )
    .unwrap();
    let mut c = std::process::Command::new(AGENT);
    c.args(["serve", "--config"]).arg(&config);
    let t = Instant::now();
    let out = common::output_within(c, None, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("containerd unreachable"),
        "{}",
        stderr(&out)
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_killed_server_is_restarted_with_its_data_and_address() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, ip) = a.create_bot("crash");
    a.sh_in(&bot, "echo precious > /data/keep");
    let info = a.inspect(&bot);
    let pid = field(&info, "pid").as_u64().unwrap();
    assert_eq!(field(&info, "restart_count"), 0);
    assert!(
        field(&info, "last_exit_code").is_null(),
        "never exited: {info}"
    );

    kill9(pid);
    let t = Instant::now();
    let mut last = serde_json::Value::Null;
    a.wait_for("the bot restarted", Duration::from_secs(15), || {
        last = a.inspect(&bot);
        last["status"] == "running"
            && last["restart_count"] == 1
            && last["pid"].as_u64().is_some_and(|p| p != pid && p > 0)
    });
    println!("back after {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(field(&last, "ip"), ip.as_str(), "{last}");
    assert!(
        !field(&last, "last_exit_at")
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{last}"
    );
    // kill -9: the exit is known and was a signal.
    assert_eq!(last["last_exit_code"], -1, "{last}");
    assert_eq!(a.sh_in(&bot, "cat /data/keep"), "precious\n");
    assert_eq!(a.ipam_entries().len(), 1, "{:?}", a.ipam_entries());
}

#[test]
fn the_agents_own_stops_do_not_slow_a_crash_restart() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("ownstops");
    // Five stops the agent makes itself: counted as crashes, they would put the next real
    // crash 250 ms * 2^5 = 8 s away.
    for _ in 0..5 {
        a.ok(&["bot", "stop", &bot]);
        a.ok(&["bot", "start", &bot]);
    }
    // Every exit wakes the restart path once its delay is over (it then finds the bot running
    // or stopped on purpose); let those pass, so only the crash's own delay counts below.
    std::thread::sleep(Duration::from_secs(5));
    let pid = field(&a.inspect(&bot), "pid").as_u64().unwrap();
    kill9(pid);
    let t = Instant::now();
    a.wait_for("the bot restarted", Duration::from_secs(20), || {
        let i = a.inspect(&bot);
        i["status"] == "running" && i["pid"].as_u64().is_some_and(|p| p != pid && p > 0)
    });
    println!("back after {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "a first crash after five stops took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_server_that_exits_at_start_fails_the_start_at_once() {
    let Some(env) = Env::get(false) else { return };
    // Bots run the host's server binary (a bot cannot replace its own): this agent's copy is
    // replaced by a program that exits at once.
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("container-server");
    std::fs::copy(common::server_binary(), &server).unwrap();
    let mut a = TestAgent::new(
        &env,
        &format!("server_binary = {:?}\n", server.display().to_string()),
    );
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let (bot, _) = a.create_bot("broken");
    let broken = dir.path().join("broken");
    std::fs::write(&broken, "#!/bin/sh\necho broken >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&broken, &server).unwrap();
    a.ok(&["bot", "stop", &bot]);
    let t = Instant::now();
    let out = a.cli(&["bot", "start", &bot]);
    let took = t.elapsed();
    assert!(!out.status.success(), "start of a broken server succeeded");
    let why = stderr(&out);
    println!("start failed after {took:?}: {why}");
    assert!(
        why.contains("exited with status 3"),
        "the error should say how the server ended: {why}"
    );
    assert!(
        took < Duration::from_secs(10),
        "start waited {took:?} for a server that had exited"
    );
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

#[test]
fn a_killed_agent_comes_back_without_losing_or_readdressing_bots() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (b1, ip1) = a.create_bot("ka");
    let (b2, ip2) = a.create_bot("kb");
    let pid2 = field(&a.inspect(&b2), "pid").as_u64().unwrap();
    let ipam = a.ipam_entries();
    assert_eq!(ipam.len(), 2, "{ipam:?}");

    a.kill(Signal::SIGKILL);
    // While the agent is down, one bot's server dies too.
    kill9(pid2);
    let cid2 = format!("mcp-{b2}");
    let gone = || {
        block_on(async {
            use memoh_agent::containerd::{prelude::*, TaskState};
            let c = a.containerd().await;
            c.task_status(&cid2)
                .await
                .unwrap()
                .is_none_or(|s| s.state != TaskState::Running)
        })
    };
    a.wait_for("the task to stop", Duration::from_secs(10), gone);

    a.serve();
    let bots = ips_of(&a);
    assert_eq!(
        bots,
        vec![
            (b1.clone(), "running".into(), ip1.clone()),
            (b2.clone(), "running".into(), ip2.clone()),
        ]
    );
    assert_eq!(a.ipam_entries(), ipam, "no duplicate or new allocation");
    assert_eq!(a.sh_in(&b1, "echo one"), "one\n");
    assert_eq!(a.sh_in(&b2, "echo two"), "two\n");
}

#[test]
fn a_deleted_masquerade_rule_comes_back() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("masq");
    let count = |a: &TestAgent| {
        let l = common::sh("iptables", &["-w", "5", "-t", "nat", "-S", "POSTROUTING"]);
        stdout(&l)
            .lines()
            .filter(|l| l.contains(&a.subnet) && l.contains(common::MASQ_COMMENT))
            .count()
    };
    assert_eq!(count(&a), 1);

    // Someone deletes it; `bot start` of the running bot puts it back, without touching the
    // bot's address or a command streaming meanwhile.
    assert!(a.delete_masq());
    assert!(!a.masq_present());
    let ip = field(&a.inspect(&bot), "ip").as_str().unwrap().to_string();
    let long = a
        .command(&[
            "exec",
            &bot,
            "--",
            "sh",
            "-c",
            "echo start; sleep 2; echo end",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a.ok(&["bot", "start", &bot]);
    assert_eq!(count(&a), 1);
    let out = long.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "start\nend\n");
    assert_eq!(field(&a.inspect(&bot), "ip"), ip.as_str());
    assert_eq!(a.ipam_entries().len(), 1);

    // Again; the agent's periodic check puts it back by itself.
    assert!(a.delete_masq());
    let t = Instant::now();
    a.wait_for("masquerade back", Duration::from_secs(25), || {
        a.masq_present()
    });
    println!("masquerade back after {:?}", t.elapsed());
    assert_eq!(count(&a), 1);
    assert_eq!(a.sh_in(&bot, "echo ok"), "ok\n");
}

#[test]
fn a_deleted_veth_is_attached_again() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, old_ip) = a.create_bot("veth");
    let ports = stdout(&common::sh(
        "ip",
        &["-o", "link", "show", "master", &a.bridge],
    ));
    let veth = ports
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .next()
        .unwrap_or_else(|| panic!("no port on {}: {ports:?}", a.bridge));
    assert!(common::sh("ip", &["link", "delete", &veth])
        .status
        .success());

    // The next start of the running bot notices and attaches it again.
    a.ok(&["bot", "start", &bot]);
    let info = a.inspect(&bot);
    let ip = field(&info, "ip").as_str().unwrap().to_string();
    assert_eq!(ip, old_ip, "the bot was re-addressed");
    assert!(
        common::tcp_connects(&format!("{ip}:9090"), Duration::from_secs(2)),
        "{ip}:9090 unreachable after re-attach"
    );
    assert_eq!(a.sh_in(&bot, "echo reattached"), "reattached\n");
    let entries = a.ipam_entries();
    assert_eq!(entries.len(), 1, "leaked allocation: {entries:?}");
    assert_eq!(entries[0].0.to_string(), ip);

    // Without a start: the agent sees the link go and attaches the bot again at once, well
    // before its periodic reconcile (every 15 s); a call made meanwhile waits, it does not
    // fail.
    let veth = stdout(&common::sh(
        "ip",
        &["-o", "link", "show", "master", &a.bridge],
    ))
    .lines()
    .filter_map(|l| l.split(": ").nth(1))
    .map(|n| n.split('@').next().unwrap().to_string())
    .next()
    .expect("the bot's port on the bridge");
    assert!(common::sh("ip", &["link", "delete", &veth])
        .status
        .success());
    let broken = std::time::Instant::now();
    let first = a.cli(&["exec", &bot, "--", "true"]);
    let took = broken.elapsed();
    assert!(
        first.status.success(),
        "exec after the veth was deleted: {}",
        String::from_utf8_lossy(&first.stderr).trim()
    );
    println!("exec answered {took:?} after the veth was deleted");
    assert!(
        took < Duration::from_secs(5),
        "the bot was re-attached only after {took:?}:\n{}",
        a.log_tail(20)
    );
    assert_eq!(
        field(&a.inspect(&bot), "ip").as_str(),
        Some(old_ip.as_str())
    );
}

#[test]
fn bots_cannot_reach_each_other_but_reach_the_gateway() {
    let Some(env) = Env::get(false) else { return };
    // Of the host, a bot reaches only the ports the configuration allows: the test's listener
    // on the gateway gets one.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut a = TestAgent::new(&env, &format!("host_ports_allowed = [\"tcp/{port}\"]"));
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let (ba, ip_a) = a.create_bot("isoa");
    let (bb, ip_b) = a.create_bot("isob");
    let rules = stdout(&common::sh(
        "iptables",
        &["-w", "5", "-S", common::ISOLATION_CHAIN],
    ));
    assert!(
        rules.contains(&format!("-i {0} -o {0} -j DROP", a.bridge)),
        "{rules}"
    );

    // The host (the agent's side) reaches both servers.
    for ip in [&ip_a, &ip_b] {
        assert!(
            common::tcp_connects(&format!("{ip}:9090"), Duration::from_secs(2)),
            "host cannot reach {ip}:9090"
        );
    }
    // Neither bot reaches the other's server.
    for (from, to) in [(&ba, &ip_b), (&bb, &ip_a)] {
        let out = a.cli(&[
            "exec",
            from,
            "--",
            "sh",
            "-c",
            &format!("nc -w 2 {to} 9090 </dev/null"),
        ]);
        assert_ne!(
            out.status.code(),
            Some(0),
            "{from} reached {to}:9090: {}",
            stderr(&out)
        );
    }
    // A bot still reaches its gateway: a listener of the test's on the bridge address.
    let gw = a.gateway();
    let listener = TcpListener::bind(format!("{gw}:{port}")).unwrap();
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        s.write_all(b"pong\n").unwrap();
        line
    });
    let out = a.cli(&[
        "exec",
        &ba,
        "--",
        "sh",
        "-c",
        &format!("echo ping | nc -w 3 {gw} {port}"),
    ]);
    assert!(stdout(&out).contains("pong"), "{out:?}");
    assert_eq!(server.join().unwrap(), "ping\n");
}

#[test]
fn the_proxy_routes_by_bot_and_servers_want_their_token() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, ip) = a.create_bot("proxy");
    let ghost = a.bot_id("ghost");
    let token = std::fs::read_to_string(a.token_path(&bot)).unwrap();
    let token = token.trim().to_string();
    assert!(token.len() >= 32, "token {token:?}");
    let sock = a.socket.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let via_agent =
        |b: &str| ContainerClient::with_auth(unix_channel(&sock), None, Some(b)).unwrap();

    rt.block_on(async {
        let r = via_agent(&bot)
            .exec_collect("echo via-proxy; exit 3", "", 0)
            .await
            .unwrap();
        assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"via-proxy\n"[..], 3));
        let s = via_agent(&ghost).stat("/").await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}");
        assert!(s.message().contains(&ghost), "{s:?}");
        let s = ContainerClient::new(unix_channel(&sock))
            .stat("/")
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");

        // Straight to the bot: only with its token.
        let addr = format!("{ip}:9090");
        let s = ContainerClient::new(tcp_channel(&addr).unwrap())
            .stat("/")
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
        let wrong = "0".repeat(64);
        let s = ContainerClient::with_auth(tcp_channel(&addr).unwrap(), Some(&wrong), None)
            .unwrap()
            .exec_collect("true", "", 0)
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
        let direct =
            ContainerClient::with_auth(tcp_channel(&addr).unwrap(), Some(&token), None).unwrap();
        direct.stat("/").await.unwrap();
        let r = direct.exec_collect("echo direct", "", 0).await.unwrap();
        assert_eq!(r.stdout, b"direct\n");
    });

    a.ok(&["bot", "stop", &bot]);
    rt.block_on(async {
        let s = via_agent(&bot).stat("/").await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(!s.message().is_empty(), "UNAVAILABLE without a reason");
        println!("stopped bot: {}", s.message());
    });
    a.ok(&["bot", "start", &bot]);
    rt.block_on(async {
        let r = via_agent(&bot)
            .exec_collect("echo again", "", 0)
            .await
            .unwrap();
        assert_eq!(r.stdout, b"again\n");
    });
}

/// A named network namespace with its loopback up, deleted on drop.
struct HostNetns(String);

impl HostNetns {
    fn new(name: &str) -> Self {
        let ns = format!("memoh-h{name}-{}", std::process::id() % 100_000);
        let _ = common::sh("ip", &["netns", "delete", &ns]);
        assert!(common::sh("ip", &["netns", "add", &ns]).status.success());
        assert!(common::sh("ip", &["-n", &ns, "link", "set", "lo", "up"])
            .status
            .success());
        Self(ns)
    }
}

impl Drop for HostNetns {
    fn drop(&mut self) {
        let _ = common::sh("ip", &["netns", "delete", &self.0]);
    }
}

#[test]
fn a_flushed_nat_table_gets_its_masquerade_back() {
    let Some(env) = Env::get(false) else { return };
    // The agent's "host" is a network namespace of this test, so flushing its whole nat table
    // touches nothing else on the machine. Declared first: dropped after the agent guard.
    let host = HostNetns::new("nat");
    let mut a = TestAgent::new(&env, "");
    a.netns = Some(host.0.clone());
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let (bot, ip) = a.create_bot("natf");
    let (other, _) = a.create_bot("natg");
    let nat = |a: &TestAgent| stdout(&a.net_sh("iptables", &["-w", "5", "-t", "nat", "-S"]));
    assert!(a.masq_present(), "{}", nat(&a));

    // Another program flushes the table while the bots run; a command streams meanwhile.
    let long = a
        .command(&[
            "exec",
            &bot,
            "--",
            "sh",
            "-c",
            "echo start; sleep 3; echo end",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(a
        .net_sh("iptables", &["-w", "5", "-t", "nat", "-F"])
        .status
        .success());
    assert!(!a.masq_present(), "flush left {}", nat(&a));
    // The agent's periodic check puts it back by itself, once.
    let t = Instant::now();
    a.wait_for(
        "masquerade back after a flush",
        Duration::from_secs(25),
        || a.masq_present(),
    );
    println!("masquerade back {:?} after the flush", t.elapsed());
    let rules = nat(&a);
    assert_eq!(
        rules
            .lines()
            .filter(|l| l.contains(common::MASQ_COMMENT))
            .count(),
        1,
        "{rules}"
    );
    let out = long.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "start\nend\n", "the stream did not survive");
    // Nobody was re-addressed or restarted.
    let info = a.inspect(&bot);
    assert_eq!(field(&info, "ip"), ip.as_str(), "{info}");
    assert_eq!(field(&info, "restart_count"), 0, "{info}");

    // Flushed again, then a bot start: the rule is back at once, no waiting for the check.
    assert!(a
        .net_sh("iptables", &["-w", "5", "-t", "nat", "-F"])
        .status
        .success());
    a.ok(&["bot", "stop", &other]);
    a.ok(&["bot", "start", &other]);
    assert!(a.masq_present(), "not back after a start: {}", nat(&a));
    assert_eq!(a.sh_in(&other, "echo ok"), "ok\n");
    for b in [&bot, &other] {
        a.ok(&["bot", "rm", b]);
        assert!(a.leftovers(b).is_empty(), "{:?}", a.leftovers(b));
    }
}

/// A task bundle that a killed containerd left half-deleted (`.mcp-BOT` beside `mcp-BOT`, see
/// `memoh_agent::bots::bundles`) used to block its bot for good ("file exists" on every task
/// create) until an operator removed it. The agent removes it itself before the start.
#[test]
fn a_half_deleted_task_bundle_does_not_block_the_bot() {
    let Some(env) = Env::get(false) else { return };
    // The private containerd keeps its state beside its socket (scripts/test-env.sh).
    let state = env.sock.parent().unwrap().join("containerd");
    let mut a = TestAgent::new(
        &env,
        &format!("containerd_state = {:?}", state.display().to_string()),
    );
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let (bot, _) = a.create_bot("bundle");
    a.sh_in(&bot, "echo kept > /data/kept.txt");
    a.ok(&["bot", "stop", &bot]);
    let dir = state
        .join("io.containerd.runtime.v2.task")
        .join(&a.namespace);
    let cid = format!("mcp-{bot}");
    // What containerd killed between its rename and its removal leaves behind.
    for d in [dir.join(&cid), dir.join(format!(".{cid}"))] {
        std::fs::create_dir_all(d.join("rootfs")).unwrap();
        std::fs::write(d.join("config.json"), "{}").unwrap();
    }
    a.ok(&["bot", "start", &bot]);
    assert!(
        !dir.join(format!(".{cid}")).exists(),
        "the half-deleted bundle is still there"
    );
    assert_eq!(a.sh_in(&bot, "cat /data/kept.txt"), "kept\n");
    assert!(
        a.log_tail(200).contains("half-deleted"),
        "no log line about the removal"
    );
}
