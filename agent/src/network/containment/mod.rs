//! Network containment of bots: what a bot's packets may reach, as an nftables ruleset.
//!
//! Every bot runs code an AI wrote, so the host treats each bot's port on the bridge as
//! hostile. The agent keeps two tables of its own, both named `memoh-<containerd namespace>`
//! (two agents on one host never share or collide): one in the `bridge` family, which sees
//! every frame a bot sends at layer 2, and one in the `inet` family, which sees what a bot
//! sends to the host (`input`) or through it (`forward`). The whole ruleset is rendered from
//! the saved attachments of the agent's bots and its settings ([`render`]) and replaced in one
//! `nft -f` transaction, so the kernel never holds half of it; the tables go with the agent's
//! last bot. The chains match only against named sets ([`sets`]), so attaching or detaching
//! one bot is one transaction of `add element`/`delete element` for that bot's entries
//! ([`delta`]): its cost does not grow with the number of bots, where a rebuild's does.
//!
//! What a bot can and cannot do:
//!
//! - **Other bots, every protocol (IPv4, IPv6 link-local included, ARP, neighbour discovery):
//!   nothing.** Three independent layers: (1) the kernel bridge's port flag `isolated` on each
//!   bot's host veth, so the bridge itself never forwards a frame between two bot ports; (2)
//!   the `bridge` table's `forward` chain, which drops every frame from or to a bot port that
//!   the bridge would forward port to port; (3) at layer 3, the iptables rule of
//!   [`super::firewall`] (`-i BR -o BR -j DROP`, IPv4) and the `inet` table's `forward` chain
//!   (IPv4 and IPv6), which see bridged traffic when bridge netfilter is on (the agent turns
//!   `net.bridge.bridge-nf-call-iptables`/`ip6tables` on). Layers 1 and 2 need no sysctl,
//!   so isolation never silently depends on bridge netfilter. The port flag was chosen as the
//!   primary layer because it is what the bridge consults before any filter runs, covers
//!   frames no IP rule sees (ARP, multicast, neighbour discovery), and costs nothing per packet.
//! - **Its own identity only.** The `bridge` table's `prerouting` chain drops a frame from a
//!   bot port whose source MAC is not the bot's, an IPv4 packet or ARP message whose sender
//!   (MAC, address) is not the bot's, any IPv6 packet unless the bot was given an IPv6 address
//!   (then only from that address, `::` or link-local), and every other ethertype (VLAN tags
//!   included). A dropped frame is never learned by the bridge, so a bot cannot steal a
//!   neighbour's MAC. Bots without IPv6 addresses also have IPv6 turned off in their
//!   namespace, so they have no link-local address to begin with.
//! - **The host: replies and what the operator allows.** The `inet` table's `input` chain
//!   drops what a bot sends to any address of the host except replies (conntrack
//!   established/related), ICMP echo to its own gateway, and `host_ports_allowed`
//!   (`udp/53`, `tcp/8000-8080`). The agent reaching a bot's `:9090` is untouched: that is
//!   the host's own traffic, and the bot's answers are replies.
//! - **Elsewhere: the internet, not private or link-local ranges.** The `inet` table's
//!   `forward` chain drops bot packets to loopback, link-local (cloud metadata
//!   `169.254.169.254`), private, shared and unique-local ranges ([`BLOCKED_V4`],
//!   [`BLOCKED_V6`]) unless the destination is in `egress_allowed`; everything else goes out
//!   through MASQUERADE as before.
//! - **DNS.** Bots get the host's `/etc/resolv.conf`; its nameservers stay reachable on port 53
//!   (TCP and UDP), wherever they are (a LAN resolver, or the host itself), and nothing else
//!   of them. Loopback resolvers (`127.0.0.53`) are the host's own and unreachable from a bot.
//!
//! Here: the policy model ([`Policy`], [`HostPort`], [`Cidr`], [`BotPort`]) and the names it
//! checks; the nft script ([`render`], [`remove_script`]) in `render`. Applying it is
//! [`super::firewall::Firewall::apply_ruleset`]; the network module rebuilds it.

use std::net::IpAddr;
use std::str::FromStr;

use serde::Deserialize;

/// IPv4 destinations a bot may not reach through the host unless `egress_allowed` says so:
/// "this network", private ranges, shared address space (CGNAT), loopback, link-local.
pub const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
];

/// IPv6 destinations a bot may not reach through the host unless allowed: unspecified,
/// loopback, IPv4-mapped (a way back to the IPv4 ranges), unique-local, link-local.
pub const BLOCKED_V6: &[&str] = &[
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "fc00::/7",
    "fe80::/10",
];

/// The name of the agent's tables for containerd namespace `namespace`.
pub fn table_name(namespace: &str) -> String {
    crate::ids::table_name(namespace)
}

/// Whether `name` is usable as an nftables table name without quoting (nft accepts no
/// quoted table names): a letter, then letters, digits, `-`, `_` or `.`.
pub fn valid_table_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A transport protocol of [`HostPort`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

/// One entry of `host_ports_allowed`: `PROTO/PORT` or `PROTO/FIRST-LAST`, e.g. `udp/53`,
/// `tcp/8000-8080`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct HostPort {
    /// The protocol.
    pub proto: Proto,
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (`first` for one port).
    pub last: u16,
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("host port {s:?}: {why} (want PROTO/PORT or PROTO/FIRST-LAST, e.g. \"udp/53\")")
        };
        let (proto, ports) = s.split_once('/').ok_or_else(|| bad("no '/'"))?;
        let proto = match proto.trim().to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "sctp" => Proto::Sctp,
            _ => return Err(bad("protocol is not tcp, udp or sctp")),
        };
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(bad("port is not 1-65535")),
            Ok(n) => Ok(n),
        };
        let (first, last) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(ports)?;
                (p, p)
            }
        };
        if first > last {
            return Err(bad("range runs backwards"));
        }
        Ok(Self { proto, first, last })
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}/{}", self.proto.as_str(), self.first)
        } else {
            write!(f, "{}/{}-{}", self.proto.as_str(), self.first, self.last)
        }
    }
}

/// One entry of `egress_allowed`: an IPv4 or IPv6 CIDR (host bits must be zero), e.g.
/// `192.168.10.0/24`, `fd12::/64`; a bare address means that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, len) = if s.contains('/') {
            super::result::parse_cidr(s).map_err(|e| format!("cidr {s:?}: {e}"))?
        } else {
            let a: IpAddr = s.parse().map_err(|e| format!("cidr {s:?}: {e}"))?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        };
        let host_bits_zero = match addr {
            IpAddr::V4(a) => {
                (u32::from(a) & u32::MAX.checked_shr(u32::from(len)).unwrap_or(0)) == 0
            }
            IpAddr::V6(a) => {
                (u128::from(a) & u128::MAX.checked_shr(u32::from(len)).unwrap_or(0)) == 0
            }
        };
        if !host_bits_zero {
            return Err(format!(
                "cidr {s:?}: host bits are set (did you mean the network address?)"
            ));
        }
        Ok(Self { addr, len })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The containment settings of the network module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Whether bots are contained at all (anti-spoofing, bot-to-host, egress). The agent's
    /// configuration always sets it; a network without it keeps only bot-to-bot isolation.
    pub enabled: bool,
    /// The agent's tables (`bridge` and `inet` family), see [`table_name`].
    pub table: String,
    /// Ports of the host bots may open connections to (besides replies and ICMP echo to
    /// their gateway).
    pub host_ports_allowed: Vec<HostPort>,
    /// Destinations in the blocked ranges bots may reach anyway.
    pub egress_allowed: Vec<Cidr>,
    /// The resolv.conf bots are given; its nameservers stay reachable on port 53. `None`
    /// allows no resolver.
    pub resolv_conf: Option<std::path::PathBuf>,
}

impl Policy {
    /// Containment on, with nothing extra allowed, in table `table`.
    pub fn strict(table: &str) -> Self {
        Self {
            enabled: true,
            table: table.to_string(),
            host_ports_allowed: Vec::new(),
            egress_allowed: Vec::new(),
            resolv_conf: None,
        }
    }

    /// No containment (only bot-to-bot isolation, when the network isolates).
    pub fn off(table: &str) -> Self {
        Self {
            enabled: false,
            ..Self::strict(table)
        }
    }
}

/// One attached bot as the ruleset sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotPort {
    /// The bot (for comments and errors).
    pub bot: String,
    /// The host end of its veth: its port on the bridge.
    pub veth: String,
    /// The bridge.
    pub bridge: String,
    /// The MAC address of its interface (`aa:bb:..`, lowercase); `None` drops all it sends.
    pub mac: Option<String>,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// Its gateways (the bridge's addresses it may ping).
    pub gateways: Vec<IpAddr>,
    /// Whether bot-to-bot isolation applies to its bridge.
    pub isolated: bool,
}

/// Whether `s` is a MAC address as nft and the kernel write it.
pub fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

mod render;

pub use render::{delta, nameservers, remove_script, render, sets, validate, Set};

#[cfg(test)]
mod tests;
