//! System test of concurrent CNI attachment against the real plugins: 8 bots attached at
//! once to a bridge that does not exist yet (the first ADD creates it, the plugin lock runs
//! those ADDs one at a time), then 8 more at once to the existing bridge (shared ADDs that
//! overlap), then all 16 detached at once. Needs root (skipped without it, except under `CI`).
//!
//! The fixture (`netfix`) owns the bridge, subnet, IPAM dataDir, namespaces, isolation chain,
//! MASQUERADE comment and nftables tables, and removes all of it even when the test fails.

use std::collections::HashSet;
use std::net::IpAddr;

use futures::future::join_all;
use memoh_agent::network::{BotNetwork, Netns};

mod netfix;

use netfix::{ping, require_root, sh, Fixture};

/// Bots per wave.
const WAVE: usize = 8;

/// Creates the namespaces of `bots` and attaches them all at once; panics on any failure.
async fn attach_all(f: &Fixture, bots: &[String]) -> Vec<BotNetwork> {
    let mut nss = Vec::new();
    for bot in bots {
        nss.push(f.net.create_netns(bot).await.unwrap());
    }
    let results = join_all(bots.iter().zip(&nss).map(|(b, ns)| f.net.setup(b, ns))).await;
    results
        .into_iter()
        .zip(bots)
        .map(|(r, b)| r.unwrap_or_else(|e| panic!("setup of {b}: {e}")))
        .collect()
}

/// The host-side interfaces enslaved to `bridge`.
fn bridge_ports(bridge: &str) -> Vec<String> {
    let out = sh("ip", &["-o", "link", "show", "master", bridge]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
        .collect()
}

/// Every attachment is distinct, on the bridge, held by its interface, reserved once and
/// contained (an isolated port, the bridge's isolation rule, the nftables tables); no bot
/// reaches its neighbour.
async fn check_attached(f: &Fixture, bots: &[String], nets: &[BotNetwork]) {
    let ips: HashSet<IpAddr> = nets.iter().map(|n| n.ip).collect();
    assert_eq!(ips.len(), nets.len(), "addresses not distinct: {nets:?}");
    let reserved = f.reservations();
    assert_eq!(reserved.len(), nets.len(), "{reserved:?}");
    let owners: HashSet<&str> = reserved
        .iter()
        .map(|(_, o)| o.lines().next().unwrap_or_default())
        .collect();
    assert_eq!(owners.len(), nets.len(), "{reserved:?}");
    let ports = bridge_ports(&f.bridge);
    assert_eq!(ports.len(), nets.len(), "ports of {}: {ports:?}", f.bridge);
    for n in nets {
        assert!(f.in_subnet(n.ip), "{} not in {}", n.ip, f.subnet);
        assert!(
            reserved.iter().any(|(ip, _)| *ip == n.ip),
            "{} not reserved",
            n.ip
        );
        assert_eq!(n.bridge.as_deref(), Some(f.bridge.as_str()));
        let veth = n.host_veth.clone().expect("host veth in the result");
        assert!(
            ports.contains(&veth),
            "{veth} not on {}: {ports:?}",
            f.bridge
        );
        let flag = std::fs::read_to_string(format!("/sys/class/net/{veth}/brport/isolated"))
            .unwrap_or_default();
        assert_eq!(flag.trim(), "1", "{veth} of {} is not isolated", n.bot);
        let addrs = f
            .net
            .netns()
            .interface_addrs(&n.netns, "eth0")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("eth0 of {} missing", n.bot));
        assert!(
            addrs.iter().any(|(ip, _)| *ip == n.ip),
            "{}: eth0 has {addrs:?}, not {}",
            n.bot,
            n.ip
        );
    }
    let iso =
        String::from_utf8_lossy(&sh("iptables", &["-w", "5", "-S", &f.chain]).stdout).to_string();
    assert!(
        iso.contains(&f.bridge),
        "no isolation rule for {}: {iso}",
        f.bridge
    );
    let tables = String::from_utf8_lossy(&sh("nft", &["list", "tables"]).stdout).to_string();
    let table = format!("mtst-{}", f.tag);
    for family in ["bridge", "inet"] {
        assert!(
            tables.contains(&format!("table {family} {table}")),
            "no {family} table: {tables}"
        );
    }
    // Each bot tries its neighbour in the ring; all at once (a failed ping waits 1 s).
    let pings = (0..nets.len()).map(|i| {
        let from = f.net.netns_name(&bots[i]);
        let to = nets[(i + 1) % nets.len()].ip;
        async move { (from.clone(), to, ping(&from, to).await) }
    });
    for (from, to, reached) in join_all(pings).await {
        assert!(!reached, "isolated: {from} must not reach {to}");
    }
}

#[tokio::test]
async fn bots_attach_and_detach_concurrently_on_a_new_and_an_existing_bridge() {
    if !require_root() {
        return;
    }
    let mut f = Fixture::new(20);
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&f.bridge)
            .exists(),
        "{} exists before the test",
        f.bridge
    );
    let first: Vec<String> = (0..WAVE).map(|i| f.bot(&format!("a{i}"))).collect();
    let second: Vec<String> = (0..WAVE).map(|i| f.bot(&format!("b{i}"))).collect();

    // Wave 1: the bridge does not exist; every ADD finds it missing.
    let mut nets = attach_all(&f, &first).await;
    check_attached(&f, &first, &nets).await;

    // Wave 2: the bridge exists; these ADDs overlap.
    nets.extend(attach_all(&f, &second).await);
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    check_attached(&f, &all, &nets).await;

    // All 16 detached at once: nothing of them is left.
    let results = join_all(all.iter().map(|b| f.net.teardown(b))).await;
    for (r, b) in results.into_iter().zip(&all) {
        r.unwrap_or_else(|e| panic!("teardown of {b}: {e}"));
    }
    assert!(f.reservations().is_empty(), "{:?}", f.reservations());
    let ports = bridge_ports(&f.bridge);
    assert!(ports.is_empty(), "veths left on {}: {ports:?}", f.bridge);
    for n in &nets {
        assert!(
            !f.net.netns().exists(&n.netns).await,
            "{} left",
            n.netns.display()
        );
        assert!(
            f.nat_rules_mentioning(&format!("id: \\\"mcp-{}\\\"", n.bot))
                .is_empty(),
            "cni masquerade of {} left",
            n.bot
        );
    }
    let quoted = format!("name: \\\"{}\\\"", f.network_name);
    assert!(f.nat_rules_mentioning(&quoted).is_empty());
    assert!(f.nat_rules_mentioning(&f.comment).is_empty());
    let iso =
        String::from_utf8_lossy(&sh("iptables", &["-w", "5", "-S", &f.chain]).stdout).to_string();
    assert!(!iso.contains(&f.bridge), "isolation rule left: {iso}");
    let tables = String::from_utf8_lossy(&sh("nft", &["list", "tables"]).stdout).to_string();
    assert!(
        !tables.contains(&format!("mtst-{}", f.tag)),
        "nftables tables left: {tables}"
    );
}
