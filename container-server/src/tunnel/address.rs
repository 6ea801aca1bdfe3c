//! A tunnel's target: `host:port` parsed strictly, resolved once, and accepted only when every
//! address it resolves to is a loopback one. The dial then uses exactly the addresses checked
//! here (no second lookup), so a name cannot resolve to loopback for the check and elsewhere
//! for the dial.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use crate::error::ServerError;

/// How long a name's lookup may take (the blocking thread finishes it on its own).
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest `address` accepted (a DNS name is at most 253 bytes).
const MAX_ADDRESS_LEN: usize = 300;

/// The host part of a tunnel address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An IP literal in canonical form (dotted quad, or IPv6 in brackets).
    Ip(IpAddr),
    /// A DNS name, to be resolved.
    Name(String),
}

fn invalid(address: &str, why: &str) -> ServerError {
    ServerError::InvalidArgument(format!("invalid tunnel address {address:?}: {why}"))
}

/// Splits `host:port` (`[v6]:port` for IPv6). Refused as INVALID_ARGUMENT: an empty host, a
/// port that is not 1..=65535 in plain digits, an unbracketed IPv6 address, a malformed DNS
/// name, and the shorthand numeric forms C's `inet_aton` accepts (`127.1`, `2130706433`,
/// `0x7f000001`, `0177.0.0.1`), which mean different hosts to different parsers.
pub fn parse(address: &str) -> Result<(Host, u16), ServerError> {
    if address.len() > MAX_ADDRESS_LEN {
        return Err(invalid(address, "too long"));
    }
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (v6, port) = rest
            .split_once("]:")
            .ok_or_else(|| invalid(address, "use [ipv6]:port"))?;
        let ip: Ipv6Addr = v6
            .parse()
            .map_err(|_| invalid(address, "not an ipv6 address in brackets"))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| invalid(address, "missing port (use host:port)"))?;
        if host.contains(':') {
            return Err(invalid(address, "an ipv6 address must be in brackets"));
        }
        (parse_host(address, host)?, port)
    };
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(address, "bad port"));
    }
    let port: u16 = port.parse().map_err(|_| invalid(address, "bad port"))?;
    if port == 0 {
        return Err(invalid(address, "port 0"));
    }
    Ok((host, port))
}

fn parse_host(address: &str, host: &str) -> Result<Host, ServerError> {
    if host.is_empty() {
        return Err(invalid(address, "empty host"));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if looks_numeric(host) {
        return Err(invalid(
            address,
            "shorthand numeric host (write the address as a dotted quad)",
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(invalid(address, "not a host name or ip address"));
    }
    Ok(Host::Name(host.to_string()))
}

/// True when every dot-separated part is a number as C's `inet_aton` reads one (decimal,
/// octal with a leading 0, hex with 0x): a host that resolvers may turn into an IP address.
fn looks_numeric(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let parts: Vec<&str> = host.split('.').collect();
    parts.len() <= 4
        && parts.iter().all(|p| {
            let hex = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X"));
            match hex {
                Some(h) => h.bytes().all(|b| b.is_ascii_hexdigit()),
                None => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()),
            }
        })
}

/// True for loopback addresses: IPv4 127/8, `::1`, and IPv4-mapped `::ffff:127.x.y.z`.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped().is_some_and(|v4| v4.octets()[0] == 127)
        }
    }
}

/// Accepts `resolved` only when it is not empty and every address is loopback (PERMISSION_DENIED
/// naming the first that is not). IPv4-mapped addresses come back as plain IPv4, so the dial
/// does not depend on the kernel's IPv6 support.
pub fn check_resolved(
    address: &str,
    resolved: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, ServerError> {
    if resolved.is_empty() {
        return Err(invalid(address, "the name resolves to no address"));
    }
    let mut out = Vec::with_capacity(resolved.len());
    for sa in resolved {
        if !is_loopback(sa.ip()) {
            return Err(ServerError::PermissionDenied(format!(
                "tunnel address {address:?} resolves to {}, which is not a loopback address; \
                 tunnels reach loopback services of the bot only",
                sa.ip()
            )));
        }
        let ip = match sa.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        out.push(SocketAddr::new(ip, sa.port()));
    }
    Ok(out)
}

/// Parses, resolves (names through the system resolver on a blocking thread) and checks a
/// tunnel address: the addresses to dial, in the resolver's order.
pub async fn resolve(address: &str) -> Result<Vec<SocketAddr>, ServerError> {
    let (host, port) = parse(address)?;
    let resolved = match host {
        Host::Ip(ip) => vec![SocketAddr::new(ip, port)],
        Host::Name(name) => {
            let lookup =
                crate::runtime::spawn_blocking(move || (name.as_str(), port).to_socket_addrs())?;
            let looked_up = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
                .await
                .map_err(|_| invalid(address, "lookup timed out"))?
                .map_err(|e| ServerError::Spawn(std::io::Error::other(e)))?;
            looked_up
                .map_err(|e| invalid(address, &format!("lookup failed: {e}")))?
                .collect()
        }
    };
    check_resolved(address, resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_forms() {
        let yes = [
            "127.0.0.1",
            "127.255.255.254",
            "127.0.1.1",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:127.9.8.7",
        ];
        for ip in yes {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        let no = [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "192.0.2.2",
            "169.254.169.254",
            "128.0.0.1",
            "126.255.255.255",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "fe80::1",
            "::2",
            "255.255.255.255",
        ];
        for ip in no {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn address_syntax() {
        let ok = [
            ("127.0.0.1:80", Host::Ip("127.0.0.1".parse().unwrap()), 80),
            ("[::1]:8080", Host::Ip("::1".parse().unwrap()), 8080),
            (
                "[::ffff:127.0.0.1]:1",
                Host::Ip("::ffff:127.0.0.1".parse().unwrap()),
                1,
            ),
            ("localhost:65535", Host::Name("localhost".into()), 65535),
            ("my_svc.local.:5", Host::Name("my_svc.local.".into()), 5),
            ("0.0.0.0:80", Host::Ip("0.0.0.0".parse().unwrap()), 80),
        ];
        for (a, host, port) in ok {
            assert_eq!(parse(a).unwrap(), (host, port), "{a}");
        }
        let bad = [
            "",
            "127.0.0.1",
            ":80",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:+80",
            "127.0.0.1:8O",
            "::1:80",
            "[::1]",
            "[::1]80",
            "[127.0.0.1]:80",
            "[fe80::1%eth0]:80",
            "2130706433:80",
            "0x7f000001:80",
            "0X7F000001:80",
            "127.1:80",
            "127.0.1:80",
            "0177.0.0.1:80",
            "127.0.0.01:80",
            "0:80",
            "127.0.0.1.:80",
            "-bad.example:80",
            "a..b:80",
            "a b:80",
            "host/x:80",
            "user@127.0.0.1:80",
        ];
        for a in bad {
            let e = parse(a).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{a}: {e}");
            assert!(e.to_string().starts_with("invalid tunnel address"), "{e}");
        }
        let long = format!("{}:80", "a".repeat(400));
        assert_eq!(parse(&long).unwrap_err().code(), Code::InvalidArgument);
    }

    #[test]
    fn every_resolved_address_must_be_loopback() {
        // What a name resolves to, as the system resolver might answer.
        let ok = check_resolved("localhost:1", vec![sa("127.0.0.1:1"), sa("[::1]:1")]).unwrap();
        assert_eq!(ok, vec![sa("127.0.0.1:1"), sa("[::1]:1")]);
        // An IPv4-mapped loopback is dialled as plain IPv4.
        let mapped = check_resolved("x:2", vec![sa("[::ffff:127.0.0.1]:2")]).unwrap();
        assert_eq!(mapped, vec![sa("127.0.0.1:2")]);
        let refused = [
            vec![sa("127.0.0.1:1"), sa("10.0.0.7:1")],
            vec![sa("10.0.0.7:1"), sa("127.0.0.1:1")],
            vec![sa("[::1]:1"), sa("[::ffff:192.0.2.2]:1")],
            vec![sa("0.0.0.0:1")],
            vec![sa("[::]:1")],
            vec![sa("192.0.2.2:1")],
        ];
        for r in refused {
            let e = check_resolved("name:1", r.clone()).unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{r:?}");
            assert!(e.to_string().contains("not a loopback address"), "{e}");
        }
        let e = check_resolved("name:1", vec![]).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn literals_resolve_without_a_lookup() {
        assert_eq!(
            resolve("127.0.0.1:9").await.unwrap(),
            vec![sa("127.0.0.1:9")]
        );
        for a in ["0.0.0.0:9", "[::]:9", "192.0.2.2:9", "[::ffff:10.1.2.3]:9"] {
            let e = resolve(a).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{a}");
        }
        let e = resolve("no-such-host.invalid:9").await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    }
}
