//! In-process tests of the process service against the real server over its unix socket:
//! replay by offset (ring, spill file, lost output), re-attaching after a dropped call or
//! channel, several attachers, signals to the whole group, exit codes and resource use,
//! terminals and their size, the bounds, and Exec's EXIT gaining resource use.

mod common;

use std::time::{Duration, Instant};

use common::{
    exec_input, expect_code, kill_leftovers, pids_matching, pseudo_random, run_exec, unique_sleep,
    wait_gone, wait_running, TestServer,
};
use memoh_proto::client::unix_channel;
use memoh_proto::pb::process as pb;
use pb::attach_output::Kind;
use pb::process_service_client::ProcessServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

type Client = ProcessServiceClient<Channel>;

fn start_req(command: &str) -> pb::StartRequest {
    pb::StartRequest {
        command: command.into(),
        ..Default::default()
    }
}

async fn start(c: &mut Client, command: &str) -> String {
    c.start(start_req(command))
        .await
        .expect("start")
        .into_inner()
        .id
}

async fn wait(c: &mut Client, id: &str) -> pb::ProcessInfo {
    let r = c
        .wait(pb::WaitRequest {
            id: id.into(),
            timeout_ms: 60_000,
        })
        .await
        .expect("wait")
        .into_inner();
    assert!(r.exited, "process {id} still runs after 60 s");
    r.info.expect("info")
}

/// What an Attach delivered, checked as it arrives: every chunk starts exactly where the
/// previous one of its stream ended (LOST moves the expected offset), so a gap or a
/// duplicate fails here.
#[derive(Debug, Default)]
struct Seen {
    out: Vec<u8>,
    err: Vec<u8>,
    next: [u64; 2],
    /// (stream, offset lost from, first kept).
    lost: Vec<(i32, u64, u64)>,
    last: Option<(Kind, pb::ProcessInfo)>,
}

impl Seen {
    fn from(out: u64, err: u64) -> Self {
        Self {
            next: [out, err],
            ..Default::default()
        }
    }

    fn take(&mut self, m: pb::AttachOutput) {
        let kind = Kind::try_from(m.kind).expect("known kind");
        match kind {
            Kind::Stdout | Kind::Stderr => {
                let i = (kind == Kind::Stderr) as usize;
                assert_eq!(
                    m.offset, self.next[i],
                    "{kind:?} chunk offset: gap or duplicate"
                );
                assert!(!m.data.is_empty(), "empty chunk");
                self.next[i] += m.data.len() as u64;
                if i == 0 {
                    self.out.extend_from_slice(&m.data);
                } else {
                    self.err.extend_from_slice(&m.data);
                }
            }
            Kind::Lost => {
                let i = (m.stream == Kind::Stderr as i32) as usize;
                assert_eq!(m.offset, self.next[i], "LOST names where the replay stood");
                assert!(m.next_offset > m.offset, "LOST moves forward");
                self.lost.push((m.stream, m.offset, m.next_offset));
                self.next[i] = m.next_offset;
            }
            Kind::Exit | Kind::End => {
                assert!(self.last.is_none(), "a message after the last one");
                self.last = Some((kind, m.info.expect("info on EXIT / END")));
            }
        }
    }

    fn last_kind(&self) -> Option<Kind> {
        self.last.as_ref().map(|(k, _)| *k)
    }
}

fn attach_req(id: &str, out: u64, err: u64) -> pb::AttachRequest {
    pb::AttachRequest {
        id: id.into(),
        stdout_offset: out,
        stderr_offset: err,
        ..Default::default()
    }
}

/// Attaches and reads to the stream's end.
async fn attach_all(c: &mut Client, req: pb::AttachRequest) -> Seen {
    let mut seen = Seen::from(req.stdout_offset, req.stderr_offset);
    let mut s = c.attach(req).await.expect("attach").into_inner();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("attach stalled")
    {
        seen.take(m.expect("attach message"));
    }
    seen
}

/// `printf '%06d\n'` of 0..n.
fn counter_bytes(n: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("{i:06}\n").into_bytes())
        .collect()
}

/// A shell loop printing [`counter_bytes`] to stdout, and every 10th line also to stderr,
/// pausing `pause` seconds every 100 lines.
fn counter_cmd(n: u32, pause: &str) -> String {
    format!(
        "i=0; while [ $i -lt {n} ]; do printf '%06d\\n' $i; \
         if [ $((i % 10)) -eq 0 ]; then printf 'e%06d\\n' $i >&2; fi; i=$((i+1)); \
         if [ $((i % 100)) -eq 0 ]; then sleep {pause}; fi; done"
    )
}

fn counter_err_bytes(n: u32) -> Vec<u8> {
    (0..n)
        .filter(|i| i % 10 == 0)
        .flat_map(|i| format!("e{i:06}\n").into_bytes())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_zero_and_from_the_middle_is_exact() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    let n = 3000;
    let id = start(&mut c, &counter_cmd(n, "0.01")).await;
    // Several attachers at once, from the start, while it runs.
    let attachers: Vec<_> = (0..4)
        .map(|_| {
            let mut c = c.clone();
            let id = id.clone();
            tokio::spawn(async move { attach_all(&mut c, attach_req(&id, 0, 0)).await })
        })
        .collect();
    let info = wait(&mut c, &id).await;
    assert_eq!(info.state, pb::State::Exited as i32);
    assert_eq!(info.exit_code, 0);
    let (want, want_err) = (counter_bytes(n), counter_err_bytes(n));
    assert_eq!(info.stdout_bytes, want.len() as u64);
    assert_eq!(info.stderr_bytes, want_err.len() as u64);
    for a in attachers {
        let seen = a.await.unwrap();
        assert_eq!(seen.out, want, "a live attacher's stdout");
        assert_eq!(seen.err, want_err, "a live attacher's stderr");
        assert_eq!(seen.last_kind(), Some(Kind::Exit));
        assert!(seen.lost.is_empty());
    }
    for (o, e) in [(0u64, 0u64), (7, 3), (12_345, 999), (want.len() as u64, 0)] {
        let seen = attach_all(&mut c, attach_req(&id, o, e)).await;
        assert_eq!(seen.out, want[o as usize..], "stdout from {o}");
        assert_eq!(seen.err, want_err[e as usize..], "stderr from {e}");
        let (kind, info) = seen.last.expect("last");
        assert_eq!(kind, Kind::Exit);
        assert_eq!(info.exit_code, 0);
    }
    // An offset past the end is refused, and so is a malformed or unknown id.
    let past = c.attach(attach_req(&id, want.len() as u64 + 1, 0)).await;
    let st = expect_code(past, Code::InvalidArgument);
    assert!(st.message().contains("past the end"), "{}", st.message());
    expect_code(
        c.attach(attach_req("nope", 0, 0)).await,
        Code::InvalidArgument,
    );
    expect_code(
        c.attach(attach_req("0123456789ab", 0, 0)).await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_attach_and_channel_resume_exactly_and_the_process_runs_on() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    let n = 4000;
    let id = start(&mut c, &counter_cmd(n, "0.05")).await;
    // Read part of the output, then drop the call mid-way.
    let mut seen = Seen::from(0, 0);
    {
        let mut st = c.attach(attach_req(&id, 0, 0)).await.unwrap().into_inner();
        while seen.out.len() < 5000 {
            let m = st.next().await.expect("more").expect("message");
            seen.take(m);
        }
    }
    // Drop the whole channel too: the process belongs to the bot, not the connection.
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = ProcessServiceClient::new(unix_channel(&s.socket));
    let list = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    let me = list.processes.iter().find(|p| p.id == id).expect("listed");
    assert_eq!(me.state, pb::State::Running as i32, "still running");
    assert!(
        me.stdout_bytes > seen.next[0],
        "it kept printing while nobody was attached"
    );
    // Resume from exactly where the first call stopped.
    let rest = attach_all(&mut c, attach_req(&id, seen.next[0], seen.next[1])).await;
    let mut out = seen.out.clone();
    out.extend_from_slice(&rest.out);
    let mut err = seen.err.clone();
    err.extend_from_slice(&rest.err);
    assert_eq!(out, counter_bytes(n));
    assert_eq!(err, counter_err_bytes(n));
    assert_eq!(rest.last_kind(), Some(Kind::Exit));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_beyond_the_ring_replays_from_the_spill_file() {
    let s = TestServer::builder()
        .processes(|p| p.ring_bytes = 64 * 1024)
        .start()
        .await;
    let data = pseudo_random(1 << 20, 7);
    std::fs::create_dir_all(&s.data).unwrap();
    std::fs::write(s.path("big.bin"), &data).unwrap();
    let mut c = s.processes();
    let id = start(&mut c, "cat big.bin; printf done >&2").await;
    let info = wait(&mut c, &id).await;
    assert_eq!(info.stdout_bytes, data.len() as u64);
    assert_eq!(info.stdout_first_offset, 0);
    for from in [0usize, 1, 300_000, data.len() - 65_536 - 1, data.len() - 10] {
        let seen = attach_all(&mut c, attach_req(&id, from as u64, 0)).await;
        assert!(seen.out == data[from..], "replay from {from} differs");
        assert_eq!(seen.err, b"done");
        assert!(seen.lost.is_empty());
    }
    // no_follow with max_bytes pages through it, each page going on where the last stopped.
    let mut pos = 0u64;
    let mut paged = Vec::new();
    loop {
        let mut req = attach_req(&id, pos, 4);
        req.no_follow = true;
        req.max_bytes = 200_000;
        let seen = attach_all(&mut c, req).await;
        assert!(seen.out.len() <= 200_000);
        paged.extend_from_slice(&seen.out);
        pos = seen.next[0];
        if seen.last_kind() == Some(Kind::Exit) {
            break;
        }
        assert_eq!(seen.last_kind(), Some(Kind::End));
    }
    assert!(paged == data, "paged replay differs");
    let files = s.root().join("processes").join(&id);
    assert_eq!(
        std::fs::read(files.join("stdout.log")).unwrap().len(),
        data.len()
    );
    let mode = common::mode_of(&files.join("stdout.log")) & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(common::mode_of(&files) & 0o777, 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_spill_bound_a_replay_reports_what_is_lost() {
    let s = TestServer::builder()
        .processes(|p| {
            p.ring_bytes = 16 * 1024;
            p.spill_bytes = 128 * 1024;
        })
        .start()
        .await;
    let data = pseudo_random(1 << 20, 9);
    std::fs::create_dir_all(&s.data).unwrap();
    std::fs::write(s.path("big.bin"), &data).unwrap();
    let mut c = s.processes();
    let id = start(&mut c, "cat big.bin").await;
    let info = wait(&mut c, &id).await;
    let first = info.stdout_first_offset;
    assert!(
        first > 0 && first <= (data.len() - 64 * 1024) as u64,
        "first kept offset {first}"
    );
    let seen = attach_all(&mut c, attach_req(&id, 0, 0)).await;
    assert_eq!(seen.lost, vec![(Kind::Stdout as i32, 0, first)]);
    assert!(seen.out == data[first as usize..], "kept part differs");
    // From inside the kept part: no LOST.
    let seen = attach_all(&mut c, attach_req(&id, first + 5, 0)).await;
    assert!(seen.lost.is_empty());
    assert!(seen.out == data[first as usize + 5..]);
    let dir = s.root().join("processes").join(&id);
    let on_disk: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 128 * 1024, "{on_disk} bytes kept on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_the_whole_group_and_wait_reports_them() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    let bg = unique_sleep(300);
    let id = start(&mut c, &format!("sleep {bg} & echo started; wait")).await;
    assert!(wait_running(&bg, Duration::from_secs(10)).await);
    // Not yet: Wait with a timeout returns the running process.
    let w = c
        .wait(pb::WaitRequest {
            id: id.clone(),
            timeout_ms: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!w.exited);
    assert_eq!(w.info.unwrap().state, pb::State::Running as i32);
    for bad in [0, -3, 65] {
        expect_code(
            c.signal(pb::SignalRequest {
                id: id.clone(),
                signal: bad,
            })
            .await,
            Code::InvalidArgument,
        );
    }
    c.signal(pb::SignalRequest {
        id: id.clone(),
        signal: 15,
    })
    .await
    .unwrap();
    let info = wait(&mut c, &id).await;
    assert_eq!(info.state, pb::State::Signaled as i32);
    assert_eq!(info.signal, 15);
    assert_eq!(info.exit_code, 143);
    assert!(!info.timed_out);
    let left = wait_gone(&bg, Duration::from_secs(5)).await;
    kill_leftovers(&bg);
    assert!(left.is_empty(), "the background sleep survived: {left:?}");
    // A signal to an ended process is refused rather than sent to whatever has its pid now.
    expect_code(
        c.signal(pb::SignalRequest { id, signal: 9 }).await,
        Code::FailedPrecondition,
    );
}

/// Clock ticks per second of `/proc/PID/stat`'s utime and stime.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(t > 0, "sysconf(_SC_CLK_TCK) failed");
    t as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_reports_cpu_time_and_peak_memory() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    // The shell burns CPU in builtins (no children), then prints its own utime and stime as
    // the kernel counts them, just before it exits: what wait reports must match that, give
    // or take the exit itself. A second run as a reference would differ under load.
    let burn = "i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done; \
                set -- $(cat /proc/$$/stat); echo ${14} ${15}; exit 3";
    let id = start(&mut c, burn).await;
    let info = wait(&mut c, &id).await;
    assert_eq!(info.exit_code, 3);
    assert_eq!(info.state, pb::State::Exited as i32);
    let seen = attach_all(&mut c, attach_req(&id, 0, 0)).await;
    let text = String::from_utf8_lossy(&seen.out);
    let own: f64 = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().expect("ticks"))
        .sum::<f64>()
        / clock_ticks();
    let u = info.usage.expect("usage");
    let ours = (u.user_cpu_micros + u.system_cpu_micros) as f64 / 1e6;
    eprintln!("cpu: process service {ours:.3} s, the shell's own count {own:.3} s");
    assert!(own > 0.2, "the burn used too little cpu: {own} s");
    // Ticks are whole (10 ms each at 100 Hz), and cat's fork and the exit cost a little more.
    assert!(
        ours >= own - 0.011 && ours <= own * 1.1 + 0.05,
        "cpu {ours:.3} s does not match the shell's own {own:.3} s"
    );
    // A process that touches 64 MiB (dd's buffer) peaks at least there.
    let id = start(
        &mut c,
        "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null",
    )
    .await;
    let info = wait(&mut c, &id).await;
    let rss = info.usage.expect("usage").max_rss_bytes;
    assert!(rss >= 64 << 20, "max rss {rss}");
    assert!(rss < 1 << 30, "max rss {rss}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pty_process_sees_its_size_and_resizes() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    let r = c
        .start(pb::StartRequest {
            command: "stty size; read x; stty size".into(),
            pty: true,
            cols: 100,
            rows: 30,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = r.id;
    let mut st = c.attach(attach_req(&id, 0, 0)).await.unwrap().into_inner();
    let mut seen = Seen::from(0, 0);
    let until = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen.out).contains("30 100") {
        assert!(
            Instant::now() < until,
            "no size: {:?}",
            String::from_utf8_lossy(&seen.out)
        );
        seen.take(st.next().await.unwrap().unwrap());
    }
    c.resize(pb::ResizeRequest {
        id: id.clone(),
        cols: 120,
        rows: 40,
    })
    .await
    .unwrap();
    expect_code(
        c.resize(pb::ResizeRequest {
            id: id.clone(),
            cols: 0,
            rows: 40,
        })
        .await,
        Code::InvalidArgument,
    );
    c.write_stdin(pb::WriteStdinRequest {
        id: id.clone(),
        data: "\n".into(),
    })
    .await
    .unwrap();
    while let Some(m) = st.next().await {
        seen.take(m.unwrap());
    }
    let text = String::from_utf8_lossy(&seen.out).into_owned();
    assert!(text.contains("40 120"), "{text:?}");
    let (kind, info) = seen.last.expect("exit");
    assert_eq!(kind, Kind::Exit);
    assert_eq!(info.exit_code, 0);
    assert!(info.pty);
    assert_eq!(info.stderr_bytes, 0, "one stream on a terminal");
    // Ended: Resize is refused.
    expect_code(
        c.resize(pb::ResizeRequest {
            id,
            cols: 80,
            rows: 24,
        })
        .await,
        Code::FailedPrecondition,
    );
}

/// On a terminal, `CloseStdin` types end-of-file: a `cat` reading the terminal ends, with the
/// line it was given echoed and printed, and later input is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stdin_on_a_terminal_types_end_of_file() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    let id = c
        .start(pb::StartRequest {
            command: "cat; echo cat-ended".into(),
            pty: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    c.write_stdin(pb::WriteStdinRequest {
        id: id.clone(),
        data: "typed line\n".into(),
    })
    .await
    .unwrap();
    c.close_stdin(pb::CloseStdinRequest { id: id.clone() })
        .await
        .unwrap();
    expect_code(
        c.write_stdin(pb::WriteStdinRequest {
            id: id.clone(),
            data: "late\n".into(),
        })
        .await,
        Code::FailedPrecondition,
    );
    let info = tokio::time::timeout(Duration::from_secs(10), wait(&mut c, &id))
        .await
        .expect("cat did not end after CloseStdin on its terminal");
    assert_eq!(info.exit_code, 0);
    let seen = attach_all(&mut c, attach_req(&id, 0, 0)).await;
    let text = String::from_utf8_lossy(&seen.out).into_owned();
    // Once as the terminal's echo, once as cat's output; then the line after cat.
    assert_eq!(text.matches("typed line").count(), 2, "{text:?}");
    assert!(text.contains("cat-ended"), "{text:?}");
    assert!(!text.contains("late"), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_requests_and_state_errors() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    let r = c
        .start(pb::StartRequest {
            command: "cat; echo end".into(),
            stdin: "first ".into(),
            tag: "stdin-test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = r.id;
    assert!(r.pid > 0);
    c.write_stdin(pb::WriteStdinRequest {
        id: id.clone(),
        data: "second".into(),
    })
    .await
    .unwrap();
    // Resize of a piped process, Remove of a live one: refused.
    expect_code(
        c.resize(pb::ResizeRequest {
            id: id.clone(),
            cols: 80,
            rows: 24,
        })
        .await,
        Code::FailedPrecondition,
    );
    expect_code(
        c.remove(pb::RemoveRequest { id: id.clone() }).await,
        Code::FailedPrecondition,
    );
    c.close_stdin(pb::CloseStdinRequest { id: id.clone() })
        .await
        .unwrap();
    let st = expect_code(
        c.write_stdin(pb::WriteStdinRequest {
            id: id.clone(),
            data: "late".into(),
        })
        .await,
        Code::FailedPrecondition,
    );
    // `cat` may already have ended after its stdin closed: either refusal says why.
    assert!(
        st.message().contains("closed") || st.message().contains("has ended"),
        "{}",
        st.message()
    );
    let info = wait(&mut c, &id).await;
    assert_eq!(info.exit_code, 0);
    assert_eq!(info.tag, "stdin-test");
    let seen = attach_all(&mut c, attach_req(&id, 0, 0)).await;
    assert_eq!(seen.out, b"first secondend\n");
    expect_code(
        c.write_stdin(pb::WriteStdinRequest {
            id: id.clone(),
            data: "x".into(),
        })
        .await,
        Code::FailedPrecondition,
    );
    // List filters by tag.
    start(&mut c, "true").await;
    let tagged = c
        .list(pb::ListRequest {
            tag: "stdin-test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tagged.processes.len(), 1);
    assert_eq!(tagged.processes[0].command, "cat; echo end");
    // Remove forgets it and its files.
    c.remove(pb::RemoveRequest { id: id.clone() })
        .await
        .unwrap();
    assert!(!s.root().join("processes").join(&id).exists());
    expect_code(
        c.wait(pb::WaitRequest { id, timeout_ms: 0 }).await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_validates_like_exec() {
    let s = TestServer::start().await;
    std::fs::create_dir_all(&s.data).unwrap();
    let mut c = s.processes();
    let long_tag = "t".repeat(129);
    let cases: Vec<(pb::StartRequest, &str)> = vec![
        (start_req("  "), "command is empty"),
        (start_req("echo a\0b"), "NUL"),
        (
            pb::StartRequest {
                env: vec!["NOEQUALS".into()],
                ..start_req("true")
            },
            "KEY=VALUE",
        ),
        (
            pb::StartRequest {
                work_dir: "missing/dir".into(),
                ..start_req("true")
            },
            "does not exist",
        ),
        (
            pb::StartRequest {
                tag: long_tag,
                ..start_req("true")
            },
            "tag is 129 bytes",
        ),
    ];
    for (req, msg) in cases {
        let st = expect_code(c.start(req).await, Code::InvalidArgument);
        assert!(st.message().contains(msg), "{}", st.message());
    }
    // Env, work dir and a 128-byte tag are fine.
    std::fs::create_dir_all(s.path("sub")).unwrap();
    let id = c
        .start(pb::StartRequest {
            env: vec!["GREETING=hi there".into()],
            work_dir: "sub".into(),
            tag: "t".repeat(128),
            ..start_req("echo \"$GREETING\"; pwd")
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    wait(&mut c, &id).await;
    let seen = attach_all(&mut c, attach_req(&id, 0, 0)).await;
    let want = format!("hi there\n{}\n", s.path("sub").display());
    assert_eq!(String::from_utf8_lossy(&seen.out), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_dir_that_cannot_be_made_fails_start_clearly() {
    let b = TestServer::builder();
    let blocker = b.root().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let dir = blocker.join("processes");
    let s = b.processes(|p| p.dir = dir).start().await;
    std::fs::create_dir_all(&s.data).unwrap();
    let mut c = s.processes();
    let st = expect_code(c.start(start_req("true")).await, Code::FailedPrecondition);
    assert!(
        st.message().contains("process directory"),
        "{}",
        st.message()
    );
    assert!(c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .processes
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_limit_is_refused_and_finished_processes_age_out() {
    let s = TestServer::builder()
        .processes(|p| {
            p.max_live = 2;
            p.max_kept = 2;
            p.retention = Duration::from_secs(2);
        })
        .start()
        .await;
    std::fs::create_dir_all(&s.data).unwrap();
    let mut c = s.processes();
    let marker = unique_sleep(300);
    let a = start(&mut c, &format!("sleep {marker}")).await;
    let b = start(&mut c, &format!("sleep {marker}")).await;
    let st = expect_code(c.start(start_req("true")).await, Code::ResourceExhausted);
    assert_eq!(
        st.message(),
        "too many live processes (2); wait for one or signal it"
    );
    for id in [&a, &b] {
        c.signal(pb::SignalRequest {
            id: id.clone(),
            signal: 9,
        })
        .await
        .unwrap();
        wait(&mut c, id).await;
    }
    kill_leftovers(&marker);
    // Two slots again; finished ones beyond two go, oldest first, with their files.
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = start(&mut c, &format!("echo {i}")).await;
        wait(&mut c, &id).await;
        ids.push(id);
    }
    let listed: Vec<String> = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .processes
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(
        listed,
        ids[1..].to_vec(),
        "the two newest finished are kept"
    );
    let root = s.root().join("processes");
    for id in [&a, &b, &ids[0]] {
        assert!(!root.join(id).exists(), "{id}'s files are left");
        expect_code(
            c.wait(pb::WaitRequest {
                id: id.clone(),
                timeout_ms: 0,
            })
            .await,
            Code::NotFound,
        );
    }
    assert!(root.join(&ids[2]).exists());
    // Past the retention, the rest go too.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let left = c
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(left.processes.is_empty(), "{:?}", left.processes);
    assert_eq!(common::names_in(&root), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_kills_the_group_and_says_so() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    let marker = unique_sleep(300);
    let t0 = Instant::now();
    let id = c
        .start(pb::StartRequest {
            timeout_seconds: 1,
            ..start_req(&format!("sleep {marker} & sleep {marker}"))
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let info = wait(&mut c, &id).await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(info.timed_out);
    assert_eq!(info.signal, 9);
    assert_eq!(info.exit_code, 137);
    let left = wait_gone(&marker, Duration::from_secs(5)).await;
    kill_leftovers(&marker);
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_live_processes() {
    let s = TestServer::start().await;
    let mut c = s.processes();
    let marker = unique_sleep(300);
    start(&mut c, &format!("sleep {marker}")).await;
    assert!(wait_running(&marker, Duration::from_secs(10)).await);
    s.stop().await.unwrap();
    let left = wait_gone(&marker, Duration::from_secs(10)).await;
    kill_leftovers(&marker);
    assert!(left.is_empty(), "{left:?}");
    assert!(pids_matching(&marker).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_carries_resource_usage_in_both_protocols() {
    use memoh_proto::pb::bridgepb as bp;
    let s = TestServer::start().await;
    std::fs::create_dir_all(&s.data).unwrap();
    let t = run_exec(
        &s.client,
        exec_input("dd if=/dev/zero of=/dev/null bs=32M count=1 2>/dev/null; exit 4"),
    )
    .await;
    assert_eq!(t.exit_code(), 4);
    let mut raw = s.raw();
    let mut out = raw
        .exec(tokio_stream::iter(vec![exec_input(
            "dd if=/dev/zero of=/dev/null bs=32M count=1 2>/dev/null",
        )]))
        .await
        .unwrap()
        .into_inner();
    let mut usage = None;
    while let Some(m) = out.next().await {
        let m = m.unwrap();
        if m.stream == memoh_proto::pb::mcpcontainer::exec_output::Stream::Exit as i32 {
            usage = m.resource_usage;
        }
    }
    let u = usage.expect("mcpcontainer EXIT carries resource_usage");
    assert!(u.max_rss_bytes >= 32 << 20, "{u:?}");
    // The bridge protocol, pipe and PTY.
    for pty in [false, true] {
        let mut b = s.bridge();
        let first = bp::ExecInput {
            command: "dd if=/dev/zero of=/dev/null bs=32M count=1 2>/dev/null".into(),
            pty,
            ..Default::default()
        };
        let mut out = b
            .exec(tokio_stream::iter(vec![first]))
            .await
            .unwrap()
            .into_inner();
        let mut usage = None;
        while let Some(m) = out.next().await {
            let m = m.unwrap();
            if m.stream == bp::exec_output::Stream::Exit as i32 {
                usage = m.resource_usage;
            }
        }
        let u = usage.unwrap_or_else(|| panic!("bridge EXIT (pty {pty}) carries resource_usage"));
        assert!(u.max_rss_bytes >= 32 << 20, "pty {pty}: {u:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_runs_files_go_at_start_and_from_end_skips_the_past() {
    let b = TestServer::builder();
    let root = b.root().join("processes");
    std::fs::create_dir_all(root.join("0123456789ab")).unwrap();
    std::fs::write(root.join("0123456789ab/stdout.log"), b"old run").unwrap();
    std::fs::write(root.join("not-an-id.txt"), b"someone else's").unwrap();
    let s = b.start().await;
    std::fs::create_dir_all(&s.data).unwrap();
    let mut c = s.processes();
    // Answering means started, and the leftovers were cleared before serving.
    c.list(pb::ListRequest::default()).await.unwrap();
    assert!(
        !root.join("0123456789ab").exists(),
        "an old run's files are left"
    );
    assert!(
        root.join("not-an-id.txt").exists(),
        "only id-shaped entries are removed"
    );
    let id = start(&mut c, "echo old; read x; echo new").await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let l = c
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner();
        if l.processes
            .iter()
            .any(|p| p.id == id && p.stdout_bytes == 4)
        {
            break;
        }
        assert!(Instant::now() < until, "no first line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut st = c
        .attach(pb::AttachRequest {
            id: id.clone(),
            from_end: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    c.write_stdin(pb::WriteStdinRequest {
        id: id.clone(),
        data: "\n".into(),
    })
    .await
    .unwrap();
    let mut seen = Seen::from(4, 0);
    while let Some(m) = st.next().await {
        seen.take(m.unwrap());
    }
    assert_eq!(seen.out, b"new\n");
    assert_eq!(seen.last_kind(), Some(Kind::Exit));
}
