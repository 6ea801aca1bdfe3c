//! Invariant checks for hostile input, shared by the cargo-fuzz targets in `fuzz/` and the
//! corpus replay test (`tests/fuzz_corpus.rs`). Each check takes raw fuzzer bytes, runs one pure
//! function and panics when an invariant does not hold; "no panic" alone is never the bar.

use std::io::BufReader;
use std::path::Path;

use memoh_proto::limits::MAX_PATH_LEN;

use crate::paths::{base_name, clean, Resolver};
use crate::window::{
    format_line, read_window, WindowSpec, BINARY_SNIFF_BYTES, MAX_LINE_CHARS, MAX_WINDOW_BYTES,
};

/// `ReadFile`'s window: bytes 0..4 are `line_offset`, 4..8 `n_lines` (little endian), byte 8
/// the reader's buffer size; the rest is the file.
///
/// Checks: at most 5120 bytes; the same window whatever the buffering; every line is a
/// right-aligned number (consecutive from the first requested line), a tab and at most 1000
/// characters (plus `...`); the window stops early only when the next line would not fit; the
/// total is the `bufio.ScanLines` count; binary only with a NUL in the first 8 KiB.
pub fn read_window_check(data: &[u8]) {
    let int = |i: usize| {
        data.get(i..i + 4)
            .map_or(0, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let spec = WindowSpec::from_request(int(0), int(4));
    let cap = data.get(8).map_or(1, |b| usize::from(*b % 64) + 1);
    let file = data.get(9..).unwrap_or_default();

    let w = read_window(file, spec).expect("reading a slice cannot fail");
    let small = read_window(BufReader::with_capacity(cap, file), spec).expect("no io error");
    assert_eq!(w, small, "the window depends on buffering (capacity {cap})");
    assert!(
        w.content.len() <= MAX_WINDOW_BYTES,
        "window over 5120 bytes"
    );

    let head = &file[..file.len().min(BINARY_SNIFF_BYTES)];
    if w.binary {
        assert!(head.contains(&0), "binary without a NUL in the head");
        assert!(w.content.is_empty() && w.total_lines == 0);
        return;
    }
    assert!(
        !head.contains(&0),
        "a NUL in the head was not called binary"
    );

    // bufio.ScanLines: every '\n' ends a line, and a non-empty tail is one more.
    let lines: Vec<&[u8]> = file.split_inclusive(|b| *b == b'\n').collect();
    assert_eq!(w.total_lines, lines.len(), "total line count");

    let mut shown = 0usize;
    for (i, line) in w.content.split_inclusive('\n').enumerate() {
        let no = spec.first + i;
        let line = line
            .strip_suffix('\n')
            .expect("every line ends with a newline");
        let (num, body) = line.split_once('\t').expect("a tab after the number");
        assert!(num.len() >= 6, "number not padded to six: {num:?}");
        let digits = num.trim_start_matches(' ');
        assert!(
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
            "not a right-aligned number: {num:?}"
        );
        assert_eq!(
            digits.parse::<usize>().ok(),
            Some(no),
            "line numbers in order"
        );
        let chars = body.chars().count();
        assert!(
            chars <= MAX_LINE_CHARS || (chars == MAX_LINE_CHARS + 3 && body.ends_with("...")),
            "line of {chars} characters not cut"
        );
        shown += 1;
    }
    assert!(shown <= spec.count, "more lines than asked for");
    let available = lines.len().saturating_sub(spec.first - 1).min(spec.count);
    if shown < available {
        // Stopped early: only because the next line would not fit.
        let next = spec.first + shown;
        let raw = lines[next - 1];
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let len = format_line(next, raw).len();
        assert!(
            w.content.len() + len > MAX_WINDOW_BYTES,
            "stopped at line {next} although it fits"
        );
    }
}

/// Path cleaning and resolution: the input is the path as UTF-8; a first byte of `~` picks a
/// second data directory.
///
/// Checks: cleaned paths are never empty, have no `//`, `.` or trailing `/`, no `..` when
/// rooted and only leading `..` otherwise, and are fixed points of `clean`; resolved paths are
/// absolute and clean, absolute inputs resolve to their cleaned selves, relative inputs without
/// `..` stay under the data directory; empty, NUL-containing and overlong paths are refused.
pub fn path_resolve_check(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (dir, s) = match s.strip_prefix('~') {
        Some(rest) => ("/var/lib/memoh data/..x", rest),
        None => ("/data", s),
    };
    let c = clean(s);
    check_clean(s, &c);

    let r = Resolver::new(dir);
    let refused = s.is_empty() || s.len() > MAX_PATH_LEN || s.contains('\0');
    match r.resolve("path", s) {
        Err(_) => assert!(refused, "{s:?} refused"),
        Ok(p) => {
            assert!(!refused, "{s:?} accepted");
            let p = p.to_str().expect("resolved paths stay UTF-8");
            assert!(p.starts_with('/'), "{p:?} is not absolute");
            assert_eq!(clean(p), p, "resolved path is not clean");
            if s.starts_with('/') {
                assert_eq!(p, c, "absolute paths resolve to their cleaned selves");
            } else if !s.split('/').any(|part| part == "..") {
                assert!(
                    Path::new(p).starts_with(dir),
                    "{s:?} resolved to {p:?} outside {dir:?}"
                );
            }
            let b = base_name(Path::new(p));
            assert!(
                b == "/" || (!b.is_empty() && !b.contains('/')),
                "base {b:?}"
            );
        }
    }
}

fn check_clean(s: &str, c: &str) {
    assert!(!c.is_empty(), "clean({s:?}) is empty");
    assert_eq!(
        c.starts_with('/'),
        s.starts_with('/'),
        "rootedness of {s:?}"
    );
    assert_eq!(clean(c), c, "clean is not idempotent on {s:?}");
    if c == "/" || c == "." {
        return;
    }
    assert!(!c.ends_with('/'), "trailing slash in {c:?}");
    let body = c.strip_prefix('/').unwrap_or(c);
    let mut past_dots = false;
    for part in body.split('/') {
        assert!(!part.is_empty(), "empty element in {c:?}");
        assert!(part != ".", "'.' element in {c:?}");
        if part == ".." {
            assert!(!c.starts_with('/'), "'..' after the root in {c:?}");
            assert!(!past_dots, "'..' after a name in {c:?}");
        } else {
            past_dots = true;
        }
    }
}
