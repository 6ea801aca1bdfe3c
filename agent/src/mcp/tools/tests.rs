use super::*;

#[test]
fn paths() {
    let cases = [
        ("a.txt", "a.txt", "/data/a.txt"),
        ("/data/a.txt", "a.txt", "/data/a.txt"),
        ("/data", ".", "/data"),
        ("/data/", ".", "/data"),
        ("/etc/hosts", "/etc/hosts", "/etc/hosts"),
        ("/database", "/database", "/database"),
        ("sub/../x", "sub/../x", "/data/x"),
    ];
    for (p, server, shown) in cases {
        assert_eq!(server_path(p), server, "{p}");
        assert_eq!(display_path(p), shown, "{p}");
    }
}

#[test]
fn a_bot_at_its_limit_is_named_in_the_tool_error() {
    let msg = "cannot start a process: the bot is at its process limit";
    let e = call_err("exec", "make")(Status::resource_exhausted(msg));
    assert_eq!(e.to_string(), format!("exec make: {msg}"));
}

#[test]
fn short_output_is_kept() {
    assert_eq!(cut_output("a\nb\n"), "a\nb\n");
    assert_eq!(cut_output(""), "");
}

#[test]
fn many_lines_are_cut_with_a_marker() {
    let s: String = (0..1000).map(|i| format!("line {i}\n")).collect();
    let c = cut_output(&s);
    assert!(c.starts_with("line 0\n"));
    assert!(c.ends_with("line 999\n"));
    assert!(c.contains("[output cut: "), "{c}");
    assert!(c.lines().count() <= MAX_OUTPUT_LINES + 1);
    assert!(c.len() <= MAX_OUTPUT_BYTES + 200);
}

#[test]
fn exec_output_is_bounded_while_it_streams() {
    use memoh_proto::pb::mcpcontainer::{exec_output::Stream as Kind, ExecOutput};
    // 64 MiB of stdout and 8 MiB of stderr in 64 KiB messages, then an exit; the collector
    // never holds more than its bounds.
    let chunk = bytes::Bytes::from(vec![b'y'; 64 * 1024]);
    let mut msgs = Vec::new();
    for i in 0..1024 {
        msgs.push((Kind::Stdout, chunk.clone()));
        if i % 8 == 0 {
            msgs.push((Kind::Stderr, chunk.clone()));
        }
    }
    msgs.push((
        Kind::Stdout,
        bytes::Bytes::from_static(b"\nthe last line\n"),
    ));
    let mut kept_max = (0, 0);
    let mut out = BoundedOutput::new(EXEC_STDOUT_LIMIT);
    let mut err = BoundedOutput::new(EXEC_STDERR_LIMIT);
    for (kind, data) in &msgs {
        match kind {
            Kind::Stdout => out.push(data),
            _ => err.push(data),
        }
        kept_max = (kept_max.0.max(out.kept()), kept_max.1.max(err.kept()));
    }
    assert_eq!(kept_max, (EXEC_STDOUT_LIMIT, EXEC_STDERR_LIMIT));
    let total_out = 1024 * 64 * 1024 + 15;
    assert_eq!(out.dropped() + out.kept() as u64, total_out as u64);
    // The same through the stream collector.
    let stream = msgs
        .into_iter()
        .map(|(k, data)| {
            Ok(ExecOutput {
                stream: k as i32,
                data,
                exit_code: 0,
                resource_usage: None,
            })
        })
        .chain([Ok(ExecOutput {
            stream: Kind::Exit as i32,
            data: bytes::Bytes::new(),
            exit_code: 7,
            resource_usage: None,
        })]);
    let mut stream = futures::stream::iter(stream);
    let (o, e, code) = futures::executor::block_on(collect_bounded(
        &mut stream,
        EXEC_STDOUT_LIMIT,
        EXEC_STDERR_LIMIT,
    ))
    .unwrap();
    assert_eq!(code, 7);
    assert_eq!((o.kept(), e.kept()), (EXEC_STDOUT_LIMIT, EXEC_STDERR_LIMIT));
    let dropped = o.dropped();
    let text = o.render();
    assert!(text.len() <= MAX_OUTPUT_BYTES + 300, "{}", text.len());
    assert!(text.ends_with("the last line\n"), "{text}");
    assert!(
        text.contains(&format!(
            "output cut at 1 MiB while the command ran; {dropped} bytes more not shown"
        )),
        "{text}"
    );
    assert!(e
        .render()
        .contains("output cut at 256 KiB while the command ran"));
    // No exit status: an error, as before.
    let mut cut = futures::stream::iter(Vec::<Result<ExecOutput, Status>>::new());
    let r = futures::executor::block_on(collect_bounded(&mut cut, 10, 10));
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);
}

#[test]
fn bounded_output_keeps_head_and_tail() {
    let mut b = BoundedOutput::new(10);
    b.push(b"0123");
    b.push(b"456789abcdef");
    b.push(b"g");
    assert_eq!(b.kept(), 10);
    assert_eq!(b.dropped(), 7);
    let t = b.render();
    assert!(t.starts_with("01234"), "{t}");
    assert!(t.contains("cdefg"), "{t}");
    assert!(t.contains("output cut at 10 bytes while the command ran; 7 bytes more not shown"));
    let mut small = BoundedOutput::new(EXEC_STDOUT_LIMIT);
    small.push(b"ok\n");
    assert_eq!(small.render(), "ok\n");
}

#[test]
fn one_long_line_is_cut_by_bytes() {
    let s = "é".repeat(20_000);
    let c = cut_output(&s);
    assert!(c.len() <= MAX_OUTPUT_BYTES + 200, "{}", c.len());
    assert!(c.contains("bytes omitted"));
}
