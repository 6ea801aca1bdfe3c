//! Unit tests of the setup/teardown logic over fake plugins, namespaces and firewall.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{json, Value};

use super::cni::fake::FakeExec;

#[path = "tests_passes.rs"]
mod passes;
use super::cni::{CniCommand, LockMode};
use super::*;

#[derive(Default)]
struct FakeNetns {
    /// Live namespaces and the addresses of their `eth0`.
    live: Mutex<HashMap<PathBuf, Vec<(IpAddr, u8)>>>,
    deleted: Mutex<Vec<String>>,
    pinned: Mutex<Vec<String>>,
    /// Ports and their isolated flag.
    isolated: Mutex<HashMap<String, bool>>,
    /// Namespaces IPv6 was turned off in.
    no_ipv6: Mutex<Vec<PathBuf>>,
    /// Makes `set_port_isolated` fail.
    fail_isolation: Mutex<bool>,
}

impl FakeNetns {
    fn set(&self, path: &str, addrs: &[(&str, u8)]) {
        self.live.lock().unwrap().insert(
            path.into(),
            addrs
                .iter()
                .map(|(a, l)| (a.parse().unwrap(), *l))
                .collect(),
        );
    }
}

impl Netns for FakeNetns {
    fn path(&self, name: &str) -> PathBuf {
        Path::new("/run/netns").join(name)
    }
    async fn create(&self, name: &str) -> Result<PathBuf, AgentError> {
        let p = self.path(name);
        self.live.lock().unwrap().entry(p.clone()).or_default();
        Ok(p)
    }
    async fn delete(&self, name: &str) -> Result<(), AgentError> {
        self.live.lock().unwrap().remove(&self.path(name));
        self.deleted.lock().unwrap().push(name.to_string());
        Ok(())
    }
    async fn list(&self) -> Result<Vec<String>, AgentError> {
        let mut names: Vec<String> = self
            .live
            .lock()
            .unwrap()
            .keys()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }
    async fn links(&self, path: &Path) -> Result<Vec<String>, AgentError> {
        Ok(match self.live.lock().unwrap().get(path) {
            None => vec![],
            Some(addrs) if addrs.is_empty() => vec!["lo".into()],
            Some(_) => vec!["lo".into(), "eth0".into()],
        })
    }
    async fn exists(&self, path: &Path) -> bool {
        self.live.lock().unwrap().contains_key(path)
    }
    async fn interface_addrs(
        &self,
        path: &Path,
        _ifname: &str,
    ) -> Result<Option<Vec<(IpAddr, u8)>>, AgentError> {
        Ok(self
            .live
            .lock()
            .unwrap()
            .get(path)
            .filter(|a| !a.is_empty())
            .cloned())
    }
    async fn pin_bridge_mac(&self, bridge: &str) -> Result<bool, AgentError> {
        self.pinned.lock().unwrap().push(bridge.to_string());
        Ok(false)
    }
    async fn forget_neighbour(&self, _bridge: &str, _ip: IpAddr) {}
    async fn set_port_isolated(&self, port: &str, on: bool) -> Result<bool, AgentError> {
        if *self.fail_isolation.lock().unwrap() {
            return Err(AgentError::Network {
                op: "isolate".into(),
                reason: "no port isolation here".into(),
            });
        }
        Ok(self.isolated.lock().unwrap().insert(port.to_string(), on) != Some(on))
    }
    async fn link_exists(&self, name: &str) -> bool {
        name.starts_with("veth")
    }
    async fn disable_ipv6(&self, path: &Path) -> Result<(), AgentError> {
        self.no_ipv6.lock().unwrap().push(path.to_path_buf());
        Ok(())
    }
    async fn interface_mac(
        &self,
        _path: &Path,
        _ifname: &str,
    ) -> Result<Option<String>, AgentError> {
        Ok(Some("02:00:00:00:00:aa".into()))
    }
}

#[derive(Default)]
struct FakeFirewall {
    calls: Mutex<Vec<String>>,
    /// The last ruleset applied.
    ruleset: Mutex<String>,
    /// Makes `apply_ruleset` fail.
    fail_ruleset: Mutex<bool>,
    /// How long `apply_ruleset` takes (so concurrent setups overlap).
    ruleset_delay: Mutex<Duration>,
}

impl FakeFirewall {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
}

impl Firewall for FakeFirewall {
    async fn ensure_masquerade(&self, subnet: &str) -> Result<bool, AgentError> {
        self.log(format!("masq {subnet}"));
        Ok(true)
    }
    async fn remove_masquerade(&self, subnet: &str) -> Result<bool, AgentError> {
        self.log(format!("unmasq {subnet}"));
        Ok(true)
    }
    async fn ensure_isolation(&self, bridge: &str) -> Result<bool, AgentError> {
        self.log(format!("isolate {bridge}"));
        Ok(true)
    }
    async fn remove_isolation(&self, bridge: &str) -> Result<bool, AgentError> {
        self.log(format!("unisolate {bridge}"));
        Ok(true)
    }
    async fn remove_cni_masq(&self, network: &str, container: &str) -> Result<usize, AgentError> {
        self.log(format!("cni-masq {network} {container}"));
        Ok(1)
    }
    async fn apply_ruleset(&self, script: &str) -> Result<(), AgentError> {
        let delay = *self.ruleset_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if *self.fail_ruleset.lock().unwrap() {
            return Err(AgentError::Network {
                op: "nft".into(),
                reason: "cannot run nft".into(),
            });
        }
        if script.contains("element ") {
            // A delta: applied to the ruleset in place, failing as nft does (missing tables,
            // deleting what is not there) without changing anything.
            let mut rs = self.ruleset.lock().unwrap();
            *rs = apply_delta(&rs, script).map_err(|reason| AgentError::Network {
                op: "nft".into(),
                reason,
            })?;
            drop(rs);
            self.log("delta".into());
            return Ok(());
        }
        let kind = if script.contains("chain") {
            "ruleset"
        } else {
            "no-ruleset"
        };
        self.log(kind.to_string());
        *self.ruleset.lock().unwrap() = script.to_string();
        Ok(())
    }
    async fn tables(&self) -> Result<Vec<(String, String)>, AgentError> {
        let rs = self.ruleset.lock().unwrap().clone();
        if rs.is_empty() || rs.contains("delete table") {
            return Ok(Vec::new());
        }
        Ok(["bridge", "inet"]
            .iter()
            .map(|f| (f.to_string(), "memoh-test".to_string()))
            .collect())
    }
    async fn ensure_bridge_netfilter(&self) -> Result<Vec<String>, AgentError> {
        self.log("bridge-nf".into());
        Ok(vec![])
    }
}

/// `ruleset` (a full script of [`containment::render`]) with the `add element` and `delete
/// element` lines of `delta` applied, as nft applies them: all or nothing, an error for a
/// missing table or set, or for deleting an element that is not there.
fn apply_delta(ruleset: &str, delta: &str) -> Result<String, String> {
    let mut lines: Vec<String> = ruleset.lines().map(String::from).collect();
    for d in delta.lines() {
        let (add, rest) = match d.split_once(' ') {
            Some(("add", r)) => (true, r),
            Some(("delete", r)) => (false, r),
            _ => return Err(format!("unexpected line {d:?}")),
        };
        let w: Vec<&str> = rest.splitn(5, ' ').collect();
        let [_element, family, table, set, items] = w[..] else {
            return Err(format!("unexpected line {d:?}"));
        };
        let items: Vec<String> = items
            .trim_start_matches('{')
            .trim_end_matches('}')
            .split(", ")
            .map(|i| i.trim().to_string())
            .collect();
        let header = format!("table {family} {table} {{");
        let start = lines
            .iter()
            .position(|l| *l == header)
            .ok_or_else(|| format!("no table {family} {table}"))?;
        let prefix = format!("  set {set} {{ ");
        let at = lines[start..]
            .iter()
            .position(|l| l.starts_with(&prefix))
            .map(|i| start + i)
            .ok_or_else(|| format!("no set {set} in {family} {table}"))?;
        let line = &lines[at];
        let (decl, mut elements) = match line.split_once("; elements = { ") {
            Some((decl, els)) => (
                decl[prefix.len()..].to_string(),
                els.trim_end_matches(" }; }")
                    .split(", ")
                    .map(String::from)
                    .collect::<std::collections::BTreeSet<String>>(),
            ),
            None => (
                line[prefix.len()..].trim_end_matches("; }").to_string(),
                Default::default(),
            ),
        };
        for i in items {
            if add {
                elements.insert(i);
            } else if !elements.remove(&i) {
                return Err(format!("delete element {i}: No such file or directory"));
            }
        }
        lines[at] = if elements.is_empty() {
            format!("{prefix}{decl}; }}")
        } else {
            format!(
                "{prefix}{decl}; elements = {{ {} }}; }}",
                elements.into_iter().collect::<Vec<_>>().join(", ")
            )
        };
    }
    Ok(lines.join("\n") + "\n")
}

struct Env {
    _dir: tempfile::TempDir,
    net: Network<FakeExec, FakeFirewall, FakeNetns>,
}

fn env() -> Env {
    env_checking_every(Duration::ZERO)
}

/// [`env`] whose kept attachments get CNI CHECK only every `check_every`.
fn env_checking_every(check_every: Duration) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let cfg = NetworkConfig {
        namespace: "test".into(),
        conf_dir: dir.path().join("net.d"),
        bin_dirs: vec![],
        network: "memoh-cni".into(),
        bridge: "br-test".into(),
        subnet: "10.210.3.0/24".into(),
        ipam_data_dir: Some(dir.path().join("ipam")),
        state_dir: dir.path().join("state"),
        ifname: "eth0".into(),
        plugin_timeout: Duration::from_secs(5),
        check_every,
        check_gap: Duration::ZERO,
        masquerade: true,
        isolate: true,
        containment: Policy::strict("memoh-test"),
    };
    Env {
        net: Network::with_parts(
            cfg,
            FakeExec::default(),
            FakeFirewall::default(),
            FakeNetns::default(),
        ),
        _dir: dir,
    }
}

fn add_result(ip: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "br-test"},
            {"name": "veth0001"},
            {"name": "eth0", "sandbox": "/run/netns/memoh-test.a"}
        ],
        "ips": [{"interface": 2, "address": format!("{ip}/24"), "gateway": "10.210.3.1"}]
    })
}

fn commands(e: &Env) -> Vec<CniCommand> {
    e.net
        .cni()
        .exec()
        .calls()
        .iter()
        .map(|c| c.command)
        .collect()
}

const NS: &str = "/run/netns/memoh-test.a";

#[tokio::test]
async fn fresh_setup_adds_saves_and_sets_host_rules() {
    let e = env();
    e.net.netns().set(NS, &[]);
    e.net
        .cni()
        .exec()
        .answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    let bn = e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(bn.ip, "10.210.3.2".parse::<IpAddr>().unwrap());
    assert_eq!(bn.prefix_len, 24);
    assert_eq!(bn.bridge.as_deref(), Some("br-test"));
    assert_eq!(bn.host_veth.as_deref(), Some("veth0001"));
    assert_eq!(bn.container_id, "mcp-a");
    assert_eq!(commands(&e), [CniCommand::Add]);
    // The default network was written with the configured bridge, subnet and dataDir.
    let add = &e.net.cni().exec().calls()[0];
    assert_eq!(add.config["bridge"], "br-test");
    assert_eq!(
        add.config["ipam"]["ranges"][0][0]["subnet"],
        "10.210.3.0/24"
    );
    assert!(e.net.config().conf_dir.join("memoh-cni.conflist").is_file());
    assert_eq!(
        e.net.firewall().calls(),
        [
            "no-ruleset",
            "masq 10.210.3.0/24",
            "isolate br-test",
            "bridge-nf",
            "ruleset"
        ]
    );
    assert_eq!(e.net.saved("a").await.unwrap(), Some(bn));
    // Contained: its port isolated, IPv6 off in its namespace, its identity in the ruleset.
    assert_eq!(
        *e.net.netns().isolated.lock().unwrap(),
        HashMap::from([("veth0001".to_string(), true)])
    );
    assert_eq!(*e.net.netns().no_ipv6.lock().unwrap(), [PathBuf::from(NS)]);
    let rules = e.net.firewall().ruleset.lock().unwrap().clone();
    assert!(
        rules.contains("\"veth0001\" . 02:00:00:00:00:aa . 10.210.3.2"),
        "{rules}"
    );
    assert!(rules.contains("set gateways4 { type ipv4_addr; elements = { 10.210.3.1 }; }"));
}

#[tokio::test]
async fn a_bot_that_cannot_be_contained_is_detached_and_refused() {
    for (why, port_fails) in [("port isolation", true), ("ruleset", false)] {
        let e = env();
        e.net.netns().set(NS, &[]);
        e.net
            .cni()
            .exec()
            .answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
        *e.net.netns().fail_isolation.lock().unwrap() = port_fails;
        *e.net.firewall().fail_ruleset.lock().unwrap() = !port_fails;
        let err = e.net.setup("a", Path::new(NS)).await.unwrap_err();
        assert!(
            err.to_string().contains("isolation cannot be put in place"),
            "{why}: {err}"
        );
        // Nothing of the attachment is left: no network beats an open one. A ruleset that
        // cannot be applied at all is found before ADD.
        let want: &[CniCommand] = if port_fails {
            &[CniCommand::Add, CniCommand::Del]
        } else {
            &[]
        };
        assert_eq!(commands(&e), want, "{why}");
        assert_eq!(e.net.saved("a").await.unwrap(), None, "{why}");
    }
}

#[tokio::test]
async fn the_last_teardown_removes_the_agents_rules() {
    let e = env();
    e.net.netns().set(NS, &[]);
    let ns_b = "/run/netns/memoh-b";
    e.net.netns().set(ns_b, &[]);
    let exec = e.net.cni().exec();
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    let mut second = add_result("10.210.3.3");
    second["interfaces"][1]["name"] = json!("veth0002");
    exec.answer(CniCommand::Add, Ok(Some(second)));
    e.net.setup("b", Path::new(ns_b)).await.unwrap();
    let fw = e.net.firewall();
    let before = fw.calls().len();

    // One bot left: the ruleset loses a (in place), the shared rules stay.
    e.net.teardown("a").await.unwrap();
    let calls = fw.calls()[before..].to_vec();
    assert_eq!(calls, ["delta"]);
    assert!(!calls.iter().any(|c| c.starts_with("un")), "{calls:?}");
    let rules = fw.ruleset.lock().unwrap().clone();
    assert!(
        !rules.contains("veth0001") && rules.contains("veth0002"),
        "{rules}"
    );

    // The last one: tables, isolation and masquerade go.
    let before = fw.calls().len();
    e.net.teardown("b").await.unwrap();
    assert_eq!(
        fw.calls()[before..],
        ["no-ruleset", "unisolate br-test", "unmasq 10.210.3.0/24"]
    );
    assert!(fw
        .ruleset
        .lock()
        .unwrap()
        .contains("delete table inet memoh-test"));
}

/// After the first rebuild, each attachment change is a delta of its own entries, and the
/// ruleset it leaves is, to the byte, the one a rebuild renders.
#[tokio::test]
async fn attachment_changes_are_deltas_that_match_a_rebuild() {
    let e = env();
    let exec = e.net.cni().exec();
    for (i, bot) in ["a", "b", "c"].iter().enumerate() {
        let ns = format!("/run/netns/memoh-test.{bot}");
        e.net.netns().set(&ns, &[]);
        let mut r = add_result(&format!("10.210.3.{}", 2 + i));
        r["interfaces"][1]["name"] = json!(format!("veth000{}", 1 + i));
        exec.answer(CniCommand::Add, Ok(Some(r)));
        e.net.setup(bot, Path::new(&ns)).await.unwrap();
    }
    let fw = e.net.firewall();
    let changes: Vec<String> = fw
        .calls()
        .into_iter()
        .filter(|c| c.contains("ruleset") || c == "delta")
        .collect();
    assert_eq!(changes, ["no-ruleset", "ruleset", "delta", "delta"]);
    let rules = || fw.ruleset.lock().unwrap().clone();
    let in_place = rules();
    assert!(in_place.contains("\"veth0003\" . 02:00:00:00:00:aa . 10.210.3.4"));
    e.net.contain().await.unwrap();
    assert_eq!(in_place, rules(), "in place vs rebuilt");

    e.net.teardown("b").await.unwrap();
    assert_eq!(fw.calls().last().unwrap(), "delta");
    let in_place = rules();
    assert!(!in_place.contains("veth0002"), "{in_place}");
    e.net.contain().await.unwrap();
    assert_eq!(in_place, rules(), "in place vs rebuilt after a detach");
}

/// A delta that cannot apply (the tables were replaced behind the agent's back) becomes a
/// rebuild, and the bot is attached and contained all the same.
#[tokio::test]
async fn a_delta_that_fails_becomes_a_rebuild() {
    let e = env();
    let exec = e.net.cni().exec();
    e.net.netns().set(NS, &[]);
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    let fw = e.net.firewall();
    *fw.ruleset.lock().unwrap() = "table inet memoh-test { }".into();
    let ns_b = "/run/netns/memoh-test.b";
    e.net.netns().set(ns_b, &[]);
    let mut r = add_result("10.210.3.3");
    r["interfaces"][1]["name"] = json!("veth0002");
    exec.answer(CniCommand::Add, Ok(Some(r)));
    e.net.setup("b", Path::new(ns_b)).await.unwrap();
    assert_eq!(fw.calls().last().unwrap(), "ruleset");
    let rules = fw.ruleset.lock().unwrap().clone();
    assert!(
        rules.contains("veth0001") && rules.contains("veth0002"),
        "{rules}"
    );
    // And the next change is in place again.
    e.net.teardown("a").await.unwrap();
    assert_eq!(fw.calls().last().unwrap(), "delta");
}

#[test]
fn cni_check_comes_less_often_with_many_bots() {
    let mut cfg = env().net.config().clone();
    cfg.check_every = Duration::from_secs(120);
    cfg.check_gap = Duration::from_secs(1);
    let period = |bots| attach::check_period(&cfg, bots);
    assert_eq!(period(1), Duration::from_secs(120));
    assert_eq!(period(120), Duration::from_secs(120));
    // 1 000 bots: one CHECK a second for the fleet, not eight.
    assert_eq!(period(1000), Duration::from_secs(1000));
    cfg.check_gap = Duration::ZERO;
    assert_eq!(attach::check_period(&cfg, 1000), Duration::from_secs(120));
    // CHECK on every pass stays that.
    cfg.check_every = Duration::ZERO;
    cfg.check_gap = Duration::from_secs(1);
    assert_eq!(attach::check_period(&cfg, 1000), Duration::ZERO);
}

#[tokio::test]
async fn healthy_bot_keeps_its_address() {
    let e = env();
    e.net.netns().set(NS, &[]);
    e.net
        .cni()
        .exec()
        .answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    let first = e.net.setup("a", Path::new(NS)).await.unwrap();
    e.net.netns().set(NS, &[("10.210.3.2", 24)]);
    let again = e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(commands(&e), [CniCommand::Add, CniCommand::Check]);
    // Host rules are ensured on every setup, healthy or not (the first also checked the
    // ruleset applies before ADD); the kept attachment changes nothing in the ruleset.
    assert_eq!(e.net.firewall().calls().len(), 8);
}

/// A kept attachment's address is checked on every setup, CNI CHECK only when due: a fresh
/// ADD counts as checked, a due one runs CHECK once, and a lost address still re-attaches at
/// once, CHECK due or not.
#[tokio::test]
async fn cni_check_runs_only_when_due() {
    let every = Duration::from_millis(300);
    let e = env_checking_every(every);
    e.net.netns().set(NS, &[]);
    let exec = e.net.cni().exec();
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    e.net.netns().set(NS, &[("10.210.3.2", 24)]);
    for _ in 0..3 {
        e.net.setup("a", Path::new(NS)).await.unwrap();
    }
    assert_eq!(commands(&e), [CniCommand::Add], "checked right after ADD");
    tokio::time::sleep(every).await;
    e.net.setup("a", Path::new(NS)).await.unwrap();
    e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(commands(&e), [CniCommand::Add, CniCommand::Check]);
    // The address went: re-attached on the next setup although CHECK is not due.
    e.net.netns().set(NS, &[]);
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.3"))));
    let bn = e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(bn.ip, "10.210.3.3".parse::<IpAddr>().unwrap());
    assert_eq!(
        commands(&e),
        [
            CniCommand::Add,
            CniCommand::Check,
            CniCommand::Del,
            CniCommand::Add
        ]
    );
}

#[tokio::test]
async fn unhealthy_bot_is_detached_and_attached_again() {
    for (why, addrs, check_fails) in [
        ("address gone", vec![], false),
        ("other address", vec![("10.210.3.9", 24)], false),
        ("check fails", vec![("10.210.3.2", 24)], true),
    ] {
        let e = env();
        e.net.netns().set(NS, &[]);
        let exec = e.net.cni().exec();
        exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
        e.net.setup("a", Path::new(NS)).await.unwrap();
        e.net.netns().set(NS, &addrs);
        if check_fails {
            exec.answer(CniCommand::Check, Err("bridge port missing"));
        }
        exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.3"))));
        let bn = e.net.setup("a", Path::new(NS)).await.unwrap();
        assert_eq!(bn.ip, "10.210.3.3".parse::<IpAddr>().unwrap(), "{why}");
        let cmds = commands(&e);
        assert_eq!(cmds.first(), Some(&CniCommand::Add), "{why}");
        assert_eq!(
            &cmds[cmds.len() - 2..],
            [CniCommand::Del, CniCommand::Add],
            "{why}"
        );
        // The stale DEL carried the saved result.
        let del = exec
            .calls()
            .into_iter()
            .find(|c| c.command == CniCommand::Del)
            .unwrap();
        assert_eq!(del.config["prevResult"], add_result("10.210.3.2"), "{why}");
    }
}

#[tokio::test]
async fn retryable_add_errors_delete_and_add_once_more() {
    for msg in [
        "failed to allocate for range 0: 10.210.3.2 has been allocated to mcp-a, duplicate allocation is not allowed",
        "container veth name provided (eth0) already exists",
        "could not set bridge's mac address: device busy",
    ] {
        let e = env();
        let exec = e.net.cni().exec();
        // The bridge exists: the first ADD runs shared, the retry alone.
        exec.links.lock().unwrap().insert("br-test".into());
        exec.answer(CniCommand::Add, Err(msg));
        exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.4"))));
        let bn = e.net.setup("a", Path::new(NS)).await.unwrap();
        assert_eq!(bn.ip, "10.210.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(
            commands(&e),
            [CniCommand::Add, CniCommand::Del, CniCommand::Add],
            "{msg}"
        );
        let locks: Vec<LockMode> = exec.calls().iter().map(|c| c.lock).collect();
        assert_eq!(
            locks,
            [LockMode::Shared, LockMode::Shared, LockMode::Exclusive],
            "{msg}"
        );
        // The bridge's MAC is pinned before each ADD.
        assert_eq!(*e.net.netns().pinned.lock().unwrap(), ["br-test", "br-test"]);
    }
}

#[tokio::test]
async fn retry_happens_once_and_failures_are_cleaned_up() {
    let e = env();
    let exec = e.net.cni().exec();
    exec.answer(CniCommand::Add, Err("duplicate allocation is not allowed"));
    exec.answer(CniCommand::Add, Err("duplicate allocation is not allowed"));
    let err = e.net.setup("a", Path::new(NS)).await.unwrap_err();
    assert!(err.to_string().contains("duplicate allocation"), "{err}");
    assert_eq!(
        commands(&e),
        [
            CniCommand::Add,
            CniCommand::Del,
            CniCommand::Add,
            CniCommand::Del
        ]
    );
    assert_eq!(e.net.saved("a").await.unwrap(), None);
    // Only the check before ADD that the (empty) ruleset applies.
    assert_eq!(e.net.firewall().calls(), ["no-ruleset"]);
}

#[tokio::test]
async fn other_add_errors_are_not_retried() {
    let e = env();
    e.net.cni().exec().answer(
        CniCommand::Add,
        Err("failed to create bridge: permission denied"),
    );
    let err = e.net.setup("a", Path::new(NS)).await.unwrap_err();
    assert!(matches!(err, AgentError::CniPlugin { .. }), "{err}");
    assert_eq!(commands(&e), [CniCommand::Add, CniCommand::Del]);
}

#[tokio::test]
async fn an_empty_ip_is_an_error() {
    let e = env();
    e.net.cni().exec().answer(
        CniCommand::Add,
        Ok(Some(
            json!({"cniVersion": "1.0.0", "interfaces": [], "ips": []}),
        )),
    );
    let err = e.net.setup("a", Path::new(NS)).await.unwrap_err();
    assert!(err.to_string().contains("no ip address"), "{err}");
    assert_eq!(commands(&e), [CniCommand::Add, CniCommand::Del]);
    assert_eq!(e.net.saved("a").await.unwrap(), None);
}

#[tokio::test]
async fn teardown_of_unknown_bot_succeeds() {
    let e = env();
    e.net.teardown("nobody").await.unwrap();
    assert!(commands(&e).is_empty());
    assert_eq!(
        *e.net.netns().deleted.lock().unwrap(),
        ["memoh-test.nobody"]
    );
}

#[tokio::test]
async fn teardown_uses_saved_state_even_when_the_netns_is_gone() {
    for netns_alive in [true, false] {
        let e = env();
        e.net.netns().set(NS, &[]);
        let exec = e.net.cni().exec();
        exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
        e.net.setup("a", Path::new(NS)).await.unwrap();
        if !netns_alive {
            e.net.netns().live.lock().unwrap().clear();
        }
        e.net.teardown("a").await.unwrap();
        let del = exec.calls().pop().unwrap();
        assert_eq!(del.command, CniCommand::Del);
        assert_eq!(del.config["prevResult"], add_result("10.210.3.2"));
        assert_eq!(del.netns.is_some(), netns_alive);
        let cleaned = e
            .net
            .firewall()
            .calls()
            .contains(&"cni-masq memoh-cni mcp-a".to_string());
        assert_eq!(cleaned, !netns_alive);
        assert_eq!(e.net.saved("a").await.unwrap(), None);
        assert!(!e.net.netns().exists(Path::new(NS)).await);
        // A second teardown is a no-op.
        e.net.teardown("a").await.unwrap();
    }
}

#[tokio::test]
async fn failed_del_keeps_state_for_a_retry() {
    let e = env();
    e.net.netns().set(NS, &[]);
    let exec = e.net.cni().exec();
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    exec.answer(CniCommand::Del, Err("ipam store locked"));
    assert!(e.net.teardown("a").await.is_err());
    assert!(e.net.saved("a").await.unwrap().is_some());
    e.net.teardown("a").await.unwrap();
    assert!(e.net.saved("a").await.unwrap().is_none());
}

#[tokio::test]
async fn bad_bot_ids_are_refused() {
    let e = env();
    for bad in ["", "a b", "../x", "a/b"] {
        assert!(matches!(
            e.net.setup(bad, Path::new(NS)).await,
            Err(AgentError::InvalidBotId(_))
        ));
        assert!(matches!(
            e.net.teardown(bad).await,
            Err(AgentError::InvalidBotId(_))
        ));
    }
}

#[test]
fn retryable_classification() {
    let cases = [
        (
            "10.0.0.2 has been allocated to x, duplicate allocation is not allowed",
            true,
        ),
        ("container veth name provided (eth0) already exists", true),
        ("failed to set bridge's mac address", true),
        ("could not set bridge mac address to aa:bb", true),
        ("failed to find plugin \"bridge\"", false),
        ("no IP addresses available in range set", false),
    ];
    for (msg, want) in cases {
        let e = AgentError::Network {
            op: "cni add".into(),
            reason: msg.into(),
        };
        assert_eq!(is_retryable_add_error(&e), want, "{msg}");
    }
}

#[tokio::test]
async fn a_stopped_bot_asks_for_its_address_again_and_takes_another_when_it_is_gone() {
    let e = env();
    // The bot's state directory exists (a bot the agent created).
    std::fs::create_dir_all(crate::ids::bot_dir(&e.net.config().state_dir, "a")).unwrap();
    let exec = e.net.cni().exec();
    e.net.netns().set(NS, &[]);
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    let first = e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(exec.calls().last().unwrap().ip, None);
    // Stopped: detached, its namespace gone.
    e.net.teardown("a").await.unwrap();
    assert!(e.net.saved("a").await.unwrap().is_none());
    // Started again: the old address is asked for.
    e.net.netns().set(NS, &[]);
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    let again = e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(again.ip, first.ip);
    let add = exec
        .calls()
        .into_iter()
        .rfind(|c| c.command == CniCommand::Add)
        .unwrap();
    assert_eq!(add.ip, Some(first.ip));
    // Stopped again, and another bot took the address meanwhile: IPAM refuses it, the bot
    // takes a new one.
    e.net.teardown("a").await.unwrap();
    e.net.netns().set(NS, &[]);
    exec.answer(
        CniCommand::Add,
        Err("requested IP address 10.210.3.2 is not available in range set"),
    );
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.9"))));
    let moved = e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(moved.ip, "10.210.3.9".parse::<IpAddr>().unwrap());
    let adds: Vec<_> = exec
        .calls()
        .into_iter()
        .filter(|c| c.command == CniCommand::Add)
        .map(|c| c.ip)
        .collect();
    assert_eq!(adds[adds.len() - 2..], [Some(first.ip), None]);
}

#[tokio::test]
async fn an_unknown_bot_gets_no_remembered_address() {
    let e = env();
    let exec = e.net.cni().exec();
    e.net.netns().set(NS, &[]);
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    e.net.teardown("a").await.unwrap();
    // No state directory of the bot: nothing was written, nothing made.
    assert!(!crate::ids::bot_dir(&e.net.config().state_dir, "a").exists());
    e.net.netns().set(NS, &[]);
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.3"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(exec.calls().last().unwrap().ip, None);
}

/// Where an older agent put bot `a`.
const OLD_NS: &str = "/run/netns/memoh-a";

#[tokio::test]
async fn a_bot_moves_from_its_old_namespace_at_its_next_start() {
    let e = env();
    assert_eq!(e.net.netns_path("a"), Path::new(NS));
    // Attached by an older agent, in the old namespace.
    e.net.netns().set(OLD_NS, &[]);
    let exec = e.net.cni().exec();
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(OLD_NS)).await.unwrap();
    // While its task runs there, the agent keeps it there (what the spec records).
    e.net.netns().set(OLD_NS, &[("10.210.3.2", 24)]);
    let kept = e.net.setup("a", Path::new(OLD_NS)).await.unwrap();
    assert_eq!(kept.netns, Path::new(OLD_NS));
    assert!(e.net.netns().deleted.lock().unwrap().is_empty());
    // Its next start is in today's namespace: the old attachment goes (DEL), the address
    // is asked for again, and the old namespace is deleted.
    e.net.netns().set(NS, &[]);
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    let moved = e.net.setup("a", Path::new(NS)).await.unwrap();
    assert_eq!(moved.netns, Path::new(NS));
    assert_eq!(moved.ip, kept.ip);
    let calls = exec.calls();
    let del = calls
        .iter()
        .rfind(|c| c.command == CniCommand::Del)
        .unwrap();
    assert_eq!(del.netns.as_deref(), Some(Path::new(OLD_NS)));
    let add = calls.last().unwrap();
    assert_eq!(add.command, CniCommand::Add);
    assert_eq!(add.netns.as_deref(), Some(Path::new(NS)));
    assert_eq!(*e.net.netns().deleted.lock().unwrap(), ["memoh-a"]);
    assert!(!e.net.netns().exists(Path::new(OLD_NS)).await);
}

#[tokio::test]
async fn teardown_of_a_bot_in_its_old_namespace_deletes_that_namespace() {
    let e = env();
    e.net.netns().set(OLD_NS, &[]);
    let exec = e.net.cni().exec();
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(OLD_NS)).await.unwrap();
    e.net.teardown("a").await.unwrap();
    let del = exec.calls().pop().unwrap();
    assert_eq!(del.command, CniCommand::Del);
    assert_eq!(del.netns.as_deref(), Some(Path::new(OLD_NS)));
    assert_eq!(
        *e.net.netns().deleted.lock().unwrap(),
        ["memoh-test.a", "memoh-a"]
    );
    assert!(e.net.saved("a").await.unwrap().is_none());
}

fn live(bots: &[&str]) -> std::collections::HashSet<String> {
    bots.iter().map(|b| b.to_string()).collect()
}

#[tokio::test]
async fn cleanup_removes_leftovers_and_nothing_a_live_bot_uses() {
    let e = env();
    // A live bot, attached.
    e.net.netns().set(NS, &[]);
    let exec = e.net.cni().exec();
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    e.net.netns().set(NS, &[("10.210.3.2", 24)]);
    // A bot that is gone but left its attachment.
    let gone_ns = "/run/netns/memoh-test.gone";
    e.net.netns().set(gone_ns, &[]);
    exec.answer(CniCommand::Add, Ok(Some(add_result("10.210.3.7"))));
    e.net.setup("gone", Path::new(gone_ns)).await.unwrap();
    // Namespaces: one of a gone bot of this agent, one of another agent, an old-style empty
    // one, an old-style one holding an address (maybe another agent's live bot), and a
    // live bot's old-style one.
    for (ns, addrs) in [
        ("/run/netns/memoh-test.b", vec![]),
        ("/run/netns/memoh-other.b", vec![]),
        ("/run/netns/memoh-test.x.b", vec![]),
        ("/run/netns/memoh-c", vec![]),
        ("/run/netns/memoh-d", vec![("10.210.3.9", 24)]),
        ("/run/netns/memoh-a", vec![]),
        ("/run/netns/cni-1234", vec![]),
    ] {
        e.net.netns().set(ns, &addrs);
    }
    // host-local reservations: the live bot's, a gone bot's, a gone bot's address another
    // namespace holds, one of another owner.
    let ipam = e
        .net
        .config()
        .ipam_data_dir
        .clone()
        .unwrap()
        .join("memoh-cni");
    std::fs::create_dir_all(&ipam).unwrap();
    for (ip, owner) in [
        ("10.210.3.2", "mcp-a"),
        ("10.210.3.5", "mcp-old"),
        ("10.210.3.9", "mcp-d"),
        ("10.210.3.10", "other-x"),
    ] {
        std::fs::write(ipam.join(ip), format!("{owner}\r\neth0")).unwrap();
    }
    std::fs::write(ipam.join("last_reserved_ip.0"), "10.210.3.10").unwrap();

    let mut removed = e.net.cleanup(|| async { Ok(live(&["a"])) }).await.unwrap();
    removed.sort();
    let names: Vec<String> = removed.iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        [
            "network attachment of bot gone",
            "network namespace memoh-c",
            "network namespace memoh-test.b",
            "address reservation 10.210.3.5 (mcp-old)",
        ]
    );
    // The live bot keeps everything: its attachment, namespace, reservation, the tables.
    assert!(e.net.saved("a").await.unwrap().is_some());
    assert!(e.net.saved("gone").await.unwrap().is_none());
    for kept in [
        NS,
        "/run/netns/memoh-a",
        "/run/netns/memoh-d",
        "/run/netns/memoh-other.b",
        "/run/netns/memoh-test.x.b",
        "/run/netns/cni-1234",
    ] {
        assert!(e.net.netns().exists(Path::new(kept)).await, "{kept}");
    }
    assert!(!e.net.netns().exists(Path::new(gone_ns)).await);
    for ip in [
        "10.210.3.2",
        "10.210.3.9",
        "10.210.3.10",
        "last_reserved_ip.0",
    ] {
        assert!(ipam.join(ip).exists(), "{ip}");
    }
    let rules = e.net.firewall().ruleset.lock().unwrap().clone();
    assert!(rules.contains("veth0001"), "{rules}");
    assert!(!e
        .net
        .firewall()
        .calls()
        .iter()
        .any(|c| c.starts_with("unisolate")));

    // Nothing left: a second run removes nothing.
    let again = e.net.cleanup(|| async { Ok(live(&["a"])) }).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
}

#[tokio::test]
async fn cleanup_with_no_bot_attached_removes_the_tables_and_rules() {
    let e = env();
    e.net.netns().set(NS, &[]);
    e.net
        .cni()
        .exec()
        .answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    // The bot's container is gone (deleted behind the agent's back).
    let mut removed = e.net.cleanup(|| async { Ok(live(&[])) }).await.unwrap();
    removed.sort();
    let kinds: Vec<LeftoverKind> = removed.iter().map(|l| l.kind).collect();
    assert_eq!(kinds[0], LeftoverKind::Attachment);
    assert!(e.net.saved("a").await.unwrap().is_none());
    assert!(!e.net.netns().exists(Path::new(NS)).await);
    assert!(e
        .net
        .firewall()
        .ruleset
        .lock()
        .unwrap()
        .contains("delete table inet memoh-test"));
    // With the tables left behind by a crash, cleanup removes them and says so.
    *e.net.firewall().ruleset.lock().unwrap() = "table inet memoh-test { chain x {} }".into();
    let removed = e.net.cleanup(|| async { Ok(live(&[])) }).await.unwrap();
    let names: Vec<String> = removed.iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        [
            "nftables table bridge memoh-test",
            "nftables table inet memoh-test",
            "isolation rule of bridge br-test",
            "masquerade rule of subnet 10.210.3.0/24",
        ]
    );
}
