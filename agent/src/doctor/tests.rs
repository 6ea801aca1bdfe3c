//! Unit tests of the checks, the report and the exit code over a fake host.

use super::*;
use std::collections::HashMap;

/// A host where everything is fine unless a field says otherwise.
struct Fake {
    containerd: Result<String, String>,
    image: Result<bool, String>,
    agent: Result<usize, String>,
    on_path: Vec<&'static str>,
    files: Vec<PathBuf>,
    dirs: HashMap<PathBuf, bool>,
    sysctls: HashMap<PathBuf, String>,
    iptables: Result<(), String>,
    root: bool,
    cgroups: Cgroups,
    network: Result<bool, String>,
    bundles: Option<Vec<String>>,
    /// Whether containerd's state directory exists.
    state_dir: bool,
    /// Outputs of programs by "program args".
    outputs: HashMap<String, Result<String, String>>,
    /// Saved attachments (files in `<state_dir>/cni`).
    attached: Vec<String>,
    /// The server binary's dynamic loader (`None`: statically linked).
    loader: Option<String>,
}

impl Default for Fake {
    fn default() -> Self {
        let cfg = Config::default();
        Self {
            containerd: Ok("v2.0.0".into()),
            image: Ok(true),
            agent: Ok(2),
            on_path: vec!["runc", "iptables", "nft"],
            files: std::iter::once(cfg.server_binary.clone())
                .chain(CNI_PLUGINS.iter().map(|p| cfg.cni_bin_dirs[1].join(p)))
                .collect(),
            dirs: HashMap::from([
                ("/run".into(), true),
                ("/run/memoh".into(), true),
                ("/etc".into(), true),
                ("/".into(), true),
            ]),
            sysctls: HashMap::from([
                ("/proc/sys/net/ipv4/ip_forward".into(), "1".into()),
                (
                    "/proc/sys/net/bridge/bridge-nf-call-iptables".into(),
                    "1".into(),
                ),
                (
                    "/proc/sys/net/bridge/bridge-nf-call-ip6tables".into(),
                    "1".into(),
                ),
                (
                    "/proc/sys/net/ipv4/neigh/default/gc_thresh2".into(),
                    "4096".into(),
                ),
                (
                    "/proc/sys/net/ipv4/neigh/default/gc_thresh3".into(),
                    "8192".into(),
                ),
            ]),
            iptables: Ok(()),
            root: true,
            cgroups: Cgroups::V2,
            network: Ok(false),
            bundles: Some(vec!["mcp-a".into(), "mcp-b".into()]),
            loader: None,
            state_dir: true,
            outputs: HashMap::from([
                (
                    "nft list tables".to_string(),
                    Ok("table ip filter\ntable ip nat\n".to_string()),
                ),
                (
                    "iptables -w 5 -S MEMOH-ISOLATION".to_string(),
                    Err("No chain/target/match by that name.".to_string()),
                ),
                (
                    "iptables -w 5 -t nat -S POSTROUTING".to_string(),
                    Ok("-P POSTROUTING ACCEPT\n".to_string()),
                ),
            ]),
            attached: Vec::new(),
        }
    }
}

#[async_trait::async_trait]
impl Host for Fake {
    async fn containerd_version(&self, _: &Config) -> Result<String, String> {
        self.containerd.clone()
    }
    async fn image_present(&self, _: &Config) -> Result<bool, String> {
        self.image.clone()
    }
    async fn agent_bots(&self, _: &Path) -> Result<usize, String> {
        self.agent.clone()
    }
    fn which(&self, program: &str) -> Option<PathBuf> {
        self.on_path
            .contains(&program)
            .then(|| Path::new("/usr/sbin").join(program))
    }
    fn is_file(&self, path: &Path) -> bool {
        self.files.iter().any(|f| f == path)
    }
    fn writable(&self, dir: &Path) -> Option<bool> {
        self.dirs.get(dir).copied()
    }
    fn interpreter(&self, _path: &Path) -> Result<Option<String>, String> {
        Ok(self.loader.clone())
    }
    fn executable(&self, path: &Path) -> Result<(), String> {
        if self.files.iter().any(|f| f == path) {
            Ok(())
        } else {
            Err("does not exist".into())
        }
    }
    fn read(&self, path: &Path) -> Option<String> {
        self.sysctls.get(path).cloned()
    }
    fn run(&self, _: &str, _: &[&str]) -> Result<(), String> {
        self.iptables.clone()
    }
    fn is_root(&self) -> bool {
        self.root
    }
    fn cgroups(&self) -> Cgroups {
        self.cgroups
    }
    fn network_defined(&self, _: &Path, _: &str) -> Result<bool, String> {
        self.network.clone()
    }
    fn output(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let key = format!("{program} {}", args.join(" "));
        self.outputs
            .get(&key)
            .cloned()
            .unwrap_or_else(|| panic!("unexpected run of {key:?}"))
    }
    fn files(&self, dir: &Path) -> Option<Vec<String>> {
        assert_eq!(dir, Path::new("/var/lib/memoh-agent/cni"));
        Some(self.attached.clone())
    }
    fn subdirs(&self, dir: &Path) -> Option<Vec<String>> {
        if dir == Path::new("/run/containerd") {
            return self
                .state_dir
                .then(|| vec!["io.containerd.runtime.v2.task".into()]);
        }
        assert_eq!(
            dir,
            Path::new("/run/containerd/io.containerd.runtime.v2.task/default")
        );
        self.bundles.clone()
    }
}

fn report(host: &Fake) -> (Vec<Check>, String, u8) {
    let checks = futures::executor::block_on(run_checks(
        &Config::default(),
        "/etc/memoh/agent.toml",
        host,
    ));
    let text = render(&checks);
    let code = exit_code(&checks);
    (checks, text, code)
}

fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| {
            l.get(8..)
                .is_some_and(|r| r.starts_with(&format!("{name} ")))
        })
        .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
}

#[test]
fn a_healthy_host_passes() {
    let (checks, text, code) = report(&Fake::default());
    assert_eq!(code, 0, "{text}");
    assert_eq!(checks.len(), 16);
    assert!(checks.iter().all(|c| c.status == Status::Ok), "{text}");
    assert_eq!(text.lines().count(), 17);
    assert!(line(&text, "server")
        .contains("/usr/local/lib/memoh/container-server is executable and statically linked"));
    assert!(text.ends_with("all checks passed\n"));
    assert!(line(&text, "containerd").starts_with("ok      containerd   v2.0.0 at "));
    assert!(line(&text, "cni config").contains("/etc/cni/net.d is writable"));
    assert!(line(&text, "socket").contains("/run/memoh is writable"));
}

#[test]
fn each_problem_names_its_fix() {
    type Break = fn(&mut Fake);
    let cases: &[(&str, Break, &str)] = &[
        (
            "containerd",
            |h| h.containerd = Err("connection refused".into()),
            "systemctl start containerd",
        ),
        (
            "runc",
            |h| h.on_path.retain(|p| *p != "runc"),
            "apt-get install runc",
        ),
        (
            "cni plugins",
            |h| {
                h.files.pop();
            },
            "apt-get install containernetworking-plugins",
        ),
        (
            "cni config",
            |h| {
                h.dirs.insert("/etc".into(), false);
            },
            "mkdir -p /etc/cni/net.d",
        ),
        (
            "iptables",
            |h| h.iptables = Err("can't initialize iptables table `nat'".into()),
            "modprobe iptable_nat",
        ),
        (
            "iptables",
            |h| h.on_path.retain(|p| *p != "iptables"),
            "apt-get install iptables",
        ),
        (
            "ip_forward",
            |h| {
                h.sysctls
                    .insert("/proc/sys/net/ipv4/ip_forward".into(), "0".into());
            },
            "sysctl -w net.ipv4.ip_forward=1",
        ),
        (
            "cgroups",
            |h| h.cgroups = Cgroups::Missing,
            "mount -t cgroup2",
        ),
        (
            "nftables",
            |h| h.on_path.retain(|p| *p != "nft"),
            "apt-get install nftables",
        ),
        (
            "firewall",
            |h| h.attached = vec!["b1.json".into()],
            "systemctl restart memoh-agent",
        ),
        (
            "image",
            |h| h.image = Ok(false),
            "memoh-agent image pull docker.io/memohai/mcp:latest",
        ),
        (
            "server",
            |h| h.files.retain(|f| !f.ends_with("container-server")),
            "install -D -m 0755 container-server /usr/local/lib/memoh/container-server",
        ),
        (
            "task bundles",
            |h| h.bundles = Some(vec!["mcp-a".into(), ".mcp-b".into()]),
            "umount /run/containerd/io.containerd.runtime.v2.task/default/.mcp-b/rootfs \
             2>/dev/null; rm -rf /run/containerd/io.containerd.runtime.v2.task/default/.mcp-b",
        ),
        (
            "socket dir",
            |h| {
                h.dirs.insert("/run/memoh".into(), false);
            },
            "chmod u+w /run/memoh",
        ),
        (
            "agent",
            |h| h.agent = Err("connection refused".into()),
            "systemctl start memoh-agent",
        ),
    ];
    for (name, breaks, fix) in cases {
        let mut host = Fake::default();
        breaks(&mut host);
        let (checks, text, code) = report(&host);
        assert_eq!(code, 1, "{name}: {text}");
        let l = line(&text, name);
        assert!(l.starts_with("problem "), "{name}: {l}");
        assert!(l.contains(&format!("; fix: {fix}")), "{name}: {l}");
        // An unreachable containerd also leaves the image unchecked.
        let expect = if *name == "containerd" { 2 } else { 1 };
        let bad = checks.iter().filter(|c| c.status != Status::Ok).count();
        assert_eq!(bad, expect, "{name} broke other checks:\n{text}");
        let summary = format!("{expect} problem(s), 0 warning(s)\n");
        assert!(text.ends_with(&summary), "{text}");
    }
}

#[test]
fn the_kernels_default_neighbour_table_is_a_warning_for_a_large_subnet() {
    let mut host = Fake::default();
    for (k, v) in [("gc_thresh2", "512"), ("gc_thresh3", "1024")] {
        host.sysctls.insert(
            format!("/proc/sys/net/ipv4/neigh/default/{k}").into(),
            v.into(),
        );
    }
    let (_, text, code) = report(&host);
    assert_eq!(code, 0, "a warning alone passes: {text}");
    let l = line(&text, "neighbours");
    assert!(l.starts_with("warn "), "{l}");
    assert!(l.contains("above 512 entries and full at 1024"), "{l}");
    // The default subnet (a /16) is planned for at most 4096 bots.
    assert!(l.contains("10.88.0.0/16 holds 4096 bots"), "{l}");
    assert!(
        l.contains(
            "; fix: sysctl -w net.ipv4.neigh.default.gc_thresh1=2048 \
             net.ipv4.neigh.default.gc_thresh2=4096 net.ipv4.neigh.default.gc_thresh3=8192"
        ),
        "{l}"
    );
    // A /24 fits under the kernel's defaults.
    let small = Config {
        cni_subnet: "10.1.2.0/24".into(),
        ..Config::default()
    };
    assert_eq!(neighbours(&small, &host).status, Status::Ok);
}

#[test]
fn a_dynamically_linked_server_is_a_warning_naming_its_loader() {
    let host = Fake {
        loader: Some("/lib64/ld-linux-x86-64.so.2".into()),
        ..Fake::default()
    };
    let (_, text, code) = report(&host);
    assert_eq!(code, 0, "a warning alone passes: {text}");
    let l = line(&text, "server");
    assert!(l.starts_with("warn "), "{l}");
    assert!(
        l.contains("dynamically linked (loader /lib64/ld-linux-x86-64.so.2)"),
        "{l}"
    );
    assert!(
        l.contains("exec /opt/memoh/bridge: no such file or directory"),
        "{l}"
    );
    assert!(
        l.contains("; fix: RUSTFLAGS='-C target-feature=+crt-static'"),
        "{l}"
    );
    assert!(text.ends_with("0 problem(s), 1 warning(s)\n"), "{text}");
}

#[test]
fn half_deleted_bundles_name_their_bots() {
    let host = Fake {
        bundles: Some(vec![".mcp-a".into(), "mcp-c".into(), ".mcp-b".into()]),
        ..Fake::default()
    };
    let (_, text, code) = report(&host);
    assert_eq!(code, 1);
    let l = line(&text, "task bundles");
    assert!(l.contains(".mcp-a, .mcp-b half-deleted"), "{l}");
    assert!(l.contains("bot(s) a, b cannot start"), "{l}");
    assert!(!l.contains("mcp-c"), "{l}");
    // No task directory yet (no bot ever ran) is fine.
    let host = Fake {
        bundles: None,
        ..Fake::default()
    };
    let (_, text, code) = report(&host);
    assert_eq!(code, 0, "{text}");
    assert!(line(&text, "task bundles").starts_with("ok "), "{text}");
}

#[test]
fn a_missing_containerd_state_dir_is_a_warning_while_containerd_answers() {
    let host = Fake {
        bundles: None,
        state_dir: false,
        ..Fake::default()
    };
    let (checks, text, code) = report(&host);
    assert_eq!(code, 0, "a warning alone passes: {text}");
    let l = line(&text, "task bundles");
    assert!(l.starts_with("warn "), "{l}");
    assert!(l.contains("/run/containerd does not exist"), "{l}");
    assert!(
        l.contains("fix: set containerd_state in /etc/memoh/agent.toml"),
        "{l}"
    );
    assert_eq!(
        checks.iter().filter(|c| c.status != Status::Ok).count(),
        1,
        "{text}"
    );
    // With containerd down its state directory may well be gone: not this check's problem.
    let host = Fake {
        bundles: None,
        state_dir: false,
        containerd: Err("connection refused".into()),
        ..Fake::default()
    };
    let (_, text, _) = report(&host);
    assert!(
        line(&text, "task bundles").contains("not checked"),
        "{text}"
    );
}

#[test]
fn an_unreachable_containerd_also_fails_the_image_check() {
    let host = Fake {
        containerd: Err("no such file".into()),
        ..Fake::default()
    };
    let (_, text, code) = report(&host);
    assert_eq!(code, 1);
    assert!(line(&text, "image").contains("cannot check"), "{text}");
}

#[test]
fn warnings_alone_pass() {
    let mut host = Fake {
        root: false,
        ..Fake::default()
    };
    host.sysctls
        .remove(Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables"));
    let (_, text, code) = report(&host);
    assert_eq!(code, 0, "{text}");
    assert!(line(&text, "bridge-nf").starts_with("warn "), "{text}");
    assert!(
        line(&text, "bridge-nf").contains("modprobe br_netfilter"),
        "{text}"
    );
    assert!(
        line(&text, "bridge-nf").contains("bridge table still hold"),
        "{text}"
    );
    assert!(
        line(&text, "iptables").contains("sudo memoh-agent doctor"),
        "{text}"
    );
    assert!(text.ends_with("0 problem(s), 2 warning(s)\n"), "{text}");
}

#[test]
fn firewall_leftovers_and_missing_tables_are_reported() {
    // No bot attached, everything of the agent's left behind: a warning naming each fix.
    let mut host = Fake::default();
    host.outputs.insert(
        "nft list tables".into(),
        Ok("table ip nat\ntable bridge memoh-default\ntable inet memoh-default\n".into()),
    );
    host.outputs.insert(
        "iptables -w 5 -S MEMOH-ISOLATION".into(),
        Ok("-N MEMOH-ISOLATION\n-A MEMOH-ISOLATION -i cni0 -o cni0 -j DROP\n".into()),
    );
    host.outputs.insert(
        "iptables -w 5 -t nat -S POSTROUTING".into(),
        Ok("-A POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 -m comment --comment memoh-masq -j MASQUERADE\n".into()),
    );
    let (_, text, code) = report(&host);
    assert_eq!(code, 0, "{text}");
    let l = line(&text, "firewall");
    assert!(l.starts_with("warn "), "{l}");
    for want in [
        "fix: memoh-agent net cleanup",
        "nft delete table bridge memoh-default",
        "nft delete table inet memoh-default",
        "iptables -D MEMOH-ISOLATION -i cni0 -o cni0 -j DROP",
        "iptables -t nat -D POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 -j MASQUERADE",
    ] {
        assert!(l.contains(want), "{want}: {l}");
    }
    // Bots attached and the tables there: fine.
    host.attached = vec!["a.json".into(), "b.json".into()];
    let (_, text, code) = report(&host);
    assert_eq!(code, 0, "{text}");
    assert!(
        line(&text, "firewall").contains("contain 2 attached bot(s)"),
        "{text}"
    );
}

#[test]
fn a_defined_network_needs_no_writable_dir() {
    let mut host = Fake {
        network: Ok(true),
        ..Fake::default()
    };
    host.dirs.insert("/etc".into(), false);
    let (_, text, code) = report(&host);
    assert_eq!(code, 0, "{text}");
    assert!(line(&text, "cni config").contains("network memoh-cni in /etc/cni/net.d"));
}

#[test]
fn a_missing_dir_under_a_writable_parent_is_fine() {
    let mut host = Fake::default();
    host.dirs.remove(Path::new("/run/memoh"));
    let (_, text, code) = report(&host);
    assert_eq!(code, 0, "{text}");
    assert!(line(&text, "socket").contains("created when the agent starts"));
}
