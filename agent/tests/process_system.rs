//! System tests of durable processes through the agent (tier 3): `memoh.process.v1.
//! ProcessService` routed by `x-memoh-bot`, and the CLI verbs `exec --detach`, `ps`, `attach`,
//! `kill`, `wait`, `rm`, against a real agent and bot:
//! - a counter keeps running across a dropped connection and an agent restart, and its output
//!   replayed from offset 0 and from a middle offset is exactly what it printed, in order, with
//!   no gap and no duplicate; a CLI `attach` following it carries on across the restart, with
//!   one line saying so, and prints the output's tail exactly;
//! - `kill` then `wait` gives 143 and the line saying which signal; a plain exit code comes
//!   back as the CLI's; `ps --json` shows the process; bad input is one line and a non-zero
//!   exit;
//! - ids do not leak across bots: another bot's routing answers NOT_FOUND for them.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"`; without it the tests print "skipped"
//! and pass, except under `CI`, where they fail.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{block_on, Env, TestAgent};
use memoh_proto::client::{unix_channel, CallMetadata};
use memoh_proto::pb::process as pp;
use memoh_proto::pb::process::attach_output::Kind;
use memoh_proto::ContainerClient;
use nix::sys::signal::Signal;

type Procs = pp::process_service_client::ProcessServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, CallMetadata>,
>;

/// A process client of `bot` through the agent's socket, on a connection of its own.
fn procs(socket: &std::path::Path, bot: &str) -> Procs {
    let c = ContainerClient::with_auth(unix_channel(socket), None, Some(bot)).unwrap();
    pp::process_service_client::ProcessServiceClient::new(c.http())
}

/// Stdout of a finished or running process from `offset` (no follow): the bytes, checking that
/// every chunk starts where the previous one ended, and the last message's info.
async fn replay(c: &mut Procs, id: &str, offset: u64) -> (Vec<u8>, pp::ProcessInfo) {
    let mut s = c
        .attach(pp::AttachRequest {
            id: id.into(),
            stdout_offset: offset,
            no_follow: true,
            ..Default::default()
        })
        .await
        .expect("Attach through the agent")
        .into_inner();
    let mut out = Vec::new();
    let mut next = offset;
    while let Some(m) = s.message().await.expect("attach stream") {
        match Kind::try_from(m.kind).unwrap() {
            Kind::Stdout => {
                assert_eq!(m.offset, next, "a chunk out of place (gap or duplicate)");
                next += m.data.len() as u64;
                out.extend_from_slice(&m.data);
            }
            Kind::Stderr => {}
            Kind::Lost => panic!("output lost: {m:?}"),
            Kind::Exit | Kind::End => return (out, m.info.expect("info")),
        }
    }
    panic!("the attach stream ended without EXIT or END");
}

/// The counter's output up to line `n`: `n1\n` ... `nN\n`.
fn counted(n: usize) -> String {
    (1..=n).map(|i| format!("n{i}\n")).collect()
}

fn ps_json(a: &TestAgent, bot: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(&a.ok(&["ps", bot, "--json"])).expect("ps --json prints JSON")
}

#[test]
fn counter_survives_a_dropped_connection_and_an_agent_restart() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("proc");
    // Counts until /data/stop exists (bounded), then says so and exits 0.
    let script = "i=0; while [ ! -e /data/stop ] && [ $i -lt 20000 ]; do i=$((i+1)); \
                  echo n$i; sleep 0.01; done; echo end";
    let out = a.ok(&[
        "exec", "--detach", "--tag", "counter", &bot, "--", "sh", "-c", script,
    ]);
    let id = out.trim().to_string();
    assert_eq!(out, format!("{id}\n"), "exec --detach prints the id alone");
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{out:?}"
    );
    let socket = a.socket.clone();

    // A follower on its own connection sees some lines, then the connection is dropped.
    let first = block_on(async {
        let mut c = procs(&socket, &bot);
        let mut s = c
            .attach(pp::AttachRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("Attach")
            .into_inner();
        let mut got = Vec::new();
        while got.iter().filter(|b| **b == b'\n').count() < 20 {
            let m = tokio::time::timeout(Duration::from_secs(20), s.message())
                .await
                .expect("output within 20 s")
                .expect("attach stream")
                .expect("a message");
            assert_eq!(Kind::try_from(m.kind), Ok(Kind::Stdout), "{m:?}");
            assert_eq!(m.offset, got.len() as u64);
            got.extend_from_slice(&m.data);
        }
        got
    });
    assert!(counted(20)
        .as_bytes()
        .starts_with(&first[..counted(20).len()]));

    // A CLI `attach` follows from now; it must carry on across the restart below.
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut follower = a
        .command(&["attach", &bot, &id])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::metadata(&out_path).unwrap().len() < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "attach printed nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The agent goes away and comes back: the process lives in the bot and keeps counting.
    let before = ps_json(&a, &bot);
    let pid = before[0]["pid"].clone();
    a.kill(Signal::SIGTERM);
    a.serve();
    let after = ps_json(&a, &bot);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["id"], id.as_str());
    assert_eq!(after[0]["state"], "running", "{after:?}");
    assert_eq!(after[0]["pid"], pid);
    assert_eq!(after[0]["tag"], "counter");
    let grown = after[0]["stdout_bytes"].as_u64().unwrap();
    let start = Instant::now();
    while ps_json(&a, &bot)[0]["stdout_bytes"].as_u64().unwrap() <= grown {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the counter stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    a.sh_in(&bot, "touch /data/stop");
    let w = a.cli(&["wait", &bot, &id]);
    assert_eq!(w.status.code(), Some(0), "{w:?}");
    let err = String::from_utf8_lossy(&w.stderr);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains("exited with code 0"), "{err:?}");

    let followed = {
        let start = Instant::now();
        loop {
            if let Some(st) = follower.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = follower.kill();
                panic!(
                    "attach did not end with the process: {}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (followed_out, followed_err) = (
        std::fs::read_to_string(&out_path).unwrap(),
        std::fs::read_to_string(&err_path).unwrap(),
    );
    assert_eq!(followed.code(), Some(0), "attach: {followed_err}");
    assert_eq!(
        followed_err.matches("attaching again").count(),
        1,
        "{followed_err:?}"
    );
    assert!(
        followed_err.contains("exited with code 0"),
        "{followed_err:?}"
    );
    let printed_before = before[0]["stdout_bytes"].as_u64().unwrap();

    block_on(async {
        let mut c = procs(&socket, &bot);
        let (all, info) = replay(&mut c, &id, 0).await;
        // What the follower printed is the output's tail from where it attached, across the
        // restart: no gap, no duplicate, begun before the agent went away.
        assert!(
            all.ends_with(followed_out.as_bytes()),
            "attach printed {followed_out:?}"
        );
        assert!(
            (all.len() - followed_out.len()) as u64 <= printed_before,
            "attach began after the restart"
        );
        let all = String::from_utf8(all).unwrap();
        let n = all.lines().count() - 1;
        assert!(n > 20, "{n} lines");
        assert_eq!(all, format!("{}end\n", counted(n)), "from offset 0");
        assert_eq!(info.stdout_bytes, all.len() as u64);
        assert_eq!(pp::State::try_from(info.state), Ok(pp::State::Exited));
        assert!(all.as_bytes().starts_with(&first));
        // From the middle: the start of line n/2, and one inside a line.
        for mid in [counted(n / 2).len(), counted(n / 2).len() + 2] {
            let (rest, _) = replay(&mut c, &id, mid as u64).await;
            assert_eq!(rest, all.as_bytes()[mid..], "from offset {mid}");
        }
    });

    // The CLI replays it too, stdout only, and ends with the exit status.
    let r = a.cli(&["attach", "--from-start", &bot, &id]);
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let text = String::from_utf8(r.stdout).unwrap();
    assert!(
        text.starts_with("n1\nn2\n") && text.ends_with("end\n"),
        "{text:?}"
    );
    a.ok(&["rm", &bot, &id]);
    assert!(ps_json(&a, &bot).is_empty());
}

#[test]
fn kill_wait_ps_and_exit_codes_through_the_cli() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (bot, _) = a.create_bot("cli");
    let id = a
        .ok(&["exec", "-d", "--tag", "sleeper", &bot, "--", "sleep", "300"])
        .trim()
        .to_string();

    let ps = ps_json(&a, &bot);
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0]["id"], id.as_str());
    assert_eq!(ps[0]["state"], "running");
    assert_eq!(ps[0]["tag"], "sleeper");
    assert_eq!(ps[0]["command"], "sleep 300");
    assert!(ps[0]["exit_code"].is_null() && ps[0]["pid"].as_i64().unwrap() > 0);
    let table = a.ok(&["ps", &bot]);
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with(&id), "{table}");
    assert!(serde_json::from_str::<Vec<serde_json::Value>>(
        &a.ok(&["ps", &bot, "--json", "--tag", "other"])
    )
    .unwrap()
    .is_empty());

    // A live attacher ends with the process's status when another call kills it.
    let mut attached = a
        .command(&["attach", &bot, &id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Ctrl-C on another attacher detaches it and leaves the process running.
    let detached = a
        .command(&["attach", &bot, &id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(detached.id() as i32),
        Signal::SIGINT,
    )
    .unwrap();
    let out = detached.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("detached"),
        "{out:?}"
    );
    assert_eq!(ps_json(&a, &bot)[0]["state"], "running");
    let still = a.cli(&["wait", "--timeout", "1", &bot, &id]);
    assert_eq!(still.status.code(), Some(124), "{still:?}");
    a.ok(&["kill", &bot, &id]);
    let w = a.cli(&["wait", &bot, &id]);
    assert_eq!(w.status.code(), Some(143), "{w:?}");
    let err = String::from_utf8_lossy(&w.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains("killed by signal 15 (SIGTERM)"), "{err:?}");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = attached.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "attach did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = attached.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(143), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("killed by signal 15"));

    // Other spellings of signals, and a plain exit code.
    for (sig, code) in [("SIGKILL", 137), ("2", 130), ("hup", 129)] {
        let id = a
            .ok(&["exec", "-d", &bot, "--", "sleep", "300"])
            .trim()
            .to_string();
        a.ok(&["kill", "-s", sig, &bot, &id]);
        let w = a.cli(&["wait", &bot, &id]);
        assert_eq!(w.status.code(), Some(code), "{sig}: {w:?}");
    }
    let id3 = a
        .ok(&[
            "exec",
            "-d",
            "-e",
            "CODE=3",
            &bot,
            "--",
            "sh",
            "-c",
            "exit $CODE",
        ])
        .trim()
        .to_string();
    let w = a.cli(&["wait", &bot, &id3]);
    assert_eq!(w.status.code(), Some(3), "{w:?}");
    assert!(String::from_utf8_lossy(&w.stderr).contains("exited with code 3"));
    assert_eq!(ps_json(&a, &bot).len(), 5);
    a.ok(&["rm", &bot, &id3]);
    assert_eq!(ps_json(&a, &bot).len(), 4);

    // Bad input: one line on stderr, a non-zero exit.
    let bad = a.cli(&["kill", "-s", "BOGUS", &bot, &id]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(common::one_line_failure("kill -s BOGUS", &bad).contains("unknown signal"));
    for args in [
        vec!["wait", bot.as_str(), "nosuchid"],
        vec!["attach", bot.as_str(), "nosuchid"],
        vec!["kill", bot.as_str(), "nosuchid"],
        vec!["ps", "nosuchbot"],
        vec!["exec", "-d", "nosuchbot", "--", "true"],
    ] {
        a.fails(&args);
    }
}

#[test]
fn process_ids_do_not_leak_across_bots() {
    let Some(env) = Env::get(false) else { return };
    let mut a = TestAgent::with_image(&env);
    let (one, _) = a.create_bot("pa");
    let (two, _) = a.create_bot("pb");
    let socket = a.socket.clone();
    block_on(async {
        let mut c1 = procs(&socket, &one);
        let mut c2 = procs(&socket, &two);
        let id = c1
            .start(pp::StartRequest {
                command: "sleep 300".into(),
                ..Default::default()
            })
            .await
            .expect("Start through the agent")
            .into_inner()
            .id;
        let seen = |l: pp::ListResponse| l.processes.iter().any(|p| p.id == id);
        assert!(seen(
            c1.list(pp::ListRequest::default())
                .await
                .unwrap()
                .into_inner()
        ));
        assert!(!seen(
            c2.list(pp::ListRequest::default())
                .await
                .unwrap()
                .into_inner()
        ));
        let e = c2
            .attach(pp::AttachRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .expect_err("attach to another bot's id");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        for r in [
            c2.signal(pp::SignalRequest {
                id: id.clone(),
                signal: 9,
            })
            .await
            .map(|_| ()),
            c2.wait(pp::WaitRequest {
                id: id.clone(),
                timeout_ms: 10,
            })
            .await
            .map(|_| ()),
        ] {
            assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound);
        }
        // Still running in its own bot; then stopped there.
        let w = c1
            .wait(pp::WaitRequest {
                id: id.clone(),
                timeout_ms: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!w.exited);
        c1.signal(pp::SignalRequest {
            id: id.clone(),
            signal: 9,
        })
        .await
        .unwrap();
        // A Wait without limit returns once the process has ended.
        let w = c1
            .wait(pp::WaitRequest {
                id: id.clone(),
                timeout_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(w.exited && w.info.unwrap().signal == 9);

        // An unknown bot is NOT_FOUND, a stopped one UNAVAILABLE, as for the other services.
        let mut ghost = procs(&socket, "nosuchbot");
        let e = ghost.list(pp::ListRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    });
    a.ok(&["bot", "stop", &two]);
    block_on(async {
        let e = procs(&socket, &two)
            .list(pp::ListRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    });
}
