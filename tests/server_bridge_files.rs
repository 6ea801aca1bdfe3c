//! In-process tests of the bridge's file behaviour (WIRE-BRIDGE.md section 3): the anchored
//! NoFollow I/O under hostile input, with `openat2` and with the walk that replaces it on
//! kernels without it; ListDir's collapse, summary, paging and `max_entries`; raw ReadFile;
//! uploads that replace a symlink with a 0600 file.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use bp::container_service_client::ContainerServiceClient as BridgeClient;
use bytes::Bytes;
use common::{expect_code, mode_of, TestServer};
use memoh_proto::pb::bridgepb as bp;
use memoh_proto::pb::mcpcontainer as mp;
use tokio::sync::RwLock;
use tonic::transport::Channel;
use tonic::Code;

/// The walk fallback is a process-wide switch: the test that turns it on holds this for
/// writing, every other NoFollow test for reading, so each runs the lookup it means to.
static LOOKUP: RwLock<()> = RwLock::const_new(());

async fn start() -> (TestServer, BridgeClient<Channel>) {
    let s = TestServer::start().await;
    let b = BridgeClient::new(s.channel.clone())
        .max_decoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(memoh_proto::limits::MAX_MESSAGE_SIZE);
    for _ in 0..200 {
        if s.data.is_dir() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (s, b)
}

/// An empty file at `p`, its parents made.
fn touch(p: &Path) {
    std::fs::create_dir_all(p.parent().expect("a parent")).unwrap();
    std::fs::write(p, "").unwrap();
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

async fn read_nf(
    b: &mut BridgeClient<Channel>,
    root: &str,
    rel: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let req = bp::ReadRawNoFollowRequest {
        root: root.into(),
        relative_path: rel.into(),
    };
    let call = async {
        let mut s = b.read_raw_no_follow(req).await?.into_inner();
        let mut got = Vec::new();
        while let Some(c) = s.message().await? {
            assert!(c.data.len() <= 64 * 1024, "chunk of {}", c.data.len());
            got.extend_from_slice(&c.data);
        }
        Ok(got)
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| panic!("ReadRawNoFollow {root} {rel} blocked"))
}

fn chunk(root: &str, rel: &str, data: &[u8]) -> bp::WriteRawNoFollowChunk {
    bp::WriteRawNoFollowChunk {
        root: root.into(),
        relative_path: rel.into(),
        data: Bytes::copy_from_slice(data),
        abort: false,
    }
}

async fn write_nf(
    b: &mut BridgeClient<Channel>,
    chunks: Vec<bp::WriteRawNoFollowChunk>,
) -> Result<i64, tonic::Status> {
    let r = b.write_raw_no_follow(futures::stream::iter(chunks)).await?;
    Ok(r.into_inner().bytes_written)
}

/// Every NoFollow check, against the server's data directory as root.
async fn no_follow_suite() {
    let (s, mut b) = start().await;
    let b = &mut b;
    let data = s.data.clone();
    let root = text(&data);
    std::fs::create_dir_all(data.join("dir")).unwrap();
    std::fs::write(data.join("dir/f"), "hello").unwrap();
    let big = common::pseudo_random(200_000, 7);
    std::fs::write(data.join("dir/big"), &big).unwrap();
    let outside = s.root().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "secret").unwrap();
    symlink("dir", data.join("link_dir")).unwrap();
    symlink("dir/f", data.join("link_f")).unwrap();
    symlink(&outside, data.join("escape")).unwrap();
    symlink(outside.join("planted"), data.join("dangling")).unwrap();
    symlink(&data, s.root().join("data_link")).unwrap();
    let root_link = text(&s.root().join("data_link"));
    nix::unistd::mkfifo(
        &data.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();

    // Reads.
    assert_eq!(read_nf(b, &root, "dir/f").await.unwrap(), b"hello");
    assert_eq!(read_nf(b, &root, "dir/big").await.unwrap(), big);
    assert_eq!(
        read_nf(b, "/", &text(&data.join("dir/f"))[1..])
            .await
            .unwrap(),
        b"hello"
    );
    let long = "a".repeat(5000);
    let invalid = [
        (root.as_str(), ".."),
        (root.as_str(), "../outside/secret"),
        (root.as_str(), "dir/../../outside/secret"),
        (root.as_str(), "/etc/passwd"),
        (root.as_str(), "dir/f\0"),
        (root.as_str(), "dir//f"),
        (root.as_str(), "./dir/f"),
        (root.as_str(), "dir/./f"),
        (root.as_str(), "dir/f/"),
        (root.as_str(), "."),
        (root.as_str(), ""),
        (root.as_str(), long.as_str()),
        ("data/dir", "f"),
        ("", "dir/f"),
    ];
    for (r, rel) in invalid {
        let e = expect_code(read_nf(b, r, rel).await, Code::InvalidArgument);
        assert!(!e.message().is_empty());
        expect_code(
            write_nf(b, vec![chunk(r, rel, b"x")]).await,
            Code::InvalidArgument,
        );
    }
    let refused = [
        (root.as_str(), "link_dir/f"),
        (root.as_str(), "link_f"),
        (root.as_str(), "escape/secret"),
        (root.as_str(), "dangling"),
        (root.as_str(), "fifo"),
        (root.as_str(), "dir"),
        (root.as_str(), "dir/f/x"),
        (root_link.as_str(), "dir/f"),
        ("/proc/self/root", "etc/hostname"),
    ];
    for (r, rel) in refused {
        let e = expect_code(read_nf(b, r, rel).await, Code::FailedPrecondition);
        assert!(e.message().contains(rel), "{}", e.message());
    }
    let e = expect_code(read_nf(b, &root, "link_f").await, Code::FailedPrecondition);
    assert!(e.message().contains("symlink"), "{}", e.message());
    expect_code(read_nf(b, &root, "missing").await, Code::NotFound);
    expect_code(read_nf(b, &root, "nodir/f").await, Code::NotFound);

    // Writes: parents 0750, the file 0600, several chunks.
    let w = write_nf(
        b,
        vec![
            chunk(&root, "up/a/b.bin", &big[..100_000]),
            chunk("", "", &big[100_000..]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(w, 200_000);
    assert_eq!(std::fs::read(data.join("up/a/b.bin")).unwrap(), big);
    assert_eq!(mode_of(&data.join("up/a/b.bin")), 0o600);
    assert_eq!(mode_of(&data.join("up")), 0o750);
    assert_eq!(mode_of(&data.join("up/a")), 0o750);
    // Path fields count in the first chunk only.
    let w = write_nf(
        b,
        vec![
            chunk(&root, "first.txt", b"one "),
            chunk(&root, "second.txt", b"two"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(w, 7);
    assert_eq!(std::fs::read(data.join("first.txt")).unwrap(), b"one two");
    assert!(!data.join("second.txt").exists());
    // An existing entry is never replaced or followed.
    for rel in ["dir/f", "link_f", "dangling", "fifo", "dir"] {
        let e = expect_code(
            write_nf(b, vec![chunk(&root, rel, b"evil")]).await,
            Code::AlreadyExists,
        );
        assert!(e.message().contains("already exists"), "{}", e.message());
    }
    assert_eq!(std::fs::read(data.join("dir/f")).unwrap(), b"hello");
    assert!(!outside.join("planted").exists());
    for (r, rel) in [
        (root.as_str(), "link_dir/new"),
        (root.as_str(), "escape/new"),
        (root.as_str(), "escape/sub/new"),
        (root.as_str(), "dir/f/new"),
        (root_link.as_str(), "new"),
    ] {
        expect_code(
            write_nf(b, vec![chunk(r, rel, b"evil")]).await,
            Code::FailedPrecondition,
        );
    }
    assert!(!data.join("dir/new").exists());
    assert!(!data.join("new").exists());
    assert!(!outside.join("new").exists() && !outside.join("sub").exists());
    expect_code(
        write_nf(b, vec![chunk(&text(&data.join("none")), "f", b"x")]).await,
        Code::NotFound,
    );
    // abort: ABORTED, the partial file stays.
    let mut abort = chunk("", "", b"");
    abort.abort = true;
    expect_code(
        write_nf(b, vec![chunk(&root, "partial.bin", b"kept"), abort.clone()]).await,
        Code::Aborted,
    );
    assert_eq!(std::fs::read(data.join("partial.bin")).unwrap(), b"kept");
    expect_code(write_nf(b, vec![]).await, Code::InvalidArgument);
    let mut first_abort = chunk(&root, "never.bin", b"x");
    first_abort.abort = true;
    expect_code(write_nf(b, vec![first_abort]).await, Code::Aborted);
    assert!(!data.join("never.bin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_follow_with_openat2() {
    let _g = LOOKUP.read().await;
    no_follow_suite().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_follow_with_the_walk_fallback() {
    let _g = LOOKUP.write().await;
    container_server::anchored::force_walk(true);
    let r = tokio::spawn(no_follow_suite()).await;
    container_server::anchored::force_walk(false);
    r.unwrap();
}

async fn list(
    b: &mut BridgeClient<Channel>,
    req: bp::ListDirRequest,
) -> Result<bp::ListDirResponse, tonic::Status> {
    Ok(b.list_dir(req).await?.into_inner())
}

fn shown(r: &bp::ListDirResponse) -> Vec<String> {
    r.entries
        .iter()
        .map(|e| {
            if e.summary.is_empty() {
                e.path.clone()
            } else {
                format!("{} [{}]", e.path, e.summary)
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_dir_collapse_paging_and_limits() {
    let (s, mut b) = start().await;
    let b = &mut b;
    let p = s.path("proj");
    for i in 0..30 {
        touch(&p.join(format!("big/f{i:02}")));
    }
    for f in ["small/1", "small/2", "a.txt", "a/b", "z"] {
        touch(&p.join(f));
    }
    let req = |collapse, offset, limit, max| bp::ListDirRequest {
        path: "proj".into(),
        recursive: true,
        offset,
        limit,
        collapse_threshold: collapse,
        max_entries: max,
    };
    let r = list(b, req(5, 0, 0, 0)).await.unwrap();
    assert_eq!(
        shown(&r),
        [
            "a",
            "a.txt",
            "a/b",
            "big",
            "big/ [30 items (not expanded)]",
            "small",
            "small/1",
            "small/2",
            "z"
        ]
    );
    assert_eq!((r.total_count, r.truncated), (9, false));
    let folded = &r.entries[4];
    assert!(folded.is_dir);
    // The threshold is "more than": 30 descendants at 30 stay expanded.
    let r = list(b, req(30, 0, 0, 0)).await.unwrap();
    assert_eq!(r.total_count, 38);
    assert!(r.entries.iter().all(|e| e.summary.is_empty()));
    // Paging after the collapse.
    let r = list(b, req(5, 3, 2, 0)).await.unwrap();
    assert_eq!(shown(&r), ["big", "big/ [30 items (not expanded)]"]);
    assert_eq!((r.total_count, r.truncated), (9, true));
    let r = list(b, req(5, 8, 2, 0)).await.unwrap();
    assert_eq!(
        (shown(&r), r.total_count, r.truncated),
        (vec!["z".to_string()], 9, false)
    );
    // max_entries counts before the collapse: 38 entries on disk.
    let e = expect_code(list(b, req(5, 0, 0, 37)).await, Code::ResourceExhausted);
    assert!(e.message().contains("max_entries (37)"), "{}", e.message());
    assert_eq!(list(b, req(5, 0, 0, 38)).await.unwrap().total_count, 9);
    // Not recursive: no collapse.
    let mut flat = req(1, 0, 0, 0);
    flat.recursive = false;
    let r = list(b, flat).await.unwrap();
    assert_eq!(shown(&r), ["a", "a.txt", "big", "small", "z"]);
    // A huge limit is capped at 200.
    for i in 0..250 {
        touch(&s.path(&format!("many/f{i:03}")));
    }
    let r = list(
        b,
        bp::ListDirRequest {
            path: "many".into(),
            recursive: true,
            limit: i32::MAX,
            offset: -5,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (r.entries.len(), r.total_count, r.truncated),
        (200, 250, true)
    );
    assert_eq!(r.entries[0].path, "f000");
    expect_code(
        list(
            b,
            bp::ListDirRequest {
                path: "missing".into(),
                recursive: true,
                ..Default::default()
            },
        )
        .await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_read_file_and_replacing_uploads() {
    let (s, mut b) = start().await;
    let b = &mut b;
    std::fs::write(s.path("t.txt"), "one\ntwo\r\n\tthree").unwrap();
    let rf = |path: &str, off, n| bp::ReadFileRequest {
        path: path.into(),
        line_offset: off,
        n_lines: n,
    };
    let r = b.read_file(rf("t.txt", 0, 0)).await.unwrap().into_inner();
    assert_eq!(
        (r.content.as_str(), r.total_lines),
        ("one\ntwo\n\tthree\n", 3)
    );
    let r = b.read_file(rf("t.txt", 2, 1)).await.unwrap().into_inner();
    assert_eq!(r.content, "two\n");
    // mcpcontainer callers keep the numbered window.
    let mut mcp = s.raw();
    let m = mcp
        .read_file(mp::ReadFileRequest {
            path: "t.txt".into(),
            line_offset: 2,
            n_lines: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.content, "     2\ttwo\n");
    // No line cut, no byte cap; up to 2000 lines.
    let body: String = (0..2500)
        .map(|i| format!("{i}:{}\n", "x".repeat(1500)))
        .collect();
    std::fs::write(s.path("long.txt"), &body).unwrap();
    for n in [0, -1, 2001, 2000] {
        let r = b
            .read_file(rf("long.txt", 1, n))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.total_lines, 2500);
        assert_eq!(r.content.lines().count(), 2000, "n_lines {n}");
        assert!(r.content.starts_with(&format!("0:{}\n", "x".repeat(1500))));
    }
    let r = b
        .read_file(rf("long.txt", 2500, 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.content, format!("2499:{}\n", "x".repeat(1500)));
    expect_code(b.read_file(rf("nope.txt", 0, 0)).await, Code::NotFound);

    // Uploads replace a symlink (never write through it) with a 0600 file; old mode lost.
    let secret = s.root().join("secret");
    std::fs::write(&secret, "keep").unwrap();
    symlink(&secret, s.path("via_write_file")).unwrap();
    symlink(&secret, s.path("via_write_raw")).unwrap();
    b.write_file(bp::WriteFileRequest {
        path: "via_write_file".into(),
        content: Bytes::from_static(b"new"),
    })
    .await
    .unwrap();
    let chunks = vec![
        bp::WriteRawChunk {
            path: "via_write_raw".into(),
            data: Bytes::from_static(b"raw "),
            abort: false,
        },
        bp::WriteRawChunk {
            data: Bytes::from_static(b"bytes"),
            ..Default::default()
        },
    ];
    let w = b.write_raw(futures::stream::iter(chunks)).await.unwrap();
    assert_eq!(w.into_inner().bytes_written, 9);
    assert_eq!(std::fs::read(&secret).unwrap(), b"keep");
    for (name, want) in [
        ("via_write_file", &b"new"[..]),
        ("via_write_raw", b"raw bytes"),
    ] {
        let p = s.path(name);
        let md = std::fs::symlink_metadata(&p).unwrap();
        assert!(md.is_file(), "{name} is a file now");
        assert_eq!(mode_of(&p), 0o600, "{name}");
        assert_eq!(std::fs::read(&p).unwrap(), want, "{name}");
    }
    std::fs::write(s.path("wide"), "x").unwrap();
    std::fs::set_permissions(
        s.path("wide"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    b.write_file(bp::WriteFileRequest {
        path: "wide".into(),
        content: Bytes::from_static(b"y"),
    })
    .await
    .unwrap();
    assert_eq!(mode_of(&s.path("wide")), 0o600);
    b.write_file(bp::WriteFileRequest {
        path: "fresh/dir/f".into(),
        content: Bytes::from_static(b"y"),
    })
    .await
    .unwrap();
    assert_eq!(mode_of(&s.path("fresh")), 0o750);
    assert_eq!(mode_of(&s.path("fresh/dir/f")), 0o600);
    assert!(common::temp_files_in(&s.data).is_empty());
    // mcpcontainer callers still write through a link and keep the mode.
    symlink(&secret, s.path("mcp_link")).unwrap();
    mcp.write_file(mp::WriteFileRequest {
        path: "mcp_link".into(),
        content: Bytes::from_static(b"through"),
    })
    .await
    .unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), b"through");
    // Rename of a missing source.
    let e = expect_code(
        b.rename(bp::RenameRequest {
            old_path: "gone".into(),
            new_path: "else".into(),
        })
        .await,
        Code::NotFound,
    );
    assert!(e.message().contains("gone"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_mkdir_makes_0750_directories_and_mcpcontainer_keeps_0755() {
    let (s, mut b) = start().await;
    b.mkdir(bp::MkdirRequest {
        path: "made/by/bridge".into(),
    })
    .await
    .expect("bridge mkdir");
    for d in ["made", "made/by", "made/by/bridge"] {
        assert_eq!(mode_of(&s.path(d)), 0o750, "{d}");
    }
    let mut m = mp::container_service_client::ContainerServiceClient::new(s.channel.clone());
    m.mkdir(mp::MkdirRequest {
        path: "made/by/mcp".into(),
    })
    .await
    .expect("mcpcontainer mkdir");
    assert_eq!(mode_of(&s.path("made/by/mcp")), 0o755);
    // A file in the way is refused by both, as before.
    touch(&s.path("file"));
    expect_code(
        b.mkdir(bp::MkdirRequest {
            path: "file".into(),
        })
        .await,
        Code::InvalidArgument,
    );
}
