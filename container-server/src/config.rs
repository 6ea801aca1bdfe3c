//! The server's settings, built by `main` from flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use memoh_proto::limits;

pub use crate::tls::StrictTls;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// TCP; `:PORT` means every interface.
    Tcp(SocketAddr),
    /// A unix socket path (`unix:/path`).
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    /// Parses `:9090`, `HOST:PORT`, `[::1]:PORT` or `unix:/path`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix listen address needs a path".into());
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if let Some(port) = s.strip_prefix(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("invalid port in listen address {s:?}"))?;
            return Ok(Self::Tcp(SocketAddr::from(([0u16; 8], port))));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Self::Tcp(a));
        }
        if let Some((host, port)) = s.rsplit_once(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("invalid port in listen address {s:?}"))?;
            if host == "localhost" {
                return Ok(Self::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
            }
        }
        Err(format!(
            "invalid listen address {s:?}: use :PORT, IP:PORT or unix:/path"
        ))
    }
}

/// The bridge's default socket (WIRE-BRIDGE.md section 2).
pub const DEFAULT_BRIDGE_SOCKET: &str = "/run/memoh/bridge.sock";

/// The environment variables of Memoh's bridge that choose its listener (WIRE-BRIDGE.md
/// section 2). Unset and empty are the same.
#[derive(Debug, Clone, Default)]
pub struct BridgeEnv {
    /// `BRIDGE_SOCKET_PATH`: the unix socket.
    pub socket_path: Option<String>,
    /// `BRIDGE_TCP_ADDR`: a loopback TCP address that replaces the socket.
    pub tcp_addr: Option<String>,
    /// `BRIDGE_TLS_MODE`: empty or `disabled`, or `strict` (mutual TLS on the TCP listener).
    pub tls_mode: Option<String>,
    /// `BRIDGE_TLS_CERT_FILE`: the server's certificate chain (strict mode).
    pub tls_cert_file: Option<String>,
    /// `BRIDGE_TLS_KEY_FILE`: the server's key (strict mode).
    pub tls_key_file: Option<String>,
    /// `BRIDGE_TLS_CLIENT_CA_FILE`: the CA of client certificates (strict mode).
    pub tls_client_ca_file: Option<String>,
    /// `BRIDGE_TLS_EXPECTED_CLIENT_URI`: the URI SAN a client must carry (strict mode).
    pub tls_expected_client_uri: Option<String>,
}

impl BridgeEnv {
    /// Reads the variables from the process environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            socket_path: var("BRIDGE_SOCKET_PATH"),
            tcp_addr: var("BRIDGE_TCP_ADDR"),
            tls_mode: var("BRIDGE_TLS_MODE"),
            tls_cert_file: var("BRIDGE_TLS_CERT_FILE"),
            tls_key_file: var("BRIDGE_TLS_KEY_FILE"),
            tls_client_ca_file: var("BRIDGE_TLS_CLIENT_CA_FILE"),
            tls_expected_client_uri: var("BRIDGE_TLS_EXPECTED_CLIENT_URI"),
        }
    }

    /// Strict mode's settings, `None` when TLS is off; an unknown mode or a missing setting is
    /// an error naming it (the bridge exits 1 then).
    pub fn strict_tls(&self) -> Result<Option<StrictTls>, String> {
        match self.tls_mode.as_deref() {
            None | Some("disabled") => Ok(None),
            Some("strict") => {
                let need = |v: &Option<String>, name: &str| {
                    v.clone()
                        .ok_or_else(|| format!("BRIDGE_TLS_MODE=strict needs {name}"))
                };
                Ok(Some(StrictTls {
                    cert_file: need(&self.tls_cert_file, "BRIDGE_TLS_CERT_FILE")?.into(),
                    key_file: need(&self.tls_key_file, "BRIDGE_TLS_KEY_FILE")?.into(),
                    client_ca_file: need(&self.tls_client_ca_file, "BRIDGE_TLS_CLIENT_CA_FILE")?
                        .into(),
                    expected_client_uri: need(
                        &self.tls_expected_client_uri,
                        "BRIDGE_TLS_EXPECTED_CLIENT_URI",
                    )?,
                }))
            }
            Some(m) => Err(format!(
                "unknown BRIDGE_TLS_MODE {m:?}: use disabled or strict"
            )),
        }
    }
}

/// One listener to bind: where, whether failing to bind stops the server, and TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The address.
    pub addr: ListenAddr,
    /// Whether a failure to bind it stops the server (else: a warning, the others serve).
    pub required: bool,
    /// Strict mutual TLS (TCP only).
    pub tls: Option<StrictTls>,
}

impl Bind {
    /// A plain listener.
    pub fn plain(addr: ListenAddr, required: bool) -> Self {
        Self {
            addr,
            required,
            tls: None,
        }
    }
}

/// The bridge listener(s) to add to the `--listen` ones. `BRIDGE_TCP_ADDR` (loopback,
/// `localhost` or an empty host only, as the bridge allows, TLS or not: TLS unlocks nothing)
/// replaces the socket and carries strict TLS when `BRIDGE_TLS_MODE=strict`; else
/// `BRIDGE_SOCKET_PATH`; else, when no `--listen` was given, the default socket, skipped with a
/// warning where it cannot be bound (an image run without the host's `/run/memoh`). An explicit
/// `--listen` without bridge variables adds nothing, so servers started side by side never take
/// each other's socket. TLS is for TCP only: on a socket, strict mode's files are still
/// checked, but the socket stays plain.
pub fn bridge_listeners(env: &BridgeEnv, explicit_listen: bool) -> Result<Vec<Bind>, String> {
    let tls = env.strict_tls()?;
    if let Some(a) = &env.tcp_addr {
        let (host, _) = a
            .rsplit_once(':')
            .ok_or_else(|| format!("invalid BRIDGE_TCP_ADDR {a:?}: use HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host.is_empty()
            || host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(format!(
                "BRIDGE_TCP_ADDR {a:?} must be a loopback address, localhost or :PORT"
            ));
        }
        return Ok(vec![Bind {
            addr: a.parse()?,
            required: true,
            tls,
        }]);
    }
    if let Some(p) = &env.socket_path {
        return Ok(vec![Bind::plain(ListenAddr::Unix(PathBuf::from(p)), true)]);
    }
    if explicit_listen {
        return Ok(Vec::new());
    }
    Ok(vec![Bind::plain(
        ListenAddr::Unix(PathBuf::from(DEFAULT_BRIDGE_SOCKET)),
        false,
    )])
}

/// Memoh's toolkit directory, which the bridge appends to its `PATH` (WIRE-BRIDGE.md section 3),
/// so commands find the workspace's tools where a Memoh image puts them.
pub const TOOLKIT_BIN: &str = "/opt/memoh/toolkit/bin";

/// `path` with [`TOOLKIT_BIN`] appended once (the default search path when unset).
pub fn path_with_toolkit(path: Option<&str>) -> String {
    let path = match path {
        Some(p) if !p.is_empty() => p,
        _ => "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    };
    if path.split(':').any(|d| d == TOOLKIT_BIN) {
        path.to_string()
    } else {
        format!("{path}:{TOOLKIT_BIN}")
    }
}

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Relative paths resolve here; exec runs here by default.
    pub data_dir: PathBuf,
    /// Regular files here seed the data directory on start.
    pub template_dir: PathBuf,
    /// When set, every container-service call must carry `authorization: Bearer TOKEN`.
    pub auth_token: Option<String>,
    /// How long running calls may finish after a shutdown signal before exec groups are killed.
    pub shutdown_grace: Duration,
    /// Reap every child (the server is PID 1) rather than only its own.
    pub reap_all: bool,
    /// Exec timeout when a request gives none.
    pub default_exec_timeout: Duration,
    /// The ReverseHTTP listener's address (loopback only, `MEMOH_ACP_TOOLS_PROXY_ADDR`);
    /// `None`: no listener.
    pub reverse_http_addr: Option<String>,
    /// How long a ReverseHTTP request waits for the host's answer (then 504).
    pub reverse_http_timeout: Duration,
    /// The process service's directory and bounds.
    pub processes: crate::process::ProcessConfig,
}

impl Config {
    /// Defaults for a data directory: no template, no token, 10 s grace, no ReverseHTTP
    /// listener.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            template_dir: PathBuf::from(limits::DEFAULT_TEMPLATE_DIR),
            auth_token: None,
            shutdown_grace: Duration::from_secs(10),
            reap_all: false,
            default_exec_timeout: limits::DEFAULT_EXEC_TIMEOUT,
            reverse_http_addr: None,
            reverse_http_timeout: crate::reverse_http::DEFAULT_TIMEOUT,
            processes: crate::process::ProcessConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        let ok = [
            (":9090", ListenAddr::Tcp("[::]:9090".parse().unwrap())),
            (
                "127.0.0.1:1",
                ListenAddr::Tcp("127.0.0.1:1".parse().unwrap()),
            ),
            ("[::1]:2", ListenAddr::Tcp("[::1]:2".parse().unwrap())),
            (
                "localhost:3",
                ListenAddr::Tcp("127.0.0.1:3".parse().unwrap()),
            ),
            ("unix:/tmp/s", ListenAddr::Unix("/tmp/s".into())),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<ListenAddr>().unwrap(), want, "{s}");
        }
        for bad in ["", ":x", "unix:", "host", "example.com:80", ":99999"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bridge_environment() {
        let env = |sock: Option<&str>, tcp: Option<&str>, tls: Option<&str>| BridgeEnv {
            socket_path: sock.map(String::from),
            tcp_addr: tcp.map(String::from),
            tls_mode: tls.map(String::from),
            ..BridgeEnv::default()
        };
        let def = ListenAddr::Unix(DEFAULT_BRIDGE_SOCKET.into());
        assert_eq!(
            bridge_listeners(&env(None, None, None), false).unwrap(),
            vec![Bind::plain(def, false)]
        );
        assert!(bridge_listeners(&env(None, None, None), true)
            .unwrap()
            .is_empty());
        assert_eq!(
            bridge_listeners(&env(Some("/s"), None, Some("disabled")), true).unwrap(),
            vec![Bind::plain(ListenAddr::Unix("/s".into()), true)]
        );
        for (tcp, want) in [
            (":9090", "[::]:9090"),
            ("127.0.0.1:1", "127.0.0.1:1"),
            ("localhost:2", "127.0.0.1:2"),
            ("[::1]:3", "[::1]:3"),
        ] {
            let got = bridge_listeners(&env(Some("/s"), Some(tcp), None), false).unwrap();
            assert_eq!(
                got,
                vec![Bind::plain(ListenAddr::Tcp(want.parse().unwrap()), true)],
                "{tcp}"
            );
        }
        for bad in ["0.0.0.0:9090", "10.0.0.1:1", "example.com:1", "nope"] {
            assert!(
                bridge_listeners(&env(None, Some(bad), None), false).is_err(),
                "{bad}"
            );
            // mTLS unlocks nothing.
            let mut e = env(None, Some(bad), Some("strict"));
            e.tls_cert_file = Some("/c".into());
            e.tls_key_file = Some("/k".into());
            e.tls_client_ca_file = Some("/ca".into());
            e.tls_expected_client_uri = Some("spiffe://memoh/instance/i/server".into());
            assert!(bridge_listeners(&e, false).is_err(), "strict {bad}");
        }
        let strict = bridge_listeners(&env(None, None, Some("strict")), false).unwrap_err();
        assert!(strict.contains("BRIDGE_TLS_CERT_FILE"), "{strict}");
        assert!(bridge_listeners(&env(None, None, Some("x")), false).is_err());
    }

    #[test]
    fn the_toolkit_goes_last_on_the_path_once() {
        assert_eq!(
            path_with_toolkit(Some("/usr/bin:/bin")),
            "/usr/bin:/bin:/opt/memoh/toolkit/bin"
        );
        let once = path_with_toolkit(Some("/bin:/opt/memoh/toolkit/bin"));
        assert_eq!(once, "/bin:/opt/memoh/toolkit/bin");
        assert!(path_with_toolkit(None).ends_with(":/opt/memoh/toolkit/bin"));
        assert!(path_with_toolkit(Some("")).starts_with("/usr/local/sbin:"));
    }

    #[test]
    fn strict_tls_needs_every_setting_and_goes_on_the_tcp_listener() {
        let full = BridgeEnv {
            tcp_addr: Some("127.0.0.1:9443".into()),
            tls_mode: Some("strict".into()),
            tls_cert_file: Some("/m/cert.pem".into()),
            tls_key_file: Some("/m/key.pem".into()),
            tls_client_ca_file: Some("/m/ca.pem".into()),
            tls_expected_client_uri: Some("spiffe://memoh/instance/i/server".into()),
            ..BridgeEnv::default()
        };
        let got = bridge_listeners(&full, false).unwrap();
        assert_eq!(got.len(), 1);
        let tls = got[0].tls.as_ref().expect("tls on the tcp listener");
        assert_eq!(tls.client_ca_file, PathBuf::from("/m/ca.pem"));
        assert_eq!(tls.expected_client_uri, "spiffe://memoh/instance/i/server");
        for missing in 0..4 {
            let mut e = full.clone();
            let (field, name) = match missing {
                0 => (&mut e.tls_cert_file, "BRIDGE_TLS_CERT_FILE"),
                1 => (&mut e.tls_key_file, "BRIDGE_TLS_KEY_FILE"),
                2 => (&mut e.tls_client_ca_file, "BRIDGE_TLS_CLIENT_CA_FILE"),
                _ => (
                    &mut e.tls_expected_client_uri,
                    "BRIDGE_TLS_EXPECTED_CLIENT_URI",
                ),
            };
            *field = None;
            let err = bridge_listeners(&e, false).unwrap_err();
            assert!(err.contains(name), "{err}");
        }
        let mut off = full.clone();
        off.tls_mode = Some("disabled".into());
        assert_eq!(bridge_listeners(&off, false).unwrap()[0].tls, None);
    }
}
