//! System test of the bot's server from the host (tier 3): every bot runs the agent's
//! `server_binary`, bound read-only at `/opt/memoh/bridge`, with a host directory at
//! `/run/memoh`. Checked as an attacker inside a real bot: the binary cannot be written,
//! replaced, removed or renamed; a bot that rewrites the image's copy (`/app/mcp`, `/opt/mcp`
//! and the stamp), or moves `/opt/memoh` away and puts its own `bridge` there, still runs the
//! host's binary, and after a restart too; a new host binary reaches the
//! bot at its next start; a bot of an older agent (the image's entrypoint on its record) moves
//! to the host's binary at its next start; a missing binary fails the start naming it; a bot
//! that blocks its own mount point only stops itself. ReverseHTTP end to end: a bot's request
//! to its `127.0.0.1:18732` reaches an allowed host service; others never leave the agent.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"`; without it the test prints "skipped"
//! and passes, except under `CI`, where it fails.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Env, TestAgent};
use memoh_agent::containerd::prelude::*;

const BRIDGE: &str = "/opt/memoh/bridge";

/// The sha256 of a host file, as `sha256sum` prints it.
fn host_sha(p: &Path) -> String {
    let out = common::sh("sha256sum", &[&p.display().to_string()]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The sha256 of the bot's `/opt/memoh/bridge`, and what its PID 1 runs.
fn bot_server(a: &TestAgent, bot: &str) -> (String, String) {
    let out = a.sh_in(
        bot,
        "sha256sum /opt/memoh/bridge | cut -d' ' -f1; tr '\\0' ' ' </proc/1/cmdline; echo",
    );
    let mut l = out.lines();
    (
        l.next().unwrap_or_default().to_string(),
        l.next().unwrap_or_default().trim().to_string(),
    )
}

/// A private copy of the test server (replaced by the test), 0755.
fn server_copy(dir: &Path) -> PathBuf {
    let p = dir.join("container-server");
    std::fs::copy(common::server_binary(), &p).expect("copy the server binary");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Replaces `p` as an installer would: a new file renamed over it.
fn upgrade(p: &Path) {
    let tmp = p.with_extension("new");
    let mut bytes = std::fs::read(p).unwrap();
    // Bytes after an ELF image's end change its hash, not what it runs.
    bytes.extend_from_slice(b"\0memoh-upgrade-marker\0");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, p).unwrap();
}

fn agent_with(env: &Env, server: &Path) -> TestAgent {
    let mut a = TestAgent::new(
        env,
        &format!("server_binary = {:?}\n", server.display().to_string()),
    );
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    a
}

#[test]
fn a_bot_cannot_replace_the_hosts_server_and_a_host_upgrade_reaches_it() {
    let Some(env) = Env::get(false) else { return };
    let bin_dir = tempfile::tempdir().unwrap();
    let server = server_copy(bin_dir.path());
    let mut a = agent_with(&env, &server);
    let (bot, _) = a.create_bot("srv");
    let want = host_sha(&server);
    assert_eq!(bot_server(&a, &bot), (want.clone(), BRIDGE.to_string()));
    let version = a.sh_in(&bot, "/opt/memoh/bridge --version");
    assert!(version.starts_with("container-server "), "{version}");

    // The attacker: every way to change the binary or its path fails.
    let attempts = [
        "echo x > /opt/memoh/bridge",
        "echo x >> /opt/memoh/bridge",
        "cp /bin/busybox /opt/memoh/bridge",
        "rm -f /opt/memoh/bridge",
        "mv /opt/memoh/bridge /opt/memoh/old",
        "cp /bin/busybox /opt/memoh/evil && mv -f /opt/memoh/evil /opt/memoh/bridge",
        "chmod 0777 /opt/memoh/bridge",
        "rm -rf /opt/memoh",
        "umount /opt/memoh/bridge",
        "mount -o remount,rw /opt/memoh/bridge",
    ];
    let script: String = attempts
        .iter()
        .map(|c| format!("if ( {c} ) 2>/dev/null; then echo 'DONE {c}'; fi\n"))
        .collect();
    let out = a.sh_in(&bot, &script);
    assert!(!out.contains("DONE"), "a bot changed its server:\n{out}");
    assert_eq!(bot_server(&a, &bot).0, want);

    // The bot's run directory: the host's (0750), holding the server's socket.
    let run_dir = a.state_dir.join("run").join(&a.namespace).join(&bot);
    let mode = std::fs::metadata(&run_dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750, "{}", run_dir.display());
    a.sh_in(
        &bot,
        "test -S /run/memoh/bridge.sock && touch /run/memoh/written-by-bot",
    );
    assert!(run_dir.join("bridge.sock").exists());
    assert!(run_dir.join("written-by-bot").exists());
    // The run directory is noexec.
    let out = a.sh_in(
        &bot,
        "cp /bin/busybox /run/memoh/bb && if /run/memoh/bb true 2>/dev/null; then echo RAN; fi; rm -f /run/memoh/bb",
    );
    assert!(!out.contains("RAN"), "{out}");

    // The directory holding the mount can be renamed (the kernel moves the mount with it),
    // and a file of the bot's put in its place: the running server is untouched.
    a.sh_in(
        &bot,
        "mv /opt/memoh /opt/memoh2 && mkdir /opt/memoh \
         && printf '#!/bin/sh\\nexec sleep 100000\\n' > /opt/memoh/bridge \
         && chmod 755 /opt/memoh/bridge",
    );
    let running = a.sh_in(&bot, "sha256sum /proc/1/exe | cut -d' ' -f1");
    assert_eq!(running.trim(), want, "the running server changed");
    // The image's copy rewritten, stamp and all: the bot still runs the host's binary.
    a.sh_in(
        &bot,
        "printf '#!/bin/sh\\nexec sleep 100000\\n' > /app/mcp && chmod 755 /app/mcp \
         && cp /app/mcp /opt/mcp && sha256sum /opt/mcp | cut -d' ' -f1 > /opt/mcp.sha256 \
         && cp /opt/mcp.sha256 /app/.mcp.stamp",
    );
    a.ok(&["bot", "stop", &bot]);
    a.ok(&["bot", "start", &bot]);
    assert_eq!(bot_server(&a, &bot), (want.clone(), BRIDGE.to_string()));
    assert!(a.sh_in(&bot, "cat /app/mcp").contains("sleep 100000"));

    // A host upgrade: the running bot keeps its binary, its next start gets the new one.
    upgrade(&server);
    let new = host_sha(&server);
    assert_ne!(new, want);
    assert_eq!(bot_server(&a, &bot).0, want);
    a.ok(&["bot", "stop", &bot]);
    a.ok(&["bot", "start", &bot]);
    assert_eq!(bot_server(&a, &bot), (new, BRIDGE.to_string()));

    // The run directory goes with the bot.
    a.ok(&["bot", "rm", &bot]);
    assert!(!run_dir.exists(), "{} is left", run_dir.display());
}

#[test]
fn a_bot_of_an_older_agent_runs_the_hosts_server_from_its_next_start() {
    let Some(env) = Env::get(false) else { return };
    let bin_dir = tempfile::tempdir().unwrap();
    let server = server_copy(bin_dir.path());
    let mut a = agent_with(&env, &server);
    let (bot, _) = a.create_bot("old");
    a.ok(&["bot", "stop", &bot]);
    // What an older agent recorded: the image's entrypoint, no server mounts.
    common::block_on(async {
        let c = a.containerd().await;
        let cid = format!("mcp-{bot}");
        let info = c.get_container(&cid).await.unwrap().expect("record");
        let mut spec = info.spec.expect("spec");
        spec.process_mut()
            .as_mut()
            .unwrap()
            .set_args(Some(vec!["/entrypoint.sh".to_string()]));
        let mounts: Vec<_> = spec
            .mounts()
            .clone()
            .unwrap()
            .into_iter()
            .filter(|m| m.destination() != Path::new(BRIDGE))
            .filter(|m| m.destination() != Path::new("/run/memoh"))
            .collect();
        spec.set_mounts(Some(mounts));
        c.update_container_spec(&cid, &spec).await.unwrap();
    });
    a.ok(&["bot", "start", &bot]);
    assert_eq!(
        bot_server(&a, &bot),
        (host_sha(&server), BRIDGE.to_string())
    );
    let out = a.sh_in(&bot, "test -S /run/memoh/bridge.sock && echo socket");
    assert_eq!(out.trim(), "socket");
}

#[test]
fn a_missing_server_binary_fails_the_start_naming_it() {
    let Some(env) = Env::get(false) else { return };
    let bin_dir = tempfile::tempdir().unwrap();
    let server = server_copy(bin_dir.path());
    let mut a = agent_with(&env, &server);
    let bot = a.bot_id("gone");
    std::fs::remove_file(&server).unwrap();
    let line = a.fails(&["bot", "create", &bot]);
    assert!(
        line.contains(&format!(
            "server binary {}: does not exist (server_binary in agent.toml)",
            server.display()
        )),
        "{line}"
    );
    // Back in place, the same bot starts.
    std::fs::copy(common::server_binary(), &server).unwrap();
    a.ok(&["bot", "start", &bot]);
    assert_eq!(bot_server(&a, &bot).1, BRIDGE);
}

/// A plain HTTP/1.1 upstream on the host's loopback: answers every request with its request
/// line as the body, and records it.
fn upstream() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            let _ = r.read_line(&mut first);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let first = first.trim().to_string();
            s.lock().unwrap().push(first.clone());
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{first}",
                first.len()
            );
        }
    });
    (port, seen)
}

#[test]
fn a_bots_http_request_reaches_an_allowed_host_service_and_nothing_else() {
    let Some(env) = Env::get(false) else { return };
    let (port, seen) = upstream();
    let mut a = TestAgent::new(
        &env,
        &format!("[reverse_http]\nallow = [\"http://127.0.0.1:{port}/hooks/\"]\n"),
    );
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let (bot, _) = a.create_bot("rh");
    // The stream opens after the start: the first request may come before it.
    let first = a.sh_in(
        &bot,
        "for i in $(seq 50); do wget -q -O - 'http://127.0.0.1:18732/hooks/a?x=1' 2>/dev/null \
         && exit 0; sleep 0.2; done; exit 1",
    );
    assert_eq!(first, "GET /hooks/a?x=1 HTTP/1.1");
    for refused in ["/etc/passwd", "/hooks/%2e%2e/admin", "/hooksx"] {
        let out = a.sh_in(
            &bot,
            &format!("wget -S -O - 'http://127.0.0.1:18732{refused}' 2>&1; true"),
        );
        assert!(out.contains("502"), "{refused}: {out}");
    }
    assert_eq!(*seen.lock().unwrap(), ["GET /hooks/a?x=1 HTTP/1.1"]);
}

/// A known limit: the mount point lives in the bot's writable layer, so a bot can put a
/// directory in its place; that stops only itself (its start fails naming the mount point),
/// never reaches the host's file.
#[test]
fn a_bot_that_blocks_the_mount_point_only_stops_itself() {
    let Some(env) = Env::get(false) else { return };
    let bin_dir = tempfile::tempdir().unwrap();
    let server = server_copy(bin_dir.path());
    let want = host_sha(&server);
    let mut a = agent_with(&env, &server);
    let (bot, _) = a.create_bot("blk");
    a.sh_in(
        &bot,
        "mv /opt/memoh /opt/moved && mkdir -p /opt/memoh/bridge/x",
    );
    a.ok(&["bot", "stop", &bot]);
    let line = a.fails(&["bot", "start", &bot]);
    assert!(line.contains("/opt/memoh/bridge"), "{line}");
    assert_eq!(host_sha(&server), want, "the host's binary changed");
}
