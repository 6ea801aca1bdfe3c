//! A bot's resource limits: how an operator writes them (`512MiB`, `1.5`, `unlimited`), the
//! containerd labels that are their only record, and the OCI `linux.resources` they become.
//!
//! Memory is a hard limit with swap off (`swap` = `limit`: no swap on cgroup v1, `swap.max` 0
//! on v2). CPU is a quota over a 100 ms period plus a weight in proportion to it. The disk
//! bound is the bot's writable layer: overlayfs on the host's filesystem cannot enforce it, so
//! the agent measures the layer with containerd's snapshot usage and reports it against the
//! bound.

use std::collections::HashMap;
use std::fmt;

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};
use serde::{Deserialize, Deserializer};

use crate::error::AgentError;

/// Label: the memory limit in bytes, or `unlimited`.
pub const LABEL_MEMORY: &str = "memoh.limits.memory";
/// Label: the CPU limit in thousandths of a CPU, or `unlimited`.
pub const LABEL_CPUS: &str = "memoh.limits.millicpus";
/// Label: the most processes and threads, or `unlimited`.
pub const LABEL_PIDS: &str = "memoh.limits.pids";
/// Label: the bound of the writable layer in bytes, or `unlimited`.
pub const LABEL_DISK: &str = "memoh.limits.disk";

/// The CFS period the CPU quota is written against (100 ms, the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest memory limit accepted: below it the bot's server cannot start.
pub const MIN_MEMORY: u64 = 32 << 20;
/// The fewest processes accepted: the server's threads (its workers and the blocking threads
/// it keeps, up to 32) and a shell.
pub const MIN_PIDS: u64 = 64;
/// The smallest CPU limit accepted, in thousandths of a CPU.
pub const MIN_MILLICPUS: u64 = 10;

/// One bot's limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes (hard; swap off).
    pub memory: Option<u64>,
    /// CPU time in thousandths of a CPU (`1500` is one and a half CPUs).
    pub millicpus: Option<u64>,
    /// Processes and threads.
    pub pids: Option<u64>,
    /// The writable layer in bytes (measured and reported, see the module docs).
    pub disk: Option<u64>,
}

/// Changes to a bot's limits, as `bot create` or `bot update` carries them: `None` keeps the
/// current (or default) value, `Some(None)` lifts the limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsChange {
    /// New memory limit.
    pub memory: Option<Option<u64>>,
    /// New CPU limit.
    pub millicpus: Option<Option<u64>>,
    /// New pids limit.
    pub pids: Option<Option<u64>>,
    /// New disk bound.
    pub disk: Option<Option<u64>>,
}

impl LimitsChange {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Parses the operator's words, each empty string meaning "keep": sizes such as `512MiB`,
    /// CPUs such as `0.5`, a count of processes, or `unlimited`.
    pub fn parse(memory: &str, cpus: &str, pids: &str, disk: &str) -> Result<Self, AgentError> {
        fn opt<T>(
            s: &str,
            f: impl Fn(&str) -> Result<Option<T>, AgentError>,
        ) -> Result<Option<Option<T>>, AgentError> {
            let s = s.trim();
            if s.is_empty() {
                Ok(None)
            } else {
                f(s).map(Some)
            }
        }
        let c = Self {
            memory: opt(memory, |s| unlimited_or(s, parse_size))?,
            millicpus: opt(cpus, |s| unlimited_or(s, parse_cpus))?,
            pids: opt(pids, |s| unlimited_or(s, parse_count))?,
            disk: opt(disk, |s| unlimited_or(s, parse_size))?,
        };
        Limits::default().with(&c).check()?;
        Ok(c)
    }
}

impl Limits {
    /// These limits with `change` applied.
    pub fn with(mut self, change: &LimitsChange) -> Self {
        if let Some(v) = change.memory {
            self.memory = v;
        }
        if let Some(v) = change.millicpus {
            self.millicpus = v;
        }
        if let Some(v) = change.pids {
            self.pids = v;
        }
        if let Some(v) = change.disk {
            self.disk = v;
        }
        self
    }

    /// Refuses limits a bot's server could not live under.
    pub fn check(self) -> Result<Self, AgentError> {
        let bad = |what: &str, min: String| {
            Err(AgentError::InvalidArgument(format!(
                "{what} limit below the smallest a bot can run with ({min})"
            )))
        };
        if self.memory.is_some_and(|m| m < MIN_MEMORY) {
            return bad("memory", format_size(MIN_MEMORY));
        }
        if self.millicpus.is_some_and(|c| c < MIN_MILLICPUS) {
            return bad("cpu", format_cpus(MIN_MILLICPUS));
        }
        if self.pids.is_some_and(|p| p < MIN_PIDS) {
            return bad("pids", MIN_PIDS.to_string());
        }
        Ok(self)
    }

    /// The labels that record these limits on the bot's container.
    pub fn labels(&self) -> HashMap<String, String> {
        fn v(x: Option<u64>) -> String {
            x.map_or_else(|| UNLIMITED.to_string(), |n| n.to_string())
        }
        HashMap::from([
            (LABEL_MEMORY.to_string(), v(self.memory)),
            (LABEL_CPUS.to_string(), v(self.millicpus)),
            (LABEL_PIDS.to_string(), v(self.pids)),
            (LABEL_DISK.to_string(), v(self.disk)),
        ])
    }

    /// The limits recorded in `labels`; `None` for a container from before limits were
    /// recorded (no limit label at all). A label that does not parse counts as absent and
    /// takes `defaults`' value.
    pub fn from_labels(labels: &HashMap<String, String>, defaults: &Limits) -> Option<Self> {
        let keys = [LABEL_MEMORY, LABEL_CPUS, LABEL_PIDS, LABEL_DISK];
        if !keys.iter().any(|k| labels.contains_key(*k)) {
            return None;
        }
        let get = |k: &str, d: Option<u64>| match labels.get(k).map(String::as_str) {
            Some(UNLIMITED) => None,
            Some(n) => n.parse().ok().or(d),
            None => d,
        };
        Some(Self {
            memory: get(LABEL_MEMORY, defaults.memory),
            millicpus: get(LABEL_CPUS, defaults.millicpus),
            pids: get(LABEL_PIDS, defaults.pids),
            disk: get(LABEL_DISK, defaults.disk),
        })
    }

    /// The OCI `linux.resources` for these limits (the disk bound has none).
    pub fn resources(&self) -> Result<LinuxResources, AgentError> {
        let err = |e: oci_spec::OciSpecError| {
            AgentError::InvalidArgument(format!("resource limits: {e}"))
        };
        let mut memory = LinuxMemoryBuilder::default();
        if let Some(m) = self.memory {
            let m = i64::try_from(m).unwrap_or(i64::MAX);
            // swap = limit: memory and swap together may not pass the limit, so no swap.
            memory = memory.limit(m).swap(m);
        }
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(c) = self.millicpus {
            let quota = c.saturating_mul(CPU_PERIOD_US) / 1000;
            cpu = cpu
                .quota(i64::try_from(quota).unwrap_or(i64::MAX))
                .period(CPU_PERIOD_US)
                .shares(cpu_shares(c));
        }
        let mut r = LinuxResourcesBuilder::default()
            .memory(memory.build().map_err(err)?)
            .cpu(cpu.build().map_err(err)?);
        if let Some(p) = self.pids {
            let pids = LinuxPidsBuilder::default()
                .limit(i64::try_from(p).unwrap_or(i64::MAX))
                .build()
                .map_err(err)?;
            r = r.pids(pids);
        }
        r.build().map_err(err)
    }
}

/// The CPU weight of a bot allowed `millicpus`: cgroup v1 shares in proportion to its quota
/// (1024 for one CPU, the kernel's default), at least 2; runc turns shares into v2's weight.
pub fn cpu_shares(millicpus: u64) -> u64 {
    (millicpus.saturating_mul(1024) / 1000).clamp(2, 262_144)
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or = |x: Option<String>| x.unwrap_or_else(|| UNLIMITED.to_string());
        write!(
            f,
            "memory {}, cpus {}, pids {}, disk {}",
            or(self.memory.map(format_size)),
            or(self.millicpus.map(format_cpus)),
            or(self.pids.map(|p| p.to_string())),
            or(self.disk.map(format_size)),
        )
    }
}

/// The word for "no limit".
pub const UNLIMITED: &str = "unlimited";

fn unlimited_or<T>(
    s: &str,
    f: impl Fn(&str) -> Result<T, AgentError>,
) -> Result<Option<T>, AgentError> {
    if s.eq_ignore_ascii_case(UNLIMITED) {
        Ok(None)
    } else {
        f(s).map(Some)
    }
}

/// Parses a size: bytes (`1048576`), or a number with a unit, binary (`KiB`, `MiB`, `GiB`,
/// `TiB`, also `K`, `M`, `G`, `T`) or decimal (`kB`, `MB`, `GB`, `TB`); fractions allowed
/// (`1.5GiB`).
pub fn parse_size(s: &str) -> Result<u64, AgentError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "Ki" => 1 << 10,
        "M" | "m" | "MiB" | "Mi" => 1 << 20,
        "G" | "g" | "GiB" | "Gi" => 1 << 30,
        "T" | "t" | "TiB" | "Ti" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad_size(s)),
    };
    let n: f64 = num.parse().map_err(|_| bad_size(s))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad_size(s));
    }
    Ok(bytes as u64)
}

fn bad_size(s: &str) -> AgentError {
    AgentError::InvalidArgument(format!(
        "invalid size {s:?} (e.g. 512MiB, 2GiB, 1048576 or unlimited)"
    ))
}

/// Parses a number of CPUs (`0.5`, `2`) into thousandths of a CPU.
pub fn parse_cpus(s: &str) -> Result<u64, AgentError> {
    let bad = || {
        AgentError::InvalidArgument(format!(
            "invalid number of cpus {s:?} (e.g. 0.5, 1.5, 2 or unlimited)"
        ))
    };
    let n: f64 = s.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n <= 0.0 || n > 100_000.0 {
        return Err(bad());
    }
    Ok((n * 1000.0).round() as u64)
}

fn parse_count(s: &str) -> Result<u64, AgentError> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "invalid number of processes {s:?} (e.g. 256 or unlimited)"
            ))
        })
}

/// A size for people: `512MiB`, `1.5GiB`, `100B`.
pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if n % size == 0 {
                format!("{}{unit}", n / size)
            } else {
                format!("{}{unit}", (v * 10.0).round() / 10.0)
            };
        }
    }
    format!("{n}B")
}

/// CPUs for people: `0.5`, `2`.
pub fn format_cpus(millicpus: u64) -> String {
    if millicpus % 1000 == 0 {
        (millicpus / 1000).to_string()
    } else {
        let s = format!("{:.3}", millicpus as f64 / 1000.0);
        s.trim_end_matches('0').to_string()
    }
}

/// The `[bot_defaults]` table of `agent.toml`: the limits of a bot created without its own.
/// Each value may be `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BotDefaults {
    /// Memory per bot (`"1GiB"`).
    #[serde(deserialize_with = "de_size")]
    pub memory: Option<u64>,
    /// CPUs per bot (`1.0`, or a string such as `"0.5"`).
    #[serde(deserialize_with = "de_cpus")]
    pub cpus: Option<u64>,
    /// Processes and threads per bot (`1024`).
    #[serde(deserialize_with = "de_count")]
    pub pids: Option<u64>,
    /// Writable layer per bot (`"10GiB"`).
    #[serde(deserialize_with = "de_size")]
    pub disk: Option<u64>,
}

impl Default for BotDefaults {
    /// Values for a host of about 100 bots: each bot may use a good share of the machine for a
    /// while, none can take all of it.
    fn default() -> Self {
        Self {
            memory: Some(1 << 30),
            cpus: Some(1000),
            pids: Some(1024),
            disk: Some(10 << 30),
        }
    }
}

impl BotDefaults {
    /// As limits.
    pub fn limits(&self) -> Limits {
        Limits {
            memory: self.memory,
            millicpus: self.cpus,
            pids: self.pids,
            disk: self.disk,
        }
    }
}

/// A number or a string in `agent.toml`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Word {
    Int(u64),
    Float(f64),
    Text(String),
}

fn de_with<'de, D: Deserializer<'de>>(
    d: D,
    f: impl Fn(&str) -> Result<u64, AgentError>,
) -> Result<Option<u64>, D::Error> {
    let s = match Word::deserialize(d)? {
        Word::Int(n) => n.to_string(),
        Word::Float(x) => x.to_string(),
        Word::Text(s) => s,
    };
    unlimited_or(&s, f).map_err(serde::de::Error::custom)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_with(d, parse_size)
}

fn de_cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_with(d, parse_cpus)
}

fn de_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_with(d, parse_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        for bad in ["", "MiB", "-1M", "1.2.3G", "5 parsecs", "0", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_size(512 << 20), "512MiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
        assert_eq!(format_size(100), "100B");
    }

    #[test]
    fn cpus_parse_to_thousandths() {
        assert_eq!(parse_cpus("0.5").unwrap(), 500);
        assert_eq!(parse_cpus("1.5").unwrap(), 1500);
        assert_eq!(parse_cpus("2").unwrap(), 2000);
        for bad in ["0", "-1", "x", "inf", "NaN"] {
            assert!(parse_cpus(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_cpus(500), "0.5");
        assert_eq!(format_cpus(2000), "2");
        assert_eq!(format_cpus(1250), "1.25");
    }

    #[test]
    fn a_change_keeps_lifts_or_sets_each_limit() {
        let base = BotDefaults::default().limits();
        let c = LimitsChange::parse("512MiB", "", "unlimited", "").unwrap();
        let l = base.with(&c);
        assert_eq!(l.memory, Some(512 << 20));
        assert_eq!(l.millicpus, base.millicpus);
        assert_eq!(l.pids, None);
        assert_eq!(l.disk, base.disk);
        assert!(LimitsChange::parse("", "", "", "").unwrap().is_empty());
        let e = LimitsChange::parse("1MiB", "", "", "").unwrap_err();
        assert!(e.to_string().contains("memory limit below"), "{e}");
        assert!(LimitsChange::parse("", "", "32", "").is_err());
        assert!(LimitsChange::parse("lots", "", "", "").is_err());
    }

    #[test]
    fn labels_round_trip_and_old_records_have_none() {
        let l = Limits {
            memory: Some(256 << 20),
            millicpus: Some(500),
            pids: None,
            disk: Some(1 << 30),
        };
        let d = BotDefaults::default().limits();
        assert_eq!(Limits::from_labels(&l.labels(), &d), Some(l));
        assert_eq!(Limits::from_labels(&HashMap::new(), &d), None);
        let mut partial = HashMap::from([(LABEL_MEMORY.to_string(), "garbage".to_string())]);
        assert_eq!(Limits::from_labels(&partial, &d), Some(d));
        partial.insert(LABEL_PIDS.to_string(), UNLIMITED.to_string());
        assert_eq!(Limits::from_labels(&partial, &d).unwrap().pids, None);
    }

    #[test]
    fn resources_are_a_hard_memory_limit_without_swap_a_quota_and_pids() {
        let l = Limits {
            memory: Some(256 << 20),
            millicpus: Some(500),
            pids: Some(128),
            disk: None,
        };
        let r = l.resources().unwrap();
        let m = r.memory().as_ref().unwrap();
        assert_eq!(m.limit(), Some(256 << 20));
        assert_eq!(m.swap(), Some(256 << 20));
        let c = r.cpu().as_ref().unwrap();
        assert_eq!(c.quota(), Some(50_000));
        assert_eq!(c.period(), Some(100_000));
        assert_eq!(c.shares(), Some(512));
        assert_eq!(r.pids().as_ref().unwrap().limit(), 128);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["memory"]["limit"], 256 << 20);
        assert_eq!(json["cpu"]["quota"], 50_000);
        assert_eq!(json["pids"]["limit"], 128);

        let none = Limits::default().resources().unwrap();
        let json = serde_json::to_value(&none).unwrap();
        assert!(json.get("pids").is_none(), "{json}");
        assert!(json["memory"].get("limit").is_none(), "{json}");
    }

    #[test]
    fn defaults_read_from_toml_words_and_numbers() {
        let d: BotDefaults =
            toml::from_str("memory = \"512MiB\"\ncpus = 1.5\npids = 256\ndisk = \"unlimited\"\n")
                .unwrap();
        assert_eq!(d.memory, Some(512 << 20));
        assert_eq!(d.cpus, Some(1500));
        assert_eq!(d.pids, Some(256));
        assert_eq!(d.disk, None);
        let d: BotDefaults = toml::from_str("cpus = \"2\"\n").unwrap();
        assert_eq!(d.cpus, Some(2000));
        assert_eq!(d.memory, BotDefaults::default().memory);
        assert!(toml::from_str::<BotDefaults>("memory = \"a lot\"\n").is_err());
        assert!(toml::from_str::<BotDefaults>("swap = 1\n").is_err());
        let shown = BotDefaults::default().limits().to_string();
        assert_eq!(shown, "memory 1GiB, cpus 1, pids 1024, disk 10GiB");
    }
}
