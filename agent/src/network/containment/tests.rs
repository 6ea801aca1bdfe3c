//! Unit tests of the policy model and the rendered ruleset.

use super::render::merged_ports;
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

#[test]
fn a_delta_adds_and_deletes_one_bots_entries() {
    let policy = Policy::strict("memoh-default");
    let a = port("a", "vetha", "10.88.0.2", true);
    let mut b = port("b", "vethb", "10.88.0.3", true);
    b.mac = Some("02:aa:bb:cc:dd:02".into());
    let two = sets(&policy, &[a.clone(), b.clone()], &[]);
    let one = sets(&policy, std::slice::from_ref(&a), &[]);
    let add = delta("memoh-default", &one, &two).unwrap();
    assert_eq!(
        add,
        "add element bridge memoh-default ports { \"vethb\" }\n\
         add element bridge memoh-default isolated { \"vethb\" }\n\
         add element bridge memoh-default hw { \"vethb\" . 02:aa:bb:cc:dd:02 }\n\
         add element bridge memoh-default addr4 { \"vethb\" . 02:aa:bb:cc:dd:02 . 10.88.0.3 }\n"
    );
    // The reverse deletes the same entries; the bridge and gateway stay (a still uses them).
    assert_eq!(
        delta("memoh-default", &two, &one).unwrap(),
        add.replace("add element", "delete element")
    );
    assert_eq!(delta("memoh-default", &two, &two).unwrap(), "");
    // A bot on a new bridge brings the bridge's entries too.
    let mut c = port("c", "vethc", "10.89.0.2", false);
    c.bridge = "cni1".into();
    let three = sets(&policy, &[a.clone(), b.clone(), c], &[]);
    let d = delta("memoh-default", &two, &three).unwrap();
    assert!(
        d.contains("add element inet memoh-default bridges { \"cni1\" }"),
        "{d}"
    );
    assert!(
        d.contains("add element inet memoh-default bridged_open { \"cni1\" . \"cni1\" }"),
        "{d}"
    );
    assert!(!d.contains("isolated { \"vethc\""), "{d}");
}

#[test]
fn more_than_elements_is_not_a_delta() {
    let a = port("a", "vetha", "10.88.0.2", true);
    let strict = Policy::strict("memoh-default");
    let on = sets(&strict, std::slice::from_ref(&a), &[]);
    let off = sets(&Policy::off("memoh-default"), std::slice::from_ref(&a), &[]);
    assert_eq!(delta("memoh-default", &on, &off), None);
    // Interval sets merge their elements: a change there needs a rebuild.
    let mut wider = strict.clone();
    wider.egress_allowed = vec!["10.1.0.0/16".parse().unwrap()];
    let egress = sets(&wider, std::slice::from_ref(&a), &[]);
    assert_eq!(delta("memoh-default", &on, &egress), None);
    // Resolvers are plain elements.
    let dns = sets(&strict, &[a], &["10.255.255.53".parse().unwrap()]);
    assert_eq!(
        delta("memoh-default", &on, &dns).unwrap(),
        "add element inet memoh-default resolvers4 { 10.255.255.53 }\n"
    );
}
