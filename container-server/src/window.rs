//! The numbered line window of `ReadFile`, pure and streaming: lines are split as Go's
//! `bufio.ScanLines` splits them, but without its 64 KiB line limit.

use std::io::BufRead;

/// Most lines one window returns (and the default).
pub const MAX_LINES: usize = 200;
/// Longest line, in Unicode scalar values, before it is cut and marked with `...`.
pub const MAX_LINE_CHARS: usize = 1000;
/// The window's content never grows past this many bytes.
pub const MAX_WINDOW_BYTES: usize = 5120;
/// How much of the head is checked for a NUL byte to call the file binary.
pub const BINARY_SNIFF_BYTES: usize = 8192;
/// Most lines one raw window (a `bridgepb` caller's) returns, and its default.
pub const MAX_RAW_LINES: usize = 2000;
/// A raw window has no byte cap of its own, but its response must fit in one gRPC message:
/// past this many bytes of content the window is refused (16 MiB less room for the rest).
pub const MAX_RAW_WINDOW_BYTES: usize = memoh_proto::limits::MAX_MESSAGE_SIZE - 64 * 1024;

/// The requested window after clamping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    /// 1-based first line.
    pub first: usize,
    /// Number of lines.
    pub count: usize,
    /// Raw lines (`bridgepb`): each line as it is plus `\n`, no number, no cut, no 5120-byte
    /// cap. Else numbered lines (`mcpcontainer`, WIRE.md).
    pub raw: bool,
}

impl WindowSpec {
    /// Clamps the request's values: `line_offset` below 1 means 1, `n_lines` outside 1..=200
    /// means 200.
    pub fn from_request(line_offset: i32, n_lines: i32) -> Self {
        let first = if line_offset < 1 {
            1
        } else {
            line_offset as usize
        };
        let count = if n_lines < 1 || n_lines as usize > MAX_LINES {
            MAX_LINES
        } else {
            n_lines as usize
        };
        Self {
            first,
            count,
            raw: false,
        }
    }

    /// The raw window of a `bridgepb` caller (WIRE-BRIDGE.md section 3): `line_offset` below 1
    /// means 1, `n_lines` outside 1..=2000 means 2000.
    pub fn raw_from_request(line_offset: i32, n_lines: i32) -> Self {
        let count = match usize::try_from(n_lines) {
            Ok(n) if (1..=MAX_RAW_LINES).contains(&n) => n,
            _ => MAX_RAW_LINES,
        };
        Self {
            count,
            raw: true,
            ..Self::from_request(line_offset, 1)
        }
    }
}

/// A finished window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// Numbered lines, `%6d\t%s\n` each.
    pub content: String,
    /// Every line in the file.
    pub total_lines: usize,
    /// A NUL byte was found in the first 8 KiB; no content.
    pub binary: bool,
    /// A raw window grew past [`MAX_RAW_WINDOW_BYTES`]; no content.
    pub too_large: bool,
}

/// Reads `r` to its end, returning the window and the total line count. A NUL in the first
/// 8 KiB short-circuits to `binary`.
pub fn read_window<R: BufRead>(mut r: R, spec: WindowSpec) -> std::io::Result<Window> {
    // Sniff without consuming more than the reader already buffered.
    let head = r.fill_buf()?;
    if head.len() < BINARY_SNIFF_BYTES {
        // The buffer may hold less than 8 KiB although the file is longer; sniff as we go.
    }
    let mut out = Window::default();
    let mut line = Vec::with_capacity(256);
    let mut sniffed = 0usize;
    let mut full = false;
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if sniffed < BINARY_SNIFF_BYTES {
            let take = (BINARY_SNIFF_BYTES - sniffed).min(line.len());
            if line[..take].contains(&0) {
                return Ok(Window {
                    binary: true,
                    ..Window::default()
                });
            }
            sniffed += take;
        }
        out.total_lines += 1;
        let no = out.total_lines;
        if full || no < spec.first || no >= spec.first + spec.count {
            continue;
        }
        let text = trim_line_ending(&line);
        if spec.raw {
            let text = String::from_utf8_lossy(text);
            if out.content.len() + text.len() + 1 > MAX_RAW_WINDOW_BYTES {
                return Ok(Window {
                    total_lines: out.total_lines,
                    too_large: true,
                    ..Window::default()
                });
            }
            out.content.push_str(&text);
            out.content.push('\n');
            continue;
        }
        let formatted = format_line(no, text);
        if out.content.len() + formatted.len() > MAX_WINDOW_BYTES {
            full = true;
            continue;
        }
        out.content.push_str(&formatted);
    }
    Ok(out)
}

/// Drops the `\n` and one `\r` before it (or a final `\r` at the end of the file).
fn trim_line_ending(line: &[u8]) -> &[u8] {
    let l = line.strip_suffix(b"\n").unwrap_or(line);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// One numbered line, cut to 1000 characters with `...` appended when longer.
pub fn format_line(no: usize, text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    let body: std::borrow::Cow<'_, str> = match s.char_indices().nth(MAX_LINE_CHARS) {
        Some((cut, _)) => format!("{}...", &s[..cut]).into(),
        None => s,
    };
    format!("{no:>6}\t{body}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(input: &str, off: i32, n: i32) -> Window {
        read_window(input.as_bytes(), WindowSpec::from_request(off, n)).unwrap()
    }

    #[test]
    fn clamping() {
        let cases = [
            ((0, 0), (1, 200)),
            ((-5, -1), (1, 200)),
            ((3, 10), (3, 10)),
            ((1, 201), (1, 200)),
            ((1, 200), (1, 200)),
        ];
        for ((o, n), (first, count)) in cases {
            let want = WindowSpec {
                first,
                count,
                raw: false,
            };
            assert_eq!(WindowSpec::from_request(o, n), want);
        }
        let raw = [
            ((0, 0), (1, 2000)),
            ((-1, -1), (1, 2000)),
            ((4, 2000), (4, 2000)),
            ((2, 2001), (2, 2000)),
            ((1, 7), (1, 7)),
        ];
        for ((o, n), (first, count)) in raw {
            let want = WindowSpec {
                first,
                count,
                raw: true,
            };
            assert_eq!(WindowSpec::raw_from_request(o, n), want, "{o} {n}");
        }
    }

    #[test]
    fn raw_lines_have_no_number_cut_or_cap() {
        let raw = |input: &str, o, n| {
            read_window(input.as_bytes(), WindowSpec::raw_from_request(o, n)).unwrap()
        };
        let w = raw("a\r\nb\n\nlast", 1, 0);
        assert_eq!((w.content.as_str(), w.total_lines), ("a\nb\n\nlast\n", 4));
        assert_eq!(raw("a\nb\nc\n", 2, 1).content, "b\n");
        let long = "é".repeat(3000);
        assert_eq!(raw(&long, 1, 1).content, format!("{long}\n"));
        let text: String = (0..3000).map(|i| format!("{i:0>100}\n")).collect();
        let w = raw(&text, 1, 0);
        assert_eq!(w.content.lines().count(), 2000);
        assert_eq!(w.content.len(), 2000 * 101);
        assert_eq!(w.total_lines, 3000);
        assert!(raw("x\0y", 1, 0).binary);
        let huge = "z".repeat(MAX_RAW_WINDOW_BYTES);
        let w = raw(&huge, 1, 0);
        assert!(w.too_large && w.content.is_empty(), "{}", w.content.len());
    }

    #[test]
    fn scanlines_splitting() {
        let cases: [(&str, usize, &str); 7] = [
            ("", 0, ""),
            ("\n", 1, "     1\t\n"),
            ("a", 1, "     1\ta\n"),
            ("a\nb", 2, "     1\ta\n     2\tb\n"),
            ("a\r\nb\r\n", 2, "     1\ta\n     2\tb\n"),
            ("a\r", 1, "     1\ta\n"),
            ("a\r\r\n", 1, "     1\ta\r\n"),
        ];
        for (input, total, content) in cases {
            let w = win(input, 1, 200);
            assert_eq!(w.total_lines, total, "{input:?}");
            assert_eq!(w.content, content, "{input:?}");
        }
    }

    #[test]
    fn offsets_and_totals() {
        let text: String = (1..=500).map(|i| format!("line {i}\n")).collect();
        let w = win(&text, 499, 10);
        assert_eq!(w.total_lines, 500);
        assert_eq!(w.content, "   499\tline 499\n   500\tline 500\n");
        let w = win(&text, 1, 0);
        assert_eq!(w.content.lines().count(), 200);
        let w = win(&text, 600, 5);
        assert_eq!(w.content, "");
        assert_eq!(w.total_lines, 500);
    }

    #[test]
    fn long_lines_are_cut_by_chars() {
        let line = "é".repeat(1500);
        let w = win(&line, 1, 1);
        let want = format!("     1\t{}...\n", "é".repeat(1000));
        assert_eq!(w.content, want);
        let exact = "x".repeat(1000);
        assert_eq!(win(&exact, 1, 1).content, format!("     1\t{exact}\n"));
    }

    #[test]
    fn window_stops_before_5120_bytes() {
        let text: String = (0..100).map(|_| format!("{}\n", "y".repeat(100))).collect();
        let w = win(&text, 1, 200);
        assert!(w.content.len() <= MAX_WINDOW_BYTES);
        // Each line is 108 bytes: 47 fit (5076), 48 would not (5184).
        assert_eq!(w.content.lines().count(), 47);
        assert_eq!(w.total_lines, 100);
    }

    #[test]
    fn huge_line_does_not_stop_the_count() {
        let text = format!("{}\nsecond\nthird\n", "z".repeat(200_000));
        let w = win(&text, 2, 5);
        assert_eq!(w.total_lines, 3);
        assert_eq!(w.content, "     2\tsecond\n     3\tthird\n");
    }

    #[test]
    fn binary_detection() {
        let w = win("abc\0def\n", 1, 10);
        assert!(w.binary);
        assert!(w.content.is_empty());
        let late = format!("{}\0", "a\n".repeat(5000));
        assert!(!win(&late, 1, 10).binary);
    }
}
