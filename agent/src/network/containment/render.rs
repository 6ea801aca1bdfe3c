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

/// One named set of the ruleset: where it lives, how it is declared, what it holds. The
/// ruleset's chains only match against sets, so two rulesets for the same policy differ in
/// their sets' elements alone ([`delta`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// The table's family: `bridge` or `inet`.
    pub family: &'static str,
    /// The set's name.
    pub name: &'static str,
    /// Its declaration without the elements, e.g. `type ifname`.
    pub decl: String,
    /// Its elements as nft reads them (`"veth1" . 02:aa:bb:cc:dd:ee`).
    pub elements: BTreeSet<String>,
}

impl Set {
    fn new<I: IntoIterator<Item = String>>(
        family: &'static str,
        name: &'static str,
        decl: impl Into<String>,
        items: I,
    ) -> Self {
        Self {
            family,
            name,
            decl: decl.into(),
            elements: items.into_iter().collect(),
        }
    }

    /// Whether nft merges and splits its elements as ranges (no element-wise delta then).
    fn interval(&self) -> bool {
        self.decl.contains("flags interval")
    }

    fn write(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "  set {} {{ {};{} }}",
            self.name,
            self.decl,
            elements(self.elements.iter().cloned())
        );
    }
}

/// Refuses ports whose names or MAC could not be written into a ruleset safely (an error
/// names the bot), and a table name nft cannot take.
pub fn validate(policy: &Policy, ports: &[BotPort]) -> Result<(), String> {
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
    Ok(())
}

/// Every set of the ruleset for `ports` under `policy`, in the order they are declared. The
/// caller has [`validate`]d the ports.
pub fn sets(policy: &Policy, ports: &[BotPort], resolvers: &[IpAddr]) -> Vec<Set> {
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
    let mut out = vec![
        Set::new(
            "bridge",
            "ports",
            "type ifname",
            ports.iter().map(|p| quoted(&p.veth)),
        ),
        Set::new(
            "bridge",
            "isolated",
            "type ifname",
            ports.iter().filter(|p| p.isolated).map(|p| quoted(&p.veth)),
        ),
    ];
    if policy.enabled {
        out.push(Set::new(
            "bridge",
            "ports6",
            "type ifname",
            ports
                .iter()
                .filter(|p| !v6(p).is_empty())
                .map(|p| quoted(&p.veth)),
        ));
        out.push(Set::new(
            "bridge",
            "hw",
            "type ifname . ether_addr",
            ports.iter().filter_map(|p| {
                p.mac
                    .as_ref()
                    .map(|m| format!("{} . {}", quoted(&p.veth), m.to_ascii_lowercase()))
            }),
        ));
        out.push(Set::new(
            "bridge",
            "addr4",
            "type ifname . ether_addr . ipv4_addr",
            ports.iter().flat_map(|p| {
                let mac = p.mac.clone();
                v4(p).into_iter().filter_map(move |a| {
                    mac.as_ref()
                        .map(|m| format!("{} . {} . {a}", quoted(&p.veth), m.to_ascii_lowercase()))
                })
            }),
        ));
        out.push(Set::new(
            "bridge",
            "addr6",
            "type ifname . ipv6_addr",
            ports.iter().flat_map(|p| {
                v6(p)
                    .into_iter()
                    .map(move |a| format!("{} . {a}", quoted(&p.veth)))
            }),
        ));
    }

    let bridges: BTreeSet<&str> = ports.iter().map(|p| p.bridge.as_str()).collect();
    let isolated_bridges: BTreeSet<&str> = ports
        .iter()
        .filter(|p| p.isolated)
        .map(|p| p.bridge.as_str())
        .collect();
    out.push(Set::new(
        "inet",
        "bridges",
        "type ifname",
        bridges.iter().map(|b| quoted(b)),
    ));
    out.push(Set::new(
        "inet",
        "bridged_isolated",
        "type ifname . ifname",
        isolated_bridges
            .iter()
            .map(|b| format!("{} . {}", quoted(b), quoted(b))),
    ));
    out.push(Set::new(
        "inet",
        "bridged_open",
        "type ifname . ifname",
        bridges
            .iter()
            .filter(|b| !isolated_bridges.contains(*b))
            .map(|b| format!("{} . {}", quoted(b), quoted(b))),
    ));
    if policy.enabled {
        let gateways = |v6: bool| {
            ports
                .iter()
                .flat_map(|p| p.gateways.iter())
                .filter(move |g| g.is_ipv6() == v6)
                .map(|g| g.to_string())
        };
        let resolvers = |v6: bool| {
            resolvers
                .iter()
                .filter(move |a| a.is_ipv6() == v6)
                .map(|a| a.to_string())
        };
        out.push(Set::new(
            "inet",
            "gateways4",
            "type ipv4_addr",
            gateways(false),
        ));
        out.push(Set::new(
            "inet",
            "gateways6",
            "type ipv6_addr",
            gateways(true),
        ));
        out.push(Set::new(
            "inet",
            "resolvers4",
            "type ipv4_addr",
            resolvers(false),
        ));
        out.push(Set::new(
            "inet",
            "resolvers6",
            "type ipv6_addr",
            resolvers(true),
        ));
        out.push(Set::new(
            "inet",
            "host_ports",
            "type inet_proto . inet_service; flags interval",
            merged_ports(&policy.host_ports_allowed).iter().map(|p| {
                if p.first == p.last {
                    format!("{} . {}", p.proto.as_str(), p.first)
                } else {
                    format!("{} . {}-{}", p.proto.as_str(), p.first, p.last)
                }
            }),
        ));
        fn blocked(list: &'static [&'static str]) -> impl Iterator<Item = Cidr> {
            list.iter()
                .map(|c| c.parse::<Cidr>().expect("built-in cidr"))
        }
        let cidrs = |v6: bool, list: &mut dyn Iterator<Item = Cidr>| {
            list.filter(|c| c.addr.is_ipv6() == v6)
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
        };
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
            out.push(Set::new(
                "inet",
                name,
                format!("type {ty}; flags interval; auto-merge"),
                list,
            ));
        }
    }
    out
}

/// The script that turns the sets `old` into `new` (both from [`sets`] for the same policy)
/// in one transaction: `add element` for what `new` holds in addition, `delete element` for
/// what it no longer holds; empty when nothing changed. `None` when the two differ in more
/// than elements, or in the elements of an interval set (nft merges those): only a rebuild
/// can make that change.
pub fn delta(table: &str, old: &[Set], new: &[Set]) -> Option<String> {
    if old.len() != new.len() {
        return None;
    }
    let mut s = String::new();
    for (o, n) in old.iter().zip(new) {
        if (o.family, o.name, &o.decl) != (n.family, n.name, &n.decl) {
            return None;
        }
        if o.elements == n.elements {
            continue;
        }
        if n.interval() {
            return None;
        }
        let join = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>().join(", ");
        let added: Vec<&String> = n.elements.difference(&o.elements).collect();
        let gone: Vec<&String> = o.elements.difference(&n.elements).collect();
        if !added.is_empty() {
            let _ = writeln!(
                s,
                "add element {} {table} {} {{ {} }}",
                n.family,
                n.name,
                join(added)
            );
        }
        if !gone.is_empty() {
            let _ = writeln!(
                s,
                "delete element {} {table} {} {{ {} }}",
                n.family,
                n.name,
                join(gone)
            );
        }
    }
    Some(s)
}

/// Renders the whole ruleset for `ports` under `policy`: one `nft -f` script that replaces
/// both tables atomically. Ports whose names or MAC are unusable are refused (an error names
/// the bot), never silently left out.
pub fn render(policy: &Policy, ports: &[BotPort], resolvers: &[IpAddr]) -> Result<String, String> {
    validate(policy, ports)?;
    let t = &policy.table;
    let sets = sets(policy, ports, resolvers);
    let mut s = String::new();
    let _ = writeln!(s, "table bridge {t}\ndelete table bridge {t}");
    let _ = writeln!(s, "table bridge {t} {{");
    for set in sets.iter().filter(|x| x.family == "bridge") {
        set.write(&mut s);
    }
    if policy.enabled {
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

    let _ = writeln!(s, "table inet {t}\ndelete table inet {t}");
    let _ = writeln!(s, "table inet {t} {{");
    for set in sets.iter().filter(|x| x.family == "inet") {
        set.write(&mut s);
    }
    if policy.enabled {
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
