//! The fixture of the network system tests (`network_system.rs`, `cni_concurrency_system.rs`):
//! a bridge, a subnet, a conf dir, an IPAM dataDir, namespaces, an isolation chain and a
//! MASQUERADE comment owned by one test, removed by a guard even when the test fails.
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command as StdCommand;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use memoh_agent::network::{ExecPlugins, IpNetns, Iptables, Network, NetworkConfig, Policy};

/// Whether the tests can run; panics under CI when they cannot.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("network system tests need root (CI is set, so they must not be skipped)");
    }
    eprintln!("skipped: network system tests need root");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Four hex digits that differ between tests and runs.
pub fn tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = nanos ^ (std::process::id() << 8) ^ (COUNTER.fetch_add(1, Ordering::SeqCst) * 7919);
    format!("{:04x}", n & 0xffff)
}

pub fn sh(program: &str, args: &[&str]) -> std::process::Output {
    StdCommand::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub tag: String,
    pub bridge: String,
    pub subnet: String,
    pub prefix: String,
    pub network_name: String,
    pub chain: String,
    pub comment: String,
    pub bots: Vec<String>,
    pub net: Network<ExecPlugins, Iptables, IpNetns>,
}

impl Fixture {
    /// A fixture on 10.<200..249>.<octet>.0/24 (a second octet no host route uses).
    pub fn new(octet: u8) -> Self {
        let tag = tag();
        let routes =
            String::from_utf8_lossy(&sh("ip", &["-4", "route", "show"]).stdout).to_string();
        let seed = u16::from_str_radix(&tag, 16).unwrap();
        let second = (0..50u16)
            .map(|i| 200 + (seed + i) % 50)
            .find(|s| !routes.contains(&format!("10.{s}.{octet}.")))
            .expect("a free 10.2xx subnet");
        let prefix = format!("10.{second}.{octet}");
        let dir = tempfile::tempdir().unwrap();
        let bridge = format!("mtst{tag}");
        let network_name = format!("mtst-{tag}");
        let chain = format!("MTST-ISO-{}", tag.to_uppercase());
        let comment = format!("mtst-masq-{tag}");
        let subnet = format!("{prefix}.0/24");
        let cfg = NetworkConfig {
            namespace: format!("mtst-{tag}"),
            conf_dir: dir.path().join("net.d"),
            bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            network: network_name.clone(),
            bridge: bridge.clone(),
            subnet: subnet.clone(),
            ipam_data_dir: Some(dir.path().join("ipam")),
            state_dir: dir.path().join("state"),
            ifname: "eth0".into(),
            plugin_timeout: Duration::from_secs(30),
            // CHECK on every setup: these tests run the real plugins' CHECK too.
            check_every: Duration::ZERO,
            check_gap: Duration::ZERO,
            masquerade: true,
            isolate: true,
            containment: Policy::strict(&format!("mtst-{tag}")),
        };
        let net = Network::with_parts(
            cfg.clone(),
            ExecPlugins::new(cfg.bin_dirs.clone(), cfg.plugin_timeout),
            Iptables::with_names(&chain, &comment),
            IpNetns,
        );
        Self {
            dir,
            tag,
            bridge,
            subnet,
            prefix,
            network_name,
            chain,
            comment,
            bots: Vec::new(),
            net,
        }
    }

    /// A bot id owned by this fixture (its namespace is cleaned up by the guard).
    pub fn bot(&mut self, name: &str) -> String {
        let bot = format!("t{}{name}", self.tag);
        self.bots.push(bot.clone());
        bot
    }

    /// host-local's reservations: files named after an address.
    pub fn reservations(&self) -> Vec<(IpAddr, String)> {
        let dir = self.dir.path().join("ipam").join(&self.network_name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let ip: IpAddr = e.file_name().to_str()?.parse().ok()?;
                let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
                Some((ip, owner))
            })
            .collect()
    }

    pub fn in_subnet(&self, ip: IpAddr) -> bool {
        ip.to_string().starts_with(&format!("{}.", self.prefix))
    }

    pub fn nat_rules_mentioning(&self, what: &str) -> Vec<String> {
        String::from_utf8_lossy(&sh("iptables", &["-w", "5", "-t", "nat", "-S"]).stdout)
            .lines()
            .filter(|l| l.contains(what))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for bot in &self.bots {
            let _ = sh("ip", &["netns", "delete", &self.net.netns_name(bot)]);
        }
        let _ = sh("ip", &["link", "delete", &self.bridge]);
        // The agent's MASQUERADE rule for this subnet, under this test's comment.
        let masq = [
            "-w",
            "5",
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-s",
            &self.subnet,
            "!",
            "-d",
            &self.subnet,
            "-j",
            "MASQUERADE",
            "-m",
            "comment",
            "--comment",
            &self.comment,
        ];
        while sh("iptables", &masq).status.success() {}
        // The isolation chain.
        while sh("iptables", &["-w", "5", "-D", "FORWARD", "-j", &self.chain])
            .status
            .success()
        {}
        let _ = sh("iptables", &["-w", "5", "-F", &self.chain]);
        let _ = sh("iptables", &["-w", "5", "-X", &self.chain]);
        // The containment tables of this fixture's network.
        let table = format!("mtst-{}", self.tag);
        for family in ["bridge", "inet"] {
            let _ = sh("nft", &["delete", "table", family, &table]);
        }
        // The bridge plugin's masquerade rules and chains for this network.
        let quoted = format!("name: \\\"{}\\\"", self.network_name);
        for rule in self.nat_rules_mentioning(&quoted) {
            if let Some(spec) = rule.strip_prefix("-A ") {
                let _ = sh("sh", &["-c", &format!("iptables -w 5 -t nat -D {spec}")]);
                if let Some(chain) = spec
                    .split_whitespace()
                    .last()
                    .filter(|c| c.starts_with("CNI-"))
                {
                    let _ = sh("iptables", &["-w", "5", "-t", "nat", "-F", chain]);
                    let _ = sh("iptables", &["-w", "5", "-t", "nat", "-X", chain]);
                }
            }
        }
    }
}

/// Runs `args` inside namespace `ns`; returns whether it succeeded.
pub async fn in_netns(ns: &str, args: &[&str]) -> bool {
    tokio::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

pub async fn ping(ns: &str, ip: IpAddr) -> bool {
    in_netns(
        ns,
        &["busybox", "ping", "-c", "1", "-W", "1", &ip.to_string()],
    )
    .await
}

pub fn state_file(f: &Fixture, bot: &str) -> PathBuf {
    f.dir
        .path()
        .join("state")
        .join("cni")
        .join(format!("{bot}.json"))
}
