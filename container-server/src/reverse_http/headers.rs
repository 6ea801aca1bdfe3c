//! Header forwarding between the bot's HTTP clients and the host, both directions: hop-by-hop
//! headers (RFC 9110 section 7.6.1: Connection, Keep-Alive, Proxy-*, TE, Trailer,
//! Transfer-Encoding, Upgrade, and any header a Connection header names) and Content-Length
//! are dropped; the rest are grouped by name, in first-seen order, under Go's canonical
//! spelling (`content-type` becomes `Content-Type`), as the host's `http.Header` keys are.

use memoh_proto::pb::bridgepb as bp;

/// Hop-by-hop headers every hop removes (besides `Proxy-*` and those named in Connection).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Keeps the end-to-end headers of `pairs` (name, value), grouped by name.
pub fn forwardable<'a, I>(pairs: I) -> Vec<bp::HttpHeader>
where
    I: IntoIterator<Item = (&'a str, String)>,
{
    let pairs: Vec<(&str, String)> = pairs.into_iter().collect();
    let named: Vec<String> = pairs
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out: Vec<bp::HttpHeader> = Vec::new();
    for (name, value) in pairs {
        let lower = name.to_ascii_lowercase();
        if lower.is_empty()
            || lower == "content-length"
            || lower.starts_with("proxy-")
            || HOP_BY_HOP.contains(&lower.as_str())
            || named.contains(&lower)
        {
            continue;
        }
        let canonical = canonical(name);
        match out.iter_mut().find(|h| h.name == canonical) {
            Some(h) => h.values.push(value),
            None => out.push(bp::HttpHeader {
                name: canonical,
                values: vec![value],
            }),
        }
    }
    out
}

/// Go's canonical header spelling: the first letter and each letter after `-` upper case,
/// the rest lower case; a name with a byte outside an HTTP token is kept as it is.
pub fn canonical(name: &str) -> String {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(token) {
        return name.to_string();
    }
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(h: &[bp::HttpHeader]) -> Vec<&str> {
        h.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn hop_by_hop_and_length_are_dropped() {
        let input = [
            ("host", "127.0.0.1:18732"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("Connection", "close,,x-other"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("Proxy-Connection", "keep-alive"),
            ("proxy-anything", "1"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("content-length", "12"),
            ("x-secret-hop", "dropped: named in connection"),
            ("X-Other", "dropped too"),
            ("content-type", "application/json"),
            ("accept", "a/b"),
            ("Accept", "c/d"),
            ("x-memoh-thing", "kept"),
        ];
        let got = forwardable(input.iter().map(|(n, v)| (*n, v.to_string())));
        assert_eq!(
            names(&got),
            ["Host", "Content-Type", "Accept", "X-Memoh-Thing"]
        );
        assert_eq!(got[2].values, ["a/b", "c/d"]);
        assert_eq!(got[1].values, ["application/json"]);
    }

    #[test]
    fn canonical_names() {
        for (n, want) in [
            ("content-type", "Content-Type"),
            ("X-MEMOH-ID", "X-Memoh-Id"),
            ("etag", "Etag"),
            ("a--b", "A--B"),
            ("bad name", "bad name"),
        ] {
            assert_eq!(canonical(n), want);
        }
    }
}
