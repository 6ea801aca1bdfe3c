//! The server's settings, built by `main` from flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use memoh_proto::limits;

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
}

impl Config {
    /// Defaults for a data directory: no template, no token, 10 s grace.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            template_dir: PathBuf::from(limits::DEFAULT_TEMPLATE_DIR),
            auth_token: None,
            shutdown_grace: Duration::from_secs(10),
            reap_all: false,
            default_exec_timeout: limits::DEFAULT_EXEC_TIMEOUT,
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
}
