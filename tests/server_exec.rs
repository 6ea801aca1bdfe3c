//! In-process tests of Exec against the real server: output streams, exit codes, stdin,
//! work dirs and environment, timeouts and cancellation killing whole process groups, and
//! large outputs arriving complete and in order.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    exec_input, expect_code, kill_leftovers, pids_matching, run_exec, unique_sleep, wait_gone,
    wait_running, TestServer, Transcript,
};
use memoh_proto::pb::mcpcontainer as pb;
use pb::exec_output::Stream as Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_streams() {
    let s = TestServer::start().await;
    // (command, stdout, stderr, exit code)
    let cases: &[(&str, &str, &str, i32)] = &[
        ("true", "", "", 0),
        ("false", "", "", 1),
        ("exit 3", "", "", 3),
        ("echo out; echo err >&2; exit 42", "out\n", "err\n", 42),
        ("printf 'a'; printf 'b' >&2; printf 'c'", "ac", "b", 0),
        ("exit 255", "", "", 255),
        ("kill -9 $$", "", "", -1),
        ("kill -TERM $$", "", "", -1),
        ("echo before; kill -KILL $$; echo after", "before\n", "", -1),
    ];
    for (cmd, out, err, code) in cases {
        let t = run_exec(&s.client, exec_input(cmd)).await;
        assert_eq!(t.exit_code(), *code, "{cmd}");
        assert_eq!(t.stdout(), *out, "{cmd}");
        assert_eq!(t.stderr(), *err, "{cmd}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_not_found_is_127_with_a_message() {
    let s = TestServer::start().await;
    let t = run_exec(&s.client, exec_input("no_such_command_x7q")).await;
    assert_eq!(t.exit_code(), 127);
    assert!(t.stdout().is_empty());
    let err = t.stderr();
    assert!(err.contains("no_such_command_x7q"), "{err}");
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_and_work_dirs() {
    let s = TestServer::start().await;
    s.client.mkdir("sub/inner").await.unwrap();
    let data = std::fs::canonicalize(&s.data).unwrap();
    let data = data.to_str().unwrap();

    // Env entries are added to the server's own environment.
    let mut input = exec_input("printf '%s|%s|%s' \"$FOO\" \"$EMPTY\" \"$WITH_EQ\"");
    input.env = vec!["FOO=bar baz".into(), "EMPTY=".into(), "WITH_EQ=a=b".into()];
    let t = run_exec(&s.client, input).await;
    assert_eq!(t.exit_code(), 0);
    assert_eq!(t.stdout(), "bar baz||a=b");
    let path = std::env::var("PATH").unwrap_or_default();
    let mut input = exec_input("printf %s \"$PATH\"");
    input.env = vec!["OTHER=1".into()];
    let t = run_exec(&s.client, input).await;
    assert_eq!(t.stdout(), path, "the server's environment is kept");

    // (work_dir, expected physical cwd)
    let root = std::fs::canonicalize(s.root()).unwrap();
    let cases = [
        (String::new(), data.to_string()),
        ("sub".to_string(), format!("{data}/sub")),
        ("sub/inner/..".to_string(), format!("{data}/sub")),
        ("./sub/inner".to_string(), format!("{data}/sub/inner")),
        (
            root.to_str().unwrap().to_string(),
            root.to_str().unwrap().to_string(),
        ),
        ("/".to_string(), "/".to_string()),
    ];
    for (wd, want) in cases {
        let mut input = exec_input("pwd -P");
        input.work_dir = wd.clone();
        let t = run_exec(&s.client, input).await;
        assert_eq!(t.exit_code(), 0, "{wd:?}");
        assert_eq!(t.stdout(), format!("{want}\n"), "work_dir {wd:?}");
    }

    // A relative file written by the command lands in the data dir.
    let t = run_exec(&s.client, exec_input("echo made > made.txt")).await;
    assert_eq!(t.exit_code(), 0);
    assert_eq!(std::fs::read(s.path("made.txt")).unwrap(), b"made\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_exec_requests() {
    let s = TestServer::start().await;
    s.client.write_file("plain", &b"x"[..]).await.unwrap();
    let long = "d".repeat(4097);
    let with = |cmd: &str, wd: &str| pb::ExecInput {
        command: cmd.into(),
        work_dir: wd.into(),
        ..Default::default()
    };
    let cases = [
        ("empty command", with("", "")),
        ("blank command", with("   ", "")),
        ("missing work dir", with("true", "no/such/dir")),
        ("work dir is a file", with("true", "plain")),
        ("work dir with NUL", with("true", "a\0b")),
        ("overlong work dir", with("true", &long)),
    ];
    for (name, input) in cases {
        let r = s.client.exec(input, futures::stream::empty()).await;
        let st = expect_code(r, Code::InvalidArgument);
        assert!(!st.message().is_empty(), "{name}");
    }
    let r = s
        .client
        .exec(with("true", "no/such/dir"), futures::stream::empty())
        .await;
    let st = expect_code(r, Code::InvalidArgument);
    assert!(st.message().contains("no/such/dir"), "{}", st.message());

    // A stream the client closes before sending a first message.
    let mut raw = s.raw();
    let r = raw.exec(futures::stream::empty::<pb::ExecInput>()).await;
    expect_code(r, Code::InvalidArgument);

    // The server keeps serving.
    let t = run_exec(&s.client, exec_input("echo alive")).await;
    assert_eq!((t.exit_code(), t.stdout().as_str()), (0, "alive\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_first_message_later_messages_and_half_close() {
    let s = TestServer::start().await;
    // stdin_data of the first message is delivered, then the half-close ends `cat`.
    let mut input = exec_input("cat");
    input.stdin_data = Bytes::from_static(b"from the first message\n");
    let t = run_exec(&s.client, input).await;
    assert_eq!(t.exit_code(), 0);
    assert_eq!(t.stdout(), "from the first message\n");

    // First message plus later messages, in order, then EOF.
    let mut input = exec_input("cat; echo EOF-seen");
    input.stdin_data = Bytes::from_static(b"one,");
    let later = futures::stream::iter(
        ["two,", "three"]
            .into_iter()
            .map(|s| Bytes::from_static(s.as_bytes())),
    );
    let mut out = s.client.exec(input, later).await.unwrap();
    let t = Transcript::read(&mut out).await;
    assert_eq!(t.exit_code(), 0);
    assert_eq!(t.stdout(), "one,two,threeEOF-seen\n");

    // Interactive: each line is answered before the next is sent; closing stdin ends it.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let input = exec_input("while read -r l; do echo \"got:$l\"; done; echo done; exit 7");
    let mut out = s.client.exec(input, ReceiverStream::new(rx)).await.unwrap();
    for word in ["alpha", "beta", "gamma"] {
        tx.send(Bytes::from(format!("{word}\n"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), out.message())
            .await
            .expect("an answer before the next line")
            .unwrap()
            .unwrap();
        assert_eq!(m.stream, Kind::Stdout as i32);
        assert_eq!(&m.data[..], format!("got:{word}\n").as_bytes());
    }
    drop(tx); // half-close: the child's stdin reaches EOF
    let t = Transcript::read(&mut out).await;
    assert_eq!(t.exit_code(), 7);
    assert_eq!(t.stdout(), "done\n");

    // A child that never reads stdin does not block the stream.
    let mut input = exec_input("echo ignored-stdin");
    input.stdin_data = Bytes::from(vec![b'i'; 1024 * 1024]);
    let t = tokio::time::timeout(Duration::from_secs(10), run_exec(&s.client, input))
        .await
        .expect("finishes");
    assert_eq!(t.exit_code(), 0);
    assert_eq!(t.stdout(), "ignored-stdin\n");

    // Large stdin round-trips intact.
    let big = common::pseudo_random(3 * 1024 * 1024 + 5, 11);
    let chunks: Vec<Bytes> = big.chunks(100_000).map(Bytes::copy_from_slice).collect();
    let mut out = s
        .client
        .exec(exec_input("cat"), futures::stream::iter(chunks))
        .await
        .unwrap();
    let t = Transcript::read(&mut out).await;
    assert_eq!(t.exit_code(), 0);
    let got = t.data(Kind::Stdout);
    assert!(
        got == big,
        "stdin echoed back: {} of {} bytes",
        got.len(),
        big.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_group() {
    let s = TestServer::start().await;
    let marker = unique_sleep(300);
    let mut input = exec_input(&format!("sleep {marker} & echo started"));
    // The deadline comes before the end of the exit's drain grace (EXIT_DRAIN_GRACE, 2 s after
    // the shell's exit): at equal times either could end the call, and only the deadline
    // kills the group.
    input.timeout_seconds = 1;
    let started = Instant::now();
    let mut out = s
        .client
        .exec(input, futures::stream::pending())
        .await
        .unwrap();
    let t = Transcript::read(&mut out).await;
    let took = started.elapsed();
    let code = t.exit_code();
    let left = wait_gone(&marker, Duration::from_secs(2)).await;
    kill_leftovers(&marker);
    assert_eq!(t.stdout(), "started\n");
    assert!(
        took >= Duration::from_millis(900),
        "EXIT came before the deadline: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(2500),
        "EXIT within about a second of the deadline, took {took:?}"
    );
    // The shell itself exited 0 before the deadline; its background child was killed.
    assert!(code == 0 || code == -1, "exit code {code}");
    assert!(left.is_empty(), "background sleep survived: {left:?}");

    // A foreground command killed by the timeout reports -1.
    let marker = unique_sleep(301);
    let mut input = exec_input(&format!("echo go; sleep {marker}; echo never"));
    input.timeout_seconds = 1;
    let started = Instant::now();
    let t = run_exec(&s.client, input).await;
    let took = started.elapsed();
    let left = wait_gone(&marker, Duration::from_secs(2)).await;
    kill_leftovers(&marker);
    assert_eq!(t.exit_code(), -1);
    assert_eq!(t.stdout(), "go\n");
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(2500),
        "{took:?}"
    );
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_timeout_applies_when_none_given() {
    let s = TestServer::builder()
        .default_exec_timeout(Duration::from_secs(1))
        .start()
        .await;
    for timeout_seconds in [0, -5] {
        let marker = unique_sleep(302);
        let mut input = exec_input(&format!("sleep {marker}"));
        input.timeout_seconds = timeout_seconds;
        let started = Instant::now();
        let t = run_exec(&s.client, input).await;
        let took = started.elapsed();
        kill_leftovers(&marker);
        assert_eq!(t.exit_code(), -1, "timeout_seconds {timeout_seconds}");
        assert!(
            took >= Duration::from_millis(900) && took <= Duration::from_millis(2500),
            "timeout_seconds {timeout_seconds}: {took:?}"
        );
    }
    // An explicit timeout wins over the default.
    let mut input = exec_input("sleep 1.5; echo slept");
    input.timeout_seconds = 10;
    let t = run_exec(&s.client, input).await;
    assert_eq!((t.exit_code(), t.stdout().as_str()), (0, "slept\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_kills_the_process_group() {
    let s = TestServer::start().await;
    let fg = unique_sleep(303);
    let bg = unique_sleep(304);
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let input = exec_input(&format!("sleep {bg} & echo started; sleep {fg}"));
    let mut out = s.client.exec(input, ReceiverStream::new(rx)).await.unwrap();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(&first.data[..], b"started\n");
    assert!(wait_running(&fg, Duration::from_secs(5)).await);
    assert!(!pids_matching(&bg).is_empty());
    // Cancel: drop the response stream and the request side (the stdin sender). hyper keeps
    // the HTTP/2 stream open while the request body is still pending, so dropping only the
    // response would not reach the server (see `cancel_by_dropping_only_the_response_stream`).
    drop(out);
    drop(tx);
    let left_fg = wait_gone(&fg, Duration::from_secs(5)).await;
    let left_bg = wait_gone(&bg, Duration::from_secs(1)).await;
    kill_leftovers(&fg);
    kill_leftovers(&bg);
    assert!(left_fg.is_empty(), "foreground sleep survived: {left_fg:?}");
    assert!(left_bg.is_empty(), "background sleep survived: {left_bg:?}");

    // Cancelling a call whose request stream has already ended (half-closed): dropping the
    // response stream alone resets the HTTP/2 stream.
    let marker = unique_sleep(305);
    let mut out = s
        .client
        .exec(
            exec_input(&format!("echo up; sleep {marker}")),
            futures::stream::empty(),
        )
        .await
        .unwrap();
    assert_eq!(&out.message().await.unwrap().unwrap().data[..], b"up\n");
    assert!(wait_running(&marker, Duration::from_secs(5)).await);
    drop(out);
    let left = wait_gone(&marker, Duration::from_secs(5)).await;
    kill_leftovers(&marker);
    assert!(left.is_empty(), "{left:?}");

    // Aborting the task that owns the whole call (response and stdin channel) cancels too.
    let marker = unique_sleep(306);
    let c = s.client.clone();
    let cmd = format!("sleep {marker}");
    let task = tokio::spawn(async move {
        let (_tx, rx) = mpsc::channel::<Bytes>(1);
        let mut out = c
            .exec(exec_input(&cmd), ReceiverStream::new(rx))
            .await
            .unwrap();
        out.message().await
    });
    assert!(wait_running(&marker, Duration::from_secs(5)).await);
    task.abort();
    let left = wait_gone(&marker, Duration::from_secs(5)).await;
    kill_leftovers(&marker);
    assert!(left.is_empty(), "{left:?}");

    // The server is still fine.
    let t = run_exec(&s.client, exec_input("echo ok")).await;
    assert_eq!(t.stdout(), "ok\n");
}

/// Runs `cmd` locally for the expected bytes.
fn local(cmd: &str) -> Vec<u8> {
    let o = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    assert!(o.status.success());
    o.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_of_stdout_complete_and_in_order() {
    let s = TestServer::start().await;
    // 6.7 million numbered lines: 52 488 888 bytes (> 50 MiB), order-checkable.
    let want_out = local("seq 1 6700000");
    let want_err = local("seq 1 1000000");
    assert!(want_out.len() > 50 * 1024 * 1024);
    let started = Instant::now();
    let t = run_exec(
        &s.client,
        exec_input("seq 1 1000000 >&2 & seq 1 6700000; wait"),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(t.exit_code(), 0);
    let out = t.data(Kind::Stdout);
    let err = t.data(Kind::Stderr);
    assert!(
        out == want_out,
        "stdout: {} bytes, expected {}",
        out.len(),
        want_out.len()
    );
    assert!(
        err == want_err,
        "stderr: {} bytes, expected {}",
        err.len(),
        want_err.len()
    );
    assert!(
        t.messages
            .iter()
            .all(|(k, d, _)| *k == Kind::Exit || !d.is_empty()),
        "no empty data messages"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_execs() {
    let s = TestServer::start().await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let c = s.client.clone();
            tokio::spawn(async move {
                let t = run_exec(
                    &c,
                    exec_input(&format!("echo {i}; echo e{i} >&2; exit {i}")),
                )
                .await;
                assert_eq!(t.exit_code(), i);
                assert_eq!(t.stdout(), format!("{i}\n"));
                assert_eq!(t.stderr(), format!("e{i}\n"));
            })
        })
        .collect();
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
    // exec_collect of the typed client agrees.
    let r = s
        .client
        .exec_collect("printf x; exit 4", "", 5)
        .await
        .unwrap();
    assert_eq!((r.stdout, r.exit_code), (b"x".to_vec(), 4));
}

/// What a caller expects from "drop the response stream": the server sees the cancel while
/// the stdin stream is still open (`ExecStream` ends the request side when dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_by_dropping_only_the_response_stream() {
    let s = TestServer::start().await;
    let marker = unique_sleep(307);
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let mut out = s
        .client
        .exec(
            exec_input(&format!("echo up; sleep {marker}")),
            ReceiverStream::new(rx),
        )
        .await
        .unwrap();
    assert_eq!(&out.message().await.unwrap().unwrap().data[..], b"up\n");
    drop(out);
    let left = wait_gone(&marker, Duration::from_secs(3)).await;
    drop(tx);
    kill_leftovers(&marker);
    assert!(left.is_empty(), "the command survived the cancel: {left:?}");
}

/// Many execs on one long-lived connection end every call cleanly. A client that dropped the
/// stream at EXIT reset it (`CANCEL`) while the trailers were in flight; h2 met them on a
/// stream it had forgotten, reset it again and counted that against the connection, which it
/// closed after 1024 such resets, failing a later call with `CANCELLED` (seen once in ~10 000
/// execs through the agent's socket). Here h2 remembers no reset stream and allows no such
/// reset, so the first one closes the connection, and the connector counts a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execs_on_one_connection_end_without_resets() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let s = TestServer::start().await;
    let connections = Arc::new(AtomicUsize::new(0));
    let channel = {
        let (socket, connections) = (s.socket.clone(), connections.clone());
        memoh_proto::client::endpoint(tonic::transport::Uri::from_static("http://localhost"))
            .http2_max_concurrent_reset_streams(0)
            .http2_max_local_error_reset_streams(Some(0))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let socket = socket.clone();
                connections.fetch_add(1, Ordering::SeqCst);
                async move {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
    };
    let client = memoh_proto::ContainerClient::new(channel);
    let mut failed = Vec::new();
    for i in 0..400 {
        match client.exec_collect("true", "", 10).await {
            Ok(r) if r.exit_code == 0 => {}
            Ok(r) => failed.push(format!("exec {i}: exit {}", r.exit_code)),
            Err(e) => failed.push(format!("exec {i}: {:?} {}", e.code(), e.message())),
        }
    }
    // A connection closed after the last call is counted by the next one.
    client
        .exec_collect("true", "", 10)
        .await
        .expect("last exec");
    assert!(
        failed.is_empty(),
        "{} execs failed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the connection was closed and made again"
    );
}
