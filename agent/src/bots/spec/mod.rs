//! The bot spec a platform sets at create: environment, DNS, hostname and read-only bind
//! mounts of allowed host directories.
//!
//! Recorded as one container label ([`LABEL_SPEC`], JSON), the only record: version cycles
//! copy the container's labels and spec, and recovery rebuilds a lost record (and its runtime
//! spec) from the labels its snapshot carries, so the spec holds across every lifecycle step.
//! The bot's `/etc/resolv.conf` is a file the agent writes per bot
//! (`<state_dir>/bots/BOT/resolv.conf`, see [`resolv_conf`]) and binds read-only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::containerd::spec::bridge::BRIDGE_PATH;
use crate::containerd::spec::{BindMount, HOST_LOCALTIME, HOST_RESOLV_CONF};
use crate::error::AgentError;

use super::TOKEN_MOUNT;

/// Label on the container: the bot's [`BotSpec`] as JSON. Absent on bots created without one
/// (and before specs were recorded): their spec is the default.
pub const LABEL_SPEC: &str = "memoh.spec";

/// Longest [`LABEL_SPEC`] value, counted as it sits escaped inside the snapshot's record label
/// (which holds all of a bot's `memoh.*` labels within containerd's 4 KiB per label).
pub const SPEC_LABEL_MAX: usize = 2048;

/// Most nameservers: the C library's resolver reads no more than three.
pub const MAX_DNS: usize = 3;
/// Most search domains.
pub const MAX_DNS_SEARCH: usize = 6;
/// Most extra mounts.
pub const MAX_MOUNTS: usize = 16;

/// Environment names the agent sets itself and a bot may not change.
const RESERVED_ENV: &[&str] = &["MCP_AUTH_TOKEN_FILE"];

/// Container paths no mount may cover or sit under (the kernel filesystems, the agent's own
/// files). `/` itself is refused separately.
const FORBIDDEN_MOUNT_ROOTS: &[&str] = &["/proc", "/sys", "/dev", "/run/memoh"];

/// A read-only bind mount of a host directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecMount {
    /// The host directory (symlinks resolved once the mount is checked).
    pub host: PathBuf,
    /// Where it appears in the bot.
    pub container: PathBuf,
}

/// What a platform sets on a bot besides its image and limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BotSpec {
    /// Environment added after the image's, in order (a later entry of a name wins).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// Nameservers; empty: the host's, loopback ones replaced by the configured fallback.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// Search domains; empty with no `dns`: the host's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_search: Vec<String>,
    /// Hostname; `None`: the bot id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Read-only bind mounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<SpecMount>,
}

fn invalid(msg: String) -> AgentError {
    AgentError::InvalidArgument(msg)
}

impl BotSpec {
    /// Parses the spec as an operator writes it: `K=V` environment entries, nameserver
    /// addresses, search domains, a hostname (empty: the bot id) and mounts (see
    /// [`parse_mount`]). Checks everything that needs no host (the mounts' host side is
    /// checked by [`BotSpec::resolve_mounts`]).
    pub fn parse(
        env: &[String],
        dns: &[String],
        dns_search: &[String],
        hostname: &str,
        mounts: Vec<SpecMount>,
    ) -> Result<Self, AgentError> {
        let env = env
            .iter()
            .map(|kv| parse_env(kv))
            .collect::<Result<Vec<_>, _>>()?;
        let dns = dns
            .iter()
            .map(|a| {
                a.trim()
                    .parse::<IpAddr>()
                    .map_err(|_| invalid(format!("dns {a:?}: not an ip address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = Self {
            env,
            dns,
            dns_search: dns_search.to_vec(),
            hostname: (!hostname.is_empty()).then(|| hostname.to_string()),
            mounts,
        };
        spec.check()?;
        Ok(spec)
    }

    /// Checks every field (a spec read back from a label is checked again).
    pub fn check(&self) -> Result<(), AgentError> {
        for (k, v) in &self.env {
            check_env(k, v)?;
        }
        if self.dns.len() > MAX_DNS {
            return Err(invalid(format!(
                "{} nameservers given; a bot's resolver reads at most {MAX_DNS}",
                self.dns.len()
            )));
        }
        for a in &self.dns {
            if a.is_unspecified() || a.is_multicast() {
                return Err(invalid(format!("dns {a}: not a nameserver address")));
            }
        }
        if self.dns_search.len() > MAX_DNS_SEARCH {
            return Err(invalid(format!(
                "{} search domains given; at most {MAX_DNS_SEARCH}",
                self.dns_search.len()
            )));
        }
        for d in &self.dns_search {
            if !valid_domain(d.strip_suffix('.').unwrap_or(d), 253) {
                return Err(invalid(format!(
                    "dns search domain {d:?} is not a domain name"
                )));
            }
        }
        if let Some(h) = &self.hostname {
            if !valid_domain(h, 64) {
                return Err(invalid(format!(
                    "hostname {h:?}: use letters, digits, '-' and '.', at most 64 characters"
                )));
            }
        }
        if self.mounts.len() > MAX_MOUNTS {
            return Err(invalid(format!(
                "{} mounts given; at most {MAX_MOUNTS}",
                self.mounts.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.mounts {
            check_container_path(&m.container)?;
            if !m.host.is_absolute() {
                return Err(invalid(format!(
                    "mount {}: the host directory must be an absolute path",
                    m.host.display()
                )));
            }
            if !seen.insert(&m.container) {
                return Err(invalid(format!(
                    "mount target {} given twice",
                    m.container.display()
                )));
            }
        }
        if self.label_value().len() > SPEC_LABEL_MAX {
            return Err(invalid(format!(
                "the bot spec is too large to record (over {SPEC_LABEL_MAX} bytes)"
            )));
        }
        Ok(())
    }

    /// The spec with every mount's host directory checked against `allowed` (host directories
    /// under which mounts may lie) and its symlinks resolved: it must be an existing directory,
    /// and its real path must lie under the real path of an allowed one. Blocking (reads the
    /// filesystem).
    pub fn resolve_mounts(mut self, allowed: &[PathBuf]) -> Result<Self, AgentError> {
        for m in &mut self.mounts {
            m.host = resolve_host_dir(&m.host, allowed)?;
        }
        Ok(self)
    }

    /// The label recording the spec (none for the default spec, as bots without one have).
    pub fn labels(&self) -> HashMap<String, String> {
        if *self == Self::default() {
            return HashMap::new();
        }
        HashMap::from([(LABEL_SPEC.to_string(), self.json())])
    }

    /// The spec recorded in `labels`; the default when there is none.
    pub fn from_labels(labels: &HashMap<String, String>) -> Result<Self, AgentError> {
        let Some(j) = labels.get(LABEL_SPEC) else {
            return Ok(Self::default());
        };
        let s: Self = serde_json::from_str(j)
            .map_err(|e| invalid(format!("recorded bot spec ({LABEL_SPEC}) unreadable: {e}")))?;
        s.check()?;
        Ok(s)
    }

    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The label's value as the record label holds it (a JSON string inside JSON).
    fn label_value(&self) -> String {
        serde_json::to_string(&self.json()).unwrap_or_default()
    }

    /// The hostname of the bot `bot`.
    pub fn hostname_of<'a>(&'a self, bot: &'a str) -> &'a str {
        self.hostname.as_deref().unwrap_or(bot)
    }

    /// The read-only bind mounts of the spec.
    pub fn bind_mounts(&self) -> Vec<BindMount> {
        self.mounts
            .iter()
            .map(|m| BindMount {
                source: m.host.clone(),
                destination: m.container.clone(),
                readonly: true,
            })
            .collect()
    }
}

impl super::Manager {
    /// Rewrites the bot's resolv.conf (the host's may have changed since) and points the
    /// `/etc/resolv.conf` mount of `spec` (the container's, about to start) at it; a record
    /// written before bots had their own file bound the host's. Returns whether `spec`
    /// changed. The caller holds the bot's lock.
    pub(super) async fn refresh_resolv_conf(
        &self,
        bot: &str,
        c: &crate::containerd::ContainerInfo,
        spec: &mut oci_spec::runtime::Spec,
    ) -> Result<bool, AgentError> {
        let path = self
            .write_resolv_conf(bot, &BotSpec::from_labels(&c.labels)?)
            .await?;
        Ok(bind_resolv_conf(spec, &path))
    }
}

/// Points the `/etc/resolv.conf` bind mount of `spec` at `path`; returns whether it changed.
/// A spec without that mount is left alone.
pub fn bind_resolv_conf(spec: &mut oci_spec::runtime::Spec, path: &Path) -> bool {
    let Some(mounts) = spec.mounts_mut().as_mut() else {
        return false;
    };
    let mut changed = false;
    for m in mounts.iter_mut() {
        if m.destination() == Path::new(HOST_RESOLV_CONF) && m.source().as_deref() != Some(path) {
            m.set_source(Some(path.to_path_buf()));
            changed = true;
        }
    }
    changed
}

/// Whether `name` is a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_env_name(name: &str) -> bool {
    let mut c = name.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn check_env(k: &str, v: &str) -> Result<(), AgentError> {
    if !valid_env_name(k) {
        return Err(invalid(format!(
            "env {k:?}: a name is letters, digits and '_', not starting with a digit"
        )));
    }
    if RESERVED_ENV.contains(&k) {
        return Err(invalid(format!("env {k}: set by the agent itself")));
    }
    if v.contains('\0') {
        return Err(invalid(format!("env {k}: the value holds a NUL byte")));
    }
    Ok(())
}

fn parse_env(kv: &str) -> Result<(String, String), AgentError> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| invalid(format!("env {kv:?}: use NAME=VALUE")))?;
    check_env(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// Whether `d` is dot-separated labels of letters, digits and '-' (not at a label's ends),
/// at most `max` characters.
fn valid_domain(d: &str, max: usize) -> bool {
    !d.is_empty()
        && d.len() <= max
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Parses a mount as written on the command line: `HOST:CONTAINER`, `:ro` may follow (mounts
/// are read-only anyway; `:rw` is refused).
pub fn parse_mount(m: &str) -> Result<SpecMount, AgentError> {
    let body = m.strip_suffix(":ro").unwrap_or(m);
    if body.ends_with(":rw") {
        return Err(invalid(format!("mount {m:?}: mounts are read-only")));
    }
    let (host, container) = body
        .split_once(':')
        .filter(|(h, c)| !h.is_empty() && !c.is_empty() && !c.contains(':'))
        .ok_or_else(|| invalid(format!("mount {m:?}: use HOST:CONTAINER")))?;
    Ok(SpecMount {
        host: PathBuf::from(host),
        container: PathBuf::from(container),
    })
}

/// Checks a mount's container path: absolute, no `.` or `..`, not `/`, not over or under the
/// kernel filesystems or the agent's own files.
fn check_container_path(p: &Path) -> Result<(), AgentError> {
    let bad = |why: &str| invalid(format!("mount target {}: {why}", p.display()));
    if !p.is_absolute() {
        return Err(bad("must be an absolute path"));
    }
    if p.components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
    {
        return Err(bad("must not hold '.' or '..'"));
    }
    let clean: PathBuf = p.components().collect();
    if clean == Path::new("/") {
        return Err(bad("must not be the root"));
    }
    for root in FORBIDDEN_MOUNT_ROOTS {
        if clean.starts_with(root) || Path::new(root).starts_with(&clean) {
            return Err(bad(&format!("must not cover or lie under {root}")));
        }
    }
    for own in [HOST_RESOLV_CONF, HOST_LOCALTIME, TOKEN_MOUNT, BRIDGE_PATH] {
        if Path::new(own).starts_with(&clean) {
            return Err(bad(&format!("must not cover {own}")));
        }
    }
    Ok(())
}

/// The real path of host directory `host` when it lies under one of `allowed`; refused with
/// one line otherwise.
fn resolve_host_dir(host: &Path, allowed: &[PathBuf]) -> Result<PathBuf, AgentError> {
    let refuse = |why: String| invalid(format!("mount {}: {why}", host.display()));
    if !host.is_absolute() {
        return Err(refuse("the host directory must be an absolute path".into()));
    }
    let real = std::fs::canonicalize(host).map_err(|e| refuse(format!("{e}")))?;
    if !real.is_dir() {
        return Err(refuse("not a directory".into()));
    }
    let ok = allowed.iter().any(|a| {
        std::fs::canonicalize(a)
            .map(|ra| real.starts_with(ra))
            .unwrap_or(false)
    });
    if !ok {
        return Err(refuse(if allowed.is_empty() {
            "no host directory may be mounted (mount_allowed in agent.toml is empty)".into()
        } else {
            format!(
                "not under a directory mount_allowed in agent.toml ({})",
                allowed
                    .iter()
                    .map(|a| a.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }));
    }
    Ok(real)
}

/// The content of a bot's resolv.conf. With its own nameservers: those and its search
/// domains. Otherwise the host's (`host`, the text of its `/etc/resolv.conf`), with the
/// loopback nameservers (`127.x`, `::1`, unreachable from a bot) left out, and `fallback`
/// instead when none other remains; the bot's search domains replace the host's.
pub fn resolv_conf(spec: &BotSpec, host: &str, fallback: &[IpAddr]) -> String {
    let mut out = String::from("# written by memoh-agent for this bot\n");
    if !spec.dns.is_empty() {
        for a in &spec.dns {
            out.push_str(&format!("nameserver {a}\n"));
        }
        if !spec.dns_search.is_empty() {
            out.push_str(&format!("search {}\n", spec.dns_search.join(" ")));
        }
        return out;
    }
    let mut kept = 0;
    let mut dropped = false;
    let mut rest = String::new();
    for line in host.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("nameserver") => {
                let addr = w
                    .next()
                    .and_then(|a| a.split('%').next()?.parse::<IpAddr>().ok());
                match addr {
                    Some(a) if a.is_loopback() || a.is_unspecified() => dropped = true,
                    Some(_) => {
                        kept += 1;
                        rest.push_str(line.trim());
                        rest.push('\n');
                    }
                    None => {}
                }
            }
            Some("search" | "domain") if !spec.dns_search.is_empty() => {}
            Some(w0) if w0.starts_with('#') || w0.starts_with(';') => {}
            Some(_) => {
                rest.push_str(line.trim());
                rest.push('\n');
            }
            None => {}
        }
    }
    out.push_str(&rest);
    if kept == 0 {
        if dropped {
            out.push_str("# the host's loopback resolvers replaced by dns_fallback\n");
        }
        for a in fallback {
            out.push_str(&format!("nameserver {a}\n"));
        }
    }
    if !spec.dns_search.is_empty() {
        out.push_str(&format!("search {}\n", spec.dns_search.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests;
