//! Network containment of bots: what a bot's packets may reach, as an nftables ruleset.
//!
//! Every bot runs code an AI wrote, so the host treats each bot's port on the bridge as
//! hostile. The agent keeps two tables of its own, both named `memoh-<containerd namespace>`
//! (two agents on one host never share or collide): one in the `bridge` family, which sees
//! every frame a bot sends at layer 2, and one in the `inet` family, which sees what a bot
//! sends to the host (`input`) or through it (`forward`). The whole ruleset is rendered from
//! the saved attachments of the agent's bots and its settings ([`render`]) and replaced in one
//! `nft -f` transaction whenever a bot is attached or detached, so the kernel never holds half
//! of it; the tables go with the agent's last bot.
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

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// The nftables priority of the agent's chains: before the usual `filter` chains, so a
/// counter on a drop counts every packet the agent refused.
const PRIORITY: i32 = -300;

/// The name of the agent's tables for containerd namespace `namespace`.
pub fn table_name(namespace: &str) -> String {
    format!("memoh-{namespace}")
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

/// Whether `s` is an interface name safe to quote in a ruleset.
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// `elements = { a, b };` or nothing for an empty set (nft refuses an empty list).
fn elements<I: IntoIterator<Item = String>>(items: I) -> String {
    let v: BTreeSet<String> = items.into_iter().collect();
    if v.is_empty() {
        String::new()
    } else {
        format!(
            " elements = {{ {} }};",
            v.into_iter().collect::<Vec<_>>().join(", ")
        )
    }
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

/// Merges overlapping or adjacent port ranges of one protocol (an interval set refuses
/// overlaps).
fn merged_ports(ports: &[HostPort]) -> Vec<HostPort> {
    let mut v = ports.to_vec();
    v.sort();
    let mut out: Vec<HostPort> = Vec::new();
    for p in v {
        match out.last_mut() {
            Some(last)
                if last.proto == p.proto && u32::from(p.first) <= u32::from(last.last) + 1 =>
            {
                last.last = last.last.max(p.last);
            }
            _ => out.push(p),
        }
    }
    out
}

/// The nameservers of a resolv.conf, loopback ones left out (a bot cannot reach the host's
/// loopback); a scope (`fe80::1%eth0`) is dropped.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .collect()
}

/// The script that removes the agent's tables (a missing table is fine: it is added first).
pub fn remove_script(table: &str) -> String {
    format!(
        "table bridge {table}\ndelete table bridge {table}\ntable inet {table}\ndelete table inet {table}\n"
    )
}

/// Renders the whole ruleset for `ports` under `policy`: one `nft -f` script that replaces
/// both tables atomically. Ports whose names or MAC are unusable are refused (an error names
/// the bot), never silently left out.
pub fn render(policy: &Policy, ports: &[BotPort], resolvers: &[IpAddr]) -> Result<String, String> {
    let t = &policy.table;
    if !valid_table_name(t) {
        return Err(format!("nftables table name {t:?} is not usable"));
    }
    for p in ports {
        if !valid_ifname(&p.veth) || !valid_ifname(&p.bridge) {
            return Err(format!(
                "bot {}: interface names {:?}/{:?} are not usable",
                p.bot, p.veth, p.bridge
            ));
        }
        if let Some(mac) = &p.mac {
            if !valid_mac(mac) {
                return Err(format!("bot {}: mac address {mac:?} is not usable", p.bot));
            }
        }
    }
    let v4 = |p: &BotPort| {
        p.addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .collect::<Vec<Ipv4Addr>>()
    };
    let v6 = |p: &BotPort| {
        p.addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(a) => Some(*a),
                IpAddr::V4(_) => None,
            })
            .collect::<Vec<Ipv6Addr>>()
    };

    let mut s = String::new();
    let _ = writeln!(s, "table bridge {t}\ndelete table bridge {t}");
    let _ = writeln!(s, "table bridge {t} {{");
    let _ = writeln!(
        s,
        "  set ports {{ type ifname;{} }}",
        elements(ports.iter().map(|p| quoted(&p.veth)))
    );
    let _ = writeln!(
        s,
        "  set isolated {{ type ifname;{} }}",
        elements(ports.iter().filter(|p| p.isolated).map(|p| quoted(&p.veth)))
    );
    if policy.enabled {
        let _ = writeln!(
            s,
            "  set ports6 {{ type ifname;{} }}",
            elements(
                ports
                    .iter()
                    .filter(|p| !v6(p).is_empty())
                    .map(|p| quoted(&p.veth))
            )
        );
        let _ = writeln!(
            s,
            "  set hw {{ type ifname . ether_addr;{} }}",
            elements(ports.iter().filter_map(|p| {
                p.mac
                    .as_ref()
                    .map(|m| format!("{} . {}", quoted(&p.veth), m.to_ascii_lowercase()))
            }))
        );
        let _ = writeln!(
            s,
            "  set addr4 {{ type ifname . ether_addr . ipv4_addr;{} }}",
            elements(ports.iter().flat_map(|p| {
                let mac = p.mac.clone();
                v4(p).into_iter().filter_map(move |a| {
                    mac.as_ref()
                        .map(|m| format!("{} . {} . {a}", quoted(&p.veth), m.to_ascii_lowercase()))
                })
            }))
        );
        let _ = writeln!(
            s,
            "  set addr6 {{ type ifname . ipv6_addr;{} }}",
            elements(ports.iter().flat_map(|p| {
                v6(p)
                    .into_iter()
                    .map(move |a| format!("{} . {a}", quoted(&p.veth)))
            }))
        );
        let _ = writeln!(s, "  chain prerouting {{");
        let _ = writeln!(
            s,
            "    type filter hook prerouting priority {PRIORITY}; policy accept;"
        );
        let _ = writeln!(s, "    iifname != @ports accept");
        let _ = writeln!(
            s,
            "    iifname . ether saddr != @hw counter drop comment \"bot sent from a mac not its own\""
        );
        let _ = writeln!(
            s,
            "    iifname . arp saddr ether . arp saddr ip != @addr4 counter drop comment \"bot sent arp for an address not its own\""
        );
        let _ = writeln!(
            s,
            "    iifname . ether saddr . ip saddr != @addr4 counter drop comment \"bot sent from an ipv4 address not its own\""
        );
        let _ = writeln!(
            s,
            "    ether type ip6 iifname != @ports6 counter drop comment \"bot without ipv6 sent ipv6\""
        );
        let _ = writeln!(s, "    ip6 saddr {{ ::, fe80::/10 }} accept");
        let _ = writeln!(
            s,
            "    iifname . ip6 saddr != @addr6 counter drop comment \"bot sent from an ipv6 address not its own\""
        );
        let _ = writeln!(
            s,
            "    ether type != {{ ip, arp, ip6 }} counter drop comment \"bot sent another ethertype\""
        );
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "  chain forward {{");
    let _ = writeln!(
        s,
        "    type filter hook forward priority {PRIORITY}; policy accept;"
    );
    let _ = writeln!(
        s,
        "    iifname @isolated counter drop comment \"bot to another port of the bridge\""
    );
    let _ = writeln!(
        s,
        "    oifname @isolated counter drop comment \"another port of the bridge to a bot\""
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");

    let bridges: BTreeSet<&str> = ports.iter().map(|p| p.bridge.as_str()).collect();
    let isolated_bridges: BTreeSet<&str> = ports
        .iter()
        .filter(|p| p.isolated)
        .map(|p| p.bridge.as_str())
        .collect();
    let _ = writeln!(s, "table inet {t}\ndelete table inet {t}");
    let _ = writeln!(s, "table inet {t} {{");
    let _ = writeln!(
        s,
        "  set bridges {{ type ifname;{} }}",
        elements(bridges.iter().map(|b| quoted(b)))
    );
    let _ = writeln!(
        s,
        "  set bridged_isolated {{ type ifname . ifname;{} }}",
        elements(
            isolated_bridges
                .iter()
                .map(|b| format!("{} . {}", quoted(b), quoted(b)))
        )
    );
    let _ = writeln!(
        s,
        "  set bridged_open {{ type ifname . ifname;{} }}",
        elements(
            bridges
                .iter()
                .filter(|b| !isolated_bridges.contains(*b))
                .map(|b| format!("{} . {}", quoted(b), quoted(b)))
        )
    );
    if policy.enabled {
        let gateways = |v6: bool| {
            ports
                .iter()
                .flat_map(|p| p.gateways.iter())
                .filter(|g| g.is_ipv6() == v6)
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
        };
        let cidrs = |v6: bool, list: &mut dyn Iterator<Item = Cidr>| {
            list.filter(|c| c.addr.is_ipv6() == v6)
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
        };
        let _ = writeln!(
            s,
            "  set gateways4 {{ type ipv4_addr;{} }}",
            elements(gateways(false))
        );
        let _ = writeln!(
            s,
            "  set gateways6 {{ type ipv6_addr;{} }}",
            elements(gateways(true))
        );
        let _ = writeln!(
            s,
            "  set resolvers4 {{ type ipv4_addr;{} }}",
            elements(
                resolvers
                    .iter()
                    .filter(|a| a.is_ipv4())
                    .map(|a| a.to_string())
            )
        );
        let _ = writeln!(
            s,
            "  set resolvers6 {{ type ipv6_addr;{} }}",
            elements(
                resolvers
                    .iter()
                    .filter(|a| a.is_ipv6())
                    .map(|a| a.to_string())
            )
        );
        let _ = writeln!(
            s,
            "  set host_ports {{ type inet_proto . inet_service; flags interval;{} }}",
            elements(merged_ports(&policy.host_ports_allowed).iter().map(|p| {
                if p.first == p.last {
                    format!("{} . {}", p.proto.as_str(), p.first)
                } else {
                    format!("{} . {}-{}", p.proto.as_str(), p.first, p.last)
                }
            }))
        );
        fn blocked(list: &'static [&'static str]) -> impl Iterator<Item = Cidr> {
            list.iter()
                .map(|c| c.parse::<Cidr>().expect("built-in cidr"))
        }
        for (name, v6, list) in [
            (
                "egress4",
                false,
                cidrs(false, &mut policy.egress_allowed.iter().copied()),
            ),
            (
                "egress6",
                true,
                cidrs(true, &mut policy.egress_allowed.iter().copied()),
            ),
            ("blocked4", false, cidrs(false, &mut blocked(BLOCKED_V4))),
            ("blocked6", true, cidrs(true, &mut blocked(BLOCKED_V6))),
        ] {
            let ty = if v6 { "ipv6_addr" } else { "ipv4_addr" };
            let _ = writeln!(
                s,
                "  set {name} {{ type {ty}; flags interval; auto-merge;{} }}",
                elements(list)
            );
        }
        let _ = writeln!(s, "  chain input {{");
        let _ = writeln!(
            s,
            "    type filter hook input priority {PRIORITY}; policy accept;"
        );
        let _ = writeln!(s, "    iifname != @bridges accept");
        let _ = writeln!(s, "    ct state established,related accept");
        let _ = writeln!(s, "    ip daddr @gateways4 icmp type echo-request accept");
        let _ = writeln!(
            s,
            "    ip6 daddr @gateways6 icmpv6 type echo-request accept"
        );
        let _ = writeln!(
            s,
            "    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept"
        );
        let _ = writeln!(s, "    meta l4proto . th dport @host_ports accept");
        let _ = writeln!(
            s,
            "    ip daddr @resolvers4 meta l4proto {{ tcp, udp }} th dport 53 accept"
        );
        let _ = writeln!(
            s,
            "    ip6 daddr @resolvers6 meta l4proto {{ tcp, udp }} th dport 53 accept"
        );
        let _ = writeln!(s, "    counter drop comment \"bot to host\"");
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "  chain forward {{");
    let _ = writeln!(
        s,
        "    type filter hook forward priority {PRIORITY}; policy accept;"
    );
    let _ = writeln!(s, "    iifname != @bridges accept");
    let _ = writeln!(s, "    iifname . oifname @bridged_open accept");
    let _ = writeln!(
        s,
        "    iifname . oifname @bridged_isolated counter drop comment \"bot to bot\""
    );
    if policy.enabled {
        let _ = writeln!(s, "    ct state established,related accept");
        let _ = writeln!(
            s,
            "    ip daddr @resolvers4 meta l4proto {{ tcp, udp }} th dport 53 accept"
        );
        let _ = writeln!(
            s,
            "    ip6 daddr @resolvers6 meta l4proto {{ tcp, udp }} th dport 53 accept"
        );
        let _ = writeln!(s, "    ip daddr @egress4 accept");
        let _ = writeln!(s, "    ip6 daddr @egress6 accept");
        let _ = writeln!(
            s,
            "    ip daddr @blocked4 counter drop comment \"bot to a private, loopback or link-local range\""
        );
        let _ = writeln!(
            s,
            "    ip6 daddr @blocked6 counter drop comment \"bot to a private, loopback or link-local range\""
        );
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(bot: &str, veth: &str, ip: &str, isolated: bool) -> BotPort {
        BotPort {
            bot: bot.into(),
            veth: veth.into(),
            bridge: "cni0".into(),
            mac: Some("02:AA:bb:cc:dd:01".into()),
            addrs: vec![ip.parse().unwrap()],
            gateways: vec!["10.88.0.1".parse().unwrap()],
            isolated,
        }
    }

    #[test]
    fn host_ports_parse_and_print() {
        for (s, want) in [
            ("udp/53", "udp/53"),
            ("TCP/53", "tcp/53"),
            ("tcp/8000-8080", "tcp/8000-8080"),
            ("sctp/1-1", "sctp/1"),
        ] {
            assert_eq!(s.parse::<HostPort>().unwrap().to_string(), want, "{s}");
        }
        for bad in [
            "53",
            "icmp/1",
            "tcp/0",
            "tcp/65536",
            "tcp/9-8",
            "tcp/x",
            "tcp/",
        ] {
            let e = bad.parse::<HostPort>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn cidrs_parse_and_refuse_host_bits() {
        for (s, want) in [
            ("10.1.0.0/16", "10.1.0.0/16"),
            ("192.168.1.7", "192.168.1.7/32"),
            ("fd00::/8", "fd00::/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::/0", "::/0"),
            ("fe80::1", "fe80::1/128"),
        ] {
            assert_eq!(s.parse::<Cidr>().unwrap().to_string(), want, "{s}");
        }
        for bad in ["10.1.2.3/16", "fd00::1/8", "x", "10.0.0.0/33", "-j ACCEPT"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        for c in BLOCKED_V4.iter().chain(BLOCKED_V6) {
            c.parse::<Cidr>().unwrap();
        }
    }

    #[test]
    fn nameservers_of_a_resolv_conf() {
        let text = "# comment\nnameserver 192.168.1.1\nnameserver 127.0.0.53\nsearch lan\n\
                    nameserver fe80::1%eth0\nnameserver ::1\nnameserver bogus\n";
        assert_eq!(
            nameservers(text),
            vec![
                "192.168.1.1".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn table_names() {
        assert_eq!(table_name("default"), "memoh-default");
        assert!(valid_table_name("memoh-e2e-1a2b"));
        assert!(valid_table_name("memoh-a.b_c"));
        for bad in ["", "9x", "-x", "a b", "a\"b", "a;b"] {
            assert!(!valid_table_name(bad), "{bad}");
        }
    }

    #[test]
    fn ports_merge() {
        let p = |s: &str| s.parse::<HostPort>().unwrap();
        assert_eq!(
            merged_ports(&[
                p("tcp/53"),
                p("udp/53"),
                p("tcp/50-60"),
                p("tcp/61"),
                p("tcp/53")
            ]),
            [p("tcp/50-61"), p("udp/53")]
        );
    }

    #[test]
    fn ruleset_names_every_bot_and_every_rule() {
        let mut policy = Policy::strict("memoh-default");
        policy.host_ports_allowed = vec!["udp/53".parse().unwrap(), "tcp/53".parse().unwrap()];
        policy.egress_allowed = vec!["10.1.0.0/16".parse().unwrap(), "fd00::/64".parse().unwrap()];
        let mut b = port("b", "vethb", "10.88.0.3", true);
        b.addrs.push("fd00:88::3".parse().unwrap());
        let ports = [port("a", "vetha", "10.88.0.2", true), b];
        let s = render(&policy, &ports, &["10.255.255.53".parse().unwrap()]).unwrap();
        for want in [
            "table bridge memoh-default\ndelete table bridge memoh-default\n",
            "table inet memoh-default\ndelete table inet memoh-default\n",
            "set ports { type ifname; elements = { \"vetha\", \"vethb\" }; }",
            "set isolated { type ifname; elements = { \"vetha\", \"vethb\" }; }",
            "set ports6 { type ifname; elements = { \"vethb\" }; }",
            "\"vetha\" . 02:aa:bb:cc:dd:01 . 10.88.0.2",
            "\"vethb\" . fd00:88::3",
            "set bridged_isolated { type ifname . ifname; elements = { \"cni0\" . \"cni0\" }; }",
            "set bridged_open { type ifname . ifname; }",
            "set gateways4 { type ipv4_addr; elements = { 10.88.0.1 }; }",
            "elements = { tcp . 53, udp . 53 }",
            "set egress4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.1.0.0/16 }; }",
            "set egress6 { type ipv6_addr; flags interval; auto-merge; elements = { fd00::/64 }; }",
            "169.254.0.0/16",
            "fe80::/10",
            "iifname @isolated counter drop",
            "counter drop comment \"bot to host\"",
            "ip daddr @blocked4 counter drop",
            "set resolvers4 { type ipv4_addr; elements = { 10.255.255.53 }; }",
            "ip daddr @resolvers4 meta l4proto { tcp, udp } th dport 53 accept",
        ] {
            assert!(s.contains(want), "missing {want:?} in:\n{s}");
        }
        // Allowed before blocked, replies before both.
        let at = |w: &str| s.find(w).unwrap_or_else(|| panic!("{w}"));
        assert!(at("ip daddr @egress4 accept") < at("ip daddr @blocked4"));
        assert!(at("ct state established,related accept") < at("meta l4proto . th dport"));
    }

    #[test]
    fn without_containment_only_isolation_is_rendered() {
        let s = render(
            &Policy::off("memoh-x"),
            &[port("a", "vetha", "10.88.0.2", false)],
            &[],
        )
        .unwrap();
        assert!(!s.contains("prerouting"), "{s}");
        assert!(!s.contains("chain input"), "{s}");
        assert!(s.contains("set isolated { type ifname; }"), "{s}");
        assert!(
            s.contains(
                "set bridged_open { type ifname . ifname; elements = { \"cni0\" . \"cni0\" }; }"
            ),
            "{s}"
        );
    }

    #[test]
    fn unusable_names_are_refused() {
        let policy = Policy::strict("memoh-default");
        let mut p = port("a", "veth\"; flush ruleset", "10.88.0.2", true);
        assert!(render(&policy, std::slice::from_ref(&p), &[])
            .unwrap_err()
            .contains("bot a"));
        p.veth = "vetha".into();
        p.mac = Some("02:aa".into());
        assert!(render(&policy, &[p], &[]).unwrap_err().contains("mac"));
        assert!(render(&Policy::strict("9bad"), &[], &[]).is_err());
        assert!(remove_script("memoh-default").contains("delete table inet memoh-default"));
    }
}
