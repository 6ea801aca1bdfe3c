//! The `edit` tool's matcher: pure text logic, no I/O.
//!
//! An edit replaces exactly one occurrence of `old_text`. The exact text is tried first; when it
//! does not occur, a tolerant comparison runs in which trailing spaces and tabs of each line,
//! curly quotes, Unicode dashes and Unicode spaces count as their plain ASCII forms. Either way
//! the match must be unique. Only the matched region of the file is rewritten: a byte-order mark,
//! CRLF line endings and every byte outside the match stay as they were.

use std::fmt;

/// Why an edit could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditError {
    /// `old_text` is empty.
    EmptyOldText,
    /// The file is not UTF-8 text.
    NotText,
    /// Neither the exact nor the tolerant comparison found `old_text`.
    NotFound,
    /// `old_text` occurs more than once (`count` places).
    Ambiguous {
        /// How many places matched.
        count: usize,
        /// Whether the count comes from the tolerant comparison.
        tolerant: bool,
    },
}

impl fmt::Display for EditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EditError::EmptyOldText => write!(f, "old_text is empty"),
            EditError::NotText => write!(f, "the edit tool only supports utf-8 text files"),
            EditError::NotFound => write!(f, "old_text was not found in the file"),
            EditError::Ambiguous { count, tolerant } => write!(
                f,
                "old_text matches {count} places{}; include more surrounding text to make it unique",
                if *tolerant {
                    " (ignoring trailing whitespace, quote, dash and space variants)"
                } else {
                    ""
                }
            ),
        }
    }
}

impl std::error::Error for EditError {}

/// How the match was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    /// `old_text` occurs verbatim (after adapting its line endings to the file's).
    Exact,
    /// Found by the tolerant comparison.
    Tolerant,
}

const BOM: &str = "\u{feff}";

/// Applies one edit to `file` and returns the new content and how it matched.
pub fn apply(
    file: &[u8],
    old_text: &str,
    new_text: &str,
) -> Result<(Vec<u8>, MatchKind), EditError> {
    if old_text.is_empty() {
        return Err(EditError::EmptyOldText);
    }
    let whole = std::str::from_utf8(file).map_err(|_| EditError::NotText)?;
    let Some(body) = whole.strip_prefix(BOM) else {
        return apply_to("", whole, old_text, new_text);
    };
    // The BOM is the file's marker, kept and out of reach of the match, unless `old_text`
    // itself starts with it (copied from a read of the file's first line) and is found only
    // that way: then the whole file is the text and the edit is taken as given.
    match apply_to(BOM, body, old_text, new_text) {
        Err(EditError::NotFound) if old_text.starts_with(BOM) => {
            apply_to("", whole, old_text, new_text)
        }
        r => r,
    }
}

/// [`apply`] on `text`, the file after its BOM (`bom`, empty when it has none).
fn apply_to(
    bom: &str,
    text: &str,
    old_text: &str,
    new_text: &str,
) -> Result<(Vec<u8>, MatchKind), EditError> {
    let crlf = uses_crlf(text);
    let old = if crlf {
        to_crlf(old_text)
    } else {
        old_text.to_string()
    };
    let new = if crlf {
        to_crlf(new_text)
    } else {
        new_text.to_string()
    };

    // The adapted text first; then, in a file with mixed line endings, the text as given (it
    // may sit in a stretch with the minority's endings; the tolerant pass cannot see a lone
    // `\r` at its end), replaced verbatim.
    let verbatim = if old != old_text {
        find_exact(text, old_text)?.map(|at| (at, at + old_text.len()))
    } else {
        None
    };
    let (start, end, kind, new) = match (find_exact(text, &old)?, verbatim) {
        (Some(at), _) => (at, at + old.len(), MatchKind::Exact, new),
        (None, Some((s, e))) => (s, e, MatchKind::Exact, new_text.to_string()),
        (None, None) => {
            let (s, e) = find_tolerant(text, old_text)?;
            (s, e, MatchKind::Tolerant, new)
        }
    };
    let mut out = String::with_capacity(bom.len() + text.len() + new.len());
    out.push_str(bom);
    out.push_str(&text[..start]);
    out.push_str(&new);
    out.push_str(&text[end..]);
    Ok((out.into_bytes(), kind))
}

/// A file counts as CRLF when most of its line breaks are `\r\n`.
fn uses_crlf(text: &str) -> bool {
    let lf = text.matches('\n').count();
    let crlf = text.matches("\r\n").count();
    crlf > 0 && crlf * 2 >= lf
}

/// Turns every lone `\n` into `\r\n`.
fn to_crlf(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut prev = '\0';
    for c in s.chars() {
        if c == '\n' && prev != '\r' {
            out.push('\r');
        }
        out.push(c);
        prev = c;
    }
    out
}

fn find_exact(text: &str, old: &str) -> Result<Option<usize>, EditError> {
    let mut hits = text.match_indices(old);
    let Some((first, _)) = hits.next() else {
        return Ok(None);
    };
    let more = hits.count();
    if more > 0 {
        return Err(EditError::Ambiguous {
            count: more + 1,
            tolerant: false,
        });
    }
    Ok(Some(first))
}

/// The ASCII form of a character for the tolerant comparison.
fn fold(c: char) -> char {
    match c {
        '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' | '\u{2032}' => '\'',
        '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' | '\u{2033}' => '"',
        '\u{2010}' | '\u{2011}' | '\u{2012}' | '\u{2013}' | '\u{2014}' | '\u{2015}'
        | '\u{2212}' | '\u{fe58}' | '\u{fe63}' | '\u{ff0d}' => '-',
        '\u{00a0}' | '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}' => ' ',
        c => c,
    }
}

/// Text folded for the tolerant comparison, with each folded byte's source span.
struct Folded {
    text: String,
    /// For each byte of `text`: the start of the source character it came from.
    starts: Vec<usize>,
    /// For each byte of `text`: the end of the source character it came from.
    ends: Vec<usize>,
}

/// Folds `s`: characters via [`fold`], `\r\n` to `\n`, and spaces and tabs before a line end
/// (or the end of the text) dropped.
fn fold_text(s: &str) -> Folded {
    let mut f = Folded {
        text: String::with_capacity(s.len()),
        starts: Vec::with_capacity(s.len()),
        ends: Vec::with_capacity(s.len()),
    };
    // Pending horizontal whitespace: emitted only if something other than a line end follows.
    let mut pending: Vec<(char, usize, usize)> = Vec::new();
    let mut it = s.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        let end = i + c.len_utf8();
        let c = fold(c);
        if c == ' ' || c == '\t' {
            pending.push((c, i, end));
            continue;
        }
        let (c, end) = if c == '\r' && matches!(it.peek(), Some((_, '\n'))) {
            let (j, _) = it.next().unwrap_or((end, '\n'));
            ('\n', j + 1)
        } else {
            (c, end)
        };
        if c == '\n' {
            pending.clear();
        } else {
            for (pc, ps, pe) in pending.drain(..) {
                push(&mut f, pc, ps, pe);
            }
        }
        push(&mut f, c, i, end);
    }
    f
}

fn push(f: &mut Folded, c: char, start: usize, end: usize) {
    f.text.push(c);
    for _ in 0..c.len_utf8() {
        f.starts.push(start);
        f.ends.push(end);
    }
}

fn find_tolerant(text: &str, old: &str) -> Result<(usize, usize), EditError> {
    let hay = fold_text(text);
    let needle = fold_text(old).text;
    if needle.is_empty() {
        return Err(EditError::NotFound);
    }
    let hits: Vec<usize> = hay.text.match_indices(&needle).map(|(i, _)| i).collect();
    match hits.as_slice() {
        [] => Err(EditError::NotFound),
        [at] => {
            let s = hay.starts[*at];
            let e = hay.ends[*at + needle.len() - 1];
            Ok((s, e))
        }
        many => Err(EditError::Ambiguous {
            count: many.len(),
            tolerant: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(file: &str, old: &str, new: &str) -> (String, MatchKind) {
        let (out, k) = apply(file.as_bytes(), old, new).unwrap();
        (String::from_utf8(out).unwrap(), k)
    }

    #[test]
    fn table() {
        use MatchKind::*;
        let cases: &[(&str, &str, &str, &str, MatchKind)] = &[
            // (file, old, new, expected, kind)
            ("a\nb\nc\n", "b", "B", "a\nB\nc\n", Exact),
            ("  x = 1\n", "  x = 1", "  x = 2", "  x = 2\n", Exact),
            // whitespace in arguments is kept, never trimmed
            ("f()\n", "f()", "  g()\n\n", "  g()\n\n\n", Exact),
            // CRLF file, LF arguments: endings follow the file
            ("a\r\nb\r\nc\r\n", "a\nb", "x\ny", "x\r\ny\r\nc\r\n", Exact),
            // BOM kept
            ("\u{feff}one\ntwo\n", "one", "1", "\u{feff}1\ntwo\n", Exact),
            // trailing whitespace in the file
            (
                "fn a() {   \n  b();\t\n}\nrest  \n",
                "fn a() {\n  b();\n}",
                "X",
                "X\nrest  \n",
                Tolerant,
            ),
            // trailing whitespace in old_text
            (
                "let a = 1;\nlet b = 2;\n",
                "let a = 1;   \nlet b",
                "Z",
                "Z = 2;\n",
                Tolerant,
            ),
            // curly quotes in the file, straight in old_text
            (
                "say \u{201c}hi\u{201d} and \u{2018}yo\u{2019}\n",
                "\"hi\" and 'yo'",
                "ok",
                "say ok\n",
                Tolerant,
            ),
            // straight in the file, curly in old_text
            (
                "print(\"x\")\n",
                "print(\u{201c}x\u{201d})",
                "p()",
                "p()\n",
                Tolerant,
            ),
            // dashes and non-breaking spaces
            ("a \u{2014} b\u{00a0}c\n", "a - b c", "d", "d\n", Tolerant),
            // the rest of the file keeps its curly quotes and trailing spaces
            (
                "\u{201c}q\u{201d}  \nkeep \u{2013} me  \n",
                "\"q\"",
                "Q",
                "Q  \nkeep \u{2013} me  \n",
                Tolerant,
            ),
            // tolerant match on a CRLF file keeps CRLF elsewhere
            ("a  \r\nb\r\nc\r\n", "a\nb", "z", "z\r\nc\r\n", Tolerant),
            // mixed endings: the LF-ending text as given sits in a CRLF file
            (
                "fn)\nb\r\nc\nc\r\nf\nc\r\n\r\nb",
                "n)\nb\r\nc\nc\r",
                "N",
                "fN\nf\nc\r\n\r\nb",
                Exact,
            ),
            // old_text copied with the BOM from a read of the first line
            (
                "\u{feff}first\nsecond\n",
                "\u{feff}first",
                "\u{feff}1st",
                "\u{feff}1st\nsecond\n",
                Exact,
            ),
            // a BOM-led old_text that also occurs after the BOM matches there, BOM kept
            (
                "\u{feff}a\u{feff}b\n",
                "\u{feff}b",
                "c",
                "\u{feff}ac\n",
                Exact,
            ),
            // tolerant with BOM
            (
                "\u{feff}x\u{2019}s  \ny\n",
                "x's\ny",
                "k",
                "\u{feff}k\n",
                Tolerant,
            ),
        ];
        for (file, old, new, want, kind) in cases {
            let (got, k) = ok(file, old, new);
            assert_eq!(&got, want, "file {file:?} old {old:?}");
            assert_eq!(k, *kind, "file {file:?} old {old:?}");
        }
    }

    #[test]
    fn errors() {
        let cases: &[(&[u8], &str, EditError)] = &[
            (b"a", "", EditError::EmptyOldText),
            (b"abc", "zz", EditError::NotFound),
            (
                b"x x x",
                "x",
                EditError::Ambiguous {
                    count: 3,
                    tolerant: false,
                },
            ),
            (
                b"q  \nq\n",
                "q \n",
                EditError::Ambiguous {
                    count: 2,
                    tolerant: true,
                },
            ),
            (b"\xff\xfe", "a", EditError::NotText),
        ];
        for (file, old, want) in cases {
            assert_eq!(apply(file, old, "n").unwrap_err(), *want, "old {old:?}");
        }
    }

    #[test]
    fn exact_wins_over_tolerant() {
        let (out, k) = apply("a\u{2019}\na'\n".as_bytes(), "a'", "b").unwrap();
        assert_eq!(k, MatchKind::Exact);
        assert_eq!(out, "a\u{2019}\nb\n".as_bytes());
    }

    #[test]
    fn messages_say_how_many() {
        let e = apply(b"x x", "x", "y").unwrap_err();
        assert!(e.to_string().contains("matches 2 places"), "{e}");
    }
}
