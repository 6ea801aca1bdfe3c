//! System tests of network containment (tier 3): a bot is hostile, and from inside it (exec
//! through the agent, with the busybox tools of the test image, and with the host's tools in
//! its network namespace where an attack needs capabilities the bot lacks, standing in for a
//! bot that has them) every way out the security model closes must stay closed, while the
//! bot still pings its gateway and the agent still reaches it.
//!
//! Traffic goes only to the tests' own bots, namespaces and loopback-free listeners on the
//! host, and to addresses inside network namespaces the tests create: the private and
//! link-local egress targets live behind an agent that runs in a namespace of the test's own
//! (no route leaves it), so nothing can be sent off this machine even when a rule is missing.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"`; without it the tests print "skipped"
//! and pass, except under `CI`, where they fail.

mod common;

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{sh, Env, TestAgent};

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `script` in `bot` through the agent; returns (exit code, stdout + stderr).
fn in_bot(a: &TestAgent, bot: &str, script: &str) -> (i32, String) {
    let out = a.cli(&["exec", bot, "--", "sh", "-c", script]);
    let mut all = text(&out);
    all.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), all)
}

/// Whether `nc` in `bot` connects to `addr port` within 2 s.
fn bot_connects(a: &TestAgent, bot: &str, addr: &str, port: u16) -> bool {
    in_bot(a, bot, &format!("nc -w 2 {addr} {port} </dev/null")).0 == 0
}

/// Runs `args` in the network namespace `ns` with the host's tools (full capabilities: the
/// stand-in for a bot that has NET_ADMIN/NET_RAW); asserts success.
fn in_ns(ns: &str, args: &[&str]) -> String {
    let mut v = vec!["netns", "exec", ns];
    v.extend_from_slice(args);
    let out = sh("ip", &v);
    assert!(
        out.status.success(),
        "ip netns exec {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text(&out)
}

/// The bot's namespace.
fn bot_ns(a: &TestAgent, bot: &str) -> String {
    memoh_agent::ids::netns_name(&a.namespace, bot)
}

/// A TCP listener of the test on `addr` (port 0: any) counting accepted connections.
struct Listener {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Listener {
    fn new(addr: &str) -> Self {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if c.is_ok() {
                    n.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self { port, accepted }
    }

    fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A network namespace of the test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let ns = format!("mhn{name}-{}", std::process::id() % 100_000);
        let _ = sh("ip", &["netns", "delete", &ns]);
        assert!(sh("ip", &["netns", "add", &ns]).status.success());
        assert!(sh("ip", &["-n", &ns, "link", "set", "lo", "up"])
            .status
            .success());
        Self(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "delete", &self.0]);
    }
}

/// A child process killed (and reaped) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bot's MAC and link-local IPv6 address (if it has one), read from its namespace.
fn bot_link(a: &TestAgent, bot: &str) -> (String, Option<String>) {
    let link = in_ns(
        &bot_ns(a, bot),
        &["ip", "-o", "link", "show", "dev", "eth0"],
    );
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("eth0 has a mac")
        .to_string();
    let addr = in_ns(
        &bot_ns(a, bot),
        &[
            "ip", "-o", "-6", "addr", "show", "dev", "eth0", "scope", "link",
        ],
    );
    let ll = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string);
    (mac, ll)
}

/// The host end of the bot's veth: the port on `bridge` whose peer is the bot's eth0.
fn bot_port(a: &TestAgent, bot: &str) -> String {
    let peer = in_ns(&bot_ns(a, bot), &["cat", "/sys/class/net/eth0/iflink"]);
    let ports = text(&a.net_sh("ip", &["-o", "link", "show", "master", &a.bridge]));
    ports
        .lines()
        .find(|l| l.starts_with(&format!("{}: ", peer.trim())))
        .and_then(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no port of {bot} on {}: {ports}", a.bridge))
}

/// The agent's nftables table name.
fn table(a: &TestAgent) -> String {
    memoh_agent::ids::table_name(&a.namespace)
}

/// Whether the bot still pings its gateway and the agent still runs commands in it.
fn still_served(a: &TestAgent, bot: &str) {
    let gw = a.gateway();
    // Without NET_RAW a bot pings over an ICMP datagram socket (busybox's ping only knows raw
    // sockets; the probe does what iputils' ping does).
    let (code, out) = in_bot(a, bot, &format!("syscall-probe ping {gw}"));
    assert_eq!(code, 0, "{bot} cannot ping its gateway {gw}: {out}");
    assert_eq!(a.sh_in(bot, "echo served"), "served\n");
}

/// An agent with the test image and `extra` config, running in the host's namespace or in
/// `netns`.
fn agent(env: &Env, extra: &str, netns: Option<&Netns>) -> TestAgent {
    let mut a = TestAgent::new(env, extra);
    a.netns = netns.map(|n| n.0.clone());
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    a
}

#[test]
fn a_bot_reaches_no_other_bot_over_ipv4_or_ipv6() {
    let Some(env) = Env::get(false) else { return };
    let mut a = agent(&env, "", None);
    let (ba, ip_a) = a.create_bot("nba");
    let (bb, ip_b) = a.create_bot("nbb");
    let mut failures = Vec::new();
    let mut check = |what: &str, reached: bool| {
        println!("{what}: {}", if reached { "REACHED" } else { "dropped" });
        if reached {
            failures.push(what.to_string());
        }
    };

    // The agent reaches both servers; the bots reach their gateway.
    for ip in [&ip_a, &ip_b] {
        assert!(common::tcp_connects(
            &format!("{ip}:9090"),
            Duration::from_secs(2)
        ));
    }
    still_served(&a, &ba);

    // IPv4: B's server, and another port of B (a listener started in B).
    check("ipv4 b:9090", bot_connects(&a, &ba, &ip_b, 9090));
    a.sh_in(
        &bb,
        "setsid nc -ll -p 7777 -e true </dev/null >/dev/null 2>&1 & echo started",
    );
    a.wait_for("b's listener on 7777", Duration::from_secs(10), || {
        common::tcp_connects(&format!("{ip_b}:7777"), Duration::from_secs(1))
    });
    check("ipv4 b:7777", bot_connects(&a, &ba, &ip_b, 7777));
    check(
        "ipv4 ping b",
        in_bot(&a, &ba, &format!("ping -c 1 -W 2 {ip_b}")).0 == 0,
    );

    // IPv6 link-local, as an attacker without capabilities finds it: all-nodes ping, then
    // the neighbour table; every address found is tried on 9090.
    let (code, out) = in_bot(
        &a,
        &ba,
        "ping6 -c 2 -W 2 ff02::1%eth0 >/dev/null 2>&1; ip -6 neigh show dev eth0",
    );
    println!("a's ipv6 neighbours (exit {code}): {out:?}");
    let found: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("fe80:"))
        .map(str::to_string)
        .collect();
    for ll in &found {
        check(
            &format!("ipv6 {ll}:9090 found by a"),
            bot_connects(&a, &ba, &format!("{ll}%eth0"), 9090),
        );
    }
    let (_, b_ll) = bot_link(&a, &bb);
    println!("b's link-local address: {b_ll:?}");
    if let Some(ll) = &b_ll {
        check(
            "ipv6 b's link-local:9090",
            bot_connects(&a, &ba, &format!("{ll}%eth0"), 9090),
        );
    }

    // A bot that could turn IPv6 back on (NET_ADMIN, /proc/sys writable), in both bots: B's
    // link-local address is then there to be found, and still unreachable.
    for bot in [&ba, &bb] {
        in_ns(
            &bot_ns(&a, bot),
            &[
                "sh",
                "-c",
                "echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
                 echo 0 > /proc/sys/net/ipv6/conf/default/disable_ipv6; \
                 echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6",
            ],
        );
    }
    let mut b_ll = None;
    a.wait_for("b's link-local address", Duration::from_secs(10), || {
        b_ll = bot_link(&a, &bb).1;
        b_ll.is_some()
    });
    let b_ll = b_ll.unwrap();
    std::thread::sleep(Duration::from_secs(2)); // duplicate address detection
    let (_, out) = in_bot(
        &a,
        &ba,
        "ping6 -c 2 -W 2 ff02::1%eth0 >/dev/null 2>&1; ip -6 neigh show dev eth0",
    );
    println!("a's ipv6 neighbours with ipv6 on: {out:?}");
    check(
        "ipv6 (turned on) b's link-local:9090",
        bot_connects(&a, &ba, &format!("{b_ll}%eth0"), 9090),
    );
    check(
        "ipv6 (turned on) ping b's link-local",
        in_bot(&a, &ba, &format!("ping6 -c 1 -W 2 {b_ll}%eth0")).0 == 0,
    );

    still_served(&a, &ba);
    still_served(&a, &bb);
    assert!(failures.is_empty(), "bot a reached bot b: {failures:?}");
}

#[test]
fn a_bot_reaches_the_host_only_where_allowed() {
    let Some(env) = Env::get(false) else { return };
    // Listeners of the test in the host's namespace: on every IPv4 address, on every address
    // of both families, and one the configuration allows.
    let v4 = Listener::new("0.0.0.0:0");
    let v6 = Listener::new("[::]:0");
    let allowed = Listener::new("0.0.0.0:0");
    let mut a = agent(
        &env,
        &format!("host_ports_allowed = [\"tcp/{}\"]", allowed.port),
        None,
    );
    let (ba, _) = a.create_bot("hsa");
    let gw = a.gateway();
    let mut failures = Vec::new();
    let mut check = |what: &str, reached: bool| {
        println!("{what}: {}", if reached { "REACHED" } else { "dropped" });
        if reached {
            failures.push(what.to_string());
        }
    };

    check(
        "host 0.0.0.0 listener via the gateway",
        bot_connects(&a, &ba, &gw, v4.port),
    );
    check(
        "host [::] listener via the gateway (ipv4)",
        bot_connects(&a, &ba, &gw, v6.port),
    );
    // The bridge's link-local address, from a bot that turned IPv6 back on.
    in_ns(
        &bot_ns(&a, &ba),
        &[
            "sh",
            "-c",
            "echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
             echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let br = text(&sh(
        "ip",
        &[
            "-o", "-6", "addr", "show", "dev", &a.bridge, "scope", "link",
        ],
    ));
    if let Some(ll) = br
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
    {
        check(
            "host [::] listener via the bridge's link-local",
            bot_connects(&a, &ba, &format!("{ll}%eth0"), v6.port),
        );
    }
    assert_eq!(v4.count() + v6.count(), 0, "the host listeners saw a bot");

    // What stays open: the allowed port, and ping to the gateway; the agent reaches the bot.
    assert!(
        bot_connects(&a, &ba, &gw, allowed.port),
        "the allowed port tcp/{} is closed",
        allowed.port
    );
    a.wait_for(
        "the allowed listener's accept",
        Duration::from_secs(5),
        || allowed.count() >= 1,
    );
    still_served(&a, &ba);
    assert!(failures.is_empty(), "bot reached the host: {failures:?}");
}

#[test]
fn a_bot_cannot_send_as_its_neighbour() {
    let Some(env) = Env::get(false) else { return };
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let port = udp.local_addr().unwrap().port();
    let mut a = agent(
        &env,
        &format!("host_ports_allowed = [\"udp/{port}\"]"),
        None,
    );
    let (ba, ip_a) = a.create_bot("spa");
    let (bb, ip_b) = a.create_bot("spb");
    let gw = a.gateway();
    let ns_a = bot_ns(&a, &ba);
    let (mac_a, _) = bot_link(&a, &ba);
    let (mac_b, _) = bot_link(&a, &bb);
    let received = |udp: &UdpSocket| {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let end = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < end {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                got.push((
                    from.ip().to_string(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        got
    };
    let send_from = |src: &str, msg: &str| {
        let script = format!(
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
             s.bind(('{src}', 0)); s.sendto(b'{msg}', ('{gw}', {port}))"
        );
        in_ns(&ns_a, &["python3", "-c", &script]);
    };
    let mut failures = Vec::new();

    // Without capabilities the bot cannot even take B's address.
    let (code, out) = in_bot(&a, &ba, &format!("ip addr add {ip_b}/32 dev eth0"));
    println!("bot adds b's address itself: exit {code}: {}", out.trim());

    // Its own address gets through (the port is allowed).
    send_from(&ip_a, "real");
    let got = received(&udp);
    assert!(
        got.iter().any(|(ip, m)| *ip == ip_a && m == "real"),
        "the bot's own datagram did not arrive: {got:?}"
    );

    // B's address on A's interface (what NET_ADMIN allows): datagrams and ARP as B.
    in_ns(
        &ns_a,
        &["ip", "addr", "add", &format!("{ip_b}/32"), "dev", "eth0"],
    );
    in_ns(&ns_a, &["ip", "neigh", "flush", "dev", "eth0"]);
    send_from(&ip_b, "spoofed");
    let _ = sh(
        "ip",
        &[
            "netns", "exec", &ns_a, "busybox", "arping", "-U", "-c", "2", "-I", "eth0", "-s",
            &ip_b, &gw,
        ],
    );
    let got = received(&udp);
    println!("with b's address: {got:?}");
    if got.iter().any(|(_, m)| m == "spoofed") {
        failures.push(format!("a datagram from {ip_b} sent by a arrived"));
    }
    let neigh = text(&a.net_sh("ip", &["neigh", "show", &ip_b, "dev", &a.bridge]));
    println!("host's neighbour entry of b: {}", neigh.trim());
    if neigh.contains(&mac_a) {
        failures.push(format!(
            "the host maps b's {ip_b} to a's mac: {}",
            neigh.trim()
        ));
    }
    in_ns(
        &ns_a,
        &["ip", "addr", "del", &format!("{ip_b}/32"), "dev", "eth0"],
    );

    // B's MAC on A's interface: nothing it sends gets through, and the bridge does not move
    // B's MAC to A's port.
    let set_mac = |mac: &str| {
        in_ns(&ns_a, &["ip", "link", "set", "dev", "eth0", "down"]);
        in_ns(&ns_a, &["ip", "link", "set", "dev", "eth0", "address", mac]);
        in_ns(&ns_a, &["ip", "link", "set", "dev", "eth0", "up"]);
        in_ns(
            &ns_a,
            &[
                "ip", "route", "replace", "default", "via", &gw, "dev", "eth0",
            ],
        );
    };
    set_mac(&mac_b);
    send_from(&ip_a, "macspoof");
    let _ = sh(
        "ip",
        &[
            "netns", "exec", &ns_a, "busybox", "ping", "-c", "2", "-W", "1", &gw,
        ],
    );
    let got = received(&udp);
    println!("with b's mac: {got:?}");
    if got.iter().any(|(_, m)| m == "macspoof") {
        failures.push("a datagram from b's mac sent by a arrived".into());
    }
    let port_a = bot_port(&a, &ba);
    let fdb = text(&a.net_sh("bridge", &["fdb", "show", "dev", &port_a]));
    if fdb.contains(&mac_b) {
        failures.push(format!("the bridge learned b's mac on a's port: {fdb}"));
    }
    assert_eq!(a.sh_in(&bb, "echo b"), "b\n", "the agent lost b");
    set_mac(&mac_a);

    still_served(&a, &ba);
    still_served(&a, &bb);
    assert!(failures.is_empty(), "spoofing worked: {failures:?}");
}

#[test]
fn private_and_link_local_destinations_are_dropped_unless_allowed() {
    let Some(env) = Env::get(false) else { return };
    // The agent's host is a namespace of the test, with no route out of it: the targets are
    // behind a veth to another namespace of the test.
    let host = Netns::new("eh");
    let target = Netns::new("et");
    let (hv, tv) = (
        format!("mhh{}", std::process::id() % 100_000),
        format!("mht{}", std::process::id() % 100_000),
    );
    assert!(sh(
        "ip",
        &[
            "-n", &host.0, "link", "add", &hv, "type", "veth", "peer", "name", &tv, "netns",
            &target.0
        ]
    )
    .status
    .success());
    for (ns, dev, addrs) in [
        (
            &host.0,
            &hv,
            ["192.168.77.1/24", "169.254.169.1/16", "172.20.5.1/24"],
        ),
        (
            &target.0,
            &tv,
            ["192.168.77.2/24", "169.254.169.254/16", "172.20.5.2/24"],
        ),
    ] {
        for addr in addrs {
            assert!(sh("ip", &["-n", ns, "addr", "add", addr, "dev", dev])
                .status
                .success());
        }
        assert!(sh("ip", &["-n", ns, "link", "set", dev, "up"])
            .status
            .success());
    }
    let _listener = KillOnDrop(
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &target.0, "busybox", "nc", "-ll", "-p", "8080", "-e", "true",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut a = agent(&env, "egress_allowed = [\"172.20.5.0/24\"]", Some(&host));
    let (ba, _) = a.create_bot("ega");
    let mut failures = Vec::new();
    for (what, addr) in [
        ("private 192.168.77.2", "192.168.77.2"),
        ("cloud metadata 169.254.169.254", "169.254.169.254"),
    ] {
        let reached = bot_connects(&a, &ba, addr, 8080);
        println!("{what}: {}", if reached { "REACHED" } else { "dropped" });
        if reached {
            failures.push(what);
        }
    }
    // The same path to an allowed range works: only the rule differs.
    assert!(
        bot_connects(&a, &ba, "172.20.5.2", 8080),
        "the allowed range 172.20.5.0/24 is unreachable"
    );
    // The drop was the agent's rule: its counter moved.
    let chain = text(&a.net_sh("nft", &["list", "chain", "inet", &table(&a), "forward"]));
    println!("{chain}");
    let dropped = chain
        .lines()
        .find(|l| l.contains("@blocked4"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    if failures.is_empty() {
        assert!(
            dropped > 0,
            "no packet counted by the blocked-range rule:\n{chain}"
        );
    }
    still_served(&a, &ba);
    drop(a);
    assert!(failures.is_empty(), "egress reached: {failures:?}");
}

#[test]
fn isolation_holds_without_bridge_netfilter_and_comes_back() {
    let Some(env) = Env::get(false) else { return };
    // The agent's host is a namespace of the test: its bridge netfilter switch is its own.
    let host = Netns::new("nf");
    let mut a = agent(&env, "", Some(&host));
    let (ba, _) = a.create_bot("nfa");
    let (bb, ip_b) = a.create_bot("nfb");
    let ports = [bot_port(&a, &ba), bot_port(&a, &bb)];
    for p in &ports {
        let flag = in_ns(
            &host.0,
            &["cat", &format!("/sys/class/net/{p}/brport/isolated")],
        );
        assert_eq!(flag.trim(), "1", "{p} is not isolated");
    }
    // The agent's periodic check (every 15 s) puts back what the steps below take away: each
    // step is retried when that happened before the verdict was in.
    let bridge_nf = |on: bool| {
        for f in ["iptables", "ip6tables"] {
            in_ns(
                &host.0,
                &[
                    "sh",
                    "-c",
                    &format!(
                        "echo {} > /proc/sys/net/bridge/bridge-nf-call-{f}",
                        u8::from(on)
                    ),
                ],
            );
        }
    };
    let layers = || {
        let nf = in_ns(
            &host.0,
            &["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"],
        );
        let flags = ports
            .iter()
            .filter(|p| {
                in_ns(
                    &host.0,
                    &["cat", &format!("/sys/class/net/{p}/brport/isolated")],
                )
                .trim()
                    == "1"
            })
            .count();
        let tables = text(&a.net_sh("nft", &["list", "tables"]));
        (
            nf.trim() == "1",
            flags,
            tables.contains(&format!("table bridge {}", table(&a))),
        )
    };
    let step = |what: &str, take: &dyn Fn(), want: (bool, usize, bool)| -> bool {
        for _ in 0..4 {
            take();
            if layers() != want {
                continue;
            }
            let reached = bot_connects(&a, &ba, &ip_b, 9090);
            if layers() == want {
                println!("{what}: {}", if reached { "REACHED" } else { "dropped" });
                return reached;
            }
        }
        panic!("{what}: the agent kept restoring its layers");
    };
    // Bridge netfilter off: the bridge-level layers hold.
    assert!(
        !step(
            "bridge netfilter off",
            &|| bridge_nf(false),
            (false, 2, true)
        ),
        "reached b with bridge netfilter off"
    );
    // Ports no longer isolated either: the bridge table alone still drops.
    let unflag = || {
        bridge_nf(false);
        for p in &ports {
            in_ns(
                &host.0,
                &["bridge", "link", "set", "dev", p, "isolated", "off"],
            );
        }
    };
    assert!(
        !step("bridge table alone", &unflag, (false, 0, true)),
        "reached b with the bridge table alone"
    );
    // With no layer left, a reaches b: the layers are what holds (the test can fail).
    let nothing = || {
        unflag();
        let _ = a.net_sh("nft", &["delete", "table", "bridge", &table(&a)]);
    };
    assert!(
        step("no layer", &nothing, (false, 0, false)),
        "with every layer gone a should reach b"
    );
    // The agent's periodic check puts the ruleset and the port flags back by itself.
    a.wait_for("containment restored", Duration::from_secs(40), || {
        !bot_connects(&a, &ba, &ip_b, 9090)
    });
    a.wait_for("ports isolated again", Duration::from_secs(10), || {
        ports.iter().all(|p| {
            in_ns(
                &host.0,
                &["cat", &format!("/sys/class/net/{p}/brport/isolated")],
            )
            .trim()
                == "1"
        })
    });
    still_served(&a, &ba);
    drop(a);
}

#[test]
fn the_last_bot_takes_the_agents_rules_and_doctor_sees_leftovers() {
    let Some(env) = Env::get(false) else { return };
    let mut a = agent(&env, "", None);
    let (ba, _) = a.create_bot("lra");
    let (bb, _) = a.create_bot("lrb");
    let t = table(&a);
    let tables = || text(&sh("nft", &["list", "tables"]));
    let isolation = || {
        text(&sh("iptables", &["-w", "5", "-S", common::ISOLATION_CHAIN]))
            .contains(&format!("-i {0} -o {0} -j DROP", a.bridge))
    };
    for family in ["bridge", "inet"] {
        assert!(
            tables().contains(&format!("table {family} {t}")),
            "{}",
            tables()
        );
    }
    assert!(isolation() && a.masq_present());
    a.ok(&["bot", "rm", &ba]);
    assert!(
        tables().contains(&format!("table inet {t}")),
        "went with a bot still there"
    );
    assert!(
        isolation() && a.masq_present(),
        "went with a bot still there"
    );
    a.ok(&["bot", "rm", &bb]);
    assert!(!tables().contains(&t), "tables left: {}", tables());
    assert!(!isolation(), "isolation rule left");
    assert!(!a.masq_present(), "masquerade rule left");

    // doctor on this agent's configuration: nothing left, then a leftover table it names.
    let doctor = || {
        let mut c = std::process::Command::new(common::AGENT);
        c.arg("doctor").arg("--config").arg(&a.config);
        text(&common::output_within(c, None, common::CLI_LIMIT))
    };
    let line = |report: &str| {
        report
            .lines()
            .find(|l| l.get(8..).is_some_and(|r| r.starts_with("firewall ")))
            .unwrap_or_else(|| panic!("no firewall line:\n{report}"))
            .to_string()
    };
    let report = doctor();
    assert!(line(&report).starts_with("ok "), "{report}");
    assert!(sh("nft", &["add", "table", "inet", &t]).status.success());
    let report = doctor();
    let _ = sh("nft", &["delete", "table", "inet", &t]);
    let l = line(&report);
    assert!(l.starts_with("warn "), "{l}");
    assert!(l.contains(&format!("nft delete table inet {t}")), "{l}");
}

#[test]
fn a_bot_is_not_started_when_it_cannot_be_contained() {
    let Some(env) = Env::get(false) else { return };
    // An nft that refuses every ruleset, first on the agent's PATH.
    let mut a = TestAgent::new(&env, "");
    let bin = a.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let nft = bin.join("nft");
    std::fs::write(
        &nft,
        "#!/bin/sh\necho 'Error: Could not process rule: Operation not supported' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    a.serve_env.push(("PATH".into(), path));
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    let bot = a.bot_id("unc");
    let err = a.fails(&["bot", "create", &bot]);
    println!("bot create: {err}");
    assert!(err.contains("isolation cannot be put in place"), "{err}");
    assert!(err.contains("nft"), "{err}");
    // It never runs attached: the agent keeps the container (a create whose start failed
    // keeps its record) and its restarts fail the same way, each before any network exists.
    let state = a.state_dir.join("cni").join(format!("{bot}.json"));
    for _ in 0..20 {
        let info = a.inspect(&bot);
        assert!(info["ip"].as_str().unwrap_or_default().is_empty(), "{info}");
        assert!(!state.exists(), "{} exists", state.display());
        let ports = text(&a.net_sh("ip", &["-o", "link", "show", "master", &a.bridge]));
        assert!(ports.trim().is_empty(), "a port on {}: {ports}", a.bridge);
        std::thread::sleep(Duration::from_millis(150));
    }
    let mut log = String::new();
    let _ = std::fs::File::open(a.log_path()).and_then(|mut f| f.read_to_string(&mut log));
    assert!(
        log.contains("isolation cannot be put in place"),
        "{}",
        a.log_tail(20)
    );
    // It can still be removed (a rebuild that fails never blocks a delete).
    a.ok(&["bot", "rm", &bot]);
    assert!(a.leftovers(&bot).is_empty(), "{:?}", a.leftovers(&bot));
}

/// Named network namespaces a test made, deleted on drop (also when the test fails).
struct NamespacesMade(Vec<String>);

impl NamespacesMade {
    fn add(&mut self, name: &str) {
        self.0.push(name.to_string());
        assert!(sh("ip", &["netns", "add", name]).status.success(), "{name}");
    }
}

impl Drop for NamespacesMade {
    fn drop(&mut self) {
        for n in &self.0 {
            if std::path::Path::new("/run/netns").join(n).exists() {
                let _ = sh("ip", &["netns", "delete", n]);
            }
        }
    }
}

#[test]
fn net_cleanup_removes_leftovers_and_spares_live_bots() {
    let Some(env) = Env::get(false) else { return };
    let mut a = agent(&env, "", None);
    let (ba, _) = a.create_bot("cla");
    let (bb, ip_b) = a.create_bot("clb");
    let t = table(&a);
    let exists = |ns: &str| std::path::Path::new("/run/netns").join(ns).exists();

    // Leftovers of bots that do not exist: a namespace with this agent's prefix, an older
    // agent's empty one, and an address reservation.
    let mut made = NamespacesMade(Vec::new());
    let gone = format!("e{}gone", a.tag);
    let ns_gone = memoh_agent::ids::netns_name(&a.namespace, &gone);
    let old_gone = memoh_agent::ids::legacy_netns_name(&format!("e{}old", a.tag));
    made.add(&ns_gone);
    made.add(&old_gone);
    let reserved = a
        .ipam_dir
        .join(&a.network)
        .join(format!("{}.250", a.prefix));
    std::fs::write(&reserved, format!("mcp-{gone}\r\neth0")).unwrap();

    let out = a.ok(&["net", "cleanup"]);
    println!("{out}");
    for want in [
        format!("removed network namespace {ns_gone}"),
        format!("removed network namespace {old_gone}"),
        format!("removed address reservation {}.250 (mcp-{gone})", a.prefix),
        "removed 3 leftovers".to_string(),
    ] {
        assert!(out.lines().any(|l| l == want), "{want}:\n{out}");
    }
    assert!(!exists(&ns_gone) && !exists(&old_gone));
    assert!(!reserved.exists());

    // Nothing the live bots use went: their namespaces, addresses, the tables, isolation.
    for bot in [&ba, &bb] {
        assert!(exists(&memoh_agent::ids::netns_name(&a.namespace, bot)));
        assert!(a
            .ipam_entries()
            .iter()
            .any(|(_, owner)| *owner == format!("mcp-{bot}")));
        still_served(&a, bot);
    }
    let tables = || text(&sh("nft", &["list", "tables"]));
    for family in ["bridge", "inet"] {
        assert!(
            tables().contains(&format!("table {family} {t}")),
            "{}",
            tables()
        );
    }
    assert!(!bot_connects(&a, &ba, &ip_b, 9090), "isolation lost");
    assert_eq!(a.ok(&["net", "cleanup"]).trim(), "nothing to clean up");

    // With no bot left, a table left behind goes too.
    a.ok(&["bot", "rm", &ba]);
    a.ok(&["bot", "rm", &bb]);
    assert!(sh("nft", &["add", "table", "inet", &t]).status.success());
    let out = a.ok(&["net", "cleanup"]);
    assert!(
        out.lines()
            .any(|l| l == format!("removed nftables table inet {t}")),
        "{out}"
    );
    assert!(!tables().contains(&t), "{}", tables());
}

#[test]
fn an_older_agents_bot_moves_to_todays_names_at_its_next_start() {
    use memoh_agent::containerd::prelude::*;
    use memoh_agent::ids;
    let Some(env) = Env::get(false) else { return };
    let mut a = agent(&env, "", None);
    let (bot, _) = a.create_bot("upg");
    let (peer, ip_peer) = a.create_bot("upp");
    let cid = ids::container_id(&bot);
    let run_dir = std::path::Path::new("/run/netns");
    let new_ns = ids::netns_name(&a.namespace, &bot);
    let record = || {
        common::block_on(async {
            let c = a.containerd().await;
            c.get_container(&cid).await.unwrap().unwrap().spec.unwrap()
        })
    };
    let spec = record();
    assert_eq!(ids::recorded_netns(&spec), Some(run_dir.join(&new_ns)));
    let cgroup = |s: &oci_spec::runtime::Spec| {
        s.linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .unwrap()
    };
    assert_eq!(
        cgroup(&spec),
        std::path::PathBuf::from(ids::cgroup_path(&a.namespace, &bot))
    );
    a.ok(&["bot", "stop", &bot]);

    // What an older agent left: the record names `memoh-<bot>` and `/memoh/mcp-<bot>`, and
    // the namespace is there.
    let old_ns = ids::legacy_netns_name(&bot);
    let mut made = NamespacesMade(Vec::new());
    made.add(&old_ns);
    let mut old = spec.clone();
    assert!(ids::rename_in_spec(
        &mut old,
        &run_dir.join(&old_ns),
        &ids::legacy_cgroup_path(&bot)
    ));
    common::block_on(async {
        let c = a.containerd().await;
        c.update_container_spec(&cid, &old).await.unwrap();
    });

    a.ok(&["bot", "start", &bot]);
    let moved = record();
    assert_eq!(ids::recorded_netns(&moved), Some(run_dir.join(&new_ns)));
    assert_eq!(
        cgroup(&moved),
        std::path::PathBuf::from(ids::cgroup_path(&a.namespace, &bot))
    );
    assert!(!run_dir.join(&old_ns).exists(), "the old namespace stayed");
    still_served(&a, &bot);
    assert!(!bot_connects(&a, &bot, &ip_peer, 9090), "isolation lost");

    // stop, start and rm work on the moved bot.
    a.ok(&["bot", "stop", &bot]);
    assert!(!run_dir.join(&new_ns).exists());
    a.ok(&["bot", "start", &bot]);
    still_served(&a, &bot);
    a.ok(&["bot", "rm", &bot]);
    assert!(!run_dir.join(&new_ns).exists());
    still_served(&a, &peer);
}
