//! System tests of bot networking against the real CNI plugins, iptables and network
//! namespaces. They need root: without it they are skipped, except under `CI`, where they fail.
//!
//! Each test owns a bridge (`mtst<tag>`), a /24 in 10.200-249.x.0, a conf dir and an IPAM
//! dataDir in a temp dir, its namespaces, an isolation chain and a MASQUERADE comment, and a
//! guard removes all of it, even when the test fails. Traffic only flows between namespaces
//! and bridges the test created; nothing is sent through MASQUERADE.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command as StdCommand;
use std::time::Duration;

use memoh_agent::network::{
    self, conf, ExecPlugins, IpNetns, Iptables, Netns, Network, RuntimeConf,
};

mod netfix;

use netfix::{in_netns, ping, require_root, sh, state_file, Fixture};

#[tokio::test]
async fn setup_is_stable_and_teardown_releases_everything() {
    if !require_root() {
        return;
    }
    let mut f = Fixture::new(11);
    let bot = f.bot("a");
    let ns = f.net.create_netns(&bot).await.unwrap();
    assert_eq!(
        ns,
        Path::new("/run/netns").join(format!("memoh-mtst-{}.{bot}", f.tag))
    );
    assert!(f.net.netns().exists(&ns).await);

    let first = f.net.setup(&bot, &ns).await.unwrap();
    assert!(f.in_subnet(first.ip), "{} not in {}", first.ip, f.subnet);
    assert_eq!(first.prefix_len, 24);
    assert_eq!(
        first.gateway,
        Some(format!("{}.1", f.prefix).parse().unwrap())
    );
    assert_eq!(first.bridge.as_deref(), Some(f.bridge.as_str()));
    let veth = first.host_veth.clone().expect("host veth in the result");
    let link = sh("ip", &["-o", "link", "show", "dev", &veth]);
    assert!(
        String::from_utf8_lossy(&link.stdout).contains(&format!("master {}", f.bridge)),
        "{veth} is not on {}",
        f.bridge
    );
    let addrs = f
        .net
        .netns()
        .interface_addrs(&ns, "eth0")
        .await
        .unwrap()
        .unwrap();
    assert!(addrs.iter().any(|(ip, _)| *ip == first.ip), "{addrs:?}");
    assert!(state_file(&f, &bot).is_file());
    assert_eq!(f.reservations().len(), 1);

    // A healthy bot keeps its address, however often setup runs.
    for _ in 0..2 {
        let again = f.net.setup(&bot, &ns).await.unwrap();
        assert_eq!(again, first);
    }
    assert_eq!(f.reservations().len(), 1);
    assert_eq!(f.net.saved(&bot).await.unwrap(), Some(first.clone()));

    // Teardown releases the address, the namespace and the saved state; twice is fine.
    f.net.teardown(&bot).await.unwrap();
    assert!(f.reservations().is_empty(), "{:?}", f.reservations());
    assert!(!ns.exists());
    assert!(!state_file(&f, &bot).exists());
    f.net.teardown(&bot).await.unwrap();
    assert!(f
        .nat_rules_mentioning(&format!("id: \\\"mcp-{bot}\\\""))
        .is_empty());

    // And the bot can be set up again.
    let ns = f.net.create_netns(&bot).await.unwrap();
    let second = f.net.setup(&bot, &ns).await.unwrap();
    assert!(f.in_subnet(second.ip));
    assert_eq!(f.reservations().len(), 1);
    f.net.teardown(&bot).await.unwrap();
    assert!(f.reservations().is_empty());
}

#[tokio::test]
async fn teardown_after_the_namespace_is_gone_releases_the_address() {
    if !require_root() {
        return;
    }
    let mut f = Fixture::new(12);
    let bot = f.bot("gone");
    let ns = f.net.create_netns(&bot).await.unwrap();
    let bn = f.net.setup(&bot, &ns).await.unwrap();
    assert_eq!(f.reservations().len(), 1);
    let cni_rule = format!("id: \\\"mcp-{bot}\\\"");
    assert!(
        !f.nat_rules_mentioning(&cni_rule).is_empty(),
        "the bridge plugin's masquerade rule should exist while the bot is up"
    );

    // The task died and took the namespace with it (and the agent may have restarted: a new
    // Network over the same state dir).
    assert!(sh("ip", &["netns", "delete", &f.net.netns_name(&bot)])
        .status
        .success());
    let veth = bn.host_veth.unwrap();
    // The kernel destroys the namespace's devices asynchronously; give it a moment under load.
    let gone = (0..50).any(|_| {
        let present = sh("ip", &["link", "show", "dev", &veth]).status.success();
        if present {
            std::thread::sleep(Duration::from_millis(100));
        }
        !present
    });
    assert!(gone, "the host veth {veth} outlived its namespace");
    let restarted = Network::with_parts(
        f.net.config().clone(),
        ExecPlugins::new(f.net.config().bin_dirs.clone(), Duration::from_secs(30)),
        Iptables::with_names(&f.chain, &f.comment),
        IpNetns,
    );
    restarted.teardown(&bot).await.unwrap();
    assert!(f.reservations().is_empty(), "{:?}", f.reservations());
    assert!(
        f.nat_rules_mentioning(&cni_rule).is_empty(),
        "{:?}",
        f.nat_rules_mentioning(&cni_rule)
    );
    assert!(!state_file(&f, &bot).exists());
}

#[tokio::test]
async fn stale_ipam_reservation_is_removed_and_added_again() {
    if !require_root() {
        return;
    }
    let mut f = Fixture::new(13);
    let bot = f.bot("dup");
    let ns = f.net.create_netns(&bot).await.unwrap();
    // The agent died after host-local reserved an address but before anything else: the
    // reservation names the container, so ADD fails with "duplicate allocation".
    let store = f.dir.path().join("ipam").join(&f.network_name);
    std::fs::create_dir_all(&store).unwrap();
    let stale: IpAddr = format!("{}.77", f.prefix).parse().unwrap();
    std::fs::write(store.join(stale.to_string()), format!("mcp-{bot}\r\neth0")).unwrap();

    // The plugin really does refuse it.
    let list = f.net.load_network().await.unwrap();
    let rt = RuntimeConf {
        container_id: network::container_id(&bot),
        netns: Some(ns.clone()),
        ifname: "eth0".into(),
        ip: None,
    };
    let err = f.net.cni().add(&list, &rt).await.unwrap_err();
    assert!(err.to_string().contains("duplicate allocation"), "{err}");
    assert!(network::is_retryable_add_error(&err));

    // setup recovers: DEL releases the stale reservation, the second ADD succeeds.
    let bn = f.net.setup(&bot, &ns).await.unwrap();
    assert!(f.in_subnet(bn.ip));
    let held = f.reservations();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].0, bn.ip);
    f.net.teardown(&bot).await.unwrap();
    assert!(f.reservations().is_empty());
}

#[tokio::test]
async fn add_without_saved_state_is_removed_and_added_again() {
    if !require_root() {
        return;
    }
    let mut f = Fixture::new(14);
    let bot = f.bot("crash");
    let ns = f.net.create_netns(&bot).await.unwrap();
    // The agent died between ADD and saving its result: eth0 exists, nothing is saved.
    let list = f.net.load_network().await.unwrap();
    let rt = RuntimeConf {
        container_id: network::container_id(&bot),
        netns: Some(ns.clone()),
        ifname: "eth0".into(),
        ip: None,
    };
    let orphan = network::result::parse_result(&f.net.cni().add(&list, &rt).await.unwrap())
        .unwrap()
        .primary_ip("eth0")
        .unwrap()
        .address;
    assert!(f.net.saved(&bot).await.unwrap().is_none());
    let err = f.net.cni().add(&list, &rt).await.unwrap_err();
    assert!(network::is_retryable_add_error(&err), "{err}");

    let bn = f.net.setup(&bot, &ns).await.unwrap();
    assert!(f.in_subnet(bn.ip));
    // The orphaned reservation was released, not leaked next to the new one.
    let held = f.reservations();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].0, bn.ip);
    assert_ne!(
        bn.ip, orphan,
        "host-local hands out the next address after a release"
    );
    let addrs = f
        .net
        .netns()
        .interface_addrs(&ns, "eth0")
        .await
        .unwrap()
        .unwrap();
    assert!(addrs.iter().any(|(ip, _)| *ip == bn.ip));
    f.net.teardown(&bot).await.unwrap();
    assert!(f.reservations().is_empty());
}

#[tokio::test]
async fn bots_on_one_bridge_cannot_reach_each_other() {
    if !require_root() {
        return;
    }
    let nf =
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").unwrap_or_default();
    assert_eq!(
        nf.trim(),
        "1",
        "bridge netfilter must be on for FORWARD to see bridged traffic"
    );

    let mut f = Fixture::new(15);
    // Attach without isolation first, to show the two bots can talk at all.
    let mut cfg = f.net.config().clone();
    cfg.isolate = false;
    let open = Network::with_parts(
        cfg.clone(),
        ExecPlugins::new(cfg.bin_dirs.clone(), cfg.plugin_timeout),
        Iptables::with_names(&f.chain, &f.comment),
        IpNetns,
    );
    let a = f.bot("a");
    let b = f.bot("b");
    let ns_a = open.create_netns(&a).await.unwrap();
    let ns_b = open.create_netns(&b).await.unwrap();
    let net_a = open.setup(&a, &ns_a).await.unwrap();
    let net_b = open.setup(&b, &ns_b).await.unwrap();
    let gateway = net_a.gateway.unwrap();
    let name_a = open.netns_name(&a);
    let name_b = open.netns_name(&b);

    assert!(
        ping(&name_a, net_b.ip).await,
        "without isolation a reaches b"
    );
    assert!(ping(&name_a, gateway).await);

    // A TCP listener in b, as a bot's server would be.
    let mut listener = tokio::process::Command::new("ip")
        .args([
            "netns", "exec", &name_b, "busybox", "nc", "-ll", "-p", "9090", "-e", "true",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let connect = |ip: IpAddr| {
        let ns = name_a.clone();
        async move { in_netns(&ns, &["busybox", "nc", "-w", "2", &ip.to_string(), "9090"]).await }
    };
    let mut reachable = false;
    for _ in 0..20 {
        if connect(net_b.ip).await {
            reachable = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reachable, "without isolation a connects to b:9090");

    // Isolation: idempotent, and it cuts a off from b but not from the gateway.
    assert!(f.net.ensure_isolation(&f.bridge).await.unwrap());
    assert!(!f.net.ensure_isolation(&f.bridge).await.unwrap());
    let jump = sh("iptables", &["-w", "5", "-C", "FORWARD", "-j", &f.chain]);
    assert!(jump.status.success(), "FORWARD jumps to {}", f.chain);
    assert!(
        !ping(&name_a, net_b.ip).await,
        "isolated: a must not reach b"
    );
    assert!(
        !ping(&name_b, net_a.ip).await,
        "isolated: b must not reach a"
    );
    assert!(
        !connect(net_b.ip).await,
        "isolated: a must not connect to b:9090"
    );
    assert!(
        ping(&name_a, gateway).await,
        "isolated: a still reaches the gateway"
    );
    assert!(
        ping(&name_b, gateway).await,
        "isolated: b still reaches the gateway"
    );

    // setup with isolation on keeps it on (and keeps the healthy addresses).
    assert_eq!(f.net.setup(&a, &ns_a).await.unwrap().ip, net_a.ip);
    assert!(!ping(&name_a, net_b.ip).await);

    // Removal restores bot-to-bot traffic and drops the chain.
    assert!(f.net.remove_isolation(&f.bridge).await.unwrap());
    assert!(!f.net.remove_isolation(&f.bridge).await.unwrap());
    assert!(
        ping(&name_a, net_b.ip).await,
        "isolation removed: a reaches b again"
    );
    assert!(!sh("iptables", &["-w", "5", "-S", &f.chain])
        .status
        .success());

    let _ = listener.kill().await;
    open.teardown(&a).await.unwrap();
    open.teardown(&b).await.unwrap();
    assert!(f.reservations().is_empty());
}

#[tokio::test]
async fn masquerade_is_ensured_once_and_restored_after_deletion() {
    if !require_root() {
        return;
    }
    let f = Fixture::new(16);
    let rule = |op: &str| {
        sh(
            "iptables",
            &[
                "-w",
                "5",
                "-t",
                "nat",
                op,
                "POSTROUTING",
                "-s",
                &f.subnet,
                "!",
                "-d",
                &f.subnet,
                "-j",
                "MASQUERADE",
                "-m",
                "comment",
                "--comment",
                &f.comment,
            ],
        )
        .status
        .success()
    };
    assert!(!rule("-C"));
    assert!(f.net.ensure_masquerade(&f.subnet).await.unwrap(), "added");
    assert!(rule("-C"));
    assert!(
        !f.net.ensure_masquerade(&f.subnet).await.unwrap(),
        "idempotent"
    );
    assert_eq!(f.nat_rules_mentioning(&f.comment).len(), 1);

    // Stale iptables state lost the rule: the next ensure puts it back.
    assert!(rule("-D"));
    assert!(
        f.net.ensure_masquerade(&f.subnet).await.unwrap(),
        "restored"
    );
    assert_eq!(f.nat_rules_mentioning(&f.comment).len(), 1);

    assert!(f.net.remove_masquerade(&f.subnet).await.unwrap());
    assert!(!f.net.remove_masquerade(&f.subnet).await.unwrap());
    assert!(!rule("-C"));

    let e = f.net.ensure_masquerade("not-a-subnet").await.unwrap_err();
    assert!(e.to_string().contains("subnet"), "{e}");
}

#[tokio::test]
async fn default_network_is_written_when_missing() {
    if !require_root() {
        return;
    }
    let f = Fixture::new(17);
    let list = f.net.load_network().await.unwrap();
    assert_eq!(list.name, f.network_name);
    assert_eq!(list.cni_version, conf::DEFAULT_CNI_VERSION);
    assert_eq!(list.bridge_name().as_deref(), Some(f.bridge.as_str()));
    let file = f
        .net
        .config()
        .conf_dir
        .join(format!("{}.conflist", f.network_name));
    assert!(file.is_file());
    // Debian's plugins accept the version the agent writes.
    let out = StdCommand::new("/usr/lib/cni/bridge")
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(conf::DEFAULT_CNI_VERSION), "{text}");
    }
    // An existing file is used as is, never overwritten.
    let before = std::fs::read(&file).unwrap();
    f.net.load_network().await.unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

#[tokio::test]
async fn a_bridge_that_lost_its_last_port_is_repaired() {
    if !require_root() {
        return;
    }
    let mut f = Fixture::new(18);
    // A bridge whose MAC came from a port that is gone: the kernel leaves it all zeros.
    let peer = format!("mtsv{}", f.tag);
    assert!(sh("ip", &["link", "add", &f.bridge, "type", "bridge"])
        .status
        .success());
    assert!(sh(
        "ip",
        &[
            "link",
            "add",
            &peer,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{peer}p")
        ]
    )
    .status
    .success());
    assert!(sh("ip", &["link", "set", &peer, "master", &f.bridge])
        .status
        .success());
    assert!(sh("ip", &["link", "delete", &peer]).status.success());
    let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", f.bridge)).unwrap();
    assert_eq!(mac.trim(), "00:00:00:00:00:00");

    // The plugin alone fails on it, with the error the retry rule names.
    let bot = f.bot("mac");
    let ns = f.net.create_netns(&bot).await.unwrap();
    let list = f.net.load_network().await.unwrap();
    let rt = RuntimeConf {
        container_id: network::container_id(&bot),
        netns: Some(ns.clone()),
        ifname: "eth0".into(),
        ip: None,
    };
    let err = f.net.cni().add(&list, &rt).await.unwrap_err();
    assert!(err.to_string().contains("bridge's mac"), "{err}");
    assert!(network::is_retryable_add_error(&err));
    // (That failed ADD reserved nothing it did not release.)
    assert!(f.reservations().is_empty(), "{:?}", f.reservations());

    // setup pins the bridge's address and gets through; the address then survives the
    // bridge losing its ports again.
    let bn = f.net.setup(&bot, &ns).await.unwrap();
    assert!(f.in_subnet(bn.ip));
    let assign =
        std::fs::read_to_string(format!("/sys/class/net/{}/addr_assign_type", f.bridge)).unwrap();
    assert_eq!(assign.trim(), "3", "the bridge's MAC is set explicitly");
    f.net.teardown(&bot).await.unwrap();
    let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", f.bridge)).unwrap();
    assert_ne!(mac.trim(), "00:00:00:00:00:00");
    assert!(f.reservations().is_empty());
}

#[tokio::test]
async fn two_agents_on_one_host_share_the_isolation_chain() {
    use memoh_agent::network::Firewall;
    if !require_root() {
        return;
    }
    // Two agents (each with its own lock, as two processes have) isolate and release bridges
    // of their own at the same moments: whoever creates or removes the shared chain second
    // must not fail (CI saw "iptables -N ...: Chain already exists" from parallel agents).
    let f = Fixture::new(19);
    let (a, b) = (
        Iptables::with_names(&f.chain, &f.comment),
        Iptables::with_names(&f.chain, &f.comment),
    );
    let (bridge_a, bridge_b) = (format!("{}a", f.bridge), format!("{}b", f.bridge));
    for round in 0..15 {
        let (ra, rb) = tokio::join!(a.ensure_isolation(&bridge_a), b.ensure_isolation(&bridge_b));
        ra.unwrap_or_else(|e| panic!("round {round}: a ensures: {e}"));
        rb.unwrap_or_else(|e| panic!("round {round}: b ensures: {e}"));
        let rules = String::from_utf8_lossy(&sh("iptables", &["-w", "5", "-S", &f.chain]).stdout)
            .to_string();
        for br in [&bridge_a, &bridge_b] {
            assert!(
                rules.contains(&format!("-i {br} -o {br} -j DROP")),
                "round {round}: {br} not isolated:\n{rules}"
            );
        }
        let (ra, rb) = tokio::join!(a.remove_isolation(&bridge_a), b.remove_isolation(&bridge_b));
        ra.unwrap_or_else(|e| panic!("round {round}: a removes: {e}"));
        rb.unwrap_or_else(|e| panic!("round {round}: b removes: {e}"));
    }
    // Both released: nothing of the chain is left once the last user removed it.
    let leftover = a.remove_isolation(&bridge_a).await.unwrap();
    assert!(!leftover);
    let listed = sh("iptables", &["-w", "5", "-S", &f.chain]);
    let rules = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        !rules.lines().any(|l| l.starts_with("-A ")),
        "rules left in {}:\n{rules}",
        f.chain
    );
}

/// The agent's two tables of `table` as `nft -j` lists them, reduced to what a bot's packets
/// meet: each set's elements (sorted) and each chain's rules in order, without handles or
/// counter values; and the packets the input chain's "bot to host" drop counted.
fn tables_of(table: &str) -> (std::collections::BTreeMap<String, Vec<String>>, u64) {
    let mut out = std::collections::BTreeMap::new();
    let mut dropped = 0;
    for family in ["bridge", "inet"] {
        let o = sh("nft", &["-j", "list", "table", family, table]);
        assert!(o.status.success(), "nft list table {family} {table}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for item in v["nftables"].as_array().unwrap() {
            if let Some(set) = item.get("set") {
                let mut elems: Vec<String> = set["elem"]
                    .as_array()
                    .map(|a| a.iter().map(|e| e.to_string()).collect())
                    .unwrap_or_default();
                elems.sort();
                out.insert(format!("{family} set {}", set["name"]), elems);
            }
            if let Some(rule) = item.get("rule") {
                let mut expr = rule["expr"].clone();
                let is_host_drop = rule["comment"] == "bot to host";
                for e in expr.as_array_mut().unwrap() {
                    if let Some(c) = e.get_mut("counter") {
                        if is_host_drop {
                            dropped += c["packets"].as_u64().unwrap_or(0);
                        }
                        *c = serde_json::Value::Null;
                    }
                }
                out.entry(format!("{family} chain {}", rule["chain"]))
                    .or_insert_with(Vec::new)
                    .push(format!("{expr} {}", rule["comment"]));
            }
        }
    }
    (out, dropped)
}

/// One bot attached or detached changes the agent's tables in place, not by a rebuild: the
/// drop counters keep counting (a rebuild starts them at zero, shown below), and what the
/// tables hold then is exactly what a rebuild from the saved attachments makes.
#[tokio::test]
async fn one_attachment_changes_the_tables_in_place() {
    if !require_root() {
        return;
    }
    let mut f = Fixture::new(21);
    let table = format!("mtst-{}", f.tag);
    let bots: Vec<String> = ["a", "b", "c"].iter().map(|n| f.bot(n)).collect();
    let mut nets = Vec::new();
    for bot in &bots[..2] {
        let ns = f.net.create_netns(bot).await.unwrap();
        nets.push(f.net.setup(bot, &ns).await.unwrap());
    }
    let gateway = nets[0].gateway.unwrap().to_string();
    // Bot a knocks on a port of the host: the input chain drops and counts it.
    let knock = || {
        let ns = f.net.netns_name(&bots[0]);
        let gateway = gateway.clone();
        async move { in_netns(&ns, &["busybox", "nc", "-w", "1", &gateway, "7"]).await }
    };
    assert!(!knock().await, "a bot reached a closed port of the host");
    let (_, knocked) = tables_of(&table);
    assert!(knocked > 0, "the knock was not counted");

    // c attaches: its port joins the sets in place; the counter keeps its count.
    let ns = f.net.create_netns(&bots[2]).await.unwrap();
    let c = f.net.setup(&bots[2], &ns).await.unwrap();
    let (now, count) = tables_of(&table);
    let veth_c = c.host_veth.clone().unwrap();
    assert!(
        now["bridge set \"ports\""].contains(&format!("\"{veth_c}\"")),
        "{now:?}"
    );
    assert!(
        count >= knocked,
        "attaching c replaced the tables (counter {count}, was {knocked})"
    );
    // Exactly what a rebuild makes; and a rebuild does start the counters at zero.
    f.net.contain().await.unwrap();
    let (rebuilt, count) = tables_of(&table);
    assert_eq!(now, rebuilt, "in place vs rebuilt");
    assert_eq!(
        count, 0,
        "a rebuild keeps counters: this test could not tell"
    );

    // b detaches: its entries leave in place, the rest is a rebuild's.
    assert!(!knock().await);
    let (_, knocked) = tables_of(&table);
    assert!(knocked > 0);
    f.net.teardown(&bots[1]).await.unwrap();
    let (now, count) = tables_of(&table);
    assert!(count >= knocked, "detaching b replaced the tables");
    let veth_b = nets[1].host_veth.clone().unwrap();
    assert!(
        !format!("{now:?}").contains(&veth_b),
        "b's port is still in the tables: {now:?}"
    );
    f.net.contain().await.unwrap();
    assert_eq!(
        now,
        tables_of(&table).0,
        "in place vs rebuilt after a detach"
    );

    // Tables changed behind the agent's back: the next change rebuilds them.
    assert!(sh("nft", &["delete", "table", "bridge", &table])
        .status
        .success());
    f.net.teardown(&bots[2]).await.unwrap();
    let (now, _) = tables_of(&table);
    assert!(!format!("{now:?}").contains(&veth_c), "{now:?}");
    assert!(now.contains_key("bridge set \"ports\""), "{now:?}");

    // The last bot takes the tables with it.
    f.net.teardown(&bots[0]).await.unwrap();
    let tables = String::from_utf8_lossy(&sh("nft", &["list", "tables"]).stdout).to_string();
    assert!(!tables.contains(&table), "{tables}");
    assert!(f.reservations().is_empty());
}
