//! Typed CNI results and plugin errors, parsed from the JSON plugins print.
//!
//! Accepted shapes: the 0.3.x/0.4.0 result (`ips[].version`), the 1.0.0 result (no
//! `version`), and the legacy 0.1.0/0.2.0 result (`ip4`/`ip6` objects). Pure functions only.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One interface a plugin created or touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniInterface {
    /// Interface name, e.g. `eth0`, `veth1234abcd`, `cni0`.
    pub name: String,
    /// MAC address, when reported.
    pub mac: Option<String>,
    /// Network namespace path; `None` for host-side interfaces.
    pub sandbox: Option<String>,
}

/// One address assigned by the plugins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniIp {
    /// The address.
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The gateway, when reported.
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`], when reported.
    pub interface: Option<usize>,
}

impl CniIp {
    /// The subnet this address lives in, e.g. `10.88.0.0/16` for `10.88.0.5/16`.
    pub fn subnet(&self) -> String {
        match self.address {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = if self.prefix_len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix_len.min(32)))
                };
                format!("{}/{}", Ipv4Addr::from(bits & mask), self.prefix_len)
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = if self.prefix_len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix_len.min(128)))
                };
                format!(
                    "{}/{}",
                    std::net::Ipv6Addr::from(bits & mask),
                    self.prefix_len
                )
            }
        }
    }
}

/// One route the plugins installed in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRoute {
    /// Destination in CIDR form.
    pub dst: String,
    /// Next hop, when reported.
    pub gw: Option<IpAddr>,
}

/// The typed result of a CNI ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// The result's `cniVersion`.
    pub cni_version: String,
    /// Interfaces, in the plugin's order.
    pub interfaces: Vec<CniInterface>,
    /// Addresses.
    pub ips: Vec<CniIp>,
    /// Routes.
    pub routes: Vec<CniRoute>,
}

impl CniResult {
    /// The container's address: the first IPv4 address on the container interface `ifname`,
    /// then any IPv4 address, then any address at all.
    pub fn primary_ip(&self, ifname: &str) -> Option<&CniIp> {
        let on_ifname = |ip: &&CniIp| {
            ip.interface
                .and_then(|i| self.interfaces.get(i))
                .is_some_and(|itf| itf.name == ifname && itf.sandbox.is_some())
        };
        self.ips
            .iter()
            .filter(on_ifname)
            .find(|ip| ip.address.is_ipv4())
            .or_else(|| self.ips.iter().find(|ip| ip.address.is_ipv4()))
            .or_else(|| self.ips.first())
    }

    /// The host end of the container's veth: a host-side interface that is not `bridge`.
    pub fn host_veth(&self, bridge: Option<&str>) -> Option<&str> {
        self.interfaces
            .iter()
            .filter(|i| i.sandbox.as_deref().is_none_or(str::is_empty))
            .filter(|i| Some(i.name.as_str()) != bridge)
            .map(|i| i.name.as_str())
            .next_back()
    }
}

/// The error object a failing plugin prints (`{code, msg, details}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// The CNI error code (1..=99 reserved by the spec, 100+ plugin-specific).
    pub code: u64,
    /// The message.
    pub msg: String,
    /// Optional details.
    pub details: String,
}

impl PluginError {
    /// Parses a plugin's error output; `None` when it is not an error object.
    pub fn parse(stdout: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(stdout).ok()?;
        let obj = v.as_object()?;
        let code = obj.get("code")?.as_u64()?;
        let text = |k: &str| {
            obj.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Some(Self {
            code,
            msg: text("msg"),
            details: text("details"),
        })
    }

    /// One line: the message, then the details when there are any.
    pub fn reason(&self) -> String {
        match (self.msg.is_empty(), self.details.is_empty()) {
            (_, true) => self.msg.clone(),
            (true, false) => self.details.clone(),
            (false, false) => format!("{}; {}", self.msg, self.details),
        }
    }
}

/// Parses `10.88.0.5/16` into an address and prefix length.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("address {s:?} has no prefix length"))?;
    let addr: IpAddr = addr.parse().map_err(|e| format!("address {s:?}: {e}"))?;
    let len: u8 = len
        .parse()
        .map_err(|e| format!("prefix length in {s:?}: {e}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length in {s:?} is larger than {max}"));
    }
    Ok((addr, len))
}

/// Parses a plugin's success output into a [`CniResult`].
pub fn parse_result(v: &Value) -> Result<CniResult, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| "cni result is not a JSON object".to_string())?;
    let cni_version = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut interfaces = Vec::new();
    for itf in obj
        .get("interfaces")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let o = itf
            .as_object()
            .ok_or_else(|| "interface entry is not an object".to_string())?;
        interfaces.push(CniInterface {
            name: str_field(o, "name").ok_or_else(|| "interface without a name".to_string())?,
            mac: str_field(o, "mac"),
            sandbox: str_field(o, "sandbox"),
        });
    }

    let mut ips = Vec::new();
    let mut routes = Vec::new();
    if let Some(list) = obj.get("ips").and_then(Value::as_array) {
        for entry in list {
            let o = entry
                .as_object()
                .ok_or_else(|| "ips entry is not an object".to_string())?;
            let address = str_field(o, "address")
                .ok_or_else(|| "ips entry without an address".to_string())?;
            let (address, prefix_len) = parse_cidr(&address)?;
            let interface = match o.get("interface") {
                None | Some(Value::Null) => None,
                Some(i) => Some(
                    i.as_u64()
                        .and_then(|i| usize::try_from(i).ok())
                        .ok_or_else(|| format!("interface index {i} is not a number"))?,
                ),
            };
            if let Some(i) = interface {
                if i >= interfaces.len() {
                    return Err(format!(
                        "ips entry names interface {i} but there are {}",
                        interfaces.len()
                    ));
                }
            }
            ips.push(CniIp {
                address,
                prefix_len,
                gateway: opt_ip(o, "gateway")?,
                interface,
            });
        }
    } else {
        // 0.1.0 / 0.2.0: {"ip4": {"ip": "...", "gateway": "...", "routes": [...]}, "ip6": ...}
        for key in ["ip4", "ip6"] {
            if let Some(o) = obj.get(key).and_then(Value::as_object) {
                let ip = str_field(o, "ip").ok_or_else(|| format!("{key} without an ip"))?;
                let (address, prefix_len) = parse_cidr(&ip)?;
                ips.push(CniIp {
                    address,
                    prefix_len,
                    gateway: opt_ip(o, "gateway")?,
                    interface: None,
                });
                collect_routes(o.get("routes"), &mut routes)?;
            }
        }
    }
    collect_routes(obj.get("routes"), &mut routes)?;
    Ok(CniResult {
        cni_version,
        interfaces,
        ips,
        routes,
    })
}

type Object = serde_json::Map<String, Value>;

/// A non-empty string field.
fn str_field(o: &Object, k: &str) -> Option<String> {
    o.get(k)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// An optional address field.
fn opt_ip(o: &Object, k: &str) -> Result<Option<IpAddr>, String> {
    match str_field(o, k) {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|e| format!("{k} {s:?}: {e}")),
    }
}

fn collect_routes(list: Option<&Value>, out: &mut Vec<CniRoute>) -> Result<(), String> {
    for r in list.and_then(Value::as_array).into_iter().flatten() {
        let o = r
            .as_object()
            .ok_or_else(|| "route entry is not an object".to_string())?;
        let dst = o
            .get("dst")
            .and_then(Value::as_str)
            .ok_or_else(|| "route without dst".to_string())?;
        parse_cidr(dst)?;
        out.push(CniRoute {
            dst: dst.to_string(),
            gw: opt_ip(o, "gw")?,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn results_of_each_version() {
        struct Case {
            name: &'static str,
            input: Value,
            ip: &'static str,
            prefix: u8,
            gateway: Option<&'static str>,
            veth: Option<&'static str>,
            routes: usize,
        }
        let cases = [
            Case {
                name: "1.0.0 from bridge",
                input: json!({
                    "cniVersion": "1.0.0",
                    "interfaces": [
                        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
                        {"name": "veth12ab34cd", "mac": "aa:bb:cc:dd:ee:02"},
                        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/memoh-a"}
                    ],
                    "ips": [{"interface": 2, "address": "10.88.0.5/16", "gateway": "10.88.0.1"}],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dns": {}
                }),
                ip: "10.88.0.5",
                prefix: 16,
                gateway: Some("10.88.0.1"),
                veth: Some("veth12ab34cd"),
                routes: 1,
            },
            Case {
                name: "0.4.0 with version fields",
                input: json!({
                    "cniVersion": "0.4.0",
                    "interfaces": [
                        {"name": "cni0"},
                        {"name": "vethx"},
                        {"name": "eth0", "sandbox": "/proc/1/ns/net"}
                    ],
                    "ips": [
                        {"version": "6", "interface": 2, "address": "fd00::5/64"},
                        {"version": "4", "interface": 2, "address": "10.210.3.7/24", "gateway": "10.210.3.1"}
                    ],
                    "routes": [{"dst": "0.0.0.0/0", "gw": "10.210.3.1"}, {"dst": "::/0"}]
                }),
                ip: "10.210.3.7",
                prefix: 24,
                gateway: Some("10.210.3.1"),
                veth: Some("vethx"),
                routes: 2,
            },
            Case {
                name: "ipam only, no interfaces",
                input: json!({
                    "cniVersion": "1.0.0",
                    "ips": [{"address": "192.168.5.9/30"}]
                }),
                ip: "192.168.5.9",
                prefix: 30,
                gateway: None,
                veth: None,
                routes: 0,
            },
            Case {
                name: "0.2.0 legacy",
                input: json!({
                    "cniVersion": "0.2.0",
                    "ip4": {"ip": "10.1.2.3/8", "gateway": "10.0.0.1", "routes": [{"dst": "0.0.0.0/0"}]}
                }),
                ip: "10.1.2.3",
                prefix: 8,
                gateway: Some("10.0.0.1"),
                veth: None,
                routes: 1,
            },
        ];
        for c in cases {
            let r = parse_result(&c.input).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            let ip = r.primary_ip("eth0").unwrap_or_else(|| panic!("{}", c.name));
            assert_eq!(ip.address, v4(c.ip), "{}", c.name);
            assert_eq!(ip.prefix_len, c.prefix, "{}", c.name);
            assert_eq!(ip.gateway, c.gateway.map(v4), "{}", c.name);
            assert_eq!(r.host_veth(Some("cni0")), c.veth, "{}", c.name);
            assert_eq!(r.routes.len(), c.routes, "{}", c.name);
        }
    }

    #[test]
    fn bad_results() {
        let cases = [
            (json!([]), "not a JSON object"),
            (
                json!({"ips": [{"address": "10.0.0.1"}]}),
                "no prefix length",
            ),
            (json!({"ips": [{"address": "nope/24"}]}), "address"),
            (
                json!({"ips": [{"address": "10.0.0.1/33"}]}),
                "larger than 32",
            ),
            (
                json!({"interfaces": [], "ips": [{"interface": 3, "address": "10.0.0.1/8"}]}),
                "names interface 3",
            ),
            (
                json!({"ips": [{"gateway": "10.0.0.1"}]}),
                "without an address",
            ),
            (
                json!({"ips": [{"address": "10.0.0.2/8", "gateway": "x"}]}),
                "gateway",
            ),
            (json!({"interfaces": [{"mac": "aa"}]}), "without a name"),
        ];
        for (input, want) in cases {
            let e = parse_result(&input).unwrap_err();
            assert!(e.contains(want), "{input}: {e}");
        }
    }

    #[test]
    fn empty_result_has_no_ip() {
        let r = parse_result(&json!({"cniVersion": "1.0.0"})).unwrap();
        assert!(r.primary_ip("eth0").is_none());
    }

    #[test]
    fn plugin_errors() {
        type Case<'a> = (&'a [u8], Option<(u64, &'a str)>);
        let cases: [Case<'_>; 5] = [
            (
                br#"{"cniVersion":"1.0.0","code":11,"msg":"failed to allocate for range 0","details":"10.88.0.5 has been allocated to mcp-a, duplicate allocation is not allowed"}"#,
                Some((11, "failed to allocate for range 0; 10.88.0.5 has been allocated to mcp-a, duplicate allocation is not allowed")),
            ),
            (br#"{"code":7,"msg":"invalid network config"}"#, Some((7, "invalid network config"))),
            (br#"{"code":999,"details":"only details"}"#, Some((999, "only details"))),
            (br#"{"cniVersion":"1.0.0","ips":[]}"#, None),
            (b"panic: something", None),
        ];
        for (input, want) in cases {
            let got = PluginError::parse(input).map(|e| (e.code, e.reason()));
            assert_eq!(
                got,
                want.map(|(c, r)| (c, r.to_string())),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn subnets() {
        let cases = [
            ("10.88.0.5", 16, "10.88.0.0/16"),
            ("10.210.3.7", 24, "10.210.3.0/24"),
            ("192.168.1.1", 32, "192.168.1.1/32"),
            ("1.2.3.4", 0, "0.0.0.0/0"),
            ("fd00::5", 64, "fd00::/64"),
        ];
        for (ip, len, want) in cases {
            let ip = CniIp {
                address: ip.parse().unwrap(),
                prefix_len: len,
                gateway: None,
                interface: None,
            };
            assert_eq!(ip.subnet(), want);
        }
    }
}
