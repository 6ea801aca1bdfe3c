//! In-process tests of `bridgepb.ContainerService` (WIRE-BRIDGE.md) served beside
//! `mcpcontainer.ContainerService` by one server on two listeners (TCP and a unix socket):
//! every served RPC, every RPC and field answered UNIMPLEMENTED, health and reflection. The
//! bridge's own file behaviour is in `server_bridge_files.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bp::container_service_client::ContainerServiceClient as BridgeClient;
use bytes::Bytes;
use container_server::{Config, Listener};
use memoh_proto::client::unix_channel;
use memoh_proto::pb::bridgepb as bp;
use memoh_proto::pb::mcpcontainer as mp;
use mp::container_service_client::ContainerServiceClient as McpClient;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

struct Both {
    _root: tempfile::TempDir,
    data: PathBuf,
    bridge: BridgeClient<Channel>,
    mcp: McpClient<Channel>,
    unix: Channel,
    _stop: oneshot::Sender<()>,
}

/// One server, a TCP listener and a unix socket: `bridge` talks over the socket, `mcp` over TCP.
async fn start() -> Both {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let sock = root.path().join("bridge.sock");
    let unix = tokio::net::UnixListener::bind(&sock).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let mut config = Config::new(&data);
    config.template_dir = root.path().join("no-template");
    config.processes.dir = root.path().join("processes");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(container_server::run_all(
        vec![Listener::Tcp(tcp), Listener::Unix(unix)],
        config,
        async move {
            let _ = rx.await;
        },
    ));
    let unix = unix_channel(&sock);
    let tcp = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let both = Both {
        data,
        bridge: BridgeClient::new(unix.clone()),
        mcp: McpClient::new(tcp),
        unix,
        _root: root,
        _stop: tx,
    };
    for _ in 0..100 {
        if both.data.is_dir() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    both
}

fn p(data: &Path, rel: &str) -> String {
    data.join(rel).to_string_lossy().into_owned()
}

async fn exec(
    c: &mut BridgeClient<Channel>,
    first: bp::ExecInput,
    more: Vec<bp::ExecInput>,
) -> Result<(Vec<u8>, Vec<u8>, i32), tonic::Status> {
    let msgs: Vec<bp::ExecInput> = std::iter::once(first).chain(more).collect();
    let mut out = c.exec(futures::stream::iter(msgs)).await?.into_inner();
    let (mut so, mut se, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(m) = out.message().await? {
        match m.stream() {
            bp::exec_output::Stream::Stdout => so.extend_from_slice(&m.data),
            bp::exec_output::Stream::Stderr => se.extend_from_slice(&m.data),
            bp::exec_output::Stream::Exit => code = Some(m.exit_code),
        }
    }
    Ok((so, se, code.expect("an EXIT message")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_bridge_rpc_beside_mcpcontainer() {
    let mut s = start().await;
    let (b, data) = (&mut s.bridge, s.data.clone());

    b.write_file(bp::WriteFileRequest {
        path: "notes/a.txt".into(),
        content: Bytes::from_static(b"one\ntwo\n"),
    })
    .await
    .unwrap();
    let r = b
        .read_file(bp::ReadFileRequest {
            path: "notes/a.txt".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.total_lines, 2);
    // Bridge callers get raw lines (tests/server_bridge_files.rs has the details).
    assert_eq!(r.content, "one\ntwo\n");
    // The same file through the old name, on the other listener: numbered as it was.
    let m = s
        .mcp
        .read_file(mp::ReadFileRequest {
            path: "notes/a.txt".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.content, "     1\tone\n     2\ttwo\n");

    let st = b
        .stat(bp::StatRequest {
            path: "notes/a.txt".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!((st.path.as_str(), st.size, st.is_dir), ("a.txt", 8, false));
    assert_eq!(st.summary, "");

    b.mkdir(bp::MkdirRequest {
        path: "notes/sub/deeper".into(),
    })
    .await
    .unwrap();
    for i in 0..5 {
        b.write_file(bp::WriteFileRequest {
            path: format!("notes/sub/f{i}"),
            content: Bytes::from_static(b"x"),
        })
        .await
        .unwrap();
    }
    let l = b
        .list_dir(bp::ListDirRequest {
            path: "notes/sub".into(),
            offset: 1,
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = l.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["f0", "f1"]);
    assert_eq!((l.total_count, l.truncated), (6, true));
    let rec = b
        .list_dir(bp::ListDirRequest {
            path: "notes".into(),
            recursive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = rec.entries.iter().map(|e| e.path.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "recursive listing sorted by path");
    assert_eq!((rec.total_count, rec.truncated), (8, false));
    let e = b
        .list_dir(bp::ListDirRequest {
            path: "notes/sub".into(),
            max_entries: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("max_entries"), "{}", e.message());

    b.rename(bp::RenameRequest {
        old_path: "notes/a.txt".into(),
        new_path: "moved/b.txt".into(),
    })
    .await
    .unwrap();
    assert!(data.join("moved/b.txt").is_file());

    let chunks = vec![
        bp::WriteRawChunk {
            path: p(&data, "raw.bin"),
            data: Bytes::from(vec![7u8; 100_000]),
            abort: false,
        },
        bp::WriteRawChunk {
            data: Bytes::from(vec![8u8; 50]),
            ..Default::default()
        },
    ];
    let w = b
        .write_raw(futures::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.bytes_written, 100_050);
    let mut rr = b
        .read_raw(bp::ReadRawRequest {
            path: "raw.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(c) = rr.message().await.unwrap() {
        assert!(c.data.len() <= 64 * 1024);
        got.extend_from_slice(&c.data);
    }
    assert_eq!(got.len(), 100_050);
    assert_eq!(got[100_049], 8);

    // `abort` in a later chunk: ABORTED, nothing lands.
    let chunks = vec![
        bp::WriteRawChunk {
            path: "aborted.bin".into(),
            data: Bytes::from_static(b"partial"),
            abort: false,
        },
        bp::WriteRawChunk {
            abort: true,
            ..Default::default()
        },
    ];
    let e = b
        .write_raw(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    assert!(!data.join("aborted.bin").exists());
    let e = b
        .write_raw(futures::stream::iter(Vec::<bp::WriteRawChunk>::new()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let (so, se, code) = exec(
        b,
        bp::ExecInput {
            command: "cat; echo err >&2; exit 3".into(),
            stdin_data: Bytes::from_static(b"first "),
            env: vec!["X=1".into()],
            // Ignored outside PTY mode.
            resize: Some(bp::TerminalResize { cols: 10, rows: 5 }),
            ..Default::default()
        },
        vec![bp::ExecInput {
            stdin_data: Bytes::from_static(b"second"),
            ..Default::default()
        }],
    )
    .await
    .unwrap();
    assert_eq!(
        (so.as_slice(), se.as_slice(), code),
        (&b"first second"[..], &b"err\n"[..], 3)
    );
    let e = exec(b, bp::ExecInput::default(), vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    b.delete_file(bp::DeleteFileRequest {
        path: "notes".into(),
        recursive: true,
    })
    .await
    .unwrap();
    assert!(!data.join("notes").exists());
    let e = b
        .stat(bp::StatRequest {
            path: "notes".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

fn unimplemented_naming(r: Result<impl std::fmt::Debug, tonic::Status>, name: &str) {
    let e = r.expect_err(name);
    assert_eq!(e.code(), Code::Unimplemented, "{name}: {e:?}");
    assert!(e.message().contains(name), "{name}: {}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_built_answers_unimplemented_by_name() {
    let mut s = start().await;
    let b = &mut s.bridge;
    unimplemented_naming(
        b.terminal(futures::stream::iter(Vec::<bp::TerminalClient>::new()))
            .await,
        "Terminal",
    );
    unimplemented_naming(
        b.watch_dir(bp::WatchDirRequest { path: "/".into() }).await,
        "WatchDir",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_list_both_services() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let s = start().await;
    let mut h = HealthClient::new(s.unix.clone());
    for name in [
        "bridgepb.ContainerService",
        "mcpcontainer.ContainerService",
        "",
    ] {
        let r = h
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 1, "{name} serving");
    }
    let mut c = ServerReflectionClient::new(s.unix.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut out = c
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        out.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["bridgepb.ContainerService", "mcpcontainer.ContainerService"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
}
