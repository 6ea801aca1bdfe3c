//! Invariant checks for hostile input, shared by the cargo-fuzz targets in `fuzz/` and the
//! corpus replay test (`tests/fuzz_corpus.rs`). Each check takes raw fuzzer bytes, runs one pure
//! function and panics when an invariant does not hold; "no panic" alone is never the bar.

use serde_json::Value;

use crate::containerd::reference::{normalize_image_ref, ImageRef};
use crate::mcp::edit::{apply, EditError, MatchKind};
use crate::mcp::stdio::{encode_line, parse_line, request_message, response_message, Incoming};
use crate::network::result::{parse_cidr, parse_result, CniResult, PluginError};

const BOM: &str = "\u{feff}";

/// The edit matcher: the input is `file 0xFF old_text 0xFF new_text` (0xFF never occurs in
/// UTF-8, so it cannot be part of the texts).
///
/// Checks: an empty `old_text` and non-UTF-8 files are refused; a success rewrites exactly one
/// region of the file into `new_text` (its line endings adapted to a CRLF file) and keeps every
/// other byte and the BOM (unless `old_text` starts with it); an exact match is the only
/// occurrence of `old_text`; "not found" means `old_text` does not occur verbatim after the BOM
/// (nor, when it starts with one, in the whole file); ambiguity counts at least two places.
pub fn edit_matcher_check(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == 0xff);
    let file = parts.next().unwrap_or_default();
    let (Ok(old), Ok(new)) = (
        std::str::from_utf8(parts.next().unwrap_or_default()),
        std::str::from_utf8(parts.next().unwrap_or_default()),
    ) else {
        return;
    };
    let text = std::str::from_utf8(file).ok();
    match apply(file, old, new) {
        Err(EditError::EmptyOldText) => assert!(old.is_empty()),
        Err(EditError::NotText) => assert!(!old.is_empty() && text.is_none()),
        Err(EditError::NotFound) => {
            let text = text.expect("not found in a text file");
            // The matcher works on the text after a BOM, and on the whole file for an
            // `old_text` that starts with a BOM.
            let body = text.strip_prefix(BOM).unwrap_or(text);
            assert!(
                !body.contains(old) && (!old.starts_with(BOM) || !text.contains(old)),
                "{old:?} occurs in {text:?} but was not found"
            );
        }
        Err(EditError::Ambiguous { count, .. }) => assert!(count >= 2, "ambiguous with {count}"),
        Ok((out, kind)) => {
            assert!(!old.is_empty());
            let text = text.expect("an edit of a non-text file");
            let out = String::from_utf8(out).expect("the result is UTF-8");
            // Every way to read `out` as `text` with one region replaced by `new` (with an
            // empty `new` there can be several); one must fit all the invariants.
            let regions: Vec<(usize, usize)> = [new.to_string(), to_crlf(new)]
                .iter()
                .flat_map(|n| replaced_regions(text, &out, n))
                .collect();
            assert!(
                !regions.is_empty(),
                "{out:?} is not {text:?} with one region replaced by {new:?}"
            );
            let forms = [old.to_string(), to_crlf(old)];
            let fits = |&(start, end): &(usize, usize)| {
                let removed = &text[start..end];
                // Where the match was looked for: after the BOM, or the whole file when the
                // match takes the BOM itself.
                let searched = match text.strip_prefix(BOM) {
                    Some(body) if start >= BOM.len() => body,
                    _ => text,
                };
                !removed.is_empty()
                    && (!text.starts_with(BOM) || start >= BOM.len() || old.starts_with(BOM))
                    && (kind != MatchKind::Exact
                        || forms
                            .iter()
                            .any(|o| o == removed && searched.matches(o.as_str()).count() == 1))
            };
            assert!(
                regions.iter().any(fits),
                "{kind:?} edit of {text:?} with {old:?} -> {new:?} gave {out:?}"
            );
        }
    }
}

/// Every `(start, end)` such that `out` is `text` with `text[start..end]` replaced by `new`.
fn replaced_regions(text: &str, out: &str, new: &str) -> Vec<(usize, usize)> {
    let prefix = text
        .bytes()
        .zip(out.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let Some(tail) = out.len().checked_sub(new.len()) else {
        return Vec::new();
    };
    (0..=prefix.min(tail))
        .filter_map(|start| {
            if !out.is_char_boundary(start) || !out[start..].starts_with(new) {
                return None;
            }
            let after = &out[start..];
            let suffix = &after[new.len()..];
            let end = text.len().checked_sub(suffix.len())?;
            (end >= start && text.ends_with(suffix) && text.is_char_boundary(end))
                .then_some((start, end))
        })
        .collect()
}

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

/// CNI results: the input is a plugin's stdout.
///
/// Checks: every address names an existing interface and has a prefix that fits its family;
/// the subnet of each address parses back with the same prefix and contains no host bits
/// beyond it; a primary address exists exactly when there are addresses; the host veth is a
/// host-side interface other than the bridge; the result survives a JSON round trip; plugin
/// error objects have a reason whenever they have a message or details.
pub fn cni_result_check(data: &[u8]) {
    if let Some(e) = PluginError::parse(data) {
        let r = e.reason();
        assert_eq!(r.is_empty(), e.msg.is_empty() && e.details.is_empty());
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok((addr, len)) = parse_cidr(s.trim()) {
            assert!(len <= if addr.is_ipv4() { 32 } else { 128 });
        }
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(r) = parse_result(&v) else {
        return;
    };
    for ip in &r.ips {
        assert!(ip.prefix_len <= if ip.address.is_ipv4() { 32 } else { 128 });
        if let Some(i) = ip.interface {
            assert!(i < r.interfaces.len(), "interface index {i} out of range");
        }
        let subnet = ip.subnet();
        let (net, len) = parse_cidr(&subnet).expect("the subnet parses");
        assert_eq!(len, ip.prefix_len);
        assert_eq!(net.is_ipv4(), ip.address.is_ipv4());
    }
    for route in &r.routes {
        parse_cidr(&route.dst).expect("route destinations are CIDRs");
    }
    assert_eq!(r.primary_ip("eth0").is_some(), !r.ips.is_empty());
    if let Some(veth) = r.host_veth(Some("cni0")) {
        assert_ne!(veth, "cni0");
        assert!(r
            .interfaces
            .iter()
            .any(|i| i.name == veth && i.sandbox.as_deref().is_none_or(str::is_empty)));
    }
    let json = serde_json::to_string(&r).expect("results serialise");
    let back: CniResult = serde_json::from_str(&json).expect("results deserialise");
    assert_eq!(back, r);
}

/// Image references: the input is the reference.
///
/// Checks: a normalised reference names a registry and a repository, has a tag or a digest,
/// normalises to itself and parses to the same parts.
pub fn image_ref_check(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(n) = normalize_image_ref(s) else {
        return;
    };
    let parsed = ImageRef::parse(s).expect("normalised, so it parses");
    assert!(parsed.tag.is_some() || parsed.digest.is_some(), "{n:?}");
    assert!(!parsed.registry.is_empty() && !parsed.repository.is_empty());
    let again = normalize_image_ref(&n)
        .unwrap_or_else(|e| panic!("{s:.80?} normalised to {n:.80?}, which is refused: {e:.200}"));
    assert_eq!(again, n, "normalising {s:.80?} twice");
    assert_eq!(ImageRef::parse(&n).expect("parses"), parsed);
}

/// The MCP bridge's JSON-RPC envelope: the input is one line a server printed.
///
/// Checks: blank and non-object lines never reach clients; replies carry an unsigned id;
/// answering a server request echoes its id unchanged, replies round-trip through the agent's
/// own encoding, and every encoded message is exactly one line that parses back to itself.
pub fn jsonrpc_envelope_check(data: &[u8]) {
    let parsed = parse_line(data);
    let text = String::from_utf8_lossy(data);
    let trimmed = text.trim();
    match &parsed {
        Incoming::Blank => assert!(trimmed.is_empty()),
        Incoming::Log(l) => {
            assert_eq!(l, trimmed);
            assert!(!matches!(
                serde_json::from_str::<Value>(trimmed),
                Ok(Value::Object(_))
            ));
        }
        Incoming::Reply { id, reply } => {
            // The agent's encoding of the same reply reads back the same.
            let line = one_line(&response_message(Value::from(*id), reply.clone()));
            assert_eq!(parse_line(&line), parsed);
        }
        Incoming::StrayReply(id) => assert!(id.as_u64().is_none()),
        Incoming::Request { id, method, params } => {
            let answer = one_line(&response_message(id.clone(), Ok(Value::Null)));
            let v: Value = serde_json::from_slice(&answer).expect("answers are JSON");
            assert_eq!(v.get("id"), Some(id), "the server's id is echoed unchanged");
            // The same request sent by the agent (with its own id) reads back the same.
            let line = one_line(&request_message(7, method, params.clone()));
            assert_eq!(
                parse_line(&line),
                Incoming::Request {
                    id: Value::from(7u64),
                    method: method.clone(),
                    params: params.clone(),
                }
            );
        }
        Incoming::Notification { .. } | Incoming::Dropped => {}
    }
}

/// Encodes `msg` and checks it is exactly one line.
fn one_line(msg: &Value) -> Vec<u8> {
    let line = encode_line(msg);
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(
        line.iter().filter(|b| **b == b'\n').count(),
        1,
        "an encoded message spans lines"
    );
    line
}
