//! Checks of the host's network as bots need it: the CNI plugins and network config,
//! iptables, nftables, bridge netfilter, and the agent's firewall state against its attached
//! bots (leftovers included).

use std::path::Path;

use super::{can_write, Check, Host, Status, CNI_PLUGINS};
use crate::config::Config;

pub(super) fn cni_plugins(cfg: &Config, config_path: &str, host: &dyn Host) -> Check {
    let dirs = cfg
        .cni_bin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for p in CNI_PLUGINS {
        match cfg
            .cni_bin_dirs
            .iter()
            .map(|d| d.join(p))
            .find(|f| host.is_file(f))
        {
            Some(f) => found.push(f.display().to_string()),
            None => missing.push(*p),
        }
    }
    if missing.is_empty() {
        Check::ok("cni plugins", found.join(" "))
    } else {
        Check::bad(
            "cni plugins",
            Status::Problem,
            format!("{} not in {dirs}", missing.join(", ")),
            format!(
                "apt-get install containernetworking-plugins (or set cni_bin_dirs in {config_path})"
            ),
        )
    }
}

pub(super) fn cni_config(cfg: &Config, config_path: &str, host: &dyn Host) -> Check {
    let dir = &cfg.cni_conf_dir;
    match host.network_defined(dir, &cfg.cni_network) {
        Ok(true) => {
            return Check::ok(
                "cni config",
                format!("network {} in {}", cfg.cni_network, dir.display()),
            )
        }
        Ok(false) => {}
        Err(e) => {
            return Check::bad(
                "cni config",
                Status::Problem,
                e,
                format!("set cni_conf_dir in {config_path}"),
            )
        }
    }
    match can_write(host, dir) {
        (_, true) => Check::ok(
            "cni config",
            format!(
                "{} is writable: the agent writes network {} there",
                dir.display(),
                cfg.cni_network
            ),
        ),
        (true, false) => Check::bad(
            "cni config",
            Status::Problem,
            format!(
                "{} has no network {} and is not writable",
                dir.display(),
                cfg.cni_network
            ),
            format!("chmod u+w {} (the agent runs as root)", dir.display()),
        ),
        (false, false) => Check::bad(
            "cni config",
            Status::Problem,
            format!("{} does not exist and cannot be created", dir.display()),
            format!("mkdir -p {}", dir.display()),
        ),
    }
}

pub(super) fn iptables(host: &dyn Host) -> Check {
    if host.which("iptables").is_none() {
        return Check::bad(
            "iptables",
            Status::Problem,
            "not found on PATH",
            "apt-get install iptables",
        );
    }
    if !host.is_root() {
        return Check::bad(
            "iptables",
            Status::Warn,
            "not checked: doctor does not run as root",
            "sudo memoh-agent doctor",
        );
    }
    match host.run("iptables", &["-t", "nat", "-S"]) {
        Ok(()) => Check::ok("iptables", "iptables -t nat -S works"),
        Err(e) => Check::bad(
            "iptables",
            Status::Problem,
            format!("iptables -t nat -S failed: {e}"),
            "modprobe iptable_nat",
        ),
    }
}

pub(super) fn nftables(host: &dyn Host) -> Check {
    if host.which("nft").is_none() {
        return Check::bad(
            "nftables",
            Status::Problem,
            "nft not found on PATH: bots cannot be contained, so the agent refuses to start them",
            "apt-get install nftables",
        );
    }
    if !host.is_root() {
        return Check::ok(
            "nftables",
            "nft found (not run: doctor does not run as root)",
        );
    }
    match host.output("nft", &["list", "tables"]) {
        Ok(_) => Check::ok("nftables", "nft list tables works"),
        Err(e) => Check::bad(
            "nftables",
            Status::Problem,
            format!("nft list tables failed: {e}: bots cannot be contained"),
            "use a kernel with nf_tables (bridge and inet families)",
        ),
    }
}

/// Bridge netfilter is the third layer of bot-to-bot isolation (the iptables one); the
/// bridge-level layers hold without it, so it is a warning, and the agent turns it on itself.
pub(super) fn bridge_netfilter(host: &dyn Host) -> Check {
    let paths = crate::network::firewall::BRIDGE_NETFILTER_SYSCTLS;
    let off: Vec<String> = paths
        .iter()
        .filter_map(|p| match host.read(Path::new(p)).as_deref() {
            Some("1") => None,
            Some(v) => Some(format!("{p} is {v}")),
            None => Some(format!("{p} is missing")),
        })
        .collect();
    if off.is_empty() {
        return Check::ok("bridge-nf", format!("{} are 1", paths.join(" and ")));
    }
    Check::bad(
        "bridge-nf",
        Status::Warn,
        format!(
            "{}: the iptables layer of bot-to-bot isolation is off (port isolation and the \
             bridge table still hold; the agent turns it on when it attaches a bot)",
            off.join(", ")
        ),
        "modprobe br_netfilter && sysctl -w net.bridge.bridge-nf-call-iptables=1 \
         net.bridge.bridge-nf-call-ip6tables=1",
    )
}

/// The agent's firewall state against its attached bots: its tables missing while bots are
/// attached (they run uncontained), or its tables, isolation rule or MASQUERADE rule left
/// behind with no bot attached.
pub(super) fn firewall_state(cfg: &Config, host: &dyn Host) -> Check {
    use crate::network::containment::table_name;
    use crate::network::firewall::{DEFAULT_ISOLATION_CHAIN, DEFAULT_MASQ_COMMENT};
    if !host.is_root() {
        return Check::ok("firewall", "not checked: doctor does not run as root");
    }
    let table = table_name(&cfg.namespace);
    let attached = host
        .files(&cfg.state_dir.join("cni"))
        .unwrap_or_default()
        .iter()
        .filter(|f| f.ends_with(".json"))
        .count();
    let Ok(tables) = host.output("nft", &["list", "tables"]) else {
        return Check::ok("firewall", "not checked: nft does not run");
    };
    let present: Vec<String> = ["bridge", "inet"]
        .iter()
        .map(|f| format!("table {f} {table}"))
        .filter(|t| tables.lines().any(|l| l.trim() == t))
        .collect();
    if attached > 0 {
        if present.len() == 2 {
            return Check::ok(
                "firewall",
                format!("tables {table} contain {attached} attached bot(s)"),
            );
        }
        return Check::bad(
            "firewall",
            Status::Problem,
            format!(
                "{attached} bot(s) attached but tables bridge/inet {table} are not both there: \
                 the bots are not contained"
            ),
            "systemctl restart memoh-agent (its reconcile puts the ruleset back)",
        );
    }
    let mut left = Vec::new();
    let mut fixes = Vec::new();
    for t in &present {
        left.push(t.clone());
        fixes.push(format!("nft delete {t}"));
    }
    let bridge = &cfg.cni_bridge;
    let isolation = format!("-A {DEFAULT_ISOLATION_CHAIN} -i {bridge} -o {bridge} -j DROP");
    if host
        .output("iptables", &["-w", "5", "-S", DEFAULT_ISOLATION_CHAIN])
        .is_ok_and(|o| o.lines().any(|l| l.trim() == isolation))
    {
        left.push(format!("isolation rule of {bridge}"));
        fixes.push(format!(
            "iptables -D {DEFAULT_ISOLATION_CHAIN} -i {bridge} -o {bridge} -j DROP"
        ));
    }
    let subnet = &cfg.cni_subnet;
    if host
        .output("iptables", &["-w", "5", "-t", "nat", "-S", "POSTROUTING"])
        .is_ok_and(|o| {
            o.lines().any(|l| {
                l.contains(&format!("-s {subnet} "))
                    && l.contains(DEFAULT_MASQ_COMMENT)
                    && l.contains("MASQUERADE")
            })
        })
    {
        left.push(format!("masquerade rule of {subnet}"));
        fixes.push(format!(
            "iptables -t nat -D POSTROUTING -s {subnet} ! -d {subnet} -j MASQUERADE -m comment \
             --comment {DEFAULT_MASQ_COMMENT}"
        ));
    }
    if left.is_empty() {
        return Check::ok("firewall", "no bot attached and nothing left behind");
    }
    Check::bad(
        "firewall",
        Status::Warn,
        format!(
            "no bot attached, but the agent's {} are left behind",
            left.join(", ")
        ),
        format!("memoh-agent net cleanup (or: {})", fixes.join("; ")),
    )
}
