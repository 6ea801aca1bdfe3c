//! The OCI runtime spec of a bot container, built from the image config and the bot's options.
//!
//! Pure: the host facts it needs (TZ, whether `/etc/resolv.conf` exists) come in through
//! [`SpecOptions`], which [`SpecOptions::with_host_files`] fills from the real host.
//!
//! Every bot runs code an AI wrote, so its process gets the privileges of a hardened container
//! and nothing more, each layer on its own enough to stop the common escapes:
//! - a seccomp allow-list ([`seccomp`], data in `spec/seccomp.toml`): no keyrings, BPF, perf,
//!   mounts, namespaces (clone with namespace flags, unshare, setns), ptrace, module or kexec
//!   calls, vsock;
//! - `no_new_privileges`: no setuid binary or file capability raises what a process holds;
//! - a minimal capability set ([`default_capabilities`]): no NET_RAW, MKNOD, SYS_ADMIN, ...;
//! - masked and read-only paths in `/proc` and `/sys` ([`MASKED_PATHS`], [`READONLY_PATHS`]);
//! - the standard device nodes only, the device cgroup denying every other
//!   ([`device_rules`]).
//!
//! Here: [`SpecOptions`] and [`build_spec`] (process, namespaces, cgroup), and the container
//! record's `Any` form. `mounts`: the kernel filesystems, host files and [`BindMount`]s.
//! `privileges`: capabilities, masked paths, devices and [`apply_privileges`]. [`seccomp`]:
//! the syscall profile. [`bridge`]: the host's server binary as the bot's process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use super::ImageConfig;
use crate::error::AgentError;

pub mod bridge;
mod mounts;
mod privileges;
pub mod seccomp;

use mounts::bot_mounts;
pub use mounts::{BindMount, HOST_LOCALTIME, HOST_RESOLV_CONF};
pub use privileges::{
    apply_privileges, default_capabilities, device_rules, MASKED_PATHS, PING_GROUP_RANGE,
    READONLY_PATHS,
};

/// `type_url` containerd expects on a container record's spec.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// PATH used when the image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the spec takes besides the image config.
#[derive(Debug, Clone)]
pub struct SpecOptions {
    /// The container id; names the cgroup.
    pub container_id: String,
    /// Hostname inside the container (the bot id).
    pub hostname: String,
    /// Network namespace to join; `None` makes a new, empty one.
    pub netns_path: Option<PathBuf>,
    /// Environment added after the image's (later entries win), e.g. `MCP_AUTH_TOKEN_FILE`.
    pub extra_env: Vec<(String, String)>,
    /// The host's `TZ`, passed on when set.
    pub host_tz: Option<String>,
    /// Host resolv.conf to bind read-only at `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
    /// Host localtime to bind read-only at `/etc/localtime`.
    pub localtime: Option<PathBuf>,
    /// More bind mounts.
    pub extra_mounts: Vec<BindMount>,
    /// Cgroup path; `None` means `/memoh/<container id>`.
    pub cgroups_path: Option<String>,
    /// Soft and hard `RLIMIT_NOFILE`; 1024 by default, as containerd does. Must not exceed
    /// containerd's own hard limit, which runc cannot raise.
    pub nofile: u64,
    /// Replaces the image's entrypoint and cmd when set.
    pub args: Option<Vec<String>>,
    /// The host's server binary and run directory ([`bridge::apply_server`]): the bot runs
    /// that binary instead of the image's entrypoint.
    pub server: Option<bridge::ServerMounts>,
}

impl SpecOptions {
    /// Options with no host files, a new network namespace and the default limits.
    pub fn new(container_id: impl Into<String>, hostname: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            hostname: hostname.into(),
            netns_path: None,
            extra_env: Vec::new(),
            host_tz: None,
            resolv_conf: None,
            localtime: None,
            extra_mounts: Vec::new(),
            cgroups_path: None,
            nofile: 1024,
            args: None,
            server: None,
        }
    }

    /// Fills the host facts from this machine: `TZ` and the resolv.conf and localtime files
    /// that exist.
    pub fn with_host_files(mut self) -> Self {
        self.host_tz = std::env::var("TZ").ok().filter(|tz| !tz.is_empty());
        let existing = |p: &str| Path::new(p).exists().then(|| PathBuf::from(p));
        self.resolv_conf = existing(HOST_RESOLV_CONF);
        self.localtime = existing(HOST_LOCALTIME);
        self
    }
}

fn spec_err(e: oci_spec::OciSpecError) -> AgentError {
    AgentError::InvalidArgument(format!("oci spec: {e}"))
}

/// Parses an image `User` value: numeric `uid[:gid]` or `root`. Names other than `root` need
/// the container's `/etc/passwd`, which the spec cannot read.
fn parse_user(user: &str) -> Result<(u32, u32), AgentError> {
    let bad = || AgentError::InvalidArgument(format!("image user {user:?}: use numeric uid[:gid]"));
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = match u {
        "root" => 0,
        _ => u.parse().map_err(|_| bad())?,
    };
    let gid = match g {
        None => uid,
        Some("root") => 0,
        Some(g) => g.parse().map_err(|_| bad())?,
    };
    Ok((uid, gid))
}

/// Merges environment lists by key; later values replace earlier ones, order of first
/// appearance is kept.
fn merge_env(image_env: &[String], extra: &[(String, String)]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        if !values.contains_key(k) {
            order.push(k.to_string());
        }
        values.insert(k.to_string(), v.to_string());
    };
    for kv in image_env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        put(k, v);
    }
    for (k, v) in extra {
        put(k, v);
    }
    if !values.contains_key("PATH") {
        order.insert(0, "PATH".to_string());
        values.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    }
    order
        .into_iter()
        .map(|k| {
            let v = &values[&k];
            format!("{k}={v}")
        })
        .collect()
}

/// The OOM score adjustment of a bot's server (its init process): the kernel kills anything
/// else in the bot first when the bot passes its memory limit. The server gives the processes
/// it starts a score of 0 again, so a memory hog is the one chosen.
pub const SERVER_OOM_SCORE_ADJ: i32 = -998;

/// Linux's `CAP_SYS_RESOURCE`, which lowering an `oom_score_adj` needs.
const CAP_SYS_RESOURCE: u32 = 24;

/// [`SERVER_OOM_SCORE_ADJ`] where this host lets runc set it: a negative value needs
/// `CAP_SYS_RESOURCE`, which some hosts withhold even from root (runc would then fail to start
/// the bot). Without it the server stays at its default and protects itself by starting its
/// commands at a higher score instead.
pub fn server_oom_score_adj() -> Option<i32> {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let can = *CAN.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let has = has_capability(&status, CAP_SYS_RESOURCE);
        if !has {
            tracing::info!(
                "no CAP_SYS_RESOURCE here: bot servers run without a negative oom_score_adj \
                 (their commands start at a higher one instead)"
            );
        }
        has
    });
    can.then_some(SERVER_OOM_SCORE_ADJ)
}

/// Whether the `CapEff` line of a `/proc/PID/status` text holds capability `cap`.
fn has_capability(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << cap) != 0)
}

/// Puts resource limits on `spec`: memory, CPU and pids from `resources` (the device rules
/// stay as they are), and the server's OOM score adjustment. Returns whether the spec changed.
pub fn apply_resources(
    spec: &mut Spec,
    resources: &oci_spec::runtime::LinuxResources,
) -> Result<bool, AgentError> {
    let before = spec.clone();
    spec.process_mut()
        .as_mut()
        .ok_or_else(|| AgentError::InvalidArgument("oci spec: no process".into()))?
        .set_oom_score_adj(server_oom_score_adj());
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| AgentError::InvalidArgument("oci spec: no linux section".into()))?;
    let r = linux
        .resources_mut()
        .get_or_insert_with(oci_spec::runtime::LinuxResources::default);
    r.set_memory(*resources.memory());
    r.set_cpu(resources.cpu().clone());
    r.set_pids(*resources.pids());
    Ok(*spec != before)
}

/// Builds the runtime spec of a bot container.
pub fn build_spec(image: &ImageConfig, opts: &SpecOptions) -> Result<Spec, AgentError> {
    let args: Vec<String> = match &opts.args {
        Some(a) => a.clone(),
        None => image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect(),
    };
    if args.is_empty() {
        return Err(AgentError::InvalidArgument(
            "image has no entrypoint or cmd and no args were given".into(),
        ));
    }
    let mut extra_env = opts.extra_env.clone();
    if let Some(tz) = &opts.host_tz {
        extra_env.push(("TZ".into(), tz.clone()));
    }
    let env = merge_env(&image.env, &extra_env);
    let cwd = if image.working_dir.is_empty() {
        "/".to_string()
    } else {
        image.working_dir.clone()
    };
    let (uid, gid) = parse_user(&image.user)?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(spec_err)?,
        )
        .args(args)
        .env(env)
        .cwd(cwd)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(opts.nofile)
            .hard(opts.nofile)
            .build()
            .map_err(spec_err)?])
        .build()
        .map_err(spec_err)?;

    let mounts = bot_mounts(opts)?;

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(spec_err)?,
        );
    }
    let mut net = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
    if let Some(path) = &opts.netns_path {
        net = net.path(path);
    }
    namespaces.push(net.build().map_err(spec_err)?);

    let cgroups_path = opts
        .cgroups_path
        .clone()
        .unwrap_or_else(|| format!("/memoh/{}", opts.container_id));
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(cgroups_path)
        .resources(LinuxResourcesBuilder::default().build().map_err(spec_err)?)
        .build()
        .map_err(spec_err)?;

    let mut spec = SpecBuilder::default()
        .version("1.0.2-dev")
        .process(process)
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .map_err(spec_err)?,
        )
        .hostname(opts.hostname.clone())
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(spec_err)?;
    apply_privileges(&mut spec)?;
    if let Some(m) = &opts.server {
        bridge::apply_server(&mut spec, m)?;
    }
    Ok(spec)
}

/// Serialises a spec into the `Any` a containerd container record carries.
pub fn spec_to_any(spec: &Spec) -> Result<prost_types::Any, AgentError> {
    let value = serde_json::to_vec(spec)
        .map_err(|e| AgentError::InvalidArgument(format!("oci spec: {e}")))?;
    Ok(prost_types::Any {
        type_url: SPEC_TYPE_URL.to_string(),
        value,
    })
}

/// Reads a spec back from a container record's `Any`.
pub fn spec_from_any(any: &prost_types::Any) -> Result<Spec, AgentError> {
    serde_json::from_slice(&any.value)
        .map_err(|e| AgentError::InvalidArgument(format!("oci spec in container record: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn capabilities_are_read_from_cap_eff() {
        let with = "Name:\tx\nCapPrm:\t0\nCapEff:\t000001ffffffffff\n";
        let without = "CapEff:\t000001fffeffffff\n";
        assert!(has_capability(with, CAP_SYS_RESOURCE));
        assert!(!has_capability(without, CAP_SYS_RESOURCE));
        assert!(!has_capability("nothing", CAP_SYS_RESOURCE));
    }

    use oci_spec::runtime::Capability;

    use super::*;

    pub(super) fn image() -> ImageConfig {
        ImageConfig {
            env: vec!["PATH=/bin".into(), "A=1".into()],
            entrypoint: vec!["/entrypoint.sh".into()],
            cmd: vec!["serve".into(), "--x".into()],
            working_dir: "/app".into(),
            user: String::new(),
        }
    }

    #[test]
    fn process_from_image_and_options() {
        let mut opts = SpecOptions::new("mcp-b1", "b1");
        opts.extra_env = vec![
            ("MCP_AUTH_TOKEN_FILE".into(), "/run/memoh/token".into()),
            ("A".into(), "2".into()),
        ];
        opts.host_tz = Some("Europe/Berlin".into());
        let spec = build_spec(&image(), &opts).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec!["/entrypoint.sh".to_string(), "serve".into(), "--x".into()]
        );
        assert_eq!(
            p.env().as_ref().unwrap(),
            &vec![
                "PATH=/bin".to_string(),
                "A=2".into(),
                "MCP_AUTH_TOKEN_FILE=/run/memoh/token".into(),
                "TZ=Europe/Berlin".into()
            ]
        );
        assert_eq!(p.cwd(), &PathBuf::from("/app"));
        assert_eq!(p.user().uid(), 0);
        assert_eq!(p.no_new_privileges(), Some(true));
        let rl = &p.rlimits().as_ref().unwrap()[0];
        assert_eq!(rl.typ(), PosixRlimitType::RlimitNofile);
        assert_eq!(rl.hard(), 1024);
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&Capability::Kill));
        assert!(!caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&Capability::SysAdmin));
        assert_eq!(spec.hostname().as_deref(), Some("b1"));
    }

    #[test]
    fn namespaces_mounts_cgroup() {
        let mut opts = SpecOptions::new("mcp-b1", "b1");
        opts.netns_path = Some("/var/run/netns/mcp-b1".into());
        opts.resolv_conf = Some("/etc/resolv.conf".into());
        let spec = build_spec(&image(), &opts).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let ns = linux.namespaces().as_ref().unwrap();
        let types: Vec<_> = ns.iter().map(|n| n.typ()).collect();
        assert_eq!(
            types,
            vec![
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Network
            ]
        );
        assert_eq!(
            ns[4].path().as_deref(),
            Some(Path::new("/var/run/netns/mcp-b1"))
        );
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/memoh/mcp-b1"))
        );
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_string()));
        let mounts = spec.mounts().as_ref().unwrap();
        let dests: Vec<_> = mounts
            .iter()
            .map(|m| m.destination().to_str().unwrap().to_string())
            .collect();
        for want in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
            "/etc/resolv.conf",
        ] {
            assert!(dests.iter().any(|d| d == want), "missing {want}");
        }
        assert!(!dests.iter().any(|d| d == "/etc/localtime"));
        let resolv = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/etc/resolv.conf"))
            .unwrap();
        assert!(resolv
            .options()
            .as_ref()
            .unwrap()
            .contains(&"ro".to_string()));
        let sys = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert!(sys.options().as_ref().unwrap().contains(&"ro".to_string()));
    }

    #[test]
    fn new_netns_without_path_and_default_path_env() {
        let img = ImageConfig {
            env: vec![],
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            working_dir: String::new(),
            user: "1000:1001".into(),
        };
        let spec = build_spec(&img, &SpecOptions::new("c", "h")).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let net = linux.namespaces().as_ref().unwrap().last().unwrap();
        assert!(net.path().is_none());
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.env().as_ref().unwrap()[0], format!("PATH={DEFAULT_PATH}"));
        assert_eq!(p.cwd(), &PathBuf::from("/"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1001));
    }

    #[test]
    fn errors() {
        let mut img = image();
        img.entrypoint.clear();
        img.cmd.clear();
        assert!(build_spec(&img, &SpecOptions::new("c", "h")).is_err());
        let mut img = image();
        img.user = "nobody".into();
        assert!(build_spec(&img, &SpecOptions::new("c", "h")).is_err());
        let mut opts = SpecOptions::new("c", "h");
        opts.extra_mounts.push(BindMount {
            source: "relative".into(),
            destination: "/x".into(),
            readonly: true,
        });
        assert!(build_spec(&image(), &opts).is_err());
    }

    #[test]
    fn any_round_trip() {
        let spec = build_spec(&image(), &SpecOptions::new("c", "h")).unwrap();
        let any = spec_to_any(&spec).unwrap();
        assert_eq!(any.type_url, SPEC_TYPE_URL);
        assert_eq!(spec_from_any(&any).unwrap(), spec);
    }
}
