//! The allow-list of ReverseHTTP: which host HTTP services a bot's requests may reach.
//!
//! An entry is `http://HOST[:PORT]/PATH`; a request (the bot's path and query) is allowed when
//! its path, normalised, lies in an entry's path on segment boundaries (`/hooks/` allows
//! `/hooks` and `/hooks/a`, never `/hooksx`). Normalising decodes every percent escape once,
//! resolves `.` and `..` (`%2e%2e` included), drops empty segments, and refuses a decoded
//! `/`, `\` or NUL inside a segment and any `..` above the root: what is checked is exactly
//! what is sent, re-encoded, so no later decoding upstream can step out of the prefix.

use std::fmt;

/// One allowed prefix: where the requests under it are sent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct AllowEntry {
    /// `HOST:PORT` of the upstream (the port made explicit).
    pub authority: String,
    /// The prefix's decoded path segments.
    pub segments: Vec<String>,
    /// The entry as written, for messages.
    pub text: String,
}

impl TryFrom<String> for AllowEntry {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        AllowEntry::parse(&text)
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl AllowEntry {
    /// Parses `http://HOST[:PORT]/PATH`. https, credentials, a query or a fragment are
    /// refused with a message naming the entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("[reverse_http] allow entry {text:?}: {why}");
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(bad(
                "https is not supported: the agent relays over plain http only",
            ));
        }
        if !lower.starts_with("http://") {
            return Err(bad("use http://HOST:PORT/PATH"));
        }
        let rest = &text["http://".len()..];
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("needs a host and no credentials"));
        }
        if path.contains('?') || path.contains('#') {
            return Err(bad("a prefix has no query or fragment"));
        }
        let auth: http::uri::Authority = authority
            .parse()
            .map_err(|_| bad("the host and port do not parse"))?;
        let host = auth.host();
        let port = match auth.as_str().strip_prefix(host).unwrap_or_default() {
            "" => 80,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port must be 1 to 65535"))?,
        };
        let authority = format!("{host}:{port}");
        let segments = normalize_path(path).map_err(|e| bad(&e))?.0;
        Ok(Self {
            authority,
            segments,
            text: text.to_string(),
        })
    }

    /// Whether the normalised `segments` lie in this entry's prefix.
    pub fn covers(&self, segments: &[String]) -> bool {
        segments.len() >= self.segments.len() && segments[..self.segments.len()] == self.segments
    }
}

/// A request path as checked and as it will be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanPath {
    /// Decoded segments after resolving dots.
    pub segments: Vec<String>,
    /// The path re-encoded from `segments` (with the trailing `/` the request had).
    pub path: String,
    /// The query as given (without `?`), if any.
    pub query: Option<String>,
}

impl CleanPath {
    /// Path and query, ready to append to `http://HOST:PORT`.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Parses the bot's `url` (origin form: `/path?query`) into its normalised path and query.
pub fn clean_url(url: &str) -> Result<CleanPath, String> {
    if !url.starts_with('/') {
        return Err("the url must be a path starting with /".into());
    }
    if url.contains('#') {
        return Err("the url has a fragment".into());
    }
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    if let Some(q) = &query {
        if !q.bytes().all(query_byte) {
            return Err("the query holds characters a url may not".into());
        }
    }
    let (segments, trailing) = normalize_path(path)?;
    let mut out = String::new();
    for s in &segments {
        out.push('/');
        encode_segment(s, &mut out);
    }
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    Ok(CleanPath {
        segments,
        path: out,
        query,
    })
}

/// Decodes and resolves `path`'s segments; also says whether it ended in `/`.
fn normalize_path(path: &str) -> Result<(Vec<String>, bool), String> {
    let mut out: Vec<String> = Vec::new();
    let mut trailing = false;
    for raw in path.split('/') {
        trailing = raw.is_empty();
        let seg = percent_decode(raw)?;
        if seg.contains(['/', '\\', '\0']) {
            return Err("a path segment holds an encoded '/', '\\' or NUL".into());
        }
        match seg.as_str() {
            "" => {}
            "." => trailing = true,
            ".." => {
                if out.pop().is_none() {
                    return Err("the path climbs above the root".into());
                }
                trailing = true;
            }
            _ => out.push(seg),
        }
    }
    Ok((out, trailing))
}

/// Decodes `%XX` escapes once; the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "a bad percent escape in the path".to_string())?;
                out.push(hex);
                i += 3;
            }
            c if path_byte(c) => {
                out.push(c);
                i += 1;
            }
            _ => return Err("the path holds characters a url may not".into()),
        }
    }
    String::from_utf8(out).map_err(|_| "the path is not utf-8 once decoded".to_string())
}

/// Bytes a path segment may hold unescaped (RFC 3986 pchar without `%`).
fn path_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&c)
}

/// Bytes a query may hold (pchar, `/`, `?` and escapes).
fn query_byte(c: u8) -> bool {
    path_byte(c) || c == b'/' || c == b'?' || c == b'%'
}

fn encode_segment(s: &str, out: &mut String) {
    for &c in s.as_bytes() {
        if path_byte(c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
}

/// The allow-list as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<AllowEntry>);

impl AllowList {
    /// The entry with the longest prefix covering `p`, if any.
    pub fn find(&self, p: &CleanPath) -> Option<&AllowEntry> {
        self.0
            .iter()
            .filter(|e| e.covers(&p.segments))
            .max_by_key(|e| e.segments.len())
    }
}
