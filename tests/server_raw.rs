//! In-process tests of the streaming transfers ReadRaw and WriteRaw against the real server.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bytes::Bytes;
use common::{expect_code, mode_of, names_in, pseudo_random, TestServer};
use memoh_proto::pb::mcpcontainer as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

async fn read_all(s: &TestServer, path: &str) -> (Vec<u8>, Vec<usize>) {
    let mut stream = s.client.read_raw(path).await.expect("read_raw starts");
    let mut data = Vec::new();
    let mut sizes = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        sizes.push(chunk.data.len());
        data.extend_from_slice(&chunk.data);
    }
    (data, sizes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_raw_is_byte_exact_in_small_chunks() {
    let s = TestServer::start().await;
    std::fs::create_dir_all(&s.data).unwrap();
    for (name, len) in [
        ("empty", 0usize),
        ("one", 1),
        ("exact", 64 * 1024),
        ("plus1", 64 * 1024 + 1),
        ("big", 5 * 1024 * 1024 + 123),
    ] {
        let want = pseudo_random(len, len as u64 + 1);
        std::fs::write(s.path(name), &want).unwrap();
        let (got, sizes) = read_all(&s, name).await;
        assert!(got == want, "{name}: {} of {} bytes", got.len(), want.len());
        assert!(
            sizes.iter().all(|&n| n > 0 && n <= 64 * 1024),
            "{name}: chunk sizes {sizes:?}"
        );
        if len > 0 {
            assert!(sizes.len() >= len.div_ceil(64 * 1024), "{name}");
        }
    }
    // Absolute paths and links work; the content is the target's.
    std::os::unix::fs::symlink(s.path("one"), s.path("link")).unwrap();
    let (got, _) = read_all(&s, s.path("link").to_str().unwrap()).await;
    assert_eq!(got, std::fs::read(s.path("one")).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_raw_errors() {
    let s = TestServer::start().await;
    s.client.mkdir("adir").await.unwrap();
    let st = expect_code(s.client.read_raw("missing.bin").await, Code::NotFound);
    assert!(st.message().contains("missing.bin"), "{}", st.message());
    let err = s
        .client
        .read_raw("adir")
        .await
        .expect_err("reading a directory is an error");
    assert_ne!(err.code(), Code::NotFound);
    assert!(err.message().contains("directory"), "{}", err.message());
    // The server keeps serving.
    s.client.write_file("ok", &b"1"[..]).await.unwrap();
    assert_eq!(read_all(&s, "ok").await.0, b"1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_raw_writes_modes_and_counts() {
    let s = TestServer::start().await;
    let data = pseudo_random(4 * 1024 * 1024 + 777, 99);
    let bufs: Vec<Bytes> = data.chunks(300_000).map(Bytes::copy_from_slice).collect();
    let n = s
        .client
        .write_raw("up/load/file.bin", futures::stream::iter(bufs))
        .await
        .unwrap();
    assert_eq!(n, data.len() as i64, "bytes_written is the total");
    let p = s.path("up/load/file.bin");
    assert!(std::fs::read(&p).unwrap() == data);
    assert_eq!(mode_of(&p), 0o644);
    assert_eq!(mode_of(&s.path("up")), 0o755);
    assert_eq!(mode_of(&s.path("up/load")), 0o755);

    // Overwrite: keeps the permission bits, leaves exactly the new (shorter) bytes.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    let n = s
        .client
        .write_raw(
            "up/load/file.bin",
            futures::stream::iter([Bytes::from_static(b"short")]),
        )
        .await
        .unwrap();
    assert_eq!(n, 5);
    assert_eq!(std::fs::read(&p).unwrap(), b"short");
    assert_eq!(mode_of(&p), 0o640);
    assert_eq!(names_in(&s.path("up/load")), ["file.bin"], "no temp files");

    // A path and no data creates an empty file, and empties an existing one.
    let n = s
        .client
        .write_raw("empty/new", futures::stream::empty())
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(std::fs::read(s.path("empty/new")).unwrap(), b"");
    assert_eq!(mode_of(&s.path("empty/new")), 0o644);
    s.client
        .write_raw("up/load/file.bin", futures::stream::empty())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"");
    assert_eq!(mode_of(&p), 0o640);

    // `sub/../x` is cleaned: no `sub` appears.
    s.client
        .write_raw(
            "sub/../x",
            futures::stream::iter([Bytes::from_static(b"x")]),
        )
        .await
        .unwrap();
    assert!(!s.path("sub").exists());
    assert_eq!(std::fs::read(s.path("x")).unwrap(), b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_raw_path_only_in_the_first_chunk() {
    let s = TestServer::start().await;
    let mut raw = s.raw();
    // Data in the first chunk counts; paths in later chunks are ignored.
    let chunks = vec![
        pb::WriteRawChunk {
            path: "first.txt".into(),
            data: Bytes::from_static(b"AB"),
            abort: false,
        },
        pb::WriteRawChunk {
            path: "other.txt".into(),
            data: Bytes::from_static(b"CD"),
            abort: false,
        },
        pb::WriteRawChunk {
            path: String::new(),
            data: Bytes::from_static(b"EF"),
            abort: false,
        },
    ];
    let r = raw
        .write_raw(futures::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.bytes_written, 6);
    assert_eq!(std::fs::read(s.path("first.txt")).unwrap(), b"ABCDEF");
    assert!(!s.path("other.txt").exists());

    // Missing path in the first chunk (even if a later one has one): INVALID_ARGUMENT.
    let chunks = vec![
        pb::WriteRawChunk {
            path: String::new(),
            data: Bytes::from_static(b"data"),
            abort: false,
        },
        pb::WriteRawChunk {
            path: "late.txt".into(),
            data: Bytes::from_static(b"more"),
            abort: false,
        },
    ];
    let st = expect_code(
        raw.write_raw(futures::stream::iter(chunks)).await,
        Code::InvalidArgument,
    );
    assert!(st.message().contains("path"), "{}", st.message());
    assert!(!s.path("late.txt").exists());
    // A stream closed before its first chunk.
    expect_code(
        raw.write_raw(futures::stream::empty::<pb::WriteRawChunk>())
            .await,
        Code::InvalidArgument,
    );
    // A directory cannot be replaced.
    s.client.mkdir("dir").await.unwrap();
    let err = s
        .client
        .write_raw("dir", futures::stream::iter([Bytes::from_static(b"x")]))
        .await
        .expect_err("writing over a directory");
    assert_ne!(err.code(), Code::Ok);
    assert!(s.path("dir").is_dir());
    let mut names = names_in(&s.data);
    names.sort();
    assert_eq!(names, ["dir", "first.txt"], "no temp files left");
}

/// Starts a WriteRaw of `path` on its own connection and returns the sender of its chunks,
/// the call's task and a trigger that aborts the upload mid-stream with a client-side error:
/// a chunk above the client's encoding limit makes the request body fail, so hyper resets the
/// HTTP/2 stream (RST_STREAM) instead of ending it cleanly.
async fn start_upload(
    s: &TestServer,
    path: &str,
) -> (
    mpsc::Sender<pb::WriteRawChunk>,
    tokio::task::JoinHandle<Result<tonic::Response<pb::WriteRawResponse>, tonic::Status>>,
) {
    let mut raw = s.raw().max_encoding_message_size(1024 * 1024);
    let (tx, rx) = mpsc::channel::<pb::WriteRawChunk>(4);
    let call = tokio::spawn(async move { raw.write_raw(ReceiverStream::new(rx)).await });
    tx.send(pb::WriteRawChunk {
        path: path.into(),
        data: Bytes::from(vec![b'N'; 64 * 1024]),
        abort: false,
    })
    .await
    .unwrap();
    (tx, call)
}

async fn abort_upload(
    tx: mpsc::Sender<pb::WriteRawChunk>,
    call: tokio::task::JoinHandle<Result<tonic::Response<pb::WriteRawResponse>, tonic::Status>>,
) {
    // Too large for the client's own limit: the request body fails mid-stream.
    tx.send(pb::WriteRawChunk {
        path: String::new(),
        data: Bytes::from(vec![b'X'; 2 * 1024 * 1024]),
        abort: false,
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the aborted call ends")
        .unwrap();
    assert!(r.is_err(), "the aborted upload must not succeed: {r:?}");
    drop(tx);
}

/// Waits until `dir` holds exactly `want`.
async fn wait_for_names(dir: &std::path::Path, want: &[&str]) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..250 {
        names = if dir.exists() {
            names_in(dir)
        } else {
            Vec::new()
        };
        if names == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    names
}

/// Waits until the upload into `dir` has a temp file with data in it.
async fn wait_under_way(dir: &std::path::Path, target: &str) {
    for _ in 0..250 {
        let tmp_size: u64 = names_in(dir)
            .iter()
            .filter(|n| *n != target)
            .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
            .map(|m| m.len())
            .sum();
        if tmp_size > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the upload's temp file never appeared: {:?}", names_in(dir));
}

/// tonic's client resets a dropped call with RST_STREAM CANCEL, which tonic's server-side
/// decoder used to take for a clean end of the request stream: the partial upload replaced
/// the file. The request stream stays open here, as a caller's would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tonic_upload_leaves_the_old_file() {
    let s = TestServer::start().await;
    s.client
        .write_file("drop/target.bin", &b"old content"[..])
        .await
        .unwrap();
    let dir = s.path("drop");
    let (tx, call) = start_upload(&s, "drop/target.bin").await;
    for _ in 0..4 {
        tx.send(pb::WriteRawChunk {
            data: Bytes::from(vec![b'N'; 64 * 1024]),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    wait_under_way(&dir, "target.bin").await;
    call.abort();
    let names = wait_for_names(&dir, &["target.bin"]).await;
    assert_eq!(names, ["target.bin"], "the temp file is removed");
    let content = std::fs::read(s.path("drop/target.bin")).unwrap();
    assert!(
        content == b"old content",
        "the old file is untouched; it now holds {} bytes",
        content.len()
    );
    drop(tx);

    // A clean upload on the same path still commits.
    let n = s
        .client
        .write_raw(
            "drop/target.bin",
            futures::stream::iter([Bytes::from_static(b"new")]),
        )
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(std::fs::read(s.path("drop/target.bin")).unwrap(), b"new");
}

/// A source that fails mid-way (a local file that cannot be read) sends `abort`: ABORTED,
/// and the old file stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upload_source_aborts_and_leaves_the_old_file() {
    let s = TestServer::start().await;
    s.client
        .write_file("src/target.bin", &b"old content"[..])
        .await
        .unwrap();
    let source = futures::stream::iter([
        Ok(Bytes::from(vec![b'N'; 200 * 1024])),
        Err(std::io::Error::other("disk on fire")),
        Ok(Bytes::from_static(b"never sent")),
    ]);
    let st = tokio::time::timeout(
        Duration::from_secs(10),
        s.client.try_write_raw("src/target.bin", source),
    )
    .await
    .expect("the aborted upload ends")
    .unwrap_err();
    assert_eq!(st.code(), Code::Aborted, "{st:?}");
    assert!(st.message().contains("disk on fire"), "{}", st.message());
    let names = wait_for_names(&s.path("src"), &["target.bin"]).await;
    assert_eq!(names, ["target.bin"], "no temp file left");
    let content = std::fs::read(s.path("src/target.bin")).unwrap();
    assert!(
        content == b"old content",
        "the old file is untouched; it now holds {} bytes",
        content.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_write_raw_leaves_the_old_file() {
    let s = TestServer::start().await;
    s.client
        .write_file("keep/target.bin", &b"old content"[..])
        .await
        .unwrap();
    let dir = s.path("keep");
    let (tx, call) = start_upload(&s, "keep/target.bin").await;
    for _ in 0..16 {
        tx.send(pb::WriteRawChunk {
            path: String::new(),
            data: Bytes::from(vec![b'N'; 64 * 1024]),
            abort: false,
        })
        .await
        .unwrap();
    }
    // Wait until the server has its temp file with data in it: the upload is under way.
    let mut under_way = false;
    for _ in 0..250 {
        let tmp_size: u64 = names_in(&dir)
            .iter()
            .filter(|n| *n != "target.bin")
            .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
            .map(|m| m.len())
            .sum();
        if tmp_size > 0 {
            under_way = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        under_way,
        "the upload's temp file appeared: {:?}",
        names_in(&dir)
    );
    abort_upload(tx, call).await;
    let names = wait_for_names(&dir, &["target.bin"]).await;
    assert_eq!(names, ["target.bin"], "the temp file is removed");
    let content = std::fs::read(s.path("keep/target.bin")).unwrap();
    assert!(
        content == b"old content",
        "the old file is untouched; it now holds {} bytes",
        content.len()
    );

    // An aborted upload to a new path leaves no file behind.
    let (tx, call) = start_upload(&s, "fresh/new.bin").await;
    let mut started = false;
    for _ in 0..250 {
        if s.path("fresh").is_dir() && !names_in(&s.path("fresh")).is_empty() {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started, "upload started");
    abort_upload(tx, call).await;
    let left = wait_for_names(&s.path("fresh"), &[]).await;
    assert!(left.is_empty(), "nothing left behind: {left:?}");

    // The server keeps serving uploads.
    let n = s
        .client
        .write_raw(
            "keep/target.bin",
            futures::stream::iter([Bytes::from_static(b"new")]),
        )
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(std::fs::read(s.path("keep/target.bin")).unwrap(), b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_round_trip_of_a_multi_mib_file() {
    let s = TestServer::start().await;
    let data = pseudo_random(8 * 1024 * 1024 + 3, 5);
    let n = s
        .client
        .write_raw(
            "round/trip.bin",
            futures::stream::iter([Bytes::from(data.clone())]),
        )
        .await
        .unwrap();
    assert_eq!(n, data.len() as i64);
    let (got, sizes) = read_all(&s, "round/trip.bin").await;
    assert!(got == data, "{} of {} bytes", got.len(), data.len());
    assert!(sizes.iter().all(|&n| n <= 64 * 1024));
    assert_eq!(
        s.client.stat("round/trip.bin").await.unwrap().size,
        data.len() as i64
    );
}

/// An upload still open when the server's shutdown grace runs out is discarded: the server
/// going away is not the client's clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_open_at_shutdown_is_discarded() {
    let mut s = TestServer::builder()
        .grace(Duration::from_millis(300))
        .start()
        .await;
    s.client
        .write_file("down/target.bin", &b"old content"[..])
        .await
        .unwrap();
    let dir = s.path("down");
    let (tx, call) = start_upload(&s, "down/target.bin").await;
    wait_under_way(&dir, "target.bin").await;
    let handle = s.take_handle();
    s.trigger_shutdown();
    let r = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .expect("the call ends")
        .unwrap();
    let st = r.expect_err("an upload cut short by the shutdown must not succeed");
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    tokio::time::timeout(Duration::from_secs(15), handle)
        .await
        .expect("run() returns after shutdown")
        .unwrap()
        .unwrap();
    drop(tx);
    assert_eq!(names_in(&dir), ["target.bin"], "no temp file left");
    let content = std::fs::read(dir.join("target.bin")).unwrap();
    assert!(
        content == b"old content",
        "the old file is untouched; it now holds {} bytes",
        content.len()
    );
}
