//! In-process tests of the file RPCs (ReadFile, WriteFile, ListDir, Stat, Mkdir, Rename,
//! DeleteFile) against the real server over a unix socket, with the real client.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{expect_code, mode_of, names_in, pseudo_random, temp_files_in, TestServer};
use memoh_proto::limits::MAX_MESSAGE_SIZE;
use memoh_proto::pb::mcpcontainer as pb;
use tonic::Code;

fn fmt_line(no: usize, s: &str) -> String {
    format!("{no:>6}\t{s}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_file_windows() {
    let s = TestServer::start().await;
    let c = &s.client;
    let long_1001: String = "é".repeat(1001);
    let exact_1000: String = "ö".repeat(1000);
    let l504 = "x".repeat(504);
    let l505 = "y".repeat(505);
    let three_hundred: String = (1..=300).map(|i| format!("{i}\n")).collect();
    struct Case {
        name: &'static str,
        content: String,
        offset: i32,
        n: i32,
        want: String,
        total: i32,
    }
    let abc = "a\nb\nc\n".to_string();
    let cases = vec![
        Case {
            name: "whole file",
            content: abc.clone(),
            offset: 0,
            n: 0,
            want: fmt_line(1, "a") + &fmt_line(2, "b") + &fmt_line(3, "c"),
            total: 3,
        },
        Case {
            name: "offset 2, one line",
            content: abc.clone(),
            offset: 2,
            n: 1,
            want: fmt_line(2, "b"),
            total: 3,
        },
        Case {
            name: "negative offset means 1",
            content: abc.clone(),
            offset: -7,
            n: 2,
            want: fmt_line(1, "a") + &fmt_line(2, "b"),
            total: 3,
        },
        Case {
            name: "negative n means 200",
            content: abc.clone(),
            offset: 3,
            n: -1,
            want: fmt_line(3, "c"),
            total: 3,
        },
        Case {
            name: "offset past the end",
            content: abc.clone(),
            offset: 10,
            n: 5,
            want: String::new(),
            total: 3,
        },
        Case {
            name: "n above 200 means 200",
            content: three_hundred.clone(),
            offset: 1,
            n: 500,
            want: (1..=200).map(|i| fmt_line(i, &i.to_string())).collect(),
            total: 300,
        },
        Case {
            name: "n 0 means 200 from an offset",
            content: three_hundred.clone(),
            offset: 101,
            n: 0,
            want: (101..=300).map(|i| fmt_line(i, &i.to_string())).collect(),
            total: 300,
        },
        Case {
            name: "n exactly 200",
            content: three_hundred.clone(),
            offset: 50,
            n: 200,
            want: (50..=249).map(|i| fmt_line(i, &i.to_string())).collect(),
            total: 300,
        },
        Case {
            name: "crlf and a final cr",
            content: "a\r\nb\r".into(),
            offset: 1,
            n: 10,
            want: fmt_line(1, "a") + &fmt_line(2, "b"),
            total: 2,
        },
        Case {
            name: "only one cr dropped",
            content: "a\r\r\n".into(),
            offset: 1,
            n: 10,
            want: fmt_line(1, "a\r"),
            total: 1,
        },
        Case {
            name: "a single newline is one empty line",
            content: "\n".into(),
            offset: 0,
            n: 0,
            want: fmt_line(1, ""),
            total: 1,
        },
        Case {
            name: "empty file",
            content: String::new(),
            offset: 0,
            n: 0,
            want: String::new(),
            total: 0,
        },
        Case {
            name: "last line without newline counts",
            content: "x\ny".into(),
            offset: 0,
            n: 0,
            want: fmt_line(1, "x") + &fmt_line(2, "y"),
            total: 2,
        },
        Case {
            name: "blank lines in the middle",
            content: "a\n\n\nb\n".into(),
            offset: 2,
            n: 2,
            want: fmt_line(2, "") + &fmt_line(3, ""),
            total: 4,
        },
        Case {
            name: "line over 1000 chars is cut and marked",
            content: format!("{long_1001}\nend\n"),
            offset: 0,
            n: 0,
            want: fmt_line(1, &format!("{}...", "é".repeat(1000))) + &fmt_line(2, "end"),
            total: 2,
        },
        Case {
            name: "line of exactly 1000 chars is kept",
            content: format!("{exact_1000}\n"),
            offset: 0,
            n: 0,
            want: fmt_line(1, &exact_1000),
            total: 1,
        },
        Case {
            name: "window of exactly 5120 bytes is kept",
            content: format!("{l504}\n").repeat(11),
            offset: 0,
            n: 0,
            want: (1..=10).map(|i| fmt_line(i, &l504)).collect(),
            total: 11,
        },
        Case {
            name: "window stops before passing 5120 bytes",
            content: format!("{l505}\n").repeat(10),
            offset: 0,
            n: 0,
            want: (1..=9).map(|i| fmt_line(i, &l505)).collect(),
            total: 10,
        },
        Case {
            name: "numbers wider than six columns",
            content: "z\n".repeat(1_234_568),
            offset: 1_234_567,
            n: 0,
            want: fmt_line(1_234_567, "z") + &fmt_line(1_234_568, "z"),
            total: 1_234_568,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let name = format!("case{i}.txt");
        std::fs::create_dir_all(&s.data).unwrap();
        std::fs::write(s.path(&name), &case.content).unwrap();
        let r = c
            .read_file(&name, case.offset, case.n)
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", case.name));
        assert_eq!(r.content, case.want, "{}", case.name);
        assert_eq!(r.total_lines, case.total, "{}", case.name);
        assert!(!r.binary, "{}", case.name);
        assert!(r.content.len() <= 5120, "{}", case.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_file_long_line_keeps_counting_and_absolute_paths() {
    let s = TestServer::start().await;
    std::fs::create_dir_all(&s.data).unwrap();
    // A line far longer than Go's 64 KiB scanner buffer must not stop the count.
    let content = format!("first\n{}\nthird\nfourth", "q".repeat(200 * 1024));
    let abs = s.root().join("outside.txt");
    std::fs::write(&abs, &content).unwrap();
    let r = s
        .client
        .read_file(abs.to_str().unwrap(), 3, 5)
        .await
        .unwrap();
    assert_eq!(r.total_lines, 4);
    assert_eq!(r.content, fmt_line(3, "third") + &fmt_line(4, "fourth"));
    let r = s
        .client
        .read_file(abs.to_str().unwrap(), 2, 1)
        .await
        .unwrap();
    assert_eq!(r.content, fmt_line(2, &format!("{}...", "q".repeat(1000))));
    assert_eq!(r.total_lines, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_file_binary_missing_and_directory() {
    let s = TestServer::start().await;
    std::fs::create_dir_all(s.path("adir")).unwrap();
    let mut nul_in_head = vec![b'a'; 8191];
    nul_in_head.push(0);
    nul_in_head.extend_from_slice(b"\nmore\n");
    let mut nul_after_head = vec![b'b'; 8192];
    nul_after_head.extend_from_slice(b"\0\nz\n");
    std::fs::write(s.path("bin1"), b"abc\0def\n").unwrap();
    std::fs::write(s.path("bin2"), &nul_in_head).unwrap();
    std::fs::write(s.path("text"), &nul_after_head).unwrap();
    for name in ["bin1", "bin2"] {
        let r = s.client.read_file(name, 0, 0).await.unwrap();
        assert!(r.binary, "{name}");
        assert_eq!(r.content, "", "{name}");
    }
    let r = s.client.read_file("text", 2, 1).await.unwrap();
    assert!(!r.binary, "a NUL after the first 8 KiB is not binary");
    assert_eq!(r.content, fmt_line(2, "z"));
    assert_eq!(r.total_lines, 2);

    let st = expect_code(
        s.client.read_file("missing.txt", 0, 0).await,
        Code::NotFound,
    );
    assert!(st.message().contains("missing.txt"), "{}", st.message());
    expect_code(
        s.client.read_file("nodir/missing.txt", 0, 0).await,
        Code::NotFound,
    );
    let err = s
        .client
        .read_file("adir", 0, 0)
        .await
        .expect_err("reading a directory is an error");
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::FailedPrecondition),
        "{err:?}"
    );
    assert!(err.message().contains("directory"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_file_modes_parents_and_atomicity() {
    let s = TestServer::start().await;
    let c = &s.client;
    c.write_file("deep/er/new.txt", &b"hello world"[..])
        .await
        .unwrap();
    let p = s.path("deep/er/new.txt");
    assert_eq!(std::fs::read(&p).unwrap(), b"hello world");
    assert_eq!(mode_of(&p), 0o644);
    assert_eq!(mode_of(&s.path("deep")), 0o755);
    assert_eq!(mode_of(&s.path("deep/er")), 0o755);

    // Overwriting keeps the permission bits and leaves exactly the new bytes.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    c.write_file("deep/er/new.txt", &b"hi"[..]).await.unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"hi");
    assert_eq!(mode_of(&p), 0o600);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.write_file("deep/er/new.txt", &b""[..]).await.unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"");
    assert_eq!(mode_of(&p), 0o755);
    assert_eq!(names_in(&s.path("deep/er")), ["new.txt"], "no temp files");

    // `sub/../f` is cleaned to `f`: no `sub` directory appears.
    c.write_file("sub/../f", &b"F"[..]).await.unwrap();
    assert_eq!(std::fs::read(s.path("f")).unwrap(), b"F");
    assert!(!s.path("sub").exists());
    // `//` and `/./` collapse.
    c.write_file(".//deep/./er//two", &b"2"[..]).await.unwrap();
    assert_eq!(std::fs::read(s.path("deep/er/two")).unwrap(), b"2");

    // Absolute paths are used as they are.
    let abs = s.root().join("abs/x.bin");
    let data = pseudo_random(100_000, 7);
    c.write_file(abs.to_str().unwrap(), data.clone())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&abs).unwrap(), data);
    assert_eq!(names_in(&s.data), ["deep", "f"]);
    assert!(temp_files_in(&s.root().join("abs")).is_empty());

    // Writing through a link replaces the target's content and keeps the link.
    std::os::unix::fs::symlink(s.path("f"), s.path("flink")).unwrap();
    c.write_file("flink", &b"via link"[..]).await.unwrap();
    assert_eq!(std::fs::read(s.path("f")).unwrap(), b"via link");
    assert!(std::fs::symlink_metadata(s.path("flink"))
        .unwrap()
        .file_type()
        .is_symlink());
    std::fs::remove_file(s.path("flink")).unwrap();

    // A directory cannot be overwritten by a file.
    let err = c
        .write_file("deep", &b"x"[..])
        .await
        .expect_err("writing over a directory fails");
    assert_ne!(err.code(), Code::Ok);
    assert!(s.path("deep").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_file_replaces_atomically_under_concurrent_reads() {
    let s = TestServer::start().await;
    let a = vec![b'A'; 3 * 1024 * 1024];
    let b = vec![b'B'; 2 * 1024 * 1024];
    s.client.write_file("swap.bin", a.clone()).await.unwrap();
    let p = s.path("swap.bin");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = std::fs::read(&p).unwrap();
                let ok = (got.len() == 3 * 1024 * 1024 && got.iter().all(|&x| x == b'A'))
                    || (got.len() == 2 * 1024 * 1024 && got.iter().all(|&x| x == b'B'));
                assert!(ok, "a reader saw a partial file of {} bytes", got.len());
                seen += 1;
            }
            seen
        })
    };
    for i in 0..6 {
        let data = if i % 2 == 0 { b.clone() } else { a.clone() };
        s.client.write_file("swap.bin", data).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(names_in(&s.data), ["swap.bin"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_file_size_limit() {
    let s = TestServer::start().await;
    // A message of exactly 16 MiB: tags and lengths take 1+1+3+1+4 bytes around "big".
    let content = vec![b'z'; MAX_MESSAGE_SIZE - 10];
    s.client.write_file("big", content.clone()).await.unwrap();
    assert_eq!(
        std::fs::metadata(s.path("big")).unwrap().len(),
        content.len() as u64
    );

    // Larger: the generated client with a raised sending limit, so the server must refuse.
    let mut raw = s.raw().max_encoding_message_size(64 * 1024 * 1024);
    let r = raw
        .write_file(pb::WriteFileRequest {
            path: "too-big".into(),
            content: vec![b'y'; MAX_MESSAGE_SIZE + 1].into(),
        })
        .await;
    let st = expect_code(r, Code::ResourceExhausted);
    assert!(st.message().contains("WriteRaw"), "{}", st.message());
    assert!(!s.path("too-big").exists());
    assert_eq!(names_in(&s.data), ["big"], "no temp files");

    // The server keeps serving, on the same connection and on a new one.
    s.client.write_file("after", &b"ok"[..]).await.unwrap();
    assert_eq!(
        s.client.read_file("after", 0, 0).await.unwrap().content,
        fmt_line(1, "ok")
    );
    let fresh = memoh_proto::ContainerClient::new(memoh_proto::client::unix_channel(&s.socket));
    assert_eq!(fresh.stat("big").await.unwrap().size, content.len() as i64);
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses Go's RFC 3339 form (`2026-03-04T21:50:08Z` or `...+02:00`) to Unix seconds; panics
/// on anything else.
fn parse_rfc3339(s: &str) -> i64 {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> i64 {
        let part = &s[r.clone()];
        assert!(
            part.bytes().all(|c| c.is_ascii_digit()),
            "{s:?}: not digits at {r:?}"
        );
        part.parse().unwrap()
    };
    assert!(b.len() == 20 || b.len() == 25, "{s:?}: wrong length");
    assert_eq!(
        (b[4], b[7], b[10], b[13], b[16]),
        (b'-', b'-', b'T', b':', b':'),
        "{s:?}"
    );
    let (y, mo, d) = (digits(0..4), digits(5..7), digits(8..10));
    let (h, mi, se) = (digits(11..13), digits(14..16), digits(17..19));
    let offset = if b.len() == 20 {
        assert_eq!(b[19], b'Z', "{s:?}");
        0
    } else {
        assert!(b[19] == b'+' || b[19] == b'-', "{s:?}");
        assert_eq!(b[22], b':', "{s:?}");
        let o = digits(20..22) * 3600 + digits(23..25) * 60;
        assert_ne!(o, 0, "{s:?}: UTC is written Z");
        if b[19] == b'-' {
            -o
        } else {
            o
        }
    };
    days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_dir_sorted_recursive_and_symlinks() {
    let s = TestServer::start().await;
    for (p, content) in [
        ("b/z", "zz"),
        ("b/a", "a"),
        ("a", "12345"),
        ("c/d/e", ""),
        ("c/d/f", "f"),
    ] {
        s.client
            .write_file(p, content.as_bytes().to_vec())
            .await
            .unwrap();
    }
    std::os::unix::fs::symlink(s.path("c"), s.path("l")).unwrap();
    std::os::unix::fs::symlink(s.path("nowhere"), s.path("dangling")).unwrap();

    let top = s.client.list_dir("", false).await.unwrap();
    let names: Vec<&str> = top.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "dangling", "l"]);
    let a = &top[0];
    assert_eq!(
        (a.is_dir, a.size, a.mode.as_str()),
        (false, 5, "-rw-r--r--")
    );
    let b = &top[1];
    assert_eq!((b.is_dir, b.mode.as_str()), (true, "drwxr-xr-x"));
    let l = &top[4];
    assert!(!l.is_dir, "a link to a directory is reported as a link");
    assert_eq!(l.mode, "Lrwxrwxrwx");
    assert_eq!(top[3].mode, "Lrwxrwxrwx");

    // The empty path, ".", the absolute data dir and a trailing slash list the same thing.
    let data_abs = s.data.to_str().unwrap().to_string();
    for p in [".", data_abs.as_str(), &format!("{data_abs}/"), "b/.."] {
        let again = s.client.list_dir(p, false).await.unwrap();
        assert_eq!(again, top, "{p}");
    }

    let rec = s.client.list_dir("", true).await.unwrap();
    let names: Vec<&str> = rec.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        names,
        ["a", "b", "b/a", "b/z", "c", "c/d", "c/d/e", "c/d/f", "dangling", "l"],
        "pre-order, sorted, links not descended"
    );
    let sizes: Vec<i64> = rec.iter().filter(|e| !e.is_dir).map(|e| e.size).collect();
    assert_eq!(sizes[..5], [5, 1, 2, 0, 1]);

    let sub = s.client.list_dir("c", true).await.unwrap();
    let names: Vec<&str> = sub.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        names,
        ["d", "d/e", "d/f"],
        "paths relative to the listed dir"
    );
    let sub = s.client.list_dir("c/d", false).await.unwrap();
    let names: Vec<&str> = sub.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["e", "f"]);
    // Listing a link to a directory lists the target.
    let via_link = s.client.list_dir("l", false).await.unwrap();
    assert_eq!(via_link.len(), 1);
    assert_eq!(via_link[0].path, "d");
    let via_link: Vec<String> = s
        .client
        .list_dir("l", true)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(via_link, ["d", "d/e", "d/f"], "a listed link is followed");

    // Empty directories list as empty, both ways.
    s.client.mkdir("empty").await.unwrap();
    assert!(s.client.list_dir("empty", false).await.unwrap().is_empty());
    assert!(s.client.list_dir("empty", true).await.unwrap().is_empty());

    for recursive in [false, true] {
        let st = expect_code(
            s.client.list_dir("no/such/dir", recursive).await,
            Code::NotFound,
        );
        assert!(!st.message().is_empty());
    }
    let err = s
        .client
        .list_dir("a", false)
        .await
        .expect_err("listing a file is an error");
    assert_ne!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_dir_mode_strings_and_times() {
    let s = TestServer::start().await;
    std::fs::create_dir_all(&s.data).unwrap();
    let set = |name: &str, mode: u32| {
        std::fs::set_permissions(s.path(name), std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let mk = |name: &str| std::fs::write(s.path(name), b"x").unwrap();
    mk("f640");
    set("f640", 0o640);
    mk("setuid");
    set("setuid", 0o4755);
    mk("setgid");
    set("setgid", 0o2750);
    mk("none");
    set("none", 0o000);
    std::fs::create_dir(s.path("sticky")).unwrap();
    set("sticky", 0o1777);
    std::fs::create_dir(s.path("d700")).unwrap();
    set("d700", 0o700);
    nix::unistd::mkfifo(
        &s.path("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    set("fifo", 0o644);
    let _sock = std::os::unix::net::UnixListener::bind(s.path("sock")).unwrap();
    set("sock", 0o700);

    let got: Vec<(String, String)> = s
        .client
        .list_dir("", false)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.path, e.mode))
        .collect();
    let want = [
        ("d700", "drwx------"),
        ("f640", "-rw-r-----"),
        ("fifo", "prw-r--r--"),
        ("none", "----------"),
        ("setgid", "grwxr-x---"),
        ("setuid", "urwxr-xr-x"),
        ("sock", "Srwx------"),
        ("sticky", "dtrwxrwxrwx"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(got, want);

    // A character device: Stat follows /dev/null.
    let null = s.client.stat("/dev/null").await.unwrap();
    assert_eq!(null.mode, "Dcrw-rw-rw-");
    assert_eq!(null.path, "null");
    assert!(!null.is_dir);

    // mod_time: RFC 3339, seconds precision, the file's real mtime.
    let when = UNIX_EPOCH + Duration::from_secs(1_772_661_008); // 2026-03-04T21:50:08Z
    std::fs::File::options()
        .write(true)
        .open(s.path("f640"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    let e = s.client.stat("f640").await.unwrap();
    assert_eq!(parse_rfc3339(&e.mod_time), 1_772_661_008, "{}", e.mod_time);
    if e.mod_time.ends_with('Z') {
        assert_eq!(e.mod_time, "2026-03-04T21:50:08Z");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    s.client.write_file("fresh", &b"1"[..]).await.unwrap();
    for e in s.client.list_dir("", true).await.unwrap() {
        let t = parse_rfc3339(&e.mod_time);
        if e.path == "f640" {
            assert_eq!(t, 1_772_661_008);
        } else {
            assert!((t - now).abs() < 120, "{}: {}", e.path, e.mod_time);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_follows_links_and_names() {
    let s = TestServer::start().await;
    s.client
        .write_file("dir/file.txt", &b"123456789"[..])
        .await
        .unwrap();
    std::os::unix::fs::symlink(s.path("dir/file.txt"), s.path("link")).unwrap();
    std::os::unix::fs::symlink(s.path("dir"), s.path("dirlink")).unwrap();
    std::os::unix::fs::symlink(s.path("gone"), s.path("dangling")).unwrap();

    let f = s.client.stat("dir/file.txt").await.unwrap();
    assert_eq!(
        (f.path.as_str(), f.is_dir, f.size, f.mode.as_str()),
        ("file.txt", false, 9, "-rw-r--r--")
    );
    let l = s.client.stat("link").await.unwrap();
    assert_eq!(
        (l.path.as_str(), l.is_dir, l.size, l.mode.as_str()),
        ("link", false, 9, "-rw-r--r--"),
        "Stat follows the link to its target"
    );
    let dl = s.client.stat("dirlink").await.unwrap();
    assert!(dl.is_dir);
    assert_eq!(dl.mode, "drwxr-xr-x");

    let data_abs = s.data.to_str().unwrap().to_string();
    for p in [".", "./", data_abs.as_str(), "dir/.."] {
        let d = s.client.stat(p).await.unwrap();
        assert_eq!(d.path, "data", "{p}");
        assert!(d.is_dir, "{p}");
    }
    let root = s.client.stat("/").await.unwrap();
    assert_eq!(root.path, "/");
    assert!(root.is_dir);
    let root = s.client.stat("//..//").await.unwrap();
    assert_eq!(root.path, "/");
    let d = s.client.stat("dir/").await.unwrap();
    assert_eq!(d.path, "dir");

    expect_code(s.client.stat("nope").await, Code::NotFound);
    expect_code(s.client.stat("dangling").await, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mkdir_rename_delete() {
    let s = TestServer::start().await;
    let c = &s.client;
    // Mkdir creates every missing parent with 0755, and is idempotent.
    c.mkdir("m/n/o").await.unwrap();
    for p in ["m", "m/n", "m/n/o"] {
        assert!(s.path(p).is_dir(), "{p}");
        assert_eq!(mode_of(&s.path(p)), 0o755, "{p}");
    }
    c.mkdir("m/n/o").await.unwrap();
    c.mkdir(s.root().join("absdir/x").to_str().unwrap())
        .await
        .unwrap();
    assert!(s.root().join("absdir/x").is_dir());
    c.write_file("m/file", &b"x"[..]).await.unwrap();
    let err = c.mkdir("m/file").await.expect_err("mkdir over a file");
    assert_ne!(err.code(), Code::Ok);
    assert!(s.path("m/file").is_file());

    // Rename creates the new path's parent first.
    c.write_file("r/src.txt", &b"moved"[..]).await.unwrap();
    c.rename("r/src.txt", "x/y/z/dst.txt").await.unwrap();
    assert!(!s.path("r/src.txt").exists());
    assert_eq!(std::fs::read(s.path("x/y/z/dst.txt")).unwrap(), b"moved");
    assert_eq!(mode_of(&s.path("x/y")), 0o755);
    // Rename of a directory, and over an existing file.
    c.rename("x", "x2").await.unwrap();
    assert!(s.path("x2/y/z/dst.txt").is_file());
    c.write_file("old", &b"new content"[..]).await.unwrap();
    c.write_file("target", &b"old content"[..]).await.unwrap();
    c.rename("old", "target").await.unwrap();
    assert_eq!(std::fs::read(s.path("target")).unwrap(), b"new content");
    expect_code(c.rename("missing", "whatever").await, Code::NotFound);
    assert!(!s.path("whatever").exists());
    for (old, new) in [("", "a"), ("target", ""), ("", "")] {
        let st = expect_code(c.rename(old, new).await, Code::InvalidArgument);
        assert!(!st.message().is_empty());
    }
    assert!(s.path("target").exists());

    // DeleteFile.
    c.delete("does/not/exist", false).await.unwrap();
    c.delete("does-not-exist", true).await.unwrap();
    c.delete("target", false).await.unwrap();
    assert!(!s.path("target").exists());
    let st = c
        .delete("x2", false)
        .await
        .expect_err("non-recursive delete of a non-empty directory");
    assert_ne!(st.code(), Code::Ok);
    assert_ne!(st.code(), Code::Internal, "{st:?}");
    assert!(st.message().contains("not empty"), "{}", st.message());
    assert!(s.path("x2/y/z/dst.txt").is_file(), "nothing was deleted");
    c.delete("x2", true).await.unwrap();
    assert!(!s.path("x2").exists());
    c.mkdir("emptydir").await.unwrap();
    c.delete("emptydir", false).await.unwrap();
    assert!(!s.path("emptydir").exists());
    // A link is removed, not its target (even recursively).
    c.write_file("keep/inner", &b"k"[..]).await.unwrap();
    std::os::unix::fs::symlink(s.path("keep"), s.path("klink")).unwrap();
    c.delete("klink", true).await.unwrap();
    assert!(std::fs::symlink_metadata(s.path("klink")).is_err());
    assert!(s.path("keep/inner").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_one_connection() {
    let s = TestServer::start().await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let c = s.client.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("par/{i}.txt");
            let body = format!("line {i}\n").repeat(i + 1);
            c.write_file(&name, body.clone().into_bytes())
                .await
                .unwrap();
            let r = c.read_file(&name, 0, 0).await.unwrap();
            assert_eq!(r.total_lines as usize, i + 1);
            assert_eq!(c.stat(&name).await.unwrap().size as usize, body.len());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.client.list_dir("par", false).await.unwrap().len(), 32);
}
