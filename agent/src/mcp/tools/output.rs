//! An exec's output as the model sees it: collected within per-stream bounds while the
//! command runs, then cut to its head and tail by bytes and lines.

use futures::StreamExt;
use tonic::Status;

use super::*;

/// Drains an exec output stream, keeping each stream within its bound; returns stdout,
/// stderr and the exit code. A stream that ends without an exit status is `UNAVAILABLE`.
pub async fn collect_bounded<S>(
    out: &mut S,
    stdout_limit: usize,
    stderr_limit: usize,
) -> Result<(BoundedOutput, BoundedOutput, i32), Status>
where
    S: futures::Stream<Item = Result<memoh_proto::pb::mcpcontainer::ExecOutput, Status>> + Unpin,
{
    use memoh_proto::pb::mcpcontainer::exec_output::Stream as Kind;
    let mut stdout = BoundedOutput::new(stdout_limit);
    let mut stderr = BoundedOutput::new(stderr_limit);
    while let Some(msg) = out.next().await.transpose()? {
        match Kind::try_from(msg.stream) {
            Ok(Kind::Stdout) => stdout.push(&msg.data),
            Ok(Kind::Stderr) => stderr.push(&msg.data),
            Ok(Kind::Exit) => {
                memoh_proto::client::finish_after_exit(out).await;
                return Ok((stdout, stderr, msg.exit_code));
            }
            Err(_) => return Err(Status::internal("unknown exec output stream kind")),
        }
    }
    Err(Status::unavailable(
        "exec stream ended without an exit status",
    ))
}

/// One output stream kept within `limit` bytes while it arrives: its first `limit / 2` bytes
/// and its latest `limit - limit / 2`; what falls between is counted and dropped.
#[derive(Debug)]
pub struct BoundedOutput {
    limit: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: u64,
}

impl BoundedOutput {
    /// An empty stream bounded by `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            head: Vec::new(),
            tail: std::collections::VecDeque::new(),
            dropped: 0,
        }
    }

    /// Adds the next bytes of the stream.
    pub fn push(&mut self, data: &[u8]) {
        let head_room = (self.limit / 2).saturating_sub(self.head.len());
        let (h, rest) = data.split_at(head_room.min(data.len()));
        self.head.extend_from_slice(h);
        let cap = self.limit - self.limit / 2;
        if rest.len() >= cap {
            self.dropped += (self.tail.len() + rest.len() - cap) as u64;
            self.tail.clear();
            self.tail.extend(&rest[rest.len() - cap..]);
        } else {
            self.tail.extend(rest);
            let over = self.tail.len().saturating_sub(cap);
            self.tail.drain(..over);
            self.dropped += over as u64;
        }
    }

    /// Bytes held.
    pub fn kept(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Bytes dropped for the bound.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The text for the tool's result: cut by [`cut_output`], and when the bound dropped
    /// output, saying so and how much.
    pub fn render(self) -> String {
        let mut bytes = self.head;
        bytes.extend(self.tail);
        let text = String::from_utf8_lossy(&bytes);
        if self.dropped == 0 {
            return cut_output(&text);
        }
        let note = format!(
            "output cut at {} while the command ran; {} bytes more not shown",
            human_size(self.limit),
            self.dropped
        );
        cut_output_noting(&text, Some(&note))
    }
}

/// `1 MiB`, `256 KiB`, or bytes.
fn human_size(n: usize) -> String {
    const KIB: usize = 1024;
    if n >= KIB * KIB && n % (KIB * KIB) == 0 {
        format!("{} MiB", n / (KIB * KIB))
    } else if n >= KIB && n % KIB == 0 {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

/// Cuts output over [`MAX_OUTPUT_BYTES`] or [`MAX_OUTPUT_LINES`] to its head and tail, with a
/// marker line saying how many lines and bytes were left out.
pub fn cut_output(s: &str) -> String {
    cut_output_noting(s, None)
}

/// [`cut_output`], with `note` added to the marker (and a marker even when nothing else is
/// cut).
fn cut_output_noting(s: &str, note: Option<&str>) -> String {
    let lines = s.split_inclusive('\n').count();
    if s.len() <= MAX_OUTPUT_BYTES && lines <= MAX_OUTPUT_LINES {
        return match note {
            None => s.to_string(),
            Some(n) => {
                let sep = if s.ends_with('\n') || s.is_empty() {
                    ""
                } else {
                    "\n"
                };
                format!("{s}{sep}... [{n}] ...\n")
            }
        };
    }
    let keep_lines = MAX_OUTPUT_LINES / 2 - 10;
    let keep_bytes = MAX_OUTPUT_BYTES / 2 - 256;
    let all: Vec<&str> = s.split_inclusive('\n').collect();
    let mut head = String::new();
    let mut head_n = 0;
    for l in &all {
        if head_n >= keep_lines || head.len() + l.len() > keep_bytes {
            break;
        }
        head.push_str(l);
        head_n += 1;
    }
    if head_n == 0 {
        head = prefix_at_char(s, keep_bytes).to_string();
    }
    let mut tail_parts: Vec<&str> = Vec::new();
    let mut tail_len = 0;
    for l in all.iter().skip(head_n).rev() {
        if tail_parts.len() >= keep_lines || tail_len + l.len() > keep_bytes {
            break;
        }
        tail_len += l.len();
        tail_parts.push(l);
    }
    tail_parts.reverse();
    let mut tail: String = tail_parts.concat();
    if tail.is_empty() && head.len() < s.len() {
        tail = suffix_at_char(s, keep_bytes.min(s.len() - head.len())).to_string();
    }
    let cut_bytes = s.len() - head.len() - tail.len();
    let cut_lines = s[head.len()..s.len() - tail.len()].matches('\n').count();
    let sep = if head.ends_with('\n') || head.is_empty() {
        ""
    } else {
        "\n"
    };
    let note = note.map(|n| format!("; {n}")).unwrap_or_default();
    format!(
        "{head}{sep}... [output cut: {cut_lines} lines, {cut_bytes} bytes omitted of {lines} lines, {} bytes{note}] ...\n{tail}",
        s.len()
    )
}

fn prefix_at_char(s: &str, max: usize) -> &str {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

fn suffix_at_char(s: &str, max: usize) -> &str {
    let mut i = s.len() - max.min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
