//! The nftables script of the containment ruleset: both tables rendered from the policy and
//! the bots' ports ([`render`]), or removed ([`remove_script`]).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{valid_mac, valid_table_name, BotPort, Cidr, HostPort, Policy, BLOCKED_V4, BLOCKED_V6};

/// The nftables priority of the agent's chains: before the usual `filter` chains, so a
/// counter on a drop counts every packet the agent refused.
const PRIORITY: i32 = -300;

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
pub(super) fn merged_ports(ports: &[HostPort]) -> Vec<HostPort> {
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
