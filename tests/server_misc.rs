//! In-process tests of everything around the RPCs: bad input on every RPC, the bearer token,
//! health and reflection, template seeding, shutdown, and the other transports (an in-memory
//! `tokio::io::duplex` pipe and TCP).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    exec_input, expect_code, kill_leftovers, run_exec, unique_sleep, wait_gone, wait_running,
    TestServer, Transcript, TOKEN,
};
use container_server::paths::Resolver;
use container_server::reaper::Reaper;
use container_server::service::Service;
use container_server::{Config, Listener};
use hyper_util::rt::TokioIo;
use memoh_proto::pb::mcpcontainer as pb;
use memoh_proto::pb::mcpcontainer::container_service_server::ContainerServiceServer;
use memoh_proto::ContainerClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// Calls every RPC that takes a path with `path` in that field; returns (rpc, result).
async fn every_rpc_with_path(c: &ContainerClient, path: &str) -> Vec<(String, Result<(), Status>)> {
    let mut out: Vec<(String, Result<(), Status>)> = vec![
        ("ReadFile".into(), c.read_file(path, 1, 10).await.map(drop)),
        (
            "WriteFile".into(),
            c.write_file(path, &b"x"[..]).await.map(drop),
        ),
        ("Stat".into(), c.stat(path).await.map(drop)),
        ("Mkdir".into(), c.mkdir(path).await.map(drop)),
        (
            "Rename old_path".into(),
            c.rename(path, "rename-target").await.map(drop),
        ),
        (
            "Rename new_path".into(),
            c.rename("exists.txt", path).await.map(drop),
        ),
        ("DeleteFile".into(), c.delete(path, false).await.map(drop)),
        (
            "DeleteFile recursive".into(),
            c.delete(path, true).await.map(drop),
        ),
        ("ReadRaw".into(), c.read_raw(path).await.map(drop)),
        (
            "WriteRaw".into(),
            c.write_raw(path, futures::stream::iter([Bytes::from_static(b"x")]))
                .await
                .map(drop),
        ),
        (
            "Exec work_dir".into(),
            c.exec(
                pb::ExecInput {
                    command: "true".into(),
                    work_dir: path.into(),
                    ..Default::default()
                },
                futures::stream::empty(),
            )
            .await
            .map(drop),
        ),
    ];
    if !path.is_empty() {
        for recursive in [false, true] {
            out.push((
                format!("ListDir recursive={recursive}"),
                c.list_dir(path, recursive).await.map(drop),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_are_invalid_argument_on_every_rpc() {
    let s = TestServer::start().await;
    s.client.write_file("exists.txt", &b"e"[..]).await.unwrap();
    let long = "p".repeat(4097);
    let long_abs = format!("/{}", "q".repeat(4100));
    let bad: [(&str, &str); 5] = [
        ("empty", ""),
        ("overlong", &long),
        ("overlong absolute", &long_abs),
        ("NUL", "a\0b"),
        ("NUL absolute", "/tmp/\0"),
    ];
    for (what, path) in bad {
        let results = every_rpc_with_path(&s.client, path).await;
        assert!(results.len() >= 11);
        for (rpc, r) in results {
            if path.is_empty() && rpc == "Exec work_dir" {
                // An empty work dir means the data dir.
                assert!(r.is_ok(), "{rpc} with an empty work dir: {r:?}");
                continue;
            }
            let st = match r {
                Ok(()) => panic!("{rpc} accepted a {what} path"),
                Err(st) => st,
            };
            assert_eq!(
                st.code(),
                Code::InvalidArgument,
                "{rpc} with a {what} path: {st:?}"
            );
            assert!(!st.message().is_empty(), "{rpc}: a clear message");
            assert!(st.message().len() < 1024, "{rpc}: the message stays short");
        }
    }
    // Nothing was created or removed along the way; the server keeps serving.
    assert_eq!(common::names_in(&s.data), ["exists.txt"]);
    assert_eq!(
        s.client
            .read_file("exists.txt", 0, 0)
            .await
            .unwrap()
            .content,
        "     1\te\n"
    );
    // ListDir with an empty path is the data dir, not an error.
    assert_eq!(s.client.list_dir("", false).await.unwrap().len(), 1);
    assert_eq!(s.client.list_dir("", true).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_summary() {
    // One line per code of WIRE.md / issue 2 that a client maps, each from a real call.
    let s = TestServer::start().await;
    s.client.write_file("full/f", &b"f"[..]).await.unwrap();
    let c = &s.client;
    expect_code(c.stat("missing").await, Code::NotFound);
    expect_code(c.read_file("missing", 0, 0).await, Code::NotFound);
    expect_code(c.list_dir("missing", false).await, Code::NotFound);
    expect_code(c.list_dir("missing", true).await, Code::NotFound);
    expect_code(c.read_raw("missing").await, Code::NotFound);
    expect_code(c.rename("missing", "x").await, Code::NotFound);
    expect_code(c.stat("").await, Code::InvalidArgument);
    expect_code(c.exec_collect("", "", 1).await, Code::InvalidArgument);
    let st = c.delete("full", false).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    // A failure that is neither missing nor bad input: INTERNAL (a read of an unreadable
    // directory entry needs another user; writing below a regular file is one here).
    let st = c.write_file("full/f/below", &b"x"[..]).await.unwrap_err();
    assert!(
        matches!(st.code(), Code::Internal | Code::InvalidArgument),
        "{st:?}"
    );
    assert!(!st.message().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_required_when_configured() {
    let s = TestServer::builder().token(TOKEN).start().await;
    let wrong = s.client_with_token("not-the-token");
    let right = s.client_with_token(TOKEN);
    for (who, c) in [("no token", &s.client), ("wrong token", &wrong)] {
        let results = every_rpc_with_path(c, "some/file").await;
        assert!(results.len() >= 13);
        for (rpc, r) in results {
            let st = r.expect_err(&format!("{rpc} without the right token"));
            assert_eq!(st.code(), Code::Unauthenticated, "{who}: {rpc}: {st:?}");
        }
        expect_code(c.list_dir("", false).await, Code::Unauthenticated);
    }
    // The raw token without "Bearer " is not enough.
    let mut raw = s.raw();
    let mut req = tonic::Request::new(pb::StatRequest { path: "/".into() });
    req.metadata_mut()
        .insert("authorization", TOKEN.parse().unwrap());
    expect_code(raw.stat(req).await, Code::Unauthenticated);
    assert!(!s.path("some").exists(), "nothing ran");

    // The right token opens every RPC.
    right.write_file("ok/file", &b"1\n"[..]).await.unwrap();
    assert_eq!(
        right.read_file("ok/file", 0, 0).await.unwrap().total_lines,
        1
    );
    assert_eq!(right.list_dir("ok", false).await.unwrap().len(), 1);
    assert_eq!(right.stat("ok/file").await.unwrap().size, 2);
    right.mkdir("ok/dir").await.unwrap();
    right.rename("ok/file", "ok/dir/file").await.unwrap();
    let mut stream = right.read_raw("ok/dir/file").await.unwrap();
    assert_eq!(&stream.message().await.unwrap().unwrap().data[..], b"1\n");
    assert_eq!(
        right
            .write_raw("ok/raw", futures::stream::iter([Bytes::from_static(b"r")]))
            .await
            .unwrap(),
        1
    );
    let t = run_exec(&right, exec_input("echo authed")).await;
    assert_eq!((t.exit_code(), t.stdout().as_str()), (0, "authed\n"));
    right.delete("ok", true).await.unwrap();
    assert!(!s.path("ok").exists());

    // Health stays open without a token.
    let mut health = HealthClient::new(s.channel.clone());
    let r = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving() {
    let s = TestServer::start().await;
    let mut health = HealthClient::new(s.channel.clone());
    for service in ["", "mcpcontainer.ContainerService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let st = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
}

async fn reflect(channel: Channel, req: MessageRequest) -> MessageResponse {
    let mut c = ServerReflectionClient::new(channel);
    let msg = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    let mut out = c
        .server_reflection_info(futures::stream::iter([msg]))
        .await
        .unwrap()
        .into_inner();
    out.message()
        .await
        .unwrap()
        .expect("one response")
        .message_response
        .expect("a response body")
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_the_service() {
    let s = TestServer::builder().token(TOKEN).start().await;
    let r = reflect(
        s.channel.clone(),
        MessageRequest::ListServices(String::new()),
    )
    .await;
    let MessageResponse::ListServicesResponse(list) = r else {
        panic!("unexpected reflection answer: {r:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "mcpcontainer.ContainerService"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );

    let r = reflect(
        s.channel.clone(),
        MessageRequest::FileContainingSymbol("mcpcontainer.ContainerService".into()),
    )
    .await;
    let MessageResponse::FileDescriptorResponse(fds) = r else {
        panic!("unexpected reflection answer: {r:?}");
    };
    let all: Vec<u8> = fds.file_descriptor_proto.concat();
    for name in [
        "ContainerService",
        "ReadFile",
        "WriteFile",
        "ListDir",
        "Stat",
        "Mkdir",
        "Rename",
        "Exec",
        "ReadRaw",
        "WriteRaw",
        "DeleteFile",
        "ExecOutput",
        "bytes_written",
        "mcpcontainer",
    ] {
        assert!(contains(&all, name), "descriptor mentions {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_seeds_missing_files_only() {
    let b = TestServer::builder();
    let tpl = b.template_dir();
    std::fs::create_dir_all(tpl.join("subdir")).unwrap();
    std::fs::write(tpl.join("AGENTS.md"), b"template agents\n").unwrap();
    std::fs::write(tpl.join("mine.md"), b"template mine\n").unwrap();
    std::fs::write(tpl.join("subdir/nested.md"), b"nested\n").unwrap();
    std::os::unix::fs::symlink(tpl.join("AGENTS.md"), tpl.join("link.md")).unwrap();
    std::fs::create_dir_all(b.data_dir()).unwrap();
    std::fs::write(b.data_dir().join("mine.md"), b"user's own\n").unwrap();
    let s = b.start().await;

    let names: Vec<String> = s
        .client
        .list_dir("", false)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(names, ["AGENTS.md", "mine.md"], "regular files only");
    assert_eq!(
        s.client.read_file("AGENTS.md", 0, 0).await.unwrap().content,
        "     1\ttemplate agents\n"
    );
    assert_eq!(
        s.client.read_file("mine.md", 0, 0).await.unwrap().content,
        "     1\tuser's own\n",
        "an existing file is never overwritten"
    );
    assert_eq!(common::mode_of(&s.path("AGENTS.md")), 0o644);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_is_created_and_template_may_be_missing() {
    let s = TestServer::start().await;
    assert!(!s.config.template_dir.exists());
    // The first call proves the server is up, so the data dir must exist by now.
    assert!(s.client.list_dir("", false).await.unwrap().is_empty());
    assert!(s.data.is_dir());
    let st = s.client.stat("").await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let d = s.client.stat(".").await.unwrap();
    assert_eq!((d.path.as_str(), d.is_dir), ("data", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_running_exec_after_the_grace() {
    let mut s = TestServer::builder()
        .grace(Duration::from_millis(500))
        .start()
        .await;
    let marker = unique_sleep(1000);
    let mut out = s
        .client
        .exec(
            exec_input(&format!("echo up; sleep {marker}")),
            futures::stream::pending(),
        )
        .await
        .unwrap();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(&first.data[..], b"up\n");
    assert!(wait_running(&marker, Duration::from_secs(5)).await);

    let handle = s.take_handle();
    let started = Instant::now();
    s.trigger_shutdown();
    let t = tokio::time::timeout(Duration::from_secs(10), Transcript::read(&mut out))
        .await
        .expect("the exec call ends after the grace period");
    let call_ended = started.elapsed();
    let r = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("run() returns")
        .unwrap();
    let run_ended = started.elapsed();
    let left = wait_gone(&marker, Duration::from_secs(2)).await;
    kill_leftovers(&marker);
    assert!(r.is_ok(), "run() returns Ok: {r:?}");
    assert!(left.is_empty(), "no process left: {left:?}");
    // Either the EXIT of a killed command (-1) or a transport error ends the call.
    if t.error.is_none() {
        assert_eq!(t.exit_code(), -1);
    }
    assert!(
        call_ended >= Duration::from_millis(400),
        "the grace period is honoured: {call_ended:?}"
    );
    assert!(run_ended <= Duration::from_secs(6), "{run_ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_short_calls_finish_and_refuses_new_ones() {
    let mut s = TestServer::builder()
        .grace(Duration::from_secs(5))
        .start()
        .await;
    let mut out = s
        .client
        .exec(
            exec_input("echo up; sleep 1; echo done"),
            futures::stream::empty(),
        )
        .await
        .unwrap();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(&first.data[..], b"up\n");
    let handle = s.take_handle();
    let started = Instant::now();
    s.trigger_shutdown();
    let t = Transcript::read(&mut out).await;
    assert_eq!(t.exit_code(), 0, "the running call finishes normally");
    assert_eq!(t.stdout(), "done\n");
    let r = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("run() returns")
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "run() returns once the last call is done, not after the whole grace: {:?}",
        started.elapsed()
    );
    // No new calls after shutdown.
    let fresh = ContainerClient::new(memoh_proto::client::unix_channel(&s.socket))
        .unary_deadline(Duration::from_secs(2));
    let st = fresh.stat("/").await.unwrap_err();
    assert!(
        matches!(
            st.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shutdown_is_prompt() {
    let s = TestServer::start().await;
    s.client.stat("/").await.unwrap();
    let started = Instant::now();
    s.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_tcp() {
    let root = tempfile::tempdir().unwrap();
    let mut config = Config::new(root.path().join("data"));
    config.template_dir = root.path().join("none");
    config.processes.dir = root.path().join("processes");
    config.reap_all = false;
    config.shutdown_grace = Duration::from_secs(1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(container_server::run(
        Listener::Tcp(listener),
        config,
        async move {
            let _ = rx.await;
        },
    ));
    let c = ContainerClient::new(memoh_proto::client::tcp_channel(&addr.to_string()).unwrap());
    c.write_file("tcp.txt", &b"over tcp\n"[..]).await.unwrap();
    assert_eq!(
        c.read_file("tcp.txt", 0, 0).await.unwrap().content,
        "     1\tover tcp\n"
    );
    let r = c.exec_collect("cat tcp.txt", "", 5).await.unwrap();
    assert_eq!((r.exit_code, r.stdout), (0, b"over tcp\n".to_vec()));
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The service served over an in-memory `tokio::io::duplex` pipe: no socket at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_an_in_memory_duplex() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let service = Service::new(
        Resolver::new(&data),
        Reaper::start(false).unwrap(),
        CancellationToken::new(),
        Duration::from_secs(30),
    );
    let (client_io, server_io) = tokio::io::duplex(1024 * 1024);
    let server = tokio::spawn(
        Server::builder()
            .add_service(
                ContainerServiceServer::new(service)
                    .max_decoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE),
            )
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server_io))),
    );
    let mut client_io = Some(client_io);
    let channel = Endpoint::try_from("http://in-memory")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let io = client_io.take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the duplex is used once"))
            }
        }))
        .await
        .unwrap();
    let c = ContainerClient::new(channel);

    c.write_file("mem/a.txt", &b"one\ntwo\n"[..]).await.unwrap();
    let r = c.read_file("mem/a.txt", 2, 1).await.unwrap();
    assert_eq!((r.content.as_str(), r.total_lines), ("     2\ttwo\n", 2));
    assert_eq!(
        std::fs::read(data.join("mem/a.txt")).unwrap(),
        b"one\ntwo\n"
    );
    let names: Vec<String> = c
        .list_dir("", true)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(names, ["mem", "mem/a.txt"]);
    let mut input = exec_input("cat; echo; pwd -P; exit 5");
    input.stdin_data = Bytes::from_static(b"piped");
    let t = run_exec(&c, input).await;
    assert_eq!(t.exit_code(), 5);
    let want_pwd = std::fs::canonicalize(&data).unwrap();
    assert_eq!(t.stdout(), format!("piped\n{}\n", want_pwd.display()));
    let big = common::pseudo_random(1024 * 1024 + 9, 3);
    let n = c
        .write_raw("mem/raw", futures::stream::iter([Bytes::from(big.clone())]))
        .await
        .unwrap();
    assert_eq!(n, big.len() as i64);
    let mut stream = c.read_raw("mem/raw").await.unwrap();
    let mut got = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(chunk.data.len() <= 64 * 1024);
        got.extend_from_slice(&chunk.data);
    }
    assert!(got == big);
    expect_code(c.stat("mem/none").await, Code::NotFound);
    expect_code(c.mkdir("").await, Code::InvalidArgument);
    server.abort();
}
