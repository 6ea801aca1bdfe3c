//! The agent's TOML configuration. Every key is optional; defaults follow DESIGN.md.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::AgentError;
use crate::network::containment::{Cidr, HostPort};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/memoh/agent.toml";

/// The agent's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// containerd's gRPC socket.
    pub containerd_socket: PathBuf,
    /// containerd namespace holding the bots' containers, images and snapshots.
    pub namespace: String,
    /// containerd's state directory (its `state` setting); `doctor` looks there for task
    /// bundles a killed containerd left half-deleted.
    pub containerd_state: PathBuf,
    /// Snapshotter for bot root filesystems.
    pub snapshotter: String,
    /// OCI runtime of the bots' tasks.
    pub runtime: String,
    /// Image used when a bot is created without one.
    pub image: String,
    /// CNI network configuration directory (`*.conflist`, `*.conf`).
    pub cni_conf_dir: PathBuf,
    /// CNI plugin directories, searched in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Name of the CNI network bots join.
    pub cni_network: String,
    /// Bridge of the default network (used when the agent writes the default conflist).
    pub cni_bridge: String,
    /// Subnet of the default network.
    pub cni_subnet: String,
    /// host-local IPAM's `dataDir` in the network the agent writes; unset keeps the plugin's
    /// default (`/var/lib/cni/networks`).
    pub cni_ipam_dir: Option<PathBuf>,
    /// How long `serve` waits for containerd to answer at startup, in seconds.
    pub containerd_wait_secs: u64,
    /// Root of legacy bind-mounted data (`<data_root>/bots/<bot>`).
    pub data_root: PathBuf,
    /// The agent's own state: per-bot logs, CNI results, network namespaces' records.
    pub state_dir: PathBuf,
    /// Unix socket of the control API.
    pub control_socket: PathBuf,
    /// Address of the MCP streamable HTTP server (`/bots/BOT/mcp`, `/bots/BOT/mcp/NAME`); empty
    /// disables it.
    pub mcp_listen: String,
    /// Bearer token MCP clients must present. Unset: the agent generates one on first start
    /// into `<state_dir>/mcp.token` (0600) and keeps it; `memoh-agent mcp token` prints it.
    pub mcp_token: Option<String>,
    /// Host names (besides the loopback names and the listen address) that MCP clients may
    /// use in `Host` and `Origin`; any other is refused (DNS rebinding).
    pub mcp_allowed_hosts: Vec<String>,
    /// Serve `/metrics` without the MCP token.
    pub metrics_public: bool,
    /// Seconds without calls after which a stdio MCP server's process is closed.
    pub mcp_idle_secs: u64,
    /// Longest a running bot may stay paused while a version is taken (milliseconds): a diff
    /// of its writable layer that takes longer is abandoned, the bot resumes and no version is
    /// made.
    pub version_max_pause_ms: u64,
    /// Ports of the host bots may connect to, as `PROTO/PORT` or `PROTO/FIRST-LAST` (e.g.
    /// `["udp/53", "tcp/53"]` for a resolver on the host). Everything else a bot sends to the
    /// host is dropped, except replies and ICMP echo to its gateway.
    pub host_ports_allowed: Vec<HostPort>,
    /// Destinations (CIDRs) in loopback, link-local, private, shared or unique-local ranges
    /// that bots may reach anyway (e.g. a LAN resolver); the rest of those ranges is dropped.
    pub egress_allowed: Vec<Cidr>,
    /// Size at which a bot server's log (`<state_dir>/bots/BOT/server.log`) is rotated, in
    /// bytes (at least [`MIN_SERVER_LOG_BYTES`]).
    pub server_log_max_bytes: u64,
    /// Rotated server logs kept per bot (`server.log.1` newest, ...). A bot's logs take at
    /// most `(server_log_keep + 1) * server_log_max_bytes` of disk.
    pub server_log_keep: u32,
    /// `[bot_defaults]`: the resource limits of a bot created without its own (`memory`,
    /// `cpus`, `pids`, `disk`; each may be `"unlimited"`).
    pub bot_defaults: crate::bots::limits::BotDefaults,
    /// Nameservers a bot gets when it sets none of its own and the host's `/etc/resolv.conf`
    /// names only loopback resolvers (a local stub such as `127.0.0.53`, unreachable from a
    /// bot) or none at all.
    pub dns_fallback: Vec<std::net::IpAddr>,
    /// Host directories under which a bot's read-only bind mounts (`bot create --mount`) may
    /// lie, symlinks resolved. Empty (the default): no host directory may be mounted.
    pub mount_allowed: Vec<PathBuf>,
    /// The bot server the agent runs in every bot: this host file is bind-mounted read-only
    /// at `/opt/memoh/bridge` and is the bot's process (PID 1), so a bot can neither replace
    /// its server nor keep an old one, and a host upgrade reaches every bot at its next start.
    pub server_binary: PathBuf,
    /// `[reverse_http]`: which host HTTP services a bot may call through its ReverseHTTP
    /// stream.
    pub reverse_http: crate::reverse_http::ReverseHttpConfig,
}

/// Default of [`Config::server_binary`].
pub const DEFAULT_SERVER_BINARY: &str = "/usr/local/lib/memoh/container-server";

/// Smallest accepted `server_log_max_bytes`.
pub const MIN_SERVER_LOG_BYTES: u64 = 4096;
/// Most rotated server logs a bot may keep.
pub const MAX_SERVER_LOG_KEEP: u32 = 100;

impl Default for Config {
    fn default() -> Self {
        Self {
            containerd_socket: "/run/containerd/containerd.sock".into(),
            namespace: "default".into(),
            containerd_state: "/run/containerd".into(),
            snapshotter: "overlayfs".into(),
            runtime: "io.containerd.runc.v2".into(),
            image: "docker.io/memohai/mcp:latest".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            cni_network: "memoh-cni".into(),
            cni_bridge: "cni0".into(),
            cni_subnet: "10.88.0.0/16".into(),
            cni_ipam_dir: None,
            containerd_wait_secs: 30,
            data_root: "/var/lib/memoh".into(),
            state_dir: "/var/lib/memoh-agent".into(),
            control_socket: "/run/memoh/agent.sock".into(),
            mcp_listen: "127.0.0.1:8091".into(),
            mcp_token: None,
            mcp_allowed_hosts: Vec::new(),
            metrics_public: false,
            mcp_idle_secs: 600,
            version_max_pause_ms: 30_000,
            host_ports_allowed: Vec::new(),
            egress_allowed: Vec::new(),
            server_log_max_bytes: 10 * 1024 * 1024,
            server_log_keep: 2,
            bot_defaults: crate::bots::limits::BotDefaults::default(),
            dns_fallback: vec![[1, 1, 1, 1].into(), [8, 8, 8, 8].into()],
            mount_allowed: Vec::new(),
            server_binary: DEFAULT_SERVER_BINARY.into(),
            reverse_http: Default::default(),
        }
    }
}

impl Config {
    /// Reads `path`; a missing file at the default location means all defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, AgentError> {
        let (path, must_exist) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).map_err(|e| AgentError::Config {
                path: path.clone(),
                reason: e,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                Ok(Self::default())
            }
            Err(e) => Err(AgentError::Config {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Self = toml::from_str(text).map_err(|e| e.message().to_string())?;
        c.bot_defaults
            .limits()
            .check()
            .map_err(|e| format!("[bot_defaults]: {e}"))?;
        if let Some(a) = c.mount_allowed.iter().find(|a| !a.is_absolute()) {
            return Err(format!(
                "mount_allowed: {} is not an absolute path",
                a.display()
            ));
        }
        if let Some(a) = c
            .dns_fallback
            .iter()
            .find(|a| a.is_loopback() || a.is_unspecified())
        {
            return Err(format!(
                "dns_fallback: {a} is unreachable from a bot (loopback or unspecified)"
            ));
        }
        if !c.server_binary.is_absolute() {
            return Err(format!(
                "server_binary: {} is not an absolute path",
                c.server_binary.display()
            ));
        }
        c.reverse_http
            .check()
            .map_err(|e| format!("[reverse_http]: {e}"))?;
        if c.server_log_max_bytes < MIN_SERVER_LOG_BYTES {
            return Err(format!(
                "server_log_max_bytes is {}; it must be at least {MIN_SERVER_LOG_BYTES}",
                c.server_log_max_bytes
            ));
        }
        if c.server_log_keep > MAX_SERVER_LOG_KEEP {
            return Err(format!(
                "server_log_keep is {}; it must be at most {MAX_SERVER_LOG_KEEP}",
                c.server_log_keep
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bot_defaults_are_a_table_of_limits() {
        let d = Config::default().bot_defaults.limits();
        assert_eq!(d.memory, Some(1 << 30));
        let c = Config::parse(
            "[bot_defaults]\nmemory = \"256MiB\"\ncpus = 0.5\npids = \"unlimited\"\n",
        )
        .unwrap();
        let l = c.bot_defaults.limits();
        assert_eq!(
            (l.memory, l.millicpus, l.pids),
            (Some(256 << 20), Some(500), None)
        );
        assert_eq!(l.disk, d.disk);
        let e = Config::parse("[bot_defaults]\nmemory = \"1MiB\"\n").unwrap_err();
        assert!(
            e.contains("[bot_defaults]: invalid argument: memory limit below"),
            "{e}"
        );
        assert!(Config::parse("[bot_defaults]\nram = 1\n").is_err());
    }

    #[test]
    fn empty_config_is_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.namespace, "default");
        assert_eq!(c.cni_network, "memoh-cni");
    }

    #[test]
    fn dist_config_parses_and_matches_the_defaults() {
        let c = Config::parse(include_str!("../../dist/agent.toml")).unwrap();
        let d = Config::default();
        assert_eq!(c.containerd_socket, d.containerd_socket);
        assert_eq!(c.cni_subnet, d.cni_subnet);
        assert_eq!(c.control_socket, d.control_socket);
        assert_eq!(c.mcp_listen, d.mcp_listen);
        assert_eq!(c.server_binary, d.server_binary);
        assert_eq!(c.reverse_http, d.reverse_http);
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = Config::parse("nope = 1").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn containment_allow_lists_parse_and_bad_entries_are_named() {
        let c = Config::parse(
            "host_ports_allowed = [\"udp/53\", \"tcp/8000-8080\"]\negress_allowed = [\"192.168.10.0/24\", \"fd00::/8\"]",
        )
        .unwrap();
        assert_eq!(
            c.host_ports_allowed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["udp/53", "tcp/8000-8080"]
        );
        assert_eq!(
            c.egress_allowed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["192.168.10.0/24", "fd00::/8"]
        );
        let e = Config::parse("host_ports_allowed = [\"icmp/1\"]").unwrap_err();
        assert!(e.contains("icmp/1"), "{e}");
        let e = Config::parse("egress_allowed = [\"10.1.2.3/8\"]").unwrap_err();
        assert!(e.contains("10.1.2.3/8"), "{e}");
        let d = Config::default();
        assert!(d.host_ports_allowed.is_empty() && d.egress_allowed.is_empty());
    }

    #[test]
    fn server_log_bounds() {
        let d = Config::default();
        assert_eq!((d.server_log_max_bytes, d.server_log_keep), (10 << 20, 2));
        let c = Config::parse("server_log_max_bytes = 1048576\nserver_log_keep = 0").unwrap();
        assert_eq!((c.server_log_max_bytes, c.server_log_keep), (1 << 20, 0));
        let e = Config::parse("server_log_max_bytes = 10").unwrap_err();
        assert!(e.contains("server_log_max_bytes"), "{e}");
        let e = Config::parse("server_log_keep = 1000").unwrap_err();
        assert!(e.contains("server_log_keep"), "{e}");
    }

    #[test]
    fn bot_spec_keys() {
        let d = Config::default();
        assert_eq!(
            d.dns_fallback,
            [
                "1.1.1.1".parse::<std::net::IpAddr>().unwrap(),
                "8.8.8.8".parse().unwrap()
            ]
        );
        assert!(d.mount_allowed.is_empty());
        let c = Config::parse(
            "dns_fallback = [\"9.9.9.9\", \"2620:fe::fe\"]\nmount_allowed = [\"/srv/shared\"]",
        )
        .unwrap();
        assert_eq!(c.dns_fallback.len(), 2);
        assert_eq!(c.mount_allowed, [PathBuf::from("/srv/shared")]);
        let e = Config::parse("mount_allowed = [\"srv\"]").unwrap_err();
        assert!(e.contains("mount_allowed"), "{e}");
        let e = Config::parse("dns_fallback = [\"127.0.0.53\"]").unwrap_err();
        assert!(e.contains("dns_fallback"), "{e}");
        assert!(Config::parse("dns_fallback = [\"nope\"]").is_err());
    }

    #[test]
    fn server_binary_and_reverse_http() {
        let d = Config::default();
        assert_eq!(d.server_binary, PathBuf::from(DEFAULT_SERVER_BINARY));
        assert!(d.reverse_http.allow.is_empty());
        let c = Config::parse(
            "server_binary = \"/opt/x/server\"\n[reverse_http]\nallow = [\"http://127.0.0.1:9000/hooks/\"]",
        )
        .unwrap();
        assert_eq!(c.server_binary, PathBuf::from("/opt/x/server"));
        assert_eq!(c.reverse_http.allow.len(), 1);
        let e = Config::parse("server_binary = \"bin/server\"").unwrap_err();
        assert!(
            e.contains("server_binary: bin/server is not an absolute path"),
            "{e}"
        );
        let e =
            Config::parse("[reverse_http]\nallow = [\"https://127.0.0.1:9000/x\"]").unwrap_err();
        assert!(e.contains("[reverse_http]") && e.contains("https"), "{e}");
        assert!(Config::parse("[reverse_http]\nnope = 1").is_err());
    }

    #[test]
    fn keys_override() {
        let c = Config::parse("namespace = \"test\"\ncni_bin_dirs = [\"/x\"]").unwrap();
        assert_eq!(c.namespace, "test");
        assert_eq!(c.cni_bin_dirs, vec![PathBuf::from("/x")]);
    }
}
